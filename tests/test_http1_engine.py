"""
Which HTTP/1.1 engine each process uses: the one meant, per interpreter by
default and as the flag forces it, on both sides.
"""

import platform

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.trial import unittest

from relay import http1_engine
from relay.client import tap as client_tap
from relay.client.keepalive import KeepAliveAgent
from relay.compat import HTTP11ClientProtocol
from relay.config import ServerConfig
from relay.server import tap as server_tap
from relay.server.broker import Broker
from relay.server.resources import RootResource
from relay.server.site import RelayChannel, RelaySite
from tests.support import RawResponse, RelayServer

needs_httptools = None if http1_engine.available() else "httptools is not installed for this interpreter"


@pytest.mark.memory
class Choice(unittest.TestCase):
    def test_auto_is_httptools_on_cpython_and_twisted_on_pypy(self):
        self.patch(http1_engine, "available", lambda: True)
        self.assertEqual(http1_engine.resolve("auto", "CPython"), "httptools")
        self.assertEqual(http1_engine.resolve("auto", "PyPy"), "twisted")

    def test_auto_without_httptools_is_twisted(self):
        self.patch(http1_engine, "available", lambda: False)
        self.assertEqual(http1_engine.resolve("auto", "CPython"), "twisted")

    def test_forced_engines_are_kept_on_any_interpreter(self):
        for implementation in ("CPython", "PyPy"):
            self.assertEqual(http1_engine.resolve("twisted", implementation), "twisted")
            self.assertEqual(http1_engine.resolve("httptools", implementation), "httptools")

    def test_this_interpreter(self):
        expected = "httptools" if platform.python_implementation() == "CPython" and http1_engine.available() else "twisted"
        self.assertEqual(http1_engine.resolve("auto"), expected)

    def test_the_flag_takes_the_three_values_on_both_sides(self):
        for options in (server_tap.Options, client_tap.Options):
            self.assertEqual(options().parseOptions(["--http1_engine=twisted"]) or "ok", "ok")
            for bad in ("h2", "fast"):
                with self.assertRaises(usage.UsageError) as caught:
                    options().parseOptions(["--http1_engine=" + bad])
                self.assertIn("auto|httptools|twisted", str(caught.exception))

    def test_httptools_is_refused_where_it_is_not_installed(self):
        self.patch(http1_engine, "available", lambda: False)
        with self.assertRaises(usage.UsageError) as caught:
            server_tap.Options().parseOptions(["--http1_engine=httptools"])
        self.assertIn("httptools is not installed", str(caught.exception))


def _site(engine: str) -> RelaySite:
    config = ServerConfig(http1_engine=engine)
    return RelaySite(RootResource(Broker(reactor, config), lambda: b""), config)


@pytest.mark.socket
class ServerEngine(unittest.TestCase):
    def test_twisted_is_twisted_webs_channel(self):
        site = _site("twisted")
        self.assertEqual(site.http1_engine, "twisted")
        self.assertIs(site.protocol, RelayChannel)

    def test_httptools_is_the_lean_channel(self):
        from relay.server.lean_http1 import LeanChannel

        site = _site("httptools")
        self.assertEqual(site.http1_engine, "httptools")
        self.assertIs(site.protocol, LeanChannel)
        # The lean channel falls back to twisted.web's for what llhttp refuses.
        self.assertIs(site.fallback_channel, RelayChannel)

    test_httptools_is_the_lean_channel.skip = needs_httptools

    def test_auto_follows_the_interpreter(self):
        self.assertEqual(_site("auto").http1_engine, http1_engine.resolve("auto"))

    @defer.inlineCallbacks
    def test_a_live_server_answers_through_the_engine_meant(self):
        """A request to a running server is read by the chosen engine's channel."""
        engines = ["twisted"] + (["httptools"] if http1_engine.available() else [])
        for engine in engines:
            server = RelayServer(http1_engine=engine)
            self.addCleanup(server.stop)
            user = RawResponse()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), user)
            user.transport.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            yield user.wait_for(b"ok")
            (channel,) = server.service.site.connections
            expected = "RelayChannel" if engine == "twisted" else "LeanChannel"
            self.assertEqual(type(channel).__name__, expected)
            user.transport.loseConnection()


@pytest.mark.memory
class ClientEngine(unittest.TestCase):
    def test_twisted_is_twisteds_client_protocol(self):
        agent = KeepAliveAgent(reactor, None, engine="twisted")
        self.assertEqual(agent.engine, "twisted")
        self.assertIs(agent._protocol, HTTP11ClientProtocol)

    def test_httptools_is_the_lean_protocol(self):
        from relay.client.lean_http1 import LeanClientProtocol

        agent = KeepAliveAgent(reactor, None, engine="httptools")
        self.assertEqual(agent.engine, "httptools")
        self.assertIs(agent._protocol, LeanClientProtocol)

    test_httptools_is_the_lean_protocol.skip = needs_httptools

    def test_auto_follows_the_interpreter(self):
        self.assertEqual(KeepAliveAgent(reactor, None, engine="auto").engine, http1_engine.resolve("auto"))
