"""The recorded workload: concurrent streamed uploads (finished, resumed,
left open) and unary Puts, with the client-side receive time of every
`opened`, `ack` and `committed` (time.time(), the clock strace's -ttt uses).
"""

import hashlib
import random
import struct
import threading
import time
import uuid

from rvclient import Feeder, pb

SEG = 64 * 1024


def wav_bytes(size, tag, rng):
    """`size` bytes of a WAV file (RIFF header, then PCM-ish noise) with a
    plaintext marker every 1 KiB. Each marker names the upload and offset,
    so a grep of any crash image finds plaintext that reached disk."""
    body = bytearray(rng.randbytes(size))
    header = b"RIFF" + struct.pack("<I", size - 8) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", size - 44)
    body[: len(header)] = header
    for off in range(64, size - 64, 1024):
        m = marker(tag, off)
        body[off : off + len(m)] = m
    return bytes(body)


def marker(tag, off):
    return b"PLAINTEXT-MARK:%s:%08d" % (tag.encode(), off)


def spec(customer, content_type="audio/x-wav", kind=None, interaction="pc-call"):
    return pb.ObjectSpec(
        customer_id=customer,
        kind=kind if kind is not None else pb.CALL_RECORDING,
        content_type=content_type,
        interaction=pb.Interaction(interaction_id=interaction, agent_id="agent-7", queue="billing", direction=pb.INBOUND),
    )


class Upload:
    """One streamed upload and everything the client saw of it."""

    def __init__(self, name, customer, data, plan):
        self.name = name
        self.customer = customer
        self.upload_id = str(uuid.uuid4())
        self.data = data
        self.sha = hashlib.sha256(data).digest()
        self.plan = plan
        self.object_id = None
        self.acks = []  # (recv_time, durable_offset), every ack and opened offset
        self.committed_at = None
        self.committed = None
        self.errors = []

    def spec(self):
        return spec(self.customer, interaction=f"pc-{self.name}")

    def fork(self):
        """The same upload (id, data) with none of the recorded client
        state, for driving it again against a crash image."""
        u = Upload(self.name, self.customer, self.data, self.plan)
        u.upload_id = self.upload_id
        return u

    def acked_before(self, t):
        """Highest offset the client knew durable before time t."""
        return max([off for (ts, off) in self.acks if ts < t], default=0)


class PutRec:
    def __init__(self, name, customer, data, content_type, kind):
        self.name = name
        self.customer = customer
        self.upload_id = str(uuid.uuid4())
        self.data = data
        self.sha = hashlib.sha256(data).digest()
        self.content_type = content_type
        self.kind = kind
        self.object_id = None
        self.committed_at = None
        self.sent_at = None

    def spec(self):
        return spec(self.customer, content_type=self.content_type, kind=self.kind, interaction=f"pc-{self.name}")


class Stream:
    """One Ingest stream: a sender fed through a queue and a reader thread
    that timestamps every answer."""

    def __init__(self, stub, up):
        self.up = up
        self.feeder = Feeder()
        self.responses = stub.Ingest(iter(self.feeder))
        self.cond = threading.Condition()
        self.opened = None
        self.done = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            for r in self.responses:
                t = time.time()
                kind = r.WhichOneof("msg")
                with self.cond:
                    if kind == "opened":
                        self.opened = r.opened
                        self.up.object_id = r.opened.object_id
                        self.up.acks.append((t, r.opened.durable_offset))
                    elif kind == "ack":
                        self.up.acks.append((t, r.ack.durable_offset))
                    elif kind == "committed":
                        self.up.committed = r.committed
                        self.up.committed_at = t
                    self.cond.notify_all()
        except Exception as e:  # cancelled or server killed
            with self.cond:
                self.up.errors.append(repr(e)[:200])
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def open(self):
        self.feeder.put(pb.IngestRequest(open=pb.IngestRequest.Open(upload_id=self.up.upload_id, spec=self.up.spec())))
        with self.cond:
            assert self.cond.wait_for(lambda: self.opened is not None or self.done, timeout=30), "no opened"
        assert self.opened is not None, f"open failed: {self.up.errors}"
        return self.opened.durable_offset

    def send(self, start, end, chunk, pace):
        for off in range(start, end, chunk):
            piece = self.up.data[off : min(off + chunk, end)]
            self.feeder.put(pb.IngestRequest(data=pb.IngestRequest.Data(offset=off, data=piece)))
            if pace:
                time.sleep(pace)

    def wait_acked(self, n, timeout=60):
        with self.cond:
            ok = self.cond.wait_for(lambda: self.up.acked_before(float("inf")) >= n or self.done, timeout=timeout)
        assert ok and self.up.acked_before(float("inf")) >= n, f"{self.up.name}: not acked to {n}: {self.up.errors}"

    def finish(self, timeout=60):
        self.feeder.put(pb.IngestRequest(finish=pb.IngestRequest.Finish(
            expected_sha256=self.up.sha, expected_size=len(self.up.data))))
        self.feeder.close()
        with self.cond:
            self.cond.wait_for(lambda: self.up.committed is not None or self.done, timeout=timeout)
        assert self.up.committed is not None, f"{self.up.name}: not committed: {self.up.errors}"

    def cancel(self):
        self.responses.cancel()
        self.reader.join(timeout=10)


def run_workload(stub, seed, log=print):
    """Drives the workload; returns (uploads, puts, open_streams). The
    caller kills the server afterwards with the open streams still open."""
    rng = random.Random(seed)
    uploads = {
        # Large chunks, fast: flushes cover several segments at once.
        "big": Upload("big", "pc-cust-a", wav_bytes(2 * 1024 * 1024 + 777, "big", rng), "finish"),
        # Small paced chunks: a flush per few KiB, so the records file
        # outgrows ROTATE_AT (1 MiB) and is rewritten (journal.new +
        # rename + fsync(dir)).
        "rot": Upload("rot", "pc-cust-a", wav_bytes(1900 * 1024 + 5, "rot", rng), "finish"),
        # Cut mid-way, resumed on a new stream, finished.
        "res": Upload("res", "pc-cust-b", wav_bytes(700 * 1024 + 3, "res", rng), "resume-finish"),
        # Cut, resumed, then left open with unacknowledged bytes in flight
        # when the server dies.
        "open": Upload("open", "pc-cust-b", wav_bytes(900 * 1024 + 11, "open", rng), "resume-open"),
        # Exactly two segments: the last segment is a full one.
        "even": Upload("even", "pc-cust-c", wav_bytes(2 * SEG, "even", rng), "finish"),
    }
    transcript = (b'{"messages": [' + b",".join(
        b'{"from": "customer", "text": "%s"}' % marker("put1", i) for i in range(40)) + b"]}")
    puts = [
        PutRec("put1", "pc-cust-c", transcript, "application/json", pb.CHAT_TRANSCRIPT),
        PutRec("put2", "pc-cust-a", wav_bytes(300 * 1024 + 9, "put2", rng), "audio/x-wav", pb.CALL_RECORDING),
        PutRec("put3", "pc-cust-d", wav_bytes(5 * 1024, "put3", rng), "audio/x-wav", pb.CALL_RECORDING),
    ]
    open_streams = []
    errors = []

    def drive(up, chunk, pace):
        try:
            s = Stream(stub, up)
            assert s.open() == 0
            n = len(up.data)
            if up.plan == "finish":
                s.send(0, n, chunk, pace)
                s.finish()
                return
            cut = n * 2 // 5
            s.send(0, cut, chunk, pace)
            s.wait_acked(cut)
            s.cancel()
            s = Stream(stub, up)
            resumed = s.open()
            assert resumed == cut, f"{up.name}: resumed at {resumed}, acked {cut}"
            if up.plan == "resume-finish":
                s.send(cut, n, chunk, pace)
                s.finish()
                return
            more = n * 4 // 5
            s.send(cut, more, chunk, pace)
            s.wait_acked(more)
            open_streams.append((s, more))
        except Exception as e:
            errors.append(f"{up.name}: {e!r}")
            raise

    def put(p, delay):
        time.sleep(delay)
        p.sent_at = time.time()
        r = stub.Put(pb.PutRequest(upload_id=p.upload_id, spec=p.spec(), data=p.data, expected_sha256=p.sha))
        p.committed_at = time.time()
        p.object_id = r.object.object_id
        assert r.object.sha256 == p.sha

    threads = [
        threading.Thread(target=drive, args=(uploads["big"], 64 * 1024, 0.004)),
        threading.Thread(target=drive, args=(uploads["rot"], 8 * 1024, 0.004)),
        threading.Thread(target=drive, args=(uploads["res"], 16 * 1024, 0.003)),
        threading.Thread(target=drive, args=(uploads["open"], 32 * 1024, 0.004)),
        threading.Thread(target=drive, args=(uploads["even"], 16 * 1024, 0.002)),
        threading.Thread(target=put, args=(puts[0], 0.05)),
        threading.Thread(target=put, args=(puts[1], 0.4)),
        threading.Thread(target=put, args=(puts[2], 0.9)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError("; ".join(errors))
    # The open upload: a last run of bytes the server never acknowledges
    # before it dies (it may or may not be flushed when the kill lands).
    for s, more in open_streams:
        s.send(more, len(s.up.data), 32 * 1024, 0)
    time.sleep(0.03)
    return uploads, puts, open_streams


def run_boot_workload(stub, seed, log=print):
    """The first start's workload: small, so every crash point of the
    start-up itself can be tried."""
    rng = random.Random(seed)
    uploads = {
        "boot1": Upload("boot1", "pc-cust-a", wav_bytes(150 * 1024 + 1, "boot1", rng), "finish"),
        "boot2": Upload("boot2", "pc-cust-b", wav_bytes(100 * 1024 + 7, "boot2", rng), "resume-open"),
    }
    puts = [PutRec("bput", "pc-cust-a", wav_bytes(3000, "bput", rng), "audio/x-wav", pb.CALL_RECORDING)]
    p = puts[0]
    p.sent_at = time.time()
    r = stub.Put(pb.PutRequest(upload_id=p.upload_id, spec=p.spec(), data=p.data, expected_sha256=p.sha))
    p.committed_at = time.time()
    p.object_id = r.object.object_id
    s = Stream(stub, uploads["boot1"])
    s.open()
    s.send(0, len(uploads["boot1"].data), 32 * 1024, 0.003)
    s.finish()
    u = uploads["boot2"]
    s = Stream(stub, u)
    s.open()
    s.send(0, 60 * 1024, 16 * 1024, 0.003)
    s.wait_acked(60 * 1024)
    s.send(60 * 1024, len(u.data), 16 * 1024, 0)
    time.sleep(0.03)
    return uploads, puts, [(s, 60 * 1024)]
