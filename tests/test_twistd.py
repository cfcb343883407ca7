"""
The real C{twistd -n relay} process: found by its log line, answering a
relay-client, stopped cleanly by SIGTERM.
"""

import json

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.process import TwistdProcess


class TwistdSmokeTest(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_start_poll_and_sigterm(self):
        proc = TwistdProcess.spawn(["relay", "--port=tcp:0:interface=127.0.0.1"])
        self.addCleanup(proc.terminate)
        pool = HTTPConnectionPool(reactor, persistent=False)
        match = yield proc.wait_for(r'Relay server listening.*"Port":(\d+)')
        port = int(match.group(1))
        base = "http://127.0.0.1:%d" % port

        resp = yield treq.get(base + "/healthz", pool=pool)
        self.assertEqual((resp.code, (yield resp.content())), (200, b"ok"))

        poll = treq.get(base + "/server/request?server=smoke-robot", pool=pool)
        match = yield proc.wait_for(r"Relay client connected")
        record = json.loads(match.string)
        self.assertEqual(record["level"], "INFO")
        self.assertEqual(record["ServerName"], "smoke-robot")
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

        # SIGTERM ends the long poll with a 408 (so real relay-clients poll
        # the next server at once) and the process exits cleanly.
        proc.transport.signalProcess("TERM")
        resp = yield poll
        self.assertEqual(resp.code, 408)
        self.assertEqual((yield resp.content()), b"Server is restarting\n")
        code, signal = yield proc.exited
        self.assertIn((code, signal), [(0, None), (None, 15)])
        records = [json.loads(line) for line in proc.lines]  # every line is one JSON object
        self.assertEqual([r for r in records if r["level"] == "ERROR"], [])
        self.assertEqual(records[-1]["msg"], "Server Shut Down.")
