"""grpcio client plumbing for the power-cut test: stubs generated from
proto/ at import time (into a temporary directory, so nothing is left in
the tree), a bearer-token interceptor, and a helper that starts the real
server on a data directory and a free loopback port.

Mirrors tests/interop/test_interop.py (which generates into its own gen/).
"""

import atexit
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("RECVAULT_BIN", ROOT / "target" / "debug" / "recvault"))

_GEN = Path(tempfile.mkdtemp(prefix="recvault-powercut-gen-"))
atexit.register(shutil.rmtree, _GEN, True)


def _generate_stubs():
    include = Path(protoc.__file__).resolve().parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={_GEN}",
            f"--grpc_python_out={_GEN}",
            str(ROOT / "proto" / "recvault" / "v1" / "recvault.proto"),
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(_GEN))


_generate_stubs()
from recvault.v1 import recvault_pb2 as pb  # noqa: E402
from recvault.v1 import recvault_pb2_grpc as rpc  # noqa: E402

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]


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


def wait_for_binary(timeout=300):
    """The binary may be rebuilt under us by another engineer: wait for it."""
    deadline = time.time() + timeout
    while True:
        if BINARY.exists() and os.access(BINARY, os.X_OK):
            # A link step in progress leaves a partial file; wait until the
            # size is stable.
            size = BINARY.stat().st_size
            time.sleep(0.2)
            if BINARY.exists() and BINARY.stat().st_size == size:
                return
        if time.time() > deadline:
            raise RuntimeError(f"server binary {BINARY} missing")
        time.sleep(1)


class Server:
    """The real server on `data_dir`, optionally under a wrapper command
    (strace). `start()` returns once it prints its serving line, or raises
    ServerFailed with its stderr."""

    def __init__(self, data_dir, config=None, wrapper=(), log=None):
        self.data_dir = str(data_dir)
        self.config = config
        self.wrapper = list(wrapper)
        self.log = log
        self.proc = None
        self.addr = None
        self.stderr = ""

    def start(self, timeout=60):
        wait_for_binary()
        cmd = self.wrapper + [str(BINARY), "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                              "--data-dir", self.data_dir, "--log-format", "text"]
        if self.config:
            cmd += ["--config", str(self.config)]
        env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self._errf = open(self.log, "w+b") if self.log else tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._errf, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("recvault serving on "):
            self.proc.wait(timeout=timeout)
            raise ServerFailed(self.read_stderr(), self.proc.returncode)
        self.addr = line.split()[3]
        return self

    def read_stderr(self):
        self._errf.flush()
        self._errf.seek(0)
        return self._errf.read().decode(errors="replace")

    def channel(self, timeout=20):
        """A ready channel; raises grpc.FutureTimeoutError early if the
        server dies meanwhile."""
        ch = grpc.insecure_channel(self.addr, options=CHANNEL_OPTIONS)
        ready = grpc.channel_ready_future(ch)
        deadline = time.time() + timeout
        while True:
            try:
                ready.result(timeout=0.25)
                return ch
            except grpc.FutureTimeoutError:
                if self.proc.poll() is not None or time.time() > deadline:
                    ready.cancel()
                    ch.close()
                    raise

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc and not self._errf.closed:
            self.proc.wait()
            self.stderr = self.read_stderr()
            self._errf.close()


class ServerFailed(Exception):
    def __init__(self, stderr, rc):
        super().__init__(f"server did not start (exit {rc}): {stderr[-3000:]}")
        self.stderr = stderr
        self.rc = rc


def operator_stub(channel, data_dir):
    """A stub carrying a fresh operator token made with the bootstrap admin
    token in the data directory."""
    admin_token = (Path(data_dir) / "admin.token").read_text().strip()
    admin = rpc.RecvaultStub(grpc.intercept_channel(channel, BearerToken(admin_token)))
    made = admin.CreateToken(
        pb.CreateTokenRequest(
            name="powercut-operator",
            roles=[pb.INGEST, pb.COACH, pb.RETENTION, pb.ADMIN, pb.AUDITOR],
            unredacted=True,
        )
    )
    return rpc.RecvaultStub(grpc.intercept_channel(channel, BearerToken(made.token))), made.token
