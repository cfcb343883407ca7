"""
The relay client (C{twistd relay-client}): runs next to a backend that has no
public address, long-polls the relay server for the requests users sent to
it, makes them against the backend and posts the answers back, in the wire
format of the Cloud Robotics Go C{http-relay-client}, so that either of the
two can be swapped for the other under either relay server.
"""
