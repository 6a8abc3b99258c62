//! One write-ahead log shared by every live upload (`ingest.sync = "log"`).
//!
//! With a journal per stream, thousands of live calls dirty thousands of
//! files every `commit_interval`, and making them durable costs a sync per
//! file (or a `syncfs` writing back one scattered page per file):
//! BENCHMARKS.md, "Concurrent live calls". Here a stream seals its journal
//! records as before but hands them to one writer thread, which appends
//! every record queued meanwhile to one file and `fdatasync`s it once:
//! sequential writes, one sync per batch whatever the number of streams.
//!
//! A stream's full segments still go to its own `<id>.seg` file, written
//! but not synced on the ack path; the log keeps every byte of an upload
//! (not only the tail) until the segments holding it are durable. A
//! checkpoint thread makes them durable off the ack path (`fdatasync` of
//! each segments file written since the last checkpoint) and deletes log
//! files ("generations") no upload needs any more.
//!
//! The records of an upload move from the log into its `<id>.journal`
//! (a "spill": its segments file synced, then the journal rewritten
//! atomically holding its old records and the spilled ones):
//! - when the upload is opened again (a resume), before the journal is read;
//! - when its stream ended without sealing it (a dropped call waiting for
//!   its resume), at the next checkpoint, so that it keeps no generation;
//! - at start-up, for every record of every generation left by the last
//!   run (a crash), before anything is served; then the generations go.
//!
//! A record in the log is the same sealed record as in a journal file
//! (sealed under the upload's spool key; nothing here can read it), so a
//! spill copies bytes and [`super::spool::FileJournal::open`] recovers an
//! upload the same way whichever place its records came from.
//!
//! ```text
//! generation := entry*            (wal/<generation:020>.log)
//! entry      := object_id[16] | body_len u32 | body   (body: journal records)
//! ```
//! A torn entry can only end the newest generation (a batch is acked after
//! its `fdatasync`, and a generation is synced before the next one takes
//! writes), so reading stops at the first entry that does not fit.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::model::ObjectId;

use super::spool::{FILE_HEADER_LEN, journal_header, journal_path, rotating_path, segments_path};

/// Directory of the log, inside the spool directory.
pub const WAL_DIR: &str = "wal";
/// A generation this long is closed and a new one started. A live upload
/// keeps the generations holding its tail (up to one segment: 8 s of a
/// G.711 call), so the log on disk is about the last few seconds of ingest.
const GENERATION_SIZE: u64 = 32 << 20;
/// How often the checkpoint thread runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// A checkpoint with at least this many segments files to make durable
/// makes them so with one `syncfs` of the spool's file system, not one
/// `fdatasync` each. A live call writes a segment every 8 s, so at
/// thousands of calls the checkpoint thread synced hundreds of files a
/// second, each an ext4 journal commit (the file grew) competing with the
/// log's own syncs on the ack path. `syncfs` writes them back together in
/// one commit; it also writes back whatever else is dirty on that file
/// system (a dedicated spool volume keeps that small).
const SYNCFS_FROM: usize = 32;
const ENTRY_HEADER_LEN: usize = 16 + 4;
/// Group commit: after a batch of at least two entries, the writer waits
/// this long for more before its next write and sync, unless
/// [`GATHER_ENTRIES`] are queued or an urgent entry arrives. At thousands
/// of live calls, syncing back to back meant thousands of small syncs a
/// second, each with its disk doorbell, interrupt and wake-ups; gathering
/// for 2 ms brought the ack p99 at 5 000 calls from 502–676 ms down to
/// 198–404 ms (BENCHMARKS.md, "Concurrent live calls"). A lone stream
/// (batches of one entry) never waits.
const GATHER: Duration = Duration::from_millis(2);
/// Queued entries that end a gathering wait at once.
const GATHER_ENTRIES: usize = 512;
/// Largest entry body: one flush (`commit_bytes`) of records, with room.
const MAX_BODY: u32 = 64 << 20;

/// Where one entry's body is in the log.
#[derive(Debug, Clone, Copy)]
struct Loc {
    generation: u64,
    /// Offset of the body in the generation file.
    offset: u64,
    len: u32,
    /// End (plaintext offset) of the bytes the body records.
    end: u64,
}

/// What the log holds for one upload.
struct PinState {
    /// Which journal holds the upload (a later open gets a new token).
    token: u64,
    /// The journal is still open; otherwise the records wait for a spill.
    live: bool,
    /// Entries not yet known durable elsewhere, oldest first.
    records: VecDeque<Loc>,
    /// Segments were written since the last checkpoint synced the file.
    seg_dirty: bool,
}

struct Entry {
    object_id: ObjectId,
    token: u64,
    end: u64,
    body: Vec<u8>,
    done: oneshot::Sender<std::io::Result<()>>,
}

#[derive(Default)]
struct State {
    queue: Vec<Entry>,
    pins: HashMap<ObjectId, PinState>,
    /// The generation being written.
    generation: u64,
    /// Generation files on disk.
    generations: Vec<u64>,
    /// An fsync of the log failed: nothing more is acknowledged.
    failed: bool,
    /// A checkpoint's fsync failed: no generation is deleted any more.
    keep_all: bool,
    /// The writer is gathering entries for its next batch ([`GATHER`]).
    gathering: bool,
    /// `queue` holds an entry someone waits for with nothing else to do
    /// (a bulk flush's tail): the writer does not gather.
    urgent: bool,
    stop: bool,
}

struct Shared {
    spool_dir: PathBuf,
    /// The spool directory, open for [`SYNCFS_FROM`]'s `syncfs` for as
    /// long as the log runs: a write-back error anywhere in the file
    /// system since it was opened is then reported to the checkpoint.
    spool_fd: File,
    dir: PathBuf,
    state: Mutex<State>,
    /// Wakes the writer (queued entries, stop).
    wake: Condvar,
    /// Wakes the checkpoint thread early (stop).
    tick: Condvar,
    /// Serializes spills (they rewrite journal files).
    spilling: Mutex<()>,
    tokens: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The shared log of a spool directory, with its writer and checkpoint
/// threads.
pub struct Wal {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("dir", &self.shared.dir).finish()
    }
}

fn generation_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.log"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn stopped() -> std::io::Error {
    std::io::Error::other("the ingest log writer stopped")
}

impl Wal {
    /// Recovers what a previous run left in `spool_dir/wal` into the
    /// journal files, then starts a fresh log. Call before serving.
    pub fn open(spool_dir: &Path) -> std::io::Result<Self> {
        Self::open_with(spool_dir, true)
    }

    /// [`Wal::open`], optionally without the checkpoint thread (tests run
    /// checkpoints themselves).
    fn open_with(spool_dir: &Path, checkpoints: bool) -> std::io::Result<Self> {
        let dir = spool_dir.join(WAL_DIR);
        crate::store::create_dir_durable(&dir)?;
        let next = recover(spool_dir, &dir)?;
        let shared = Arc::new(Shared {
            spool_dir: spool_dir.to_owned(),
            spool_fd: File::open(spool_dir)?,
            dir: dir.clone(),
            state: Mutex::new(State { generation: next, ..State::default() }),
            wake: Condvar::new(),
            tick: Condvar::new(),
            spilling: Mutex::new(()),
            tokens: AtomicU64::new(1),
        });
        let file = create_generation(&dir, next)?;
        shared.lock().generations.push(next);
        let writer = shared.clone();
        std::thread::Builder::new().name("recvault-log".into()).spawn(move || write_loop(&writer, file))?;
        if checkpoints {
            let checkpointer = shared.clone();
            std::thread::Builder::new()
                .name("recvault-checkpoint".into())
                .spawn(move || checkpoint_loop(&checkpointer))?;
        }
        Ok(Self { shared })
    }

    /// Recovers a log left by an earlier run in another `ingest.sync`
    /// mode into the journal files, if there is one. Call before serving.
    pub fn recover_leftovers(spool_dir: &Path) -> std::io::Result<()> {
        let dir = spool_dir.join(WAL_DIR);
        if dir.is_dir() {
            recover(spool_dir, &dir)?;
        }
        Ok(())
    }

    pub fn spool_dir(&self) -> &Path {
        &self.shared.spool_dir
    }

    /// Moves every record the log holds for `object_id` into its journal
    /// file, and forgets the upload here. Called before the journal is
    /// opened (read) again. Blocking.
    pub fn take(&self, object_id: &ObjectId) -> std::io::Result<()> {
        spill(&self.shared, object_id, Spill::Reopen)
    }

    /// Registers a journal just opened; its records are written through
    /// the returned pin.
    pub fn pin(&self, object_id: ObjectId) -> Pin {
        let token = self.shared.tokens.fetch_add(1, Ordering::Relaxed);
        self.shared
            .lock()
            .pins
            .insert(object_id, PinState { token, live: true, records: VecDeque::new(), seg_dirty: false });
        Pin { shared: self.shared.clone(), object_id, token }
    }

    /// Forgets an upload and removes its journal files (no spill running
    /// meanwhile can bring one back).
    pub fn remove(&self, object_id: &ObjectId) -> std::io::Result<()> {
        let _one = self.shared.spilling.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.lock().pins.remove(object_id);
        super::spool::remove(&self.shared.spool_dir, object_id)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        self.shared.tick.notify_all();
    }
}

/// One open journal's handle on the log.
pub struct Pin {
    shared: Arc<Shared>,
    object_id: ObjectId,
    token: u64,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin").field("object_id", &self.object_id).finish()
    }
}

impl Pin {
    /// Queues sealed records ending at plaintext offset `end`; the
    /// receiver answers once they are durable.
    ///
    /// `urgent` entries end the writer's gathering wait ([`GATHER`]): a
    /// bulk upload's flush waits for its tail and has no company to wait
    /// for.
    pub fn submit(&self, end: u64, body: Vec<u8>, urgent: bool) -> oneshot::Receiver<std::io::Result<()>> {
        let (done, rx) = oneshot::channel();
        let mut st = self.shared.lock();
        if st.failed {
            drop(st);
            let _ = done.send(Err(failed()));
            return rx;
        }
        if st.stop {
            drop(st);
            let _ = done.send(Err(stopped()));
            return rx;
        }
        // The writer waits on an empty queue, or gathers; while it writes,
        // the entries queue up for its next batch without waking it.
        let wake = if st.gathering { urgent || st.queue.len() + 1 >= GATHER_ENTRIES } else { st.queue.is_empty() };
        st.urgent |= urgent;
        st.queue.push(Entry { object_id: self.object_id, token: self.token, end, body, done });
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
        rx
    }

    /// Everything before `sealed_len` is in written segments: its records
    /// are no longer needed once the segments are synced (`durable`: they
    /// already are; otherwise the next checkpoint syncs them).
    pub fn segments_written(&self, sealed_len: u64, durable: bool) {
        let mut st = self.shared.lock();
        if let Some(pin) = st.pins.get_mut(&self.object_id).filter(|p| p.token == self.token) {
            let before = pin.records.len();
            while pin.records.front().is_some_and(|l| l.end <= sealed_len) {
                pin.records.pop_front();
            }
            if durable {
                // The sync covered every segment written before, too.
                pin.seg_dirty = false;
            } else {
                pin.seg_dirty |= pin.records.len() != before;
            }
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(pin) = st.pins.get_mut(&self.object_id).filter(|p| p.token == self.token) {
            if pin.records.is_empty() && !pin.seg_dirty {
                st.pins.remove(&self.object_id);
            } else {
                // Spilled by the next checkpoint (or a resume, first).
                pin.live = false;
            }
        }
    }
}

fn failed() -> std::io::Error {
    std::io::Error::other(
        "the ingest log failed earlier (a sync failed or its writer stopped): written bytes may not be durable; \
         restart the server",
    )
}

fn create_generation(dir: &Path, generation: u64) -> std::io::Result<File> {
    let file = OpenOptions::new().append(true).create_new(true).open(generation_path(dir, generation))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Fails the log if the writer thread unwinds: queued and later flushes
/// get an error instead of waiting for a writer that is gone.
struct FailOnUnwind<'a>(&'a Shared);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the ingest log writer stopped unexpectedly; nothing more is acknowledged");
            let mut st = self.0.lock();
            st.failed = true;
            for e in st.queue.drain(..) {
                let _ = e.done.send(Err(failed()));
            }
        }
    }
}

fn write_loop(shared: &Shared, mut file: File) {
    let _fail_on_unwind = FailOnUnwind(shared);
    let mut len = 0u64;
    let mut buf = Vec::new();
    // The number of the next generation to create (never reused, even if
    // creating one failed half-way).
    let mut next = shared.lock().generation + 1;
    loop {
        let (batch, generation) = {
            let mut st = shared.lock();
            while st.queue.is_empty() && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.queue.is_empty() {
                return;
            }
            st.urgent = false;
            if st.failed {
                for e in st.queue.drain(..) {
                    let _ = e.done.send(Err(failed()));
                }
                continue;
            }
            (std::mem::take(&mut st.queue), st.generation)
        };
        buf.clear();
        for e in &batch {
            buf.extend_from_slice(e.object_id.as_bytes());
            buf.extend_from_slice(&(e.body.len() as u32).to_be_bytes());
            buf.extend_from_slice(&e.body);
        }
        fail::fail_point!("log-before-write");
        let result = match file.write_all(&buf) {
            // Cut a partial entry off (a full disk), so the next batch
            // continues a well-formed generation; only a failed cut or
            // sync makes the log unusable.
            Err(e) => match file.set_len(len) {
                Ok(()) => Err(e),
                Err(cut) => {
                    tracing::error!(error = %cut, "could not cut a failed write off the ingest log");
                    shared.lock().failed = true;
                    Err(e)
                }
            },
            Ok(()) => file.sync_data().inspect_err(|e| {
                tracing::error!(error = %e, "fdatasync of the ingest log failed; nothing more is acknowledged");
                shared.lock().failed = true;
            }),
        };
        if let Err(err) = result {
            for e in batch {
                let _ = e.done.send(Err(std::io::Error::new(err.kind(), err.to_string())));
            }
            continue;
        }
        // Registered once durable, before anyone hears of it: a spill never
        // reads an entry that is not whole, and a checkpoint never deletes
        // this generation meanwhile (it is the current one until the
        // rotation below, which comes after).
        {
            let mut st = shared.lock();
            let mut at = len;
            for e in &batch {
                at += ENTRY_HEADER_LEN as u64;
                let loc = Loc { generation, offset: at, len: e.body.len() as u32, end: e.end };
                at += e.body.len() as u64;
                if let Some(pin) = st.pins.get_mut(&e.object_id).filter(|p| p.token == e.token) {
                    pin.records.push_back(loc);
                }
            }
        }
        len += buf.len() as u64;
        let entries = batch.len();
        for e in batch {
            let _ = e.done.send(Ok(()));
        }
        if entries >= 2 {
            gather(shared);
        }
        if len >= GENERATION_SIZE || force_new_generation() {
            let number = next;
            next += 1;
            match create_generation(&shared.dir, number) {
                Ok(f) => {
                    file = f;
                    len = 0;
                    let mut st = shared.lock();
                    st.generation = number;
                    st.generations.push(number);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a new ingest log generation; the current one grows")
                }
            }
        }
    }
}

/// Waits up to [`GATHER`] for more entries to join the next batch.
fn gather(shared: &Shared) {
    let deadline = std::time::Instant::now() + GATHER;
    let mut st = shared.lock();
    st.gathering = true;
    while !st.stop && !st.urgent && st.queue.len() < GATHER_ENTRIES {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero()) else {
            break;
        };
        st = shared.wake.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
    }
    st.gathering = false;
}

/// Crash tests start a generation after every batch (`log-rotate=return`),
/// so that a short run goes through every step of a generation's life.
fn force_new_generation() -> bool {
    fail::fail_point!("log-rotate", |_| true);
    false
}

/// Crash tests take the `syncfs` path with fewer dirty files than
/// [`SYNCFS_FROM`] (`checkpoint-syncfs=1*return`: the first time, so one
/// run goes through both paths).
fn force_syncfs() -> bool {
    fail::fail_point!("checkpoint-syncfs", |_| true);
    false
}

fn checkpoint_loop(shared: &Shared) {
    loop {
        {
            let st = shared.lock();
            if st.stop {
                return;
            }
            let (st, _) = shared.tick.wait_timeout(st, CHECKPOINT_EVERY).unwrap_or_else(|p| p.into_inner());
            if st.stop {
                return;
            }
        }
        if let Err(e) = checkpoint(shared) {
            tracing::error!(error = %e, "ingest log checkpoint failed; log generations are kept until a restart");
            shared.lock().keep_all = true;
        }
    }
}

/// Spills quiet uploads, syncs the segments written since the last
/// checkpoint, and deletes the generations nothing needs.
fn checkpoint(shared: &Shared) -> std::io::Result<()> {
    let spills: Vec<(ObjectId, u64)> =
        shared.lock().pins.iter().filter(|(_, p)| !p.live).map(|(id, p)| (*id, p.token)).collect();
    for (id, token) in &spills {
        // Retried at the next checkpoint: the records stay in the log.
        if let Err(e) = spill(shared, id, Spill::Closed(*token)) {
            tracing::warn!(object_id = %id, error = %e, "could not move a closed upload's records out of the ingest log");
        }
    }
    let (dirty, deletable) = {
        let mut st = shared.lock();
        if st.keep_all {
            return Ok(());
        }
        let mut needed = BTreeSet::new();
        let mut dirty = Vec::new();
        for (id, pin) in st.pins.iter_mut() {
            needed.extend(pin.records.iter().map(|l| l.generation));
            if std::mem::take(&mut pin.seg_dirty) {
                dirty.push(*id);
            }
        }
        let current = st.generation;
        let deletable: Vec<u64> =
            st.generations.iter().copied().filter(|g| *g < current && !needed.contains(g)).collect();
        (dirty, deletable)
    };
    // Records popped before the snapshot above had their segments written
    // before they were popped: these syncs make them durable.
    if dirty.len() >= SYNCFS_FROM || (!dirty.is_empty() && force_syncfs()) {
        rustix::fs::syncfs(&shared.spool_fd)?;
    } else {
        for id in &dirty {
            match File::open(segments_path(&shared.spool_dir, id)) {
                Ok(f) => f.sync_data()?,
                // Published and removed: the publish synced it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    // No directory sync: a deleted generation that comes back after a
    // crash is spilled again at start-up, and its records only overlap
    // what the journals hold.
    let mut deleted = Vec::with_capacity(deletable.len());
    for g in deletable {
        match std::fs::remove_file(generation_path(&shared.dir, g)) {
            Ok(()) => deleted.push(g),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => deleted.push(g),
            Err(e) => tracing::warn!(generation = g, error = %e, "could not delete an ingest log generation; retried"),
        }
    }
    if !deleted.is_empty() {
        shared.lock().generations.retain(|g| !deleted.contains(g));
    }
    Ok(())
}

/// Which upload a spill moves out of the log.
#[derive(Debug, Clone, Copy)]
enum Spill {
    /// About to be opened again: its records move and it is forgotten here
    /// whatever its state.
    Reopen,
    /// Closed (its journal dropped unsealed), as seen with this token: skip
    /// it if it was reopened meanwhile.
    Closed(u64),
}

/// Copies an upload's records from the log into its journal file, then
/// forgets the upload here.
fn spill(shared: &Shared, object_id: &ObjectId, which: Spill) -> std::io::Result<()> {
    let _one = shared.spilling.lock().unwrap_or_else(|p| p.into_inner());
    let records: Vec<Loc> = match (shared.lock().pins.get(object_id), which) {
        (Some(pin), Spill::Closed(token)) if pin.live || pin.token != token => return Ok(()),
        (Some(pin), _) => pin.records.iter().copied().collect(),
        (None, Spill::Closed(_)) => return Ok(()),
        (None, Spill::Reopen) => Vec::new(),
    };
    // Nobody can reopen the upload meanwhile: that takes this lock first.
    let drop_records = |shared: &Shared| {
        shared.lock().pins.remove(object_id);
    };
    if records.is_empty() {
        // A closed journal may still have unsynced segments.
        if let Err(e) = sync_segments(&shared.spool_dir, object_id)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(e);
        }
        drop_records(shared);
        return Ok(());
    }
    match write_spill(&shared.spool_dir, &shared.dir, object_id, &records) {
        Ok(()) => sync_dir(&shared.spool_dir)?,
        // The upload was published or discarded meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    drop_records(shared);
    Ok(())
}

fn sync_segments(spool_dir: &Path, object_id: &ObjectId) -> std::io::Result<()> {
    File::open(segments_path(spool_dir, object_id))?.sync_data()
}

/// Rewrites `<id>.journal` (atomically, via `<id>.journal.new`) holding
/// its records followed by the log entries at `records`, after syncing the
/// segments file, so that the records continue from a durable segment
/// end. NotFound when the upload has no segments file (gone). The caller
/// syncs the directory.
fn write_spill(spool_dir: &Path, log_dir: &Path, object_id: &ObjectId, records: &[Loc]) -> std::io::Result<()> {
    sync_segments(spool_dir, object_id)?;
    let path = journal_path(spool_dir, object_id);
    let mut old = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut old)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if old.len() < FILE_HEADER_LEN as usize {
        old = journal_header(object_id);
    }
    let new_path = rotating_path(spool_dir, object_id);
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&new_path)?;
    file.write_all(&old)?;
    let mut open: Option<(u64, File)> = None;
    let mut body = Vec::new();
    for loc in records {
        if open.as_ref().is_none_or(|(g, _)| *g != loc.generation) {
            open = Some((loc.generation, File::open(generation_path(log_dir, loc.generation))?));
        }
        let (_, log) = open.as_ref().expect("opened above");
        body.resize(loc.len as usize, 0);
        log.read_exact_at(&mut body, loc.offset)?;
        file.write_all(&body)?;
    }
    file.sync_data()?;
    std::fs::rename(&new_path, &path)
}

/// Moves every record left in the log's generations into the journal
/// files, then deletes the generations. Returns the next generation number.
fn recover(spool_dir: &Path, dir: &Path) -> std::io::Result<u64> {
    let mut generations = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(generation) = name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse::<u64>().ok())
        else {
            // A stray file (never written by the log): leave it be.
            continue;
        };
        generations.push(generation);
    }
    generations.sort_unstable();
    let next = generations.last().map_or(1, |g| g + 1);
    if generations.is_empty() {
        return Ok(next);
    }
    // Where every record of an upload is, in log order (the bodies are
    // read one upload at a time: the log may be large after a long outage).
    let mut uploads: HashMap<ObjectId, Vec<Loc>> = HashMap::new();
    let mut order = Vec::new();
    let mut records = 0usize;
    for generation in &generations {
        let file = File::open(generation_path(dir, *generation))?;
        let size = file.metadata()?.len();
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut at = 0u64;
        let mut header = [0u8; ENTRY_HEADER_LEN];
        while size - at >= ENTRY_HEADER_LEN as u64 {
            reader.read_exact(&mut header)?;
            let id: [u8; 16] = header[..16].try_into().expect("16 bytes");
            let len = u32::from_be_bytes(header[16..].try_into().expect("4 bytes"));
            let body_at = at + ENTRY_HEADER_LEN as u64;
            if len > MAX_BODY || size - body_at < u64::from(len) {
                break;
            }
            reader.seek_relative(i64::from(len))?;
            let object_id = ObjectId::from_bytes(id);
            uploads
                .entry(object_id)
                .or_insert_with(|| {
                    order.push(object_id);
                    Vec::new()
                })
                .push(Loc { generation: *generation, offset: body_at, len, end: 0 });
            records += 1;
            at = body_at + u64::from(len);
        }
        if at != size {
            tracing::warn!(generation, kept = at, "cut a torn entry off the ingest log");
        }
    }
    let mut spilled = 0usize;
    for id in &order {
        match write_spill(spool_dir, dir, id, &uploads[id]) {
            Ok(()) => spilled += 1,
            // No segments file: the upload was committed or discarded.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    sync_dir(spool_dir)?;
    for generation in &generations {
        std::fs::remove_file(generation_path(dir, *generation))?;
    }
    sync_dir(dir)?;
    tracing::info!(
        generations = generations.len(),
        records,
        uploads = spilled,
        "recovered the ingest log into upload journals"
    );
    Ok(next)
}

/// Reads every entry of a generation file (tests).
#[cfg(test)]
fn entries(path: &Path) -> Vec<(ObjectId, Vec<u8>)> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() - at >= ENTRY_HEADER_LEN {
        let id = ObjectId::from_bytes(data[at..at + 16].try_into().unwrap());
        let len = u32::from_be_bytes(data[at + 16..at + 20].try_into().unwrap()) as usize;
        out.push((id, data[at + 20..at + 20 + len].to_vec()));
        at += 20 + len;
    }
    out
}

#[cfg(test)]
impl Wal {
    /// Generation files on disk.
    fn generations(&self) -> usize {
        self.shared.lock().generations.len()
    }

    /// Runs a checkpoint now (the thread runs one every half second).
    fn checkpoint_now(&self) {
        checkpoint(&self.shared).unwrap();
    }

    fn current_generation_path(&self) -> PathBuf {
        generation_path(&self.shared.dir, self.shared.lock().generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;
    use crate::crypto::format::{self, DEFAULT_SEGMENT_SIZE, HeaderFields, decrypt_object, derive_spool_key};
    use crate::ingest::spool::test_bytes::{data, same};
    use crate::ingest::spool::{FileJournal, Journal, JournalKeys, JournalPlace};
    use ring::aead::LessSafeKey;

    const SEG: usize = DEFAULT_SEGMENT_SIZE as usize;

    struct Upload {
        id: ObjectId,
        dek: DataKey,
        spool: LessSafeKey,
        fields: HeaderFields,
    }

    impl Upload {
        fn new() -> Self {
            let id = ObjectId::new_random();
            let dek = DataKey::generate().unwrap();
            let spool = derive_spool_key(&dek, id.as_bytes()).unwrap();
            let fields = HeaderFields::new(1, *id.as_bytes(), [7u8; 16], 1).unwrap();
            Self { id, dek, spool, fields }
        }

        fn keys(&self) -> JournalKeys<'_> {
            JournalKeys { spool: &self.spool, dek: &self.dek, fields: self.fields.clone() }
        }

        fn open(&self, wal: &Arc<Wal>) -> (Box<FileJournal>, Vec<u8>) {
            let mut got = Vec::new();
            let place = JournalPlace::Log(wal.clone());
            let journal = Journal::open(&place, self.id, &self.keys(), |p| got.extend_from_slice(p)).unwrap();
            let Journal::File(file) = journal else { panic!("a local journal") };
            (file, got)
        }

        /// What a plain (unlogged) open recovers from the files alone.
        fn recovered(&self, spool_dir: &Path) -> Vec<u8> {
            let mut got = Vec::new();
            FileJournal::open(spool_dir, self.id, &self.keys(), |p| got.extend_from_slice(p)).unwrap();
            got
        }

        fn segments(&self, spool_dir: &Path) -> PathBuf {
            segments_path(spool_dir, &self.id)
        }
    }

    /// Appends through the log and waits for the sync, as an ack does.
    fn append(j: &mut FileJournal, key: &LessSafeKey, data: &[u8]) {
        let body = j.append_logged(key, data, false).unwrap();
        j.submit(body, false).blocking_recv().unwrap().unwrap();
    }

    // A1/A2: segments written but never synced are lost by a power cut;
    // the log holds every acknowledged byte until a checkpoint syncs them.
    #[test]
    fn acked_bytes_survive_losing_every_unsynced_segment() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open_with(dir.path(), false).unwrap());
        let up = Upload::new();
        let (mut j, got) = up.open(&wal);
        assert!(got.is_empty());
        let all = data(3 * SEG + 4321, 3);
        for piece in all.chunks(1600) {
            append(&mut j, &up.spool, piece);
        }
        assert!(std::fs::metadata(up.segments(dir.path())).unwrap().len() > 3 * SEG as u64, "segments written");
        // The process dies: no checkpoint, no spill.
        std::mem::forget(j);
        drop(wal);
        // The cut keeps only the header of the segments file.
        let seg = up.segments(dir.path());
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(format::HEADER_LEN as u64).unwrap();
        drop(file);
        // Start-up moves the log into the journal file, then removes it.
        let wal = Arc::new(Wal::open(dir.path()).unwrap());
        assert_eq!(std::fs::read_dir(dir.path().join(WAL_DIR)).unwrap().count(), 1, "only the new generation");
        same(&up.recovered(dir.path()), &all);
        // And the upload goes on from there to a whole object.
        let (mut j, got) = up.open(&wal);
        same(&got, &all);
        let more = data(777, 9);
        append(&mut j, &up.spool, &more);
        let (size, _) = j.seal().unwrap();
        let object = std::fs::read(&seg).unwrap();
        let want = [all, more].concat();
        assert_eq!(size, want.len() as u64);
        same(&decrypt_object(&up.dek, &object).unwrap().1, &want);
    }

    #[test]
    fn a_resumed_upload_reads_its_records_back_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open_with(dir.path(), false).unwrap());
        let up = Upload::new();
        let (mut j, _) = up.open(&wal);
        let first = data(SEG + 100, 1);
        for piece in first.chunks(999) {
            append(&mut j, &up.spool, piece);
        }
        drop(j);
        // Reopened before any checkpoint: the records are taken from the log.
        let (mut j, got) = up.open(&wal);
        same(&got, &first);
        let second = data(2 * SEG, 2);
        append(&mut j, &up.spool, &second);
        drop(j);
        wal.checkpoint_now();
        let want = [first, second].concat();
        same(&up.recovered(dir.path()), &want);
        let (_, got) = up.open(&wal);
        same(&got, &want);
    }

    #[test]
    fn checkpoints_spill_closed_uploads_and_delete_what_nothing_needs() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open_with(dir.path(), false).unwrap());
        let live = Upload::new();
        let closed = Upload::new();
        let (mut lj, _) = live.open(&wal);
        let (mut cj, _) = closed.open(&wal);
        let tail = data(5000, 4);
        append(&mut cj, &closed.spool, &tail);
        drop(cj);
        // Enough for several generations; the live upload seals segments
        // all along, so only its tail stays needed.
        let chunk = data(4 << 20, 5);
        let mut sent = Vec::new();
        while wal.shared.lock().generation < 4 {
            append(&mut lj, &live.spool, &chunk);
            sent.extend_from_slice(&chunk);
        }
        assert!(wal.generations() >= 4);
        // The next bytes seal the segment held back at the end of the last
        // generation, so nothing needs it any more.
        let last = data(1000, 6);
        append(&mut lj, &live.spool, &last);
        sent.extend_from_slice(&last);
        wal.checkpoint_now();
        assert_eq!(wal.generations(), 1, "only the current generation is left");
        assert!(!wal.shared.lock().pins.contains_key(&closed.id), "the closed upload is spilled");
        same(&closed.recovered(dir.path()), &tail);
        // The live upload: its segments were synced by the checkpoint, and
        // its tail is still in the current generation.
        let current = wal.current_generation_path();
        assert!(entries(&current).iter().any(|(id, _)| *id == live.id));
        std::mem::forget(lj);
        drop(wal);
        let _wal = Wal::open(dir.path()).unwrap();
        same(&live.recovered(dir.path()), &sent);
    }

    // At many live calls one syncfs stands for a sync per segments file.
    // That it makes them durable is the power-cut tests' part (A2, with
    // `checkpoint-syncfs`, which asserts the path was traced); here, that
    // a checkpoint with more than SYNCFS_FROM dirty files succeeds, clears
    // every file's dirty mark and leaves every upload whole.
    #[test]
    fn a_checkpoint_of_many_dirty_segments_files_syncs_them_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open_with(dir.path(), false).unwrap());
        let uploads: Vec<Upload> = (0..SYNCFS_FROM + 1).map(|_| Upload::new()).collect();
        let mut journals = Vec::new();
        let mut sent = Vec::new();
        for (i, up) in uploads.iter().enumerate() {
            let (mut j, _) = up.open(&wal);
            // The second append seals a segment that holds the first one's
            // record: its segments file is now dirty.
            let (a, b) = (data(SEG / 2, i as u8), data(SEG, i as u8 + 100));
            append(&mut j, &up.spool, &a);
            append(&mut j, &up.spool, &b);
            journals.push(j);
            sent.push([a, b].concat());
        }
        let dirty = || wal.shared.lock().pins.values().filter(|p| p.seg_dirty).count();
        assert_eq!(dirty(), uploads.len());
        wal.checkpoint_now();
        assert_eq!(dirty(), 0, "every segments file counted as synced");
        for j in journals {
            std::mem::forget(j);
        }
        drop(wal);
        let _wal = Wal::open(dir.path()).unwrap();
        for (up, want) in uploads.iter().zip(&sent) {
            same(&up.recovered(dir.path()), want);
        }
    }

    #[test]
    fn a_checkpoint_never_spills_an_upload_reopened_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open_with(dir.path(), false).unwrap());
        let up = Upload::new();
        let (mut j, _) = up.open(&wal);
        append(&mut j, &up.spool, &data(100, 1));
        let closed_as = wal.shared.lock().pins[&up.id].token;
        drop(j);
        // Reopened (and written to) after the checkpoint listed it closed.
        let (mut j, _) = up.open(&wal);
        append(&mut j, &up.spool, &data(100, 2));
        spill(&wal.shared, &up.id, Spill::Closed(closed_as)).unwrap();
        let st = wal.shared.lock();
        let pin = &st.pins[&up.id];
        assert!(pin.live && pin.token != closed_as && pin.records.len() == 1, "the live upload is left alone");
    }

    #[test]
    fn a_torn_entry_ends_the_log_and_a_removed_upload_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open_with(dir.path(), false).unwrap());
        let kept = Upload::new();
        let gone = Upload::new();
        let (mut kj, _) = kept.open(&wal);
        let (mut gj, _) = gone.open(&wal);
        let bytes = data(3000, 6);
        append(&mut kj, &kept.spool, &bytes);
        append(&mut gj, &gone.spool, &bytes);
        let path = wal.current_generation_path();
        std::mem::forget(kj);
        drop(gj);
        Journal::remove(&JournalPlace::Log(wal.clone()), &gone.id).unwrap();
        drop(wal);
        // Half an entry at the end, as a cut during a write leaves.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(kept.id.as_bytes()).unwrap();
        f.write_all(&1000u32.to_be_bytes()).unwrap();
        f.write_all(&[0xAB; 10]).unwrap();
        drop(f);
        let _wal = Wal::open(dir.path()).unwrap();
        same(&kept.recovered(dir.path()), &bytes);
        assert!(!journal_path(dir.path(), &gone.id).exists(), "no journal comes back for a removed upload");
        assert!(!gone.segments(dir.path()).exists());
    }
}
