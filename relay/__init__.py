"""
relay: a multiplexing HTTP relay server and its relay client, on Twisted.

A drop-in, wire-compatible replacement for the Cloud Robotics Go
C{http-relay-server} and C{http-relay-client}; see docs/protocol.md.
"""

__version__ = "0.1.0"
