"""grpcio plumbing shared by the Python suites (tests/interop, tests/powercut):
stubs generated from proto/ with grpcio-tools, so the tests check the
published wire contract and not our Rust types; a bearer-token interceptor;
and a request iterator fed from the test, so a stream can be cut.
"""

import collections
import queue
import sys
from pathlib import Path

import grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]


def generate_stubs(gen_dir):
    """Generates the stubs into `gen_dir`, puts it on sys.path and returns
    the (messages, services) modules."""
    gen_dir = Path(gen_dir)
    gen_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={gen_dir}",
            f"--grpc_python_out={gen_dir}",
            str(ROOT / "proto" / "recvault" / "v1" / "recvault.proto"),
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(gen_dir))
    from recvault.v1 import recvault_pb2, recvault_pb2_grpc

    return recvault_pb2, recvault_pb2_grpc


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        metadata = list(d.metadata or []) + [self.header]
        return _Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class Feeder:
    """A request iterator fed from the test, so the stream can be cut."""

    def __init__(self):
        self.q = queue.Queue()

    def put(self, msg):
        self.q.put(msg)

    def close(self):
        self.q.put(None)

    def __iter__(self):
        while True:
            m = self.q.get()
            if m is None:
                return
            yield m
