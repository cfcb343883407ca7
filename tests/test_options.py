"""Flags: Go spellings, dashed forms, Go durations, endpoints, help text."""

import pytest
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.trial import unittest

from relay.durations import format_duration, parse_duration
from relay.server.tap import Options

pytestmark = pytest.mark.memory


class OptionsTests(unittest.TestCase):
    def parse(self, *argv):
        o = Options()
        o.parseOptions(list(argv))
        return o

    def test_defaults_are_the_go_servers(self):
        o = self.parse()
        self.assertEqual(o["endpoint"], "tcp:80:backlog=4096")
        self.assertEqual(o["block_size"], 10240)
        self.assertEqual(o["inactive_request_timeout"], 60.0)
        self.assertEqual(o["inactive_backend_timeout"], 1800.0)
        self.assertEqual(o["max_request_body"], 100 * 1024 * 1024)
        self.assertEqual(o["log_level"], LogLevel.info)
        self.assertEqual(o["log_format"], "json")

    def test_go_spellings_dashes_and_single_dash(self):
        for argv in (
            ["--block_size=4096", "--inactive_request_timeout=1m30s"],
            ["--block-size=4096", "--inactive-request-timeout", "1m30s"],
            ["-block_size=4096", "-inactive_request_timeout=1m30s"],
        ):
            o = self.parse(*argv)
            self.assertEqual((o["block_size"], o["inactive_request_timeout"]), (4096, 90.0), argv)

    def test_port_number_or_endpoint(self):
        self.assertEqual(self.parse("--port=8080")["endpoint"], "tcp:8080:backlog=4096")
        self.assertEqual(self.parse("--port=0")["endpoint"], "tcp:0:backlog=4096")
        self.assertEqual(
            self.parse("--port=tcp:8080:interface=127.0.0.1")["endpoint"],
            "tcp:8080:interface=127.0.0.1:backlog=4096",
        )
        self.assertEqual(self.parse("--port=tcp:8080:backlog=64")["endpoint"], "tcp:8080:backlog=64")
        with self.assertRaises(usage.UsageError):
            self.parse("--port=eighty")

    def test_log_levels_go_numbers_and_names(self):
        self.assertEqual(self.parse("--log_level=-4")["log_level"], LogLevel.debug)
        self.assertEqual(self.parse("--log_level=4")["log_level"], LogLevel.warn)
        self.assertEqual(self.parse("--log_level=error")["log_level"], LogLevel.error)
        with self.assertRaises(usage.UsageError):
            self.parse("--log_level=loud")
        with self.assertRaises(usage.UsageError):
            self.parse("--log_format=xml")

    def test_bad_values_are_clear_errors(self):
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--inactive_request_timeout=soon")
        self.assertIn("1m30s", str(e.exception))
        with self.assertRaises(usage.UsageError):
            self.parse("--block_size=0")
        with self.assertRaises(usage.UsageError):
            self.parse("--max_request_body=lots")

    def test_help_documents_every_flag(self):
        text = str(Options())
        for flag in (
            "--port",
            "--block_size",
            "--inactive_request_timeout",
            "--inactive_backend_timeout",
            "--max_request_body",
            "--max_buffered_bodies",
            "--client_tokens",
            "--user_tokens",
            "--trusted_user_header",
            "--max_pending_per_backend",
            "--max_backends",
            "--max_headers",
            "--max_header_bytes",
            "--header_timeout",
            "--log_level",
            "--log_format",
        ):
            self.assertIn(flag, text)


class DurationTests(unittest.TestCase):
    def test_parse(self):
        for text, seconds in [("60s", 60), ("1m30s", 90), ("30m", 1800), ("1.5h", 5400), ("250ms", 0.25), ("2", 2)]:
            self.assertAlmostEqual(parse_duration(text), seconds)
        for bad in ("", "m", "1x", "1m30"):
            with self.assertRaises(ValueError):
                parse_duration(bad)

    def test_format_like_go(self):
        self.assertEqual(format_duration(60), "1m0s")
        self.assertEqual(format_duration(90), "1m30s")
        self.assertEqual(format_duration(3600), "1h0m0s")
        self.assertEqual(format_duration(1.5), "1.5s")
        self.assertEqual(format_duration(0.25), "250ms")
