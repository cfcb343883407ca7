"""
Where the Go reference binaries live, and the skip a test takes when one is
missing.
"""

import os

from tests.support.process import ROOT

GO_CLIENT = os.path.join(os.path.dirname(ROOT), "shared", "reference-go", "http-relay-client")
