//! SQLite catalog: the embedded default, one file in the data directory.
//!
//! WAL mode with `synchronous=FULL` (a commit survives power loss) and
//! `secure_delete=ON`, so destroyed wrapped keys are overwritten in the
//! database file; after a shred the WAL is checkpointed and truncated so no
//! old page holding a destroyed key stays in it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    Catalog, CatalogError, CustomerKeyRecord, CustomerRecord, CustomerState, ListFilter, PageCursor, ShredReport,
    StoredObject, UploadRecord,
};
use crate::model::{
    ContentKind, CustomerId, CustomerRef, Direction, Interaction, ObjectId, ObjectRecord, ObjectSpec, UploadId,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    customer_ref   BLOB PRIMARY KEY,
    customer_id    TEXT NOT NULL UNIQUE,
    state          TEXT NOT NULL,
    active_version INTEGER NOT NULL,
    canary         BLOB,
    created_at_ms  INTEGER NOT NULL,
    shredded_at_ms INTEGER,
    shred_reason   TEXT
);
CREATE TABLE IF NOT EXISTS customer_keys (
    customer_ref BLOB NOT NULL REFERENCES customers(customer_ref),
    version      INTEGER NOT NULL,
    root_key_id  TEXT NOT NULL,
    wrapped_key  BLOB NOT NULL,
    PRIMARY KEY (customer_ref, version)
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id     TEXT PRIMARY KEY,
    object_id     TEXT NOT NULL UNIQUE,
    customer_ref  BLOB NOT NULL REFERENCES customers(customer_ref),
    spec          TEXT NOT NULL,
    key_version   INTEGER NOT NULL,
    wrapped_dek   BLOB,
    nonce_prefix  BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    committed     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS objects (
    object_id      TEXT PRIMARY KEY,
    upload_id      TEXT NOT NULL UNIQUE,
    customer_ref   BLOB NOT NULL REFERENCES customers(customer_ref),
    customer_id    TEXT NOT NULL,
    kind           INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    shredded       INTEGER NOT NULL DEFAULT 0,
    -- everything below is cleared when the object is shredded
    content_type   TEXT,
    size           INTEGER,
    sha256         BLOB,
    interaction_id TEXT,
    channel        TEXT,
    agent_id       TEXT,
    queue          TEXT,
    direction      INTEGER,
    started_at_ms  INTEGER,
    tags           TEXT,
    key_version    INTEGER,
    wrapped_dek    BLOB
);
CREATE INDEX IF NOT EXISTS objects_by_created ON objects(created_at_ms DESC, object_id DESC);
CREATE INDEX IF NOT EXISTS objects_by_customer ON objects(customer_id, created_at_ms DESC, object_id DESC);
CREATE INDEX IF NOT EXISTS objects_by_interaction ON objects(interaction_id, created_at_ms DESC, object_id DESC);
"#;

/// The SQLite catalog. One connection behind a mutex; every call runs on
/// the blocking pool.
#[derive(Clone)]
pub struct SqliteCatalog {
    conn: Arc<Mutex<Connection>>,
}

fn backend(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Backend(e.to_string())
}

impl SqliteCatalog {
    /// Opens (creating if needed) the catalog file.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        Self::init(Connection::open(path).map_err(backend)?)
    }

    /// A private in-memory catalog, for unit tests.
    pub fn memory() -> Result<Self, CatalogError> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(conn: Connection) -> Result<Self, CatalogError> {
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA secure_delete=ON;
             PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;",
        )
        .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, CatalogError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, CatalogError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| backend("catalog lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

fn ref_from(blob: Vec<u8>) -> rusqlite::Result<CustomerRef> {
    let bytes: [u8; 16] = blob
        .try_into()
        .map_err(|_| rusqlite::Error::InvalidColumnType(0, "customer_ref".into(), rusqlite::types::Type::Blob))?;
    Ok(CustomerRef::from_bytes(bytes))
}

fn parse_col<T>(value: &str, parse: impl Fn(&str) -> Result<T, crate::model::InvalidInput>) -> rusqlite::Result<T> {
    parse(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn customer_from_row(row: &Row<'_>) -> rusqlite::Result<CustomerRecord> {
    let state: String = row.get("state")?;
    Ok(CustomerRecord {
        customer_ref: ref_from(row.get("customer_ref")?)?,
        customer_id: parse_col(&row.get::<_, String>("customer_id")?, CustomerId::parse)?,
        state: CustomerState::parse(&state).unwrap_or(CustomerState::Shredded),
        active_version: row.get("active_version")?,
        canary: row.get::<_, Option<Vec<u8>>>("canary")?.unwrap_or_default(),
        created_at_ms: row.get("created_at_ms")?,
    })
}

fn upload_from_row(row: &Row<'_>) -> rusqlite::Result<UploadRecord> {
    let spec: String = row.get("spec")?;
    let spec: ObjectSpec =
        serde_json::from_str(&spec).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let prefix: Vec<u8> = row.get("nonce_prefix")?;
    Ok(UploadRecord {
        upload_id: parse_col(&row.get::<_, String>("upload_id")?, UploadId::parse)?,
        object_id: parse_col(&row.get::<_, String>("object_id")?, ObjectId::parse)?,
        customer_ref: ref_from(row.get("customer_ref")?)?,
        spec,
        key_version: row.get("key_version")?,
        wrapped_dek: row.get::<_, Option<Vec<u8>>>("wrapped_dek")?.unwrap_or_default(),
        nonce_prefix: prefix
            .try_into()
            .map_err(|_| rusqlite::Error::InvalidColumnType(0, "nonce_prefix".into(), rusqlite::types::Type::Blob))?,
        created_at_ms: row.get("created_at_ms")?,
        committed: row.get::<_, i64>("committed")? != 0,
    })
}

const OBJECT_COLUMNS: &str = "o.object_id, o.upload_id, o.customer_ref, o.customer_id, o.kind, o.created_at_ms, \
     o.shredded, o.content_type, o.size, o.sha256, o.interaction_id, o.channel, o.agent_id, o.queue, \
     o.direction, o.started_at_ms, o.tags, o.key_version, o.wrapped_dek";

fn object_from_row(row: &Row<'_>) -> rusqlite::Result<ObjectRecord> {
    let kind: u8 = row.get("kind")?;
    let tags: Option<String> = row.get("tags")?;
    let sha: Option<Vec<u8>> = row.get("sha256")?;
    Ok(ObjectRecord {
        object_id: parse_col(&row.get::<_, String>("object_id")?, ObjectId::parse)?,
        upload_id: parse_col(&row.get::<_, String>("upload_id")?, UploadId::parse)?,
        spec: ObjectSpec {
            customer_id: parse_col(&row.get::<_, String>("customer_id")?, CustomerId::parse)?,
            kind: ContentKind::from_code(kind).unwrap_or(ContentKind::CallRecording),
            content_type: row.get::<_, Option<String>>("content_type")?.unwrap_or_default(),
            interaction: Interaction {
                interaction_id: row.get::<_, Option<String>>("interaction_id")?.unwrap_or_default(),
                channel: row.get::<_, Option<String>>("channel")?.unwrap_or_default(),
                agent_id: row.get::<_, Option<String>>("agent_id")?.unwrap_or_default(),
                queue: row.get::<_, Option<String>>("queue")?.unwrap_or_default(),
                direction: Direction::from_code(row.get::<_, Option<u8>>("direction")?.unwrap_or(0)),
                started_at_ms: row.get("started_at_ms")?,
                tags: tags.map(|t| serde_json::from_str(&t).unwrap_or_default()).unwrap_or_default(),
            },
        },
        size: row.get::<_, Option<i64>>("size")?.unwrap_or(0) as u64,
        sha256: sha.and_then(|s| s.try_into().ok()).unwrap_or([0; 32]),
        created_at_ms: row.get("created_at_ms")?,
    })
}

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let key = key.to_owned();
        self.run(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().map_err(backend)
        })
        .await
    }

    async fn meta_put_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, CatalogError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run(move |c| {
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])
                .map_err(backend)?;
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).map_err(backend)
        })
        .await
    }

    async fn customer(&self, id: &CustomerId) -> Result<Option<CustomerRecord>, CatalogError> {
        let id = id.as_str().to_owned();
        self.run(move |c| {
            c.query_row("SELECT * FROM customers WHERE customer_id = ?1", [id], customer_from_row)
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn create_customer(
        &self,
        customer: &CustomerRecord,
        key: &CustomerKeyRecord,
    ) -> Result<CustomerRecord, CatalogError> {
        let (customer, key) = (customer.clone(), key.clone());
        self.run(move |c| {
            let tx = c.transaction().map_err(backend)?;
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO customers
                     (customer_ref, customer_id, state, active_version, canary, created_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        customer.customer_ref.as_bytes().as_slice(),
                        customer.customer_id.as_str(),
                        customer.state.as_str(),
                        customer.active_version,
                        customer.canary,
                        customer.created_at_ms
                    ],
                )
                .map_err(backend)?;
            if inserted == 1 {
                tx.execute(
                    "INSERT INTO customer_keys (customer_ref, version, root_key_id, wrapped_key)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![key.customer_ref.as_bytes().as_slice(), key.version, key.root_key_id, key.wrapped_key],
                )
                .map_err(backend)?;
            }
            let stored = tx
                .query_row(
                    "SELECT * FROM customers WHERE customer_id = ?1",
                    [customer.customer_id.as_str()],
                    customer_from_row,
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(stored)
        })
        .await
    }

    async fn customer_key(
        &self,
        customer: &CustomerRef,
        version: u32,
    ) -> Result<Option<CustomerKeyRecord>, CatalogError> {
        let customer = *customer;
        self.run(move |c| {
            c.query_row(
                "SELECT root_key_id, wrapped_key FROM customer_keys WHERE customer_ref = ?1 AND version = ?2",
                params![customer.as_bytes().as_slice(), version],
                |r| {
                    Ok(CustomerKeyRecord {
                        customer_ref: customer,
                        version,
                        root_key_id: r.get(0)?,
                        wrapped_key: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>, CatalogError> {
        let id = id.to_string();
        self.run(move |c| {
            c.query_row("SELECT * FROM uploads WHERE upload_id = ?1", [id], upload_from_row).optional().map_err(backend)
        })
        .await
    }

    async fn create_upload(&self, upload: &UploadRecord) -> Result<UploadRecord, CatalogError> {
        let u = upload.clone();
        self.run(move |c| {
            let tx = c.transaction().map_err(backend)?;
            let spec = serde_json::to_string(&u.spec).map_err(backend)?;
            tx.execute(
                "INSERT OR IGNORE INTO uploads
                 (upload_id, object_id, customer_ref, spec, key_version, wrapped_dek, nonce_prefix, created_at_ms, committed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0)",
                params![
                    u.upload_id.to_string(),
                    u.object_id.to_string(),
                    u.customer_ref.as_bytes().as_slice(),
                    spec,
                    u.key_version,
                    u.wrapped_dek,
                    u.nonce_prefix.as_slice(),
                    u.created_at_ms
                ],
            )
            .map_err(backend)?;
            let stored = tx
                .query_row("SELECT * FROM uploads WHERE upload_id = ?1", [u.upload_id.to_string()], upload_from_row)
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(stored)
        })
        .await
    }

    async fn discard_upload(&self, id: &UploadId) -> Result<(), CatalogError> {
        let id = id.to_string();
        self.run(move |c| {
            c.execute("DELETE FROM uploads WHERE upload_id = ?1 AND committed = 0", [id]).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn commit_upload(&self, object: &ObjectRecord) -> Result<ObjectRecord, CatalogError> {
        let o = object.clone();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(backend)?;
            let upload = tx
                .query_row("SELECT * FROM uploads WHERE upload_id = ?1", [o.upload_id.to_string()], upload_from_row)
                .optional()
                .map_err(backend)?
                .ok_or(CatalogError::NotFound)?;
            let state: String = tx
                .query_row(
                    "SELECT state FROM customers WHERE customer_ref = ?1",
                    [upload.customer_ref.as_bytes().as_slice()],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            let state = CustomerState::parse(&state).unwrap_or(CustomerState::Shredded);
            if state != CustomerState::Active {
                return Err(CatalogError::CustomerState(state));
            }
            if !upload.committed {
                let i = &o.spec.interaction;
                tx.execute(
                    "INSERT INTO objects (object_id, upload_id, customer_ref, customer_id, kind, created_at_ms,
                         content_type, size, sha256, interaction_id, channel, agent_id, queue, direction,
                         started_at_ms, tags, key_version, wrapped_dek)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                    params![
                        upload.object_id.to_string(),
                        o.upload_id.to_string(),
                        upload.customer_ref.as_bytes().as_slice(),
                        o.spec.customer_id.as_str(),
                        o.spec.kind.code(),
                        o.created_at_ms,
                        o.spec.content_type,
                        o.size as i64,
                        o.sha256.as_slice(),
                        i.interaction_id,
                        i.channel,
                        i.agent_id,
                        i.queue,
                        i.direction.code(),
                        i.started_at_ms,
                        serde_json::to_string(&i.tags).map_err(backend)?,
                        upload.key_version,
                        upload.wrapped_dek
                    ],
                )
                .map_err(backend)?;
                tx.execute(
                    "UPDATE uploads SET committed = 1, wrapped_dek = NULL WHERE upload_id = ?1",
                    [o.upload_id.to_string()],
                )
                .map_err(backend)?;
            }
            let stored = tx
                .query_row(
                    &format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.upload_id = ?1"),
                    [o.upload_id.to_string()],
                    object_from_row,
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(stored)
        })
        .await
    }

    async fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>, CatalogError> {
        let id = id.to_string();
        self.run(move |c| {
            c.query_row(
                &format!(
                    "SELECT {OBJECT_COLUMNS}, c.state AS customer_state FROM objects o
                     JOIN customers c ON c.customer_ref = o.customer_ref WHERE o.object_id = ?1"
                ),
                [id],
                |r| {
                    let state: String = r.get("customer_state")?;
                    let shredded = r.get::<_, i64>("shredded")? != 0;
                    Ok(StoredObject {
                        record: object_from_row(r)?,
                        customer_ref: ref_from(r.get("customer_ref")?)?,
                        customer_state: if shredded {
                            CustomerState::Shredded
                        } else {
                            CustomerState::parse(&state).unwrap_or(CustomerState::Shredded)
                        },
                        key_version: r.get::<_, Option<u32>>("key_version")?.unwrap_or(0),
                        wrapped_dek: r.get::<_, Option<Vec<u8>>>("wrapped_dek")?.unwrap_or_default(),
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_objects(
        &self,
        filter: &ListFilter,
        after: Option<PageCursor>,
        limit: usize,
    ) -> Result<Vec<ObjectRecord>, CatalogError> {
        let filter = filter.clone();
        self.run(move |c| {
            let mut sql = format!(
                "SELECT {OBJECT_COLUMNS} FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref
                 WHERE o.shredded = 0 AND c.state = 'active'"
            );
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut push = |clause: &str, v: rusqlite::types::Value| {
                args.push(v);
                sql.push_str(&format!(" AND {clause} ?{}", args.len()));
            };
            if let Some(id) = &filter.customer_id {
                push("o.customer_id =", id.as_str().to_owned().into());
            }
            if let Some(id) = &filter.interaction_id {
                push("o.interaction_id =", id.clone().into());
            }
            if let Some(kind) = filter.kind {
                push("o.kind =", i64::from(kind.code()).into());
            }
            if let Some(t) = filter.created_after_ms {
                push("o.created_at_ms >=", t.into());
            }
            if let Some(t) = filter.created_before_ms {
                push("o.created_at_ms <", t.into());
            }
            if let Some(cur) = after {
                args.push(cur.created_at_ms.into());
                args.push(cur.object_id.to_string().into());
                sql.push_str(&format!(" AND (o.created_at_ms, o.object_id) < (?{}, ?{})", args.len() - 1, args.len()));
            }
            sql.push_str(&format!(" ORDER BY o.created_at_ms DESC, o.object_id DESC LIMIT {limit}"));
            let mut stmt = c.prepare(&sql).map_err(backend)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), object_from_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn shred_customer(&self, id: &CustomerId, reason: &str, now_ms: i64) -> Result<ShredReport, CatalogError> {
        let (id, reason) = (id.as_str().to_owned(), reason.to_owned());
        self.run(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(backend)?;
            let customer = tx
                .query_row("SELECT * FROM customers WHERE customer_id = ?1", [&id], customer_from_row)
                .optional()
                .map_err(backend)?
                .ok_or(CatalogError::NotFound)?;
            if customer.state == CustomerState::Shredded {
                return Err(CatalogError::CustomerState(CustomerState::Shredded));
            }
            let cref = customer.customer_ref.as_bytes().to_vec();
            let ids = |sql: &str| -> Result<Vec<ObjectId>, CatalogError> {
                let mut stmt = tx.prepare(sql).map_err(backend)?;
                let rows = stmt
                    .query_map([&cref], |r| r.get::<_, String>(0))
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?;
                rows.iter().map(|s| ObjectId::parse(s).map_err(backend)).collect()
            };
            let objects = ids("SELECT object_id FROM objects WHERE customer_ref = ?1 AND shredded = 0")?;
            let discarded = ids("SELECT object_id FROM uploads WHERE customer_ref = ?1 AND committed = 0")?;
            let versions = tx.execute("DELETE FROM customer_keys WHERE customer_ref = ?1", [&cref]).map_err(backend)?;
            tx.execute(
                "UPDATE objects SET shredded = 1, wrapped_dek = NULL, key_version = NULL, content_type = NULL,
                 size = NULL, sha256 = NULL, interaction_id = NULL, channel = NULL, agent_id = NULL,
                 queue = NULL, direction = NULL, started_at_ms = NULL, tags = NULL
                 WHERE customer_ref = ?1",
                [&cref],
            )
            .map_err(backend)?;
            tx.execute("DELETE FROM uploads WHERE customer_ref = ?1", [&cref]).map_err(backend)?;
            tx.execute(
                "UPDATE customers SET state = 'shredded', canary = NULL, shredded_at_ms = ?2, shred_reason = ?3
                 WHERE customer_ref = ?1",
                params![cref, now_ms, reason],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            // Move every page out of the WAL and truncate it, so no frame
            // holding a destroyed key survives in the -wal file.
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).map_err(backend)?;
            Ok(ShredReport {
                customer_ref: customer.customer_ref,
                key_versions_destroyed: versions as u32,
                objects,
                discarded_uploads: discarded,
                shredded_at_ms: now_ms,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance_sqlite_memory() {
        super::super::conformance::run(&SqliteCatalog::memory().unwrap()).await;
    }

    #[tokio::test]
    async fn conformance_sqlite_file_and_no_key_residue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        let catalog = SqliteCatalog::open(&path).unwrap();
        let residue = super::super::conformance::run(&catalog).await;
        drop(catalog);
        // After the shred, the destroyed wrapped keys appear nowhere in the
        // database file or its WAL.
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(file.unwrap().path()).unwrap();
            for needle in &residue {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "destroyed key bytes survive in the catalog files"
                );
            }
        }
    }
}
