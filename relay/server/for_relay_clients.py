"""
The API relay-clients call: C{/server/request} (the long poll),
C{/server/response} (answers, whole or in chunks) and
C{/server/requeststream} (reads of a streamed request body), as thin
adapters between twisted.web and the L{Broker}.

Named for who calls it: the Go code (and L{relay.client.relay_api}, the
relay-client's view of these calls) say "server" for this side and
"client" for the user's, which reads backwards from inside the server.
L{relay.server.for_users} is the other side.

Rules that keep one relay-client from acting for another
(docs/security.md):

  - A backend name is at most L{MAX_NAME_BYTES} bytes (UTF-8): a longer
    poll gets 400, so the backend table, bounded by C{--max_backends},
    is bounded in bytes too.
  - With C{--client_tokens}, the name a response or a request-stream pull
    acts for is the pending request's own backend, never a prefix of its
    id: names may contain C{:}.

With several replicas (C{--peers}, docs/scaling.md) a L{Routing} is passed
in: once a call's name or id is known and its caller checked, a call for
another replica is forwarded there.
"""

from typing import List, Optional, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relay import wire
from relay.headers import RELAY_BODY, RELAY_BODY_STREAM
from relay.logs import Throttle, peer_text
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.auth import AccessPolicy
from relay.server.broker import Broker, Overloaded, UnknownRequest
from relay.server.response import answer_whole, http_error, on_disconnect, overloaded, proto_text
from relay.server.routing import Routing
from relay.server.site import poll_connection

_RELAY_BODY = RELAY_BODY.encode("ascii")
_STREAM = RELAY_BODY_STREAM.encode("ascii")
log = Logger()

REQUEST_CONTENT_TYPE = (
    b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpRequest"
)
# Kubernetes names (which robot names are) have at most 253 characters.
MAX_NAME_BYTES = 256
# The paths this resource answers (relay.server.resources routes them here).
PATHS = (b"/server/request", b"/server/response", b"/server/requeststream")


def _restarting(request) -> bytes:
    """
    A poll while the server drains: 503, which Go's relay-client (and ours)
    answers by backing off, where a 408 would make
    it poll again at once. Not logged: a drain must stay quiet.
    """
    request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
    return http_error(request, 503, "Server is restarting")


def _arg(request, name: bytes) -> str:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else ""


class ServerResource(Resource):
    """
    The relay-client's endpoints: poll, post responses, pull streams. A
    leaf over the broker, the access policy and, with several replicas,
    the routing: where calls for other replicas' names go.
    """

    isLeaf = True

    def __init__(self, broker: Broker, policy: Optional[AccessPolicy] = None, routing: Optional[Routing] = None):
        super().__init__()
        self.broker = broker
        self.policy = policy if policy is not None else AccessPolicy()
        self.routing = routing
        self._refusals = Throttle(broker.clock)
        self._routes = dict(zip(PATHS, (self.poll, self.response, self.request_stream)))

    def render(self, request):
        return self._routes[request.path](request)

    def poll(self, request):
        server = _arg(request, b"server")
        if not server:
            return http_error(request, 400, "Missing server query parameter")
        if len(server.encode("utf-8")) > MAX_NAME_BYTES:
            return http_error(request, 400, "Backend name longer than %d bytes" % (MAX_NAME_BYTES,))
        if not self.policy.relay_client_allowed(request, server):
            return self._forbidden(request, server)
        peer = self.routing.owner(request, server, self.broker.stopping) if self.routing is not None else None
        if peer is not None:
            return self.routing.forward(request, peer)
        if self.broker.stopping:
            return _restarting(request)
        fetches = request.requestHeaders.getRawHeaders(_RELAY_BODY) == [_STREAM]
        try:
            d = self.broker.get_request(server, poll_connection(request), streams_bodies=fetches)
        except Overloaded as e:
            return overloaded(request, e)
        self.broker.poll_from(server, request.getClientAddress())
        return _answer_when(request, d, self._polled)

    def _forbidden(self, request, name: str) -> bytes:
        # Anyone can be refused as often as they like: one line per 10 s.
        if self._refusals.allow():
            log.warn(
                "Relay client refused",
                ServerName=name,
                Peer=peer_text(request.getClientAddress()),
                Suppressed=self._refusals.take_suppressed(),
            )
        return http_error(request, 403, "Forbidden: this relay-client may not act for %s" % (name,))

    def _polled(self, request, message: Optional[HttpRequest]) -> Union[bytes, List[bytes]]:
        if message is None:
            if self.broker.stopping:
                return _restarting(request)
            text = "No request received within timeout"
            if self.broker.trace:
                log.debug("Relay client got no request", ID=_arg(request, b"server"), error=text)
            return http_error(request, 408, text)
        request.responseHeaders.setRawHeaders(b"content-type", [REQUEST_CONTENT_TYPE])
        if self.broker.body_follows(message.id):
            request.responseHeaders.setRawHeaders(_RELAY_BODY, [_STREAM])
        connection = poll_connection(request)
        if connection is not None:
            # Before the answer is written: on HTTP/1.1 a pipelined next
            # request could be read (and prove delivery) while it is.
            self.broker.sent(message, connection)
        if self.broker.trace:
            log.debug("Relay client accepted request", ID=message.id)
        return wire.serialize(message, "body")

    def response(self, request):
        message = HttpResponse()
        try:
            body = wire.parse_pieces(message, request.content.pieces(), "body")
        except Exception:
            return http_error(request, 400, "proto: cannot parse invalid wire-format data")
        if not message.HasField("id"):
            return http_error(request, 400, "HttpResponse without id")
        if not isinstance(message.id, str):
            # proto2 hands invalid UTF-8 back as bytes: no id of ours.
            return http_error(request, 400, "Duplicate or invalid request ID %s" % (proto_text(message.id),))
        name = self._acting_for(message.id)
        if not self.policy.relay_client_allowed(request, name):
            return self._forbidden(request, name)
        peer = self.routing.issuer(request, message.id) if self.routing is not None else None
        if peer is not None:
            return self.routing.forward(request, peer)
        try:
            d = self.broker.send_response(message, body)
        except UnknownRequest as e:
            return http_error(request, 400, str(e))
        return _answer_when(request, d, self._answered, self._refused)

    def _acting_for(self, request_id: str) -> str:
        """
        The backend a post or pull for C{request_id} acts for: the pending
        request's own (names may contain C{:}, so the id's prefix is not
        it); for an id that is not pending, the id's prefix up to its last
        C{:} (nothing is acted on, the token check only picks 403 or 400).
        """
        pending = self.broker.requests.get(request_id)
        if pending is not None:
            return pending.backend
        return request_id.rpartition(":")[0]

    def _answered(self, request, _) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        if self.broker.trace:
            log.debug("Relay client sent response", ID=_arg(request, b"id"))
        return b"ok"

    def _refused(self, request, failure: Failure) -> bytes:
        if failure.check(UnknownRequest):
            return http_error(request, 400, str(failure.value))
        return http_error(request, 500, "Internal error relaying the response")

    def request_stream(self, request):
        request_id = _arg(request, b"id")
        if not request_id:
            return http_error(request, 400, "Missing id query parameter")
        name = self._acting_for(request_id)
        if not self.policy.relay_client_allowed(request, name):
            return self._forbidden(request, name)
        peer = self.routing.issuer(request, request_id) if self.routing is not None else None
        if peer is not None:
            return self.routing.forward(request, peer)
        if request.requestHeaders.getRawHeaders(_RELAY_BODY) == [_STREAM]:
            return self._fetch_body(request, request_id)
        try:
            d = self.broker.get_request_stream(request_id)
        except UnknownRequest:
            return self._streamed(request, None, request_id)
        return _answer_when(request, d, lambda r, data: self._streamed(r, data, request_id))

    def _fetch_body(self, request, request_id: str):
        """
        Our relay-client fetches a streamed body: the answer is the body,
        as the user sends it (L{relay.server.upload.StreamedBody}); 410
        when there is none to fetch (the request is over, or it was
        fetched already).
        """
        if self.broker.fetch_body(request_id, request):
            if self.broker.trace:
                log.debug("Relay client fetches the request body", ID=request_id)
            return NOT_DONE_YET
        return http_error(request, 410, "No request body to fetch with id " + request_id)

    def _streamed(self, request, data: Optional[bytes], request_id: str) -> bytes:
        if data is None:
            # 410 Gone tells the relay-client that the request has completed.
            return http_error(request, 410, "No ongoing request with id " + request_id)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/octet-data"])
        if self.broker.trace:
            log.debug("Relay client pulled streamed request chunk", ID=request_id, Bytes=len(data))
        return data


def _answer_when(request, d, on_result, on_failure=None):
    """
    Answer C{request} with the body C{on_result} makes of C{d}'s result (at
    once if it has one). A peer that goes away cancels C{d}, so that nothing
    is handed to a dead connection.
    """
    if d.called and not isinstance(d.result, (Failure, Deferred)):
        # Answered already (a posted chunk the user took at once): nothing
        # to wait for, so no callbacks to chain and none to cancel.
        answer_whole(request, on_result(request, d.result))
        return NOT_DONE_YET
    on_disconnect(request, d.cancel)

    def answer(outcome):
        if isinstance(outcome, Failure):
            if outcome.check(CancelledError) or on_failure is None:
                return outcome if not outcome.check(CancelledError) else None
            body = on_failure(request, outcome)
        else:
            body = on_result(request, outcome)
        answer_whole(request, body)
        return None

    d.addBoth(answer)
    d.addErrback(lambda f: log.failure("Unexpected error answering a relay client", f))
    return NOT_DONE_YET
