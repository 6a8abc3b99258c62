//! Two replicas, as two `recvault serve` processes, sharing one PostgreSQL
//! catalog and one S3 bucket (a real Garage node) — issue #6 point 4:
//!
//! - an upload acknowledged by replica 1, which then dies (`kill -9`),
//!   resumes on replica 2 from the durable offset: the journal lives in
//!   the shared catalog (`ingest.journal = "auto"` picks it with
//!   PostgreSQL), not on replica 1's disk;
//! - a shred accepted by replica 2 makes replica 1 refuse that customer's
//!   content at once (every read checks the shared catalog) and stops
//!   replica 1's live stream and a read it is streaming (LISTEN/NOTIFY);
//! - retention sweeps run on one replica at a time (an advisory lock),
//!   and a replica that dies mid-sweep does not block the others.

use std::path::Path;
use std::time::{Duration, Instant};

use recvault::api::pb;
use recvault::config::{CatalogBackend, CatalogSection, Config, StorageSection};
use recvault::store::WriteOnce;
use tonic::Code;

use crate::common::*;
use crate::postgres::{DropSchema, test_pg};
use crate::s3::Garage;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;

fn replica_config(pg: &str, schema: &str, storage: StorageSection) -> String {
    let mut cfg = Config {
        catalog: CatalogSection {
            backend: CatalogBackend::Postgres,
            url: Some(pg.into()),
            url_file: None,
            schema: schema.into(),
        },
        storage,
        ..Config::default()
    };
    cfg.retention.shred_grace = Duration::ZERO;
    toml::to_string(&cfg).expect("config as TOML")
}

/// Whether some session holds the sweep lock of `schema` (the key
/// `Catalog::try_sweep_lock` takes on PostgreSQL).
async fn sweep_lock_held(pg: &tokio_postgres::Client, schema: &str) -> bool {
    pg.query_one(
        "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
         AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext($1)::bigint",
        &[&format!("recvault.sweep:{schema}")],
    )
    .await
    .expect("pg_locks")
    .get::<_, i64>(0)
        > 0
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn private_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).expect("data dir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_uploads_shreds_and_one_sweeper() {
    let Some(pg) = test_pg() else { return };
    let Some(garage) = Garage::start("two_replicas_share_uploads_shreds_and_one_sweeper") else { return };
    garage.store(WriteOnce::CheckFirst).await; // the S3 API answers
    let schema = format!("recvault_rep_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = DropSchema { conn: pg.clone(), schema: schema.clone() };
    let (admin, connection) = tokio_postgres::connect(&pg, tokio_postgres::NoTls).await.expect("postgres");
    tokio::spawn(connection);

    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(&pg, &schema, garage.storage_section(dir.path()));
    let (dir1, dir2) = (dir.path().join("replica-1"), dir.path().join("replica-2"));
    // Replica 1 enters its first sweep at start and stays in it, holding
    // the sweep lock, until it dies.
    let mut r1 = ChildServer::spawn_with(
        &dir1,
        &config,
        &[("FAILPOINTS", "sweep-locked=sleep(600000)")],
        Some(&dir.path().join("replica-1.log")),
    );
    eventually("replica 1 holds the sweep lock", || sweep_lock_held(&admin, &schema)).await;
    // Replicas share the root key (a copied key file here; one HSM key in
    // production, docs/REPLICAS.md).
    private_dir(&dir2);
    std::fs::copy(dir1.join("root.key"), dir2.join("root.key")).expect("share the root key");
    let r2 = ChildServer::spawn_with(&dir2, &config, &[], Some(&dir.path().join("replica-2.log")));
    // Tokens live in the catalog: one works on both replicas.
    let token = r1.operator_token().await;
    let mut c1 = connect(&r1.url(), &token).await;
    let mut c2 = connect(&r2.url(), &token).await;

    // ---- one sweeper at a time ----
    let busy = c2.run_retention(pb::RunRetentionRequest { dry_run: false }).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(busy.message().contains("another replica is running the retention sweep"), "{busy:?}");
    // A dry run changes nothing and is not locked out.
    c2.run_retention(pb::RunRetentionRequest { dry_run: true }).await.expect("dry run");

    // ---- a shred accepted by replica 2 takes effect on replica 1 ----
    let audio = wav(6 << 20); // 12 MiB: more than the HTTP/2 windows hold
    let gone = ingest(&mut c1, &new_id(), spec("crm:gone", REC, "audio/wav"), &audio).await;
    assert_eq!(get(&mut c2, &gone.object_id, None).await.unwrap(), audio, "replica 2 reads what replica 1 stored");
    // Replica 1 is streaming that recording out, and taking a live call.
    let mut reading = c1
        .get(pb::GetRequest {
            object_id: gone.object_id.clone(),
            purpose: pb::Purpose::Legal as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = reading.message().await.unwrap().expect("first bytes").data.len();
    let mut live = Stream::start(&mut c1).await.unwrap();
    live.open(&new_id(), spec("crm:gone", REC, "audio/wav")).await.unwrap();
    live.data(0, &audio[..64_000]).await;
    live.acked(64_000).await.unwrap();
    let shredded = shred(&mut c2, "crm:gone", "dpo").await.expect("shred on replica 2");
    assert_eq!(shredded.state, pb::CustomerState::Shredded as i32);
    // Every read on replica 1 from now on is refused.
    let refused = get(&mut c1, &gone.object_id, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let stat = c1.stat(pb::StatRequest { object_id: gone.object_id.clone() }).await.unwrap_err();
    assert_eq!(stat.code(), Code::FailedPrecondition, "{stat:?}");
    // The read under way stops before its end...
    let err = loop {
        match reading.message().await {
            Ok(Some(m)) => received += m.data.len(),
            Ok(None) => panic!("replica 1 streamed the whole recording ({received} bytes) after the shred"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(received < audio.len());
    // ...and so does the live call, without another byte from the caller.
    let stopped = live.error().await;
    assert_eq!(stopped.code(), Code::FailedPrecondition, "{stopped:?}");
    assert!(stopped.message().contains("shred"), "{stopped:?}");

    // ---- an upload acknowledged by replica 1 resumes on replica 2 ----
    let call = wav(200_000);
    let upload_id = new_id();
    let mut s1 = Stream::start(&mut c1).await.unwrap();
    let (object_id, durable, _) = s1.open(&upload_id, spec("crm:keep", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, 0);
    let half = 150_000;
    s1.data_chunks(0, &call[..half]).await;
    let acked = s1.acked(half as u64).await.unwrap();
    r1.kill9();
    let mut s2 = Stream::start(&mut c2).await.unwrap();
    let (resumed_id, durable, committed) = s2.open(&upload_id, spec("crm:keep", REC, "audio/wav")).await.unwrap();
    assert_eq!(resumed_id, object_id);
    assert!(!committed);
    assert!(durable >= acked, "replica 2 resumes at {durable}, below the {acked} bytes replica 1 acknowledged");
    s2.data_chunks(durable, &call[durable as usize..]).await;
    s2.finish(Some(sha256(&call)), call.len() as u64).await;
    let info = s2.committed().await.expect("commit on replica 2");
    assert_eq!(info.object_id, object_id);
    assert_eq!(get(&mut c2, &object_id, None).await.unwrap(), call, "bit-exact after the resume");
    let journal: i64 =
        admin.query_one(&format!("SELECT count(*) FROM {schema}.journal_chunks"), &[]).await.unwrap().get(0);
    assert_eq!(journal, 0, "a committed upload leaves no journal behind");

    // ---- replica 1 died inside its sweep: its lock went with it ----
    eventually("replica 2 may sweep once replica 1 is gone", || {
        let mut c = c2.clone();
        async move { c.run_retention(pb::RunRetentionRequest { dry_run: false }).await.is_ok() }
    })
    .await;
}

/// The catalog-held journal on its own (SQLite here, so it runs without
/// PostgreSQL): acknowledged bytes survive a restart, nothing lands in
/// `spool/`, a newer stream fences the older one off, and a commit leaves
/// no records behind. B1 and B4 of the test plan with `journal = "catalog"`.
#[tokio::test]
async fn b1_b4_the_catalog_journal_resumes_and_fences() {
    let tune = |cfg: &mut Config| cfg.ingest.journal = recvault::config::JournalMode::Catalog;
    let server = TestServer::start_with(tune).await;
    let mut c = server.client().await;
    let call = wav(300_000);
    let upload_id = new_id();
    let mut first = Stream::start(&mut c).await.unwrap();
    let (object_id, _, _) = first.open(&upload_id, spec("crm:cj", REC, "audio/wav")).await.unwrap();
    first.data_chunks(0, &call[..200_000]).await;
    let acked = first.acked(200_000).await.unwrap();
    // A second stream takes the upload over; the first is told so.
    let mut second = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = second.open(&upload_id, spec("crm:cj", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, acked);
    assert_eq!(first.error().await.code(), Code::Aborted);
    drop(second);
    let data = server.stop().await;
    assert!(files_under(&data.path().join("spool")).is_empty(), "no journal file: the catalog holds it");
    let server = TestServer::start_in(data, tune).await;
    let mut c = server.client().await;
    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&upload_id, spec("crm:cj", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, acked, "the acknowledged bytes survived the restart");
    s.data_chunks(durable, &call[durable as usize..]).await;
    s.finish(Some(sha256(&call)), call.len() as u64).await;
    assert_eq!(s.committed().await.unwrap().object_id, object_id);
    assert_eq!(get(&mut c, &object_id, None).await.unwrap(), call);
    let catalog = rusqlite::Connection::open(server.data.path().join("catalog.sqlite")).unwrap();
    let left: i64 = catalog.query_row("SELECT count(*) FROM journal_chunks", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0, "the commit took the journal's records with it");
}

/// The catalog-held journal never has a blocking thread wait on the
/// runtime: with one blocking thread in all, an upload still opens,
/// resumes, commits (its object sealed from the journal into the local
/// store, which writes on the blocking pool too) and reads back. The
/// journal was once opened on a blocking thread that waited on catalog
/// calls, which SQLite's reads answer from the blocking pool too, so this
/// hung at the first open; the commit's replay also fed the store's writer
/// from a blocking thread through a bounded channel.
#[test]
fn the_catalog_journal_commits_with_a_single_blocking_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let outcome = rt.block_on(async {
        let run = async {
            let tune = |cfg: &mut Config| cfg.ingest.journal = recvault::config::JournalMode::Catalog;
            let server = TestServer::start_with(tune).await;
            let mut c = server.client().await;
            let call = wav(8 << 20);
            let upload_id = new_id();
            let mut first = Stream::start(&mut c).await.unwrap();
            let (object_id, _, _) = first.open(&upload_id, spec("crm:cj1", REC, "audio/wav")).await.unwrap();
            first.data_chunks(0, &call[..5 << 20]).await;
            first.acked(5 << 20).await.unwrap();
            drop(first);
            let mut s = Stream::start(&mut c).await.unwrap();
            let (_, durable, _) = s.open(&upload_id, spec("crm:cj1", REC, "audio/wav")).await.unwrap();
            assert_eq!(durable, 5 << 20, "the resumed stream replayed the journal to its end");
            s.data_chunks(durable, &call[durable as usize..]).await;
            s.finish(Some(sha256(&call)), call.len() as u64).await;
            assert_eq!(s.committed().await.unwrap().object_id, object_id);
            assert!(get(&mut c, &object_id, None).await.unwrap() == call, "the object reads back bit-exact");
        };
        tokio::time::timeout(Duration::from_secs(300), run).await
    });
    // Dropping a runtime waits for its blocking tasks; one stuck for ever
    // would hang the test instead of failing it.
    rt.shutdown_background();
    outcome.expect("an upload through the catalog journal hung with one blocking thread");
}
