"""
The real C{twistd -n relay} process: found by its log line, answering a
relay-client, stopped cleanly by SIGTERM.
"""

import json

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.support import head_and_body, raw_connect
from tests.support.process import TwistdProcess

pytestmark = pytest.mark.process


class TwistdSmokeTest(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_start_poll_and_sigterm(self):
        proc = TwistdProcess.spawn(["relay", "--port=tcp:0:interface=127.0.0.1", "--drain_grace=2s"])
        self.addCleanup(proc.terminate)
        pool = HTTPConnectionPool(reactor, persistent=False)
        port = yield proc.listening_port()
        base = "http://127.0.0.1:%d" % port

        resp = yield treq.get(base + "/healthz", pool=pool)
        self.assertEqual((resp.code, (yield resp.content())), (200, b"ok"))

        # A relay-client's poll on a kept-alive connection, raw, to see the
        # Connection header (Twisted's client keeps it to itself).
        poll = yield raw_connect(port)
        poll.transport.write(b"GET /server/request?server=smoke-robot HTTP/1.1\r\nHost: relay\r\n\r\n")
        match = yield proc.wait_for(r"Relay client connected")
        record = json.loads(match.string)
        self.assertEqual(record["level"], "INFO")
        self.assertEqual(record["ServerName"], "smoke-robot")
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

        # SIGTERM ends the long poll with a 503 that closes the connection
        # (relay-clients back off and reconnect, perhaps to another server;
        # a 408 would make Go's re-poll at once, in a loop)...
        proc.transport.signalProcess("TERM")
        started = reactor.seconds()
        yield poll.ended
        head, body = head_and_body(poll.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"\r\nConnection: close", head + b"\r\n")
        self.assertIn(b"\r\nRetry-After: 1\r\n", head + b"\r\n")
        self.assertEqual(body, b"Server is restarting\n")
        # ...the port keeps accepting through the grace period, failing
        # readiness...
        resp = yield treq.get(base + "/healthz", pool=pool)
        self.assertEqual((resp.code, (yield resp.content())), (503, b"Server is shutting down\n"))
        # ...and the process exits cleanly once it is over.
        code, signal = yield proc.exited
        self.assertGreater(reactor.seconds() - started, 1.5)
        self.assertIn((code, signal), [(0, None), (None, 15)])
        records = [json.loads(line) for line in proc.lines]  # every line is one JSON object
        self.assertEqual([r for r in records if r["level"] == "ERROR"], [])
        self.assertEqual(records[-1]["msg"], "Server Shut Down.")

    @defer.inlineCallbacks
    def test_sigterm_lets_in_flight_request_finish(self):
        from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse

        # With busy polling on: the real reactor's poller is wrapped, and
        # everything below must work the same.
        proc = TwistdProcess.spawn(
            ["relay", "--port=tcp:0:interface=127.0.0.1", "--busy_poll_us=200", "--drain_grace=0"]
        )
        self.addCleanup(proc.terminate)
        yield proc.wait_for(r'"Busy polling for 200 us before sleeping"')
        users = HTTPConnectionPool(reactor, persistent=False)
        # The relay-client keeps its connection alive, as real ones do.
        relay_client = HTTPConnectionPool(reactor, persistent=True)
        relay_client.maxPersistentPerHost = 1
        self.addCleanup(relay_client.closeCachedConnections)
        port = yield proc.listening_port()
        base = "http://127.0.0.1:%d" % port
        poll = treq.get(base + "/server/request?server=r", pool=relay_client)
        yield proc.wait_for("Relay client connected")
        user = treq.get(base + "/client/r/slow", pool=users)
        resp = yield poll
        request = HttpRequest.FromString((yield resp.content()))

        proc.transport.signalProcess("TERM")
        yield proc.wait_for("Waiting for in-flight requests")
        # While a request is in flight the port still accepts, answering
        # 503 to all but the relay-client's answers...
        resp = yield treq.get(base + "/healthz", pool=users)
        self.assertEqual(resp.code, 503)
        yield resp.content()
        resp = yield treq.get(base + "/client/r/new", pool=users)
        self.assertEqual((resp.code, (yield resp.content())), (503, b"Server is restarting\n"))
        # ...so the in-flight request completes, in two chunks, one over the
        # relay-client's open connection and one over a new one.
        r = yield treq.post(
            base + "/server/response",
            data=HttpResponse(id=request.id, status_code=200, body=b"fini").SerializeToString(),
            pool=relay_client,
        )
        self.assertEqual(r.code, 200)
        yield r.content()
        r = yield treq.post(
            base + "/server/response",
            data=HttpResponse(id=request.id, body=b"shed", eof=True).SerializeToString(),
            pool=users,
        )
        self.assertEqual(r.code, 200)
        yield r.content()
        answer = yield user
        self.assertEqual((answer.code, (yield answer.content())), (200, b"finished"))
        code, signal = yield proc.exited
        # Then the port closed.
        with self.assertRaises(ConnectionRefusedError):
            yield treq.get(base + "/healthz", pool=users)
        self.assertIn((code, signal), [(0, None), (None, 15)])

    @defer.inlineCallbacks
    def test_tac_file_configured_by_environment(self):
        proc = TwistdProcess.spawn(
            ["-y", "relay.tac"],
            env={"RELAY_PORT": "tcp:0:interface=127.0.0.1", "RELAY_LOG_FORMAT": "text", "RELAY_DRAIN_GRACE": "0"},
        )
        self.addCleanup(proc.terminate)
        match = yield proc.wait_for(r"msg=\"Relay server listening\" Port=(\d+)")
        pool = HTTPConnectionPool(reactor, persistent=False)
        resp = yield treq.get("http://127.0.0.1:%s/healthz" % match.group(1), pool=pool)
        self.assertEqual((yield resp.content()), b"ok")
        code, signal = yield proc.terminate()
        self.assertIn((code, signal), [(0, None), (None, 15)])

    @defer.inlineCallbacks
    def test_no_factory_lines_with_admin_port(self):
        """docs/server.md: Twisted's Starting factory and Stopping factory lines are never written."""
        proc = TwistdProcess.spawn(
            [
                "relay",
                "--port=tcp:0:interface=127.0.0.1",
                "--admin_port=tcp:0:interface=127.0.0.1",
                "--drain_grace=0",
                "--log_level=info",
            ]
        )
        self.addCleanup(proc.terminate)
        admin = yield proc.wait_for(r'"msg":"Admin view listening".*"Port":(\d+)')
        yield proc.listening_port()
        pool = HTTPConnectionPool(reactor, persistent=False)
        resp = yield treq.get("http://127.0.0.1:%s/api/status" % admin.group(1), pool=pool)
        self.assertEqual(resp.code, 200)
        yield resp.content()
        code, signal = yield proc.terminate()
        self.assertIn((code, signal), [(0, None), (None, 15)])
        self.assertEqual(json.loads(proc.lines[-1])["msg"], "Server Shut Down.")
        self.assertEqual([line for line in proc.lines if "factory" in line.lower()], [])
