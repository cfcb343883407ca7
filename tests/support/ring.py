"""
Which relay name a given replica owns on the ring, for tests that need a
request to land on (or away from) one replica.
"""

from relay.server.ring import Ring


def name_owned_by(peers, owner, usable=lambda peer: True):
    ring = Ring(peers)
    return next(n for n in ("robot-%d" % i for i in range(1000)) if ring.owner(n, usable) == owner)
