//! Streaming capture: durable encrypted spool, content checks, commit.
//!
//! An upload is identified by the client's `upload_id`. Its bytes go to a
//! journal (see [`spool`]): full segments sealed as in the final object,
//! the tail as records sealed under a spool key. An ack is sent only after
//! the journal is fsynced, so acknowledged bytes survive `kill -9`. Acks
//! are group-committed: one fsync covers everything received in the last
//! `commit_interval` (or `commit_bytes`), which bounds ack latency without
//! an fsync per message. At finish the last segment is sealed and the
//! journal's segments file becomes the object (linked into a local store,
//! copied into a remote one; a journal kept in the catalog is sealed into
//! the store from its records), write-once, and the catalog commit makes
//! the object visible.
//!
//! Only one stream drives an upload at a time. A reopening stream takes the
//! upload over from a stale one (a telephony platform reconnecting after a
//! network drop must not wait for the old TCP connection to time out).

mod follow;
pub mod sniff;
pub mod spool;
pub mod wal;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use ring::aead::LessSafeKey;
use ring::digest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audit::{Actor, AuditLog, Event};
use crate::catalog::{Catalog, CatalogError, CustomerState, UploadRecord};
use crate::clock::Clock;
use crate::crypto::DataKey;
use crate::crypto::format::{self, HeaderFields, ObjectEncryptor, SegmentSealer};
use crate::error::Error;
use crate::keys::KeyService;
use crate::model::{ContentKind, CustomerRef, ObjectId, ObjectRecord, ObjectSpec, Retention, UploadId};
use crate::retention::policy::Policies;
use crate::store::{Store, StoreError};
use sniff::{ContentChecker, SniffLimits};
use spool::{CatalogJournal, Journal, JournalPlace};

/// Size caps per content kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizeCaps {
    pub call_recording: u64,
    pub chat_transcript: u64,
    pub image: u64,
}

impl Default for SizeCaps {
    fn default() -> Self {
        Self {
            // Ten hours of 16-bit 48 kHz stereo WAV is ~7 GB.
            call_recording: 16 << 30,
            chat_transcript: 16 << 20,
            image: 32 << 20,
        }
    }
}

impl SizeCaps {
    pub fn for_kind(&self, kind: ContentKind) -> u64 {
        match kind {
            ContentKind::CallRecording => self.call_recording,
            ContentKind::ChatTranscript => self.chat_transcript,
            ContentKind::Image => self.image,
        }
    }
}

/// Tunables of the ingest path.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Where upload journal files live (ciphertext only).
    pub spool_dir: PathBuf,
    /// Keep journals in the catalog instead, shared by every replica
    /// (`ingest.journal = "catalog"`, docs/REPLICAS.md).
    pub shared_journal: bool,
    /// Longest time received bytes wait for their fsync (and ack).
    pub commit_interval: Duration,
    /// Flush early once this many bytes are pending.
    pub commit_bytes: usize,
    /// Write every local journal's records to one shared log, synced once
    /// per batch for every stream (`ingest.sync = "log"`, [`wal`]).
    pub shared_log: bool,
    /// A stream silent for this long, or whose client reads no answer for
    /// this long, is closed (its durable bytes are kept).
    pub idle_timeout: Duration,
    /// How long a reopening stream waits for a stale one to let go.
    pub takeover_timeout: Duration,
    pub caps: SizeCaps,
    /// Largest body of the unary `Put`.
    pub put_cap: u64,
    pub sniff: SniffLimits,
    /// Most ingest streams at once; 0 for no limit (`ingest.max_streams`).
    pub max_streams: usize,
}

impl IngestConfig {
    /// Received bytes a stream holds while its journal write is under way
    /// before it stops reading. HTTP/2 flow control then holds the sender
    /// back, so a stream's memory is bounded whatever the object's size: a
    /// client faster than the disk used to make the server buffer the
    /// difference (943 MiB of RSS for a 1 GiB upload; BENCHMARKS.md).
    /// Holding two batches instead was as fast as one with the 16 MiB
    /// stream window, for 15 MiB more memory (BENCHMARKS.md).
    pub fn pending_cap(&self) -> usize {
        self.commit_bytes.max(1)
    }

    pub fn new(spool_dir: PathBuf) -> Self {
        Self {
            spool_dir,
            shared_journal: false,
            commit_interval: Duration::from_millis(100),
            commit_bytes: 4 << 20,
            shared_log: false,
            idle_timeout: Duration::from_secs(120),
            takeover_timeout: Duration::from_secs(5),
            caps: SizeCaps::default(),
            put_cap: 4 << 20,
            sniff: SniffLimits::default(),
            max_streams: 0,
        }
    }
}

/// A client message of an ingest stream, already parsed.
#[derive(Debug)]
// `Open` comes once per stream; the 256 bytes every `Data` then takes in
// the channel are nothing beside the chunk it carries (up to 1 MiB).
#[allow(clippy::large_enum_variant)]
pub enum ClientMsg {
    Open { upload_id: UploadId, spec: ObjectSpec },
    Data { offset: u64, data: Bytes },
    Finish { expected_sha256: Option<[u8; 32]>, expected_size: Option<u64> },
}

/// A server message of an ingest stream. The records are boxed: every
/// stream queues these in a channel whose slots are allocated 32 at a time,
/// so their size is paid per live call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    /// The upload is open (or already committed); send from `durable_offset`.
    Opened {
        upload_id: UploadId,
        object_id: ObjectId,
        durable_offset: u64,
        committed: Option<Box<ObjectRecord>>,
    },
    /// Every byte before `durable_offset` survives a crash.
    Ack {
        durable_offset: u64,
    },
    Committed(Box<ObjectRecord>),
}

struct Active {
    customer_ref: CustomerRef,
    cancel: Arc<StreamCancel>,
    /// Distinguishes this holder from a later one of the same upload.
    generation: u64,
}

/// The ingest use-cases.
pub struct Ingest {
    cfg: IngestConfig,
    catalog: Arc<dyn Catalog>,
    keys: Arc<KeyService>,
    store: Store,
    policies: Arc<Policies>,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
    active: Mutex<HashMap<UploadId, Active>>,
    generation: std::sync::atomic::AtomicU64,
    released: tokio::sync::Notify,
    journals: JournalPlace,
    /// Admission of ingest streams (`ingest.max_streams`).
    streams: Option<Arc<tokio::sync::Semaphore>>,
}

/// An admitted ingest stream's place, given back when its session ends.
pub struct StreamAdmission(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

/// Holds an upload for one stream; releases it on drop.
struct Lease {
    ingest: Arc<Ingest>,
    upload_id: UploadId,
    generation: u64,
    cancel: Arc<StreamCancel>,
}

/// Tells the stream holding an upload to let it go: a newer stream took
/// the upload over, or its customer is being shredded.
///
/// tokio_util's `CancellationToken` did this before, but each poll of its
/// `cancelled()` takes a mutex (twice), and the session loop polls it on
/// every message: 2 % of the server's CPU at 3 000 live calls
/// (BENCHMARKS.md). Here a poll reads one flag once the task's waker is
/// registered.
#[derive(Default)]
struct StreamCancel {
    cancelled: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl StreamCancel {
    fn cancel(&self) {
        self.cancelled.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Ready once [`StreamCancel::cancel`] was called, before or after.
    fn cancelled(&self) -> Cancelled<'_> {
        Cancelled { cancel: self, notified: Box::pin(self.notify.notified()), waker: None }
    }
}

/// The future of [`StreamCancel::cancelled`].
struct Cancelled<'a> {
    cancel: &'a StreamCancel,
    // Made with the future, so `notify_waiters` reaches it even before its
    // first poll.
    notified: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    /// The waker `notified` holds.
    waker: Option<std::task::Waker>,
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = &mut *self;
        if this.cancel.is_cancelled() {
            return std::task::Poll::Ready(());
        }
        if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // First poll, or from another task: (re)register its waker.
            if this.notified.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
            this.waker = Some(cx.waker().clone());
        }
        std::task::Poll::Pending
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut active = self.ingest.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.get(&self.upload_id).is_some_and(|a| a.generation == self.generation) {
            active.remove(&self.upload_id);
        }
        drop(active);
        self.ingest.released.notify_waiters();
    }
}

/// An open upload being written by one stream.
struct Session {
    lease: Lease,
    record: UploadRecord,
    dek: DataKey,
    spool_key: Arc<LessSafeKey>,
    journal: Option<Journal>,
    /// A finish sealed the last segment before the stream ended: only a
    /// finish is taken now.
    sealed: bool,
    /// Uploads the journal's sealed segments into a remote store while
    /// the stream goes on (local journal, remote store only).
    follower: Option<follow::Follower>,
    checker: ContentChecker,
    cap: u64,
    /// End of the bytes received (durable or pending).
    received: u64,
    /// End of the bytes known durable.
    durable: u64,
    pending: Vec<u8>,
    /// The buffer of the last batch flushed, emptied, for the next batch:
    /// a bulk upload then fills the same few MiB again and again instead
    /// of faulting in fresh pages for every batch (each flush freed its
    /// buffer and the next allocation touched new memory).
    spare: Vec<u8>,
    /// The journal write + fsync under way, if any (it owns the journal).
    in_flight: Option<Flush>,
    /// When the oldest byte of `pending`, and of the batch being flushed,
    /// arrived: the ack latency metric measures from there.
    pending_since: Option<std::time::Instant>,
    flushing_since: Option<std::time::Instant>,
}

/// The journal back, the durable end, and the batch's buffer for reuse.
type FlushResult = Result<(Journal, u64, Vec<u8>), spool::SpoolError>;

/// A journal flush under way.
enum Flush {
    /// On a task of its own: file I/O on the blocking pool.
    Task(JoinHandle<FlushResult>),
    /// Records sealed in memory and queued in the shared log ([`wal`]),
    /// which is most flushes of a live call: the session task itself waits
    /// for the log's sync, with no task, join handle or blocking-pool
    /// round trip per flush (at thousands of calls, each of those is a
    /// wake-up per stream every commit interval, and CPU per message is what
    /// bounds the number of calls; BENCHMARKS.md).
    Logged { journal: Journal, end: u64, synced: tokio::sync::oneshot::Receiver<std::io::Result<()>> },
    /// Refused before anything was queued.
    Failed(spool::SpoolError),
}

/// How the answer to a stream refused at `ingest.max_streams` begins
/// (`UNAVAILABLE`); the load generator tells refusals from errors by it.
pub const BUSY: &str = "the server is busy";

impl Ingest {
    pub fn new(
        cfg: IngestConfig,
        catalog: Arc<dyn Catalog>,
        keys: Arc<KeyService>,
        store: Store,
        policies: Arc<Policies>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
    ) -> Result<Arc<Self>, Error> {
        let journals = if cfg.shared_journal {
            JournalPlace::Catalog(catalog.clone())
        } else if cfg.shared_log {
            let wal = wal::Wal::open(&cfg.spool_dir).map_err(|e| {
                Error::Internal(format!("cannot open the ingest log in {}: {e}", cfg.spool_dir.display()))
            })?;
            JournalPlace::Log(Arc::new(wal))
        } else {
            // A log left by a run with `ingest.sync = "log"` goes into the
            // journal files before any of them is opened.
            wal::Wal::recover_leftovers(&cfg.spool_dir).map_err(|e| {
                Error::Internal(format!("cannot recover the ingest log in {}: {e}", cfg.spool_dir.display()))
            })?;
            JournalPlace::Dir(cfg.spool_dir.clone())
        };
        let cfg_max_streams = cfg.max_streams;
        Ok(Arc::new(Self {
            journals,
            cfg,
            catalog,
            keys,
            store,
            policies,
            clock,
            audit,
            active: Mutex::new(HashMap::new()),
            generation: Default::default(),
            released: tokio::sync::Notify::new(),
            streams: (cfg_max_streams > 0).then(|| Arc::new(tokio::sync::Semaphore::new(cfg_max_streams))),
        }))
    }

    /// Where upload journals live.
    pub fn journal_place(&self) -> &JournalPlace {
        &self.journals
    }

    pub fn config(&self) -> &IngestConfig {
        &self.cfg
    }

    /// Ends every stream writing content of `customer` (a shred is under
    /// way); returns how many were stopped.
    pub fn cancel_customer(&self, customer: &CustomerRef) -> usize {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for a in active.values().filter(|a| a.customer_ref == *customer) {
            a.cancel.cancel();
            n += 1;
        }
        n
    }

    /// Whether a stream is writing this upload now.
    pub fn is_streaming(&self, upload_id: &UploadId) -> bool {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).contains_key(upload_id)
    }

    /// Takes the upload for this stream, cancelling a stale holder and
    /// waiting (bounded) for it to let go.
    async fn lease(self: &Arc<Self>, upload_id: UploadId, customer_ref: CustomerRef) -> Result<Lease, Error> {
        let deadline = tokio::time::Instant::now() + self.cfg.takeover_timeout;
        loop {
            let notified = self.released.notified();
            {
                let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
                match active.get(&upload_id) {
                    Some(a) => a.cancel.cancel(),
                    None => {
                        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let cancel = Arc::new(StreamCancel::default());
                        active.insert(upload_id, Active { customer_ref, cancel: cancel.clone(), generation });
                        return Ok(Lease { ingest: self.clone(), upload_id, generation, cancel });
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::Busy(format!(
                    "upload {upload_id} is being written by another stream that did not let go; retry shortly"
                )));
            }
        }
    }

    /// Admits one more ingest stream, or refuses it at once with
    /// `UNAVAILABLE` when `ingest.max_streams` are running: a caller retries
    /// (on another replica) instead of every running call slowing down and
    /// the server's memory growing with the backlog (BENCHMARKS.md: at
    /// 10 000 calls on 2 cores, 10 s acks and 3 GiB of buffered audio).
    pub fn admit(&self) -> Result<StreamAdmission, Error> {
        let Some(streams) = &self.streams else { return Ok(StreamAdmission(None)) };
        match streams.clone().try_acquire_owned() {
            Ok(permit) => Ok(StreamAdmission(Some(permit))),
            Err(_) => {
                // Refused before the caller is authenticated: the message
                // says only that the server is busy; the operator has the
                // limit, this log line and the refusal counter.
                crate::metrics::stream_refused();
                tracing::debug!(
                    max_streams = self.cfg.max_streams,
                    "ingest stream refused: ingest.max_streams reached"
                );
                Err(Error::Unavailable(format!(
                    "{BUSY}: it is running all the upload streams it accepts at once; retry shortly or on another replica"
                )))
            }
        }
    }

    fn check_spec(&self, spec: &mut ObjectSpec) -> Result<(), Error> {
        spec.content_type = sniff::normalise_content_type(spec.kind, &spec.content_type)?;
        spec.interaction.validate()?;
        crate::model::TimeSpan::validate(&spec.sensitive_spans)?;
        spec.sensitive_spans = crate::model::TimeSpan::merge(&spec.sensitive_spans, &[]);
        Ok(())
    }

    /// Opens (or resumes) an upload.
    async fn open(
        self: &Arc<Self>,
        actor: &Actor,
        upload_id: UploadId,
        mut spec: ObjectSpec,
    ) -> Result<Opening, Error> {
        self.check_spec(&mut spec)?;
        if let Some(existing) = self.catalog.upload(&upload_id).await? {
            if existing.committed {
                let object = self.committed_object(&existing).await?;
                same_upload(&existing, &spec)?;
                return Ok(Opening::Committed(Box::new(object)));
            }
            same_upload(&existing, &spec)?;
            let customer = self
                .catalog
                .customer(&spec.customer_id)
                .await?
                .ok_or_else(|| Error::Internal("upload of an unknown customer".into()))?;
            if customer.state != CustomerState::Active {
                return Err(Error::from_state(customer.state));
            }
            let lease = self.lease(upload_id, existing.customer_ref).await?;
            if !self.has_journal(&existing).await? && self.stored_len(&existing.object_id).await?.is_some() {
                return Err(Error::Precondition(format!(
                    "upload {upload_id} was stored by a Put that did not finish; retry that Put (same upload id, \
                     same content), or stream with a new upload id"
                )));
            }
            return self.resume(lease, existing).await.map(|s| Opening::Session(Box::new(s)));
        }
        let stored = self.create_upload(actor, upload_id, &spec).await?;
        if stored.committed {
            return Ok(Opening::Committed(Box::new(self.committed_object(&stored).await?)));
        }
        let lease = self.lease(upload_id, stored.customer_ref).await?;
        self.resume(lease, stored).await.map(|s| Opening::Session(Box::new(s)))
    }

    async fn committed_object(&self, upload: &UploadRecord) -> Result<ObjectRecord, Error> {
        match self.catalog.object(&upload.object_id).await? {
            Some(o) if o.customer_state != CustomerState::Active => Err(Error::from_state(o.customer_state)),
            Some(o) if o.expired_at_ms.is_some() => Err(Error::NotFound(format!(
                "upload {} was committed as object {}, which expired and was crypto-erased",
                upload.upload_id, upload.object_id
            ))),
            Some(o) => Ok(o.record),
            None => Err(Error::NotFound(format!("object {} of upload {} is gone", upload.object_id, upload.upload_id))),
        }
    }

    async fn upload_dek(&self, upload: &UploadRecord) -> Result<DataKey, Error> {
        Ok(self
            .keys
            .data_key(
                &upload.customer_ref,
                &upload.spec.customer_id,
                &upload.object_id,
                upload.key_version,
                &upload.wrapped_dek,
            )
            .await?)
    }

    /// Opens the journal, replaying the durable bytes through a fresh
    /// content checker.
    async fn resume(self: &Arc<Self>, lease: Lease, record: UploadRecord) -> Result<Session, Error> {
        let dek = self.upload_dek(&record).await?;
        let spool_key = Arc::new(format::derive_spool_key(&dek, record.object_id.as_bytes())?);
        let place = self.journals.clone();
        let (upload_id, object_id) = (record.upload_id, record.object_id);
        let content_type = record.spec.content_type.clone();
        let limits = self.cfg.sniff;
        let key = spool_key.clone();
        let fields = header_fields(&record);
        let (journal, checker, check, dek) = if let JournalPlace::Catalog(catalog) = place {
            let checking = (ContentChecker::new(&content_type, limits), Ok(()));
            let (journal, (checker, check)) =
                CatalogJournal::open(catalog, upload_id, object_id, key, checking, |(checker, check), data| {
                    if check.is_ok() {
                        *check = checker.update(data);
                    }
                })
                .await
                .map_err(spool_error)?;
            (Journal::Catalog(journal), checker, check, dek)
        } else {
            let (journal, checker, check, dek) = tokio::task::spawn_blocking(move || {
                let mut checker = ContentChecker::new(&content_type, limits);
                let mut check = Ok(());
                let keys = spool::JournalKeys { spool: &key, dek: &dek, fields };
                let journal = Journal::open(&place, object_id, &keys, |data| {
                    if check.is_ok() {
                        check = checker.update(data);
                    }
                });
                (journal, checker, check, dek)
            })
            .await
            .map_err(Error::internal)?;
            (journal.map_err(spool_error)?, checker, check, dek)
        };
        // The bytes were checked when they arrived; a failure now means the
        // rules changed in between. Refuse rather than commit unchecked data.
        check?;
        let end = journal.end();
        let follower = match &journal {
            Journal::File(f) if !self.store.links_files() => {
                let follower =
                    follow::Follower::start(self.store.clone(), record.object_id, f.segments_path().to_owned());
                follower.durable(f.segments_len());
                Some(follower)
            }
            _ => None,
        };
        Ok(Session {
            sealed: journal.is_sealed(),
            follower,
            lease,
            cap: self.cfg.caps.for_kind(record.spec.kind),
            record,
            dek,
            spool_key,
            journal: Some(journal),
            checker,
            received: end,
            durable: end,
            pending: Vec::new(),
            spare: Vec::new(),
            in_flight: None,
            pending_since: None,
            flushing_since: None,
        })
    }

    /// Forgets an upload whose content was refused: journal and catalog row.
    async fn discard(&self, session: Session) {
        let place = self.journals.clone();
        let id = session.record.object_id;
        drop(session.journal);
        let removed = tokio::task::spawn_blocking(move || Journal::remove(&place, &id)).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!(object_id = %id, "could not remove the journal of a refused upload");
        }
        if let Err(e) = self.catalog.discard_upload(&session.record.upload_id).await {
            tracing::warn!(upload_id = %session.record.upload_id, error = %e, "could not discard a refused upload");
        }
    }

    /// Drives one ingest stream to its end. Every outcome, including the
    /// final error, is sent on `out`.
    pub async fn run_stream<S>(
        self: Arc<Self>,
        actor: Actor,
        mut inbound: S,
        out: mpsc::Sender<Result<ServerMsg, Error>>,
    ) where
        S: Stream<Item = Result<ClientMsg, Error>> + Unpin + Send,
    {
        // One place in the queue is kept for the last answer: a stream
        // ended because its client stopped reading still tells that client
        // why, if it reads on later.
        let last = out.clone().reserve_owned().await;
        let result = self.drive(&actor, &mut inbound, &out).await;
        if let (Err(e), Ok(last)) = (result, last) {
            last.send(Err(e));
        }
    }

    /// Sends one answer to the client. One that reads no answer for the
    /// idle timeout while the server waits to send is treated as gone:
    /// otherwise a client that keeps its connection but stops reading would
    /// hold its session, its lease and its `ingest.max_streams` place for
    /// ever (the idle timer cannot fire while an ack waits to be sent).
    async fn send(&self, out: &mpsc::Sender<Result<ServerMsg, Error>>, msg: ServerMsg) -> Result<(), Error> {
        use mpsc::error::TrySendError;
        let gone = || Error::Unavailable("the client went away".into());
        // The common case without a timer: there is room in the queue.
        let msg = match out.try_send(Ok(msg)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(gone()),
            Err(TrySendError::Full(msg)) => msg,
        };
        match tokio::time::timeout(self.cfg.idle_timeout, out.send(msg)).await {
            Ok(sent) => sent.map_err(|_| gone()),
            Err(_) => Err(Error::Idle(format!(
                "the client read no answer for {}; the stream is ended and what was acknowledged is kept: \
                 resume from the last acknowledged offset",
                humantime::format_duration(self.cfg.idle_timeout)
            ))),
        }
    }

    async fn drive<S>(
        self: &Arc<Self>,
        actor: &Actor,
        inbound: &mut S,
        out: &mpsc::Sender<Result<ServerMsg, Error>>,
    ) -> Result<(), Error>
    where
        S: Stream<Item = Result<ClientMsg, Error>> + Unpin + Send,
    {
        let first = match tokio::time::timeout(self.cfg.idle_timeout, inbound.next()).await {
            Err(_) => return Err(Error::Idle("no open message received; the stream was idle too long".into())),
            Ok(None) => return Err(Error::Precondition("empty stream: send an open message first".into())),
            Ok(Some(m)) => m?,
        };
        let ClientMsg::Open { upload_id, spec } = first else {
            return Err(Error::Precondition(
                "the first message of an ingest stream must open the upload (durable offset unknown until then)".into(),
            ));
        };
        let mut session = match self.open(actor, upload_id, spec).await? {
            Opening::Committed(object) => {
                self.send(
                    out,
                    ServerMsg::Opened {
                        upload_id,
                        object_id: object.object_id,
                        durable_offset: object.size,
                        committed: Some(object.clone()),
                    },
                )
                .await?;
                // A finish for an already committed upload answers the same
                // object again; anything else is a mistake.
                // (Not waited on for ever: the stream holds a place.)
                let next = tokio::time::timeout(self.cfg.idle_timeout, inbound.next()).await;
                return match next.unwrap_or(None) {
                    None => Ok(()),
                    Some(Ok(ClientMsg::Finish { .. })) => self.send(out, ServerMsg::Committed(object)).await,
                    Some(Ok(_)) => Err(Error::Precondition(format!(
                        "upload {upload_id} is already committed ({} bytes); no more data is accepted",
                        object.size
                    ))),
                    Some(Err(e)) => Err(e),
                };
            }
            Opening::Session(s) => *s,
        };
        let _open = crate::metrics::stream_opened();
        self.send(
            out,
            ServerMsg::Opened {
                upload_id,
                object_id: session.record.object_id,
                durable_offset: session.durable,
                committed: None,
            },
        )
        .await?;
        let result = self.session_loop(actor, &mut session, inbound, out).await;
        // Whatever happened, no journal write may outlive the lease: a
        // resuming stream must be the only writer.
        let _ = drain_flush(&mut session.in_flight).await;
        match result {
            Ok(Some(object)) => {
                self.send(out, ServerMsg::Committed(Box::new(object))).await?;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(Refusal::Keep(e)) => Err(e),
            Err(Refusal::Discard(e)) => {
                self.discard(session).await;
                Err(e)
            }
        }
    }

    async fn session_loop<S>(
        self: &Arc<Self>,
        actor: &Actor,
        s: &mut Session,
        inbound: &mut S,
        out: &mpsc::Sender<Result<ServerMsg, Error>>,
    ) -> Result<Option<ObjectRecord>, Refusal>
    where
        S: Stream<Item = Result<ClientMsg, Error>> + Unpin + Send,
    {
        let mut flush_at: Option<tokio::time::Instant> = None;
        // One timer for the session, reset when a batch starts: a timer made
        // at each turn of the loop was registered with the runtime's timer
        // wheel and removed again for every message.
        let flush_timer = tokio::time::sleep(self.cfg.commit_interval);
        tokio::pin!(flush_timer);
        let cancel = s.lease.cancel.clone();
        // Made once, not per message: thousands of live calls send tens of
        // thousands of messages a second, and a timer or waiter registered
        // and dropped for each one is CPU the calls need.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let mut last_message = tokio::time::Instant::now();
        let idle = tokio::time::sleep(self.cfg.idle_timeout);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => {
                    let state = self.catalog.customer(&s.record.spec.customer_id).await.ok().flatten().map(|c| c.state);
                    return Err(match state {
                        // A shred was requested: write nothing more. The
                        // upload stays (sealed, unreadable) so a cancelled
                        // shred lets the caller resume it; the destroy step
                        // discards it and counts it in the certificate.
                        Some(st @ CustomerState::PendingShred) => {
                            let _ = drain_flush(&mut s.in_flight).await;
                            Refusal::Keep(Error::from_state(st))
                        }
                        // Keys already destroyed: remove what the shred
                        // could not see yet.
                        Some(st) if st != CustomerState::Active => {
                            let _ = drain_flush(&mut s.in_flight).await;
                            Refusal::Discard(Error::from_state(st))
                        }
                        _ => {
                            self.settle(s).await.ok();
                            Refusal::Keep(Error::Busy(format!(
                                "upload {} was taken over by a newer stream", s.record.upload_id
                            )))
                        }
                    });
                }
                done = wait_flush(&mut s.in_flight) => {
                    let (journal, end, buffer) = done.map_err(|e| Refusal::Keep(spool_error(e)))?;
                    s.flushed(journal, end, buffer);
                    fail::fail_point!("ingest-before-ack");
                    self.send(out, ServerMsg::Ack { durable_offset: end }).await.map_err(Refusal::Keep)?;
                    s.acked();
                    if !s.pending.is_empty() && (s.pending.len() >= self.cfg.commit_bytes
                        || flush_at.is_some_and(|t| t <= tokio::time::Instant::now())) {
                        s.in_flight = Some(self.start_flush(s));
                        flush_at = None;
                    }
                }
                _ = &mut flush_timer, if flush_at.is_some() && s.in_flight.is_none() => {
                    s.in_flight = Some(self.start_flush(s));
                    flush_at = None;
                }
                // Invariant: at the cap a flush is in flight (a full
                // pending buffer always starts one), so this resumes.
                msg = inbound.next(), if s.pending.len() < self.cfg.pending_cap() => {
                    last_message = tokio::time::Instant::now();
                    match msg {
                        None => {
                            // The client went away: keep what is durable, make
                            // the rest durable too (it was never acked, but
                            // keeping it costs nothing and helps a resume).
                            self.settle(s).await.map_err(Refusal::Keep)?;
                            return Ok(None);
                        }
                        Some(Err(e)) => {
                            self.settle(s).await.ok();
                            return Err(Refusal::Keep(e));
                        }
                        Some(Ok(ClientMsg::Open { .. })) => {
                            self.settle(s).await.ok();
                            return Err(Refusal::Keep(Error::Precondition(format!(
                                "upload already open; durable offset is {}", s.durable
                            ))));
                        }
                        Some(Ok(ClientMsg::Data { offset, data })) => {
                            s.receive(offset, &data)?;
                            if flush_at.is_none() {
                                let at = tokio::time::Instant::now() + self.cfg.commit_interval;
                                flush_at = Some(at);
                                flush_timer.as_mut().reset(at);
                            }
                            if s.in_flight.is_none() && s.pending.len() >= self.cfg.commit_bytes {
                                s.in_flight = Some(self.start_flush(s));
                                flush_at = None;
                            }
                        }
                        Some(Ok(ClientMsg::Finish { expected_sha256, expected_size })) => {
                            self.settle(s).await.map_err(Refusal::Keep)?;
                            if s.durable > 0 {
                                fail::fail_point!("ingest-before-ack");
                                self.send(out, ServerMsg::Ack { durable_offset: s.durable }).await.map_err(Refusal::Keep)?;
                                s.acked();
                            }
                            return self.finish(actor, s, expected_sha256, expected_size).await.map(Some);
                        }
                    }
                }
                _ = &mut idle => {
                    let deadline = last_message + self.cfg.idle_timeout;
                    if deadline > tokio::time::Instant::now() {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    self.settle(s).await.ok();
                    return Err(Refusal::Keep(Error::Idle(format!(
                        "no message for {}; the upload is kept, resume from durable offset {}",
                        humantime::format_duration(self.cfg.idle_timeout), s.durable
                    ))));
                }
            }
        }
    }

    fn start_flush(&self, s: &mut Session) -> Flush {
        let mut journal = s.journal.take().expect("no flush in flight");
        // The next batch is likely the size of this one: a bulk upload's
        // buffer then has room for it from the start, not grown by
        // doubling (a copy of everything it holds at each step).
        let mut next = std::mem::take(&mut s.spare);
        next.reserve(s.pending.len());
        let data = std::mem::replace(&mut s.pending, next);
        // A batch awaited without an ack (settle) keeps its older start.
        s.flushing_since = s.flushing_since.or(s.pending_since.take());
        let key = s.spool_key.clone();
        if let Journal::File(f) = &journal
            && f.is_logged()
        {
            if data.len() >= LOG_DIRECT_MIN || f.writes_segment(data.len()) {
                return Flush::Task(tokio::spawn(flush_logged(journal, key, data)));
            }
            // No file I/O: only records sealed in memory (about a
            // microsecond for a 100 ms frame batch).
            let queued = queue_logged(journal, &key, &data, false);
            s.recycle(data);
            return match queued {
                Ok((journal, synced)) => Flush::Logged { end: journal.end(), journal, synced },
                Err(e) => Flush::Failed(e),
            };
        }
        if let Journal::Catalog(_) = &journal {
            return Flush::Task(tokio::spawn(flush_shared(journal, key, data)));
        }
        Flush::Task(tokio::task::spawn_blocking(move || {
            // Tests slow the disk down here (`ingest-flush=sleep(ms)`).
            fail::fail_point!("ingest-flush");
            journal.append_durably(&key, &data)?;
            let end = journal.end();
            Ok((journal, end, data))
        }))
    }

    /// Waits for any flush in flight, then flushes what is pending.
    async fn settle(&self, s: &mut Session) -> Result<(), Error> {
        if let Some(done) = drain_flush(&mut s.in_flight).await {
            let (journal, end, buffer) = done.map_err(spool_error)?;
            s.flushed(journal, end, buffer);
        }
        if !s.pending.is_empty() {
            s.in_flight = Some(self.start_flush(s));
            let (journal, end, buffer) = wait_flush(&mut s.in_flight).await.map_err(spool_error)?;
            s.flushed(journal, end, buffer);
        }
        Ok(())
    }

    /// Verifies the finished upload, seals it from the journal into the
    /// store and commits it to the catalog.
    async fn finish(
        &self,
        actor: &Actor,
        s: &mut Session,
        expected_sha256: Option<[u8; 32]>,
        expected_size: Option<u64>,
    ) -> Result<ObjectRecord, Refusal> {
        if let Some(size) = expected_size
            && size != s.durable
        {
            return Err(Refusal::Keep(Error::Precondition(format!(
                "finish expected {size} bytes but the upload holds {}; send the rest from offset {} and finish again",
                s.durable, s.durable
            ))));
        }
        let checker =
            std::mem::replace(&mut s.checker, ContentChecker::new("application/octet-stream", self.cfg.sniff));
        checker.finish().map_err(|e| Refusal::Discard(e.into()))?;
        let journal = s.journal.take();
        fail::fail_point!("ingest-before-store-write");
        let (size, sha256) = match journal {
            Some(Journal::File(journal)) => self.publish(journal, s.follower.take(), s.record.object_id).await,
            other => {
                drop(other);
                self.assemble(&s.record, &s.dek, &s.spool_key).await
            }
        }
        .map_err(Refusal::Keep)?;
        fail::fail_point!("ingest-after-store-write");
        if size != s.durable {
            return Err(Refusal::Keep(Error::Internal(format!(
                "journal replay produced {size} bytes, expected {}",
                s.durable
            ))));
        }
        if let Some(expected) = expected_sha256
            && !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &sha256[..]))
        {
            // The stored bytes are not what the client meant to send; they
            // cannot be repaired by appending, so the upload is discarded.
            let _ = self.store.delete(&s.record.object_id).await;
            return Err(Refusal::Discard(Error::Invalid(format!(
                "SHA-256 mismatch: the server received {} bytes hashing to {}, not {}; the upload was discarded, start again with a new upload id",
                size,
                hex::encode(sha256),
                hex::encode(expected)
            ))));
        }
        let created_at_ms = self.clock.now_ms();
        let record = ObjectRecord {
            object_id: s.record.object_id,
            upload_id: s.record.upload_id,
            spec: s.record.spec.clone(),
            size,
            sha256,
            created_at_ms,
            retention: self.policies.assign(&s.record.spec, created_at_ms),
            derived_from: None,
        };
        // No record, no commit: the upload stays durable in its journal and
        // a later finish commits it.
        self.audit.append(actor, commit_event(&record)).await.map_err(Refusal::Keep)?;
        let committed = match self.catalog.commit_upload(&record).await {
            Ok(c) => c,
            Err(e @ CatalogError::CustomerState(_)) => {
                // A shred won the race: the object we just stored can never
                // be read; do not leave it behind.
                let _ = self.store.delete(&record.object_id).await;
                return Err(Refusal::Discard(e.into()));
            }
            Err(e) => return Err(Refusal::Keep(e.into())),
        };
        fail::fail_point!("ingest-after-catalog-commit");
        let place = self.journals.clone();
        let id = s.record.object_id;
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || Journal::remove(&place, &id)).await {
            tracing::warn!(object_id = %id, error = %e, "committed, but the journal could not be removed");
        }
        fail::fail_point!("ingest-before-response");
        tracing::info!(object_id = %committed.object_id, size = committed.size, kind = committed.spec.kind.name(), "object committed");
        crate::metrics::object_committed();
        Ok(committed)
    }

    /// Seals the last segment of a local journal and publishes its
    /// segments file as the object: a hard link into a local store, a copy
    /// into a remote one. Idempotent: a retried finish after a crash finds
    /// the file sealed and the (identical) object already stored.
    async fn publish(
        &self,
        mut journal: Box<spool::FileJournal>,
        follower: Option<follow::Follower>,
        object_id: ObjectId,
    ) -> Result<(u64, [u8; 32]), Error> {
        let (journal, sealed) = tokio::task::spawn_blocking(move || {
            let sealed = journal.seal();
            (journal, sealed)
        })
        .await
        .map_err(Error::internal)?;
        let (size, sha) = sealed.map_err(spool_error)?;
        let path = journal.segments_path().to_owned();
        drop(journal);
        fail::fail_point!("ingest-before-object-commit");
        let len = format::ciphertext_len(size, format::DEFAULT_SEGMENT_SIZE);
        let published = match follower.map(|f| f.finish(len)) {
            Some(finishing) => match finishing.await {
                follow::Outcome::Committed(result) => result,
                follow::Outcome::GaveUp(e) => {
                    tracing::debug!(%object_id, error = %e, "the upload ahead failed; copying the object");
                    self.store.publish_file(object_id, &path, len).await
                }
            },
            None => self.store.publish_file(object_id, &path, len).await,
        };
        match published {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => self.accept_existing(&object_id, size).await?,
            Err(e) => return Err(e.into()),
        }
        Ok((size, sha))
    }

    /// Seals a shared journal's plaintext into the object store.
    /// Idempotent: a retried finish after a crash finds the (identical)
    /// object already stored.
    async fn assemble(
        &self,
        record: &UploadRecord,
        dek: &DataKey,
        spool_key: &Arc<LessSafeKey>,
    ) -> Result<(u64, [u8; 32]), Error> {
        let JournalPlace::Catalog(catalog) = &self.journals else {
            return Err(Error::Internal("a local journal is published, not replayed".into()));
        };
        let sealer = SegmentSealer::new(dek, header_fields(record))?;
        let mut assembly = Assembly {
            enc: ObjectEncryptor::new(sealer),
            hash: digest::Context::new(&digest::SHA256),
            out: Vec::with_capacity(2 * BATCH),
            failed: None,
        };
        let mut replay = spool::SharedReplay::new(record.upload_id, record.object_id, spool_key.clone());
        let mut writer = self.store.writer(record.object_id);
        // The chunks are opened and sealed on the blocking pool a step at a
        // time, and each step's output is written here, on the runtime: no
        // thread waits on another (a blocking producer feeding this task
        // could deadlock with a store that needs the blocking pool too).
        let assembled: Result<[u8; 32], Error> = async {
            loop {
                let (back, more) =
                    replay.next(catalog.as_ref(), assembly, Assembly::feed).await.map_err(spool_error)?;
                assembly = back;
                if let Some(e) = assembly.failed.take() {
                    return Err(e.into());
                }
                if !more {
                    break;
                }
                if !assembly.out.is_empty() {
                    writer.write(&assembly.out).await?;
                    assembly.out.clear();
                }
            }
            let Assembly { enc, hash, mut out, .. } = assembly;
            enc.finish(&mut out)?;
            writer.write(&out).await?;
            Ok(hash.finish().as_ref().try_into().expect("SHA-256 is 32 bytes"))
        }
        .await;
        let sha = match assembled {
            Ok(sha) => sha,
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
        };
        let size = replay.end();
        fail::fail_point!("ingest-before-object-commit");
        self.commit_object(writer, size).await?;
        Ok((size, sha))
    }

    /// Unary upload of a small item: checked, sealed in memory, stored and
    /// committed in one call. Idempotent by `upload_id`.
    pub async fn put(
        self: &Arc<Self>,
        actor: &Actor,
        upload_id: UploadId,
        spec: ObjectSpec,
        data: Bytes,
        expected_sha256: Option<[u8; 32]>,
    ) -> Result<ObjectRecord, Error> {
        crate::metrics::ingest_bytes(data.len() as u64);
        self.put_object(actor, upload_id, spec, data, expected_sha256, None).await
    }

    /// Stores an item derived from a committed object (a redacted
    /// transcript, a thumbnail, an audio clip). The rule that makes one
    /// shred cover derived items is enforced here: the customer, and so the
    /// customer key, is taken from the source object and cannot be chosen;
    /// the item inherits the source's interaction and retention (it never
    /// outlives its source) and records where it came from.
    pub async fn put_derived(
        self: &Arc<Self>,
        actor: &Actor,
        upload_id: UploadId,
        source: &ObjectId,
        kind: ContentKind,
        content_type: &str,
        data: Bytes,
    ) -> Result<ObjectRecord, Error> {
        let parent = self
            .catalog
            .object(source)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source object {source} not found")))?;
        if parent.customer_state != CustomerState::Active {
            return Err(Error::from_state(parent.customer_state));
        }
        if parent.expired_at_ms.is_some() {
            return Err(Error::NotFound(format!("source object {source} expired")));
        }
        let spec = ObjectSpec {
            customer_id: parent.record.spec.customer_id.clone(),
            kind,
            content_type: content_type.to_owned(),
            interaction: parent.record.spec.interaction.clone(),
            sensitive_spans: parent.record.spec.sensitive_spans.clone(),
        };
        self.put_object(actor, upload_id, spec, data, None, Some((*source, parent.record.retention))).await
    }

    async fn put_object(
        self: &Arc<Self>,
        actor: &Actor,
        upload_id: UploadId,
        mut spec: ObjectSpec,
        data: Bytes,
        expected_sha256: Option<[u8; 32]>,
        derived: Option<(ObjectId, Retention)>,
    ) -> Result<ObjectRecord, Error> {
        self.check_spec(&mut spec)?;
        let cap = self.cfg.put_cap.min(self.cfg.caps.for_kind(spec.kind));
        if data.len() as u64 > cap {
            return Err(Error::TooLarge(format!(
                "{} bytes exceed the Put limit of {cap} bytes for {}; use the streaming Ingest call",
                data.len(),
                spec.kind.name()
            )));
        }
        let sha: [u8; 32] = digest::digest(&digest::SHA256, &data).as_ref().try_into().expect("SHA-256 is 32 bytes");
        if let Some(expected) = expected_sha256
            && !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &sha[..]))
        {
            return Err(Error::Invalid(format!(
                "SHA-256 mismatch: received {} bytes hashing to {}, not {}",
                data.len(),
                hex::encode(sha),
                hex::encode(expected)
            )));
        }
        let mut checker = ContentChecker::new(&spec.content_type, self.cfg.sniff);
        checker.update(&data)?;
        checker.finish()?;
        let existing = self.catalog.upload(&upload_id).await?;
        if let Some(existing) = &existing {
            if existing.committed {
                let object = self.committed_object(existing).await?;
                same_upload(existing, &spec)?;
                if object.sha256 != sha {
                    return Err(Error::Precondition(format!(
                        "upload id {upload_id} was already committed with different content (object {})",
                        object.object_id
                    )));
                }
                return Ok(object);
            }
            same_upload(existing, &spec)?;
        }
        let earlier = existing.is_some();
        let stored = match existing {
            Some(upload) => upload,
            None => self.create_upload(actor, upload_id, &spec).await?,
        };
        if stored.committed {
            return self.committed_object(&stored).await;
        }
        let _lease = self.lease(upload_id, stored.customer_ref).await?;
        // An unfinished upload found here was made by an earlier attempt,
        // and its key and nonce prefix are fixed: sealing other bytes under
        // them would reuse AES-GCM nonces. A stream's journal holds such
        // bytes, so a Put may not take over a streamed upload.
        if earlier && self.has_journal(&stored).await? {
            return Err(Error::Precondition(format!(
                "upload {upload_id} was opened by a streaming Ingest; finish it there, or Put with a new upload id"
            )));
        }
        // Use the stored upload (a concurrent or crashed Put may have made it).
        let dek = self.upload_dek(&stored).await?;
        let fields = header_fields(&stored);
        let mut enc = ObjectEncryptor::new(SegmentSealer::new(&dek, fields)?);
        let mut ciphertext =
            Vec::with_capacity(format::ciphertext_len(data.len() as u64, format::DEFAULT_SEGMENT_SIZE) as usize);
        enc.update(&data, &mut ciphertext)?;
        enc.finish(&mut ciphertext)?;
        // A Put that stored its object and stopped before the catalog
        // commit: the same content seals to the same bytes, so a retry
        // commits what is there; other content is refused before anything
        // is written (a second ciphertext under the same nonces).
        // (A Put that raced this one to create the upload shows only at
        // the write-once commit; its object is compared then.)
        let other_content = || {
            Error::Precondition(format!(
                "upload id {upload_id} was used by an earlier Put with different content; Put with a new upload id"
            ))
        };
        let there = if earlier { self.stored_bytes(&stored.object_id).await? } else { None };
        match there {
            Some(there) if there[..] == ciphertext[..] => {}
            Some(_) => return Err(other_content()),
            None => {
                let mut writer = self.store.writer(stored.object_id);
                writer.write(&ciphertext).await?;
                match writer.commit().await {
                    Ok(()) => {}
                    Err(StoreError::AlreadyExists) => {
                        if self.stored_bytes(&stored.object_id).await?.as_deref() != Some(&ciphertext[..]) {
                            return Err(other_content());
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // The object stored, the catalog row not yet committed.
        fail::fail_point!("put-after-store-write");
        let created_at_ms = self.clock.now_ms();
        let (derived_from, retention) = match derived {
            Some((source, retention)) => (Some(source), retention),
            None => (None, self.policies.assign(&spec, created_at_ms)),
        };
        let object = ObjectRecord {
            object_id: stored.object_id,
            upload_id,
            spec,
            size: data.len() as u64,
            sha256: sha,
            created_at_ms,
            retention,
            derived_from,
        };
        self.audit.append(actor, commit_event(&object)).await?;
        let committed = self.catalog.commit_upload(&object).await.map_err(|e| match e {
            CatalogError::NotFound => Error::Precondition(format!("upload {upload_id} was discarded meanwhile")),
            other => other.into(),
        })?;
        tracing::info!(object_id = %committed.object_id, size = committed.size, kind = committed.spec.kind.name(), "object committed");
        crate::metrics::object_committed();
        Ok(committed)
    }
}

impl Ingest {
    /// Records a new upload: fresh object id, data key and nonce prefix.
    /// A concurrent open of the same upload id may have won; whatever is
    /// stored is returned (and must describe the same object).
    async fn create_upload(
        &self,
        actor: &Actor,
        upload_id: UploadId,
        spec: &ObjectSpec,
    ) -> Result<UploadRecord, Error> {
        let known = self.catalog.customer(&spec.customer_id).await?.is_some();
        let (customer, ck) = self.keys.customer_for_ingest(&spec.customer_id).await?;
        if !known {
            let event = Event::new("key.create")
                .customer(&spec.customer_id)
                .target(customer.customer_ref)
                .detail("version", customer.active_version);
            if let Err(e) = self.audit.append(actor, event).await {
                // The key holds nothing yet; the upload's commit is what
                // must not happen unaudited, and it fails closed.
                tracing::warn!(error = %e, "key creation not audited");
            }
        }
        let object_id = ObjectId::new_random();
        let (_dek, wrapped) =
            KeyService::new_data_key(&ck, &customer.customer_ref, &object_id, customer.active_version)?;
        let fields = HeaderFields::new(
            spec.kind.code(),
            *object_id.as_bytes(),
            *customer.customer_ref.as_bytes(),
            customer.active_version,
        )?;
        let record = UploadRecord {
            upload_id,
            object_id,
            customer_ref: customer.customer_ref,
            spec: spec.clone(),
            key_version: customer.active_version,
            wrapped_dek: wrapped,
            nonce_prefix: fields.nonce_prefix,
            created_at_ms: self.clock.now_ms(),
            committed: false,
        };
        let stored = self.catalog.create_upload(&record).await?;
        same_upload(&stored, spec)?;
        Ok(stored)
    }

    /// Whether a stream has opened this upload: its local segments file
    /// exists (made when a journal is opened), or the catalog holds
    /// journal chunks of it.
    async fn has_journal(&self, upload: &UploadRecord) -> Result<bool, Error> {
        if let JournalPlace::Catalog(catalog) = &self.journals {
            return Ok(!catalog.journal_chunks(&upload.upload_id, 0, 1).await?.is_empty());
        }
        let path = spool::segments_path(&self.cfg.spool_dir, &upload.object_id);
        tokio::task::spawn_blocking(move || path.try_exists()).await.map_err(Error::internal)?.map_err(Error::internal)
    }

    /// The object's length if the store holds it (written, even if never
    /// committed in the catalog).
    async fn stored_len(&self, id: &ObjectId) -> Result<Option<u64>, Error> {
        match self.store.size(id).await {
            Ok(len) => Ok(Some(len)),
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole stored object, if the store holds it (a Put's object is
    /// at most `ingest.put_cap` plus its framing).
    async fn stored_bytes(&self, id: &ObjectId) -> Result<Option<Bytes>, Error> {
        let Some(len) = self.stored_len(id).await? else { return Ok(None) };
        Ok(Some(self.store.read_range(id, 0..len).await?))
    }

    /// Makes a written object visible, write-once. A retry finding the
    /// object already there accepts it when its length is right: the same
    /// key, nonce prefix and plaintext always seal to the same ciphertext.
    async fn commit_object(&self, writer: crate::store::ObjectWriter, plaintext_len: u64) -> Result<(), Error> {
        let id = writer.id();
        match writer.commit().await {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists) => self.accept_existing(&id, plaintext_len).await,
            Err(e) => Err(e.into()),
        }
    }

    /// A write-once commit found the object there: accept it when its
    /// length is right (the same key, nonce prefix and plaintext always
    /// seal to the same ciphertext).
    async fn accept_existing(&self, id: &ObjectId, plaintext_len: u64) -> Result<(), Error> {
        if self.store.size(id).await? == format::ciphertext_len(plaintext_len, format::DEFAULT_SEGMENT_SIZE) {
            Ok(())
        } else {
            Err(Error::Internal(format!("object {id} exists with a different size")))
        }
    }
}

fn commit_event(o: &ObjectRecord) -> Event {
    let mut e = Event::new("object.commit")
        .customer(&o.spec.customer_id)
        .target(o.object_id)
        .detail("upload_id", o.upload_id.to_string())
        .detail("kind", o.spec.kind.name())
        .detail("size", o.size);
    if let Some(source) = o.derived_from {
        e = e.detail("derived_from", source.to_string());
    }
    e
}

/// The header of an upload's object: every field comes from its record, so
/// a retried commit seals the same bytes.
fn header_fields(u: &UploadRecord) -> HeaderFields {
    HeaderFields {
        content_kind: u.spec.kind.code(),
        segment_size: format::DEFAULT_SEGMENT_SIZE,
        object_id: *u.object_id.as_bytes(),
        customer_ref: *u.customer_ref.as_bytes(),
        key_version: u.key_version,
        nonce_prefix: u.nonce_prefix,
    }
}

/// Replay batch handed to the object writer: memory of a commit, not of
/// the object.
const BATCH: usize = 1 << 20;

/// A shared journal's plaintext on its way into the object ([`Ingest::assemble`]).
struct Assembly {
    enc: ObjectEncryptor,
    hash: digest::Context,
    out: Vec<u8>,
    failed: Option<crate::crypto::CryptoError>,
}

impl Assembly {
    fn feed(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.hash.update(data);
        if let Err(e) = self.enc.update(data, &mut self.out) {
            self.failed = Some(e);
        }
    }
}

enum Opening {
    Committed(Box<ObjectRecord>),
    Session(Box<Session>),
}

/// Why a session ended early: keep the upload for a resume, or discard it
/// (its content was refused and appending cannot fix it).
enum Refusal {
    Keep(Error),
    Discard(Error),
}

impl Session {
    fn receive(&mut self, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        if offset != self.received {
            return Err(Refusal::Keep(Error::Precondition(format!(
                "data at offset {offset} but the next expected offset is {} (durable offset {}); resume from the durable offset",
                self.received, self.durable
            ))));
        }
        if self.sealed && !data.is_empty() {
            return Err(Refusal::Keep(Error::Precondition(format!(
                "upload {} was finished at {} bytes and takes no more data; send finish",
                self.record.upload_id, self.durable
            ))));
        }
        let end = self.received + data.len() as u64;
        if end > self.cap {
            return Err(Refusal::Discard(Error::TooLarge(format!(
                "{} exceeds the {} size cap of {} bytes; the upload was discarded",
                end,
                self.record.spec.kind.name(),
                self.cap
            ))));
        }
        self.checker.update(data).map_err(|e| Refusal::Discard(e.into()))?;
        self.pending_since.get_or_insert_with(std::time::Instant::now);
        self.pending.extend_from_slice(data);
        self.received = end;
        crate::metrics::ingest_bytes(data.len() as u64);
        Ok(())
    }

    /// A flush made everything up to `end` durable; `buffer` held its batch.
    fn flushed(&mut self, journal: Journal, end: u64, buffer: Vec<u8>) {
        self.recycle(buffer);
        if let (Some(follower), Journal::File(f)) = (&self.follower, &journal) {
            follower.durable(f.segments_len());
        }
        self.journal = Some(journal);
        self.durable = end;
    }

    /// Keeps `buffer`, which held the batch just flushed, emptied for the
    /// next batch, if its batch filled it fairly. One grown for a burst (a
    /// resumed call catching up in 4 MiB batches) is freed once batches are
    /// small again, so a live call does not hold megabytes for the rest of
    /// its session.
    fn recycle(&mut self, mut buffer: Vec<u8>) {
        const SMALL: usize = 64 << 10;
        if buffer.capacity() <= 2 * buffer.len() + SMALL && buffer.capacity() > self.spare.capacity() {
            buffer.clear();
            self.spare = buffer;
        }
    }

    /// Everything flushed so far was just acknowledged.
    fn acked(&mut self) {
        if let Some(t) = self.flushing_since.take() {
            crate::metrics::ack_latency(t.elapsed());
        }
    }
}

/// Data at least this large is flushed with its own sync of the segments
/// file, and only the bytes past them go to the shared log (a bulk upload
/// would otherwise write each byte twice).
const LOG_DIRECT_MIN: usize = 512 * 1024;

/// Seals `data` into a journal in the catalog (on the blocking pool, which
/// waits on nothing) and writes it there as one chunk (on the runtime).
async fn flush_shared(mut journal: Journal, key: Arc<LessSafeKey>, data: Vec<u8>) -> FlushResult {
    let (mut journal, data) = tokio::task::spawn_blocking(move || {
        fail::fail_point!("ingest-flush");
        journal.append(&key, &data).map(|()| (journal, data))
    })
    .await??;
    let Journal::Catalog(shared) = &mut journal else { unreachable!("only journals in the catalog are flushed here") };
    shared.sync().await?;
    let end = journal.end();
    Ok((journal, end, data))
}

/// A flush of a journal writing to the shared log ([`wal`]) that writes a
/// segment first (file I/O, on the blocking pool): seal, write, queue the
/// records, wait for the log's sync.
async fn flush_logged(journal: Journal, key: Arc<LessSafeKey>, data: Vec<u8>) -> FlushResult {
    let direct = data.len() >= LOG_DIRECT_MIN;
    let (journal, synced, data) = tokio::task::spawn_blocking(move || {
        fail::fail_point!("ingest-flush");
        queue_logged(journal, &key, &data, direct).map(|(journal, synced)| (journal, synced, data))
    })
    .await??;
    log_synced(synced.await)?;
    let end = journal.end();
    Ok((journal, end, data))
}

fn log_synced(
    answer: Result<std::io::Result<()>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), spool::SpoolError> {
    answer.map_err(|_| spool::SpoolError::Io(std::io::Error::other("the ingest log writer stopped")))??;
    Ok(())
}

/// Seals `data` into a logged journal and queues its records in the log.
fn queue_logged(
    mut journal: Journal,
    key: &LessSafeKey,
    data: &[u8],
    direct: bool,
) -> Result<(Journal, tokio::sync::oneshot::Receiver<std::io::Result<()>>), spool::SpoolError> {
    let Journal::File(file) = &mut journal else { unreachable!("only local journals are logged") };
    let body = file.append_logged(key, data, direct)?;
    let done = file.submit(body, direct);
    Ok((journal, done))
}

/// Waits for the flush in flight to end, if there is one.
async fn drain_flush(in_flight: &mut Option<Flush>) -> Option<FlushResult> {
    if in_flight.is_none() {
        return None;
    }
    Some(wait_flush(in_flight).await)
}

/// Waits for the flush in flight, if any (else for ever), and clears it.
/// Cancel-safe: dropped before the flush ends, it leaves the flush in place.
async fn wait_flush(in_flight: &mut Option<Flush>) -> FlushResult {
    match in_flight {
        None => std::future::pending().await,
        Some(Flush::Task(handle)) => {
            let r = handle.await;
            *in_flight = None;
            r.unwrap_or_else(|e| Err(e.into()))
        }
        Some(Flush::Logged { synced, .. }) => {
            let answer = synced.await;
            let Some(Flush::Logged { journal, end, .. }) = in_flight.take() else { unreachable!() };
            log_synced(answer)?;
            Ok((journal, end, Vec::new()))
        }
        Some(Flush::Failed(_)) => {
            let Some(Flush::Failed(e)) = in_flight.take() else { unreachable!() };
            Err(e)
        }
    }
}

fn spool_error(e: spool::SpoolError) -> Error {
    match e {
        e if e.is_disk_full() => Error::StorageFull,
        spool::SpoolError::TakenOver(m) => Error::Busy(m),
        e @ spool::SpoolError::Sealed(_) => Error::Precondition(e.to_string()),
        spool::SpoolError::Catalog(e) => e.into(),
        e => Error::Internal(e.to_string()),
    }
}

/// A reused upload id must describe the same object.
fn same_upload(existing: &UploadRecord, spec: &ObjectSpec) -> Result<(), Error> {
    let e = &existing.spec;
    if e.customer_id != spec.customer_id || e.kind != spec.kind || e.content_type != spec.content_type {
        return Err(Error::Precondition(format!(
            "upload id {} is already used for a different object; pick a new upload id",
            existing.upload_id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_cancel_is_seen_whenever_it_comes() {
        // After the future is made, before its first poll.
        let c = StreamCancel::default();
        let f = c.cancelled();
        c.cancel();
        f.await;
        // Before the future is made.
        c.cancelled().await;
        // While the only thing the task waits on is the cancel: its wake-up
        // must come from `cancel` itself.
        let c = Arc::new(StreamCancel::default());
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.cancelled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.cancel();
        tokio::time::timeout(Duration::from_secs(30), waiter).await.expect("the cancel woke the waiter").unwrap();
    }

    #[tokio::test]
    async fn a_stream_cancel_is_seen_after_polls_that_only_read_the_flag() {
        // The session loop polls the future on every message; after the
        // first poll those polls do not touch the Notify.
        let c = Arc::new(StreamCancel::default());
        let waiter = tokio::spawn({
            let c = c.clone();
            async move {
                let cancelled = c.cancelled();
                tokio::pin!(cancelled);
                let mut polls = 0u32;
                loop {
                    tokio::select! {
                        biased;
                        _ = &mut cancelled => break polls,
                        _ = tokio::time::sleep(Duration::from_millis(1)) => polls += 1,
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.cancel();
        let polls =
            tokio::time::timeout(Duration::from_secs(30), waiter).await.expect("the waiter saw the cancel").unwrap();
        assert!(polls > 1, "polled {polls} times before the cancel");
    }
}
