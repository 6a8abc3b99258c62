//! Uploads a long recording into a remote store while it streams in.
//!
//! A local journal's segments file is the object in the making, and its
//! durable prefix never changes (full segments seal deterministically). So
//! while a call streams, a follower reads that prefix in whole parts and
//! hands them to a multipart upload; at finish only the last part and the
//! completion remain, and the object lands in the bucket about when the
//! last byte is acknowledged instead of one whole upload later
//! (BENCHMARKS.md, "Bulk ingest into S3").
//!
//! The follower is an optimisation, never a source of truth: acks wait for
//! the journal only. If a part fails while the call streams, or the stream
//! ends without a finish, its upload is aborted and the finish copies the
//! sealed file as a whole ([`crate::store::Store::publish_file`]); a
//! failure during the finish itself is the commit's answer (the store's
//! retry policy already ran, and the journal stays for the next finish).
//! Memory stays bounded:
//! it reads only whole parts, so a slow live call holds nothing until it
//! has a part's worth of audio, and at most [`FEEDS`] feeds run at once.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::model::ObjectId;
use crate::store::{ObjectWriter, PART_SIZE, SINGLE_PUT_MAX, Store, StoreError};

/// The first feed: past the single-PUT limit, so the writer opens its
/// multipart upload at once and keeps no part back.
const FIRST_FEED: u64 = (SINGLE_PUT_MAX + PART_SIZE) as u64;

/// Feeds under way at once, across every upload: each holds its chunk, the
/// writer's copy and the parts in flight (under 80 MiB at the first feed),
/// so this bounds the followers' memory however many calls stream. A
/// follower waiting for a turn holds nothing; what it has not uploaded by
/// the finish is uploaded then.
static FEEDS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// What the session tells the follower: the durable length of the
/// segments file, and whether it is sealed (final).
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    durable: u64,
    sealed: bool,
}

/// A running follower of one upload.
pub struct Follower {
    progress: watch::Sender<Progress>,
    task: JoinHandle<Outcome>,
}

/// How a follower ended.
#[derive(Debug)]
pub enum Outcome {
    /// The object is committed (or [`StoreError::AlreadyExists`] came back
    /// from the commit, as from [`ObjectWriter::commit`]).
    Committed(Result<(), StoreError>),
    /// It failed while the call was still streaming, or ended unfinished;
    /// its upload was aborted and the finish must publish the file itself.
    GaveUp(StoreError),
}

impl Follower {
    /// Starts following the segments file at `path` of object `id`.
    pub fn start(store: Store, id: ObjectId, path: PathBuf) -> Self {
        let (progress, rx) = watch::channel(Progress::default());
        let task = tokio::spawn(follow(store, id, path, rx));
        Self { progress, task }
    }

    /// The segments file is durable up to `len` bytes.
    pub fn durable(&self, len: u64) {
        self.progress.send_if_modified(|p| {
            let grew = len > p.durable;
            p.durable = p.durable.max(len);
            grew
        });
    }

    /// The file is sealed at `len` bytes: uploads the rest and commits.
    pub async fn finish(self, len: u64) -> Outcome {
        self.progress.send_replace(Progress { durable: len, sealed: true });
        match self.task.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::GaveUp(StoreError::Backend(object_store::Error::JoinError { source: e })),
        }
    }
}

async fn follow(store: Store, id: ObjectId, path: PathBuf, mut rx: watch::Receiver<Progress>) -> Outcome {
    let mut writer: Option<ObjectWriter> = None;
    let mut file: Option<std::sync::Arc<std::fs::File>> = None;
    let mut fed = 0u64;
    let mut finishing = false;
    let result = async {
        loop {
            let Progress { durable, sealed } = *rx.borrow_and_update();
            finishing = sealed;
            // Whole parts only until sealed, then everything.
            let target = if sealed {
                durable
            } else if fed == 0 {
                if durable < FIRST_FEED { 0 } else { FIRST_FEED }
            } else {
                fed + (durable - fed) / PART_SIZE as u64 * PART_SIZE as u64
            };
            while fed < target {
                let _turn = FEEDS.acquire().await.map_err(|_| StoreError::Unsupported("no feeds".into()))?;
                if !sealed && rx.has_changed().is_err() {
                    // The stream ended (discarded, shredded, taken over):
                    // upload nothing more of it.
                    return Err(StoreError::Unsupported("the upload ended before its finish".into()));
                }
                if file.is_none() {
                    let f = std::fs::File::open(&path).map_err(io)?;
                    file = Some(std::sync::Arc::new(f));
                }
                let len = (target - fed).min(FIRST_FEED);
                let chunk = read_at(file.clone().expect("opened above"), fed, len as usize).await?;
                writer.get_or_insert_with(|| store.writer(id)).write(&chunk).await?;
                fed += len;
            }
            if sealed {
                // Every object has a header, so something was fed.
                return writer.take().expect("a sealed file is never empty").commit().await;
            }
            if rx.changed().await.is_err() {
                // The stream ended without a finish.
                return Err(StoreError::Unsupported("the upload ended before its finish".into()));
            }
        }
    }
    .await;
    if result.is_err()
        && let Some(w) = writer.take()
    {
        w.abort().await;
    }
    match result {
        Err(e) if !finishing => Outcome::GaveUp(e),
        done => Outcome::Committed(done),
    }
}

async fn read_at(file: std::sync::Arc<std::fs::File>, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map(|()| buf)
    })
    .await
    .map_err(|e| StoreError::Backend(object_store::Error::JoinError { source: e }))?
    .map_err(io)
}

fn io(e: std::io::Error) -> StoreError {
    object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) }.into()
}
