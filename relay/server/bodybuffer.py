"""
The in-memory file that holds a request body while it arrives.

twisted.web gives every request a C{BytesIO}; writing a body into one in
64 KiB reads and taking it out again costs a copy or two more than a list
of the reads joined once, which on PyPy is a noticeable share of relaying
a large body. Bodies
here are only ever written in full and then taken whole, so that is all
this supports, plus the C{seek}/C{read} twisted.web itself may call.
"""

from typing import List


def too_large_text(limit: int) -> str:
    """The 413's text for a buffered body over C{limit} bytes (either HTTP/1.1 engine, HTTP/2)."""
    return "Request body too large: this relay accepts at most %d bytes (--max_request_body)\n" % (limit,)


class BodyBuffer:
    def __init__(self) -> None:
        self._pieces: List[bytes] = []
        self._size = 0
        self._pos = 0

    def write(self, data: bytes) -> None:
        if data:
            self._pieces.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    def getvalue(self) -> bytes:
        pieces = self._pieces
        if len(pieces) != 1:
            joined = b"".join(pieces)
            self._pieces = [joined] if joined else []
            return joined
        return pieces[0]

    def pieces(self) -> List[bytes]:
        """The body as the reads it arrived in (no copy)."""
        return list(self._pieces)

    def __len__(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            offset += self._size
        self._pos = max(0, offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        data = self.getvalue()
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        out = data[self._pos:end]
        self._pos = max(self._pos, end)
        return out

    def close(self) -> None:
        self._pieces = []
        self._size = 0
