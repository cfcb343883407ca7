"""
Request ids: what the broker names each user request by, and what a
replica reads back from one to find the replica that holds it.
"""

import os
from typing import Optional


class RequestIds:
    """
    C{{name}:} and 32 lowercase hex digits from 16 random bytes.

    The bytes come from C{os.urandom} 4 KiB at a time: on PyPy each call
    opens, reads and closes C{/dev/urandom}, five system calls per request.
    The bytes are as unguessable either way, and each is used once.

    With several replicas (docs/scaling.md), the first byte is the index of
    the replica that issues the id instead (C{replica}), so that a call
    about the request can be passed to the replica that holds it, whichever
    replica it reaches. The wire format stays the same, and 120 random bits
    remain.
    """

    def __init__(self, batch: int = 4096, replica: Optional[int] = None):
        if replica is not None and not 0 <= replica <= 255:
            raise ValueError("a replica index is 0 to 255, not %r" % (replica,))
        self._batch = batch
        self._pool = b""
        self._offset = 0
        self._prefix = None if replica is None else "%02x" % (replica,)

    def __call__(self, backend: str) -> str:
        if self._offset + 16 > len(self._pool):
            self._pool = os.urandom(self._batch)
            self._offset = 0
        start = self._offset
        self._offset = start + 16
        if self._prefix is None:
            return backend + ":" + self._pool[start : start + 16].hex()
        return backend + ":" + self._prefix + self._pool[start + 1 : start + 16].hex()


def issuing_replica(request_id: str) -> Optional[int]:
    """The replica index an id of L{RequestIds} carries; None if it is not one of ours."""
    _, sep, tail = request_id.rpartition(":")
    if not sep or len(tail) != 32 or tail.strip("0123456789abcdef"):
        return None
    return int(tail[:2], 16)
