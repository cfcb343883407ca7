"""
Making a relayed request against the backend and streaming its answer.

The backend sees the user's request as the Go client would have made it:
same method, path (after C{--backend_path}) and query, every header value
(repeated ones stay repeated), the user's Host unless C{--preserve_host} is
off, and C{Authorization: Bearer ...} from C{--authentication_token_file},
read at each request so that a rotated token is used at once. Redirects are
not followed (Twisted's HTTP client never does): a 302 goes back to the user as it is.
"""

from typing import List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import InvalidHeaderName
from twisted.web.iweb import UNKNOWN_LENGTH

from relay.client.http import BytesProducer, read_token
from relay.client.keepalive import KeepAliveAgent
from relay.config import ClientConfig
from relay.headers import BACKEND_DROPS, UPGRADE_DROPS, go_canonical, valid_raw_name
from relay.lean_headers import LeanHeaders
from relay.outbound import CONNECT_TIMEOUT
from relay.outbound.connect import BackendError, connect_error, describe_failure
from relay.outbound.endpoints import CachingEndpointFactory
from relay.outbound.request import OutboundRequest
from relay.outbound.tls import TrustPolicy
from relay.proto.http_relay_pb2 import HttpRequest

Header = Tuple[str, str]


class BackendTarget:
    """Where and how relayed requests are sent: the C{--backend_*} flags."""

    def __init__(self, config: ClientConfig):
        self.scheme = config.backend_scheme
        self.address = config.backend_address
        self.path_prefix = config.backend_path
        self.preserve_host = config.preserve_host
        self.token_file = config.authentication_token_file

    def build(self, request: HttpRequest, upgrade: bool = False) -> OutboundRequest:
        """
        The relay's request as bytes for the backend: the protocol's strings
        encoded as the Go client sends them (UTF-8; the method as ASCII).

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
                ) from e
            headers = [(n, v) for n, v in headers if n.lower() != "authorization"]
            headers.append(("Authorization", "Bearer " + token))
        host = self.address
        if self.preserve_host and request.HasField("host") and request.host:
            host = request.host
        return OutboundRequest(
            method=(request.method or "GET").encode("ascii", "replace"),
            scheme=self.scheme,
            address=self.address,
            target=target.encode("utf-8"),
            host=host.encode("utf-8"),
            headers=[(n.encode("latin-1", "replace"), v.encode("utf-8")) for n, v in headers],
            body=request.body,
        )


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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # ResponseDone: the body was complete. PotentialDataLoss: it had no
        # length and no chunking, so the connection's close is its end, as
        # HTTP/1.1 says. Anything else (a Content-Length or chunked body
        # cut short, a reset) broke off, and must not look complete; the Go
        # client ends it as if it were. The handler warns, with the request
        # id, unless the close was ours (the user went away).
        # isinstance, not Failure.check: the same test here, without
        # building each type's qualified name on every answer.
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.sink.finish()
            return
        self.sink.fail(describe_failure(reason))


def response_headers(response, method: bytes) -> List[Header]:
    headers: List[Header] = []
    for name, values in response.headers.getAllRawHeaders():
        key = go_canonical(name.decode("latin-1"))
        for value in values:
            headers.append((key, value.decode("utf-8", "replace")))
    length = response.length
    if (
        length is not UNKNOWN_LENGTH
        and method.upper() != b"HEAD"
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

    async def open(self, request: OutboundRequest, body=None) -> BackendResponse:
        """
        Ask the backend; C{body}, when given, is an L{IBodyProducer} that
        streams the request's body (L{relay.client.upload.StreamedBody}),
        and the answer may then begin before the body has ended.
        """
        # The lean Headers (either engine writes them as twisted.web's
        # would), refusing what twisted.web's refuse: a name that is not a
        # token could smuggle a header.
        headers = LeanHeaders()
        headers.setRawHeaders(b"host", [request.host])
        for name, value in request.headers:
            if not valid_raw_name(name):
                raise InvalidHeaderName(name)
            headers.addRawHeader(name, value)
        if body is not None:
            producer = body
        else:
            producer = BytesProducer(request.body) if request.body else None
        try:
            response = await self.agent.request(
                request.method, request.raw_url, headers, producer, duplex=body is not None
            )
        except CancelledError:
            raise
        except Exception as e:
            if any(r.check(CancelledError) for r in getattr(e, "reasons", ())):
                raise CancelledError() from None
            raise BackendError(connect_error(request, Failure(e))) from e
        length = response.length if response.length is not UNKNOWN_LENGTH else None
        return BackendResponse(response.code, response_headers(response, request.method), response, length)
