//! Object storage adapter over `Arc<dyn ObjectStore>`: the one place object
//! paths are built, and write-once commits.
//!
//! This layer knows nothing of keys; it moves ciphertext only. Backends:
//! local files, memory (tests) and S3-compatible buckets (`s3`,
//! docs/S3.md). One conformance suite (`conformance`) runs against each.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::model::ObjectId;

pub mod conformance;
mod s3;

pub use s3::{S3Credentials, S3Settings};

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
            other if is_disk_full(&other) => Self::Full,
            other => Self::Backend(other),
        }
    }
}

fn is_disk_full(e: &object_store::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::StorageFull;
        }
        source = s.source();
    }
    false
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
}

impl std::fmt::Debug for Store {
    // Only the backend's name (and bucket): a client's settings may hold
    // credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.inner.to_string()).field("write_once", &self.write_once).finish()
    }
}

impl Store {
    /// A store over a backend that refuses to create an existing path.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self::with_write_once(inner, WriteOnce::Conditional)
    }

    pub fn with_write_once(inner: Arc<dyn ObjectStore>, write_once: WriteOnce) -> Self {
        Self { inner, write_once }
    }

    /// A local file-system store under `root`, fsyncing files and their
    /// directories so a committed object survives power loss.
    pub fn local(root: &std::path::Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|e| {
            StoreError::Backend(object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) })
        })?;
        let fs =
            object_store::local::LocalFileSystem::new_with_prefix(root)?.with_automatic_cleanup(true).with_fsync(true);
        Ok(Self::new(Arc::new(fs)))
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
        ObjectWriter { store: self.inner.clone(), write_once: self.write_once, id, buffer: Vec::new(), multipart: None }
    }

    /// Size of the stored object.
    pub async fn size(&self, id: &ObjectId) -> Result<u64, StoreError> {
        Ok(self.inner.head(&object_path(id)).await?.size)
    }

    /// Reads a byte range of the stored ciphertext.
    pub async fn read_range(&self, id: &ObjectId, range: Range<u64>) -> Result<Bytes, StoreError> {
        Ok(self.inner.get_range(&object_path(id), range).await?)
    }

    /// Deletes an object and any staging leftovers; absent is fine.
    pub async fn delete(&self, id: &ObjectId) -> Result<(), StoreError> {
        for path in [object_path(id), staging_path(id)] {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
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
    id: ObjectId,
    buffer: Vec<u8>,
    multipart: Option<WriteMultipart>,
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
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if let Some(mp) = &mut self.multipart {
            mp.wait_for_capacity(2).await?;
            mp.write(data);
            return Ok(());
        }
        self.buffer.extend_from_slice(data);
        if self.buffer.len() > SINGLE_PUT_MAX {
            let upload = self.store.put_multipart(&self.multipart_path()).await?;
            let mut mp = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            mp.write(&std::mem::take(&mut self.buffer));
            self.multipart = Some(mp);
        }
        Ok(())
    }

    /// Makes the object visible at its final path, write-once. Returns
    /// [`StoreError::AlreadyExists`] if an object is already there (a retried
    /// commit: the caller decides whether that is the same object).
    pub async fn commit(self) -> Result<(), StoreError> {
        let final_path = object_path(&self.id);
        match (self.write_once, self.multipart) {
            (WriteOnce::Conditional, None) => {
                let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                self.store.put_opts(&final_path, PutPayload::from(self.buffer), opts).await?;
            }
            (WriteOnce::Conditional, Some(mp)) => {
                mp.finish().await?;
                let staging = staging_path(&self.id);
                let renamed = self.store.rename_if_not_exists(&staging, &final_path).await;
                if renamed.is_err() {
                    let _ = self.store.delete(&staging).await;
                }
                renamed?;
            }
            (WriteOnce::CheckFirst, None) => {
                refuse_if_exists(self.store.as_ref(), &final_path).await?;
                self.store.put(&final_path, PutPayload::from(self.buffer)).await?;
            }
            (WriteOnce::CheckFirst, Some(mp)) => {
                // The parts went straight to the final path: an S3 multipart
                // upload stays invisible until completed, and completing in
                // place spares a server-side copy of the whole object.
                if let Err(e) = refuse_if_exists(self.store.as_ref(), &final_path).await {
                    let _ = mp.abort().await;
                    return Err(e);
                }
                mp.finish().await?;
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
    fn object_paths_use_only_the_id() {
        let id = ObjectId::parse("0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b").unwrap();
        assert_eq!(object_path(&id).as_ref(), "objects/0b/0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b");
    }
}
