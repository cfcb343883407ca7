"""
The request made to an HTTP peer, as bytes.

A request passes through the relay as bytes and leaves it as bytes: a
header value that is not UTF-8 (Latin-1 from an old client, raw bytes from
a fuzzer) reaches the peer as it came, not as U+FFFD. Only the error text a
user reads is decoded.
"""

from typing import List, NamedTuple, Tuple

RawHeader = Tuple[bytes, bytes]


class OutboundRequest(NamedTuple):
    method: bytes
    scheme: str  # "http" or "https"
    address: str  # host[:port] to connect to
    target: bytes  # path?query, as on the request line
    host: bytes  # the Host header (:authority over HTTP/2)
    headers: List[RawHeader]
    body: bytes

    @property
    def url(self) -> str:
        """C{scheme://address/path?query}, for error messages and logs."""
        return "%s://%s%s" % (self.scheme, self.address, self.target.decode("utf-8", "replace"))

    @property
    def raw_url(self) -> bytes:
        """The URL to ask an HTTP/1.1 agent for."""
        return b"%s://%s%s" % (self.scheme.encode("ascii"), self.address.encode("utf-8"), self.target)

    def describe(self, reason: str) -> str:
        """Go's C{url.Error} text: C{Get "http://...": reason}."""
        method = self.method.decode("latin-1")
        return '%s "%s": %s' % (method[:1].upper() + method[1:].lower(), self.url, reason)
