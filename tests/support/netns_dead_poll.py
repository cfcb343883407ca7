"""
Run inside a throwaway network namespace by tests/test_dead_peers_netns.py
(it needs nftables, and drops packets in the namespace it runs in): our
server on 127.0.0.1, a relay-client's polls as raw sockets, and nft rules
that make one poll connection go silent for good, as a NAT that forgot its
mapping does. Prints what happened as one JSON object.

  1. Poll A is cut off before a user's request arrives: its answer is
     written into the void, the kernel ends A with ETIMEDOUT after
     --dead_connection_timeout, and the request goes to poll B (a new
     connection) with its id; B answers it and the user gets the answer.
  2. Poll C reads its whole answer, then is cut off: when C dies nothing
     is unacknowledged, the request stays with the relay-client, and is
     neither handed out again nor failed.
"""

import json
import socket
import subprocess
import sys
import time

from twisted.internet import endpoints, reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.service import make_server_service

TABLE = "relaytest"
config = ServerConfig(port="0", tcp_keepalive_interval=1.0, dead_connection_timeout=2.0, header_timeout=None)
service = make_server_service(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), reactor, config)
broker = service.broker


def on_reactor(f):
    return blockingCallFromThread(reactor, f)


def until(condition, limit=15.0):
    deadline = time.monotonic() + limit
    while not on_reactor(condition):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def cut_off(port: int) -> None:
    """Every packet of the connection from local port C{port} dropped, both ways."""
    subprocess.check_call(["nft", "add", "rule", "inet", TABLE, "out", "tcp", "sport", str(port), "drop"])
    subprocess.check_call(["nft", "add", "rule", "inet", TABLE, "out", "tcp", "dport", str(port), "drop"])


def open_polls() -> int:
    b = broker.backends.get("robot")
    return len(b.polls) if b is not None else 0


def poll(port: int, waits: bool = True) -> socket.socket:
    before = on_reactor(open_polls)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
    if waits:
        until(lambda: open_polls() > before)
    return s


def read_answer(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body[:length]


def user(port: int, path: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /client/robot/%s HTTP/1.1\r\nHost: relay\r\n\r\n" % path.encode())
    return s


def scenario(port: int) -> dict:
    out = {}
    subprocess.check_call(["nft", "add", "table", "inet", TABLE])
    subprocess.check_call(["nft", "add chain inet %s out { type filter hook output priority 0; }" % TABLE])
    robot = lambda: broker.backends["robot"]  # noqa: E731

    # 1. The answer never arrives.
    a = poll(port)
    cut_off(a.getsockname()[1])
    u1 = user(port, "one")
    until(lambda: robot().requeued == 1)
    b = poll(port, waits=False)  # the requeued request is there already
    answer = read_answer(b)
    message = HttpRequest()
    message.ParseFromString(answer.partition(b"\r\n\r\n")[2])
    out["requeued_url"] = message.url
    reply = HttpResponse(
        id=message.id, status_code=200, body=b"answered after the requeue", eof=True
    ).SerializeToString()
    b.sendall(b"POST /server/response HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
    u1.settimeout(10)
    got = b""
    while b"answered after the requeue" not in got:
        chunk = u1.recv(65536)
        if not chunk:
            break
        got += chunk
    out["user_status"] = got.split(b"\r\n", 1)[0].decode()
    out["user_body_arrived"] = b"answered after the requeue" in got
    a.setblocking(False)
    try:
        out["cut_off_poll_received"] = len(a.recv(65536))
    except BlockingIOError:
        out["cut_off_poll_received"] = 0

    # 2. The answer arrives, then the connection goes silent.
    c = poll(port)
    u2 = user(port, "two")
    read_answer(c)
    until(lambda: len(broker.requests) == 1 and not any(p.carrier is None for p in broker.requests.values()))
    cut_off(c.getsockname()[1])
    until(lambda: robot().dead_connections == 2)
    out["second_still_pending"] = on_reactor(lambda: len(broker.requests))
    out["requeued"] = on_reactor(lambda: robot().requeued)
    out["lost"] = on_reactor(lambda: robot().lost)
    out["dead_connections"] = on_reactor(lambda: robot().dead_connections)
    out["metrics_timeouts"] = on_reactor(
        lambda: [
            line
            for line in broker.metrics.render().decode().splitlines()
            if line.startswith("relay_dead_connections_total")
        ]
    )
    for s in (a, b, c, u1, u2):
        s.close()
    return out


def main() -> None:
    service.startService()
    result = {}

    def run():
        port = on_reactor(lambda: service.listening_port.getHost().port)
        result.update(scenario(port))

    def done(outcome):
        if hasattr(outcome, "getTraceback"):
            result["error"] = outcome.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: deferToThread(run).addBoth(done))
    reactor.run()
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
