//! Known-answer vectors of object format v1 (`tests/data/ok_*.json`,
//! `tests/data/fail_*.json`), specified in `docs/FORMAT.md`.
//!
//! The files are produced by code (`RECVAULT_REGEN_VECTORS=1 cargo test
//! --test it vectors`), never by hand. Without the variable this suite
//! checks that every `ok_` file decrypts to its plaintext, that encrypting
//! its inputs reproduces its object byte for byte, and that every `fail_`
//! file fails with the one opaque error.

use std::path::PathBuf;

use recvault::crypto::format::{self, HeaderFields, ObjectEncryptor, SegmentSealer};
use recvault::crypto::{CryptoError, DataKey, SecretKey};
use serde::{Deserialize, Serialize};

/// Small segments keep the vectors short while covering every length class.
const SEGMENT: u32 = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Vector {
    /// What this vector covers (threat-plan case ids for `fail_`).
    description: String,
    data_key: String,
    content_kind: u8,
    segment_size: u32,
    object_id: String,
    customer_ref: String,
    key_version: u32,
    nonce_prefix: String,
    /// Hex; absent for `fail_` vectors (nothing must come out).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    plaintext: Option<String>,
    object: String,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn key(hex_key: &str) -> DataKey {
    let mut b = hex::decode(hex_key).expect("hex key");
    DataKey::from_secret(SecretKey::from_slice_zeroizing(&mut b).expect("32-byte key"))
}

fn fields(v: &Vector) -> HeaderFields {
    HeaderFields {
        content_kind: v.content_kind,
        segment_size: v.segment_size,
        object_id: hex::decode(&v.object_id).unwrap().try_into().unwrap(),
        customer_ref: hex::decode(&v.customer_ref).unwrap().try_into().unwrap(),
        key_version: v.key_version,
        nonce_prefix: hex::decode(&v.nonce_prefix).unwrap().try_into().unwrap(),
    }
}

fn encrypt(v: &Vector, plaintext: &[u8]) -> Vec<u8> {
    let mut enc = ObjectEncryptor::new(SegmentSealer::new(&key(&v.data_key), fields(v)).unwrap());
    let mut out = Vec::new();
    enc.update(plaintext, &mut out).unwrap();
    enc.finish(&mut out).unwrap();
    out
}

fn base(description: &str, object_byte: u8) -> Vector {
    Vector {
        description: description.into(),
        data_key: hex::encode((0u8..32).collect::<Vec<_>>()),
        content_kind: 1,
        segment_size: SEGMENT,
        object_id: hex::encode([object_byte; 16]),
        customer_ref: hex::encode([0xC0; 16]),
        key_version: 1,
        nonce_prefix: hex::encode([0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6]),
        plaintext: None,
        object: String::new(),
    }
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Every vector the generator produces, by file name.
fn generate() -> Vec<(String, Vector)> {
    let s = SEGMENT as usize;
    let mut out = Vec::new();
    for (name, len) in [
        ("ok_empty", 0),
        ("ok_one_byte", 1),
        ("ok_segment_minus_one", s - 1),
        ("ok_exact_segment", s),
        ("ok_segment_plus_one", s + 1),
        ("ok_multi", 3 * s + 17),
    ] {
        let mut v = base(&format!("{len}-byte plaintext, {SEGMENT}-byte segments"), 0x11);
        let p = plaintext(len);
        v.object = hex::encode(encrypt(&v, &p));
        v.plaintext = Some(hex::encode(p));
        out.push((name.to_owned(), v));
    }
    let multi = out.last().unwrap().1.clone();
    let obj = hex::decode(&multi.object).unwrap();
    let seg_len = s + format::TAG_LEN;
    let seg = |i: usize| format::HEADER_LEN + i * seg_len;
    let fail = |name: &str, description: &str, object: Vec<u8>, tweak: &dyn Fn(&mut Vector)| {
        let mut v = multi.clone();
        v.description = description.into();
        v.plaintext = None;
        v.object = hex::encode(object);
        tweak(&mut v);
        (name.to_owned(), v)
    };
    let flip = |at: usize| {
        let mut o = obj.clone();
        o[at] ^= 0x01;
        o
    };
    let none = &|_: &mut Vector| {};
    out.push(fail("fail_f1_body_bit", "F1: one bit flipped in a segment body", flip(seg(1) + 5), none));
    out.push(fail("fail_f1_tag_bit", "F1: one bit flipped in a segment tag", flip(seg(1) + s + 3), none));
    out.push(fail("fail_f1_header_bit", "F1: one bit flipped in the header nonce prefix", flip(53), none));
    out.push(fail("fail_f1_commitment_bit", "F1: one bit flipped in the key commitment", flip(80), none));
    let mut swapped = obj.clone();
    swapped[seg(0)..seg(2)].copy_from_slice(&[&obj[seg(1)..seg(2)], &obj[seg(0)..seg(1)]].concat());
    out.push(fail("fail_f2_reordered_segments", "F2: segments 0 and 1 swapped", swapped, none));
    let mut dup = obj[..seg(2)].to_vec();
    dup.extend_from_slice(&obj[seg(1)..]);
    out.push(fail("fail_f2_duplicated_segment", "F2: segment 1 duplicated", dup, none));
    out.push(fail(
        "fail_f3_dropped_final_segment",
        "F3: truncated at a segment boundary",
        obj[..seg(3)].to_vec(),
        none,
    ));
    out.push(fail(
        "fail_f3_truncated_mid_segment",
        "F3: truncated inside the final segment",
        obj[..obj.len() - 3].to_vec(),
        none,
    ));
    out.push(fail("fail_f3_header_only", "F3: header without segments", obj[..format::HEADER_LEN].to_vec(), none));
    let mut extra = obj.clone();
    extra.extend_from_slice(&obj[seg(1)..seg(2)]);
    out.push(fail("fail_f4_appended_segment", "F4: a valid segment appended after the final one", extra, none));
    let mut trailing = obj.clone();
    trailing.push(0);
    out.push(fail("fail_f4_trailing_byte", "F4: one byte appended", trailing, none));
    // F5: segments of another object under the same data key.
    let mut other = multi.clone();
    other.object_id = hex::encode([0x22; 16]);
    let other_obj = encrypt(&other, &plaintext(3 * s + 17));
    let mut transplanted = obj.clone();
    transplanted[seg(1)..seg(2)].copy_from_slice(&other_obj[seg(1)..seg(2)]);
    out.push(fail(
        "fail_f5_segment_from_other_object",
        "F5: segment 1 taken from another object (same key)",
        transplanted,
        none,
    ));
    for (name, desc, at) in [
        ("fail_f5_header_object_id", "F5: header object id changed", 16),
        ("fail_f5_header_key_version", "F5: header key version changed", 51),
        ("fail_f5_header_kind", "F5: header content kind changed", 10),
        ("fail_f5_header_segment_size", "F5/F9: header segment size changed", 15),
        ("fail_f8_version", "F8: format version changed", 8),
        ("fail_f8_suite", "F8: suite changed", 9),
        ("fail_f5_reserved", "F5: reserved header byte set", 60),
    ] {
        out.push(fail(name, desc, flip(at), none));
    }
    out.push(fail("fail_f6_wrong_key", "F6: another data key", obj.clone(), &|v| {
        v.data_key = hex::encode([0x55u8; 32]);
    }));
    // F9: a final segment longer than the declared segment size.
    let mut long_final = obj[..seg(3)].to_vec();
    long_final.extend_from_slice(&[0u8; 64 + 16 + 8]);
    out.push(fail(
        "fail_f9_oversized_final_segment",
        "F9: final segment longer than the segment size",
        long_final,
        none,
    ));
    out
}

fn regenerating() -> bool {
    std::env::var_os("RECVAULT_REGEN_VECTORS").is_some()
}

#[test]
fn kat_regenerate_or_match_committed_vectors() {
    let generated = generate();
    if regenerating() {
        for (name, v) in &generated {
            let text = serde_json::to_string_pretty(v).unwrap() + "\n";
            std::fs::write(dir().join(format!("{name}.json")), text).unwrap();
        }
    }
    for (name, v) in generated {
        let path = dir().join(format!("{name}.json"));
        let stored: Vector = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; run RECVAULT_REGEN_VECTORS=1 cargo test --test it vectors", path.display())
        }))
        .unwrap();
        // ok_ objects are deterministic; fail_ ones too (fixed inputs).
        assert_eq!(stored, v, "{name} differs from what the generator produces");
    }
}

fn load(prefix: &str) -> Vec<(String, Vector)> {
    let mut out: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".json"))
        .map(|n| {
            let v: Vector = serde_json::from_str(&std::fs::read_to_string(dir().join(&n)).unwrap()).unwrap();
            (n, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn kat_ok_vectors_decrypt_and_reencrypt_exactly() {
    let ok = load("ok_");
    assert_eq!(ok.len(), 6, "every length class has a vector");
    for (name, v) in ok {
        let object = hex::decode(&v.object).unwrap();
        let expected = hex::decode(v.plaintext.as_ref().unwrap()).unwrap();
        let (f, plain) = format::decrypt_object(&key(&v.data_key), &object).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(plain, expected, "{name}");
        assert_eq!(f, fields(&v), "{name}");
        assert_eq!(encrypt(&v, &expected), object, "{name}: encryption is not reproducible");
        assert_eq!(object.len() as u64, format::ciphertext_len(expected.len() as u64, v.segment_size));
    }
}

#[test]
fn kat_fail_vectors_all_fail_with_one_opaque_error() {
    let fail = load("fail_");
    assert!(fail.len() >= 20, "only {} fail_ vectors", fail.len());
    let mut messages = std::collections::BTreeSet::new();
    for (name, v) in fail {
        let object = hex::decode(&v.object).unwrap();
        match format::decrypt_object(&key(&v.data_key), &object) {
            Ok(_) => panic!("{name} decrypted"),
            Err(e) => {
                assert!(matches!(e, CryptoError::DecryptionFailed), "{name}: {e:?}");
                messages.insert(e.to_string());
            }
        }
    }
    assert_eq!(messages.len(), 1, "{messages:?}");
}
