"""
C{pip install -e .}: C{twistd relay} and C{twistd relay-client} found from any
folder, with no C{PYTHONPATH}. The other tests set C{PYTHONPATH} to the
checkout, so they cannot notice when the plugins are out of Twisted's sight.

The venv is built once per checkout, interpreter and packaging files (about
20 s with pip's cache warm) and kept in the temporary folder; later runs take
a second or two.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from twisted.trial import unittest

from tests.support.process import ROOT

pytestmark = pytest.mark.process

OFFLINE_HINTS = ("NewConnectionError", "No matching distribution", "Could not find a version", "Network is unreachable")


def _key() -> str:
    h = hashlib.sha256()
    h.update(ROOT.encode() + sys.executable.encode() + sys.version.encode())
    for name in ("setup.py", "setup.cfg", "pyproject.toml"):
        path = os.path.join(ROOT, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def _bin(venv: str, name: str) -> str:
    return os.path.join(venv, "Scripts" if os.name == "nt" else "bin", name)


def editable_venv(test: unittest.TestCase) -> str:
    venv = os.path.join(tempfile.gettempdir(), "relay-editable-" + _key())
    if os.path.exists(os.path.join(venv, "ready")):
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    install = subprocess.run(
        [_bin(venv, "python"), "-m", "pip", "install", "-q", "-e", ROOT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
        env=_clean_env(),
    )
    output = install.stdout.decode("utf-8", "replace")
    if install.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        if any(hint in output for hint in OFFLINE_HINTS):
            raise unittest.SkipTest("pip cannot reach the package index:\n" + output[-2000:])
        test.fail("pip install -e failed:\n" + output[-4000:])
    with open(os.path.join(venv, "ready"), "w") as f:
        f.write("ok\n")
    return venv


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env


class EditableInstallTest(unittest.TestCase):
    timeout = 900

    def test_twistd_finds_both_plugins_from_any_folder(self):
        venv = editable_venv(self)
        elsewhere = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, elsewhere, True)
        python = _bin(venv, "python")
        where = subprocess.run(
            [python, "-c", "import relay; print(relay.__file__)"],
            cwd=elsewhere,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            check=True,
            timeout=60,
        )
        # The checkout's code, not a copy.
        self.assertEqual(
            os.path.dirname(where.stdout.decode().strip()), os.path.join(ROOT, "relay")
        )
        for command, flag in (("relay", b"--drain_grace"), ("relay-client", b"--relay_address")):
            run = subprocess.run(
                [_bin(venv, "twistd"), command, "--help"],
                cwd=elsewhere,
                env=_clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
            self.assertEqual(run.returncode, 0, run.stdout.decode("utf-8", "replace"))
            self.assertIn(flag, run.stdout)
