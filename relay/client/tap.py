"""
C{twistd relay-client}: the relay client, configured like the Go
C{http-relay-client}, so that its Kubernetes manifests work unchanged.

Go's boolean flags take C{--preserve_host}, C{--preserve_host=false} and
C{-preserve_host=0}; Twisted's option parser has no such thing, so they are
declared as parameters and a bare flag is read as C{=true}.
"""

import atexit
import os
import sys
from typing import List

from twisted.logger import Logger
from twisted.python import usage

from relay import tuning
from relay.client.service import RelayClientService, make_client_service
from relay.config import ClientConfig, flag_default, from_options
from relay.http1_engine import HELP as HTTP1_ENGINE_HELP
from relay.logs import twistd_log_observer
from relay.options import (
    GoFlagOptions,
    go_int,
    http1_engine,
    log_format,
    log_level,
    nonnegative_duration,
    nonnegative_int,
    positive_int,
    ratio,
    tracing_mode,
)
from relay.outbound.address import split_host_port
from relay.outbound.tls import load_trust_root
from relay.tracing import CLIENT_NAME, tracing_for

log = Logger()


def default(flag: str):
    return flag_default(ClientConfig, flag)

_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_FALSE = ("0", "f", "F", "false", "FALSE", "False")


def go_bool(text) -> bool:
    """Go's C{strconv.ParseBool}."""
    if isinstance(text, bool):
        return text
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise usage.UsageError("invalid boolean value %r: use true or false" % (text,))


go_bool.coerceDoc = "true or false; a bare --flag means true."  # type: ignore[attr-defined]


def scheme(text: str) -> str:
    if text not in ("http", "https"):
        raise usage.UsageError("scheme must be http or https, not %r" % (text,))
    return text


BOOL_FLAGS = (
    "preserve_host",
    "disable_http2",
    "force_http2",
    "disable_auth_for_remote",
)


class Options(GoFlagOptions):
    command = "relay-client"
    synopsis = "[options]"
    ignored_go_flags = ("pprof_port",)
    longdesc = (
        "The relay client, wire-compatible with the Cloud Robotics Go http-relay-client: "
        "it long-polls the relay server for requests sent to --server_name, makes them "
        "against the backend and posts the answers back. Flags also accept dashes "
        "(--server-name) and Go's single dash (-server_name=robot1); boolean flags take "
        "=true/=false. Authentication to the relay: --relay_token_file (a Bearer token), "
        "or none with --disable_auth_for_remote; the Go client's Google application-default "
        "credentials are not supported."
    )
    optParameters = [
        ["backend_scheme", None, default("backend_scheme"),
         "Connection scheme (http, https) for connection from relay client to backend server.", scheme],
        ["backend_address", None, default("backend_address"),
         "Hostname (and port) of the backend server as seen by the relay client."],
        ["backend_path", None, default("backend_path"), "Path prefix for backend requests."],
        ["preserve_host", None, default("preserve_host"),
         "Preserve Host header of the original request for compatibility with "
         "cross-origin request checks (otherwise Host is --backend_address).", go_bool],
        ["relay_scheme", None, default("relay_scheme"),
         "Connection scheme (http, https) for connection from relay client to relay server.", scheme],
        ["relay_address", None, default("relay_address"),
         "Hostname (and port) of the relay server as seen by the relay client."],
        ["relay_prefix", None, default("relay_prefix"), "Path prefix for the relay server."],
        ["server_name", None, default("server_name"),
         "Fetch requests from the relay server for this server name."],
        ["authentication_token_file", None, default("authentication_token_file"),
         "File with authentication token for backend requests: sent as "
         "'Authorization: Bearer <token>', re-read for every request."],
        ["relay_token_file", None, default("relay_token_file"),
         "File with a token for the relay server: sent as 'Authorization: Bearer <token>' "
         "on every relay call, re-read each time. (Not a Go client flag: it stands in "
         "for the Google credentials the Go client uses.)"],
        ["root_ca_file", None, default("root_ca_file"),
         "File with root CA cert(s) (PEM) to verify the backend's TLS certificate "
         "(default: the system's CAs)."],
        ["max_chunk_size", None, default("max_chunk_size"),
         "Max size of data in bytes to accumulate before sending to the peer.", positive_int],
        ["block_size", None, default("block_size"),
         "Size of i/o buffer in bytes (accepted for compatibility: reads are as large as "
         "the network delivers).", positive_int],
        ["num_pending_requests", None, default("num_pending_requests"),
         "Number of pending http requests (long polls) to the relay.", positive_int],
        ["max_pending_requests", None, default("max_pending_requests"),
         "Not in Go: while requests keep coming, poll up to this many at once "
         "(extra polls close when they come back empty). 0 or at most "
         "--num_pending_requests: never more than --num_pending_requests.", nonnegative_int],
        ["busy_poll_us", None, default("busy_poll_us"),
         "Not in Go: after each burst of work, poll for new events for up to this many "
         "microseconds before sleeping (yielding the CPU to anything ready to run). "
         "Cuts latency where waking an idle CPU is slow (VMs), at the cost of up to a "
         "core of CPU under moderate load; on a busy machine with few cores it can "
         "slow things down (docs/performance.md). 0: off. Needs the epoll reactor (the default on Linux).",
         nonnegative_int],
        ["tcp_keepalive_interval", None, default("tcp_keepalive_interval"),
         "Not in Go: TCP keepalive probes on the client's connections after this much "
         "silence, and as often while it lasts (a Go duration; 0: off), so that a long "
         "poll whose path died (a NAT that forgot it, a Wi-Fi handover) is noticed."],
        ["dead_connection_timeout", None, default("dead_connection_timeout"),
         "Not in Go: a connection whose peer has acknowledged nothing for this long "
         "(unanswered keepalives, unacknowledged data, a connect that gets no answer) "
         "is closed and the call tried again on a new one (a Go duration; 0: the "
         "kernel's defaults, minutes)."],
        ["max_idle_conns_per_host", None, default("max_idle_conns_per_host"),
         "The maximum number of idle (keep-alive) connections to keep per-host.", positive_int],
        ["disable_http2", None, default("disable_http2"),
         "Disable http2 protocol usage: HTTP/1.1 to the backend (the default unless "
         "--force_http2).", go_bool],
        ["force_http2", None, default("force_http2"),
         "Force http2 to the backend, e.g. for gRPC: cleartext HTTP/2 with prior knowledge "
         "(h2c) for --backend_scheme=http, HTTP/2 chosen by ALPN for https. Upgrades "
         "(WebSockets) still use HTTP/1.1.", go_bool],
        ["disable_auth_for_remote", None, default("disable_auth_for_remote"),
         "Disable auth when talking to the relay server (for local testing, or when "
         "--relay_token_file is not needed).", go_bool],
        ["trace-stackdriver-project-id", None, default("trace-stackdriver-project-id"),
         "Go's tracing to Google Cloud: when set, spans go to Cloud Trace in this project "
         "(needs the opentelemetry-exporter-gcp-trace package; without it, one line says what "
         "to install or which OTLP setting to use). Turns tracing on unless --tracing=false."],
        ["tracing", None, default("tracing"),
         "Not in Go: distributed tracing over OpenTelemetry (the relay[tracing] extra), "
         "configured by the standard OTEL_* variables. auto: on when OTEL_EXPORTER_OTLP_ENDPOINT "
         "or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (unless OTEL_SDK_DISABLED=true) or "
         "--trace-stackdriver-project-id is; true: on (OTLP to localhost:4318 when no variable "
         "names an endpoint); false: off.", tracing_mode],
        ["trace_sampling_ratio", None, default("trace_sampling_ratio"),
         "Share of the traces that begin here (relayed requests without a sampled trace "
         "context) that are sampled, as Go's parent-based 1e-4; requests that bring a context "
         "follow its decision. OTEL_TRACES_SAMPLER, when set, overrides it.", ratio],
        ["pprof_port", None, default("pprof_port"),
         "Go's profiler port: accepted so that Go manifests work, and ignored (with a "
         "warning when set).", go_int],
        ["log_level", None, default("log_level"),
         "Least severe level logged: debug, info, warn, error, or Go's -4, 0, 4, 8."],
        ["log_format", None, default("log_format"), "json (one object per line, as the Go relay) or text (key=value)."],
        [
            "http1_engine",
            None,
            default("http1_engine"),
            HTTP1_ENGINE_HELP,
        ],
    ]

    def normalize(self, argv: List[str]) -> List[str]:
        out = []
        for arg in super().normalize(argv):
            if arg.startswith("--") and "=" not in arg and arg[2:] in BOOL_FLAGS:
                arg += "=true"
            out.append(arg)
        return out

    def postOptions(self):
        for name in BOOL_FLAGS:
            self[name] = go_bool(self[name])
        if self["force_http2"] and self["disable_http2"]:
            raise usage.UsageError("--force_http2 and --disable_http2 contradict each other: give one of them")
        for name in ("tcp_keepalive_interval", "dead_connection_timeout"):
            self.check(name, nonnegative_duration)
        self.check("log_level", log_level)
        self.check("log_format", log_format)
        self.check("http1_engine", http1_engine)
        self.check("relay_address", host_port)
        self.check("backend_address", host_port)
        for name in ("relay_token_file", "authentication_token_file", "root_ca_file"):
            self.check(name, readable_file)
        self["relay_prefix"] = self["relay_prefix"].rstrip("/")
        if self["relay_prefix"] and not self["relay_prefix"].startswith("/"):
            self["relay_prefix"] = "/" + self["relay_prefix"]
        self["trust_root"] = None
        if self["root_ca_file"]:
            try:
                self["trust_root"] = load_trust_root(self["root_ca_file"])
            except ValueError as e:
                raise usage.UsageError("--root_ca_file=%s: %s" % (self["root_ca_file"], e)) from None
        if not self["server_name"]:
            raise usage.UsageError(
                "--server_name must not be empty; give the backend's name, e.g. --server_name=robot1"
            )
        self.config = from_options(ClientConfig, self)


def host_port(text: str) -> str:
    """
    C{host}, C{host:port} or C{[v6]:port}, checked now: a client that polls
    C{localhost:abc} would retry for ever.
    """
    try:
        split_host_port(text, default_port=0)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    return text


def readable_file(path: str) -> str:
    """An empty value (not set), or a file we can read now."""
    if path:
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise usage.UsageError(
                "cannot read the file (%s); give the path of an existing file" % (e.strerror or e,)
            ) from None
    return path


def exit_after_stop(reactor, code: int = 1):
    """
    The Go client exits on fatal errors and its supervisor restarts it. twistd
    has no exit codes, so: stop the reactor (services stop, the pid file
    goes) and set the process's exit status as the interpreter ends.
    """

    def on_fatal(message: str) -> None:
        def finish():
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)

        atexit.register(finish)
        if reactor.running:
            reactor.stop()

    return on_fatal


def _warn_unsupported(options) -> None:
    if not options["disable_auth_for_remote"] and not options["relay_token_file"]:
        log.warn(
            "Google credentials for the relay server are not supported; talking to the relay "
            "without authentication (use --relay_token_file, or --disable_auth_for_remote to "
            "silence this)"
        )
    for name in options.ignored_flags():
        log.warn("Ignoring --{flag}: not supported by this relay-client", flag=name)


def makeService(options: Options, reactor=None) -> RelayClientService:
    if reactor is None:
        from twisted.internet import reactor
    reactor.callWhenRunning(_warn_unsupported, options)
    tuning.apply(reactor, options["busy_poll_us"], log)
    service = make_client_service(
        reactor,
        options.config,
        trust_root=options["trust_root"],
        on_fatal=exit_after_stop(reactor),
        log_observer=twistd_log_observer(options.config, getattr(options, "parent", None)),
    )
    service.tracing_plan, service.handler.tracer = tracing_for(reactor, options.config, CLIENT_NAME, os.environ, log)
    return service
