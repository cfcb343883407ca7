"""Log lines in the Go server's slog format."""

import io
import json
import re

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial import unittest

from relay.logs import make_observer

pytestmark = pytest.mark.memory


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
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([(r["level"], r["msg"]) for r in records], [("WARN", "shown")])

    def test_failures_carry_the_traceback(self):
        out, log = self.capture()
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            log.failure("Boom", ID="r:1")
        record = json.loads(out.getvalue())
        self.assertEqual((record["level"], record["msg"], record["ID"]), ("ERROR", "Boom", "r:1"))
        self.assertIn("ZeroDivisionError", record["error"])

    def test_text_format(self):
        out, log = self.capture("text")
        log.info("Relay client connected", ServerName="robot 1")
        self.assertRegex(out.getvalue(), r'^time=\S+ level=INFO msg="Relay client connected" ServerName="robot 1"\n$')

    def test_text_values_are_quoted_as_slog_quotes_them(self):
        """
        A poll for C{server=x%0D%1B%5B2KFAKE} was once logged with a raw
        CR and ESC, which rewrite an operator's terminal line.
        Every character that is not printable is escaped, Go style.
        """
        out, log = self.capture("text")
        log.info("Relay client connected", ServerName="x\r\x1b[2KFAKE\x7f\x9b\u2028\n", Plain="robot-1", Empty="")
        line = out.getvalue()
        self.assertEqual(
            line.split(" ", 2)[2],
            'msg="Relay client connected" ServerName="x\\r\\x1b[2KFAKE\\x7f\\u009b\\u2028\\n" Plain=robot-1 Empty=""\n',
        )
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(all(c.isprintable() for c in line[:-1]), line)

    def test_text_values_needing_quotes(self):
        out, log = self.capture("text")
        log.info("m", A="a b", B="a=b", C='say "hi"', D="back\\slash", E="ü", F=5, G=True, H=1.5)
        self.assertTrue(
            out.getvalue().endswith(
                'msg=m A="a b" B="a=b" C="say \\"hi\\"" D="back\\\\slash" E=ü F=5 G=true H=1.5\n'
            ),
            out.getvalue(),
        )

    def test_json_escapes_every_non_printable_character(self):
        out, log = self.capture()
        log.info("Relay client connected", ServerName="x\r\x1b[2KFAKE\x7f\x9b\u2028\n")
        line = out.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(all(" " <= c <= "~" for c in line[:-1]), line)
        self.assertEqual(json.loads(line)["ServerName"], "x\r\x1b[2KFAKE\x7f\x9b\u2028\n")

    def test_failures_stay_on_one_line_in_text(self):
        out, log = self.capture("text")
        try:
            raise ValueError("bad\r\x1b[2K")
        except ValueError:
            log.failure("Boom")
        line = out.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(all(c.isprintable() for c in line[:-1]), line)
        self.assertIn("ValueError: bad\\r\\x1b[2K", line)

    def test_twisteds_info_lines_go_to_debug_in_our_subclasses(self):
        from relay.logs import DebugInfoLogger
        from relay.server.h2 import RelayH2Connection
        from relay.server.http1 import RelayChannel, RelayRequest

        for cls in (RelayRequest, RelayChannel, RelayH2Connection):
            self.assertIsInstance(cls._log, DebugInfoLogger)
        out = io.StringIO()
        log = DebugInfoLogger(observer=LogPublisher(make_observer(out, "text", LogLevel.info)))
        log.info("Timing out client: {peer}", peer="IPv4Address(...)")
        log.warn("kept")
        self.assertEqual([line.split(" ", 2)[2] for line in out.getvalue().splitlines()], ["msg=kept"])
