"""
Several replicas acting as one relay (docs/scaling.md): which replica a
call goes to, calls that reach the wrong replica answered through the
owner, requests for a moving name waiting for its relay-client, and the
start-up checks of --peers and --peer_self.

The routing rule and the wait run in memory; the forwarding runs between
two or three real servers on 127.0.0.1 in this process.
"""

import os

import pytest
from twisted.internet import defer, reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from relay.config import ServerConfig
from relay.headers import FORWARDED_BY
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server import tap
from relay.server.auth import AccessPolicy, UserTokens, token_hash
from relay.server.broker import Broker
from relay.server.errors import Overloaded
from relay.server.ids import RequestIds, issuing_replica
from relay.server.peers import healthz_probe
from relay.server.ring import Ring
from relay.server.routing import Routing, find_self, replica_list
from tests.support import (
    FakeRelayClient,
    InMemoryRelay,
    RelayServer,
    dechunk,
    head_and_body,
    raw_user,
)
from tests.support.engines import on_each_engine
from tests.support.ports import reserve_ports
from tests.support.process import ROOT, run_all, scratch
from tests.support.ring import name_owned_by

PEERS = ["relay-0.relay:80", "relay-1.relay:80", "relay-2.relay:80"]


class FakeRequest:
    def __init__(self, headers=None):
        self.requestHeaders = Headers(headers or {})


def headers_of(message):
    return {h.name: h.value for h in message.header}


@pytest.mark.memory
class PeerListTests(unittest.SynchronousTestCase):
    def test_the_list_keeps_its_order(self):
        self.assertEqual(replica_list(" b:1, a:2 ,c:3"), ["b:1", "a:2", "c:3"])

    def test_bad_lists(self):
        for text, why in [
            ("a:1,a:1", "listed twice"),
            ("a:1,b", "not host:port"),
            ("a:1,,b:1", "not host:port"),
            ("a:99999", "not host:port"),
            (",".join("h%d:80" % i for i in range(257)), "at most 256"),
        ]:
            with self.assertRaises(ValueError) as caught:
                replica_list(text)
            self.assertIn(why, str(caught.exception), text)

    def test_self_from_the_statefulset_hostname(self):
        self.assertEqual(find_self(PEERS, "", "relay-2"), "relay-2.relay:80")
        self.assertEqual(find_self(PEERS, "", "relay-1.relay.default.svc.cluster.local"), "relay-1.relay:80")
        self.assertEqual(find_self(["relay-1:80", "relay-10:80"], "", "relay-1"), "relay-1:80")

    def test_self_given_or_not_found(self):
        self.assertEqual(find_self(PEERS, "relay-0.relay:80", "anything"), "relay-0.relay:80")
        for given, hostname in [("relay-0:80", "x"), ("", "vm"), ("", "")]:
            with self.assertRaises(ValueError):
                find_self(PEERS, given, hostname)
        with self.assertRaises(ValueError) as caught:
            find_self(["127.0.0.1:8081", "127.0.0.1:8082"], "", "127")
        self.assertIn("set --peer_self", str(caught.exception))

    def test_flags(self):
        options = tap.Options()
        options.parseOptions(["--peers=a:1,b:2", "--peer_self=b:2", "--move_wait=3s"])
        self.assertEqual(
            (options.config.peers, options.config.peer_self, options.config.move_wait), ("a:1,b:2", "b:2", 3.0)
        )
        for argv, message in [
            (["--peers=a:1,a:1", "--peer_self=a:1"], "--peers=a:1,a:1: a:1 is listed twice"),
            (["--peers=a:1,b:2", "--peer_self=c:3"], "--peer_self=c:3: not one of --peers"),
            (["--peer_self=a:1"], "--peer_self=a:1 needs --peers"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                tap.Options().parseOptions(argv)
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))


@pytest.mark.process
class StartupErrorTests(unittest.TestCase):
    timeout = 120

    def test_one_line_and_exit_1(self):
        relay = ["--pidfile=", "-n", "relay", "--port=tcp:0:interface=127.0.0.1"]
        cases = [
            (relay + ["--peers=a:1,a:1", "--peer_self=a:1"], {}),
            (relay + ["--peers=nobody-here-0:80,nobody-here-1:80"], {}),
            (["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")], {"RELAY_PEERS": "a:1", "RELAY_PEER_SELF": "b:1"}),
        ]
        results = run_all(cases, scratch(self))
        patterns = [
            r"^twistd relay: --peers=a:1,a:1: a:1 is listed twice",
            r"^twistd relay: --peers=nobody-here-0:80,nobody-here-1:80: cannot tell which entry .*set --peer_self$",
            r"^relay\.tac: RELAY_PEER_SELF=b:1: not one of --peers",
        ]
        for (code, output), pattern in zip(results, patterns):
            self.assertEqual(code, 1, output)
            lines = [line for line in output.splitlines() if line and not line.startswith("{")]
            self.assertEqual(len(lines), 1, output)
            self.assertRegex(lines[0], pattern)


@pytest.mark.memory
class RoutingRuleTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.down = set()
        self.routing = Routing(PEERS, PEERS[1], lambda peer: peer not in self.down, None, None)

    def test_a_name_goes_to_its_ring_owner(self):
        mine = name_owned_by(PEERS, PEERS[1])
        theirs = name_owned_by(PEERS, PEERS[2])
        self.assertIsNone(self.routing.owner(FakeRequest(), mine))
        self.assertEqual(self.routing.owner(FakeRequest(), theirs), PEERS[2])

    def test_a_dead_owners_names_move_as_nginx_moves_them(self):
        theirs = name_owned_by(PEERS, PEERS[2])
        self.down.add(PEERS[2])
        expected = Ring(PEERS).owner(theirs, lambda p: p != PEERS[2])
        self.assertEqual(self.routing.owner(FakeRequest(), theirs), None if expected == PEERS[1] else expected)

    def test_a_leaving_replica_passes_its_names_on(self):
        """Draining before a stop, new calls go where the ingress will send them once this port closes."""
        mine = name_owned_by(PEERS, PEERS[1])
        expected = Ring(PEERS).owner(mine, lambda p: p != PEERS[1])
        self.assertEqual(self.routing.owner(FakeRequest(), mine, leaving=True), expected)
        self.assertIsNone(self.routing.owner(FakeRequest({FORWARDED_BY: [PEERS[0]]}), mine, leaving=True))
        self.down.update([PEERS[0], PEERS[2]])
        self.assertIsNone(self.routing.owner(FakeRequest(), mine, leaving=True))

    def test_a_forwarded_call_is_handled_here(self):
        theirs = name_owned_by(PEERS, PEERS[2])
        request = FakeRequest({FORWARDED_BY: [PEERS[0]]})
        self.assertIsNone(self.routing.owner(request, theirs))
        self.assertIsNone(self.routing.issuer(request, RequestIds(replica=2)("robot")))

    def test_an_id_goes_to_its_issuer_whoever_owns_the_name(self):
        mine = name_owned_by(PEERS, PEERS[1])
        self.assertEqual(self.routing.issuer(FakeRequest(), RequestIds(replica=0)(mine)), PEERS[0])
        self.assertIsNone(self.routing.issuer(FakeRequest(), RequestIds(replica=1)(mine)))

    def test_ids_of_a_dead_issuer_are_handled_here(self):
        """Its requests died with it: the id is unknown here, and the relay-client gets its 400 and stops."""
        self.down.add(PEERS[0])
        self.assertIsNone(self.routing.issuer(FakeRequest(), RequestIds(replica=0)("robot")))

    def test_ids_of_no_replica_are_handled_here(self):
        for request_id in [RequestIds(replica=7)("robot"), "robot:123", "nonsense", RequestIds()("robot")[:-1]]:
            self.assertIsNone(self.routing.issuer(FakeRequest(), request_id), request_id)


def lone_replica():
    """Multi-replica mode with a ring of one: every name is this replica's."""
    return Routing(["relay:80"], "relay:80", lambda peer: True, None, None)


@pytest.mark.memory
class MoveWaitTests(unittest.SynchronousTestCase):
    """A request for a name no relay-client polls for yet waits for its first poll."""

    def setUp(self):
        self.relay = InMemoryRelay(routing=lone_replica(), move_wait=15.0, max_pending_per_backend=2, max_backends=3)

    def test_waits_and_is_relayed_when_the_poll_comes(self):
        user = self.relay.get("/client/robot/x")
        self.relay.advance(14)
        self.assertNoResult(user)
        poll = self.relay.get("/server/request?server=robot")
        message = HttpRequest()
        message.ParseFromString(self.successResultOf(self.relay.content(self.successResultOf(poll))))
        self.assertEqual(message.url, "http://invalid/x")
        self.relay.post(
            "/server/response", HttpResponse(id=message.id, status_code=200, body=b"hi", eof=True).SerializeToString()
        )
        response = self.successResultOf(user)
        self.assertEqual((response.code, self.successResultOf(self.relay.content(response))), (200, b"hi"))
        self.assertEqual(self.relay.broker.arriving, {})

    def test_unknown_client_after_the_bound(self):
        user = self.relay.get("/client/robot/x")
        self.relay.advance(14.9)
        self.assertNoResult(user)
        self.relay.advance(0.1)
        response = self.successResultOf(user)
        self.assertEqual(response.code, 503)
        self.assertIn(b"(unknown client)", self.successResultOf(self.relay.content(response)))
        self.assertEqual(self.relay.broker.arriving, {})

    def test_waits_count_against_the_pending_limits(self):
        waiting = [self.relay.get("/client/robot/x") for _ in range(2)]
        third = self.successResultOf(self.relay.get("/client/robot/x"))
        self.assertEqual(third.code, 503)
        self.assertIn(b"Too many pending requests", self.successResultOf(self.relay.content(third)))
        # Three names at most, waited for or polled for.
        self.relay.get("/client/other/x")
        self.relay.get("/client/third/x")
        fourth = self.successResultOf(self.relay.get("/client/fourth/x"))
        self.assertEqual(fourth.code, 503)
        self.assertEqual(sorted(self.relay.broker.arriving), ["other", "robot", "third"])
        for d in waiting:
            self.assertNoResult(d)
        self.relay.advance(15)
        self.assertEqual(self.relay.broker.arriving, {})

    def test_a_single_replica_does_not_wait(self):
        relay = InMemoryRelay()
        response = self.successResultOf(relay.get("/client/robot/x"))
        self.assertEqual(response.code, 503)


@pytest.mark.memory
class ArrivalTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock, ServerConfig(move_wait=5.0, max_backends=2, max_pending_per_backend=1))

    def test_a_user_gone_leaves_nothing_behind(self):
        d = self.broker.arrival("robot")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.broker.arriving, {})

    def test_polls_are_not_locked_out_by_waits(self):
        self.broker.arrival("a")
        self.broker.arrival("b")
        with self.assertRaises(Overloaded):
            self.broker.arrival("c")
        self.broker.get_request("a")
        self.broker.get_request("b")
        self.assertEqual(sorted(self.broker.backends), ["a", "b"])

    def test_shutdown_wakes_the_waits(self):
        d = self.broker.arrival("robot")
        self.broker.stop()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.broker.arriving, {})


class Replicas:
    """C{count} relay servers on 127.0.0.1 that know each other, one Clock for their timers."""

    def __init__(self, test, count: int, **fields):
        self.clock = Clock()
        ports = reserve_ports(test, count)
        self.peers = ["127.0.0.1:%d" % port for port in ports]
        self.servers = []
        for port, peer in zip(ports, self.peers):
            server = RelayServer(port, peers=",".join(self.peers), peer_self=peer, clock=self.clock, **fields)
            test.addCleanup(server.stop)
            self.servers.append(server)

    def name_owned_by(self, index: int) -> str:
        return name_owned_by(self.peers, self.peers[index])


@pytest.mark.socket
class ForwardingTests(unittest.TestCase):
    """Two real replicas: A owns the name, B gets the calls it should not."""

    timeout = 20

    def setUp(self):
        self.replicas = Replicas(self, 2)
        self.a, self.b = self.replicas.servers
        self.name = self.replicas.name_owned_by(0)
        self.at_a = FakeRelayClient(self.a)
        self.at_b = FakeRelayClient(self.b)
        self.addCleanup(self.at_a.close)
        self.addCleanup(self.at_b.close)

    def user(self, server, data: bytes):
        return raw_user(self, server.port, data)

    @defer.inlineCallbacks
    def test_user_request_at_the_wrong_replica(self):
        poll = self.at_a.poll(self.name)
        user = yield self.user(self.b, b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\n\r\n" % self.name.encode())
        status, message = yield poll
        self.assertEqual(status, 200)
        self.assertNotIn(FORWARDED_BY, [h.name for h in message.header])
        self.assertFalse(self.b.broker.backends)
        self.assertEqual(issuing_replica(message.id), 0)
        # The user's address first, then the replica that passed it on.
        self.assertEqual(headers_of(message)["X-Forwarded-For"], "127.0.0.1, 127.0.0.1")
        yield self.at_a.respond(message.id, 200, b"from a", headers=[("Content-Length", "6")])
        yield user.wait_for(b"from a")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 200 "), bytes(user.data))

    @defer.inlineCallbacks
    def test_poll_and_response_at_the_wrong_replica(self):
        """The Go relay-client's response POST carries its name only in its body."""
        poll = self.at_b.poll(self.name)
        yield self.a.polling(self.name)
        self.assertFalse(self.b.broker.backends)
        user = yield self.user(self.a, b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\n\r\n" % self.name.encode())
        status, message = yield poll
        code, _ = yield self.at_b.respond(message.id, 200, b"part one, ", eof=False)
        self.assertEqual(code, 200)
        yield user.wait_for(b"part one, ")
        code, _ = yield self.at_b.respond(message.id, None, b"part two")
        self.assertEqual(code, 200)
        yield user.wait_until(lambda data: dechunk(head_and_body(data)[1])[2], "the last chunk")
        self.assertEqual(dechunk(head_and_body(user.data)[1])[0], b"part one, part two")

    @defer.inlineCallbacks
    def test_a_response_goes_to_the_issuer_not_the_owner(self):
        """B issued the id (its call was forwarded and handled there); A owns the name."""
        forwarded = b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\n%s: test\r\n\r\n" % (
            self.name.encode(),
            FORWARDED_BY.encode(),
        )
        # Marked as forwarded, B handles it: the name has no relay-client
        # there, so it waits for one; a poll marked the same way brings it.
        user = yield self.user(self.b, forwarded)
        yield self.b.when(lambda: self.name in self.b.broker.arriving)
        local_poll = yield self.user(
            self.b,
            b"GET /server/request?server=%s HTTP/1.1\r\nHost: r\r\n%s: test\r\n\r\n"
            % (self.name.encode(), FORWARDED_BY.encode()),
        )
        yield local_poll.wait_for(b"http://invalid/x")
        [request_id] = list(self.b.broker.requests)
        code, _ = yield self.at_a.respond(request_id, 200, b"to b", headers=[("Content-Length", "4")])
        self.assertEqual(code, 200)
        yield user.wait_for(b"to b")

    @defer.inlineCallbacks
    def test_a_draining_replica_passes_new_requests_on(self):
        self.a.service.getServiceNamed("drain").begin()
        user = yield self.user(self.a, b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\n\r\n" % self.name.encode())
        # B takes it, and waits for the name's relay-client to find it.
        yield self.b.when(lambda: self.name in self.b.broker.arriving)
        self.replicas.clock.advance(ServerConfig.move_wait)
        yield user.wait_for(b"(unknown client)")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 503 "), bytes(user.data))

    @defer.inlineCallbacks
    def test_an_id_of_no_replica_is_answered_here(self):
        code, body = yield self.at_b.respond("robot:" + "ff" * 16, 200, b"x")
        self.assertEqual((code, body), (400, b"Duplicate or invalid request ID robot:" + b"ff" * 16 + b"\n"))

    @defer.inlineCallbacks
    def websocket_at_b(self):
        """A WebSocket through B to A's relay-client, switched: C{(user, message)}."""
        poll = self.at_a.poll(self.name)
        user = yield self.user(
            self.b,
            b"GET /client/%s/ws HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            % self.name.encode(),
        )
        status, message = yield poll
        self.assertEqual(headers_of(message).get("Upgrade"), "websocket")
        self.assertEqual(headers_of(message)["X-Forwarded-Proto"], "http")
        code, _ = yield self.at_a.respond(
            message.id, 101, eof=False, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]
        )
        self.assertEqual(code, 200)
        yield user.wait_for(b"\r\n\r\n")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 101 "), bytes(user.data))
        return user, message

    @defer.inlineCallbacks
    def test_websocket_through_the_wrong_replica(self):
        user, message = yield self.websocket_at_b()
        user.transport.write(b"ping")
        # The relay-client pulls the user's bytes at the wrong replica too.
        code, data = yield self.at_b.request_stream(message.id)
        self.assertEqual((code, data), (200, b"ping"))
        yield self.at_a.respond(message.id, None, b"pong", eof=False)
        yield user.wait_for(b"pong")
        # The backend's end closes the user's connection, through both replicas.
        yield self.at_a.respond(message.id, None, b"", eof=True)
        yield user.ended
        self.assertTrue(user.clean)

    @defer.inlineCallbacks
    def test_websocket_cut_at_the_owner_is_cut_for_the_user(self):
        user, message = yield self.websocket_at_b()
        for channel in list(self.a.service.site.connections):
            channel.transport.abortConnection()
        yield user.ended
        self.assertFalse(user.clean)

    def replica_of_a_dead_owner(self, **kwargs):
        """A replica whose one peer is gone, and a name that peer owns."""
        peers = ["127.0.0.1:%d" % port for port in reserve_ports(self, 2)]
        server = RelayServer(
            int(peers[1].rpartition(":")[2]), peers=",".join(peers), peer_self=peers[1], clock=Clock(), **kwargs
        )
        self.addCleanup(server.stop)
        return server, name_owned_by(peers, peers[0])

    @defer.inlineCallbacks
    def test_upgrade_to_an_unreachable_owner_is_502(self):
        server, name = self.replica_of_a_dead_owner()
        user = yield self.user(
            server,
            b"GET /client/%s/ws HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            % name.encode(),
        )
        yield user.wait_for(b"unreachable\n")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 502 "), bytes(user.data))

    @defer.inlineCallbacks
    def test_unauthenticated_users_are_refused_before_forwarding(self):
        folder = scratch(self)
        path = os.path.join(folder, "users")
        with open(path, "w") as f:
            f.write("%s *\n" % (token_hash("secret"),))
        # A forwarded call would get 502.
        server, name = self.replica_of_a_dead_owner(policy=AccessPolicy(user_tokens=UserTokens(path)))
        refused = yield self.user(server, b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\n\r\n" % name.encode())
        yield refused.wait_for(b"\r\n\r\n")
        self.assertTrue(bytes(refused.data).startswith(b"HTTP/1.1 401 "), bytes(refused.data))
        allowed = yield self.user(
            server, b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\nX-Relay-Token: secret\r\n\r\n" % name.encode()
        )
        yield allowed.wait_for(b"unreachable")
        self.assertTrue(bytes(allowed.data).startswith(b"HTTP/1.1 502 "), bytes(allowed.data))


@pytest.mark.socket
class ThreeReplicasTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_every_replica_answers_for_every_name(self):
        replicas = Replicas(self, 3)
        names = [replicas.name_owned_by(i) for i in range(3)]
        clients = [FakeRelayClient(server) for server in replicas.servers]
        for client in clients:
            self.addCleanup(client.close)
        for i, name in enumerate(names):
            for server in replicas.servers:
                # The relay-client polls at the next replica over, and
                # answers at the one after.
                poll = clients[(i + 1) % 3].poll(name)
                yield replicas.servers[i].polling(name)
                user = yield raw_user(
                    self, server.port, b"GET /client/%s/x HTTP/1.1\r\nHost: r\r\n\r\n" % name.encode()
                )
                status, message = yield poll
                yield clients[(i + 2) % 3].respond(
                    message.id, 200, name.encode(), headers=[("Content-Length", str(len(name)))]
                )
                yield user.wait_for(name.encode())
                self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 200 "))


@pytest.mark.socket
class QuietChecksTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_a_check_a_second_logs_nothing(self):
        """Each round of peer checks would otherwise log Twisted's C{Starting factory} line at info."""
        peer = RelayServer()
        self.addCleanup(peer.stop)
        events = []
        observer = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        probe = healthz_probe(reactor)
        for _ in range(3):
            self.assertIs((yield probe("127.0.0.1:%d" % peer.port)), True)
        self.assertEqual([e.get("log_format") for e in events if e["log_level"] >= LogLevel.info], [])


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
