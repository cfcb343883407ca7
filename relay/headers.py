"""
Header names and values as the Go relay treats them.

Go canonicalizes header names (C{content-type} -> C{Content-Type}) on both
sides of the relay and replaces CR and LF in values with spaces when it
writes them; a relay-client can send any string, so these rules are also our
defence against header injection.

Names are checked with C{fullmatch}: with C{match} and a C{$} anchor, a name
ending in a newline passed (C{$} matches before a final C{\\n}) and ended
up in a response head or a chunked trailer section as a bare line break.
Values lose CR, LF and NUL and their surrounding blanks, as Go's header
writer does (C{textproto.TrimString}); HTTP/2 would otherwise refuse them.

Trailers follow Go's C{httpguts.ValidTrailerHeader}: names that frame or
route a message (C{Content-Length}, C{Transfer-Encoding}, C{Connection},
C{TE}, C{Host}, ...) are not allowed after the body, and a relay-client's
such trailers are dropped. Over HTTP/2 the connection-specific ones would
make the C{h2} stack raise while it ends the stream.
"""

import re
from typing import Dict, FrozenSet, Iterable, Tuple

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_RAW_TOKEN = re.compile(_TOKEN.pattern.encode("ascii"))

# Hop-by-hop headers (RFC 9110 7.6.1) describe one connection, not the
# message: the relay's connection to the user-client is not the backend's.
HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ]
)

# The other hop-by-hop names of a user's request, which the server drops on
# the way to the backend (Connection, Upgrade and TE have rules of their own).
HOP_BY_HOP_REQUEST = frozenset(
    ["keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "trailer"]
)

# The mark a replica puts on a call it passes to the peer that owns it
# (relay.server.forward): it stops a second hop, and is the relay's own, so
# the owner drops it before the backend could see it.
FORWARDED_BY = "Relay-Forwarded-By"

# Request headers Go's server does not put into Request.Header, and our own
# mark: they never reach the relay-client.
NOT_RELAYED = frozenset(["host", "transfer-encoding", FORWARDED_BY.lower()])

# Connection-specific names, which HTTP/2 forbids in a header block (RFC
# 9113 8.2.2, C{TE: trailers} aside): the C{h2} stack raises on them.
CONNECTION_SPECIFIC = frozenset(
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"]
)

# What the relay-client leaves out of a backend request over HTTP/1.1:
# Twisted's client frames the body itself and manages its own connections;
# the body is sent whole at once, so there is nothing for 100-continue to
# wait for.
BACKEND_DROPS = frozenset(
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "expect"]
)
# An upgrade keeps Connection and Upgrade: they are the point of it.
UPGRADE_DROPS = frozenset(["host", "content-length", "transfer-encoding"])
# Over HTTP/2, Host becomes :authority, the length is ours to declare, and
# connection-specific names (bar TE, see there) are not allowed.
H2_BACKEND_DROPS = (CONNECTION_SPECIFIC - {"te"}) | {"host", "http2-settings", "content-length"}


# Our extension (docs/protocol.md): a trailer on a relay-client's message
# saying that the backend's answer broke off, with a short reason. Our
# server aborts the user's answer on it and never relays it; the Go server
# relays it as an ordinary trailer.
RELAY_ERROR = "Relay-Error"

# Our extension (docs/protocol.md): streamed request bodies. On a poll,
# C{Relay-Body: stream} says the relay-client can fetch a body that
# follows; on the poll's answer, that this request's body follows; on a
# C{requeststream} call, that it fetches that body. The Go server never
# reads it and the Go relay-client never sends it.
RELAY_BODY = "Relay-Body"
RELAY_BODY_STREAM = "stream"


# Go's httpguts badTrailer: never valid as a trailer.
BAD_TRAILERS = frozenset(
    [
        "authorization",
        "cache-control",
        "connection",
        "content-encoding",
        "content-length",
        "content-range",
        "content-type",
        "expect",
        "host",
        "keep-alive",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "range",
        "realm",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "www-authenticate",
    ]
)


# Go's httpguts.ValidHostHeader: the bytes a Host value may hold.
_HOST_BYTES = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    b"!$%&'()*+,-.:;=[]_~"
)


_HOST_CHARS = bytes(sorted(_HOST_BYTES))


def valid_host(value: bytes) -> bool:
    # What is left once every allowed byte is deleted (in C, not per byte).
    return not value.translate(None, _HOST_CHARS)


def as_bytes(names: Iterable[str]) -> FrozenSet[bytes]:
    """A set of names above as the bytes twisted.web's headers are."""
    return frozenset(name.encode("ascii") for name in names)


def valid_name(name: str) -> bool:
    """A header name is an RFC 9110 token, the whole of it."""
    return _TOKEN.fullmatch(name) is not None


def valid_raw_name(name: bytes) -> bool:
    """L{valid_name} for a name as bytes."""
    return _RAW_TOKEN.fullmatch(name) is not None


def valid_trailer(name: str) -> bool:
    return valid_name(name) and name.lower() not in BAD_TRAILERS


def sanitize_value(value: str) -> bytes:
    """
    The value as bytes, with CR, LF and NUL made spaces and surrounding
    blanks removed, as Go does.
    """
    return (
        value.replace("\r", " ")
        .replace("\n", " ")
        .replace("\0", " ")
        .strip(" \t")
        .encode("utf-8", "replace")
    )


def sanitize_raw(value: bytes) -> bytes:
    """L{sanitize_value} for a value as bytes, which stay as they are otherwise."""
    return value.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\0", b" ").strip(b" \t")


_canonical: Dict[str, str] = {}


def go_canonical(name: str) -> str:
    """
    Go's C{textproto.CanonicalMIMEHeaderKey}: the first letter and any letter
    after a hyphen upper case, the rest lower case; names with characters
    outside a token are left as they are. Remembered (up to a bound: names
    are the peers' to choose), as each relayed request asks for a few.
    """
    known = _canonical.get(name)
    if known is not None:
        return known
    result = _go_canonical(name)
    if len(_canonical) < 4096:
        _canonical[name] = result
    return result


def _go_canonical(name: str) -> str:
    if not valid_name(name) or " " in name:
        return name
    out = []
    upper = True
    for ch in name:
        if upper and "a" <= ch <= "z":
            ch = ch.upper()
        elif not upper and "A" <= ch <= "Z":
            ch = ch.lower()
        out.append(ch)
        upper = ch == "-"
    return "".join(out)


def origin_form(target: bytes) -> Tuple[bytes, bytes]:
    """
    C{(path and query, authority)} of an absolute-form request target
    (RFC 9112 3.2.2), whose authority then replaces the Host header, as Go
    does (without userinfo, as Go's C{URL.Host}); any other target as it
    is, with an empty authority.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target, b""
    authority, slash, tail = rest.partition(b"/")
    authority, question, query = authority.partition(b"?")
    if question:
        tail, slash = b"", b""
        query = b"?" + query
    else:
        query = b""
    authority = authority.rpartition(b"@")[2]
    return (b"/" + tail + query if slash else b"/" + query), authority
