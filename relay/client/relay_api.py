"""
The relay server's three endpoints, as the relay client calls them.

Every call has a deadline, so that a relay server that vanished without
closing its connections cannot stall us: a long poll or a request-stream
read, which the server answers within its fixed 30 s, gets 10 s more; a
posted response gets the Go client's 60 s. The kernel usually notices a
dead connection sooner (L{relay.net.liveness}); the
deadline is for the rest, such as a proxy on the way that keeps the
connection alive but lost the call. Only
C{POST /server/response} is retried (a lost chunk would corrupt what the user
receives, and the chunk is still in hand); polls are retried by the poll
loop, request-stream reads are not retried at all because the relay server
has no way to tell a repeated read from a new one.
"""

from typing import List, Optional, Set, Union
from urllib.parse import quote, urlencode

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from relay import wire
from relay.client.http import BytesProducer, backoff_delays, is_connection_refused, read_all, read_token
from relay.headers import RELAY_BODY, RELAY_BODY_STREAM
from relay.lean_headers import LeanHeaders
from relay.outbound.connect import describe_failure
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse

log = Logger()

REMOTE_REQUEST_TIMEOUT = 60.0
# The server answers a poll or a stream read within this long (Go's fixed
# value); a call still unanswered well after it is dead.
SERVER_POLL_TIMEOUT = 30.0
POLL_DEADLINE = SERVER_POLL_TIMEOUT + 10.0
_RELAY_BODY = RELAY_BODY.encode("ascii")
_STREAM = RELAY_BODY_STREAM.encode("ascii")
RESPONSE_CONTENT_TYPE = (
    b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpResponse"
)
# cenkalti/backoff as the Go client configures it: 1 s doubling to 10 s, no
# jitter, 10 retries after the first try.
POST_INITIAL_BACKOFF = 1.0
POST_BACKOFF_MULTIPLIER = 2.0
POST_MAX_BACKOFF = 10.0
POST_MAX_RETRIES = 10

_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    410: "Gone",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def status_text(code: int) -> str:
    """Go's C{http.StatusText}, for messages that read like the Go client's."""
    return _STATUS_TEXT.get(code, str(code))


def _code_body_and_headers(response):
    """
    The answer's status, whole body and headers: at once when all of the
    body came with the head (the lean engine's C{whole_body}; a relay's
    answers are small), else once it has been read.
    """
    whole = getattr(response, "whole_body", None)
    body = whole() if whole is not None else None
    if body is not None:
        return response.code, body, response.headers
    return read_all(response).addCallback(lambda data: (response.code, data, response.headers))


class RelayError(Exception):
    """A relay call failed; C{retryable} says whether trying again may help."""

    retryable = True

    def __init__(self, message: str, status: Optional[int] = None, connection_refused: bool = False):
        super().__init__(message)
        self.status = status
        self.connection_refused = connection_refused


class PermanentRelayError(RelayError):
    """The relay server refused for good (400): the request is over."""

    retryable = False


class Forbidden(RelayError):
    """403 on a poll: our credentials are not (or no longer) accepted."""

    retryable = False


class RelayAPI:
    """
    @param base_url: C{scheme://address} plus the relay prefix, no trailing
        slash.
    @param token_file: when set, its contents are sent as a Bearer token on
        every call, read anew each time so that a rotated token is picked up.
    """

    def __init__(
        self,
        agent,
        clock: IReactorTime,
        base_url: str,
        server_name: str,
        token_file: str = "",
        timeout: float = REMOTE_REQUEST_TIMEOUT,
        poll_timeout: float = POLL_DEADLINE,
    ):
        self.agent = agent
        self.clock = clock
        self.base_url = base_url.rstrip("/")
        self.server_name = server_name
        self.token_file = token_file
        self.timeout = timeout
        self.poll_timeout = poll_timeout
        # Built once: they are asked for on every request.
        self._poll_url = (
            self.base_url + "/server/request?" + urlencode({"server": self.server_name})
        ).encode("utf-8")
        self._response_url = (self.base_url + "/server/response?id=").encode("utf-8")
        # Ids of polled requests whose body follows (the poll's answer said
        # so), until the handler takes the mark (L{body_follows}).
        self._bodies_follow: Set[str] = set()

    # URLs.

    def poll_url(self) -> bytes:
        return self._poll_url

    def response_url(self, request_id: str) -> bytes:
        """
        Where a message for C{request_id} goes. The id in the query is not
        Go's (servers read it from the body, and ignore the query): it lets
        an ingress in front of several replicas route the post by name, as
        it routes polls and request streams (docs/scaling.md), instead of
        leaving it to the replicas to pass on.
        """
        return self._response_url + quote(request_id, safe=":").encode("utf-8")

    def stream_url(self, request_id: str) -> bytes:
        return (
            self.base_url + "/server/requeststream?id=" + quote(request_id, safe=":")
        ).encode("utf-8")

    # Calls.

    async def _call(
        self,
        method: bytes,
        url: bytes,
        body: Union[bytes, List[bytes], None] = None,
        content_type: Optional[bytes] = None,
        timeout: Optional[float] = None,
        streamed_body: bool = False,
    ):
        # Names of our own, valid as they are: the lean Headers (either
        # engine writes them as twisted.web's would).
        headers = LeanHeaders()
        if streamed_body:
            headers.setRawHeaders(_RELAY_BODY, [_STREAM])
        if self.token_file:
            headers.setRawHeaders(b"authorization", [b"Bearer " + read_token(self.token_file).encode("utf-8")])
        if content_type is not None:
            headers.setRawHeaders(b"content-type", [content_type])
        producer = BytesProducer(body) if body is not None else None
        d = self.agent.request(method, url, headers, producer)
        d.addCallback(_code_body_and_headers)
        d.addTimeout(self.timeout if timeout is None else timeout, self.clock)
        try:
            return await d
        except (ResponseFailed, ResponseNeverReceived) as e:
            if any(r.check(CancelledError) for r in e.reasons):
                # Agent wraps our own cancellation; it is still ours.
                raise CancelledError() from None
            raise

    async def poll(self) -> Optional[HttpRequest]:
        """
        One long poll: the next request, or None when the relay server had
        none within its poll timeout (408).

        @raise Forbidden: on 403.
        @raise RelayError: anything else; C{retryable} is False only for
            answers that trying again cannot change.
        """
        try:
            code, body, headers = await self._call(
                b"GET", self.poll_url(), timeout=self.poll_timeout, streamed_body=True
            )
        except CancelledError:
            raise
        except Exception as e:
            failure = Failure(e)
            raise RelayError(describe_failure(failure), connection_refused=is_connection_refused(failure)) from e
        if code == 408:
            if body.startswith(b"Server is restarting"):
                # A relay server from before 503s for draining: polling again
                # at once would loop until its port closes.
                raise RelayError("server status %s: Server is restarting" % (status_text(code),), code)
            return None
        if code == 403:
            raise Forbidden(status_text(code), code)
        if code != 200:
            text = body.decode("utf-8", "replace").strip()
            raise RelayError("server status %s: %s" % (status_text(code), text), code)
        request = HttpRequest()
        try:
            wire.parse(request, body, "body")
        except Exception as e:
            raise RelayError("failed to unmarshal request: %s. request was: %r" % (e, body[:200])) from e
        if not request.id:
            raise RelayError("request without id from relay server")
        if headers.getRawHeaders(_RELAY_BODY) == [_STREAM]:
            self._bodies_follow.add(request.id)
        return request

    def body_follows(self, request_id: str) -> bool:
        """
        Whether the body of C{request_id}, a polled request, follows (to be
        fetched with L{open_body}) rather than riding in the request. Asked
        once per request: the mark is taken.
        """
        marks = self._bodies_follow
        if request_id not in marks:  # most requests: no exception raised
            return False
        marks.discard(request_id)
        return True

    async def open_body(self, request_id: str):
        """
        Start fetching the body of C{request_id}: the fetch's response (an
        L{IResponse}) once its head arrived, its body being the user's,
        with the user's C{Content-Length} or chunked. Only the head has a
        deadline: the body comes at the user's pace.

        @raise PermanentRelayError: the request is over (410, 400).
        @raise RelayError: anything else.
        """
        headers = LeanHeaders()
        if self.token_file:
            headers.setRawHeaders(b"authorization", [b"Bearer " + read_token(self.token_file).encode("utf-8")])
        headers.setRawHeaders(_RELAY_BODY, [_STREAM])
        d = self.agent.request(b"POST", self.stream_url(request_id), headers, BytesProducer(b""))
        d.addTimeout(self.poll_timeout, self.clock)
        try:
            response = await d
        except (ResponseFailed, ResponseNeverReceived) as e:
            if any(r.check(CancelledError) for r in e.reasons):
                raise CancelledError() from e
            raise RelayError("couldn't fetch the request body: %s" % (describe_failure(Failure(e)),)) from e
        except CancelledError:
            raise
        except Exception as e:
            raise RelayError("couldn't fetch the request body: %s" % (describe_failure(Failure(e)),)) from e
        if response.code != 200:
            text = (await read_all(response)).decode("utf-8", "replace").strip()
            message = "relay server request body responded %s: %s" % (status_text(response.code), text)
            if response.code in (400, 410):
                raise PermanentRelayError(message, response.code)
            raise RelayError(message, response.code)
        return response

    async def post_response_once(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> None:
        try:
            code, answer, _ = await self._call(
                b"POST", self.response_url(message.id), wire.serialize(message, "body", body), RESPONSE_CONTENT_TYPE
            )
        except CancelledError:
            raise
        except Exception as e:
            raise RelayError("couldn't post response to relay server: %s" % (describe_failure(Failure(e)),)) from e
        if code != 200:
            text = "relay server responded %s: %s" % (status_text(code), answer.decode("utf-8", "replace").strip())
            if code == 400:
                # The relay server restarted, or the user went away.
                raise PermanentRelayError(text, code)
            raise RelayError(text, code)

    def post_response(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> Deferred:
        """
        Post one message (its body as C{body}'s pieces, if given), retrying
        with back-off as the Go client does.
        Fails with the last error when a 400 makes it final or after the
        last retry.
        """
        return Deferred.fromCoroutine(self._post_with_retry(message, body))

    async def _post_with_retry(self, message: HttpResponse, body: Optional[List[bytes]]) -> None:
        next_delay = backoff_delays(POST_INITIAL_BACKOFF, POST_BACKOFF_MULTIPLIER, POST_MAX_BACKOFF)
        retries = 0
        while True:
            try:
                await self.post_response_once(message, body)
                return
            except PermanentRelayError:
                # The user went away or the relay forgot the request: the
                # caller says so, once (a user's cancel is no warning).
                raise
            except RelayError as e:
                if not e.retryable or retries >= POST_MAX_RETRIES:
                    raise
                # The caller logs the final failure; a retry that works is
                # routine on a robot's network, and each one of a request's
                # ten retries would be a line per request while it is down.
                log.debug("Failed to post response to relay, retrying", ID=message.id, error=str(e))
            retries += 1
            await task.deferLater(self.clock, next_delay(), lambda: None)

    async def request_stream(self, request_id: str) -> Optional[bytes]:
        """
        The next bytes the user sent on an upgraded connection (possibly
        none, after the relay server's 30 s wait), or None once the request
        is over (410).
        """
        try:
            code, body, _ = await self._call(
                b"POST", self.stream_url(request_id), b"", b"text/plain", timeout=self.poll_timeout
            )
        except CancelledError:
            raise
        except Exception as e:
            raise RelayError("couldn't get request stream: %s" % (describe_failure(Failure(e)),)) from e
        if code == 410:
            return None
        if code != 200:
            raise RelayError(
                "relay server request stream responded %s: %s"
                % (status_text(code), body.decode("utf-8", "replace").strip()),
                code,
            )
        return body
