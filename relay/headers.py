"""
Header names and values as the Go relay treats them.

Go canonicalizes header names (C{content-type} -> C{Content-Type}) on both
sides of the relay and replaces CR and LF in values with spaces when it
writes them; a relay-client can send any string, so these rules are also our
defence against header injection.
"""

import re

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

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


def valid_name(name: str) -> bool:
    return bool(_TOKEN.match(name))


def sanitize_value(value: str) -> bytes:
    """The value as bytes, with CR, LF and NUL made spaces, as Go does."""
    return (
        value.replace("\r", " ").replace("\n", " ").replace("\0", " ").encode("utf-8", "replace")
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
