//! The durable spool of an upload in progress, fsynced before any byte in
//! it is acknowledged. No plaintext reaches disk.
//!
//! A local upload journal is two files:
//!
//! - `<object_id>.seg` is the object itself as far as it is known: its
//!   header and every full segment that is certainly not the last, sealed
//!   exactly as in the final object (a segment's nonce is fixed by the
//!   object's nonce prefix and its index, so resealing one after a crash
//!   gives the same bytes). At finish the last segment is appended and the
//!   file becomes the object: linked into a local store, or copied into a
//!   remote one, with no second pass of encryption or disk writes
//!   (BENCHMARKS.md, "Bulk ingest").
//! - `<object_id>.journal` holds the bytes after the last sealed segment
//!   (the held-back tail, under one segment) as records sealed under a spool
//!   key derived from the data key (distinct from the segment key) with
//!   fresh nonces (a random prefix drawn each time the journal is opened,
//!   then a counter: [`RecordNonces`]), so a record can be rewritten after
//!   a crash without reusing a nonce. Records wholly inside the sealed
//!   segments are obsolete; once they outgrow [`ROTATE_AT`] the journal is
//!   rewritten holding the tail only.
//!
//! Layout of the journal (v2; v1 files, whose records start at 0 and never
//! overlap, are read the same way):
//! ```text
//! file   := "RVSPOOL2" object_id[16] record*
//! record := start_offset u64 | plain_len u32 | nonce[12] | ciphertext[plain_len] | tag[16]
//! aad    := "recvault v1 spool record" object_id start_offset plain_len
//! ```
//! Recovery reads the segments first, cutting a torn or corrupt one off,
//! then the records in order: a record may start anywhere up to the end
//! known so far (overlapping bytes are skipped); one that starts beyond it,
//! is torn or does not open ends the journal there. The bytes before that
//! are exactly the acknowledged ones (or more).
//!
//! With `ingest.journal = "catalog"` the records live in the catalog
//! instead (`CatalogJournal`), one chunk per sync, so that an acknowledged
//! byte survives the loss of the replica that received it; the object is
//! then sealed from them at finish.
//!
//! The local journal's I/O blocks: call it from `spawn_blocking`. The
//! catalog's is awaited on the runtime, never waited on from a blocking
//! thread ([`SharedReplay`]).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce};
use ring::digest;

use crate::catalog::{Catalog, CatalogError, JournalChunk};
use crate::crypto::DataKey;
use crate::crypto::format::{self, HeaderFields, ObjectEncryptor, SegmentOpener, SegmentSealer};
use crate::crypto::secret::random_bytes;
use crate::model::{ObjectId, UploadId};

use super::wal::{Pin, Wal};

const MAGIC: &[u8; 8] = b"RVSPOOL2";
/// Journals written before the segment file existed (records from 0).
const MAGIC_V1: &[u8; 8] = b"RVSPOOL1";
pub(crate) const FILE_HEADER_LEN: u64 = 8 + 16;
const RECORD_HEADER_LEN: usize = 8 + 4 + 12;
const TAG_LEN: usize = 16;
/// Largest plaintext in one record; bigger flushes are split.
pub const MAX_RECORD: usize = 1024 * 1024;
/// A journal file longer than this is rewritten with the tail only.
pub const ROTATE_AT: u64 = 1024 * 1024;
/// Batches at least this large are hashed on a second thread while they
/// are written (a thread per small flush of a live call would cost more).
const PARALLEL_HASH_MIN: usize = 512 * 1024;

/// Plaintext sealed and written at a time by one append.
const SEAL_PIECE: usize = 1 << 20;
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
    /// The last segment was sealed (a finish got that far): the upload
    /// takes no more data, only a finish.
    #[error("the upload was finished at {0} bytes and takes no more data; send finish")]
    Sealed(u64),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// A blocking task of the spool that panicked or was cancelled.
impl From<tokio::task::JoinError> for SpoolError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Io(std::io::Error::other(e.to_string()))
    }
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

/// Path of an upload's sealed segments (the object in the making).
pub fn segments_path(spool_dir: &Path, object_id: &ObjectId) -> PathBuf {
    spool_dir.join(format!("{object_id}.seg"))
}

pub(crate) fn rotating_path(spool_dir: &Path, object_id: &ObjectId) -> PathBuf {
    spool_dir.join(format!("{object_id}.journal.new"))
}

/// The object id a spool file belongs to, from its name (any of the files
/// of an upload journal), or `None` for a name no journal uses.
pub fn spool_file_id(file_name: &str) -> Option<&str> {
    [".journal", ".seg", ".journal.new"].iter().find_map(|suffix| file_name.strip_suffix(suffix))
}

const AAD_LEN: usize = AAD_LABEL.len() + 16 + 8 + 4;

/// On the stack: a live call seals a record every 100 ms, and thousands
/// of them allocating one each showed in the profile (BENCHMARKS.md).
fn record_aad(object_id: &ObjectId, start: u64, len: u32) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    let (label, rest) = aad.split_at_mut(AAD_LABEL.len());
    label.copy_from_slice(AAD_LABEL);
    rest[..16].copy_from_slice(object_id.as_bytes());
    rest[16..24].copy_from_slice(&start.to_be_bytes());
    rest[24..].copy_from_slice(&len.to_be_bytes());
    aad
}

/// Nonces of one writer's records: a random 8-byte prefix, drawn when the
/// journal is opened, then a 4-byte counter (the deterministic
/// construction of NIST SP 800-38D, 8.2.1, with a random fixed field). A
/// random 12-byte nonce per record cost a `getrandom` system call each, 1 %
/// of the server's CPU at 3 000 live calls (BENCHMARKS.md). Every writer
/// of the same upload (a restart, a resume, another replica) draws its own
/// prefix, so two of them share one with a chance of about n² / 2⁶⁵ for n
/// opens; a new prefix is drawn before the counter could wrap.
struct RecordNonces {
    prefix: [u8; 8],
    counter: u32,
}

impl RecordNonces {
    fn new() -> Result<Self, SpoolError> {
        Ok(Self { prefix: random_bytes().map_err(|_| SpoolError::Crypto)?, counter: 0 })
    }

    fn next(&mut self) -> Result<[u8; 12], SpoolError> {
        if self.counter == u32::MAX {
            *self = Self::new()?;
        }
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.prefix);
        nonce[8..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(nonce)
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The keys of a local journal: the spool key of its records and the
/// object's segment keys.
pub struct JournalKeys<'a> {
    pub spool: &'a LessSafeKey,
    pub dek: &'a DataKey,
    pub fields: HeaderFields,
}

/// An open local journal: segments file plus records file, both
/// positioned at their ends.
pub struct FileJournal {
    seg: File,
    seg_path: PathBuf,
    file: File,
    path: PathBuf,
    object_id: ObjectId,
    /// Seals the segments; `None` once the last one is written.
    enc: Option<ObjectEncryptor>,
    /// SHA-256 of every byte recorded, in order.
    hash: digest::Context,
    /// End of the bytes recorded (durable once `sync` returns).
    end: u64,
    /// Length of the records file.
    file_len: u64,
    /// Length of the segments file.
    seg_len: u64,
    seg_dirty: bool,
    file_dirty: bool,
    scratch: Vec<u8>,
    nonces: RecordNonces,
    /// With `ingest.sync = "log"`: records go to the shared log through
    /// this, not to the records file.
    log: Option<Pin>,
}

/// One full or final segment read back from a segments file.
enum SegRead {
    Full,
    Last,
    /// Torn, corrupt or absent: the file ends before this segment.
    End,
}

impl FileJournal {
    /// Opens or creates the journal, replaying every intact byte through
    /// `sink` (plaintext, in order) and cutting off torn tails.
    pub fn open(
        spool_dir: &Path,
        object_id: ObjectId,
        keys: &JournalKeys<'_>,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(spool_dir)?;
        let sealer = SegmentSealer::new(keys.dek, keys.fields.clone()).map_err(|_| SpoolError::Crypto)?;
        let segment_size = u64::from(sealer.segment_size());
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut feed = |data: &[u8]| {
            hash.update(data);
            sink(data);
        };

        // 1. The sealed segments.
        let seg_path = segments_path(spool_dir, &object_id);
        let mut seg = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&seg_path)?;
        let seg_len = seg.metadata()?.len();
        let header = *sealer.header();
        if seg_len < format::HEADER_LEN as u64 {
            seg.set_len(0)?;
            seg.write_all(&header)?;
            seg.sync_all()?;
            sync_dir(&seg_path)?;
        }
        let opener = SegmentOpener::new(keys.dek, &header).map_err(|_| SpoolError::Crypto)?;
        seg.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::with_capacity(1 << 20, &mut seg);
        let mut found = [0u8; format::HEADER_LEN];
        reader.read_exact(&mut found)?;
        if found != header {
            return Err(SpoolError::Foreign);
        }
        let mut segments = 0u64;
        let mut last_plain: Vec<u8> = Vec::new();
        let mut sealed = false;
        let mut buf = Vec::with_capacity(segment_size as usize + TAG_LEN);
        loop {
            match read_segment(&mut reader, &opener, segments, segment_size, &mut buf)? {
                SegRead::Full => {
                    feed(&buf);
                    std::mem::swap(&mut last_plain, &mut buf);
                    segments += 1;
                }
                SegRead::Last => {
                    feed(&buf);
                    segments += 1;
                    sealed = true;
                    break;
                }
                SegRead::End => break,
            }
        }
        drop(reader);
        let mut seg_end =
            if sealed { (segments - 1) * segment_size + buf.len() as u64 } else { segments * segment_size };
        let valid_seg_len = format::segment_offset(segments, sealer.segment_size())
            - if sealed { segment_size - buf.len() as u64 } else { 0 };
        if seg.metadata()?.len() != valid_seg_len {
            if sealed {
                // Never shorten a sealed file: it may be a published object.
                return Err(SpoolError::Corrupt);
            }
            tracing::warn!(%object_id, kept = seg_end, "cut a torn segment off an upload journal");
            seg.set_len(valid_seg_len)?;
            seg.sync_all()?;
        }
        seg.seek(SeekFrom::Start(valid_seg_len))?;

        // 2. The records after the segments.
        let path = journal_path(spool_dir, &object_id);
        let _ = std::fs::remove_file(rotating_path(spool_dir, &object_id));
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let len = file.metadata()?.len();
        let mut end = seg_end;
        let segment_size32 = sealer.segment_size();
        // Recorded bytes past the segments are sealed again as they are
        // read (the same bytes as any sealed copy a crash lost), so a long
        // tail, such as a whole version 1 journal, never sits in memory.
        let mut enc = (!sealed).then(|| ObjectEncryptor::resume(sealer, segments));
        let mut resealed = Vec::new();
        let mut resealed_len = 0u64;
        let file_len = if len < FILE_HEADER_LEN {
            // New (or torn before its header was complete): start afresh.
            write_journal_header(&mut file, &object_id)?;
            sync_dir(&path)?;
            FILE_HEADER_LEN
        } else {
            let mut reader = BufReader::with_capacity(MAX_RECORD + 64, &mut file);
            let mut header = [0u8; FILE_HEADER_LEN as usize];
            reader.read_exact(&mut header)?;
            if (&header[..8] != MAGIC && &header[..8] != MAGIC_V1) || header[8..] != object_id.as_bytes()[..] {
                return Err(SpoolError::Foreign);
            }
            let mut valid_len = FILE_HEADER_LEN;
            let mut buf = Vec::new();
            loop {
                let mut rh = [0u8; RECORD_HEADER_LEN];
                if read_full(&mut reader, &mut rh)? < RECORD_HEADER_LEN {
                    break;
                }
                let start = u64::from_be_bytes(rh[..8].try_into().expect("8 bytes"));
                let plain_len = u32::from_be_bytes(rh[8..12].try_into().expect("4 bytes"));
                if start > end || plain_len as usize > MAX_RECORD {
                    break;
                }
                buf.resize(plain_len as usize + TAG_LEN, 0);
                if read_full(&mut reader, &mut buf)? < buf.len() {
                    break;
                }
                let nonce = Nonce::assume_unique_for_key(rh[12..].try_into().expect("12 bytes"));
                let aad = Aad::from(record_aad(&object_id, start, plain_len));
                let Ok(plain) = keys.spool.open_in_place(nonce, aad, &mut buf) else {
                    break;
                };
                let record_end = start + u64::from(plain_len);
                if record_end > end
                    && let Some(enc) = enc.as_mut()
                {
                    let new = &plain[(end - start) as usize..];
                    feed(new);
                    enc.update(new, &mut resealed).map_err(|_| SpoolError::Crypto)?;
                    if resealed.len() >= 4 << 20 {
                        seg.write_all(&resealed)?;
                        resealed_len += resealed.len() as u64;
                        resealed.clear();
                    }
                    end = record_end;
                }
                valid_len += (RECORD_HEADER_LEN + plain_len as usize + TAG_LEN) as u64;
            }
            drop(reader);
            if file.metadata()?.len() != valid_len {
                tracing::warn!(%object_id, kept = end, "cut a torn record off an upload journal");
                file.set_len(valid_len)?;
                file.sync_all()?;
            }
            file.seek(SeekFrom::Start(valid_len))?;
            valid_len
        };
        seg.write_all(&resealed)?;
        resealed_len += resealed.len() as u64;
        drop(resealed);
        let mut journal = Self {
            seg,
            seg_path,
            file,
            path,
            object_id,
            enc: None,
            hash,
            end,
            file_len,
            seg_len: valid_seg_len + resealed_len,
            seg_dirty: false,
            file_dirty: false,
            scratch: Vec::new(),
            nonces: RecordNonces::new()?,
            log: None,
        };
        // What was read back may have been in the page cache only (a kill
        // -9 before the last fsync): make it durable before reporting it
        // as the durable offset, or publishing a sealed file.
        journal.seg.sync_all()?;
        journal.file.sync_all()?;
        let Some(mut enc) = enc else {
            return Ok(journal);
        };

        // 3. The held-back tail is never empty while any segment is sealed
        // (the last segment must hold a byte), so if a crash left every
        // recorded byte inside sealed segments, the last of them goes back
        // to the tail: recorded first, then cut.
        if enc.pending().is_empty() && segments > 0 {
            seg_end -= segment_size;
            journal.rewrite_records(keys.spool, seg_end, &last_plain)?;
            let cut = format::segment_offset(segments - 1, segment_size32);
            journal.seg.set_len(cut)?;
            journal.seg.sync_all()?;
            journal.seg.seek(SeekFrom::Start(cut))?;
            journal.seg_len = cut;
            let sealer = SegmentSealer::new(keys.dek, keys.fields.clone()).map_err(|_| SpoolError::Crypto)?;
            enc = ObjectEncryptor::resume(sealer, segments - 1);
            let mut out = Vec::new();
            enc.update(&last_plain, &mut out).map_err(|_| SpoolError::Crypto)?;
            debug_assert!(out.is_empty(), "a full segment is held back");
        }
        debug_assert_eq!(enc.sealed_len() + enc.pending().len() as u64, end);
        journal.enc = Some(enc);
        Ok(journal)
    }

    /// Bytes recorded so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether the last segment is written: no more data, only a publish.
    pub fn is_sealed(&self) -> bool {
        self.enc.is_none()
    }

    /// Seals full segments of `data` (which starts at `self.end()`) into
    /// the segments file and records the rest; not yet durable.
    pub fn append(&mut self, key: &LessSafeKey, data: &[u8]) -> Result<(), SpoolError> {
        if self.enc.is_none() {
            return Err(SpoolError::Sealed(self.end));
        }
        self.hash.update(data);
        self.write(key, data)
    }

    /// [`FileJournal::append`] then [`FileJournal::sync`]. A large batch is
    /// hashed on a second thread meanwhile: SHA-256 costs about a quarter
    /// of a disk write here, and would otherwise add to every ack's wait.
    pub fn append_durably(&mut self, key: &LessSafeKey, data: &[u8]) -> Result<(), SpoolError> {
        if self.enc.is_none() {
            return Err(SpoolError::Sealed(self.end));
        }
        if data.len() < PARALLEL_HASH_MIN {
            self.hash.update(data);
            return self.write(key, data).and_then(|()| self.sync(key));
        }
        let mut hash = std::mem::replace(&mut self.hash, digest::Context::new(&digest::SHA256));
        let written = std::thread::scope(|scope| {
            let hasher = scope.spawn(|| hash.update(data));
            let written = self.write(key, data).and_then(|()| self.sync(key));
            hasher.join().map_err(|_| SpoolError::Crypto)?;
            written
        });
        self.hash = hash;
        written
    }

    /// Rewrites the records file holding the tail only. Everything before
    /// the tail must be durable.
    pub fn rotate(&mut self, key: &LessSafeKey) -> Result<(), SpoolError> {
        if let Some(enc) = &self.enc {
            let (from, tail) = (enc.sealed_len(), enc.pending().to_vec());
            self.rewrite_records(key, from, &tail)?;
        }
        Ok(())
    }

    /// Seals and writes `data`; the caller has hashed it.
    fn write(&mut self, key: &LessSafeKey, data: &[u8]) -> Result<(), SpoolError> {
        let (start, sealed_to) = self.write_segments(data)?;
        // Only the bytes not sealed above need a record.
        let from = sealed_to.max(start);
        if from < self.end {
            self.append_records(key, from, &data[(from - start) as usize..])?;
        }
        Ok(())
    }

    /// Seals the full segments `data` completes into the segments file (not
    /// synced) and advances the end. Returns where `data` started and the
    /// end of the sealed segments.
    fn write_segments(&mut self, data: &[u8]) -> Result<(u64, u64), SpoolError> {
        let Some(enc) = self.enc.as_mut() else {
            return Err(SpoolError::Sealed(self.end));
        };
        // In pieces, so the ciphertext buffer stays small whatever the
        // batch (a bulk stream's batches are several MiB).
        for piece in data.chunks(SEAL_PIECE) {
            self.scratch.clear();
            enc.update(piece, &mut self.scratch).map_err(|_| SpoolError::Crypto)?;
            if !self.scratch.is_empty() {
                // Two writes, so crash tests can stop between them and leave
                // a torn segment (A1); recovery cuts it off.
                let half = self.scratch.len() / 2;
                self.seg.write_all(&self.scratch[..half])?;
                fail::fail_point!("spool-mid-segment");
                self.seg.write_all(&self.scratch[half..])?;
                self.seg_dirty = true;
                self.seg_len += self.scratch.len() as u64;
            }
        }
        // A trickle (a live call's frames) seals a segment every few
        // seconds: its buffer is freed rather than held between them. Larger
        // appends keep theirs, so a bulk stream does not fault in new pages
        // for every batch.
        if data.len() < enc.segment_size() as usize {
            self.scratch = Vec::new();
        }
        let sealed_to = enc.sealed_len();
        let start = self.end;
        self.end += data.len() as u64;
        Ok((start, sealed_to))
    }

    /// Whether the journal writes to the shared log (`ingest.sync = "log"`).
    pub fn is_logged(&self) -> bool {
        self.log.is_some()
    }

    /// Whether appending `len` bytes writes a segment (file I/O); otherwise
    /// a logged append only seals records in memory.
    pub fn writes_segment(&self, len: usize) -> bool {
        self.enc.as_ref().is_some_and(|e| e.pending().len() + len > e.segment_size() as usize)
    }

    /// Appends `data` to a logged journal: full segments go to the segments
    /// file and the returned body of records is for [`FileJournal::submit`].
    /// The records cover every byte of `data` (the segments are synced by a
    /// later checkpoint), or with `sync_segments` only the bytes past the
    /// segments, which are then synced here (a large batch, where writing
    /// its bytes twice would cost more than one more sync).
    pub fn append_logged(
        &mut self,
        key: &LessSafeKey,
        data: &[u8],
        sync_segments: bool,
    ) -> Result<Vec<u8>, SpoolError> {
        if self.enc.is_none() {
            return Err(SpoolError::Sealed(self.end));
        }
        let sealed_before = self.enc.as_ref().map_or(0, ObjectEncryptor::sealed_len);
        let (start, sealed_to) = if data.len() < PARALLEL_HASH_MIN {
            self.hash.update(data);
            self.write_segments(data)?
        } else {
            let mut hash = std::mem::replace(&mut self.hash, digest::Context::new(&digest::SHA256));
            let written = std::thread::scope(|scope| {
                let hasher = scope.spawn(|| hash.update(data));
                let written = self.write_segments(data);
                hasher.join().map_err(|_| SpoolError::Crypto)?;
                written
            });
            self.hash = hash;
            written?
        };
        if sync_segments && self.seg_dirty {
            self.seg.sync_data()?;
            self.seg_dirty = false;
        }
        let from = if sync_segments { sealed_to.max(start) } else { start };
        let mut body = Vec::with_capacity((self.end - from) as usize + 2 * (RECORD_HEADER_LEN + TAG_LEN));
        let mut at = from;
        for piece in data[(from - start) as usize..].chunks(MAX_RECORD) {
            seal_record(key, &mut self.nonces, &self.object_id, at, piece, &mut body)?;
            at += piece.len() as u64;
        }
        if let Some(pin) = &self.log
            && sealed_to > sealed_before
        {
            pin.segments_written(sealed_to, sync_segments);
        }
        Ok(body)
    }

    /// Queues a body from [`FileJournal::append_logged`] in the shared log;
    /// the receiver answers once it is durable (`urgent`: see
    /// [`super::wal::Pin::submit`]).
    pub fn submit(&self, body: Vec<u8>, urgent: bool) -> tokio::sync::oneshot::Receiver<std::io::Result<()>> {
        self.log.as_ref().expect("a logged journal").submit(self.end, body, urgent)
    }

    fn append_records(&mut self, key: &LessSafeKey, mut at: u64, data: &[u8]) -> Result<(), SpoolError> {
        let mut out = Vec::with_capacity(data.len().min(MAX_RECORD) + RECORD_HEADER_LEN + TAG_LEN);
        for piece in data.chunks(MAX_RECORD) {
            out.clear();
            seal_record(key, &mut self.nonces, &self.object_id, at, piece, &mut out)?;
            // Two writes, so crash tests can stop between them and leave a
            // torn record (A1); recovery cuts it off.
            let half = out.len() / 2;
            self.file.write_all(&out[..half])?;
            fail::fail_point!("spool-mid-record");
            self.file.write_all(&out[half..])?;
            self.file_len += out.len() as u64;
            at += piece.len() as u64;
        }
        self.file_dirty = true;
        Ok(())
    }

    /// Makes everything appended durable. A records file grown past
    /// [`ROTATE_AT`] is then rewritten holding the tail only.
    pub fn sync(&mut self, key: &LessSafeKey) -> Result<(), SpoolError> {
        if self.seg_dirty {
            self.seg.sync_data()?;
            self.seg_dirty = false;
        }
        if self.file_dirty {
            self.file.sync_data()?;
            self.file_dirty = false;
        }
        if self.file_len > ROTATE_AT {
            self.rotate(key)?;
        }
        Ok(())
    }

    /// Replaces the records file, atomically, with one holding `data` at
    /// `from`. Everything before `from` must be durable in the segments.
    fn rewrite_records(&mut self, key: &LessSafeKey, from: u64, data: &[u8]) -> Result<(), SpoolError> {
        let dir = self.path.parent().map(Path::to_owned).unwrap_or_default();
        let new_path = rotating_path(&dir, &self.object_id);
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&new_path)?;
        write_journal_header(&mut file, &self.object_id)?;
        let mut out = Vec::new();
        let mut at = from;
        for piece in data.chunks(MAX_RECORD) {
            seal_record(key, &mut self.nonces, &self.object_id, at, piece, &mut out)?;
            at += piece.len() as u64;
        }
        file.write_all(&out)?;
        file.sync_data()?;
        std::fs::rename(&new_path, &self.path)?;
        sync_dir(&self.path)?;
        self.file = file;
        self.file_len = FILE_HEADER_LEN + out.len() as u64;
        self.file_dirty = false;
        Ok(())
    }

    /// Seals the last segment and makes the segments file the complete,
    /// durable object. Returns the plaintext size and SHA-256; the file at
    /// [`FileJournal::segments_path`] is then ready to publish. Idempotent.
    pub fn seal(&mut self) -> Result<(u64, [u8; 32]), SpoolError> {
        if let Some(enc) = self.enc.take() {
            self.scratch.clear();
            enc.finish(&mut self.scratch).map_err(|_| SpoolError::Crypto)?;
            self.seg.write_all(&self.scratch)?;
            self.seg_len += self.scratch.len() as u64;
        }
        // Every time, not only the first: an earlier seal may have failed
        // or been cut off by a crash between its write and its sync.
        self.seg.sync_data()?;
        self.seg_dirty = false;
        if let Some(pin) = &self.log {
            pin.segments_written(u64::MAX, true);
        }
        let sha = self.hash.clone().finish().as_ref().try_into().expect("SHA-256 is 32 bytes");
        Ok((self.end, sha))
    }

    /// Bytes of the segments file written (durable once `sync` returns):
    /// a prefix of the final object that never changes.
    pub fn segments_len(&self) -> u64 {
        self.seg_len
    }

    /// The segments file (the whole object once sealed).
    pub fn segments_path(&self) -> &Path {
        &self.seg_path
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The first bytes of a journal file.
pub(crate) fn journal_header(object_id: &ObjectId) -> Vec<u8> {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(object_id.as_bytes());
    header
}

fn write_journal_header(file: &mut File, object_id: &ObjectId) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&journal_header(object_id))?;
    file.sync_all()
}

/// Reads and opens segment `index` of a segments file into `buf`.
fn read_segment(
    reader: &mut impl Read,
    opener: &SegmentOpener,
    index: u64,
    segment_size: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<SegRead> {
    let full = segment_size as usize + TAG_LEN;
    buf.resize(full, 0);
    let n = read_full(reader, buf)?;
    buf.truncate(n);
    if n == 0 {
        return Ok(SegRead::End);
    }
    if n == full {
        // Almost always a middle segment; a last one of exactly full size
        // is tried from a copy (opening fails destructively).
        let copy = buf.clone();
        if opener.open_segment(index, false, buf).is_ok() {
            return Ok(SegRead::Full);
        }
        buf.clear();
        buf.extend_from_slice(&copy);
    }
    if opener.open_segment(index, true, buf).is_ok() {
        // A last segment must end the file.
        let mut more = [0u8; 1];
        return Ok(if read_full(reader, &mut more)? == 0 { SegRead::Last } else { SegRead::End });
    }
    Ok(SegRead::End)
}

/// Seals one record of at most [`MAX_RECORD`] bytes starting at `start`
/// and appends its encoding to `out`.
fn seal_record(
    key: &LessSafeKey,
    nonces: &mut RecordNonces,
    object_id: &ObjectId,
    start: u64,
    piece: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SpoolError> {
    debug_assert!(piece.len() <= MAX_RECORD);
    let len = piece.len() as u32;
    let nonce = nonces.next()?;
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
    /// Files in the log's spool directory, with the records of live
    /// uploads in its shared log (`ingest.sync = "log"`, [`super::wal`]).
    Log(Arc<Wal>),
    /// Chunks in the catalog, shared by every replica using it, so an
    /// upload acknowledged by one replica resumes on any other (docs/REPLICAS.md).
    Catalog(Arc<dyn Catalog>),
}

impl std::fmt::Debug for JournalPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            Self::Log(w) => f.debug_tuple("Log").field(w).finish(),
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
    nonces: RecordNonces,
}

impl CatalogJournal {
    /// Claims the upload's journal (a writer elsewhere that still holds it
    /// is fenced off) and replays every durable byte through `sink`.
    pub async fn open<T: Send + 'static>(
        catalog: Arc<dyn Catalog>,
        upload_id: UploadId,
        object_id: ObjectId,
        key: Arc<LessSafeKey>,
        mut state: T,
        sink: fn(&mut T, &[u8]),
    ) -> Result<(Self, T), SpoolError> {
        let epoch = catalog.claim_journal(&upload_id).await?;
        let mut replay = SharedReplay::new(upload_id, object_id, key);
        loop {
            let (back, more) = replay.next(catalog.as_ref(), state, sink).await?;
            state = back;
            if !more {
                break;
            }
        }
        let end = replay.end();
        let journal = Self {
            catalog,
            upload_id,
            object_id,
            epoch,
            synced: end,
            end,
            pending: Vec::new(),
            nonces: RecordNonces::new()?,
        };
        Ok((journal, state))
    }

    /// Writes the records appended since the last sync to the catalog, as
    /// one chunk, in one transaction.
    pub async fn sync(&mut self) -> Result<(), SpoolError> {
        if self.end == self.synced {
            return Ok(());
        }
        let sealed = std::mem::take(&mut self.pending);
        let append = self.catalog.append_journal(&self.upload_id, self.epoch, self.synced, self.end, &sealed);
        match append.await {
            Ok(()) => {
                self.synced = self.end;
                Ok(())
            }
            Err(e) => {
                // Not durable: forget it, so a retry cannot skip it.
                self.end = self.synced;
                Err(match e {
                    CatalogError::Conflict(m) => SpoolError::TakenOver(m),
                    other => SpoolError::Catalog(other),
                })
            }
        }
    }
}

/// Reads a shared journal back from the start, a page of chunks per
/// catalog round trip. The round trips are awaited on the runtime and the
/// chunks are opened on the blocking pool, which waits on nothing: a
/// blocking thread that waited on the runtime (as this once did, with
/// `Handle::block_on`) could deadlock once every blocking thread waited so
/// and the catalog or the store needed one more.
pub struct SharedReplay {
    upload_id: UploadId,
    object_id: ObjectId,
    key: Arc<LessSafeKey>,
    /// End of the chunks fetched (and of `page`).
    fetched: u64,
    page: std::collections::VecDeque<JournalChunk>,
}

/// Plaintext handed to a sink per trip to the blocking pool, at most (plus
/// one chunk): what a sink makes of it stays about this size too.
const REPLAY_STEP: u64 = 1 << 20;

impl SharedReplay {
    pub fn new(upload_id: UploadId, object_id: ObjectId, key: Arc<LessSafeKey>) -> Self {
        Self { upload_id, object_id, key, fetched: 0, page: Default::default() }
    }

    /// End of the bytes replayed so far: where the chunks fetched but not
    /// yet handed to a sink start.
    pub fn end(&self) -> u64 {
        self.page.front().map_or(self.fetched, |c| c.start)
    }

    /// Hands the plaintext of the next chunks (about [`REPLAY_STEP`]), in
    /// order, to `sink` with `state`, which moves to the blocking pool and
    /// back; the flag is false once the journal is read to its end.
    pub async fn next<T: Send + 'static>(
        &mut self,
        catalog: &dyn Catalog,
        mut state: T,
        sink: fn(&mut T, &[u8]),
    ) -> Result<(T, bool), SpoolError> {
        if self.page.is_empty() {
            let page = catalog.journal_chunks(&self.upload_id, self.fetched, REPLAY_PAGE).await?;
            for chunk in page {
                // An empty chunk (never written) would be fetched again and
                // again: the replay would not end.
                if chunk.start != self.fetched || chunk.end <= chunk.start {
                    return Err(SpoolError::Corrupt);
                }
                self.fetched = chunk.end;
                self.page.push_back(chunk);
            }
            if self.page.is_empty() {
                return Ok((state, false));
            }
        }
        let mut step = Vec::new();
        let mut size = 0;
        while let Some(chunk) = self.page.pop_front() {
            size += chunk.end - chunk.start;
            step.push(chunk);
            if size >= REPLAY_STEP {
                break;
            }
        }
        let (key, object_id) = (self.key.clone(), self.object_id);
        let opened = tokio::task::spawn_blocking(move || {
            let mut feed = |data: &[u8]| sink(&mut state, data);
            for chunk in step {
                if open_chunk(&key, &object_id, chunk.start, chunk.sealed, &mut feed)? != chunk.end {
                    return Err(SpoolError::Corrupt);
                }
            }
            Ok(state)
        })
        .await?;
        Ok((opened?, true))
    }
}

/// An open upload journal, in a local file or in the shared catalog.
/// A local journal's calls block: make them from `spawn_blocking`. A
/// shared one opens with [`CatalogJournal::open`] and syncs with
/// [`CatalogJournal::sync`], both awaited on the runtime.
pub enum Journal {
    File(Box<FileJournal>),
    Catalog(CatalogJournal),
}

impl Journal {
    /// Opens (or creates) the upload's local journal for writing, replaying
    /// every durable byte through `sink`. A shared journal is refused here:
    /// it opens with [`CatalogJournal::open`], on the runtime.
    pub fn open(
        place: &JournalPlace,
        object_id: ObjectId,
        keys: &JournalKeys<'_>,
        sink: impl FnMut(&[u8]),
    ) -> Result<Self, SpoolError> {
        match place {
            JournalPlace::Dir(dir) => FileJournal::open(dir, object_id, keys, sink).map(|j| Self::File(Box::new(j))),
            JournalPlace::Log(wal) => {
                // Records of an earlier stream still in the log join the
                // journal file first, so it is read whole.
                wal.take(&object_id)?;
                let mut journal = FileJournal::open(wal.spool_dir(), object_id, keys, sink)?;
                journal.log = Some(wal.pin(object_id));
                Ok(Self::File(Box::new(journal)))
            }
            JournalPlace::Catalog(_) => Err(runtime_only("opened")),
        }
    }

    /// Whether the upload's last segment is sealed (it takes no more data).
    pub fn is_sealed(&self) -> bool {
        matches!(self, Self::File(f) if f.is_sealed())
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
                    seal_record(key, &mut c.nonces, &c.object_id, c.end, piece, &mut c.pending)?;
                    c.end += piece.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Appends `data` and makes it durable.
    pub fn append_durably(&mut self, key: &LessSafeKey, data: &[u8]) -> Result<(), SpoolError> {
        match self {
            Self::File(f) => f.append_durably(key, data),
            Self::Catalog(_) => Err(runtime_only("synced")),
        }
    }

    /// Makes every appended record of a local journal durable (a shared
    /// one syncs with [`CatalogJournal::sync`], on the runtime).
    pub fn sync(&mut self, key: &LessSafeKey) -> Result<(), SpoolError> {
        match self {
            Self::File(f) => f.sync(key),
            Self::Catalog(_) => Err(runtime_only("synced")),
        }
    }

    /// Removes a local journal file; the catalog removes its chunks itself
    /// when the upload commits or is discarded.
    pub fn remove(place: &JournalPlace, object_id: &ObjectId) -> std::io::Result<()> {
        match place {
            JournalPlace::Dir(dir) => remove(dir, object_id),
            JournalPlace::Log(wal) => wal.remove(object_id),
            JournalPlace::Catalog(_) => Ok(()),
        }
    }
}

/// A shared journal's catalog calls are awaited on the runtime, not made
/// from a blocking thread ([`SharedReplay`] says why).
fn runtime_only(what: &str) -> SpoolError {
    SpoolError::Io(std::io::Error::other(format!(
        "a journal in the catalog is {what} on the runtime (CatalogJournal), not on a blocking thread"
    )))
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

/// Removes an upload's local journal files in `spool_dir`, through the
/// shared log when there is one (so that no spill brings one back).
pub fn remove_local(place: &JournalPlace, spool_dir: &Path, object_id: &ObjectId) -> std::io::Result<()> {
    match place {
        JournalPlace::Log(wal) => wal.remove(object_id),
        _ => remove(spool_dir, object_id),
    }
}

/// Removes an upload's journal files; absent is fine. A published
/// object linked to the segments file keeps its own name.
pub fn remove(spool_dir: &Path, object_id: &ObjectId) -> std::io::Result<()> {
    for path in
        [journal_path(spool_dir, object_id), segments_path(spool_dir, object_id), rotating_path(spool_dir, object_id)]
    {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Test data and comparison shared by the journal and log tests.
#[cfg(test)]
pub(crate) mod test_bytes {
    pub fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Equal bytes, reported by length and first difference (not dumped).
    #[track_caller]
    pub fn same(got: &[u8], want: &[u8]) {
        let differ = got.iter().zip(want).position(|(g, w)| g != w);
        assert!(
            got.len() == want.len() && differ.is_none(),
            "got {} bytes, want {}; first difference at {differ:?}",
            got.len(),
            want.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::test_bytes::{data, same};
    use super::*;
    use crate::crypto::DataKey;
    use crate::crypto::format::{DEFAULT_SEGMENT_SIZE, decrypt_object, derive_spool_key};

    const SEG: usize = DEFAULT_SEGMENT_SIZE as usize;

    struct Setup {
        dir: tempfile::TempDir,
        id: ObjectId,
        dek: DataKey,
        spool: LessSafeKey,
        fields: HeaderFields,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let id = ObjectId::new_random();
        let dek = DataKey::generate().unwrap();
        let spool = derive_spool_key(&dek, id.as_bytes()).unwrap();
        let fields = HeaderFields::new(1, *id.as_bytes(), [7u8; 16], 1).unwrap();
        Setup { dir, id, dek, spool, fields }
    }

    impl Setup {
        fn keys(&self) -> JournalKeys<'_> {
            JournalKeys { spool: &self.spool, dek: &self.dek, fields: self.fields.clone() }
        }

        fn open(&self) -> FileJournal {
            FileJournal::open(self.dir.path(), self.id, &self.keys(), |_| {}).unwrap()
        }

        /// Every byte a reopen recovers.
        fn recovered(&self) -> Vec<u8> {
            let mut all = Vec::new();
            FileJournal::open(self.dir.path(), self.id, &self.keys(), |p| all.extend_from_slice(p)).unwrap();
            all
        }

        fn seg_path(&self) -> PathBuf {
            segments_path(self.dir.path(), &self.id)
        }

        fn journal_len(&self) -> u64 {
            std::fs::metadata(journal_path(self.dir.path(), &self.id)).unwrap().len()
        }
    }

    fn sha(data: &[u8]) -> [u8; 32] {
        digest::digest(&digest::SHA256, data).as_ref().try_into().unwrap()
    }

    #[test]
    fn full_segments_go_to_the_object_and_only_the_tail_to_records() {
        let t = setup();
        let mut j = t.open();
        let a = data(3 * SEG + 100, 1);
        j.append(&t.spool, &a).unwrap();
        j.sync(&t.spool).unwrap();
        assert_eq!(j.end(), a.len() as u64);
        // Three segments sealed; the 100-byte tail is a record.
        assert_eq!(std::fs::metadata(t.seg_path()).unwrap().len(), format::segment_offset(3, DEFAULT_SEGMENT_SIZE));
        assert!(t.journal_len() < FILE_HEADER_LEN + 200);
        drop(j);
        same(&t.recovered(), &a);
    }

    #[test]
    fn sealing_makes_the_segments_file_the_object() {
        let t = setup();
        let mut j = t.open();
        let a = data(2 * SEG + 5, 2);
        for piece in a.chunks(777) {
            j.append(&t.spool, piece).unwrap();
            // A trickle, like a live call's frames: each sealed segment is
            // written and its buffer freed, not kept until the next one.
            assert_eq!(j.scratch.capacity(), 0);
            j.sync(&t.spool).unwrap();
        }
        let (size, digest) = j.seal().unwrap();
        assert_eq!((size, digest), (a.len() as u64, sha(&a)));
        assert_eq!(j.seal().unwrap(), (size, digest), "sealing twice changes nothing");
        let object = std::fs::read(j.segments_path()).unwrap();
        assert_eq!(object.len() as u64, format::ciphertext_len(size, DEFAULT_SEGMENT_SIZE));
        same(&decrypt_object(&t.dek, &object).unwrap().1, &a);
        drop(j);
        // Reopened, it is still sealed and takes no more data.
        let mut j = t.open();
        assert!(j.is_sealed());
        assert_eq!(j.end(), size);
        assert!(matches!(j.append(&t.spool, b"more"), Err(SpoolError::Sealed(n)) if n == size));
        assert_eq!(j.seal().unwrap(), (size, digest));
        assert_eq!(std::fs::read(t.seg_path()).unwrap(), object, "a sealed file is never rewritten");
    }

    #[test]
    fn large_batches_hashed_alongside_the_write_hash_the_same() {
        let t = setup();
        let mut j = t.open();
        let a = data(3 * PARALLEL_HASH_MIN + 17, 8);
        j.append_durably(&t.spool, &a[..100]).unwrap();
        j.append_durably(&t.spool, &a[100..]).unwrap();
        assert_eq!(j.seal().unwrap(), (a.len() as u64, sha(&a)));
        same(&decrypt_object(&t.dek, &std::fs::read(t.seg_path()).unwrap()).unwrap().1, &a);
    }

    #[test]
    fn empty_and_segment_multiple_objects_seal_like_the_encryptor() {
        for len in [0, 1, SEG, 2 * SEG] {
            let t = setup();
            let mut j = t.open();
            let a = data(len, 3);
            j.append(&t.spool, &a).unwrap();
            j.sync(&t.spool).unwrap();
            drop(j);
            let mut j = t.open();
            let (size, _) = j.seal().unwrap();
            assert_eq!(size, len as u64);
            let object = std::fs::read(t.seg_path()).unwrap();
            assert_eq!(decrypt_object(&t.dek, &object).unwrap().1, a, "length {len}");
        }
    }

    #[test]
    fn a1_torn_record_tail_is_cut_and_appends_continue() {
        let t = setup();
        let mut j = t.open();
        j.append(&t.spool, b"durable").unwrap();
        j.sync(&t.spool).unwrap();
        j.append(&t.spool, b"torn away").unwrap();
        let path = j.path().to_owned();
        drop(j);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let mut j = t.open();
        assert_eq!(j.end(), 7);
        j.append(&t.spool, b" more").unwrap();
        j.sync(&t.spool).unwrap();
        drop(j);
        assert_eq!(t.recovered(), b"durable more");
    }

    #[test]
    fn a1_torn_segment_is_cut_and_resealed_from_the_records() {
        let t = setup();
        let mut j = t.open();
        // Small appends: the bytes of a segment were records before it
        // filled, except those of the flush that sealed it.
        let a = data(3 * SEG + 10, 4);
        for piece in a.chunks(1000) {
            j.append(&t.spool, piece).unwrap();
            j.sync(&t.spool).unwrap();
        }
        drop(j);
        // A crash during the last flush, which sealed segment 2: its write
        // is torn and its bytes were never acknowledged.
        let last_flush = a.len() % 1000;
        let seg_len = std::fs::metadata(t.seg_path()).unwrap().len();
        OpenOptions::new().write(true).open(t.seg_path()).unwrap().set_len(seg_len - 100).unwrap();
        let acked = &a[..a.len() - last_flush];
        same(&t.recovered(), acked);
        let mut j = t.open();
        j.seal().unwrap();
        same(&decrypt_object(&t.dek, &std::fs::read(t.seg_path()).unwrap()).unwrap().1, acked);
    }

    #[test]
    fn a1_records_lost_after_their_segments_keep_a_tail() {
        // A crash after a flush's segments were durable but before its
        // records were: every recovered byte is inside sealed segments.
        // The last segment must go back to the tail, or a finish would
        // have to seal an empty last segment.
        let t = setup();
        let mut j = t.open();
        let a = data(2 * SEG, 5);
        j.append(&t.spool, &a[..SEG]).unwrap();
        j.sync(&t.spool).unwrap();
        let journal_before = std::fs::read(journal_path(t.dir.path(), &t.id)).unwrap();
        j.append(&t.spool, &a[SEG..]).unwrap();
        j.sync(&t.spool).unwrap();
        drop(j);
        std::fs::write(journal_path(t.dir.path(), &t.id), &journal_before).unwrap();
        same(&t.recovered(), &a[..SEG]);
        let mut j = t.open();
        assert_eq!(j.end(), SEG as u64);
        j.append(&t.spool, &a[SEG..]).unwrap();
        j.sync(&t.spool).unwrap();
        assert_eq!(j.seal().unwrap().1, sha(&a));
        same(&decrypt_object(&t.dek, &std::fs::read(t.seg_path()).unwrap()).unwrap().1, &a);
    }

    #[test]
    fn records_are_rotated_to_the_tail() {
        let t = setup();
        let mut j = t.open();
        let a = data(2 * ROTATE_AT as usize, 6);
        for piece in a.chunks(800) {
            j.append(&t.spool, piece).unwrap();
            j.sync(&t.spool).unwrap();
        }
        assert!(t.journal_len() <= ROTATE_AT + 2000, "journal is {} bytes", t.journal_len());
        drop(j);
        same(&t.recovered(), &a);
    }

    #[test]
    fn a_long_version_1_journal_is_resealed_as_it_is_read() {
        // A call in progress when the server was upgraded: every byte in
        // records from 0, no segments file. Its segments are written while
        // the records are read (not held in memory), and it seals right.
        let t = setup();
        let a = data(3 * MAX_RECORD + 12_345, 10);
        let mut v1 = MAGIC_V1.to_vec();
        let mut nonces = RecordNonces::new().unwrap();
        v1.extend_from_slice(t.id.as_bytes());
        let mut at = 0;
        for piece in a.chunks(MAX_RECORD) {
            seal_record(&t.spool, &mut nonces, &t.id, at as u64, piece, &mut v1).unwrap();
            at += piece.len();
        }
        std::fs::write(journal_path(t.dir.path(), &t.id), &v1).unwrap();
        let j = t.open();
        assert_eq!(j.end(), a.len() as u64);
        let sealed = (a.len() / SEG - 1) as u64;
        assert!(j.segments_len() >= format::segment_offset(sealed, DEFAULT_SEGMENT_SIZE));
        drop(j);
        let mut j = t.open();
        assert_eq!(j.seal().unwrap(), (a.len() as u64, sha(&a)));
        same(&decrypt_object(&t.dek, &std::fs::read(t.seg_path()).unwrap()).unwrap().1, &a);
    }

    #[test]
    fn a_version_1_journal_is_read_and_sealed() {
        let t = setup();
        let a = data(SEG + 300, 7);
        let mut v1 = MAGIC_V1.to_vec();
        let mut nonces = RecordNonces::new().unwrap();
        v1.extend_from_slice(t.id.as_bytes());
        seal_record(&t.spool, &mut nonces, &t.id, 0, &a[..SEG / 2], &mut v1).unwrap();
        seal_record(&t.spool, &mut nonces, &t.id, (SEG / 2) as u64, &a[SEG / 2..], &mut v1).unwrap();
        std::fs::write(journal_path(t.dir.path(), &t.id), &v1).unwrap();
        same(&t.recovered(), &a);
        let mut j = t.open();
        assert_eq!(j.seal().unwrap(), (a.len() as u64, sha(&a)));
    }

    #[test]
    fn corrupt_record_ends_the_durable_prefix() {
        let t = setup();
        let mut j = t.open();
        j.append(&t.spool, b"first").unwrap();
        j.append(&t.spool, b"second").unwrap();
        j.sync(&t.spool).unwrap();
        let path = j.path().to_owned();
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(t.recovered(), b"first");
    }

    #[test]
    fn no_plaintext_in_the_journal_files() {
        let t = setup();
        let mut j = t.open();
        let canary = b"CANARY-PLAINTEXT-4111111111111111";
        let mut a = canary.repeat(SEG / canary.len() * 3);
        a.extend_from_slice(canary);
        j.append(&t.spool, &a).unwrap();
        j.sync(&t.spool).unwrap();
        j.seal().unwrap();
        for path in [j.path().to_owned(), t.seg_path()] {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(canary.len()).any(|w| w == canary), "{path:?}");
        }
    }

    #[test]
    fn record_nonces_count_under_a_random_prefix_and_redraw_it_before_wrapping() {
        let (mut a, mut b) = (RecordNonces::new().unwrap(), RecordNonces::new().unwrap());
        let (n0, n1) = (a.next().unwrap(), a.next().unwrap());
        assert_eq!(n0[..8], n1[..8]);
        assert_eq!(n0[8..], [0, 0, 0, 0]);
        assert_eq!(n1[8..], [0, 0, 0, 1]);
        assert_ne!(n0[..8], b.next().unwrap()[..8], "each writer draws its own prefix");
        a.counter = u32::MAX - 1;
        let last = a.next().unwrap();
        assert_eq!(last[8..], (u32::MAX - 1).to_be_bytes());
        let fresh = a.next().unwrap();
        assert_ne!(fresh[..8], last[..8]);
        assert_eq!(fresh[8..], [0, 0, 0, 0]);
    }

    /// The nonces of every record in a journal's records file.
    fn record_nonces(path: &Path) -> Vec<[u8; 12]> {
        let bytes = std::fs::read(path).unwrap();
        let (mut at, mut out) = (FILE_HEADER_LEN as usize, Vec::new());
        while at + RECORD_HEADER_LEN <= bytes.len() {
            let len = u32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
            out.push(bytes[at + 12..at + RECORD_HEADER_LEN].try_into().unwrap());
            at += RECORD_HEADER_LEN + len + TAG_LEN;
        }
        out
    }

    #[test]
    fn no_record_nonce_repeats_across_reopens() {
        let t = setup();
        let a = data(12 * 100, 4);
        for batch in a.chunks(100 * 4) {
            let mut j = t.open();
            for piece in batch.chunks(100) {
                j.append_durably(&t.spool, piece).unwrap();
            }
        }
        let nonces = record_nonces(&journal_path(t.dir.path(), &t.id));
        assert_eq!(nonces.len(), 12);
        let distinct: std::collections::BTreeSet<_> = nonces.iter().collect();
        assert_eq!(distinct.len(), 12);
        let j = t.open();
        assert_eq!(j.end(), a.len() as u64);
    }

    #[test]
    fn a_journal_of_another_upload_is_refused() {
        let t = setup();
        t.open();
        let other = ObjectId::new_random();
        std::fs::rename(journal_path(t.dir.path(), &t.id), journal_path(t.dir.path(), &other)).unwrap();
        let keys = t.keys();
        assert!(matches!(FileJournal::open(t.dir.path(), other, &keys, |_| {}), Err(SpoolError::Foreign)));
    }

    #[test]
    fn spool_file_names_map_to_their_upload() {
        let id = ObjectId::new_random().to_string();
        for name in [format!("{id}.journal"), format!("{id}.seg"), format!("{id}.journal.new")] {
            assert_eq!(spool_file_id(&name), Some(id.as_str()));
        }
        assert_eq!(spool_file_id("catalog.sqlite"), None);
    }
}
