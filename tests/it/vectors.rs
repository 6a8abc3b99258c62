//! Known-answer vectors of object format v1 (`tests/data/ok_*.json`,
//! `tests/data/fail_*.json`), specified in `docs/FORMAT.md`.
//!
//! The files are produced by code (`RECVAULT_REGEN_VECTORS=1 cargo test
//! --test it vectors`), never by hand. Without the variable this suite
//! checks that every `ok_` file decrypts to its plaintext, that encrypting
//! its inputs reproduces its object byte for byte, and that every `fail_`
//! file fails with the one opaque error. Test names carry the threat-plan
//! case they cover (`research/threats-and-tests.md`, section F).
//!
//! [`spec`] is a second, independent reader written from `docs/FORMAT.md`
//! with ring primitives only; it must read every `ok_` vector too, which is
//! what shows the document is enough to build another implementation.

use std::path::PathBuf;

use recvault::crypto::format::{self, HeaderFields, ObjectEncryptor, SegmentSealer};
use recvault::crypto::{CryptoError, DataKey, SecretKey, wrap};
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
    /// The segment key HKDF derives (a debugging aid for other
    /// implementations; `ok_` vectors only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    segment_key: Option<String>,
    /// Customer key that wraps `data_key`, and the wrapped data key as the
    /// catalog stores it. When present, a reader starts from these: the data
    /// key is unwrapped with the AAD built from the header fields above.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    customer_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    wrapped_data_key: Option<String>,
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
        segment_key: None,
        customer_key: None,
        wrapped_data_key: None,
        object: String::new(),
    }
}

const CUSTOMER_KEY: [u8; 32] = [0x40; 32];
const WRAP_NONCE: [u8; 12] = [0xB0, 0xB1, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xBB];

/// Wraps `v.data_key` under [`CUSTOMER_KEY`] with a fixed nonce (the crate
/// draws it at random), bound to the given identity.
fn wrapped_for(v: &Vector, customer_ref: &str, object_id: &str, key_version: u32) -> String {
    let h = |s: &str| -> [u8; 16] { hex::decode(s).unwrap().try_into().unwrap() };
    let wrapped = spec::wrap_data_key(
        &CUSTOMER_KEY,
        &WRAP_NONCE,
        &hex::decode(&v.data_key).unwrap(),
        &h(customer_ref),
        &h(object_id),
        key_version,
    );
    hex::encode(wrapped)
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
        let object = encrypt(&v, &p);
        v.segment_key =
            Some(hex::encode(spec::hkdf32(&hex::decode(&v.data_key).unwrap(), &object[..64], spec::SEGMENT_KEY_INFO)));
        v.customer_key = Some(hex::encode(CUSTOMER_KEY));
        v.wrapped_data_key = Some(wrapped_for(&v, &v.customer_ref, &v.object_id, v.key_version));
        v.object = hex::encode(object);
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
        v.segment_key = None;
        v.customer_key = None;
        v.wrapped_data_key = None;
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
    // F6: the whole header of another object (same key) on this body.
    let mut header_swapped = obj.clone();
    header_swapped[..format::HEADER_LEN].copy_from_slice(&other_obj[..format::HEADER_LEN]);
    out.push(fail(
        "fail_f6_header_from_other_object",
        "F6: header of another object under the same key, body of this one",
        header_swapped,
        none,
    ));
    // F6: this object's own data key, wrapped for another identity. Only the
    // wrap AAD stands between the attacker and the plaintext.
    for (name, desc, customer_ref, object_id, version) in [
        ("fail_f6_wrapped_key_other_object", "F6: wrapped data key bound to another object id", "c0", "22", 1),
        ("fail_f6_wrapped_key_other_customer", "F6: wrapped data key bound to another customer ref", "c1", "11", 1),
        ("fail_f6_wrapped_key_other_version", "F6: wrapped data key bound to another key version", "c0", "11", 2),
    ] {
        out.push(fail(name, desc, obj.clone(), &|v| {
            v.customer_key = Some(hex::encode(CUSTOMER_KEY));
            v.wrapped_data_key = Some(wrapped_for(v, &customer_ref.repeat(16), &object_id.repeat(16), version));
        }));
    }
    // F7: header and commitment made under the real data key, every segment
    // sealed under the presented key (AAD = that same header). Without the
    // commitment check the presented key would open every segment; the
    // `f7_` test shows that with the reference reader.
    let forged_key = [0x77u8; 32];
    let header = &obj[..format::HEADER_LEN];
    let forged_segment_key = spec::hkdf32(&forged_key, &header[..64], spec::SEGMENT_KEY_INFO);
    let mut forged = header.to_vec();
    for (i, chunk) in plaintext(3 * s + 17).chunks(s).enumerate() {
        let nonce = spec::nonce(&header[52..59], i as u32, i == 3);
        forged.extend_from_slice(&spec::seal(&forged_segment_key, nonce, header, chunk));
    }
    out.push(fail(
        "fail_f7_commitment_of_other_key",
        "F7: segments valid under the presented key, commitment made under another key",
        forged,
        &|v| v.data_key = hex::encode(forged_key),
    ));
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
    std::env::var_os("RECVAULT_REGEN_VECTORS").is_some_and(|v| v == "1")
}

/// Names of the vector files on disk (without `.json`), sorted.
fn files_on_disk() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| (n.starts_with("ok_") || n.starts_with("fail_")) && n.ends_with(".json"))
        .map(|n| n.trim_end_matches(".json").to_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn kat_regenerate_or_match_committed_vectors() {
    let generated = generate();
    if regenerating() {
        // Drop files the generator no longer produces, so none is hand-kept.
        for stale in files_on_disk().into_iter().filter(|n| generated.iter().all(|(g, _)| g != n)) {
            std::fs::remove_file(dir().join(format!("{stale}.json"))).unwrap();
        }
        for (name, v) in &generated {
            let text = serde_json::to_string_pretty(v).unwrap() + "\n";
            std::fs::write(dir().join(format!("{name}.json")), text).unwrap();
        }
    }
    let mut names: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(files_on_disk(), names, "vector files differ from the generated set; run RECVAULT_REGEN_VECTORS=1");
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
    files_on_disk()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| {
            let text = std::fs::read_to_string(dir().join(format!("{n}.json"))).unwrap();
            let v: Vector = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, v)
        })
        .collect()
}

fn id16(hex_id: &str) -> [u8; 16] {
    hex::decode(hex_id).unwrap().try_into().unwrap()
}

/// Decrypts a vector the way the service does: unwrap the data key from the
/// catalog's wrapped key when the vector has one, then open the object.
fn decrypt(v: &Vector) -> Result<Vec<u8>, CryptoError> {
    let object = hex::decode(&v.object).unwrap();
    let dek = match (&v.customer_key, &v.wrapped_data_key) {
        (Some(ck), Some(wrapped)) => {
            let mut ck = hex::decode(ck).unwrap();
            let kek = SecretKey::from_slice_zeroizing(&mut ck).unwrap();
            let aad = wrap::data_key_aad(&id16(&v.customer_ref), &id16(&v.object_id), v.key_version);
            DataKey::from_secret(wrap::unwrap_key(&kek, &hex::decode(wrapped).unwrap(), &aad)?)
        }
        _ => key(&v.data_key),
    };
    format::decrypt_object(&dek, &object).map(|(_, plain)| plain)
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
        assert_eq!(decrypt(&v).unwrap_or_else(|e| panic!("{name} via wrapped key: {e}")), expected, "{name}");
        assert_eq!(encrypt(&v, &expected), object, "{name}: encryption is not reproducible");
        assert_eq!(object.len() as u64, format::ciphertext_len(expected.len() as u64, v.segment_size));
    }
}

#[test]
fn kat_ok_vectors_read_by_an_implementation_of_the_spec() {
    for (name, v) in load("ok_") {
        let object = hex::decode(&v.object).unwrap();
        let expected = hex::decode(v.plaintext.as_ref().unwrap()).unwrap();
        let dek = spec::unwrap_data_key(
            &hex::decode(v.customer_key.as_ref().unwrap()).unwrap(),
            &hex::decode(v.wrapped_data_key.as_ref().unwrap()).unwrap(),
            &id16(&v.customer_ref),
            &id16(&v.object_id),
            v.key_version,
        )
        .unwrap_or_else(|| panic!("{name}: spec reader cannot unwrap the data key"));
        assert_eq!(hex::encode(&dek), v.data_key, "{name}");
        assert_eq!(
            hex::encode(spec::hkdf32(&dek, &object[..64], spec::SEGMENT_KEY_INFO)),
            *v.segment_key.as_ref().unwrap(),
            "{name}"
        );
        let whole = spec::read(&dek, &object, 0, expected.len(), true);
        assert_eq!(whole.as_deref(), Some(&expected[..]), "{name}: spec reader");
        // Every range, including ones inside and across segment boundaries.
        for a in 0..expected.len() {
            for b in (a + 1..=expected.len()).step_by(13) {
                assert_eq!(spec::read(&dek, &object, a, b, true).as_deref(), Some(&expected[a..b]), "{name} [{a},{b})");
            }
        }
    }
}

#[test]
fn range_read_opens_only_the_covering_segments() {
    // Corrupt segments 0 and 3 of ok_multi: a read inside segments 1..=2
    // still succeeds, so it fetched and opened only those.
    let (_, v) = load("ok_multi").remove(0);
    let mut object = hex::decode(&v.object).unwrap();
    let plain = hex::decode(v.plaintext.as_ref().unwrap()).unwrap();
    let dek = hex::decode(&v.data_key).unwrap();
    object[format::segment_offset(0, SEGMENT) as usize] ^= 1;
    object[format::segment_offset(3, SEGMENT) as usize] ^= 1;
    assert_eq!(spec::read(&dek, &object, 70, 150, true).as_deref(), Some(&plain[70..150]));
    assert_eq!(spec::read(&dek, &object, 60, 150, true), None, "segment 0 is corrupt");
    assert_eq!(spec::read(&dek, &object, 70, 200, true), None, "segment 3 is corrupt");
}

/// Every `fail_` vector of one threat case fails with exactly the opaque
/// error; there is at least one such vector.
fn assert_fails_opaquely(case: &str) {
    let vectors = load(&format!("fail_{case}_"));
    assert!(!vectors.is_empty(), "no fail_{case}_ vectors");
    for (name, v) in vectors {
        match decrypt(&v) {
            Ok(_) => panic!("{name} decrypted"),
            Err(e) => {
                assert_eq!(e, CryptoError::DecryptionFailed, "{name}");
                assert_eq!(e.to_string(), CryptoError::DecryptionFailed.to_string(), "{name}");
            }
        }
    }
}

#[test]
fn f1_bit_flips_in_body_tag_header_and_commitment_fail_opaquely() {
    assert_fails_opaquely("f1");
}

#[test]
fn f2_reordered_and_duplicated_segments_fail_opaquely() {
    assert_fails_opaquely("f2");
}

#[test]
fn f3_truncation_at_and_inside_a_segment_fails_opaquely() {
    assert_fails_opaquely("f3");
}

#[test]
fn f4_appended_segment_and_trailing_bytes_fail_opaquely() {
    assert_fails_opaquely("f4");
}

#[test]
fn f5_changed_header_fields_and_foreign_segments_fail_opaquely() {
    assert_fails_opaquely("f5");
}

#[test]
fn f6_wrong_key_swapped_header_and_rebound_wrapped_key_fail_opaquely() {
    assert_fails_opaquely("f6");
    // The rebound wrapped keys hold the right data key: only the wrap AAD
    // rejects them.
    for (name, v) in load("fail_f6_wrapped_key_") {
        assert_eq!(
            format::decrypt_object(&key(&v.data_key), &hex::decode(&v.object).unwrap()).map(|(_, p)| p.len()),
            Ok(3 * SEGMENT as usize + 17),
            "{name}: the data key itself is the object's"
        );
    }
}

#[test]
fn f7_commitment_is_checked_before_any_segment_is_opened() {
    assert_fails_opaquely("f7");
    let (_, v) = load("fail_f7_commitment_of_other_key").remove(0);
    let object = hex::decode(&v.object).unwrap();
    let dek = hex::decode(&v.data_key).unwrap();
    // Every segment authenticates under the presented key ...
    let len = format::plaintext_len(object.len() as u64, v.segment_size).unwrap() as usize;
    assert_eq!(spec::read(&dek, &object, 0, len, false).map(|p| p.len()), Some(len));
    // ... so only the commitment rejects the object.
    assert_eq!(spec::read(&dek, &object, 0, len, true), None);
}

#[test]
fn f8_version_and_suite_changes_fail_opaquely() {
    assert_fails_opaquely("f8");
}

#[test]
fn f9_oversized_final_segment_fails_opaquely() {
    assert_fails_opaquely("f9");
}

#[test]
fn kat_fail_vectors_all_fail_with_one_opaque_error() {
    let fail = load("fail_");
    assert!(fail.len() >= 25, "only {} fail_ vectors", fail.len());
    let mut errors = Vec::new();
    for (name, v) in fail {
        match decrypt(&v) {
            Ok(_) => panic!("{name} decrypted"),
            Err(e) => errors.push((name, e, e.to_string())),
        }
    }
    let (first_name, first, first_text) = errors[0].clone();
    for (name, e, text) in &errors {
        assert_eq!(*e, first, "{name} and {first_name} fail differently");
        assert_eq!(*text, first_text, "{name} and {first_name} print differently");
    }
    assert_eq!(first, CryptoError::DecryptionFailed);
}

/// An independent implementation of `docs/FORMAT.md`, with ring primitives
/// only and none of the crate's format code. Test code: it favours
/// plainness over constant time.
mod spec {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use ring::hkdf;

    pub const SEGMENT_KEY_INFO: &[u8] = b"recvault v1 segment key";
    const COMMITMENT_INFO: &[u8] = b"recvault v1 key commitment";
    const DATA_KEY_LABEL: &[u8] = b"recvault v1 data key";

    struct Len32;

    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }

    /// HKDF-SHA256(salt, ikm) expanded with `info` to 32 bytes.
    pub fn hkdf32(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
        let mut out = [0u8; 32];
        prk.expand(&[info], Len32).unwrap().fill(&mut out).unwrap();
        out
    }

    fn aes(key: &[u8]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap())
    }

    /// prefix[7] || u32 index || u8 last
    pub fn nonce(prefix: &[u8], index: u32, last: bool) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(prefix);
        n[7..11].copy_from_slice(&index.to_be_bytes());
        n[11] = u8::from(last);
        n
    }

    pub fn seal(key: &[u8], nonce: [u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut buf = plain.to_vec();
        let tag = aes(key).seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf);
        buf.extend_from_slice(tag.unwrap().as_ref());
        buf
    }

    fn open(key: &[u8], nonce: [u8; 12], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let n = aes(key).open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf).ok()?.len();
        buf.truncate(n);
        Some(buf)
    }

    fn data_key_aad(customer_ref: &[u8; 16], object_id: &[u8; 16], key_version: u32) -> Vec<u8> {
        [DATA_KEY_LABEL, customer_ref, object_id, &key_version.to_be_bytes()].concat()
    }

    /// version 1 || nonce[12] || AES-256-GCM(customer key, nonce, aad, data key) || tag[16]
    pub fn wrap_data_key(
        customer_key: &[u8],
        nonce: &[u8; 12],
        dek: &[u8],
        customer_ref: &[u8; 16],
        object_id: &[u8; 16],
        key_version: u32,
    ) -> Vec<u8> {
        let sealed = seal(customer_key, *nonce, &data_key_aad(customer_ref, object_id, key_version), dek);
        [&[1u8][..], nonce, &sealed].concat()
    }

    pub fn unwrap_data_key(
        customer_key: &[u8],
        wrapped: &[u8],
        customer_ref: &[u8; 16],
        object_id: &[u8; 16],
        key_version: u32,
    ) -> Option<Vec<u8>> {
        if wrapped.len() != 61 || wrapped[0] != 1 {
            return None;
        }
        let nonce: [u8; 12] = wrapped[1..13].try_into().unwrap();
        open(customer_key, nonce, &data_key_aad(customer_ref, object_id, key_version), &wrapped[13..])
    }

    /// Plaintext bytes `[a, b)` of `object` (`a < b`, or `a == b == 0` for
    /// the whole of an empty object), opening only the segments covering
    /// them. `check_commitment = false` exists only to show, in the F7 test,
    /// what the commitment check prevents.
    pub fn read(dek: &[u8], object: &[u8], a: usize, b: usize, check_commitment: bool) -> Option<Vec<u8>> {
        let header = object.get(..96)?;
        let s = u32::from_be_bytes(header[12..16].try_into().unwrap()) as usize;
        let header_ok = &header[0..8] == b"RECVAULT"
            && header[8] == 1
            && header[9] == 1
            && header[11] == 0
            && header[59..64] == [0; 5]
            && (16..=16 << 20).contains(&s);
        if !header_ok {
            return None;
        }
        if check_commitment && hkdf32(dek, &header[..64], COMMITMENT_INFO)[..] != header[64..96] {
            return None;
        }
        let key = hkdf32(dek, &header[..64], SEGMENT_KEY_INFO);
        // Plaintext length from the object length; reject lengths no writer
        // produces.
        let body = object.len() - 96;
        let count = body.div_ceil(s + 16).max(1);
        let p = body.checked_sub(16 * count)?;
        if p.div_ceil(s).max(1) != count || b > p || a > b || (a == b && p != 0) {
            return None;
        }
        let (first, last) = if p == 0 { (0, 0) } else { (a / s, (b - 1) / s) };
        let mut plain = Vec::new();
        for i in first..=last {
            let start = 96 + i * (s + 16);
            let end = (start + s + 16).min(object.len());
            plain.extend(open(&key, nonce(&header[52..59], i as u32, i == count - 1), header, &object[start..end])?);
        }
        Some(plain[a - first * s..b - first * s].to_vec())
    }
}
