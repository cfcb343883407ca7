"""
The README's quick start, run as a new user would: in a scratch copy of the
checkout, install into a fresh venv, start the server, ask C{/healthz}, start
a backend and a relay-client, and relay one request through them.

The commands are taken from the README's shell blocks marked
C{<!-- quickstart:NAME -->} and run one by one, in order (a trailing C{&}
starts one in the background, C{&&} chains). Run as written, with these
substitutions only, each for speed or isolation:

  - C{python3} is the interpreter running the tests (so a PyPy run tests PyPy);
  - ports 8080 and 8000 are free ports picked by the test;
  - C{pip install .} gets C{--no-deps}, and the fresh venv sees the test
    venv's site-packages through a C{.pth} file: the package itself is built
    (by pip, as written, from the configured index's setuptools) and
    installed from the scratch copy, but its dependencies are not installed
    again;
  - C{curl} is retried for a while, since the processes take a moment to
    start (the README says so for the relay-client).
"""

import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest
from twisted.trial import unittest

from tests.support.ports import reserve_ports

pytestmark = pytest.mark.process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MARKED = re.compile(r"<!--\s*quickstart:(\S+)\s*-->\s*\n```[a-z]*\n(.*?)\n```", re.S)
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", "__pycache__", "build", "dist", "*.egg-info", "_trial_temp*", ".hypothesis",
    "twistd.pid", "twistd.log*", "dropin.cache", "tests.*",
)


def quickstart_blocks(readme: str):
    """{name: block text} of the README's marked shell blocks."""
    return {name: body for name, body in _MARKED.findall(readme)}


def commands(block: str):
    """
    The block's commands as (argv, background) pairs: continuation lines
    joined, comments dropped, C{&&} chains split, a trailing C{&} noted.
    """
    result = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        background = bool(words) and words[-1] == "&"
        if background:
            words = words[:-1]
        chain = [[]]
        for word in words:
            if word == "&&":
                chain.append([])
            else:
                chain[-1].append(word)
        for i, argv in enumerate(c for c in chain if c):
            result.append((argv, background and i == len(chain) - 1))
    return result


class ParsingTests(unittest.SynchronousTestCase):
    def test_commands(self):
        block = "a -x && b y \\\n    z &   # note\ncurl -i 'u v'"
        self.assertEqual(
            commands(block), [(["a", "-x"], False), (["b", "y", "z"], True), (["curl", "-i", "u v"], False)]
        )

    def test_blocks_are_marked(self):
        with open(os.path.join(ROOT, "README.md")) as f:
            blocks = quickstart_blocks(f.read())
        self.assertEqual(set(blocks), {"server", "healthz", "relay", "tests"})

    def test_test_command_is_what_ci_runs(self):
        with open(os.path.join(ROOT, "README.md")) as f:
            block = quickstart_blocks(f.read())["tests"].strip()
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            ci = [line.strip() for line in f]
        self.assertIn(block, ci)


class QuickStartTest(unittest.SynchronousTestCase):
    def setUp(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed")
        with open(os.path.join(ROOT, "README.md")) as f:
            self.blocks = quickstart_blocks(f.read())
        self.folder = tempfile.mkdtemp(prefix="relay-quickstart-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.checkout = os.path.join(self.folder, "relay")
        shutil.copytree(ROOT, self.checkout, ignore=_IGNORE)
        server_port, backend_port = reserve_ports(self, 2)
        self.ports = {"8080": str(server_port), "8000": str(backend_port)}
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.background = []
        self.addCleanup(self.stop_all)
        self.log = []

    def stop_all(self):
        for proc in reversed(self.background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.background:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    def substitute(self, argv):
        out = []
        for word in argv:
            if word == "python3":
                word = sys.executable
            for port, free in self.ports.items():
                word = re.sub(r"\b%s\b" % port, free, word)
            out.append(word)
        if out[0].endswith("/pip") and out[1:2] == ["install"]:
            out[2:2] = ["--no-deps"]
        return out

    def see_test_venv(self):
        """A .pth in the fresh venv that adds the test venv's site-packages."""
        purelib = subprocess.run(
            [os.path.join(self.checkout, ".venv", "bin", "python"), "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, env=self.env,
        ).stdout.strip()
        ours = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"]}
        with open(os.path.join(purelib, "test-venv.pth"), "w") as f:
            f.write("\n".join(sorted(p for p in ours if os.path.isdir(p))) + "\n")
        # Twisted's console script, as pip would have written it had it
        # installed Twisted into this venv.
        bin_dir = os.path.join(self.checkout, ".venv", "bin")
        twistd = os.path.join(bin_dir, "twistd")
        with open(twistd, "w") as f:
            f.write(
                "#!%s\nimport sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n"
                % os.path.join(bin_dir, "python")
            )
        os.chmod(twistd, 0o755)

    def run_block(self, name, check_output=None):
        for argv, background in commands(self.blocks[name]):
            argv = self.substitute(argv)
            self.log.append(" ".join(argv))
            if background:
                self.background.append(
                    subprocess.Popen(
                        argv, cwd=self.checkout, env=self.env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, start_new_session=True,
                    )
                )
                continue
            if argv[0] == "curl":
                self.curl(argv, check_output)
                continue
            if argv[0].endswith("twistd"):
                # The foreground server of the first block: in the background
                # here, so that the test can go on.
                self.background.append(
                    subprocess.Popen(
                        argv, cwd=self.checkout, env=self.env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, start_new_session=True,
                    )
                )
                continue
            result = subprocess.run(
                argv, cwd=self.checkout, env=self.env, capture_output=True, text=True, timeout=300
            )
            self.assertEqual(result.returncode, 0, "%s\n%s%s" % (argv, result.stdout, result.stderr))
            if argv[1:3] == ["-m", "venv"]:
                self.see_test_venv()

    def curl(self, argv, check_output):
        deadline = time.monotonic() + 30
        while True:
            result = subprocess.run(argv, cwd=self.checkout, capture_output=True, text=True, timeout=30)
            if result.returncode == 0 and check_output(result.stdout):
                return result.stdout
            for proc in self.background:
                if proc.poll() is not None:
                    self.fail("%r exited with %s:\n%s" % (proc.args, proc.returncode, proc.stdout.read().decode()))
            if time.monotonic() > deadline:
                self.fail("%s never answered as expected; last answer:\n%s%s" % (argv, result.stdout, result.stderr))
            time.sleep(0.3)

    def test_quick_start(self):
        self.run_block("server")
        self.run_block("healthz", lambda out: out.strip() == "ok")
        self.run_block(
            "relay",
            lambda out: out.startswith("HTTP/1.1 200") and "Directory listing" in out,
        )
        # The relay-client and the server were installed from the scratch copy.
        venv = os.path.join(self.checkout, ".venv", "bin")
        where = subprocess.run(
            [os.path.join(venv, "python"), "-c", "import relay; print(relay.__file__)"],
            cwd=self.folder, capture_output=True, text=True, env=self.env, check=True,
        ).stdout
        self.assertIn(os.path.join(self.checkout, ".venv", ""), where)
