#!/usr/bin/env python3
"""
Several replicas behind nginx: 1 KiB at c=32 over 20 backend
names, with 1 and 2 replicas of our server, and the Go pair, each behind
its own nginx with the same site (bench/README.md).

    python3 bench/replicas.py                    # 2 rounds of 5 s per setup, ~2 minutes
    python3 bench/replicas.py --quick            # smoke run: 1 round of 1 s, no warm-up

Setups, all started at once and measured one after the other in each round:

  - Go / Go: http-relay-server, 20 http-relay-clients;
  - ours x1: one `twistd relay` (no --peers: a single replica), 20 of our relay-clients;
  - ours x2: two `twistd relay` with --peers, 20 of our relay-clients;

each behind an nginx running deploy/nginx/relay-replicas.conf (plain HTTP
instead of TLS; its upstream blocks list the setup's servers), with the Go
bench-backend behind every relay-client. Relay-clients and wrk talk to
nginx only, so every setup has the same hop. wrk (1 thread) spreads its
requests over the 20 names round-robin (a Lua request() hook).

The harness needs the standard library, wrk and nginx; our processes run
under --python, as in bench/run.py, whose helpers this reuses.
"""

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import run as harness  # noqa: E402  (bench/run.py)
from run import (  # noqa: E402
    GO_DIR_CANDIDATES,
    TWISTD,
    WRK_LUA,
    busy_seconds,
    cpu_ticks,
    fmt_ms,
    fmt_rate,
    free_port,
    git_rev,
    interpreter_name,
    log,
    machine_info,
    own_cpu_seconds,
    run_wrk,
    start,
    start_go_backend,
    stop_all,
    wait_listening,
    wait_quiet,
    wait_relay_ready,
)

from tests.support.nginx_site import REPLICAS_SITE, NginxSite, find_nginx  # noqa: E402

SIZE = 1024

LUA_NAMES = r"""
local names = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/client/" .. names[n %% #names + 1] .. "/bytes/%d")
end
"""


class Setup:
    """A relay (Go's or ours, with 1 or more replicas), its relay-clients, and the nginx in front."""

    def __init__(self, kind, replicas, label):
        self.kind, self.replicas, self.label = kind, replicas, label
        self.servers, self.clients, self.nginx = [], [], None
        self.port = None
        self.results = {}  # round -> wrk result, with "cpu" added

    def pids(self):
        return [p.pid for p in self.servers + self.clients + [self.nginx]]


class ReplicasBench:
    def __init__(self, a):
        self.a = a
        self.logdir = tempfile.mkdtemp(prefix="relay-replicas-bench-")
        self.names = ["bench-%d" % i for i in range(a.names)]
        self.lua = os.path.join(self.logdir, "names.lua")
        with open(self.lua, "w") as f:
            f.write(LUA_NAMES % (", ".join('"%s"' % n for n in self.names), SIZE) + WRK_LUA)
        self.relay_env = harness.relay_env(a)
        self.twistd = shlex.split(TWISTD.format(python=shlex.quote(a.python)))
        self.setups = [Setup("go", 1, "Go / Go")] + [
            Setup("ours", n, "ours x%d / ours" % n) for n in a.replicas
        ]

    def server_cmd(self, setup, port, peers):
        if setup.kind == "go":
            return [os.path.join(self.a.go_dir, "http-relay-server"), "--port=%d" % port]
        cmd = self.twistd + ["-n", "relay", "--port=tcp:%d:interface=127.0.0.1" % port]
        if len(peers) > 1:
            cmd += ["--peers=" + ",".join(peers), "--peer_self=127.0.0.1:%d" % port]
        return cmd

    def client_cmd(self, setup, name):
        flags = ["--backend_scheme=http", "--backend_address=127.0.0.1:%d" % self.backend_port,
                 "--relay_scheme=http", "--relay_address=127.0.0.1:%d" % setup.port,
                 "--server_name=" + name, "--disable_auth_for_remote"]
        if setup.kind == "go":
            return [os.path.join(self.a.go_dir, "http-relay-client")] + flags
        return self.twistd + ["-n", "relay-client"] + flags

    def start(self, i, setup):
        ports = [free_port() for _ in range(setup.replicas)]
        peers = ["127.0.0.1:%d" % p for p in ports]
        for port in ports:
            proc = start("s%d-server-%d" % (i, port), self.server_cmd(setup, port, peers), self.logdir,
                         env=self.relay_env)
            setup.servers.append(proc)
        for proc, port in zip(setup.servers, ports):
            wait_listening(proc, port)
        setup.port = free_port()
        folder = os.path.join(self.logdir, "nginx-%d" % i)
        os.mkdir(folder)
        conf = NginxSite(REPLICAS_SITE).plain_http(folder, setup.port, 0, peers)
        setup.nginx = start("s%d-nginx" % i, [self.a.nginx, "-p", folder, "-c", conf], self.logdir)
        wait_listening(setup.nginx, setup.port)
        for name in self.names:
            setup.clients.append(start("s%d-client-%s" % (i, name), self.client_cmd(setup, name), self.logdir,
                                       env=self.relay_env))
        for name in self.names:
            wait_relay_ready(setup.port, name, timeout=60)
        log("%s: nginx on %d in front of %s; %d relay-clients answer" % (
            setup.label, setup.port, ", ".join(peers), len(self.names)))

    def measure(self, setup, seconds):
        pids = setup.pids()
        wait_quiet(pids)
        before = [cpu_ticks(p) for p in pids]
        r = run_wrk(self.a.wrk, self.lua, "http://127.0.0.1:%d" % setup.port, self.a.concurrency, seconds, 30)
        used = [cpu_ticks(p) - b for p, b in zip(pids, before)]
        hz = os.sysconf("SC_CLK_TCK")
        n_servers, n_clients = len(setup.servers), len(setup.clients)
        share = lambda ticks: sum(ticks) / hz / (r["duration_us"] / 1e6)  # noqa: E731
        r["cpu"] = (share(used[:n_servers]), share(used[n_servers:n_servers + n_clients]),
                    share(used[n_servers + n_clients:]))
        return r

    def run(self):
        a = self.a
        _, self.backend_port = start_go_backend(a.go_dir, self.logdir)
        for i, setup in enumerate(self.setups):
            self.start(i, setup)
        if a.warmup:
            for setup in self.setups:
                log("warm-up %s: %d s" % (setup.label, a.warmup))
                self.measure(setup, a.warmup)
        for rnd in range(1, a.rounds + 1):
            for setup in self.setups:
                r = setup.results[rnd] = self.measure(setup, a.duration)
                log("round %d %-18s %s req/s p50 %s p99 %s errors %d" % (
                    rnd, setup.label, fmt_rate(r["rps"]), fmt_ms(r["p50_us"], r), fmt_ms(r["p99_us"], r),
                    r["errors"]))

    def best(self, setup):
        return max(setup.results.values(), key=lambda r: r["rps"])

    def table(self):
        go = self.best(self.setups[0])["rps"]
        out = [
            "| setup (server / clients) | req/s | ratio to Go | p50 | p99 | wrk errors "
            "| CPU: servers / clients / nginx |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for setup in self.setups:
            r = self.best(setup)
            out.append("| %s | %s | %.2f | %s | %s | %d | %s |" % (
                setup.label, fmt_rate(r["rps"]), r["rps"] / go, fmt_ms(r["p50_us"], r), fmt_ms(r["p99_us"], r),
                r["errors"], " / ".join("%.0f%%" % (100 * x) for x in r["cpu"])))
        return "\n".join(out)

    def detail(self):
        out = ["| setup | round | req/s | p50 | p99 | errors |", "|---|---:|---:|---:|---:|---:|"]
        for setup in self.setups:
            for rnd, r in sorted(setup.results.items()):
                out.append("| %s | %d | %s | %s | %s | %d |" % (
                    setup.label, rnd, fmt_rate(r["rps"]), fmt_ms(r["p50_us"], r), fmt_ms(r["p99_us"], r),
                    r["errors"]))
        return "\n".join(out)


def report(a, b, command, info, interp, elapsed, others):
    r = [
        "Date: %s; command: `%s`; whole run %.0f s; code: %s  " % (
            time.strftime("%Y-%m-%d %H:%M %Z"), command, elapsed, git_rev()),
        "Our processes: %s; Go binaries: `%s`; nginx: `%s` with deploy/nginx/relay-replicas.conf  " % (
            interp["long"], a.go_dir, a.nginx),
        "Machine: %s CPUs (`nproc`), %s, %s RAM, Linux %s; %s, 1 thread, %d connections, %d s per cell, "
        "%d rounds; CPU used by other processes during the run: %.0f%% of one core  " % (
            info["nproc"], info["cpu"], info["mem"], info["kernel"], info["wrk"], a.concurrency, a.duration,
            a.rounds, 100 * others),
        "",
        b.table(),
        "",
        "%s responses over %d names (round-robin), through nginx to the relay and its relay-clients, to the Go "
        "bench-backend; the best of %d rounds. CPU in %% of one core, summed over the processes of each kind "
        "during that run." % (harness.fmt_size(SIZE), a.names, a.rounds),
        "",
        "<details><summary>Every round</summary>\n\n" + b.detail() + "\n\n</details>",
    ]
    return "\n".join(r) + "\n"


def main(argv=None):
    default_python = "/tmp/bench-venv/bin/python" if os.path.exists("/tmp/bench-venv/bin/python") else sys.executable
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--python", default=default_python, help="interpreter for our server and relay-clients")
    p.add_argument("--go-dir", default=next((d for d in GO_DIR_CANDIDATES if os.path.isdir(d)), GO_DIR_CANDIDATES[0]))
    p.add_argument("--nginx", default=find_nginx() or "nginx")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--replicas", default="1,2", help="our setups: replicas of our server, comma-separated")
    p.add_argument("--names", type=int, default=20, help="backend names, one relay-client each")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per setup before round 1; 0: none")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s, no warm-up")
    p.add_argument("--output", help="also write the markdown report to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.rounds, a.warmup = 1, 1, 0
    a.replicas = [int(n) for n in a.replicas.split(",") if n.strip()]
    # What bench/run.py's relay_env reads for our processes' environment.
    a.malloc_tuning, a.pypy_nursery, a.installed_only = "off", "32MB", False
    for tool in (a.wrk, a.nginx):
        if not shutil.which(tool):
            p.error("%s not found (apt-get install -y wrk nginx-light)" % tool)
    for tool in ("http-relay-server", "http-relay-client", "bench-backend"):
        if not os.access(os.path.join(a.go_dir, tool), os.X_OK):
            p.error("%s not found in --go-dir %s" % (tool, a.go_dir))
    harness.raise_nofile(4096)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    command = "python3 bench/replicas.py" + "".join(
        " " + shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)
    )
    b = ReplicasBench(a)
    log("logs in %s" % b.logdir)
    busy0, own0 = busy_seconds(), own_cpu_seconds()
    started = time.monotonic()
    try:
        info, interp = machine_info(a.python), interpreter_name(a.python)
        b.run()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except Exception:
        log("failed; process logs are in %s" % b.logdir)
        raise
    finally:
        stop_all()
    elapsed = time.monotonic() - started
    others = harness.others_since(busy0, own0, elapsed)
    harness.publish(report(a, b, command, info, interp, elapsed, others), a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())  # main() stops every process it started, whatever happens
