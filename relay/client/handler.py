"""
The life of one relayed request: ask the backend, stream its answer up to
the relay, and for an upgraded connection also feed the user's bytes down.
A request whose body follows (our relay server's streamed bodies,
docs/protocol.md) has it fetched first, as one answer that feeds the
backend request while it goes (L{relay.client.upload}); the fetch ends
with the request, broken off if the backend did not take all of it.

Whatever goes wrong before the backend answered becomes a 500 with a plain
text reason for that request id, so that the user (often C{kubectl}) gets an
error instead of hanging until the relay server's timeout. Once the answer
has begun, a body that breaks off is reported with our C{Relay-Error}
trailer (L{relay.client.chunker.Chunker.fail}), so that the user's answer
cannot look complete. A message the relay will not take (400: the user
left, or the relay restarted) ends the request and closes the backend
connection, which is how the backend learns that nobody is listening any
more.

What is logged is for an operator: a backend whose answer broke off is one
warning with the request id and the backend's reason; a user who closed a
tab, cancelled a download or dropped a WebSocket is one line at debug (or
none, when the end of the request stream already said so), since it
happens all day and nothing is wrong. The close of the backend connection
that follows is ours, and never blamed on the backend.
"""

from typing import TYPE_CHECKING, List, Optional, Tuple, Union
from typing import Protocol as _Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.client.backend import Backend, BackendTarget
from relay.client.chunker import Chunker, error_response
from relay.client.relay_api import PermanentRelayError, RelayAPI, RelayError
from relay.client.upgrade import Upgrader, wants_upgrade
from relay.client.upload import StreamedBody
from relay.outbound.connect import BackendError
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from relay.outbound.h2 import H2Backend

log = Logger()


class _Answer(_Protocol):
    """What the backends' and the upgrader's C{open} give: a head, then the body to deliver."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> List[Tuple[str, str]]: ...

    def deliver(self, sink: Chunker) -> None: ...


class RequestHandler:
    def __init__(
        self,
        clock: IReactorTime,
        api: RelayAPI,
        target: BackendTarget,
        backend: "Union[Backend, H2Backend]",
        upgrader: Upgrader,
        max_chunk_size: int,
    ):
        self.clock = clock
        self.api = api
        self.target = target
        self.backend = backend
        self.upgrader = upgrader
        self.max_chunk_size = max_chunk_size
        # Per-request debug lines cost even when filtered out: only build
        # them when debug logging is on.
        self.trace = False
        # relay.tracing.Tracing when tracing is on (chosen once, at start-up).
        self.tracer = None

    def handle(self, request: HttpRequest) -> Deferred:
        """Fires when the request is over (never fails)."""
        streamed = self.api.body_follows(request.id)
        if self.tracer is None:
            if streamed:
                return Deferred.fromCoroutine(self._handle_streamed(request, None))
            return Deferred.fromCoroutine(self._relay(request, None, self.clock.seconds(), None))
        spans = self.tracer.relayed(request, self.target.address)
        if streamed:
            handled = self._handle_streamed(request, spans)
        else:
            handled = self._relay(request, spans, self.clock.seconds(), None)
        return Deferred.fromCoroutine(handled).addBoth(spans.finished)

    async def _handle_streamed(self, request: HttpRequest, spans) -> None:
        """A request whose body follows: fetched first, fed to the backend request as it comes."""
        started = self.clock.seconds()
        request_id = request.id
        try:
            body = StreamedBody(await self.api.open_body(request_id))
        except CancelledError:
            return
        except PermanentRelayError as e:
            # Over already: the user went away, which happens all day.
            if self.trace:
                log.debug("Request over at the relay before its body was fetched", ID=request_id, reason=str(e))
            return
        except RelayError as e:
            # The server is unreachable: nobody waits for an answer we
            # could post (the server answers the user 502 or 504).
            log.warn("Failed to fetch the request body", ID=request_id, error=str(e))
            return
        try:
            return await self._relay(request, spans, started, body)
        finally:
            body.close()

    async def _relay(self, request: HttpRequest, spans, started: float, body: Optional[StreamedBody]) -> None:
        answer: _Answer
        request_id = request.id
        upgrade = wants_upgrade(request)
        try:
            backend_request = self.target.build(request, upgrade=upgrade)
            if self.trace:
                log.debug(
                    "Sending request to backend",
                    ID=request_id,
                    Method=backend_request.method.decode("latin-1"),
                    URL=backend_request.url,
                )
            if upgrade:
                answer = await self.upgrader.open(backend_request)
            elif body is not None:
                answer = await self.backend.open(backend_request, body)
            else:
                answer = await self.backend.open(backend_request)
        except BackendError as e:
            message = str(e)
            if not message.startswith("Failed to create request"):
                message = "Backend request failed with error: " + message
            log.warn("Backend request failed", ID=request_id, error=message)
            if spans is not None:
                spans.failed(message)
            await self._post_error(request_id, message)
            return
        except CancelledError:
            return

        if spans is not None:
            spans.answered(answer.status)
        first = HttpResponse(id=request_id, status_code=answer.status)
        for name, value in answer.headers:
            first.header.add(name=name, value=value)
        switching = answer.status == 101
        if spans is not None:
            spans.chunking()
        chunker = Chunker(
            first,
            self.api.post_response,
            self.clock,
            max_chunk_size=self.max_chunk_size,
            started=started,
            send_first_now=switching,
            expected_length=getattr(answer, "length", None),
        )
        if spans is not None:
            spans.sending(chunker)
        answer.deliver(chunker)
        stream: Optional[Deferred] = None
        user_left = _UserLeft()
        if switching:
            stream = Deferred.fromCoroutine(self._stream_to_backend(request_id, answer, chunker, user_left))
        try:
            await chunker.done
        except CancelledError:
            chunker.abort()
            if stream is not None:
                stream.cancel()
            return
        except PermanentRelayError as e:
            # The user went away (or the relay forgot the request); the
            # chunker has closed the backend connection.
            if chunker.broken_off is not None:
                log.warn("Failed to read from backend", ID=request_id, error=chunker.broken_off)
            elif self.trace and not user_left.said:
                log.debug("Request over at the relay (the user went away)", ID=request_id, reason=str(e))
        except RelayError as e:
            log.warn("Closing backend connection", ID=request_id, error=str(e))
        except Exception:
            log.failure("Unexpected error relaying a response", ID=request_id)
            chunker.abort()
        else:
            if chunker.broken_off is not None:
                log.warn("Failed to read from backend", ID=request_id, error=chunker.broken_off)
            if self.trace:
                elapsed = self.clock.seconds() - started
                log.debug(
                    "Backend request duration",
                    ID=request_id,
                    Duration="%.3fs" % (elapsed,),
                    Path=request.url[len("http://invalid") :]
                    if request.url.startswith("http://invalid")
                    else request.url,
                    Status=answer.status,
                    Bytes=chunker.bytes_sent,
                )
        if stream is not None:
            stream.cancel()

    async def _stream_to_backend(self, request_id: str, answer, chunker: Chunker, user_left: "_UserLeft") -> None:
        """
        After a 101: the user's bytes, pulled from the relay, go to the
        backend until the relay says the request is over (410). Any failure
        closes the backend connection: the relay cannot resend what was lost.
        """
        try:
            if not await chunker.first_sent:
                return
            while True:
                data = await self.api.request_stream(request_id)
                if data is None:
                    log.debug("End of request stream", ID=request_id)
                    user_left.said = True
                    break
                if data:
                    answer.write(data)
        except CancelledError:
            pass
        except RelayError as e:
            log.warn("Failed to get request stream", ID=request_id, error=str(e))
        except Exception:
            log.failure("Unexpected error streaming to the backend", ID=request_id)
        answer.close()

    async def _post_error(self, request_id: str, message: str) -> None:
        try:
            await self.api.post_response(error_response(request_id, 500, message))
        except (CancelledError, PermanentRelayError):
            pass  # The backend's failure was the warning; the user has gone since.
        except RelayError as e:
            log.warn("Failed to post error response to relay", ID=request_id, error=str(e))


class _UserLeft:
    """Whether a line already said that an upgraded request's user is gone."""

    said = False
