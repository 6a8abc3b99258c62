//! Metadata and key store behind one trait: customers and their wrapped
//! keys, uploads in progress, committed objects with their wrapped data keys.
//!
//! SQLite is the embedded default; PostgreSQL (`postgres`) serves
//! deployments that share one database between replicas. Every method is
//! one transaction, no cursors held across calls. One conformance suite
//! (`conformance`) runs against every implementation.

pub mod conformance;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

use crate::model::{
    Consent, CustomerId, CustomerRef, Hold, HoldId, ObjectId, ObjectRecord, ObjectSpec, RetentionPolicy, TimeSpan,
    TokenRecord, UploadId,
};

/// SQL both backends share, so they scrub and hold the same way. Clears
/// every content-derived column of an object (its tombstone keeps id,
/// upload id, customer, kind and times).
const SCRUB_OBJECT: &str = "wrapped_dek = NULL, key_version = NULL, content_type = NULL, size = NULL, \
     sha256 = NULL, interaction_id = NULL, channel = NULL, agent_id = NULL, queue = NULL, direction = NULL, \
     started_at_ms = NULL, tags = NULL, retention_policy = NULL, expires_at_ms = NULL, sensitive_spans = NULL";

/// Objects no active hold covers (`o` is the objects row).
const NOT_HELD: &str = "NOT EXISTS (SELECT 1 FROM holds h WHERE h.released_at_ms IS NULL \
     AND h.customer_id = o.customer_id AND (h.interaction_id IS NULL OR h.interaction_id = o.interaction_id))";

/// Lifecycle of a customer's keys, mirroring KMS key deletion states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomerState {
    Active,
    /// Shred requested, grace window running (used by the retention pipeline).
    PendingShred,
    /// Keys destroyed; only a tombstone remains.
    Shredded,
}

impl CustomerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::PendingShred => "pending_shred",
            Self::Shredded => "shredded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::PendingShred, Self::Shredded].into_iter().find(|st| st.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerRecord {
    pub customer_ref: CustomerRef,
    pub customer_id: CustomerId,
    pub state: CustomerState,
    /// The key version new objects are wrapped under.
    pub active_version: u32,
    /// A random key wrapped under the active customer key, to prove the key
    /// works (and, after a shred, that it no longer does).
    pub canary: Vec<u8>,
    pub created_at_ms: i64,
}

/// A customer key version, wrapped by the root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerKeyRecord {
    pub customer_ref: CustomerRef,
    pub version: u32,
    pub root_key_id: String,
    pub wrapped_key: Vec<u8>,
}

/// An upload in progress (or committed, kept for idempotent retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub upload_id: UploadId,
    pub object_id: ObjectId,
    pub customer_ref: CustomerRef,
    pub spec: ObjectSpec,
    pub key_version: u32,
    /// The object's data key wrapped by the customer key. Cleared once
    /// committed (the object row holds it from then on).
    pub wrapped_dek: Vec<u8>,
    pub nonce_prefix: [u8; 7],
    pub created_at_ms: i64,
    pub committed: bool,
}

/// A committed object with what is needed to decrypt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub record: ObjectRecord,
    pub customer_ref: CustomerRef,
    pub customer_state: CustomerState,
    /// Set once the object expired: only its tombstone is left (id,
    /// customer, kind, times), and `wrapped_dek` is empty.
    pub expired_at_ms: Option<i64>,
    pub key_version: u32,
    pub wrapped_dek: Vec<u8>,
}

/// Filter of `list_objects`; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub customer_id: Option<CustomerId>,
    pub interaction_id: Option<String>,
    pub kind: Option<crate::model::ContentKind>,
    pub created_after_ms: Option<i64>,
    pub created_before_ms: Option<i64>,
    pub agent_id: Option<String>,
    pub queue: Option<String>,
    pub channel: Option<String>,
    pub direction: Option<crate::model::Direction>,
    pub started_after_ms: Option<i64>,
    pub started_before_ms: Option<i64>,
    /// Inclusive bounds on the interaction's duration; objects of unknown
    /// duration match no bound.
    pub min_duration_ms: Option<u64>,
    pub max_duration_ms: Option<u64>,
    /// Every one of these tags.
    pub tags: Vec<(String, String)>,
    /// Leave out derived items (redacted renditions).
    pub originals_only: bool,
    /// Only customers whose consent allows training use; the value is the
    /// default for customers with no recorded consent.
    pub training_use: Option<bool>,
}

/// Keyset pagination position: list continues strictly after it (newest
/// first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at_ms: i64,
    pub object_id: ObjectId,
}

/// A customer's shred, from request to certificate. Kept with the
/// tombstone: it holds no key or content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShredTicket {
    pub customer_id: CustomerId,
    pub customer_ref: CustomerRef,
    pub state: CustomerState,
    pub reason: String,
    pub requested_by: String,
    pub requested_at_ms: i64,
    /// Keys are destroyed at or after this time (request + grace window).
    pub destroy_after_ms: i64,
    pub requires_approval: bool,
    pub approved_by: Option<String>,
    pub approved_at_ms: Option<i64>,
    /// Set by the destroy step; from then on the shred cannot be cancelled.
    pub destroyed: Option<Destroyed>,
    /// The signed certificate, once the shred is verified and complete.
    pub certificate: Option<String>,
}

/// What the destroy step erased, recorded in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destroyed {
    pub at_ms: i64,
    pub key_versions: Vec<u32>,
    /// Root key the destroyed customer key versions were wrapped under.
    pub root_key_ids: Vec<String>,
    /// Committed objects made unrecoverable by this shred.
    pub objects: u64,
    /// SHA-256 over their ids (sorted, canonical form, one per line).
    pub objects_digest: [u8; 32],
    /// Unfinished uploads whose data keys were destroyed.
    pub uploads: u64,
}

/// A shred request, as the pipeline records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShredRequest {
    pub reason: String,
    pub requested_by: String,
    pub requested_at_ms: i64,
    pub destroy_after_ms: i64,
    pub requires_approval: bool,
}

/// A retention policy as stored, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub policy: RetentionPolicy,
    /// Defined in the config file: re-asserted at every start and changed
    /// only there.
    pub from_config: bool,
    pub updated_at_ms: i64,
}

/// An object the sweep crypto-erased (its tombstone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredObject {
    pub object_id: ObjectId,
    pub customer_id: CustomerId,
    pub expired_at_ms: i64,
}

/// How many objects are due to expire at a time, and how many of those
/// legal holds keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiryCount {
    pub due: u64,
    pub held: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("not found")]
    NotFound,
    #[error("customer is {}", .0.as_str())]
    CustomerState(CustomerState),
    /// Legal holds forbid the change; the message names them.
    #[error("{}", held_message(.0))]
    Held(Vec<Hold>),
    /// The request conflicts with the stored state; the message says how.
    #[error("{0}")]
    Conflict(String),
    #[error("catalog failure: {0}")]
    Backend(String),
}

fn held_message(holds: &[Hold]) -> String {
    let names: Vec<String> = holds.iter().take(5).map(Hold::describe).collect();
    let more = if holds.len() > 5 { format!(" and {} more", holds.len() - 5) } else { String::new() };
    format!("blocked by {}{more}; release the hold(s) first", names.join(", "))
}

#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// A value of the service's own bookkeeping (e.g. the root-key check).
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError>;
    /// Stores `value` unless `key` is set; returns the value now stored.
    async fn meta_put_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, CatalogError>;

    async fn customer(&self, id: &CustomerId) -> Result<Option<CustomerRecord>, CatalogError>;
    /// Creates a customer with its first key version. If the customer
    /// already exists (a concurrent first ingest), returns the existing one
    /// unchanged.
    async fn create_customer(
        &self,
        customer: &CustomerRecord,
        key: &CustomerKeyRecord,
    ) -> Result<CustomerRecord, CatalogError>;
    async fn customer_key(
        &self,
        customer: &CustomerRef,
        version: u32,
    ) -> Result<Option<CustomerKeyRecord>, CatalogError>;

    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>, CatalogError>;
    /// Records a new upload; if one with the same id exists, returns it
    /// instead (the caller compares specs).
    async fn create_upload(&self, upload: &UploadRecord) -> Result<UploadRecord, CatalogError>;
    /// Forgets an unfinished upload.
    async fn discard_upload(&self, id: &UploadId) -> Result<(), CatalogError>;
    /// Atomically inserts the object and marks its upload committed. A
    /// retried commit returns the object committed first. Fails with
    /// `CustomerState` when the customer is no longer active (a shred won
    /// the race), and `NotFound` when the upload is gone.
    async fn commit_upload(&self, object: &ObjectRecord) -> Result<ObjectRecord, CatalogError>;

    /// A committed object (or its tombstone after a shred: `customer_state`
    /// tells, and `wrapped_dek` is then empty).
    async fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>, CatalogError>;
    /// How many committed, readable objects match `filter`.
    async fn count_objects(&self, filter: &ListFilter) -> Result<u64, CatalogError>;
    /// Committed, readable objects matching `filter`, newest first.
    async fn list_objects(
        &self,
        filter: &ListFilter,
        after: Option<PageCursor>,
        limit: usize,
    ) -> Result<Vec<ObjectRecord>, CatalogError>;

    /// Records a shred request and moves the customer to `PendingShred`.
    /// Refused with `Held` while any hold covers the customer. A repeated
    /// request of a pending customer returns the pending ticket unchanged.
    async fn request_shred(&self, id: &CustomerId, request: &ShredRequest) -> Result<ShredTicket, CatalogError>;
    /// Records the second person's approval (must differ from the
    /// requester: `Conflict` otherwise).
    async fn approve_shred(&self, id: &CustomerId, approver: &str, now_ms: i64) -> Result<ShredTicket, CatalogError>;
    /// Restores a pending customer to `Active`; refused once keys are
    /// destroyed.
    async fn cancel_shred(&self, id: &CustomerId) -> Result<ShredTicket, CatalogError>;
    async fn shred_ticket(&self, id: &CustomerId) -> Result<Option<ShredTicket>, CatalogError>;
    /// Pending shreds, due or not (the pipeline decides).
    async fn pending_shreds(&self) -> Result<Vec<ShredTicket>, CatalogError>;
    /// The destroy step, in one transaction: deletes every key version of a
    /// pending customer, every wrapped data key of its objects and uploads
    /// and their metadata (leaving tombstones), and records what it erased.
    /// The customer stays `PendingShred` (unreadable) until
    /// `complete_shred`. Idempotent. Refused with `Held` if a hold appeared.
    async fn destroy_customer_keys(&self, id: &CustomerId, now_ms: i64) -> Result<ShredTicket, CatalogError>;
    /// Key versions of the customer still stored (empty after a destroy).
    async fn customer_key_versions(&self, customer: &CustomerRef) -> Result<Vec<u32>, CatalogError>;
    /// Final step: `Shredded`, the canary dropped, the certificate kept.
    async fn complete_shred(
        &self,
        id: &CustomerId,
        certificate: &str,
        now_ms: i64,
    ) -> Result<ShredTicket, CatalogError>;
    /// Ids of the customer's objects whose ciphertext may still exist
    /// (tombstones of a destroyed customer), for deletion.
    async fn tombstoned_objects(&self, customer: &CustomerRef) -> Result<Vec<ObjectId>, CatalogError>;

    async fn policies(&self) -> Result<Vec<StoredPolicy>, CatalogError>;
    /// Inserts or replaces a policy. A config-defined policy can be
    /// replaced only by another config write (`Conflict` otherwise).
    async fn put_policy(&self, policy: &StoredPolicy) -> Result<(), CatalogError>;
    /// Deletes a policy (`NotFound` if absent; `Conflict` if it comes from
    /// the config file and `from_config` is false).
    async fn delete_policy(&self, name: &str, from_config: bool) -> Result<(), CatalogError>;
    /// Adds sensitive spans to a live object (merged with those it has) and
    /// returns them all; `NotFound` for an unknown or erased object.
    async fn add_sensitive_spans(&self, id: &ObjectId, spans: &[TimeSpan]) -> Result<Vec<TimeSpan>, CatalogError>;
    /// Re-fixes the expiry of a live object (a `--reapply`).
    async fn set_retention(&self, id: &ObjectId, retention: &crate::model::Retention) -> Result<(), CatalogError>;

    /// Objects due to expire at `now_ms`, and those kept by holds.
    async fn count_expiring(&self, now_ms: i64) -> Result<ExpiryCount, CatalogError>;
    /// Crypto-erases up to `limit` due objects not under hold, of active
    /// customers: destroys each wrapped data key and clears everything
    /// content-derived, leaving a tombstone. The ciphertext is deleted by
    /// the caller afterwards.
    async fn expire_objects(&self, now_ms: i64, limit: usize) -> Result<Vec<ExpiredObject>, CatalogError>;
    /// Ids of expired objects (for re-trying ciphertext deletion).
    async fn expired_objects(&self, after: Option<ObjectId>, limit: usize) -> Result<Vec<ObjectId>, CatalogError>;

    async fn place_hold(&self, hold: &Hold) -> Result<Hold, CatalogError>;
    async fn release_hold(&self, id: &HoldId, by: &str, now_ms: i64) -> Result<Hold, CatalogError>;
    /// Holds, newest first; of one customer if given; active only unless
    /// `include_released`.
    async fn holds(&self, customer: Option<&CustomerId>, include_released: bool) -> Result<Vec<Hold>, CatalogError>;

    /// Unfinished uploads created before `before_ms` (abandoned-upload
    /// sweep) — or all of them with `i64::MAX`.
    async fn unfinished_uploads(&self, before_ms: i64) -> Result<Vec<UploadRecord>, CatalogError>;

    /// Records a customer's consent (replacing any earlier one). A customer
    /// need not have content yet: an opt-out may come first.
    async fn set_consent(&self, consent: &Consent) -> Result<(), CatalogError>;
    /// The customer's recorded consent, if any.
    async fn consent(&self, id: &CustomerId) -> Result<Option<Consent>, CatalogError>;

    /// Stores a new bearer token (its secret's hash only); `Conflict` if
    /// the id is taken.
    async fn create_token(&self, token: &TokenRecord) -> Result<(), CatalogError>;
    /// A token by its public id (revoked and expired ones included).
    async fn token(&self, token_id: &str) -> Result<Option<TokenRecord>, CatalogError>;
    /// Every token, newest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, CatalogError>;
    /// Revokes a token (idempotent: a revoked token keeps its first
    /// revocation time); `NotFound` if unknown.
    async fn revoke_token(&self, token_id: &str, now_ms: i64) -> Result<TokenRecord, CatalogError>;

    /// Stores `value` under `key` only if the stored value is `expected`
    /// (`None`: no value yet); true if it did. Root-key rotation switches
    /// the active version with it, so two runs cannot both switch.
    async fn meta_compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, CatalogError>;
    /// How many customer key rows each root key id wraps, ordered by id.
    async fn count_customer_keys_by_root(&self) -> Result<Vec<(String, u64)>, CatalogError>;
    /// Up to `limit` customer key rows not wrapped under `root_key_id`,
    /// ordered by (customer ref, version) and strictly after `after`, each
    /// with its customer id (bound into the wrapping as associated data).
    async fn customer_keys_not_under(
        &self,
        root_key_id: &str,
        after: Option<(CustomerRef, u32)>,
        limit: usize,
    ) -> Result<Vec<(CustomerId, CustomerKeyRecord)>, CatalogError>;
    /// Replaces the wrapping of one customer key row, only while it is
    /// still wrapped under `old_root_key_id` (compare-and-set); never
    /// inserts. False when the row is gone (a shred destroyed it) or was
    /// re-wrapped already.
    async fn rewrap_customer_key(&self, key: &CustomerKeyRecord, old_root_key_id: &str) -> Result<bool, CatalogError>;
    /// Makes the caller the only writer of an unfinished upload's shared
    /// journal and returns its epoch: appends carrying an older epoch fail
    /// from now on (a replica that lost the stream but not its process
    /// cannot write behind the new one). `NotFound` if the upload is gone.
    async fn claim_journal(&self, upload: &UploadId) -> Result<u64, CatalogError>;
    /// Appends sealed journal records covering `[start, end)` of the
    /// upload, durably, if `epoch` still holds the journal (`Conflict`
    /// otherwise), the upload is unfinished (`NotFound`) and its customer
    /// active (`CustomerState`: a shred accepted by any replica stops the
    /// next append everywhere). `start` must be the journal's end
    /// (`Conflict` otherwise).
    async fn append_journal(
        &self,
        upload: &UploadId,
        epoch: u64,
        start: u64,
        end: u64,
        sealed: &[u8],
    ) -> Result<(), CatalogError>;
    /// The upload's journal chunks starting at `from` or later, in order, at
    /// most `limit`. Chunks go when the upload commits or is discarded.
    async fn journal_chunks(
        &self,
        upload: &UploadId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<JournalChunk>, CatalogError>;

    /// The right to run the retention sweep alone among every process
    /// sharing this catalog, held until the guard drops; `None` while
    /// another process holds it.
    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, CatalogError>;
    /// Revocations made by other processes sharing this catalog (a shred
    /// requested or executed, objects expired, a consent changed), as they
    /// commit. `None` when the catalog is not shared (SQLite: one process).
    async fn watch_revocations(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Revoked>>, CatalogError> {
        Ok(None)
    }
}

/// The checks `append_journal` makes on every backend, in this order: the
/// customer's state (a shred wins over everything), the writer's epoch, then
/// contiguity.
fn check_append(
    current_epoch: u64,
    epoch: u64,
    state: &str,
    journal_end: u64,
    start: u64,
    end: u64,
) -> Result<(), CatalogError> {
    let state = CustomerState::parse(state).unwrap_or(CustomerState::Shredded);
    if state != CustomerState::Active {
        return Err(CatalogError::CustomerState(state));
    }
    if current_epoch != epoch {
        return Err(CatalogError::Conflict(format!(
            "the upload was taken over by a newer stream (journal epoch {current_epoch}, this writer {epoch})"
        )));
    }
    if start != journal_end || end <= start {
        return Err(CatalogError::Conflict(format!(
            "journal append [{start}, {end}) does not continue the journal, which ends at {journal_end}, or is empty"
        )));
    }
    Ok(())
}

/// Sealed records of a shared upload journal, covering `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalChunk {
    pub start: u64,
    pub end: u64,
    pub sealed: Vec<u8>,
}

/// Held while this process runs the retention sweep (see
/// [`Catalog::try_sweep_lock`]); dropping it lets another process sweep.
pub struct SweepLock {
    _held: Box<dyn Send + Sync>,
}

impl SweepLock {
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self { _held: Box::new(held) }
    }
}

impl std::fmt::Debug for SweepLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SweepLock")
    }
}

/// What another process made unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Content of this customer (shred requested or executed, consent).
    Customer(CustomerRef),
    /// Some objects (expiry), or unknown: notifications may have been
    /// missed while the listener reconnected.
    Any,
}
