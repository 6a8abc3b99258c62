//! Cross-stream group commit of local journals (`ingest.sync = "filesystem"`).
//!
//! With one `fdatasync` per stream per `commit_interval`, thousands of live
//! calls want tens of thousands of syncs a second, each a blocking-pool
//! thread parked on the disk (BENCHMARKS.md, "Concurrent live calls").
//! Here the streams only write; one thread calls `syncfs(2)` on the spool's
//! file system in a loop, and every stream whose writes finished before a
//! call began is acknowledged when that call returns. One sync covers every
//! stream that had bytes in the window.
//!
//! `syncfs` writes back and waits for all dirty data of the file system and
//! commits its journal (with a cache flush), and since Linux 5.8 reports a
//! write-back error of any file on it. It also flushes other files on the
//! same file system, so the spool should have a volume of its own
//! (docs/FAULTS.md). An error is sticky: it fails that call's waiters and
//! every later one until the process restarts (as PostgreSQL does after a
//! failed fsync), because `syncfs` reports a write-back error only once,
//! to whichever call is running, and a waiter whose pages failed during an
//! earlier call would otherwise be acknowledged by a clean later one.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

/// A running group-commit thread for one directory's file system.
pub struct GroupSync {
    shared: Arc<Shared>,
    done: watch::Receiver<Finished>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Calls started so far.
    started: u64,
    /// A waiter wants a call that starts after it registered.
    wanted: bool,
    stop: bool,
}

/// The last finished call, and whether any call ever failed.
#[derive(Debug, Clone, Copy, Default)]
struct Finished {
    call: u64,
    failed: bool,
}

impl GroupSync {
    /// Starts the thread syncing the file system that holds `dir`.
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        let fd = File::open(dir)?;
        // Fail at start-up, not at the first ack, where syncfs is missing.
        rustix::fs::syncfs(&fd)?;
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new() });
        let (tx, done) = watch::channel(Finished::default());
        let worker = shared.clone();
        std::thread::Builder::new().name("recvault-syncfs".into()).spawn(move || run(&worker, &fd, &tx))?;
        Ok(Self { shared, done })
    }

    /// Returns once everything written before the call is durable.
    pub async fn sync(&self) -> std::io::Result<()> {
        let need = {
            let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            st.wanted = true;
            // A call already under way may have begun before our writes.
            st.started + 1
        };
        self.shared.wake.notify_one();
        let mut done = self.done.clone();
        let finished = *done
            .wait_for(|f| f.call >= need)
            .await
            .map_err(|_| std::io::Error::other("the group commit thread stopped"))?;
        if finished.failed {
            return Err(std::io::Error::other(
                "syncfs of the spool failed earlier: written bytes may not be durable; restart the server",
            ));
        }
        Ok(())
    }
}

impl Drop for GroupSync {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.shared.wake.notify_one();
    }
}

fn run(shared: &Shared, fd: &File, tx: &watch::Sender<Finished>) {
    loop {
        let call = {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            while !st.wanted && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
            st.wanted = false;
            st.started += 1;
            st.started
        };
        let result = rustix::fs::syncfs(fd);
        if let Err(e) = &result {
            tracing::error!(error = %e, "syncfs of the spool failed; unacknowledged bytes are not durable");
        }
        tx.send_modify(|f| {
            f.call = call;
            f.failed |= result.is_err();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiter_gets_a_call_that_began_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(GroupSync::start(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64 {
            let sync = sync.clone();
            let path = dir.path().join(format!("f{i}"));
            tasks.push(tokio::spawn(async move {
                for round in 0..5 {
                    std::fs::write(&path, format!("{round}")).unwrap();
                    let before = sync.shared.state.lock().unwrap().started;
                    sync.sync().await.unwrap();
                    assert!(sync.done.borrow().call > before, "a call that began after the write finished");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let calls = sync.done.borrow().call;
        assert!(calls < 64 * 5, "calls are shared between streams: {calls} for 320 syncs");
    }
}
