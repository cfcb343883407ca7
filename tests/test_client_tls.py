"""
Loading the TLS trust root the relay-client checks a backend against (its
errors use the Go wording). The end-to-end cases over TLS are
C{tests.test_client_e2e.TLSBackend}.
"""

import pytest
from twisted.trial import unittest

from relay.outbound.tls import load_trust_root
from tests.support import e2e
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.memory


class LoadTrustRoot(unittest.SynchronousTestCase):
    def test_errors_use_go_wording(self):
        with self.assertRaises(ValueError) as e:
            load_trust_root("/nonexistent/ca.pem")
        self.assertIn("Failed to read CA file /nonexistent/ca.pem", str(e.exception))
        path = e2e.temp_file(self, "not a certificate")
        with self.assertRaises(ValueError) as e:
            load_trust_root(path)
        self.assertEqual(str(e.exception), "No certs found in %s" % path)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
