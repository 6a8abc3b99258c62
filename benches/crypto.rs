//! Crypto hot path: segment seal/open against the raw AES-256-GCM and
//! SHA-256 limits and a memcpy, in the same run.
//!
//! `cargo bench --bench crypto`; results in BENCHMARKS.md.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use recvault::crypto::format::{self, HeaderFields, ObjectEncryptor, SegmentSealer};
use recvault::crypto::{DataKey, SecretKey};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const LEN: usize = 16 << 20;

fn dek() -> DataKey {
    let mut b = [7u8; 32];
    DataKey::from_secret(SecretKey::from_slice_zeroizing(&mut b).unwrap())
}

fn fields() -> HeaderFields {
    HeaderFields {
        content_kind: 1,
        segment_size: format::DEFAULT_SEGMENT_SIZE,
        object_id: [1; 16],
        customer_ref: [2; 16],
        key_version: 1,
        nonce_prefix: [3; 7],
    }
}

fn seal(data: &[u8]) -> Vec<u8> {
    let mut enc = ObjectEncryptor::new(SegmentSealer::new(&dek(), fields()).unwrap());
    let mut out = Vec::with_capacity(data.len() + data.len() / 4096 + 4096);
    enc.update(data, &mut out).unwrap();
    enc.finish(&mut out).unwrap();
    out
}

fn bench(c: &mut Criterion) {
    let data: Vec<u8> = (0..LEN).map(|i| (i * 31 % 251) as u8).collect();
    let object = seal(&data);
    let mut g = c.benchmark_group("16MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(20);
    g.bench_function("recvault_seal_64k_segments", |b| b.iter(|| seal(&data)));
    g.bench_function("recvault_open_64k_segments", |b| b.iter(|| format::decrypt_object(&dek(), &object).unwrap()));
    // The limit: ring AES-256-GCM over the same 64 KiB chunks, no framing.
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let mut buf = data.clone();
    g.bench_function("raw_ring_aes256gcm_64k", |b| {
        b.iter(|| {
            for (i, chunk) in buf.chunks_mut(64 << 10).enumerate() {
                let mut n = [0u8; 12];
                n[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let _tag = std::hint::black_box(
                    key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), chunk).unwrap(),
                );
            }
        })
    });
    g.bench_function("sha256", |b| b.iter(|| ring::digest::digest(&ring::digest::SHA256, &data)));
    let mut dst = vec![0u8; LEN];
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(std::hint::black_box(&data))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
