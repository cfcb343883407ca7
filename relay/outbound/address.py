"""
C{host:port} as the relay's flags and peer lists spell it: one parser, so
that C{--backend_address}, C{--peers} and the addresses dialled from them
agree on what C{[::1]:8081} means.
"""

from typing import Optional, Tuple


def split_host_port(text: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """
    C{host:port}, C{host} or C{[v6]:port} (C{[v6]} alone too) -> C{(host,
    port)}, with an IPv6 address's brackets removed. The host may be empty
    (C{:8081}), as Go's dialer allows.

    @param default_port: the port when the text has none; None when one is
        required.
    @raise ValueError: with a message for the operator.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("not HOST:PORT; write an IPv6 address as [::1]:8081")
        port: Optional[str] = rest[1:] if rest else None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = text, None
    if port is None:
        if default_port is None:
            raise ValueError("no port; write HOST:PORT, e.g. localhost:8081")
        return host, default_port
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("the port must be a number from 1 to 65535, e.g. localhost:8081")
    return host, int(port)


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80
