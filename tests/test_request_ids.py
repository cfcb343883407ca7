"""
Request ids: C{NAME:} and 32 lowercase hex digits, as Go's; with several
replicas the first byte names the replica that issued the id
(docs/scaling.md), and the format on the wire does not change.
"""

import re

import pytest
from twisted.trial import unittest

from relay.server.ids import RequestIds, issuing_replica

pytestmark = pytest.mark.memory

GO_ID = re.compile(r"[^:]+:[0-9a-f]{32}")


class RequestIdTests(unittest.SynchronousTestCase):
    def test_single_replica_ids_are_all_random(self):
        ids = RequestIds()
        made = [ids("robot") for _ in range(600)]
        self.assertTrue(all(GO_ID.fullmatch(i) for i in made))
        self.assertEqual(len(set(made)), 600)
        # No fixed first byte: 600 ids cover far more than one value.
        self.assertGreater(len({i.split(":")[1][:2] for i in made}), 100)

    def test_replica_ids_carry_their_replica(self):
        for replica in (0, 7, 255):
            ids = RequestIds(replica=replica)
            made = [ids("a:b") for _ in range(300)]
            self.assertTrue(all(GO_ID.fullmatch(i.replace("a:b", "ab", 1)) for i in made))
            self.assertEqual({issuing_replica(i) for i in made}, {replica})
            self.assertEqual(len(set(made)), 300)

    def test_replica_index_range(self):
        self.assertRaises(ValueError, RequestIds, replica=256)
        self.assertRaises(ValueError, RequestIds, replica=-1)

    def test_ids_that_are_not_ours(self):
        for bad in (
            "robot",
            "robot:",
            "robot:zz" + "0" * 30,
            "robot:" + "0" * 31,
            "robot:+1" + "0" * 30,
            "robot:" + "A" * 32,
        ):
            self.assertIsNone(issuing_replica(bad), bad)
