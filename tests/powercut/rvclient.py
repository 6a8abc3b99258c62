"""grpcio client plumbing for the power-cut test: stubs generated from
proto/ at import time (into a temporary directory, so nothing is left in
the tree), a bearer-token interceptor, and a helper that starts the real
server on a data directory and a free loopback port.

The stubs, the interceptor and the feeder are tests/pyshared/rvgrpc.py,
shared with tests/interop.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("RECVAULT_BIN", ROOT / "target" / "debug" / "recvault"))

_GEN = Path(tempfile.mkdtemp(prefix="recvault-powercut-gen-"))
atexit.register(shutil.rmtree, _GEN, True)


sys.path.insert(0, str(ROOT / "tests" / "pyshared"))
from rvgrpc import BearerToken, Feeder, generate_stubs  # noqa: E402,F401  (re-exported)

pb, rpc = generate_stubs(_GEN)

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]


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
