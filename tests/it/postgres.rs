//! The whole service on the PostgreSQL catalog (the machine's server,
//! 127.0.0.1:5432, database `test`; override with `RECVAULT_TEST_PG`):
//! ingest, reads, listing, tokens, a shred with its certificate, and a
//! restart that finds everything where it was. The catalog's own
//! conformance suite runs in `src/catalog/postgres.rs`.

use recvault::api::pb;
use recvault::config::{CatalogBackend, CatalogSection};
use tonic::Code;

use crate::common::*;

const DEFAULT_TEST_PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

pub fn test_pg() -> Option<String> {
    if std::env::var("RECVAULT_SKIP_PG").as_deref() == Ok("1") {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "!!!!! SKIPPED: PostgreSQL server test (RECVAULT_SKIP_PG=1)");
        return None;
    }
    Some(std::env::var("RECVAULT_TEST_PG").unwrap_or_else(|_| DEFAULT_TEST_PG.to_owned()))
}

/// Drops the test's schema when the test ends, also on a panic.
pub struct DropSchema {
    pub conn: String,
    pub schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let (conn, schema) = (self.conn.clone(), self.schema.clone());
        // A thread of its own: Drop may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                    tokio::spawn(connection);
                    // A server of the test may have been stopped inside a
                    // transaction whose rollback cannot be sent now (the
                    // test's runtime is blocked on this drop): end every
                    // session holding a lock in the schema, then drop it.
                    let _ = client
                        .execute(
                            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
                             JOIN pg_class c ON c.oid = l.relation
                             JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
                            &[&schema],
                        )
                        .await;
                    let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn the_service_runs_on_the_postgres_catalog() {
    let Some(conn) = test_pg() else { return };
    let schema = format!("recvault_it_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = DropSchema { conn: conn.clone(), schema: schema.clone() };
    let catalog = CatalogSection {
        backend: CatalogBackend::Postgres,
        url: Some(conn.clone()),
        url_file: None,
        schema: schema.clone(),
    };
    let tune = {
        let catalog = catalog.clone();
        move |cfg: &mut recvault::config::Config| cfg.catalog = catalog
    };
    let server = TestServer::start_with(tune.clone()).await;
    assert!(!server.data.path().join("catalog.sqlite").exists(), "no SQLite catalog beside a PostgreSQL one");
    let mut c = server.client().await;
    let audio = wav(300_000);
    let call = ingest(&mut c, &new_id(), spec("pg-1", pb::ContentKind::CallRecording, "audio/wav"), &audio).await;
    let chat = put(&mut c, spec("pg-1", pb::ContentKind::ChatTranscript, "text/plain"), b"hello").await.unwrap();
    let other = put(&mut c, spec("pg-2", pb::ContentKind::ChatTranscript, "text/plain"), b"keep me").await.unwrap();
    assert_eq!(get(&mut c, &call.object_id, Some((1000, Some(1999)))).await.unwrap(), &audio[1000..2000]);
    let listed = c
        .list(pb::ListRequest { customer_id: "pg-1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .objects;
    assert_eq!(listed.iter().map(|o| o.object_id.as_str()).collect::<Vec<_>>(), [&chat.object_id, &call.object_id]);

    // A restart on the same data directory and schema finds everything.
    let data = server.stop().await;
    let server = TestServer::start_in(data, tune).await;
    let mut c = server.client().await;
    assert_eq!(get(&mut c, &call.object_id, None).await.unwrap(), audio);

    let status = shred(&mut c, "pg-1", "").await.unwrap();
    assert_eq!(status.state, pb::CustomerState::Shredded as i32);
    assert_eq!(status.objects_shredded, 2);
    let public = std::fs::read_to_string(server.data.path().join("signing.pub")).unwrap();
    let key = recvault::retention::certificate::parse_public_key(&public).unwrap();
    recvault::retention::certificate::verify(&status.certificate_json, &key).unwrap();
    for id in [&call.object_id, &chat.object_id] {
        assert_eq!(get(&mut c, id, None).await.unwrap_err().code(), Code::FailedPrecondition);
    }
    assert_eq!(get(&mut c, &other.object_id, None).await.unwrap(), b"keep me");

    // No wrapped key of the shredded customer is left in any row.
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let left: i64 = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.customer_keys k JOIN {schema}.customers c USING (customer_ref)
                   WHERE c.customer_id = 'pg-1')
                 + (SELECT count(*) FROM {schema}.objects WHERE customer_id = 'pg-1' AND wrapped_dek IS NOT NULL)"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
