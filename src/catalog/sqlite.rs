//! SQLite catalog: the embedded default, one file in the data directory.
//!
//! WAL mode with `synchronous=FULL` (a commit survives power loss) and
//! `secure_delete=ON`, so destroyed wrapped keys are overwritten in the
//! database file; after a shred the WAL is checkpointed and truncated so no
//! old page holding a destroyed key stays in it. Writes of concurrent
//! callers share one transaction (one `fsync`) and reads run on their own
//! connections (`crate::sqlite_group`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    Catalog, CatalogError, CustomerKeyRecord, CustomerRecord, CustomerState, Destroyed, ExpiredObject, ExpiryCount,
    JournalChunk, ListFilter, NOT_HELD, PageCursor, SCRUB_OBJECT, ShredRequest, ShredTicket, StoredObject,
    StoredPolicy, SweepLock, UploadRecord, check_append,
};
use crate::model::{
    Consent, ContentKind, CustomerId, CustomerRef, Direction, Hold, HoldId, Interaction, ObjectId, ObjectRecord,
    ObjectSpec, Retention, RetentionPolicy, Role, TimeSpan, TokenRecord, UploadId,
};
use crate::sqlite_group::{Group, GroupError};

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
CREATE TABLE IF NOT EXISTS retention_policies (
    name          TEXT PRIMARY KEY,
    body          TEXT NOT NULL,
    from_config   INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS consent (
    customer_id   TEXT PRIMARY KEY,
    training_use  INTEGER NOT NULL,
    updated_by    TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    hold_id        TEXT PRIMARY KEY,
    customer_id    TEXT NOT NULL,
    interaction_id TEXT,
    case_ref       TEXT NOT NULL,
    reason         TEXT NOT NULL,
    placed_by      TEXT NOT NULL,
    placed_at_ms   INTEGER NOT NULL,
    released_by    TEXT,
    released_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id       TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    roles          TEXT NOT NULL,
    unredacted     INTEGER NOT NULL,
    secret_sha256  BLOB NOT NULL,
    created_by     TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    expires_at_ms  INTEGER,
    revoked_at_ms  INTEGER
);
CREATE INDEX IF NOT EXISTS holds_by_customer ON holds(customer_id, placed_at_ms DESC);
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
-- sealed records of shared upload journals (ingest.journal = "catalog")
CREATE TABLE IF NOT EXISTS journal_chunks (
    upload_id    TEXT NOT NULL REFERENCES uploads(upload_id) ON DELETE CASCADE,
    start_offset INTEGER NOT NULL,
    end_offset   INTEGER NOT NULL,
    sealed       BLOB NOT NULL,
    PRIMARY KEY (upload_id, start_offset)
);
CREATE INDEX IF NOT EXISTS objects_by_created ON objects(created_at_ms DESC, object_id DESC);
CREATE INDEX IF NOT EXISTS objects_by_customer ON objects(customer_id, created_at_ms DESC, object_id DESC);
CREATE INDEX IF NOT EXISTS objects_by_interaction ON objects(interaction_id, created_at_ms DESC, object_id DESC);
"#;

/// Columns added after the first schema: added to an existing catalog at
/// open (SQLite has no `ADD COLUMN IF NOT EXISTS`).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("customers", "shred_requested_by", "TEXT"),
    ("customers", "shred_requested_at_ms", "INTEGER"),
    ("customers", "shred_destroy_after_ms", "INTEGER"),
    ("customers", "shred_requires_approval", "INTEGER NOT NULL DEFAULT 0"),
    ("customers", "shred_approved_by", "TEXT"),
    ("customers", "shred_approved_at_ms", "INTEGER"),
    ("customers", "shred_destroyed_at_ms", "INTEGER"),
    ("customers", "shred_key_versions", "TEXT"),
    ("customers", "shred_root_key_ids", "TEXT"),
    ("customers", "shred_objects", "INTEGER"),
    ("customers", "shred_objects_digest", "BLOB"),
    ("customers", "shred_uploads", "INTEGER"),
    ("customers", "shred_certificate", "TEXT"),
    // 0 live, 1 shredded with its customer, 2 expired
    ("objects", "retention_policy", "TEXT"),
    ("objects", "expires_at_ms", "INTEGER"),
    ("objects", "expired_at_ms", "INTEGER"),
    ("objects", "derived_from", "TEXT"),
    ("objects", "sensitive_spans", "TEXT"),
    ("objects", "duration_ms", "INTEGER"),
    ("uploads", "writer_epoch", "INTEGER NOT NULL DEFAULT 0"),
];

const INDEXES_ON_ADDED: &str = "
CREATE INDEX IF NOT EXISTS objects_by_expiry ON objects(expires_at_ms) WHERE shredded = 0;
CREATE INDEX IF NOT EXISTS objects_by_customer_ref ON objects(customer_ref);
";

const LIVE: i64 = 0;
const SHREDDED: i64 = 1;
const EXPIRED: i64 = 2;

/// The SQLite catalog: writes grouped into one transaction per batch by one
/// writer thread, reads on their own connections (`crate::sqlite_group`).
#[derive(Clone)]
pub struct SqliteCatalog {
    db: Arc<Group<()>>,
}

fn backend(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Backend(e.to_string())
}

impl From<GroupError> for CatalogError {
    fn from(e: GroupError) -> Self {
        CatalogError::Backend(e.0)
    }
}

/// Pragmas of every connection. `synchronous=FULL`: a commit survives
/// power loss; `secure_delete`: freed pages (destroyed keys) are zeroed.
const CONNECTION_SETUP: &str = "PRAGMA synchronous=FULL;
     PRAGMA secure_delete=ON;
     PRAGMA foreign_keys=ON;
     PRAGMA busy_timeout=5000;";

impl SqliteCatalog {
    /// Opens (creating if needed) the catalog file.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        Self::init(Connection::open(path).map_err(backend)?, Some(path.to_path_buf()))
    }

    /// A private in-memory catalog, for unit tests.
    pub fn memory() -> Result<Self, CatalogError> {
        Self::init(Connection::open_in_memory().map_err(backend)?, None)
    }

    fn init(conn: Connection, path: Option<PathBuf>) -> Result<Self, CatalogError> {
        conn.execute_batch("PRAGMA journal_mode=WAL;").map_err(backend)?;
        conn.execute_batch(CONNECTION_SETUP).map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        for (table, column, decl) in ADDED_COLUMNS {
            let exists: bool = conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                    [column],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(backend)?
                > 0;
            if !exists {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}")).map_err(backend)?;
            }
        }
        conn.execute_batch(INDEXES_ON_ADDED).map_err(backend)?;
        let db = Group::start("catalog", conn, (), path.map(|p| (p, CONNECTION_SETUP)))?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` in the writer's next batch; answers once it is durable.
    async fn write<T, F>(&self, f: F) -> Result<T, CatalogError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, CatalogError> + Send + 'static,
    {
        self.db.write(move |c, _| f(c)).await
    }

    /// Runs `f` on a reader connection, in one read transaction.
    async fn read<T, F>(&self, f: F) -> Result<T, CatalogError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, CatalogError> + Send + 'static,
    {
        self.db.read(f).await
    }

    /// Truncates the WAL on the write connection, outside any transaction.
    async fn scrub_wal(&self) -> Result<(), CatalogError> {
        self.db.solo(|c, _| scrub_wal(c)).await
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
     o.direction, o.started_at_ms, o.tags, o.key_version, o.wrapped_dek, o.retention_policy, o.expires_at_ms, \
     o.expired_at_ms, o.derived_from, o.sensitive_spans, o.duration_ms";

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
                duration_ms: row.get::<_, Option<i64>>("duration_ms")?.map(|d| d as u64),
                tags: tags.map(|t| serde_json::from_str(&t).unwrap_or_default()).unwrap_or_default(),
            },
            sensitive_spans: json_col(row.get("sensitive_spans")?)?.unwrap_or_default(),
        },
        size: row.get::<_, Option<i64>>("size")?.unwrap_or(0) as u64,
        sha256: sha.and_then(|s| s.try_into().ok()).unwrap_or([0; 32]),
        created_at_ms: row.get("created_at_ms")?,
        retention: crate::model::Retention {
            policy: row.get::<_, Option<String>>("retention_policy")?.unwrap_or_default(),
            expires_at_ms: row.get("expires_at_ms")?,
        },
        derived_from: row
            .get::<_, Option<String>>("derived_from")?
            .map(|s| parse_col(&s, ObjectId::parse))
            .transpose()?,
    })
}

/// The WHERE clause (and its arguments) of a listing: live objects of
/// active customers matching `filter`, after the page cursor.
fn filter_sql(filter: &ListFilter, after: Option<PageCursor>) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = format!("o.shredded = {LIVE} AND c.state = 'active'");
    let mut args: Vec<Value> = Vec::new();
    let mut push = |sql: &mut String, clause: &str, v: Value| {
        args.push(v);
        sql.push_str(&format!(" AND {clause} ?{}", args.len()));
    };
    let text = |s: &Option<String>| s.clone().map(Value::from);
    for (clause, value) in [
        ("o.customer_id =", filter.customer_id.as_ref().map(|c| Value::from(c.as_str().to_owned()))),
        ("o.interaction_id =", text(&filter.interaction_id)),
        ("o.kind =", filter.kind.map(|k| Value::from(i64::from(k.code())))),
        ("o.created_at_ms >=", filter.created_after_ms.map(Value::from)),
        ("o.created_at_ms <", filter.created_before_ms.map(Value::from)),
        ("o.agent_id =", text(&filter.agent_id)),
        ("o.queue =", text(&filter.queue)),
        ("o.channel =", text(&filter.channel)),
        ("o.direction =", filter.direction.map(|d| Value::from(i64::from(d.code())))),
        ("o.started_at_ms >=", filter.started_after_ms.map(Value::from)),
        ("o.started_at_ms <", filter.started_before_ms.map(Value::from)),
        ("o.duration_ms >=", filter.min_duration_ms.map(|d| Value::from(d.min(i64::MAX as u64) as i64))),
        ("o.duration_ms <=", filter.max_duration_ms.map(|d| Value::from(d.min(i64::MAX as u64) as i64))),
    ] {
        if let Some(v) = value {
            push(&mut sql, clause, v);
        }
    }
    for (k, v) in &filter.tags {
        // Tag keys are [A-Za-z0-9._:-] (validated at ingest), so quoting
        // the key as a JSON path member is safe.
        args.push(Value::from(k.clone()));
        args.push(Value::from(v.clone()));
        sql.push_str(&format!(" AND json_extract(o.tags, '$.\"' || ?{} || '\"') = ?{}", args.len() - 1, args.len()));
    }
    if filter.originals_only {
        sql.push_str(" AND o.derived_from IS NULL");
    }
    match filter.training_use {
        Some(true) => sql.push_str(
            " AND NOT EXISTS (SELECT 1 FROM consent k WHERE k.customer_id = o.customer_id AND k.training_use = 0)",
        ),
        Some(false) => sql.push_str(
            " AND EXISTS (SELECT 1 FROM consent k WHERE k.customer_id = o.customer_id AND k.training_use = 1)",
        ),
        None => {}
    }
    if let Some(cur) = after {
        args.push(cur.created_at_ms.into());
        args.push(cur.object_id.to_string().into());
        sql.push_str(&format!(" AND (o.created_at_ms, o.object_id) < (?{}, ?{})", args.len() - 1, args.len()));
    }
    (sql, args)
}

/// Spans as stored: a JSON array, or NULL for none.
fn spans_json(spans: &[TimeSpan]) -> Result<Option<String>, CatalogError> {
    if spans.is_empty() { Ok(None) } else { serde_json::to_string(spans).map(Some).map_err(backend) }
}

fn json_col<T: serde::de::DeserializeOwned>(value: Option<String>) -> rusqlite::Result<Option<T>> {
    value
        .map(|v| serde_json::from_str(&v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
        .transpose()
}

fn ticket_from_row(row: &Row<'_>) -> rusqlite::Result<Option<ShredTicket>> {
    let Some(requested_at_ms) = row.get::<_, Option<i64>>("shred_requested_at_ms")? else {
        return Ok(None);
    };
    let customer = customer_from_row(row)?;
    let destroyed = match row.get::<_, Option<i64>>("shred_destroyed_at_ms")? {
        None => None,
        Some(at_ms) => Some(Destroyed {
            at_ms,
            key_versions: json_col(row.get("shred_key_versions")?)?.unwrap_or_default(),
            root_key_ids: json_col(row.get("shred_root_key_ids")?)?.unwrap_or_default(),
            objects: row.get::<_, Option<i64>>("shred_objects")?.unwrap_or(0) as u64,
            objects_digest: row
                .get::<_, Option<Vec<u8>>>("shred_objects_digest")?
                .and_then(|d| d.try_into().ok())
                .unwrap_or([0; 32]),
            uploads: row.get::<_, Option<i64>>("shred_uploads")?.unwrap_or(0) as u64,
        }),
    };
    Ok(Some(ShredTicket {
        customer_id: customer.customer_id,
        customer_ref: customer.customer_ref,
        state: customer.state,
        reason: row.get::<_, Option<String>>("shred_reason")?.unwrap_or_default(),
        requested_by: row.get::<_, Option<String>>("shred_requested_by")?.unwrap_or_default(),
        requested_at_ms,
        destroy_after_ms: row.get::<_, Option<i64>>("shred_destroy_after_ms")?.unwrap_or(requested_at_ms),
        requires_approval: row.get::<_, i64>("shred_requires_approval")? != 0,
        approved_by: row.get("shred_approved_by")?,
        approved_at_ms: row.get("shred_approved_at_ms")?,
        destroyed,
        certificate: row.get("shred_certificate")?,
    }))
}

fn hold_from_row(row: &Row<'_>) -> rusqlite::Result<Hold> {
    Ok(Hold {
        hold_id: parse_col(&row.get::<_, String>("hold_id")?, HoldId::parse)?,
        customer_id: parse_col(&row.get::<_, String>("customer_id")?, CustomerId::parse)?,
        interaction_id: row.get("interaction_id")?,
        case_ref: row.get("case_ref")?,
        reason: row.get("reason")?,
        placed_by: row.get("placed_by")?,
        placed_at_ms: row.get("placed_at_ms")?,
        released_by: row.get("released_by")?,
        released_at_ms: row.get("released_at_ms")?,
    })
}

/// The customer row of `id` inside a transaction.
fn customer_in(tx: &Connection, id: &str) -> Result<CustomerRecord, CatalogError> {
    tx.query_row("SELECT * FROM customers WHERE customer_id = ?1", [id], customer_from_row)
        .optional()
        .map_err(backend)?
        .ok_or(CatalogError::NotFound)
}

fn ticket_in(conn: &Connection, id: &str) -> Result<ShredTicket, CatalogError> {
    conn.query_row("SELECT * FROM customers WHERE customer_id = ?1", [id], ticket_from_row)
        .optional()
        .map_err(backend)?
        .flatten()
        .ok_or(CatalogError::NotFound)
}

/// Active holds that block shredding the customer (any hold on it or on
/// one of its interactions).
fn active_holds(conn: &Connection, customer_id: &str) -> Result<Vec<Hold>, CatalogError> {
    let mut stmt = conn
        .prepare("SELECT * FROM holds WHERE customer_id = ?1 AND released_at_ms IS NULL ORDER BY placed_at_ms")
        .map_err(backend)?;
    let rows = stmt.query_map([customer_id], hold_from_row).map_err(backend)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(backend)
}

/// Moves every page out of the WAL and truncates it, so no frame holding a
/// destroyed key survives in the `-wal` file (`secure_delete` has already
/// zeroed the freed space in the pages themselves).
///
/// The checkpoint waits for readers; one still reading an older snapshot
/// makes it report busy, and it is tried again. It runs on the writer
/// thread, so every catalog write waits meanwhile: each try waits at most
/// [`SCRUB_WAIT`] (not the connection's 5 s busy timeout), so the writes
/// wait a few seconds at worst before the scrub gives up.
fn scrub_wal(conn: &Connection) -> Result<(), CatalogError> {
    conn.busy_timeout(SCRUB_WAIT).map_err(backend)?;
    let scrubbed: Result<bool, CatalogError> = (|| {
        for _ in 0..SCRUB_ATTEMPTS {
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).map_err(backend)?;
            if busy == 0 {
                return Ok(true);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(false)
    })();
    conn.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
    if scrubbed? {
        return Ok(());
    }
    Err(CatalogError::Backend(
        "the catalog's WAL could not be truncated after keys were destroyed (readers kept it busy); \
         the next shred or expiry retries"
            .into(),
    ))
}

const SCRUB_ATTEMPTS: usize = 20;
const SCRUB_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// The connections' busy timeout (`PRAGMA busy_timeout` in the set-up).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(5000);

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().map_err(backend)
        })
        .await
    }

    async fn meta_put_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, CatalogError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.write(move |c| {
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])
                .map_err(backend)?;
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).map_err(backend)
        })
        .await
    }

    async fn customer(&self, id: &CustomerId) -> Result<Option<CustomerRecord>, CatalogError> {
        let id = id.as_str().to_owned();
        self.read(move |c| {
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
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
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
        self.read(move |c| {
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
        self.read(move |c| {
            c.query_row("SELECT * FROM uploads WHERE upload_id = ?1", [id], upload_from_row).optional().map_err(backend)
        })
        .await
    }

    async fn create_upload(&self, upload: &UploadRecord) -> Result<UploadRecord, CatalogError> {
        let u = upload.clone();
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
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
        self.write(move |c| {
            c.execute("DELETE FROM uploads WHERE upload_id = ?1 AND committed = 0", [id]).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn commit_upload(&self, object: &ObjectRecord) -> Result<ObjectRecord, CatalogError> {
        let o = object.clone();
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
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
                // The object now holds the bytes: the journal's records go
                // with the commit, never before it.
                tx.execute("DELETE FROM journal_chunks WHERE upload_id = ?1", [o.upload_id.to_string()])
                    .map_err(backend)?;
                let i = &o.spec.interaction;
                tx.execute(
                    "INSERT INTO objects (object_id, upload_id, customer_ref, customer_id, kind, created_at_ms,
                         content_type, size, sha256, interaction_id, channel, agent_id, queue, direction,
                         started_at_ms, tags, key_version, wrapped_dek, retention_policy, expires_at_ms, derived_from,
                         sensitive_spans, duration_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                                 ?19, ?20, ?21, ?22, ?23)",
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
                        upload.wrapped_dek,
                        Some(o.retention.policy.as_str()).filter(|p| !p.is_empty()),
                        o.retention.expires_at_ms,
                        o.derived_from.map(|d| d.to_string()),
                        spans_json(&o.spec.sensitive_spans)?,
                        i.duration_ms.map(|d| d.min(i64::MAX as u64) as i64)
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
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {OBJECT_COLUMNS}, c.state AS customer_state FROM objects o
                     JOIN customers c ON c.customer_ref = o.customer_ref WHERE o.object_id = ?1"
                ),
                [id],
                |r| {
                    let state: String = r.get("customer_state")?;
                    let shredded = r.get::<_, i64>("shredded")? == SHREDDED;
                    Ok(StoredObject {
                        record: object_from_row(r)?,
                        customer_ref: ref_from(r.get("customer_ref")?)?,
                        customer_state: if shredded {
                            CustomerState::Shredded
                        } else {
                            CustomerState::parse(&state).unwrap_or(CustomerState::Shredded)
                        },
                        expired_at_ms: r.get("expired_at_ms")?,
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
        let (mut sql, args) = filter_sql(filter, after);
        sql.push_str(&format!(" ORDER BY o.created_at_ms DESC, o.object_id DESC LIMIT {limit}"));
        self.read(move |c| {
            let sql = format!(
                "SELECT {OBJECT_COLUMNS} FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref WHERE {sql}"
            );
            let mut stmt = c.prepare(&sql).map_err(backend)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), object_from_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn count_objects(&self, filter: &ListFilter) -> Result<u64, CatalogError> {
        let (sql, args) = filter_sql(filter, None);
        self.read(move |c| {
            let sql = format!(
                "SELECT COUNT(*) FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref WHERE {sql}"
            );
            c.query_row(&sql, rusqlite::params_from_iter(args), |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn request_shred(&self, id: &CustomerId, request: &ShredRequest) -> Result<ShredTicket, CatalogError> {
        let (id, r) = (id.as_str().to_owned(), request.clone());
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let customer = customer_in(&tx, &id)?;
            match customer.state {
                CustomerState::Shredded => return Err(CatalogError::CustomerState(CustomerState::Shredded)),
                CustomerState::PendingShred => return ticket_in(&tx, &id),
                CustomerState::Active => {}
            }
            let holds = active_holds(&tx, &id)?;
            if !holds.is_empty() {
                return Err(CatalogError::Held(holds));
            }
            tx.execute(
                "UPDATE customers SET state = 'pending_shred', shred_reason = ?2, shred_requested_by = ?3,
                 shred_requested_at_ms = ?4, shred_destroy_after_ms = ?5, shred_requires_approval = ?6,
                 shred_approved_by = NULL, shred_approved_at_ms = NULL
                 WHERE customer_id = ?1",
                params![id, r.reason, r.requested_by, r.requested_at_ms, r.destroy_after_ms, r.requires_approval],
            )
            .map_err(backend)?;
            let ticket = ticket_in(&tx, &id)?;
            tx.commit().map_err(backend)?;
            Ok(ticket)
        })
        .await
    }

    async fn approve_shred(&self, id: &CustomerId, approver: &str, now_ms: i64) -> Result<ShredTicket, CatalogError> {
        let (id, approver) = (id.as_str().to_owned(), approver.to_owned());
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let customer = customer_in(&tx, &id)?;
            if customer.state != CustomerState::PendingShred {
                return Err(CatalogError::CustomerState(customer.state));
            }
            let ticket = ticket_in(&tx, &id)?;
            if ticket.requested_by == approver {
                return Err(CatalogError::Conflict(format!(
                    "the shred of {id} was requested by {approver}; a different person must approve it"
                )));
            }
            if ticket.approved_by.is_none() {
                tx.execute(
                    "UPDATE customers SET shred_approved_by = ?2, shred_approved_at_ms = ?3 WHERE customer_id = ?1",
                    params![id, approver, now_ms],
                )
                .map_err(backend)?;
            }
            let ticket = ticket_in(&tx, &id)?;
            tx.commit().map_err(backend)?;
            Ok(ticket)
        })
        .await
    }

    async fn cancel_shred(&self, id: &CustomerId) -> Result<ShredTicket, CatalogError> {
        let id = id.as_str().to_owned();
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let customer = customer_in(&tx, &id)?;
            if customer.state != CustomerState::PendingShred {
                return Err(CatalogError::CustomerState(customer.state));
            }
            let mut ticket = ticket_in(&tx, &id)?;
            if ticket.destroyed.is_some() {
                return Err(CatalogError::Conflict(format!(
                    "the keys of {id} are already destroyed; the shred can no longer be cancelled"
                )));
            }
            tx.execute("UPDATE customers SET state = 'active' WHERE customer_id = ?1", [&id]).map_err(backend)?;
            tx.commit().map_err(backend)?;
            ticket.state = CustomerState::Active;
            Ok(ticket)
        })
        .await
    }

    async fn shred_ticket(&self, id: &CustomerId) -> Result<Option<ShredTicket>, CatalogError> {
        let id = id.as_str().to_owned();
        self.read(move |c| {
            c.query_row("SELECT * FROM customers WHERE customer_id = ?1", [id], ticket_from_row)
                .optional()
                .map(Option::flatten)
                .map_err(backend)
        })
        .await
    }

    async fn pending_shreds(&self) -> Result<Vec<ShredTicket>, CatalogError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare("SELECT * FROM customers WHERE state = 'pending_shred' ORDER BY shred_destroy_after_ms")
                .map_err(backend)?;
            let rows = stmt.query_map([], ticket_from_row).map_err(backend)?;
            Ok(rows.collect::<Result<Vec<_>, _>>().map_err(backend)?.into_iter().flatten().collect())
        })
        .await
    }

    async fn destroy_customer_keys(&self, id: &CustomerId, now_ms: i64) -> Result<ShredTicket, CatalogError> {
        let id = id.as_str().to_owned();
        let ticket = self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let customer = customer_in(&tx, &id)?;
            if customer.state != CustomerState::PendingShred {
                return Err(CatalogError::CustomerState(customer.state));
            }
            let ticket = ticket_in(&tx, &id)?;
            if ticket.destroyed.is_some() {
                return Ok(ticket);
            }
            let holds = active_holds(&tx, &id)?;
            if !holds.is_empty() {
                return Err(CatalogError::Held(holds));
            }
            let cref = customer.customer_ref.as_bytes().to_vec();
            let strings = |sql: &str| -> Result<Vec<String>, CatalogError> {
                let mut stmt = tx.prepare(sql).map_err(backend)?;
                let rows = stmt.query_map([&cref], |r| r.get::<_, String>(0)).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)
            };
            let mut objects = strings("SELECT object_id FROM objects WHERE customer_ref = ?1 AND shredded = 0")?;
            objects.sort();
            let uploads = strings("SELECT upload_id FROM uploads WHERE customer_ref = ?1 AND committed = 0")?;
            let mut versions: Vec<u32> = {
                let mut stmt =
                    tx.prepare("SELECT version FROM customer_keys WHERE customer_ref = ?1").map_err(backend)?;
                let rows = stmt.query_map([&cref], |r| r.get::<_, u32>(0)).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            versions.sort_unstable();
            let mut root_ids = strings("SELECT DISTINCT root_key_id FROM customer_keys WHERE customer_ref = ?1")?;
            root_ids.sort();
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            for o in &objects {
                digest.update(o.as_bytes());
                digest.update(b"\n");
            }
            let digest = digest.finish();
            tx.execute("DELETE FROM customer_keys WHERE customer_ref = ?1", [&cref]).map_err(backend)?;
            tx.execute(
                &format!("UPDATE objects SET shredded = {SHREDDED}, {SCRUB_OBJECT} WHERE customer_ref = ?1 AND shredded = {LIVE}"),
                [&cref],
            )
            .map_err(backend)?;
            // Expired tombstones hold nothing more to scrub; committed
            // uploads keep their spec (metadata) until now.
            tx.execute("DELETE FROM uploads WHERE customer_ref = ?1", [&cref]).map_err(backend)?;
            tx.execute(
                "UPDATE customers SET shred_destroyed_at_ms = ?2, shred_key_versions = ?3, shred_root_key_ids = ?4,
                 shred_objects = ?5, shred_objects_digest = ?6, shred_uploads = ?7 WHERE customer_ref = ?1",
                params![
                    cref,
                    now_ms,
                    serde_json::to_string(&versions).map_err(backend)?,
                    serde_json::to_string(&root_ids).map_err(backend)?,
                    objects.len() as i64,
                    digest.as_ref(),
                    uploads.len() as i64
                ],
            )
            .map_err(backend)?;
            let ticket = ticket_in(&tx, &id)?;
            tx.commit().map_err(backend)?;
            Ok(ticket)
        })
        .await?;
        self.scrub_wal().await?;
        Ok(ticket)
    }

    async fn customer_key_versions(&self, customer: &CustomerRef) -> Result<Vec<u32>, CatalogError> {
        let cref = customer.as_bytes().to_vec();
        self.read(move |c| {
            let mut stmt = c
                .prepare("SELECT version FROM customer_keys WHERE customer_ref = ?1 ORDER BY version")
                .map_err(backend)?;
            let rows = stmt.query_map([cref], |r| r.get::<_, u32>(0)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn complete_shred(
        &self,
        id: &CustomerId,
        certificate: &str,
        now_ms: i64,
    ) -> Result<ShredTicket, CatalogError> {
        let (id, certificate) = (id.as_str().to_owned(), certificate.to_owned());
        let ticket = self
            .write(move |c| {
                let tx = c.savepoint().map_err(backend)?;
                let ticket = ticket_in(&tx, &id)?;
                match (ticket.state, &ticket.destroyed) {
                    (CustomerState::Shredded, _) => return Ok(ticket),
                    (CustomerState::PendingShred, Some(_)) => {}
                    _ => {
                        return Err(CatalogError::Conflict(format!(
                            "the keys of {id} are not destroyed yet; the shred cannot complete"
                        )));
                    }
                }
                tx.execute(
                "UPDATE customers SET state = 'shredded', canary = NULL, shredded_at_ms = ?2, shred_certificate = ?3
                 WHERE customer_id = ?1",
                params![id, now_ms, certificate],
            )
            .map_err(backend)?;
                let ticket = ticket_in(&tx, &id)?;
                tx.commit().map_err(backend)?;
                Ok(ticket)
            })
            .await?;
        self.scrub_wal().await?;
        Ok(ticket)
    }

    async fn tombstoned_objects(&self, customer: &CustomerRef) -> Result<Vec<ObjectId>, CatalogError> {
        let cref = customer.as_bytes().to_vec();
        self.read(move |c| {
            let mut stmt = c
                .prepare(&format!("SELECT object_id FROM objects WHERE customer_ref = ?1 AND shredded != {LIVE}"))
                .map_err(backend)?;
            let rows = stmt.query_map([cref], |r| r.get::<_, String>(0)).map_err(backend)?;
            let ids = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
            ids.iter().map(|s| ObjectId::parse(s).map_err(backend)).collect()
        })
        .await
    }

    async fn policies(&self) -> Result<Vec<StoredPolicy>, CatalogError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare("SELECT body, from_config, updated_at_ms FROM retention_policies ORDER BY name")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    let body: String = r.get(0)?;
                    Ok(StoredPolicy {
                        policy: serde_json::from_str::<RetentionPolicy>(&body)
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                        from_config: r.get::<_, i64>(1)? != 0,
                        updated_at_ms: r.get(2)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn put_policy(&self, policy: &StoredPolicy) -> Result<(), CatalogError> {
        let p = policy.clone();
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let existing: Option<i64> = tx
                .query_row("SELECT from_config FROM retention_policies WHERE name = ?1", [&p.policy.name], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            if existing == Some(1) && !p.from_config {
                return Err(CatalogError::Conflict(format!(
                    "retention policy {} is defined in the config file; change it there",
                    p.policy.name
                )));
            }
            tx.execute(
                "INSERT INTO retention_policies (name, body, from_config, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET body = ?2, from_config = ?3, updated_at_ms = ?4",
                params![
                    p.policy.name,
                    serde_json::to_string(&p.policy).map_err(backend)?,
                    p.from_config,
                    p.updated_at_ms
                ],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn delete_policy(&self, name: &str, from_config: bool) -> Result<(), CatalogError> {
        let name = name.to_owned();
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let existing: i64 = tx
                .query_row("SELECT from_config FROM retention_policies WHERE name = ?1", [&name], |r| r.get(0))
                .optional()
                .map_err(backend)?
                .ok_or(CatalogError::NotFound)?;
            if existing == 1 && !from_config {
                return Err(CatalogError::Conflict(format!(
                    "retention policy {name} is defined in the config file; remove it there"
                )));
            }
            tx.execute("DELETE FROM retention_policies WHERE name = ?1", [&name]).map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn add_sensitive_spans(&self, id: &ObjectId, spans: &[TimeSpan]) -> Result<Vec<TimeSpan>, CatalogError> {
        let (id, spans) = (id.to_string(), spans.to_vec());
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let current: Option<String> = tx
                .query_row(
                    &format!("SELECT sensitive_spans FROM objects WHERE object_id = ?1 AND shredded = {LIVE}"),
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?
                .ok_or(CatalogError::NotFound)?;
            let current: Vec<TimeSpan> = json_col(current).map_err(backend)?.unwrap_or_default();
            let merged = TimeSpan::merge(&current, &spans);
            tx.execute(
                "UPDATE objects SET sensitive_spans = ?2 WHERE object_id = ?1",
                params![id, spans_json(&merged)?],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(merged)
        })
        .await
    }

    async fn set_retention(&self, id: &ObjectId, retention: &Retention) -> Result<(), CatalogError> {
        let (id, r) = (id.to_string(), retention.clone());
        self.write(move |c| {
            c.execute(
                &format!(
                    "UPDATE objects SET retention_policy = ?2, expires_at_ms = ?3 WHERE object_id = ?1 AND shredded = {LIVE}"
                ),
                params![id, Some(r.policy.as_str()).filter(|p| !p.is_empty()), r.expires_at_ms],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn count_expiring(&self, now_ms: i64) -> Result<ExpiryCount, CatalogError> {
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN {NOT_HELD} THEN 0 ELSE 1 END), 0)
                     FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref
                     WHERE o.shredded = {LIVE} AND c.state = 'active' AND o.expires_at_ms <= ?1"
                ),
                [now_ms],
                |r| Ok(ExpiryCount { due: r.get::<_, i64>(0)? as u64, held: r.get::<_, i64>(1)? as u64 }),
            )
            .map_err(backend)
        })
        .await
    }

    async fn expire_objects(&self, now_ms: i64, limit: usize) -> Result<Vec<ExpiredObject>, CatalogError> {
        let expired = self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let due: Vec<(String, String)> = {
                let mut stmt = tx
                    .prepare(&format!(
                        "SELECT o.object_id, o.customer_id FROM objects o
                         JOIN customers c ON c.customer_ref = o.customer_ref
                         WHERE o.shredded = {LIVE} AND c.state = 'active' AND o.expires_at_ms <= ?1 AND {NOT_HELD}
                         ORDER BY o.expires_at_ms LIMIT {limit}"
                    ))
                    .map_err(backend)?;
                let rows = stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            let mut expired = Vec::with_capacity(due.len());
            for (object_id, customer_id) in due {
                let (customer_ref, kind): (Vec<u8>, u8) = tx
                    .query_row("SELECT customer_ref, kind FROM objects WHERE object_id = ?1", [&object_id], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(backend)?;
                tx.execute(
                    &format!(
                        "UPDATE objects SET shredded = {EXPIRED}, expired_at_ms = ?2, {SCRUB_OBJECT} WHERE object_id = ?1"
                    ),
                    params![object_id, now_ms],
                )
                .map_err(backend)?;
                // The upload row keeps its spec (interaction metadata, tags)
                // for idempotent retries; keep only what the tombstone keeps.
                let scrubbed = ObjectSpec {
                    customer_id: parse_col(&customer_id, CustomerId::parse).map_err(backend)?,
                    kind: ContentKind::from_code(kind).unwrap_or(ContentKind::CallRecording),
                    content_type: String::new(),
                    interaction: Interaction::default(),
                    sensitive_spans: Vec::new(),
                };
                tx.execute(
                    "UPDATE uploads SET spec = ?2 WHERE object_id = ?1 AND customer_ref = ?3",
                    params![object_id, serde_json::to_string(&scrubbed).map_err(backend)?, customer_ref],
                )
                .map_err(backend)?;
                expired.push(ExpiredObject {
                    object_id: ObjectId::parse(&object_id).map_err(backend)?,
                    customer_id: scrubbed.customer_id,
                    expired_at_ms: now_ms,
                });
            }
            tx.commit().map_err(backend)?;
            Ok(expired)
        })
        .await?;
        if !expired.is_empty() {
            self.scrub_wal().await?;
        }
        Ok(expired)
    }

    async fn expired_objects(&self, after: Option<ObjectId>, limit: usize) -> Result<Vec<ObjectId>, CatalogError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        self.read(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT object_id FROM objects WHERE shredded = {EXPIRED} AND object_id > ?1
                     ORDER BY object_id LIMIT {limit}"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([after], |r| r.get::<_, String>(0)).map_err(backend)?;
            let ids = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
            ids.iter().map(|s| ObjectId::parse(s).map_err(backend)).collect()
        })
        .await
    }

    async fn place_hold(&self, hold: &Hold) -> Result<Hold, CatalogError> {
        let h = hold.clone();
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let state: Option<String> = tx
                .query_row("SELECT state FROM customers WHERE customer_id = ?1", [h.customer_id.as_str()], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            if state.as_deref() == Some(CustomerState::Shredded.as_str()) {
                return Err(CatalogError::CustomerState(CustomerState::Shredded));
            }
            if state.as_deref() == Some(CustomerState::PendingShred.as_str())
                && ticket_in(&tx, h.customer_id.as_str())?.destroyed.is_some()
            {
                return Err(CatalogError::Conflict(format!(
                    "the keys of {} are already destroyed; there is nothing left to hold",
                    h.customer_id
                )));
            }
            tx.execute(
                "INSERT INTO holds (hold_id, customer_id, interaction_id, case_ref, reason, placed_by, placed_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    h.hold_id.to_string(),
                    h.customer_id.as_str(),
                    h.interaction_id,
                    h.case_ref,
                    h.reason,
                    h.placed_by,
                    h.placed_at_ms
                ],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(h)
        })
        .await
    }

    async fn release_hold(&self, id: &HoldId, by: &str, now_ms: i64) -> Result<Hold, CatalogError> {
        let (id, by) = (id.to_string(), by.to_owned());
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let hold = tx
                .query_row("SELECT * FROM holds WHERE hold_id = ?1", [&id], hold_from_row)
                .optional()
                .map_err(backend)?
                .ok_or(CatalogError::NotFound)?;
            if !hold.is_active() {
                return Err(CatalogError::Conflict(format!(
                    "{} was already released by {}",
                    hold.describe(),
                    hold.released_by.unwrap_or_default()
                )));
            }
            tx.execute(
                "UPDATE holds SET released_by = ?2, released_at_ms = ?3 WHERE hold_id = ?1",
                params![id, by, now_ms],
            )
            .map_err(backend)?;
            let hold = tx.query_row("SELECT * FROM holds WHERE hold_id = ?1", [&id], hold_from_row).map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(hold)
        })
        .await
    }

    async fn holds(&self, customer: Option<&CustomerId>, include_released: bool) -> Result<Vec<Hold>, CatalogError> {
        let customer = customer.map(|c| c.as_str().to_owned());
        self.read(move |c| {
            let mut sql = String::from("SELECT * FROM holds WHERE (?1 IS NULL OR customer_id = ?1)");
            if !include_released {
                sql.push_str(" AND released_at_ms IS NULL");
            }
            sql.push_str(" ORDER BY placed_at_ms DESC, hold_id");
            let mut stmt = c.prepare(&sql).map_err(backend)?;
            let rows = stmt.query_map([customer], hold_from_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn unfinished_uploads(&self, before_ms: i64) -> Result<Vec<UploadRecord>, CatalogError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare("SELECT * FROM uploads WHERE committed = 0 AND created_at_ms < ?1 ORDER BY created_at_ms")
                .map_err(backend)?;
            let rows = stmt.query_map([before_ms], upload_from_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn set_consent(&self, consent: &Consent) -> Result<(), CatalogError> {
        let k = consent.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO consent (customer_id, training_use, updated_by, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (customer_id) DO UPDATE SET training_use = excluded.training_use,
                 updated_by = excluded.updated_by, updated_at_ms = excluded.updated_at_ms",
                params![k.customer_id.as_str(), k.training_use, k.updated_by, k.updated_at_ms],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn consent(&self, id: &CustomerId) -> Result<Option<Consent>, CatalogError> {
        let id = id.clone();
        self.read(move |c| {
            c.query_row(
                "SELECT training_use, updated_by, updated_at_ms FROM consent WHERE customer_id = ?1",
                [id.as_str()],
                |r| {
                    Ok(Consent {
                        customer_id: id.clone(),
                        training_use: r.get(0)?,
                        updated_by: r.get(1)?,
                        updated_at_ms: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), CatalogError> {
        let t = token.clone();
        self.write(move |c| {
            let roles: Vec<&str> = t.roles.iter().map(|r| r.name()).collect();
            let inserted = c
                .execute(
                    "INSERT INTO tokens (token_id, name, roles, unredacted, secret_sha256, created_by, created_at_ms,
                     expires_at_ms, revoked_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL)
                     ON CONFLICT (token_id) DO NOTHING",
                    params![
                        t.token_id,
                        t.name,
                        roles.join(","),
                        t.unredacted,
                        &t.secret_sha256[..],
                        t.created_by,
                        t.created_at_ms,
                        t.expires_at_ms
                    ],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Err(CatalogError::Conflict(format!("token id {} is taken", t.token_id)));
            }
            Ok(())
        })
        .await
    }

    async fn token(&self, token_id: &str) -> Result<Option<TokenRecord>, CatalogError> {
        let id = token_id.to_owned();
        self.read(move |c| {
            c.query_row(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = ?1"), [id], read_token)
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, CatalogError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at_ms DESC, token_id"))
                .map_err(backend)?;
            let rows = stmt.query_map([], read_token).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn revoke_token(&self, token_id: &str, now_ms: i64) -> Result<TokenRecord, CatalogError> {
        let id = token_id.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE tokens SET revoked_at_ms = ?2 WHERE token_id = ?1 AND revoked_at_ms IS NULL",
                params![id, now_ms],
            )
            .map_err(backend)?;
            c.query_row(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = ?1"), [id], read_token)
                .optional()
                .map_err(backend)?
                .ok_or(CatalogError::NotFound)
        })
        .await
    }

    async fn meta_compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, CatalogError> {
        let (key, expected, value) = (key.to_owned(), expected.map(<[u8]>::to_vec), value.to_vec());
        self.write(move |c| {
            let changed = match expected {
                None => c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)", params![key, value]),
                Some(old) => {
                    c.execute("UPDATE meta SET value = ?2 WHERE key = ?1 AND value = ?3", params![key, value, old])
                }
            }
            .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn count_customer_keys_by_root(&self) -> Result<Vec<(String, u64)>, CatalogError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare("SELECT root_key_id, COUNT(*) FROM customer_keys GROUP BY root_key_id ORDER BY root_key_id")
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn customer_keys_not_under(
        &self,
        root_key_id: &str,
        after: Option<(CustomerRef, u32)>,
        limit: usize,
    ) -> Result<Vec<(CustomerId, CustomerKeyRecord)>, CatalogError> {
        let root = root_key_id.to_owned();
        // An empty blob sorts before every 16-byte reference.
        let (after_ref, after_version) = after.map_or((Vec::new(), 0), |(r, v)| (r.as_bytes().to_vec(), v));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT c.customer_id, k.customer_ref, k.version, k.root_key_id, k.wrapped_key
                     FROM customer_keys k JOIN customers c ON c.customer_ref = k.customer_ref
                     WHERE k.root_key_id <> ?1 AND (k.customer_ref, k.version) > (?2, ?3)
                     ORDER BY k.customer_ref, k.version LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![root, after_ref, after_version, limit], |r| {
                    Ok((
                        parse_col(&r.get::<_, String>(0)?, CustomerId::parse)?,
                        CustomerKeyRecord {
                            customer_ref: ref_from(r.get(1)?)?,
                            version: r.get(2)?,
                            root_key_id: r.get(3)?,
                            wrapped_key: r.get(4)?,
                        },
                    ))
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn rewrap_customer_key(&self, key: &CustomerKeyRecord, old_root_key_id: &str) -> Result<bool, CatalogError> {
        let (key, old) = (key.clone(), old_root_key_id.to_owned());
        self.write(move |c| {
            let changed = c
                .execute(
                    "UPDATE customer_keys SET root_key_id = ?3, wrapped_key = ?4
                     WHERE customer_ref = ?1 AND version = ?2 AND root_key_id = ?5",
                    params![key.customer_ref.as_bytes().as_slice(), key.version, key.root_key_id, key.wrapped_key, old],
                )
                .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn claim_journal(&self, upload: &UploadId) -> Result<u64, CatalogError> {
        let id = upload.to_string();
        self.write(move |c| {
            let epoch: Option<i64> = c
                .query_row(
                    "UPDATE uploads SET writer_epoch = writer_epoch + 1 WHERE upload_id = ?1 AND committed = 0
                     RETURNING writer_epoch",
                    [id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            epoch.map(|e| e as u64).ok_or(CatalogError::NotFound)
        })
        .await
    }

    async fn append_journal(
        &self,
        upload: &UploadId,
        epoch: u64,
        start: u64,
        end: u64,
        sealed: &[u8],
    ) -> Result<(), CatalogError> {
        let (id, sealed) = (upload.to_string(), sealed.to_vec());
        self.write(move |c| {
            let tx = c.savepoint().map_err(backend)?;
            let row: Option<(i64, String, i64)> = tx
                .query_row(
                    "SELECT u.writer_epoch, c.state,
                            COALESCE((SELECT MAX(end_offset) FROM journal_chunks j WHERE j.upload_id = u.upload_id), 0)
                     FROM uploads u JOIN customers c ON c.customer_ref = u.customer_ref
                     WHERE u.upload_id = ?1 AND u.committed = 0",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(backend)?;
            let (current, state, journal_end) = row.ok_or(CatalogError::NotFound)?;
            check_append(current as u64, epoch, &state, journal_end as u64, start, end)?;
            tx.execute(
                "INSERT INTO journal_chunks (upload_id, start_offset, end_offset, sealed) VALUES (?1, ?2, ?3, ?4)",
                params![id, start as i64, end as i64, sealed],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn journal_chunks(
        &self,
        upload: &UploadId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<JournalChunk>, CatalogError> {
        let id = upload.to_string();
        self.read(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT start_offset, end_offset, sealed FROM journal_chunks
                     WHERE upload_id = ?1 AND start_offset >= ?2 ORDER BY start_offset LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![id, from as i64, limit as i64], |r| {
                    Ok(JournalChunk {
                        start: r.get::<_, i64>(0)? as u64,
                        end: r.get::<_, i64>(1)? as u64,
                        sealed: r.get(2)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    /// One process owns a SQLite catalog (its file lives in that process's
    /// data directory), so the lock is always free.
    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, CatalogError> {
        Ok(Some(SweepLock::new(())))
    }
}

const TOKEN_COLUMNS: &str =
    "token_id, name, roles, unredacted, secret_sha256, created_by, created_at_ms, expires_at_ms, revoked_at_ms";

fn read_token(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let roles: String = r.get(2)?;
    let hash: Vec<u8> = r.get(4)?;
    let mut secret_sha256 = [0u8; 32];
    // A hash of the wrong length never matches (all zero is no SHA-256).
    if hash.len() == 32 {
        secret_sha256.copy_from_slice(&hash);
    }
    Ok(TokenRecord {
        token_id: r.get(0)?,
        name: r.get(1)?,
        roles: roles.split(',').filter_map(Role::from_name).collect(),
        unredacted: r.get(3)?,
        secret_sha256,
        created_by: r.get(5)?,
        created_at_ms: r.get(6)?,
        expires_at_ms: r.get(7)?,
        revoked_at_ms: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance_sqlite_memory() {
        super::super::conformance::run(&SqliteCatalog::memory().unwrap()).await;
    }

    #[tokio::test]
    async fn journal_conformance_sqlite() {
        super::super::conformance::journal(&SqliteCatalog::memory().unwrap()).await;
    }

    #[tokio::test]
    async fn conformance_sqlite_root_rotation() {
        super::super::conformance::root_rotation(&SqliteCatalog::memory().unwrap()).await;
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
