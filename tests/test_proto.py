"""
The committed C{http_relay_pb2.py} matches C{http_relay.proto}, and the
messages have the field numbers docs/protocol.md fixes.
"""

import os
import shutil
import subprocess
import tempfile

import pytest
from google.protobuf import descriptor_pb2
from twisted.trial import unittest

from relay.proto import http_relay_pb2
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse

pytestmark = pytest.mark.process

PROTO_DIR = os.path.dirname(http_relay_pb2.__file__)


class ProtoTests(unittest.TestCase):
    def test_generated_module_is_up_to_date(self):
        protoc = shutil.which("protoc")
        if protoc is None:
            raise unittest.SkipTest("protoc not installed (apt-get install protobuf-compiler)")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "set.pb")
            subprocess.check_call([protoc, "-I" + PROTO_DIR, "--descriptor_set_out=" + out, "http_relay.proto"])
            fresh = descriptor_pb2.FileDescriptorSet()
            with open(out, "rb") as f:
                fresh.ParseFromString(f.read())
        committed = descriptor_pb2.FileDescriptorProto.FromString(http_relay_pb2.DESCRIPTOR.serialized_pb)
        # protoc leaves json_name out of the descriptors it embeds.
        for message in fresh.file[0].message_type:
            for field in message.field:
                field.ClearField("json_name")
        self.assertEqual(
            fresh.file[0],
            committed,
            "http_relay_pb2.py is stale: run python -m relay.proto.generate",
        )

    def test_wire_numbers(self):
        expected = {
            "HttpHeader": {"name": 1, "value": 2},
            "HttpRequest": {"id": 1, "method": 2, "url": 3, "header": 4, "body": 5, "host": 6},
            "HttpResponse": {
                "status_code": 1,
                "header": 2,
                "body": 3,
                "id": 4,
                "eof": 5,
                "trailer": 6,
                "backend_duration_ms": 7,
            },
        }
        for name, fields in expected.items():
            descriptor = http_relay_pb2.DESCRIPTOR.message_types_by_name[name]
            self.assertEqual(
                descriptor.full_name, "cloudrobotics.http_relay.v1alpha1." + name
            )
            self.assertEqual({f.name: f.number for f in descriptor.fields}, fields)

    def test_known_bytes(self):
        """Bytes a Go relay-client would produce for the same message."""
        m = HttpResponse(id="r:1", status_code=200, eof=True)
        m.header.add(name="A", value="b")
        self.assertEqual(
            m.SerializeToString(),
            b"\x08\xc8\x01\x12\x06\n\x01A\x12\x01b\x22\x03r:1\x28\x01",
        )
        r = HttpRequest()
        r.ParseFromString(b"\n\x03r:1\x12\x03GET\x1a\x0fhttp://invalid/")
        self.assertEqual((r.id, r.method, r.url), ("r:1", "GET", "http://invalid/"))
