"""
C{twistd relay}: the relay server, configured like the Go
C{http-relay-server}: its option table and C{makeService}. The endpoint
strings C{--port} takes are parsed in L{relay.options}; C{relay.tac}'s
environment variables in L{relay.server.tac}.
"""

import os
from typing import List

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from relay import tuning
from relay.config import ServerConfig, flag_default, from_options
from relay.durations import format_duration
from relay.http1_engine import HELP as HTTP1_ENGINE_HELP
from relay.logs import twistd_log_observer
from relay.options import (
    GoFlagOptions,
    check_port,
    duration,
    go_int,
    http1_engine,
    log_format,
    log_level,
    nonnegative_duration,
    nonnegative_int,
    port_endpoint,
    port_number,
    positive_int,
    ratio,
    tracing_mode,
)
from relay.server.admin.service import admin_endpoint, attach_admin
from relay.server.admin.status import effective_flags
from relay.server.admin.web import TokenCheck
from relay.server.auth import AccessPolicy, ClientTokens, TokenFileError, UserTokens
from relay.server.h2 import offer_h2_over_tls
from relay.server.routing import find_self, local_hostname, replica_list
from relay.server.service import CLEAN_SHUTDOWN_TIMEOUT, REAP_INTERVAL, RelayServerService, make_server_service
from relay.startup import report_startup_errors
from relay.tracing import SERVER_NAME, tracing_for

log = Logger()


def default(flag: str):
    return flag_default(ServerConfig, flag)


class Options(GoFlagOptions):
    service_links: List[str]  # set by relay.tac: the variables Kubernetes' service links made
    command = "relay"
    synopsis = "[options]"
    ignored_go_flags = ("pprof_port",)
    longdesc = (
        "A multiplexing HTTP relay server, wire-compatible with the Cloud Robotics "
        "Go http-relay-server: relay-clients long-poll /server/request under a "
        "backend name; users reach backend NAME at /client/NAME/... or with an "
        "X-Server-Name header. Flags also accept dashes (--block-size) and Go's "
        "single dash (-port=80)."
    )
    optParameters = [
        [
            "port",
            None,
            default("port"),
            "Port number to listen on, or a Twisted endpoint string such as "
            "tcp:8080:interface=127.0.0.1 or ssl:443:privateKey=key.pem:certKey=cert.pem; "
            "0 picks a free port (it is logged).",
        ],
        [
            "block_size",
            None,
            default("block_size"),
            "Size in bytes of the reads from an upgraded (101) user connection that "
            "become request-stream chunks.",
            positive_int,
        ],
        [
            "inactive_request_timeout",
            None,
            default("inactive_request_timeout"),
            "Drop a request when its relay-client has sent nothing for this long "
            "(a Go duration such as 60s or 1m30s; the user gets a 504 if no answer "
            "had begun). Checked every %s." % (format_duration(REAP_INTERVAL),),
        ],
        [
            "inactive_backend_timeout",
            None,
            default("inactive_backend_timeout"),
            "Forget a backend name (503 unknown client) when no relay-client has "
            "polled for it for this long (a Go duration).",
        ],
        [
            "max_request_body",
            None,
            default("max_request_body"),
            "Largest request body in bytes the relay buffers (bodies travel whole "
            "in the protocol); larger ones get 413.",
            positive_int,
        ],
        [
            "busy_poll_us",
            None,
            default("busy_poll_us"),
            "Not in Go: after each burst of work, poll for new events for up to this many "
            "microseconds before sleeping (yielding the CPU to anything ready to run). Cuts "
            "latency where waking an idle CPU is slow (VMs), at the cost of up to a core of "
            "CPU under moderate load; on a busy machine with few cores it can slow things "
            "down (docs/performance.md). 0: off. Needs the epoll reactor (the default on Linux).",
            nonnegative_int,
        ],
        [
            "max_buffered_bodies",
            None,
            default("max_buffered_bodies"),
            "Bytes of request bodies held at once across all requests (bodies wait "
            "whole until a relay-client picks them up); beyond it new uploads get 503.",
            positive_int,
        ],
        [
            "max_streamed_request_body",
            None,
            default("max_streamed_request_body"),
            "Not in Go: largest request body in bytes streamed to our relay-clients "
            "(which fetch bodies as they arrive instead of buffered); larger ones get 413. "
            "0: no limit, since a streamed body holds no memory.",
            nonnegative_int,
        ],
        [
            "client_tokens",
            None,
            default("client_tokens"),
            "File of 'NAME_GLOB SHA256_HEX' lines: relay-clients must send "
            "Authorization: Bearer TOKEN valid for the backend name they poll or "
            "answer for (else 403). Re-read when it changes. "
            "`python -m relay.server.auth hash < token` prints a token's hash.",
        ],
        [
            "user_tokens",
            None,
            default("user_tokens"),
            "File of 'SHA256_HEX NAME_GLOB[,NAME_GLOB...]' lines: users must send a "
            "token valid for the backend (Authorization: Bearer, or X-Relay-Token "
            "when the backend needs the Authorization header); 401 without, 403 "
            "for the wrong backend. The consumed header is not relayed.",
        ],
        [
            "trusted_user_header",
            None,
            default("trusted_user_header"),
            "Only accept user requests carrying this header (set by an "
            "authenticating proxy in front, e.g. X-Forwarded-User); 401 otherwise.",
        ],
        [
            "max_pending_per_backend",
            None,
            default("max_pending_per_backend"),
            "Requests in flight per backend; beyond it 503 with Retry-After.",
            positive_int,
        ],
        [
            "max_backends",
            None,
            default("max_backends"),
            "Backend names known at once; polls for new names beyond it get 503.",
            positive_int,
        ],
        ["max_headers", None, default("max_headers"), "Most header lines in a request (else 400).", positive_int],
        [
            "max_header_bytes",
            None,
            default("max_header_bytes"),
            "Most bytes of request headers (else 400).",
            positive_int,
        ],
        [
            "header_timeout",
            None,
            default("header_timeout"),
            "Close connections that take longer than this to send a request's "
            "headers, or sit idle this long between requests (slowloris guard).",
        ],
        [
            "tcp_keepalive_interval",
            None,
            default("tcp_keepalive_interval"),
            "Not in Go: send TCP keepalive probes on a connection (users' and relay-clients') "
            "idle for this long, and as often after, so that a peer that vanished (a robot "
            "in a dead zone, behind a NAT that forgot it) is noticed. 0: no keepalive. "
            "Linux; elsewhere the system's defaults stay.",
        ],
        [
            "dead_connection_timeout",
            None,
            default("dead_connection_timeout"),
            "Not in Go: close a connection whose peer has answered nothing for this long: "
            "keepalive probes unanswered, or sent data unacknowledged (TCP_USER_TIMEOUT). "
            "Its long polls end, and a request whose answer provably never reached its "
            "relay-client goes to the next poll. 0: the system's defaults (minutes to hours). Linux.",
        ],
        [
            "drain_grace",
            None,
            default("drain_grace"),
            "Not in Go: after SIGTERM, keep accepting connections for at least this long "
            "(a Go duration), answering /healthz, polls and new user requests with 503 and "
            "Connection: close, so that load balancers see readiness fail before the port "
            "closes. The port closes once this has passed and no request is in flight "
            "(in-flight requests get at most %s). 0: no grace." % (format_duration(CLEAN_SHUTDOWN_TIMEOUT),),
        ],
        [
            "log_level",
            None,
            default("log_level"),
            "Least severe level logged: debug, info, warn, error, or Go's -4, 0, 4, 8.",
        ],
        [
            "log_format",
            None,
            default("log_format"),
            "json (one object per line, as the Go server) or text (key=value).",
        ],
        [
            "http1_engine",
            None,
            default("http1_engine"),
            HTTP1_ENGINE_HELP,
        ],
        [
            "admin_port",
            None,
            default("admin_port"),
            "Not in Go: serve the operator's live view (an HTML page and GET /api/status) "
            "on this port, apart from user traffic. A number binds 127.0.0.1 only; an "
            "endpoint string (tcp:8081:interface=0.0.0.0) binds where it says. Off by default.",
        ],
        [
            "admin_token_file",
            None,
            default("admin_token_file"),
            "File holding the admin view's token: every request to --admin_port must then "
            "send Authorization: Bearer TOKEN (a browser opens /?token=TOKEN once). "
            "Read at start-up.",
        ],
        [
            "peers",
            None,
            default("peers"),
            "Not in Go: run as one of several replicas behind an ingress that hashes "
            "consistently on the backend name (docs/scaling.md). Every replica's host:port, "
            "comma-separated, spelled and ordered exactly as in the ingress's upstream block, "
            "and the same on every replica. Empty: a single replica.",
        ],
        [
            "peer_self",
            None,
            default("peer_self"),
            "Which entry of --peers this replica is. Default: the entry whose host is this "
            "machine's hostname (a StatefulSet pod relay-2 is relay-2:PORT or relay-2.relay:PORT).",
        ],
        [
            "move_wait",
            None,
            default("move_wait"),
            "With --peers: how long a request for a name no relay-client polls for yet waits "
            "for its first poll (while a dead replica's names move) before it gets 503 unknown client.",
        ],
        [
            "pprof_port",
            None,
            default("pprof_port"),
            "Go's profiler port: accepted so that Go manifests work, and ignored (with a "
            "warning when set); it does not open --admin_port. Profile with py-spy or "
            "PyPy's vmprof instead.",
            go_int,
        ],
        [
            "trace-stackdriver-project-id",
            None,
            default("trace-stackdriver-project-id"),
            "Go's tracing to Google Cloud: when set, spans go to Cloud Trace in this project "
            "(needs the opentelemetry-exporter-gcp-trace package; without it, one line says what "
            "to install or which OTLP setting to use). Turns tracing on unless --tracing=false.",
        ],
        [
            "tracing",
            None,
            default("tracing"),
            "Not in Go: distributed tracing over OpenTelemetry (the relay[tracing] extra), "
            "configured by the standard OTEL_* variables. auto: on when "
            "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (unless "
            "OTEL_SDK_DISABLED=true) or --trace-stackdriver-project-id is; true: on (OTLP to "
            "localhost:4318 when no variable names an endpoint); false: off.",
            tracing_mode,
        ],
        [
            "trace_sampling_ratio",
            None,
            default("trace_sampling_ratio"),
            "Share of the traces that begin here (user requests without a sampled trace "
            "context) that are sampled, as Go's parent-based 1e-4; requests that bring a "
            "context follow its decision. OTEL_TRACES_SAMPLER, when set, overrides it.",
            ratio,
        ],
    ]
    optFlags = [
        [
            "inspect_headers",
            None,
            "Not in Go: the admin view also keeps the headers of the last requests "
            "(those whose name says token, key, auth, cookie, secret, ... always redacted).",
        ],
    ]

    def postOptions(self):
        for name in ("inactive_request_timeout", "inactive_backend_timeout", "header_timeout", "move_wait"):
            self.check(name, duration)
        for name in ("drain_grace", "tcp_keepalive_interval", "dead_connection_timeout"):
            self.check(name, nonnegative_duration)
        self.check("log_level", log_level)
        self.check("log_format", log_format)
        self.check("http1_engine", http1_engine)
        self.check("port", check_port)
        self["endpoint"] = port_endpoint(self["port"])
        self["policy"] = access_policy(self)
        self["admin_check"] = admin_check(self)
        self["peer_self"] = replica_self(self)
        self.config = from_options(ServerConfig, self)


def makeService(options: Options, reactor=None) -> RelayServerService:
    if reactor is None:
        from twisted.internet import reactor
    report_startup_errors("twistd relay")
    reactor.callWhenRunning(_warn_ignored, options)
    tuning.apply(reactor, options["busy_poll_us"], log)
    endpoint = offer_h2_over_tls(endpoints.serverFromString(reactor, options["endpoint"]))
    service = make_server_service(
        endpoint,
        reactor,
        options.config,
        log_observer=twistd_log_observer(options.config, getattr(options, "parent", None)),
        policy=options["policy"],
        port_number=port_number(options["endpoint"]),
    )
    service.tracing_plan, service.tracing = tracing_for(reactor, options.config, SERVER_NAME, os.environ, log)
    service.site.resource.client.tracer = service.tracing
    if options["admin_port"]:
        _attach_admin(service, reactor, options)
    return service


def replica_self(options) -> str:
    """
    This replica's entry in C{--peers} (empty for a single replica), checked
    now: a replica that cannot place itself among its peers can never route.
    """
    if not options["peers"]:
        if options["peer_self"]:
            raise usage.UsageError("--peer_self=%s needs --peers" % (options["peer_self"],))
        return ""
    try:
        peers = replica_list(options["peers"])
    except ValueError as e:
        raise usage.UsageError("--peers=%s: %s" % (options["peers"], e)) from None
    try:
        return find_self(peers, options["peer_self"], local_hostname())
    except ValueError as e:
        flag = "peer_self" if options["peer_self"] else "peers"
        raise usage.UsageError("--%s=%s: %s" % (flag, options[flag], e)) from None


def admin_check(options):
    """The admin view's token check, or None when the view is off."""
    if not options["admin_port"]:
        if options["admin_token_file"] or options["inspect_headers"]:
            raise usage.UsageError("--admin_token_file and --inspect_headers need --admin_port")
        return None
    options.check("admin_port", check_port)
    try:
        return TokenCheck.from_file(options["admin_token_file"])
    except (OSError, ValueError) as e:
        raise usage.UsageError("--admin_token_file=%s: %s" % (options["admin_token_file"], e)) from None


def _attach_admin(service, reactor, options) -> None:
    endpoint = admin_endpoint(options["admin_port"])
    attach_admin(
        service,
        reactor,
        endpoints.serverFromString(reactor, endpoint),
        check=options["admin_check"],
        flags=effective_flags(options),
        keep_headers=bool(options["inspect_headers"]),
        redact=[options["trusted_user_header"]] if options["trusted_user_header"] else [],
        port_flag="--admin_port=%s" % (options["admin_port"],),
        port_number=port_number(endpoint),
    )


def _warn_ignored(options) -> None:
    for name in options.ignored_flags():
        log.warn("Ignoring --{flag}: not supported by this relay", flag=name)


def access_policy(options) -> AccessPolicy:
    def load(name, kind):
        if not options[name]:
            return None
        try:
            return kind(options[name])
        except TokenFileError as e:
            raise usage.UsageError("--%s=%s: %s" % (name, options[name], e)) from None

    return AccessPolicy(
        client_tokens=load("client_tokens", ClientTokens),
        user_tokens=load("user_tokens", UserTokens),
        trusted_user_header=options["trusted_user_header"],
    )
