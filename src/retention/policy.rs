//! The retention policies in force, shared by ingest (which fixes each
//! object's expiry at commit) and the retention service (which changes
//! them).

use std::sync::{Arc, RwLock};

use crate::catalog::{Catalog, CatalogError};
use crate::model::{ObjectSpec, Retention, RetentionPolicy};

/// A snapshot of the policies, swapped whole on every change.
#[derive(Debug, Default)]
pub struct Policies {
    current: RwLock<Arc<Vec<RetentionPolicy>>>,
}

impl Policies {
    pub fn new(policies: Vec<RetentionPolicy>) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(Arc::new(policies)) })
    }

    /// Reloads from the catalog (the source of truth).
    pub async fn reload(&self, catalog: &dyn Catalog) -> Result<(), CatalogError> {
        let stored = catalog.policies().await?;
        let list = stored.into_iter().map(|p| p.policy).collect();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<Vec<RetentionPolicy>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The retention of an object committed now.
    pub fn assign(&self, spec: &ObjectSpec, created_at_ms: i64) -> Retention {
        RetentionPolicy::assign(&self.snapshot(), spec, created_at_ms)
    }
}
