"""
The relay server as a Twisted service: listening, housekeeping, and a
graceful stop.

L{make_server_service} builds a L{MultiService} of three parts, the way
twistd applications are usually put together:

  - L{ListeningService} opens the endpoint (in C{privilegedStartService}, so
    port 80 works with twistd's C{--uid}) and logs C{Relay server listening}
    with the port actually bound, which tools watching the Go server's log
    look for;
  - a L{TimerService} runs L{Broker.reap} every 10 s;
  - L{DrainService} ends long polls and waits up to 20 s for in-flight
    requests before cutting them off.

A stop (SIGTERM) runs in a fixed order, which L{RelayServerService.stopService}
spells out, because a rolling deploy depends on it:

  1. At once: C{/healthz} answers 503, long polls end with C{503 Server is
     restarting} (Go's relay-client backs off on a 503, and loops on a 408),
     new polls and user requests get the same 503, and every answer carries
     C{Connection: close} (except a relay-client's 200s to answer chunks
     and stream reads: the request they belong to is still in flight);
     HTTP/2 connections get a GOAWAY (C{relay.server.h2}).
  2. The port keeps accepting for C{drain_grace} seconds, so that
     connections a load balancer still sends get that 503 instead of a
     refusal while readiness propagates; and for as long as requests are in
     flight (at most 20 s from the stop, then they are cut off), because a
     relay-client whose poll connection the 503 closed needs a new
     connection to post the rest of an answer.
  3. The port closes; the remaining connections are closed (aborted 5 s
     later if their peer does not read); the process exits.
"""

from typing import TYPE_CHECKING, List, Optional, Tuple

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger

from relay.config import ServerConfig
from relay.logs import LogsThroughObserver
from relay.server.auth import AccessPolicy
from relay.server.broker import Broker
from relay.server.forward import Forwarder
from relay.server.ids import RequestIds
from relay.server.listening import ListeningService
from relay.server.metrics import RelayMetrics
from relay.server.peers import PeerHealth, healthz_probe
from relay.server.resources import RootResource
from relay.server.routing import Routing, find_self, local_hostname, replica_list
from relay.server.site import RelaySite
from relay.server.splice import UpgradeForwarder

if TYPE_CHECKING:
    from relay.tracing import Tracing, TracingPlan

log = Logger()

REAP_INTERVAL = 10.0
PEER_CHECK_INTERVAL = 1.0
CLEAN_SHUTDOWN_TIMEOUT = 20.0


class DrainService(Service):
    """
    On stop: end long polls, let in-flight requests finish, cut off what is
    left after C{timeout}, then close the connections.
    """

    def __init__(
        self, broker: Broker, site: RelaySite, clock: IReactorTime, timeout: float = CLEAN_SHUTDOWN_TIMEOUT
    ):
        self.broker = broker
        self.site = site
        self.clock = clock
        self.timeout = timeout

    def begin(self) -> None:
        """Step 1 of a stop: refuse new work, end polls, close connections after each answer."""
        if self.site.draining:
            return
        self.site.draining = True
        self.site.go_away()
        self.broker.stop()

    def stopService(self):
        super().stopService()
        self.begin()
        d = self.in_flight_done()
        d.addCallback(lambda _: self.site.close_connections())
        return d

    def in_flight_done(self) -> defer.Deferred:
        """Fires when no request is in flight, cutting off what is left after C{timeout}."""
        if self._in_flight is None:
            self._in_flight = self._drain()
        d: defer.Deferred = defer.Deferred()

        def settle(result):
            d.callback(None)
            return result

        self._in_flight.addBoth(settle)
        return d

    _in_flight: Optional[defer.Deferred] = None

    def _drain(self) -> defer.Deferred:
        if not self.broker.requests:
            return defer.succeed(None)
        log.info("Waiting for in-flight requests", Count=len(self.broker.requests), Timeout=self.timeout)
        done: defer.Deferred = defer.Deferred()
        deadline = self.clock.seconds() + self.timeout

        def check():
            if not self.broker.requests:
                done.callback(None)
            elif self.clock.seconds() >= deadline:
                log.warn("Aborting in-flight requests", Count=len(self.broker.requests))
                self.broker.abort_all()
                done.callback(None)
            else:
                self.clock.callLater(0.1, check)

        check()
        return done


class RelayServerService(LogsThroughObserver, MultiService):
    """
    The whole server. When twistd runs it, it also tells twistd to log
    through our JSON (or text) observer, as the Go server does.
    """

    # Set by makeService (relay.server.tap).
    tracing_plan: "TracingPlan"
    tracing: Optional["Tracing"]

    def __init__(self, broker: Broker, site: RelaySite, log_observer, drain_grace: float, clock):
        super().__init__()
        self.broker = broker
        self.site = site
        self.log_observer = log_observer
        self.drain_grace = drain_grace
        self.clock = clock
        self.routing: Optional[Routing] = None

    @property
    def listening_port(self):
        return self.getServiceNamed("listen").port

    def stopService(self):
        """
        The stop in the order the module docstring gives, rather than
        L{MultiService}'s all children at once. The children are the
        three L{make_server_service} names, and any other (the admin
        listener), stopped at the end.
        """
        Service.stopService(self)
        drain = self.getServiceNamed("drain")
        listen = self.getServiceNamed("listen")
        drain.begin()
        waits = []
        if self.drain_grace > 0 and self.clock is not None:
            log.info("Draining: /healthz answers 503, still accepting", GraceSeconds=self.drain_grace)
            waits.append(task.deferLater(self.clock, self.drain_grace, lambda: None))
        waits.append(drain.in_flight_done())
        d = defer.gatherResults(waits)
        d.addCallback(lambda _: listen.stopService())
        d.addCallback(lambda _: drain.stopService())
        d.addCallback(lambda _: self.getServiceNamed("reap").stopService())
        # Anything else added to the server (the admin listener) stops last.
        d.addCallback(lambda _: defer.gatherResults(
            [defer.maybeDeferred(s.stopService) for s in list(self) if s.name not in _OWN and s.running]
        ))
        return d


_OWN = ("drain", "listen", "reap")


def _safe_reap(broker: Broker) -> None:
    try:
        broker.reap()
    except Exception:
        log.failure("Reaping inactive requests failed")


def _safe_check(health: PeerHealth):
    """
    One round of peer checks. Its Deferred goes back to the timer, so that
    a stop waits for the round (at most a check's timeout) instead of
    leaving connections behind.
    """
    try:
        d = health.check()
    except Exception:
        log.failure("Checking peer replicas failed")
        return None
    return d.addErrback(lambda f: log.failure("Checking peer replicas failed", f))


class _Closing(Service):
    """Closes the forwarder's connections to the peers, last of all at stop."""

    def __init__(self, forwarder: Forwarder):
        self.forwarder = forwarder

    def stopService(self):
        super().stopService()
        return self.forwarder.close()


def _replicas(reactor, clock, config: ServerConfig) -> Tuple[Optional[Routing], List[Service]]:
    """
    With C{--peers}: the routing among the replicas, and the services that
    keep it (the health checks, the forwarder's connections). C{(None, [])}
    for a single replica.
    """
    if not config.peers:
        return None, []
    peers = replica_list(config.peers)
    myself = find_self(peers, config.peer_self, local_hostname())
    health = PeerHealth(peers, myself, healthz_probe(reactor))
    checks = TimerService(PEER_CHECK_INTERVAL, _safe_check, health)
    checks.clock = clock
    checks.setName("peers")
    forwarder = Forwarder(reactor, myself)
    upgrades = UpgradeForwarder(reactor, myself)
    routing = Routing(peers, myself, health.usable, forwarder.forward, upgrades.forward)
    return routing, [checks, _Closing(forwarder)]


def make_server_service(
    endpoint: IStreamServerEndpoint,
    reactor,
    config: ServerConfig,
    metrics: Optional[RelayMetrics] = None,
    log_observer=None,
    clock: Optional[IReactorTime] = None,
    policy: Optional[AccessPolicy] = None,
    port_number=None,
) -> RelayServerService:
    """
    The relay server on C{endpoint}, as C{config} says. C{clock} (the
    reactor by default) drives every timeout: the broker's, the header
    timer, the drain's grace and deadline, the abort of connections that
    do not close; tests pass a L{Clock} to step through them while real
    sockets carry the traffic.
    C{port_number} is the port C{config.port} names, for error messages.
    """
    metrics = metrics if metrics is not None else RelayMetrics()
    clock = clock if clock is not None else reactor
    routing, replica_services = _replicas(reactor, clock, config)
    # With several replicas, each id names the replica that issued it.
    ids = RequestIds(replica=routing.index if routing is not None else None)
    broker = Broker(clock, config, metrics, new_id=ids)
    broker.trace = config.debug_logs
    metrics.watch(broker)
    root = RootResource(broker, metrics.render, policy=policy, routing=routing)
    site = RelaySite(root, config, clock=clock, reactor=reactor)
    site.body_budget = broker.bodies
    site.broker = broker
    service = RelayServerService(broker, site, log_observer, config.drain_grace, clock)
    service.routing = routing
    for child in replica_services:
        child.setServiceParent(service)
    drain = DrainService(broker, site, clock)
    drain.setName("drain")
    drain.setServiceParent(service)
    timer = TimerService(REAP_INTERVAL, _safe_reap, broker)
    timer.clock = clock
    timer.setName("reap")
    timer.setServiceParent(service)
    listen = ListeningService(endpoint, site, reactor, "--port=%s" % (config.port,), port_number)
    listen.setName("listen")
    listen.setServiceParent(service)
    return service
