//! Group commit for a SQLite database: one writer thread, many reader connections.
//!
//! With `synchronous=FULL` every transaction costs an `fsync` of the WAL;
//! one connection behind a lock made every write of every caller wait for
//! the `fsync`s of all the writes queued before it (issue #7: from 2 000
//! live calls on, opens queued for seconds behind commits). Here one thread
//! owns the write connection and takes every write queued while it was
//! busy into one transaction: each write runs in its own savepoint (a
//! failed one rolls back alone and answers its own error), then one
//! `COMMIT` — one `fsync` — makes the batch durable, and only then does any
//! caller get its answer. A failed `COMMIT` fails every write of the batch.
//! Nothing is acknowledged before it is durable, as before; a write never
//! sees another's uncommitted state except inside the same batch, whose
//! fate it shares.
//!
//! Reads run on their own connections (WAL mode lets readers work beside
//! the writer), each in one read transaction, so a listing or a readiness
//! probe never waits behind a queue of writes. Up to [`READERS`] are
//! opened as needed; each is lent to the blocking thread running one query
//! and handed back by it. Reader connections are `query_only`: a read that
//! tries to write fails.
//!
//! A private in-memory database has one connection; its reads go through
//! the writer.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, mpsc};

use rusqlite::Connection;

/// Most writes taken into one transaction: bounds how long the first
/// writer of a batch waits for the statements of the others.
const MAX_BATCH: usize = 512;

/// Most reader connections of a file database.
pub const READERS: usize = 8;

/// Why a database call failed outside the caller's own code.
#[derive(Debug, Clone)]
pub struct GroupError(pub String);

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One queued write: runs inside the batch's transaction, then learns the
/// batch's fate.
trait Work<S>: Send {
    /// Runs the caller's code; false when it failed (its savepoint is then
    /// rolled back).
    fn run(&mut self, conn: &mut Connection, state: &mut S) -> bool;
    /// Answers the caller: its own result when the batch committed, the
    /// commit's error when not.
    fn finish(self: Box<Self>, committed: Result<(), GroupError>);
}

struct Call<T, E, F, A> {
    f: Option<F>,
    out: Option<Result<T, E>>,
    /// Runs on the writer thread once the write is durable, before its
    /// caller is answered and whether or not the caller still waits.
    after: A,
    reply: tokio::sync::oneshot::Sender<Result<T, E>>,
}

impl<S, T, E, F, A> Work<S> for Call<T, E, F, A>
where
    T: Send,
    E: From<GroupError> + Send,
    F: FnOnce(&mut Connection, &mut S) -> Result<T, E> + Send,
    A: FnOnce(&T) + Send,
{
    fn run(&mut self, conn: &mut Connection, state: &mut S) -> bool {
        let Some(f) = self.f.take() else { return false };
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(conn, state))) {
            Ok(out) => {
                let ok = out.is_ok();
                self.out = Some(out);
                ok
            }
            Err(_) => {
                tracing::error!("a database write panicked; its changes are rolled back");
                self.out = Some(Err(GroupError("a database write failed unexpectedly".into()).into()));
                false
            }
        }
    }

    fn finish(self: Box<Self>, committed: Result<(), GroupError>) {
        let out = match committed {
            Ok(()) => self.out.unwrap_or_else(|| Err(GroupError("a database write did not run".into()).into())),
            Err(e) => Err(e.into()),
        };
        if let Ok(t) = &out {
            (self.after)(t);
        }
        // The caller may have gone (its request was cancelled): the write
        // stands, as a committed write always did.
        let _ = self.reply.send(out);
    }
}

struct Queued<S> {
    work: Box<dyn Work<S>>,
    /// Runs alone, outside any transaction (a WAL checkpoint).
    solo: bool,
}

/// The writer thread's queue, and the reader connections of a file database.
pub struct Group<S> {
    queue: mpsc::Sender<Queued<S>>,
    readers: Option<Arc<Readers>>,
}

struct Readers {
    path: PathBuf,
    setup: &'static str,
    pool: Mutex<Pool>,
    /// Signalled when a connection is handed back (or given up).
    freed: Condvar,
}

struct Pool {
    idle: Vec<Connection>,
    /// Connections open, idle or lent.
    open: usize,
}

/// A reader connection lent to one blocking-pool thread; back to the pool
/// on drop (or given up, if it may be mid-transaction after a panic).
struct Lent<'a> {
    readers: &'a Readers,
    conn: Option<Connection>,
}

impl Readers {
    /// Lends an idle connection, opens one while fewer than [`READERS`]
    /// are open, or waits for one to be handed back. Called on a blocking
    /// thread, so a connection is held only while its query runs: never
    /// across an async wake-up (a reader pool guarded by an async permit
    /// held each read for the scheduler's latency too, and under load
    /// served a few reads a second).
    fn lend(&self) -> Result<Lent<'_>, GroupError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok(Lent { readers: self, conn: Some(conn) });
            }
            if pool.open < READERS {
                pool.open += 1;
                drop(pool);
                return match open_reader(&self.path, self.setup) {
                    Ok(conn) => Ok(Lent { readers: self, conn: Some(conn) }),
                    Err(e) => {
                        self.give_up();
                        Err(e)
                    }
                };
            }
            pool = self.freed.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn give_up(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).open -= 1;
        self.freed.notify_one();
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(conn) if !std::thread::panicking() => {
                self.readers.pool.lock().unwrap_or_else(|p| p.into_inner()).idle.push(conn);
                self.readers.freed.notify_one();
            }
            _ => self.readers.give_up(),
        }
    }
}

impl<S: Clone + Send + 'static> Group<S> {
    /// Starts the writer thread on `writer`. `readers` gives the database
    /// file and the pragmas every reader connection runs first; `None`
    /// sends reads through the writer (an in-memory database).
    pub fn start(
        name: &str,
        writer: Connection,
        state: S,
        readers: Option<(PathBuf, &'static str)>,
    ) -> Result<Self, GroupError> {
        let readers = match readers {
            None => None,
            Some((path, setup)) => {
                // One now, so a database that readers cannot open fails here.
                let first = open_reader(&path, setup)?;
                Some(Arc::new(Readers {
                    path,
                    setup,
                    pool: Mutex::new(Pool { idle: vec![first], open: 1 }),
                    freed: Condvar::new(),
                }))
            }
        };
        let (tx, rx) = mpsc::channel::<Queued<S>>();
        let group = name.to_owned();
        std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || write_loop(&group, writer, state, rx))
            .map_err(|e| GroupError(format!("cannot start the {name} writer thread: {e}")))?;
        Ok(Self { queue: tx, readers })
    }

    /// Runs `f` in the next batch; answers once the batch is durable.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<GroupError> + Send + 'static,
        F: FnOnce(&mut Connection, &mut S) -> Result<T, E> + Send + 'static,
    {
        self.enqueue(f, |_: &T| {}, false).await
    }

    /// As [`write`](Self::write), and once the write is durable (and only
    /// then) `after` runs with its result on the writer thread, even if the
    /// caller has stopped waiting: what must follow a committed write (a
    /// cached head moving on) cannot be lost to a cancelled request.
    pub async fn write_then<T, E, F, A>(&self, f: F, after: A) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<GroupError> + Send + 'static,
        F: FnOnce(&mut Connection, &mut S) -> Result<T, E> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        self.enqueue(f, after, false).await
    }

    /// Runs `f` alone on the write connection, outside any transaction.
    pub async fn solo<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<GroupError> + Send + 'static,
        F: FnOnce(&mut Connection, &mut S) -> Result<T, E> + Send + 'static,
    {
        self.enqueue(f, |_: &T| {}, true).await
    }

    async fn enqueue<T, E, F, A>(&self, f: F, after: A, solo: bool) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<GroupError> + Send + 'static,
        F: FnOnce(&mut Connection, &mut S) -> Result<T, E> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let work = Box::new(Call { f: Some(f), out: None, after, reply });
        self.queue.send(Queued { work, solo }).map_err(|_| GroupError("the database writer has stopped".into()))?;
        answer.await.map_err(|_| GroupError("the database writer has stopped".into()))?
    }

    /// Runs `f` in one read transaction on a reader connection (through the
    /// writer for an in-memory database).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<GroupError> + Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    {
        let Some(readers) = self.readers.clone() else {
            return self.write(move |conn, _| f(conn)).await;
        };
        tokio::task::spawn_blocking(move || {
            let mut lent = readers.lend()?;
            let conn = lent.conn.as_mut().expect("a lent connection");
            if let Err(e) = conn.execute_batch("BEGIN") {
                lent.conn = None;
                return Err(GroupError(format!("cannot begin a read: {e}")).into());
            }
            let out = f(conn);
            // Read-only: ending it cannot lose anything; a connection whose
            // transaction cannot end is given up, not reused.
            if conn.execute_batch("ROLLBACK").is_err() {
                lent.conn = None;
            }
            out
        })
        .await
        .map_err(|e| GroupError(format!("database read task: {e}")))?
    }
}

fn open_reader(path: &std::path::Path, setup: &str) -> Result<Connection, GroupError> {
    let conn = Connection::open(path).map_err(|e| GroupError(format!("cannot open a reader connection: {e}")))?;
    conn.execute_batch(setup).map_err(|e| GroupError(format!("cannot set up a reader connection: {e}")))?;
    conn.execute_batch("PRAGMA query_only=ON;")
        .map_err(|e| GroupError(format!("cannot set up a reader connection: {e}")))?;
    Ok(conn)
}

fn write_loop<S: Clone>(group: &str, mut conn: Connection, mut state: S, rx: mpsc::Receiver<Queued<S>>) {
    let mut held: Option<Queued<S>> = None;
    // Set once a COMMIT failed on an I/O error: fail closed from then on.
    let mut failed: Option<GroupError> = None;
    loop {
        let first = match held.take() {
            Some(q) => q,
            None => match rx.recv() {
                Ok(q) => q,
                // Every handle is gone: the connection closes with the thread.
                Err(_) => return,
            },
        };
        if let Some(e) = &failed {
            first.work.finish(Err(e.clone()));
            continue;
        }
        if first.solo {
            let mut work = first.work;
            work.run(&mut conn, &mut state);
            work.finish(Ok(()));
            continue;
        }
        let mut batch = vec![first.work];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(q) if q.solo => {
                    held = Some(q);
                    break;
                }
                Ok(q) => batch.push(q.work),
                Err(_) => break,
            }
        }
        failed = commit_batch(group, &mut conn, &mut state, batch);
    }
}

/// Runs one batch in one transaction and answers every write of it. Returns
/// the error every later write gets when the COMMIT failed on an I/O error:
/// after a failed `fsync` the kernel may have dropped pages it had already
/// marked clean, so nothing written through this connection is trusted to
/// be durable again until the server restarts (and SQLite recovers the
/// database from what is really on disk), as the ingest log does.
fn commit_batch<S: Clone>(
    group: &str,
    conn: &mut Connection,
    state: &mut S,
    batch: Vec<Box<dyn Work<S>>>,
) -> Option<GroupError> {
    let fail_all = |batch: Vec<Box<dyn Work<S>>>, e: GroupError| {
        for work in batch {
            work.finish(Err(e.clone()));
        }
    };
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        fail_all(batch, GroupError(format!("cannot begin a write: {e}")));
        return None;
    }
    let before = state.clone();
    let mut ran = Vec::with_capacity(batch.len());
    let mut batch = batch.into_iter();
    while let Some(mut work) = batch.next() {
        if let Err(e) = conn.execute_batch("SAVEPOINT batched_write") {
            work.finish(Err(GroupError(format!("cannot begin a write: {e}"))));
            continue;
        }
        let saved = state.clone();
        let ok = work.run(conn, state);
        let closed = if ok {
            conn.execute_batch("RELEASE batched_write")
        } else {
            *state = saved;
            conn.execute_batch("ROLLBACK TO batched_write; RELEASE batched_write")
        };
        ran.push(work);
        if let Err(e) = closed {
            // The transaction is in an unknown state: give up the batch,
            // the writes not yet run included, all with the same answer.
            let _ = conn.execute_batch("ROLLBACK");
            *state = before;
            ran.extend(batch);
            fail_all(ran, GroupError(format!("a write could not be closed: {e}")));
            return None;
        }
    }
    match commit(group, conn) {
        Ok(()) => {
            for work in ran {
                work.finish(Ok(()));
            }
            None
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            *state = before;
            tracing::error!(group, error = %e, writes = ran.len(), "database commit failed; the batch is rolled back");
            let io = e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure);
            fail_all(ran, GroupError(format!("the database commit failed: {e}")));
            io.then(|| {
                tracing::error!(
                    group,
                    "the database refuses every write from now on: restart the server once the disk is sound"
                );
                GroupError(format!(
                    "the database refuses writes since a commit failed on an I/O error ({e}); \
                     restart the server once the disk is sound"
                ))
            })
        }
    }
}

/// COMMIT. Tests make it fail as a failed `fsync` does (SQLITE_IOERR_FSYNC)
/// with the failure point `sqlite-commit-<group>`, a name per group so
/// that other tests' databases are not hit.
fn commit(group: &str, conn: &Connection) -> rusqlite::Result<()> {
    fail::fail_point!(&format!("sqlite-commit-{group}"), |_| Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
        Some("disk I/O error (injected by a test)".into())
    )));
    let _ = group; // only the failure point reads it
    conn.execute_batch("COMMIT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum TestError {
        Group(#[allow(dead_code)] GroupError),
        Sql(#[allow(dead_code)] rusqlite::Error),
        Refused,
    }
    impl From<GroupError> for TestError {
        fn from(e: GroupError) -> Self {
            Self::Group(e)
        }
    }
    impl From<rusqlite::Error> for TestError {
        fn from(e: rusqlite::Error) -> Self {
            Self::Sql(e)
        }
    }

    fn file_group(dir: &std::path::Path) -> Group<u64> {
        let path = dir.join("db.sqlite");
        let setup = "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;";
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(setup).unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)").unwrap();
        Group::start("test", conn, 0u64, Some((path, setup))).unwrap()
    }

    async fn count(g: &Group<u64>) -> i64 {
        g.read(|c| c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get::<_, i64>(0)).map_err(TestError::from))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_all_land_and_a_failed_one_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(file_group(dir.path()));
        let mut tasks = Vec::new();
        for k in 0..200i64 {
            let g = g.clone();
            tasks.push(tokio::spawn(async move {
                g.write(move |c, n| {
                    c.execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])?;
                    *n += 1;
                    // Every tenth write changes a row, then refuses: its
                    // change and its state update must both roll back.
                    if k % 10 == 0 {
                        c.execute("INSERT INTO t (k, v) VALUES (?1, 'refused')", [k + 1000])?;
                        return Err(TestError::Refused);
                    }
                    Ok(*n)
                })
                .await
            }));
        }
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => {}
                Err(TestError::Refused) => refused += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(refused, 20);
        assert_eq!(count(&g).await, 180);
        let n = g.write(|_, n| Ok::<_, TestError>(*n)).await.unwrap();
        assert_eq!(n, 180, "the state of refused writes is rolled back with them");
    }

    #[tokio::test]
    async fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let g = file_group(dir.path());
        let r: Result<(), TestError> = g
            .write(|c, _| {
                c.execute("INSERT INTO t (k, v) VALUES (1, 'x')", [])?;
                panic!("boom")
            })
            .await;
        assert!(matches!(r, Err(TestError::Group(_))));
        g.write(|c, _| c.execute("INSERT INTO t (k, v) VALUES (2, 'y')", []).map_err(TestError::from)).await.unwrap();
        assert_eq!(count(&g).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_reads_share_at_most_readers_connections() {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(file_group(dir.path()));
        g.write(|c, _| c.execute("INSERT INTO t (k, v) VALUES (1, 'x')", []).map_err(TestError::from)).await.unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move {
                    g.read(|c| {
                        // Long enough that readers overlap and wait for a
                        // connection to be handed back.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        Ok::<_, TestError>(c.query_row("SELECT v FROM t WHERE k = 1", [], |r| r.get::<_, String>(0))?)
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "x");
        }
        let readers = g.readers.as_ref().unwrap();
        let pool = readers.pool.lock().unwrap();
        assert!(pool.open <= READERS && pool.open == pool.idle.len(), "{} open, {} idle", pool.open, pool.idle.len());
    }

    #[tokio::test]
    async fn readers_cannot_write_and_see_committed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let g = file_group(dir.path());
        let r = g.read(|c| c.execute("INSERT INTO t (k, v) VALUES (1, 'x')", []).map_err(TestError::from)).await;
        assert!(matches!(r, Err(TestError::Sql(_))), "{r:?}");
        g.write(|c, _| c.execute("INSERT INTO t (k, v) VALUES (1, 'x')", []).map_err(TestError::from)).await.unwrap();
        assert_eq!(count(&g).await, 1, "an answered write is visible to the next read");
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_batch_and_restores_the_state() {
        // A deferred foreign key violation is only found at COMMIT.
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys=ON;
             CREATE TABLE p (k INTEGER PRIMARY KEY);
             CREATE TABLE c (k INTEGER REFERENCES p(k) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let g = Group::start("test", conn, 0u64, None).unwrap();
        let r = g
            .write(|c, n| {
                c.execute("INSERT INTO c (k) VALUES (7)", [])?;
                *n = 5;
                Ok::<_, TestError>(())
            })
            .await;
        assert!(matches!(r, Err(TestError::Group(_))), "{r:?}");
        let rows = g
            .read(|c| Ok::<_, TestError>(c.query_row("SELECT COUNT(*) FROM c", [], |r| r.get::<_, i64>(0))?))
            .await
            .unwrap();
        assert_eq!(rows, 0);
        let state = g.write(|_, n| Ok::<_, TestError>(*n)).await.unwrap();
        assert_eq!(state, 0, "the state is rolled back with the batch");
    }

    /// Holds the writer thread until the sender is used (or dropped), so
    /// that the writes queued meanwhile make one batch. The returned future
    /// has been polled once: its job is first in the queue.
    async fn hold_writer(
        g: &Group<u64>,
    ) -> (std::sync::mpsc::Sender<()>, std::pin::Pin<Box<impl std::future::Future<Output = Result<(), TestError>> + '_>>)
    {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let mut gate = Box::pin(g.solo(move |_, _| {
            let _ = held.recv();
            Ok::<_, TestError>(())
        }));
        assert!(futures::poll!(&mut gate).is_pending());
        (release, gate)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writes_queued_together_commit_together_and_fail_together() {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(file_group(dir.path()));
        // Outside a transaction, where the pragma takes effect.
        g.solo(|c, _| {
            c.execute_batch(
                "PRAGMA foreign_keys=ON;
                 CREATE TABLE parent (k INTEGER PRIMARY KEY);
                 CREATE TABLE child (k INTEGER REFERENCES parent(k) DEFERRABLE INITIALLY DEFERRED);",
            )
            .map_err(TestError::from)
        })
        .await
        .unwrap();
        // Three writes in one batch, one of which breaks a deferred foreign
        // key: the COMMIT fails and all three fail with it, their state too.
        let (release, gate) = hold_writer(&g).await;
        let mut writes = Vec::new();
        for k in 0..3i64 {
            let mut w = Box::pin(g.write(move |c, n| {
                c.execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])?;
                if k == 1 {
                    c.execute("INSERT INTO child (k) VALUES (99)", [])?;
                }
                *n += 1;
                Ok::<_, TestError>(*n)
            }));
            // Polled once: queued behind the held writer.
            assert!(futures::poll!(&mut w).is_pending());
            writes.push(w);
        }
        release.send(()).unwrap();
        gate.await.unwrap();
        for w in writes {
            assert!(matches!(w.await, Err(TestError::Group(_))));
        }
        assert_eq!(count(&g).await, 0);
        assert_eq!(g.write(|_, n| Ok::<_, TestError>(*n)).await.unwrap(), 0);

        // The same three without the bad row: one batch, and all land.
        let (release, gate) = hold_writer(&g).await;
        let mut writes = Vec::new();
        for k in 0..3i64 {
            let mut w = Box::pin(g.write(move |c, n| {
                c.execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])?;
                *n += 1;
                Ok::<_, TestError>(*n)
            }));
            assert!(futures::poll!(&mut w).is_pending());
            writes.push(w);
        }
        release.send(()).unwrap();
        gate.await.unwrap();
        let mut seen = Vec::new();
        for w in writes {
            seen.push(w.await.unwrap());
        }
        assert_eq!(seen, [1, 2, 3], "each write of the batch sees the state the ones before it left");
        assert_eq!(count(&g).await, 3);
    }

    /// A COMMIT failing on an I/O error (as after a failed `fsync`) fails
    /// its batch, and every later write until the database is opened again
    /// (a restart), even once the disk works; reads go on meanwhile.
    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn a_commit_failing_on_an_io_error_refuses_every_later_write_until_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let setup = "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;";
        let open = |name: &str| {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(setup).unwrap();
            conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)").unwrap();
            Group::start(name, conn, 0u64, Some((path.clone(), setup))).unwrap()
        };
        async fn insert(g: &Group<u64>, k: i64) -> Result<u64, TestError> {
            g.write(move |c, n| {
                c.execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])?;
                *n += 1;
                Ok(*n)
            })
            .await
        }
        let g = open("ioerr");
        assert_eq!(insert(&g, 1).await.unwrap(), 1);

        fail::cfg("sqlite-commit-ioerr", "1*return").unwrap();
        let failed = insert(&g, 2).await;
        let Err(TestError::Group(e)) = failed else { panic!("the failed commit was answered {failed:?}") };
        assert!(e.to_string().contains("commit failed"), "{e}");

        // The failure point is spent: the next COMMIT would succeed, but
        // after a failed fsync nothing this connection writes is trusted.
        let refused = insert(&g, 3).await;
        let Err(TestError::Group(e)) = refused else { panic!("a write after it was answered {refused:?}") };
        assert!(e.to_string().contains("restart the server"), "{e}");
        assert_eq!(count(&g).await, 1, "reads still answer, and neither refused write is visible");

        drop(g);
        let g = open("ioerr-restarted");
        assert_eq!(insert(&g, 4).await.unwrap(), 1, "a restart writes again");
        assert_eq!(count(&g).await, 2);
        fail::remove("sqlite-commit-ioerr");
    }
}
