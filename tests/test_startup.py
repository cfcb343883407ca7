"""
Start-up as an operator meets it: every usage or start-up error is one line
that names the flag (or the relay.tac variable), with a non-zero exit, no
traceback and no help; every flag the Go binaries take is accepted; relay.tac
documents its variables and logs where twistd's options say.

The error cases run the real C{twistd}, several at once.
"""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
from twisted.internet import error as net_error
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.client import tap as client_tap
from relay.server import tac, tap
from relay.startup import listen_error
from tests.support.process import ROOT, environ, run_all, scratch, twistd_argv

pytestmark = pytest.mark.process

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def go_flags(name: str):
    """C{[(flag, kind)]} from a Go binary's --help output (kind: int, string, duration or bool)."""
    flags = []
    with open(os.path.join(FIXTURES, name)) as f:
        for line in f:
            m = re.match(r"^  -(\S+)(?: (\w+))?$", line.rstrip("\n"))
            if m:
                flags.append((m.group(1), m.group(2) or "bool"))
    return flags


SAMPLE = {"int": "7", "string": "x", "duration": "90s", "bool": None}


class OneLineErrors(unittest.TestCase):
    timeout = 300

    def assertOneLine(self, code, output, pattern):
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)
        # twistd may log its two start-up lines first (JSON); the error is
        # the one plain line.
        plain = [line for line in output.splitlines() if line and not line.startswith("{")]
        self.assertEqual(len(plain), 1, output)
        self.assertRegex(plain[0], pattern)
        records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        self.assertEqual([r for r in records if r["level"] == "ERROR"], [])

    def test_flag_errors(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        in_use = busy.getsockname()[1]
        cwd = scratch(self)
        relay = ["--pidfile=", "-n", "relay"]
        client = ["--pidfile=", "-n", "relay-client"]
        cases = [
            (relay + ["--port=abc"], r"^twistd relay: --port=abc: .*use e\.g\. --port=8080"),
            (relay + ["--port=99999"], r"^twistd relay: --port=99999: port numbers go up to 65535; use"),
            (relay + ["--port=tcp:abc"], r"^twistd relay: --port=tcp:abc: not a valid endpoint string .*; use"),
            (relay + ["--block_size=-5"], r"^twistd relay: --block_size=-5: must be a whole number above 0$"),
            (relay + ["--max_backends=lots"], r"^twistd relay: --max_backends=lots: not a whole number"),
            (relay + ["--inactive_request_timeout=soon"], r"^twistd relay: --inactive_request_timeout=soon: .*1m30s"),
            (relay + ["--drain_grace=-1s"], r"^twistd relay: --drain_grace=-1s: .*use 0"),
            (relay + ["--log_level=loud"], r"^twistd relay: --log_level=loud: .*debug, info"),
            (
                relay + ["--client_tokens=/nonexistent/tokens"],
                r"^twistd relay: --client_tokens=/nonexistent/tokens: cannot read",
            ),
            (relay + ["--bogus"], r"^twistd relay: option --bogus not recognized; see `twistd relay --help`"),
            (
                relay + ["--port=tcp:%d:interface=127.0.0.1" % in_use],
                r"^twistd relay: --port=tcp:%d:interface=127.0.0.1: port %d is already in use" % (in_use, in_use),
            ),
            (relay + ["--port=tcp:70000"], r"^twistd relay: --port=tcp:70000: port numbers go up to 65535"),
            (
                client + ["--relay_address=localhost:abc"],
                r"^twistd relay-client: --relay_address=localhost:abc: the port must be a number",
            ),
            (
                client + ["--relay_token_file=/nonexistent/token"],
                r"^twistd relay-client: --relay_token_file=/nonexistent/token: cannot read the file",
            ),
            (
                client + ["--authentication_token_file=/nonexistent/t"],
                r"^twistd relay-client: --authentication_token_file=/nonexistent/t: cannot read",
            ),
            (
                client + ["--root_ca_file=/nonexistent/ca.pem"],
                r"^twistd relay-client: --root_ca_file=/nonexistent/ca.pem: cannot read",
            ),
            (client + ["--num_pending_requests=0"], r"^twistd relay-client: --num_pending_requests=0: must be"),
            (client + ["--preserve_host=maybe"], r"^twistd relay-client: --preserve_host=maybe: .*true or false"),
            (
                ["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")],
                r"^relay\.tac: RELAY_PORT=abc: .*use e\.g\. RELAY_PORT=8080",
            ),
            (
                ["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")],
                r"^relay\.tac: RELAY_HEADER_TIMEOUT=-1: a duration must be above 0",
            ),
            (
                ["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")],
                r"^relay\.tac: RELAY_MAX_BACKEND=5: not a relay\.tac variable .*; did you mean RELAY_MAX_BACKENDS\?$",
            ),
            (
                ["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")],
                r"^relay\.tac: RELAY_INSPECT_HEADERS=maybe: "
                r"use 1, true or yes to turn it on; 0, false, no or unset for off$",
            ),
            # Typed by hand, not Kubernetes' service link (which comes with RELAY_PORT_8080_TCP).
            (
                ["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")],
                r"^relay\.tac: RELAY_PORT=tcp://0\.0\.0\.0:8080: not a valid endpoint string",
            ),
        ]
        tac_envs = [
            {"RELAY_PORT": "abc"},
            {"RELAY_HEADER_TIMEOUT": "-1"},
            {"RELAY_MAX_BACKEND": "5"},
            {"RELAY_INSPECT_HEADERS": "maybe"},
            {"RELAY_PORT": "tcp://0.0.0.0:8080"},
        ]
        envs = [{}] * (len(cases) - len(tac_envs)) + tac_envs
        results = run_all([(args, env) for (args, _), env in zip(cases, envs)], cwd)
        for (args, pattern), (code, output) in zip(cases, results):
            with self.subTest(args=args):
                self.assertOneLine(code, output, pattern)
        self.assertEqual(os.listdir(cwd), [])  # no pid file or log left behind

    def test_privileged_port_as_non_root(self):
        """The real EACCES: run as nobody (we are root here), or as ourselves."""
        argv = twistd_argv() + ["--pidfile=", "-n", "relay", "--port=80"]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise unittest.SkipTest("root, and no setpriv to drop privileges")
            argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] + argv
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            if int(f.read()) <= 80:
                raise unittest.SkipTest("port 80 needs no privilege on this host")
        run = subprocess.run(
            argv, cwd="/", env=environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120
        )
        self.assertOneLine(
            run.returncode,
            run.stdout.decode(),
            r"^twistd relay: --port=80: port 80 needs root or CAP_NET_BIND_SERVICE; use --port=8080",
        )

    def test_listen_errors_injected(self):
        def failure(code):
            return Failure(net_error.CannotListenError("", 80, OSError(code, os.strerror(code))))

        self.assertEqual(
            str(listen_error(failure(errno.EACCES), "--port=80", 80)).split(";")[0],
            "--port=80: port 80 needs root or CAP_NET_BIND_SERVICE",
        )
        self.assertIn("already in use", str(listen_error(failure(errno.EADDRINUSE), "--port=80", 80)))
        self.assertIn(
            "up to 65535",
            str(listen_error(Failure(OverflowError("bind(): port must be 0-65535.")), "--port=tcp:99999", None)),
        )
        self.assertEqual(
            str(listen_error(failure(errno.EMFILE), "--port=80", 80)), "--port=80: cannot listen: Too many open files"
        )


class GoFlagsAccepted(unittest.TestCase):
    """Every flag in the Go binaries' --help output (kept in tests/fixtures) parses."""

    def check(self, options_class, fixture, extra=()):
        flags = go_flags(fixture)
        self.assertGreater(len(flags), 5)
        for flag, kind in flags:
            value = SAMPLE[kind]
            if flag in ("backend_address", "relay_address"):
                value = "localhost:8081"
            if flag.endswith("_file"):
                value = os.path.join(FIXTURES, fixture)  # any readable file
            if flag == "root_ca_file":
                continue  # needs a real certificate: covered in test_client_tls
            if flag.endswith("_scheme"):
                value = "http"
            if flag == "log_level":
                value = "0"
            for spelling in ("-" + flag, "--" + flag):
                argv = [spelling if value is None else "%s=%s" % (spelling, value)] + list(extra)
                o = options_class()
                try:
                    o.parseOptions(argv)
                except usage.UsageError as e:
                    self.fail("%s: %s" % (argv, e))
        return flags

    def test_server(self):
        flags = self.check(tap.Options, "go-http-relay-server-help.txt")
        self.assertIn(("pprof_port", "int"), flags)
        self.assertIn(("trace-stackdriver-project-id", "string"), flags)
        o = tap.Options()
        o.parseOptions(["-pprof_port=6060", "-trace-stackdriver-project-id=proj"])
        # Go's Cloud Trace flag is not ignored any more (relay.tracing).
        self.assertEqual(o.ignored_flags(), ["pprof_port"])
        o = tap.Options()
        o.parseOptions(["--pprof_port=0"])
        self.assertEqual(o.ignored_flags(), [])

    def test_client(self):
        self.check(client_tap.Options, "go-http-relay-client-help.txt", ["--disable_auth_for_remote"])
        o = client_tap.Options()
        o.parseOptions(["-pprof_port", "6060", "--disable_auth_for_remote"])
        self.assertEqual(o.ignored_flags(), ["pprof_port"])

    def test_ignored_flags_warn_once_each(self):
        cwd = scratch(self)
        p = subprocess.Popen(
            twistd_argv()
            + ["--pidfile=", "-n", "relay", "--port=tcp:0:interface=127.0.0.1", "--drain_grace=0",
               "-pprof_port=6060", "--trace-stackdriver-project-id=proj"],
            cwd=cwd,
            env=environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            lines = []
            deadline = time.time() + 60
            while time.time() < deadline:
                line = p.stdout.readline().decode()
                if not line:
                    break
                lines.append(line)
                if "opentelemetry-exporter-gcp-trace" in line:
                    break
        finally:
            p.terminate()
            rest = p.communicate(timeout=60)[0].decode()
        warnings = [
            json.loads(line) for line in lines + rest.splitlines(True) if '"level":"WARN","msg":"Ignoring' in line
        ]
        self.assertEqual(
            [(w["msg"], w["flag"]) for w in warnings],
            [("Ignoring --pprof_port: not supported by this relay", "pprof_port")],
        )
        # Go's Cloud Trace flag is honoured, and without Google's exporter
        # one line says what to install or which OTLP setting to use.
        [missing] = [json.loads(line) for line in lines + rest.splitlines(True) if "gcp-trace" in line]
        self.assertEqual(missing["level"], "WARN")
        self.assertIn("--trace-stackdriver-project-id=proj: exporting to Cloud Trace needs the "
                      "opentelemetry-exporter-gcp-trace package", missing["msg"])
        self.assertIn("OTEL_EXPORTER_OTLP_ENDPOINT", missing["msg"])


class TacFile(unittest.TestCase):
    timeout = 120

    def test_documents_every_variable(self):
        """The comment lists exactly the variables the option table gives, in its order."""
        with open(os.path.join(ROOT, "relay.tac")) as f:
            listed = re.findall(r"^#   (RELAY_[A-Z0-9_]+) ", f.read(), re.M)
        self.assertEqual(listed, list(tac.variables()) + [tac.LOG_FILE])
        self.assertEqual(len(listed), len(tap.Options.optParameters) + len(tap.Options.optFlags) + 1)
        self.assertIn("RELAY_TRACE_STACKDRIVER_PROJECT_ID", listed)

    def test_kubernetes_service_links_ignored(self):
        """A Service named relay (and relay-server) in the pod's namespace, as Kubernetes injects them."""
        links = {
            "RELAY_SERVICE_HOST": "10.0.0.1",
            "RELAY_SERVICE_PORT": "80",
            "RELAY_SERVICE_PORT_HTTP": "80",
            "RELAY_PORT": "tcp://10.0.0.1:80",
            "RELAY_PORT_80_TCP": "tcp://10.0.0.1:80",
            "RELAY_PORT_80_TCP_PROTO": "tcp",
            "RELAY_PORT_80_TCP_PORT": "80",
            "RELAY_PORT_80_TCP_ADDR": "10.0.0.1",
            "RELAY_SERVER_SERVICE_HOST": "10.0.0.2",
            "RELAY_SERVER_PORT": "tcp://[fd00::2]:8080",
            "RELAY_SERVER_PORT_8080_TCP": "tcp://[fd00::2]:8080",
        }
        self.assertEqual(tac.flags(links), ([], ["RELAY_PORT"]))
        # The operator's own RELAY_PORT (in the container's env, it replaces the link).
        self.assertEqual(tac.flags(dict(links, RELAY_PORT="8080")), (["--port=8080"], []))
        options = tac.options_from(dict(links, RELAY_MAX_BACKENDS="7"), [])
        self.assertEqual(options.config.port, "80")
        self.assertEqual(options.config.max_backends, 7)

    def test_on_off_variables(self):
        for value, argv in (
            ("1", ["--inspect_headers"]),
            ("TRUE", ["--inspect_headers"]),
            ("yes", ["--inspect_headers"]),
            ("0", []),
            ("false", []),
            ("no", []),
            ("", []),
        ):
            with self.subTest(value=value):
                self.assertEqual(tac.flags({"RELAY_INSPECT_HEADERS": value, "RELAY_ADMIN_PORT": "0"})[0],
                                 ["--admin_port=0"] + argv)
        with self.assertRaises(SystemExit) as caught:
            tac.options_from({"RELAY_INSPECT_HEADERS": "on"}, [])
        self.assertEqual(
            str(caught.exception),
            "relay.tac: RELAY_INSPECT_HEADERS=on: use 1, true or yes to turn it on; 0, false, no or unset for off",
        )

    def test_unknown_variable(self):
        with self.assertRaises(SystemExit) as caught:
            tac.options_from({"RELAY_PORT": "8080", "RELAY_DRAIN_GRACE_PERIOD": "5s"}, [])
        self.assertEqual(
            str(caught.exception),
            "relay.tac: RELAY_DRAIN_GRACE_PERIOD=5s: not a relay.tac variable (the comment at the top of "
            "relay.tac lists them); did you mean RELAY_DRAIN_GRACE?",
        )
        # RELAY_X_PORT=tcp://... without Kubernetes' twin RELAY_X_PORT_N_TCP is not a link.
        with self.assertRaises(SystemExit):
            tac.options_from({"RELAY_PEER_PORT": "tcp://10.0.0.1:80"}, [])

    def test_service_link_warning(self):
        """Under the real twistd: the link on a flag's variable is ignored with one WARN line naming it."""
        link = "tcp://10.0.0.2:8081"
        run = subprocess.Popen(
            twistd_argv() + ["--pidfile=", "-ny", os.path.join(ROOT, "relay.tac")],
            cwd=scratch(self),
            env=environ(
                RELAY_PORT="tcp:0:interface=127.0.0.1",
                RELAY_DRAIN_GRACE="0",
                RELAY_ADMIN_PORT=link,
                RELAY_ADMIN_PORT_8081_TCP=link,
                RELAY_ADMIN_PORT_8081_TCP_ADDR="10.0.0.2",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines = []
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                line = run.stdout.readline().decode()
                lines.append(line)
                if not line or "Ignoring RELAY_ADMIN_PORT" in line:
                    break
        finally:
            run.terminate()
            rest = run.communicate(timeout=60)[0].decode()
        [warning] = [json.loads(line) for line in lines + rest.splitlines() if "RELAY_ADMIN_PORT" in line]
        self.assertEqual(warning["level"], "WARN")
        self.assertEqual(warning["variable"], "RELAY_ADMIN_PORT")
        self.assertIn("Service named relay-admin", warning["msg"])
        self.assertNotIn("Admin view listening", "".join(lines) + rest)

    def test_daemonized_logs_to_logfile(self):
        cwd = scratch(self)
        logfile = os.path.join(cwd, "relay.log")
        pidfile = os.path.join(cwd, "relay.pid")
        run = subprocess.run(
            twistd_argv() + ["--pidfile=" + pidfile, "--logfile=" + logfile, "-y", os.path.join(ROOT, "relay.tac")],
            cwd=cwd,
            env=environ(RELAY_PORT="tcp:0:interface=127.0.0.1", RELAY_DRAIN_GRACE="0"),
            timeout=60,
        )
        self.assertEqual(run.returncode, 0)
        with open(pidfile) as f:
            pid = int(f.read())
        try:
            deadline = time.time() + 30
            text = ""
            while "Relay server listening" not in text and time.time() < deadline:
                time.sleep(0.1)
                with open(logfile) as f:
                    text = f.read()
            self.assertIn('"msg":"Relay server listening"', text)
        finally:
            os.kill(pid, 15)
        # The pidfile goes before the last line is written: wait for the line.
        deadline = time.time() + 30
        text = ""
        while '"msg":"Server Shut Down."' not in text and time.time() < deadline:
            time.sleep(0.1)
            with open(logfile) as f:
                text = f.read()
        self.assertIn('"msg":"Server Shut Down."', text)
        self.assertFalse(os.path.exists(pidfile))
