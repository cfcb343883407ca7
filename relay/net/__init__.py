"""
Sockets, as both sides use them: making and tuning a connection
(L{relay.net.transport}) and telling a dead peer from one that closed
(L{relay.net.liveness}). Nothing here knows the relay protocol or either
side.
"""
