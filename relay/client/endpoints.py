"""
Endpoints for the client's HTTP agents, made once per (scheme, host, port).

Agent's default endpoint factory builds a new HostnameEndpoint for every
request, even when a pooled connection is then reused, and each one
IDNA-encodes the host name again: a tenth of the client's time on small
requests. The relay client only ever talks to one relay and one backend, so
it keeps the few endpoints it needs (for L{relay.client.keepalive}, or any
Agent), and gives their connections the settings of
L{relay.transport_tuning} (send limit, TCP_NODELAY).
"""

from typing import Dict, Tuple

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relay.transport_tuning import tune


@implementer(IStreamClientEndpoint)
class TunedEndpoint:
    """An endpoint whose connections get L{tune}d once connected."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def connect(self, factory):
        return self.endpoint.connect(factory).addCallback(self._tune)

    @staticmethod
    def _tune(protocol):
        tune(getattr(protocol, "transport", None))
        return protocol


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    def __init__(self, reactor, tls_policy=None, connect_timeout: float = 30):
        self.reactor = reactor
        self.tls_policy = tls_policy
        self.connect_timeout = connect_timeout
        self._endpoints: Dict[Tuple[bytes, bytes, int], object] = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.connect_timeout)
            if uri.scheme == b"https":
                if self.tls_policy is None:
                    from twisted.web.client import BrowserLikePolicyForHTTPS

                    self.tls_policy = BrowserLikePolicyForHTTPS()
                endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                from twisted.web.error import SchemeNotSupported

                raise SchemeNotSupported("Unsupported scheme: %r" % (uri.scheme,))
            endpoint = TunedEndpoint(endpoint)
            if len(self._endpoints) < 64:
                self._endpoints[key] = endpoint
        return endpoint
