"""
The admin listener as a child of the relay server's service.

L{attach_admin} turns the view on: it gives the broker its
L{AdminStats} as an observer of its events and adds a
listening service for the admin site. The listener stops last, after the
drain, so that an operator can watch a drain from the view.
"""

from typing import Optional

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.server.admin.stats import AdminStats
from relay.server.admin.web import TokenCheck, admin_site
from relay.server.listening import ListeningService

log = Logger()


def admin_endpoint(port: str) -> str:
    """
    C{8081} -> C{tcp:8081:interface=127.0.0.1}: a bare number binds to
    loopback only, since the view shows backend names, peers and paths;
    an endpoint string goes where it says (behind a token, one hopes).
    """
    text = str(port).strip()
    if text.isdigit():
        return "tcp:%s:interface=127.0.0.1" % (text,)
    return text


class AdminListeningService(ListeningService):
    """Logs its own line: tools watching for C{Relay server listening} must not see a second port."""

    stats: AdminStats  # set by attach_admin

    def _listened(self, port):
        self.port = port
        log.info("Admin view listening", Port=port.getHost().port)
        return port


def attach_admin(
    service,
    reactor,
    endpoint,
    check: Optional[TokenCheck] = None,
    flags: Optional[dict] = None,
    keep_headers: bool = False,
    redact=(),
    clock: Optional[IReactorTime] = None,
    port_flag: str = "--admin_port",
    port_number=None,
    **limits
) -> AdminListeningService:
    """
    Turn the admin view on for C{service} (a L{RelayServerService}).

    @param endpoint: an L{IStreamServerEndpoint}, or a string for
        L{admin_endpoint}.
    @param clock: the statistics' clock; the broker's by default.
    @param limits: C{ring}, C{error_ring}, C{total} for L{AdminStats}.
    """
    broker = service.broker
    if isinstance(endpoint, str):
        endpoint = endpoints.serverFromString(reactor, admin_endpoint(endpoint))
    stats = AdminStats(
        clock if clock is not None else broker.clock, keep_headers=keep_headers, redact=redact, **limits
    )
    broker.add_observer(stats)
    site = admin_site(broker, stats, flags or {}, check if check is not None else TokenCheck(None))
    listen = AdminListeningService(endpoint, site, reactor, port_flag, port_number)
    listen.setName("admin")
    listen.stats = stats
    listen.setServiceParent(service)
    return listen
