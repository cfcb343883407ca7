"""
A gRPC echo service and the threads that call it, for the gRPC tests through
the relay.
"""

from twisted.internet import reactor, threads
from twisted.python.threadpool import ThreadPool

SERVICE = "relay.test.Echo"


def method(name: str) -> str:
    return "/%s/%s" % (SERVICE, name)


def identity(data: bytes) -> bytes:
    return data


class CallThreads:
    """A thread pool for blocking grpcio calls, apart from the reactor's."""

    def __init__(self, test):
        self.pool = ThreadPool(minthreads=0, maxthreads=32, name="grpc-calls")
        self.pool.start()
        test.addCleanup(self.pool.stop)

    def __call__(self, f, *args, **kwargs):
        return threads.deferToThreadPool(reactor, self.pool, f, *args, **kwargs)
