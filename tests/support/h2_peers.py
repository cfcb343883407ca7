"""
HTTP/2 test peers: a user-client that speaks h2 frames directly, and a backend
our relay-client reaches over HTTP/2.
"""

import h2.config
import h2.connection
import h2.events
from twisted.internet import defer, protocol
from twisted.web import server

from relay.config import ServerConfig
from relay.server.site import RelaySite
from tests.support import e2e
from tests.support.e2e import BackendResource


class H2Client(protocol.Protocol):
    """A minimal HTTP/2 client (prior knowledge) for one request at a time."""

    def __init__(self):
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.responses = {}
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def request(self, method, path, headers=(), body=b""):
        stream_id = self.conn.get_next_available_stream_id()
        all_headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "relay")]
        all_headers += list(headers)
        self.conn.send_headers(stream_id, all_headers, end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.transport.write(self.conn.data_to_send())
        state = self.responses[stream_id] = {
            "headers": None,
            "data": b"",
            "trailers": None,
            "done": defer.Deferred(),
            "got_data": None,
        }
        return stream_id, state

    def dataReceived(self, data):
        for event in self.conn.receive_data(data):
            state = self.responses.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.ResponseReceived):
                state["headers"] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                state["data"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if state["got_data"] is not None:
                    d, state["got_data"] = state["got_data"], None
                    d.callback(None)
            elif isinstance(event, h2.events.TrailersReceived):
                state["trailers"] = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                state["done"].callback(state)
            elif isinstance(event, h2.events.StreamReset):
                state["done"].errback(AssertionError("stream reset: %r" % (event.error_code,)))
        self.transport.write(self.conn.data_to_send())

    def connectionLost(self, reason):
        for state in self.responses.values():
            if not state["done"].called:
                state["done"].errback(reason)
        self.lost.callback(None)


class H2BackendResource(BackendResource):
    """The e2e backend's pages, plus one that ends with trailers."""

    def render(self, request):
        if request.path == b"/trailers":
            self.backend.requests.append(request)
            request.setHeader(b"content-type", b"application/grpc")
            request.write(b"\x00\x00\x00\x00\x02hi")
            request.add_trailer("Grpc-Status", "0")
            request.add_trailer("X-Checksum", "abc123")
            request.finish()
            return server.NOT_DONE_YET
        return super().render(request)


class H2Backend(e2e.Backend):
    """
    The e2e backend over HTTP/2: RelaySite speaks h2c with prior knowledge
    (and HTTP/2 by ALPN over TLS) and sends trailers.
    """

    def __init__(self, tls=None):
        self.connections_made = 0
        super().__init__(tls)

    def factory(self):
        self.site = RelaySite(H2BackendResource(self), ServerConfig(header_timeout=None))
        build = self.site.buildProtocol

        def counting(addr):
            self.connections_made += 1
            return build(addr)

        self.site.buildProtocol = counting
        return self.site
