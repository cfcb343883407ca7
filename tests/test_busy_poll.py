"""
Busy polling (C{--busy_poll_us}): a blocking poll first polls without
blocking for a while and returns events as soon as there are some; it
never changes what the reactor sees, only when it sleeps.
"""

import os

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial import unittest

from relay.tuning.busy_poll import SpinningPoller, install

pytestmark = pytest.mark.memory


class FakePoller:
    """Answers C{poll} from a script of event lists; records each call."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []
        self.registered = []

    def poll(self, timeout=-1, maxevents=-1):
        self.calls.append(timeout)
        return self.script.pop(0) if self.script else []

    def register(self, fd, mask):
        self.registered.append((fd, mask))


class FakeTime:
    def __init__(self, step):
        self.now = 100.0
        self.step = step
        self.pauses = 0

    def __call__(self):
        self.now += self.step
        return self.now

    def pause(self):
        self.pauses += 1


class SpinningPollerTests(unittest.TestCase):
    def poller(self, script, spin=0.0003, step=0.0001):
        self.fake = FakePoller(script)
        self.time = FakeTime(step)
        return SpinningPoller(self.fake, spin, now=self.time, pause=self.time.pause)

    def test_events_found_while_spinning_return_at_once(self):
        poller = self.poller([[], [(5, 1)]])
        self.assertEqual(poller.poll(10.0, 8), [(5, 1)])
        self.assertEqual(self.fake.calls, [0, 0])
        self.assertEqual(self.time.pauses, 1)

    def test_sleeps_for_the_rest_of_the_timeout_after_spinning(self):
        poller = self.poller([[], [], [], [(7, 4)]])
        self.assertEqual(poller.poll(2.0, 8), [(7, 4)])
        # Three empty non-blocking polls span the 300 us, then one blocking one.
        self.assertEqual(self.fake.calls[:-1], [0, 0, 0])
        self.assertAlmostEqual(self.fake.calls[-1], 2.0 - 0.0003)

    def test_no_timeout_means_sleep_until_events(self):
        poller = self.poller([])
        poller.poll(-1, 8)
        self.assertEqual(self.fake.calls[-1], -1)

    def test_non_blocking_poll_does_not_spin(self):
        poller = self.poller([])
        self.assertEqual(poller.poll(0, 8), [])
        self.assertEqual(self.fake.calls, [0])
        self.assertEqual(self.time.pauses, 0)

    def test_everything_else_is_the_wrapped_pollers(self):
        poller = self.poller([])
        poller.register(3, 1)
        self.assertEqual(self.fake.registered, [(3, 1)])


class InstallTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        self.log = Logger(observer=self.events.append)

    def test_real_epoll_reactor_polls_and_dispatches(self):
        try:
            from twisted.internet.epollreactor import EPollReactor
        except ImportError:
            raise unittest.SkipTest("no epoll here") from None
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertTrue(install(reactor, 300, self.log))
        self.assertIsInstance(reactor._poller, SpinningPoller)
        self.assertEqual(self.events[-1]["BusyPollMicroseconds"], 300)

        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        self.addCleanup(os.close, write_fd)
        got = []

        class Reader:
            def fileno(self):
                return read_fd

            def doRead(self):
                got.append(os.read(read_fd, 100))

            def logPrefix(self):
                return "reader"

            def connectionLost(self, reason):
                pass

        reader = Reader()
        reactor.addReader(reader)
        self.addCleanup(reactor.removeReader, reader)
        os.write(write_fd, b"ping")
        reactor.doIteration(5.0)
        self.assertEqual(got, [b"ping"])

    def test_zero_is_off(self):
        reactor = MemoryReactorClock()
        self.assertFalse(install(reactor, 0, self.log))
        self.assertEqual(self.events, [])

    def test_other_reactors_are_left_alone_with_a_warning(self):
        reactor = MemoryReactorClock()
        self.assertFalse(install(reactor, 300, self.log))
        self.assertFalse(hasattr(reactor, "_poller"))
        self.assertIn("needs the epoll reactor", self.events[0]["log_format"])
