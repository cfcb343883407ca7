"""
Connecting to an HTTP peer over a connection of its own, and what a failed
attempt is called. The wording is the Go client's (C{Get "http://...":
dial tcp ...: connect: connection refused}): users and their tools read it
in the 502 the relay answers, and expect it to read as it did.
"""

from typing import Tuple

from twisted.internet import endpoints
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from relay.net.transport import connect_quietly
from relay.outbound import CONNECT_TIMEOUT
from relay.outbound.address import default_port, split_host_port
from relay.outbound.endpoints import client_endpoint
from relay.outbound.request import OutboundRequest
from relay.outbound.tls import TrustPolicy


class BackendError(Exception):
    """The peer could not be asked, or did not answer; the text is for the user."""


def split_address(request: OutboundRequest) -> Tuple[str, int]:
    """Where C{request} connects to: (host, port), the scheme's port by default."""
    try:
        return split_host_port(request.address, default_port(request.scheme))
    except ValueError:
        return request.address, default_port(request.scheme)


def describe_failure(failure: Failure) -> str:
    """A one-line reason, digging through Agent's wrapper exceptions."""
    value = failure.value
    if isinstance(value, (ResponseFailed, ResponseNeverReceived)) and value.reasons:
        return describe_failure(value.reasons[0])
    if isinstance(value, net_error.ConnectionRefusedError):
        return "connect: connection refused"
    if isinstance(value, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "connection closed before the answer was complete"
    if isinstance(value, CancelledError):
        return "timeout"
    if type(value).__module__.startswith("OpenSSL") and value.args and isinstance(value.args[0], list):
        # [('SSL routines', '', 'certificate verify failed')] -> readable.
        reasons = [str(r[-1]) for r in value.args[0] if isinstance(r, tuple) and r]
        if reasons:
            return "tls: " + "; ".join(reasons)
    text = str(value).strip()
    return text or type(value).__name__


def connect_error(request: OutboundRequest, failure: Failure) -> str:
    """Why the peer could not be asked, worded like Go's dialer."""
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return connect_error(request, reasons[0])
    if isinstance(value, net_error.ConnectionRefusedError):
        return request.describe("dial tcp %s: connect: connection refused" % (request.address,))
    if isinstance(value, net_error.DNSLookupError):
        host, _ = split_address(request)
        return request.describe("dial tcp: lookup %s: no such host" % (host,))
    if isinstance(value, net_error.ConnectError):
        return request.describe("dial tcp %s: %s" % (request.address, str(value).strip() or type(value).__name__))
    return request.describe(describe_failure(failure))


async def connect_own(reactor, policy: TrustPolicy, request: OutboundRequest, protocol, alpn=None) -> None:
    """
    Connect C{protocol} (an upgrade's pipe, an HTTP/2 connection) to the
    peer of C{request} over a connection of its own, not one from the
    pool: TLS for C{https}, offering C{alpn}; failures worded like Go's
    dialer.
    """
    host, port = split_address(request)
    endpoint = client_endpoint(reactor, host, port, CONNECT_TIMEOUT)
    if request.scheme == "https":
        endpoint = endpoints.wrapClientTLS(policy.tls_options(host, alpn), endpoint)
    try:
        await connect_quietly(endpoint, protocol)
    except CancelledError:
        raise
    except Exception as e:
        raise BackendError(connect_error(request, Failure(e))) from e
