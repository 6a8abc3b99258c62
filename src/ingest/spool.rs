//! The durable spool of an upload in progress: an append-only journal of
//! encrypted records, fsynced before any byte in it is acknowledged.
//!
//! Records are sealed under a spool key derived from the object's data key
//! (distinct from the segment key) with fresh random nonces, so no plaintext
//! reaches disk and a record can be rewritten after a crash without reusing
//! a segment nonce. The object itself is sealed from the journal at commit,
//! from bytes that are already durable and can never change.
//!
//! Layout (v1, do not change):
//! ```text
//! file   := "RVSPOOL1" object_id[16] record*
//! record := start_offset u64 | plain_len u32 | nonce[12] | ciphertext[plain_len] | tag[16]
//! aad    := "recvault v1 spool record" object_id start_offset plain_len
//! ```
//! A torn or corrupt tail (a crash mid-write) is cut off at recovery; the
//! bytes before it are exactly the acknowledged ones.
//!
//! With `ingest.journal = "catalog"` the same records live in the catalog
//! instead (`CatalogJournal`), one chunk per sync, so that an acknowledged
//! byte survives the loss of the replica that received it.
//!
//! Everything here is blocking I/O: call it from `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce};

use crate::catalog::{Catalog, CatalogError};
use crate::crypto::secret::random_bytes;
use crate::model::{ObjectId, UploadId};

const MAGIC: &[u8; 8] = b"RVSPOOL1";
const FILE_HEADER_LEN: u64 = 8 + 16;
const RECORD_HEADER_LEN: usize = 8 + 4 + 12;
const TAG_LEN: usize = 16;
/// Largest plaintext in one record; bigger flushes are split.
pub const MAX_RECORD: usize = 1024 * 1024;
const AAD_LABEL: &[u8] = b"recvault v1 spool record";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool file does not belong to this upload")]
    Foreign,
    #[error("spool encryption failed")]
    Crypto,
    /// A shared journal chunk does not open or does not continue the
    /// journal (never a torn write: chunks are written atomically).
    #[error("the upload journal is corrupt")]
    Corrupt,
    /// Another stream (on this or another replica) holds the upload now.
    #[error("{0}")]
    TakenOver(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl SpoolError {
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// Path of an upload's journal. Built from the server-chosen object id only.
pub fn journal_path(spool_dir: &Path, object_id: &ObjectId) -> PathBuf {
    spool_dir.join(format!("{object_id}.journal"))
}

fn record_aad(object_id: &ObjectId, start: u64, len: u32) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(object_id.as_bytes());
    aad.extend_from_slice(&start.to_be_bytes());
    aad.extend_from_slice(&len.to_be_bytes());
    aad
}

/// An open journal file, positioned at its end.
pub struct FileJournal {
    file: File,
    path: PathBuf,
    object_id: ObjectId,
    /// End of the bytes written (durable once `sync` returns).
    end: u64,
}

impl FileJournal {
    /// Opens or creates the journal, replaying every intact record through
    /// `sink` (plaintext, in order) and cutting off a torn tail.
    pub fn open(
        spool_dir: &Path,
        object_id: ObjectId,
        key: &LessSafeKey,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(spool_dir)?;
        let path = journal_path(spool_dir, &object_id);
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let len = file.metadata()?.len();
        if len < FILE_HEADER_LEN {
            // New (or torn before its header was complete): start afresh.
            file.set_len(0)?;
            file.write_all(MAGIC)?;
            file.write_all(object_id.as_bytes())?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
            return Ok(Self { file, path, object_id, end: 0 });
        }
        let mut reader = BufReader::with_capacity(MAX_RECORD + 64, &mut file);
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        reader.read_exact(&mut header)?;
        if &header[..8] != MAGIC || header[8..] != object_id.as_bytes()[..] {
            return Err(SpoolError::Foreign);
        }
        let mut valid_len = FILE_HEADER_LEN;
        let mut end = 0u64;
        let mut buf = Vec::new();
        loop {
            let mut rh = [0u8; RECORD_HEADER_LEN];
            if read_full(&mut reader, &mut rh)? < RECORD_HEADER_LEN {
                break;
            }
            let start = u64::from_be_bytes(rh[..8].try_into().expect("8 bytes"));
            let plain_len = u32::from_be_bytes(rh[8..12].try_into().expect("4 bytes"));
            if start != end || plain_len as usize > MAX_RECORD {
                break;
            }
            buf.resize(plain_len as usize + TAG_LEN, 0);
            if read_full(&mut reader, &mut buf)? < buf.len() {
                break;
            }
            let nonce = Nonce::assume_unique_for_key(rh[12..].try_into().expect("12 bytes"));
            let Ok(plain) = key.open_in_place(nonce, Aad::from(record_aad(&object_id, start, plain_len)), &mut buf)
            else {
                break;
            };
            sink(plain);
            end += u64::from(plain_len);
            valid_len += (RECORD_HEADER_LEN + plain_len as usize + TAG_LEN) as u64;
        }
        drop(reader);
        if file.metadata()?.len() != valid_len {
            tracing::warn!(%object_id, kept = end, "cut a torn record off an upload journal");
            file.set_len(valid_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(valid_len))?;
        Ok(Self { file, path, object_id, end })
    }

    /// Bytes recorded so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Encrypts and appends `data` (which starts at `self.end()`); not yet
    /// durable.
    pub fn append(&mut self, key: &LessSafeKey, data: &[u8]) -> Result<(), SpoolError> {
        let mut out = Vec::with_capacity(data.len().min(MAX_RECORD) + RECORD_HEADER_LEN + TAG_LEN);
        for piece in data.chunks(MAX_RECORD) {
            out.clear();
            seal_record(key, &self.object_id, self.end, piece, &mut out)?;
            // Two writes, so crash tests can stop between them and leave a
            // torn record (A1); recovery cuts it off.
            let half = out.len() / 2;
            self.file.write_all(&out[..half])?;
            fail::fail_point!("spool-mid-record");
            self.file.write_all(&out[half..])?;
            self.end += piece.len() as u64;
        }
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.file.sync_data()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the journal back from the start, handing plaintext pieces to
    /// `sink` in order (used to build the object at commit).
    pub fn replay(
        spool_dir: &Path,
        object_id: ObjectId,
        key: &LessSafeKey,
        sink: impl FnMut(&[u8]),
    ) -> Result<u64, SpoolError> {
        Ok(Self::open(spool_dir, object_id, key, sink)?.end)
    }
}

/// Seals one record of at most [`MAX_RECORD`] bytes starting at `start`
/// and appends its encoding to `out`.
fn seal_record(
    key: &LessSafeKey,
    object_id: &ObjectId,
    start: u64,
    piece: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SpoolError> {
    debug_assert!(piece.len() <= MAX_RECORD);
    let len = piece.len() as u32;
    let nonce: [u8; 12] = random_bytes().map_err(|_| SpoolError::Crypto)?;
    out.extend_from_slice(&start.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&nonce);
    let body_at = out.len();
    out.extend_from_slice(piece);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(record_aad(object_id, start, len)),
            &mut out[body_at..],
        )
        .map_err(|_| SpoolError::Crypto)?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Opens every record of a shared-journal chunk, which must start at
/// `start` and be whole (a chunk is written in one transaction, so unlike a
/// file's tail it is never torn: any flaw is corruption). Returns the end.
fn open_chunk(
    key: &LessSafeKey,
    object_id: &ObjectId,
    start: u64,
    mut chunk: Vec<u8>,
    sink: &mut impl FnMut(&[u8]),
) -> Result<u64, SpoolError> {
    let mut end = start;
    let mut at = 0;
    while at < chunk.len() {
        let rest = &chunk[at..];
        if rest.len() < RECORD_HEADER_LEN + TAG_LEN {
            return Err(SpoolError::Corrupt);
        }
        let record_start = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        let plain_len = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes"));
        let nonce: [u8; 12] = rest[12..RECORD_HEADER_LEN].try_into().expect("12 bytes");
        let body = RECORD_HEADER_LEN + plain_len as usize + TAG_LEN;
        if record_start != end || plain_len as usize > MAX_RECORD || rest.len() < body {
            return Err(SpoolError::Corrupt);
        }
        let sealed = &mut chunk[at + RECORD_HEADER_LEN..at + body];
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(record_aad(object_id, end, plain_len)),
                sealed,
            )
            .map_err(|_| SpoolError::Corrupt)?;
        sink(plain);
        end += u64::from(plain_len);
        at += body;
    }
    Ok(end)
}

/// Where upload journals live.
#[derive(Clone)]
pub enum JournalPlace {
    /// Files in this (local) directory: the embedded default.
    Dir(PathBuf),
    /// Chunks in the catalog, shared by every replica using it, so an
    /// upload acknowledged by one replica resumes on any other (docs/REPLICAS.md).
    Catalog(Arc<dyn Catalog>),
}

impl std::fmt::Debug for JournalPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            Self::Catalog(_) => f.write_str("Catalog"),
        }
    }
}

/// Chunks read per catalog round trip while replaying a shared journal.
const REPLAY_PAGE: usize = 16;

/// An upload's journal held in the catalog: each sync is one chunk (the
/// records appended since the last), written in one transaction that also
/// checks this writer still holds the upload and its customer is active.
pub struct CatalogJournal {
    catalog: Arc<dyn Catalog>,
    upload_id: UploadId,
    object_id: ObjectId,
    epoch: u64,
    /// End of the bytes written to the catalog (durable).
    synced: u64,
    /// End of the bytes appended (`synced` plus `pending`).
    end: u64,
    pending: Vec<u8>,
}

impl CatalogJournal {
    /// Replays every chunk from the start through `sink`; returns the end.
    fn replay(
        catalog: &dyn Catalog,
        upload_id: &UploadId,
        object_id: &ObjectId,
        key: &LessSafeKey,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<u64, SpoolError> {
        let rt = tokio::runtime::Handle::current();
        let mut end = 0;
        loop {
            let page = rt.block_on(catalog.journal_chunks(upload_id, end, REPLAY_PAGE))?;
            if page.is_empty() {
                return Ok(end);
            }
            for chunk in page {
                if chunk.start != end {
                    return Err(SpoolError::Corrupt);
                }
                let chunk_end = chunk.end;
                if open_chunk(key, object_id, chunk.start, chunk.sealed, &mut sink)? != chunk_end {
                    return Err(SpoolError::Corrupt);
                }
                end = chunk_end;
            }
        }
    }
}

/// An open upload journal, in a local file or in the shared catalog.
/// Blocking: call it from `spawn_blocking` (the catalog variant waits on
/// the runtime from there).
pub enum Journal {
    File(FileJournal),
    Catalog(CatalogJournal),
}

impl Journal {
    /// Opens (or creates) the upload's journal for writing, replaying every
    /// durable byte through `sink`. In the catalog this claims the upload:
    /// a writer elsewhere that still holds it is fenced off.
    pub fn open(
        place: &JournalPlace,
        upload_id: UploadId,
        object_id: ObjectId,
        key: &LessSafeKey,
        sink: impl FnMut(&[u8]),
    ) -> Result<Self, SpoolError> {
        match place {
            JournalPlace::Dir(dir) => FileJournal::open(dir, object_id, key, sink).map(Self::File),
            JournalPlace::Catalog(catalog) => {
                let epoch = tokio::runtime::Handle::current().block_on(catalog.claim_journal(&upload_id))?;
                let end = CatalogJournal::replay(catalog.as_ref(), &upload_id, &object_id, key, sink)?;
                Ok(Self::Catalog(CatalogJournal {
                    catalog: catalog.clone(),
                    upload_id,
                    object_id,
                    epoch,
                    synced: end,
                    end,
                    pending: Vec::new(),
                }))
            }
        }
    }

    /// Bytes recorded so far (durable once `sync` returns).
    pub fn end(&self) -> u64 {
        match self {
            Self::File(f) => f.end(),
            Self::Catalog(c) => c.end,
        }
    }

    /// Encrypts and appends `data` (which starts at `self.end()`); not yet
    /// durable.
    pub fn append(&mut self, key: &LessSafeKey, data: &[u8]) -> Result<(), SpoolError> {
        match self {
            Self::File(f) => f.append(key, data),
            Self::Catalog(c) => {
                for piece in data.chunks(MAX_RECORD) {
                    seal_record(key, &c.object_id, c.end, piece, &mut c.pending)?;
                    c.end += piece.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        match self {
            Self::File(f) => f.sync(),
            Self::Catalog(c) => {
                if c.end == c.synced {
                    return Ok(());
                }
                let sealed = std::mem::take(&mut c.pending);
                let append = c.catalog.append_journal(&c.upload_id, c.epoch, c.synced, c.end, &sealed);
                match tokio::runtime::Handle::current().block_on(append) {
                    Ok(()) => {
                        c.synced = c.end;
                        Ok(())
                    }
                    Err(e) => {
                        // Not durable: forget it, so a retry cannot skip it.
                        c.end = c.synced;
                        Err(match e {
                            CatalogError::Conflict(m) => SpoolError::TakenOver(m),
                            other => SpoolError::Catalog(other),
                        })
                    }
                }
            }
        }
    }

    /// Reads the upload's journal back from the start, handing plaintext
    /// pieces to `sink` in order (used to build the object at commit).
    pub fn replay(
        place: &JournalPlace,
        upload_id: UploadId,
        object_id: ObjectId,
        key: &LessSafeKey,
        sink: impl FnMut(&[u8]),
    ) -> Result<u64, SpoolError> {
        match place {
            JournalPlace::Dir(dir) => FileJournal::replay(dir, object_id, key, sink),
            JournalPlace::Catalog(catalog) => {
                CatalogJournal::replay(catalog.as_ref(), &upload_id, &object_id, key, sink)
            }
        }
    }

    /// Removes a local journal file; the catalog removes its chunks itself
    /// when the upload commits or is discarded.
    pub fn remove(place: &JournalPlace, object_id: &ObjectId) -> std::io::Result<()> {
        match place {
            JournalPlace::Dir(dir) => remove(dir, object_id),
            JournalPlace::Catalog(_) => Ok(()),
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Removes an upload's journal; absent is fine.
pub fn remove(spool_dir: &Path, object_id: &ObjectId) -> std::io::Result<()> {
    match std::fs::remove_file(journal_path(spool_dir, object_id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;
    use crate::crypto::format::derive_spool_key;

    fn setup() -> (tempfile::TempDir, ObjectId, LessSafeKey) {
        let dir = tempfile::tempdir().unwrap();
        let id = ObjectId::new_random();
        let key = derive_spool_key(&DataKey::generate().unwrap(), id.as_bytes()).unwrap();
        (dir, id, key)
    }

    fn collect(dir: &Path, id: ObjectId, key: &LessSafeKey) -> Vec<u8> {
        let mut all = Vec::new();
        FileJournal::replay(dir, id, key, |p| all.extend_from_slice(p)).unwrap();
        all
    }

    #[test]
    fn append_sync_replay() {
        let (dir, id, key) = setup();
        let mut j = FileJournal::open(dir.path(), id, &key, |_| panic!("new journal is empty")).unwrap();
        j.append(&key, b"hello ").unwrap();
        j.append(&key, &vec![7u8; MAX_RECORD + 10]).unwrap();
        j.sync().unwrap();
        assert_eq!(j.end(), 6 + MAX_RECORD as u64 + 10);
        let all = collect(dir.path(), id, &key);
        assert_eq!(&all[..6], b"hello ");
        assert_eq!(all.len(), 6 + MAX_RECORD + 10);
    }

    #[test]
    fn a1_torn_tail_is_cut_and_appends_continue() {
        let (dir, id, key) = setup();
        let mut j = FileJournal::open(dir.path(), id, &key, |_| {}).unwrap();
        j.append(&key, b"durable").unwrap();
        j.sync().unwrap();
        j.append(&key, b"torn away").unwrap();
        let path = j.path().to_owned();
        drop(j);
        // Simulate a crash mid-write of the second record.
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let mut j = FileJournal::open(dir.path(), id, &key, |_| {}).unwrap();
        assert_eq!(j.end(), 7);
        j.append(&key, b" more").unwrap();
        j.sync().unwrap();
        assert_eq!(collect(dir.path(), id, &key), b"durable more");
    }

    #[test]
    fn corrupt_record_ends_the_durable_prefix() {
        let (dir, id, key) = setup();
        let mut j = FileJournal::open(dir.path(), id, &key, |_| {}).unwrap();
        j.append(&key, b"first").unwrap();
        j.append(&key, b"second").unwrap();
        j.sync().unwrap();
        let path = j.path().to_owned();
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(collect(dir.path(), id, &key), b"first");
    }

    #[test]
    fn no_plaintext_in_the_journal() {
        let (dir, id, key) = setup();
        let mut j = FileJournal::open(dir.path(), id, &key, |_| {}).unwrap();
        let canary = b"CANARY-PLAINTEXT-4111111111111111";
        j.append(&key, canary).unwrap();
        j.sync().unwrap();
        let bytes = std::fs::read(j.path()).unwrap();
        assert!(!bytes.windows(canary.len()).any(|w| w == canary));
    }

    #[test]
    fn a_journal_of_another_upload_is_refused() {
        let (dir, id, key) = setup();
        FileJournal::open(dir.path(), id, &key, |_| {}).unwrap();
        let other = ObjectId::new_random();
        std::fs::rename(journal_path(dir.path(), &id), journal_path(dir.path(), &other)).unwrap();
        assert!(matches!(FileJournal::open(dir.path(), other, &key, |_| {}), Err(SpoolError::Foreign)));
    }
}
