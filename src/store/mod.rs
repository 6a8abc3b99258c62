//! Object storage adapter over `Arc<dyn ObjectStore>`: the one place object
//! paths are built, and write-once commits.
//!
//! This layer knows nothing of keys; it moves ciphertext only.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::model::ObjectId;

/// Objects up to this size are written with one conditional PUT; larger ones
/// go through a multipart upload to a staging path and a create-only rename.
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

/// The ciphertext store.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
}

impl Store {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner }
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

    /// Starts a write-once upload of object `id`.
    pub fn writer(&self, id: ObjectId) -> ObjectWriter {
        ObjectWriter { store: self.inner.clone(), id, buffer: Vec::new(), multipart: None }
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

/// Streams one object's ciphertext into storage; nothing is visible at the
/// final path until [`ObjectWriter::commit`] succeeds, and a commit never
/// overwrites an existing object.
pub struct ObjectWriter {
    store: Arc<dyn ObjectStore>,
    id: ObjectId,
    buffer: Vec<u8>,
    multipart: Option<WriteMultipart>,
}

impl ObjectWriter {
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
            let upload = self.store.put_multipart(&staging_path(&self.id)).await?;
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
        match self.multipart {
            None => {
                let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                self.store.put_opts(&final_path, PutPayload::from(self.buffer), opts).await?;
            }
            Some(mp) => {
                mp.finish().await?;
                let staging = staging_path(&self.id);
                let renamed = self.store.rename_if_not_exists(&staging, &final_path).await;
                if renamed.is_err() {
                    let _ = self.store.delete(&staging).await;
                }
                renamed?;
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

    async fn conformance(store: Store) {
        let id = ObjectId::new_random();
        let mut w = store.writer(id);
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(store.size(&id).await.unwrap(), 11);
        assert_eq!(&store.read_range(&id, 6..11).await.unwrap()[..], b"world");

        // Write-once: a second commit of the same id is refused, the first
        // object is untouched.
        let mut again = store.writer(id);
        again.write(b"other").await.unwrap();
        assert!(matches!(again.commit().await, Err(StoreError::AlreadyExists)));
        assert_eq!(store.size(&id).await.unwrap(), 11);

        // Large objects take the multipart path and are equally write-once.
        let big = ObjectId::new_random();
        let mut w = store.writer(big);
        let chunk = vec![7u8; 1024 * 1024];
        for _ in 0..(SINGLE_PUT_MAX / chunk.len() + 3) {
            w.write(&chunk).await.unwrap();
        }
        w.commit().await.unwrap();
        assert_eq!(store.size(&big).await.unwrap() as usize, (SINGLE_PUT_MAX / chunk.len() + 3) * chunk.len());
        let mut w = store.writer(big);
        for _ in 0..(SINGLE_PUT_MAX / chunk.len() + 1) {
            w.write(&chunk).await.unwrap();
        }
        assert!(matches!(w.commit().await, Err(StoreError::AlreadyExists)));

        let mut ids = store.list_ids().await.unwrap();
        ids.sort();
        let mut expected = vec![id.to_string(), big.to_string()];
        expected.sort();
        assert_eq!(ids, expected, "no staging leftovers are listed as objects");

        store.delete(&id).await.unwrap();
        assert!(matches!(store.size(&id).await, Err(StoreError::NotFound)));
        store.delete(&id).await.unwrap();
    }

    #[tokio::test]
    async fn conformance_memory() {
        conformance(Store::memory()).await;
    }

    #[tokio::test]
    async fn conformance_local() {
        let dir = tempfile::tempdir().unwrap();
        conformance(Store::local(dir.path()).unwrap()).await;
    }

    #[test]
    fn object_paths_use_only_the_id() {
        let id = ObjectId::parse("0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b").unwrap();
        assert_eq!(object_path(&id).as_ref(), "objects/0b/0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b");
    }
}
