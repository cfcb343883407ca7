"""Log lines in the Go server's slog format."""

import io
import json
import re

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial import unittest

from relay.logs import make_observer


class LogTests(unittest.TestCase):
    def capture(self, fmt="json", level=LogLevel.info):
        out = io.StringIO()
        publisher = LogPublisher(make_observer(out, fmt, level))
        return out, Logger(observer=publisher)

    def test_json_line_is_compact_with_fields_in_order(self):
        out, log = self.capture()
        log.info("Relay server listening", Port=8080)
        line = out.getvalue()
        self.assertRegex(line, r'^\{"time":"[^"]+","level":"INFO","msg":"Relay server listening","Port":8080\}\n$')
        self.assertIsNotNone(re.search(r'Relay server listening.*"Port":(\d+)', line))

    def test_levels_filter(self):
        out, log = self.capture(level=LogLevel.warn)
        log.info("hidden")
        log.warn("shown", ID="x")
        records = [json.loads(l) for l in out.getvalue().splitlines()]
        self.assertEqual([(r["level"], r["msg"]) for r in records], [("WARN", "shown")])

    def test_failures_carry_the_traceback(self):
        out, log = self.capture()
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("Boom", ID="r:1")
        record = json.loads(out.getvalue())
        self.assertEqual((record["level"], record["msg"], record["ID"]), ("ERROR", "Boom", "r:1"))
        self.assertIn("ZeroDivisionError", record["error"])

    def test_text_format(self):
        out, log = self.capture("text")
        log.info("Relay client connected", ServerName="robot 1")
        self.assertRegex(out.getvalue(), r'^time=\S+ level=INFO msg="Relay client connected" ServerName="robot 1"\n$')
