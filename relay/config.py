"""
One frozen configuration per side, and the only home of every default.

Each field is a flag of C{twistd relay} or C{twistd relay-client} (same
name, dashes as underscores) holding its parsed value. The option tables
take their defaults from these classes (L{flag_default}), each tap builds
its config once from the parsed options (L{from_options}), and the builders
take the config whole, so that a default cannot drift between the flag, the
service and the object that uses it (the client's chunk size and poll count
once did).
"""

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Optional, Type, TypeVar

from twisted.logger import LogLevel

from relay.durations import format_duration

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A config class (ServerConfig, ClientConfig), for what builds one from options.
C = TypeVar("C", bound="DataclassInstance")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def _seconds(value: float):
    """A field in seconds, whose flag takes a Go duration."""
    return dataclasses.field(default=value, metadata={"duration": True})


def _level(value):
    """A field holding a L{LogLevel}, whose flag takes its name."""
    return dataclasses.field(default=value, metadata={"level": True})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What C{twistd relay}'s flags (or C{relay.tac}'s C{RELAY_*} variables) set."""

    port: str = "80"
    block_size: int = 10 * KIB
    inactive_request_timeout: float = _seconds(60.0)
    inactive_backend_timeout: float = _seconds(30 * 60.0)
    max_request_body: int = 100 * MIB
    busy_poll_us: int = 0
    max_buffered_bodies: int = GIB
    # Streamed bodies (our relay-client's, docs/protocol.md) hold no memory:
    # no limit unless one is set. 0: none.
    max_streamed_request_body: int = 0
    client_tokens: Optional[str] = None
    user_tokens: Optional[str] = None
    trusted_user_header: Optional[str] = None
    max_pending_per_backend: int = 1000
    max_backends: int = 100000
    max_headers: int = 500
    max_header_bytes: int = 64 * KIB
    # None: no slowloris guard (tests that step a Clock by hand).
    header_timeout: Optional[float] = _seconds(30.0)
    # Dead peers (relay.net.liveness): keepalive probes this often on an
    # idle connection; a peer silent for the timeout (or data unacknowledged
    # that long) ends the connection. 0 turns either off.
    tcp_keepalive_interval: float = _seconds(5.0)
    dead_connection_timeout: float = _seconds(15.0)
    drain_grace: float = _seconds(5.0)
    log_level: LogLevel = _level(LogLevel.info)
    log_format: str = "json"
    admin_port: Optional[str] = None
    admin_token_file: Optional[str] = None
    inspect_headers: bool = False
    pprof_port: int = 0
    trace_stackdriver_project_id: str = ""
    # Tracing (relay.tracing): auto (on when OTEL_EXPORTER_OTLP_ENDPOINT is
    # set), true or false; the share of traces begun here that are sampled
    # (Go's 1e-4; traces begun upstream follow their parent's decision).
    tracing: str = "auto"
    trace_sampling_ratio: float = 1e-4
    # Several replicas (docs/scaling.md): every replica's host:port as the
    # ingress's upstream block spells them; empty is a single replica.
    peers: str = ""
    # Which entry of peers this replica is; empty: from the hostname.
    peer_self: str = ""
    move_wait: float = _seconds(15.0)
    # The HTTP/1.1 engine (relay.http1_engine): auto, httptools or twisted.
    http1_engine: str = "auto"

    @property
    def debug_logs(self) -> bool:
        return self.log_level <= LogLevel.debug


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """What C{twistd relay-client}'s flags set."""

    backend_scheme: str = "https"
    backend_address: str = "localhost:8080"
    backend_path: str = ""
    preserve_host: bool = True
    relay_scheme: str = "https"
    relay_address: str = "localhost:8081"
    relay_prefix: str = ""
    server_name: str = "server_name"
    authentication_token_file: str = ""
    relay_token_file: str = ""
    root_ca_file: str = ""
    # The Go relay-client's default (some older Go releases use 50 KiB). Any
    # chunking is legal on the wire; 1 MiB pieces cost far fewer POSTs on
    # big responses.
    max_chunk_size: int = MIB
    block_size: int = 64 * KIB
    num_pending_requests: int = 1
    # Not in Go: the burst of extra polls while requests keep coming.
    max_pending_requests: int = 4
    busy_poll_us: int = 0
    # Not in Go: how fast a dead path to the relay server is noticed (TCP
    # keepalive probes, and TCP_USER_TIMEOUT), docs/client.md "Robots on
    # bad networks".
    tcp_keepalive_interval: float = _seconds(3.0)
    dead_connection_timeout: float = _seconds(8.0)
    max_idle_conns_per_host: int = 100
    disable_http2: bool = False
    force_http2: bool = False
    disable_auth_for_remote: bool = False
    trace_stackdriver_project_id: str = ""
    # Tracing (relay.tracing): auto (on when OTEL_EXPORTER_OTLP_ENDPOINT is
    # set), true or false; the share of traces begun here that are sampled
    # (Go's 1e-4; traces begun upstream follow their parent's decision).
    tracing: str = "auto"
    trace_sampling_ratio: float = 1e-4
    pprof_port: int = 0
    log_level: LogLevel = _level(LogLevel.info)
    log_format: str = "json"
    # The HTTP/1.1 engine of the calls to the relay server and the backend
    # (relay.http1_engine): auto, httptools or twisted.
    http1_engine: str = "auto"

    @property
    def relay_url(self) -> str:
        """C{scheme://address} and the relay prefix: where the client's calls go."""
        return "%s://%s%s" % (self.relay_scheme, self.relay_address, self.relay_prefix)

    @property
    def debug_logs(self) -> bool:
        return self.log_level <= LogLevel.debug


def field_name(flag: str) -> str:
    """The config field of a flag (Go's C{trace-stackdriver-project-id} has dashes)."""
    return flag.replace("-", "_")


def flag_default(config_class: type, flag: str) -> str:
    """
    The default of C{flag} as its option table declares it: the config's
    value, spelled as the flag takes it (a Go duration, C{true}/C{false},
    a level's name), so that parsing it gives the config's value back.
    """
    field = {f.name: f for f in dataclasses.fields(config_class)}[field_name(flag)]
    value: Any = field.default
    if field.metadata.get("duration") and value is not None:
        return format_duration(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if field.metadata.get("level"):
        return value.name
    return value


def from_options(config_class: Type[C], options: Mapping[str, Any]) -> C:
    """The config of parsed C{options}: one field per flag, nothing else."""
    return config_class(**{f.name: options[_flag(options, f.name)] for f in dataclasses.fields(config_class)})


def _flag(options, name: str) -> str:
    return name if name in options else name.replace("_", "-")
