#!/usr/bin/env python3
"""
Benchmark of the relay: one command, one markdown report (bench/README.md).

    python3 bench/run.py                                    # side by side with the Go relay
    python3 bench/run.py --python CPYTHON --python PYPY     # rows for both interpreters, one run
    python3 bench/run.py --quick --skip-rss --skip-idle     # a smoke run (~45 s)
    python3 bench/run.py --single                           # a report of one implementation

Side by side (the default): the Go bench-backend behind four pairs, Go / Go,
ours / Go (drop-in), ours / ours and Go / ours, the last three per --python;
wrk for 1 KiB and 1 MiB at c=1 and c=8, two rounds interleaved; each cell
as a ratio to the Go pair. Per pair also the round trip of one byte on an
upgraded (101) connection (to bench/backend.py's echo) and the time to the
500 for a request to a stopped backend. Then the memory checks: the server's
peak RSS while one 1 GiB response is relayed, and its RSS with 10,000
simulated idle relay-clients long-polling (bench/idle_clients.py) plus the
latency of requests to random ones of them.

--single: a fast in-memory backend (bench/backend.py, its own process), the
relay server and the relay client (ours by default; any implementation with
--server-cmd / --client-cmd), ``wrk`` for every response size x
concurrency, through the relay and directly against the backend:
requests/s, MiB/s, p50 and p99 latency, the ratio relay/direct and CPU,
then the same memory checks.

The harness itself needs only the Python standard library and wrk; the relay
processes run under --python (default: /tmp/bench-venv/bin/python when it
exists). Everything listens on 127.0.0.1; every process started is stopped at
the end, on error and on Ctrl-C.
"""

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

TWISTD = "{python} -c 'from twisted.scripts.twistd import run; run()' --pidfile="
DEFAULT_SERVER_CMD = "{twistd} -n relay --port=tcp:0:interface=127.0.0.1"
DEFAULT_CLIENT_CMD = (
    "{twistd} -n relay-client --backend_scheme=http --backend_address={backend_address} "
    "--relay_scheme=http --relay_address={relay_address} --server_name={server_name} "
    "--disable_auth_for_remote"
)
PORT_RE = re.compile(r'Relay server listening.*"Port":(\d+)')
CONNECTED_RE = re.compile(r"Relay client connected")

# The Go relay pair (http-relay-server + http-relay-client) on this kind of
# machine: 2 cores, loopback, wrk, a fast in-memory backend.
# (size, concurrency) -> (text, lower, upper, unit)
GO_REFERENCE = {
    (KiB, 1): ("1,320 req/s", 1320, 1320, "req/s"),
    (KiB, 8): ("2,000-2,600 req/s", 2000, 2600, "req/s"),
    (MiB, 1): ("~100 MiB/s", 100, 100, "MiB/s"),
    (MiB, 8): ("210-280 MiB/s", 210, 280, "MiB/s"),
}

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"bytes\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d," ..
    "\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p99_us\":%d,\"max_us\":%d}\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def parse_size(text):
    text = text.strip()
    m = re.fullmatch(r"(\d+)\s*([KMG]i?B?|B)?", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError("bad size %r" % text)
    n = int(m.group(1))
    unit = (m.group(2) or "").upper()[:1]
    return n * {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB}[unit]


def fmt_size(n):
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return "%d %s" % (n // unit, name)
    return "%d B" % n


# -- processes --------------------------------------------------------------


class Proc:
    """A child process in its own process group, its output copied to a log file."""

    def __init__(self, name, args, logdir, env=None, stdin=None, stdout_pipe=False):
        self.name = name
        self.args = args
        self.logpath = os.path.join(logdir, name + ".log")
        self.logfile = open(self.logpath, "a")
        self.lines = []  # stdout lines when piped
        self.port = None
        self.connected = 0
        self.cond = threading.Condition()
        self.names = set()  # distinct ServerName values of "Relay client connected" lines
        # stderr goes straight to the file (a pipe drained by this process
        # could block a busy relay on a full pipe); a thread tails the file.
        self.p = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=subprocess.PIPE if stdout_pipe else self.logfile,
            stderr=self.logfile,
            env=env,
            cwd=logdir,
            start_new_session=True,
        )
        self.pid = self.p.pid
        threading.Thread(target=self._tail, daemon=True).start()
        if stdout_pipe:
            threading.Thread(target=self._drain, args=(self.p.stdout,), daemon=True).start()

    def _scan(self, line):
        with self.cond:
            if self.port is None:
                m = PORT_RE.search(line) or re.search(r'Backend listening.*"Port": ?(\d+)', line)
                if m:
                    self.port = int(m.group(1))
            if CONNECTED_RE.search(line):
                m = re.search(r'"ServerName": ?"([^"]*)"', line)
                self.names.add(m.group(1) if m else line)
                self.connected = len(self.names)
            self.cond.notify_all()

    def _tail(self):
        with open(self.logpath, "r", errors="replace") as f:
            partial = ""
            while True:
                chunk = f.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        self._scan(partial)
                        partial = ""
                    continue
                if self.p.poll() is not None:
                    break
                time.sleep(0.05)
        with self.cond:
            self.cond.notify_all()

    def _drain(self, stream):
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            try:
                self.logfile.write(line)
                self.logfile.flush()
            except ValueError:
                pass
            with self.cond:
                self.lines.append(line)
            self._scan(line)
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                if self.p.poll() is not None:
                    raise RuntimeError("%s exited (%s) while waiting for %s; see %s"
                                       % (self.name, self.p.returncode, what, self.logpath))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("%s: no %s after %ss; see %s" % (self.name, what, timeout, self.logpath))
                self.cond.wait(min(left, 0.2))

    def stop(self, grace=2.0):
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # the leader is gone; its group may not be
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.logfile.close()


PROCS = []


def start(*a, **kw):
    p = Proc(*a, **kw)
    PROCS.append(p)
    return p


def stop(p):
    if p in PROCS:
        PROCS.remove(p)
    p.stop()


def stop_all():
    while PROCS:
        PROCS.pop().stop(grace=1.0)


def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def wait_quiet(pids, limit=20.0, threshold=0.05):
    """Until the relay processes are idle (after wrk left work in flight)."""
    hz = os.sysconf("SC_CLK_TCK")
    t_end = time.monotonic() + limit
    before = sum(cpu_ticks(p) for p in pids)
    while time.monotonic() < t_end:
        time.sleep(0.3)
        now = sum(cpu_ticks(p) for p in pids)
        if (now - before) / hz / 0.3 < threshold:
            return
        before = now


# -- HTTP helpers (stdlib sockets) --------------------------------------------


def http_get(port, path, timeout=5.0, headers=""):
    """GET over a fresh connection; returns (status, body) or raises OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n%s\r\n"
                   % (path, port, headers)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise OSError("not HTTP: %r" % head[:40])
    return int(head[9:12]), body


def wait_relay_ready(port, name, timeout=30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http_get(port, "/client/%s/bytes/1" % name, timeout=12)
            if status == 200 and len(body) >= 1:
                return
            last = "status %d" % status
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError("no answer through the relay after %ss (%s)" % (timeout, last))


def fetch_big(port, path, rss_pids, result):
    """Read one big response to the end, sampling RSS of rss_pids meanwhile."""
    peak = {p: 0 for p in rss_pids}
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            for p in rss_pids:
                peak[p] = max(peak[p], proc_status(p).get("VmRSS", 0))
            stop_sampling.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.monotonic()
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (path, port)).encode())
        buf = bytearray(1 << 20)
        head = b""
        while b"\r\n\r\n" not in head:
            n = s.recv_into(buf)
            if not n:
                break
            head += bytes(buf[:n])
        h, _, rest = head.partition(b"\r\n\r\n")
        status = int(h[9:12]) if h.startswith(b"HTTP/1.") else 0
        total = len(rest)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            total += n
    secs = time.monotonic() - t0
    stop_sampling.set()
    t.join()
    result.update(status=status, bytes=total, seconds=secs, sampled_peak=peak,
                  headers=h.decode("latin-1"))
    return result


# -- wrk --------------------------------------------------------------------


def run_wrk(wrk, lua, url, conns, seconds, timeout_s):
    args = [wrk, "-t1", "-c%d" % conns, "-d%ds" % seconds, "--timeout", "%ds" % timeout_s, "-s", lua, url]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=seconds + 60)
    out = p.stdout.decode("utf-8", "replace")
    m = re.search(r"WRKJSON (\{.*\})", out)
    if not m:
        raise RuntimeError("wrk failed: %s\n%s" % (" ".join(args), out))
    r = json.loads(m.group(1))
    dur = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / dur
    r["mibps"] = r["bytes"] / dur / MiB
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return r


# -- the report -------------------------------------------------------------


def fmt_ms(us, r):
    if not r["requests"]:
        return "n/a"
    ms = us / 1000.0
    if ms >= 100:
        return "%.0f ms" % ms
    if ms >= 10:
        return "%.1f ms" % ms
    return "%.2f ms" % ms


def fmt_rate(x):
    if x >= 100:
        return "{:,.0f}".format(x)
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


def versus_go(size, c, r):
    ref = GO_REFERENCE.get((size, c))
    if not ref:
        return ""
    text, lo, hi, unit = ref
    ours = r["rps"] if unit == "req/s" else r["mibps"]
    mark = "beats" if ours > hi else ("within" if ours >= lo else "BELOW")
    return "%s (%s, x%.2f)" % (text, mark, ours / hi)


def fmt_cpu(r):
    return " / ".join("%.0f%%" % (100 * x) for x in r.get("cpu", []))


def matrix_table(rows):
    out = [
        "| size | c | relayed req/s | relayed MiB/s | p50 | p99 | direct req/s | direct MiB/s | p50 | p99 "
        "| relay/direct | server / client CPU | other load | Go relay (reference) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size, c, rel, dire in rows:
        ratio = rel["mibps"] / dire["mibps"] if dire and dire["mibps"] else float("nan")
        errs = ""
        if rel["errors"]:
            errs = " (%d errors)" % rel["errors"]
        out.append("| %s | %d | %s%s | %s | %s | %s | %s | %s | %s | %s | %.3f | %s | %.0f%% | %s |" % (
            fmt_size(size), c, fmt_rate(rel["rps"]), errs, fmt_rate(rel["mibps"]),
            fmt_ms(rel["p50_us"], rel), fmt_ms(rel["p99_us"], rel),
            fmt_rate(dire["rps"]) if dire else "-", fmt_rate(dire["mibps"]) if dire else "-",
            fmt_ms(dire["p50_us"], dire) if dire else "-", fmt_ms(dire["p99_us"], dire) if dire else "-",
            ratio, fmt_cpu(rel), 100 * rel.get("others", 0), versus_go(size, c, rel)))
    return "\n".join(out)


def machine_info(python):
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=20).stdout.decode().strip()
        except Exception as e:  # noqa: BLE001
            return "(%s)" % e

    model = sh("lscpu | sed -n 's/^Model name: *//p'")
    relay_py = sh(shlex.quote(python) + " -c 'import platform,sys; print(platform.python_implementation(), "
                  "sys.version.split()[0], \"(\" + sys.version.replace(chr(10), \" \") + \")\")'")
    twisted_v = sh(shlex.quote(python) + " -c 'import twisted; print(twisted.__version__)'")
    return {
        "nproc": sh("nproc"),
        "cpu": model,
        "kernel": platform.release(),
        "relay_python": relay_py,
        "twisted": twisted_v,
        "harness_python": "%s %s" % (platform.python_implementation(), platform.python_version()),
        "wrk": sh("wrk -v 2>&1 | head -1").split(" Copyright")[0],
        "mem": sh("free -m | sed -n 2p | awk '{print $2\" MiB\"}'"),
    }


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "relay"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.strip()
        return rev + (" + uncommitted changes in relay/" if dirty else "")
    except OSError:
        return "?"


# -- py-spy -----------------------------------------------------------------


def find_pyspy(python):
    for cand in (os.path.join(os.path.dirname(python), "py-spy"), shutil.which("py-spy"),
                 "/tmp/bench-venv/bin/py-spy"):
        if cand and os.path.exists(cand):
            return cand
    return None


def summarise_raw(path, top=10):
    """py-spy --format raw: 'frame;frame;... count' lines, root first."""
    self_c, incl_c, cat_c = Counter(), Counter(), Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            frames = [fr for fr in frames if not fr.startswith("process ") and not fr.startswith("thread ")]
            if not frames:
                continue
            self_c[frames[-1]] += n
            for fr in set(frames):
                incl_c[fr] += n
            for cat, pat in CATEGORIES:
                if any(pat.search(fr) for fr in frames):
                    cat_c[cat] += n

    def short(fr):
        return fr.replace(REPO + "/", "").replace("/tmp/bench-venv/lib/", "").replace("site-packages/", "")

    lines = ["%d samples" % total, "", "| self % | function |", "|---:|---|"]
    cats = Counter()
    for cat, n in cat_c.items():
        cats[cat] = n
    for fr, n in self_c.most_common(top):
        lines.append("| %.1f | `%s` |" % (100.0 * n / total, short(fr)))
    lines += ["", "| total % | function (inclusive, relay/ code only) |", "|---:|---|"]
    k = 0
    for fr, n in incl_c.most_common():
        if "relay/" in fr and "twisted/scripts" not in fr:
            lines.append("| %.1f | `%s` |" % (100.0 * n / total, short(fr)))
            k += 1
            if k == top:
                break
    lines += ["", "| inclusive % | where |", "|---:|---|"]
    for cat, _ in CATEGORIES:
        lines.append("| %.1f | %s |" % (100.0 * cat_c[cat] / max(total, 1), cat))
    return "\n".join(lines)


# Inclusive shares by where the time goes (a sample counts when any frame matches).
CATEGORIES = [
    ("logging (twisted.logger + relay/logs.py JSON lines)", re.compile(r"twisted/logger/|relay/logs\.py")),
    ("stdlib email/ header parsing (twisted.web Request.requestReceived -> _parseContentType)",
     re.compile(r"\(email/|/email/")),
    ("idna (HostnameEndpoint built per backend request by Agent)", re.compile(r"idna/|_idna\.py")),
    ("protobuf Python frames (upb's C code does not show)", re.compile(r"google/protobuf|_pb2")),
]


# -- phases -----------------------------------------------------------------


def relay_env(a):
    """The environment of our processes: --malloc-tuning, --pypy-nursery, this checkout unless --installed-only."""
    env = dict(os.environ)
    for k in MALLOC_ENV:
        env.pop(k, None)
    if a.malloc_tuning == "on":
        env.update(MALLOC_ENV)
    env.pop("PYPY_GC_NURSERY", None)
    if a.pypy_nursery != "default":
        env["PYPY_GC_NURSERY"] = a.pypy_nursery  # CPython ignores it
    if not a.installed_only:
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Bench:
    def __init__(self, a):
        self.a = a
        self.logdir = tempfile.mkdtemp(prefix="relay-bench-")
        self.report = []
        self.lua = os.path.join(self.logdir, "report.lua")
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)
        self.backend = None
        self.server = self.client = None
        self.relay_env = relay_env(a)
        self.generation = 0

    def fmt(self, template, **kw):
        twistd = TWISTD.format(python=shlex.quote(self.a.python))
        kw.setdefault("python", shlex.quote(self.a.python))
        return shlex.split(template.format(twistd=twistd, **kw))

    def start_backend(self):
        self.backend = start("backend", [sys.executable, os.path.join(HERE, "backend.py"), "--port", "0"],
                             self.logdir, stdout_pipe=True)
        self.backend.wait_for(lambda: self.backend.port, 10, "port")
        log("backend on port %d (pid %d)" % (self.backend.port, self.backend.pid))

    def start_relay(self, with_client=True):
        self.generation += 1
        g = self.generation
        port = None
        if "{port}" in self.a.server_cmd:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        args = self.fmt(self.a.server_cmd, port=port or 0)
        self.server = start("server-%d" % g, args, self.logdir, env=self.relay_env)
        if port is None:
            self.server.wait_for(lambda: self.server.port, 30, "'Relay server listening ... \"Port\":N' line")
            port = self.server.port
        else:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError as e:
                    if time.monotonic() > deadline or self.server.p.poll() is not None:
                        raise RuntimeError("server not listening on %d; see %s" % (port, self.server.logpath)) from e
                    time.sleep(0.1)
        self.port = port
        log("server on port %d (pid %d): %s" % (port, self.server.pid, " ".join(args)))
        if not with_client:
            self.client = None
            return
        args = self.fmt(self.a.client_cmd, relay_address="127.0.0.1:%d" % port,
                        backend_address="127.0.0.1:%d" % self.backend.port, server_name=self.a.server_name)
        self.client = start("client-%d" % g, args, self.logdir, env=self.relay_env)
        log("client (pid %d): %s" % (self.client.pid, " ".join(args)))
        wait_relay_ready(port, self.a.server_name)
        log("relay answers /client/%s/bytes/1" % self.a.server_name)

    def stop_relay(self):
        for p in (self.client, self.server):
            if p:
                stop(p)
        self.client = self.server = None

    def relay_pids(self):
        return [p.pid for p in (self.server, self.client) if p]

    def matrix(self):
        a = self.a
        relay_url = "http://127.0.0.1:%d/client/%s/bytes/%%d" % (self.port, a.server_name)
        direct_url = "http://127.0.0.1:%d/bytes/%%d" % self.backend.port
        if a.warmup:
            for size in sorted(set(min(s, MiB) for s in a.sizes)):
                log("warm-up: %s, c=8, %ds" % (fmt_size(size), a.warmup))
                run_wrk(a.wrk, self.lua, relay_url % size, 8, a.warmup, 30)
                wait_quiet(self.relay_pids())
        rows = []
        for size in a.sizes:
            big = size > 8 * MiB
            for c in a.concurrency:
                d_rel = a.big_duration if big else a.duration
                d_dir = min(a.direct_duration, d_rel)
                timeout = 120 if big else 30
                others = 0.0
                for attempt in range(a.retry_busy + 1):
                    if attempt:
                        log("other processes used %.0f%% of a core during that run: waiting and repeating it"
                            % (100 * others))
                        t_end = time.monotonic() + 60
                        while other_load(1) > 0.1 and time.monotonic() < t_end:
                            pass
                    pids = self.relay_pids() + [self.backend.pid]
                    cpu0 = [cpu_ticks(p) for p in pids]
                    busy0, own0, t0 = busy_seconds(), own_cpu_seconds(), time.monotonic()
                    rel = run_wrk(a.wrk, self.lua, relay_url % size, c, d_rel, timeout)
                    hz = os.sysconf("SC_CLK_TCK")
                    ours = [(cpu_ticks(p) - t) / hz for p, t in zip(pids, cpu0)]
                    wall = time.monotonic() - t0
                    rel["cpu"] = [x / (rel["duration_us"] / 1e6) for x in ours[:-1]]
                    others = max(0.0, busy_seconds() - busy0 - (own_cpu_seconds() - own0) - sum(ours)) / wall
                    rel["others"] = others
                    if others < 0.15:
                        break
                    wait_quiet(self.relay_pids())
                wait_quiet(self.relay_pids())
                dire = run_wrk(a.wrk, self.lua, direct_url % size, c, d_dir, timeout) if not a.no_direct else None
                log("%s c=%d: relayed %s req/s %s MiB/s p50 %s p99 %s errors %d CPU %s | direct %s req/s %s MiB/s" % (
                    fmt_size(size), c, fmt_rate(rel["rps"]), fmt_rate(rel["mibps"]), fmt_ms(rel["p50_us"], rel),
                    fmt_ms(rel["p99_us"], rel), rel["errors"], fmt_cpu(rel), fmt_rate(dire["rps"]) if dire else "-",
                    fmt_rate(dire["mibps"]) if dire else "-"))
                rows.append((size, c, rel, dire))
        return rows

    def profile(self):
        a = self.a
        impl = subprocess.run([a.python, "-c", "import platform; print(platform.python_implementation())"],
                              stdout=subprocess.PIPE).stdout.decode().strip()
        pyspy = find_pyspy(a.python)
        if impl != "CPython" or not pyspy:
            return "(profile skipped: py-spy %s, relay interpreter %s; py-spy profiles CPython only)" % (
                pyspy or "not found", impl)
        url = "http://127.0.0.1:%d/client/%s/bytes/%d" % (self.port, a.server_name, KiB)
        secs = a.profile_seconds
        outs, spies = {}, []
        wrk = subprocess.Popen([a.wrk, "-t1", "-c8", "-d%ds" % (secs + 3), "-s", self.lua, url],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.5)
        for name, p in (("server", self.server), ("client", self.client)):
            path = os.path.join(self.logdir, "profile-%s.txt" % name)
            outs[name] = path
            spies.append(subprocess.Popen([pyspy, "record", "--nonblocking", "--gil", "-r", "250", "-d", str(secs),
                                           "-p", str(p.pid), "--format", "raw", "-o", path],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        errs = [s.communicate(timeout=secs + 60)[1].decode() for s in spies]
        wout = wrk.communicate(timeout=secs + 60)[0].decode()
        m = re.search(r"WRKJSON (\{.*\})", wout)
        rps = (json.loads(m.group(1))["requests"] / (json.loads(m.group(1))["duration_us"] / 1e6)) if m else 0
        wait_quiet(self.relay_pids())
        parts = [
            "py-spy record --nonblocking --gil -r 250 -d %d on each process "
            "(samples only while holding the GIL) during "
            "1 KiB at c=8 through the relay (%s req/s under the profiler); raw stacks in %s."
            % (secs, fmt_rate(rps), self.logdir)
        ]
        for (name, path), err in zip(outs.items(), errs):
            if not os.path.exists(path):
                parts.append("**%s**: py-spy failed: %s" % (name, err.strip()[-500:]))
                continue
            parts.append("**%s** (pid %d): %s" % (name, getattr(self, name).pid, summarise_raw(path)))
        return "\n\n".join(parts)

    def rss_1gib(self):
        self.start_relay()
        base = proc_status(self.server.pid).get("VmRSS", 0)
        res = {}
        log("relaying 1 GiB in one request")
        fetch_big(self.port, "/client/%s/bytes/%d" % (self.a.server_name, GiB), self.relay_pids(), res)
        st_s = proc_status(self.server.pid)
        st_c = proc_status(self.client.pid)
        out = {
            "ok": res["status"] == 200 and res["bytes"] == GiB,
            "status": res["status"], "bytes": res["bytes"], "seconds": res["seconds"],
            "server_rss_before": base, "server_hwm": st_s.get("VmHWM", 0), "client_hwm": st_c.get("VmHWM", 0),
        }
        self.stop_relay()
        return out

    def idle_clients(self):
        a = self.a
        self.start_relay(with_client=False)
        time.sleep(0.5)
        base = proc_status(self.server.pid).get("VmRSS", 0)
        overflows0 = listen_overflows()
        log("opening %d idle long polls" % a.idle_clients)
        sim = start("idle-clients", [sys.executable, os.path.join(HERE, "idle_clients.py"),
                                     "--relay", "127.0.0.1:%d" % self.port, "--count", str(a.idle_clients),
                                     "--requests", str(a.idle_requests)],
                    self.logdir, stdin=subprocess.PIPE, stdout_pipe=True)

        def event(name):
            for line in sim.lines:
                if line.startswith("{") and json.loads(line).get("event") == name:
                    return json.loads(line)
            return None

        sim.wait_for(lambda: event("polling"), 240, "all polls open")
        polling = event("polling")
        log("%d polls sent in %.1fs" % (a.idle_clients, polling["seconds"]))
        # Wait until the server has seen them all (our server and Go's log each new name).
        t0 = time.monotonic()
        try:
            self.server.wait_for(lambda: self.server.connected >= a.idle_clients, 60, "all 'Relay client connected'")
        except RuntimeError:
            log("server did not log %d connected clients (saw %d); waiting for it to go quiet"
                % (a.idle_clients, self.server.connected))
        wait_quiet([self.server.pid], limit=30)
        settle = time.monotonic() - t0
        rss = proc_status(self.server.pid)
        log("server RSS with %d idle polls: %.1f MiB" % (a.idle_clients, rss.get("VmRSS", 0) / MiB))
        sim.p.stdin.write(b"go\n")
        sim.p.stdin.flush()
        sim.wait_for(lambda: event("stats"), 120, "timed requests")
        timed = event("timed")
        rss_after = proc_status(self.server.pid)
        sim.p.stdin.close()
        stop(sim)
        out = {"count": a.idle_clients, "connect_seconds": polling["seconds"], "settle_seconds": settle,
               "server_logged": self.server.connected, "rss_before": base, "rss": rss.get("VmRSS", 0),
               "rss_after": rss_after.get("VmRSS", 0), "hwm": rss_after.get("VmHWM", 0), "timed": timed,
               "listen_overflows": (listen_overflows() - overflows0) if overflows0 is not None else None,
               "sim": event("stats")}
        self.stop_relay()
        return out


def busy_seconds():
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU seconds of this harness and its waited-for children (all processes it started)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def other_load(seconds=1.0):
    b0, o0 = busy_seconds(), own_cpu_seconds()
    time.sleep(seconds)
    return max(0.0, (busy_seconds() - b0) - (own_cpu_seconds() - o0)) / seconds


def others_since(busy0, own0, elapsed):
    """
    CPU used by processes outside the harness since busy_seconds() and
    own_cpu_seconds() were busy0 and own0, in cores.
    """
    return max(0.0, (busy_seconds() - busy0) - (own_cpu_seconds() - own0)) / elapsed


def publish(text, output):
    """The report on stdout, and in the --output file when given."""
    sys.stdout.write("\n" + text)
    if output:
        with open(output, "w") as f:
            f.write(text)


def listen_overflows():
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for h, v in zip(lines[::2], lines[1::2]):
            if h.startswith("TcpExt:"):
                d = dict(zip(h.split()[1:], v.split()[1:]))
                return int(d.get("ListenOverflows", 0))
    except (OSError, ValueError):
        pass
    return None


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, need)) if hard != resource.RLIM_INFINITY else max(soft, need)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]



# -- side by side -----------------------------------------------------------

GO_DIR_CANDIDATES = (os.path.join(os.path.dirname(REPO), "shared", "reference-go"), "/work/shared/reference-go")
ECHO_NAME, DOWN_NAME = "echo", "down"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc, port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline or proc.p.poll() is not None:
                raise RuntimeError("%s not listening on %d; see %s" % (proc.name, port, proc.logpath)) from e
            time.sleep(0.1)


def start_go_backend(go_dir, logdir):
    """The Go bench-backend (GET /bytes/N) on a free port, once it answers: (Proc, port)."""
    port = free_port()
    proc = start("go-backend", [os.path.join(go_dir, "bench-backend"), str(port)], logdir)
    deadline = time.monotonic() + 20
    while True:
        try:
            if http_get(port, "/healthz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.p.poll() is not None:
            raise RuntimeError("Go bench-backend did not answer /healthz; see %s" % proc.logpath)
        time.sleep(0.1)
    log("Go bench-backend on port %d" % port)
    return proc, port


def interpreter_name(python):
    out = (
        subprocess.run(
            [
                python,
                "-c",
                "import platform,sys,twisted; v=sys.version_info; print(platform.python_implementation(), "
                "'%d.%d.%d' % v[:3], "
                "(getattr(sys, 'pypy_version_info', None) and '.'.join(map(str, sys.pypy_version_info[:3])) or ''), "
                "twisted.__version__)",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        .stdout.decode()
        .split()
    )
    if len(out) == 4:
        impl, ver, pypy, tw = out
        return {
            "short": "%s %s" % (impl, ".".join(ver.split(".")[:2])),
            "long": "%s %s%s, Twisted %s (`%s`)"
            % (impl, ver, " (PyPy %s)" % pypy if impl == "PyPy" else "", tw, python),
            "pypy": impl == "PyPy",
        }
    if len(out) == 3:
        impl, ver, tw = out
        return {"short": "%s %s" % (impl, ".".join(ver.split(".")[:2])),
                "long": "%s %s, Twisted %s (`%s`)" % (impl, ver, tw, python), "pypy": impl == "PyPy"}
    raise RuntimeError("cannot run %s with Twisted: %s" % (python, " ".join(out)))


def upgrade_rtts(port, path, count, gap=0.02, timeout=10.0):
    """
    The round trip of one byte on an upgraded connection, C{count} times,
    C{gap} seconds apart (a typist: each keystroke after a quiet spell).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                   % (path, port)).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed before the 101: %r" % data[:200])
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError("no 101: %r" % head[:200])
        if rest:
            raise OSError("unexpected bytes after the 101: %r" % rest[:50])
        times = []
        for _i in range(count):
            time.sleep(gap)
            t0 = time.perf_counter()
            s.sendall(b"k")
            got = s.recv(16)
            times.append(time.perf_counter() - t0)
            if got != b"k":
                raise OSError("echo gave %r" % got)
    return times


def refused_times(port, name, count, first_timeout=60.0):
    """How long a request to a relay-client whose backend is down takes to be answered (the first is a warm-up)."""
    path = "/client/%s/refused" % name
    deadline = time.monotonic() + first_timeout
    while True:
        try:
            status, body = http_get(port, path, timeout=30)
            if status == 500 and b"refused" in body.lower():
                break
            last = "status %d: %r" % (status, body[:200])
        except OSError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise RuntimeError("no 500 'connection refused' from the %s client (%s)" % (name, last))
        time.sleep(0.2)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        status, body = http_get(port, path, timeout=30)
        times.append(time.perf_counter() - t0)
        if status != 500:
            raise RuntimeError("backend down: status %d, %r" % (status, body[:200]))
    return times


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2.0 if xs else float("nan")


def fmt_latency(seconds):
    ms = seconds * 1000
    if ms >= 10:
        return "%.0f ms" % ms
    if ms >= 1:
        return "%.1f ms" % ms
    return "%.2f ms" % ms


class Pair:
    """A relay server and relay-client, each Go's or ours (under an interpreter)."""

    def __init__(self, server, client, python=None, interp=None):
        self.server_kind, self.client_kind = server, client
        self.python, self.interp = python, interp
        if server == "go" and client == "go":
            self.label = "Go / Go"
        elif client == "go":
            self.label = "ours on %s / Go (drop-in)" % interp["short"]
        elif server == "go":
            self.label = "Go / ours on %s" % interp["short"]
        else:
            self.label = "ours / ours, %s" % interp["short"]
        self.procs = []
        self.port = None
        self.results = {}  # (round, size, c) -> wrk result
        self.rtts = {}  # round -> [seconds]
        self.refused = {}  # round -> [seconds]

    @property
    def pypy(self):
        return bool(self.interp and self.interp["pypy"])


class SideBySide:
    def __init__(self, a, bench):
        self.a = a
        self.bench = bench
        self.go = a.go_dir
        self.pairs = []
        self.direct_rtts = []

    def our_twistd(self, python):
        return shlex.split(TWISTD.format(python=shlex.quote(python)))

    def start_backends(self):
        self.go_backend, self.go_backend_port = start_go_backend(self.go, self.bench.logdir)
        self.bench.start_backend()  # bench/backend.py: the 101 echo, and the memory checks' 1 GiB
        self.echo_port = self.bench.backend.port
        self.dead_port = free_port()  # nothing listens there

    def server_cmd(self, pair, port):
        if pair.server_kind == "go":
            return [os.path.join(self.go, "http-relay-server"), "--port=%d" % port]
        return self.our_twistd(pair.python) + ["-n", "relay", "--port=tcp:%d:interface=127.0.0.1" % port] + \
            self.busy_poll() + shlex.split(self.a.server_args)

    def client_cmd(self, pair, backend_port, name):
        flags = ["--backend_scheme=http", "--backend_address=127.0.0.1:%d" % backend_port, "--relay_scheme=http",
                 "--relay_address=127.0.0.1:%d" % pair.port, "--server_name=%s" % name, "--disable_auth_for_remote"]
        if pair.client_kind == "go":
            return [os.path.join(self.go, "http-relay-client")] + flags
        return self.our_twistd(pair.python) + ["-n", "relay-client"] + flags + self.busy_poll() + \
            shlex.split(self.a.client_args)

    def busy_poll(self):
        return ["--busy_poll_us=%d" % self.a.busy_poll_us] if self.a.busy_poll_us else []

    def start_pair(self, i, pair):
        env = self.bench.relay_env
        pair.port = free_port()
        args = self.server_cmd(pair, pair.port)
        server = start("p%d-server" % i, args, self.bench.logdir, env=env)
        pair.procs.append(server)
        wait_listening(server, pair.port)
        log("%s: server on port %d (pid %d): %s" % (pair.label, pair.port, server.pid, " ".join(args)))
        for name, backend in (
            ("bench", self.go_backend_port),
            (ECHO_NAME, self.echo_port),
            (DOWN_NAME, self.dead_port),
        ):
            args = self.client_cmd(pair, backend, name)
            client = start("p%d-client-%s" % (i, name), args, self.bench.logdir, env=env)
            pair.procs.append(client)
            if name == "bench":
                pair.client = client
                log("%s: client (pid %d): %s" % (pair.label, client.pid, " ".join(args)))
        wait_relay_ready(pair.port, "bench", timeout=60)
        wait_relay_ready(pair.port, ECHO_NAME, timeout=60)

    def pids(self, pair):
        return [pair.procs[0].pid, pair.client.pid]

    def url(self, pair, size):
        return "http://127.0.0.1:%d/client/bench/bytes/%d" % (pair.port, size)

    def run(self):
        a = self.a
        pythons = [(p, interpreter_name(p)) for p in a.pythons]
        shorts = [interp["short"] for _, interp in pythons]
        for p, interp in pythons:
            if shorts.count(interp["short"]) > 1:
                # Two builds on one interpreter (old code against new): name the venv.
                interp["short"] += " (%s)" % os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(p))))
        self.interps = pythons
        self.pairs = [Pair("go", "go")]
        for python, interp in pythons:
            self.pairs += [Pair("ours", "go", python, interp), Pair("ours", "ours", python, interp),
                           Pair("go", "ours", python, interp)]
        self.start_backends()
        for i, pair in enumerate(self.pairs):
            self.start_pair(i, pair)
        for rnd in range(1, a.rounds + 1):
            log("round %d of %d" % (rnd, a.rounds))
            if rnd == 1 and (a.warmup or a.warmup_pypy):
                for pair in self.pairs:
                    if pair.server_kind == pair.client_kind == "go":
                        continue
                    secs = a.warmup_pypy if pair.pypy else a.warmup
                    for size in a.sizes:
                        if secs:
                            log("warm-up %s: %s, c=8, %ds" % (pair.label, fmt_size(size), secs))
                            run_wrk(a.wrk, self.bench.lua, self.url(pair, size), 8, secs, 30)
                    wait_quiet(self.pids(pair))
            for size in a.sizes:
                for c in a.concurrency:
                    for pair in self.pairs:
                        wait_quiet(self.pids(pair))
                        r = run_wrk(a.wrk, self.bench.lua, self.url(pair, size), c, a.duration, 30)
                        pair.results[(rnd, size, c)] = r
                        log("round %d %s c=%d %-32s %s req/s %s MiB/s p50 %s errors %d" % (
                            rnd, fmt_size(size), c, pair.label, fmt_rate(r["rps"]), fmt_rate(r["mibps"]),
                            fmt_ms(r["p50_us"], r), r["errors"]))
            self.direct_rtts += upgrade_rtts(self.echo_port, "/echo", a.latency_count)
            for pair in self.pairs:
                wait_quiet(self.pids(pair))
                pair.rtts[rnd] = upgrade_rtts(pair.port, "/client/%s/tty" % ECHO_NAME, a.latency_count)
                pair.refused[rnd] = refused_times(pair.port, DOWN_NAME, a.refused_count)
                log("round %d %-32s 1-byte echo on a 101: median %s; backend down: 500 after %s (median)" % (
                    rnd, pair.label, fmt_latency(median(pair.rtts[rnd])), fmt_latency(median(pair.refused[rnd]))))
        for pair in self.pairs:
            for p in pair.procs:
                stop(p)
        stop(self.go_backend)

    def best(self, pair, size, c):
        unit = "rps" if size < MiB else "mibps"
        values = [r[unit] for (rnd, s, cc), r in pair.results.items() if s == size and cc == c]
        return max(values) if values else float("nan")

    def errors(self, pair):
        return sum(r["errors"] for r in pair.results.values())

    def table(self):
        a = self.a
        go = self.pairs[0]
        cells = [(s, c) for s in a.sizes for c in a.concurrency]
        head = ["server / client"] + ["%s c=%d" % (fmt_size(s), c) for s, c in cells] + [
            "1-byte echo on a 101", "backend stopped: 500 after"]
        out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        best_rtt = lambda p: min(median(v) for v in p.rtts.values())  # noqa: E731
        best_ref = lambda p: min(median(v) for v in p.refused.values())  # noqa: E731
        for pair in self.pairs:
            row = []
            if pair is go:
                label = "Go / Go (req/s, MiB/s)"
                row = [fmt_rate(self.best(go, s, c)) for s, c in cells]
            else:
                label = pair.label
                row = ["%.2f" % (self.best(pair, s, c) / self.best(go, s, c)) for s, c in cells]
            errors = self.errors(pair)
            if errors:
                label += " (%d wrk errors)" % errors
            row += [fmt_latency(best_rtt(pair)), fmt_latency(best_ref(pair))]
            out.append("| %s | %s |" % (label, " | ".join(row)))
        return "\n".join(out)

    def detail(self):
        a = self.a
        cells = [(s, c) for s in a.sizes for c in a.concurrency]
        head = ["server / client", "round"] + ["%s c=%d" % (fmt_size(s), c) for s, c in cells] + [
            "echo p50 / max", "refused p50 / max"]
        out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
        for pair in self.pairs:
            for rnd in range(1, a.rounds + 1):
                row = []
                for s, c in cells:
                    r = pair.results[(rnd, s, c)]
                    row.append(fmt_rate(r["rps"] if s < MiB else r["mibps"]))
                row.append("%s / %s" % (fmt_latency(median(pair.rtts[rnd])), fmt_latency(max(pair.rtts[rnd]))))
                row.append("%s / %s" % (fmt_latency(median(pair.refused[rnd])), fmt_latency(max(pair.refused[rnd]))))
                out.append("| %s | %d | %s |" % (pair.label, rnd, " | ".join(row)))
        return "\n".join(out)


def flags_note(a):
    ours = (["--busy_poll_us=%d" % a.busy_poll_us] if a.busy_poll_us else []) + [
        x for x in (a.server_args, a.client_args) if x]
    if not ours:
        return ""
    return ", except our processes: `%s` (server) and `%s` (client)" % (
        " ".join(ours[:1] + ([a.server_args] if a.server_args else [])),
        " ".join(ours[:1] + ([a.client_args] if a.client_args else [])))


def side_by_side_report(a, command, sbs, info, elapsed, others, big, idle):
    r = []
    r.append("Date: %s; command: `%s`; whole run %.0f s; code: %s  " % (
        time.strftime("%Y-%m-%d %H:%M %Z"), command, elapsed, git_rev()))
    r.append("Our processes: %s  " % "; ".join(i["long"] for _, i in sbs.interps))
    r.append("Go binaries: `%s` (http-relay-server, http-relay-client, bench-backend behind every pair)  " % sbs.go)
    r.append("Machine: %s CPUs (`nproc`), %s, %s RAM, Linux %s; %s, 1 thread, %d s per cell, %d rounds "
             "interleaved; CPU used by other processes during the run: %.0f%% of one core  " % (
                 info["nproc"], info["cpu"], info["mem"], info["kernel"], info["wrk"], a.duration, a.rounds,
                 100 * others))
    r.append("")
    r.append(sbs.table())
    r.append("")
    r.append(
        "Throughput cells: the best of the %d rounds, 1 KiB in requests/s and 1 MiB in MiB/s, for the Go pair; "
        "every other row as a ratio to the Go pair's figure (above 1: faster). Default flags for every process%s. "
        "1-byte echo: the round trip of one byte on an upgraded (101) connection through the pair to an echo "
        "backend (bench/backend.py), one byte every 20 ms after the 101, the median of %d (best round); directly "
        "against that backend it is %s. Backend stopped: the time to the relay-client's `500 … connection refused` "
        "for a request through the pair to a relay-client whose backend address has nothing listening, the median "
        "of %d (best round)." % (
            a.rounds, flags_note(a), a.latency_count, fmt_latency(median(sbs.direct_rtts)),
            a.refused_count))
    r.append("")
    r.append("<details><summary>Every round</summary>\n\n" + sbs.detail() + "\n\n</details>")
    if big:
        r.append("")
        r.append(big_line(big, "**1 GiB relayed in one request** (our pair, %s):" % (sbs.interps[0][1]["short"],)))
    if idle:
        t = idle["timed"]
        r.append("")
        r.append("**%s idle relay-clients long-polling** (our server, %s): server RSS %.1f MiB (%.1f MiB before) "
                 "— %s (< 300 MiB); %d requests to random ones of them: p50 %.2f ms, p99 %.2f ms, %d errors — %s "
                 "(p99 < 50 ms)." % (
                     "{:,}".format(idle["count"]), sbs.interps[0][1]["short"], idle["rss"] / MiB,
                     idle["rss_before"] / MiB, "PASS" if idle["rss"] < 300 * MiB else "FAIL", t["requests"],
                     t["p50_ms"], t["p99_ms"], t["errors"], "PASS" if t["p99_ms"] < 50 and not t["errors"] else "FAIL"))
    return "\n".join(r) + "\n"


def main(argv=None):
    default_python = "/tmp/bench-venv/bin/python" if os.path.exists("/tmp/bench-venv/bin/python") else sys.executable
    p = argparse.ArgumentParser(
        description="Benchmark the relay against the Go relay's figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Templates are split like a shell command after substituting {python} (the --python "
               "interpreter), {twistd} (that interpreter running twistd, with --pidfile=), {port} "
               "(a free port chosen by the harness; without it the port is read from the server's "
               "'Relay server listening ... \"Port\":N' log line), {relay_address}, {backend_address} "
               "and {server_name}. Example for the Go pair: --server-cmd '/opt/go/http-relay-server "
               "--port={port}' --client-cmd '/opt/go/http-relay-client --backend_scheme=http "
               "--backend_address={backend_address} --relay_scheme=http --relay_address={relay_address} "
               "--server_name={server_name} --disable_auth_for_remote'")
    p.add_argument("--python", action="append", default=None,
                   help="interpreter for our server and client (default %s); side by side, give it twice "
                        "(a CPython and a PyPy venv) for rows of both in one run" % default_python)
    p.add_argument("--single", action="store_true",
                   help="the report of one implementation (--server-cmd/--client-cmd, direct runs, "
                        "CPU, profile) instead of the side-by-side run against the Go binaries")
    p.add_argument("--go-dir", default=next((d for d in GO_DIR_CANDIDATES if os.path.isdir(d)), GO_DIR_CANDIDATES[0]),
                   help="where http-relay-server, http-relay-client and bench-backend are")
    p.add_argument("--rounds", type=int, default=2, help="side by side: rounds, interleaved")
    p.add_argument("--latency-count", type=int, default=20,
                   help="side by side: 1-byte round trips on a 101 per pair and round")
    p.add_argument("--refused-count", type=int, default=5,
                   help="side by side: requests to a stopped backend per pair and round")
    p.add_argument("--warmup-pypy", type=int, default=6,
                   help="side by side: seconds of warm-up per size for pairs with our processes on PyPy")
    p.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD, help="relay server command template")
    p.add_argument("--client-cmd", default=DEFAULT_CLIENT_CMD, help="relay client command template")
    p.add_argument("--server-args", default="", help="extra arguments appended to the server command")
    p.add_argument("--client-args", default="",
                   help="extra arguments appended to the client command, e.g. --num_pending_requests=8")
    p.add_argument("--server-name", default="bench")
    p.add_argument("--installed-only", action="store_true",
                   help="do not put this checkout on PYTHONPATH: run the relay as installed in --python's env")
    p.add_argument("--pypy-nursery", default="32MB",
                   help="PYPY_GC_NURSERY for the relay processes, as docs/performance.md recommends on PyPy "
                        "('default': unset, PyPy's own choice, 1 MB on our VMs)")
    p.add_argument("--busy-poll-us", type=int, default=0,
                   help="--busy_poll_us for our server and client (not for --server-cmd/--client-cmd "
                        "given here); 0: the relay's default, off")
    p.add_argument("--malloc-tuning", choices=("on", "off"), default="off",
                   help="on: run the relay processes with " + " ".join("%s=%s" % kv for kv in MALLOC_ENV.items()))
    p.add_argument("--sizes", default=None,
                   help="response sizes (comma-separated; default 1KiB,1MiB side by side, 1KiB,1MiB,100MiB --single)")
    p.add_argument("--concurrency", default=None,
                   help="connections (comma-separated; default 1,8 side by side, 1,8,64 --single)")
    p.add_argument("--duration", type=int, default=5, help="seconds per relayed wrk run (sizes up to 8 MiB)")
    p.add_argument("--big-duration", type=int, default=8, help="seconds per relayed wrk run for larger sizes")
    p.add_argument("--direct-duration", type=int, default=3, help="seconds per direct wrk run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per size (for PyPy's JIT); 0: none")
    p.add_argument("--no-direct", action="store_true", help="skip the runs against the backend directly")
    p.add_argument("--skip-rss", action="store_true", help="skip the 1 GiB RSS measurement")
    p.add_argument("--skip-idle", action="store_true", help="skip the idle relay-clients measurement")
    p.add_argument("--idle-clients", type=int, default=10000)
    p.add_argument("--idle-requests", type=int, default=200)
    p.add_argument("--profile", action="store_true",
                   help="also run py-spy on server and client during 1 KiB at c=8 (CPython only)")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1KiB,1MiB at c=1,8, 2 s each (side by side: 1 s, one round), 1,000 idle clients")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--output", help="also write the markdown report to this file")
    p.add_argument("--retry-busy", type=int, default=2,
                   help="repeat a relayed run (after waiting for quiet) when other processes used over 15%% "
                        "of a core during it, up to this many times")
    p.add_argument("--wait-idle", type=int, default=0, metavar="SECONDS",
                   help="first wait up to this long until other processes use under 10%% of a core")
    a = p.parse_args(argv)
    a.pythons = a.python or [default_python]
    a.python = a.pythons[0]
    if a.sizes is None:
        a.sizes = "1KiB,1MiB,100MiB" if a.single else "1KiB,1MiB"
    if a.concurrency is None:
        a.concurrency = "1,8,64" if a.single else "1,8"
    if a.quick:  # smaller defaults; options given explicitly still win
        quick = dict(sizes="1KiB,1MiB", concurrency="1,8", duration=2, direct_duration=2, warmup=2,
                     idle_clients=1000, idle_requests=100)
        if not a.single:
            quick.update(duration=1, rounds=1, warmup=1, warmup_pypy=2, latency_count=5, refused_count=2)
        for k, v in quick.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    if a.busy_poll_us:
        if a.server_cmd == DEFAULT_SERVER_CMD:
            a.server_cmd += " --busy_poll_us=%d" % a.busy_poll_us
        if a.client_cmd == DEFAULT_CLIENT_CMD:
            a.client_cmd += " --busy_poll_us=%d" % a.busy_poll_us
    if a.server_args:
        a.server_cmd += " " + a.server_args
    if a.client_args:
        a.client_cmd += " " + a.client_args
    a.sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    if not shutil.which(a.wrk):
        p.error("wrk not found: apt-get install -y wrk")

    limit = raise_nofile(a.idle_clients + 1024)
    if not a.skip_idle and limit < a.idle_clients + 200:
        log("RLIMIT_NOFILE is %d: too low for %d idle clients; skipping that part" % (limit, a.idle_clients))
        a.skip_idle = True

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    shown, skip = [], False
    for x in (sys.argv[1:] if argv is None else argv):  # the report shows the command without these
        if skip:
            skip = False
        elif x in ("--output", "--wait-idle"):
            skip = True
        elif not x.startswith(("--output=", "--wait-idle=")):
            shown.append(x)
    command = "python3 bench/run.py" + "".join(" " + shlex.quote(x) for x in shown)
    b = Bench(a)
    log("logs in %s" % b.logdir)
    if not a.single:
        for tool in ("http-relay-server", "http-relay-client", "bench-backend"):
            if not os.access(os.path.join(a.go_dir, tool), os.X_OK):
                p.error("%s not found in --go-dir %s" % (tool, a.go_dir))
        return side_by_side(a, b, command)
    idle_before = other_load()
    deadline = time.monotonic() + a.wait_idle
    while idle_before > 0.1 and time.monotonic() < deadline:
        log("other processes use %.0f%% of a core; waiting for a quiet machine (--wait-idle)" % (100 * idle_before))
        time.sleep(4)
        idle_before = other_load(2)
    if idle_before > 0.2:
        log("WARNING: other processes use %.0f%% of a core right now; figures will be low" % (100 * idle_before))

    def work():
        info = machine_info(a.python)
        b.start_backend()
        b.start_relay()
        rows = b.matrix()
        prof = b.profile() if a.profile else None
        b.stop_relay()
        big = None if a.skip_rss else b.rss_1gib()
        idle = None if a.skip_idle else b.idle_clients()
        return info, rows, prof, big, idle

    measured = run_measured(b, work)
    if measured is None:
        return 130
    (info, rows, prof, big, idle), elapsed, others = measured

    r = []
    r.append("Command: `%s`  " % command)
    r.append("Relay: `%s` / `%s`  " % (" ".join(b.fmt(a.server_cmd, port="{port}")),
                                      " ".join(b.fmt(a.client_cmd, relay_address="{relay}", backend_address="{backend}",
                                                     server_name=a.server_name))))
    r.append("Relay interpreter: %s; Twisted %s; malloc tuning %s; %scode: %s  " % (
        info["relay_python"], info["twisted"], a.malloc_tuning,
        "PYPY_GC_NURSERY=%s; " % a.pypy_nursery if "PyPy" in info["relay_python"] else "", git_rev()))
    r.append("Machine: %s CPUs (`nproc`), %s, %s RAM, Linux %s; load generator %s (1 thread); "
             "backend bench/backend.py on %s  " % (info["nproc"], info["cpu"], info["mem"], info["kernel"],
                                                   info["wrk"], info["harness_python"]))
    r.append("Date: %s; whole run %.0f s; CPU used by processes outside the harness during the run: "
             "%.0f%% of one core on average (%.0f%% just before)" % (
                 time.strftime("%Y-%m-%d %H:%M %Z"), elapsed, 100 * others, 100 * idle_before))
    r.append("")
    r.append(matrix_table(rows))
    r.append("")
    r.append("MiB/s counts every byte wrk read (headers included, unfinished responses too); "
             "latencies are over completed requests (n/a: none completed in the run). "
             "CPU: user+system time of the relay server and client processes during the relayed run, "
             "in %% of one core (the machine has %s). Other load: CPU used meanwhile by processes "
             "outside the harness, in %% of one core (anything above a few %% means the figures "
             "are too low)." % info["nproc"])
    if big:
        r.append("")
        r.append(big_line(big, "**1 GiB relayed in one request:**"))
    if idle:
        t = idle["timed"]
        r.append("")
        r.append("**%s idle relay-clients long-polling** (one connection and name each, bench/idle_clients.py): "
                 "server RSS %.1f MiB (%.1f MiB before; %.1f KiB per client) — %s (< 300 MiB); "
                 "%d requests to random ones of them, one at a time: p50 %.2f ms, p99 %.2f ms, max %.2f ms, "
                 "%d errors — %s (p99 < 50 ms). Opening the polls took %.1f s (%s listen-queue overflows); "
                 "the server logged %d of them as connected." % (
                     "{:,}".format(idle["count"]), idle["rss"] / MiB, idle["rss_before"] / MiB,
                     (idle["rss"] - idle["rss_before"]) / KiB / idle["count"],
                     "PASS" if idle["rss"] < 300 * MiB else "FAIL", t["requests"], t["p50_ms"], t["p99_ms"],
                     t["max_ms"], t["errors"], "PASS" if t["p99_ms"] < 50 and not t["errors"] else "FAIL",
                     idle["connect_seconds"], idle["listen_overflows"], idle["server_logged"]))
    if prof:
        r.append("")
        r.append("Profile: " + prof)
    text = "\n".join(r) + "\n"
    publish(text, a.output)
    return 0


def big_line(big, title):
    """The report's line on relaying 1 GiB: C{title}, then the figures and the verdict."""
    return "%s %s, %.1f s (%.0f MiB/s); server peak RSS (VmHWM) %.1f MiB (%.1f MiB before) — %s (< 100 MiB); " \
        "relay client peak RSS %.1f MiB." % (
            title, "ok" if big["ok"] else "FAILED (status %s, %d bytes)" % (big["status"], big["bytes"]),
            big["seconds"], big["bytes"] / MiB / big["seconds"], big["server_hwm"] / MiB,
            big["server_rss_before"] / MiB, "PASS" if big["ok"] and big["server_hwm"] < 100 * MiB else "FAIL",
            big["client_hwm"] / MiB)


def run_measured(b, work):
    """
    C{work()}, with every process stopped after it whatever happens:
    C{(its result, seconds, other processes' load)}, or None when
    interrupted.
    """
    busy0, own0 = busy_seconds(), own_cpu_seconds()
    t_start = time.monotonic()
    try:
        result = work()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        stop_all()
        return None
    except Exception:
        stop_all()
        log("failed; process logs are in %s" % b.logdir)
        raise
    stop_all()
    elapsed = time.monotonic() - t_start
    return result, elapsed, others_since(busy0, own0, elapsed)


def side_by_side(a, b, command):
    sbs = SideBySide(a, b)

    def work():
        info = machine_info(a.python)
        sbs.run()
        big = None if a.skip_rss else b.rss_1gib()
        idle = None if a.skip_idle else b.idle_clients()
        return info, big, idle

    measured = run_measured(b, work)
    if measured is None:
        return 130
    (info, big, idle), elapsed, others = measured
    text = side_by_side_report(a, command, sbs, info, elapsed, others, big, idle)
    publish(text, a.output)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
