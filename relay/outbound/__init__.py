"""
Reaching an HTTP peer, as both sides do: the relay-client its backend, a
server replica the replica that owns a call.

  - L{relay.outbound.request}: the request, as bytes from end to end;
  - L{relay.outbound.address}: C{host:port} parsed, once for every flag and
    peer list;
  - L{relay.outbound.tls}: whose certificates are trusted;
  - L{relay.outbound.endpoints}: connecting as Go's dialer does;
  - L{relay.outbound.connect}: a connection of its own, and its failures
    worded as Go words them;
  - L{relay.outbound.h2}: an HTTP/2 client, with trailers and per-stream
    flow control.

Nothing here knows either side; what a backend request means to the Go
client (its headers, its token) stays in L{relay.client}.
"""

# Go's net/http defaults (DefaultTransport), which the connections made here
# keep: how long a connect may take, and how long an idle connection is
# kept for the next request.
CONNECT_TIMEOUT = 30.0
IDLE_CONNECTION_TIMEOUT = 90.0
