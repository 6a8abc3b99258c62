"""Record the server's file-system syscalls under strace while a workload
runs, choose crash points, build crash images with fsmodel, and check each
image with the real server."""

import collections
import concurrent.futures
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path

import grpc

import fsmodel
import workload
from rvclient import BINARY, BearerToken, Server, ServerFailed, operator_stub, pb, rpc

STRACE_STRSIZE = 64 << 20
KEEP_PER_FINDING = 3
CONFIG = '[ingest]\ncommit_interval = "20ms"\n'
# Opt-in: the ingest sync mode to test (`log`: one shared log synced per
# batch for every stream), for a server that has `ingest.sync`.
if os.environ.get("POWERCUT_INGEST_SYNC"):
    CONFIG += f'sync = "{os.environ["POWERCUT_INGEST_SYNC"]}"\n'
RPC_TIMEOUT = 60


def strace_cmd(trace_path):
    return ["strace", "-f", "--seccomp-bpf", "-ttt", "-T", "-y", "-xx", "-s", str(STRACE_STRSIZE),
            "-e", "trace=" + ",".join(fsmodel.TRACE_SYSCALLS), "-o", str(trace_path), "--"]


def current_umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


class Recording:
    """A traced run: the trace, the baseline it started from, and what the
    client saw."""

    def __init__(self, kind, workdir):
        self.kind = kind
        self.workdir = Path(workdir)
        self.root = self.workdir / "data"
        self.baseline = self.workdir / "baseline"
        self.trace = self.workdir / "trace.txt"
        self.config = self.workdir / "config.toml"
        self.uploads = {}
        self.puts = []
        self.token = None
        self.token_at = None
        self.events = None
        self.t_start = None
        self.t_killed = None

    def customers(self):
        return sorted({u.customer for u in self.uploads.values()} | {p.customer for p in self.puts})

    def known_objects(self):
        """object_id -> (name, data, sha) for every object the run made."""
        out = {}
        for u in self.uploads.values():
            if u.object_id:
                out[u.object_id] = (u.name, u.data, u.sha)
        for p in self.puts:
            if p.object_id:
                out[p.object_id] = (p.name, p.data, p.sha)
        return out


def _kill_traced(server):
    """SIGKILL the server under strace (strace's child), then wait for strace."""
    pid = server.proc.pid
    kids = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        pass
    t = time.time()
    for k in kids:
        os.kill(int(k), signal.SIGKILL)
    server.proc.wait(timeout=60)
    server.kill()
    return t


class RecordingFailed(Exception):
    pass


def record(kind, workdir, seed, log=print):
    """See _record; on failure, says where (with the server's log tail)."""
    try:
        return _record(kind, workdir, seed, log)
    except Exception as e:
        logs = []
        for name in ("setup.log", "server.log"):
            p = Path(workdir) / name
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()
                logs.append(f"--- {name} (last lines) ---\n" + "\n".join(
                    l for l in tail if not l.startswith("[pid") and "resumed>" not in l)[-2500:])
        raise RecordingFailed(f"the {kind} recording failed: {e!r}\n" + "\n".join(logs)) from e


def _record(kind, workdir, seed, log=print):
    """kind 'steady': a data directory made by an earlier (untraced) run is
    the durable baseline, then a traced restart runs the full workload.
    kind 'boot': the traced run is the very first start on an empty data
    directory, with a small workload."""
    rec = Recording(kind, workdir)
    rec.workdir.mkdir(parents=True, exist_ok=True)
    rec.config.write_text(CONFIG)
    rec.root.mkdir(mode=0o700)
    if kind == "steady":
        s = Server(rec.root, config=rec.config, log=rec.workdir / "setup.log").start()
        ch = s.channel()
        stub, rec.token = operator_stub(ch, rec.root)
        ch.close()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=60)
        s.kill()
        rec.token_at = 0.0
    os.sync()
    shutil.copytree(rec.root, rec.baseline, symlinks=True)
    server = Server(rec.root, config=rec.config, wrapper=strace_cmd(rec.trace), log=rec.workdir / "server.log")
    rec.t_start = time.time()
    server.start()
    ch = None
    try:
        ch = server.channel()
        if rec.token is None:
            stub, rec.token = operator_stub(ch, rec.root)
            rec.token_at = time.time()
        else:
            stub = rpc.RecvaultStub(grpc.intercept_channel(ch, BearerToken(rec.token)))
        if kind == "steady":
            rec.uploads, rec.puts, _open = workload.run_workload(stub, seed, log)
        else:
            rec.uploads, rec.puts, _open = workload.run_boot_workload(stub, seed, log)
    finally:
        rec.t_killed = _kill_traced(server)
        if ch is not None:
            ch.close()
    return rec


# --------------------------------------------------------------------------
# crash points

def classify(model, call):
    """A label for the file a call touched (stratifies the sample)."""
    a = call.split()
    path = None
    try:
        if call.name in ("linkat", "renameat", "renameat2"):
            path = model.resolve(a[2], a[3])
        elif call.name in ("openat", "unlinkat", "mkdirat", "fchmodat"):
            path = model.resolve(a[0], a[1])
        elif call.name in ("link", "rename", "symlink"):
            path = fsmodel.parse_str(a[1]).decode(errors="replace")
        elif a and a[0].startswith('"'):
            path = fsmodel.parse_str(a[0]).decode(errors="replace")
        elif a:
            path = fsmodel.parse_fd(a[0])[1]
    except (fsmodel.ModelError, IndexError):
        path = None
    if path and path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    comps = model.rel(path) if path and path.startswith("/") else None
    if comps is None:
        return "?"
    if not comps:
        return "dir:data"
    name = comps[-1]
    node = model.lookup(comps)
    if (node is not None and node.kind == "dir") or call.name in ("mkdir", "mkdirat"):
        return "dir:" + "/".join(c if len(c) < 30 else "*" for c in comps)
    for suffix in (".journal.new", ".journal", ".seg"):
        if name.endswith(suffix):
            return "spool" + suffix
    if name.startswith("catalog.sqlite") or name.startswith("audit.sqlite"):
        base, rest = name.split(".sqlite", 1)
        return base + (rest or "-db")
    if comps[0] == "objects":
        return "objects:staging" if "#" in name else "objects:file"
    return name


Point = collections.namedtuple("Point", "idx variant label t desc")


def survey(rec):
    """Replays the whole trace once: per event index, what changed, and
    the crash points worth trying. Also returns the final model."""
    model = fsmodel.Model(str(rec.root), umask=current_umask())
    model.load_baseline(str(rec.baseline))
    rows = []  # (idx, cat, label, t_exit, durable_version, desc)
    for i, ev in enumerate(rec.events):
        if ev.kind != "call":
            model.apply(ev)
            continue
        c = ev.call
        label = classify(model, c)
        changed = model.apply(ev)
        if not changed:
            continue
        if c.name in fsmodel.SYNC_CALLS or c.name in ("sync", "syncfs"):
            cat = "sync"
        elif c.name in ("write", "writev", "pwrite64", "pwritev", "pwritev2", "ftruncate", "truncate", "fallocate"):
            cat = "data"
        else:
            cat = "ns"
        rows.append((i, cat, label, c.t_exit, model.durable_version, c.describe(str(rec.root))))
    return model, rows


def choose_points(rows, budget, rng, shares=(55, 20, 25)):
    """Durable images at the end of each durable state (sampled, stratified
    by the file whose sync made the state); torn images after writes;
    metadata-prefix images after namespace operations."""
    if not rows:
        return []
    # The end of each durable version's span: the last event before the
    # next sync changes durable state (the strictest time for the acks).
    spans = {}
    made_by = {}
    for (i, cat, label, t, v, desc) in rows:
        spans[v] = (i, t, desc)
        if cat == "sync" and v not in made_by:
            made_by[v] = (label, desc)
    durable = []
    for v, (i, t, desc) in spans.items():
        label, sdesc = made_by.get(v, ("start", "trace start"))
        durable.append(Point(i, "durable", label, t, f"after {sdesc}; last op {desc}"))
    writes = [Point(i, "torn", label, t, desc) for (i, cat, label, t, v, desc) in rows if cat == "data"]
    names = [Point(i, "meta", label, t, desc) for (i, cat, label, t, v, desc) in rows if cat == "ns"]
    n_d = max(1, budget * shares[0] // 100)
    n_n = max(1, budget * shares[1] // 100)
    n_w = max(1, budget - n_d - n_n)
    chosen = _stratified(durable, n_d, rng, always=[durable[-1]])
    chosen += _stratified(names, n_n, rng)
    chosen += _stratified(writes, n_w, rng)
    return sorted(set(chosen), key=lambda p: (p.idx, p.variant))


def _stratified(points, n, rng, always=()):
    """Round-robin over labels, random within each."""
    by = collections.defaultdict(list)
    for p in points:
        by[p.label].append(p)
    for v in by.values():
        rng.shuffle(v)
    out = list(always)
    labels = sorted(by)
    while len(out) < n and any(by.values()):
        for lab in labels:
            if by[lab] and len(out) < n:
                p = by[lab].pop()
                if p not in out:
                    out.append(p)
    return out


# --------------------------------------------------------------------------
# checking one image

Finding = collections.namedtuple("Finding", "kind detail")
# Ciphertext of a committed object kept under a second name: a storage
# leak, not a loss; reported, fails the test unless POWERCUT_STRICT=0.
SOFT = {"leak-staging"}
HARD = {"start", "lost-ack", "lost-commit", "missing-object", "bad-content", "unknown-object", "resume-failed",
        "plaintext", "audit", "locked-out", "lost-token", "put-failed", "leak-spool", "leak-object",
        "lost-upload"}


class ImageCheck:
    def __init__(self, rec, image, point, log_dir):
        self.rec = rec
        self.image = Path(image)
        self.point = point
        self.T = point.t
        self.log_dir = log_dir
        self.findings = []
        self.stats = collections.Counter()

    def find(self, kind, detail):
        self.findings.append(Finding(kind, detail.replace(str(self.image), "$IMAGE")))

    def run(self):
        self._grep_plaintext("crash image")
        server = Server(self.image, config=self.rec.config, log=self.log_dir / "server.log")
        try:
            server.start()
        except ServerFailed as e:
            last = [l for l in e.stderr.splitlines() if l.strip()][-3:]
            self.find("start", "the server refuses to start: " + " | ".join(last))
            return
        try:
            ch = server.channel()
            try:
                self._check(ch)
            finally:
                ch.close()
        except (grpc.RpcError, grpc.FutureTimeoutError) as e:
            if server.proc.poll() is not None:
                # It announced itself, then died (a key opened after the bind).
                last = [l for l in server.read_stderr().splitlines() if l.strip()][-2:]
                self.find("start", "the server exits right after starting: " + " | ".join(last))
                server.kill()
                return
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else "no gRPC channel"
            self.find("resume-failed", f"unexpected RPC error {detail}")
        finally:
            server.kill()
        # Recovery paths the image exercised (from the server's log).
        self.stats["torn segment tails cut"] += server.stderr.count("cut a torn segment")
        self.stats["torn record tails cut"] += server.stderr.count("cut a torn record")
        self.stats["orphan spool files swept"] += sum(
            int(n) for n in re.findall(r"orphan_journals=(\d+)", server.stderr))
        self._grep_plaintext("image after recovery")
        self._audit_verify()

    def _stub(self, ch):
        stub = rpc.RecvaultStub(grpc.intercept_channel(ch, BearerToken(self.rec.token)))
        try:
            stub.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
            return stub
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        if self.rec.token_at is not None and self.rec.token_at < self.T:
            self.find("lost-token", "a token whose CreateToken was answered before the crash is unknown")
        admin = self.image / "admin.token"
        try:
            stub, _ = operator_stub(ch, self.image)
            return stub
        except (OSError, grpc.RpcError) as e:
            what = "missing" if not admin.exists() else f"{admin.stat().st_size} bytes, refused"
            self.find("locked-out", f"no token works: admin.token {what} ({type(e).__name__})")
            return None

    def _list_all(self, stub):
        objs, token = [], ""
        while True:
            r = stub.List(pb.ListRequest(page_size=1000, page_token=token), timeout=RPC_TIMEOUT)
            objs.extend(r.objects)
            token = r.next_page_token
            if not token:
                return objs

    def _read(self, stub, object_id):
        return b"".join(m.data for m in stub.Get(
            pb.GetRequest(object_id=object_id, purpose=pb.LEGAL), timeout=RPC_TIMEOUT))

    def _verify_object(self, stub, info, known, when):
        name, data, sha = known
        try:
            got = self._read(stub, info.object_id)
        except grpc.RpcError as e:
            self.find("missing-object", f"{when}: {name} ({info.object_id}) is listed but cannot be read: "
                                        f"{e.code().name}: {e.details()[:160]}")
            return False
        if got != data or info.sha256 != sha or info.size != len(data):
            self.find("bad-content", f"{when}: {name} ({info.object_id}) reads {len(got)} bytes "
                                     f"(want {len(data)}), sha ok={hashlib.sha256(got).digest() == sha}")
            return False
        self.stats["objects verified"] += 1
        return True

    def _check(self, ch):
        stub = self._stub(ch)
        if stub is None:
            return
        known = self.rec.known_objects()
        # 1. What the catalog lists must read back whole and right.
        listed = {o.object_id: o for o in self._list_all(stub)}
        for oid, info in listed.items():
            if oid not in known:
                self.find("unknown-object", f"the catalog lists {oid}, which the client never made")
                continue
            self._verify_object(stub, info, known[oid], "after the crash")
        # 2. What was committed (answered) before the crash must be listed.
        for u in list(self.rec.uploads.values()) + self.rec.puts:
            if u.committed_at is not None and u.committed_at < self.T:
                self.stats["commits required"] += 1
                if u.object_id not in listed:
                    self.find("lost-commit", f"{u.name}: committed (answer received "
                                             f"{self.T - u.committed_at:.4f}s before the crash) but not listed")
        # 3. Garbage collection: a retention sweep leaves spool files only
        #    for unfinished uploads.
        self._sweep(stub)
        spool = sorted(p.name for p in (self.image / "spool").glob("*")) if (self.image / "spool").is_dir() else []
        objects = sorted(str(p.relative_to(self.image / "objects")) for p in (self.image / "objects").rglob("*")
                         if p.is_file()) if (self.image / "objects").is_dir() else []
        # 4. Every streamed upload resumes from at least what was acked,
        #    and finishes bit-exact.
        unfinished = set()
        final = {}  # name -> object id after driving everything to commit
        for u in self.rec.uploads.values():
            oid = self._resume(stub, u, listed, final)
            if oid:
                unfinished.add(oid)
        # 5. Puts are idempotent by upload id.
        for p in self.rec.puts:
            try:
                r = stub.Put(pb.PutRequest(upload_id=p.upload_id, spec=p.spec(), data=p.data, expected_sha256=p.sha),
                             timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                self.find("put-failed", f"{p.name}: retried Put fails: {e.code().name}: {e.details()[:160]}")
                continue
            final[p.name] = r.object.object_id
            if p.object_id not in listed:
                unfinished.add(r.object.object_id)
            if r.object.sha256 != p.sha:
                self.find("bad-content", f"{p.name}: retried Put answers another SHA-256")
            self._verify_object(stub, r.object, (p.name, p.data, p.sha), "after the retried Put")
        # GC verdict (on the listing taken right after the sweep).
        for name in spool:
            if name == "wal" and (self.image / "spool" / "wal").is_dir():
                # The shared ingest log (`ingest.sync = "log"`): start-up
                # moved what the cut left into the journals; only log
                # generations belong here.
                for g in (self.image / "spool" / "wal").iterdir():
                    if not re.fullmatch(r"[0-9]{20}\.log", g.name):
                        self.find("leak-spool", f"spool/wal/{g.name} is not an ingest log generation")
                continue
            oid = fsmodel_spool_id(name)
            if oid is None or oid not in unfinished:
                self.find("leak-spool", f"spool/{name} survives a sweep but its upload is "
                                        f"{'unknown' if oid not in known else 'committed'}")
        for rel in objects:
            oid = rel.rsplit("/", 1)[-1]
            if "#" in oid:
                self.find("leak-staging", f"objects/{rel}: a staging name of a Put left behind (never swept)")
            elif oid not in known:
                self.find("leak-object", f"objects/{rel}: not an object of any upload")
        # 6. Afterwards everything is committed and listed.
        listed = {o.object_id: o for o in self._list_all(stub)}
        for name, oid in final.items():
            if oid not in listed:
                self.find("lost-commit", f"{name}: not listed even after finishing it again")

    def _sweep(self, stub):
        for attempt in range(40):
            try:
                stub.RunRetention(pb.RunRetentionRequest(), timeout=RPC_TIMEOUT)
                self.stats["sweeps"] += 1
                return
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) \
                        and "sweep" not in (e.details() or ""):
                    raise
                time.sleep(0.05)
        self.find("resume-failed", "the retention sweep stayed busy")

    def _resume(self, stub, rec_u, listed, final):
        """Reopens the upload, checks its durable offset against what was
        acked before the crash, sends the rest and finishes. Returns the
        object id if it was unfinished at reopen."""
        acked = rec_u.acked_before(self.T)
        committed_before = rec_u.committed_at is not None and rec_u.committed_at < self.T
        opened_before = bool(rec_u.acks) and rec_u.acks[0][0] < self.T
        u = rec_u.fork()
        s = workload.Stream(stub, u)
        try:
            d = s.open()
        except AssertionError as e:
            self.find("resume-failed", f"{u.name}: reopen failed: {u.errors[-1:] or e}")
            return None
        opened = s.opened
        final[u.name] = opened.object_id
        if opened_before and opened.object_id != rec_u.object_id:
            self.find("lost-upload", f"{u.name}: opened before the crash as {rec_u.object_id}, "
                                     f"reopens as a new object {opened.object_id}")
        if opened.committed:
            self.stats["reopened committed"] += 1
            if opened.object_id not in listed:
                self.find("lost-commit", f"{u.name}: reopens committed but its object was not listed")
            s.feeder.put(pb.IngestRequest(finish=pb.IngestRequest.Finish()))
            s.feeder.close()
            s.reader.join(timeout=RPC_TIMEOUT)
            return None
        if committed_before:
            self.find("lost-commit", f"{u.name}: committed before the crash, reopens unfinished at {d}")
        if d < acked:
            self.find("lost-ack", f"{u.name}: acked {acked} bytes before the crash, reopens at durable offset {d}"
                                  f" (lost {acked - d})")
        elif acked:
            self.stats["acks verified"] += 1
            self.stats["acked bytes verified"] += acked
        if d > len(u.data):
            self.find("resume-failed", f"{u.name}: durable offset {d} beyond the {len(u.data)} bytes sent")
            s.cancel()
            return opened.object_id
        s.send(d, len(u.data), 256 * 1024, 0)
        try:
            s.finish(timeout=RPC_TIMEOUT)
        except AssertionError:
            self.find("resume-failed", f"{u.name}: finish after resume at {d} failed: {u.errors[-1:]}")
            return opened.object_id
        if u.committed.sha256 != u.sha:
            self.find("bad-content", f"{u.name}: committed with another SHA-256 after resume at {d}")
        self._verify_object(stub, u.committed, (u.name, u.data, u.sha), f"after resume at {d}")
        self.stats["uploads resumed"] += 1
        return opened.object_id

    def _grep_plaintext(self, what):
        for dirpath, _, files in os.walk(self.image):
            for f in files:
                p = Path(dirpath, f)
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                if b"PLAINTEXT-MARK:" in data:
                    at = data.index(b"PLAINTEXT-MARK:")
                    self.find("plaintext", f"{what}: {p.relative_to(self.image)} holds {data[at:at + 40]!r}")

    def _audit_verify(self):
        r = subprocess.run([str(BINARY), "audit", "verify", "--data-dir", str(self.image)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or "intact" not in r.stdout:
            self.find("audit", f"audit verify: {(r.stdout + r.stderr).strip()[-300:]}")


def fsmodel_spool_id(name):
    for suffix in (".journal.new", ".journal", ".seg"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


# --------------------------------------------------------------------------
# the whole run

class Result:
    def __init__(self):
        self.points = 0
        self.images = 0
        self.by_variant = collections.Counter()
        self.stats = collections.Counter()
        self.findings = []  # (point, variant notes, Finding, kept image)
        self.model_errors = []


def run_crash_points(rec, points, workers, seed, keep_dir, tag=None, **model_opts):
    """Builds each point's image in order (one replay) and checks them on
    `workers` threads. `model_opts` go to fsmodel.Model (journal=True for
    the ext4-like model; ignore_sync=regex for negative controls)."""
    result = Result()
    result.points = len(points)
    model = fsmodel.Model(str(rec.root), umask=current_umask(), **model_opts)
    model.load_baseline(str(rec.baseline))
    by_idx = collections.defaultdict(list)
    for p in points:
        by_idx[p.idx].append(p)
    scratch = Path(rec.workdir) / "images"
    scratch.mkdir(exist_ok=True)
    lock = threading.Lock()
    kept_per_finding = collections.Counter()

    def check(p, image, notes):
        log_dir = image.parent / (image.name + ".logs")
        log_dir.mkdir()
        pristine = image.parent / (image.name + ".crash")
        if keep_dir:
            shutil.copytree(image, pristine, symlinks=True)
        c = ImageCheck(rec, image, p, log_dir)
        try:
            c.run()
        except Exception:
            c.find("resume-failed", "checker crashed: " + traceback.format_exc()[-600:])
        kept = None
        if c.findings and keep_dir:
            # The first few images of each kind of finding: the crash image
            # as built, and the server's log on it.
            with lock:
                keys = {(f.kind, _norm(f.detail)) for f in c.findings}
                wanted = any(kept_per_finding[k] < KEEP_PER_FINDING for k in keys)
                if wanted:
                    kept_per_finding.update(keys)
            if wanted:
                kept = Path(keep_dir) / image.name
                shutil.copytree(pristine, kept, symlinks=True)
                shutil.copytree(log_dir, Path(str(kept) + ".logs"))
        for d in (image, log_dir, pristine):
            shutil.rmtree(d, ignore_errors=True)
        with lock:
            result.images += 1
            result.by_variant[p.variant] += 1
            result.stats.update(c.stats)
            for f in c.findings:
                result.findings.append((p, notes, f, kept))
        return c

    futures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        n = 0
        for i, ev in enumerate(rec.events):
            model.apply(ev)
            for p in by_idx.get(i, ()):
                n += 1
                image = scratch / f"{tag or rec.kind}-{n:03d}-ev{p.idx}-{p.variant}"
                rng = random.Random(f"{seed}:{p.idx}:{p.variant}")
                notes = model.build_image(str(image), p.variant, rng)
                futures.append(pool.submit(check, p, image, notes))
                # Bound the images on disk.
                while sum(not f.done() for f in futures) > 2 * workers:
                    time.sleep(0.02)
        for f in futures:
            f.result()
    return result


def summarize(rec, result, elapsed, seed, tag=None):
    tag = tag or rec.kind
    lines = [
        f"[powercut:{tag}] seed {seed}: {result.points} crash points, {result.images} images checked "
        f"({dict(result.by_variant)}) in {elapsed:.0f}s",
        f"[powercut:{tag}] " + ", ".join(f"{k}: {v}" for k, v in sorted(result.stats.items())),
    ]
    grouped = collections.OrderedDict()
    for p, notes, f, kept in result.findings:
        grouped.setdefault((f.kind, _norm(f.detail)), []).append((p, notes, f, kept))
    for (kind, _), items in grouped.items():
        items.sort(key=lambda it: it[0].idx)
        p, notes, f, _kept = items[0]
        lines.append(f"[powercut:{tag}] FINDING {kind} x{len(items)}: {f.detail}")
        lines.append(f"    first at event {p.idx} ({p.variant}, t={p.t:.6f}): {p.desc}")
        if p.variant != "durable":
            lines.append(f"    torn/meta choices: {[n for n in notes][:6]}")
        kept = sorted({str(it[3]) for it in items if it[3]})
        if kept:
            lines.append(f"    image(s) kept at {', '.join(kept)}")
    return "\n".join(lines)


def _norm(detail):
    """Groups findings that differ only in numbers and ids."""
    return re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "#", detail)
