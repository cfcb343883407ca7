"""
The Go relay's Prometheus metrics, under the Go names and label sets.

Dashboards built on the Go server query C{broker_requests{method,backend}},
C{broker_responses{method,result,backend}} and the histograms
C{broker_responses_durations}, C{broker_backend_responses_durations} and
C{broker_overhead_durations} (C{{method,backend}}), and the process
collector's C{process_*} series. Go dropped the C{request_path} label for
cardinality, and so do we. Go's client library names the broker counters
without the C{_total} suffix that prometheus_client adds, but keeps it where
the name carries it (C{process_cpu_seconds_total}), so L{render} writes the
text format itself; the bookkeeping (label children, histogram buckets, the
process collector) stays prometheus_client's.

C{tests/fixtures/go_metrics.txt} holds the Go server's series, and a test
compares ours with it. The series Go has no counterpart for: the C{relay_*}
gauges of L{RelayMetrics.watch}, and Python's C{python_info} and
C{python_gc_*} in place of Go's C{go_*}.

Label values come only from names the server knows (backends that polled,
ids it issued): a caller who posts made-up ids or polls for a name it is
refused cannot add series. Every series of a backend goes when the broker
forgets the backend.
"""

import resource
from typing import Any, Dict, Iterable, Optional, Tuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# client_golang's DefBuckets, which the Go server's histograms use.
GO_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))

# The Go server's counters, named without _total. Every other counter keeps
# prometheus_client's _total, as client_golang's process collector does.
GO_BARE_COUNTERS = frozenset(("broker_requests", "broker_responses"))

# Go's result label for a response to an id the broker does not know.
RESULT_UNKNOWN_ID = "not recognized or reaches the inactivity timeout"

# The backend label of responses to unknown ids whose name is not a known
# backend: one series in all, however many names are made up.
UNKNOWN_BACKEND = ""


class RelayMetrics:
    """
    The broker's metrics sink: one object per server, holding its own
    registry so that tests and several servers in one process do not share
    state.

    @param process: also export the C{process_*} series (and Python's
        C{python_info} and C{python_gc_*}).
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, process: bool = True):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        two = ["method", "backend"]
        self.requests = _Children(Counter, "broker_requests", "Number of requests to the broker", two, r)
        self.responses = _Children(
            Counter,
            "broker_responses",
            "Number of responses from the broker",
            ["method", "result", "backend"],
            r,
        )
        self.response_durations = _Children(
            Histogram, "broker_responses_durations", "Time from request to final response in s", two, r
        )
        self.backend_durations = _Children(
            Histogram,
            "broker_backend_responses_durations",
            "Time from backend request to final response in s",
            two,
            r,
        )
        self.overhead_durations = _Children(
            Histogram,
            "broker_overhead_durations",
            "Extra time spend between relay server and client in s",
            two,
            r,
        )
        # Two series at most: reason is timeout or reset.
        self.dead_connections = Counter(
            "relay_dead_connections",
            "Accepted connections (users' and relay-clients') that died: the peer stopped "
            "answering (timeout) or the connection was reset (reset)",
            ["reason"],
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
            r.register(_VirtualMemoryMax())
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def watch(self, broker) -> None:
        """
        Also export the broker's live state (not in the Go server): what an
        operator checks first, and what a soak test must see drop to zero.
        """
        self.registry.register(_BrokerState(broker))

    def forget_backend(self, backend: str) -> None:
        """Drop every series of a backend the broker has forgotten."""
        for metric in (
            self.requests,
            self.responses,
            self.response_durations,
            self.backend_durations,
            self.overhead_durations,
        ):
            metric.remove_by_labels({"backend": backend})

    def render(self) -> bytes:
        return render(self.registry.collect())


class _Children:
    """
    A labelled metric whose children are looked up once per label set:
    prometheus_client's C{labels()} takes a lock and builds tuples on every
    call, and the broker makes several per request.
    """

    def __init__(self, kind, name: str, documentation: str, labelnames, registry):
        extra = {"buckets": GO_BUCKETS} if kind is Histogram else {}
        self.metric = kind(name, documentation, labelnames, registry=registry, **extra)
        self._backend = labelnames.index("backend")
        self._children: Dict[Tuple[str, ...], Any] = {}

    def labels(self, *values):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def remove_by_labels(self, labels):
        backend = labels["backend"]
        self._children = {k: v for k, v in self._children.items() if k[self._backend] != backend}
        self.metric.remove_by_labels(labels)


class _VirtualMemoryMax:
    """client_golang's C{process_virtual_memory_max_bytes}: RLIMIT_AS."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        except (OSError, ValueError):
            return
        if soft == resource.RLIM_INFINITY or soft < 0:
            soft = 2**64 - 1  # what Go reports for "unlimited"
        yield GaugeMetricFamily(
            "process_virtual_memory_max_bytes",
            "Maximum amount of virtual memory available in bytes.",
            value=float(soft),
        )


class _BrokerState:
    def __init__(self, broker):
        self.broker = broker

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "relay_pending_requests", "User requests in flight", value=len(self.broker.requests)
        )
        # Each backend's connection health, read from the broker's own
        # counts (nothing is done per poll for it); counters only once
        # they are above zero, so that a quiet backend adds one series.
        backends = self.broker.backends.values()
        last_poll = GaugeMetricFamily(
            "relay_backend_last_poll_timestamp_seconds",
            "When a relay-client last polled for the backend (Unix time)",
            labels=["backend"],
        )
        reconnects = CounterMetricFamily(
            "relay_backend_reconnects",
            "Polls for the backend that came on a connection that had not polled for it, "
            "after its first such connection",
            labels=["backend"],
        )
        dead = CounterMetricFamily(
            "relay_backend_dead_connections",
            "Connections that polled for the backend and died (timeout or reset)",
            labels=["backend"],
        )
        lost = CounterMetricFamily(
            "relay_backend_lost_answers",
            "Poll answers whose connection died before the relay-client showed it had them: "
            "requeued (provably never arrived, handed to the next poll) or failed (502)",
            labels=["backend", "outcome"],
        )
        for b in backends:
            last_poll.add_metric([b.name], b.last_poll)
            if b.connections > 1:
                reconnects.add_metric([b.name], b.connections - 1)
            if b.dead_connections:
                dead.add_metric([b.name], b.dead_connections)
            if b.requeued:
                lost.add_metric([b.name, "requeued"], b.requeued)
            if b.lost:
                lost.add_metric([b.name, "failed"], b.lost)
        yield last_poll
        yield reconnects
        yield dead
        yield lost
        yield GaugeMetricFamily(
            "relay_backends", "Backend names currently known", value=len(self.broker.backends)
        )
        yield GaugeMetricFamily(
            "relay_open_polls",
            "Relay-client long polls currently waiting",
            value=sum(len(b.polls) for b in self.broker.backends.values()),
        )


def go_float(value: float) -> str:
    """
    A number as client_golang writes it: C{strconv.FormatFloat(v, 'g', -1,
    64)}, the shortest digits that read back the same, in exponent form
    below 1e-4 and from 1e6 up (C{59252736} is C{5.9252736e+07}).
    """
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    text = repr(float(value))  # Python's repr is the shortest round trip too
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    significant = digits.lstrip("0")
    exp = int(exponent or 0) + len(whole) - 1 - (len(digits) - len(significant))
    if exp < -4 or exp >= 6:
        significant = significant.rstrip("0")
        head = significant[0] + ("." + significant[1:] if len(significant) > 1 else "")
        return "%s%se%s%02d" % (sign, head, "-" if exp < 0 else "+", abs(exp))
    # Python writes these without an exponent, as Go does.
    return sign + (whole if fraction == "0" else mantissa)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return (
        "{"
        + ",".join(
            '%s="%s"'
            % (k, go_float(float(v)) if k == "le" else v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\""))
            for k, v in sorted(labels.items())
        )
        + "}"
    )


def render(families: Iterable) -> bytes:
    """
    The Prometheus text format (0.0.4), with counters named as Go names them
    (L{GO_BARE_COUNTERS} without C{_total}, the others with it) and without
    prometheus_client's C{_created} series.
    """
    out = []
    for family in families:
        name = family.name
        kind = family.type
        if kind == "unknown":
            kind = "untyped"
        elif kind in ("info", "stateset"):
            kind = "gauge"
        total = None
        if kind == "counter":
            total = name + "_total"
            if name not in GO_BARE_COUNTERS:
                name = total
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, doc, name, kind))
        for sample in family.samples:
            sname = sample.name
            if sname.endswith("_created"):
                continue
            if sname == total:
                sname = name
            out.append("%s%s %s\n" % (sname, _labels(sample.labels), go_float(sample.value)))
    return "".join(out).encode("utf-8")
