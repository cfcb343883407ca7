"""
Which replica owns a backend name: nginx's consistent hash, computed here.

Several replicas act as one relay only if a user's request for a name and
the relay-client polling for it meet in one process (docs/scaling.md). The
ingress routes most calls by name with nginx's C{hash $name consistent};
the replicas forward what reaches the wrong one, and they must agree with
nginx on the owner, or every call would take two hops. So this is nginx's
own ring (C{ngx_http_upstream_init_chash}), not a ring of our design: per
server, 160 points per unit of weight, each the CRC32 of the server's host,
a NUL byte, its port and the previous point's four bytes (little-endian); a
key belongs to the first point at or after its CRC32, wrapping around. When
the owner is down, nginx moves on to the next points until it finds a server
it may use, and so does L{Ring.owner}.

Servers are given as written in nginx's C{upstream} block (C{host:port},
C{unix:/path}), since that text, not the resolved address, is what is
hashed.
"""

import bisect
import struct
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

POINTS_PER_WEIGHT = 160


def _host_and_port(server: str) -> Tuple[bytes, bytes]:
    """Split as nginx does: a trailing C{:digits} is the port, else none."""
    raw = server.encode("utf-8")
    if raw[:5].lower() == b"unix:":
        return raw[5:], b""
    for j in range(len(raw)):
        c = raw[len(raw) - j - 1 : len(raw) - j]
        if c == b":":
            return raw[: len(raw) - j - 1], raw[len(raw) - j :]
        if not b"0" <= c <= b"9":
            break
    return raw, b""


class Ring:
    """The owners of keys among C{servers}, as nginx's C{hash … consistent}."""

    def __init__(self, servers: Sequence[str], weights: Optional[Sequence[int]] = None):
        if not servers:
            raise ValueError("a ring needs at least one server")
        self.servers = list(servers)
        points: List[Tuple[int, int]] = []
        for index, server in enumerate(self.servers):
            host, port = _host_and_port(server)
            base = zlib.crc32(host + b"\0" + port)
            previous = 0
            for _ in range(POINTS_PER_WEIGHT * (weights[index] if weights else 1)):
                point = zlib.crc32(struct.pack("<I", previous), base)
                points.append((point, index))
                previous = point
        points.sort()
        # nginx keeps one point per hash value; collisions between servers
        # are a 1 in 2**32 event per pair of points.
        self._hashes: List[int] = []
        self._owners: List[int] = []
        for point, index in points:
            if self._hashes and self._hashes[-1] == point:
                continue
            self._hashes.append(point)
            self._owners.append(index)

    def owner(self, key: str, usable: Callable[[str], bool] = lambda server: True) -> Optional[str]:
        """
        The server for C{key}: the first point at or after its hash whose
        server is C{usable}, as nginx tries the next points when one is
        down. None when no server is usable.
        """
        start = bisect.bisect_left(self._hashes, zlib.crc32(key.encode("utf-8")))
        count = len(self._hashes)
        tried = set()
        for step in range(count):
            index = self._owners[(start + step) % count]
            if index in tried:
                continue
            server = self.servers[index]
            if usable(server):
                return server
            tried.add(index)
            if len(tried) == len(self.servers):
                break
        return None
