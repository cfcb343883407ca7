"""
A response sink that records what the broker hands a user's request.
"""


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
