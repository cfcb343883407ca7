"""
The kernel's part of "no request lost in silence", on real sockets: after
a connection is ended by C{TCP_USER_TIMEOUT} (C{ETIMEDOUT}), Linux still
reports its unacknowledged bytes (C{SIOCOUTQ}), and the server hands the
request whose answer never arrived to the next poll. Runs
tests/support/netns_dead_poll.py inside a network namespace of its own (nft rules
drop one connection's packets there), removed afterwards; skips, saying
why, where namespaces or nftables are unavailable.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from twisted.trial import unittest

pytestmark = pytest.mark.process

HERE = os.path.dirname(os.path.abspath(__file__))


def _unavailable():
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return "%s is not installed (nftables, iproute2)" % (tool,)
    return None


class KernelKeepsTheUnacknowledgedBytes(unittest.SynchronousTestCase):
    def setUp(self):
        why = _unavailable()
        if why:
            raise unittest.SkipTest(why)
        self.namespace = "relay-dead-%s" % (uuid.uuid4().hex[:8],)
        made = subprocess.run(["ip", "netns", "add", self.namespace], capture_output=True, text=True)
        if made.returncode != 0:
            raise unittest.SkipTest("cannot make a network namespace: %s" % (made.stderr.strip(),))
        self.addCleanup(subprocess.run, ["ip", "netns", "delete", self.namespace], capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.namespace, "ip", "link", "set", "lo", "up"], check=True)
        probe = subprocess.run(
            ["ip", "netns", "exec", self.namespace, "nft", "add", "table", "inet", "probe"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            raise unittest.SkipTest("nftables does not work here: %s" % (probe.stderr.strip(),))
        subprocess.run(["ip", "netns", "exec", self.namespace, "nft", "delete", "table", "inet", "probe"], check=True)

    def test_an_answer_cut_off_goes_to_the_next_poll_and_one_received_stays(self):
        root = os.path.dirname(HERE)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        run = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.namespace,
                sys.executable,
                os.path.join(HERE, "support", "netns_dead_poll.py"),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=root,
            env=env,
        )
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        result = json.loads(run.stdout.strip().splitlines()[-1])
        self.assertNotIn("error", result, result.get("error"))
        # 1. The cut-off poll never got its answer; the next poll did, with
        #    the same request, and the user got the relay-client's answer.
        self.assertEqual(result["cut_off_poll_received"], 0)
        self.assertEqual(result["requeued_url"], "http://invalid/one")
        self.assertEqual(result["user_status"], "HTTP/1.1 200 OK")
        self.assertTrue(result["user_body_arrived"])
        # 2. A poll answer that arrived is not handed out again, nor failed.
        self.assertEqual(result["second_still_pending"], 1)
        self.assertEqual((result["requeued"], result["lost"], result["dead_connections"]), (1, 0, 2))
        self.assertEqual(result["metrics_timeouts"], ['relay_dead_connections_total{reason="timeout"} 2'])
