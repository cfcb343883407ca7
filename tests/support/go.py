"""
Where the Go reference binaries live, and the skip a test takes when one is
missing: an explicit skip that names the path, never a quiet fall-back to
our own side (which would pass without testing what the test says). CI
always has them (../shared/reference-go/README says how to build them).
"""

import os

from twisted.trial.unittest import SkipTest

from tests.support.process import ROOT

GO_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference-go")
GO_CLIENT = os.path.join(GO_DIR, "http-relay-client")
GO_SERVER = os.path.join(GO_DIR, "http-relay-server")


def go_binary(path: str) -> str:
    """C{path}, or a skip saying which Go binary is missing and where it was looked for."""
    if not os.access(path, os.X_OK):
        what = {GO_CLIENT: "the Go relay-client", GO_SERVER: "the Go relay server"}.get(path, "a Go binary")
        raise SkipTest("%s is not at %s (build it as ../shared/reference-go/README says)" % (what, path))
    return path
