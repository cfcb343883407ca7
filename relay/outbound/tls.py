"""
Whose certificates an outbound TLS connection trusts: the system's CAs, or
the ones a PEM file names (the relay-client's C{--root_ca_file}).
"""

from twisted.internet import ssl
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


def load_trust_root(path: str):
    """
    The CA certificates in a PEM file, to verify the backend with.

    @raise ValueError: with the Go client's wording, for a start-up error.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError("Failed to read CA file %s: %s" % (path, e)) from e
    marker = b"-----END CERTIFICATE-----"
    certs = []
    for block in pem.split(marker)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        try:
            certs.append(ssl.Certificate.loadPEM(block[start:] + marker + b"\n"))
        except Exception:
            continue
    if not certs:
        raise ValueError("No certs found in %s" % (path,))
    return ssl.trustRootFromCertificates(certs)


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """Verify the backend's certificate against C{trust_root} (None: the system's)."""

    def __init__(self, trust_root=None):
        self.trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int):
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        return self.tls_options(host)

    def tls_options(self, host: str, acceptable_protocols=None):
        """Client TLS options for C{host}, offering C{acceptable_protocols} by ALPN."""
        kwargs = {}
        if self.trust_root is not None:
            kwargs["trustRoot"] = self.trust_root
        if acceptable_protocols:
            kwargs["acceptableProtocols"] = list(acceptable_protocols)
        return ssl.optionsForClientTLS(host, **kwargs)
