"""
The body of C{GET /api/status}: one snapshot of the server, its backends,
the requests in flight and the last finished ones.

Everything that changes per event on the request path is read here, at
snapshot time, from the broker's own objects (open polls, in-flight
requests and their byte counts, the state a request is in), so that the event
handlers of L{relay.server.admin.stats} stay a few attribute updates. The cost moves
to the snapshot, which is paged: with 10,000 backends the page's sort key
is computed for all of them, the full entry only for the page.

docs/server.md ("The admin view") explains every field.
"""

import os
import platform
import sys
from itertools import islice
from typing import Any, Dict, List, Optional

import relay
from relay.server.admin.stats import (
    BUCKET,
    CANCELLED,
    ERROR_KINDS,
    LAST_MINUTE,
    SERIES,
    AdminStats,
    BackendStats,
    quantile,
)
from relay.server.broker import Broker
from relay.server.pending import PendingRequest

# A backend whose relay-client polled this recently counts as present even
# with no poll open: a relay-client polls again right after each answer.
PRESENT_GRACE = 10.0
MAX_LIMIT = 1000
# Backends per answer unless asked otherwise: with their recent requests,
# a page of 100 is already a few hundred kilobytes.
DEFAULT_LIMIT = 100
DEFAULT_IN_FLIGHT = 200
SORT_KEYS = ("name", "state", "open_polls", "in_flight", "requests", "bytes", "p50", "p99", "errors", "last_poll")
_STATE_ORDER = {"connected": 0, "idle": 1, "gone": 2}


class Query:
    """The paging, sorting and selection a caller asks for."""

    def __init__(self, args: Optional[Dict[bytes, List[bytes]]] = None):
        args = args or {}

        def text(name: str, default: str = "") -> str:
            values = args.get(name.encode())
            return values[0].decode("utf-8", "replace") if values else default

        def number(name: str, default: int, high: int) -> int:
            try:
                return max(0, min(high, int(text(name, str(default)))))
            except ValueError:
                return default

        self.offset = number("offset", 0, 10 ** 9)
        self.limit = number("limit", DEFAULT_LIMIT, MAX_LIMIT)
        sort = text("sort", "name")
        self.sort = sort if sort in SORT_KEYS else "name"
        self.descending = text("order", "asc") == "desc"
        self.filter = text("q")
        self.backend = text("backend") or None
        # Recent requests per backend of the page: on by default (a script
        # wants them), off for the page, which asks per selected backend.
        self.recent = text("recent", "1") not in ("0", "false", "no")
        self.in_flight = number("in_flight", DEFAULT_IN_FLIGHT, MAX_LIMIT)


def snapshot(broker: Broker, stats: AdminStats, flags: dict, query: Query) -> dict:
    now = stats.clock.seconds()
    rows = []
    counts = {"connected": 0, "idle": 0, "gone": 0}
    # Forgotten ones first, so that a name polled again after its
    # forgetting shows once, as known.
    table = dict(stats.forgotten)
    table.update(stats.backends)
    for name, b in table.items():
        known = broker.backends.get(name)
        state = _state(b, known, now)
        counts[state] += 1
        if query.filter and query.filter not in name:
            continue
        rows.append((b, known, state))
    rows.sort(key=_sort_key(query.sort, now), reverse=query.descending)
    page = rows[query.offset : query.offset + query.limit]
    items = [_backend(b, known, state, now, query.recent or b.name == query.backend) for b, known, state in page]
    out: Dict[str, Any] = {
        "server": _server(broker, stats, flags, now),
        "totals": {
            "backends": len(broker.backends),
            "forgotten": len(stats.forgotten),
            "connected": counts["connected"],
            "idle": counts["idle"],
            "gone": counts["gone"],
            "in_flight": len(broker.requests),
            "open_polls": sum(len(k.polls) for k in broker.backends.values()),
            "unknown_backend_requests": stats.unknown_requests,
            "records": len(stats.records),
        },
        "backends": {
            "total": len(rows),
            "offset": query.offset,
            "limit": query.limit,
            "sort": query.sort,
            "order": "desc" if query.descending else "asc",
            "bucket_seconds": BUCKET,
            "items": items,
        },
        "in_flight": _in_flight(broker, now, query.in_flight),
        "unknown_backends": [
            {"time": t, "backend": name, "method": method, "path": path}
            for t, name, method, path in reversed(stats.unknown_recent)
        ],
    }
    if query.backend is not None:
        found = stats.backends.get(query.backend) or stats.forgotten.get(query.backend)
        known = broker.backends.get(query.backend)
        detail = None if found is None else _backend(found, known, _state(found, known, now), now, True)
        if detail is not None:
            detail["in_flight_requests"] = _in_flight(broker, now, query.in_flight, query.backend)
        out["detail"] = detail
    return out


def _state(b: BackendStats, known, now: float) -> str:
    """
    C{connected}: a relay-client is there and the backend had traffic in
    the last minute (or has some in flight); C{idle}: a relay-client is
    there, no traffic; C{gone}: no relay-client polls (users get 503
    after 10 s), or the broker forgot the name.
    """
    if known is None or b.forgotten_at is not None:
        return "gone"
    present = bool(known.polls) or now - b.last_poll < PRESENT_GRACE
    if not present:
        return "gone"
    if known.active or any(x.requests for x in b.window(now)):
        return "connected"
    return "idle"


def _minute(b: BackendStats, now: float) -> dict:
    """The last minute's figures, cached until a request ends or a bucket turns."""
    key = (int(now // BUCKET), b.requests)
    if b.summary is not None and b.summary[0] == key:
        return dict(b.summary[1])
    summary = _compute_minute(b, now)
    b.summary = (key, summary)
    return dict(summary)


def _compute_minute(b: BackendStats, now: float) -> dict:
    window = b.window(now, LAST_MINUTE)
    histogram: Dict[int, int] = {}
    for x in window:
        for k, v in x.latency.items():
            histogram[k] = histogram.get(k, 0) + v
    requests = sum(x.requests for x in window)
    return {
        "requests": requests,
        "rate": requests / LAST_MINUTE,
        "bytes": sum(x.bytes for x in window),
        "errors": sum(x.errors for x in window),
        "p50": quantile(histogram, 0.5),
        "p99": quantile(histogram, 0.99),
    }


def _sort_key(key: str, now: float):
    if key == "name":
        return lambda row: row[0].name
    if key == "state":
        return lambda row: (_STATE_ORDER[row[2]], row[0].name)
    if key == "open_polls":
        return lambda row: (len(row[1].polls) if row[1] is not None else 0, row[0].name)
    if key == "in_flight":
        return lambda row: (len(row[1].active) if row[1] is not None else 0, row[0].name)
    if key == "last_poll":
        return lambda row: (row[0].last_poll, row[0].name)
    if key == "errors":
        return lambda row: (sum(row[0].errors.values()), row[0].name)
    if key in ("requests", "bytes"):
        return lambda row: (sum(getattr(x, key) for x in row[0].window(now)), row[0].name)
    # p50, p99: the only keys that need the histograms of every row.
    return lambda row: (_minute(row[0], now)[key] or 0.0, row[0].name)


def _backend(b: BackendStats, known, state: str, now: float, recent: bool) -> dict:
    current = int(now // BUCKET)
    by_index = {x.index: x for x in b.series}
    rate, p99 = [], []
    for index in range(current - SERIES + 1, current + 1):
        x = by_index.get(index)
        rate.append(x.requests / BUCKET if x is not None else 0.0)
        p99.append(quantile(x.latency, 0.99) if x is not None else None)
    out = {
        "name": b.name,
        "state": state,
        "forgotten": b.forgotten_at is not None,
        "forgotten_at": b.forgotten_at,
        "open_polls": len(known.polls) if known is not None else 0,
        "relay_clients": [{"peer": peer, "last_poll": t} for peer, t in reversed(b.peers.items())],
        "first_poll": b.first_poll,
        "last_poll": b.last_poll,
        "in_flight": len(known.active) if known is not None else 0,
        "connections": _connections(known),
        "last_minute": _minute(b, now),
        "errors": dict(b.errors),
        "totals": {
            "requests": b.requests,
            "bytes_in": b.bytes_in,
            "bytes_out": b.bytes_out,
            "cancelled": b.cancelled,
        },
        "series": {"rate": rate, "p99": p99},
    }
    if recent:
        out["recent"] = [r.as_json() for r in reversed(b.recent)]
        out["recent_errors"] = [r.as_json() for r in reversed(b.recent_errors)]
    return out


def _connections(known) -> dict:
    """
    The health of a backend's poll connections, from the broker (so zero
    again once it forgot the name): see docs/server.md, "Metrics".
    """
    if known is None:
        return {"reconnects": 0, "dead": 0, "requeued": 0, "failed": 0}
    return {
        "reconnects": known.reconnects,
        "dead": known.dead_connections,
        "requeued": known.requeued,
        "failed": known.lost,
    }


def request_state(pending: PendingRequest) -> str:
    if getattr(pending.sink, "tunnel", None) is not None:
        return "upgraded"
    if pending.started:
        return "streaming"
    if pending.picked_up:
        return "waiting_for_backend"
    return "waiting_for_pickup"


def _in_flight(broker: Broker, now: float, limit: int, backend: Optional[str] = None) -> dict:
    if backend is not None:
        known = broker.backends.get(backend)
        ids = sorted(known.active) if known is not None else []
        pendings = [p for p in (broker.requests.get(i) for i in ids) if p is not None]
        pendings.sort(key=lambda p: p.start)
    else:
        # The broker's dict keeps creation order: the oldest come first.
        pendings = list(islice(broker.requests.values(), limit))
    items = []
    for pending in pendings[:limit]:
        method, path, bytes_in, headers = pending.info or ("", "", 0, None)
        sink = pending.sink
        tunnel = getattr(sink, "tunnel", None)
        item = {
            "id": pending.id,
            "backend": pending.backend,
            "method": method,
            "path": path,
            "start": pending.start,
            "age": now - pending.start,
            "bytes_in": bytes_in + (tunnel.bytes_in if tunnel is not None else 0),
            "bytes_out": getattr(sink, "bytes", 0),
            "state": request_state(pending),
        }
        if headers is not None:
            item["request_headers"] = headers
        items.append(item)
    total = len(pendings) if backend is not None else len(broker.requests)
    return {"total": total, "items": items}


def _server(broker: Broker, stats: AdminStats, flags: dict, now: float) -> dict:
    return {
        "version": relay.__version__,
        "now": now,
        "started": stats.started_at,
        "uptime": now - stats.started_at,
        "interpreter": "%s %s" % (platform.python_implementation(), platform.python_version()),
        "pid": os.getpid(),
        "rss_bytes": _rss(),
        "open_fds": _open_fds(),
        "draining": broker.stopping,
        "dead_connections": {
            "timeout": broker.dead_connections.get("timeout", 0),
            "reset": broker.dead_connections.get("reset", 0),
        },
        "flags": flags,
        "admin": {
            "ring": stats.ring,
            "error_ring": stats.error_ring,
            "records_cap": stats.total,
            "inspect_headers": stats.inspect_headers,
        },
    }


def _rss() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:
        return None


def _open_fds() -> Optional[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            # Less the descriptor listdir itself holds open.
            return len(os.listdir(folder)) - 1
        except OSError:
            continue
    return None


def effective_flags(options, secret_words=("token", "secret", "password", "key")) -> dict:
    """
    The server's flags as parsed (defaults included), for the status: a
    flag whose name or endpoint field suggests a secret shows only whether
    it is set. Token files hold hashes, but their paths say where
    credentials live, which the view has no need to tell.
    """
    out = {}
    names = [p[0] for p in getattr(options, "optParameters", [])]
    names += [f[0] for f in getattr(options, "optFlags", [])]
    for name in names:
        if name not in options:
            continue
        value = options[name]
        if any(word in name.lower() for word in secret_words):
            value = "<redacted>" if value else value
        elif isinstance(value, str) and ":" in value:
            value = _redact_endpoint(value, secret_words)
        elif not isinstance(value, (int, float, bool, type(None))):
            value = getattr(value, "name", None) or str(value)  # a LogLevel: "info"
        out[name] = value
    return out


def _redact_endpoint(text: str, secret_words) -> str:
    """C{ssl:443:privateKey=key.pem:password=x} without the values of secret-looking fields."""
    fields = text.split(":")
    for i, field in enumerate(fields):
        key, eq, _ = field.partition("=")
        if eq and any(word in key.lower() for word in secret_words):
            fields[i] = key + "=<redacted>"
    return ":".join(fields)


__all__ = ["Query", "snapshot", "effective_flags", "request_state", "CANCELLED", "ERROR_KINDS"]
