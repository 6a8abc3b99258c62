//! In-process revocation signal: after a shred or an expiry returns, no
//! request on this process may hand out that content's plaintext, including
//! a read already streaming. Long-running reads note the epoch when they
//! start and re-check their object's state whenever it moved.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Revocations {
    epoch: AtomicU64,
}

impl Revocations {
    /// Called after content was made unreadable (keys destroyed, object
    /// expired, shred requested).
    pub fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}
