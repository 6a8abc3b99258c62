//! Crash consistency of ingest (threat plan A1): the real server process
//! killed at every step of ingest and commit, and `kill -9` at random
//! moments of a concurrent load; after restart and resume no acknowledged
//! byte is lost, nothing partly committed is visible, and every committed
//! object reads back bit-exact.

use std::sync::{Arc, Mutex};

use recvault::api::pb;
use tonic::Code;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;

/// Every failpoint of the ingest path, in the order a stream meets them,
/// and whether the catalog has committed the object when it fires.
#[cfg(feature = "failpoints")]
const STEPS: &[(&str, bool)] = &[
    // A journal flush about to write its first record: nothing persisted.
    ("ingest-flush", false),
    // Half a journal record written: a torn tail for recovery to cut.
    ("spool-mid-record", false),
    // Half of a flush's sealed segments written: a torn segment for
    // recovery to cut and seal again from the records.
    ("spool-mid-segment", false),
    // Records fsynced, the ack not yet sent.
    ("ingest-before-ack", false),
    // Every byte durable, finish received, the object not yet written.
    ("ingest-before-store-write", false),
    // The ciphertext written, its create-only publish not yet done.
    ("ingest-before-object-commit", false),
    // The object stored, the catalog row not yet committed.
    ("ingest-after-store-write", false),
    // The catalog committed, the journal not yet removed.
    ("ingest-after-catalog-commit", true),
    // Journal removed, the response not yet sent.
    ("ingest-before-response", true),
];

/// What a stream saw before its server died.
#[derive(Debug, Default, Clone)]
struct Seen {
    acked: u64,
    committed: Option<pb::ObjectInfo>,
}

/// Streams the rest of `data` after reopening `upload_id` and finishes,
/// recording acks into `seen` as they come. Returns the stream's end
/// (an error once the server is gone).
async fn stream_upload(
    c: &mut Client,
    upload_id: &str,
    customer: &str,
    data: &[u8],
    seen: &Mutex<Seen>,
    progress: Option<&tokio::sync::watch::Sender<u64>>,
) -> Result<(), tonic::Status> {
    let mut s = Stream::start(c).await?;
    s.send(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
        upload_id: upload_id.into(),
        spec: Some(spec(customer, REC, "audio/wav")),
    }))
    .await;
    let opened = match s.next().await? {
        Some(pb::ingest_response::Msg::Opened(o)) => o,
        other => panic!("expected opened, got {other:?}"),
    };
    {
        let seen = seen.lock().unwrap();
        assert!(
            opened.durable_offset >= seen.acked,
            "A1: upload {upload_id} reopened at {} after an ack of {}",
            opened.durable_offset,
            seen.acked
        );
        if seen.committed.is_some() {
            assert!(opened.committed, "a committed upload reopens as committed");
        }
    }
    if opened.committed {
        assert_eq!(opened.durable_offset, data.len() as u64);
    }
    // From a task: the server may die, or end the stream, mid-send.
    let sender = spawn_sender(&s, opened.durable_offset, data);
    let outcome = read_answers(&mut s, data, seen, progress).await;
    sender.abort();
    outcome
}

async fn read_answers(
    s: &mut Stream,
    data: &[u8],
    seen: &Mutex<Seen>,
    progress: Option<&tokio::sync::watch::Sender<u64>>,
) -> Result<(), tonic::Status> {
    loop {
        match s.next().await? {
            Some(pb::ingest_response::Msg::Ack(a)) => {
                assert!(a.durable_offset <= data.len() as u64, "an ack beyond the bytes sent");
                let mut seen = seen.lock().unwrap();
                if a.durable_offset > seen.acked {
                    if let Some(p) = progress {
                        p.send_modify(|n| *n += a.durable_offset - seen.acked);
                    }
                    seen.acked = a.durable_offset;
                }
            }
            Some(pb::ingest_response::Msg::Committed(info)) => {
                assert_eq!(info.sha256.as_ref(), &sha256(data)[..]);
                seen.lock().unwrap().committed = Some(info);
                if let Some(p) = progress {
                    p.send_modify(|n| *n += 1);
                }
                return Ok(());
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => return Err(tonic::Status::unavailable("stream ended without a commit")),
        }
    }
}

/// After a restart: what a coach can see of `customer` is only whole
/// committed objects, each bit-exact.
#[cfg(feature = "failpoints")]
async fn visible_objects(c: &mut Client, customer: &str, data: &[u8]) -> usize {
    let objects = match c.list(pb::ListRequest { customer_id: customer.into(), ..Default::default() }).await {
        Ok(r) => r.into_inner().objects,
        Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
        Err(s) => panic!("list: {s}"),
    };
    for o in &objects {
        assert_eq!(o.size, data.len() as u64, "a listed object is whole");
        assert_eq!(get(c, &o.object_id, None).await.unwrap(), data, "a listed object reads back bit-exact");
    }
    objects.len()
}

/// A1: the process dies (abort, as abrupt as `kill -9`) at each step of
/// ingest and commit. After a restart: nothing uncommitted is visible, the
/// durable offset covers every ack, the resumed upload commits bit-exact
/// as one object, and no plaintext is on disk.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a1_crash_at_every_ingest_step_then_resume() {
    crash_at_every_step(STEPS, "").await;
}

/// The same with the shared ingest log (`ingest.sync = "log"`): records go
/// to the log, not to a journal file, and a crash before a checkpoint
/// leaves segments unsynced behind the log.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a1_crash_at_every_ingest_step_with_the_shared_log() {
    let steps: Vec<(&str, bool)> = STEPS
        .iter()
        .copied()
        .filter(|(point, _)| *point != "spool-mid-record")
        // A batch of records about to be appended to the log.
        .chain([("log-before-write", false)])
        .collect();
    crash_at_every_step(&steps, "sync = \"log\"\n").await;
}

#[cfg(feature = "failpoints")]
async fn crash_at_every_step(steps: &[(&str, bool)], ingest_config: &str) {
    let audio = wav(1_500_000); // 3 MB: several journal flushes
    let marker = audio[1_000_000..1_000_064].to_vec();
    // Flushes (and acks) every 256 KiB, so the stream is mid-way when the
    // journal failpoints fire.
    let config = format!("{CHILD_CONFIG}[ingest]\ncommit_bytes = 262144\n{ingest_config}");
    for &(point, committed_at_crash) in steps {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let failpoint = format!("{point}=panic");
        let mut server = ChildServer::spawn_with(&data, &config, &[("FAILPOINTS", &failpoint)], Some(&log));
        let mut c = server.client().await;
        let upload_id = new_id();
        let seen = Mutex::new(Seen::default());
        let outcome = stream_upload(&mut c, &upload_id, "a1-steps", &audio, &seen, None).await;
        assert!(outcome.is_err(), "{point}: the failpoint never fired; the upload committed");
        let status = server.child.wait().expect("reap");
        assert!(!status.success(), "{point}: the server should have died, exited {status}");
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(log_text.contains(&format!("failpoint {point} panic")), "{point}: died elsewhere:\n{log_text}");
        let acked_at_crash = seen.lock().unwrap().acked;

        let server = ChildServer::spawn_with(&data, &config, &[], None);
        let mut c = server.client().await;
        let visible = visible_objects(&mut c, "a1-steps", &audio).await;
        assert_eq!(visible, usize::from(committed_at_crash), "{point}: visible objects after the crash");
        stream_upload(&mut c, &upload_id, "a1-steps", &audio, &seen, None)
            .await
            .unwrap_or_else(|e| panic!("{point}: resume failed: {e}"));
        assert_eq!(visible_objects(&mut c, "a1-steps", &audio).await, 1, "{point}: exactly one object");
        assert!(files_containing(&data, &marker).is_empty(), "{point}: plaintext reached the disk");
        eprintln!("{point}: {acked_at_crash} bytes acked before the crash; resumed and committed");
    }
}

/// Counts a call task as finished however it ends (a failed assertion
/// included), so the test never waits on a dead task.
struct Done(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// A tiny deterministic generator (xorshift64*), so a failing run can be
/// replayed from its logged seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// A1/B1 under load: several calls stream at once while the server is
/// killed with `kill -9` at random moments (after a random amount of newly
/// acknowledged audio); every call resumes from its durable offset on the
/// restarted server. In the end each call is one object, bit-exact, and no
/// acknowledged byte was ever behind a reopened durable offset.
/// `RECVAULT_CRASH_SEED` replays a run.
#[tokio::test]
async fn a1_kill9_at_random_moments_under_load() {
    kill9_under_load("a1_kill9_at_random_moments_under_load", &[]).await;
}

/// The same with the shared ingest log (`ingest.sync = "log"`): one
/// `fdatasync` of the log acknowledges every stream's records, and the
/// segments are synced by checkpoints; a kill loses none of them.
#[tokio::test]
async fn a1_kill9_under_load_with_the_shared_log() {
    kill9_under_load("a1_kill9_under_load_with_the_shared_log", &[("RECVAULT__INGEST__SYNC", "log")]).await;
}

async fn kill9_under_load(name: &str, envs: &[(&str, &str)]) {
    let seed = std::env::var("RECVAULT_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("{name}: RECVAULT_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    const CALLS: usize = 4;
    let audios: Arc<Vec<Vec<u8>>> = Arc::new((0..CALLS).map(|i| wav(900_000 + 300_000 * i)).collect());
    let ids: Vec<String> = (0..CALLS).map(|_| new_id()).collect();
    let seen: Arc<Vec<Mutex<Seen>>> = Arc::new((0..CALLS).map(|_| Mutex::new(Seen::default())).collect());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for round in 0..3 {
        let mut server = ChildServer::spawn_with(&data, CHILD_CONFIG, envs, None);
        let (url, token) = (server.url(), server.operator_token().await);
        // Kill after this many newly acknowledged bytes (commits count 1).
        let threshold = 64 * 1024 + rng.below(3 << 20);
        let (progress, mut watch) = tokio::sync::watch::channel(0u64);
        let progress = Arc::new(progress);
        let (finished, mut finished_rx) = tokio::sync::watch::channel(0usize);
        let finished = Arc::new(finished);
        let mut tasks = Vec::new();
        for i in 0..CALLS {
            if seen[i].lock().unwrap().committed.is_some() {
                continue;
            }
            let (url, token, id) = (url.clone(), token.clone(), ids[i].clone());
            let (audios, seen, progress) = (audios.clone(), seen.clone(), progress.clone());
            let done = Done(finished.clone());
            tasks.push(tokio::spawn(async move {
                let _done = done;
                let mut c = connect(&url, &token).await;
                let _ = stream_upload(&mut c, &id, "a1-load", &audios[i], &seen[i], Some(&progress)).await;
            }));
        }
        let count = tasks.len();
        tokio::select! {
            _ = watch.wait_for(|n| *n >= threshold) => {}
            _ = finished_rx.wait_for(|n| *n == count) => {}
        }
        server.kill9();
        for t in tasks {
            // An A1 assertion failing inside a call fails the test.
            if let Err(e) = t.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let acked: Vec<u64> = seen.iter().map(|s| s.lock().unwrap().acked).collect();
        eprintln!("round {round}: killed after {threshold} new bytes; acked per call {acked:?}");
    }
    let server = ChildServer::spawn_with(&data, CHILD_CONFIG, envs, None);
    let mut c = server.client().await;
    for i in 0..CALLS {
        stream_upload(&mut c, &ids[i], "a1-load", &audios[i], &seen[i], None)
            .await
            .unwrap_or_else(|e| panic!("call {i} failed to resume: {e} (seed {seed})"));
        let info = seen[i].lock().unwrap().committed.clone().expect("committed");
        assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audios[i], "call {i} (seed {seed})");
    }
    let listed = c.list(pb::ListRequest { customer_id: "a1-load".into(), ..Default::default() }).await.unwrap();
    assert_eq!(listed.into_inner().objects.len(), CALLS, "one object per call (seed {seed})");
}

/// Review finding of 2026-12-07: an upload's data key and nonce prefix are
/// fixed when it is first recorded, so every attempt on one upload id must
/// seal the same bytes, or AES-GCM nonces are reused. A Put killed after
/// its object was stored and before the catalog commit leaves such an
/// upload: a retry with the same content commits what is there; other
/// content, and a stream opened on that id, are refused before anything
/// is written; the object then reads back as what was committed.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a1_a_put_retried_after_a_crash_must_carry_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server =
        ChildServer::spawn_with(&data, CHILD_CONFIG, &[("FAILPOINTS", "put-after-store-write=panic")], Some(&log));
    let mut c = server.client().await;
    const CHAT: pb::ContentKind = pb::ContentKind::ChatTranscript;
    let upload_id = new_id();
    let first = b"agent: hello\ncustomer: my order 1234".to_vec();
    let other = b"agent: hello\ncustomer: my order 9876".to_vec();
    assert_eq!(first.len(), other.len(), "same length: only the content differs");
    let put_as = |data: &[u8]| pb::PutRequest {
        upload_id: upload_id.clone(),
        spec: Some(spec("a1-put", CHAT, "text/plain")),
        data: data.to_vec().into(),
        expected_sha256: Default::default(),
    };
    c.put(put_as(&first)).await.expect_err("the server dies at the failpoint");
    assert!(!server.child.wait().expect("reap").success());
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("failpoint put-after-store-write panic"), "died elsewhere:\n{log_text}");
    let objects = data.join("objects");
    assert_eq!(files_under(&objects).len(), 1, "the object was stored before the crash");
    let stored = std::fs::read(&files_under(&objects)[0]).unwrap();

    let server = ChildServer::spawn_with(&data, CHILD_CONFIG, &[], None);
    let mut c = server.client().await;
    let refused = c.put(put_as(&other)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("different content"), "{}", refused.message());
    let mut s = Stream::start(&mut c).await.unwrap();
    let refused = s.open(&upload_id, spec("a1-put", CHAT, "text/plain")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("Put that did not finish"), "{}", refused.message());
    let files = files_under(&objects);
    assert_eq!(files.len(), 1, "nothing else was written");
    assert_eq!(std::fs::read(&files[0]).unwrap(), stored, "the stored object is untouched");

    let info = c.put(put_as(&first)).await.unwrap().into_inner().object.unwrap();
    assert_eq!(info.sha256, sha256(&first));
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), first);
}

/// The same rule the other way round: a Put may not take over an upload id
/// a stream has written (its journal holds bytes sealed under that upload's
/// nonces); the stream can still resume and finish it.
#[tokio::test]
async fn a_put_is_refused_on_an_upload_a_stream_has_written() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(40_000);
    let upload_id = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&upload_id, spec("a1-mix", REC, "audio/wav")).await.unwrap();
    s.data(0, &audio[..20_000]).await;
    loop {
        match s.next().await.unwrap() {
            Some(pb::ingest_response::Msg::Ack(a)) if a.durable_offset == 20_000 => break,
            Some(_) => continue,
            None => panic!("the stream ended before its ack"),
        }
    }
    drop(s);
    let refused = c
        .put(pb::PutRequest {
            upload_id: upload_id.clone(),
            spec: Some(spec("a1-mix", REC, "audio/wav")),
            data: audio.clone().into(),
            expected_sha256: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("opened by a streaming Ingest"), "{}", refused.message());

    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&upload_id, spec("a1-mix", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, 20_000);
    s.data(durable, &audio[durable as usize..]).await;
    s.finish(None, audio.len() as u64).await;
    let info = s.committed().await.unwrap();
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
}
