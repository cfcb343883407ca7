"""
Per-connection settings for Twisted's TCP transports, tuned for a relay
that moves megabytes.

Twisted sends at most 128 KiB per C{send()} call, which suits many small
connections; here every relayed megabyte crosses two or three sockets in
each process, and each extra pass through the reactor loop costs more than
the copy it saves, so the send limit is raised (docs/performance.md, "What
made the difference"). Reads stay at Twisted's 64 KiB: larger ones gained
little and let PyPy's peak memory grow while streaming. Set on the transport
instance, not the class, so nothing else in the process changes.

Nagle's algorithm is turned off too (TCP_NODELAY), as Go does for every TCP
connection: a relay's small writes (a poll's answer, a chunk's tail) must
not wait for the peer's delayed ACK.
"""

SEND_LIMIT = 512 * 1024


def tune(transport) -> None:
    """Apply the settings to C{transport}, or to the TCP transport under a TLS wrapper."""
    for _ in range(3):
        if transport is None:
            return
        if hasattr(transport, "SEND_LIMIT") and hasattr(transport, "doWrite"):
            transport.SEND_LIMIT = SEND_LIMIT
            set_no_delay = getattr(transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                try:
                    set_no_delay(True)
                except OSError:
                    pass  # not TCP after all (a UNIX socket): nothing to turn off
            return
        transport = getattr(transport, "transport", None)
