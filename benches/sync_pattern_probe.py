"""The local journal's write pattern for a bulk upload, without recvault:
write 4 MiB to one file and fdatasync it, then 32 KiB to a second file
and fdatasync that (the segments and the tail records of one flush), over
1 GiB; beside it the peer of `recvault loadgen bulk` (the same GiB
written, then one fsync). BENCHMARKS.md, "Bulk ingest over loopback".

    python3 benches/sync_pattern_probe.py [DIR] [ROUNDS]     # default: target/sync-probe 3
"""

import os
import sys
import time
from pathlib import Path

where = Path(sys.argv[1] if len(sys.argv) > 1 else "target/sync-probe")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
where.mkdir(parents=True, exist_ok=True)
BATCH = os.urandom(4 << 20)
TAIL = os.urandom(32 << 10)
BATCHES = 256  # 1 GiB


def gbps(seconds):
    return BATCHES * len(BATCH) / seconds / 1e9


def peer():
    path = where / "peer.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.monotonic()
    for _ in range(BATCHES):
        os.write(fd, BATCH)
    os.fsync(fd)
    took = time.monotonic() - t
    os.close(fd)
    path.unlink()
    return gbps(took)


def journal(with_tail):
    seg, rec = where / "seg.bin", where / "rec.bin"
    fs = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fr = os.open(rec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.monotonic()
    for _ in range(BATCHES):
        os.write(fs, BATCH)
        os.fdatasync(fs)
        if with_tail:
            os.write(fr, TAIL)
            os.fdatasync(fr)
    took = time.monotonic() - t
    os.close(fs)
    os.close(fr)
    seg.unlink()
    rec.unlink()
    return gbps(took)


for _ in range(rounds):
    print(
        f"peer (write 1 GiB, one fsync) {peer():.2f} GB/s | "
        f"4 MiB + fdatasync each {journal(False):.2f} GB/s | "
        f"4 MiB + fdatasync, 32 KiB to a second file + fdatasync {journal(True):.2f} GB/s"
    )
