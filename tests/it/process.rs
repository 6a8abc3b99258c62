//! The real binary as a child process: `kill -9` mid-upload, and the CLI.

use std::process::{Command, Output};

use recvault::api::pb;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;

/// A1/B5: every acknowledged byte survives `kill -9`; the upload resumes
/// from the durable offset on a restarted server and commits bit-exact.
#[tokio::test]
async fn a1_acked_bytes_survive_kill_9_and_resume_bit_exact() {
    let data = tempfile::tempdir().unwrap();
    let audio = wav(3_000_000); // ~6 MB
    let upload_id = new_id();
    let mut acked = 0;
    let mut object_id = String::new();
    // Kill the server twice, at different points of the stream.
    for cut in [1_000_000usize, 4_500_000] {
        let mut server = ChildServer::spawn(data.path());
        let mut c = server.client().await;
        let mut s = Stream::start(&mut c).await.unwrap();
        let (oid, durable, committed) = s.open(&upload_id, spec("crash-1", REC, "audio/wav")).await.unwrap();
        assert!(!committed);
        assert!(durable >= acked, "durable offset {durable} went behind an ack of {acked}");
        if !object_id.is_empty() {
            assert_eq!(oid, object_id);
        }
        object_id = oid;
        s.data_chunks(durable, &audio[durable as usize..cut]).await;
        acked = s.acked(cut as u64).await.unwrap();
        // More bytes in flight, unacknowledged, when the server dies.
        s.data_chunks(cut as u64, &audio[cut..cut + 300_000]).await;
        server.kill9();
    }
    let server = ChildServer::spawn(data.path());
    let mut c = server.client().await;
    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&upload_id, spec("crash-1", REC, "audio/wav")).await.unwrap();
    assert!(durable >= acked);
    s.data_chunks(durable, &audio[durable as usize..]).await;
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    let info = s.committed().await.unwrap();
    assert_eq!(info.object_id, object_id);
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
    assert!(files_under(&data.path().join("spool")).is_empty(), "the journal is removed at commit");
}

/// Where the CLI under test points, and the token it sends.
#[derive(Clone)]
struct Target {
    url: String,
    token: String,
}

/// A client faster than the disk is held back by flow control instead of
/// being buffered by the server: with every journal flush slowed down, the
/// bytes the client manages to hand over stay within the durable ones plus
/// a few buffers, not the whole upload (issue #7: memory flat in object
/// size). Bounds only; no time is asserted.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_fast_client_on_a_slow_disk_is_held_back_not_buffered() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let data = tempfile::tempdir().unwrap();
    let config = format!("{CHILD_CONFIG}[ingest]\ncommit_bytes = 1048576\n");
    let server = ChildServer::spawn_with(data.path(), &config, &[("FAILPOINTS", "ingest-flush=sleep(200)")], None);
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut responses = c.ingest(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let open = pb::ingest_request::Open { upload_id: new_id(), spec: Some(spec("slow-disk", REC, "audio/pcmu")) };
    tx.send(pb::IngestRequest { msg: Some(pb::ingest_request::Msg::Open(open)) }).await.unwrap();
    const MIB: u64 = 1 << 20;
    const TOTAL: u64 = 48 * MIB;
    let chunk = bytes::Bytes::from(vec![0x55u8; MIB as usize]);
    let handed = Arc::new(AtomicU64::new(0));
    let sender = {
        let handed = handed.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL / MIB {
                let data = pb::ingest_request::Data { offset: i * MIB, data: chunk.clone() };
                tx.send(pb::IngestRequest { msg: Some(pb::ingest_request::Msg::Data(data)) }).await.unwrap();
                handed.fetch_add(MIB, Ordering::Relaxed);
            }
            let finish = pb::ingest_request::Finish { expected_sha256: Default::default(), expected_size: TOTAL };
            tx.send(pb::IngestRequest { msg: Some(pb::ingest_request::Msg::Finish(finish)) }).await.unwrap();
        })
    };
    let mut durable = 0;
    let mut worst = 0;
    let info = loop {
        match responses.message().await.unwrap().and_then(|m| m.msg) {
            Some(pb::ingest_response::Msg::Ack(a)) => {
                // Handed over but not durable: what the server, the HTTP/2
                // windows and the channel hold between them.
                worst = worst.max(handed.load(Ordering::Relaxed).saturating_sub(durable));
                durable = a.durable_offset;
            }
            Some(pb::ingest_response::Msg::Committed(info)) => break info,
            Some(_) => {}
            None => panic!("stream ended before the commit"),
        }
    };
    sender.await.unwrap();
    assert_eq!(info.size, TOTAL);
    // Pending cap (1 MiB) + the flush under way (~2 MiB) + the server's
    // 16 MiB stream window + client buffers; the whole upload without the cap.
    assert!(worst <= 32 * MIB, "{} MiB handed over beyond the durable offset", worst / MIB);
}

fn cli(target: &Target, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recvault"))
        .args(args)
        .env("RECVAULT_SERVER", &target.url)
        .env("RECVAULT_TOKEN", &target.token)
        .output()
        .expect("run the CLI")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "CLI failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure, got {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8(out.stderr).expect("utf-8 error");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err:?}");
    err
}

#[tokio::test]
async fn cli_put_get_range_stat_ls_shred() {
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(data.path());
    let url = Target { url: server.url(), token: server.operator_token().await };
    let work = tempfile::tempdir().unwrap();
    let audio = wav(2_000_000);
    let wav_path = work.path().join("call.wav");
    std::fs::write(&wav_path, &audio).unwrap();
    let image = jpeg(1024, 768, 50_000);
    let jpg_path = work.path().join("shot.jpg");
    std::fs::write(&jpg_path, &image).unwrap();

    let url2 = url.clone();
    let wav_arg = wav_path.to_str().unwrap().to_owned();
    let jpg_arg = jpg_path.to_str().unwrap().to_owned();
    let (rec_id, img_id) = tokio::task::spawn_blocking(move || {
        let rec = ok(cli(
            &url2,
            &[
                "put",
                &wav_arg,
                "--customer",
                "cli-1",
                "--kind",
                "call-recording",
                "--interaction",
                "call-9",
                "--tag",
                "lang=pt",
            ],
        ));
        let img = ok(cli(&url2, &["put", &jpg_arg, "--customer", "cli-1", "--kind", "image"]));
        (rec.trim().to_owned(), img.trim().to_owned())
    })
    .await
    .unwrap();

    let out = work.path().join("back.wav");
    ok(cli(&url, &["get", &rec_id, "--purpose", "legal", "-o", out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), audio);
    let img_back = cli(&url, &["get", &img_id, "--purpose", "legal"]);
    assert_eq!(ok_bytes(img_back), image);
    let range = ok_bytes(cli(&url, &["get", &rec_id, "--purpose", "legal", "--range", "100000-299999"]));
    assert_eq!(range, audio[100_000..300_000]);

    // A playback link from the CLI, fetched over HTTP with a Range.
    let link = ok(cli(&url, &["link", &rec_id, "--purpose", "legal", "--ttl", "2m"]));
    let link = link.trim().strip_prefix("http://").expect("an http URL on stdout");
    let (addr, path) = link.split_at(link.find('/').unwrap());
    let got = crate::web::http_get(addr.parse().unwrap(), path, &[("range", "bytes=100000-100999")]).await;
    assert_eq!((got.status, &got.body[..]), (206, &audio[100_000..101_000]));
    let err = fails(cli(&url, &["link", &rec_id, "--purpose", "legal", "--ttl", "1day"]));
    assert!(err.contains("link_ttl"), "{err}");

    let stat = ok(cli(&url, &["stat", &rec_id]));
    assert!(stat.contains("audio/wav") && stat.contains("lang=pt") && stat.contains("call-9"), "{stat}");
    let ls = ok(cli(&url, &["ls", "--customer", "cli-1"]));
    assert_eq!(ls.lines().count(), 2, "{ls}");

    let err = fails(cli(&url, &["get", "not-an-id", "--purpose", "legal"]));
    assert!(err.contains("invalid argument"), "{err}");
    let err = fails(cli(&url, &["put", wav_path.to_str().unwrap(), "--customer", "cli-1", "--kind", "image"]));
    assert!(err.contains("--content-type"), "{err}");
    let err = fails(cli(
        &url,
        &["put", wav_path.to_str().unwrap(), "--customer", "cli-1", "--kind", "image", "--content-type", "image/png"],
    ));
    assert!(err.contains("invalid argument") && err.contains("audio/wav"), "{err}");
    let err = fails(cli(&Target { url: "http://127.0.0.1:1".into(), token: url.token.clone() }, &["stat", &rec_id]));
    assert!(err.contains("cannot reach"), "{err}");

    // Legal hold and retention commands.
    let stat_out = ok(cli(&url, &["stat", &rec_id]));
    assert!(stat_out.contains("call-recordings"), "{stat_out}");
    let policies = ok(cli(&url, &["retention", "policies"]));
    assert!(policies.contains("images") && policies.contains("(config file)"), "{policies}");
    let placed = ok(cli(
        &url,
        &["hold", "place", "--customer", "cli-1", "--case", "CASE-9", "--reason", "lawsuit", "--by", "legal"],
    ));
    let hold_id = placed.split_whitespace().next().unwrap().to_owned();
    assert!(ok(cli(&url, &["hold", "ls", "--customer", "cli-1"])).contains("CASE-9"));
    let err = fails(cli(&url, &["shred", "--customer", "cli-1", "--reason", "test erasure", "--by", "dpo"]));
    assert!(err.contains("legal hold") && err.contains("CASE-9"), "{err}");
    ok(cli(&url, &["hold", "release", &hold_id, "--by", "legal"]));
    let dry = ok(cli(&url, &["retention", "run", "--dry-run"]));
    assert!(dry.contains("would expire 0 object(s)"), "{dry}");

    let shred = ok(cli(&url, &["shred", "--customer", "cli-1", "--reason", "test erasure", "--by", "dpo"]));
    assert!(shred.contains("2 object(s)"), "{shred}");
    // The certificate, checked offline against the server's public key.
    let cert_path = work.path().join("cert.json");
    ok(cli(&url, &["certificate", "get", "--customer", "cli-1", "-o", cert_path.to_str().unwrap()]));
    let data_arg = data.path().to_str().unwrap();
    let valid = ok(cli(
        &Target { url: "http://127.0.0.1:1".into(), token: url.token.clone() },
        &["certificate", "verify", cert_path.to_str().unwrap(), "--data-dir", data_arg],
    ));
    assert!(valid.starts_with("valid: customer cli-1") && valid.contains("2 object(s)"), "{valid}");
    let tampered = std::fs::read_to_string(&cert_path)
        .unwrap()
        .replace("\"objects_unrecoverable\": 2", "\"objects_unrecoverable\": 1");
    std::fs::write(&cert_path, tampered).unwrap();
    let err = fails(cli(
        &Target { url: "http://127.0.0.1:1".into(), token: url.token.clone() },
        &["certificate", "verify", cert_path.to_str().unwrap(), "--data-dir", data_arg],
    ));
    assert!(err.contains("INVALID"), "{err}");
    let err =
        fails(cli(&url, &["get", &rec_id, "--purpose", "legal", "-o", out.with_extension("again").to_str().unwrap()]));
    assert!(err.contains("customer shredded"), "{err}");
    assert!(!out.with_extension("again").exists() && !work.path().join("back.again.partial").exists());
}

fn ok_bytes(out: Output) -> Vec<u8> {
    assert!(out.status.success(), "CLI failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Issue #6 point 3 end to end: a real server whose root key lives in a
/// SoftHSM2 token (generated there, never exported) stores and reads
/// content, and after a kill -9 and restart unseals through the token and
/// reads it again; a server pointed at another key in the token stays
/// sealed and never opens its port.
#[tokio::test]
async fn server_with_its_root_key_in_a_pkcs11_token() {
    if std::env::var("RECVAULT_SKIP_HSM").as_deref() == Ok("1") {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "!!!!! SKIPPED: PKCS#11 server test (RECVAULT_SKIP_HSM=1)");
        return;
    }
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("SoftHSM2 is needed: apt-get install softhsm2 (or set RECVAULT_SKIP_HSM=1)");
    let hsm = tempfile::tempdir().unwrap();
    let tokens = hsm.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = hsm.path().join("softhsm2.conf");
    std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\n", tokens.display()))
        .unwrap();
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "recvault-it", "--pin", "4321", "--so-pin", "8765"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util (apt-get install softhsm2)");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let pin = hsm.path().join("pin");
    recvault::auth::write_private(&pin, b"4321").unwrap();
    let config = |label: &str, create: bool| {
        format!(
            "{CHILD_CONFIG}[root_key]\nprovider = \"pkcs11\"\nmodule = \"{module}\"\ntoken_label = \"recvault-it\"\n\
             pin_file = \"{}\"\nkey_label = \"{label}\"\ncreate_key = {create}\n",
            pin.display()
        )
    };
    let conf_env = conf.to_str().unwrap().to_owned();
    let envs = [("SOFTHSM2_CONF", conf_env.as_str())];

    let data = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn_with(data.path(), &config("recvault-root", true), &envs, None);
    assert!(!data.path().join("root.key").exists(), "no root key file beside a token key");
    let mut c = server.client().await;
    let audio = wav(100_000);
    let o = ingest(&mut c, &new_id(), spec("hsm-1", REC, "audio/wav"), &audio).await;
    server.kill9();
    let server = ChildServer::spawn_with(data.path(), &config("recvault-root", false), &envs, None);
    let mut c = server.client().await;
    assert_eq!(get(&mut c, &o.object_id, None).await.unwrap(), audio);
    drop(server);

    // Another key of the token is not this installation's root key: the
    // server refuses to start (sealed) instead of serving.
    let out = Command::new(env!("CARGO_BIN_EXE_recvault"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--config")
        .arg({
            let p = hsm.path().join("other.toml");
            std::fs::write(&p, config("another-key", true)).unwrap();
            p
        })
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to start"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("serving on"));
    assert!(!err.contains("4321"), "the PIN never reaches an error");
}
