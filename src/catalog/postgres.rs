//! PostgreSQL catalog: the same `Catalog` contract as SQLite, for replicated deployments sharing one database.
//!
//! Every trait method is one transaction on a pooled connection (READ
//! COMMITTED plus explicit row locks on the customer row, which is what
//! serialises a shred against commits, holds and expiry). The schema is
//! created by versioned migrations at `connect`, under a transaction-scoped
//! advisory lock so replicas starting together do not race. Deleted rows
//! stay in dead tuples until VACUUM, so the erasing methods vacuum the
//! tables that held wrapped keys after they commit; what survives even that
//! (WAL, backups, replicas, free space in pages) is in `docs/POSTGRES.md`.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    Catalog, CatalogError, CustomerKeyRecord, CustomerRecord, CustomerState, Destroyed, ExpiredObject, ExpiryCount,
    JournalChunk, ListFilter, NOT_HELD, PageCursor, Revoked, SCRUB_OBJECT, ShredRequest, ShredTicket, StoredObject,
    StoredPolicy, SweepLock, UploadRecord, check_append,
};
use crate::model::{
    Consent, ContentKind, CustomerId, CustomerRef, Direction, Hold, HoldId, Interaction, ObjectId, ObjectRecord,
    ObjectSpec, Retention, RetentionPolicy, Role, TimeSpan, TokenRecord, UploadId,
};

/// Versioned migrations, applied in order at `connect` and recorded in
/// `schema_migrations`. Frozen once released: never edit or renumber one,
/// add a new version instead.
///
/// Ids are `TEXT COLLATE "C"` so ordering (pagination, `expired_objects`)
/// is bytewise as in SQLite, whatever the database's collation. Wrapped
/// keys are `STORAGE PLAIN`: never compressed nor moved out of line, so no
/// copy of one lands in a TOAST table that the shred's VACUUM would have to
/// reach separately.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial catalog",
        r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE customers (
    customer_ref            BYTEA PRIMARY KEY,
    customer_id             TEXT COLLATE "C" NOT NULL UNIQUE,
    state                   TEXT NOT NULL,
    active_version          BIGINT NOT NULL,
    canary                  BYTEA,
    created_at_ms           BIGINT NOT NULL,
    shredded_at_ms          BIGINT,
    shred_reason            TEXT,
    shred_requested_by      TEXT,
    shred_requested_at_ms   BIGINT,
    shred_destroy_after_ms  BIGINT,
    shred_requires_approval BOOLEAN NOT NULL DEFAULT FALSE,
    shred_approved_by       TEXT,
    shred_approved_at_ms    BIGINT,
    shred_destroyed_at_ms   BIGINT,
    shred_key_versions      BIGINT[],
    shred_root_key_ids      TEXT[],
    shred_objects           BIGINT,
    shred_objects_digest    BYTEA,
    shred_uploads           BIGINT,
    shred_certificate       TEXT
);
ALTER TABLE customers ALTER COLUMN canary SET STORAGE PLAIN;
CREATE INDEX customers_pending ON customers(shred_destroy_after_ms) WHERE state = 'pending_shred';
CREATE TABLE retention_policies (
    name          TEXT PRIMARY KEY,
    body          TEXT NOT NULL,
    from_config   BOOLEAN NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE consent (
    customer_id   TEXT COLLATE "C" PRIMARY KEY,
    training_use  BOOLEAN NOT NULL,
    updated_by    TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE holds (
    hold_id        TEXT COLLATE "C" PRIMARY KEY,
    customer_id    TEXT COLLATE "C" NOT NULL,
    interaction_id TEXT,
    case_ref       TEXT NOT NULL,
    reason         TEXT NOT NULL,
    placed_by      TEXT NOT NULL,
    placed_at_ms   BIGINT NOT NULL,
    released_by    TEXT,
    released_at_ms BIGINT
);
CREATE INDEX holds_by_customer ON holds(customer_id, placed_at_ms DESC);
CREATE TABLE customer_keys (
    customer_ref BYTEA NOT NULL REFERENCES customers(customer_ref),
    version      BIGINT NOT NULL,
    root_key_id  TEXT NOT NULL,
    wrapped_key  BYTEA NOT NULL,
    PRIMARY KEY (customer_ref, version)
);
ALTER TABLE customer_keys ALTER COLUMN wrapped_key SET STORAGE PLAIN;
CREATE TABLE uploads (
    upload_id     TEXT COLLATE "C" PRIMARY KEY,
    object_id     TEXT COLLATE "C" NOT NULL UNIQUE,
    customer_ref  BYTEA NOT NULL REFERENCES customers(customer_ref),
    spec          TEXT NOT NULL,
    key_version   BIGINT NOT NULL,
    wrapped_dek   BYTEA,
    nonce_prefix  BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    committed     BOOLEAN NOT NULL DEFAULT FALSE
);
ALTER TABLE uploads ALTER COLUMN wrapped_dek SET STORAGE PLAIN;
CREATE INDEX uploads_by_customer_ref ON uploads(customer_ref);
CREATE INDEX uploads_unfinished ON uploads(created_at_ms) WHERE NOT committed;
CREATE TABLE objects (
    object_id        TEXT COLLATE "C" PRIMARY KEY,
    upload_id        TEXT COLLATE "C" NOT NULL UNIQUE,
    customer_ref     BYTEA NOT NULL REFERENCES customers(customer_ref),
    customer_id      TEXT COLLATE "C" NOT NULL,
    kind             SMALLINT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    -- 0 live, 1 shredded with its customer, 2 expired
    shredded         SMALLINT NOT NULL DEFAULT 0,
    -- everything below is cleared when the object is shredded or expires
    content_type     TEXT,
    size             BIGINT,
    sha256           BYTEA,
    interaction_id   TEXT,
    channel          TEXT,
    agent_id         TEXT,
    queue            TEXT,
    direction        SMALLINT,
    started_at_ms    BIGINT,
    tags             TEXT,
    key_version      BIGINT,
    wrapped_dek      BYTEA,
    retention_policy TEXT,
    expires_at_ms    BIGINT,
    expired_at_ms    BIGINT,
    derived_from     TEXT
);
ALTER TABLE objects ALTER COLUMN wrapped_dek SET STORAGE PLAIN;
CREATE INDEX objects_by_created ON objects(created_at_ms DESC, object_id DESC);
CREATE INDEX objects_by_customer ON objects(customer_id, created_at_ms DESC, object_id DESC);
CREATE INDEX objects_by_interaction ON objects(interaction_id, created_at_ms DESC, object_id DESC);
CREATE INDEX objects_by_expiry ON objects(expires_at_ms) WHERE shredded = 0;
CREATE INDEX objects_by_customer_ref ON objects(customer_ref);
"#,
    ),
    (
        2,
        "bearer tokens, sensitive spans",
        r#"
ALTER TABLE objects ADD COLUMN sensitive_spans TEXT;
CREATE TABLE tokens (
    token_id      TEXT COLLATE "C" PRIMARY KEY,
    name          TEXT NOT NULL,
    roles         TEXT NOT NULL,
    unredacted    BOOLEAN NOT NULL,
    secret_sha256 BYTEA NOT NULL,
    created_by    TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT
);
"#,
    ),
    (
        3,
        "interaction duration",
        r#"
ALTER TABLE objects ADD COLUMN duration_ms BIGINT;
"#,
    ),
    (
        4,
        "shared upload journals",
        r#"
ALTER TABLE uploads ADD COLUMN writer_epoch BIGINT NOT NULL DEFAULT 0;
CREATE TABLE journal_chunks (
    upload_id    TEXT COLLATE "C" NOT NULL REFERENCES uploads(upload_id) ON DELETE CASCADE,
    start_offset BIGINT NOT NULL,
    end_offset   BIGINT NOT NULL,
    sealed       BYTEA NOT NULL,
    PRIMARY KEY (upload_id, start_offset)
);
ALTER TABLE journal_chunks ALTER COLUMN sealed SET STORAGE EXTERNAL;
"#,
    ),
];

const LIVE: i16 = 0;
const SHREDDED: i16 = 1;
const EXPIRED: i16 = 2;

const OBJECT_COLUMNS: &str = "o.object_id, o.upload_id, o.customer_ref, o.customer_id, o.kind, o.created_at_ms, \
     o.shredded, o.content_type, o.size, o.sha256, o.interaction_id, o.channel, o.agent_id, o.queue, \
     o.direction, o.started_at_ms, o.tags, o.key_version, o.wrapped_dek, o.retention_policy, o.expires_at_ms, \
     o.expired_at_ms, o.derived_from, o.sensitive_spans, o.duration_ms";

/// Tables whose dead tuples can hold a destroyed wrapped key (or the
/// canary) after an erasure commits.
const SHRED_TABLES: &str = "customer_keys, objects, uploads, customers, journal_chunks";

/// The channel revocations are announced on (payload `schema:customer_ref`
/// in hex, or `schema:*`); every replica of every schema listens to it and
/// keeps its own schema's.
const REVOKED_CHANNEL: &str = "recvault_revoked";

/// How long a replica waits before reconnecting a lost listener.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
const EXPIRY_TABLES: &str = "objects, uploads";

/// Connections in the pool: a catalog call holds one for one transaction.
const POOL_SIZE: usize = 16;
/// How long a call waits for a pooled connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

type Session = (tokio_postgres::Client, Listening);

/// The polling task of a listening connection and the messages it yields.
struct Listening {
    task: tokio::task::JoinHandle<()>,
    msgs: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
}

/// Keeps a session (and the advisory locks it holds) open; dropping the
/// client closes the connection, which releases them.
struct SessionGuard {
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The PostgreSQL catalog. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PostgresCatalog {
    pool: Pool,
    /// For connections outside the pool: the listener and the sweep lock,
    /// which live as long as a session, not a transaction.
    config: tokio_postgres::Config,
    schema: String,
}

/// Maps a driver error without its DETAIL, which can quote whole rows
/// (e.g. "Failing row contains (...)", wrapped keys included).
fn backend(e: tokio_postgres::Error) -> CatalogError {
    match e.as_db_error() {
        Some(db) => CatalogError::Backend(format!("{} {}: {}", db.severity(), db.code().code(), db.message())),
        // Non-database errors (I/O, protocol) carry no row data; their
        // source says why, e.g. "connection refused".
        None => match std::error::Error::source(&e) {
            Some(source) => CatalogError::Backend(format!("{e}: {source}")),
            None => CatalogError::Backend(e.to_string()),
        },
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> CatalogError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => backend(e),
        other => CatalogError::Backend(format!("postgres pool: {other}")),
    }
}

fn invalid(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Backend(format!("invalid catalog row: {e}"))
}

/// A schema name we can put into `search_path` and SQL unquoted: a plain
/// lowercase identifier, so no quoting or escaping rules come into play.
fn check_schema(schema: &str) -> Result<(), CatalogError> {
    let ok = (1..=63).contains(&schema.len())
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(CatalogError::Backend(format!(
            "invalid postgres schema name {schema:?}: use 1-63 of [a-z0-9_], starting with a letter or _, not pg_"
        )))
    }
}

impl PostgresCatalog {
    /// Connects to PostgreSQL and brings the catalog in `schema` up to date.
    ///
    /// `conn_str` is a libpq-style key=value string or a `postgresql://`
    /// URL (e.g. `host=db port=5432 user=recvault dbname=recvault`). The
    /// schema is created if missing and every connection of the pool uses
    /// it as its `search_path`, so tests and tenants can each have their
    /// own. Connections are unencrypted (`NoTls`): use it over a local
    /// socket or a trusted network until TLS is wired in.
    pub async fn connect(conn_str: &str, schema: &str) -> Result<Self, CatalogError> {
        check_schema(schema)?;
        let mut config = tokio_postgres::Config::from_str(conn_str)
            .map_err(|e| CatalogError::Backend(format!("invalid postgres connection string: {e}")))?;
        // Keep any options the operator gave; ours come last and win.
        let options = match config.get_options() {
            Some(given) => format!("{given} -c search_path={schema}"),
            None => format!("-c search_path={schema}"),
        };
        config.options(&options);
        if config.get_application_name().is_none() {
            config.application_name("recvault");
        }
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| CatalogError::Backend(format!("postgres pool: {e}")))?;
        let catalog = Self { pool, config, schema: schema.to_owned() };
        catalog.migrate(schema).await?;
        Ok(catalog)
    }

    /// Applies the migrations not yet recorded, all in one transaction.
    /// The advisory lock is per schema: replicas of one deployment queue up
    /// behind the first, which does the work; the others then find nothing
    /// left to do. Tests on separate schemas do not wait on each other.
    async fn migrate(&self, schema: &str) -> Result<(), CatalogError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1)::bigint)", &[&format!("recvault.migrate:{schema}")])
            .await
            .map_err(backend)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(backend)?;
        let current: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
            .await
            .map_err(backend)?
            .try_get(0)
            .map_err(backend)?;
        let latest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > latest {
            return Err(CatalogError::Backend(format!(
                "catalog schema {schema} is at version {current}, newer than this build knows ({latest}); \
                 upgrade recvault"
            )));
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await.map_err(backend)?;
            tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name])
                .await
                .map_err(backend)?;
            tracing::info!(schema, version, name, "catalog migration applied");
        }
        tx.commit().await.map_err(backend)
    }

    /// Announces, when `tx` commits, that content of `customer` (or some
    /// content, `None`) became unreadable (see `watch_revocations`).
    async fn notify_revoked(
        &self,
        tx: &impl GenericClient,
        customer: Option<&CustomerRef>,
    ) -> Result<(), CatalogError> {
        let who = customer.map_or_else(|| "*".to_owned(), |c| hex::encode(c.as_bytes()));
        tx.execute("SELECT pg_notify($1, $2)", &[&REVOKED_CHANNEL, &format!("{}:{who}", self.schema)])
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// A connection listening on the revocation channel.
    async fn listen(&self) -> Result<Session, CatalogError> {
        let (client, mut connection) = self.session().await?;
        let (msgs_tx, msgs_rx) = tokio::sync::mpsc::unbounded_channel();
        // The connection must be polled for LISTEN to complete; messages it
        // yields (notifications) go to `forward_notifications`.
        let task = tokio::spawn(async move {
            let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = futures::StreamExt::next(&mut stream).await {
                match msg {
                    Ok(m) => {
                        if msgs_tx.send(m).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        client.batch_execute(&format!("LISTEN {REVOKED_CHANNEL}")).await.map_err(backend)?;
        Ok((client, Listening { task, msgs: msgs_rx }))
    }

    /// Passes this schema's notifications on until the connection ends or
    /// the receiver goes.
    async fn forward_notifications(
        &self,
        client: tokio_postgres::Client,
        mut listening: Listening,
        out: &tokio::sync::mpsc::Sender<Revoked>,
    ) {
        let prefix = format!("{}:", self.schema);
        while let Some(msg) = listening.msgs.recv().await {
            let tokio_postgres::AsyncMessage::Notification(n) = msg else { continue };
            let Some(who) = n.payload().strip_prefix(&prefix) else { continue };
            let revoked = match <[u8; 16]>::try_from(hex::decode(who).unwrap_or_default()) {
                Ok(bytes) => Revoked::Customer(CustomerRef::from_bytes(bytes)),
                Err(_) => Revoked::Any,
            };
            if out.send(revoked).await.is_err() {
                break;
            }
        }
        listening.task.abort();
        drop(client);
    }

    /// A connection of its own, outside the pool.
    async fn session(
        &self,
    ) -> Result<
        (tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>),
        CatalogError,
    > {
        self.config.connect(NoTls).await.map_err(backend)
    }

    /// Removes the dead tuples an erasure left behind, so the destroyed
    /// keys are no longer in any tuple (visible or not). VACUUM cannot run
    /// inside a transaction, hence a plain statement after the commit. A
    /// failure is logged and not returned: the erasure itself committed,
    /// and autovacuum will get there later.
    async fn vacuum(&self, tables: &str) {
        let result = match self.pool.get().await {
            Ok(client) => client.batch_execute(&format!("VACUUM {tables}")).await.map_err(backend),
            Err(e) => Err(pool_err(e)),
        };
        if let Err(e) = result {
            // The message is ours and the error has no DETAIL (see
            // `backend`), so no key bytes can reach the log.
            tracing::warn!(
                tables,
                error = %e,
                "vacuum after erasure failed; dead tuples keep destroyed keys until autovacuum"
            );
        }
    }
}

const TOKEN_COLUMNS: &str =
    "token_id, name, roles, unredacted, secret_sha256, created_by, created_at_ms, expires_at_ms, revoked_at_ms";

fn read_token(r: &Row) -> Result<TokenRecord, CatalogError> {
    let roles: String = get(r, "roles")?;
    let hash: Vec<u8> = get(r, "secret_sha256")?;
    // A hash of the wrong length never matches (all zero is no SHA-256).
    let secret_sha256 = <[u8; 32]>::try_from(hash.as_slice()).unwrap_or([0; 32]);
    Ok(TokenRecord {
        token_id: get(r, "token_id")?,
        name: get(r, "name")?,
        roles: roles.split(',').filter_map(Role::from_name).collect(),
        unredacted: get(r, "unredacted")?,
        secret_sha256,
        created_by: get(r, "created_by")?,
        created_at_ms: get(r, "created_at_ms")?,
        expires_at_ms: get(r, "expires_at_ms")?,
        revoked_at_ms: get(r, "revoked_at_ms")?,
    })
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, col: &str) -> Result<T, CatalogError> {
    row.try_get(col).map_err(backend)
}

fn u32_col(row: &Row, col: &str) -> Result<u32, CatalogError> {
    u32::try_from(get::<i64>(row, col)?).map_err(invalid)
}

fn ref_from(bytes: Vec<u8>) -> Result<CustomerRef, CatalogError> {
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| invalid("customer_ref is not 16 bytes"))?;
    Ok(CustomerRef::from_bytes(bytes))
}

fn kind_from(code: i16) -> ContentKind {
    u8::try_from(code).ok().and_then(ContentKind::from_code).unwrap_or(ContentKind::CallRecording)
}

fn customer_from_row(row: &Row) -> Result<CustomerRecord, CatalogError> {
    let state: String = get(row, "state")?;
    Ok(CustomerRecord {
        customer_ref: ref_from(get(row, "customer_ref")?)?,
        customer_id: CustomerId::parse(get(row, "customer_id")?).map_err(invalid)?,
        state: CustomerState::parse(&state).unwrap_or(CustomerState::Shredded),
        active_version: u32_col(row, "active_version")?,
        canary: get::<Option<Vec<u8>>>(row, "canary")?.unwrap_or_default(),
        created_at_ms: get(row, "created_at_ms")?,
    })
}

fn upload_from_row(row: &Row) -> Result<UploadRecord, CatalogError> {
    let spec: ObjectSpec = serde_json::from_str(get(row, "spec")?).map_err(invalid)?;
    let prefix: Vec<u8> = get(row, "nonce_prefix")?;
    Ok(UploadRecord {
        upload_id: UploadId::parse(get(row, "upload_id")?).map_err(invalid)?,
        object_id: ObjectId::parse(get(row, "object_id")?).map_err(invalid)?,
        customer_ref: ref_from(get(row, "customer_ref")?)?,
        spec,
        key_version: u32_col(row, "key_version")?,
        wrapped_dek: get::<Option<Vec<u8>>>(row, "wrapped_dek")?.unwrap_or_default(),
        nonce_prefix: prefix.try_into().map_err(|_| invalid("nonce_prefix is not 7 bytes"))?,
        created_at_ms: get(row, "created_at_ms")?,
        committed: get(row, "committed")?,
    })
}

type SqlArgs = Vec<Box<dyn ToSql + Sync + Send>>;

/// The WHERE clause (and its arguments) of a listing: live objects of
/// active customers matching `filter`, after the page cursor.
fn filter_sql(filter: &ListFilter, after: Option<PageCursor>) -> (String, SqlArgs) {
    let mut sql = format!("o.shredded = {LIVE} AND c.state = 'active'");
    let mut args: SqlArgs = Vec::new();
    let mut push = |sql: &mut String, clause: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        sql.push_str(&format!(" AND {clause} ${}", args.len()));
    };
    let text = |s: &Option<String>| s.clone().map(|v| Box::new(v) as Box<dyn ToSql + Sync + Send>);
    let int = |v: Option<i64>| v.map(|v| Box::new(v) as Box<dyn ToSql + Sync + Send>);
    for (clause, value) in [
        ("o.customer_id =", filter.customer_id.as_ref().map(|c| Box::new(c.as_str().to_owned()) as Box<_>)),
        ("o.interaction_id =", text(&filter.interaction_id)),
        ("o.kind =", filter.kind.map(|k| Box::new(i16::from(k.code())) as Box<_>)),
        ("o.created_at_ms >=", int(filter.created_after_ms)),
        ("o.created_at_ms <", int(filter.created_before_ms)),
        ("o.agent_id =", text(&filter.agent_id)),
        ("o.queue =", text(&filter.queue)),
        ("o.channel =", text(&filter.channel)),
        ("o.direction =", filter.direction.map(|d| Box::new(i16::from(d.code())) as Box<_>)),
        ("o.started_at_ms >=", int(filter.started_after_ms)),
        ("o.started_at_ms <", int(filter.started_before_ms)),
        ("o.duration_ms >=", int(filter.min_duration_ms.map(|d| d.min(i64::MAX as u64) as i64))),
        ("o.duration_ms <=", int(filter.max_duration_ms.map(|d| d.min(i64::MAX as u64) as i64))),
    ] {
        if let Some(v) = value {
            push(&mut sql, clause, v);
        }
    }
    for (k, v) in &filter.tags {
        args.push(Box::new(k.clone()));
        args.push(Box::new(v.clone()));
        sql.push_str(&format!(" AND (o.tags::jsonb ->> ${}) = ${}", args.len() - 1, args.len()));
    }
    if filter.originals_only {
        sql.push_str(" AND o.derived_from IS NULL");
    }
    match filter.training_use {
        Some(true) => sql.push_str(
            " AND NOT EXISTS (SELECT 1 FROM consent k WHERE k.customer_id = o.customer_id AND NOT k.training_use)",
        ),
        Some(false) => {
            sql.push_str(" AND EXISTS (SELECT 1 FROM consent k WHERE k.customer_id = o.customer_id AND k.training_use)")
        }
        None => {}
    }
    if let Some(cur) = after {
        args.push(Box::new(cur.created_at_ms));
        args.push(Box::new(cur.object_id.to_string()));
        sql.push_str(&format!(" AND (o.created_at_ms, o.object_id) < (${}, ${})", args.len() - 1, args.len()));
    }
    (sql, args)
}

/// Spans as stored: a JSON array, or NULL for none.
fn spans_json(spans: &[TimeSpan]) -> Result<Option<String>, CatalogError> {
    if spans.is_empty() { Ok(None) } else { serde_json::to_string(spans).map(Some).map_err(invalid) }
}

fn object_from_row(row: &Row) -> Result<ObjectRecord, CatalogError> {
    let tags: Option<String> = get(row, "tags")?;
    let sha: Option<Vec<u8>> = get(row, "sha256")?;
    let direction = get::<Option<i16>>(row, "direction")?.and_then(|d| u8::try_from(d).ok()).unwrap_or(0);
    Ok(ObjectRecord {
        object_id: ObjectId::parse(get(row, "object_id")?).map_err(invalid)?,
        upload_id: UploadId::parse(get(row, "upload_id")?).map_err(invalid)?,
        spec: ObjectSpec {
            customer_id: CustomerId::parse(get(row, "customer_id")?).map_err(invalid)?,
            kind: kind_from(get(row, "kind")?),
            content_type: get::<Option<String>>(row, "content_type")?.unwrap_or_default(),
            interaction: Interaction {
                interaction_id: get::<Option<String>>(row, "interaction_id")?.unwrap_or_default(),
                channel: get::<Option<String>>(row, "channel")?.unwrap_or_default(),
                agent_id: get::<Option<String>>(row, "agent_id")?.unwrap_or_default(),
                queue: get::<Option<String>>(row, "queue")?.unwrap_or_default(),
                direction: Direction::from_code(direction),
                started_at_ms: get(row, "started_at_ms")?,
                duration_ms: get::<Option<i64>>(row, "duration_ms")?.map(|d| d as u64),
                tags: tags.map(|t| serde_json::from_str(&t).unwrap_or_default()).unwrap_or_default(),
            },
            sensitive_spans: get::<Option<String>>(row, "sensitive_spans")?
                .map(|s| serde_json::from_str(&s).map_err(invalid))
                .transpose()?
                .unwrap_or_default(),
        },
        size: get::<Option<i64>>(row, "size")?.unwrap_or(0) as u64,
        sha256: sha.and_then(|s| s.try_into().ok()).unwrap_or([0; 32]),
        created_at_ms: get(row, "created_at_ms")?,
        retention: Retention {
            policy: get::<Option<String>>(row, "retention_policy")?.unwrap_or_default(),
            expires_at_ms: get(row, "expires_at_ms")?,
        },
        derived_from: get::<Option<&str>>(row, "derived_from")?.map(ObjectId::parse).transpose().map_err(invalid)?,
    })
}

fn ticket_from_row(row: &Row) -> Result<Option<ShredTicket>, CatalogError> {
    let Some(requested_at_ms) = get::<Option<i64>>(row, "shred_requested_at_ms")? else {
        return Ok(None);
    };
    let customer = customer_from_row(row)?;
    let destroyed = match get::<Option<i64>>(row, "shred_destroyed_at_ms")? {
        None => None,
        Some(at_ms) => Some(Destroyed {
            at_ms,
            key_versions: get::<Option<Vec<i64>>>(row, "shred_key_versions")?
                .unwrap_or_default()
                .into_iter()
                .map(|v| u32::try_from(v).map_err(invalid))
                .collect::<Result<_, _>>()?,
            root_key_ids: get::<Option<Vec<String>>>(row, "shred_root_key_ids")?.unwrap_or_default(),
            objects: get::<Option<i64>>(row, "shred_objects")?.unwrap_or(0) as u64,
            objects_digest: get::<Option<Vec<u8>>>(row, "shred_objects_digest")?
                .and_then(|d| d.try_into().ok())
                .unwrap_or([0; 32]),
            uploads: get::<Option<i64>>(row, "shred_uploads")?.unwrap_or(0) as u64,
        }),
    };
    Ok(Some(ShredTicket {
        customer_id: customer.customer_id,
        customer_ref: customer.customer_ref,
        state: customer.state,
        reason: get::<Option<String>>(row, "shred_reason")?.unwrap_or_default(),
        requested_by: get::<Option<String>>(row, "shred_requested_by")?.unwrap_or_default(),
        requested_at_ms,
        destroy_after_ms: get::<Option<i64>>(row, "shred_destroy_after_ms")?.unwrap_or(requested_at_ms),
        requires_approval: get(row, "shred_requires_approval")?,
        approved_by: get(row, "shred_approved_by")?,
        approved_at_ms: get(row, "shred_approved_at_ms")?,
        destroyed,
        certificate: get(row, "shred_certificate")?,
    }))
}

fn hold_from_row(row: &Row) -> Result<Hold, CatalogError> {
    Ok(Hold {
        hold_id: HoldId::parse(get(row, "hold_id")?).map_err(invalid)?,
        customer_id: CustomerId::parse(get(row, "customer_id")?).map_err(invalid)?,
        interaction_id: get(row, "interaction_id")?,
        case_ref: get(row, "case_ref")?,
        reason: get(row, "reason")?,
        placed_by: get(row, "placed_by")?,
        placed_at_ms: get(row, "placed_at_ms")?,
        released_by: get(row, "released_by")?,
        released_at_ms: get(row, "released_at_ms")?,
    })
}

fn policy_from_row(row: &Row) -> Result<StoredPolicy, CatalogError> {
    Ok(StoredPolicy {
        policy: serde_json::from_str::<RetentionPolicy>(get(row, "body")?).map_err(invalid)?,
        from_config: get(row, "from_config")?,
        updated_at_ms: get(row, "updated_at_ms")?,
    })
}

/// The customer row of `id`, locked for the rest of the transaction:
/// every state change of a customer goes through this lock, so they apply
/// one after the other as in SQLite's single writer.
async fn customer_row_locked(c: &impl GenericClient, id: &str) -> Result<Row, CatalogError> {
    c.query_opt("SELECT * FROM customers WHERE customer_id = $1 FOR UPDATE", &[&id])
        .await
        .map_err(backend)?
        .ok_or(CatalogError::NotFound)
}

async fn ticket_in(c: &impl GenericClient, id: &str) -> Result<ShredTicket, CatalogError> {
    let row = c
        .query_opt("SELECT * FROM customers WHERE customer_id = $1", &[&id])
        .await
        .map_err(backend)?
        .ok_or(CatalogError::NotFound)?;
    ticket_from_row(&row)?.ok_or(CatalogError::NotFound)
}

/// Active holds that block shredding the customer (any hold on it or on
/// one of its interactions).
async fn active_holds(c: &impl GenericClient, customer_id: &str) -> Result<Vec<Hold>, CatalogError> {
    c.query(
        "SELECT * FROM holds WHERE customer_id = $1 AND released_at_ms IS NULL ORDER BY placed_at_ms, hold_id",
        &[&customer_id],
    )
    .await
    .map_err(backend)?
    .iter()
    .map(hold_from_row)
    .collect()
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl Catalog for PostgresCatalog {
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client.query_opt("SELECT value FROM meta WHERE key = $1", &[&key]).await.map_err(backend)?;
        row.map(|r| get(&r, "value")).transpose()
    }

    async fn meta_put_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, CatalogError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", &[&key, &value])
            .await
            .map_err(backend)?;
        let row = tx.query_one("SELECT value FROM meta WHERE key = $1", &[&key]).await.map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        get(&row, "value")
    }

    async fn customer(&self, id: &CustomerId) -> Result<Option<CustomerRecord>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt("SELECT * FROM customers WHERE customer_id = $1", &[&id.as_str()])
            .await
            .map_err(backend)?;
        row.as_ref().map(customer_from_row).transpose()
    }

    async fn create_customer(
        &self,
        customer: &CustomerRecord,
        key: &CustomerKeyRecord,
    ) -> Result<CustomerRecord, CatalogError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        // A concurrent first ingest of the same customer waits on the
        // unique index here and then inserts nothing.
        let inserted = tx
            .execute(
                "INSERT INTO customers (customer_ref, customer_id, state, active_version, canary, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &customer.customer_ref.as_bytes().as_slice(),
                    &customer.customer_id.as_str(),
                    &customer.state.as_str(),
                    &i64::from(customer.active_version),
                    &customer.canary,
                    &customer.created_at_ms,
                ],
            )
            .await
            .map_err(backend)?;
        if inserted == 1 {
            tx.execute(
                "INSERT INTO customer_keys (customer_ref, version, root_key_id, wrapped_key) VALUES ($1, $2, $3, $4)",
                &[&key.customer_ref.as_bytes().as_slice(), &i64::from(key.version), &key.root_key_id, &key.wrapped_key],
            )
            .await
            .map_err(backend)?;
        }
        let row = tx
            .query_one("SELECT * FROM customers WHERE customer_id = $1", &[&customer.customer_id.as_str()])
            .await
            .map_err(backend)?;
        let stored = customer_from_row(&row)?;
        tx.commit().await.map_err(backend)?;
        Ok(stored)
    }

    async fn customer_key(
        &self,
        customer: &CustomerRef,
        version: u32,
    ) -> Result<Option<CustomerKeyRecord>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt(
                "SELECT root_key_id, wrapped_key FROM customer_keys WHERE customer_ref = $1 AND version = $2",
                &[&customer.as_bytes().as_slice(), &i64::from(version)],
            )
            .await
            .map_err(backend)?;
        row.map(|r| {
            Ok(CustomerKeyRecord {
                customer_ref: *customer,
                version,
                root_key_id: get(&r, "root_key_id")?,
                wrapped_key: get(&r, "wrapped_key")?,
            })
        })
        .transpose()
    }

    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt("SELECT * FROM uploads WHERE upload_id = $1", &[&id.to_string()])
            .await
            .map_err(backend)?;
        row.as_ref().map(upload_from_row).transpose()
    }

    async fn create_upload(&self, upload: &UploadRecord) -> Result<UploadRecord, CatalogError> {
        let u = upload;
        let spec = serde_json::to_string(&u.spec).map_err(invalid)?;
        let upload_id = u.upload_id.to_string();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute(
            "INSERT INTO uploads
             (upload_id, object_id, customer_ref, spec, key_version, wrapped_dek, nonce_prefix, created_at_ms,
              committed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, FALSE) ON CONFLICT DO NOTHING",
            &[
                &upload_id,
                &u.object_id.to_string(),
                &u.customer_ref.as_bytes().as_slice(),
                &spec,
                &i64::from(u.key_version),
                &u.wrapped_dek,
                &u.nonce_prefix.as_slice(),
                &u.created_at_ms,
            ],
        )
        .await
        .map_err(backend)?;
        let row = tx.query_one("SELECT * FROM uploads WHERE upload_id = $1", &[&upload_id]).await.map_err(backend)?;
        let stored = upload_from_row(&row)?;
        tx.commit().await.map_err(backend)?;
        Ok(stored)
    }

    async fn discard_upload(&self, id: &UploadId) -> Result<(), CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute("DELETE FROM uploads WHERE upload_id = $1 AND NOT committed", &[&id.to_string()])
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn commit_upload(&self, object: &ObjectRecord) -> Result<ObjectRecord, CatalogError> {
        let o = object;
        let upload_id = o.upload_id.to_string();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        // The customer row is locked before the upload row, the order the
        // destroy step takes them in (else the two deadlock). FOR SHARE: a
        // shred request or destroy (FOR UPDATE on it) waits for this commit,
        // or this commit sees the new state.
        let state: Option<String> = tx
            .query_opt(
                "SELECT c.state FROM customers c JOIN uploads u ON u.customer_ref = c.customer_ref
                 WHERE u.upload_id = $1 FOR SHARE OF c",
                &[&upload_id],
            )
            .await
            .map_err(backend)?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(backend)?;
        let upload = tx
            .query_opt("SELECT * FROM uploads WHERE upload_id = $1 FOR UPDATE", &[&upload_id])
            .await
            .map_err(backend)?
            .ok_or(CatalogError::NotFound)?;
        let upload = upload_from_row(&upload)?;
        let state = match state {
            Some(state) => state,
            // The upload appeared after the first read (a racing create).
            None => tx
                .query_one(
                    "SELECT state FROM customers WHERE customer_ref = $1 FOR SHARE",
                    &[&upload.customer_ref.as_bytes().as_slice()],
                )
                .await
                .map_err(backend)?
                .try_get(0)
                .map_err(backend)?,
        };
        let state = CustomerState::parse(&state).unwrap_or(CustomerState::Shredded);
        if state != CustomerState::Active {
            return Err(CatalogError::CustomerState(state));
        }
        if !upload.committed {
            let i = &o.spec.interaction;
            tx.execute(
                "INSERT INTO objects (object_id, upload_id, customer_ref, customer_id, kind, created_at_ms,
                     content_type, size, sha256, interaction_id, channel, agent_id, queue, direction,
                     started_at_ms, tags, key_version, wrapped_dek, retention_policy, expires_at_ms, derived_from,
                     sensitive_spans, duration_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
                         $20, $21, $22, $23)",
                &[
                    &upload.object_id.to_string(),
                    &upload_id,
                    &upload.customer_ref.as_bytes().as_slice(),
                    &o.spec.customer_id.as_str(),
                    &i16::from(o.spec.kind.code()),
                    &o.created_at_ms,
                    &o.spec.content_type,
                    &(o.size as i64),
                    &o.sha256.as_slice(),
                    &i.interaction_id,
                    &i.channel,
                    &i.agent_id,
                    &i.queue,
                    &i16::from(i.direction.code()),
                    &i.started_at_ms,
                    &serde_json::to_string(&i.tags).map_err(invalid)?,
                    &i64::from(upload.key_version),
                    &upload.wrapped_dek,
                    &Some(o.retention.policy.as_str()).filter(|p| !p.is_empty()),
                    &o.retention.expires_at_ms,
                    &o.derived_from.map(|d| d.to_string()),
                    &spans_json(&o.spec.sensitive_spans)?,
                    &i.duration_ms.map(|d| d.min(i64::MAX as u64) as i64),
                ],
            )
            .await
            .map_err(backend)?;
            // The object now holds the bytes: the journal's records go with
            // the commit, never before it.
            tx.execute("DELETE FROM journal_chunks WHERE upload_id = $1", &[&upload_id]).await.map_err(backend)?;
            tx.execute("UPDATE uploads SET committed = TRUE, wrapped_dek = NULL WHERE upload_id = $1", &[&upload_id])
                .await
                .map_err(backend)?;
        }
        let row = tx
            .query_one(&format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.upload_id = $1"), &[&upload_id])
            .await
            .map_err(backend)?;
        let stored = object_from_row(&row)?;
        tx.commit().await.map_err(backend)?;
        Ok(stored)
    }

    async fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {OBJECT_COLUMNS}, c.state AS customer_state FROM objects o
                     JOIN customers c ON c.customer_ref = o.customer_ref WHERE o.object_id = $1"
                ),
                &[&id.to_string()],
            )
            .await
            .map_err(backend)?;
        let Some(r) = row else { return Ok(None) };
        let state: String = get(&r, "customer_state")?;
        let shredded = get::<i16>(&r, "shredded")? == SHREDDED;
        Ok(Some(StoredObject {
            record: object_from_row(&r)?,
            customer_ref: ref_from(get(&r, "customer_ref")?)?,
            customer_state: if shredded {
                CustomerState::Shredded
            } else {
                CustomerState::parse(&state).unwrap_or(CustomerState::Shredded)
            },
            expired_at_ms: get(&r, "expired_at_ms")?,
            key_version: get::<Option<i64>>(&r, "key_version")?
                .map(|v| u32::try_from(v).map_err(invalid))
                .transpose()?
                .unwrap_or(0),
            wrapped_dek: get::<Option<Vec<u8>>>(&r, "wrapped_dek")?.unwrap_or_default(),
        }))
    }

    async fn list_objects(
        &self,
        filter: &ListFilter,
        after: Option<PageCursor>,
        limit: usize,
    ) -> Result<Vec<ObjectRecord>, CatalogError> {
        let (filter_sql, mut args) = filter_sql(filter, after);
        args.push(Box::new(limit_param(limit)));
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref
             WHERE {filter_sql} ORDER BY o.created_at_ms DESC, o.object_id DESC LIMIT ${}",
            args.len()
        );
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
        let client = self.pool.get().await.map_err(pool_err)?;
        client.query(&sql, &params).await.map_err(backend)?.iter().map(object_from_row).collect()
    }

    async fn count_objects(&self, filter: &ListFilter) -> Result<u64, CatalogError> {
        let (filter_sql, args) = filter_sql(filter, None);
        let sql = format!(
            "SELECT COUNT(*) FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref WHERE {filter_sql}"
        );
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
        let client = self.pool.get().await.map_err(pool_err)?;
        let n: i64 = client.query_one(&sql, &params).await.map_err(backend)?.try_get(0).map_err(backend)?;
        Ok(n as u64)
    }

    async fn request_shred(&self, id: &CustomerId, request: &ShredRequest) -> Result<ShredTicket, CatalogError> {
        let (id, r) = (id.as_str(), request);
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let customer = customer_from_row(&customer_row_locked(&tx, id).await?)?;
        match customer.state {
            CustomerState::Shredded => return Err(CatalogError::CustomerState(CustomerState::Shredded)),
            CustomerState::PendingShred => return ticket_in(&tx, id).await,
            CustomerState::Active => {}
        }
        let holds = active_holds(&tx, id).await?;
        if !holds.is_empty() {
            return Err(CatalogError::Held(holds));
        }
        tx.execute(
            "UPDATE customers SET state = 'pending_shred', shred_reason = $2, shred_requested_by = $3,
             shred_requested_at_ms = $4, shred_destroy_after_ms = $5, shred_requires_approval = $6,
             shred_approved_by = NULL, shred_approved_at_ms = NULL
             WHERE customer_id = $1",
            &[&id, &r.reason, &r.requested_by, &r.requested_at_ms, &r.destroy_after_ms, &r.requires_approval],
        )
        .await
        .map_err(backend)?;
        self.notify_revoked(&tx, Some(&customer.customer_ref)).await?;
        let ticket = ticket_in(&tx, id).await?;
        tx.commit().await.map_err(backend)?;
        Ok(ticket)
    }

    async fn approve_shred(&self, id: &CustomerId, approver: &str, now_ms: i64) -> Result<ShredTicket, CatalogError> {
        let id = id.as_str();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let customer = customer_from_row(&customer_row_locked(&tx, id).await?)?;
        if customer.state != CustomerState::PendingShred {
            return Err(CatalogError::CustomerState(customer.state));
        }
        let ticket = ticket_in(&tx, id).await?;
        if ticket.requested_by == approver {
            return Err(CatalogError::Conflict(format!(
                "the shred of {id} was requested by {approver}; a different person must approve it"
            )));
        }
        if ticket.approved_by.is_none() {
            tx.execute(
                "UPDATE customers SET shred_approved_by = $2, shred_approved_at_ms = $3 WHERE customer_id = $1",
                &[&id, &approver, &now_ms],
            )
            .await
            .map_err(backend)?;
        }
        let ticket = ticket_in(&tx, id).await?;
        tx.commit().await.map_err(backend)?;
        Ok(ticket)
    }

    async fn cancel_shred(&self, id: &CustomerId) -> Result<ShredTicket, CatalogError> {
        let id = id.as_str();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let customer = customer_from_row(&customer_row_locked(&tx, id).await?)?;
        if customer.state != CustomerState::PendingShred {
            return Err(CatalogError::CustomerState(customer.state));
        }
        let mut ticket = ticket_in(&tx, id).await?;
        if ticket.destroyed.is_some() {
            return Err(CatalogError::Conflict(format!(
                "the keys of {id} are already destroyed; the shred can no longer be cancelled"
            )));
        }
        tx.execute("UPDATE customers SET state = 'active' WHERE customer_id = $1", &[&id]).await.map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        ticket.state = CustomerState::Active;
        Ok(ticket)
    }

    async fn shred_ticket(&self, id: &CustomerId) -> Result<Option<ShredTicket>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt("SELECT * FROM customers WHERE customer_id = $1", &[&id.as_str()])
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(ticket_from_row).transpose()?.flatten())
    }

    async fn pending_shreds(&self) -> Result<Vec<ShredTicket>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let rows = client
            .query(
                "SELECT * FROM customers WHERE state = 'pending_shred' ORDER BY shred_destroy_after_ms, customer_id",
                &[],
            )
            .await
            .map_err(backend)?;
        let tickets = rows.iter().map(ticket_from_row).collect::<Result<Vec<_>, _>>()?;
        Ok(tickets.into_iter().flatten().collect())
    }

    async fn destroy_customer_keys(&self, id: &CustomerId, now_ms: i64) -> Result<ShredTicket, CatalogError> {
        let id = id.as_str();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let customer = customer_from_row(&customer_row_locked(&tx, id).await?)?;
        if customer.state != CustomerState::PendingShred {
            return Err(CatalogError::CustomerState(customer.state));
        }
        let ticket = ticket_in(&tx, id).await?;
        if ticket.destroyed.is_some() {
            return Ok(ticket);
        }
        let holds = active_holds(&tx, id).await?;
        if !holds.is_empty() {
            return Err(CatalogError::Held(holds));
        }
        let cref = customer.customer_ref.as_bytes().as_slice();
        let strings = |rows: Vec<Row>| -> Result<Vec<String>, CatalogError> {
            rows.iter().map(|r| r.try_get::<_, String>(0).map_err(backend)).collect()
        };
        // Locked so an expiry sweep running now cannot change the set
        // between this count and the update below.
        let objects = strings(
            tx.query(
                &format!(
                    "SELECT object_id FROM objects WHERE customer_ref = $1 AND shredded = {LIVE}
                     ORDER BY object_id FOR UPDATE"
                ),
                &[&cref],
            )
            .await
            .map_err(backend)?,
        )?;
        let uploads = strings(
            tx.query("SELECT upload_id FROM uploads WHERE customer_ref = $1 AND NOT committed", &[&cref])
                .await
                .map_err(backend)?,
        )?;
        let versions: Vec<i64> = tx
            .query("SELECT version FROM customer_keys WHERE customer_ref = $1 ORDER BY version", &[&cref])
            .await
            .map_err(backend)?
            .iter()
            .map(|r| r.try_get(0).map_err(backend))
            .collect::<Result<_, _>>()?;
        let root_ids = strings(
            tx.query(
                "SELECT DISTINCT root_key_id COLLATE \"C\" FROM customer_keys WHERE customer_ref = $1 ORDER BY 1",
                &[&cref],
            )
            .await
            .map_err(backend)?,
        )?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for o in &objects {
            digest.update(o.as_bytes());
            digest.update(b"\n");
        }
        let digest = digest.finish();
        tx.execute("DELETE FROM customer_keys WHERE customer_ref = $1", &[&cref]).await.map_err(backend)?;
        tx.execute(
            &format!(
                "UPDATE objects SET shredded = {SHREDDED}, {SCRUB_OBJECT} WHERE customer_ref = $1 AND shredded = {LIVE}"
            ),
            &[&cref],
        )
        .await
        .map_err(backend)?;
        // Expired tombstones hold nothing more to scrub; committed uploads
        // keep their spec (metadata) until now.
        tx.execute("DELETE FROM uploads WHERE customer_ref = $1", &[&cref]).await.map_err(backend)?;
        tx.execute(
            "UPDATE customers SET shred_destroyed_at_ms = $2, shred_key_versions = $3, shred_root_key_ids = $4,
             shred_objects = $5, shred_objects_digest = $6, shred_uploads = $7 WHERE customer_ref = $1",
            &[&cref, &now_ms, &versions, &root_ids, &(objects.len() as i64), &digest.as_ref(), &(uploads.len() as i64)],
        )
        .await
        .map_err(backend)?;
        let ticket = ticket_in(&tx, id).await?;
        self.notify_revoked(&tx, Some(&customer.customer_ref)).await?;
        tx.commit().await.map_err(backend)?;
        drop(client);
        self.vacuum(SHRED_TABLES).await;
        Ok(ticket)
    }

    async fn customer_key_versions(&self, customer: &CustomerRef) -> Result<Vec<u32>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .query(
                "SELECT version FROM customer_keys WHERE customer_ref = $1 ORDER BY version",
                &[&customer.as_bytes().as_slice()],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| u32_col(r, "version"))
            .collect()
    }

    async fn complete_shred(
        &self,
        id: &CustomerId,
        certificate: &str,
        now_ms: i64,
    ) -> Result<ShredTicket, CatalogError> {
        let id = id.as_str();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let ticket = ticket_from_row(&customer_row_locked(&tx, id).await?)?.ok_or(CatalogError::NotFound)?;
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
            "UPDATE customers SET state = 'shredded', canary = NULL, shredded_at_ms = $2, shred_certificate = $3
             WHERE customer_id = $1",
            &[&id, &now_ms, &certificate],
        )
        .await
        .map_err(backend)?;
        let ticket = ticket_in(&tx, id).await?;
        tx.commit().await.map_err(backend)?;
        drop(client);
        // The canary (a key wrapped under the destroyed customer key)
        // lives on in the old customers tuple until this.
        self.vacuum("customers").await;
        Ok(ticket)
    }

    async fn tombstoned_objects(&self, customer: &CustomerRef) -> Result<Vec<ObjectId>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .query(
                &format!("SELECT object_id FROM objects WHERE customer_ref = $1 AND shredded != {LIVE}"),
                &[&customer.as_bytes().as_slice()],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| ObjectId::parse(get(r, "object_id")?).map_err(invalid))
            .collect()
    }

    async fn policies(&self) -> Result<Vec<StoredPolicy>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .query("SELECT body, from_config, updated_at_ms FROM retention_policies ORDER BY name", &[])
            .await
            .map_err(backend)?
            .iter()
            .map(policy_from_row)
            .collect()
    }

    async fn put_policy(&self, policy: &StoredPolicy) -> Result<(), CatalogError> {
        let p = policy;
        let body = serde_json::to_string(&p.policy).map_err(invalid)?;
        let client = self.pool.get().await.map_err(pool_err)?;
        // One statement: the config-origin check and the write cannot be
        // split by a concurrent writer.
        let written = client
            .execute(
                "INSERT INTO retention_policies (name, body, from_config, updated_at_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, from_config = EXCLUDED.from_config,
                 updated_at_ms = EXCLUDED.updated_at_ms
                 WHERE NOT retention_policies.from_config OR EXCLUDED.from_config",
                &[&p.policy.name, &body, &p.from_config, &p.updated_at_ms],
            )
            .await
            .map_err(backend)?;
        if written == 0 {
            return Err(CatalogError::Conflict(format!(
                "retention policy {} is defined in the config file; change it there",
                p.policy.name
            )));
        }
        Ok(())
    }

    async fn delete_policy(&self, name: &str, from_config: bool) -> Result<(), CatalogError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let existing: bool = tx
            .query_opt("SELECT from_config FROM retention_policies WHERE name = $1 FOR UPDATE", &[&name])
            .await
            .map_err(backend)?
            .ok_or(CatalogError::NotFound)?
            .try_get(0)
            .map_err(backend)?;
        if existing && !from_config {
            return Err(CatalogError::Conflict(format!(
                "retention policy {name} is defined in the config file; remove it there"
            )));
        }
        tx.execute("DELETE FROM retention_policies WHERE name = $1", &[&name]).await.map_err(backend)?;
        tx.commit().await.map_err(backend)
    }

    async fn add_sensitive_spans(&self, id: &ObjectId, spans: &[TimeSpan]) -> Result<Vec<TimeSpan>, CatalogError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let id = id.to_string();
        let row = tx
            .query_opt(
                &format!("SELECT sensitive_spans FROM objects WHERE object_id = $1 AND shredded = {LIVE} FOR UPDATE"),
                &[&id],
            )
            .await
            .map_err(backend)?
            .ok_or(CatalogError::NotFound)?;
        let current: Vec<TimeSpan> = get::<Option<String>>(&row, "sensitive_spans")?
            .map(|s| serde_json::from_str(&s).map_err(invalid))
            .transpose()?
            .unwrap_or_default();
        let merged = TimeSpan::merge(&current, spans);
        tx.execute("UPDATE objects SET sensitive_spans = $2 WHERE object_id = $1", &[&id, &spans_json(&merged)?])
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(merged)
    }

    async fn set_retention(&self, id: &ObjectId, retention: &Retention) -> Result<(), CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute(
                &format!(
                    "UPDATE objects SET retention_policy = $2, expires_at_ms = $3
                     WHERE object_id = $1 AND shredded = {LIVE}"
                ),
                &[
                    &id.to_string(),
                    &Some(retention.policy.as_str()).filter(|p| !p.is_empty()),
                    &retention.expires_at_ms,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn count_expiring(&self, now_ms: i64) -> Result<ExpiryCount, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_one(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN {NOT_HELD} THEN 0 ELSE 1 END), 0)::BIGINT
                     FROM objects o JOIN customers c ON c.customer_ref = o.customer_ref
                     WHERE o.shredded = {LIVE} AND c.state = 'active' AND o.expires_at_ms <= $1"
                ),
                &[&now_ms],
            )
            .await
            .map_err(backend)?;
        let due: i64 = row.try_get(0).map_err(backend)?;
        let held: i64 = row.try_get(1).map_err(backend)?;
        Ok(ExpiryCount { due: due as u64, held: held as u64 })
    }

    async fn expire_objects(&self, now_ms: i64, limit: usize) -> Result<Vec<ExpiredObject>, CatalogError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        // SKIP LOCKED: sweeps on two replicas take disjoint batches, and a
        // customer being shredded right now (its row locked FOR UPDATE) is
        // left to the shred. FOR SHARE on the customer keeps a shred from
        // starting until this batch commits.
        let due = tx
            .query(
                &format!(
                    "SELECT o.object_id, o.customer_id, o.customer_ref, o.kind FROM objects o
                     JOIN customers c ON c.customer_ref = o.customer_ref
                     WHERE o.shredded = {LIVE} AND c.state = 'active' AND o.expires_at_ms <= $1 AND {NOT_HELD}
                     ORDER BY o.expires_at_ms, o.object_id LIMIT $2
                     FOR UPDATE OF o SKIP LOCKED FOR SHARE OF c SKIP LOCKED"
                ),
                &[&now_ms, &limit_param(limit)],
            )
            .await
            .map_err(backend)?;
        let mut expired = Vec::with_capacity(due.len());
        for row in &due {
            let object_id: String = get(row, "object_id")?;
            let customer_ref: Vec<u8> = get(row, "customer_ref")?;
            tx.execute(
                &format!(
                    "UPDATE objects SET shredded = {EXPIRED}, expired_at_ms = $2, {SCRUB_OBJECT} WHERE object_id = $1"
                ),
                &[&object_id, &now_ms],
            )
            .await
            .map_err(backend)?;
            // The upload row keeps its spec (interaction metadata, tags)
            // for idempotent retries; keep only what the tombstone keeps.
            let scrubbed = ObjectSpec {
                customer_id: CustomerId::parse(get(row, "customer_id")?).map_err(invalid)?,
                kind: kind_from(get(row, "kind")?),
                content_type: String::new(),
                interaction: Interaction::default(),
                sensitive_spans: Vec::new(),
            };
            tx.execute(
                "UPDATE uploads SET spec = $2 WHERE object_id = $1 AND customer_ref = $3",
                &[&object_id, &serde_json::to_string(&scrubbed).map_err(invalid)?, &customer_ref],
            )
            .await
            .map_err(backend)?;
            expired.push(ExpiredObject {
                object_id: ObjectId::parse(&object_id).map_err(invalid)?,
                customer_id: scrubbed.customer_id,
                expired_at_ms: now_ms,
            });
        }
        if !expired.is_empty() {
            self.notify_revoked(&tx, None).await?;
        }
        tx.commit().await.map_err(backend)?;
        drop(client);
        if !expired.is_empty() {
            self.vacuum(EXPIRY_TABLES).await;
        }
        Ok(expired)
    }

    async fn expired_objects(&self, after: Option<ObjectId>, limit: usize) -> Result<Vec<ObjectId>, CatalogError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .query(
                &format!(
                    "SELECT object_id FROM objects WHERE shredded = {EXPIRED} AND object_id > $1
                     ORDER BY object_id LIMIT $2"
                ),
                &[&after, &limit_param(limit)],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| ObjectId::parse(get(r, "object_id")?).map_err(invalid))
            .collect()
    }

    async fn place_hold(&self, hold: &Hold) -> Result<Hold, CatalogError> {
        let h = hold;
        let customer_id = h.customer_id.as_str();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        // FOR SHARE: a concurrent shred request (FOR UPDATE) waits for this
        // hold and then sees it. A customer with no row yet can be held.
        let row = tx
            .query_opt("SELECT * FROM customers WHERE customer_id = $1 FOR SHARE", &[&customer_id])
            .await
            .map_err(backend)?;
        if let Some(row) = row {
            let customer = customer_from_row(&row)?;
            if customer.state == CustomerState::Shredded {
                return Err(CatalogError::CustomerState(CustomerState::Shredded));
            }
            if customer.state == CustomerState::PendingShred
                && ticket_from_row(&row)?.is_some_and(|t| t.destroyed.is_some())
            {
                return Err(CatalogError::Conflict(format!(
                    "the keys of {} are already destroyed; there is nothing left to hold",
                    h.customer_id
                )));
            }
        }
        tx.execute(
            "INSERT INTO holds (hold_id, customer_id, interaction_id, case_ref, reason, placed_by, placed_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &h.hold_id.to_string(),
                &customer_id,
                &h.interaction_id,
                &h.case_ref,
                &h.reason,
                &h.placed_by,
                &h.placed_at_ms,
            ],
        )
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(h.clone())
    }

    async fn release_hold(&self, id: &HoldId, by: &str, now_ms: i64) -> Result<Hold, CatalogError> {
        let id = id.to_string();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        let hold = tx
            .query_opt("SELECT * FROM holds WHERE hold_id = $1 FOR UPDATE", &[&id])
            .await
            .map_err(backend)?
            .ok_or(CatalogError::NotFound)?;
        let hold = hold_from_row(&hold)?;
        if !hold.is_active() {
            return Err(CatalogError::Conflict(format!(
                "{} was already released by {}",
                hold.describe(),
                hold.released_by.unwrap_or_default()
            )));
        }
        let row = tx
            .query_one(
                "UPDATE holds SET released_by = $2, released_at_ms = $3 WHERE hold_id = $1 RETURNING *",
                &[&id, &by, &now_ms],
            )
            .await
            .map_err(backend)?;
        let hold = hold_from_row(&row)?;
        tx.commit().await.map_err(backend)?;
        Ok(hold)
    }

    async fn holds(&self, customer: Option<&CustomerId>, include_released: bool) -> Result<Vec<Hold>, CatalogError> {
        let customer = customer.map(CustomerId::as_str);
        let mut sql = String::from("SELECT * FROM holds WHERE ($1::TEXT IS NULL OR customer_id = $1)");
        if !include_released {
            sql.push_str(" AND released_at_ms IS NULL");
        }
        sql.push_str(" ORDER BY placed_at_ms DESC, hold_id");
        let client = self.pool.get().await.map_err(pool_err)?;
        client.query(&sql, &[&customer]).await.map_err(backend)?.iter().map(hold_from_row).collect()
    }

    async fn unfinished_uploads(&self, before_ms: i64) -> Result<Vec<UploadRecord>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .query(
                "SELECT * FROM uploads WHERE NOT committed AND created_at_ms < $1 ORDER BY created_at_ms, upload_id",
                &[&before_ms],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(upload_from_row)
            .collect()
    }

    async fn set_consent(&self, consent: &Consent) -> Result<(), CatalogError> {
        let k = consent;
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute(
                "INSERT INTO consent (customer_id, training_use, updated_by, updated_at_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (customer_id) DO UPDATE SET training_use = EXCLUDED.training_use,
                 updated_by = EXCLUDED.updated_by, updated_at_ms = EXCLUDED.updated_at_ms",
                &[&k.customer_id.as_str(), &k.training_use, &k.updated_by, &k.updated_at_ms],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn consent(&self, id: &CustomerId) -> Result<Option<Consent>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt(
                "SELECT training_use, updated_by, updated_at_ms FROM consent WHERE customer_id = $1",
                &[&id.as_str()],
            )
            .await
            .map_err(backend)?;
        row.map(|r| {
            Ok(Consent {
                customer_id: id.clone(),
                training_use: get(&r, "training_use")?,
                updated_by: get(&r, "updated_by")?,
                updated_at_ms: get(&r, "updated_at_ms")?,
            })
        })
        .transpose()
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), CatalogError> {
        let t = token;
        let roles: Vec<&str> = t.roles.iter().map(|r| r.name()).collect();
        let client = self.pool.get().await.map_err(pool_err)?;
        let inserted = client
            .execute(
                "INSERT INTO tokens (token_id, name, roles, unredacted, secret_sha256, created_by, created_at_ms,
                 expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (token_id) DO NOTHING",
                &[
                    &t.token_id,
                    &t.name,
                    &roles.join(","),
                    &t.unredacted,
                    &&t.secret_sha256[..],
                    &t.created_by,
                    &t.created_at_ms,
                    &t.expires_at_ms,
                ],
            )
            .await
            .map_err(backend)?;
        if inserted == 0 {
            return Err(CatalogError::Conflict(format!("token id {} is taken", t.token_id)));
        }
        Ok(())
    }

    async fn token(&self, token_id: &str) -> Result<Option<TokenRecord>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = $1"), &[&token_id])
            .await
            .map_err(backend)?;
        row.as_ref().map(read_token).transpose()
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let rows = client
            .query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at_ms DESC, token_id"), &[])
            .await
            .map_err(backend)?;
        rows.iter().map(read_token).collect()
    }

    async fn revoke_token(&self, token_id: &str, now_ms: i64) -> Result<TokenRecord, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE token_id = $1
                     RETURNING {TOKEN_COLUMNS}"
                ),
                &[&token_id, &now_ms],
            )
            .await
            .map_err(backend)?;
        row.as_ref().map(read_token).transpose()?.ok_or(CatalogError::NotFound)
    }

    async fn meta_compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let changed = match expected {
            None => {
                client
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                        &[&key, &value],
                    )
                    .await
            }
            Some(old) => {
                client.execute("UPDATE meta SET value = $2 WHERE key = $1 AND value = $3", &[&key, &value, &old]).await
            }
        }
        .map_err(backend)?;
        Ok(changed == 1)
    }

    async fn count_customer_keys_by_root(&self) -> Result<Vec<(String, u64)>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let rows = client
            .query(
                "SELECT root_key_id COLLATE \"C\" AS root_key_id, COUNT(*) AS n FROM customer_keys
                 GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| Ok((get(r, "root_key_id")?, u64::try_from(get::<i64>(r, "n")?).map_err(invalid)?)))
            .collect()
    }

    async fn customer_keys_not_under(
        &self,
        root_key_id: &str,
        after: Option<(CustomerRef, u32)>,
        limit: usize,
    ) -> Result<Vec<(CustomerId, CustomerKeyRecord)>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        // An empty byte string sorts before every 16-byte reference.
        let (after_ref, after_version) = after.map_or((Vec::new(), 0), |(r, v)| (r.as_bytes().to_vec(), v));
        let rows = client
            .query(
                "SELECT c.customer_id, k.customer_ref, k.version, k.root_key_id, k.wrapped_key
                 FROM customer_keys k JOIN customers c ON c.customer_ref = k.customer_ref
                 WHERE k.root_key_id <> $1 AND (k.customer_ref, k.version) > ($2, $3)
                 ORDER BY k.customer_ref, k.version LIMIT $4",
                &[&root_key_id, &after_ref, &i64::from(after_version), &limit_param(limit)],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let id: String = get(r, "customer_id")?;
                Ok((
                    CustomerId::parse(&id).map_err(invalid)?,
                    CustomerKeyRecord {
                        customer_ref: ref_from(get(r, "customer_ref")?)?,
                        version: u32_col(r, "version")?,
                        root_key_id: get(r, "root_key_id")?,
                        wrapped_key: get(r, "wrapped_key")?,
                    },
                ))
            })
            .collect()
    }

    async fn rewrap_customer_key(&self, key: &CustomerKeyRecord, old_root_key_id: &str) -> Result<bool, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let changed = client
            .execute(
                "UPDATE customer_keys SET root_key_id = $3, wrapped_key = $4
                 WHERE customer_ref = $1 AND version = $2 AND root_key_id = $5",
                &[
                    &key.customer_ref.as_bytes().as_slice(),
                    &i64::from(key.version),
                    &key.root_key_id,
                    &key.wrapped_key,
                    &old_root_key_id,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(changed == 1)
    }

    async fn claim_journal(&self, upload: &UploadId) -> Result<u64, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_opt(
                "UPDATE uploads SET writer_epoch = writer_epoch + 1 WHERE upload_id = $1 AND NOT committed
                 RETURNING writer_epoch",
                &[&upload.to_string()],
            )
            .await
            .map_err(backend)?
            .ok_or(CatalogError::NotFound)?;
        Ok(row.try_get::<_, i64>(0).map_err(backend)? as u64)
    }

    async fn append_journal(
        &self,
        upload: &UploadId,
        epoch: u64,
        start: u64,
        end: u64,
        sealed: &[u8],
    ) -> Result<(), CatalogError> {
        let id = upload.to_string();
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(backend)?;
        // FOR SHARE of the customer, as a commit takes it: a shred request
        // (FOR UPDATE) either waits for this append or is seen by it. FOR
        // UPDATE of the upload serialises appends and claims.
        let row = tx
            .query_opt(
                "SELECT u.writer_epoch, c.state,
                        COALESCE((SELECT MAX(end_offset) FROM journal_chunks j WHERE j.upload_id = u.upload_id), 0)
                 FROM uploads u JOIN customers c ON c.customer_ref = u.customer_ref
                 WHERE u.upload_id = $1 AND NOT u.committed
                 FOR SHARE OF c FOR UPDATE OF u",
                &[&id],
            )
            .await
            .map_err(backend)?
            .ok_or(CatalogError::NotFound)?;
        let current: i64 = row.try_get(0).map_err(backend)?;
        let state: String = row.try_get(1).map_err(backend)?;
        let journal_end: i64 = row.try_get(2).map_err(backend)?;
        check_append(current as u64, epoch, &state, journal_end as u64, start, end)?;
        tx.execute(
            "INSERT INTO journal_chunks (upload_id, start_offset, end_offset, sealed) VALUES ($1, $2, $3, $4)",
            &[&id, &(start as i64), &(end as i64), &sealed],
        )
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)
    }

    async fn journal_chunks(
        &self,
        upload: &UploadId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<JournalChunk>, CatalogError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let rows = client
            .query(
                "SELECT start_offset, end_offset, sealed FROM journal_chunks
                 WHERE upload_id = $1 AND start_offset >= $2 ORDER BY start_offset LIMIT $3",
                &[&upload.to_string(), &(from as i64), &limit_param(limit)],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                Ok(JournalChunk {
                    start: r.try_get::<_, i64>(0).map_err(backend)? as u64,
                    end: r.try_get::<_, i64>(1).map_err(backend)? as u64,
                    sealed: r.try_get(2).map_err(backend)?,
                })
            })
            .collect()
    }

    /// A session-level advisory lock on a connection of its own: it is
    /// released when the guard drops the connection, and by the server if
    /// this process dies, so a crashed sweeper never blocks the others.
    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, CatalogError> {
        let (client, connection) = self.session().await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext($1)::bigint)",
                &[&format!("recvault.sweep:{}", self.schema)],
            )
            .await
            .map_err(backend)?
            .try_get(0)
            .map_err(backend)?;
        if !got {
            return Ok(None);
        }
        Ok(Some(SweepLock::new(SessionGuard { _client: client, task })))
    }

    async fn watch_revocations(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Revoked>>, CatalogError> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        // The first connection is made here so a broken configuration
        // fails the start; later losses are retried in the background.
        let first = self.listen().await?;
        let catalog = self.clone();
        tokio::spawn(async move {
            let mut session = Some(first);
            loop {
                if let Some((client, connection)) = session.take() {
                    catalog.forward_notifications(client, connection, &tx).await;
                }
                if tx.is_closed() {
                    return;
                }
                // Notifications sent while no one listened are lost: tell
                // the replica to re-check everything it serves.
                if tx.send(Revoked::Any).await.is_err() {
                    return;
                }
                tokio::time::sleep(LISTEN_RETRY).await;
                match catalog.listen().await {
                    Ok(s) => session = Some(s),
                    Err(e) => tracing::warn!(error = %e, "revocation listener cannot reconnect; retrying"),
                }
            }
        });
        Ok(Some(rx))
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use futures::FutureExt;

    use super::*;

    /// The local test server; override with `RECVAULT_TEST_PG`.
    const DEFAULT_TEST_PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

    /// The residue test reads raw pages and needs no other transaction in
    /// the database holding back VACUUM's horizon: the tests here run one
    /// at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Written straight to stderr: libtest captures `eprintln!` of passing
    /// tests, and a skip must be seen.
    fn loud(line: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// The connection string, or `None` when the PostgreSQL tests are
    /// skipped on purpose (`RECVAULT_SKIP_PG=1`). An unreachable server
    /// fails the test: a silent pass would hide an untested backend.
    fn test_pg() -> Option<String> {
        if std::env::var("RECVAULT_SKIP_PG").as_deref() == Ok("1") {
            loud("!!!!! SKIPPED: PostgreSQL catalog test (RECVAULT_SKIP_PG=1); the PostgreSQL backend is UNTESTED");
            return None;
        }
        Some(std::env::var("RECVAULT_TEST_PG").unwrap_or_else(|_| DEFAULT_TEST_PG.to_owned()))
    }

    /// A plain client for the test's own checks and cleanup.
    async fn admin(conn: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(conn, NoTls).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {conn:?}: {e}. Start it, point RECVAULT_TEST_PG at a reachable server, \
                 or set RECVAULT_SKIP_PG=1 to skip the PostgreSQL catalog tests"
            )
        });
        tokio::spawn(connection);
        client
    }

    /// Runs `test` against a catalog in a fresh, uniquely named schema and
    /// drops the schema afterwards, also when the test panics.
    async fn with_catalog<F, Fut>(test: F)
    where
        F: FnOnce(PostgresCatalog, tokio_postgres::Client, String) -> Fut,
        Fut: Future<Output = ()>,
    {
        let Some(conn) = test_pg() else { return };
        let _serial = SERIAL.lock().await;
        let schema = format!("recvault_test_{}", uuid::Uuid::new_v4().simple());
        let catalog = PostgresCatalog::connect(&conn, &schema).await.unwrap_or_else(|e| {
            panic!("cannot open a PostgreSQL catalog at {conn:?} ({e}); set RECVAULT_SKIP_PG=1 to skip")
        });
        let cleanup = admin(&conn).await;
        let outcome = std::panic::AssertUnwindSafe(test(catalog.clone(), admin(&conn).await, schema.clone()))
            .catch_unwind()
            .await;
        catalog.pool.close();
        cleanup.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[tokio::test]
    async fn conformance_postgres() {
        with_catalog(|catalog, _, _| async move {
            super::super::conformance::run(&catalog).await;
        })
        .await;
    }

    #[tokio::test]
    async fn journal_conformance_postgres() {
        with_catalog(|catalog, _, _| async move {
            super::super::conformance::journal(&catalog).await;
        })
        .await;
    }

    /// Exactly one replica sweeps: a second session is refused the lock
    /// while the first holds it, and gets it once the first lets go (or
    /// dies: the server drops a session's locks with it).
    #[tokio::test]
    async fn one_sweeper_among_replicas() {
        with_catalog(|catalog, _, schema| async move {
            let conn = test_pg().unwrap_or_default();
            let other = PostgresCatalog::connect(&conn, &schema).await.unwrap();
            let held = catalog.try_sweep_lock().await.unwrap().expect("free at first");
            assert!(other.try_sweep_lock().await.unwrap().is_none(), "held by the first replica");
            assert!(catalog.try_sweep_lock().await.unwrap().is_none(), "not re-entrant either");
            drop(held);
            // The unlock is the connection closing: give the server a moment.
            let mut taken = None;
            for _ in 0..100 {
                taken = other.try_sweep_lock().await.unwrap();
                if taken.is_some() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(taken.is_some(), "free again once the holder let go");
        })
        .await;
    }

    /// A shred request committed through one catalog handle reaches a
    /// listener of another (another replica) with the customer named.
    #[tokio::test]
    async fn revocations_reach_other_replicas() {
        with_catalog(|catalog, _, schema| async move {
            let conn = test_pg().unwrap_or_default();
            let other = PostgresCatalog::connect(&conn, &schema).await.unwrap();
            let mut revoked = other.watch_revocations().await.unwrap().expect("postgres is shared");
            let customer = crate::catalog::CustomerRecord {
                customer_ref: CustomerRef::new_random(),
                customer_id: CustomerId::parse("crm:notify").unwrap(),
                state: CustomerState::Active,
                active_version: 1,
                canary: vec![1; 61],
                created_at_ms: 1,
            };
            let key = CustomerKeyRecord {
                customer_ref: customer.customer_ref,
                version: 1,
                root_key_id: "t".into(),
                wrapped_key: vec![2; 61],
            };
            catalog.create_customer(&customer, &key).await.unwrap();
            let request = ShredRequest {
                reason: "r".into(),
                requested_by: "a".into(),
                requested_at_ms: 1,
                destroy_after_ms: 1,
                requires_approval: false,
            };
            catalog.request_shred(&customer.customer_id, &request).await.unwrap();
            let got = tokio::time::timeout(std::time::Duration::from_secs(30), revoked.recv()).await;
            assert_eq!(got.expect("notified").expect("listener alive"), Revoked::Customer(customer.customer_ref));
        })
        .await;
    }

    #[tokio::test]
    async fn conformance_postgres_root_rotation() {
        with_catalog(|catalog, _, _| async move {
            super::super::conformance::root_rotation(&catalog).await;
        })
        .await;
    }

    #[tokio::test]
    async fn migrations_run_once_when_replicas_start_together() {
        with_catalog(|_, admin, schema| async move {
            let conn = test_pg().unwrap_or_default();
            let (a, b) =
                tokio::join!(PostgresCatalog::connect(&conn, &schema), PostgresCatalog::connect(&conn, &schema));
            let (a, b) = (a.unwrap(), b.unwrap());
            let rows = admin
                .query(&format!("SELECT version FROM {schema}.schema_migrations ORDER BY version"), &[])
                .await
                .unwrap();
            let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(versions, MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>());
            // A catalog newer than the binary is refused, not downgraded.
            admin
                .execute(
                    &format!("INSERT INTO {schema}.schema_migrations (version, name) VALUES (9999, 'future')"),
                    &[],
                )
                .await
                .unwrap();
            let err = PostgresCatalog::connect(&conn, &schema).await.err().expect("newer schema refused");
            assert!(err.to_string().contains("newer than this build"), "{err}");
            a.pool.close();
            b.pool.close();
        })
        .await;
    }

    #[tokio::test]
    async fn schema_names_are_plain_identifiers() {
        for bad in ["", "Public", "a;drop", "pg_catalog", "x y", "\"q\"", &"a".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
        check_schema("recvault_1").unwrap();
        // Refused before any connection is tried.
        let err = PostgresCatalog::connect("host=127.0.0.1 port=1", "bad;name").await.err().expect("refused");
        assert!(err.to_string().contains("schema name"), "{err}");
    }

    /// Whether any tuple on the heap pages (live or dead, i.e. any line
    /// pointer still in use) contains `needle`. Bytes in a page's free
    /// space are not tuples: VACUUM leaves them there (docs/POSTGRES.md).
    fn in_tuples(file: &[u8], needle: &[u8]) -> bool {
        const PAGE: usize = 8192;
        file.chunks(PAGE).filter(|p| p.len() == PAGE).any(|page| {
            let lower = usize::from(u16::from_le_bytes([page[12], page[13]]));
            page[24..lower.min(PAGE)].chunks_exact(4).any(|lp| {
                let lp = u32::from_le_bytes([lp[0], lp[1], lp[2], lp[3]]);
                let (off, flags, len) = ((lp & 0x7fff) as usize, (lp >> 15) & 3, (lp >> 17) as usize);
                // 0 unused, 2 redirect, 3 dead (no storage): only 1 has a tuple.
                flags == 1 && off + len <= PAGE && page[off..off + len].windows(needle.len()).any(|w| w == needle)
            })
        })
    }

    /// The heap files of `tables`, flushed to disk first.
    async fn read_heaps(
        admin: &tokio_postgres::Client,
        schema: &str,
        tables: &[&'static str],
    ) -> Result<Vec<(&'static str, Vec<u8>)>, tokio_postgres::Error> {
        admin.batch_execute("CHECKPOINT").await?;
        let mut files = Vec::new();
        for table in tables {
            let row = admin
                .query_one(
                    "SELECT pg_read_binary_file(pg_relation_filepath($1::text::regclass))",
                    &[&format!("{schema}.{table}")],
                )
                .await?;
            files.push((*table, row.get::<_, Vec<u8>>(0)));
        }
        Ok(files)
    }

    #[tokio::test]
    async fn shredded_keys_are_gone_from_tuples_after_vacuum() {
        with_catalog(|catalog, admin, schema| async move {
            let residue = super::super::conformance::run(&catalog).await;

            // An ordinary reader finds no destroyed key in any column.
            for (table, column) in [
                ("customer_keys", "wrapped_key"),
                ("customers", "canary"),
                ("objects", "wrapped_dek"),
                ("uploads", "wrapped_dek"),
                ("meta", "value"),
            ] {
                for needle in &residue {
                    let sql =
                        format!("SELECT COUNT(*) FROM {schema}.{table} WHERE position($1::bytea IN {column}) > 0");
                    let found: i64 = admin.query_one(&sql, &[&needle.as_slice()]).await.unwrap().get(0);
                    assert_eq!(found, 0, "a destroyed key is still readable in {table}.{column}");
                }
            }

            // The raw heap files: no tuple, live or dead, holds a destroyed
            // key after the catalog's VACUUM. Needs a role that may read
            // server files (superuser or pg_read_server_files).
            let tables = ["customer_keys", "customers", "objects", "uploads"];
            // The catalog vacuumed every one of them itself (vacuum
            // counts are reported when the VACUUM ends, not deferred).
            admin.execute("SELECT pg_stat_clear_snapshot()", &[]).await.unwrap();
            let rows = admin
                .query("SELECT relname::TEXT, vacuum_count FROM pg_stat_user_tables WHERE schemaname = $1", &[&schema])
                .await
                .unwrap();
            for table in tables {
                let count = rows.iter().find(|r| r.get::<_, String>(0) == table).map_or(0, |r| r.get::<_, i64>(1));
                assert!(count > 0, "the catalog never vacuumed {table} after erasing keys from it");
            }
            let mut files = match read_heaps(&admin, &schema, &tables).await {
                Ok(files) => files,
                Err(e) => {
                    loud(&format!(
                        "!!!!! raw page check SKIPPED: this role cannot CHECKPOINT or read server files ({e}); \
                         only the ordinary-reader and vacuum-count checks ran"
                    ));
                    return;
                }
            };
            // Another session's open transaction (another test run, a
            // long query) can keep dead tuples "not yet removable"; then
            // vacuum again as the catalog would on its next erasure.
            for attempt in 0.. {
                let held = files
                    .iter()
                    .filter(|(_, file)| residue.iter().any(|needle| in_tuples(file, needle)))
                    .map(|(table, _)| *table)
                    .collect::<Vec<_>>();
                if held.is_empty() {
                    break;
                }
                assert!(attempt < 10, "destroyed keys still in tuples of {held:?} after VACUUM");
                eprintln!("dead tuples in {held:?} not yet removable (another transaction is open); vacuuming again");
                tokio::time::sleep(Duration::from_millis(300)).await;
                admin.batch_execute(&format!("VACUUM {schema}.{}", held.join(&format!(", {schema}.")))).await.unwrap();
                files = read_heaps(&admin, &schema, &tables).await.unwrap();
            }
            let in_free_space = files
                .iter()
                .filter(|(_, file)| residue.iter().any(|n| file.windows(n.len()).any(|w| w == n.as_slice())))
                .map(|(table, _)| *table)
                .collect::<Vec<_>>();
            eprintln!("after VACUUM, destroyed key bytes remain in the free space of pages of: {in_free_space:?}");

            // What the operator's scheduled rewrite does (docs/POSTGRES.md):
            // after VACUUM FULL not a byte of them is left in the heap files.
            let full = tables.map(|t| format!("{schema}.{t}")).join(", ");
            admin.batch_execute(&format!("VACUUM FULL {full}")).await.unwrap();
            for (table, file) in read_heaps(&admin, &schema, &tables).await.unwrap() {
                for needle in &residue {
                    assert!(
                        !file.windows(needle.len()).any(|w| w == needle.as_slice()),
                        "destroyed key bytes survive VACUUM FULL in {table}"
                    );
                }
            }
        })
        .await;
    }

    fn upload_for(customer: &CustomerRecord, at: i64) -> (UploadRecord, ObjectRecord) {
        let spec = ObjectSpec {
            customer_id: customer.customer_id.clone(),
            kind: ContentKind::CallRecording,
            content_type: "audio/wav".into(),
            interaction: Interaction { interaction_id: format!("call-{at}"), ..Default::default() },
            sensitive_spans: Vec::new(),
        };
        let upload = UploadRecord {
            upload_id: UploadId::new_random(),
            object_id: ObjectId::new_random(),
            customer_ref: customer.customer_ref,
            spec: spec.clone(),
            key_version: 1,
            wrapped_dek: vec![0x5A; 61],
            nonce_prefix: [0; 7],
            created_at_ms: at,
            committed: false,
        };
        let object = ObjectRecord {
            object_id: upload.object_id,
            upload_id: upload.upload_id,
            spec,
            size: 1,
            sha256: [1; 32],
            created_at_ms: at,
            retention: Retention { policy: "p".into(), expires_at_ms: Some(at) },
            derived_from: None,
        };
        (upload, object)
    }

    /// What SQLite's single writer gives for free: concurrent first
    /// ingests, sweeps on two replicas, and commits racing a shred neither
    /// deadlock nor double-count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_serialise_like_sqlite() {
        with_catalog(|catalog, admin, schema| async move {
            let id = CustomerId::parse("crm:racer").unwrap();
            let creates = (0..8).map(|i| {
                let (catalog, id) = (catalog.clone(), id.clone());
                tokio::spawn(async move {
                    let customer = CustomerRecord {
                        customer_ref: CustomerRef::new_random(),
                        customer_id: id,
                        state: CustomerState::Active,
                        active_version: 1,
                        canary: vec![i; 61],
                        created_at_ms: 1,
                    };
                    let key = CustomerKeyRecord {
                        customer_ref: customer.customer_ref,
                        version: 1,
                        root_key_id: "test".into(),
                        wrapped_key: vec![i; 61],
                    };
                    catalog.create_customer(&customer, &key).await.unwrap()
                })
            });
            let created = futures::future::join_all(creates).await;
            let first = created[0].as_ref().unwrap().clone();
            assert!(created.iter().all(|c| c.as_ref().unwrap() == &first), "one customer wins");
            let keys: i64 =
                admin.query_one(&format!("SELECT COUNT(*) FROM {schema}.customer_keys"), &[]).await.unwrap().get(0);
            assert_eq!(keys, 1);

            // Two sweeps at once take disjoint batches.
            for at in 0..20 {
                let (upload, object) = upload_for(&first, at);
                catalog.create_upload(&upload).await.unwrap();
                catalog.commit_upload(&object).await.unwrap();
            }
            let sweeps = (0..4).map(|_| {
                let catalog = catalog.clone();
                tokio::spawn(async move { catalog.expire_objects(1_000, 5).await.unwrap() })
            });
            let mut expired: Vec<ObjectId> = futures::future::join_all(sweeps)
                .await
                .into_iter()
                .flat_map(|r| r.unwrap())
                .map(|e| e.object_id)
                .collect();
            expired.extend(catalog.expire_objects(1_000, 100).await.unwrap().into_iter().map(|e| e.object_id));
            let total = expired.len();
            expired.sort();
            expired.dedup();
            assert_eq!((total, expired.len()), (20, 20), "every object expired exactly once");

            // Commits racing a shred: each either lands before it (and is
            // then destroyed with the customer) or is refused.
            let pending: Vec<_> = (100..110).map(|at| upload_for(&first, at)).collect();
            for (upload, _) in &pending {
                catalog.create_upload(upload).await.unwrap();
            }
            let commits = pending.iter().map(|(_, object)| {
                let (catalog, object) = (catalog.clone(), object.clone());
                tokio::spawn(async move { catalog.commit_upload(&object).await })
            });
            let request = ShredRequest {
                reason: "race".into(),
                requested_by: "a".into(),
                requested_at_ms: 1,
                destroy_after_ms: 1,
                requires_approval: false,
            };
            let shred = {
                let (catalog, id) = (catalog.clone(), id.clone());
                tokio::spawn(async move {
                    catalog.request_shred(&id, &request).await?;
                    catalog.destroy_customer_keys(&id, 2).await
                })
            };
            for result in futures::future::join_all(commits).await {
                match result.unwrap() {
                    Ok(_) | Err(CatalogError::CustomerState(_)) | Err(CatalogError::NotFound) => {}
                    Err(e) => panic!("a commit racing the shred failed otherwise: {e}"),
                }
            }
            let ticket = shred.await.unwrap().unwrap();
            let destroyed = ticket.destroyed.expect("destroyed");
            let live: i64 = admin
                .query_one(
                    &format!(
                        "SELECT COUNT(*) FROM {schema}.objects WHERE shredded = {LIVE} OR wrapped_dek IS NOT NULL"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(live, 0, "no object outlives the destroy with its data key");
            let shredded: i64 = admin
                .query_one(&format!("SELECT COUNT(*) FROM {schema}.objects WHERE shredded = {SHREDDED}"), &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(destroyed.objects, shredded as u64, "the ticket counts what was destroyed");
        })
        .await;
    }
}
