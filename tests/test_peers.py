"""
The replicas' view of which peers are up (relay/server/peers.py): two failed checks
in a row take a peer out of the ring, one success brings it back, and a
check never hangs or piles up.
"""

import pytest
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from relay.server.peers import CHECK_TIMEOUT, PeerHealth, healthz_probe
from relay.server.ring import Ring


@pytest.mark.memory
class PeerHealthTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.answers = {}
        self.asked = []

        def probe(peer):
            self.asked.append(peer)
            answer = self.answers.get(peer, True)
            return answer if isinstance(answer, Deferred) else succeed(answer)

        self.health = PeerHealth(["a:1", "b:1", "c:1"], "a:1", probe)

    def test_peers_start_usable_and_itself_is_never_checked(self):
        self.assertTrue(all(self.health.usable(p) for p in ("a:1", "b:1", "c:1")))
        self.health.check()
        self.assertEqual(sorted(self.asked), ["b:1", "c:1"])

    def test_two_failed_checks_in_a_row_take_a_peer_out(self):
        self.answers["b:1"] = False
        self.health.check()
        self.assertTrue(self.health.usable("b:1"))
        self.health.check()
        self.assertFalse(self.health.usable("b:1"))
        self.assertTrue(self.health.usable("c:1"))

    def test_one_success_brings_it_back(self):
        self.answers["b:1"] = False
        self.health.check()
        self.health.check()
        self.answers["b:1"] = True
        self.health.check()
        self.assertTrue(self.health.usable("b:1"))

    def test_a_failure_between_successes_does_not_count(self):
        for answer in (False, True, False, True):
            self.answers["b:1"] = answer
            self.health.check()
        self.assertTrue(self.health.usable("b:1"))

    def test_a_probe_that_raises_is_a_failed_check(self):
        self.answers["b:1"] = defer.fail(RuntimeError("boom"))
        self.successResultOf(self.health.check())
        self.answers["b:1"] = defer.fail(RuntimeError("boom"))
        self.successResultOf(self.health.check())
        self.assertFalse(self.health.usable("b:1"))

    def test_a_slow_round_is_not_doubled(self):
        slow = self.answers["b:1"] = Deferred()
        self.health.check()
        self.health.check()
        self.assertEqual(self.asked.count("b:1"), 1)
        slow.callback(True)
        self.health.check()
        self.assertEqual(self.asked.count("b:1"), 2)

    def test_a_peer_out_moves_its_names_on_the_ring(self):
        ring = Ring(["a:1", "b:1", "c:1"])
        names = [n for n in ("robot-%d" % i for i in range(100)) if ring.owner(n) == "b:1"]
        self.assertTrue(names)
        self.answers["b:1"] = False
        self.health.check()
        self.health.check()
        for name in names:
            self.assertIn(ring.owner(name, self.health.usable), ("a:1", "c:1"))

    def test_unknown_peer_is_not_usable(self):
        self.assertFalse(self.health.usable("z:1"))


class Healthz(Resource):
    isLeaf = True

    def __init__(self, code):
        super().__init__()
        self.code = code

    def render_GET(self, request):
        request.setResponseCode(self.code)
        return b"ok"


@pytest.mark.socket
class ProbeTests(unittest.TestCase):
    """The probe against real loopback servers."""

    def listen(self, code):
        port = reactor.listenTCP(0, Site(Healthz(code)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return "127.0.0.1:%d" % port.getHost().port

    @defer.inlineCallbacks
    def test_200_is_up_anything_else_down(self):
        probe = healthz_probe(reactor)
        self.assertIs((yield probe(self.listen(200))), True)
        self.assertIs((yield probe(self.listen(503))), False)

    @defer.inlineCallbacks
    def test_refused_is_down(self):
        port = reactor.listenTCP(0, Site(Healthz(200)), interface="127.0.0.1")
        address = "127.0.0.1:%d" % port.getHost().port
        yield port.stopListening()
        self.assertIs((yield healthz_probe(reactor)(address)), False)


@pytest.mark.memory
class ProbeTimeoutTests(unittest.SynchronousTestCase):
    def test_no_answer_is_down_after_the_timeout(self):
        clock = MemoryReactorClock()
        d = healthz_probe(clock)("10.0.0.1:80")
        self.assertNoResult(d)
        clock.advance(CHECK_TIMEOUT)
        self.assertIs(self.successResultOf(d), False)
