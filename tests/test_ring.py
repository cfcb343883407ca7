"""
The replicas' ring must name the same owner as nginx's C{hash … consistent}
for every key, or calls would take two hops (docs/scaling.md). Checked
against the real nginx: one nginx process proxies keys over an upstream of
three of its own ports, each of which answers with its port.
"""

import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
import zlib

import pytest
from twisted.trial import unittest

from relay.server.ring import Ring, _host_and_port
from tests.support.ports import reserve_ports


@pytest.mark.memory
class RingTests(unittest.SynchronousTestCase):
    def test_same_servers_same_owners(self):
        servers = ["relay-0.relay:8080", "relay-1.relay:8080", "relay-2.relay:8080"]
        a, b = Ring(servers), Ring(list(servers))
        for i in range(200):
            self.assertEqual(a.owner("robot-%d" % i), b.owner("robot-%d" % i))

    def test_every_server_owns_a_fair_share(self):
        ring = Ring(["10.0.0.%d:80" % i for i in range(1, 4)])
        counts = {}
        for i in range(3000):
            owner = ring.owner("robot-%d" % i)
            counts[owner] = counts.get(owner, 0) + 1
        self.assertEqual(len(counts), 3)
        for count in counts.values():
            self.assertGreater(count, 600)

    def test_a_lost_server_moves_only_its_own_names(self):
        servers = ["a:1", "b:1", "c:1"]
        ring = Ring(servers)
        for i in range(500):
            key = "robot-%d" % i
            before = ring.owner(key)
            after = ring.owner(key, usable=lambda s: s != "b:1")
            if before != "b:1":
                self.assertEqual(after, before)
            else:
                self.assertIn(after, ("a:1", "c:1"))

    def test_no_usable_server(self):
        self.assertIsNone(Ring(["a:1"]).owner("x", usable=lambda s: False))

    def test_needs_a_server(self):
        self.assertRaises(ValueError, Ring, [])

    def test_host_and_port_as_nginx_splits_them(self):
        self.assertEqual(_host_and_port("relay-0.relay:8080"), (b"relay-0.relay", b"8080"))
        self.assertEqual(_host_and_port("relay-0.relay"), (b"relay-0.relay", b""))
        self.assertEqual(_host_and_port("[::1]:80"), (b"[::1]", b"80"))
        self.assertEqual(_host_and_port("unix:/run/relay.sock"), (b"/run/relay.sock", b""))

    def test_points_are_nginx_crc32_chain(self):
        """The first point of a server is crc32(host NUL port, four zero bytes)."""
        ring = Ring(["h:1"])
        self.assertIn(zlib.crc32(b"h\x001\x00\x00\x00\x00"), ring._hashes)
        self.assertEqual(len(ring._hashes), 160)


@pytest.mark.process
class AgreesWithNginx(unittest.SynchronousTestCase):
    KEYS = 2000

    def setUp(self):
        self.start_nginx(answering=3)

    def start_nginx(self, answering):
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if nginx is None:
            raise unittest.SkipTest("nginx is not installed (.ci/run installs Debian's nginx-light)")
        front, *upstreams = reserve_ports(self, 4)
        self.front = front
        self.servers = ["127.0.0.1:%d" % p for p in upstreams]
        folder = tempfile.mkdtemp(prefix="relay-ring-")
        self.addCleanup(shutil.rmtree, folder, True)
        answers = "".join(
            "server { listen 127.0.0.1:%d; location / { return 200 '%s'; } }\n" % (p, s)
            for p, s in list(zip(upstreams, self.servers))[:answering]
        )
        conf = (
            "daemon off; master_process off; pid %(d)s/nginx.pid; error_log %(d)s/error.log;\n"
            "events {}\nhttp {\n access_log off;\n"
            " client_body_temp_path %(d)s; proxy_temp_path %(d)s; fastcgi_temp_path %(d)s;\n"
            " uwsgi_temp_path %(d)s; scgi_temp_path %(d)s;\n"
            " upstream relay { hash $arg_key consistent; %(servers)s }\n"
            " server { listen 127.0.0.1:%(front)d; location / { proxy_pass http://relay; } }\n"
            " %(answers)s}\n"
        ) % {
            "d": folder,
            "servers": " ".join("server %s;" % s for s in self.servers),
            "front": front,
            "answers": answers,
        }
        path = os.path.join(folder, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.process = subprocess.Popen(
            [nginx, "-p", folder, "-c", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.addCleanup(self._stop)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                break
            except OSError as e:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("nginx did not start: %s" % self.process.stderr.read().decode()) from e
                time.sleep(0.05)  # a real process's port: nothing to wait on but the socket

    def _stop(self):
        if self.process.returncode is not None:
            return
        self.process.terminate()
        self.process.wait(10)
        self.process.stderr.close()

    def test_every_key_has_nginx_owner(self):
        self.assertEqual(self.differences(Ring(self.servers)), [])

    def test_keys_of_a_dead_server_move_where_nginx_moves_them(self):
        """The third server refuses connections: nginx tries the next points."""
        self._stop()
        self.start_nginx(answering=2)
        dead = self.servers[2]
        self.assertEqual(self.differences(Ring(self.servers), usable=lambda s: s != dead), [])

    def differences(self, ring, usable=lambda s: True):
        connection = http.client.HTTPConnection("127.0.0.1", self.front, timeout=10)
        self.addCleanup(connection.close)
        differ = []
        for i in range(self.KEYS):
            key = "robot-%d" % i
            connection.request("GET", "/?key=" + key)
            answer = connection.getresponse().read().decode()
            if answer != ring.owner(key, usable):
                differ.append((key, answer, ring.owner(key, usable)))
        return differ
