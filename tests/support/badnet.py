"""
A robot on a bad network, for tests/test_bad_network.py and
C{bench/bad_network.py}.  The robot is a network namespace of its own, joined
to the host's namespace by a veth pair with addresses from 198.18.0.0/15 (RFC
2544's benchmarking range, so they can never be anyone's real addresses), one
/30 per robot, picked from the harness's pid so that parallel runs do not
clash. The relay-client and its backend run inside it (C{ip netns exec}); the
relay server runs in the host's namespace, on the veth's host-side address,
and users (the harness) reach it there, over the host's loopback path. The
network goes bad by nftables rules inside the robot's namespace, on the veth
only, so that the robot's own loopback (relay-client to backend) and the
host's are never touched:    - a partition: every packet on the veth dropped,
both ways;   - a NAT rebinding: connections opened before it are dropped for
good,     new ones work. Every new connection is stamped with a conntrack mark
of     the current generation from the moment the namespace exists, so a
rebinding is a new generation and a rule dropping every other one; on a
kernel without conntrack, the 4-tuples that C{ss} lists go into a set
instead;   - random loss of X% of the packets, both ways (C{numgen random});
- a flapping link: partitions on a timer;   - a slow uplink (C{tc} tbf on the
robot's side), so that a download     lasts long enough to meet the flaps.  In
every scenario the robot's outgoing packets are lost after its TCP has sent
them, as on a real link, not refused as it sends them (see
L{RobotNetwork.lose_out}).  Everything the harness makes goes away on every
exit path: L{Pair.stop} in a C{finally}, an C{atexit} hook for networks still
up, and, at the next start, namespaces left by a harness process that no
longer exists.  The scenarios (L{SCENARIOS}) start a pair, drive the network,
and return a L{Result} of what the users saw; the tests assert the issue's
goals on it, the benchmark prints it side by side.
"""

import atexit
import dataclasses
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import unittest
from typing import Callable, Dict, Generator, List, Optional

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from tests.support.go import GO_CLIENT
from tests.support.process import ROOT, ChildProcess, TwistdProcess

GO_DIR = os.path.dirname(GO_CLIENT)
BACKEND_SCRIPT = os.path.join(ROOT, "bench", "backend.py")
NAME = "robot"
BACKEND_PORT = 8080  # inside the robot's namespace, which has its own ports
SMALL = 10
SMALL_PATH = "/bytes/%d" % SMALL
BIG = 20 * 1024 * 1024
# What a user does: ask every 0.25 s, give up after 4 s.
PROBE_INTERVAL = 0.25
USER_LIMIT = 4.0
# The server checks --inactive_request_timeout on this period (its flag's help).
HOUSEKEEPING = 10.0
INACTIVE_REQUEST_TIMEOUT = 20.0
# When requests with a long limit go out, in seconds after an outage begins:
# the first meets the poll that was waiting when the network went (its
# answer is written to a connection that is about to die), the others wait
# for a poll.
PATIENT_OFFSETS = (0.0, 2.5, 4.5)

NETWORK = ipaddress.ip_network("198.18.0.0/15")
PREFIX = "relaybad"
# The mark, set in the robot's output hook, of the packets its egress hook loses (L{RobotNetwork.lose_out}).
LOST_MARK = 0xBAD
_STALE = re.compile(r"^%s-(\d+)-(\d+)$" % PREFIX)
_numbers = itertools.count()
_live = set()


class Unavailable(unittest.SkipTest):
    """The harness cannot run here; the message says why (a test skips with it)."""


def _run(argv, stdin: bytes = b"") -> str:
    done = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    if done.returncode:
        raise RuntimeError("%s: %s" % (" ".join(argv), done.stderr.decode(errors="replace").strip()))
    return done.stdout.decode(errors="replace")


def _quiet(argv) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(name: str) -> None:
    """Processes still in a namespace the harness made (its own children) keep it, and its veth, alive."""
    listed = subprocess.run(["ip", "netns", "pids", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for pid in listed.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def sweep_stale() -> None:
    """Remove what a harness process that died without cleaning up (SIGKILL) left."""
    listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in listed.stdout.decode().splitlines():
        match = _STALE.match(line.split(" ")[0])
        if match and not _alive(int(match.group(1))):
            name = match.group(0)
            _kill_inside(name)
            _quiet(["ip", "netns", "del", name])
            _quiet(["ip", "link", "del", "rbh%s_%s" % match.groups()])


def tied(argv: List[str]) -> List[str]:
    """
    C{argv} killed when the harness dies, even by SIGKILL (C{setpriv
    --pdeathsig}, kept across exec), so that no relay outlives its test.
    """
    setpriv = shutil.which("setpriv")
    return ([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []) + list(argv)


def _addresses_in_use() -> str:
    return subprocess.run(["ip", "-o", "-4", "addr"], stdout=subprocess.PIPE).stdout.decode()


class RobotNetwork:
    """
    One robot's namespace, its veth pair and its nftables table. Not
    thread-safe and not reentrant: one harness process drives it.
    """

    def __init__(self):
        pid = os.getpid()
        in_use = _addresses_in_use()
        for _ in range(256):
            number = next(_numbers)
            # /30 blocks, spread so that neighbouring pids get distant blocks.
            index = (pid * 2654435761 + number * 40503) % (NETWORK.num_addresses // 4)
            base = NETWORK.network_address + 4 * index
            host, robot = base + 1, base + 2
            if (" %s/" % host) not in in_use and (" %s/" % robot) not in in_use:
                break
        else:
            raise RuntimeError("no free /30 in %s" % (NETWORK,))
        self.name = "%s-%d-%d" % (PREFIX, pid, number)
        self.host_if = "rbh%d_%d" % (pid, number)
        self.robot_if = "rbr%d_%d" % (pid, number)
        # Where the robot's lost packets go (L{lose_out}): a veth whose peer
        # is down, inside the robot's namespace, so it drops what it is given.
        self.void_if = "rbv%d_%d" % (pid, number)
        self.void_peer = "rbw%d_%d" % (pid, number)
        self.egress = True
        self.host_address = str(host)
        self.robot_address = str(robot)
        self.conntrack = True
        self.generation = 1
        self.created = False

    def argv(self, argv: List[str]) -> List[str]:
        """C{argv} run inside the robot's namespace (C{ip} execs it: same pid, same signals)."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.name] + list(argv)

    def create(self) -> None:
        sweep_stale()
        _live.add(self)
        self.created = True
        ip, ns = "ip", ["ip", "-n", self.name]
        _run([ip, "netns", "add", self.name])
        _run([ip, "link", "add", self.host_if, "type", "veth", "peer", "name", self.robot_if, "netns", self.name])
        _run([ip, "addr", "add", self.host_address + "/30", "dev", self.host_if])
        _run([ip, "link", "set", self.host_if, "up"])
        _run(ns + ["addr", "add", self.robot_address + "/30", "dev", self.robot_if])
        _run(ns + ["link", "set", self.robot_if, "up"])
        _run(ns + ["link", "set", "lo", "up"])
        # One TCP segment per packet, as on a real link: with segmentation
        # offload, the hooks would see (and drop) 64 KiB at a time.
        _run([ip, "link", "set", self.host_if, "gso_max_segs", "1"])
        _run(ns + ["link", "set", self.robot_if, "gso_max_segs", "1"])
        try:
            self.nft(self._table(conntrack=True))
        except RuntimeError:
            self.conntrack = False
            self.nft(self._table(conntrack=False))
        try:
            _run(ns + ["link", "add", "name", self.void_if, "type", "veth", "peer", "name", self.void_peer])
            _run(ns + ["link", "set", self.void_if, "up"])
            self.nft(
                "table netdev badnet_out {\n"
                "  chain egress {\n"
                '    type filter hook egress device "%s" priority 0; policy accept;\n'
                '    meta mark 0x%x fwd to "%s"\n'
                "  }\n"
                "}\n" % (self.robot_if, LOST_MARK, self.void_if)
            )
        except RuntimeError:
            # No netdev egress hook (Linux before 5.16) or no fwd: the
            # robot's lost packets are dropped in its output hook instead,
            # as local send errors (see lose_out), and the results say so.
            self.egress = False

    @property
    def lose_out(self) -> str:
        """
        The verdict for an outgoing packet that the network loses.

        Incoming packets are dropped in the input hook: the server's TCP
        sent them and waits for their acknowledgement, as on a real link.
        Outgoing ones must not be dropped in the output hook: there a drop
        is a local send error (the kernel counts a TCPRetransFail), the
        segment never counts as sent or in flight, and new data waits in
        the socket, tried again at the next write or on the probe timer (at
        least 200 ms when nothing else is in flight) rather than sent and
        retransmitted as the RTO backs off, however dead or fast the link.
        No network loses packets like that. So the
        rules in the output hook, which see conntrack marks and sets, only
        mark the unlucky packets, and the veth's egress hook forwards what
        is marked to a veth whose peer is down: TCP has sent them, and they
        vanish, as on a wire. ARP is never touched, either way.
        """
        return "meta mark set 0x%x" % LOST_MARK if self.egress else "drop"

    def caveat(self) -> Optional[str]:
        """What a result must say when the robot's lost packets could not be lost faithfully."""
        if self.egress:
            return None
        return "no netdev egress hook: the robot's lost packets were local send errors"

    def _table(self, conntrack: bool) -> str:
        """
        The robot's table: packets on the veth go through C{stamp} (the
        conntrack generation of new connections), C{forgotten} (what a
        rebinding dropped for good) and C{condition} (the network's state),
        the C{_in} chains for what comes in, the C{_out} ones for what goes
        out (whose verdict is L{lose_out}).
        """
        veth = '"%s"' % self.robot_if
        stamp = "ct state new ct mark set %d" % self.generation if conntrack else ""
        return "\n".join(
            [
                "table inet badnet {",
                "  set forgotten4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }",
                "  chain stamp {",
                "    " + stamp,
                "  }",
                "  chain forgotten_in {",
                "  }",
                "  chain forgotten_out {",
                "  }",
                "  chain condition_in {",
                "  }",
                "  chain condition_out {",
                "  }",
                "  chain input {",
                "    type filter hook input priority 0; policy accept;",
                "    iifname %s jump stamp" % veth,
                "    iifname %s jump forgotten_in" % veth,
                "    iifname %s jump condition_in" % veth,
                "  }",
                "  chain output {",
                "    type filter hook output priority 0; policy accept;",
                "    oifname %s jump stamp" % veth,
                "    oifname %s jump forgotten_out" % veth,
                "    oifname %s jump condition_out" % veth,
                "  }",
                "}",
                "",
            ]
        )

    def nft(self, script: str) -> None:
        """One nftables transaction inside the robot's namespace."""
        _run(self.argv(["nft", "-f", "-"]), stdin=script.encode())

    def destroy(self) -> None:
        if not self.created:
            return
        self.created = False
        _live.discard(self)
        _kill_inside(self.name)
        _quiet(["ip", "netns", "del", self.name])
        # The pair goes with the namespace, unless a process still holds it.
        _quiet(["ip", "link", "del", self.host_if])

    # --- The network's state ---

    def _condition(self, match: Optional[str]) -> None:
        """The packets C{match} picks (C{None}: none) lost, both ways; C{match} ends with a counter."""
        script = "flush chain inet badnet condition_in\nflush chain inet badnet condition_out\n"
        if match:
            script += "add rule inet badnet condition_in %s drop\n" % match
            script += "add rule inet badnet condition_out %s %s\n" % (match, self.lose_out)
        self.nft(script)

    def partition(self) -> None:
        """Nothing passes the veth, either way; packets vanish, as in a dead zone."""
        self._condition("counter")

    def heal(self) -> None:
        """The network returns (connections a rebinding forgot stay forgotten)."""
        self._condition(None)

    def loss(self, percent: int) -> None:
        """
        Each packet on the veth, either way, is lost with probability
        C{percent}%. A drop in the output hook would punish how a sender
        fills its socket rather than how it copes with loss (L{lose_out}).
        """
        self._condition("numgen random mod 100 < %d counter" % percent)

    def dropped(self) -> int:
        """Packets the current condition has lost, both ways (0 without one)."""
        listing = "".join(
            _run(self.argv(["nft", "list", "chain", "inet", "badnet", chain]))
            for chain in ("condition_in", "condition_out")
        )
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))

    def rebind(self) -> None:
        """Every packet of a connection opened before now is dropped, for good; new ones pass."""
        if self.conntrack:
            self.generation += 1
            self.nft(
                "flush chain inet badnet stamp\n"
                "add rule inet badnet stamp ct state new ct mark set %d\n"
                "flush chain inet badnet forgotten_in\n"
                "flush chain inet badnet forgotten_out\n"
                "add rule inet badnet forgotten_in ct mark != %d drop\n"
                "add rule inet badnet forgotten_out ct mark != %d %s\n"
                % (self.generation, self.generation, self.generation, self.lose_out)
            )
            return
        tuples = []
        for line in _run(self.argv(["ss", "-H", "-t", "-n", "-a"])).splitlines():
            fields = line.split()
            if len(fields) < 5 or fields[0] == "LISTEN":
                continue
            local, peer = fields[3].rsplit(":", 1), fields[4].rsplit(":", 1)
            if local[0] == self.robot_address:
                tuples.append("%s . %s . %s . %s" % (local[0], local[1], peer[0], peer[1]))
        script = (
            "flush chain inet badnet forgotten_in\n"
            "flush chain inet badnet forgotten_out\n"
            "add rule inet badnet forgotten_out ip saddr . tcp sport . ip daddr . tcp dport @forgotten4 %s\n"
            "add rule inet badnet forgotten_in ip daddr . tcp dport . ip saddr . tcp sport @forgotten4 drop\n"
            % (self.lose_out,)
        )
        if tuples:
            script += "add element inet badnet forgotten4 { %s }\n" % ", ".join(tuples)
        self.nft(script)

    def limit_upload(self, rate: str) -> None:
        """The robot's uplink at C{rate} (C{tc} syntax: C{8mbit}), as on LTE."""
        _run(["tc", "-n", self.name, "qdisc", "replace", "dev", self.robot_if, "root", "tbf",
              "rate", rate, "burst", "64kb", "latency", "400ms"])


@atexit.register


def _destroy_live() -> None:
    for network in list(_live):
        network.destroy()


_reason: List[Optional[str]] = []


def unavailable() -> Optional[str]:
    """Why the harness cannot run here, or None; a real namespace is made and removed to find out."""
    if not _reason:
        _reason.append(_probe())
    return _reason[0]


def _probe() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "network namespaces and nftables need root (running as uid %d)" % os.geteuid()
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("ss", "iproute2"), ("nft", "nftables")):
        if not shutil.which(tool):
            return "no `%s` on PATH (apt-get install %s)" % (tool, package)
    network = RobotNetwork()
    try:
        network.create()
        network.loss(5)
        network.rebind()
        network.partition()
        network.heal()
        network.limit_upload("8mbit")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return "cannot make a robot network namespace here (kernel or tools): %s" % (e,)
    finally:
        network.destroy()
    return None


def sleep(seconds: float) -> defer.Deferred:
    """The scenario's schedule: here time itself is the point, not a stand-in for an event."""
    return deferLater(reactor, max(0.0, seconds), lambda: None)


# --- What the users see ---


@dataclasses.dataclass


class Outcome:
    """One user request: when it went, when its answer (or the user's giving up) came, and what it was."""

    sent: float
    finished: float
    status: Optional[int] = None
    error: Optional[str] = None
    expected_body: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.expected_body

    @property
    def answered(self) -> bool:
        return self.status is not None

    def describe(self) -> str:
        what = "%d" % self.status if self.status is not None else self.error
        return "%s after %.1f s" % (what, self.finished - self.sent)


def _describe_failure(failure) -> str:
    if failure.check(defer.CancelledError, defer.TimeoutError):
        return "no answer (the user gave up)"
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "%s: %s" % (type(value).__name__, "; ".join(_describe_failure(r) for r in reasons))
    return "%s: %s" % (type(value).__name__, value)


class _Body(protocol.Protocol):
    """A body read to its end, checked against bench/backend.py's pattern (byte k is k % 256) as it comes."""

    PATTERN = bytes(range(256)) * 4096

    def __init__(self):
        self.received = 0
        self.matches = True
        self.done = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        view, at = memoryview(data), 0
        while at < len(view) and self.matches:
            start = (self.received + at) % 256
            piece = min(len(view) - at, len(self.PATTERN) - start)
            self.matches = view[at:at + piece] == self.PATTERN[start:start + piece]
            at += piece
        self.received += len(data)

    def connectionLost(self, reason) -> None:
        self.done.callback([reason])  # a Failure passed to callback() would go down the errback chain

    def abort(self) -> None:
        if not self.done.called:
            self.transport.stopProducing()


class Users:
    """Users of one robot: requests to the relay server as a browser or a script makes them."""

    def __init__(self, base: str):
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=USER_LIMIT)
        self.outstanding = set()

    def get(self, path: str, size: int, limit: float) -> defer.Deferred:
        """Fires with an L{Outcome}, never fails; the user gives up after C{limit} seconds."""
        sent = reactor.seconds()
        outcome = Outcome(sent, sent)
        body = _Body()
        gave_up = []

        def give_up():
            gave_up.append(reactor.seconds())
            if outcome.status is None:
                request.cancel()
            else:
                body.abort()  # its connectionLost ends the chain

        def answered(response):
            outcome.status = response.code
            response.deliverBody(body)
            return body.done

        def ended(lost):
            (reason,) = lost
            outcome.finished = reactor.seconds()
            if gave_up:
                outcome.error = "no answer: the user gave up (%d bytes of the body in)" % (body.received,)
                outcome.status = None
            elif not reason.check(ResponseDone, PotentialDataLoss):
                # The body broke off: an error, as the user's client reports it.
                outcome.error = _describe_failure(reason)
                outcome.status = None
            outcome.expected_body = outcome.status == 200 and body.received == size and body.matches

        def failed(failure):
            outcome.finished = reactor.seconds()
            outcome.error = _describe_failure(failure)

        def done(_):
            if timer.active():
                timer.cancel()
            self.outstanding.discard(request)
            return outcome

        timer = reactor.callLater(limit, give_up)
        request = self.agent.request(b"GET", (self.base + path).encode())
        request.addCallback(answered)
        request.addCallbacks(ended, failed)
        request.addBoth(done)
        if not request.called:
            self.outstanding.add(request)
        return request

    def download(self, size: int, limit: float) -> defer.Deferred:
        """The L{Outcome} of a download of C{size} bytes (L{download_verdict} judges it)."""
        return self.get("/bytes/%d" % size, size, limit)

    def settled(self) -> defer.Deferred:
        """Fires once every request has its outcome (each is bounded by its limit)."""
        return defer.DeferredList(list(self.outstanding))


def download_verdict(outcome: Outcome, size: int = BIG) -> str:
    """
    C{intact}, C{error} (the user's client saw it fail, or an error
    status), C{stalled} (neither complete nor failed when the user gave
    up) or C{short} (a body that ended cleanly, wrong: the one outcome that
    must never happen).
    """
    if outcome.ok:
        return "intact"
    if outcome.status is not None and outcome.status != 200:
        return "error"
    if outcome.status == 200:
        return "short"
    if outcome.error and outcome.error.startswith("no answer"):
        return "stalled"
    return "error"


class Prober:
    """A user asking for a small answer every 0.25 s, each with a 4 s limit."""

    def __init__(self, users: Users, interval: float = PROBE_INTERVAL, limit: float = USER_LIMIT):
        self.users = users
        self.interval = interval
        self.limit = limit
        self.outcomes: List[Outcome] = []
        self._watchers = []
        self._next = None

    def start(self) -> None:
        self._next = reactor.callLater(0, self._ask)

    def _ask(self) -> None:
        self._next = reactor.callLater(self.interval, self._ask)
        self.users.get(SMALL_PATH, SMALL, self.limit).addCallback(self._record)

    def _record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.ok:
            for entry in list(self._watchers):
                since, d = entry
                if outcome.finished >= since:
                    self._watchers.remove(entry)
                    d.callback(outcome.finished)

    def success_after(self, since: float, wait: float) -> defer.Deferred:
        """Fires with the time of the first good answer at or after C{since}, or None after C{wait} seconds."""
        for outcome in self.outcomes:
            if outcome.ok and outcome.finished >= since:
                return defer.succeed(outcome.finished)
        d = defer.Deferred()
        entry = (since, d)
        self._watchers.append(entry)

        def expire():
            if entry in self._watchers:
                self._watchers.remove(entry)
                d.callback(None)

        timer = reactor.callLater(max(0.0, since + wait - reactor.seconds()), expire)
        d.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return d

    def stop(self) -> defer.Deferred:
        if self._next is not None and self._next.active():
            self._next.cancel()
        return self.users.settled()


# --- The pairs ---

OURS, GO = "ours", "go"


def _port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@defer.inlineCallbacks


def _listening(process, address: str, port: int, wait: float):
    """
    Fires with the time C{process} accepts on C{address:port} (polled: the
    Go server's log is no event to wait on, and both servers are treated
    alike).
    """
    deadline = reactor.seconds() + wait
    endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=1)
    while True:
        try:
            connected = yield endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        except (error.ConnectError, error.TimeoutError):
            if reactor.seconds() > deadline or _exited(process):
                raise RuntimeError(
                    "the server does not listen on %s:%d (%.0f s); its log:\n%s"
                    % (address, port, wait, "\n".join(_lines(process)[-20:]))
                ) from None
            yield sleep(0.05)
        else:
            connected.transport.abortConnection()
            return reactor.seconds()


def _lines(process) -> List[str]:
    if isinstance(process, TwistdProcess):
        return list(process.lines)
    return process.output.decode("utf-8", "replace").splitlines()


def _exited(process) -> bool:
    return process.exited.called


@defer.inlineCallbacks


def _stop(process, grace: float = 2.0):
    """SIGTERM, then SIGKILL after C{grace} seconds: teardown is bounded."""
    if process is None or _exited(process):
        return
    process.transport.signalProcess("TERM")
    timer = reactor.callLater(grace, lambda: _exited(process) or process.transport.signalProcess("KILL"))
    yield process.exited
    if timer.active():
        timer.cancel()


class Pair:
    """
    A relay server (C{ours} or C{go}) in the host's namespace and a
    relay-client (C{ours} or C{go}) with its backend in a robot's.
    """

    def __init__(self, server: str, client: str, go_dir: str = GO_DIR,
                 inactive_request_timeout: float = INACTIVE_REQUEST_TIMEOUT):
        self.server_kind = server
        self.client_kind = client
        self.go_dir = go_dir
        self.inactive_request_timeout = inactive_request_timeout
        self.net = None
        self.backend = self.server = self.client = None
        for kind, binary in ((server, "http-relay-server"), (client, "http-relay-client")):
            if kind == GO and not os.access(os.path.join(go_dir, binary), os.X_OK):
                raise Unavailable("no Go %s at %s" % (binary, os.path.join(go_dir, binary)))

    @property
    def label(self) -> str:
        names = {OURS: "our", GO: "Go"}
        return "%s server + %s relay-client" % (names[self.server_kind], names[self.client_kind])

    @defer.inlineCallbacks
    def start(self, ready_within: float = 30.0):
        self.net = RobotNetwork()
        self.net.create()
        self.port = _port_on(self.net.host_address)
        self.backend = ChildProcess.spawn(
            self.net.argv(tied([sys.executable, BACKEND_SCRIPT, "--host", "127.0.0.1", "--port", str(BACKEND_PORT)]))
        )
        yield self.start_server()
        common = [
            "--backend_scheme=http",
            "--relay_scheme=http",
            "--disable_auth_for_remote",
            "--server_name=" + NAME,
            "--backend_address=127.0.0.1:%d" % BACKEND_PORT,
            "--relay_address=%s:%d" % (self.net.host_address, self.port),
        ]
        if self.client_kind == OURS:
            self.client = TwistdProcess.spawn(["relay-client"] + common, prefix=self.net.argv(tied([])))
        else:
            self.client = ChildProcess.spawn(
                self.net.argv(tied([os.path.join(self.go_dir, "http-relay-client")] + common))
            )
        self.users = Users("http://%s:%d/client/%s" % (self.net.host_address, self.port, NAME))
        deadline = reactor.seconds() + ready_within
        while True:
            outcome = yield self.users.get(SMALL_PATH, SMALL, USER_LIMIT)
            if outcome.ok:
                break
            if reactor.seconds() > deadline or _exited(self.client):
                raise RuntimeError(
                    "%s: the robot does not answer %.0f s after start (%s); relay-client's log:\n%s"
                    % (self.label, ready_within, outcome.describe(), "\n".join(_lines(self.client)[-20:]))
                )
            yield sleep(0.2)

    @defer.inlineCallbacks
    def start_server(self):
        """Fires with the time the (new) server accepts connections."""
        timeout = "--inactive_request_timeout=%gs" % self.inactive_request_timeout
        if self.server_kind == OURS:
            self.server = TwistdProcess.spawn(
                ["relay", "--port=tcp:%d:interface=%s" % (self.port, self.net.host_address), timeout], prefix=tied([])
            )
        else:
            # The Go server listens on every address; the port is one the host-side address had free.
            self.server = ChildProcess.spawn(
                tied([os.path.join(self.go_dir, "http-relay-server"), "--port=%d" % self.port, timeout])
            )
        listening = yield _listening(self.server, self.net.host_address, self.port, 30.0)
        return listening

    def client_lines(self) -> List[str]:
        return _lines(self.client) if self.client is not None else []

    @defer.inlineCallbacks
    def stop(self):
        try:
            yield defer.DeferredList([_stop(p) for p in (self.client, self.backend, self.server)])
        finally:
            if self.net is not None:
                self.net.destroy()


# --- The scenarios ---


@dataclasses.dataclass


class Result:
    """What the users of one pair saw in one scenario."""

    scenario: str
    pair: str
    # Seconds from the network's return (or the new server's listening) to
    # the first good answer; None: none within `waited`.
    back: Optional[float] = None
    waited: float = 0.0
    returned: Optional[float] = None  # the reactor's time of that return
    # Requests with a long limit sent as the outage began, and their fate.
    patient: List[Outcome] = dataclasses.field(default_factory=list)
    # The user asking every 0.25 s (4 s limit), from before the outage to the end.
    probes: List[Outcome] = dataclasses.field(default_factory=list)
    # The loss scenario's sequential small requests.
    sequential: List[Outcome] = dataclasses.field(default_factory=list)
    download: Optional[Outcome] = None
    download_verdict: Optional[str] = None
    # The relay-client's log lines during the episode (the server restart).
    client_lines: Optional[List[str]] = None
    notes: List[str] = dataclasses.field(default_factory=list)

    def back_text(self) -> str:
        if self.back is None:
            return "not back after %.0f s" % self.waited
        return "back after %.1f s" % self.back


def patient_limit(pair: Pair) -> float:
    """A user who waits for the server's own verdict: its inactivity timeout, checked every 10 s, and a margin."""
    return pair.inactive_request_timeout + HOUSEKEEPING + 2.0


class _Patient:
    """Requests with a long limit, sent at C{offsets} seconds from now."""

    def __init__(self, pair: Pair, offsets):
        limit = patient_limit(pair)
        self.sent = [
            sleep(offset).addCallback(lambda _: pair.users.get(SMALL_PATH, SMALL, limit)) for offset in offsets
        ]

    def outcomes(self) -> defer.Deferred:
        return defer.gatherResults(self.sent).addCallback(list)

    def cancel(self) -> None:
        """On the way out after an error: the ones still to be sent are not."""
        for d in self.sent:
            if not d.called:
                d.cancel()


def _caveat(pair: Pair, result: Result) -> None:
    caveat = pair.net.caveat()
    if caveat:
        result.notes.append(caveat)


@defer.inlineCallbacks


def _outage(pair: Pair, scenario: str, silence: float, wait: float, rebind: bool):
    result = Result(scenario, pair.label, waited=wait)
    _caveat(pair, result)
    prober = Prober(pair.users)
    prober.start()
    patient = None
    try:
        # Just after an answer, so that the relay-client's next poll is
        # waiting and the user's next request is the first patient one.
        yield prober.success_after(reactor.seconds(), USER_LIMIT)
        yield sleep(0.1)
        pair.net.partition()
        if rebind:
            pair.net.rebind()
        patient = _Patient(pair, [o for o in PATIENT_OFFSETS if o < silence])
        yield sleep(silence)
        pair.net.heal()
        result.returned = returned = reactor.seconds()
        back = yield prober.success_after(returned, wait)
        result.back = None if back is None else back - returned
        result.patient = yield patient.outcomes()
    finally:
        yield _wind_up(result, prober, patient)
    return result


@defer.inlineCallbacks


def _wind_up(result: "Result", prober: "Prober", patient) -> Generator:
    """A scenario's end, whatever happened: the users stop, and what they saw is kept."""
    if patient is not None:
        patient.cancel()
    yield prober.stop()
    result.probes = list(prober.outcomes)


def nat_rebinding(pair: Pair, silence: float = 5.0, wait: float = 12.0) -> defer.Deferred:
    """A short silence, then new connections work and every old one is dead for good."""
    return _outage(pair, "nat_rebinding", silence, wait, rebind=True)


def partition(pair: Pair, silence: float = 60.0, wait: float = 12.0) -> defer.Deferred:
    """Nothing passes for C{silence} seconds (a dead zone), then everything does again."""
    return _outage(pair, "partition", silence, wait, rebind=False)


@defer.inlineCallbacks


def loss(pair: Pair, percent: int = 5, count: int = 100, size: int = BIG, download_limit: float = 120.0):
    """C{percent}% of packets lost both ways: C{count} small requests one after another, then a download."""
    result = Result("loss", pair.label)
    _caveat(pair, result)
    pair.net.loss(percent)
    try:
        for _ in range(count):
            result.sequential.append((yield pair.users.get(SMALL_PATH, SMALL, USER_LIMIT)))
        result.download = yield pair.users.download(size, download_limit)
        result.download_verdict = download_verdict(result.download, size)
        result.notes.append("%d packets dropped" % pair.net.dropped())
    finally:
        pair.net.heal()
    return result


@defer.inlineCallbacks


def flapping(pair: Pair, down: float = 3.0, up: float = 3.0, times: int = 10, size: int = BIG,
             uplink: str = "8mbit", wait: float = 12.0, settle: float = 30.0):
    """
    The link goes down for C{down} seconds and up for C{up}, C{times}
    times, during a download over a slow uplink (so that it meets the
    flaps). The network has returned when the last down ends.
    """
    result = Result("flapping", pair.label, waited=wait)
    _caveat(pair, result)
    pair.net.limit_upload(uplink)
    prober = Prober(pair.users)
    try:
        started = reactor.seconds()
        returned = started + 1.0 + times * (down + up) - up
        download = pair.users.download(size, returned - started + settle)
        yield sleep(1.0)
        prober.start()
        for i in range(times):
            pair.net.partition()
            yield sleep(down)
            pair.net.heal()
            if i < times - 1:
                yield sleep(up)
        result.returned = returned = reactor.seconds()
        back = yield prober.success_after(returned, wait)
        result.back = None if back is None else back - returned
        result.download = yield download
        result.download_verdict = download_verdict(result.download, size)
    finally:
        pair.net.heal()
        yield prober.stop()
        result.probes = list(prober.outcomes)
    return result


@defer.inlineCallbacks


def server_restart(pair: Pair, gap: float = 2.0, wait: float = 12.0, after: float = 2.0):
    """
    SIGTERM to the server; once it has gone, a new one on the same port
    C{gap} seconds later. C{back} counts from the new server's listening;
    the relay-client's log lines are those from the SIGTERM to C{after}
    seconds past its return (or the end of the wait).
    """
    result = Result("server_restart", pair.label, waited=wait)
    prober = Prober(pair.users)
    prober.start()
    patient = None
    try:
        lines_before = len(pair.client_lines())
        old = pair.server
        old.transport.signalProcess("TERM")
        patient = _Patient(pair, PATIENT_OFFSETS)
        killer = reactor.callLater(30.0, lambda: _exited(old) or old.transport.signalProcess("KILL"))
        yield old.exited
        if killer.active():
            killer.cancel()
        else:
            result.notes.append("the old server did not exit within 30 s of SIGTERM: SIGKILLed")
        yield sleep(gap)
        result.returned = listening = yield pair.start_server()
        back = yield prober.success_after(listening, wait)
        result.back = None if back is None else back - listening
        yield sleep((back if back is not None else reactor.seconds()) + after - reactor.seconds())
        result.client_lines = pair.client_lines()[lines_before:]
        result.patient = yield patient.outcomes()
    finally:
        yield _wind_up(result, prober, patient)
    return result


SCENARIOS: Dict[str, Callable[..., defer.Deferred]] = {
    "partition": partition,
    "nat_rebinding": nat_rebinding,
    "loss": loss,
    "flapping": flapping,
    "server_restart": server_restart,
}


@defer.inlineCallbacks


def run(pair: Pair, scenario: str, **options):
    """Start C{pair}, play C{scenario} on it, stop everything: fires with its L{Result}."""
    try:
        yield pair.start()
        result = yield SCENARIOS[scenario](pair, **options)
    finally:
        yield pair.stop()
    return result


def side_by_side(pairs: List[Pair], scenario: str, **options) -> defer.Deferred:
    """
    The same scenario for every pair at once, each in a namespace of its
    own: fires with a list of L{Result}s or L{Failure}s, in C{pairs}' order.
    """
    runs = [run(pair, scenario, **options) for pair in pairs]
    return defer.DeferredList(runs, consumeErrors=True).addCallback(lambda results: [r for _, r in results])
