"""
Shared pieces of the server tests: an in-process relay server on a loopback
port, a test double that plays the relay-client with real protobuf messages
over real HTTP, and a raw-socket user-client for the cases where an HTTP
library would hide what we need to see (slow reading, aborted connections,
101 pipes).
"""

import dataclasses
import re
import weakref
from typing import Callable, List, Optional, Tuple

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web import server as server_module
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from relay.client.http import BytesProducer
from relay.client.service import make_client_service
from relay.config import ClientConfig, ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import Broker
from relay.server.events import IBrokerEvents
from relay.server.metrics import RelayMetrics
from relay.server.resources import RootResource
from relay.server.service import make_server_service
from relay.server.site import RelaySite


def _split(config_class, kwargs: dict) -> dict:
    """Take the config fields out of C{kwargs}; what is left goes to the builder."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}


def server_service(endpoint, reactor, **kwargs):
    """
    L{make_server_service} with the config's defaults but for the fields
    given, and no drain grace: a test's stop should not wait for load
    balancers that are not there.

    With a C{clock} the header timeout is off unless the test sets it:
    that clock times the connections too, and a test that steps it
    through minutes of poll and inactivity timeouts would otherwise see
    its idle kept-alive connections closed under it (on the real
    reactor, no test lasts the 30 s default).
    """
    fields = {"drain_grace": 0.0}
    if kwargs.get("clock") is not None:
        fields["header_timeout"] = None
    fields.update(_split(ServerConfig, kwargs))
    kwargs.setdefault("metrics", RelayMetrics(process=False))
    return make_server_service(endpoint, reactor, ServerConfig(**fields), **kwargs)


def client_service(reactor, relay_url: str, server_name: str, **kwargs):
    """L{make_client_service} for the relay at C{relay_url}, with the config's defaults but for the fields given."""
    scheme, _, rest = relay_url.partition("://")
    address, slash, prefix = rest.partition("/")
    config = ClientConfig(
        relay_scheme=scheme,
        relay_address=address,
        relay_prefix=(slash + prefix).rstrip("/"),
        server_name=server_name,
        **_split(ClientConfig, kwargs)
    )
    return make_client_service(reactor, config, **kwargs)


def started_client(test, relay_url: str, server_name: str, backend_address: str, **kwargs):
    """
    A relay-client on the real reactor (L{client_service}; the backend over
    plain HTTP unless C{backend_scheme} says otherwise), started now and
    stopped at C{test}'s clean-up.
    """
    kwargs.setdefault("backend_scheme", "http")
    client = client_service(reactor, relay_url, server_name, backend_address=backend_address, **kwargs)
    client.startService()
    test.addCleanup(client.stopService)
    return client


def polled_by(broker, name: str) -> bool:
    """Whether a relay-client's long poll for C{name} waits at the server."""
    backend = broker.backends.get(name)
    return backend is not None and bool(backend.polls)


class Changes:
    """
    Deferreds for conditions over state that a real-socket test cannot
    see change (what a server holds after bytes crossed a socket): each
    condition is checked again whenever the code that changes the state
    calls L{changed}, rather than by polling the reactor. A Deferred fires
    on the next reactor turn, outside the call that changed the state.
    """

    def __init__(self):
        self._waiting: List[Tuple[Callable[[], object], defer.Deferred]] = []

    def changed(self) -> None:
        for entry in list(self._waiting):
            condition, d = entry
            try:
                held = condition()
            except Exception:
                # The test's Deferred fails, not the code that changed the state.
                self._waiting.remove(entry)
                reactor.callLater(0, d.errback, Failure())
                continue
            if held:
                self._waiting.remove(entry)
                reactor.callLater(0, d.callback, None)

    def when(self, condition: Callable[[], object]) -> defer.Deferred:
        """Fires once C{condition()} holds (at once if it does now)."""
        if condition():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((condition, d))
        return d


@implementer(IBrokerEvents)
class BrokerEvents(Changes):
    """
    L{Changes} of a broker (a poll waiting, a request forgotten), as its
    observer: conditions are checked again at each of the broker's events.
    """

    def __init__(self, broker):
        super().__init__()
        broker.add_observer(self)

    def poll_waiting(self, backend):
        self.changed()

    def poll_from(self, backend, peer):
        self.changed()

    def poll_ended(self, backend):
        self.changed()

    def backend_awaited(self, backend):
        self.changed()

    def unknown_backend(self, backend, message):
        self.changed()

    def request_refused(self, backend, status):
        self.changed()

    def request_queued(self, pending, message):
        self.changed()

    def request_picked_up(self, pending):
        self.changed()

    def response_posted(self, pending, message):
        self.changed()

    def stream_polled(self, pending):
        self.changed()

    def request_finished(self, pending, outcome):
        self.changed()

    def backend_forgotten(self, backend):
        self.changed()


class Recorder(list):
    """A callback (an C{on_fatal}) that keeps what it was called with."""

    def __init__(self):
        super().__init__()
        self.changes = Changes()

    def __call__(self, value) -> None:
        self.append(value)
        self.changes.changed()

    def called(self) -> defer.Deferred:
        """Fires once it has been called."""
        return self.changes.when(lambda: self)


_events: "weakref.WeakKeyDictionary[Broker, BrokerEvents]" = weakref.WeakKeyDictionary()


def broker_events(broker) -> BrokerEvents:
    """The broker's L{BrokerEvents}, made on first use."""
    events = _events.get(broker)
    if events is None:
        events = _events[broker] = BrokerEvents(broker)
    return events


def admin_stats(broker):
    """The admin view's statistics among the broker's observers; None when the view is off."""
    from relay.server.admin.stats import AdminStats

    return next((o for o in broker.observers if isinstance(o, AdminStats)), None)


def polling(broker, name: str) -> defer.Deferred:
    """Fires once a relay-client's long poll for C{name} waits at C{broker}."""
    return broker_events(broker).when(lambda: polled_by(broker, name))


class RelayServer:
    """A relay server service listening on 127.0.0.1, for one test."""

    def __init__(self, port: int = 0, **kwargs):
        self.clock = kwargs.get("clock")
        self.service = server_service(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), reactor, **kwargs)
        self.service.startService()
        self.port = self.service.listening_port.getHost().port
        self.broker = self.service.broker
        broker_events(self.broker)  # from the start: it sees every poll
        self.base = "http://127.0.0.1:%d" % (self.port,)

    def url(self, path: str) -> str:
        return self.base + path

    def polled_by(self, name: str) -> bool:
        return polled_by(self.broker, name)

    def polling(self, name: str) -> defer.Deferred:
        return polling(self.broker, name)

    def when(self, condition: Callable[[], object]) -> defer.Deferred:
        return broker_events(self.broker).when(condition)

    def stop(self) -> defer.Deferred:
        """
        Stop the server. On a test's L{Clock}, the stop's own waits (the
        drain's checks and deadline, the abort of connections that do not
        close) are on that clock: it is stepped, a reactor turn between
        steps for the sockets, until the stop ends.
        """
        stopped = defer.maybeDeferred(self.service.stopService)
        if isinstance(self.clock, Clock):
            return run_clock_until(self.clock, stopped)
        return stopped


class _RelaySiteAgent(RequestTraversalAgent):
    """
    treq's in-memory agent, serving through the relay's own Site: its
    request class keeps bodies as the relay's resources read them. treq
    builds a plain Site in C{_serverFactory}; this is the one place the
    tests replace a treq internal, and it fails at once if treq renames it.
    """

    def __init__(self, site_for):
        super().__init__(None)
        assert isinstance(getattr(self, "_serverFactory", None), server_module.Site), "treq changed"
        self._serverFactory = site_for(self._memoryReactor)


class InMemoryRelay:
    """
    The relay server's Site with no sockets: treq's client over iosim
    transports, the protocol's timeouts on a L{Clock}, every exchange
    finished before a call returns (no polling of the reactor).
    """

    base = "http://relay"

    def __init__(self, policy=None, routing=None, **fields):
        self.clock = Clock()
        config = ServerConfig(**dict({"header_timeout": None}, **fields))
        metrics = RelayMetrics(process=False)
        self.broker = Broker(self.clock, config, metrics)
        metrics.watch(self.broker)
        root = RootResource(self.broker, metrics.render, policy, routing=routing)

        def site_for(memory):
            # The site's own reactor (treq's memory reactor, with a clock of
            # its own) stays reachable for what the Site itself times.
            self.site = RelaySite(root, config, reactor=memory)
            return self.site

        self.agent = _RelaySiteAgent(site_for)
        self.http = HTTPClient(self.agent)

    def request(self, method: str, path: str, **kwargs) -> defer.Deferred:
        """A request, carried as far as it goes now; flush() after the clock moves."""
        if isinstance(kwargs.get("data"), bytes):
            # Written at once: treq's own producer for bytes would wait for
            # the real reactor's cooperator.
            kwargs["data"] = BytesProducer(kwargs["data"])
        d = self.http.request(method, self.base + path, **kwargs)
        self.flush()
        return d

    def get(self, path: str, **kwargs) -> defer.Deferred:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, data: bytes = b"", **kwargs) -> defer.Deferred:
        return self.request("POST", path, data=data, **kwargs)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def flush(self) -> None:
        self.agent.flush()

    def content(self, response) -> defer.Deferred:
        d = response.content()
        self.flush()
        return d


class MemoryNetwork:
    """
    The connections a L{MemoryReactorClock} was asked to make, served in
    memory by C{server_factory} over iosim transports: client code that
    takes a reactor (the relay-client's agents and endpoints) runs
    unchanged with no socket. L{flush} carries every byte across, and the
    reactor's C{callLater(0)}s, until nothing moves; with C{refusing} set,
    new connections are refused instead.

    @param factory_for: makes the server's factory, given the reactor.
    """

    def __init__(self, factory_for):
        self.reactor = MemoryReactorClock()
        self.server_factory = factory_for(self.reactor)
        self.refusing = False
        self.opened = 0
        self._pumps: List[iosim.IOPump] = []

    def flush(self) -> None:
        moved = True
        while moved:
            self.reactor.advance(0)
            moved = self._connect()
            for pump in self._pumps:
                moved = pump.pump(advanceClock=False) or moved

    def _connect(self) -> bool:
        connected = False
        while self.reactor.tcpClients:
            factory = self.reactor.tcpClients.pop(0)[2]
            connector = self.reactor.connectors.pop(0)
            connected = True
            if self.refusing:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                continue
            self.opened += 1
            client = factory.buildProtocol(None)
            server = self.server_factory.buildProtocol(None)
            self._pumps.append(
                iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False)
            )
        return connected


def response_message(
    request_id: str, status: Optional[int] = 200, body: bytes = b"", eof=True, headers=(), trailers=()
):
    """An L{HttpResponse} as a relay-client posts it; C{status} None: a later message."""
    m = HttpResponse(id=request_id, body=body, eof=eof)
    if status is not None:
        m.status_code = status
    for k, v in headers:
        m.header.add(name=k, value=v)
    for k, v in trailers:
        m.trailer.add(name=k, value=v)
    return m


class FakeRelayClient:
    """
    Speaks the relay-client side of the protocol, one call at a time, so a
    test can place every message where it wants.
    """

    def __init__(self, server: RelayServer):
        self.server = server
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self.http = treq

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()

    @defer.inlineCallbacks
    def poll(self, name: str):
        """C{(status, HttpRequest or body bytes)}."""
        resp = yield treq.get(self.server.url("/server/request?server=" + name), pool=self.pool)
        body = yield resp.content()
        if resp.code == 200:
            message = HttpRequest()
            message.ParseFromString(body)
            return resp.code, message
        return resp.code, body

    @defer.inlineCallbacks
    def post(self, message) -> defer.Deferred:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        resp = yield treq.post(self.server.url("/server/response"), data=data, pool=self.pool)
        body = yield resp.content()
        return resp.code, body

    def respond(
        self, request_id: str, status: Optional[int] = 200, body: bytes = b"", eof=True, headers=(), trailers=()
    ):
        return self.post(response_message(request_id, status, body, eof, headers, trailers))

    @defer.inlineCallbacks
    def request_stream(self, request_id: str):
        resp = yield treq.post(
            self.server.url("/server/requeststream?id=" + request_id), data=b"", pool=self.pool
        )
        body = yield resp.content()
        return resp.code, body


class RawResponse(protocol.Protocol):
    """
    Collects a user-client's raw bytes and tells how the connection ended:
    C{clean} is False when it was reset (aborted) rather than closed.
    """

    def __init__(self):
        self.data = bytearray()
        self.ended = defer.Deferred()
        self.received = None
        self.clean = None

    def dataReceived(self, data):
        self.data += data
        if self.received is not None:
            d, self.received = self.received, None
            d.callback(None)

    def wait_for(self, pattern: bytes) -> defer.Deferred:
        """Fires once C{pattern} has been received."""
        return self.wait_until(lambda data: pattern in data, repr(pattern))

    def wait_until(self, predicate, what: str = "what was expected") -> defer.Deferred:
        """Fires once C{predicate(data received)} holds."""

        @defer.inlineCallbacks
        def loop():
            while not predicate(bytes(self.data)):
                if self.ended.called:
                    raise AssertionError("connection ended before %s: %r" % (what, bytes(self.data)))
                self.received = defer.Deferred()
                yield self.received

        return loop()

    def connectionLost(self, reason):
        from twisted.internet.error import ConnectionDone

        self.clean = reason.check(ConnectionDone) is not None
        if self.received is not None:
            d, self.received = self.received, None
            d.callback(None)
        self.ended.callback(None)


@defer.inlineCallbacks
def raw_connect(port: int) -> RawResponse:
    proto = RawResponse()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return proto


@defer.inlineCallbacks
def raw_user(test, port: int, data: bytes) -> RawResponse:
    """A raw user-client on C{port} that has sent C{data}; aborted when C{test} ends."""
    user = yield raw_connect(port)
    test.addCleanup(user.transport.abortConnection)
    user.transport.write(data)
    return user


def head_and_body(data: bytes) -> Tuple[bytes, bytes]:
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


def dechunk(body: bytes) -> Tuple[bytes, List[bytes], bool]:
    """C{(payload, trailer lines, complete)} of a chunked body."""
    out = []
    rest = body
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return b"".join(out), [], False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            trailers, sep, _ = rest.partition(b"\r\n\r\n")
            if not sep and rest != b"\r\n":
                return b"".join(out), [], False
            lines = [t for t in trailers.split(b"\r\n") if t]
            return b"".join(out), lines, True
        if len(rest) < size + 2:
            return b"".join(out), [], False
        out.append(rest[:size])
        rest = rest[size + 2 :]


@defer.inlineCallbacks
def run_clock_until(clock: Clock, d: defer.Deferred, step: float = 0.1, limit: float = 60.0):
    """
    Fire with C{d}'s result, stepping C{clock} by C{step} (the drain's
    check interval) while C{d} waits, with one turn of the real reactor
    after each step so that the sockets move; fails once the clock has
    moved C{limit} seconds.
    """
    moved = 0.0
    while not d.called:
        if moved >= limit:
            raise AssertionError("still waiting after %g s on the clock" % (limit,))
        clock.advance(step)
        moved += step
        yield tick(0)
    return (yield d)


def tick(seconds: float = 0.005) -> defer.Deferred:
    """Let the real reactor run for a moment."""
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def stalled(progress, quiet: float = 0.5, timeout: float = 20.0):
    """
    Wait until C{progress()} (a byte count) has not moved for C{quiet}
    seconds, and fire with where it stopped: how a test sees a sender held
    back by flow control. Fails if it never stops within C{timeout}.
    """
    last, still_since = -1, reactor.seconds()
    deadline = reactor.seconds() + timeout
    while reactor.seconds() - still_since < quiet:
        if reactor.seconds() > deadline:
            raise AssertionError("the sender never stalled")
        now = progress()
        if now != last:
            last, still_since = now, reactor.seconds()
        yield tick(0.05)
    return last


def rss_peak_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
