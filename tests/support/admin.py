"""
Backends and stand-ins for the admin view's tests: a backend that holds
requests open, and a pending request as the status view sees one.
"""

from twisted.internet import reactor
from twisted.web import resource, server

from relay.server.events import Outcome

SECRET = "s3cr3t-value"


class Hanging(resource.Resource):
    """
    The backend: C{/ok} answers, C{/hang} never does, C{/short} promises
    100 bytes, sends 10 and waits for the test to hang up, C{/stream}
    writes forever, C{/echo} sets a cookie.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.open = []
        self.calls = []

    def render(self, request):
        path = request.path
        if path == b"/ok" or path == b"/echo":
            request.setHeader(b"set-cookie", ("session=" + SECRET).encode())
            request.setHeader(b"x-backend", b"visible")
            request.setHeader(b"x-vault-token", SECRET.encode())
            return b"fine"
        if path == b"/hang":
            self.open.append(request)
            return server.NOT_DONE_YET
        if path == b"/short":
            request.setHeader(b"content-length", b"100")
            request.write(b"0123456789")
            self.open.append(request)
            return server.NOT_DONE_YET
        if path == b"/stream":
            self.open.append(request)

            def tick():
                if request._disconnected or request.finished:
                    return
                request.write(b"x" * 1000)
                self.calls.append(reactor.callLater(0.05, tick))

            tick()
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"no"


class _Pending:
    def __init__(self, start, backend, request_id, code, truncated):
        self.start = start
        self.backend = backend
        self.id = request_id
        self.sink = _Sink(code, truncated)
        self.info = None
        self.cancelled = False
        self.started = True
        self.finished = True
        self.eof_received = True


class _Sink:
    """A finished request's user side: an answer of 100 bytes with C{code}."""

    def __init__(self, code, truncated):
        self.code = code
        self.truncated = truncated

    def outcome(self) -> Outcome:
        outcome = Outcome(self.code, self.truncated, bytes_out=100)
        outcome.started = True
        return outcome
