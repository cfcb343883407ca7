"""
Everything under C{deploy/} parses, and every flag it passes to the relay
reaches the real options parser, so a typo in a manifest fails here rather
than in a rolling deploy.

  - systemd units: C{ExecStart}'s flags through the parser, the hardening
    docs/deploying.md promises, the stop timeout longer than the drain (with
    the unit's own C{--drain_grace}), and C{systemd-analyze verify} (when it
    is installed) with no warning at all;
  - Kubernetes manifests: each container's C{args} through the parser of the
    command it runs, probes (readiness fails within the drain's grace
    period), termination grace period longer than the drain, non-root,
    read-only root;
  - the nginx site: the timeouts and settings the long polls need;
  - the Prometheus scrape config and the container file.
"""

import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from twisted.python import usage
from twisted.trial import unittest

from relay.client.tap import Options as ClientOptions
from relay.durations import parse_duration as duration
from relay.server.service import CLEAN_SHUTDOWN_TIMEOUT
from relay.server.site import RelaySite
from relay.server.tap import Options as ServerOptions

try:
    import yaml
except ImportError:  # pragma: no cover - pyyaml is in the test extra
    yaml = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
PARSERS = {"relay": ServerOptions, "relay-client": ClientOptions}

# Once the port is closed, connections whose peer does not read are aborted
# after this long (RelaySite.close_connections).
CLOSE_ABORT_SECONDS = inspect.signature(RelaySite.close_connections).parameters["abort_after"].default


def drain_seconds(options) -> float:
    """
    The longest a server run with C{options} may take to stop after SIGTERM
    (docs/server.md#draining-on-sigterm): its C{--drain_grace}, the 20 s
    requests in flight get, and the abort of connections that do not close.
    The grace period and the 20 s run side by side, so this is an upper
    bound.
    """
    return options["drain_grace"] + CLEAN_SHUTDOWN_TIMEOUT + CLOSE_ABORT_SECONDS


def _read(*parts) -> str:
    with open(os.path.join(DEPLOY, *parts)) as f:
        return f.read()


def parse_twistd(argv, placeholder_file: str):
    """
    Parse a C{twistd [twistd options] relay|relay-client [flags]} command
    line with the real options parser of the subcommand; returns
    (subcommand, options). Paths of token and CA files, which exist only on
    the target machine, are replaced by C{placeholder_file}.
    """
    assert os.path.basename(argv[0]) == "twistd", argv
    for i, word in enumerate(argv):
        if word in PARSERS:
            break
    else:
        raise AssertionError("no relay subcommand in %r" % (argv,))
    twistd_flags, name, flags = argv[1:i], argv[i], argv[i + 1 :]
    assert "--nodaemon" in twistd_flags or "-n" in twistd_flags, argv
    assert "--pidfile=" in twistd_flags, "without --pidfile= twistd writes twistd.pid: %r" % (argv,)
    fixed = []
    for flag in flags:
        key, sep, value = flag.partition("=")
        if sep and key.lstrip("-").replace("-", "_") in (
            "client_tokens",
            "user_tokens",
            "relay_token_file",
            "authentication_token_file",
        ):
            flag = key + "=" + placeholder_file
        fixed.append(flag)
    options = PARSERS[name]()
    options.parseOptions(fixed)
    return name, options


def placeholder_file(case) -> str:
    """An empty file standing in for token files, removed after C{case}."""
    fd, path = tempfile.mkstemp(prefix="relay-deploy-test-")
    os.close(fd)
    case.addCleanup(os.remove, path)
    return path


class ParserTests(unittest.SynchronousTestCase):
    """The helper itself: a typo in a flag must fail."""

    def test_typo_fails(self):
        self.assertRaises(
            usage.UsageError,
            parse_twistd,
            ["twistd", "--nodaemon", "--pidfile=", "relay", "--prot=8080"],
            os.devnull,
        )

    def test_good_flags_pass(self):
        name, options = parse_twistd(["twistd", "-n", "--pidfile=", "relay", "--port=8080"], os.devnull)
        self.assertEqual((name, options["port"]), ("relay", "8080"))


def systemd_unit(text: str):
    """{section: [(key, value)]} of a unit file, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    sections, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


class SystemdTests(unittest.SynchronousTestCase):
    units = {"relay.service": "relay", "relay-client.service": "relay-client"}

    def setUp(self):
        self.placeholder = placeholder_file(self)

    def service(self, unit):
        return dict(systemd_unit(_read("systemd", unit))["Service"])

    def test_execstart_flags_parse(self):
        for unit, expected in self.units.items():
            argv = shlex.split(self.service(unit)["ExecStart"].replace("%d", "/run/credentials/x"))
            name, options = parse_twistd(argv, self.placeholder)
            self.assertEqual(name, expected)

    def test_hardening(self):
        for unit, name in self.units.items():
            service = self.service(unit)
            self.assertEqual(service.get("NoNewPrivileges"), "yes", unit)
            self.assertEqual(service.get("ProtectSystem"), "strict", unit)
            self.assertTrue(service.get("DynamicUser") == "yes" or service.get("User"), unit)
            argv = shlex.split(service["ExecStart"].replace("%d", "/x"))
            _, options = parse_twistd(argv, self.placeholder)
            port = options.get("port")
            low = port is not None and re.search(r"(?:^|:)(\d+)", port) and int(
                re.search(r"(?:^|:)(\d+)", port).group(1)
            ) < 1024
            if low:
                self.assertIn("CAP_NET_BIND_SERVICE", service.get("AmbientCapabilities", ""), unit)
            else:
                self.assertNotIn("AmbientCapabilities", service, unit)
                self.assertEqual(service.get("CapabilityBoundingSet"), "", unit)

    def test_stop_timeout_longer_than_drain(self):
        service = self.service("relay.service")
        _, options = parse_twistd(shlex.split(service["ExecStart"]), self.placeholder)
        self.assertGreater(duration(service["TimeoutStopSec"] + "s"), drain_seconds(options))
        # The relay-client gives requests in flight 5 s.
        self.assertGreater(duration(self.service("relay-client.service")["TimeoutStopSec"] + "s"), 5)

    def test_systemd_analyze_verify(self):
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise unittest.SkipTest("systemd-analyze is not installed (Debian: apt-get install systemd)")
        # verify checks that ExecStart's program exists: point it at the
        # twistd next to the running interpreter instead of /opt/relay.
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            raise unittest.SkipTest("no twistd next to %s" % (sys.executable,))
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        for unit in self.units:
            path = os.path.join(folder, unit)
            with open(path, "w") as f:
                f.write(_read("systemd", unit).replace("/opt/relay/bin/twistd", twistd))
            result = subprocess.run(
                [tool, "verify", path], capture_output=True, text=True, timeout=60, cwd=folder
            )
            # Unknown keys are only warned about, with status 0: any output fails.
            self.assertEqual(
                (result.returncode, result.stdout + result.stderr), (0, ""), "systemd-analyze verify " + unit
            )


def containers(docs):
    for doc in docs:
        if doc and doc.get("kind") == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                yield doc, pod, container


class KubernetesTests(unittest.SynchronousTestCase):
    def setUp(self):
        if yaml is None:
            raise unittest.SkipTest("PyYAML is not installed (it is in the test extra)")
        self.placeholder = placeholder_file(self)
        folder = os.path.join(DEPLOY, "kubernetes")
        self.manifests = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith((".yaml", ".yml")):
                with open(os.path.join(folder, name)) as f:
                    self.manifests[name] = list(yaml.safe_load_all(f))

    def all_containers(self):
        for name, docs in self.manifests.items():
            for doc, pod, container in containers(docs):
                yield name, doc, pod, container

    def test_every_document_has_kind(self):
        self.assertIn("relay-server.yaml", self.manifests)
        self.assertIn("relay-client.yaml", self.manifests)
        for name, docs in self.manifests.items():
            for doc in docs:
                self.assertIn("apiVersion", doc, name)
                self.assertIn("kind", doc, name)
                self.assertIn("name", doc["metadata"], name)

    def test_args_parse(self):
        seen = set()
        for name, doc, pod, container in self.all_containers():
            argv = container["command"] + container.get("args", [])
            subcommand, options = parse_twistd(argv, self.placeholder)
            seen.add(subcommand)
        self.assertEqual(seen, {"relay", "relay-client"})

    def test_non_root_read_only(self):
        for name, doc, pod, container in self.all_containers():
            self.assertTrue(pod["securityContext"]["runAsNonRoot"], name)
            self.assertNotEqual(pod["securityContext"].get("runAsUser"), 0, name)
            security = container["securityContext"]
            self.assertTrue(security["readOnlyRootFilesystem"], name)
            self.assertFalse(security["allowPrivilegeEscalation"], name)
            self.assertEqual(security["capabilities"]["drop"], ["ALL"], name)

    def test_server_probes_and_grace_period(self):
        servers = [
            (doc, pod, c) for _, doc, pod, c in self.all_containers() if "relay" in c["command"]
        ]
        self.assertEqual(len(servers), 1)
        doc, pod, container = servers[0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        _, options = parse_twistd(container["command"] + container["args"], self.placeholder)
        self.assertGreater(pod["terminationGracePeriodSeconds"], drain_seconds(options))
        # Readiness fails on the drain's 503 while the port still accepts:
        # within periodSeconds x failureThreshold plus the probe's timeout
        # (Kubernetes' defaults where unset).
        readiness = container["readinessProbe"]
        noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3) + readiness.get(
            "timeoutSeconds", 1
        )
        self.assertLessEqual(noticed, options["drain_grace"])
        self.assertEqual(str(ports["http"]), options["port"])
        for probe in ("readinessProbe", "livenessProbe"):
            self.assertEqual(container[probe]["httpGet"]["path"], "/healthz")
            self.assertIn(container[probe]["httpGet"]["port"], ("http", ports["http"]))
        # The Service sends traffic to the Deployment's pods.
        services = [d for d in self.manifests["relay-server.yaml"] if d["kind"] == "Service"]
        self.assertEqual(len(services), 1)
        labels = doc["spec"]["template"]["metadata"]["labels"]
        for key, value in services[0]["spec"]["selector"].items():
            self.assertEqual(labels.get(key), value)
        self.assertEqual(doc["spec"]["selector"]["matchLabels"], services[0]["spec"]["selector"])


class NginxTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.conf = _read("nginx", "relay.conf")
        self.directives = {}
        for line in self.conf.splitlines():
            line = line.split("#", 1)[0].strip().rstrip(";")
            if line:
                key, _, value = line.partition(" ")
                self.directives.setdefault(key, []).append(value.strip())

    def test_read_timeout_longer_than_the_relays_silences(self):
        timeout = ServerOptions()
        timeout.parseOptions([])
        (read,) = self.directives["proxy_read_timeout"]
        # A long poll lasts 30 s; a backend may take inactive_request_timeout.
        self.assertGreater(duration(read), max(30.0, timeout["inactive_request_timeout"]))

    def test_streaming_and_upgrades(self):
        d = self.directives
        self.assertEqual(d["proxy_buffering"], ["off"])
        self.assertEqual(d["proxy_request_buffering"], ["off"])
        self.assertEqual(d["proxy_http_version"], ["1.1"])
        self.assertIn("Upgrade $http_upgrade", d["proxy_set_header"])
        self.assertIn("Connection $connection_upgrade", d["proxy_set_header"])
        self.assertIn("map $http_upgrade $connection_upgrade {", self.conf)

    def test_balanced_braces(self):
        code = "\n".join(line.split("#", 1)[0] for line in self.conf.splitlines())
        self.assertEqual(code.count("{"), code.count("}"))

    def test_nginx_t(self):
        nginx = shutil.which("nginx")
        if nginx is None:
            raise unittest.SkipTest("nginx is not installed")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        # A throw-away certificate is more than this test needs: check the
        # site as plain HTTP.
        site = re.sub(r"\n\s*listen \[::\]:443 ssl;", "", self.conf)
        site = re.sub(r"listen 443 ssl;", "listen 127.0.0.1:18080;", site)
        site = re.sub(r"\n\s*ssl_certificate\S* [^;]*;", "", site)
        with open(os.path.join(folder, "nginx.conf"), "w") as f:
            f.write("pid %s/nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n%s\n}\n" % (folder, site))
        result = subprocess.run(
            [nginx, "-t", "-p", folder, "-c", os.path.join(folder, "nginx.conf")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class PrometheusTests(unittest.SynchronousTestCase):
    def test_scrape_config(self):
        if yaml is None:
            raise unittest.SkipTest("PyYAML is not installed (it is in the test extra)")
        config = yaml.safe_load(_read("prometheus", "relay.yml"))
        jobs = config["scrape_configs"]
        self.assertTrue(jobs)
        for job in jobs:
            self.assertEqual(job.get("metrics_path", "/metrics"), "/metrics")
            self.assertTrue(job.get("static_configs") or job.get("kubernetes_sd_configs"), job["job_name"])
        names = [job["job_name"] for job in jobs]
        self.assertEqual(len(names), len(set(names)))


class ContainerfileTests(unittest.SynchronousTestCase):
    def setUp(self):
        text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", _read("Containerfile"))
        self.instructions = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                word, _, rest = line.partition(" ")
                self.instructions.append((word.upper(), rest.strip()))

    def test_copies_exist(self):
        copies = [rest.split() for word, rest in self.instructions if word == "COPY"]
        self.assertTrue(copies)
        for words in copies:
            for source in words[:-1]:
                self.assertTrue(os.path.exists(os.path.join(ROOT, source)), source)

    def test_installs_the_package_and_runs_non_root(self):
        runs = " ".join(rest for word, rest in self.instructions if word == "RUN")
        self.assertIn("pip install", runs)
        users = [rest for word, rest in self.instructions if word == "USER"]
        self.assertTrue(users)
        user = users[-1].split(":")[0]
        self.assertNotIn(user, ("root", "0"))
        # USER comes after the last RUN: nothing runs as root at run time.
        words = [w for w, _ in self.instructions]
        self.assertGreater(len(words) - words[::-1].index("USER"), len(words) - words[::-1].index("RUN"))

    def test_cmd_parses(self):
        import json

        (cmd,) = [rest for word, rest in self.instructions if word == "CMD"]
        parse_twistd(json.loads(cmd), os.devnull)
