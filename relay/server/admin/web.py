"""
The admin listener's resources: the page, its two static files, and
C{/api/status}.

They live on their own port, never on the user port: there every path may
belong to a backend (with C{X-Server-Name}, even C{/}), so nothing of ours
may claim one.

With a token (C{--admin_token_file}), every path needs it: as
C{Authorization: Bearer TOKEN}, or, for a browser that cannot send a
header on navigation, as the cookie that C{/?token=TOKEN} sets (and
redirects away from, so the token leaves the address bar and the
history). Tokens are compared as SHA-256 digests with
L{hmac.compare_digest}, in constant time whatever their lengths.

The page is three files shipped as package data, with no CDN and no build
step; a Content-Security-Policy of C{'self'} keeps it from loading
anything else, inline scripts included.
"""

import hashlib
import hmac
import ipaddress
import json
import pkgutil
from typing import Callable, Optional
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from twisted.web.resource import Resource
from twisted.web.server import Site

from relay.server.admin.status import Query, snapshot

COOKIE = b"relay_admin"
_STATIC = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/admin.js": ("admin.js", b"text/javascript; charset=utf-8"),
    b"/admin.css": ("admin.css", b"text/css; charset=utf-8"),
}
_SECURITY_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self' data:; frame-ancestors 'none'",
    ),
)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenCheck:
    """
    The admin token, read once at start-up. A file, not a flag, so that
    the token stays out of C{ps} and of the view's own flag list.
    """

    def __init__(self, token: Optional[bytes]):
        self._digest = _digest(token) if token else None

    @classmethod
    def from_file(cls, path: Optional[str]) -> "TokenCheck":
        if not path:
            return cls(None)
        with open(path, "rb") as f:
            token = f.read().strip()
        if not token:
            raise ValueError("the file is empty")
        return cls(token)

    @property
    def required(self) -> bool:
        return self._digest is not None

    def matches(self, token: Optional[bytes]) -> bool:
        if self._digest is None:
            return True
        if not token:
            return False
        return hmac.compare_digest(self._digest, _digest(token))

    def allows(self, request) -> bool:
        if self._digest is None:
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer" and self.matches(value.strip()):
            return True
        cookie = request.getCookie(COOKIE)
        return cookie is not None and self.matches(unquote_to_bytes(cookie))


class AdminResource(Resource):
    """Every path of the admin port, dispatched on the whole path."""

    isLeaf = True

    def __init__(self, status: Callable[[Query], dict], check: TokenCheck):
        super().__init__()
        self.status = status
        self.check = check

    def render(self, request):
        request.responseHeaders.removeHeader(b"server")
        for name, value in _SECURITY_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._text(request, 405, b"Only GET and HEAD\n")
        if not self.check.required and not _literal_host(request.getHeader(b"host")):
            return self._text(
                request,
                403,
                b"Forbidden: without --admin_token_file this port only answers requests for an "
                b"IP address or localhost\n",
            )
        if request.path == b"/" and b"token" in request.args and self.check.required:
            return self._login(request)
        if not self.check.allows(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="relay admin"')
            return self._text(request, 401, b"Unauthorized: this admin port needs its token\n")
        if request.path == b"/api/status":
            body = json.dumps(self.status(Query(request.args)), separators=(",", ":"), allow_nan=False)
            request.setHeader(b"content-type", b"application/json")
            return body.encode("utf-8")
        static = _STATIC.get(request.path)
        if static is None:
            return self._text(request, 404, b"Not found\n")
        name, content_type = static
        request.setHeader(b"content-type", content_type)
        return pkgutil.get_data("relay.server.admin", "static/" + name)

    def _login(self, request):
        """C{/?token=...}: a cookie for the browser, and the token out of its address bar."""
        token = request.args[b"token"][0]
        if not self.check.matches(token):
            return self._text(request, 401, b"Unauthorized: wrong token\n")
        request.addCookie(
            COOKIE,
            quote(token.decode("latin-1"), safe="").encode("ascii"),
            path=b"/",
            httpOnly=True,
            sameSite="strict",
            secure=request.isSecure(),
        )
        # The rest of the query (?backend=NAME) stays: it is what the page
        # was opened for.
        rest = [(k, v) for k, v in parse_qsl(request.uri.partition(b"?")[2], keep_blank_values=True) if k != b"token"]
        request.setResponseCode(303)
        request.setHeader(b"location", b"/" + (b"?" + urlencode(rest).encode("ascii") if rest else b""))
        return b""

    @staticmethod
    def _text(request, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return body


def _literal_host(host: Optional[bytes]) -> bool:
    """
    Whether a Host header names an IP address or localhost. Without a
    token, that is all the view answers: a web page the operator happens
    to visit could otherwise point a DNS name of its own at 127.0.0.1 and
    read the view from the browser (DNS rebinding), since the browser
    would send no credentials and need none.
    """
    if not host:
        return False
    name = host.decode("latin-1").strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AdminSite(Site):
    """
    A quiet Site: the page polls every two seconds, which no log wants.
    Idle connections close after a minute (twisted.web's default is 12
    hours), so that forgotten tabs and slow peers do not pile up.
    """

    noisy = False  # no "Starting factory <AdminSite object at 0x…>" lines

    def __init__(self, resource):
        super().__init__(resource, timeout=60)

    def log(self, request) -> None:
        pass


def admin_site(broker, stats, flags: dict, check: TokenCheck) -> AdminSite:
    return AdminSite(AdminResource(lambda query: snapshot(broker, stats, flags, query), check))
