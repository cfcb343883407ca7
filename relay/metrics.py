"""
The Go relay's Prometheus metrics, under the Go names.

Dashboards built on the Go server query C{broker_requests},
C{broker_responses}, C{broker_responses_durations},
C{broker_backend_responses_durations} and C{broker_overhead_durations} with
the labels C{method}, C{result}, C{backend} and C{request_path}. Go's client
library exposes counters without the C{_total} suffix that prometheus_client
adds, so L{render} writes the text format itself; the bookkeeping (label
children, histogram buckets, the process collector) stays prometheus_client's.
"""

import re
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# client_golang's DefBuckets, which the Go server's histograms use.
GO_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))

_NUMBERS = re.compile(
    r"(?i)[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}|[a-f0-9]{20,}|[0-9]{2,}"
)


def clean_path(path: str) -> str:
    """
    Replace numbers, long hex strings and GUIDs with C{XXX}, as the Go server
    does, so that C{request_path} does not explode into one series per id.
    """
    return _NUMBERS.sub("XXX", path)


class RelayMetrics:
    """
    The broker's metrics sink: one object per server, holding its own
    registry so that tests and several servers in one process do not share
    state.
    """

    # Distinct request_path values kept per backend. Paths come from users,
    # and every new one adds series to five metrics: past this many, further
    # paths of that backend are counted under "OTHER", so that nobody can
    # grow the server's memory by requesting random URLs.
    max_paths_per_backend = 1000

    def __init__(self, registry: CollectorRegistry = None, process: bool = True):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._paths = {}
        r = self.registry
        three = ["method", "backend", "request_path"]
        self.requests = _Children(Counter, "broker_requests", "Number of requests to the broker", three, r)
        self.responses = _Children(
            Counter,
            "broker_responses",
            "Number of responses from the broker",
            ["method", "result", "backend", "request_path"],
            r,
        )
        self.response_durations = _Children(
            Histogram, "broker_responses_durations", "Time from request to final response in s", three, r
        )
        self.backend_durations = _Children(
            Histogram,
            "broker_backend_responses_durations",
            "Time from backend request to final response in s",
            three,
            r,
        )
        self.overhead_durations = _Children(
            Histogram,
            "broker_overhead_durations",
            "Extra time spend between relay server and client in s",
            three,
            r,
        )
        if process:
            ProcessCollector(registry=r)

    def watch(self, broker) -> None:
        """
        Also export the broker's live state (not in the Go server): what an
        operator checks first, and what a soak test must see drop to zero.
        """
        self.registry.register(_BrokerState(broker))

    def path_label(self, backend: str, path: str) -> str:
        """The C{request_path} label for a request: cleaned, and bounded per backend."""
        label = clean_path(path)
        seen = self._paths.setdefault(backend, set())
        if label not in seen:
            if len(seen) >= self.max_paths_per_backend:
                return "OTHER"
            seen.add(label)
        return label

    def forget_backend(self, backend: str) -> None:
        """Drop every series of a backend the broker has forgotten."""
        self._paths.pop(backend, None)
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
        self._children = {}

    def labels(self, *values):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def remove_by_labels(self, labels):
        backend = labels["backend"]
        self._children = {k: v for k, v in self._children.items() if k[self._backend] != backend}
        self.metric.remove_by_labels(labels)


class _BrokerState:
    def __init__(self, broker):
        self.broker = broker

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "relay_pending_requests", "User requests in flight", value=len(self.broker.requests)
        )
        yield GaugeMetricFamily(
            "relay_backends", "Backend names currently known", value=len(self.broker.backends)
        )
        yield GaugeMetricFamily(
            "relay_open_polls",
            "Relay-client long polls currently waiting",
            value=sum(len(b.polls) for b in self.broker.backends.values()),
        )


def go_float(value: float) -> str:
    """A number as Go's C{strconv.FormatFloat(v, 'g', -1, 64)} writes it."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e21:
        return "%d" % value
    return repr(value)


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
    (no C{_total}) and without prometheus_client's C{_created} series.
    """
    out = []
    for family in families:
        name = family.name
        kind = family.type
        if kind == "unknown":
            kind = "untyped"
        elif kind in ("info", "stateset"):
            kind = "gauge"
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, doc, name, kind))
        for sample in family.samples:
            sname = sample.name
            if sname.endswith("_created"):
                continue
            if kind == "counter" and sname == name + "_total":
                sname = name
            out.append(
                "%s%s %s\n" % (sname, _labels(sample.labels), go_float(sample.value))
            )
    return "".join(out).encode("utf-8")
