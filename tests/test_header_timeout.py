"""
The slowloris guard (C{--header_timeout}) on one HTTP/1.1 connection, with
the site's clock in hand: a client gets that long to send each request's
headers, counted from the connection's start or from the end of the
previous answer, and never while its own request is being answered (a
long poll may take 30 s).
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relay.config import ServerConfig
from relay.server.site import RelaySite
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.memory

TIMEOUT = 30.0


class _Held(Resource):
    """Answers C{/fast} at once and holds C{/slow} until the test answers it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.held = []

    def render(self, request):
        if request.path == b"/slow":
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok"


class HeaderTimeoutTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.resource = _Held()
        site = RelaySite(self.resource, ServerConfig(header_timeout=TIMEOUT), reactor=self.clock)
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def request(self, path: bytes, complete: bool = True) -> None:
        head = b"GET %s HTTP/1.1\r\nHost: relay\r\n" % (path,)
        self.channel.dataReceived(head + (b"\r\n" if complete else b""))

    def test_a_silent_connection_is_cut_off(self):
        self.clock.advance(TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_the_time_counts_from_the_end_of_the_previous_answer(self):
        self.clock.advance(20)
        self.request(b"/fast")
        self.assertIn(b"200 OK", self.transport.value())
        # Past the first deadline, inside the one the answer started.
        self.clock.advance(TIMEOUT - 5)
        self.request(b"/fast", complete=False)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(4.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_a_request_being_answered_is_not_timed(self):
        self.request(b"/slow")
        self.clock.advance(3 * TIMEOUT)
        self.assertFalse(self.transport.disconnecting)
        (held,) = self.resource.held
        held.write(b"done")
        held.finish()
        self.clock.advance(TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_no_timer_is_left_behind(self):
        self.request(b"/fast")
        self.channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
