"""
A scripted stand-in for the relay server's relay-client API, for tests of the
relay-client's calls.
"""

from twisted.web import resource, server


class ScriptedRelay(resource.Resource):
    """
    Answers each call with the next scripted (code, body); with nothing
    scripted a call waits (a long poll) until L{release}d. Records calls.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.script = {b"/server/request": [], b"/server/response": []}
        self.calls = []
        self.held = []

    def render(self, request):
        self.calls.append((request.path, request.requestHeaders, request.content.read(), request.args))
        script = self.script.get(request.path) or []
        if not script:
            self.held.append(request)
            return server.NOT_DONE_YET
        code, body = script.pop(0)
        request.setResponseCode(code)
        return body

    def release(self, code=408, body=b"No request received within timeout"):
        """The oldest waiting call is answered."""
        request = self.held.pop(0)
        request.setResponseCode(code)
        request.write(body)
        request.finish()
