"""
A headless Chromium driven over the DevTools protocol, for the admin
page's test.

The protocol runs over a pipe (C{--remote-debugging-pipe}: commands on
the child's fd 3, answers and events on its fd 4, each a JSON object
ending in a NUL byte), which needs no WebSocket client and no free port:
Twisted's C{spawnProcess} maps the two extra descriptors.
"""

import base64
import itertools
import json
import os
import shutil
import tempfile
from typing import Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(Exception):
    pass


class _Pipe(protocol.ProcessProtocol):
    def __init__(self):
        self.buffer = b""
        self.waiting = {}
        self.ended = defer.Deferred()
        self.stderr = b""

    def childDataReceived(self, fd, data):
        if fd == 2:
            self.stderr = (self.stderr + data)[-20000:]
            return
        if fd != 4:
            return
        self.buffer += data
        while b"\0" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            d = self.waiting.pop(message.get("id"), None)
            if d is None:
                continue
            if "error" in message:
                d.errback(CDPError(message["error"]))
            else:
                d.callback(message.get("result", {}))

    def processEnded(self, reason):
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(CDPError("chromium exited: %s" % (self.stderr[-2000:].decode("utf-8", "replace"),)))
        self.ended.callback(None)


class Chromium:
    """One browser, one page (tab)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="relay-chromium-")
        self.pipe = _Pipe()
        self.ids = itertools.count(1)
        self.session = None
        args = [
            executable,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--user-data-dir=" + self.profile,
            "--window-size=%d,%d" % (width, height),
            "about:blank",
        ]
        self.process = reactor.spawnProcess(
            self.pipe, executable, args, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"}
        )

    def send(self, method: str, session: bool = True, **params) -> defer.Deferred:
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params}
        if session and self.session is not None:
            message["sessionId"] = self.session
        d = self.pipe.waiting[message_id] = defer.Deferred()
        self.process.writeToChild(3, json.dumps(message).encode() + b"\0")
        return d

    @defer.inlineCallbacks
    def open(self, url: str):
        targets = yield self.send("Target.getTargets", session=False)
        pages = [t for t in targets["targetInfos"] if t["type"] == "page"]
        if pages:
            target = pages[0]["targetId"]
        else:
            target = (yield self.send("Target.createTarget", session=False, url="about:blank"))["targetId"]
        attached = yield self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)
        self.session = attached["sessionId"]
        yield self.send("Page.navigate", url=url)

    @defer.inlineCallbacks
    def evaluate(self, expression: str):
        result = yield self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(result["exceptionDetails"])
        return result["result"].get("value")

    @defer.inlineCallbacks
    def wait_for(self, expression: str, timeout: float = 20.0, interval: float = 0.1):
        """
        Poll C{expression} in the page until it is truthy, bounded by
        C{timeout}: a browser's rendering is the one thing here with no
        Deferred to wait on.
        """
        deadline = reactor.seconds() + timeout
        while True:
            try:
                value = yield self.evaluate(expression)
            except CDPError:
                value = None  # e.g. the page is still loading: not yet
            if value:
                return value
            if reactor.seconds() > deadline:
                text = yield self.evaluate("document.body ? document.body.innerText.slice(0, 3000) : ''")
                raise AssertionError("the page never satisfied %s; it shows:\n%s" % (expression, text))
            yield deferLater(reactor, interval, lambda: None)

    @defer.inlineCallbacks
    def screenshot(self, path: str):
        result = yield self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(result["data"]))
        return path

    @defer.inlineCallbacks
    def close(self):
        if self.process.pid is not None:
            try:
                yield defer.gatherResults([self.send("Browser.close", session=False)]).addTimeout(5, reactor)
            except Exception:
                pass
            if self.process.pid is not None:
                self.process.signalProcess("KILL")
        yield self.pipe.ended
        shutil.rmtree(self.profile, True)
