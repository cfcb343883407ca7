"""
The relay server (C{twistd relay}): the L{broker} holds the state with no
HTTP in it; L{resources}, L{response}, L{site}, L{h2} and L{tunnel} put it
on twisted.web; L{service} and L{tap} make it a twistd service, L{tac}
the service of relay.tac.
"""
