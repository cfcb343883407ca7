"""
Several replicas acting as one relay, end to end (docs/scaling.md): Debian's
nginx runs the site of C{deploy/nginx/relay-replicas.conf} (plain HTTP/1.1
and h2c listeners instead of TLS), hashing consistently on the backend name
over three C{twistd -n relay} replicas on 127.0.0.1. Behind them, 20 backend
names: half served by our relay-clients (in this process), half by the Go
relay-client, each name by a backend of its own that puts its name into
every answer, so an answer from the wrong backend cannot pass. Relay-clients
and users all talk to nginx only, as they would in production.

The test checks, in order:

  - every name answers through nginx: a plain request, a 1 MiB body and a
    WebSocket for the HTTP names, a unary call for the gRPC names;
  - a relay-client's response POST that reaches a replica other than the one
    holding the request (the Go client's POSTs carry the name only in their
    body) is delivered by forwarding;
  - after SIGKILL of the replica owning the most names, answers that had
    begun through it end in an error, never a complete-looking body, and
    every name answers again within L{MOVE_BOUND} seconds.

Every answer in every phase is checked against its name.
"""

import os
import shutil
import tempfile

import pytest
import treq
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from relay.server.ring import Ring
from tests.support import FakeRelayClient, client_service, tick
from tests.support.e2e import Collect, Sniffer, WebSocketEcho, make_frame, open_websocket, parse_frame
from tests.support.go import GO_CLIENT, go_binary
from tests.support.nginx_site import REPLICAS_SITE, NginxSite, find_nginx
from tests.support.ports import reserve_ports
from tests.support.process import ChildProcess, TwistdProcess

pytestmark = pytest.mark.process

try:
    from concurrent import futures

    import grpc

    from tests.support.grpc_echo import SERVICE, CallThreads, identity, method
except ImportError:  # e.g. on PyPy, which grpcio has no wheels for
    grpc = None

REPLICAS = 3
HTTP_NAMES = ["ours-%d" % i for i in range(8)] + ["go-%d" % i for i in range(8)]
GRPC_NAMES = ["ours-grpc-0", "ours-grpc-1", "go-grpc-0", "go-grpc-1"]
BIG = 1024 * 1024
# Every name answers again within this many seconds of a replica's SIGKILL:
# the replicas notice a dead peer within about 2 s (two failed health checks
# a second apart), relay-clients poll the new owner at their next poll
# (nginx sends a poll cut by the death on to the next replica at once), and
# a request that arrives before the poll waits for it (--move_wait).
MOVE_BOUND = 15.0
CALL_TIMEOUT = 20.0


def big_body(name: str) -> bytes:
    pattern = (name + "|").encode()
    return (pattern * (BIG // len(pattern) + 1))[:BIG]


class NamedResource(resource.Resource):
    """A backend's HTTP side: every answer carries its name."""

    isLeaf = True

    def __init__(self, name: str):
        super().__init__()
        self.name = name.encode()
        self.big = big_body(name)

    def render_GET(self, request):
        if request.path == b"/name":
            return self.name
        if request.path == b"/big":
            return self.big
        if request.path == b"/slow":
            # The name, then a tick every 0.1 s until the user goes away.
            request.write(self.name + b"\n")
            ticking = [None]

            def write():
                request.write(b"tick\n")
                ticking[0] = reactor.callLater(0.1, write)

            ticking[0] = reactor.callLater(0.1, write)
            request.notifyFinish().addBoth(lambda _: ticking[0].active() and ticking[0].cancel())
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"no such page"


class NamedWebSocket(WebSocketEcho):
    """An echo whose first message is the backend's name."""

    name = b""

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(make_frame(1, self.name, mask=False))


class NamedBackend:
    def __init__(self, name: str):
        site = server.Site(NamedResource(name))
        websocket = type("WebSocket", (NamedWebSocket,), {"name": name.encode()})
        factory = protocol.Factory.forProtocol(lambda: Sniffer(site, websocket))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = "127.0.0.1:%d" % self.port.getHost().port

    def stop(self):
        return self.port.stopListening()


class GrpcNamedBackend:
    """A gRPC backend whose one method answers with its name."""

    def __init__(self, name: str):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        unary = grpc.unary_unary_rpc_method_handler(
            lambda request, context: name.encode() + b":" + request, identity, identity
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Unary": unary}),))
        self.address = "127.0.0.1:%d" % self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self):
        return threads.deferToThread(lambda: self.server.stop(None).wait(10))


class Begun(Collect):
    """An answer's body, and C{first_line}: fires once its first line is in (the backend's name)."""

    def __init__(self):
        super().__init__()
        self.first_line = defer.Deferred()

    def dataReceived(self, data):
        super().dataReceived(data)
        if not self.first_line.called and b"\n" in b"".join(self.pieces):
            self.first_line.callback(None)

    def connectionLost(self, reason):
        if not self.first_line.called:
            self.first_line.errback(AssertionError("the answer ended before its first line"))
        super().connectionLost(reason)


class At:
    """The address a L{FakeRelayClient} talks to: nginx, or one replica."""

    def __init__(self, port: int):
        self.base = "http://127.0.0.1:%d" % port

    def url(self, path: str) -> str:
        return self.base + path


class ReplicasBehindNginx(unittest.TestCase):
    timeout = 120

    def setUp(self):
        nginx = find_nginx()
        if nginx is None:
            raise unittest.SkipTest("nginx is not installed (.ci/run installs Debian's nginx-light)")
        go_binary(GO_CLIENT)  # half the names are served by the Go relay-client
        self.grpc_names = GRPC_NAMES if grpc is not None else []
        self.names = HTTP_NAMES + self.grpc_names
        self.users = HTTPConnectionPool(reactor, persistent=False)
        if grpc is not None:
            self.in_thread = CallThreads(self)
        return self.start(nginx)

    # Setting up.

    @defer.inlineCallbacks
    def start(self, nginx):
        ports = reserve_ports(self, REPLICAS)
        self.peers = ["127.0.0.1:%d" % port for port in ports]
        self.ring = Ring(self.peers)
        self.replicas = {}
        for peer, port in zip(self.peers, ports):
            replica = TwistdProcess.spawn(
                [
                    "relay",
                    "--port=tcp:%d:interface=127.0.0.1" % port,
                    "--peers=" + ",".join(self.peers),
                    "--peer_self=" + peer,
                    "--drain_grace=0s",
                ]
            )
            self.addCleanup(replica.terminate)
            self.replicas[peer] = replica
        for replica in self.replicas.values():
            yield replica.wait_for(r"Relay server listening")
        self.replica_ports = dict(zip(self.peers, ports))

        folder = tempfile.mkdtemp(prefix="relay-replicas-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.http_port, self.h2c_port = reserve_ports(self, 2)
        conf = NginxSite(REPLICAS_SITE).plain_http(folder, self.http_port, self.h2c_port, self.peers)
        for upstream in ("relay", "relay_grpc"):
            self.assertEqual(NginxSite(conf).upstream_servers(upstream), self.peers)
        self.nginx = ChildProcess.spawn([nginx, "-p", folder, "-c", conf])
        self.addCleanup(self.nginx.terminate)
        self.nginx_log = os.path.join(folder, "error.log")
        yield self.listening(self.http_port)

        for name in HTTP_NAMES:
            backend = NamedBackend(name)
            self.addCleanup(backend.stop)
            self.serve(name, backend.address)
        for name in self.grpc_names:
            backend = GrpcNamedBackend(name)
            self.addCleanup(backend.stop)
            self.serve(name, backend.address, grpc_backend=True)
        if grpc is not None:
            self.channel = grpc.insecure_channel(
                "127.0.0.1:%d" % self.h2c_port, options=[("grpc.enable_http_proxy", 0)]
            )
            self.addCleanup(self.channel.close)
        # Every name answers once its relay-client's first poll is in.
        results = yield defer.gatherResults([self.reachable(name, deadline=30.0) for name in self.names])
        unreachable = [(name, last) for name, (ok, last) in zip(self.names, results) if not ok]
        self.assertEqual(unreachable, [], self.logs())

    def serve(self, name: str, backend_address: str, grpc_backend: bool = False):
        relay_address = "127.0.0.1:%d" % self.http_port
        if name.startswith("go-"):
            argv = [
                GO_CLIENT,
                "--backend_scheme=http",
                "--relay_scheme=http",
                "--disable_auth_for_remote",
                "--server_name=" + name,
                "--backend_address=" + backend_address,
                "--relay_address=" + relay_address,
            ]
            go = ChildProcess.spawn(argv + (["--force_http2"] if grpc_backend else []))
            self.addCleanup(go.terminate)
            return
        client = client_service(
            reactor,
            "http://" + relay_address,
            name,
            backend_scheme="http",
            backend_address=backend_address,
            force_http2=grpc_backend,
        )
        client.startService()
        self.addCleanup(client.stopService)

    @defer.inlineCallbacks
    def listening(self, port: int):
        """A real process's port: nothing to wait on but the socket."""
        deadline = reactor.seconds() + 10
        while True:
            try:
                connection = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol.Protocol())
                connection.transport.loseConnection()
                return
            except Exception:
                self.assertFalse(self.nginx.exited.called, self.nginx.output)
                self.assertLess(reactor.seconds(), deadline, "nginx does not listen: %r" % self.nginx.output)
                yield tick(0.05)

    def logs(self) -> str:
        """The tails of the replicas' and nginx's logs, for a failure's message."""
        parts = []
        for peer, replica in self.replicas.items():
            parts.append("--- replica %s:\n%s" % (peer, "\n".join(replica.lines[-15:])))
        try:
            with open(self.nginx_log) as f:
                parts.append("--- nginx:\n" + "".join(f.readlines()[-15:]))
        except OSError:
            pass
        return "\n".join(parts)

    # Calls, each answer checked against its name.

    def url(self, name: str, path: str) -> str:
        return "http://127.0.0.1:%d/client/%s%s" % (self.http_port, name, path)

    @defer.inlineCallbacks
    def get(self, name: str, path: str, expected: bytes):
        """C{(status, body)} of a GET through nginx; a 200 must carry C{expected}."""
        response = yield treq.get(self.url(name, path), pool=self.users, timeout=CALL_TIMEOUT)
        body = yield response.content()
        if response.code == 200:
            self.assertEqual(body, expected, "%s%s answered by another backend" % (name, path))
        return response.code, body

    @defer.inlineCallbacks
    def unary(self, name: str):
        """A gRPC call through nginx's h2c port; its answer must carry C{name}."""
        call = self.channel.unary_unary(method("Unary"), request_serializer=identity, response_deserializer=identity)
        answer = yield self.in_thread(call, b"hello", timeout=CALL_TIMEOUT, metadata=[("x-server-name", name)])
        self.assertEqual(answer, name.encode() + b":hello", "%s answered by another backend" % (name,))
        return answer

    @defer.inlineCallbacks
    def answers(self, name: str):
        """Whether C{name} answers now; a wrong answer fails the test."""
        try:
            if name in self.grpc_names:
                yield self.unary(name)
                return True, "ok"
            code, body = yield self.get(name, "/name", name.encode())
        except AssertionError:
            raise
        except Exception as e:
            return False, repr(e)
        return code == 200, "%d %r" % (code, body[:200])

    @defer.inlineCallbacks
    def reachable(self, name: str, deadline: float):
        """C{(True, when)} once C{name} answers, or C{(False, last answer)} after C{deadline} seconds."""
        started = reactor.seconds()
        while True:
            ok, last = yield self.answers(name)
            if ok:
                return True, reactor.seconds()
            if reactor.seconds() - started > deadline:
                return False, last
            yield tick(0.2)

    # The checks.

    @defer.inlineCallbacks
    def test_names_answer_through_nginx_and_move_when_a_replica_dies(self):
        started = reactor.seconds()
        yield self.every_name_answers_every_kind_of_call()
        yield self.response_post_to_the_wrong_replica_is_forwarded()
        yield self.replica_killed()
        # The whole test, setup included, stays short.
        self.assertLess(reactor.seconds() - started, 90)

    @defer.inlineCallbacks
    def every_name_answers_every_kind_of_call(self):
        calls = []
        for name in HTTP_NAMES:
            calls.append(self.get(name, "/name", name.encode()))
            calls.append(self.get(name, "/big", big_body(name)))
            calls.append(self.websocket(name))
        for name in self.grpc_names:
            calls.append(self.unary(name))
        results = yield defer.gatherResults(calls, consumeErrors=True)
        statuses = [r[0] for r in results if isinstance(r, tuple)]
        self.assertEqual(statuses, [200] * (2 * len(HTTP_NAMES)))

    @defer.inlineCallbacks
    def websocket(self, name: str):
        user = yield open_websocket(self, self.http_port, name)
        yield user.read_until(lambda d: parse_frame(d) is not None)
        opcode, payload, used = parse_frame(user.data)
        user.data = user.data[used:]
        self.assertEqual((opcode, payload), (1, name.encode()), "WebSocket to %s answered by another backend" % name)
        message = b"echo through nginx " + name.encode()
        user.transport.write(make_frame(2, message, mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        self.assertEqual(parse_frame(user.data)[:2], (2, message))
        user.transport.loseConnection()
        yield user.closed

    @defer.inlineCallbacks
    def response_post_to_the_wrong_replica_is_forwarded(self):
        """
        We play a relay-client for a new name: it polls through nginx (so
        the poll reaches the name's owner, which issues the request's id),
        and posts the response straight to another replica, as nginx does
        with the Go client's POSTs, which carry the name only in their body.
        """
        name = "by-hand"
        owner = self.ring.owner(name)
        wrong = [peer for peer in self.peers if peer != owner][0]
        polling = FakeRelayClient(At(self.http_port))
        self.addCleanup(polling.close)
        posting = FakeRelayClient(At(self.replica_ports[wrong]))
        self.addCleanup(posting.close)
        poll = polling.poll(name)
        # The user's request waits (--move_wait) for the name's first poll.
        user = treq.get(self.url(name, "/hand"), pool=self.users, timeout=CALL_TIMEOUT)
        code, request = yield poll
        self.assertEqual(code, 200)
        self.assertTrue(request.id.startswith(name + ":"))
        self.assertEqual(request.url, "http://invalid/hand")
        code, body = yield posting.respond(request.id, 200, b"answered by hand")
        self.assertEqual((code, body), (200, b"ok"))
        response = yield user
        self.assertEqual((response.code, (yield response.content())), (200, b"answered by hand"))

    def collect(self, response):
        """The body of C{response} as it comes (L{Begun})."""
        self.assertEqual(response.code, 200)
        collect = Begun()
        response.deliverBody(collect)
        return collect

    @defer.inlineCallbacks
    def replica_killed(self):
        owned = {peer: [name for name in self.names if self.ring.owner(name) == peer] for peer in self.peers}
        victim = max(self.peers, key=lambda peer: len(owned[peer]))
        # Answers that have begun through the victim: one per kind of relay-client.
        slow_names = [
            [name for name in owned[victim] if name in HTTP_NAMES and name.startswith(kind)][:1]
            for kind in ("ours-", "go-")
        ]
        slow_names = sum(slow_names, [])
        self.assertTrue(slow_names, "the victim owns no HTTP name: %r" % (owned,))
        agent = Agent(reactor, pool=self.users)
        begun = []
        for name in slow_names:
            response = yield agent.request(b"GET", self.url(name, "/slow").encode())
            begun.append((name, self.collect(response)))
        # And one we play the relay-client for, to see what it is told.
        hand = next(n for n in ("by-hand-%d" % i for i in range(1000)) if self.ring.owner(n) == victim)
        polling = FakeRelayClient(At(self.http_port))
        self.addCleanup(polling.close)
        poll = polling.poll(hand)
        user = agent.request(b"GET", self.url(hand, "/cut").encode())
        code, request = yield poll
        self.assertEqual(code, 200)
        self.assertEqual((yield polling.respond(request.id, 200, hand.encode() + b"\n", eof=False)), (200, b"ok"))
        begun.append((hand, self.collect((yield user))))
        yield defer.gatherResults([collect.first_line for _, collect in begun])

        self.replicas[victim].transport.signalProcess("KILL")
        killed = reactor.seconds()
        # Every name answers again, each with its own answer: from now on.
        recovering = defer.gatherResults([self.reachable(name, deadline=MOVE_BOUND + 10) for name in self.names])

        # Cut off: an error, never a body that looks complete.
        for name, collect in begun:
            try:
                yield collect.done
            except Exception:
                pass
            else:
                self.fail("the answer from %s cut off by the kill looked complete" % (name,))
            self.assertTrue(b"".join(collect.pieces).startswith(name.encode() + b"\n"))
        # The relay-client's next chunk for the dead replica's request is
        # refused for good once the replicas know the replica is dead: 400,
        # the request is gone (docs/scaling.md), so that the relay-client
        # stops work on it rather than retry it for a minute.
        while True:
            code, body = yield polling.respond(request.id, 200, b"more", eof=False)
            self.assertIn(code, (400, 502, 503), body)
            if code == 400:
                break
            self.assertLess(reactor.seconds() - killed, MOVE_BOUND, "still %d %r" % (code, body))
            yield tick(0.2)

        # Every name answered again in time.
        results = yield recovering
        late = {}
        for name, (ok, when) in zip(self.names, results):
            if not ok or when - killed > MOVE_BOUND:
                late[name] = when if not ok else "after %.1f s" % (when - killed)
        self.assertEqual(late, {}, "names of %s (killed): %r\n%s" % (victim, owned[victim], self.logs()))
