"""Header rules have one home, relay/headers.py, and both sides follow it."""

import pytest
from twisted.trial import unittest

from relay.headers import H2_BACKEND_DROPS, sanitize_raw, sanitize_value
from relay.outbound.h2 import request_headers
from relay.outbound.request import OutboundRequest

pytestmark = pytest.mark.memory


class H2BackendHeaderTests(unittest.SynchronousTestCase):
    def request(self, headers):
        return OutboundRequest(
            method=b"GET",
            scheme="http",
            address="backend:80",
            target=b"/",
            host=b"backend",
            headers=headers,
            body=b"",
        )

    def test_values_are_sanitized_as_on_http11(self):
        value = " a\r\nInjected: 1\0 \t"
        sent = dict(request_headers(self.request([(b"X-Value", value.encode("ascii"))])))
        self.assertEqual(sent[b"x-value"], sanitize_value(value))
        self.assertEqual(sent[b"x-value"], b"a  Injected: 1")

    def test_values_that_are_not_utf8_go_as_they_came(self):
        value = b"caf\xe9 \xff\xfe"
        sent = dict(request_headers(self.request([(b"X-Value", value)])))
        self.assertEqual(sent[b"x-value"], value)
        self.assertEqual(sanitize_raw(b" \xe9\r\n\xff\t"), b"\xe9  \xff")

    def test_connection_specific_names_are_dropped(self):
        sent = dict(request_headers(self.request([(name.title().encode("ascii"), b"x") for name in H2_BACKEND_DROPS])))
        self.assertEqual([n for n in sent if not n.startswith(b":")], [])


class OriginFormTests(unittest.TestCase):
    """An absolute-form target's path and authority, as both HTTP/1.1 engines read it (RFC 9112 3.2.2)."""

    def test_targets(self):
        from relay.headers import origin_form

        cases = [
            (b"/a/b?c", (b"/a/b?c", b"")),
            (b"*", (b"*", b"")),
            (b"http://host:8080/a?b", (b"/a?b", b"host:8080")),
            (b"HTTPS://user:pw@host/x", (b"/x", b"host")),
            (b"http://host?q=1", (b"/?q=1", b"host")),
            (b"http://host", (b"/", b"host")),
            (b"ftp://host/x", (b"ftp://host/x", b"")),
        ]
        for target, expected in cases:
            self.assertEqual(origin_form(target), expected, target)
