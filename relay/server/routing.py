"""
Which replica handles a call: this one, or the peer it is forwarded to.

With several replicas (docs/scaling.md) a user's request for a name and the
relay-client polling for it must meet in one process. The ingress hashes
most calls onto the name's owner; what reaches another replica is passed
on here, by two rules:

  - calls that carry a backend name (user requests, polls) go to the
    name's owner on nginx's ring (L{relay.server.ring}), skipping peers
    that fail their health checks (L{relay.server.peers});
  - calls that carry a request id (response POSTs, request-stream pulls) go
    to the replica that issued the id (L{issuing_replica}): the pending
    request lives there, even when the ring has changed since.

A call another replica already forwarded is always handled here, whatever
this replica's view of the ring, so that two replicas that disagree for a
moment cannot bounce it between them.

The peer list and this replica's place in it are checked once, at start-up
(L{replica_list}, L{find_self}): every replica must hold the same list, in
the same order, since an id names its issuer by its index there.
"""

import socket
from typing import Callable, List, Optional, Sequence

from relay.outbound.address import split_host_port
from relay.server.forward import forwarded
from relay.server.ids import issuing_replica
from relay.server.ring import Ring

# An id's issuer is one byte.
MAX_REPLICAS = 256


def replica_list(text: str) -> List[str]:
    """
    The C{host:port} entries of C{--peers}, in order.

    @raise ValueError: an entry without a port, a duplicate, or more than
        L{MAX_REPLICAS} entries.
    """
    peers = [entry.strip() for entry in text.split(",")]
    for entry in peers:
        try:
            host, _ = split_host_port(entry)
        except ValueError:
            host = ""
        if not host:
            raise ValueError("%r is not host:port; list every replica as the ingress's upstream block does" % (entry,))
    seen = set()
    for entry in peers:
        if entry in seen:
            raise ValueError("%s is listed twice; each replica once" % (entry,))
        seen.add(entry)
    if len(peers) > MAX_REPLICAS:
        raise ValueError("%d replicas; at most %d" % (len(peers), MAX_REPLICAS))
    return peers


def find_self(peers: Sequence[str], peer_self: str, hostname: str) -> str:
    """
    Which entry of C{peers} this replica is: C{peer_self} when given, else
    the one whose host is the hostname's first label (a StatefulSet pod
    C{relay-2} is C{relay-2:80} or C{relay-2.relay:80}).

    @raise ValueError: C{peer_self} not in the list, or the hostname matches
        no entry or several.
    """
    if peer_self:
        if peer_self not in peers:
            raise ValueError("not one of --peers; spell it as it is spelled there")
        return peer_self
    label = hostname.split(".")[0]
    matches = [
        peer for peer in peers if label and (_host(peer) == label or _host(peer).startswith(label + "."))
    ]
    if len(matches) != 1:
        found = "no entry" if not matches else "%d entries" % (len(matches),)
        raise ValueError(
            "cannot tell which entry is this replica: the hostname %s matches %s; set --peer_self"
            % (hostname, found)
        )
    return matches[0]


def _host(peer: str) -> str:
    return split_host_port(peer)[0]


def local_hostname() -> str:
    return socket.gethostname()


class Routing:
    """
    This replica among its peers: where a call goes, and how it gets there.

    @param usable: whether a peer passes its health checks (L{PeerHealth.usable}).
    @param forward: C{forward(request, peer)} for plain calls (L{Forwarder.forward}).
    @param forward_upgrade: the same for upgrade requests, which need a
        connection of their own (L{relay.server.splice}).
    """

    def __init__(
        self,
        peers: Sequence[str],
        myself: str,
        usable: Callable[[str], bool],
        forward: Callable,
        forward_upgrade: Callable,
    ):
        self.peers = list(peers)
        self.myself = myself
        self.index = self.peers.index(myself)
        self.ring = Ring(self.peers)
        self.usable = usable
        self._forward = forward
        self._forward_upgrade = forward_upgrade

    def owner(self, request, name: str, leaving: bool = False) -> Optional[str]:
        """
        The peer a call about C{name} goes to; None: handle it here. While
        this replica is C{leaving} (draining before a stop) it passes new
        calls on to the owner the ring has without it, as the ingress will
        once its port closes; with no peer left it keeps them.
        """
        if forwarded(request):
            return None
        peer = self.ring.owner(name, self._usable_without_me if leaving else self.usable)
        return None if peer is None or peer == self.myself else peer

    def _usable_without_me(self, peer: str) -> bool:
        return peer != self.myself and self.usable(peer)

    def issuer(self, request, request_id: str) -> Optional[str]:
        """The peer a call about C{request_id} goes to; None: handle it here."""
        if forwarded(request):
            return None
        index = issuing_replica(request_id)
        if index is None or index >= len(self.peers) or index == self.index:
            return None
        peer = self.peers[index]
        # An issuer that is down took its pending requests with it: here the
        # id is unknown, and the relay-client's 400 tells it to stop.
        return peer if self.usable(peer) else None

    def forward(self, request, peer: str, upgrade: bool = False):
        """Answer C{request} with C{peer}'s answer; NOT_DONE_YET."""
        if upgrade and hasattr(request.channel, "switch_protocol"):
            return self._forward_upgrade(request, peer)
        return self._forward(request, peer)
