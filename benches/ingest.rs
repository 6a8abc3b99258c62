//! Bulk ingest over loopback, against its peers in the same run:
//! (a) a plain write of the same bytes to a file with one fsync at the end,
//! and (b) the raw AES-256-GCM limit. Then a full read back.
//!
//! `cargo bench --bench ingest` (RECVAULT_BENCH_MIB=1024 by default).
//! Results in BENCHMARKS.md. Not a test: nothing here asserts a time.

use std::io::Write;
use std::time::Instant;

use bytes::Bytes;
use recvault::api::pb;
use recvault::api::pb::recvault_client::RecvaultClient;
use recvault::cli::BearerAuth;
use recvault::config::Config;
use recvault::model::Role;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn gib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then this runs as a small smoke test of the same path.
    let benching = std::env::args().any(|a| a == "--bench");
    let default_mib = if benching { 1024 } else { 8 };
    let mib: u64 = std::env::var("RECVAULT_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(default_mib);
    let total = mib << 20;
    let chunk = 1usize << 20;
    // Audio-like, incompressible enough; built once, sent many times.
    let mut block = vec![0u8; chunk];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    block[..12].copy_from_slice(b"RIFF\0\0\0\0WAVE");
    let block = Bytes::from(block);
    // On the disk under test (target/ by default, created if a custom
    // CARGO_TARGET_DIR left it absent).
    let base = std::env::var("RECVAULT_BENCH_DIR").unwrap_or_else(|_| "target".into());
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();

    // (a) plain file write + fsync.
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(dir.path().join("plain.bin")).unwrap();
        for _ in 0..mib {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let plain = t.elapsed().as_secs_f64();
    std::fs::remove_file(dir.path().join("plain.bin")).unwrap();

    // (b) raw AES-256-GCM over the same bytes, one core.
    let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[1; 32]).unwrap());
    let mut buf = block.to_vec();
    let t = Instant::now();
    for i in 0..mib {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&i.to_be_bytes());
        let _tag = std::hint::black_box(
            key.seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::empty(),
                &mut buf,
            )
            .unwrap(),
        );
    }
    let aes = t.elapsed().as_secs_f64();

    // The service, in-process, on loopback, with its data under `dir`.
    let cfg = Config { data_dir: dir.path().join("data"), listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
    let (parts, listener) = recvault::server::bind(&cfg).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = parts.auth.create_token("bench", "bench", &[Role::Ingest, Role::Coach], false, None).await.unwrap();
    let serve_cfg = cfg.clone();
    tokio::spawn(async move { recvault::server::serve(&serve_cfg, parts, listener, std::future::pending()).await });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = RecvaultClient::with_interceptor(channel, BearerAuth::new(Some(token.token.as_str())).unwrap());

    let (tx, rx) = mpsc::channel(8);
    let t = Instant::now();
    let mut responses = client.ingest(ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(pb::IngestRequest {
        msg: Some(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
            upload_id: uuid::Uuid::new_v4().to_string(),
            spec: Some(pb::ObjectSpec {
                customer_id: "bench".into(),
                kind: pb::ContentKind::CallRecording as i32,
                content_type: "audio/wav".into(),
                interaction: None,
                sensitive_spans: Vec::new(),
            }),
        })),
    })
    .await
    .unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..mib {
            let msg = pb::ingest_request::Msg::Data(pb::ingest_request::Data { offset: i << 20, data: block.clone() });
            tx.send(pb::IngestRequest { msg: Some(msg) }).await.unwrap();
        }
        tx.send(pb::IngestRequest {
            msg: Some(pb::ingest_request::Msg::Finish(pb::ingest_request::Finish::default())),
        })
        .await
        .unwrap();
    });
    let mut acks = 0u64;
    let mut all_acked = None;
    let mut object = None;
    while let Some(r) = responses.message().await.unwrap() {
        match r.msg {
            Some(pb::ingest_response::Msg::Ack(a)) => {
                acks += 1;
                if a.durable_offset == total {
                    all_acked = Some(t.elapsed().as_secs_f64());
                }
            }
            Some(pb::ingest_response::Msg::Committed(info)) => {
                object = Some(info);
                break;
            }
            _ => {}
        }
    }
    let committed = t.elapsed().as_secs_f64();
    sender.await.unwrap();
    let info = object.expect("committed");
    let durable = all_acked.unwrap_or(committed);

    let t = Instant::now();
    let mut stream = client
        .get(pb::GetRequest {
            object_id: info.object_id.clone(),
            purpose: pb::Purpose::QualityReview as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = 0u64;
    while let Some(m) = stream.message().await.unwrap() {
        read += m.data.len() as u64;
    }
    let read_secs = t.elapsed().as_secs_f64();
    assert_eq!(read, total);

    println!("bulk ingest of {mib} MiB over loopback ({acks} acks)");
    println!("  (a) plain file write + fsync      {:6.2} s  {:5.2} GB/s", plain, gib_s(total, plain));
    println!("  (b) raw AES-256-GCM, one core     {:6.2} s  {:5.2} GB/s", aes, gib_s(total, aes));
    println!(
        "  recvault: all bytes durable+acked {:6.2} s  {:5.2} GB/s  = {:.2} x (a)",
        durable,
        gib_s(total, durable),
        plain / durable
    );
    println!(
        "  recvault: committed object        {:6.2} s  {:5.2} GB/s  = {:.2} x (a)",
        committed,
        gib_s(total, committed),
        plain / committed
    );
    println!("  recvault: full read back          {:6.2} s  {:5.2} GB/s", read_secs, gib_s(total, read_secs));
}
