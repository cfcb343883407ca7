"""
The broker's errors: how a user request or a relay-client's call fails,
which the HTTP layer turns into Go's status codes and messages.
"""


class BrokerError(Exception):
    """Base of the errors the HTTP layer turns into status codes."""


class UnknownBackend(BrokerError):
    """No relay-client has polled for this backend name (or it was forgotten)."""

    def __init__(self, name: str):
        super().__init__(
            "Cannot reach the client %s. Check that it's turned on, set up, and "
            "connected to the internet. (unknown client)" % (_go_quote(name),)
        )


class BackendUnreachable(BrokerError):
    """The backend is known, but no poll took the request in time."""

    def __init__(self, name: str):
        super().__init__(
            "Cannot reach the client %s. Check that it's turned on, set up, and "
            "connected to the internet. (timeout waiting for relay client to "
            "accept request)" % (_go_quote(name),)
        )


class UnknownRequest(BrokerError):
    """An id that is not (or no longer) pending."""

    def __init__(self, request_id: str):
        super().__init__("Duplicate or invalid request ID %s" % (request_id,))


class RelayClientLost(BrokerError):
    """
    The connection that carried the request to its relay-client died
    before the relay-client showed that it had the request, and it cannot
    be shown that the request did not reach it (so it is not handed out
    again): 502 at once, rather than a 504 after the inactivity timeout.
    """

    status = 502

    def __init__(self, name: str):
        super().__init__(
            "Lost the connection to the relay client of %s before it took the request; "
            "it may not have received it" % (_go_quote(name),)
        )


class RequestExpired(BrokerError):
    """No activity on the request for the inactive-request timeout."""


class ServerStopping(BrokerError):
    """The server is shutting down."""


class Overloaded(BrokerError):
    """A limit on pending requests or on backends is reached (503, retry later)."""


def _go_quote(text: str) -> str:
    """Go's C{%q} for the printable strings backend names are."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append("\\x%02x" % ord(ch) if ord(ch) < 0x80 else "\\u%04x" % ord(ch))
        else:
            out.append("\\U%08x" % ord(ch))
    out.append('"')
    return "".join(out)
