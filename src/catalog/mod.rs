//! Metadata and key store behind one trait: customers and their wrapped
//! keys, uploads in progress, committed objects with their wrapped data keys.
//!
//! SQLite is the embedded default; the trait is shaped so PostgreSQL can
//! implement it (every method is one transaction, no cursors held across
//! calls). One conformance suite (`conformance`) runs against every
//! implementation.

pub mod conformance;
pub mod sqlite;

use async_trait::async_trait;

use crate::model::{CustomerId, CustomerRef, ObjectId, ObjectRecord, ObjectSpec, UploadId};

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
}

/// Keyset pagination position: list continues strictly after it (newest
/// first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at_ms: i64,
    pub object_id: ObjectId,
}

/// What a shred destroyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShredReport {
    pub customer_ref: CustomerRef,
    pub key_versions_destroyed: u32,
    /// Objects whose wrapped data keys were destroyed (ciphertext to delete).
    pub objects: Vec<ObjectId>,
    /// Object ids of discarded unfinished uploads (spools to delete).
    pub discarded_uploads: Vec<ObjectId>,
    pub shredded_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("not found")]
    NotFound,
    #[error("customer is {}", .0.as_str())]
    CustomerState(CustomerState),
    #[error("catalog failure: {0}")]
    Backend(String),
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
    /// Committed, readable objects matching `filter`, newest first.
    async fn list_objects(
        &self,
        filter: &ListFilter,
        after: Option<PageCursor>,
        limit: usize,
    ) -> Result<Vec<ObjectRecord>, CatalogError>;

    /// Destroys every key version of the customer, every wrapped data key of
    /// its objects and uploads, and the objects' metadata, leaving
    /// tombstones; then scrubs the freed storage where the engine allows.
    async fn shred_customer(&self, id: &CustomerId, reason: &str, now_ms: i64) -> Result<ShredReport, CatalogError>;
}
