#!/usr/bin/env python3
"""Time to first byte of a sampled recording over a playback link (issue #5
point 7), from a warm server.

Starts the release binary on a fresh data directory, streams in a one-hour
16-bit 8 kHz WAV (57.6 MB) with the CLI, issues a playback link as a coach
and then, on one keep-alive HTTP/1.1 connection, times 64 KiB Range requests:
seeks into the middle of the recording against the same request at its very
start (the peer: a read that needs no seek), plus one whole-object read. A
seek decrypts only the segments covering the range (at most two 64 KiB
segments for a 64 KiB range; `range_reads_decrypt_only_the_covering_segments`
in tests/it proves it by corrupting every other segment), so the middle
should cost what the start costs.

    cargo build --release && python3 benches/ttfb.py [--requests 300]
"""

import argparse
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARY = Path(os.environ.get("RECVAULT_BIN", ROOT / "target" / "release" / "recvault"))
RANGE = 64 * 1024


def wav_hour(path):
    rate, seconds = 8000, 3600
    n = rate * seconds
    with open(path, "wb") as f:
        f.write(b"RIFF" + (36 + 2 * n).to_bytes(4, "little") + b"WAVEfmt ")
        f.write((16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little"))
        f.write(rate.to_bytes(4, "little") + (2 * rate).to_bytes(4, "little"))
        f.write((2).to_bytes(2, "little") + (16).to_bytes(2, "little") + b"data" + (2 * n).to_bytes(4, "little"))
        rng = random.Random(1)
        second = bytes(rng.getrandbits(8) for _ in range(2 * rate))
        for _ in range(seconds):
            f.write(second)
    return 44 + 2 * n


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    if not BINARY.exists():
        sys.exit(f"build the server first: cargo build --release ({BINARY})")
    data = tempfile.mkdtemp(prefix="recvault-ttfb-")
    server = subprocess.Popen(
        [str(BINARY), "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", data],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stdout.readline()
        grpc = "http://" + line.split()[3]
        admin = (Path(data) / "admin.token").read_text().strip()

        def cli(token, *argv):
            env = dict(os.environ, RECVAULT_TOKEN=token)
            return subprocess.run(
                [str(BINARY), *argv, "--server", grpc], env=env, check=True, capture_output=True, text=True
            ).stdout.strip()

        coach = cli(admin, "token", "create", "--name", "bench-coach", "--role", "coach", "--ttl", "1h")
        pbx = cli(admin, "token", "create", "--name", "bench-pbx", "--role", "ingest", "--ttl", "1h")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "hour.wav"
            size = wav_hour(path)
            oid = cli(pbx, "put", str(path), "--customer", "bench-1", "--kind", "call-recording", "--queue", "q")
        url = urllib.parse.urlsplit(cli(coach, "link", oid, "--purpose", "coaching"))
        conn = http.client.HTTPConnection(url.hostname, url.port)

        def timed(start, end):
            t0 = time.perf_counter()
            conn.request("GET", url.path, headers={"Range": f"bytes={start}-{end}"})
            r = conn.getresponse()
            first = r.read(1)
            t1 = time.perf_counter()
            rest = r.read()
            t2 = time.perf_counter()
            assert r.status == 206 and len(first) + len(rest) == end - start + 1, r.status
            return t1 - t0, t2 - t0

        rng = random.Random(7)
        for _ in range(20):  # warm the connection, the catalog cache and the page cache
            timed(0, RANGE - 1)
        middle, start = [], []
        for _ in range(args.requests):
            off = rng.randrange(size // 3, 2 * size // 3)
            middle.append(timed(off, off + RANGE - 1))
            start.append(timed(0, RANGE - 1))
        t0 = time.perf_counter()
        conn.request("GET", url.path)
        r = conn.getresponse()
        whole = len(r.read())
        full = time.perf_counter() - t0
        assert whole == size

        def row(name, samples):
            ttfb = [s[0] * 1e3 for s in samples]
            total = [s[1] * 1e3 for s in samples]
            return (
                f"| {name} | {pct(ttfb, 50):.2f} | {pct(ttfb, 99):.2f} | {pct(total, 50):.2f} | {pct(total, 99):.2f} |"
            )

        print(f"one-hour recording: {size} bytes; {args.requests} requests each; 64 KiB ranges; ms")
        print("| request | TTFB p50 | TTFB p99 | complete p50 | complete p99 |")
        print("|---|---|---|---|---|")
        print(row("seek into the middle third", middle))
        print(row("peer: first 64 KiB (no seek)", start))
        ratio = statistics.median([m[0] for m in middle]) / statistics.median([s[0] for s in start])
        print(f"median TTFB middle / start = {ratio:.2f}")
        print(f"whole object over the link: {size / full / 1e6:.0f} MB/s ({full:.2f} s)")
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", data], check=False)


if __name__ == "__main__":
    main()
