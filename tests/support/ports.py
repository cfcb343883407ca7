"""
Loopback ports for servers a test starts in another process (or restarts),
where listening on port 0 and reading the port back is not possible.

Binding to port 0 and closing again (the usual "free port") hands out a
port that nothing holds: the next bind to 0, or the source port of any
outgoing connection, may get the same one, and two of them in a row can be
equal. Here every port stays bound (not listening) by a socket with
C{SO_REUSEADDR} until the test ends. The kernel gives a bound port to
nobody else, while a server that sets C{SO_REUSEADDR} itself (Twisted,
nginx, Go and Python's C{http.server} all do) can still listen on it; a
connection to a reserved port where nothing listens is refused at once.
"""

import socket
from typing import List


class Reservation:
    """Ports held by bound sockets until L{release}."""

    def __init__(self, count: int, interface: str = "127.0.0.1"):
        self._sockets = []
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self._sockets.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((interface, 0))
        except BaseException:
            self.release()
            raise
        self.ports = [s.getsockname()[1] for s in self._sockets]
        # All bound at once, so they cannot repeat; say so if that ever fails.
        assert len(set(self.ports)) == count, self.ports

    def release(self):
        for s in self._sockets:
            s.close()
        self._sockets = []


def reserve_ports(test, count: int) -> List[int]:
    """C{count} distinct loopback ports, held for C{test} until its cleanup."""
    reservation = Reservation(count)
    test.addCleanup(reservation.release)
    return reservation.ports


def reserve_port(test) -> int:
    """One loopback port, held for C{test} until its cleanup."""
    return reserve_ports(test, 1)[0]
