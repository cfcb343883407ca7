"""
The relay-client run under twistd as a child process, and the wait for its
first poll.
"""

import os
import sys

from twisted.internet import defer, protocol, reactor

from tests.support.process import ROOT


def twistd_argv():
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-m", "twisted"]


def environ():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Child(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.exited = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.exited.callback((reason.value.exitCode, reason.value.signal))

    def lines(self):
        return self.output.decode("utf-8", "replace").splitlines()


def spawn(args):
    child = Child()
    argv = twistd_argv() + ["-n", "--pidfile=", "relay-client"] + list(args)
    reactor.spawnProcess(child, argv[0], argv, env=environ(), path=ROOT)
    return child


@defer.inlineCallbacks


def polling_from(child, relay, name: str, timeout: float = 30.0):
    """
    Fires once the relay-client process C{child} polls for C{name} at
    C{relay}; fails with what the child wrote if it exits first, or has not
    polled within C{timeout} seconds.
    """
    done = defer.Deferred()

    def settle(outcome):
        if not done.called:
            done.callback(outcome)

    relay.polling(name).addCallback(lambda _: settle("polled"))
    child.exited.addBoth(lambda result: (settle("exited"), result)[1])
    timer = reactor.callLater(timeout, settle, "no poll within %gs" % (timeout,))
    outcome = yield done
    if timer.active():
        timer.cancel()
    if outcome != "polled":
        raise AssertionError("%s: %s" % (outcome, child.output.decode("utf-8", "replace")))
