"""
gRPC through the relay, end to end: grpcio's client as the user, grpcio's
server as the backend, our relay server and our relay client (with
C{--force_http2}) in between, all on 127.0.0.1.

The services are grpcio's generic handlers with raw bytes (no generated
stubs). grpcio's calls block, so they run in threads while the reactor
carries the relay; every call has a deadline. The threads are a pool of
their own: calls blocked in the reactor's pool would starve the name
lookups (127.0.0.1 too) that the relay client's connections wait for.
"""

import hashlib
import os
import threading
from concurrent import futures

import pytest
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.support import stalled, started_client
from tests.support.client_process import polling_from, spawn
from tests.support.e2e import NAME, Relay
from tests.support.grpc_echo import SERVICE, CallThreads, identity, method

try:
    import grpc
except ImportError as e:  # e.g. on PyPy, which grpcio has no wheels for
    grpc = None
    GRPC_MISSING = "grpcio is not importable (%s)" % (e,)

CALL_TIMEOUT = 20.0
BIG = 5 * 1024 * 1024
CUSTOM_TRAILER = ("x-custom-trailer", "trailer value")
FIREHOSE_LIMIT = 512 * 1024 * 1024


class GrpcBackend:
    """A grpcio server with one handler of each kind, and what it saw."""

    def __init__(self):
        self.big = os.urandom(BIG)
        self.seen_metadata = {}
        self.release_stream = threading.Event()
        self.slow_started = threading.Event()
        self.slow_cancelled = threading.Event()
        self.slow_time_remaining = None
        self.firehose_bytes = 0
        self.firehose_cancelled = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, identity, identity),
            "Big": grpc.unary_unary_rpc_method_handler(self.big_reply, identity, identity),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail, identity, identity),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow, identity, identity),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream, identity, identity),
            "Firehose": grpc.unary_stream_rpc_method_handler(self.firehose, identity, identity),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, identity, identity),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, identity, identity),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = "127.0.0.1:%d" % (self.port,)

    def stop(self):
        return threads.deferToThread(lambda: self.server.stop(None).wait(10))

    def unary(self, request, context):
        self.seen_metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata((CUSTOM_TRAILER,))
        return b"echo:" + request

    def big_reply(self, request, context):
        return self.big

    def fail(self, request, context):
        context.set_trailing_metadata((CUSTOM_TRAILER,))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "custom failure: " + request.decode())

    def slow(self, request, context):
        self.slow_time_remaining = context.time_remaining()
        context.add_callback(self.slow_cancelled.set)
        self.slow_started.set()
        self.slow_cancelled.wait(CALL_TIMEOUT)
        return b"too late"

    def server_stream(self, request, context):
        yield b"first"
        # The rest only once the user has the first: proof that the relay
        # streams rather than waiting for the end.
        if not self.release_stream.wait(CALL_TIMEOUT):
            context.abort(grpc.StatusCode.ABORTED, "the first message never arrived")
        for i in range(int(request)):
            yield b"message %d" % (i,)

    def firehose(self, request, context):
        """64 KiB messages for as long as they are taken (up to a bound)."""
        context.add_callback(self.firehose_cancelled.set)
        block = b"f" * 65536
        while self.firehose_bytes < FIREHOSE_LIMIT and context.is_active():
            self.firehose_bytes += len(block)
            yield block

    def client_stream(self, request_iterator, context):
        return b"|".join(request_iterator)

    def bidi(self, request_iterator, context):
        for message in request_iterator:
            yield message.upper()


@pytest.mark.socket
class GrpcThroughRelay(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if grpc is None:
            raise unittest.SkipTest(GRPC_MISSING)
        self.in_thread = CallThreads(self)
        self.backend = GrpcBackend()
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        self.client = started_client(self, self.relay.base, NAME, self.backend.address, force_http2=True)
        self.channel = grpc.insecure_channel(
            "127.0.0.1:%d" % (self.relay.port,),
            options=[
                ("grpc.enable_http_proxy", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self.addCleanup(self.channel.close)
        self.metadata = [("x-server-name", NAME)]
        return self.relay.polling(NAME)

    def call(self, kind, name, request, timeout=CALL_TIMEOUT, with_call=False):
        """Make a call in a thread; fires with its result, fails with the RpcError."""
        factory = getattr(self.channel, kind)(method(name), request_serializer=identity, response_deserializer=identity)
        if with_call:
            factory = factory.with_call
        return self.in_thread(factory, request, timeout=timeout, metadata=self.metadata)

    @defer.inlineCallbacks
    def rpc_error(self, d):
        try:
            yield d
        except grpc.RpcError as e:
            return e
        self.fail("the call succeeded")

    @defer.inlineCallbacks
    def test_unary(self):
        response, call = yield self.call("unary_unary", "Unary", b"hello", with_call=True)
        self.assertEqual(response, b"echo:hello")
        self.assertEqual(call.code(), grpc.StatusCode.OK)
        # Trailing metadata came back as HTTP/2 trailers through the relay.
        self.assertIn(CUSTOM_TRAILER, tuple(call.trailing_metadata()))
        # The user's metadata and deadline reached the backend.
        self.assertEqual(self.backend.seen_metadata.get("x-server-name"), NAME)

    @defer.inlineCallbacks
    def test_big_response_arrives_intact(self):
        response = yield self.call("unary_unary", "Big", b"")
        self.assertEqual(len(response), BIG)
        self.assertEqual(hashlib.sha256(response).digest(), hashlib.sha256(self.backend.big).digest())

    @defer.inlineCallbacks
    def test_server_streaming(self):
        def run():
            responses = self.channel.unary_stream(
                method("ServerStream"), request_serializer=identity, response_deserializer=identity
            )(b"50", timeout=CALL_TIMEOUT, metadata=self.metadata)
            first = next(responses)
            self.backend.release_stream.set()
            return first, list(responses)

        first, rest = yield self.in_thread(run)
        self.assertEqual(first, b"first")
        self.assertEqual(rest, [b"message %d" % i for i in range(50)])

    @defer.inlineCallbacks
    def test_client_streaming(self):
        pieces = [b"piece %d" % i for i in range(100)] + [b"x" * 200000]
        response = yield self.call("stream_unary", "ClientStream", iter(pieces))
        self.assertEqual(response, b"|".join(pieces))

    @defer.inlineCallbacks
    def test_bidirectional_streaming_both_ways_at_once(self):
        """
        10,000 messages echoed, with answers flowing while the user still
        sends: the user never runs more than 500 messages ahead of the
        answers, so the call could not finish if either side waited for
        the other's half-close (the body streams between our halves).
        """
        count, lead = 10000, 500
        received = []
        caught_up = threading.Condition()

        def requests():
            for i in range(count):
                with caught_up:
                    if not caught_up.wait_for(lambda i=i: len(received) >= i - lead, timeout=CALL_TIMEOUT):
                        raise AssertionError("no answers while sending: %d sent, %d back" % (i, len(received)))
                yield b"m%d" % i

        def run():
            bidi = self.channel.stream_stream(
                method("Bidi"), request_serializer=identity, response_deserializer=identity
            )
            call = bidi(requests(), timeout=60, metadata=self.metadata)
            for answer in call:
                with caught_up:
                    received.append(answer)
                    caught_up.notify_all()
            return received

        responses = yield self.in_thread(run)
        self.assertEqual(len(responses), count)
        self.assertEqual(responses, [b"M%d" % i for i in range(count)])

    @defer.inlineCallbacks
    def test_bidirectional_streaming(self):
        def run():
            return list(
                self.channel.stream_stream(method("Bidi"), request_serializer=identity, response_deserializer=identity)(
                    iter([b"a%d" % i for i in range(20)]), timeout=CALL_TIMEOUT, metadata=self.metadata
                )
            )

        responses = yield self.in_thread(run)
        self.assertEqual(responses, [b"A%d" % i for i in range(20)])

    @defer.inlineCallbacks
    def test_unimplemented(self):
        # grpcio answers an unknown method "trailers-only": the status is in
        # the only HEADERS frame, which the relay repeats as trailers.
        error = yield self.rpc_error(self.call("unary_unary", "Missing", b"x"))
        self.assertEqual(error.code(), grpc.StatusCode.UNIMPLEMENTED)

    @defer.inlineCallbacks
    def test_custom_status_and_message(self):
        error = yield self.rpc_error(self.call("unary_unary", "Fail", "naïve ✓".encode()))
        self.assertEqual(error.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(error.details(), "custom failure: naïve ✓")
        # An error without messages is "trailers-only": one HEADERS frame.
        # The relay protocol has it as headers and repeats only the Grpc-*
        # ones as trailers (as the Go relay does), so the backend's other
        # metadata reaches the user as initial metadata.
        self.assertIn(CUSTOM_TRAILER, tuple(error.initial_metadata()))

    @defer.inlineCallbacks
    def test_deadline_exceeded_propagates(self):
        # A deadline the relay meets even on a loaded machine (the call must
        # reach the backend before it passes), far below CALL_TIMEOUT.
        deadline = 3.0
        error = yield self.rpc_error(self.call("unary_unary", "Slow", b"", timeout=deadline))
        self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        # The deadline went to the backend as grpc-timeout: its call had at
        # most the user's deadline, and it ended there, not at CALL_TIMEOUT.
        started = yield self.in_thread(self.backend.slow_started.wait, 5.0)
        self.assertTrue(started, "the call never reached the backend")
        self.assertIsNotNone(self.backend.slow_time_remaining)
        self.assertLessEqual(self.backend.slow_time_remaining, deadline)
        cancelled = yield self.in_thread(self.backend.slow_cancelled.wait, 5.0)
        self.assertTrue(cancelled, "the backend's call outlived the user's deadline")

    @defer.inlineCallbacks
    def test_big_stream_to_a_slow_user_stalls_the_backend(self):
        """
        A user who stops reading a server stream stops the backend after a
        bounded amount, through every hop's flow control: ours holds the
        backend's HTTP/2 window shut while a chunk waits for the relay.
        """

        def start():
            responses = self.channel.unary_stream(
                method("Firehose"), request_serializer=identity, response_deserializer=identity
            )(b"", timeout=CALL_TIMEOUT, metadata=self.metadata)
            return responses, next(responses)

        responses, first = yield self.in_thread(start)
        self.assertEqual(first, b"f" * 65536)
        # The user reads no more. Wait for the backend to stall: no progress
        # for half a second.
        stalled_at = yield stalled(lambda: self.backend.firehose_bytes, timeout=15)
        self.assertLess(stalled_at, 64 * 1024 * 1024)
        # Stalled by us: the stream is paused, holding back its window.
        (stream,) = self.client.pools[-1]._connection.streams.values()
        self.assertTrue(stream.paused)
        self.assertGreater(stream.unacknowledged, 0)
        # The user gives up; the backend's call ends too.
        responses.cancel()
        cancelled = yield self.in_thread(self.backend.firehose_cancelled.wait, 10.0)
        self.assertTrue(cancelled, "the backend's call outlived the user's")
        self.assertLess(self.backend.firehose_bytes, 64 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_a_drain_lets_a_stream_in_flight_finish(self):
        """
        A drain sends grpc's channel a GOAWAY (two, in fact): the call in
        flight still gets every message and its status on that connection.
        """

        def start():
            responses = self.channel.unary_stream(
                method("ServerStream"), request_serializer=identity, response_deserializer=identity
            )(b"50", timeout=CALL_TIMEOUT, metadata=self.metadata)
            return responses, next(responses)

        responses, first = yield self.in_thread(start)
        self.assertEqual(first, b"first")
        stopped = self.relay.stop()
        self.backend.release_stream.set()
        rest = yield self.in_thread(list, responses)
        self.assertEqual(rest, [b"message %d" % i for i in range(50)])
        self.assertEqual(responses.code(), grpc.StatusCode.OK)
        yield stopped

    @defer.inlineCallbacks
    def test_concurrent_calls(self):
        results = yield defer.gatherResults(
            [self.call("unary_unary", "Unary", b"%d" % i) for i in range(10)]
        )
        self.assertEqual(sorted(results), sorted(b"echo:%d" % i for i in range(10)))


@pytest.mark.process
class GrpcThroughTwistd(unittest.TestCase):
    """The same through C{twistd relay-client --force_http2}, as an operator runs it."""

    timeout = 60

    @defer.inlineCallbacks
    def test_unary_and_error_through_twistd(self):
        if grpc is None:
            raise unittest.SkipTest(GRPC_MISSING)
        in_thread = CallThreads(self)
        backend = GrpcBackend()
        self.addCleanup(backend.stop)
        relay = Relay()
        self.addCleanup(relay.stop)
        child = spawn(
            [
                "--relay_scheme=http",
                "--relay_address=127.0.0.1:%d" % (relay.port,),
                "--backend_scheme=http",
                "--backend_address=" + backend.address,
                "--force_http2",
                "--server_name=" + NAME,
                "--disable_auth_for_remote",
            ]
        )

        def stop():
            if not child.exited.called:
                child.transport.signalProcess("KILL")
            return child.exited

        self.addCleanup(stop)
        yield polling_from(child, relay, NAME)
        channel = grpc.insecure_channel("127.0.0.1:%d" % (relay.port,), options=[("grpc.enable_http_proxy", 0)])
        self.addCleanup(channel.close)
        metadata = [("x-server-name", NAME)]
        unary = channel.unary_unary(method("Unary"), request_serializer=identity, response_deserializer=identity)
        response = yield in_thread(unary, b"twistd", timeout=CALL_TIMEOUT, metadata=metadata)
        self.assertEqual(response, b"echo:twistd")
        missing = channel.unary_unary(method("Missing"), request_serializer=identity, response_deserializer=identity)
        try:
            yield in_thread(missing, b"", timeout=CALL_TIMEOUT, metadata=metadata)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.UNIMPLEMENTED)
        else:
            self.fail("an unknown method succeeded")
        child.transport.signalProcess("TERM")
        yield child.exited
        self.assertNotIn(b"not supported", child.output)
