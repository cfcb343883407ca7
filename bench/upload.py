"""
A large upload through our pair, against the same pair's download.

    python3 bench/upload.py                     # 4 GiB, our processes on this Python
    python3 bench/upload.py --size 512M --python /tmp/bench-venv/bin/python

Starts ``bench/backend.py``, ``twistd relay`` and ``twistd relay-client``
(our server and our relay-client, so that the body streams: see
docs/protocol.md, "Extension: streamed request bodies"), writes a file of
``--size`` bytes, then:

  1. uploads it with ``curl -T`` to the backend's ``/sink``, which hashes
     what it reads and answers with its size and sha256: compared with the
     file's;
  2. reads the peak RSS (VmHWM) of the server and the relay-client,
     before anything else moved through them;
  3. downloads the same number of bytes with ``curl`` from ``/bytes/N``.

and prints one line per figure, and the ratio of upload to download
throughput (the goal: at least 0.8, with the server's peak under 100 MiB).
Wall-clock figures: run it on a machine that is otherwise quiet.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "bench"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size_arg(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError("a size such as 4G, 512M or 1048576")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def spawn(argv, pattern: str, timeout: float = 30.0):
    """Start C{argv}; wait for a line of its output matching C{pattern}; the process and the match."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode("utf-8", "replace")
        if not line and proc.poll() is not None:
            raise SystemExit("%s exited before saying %r" % (argv[0], pattern))
        m = regex.search(line)
        if m:
            return proc, m
    proc.kill()
    raise SystemExit("%s did not say %r within %.0f s" % (" ".join(argv[:3]), pattern, timeout))


def drain(proc) -> None:
    """Keep reading a process's output in the background, so that it never blocks on a full pipe."""
    import threading

    threading.Thread(target=lambda: [None for _ in iter(proc.stdout.readline, b"")], daemon=True).start()


def peak_rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024.0


def make_file(path: str, size: int) -> str:
    """A file of C{size} bytes that does not compress (1 MiB of random bytes, numbered per MiB); its sha256."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        i = 0
        left = size
        while left > 0:
            data = (i.to_bytes(8, "big") + block[8:])[:left]
            f.write(data)
            digest.update(data)
            left -= len(data)
            i += 1
    return digest.hexdigest()


def curl(args):
    out = subprocess.run(["curl", "-sS", "--fail-with-body"] + args, capture_output=True, check=False)
    if out.returncode != 0:
        raise SystemExit("curl failed (%d): %s %s" % (out.returncode, out.stderr.decode(), out.stdout[:300]))
    return out.stdout.decode("utf-8", "replace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--size", type=size_arg, default=4 << 30, help="bytes to move each way (default 4G)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs our twistd")
    p.add_argument("--dir", default=None, help="where the upload's file goes (default: a temporary folder)")
    a = p.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("needs curl")

    twistd = [a.python, "-c", "from twisted.scripts.twistd import run; run()", "--pidfile="]
    procs = []
    folder = tempfile.mkdtemp(dir=a.dir)
    try:
        path = os.path.join(folder, "upload.bin")
        print("writing %d bytes to %s" % (a.size, path), flush=True)
        expected = make_file(path, a.size)

        backend, m = spawn([sys.executable, os.path.join(ROOT, "bench", "backend.py"), "--port", "0"], r'"Port": (\d+)')
        procs.append(backend)
        drain(backend)
        backend_port = int(m.group(1))
        server, m = spawn(
            twistd + ["-n", "relay", "--port=tcp:0:interface=127.0.0.1"], r'Relay server listening.*"Port":(\d+)'
        )
        procs.append(server)
        port = int(m.group(1))
        client, _ = spawn(
            twistd
            + [
                "-n",
                "relay-client",
                "--relay_scheme=http",
                "--relay_address=127.0.0.1:%d" % port,
                "--backend_scheme=http",
                "--backend_address=127.0.0.1:%d" % backend_port,
                "--server_name=" + NAME,
                "--disable_auth_for_remote",
            ],
            r"Starting to relay server request loop",
        )
        procs.append(client)
        drain(client)
        drain(server)
        time.sleep(1.0)

        base = "http://127.0.0.1:%d/client/%s" % (port, NAME)
        started = time.monotonic()
        answer = json.loads(curl(["-T", path, base + "/sink"]))
        up = time.monotonic() - started
        server_peak, client_peak = peak_rss_mib(server.pid), peak_rss_mib(client.pid)
        intact = answer.get("bytes") == a.size and answer.get("sha256") == expected

        started = time.monotonic()
        got = curl(["-o", "/dev/null", "-w", "%{size_download}", base + "/bytes/%d" % a.size])
        down = time.monotonic() - started
        if int(got) != a.size:
            raise SystemExit("download was %s bytes, not %d" % (got, a.size))

        mib = a.size / float(1 << 20)
        print("command: %s" % " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
        print("python: %s" % a.python)
        verdict = "intact" if intact else "WRONG"
        print("upload:   %.0f MiB in %.1f s = %.0f MiB/s, sha256 %s" % (mib, up, mib / up, verdict))
        print("download: %.0f MiB in %.1f s = %.0f MiB/s" % (mib, down, mib / down))
        print("upload / download throughput: %.2f (goal: at least 0.8)" % ((mib / up) / (mib / down),))
        print(
            "peak RSS during the upload: server %.1f MiB (goal: under 100), relay-client %.1f MiB"
            % (server_peak, client_peak)
        )
        if not intact:
            raise SystemExit("the backend got %r, expected %d bytes with sha256 %s" % (answer, a.size, expected))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
