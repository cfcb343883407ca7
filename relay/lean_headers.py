"""
Header fields for the lean HTTP/1.1 engines (L{relay.server.lean_http1},
L{relay.client.lean_http1}): a dict of lower-case names, with the methods
of twisted.web's L{Headers} the relay calls, and names written in
twisted.web's case, so that what goes on the wire is byte for byte what
twisted.web wrote.
"""

from typing import Dict

# Header names as twisted.web's Headers writes them (Http-Header-Case, with
# its exceptions), so that heads are byte for byte what they were.
_CASE = {
    b"Content-Md5": b"Content-MD5",
    b"Dnt": b"DNT",
    b"Etag": b"ETag",
    b"P3p": b"P3P",
    b"Te": b"TE",
    b"Www-Authenticate": b"WWW-Authenticate",
    b"X-Xss-Protection": b"X-XSS-Protection",
}
canonical_names: Dict[bytes, bytes] = {}


def canonical_name(lower: bytes) -> bytes:
    """C{content-type} -> C{Content-Type}, as twisted.web writes it."""
    name = canonical_names.get(lower)
    if name is None:
        name = b"-".join([word.capitalize() for word in lower.split(b"-")])
        name = _CASE.get(name, name)
        if len(canonical_names) < 10000:  # names are the peer's to choose
            canonical_names[lower] = name
    return name


def _name(name) -> bytes:
    return name.lower() if type(name) is bytes else name.encode("latin-1").lower()


def _value(value) -> bytes:
    """
    A value as twisted.web's Headers stores it: bytes, no line breaks.
    (find(), not C{in}: a bytes C{in} first tries its operand as an
    integer, and the TypeError it makes and drops costs more than the
    search; a few per request.)
    """
    if type(value) is not bytes:
        value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if value.find(b"\n") >= 0 or value.find(b"\r") >= 0:
        value = b" ".join(value.splitlines())
    return value


class LeanHeaders(dict):
    """
    The methods of twisted.web's L{Headers} the relay calls, over a dict of
    lower-case names to lists of values (a dict itself: made in C, read
    without a call); names are written in twisted.web's case.
    """

    __slots__ = ()

    def hasHeader(self, name) -> bool:
        return _name(name) in self

    def getRawHeaders(self, name, default=None):
        values = self.get(_name(name))
        if not values:
            return default
        if type(name) is str:
            return [v.decode("utf-8") for v in values]
        return values

    def setRawHeaders(self, name, values) -> None:
        clean = []
        for value in values:
            if type(value) is not bytes or value.find(b"\n") >= 0 or value.find(b"\r") >= 0:
                value = _value(value)
            clean.append(value)
        self[name.lower() if type(name) is bytes else _name(name)] = clean

    def addRawHeader(self, name, value) -> None:
        key = _name(name)
        values = self.get(key)
        if values is None:
            self[key] = [_value(value)]
        else:
            values.append(_value(value))

    def removeHeader(self, name) -> None:
        self.pop(_name(name), None)

    def getAllRawHeaders(self):
        return ((canonical_name(k), v) for k, v in self.items())

    def copy(self) -> "LeanHeaders":
        other = LeanHeaders()
        for k, v in self.items():
            other[k] = list(v)
        return other

    def __repr__(self) -> str:
        return "LeanHeaders(%s)" % (dict.__repr__(self),)
