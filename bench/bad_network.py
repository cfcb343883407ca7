#!/usr/bin/env python3
"""
Robots on bad networks, side by side: every scenario of
tests/support/badnet.py for the four pairs at once (Go server + Go relay-client,
our server + Go relay-client, Go server + our relay-client, ours + ours),
each pair in a network namespace of its own, and one markdown table.

    .venv/bin/python bench/bad_network.py                          # every scenario (up to about 15 minutes)
    .venv/bin/python bench/bad_network.py --scenarios nat_rebinding,server_restart
    .venv/bin/python bench/bad_network.py --output /tmp/bad_network.md

Needs root, iproute2 and nftables (as the tests do), the Go binaries in
--go-dir, and this checkout's test dependencies (twisted, the relay): run
it with the venv's Python. Everything it makes (namespaces, veth pairs,
processes) is removed at the end, on error and on Ctrl-C.
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twisted.internet import defer, task  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from tests.support import badnet  # noqa: E402

PAIRS = [(badnet.GO, badnet.GO), (badnet.OURS, badnet.GO), (badnet.GO, badnet.OURS), (badnet.OURS, badnet.OURS)]
HEADINGS = [
    "Go server + Go relay-client",
    "our server + Go relay-client",
    "Go server + our relay-client",
    "ours + ours",
]


def scenario_rows(a):
    """(scenario, its row's title, its options) in the table's order."""
    return [
        ("partition", "silence for %g s (a dead zone), then the network returns" % a.partition,
         {"silence": a.partition, "wait": a.wait}),
        ("nat_rebinding", "NAT rebinding: %g s of silence, then new connections work and every old one is "
                          "dropped for good" % a.silence, {"silence": a.silence, "wait": a.wait}),
        ("loss", "%d%% loss both ways: %d small requests one after another, then 20 MiB" % (a.loss, a.loss_requests),
         {"percent": a.loss, "count": a.loss_requests}),
        ("flapping", "the link flaps (3 s down, 3 s up, ten times) during 20 MiB over an 8 Mbit/s uplink",
         {"wait": a.wait}),
        ("server_restart", "server restart: SIGTERM, a new server on the same port 2 s after it exits "
                           "(back: after the new server listens)",
         {"wait": a.wait}),
    ]


def seconds(x):
    return "%.1f s" % x


def back(result):
    if result.back is None:
        return "**not back after %.0f s**" % result.waited
    return "back after %s" % seconds(result.back)


def short(outcome):
    """A status, or the kind of error the user's client reported, and when."""
    if outcome.status is not None:
        what = str(outcome.status)
    elif outcome.error.startswith("no answer"):
        what = "no answer"
    else:
        what = outcome.error.split(":")[0]
    return "%s after %s" % (what, seconds(outcome.finished - outcome.sent))


def patient(result):
    """The requests sent as the outage began, with the server's own timeout as their limit."""
    if not result.patient:
        return ""
    first, rest = result.patient[0], result.patient[1:]
    text = "first request: %s" % short(first)
    if rest:
        text += "; later: " + ", ".join(short(o) for o in rest)
    return text


def probes(result):
    """The user asking every 0.25 s (4 s limit) throughout the scenario."""
    outcomes = result.probes
    ok = [o for o in outcomes if o.ok]
    silent = [o for o in outcomes if o.status is None and o.error.startswith("no answer")]
    errors = [o for o in outcomes if not o.ok and o not in silent]
    kinds = sorted(set(short(o).split(" after")[0] for o in errors))
    return "users: %d asked, %d answered, %d errors%s, %d no answer within 4 s" % (
        len(outcomes), len(ok), len(errors), " (%s)" % ", ".join(kinds) if kinds else "", len(silent))


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def download(result):
    verdict = result.download_verdict
    if verdict == "intact":
        return "20 MiB intact in %s" % seconds(result.download.finished - result.download.sent)
    if verdict == "short":
        return "**20 MiB: a short body that ended as if complete** (%s)" % short(result.download)
    return "20 MiB: %s (%s)" % (verdict, short(result.download))


def cell(scenario, result):
    if isinstance(result, Failure):
        return "(did not run: %s)" % (result.getErrorMessage().splitlines()[0],)
    if scenario in ("partition", "nat_rebinding"):
        return "%s; %s; %s" % (back(result), patient(result), probes(result))
    if scenario == "loss":
        ok = [o for o in result.sequential if o.ok]
        times = [1000 * (o.finished - o.sent) for o in ok]
        return "%d/%d answered, p50 %.0f ms, p99 %.0f ms; %s" % (
            len(ok), len(result.sequential), percentile(times, 50), percentile(times, 99), download(result))
    if scenario == "flapping":
        return "%s; %s; %s" % (download(result), back(result), probes(result))
    if scenario == "server_restart":
        return "%s; %d log lines from the relay-client; %s; %s" % (
            back(result), len(result.client_lines or []), patient(result), probes(result))
    return repr(result)


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def report(a, command, rows, results, elapsed):
    r = ["Date: %s; command: `%s`; whole run %.0f s; code: %s  " % (
        time.strftime("%Y-%m-%d %H:%M %Z"), command, elapsed, git_rev())]
    r.append("Go binaries: `%s`; our processes on %s  " % (a.go_dir, sys.executable))
    r.append(
        "Each pair's relay-client and backend (bench/backend.py) in a network namespace of its own, joined to "
        "the server's by a veth pair; nftables in the robot's namespace drop the packets. Users ask for 10 bytes "
        "every %g s, each with a %g s limit; \"back\" is the first answer after the network returns (for the "
        "restart: after the new server listens). Requests sent as an outage begins (0, 2.5 and 4.5 s into it) "
        "wait up to the servers' `--inactive_request_timeout=%gs` plus its 10 s check and 2 s: the first meets "
        "the poll that was waiting when the network went." % (
            badnet.PROBE_INTERVAL, badnet.USER_LIMIT, a.inactive_request_timeout))
    r.append("")
    r.append("| scenario | " + " | ".join(HEADINGS) + " |")
    r.append("|---" * (len(HEADINGS) + 1) + "|")
    for (scenario, title, _), row in zip(rows, results):
        r.append("| %s | %s |" % (title, " | ".join(cell(scenario, result) for result in row)))
    return "\n".join(r) + "\n"


@defer.inlineCallbacks
def run(reactor, a, command):
    reason = badnet.unavailable()
    if reason:
        raise SystemExit("bad_network: " + reason)
    wanted = a.scenarios.split(",") if a.scenarios else list(badnet.SCENARIOS)
    unknown = [s for s in wanted if s not in badnet.SCENARIOS]
    if unknown:
        raise SystemExit("bad_network: unknown scenario(s) %s; known: %s" % (
            ", ".join(unknown), ", ".join(badnet.SCENARIOS)))
    rows = [row for row in scenario_rows(a) if row[0] in wanted]
    started = time.time()
    results = []
    for scenario, _title, options in rows:
        sys.stderr.write("bad_network: %s, four pairs side by side ...\n" % scenario)
        pairs, slots = [], []
        for server, client in PAIRS:
            try:
                pairs.append(badnet.Pair(server, client, go_dir=a.go_dir,
                                         inactive_request_timeout=a.inactive_request_timeout))
                slots.append(None)
            except badnet.Unavailable:
                slots.append(Failure())
        found = iter((yield badnet.side_by_side(pairs, scenario, **options)))
        row = [slot if slot is not None else next(found) for slot in slots]
        for heading, result in zip(HEADINGS, row):
            sys.stderr.write("  %s: %s\n" % (heading, cell(scenario, result)))
        results.append(row)
    text = report(a, command, rows, results, time.time() - started)
    sys.stdout.write("\n" + text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenarios", default="",
                   help="comma-separated subset of: %s (default: all)" % ", ".join(badnet.SCENARIOS))
    p.add_argument("--go-dir", default=badnet.GO_DIR,
                   help="where http-relay-server and http-relay-client are")
    p.add_argument("--wait", type=float, default=130.0,
                   help="seconds after the network returns before a pair counts as not back (the Go "
                        "relay-client needs about two minutes after a NAT rebinding)")
    p.add_argument("--partition", type=float, default=60.0, help="seconds of the partition")
    p.add_argument("--silence", type=float, default=5.0, help="seconds of silence before the NAT rebinding")
    p.add_argument("--loss", type=int, default=5, help="percent of packets lost, both ways")
    p.add_argument("--loss-requests", type=int, default=400,
                   help="small requests under loss: with 100 (the tests' count), p99 is the second-worst "
                        "answer and one unlucky run's retransmission decides it")
    p.add_argument("--inactive-request-timeout", type=float, default=60.0,
                   help="the servers' --inactive_request_timeout, in seconds (both servers' default: 60)")
    p.add_argument("--output", help="also write the markdown report to this file")
    a = p.parse_args(argv)
    command = " ".join(["bench/bad_network.py"] + list(sys.argv[1:] if argv is None else argv))
    task.react(run, (a, command))


if __name__ == "__main__":
    main()
