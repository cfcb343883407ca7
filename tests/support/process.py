"""
Running the real C{twistd} (or another program: nginx, the Go binaries) in a
child process and reading its output, for tests that must see what an
operator sees.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import defer, protocol, reactor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def twistd_argv():
    """C{twistd} beside this interpreter if installed there, else C{-m twisted}."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdProcess(protocol.ProcessProtocol):
    """A child C{twistd -n}, its stderr lines, and its exit."""

    def __init__(self):
        self.lines = []
        self._partial = b""
        self._watchers = []
        self.exited = defer.Deferred()
        self.pid = None

    @classmethod
    def spawn(cls, args, env=None, prefix=()):
        """C{prefix}: a command that runs the rest (C{ip netns exec NAME})."""
        proc = cls()
        # Not the developer's RELAY_* variables: relay.tac refuses those it does not know.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
        environ.update(env or {})
        argv = list(prefix) + twistd_argv() + ["-n", "--pidfile="] + list(args)
        reactor.spawnProcess(proc, argv[0], argv, env=environ, path=ROOT)
        return proc

    def connectionMade(self):
        self.pid = self.transport.pid

    def errReceived(self, data):
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for entry in list(self._watchers):
                pattern, d = entry
                m = pattern.search(line)
                if m:
                    self._watchers.remove(entry)
                    d.callback(m)

    outReceived = errReceived

    def wait_for(self, pattern: str) -> defer.Deferred:
        """Fires with the match of the first log line (past or future) matching C{pattern}."""
        regex = re.compile(pattern)
        for line in self.lines:
            m = regex.search(line)
            if m:
                return defer.succeed(m)
        d = defer.Deferred()
        self._watchers.append((regex, d))
        return d

    def listening_port(self) -> defer.Deferred:
        """Fires with the port a C{twistd relay} says it listens on."""
        return self.wait_for(r'Relay server listening.*"Port":(\d+)').addCallback(lambda m: int(m.group(1)))

    def processEnded(self, reason):
        for _, d in self._watchers:
            d.errback(AssertionError("twistd exited; log:\n" + "\n".join(self.lines)))
        self._watchers = []
        # twistd re-raises the signal that stopped it, as Unix programs
        # should: (None, 15) after a SIGTERM.
        self.exited.callback((reason.value.exitCode, reason.value.signal))

    def terminate(self):
        if not self.exited.called:
            self.transport.signalProcess("TERM")
        return self.exited


class ChildProcess(protocol.ProcessProtocol):
    """Any other program (nginx, a Go binary): its output, and its exit."""

    def __init__(self):
        self.output = b""
        self.exited = defer.Deferred()

    @classmethod
    def spawn(cls, argv, env=None):
        proc = cls()
        reactor.spawnProcess(proc, argv[0], list(argv), env=dict(os.environ) if env is None else env)
        return proc

    def errReceived(self, data):
        self.output += data

    outReceived = errReceived

    def processEnded(self, reason):
        self.exited.callback(None)

    def signal(self, name: str) -> None:
        if not self.exited.called:
            self.transport.signalProcess(name)

    def terminate(self):
        self.signal("TERM")
        return self.exited


def environ(**extra) -> dict:
    # relay.tac refuses RELAY_* variables it does not know (a developer's
    # RELAY_TEST_ARTIFACTS): a tac sees only the test's own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_all(cases, cwd, timeout=120):
    """Run C{[(args, env)]} under twistd at once; C{[(returncode, stderr text)]}."""
    procs = [
        subprocess.Popen(
            twistd_argv() + args,
            cwd=cwd,
            env=environ(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for args, env in cases
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, (out + err).decode("utf-8", "replace")))
    return results


def scratch(test) -> str:
    """An empty folder outside the checkout, removed after the test."""
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path
