"""
relay.wire must be indistinguishable from protobuf itself: the same bytes
out, the same message (or the same refusal) in, whatever the message holds.
The split is forced on small messages too (threshold 0), so that every
example takes the hand-written path.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relay import wire
from relay.proto.http_relay_pb2 import HttpHeader, HttpRequest, HttpResponse

pytestmark = pytest.mark.memory

EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
SETTINGS = settings(
    max_examples=3000 if EXPLORE else 300,
    derandomize=not EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

text = st.text(max_size=20)
headers = st.lists(st.builds(HttpHeader, name=text, value=text), max_size=4)
bodies = st.none() | st.binary(max_size=300)


@st.composite
def responses(draw):
    message = HttpResponse()
    if draw(st.booleans()):
        message.status_code = draw(st.integers(-(2**31), 2**31 - 1))
    message.header.extend(draw(headers))
    body = draw(bodies)
    if body is not None:
        message.body = body
    if draw(st.booleans()):
        message.id = draw(text)
    if draw(st.booleans()):
        message.eof = draw(st.booleans())
    message.trailer.extend(draw(headers))
    if draw(st.booleans()):
        message.backend_duration_ms = draw(st.integers(-(2**63), 2**63 - 1))
    return message


@st.composite
def requests(draw):
    message = HttpRequest()
    for field in ("id", "method", "url"):
        if draw(st.booleans()):
            setattr(message, field, draw(text))
    message.header.extend(draw(headers))
    body = draw(bodies)
    if body is not None:
        message.body = body
    if draw(st.booleans()):
        message.host = draw(text)
    return message


class SplitAlways(unittest.TestCase):
    def setUp(self):
        self.patch(wire, "SPLIT_THRESHOLD", 0)

    def check_round_trip(self, message):
        pieces = wire.serialize(message, "body")
        data = message.SerializeToString()
        self.assertEqual(b"".join(pieces), data)
        parsed = type(message)()
        wire.parse(parsed, data, "body")
        self.assertEqual(parsed, message)
        self.assertEqual(parsed.HasField("body"), message.HasField("body"))

    @SETTINGS
    @given(responses())
    def test_response_round_trip(self, message):
        self.check_round_trip(message)

    @SETTINGS
    @given(requests())
    def test_request_round_trip(self, message):
        self.check_round_trip(message)

    @SETTINGS
    @given(responses(), st.lists(st.binary(max_size=50), max_size=5))
    def test_body_given_as_pieces(self, message, body):
        """What the chunker posts: the message without body, and the pieces read from the backend."""
        message.ClearField("body")
        pieces = wire.serialize(message, "body", body)
        if b"".join(body):
            message.body = b"".join(body)
        self.assertEqual(b"".join(pieces), message.SerializeToString())

    def test_big_body_is_a_piece_of_its_own(self):
        """The point of it all: a body is passed on, not copied (by us; upb copies on access)."""
        self.patch(wire, "SPLIT_THRESHOLD", 16 * 1024)
        body = os.urandom(1 << 20)
        message = HttpResponse(status_code=200, body=body, id="robot:1", eof=True)
        message.header.add(name="Content-Length", value=str(len(body)))
        pieces = wire.serialize(message, "body")
        self.assertIn(body, pieces)
        self.assertEqual(b"".join(pieces), message.SerializeToString())

    @SETTINGS
    @given(responses(), st.binary(max_size=40), st.integers(0, 400))
    def test_garbage_is_judged_as_protobuf_judges_it(self, message, junk, cut):
        """Truncated, extended or mangled: parse accepts or refuses exactly what ParseFromString does."""
        data = message.SerializeToString()
        data = data[:cut] + junk + data[cut:]
        expected = HttpResponse()
        try:
            expected.ParseFromString(data)
        except Exception as e:  # pure-Python protobuf raises UnicodeDecodeError too
            expected = type(e)
        parsed = HttpResponse()
        if isinstance(expected, type):
            self.assertRaises(expected, wire.parse, parsed, data, "body")
        else:
            wire.parse(parsed, data, "body")
            self.assertEqual(parsed, expected)

    def test_last_body_wins(self):
        first = HttpResponse(body=b"first", id="a").SerializeToString()
        second = HttpResponse(body=b"second").SerializeToString()
        parsed = HttpResponse()
        wire.parse(parsed, first + second, "body")
        self.assertEqual((parsed.body, parsed.id), (b"second", "a"))

    def test_body_with_the_wrong_wire_type_is_left_to_protobuf(self):
        """Protobuf keeps it as an unknown field rather than refusing the message."""
        data = HttpResponse(id="a", body=b"x" * 100).SerializeToString() + bytes([3 << 3 | 0, 1])
        expected = HttpResponse()
        expected.ParseFromString(data)
        parsed = HttpResponse()
        wire.parse(parsed, data, "body")
        self.assertEqual(parsed.SerializeToString(), expected.SerializeToString())


class Pieces(unittest.TestCase):
    """parse_pieces: the same message as protobuf, with the body handed back in pieces."""

    def setUp(self):
        self.patch(wire, "SPLIT_THRESHOLD", 0)

    def check(self, message, data, cuts):
        cuts = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        pieces = [data[a:b] for a, b in zip(cuts, cuts[1:])] or [b""]
        expected = type(message)()
        try:
            expected.ParseFromString(data)
        except Exception as e:
            self.assertRaises(type(e), wire.parse_pieces, type(message)(), pieces, "body")
            return
        parsed = type(message)()
        body = wire.parse_pieces(parsed, pieces, "body")
        if body is not None:
            self.assertFalse(parsed.HasField("body"))
            parsed.body = b"".join(body)
        self.assertEqual(parsed, expected)

    @SETTINGS
    @given(responses(), st.lists(st.integers(0, 400), max_size=6))
    def test_responses(self, message, cuts):
        self.check(message, message.SerializeToString(), cuts)

    @SETTINGS
    @given(requests(), st.lists(st.integers(0, 400), max_size=6))
    def test_requests(self, message, cuts):
        self.check(message, message.SerializeToString(), cuts)

    @SETTINGS
    @given(responses(), st.binary(max_size=40), st.integers(0, 400), st.lists(st.integers(0, 400), max_size=6))
    def test_garbage(self, message, junk, cut, cuts):
        data = message.SerializeToString()
        self.check(message, data[:cut] + junk + data[cut:], cuts)

    def test_a_megabyte_in_64k_reads_comes_back_in_the_same_pieces(self):
        self.patch(wire, "SPLIT_THRESHOLD", 16 * 1024)
        body = os.urandom(1 << 20)
        message = HttpResponse(status_code=200, body=body, id="robot:7", eof=True)
        data = message.SerializeToString()
        reads = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        parsed = HttpResponse()
        pieces = wire.parse_pieces(parsed, reads, "body")
        self.assertEqual(b"".join(pieces), body)
        self.assertEqual((parsed.status_code, parsed.id, parsed.eof), (200, "robot:7", True))
        self.assertTrue(all(piece is read for piece, read in zip(pieces[1:-1], reads[1:-1])))
