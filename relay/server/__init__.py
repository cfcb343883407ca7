"""
The relay server (C{twistd relay}): the L{broker} holds the state with no
HTTP in it; L{resources} (the root, with L{for_relay_clients} and
L{for_users} beneath it), L{response}, L{site}, L{http1}, L{h2} and
L{tunnel} put it on twisted.web; L{service} and L{tap} make it a twistd
service, L{tac} the service of relay.tac.
"""
