//! Readiness: ready only while the root key still opens the catalog's
//! known-answer value and the object store answers. `GET /ready` on the
//! HTTP port and the gRPC health service report the same probe.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::keys::{KeyError, KeyService};
use crate::store::Store;

/// The gRPC service whose health follows readiness (besides "", the
/// server as a whole).
const SERVICE: &str =
    <crate::api::pb::recvault_server::RecvaultServer<crate::api::Service> as tonic::server::NamedService>::NAME;

/// Why the server is not ready: a short reason for an unauthenticated
/// caller (the detail goes to the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub &'static str);

pub struct Readiness {
    keys: Arc<KeyService>,
    store: Store,
    /// With local storage, the objects directory, which must exist: a
    /// volume that is not mounted leaves it missing, and a listing of a
    /// missing directory looks empty rather than failing.
    local_objects: Option<PathBuf>,
    timeout: Duration,
    health: HealthReporter,
    /// 0 unknown, 1 ready, 2 not ready: transitions are logged once.
    last: AtomicU8,
}

impl Readiness {
    pub fn new(
        keys: Arc<KeyService>,
        store: Store,
        local_objects: Option<PathBuf>,
        timeout: Duration,
        health: HealthReporter,
    ) -> Self {
        Self { keys, store, local_objects, timeout, health, last: AtomicU8::new(0) }
    }

    /// Probes once (each part bounded by the timeout), sets the gRPC
    /// health status to match and returns the verdict.
    pub async fn check(&self) -> Result<(), NotReady> {
        let verdict = self.probe().await;
        let status = if verdict.is_ok() { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.health.set_service_status("", status).await;
        self.health.set_service_status(SERVICE, status).await;
        let now = if verdict.is_ok() { 1 } else { 2 };
        if self.last.swap(now, Ordering::Relaxed) != now {
            match &verdict {
                Ok(()) => tracing::info!("ready"),
                Err(NotReady(reason)) => tracing::warn!(reason, "not ready"),
            }
        }
        verdict
    }

    async fn probe(&self) -> Result<(), NotReady> {
        let keys = async {
            match tokio::time::timeout(self.timeout, self.keys.check_unsealed()).await {
                Err(_) => {
                    tracing::warn!(timeout = ?self.timeout, "readiness: catalog or root key did not answer in time");
                    Err(NotReady("catalog or root key provider not answering"))
                }
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "readiness: key check failed");
                    Err(NotReady(match e {
                        KeyError::Catalog(_) => "catalog unreachable",
                        KeyError::Unavailable(_) => "root key provider unavailable",
                        _ => "sealed: the root key does not open the catalog's known-answer value",
                    }))
                }
            }
        };
        let store = async {
            if let Some(dir) = &self.local_objects
                && !tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir())
            {
                tracing::warn!(dir = %dir.display(), "readiness: the objects directory is missing (volume not mounted?)");
                return Err(NotReady("object store unreachable"));
            }
            match tokio::time::timeout(self.timeout, self.store.probe()).await {
                Err(_) => {
                    tracing::warn!(timeout = ?self.timeout, "readiness: object store did not answer in time");
                    Err(NotReady("object store not answering"))
                }
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "readiness: object store probe failed");
                    Err(NotReady("object store unreachable"))
                }
            }
        };
        let (k, s) = tokio::join!(keys, store);
        k.and(s)
    }

    /// Re-probes every `interval` so the gRPC health status follows the
    /// parts even when nobody asks `/ready`. Runs until aborted.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = self.check().await;
        }
    }
}
