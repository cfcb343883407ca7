"""
The relay client as a Twisted service: C{num_pending_requests} poll loops
and the requests they picked up, with a clean stop.

Each loop keeps one long poll open; a request it receives is handled
concurrently while the loop polls again at once. When the relay cannot be
reached (connection refused, 5xx, a dead connection, a timeout) the loops
wait a moment and try again on a new connection, as
L{relay.client.reachability} says, which also logs the loss and the
return. A 403 means our credentials are not accepted; retrying cannot fix
that, so the client logs it and exits non-zero, for its supervisor to
restart it with fresh ones (as the Go client does).

On stop (SIGTERM) the polls are cancelled at once; requests in flight get a
few seconds to finish, then their backend connections are closed.
"""

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Set, Union

from twisted.application.service import MultiService, Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.client.backend import Backend, BackendTarget
from relay.client.handler import RequestHandler
from relay.client.keepalive import KeepAliveAgent
from relay.client.reachability import Reachability
from relay.client.relay_api import Forbidden, RelayAPI
from relay.client.upgrade import Upgrader
from relay.config import ClientConfig
from relay.logs import LogsThroughObserver
from relay.outbound import CONNECT_TIMEOUT, IDLE_CONNECTION_TIMEOUT
from relay.outbound.endpoints import CachingEndpointFactory
from relay.outbound.h2 import H2Backend
from relay.outbound.tls import TrustPolicy

if TYPE_CHECKING:
    from relay.tracing import TracingPlan

log = Logger()

STOP_GRACE_PERIOD = 5.0


class PollLoop(Service):
    """
    One long poll at a time, forever; or, for a burst loop, until a poll
    comes back empty (or fails).
    """

    def __init__(self, client: "RelayClientService", number: int, burst: bool = False):
        self.client = client
        self.number = number
        self.burst = burst
        self._running: Optional[Deferred] = None

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._loop())

    def stopService(self):
        super().stopService()
        d, self._running = self._running, None
        if d is not None:
            d.cancel()
        return None

    async def _loop(self) -> None:
        client = self.client
        if not self.burst:
            log.info("Starting to relay server request loop", ServerName=client.api.server_name)
        try:
            while self.running:
                try:
                    request = await client.api.poll()
                except Forbidden as e:
                    client.fatal("failed to authenticate to cloud-api, restarting: %s" % (e,))
                    return
                except CancelledError:
                    return
                except Exception as e:
                    if not self.running or self.burst:
                        return
                    delay = client.reachability.failed(str(e))
                    await task.deferLater(client.clock, delay, lambda: None)
                    continue
                client.reachability.reached()
                if request is None:
                    if self.burst:
                        return
                    continue
                client.dispatch(request)
        except CancelledError:
            return
        finally:
            if self.burst:
                self._running = None
                client.burst_ended(self)


class RelayClientService(LogsThroughObserver, MultiService):
    """
    The whole client. When twistd runs it, it also tells twistd to log
    through our JSON (or text) observer, as the relay server does.

    @param on_fatal: called with a message when the client cannot go on
        (403 from the relay); twistd's version stops the reactor and exits 1.
    """

    tracing_plan: "TracingPlan"  # set by makeService (relay.client.tap)

    def __init__(
        self,
        reactor,
        api: RelayAPI,
        handler: RequestHandler,
        pools: List,  # whatever keeps connections: closeCachedConnections() at stop
        config: ClientConfig,
        on_fatal: Optional[Callable[[str], None]] = None,
        log_observer=None,
        stop_grace_period: float = STOP_GRACE_PERIOD,
        clock: Optional[IReactorTime] = None,
        relay_pool=None,
    ):
        super().__init__()
        # The relay server's idle connections (a KeepAliveAgent), dropped
        # when the server is lost.
        self.relay_pool = relay_pool
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.api = api
        self.handler = handler
        self.pools = pools
        self.on_fatal = on_fatal
        self.log_observer = log_observer
        self.stop_grace_period = stop_grace_period
        # The requests in flight, by id.
        self.in_flight: Dict[str, Deferred] = {}
        self.fatal_error: Optional[str] = None
        self.reachability = Reachability(self.clock, self._drop_relay_connections)
        self.num_pending_requests = config.num_pending_requests
        self.max_pending_requests = max(config.num_pending_requests, config.max_pending_requests)
        self.bursts: Set[PollLoop] = set()
        for i in range(config.num_pending_requests):
            PollLoop(self, i).setServiceParent(self)

    def dispatch(self, request) -> None:
        if request.id in self.in_flight:
            # Handed out again by a server that could not tell that we had
            # it (docs/protocol.md, "When a relay-client's connection
            # dies"): the backend must not see it twice.
            log.debug("Dropping a request already in hand", ID=request.id)
            return
        d = self.handler.handle(request)
        if not d.called:
            self.in_flight[request.id] = d

            def done(result, request_id=request.id):
                self.in_flight.pop(request_id, None)
                return result

            d.addBoth(done)
        self._burst()  # after the backend request is on its way

    def _burst(self) -> None:
        """
        A request came: while they keep coming, poll more at once, up to
        C{max_pending_requests}. With one poll, requests queued on the relay
        server come one per round trip (a poll, its answer, the next poll);
        more polls take several per round trip. A burst poll ends when it
        comes back empty, so an idle client is back to
        C{num_pending_requests} polls after one poll timeout.
        """
        if not self.running or self.num_pending_requests + len(self.bursts) >= self.max_pending_requests:
            return
        loop = PollLoop(self, self.num_pending_requests + len(self.bursts), burst=True)
        self.bursts.add(loop)
        loop.setServiceParent(self)

    def burst_ended(self, loop: PollLoop) -> None:
        self.bursts.discard(loop)
        if loop.parent is self:
            loop.disownServiceParent()

    def _drop_relay_connections(self) -> None:
        """The relay server is lost: its idle connections are suspect too (see L{Reachability})."""
        if self.relay_pool is not None:
            self.relay_pool.closeCachedConnections()

    def fatal(self, message: str) -> None:
        if self.fatal_error is not None:
            return
        self.fatal_error = message
        log.critical(message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def stopService(self):
        super().stopService()  # cancels the polls
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        if self.in_flight:
            log.info("Waiting for in-flight requests", Count=len(self.in_flight), Timeout=self.stop_grace_period)
            waiting = DeferredList(list(self.in_flight.values()), consumeErrors=True)
            timer = self.clock.callLater(self.stop_grace_period, waiting.cancel)
            try:
                await waiting
            except CancelledError:
                pass
            if timer.active():
                timer.cancel()
            if self.in_flight:
                log.warn("Aborting in-flight requests", Count=len(self.in_flight))
                for d in list(self.in_flight.values()):
                    d.cancel()
        for pool in self.pools:
            await pool.closeCachedConnections()


def make_client_service(
    reactor,
    config: ClientConfig,
    trust_root=None,
    on_fatal: Optional[Callable[[str], None]] = None,
    log_observer=None,
    stop_grace_period: float = STOP_GRACE_PERIOD,
    clock: Optional[IReactorTime] = None,
) -> RelayClientService:
    """
    The relay client as C{config} says. With C{config.force_http2}, plain
    requests go to the backend over HTTP/2 (h2c for C{http}, ALPN for
    C{https}), as gRPC backends need; upgrades always use HTTP/1.1.

    @param trust_root: the certificates of C{config.root_ca_file}, loaded
        (the options load them to refuse a bad file at start-up).
    @param clock: drives the protocol's timers (chunking, keep-alives,
        back-off, timeouts); the reactor by default, a L{Clock} in tests that
        step through them while real sockets carry the traffic.
    """
    clock = clock if clock is not None else reactor
    # The relay is verified against the system's CAs; --root_ca_file is for
    # the backend, as in the Go client.
    # A connect that gets no answer is given up after the dead-connection
    # timeout too, so that a SYN lost while the network was away is sent
    # again at once by a new attempt, not after the kernel's doubling waits.
    relay_agent = KeepAliveAgent(
        reactor,
        CachingEndpointFactory(
            reactor,
            connect_timeout=config.dead_connection_timeout or CONNECT_TIMEOUT,
            liveness=(config.tcp_keepalive_interval, config.dead_connection_timeout),
        ),
        config.max_idle_conns_per_host,
        IDLE_CONNECTION_TIMEOUT,
        config.http1_engine,
    )
    api = RelayAPI(relay_agent, clock, config.relay_url, config.server_name, token_file=config.relay_token_file)
    target = BackendTarget(config)
    policy = TrustPolicy(trust_root)
    backend: Union[Backend, H2Backend]
    if config.force_http2:
        backend = H2Backend(reactor, policy)
    else:
        backend = Backend(
            reactor, target, policy, config.max_idle_conns_per_host, IDLE_CONNECTION_TIMEOUT, config.http1_engine
        )
    handler = RequestHandler(clock, api, target, backend, Upgrader(reactor, policy), config.max_chunk_size)
    handler.trace = config.debug_logs
    return RelayClientService(
        reactor,
        api,
        handler,
        [relay_agent, backend],
        config,
        on_fatal=on_fatal,
        log_observer=log_observer,
        stop_grace_period=stop_grace_period,
        clock=clock,
        relay_pool=relay_agent,
    )
