//! Crypto-shredding. Today: immediate shred of one customer. The retention
//! pipeline (policies, holds, grace windows, certificates) grows here.

use std::path::PathBuf;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::error::Error;
use crate::ingest::{Ingest, spool};
use crate::model::{CustomerId, now_ms};
use crate::store::Store;

/// What a shred did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShredOutcome {
    pub customer_id: CustomerId,
    pub key_versions_destroyed: u32,
    pub objects_shredded: u64,
    pub uploads_discarded: u64,
    pub shredded_at_ms: i64,
    /// Ciphertext or journals that could not be deleted now. They are
    /// undecryptable already (the keys are gone); deletion is hygiene.
    pub leftovers: u64,
}

pub struct Retention {
    catalog: Arc<dyn Catalog>,
    store: Store,
    ingest: Arc<Ingest>,
    spool_dir: PathBuf,
}

impl Retention {
    pub fn new(catalog: Arc<dyn Catalog>, store: Store, ingest: Arc<Ingest>, spool_dir: PathBuf) -> Self {
        Self { catalog, store, ingest, spool_dir }
    }

    /// Destroys every key of the customer now, stops their uploads in
    /// progress, then deletes their ciphertext and journals.
    ///
    /// The key destruction is the erasure; it commits in one catalog
    /// transaction before anything else happens, so a crash afterwards
    /// leaves only undecryptable bytes behind.
    pub async fn shred_customer(&self, id: &CustomerId, reason: &str) -> Result<ShredOutcome, Error> {
        if reason.trim().is_empty() {
            return Err(Error::Invalid(
                "a shred needs a reason (e.g. a ticket or retention rule); it is kept with the tombstone".into(),
            ));
        }
        if reason.chars().count() > 1024 {
            return Err(Error::Invalid("the shred reason is limited to 1024 characters".into()));
        }
        let report = self.catalog.shred_customer(id, reason, now_ms()).await.map_err(|e| match e {
            crate::catalog::CatalogError::NotFound => Error::NotFound(format!("customer {id} not found")),
            other => other.into(),
        })?;
        let stopped = self.ingest.cancel_customer(&report.customer_ref);
        let mut leftovers = 0;
        for object_id in report.objects.iter().chain(&report.discarded_uploads) {
            if let Err(e) = self.store.delete(object_id).await {
                tracing::warn!(%object_id, error = %e, "shredded object's ciphertext not deleted");
                leftovers += 1;
            }
        }
        let dir = self.spool_dir.clone();
        let uploads = report.discarded_uploads.clone();
        leftovers += tokio::task::spawn_blocking(move || {
            uploads.iter().filter(|id| spool::remove(&dir, id).is_err()).count() as u64
        })
        .await
        .map_err(Error::internal)?;
        tracing::info!(
            customer_ref = %report.customer_ref,
            key_versions = report.key_versions_destroyed,
            objects = report.objects.len(),
            uploads = report.discarded_uploads.len(),
            streams_stopped = stopped,
            leftovers,
            "customer shredded"
        );
        Ok(ShredOutcome {
            customer_id: id.clone(),
            key_versions_destroyed: report.key_versions_destroyed,
            objects_shredded: report.objects.len() as u64,
            uploads_discarded: report.discarded_uploads.len() as u64,
            shredded_at_ms: report.shredded_at_ms,
            leftovers,
        })
    }
}
