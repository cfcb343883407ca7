"""
A response sink that records what the broker hands a user's request.
"""

from relay.server.events import Outcome


class Sink:
    def __init__(self):
        self.messages = []
        self.failures = []
        self.pending = None
        self.pause_after_write = False

    def deliver(self, message, body=None):
        if body is not None:
            message.body = b"".join(body)
        self.messages.append(message)
        if self.pause_after_write:
            self.pending.pauseProducing()

    def fail(self, reason):
        self.failures.append(reason)

    def outcome(self) -> Outcome:
        status = self.messages[0].status_code if self.messages else 0
        return Outcome(status, bytes_out=sum(len(m.body) for m in self.messages))
