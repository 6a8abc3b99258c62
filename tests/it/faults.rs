//! Object-store faults (threat plan C1–C4, C6) through the real ingest path:
//! a fault-injecting wrapper over the real local store, and a real full
//! file system (a small tmpfs) for disk-full.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use recvault::api::pb;
use recvault::clock::SystemClock;
use recvault::store::RetryPolicy;
use recvault::store::faulty::{Fault, FaultPlan, FaultyStore, Op};
use tonic::Code;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;

/// Quick retries, so the tests spend no time waiting on backoff.
fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        op_timeout: Duration::from_secs(30),
    }
}

/// A server whose object store is the real local store behind a
/// [`FaultyStore`] driven by the returned plan.
async fn faulty_server(policy: RetryPolicy) -> (TestServer, FaultPlan) {
    let plan = FaultPlan::new();
    let p = plan.clone();
    let server = TestServer::start_store(
        tempfile::tempdir().unwrap(),
        Arc::new(SystemClock),
        |_| {},
        move |store| store.map_backend(|b| Arc::new(FaultyStore::new(b, p))).with_retry(policy),
    )
    .await;
    (server, plan)
}

/// Committed object files (not staging leftovers).
fn object_files(data: &Path) -> Vec<PathBuf> {
    files_under(&data.join("objects")).into_iter().filter(|p| !p.to_string_lossy().contains("staging")).collect()
}

async fn listed(c: &mut Client, customer: &str) -> Vec<pb::ObjectInfo> {
    match c.list(pb::ListRequest { customer_id: customer.into(), ..Default::default() }).await {
        Ok(r) => r.into_inner().objects,
        Err(s) if s.code() == Code::NotFound => Vec::new(),
        Err(s) => panic!("list failed: {s}"),
    }
}

/// Streams `data` under `upload_id` and finishes; returns the highest ack
/// seen and the outcome of the finish.
async fn upload(
    c: &mut Client,
    upload_id: &str,
    customer: &str,
    data: &[u8],
) -> (String, u64, Result<pb::ObjectInfo, tonic::Status>) {
    let mut s = Stream::start(c).await.unwrap();
    let (object_id, durable, committed) = s.open(upload_id, spec(customer, REC, "audio/wav")).await.unwrap();
    assert!(!committed);
    // Sent from a task: a server that ends the stream early stops reading,
    // and the answers must still be read here.
    let sender = spawn_sender(&s, durable, data);
    let mut acked = durable;
    let outcome = loop {
        match s.next().await {
            Ok(Some(pb::ingest_response::Msg::Ack(a))) => {
                assert!(a.durable_offset <= data.len() as u64);
                acked = acked.max(a.durable_offset);
            }
            Ok(Some(pb::ingest_response::Msg::Committed(info))) => break Ok(info),
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("stream ended without an outcome"),
            Err(status) => break Err(status),
        }
    };
    sender.abort();
    (object_id, acked, outcome)
}

/// C1: transient failures and latency on the object PUT are retried with
/// backoff; the commit lands once and reads back bit-exact.
#[tokio::test]
async fn c1_transient_put_failures_are_retried_to_one_object() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(200_000);
    plan.inject(Op::Put, Fault::Transient, 1);
    plan.inject(Op::Put, Fault::Latency(Duration::from_millis(20)), 1);
    let (_, _, outcome) = upload(&mut c, &new_id(), "c1-retry", &audio).await;
    let info = outcome.expect("committed after retries");
    assert_eq!(plan.calls(Op::Put), 2, "a failed attempt, then a slow one that passed");
    assert_eq!(plan.injected(Op::Put), 2);
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
    assert_eq!(object_files(server.data.path()).len(), 1);
    assert_eq!(listed(&mut c, "c1-retry").await.len(), 1);
}

/// C1: failures outlasting the retries answer UNAVAILABLE, commit nothing
/// and keep the durable bytes; a later finish commits them.
#[tokio::test]
async fn c1_persistent_put_failure_is_unavailable_and_resumable() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(300_000);
    let upload_id = new_id();
    plan.inject(Op::Put, Fault::Transient, 3);
    let (object_id, acked, outcome) = upload(&mut c, &upload_id, "c1-down", &audio).await;
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(status.message().contains("retry later"), "actionable: {status}");
    assert_eq!(plan.calls(Op::Put), 3, "bounded: exactly the policy's attempts");
    assert_eq!(acked, audio.len() as u64, "every byte was durable before the commit was tried");
    assert!(object_files(server.data.path()).is_empty(), "nothing half-written is visible");
    assert!(listed(&mut c, "c1-down").await.is_empty());
    assert_eq!(c.stat(pb::StatRequest { object_id: object_id.clone() }).await.unwrap_err().code(), Code::NotFound);
    // The storage recovers: the same upload commits from its journal.
    let (again, _, outcome) = upload(&mut c, &upload_id, "c1-down", &audio).await;
    let info = outcome.expect("commit after recovery");
    assert_eq!((again, info.object_id.clone()), (object_id.clone(), object_id));
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
}

/// C1: a store that hangs is given up on after the per-attempt deadline,
/// so the stream ends with UNAVAILABLE instead of hanging forever.
#[tokio::test]
async fn c1_a_hung_store_times_out_as_unavailable() {
    let policy = RetryPolicy { max_attempts: 2, op_timeout: Duration::from_millis(300), ..quick() };
    let (server, plan) = faulty_server(policy).await;
    let mut c = server.client().await;
    let audio = wav(100_000);
    let upload_id = new_id();
    plan.inject(Op::Put, Fault::Hang, 2);
    let (_, _, outcome) = upload(&mut c, &upload_id, "c1-hang", &audio).await;
    assert_eq!(outcome.unwrap_err().code(), Code::Unavailable);
    assert_eq!(plan.calls(Op::Put), 2);
    plan.release_hangs();
    assert!(listed(&mut c, "c1-hang").await.is_empty());
    let (_, _, outcome) = upload(&mut c, &upload_id, "c1-hang", &audio).await;
    assert_eq!(get(&mut c, &outcome.unwrap().object_id, None).await.unwrap(), audio);
}

/// C1 on reads: transient failures of a ranged GET are retried.
#[tokio::test]
async fn c1_transient_read_failures_are_retried() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(150_000);
    let info = ingest(&mut c, &new_id(), spec("c1-read", REC, "audio/wav"), &audio).await;
    plan.inject(Op::Get, Fault::Transient, 2);
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
    assert_eq!(plan.injected(Op::Get), 2);
}

/// C2: a short write reported as a success is caught by the length check
/// and written again; persistent short writes leave no object behind.
#[tokio::test]
async fn c2_short_writes_are_detected_and_never_committed() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(200_000);
    plan.inject(Op::Put, Fault::ShortWrite(1000), 1);
    let (_, _, outcome) = upload(&mut c, &new_id(), "c2-short", &audio).await;
    let info = outcome.expect("rewritten after the short write");
    assert_eq!(plan.calls(Op::Put), 2);
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);

    let upload_id = new_id();
    plan.inject(Op::Put, Fault::ShortWrite(1000), 3);
    let (object_id, _, outcome) = upload(&mut c, &upload_id, "c2-short", &audio).await;
    assert_eq!(outcome.unwrap_err().code(), Code::Unavailable);
    assert_eq!(c.stat(pb::StatRequest { object_id: object_id.clone() }).await.unwrap_err().code(), Code::NotFound);
    assert!(
        object_files(server.data.path()).iter().all(|p| !p.to_string_lossy().contains(&object_id)),
        "the short object was removed"
    );
    assert_eq!(listed(&mut c, "c2-short").await.len(), 1);
    let (_, _, outcome) = upload(&mut c, &upload_id, "c2-short", &audio).await;
    assert_eq!(get(&mut c, &outcome.unwrap().object_id, None).await.unwrap(), audio);
}

/// C3: the PUT lands but its answer is lost; the retry finds the object
/// (create-only write) and the upload commits exactly one object.
#[tokio::test]
async fn c3_a_lost_put_response_commits_exactly_one_object() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(200_000);
    plan.inject(Op::Put, Fault::LoseResponse, 1);
    let (_, _, outcome) = upload(&mut c, &new_id(), "c3-lost", &audio).await;
    let info = outcome.expect("the retry accepts the object already stored");
    assert_eq!(plan.calls(Op::Put), 2);
    assert_eq!(object_files(server.data.path()).len(), 1, "exactly one object");
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
}

/// C3 for a large object: the create-only rename from staging succeeds
/// but its answer is lost; the retry finds the object in place.
#[tokio::test]
async fn c3_a_lost_rename_response_commits_exactly_one_large_object() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(9_000_000); // 18 MB: past the single-PUT limit
    plan.inject(Op::Rename, Fault::LoseResponse, 1);
    let (_, _, outcome) = upload(&mut c, &new_id(), "c3-large", &audio).await;
    let info = outcome.expect("the retry accepts the renamed object");
    assert_eq!(plan.calls(Op::Rename), 2);
    assert_eq!(plan.calls(Op::Part), 3, "three 8 MiB parts, none sent twice");
    assert_eq!(files_under(&server.data.path().join("objects")).len(), 1, "one object, no staging leftover");
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
}

/// C2/C4 on a large object: a failed part is not retried here (S3's client
/// retries parts itself); the commit fails as UNAVAILABLE, nothing is
/// left in staging, and the next finish commits from the journal.
#[tokio::test]
async fn c1_a_failed_part_fails_the_commit_cleanly() {
    let (server, plan) = faulty_server(quick()).await;
    let mut c = server.client().await;
    let audio = wav(9_000_000);
    let upload_id = new_id();
    plan.inject(Op::Part, Fault::Transient, 1);
    let (_, _, outcome) = upload(&mut c, &upload_id, "c1-part", &audio).await;
    assert_eq!(outcome.unwrap_err().code(), Code::Unavailable);
    assert!(files_under(&server.data.path().join("objects")).is_empty(), "no staging leftover");
    let (_, _, outcome) = upload(&mut c, &upload_id, "c1-part", &audio).await;
    assert_eq!(get(&mut c, &outcome.unwrap().object_id, None).await.unwrap(), audio);
}

/// C4: a 403 (policy changed) or 404 (bucket gone) fails at once, with no
/// retry storm and nothing committed; the upload is kept for later.
#[tokio::test]
async fn c4_permission_and_missing_bucket_fail_fast() {
    let (server, plan) = faulty_server(RetryPolicy { max_attempts: 5, ..quick() }).await;
    let mut c = server.client().await;
    let audio = wav(100_000);
    for fault in [Fault::PermissionDenied, Fault::NotFound] {
        let before = plan.calls(Op::Put);
        let upload_id = new_id();
        plan.inject(Op::Put, fault.clone(), 1);
        let (_, acked, outcome) = upload(&mut c, &upload_id, "c4-denied", &audio).await;
        let status = outcome.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{fault:?}: {status}");
        assert!(status.message().contains("operator"), "{fault:?}: says who must act: {status}");
        assert_eq!(plan.calls(Op::Put) - before, 1, "{fault:?}: no retry");
        assert_eq!(acked, audio.len() as u64);
        let (_, _, outcome) = upload(&mut c, &upload_id, "c4-denied", &audio).await;
        assert_eq!(get(&mut c, &outcome.unwrap().object_id, None).await.unwrap(), audio);
    }
    assert_eq!(listed(&mut c, "c4-denied").await.len(), 2);
}

/// A tmpfs of a given size, unmounted on drop. Needs root (or
/// CAP_SYS_ADMIN); `None` when mounting is not allowed here.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }

    fn resize(&self, mib: u64) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remount");
    }

    /// Bytes in use, as the file system counts them.
    fn used_mib(&self) -> u64 {
        let out =
            std::process::Command::new("df").args(["--output=used", "-B1M"]).arg(self.dir.path()).output().unwrap();
        String::from_utf8(out.stdout).unwrap().lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: the server's last file handles may still be closing.
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes to `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

/// C6: the disk fills while a call streams in (the journal hits ENOSPC):
/// RESOURCE_EXHAUSTED before any ack of the lost bytes, no torn visible
/// file; once space returns the upload resumes and commits bit-exact. Then
/// an upload whose journal just fits commits too: the commit links the
/// journal's sealed segments into place and needs no second copy. Last,
/// the disk fills before a finish, whose last segment finds no room.
#[tokio::test]
async fn c6_disk_full_is_resource_exhausted_before_acking_and_resumes() {
    let Some(fs) = SmallFs::mount(12) else {
        eprintln!("SKIPPED c6_disk_full: cannot mount a tmpfs here (needs root); disk-full is untested");
        return;
    };
    let data = tempfile::tempdir_in(fs.dir.path()).unwrap();
    let server = TestServer::start_in(data, |_| {}).await;
    let root = server.data.path().to_owned();
    let mut c = server.client().await;
    let audio = wav(8_000_000); // 16 MB into a 12 MiB file system
    let upload_id = new_id();
    let (object_id, acked, outcome) = upload(&mut c, &upload_id, "c6-full", &audio).await;
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("storage is full"), "{status}");
    assert!(acked < audio.len() as u64);
    assert!(object_files(&root).is_empty(), "no object, torn or whole");

    fs.resize(64);
    // Listed once there is room again: a List is audited, and with the
    // disk full the audit trail refuses it (fails closed).
    assert!(listed(&mut c, "c6-full").await.is_empty(), "nothing half-written is visible");
    let mut s = Stream::start(&mut c).await.unwrap();
    let (again, durable, _) = s.open(&upload_id, spec("c6-full", REC, "audio/wav")).await.unwrap();
    assert_eq!(again, object_id);
    assert!(durable >= acked, "durable offset {durable} behind an ack of {acked}");
    s.data_chunks(durable, &audio[durable as usize..]).await;
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    let info = s.committed().await.unwrap();
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);

    // Room for the journal of a second upload is room for its object: the
    // journal's segments file becomes the object, so the commit writes no
    // second copy (before, this needed twice the space and failed).
    let small = wav(3_000_000); // 6 MB
    fs.resize(fs.used_mib() + 7);
    let second = new_id();
    let (second_object, acked, outcome) = upload(&mut c, &second, "c6-full", &small).await;
    let info = outcome.expect("the commit needs no room beyond the journal's");
    assert_eq!((acked, info.object_id.clone()), (small.len() as u64, second_object));
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), small);
    assert_eq!(files_under(&root.join("objects")).len(), 2);
    assert_eq!(listed(&mut c, "c6-full").await.len(), 2);

    // The disk fills between the last ack and the finish, whose last
    // segment (here all but two bytes of a segment) then has no room:
    // RESOURCE_EXHAUSTED, nothing visible, and a finish once space
    // returns commits.
    let third = new_id();
    let audio = wav(98_281); // 3 × 64 KiB − 2 bytes of WAV
    assert_eq!(audio.len(), 3 * 64 * 1024 - 2);
    let mut s = Stream::start(&mut c).await.unwrap();
    let (third_object, _, _) = s.open(&third, spec("c6-full", REC, "audio/wav")).await.unwrap();
    s.data_chunks(0, &audio).await;
    assert_eq!(s.acked(audio.len() as u64).await.unwrap(), audio.len() as u64);
    let filler = root.join("filler");
    fill(&filler);
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    let status = s.error().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(files_under(&root.join("objects")).iter().all(|p| !p.to_string_lossy().contains(&third_object)));
    std::fs::remove_file(&filler).unwrap();
    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&third, spec("c6-full", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, audio.len() as u64, "every acknowledged byte kept");
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    let info = s.committed().await.unwrap();
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
    drop(server);
}
