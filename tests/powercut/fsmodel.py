"""Parse an strace log of the server's file-system syscalls and replay it
against a model of what a power cut keeps.

The model (a small ALICE/CrashMonkey):

- An inode (file or directory) has a *volatile* state (what the running
  process sees) and a *durable* state (what survives a power cut).
- fsync/fdatasync of a file makes its content and size durable: the
  content as it was when the call *entered* (a write racing the sync is not
  counted), committed when the call *returns* successfully.
- A directory's entries (create, mkdir, rename, link, unlink) are volatile
  until the directory itself is fsynced; that makes its entries, as they
  were at entry to the call, durable. A new file or directory therefore
  exists after a crash only if its parent was fsynced after it was made,
  and all the way up: a new directory's own entry needs its parent's fsync.
- A new inode's durable content is empty until it is synced.
- sync()/syncfs() make everything durable.
- Nothing else is durable: no ext4 journal ordering, no data=ordered, no
  auto_da_alloc. This is stricter than ext4/XFS (where one fsync commits
  every earlier metadata change of the whole file system) and is what
  POSIX promises.

Crash images are built from the durable state ("durable"), or with some of
the unsynced state reaching disk as well:

- "torn": each file keeps its durable content plus an in-order prefix of
  the writes/truncations made since its last sync, the last one cut short
  and optionally replaced by zeros or random bytes.
- "meta": as "torn", and in addition a prefix (in global order) of the
  namespace operations not yet made durable by a directory fsync reached
  disk, as a journaling file system commits metadata (ext4 data=writeback
  behaves so; it also covers ext4's "zero-length file after a crash").

SQLite's `-shm` files are written through mmap, which strace cannot see;
they are left out of every image (SQLite rebuilds the WAL index from the
WAL on open, as after a real power cut). Any other shared writable
mapping, or a syscall that writes a file in a way this model does not
follow (copy_file_range, sendfile, io_uring, ...), raises ModelError rather
than silently producing wrong images.
"""

import os
import random
import re

# Syscalls to trace: everything that changes a file or the namespace, plus
# what the model needs to follow file descriptors and offsets.
TRACE_SYSCALLS = [
    "open", "openat", "openat2", "creat", "close", "close_range",
    "dup", "dup2", "dup3", "fcntl",
    "read", "pread64",  # not modelled; kept out (see below)
    "write", "writev", "pwrite64", "pwritev", "pwritev2",
    "lseek", "ftruncate", "truncate", "fallocate",
    "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
    "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir",
    "fsync", "fdatasync", "sync_file_range", "sync", "syncfs", "msync",
    "mmap", "copy_file_range", "sendfile", "splice", "io_uring_setup",
    "chmod", "fchmod", "fchmodat",
]
# Reads are not needed by the model; leave them out of the trace.
TRACE_SYSCALLS = [s for s in TRACE_SYSCALLS if s not in ("read", "pread64")]

SYNC_CALLS = {"fsync", "fdatasync"}
GLOBAL_SYNC_CALLS = {"sync", "syncfs"}


class ModelError(Exception):
    """The trace contains something the model does not follow: the
    replay would be wrong, so stop instead."""


# --------------------------------------------------------------------------
# strace output parsing (strace -f -ttt -T -y -xx -s BIG)

_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\) += (.+?)(?: <(\d+\.\d+)>)?$", re.S)
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$", re.S)
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$", re.S)
_HEXSTR = re.compile(r'^"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?$')
_FDANN = re.compile(r"^(-?\d+|AT_FDCWD)(?:<((?:\\x[0-9a-f]{2})*)>(\(deleted\))?)?$")
_IOV = re.compile(r'iov_base="((?:\\x[0-9a-f]{2})*)"(\.\.\.)?, iov_len=(\d+)')


def unhex(s):
    return bytes.fromhex(s.replace("\\x", ""))


_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}(),]')


def split_args(s):
    """Splits an strace argument list at top-level commas (strings are
    skipped whole: with -xx they hold only \\xNN escapes)."""
    out, depth, start = [], 0, 0
    for m in _TOKENS.finditer(s):
        c = m.group(0)
        if c[0] == '"':
            continue
        if c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif depth == 0:
            out.append(s[start : m.start()].strip())
            start = m.end()
    tail = s[start:].strip()
    if tail or out:
        out.append(tail)
    return out


def parse_str(a):
    m = _HEXSTR.match(a)
    if not m:
        raise ModelError(f"not a string argument: {a[:80]}")
    if m.group(2):
        raise ModelError("strace truncated a string: raise -s")
    return unhex(m.group(1))


def parse_fd(a):
    """'12<\\x2f...>' -> (12, b'/path'); 'AT_FDCWD<...>' -> ('AT_FDCWD', path)."""
    m = _FDANN.match(a)
    if not m:
        raise ModelError(f"not an fd argument: {a[:80]}")
    fd = m.group(1)
    path = unhex(m.group(2)).decode("utf-8", "surrogateescape") if m.group(2) is not None else None
    if path is not None and m.group(3):
        path += " (deleted)"
    return (fd if fd == "AT_FDCWD" else int(fd)), path


def iov_bytes(arg):
    """The bytes of an strace iovec array argument, in order."""
    parts = []
    for hx, trunc, ln in _IOV.findall(arg):
        if trunc:
            raise ModelError("strace truncated an iovec: raise -s")
        parts.append(unhex(hx))
    return b"".join(parts)


def parse_int(a):
    a = a.strip()
    if re.fullmatch(r"0[0-7]+", a):
        return int(a, 8)
    return int(a, 0)


def parse_mode(a):
    """'0644', 'S_IFREG|0644' or '0' -> the permission bits."""
    m = re.search(r"(?:^|\|)(0[0-7]*)$", a.strip())
    return int(m.group(1), 8) if m else 0


class Call:
    """One completed syscall: name, raw args, return value, times."""

    __slots__ = ("seq", "tid", "name", "args", "ret", "err", "t_entry", "t_exit", "line", "_split")

    def __init__(self, seq, tid, name, args, ret, t_entry, t_exit, line):
        self.seq = seq
        self.tid = tid
        self.name = name
        self.args = args
        self.t_entry = t_entry
        self.t_exit = t_exit
        self.line = line
        self._split = None
        self.err = None
        r = ret.strip()
        if r.startswith("?"):
            self.ret = None
            self.err = "killed"
        elif r.startswith("-1 "):
            self.ret = -1
            self.err = r.split()[1]
        else:
            m = re.match(r"^(-?(?:0x[0-9a-f]+|\d+))", r)
            self.ret = int(m.group(1), 0) if m else None
            if m is None:
                self.err = r

    @property
    def ok(self):
        return self.err is None

    def split(self):
        if self._split is None:
            self._split = split_args(self.args)
        return self._split

    def describe(self, root=None):
        """A readable form of the call (strings shortened, paths decoded)."""
        parts = []
        for a in self.split():
            if a.startswith('"'):
                try:
                    b = parse_str(a)
                except ModelError:
                    b = b"?"
                if _printable(b) and (len(b) <= 48 or b.startswith(b"/")):
                    text = b.decode()
                    if root and text.startswith(root):
                        text = "$DATA" + text[len(root):]
                    parts.append(repr(text))
                else:
                    parts.append(f"<{len(b)} bytes>")
            else:
                m = _FDANN.match(a)
                if m and m.group(1) == "AT_FDCWD":
                    parts.append("AT_FDCWD")
                elif m and m.group(2) is not None:
                    p = unhex(m.group(2)).decode(errors="replace")
                    if root and p.startswith(root):
                        p = "$DATA" + p[len(root):]
                    parts.append(f"{m.group(1)}<{p}>")
                elif a.startswith("[{iov_base"):
                    parts.append(f"<iov {sum(int(x[2]) for x in _IOV.findall(a))} bytes>")
                else:
                    parts.append(a if len(a) < 60 else a[:57] + "...")
        ret = "ok" if self.ok else self.err
        return f"{self.name}({', '.join(parts)}) = {self.ret if self.ok else ret}"


def _printable(b):
    return all(32 <= c < 127 for c in b)


class Event:
    """Either a completed call, or the entry of a sync (whose snapshot the
    replayer takes there)."""

    __slots__ = ("kind", "call", "tid", "fd", "t", "name")

    def __init__(self, kind, call=None, tid=None, fd=None, t=None, name=None):
        self.kind = kind
        self.call = call
        self.tid = tid
        self.fd = fd
        self.t = t
        self.name = name


def parse_trace(path, unfinished=None):
    """Events in the order strace saw them: a completed call is placed at
    its exit; a sync also gets a 'sync-begin' event at its entry.

    `unfinished`, a dict if given, receives the data writes the trace
    leaves unfinished: the process was killed inside them, so strace never
    saw them return, and the kernel may have done all, part or none of
    each (a write to a file checks for a fatal signal between pages).
    {file path: [payload, ...]}, for `compare_with_disk`."""
    events = []
    pending = {}
    seq = 0
    with open(path, "r", encoding="ascii", errors="strict") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            m = _LINE.match(raw)
            if not m:
                continue
            tid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
            if rest.startswith("---") or rest.startswith("+++"):
                continue
            mu = _UNFINISHED.match(rest)
            if mu:
                name, args = mu.group(1), mu.group(2)
                pending[tid] = (name, args, ts)
                if name in SYNC_CALLS or name in GLOBAL_SYNC_CALLS:
                    fd = _first_fd(args) if name != "sync" else None
                    events.append(Event("sync-begin", tid=tid, fd=fd, t=ts, name=name))
                if name == "close":
                    # The kernel frees the descriptor on entry: another
                    # thread may get the same number before this returns.
                    events.append(Event("close-begin", tid=tid, fd=_first_fd(args), t=ts, name=name))
                continue
            mr = _RESUMED.match(rest)
            if mr:
                name = mr.group(1)
                if tid not in pending or pending[tid][0] != name:
                    raise ModelError(f"resumed without start: {raw[:200]}")
                pname, pargs, t0 = pending.pop(tid)
                if name == "close":
                    continue  # applied at its entry (close-begin)
                text = f"{name}({pargs}{mr.group(2)}"
                mc = _CALL.match(text)
                if not mc:
                    raise ModelError(f"cannot parse: {text[:200]}")
                dur = float(mc.group(4)) if mc.group(4) else ts - t0
                seq += 1
                call = Call(seq, tid, name, mc.group(2), mc.group(3), t0, max(ts, t0 + dur), raw)
                _note_killed_write(unfinished, call)
                events.append(Event("call", call))
                continue
            mc = _CALL.match(rest)
            if not mc:
                # e.g. "exit_group(0) = ?" or a call cut by the kill
                if rest.endswith("= ?"):
                    continue
                raise ModelError(f"cannot parse: {rest[:200]}")
            name = mc.group(1)
            dur = float(mc.group(4)) if mc.group(4) else 0.0
            seq += 1
            call = Call(seq, tid, name, mc.group(2), mc.group(3), ts, ts + dur, raw)
            _note_killed_write(unfinished, call)
            if name in SYNC_CALLS or name in GLOBAL_SYNC_CALLS:
                fd = _first_fd(mc.group(2)) if name != "sync" else None
                events.append(Event("sync-begin", tid=tid, fd=fd, t=ts, name=name))
            events.append(Event("call", call))
    if unfinished is not None:
        for name, args, _ in pending.values():
            if name in _DATA_WRITES:
                _unfinished_write(unfinished, name, args)
    return events


_DATA_WRITES = ("write", "writev", "pwrite64", "pwritev", "pwritev2")


def _note_killed_write(unfinished, call):
    """A data write the kill ended shows as `write(...) = ?` (or resumed
    with `= ?`) when strace saw its entry and the process died before it
    returned: like an unfinished one, the kernel may have done all, part or
    none of it."""
    if unfinished is not None and call.err == "killed" and call.name in _DATA_WRITES:
        _unfinished_write(unfinished, call.name, call.args)


def _unfinished_write(out, name, args):
    a = split_args(args)
    try:
        _, file = parse_fd(a[0])
        payload = parse_str(a[1]) if name in ("write", "pwrite64") else iov_bytes(a[1])
    except (ModelError, IndexError):
        return
    if file is not None:
        out.setdefault(file, []).append(payload)


def _first_fd(args):
    a = split_args(args)[0] if args else ""
    try:
        return parse_fd(a)[0]
    except ModelError:
        return None


# --------------------------------------------------------------------------
# The model

class Inode:
    __slots__ = ("ino", "kind", "mode", "vol", "dur", "log", "log_base", "entries", "dentries", "target")

    def __init__(self, ino, kind, mode):
        self.ino = ino
        self.kind = kind  # "file" | "dir" | "symlink"
        self.mode = mode
        # file: volatile content, durable content, unsynced ops since dur
        self.vol = bytearray()
        self.dur = b""
        self.log = []  # ("w", off, bytes) | ("t", size), unsynced, in order
        self.log_base = 0  # how many ops were logged before log[0]
        # dir: volatile entries, durable entries (name -> ino)
        self.entries = {}
        self.dentries = {}
        self.target = None


class OpenFile:
    """An open file description (shared by dup'ed fds)."""

    __slots__ = ("ino", "append", "offset")

    def __init__(self, ino, append):
        self.ino = ino
        self.append = append
        self.offset = 0


class Model:
    """Replays events; `root` is the data directory (absolute path), whose
    content at trace start is `baseline` (taken as durable)."""

    def __init__(self, root, umask=0o022, journal=False, ignore_sync=None):
        """`journal=True`: any successful fsync/fdatasync also makes every
        namespace operation made before it durable, as a journaling file
        system (ext4, XFS) commits its metadata log in order. Default: the
        POSIX model (only a directory's own fsync does).
        `ignore_sync`: a compiled regex; syncs of paths matching it are
        ignored (negative controls: a server that "forgot" an fsync)."""
        self.root = os.path.abspath(root)
        self.umask = umask
        self.journal = journal
        self.ignore_sync = ignore_sync
        self.ns_committed = 0
        self.inodes = {}
        self.next_ino = 1
        self.fds = {}
        self.snapshots = {}  # (tid, fd) -> snapshot taken at sync entry
        self.ns_log = []  # global log of namespace ops (for "meta")
        self.dir_synced_at = {}  # dir ino -> len(ns_log) at its last durable snapshot
        self.durable_version = 0
        self.root_ino = self._new("dir", 0o700).ino
        self.written = []  # (path, bytes) of every write under root, for the plaintext check

    # ---- setup

    def load_baseline(self, directory):
        """Takes an existing directory tree as the durable starting point."""
        by_dev_ino = {}

        def walk(path, node):
            for name in sorted(os.listdir(path)):
                p = os.path.join(path, name)
                st = os.lstat(p)
                key = (st.st_dev, st.st_ino)
                if key in by_dev_ino:
                    child = by_dev_ino[key]
                elif os.path.isdir(p) and not os.path.islink(p):
                    child = self._new("dir", st.st_mode & 0o7777)
                    walk(p, child)
                elif os.path.islink(p):
                    child = self._new("symlink", 0o777)
                    child.target = os.readlink(p)
                else:
                    child = self._new("file", st.st_mode & 0o7777)
                    with open(p, "rb") as f:
                        data = f.read()
                    child.vol = bytearray(data)
                    child.dur = data
                by_dev_ino[key] = child
                node.entries[name] = child.ino
                node.dentries[name] = child.ino

        walk(directory, self.inodes[self.root_ino])
        self.inodes[self.root_ino].mode = os.stat(directory).st_mode & 0o7777

    def _new(self, kind, mode):
        n = Inode(self.next_ino, kind, mode)
        self.inodes[n.ino] = n
        self.next_ino += 1
        return n

    # ---- paths

    def rel(self, path):
        """Components of `path` under root, or None if outside it."""
        p = os.path.normpath(path)
        if p == self.root:
            return []
        if p.startswith(self.root + "/"):
            return p[len(self.root) + 1 :].split("/")
        return None

    def lookup(self, comps):
        node = self.inodes[self.root_ino]
        for c in comps:
            if node.kind != "dir" or c not in node.entries:
                return None
            node = self.inodes[node.entries[c]]
        return node

    def parent_of(self, comps, call):
        parent = self.lookup(comps[:-1])
        if parent is None or parent.kind != "dir":
            raise ModelError(f"parent of {'/'.join(comps)} unknown to the model: {call.line[:200]}")
        return parent

    def resolve(self, dirfd_arg, path_arg):
        """Absolute path of a (dirfd, path) pair, from the -y annotations."""
        path = parse_str(path_arg).decode("utf-8", "surrogateescape")
        if path.startswith("/"):
            return path
        fd, base = parse_fd(dirfd_arg)
        if base is None:
            raise ModelError(f"relative path without annotated dirfd: {dirfd_arg} {path}")
        return os.path.join(base, path)

    # ---- replay

    def apply(self, ev):
        if ev.kind == "sync-begin" and ev.name in GLOBAL_SYNC_CALLS:
            # What a sync()/syncfs() that returns will have made durable:
            # everything as it stood when it entered.
            files = {i: n.log_base + len(n.log) for i, n in self.inodes.items() if n.kind == "file"}
            dirs = {i: dict(n.entries) for i, n in self.inodes.items() if n.kind == "dir"}
            self.snapshots[(ev.tid, ev.name)] = ("global", files, dirs, len(self.ns_log))
            return False
        if ev.kind == "close-begin":
            self.fds.pop(ev.fd, None)
            return False
        if ev.kind == "sync-begin":
            of = self.fds.get(ev.fd)
            if of is not None:
                node = self.inodes[of.ino]
                if node.kind == "dir":
                    self.snapshots[(ev.tid, ev.fd)] = ("dir", dict(node.entries), len(self.ns_log))
                else:
                    self.snapshots[(ev.tid, ev.fd)] = (
                        "file", bytes(node.vol), node.log_base + len(node.log), len(self.ns_log))
            return False
        c = ev.call
        handler = getattr(self, "_" + c.name, None)
        if handler is None:
            return False
        return handler(c, c.split())

    def _check_fd(self, c, a0):
        """The fd of a call: tracked (under root) or not; cross-checked
        with strace's own annotation."""
        fd, path = parse_fd(a0)
        of = self.fds.get(fd)
        if path is not None:
            p = path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path
            under = self.rel(p) is not None if p.startswith("/") else False
            if under and of is None and not p.endswith("-shm"):
                raise ModelError(f"fd {fd} on {p} was not seen opened: {c.line[:200]}")
            if of is not None and not under:
                raise ModelError(f"fd {fd} tracked but strace says {p}: {c.line[:200]}")
        return fd, of

    # open/close/dup

    def _openat(self, c, a):
        if not c.ok:
            return False
        path = self.resolve(a[0], a[1])
        flags = a[2]
        mode = parse_mode(a[3]) if len(a) > 3 else 0o666
        return self._do_open(c, path, flags, mode)

    def _open(self, c, a):
        if not c.ok:
            return False
        mode = parse_mode(a[2]) if len(a) > 2 else 0o666
        return self._do_open(c, parse_str(a[0]).decode("utf-8", "surrogateescape"), a[1], mode)

    def _openat2(self, c, a):
        if c.ok and self.rel(self.resolve(a[0], a[1])) is not None:
            raise ModelError(f"openat2 under the data directory not modelled: {c.line[:200]}")
        return False

    def _do_open(self, c, path, flags, mode):
        comps = self.rel(path)
        fd = c.ret
        self.fds.pop(fd, None)
        if comps is None:
            return False
        if comps and comps[-1].endswith("-shm"):
            return False  # written through mmap: not modelled, dropped from images
        node = self.lookup(comps)
        changed = False
        if node is None:
            if "O_CREAT" not in flags:
                raise ModelError(f"open of {path} that the model does not have: {c.line[:200]}")
            parent = self.parent_of(comps, c)
            node = self._new("file", mode & ~self.umask & 0o7777)
            parent.entries[comps[-1]] = node.ino
            self.ns_log.append(("add", parent.ino, comps[-1], node.ino))
            changed = True
        if "O_TRUNC" in flags and node.kind == "file" and ("O_WRONLY" in flags or "O_RDWR" in flags):
            if len(node.vol):
                node.vol = bytearray()
                node.log.append(("t", 0))
            changed = True
        self.fds[fd] = OpenFile(node.ino, "O_APPEND" in flags)
        return changed

    def _creat(self, c, a):
        if not c.ok:
            return False
        return self._do_open(c, parse_str(a[0]).decode(), "O_CREAT|O_WRONLY|O_TRUNC", parse_mode(a[1]))

    def _close(self, c, a):
        fd = parse_fd(a[0])[0]
        if c.ok:
            self.fds.pop(fd, None)
        return False

    def _close_range(self, c, a):
        lo, hi = parse_int(a[0]), parse_int(a[1])
        for fd in [f for f in self.fds if isinstance(f, int) and lo <= f <= hi]:
            del self.fds[fd]
        return False

    def _dup(self, c, a):
        if c.ok:
            fd, of = self._check_fd(c, a[0])
            self.fds.pop(c.ret, None)
            if of is not None:
                self.fds[c.ret] = of
        return False

    _dup2 = _dup
    _dup3 = _dup

    def _fcntl(self, c, a):
        if c.ok and a[1].startswith("F_DUPFD"):
            return self._dup(c, a)
        return False

    # data

    def _write_at(self, node, off, data):
        if off > len(node.vol):
            node.vol.extend(b"\0" * (off - len(node.vol)))
        node.vol[off : off + len(data)] = data
        node.log.append(("w", off, bytes(data)))
        self.written.append((node.ino, bytes(data)))

    def _data_target(self, c, a):
        fd, of = self._check_fd(c, a[0])
        if of is None or not c.ok:
            return None, None
        node = self.inodes[of.ino]
        if node.kind != "file":
            raise ModelError(f"write to a non-file: {c.line[:200]}")
        return of, node

    def _write(self, c, a):
        of, node = self._data_target(c, a)
        if node is None:
            return False
        data = parse_str(a[1])[: c.ret]
        off = len(node.vol) if of.append else of.offset
        self._write_at(node, off, data)
        of.offset = off + len(data)
        return True

    def _iov(self, arg, n):
        return iov_bytes(arg)[:n]

    def _writev(self, c, a):
        of, node = self._data_target(c, a)
        if node is None:
            return False
        data = self._iov(a[1], c.ret)
        off = len(node.vol) if of.append else of.offset
        self._write_at(node, off, data)
        of.offset = off + len(data)
        return True

    def _pwrite64(self, c, a):
        of, node = self._data_target(c, a)
        if node is None:
            return False
        self._write_at(node, parse_int(a[3]), parse_str(a[1])[: c.ret])
        return True

    def _pwritev(self, c, a):
        of, node = self._data_target(c, a)
        if node is None:
            return False
        data = self._iov(a[1], c.ret)
        off = parse_int(a[3])
        if off == -1:
            off = len(node.vol) if of.append else of.offset
            of.offset = off + len(data)
        self._write_at(node, off, data)
        return True

    _pwritev2 = _pwritev

    def _lseek(self, c, a):
        fd, of = self._check_fd(c, a[0])
        if of is not None and c.ok:
            of.offset = c.ret
        return False

    def _truncate_node(self, node, size):
        if size < len(node.vol):
            del node.vol[size:]
        else:
            node.vol.extend(b"\0" * (size - len(node.vol)))
        node.log.append(("t", size))

    def _ftruncate(self, c, a):
        of, node = self._data_target(c, a)
        if node is None:
            return False
        self._truncate_node(node, parse_int(a[1]))
        return True

    def _truncate(self, c, a):
        comps = self.rel(parse_str(a[0]).decode())
        if comps is None or not c.ok:
            return False
        node = self.lookup(comps)
        if node is None:
            raise ModelError(f"truncate of unknown file: {c.line[:200]}")
        self._truncate_node(node, parse_int(a[1]))
        return True

    def _fallocate(self, c, a):
        of, node = self._data_target(c, a)
        if node is None:
            return False
        mode, off, ln = a[1], parse_int(a[2]), parse_int(a[3])
        if "FALLOC_FL_KEEP_SIZE" not in mode and "PUNCH" not in mode and off + ln > len(node.vol):
            self._truncate_node(node, off + ln)
            return True
        if mode.strip() not in ("0",) and "KEEP_SIZE" not in mode:
            raise ModelError(f"fallocate mode not modelled: {c.line[:200]}")
        return False

    # syncs

    def _fsync(self, c, a):
        fd, of = self._check_fd(c, a[0])
        snap = self.snapshots.pop((c.tid, fd), None)
        if of is None or not c.ok:
            return False
        node = self.inodes[of.ino]
        if snap is None:
            raise ModelError(f"sync without its entry: {c.line[:200]}")
        if self.ignore_sync is not None:
            path = parse_fd(a[0])[1] or ""
            if self.ignore_sync.search(path.replace(" (deleted)", "")):
                return False
        # A sync that entered before another one (on the same inode) that
        # already returned adds nothing.
        if snap[0] == "dir":
            if snap[2] >= self.dir_synced_at.get(node.ino, 0):
                node.dentries = snap[1]
                self.dir_synced_at[node.ino] = snap[2]
            ns_at = snap[2]
        else:
            if snap[2] >= node.log_base:
                node.dur = snap[1]
                node.log = node.log[snap[2] - node.log_base :]
                node.log_base = snap[2]
            ns_at = snap[3]
        if self.journal:
            self._commit_namespace(ns_at)
        self.durable_version += 1
        return True

    def _commit_namespace(self, upto):
        """Journal model: the namespace ops before `upto` become durable."""
        if upto <= self.ns_committed:
            return
        entries = {ino: n.dentries for ino, n in self.inodes.items() if n.kind == "dir"}
        for i in range(self.ns_committed, upto):
            _apply_ns_op(self.ns_log[i], i, entries, self.dir_synced_at)
        for ino, n in self.inodes.items():
            if n.kind == "dir":
                self.dir_synced_at[ino] = max(self.dir_synced_at.get(ino, 0), upto)
        self.ns_committed = upto

    _fdatasync = _fsync

    def _sync(self, c, a):
        snap = self.snapshots.pop((c.tid, c.name), None)
        if not c.ok:
            return False
        if snap is None:
            raise ModelError(f"sync without its entry: {c.line[:200]}")
        _, files, dirs, ns_at = snap
        for ino, k in files.items():
            node = self.inodes[ino]
            if k >= node.log_base:
                data = bytearray(node.dur)
                for op in node.log[: k - node.log_base]:
                    _apply_op(data, op)
                node.dur = bytes(data)
                node.log = node.log[k - node.log_base :]
                node.log_base = k
        for ino, entries in dirs.items():
            if ns_at >= self.dir_synced_at.get(ino, 0):
                self.inodes[ino].dentries = entries
                self.dir_synced_at[ino] = ns_at
        self.ns_committed = max(self.ns_committed, ns_at)
        self.durable_version += 1
        return True

    def _syncfs(self, c, a):
        """Taken as a sync of everything when its fd is under the data
        directory (one file system); ignored otherwise (conservative)."""
        fd, of = self._check_fd(c, a[0])
        path = parse_fd(a[0])[1] or ""
        if of is None or (self.ignore_sync is not None and self.ignore_sync.search(path)):
            self.snapshots.pop((c.tid, c.name), None)
            return False
        return self._sync(c, a)

    def _sync_file_range(self, c, a):
        return False  # starts write-back; guarantees nothing

    def _msync(self, c, a):
        return False

    # namespace

    def _mkdir(self, c, a):
        if not c.ok:
            return False
        return self._mkdir_path(c, parse_str(a[0]).decode(), parse_mode(a[1]))

    def _mkdirat(self, c, a):
        if not c.ok:
            return False
        return self._mkdir_path(c, self.resolve(a[0], a[1]), parse_mode(a[2]))

    def _mkdir_path(self, c, path, mode):
        comps = self.rel(path)
        if comps is None:
            return False
        if not comps:
            raise ModelError("mkdir of the root itself is not modelled (start from an existing data dir)")
        parent = self.parent_of(comps, c)
        node = self._new("dir", mode & ~self.umask & 0o7777)
        parent.entries[comps[-1]] = node.ino
        self.ns_log.append(("add", parent.ino, comps[-1], node.ino))
        return True

    def _remove(self, c, path):
        comps = self.rel(path)
        if comps is None:
            return False
        parent = self.parent_of(comps, c)
        if comps[-1] not in parent.entries:
            raise ModelError(f"remove of an entry the model does not have: {c.line[:200]}")
        ino = parent.entries.pop(comps[-1])
        self.ns_log.append(("del", parent.ino, comps[-1], ino))
        return True

    def _unlink(self, c, a):
        return c.ok and self._remove(c, parse_str(a[0]).decode())

    _rmdir = _unlink

    def _unlinkat(self, c, a):
        return c.ok and self._remove(c, self.resolve(a[0], a[1]))

    def _rename_paths(self, c, old, new, flags=""):
        oc, nc = self.rel(old), self.rel(new)
        if oc is None and nc is None:
            return False
        if oc is None or nc is None:
            raise ModelError(f"rename across the data directory's boundary: {c.line[:200]}")
        op, np_ = self.parent_of(oc, c), self.parent_of(nc, c)
        if oc[-1] not in op.entries:
            raise ModelError(f"rename of an entry the model does not have: {c.line[:200]}")
        ino = op.entries[oc[-1]]
        if "RENAME_EXCHANGE" in flags:
            other = np_.entries[nc[-1]]
            op.entries[oc[-1]], np_.entries[nc[-1]] = other, ino
            self.ns_log.append(("add", op.ino, oc[-1], other))
            self.ns_log.append(("add", np_.ino, nc[-1], ino))
            return True
        if (op.ino, oc[-1]) == (np_.ino, nc[-1]):
            return False
        del op.entries[oc[-1]]
        replaced = np_.entries.get(nc[-1])
        np_.entries[nc[-1]] = ino
        self.ns_log.append(("rename", op.ino, oc[-1], np_.ino, nc[-1], ino, replaced))
        return True

    def _rename(self, c, a):
        return c.ok and self._rename_paths(c, parse_str(a[0]).decode(), parse_str(a[1]).decode())

    def _renameat(self, c, a):
        return c.ok and self._rename_paths(c, self.resolve(a[0], a[1]), self.resolve(a[2], a[3]))

    def _renameat2(self, c, a):
        return c.ok and self._rename_paths(c, self.resolve(a[0], a[1]), self.resolve(a[2], a[3]), a[4])

    def _link_paths(self, c, old, new):
        oc, nc = self.rel(old), self.rel(new)
        if oc is None and nc is None:
            return False
        if oc is None or nc is None:
            raise ModelError(f"link across the data directory's boundary: {c.line[:200]}")
        node = self.lookup(oc)
        if node is None:
            raise ModelError(f"link of a file the model does not have: {c.line[:200]}")
        parent = self.parent_of(nc, c)
        parent.entries[nc[-1]] = node.ino
        self.ns_log.append(("add", parent.ino, nc[-1], node.ino))
        return True

    def _link(self, c, a):
        return c.ok and self._link_paths(c, parse_str(a[0]).decode(), parse_str(a[1]).decode())

    def _linkat(self, c, a):
        return c.ok and self._link_paths(c, self.resolve(a[0], a[1]), self.resolve(a[2], a[3]))

    def _symlink(self, c, a):
        if not c.ok:
            return False
        comps = self.rel(parse_str(a[1]).decode())
        if comps is None:
            return False
        parent = self.parent_of(comps, c)
        node = self._new("symlink", 0o777)
        node.target = parse_str(a[0]).decode()
        parent.entries[comps[-1]] = node.ino
        self.ns_log.append(("add", parent.ino, comps[-1], node.ino))
        return True

    def _symlinkat(self, c, a):
        if not c.ok:
            return False
        comps = self.rel(self.resolve(a[1], a[2]))
        if comps is None:
            return False
        raise ModelError(f"symlinkat under the data directory not modelled: {c.line[:200]}")

    # metadata

    def _chmod_path(self, c, path, mode):
        comps = self.rel(path)
        if comps is None or not c.ok:
            return False
        node = self.lookup(comps)
        if node is not None:
            node.mode = mode & 0o7777
        return False

    def _chmod(self, c, a):
        return self._chmod_path(c, parse_str(a[0]).decode(), parse_mode(a[1]))

    def _fchmodat(self, c, a):
        return self._chmod_path(c, self.resolve(a[0], a[1]), parse_mode(a[2]))

    def _fchmod(self, c, a):
        fd, of = self._check_fd(c, a[0])
        if of is not None and c.ok:
            self.inodes[of.ino].mode = parse_mode(a[1])
        return False

    # what the model cannot follow

    def _mmap(self, c, a):
        if len(a) >= 5 and "MAP_SHARED" in a[3] and "PROT_WRITE" in a[2]:
            fd, of = self._check_fd(c, a[4])
            if of is not None:
                raise ModelError(f"shared writable mapping of a data file: {c.line[:200]}")
        return False

    def _unsupported(self, c, a):
        for arg in a[:3]:
            try:
                fd, of = self._check_fd(c, arg)
            except ModelError:
                continue
            if of is not None:
                raise ModelError(f"{c.name} on a data file is not modelled: {c.line[:200]}")
        return False

    _copy_file_range = _unsupported
    _sendfile = _unsupported
    _splice = _unsupported

    def _io_uring_setup(self, c, a):
        raise ModelError("io_uring writes are invisible to strace")

    # ---- images

    def path_of(self, ino, durable=True):
        """One path of an inode in the volatile or durable tree (debugging)."""

        def walk(node, prefix):
            entries = node.dentries if durable else node.entries
            for name, child in entries.items():
                p = prefix + "/" + name
                if child == ino:
                    return p
                cn = self.inodes[child]
                if cn.kind == "dir":
                    r = walk(cn, p)
                    if r:
                        return r
            return None

        return walk(self.inodes[self.root_ino], "")

    def build_image(self, out, variant="durable", rng=None):
        """Writes the crash image into the (absent) directory `out`.
        Returns a description of what the torn/meta choices were."""
        rng = rng or random.Random(0)
        notes = []
        entries = {ino: dict(n.dentries) for ino, n in self.inodes.items() if n.kind == "dir"}
        if variant == "meta":
            self._apply_meta_prefix(entries, rng, notes)
        contents = {}

        def content(node):
            if node.ino in contents:
                return contents[node.ino]
            data = node.dur
            if variant in ("torn", "meta") and node.log:
                data = self._torn(node, rng, notes)
            contents[node.ino] = data
            return data

        os.makedirs(out)
        os.chmod(out, self.inodes[self.root_ino].mode or 0o700)
        made = {}

        def walk(dir_ino, path, depth):
            if depth > 64:
                raise ModelError("directory cycle in the image")
            for name, ino in sorted(entries.get(dir_ino, {}).items()):
                if name.endswith("-shm"):
                    continue
                node = self.inodes[ino]
                p = os.path.join(path, name)
                if node.kind == "dir":
                    os.mkdir(p)
                    walk(ino, p, depth + 1)
                    os.chmod(p, node.mode or 0o700)
                elif node.kind == "symlink":
                    os.symlink(node.target, p)
                elif ino in made:
                    os.link(made[ino], p)
                else:
                    with open(p, "wb") as f:
                        f.write(content(node))
                    os.chmod(p, node.mode or 0o600)
                    made[ino] = p

        walk(self.root_ino, out, 0)
        return notes

    def _torn(self, node, rng, notes):
        """Durable content plus an in-order prefix of the unsynced ops,
        the last one cut short and maybe filled with zeros or garbage."""
        data = bytearray(node.dur)
        k = rng.randint(0, len(node.log))
        for op in node.log[:k]:
            _apply_op(data, op)
        desc = f"{k}/{len(node.log)} ops"
        if k < len(node.log) and node.log[k][0] == "w":
            _, off, buf = node.log[k]
            cut = rng.randint(0, len(buf))
            if cut:
                fill = rng.choice(["data", "data", "zeros", "random"])
                piece = buf[:cut] if fill == "data" else (b"\0" * cut if fill == "zeros" else rng.randbytes(cut))
                _apply_op(data, ("w", off, piece))
                desc += f" + {cut}/{len(buf)} bytes of the next as {fill}"
        notes.append((node.ino, desc))
        return bytes(data)

    def _apply_meta_prefix(self, entries, rng, notes):
        """Lets a prefix (in global order) of the namespace ops that no
        directory fsync covered reach disk."""
        start = min([self.dir_synced_at.get(ino, 0) for ino in entries] + [len(self.ns_log)])
        # Mostly everything up to the crash point (the metadata of the last
        # operation committed, its data not), else a random prefix.
        cut = len(self.ns_log) if rng.random() < 2 / 3 else rng.randint(start, len(self.ns_log))
        applied = 0
        for i in range(start, cut):
            applied += _apply_ns_op(self.ns_log[i], i, entries, self.dir_synced_at)
        notes.append(("namespace", f"{applied} of {len(self.ns_log) - start} pending namespace ops"))


def _apply_ns_op(op, i, entries, synced_at):
    """Applies namespace op number i to durable entry maps, for each
    directory whose durable snapshot does not already include it."""
    if op[0] in ("add", "del"):
        _, d, name, ino = op
        if i < synced_at.get(d, 0):
            return 0
        if op[0] == "add":
            entries.setdefault(d, {})[name] = ino
        else:
            entries.setdefault(d, {}).pop(name, None)
        return 1
    _, od, on, nd, nn, ino, _replaced = op
    # One rename: both halves (unless a directory already has its half).
    if i >= synced_at.get(od, 0):
        entries.setdefault(od, {}).pop(on, None)
    if i >= synced_at.get(nd, 0):
        entries.setdefault(nd, {})[nn] = ino
    return 1


def _apply_op(data, op):
    if op[0] == "w":
        _, off, buf = op
        if off > len(data):
            data.extend(b"\0" * (off - len(data)))
        data[off : off + len(buf)] = buf
    else:
        size = op[1]
        if size < len(data):
            del data[size:]
        else:
            data.extend(b"\0" * (size - len(data)))


def compare_with_disk(model, directory, unfinished=None):
    """Differences between the model's volatile tree and a real directory
    (the data directory after the traced process died: its page cache is
    exactly the volatile state). An empty list validates parse and replay.
    `unfinished` ({path: [payload]}, from `parse_trace`): a file that
    holds the model's bytes followed by a prefix of such an appending
    write's payload also matches, since the kill may have come after the
    kernel wrote them."""
    diffs = []
    unfinished = unfinished or {}

    def explained(p, data, vol):
        extra = data[len(vol):]
        return (len(data) > len(vol) and data[: len(vol)] == vol
                and any(payload.startswith(extra)
                        for payload in unfinished.get(p, unfinished.get(os.path.realpath(p), ()))))

    def walk(node, path, rel):
        real = set(n for n in os.listdir(path) if not n.endswith("-shm"))
        mine = set(n for n in node.entries if not n.endswith("-shm"))
        for n in sorted(real - mine):
            diffs.append(f"{rel}/{n}: on disk, not in the model")
        for n in sorted(mine - real):
            diffs.append(f"{rel}/{n}: in the model, not on disk")
        for n in sorted(real & mine):
            child = model.inodes[node.entries[n]]
            p = os.path.join(path, n)
            if child.kind == "dir":
                if not os.path.isdir(p):
                    diffs.append(f"{rel}/{n}: a directory in the model only")
                else:
                    walk(child, p, f"{rel}/{n}")
            elif child.kind == "file":
                with open(p, "rb") as f:
                    data = f.read()
                if data != bytes(child.vol) and not explained(p, data, bytes(child.vol)):
                    diffs.append(f"{rel}/{n}: {len(data)} bytes on disk, {len(child.vol)} in the model")

    walk(model.inodes[model.root_ino], directory, "")
    return diffs
