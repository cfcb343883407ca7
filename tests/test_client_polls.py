"""
How many long polls the relay client keeps open: C{--num_pending_requests}
when idle, more while requests keep coming (up to C{--max_pending_requests}),
and back to the base once the extra polls come back empty.
"""

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from relay.client.service import RelayClientService
from relay.config import ClientConfig
from relay.proto.http_relay_pb2 import HttpRequest

pytestmark = pytest.mark.memory


class FakeAPI:
    server_name = "robot"

    def __init__(self):
        self.polls = []

    def poll(self):
        d = Deferred()
        self.polls.append(d)
        return d

    def open_polls(self):
        return [d for d in self.polls if not d.called]


class FakeHandler:
    def __init__(self):
        self.handled = []

    def handle(self, request):
        self.handled.append(request.id)
        return succeed(None)


class PollCountTests(unittest.TestCase):
    def start(self, num, most):
        self.api = FakeAPI()
        self.handler = FakeHandler()
        service = RelayClientService(
            None,
            self.api,
            self.handler,
            [],
            ClientConfig(num_pending_requests=num, max_pending_requests=most),
            clock=Clock(),
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def answer(self, request_id=None):
        """The oldest open poll gets a request (or comes back empty)."""
        poll = self.api.open_polls()[0]
        poll.callback(HttpRequest(id=request_id) if request_id else None)

    def test_idle_client_keeps_the_base_number_of_polls(self):
        self.start(num=2, most=8)
        self.assertEqual(len(self.api.open_polls()), 2)
        self.answer(None)  # a 408: polled again, nothing more
        self.assertEqual(len(self.api.open_polls()), 2)

    def test_requests_open_more_polls_up_to_the_maximum(self):
        self.start(num=1, most=3)
        self.answer("robot:1")
        self.assertEqual(len(self.api.open_polls()), 2)
        self.answer("robot:2")
        self.assertEqual(len(self.api.open_polls()), 3)
        self.answer("robot:3")
        self.answer("robot:4")
        self.assertEqual(len(self.api.open_polls()), 3)
        self.assertEqual(self.handler.handled, ["robot:1", "robot:2", "robot:3", "robot:4"])

    def test_extra_polls_close_when_they_come_back_empty(self):
        service = self.start(num=1, most=3)
        self.answer("robot:1")
        self.answer("robot:2")
        self.assertEqual(len(self.api.open_polls()), 3)
        for _ in range(3):
            self.answer(None)
        self.assertEqual(len(self.api.open_polls()), 1)
        self.assertEqual(service.bursts, set())
        self.assertEqual(len(list(service)), 1)

    def test_maximum_below_the_base_means_no_extra_polls(self):
        self.start(num=2, most=0)
        self.answer("robot:1")
        self.assertEqual(len(self.api.open_polls()), 2)

    def test_stop_cancels_every_poll(self):
        service = self.start(num=1, most=4)
        self.answer("robot:1")
        self.answer("robot:2")
        service.stopService()
        self.assertEqual(self.api.open_polls(), [])


class HandedOutTwiceTests(unittest.TestCase):
    """
    A server may hand a request out again when it cannot tell that our
    poll's answer arrived (docs/protocol.md): the backend sees it once.
    """

    def test_a_request_already_in_hand_is_dropped(self):
        api = FakeAPI()
        handled = []
        working = Deferred()  # the backend is still working on it

        class SlowHandler:
            def handle(self, request):
                handled.append(request.id)
                return working

        service = RelayClientService(None, api, SlowHandler(), [], ClientConfig(max_pending_requests=0), clock=Clock())
        service.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(working.callback, None)
        api.open_polls()[0].callback(HttpRequest(id="robot:1"))
        api.open_polls()[0].callback(HttpRequest(id="robot:1"))
        self.assertEqual(handled, ["robot:1"])

    def test_the_same_id_after_the_first_is_over_is_handled(self):
        api = FakeAPI()
        handler = FakeHandler()
        service = RelayClientService(None, api, handler, [], ClientConfig(max_pending_requests=0), clock=Clock())
        service.startService()
        self.addCleanup(service.stopService)
        first = Deferred()
        handler.handle = lambda request: (handler.handled.append(request.id), first)[1]
        api.open_polls()[0].callback(HttpRequest(id="robot:1"))
        first.callback(None)
        api.open_polls()[0].callback(HttpRequest(id="robot:1"))
        self.assertEqual(handler.handled, ["robot:1", "robot:1"])
