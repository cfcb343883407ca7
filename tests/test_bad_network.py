"""
Robots on bad networks (docs/client.md's goals), on real networks: the
relay-client and its backend in a network namespace of their own, our
server in the host's, nftables in between (L{tests.support.badnet}). Every scenario
runs for our relay-client and for the Go relay-client, each in front of our
server, the two side by side in two namespaces: one run per scenario,
shared by the tests of its class, so that the file takes a few minutes.

Users ask for a small answer every 0.25 s and give up after 4 s each;
"back" is the first good answer after the network returns. Here a time
bound belongs in the test: "answers again within 10 s" is what an operator
trying to reach a robot notices. Every wait is bounded.

The tests skip, saying why, where namespaces cannot be made (not root, no
C{ip} or C{nft}, a kernel without them); the Go variants skip without the
Go binaries (C{../shared/reference-go}).
"""

from typing import Dict, List

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.support import badnet

pytestmark = pytest.mark.process

# The bounds.
BACK_WITHIN = 10.0  # after the network returns
RESTART_BACK_WITHIN = 1.0  # after the new server listens
RESTART_LOG_LINES = 2  # per relay-client, for the whole restart
GO_RESTART_BACK_WITHIN = 5.0  # the Go relay-client's own retry wait, and 1 s
# A request's answer comes within --inactive_request_timeout; the second
# is for the scheduling of the harness itself.
ANSWER_SLACK = 1.0
SILENCE = 5.0  # before a NAT rebinding
PARTITION = 60.0
LOSS_PERCENT = 5

OURS = "our relay-client"
GO = "Go relay-client"


class _Shared:
    """One side-by-side run, awaited by every test of its class, whichever runs first."""

    runs: Dict[str, "_Shared"] = {}

    def __init__(self, scenario: str, options: dict):
        self.outcome: List[object] = []
        self.waiting: List[defer.Deferred] = []
        pairs, labels, results = [], [], {}
        for label, client in ((OURS, badnet.OURS), (GO, badnet.GO)):
            try:
                pairs.append(badnet.Pair(badnet.OURS, client))
                labels.append(label)
            except badnet.Unavailable:
                results[label] = Failure()
        d = badnet.side_by_side(pairs, scenario, **options)
        d.addCallback(lambda found: dict(results, **dict(zip(labels, found))))
        d.addBoth(self._done)

    def _done(self, result) -> None:
        self.outcome.append(result)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(result)

    @classmethod
    def wait(cls, scenario: str, options: dict) -> defer.Deferred:
        shared = cls.runs.get(scenario)
        if shared is None:
            shared = cls.runs[scenario] = cls(scenario, options)
        if shared.outcome:
            return defer.succeed(shared.outcome[0])
        d = defer.Deferred()
        shared.waiting.append(d)
        return d


class ScenarioCase(unittest.TestCase):
    scenario = ""
    options: dict = {}
    # The first test of a class waits for both pairs' whole run.
    timeout = 200

    def setUp(self):
        reason = badnet.unavailable()
        if reason:
            raise unittest.SkipTest(reason)

    @defer.inlineCallbacks
    def result(self, label: str):
        results = yield _Shared.wait(self.scenario, self.options)
        found = results[label]
        if isinstance(found, Failure):
            found.raiseException()
        return found

    def assertBack(self, result: badnet.Result, within: float = BACK_WITHIN, since: str = "the network returned"):
        self.assertIsNotNone(
            result.back, "%s: no answer in the %.0f s after %s" % (result.pair, result.waited, since)
        )
        self.assertLessEqual(
            result.back, within, "%s: back %.1f s after %s (goal: %g s)" % (result.pair, result.back, since, within)
        )

    def assertNothingLost(self, result: badnet.Result, robot_must_return: bool,
                          timeout: float = badnet.INACTIVE_REQUEST_TIMEOUT):
        """
        Every request sent around the outage has its answer (the backend's,
        or an error status) within --inactive_request_timeout; the first,
        whose poll answer went to a connection that died, has the backend's
        if the robot is back in that time (which C{robot_must_return} makes
        a goal too).
        """
        self.assertTrue(result.patient)
        for n, outcome in enumerate(result.patient):
            self.assertTrue(
                outcome.answered and outcome.finished - outcome.sent <= timeout + ANSWER_SLACK,
                "%s: request %d sent %.1f s into the outage: %s (--inactive_request_timeout=%gs)"
                % (result.pair, n + 1, badnet.PATIENT_OFFSETS[n], outcome.describe(), timeout),
            )
        first = result.patient[0]
        if robot_must_return:
            self.assertBack(result)
        if result.back is not None and result.returned + result.back < first.sent + timeout - ANSWER_SLACK:
            self.assertTrue(
                first.ok,
                "%s: the robot was back %.1f s after the network, but the request whose poll answer never "
                "reached it got %s" % (result.pair, result.back, first.describe()),
            )


class NatRebinding(ScenarioCase):
    """
    5 s of silence, then new connections work and every packet of a
    connection opened before is dropped for good: a NAT that forgot its
    mappings, a move from Wi-Fi to LTE.
    """

    scenario = "nat_rebinding"
    options = {"silence": SILENCE, "wait": BACK_WITHIN + 2}

    @defer.inlineCallbacks
    def test_our_relay_client_is_back_within_10s(self):
        self.assertBack((yield self.result(OURS)))

    @defer.inlineCallbacks
    def test_go_relay_client_is_not_back_within_the_goal(self):
        """
        The goal is our relay-client's; the Go binary cannot be changed.
        The Go relay-client gets out of a NAT rebinding only by its own
        timeouts (about two minutes), long after this test stops waiting, so
        what is asserted is that it is not back sooner: which also shows
        that the harness's rebinding is real (one that let old connections
        through would bring it back at once).
        """
        result = yield self.result(GO)
        self.assertIsNone(result.back, "%s: %s" % (result.pair, result.back_text()))

    @defer.inlineCallbacks
    def test_nothing_lost_in_silence_our_relay_client(self):
        # The goal above brings the robot back in time, so the first
        # request must have the backend's answer.
        self.assertNothingLost((yield self.result(OURS)), robot_must_return=True)

    @defer.inlineCallbacks
    def test_nothing_lost_in_silence_go_relay_client(self):
        """The server's part: answers within the timeout, whatever the relay-client does."""
        self.assertNothingLost((yield self.result(GO)), robot_must_return=False)


class Partition(ScenarioCase):
    """A dead zone: nothing passes for 60 s, then everything does again."""

    scenario = "partition"
    options = {"silence": PARTITION, "wait": BACK_WITHIN + 2}

    @defer.inlineCallbacks
    def test_our_relay_client_is_back_within_10s(self):
        self.assertBack((yield self.result(OURS)))

    @defer.inlineCallbacks
    def test_go_relay_client_is_back_within_10s(self):
        self.assertBack((yield self.result(GO)))


class Loss(ScenarioCase):
    """5% of the packets lost both ways, for the whole run."""

    scenario = "loss"
    options = {"percent": LOSS_PERCENT}

    def assertUnharmed(self, result: badnet.Result):
        failed = [o.describe() for o in result.sequential if not o.ok]
        self.assertEqual(
            (len(result.sequential), failed),
            (100, []),
            "%s: small requests that failed (%s)" % (result.pair, "; ".join(result.notes)),
        )
        self.assertEqual(
            result.download_verdict,
            "intact",
            "%s: the 20 MiB download: %s" % (result.pair, result.download.describe()),
        )

    @defer.inlineCallbacks
    def test_our_relay_client_answers_every_request_and_the_download_is_intact(self):
        self.assertUnharmed((yield self.result(OURS)))

    @defer.inlineCallbacks
    def test_go_relay_client_answers_every_request_and_the_download_is_intact(self):
        self.assertUnharmed((yield self.result(GO)))


class Flapping(ScenarioCase):
    """
    The link down 3 s, up 3 s, ten times, during a 20 MiB download over a
    slow uplink: the download is intact or an error the user sees, never a
    short body that ends as if complete, and the robot answers again soon.
    """

    scenario = "flapping"

    def assertHonest(self, result: badnet.Result):
        self.assertIn(
            result.download_verdict,
            ("intact", "error"),
            "%s: the download: %s (%s)" % (result.pair, result.download_verdict, result.download.describe()),
        )
        self.assertBack(result, since="the link settled")

    @defer.inlineCallbacks
    def test_our_relay_client_download_is_honest_and_it_is_back_within_10s(self):
        self.assertHonest((yield self.result(OURS)))

    @defer.inlineCallbacks
    def test_go_relay_client_download_is_honest_and_it_is_back_within_10s(self):
        self.assertHonest((yield self.result(GO)))


class ServerRestart(ScenarioCase):
    """SIGTERM to the server; a new one on the same port 2 s after it has gone."""

    scenario = "server_restart"
    options = {"gap": 2.0, "wait": BACK_WITHIN + 2}

    def assertQuickAndQuiet(self, result: badnet.Result, within: float = RESTART_BACK_WITHIN):
        self.assertBack(result, within=within, since="the new server listened")
        self.assertLessEqual(
            len(result.client_lines),
            RESTART_LOG_LINES,
            "%s: %d log lines for one restart:\n%s"
            % (result.pair, len(result.client_lines), "\n".join(result.client_lines)),
        )

    @defer.inlineCallbacks
    def test_our_relay_client_is_back_within_1s_with_at_most_2_log_lines(self):
        self.assertQuickAndQuiet((yield self.result(OURS)))

    @defer.inlineCallbacks
    def test_go_relay_client_is_back_within_its_retry_with_at_most_2_log_lines(self):
        """
        The Go relay-client's wait between tries is its own: after a refused
        connection it tries again up to about 4 s later (measured), so it
        is back within 1 s of the new server only when its timer happens to
        fall right. What our server controls is asserted: it is back as
        soon as that wait allows, and quietly.
        """
        self.assertQuickAndQuiet((yield self.result(GO)), within=GO_RESTART_BACK_WITHIN)
