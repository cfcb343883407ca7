"""
Making a relayed request against the backend and streaming its answer.

The backend sees the user's request as the Go client would have made it:
same method, path (after C{--backend_path}) and query, every header value
(repeated ones stay repeated), the user's Host unless C{--preserve_host} is
off, and C{Authorization: Bearer ...} from C{--authentication_token_file},
read at each request so that a rotated token is used at once. Redirects are
not followed (Twisted's HTTP client never does): a 302 goes back to the user as it is.
"""

from typing import List, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet import endpoints
from twisted.internet import error as net_error
from twisted.internet import ssl
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import InvalidHeaderName
from twisted.web.iweb import IPolicyForHTTPS, UNKNOWN_LENGTH
from zope.interface import implementer

from relay.client.endpoints import CachingEndpointFactory, client_endpoint
from relay.client.http import BytesProducer, describe_failure, read_token
from relay.client.keepalive import KeepAliveAgent
from relay.config import ClientConfig
from relay.headers import BACKEND_DROPS, UPGRADE_DROPS, go_canonical, valid_name
from relay.lean_headers import LeanHeaders
from relay.logs import connect_quietly
from relay.proto.http_relay_pb2 import HttpRequest


Header = Tuple[str, str]
CONNECT_TIMEOUT = 30.0
class BackendError(Exception):
    """The backend could not be asked, or did not answer; the text is for the user."""


class BackendRequest(NamedTuple):
    method: str
    url: str  # scheme://address/path?query
    scheme: str
    address: str  # host[:port] to connect to
    target: str  # path?query, as on the request line
    host: str  # the Host header
    headers: List[Header]
    body: bytes

    def describe(self, reason: str) -> str:
        """Go's C{url.Error} text: C{Get "http://...": reason}."""
        return '%s "%s": %s' % (self.method[:1].upper() + self.method[1:].lower(), self.url, reason)


class BackendTarget:
    """Where and how relayed requests are sent: the C{--backend_*} flags."""

    def __init__(self, config: ClientConfig):
        self.scheme = config.backend_scheme
        self.address = config.backend_address
        self.path_prefix = config.backend_path
        self.preserve_host = config.preserve_host
        self.token_file = config.authentication_token_file

    def build(self, request: HttpRequest, upgrade: bool = False) -> BackendRequest:
        """
        @raise BackendError: the token file cannot be read.
        """
        parts = urlsplit(request.url)
        path = self.path_prefix + parts.path
        if not path.startswith("/"):
            path = "/" + path
        target = path + ("?" + parts.query if parts.query else "")
        drops = UPGRADE_DROPS if upgrade else BACKEND_DROPS
        headers = [(h.name, h.value) for h in request.header if h.name.lower() not in drops]
        if self.token_file:
            try:
                token = read_token(self.token_file)
            except (OSError, UnicodeDecodeError) as e:
                raise BackendError(
                    "Failed to create request for backend: Failed to read authentication token from %s: %s"
                    % (self.token_file, e)
                )
            headers = [(n, v) for n, v in headers if n.lower() != "authorization"]
            headers.append(("Authorization", "Bearer " + token))
        host = self.address
        if self.preserve_host and request.HasField("host") and request.host:
            host = request.host
        return BackendRequest(
            method=request.method or "GET",
            url="%s://%s%s" % (self.scheme, self.address, target),
            scheme=self.scheme,
            address=self.address,
            target=target,
            host=host,
            headers=headers,
            body=request.body,
        )


def split_address(address: str, scheme: str) -> Tuple[str, int]:
    """C{host:port}, C{host}, C{[v6]:port} -> (host, port)."""
    default = 443 if scheme == "https" else 80
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return address, default
    return host, int(port)


def connect_error(request: BackendRequest, failure: Failure) -> str:
    """Why the backend could not be asked, worded like Go's dialer."""
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return connect_error(request, reasons[0])
    if isinstance(value, net_error.ConnectionRefusedError):
        return request.describe("dial tcp %s: connect: connection refused" % (request.address,))
    if isinstance(value, net_error.DNSLookupError):
        host, _ = split_address(request.address, request.scheme)
        return request.describe("dial tcp: lookup %s: no such host" % (host,))
    if isinstance(value, net_error.ConnectError):
        return request.describe("dial tcp %s: %s" % (request.address, str(value).strip() or type(value).__name__))
    return request.describe(describe_failure(failure))


def load_trust_root(path: str):
    """
    The CA certificates in a PEM file, to verify the backend with.

    @raise ValueError: with the Go client's wording, for a start-up error.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError("Failed to read CA file %s: %s" % (path, e))
    marker = b"-----END CERTIFICATE-----"
    certs = []
    for block in pem.split(marker)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        try:
            certs.append(ssl.Certificate.loadPEM(block[start:] + marker + b"\n"))
        except Exception:
            continue
    if not certs:
        raise ValueError("No certs found in %s" % (path,))
    return ssl.trustRootFromCertificates(certs)


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """Verify the backend's certificate against C{trust_root} (None: the system's)."""

    def __init__(self, trust_root=None):
        self.trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int):
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        return self.tls_options(host)

    def tls_options(self, host: str, acceptable_protocols=None):
        """Client TLS options for C{host}, offering C{acceptable_protocols} by ALPN."""
        kwargs = {}
        if self.trust_root is not None:
            kwargs["trustRoot"] = self.trust_root
        if acceptable_protocols:
            kwargs["acceptableProtocols"] = list(acceptable_protocols)
        return ssl.optionsForClientTLS(host, **kwargs)


async def connect_own(reactor, policy: TrustPolicy, request: BackendRequest, protocol, alpn=None) -> None:
    """
    Connect C{protocol} (an upgrade's pipe, an HTTP/2 connection) to the
    backend of C{request} over a connection of its own, not one from the
    pool: TLS for C{https}, offering C{alpn}; failures worded like Go's
    dialer.
    """
    host, port = split_address(request.address, request.scheme)
    endpoint = client_endpoint(reactor, host, port, CONNECT_TIMEOUT)
    if request.scheme == "https":
        endpoint = endpoints.wrapClientTLS(policy.tls_options(host, alpn), endpoint)
    try:
        await connect_quietly(endpoint, protocol)
    except CancelledError:
        raise
    except Exception as e:
        raise BackendError(connect_error(request, Failure(e)))


class BackendResponse:
    """The backend's answer: status and headers now, the body on demand."""

    def __init__(self, status: int, headers: List[Header], response=None, length: Optional[int] = None):
        self.status = status
        self.headers = headers
        self._response = response
        self.length = length

    def deliver(self, sink) -> None:
        """
        Stream the body into C{sink} (a L{relay.client.chunker.Chunker}):
        C{set_producer} with what to pause, C{write} per read, C{finish} at
        the end, or C{fail} with a reason when the body broke off.
        """
        self._response.deliverBody(_BodyPump(sink))


class _BodyPump(Protocol):
    def __init__(self, sink):
        self.sink = sink

    def connectionMade(self):
        self.sink.set_producer(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.sink.write(data)

    def connectionLost(self, reason: Failure) -> None:
        # ResponseDone: the body was complete. PotentialDataLoss: it had no
        # length and no chunking, so the connection's close is its end, as
        # HTTP/1.1 says. Anything else (a Content-Length or chunked body
        # cut short, a reset) broke off, and must not look complete; the Go
        # client ends it as if it were. The handler warns, with the request
        # id, unless the close was ours (the user went away).
        if reason.check(ResponseDone, PotentialDataLoss):
            self.sink.finish()
            return
        self.sink.fail(describe_failure(reason))


def response_headers(response, method: str) -> List[Header]:
    headers: List[Header] = []
    for name, values in response.headers.getAllRawHeaders():
        key = go_canonical(name.decode("latin-1"))
        for value in values:
            headers.append((key, value.decode("utf-8", "replace")))
    length = response.length
    if (
        length is not UNKNOWN_LENGTH
        and method.upper() != "HEAD"
        and response.code >= 200
        and response.code not in (204, 304)
    ):
        # Agent keeps Content-Length to itself; the user's tools want it
        # (download progress) and the Go client passed it on.
        headers.append(("Content-Length", str(length)))
    return headers


class Backend:
    """Plain (non-upgrade) requests, over a pool of persistent connections."""

    def __init__(
        self,
        reactor: IReactorTime,
        target: BackendTarget,
        policy: TrustPolicy,
        max_idle_per_host: int,
        idle_timeout: float,
        engine: str = "twisted",
    ):
        self.target = target
        self.agent = KeepAliveAgent(
            reactor, CachingEndpointFactory(reactor, policy, CONNECT_TIMEOUT), max_idle_per_host, idle_timeout, engine
        )

    def closeCachedConnections(self):
        """Close the idle backend connections (at shutdown)."""
        return self.agent.closeCachedConnections()

    async def open(self, request: BackendRequest) -> BackendResponse:
        # The lean Headers (either engine writes them as twisted.web's
        # would), refusing what twisted.web's refuse: a name that is not a
        # token could smuggle a header.
        headers = LeanHeaders()
        headers.setRawHeaders(b"host", [request.host.encode("utf-8")])
        for name, value in request.headers:
            if not valid_name(name):
                raise InvalidHeaderName(name.encode("latin-1", "replace"))
            headers.addRawHeader(name.encode("latin-1"), value.encode("utf-8"))
        producer = BytesProducer(request.body) if request.body else None
        try:
            response = await self.agent.request(
                request.method.encode("ascii", "replace"), request.url.encode("utf-8"), headers, producer
            )
        except CancelledError:
            raise
        except Exception as e:
            if any(r.check(CancelledError) for r in getattr(e, "reasons", ())):
                raise CancelledError()
            raise BackendError(connect_error(request, Failure(e)))
        length = response.length if response.length is not UNKNOWN_LENGTH else None
        return BackendResponse(response.code, response_headers(response, request.method), response, length)
