"""
C{twistd relay-client} as an operator runs it: its help, its flags, its JSON
log lines, serving through our relay server, exiting non-zero on a 403 and
stopping on SIGTERM.
"""

import json
import os
import re
import subprocess

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import HTTPConnectionPool

from relay.client.tap import Options
from tests.support.client_process import environ, polling_from, spawn, twistd_argv
from tests.support.e2e import Backend, Relay
from tests.support.scripted_relay import ScriptedRelay

pytestmark = pytest.mark.process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GO_FLAGS = [
    "backend_scheme",
    "backend_address",
    "backend_path",
    "preserve_host",
    "relay_scheme",
    "relay_address",
    "relay_prefix",
    "server_name",
    "authentication_token_file",
    "root_ca_file",
    "max_chunk_size",
    "block_size",
    "num_pending_requests",
    "max_idle_conns_per_host",
    "disable_http2",
    "force_http2",
    "disable_auth_for_remote",
    "trace-stackdriver-project-id",
    "log_level",
    "pprof_port",
]


class HelpAndFlags(unittest.SynchronousTestCase):
    def test_help_documents_every_flag(self):
        out = subprocess.run(
            twistd_argv() + ["relay-client", "--help"],
            cwd=ROOT,
            env=environ(),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        text = out.stdout.decode()
        for flag in GO_FLAGS + ["relay_token_file", "log_format"]:
            self.assertIn("--" + flag + "=", text)
        self.assertIn("Google", text)  # the unsupported credentials mode is stated

    def test_go_defaults(self):
        o = Options()
        o.parseOptions([])
        self.assertEqual(
            {k: o[k] for k in GO_FLAGS if k not in ("log_level", "trace-stackdriver-project-id")},
            {
                "backend_scheme": "https",
                "backend_address": "localhost:8080",
                "backend_path": "",
                "preserve_host": True,
                "relay_scheme": "https",
                "relay_address": "localhost:8081",
                "relay_prefix": "",
                "server_name": "server_name",
                "authentication_token_file": "",
                "root_ca_file": "",
                "max_chunk_size": 1048576,
                "block_size": 65536,
                "num_pending_requests": 1,
                "max_idle_conns_per_host": 100,
                "disable_http2": False,
                "force_http2": False,
                "disable_auth_for_remote": False,
                "pprof_port": 0,
            },
        )

    def test_go_spellings(self):
        o = Options()
        o.parseOptions(
            [
                "-server_name=robot1",
                "--backend-address=127.0.0.1:9",
                "-preserve_host=false",
                "--disable_auth_for_remote",
                "-max_chunk_size",
                "4096",
                "--num-pending-requests=3",
            ]
        )
        self.assertEqual(
            (o["server_name"], o["backend_address"], o["preserve_host"], o["disable_auth_for_remote"]),
            ("robot1", "127.0.0.1:9", False, True),
        )
        self.assertEqual((o["max_chunk_size"], o["num_pending_requests"]), (4096, 3))

    def test_bad_flags(self):
        from twisted.python.usage import UsageError

        for argv in (
            ["--force_http2", "--disable_http2"],
            ["--preserve_host=maybe"],
            ["--max_chunk_size=0"],
            ["--backend_scheme=ftp"],
            ["--root_ca_file=/nonexistent/ca.pem"],
        ):
            with self.assertRaises(UsageError, msg=argv):
                Options().parseOptions(argv)


class RunningTwistd(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_serves_logs_json_and_stops_on_sigterm(self):
        backend = Backend()
        self.addCleanup(backend.stop)
        relay = Relay()
        self.addCleanup(relay.stop)
        child = spawn(
            [
                "--relay_scheme=http",
                "--relay_address=127.0.0.1:%d" % relay.port,
                "--backend_scheme=http",
                "--backend_address=" + backend.address,
                "--server_name=robot",
                "--disable_auth_for_remote",
                # Per-request lines are debug (they cost a tenth of the time).
                "--log_level=debug",
            ]
        )
        self.addCleanup(lambda: child.exited if child.exited.called else self._kill(child))
        yield polling_from(child, relay, "robot")
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(relay.base + "/client/robot/echo/hi?x=1", pool=pool)
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["uri"], "/echo/hi?x=1")
        child.transport.signalProcess("TERM")
        code, signal = yield child.exited
        self.assertIn(signal, (None, 15))
        self.assertIn(code, (None, 0))
        records = [json.loads(line) for line in child.lines() if line.startswith("{")]
        messages = [r["msg"] for r in records]
        self.assertIn("Starting to relay server request loop", messages)
        sent = [r for r in records if r["msg"] == "Sending request to backend"]
        self.assertEqual(sent[0]["Method"], "GET")
        self.assertEqual(sent[0]["URL"], "http://%s/echo/hi?x=1" % backend.address)
        self.assertFalse([r for r in records if r["level"] == "ERROR"], child.output)

    def _kill(self, child):
        child.transport.signalProcess("KILL")
        return child.exited

    @defer.inlineCallbacks
    def test_403_exits_non_zero(self):
        relay = ScriptedRelay()
        relay.script[b"/server/request"] = [(403, b"Forbidden")]
        port = reactor.listenTCP(0, server.Site(relay), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        child = spawn(
            [
                "--relay_scheme=http",
                "--relay_address=127.0.0.1:%d" % port.getHost().port,
                "--server_name=robot",
                "--disable_auth_for_remote",
            ]
        )
        code, signal = yield child.exited
        self.assertEqual((code, signal), (1, None), child.output)
        self.assertTrue(
            re.search(r'"msg":"failed to authenticate to cloud-api, restarting: Forbidden"', child.output.decode()),
            child.output,
        )
