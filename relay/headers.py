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

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

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


def valid_name(name: str) -> bool:
    """A header name is an RFC 9110 token, the whole of it."""
    return _TOKEN.fullmatch(name) is not None


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


def go_canonical(name: str) -> str:
    """
    Go's C{textproto.CanonicalMIMEHeaderKey}: the first letter and any letter
    after a hyphen upper case, the rest lower case; names with characters
    outside a token are left as they are.
    """
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
