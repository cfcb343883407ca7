"""
One configuration per side, and one home for each default.

The option tables take their defaults from L{ServerConfig} and
L{ClientConfig}; the builders take a config and declare no default of their
own. These tests walk the option tables, the config classes and every
function of C{relay} to keep it so, and follow each flag's default through
C{makeService} to the object that uses it, where two defaults once drifted
(the client's chunk size and its most polls at once).
"""

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import tempfile
from urllib.parse import urlsplit

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

import relay
from relay import config as config_module
from relay import http1_engine
from relay.client import tap as client_tap
from relay.config import ClientConfig, ServerConfig, field_name, flag_default
from relay.http1_engine import resolve as resolve_engine
from relay.server import tap as server_tap
from tests.support import admin_stats


def parsed(options_class, argv=()):
    options = options_class()
    options.parseOptions(list(argv))
    return options


def logged_line(service, logfile: str) -> str:
    """The first line a twistd service's log observer writes to C{logfile}."""
    service.log_observer({"log_format": "hello", "log_level": LogLevel.info, "log_namespace": "test", "log_time": 0.0})
    with open(logfile) as f:
        return f.readline()


def flags(options_class):
    return [row[0] for row in options_class.optParameters + getattr(options_class, "optFlags", [])]


# Parameters named like a flag that are not the flag.
NOT_FLAGS = {
    # The token files loaded, not their paths; None is no check at all.
    "relay.server.auth.AccessPolicy.__init__",
}

SIDES = ((server_tap.Options, ServerConfig), (client_tap.Options, ClientConfig))


@pytest.mark.memory
class OneHomeTests(unittest.SynchronousTestCase):
    def test_every_flag_is_a_config_field_and_back(self):
        for options_class, config_class in SIDES:
            self.assertEqual(
                sorted(field_name(f) for f in flags(options_class)),
                sorted(f.name for f in dataclasses.fields(config_class)),
                options_class.command,
            )

    def test_option_tables_take_their_defaults_from_the_config(self):
        for options_class, config_class in SIDES:
            for row in options_class.optParameters:
                self.assertEqual(row[2], flag_default(config_class, row[0]), row[0])

    def test_help_texts_state_no_default(self):
        """
        C{--help} prints each default from the config (C{[default: 15s]});
        a help text that says it again ("0 (the default): off") drifts.
        """
        for options_class, _config_class in SIDES:
            for row in options_class.optParameters:
                said = r"\(the default\)|\(default: none\)"
                if row[2] not in (None, ""):
                    said += r"|[Dd]efault: %s\b" % (re.escape(str(row[2])),)
                self.assertNotRegex(row[3], said, row[0])

    def test_help_texts_take_their_intervals_from_the_code(self):
        from relay.durations import format_duration
        from relay.server.service import CLEAN_SHUTDOWN_TIMEOUT, REAP_INTERVAL

        help_text = {row[0]: row[3] for row in server_tap.Options.optParameters}
        self.assertIn("Checked every %s." % (format_duration(REAP_INTERVAL),), help_text["inactive_request_timeout"])
        self.assertIn("at most %s)" % (format_duration(CLEAN_SHUTDOWN_TIMEOUT),), help_text["drain_grace"])

    def test_parsing_no_flags_gives_the_config_defaults(self):
        self.assertEqual(parsed(server_tap.Options).config, ServerConfig())
        self.assertEqual(parsed(client_tap.Options).config, ClientConfig())

    def test_the_config_is_frozen(self):
        config = parsed(server_tap.Options, ["--block_size=4096"]).config
        self.assertEqual(config.block_size, 4096)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.block_size = 1  # type: ignore[misc]

    def test_no_builder_repeats_a_default(self):
        """
        No function or class of C{relay} takes a parameter named after a
        flag with a default of its own: it takes the config, or the value
        without a default.
        """
        fields = [f for c in (ServerConfig, ClientConfig) for f in dataclasses.fields(c)]
        names = {f.name for f in fields}
        # Values too common to tell a repeated default from a coincidence
        # (and durations: 5 s and 60 s are common timeouts).
        values = [f.default for f in fields if f.default not in (None, 0, 1, "", True, False) and not f.metadata]
        offenders = []
        for module in _modules():
            if module is config_module:
                continue
            for where, function in _functions(module):
                try:
                    parameters = inspect.signature(function).parameters.values()
                except (TypeError, ValueError):
                    continue
                for p in parameters:
                    if p.default is inspect.Parameter.empty or where in NOT_FLAGS:
                        continue
                    if p.name in names or any(type(p.default) is type(v) and p.default == v for v in values):
                        offenders.append("%s(%s=%r)" % (where, p.name, p.default))
        self.assertEqual(offenders, [])


def _modules():
    yield relay
    for info in pkgutil.walk_packages(relay.__path__, "relay."):
        if info.name.endswith("_pb2") or info.name.endswith(".generate"):
            continue
        if info.name.endswith(".lean_http1") and not http1_engine.available():
            continue  # the lean engine needs httptools, a CPython-only dependency
        yield importlib.import_module(info.name)


def _functions(module):
    for name, value in vars(module).items():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            yield "%s.%s" % (module.__name__, name), value
        elif inspect.isclass(value):
            for attribute, member in vars(value).items():
                if inspect.isfunction(member):
                    yield "%s.%s.%s" % (module.__name__, name, attribute), member


@pytest.mark.process
class ServerDefaultsReachTheirUsers(unittest.TestCase):
    """Each C{twistd relay} default, from the flag to the object that acts on it."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.options = parsed(server_tap.Options)
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.logfile = os.path.join(folder, "relay.log")
        self.options.parent = {"nodaemon": False, "logfile": self.logfile}
        self.service = server_tap.makeService(self.options, reactor=self.reactor)
        self.broker = self.service.broker
        self.site = self.service.site

    def users(self):
        """Where each flag's value ends up, as (flag, value there)."""
        policy = self.site.resource.client.policy
        [(_, install_args, _)] = [hook for hook in self.reactor.whenRunningHooks if hook[0].__name__ == "install"]
        return {
            "port": self.service.getServiceNamed("listen").flag,
            "block_size": self.broker.block_size,
            "inactive_request_timeout": self.broker.inactive_request_timeout,
            "inactive_backend_timeout": self.broker.inactive_backend_timeout,
            "max_request_body": self.site.max_request_body,
            "busy_poll_us": install_args[1],
            "max_buffered_bodies": self.broker.bodies.limit,
            "max_streamed_request_body": self.site.max_streamed_request_body,
            "client_tokens": policy.client_tokens,
            "user_tokens": policy.user_tokens,
            "trusted_user_header": policy.trusted_user_header,
            "max_pending_per_backend": self.broker.max_pending_per_backend,
            "max_backends": self.broker.max_backends,
            "max_headers": self.site.max_headers,
            "max_header_bytes": self.site.max_header_bytes,
            "header_timeout": self.site.header_timeout,
            "tcp_keepalive_interval": self.site.tcp_keepalive_interval,
            "dead_connection_timeout": self.site.dead_connection_timeout,
            "drain_grace": self.service.drain_grace,
            "log_level": self.broker.trace,
            "log_format": self.logged_line()[:1],
            "pprof_port": self.options.ignored_flags(),
            # Tracing is off by default (no OTEL_EXPORTER_OTLP_ENDPOINT): no tracer at all.
            "trace-stackdriver-project-id": self.service.tracing_plan.project_id,
            "tracing": (self.service.tracing_plan.enabled, self.service.site.resource.client.tracer),
            "trace_sampling_ratio": self.service.tracing_plan.ratio,
            # The admin view is off by default: no statistics in the broker.
            "admin_port": admin_stats(self.broker),
            "admin_token_file": admin_stats(self.broker),
            "inspect_headers": admin_stats(self.broker),
            # A single replica by default: no routing among peers.
            "peers": self.site.resource.client.routing,
            "peer_self": self.site.resource.client.routing,
            "move_wait": self.broker.move_wait,
            "http1_engine": self.site.http1_engine,
        }

    def logged_line(self) -> str:
        return logged_line(self.service, self.logfile)

    def test_every_flag_is_followed(self):
        self.assertEqual(sorted(self.users()), sorted(flags(server_tap.Options)))

    def test_defaults_arrive(self):
        d = ServerConfig()
        users = self.users()
        expected = {
            "port": "--port=%s" % (d.port,),
            "block_size": d.block_size,
            "inactive_request_timeout": d.inactive_request_timeout,
            "inactive_backend_timeout": d.inactive_backend_timeout,
            "max_request_body": d.max_request_body,
            "busy_poll_us": d.busy_poll_us,
            "max_buffered_bodies": d.max_buffered_bodies,
            "max_streamed_request_body": d.max_streamed_request_body,
            "client_tokens": d.client_tokens,
            "user_tokens": d.user_tokens,
            "trusted_user_header": d.trusted_user_header,
            "max_pending_per_backend": d.max_pending_per_backend,
            "max_backends": d.max_backends,
            "max_headers": d.max_headers,
            "max_header_bytes": d.max_header_bytes,
            "header_timeout": d.header_timeout,
            "tcp_keepalive_interval": d.tcp_keepalive_interval,
            "dead_connection_timeout": d.dead_connection_timeout,
            "drain_grace": d.drain_grace,
            "log_level": d.debug_logs,
            "log_format": "{" if d.log_format == "json" else "t",
            "pprof_port": [],
            "trace-stackdriver-project-id": d.trace_stackdriver_project_id,
            "tracing": (False, None),
            "trace_sampling_ratio": d.trace_sampling_ratio,
            "admin_port": None,
            "admin_token_file": None,
            "inspect_headers": None,
            "peers": None,
            "peer_self": None,
            "move_wait": d.move_wait,
            "http1_engine": resolve_engine(d.http1_engine),
        }
        self.assertEqual({k: users[k] for k in expected}, expected)


@pytest.mark.process
class ClientDefaultsReachTheirUsers(unittest.TestCase):
    """Each C{twistd relay-client} flag, from the flag to the object that acts on it."""

    def setUp(self):
        self.service = self.make()

    def make(self, *argv):
        """C{makeService} for C{argv}, logging to a file of its own."""
        self.reactor = MemoryReactorClock()
        self.options = parsed(client_tap.Options, argv)
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.logfile = os.path.join(folder, "relay-client.log")
        self.options.parent = {"nodaemon": False, "logfile": self.logfile}
        return client_tap.makeService(self.options, reactor=self.reactor)

    def when_running(self, name):
        [(_, args, _)] = [hook for hook in self.reactor.whenRunningHooks if hook[0].__name__ == name]
        return args

    def warnings(self):
        """What the client warns about at start-up."""
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            client_tap._warn_unsupported(*self.when_running("_warn_unsupported"))
        finally:
            globalLogPublisher.removeObserver(events.append)
        return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]

    def logged_line(self) -> str:
        return logged_line(self.service, self.logfile)

    def users(self):
        """Where each flag's value ends up, as (flag, value there)."""
        s = self.service
        target = s.handler.target
        backend_agent = s.handler.backend.agent
        relay = urlsplit(s.api.base_url)
        warnings = self.warnings()
        return {
            "backend_scheme": target.scheme,
            "backend_address": target.address,
            "backend_path": target.path_prefix,
            "preserve_host": target.preserve_host,
            "relay_scheme": relay.scheme,
            "relay_address": relay.netloc,
            "relay_prefix": relay.path,
            "server_name": s.api.server_name,
            "authentication_token_file": target.token_file,
            "relay_token_file": s.api.token_file,
            # The backend's connections and the upgrades' verify with it.
            "root_ca_file": (
                backend_agent.endpoint_factory.tls_policy.trust_root,
                s.handler.upgrader.policy.trust_root,
            ),
            "max_chunk_size": s.handler.max_chunk_size,
            # Accepted for Go's manifests; reads are as large as the network
            # delivers, so the config is as far as it goes.
            "block_size": self.options.config.block_size,
            "num_pending_requests": s.num_pending_requests,
            "max_pending_requests": s.max_pending_requests,
            "busy_poll_us": self.when_running("install")[1],
            "max_idle_conns_per_host": (s.api.agent.max_idle_per_host, backend_agent.max_idle_per_host),
            # The relay server's connections are watched for a dead path, and
            # a connect to it gives up as soon as a dead one would.
            "tcp_keepalive_interval": s.api.agent.endpoint_factory.liveness[0],
            "dead_connection_timeout": (
                s.api.agent.endpoint_factory.liveness[1],
                s.api.agent.endpoint_factory.connect_timeout,
            ),
            # HTTP/1.1 to the backend is what --disable_http2 asks for.
            "disable_http2": type(s.handler.backend).__name__,
            "force_http2": type(s.handler.backend).__name__,
            "disable_auth_for_remote": any("Google credentials" in w for w in warnings),
            "pprof_port": [w for w in warnings if "pprof_port" in w],
            "trace-stackdriver-project-id": s.tracing_plan.project_id,
            "tracing": (s.tracing_plan.enabled, s.handler.tracer),
            "trace_sampling_ratio": s.tracing_plan.ratio,
            "log_level": s.handler.trace,
            "log_format": self.logged_line()[:1],
            "http1_engine": (s.api.agent.engine, backend_agent.engine),
        }

    def test_every_flag_is_followed(self):
        self.assertEqual(sorted(self.users()), sorted(flags(client_tap.Options)))

    def test_the_drifted_defaults(self):
        """
        The chunk size is Go's 1 MiB all the way to the handler (the service
        once had 50 KiB of its own), and a client polls up to 4 at once
        while requests keep coming (the service once had 0).
        """
        self.assertEqual(self.service.handler.max_chunk_size, 1024 * 1024)
        self.assertEqual(self.service.max_pending_requests, 4)

    def test_defaults_arrive(self):
        d = ClientConfig()
        self.assertEqual(
            self.users(),
            {
                "backend_scheme": d.backend_scheme,
                "backend_address": d.backend_address,
                "backend_path": d.backend_path,
                "preserve_host": d.preserve_host,
                "relay_scheme": d.relay_scheme,
                "relay_address": d.relay_address,
                "relay_prefix": d.relay_prefix,
                "server_name": d.server_name,
                "authentication_token_file": d.authentication_token_file,
                "relay_token_file": d.relay_token_file,
                "root_ca_file": (None, None) if not d.root_ca_file else "a file",
                "max_chunk_size": d.max_chunk_size,
                "block_size": d.block_size,
                "num_pending_requests": d.num_pending_requests,
                "max_pending_requests": d.max_pending_requests,
                "busy_poll_us": d.busy_poll_us,
                "max_idle_conns_per_host": (d.max_idle_conns_per_host, d.max_idle_conns_per_host),
                "tcp_keepalive_interval": d.tcp_keepalive_interval,
                "dead_connection_timeout": (d.dead_connection_timeout, d.dead_connection_timeout),
                "disable_http2": "Backend" if not d.force_http2 else "H2Backend",
                "force_http2": "H2Backend" if d.force_http2 else "Backend",
                "disable_auth_for_remote": not d.disable_auth_for_remote and not d.relay_token_file,
                "pprof_port": [],
                "trace-stackdriver-project-id": d.trace_stackdriver_project_id,
                "tracing": (False, None),
                "trace_sampling_ratio": d.trace_sampling_ratio,
                "log_level": d.debug_logs,
                "log_format": "{" if d.log_format == "json" else "t",
                "http1_engine": (resolve_engine(d.http1_engine), resolve_engine(d.http1_engine)),
            },
        )

    def test_set_values_arrive(self):
        """The flags whose defaults say little (off, empty), set, and where they land."""
        from tests.support.tls import make_ca_and_server_cert

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        ca_file = os.path.join(folder, "ca.pem")
        with open(ca_file, "wb") as f:
            f.write(make_ca_and_server_cert()[0])
        self.service = self.make(
            "--root_ca_file=" + ca_file,
            "--block_size=4096",
            "--max_idle_conns_per_host=7",
            "--disable_http2",
            "--disable_auth_for_remote",
            "--log_format=text",
            "--tcp_keepalive_interval=7s",
            "--dead_connection_timeout=0",
        )
        users = self.users()
        backend_root, upgrade_root = users["root_ca_file"]
        self.assertIsNotNone(backend_root)
        self.assertIs(backend_root, upgrade_root)
        self.assertIs(backend_root, self.options["trust_root"])
        self.assertEqual(users["block_size"], 4096)
        self.assertEqual(users["max_idle_conns_per_host"], (7, 7))
        self.assertEqual(users["disable_http2"], "Backend")
        self.assertFalse(users["disable_auth_for_remote"], "warned about credentials all the same")
        self.assertEqual(users["log_format"], "t")
        self.assertEqual(users["tcp_keepalive_interval"], 7.0)
        # 0: the kernel's own timeouts, and connects wait as long as before.
        self.assertEqual(users["dead_connection_timeout"], (0.0, 30.0))
        # What --disable_http2 acts on: it cannot be had with --force_http2.
        self.assertRaises(usage.UsageError, parsed, client_tap.Options, ["--disable_http2", "--force_http2"])
