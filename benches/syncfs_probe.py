"""What one syncfs(2) costs with N files each holding one small unsynced
append: the cost of one round of the spool's group commit
(`ingest.sync = "filesystem"`) with N live streams. BENCHMARKS.md,
"Concurrent live calls".

    python3 benches/syncfs_probe.py [DIR] [N ...]     # default: target/syncfs-probe 1000 3000 10000
"""

import ctypes
import os
import sys
import time
from pathlib import Path

libc = ctypes.CDLL("libc.so.6", use_errno=True)
where = Path(sys.argv[1] if len(sys.argv) > 1 else "target/syncfs-probe")
counts = [int(n) for n in sys.argv[2:]] or [1000, 3000, 10000]
where.mkdir(parents=True, exist_ok=True)
for n in counts:
    fds = [os.open(where / f"f{i}", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600) for i in range(n)]
    dfd = os.open(where, os.O_RDONLY)
    rounds = []
    for _ in range(5):
        t = time.monotonic()
        for fd in fds:
            os.write(fd, b"x" * 800)  # 100 ms of G.711 plus record overhead
        wrote = time.monotonic() - t
        t = time.monotonic()
        if libc.syncfs(dfd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        rounds.append((wrote * 1e3, (time.monotonic() - t) * 1e3))
    print(f"{n:6} files: " + "  ".join(f"write {w:5.1f} ms, syncfs {s:6.1f} ms" for w, s in rounds))
    for fd in fds:
        os.close(fd)
    os.close(dfd)
    for i in range(n):
        os.unlink(where / f"f{i}")
