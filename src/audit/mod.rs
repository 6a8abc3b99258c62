//! The audit trail: one record per security-relevant event, hash-chained,
//! with signed checkpoints, kept in its own SQLite file (`audit.sqlite`).
//!
//! Each record holds time, principal, action, target ids, purpose, result
//! and request id, plus a small JSON `detail` of non-secret facts (counts,
//! key versions, ranges). Never key bytes, content, transcript text or
//! tags: callers pass ids and numbers only.
//!
//! Chain (v1, do not change): `hash = SHA-256(RECORD_DOMAIN ‖ prev_hash ‖
//! seq ‖ at_ms ‖ fields)`, integers big-endian, each text field a presence
//! byte and a length-prefixed UTF-8 string; the first record's `prev_hash`
//! is 32 zero bytes. Every [`CHECKPOINT_EVERY`] records (and at start-up,
//! after a shred completes and on request) the head is signed with the
//! service's Ed25519 key, so rewriting the chain from some record on, or
//! cutting its tail, is caught by [`verify`] as well as editing, deleting,
//! inserting or reordering single records.
//!
//! Reads, shreds and expiry **fail closed**: their record is appended
//! before the action, and when it cannot be written the request fails with
//! `UNAVAILABLE`. Ingest keeps acking (the journal is durable and
//! encrypted) but an upload only commits once its record is written.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ring::digest;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::clock::Clock;
use crate::error::Error;
use crate::model::CustomerId;
use crate::retention::certificate::{SigningKey, signature_valid};
use crate::sqlite_group::{Group, GroupError};

const RECORD_DOMAIN: &[u8] = b"recvault audit record v1\n";
const CHECKPOINT_DOMAIN: &[u8] = b"recvault audit checkpoint v1\n";

/// Records between signed checkpoints.
pub const CHECKPOINT_EVERY: u64 = 64;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    seq         INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    principal   TEXT NOT NULL,
    action      TEXT NOT NULL,
    customer_id TEXT,
    target      TEXT,
    purpose     TEXT,
    result      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    detail      TEXT NOT NULL,
    prev_hash   BLOB NOT NULL,
    hash        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_customer ON records (customer_id, seq);
CREATE INDEX IF NOT EXISTS records_action ON records (action, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq       INTEGER PRIMARY KEY,
    head      BLOB NOT NULL,
    at_ms     INTEGER NOT NULL,
    key_id    TEXT NOT NULL,
    signature BLOB NOT NULL
);
";

/// Who is acting, and under which request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub principal: String,
    pub request_id: String,
}

impl Actor {
    /// The service itself (sweeps, start-up recovery).
    pub fn system(component: &str) -> Self {
        Self { principal: format!("system:{component}"), request_id: uuid::Uuid::new_v4().to_string() }
    }

    /// An authenticated caller, with the request id it sent
    /// (`x-request-id`) if that is usable, else a new one.
    pub fn new(principal: &str, request_id: Option<&str>) -> Self {
        Self { principal: principal.to_owned(), request_id: request_id_or_new(request_id) }
    }

    /// A caller that could not be identified, known only by its address
    /// (recorded when its call is refused).
    pub fn unauthenticated(addr: Option<std::net::SocketAddr>, request_id: Option<&str>) -> Self {
        let principal = match addr {
            Some(a) => format!("unauthenticated@{}", a.ip()),
            None => "unauthenticated".to_owned(),
        };
        Self { principal, request_id: request_id_or_new(request_id) }
    }
}

fn request_id_or_new(request_id: Option<&str>) -> String {
    request_id
        .filter(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// One event to record. Build with [`Event::new`] and the setters; pass
/// ids and numbers only.
#[derive(Debug, Clone)]
pub struct Event {
    action: &'static str,
    customer_id: Option<String>,
    target: Option<String>,
    purpose: Option<String>,
    result: String,
    detail: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    pub fn new(action: &'static str) -> Self {
        Self {
            action,
            customer_id: None,
            target: None,
            purpose: None,
            result: "ok".to_owned(),
            detail: serde_json::Map::new(),
        }
    }

    pub fn customer(mut self, id: &CustomerId) -> Self {
        self.customer_id = Some(id.to_string());
        self
    }

    pub fn target(mut self, target: impl std::fmt::Display) -> Self {
        self.target = Some(target.to_string());
        self
    }

    pub fn purpose(mut self, purpose: &str) -> Self {
        self.purpose = Some(purpose.to_owned());
        self
    }

    /// The action was refused or failed; `why` is a short reason (an error
    /// category or message naming ids, never content).
    pub fn result(mut self, result: impl Into<String>) -> Self {
        self.result = result.into();
        self
    }

    pub fn detail(mut self, key: &str, value: impl Serialize) -> Self {
        self.detail.insert(key.to_owned(), serde_json::to_value(value).unwrap_or(serde_json::Value::Null));
        self
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub seq: u64,
    pub at_ms: i64,
    pub principal: String,
    pub action: String,
    pub customer_id: Option<String>,
    pub target: Option<String>,
    pub purpose: Option<String>,
    pub result: String,
    pub request_id: String,
    pub detail: String,
    #[serde(serialize_with = "as_hex")]
    pub prev_hash: [u8; 32],
    #[serde(serialize_with = "as_hex")]
    pub hash: [u8; 32],
}

fn as_hex<S: serde::Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

/// The chain's head: the last record's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(self.hash))
    }
}

/// What to look for; `None` fields match everything. Newest first.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub customer_id: Option<String>,
    /// An action, or a prefix ending in `.` (`shred.` matches every step).
    pub action: Option<String>,
    pub principal: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only records with a smaller sequence number (paging backwards).
    pub before_seq: Option<u64>,
    pub limit: usize,
}

fn put_text(buf: &mut Vec<u8>, field: Option<&str>) {
    match field {
        None => buf.push(0),
        Some(t) => {
            buf.push(1);
            buf.extend_from_slice(&(t.len() as u64).to_be_bytes());
            buf.extend_from_slice(t.as_bytes());
        }
    }
}

/// The v1 record hash (see the module documentation).
pub fn record_hash(r: &Record) -> [u8; 32] {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(RECORD_DOMAIN);
    buf.extend_from_slice(&r.prev_hash);
    buf.extend_from_slice(&r.seq.to_be_bytes());
    buf.extend_from_slice(&r.at_ms.to_be_bytes());
    for field in [
        Some(r.principal.as_str()),
        Some(r.action.as_str()),
        r.customer_id.as_deref(),
        r.target.as_deref(),
        r.purpose.as_deref(),
        Some(r.result.as_str()),
        Some(r.request_id.as_str()),
        Some(r.detail.as_str()),
    ] {
        put_text(&mut buf, field);
    }
    let d = digest::digest(&digest::SHA256, &buf);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn checkpoint_message(seq: u64, head: &[u8; 32], at_ms: i64, key_id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48 + key_id.len());
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&at_ms.to_be_bytes());
    m.extend_from_slice(key_id.as_bytes());
    m
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!(
        "the audit trail cannot be written ({e}); reads, shreds, expiry and commits are refused until it can"
    ))
}

/// Where the chain stands, as the writer thread sees it (rolled back with
/// a write or batch that fails).
#[derive(Clone)]
struct Chain {
    head: Head,
    since_checkpoint: u64,
}

/// A failure inside the writer: every one of them is "cannot be written".
struct AuditFail(Error);

impl From<GroupError> for AuditFail {
    fn from(e: GroupError) -> Self {
        AuditFail(unavailable(e))
    }
}

impl From<Error> for AuditFail {
    fn from(e: Error) -> Self {
        AuditFail(e)
    }
}

/// The audit trail of one service.
///
/// Appends of concurrent callers share one transaction (`crate::sqlite_group`):
/// one `fsync` makes a batch of records durable, and no caller is answered
/// before its record is. The chain stays one chain: the writer thread links
/// the records of a batch in the order it takes them.
#[derive(Clone)]
pub struct AuditLog {
    db: Arc<Group<Chain>>,
    /// The newest durable head, for [`AuditLog::head`].
    published: Arc<Mutex<Head>>,
    signer: Arc<SigningKey>,
    clock: Arc<dyn Clock>,
    /// Gates the records anyone can cause (see [`AuditLog::append_anonymous`]).
    anonymous: Arc<Throttle>,
}

/// Anonymous refusals let through per second, and in a burst.
const ANONYMOUS_PER_SEC: f64 = 50.0;
const ANONYMOUS_BURST: f64 = 200.0;

/// A token bucket over the records of refused anonymous requests, which
/// need no credential to cause. Past it, refusals are counted, and the
/// count is written with the next record let through.
#[derive(Debug)]
struct Throttle {
    per_sec: f64,
    burst: f64,
    state: Mutex<ThrottleState>,
}

#[derive(Debug)]
struct ThrottleState {
    tokens: f64,
    at: std::time::Instant,
    suppressed: u64,
}

impl Throttle {
    fn new(per_sec: f64, burst: f64, now: std::time::Instant) -> Self {
        Self { per_sec, burst, state: Mutex::new(ThrottleState { tokens: burst, at: now, suppressed: 0 }) }
    }

    /// `Some(n)` if a record may be written now, `n` being the records
    /// suppressed since the last one let through; `None` if this one is
    /// suppressed (and counted).
    fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(st.at).as_secs_f64();
        st.tokens = (st.tokens + elapsed * self.per_sec).min(self.burst);
        st.at = now;
        if st.tokens < 1.0 {
            st.suppressed += 1;
            return None;
        }
        st.tokens -= 1.0;
        Some(std::mem::take(&mut st.suppressed))
    }
}

const RECORD_COLUMNS: &str =
    "seq, at_ms, principal, action, customer_id, target, purpose, result, request_id, detail, prev_hash, hash";

fn hash_col(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<[u8; 32]> {
    let v: Vec<u8> = r.get(i)?;
    // A wrong length is tampering; verify reports it via the hash check.
    let mut h = [0u8; 32];
    if v.len() == 32 {
        h.copy_from_slice(&v);
    }
    Ok(h)
}

fn read_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        seq: r.get::<_, i64>(0)? as u64,
        at_ms: r.get(1)?,
        principal: r.get(2)?,
        action: r.get(3)?,
        customer_id: r.get(4)?,
        target: r.get(5)?,
        purpose: r.get(6)?,
        result: r.get(7)?,
        request_id: r.get(8)?,
        detail: r.get(9)?,
        prev_hash: hash_col(r, 10)?,
        hash: hash_col(r, 11)?,
    })
}

/// Pragmas of every connection: a record survives power loss once
/// written; an append waits up to 2 s for a store locked by another process.
const CONNECTION_SETUP: &str = "PRAGMA synchronous=FULL; PRAGMA busy_timeout=2000;";

impl AuditLog {
    /// Opens (creating if needed) the audit store and signs a checkpoint
    /// over any records written since the last one.
    pub fn open(path: &Path, signer: Arc<SigningKey>, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.execute_batch("PRAGMA journal_mode=WAL;").map_err(unavailable)?;
        conn.execute_batch(CONNECTION_SETUP).map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        let head = conn
            .query_row("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1", [], |r| {
                Ok(Head { seq: r.get::<_, i64>(0)? as u64, hash: hash_col(r, 1)? })
            })
            .optional()
            .map_err(unavailable)?
            .unwrap_or(Head { seq: 0, hash: [0; 32] });
        let checkpointed: u64 = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM checkpoints", [], |r| r.get::<_, i64>(0))
            .map_err(unavailable)? as u64;
        let mut chain = Chain { head, since_checkpoint: head.seq.saturating_sub(checkpointed) };
        sign_checkpoint(&conn, &mut chain, &signer, clock.as_ref())?;
        let db =
            Group::start("audit", conn, chain, Some((path.to_path_buf(), CONNECTION_SETUP))).map_err(unavailable)?;
        let anonymous = Arc::new(Throttle::new(ANONYMOUS_PER_SEC, ANONYMOUS_BURST, std::time::Instant::now()));
        Ok(Self { db: Arc::new(db), published: Arc::new(Mutex::new(head)), signer, clock, anonymous })
    }

    /// Appends the record of a request refused before anyone could be
    /// identified (no or bad credentials, a forged link), best effort.
    /// Anyone can cause these, so they are rate-limited: a flood must not
    /// fill the trail, nor starve its one writer, on which every read and
    /// commit waits. Past 50 a second (bursts of 200), refusals are only
    /// counted; the next record let through carries the count
    /// (`detail.suppressed_before`), so the trail still shows the flood.
    pub async fn append_anonymous(&self, actor: &Actor, event: Event) {
        let Some(suppressed) = self.anonymous.admit(std::time::Instant::now()) else {
            return;
        };
        let event = if suppressed > 0 { event.detail("suppressed_before", suppressed) } else { event };
        if let Err(e) = self.append(actor, event).await {
            tracing::warn!(error = %e, "could not audit a refused anonymous request");
        }
    }

    /// Appends one record; its head once written. Fails with `UNAVAILABLE`
    /// when the store cannot be written (the caller must then not act).
    pub async fn append(&self, actor: &Actor, event: Event) -> Result<Head, Error> {
        let (actor, signer, clock) = (actor.clone(), self.signer.clone(), self.clock.clone());
        let head = self
            .db
            .write_then(
                move |conn, chain| append_record(conn, chain, &signer, clock.as_ref(), &actor, event),
                self.publisher(),
            )
            .await
            .map_err(|AuditFail(e)| e)?;
        Ok(head)
    }

    /// Moves the published head on once a write is durable; run by the
    /// writer thread, so an append whose caller was cancelled after its
    /// commit still moves it.
    fn publisher(&self) -> impl FnOnce(&Head) + Send + 'static {
        let published = self.published.clone();
        move |head: &Head| {
            let mut published = published.lock().unwrap_or_else(|p| p.into_inner());
            if head.seq > published.seq {
                *published = *head;
            }
        }
    }

    /// Signs a checkpoint at the current head now.
    pub async fn checkpoint(&self) -> Result<Head, Error> {
        let (signer, clock) = (self.signer.clone(), self.clock.clone());
        let head = self
            .db
            .write_then(
                move |conn, chain| {
                    sign_checkpoint(conn, chain, &signer, clock.as_ref())?;
                    Ok::<_, AuditFail>(chain.head)
                },
                self.publisher(),
            )
            .await
            .map_err(|AuditFail(e)| e)?;
        Ok(head)
    }

    /// The newest head an append or checkpoint has returned.
    pub fn head(&self) -> Head {
        *self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first record of `action` for this customer with result `ok`, if
    /// any (steps recorded exactly once across crashes use this).
    pub async fn find(&self, action: &'static str, customer: &CustomerId) -> Result<Option<Head>, Error> {
        let customer = customer.to_string();
        self.db
            .read(move |conn| {
                conn.query_row(
                    "SELECT seq, hash FROM records WHERE action = ?1 AND customer_id = ?2 AND result = 'ok'
                     ORDER BY seq LIMIT 1",
                    params![action, customer],
                    |r| Ok(Head { seq: r.get::<_, i64>(0)? as u64, hash: hash_col(r, 1)? }),
                )
                .optional()
                .map_err(|e| AuditFail(unavailable(e)))
            })
            .await
            .map_err(|AuditFail(e)| e)
    }

    /// Records matching `filter`, newest first.
    pub async fn search(&self, filter: Filter) -> Result<Vec<Record>, Error> {
        self.db
            .read(move |conn| search(conn, &filter).map_err(|e| AuditFail(unavailable(e))))
            .await
            .map_err(|AuditFail(e)| e)
    }
}

/// Links and writes one record (on the writer thread, inside its batch).
fn append_record(
    conn: &Connection,
    chain: &mut Chain,
    signer: &SigningKey,
    clock: &dyn Clock,
    actor: &Actor,
    event: Event,
) -> Result<Head, AuditFail> {
    // Another process (the offline `keys` commands) may have appended
    // since this writer last did: continue from the stored head, read
    // under this batch's write lock (`BEGIN IMMEDIATE`), so two writers
    // never fork the chain.
    let stored = conn
        .query_row("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok(Head { seq: r.get::<_, i64>(0)? as u64, hash: hash_col(r, 1)? })
        })
        .optional()
        .map_err(|e| AuditFail(unavailable(e)))?;
    if let Some(stored) = stored
        && stored.seq != chain.head.seq
    {
        chain.head = stored;
    }
    let mut record = Record {
        seq: chain.head.seq + 1,
        at_ms: clock.now_ms(),
        principal: actor.principal.clone(),
        action: event.action.to_owned(),
        customer_id: event.customer_id,
        target: event.target,
        purpose: event.purpose,
        result: event.result,
        request_id: actor.request_id.clone(),
        detail: serde_json::Value::Object(event.detail).to_string(),
        prev_hash: chain.head.hash,
        hash: [0; 32],
    };
    record.hash = record_hash(&record);
    conn.execute(
        &format!("INSERT INTO records ({RECORD_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
        params![
            record.seq as i64,
            record.at_ms,
            record.principal,
            record.action,
            record.customer_id,
            record.target,
            record.purpose,
            record.result,
            record.request_id,
            record.detail,
            &record.prev_hash[..],
            &record.hash[..],
        ],
    )
    .map_err(|e| {
        tracing::error!(action = record.action, error = %e, "audit record not written");
        AuditFail(unavailable(e))
    })?;
    chain.head = Head { seq: record.seq, hash: record.hash };
    chain.since_checkpoint += 1;
    if chain.since_checkpoint >= CHECKPOINT_EVERY
        && let Err(e) = sign_checkpoint(conn, chain, signer, clock)
    {
        // The record itself is written; the next append retries.
        tracing::warn!(error = %e, "audit checkpoint not written yet");
    }
    Ok(chain.head)
}

/// Signs the head when records were added since the last checkpoint.
fn sign_checkpoint(conn: &Connection, chain: &mut Chain, signer: &SigningKey, clock: &dyn Clock) -> Result<(), Error> {
    if chain.since_checkpoint == 0 {
        return Ok(());
    }
    let at_ms = clock.now_ms();
    let key_id = signer.key_id();
    let sig = signer.sign_message(&checkpoint_message(chain.head.seq, &chain.head.hash, at_ms, key_id));
    conn.execute(
        "INSERT OR REPLACE INTO checkpoints (seq, head, at_ms, key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![chain.head.seq as i64, &chain.head.hash[..], at_ms, key_id, sig],
    )
    .map_err(unavailable)?;
    chain.since_checkpoint = 0;
    Ok(())
}

fn search(conn: &Connection, f: &Filter) -> rusqlite::Result<Vec<Record>> {
    let mut sql = format!("SELECT {RECORD_COLUMNS} FROM records WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
        args.push(v);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(c) = &f.customer_id {
        arg(&mut sql, " AND customer_id = ?", c.clone().into());
    }
    match f.action.as_deref() {
        Some(a) if a.ends_with('.') => arg(&mut sql, " AND substr(action, 1, length(?)) = ?", a.to_owned().into()),
        Some(a) => arg(&mut sql, " AND action = ?", a.to_owned().into()),
        None => {}
    }
    if let Some(p) = &f.principal {
        arg(&mut sql, " AND principal = ?", p.clone().into());
    }
    if let Some(t) = f.since_ms {
        arg(&mut sql, " AND at_ms >= ?", t.into());
    }
    if let Some(t) = f.until_ms {
        arg(&mut sql, " AND at_ms < ?", t.into());
    }
    if let Some(s) = f.before_seq {
        arg(&mut sql, " AND seq < ?", (s as i64).into());
    }
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", f.limit.clamp(1, 10_000)));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), read_record)?;
    rows.collect()
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub head: Head,
    pub checkpoints: u64,
    /// Records after the last signed checkpoint (their removal could not
    /// be detected).
    pub unsigned_tail: u64,
}

/// Why the trail does not verify: the first broken place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("cannot read the audit store: {0}")]
    Unreadable(String),
    #[error("record {seq}: its contents were changed (hash mismatch)")]
    Modified { seq: u64 },
    #[error("record {seq} is missing: deleted (the next record present is {found})")]
    Missing { seq: u64, found: u64 },
    #[error(
        "record {seq} does not follow record {prev}: a record was inserted, reordered, or record {prev} was replaced"
    )]
    Unlinked { seq: u64, prev: u64 },
    #[error("checkpoint at record {seq}: signature invalid (forged, altered, or signed by another key)")]
    BadCheckpoint { seq: u64 },
    #[error("checkpoint at record {seq} does not match the chain: records up to {seq} were rewritten")]
    Rewritten { seq: u64 },
    #[error("records after {last} were removed: a signed checkpoint covers record {seq}")]
    Truncated { last: u64, seq: u64 },
}

struct Checkpoint {
    seq: u64,
    head: [u8; 32],
    at_ms: i64,
    key_id: String,
    signature: Vec<u8>,
}

/// Walks the whole chain of the audit store at `path` (opened read-only)
/// and checks every signed checkpoint against `public_key`.
pub fn verify(path: &Path, public_key: &[u8]) -> Result<Verified, Broken> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| Broken::Unreadable(format!("{}: {e}", path.display())))?;
    verify_conn(&conn, public_key)
}

fn verify_conn(conn: &Connection, public_key: &[u8]) -> Result<Verified, Broken> {
    let unreadable = |e: rusqlite::Error| Broken::Unreadable(e.to_string());
    let mut checkpoints: Vec<Checkpoint> = {
        let mut stmt = conn
            .prepare("SELECT seq, head, at_ms, key_id, signature FROM checkpoints ORDER BY seq")
            .map_err(unreadable)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Checkpoint {
                    seq: r.get::<_, i64>(0)? as u64,
                    head: hash_col(r, 1)?,
                    at_ms: r.get(2)?,
                    key_id: r.get(3)?,
                    signature: r.get(4)?,
                })
            })
            .map_err(unreadable)?;
        rows.collect::<Result<_, _>>().map_err(unreadable)?
    };
    for c in &checkpoints {
        if !signature_valid(public_key, &checkpoint_message(c.seq, &c.head, c.at_ms, &c.key_id), &c.signature) {
            return Err(Broken::BadCheckpoint { seq: c.seq });
        }
    }
    checkpoints.reverse(); // pop() in ascending order
    let mut stmt = conn.prepare(&format!("SELECT {RECORD_COLUMNS} FROM records ORDER BY seq")).map_err(unreadable)?;
    let mut rows = stmt.query([]).map_err(unreadable)?;
    let mut head = Head { seq: 0, hash: [0; 32] };
    let mut verified_checkpoints = 0;
    let mut last_checkpoint = 0;
    while let Some(row) = rows.next().map_err(unreadable)? {
        let r = read_record(row).map_err(unreadable)?;
        let expected = head.seq + 1;
        if r.seq > expected {
            return Err(Broken::Missing { seq: expected, found: r.seq });
        }
        if r.prev_hash != head.hash {
            return Err(Broken::Unlinked { seq: r.seq, prev: head.seq });
        }
        if record_hash(&r) != r.hash {
            return Err(Broken::Modified { seq: r.seq });
        }
        head = Head { seq: r.seq, hash: r.hash };
        while let Some(c) = checkpoints.last() {
            if c.seq > head.seq {
                break;
            }
            if c.seq == head.seq && c.head != head.hash {
                return Err(Broken::Rewritten { seq: c.seq });
            }
            verified_checkpoints += 1;
            last_checkpoint = c.seq;
            checkpoints.pop();
        }
    }
    if let Some(c) = checkpoints.last() {
        return Err(Broken::Truncated { last: head.seq, seq: c.seq });
    }
    Ok(Verified {
        records: head.seq,
        head,
        checkpoints: verified_checkpoints,
        unsigned_tail: head.seq - last_checkpoint,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn anonymous_refusals_are_rate_limited_and_counted() {
        let t0 = std::time::Instant::now();
        let gate = Throttle::new(10.0, 3.0, t0);
        assert_eq!((gate.admit(t0), gate.admit(t0), gate.admit(t0)), (Some(0), Some(0), Some(0)), "the burst");
        assert_eq!((gate.admit(t0), gate.admit(t0)), (None, None), "then counted, not written");
        // 100 ms later one token is back: the next record carries the count.
        let t1 = t0 + std::time::Duration::from_millis(100);
        assert_eq!(gate.admit(t1), Some(2));
        assert_eq!(gate.admit(t1), None);
        // Refilled to the burst, never beyond it.
        let t2 = t1 + std::time::Duration::from_secs(60);
        assert_eq!((gate.admit(t2), gate.admit(t2), gate.admit(t2), gate.admit(t2)), (Some(1), Some(0), Some(0), None));
    }

    use super::*;
    use crate::clock::ManualClock;

    impl AuditLog {
        /// An append from synchronous test code (the writer needs no runtime).
        fn append_blocking(&self, actor: &Actor, event: Event) -> Result<Head, Error> {
            futures::executor::block_on(self.append(actor, event))
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        log: AuditLog,
        public: Vec<u8>,
    }

    fn fixture(records: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(SigningKey::open_or_create(&dir.path().join("signing.key")).unwrap());
        let public = crate::retention::certificate::parse_public_key(
            &std::fs::read_to_string(dir.path().join("signing.pub")).unwrap(),
        )
        .unwrap();
        let path = dir.path().join("audit.sqlite");
        let log = AuditLog::open(&path, signer, ManualClock::new()).unwrap();
        let actor = Actor::system("test");
        for i in 0..records {
            let customer = CustomerId::parse(&format!("cust-{}", i % 3)).unwrap();
            log.append_blocking(&actor, Event::new("object.read").customer(&customer).target(i).purpose("coaching"))
                .unwrap();
        }
        Fixture { _dir: dir, path, log, public }
    }

    fn tamper(f: &Fixture, sql: &str) {
        let c = Connection::open(&f.path).unwrap();
        c.execute_batch(sql).unwrap();
    }

    #[test]
    fn i2_an_intact_chain_verifies_with_its_checkpoints() {
        let f = fixture(200);
        let v = verify(&f.path, &f.public).unwrap();
        assert_eq!(v.records, 200);
        assert_eq!(v.head, f.log.head());
        assert_eq!(v.checkpoints, 200 / CHECKPOINT_EVERY);
        assert_eq!(v.unsigned_tail, 200 % CHECKPOINT_EVERY);
    }

    #[test]
    fn i2_an_empty_trail_verifies() {
        let f = fixture(0);
        assert_eq!(verify(&f.path, &f.public).unwrap().records, 0);
    }

    #[test]
    fn i2_editing_a_record_is_named() {
        let f = fixture(100);
        tamper(&f, "UPDATE records SET purpose = 'legal' WHERE seq = 37");
        assert_eq!(verify(&f.path, &f.public), Err(Broken::Modified { seq: 37 }));
    }

    #[test]
    fn i2_editing_and_rehashing_a_record_breaks_the_next_link() {
        let f = fixture(100);
        let c = Connection::open(&f.path).unwrap();
        let mut r =
            c.query_row(&format!("SELECT {RECORD_COLUMNS} FROM records WHERE seq = 37"), [], read_record).unwrap();
        r.principal = "someone-else".into();
        r.hash = record_hash(&r);
        c.execute("UPDATE records SET principal = ?1, hash = ?2 WHERE seq = 37", params![r.principal, &r.hash[..]])
            .unwrap();
        assert_eq!(verify(&f.path, &f.public), Err(Broken::Unlinked { seq: 38, prev: 37 }));
    }

    #[test]
    fn i2_deleting_a_record_is_named() {
        let f = fixture(100);
        tamper(&f, "DELETE FROM records WHERE seq = 50");
        assert_eq!(verify(&f.path, &f.public), Err(Broken::Missing { seq: 50, found: 51 }));
    }

    #[test]
    fn i2_swapping_two_records_is_named() {
        let f = fixture(100);
        tamper(
            &f,
            "UPDATE records SET seq = -1 WHERE seq = 20; UPDATE records SET seq = 20 WHERE seq = 21;
             UPDATE records SET seq = 21 WHERE seq = -1;",
        );
        assert!(matches!(verify(&f.path, &f.public), Err(Broken::Unlinked { seq: 20, prev: 19 })));
    }

    #[test]
    fn i2_inserting_a_record_is_named() {
        let f = fixture(100);
        // Make room at 31 by shifting the rest up, then insert a forged row.
        tamper(
            &f,
            "UPDATE records SET seq = seq + 1000 WHERE seq > 30; UPDATE records SET seq = seq - 999 WHERE seq > 1000;",
        );
        let c = Connection::open(&f.path).unwrap();
        let mut forged =
            c.query_row(&format!("SELECT {RECORD_COLUMNS} FROM records WHERE seq = 30"), [], read_record).unwrap();
        forged.prev_hash = forged.hash;
        forged.seq = 31;
        forged.hash = record_hash(&forged);
        c.execute(
            &format!(
                "INSERT INTO records ({RECORD_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                31,
                forged.at_ms,
                forged.principal,
                forged.action,
                forged.customer_id,
                forged.target,
                forged.purpose,
                forged.result,
                forged.request_id,
                forged.detail,
                &forged.prev_hash[..],
                &forged.hash[..]
            ],
        )
        .unwrap();
        assert_eq!(verify(&f.path, &f.public), Err(Broken::Unlinked { seq: 32, prev: 31 }));
    }

    #[test]
    fn i2_rewriting_the_chain_or_cutting_its_tail_is_caught_by_checkpoints() {
        // Rewrite every hash from record 10 on, consistently: only the
        // signed checkpoint at 64 can tell.
        let f = fixture(100);
        let c = Connection::open(&f.path).unwrap();
        let mut all: Vec<Record> = {
            let mut stmt = c.prepare(&format!("SELECT {RECORD_COLUMNS} FROM records ORDER BY seq")).unwrap();
            stmt.query_map([], read_record).unwrap().collect::<Result<_, _>>().unwrap()
        };
        all[9].result = "refused".into();
        for i in 9..all.len() {
            if i > 9 {
                all[i].prev_hash = all[i - 1].hash;
            }
            all[i].hash = record_hash(&all[i]);
            c.execute(
                "UPDATE records SET result = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
                params![all[i].result, &all[i].prev_hash[..], &all[i].hash[..], all[i].seq as i64],
            )
            .unwrap();
        }
        assert_eq!(verify(&f.path, &f.public), Err(Broken::Rewritten { seq: 64 }));

        let f = fixture(100);
        tamper(&f, "DELETE FROM records WHERE seq > 40");
        assert_eq!(verify(&f.path, &f.public), Err(Broken::Truncated { last: 40, seq: 64 }));
    }

    #[test]
    fn i2_a_checkpoint_signed_by_another_key_fails() {
        let f = fixture(70);
        tamper(&f, "UPDATE checkpoints SET at_ms = at_ms + 1");
        assert_eq!(verify(&f.path, &f.public), Err(Broken::BadCheckpoint { seq: 64 }));
        let other = fixture(0);
        let f = fixture(70);
        assert_eq!(verify(&f.path, &other.public), Err(Broken::BadCheckpoint { seq: 64 }));
    }

    /// An append whose caller stops waiting once it is queued still lands,
    /// and still moves the published head on (the writer publishes it, not
    /// the caller).
    #[tokio::test]
    async fn a_cancelled_append_still_moves_the_head() {
        let f = fixture(0);
        let actor = Actor::system("test");
        let mut append = Box::pin(f.log.append(&actor, Event::new("object.read")));
        assert!(futures::poll!(&mut append).is_pending());
        drop(append);
        // The writer is first in, first out: once this plain write (which
        // publishes nothing) is answered, the append before it is durable.
        let durable =
            f.log.db.write(|_, chain| Ok::<_, AuditFail>(chain.head)).await.map_err(|AuditFail(e)| e).unwrap();
        assert_eq!(durable.seq, 1);
        assert_eq!(f.log.head(), durable);
        assert_eq!(verify(&f.path, &f.public).unwrap().head, durable);
    }

    /// Appends from many tasks at once share batches and still make one
    /// unbroken chain, with checkpoints, that verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_make_one_chain_that_verifies() {
        let f = fixture(0);
        let log = Arc::new(f.log.clone());
        let tasks: Vec<_> = (0..300u64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.append(&Actor::system("test"), Event::new("object.read").target(i).purpose("coaching")).await
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap().seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "every append has its own place in the chain");
        let v = verify(&f.path, &f.public).unwrap();
        assert_eq!(v.records, 300);
        assert_eq!(v.head, log.head());
        assert_eq!(v.checkpoints, 300 / CHECKPOINT_EVERY);
    }

    #[test]
    fn reopening_continues_the_chain_and_signs_the_tail() {
        let f = fixture(10);
        let head = f.log.head();
        let dir = f.path.parent().unwrap();
        let signer = Arc::new(SigningKey::open_or_create(&dir.join("signing.key")).unwrap());
        drop(f.log);
        let log = AuditLog::open(&f.path, signer, ManualClock::new()).unwrap();
        assert_eq!(log.head(), head);
        log.append_blocking(&Actor::system("test"), Event::new("hold.place")).unwrap();
        let v = verify(&f.path, &f.public).unwrap();
        assert_eq!((v.records, v.checkpoints, v.unsigned_tail), (11, 1, 1));
    }

    /// A second writer on the same file (an offline `keys` command while
    /// a server runs, against the advice) continues the chain rather than
    /// forking it: each append reads the stored head under its write lock.
    #[test]
    fn two_writers_on_one_file_keep_one_chain() {
        let f = fixture(5);
        let dir = f.path.parent().unwrap();
        let signer = Arc::new(SigningKey::open_or_create(&dir.join("signing.key")).unwrap());
        let other = AuditLog::open(&f.path, signer, ManualClock::new()).unwrap();
        let actor = Actor::system("test");
        for i in 0..20 {
            let log = if i % 3 == 0 { &other } else { &f.log };
            log.append_blocking(&actor, Event::new("hold.place")).unwrap();
        }
        let v = verify(&f.path, &f.public).unwrap();
        assert_eq!(v.records, 25, "{v:?}");
    }

    #[test]
    fn search_filters_newest_first() {
        let f = fixture(30);
        let c1 = CustomerId::parse("cust-1").unwrap();
        f.log.append_blocking(&Actor::system("x"), Event::new("shred.request").customer(&c1)).unwrap();
        let conn = &Connection::open(&f.path).unwrap();
        let got =
            search(conn, &Filter { customer_id: Some("cust-1".into()), limit: 100, ..Default::default() }).unwrap();
        assert_eq!(got.len(), 11);
        assert!(got.windows(2).all(|w| w[0].seq > w[1].seq));
        let got = search(conn, &Filter { action: Some("shred.".into()), limit: 100, ..Default::default() }).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].action, "shred.request");
        let got = search(conn, &Filter { before_seq: Some(5), limit: 2, ..Default::default() }).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 3]);
    }

    #[test]
    fn actor_request_ids_are_sanitised() {
        let a = Actor::unauthenticated(Some("127.0.0.1:9".parse().unwrap()), Some("req-1"));
        assert_eq!((a.principal.as_str(), a.request_id.as_str()), ("unauthenticated@127.0.0.1", "req-1"));
        for bad in ["", "has space", "\u{1b}[31m", &"x".repeat(65)] {
            assert_ne!(Actor::new("coach-1", Some(bad)).request_id, bad);
        }
    }
}
