//! Issue #6 points 5 and 7, for operators: `recvault config check` (file,
//! env overrides, redaction, one-line refusals), JSON logs, Prometheus
//! metrics on the HTTP port, and readiness (`/ready` and the gRPC health
//! service) following the root key (D4), the catalog and the store.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use recvault::api::pb;
use recvault::config::Config;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::*;
use crate::web::http_get;

fn recvault(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recvault"))
        .args(args)
        .env_remove("RECVAULT_CONFIG")
        .env_remove("RECVAULT_LOG_FORMAT")
        .envs(envs.iter().copied())
        .output()
        .expect("run recvault")
}

/// The one-line error of a refused check.
fn refused(out: Output) -> String {
    assert!(!out.status.success(), "expected a refusal, got {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err:?}");
    err
}

fn private_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn config_check_prints_the_effective_config_with_every_secret_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    private_file(&d.join("s3.id"), "GKexampleid\n");
    private_file(&d.join("s3.secret"), "s3-secret-value\n");
    private_file(&d.join("hsm.pin"), "4711-pin\n");
    std::fs::write(d.join("libvendor.so"), b"module").unwrap();
    let config = format!(
        "data_dir = \"/var/lib/recvault\"\n\
         [catalog]\nbackend = \"postgres\"\nurl = \"host=db user=recvault password='pg pass' dbname=recvault\"\n\
         [storage]\nbackend = \"s3\"\nbucket = \"from-file\"\nendpoint = \"http://garage:3900\"\nallow_http = true\n\
         write_once = \"check-first\"\naccess_key_id_file = \"{id}\"\nsecret_access_key_file = \"{secret}\"\n\
         [root_key]\nprovider = \"pkcs11\"\nmodule = \"{module}\"\ntoken_label = \"recvault\"\n\
         pin_file = \"{pin}\"\nkey_label = \"root-1\"\n",
        id = d.join("s3.id").display(),
        secret = d.join("s3.secret").display(),
        module = d.join("libvendor.so").display(),
        pin = d.join("hsm.pin").display(),
    );
    let file = d.join("recvault.toml");
    std::fs::write(&file, &config).unwrap();
    let out = recvault(
        &["config", "check", "--config", file.to_str().unwrap(), "--http-listen", "127.0.0.1:9999"],
        &[
            ("RECVAULT__STORAGE__BUCKET", "from-env"),
            ("RECVAULT__LOG__FORMAT", "json"),
            ("RECVAULT__HTTP__METRICS", "false"),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    for secret in ["pg pass", "s3-secret-value", "GKexampleid", "4711-pin"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    assert!(printed.contains("# env: RECVAULT__STORAGE__BUCKET"), "{printed}");
    // What was printed is itself a valid configuration: the effective one,
    // with env overrides and flags applied and the password redacted.
    let effective = Config::from_toml(&printed).expect("the printed configuration parses");
    assert_eq!(effective.storage.bucket.as_deref(), Some("from-env"), "env beats the file");
    assert_eq!(effective.log.format, recvault::config::LogFormat::Json);
    assert!(!effective.http.metrics);
    assert_eq!(effective.http.listen.to_string(), "127.0.0.1:9999", "flags beat env and file");
    assert_eq!(effective.catalog.url.as_deref(), Some("host=db user=recvault password=[redacted] dbname=recvault"));
    assert_eq!(effective.retention, Config::default().retention, "defaults are filled in");

    // Without a file: the embedded defaults.
    let out = recvault(&["config", "check"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(Config::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap(), Config::default());
}

#[test]
fn config_check_refuses_bad_configs_in_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recvault.toml");
    let check = |config: &str, envs: &[(&str, &str)]| {
        std::fs::write(&file, config).unwrap();
        recvault(&["config", "check", "--config", file.to_str().unwrap()], envs)
    };
    let err = refused(check("[storage]\nbukket = \"x\"\n", &[]));
    assert!(err.contains("storage.bukket") && err.contains("unknown field"), "{err}");
    let err = refused(check("", &[("RECVAULT__STORAGE__BUKKET", "x")]));
    assert!(err.contains("storage.bukket") && err.contains("RECVAULT__STORAGE__BUKKET"), "{err}");
    let err = refused(check("", &[("RECVAULT__INGEST__COMMIT_BYTES", "lots")]));
    assert!(err.contains("RECVAULT__INGEST__COMMIT_BYTES") && err.contains("ingest.commit_bytes"), "{err}");
    let err = refused(check("[ingest]\ncommit_interval = \"soon\"\n", &[]));
    assert!(err.contains("ingest.commit_interval"), "{err}");
    let err = refused(check("[log]\nformat = \"xml\"\n", &[]));
    assert!(err.contains("log.format"), "{err}");
    // A syntax error names line and column but never quotes the line,
    // which may hold a password.
    let err = refused(check("[catalog]\nbackend = \"postgres\"\nurl = \"host=db password=hunter2\n", &[]));
    assert!(err.contains("line 3") && !err.contains("hunter2"), "{err}");

    // Secret files: checked like the server checks them, unless skipped.
    let url_file = dir.path().join("pg.url");
    std::fs::write(&url_file, "host=db password=hunter2\n").unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = format!("[catalog]\nbackend = \"postgres\"\nurl_file = \"{}\"\n", url_file.display());
    let err = refused(check(&config, &[]));
    assert!(err.contains("catalog.url_file") && err.contains("chmod 600") && !err.contains("hunter2"), "{err}");
    std::fs::write(&file, &config).unwrap();
    let out = recvault(&["config", "check", "--skip-files", "--config", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(check(&config, &[]).status.success());
    let missing = "[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n";
    let err = refused(check(missing, &[]));
    assert!(err.contains("tls.key_file"), "{err}");
}

/// A Prometheus scrape: series (with labels) to values.
async fn scrape(http: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let reply = http_get(http, "/metrics", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.header("content-type").starts_with("text/plain; version=0.0.4"));
    reply
        .text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// Metrics are process-wide counters, so this runs the real binary: a
/// process of its own, where no other test moves them.
#[tokio::test]
async fn metrics_count_ingest_reads_and_shreds() {
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(data.path());
    let http = server.http.expect("the HTTP port");
    let mut c = server.client().await;
    let before = scrape(http).await;
    let audio = wav(200_000);
    let call =
        ingest(&mut c, &new_id(), spec("metrics-cust-1", pb::ContentKind::CallRecording, "audio/wav"), &audio).await;
    let note = b"short transcript";
    put(&mut c, spec("metrics-cust-1", pb::ContentKind::ChatTranscript, "text/plain"), note).await.unwrap();
    read_for(&mut c, &call.object_id, pb::Purpose::Coaching).await.unwrap();
    read_for(&mut c, &call.object_id, pb::Purpose::Legal).await.unwrap();
    get(&mut c, &call.object_id, Some((0, Some(99)))).await.unwrap();
    let status = shred(&mut c, "metrics-cust-1", "").await.unwrap();
    assert_eq!(status.state, pb::CustomerState::Shredded as i32);
    let reply = http_get(http, "/metrics", &[]).await;
    assert!(!reply.text().contains("metrics-cust-1"), "no customer id in any label");
    let after = scrape(http).await;
    let delta = |series: &str| after[series] - before.get(series).copied().unwrap_or(0.0);
    assert_eq!(delta("recvault_ingest_bytes_total"), (audio.len() + note.len()) as f64);
    assert_eq!(delta("recvault_ingest_streams_total"), 1.0);
    assert_eq!(after["recvault_ingest_streams_open"], 0.0, "the stream closed");
    assert_eq!(delta("recvault_objects_committed_total"), 2.0);
    let acks = delta("recvault_ingest_ack_latency_seconds_count");
    assert!(acks >= 1.0, "every ack of the stream is timed");
    assert_eq!(delta("recvault_ingest_ack_latency_seconds_bucket{le=\"+Inf\"}"), acks);
    assert!(delta("recvault_ingest_ack_latency_seconds_sum") > 0.0);
    assert_eq!(delta("recvault_reads_total{purpose=\"coaching\"}"), 1.0);
    assert_eq!(delta("recvault_reads_total{purpose=\"legal\"}"), 1.0);
    assert_eq!(delta("recvault_reads_total{purpose=\"quality-review\"}"), 1.0);
    assert_eq!(delta("recvault_reads_total{purpose=\"data-subject-request\"}"), 0.0);
    assert_eq!(delta("recvault_shreds_total{stage=\"requested\"}"), 1.0);
    assert_eq!(delta("recvault_shreds_total{stage=\"completed\"}"), 1.0);
    assert_eq!(delta("recvault_store_errors_total"), 0.0);
    assert_eq!(delta("recvault_catalog_errors_total"), 0.0);

    // A retention sweep through the API is counted. (At least one: the
    // server's own start-up sweep runs when it likes.)
    let ok = "recvault_retention_sweeps_total{result=\"ok\"}";
    c.run_retention(pb::RunRetentionRequest { dry_run: false }).await.unwrap();
    let swept = scrape(http).await;
    assert!(swept[ok] - after[ok] >= 1.0, "{} sweeps counted", swept[ok] - after[ok]);
    assert_eq!(swept["recvault_retention_sweeps_total{result=\"failed\"}"], 0.0);
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    let server = TestServer::start_with(|c| c.http.metrics = false).await;
    let http = server.http.expect("http port");
    assert_eq!(http_get(http, "/metrics", &[]).await.status, 404);
    assert_eq!(http_get(http, "/live", &[]).await.status, 200);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let config = format!("{CHILD_CONFIG}[log]\nformat = \"json\"\n");
    let server = ChildServer::spawn_with(&data.path().join("data"), &config, &[("RECVAULT_LOG", "info")], Some(&log));
    // A served call means the server is past its first readiness probe,
    // which logs "ready".
    server.client().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    for l in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
    }
    assert!(lines.iter().any(|l| l["message"] == "ready" && l["level"] == "INFO"), "{text}");
}

async fn health(addr: std::net::SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let r = client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Checks /ready and the gRPC health service agree: ready, or not ready
/// for a reason containing `reason`.
async fn assert_ready(server: &TestServer, reason: Option<&str>) {
    let http = server.http.expect("http port");
    let reply = http_get(http, "/ready", &[]).await;
    let want = if reason.is_some() { ServingStatus::NotServing } else { ServingStatus::Serving };
    match reason {
        None => assert_eq!((reply.status, reply.text().as_str()), (200, "ready\n")),
        Some(r) => {
            assert_eq!(reply.status, 503, "{}", reply.text());
            assert!(reply.text().starts_with("not ready: ") && reply.text().contains(r), "{}", reply.text());
        }
    }
    // /ready has just set the health status from the same probe.
    assert_eq!(health(server.addr, "").await, want);
    assert_eq!(health(server.addr, "recvault.v1.Recvault").await, want);
    assert_eq!(http_get(http, "/live", &[]).await.status, 200, "alive either way");
}

#[tokio::test]
async fn readiness_follows_the_object_store() {
    let server = TestServer::start().await;
    assert_ready(&server, None).await;
    // The objects directory vanishes (a volume that is not mounted).
    let objects = server.data.path().join("objects");
    let moved = server.data.path().join("objects.away");
    std::fs::rename(&objects, &moved).unwrap();
    assert_ready(&server, Some("object store unreachable")).await;
    std::fs::rename(&moved, &objects).unwrap();
    assert_ready(&server, None).await;
}

/// D4: a catalog whose known-answer value the root key does not open
/// (restored from another installation, tampered with) makes the server
/// sealed: not ready, until the right value is back.
#[tokio::test]
async fn d4_readiness_reports_sealed_when_the_root_key_no_longer_opens_the_catalog() {
    let server = TestServer::start().await;
    assert_ready(&server, None).await;
    let db = rusqlite::Connection::open(server.data.path().join("catalog.sqlite")).unwrap();
    let original: Vec<u8> =
        db.query_row("SELECT value FROM meta WHERE key = 'root_check_v1'", [], |r| r.get(0)).unwrap();
    let mut foreign = original.clone();
    let last = foreign.len() - 1;
    foreign[last] ^= 0x01;
    db.execute("UPDATE meta SET value = ?1 WHERE key = 'root_check_v1'", [&foreign]).unwrap();
    assert_ready(&server, Some("sealed")).await;
    db.execute("UPDATE meta SET value = ?1 WHERE key = 'root_check_v1'", [&original]).unwrap();
    assert_ready(&server, None).await;
}

#[tokio::test]
async fn readiness_follows_the_postgres_catalog() {
    let Some(conn) = crate::postgres::test_pg() else { return };
    let schema = format!("recvault_ready_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = crate::postgres::DropSchema { conn: conn.clone(), schema: schema.clone() };
    let catalog = recvault::config::CatalogSection {
        backend: recvault::config::CatalogBackend::Postgres,
        url: Some(conn.clone()),
        url_file: None,
        schema: schema.clone(),
    };
    let server = TestServer::start_with(move |cfg| cfg.catalog = catalog).await;
    assert_ready(&server, None).await;
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // The server's search_path no longer finds its tables.
    client.batch_execute(&format!("ALTER SCHEMA {schema} RENAME TO {schema}_gone")).await.unwrap();
    assert_ready(&server, Some("catalog unreachable")).await;
    client.batch_execute(&format!("ALTER SCHEMA {schema}_gone RENAME TO {schema}")).await.unwrap();
    assert_ready(&server, None).await;
}
