"""
Listening on an endpoint as a Twisted service, for the relay's port and the
admin view's: both open their endpoint the same way, before twistd drops
privileges, and fail start-up with one line. A module of its own so that
the admin view needs nothing else from the server's service.
"""

from typing import List, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.startup import listen_error

log = Logger()


class ListeningService(Service):
    """Listen on an endpoint; log the port; stop listening on stop."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory, reactor, flag: str, port_number=None):
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        # How the operator set the endpoint, and its port, for error messages.
        self.flag = flag
        self.port_number = port_number
        self.port = None
        self._listening: Optional[defer.Deferred] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: List[Failure] = []
        try:
            self._listening = self.endpoint.listen(self.factory)
        except Exception:
            self._listening = defer.fail()
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            # A port in use or a bad address: fail twistd's start-up with
            # one line (see relay.startup) and a non-zero exit.
            self._listening = None
            raise listen_error(failures[0], self.flag, self.port_number) from failures[0].value
        self._listening.addErrback(self._failed)

    def startService(self) -> None:
        if self._listening is None:
            self.privilegedStartService()
        super().startService()

    def _listened(self, port):
        self.port = port
        log.info("Relay server listening", Port=port.getHost().port)
        return port

    def _failed(self, failure):
        log.failure("Cannot listen", failure)
        self.reactor.stop()

    def stopService(self):
        super().stopService()
        if self._listening is None:
            return None
        d, self._listening = self._listening, None
        d.addCallback(lambda port: port.stopListening() if port is not None else None)
        return d
