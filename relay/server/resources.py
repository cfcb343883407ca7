"""
The root of the relay server's resource tree. Routing follows the Go
server's C{http.ServeMux}: C{/healthz}, C{/metrics} and the three
C{/server/...} paths (L{relay.server.for_relay_clients}) match exactly;
every other path is user traffic for a backend
(L{relay.server.for_users}). Status codes and bodies are the Go server's
(its errors come from C{http.Error}: C{text/plain; charset=utf-8},
C{X-Content-Type-Options: nosniff} and a trailing newline).

Paths are cleaned as Go's ServeMux does, before any routing
(docs/security.md): when the percent-decoded path holds C{.} or C{..}
segments or empty ones (C{//}), the answer is C{301} to the cleaned path
and nothing is relayed. Decoding first means C{%2e%2e} is a dot segment
too. An encoded slash (C{%2F}) stays part of its segment: it is relayed as
it came, encoded, and is not a separator for the backend name either.
"""

from typing import List, Optional
from urllib.parse import quote, unquote_to_bytes

from twisted.web.resource import Resource

from relay.server.auth import AccessPolicy
from relay.server.broker import Broker
from relay.server.for_relay_clients import PATHS as RELAY_CLIENT_PATHS
from relay.server.for_relay_clients import ServerResource
from relay.server.for_users import ClientResource
from relay.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.server.response import http_error
from relay.server.routing import Routing


class RootResource(Resource):
    """Dispatches exact paths; everything else goes to the backends."""

    def __init__(
        self, broker: Broker, metrics_body, policy: Optional[AccessPolicy] = None, routing: Optional[Routing] = None
    ):
        super().__init__()
        policy = policy if policy is not None else AccessPolicy()
        self.client = ClientResource(broker, policy, routing)
        server = ServerResource(broker, policy, routing)
        self._exact = {
            b"/healthz": HealthResource(broker),
            b"/metrics": MetricsResource(metrics_body),
        }
        self._exact.update(dict.fromkeys(RELAY_CLIENT_PATHS, server))

    def streams_body(self, request, path: bytes) -> bool:
        """
        Whether a request whose head has arrived, with a body to come, is
        relayed at once with its body streaming (docs/protocol.md,
        "Extension: streamed request bodies"): user traffic only, as
        L{relay.server.for_users.ClientResource.streams_body} decides.
        C{path} is the target's, undecoded; the request's own attributes
        from its request line are not set yet.
        """
        if path in self._exact or not path.startswith(b"/"):
            return False
        return self.client.streams_body(request, path)

    def route(self, request) -> Resource:
        """The resource for C{request}, chosen by its whole path."""
        redirect = _redirect_if_unclean(request)
        if redirect is not None:
            return redirect
        return self._exact.get(request.path, self.client)

    def getChildWithDefault(self, name, request):
        # Only for a request class other than RelayRequest, which calls
        # route() itself and sets no Server header.
        request.responseHeaders.removeHeader(b"server")
        return self.route(request)

    def render(self, request):
        request.responseHeaders.removeHeader(b"server")
        return self.route(request).render(request)


def clean_path(path: bytes) -> bytes:
    """
    Go's C{cleanPath} (net/http): C{path.Clean}, keeping a trailing slash.
    """
    if not path:
        return b"/"
    if not path.startswith(b"/"):
        path = b"/" + path
    out: List[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    cleaned = b"/" + b"/".join(out)
    if path.endswith(b"/") and cleaned != b"/":
        cleaned += b"/"
    return cleaned


def _redirect_if_unclean(request) -> Optional[Resource]:
    """A 301 to the cleaned path, when the decoded path is not clean."""
    path = request.path
    if request.method == b"CONNECT" or not path.startswith(b"/"):
        return None
    if path.find(b"%") < 0 and path.find(b"/.") < 0 and path.find(b"//") < 0:
        # Nothing escaped, no dot or empty segment: clean as it is (the
        # common case, three times per relayed request).
        return None
    decoded = unquote_to_bytes(path)
    cleaned = clean_path(decoded)
    if cleaned == decoded:
        return None
    location = quote(cleaned, safe="/!$&'()*+,;=:@~").encode("ascii")
    _, question, query = request.uri.partition(b"?")
    if question:
        location += b"?" + query
    return _Redirect(location)


class _Redirect(Resource):
    """Go's C{http.Redirect} with 301."""

    isLeaf = True

    def __init__(self, location: bytes):
        super().__init__()
        self.location = location

    def render(self, request):
        request.setResponseCode(301)
        request.responseHeaders.setRawHeaders(b"location", [self.location])
        if request.method in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
            href = self.location.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")
            href = href.replace(b'"', b"&#34;").replace(b"'", b"&#39;")
            return b'<a href="%s">Moved Permanently</a>.\n\n' % (href,)
        return b""


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, broker: Broker):
        super().__init__()
        self.broker = broker

    def render(self, request):
        if self.broker.stopping:
            return http_error(request, 503, "Server is shutting down")
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        return b"ok"


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, render_metrics):
        super().__init__()
        self.render_metrics = render_metrics

    def render(self, request):
        request.responseHeaders.setRawHeaders(b"content-type", [METRICS_CONTENT_TYPE])
        return self.render_metrics()
