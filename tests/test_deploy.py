"""
Everything under C{deploy/} parses, and every flag it passes to the relay
reaches the real options parser, so a typo in a manifest fails here rather
than in a rolling deploy.

  - systemd units: C{ExecStart}'s flags through the parser, the hardening
    docs/deploying.md promises, the stop timeout longer than the drain (with
    the unit's own C{--drain_grace}), and C{systemd-analyze verify} (when it
    is installed) with no warning at all; the replicas' template unit lists
    the same peers as the nginx site in front of them;
  - Kubernetes manifests: each relay container's C{args} through the parser
    of the command it runs, probes (readiness fails within the drain's grace
    period), termination grace period longer than the drain, non-root,
    read-only root; for the replicas, that C{--peers}, the per-pod Services
    and nginx's upstream blocks name the same replicas in the same order, and
    that nginx's ConfigMap is the nginx site of this folder but for them;
  - the nginx sites: the timeouts and settings the long polls need, the
    consistent hash on the backend name, and C{nginx -t};
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

import pytest
from twisted.python import usage
from twisted.trial import unittest

from relay.client.tap import Options as ClientOptions
from relay.durations import parse_duration as duration
from relay.server import tap as server_tap
from relay.server.service import CLEAN_SHUTDOWN_TIMEOUT
from relay.server.site import RelaySite
from relay.server.tap import Options as ServerOptions
from tests.support.nginx_site import REPLICAS_SITE, NginxSite, find_nginx

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
    for i, word in enumerate(argv):  # noqa: B007 (i is read after the loop)
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


@pytest.mark.memory
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


# A template unit's instance in the tests: a replica's port.
INSTANCE = "8081"


@pytest.mark.process
class SystemdTests(unittest.SynchronousTestCase):
    units = {"relay.service": "relay", "relay-client.service": "relay-client", "relay@.service": "relay"}

    def setUp(self):
        self.placeholder = placeholder_file(self)

    def service(self, unit):
        return dict(systemd_unit(_read("systemd", unit))["Service"])

    def argv(self, unit):
        return shlex.split(self.service(unit)["ExecStart"].replace("%d", "/run/credentials/x").replace("%i", INSTANCE))

    def test_execstart_flags_parse(self):
        for unit, expected in self.units.items():
            name, options = parse_twistd(self.argv(unit), self.placeholder)
            self.assertEqual(name, expected)

    def test_hardening(self):
        for unit, _name in self.units.items():
            service = self.service(unit)
            self.assertEqual(service.get("NoNewPrivileges"), "yes", unit)
            self.assertEqual(service.get("ProtectSystem"), "strict", unit)
            self.assertTrue(service.get("DynamicUser") == "yes" or service.get("User"), unit)
            _, options = parse_twistd(self.argv(unit), self.placeholder)
            port = options.get("port")
            low = port is not None and re.search(r"(?:^|:)(\d+)", port) and int(
                re.search(r"(?:^|:)(\d+)", port).group(1)
            ) < 1024
            if low:
                self.assertIn("CAP_NET_BIND_SERVICE", service.get("AmbientCapabilities", ""), unit)
            else:
                self.assertNotIn("AmbientCapabilities", service, unit)
                self.assertEqual(service.get("CapabilityBoundingSet"), "", unit)

    def test_replicas_are_hardened_as_the_single_server(self):
        single, replica = self.service("relay.service"), self.service("relay@.service")
        for key in ("ExecStart", "Restart", "RestartSec"):
            single.pop(key), replica.pop(key)
        self.assertEqual(replica, single)

    def test_stop_timeout_longer_than_drain(self):
        for unit in ("relay.service", "relay@.service"):
            _, options = parse_twistd(self.argv(unit), self.placeholder)
            self.assertGreater(duration(self.service(unit)["TimeoutStopSec"] + "s"), drain_seconds(options))
        # The relay-client gives requests in flight 5 s.
        self.assertGreater(duration(self.service("relay-client.service")["TimeoutStopSec"] + "s"), 5)

    def test_replica_is_its_own_entry_of_the_peers_nginx_has(self):
        _, options = parse_twistd(self.argv("relay@.service"), self.placeholder)
        peers = options["peers"].split(",")
        self.assertEqual(peers, NginxSite(REPLICAS_SITE).upstream_servers("relay"))
        self.assertEqual(options["peer_self"], "127.0.0.1:" + INSTANCE)
        self.assertIn(options["peer_self"], peers)
        self.assertEqual(options["port"], "tcp:%s:interface=127.0.0.1" % INSTANCE)

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
            path = os.path.join(folder, unit.replace("@.", "@%s." % INSTANCE))
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
        if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                yield doc, pod, container


def runs_relay(container) -> bool:
    return os.path.basename(container.get("command", [""])[0]) == "twistd"


@pytest.mark.memory
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
        # A replica finds itself in --peers by its hostname: parse the
        # StatefulSet's flags as its first pod would.
        self.patch(server_tap, "local_hostname", lambda: "relay-0")

    def all_containers(self):
        for name, docs in self.manifests.items():
            for doc, pod, container in containers(docs):
                yield name, doc, pod, container

    def kinds(self, manifest, kind):
        return [doc for doc in self.manifests[manifest] if doc["kind"] == kind]

    def test_every_document_has_kind(self):
        self.assertIn("relay-server.yaml", self.manifests)
        self.assertIn("relay-client.yaml", self.manifests)
        self.assertIn("relay-replicas.yaml", self.manifests)
        for name, docs in self.manifests.items():
            for doc in docs:
                self.assertIn("apiVersion", doc, name)
                self.assertIn("kind", doc, name)
                self.assertIn("name", doc["metadata"], name)

    def test_args_parse(self):
        seen = set()
        for _name, _doc, _pod, container in self.all_containers():
            if runs_relay(container):
                argv = container["command"] + container.get("args", [])
                subcommand, options = parse_twistd(argv, self.placeholder)
                seen.add(subcommand)
        self.assertEqual(seen, {"relay", "relay-client"})

    def test_non_root_read_only(self):
        for name, _doc, pod, container in self.all_containers():
            self.assertTrue(pod["securityContext"]["runAsNonRoot"], name)
            self.assertNotEqual(pod["securityContext"].get("runAsUser"), 0, name)
            security = container["securityContext"]
            self.assertTrue(security["readOnlyRootFilesystem"], name)
            self.assertFalse(security["allowPrivilegeEscalation"], name)
            self.assertEqual(security["capabilities"]["drop"], ["ALL"], name)

    def test_server_probes_and_grace_period(self):
        servers = [
            (name, doc, pod, c)
            for name, doc, pod, c in self.all_containers()
            if runs_relay(c) and "relay" in c["command"]
        ]
        self.assertEqual(sorted(name for name, _, _, _ in servers), ["relay-replicas.yaml", "relay-server.yaml"])
        for name, doc, pod, container in servers:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            _, options = parse_twistd(container["command"] + container["args"], self.placeholder)
            self.assertGreater(pod["terminationGracePeriodSeconds"], drain_seconds(options), name)
            # Readiness fails on the drain's 503 while the port still accepts:
            # within periodSeconds x failureThreshold plus the probe's timeout
            # (Kubernetes' defaults where unset).
            readiness = container["readinessProbe"]
            noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3) + readiness.get(
                "timeoutSeconds", 1
            )
            self.assertLessEqual(noticed, options["drain_grace"], name)
            self.assertEqual(str(ports["http"]), options["port"], name)
            for probe in ("readinessProbe", "livenessProbe"):
                self.assertEqual(container[probe]["httpGet"]["path"], "/healthz", name)
                self.assertIn(container[probe]["httpGet"]["port"], ("http", ports["http"]), name)
            # Every Service of the manifest sends traffic to this workload's pods.
            labels = doc["spec"]["template"]["metadata"]["labels"]
            for service in self.kinds(name, "Service"):
                if service["metadata"]["name"].startswith("relay-nginx"):
                    continue
                for key, value in service["spec"]["selector"].items():
                    if key != "statefulset.kubernetes.io/pod-name":
                        self.assertEqual(labels.get(key), value, name)
            self.assertTrue(set(doc["spec"]["selector"]["matchLabels"].items()) <= set(labels.items()), name)

    def test_replicas_peers_services_and_nginx_agree(self):
        (statefulset,) = self.kinds("relay-replicas.yaml", "StatefulSet")
        name = statefulset["metadata"]["name"]
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        _, options = parse_twistd(container["command"] + container["args"], self.placeholder)
        peers = options["peers"].split(",")
        # One peer per pod, in ordinal order, each the pod's own Service.
        self.assertEqual(len(peers), statefulset["spec"]["replicas"])
        services = {s["metadata"]["name"]: s["spec"] for s in self.kinds("relay-replicas.yaml", "Service")}
        for ordinal, peer in enumerate(peers):
            pod = "%s-%d" % (name, ordinal)
            host, _, port = peer.rpartition(":")
            self.assertEqual(host, pod)
            spec = services[host]
            self.assertEqual(spec["selector"]["statefulset.kubernetes.io/pod-name"], pod)
            (service_port,) = spec["ports"]
            self.assertEqual(str(service_port["port"]), port)
            self.assertEqual(service_port["targetPort"], "http")
            # Each pod finds its own entry by its hostname.
            self.patch(server_tap, "local_hostname", lambda pod=pod: pod)
            _, options = parse_twistd(container["command"] + container["args"], self.placeholder)
            self.assertEqual(options["peer_self"], peer)
        # The governing Service is headless: pods are relay-0.relay, ...
        self.assertEqual(services[statefulset["spec"]["serviceName"]].get("clusterIP"), "None")
        # nginx hashes over the same text, in the same order.
        site = NginxSite.from_configmap(self.kinds("relay-replicas.yaml", "ConfigMap"))
        self.assertEqual(site.upstream_servers("relay"), peers)
        self.assertEqual(site.upstream_servers("relay_grpc"), peers)

    def test_nginx_configmap_is_the_replicas_site(self):
        site = NginxSite.from_configmap(self.kinds("relay-replicas.yaml", "ConfigMap"))
        self.assertEqual(site.settings(), NginxSite(REPLICAS_SITE).settings())

    def test_nginx_pod_mounts_its_site_and_certificate(self):
        (deployment,) = [d for d in self.kinds("relay-replicas.yaml", "Deployment")]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (configmap,) = self.kinds("relay-replicas.yaml", "ConfigMap")
        self.assertEqual(volumes["site"]["configMap"]["name"], configmap["metadata"]["name"])
        self.assertEqual(mounts["site"], "/etc/nginx/conf.d")
        site = NginxSite.from_configmap([configmap])
        for path in site.directives["ssl_certificate"] + site.directives["ssl_certificate_key"]:
            self.assertEqual(os.path.dirname(path), mounts["tls"])
        (listen,) = site.directives["listen"]
        (port,) = container["ports"]
        self.assertEqual(listen.split()[0], str(port["containerPort"]))
        (service,) = [s for s in self.kinds("relay-replicas.yaml", "Service") if s["metadata"]["name"] == "relay-nginx"]
        self.assertEqual(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


@pytest.mark.process
class NginxTests(unittest.SynchronousTestCase):
    site = "relay.conf"

    def setUp(self):
        self.nginx = NginxSite(os.path.join(DEPLOY, "nginx", self.site))
        self.conf = self.nginx.conf
        self.directives = self.nginx.directives

    def test_read_timeout_longer_than_the_relays_silences(self):
        timeout = ServerOptions()
        timeout.parseOptions([])
        for key in ("proxy_read_timeout", "grpc_read_timeout"):
            for read in self.directives.get(key, []):
                # A long poll lasts 30 s; a backend may take inactive_request_timeout.
                self.assertGreater(duration(read), max(30.0, timeout["inactive_request_timeout"]))
        self.assertTrue(self.directives["proxy_read_timeout"])

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
        nginx = find_nginx()
        if nginx is None:
            raise unittest.SkipTest("nginx is not installed")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = self.nginx.plain_http(folder, 18080, 18081 if "http2" in self.conf else 0)
        result = subprocess.run([nginx, "-t", "-p", folder, "-c", path], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)


class ReplicasNginxTests(NginxTests):
    """The site in front of several replicas: what tests/test_replicas.py runs for real."""

    site = "relay-replicas.conf"

    def test_consistent_hash_on_the_name_then_keepalive(self):
        for upstream in ("relay", "relay_grpc"):
            block = re.search(r"upstream %s \{(.*?)\}" % upstream, self.conf, re.S).group(1)
            lines = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
            # nginx wants the balancer before keepalive.
            self.assertEqual(lines[0], "hash $relay_name consistent;")
            self.assertTrue(lines[-1].startswith("keepalive "))
            for line in lines[1:-1]:
                # A dead replica is skipped at its first failure.
                self.assertRegex(line, r"^server \S+ max_fails=1 fail_timeout=\d+s;$")
        self.assertEqual(self.nginx.upstream_servers("relay"), self.nginx.upstream_servers("relay_grpc"))
        self.assertGreater(len(self.nginx.upstream_servers("relay")), 1)

    def test_grpc_over_http2_and_dead_replicas_skipped(self):
        d = self.directives
        self.assertIn("grpc://relay_grpc", d["grpc_pass"])
        self.assertIn("http://relay", d["proxy_pass"])
        self.assertTrue(all("http2" in listen for listen in d["listen"]))
        self.assertEqual(d["proxy_next_upstream"], ["error timeout"])
        self.assertEqual(d["grpc_next_upstream"], ["error timeout"])
        for key in ("proxy_connect_timeout", "grpc_connect_timeout"):
            (connect,) = d[key]
            self.assertLessEqual(duration(connect), 5.0)


@pytest.mark.memory
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


@pytest.mark.memory
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
