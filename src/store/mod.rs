//! Object storage adapter over `Arc<dyn ObjectStore>`: the one place object
//! paths are built, and write-once commits.
//!
//! This layer knows nothing of keys; it moves ciphertext only. Backends:
//! local files, memory (tests) and S3-compatible buckets (`s3`,
//! docs/S3.md). One conformance suite (`conformance`) runs against each.
//!
//! Every call to the backend runs under a [`RetryPolicy`]: transient
//! failures are retried a bounded number of times with jittered backoff,
//! each attempt has a deadline, permanent ones fail at once, and a write is
//! checked for its full length before a commit reports success
//! (docs/FAULTS.md).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::model::ObjectId;

pub mod conformance;
pub mod faulty;
mod retry;
mod s3;

pub use retry::RetryPolicy;
pub use s3::{S3Credentials, S3Settings, s3_client};

/// Objects up to this size are written with one PUT; larger ones go through
/// a multipart upload (to a staging path renamed create-only, or with
/// [`WriteOnce::CheckFirst`] to the final path itself).
pub const SINGLE_PUT_MAX: usize = 16 * 1024 * 1024;
/// Part size of multipart uploads (S3 needs ≥ 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object not found in storage")]
    NotFound,
    #[error("object already exists")]
    AlreadyExists,
    #[error("storage is full")]
    Full,
    /// The backend refused us (403, 401): a credential or bucket policy
    /// changed. Retrying cannot help.
    #[error("object storage refused access: {0}")]
    Denied(String),
    /// One attempt took longer than the policy's deadline.
    #[error("no answer from object storage within {0:?}")]
    TimedOut(std::time::Duration),
    /// Stored bytes are not the bytes written (a short write), or a stale
    /// object of another length sat at the path.
    #[error("object storage holds {found} bytes where {expected} were written")]
    Short { expected: u64, found: u64 },
    /// Transient failures outlasted the retry policy.
    #[error("object storage failed {attempts} time(s) on {op}: {last}")]
    Unavailable { op: &'static str, attempts: u32, last: String },
    /// The backend lacks something commits rely on (found by [`Store::check`]).
    #[error("{0}")]
    Unsupported(String),
    #[error("object storage failed: {0}")]
    Backend(#[source] object_store::Error),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => Self::NotFound,
            object_store::Error::AlreadyExists { .. } => Self::AlreadyExists,
            e @ (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }) => {
                Self::Denied(e.to_string())
            }
            other if is_disk_full(&other) => Self::Full,
            other => Self::Backend(other),
        }
    }
}

impl StoreError {
    /// Worth another attempt: the backend may answer differently next time.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::TimedOut(_) | Self::Short { .. } => true,
            Self::Backend(object_store::Error::JoinError { .. }) => true,
            Self::Backend(e @ object_store::Error::Generic { store, .. }) => match io_cause(e) {
                // A disk error may pass (EIO on a flaky mount, EINTR); a
                // full or read-only disk or a refused permission will not.
                Some(io) => !matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull
                        | std::io::ErrorKind::PermissionDenied
                        | std::io::ErrorKind::ReadOnlyFilesystem
                        | std::io::ErrorKind::InvalidInput
                ),
                // Without an I/O cause, a local store's error is a logic
                // error (a range past the end); a remote store's is a
                // failed request whose client gave up.
                None => *store != "LocalFileSystem",
            },
            _ => false,
        }
    }
}

fn is_disk_full(e: &object_store::Error) -> bool {
    io_cause(e).is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
}

/// The I/O error at the root of `e`, if any.
fn io_cause(e: &object_store::Error) -> Option<&std::io::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

/// Where an object's ciphertext lives. Built only from server-generated ids,
/// never from caller strings. Fanned out by the first id byte so no
/// directory grows without bound on a local file system.
pub fn object_path(id: &ObjectId) -> Path {
    let hex = id.to_string();
    Path::from(format!("objects/{}/{hex}", &hex[..2]))
}

fn staging_path(id: &ObjectId) -> Path {
    Path::from(format!("staging/{id}"))
}

/// Scratch objects of [`Store::check`], outside `objects/`; `n` tells the
/// probes of one check apart.
fn probe_path(run: &uuid::Uuid, n: u8) -> Path {
    Path::from(format!("probe/{run}-{n}"))
}

/// How a commit keeps "a committed object is never overwritten" on a
/// backend (docs/S3.md says which S3 servers support what).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOnce {
    /// The backend itself refuses to create a path that exists: a
    /// create-only PUT (`If-None-Match: *` on S3) for small objects, a
    /// create-only rename or copy for large ones. Atomic: of two racing
    /// commits exactly one wins.
    Conditional,
    /// For servers without conditional create: look (HEAD) before writing,
    /// then write unconditionally. A commit that finds the object refuses,
    /// but two commits racing between the look and the write could both
    /// land; the catalog rules that out (one upload, hence one writer, per
    /// object id), and two writers of one id would write the same bytes.
    CheckFirst,
}

/// The ciphertext store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    write_once: WriteOnce,
    retry: RetryPolicy,
    /// The root directory of an unwrapped local store, where a finished
    /// upload's file is published by a hard link instead of a copy.
    local_root: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Store {
    // Only the backend's name (and bucket): a client's settings may hold
    // credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.to_string())
            .field("write_once", &self.write_once)
            .field("retry", &self.retry)
            .finish()
    }
}

impl Store {
    /// A store over a backend that refuses to create an existing path.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self::with_write_once(inner, WriteOnce::Conditional)
    }

    pub fn with_write_once(inner: Arc<dyn ObjectStore>, write_once: WriteOnce) -> Self {
        Self { inner, write_once, retry: RetryPolicy::default(), local_root: None }
    }

    /// The same store with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Whether [`Store::publish_file`] links files into place (a local
    /// store not wrapped): nothing is gained by uploading ahead.
    pub fn links_files(&self) -> bool {
        self.local_root.is_some()
    }

    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }

    /// The same store over a wrapped backend (tests put a
    /// [`faulty::FaultyStore`] between the service and real storage).
    pub fn map_backend(mut self, wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> Self {
        self.inner = wrap(self.inner);
        // Writes must now pass through the wrapper.
        self.local_root = None;
        self
    }

    /// A local file-system store under `root`, fsyncing files and their
    /// directories so a committed object survives power loss.
    ///
    /// The 256 fan-out directories are made here, durably, so no object
    /// write ever depends on a directory whose own name is not yet on disk;
    /// temporary files a crash left inside them (`<id>#<n>`, the backend's
    /// staging names; ciphertext only) are removed, which is safe because
    /// nothing writes before the store is open.
    pub fn local(root: &std::path::Path) -> Result<Self, StoreError> {
        let objects = root.join("objects");
        create_dir_durable(&objects).map_err(local_error)?;
        let mut created = false;
        for byte in 0..=255u8 {
            let dir = objects.join(format!("{byte:02x}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let removed = remove_temp_files(&dir).map_err(local_error)?;
                    if removed > 0 {
                        tracing::info!(dir = %dir.display(), removed, "removed temporary object files left by a crash");
                    }
                }
                Err(e) => return Err(local_error(e)),
            }
        }
        if created {
            std::fs::File::open(&objects).and_then(|d| d.sync_all()).map_err(local_error)?;
        }
        let fs =
            object_store::local::LocalFileSystem::new_with_prefix(root)?.with_automatic_cleanup(true).with_fsync(true);
        let root = std::fs::canonicalize(root).map_err(local_error)?;
        Ok(Self { local_root: Some(root), ..Self::new(Arc::new(fs)) })
    }

    /// An in-memory store, for unit tests.
    pub fn memory() -> Self {
        Self::new(Arc::new(object_store::memory::InMemory::new()))
    }

    /// Checks a remote backend before it is trusted with commits: that it
    /// answers with these credentials, and, if commits rely on it, that it
    /// refuses to create a path that exists — by PUT and by copy — rather
    /// than silently overwriting. Leaves nothing behind when it can reach
    /// the backend.
    pub async fn check(&self) -> Result<(), StoreError> {
        // A listing, not a HEAD: a HEAD cannot tell a missing bucket from a
        // missing key.
        self.inner.list_with_delimiter(Some(&Path::from("probe"))).await?;
        if self.write_once == WriteOnce::CheckFirst {
            return Ok(());
        }
        let run = uuid::Uuid::new_v4();
        let outcome = self.check_conditional(&run).await;
        for n in 0..3 {
            let _ = self.inner.delete(&probe_path(&run, n)).await;
        }
        outcome
    }

    /// The readiness probe: one listing of an empty prefix, which a remote
    /// backend answers only when reachable with these credentials and the
    /// bucket exists. Writes nothing.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.inner.list_with_delimiter(Some(&Path::from("probe"))).await?;
        Ok(())
    }

    async fn check_conditional(&self, run: &uuid::Uuid) -> Result<(), StoreError> {
        let hint = "set storage.write_once = \"check-first\" for this server (docs/S3.md)";
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let (first, second, third) = (probe_path(run, 0), probe_path(run, 1), probe_path(run, 2));
        match self.inner.put_opts(&first, PutPayload::from_static(b"probe"), create.clone()).await {
            Ok(_) => {}
            Err(object_store::Error::NotImplemented { .. }) => {
                return Err(StoreError::Unsupported(format!("the client has conditional PUT disabled; {hint}")));
            }
            Err(e) => return Err(e.into()),
        }
        match self.inner.put_opts(&first, PutPayload::from_static(b"again"), create).await {
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Ok(_) => {
                return Err(StoreError::Unsupported(format!(
                    "the server overwrote an object despite `If-None-Match: *` (no conditional create); {hint}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.inner.put(&second, PutPayload::from_static(b"source")).await?;
        if let Err(e) = self.inner.copy_if_not_exists(&second, &third).await {
            // Some servers lack the multipart copy, or refuse a part this
            // small; either way large commits could not be trusted.
            return Err(StoreError::Unsupported(format!(
                "a create-only copy (one UploadPartCopy completed with `If-None-Match: *`) failed: {e}; if the \
                 server lacks it, {hint}"
            )));
        }
        match self.inner.copy_if_not_exists(&second, &first).await {
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Ok(()) => {
                return Err(StoreError::Unsupported(format!(
                    "the server overwrote an object with a create-only copy; {hint}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let kept = self.inner.get(&first).await?.bytes().await?;
        if &kept[..] != b"probe" {
            return Err(StoreError::Unsupported(format!("a refused write changed the object anyway; {hint}")));
        }
        Ok(())
    }

    /// Starts a write-once upload of object `id`.
    pub fn writer(&self, id: ObjectId) -> ObjectWriter {
        ObjectWriter {
            store: self.inner.clone(),
            write_once: self.write_once,
            retry: self.retry,
            id,
            buffer: Vec::new(),
            multipart: None,
            written: 0,
        }
    }

    /// Publishes a complete object held in a local file of `len` bytes
    /// (a finished upload's sealed segments), write-once like
    /// [`ObjectWriter::commit`]. On a local store on the same file system
    /// the file is hard-linked into place and its directory fsynced, so
    /// the bytes are written once; otherwise they are copied in. The file
    /// must never change afterwards.
    pub async fn publish_file(&self, id: ObjectId, file: &std::path::Path, len: u64) -> Result<(), StoreError> {
        let found = tokio::fs::metadata(file).await.map_err(local_error)?.len();
        if found != len {
            return Err(StoreError::Short { expected: len, found });
        }
        if let Some(root) = &self.local_root {
            let target = root.join(object_path(&id).as_ref());
            let (src, root) = (file.to_owned(), root.clone());
            let linked = tokio::task::spawn_blocking(move || link_durably(&root, &src, &target))
                .await
                .map_err(|e| StoreError::Backend(object_store::Error::JoinError { source: e }))?;
            match linked {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(StoreError::AlreadyExists),
                // Another file system, or one without hard links: copy.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::CrossesDevices
                            | std::io::ErrorKind::Unsupported
                            | std::io::ErrorKind::PermissionDenied
                    ) =>
                {
                    tracing::debug!(error = %e, "cannot link a finished upload into the store; copying it");
                }
                Err(e) => return Err(local_error(e)),
            }
        }
        let mut source = tokio::fs::File::open(file).await.map_err(local_error)?;
        let mut writer = self.writer(id);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match tokio::io::AsyncReadExt::read(&mut source, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    writer.abort().await;
                    return Err(local_error(e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.write(&buf[..n]).await {
                writer.abort().await;
                return Err(e);
            }
        }
        if writer.written != len {
            // The file changed under us: never publish that.
            let found = writer.written;
            writer.abort().await;
            return Err(StoreError::Short { expected: len, found });
        }
        writer.commit().await
    }

    /// Size of the stored object.
    pub async fn size(&self, id: &ObjectId) -> Result<u64, StoreError> {
        let path = &object_path(id);
        let inner = self.inner.as_ref();
        self.retry.run("head", |_| async move { Ok(inner.head(path).await?.size) }).await
    }

    /// Reads a byte range of the stored ciphertext. A short answer is the
    /// reader's to judge (a truncated object is an integrity failure, not
    /// something a retry fixes).
    pub async fn read_range(&self, id: &ObjectId, range: Range<u64>) -> Result<Bytes, StoreError> {
        let (path, range) = (&object_path(id), &range);
        let inner = self.inner.as_ref();
        self.retry.run("get", |_| async move { Ok(inner.get_range(path, range.clone()).await?) }).await
    }

    /// Deletes an object and any staging leftovers; absent is fine.
    pub async fn delete(&self, id: &ObjectId) -> Result<(), StoreError> {
        for path in [object_path(id), staging_path(id)] {
            self.retry.run("delete", |_| delete_if_present(self.inner.as_ref(), &path)).await?;
        }
        Ok(())
    }

    /// Every stored object id (for audits and scans).
    pub async fn list_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut stream = self.inner.list(Some(&Path::from("objects")));
        while let Some(meta) = stream.next().await {
            if let Some(name) = meta?.location.filename() {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }
}

/// Creates `dir` and any missing parents so that they survive a power
/// cut: each directory that gained an entry is fsynced.
pub fn create_dir_durable(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // Every directory that is about to gain an entry: the new ones' parents
    // up to the first that exists.
    let mut gaining = Vec::new();
    for parent in dir.ancestors().skip(1) {
        if parent.as_os_str().is_empty() {
            gaining.push(std::path::PathBuf::from("."));
            break;
        }
        gaining.push(parent.to_owned());
        if parent.is_dir() {
            break;
        }
    }
    std::fs::create_dir_all(dir)?;
    for parent in gaining {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Removes the backend's temporary files (`<name>#<n>`) in one fan-out
/// directory; returns how many.
fn remove_temp_files(dir: &std::path::Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.contains('#')) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(removed)
}

/// An I/O error of the local file system as a store error.
fn local_error(e: std::io::Error) -> StoreError {
    object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) }.into()
}

/// Hard-links `src` (already fsynced) to `target` under `root`,
/// create-only, and makes the new name durable.
fn link_durably(root: &std::path::Path, src: &std::path::Path, target: &std::path::Path) -> std::io::Result<()> {
    let parent = target.parent().expect("object paths have a parent");
    if !parent.is_dir() {
        std::fs::create_dir_all(parent)?;
        // The new directories' own names must be durable too.
        for dir in parent.ancestors().skip(1) {
            std::fs::File::open(dir)?.sync_all()?;
            if dir == root {
                break;
            }
        }
    }
    std::fs::hard_link(src, target)?;
    std::fs::File::open(parent)?.sync_all()
}

async fn delete_if_present(store: &dyn ObjectStore, path: &Path) -> Result<(), StoreError> {
    match store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Checks that `path` holds exactly `expected` bytes. A short object (a
/// truncated write) is removed so no catalog row can ever point at it, and
/// reported as [`StoreError::Short`], which a retry may fix.
async fn verify_length(store: &dyn ObjectStore, path: &Path, expected: u64) -> Result<(), StoreError> {
    let found = match store.head(path).await {
        Ok(meta) => meta.size,
        // Acknowledged but not there: as short as can be.
        Err(object_store::Error::NotFound { .. }) => return Err(StoreError::Short { expected, found: 0 }),
        Err(e) => return Err(e.into()),
    };
    if found == expected {
        return Ok(());
    }
    tracing::warn!(%path, expected, found, "stored object has the wrong length; removed");
    delete_if_present(store, path).await?;
    Err(StoreError::Short { expected, found })
}

/// An error of a write. A write answered "not found" means the bucket (or
/// directory) is gone — an operator's problem, not a missing object.
fn write_error(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::Denied(format!("the storage location is missing: {e}")),
        other => other.into(),
    }
}

/// The check of [`WriteOnce::CheckFirst`]: `AlreadyExists` if `path` is there.
async fn refuse_if_exists(store: &dyn ObjectStore, path: &Path) -> Result<(), StoreError> {
    match store.head(path).await {
        Ok(_) => Err(StoreError::AlreadyExists),
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Streams one object's ciphertext into storage; nothing is visible at the
/// final path until [`ObjectWriter::commit`] succeeds, and a commit never
/// overwrites an existing object.
pub struct ObjectWriter {
    store: Arc<dyn ObjectStore>,
    write_once: WriteOnce,
    retry: RetryPolicy,
    id: ObjectId,
    buffer: Vec<u8>,
    multipart: Option<WriteMultipart>,
    /// Bytes handed to [`ObjectWriter::write`]; the committed object must
    /// hold exactly these.
    written: u64,
}

impl ObjectWriter {
    /// Where a multipart upload goes: a staging path renamed create-only at
    /// commit, or (check-first) the final path itself.
    fn multipart_path(&self) -> Path {
        match self.write_once {
            WriteOnce::Conditional => staging_path(&self.id),
            WriteOnce::CheckFirst => object_path(&self.id),
        }
    }

    /// Appends ciphertext. Switches to a multipart upload once the object
    /// outgrows a single PUT, so memory stays bounded by the part size.
    ///
    /// A part already handed to the backend cannot be sent again through
    /// this interface, so parts get the deadline but no retry here: S3's
    /// client retries each part request itself, and a failed commit leaves
    /// the upload's journal intact for the next finish.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.written += data.len() as u64;
        if let Some(mp) = &mut self.multipart {
            self.retry.once("put part", async { Ok(mp.wait_for_capacity(2).await?) }).await?;
            mp.write(data);
            return Ok(());
        }
        self.buffer.extend_from_slice(data);
        if self.buffer.len() > SINGLE_PUT_MAX {
            let path = &self.multipart_path();
            let store = self.store.as_ref();
            let upload = self
                .retry
                .run("create multipart upload", |_| async move { store.put_multipart(path).await.map_err(write_error) })
                .await?;
            let mut mp = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            mp.write(&std::mem::take(&mut self.buffer));
            self.multipart = Some(mp);
        }
        Ok(())
    }

    /// Makes the object visible at its final path, write-once, after
    /// checking it holds every byte written. Returns
    /// [`StoreError::AlreadyExists`] if an object is already there (a
    /// retried commit whose first answer was lost: the caller decides
    /// whether that is the same object).
    pub async fn commit(self) -> Result<(), StoreError> {
        let final_path = &object_path(&self.id);
        let store = self.store.as_ref();
        let expected = self.written;
        let retry = self.retry;
        match (self.write_once, self.multipart) {
            (WriteOnce::Conditional, None) => {
                let payload = &PutPayload::from(self.buffer);
                retry
                    .run("put", |_| async move {
                        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                        match store.put_opts(final_path, payload.clone(), opts).await {
                            Ok(_) => verify_length(store, final_path, expected).await,
                            Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::AlreadyExists),
                            Err(e) => Err(write_error(e)),
                        }
                    })
                    .await?;
            }
            (WriteOnce::Conditional, Some(mp)) => {
                let staging = &staging_path(&self.id);
                if let Err(e) = retry.once("complete multipart upload", async { Ok(mp.finish().await?) }).await {
                    let _ = delete_if_present(store, staging).await;
                    return Err(e);
                }
                let renamed = retry
                    .run("rename", |attempt| async move {
                        match store.rename_if_not_exists(staging, final_path).await {
                            Ok(()) => verify_length(store, final_path, expected).await,
                            Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::AlreadyExists),
                            // An earlier attempt moved it and lost its answer.
                            Err(object_store::Error::NotFound { .. }) if attempt > 0 => Err(StoreError::AlreadyExists),
                            Err(e) => Err(e.into()),
                        }
                    })
                    .await;
                if renamed.is_err() {
                    let _ = delete_if_present(store, staging).await;
                }
                renamed?;
            }
            (WriteOnce::CheckFirst, None) => {
                let payload = &PutPayload::from(self.buffer);
                retry
                    .run("put", |_| async move {
                        match store.head(final_path).await {
                            Ok(_) => return Err(StoreError::AlreadyExists),
                            Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                        store.put(final_path, payload.clone()).await.map_err(write_error)?;
                        verify_length(store, final_path, expected).await
                    })
                    .await?;
            }
            (WriteOnce::CheckFirst, Some(mp)) => {
                // The parts went straight to the final path: an S3 multipart
                // upload stays invisible until completed, and completing in
                // place spares a server-side copy of the whole object.
                if let Err(e) = retry.run("head", |_| refuse_if_exists(store, final_path)).await {
                    let _ = mp.abort().await;
                    return Err(e);
                }
                retry.once("complete multipart upload", async { Ok(mp.finish().await?) }).await?;
                verify_length(store, final_path, expected).await?;
            }
        }
        Ok(())
    }

    /// The object being written.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// Gives up: removes any staged parts.
    pub async fn abort(self) {
        if let Some(mp) = self.multipart {
            let _ = mp.abort().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance_memory() {
        conformance::run(&Store::memory()).await;
    }

    #[tokio::test]
    async fn conformance_local() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run(&Store::local(dir.path()).unwrap()).await;
    }

    /// The check-first commit (for S3 servers without conditional create)
    /// keeps every property too. It writes with plain PUTs, which this
    /// backend, like Garage, lets overwrite: only the check stands between.
    #[tokio::test]
    async fn conformance_check_first() {
        let inner = Arc::new(object_store::memory::InMemory::new());
        conformance::run(&Store::with_write_once(inner, WriteOnce::CheckFirst)).await;
    }

    #[test]
    fn debug_names_the_backend_only() {
        let text = format!("{:?}", Store::memory());
        assert!(text.contains("InMemory"), "{text}");
    }

    #[test]
    fn a2_directories_are_created_durably_and_leftovers_removed() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("a/b/objects-root");
        create_dir_durable(&root).unwrap();
        assert!(root.is_dir());
        create_dir_durable(&root).unwrap();
        let store = Store::local(&root).unwrap();
        assert!(store.links_files());
        assert_eq!(std::fs::read_dir(root.join("objects")).unwrap().count(), 256);
        // A temporary file a crash left beside objects is gone at the next open.
        let id = ObjectId::new_random();
        let leftover = root.join(format!("{}#1", object_path(&id)));
        std::fs::write(&leftover, b"ciphertext").unwrap();
        let kept = root.join(object_path(&id).to_string());
        std::fs::write(&kept, b"ciphertext").unwrap();
        Store::local(&root).unwrap();
        assert!(!leftover.exists() && kept.exists());
    }

    #[test]
    fn object_paths_use_only_the_id() {
        let id = ObjectId::parse("0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b").unwrap();
        assert_eq!(object_path(&id).as_ref(), "objects/0b/0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b");
    }
}
