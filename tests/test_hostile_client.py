"""
A hostile relay-client, as docs/security.md describes it: trusted for its
own backend (C{evil}) and nothing else. Whatever it sends (forged or
replayed ids, every status from 0 to 999 and beyond, every class of header
and trailer name, messages out of order, late, or after its user left),
the user of another backend (C{victim}) on the same HTTP/1.1 connection
(pipelined) or HTTP/2 connection (multiplexed) gets its own backend's true
answer, and the evil backend's own user gets a well-framed response or a
clean error.

The server runs in memory (L{twisted.test.iosim}) on a L{Clock}: the real
protocol stacks, with no sockets and no waiting, so that a thousand
statuses cost seconds. tests/test_security.py has the same rules over
real sockets.
"""



import pytest

from relay.proto.http_relay_pb2 import HttpResponse
from tests.support.engines import on_each_engine
from tests.support.hostile import TRUE_ANSWER, Bytes, HostileTestCase, http11_responses

pytestmark = pytest.mark.memory

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


def expected_status(status, h2=False) -> int:
    """What the evil backend's own user gets for a first message with C{status}."""
    if status is None or not 100 <= status <= 999:
        return 500
    if status == 101 and h2:
        return 500
    if status < 200:
        return 502
    return status


class EveryStatusTests(HostileTestCase):
    STATUSES = [None, -1, 1000, 2**31 - 1] + list(range(0, 1000))

    def test_every_status_over_http11(self):
        for status in self.STATUSES:
            user, message = self.pipelined()
            self.post(message.id, status, FORGED)
            self.flush()
            self.victim_answers()
            first = self.assert_victim_unharmed_http11(user)
            self.assertEqual(first[0], expected_status(status), status)
            if first[0] in (204, 304) or first[0] != status:
                self.assertNotIn(b"forged", user.data, status)
            user.transport.loseConnection()
            self.flush()
        self.assert_clean()

    def test_every_status_over_h2_on_one_connection(self):
        user = self.h2_user()
        for status in self.STATUSES:
            evil, victim, message = self.multiplexed(user)
            self.post(message.id, status, b"forged")
            self.flush()
            self.victim_answers()
            self.assert_victim_unharmed_h2(user, victim)
            self.assertIsNotNone(evil["end"], status)
            if evil["end"] == "ended":
                self.assertEqual(int(evil["headers"][":status"]), expected_status(status, h2=True), status)
        self.assert_clean()


class HeadAndNoBodyTests(HostileTestCase):
    def test_bodies_for_head_204_and_304_never_reach_the_next_response(self):
        for method in (b"HEAD", b"GET"):
            for status in (200, 204, 304):
                for length in (None, "6", "100", "0"):
                    user = Bytes()
                    self.connect(user)
                    user.transport.write(
                        b"%s /client/evil/x HTTP/1.1\r\nHost: relay\r\n\r\n"
                        b"GET /client/victim/y HTTP/1.1\r\nHost: relay\r\n\r\n" % (method,)
                    )
                    self.flush()
                    message = self.poll("evil")
                    headers = [("Content-Length", length)] if length is not None else []
                    self.post(message.id, status, FORGED, headers=headers)
                    self.flush()
                    if user.lost:
                        # Cut short (a body shorter than its length): aborted
                        # before the victim's request was relayed.
                        self.assertEqual((method, status, length), (b"GET", 200, "100"))
                        self.assertNotIn(TRUE_ANSWER, user.data)
                        continue
                    self.victim_answers()
                    head = user.data.split(b"\r\n\r\n", 1)[0]
                    if method == b"HEAD" or status in (204, 304):
                        self.assertNotIn(b"forged", user.data, (method, status, length))
                    if status == 204:
                        self.assertNotIn(b"Content-Length", head)
                    self.assertTrue(user.data.endswith(b"ictim's true answer\r\n0\r\nX-Done: 1\r\n\r\n"))
        self.assert_clean()


# One name of each kind a relay-client might send, with whether a
# well-behaved relay passes it on to the user as a header / as a trailer.
NAMES = [
    ("X-Plain", True, True),
    ("x-lower-case", True, True),
    ("Grpc-Status", True, True),
    ("Connection", False, False),
    ("Keep-Alive", False, False),
    ("Proxy-Connection", False, False),
    ("TE", False, False),
    ("Transfer-Encoding", False, False),
    ("Upgrade", False, False),
    ("Trailer", False, False),
    ("Content-Length", None, False),
    ("Host", True, False),
    ("Authorization", True, False),
    ("Content-Type", True, False),
    ("X-Newline\n", False, False),
    ("X-Cr\r", False, False),
    ("X-Crlf\r\nSet-Cookie: a=b", False, False),
    ("X-Nul\0", False, False),
    ("X Space", False, False),
    (" X-Leading", False, False),
    ("X-Colon:", False, False),
    (":status", False, False),
    (":path", False, False),
    ("", False, False),
    ("X-\u00e9", False, False),
    ("X-" + "a" * 5000, True, True),
]
VALUES = ["v", "", " padded ", "a\r\nInjected: 1", "\0", "x" * 3000, "\u00e9"]


class NameClassTests(HostileTestCase):
    def cases(self):
        for name, as_header, as_trailer in NAMES:
            for value in VALUES[:2] if len(name) > 100 else VALUES:
                yield name, value, as_header, as_trailer

    def test_every_name_class_over_http11(self):
        for name, value, as_header, as_trailer in self.cases():
            user, message = self.pipelined()
            self.post(message.id, 200, b"evil body", eof=False, headers=[(name, value)])
            self.post(message.id, None, b"", eof=True, trailers=[(name, value)])
            self.flush()
            self.victim_answers()
            status, headers, body, trailers = self.assert_victim_unharmed_http11(user)
            lower = name.lower().encode("utf-8")
            if lower == b"transfer-encoding":
                # Ours, for the chunked framing: never the relay-client's.
                self.assertEqual(headers[lower], [b"chunked"])
            elif as_header is not None:
                self.assertEqual(lower in headers, as_header, (name, value))
            self.assertEqual(body, b"evil body", (name, value))
            passed = [t for t in trailers if t.lower().startswith(lower + b":")]
            self.assertEqual(bool(passed), as_trailer and bool(name), (name, value))
            self.assertNotIn(b"Injected", b"".join(headers.get(b"injected", [])))
            user.transport.loseConnection()
            self.flush()
        self.assert_clean()

    def test_every_name_class_over_h2(self):
        user = self.h2_user()
        for name, value, as_header, as_trailer in self.cases():
            evil, victim, message = self.multiplexed(user)
            self.post(message.id, 200, b"evil body", eof=False, headers=[(name, value)])
            self.post(message.id, None, b"", eof=True, trailers=[(name, value)])
            self.flush()
            self.victim_answers()
            self.assert_victim_unharmed_h2(user, victim)
            self.assertEqual(evil["end"], "ended", (name, value))
            self.assertEqual(evil["data"], b"evil body")
            lower = name.lower()
            if lower.startswith(":"):
                self.assertEqual(evil["headers"][":status"], "200")
            elif as_header is not None:
                self.assertEqual(lower in evil["headers"], as_header, (name, value))
            self.assertEqual(lower in (evil["trailers"] or {}), as_trailer, (name, value))
        self.assert_clean()


class IdTests(HostileTestCase):
    def test_forged_and_replayed_ids(self):
        for protocol in ("http/1.1", "h2"):
            if protocol == "h2":
                h2user = self.h2_user()
                evil, victim, message = self.multiplexed(h2user)
            else:
                user, message = self.pipelined()
            # Evil finishes its own request; then the victim's is in flight.
            self.assertEqual(self.post(message.id, 200, b"mine"), 200)
            self.flush()
            victim_request = self.poll("victim")
            self.assertEqual(
                self.post(victim_request.id, 200, TRUE_ANSWER[:5], eof=False, headers=[("X-Victim", "1")]), 200
            )
            secret = victim_request.id.split(":", 1)[1]
            forged = [
                "victim:" + "0" * 32,
                "victim:" + secret[:-1],
                "victim:" + secret + "0",
                "victim:" + secret.upper(),
                " " + victim_request.id,
                victim_request.id + " ",
                "evil:" + secret,
                "victim::" + secret,
                secret,
                ":" + secret,
                "victim:",
                ":",
                message.id,  # replayed: evil's own, finished id
            ]
            for request_id in forged:
                self.assertEqual(
                    self.post(request_id, 200, b"forged", eof=True, trailers=[("X-Done", "forged")]), 400, request_id
                )
                self.assertEqual(
                    self.call("POST", "/server/requeststream?id=" + request_id.replace(" ", "%20"))[0], 410
                )
            # Invalid UTF-8 in the id, and a second copy of a field.
            self.assertEqual(self.post_raw(b"\x0a\x03\xff\xfe\xfd\x10\xc8\x01"), 400)
            self.assertEqual(self.post_raw(HttpResponse(id=message.id).SerializeToString() * 2), 400)
            self.assertEqual(
                self.post(victim_request.id, None, TRUE_ANSWER[5:], eof=True, trailers=[("X-Done", "1")]), 200
            )
            self.flush()
            if protocol == "h2":
                self.assert_victim_unharmed_h2(h2user, victim)
            else:
                evil_response = self.assert_victim_unharmed_http11(user)
                self.assertEqual(evil_response[2], b"mine")
            # Replaying the victim's finished id changes nothing either.
            self.assertEqual(self.post(victim_request.id, 200, b"again"), 400)
        self.assert_clean()


class OrderTests(HostileTestCase):
    """Out-of-order, late and orphaned messages."""

    def run_both(self, hostile, check_evil):
        for protocol in ("http/1.1", "h2"):
            if protocol == "h2":
                user = self.h2_user()
                evil, victim, message = self.multiplexed(user)
            else:
                user, message = self.pipelined()
            hostile(message, user)
            self.flush()
            self.victim_answers()
            if protocol == "h2":
                self.assert_victim_unharmed_h2(user, victim)
                check_evil(evil)
            else:
                first = self.assert_victim_unharmed_http11(user)
                check_evil({"headers": {":status": str(first[0])}, "data": first[2], "end": "ended"})
        self.assert_clean()

    def test_body_before_status(self):
        def hostile(message, user):
            self.assertEqual(self.post(message.id, None, b"body first", eof=False), 200)
            self.flush()
            self.assertEqual(self.post(message.id, 200, b"then status"), 400)

        self.run_both(hostile, lambda evil: self.assertEqual(evil["headers"][":status"], "500"))

    def test_messages_after_eof(self):
        def hostile(message, user):
            self.assertEqual(self.post(message.id, 200, b"done"), 200)
            for _ in range(3):
                self.assertEqual(self.post(message.id, 200, b"late", eof=False), 400)
                self.assertEqual(self.post(message.id, None, b"later", trailers=[("X-Late", "1")]), 400)

        def check(evil):
            self.assertEqual((evil["headers"][":status"], evil["data"]), ("200", b"done"))

        self.run_both(hostile, check)

    def test_second_status_and_keepalives_mid_response(self):
        def hostile(message, user):
            self.assertEqual(self.post(message.id, 201, b"a", eof=False), 200)
            self.assertEqual(self.post(message.id, None, b"", eof=False), 200)  # keep-alive
            self.assertEqual(self.post(message.id, 100, b"b", eof=False, headers=[("Connection", "close")]), 200)
            self.assertEqual(self.post(message.id, 999, b"c", eof=True), 200)

        def check(evil):
            self.assertEqual((evil["headers"][":status"], evil["data"]), ("201", b"abc"))

        self.run_both(hostile, check)

    def test_messages_after_the_user_left(self):
        for protocol in ("http/1.1", "h2"):
            if protocol == "h2":
                leaver = self.h2_user()
                leaver.request("/client/evil/x")
            else:
                leaver = Bytes()
                self.connect(leaver)
                leaver.transport.write(b"GET /client/evil/x HTTP/1.1\r\nHost: relay\r\n\r\n")
            self.flush()
            message = self.poll("evil")
            self.assertEqual(self.post(message.id, 200, b"part", eof=False), 200)
            leaver.transport.loseConnection()
            self.flush()
            # A victim on another connection, in flight while evil keeps posting.
            victim_user = Bytes()
            self.connect(victim_user)
            victim_user.transport.write(b"GET /client/victim/y HTTP/1.1\r\nHost: relay\r\n\r\n")
            self.flush()
            for _ in range(3):
                self.assertEqual(self.post(message.id, None, b"more", eof=False), 400)
                self.assertEqual(self.post(message.id, 200, b"", eof=True), 400)
                self.assertEqual(self.call("POST", "/server/requeststream?id=" + message.id)[0], 410)
            self.victim_answers()
            ((status, headers, body, trailers),) = http11_responses(victim_user.data)
            self.assertEqual((status, body, trailers), (200, TRUE_ANSWER, [b"X-Done: 1"]))
        self.assert_clean()


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
