//! Object format v1: a fixed 96-byte header followed by AES-256-GCM segments.
//!
//! The layout is frozen: see `docs/FORMAT.md` and the known-answer vectors in
//! `tests/data/`. A new format adds a version and a decoder; it never edits
//! this one.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use subtle::ConstantTimeEq;

use super::CryptoError;
use super::secret::{DataKey, random_bytes};

// Do not change: every constant below is part of format v1 on disk.
/// Magic bytes opening every object.
pub const MAGIC: [u8; 8] = *b"RECVAULT";
/// Format version written by this code.
pub const VERSION: u8 = 1;
/// Suite 1: AES-256-GCM segments, HKDF-SHA256 key derivation and commitment.
pub const SUITE_AES256GCM_HKDF_SHA256: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 96;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Random nonce prefix length (the rest is a 32-bit counter and a flag byte).
pub const NONCE_PREFIX_LEN: usize = 7;
/// Plaintext bytes per segment written by default.
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Smallest and largest segment size a reader accepts.
pub const MIN_SEGMENT_SIZE: u32 = 16;
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;

/// First allocation of an encryptor's held-back segment buffer.
const PENDING_MIN: usize = 4096;
/// Largest segment index: the counter is 32 bits and never wraps.
pub const MAX_SEGMENT_INDEX: u64 = u32::MAX as u64;
const COMMITMENT_LEN: usize = 32;
const COMMITMENT_OFFSET: usize = HEADER_LEN - COMMITMENT_LEN;
const SEGMENT_KEY_INFO: &[u8] = b"recvault v1 segment key";
const COMMITMENT_INFO: &[u8] = b"recvault v1 key commitment";
const SPOOL_KEY_INFO: &[u8] = b"recvault v1 spool key";

/// The fields of a v1 header, without the commitment (derived from the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderFields {
    pub content_kind: u8,
    pub segment_size: u32,
    pub object_id: [u8; 16],
    /// The internal id of the customer's key ring (not the CRM customer id).
    pub customer_ref: [u8; 16],
    pub key_version: u32,
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl HeaderFields {
    /// Fields for a new object with a fresh random nonce prefix.
    pub fn new(
        content_kind: u8,
        object_id: [u8; 16],
        customer_ref: [u8; 16],
        key_version: u32,
    ) -> Result<Self, CryptoError> {
        Ok(Self {
            content_kind,
            segment_size: DEFAULT_SEGMENT_SIZE,
            object_id,
            customer_ref,
            key_version,
            nonce_prefix: random_bytes()?,
        })
    }

    fn encode_without_commitment(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8] = VERSION;
        h[9] = SUITE_AES256GCM_HKDF_SHA256;
        h[10] = self.content_kind;
        h[11] = 0; // flags, reserved
        h[12..16].copy_from_slice(&self.segment_size.to_be_bytes());
        h[16..32].copy_from_slice(&self.object_id);
        h[32..48].copy_from_slice(&self.customer_ref);
        h[48..52].copy_from_slice(&self.key_version.to_be_bytes());
        h[52..59].copy_from_slice(&self.nonce_prefix);
        // 59..64 reserved, zero
        h
    }

    /// Parses a header, checking everything except the commitment. Any
    /// problem is the same opaque error as a failed tag.
    pub fn parse(h: &[u8]) -> Result<Self, CryptoError> {
        let h: &[u8; HEADER_LEN] = h.try_into().map_err(|_| CryptoError::DecryptionFailed)?;
        let segment_size = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let valid = h[0..8] == MAGIC
            && h[8] == VERSION
            && h[9] == SUITE_AES256GCM_HKDF_SHA256
            && h[11] == 0
            && h[59..64] == [0u8; 5]
            && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size);
        if !valid {
            return Err(CryptoError::DecryptionFailed);
        }
        Ok(Self {
            content_kind: h[10],
            segment_size,
            object_id: h[16..32].try_into().expect("16 bytes"),
            customer_ref: h[32..48].try_into().expect("16 bytes"),
            key_version: u32::from_be_bytes(h[48..52].try_into().expect("4 bytes")),
            nonce_prefix: h[52..59].try_into().expect("7 bytes"),
        })
    }
}

/// Number of segments of a plaintext: at least one (an empty object is one
/// empty final segment).
pub fn segment_count(plaintext_len: u64, segment_size: u32) -> u64 {
    plaintext_len.div_ceil(u64::from(segment_size)).max(1)
}

/// Total object length for a plaintext length.
pub fn ciphertext_len(plaintext_len: u64, segment_size: u32) -> u64 {
    HEADER_LEN as u64 + plaintext_len + TAG_LEN as u64 * segment_count(plaintext_len, segment_size)
}

/// Plaintext length implied by an object length, or `None` when no plaintext
/// encrypts to that length (a truncated or padded object).
pub fn plaintext_len(object_len: u64, segment_size: u32) -> Option<u64> {
    let body = object_len.checked_sub(HEADER_LEN as u64)?;
    let stride = u64::from(segment_size) + TAG_LEN as u64;
    let count = body.div_ceil(stride).max(1);
    let plain = body.checked_sub(count * TAG_LEN as u64)?;
    // Reject encodings no writer produces: a trailing empty segment, or
    // more than 2^32 segments.
    (count <= MAX_SEGMENT_INDEX + 1
        && segment_count(plain, segment_size) == count
        && ciphertext_len(plain, segment_size) == object_len)
        .then_some(plain)
}

/// Byte offset of segment `index` inside the object.
pub fn segment_offset(index: u64, segment_size: u32) -> u64 {
    HEADER_LEN as u64 + index * (u64::from(segment_size) + TAG_LEN as u64)
}

struct SegmentKeys {
    aead: LessSafeKey,
    commitment: [u8; COMMITMENT_LEN],
}

struct HkdfLen(usize);

impl hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_expand(prk: &hkdf::Prk, info: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
    let info = [info];
    prk.expand(&info, HkdfLen(out.len())).and_then(|okm| okm.fill(out)).map_err(|_| CryptoError::DecryptionFailed)
}

fn derive_segment_keys(dek: &DataKey, header_prefix: &[u8; HEADER_LEN]) -> Result<SegmentKeys, CryptoError> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &header_prefix[..COMMITMENT_OFFSET]);
    let prk = salt.extract(dek.secret().expose());
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    hkdf_expand(&prk, SEGMENT_KEY_INFO, &mut key[..])?;
    let mut commitment = [0u8; COMMITMENT_LEN];
    hkdf_expand(&prk, COMMITMENT_INFO, &mut commitment)?;
    let unbound = UnboundKey::new(&AES_256_GCM, &key[..]).map_err(|_| CryptoError::DecryptionFailed)?;
    Ok(SegmentKeys { aead: LessSafeKey::new(unbound), commitment })
}

/// Derives the key that encrypts an upload's spool journal. It is distinct
/// from the segment key, so journal records (random nonces) and segments
/// (counter nonces) never share a (key, nonce) pair.
pub fn derive_spool_key(dek: &DataKey, object_id: &[u8; 16]) -> Result<LessSafeKey, CryptoError> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, object_id);
    let prk = salt.extract(dek.secret().expose());
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    hkdf_expand(&prk, SPOOL_KEY_INFO, &mut key[..])?;
    let unbound = UnboundKey::new(&AES_256_GCM, &key[..]).map_err(|_| CryptoError::DecryptionFailed)?;
    Ok(LessSafeKey::new(unbound))
}

fn segment_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&(index as u32).to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Seals segments of one object. Pure and synchronous.
pub struct SegmentSealer {
    keys: SegmentKeys,
    header: [u8; HEADER_LEN],
    fields: HeaderFields,
}

impl SegmentSealer {
    pub fn new(dek: &DataKey, fields: HeaderFields) -> Result<Self, CryptoError> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&fields.segment_size) {
            return Err(CryptoError::InvalidSegment);
        }
        let mut header = fields.encode_without_commitment();
        let keys = derive_segment_keys(dek, &header)?;
        header[COMMITMENT_OFFSET..].copy_from_slice(&keys.commitment);
        Ok(Self { keys, header, fields })
    }

    /// The complete header, commitment included.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    pub fn segment_size(&self) -> u32 {
        self.fields.segment_size
    }

    /// Encrypts segment `index` in place, appending its tag to `buf`.
    ///
    /// `buf` holds exactly `segment_size` bytes for a non-final segment and
    /// 1..=`segment_size` for a final one (0 only when it is segment 0).
    pub fn seal_segment(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        if index > MAX_SEGMENT_INDEX {
            return Err(CryptoError::CounterExhausted);
        }
        let size = self.fields.segment_size as usize;
        let len_ok = if last { buf.len() <= size && (!buf.is_empty() || index == 0) } else { buf.len() == size };
        if !len_ok {
            return Err(CryptoError::InvalidSegment);
        }
        let nonce = segment_nonce(&self.fields.nonce_prefix, index, last);
        let tag = self
            .keys
            .aead
            .seal_in_place_separate_tag(nonce, Aad::from(&self.header[..]), buf)
            .map_err(|_| CryptoError::InvalidSegment)?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Seals the non-final segment `plain` (exactly `segment_size` bytes)
    /// onto the end of `out`: one copy of the plaintext, where buffering it
    /// for [`SegmentSealer::seal_segment`] would take two.
    pub fn seal_segment_onto(&self, index: u64, plain: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if index > MAX_SEGMENT_INDEX {
            return Err(CryptoError::CounterExhausted);
        }
        if plain.len() != self.fields.segment_size as usize {
            return Err(CryptoError::InvalidSegment);
        }
        let start = out.len();
        out.reserve(plain.len() + TAG_LEN);
        out.extend_from_slice(plain);
        let nonce = segment_nonce(&self.fields.nonce_prefix, index, false);
        match self.keys.aead.seal_in_place_separate_tag(nonce, Aad::from(&self.header[..]), &mut out[start..]) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                // Never leave the plaintext behind in the output.
                out.truncate(start);
                Err(CryptoError::InvalidSegment)
            }
        }
    }
}

/// Opens segments of one object after its header and key commitment check.
pub struct SegmentOpener {
    keys: SegmentKeys,
    header: [u8; HEADER_LEN],
    fields: HeaderFields,
}

impl SegmentOpener {
    /// Parses `header` and checks the key commitment (in constant time)
    /// before any segment can be opened.
    pub fn new(dek: &DataKey, header: &[u8]) -> Result<Self, CryptoError> {
        let fields = HeaderFields::parse(header)?;
        let header: [u8; HEADER_LEN] = header.try_into().map_err(|_| CryptoError::DecryptionFailed)?;
        let keys = derive_segment_keys(dek, &header)?;
        if !bool::from(keys.commitment.ct_eq(&header[COMMITMENT_OFFSET..])) {
            return Err(CryptoError::DecryptionFailed);
        }
        Ok(Self { keys, header, fields })
    }

    pub fn fields(&self) -> &HeaderFields {
        &self.fields
    }

    /// Decrypts segment `index` (ciphertext + tag) in place; `buf` is left
    /// holding the plaintext. Fails opaquely on any mismatch.
    pub fn open_segment(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        let size = self.fields.segment_size as usize;
        let len_ok = index <= MAX_SEGMENT_INDEX
            && buf.len() >= TAG_LEN
            && if last {
                buf.len() <= size + TAG_LEN && (buf.len() > TAG_LEN || index == 0)
            } else {
                buf.len() == size + TAG_LEN
            };
        if !len_ok {
            return Err(CryptoError::DecryptionFailed);
        }
        let nonce = segment_nonce(&self.fields.nonce_prefix, index, last);
        let plain_len = self
            .keys
            .aead
            .open_in_place(nonce, Aad::from(&self.header[..]), buf)
            .map_err(|_| CryptoError::DecryptionFailed)?
            .len();
        buf.truncate(plain_len);
        Ok(())
    }
}

/// Streaming encryptor: takes plaintext in any pieces, emits whole sealed
/// segments. Holds back up to one segment so the final one can carry the
/// last flag; [`ObjectEncryptor::finish`] must be called.
pub struct ObjectEncryptor {
    sealer: SegmentSealer,
    pending: Vec<u8>,
    next_index: u64,
    header_emitted: bool,
}

impl ObjectEncryptor {
    /// The held-back segment's buffer grows with the bytes held (up to one
    /// segment and its tag) rather than being reserved whole: a live call
    /// trickles 8 000 bytes a second, and ten thousand of them each holding
    /// a full segment's buffer would be 640 MiB of mostly empty memory.
    pub fn new(sealer: SegmentSealer) -> Self {
        Self { sealer, pending: Vec::new(), next_index: 0, header_emitted: false }
    }

    fn emit_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_emitted {
            out.extend_from_slice(self.sealer.header());
            self.header_emitted = true;
        }
    }

    /// Appends plaintext; any segment known to be non-final is sealed and
    /// appended to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.emit_header(out);
        let size = self.sealer.segment_size() as usize;
        while !data.is_empty() {
            if self.pending.len() == size {
                // More data follows, so the held-back full segment is not last.
                // Less than a segment of it (a trickle): the buffer is let go
                // rather than kept full-sized until the next segment fills.
                self.seal_pending(false, out, data.len() < size)?;
            }
            if self.pending.is_empty() && data.len() > size {
                // A full segment with more after it in `data`: not last
                // either, so sealed straight from `data`.
                self.sealer.seal_segment_onto(self.next_index, &data[..size], out)?;
                self.next_index += 1;
                data = &data[size..];
                continue;
            }
            let take = (size - self.pending.len()).min(data.len());
            let need = self.pending.len() + take;
            if need > self.pending.capacity() {
                // Doubling from 4 KiB; once it would reach a segment, one
                // segment and the tag that sealing in place appends.
                let mut want = need.max(2 * self.pending.capacity()).max(PENDING_MIN);
                if want >= size {
                    want = size + TAG_LEN;
                }
                self.pending.reserve_exact(want - self.pending.len());
            }
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals the held-back segment onto `out`. With `release` the buffer is
    /// not kept for the next segment: it becomes `out` when `out` is empty
    /// (no copy), and is freed otherwise.
    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>, release: bool) -> Result<(), CryptoError> {
        self.sealer.seal_segment(self.next_index, last, &mut self.pending)?;
        self.next_index += 1;
        if release && out.is_empty() {
            *out = std::mem::take(&mut self.pending);
        } else {
            out.extend_from_slice(&self.pending);
            if release {
                self.pending = Vec::new();
            } else {
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Seals the final segment.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.emit_header(out);
        self.seal_pending(true, out, true)
    }

    /// An encryptor continuing an object whose header and first
    /// `next_index` segments were already emitted (an upload journal
    /// resumed after a restart). Feed it the plaintext after those
    /// segments.
    pub fn resume(sealer: SegmentSealer, next_index: u64) -> Self {
        let mut enc = Self::new(sealer);
        enc.next_index = next_index;
        enc.header_emitted = true;
        enc
    }

    pub fn segment_size(&self) -> u32 {
        self.sealer.segment_size()
    }

    /// Plaintext bytes already sealed into emitted segments.
    pub fn sealed_len(&self) -> u64 {
        self.next_index * u64::from(self.sealer.segment_size())
    }

    /// The plaintext held back, not yet in any emitted segment (at most one
    /// segment: the one that may turn out to be the last).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Test hook for F11: starts the counter near its limit.
    #[doc(hidden)]
    pub fn with_next_index(mut self, index: u64) -> Self {
        self.next_index = index;
        self
    }
}

/// Decrypts a complete object held in memory (tests, small objects). Rejects
/// truncation, trailing data, reordering and anything tampered, all with the
/// same error.
pub fn decrypt_object(dek: &DataKey, object: &[u8]) -> Result<(HeaderFields, Vec<u8>), CryptoError> {
    let header = object.get(..HEADER_LEN).ok_or(CryptoError::DecryptionFailed)?;
    let opener = SegmentOpener::new(dek, header)?;
    let size = opener.fields().segment_size;
    let plain_len = plaintext_len(object.len() as u64, size).ok_or(CryptoError::DecryptionFailed)?;
    let count = segment_count(plain_len, size);
    let mut out = Vec::with_capacity(plain_len as usize);
    let mut buf = Vec::with_capacity(size as usize + TAG_LEN);
    for index in 0..count {
        let start = segment_offset(index, size) as usize;
        let end = (start + size as usize + TAG_LEN).min(object.len());
        buf.clear();
        buf.extend_from_slice(&object[start..end]);
        opener.open_segment(index, index + 1 == count, &mut buf)?;
        out.extend_from_slice(&buf);
    }
    Ok((opener.fields().clone(), out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::secret::SecretKey;
    use proptest::prelude::*;

    fn key(byte: u8) -> DataKey {
        let mut b = [byte; 32];
        DataKey::from_secret(SecretKey::from_slice_zeroizing(&mut b).unwrap())
    }

    fn fields(segment_size: u32) -> HeaderFields {
        HeaderFields {
            content_kind: 1,
            segment_size,
            object_id: [1; 16],
            customer_ref: [2; 16],
            key_version: 1,
            nonce_prefix: [3; 7],
        }
    }

    fn encrypt(dek: &DataKey, f: HeaderFields, plain: &[u8], piece: usize) -> Vec<u8> {
        let mut enc = ObjectEncryptor::new(SegmentSealer::new(dek, f).unwrap());
        let mut out = Vec::new();
        for chunk in plain.chunks(piece.max(1)) {
            enc.update(chunk, &mut out).unwrap();
        }
        enc.finish(&mut out).unwrap();
        out
    }

    /// As [`encrypt`], but each update writes into a new buffer.
    fn encrypt_fresh_out(dek: &DataKey, f: HeaderFields, plain: &[u8], piece: usize) -> Vec<u8> {
        let mut enc = ObjectEncryptor::new(SegmentSealer::new(dek, f).unwrap());
        let mut object = Vec::new();
        for chunk in plain.chunks(piece.max(1)) {
            let mut out = Vec::new();
            enc.update(chunk, &mut out).unwrap();
            object.extend_from_slice(&out);
        }
        let mut out = Vec::new();
        enc.finish(&mut out).unwrap();
        object.extend_from_slice(&out);
        object
    }

    #[test]
    fn a_trickle_starts_each_segment_in_a_small_buffer() {
        // A live call: 20 ms G.711 frames into 64 KiB segments.
        let dek = key(5);
        let size = DEFAULT_SEGMENT_SIZE as usize;
        let plain: Vec<u8> = (0..3 * size + 1000).map(|i| (i * 13 + 1) as u8).collect();
        let mut enc = ObjectEncryptor::new(SegmentSealer::new(&dek, fields(DEFAULT_SEGMENT_SIZE)).unwrap());
        let (mut object, mut sealed) = (Vec::new(), 0);
        for frame in plain.chunks(160) {
            let mut out = Vec::new();
            enc.update(frame, &mut out).unwrap();
            if enc.sealed_len() > sealed {
                sealed = enc.sealed_len();
                assert!(enc.pending.capacity() <= PENDING_MIN, "kept {} bytes", enc.pending.capacity());
            }
            assert!(enc.pending.capacity() <= size + TAG_LEN);
            object.extend_from_slice(&out);
        }
        assert_eq!(sealed, 3 * size as u64);
        enc.finish(&mut object).unwrap();
        assert_eq!(object, encrypt(&dek, fields(DEFAULT_SEGMENT_SIZE), &plain, plain.len()));
    }

    #[test]
    fn a_bulk_stream_keeps_its_segment_buffer() {
        let dek = key(6);
        let size = DEFAULT_SEGMENT_SIZE as usize;
        let mut enc = ObjectEncryptor::new(SegmentSealer::new(&dek, fields(DEFAULT_SEGMENT_SIZE)).unwrap());
        let mut out = Vec::new();
        enc.update(&vec![7u8; 16 * size], &mut out).unwrap();
        let held = enc.pending.as_ptr();
        enc.update(&vec![8u8; 16 * size], &mut out).unwrap();
        // The held-back segment was sealed and the next one held in the
        // same allocation, of one segment and its tag.
        assert_eq!(enc.pending.as_ptr(), held);
        assert_eq!(enc.pending.capacity(), size + TAG_LEN);
    }

    #[test]
    fn geometry_round_trips_for_every_length_class() {
        for size in [16u32, 64, 65536] {
            let s = u64::from(size);
            for len in [0, 1, s - 1, s, s + 1, 3 * s, 3 * s + 7] {
                let c = ciphertext_len(len, size);
                assert_eq!(plaintext_len(c, size), Some(len), "len {len} size {size}");
            }
            // One byte short or long of a valid length is never valid, except
            // where it lands on another valid length's encoding.
            assert_eq!(plaintext_len(HEADER_LEN as u64 + 15, size), None);
            assert_eq!(plaintext_len(HEADER_LEN as u64 + s + 16 + 16, size), None, "empty trailing segment");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip_any_length_and_piece_size(
            len_class in 0usize..6,
            extra in 0usize..200,
            piece in 1usize..300,
            seg in prop::sample::select(vec![16u32, 32, 100]),
        ) {
            let s = seg as usize;
            let len = [0, 1, s - 1, s, s + 1, s * 5 + extra][len_class];
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let dek = key(9);
            let object = encrypt(&dek, fields(seg), &plain, piece);
            prop_assert_eq!(object.len() as u64, ciphertext_len(len as u64, seg));
            // The bytes do not depend on how the plaintext was split: a
            // journal resealed after a crash must match what it held.
            prop_assert_eq!(&object, &encrypt(&dek, fields(seg), &plain, 1));
            // Nor on whether each piece's output starts in an empty buffer
            // (as the spool's do), where a sealed segment is handed over
            // rather than copied.
            prop_assert_eq!(&object, &encrypt_fresh_out(&dek, fields(seg), &plain, piece));
            let (_, back) = decrypt_object(&dek, &object).unwrap();
            prop_assert_eq!(back, plain);
        }

        #[test]
        fn any_single_bit_flip_fails(len in 0usize..120, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let plain = vec![0x5au8; len];
            let dek = key(1);
            let mut object = encrypt(&dek, fields(32), &plain, 7);
            let i = pos.index(object.len());
            object[i] ^= 1 << bit;
            prop_assert_eq!(decrypt_object(&dek, &object).unwrap_err(), CryptoError::DecryptionFailed);
        }
    }

    #[test]
    fn f11_counter_refuses_to_wrap() {
        let dek = key(4);
        let size = 16u32;
        let sealer = SegmentSealer::new(&dek, fields(size)).unwrap();
        let mut enc = ObjectEncryptor::new(sealer).with_next_index(MAX_SEGMENT_INDEX - 1);
        let mut out = Vec::new();
        // Segments 2^32-2 and 2^32-1 are sealed ...
        enc.update(&[0u8; 33], &mut out).unwrap();
        assert_eq!(out.len(), HEADER_LEN + 2 * (16 + TAG_LEN));
        // ... the final one would need counter 2^32, which does not exist.
        assert_eq!(enc.finish(&mut out).unwrap_err(), CryptoError::CounterExhausted);
    }

    #[test]
    fn segment_sealer_rejects_short_non_final_segments() {
        let dek = key(4);
        let sealer = SegmentSealer::new(&dek, fields(16)).unwrap();
        let mut buf = vec![0u8; 15];
        assert_eq!(sealer.seal_segment(0, false, &mut buf).unwrap_err(), CryptoError::InvalidSegment);
        let mut empty = Vec::new();
        assert_eq!(sealer.seal_segment(1, true, &mut empty).unwrap_err(), CryptoError::InvalidSegment);
    }

    #[test]
    fn spool_key_differs_from_segment_key() {
        // Same DEK, same nonce: the spool key must not produce the segment's
        // ciphertext.
        let dek = key(5);
        let f = fields(16);
        let sealer = SegmentSealer::new(&dek, f.clone()).unwrap();
        let mut seg = vec![0u8; 16];
        sealer.seal_segment(0, false, &mut seg).unwrap();
        let spool = derive_spool_key(&dek, &f.object_id).unwrap();
        let mut other = vec![0u8; 16];
        let tag = spool
            .seal_in_place_separate_tag(
                segment_nonce(&f.nonce_prefix, 0, false),
                Aad::from(&sealer.header()[..]),
                &mut other,
            )
            .unwrap();
        other.extend_from_slice(tag.as_ref());
        assert_ne!(seg, other);
    }
}
