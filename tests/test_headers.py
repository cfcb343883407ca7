"""Header rules have one home, relay/headers.py, and both sides follow it."""

import pytest
from twisted.trial import unittest

from relay.client.backend import BackendRequest
from relay.client.h2backend import request_headers
from relay.headers import H2_BACKEND_DROPS, sanitize_value

pytestmark = pytest.mark.memory


class H2BackendHeaderTests(unittest.SynchronousTestCase):
    def request(self, headers):
        return BackendRequest(
            method="GET",
            url="http://backend/",
            scheme="http",
            address="backend:80",
            target="/",
            host="backend",
            headers=headers,
            body=b"",
        )

    def test_values_are_sanitized_as_on_http11(self):
        value = " a\r\nInjected: 1\0 \t"
        sent = dict(request_headers(self.request([("X-Value", value)])))
        self.assertEqual(sent[b"x-value"], sanitize_value(value))
        self.assertEqual(sent[b"x-value"], b"a  Injected: 1")

    def test_connection_specific_names_are_dropped(self):
        sent = dict(request_headers(self.request([(name.title(), "x") for name in H2_BACKEND_DROPS])))
        self.assertEqual([n for n in sent if not n.startswith(b":")], [])
