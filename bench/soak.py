"""
Soak test, run by hand (not in CI): 200 concurrent user-clients over 20
backends for 60 s, mixed response sizes, some users hanging up mid-response.
At the end the relay must hold no pending request, no more file descriptors
than at the start, and a flat RSS.

    python bench/soak.py [--seconds 60] [--users 200] [--backends 20] [--python .venv/bin/python]

It starts the backend (bench/backend.py), `twistd relay` and one
`twistd relay-client` per backend, all on 127.0.0.1, drives the load with
asyncio (raw HTTP/1.1, so that hanging up is a real reset), samples the
server's RSS and open fds every 5 s, and exits non-zero if a check fails.
"""

import argparse
import asyncio
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZES = [(1024, 50), (16 * 1024, 20), (256 * 1024, 15), (1024 * 1024, 10), (8 * 1024 * 1024, 5)]


def twistd(python):
    script = os.path.join(os.path.dirname(python), "twistd")
    if os.path.exists(script):
        return [python, script]
    return [python, "-c", "from twisted.scripts.twistd import run; run()"]


def start(argv, pattern, env=None):
    """Start a process; return it and the match of its first line matching C{pattern}."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env, text=True, bufsize=1
    )
    found = queue.Queue()

    def drain():
        # Keep reading, or the process blocks once the pipe is full.
        for line in proc.stdout:
            m = re.search(pattern, line)
            if m:
                found.put(m)
        found.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        m = found.get(timeout=30)
    except queue.Empty:
        m = None
    if m is None:
        proc.kill()
        raise SystemExit("did not start: %s" % " ".join(argv))
    return proc, m


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


async def metric(port, name):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    m = re.search(rb"^%s (\S+)$" % name.encode(), data, re.M)
    return float(m.group(1)) if m else None


async def user(port, backends, deadline, stats):
    while time.time() < deadline:
        size = random.choices([s for s, _ in SIZES], [w for _, w in SIZES])[0]
        name = random.choice(backends)
        hang_up = random.random() < 0.05
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /client/%s/bytes/%d HTTP/1.1\r\nHost: soak\r\n\r\n" % (name.encode(), size))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = int(head.split(b" ", 2)[1])
            if hang_up:
                await reader.read(min(size // 2, 65536))
                writer.transport.abort()
                stats["hung_up"] += 1
                continue
            if status != 200:
                stats["status_%d" % status] = stats.get("status_%d" % status, 0) + 1
                writer.close()
                continue
            body = await asyncio.wait_for(reader.readexactly(size), 60)
            stats["ok"] += 1
            stats["bytes"] += len(body)
            writer.close()
        except Exception as e:
            stats["error_" + type(e).__name__] = stats.get("error_" + type(e).__name__, 0) + 1
            await asyncio.sleep(0.05)


async def soak(args):
    python = os.path.abspath(args.python)
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = []
    try:
        backend, m = start([sys.executable, os.path.join(HERE, "backend.py"), "--port", "0"], r'"Port": ?(\d+)')
        procs.append(backend)
        backend_port = int(m.group(1))
        server, m = start(
            twistd(python) + ["-n", "--pidfile=", "relay", "--port=tcp:0:interface=127.0.0.1"],
            r'Relay server listening.*"Port":(\d+)',
            env,
        )
        procs.append(server)
        port = int(m.group(1))
        names = ["soak-%d" % i for i in range(args.backends)]
        for name in names:
            client = subprocess.Popen(
                twistd(python)
                + [
                    "-n", "--pidfile=", "relay-client", "--relay_scheme=http",
                    "--relay_address=127.0.0.1:%d" % port, "--backend_scheme=http",
                    "--backend_address=127.0.0.1:%d" % backend_port, "--server_name=" + name,
                    "--disable_auth_for_remote", "--num_pending_requests=4", "--log_level=warn",
                ],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append(client)
        while (await metric(port, "relay_backends") or 0) < args.backends or (
            await metric(port, "relay_open_polls") or 0
        ) < args.backends:
            await asyncio.sleep(0.2)

        async def settled_fds():
            """
            The server's fd count once idle keep-alive connections are gone:
            after a burst, relay-clients' pools hold extra connections until
            the server's header timeout (30 s) closes them.
            """
            earliest = time.time() + args.idle_wait
            last, stable_since = fds(server.pid), time.time()
            while time.time() - stable_since < 3 or time.time() < earliest:
                await asyncio.sleep(0.5)
                now = fds(server.pid)
                if now != last:
                    last, stable_since = now, time.time()
            return last

        warm_deadline = time.time() + 5
        stats = {"ok": 0, "bytes": 0, "hung_up": 0}
        await asyncio.gather(*[user(port, names, warm_deadline, stats) for _ in range(args.users)])
        start_fds = await settled_fds()
        start_rss = rss_kib(server.pid)
        print("warm-up: %s; server RSS %d MiB, %d fds" % (stats, start_rss // 1024, start_fds))

        stats = {"ok": 0, "bytes": 0, "hung_up": 0}
        deadline = time.time() + args.seconds
        samples = []

        async def sample():
            while time.time() < deadline:
                await asyncio.sleep(5)
                samples.append(
                    (round(time.time() - deadline + args.seconds), rss_kib(server.pid) // 1024, fds(server.pid))
                )
                print("  t=%3ds RSS %4d MiB  fds %5d  ok %d" % (samples[-1] + (stats["ok"],)))

        await asyncio.gather(sample(), *[user(port, names, deadline, stats) for _ in range(args.users)])
        # Let hung-up requests be noticed and timers settle.
        for _ in range(50):
            if (await metric(port, "relay_pending_requests")) == 0:
                break
            await asyncio.sleep(0.2)
        pending = await metric(port, "relay_pending_requests")
        end_fds = await settled_fds()
        end_rss = rss_kib(server.pid)
        print("soak: %s" % json.dumps(stats, sort_keys=True))
        print(
            "server: pending %s, RSS %d -> %d MiB, fds %d -> %d"
            % (pending, start_rss // 1024, end_rss // 1024, start_fds, end_fds)
        )
        failures = []
        if pending != 0:
            failures.append("pending requests left: %s" % pending)
        if end_fds > start_fds + 5:
            failures.append("fd growth: %d -> %d" % (start_fds, end_fds))
        # Flat: the working set of 200 concurrent responses is reached early;
        # it must not keep growing after the first half of the run.
        early = max(rss for t, rss, _ in samples[: max(1, len(samples) // 2)])
        late = max(rss for t, rss, _ in samples[len(samples) // 2 :])
        if late > early * 1.1 + 8:
            failures.append("RSS kept growing: %d MiB in the first half, %d MiB in the second" % (early, late))
        if stats["ok"] == 0:
            failures.append("no request succeeded")
        for f in failures:
            print("FAIL: " + f)
        print("PASS" if not failures else "FAILED")
        return 1 if failures else 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=25)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("SOAK_DEBUG", "0")) or 10**6, exit=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the relay processes")
    parser.add_argument(
        "--idle-wait", type=int, default=35, help="seconds to let idle connections close before counting fds"
    )
    args = parser.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
