"""
A backend over TLS: verified against C{--root_ca_file}, refused (with a
500 saying why) when its certificate is not trusted, and upgraded (101)
connections over TLS too.
"""

import base64
import datetime
import hashlib
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from relay.client.backend import load_trust_root
from tests import test_client_e2e as e2e
from tests.test_client_e2e import NAME, WS_GUID, Backend, RawUser, Relay, make_frame, parse_frame
from tests.support import on_each_engine


def make_ca_and_server_cert():
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


class TLSBackend(e2e.EndToEnd):
    """Every end-to-end test again, with the backend behind TLS."""

    backend_scheme = "https"

    def setUp(self):
        ca_pem, cert_pem, key_pem = make_ca_and_server_cert()
        self.ca_file = e2e.temp_file(self, ca_pem.decode())
        tls = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self.backend = Backend(tls=tls, host="localhost")
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        from twisted.web.client import HTTPConnectionPool

        self.users = HTTPConnectionPool(reactor, persistent=False)
        self.trust_root = load_trust_root(self.ca_file)
        self.client = self.start_client()
        return self.relay.polling(NAME)

    @defer.inlineCallbacks
    def test_verified_with_root_ca_file(self):
        got = yield self.echo("POST", "/echo/tls?q=1", data=b"secret")
        self.assertEqual((got["uri"], got["body"]), ("/echo/tls?q=1", "secret"))

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_500(self):
        yield self.client.stopService()
        self.start_client(trust_root=None)  # the system's CAs only
        yield self.relay.polling(NAME)
        response = yield self.request("GET", "/echo")
        body = yield response.content()
        self.assertEqual(response.code, 500)
        self.assertIn(b"Backend request failed with error", body)
        self.assertIn(b"https://" + self.backend.address.encode(), body)
        self.assertIn(b"tls: certificate verify failed", body)

    @defer.inlineCallbacks
    def test_websocket_over_tls(self):
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        key = base64.b64encode(os.urandom(16))
        user.transport.write(
            b"GET /client/" + NAME.encode() + b"/ws HTTP/1.1\r\nHost: robot\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        yield user.read_until(lambda d: b"\r\n\r\n" in d)
        head, _, user.data = user.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(base64.b64encode(hashlib.sha1(key + WS_GUID).digest()), head)
        user.transport.write(make_frame(1, b"over tls", mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        self.assertEqual(parse_frame(user.data)[:2], (1, b"over tls"))
        user.transport.abortConnection()


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
