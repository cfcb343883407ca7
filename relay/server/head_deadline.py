"""
The header timeout (slowloris) that both HTTP/1.1 engines keep: a client
gets C{site.header_timeout} seconds to send a request's headers, counted
from the connection's start or from the end of the previous request.

One timer per connection, not per request: each request only moves the
deadline, and the timer, when it fires early, waits on for it. The timer
runs on the site's clock (the channel's C{callLater} is the site's
C{clock.callLater}, set as the site builds the channel).
"""

from typing import Any, Callable, Optional

from relay.logs import peer_text


class HeadDeadline:
    """
    A channel's header timer, mixed into L{relay.server.http1.RelayChannel}
    and L{relay.server.lean_http1.LeanChannel}, which provide C{site},
    C{transport}, C{callLater} and C{_log}.
    """

    site: Any
    transport: Any
    _log: Any
    callLater: Callable[..., Any]

    _header_timer: Any = None
    # When the current wait for a request's headers ends; None while a
    # request is being read or answered.
    _head_deadline: Optional[float] = None

    def _arm_header_timer(self) -> None:
        timeout = getattr(self.site, "header_timeout", None)
        if not timeout:
            return
        self._head_deadline = self.site.clock.seconds() + timeout
        if self._header_timer is None:
            self._header_timer = self.callLater(timeout, self._check_header_deadline)

    def _stop_header_timer(self) -> None:
        self._head_deadline = None
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _check_header_deadline(self) -> None:
        self._header_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # a request is in hand; its end arms the timer again
        left = deadline - self.site.clock.seconds()
        if left > 0:
            self._header_timer = self.callLater(left, self._check_header_deadline)
            return
        self._head_deadline = None
        # Every idle keep-alive connection ends here: not worth a line at info.
        self._log.debug("Closing connection: no request headers in time", Peer=peer_text(self.transport.getPeer()))
        self.transport.abortConnection()
