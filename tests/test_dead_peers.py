"""
Dead peers: what happens to a request whose poll answer was
written on a connection that then died, decided from how it died
(L{relay.net.liveness.Death}); reconnects and dead connections counted
per backend.

The decision runs on a L{Clock} with deaths made up by the test (the
kernel's part, C{SIOCOUTQ} after a timeout, is checked on real sockets in
tests/test_dead_peers_netns.py); then once through the server's own HTTP/1.1
channel on a memory transport, with the socket watch replaced by one that
reports the test's death.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.config import ServerConfig
from relay.net.liveness import ABORTED, CLOSED, RESET, TIMEOUT, Death, keepalive_count
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import PICKUP_TIMEOUT, Broker, PollConnection
from relay.server.errors import BackendUnreachable, RelayClientLost
from relay.server.metrics import RelayMetrics
from relay.server.resources import RootResource
from relay.server.site import RelaySite
from tests.support.engines import on_each_engine
from tests.support.sinks import Sink


def cancel(poll):
    poll.addErrback(lambda _: None)
    poll.cancel()


@pytest.mark.memory
class Decision(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = RelayMetrics(process=False)
        self.broker = Broker(self.clock, ServerConfig(), self.metrics)

    def hand_out(self, multiplexed=False, body=b"upload"):
        """A poll on a connection of its own takes a new request; its answer is written."""
        connection = PollConnection(multiplexed=multiplexed)
        poll = self.broker.get_request("robot", connection)
        sink = Sink()
        pending = self.broker.relay("robot", HttpRequest(method="POST", url="http://invalid/x", body=body), sink)
        message = self.successResultOf(poll)
        self.broker.sent(message, connection)
        return connection, pending, sink

    def test_unacknowledged_answer_goes_back_to_the_front_with_its_id(self):
        connection, pending, sink = self.hand_out()
        later = self.broker.relay("robot", HttpRequest(method="GET", url="http://invalid/y"), Sink())
        self.broker.connection_ended(Death(TIMEOUT, unsent=120), connection)
        self.assertEqual(sink.failures, [])
        # The next poll (another connection) gets it first, body and all.
        again = self.successResultOf(self.broker.get_request("robot", PollConnection()))
        self.assertEqual((again.id, again.body), (pending.id, b"upload"))
        self.assertEqual(self.successResultOf(self.broker.get_request("robot")).id, later.id)
        backend = self.broker.backends["robot"]
        self.assertEqual((backend.requeued, backend.lost, backend.dead_connections), (1, 0, 1))

    def test_a_requeued_request_has_a_fresh_pickup_timer(self):
        connection, pending, sink = self.hand_out()
        self.clock.advance(PICKUP_TIMEOUT - 1)
        self.broker.connection_ended(Death(RESET, unsent=1), connection)
        self.clock.advance(PICKUP_TIMEOUT - 1)
        self.assertEqual(sink.failures, [])
        self.clock.advance(1)
        self.assertEqual([type(f) for f in sink.failures], [BackendUnreachable])

    def test_a_requeued_request_waits_no_longer_than_its_inactivity_timeout(self):
        # The server promised an answer within --inactive_request_timeout
        # of the request's last sign of life, its hand-over.
        self.broker = Broker(self.clock, ServerConfig(inactive_request_timeout=20.0), self.metrics)
        connection, pending, sink = self.hand_out()
        self.clock.advance(15)
        self.broker.connection_ended(Death(TIMEOUT, unsent=1), connection)
        self.clock.advance(5 - 0.001)
        self.assertEqual(sink.failures, [])
        self.clock.advance(0.001)
        self.assertEqual([type(f) for f in sink.failures], [BackendUnreachable])

    def test_a_waiting_poll_takes_the_requeued_request_at_once(self):
        waiting = self.broker.get_request("robot", PollConnection())
        connection, pending, sink = self.hand_out()
        # hand_out's poll was the newest, so it took the request; the
        # first one still waits, and gets it now.
        self.assertNoResult(waiting)
        self.broker.connection_ended(Death(TIMEOUT, unsent=5), connection)
        self.assertEqual(self.successResultOf(waiting).id, pending.id)

    def test_all_acknowledged_the_relay_client_has_it(self):
        connection, pending, sink = self.hand_out()
        self.broker.connection_ended(Death(TIMEOUT, unsent=0), connection)
        self.assertEqual(sink.failures, [])
        self.assertIs(self.broker.requests[pending.id], pending)
        self.assertEqual(list(self.broker.backends["robot"].queue), [])
        # It answers over another connection as usual.
        self.broker.send_response(HttpResponse(id=pending.id, status_code=200, eof=True))
        self.assertEqual(len(sink.messages), 1)

    def test_unknown_bytes_after_an_error_is_a_502_at_once(self):
        connection, pending, sink = self.hand_out()
        self.broker.connection_ended(Death(RESET, unsent=None), connection)
        self.assertEqual([type(f) for f in sink.failures], [RelayClientLost])
        self.assertEqual(sink.failures[0].status, 502)
        self.assertIn('relay client of "robot"', str(sink.failures[0]))
        self.assertNotIn(pending.id, self.broker.requests)
        self.assertEqual(self.broker.backends["robot"].lost, 1)

    def test_http2_cannot_tell_whose_bytes_are_unacknowledged(self):
        connection, pending, sink = self.hand_out(multiplexed=True)
        self.broker.connection_ended(Death(TIMEOUT, unsent=300), connection)
        self.assertEqual([type(f) for f in sink.failures], [RelayClientLost])

    def test_our_own_abort_is_judged_by_the_bytes_too(self):
        connection, pending, sink = self.hand_out()
        self.broker.connection_ended(Death(ABORTED, unsent=40), connection)
        self.assertEqual(sink.failures, [])
        self.assertEqual(self.broker.backends["robot"].requeued, 1)
        self.assertEqual(self.broker.backends["robot"].dead_connections, 0)

    def test_an_orderly_close_with_the_bytes_unknown_counts_as_arrived(self):
        connection, pending, sink = self.hand_out()
        self.broker.connection_ended(Death(CLOSED, unsent=None), connection)
        self.assertEqual(sink.failures, [])
        self.assertIn(pending.id, self.broker.requests)

    def test_a_next_request_on_the_connection_proves_delivery(self):
        connection, pending, sink = self.hand_out()
        connection.delivered()
        self.broker.connection_ended(Death(TIMEOUT, unsent=99), connection)
        self.assertEqual(sink.failures, [])
        self.assertEqual(list(self.broker.backends["robot"].queue), [])

    def test_a_response_message_proves_delivery(self):
        connection, pending, sink = self.hand_out()
        self.broker.send_response(HttpResponse(id=pending.id, status_code=200))
        self.broker.connection_ended(Death(TIMEOUT, unsent=99), connection)
        self.assertEqual(list(self.broker.backends["robot"].queue), [])
        self.assertEqual(self.broker.backends["robot"].requeued, 0)

    def test_a_stream_read_proves_delivery(self):
        connection, pending, sink = self.hand_out()
        self.broker.get_request_stream(pending.id)
        self.broker.connection_ended(Death(TIMEOUT, unsent=99), connection)
        self.assertEqual(self.broker.backends["robot"].requeued, 0)

    def test_the_first_relay_client_speaking_late_takes_it_back_out_of_the_queue(self):
        connection, pending, sink = self.hand_out()
        self.broker.connection_ended(Death(TIMEOUT, unsent=10), connection)
        self.broker.send_response(HttpResponse(id=pending.id, status_code=200, eof=True))
        self.assertEqual(len(sink.messages), 1)
        poll = self.broker.get_request("robot")
        self.assertNoResult(poll)
        cancel(poll)
        self.clock.advance(PICKUP_TIMEOUT)
        self.assertEqual(sink.failures, [])

    def test_the_message_is_let_go_once_delivered(self):
        connection, pending, _ = self.hand_out()
        self.assertIsNotNone(pending.unreceived)
        self.broker.send_response(HttpResponse(id=pending.id, status_code=200))
        self.assertIsNone(pending.unreceived)
        self.assertFalse(connection.in_transit)

    def test_while_stopping_the_user_hears_so(self):
        connection, pending, sink = self.hand_out()
        self.broker.stop()
        self.broker.connection_ended(Death(TIMEOUT, unsent=10), connection)
        self.assertEqual([str(f) for f in sink.failures], ["Server is restarting"])

    def test_reconnects_and_dead_connections_per_backend(self):
        first, second = PollConnection(), PollConnection()
        for connection in (first, first, second, first):
            cancel(self.broker.get_request("robot", connection))
        backend = self.broker.backends["robot"]
        self.assertEqual(backend.reconnects, 1)
        self.broker.connection_ended(Death(CLOSED, unsent=0), second)
        self.broker.connection_ended(Death(TIMEOUT, unsent=0), first)
        self.assertEqual(backend.dead_connections, 1)
        text = self.metrics.render().decode()
        self.assertIn('relay_dead_connections_total{reason="timeout"} 1\n', text)
        self.metrics.watch(self.broker)
        text = self.metrics.render().decode()
        self.assertIn('relay_backend_reconnects_total{backend="robot"} 1\n', text)
        self.assertIn('relay_backend_dead_connections_total{backend="robot"} 1\n', text)
        self.assertIn('relay_backend_last_poll_timestamp_seconds{backend="robot"} 0\n', text)

    def test_the_admin_view_shows_each_backends_connection_health(self):
        from relay.server.admin.stats import AdminStats
        from relay.server.admin.status import Query, snapshot

        stats = AdminStats(self.clock)
        self.broker.add_observer(stats)
        connection, pending, sink = self.hand_out()
        self.broker.poll_from("robot", IPv4Address("TCP", "10.0.0.7", 5555))
        self.broker.connection_ended(Death(TIMEOUT, unsent=10), connection)
        cancel(self.broker.get_request("robot", PollConnection()))
        view = snapshot(self.broker, stats, {}, Query())
        [item] = view["backends"]["items"]
        self.assertEqual(item["connections"], {"reconnects": 1, "dead": 1, "requeued": 1, "failed": 0})
        self.assertEqual(view["server"]["dead_connections"], {"timeout": 1, "reset": 0})

    def test_keepalive_count_sees_idle_death_after_about_the_timeout(self):
        self.assertEqual(keepalive_count(5, 15), 2)  # 5 s idle, then 2 probes 5 s apart
        self.assertEqual(keepalive_count(5, 3), 1)


class FakeWatch:
    def __init__(self):
        self.death = None


@pytest.mark.memory
class ThroughTheChannel(unittest.TestCase):
    """The server's HTTP/1.1 channel tells the broker how its connection died."""

    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock, ServerConfig())
        self.site = RelaySite(
            RootResource(self.broker, lambda: b""), ServerConfig(header_timeout=None), reactor=self.clock
        )
        self.site.broker = self.broker
        self.watches = []

        def watch(transport, interval, timeout):
            self.assertEqual((interval, timeout), (5.0, 15.0))
            self.watches.append(FakeWatch())
            return self.watches[-1]

        self.site.watch = watch

    def connect(self):
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_a_poll_answer_that_never_arrived_goes_to_the_next_poll(self):
        old, old_wire = self.connect()
        old.dataReceived(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
        user, user_wire = self.connect()
        user.dataReceived(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertIn(b"200 OK", old_wire.value())
        [request_id] = self.broker.requests
        # The kernel gave up on the old connection with the answer unacknowledged.
        self.watches[0].death = Death(TIMEOUT, unsent=len(old_wire.value()))
        old.connectionLost(Failure(ConnectionLost()))
        new, new_wire = self.connect()
        new.dataReceived(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertIn(request_id.encode(), new_wire.value())
        self.assertEqual(user_wire.value(), b"")
        backend = self.broker.backends["robot"]
        self.assertEqual((backend.requeued, backend.dead_connections, backend.reconnects), (1, 1, 1))

    def test_the_next_poll_on_the_same_connection_proves_the_answer_arrived(self):
        poll, poll_wire = self.connect()
        poll.dataReceived(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
        user, user_wire = self.connect()
        user.dataReceived(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        poll.dataReceived(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.watches[0].death = Death(TIMEOUT, unsent=10)
        poll.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.broker.backends["robot"].requeued, 0)
        self.assertEqual(user_wire.value(), b"")

    def test_without_the_bytes_the_user_gets_a_502_at_once(self):
        poll, _ = self.connect()
        poll.dataReceived(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
        user, user_wire = self.connect()
        user.dataReceived(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.watches[0].death = Death(RESET, unsent=None)
        poll.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(user_wire.value().startswith(b"HTTP/1.1 502 "), user_wire.value())
        self.assertIn(b"before it took the request", user_wire.value())


@pytest.mark.socket
class SocketOptions(unittest.TestCase):
    """Every accepted connection's own socket gets the options (Linux)."""

    def setUp(self):
        import socket
        import sys

        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("TCP_KEEPIDLE and TCP_USER_TIMEOUT are Linux's")
        self.socket = socket

    def options_of(self, **config):
        from twisted.internet import defer, protocol, reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from relay.net.liveness import socket_transport
        from tests.support import RelayServer

        server = RelayServer(**config)
        self.addCleanup(server.stop)
        answered = defer.Deferred()

        class User(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")

            def dataReceived(self, data):
                if not answered.called:
                    answered.callback(self)

        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), User())
        d.addCallback(lambda user: answered)

        def read(user):
            self.addCleanup(user.transport.loseConnection)
            [channel] = server.service.site.connections
            sock = socket_transport(channel.transport).socket
            s = self.socket
            return (
                sock.getsockopt(s.SOL_SOCKET, s.SO_KEEPALIVE),
                sock.getsockopt(s.IPPROTO_TCP, s.TCP_KEEPIDLE),
                sock.getsockopt(s.IPPROTO_TCP, s.TCP_KEEPINTVL),
                sock.getsockopt(s.IPPROTO_TCP, s.TCP_KEEPCNT),
                sock.getsockopt(s.IPPROTO_TCP, s.TCP_USER_TIMEOUT),
            )

        return d.addCallback(read)

    def test_the_defaults(self):
        d = self.options_of()
        d.addCallback(self.assertEqual, (1, 5, 5, 2, 15000))
        return d

    def test_zero_turns_both_off(self):
        d = self.options_of(tcp_keepalive_interval=0.0, dead_connection_timeout=0.0)
        d.addCallback(lambda options: self.assertEqual((options[0], options[4]), (0, 0)))
        return d


@pytest.mark.memory
class UnderTLS(unittest.SynchronousTestCase):
    def test_the_socket_transport_is_found_under_a_wrapper(self):
        from twisted.internet.abstract import FileDescriptor

        from relay.net.liveness import socket_transport

        class Wrapper:
            def __init__(self, transport):
                self.transport = transport

        own = FileDescriptor()
        own.socket = object()
        self.assertIs(socket_transport(Wrapper(Wrapper(own))), own)
        self.assertIsNone(socket_transport(StringTransport()))


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
