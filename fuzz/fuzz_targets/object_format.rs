//! Object format v1: arbitrary bytes opened as a stored object never panic, and sealed plaintext always opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recvault::crypto::format::{
    HEADER_LEN, HeaderFields, MAX_SEGMENT_INDEX, MIN_SEGMENT_SIZE, ObjectEncryptor, SegmentOpener, SegmentSealer,
    TAG_LEN, ciphertext_len, decrypt_object, plaintext_len, segment_count, segment_offset,
};
use recvault::crypto::{DataKey, SecretKey};

/// The data key of the `tests/data/ok_*.json` vectors, so the seed corpus (their `object` bytes) passes the
/// commitment check and the fuzzer starts inside the segment code rather than at the header.
fn vector_key() -> DataKey {
    let mut bytes: [u8; 32] = std::array::from_fn(|i| i as u8);
    DataKey::from_secret(SecretKey::from_slice_zeroizing(&mut bytes).expect("32 bytes"))
}

/// Opens `object` the way a range reader does: header and commitment first, then each segment on its own,
/// the last one flagged as final. Returns the plaintext when every segment opened.
fn open_by_segments(dek: &DataKey, object: &[u8]) -> Option<Vec<u8>> {
    let opener = SegmentOpener::new(dek, object.get(..HEADER_LEN)?).ok()?;
    let size = opener.fields().segment_size;
    assert!(size >= MIN_SEGMENT_SIZE, "the opener accepted a segment size below the minimum");
    // Walk the segments the object's length implies, even a malformed length: each open must fail cleanly.
    let body = (object.len() - HEADER_LEN) as u64;
    let stride = u64::from(size) + TAG_LEN as u64;
    let count = body.div_ceil(stride).max(1).min(MAX_SEGMENT_INDEX + 1);
    let mut plain = Vec::new();
    let mut all_ok = true;
    let mut buf = Vec::new();
    for index in 0..count {
        let start = usize::try_from(segment_offset(index, size)).ok()?.min(object.len());
        let end = start.saturating_add(stride as usize).min(object.len());
        buf.clear();
        buf.extend_from_slice(&object[start..end]);
        let last = index + 1 == count;
        let opened = opener.open_segment(index, last, &mut buf).is_ok();
        if opened {
            plain.extend_from_slice(&buf);
        } else {
            all_ok = false;
        }
        // The final flag is part of the nonce: the same bytes never open under both flags. (Which flag is
        // right is not known here: `count` is a guess from a possibly malformed length, so a segment that
        // opens only under the other flag is fine.)
        buf.clear();
        buf.extend_from_slice(&object[start..end]);
        let other = opener.open_segment(index, !last, &mut buf).is_ok();
        assert!(!(opened && other), "segment {index} opened under both final flags");
    }
    all_ok.then_some(plain)
}

/// Seals `plain` in pieces of `piece` bytes under segments of `segment_size` bytes.
fn seal(dek: &DataKey, segment_size: u32, plain: &[u8], piece: usize) -> Vec<u8> {
    let fields = HeaderFields {
        content_kind: 1,
        segment_size,
        object_id: [0x11; 16],
        customer_ref: [0xC0; 16],
        key_version: 1,
        nonce_prefix: [0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6],
    };
    let mut enc = ObjectEncryptor::new(SegmentSealer::new(dek, fields).expect("valid segment size"));
    let mut out = Vec::new();
    for chunk in plain.chunks(piece.max(1)) {
        enc.update(chunk, &mut out).expect("update");
    }
    enc.finish(&mut out).expect("finish");
    out
}

fuzz_target!(|data: &[u8]| {
    let dek = vector_key();

    // 1. The input as a stored object: whole-object and per-segment opening agree, and never panic.
    let whole = decrypt_object(&dek, data);
    let by_segments = open_by_segments(&dek, data);
    if let Ok((fields, plain)) = &whole {
        assert_eq!(by_segments.as_ref(), Some(plain), "decrypt_object and per-segment opening disagree");
        assert_eq!(plaintext_len(data.len() as u64, fields.segment_size), Some(plain.len() as u64));
    }
    let _ = HeaderFields::parse(data.get(..HEADER_LEN).unwrap_or(data));

    // 2. Round trip: the input's tail as plaintext, its first bytes choosing the segment size and how the
    // plaintext is fed. Small segments reach the multi-segment paths with small inputs.
    let (segment_size, piece, flip, plain) = match data {
        [s, p, f, rest @ ..] => (MIN_SEGMENT_SIZE + u32::from(*s % 64), usize::from(*p), usize::from(*f), rest),
        _ => (MIN_SEGMENT_SIZE, 1, 0, data),
    };
    let object = seal(&dek, segment_size, plain, piece);
    assert_eq!(object.len() as u64, ciphertext_len(plain.len() as u64, segment_size));
    assert_eq!(plaintext_len(object.len() as u64, segment_size), Some(plain.len() as u64));
    assert_eq!(
        segment_count(plain.len() as u64, segment_size),
        (object.len() - HEADER_LEN).div_ceil(segment_size as usize + TAG_LEN).max(1) as u64
    );
    let (fields, opened) = decrypt_object(&dek, &object).expect("a sealed object opens");
    assert_eq!(fields.segment_size, segment_size);
    assert_eq!(opened, plain, "round trip changed the plaintext");
    assert_eq!(open_by_segments(&dek, &object).as_deref(), Some(plain));

    // Any single changed byte, and any truncation or extension by one byte, is refused.
    let mut tampered = object.clone();
    let at = (flip * 7919 + plain.len()) % tampered.len();
    tampered[at] ^= 1 << (flip % 8);
    assert!(decrypt_object(&dek, &tampered).is_err(), "flipped bit at {at} still opened");
    assert!(decrypt_object(&dek, &object[..object.len() - 1]).is_err(), "truncated object opened");
    let mut longer = object;
    longer.push(0);
    assert!(decrypt_object(&dek, &longer).is_err(), "object with a trailing byte opened");
});
