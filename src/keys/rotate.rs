//! Root-key rotation: re-wrap every customer key under a new root key version, resumably, and retire old versions only at a verified zero count.
//!
//! Order, so that a crash at any point leaves every customer key readable
//! under a version that is still present:
//! 1. create the new version in its provider (key file renamed into place,
//!    or key generated in the token);
//! 2. record its known-answer value, then switch the catalog's active
//!    version to it (compare-and-set: new customer keys are wrapped under it
//!    from the next start on);
//! 3. re-wrap, in batches, every customer key row not under the active
//!    version: unwrap with the version named in the row, wrap with the
//!    active one, and update the row only if it still names the old version
//!    (compare-and-set). A shred that destroyed the row meanwhile wins: the
//!    update finds no row and inserts nothing (E3);
//! 4. count rows per version; a version other than the active one is
//!    retired (destroyed in its provider) only when its count is zero (A4).
//!
//! A run that finds older versions still present finishes that rotation
//! instead of starting another. Objects and media are never touched: data
//! keys are wrapped by customer keys, whose value does not change.

use std::sync::Arc;

use super::keyring::RootKeyring;
use super::{KeyError, ROOT_ACTIVE_META, RootKey, active_version, record_version_check};
use crate::catalog::Catalog;
use crate::crypto::wrap;

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// The root key id every customer key is now wrapped under.
    pub active_key_id: String,
    /// Whether this run created that version (false: it finished an
    /// interrupted rotation).
    pub created: bool,
    /// Customer key rows re-wrapped by this run.
    pub rewrapped: u64,
    /// Rows that changed under the run (destroyed by a shred, or re-wrapped
    /// by another run) and were left alone.
    pub skipped: u64,
    /// Versions destroyed in their provider, as (version, key id).
    pub retired: Vec<(u32, String)>,
}

/// Customer key rows per root key version, for `recvault keys status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    pub version: Option<u32>,
    pub key_id: String,
    pub location: Option<String>,
    pub active: bool,
    pub customer_keys: u64,
}

/// Every version present, and every root key id rows name (a missing one
/// has no version or location), with its count of customer keys.
pub async fn status(ring: &RootKeyring, catalog: &dyn Catalog) -> Result<Vec<VersionStatus>, KeyError> {
    let active = active_version(ring, catalog).await?.key.key_id().to_owned();
    let counts = catalog.count_customer_keys_by_root().await?;
    let count = |id: &str| counts.iter().find(|(k, _)| k == id).map_or(0, |(_, n)| *n);
    let mut out: Vec<VersionStatus> = ring
        .versions()
        .iter()
        .map(|v| VersionStatus {
            version: Some(v.version),
            key_id: v.key.key_id().to_owned(),
            location: Some(v.location.clone()),
            active: v.key.key_id() == active,
            customer_keys: count(v.key.key_id()),
        })
        .collect();
    for (id, n) in &counts {
        if ring.get(id).is_none() {
            out.push(VersionStatus {
                version: None,
                key_id: id.clone(),
                location: None,
                active: false,
                customer_keys: *n,
            });
        }
    }
    Ok(out)
}

/// Runs (or resumes) a rotation. `progress` is called after every batch
/// with the running totals.
pub async fn rotate_root(
    ring: &mut RootKeyring,
    catalog: &dyn Catalog,
    batch: usize,
    mut progress: impl FnMut(&RotationReport),
) -> Result<RotationReport, KeyError> {
    if batch == 0 {
        return Err(KeyError::Config("the batch size must be at least 1".into()));
    }
    let current = active_version(ring, catalog).await?;
    let (current_version, current_id) = (current.version, current.key.key_id().to_owned());
    let recorded = catalog.meta_get(ROOT_ACTIVE_META).await?;
    let mut report = RotationReport::default();

    let counts = catalog.count_customer_keys_by_root().await?;
    let unfinished = ring.versions().len() > 1 || counts.iter().any(|(id, n)| *n > 0 && *id != current_id);
    // A newer version than the active one was created by an interrupted
    // run that did not switch yet; older versions still present mean a
    // switched rotation is unfinished. Either way: finish it, no new key.
    let target: Arc<dyn RootKey> = if ring.newest().version > current_version || unfinished {
        ring.newest().key.clone()
    } else {
        report.created = true;
        ring.create_next().await?.key.clone()
    };
    report.active_key_id = target.key_id().to_owned();

    if target.key_id() != current_id {
        record_version_check(target.as_ref(), catalog).await?;
        let switched =
            catalog.meta_compare_and_set(ROOT_ACTIVE_META, recorded.as_deref(), target.key_id().as_bytes()).await?;
        if !switched {
            return Err(KeyError::Config(
                "another rotation switched the active root key meanwhile; run rotate-root again".into(),
            ));
        }
        tracing::info!(key_id = %target.key_id(), "active root key switched");
    }

    let mut after = None;
    loop {
        let rows = catalog.customer_keys_not_under(target.key_id(), after, batch).await?;
        let Some((_, last)) = rows.last() else { break };
        after = Some((last.customer_ref, last.version));
        let (rewrapped, skipped) = rewrap_batch(ring, target.as_ref(), catalog, rows).await?;
        report.rewrapped += rewrapped;
        report.skipped += skipped;
        progress(&report);
        // Crash tests stop the run here, between batches.
        fail::fail_point!("rotate-root-batch", |_| Err(KeyError::Unavailable(
            "rotation interrupted (failpoint rotate-root-batch)".into()
        )));
    }

    // Retire only what a fresh count shows nothing depends on.
    let counts = catalog.count_customer_keys_by_root().await?;
    let old: Vec<(u32, String)> = ring
        .versions()
        .iter()
        .filter(|v| v.key.key_id() != target.key_id())
        .map(|v| (v.version, v.key.key_id().to_owned()))
        .collect();
    for (version, id) in old {
        let n = counts.iter().find(|(k, _)| *k == id).map_or(0, |(_, n)| *n);
        if n == 0 {
            ring.retire(version).await?;
            tracing::info!(version, key_id = %id, "root key version retired");
            report.retired.push((version, id));
        } else {
            tracing::warn!(version, key_id = %id, customer_keys = n, "root key version still wraps keys; kept");
        }
    }
    Ok(report)
}

/// Re-wraps one listed batch under `target`; returns (re-wrapped, skipped).
/// Each update is a compare-and-set on the row's old root key id, so a row
/// a shred destroyed after it was listed is skipped, never re-created.
async fn rewrap_batch(
    ring: &RootKeyring,
    target: &dyn RootKey,
    catalog: &dyn Catalog,
    rows: Vec<(crate::model::CustomerId, crate::catalog::CustomerKeyRecord)>,
) -> Result<(u64, u64), KeyError> {
    let (mut rewrapped, mut skipped) = (0, 0);
    for (customer_id, row) in rows {
        let Some(old) = ring.get(&row.root_key_id) else {
            return Err(KeyError::Config(format!(
                "a customer key is wrapped under root key {}, which is not present; restore its key file or \
                 token key and run again (nothing was retired)",
                row.root_key_id
            )));
        };
        let aad = wrap::customer_key_aad(row.customer_ref.as_bytes(), customer_id.as_str(), row.version);
        let key = match old.key.unwrap(&row.wrapped_key, &aad).await {
            Ok(key) => key,
            Err(KeyError::DecryptionFailed) => {
                // Fail closed: a row that does not open is never re-wrapped
                // or counted away, so its version is never retired.
                return Err(KeyError::Config(format!(
                    "the customer key {} version {} does not unwrap under root key {}; nothing was retired",
                    row.customer_ref, row.version, row.root_key_id
                )));
            }
            Err(e) => return Err(e),
        };
        let update = crate::catalog::CustomerKeyRecord {
            root_key_id: target.key_id().to_owned(),
            wrapped_key: target.wrap(&key, &aad).await?,
            ..row.clone()
        };
        drop(key);
        if catalog.rewrap_customer_key(&update, &row.root_key_id).await? {
            rewrapped += 1;
        } else {
            skipped += 1;
        }
    }
    Ok((rewrapped, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::sqlite::SqliteCatalog;
    use crate::catalog::{CustomerRecord, CustomerState, ShredRequest};
    use crate::keys::KeyService;
    use crate::model::{CustomerId, ObjectId};

    async fn customers(keys: &KeyService, n: usize) -> Vec<(CustomerId, CustomerRecord, [u8; 32])> {
        let mut out = Vec::new();
        for i in 0..n {
            let id = CustomerId::parse(&format!("crm:{i}")).unwrap();
            let (record, key) = keys.customer_for_ingest(&id).await.unwrap();
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(key.secret().expose());
            out.push((id, record, bytes));
        }
        out
    }

    async fn unseal(dir: &std::path::Path, catalog: &Arc<dyn Catalog>) -> KeyService {
        KeyService::unseal_ring(RootKeyring::open_file(dir).unwrap(), catalog.clone()).await.unwrap()
    }

    #[tokio::test]
    async fn a4_rotation_rewraps_resumes_and_retires_at_zero() {
        // Serialises with every other test that sets failpoints.
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.path().join("catalog.sqlite")).unwrap());
        let keys = unseal(dir.path(), &catalog).await;
        let old_id = keys.root_key_id().to_owned();
        let made = customers(&keys, 5).await;
        let object = ObjectId::new_random();
        let ck = keys.customer_key(&made[0].1.customer_ref, &made[0].0, 1).await.unwrap();
        let (dek, wrapped_dek) = KeyService::new_data_key(&ck, &made[0].1.customer_ref, &object, 1).unwrap();
        drop((ck, keys));

        // Interrupted after two batches of two.
        fail::cfg("rotate-root-batch", "1*off->return").unwrap();
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        let mut seen = Vec::new();
        let err = rotate_root(&mut ring, catalog.as_ref(), 2, |r| seen.push(r.rewrapped)).await.unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        fail::remove("rotate-root-batch");
        assert_eq!(seen, vec![2, 4]);
        assert!(dir.path().join("root.key").exists() && dir.path().join("root.v2.key").exists());
        let new_id = ring.newest().key.key_id().to_owned();
        drop(ring);

        // At this point every key opens, under either version, after a restart.
        let keys = unseal(dir.path(), &catalog).await;
        assert_eq!(keys.root_key_id(), new_id, "the switch is recorded before any re-wrap");
        for (id, record, bytes) in &made {
            assert_eq!(keys.customer_key(&record.customer_ref, id, 1).await.unwrap().secret().expose(), bytes);
        }
        let mut counts = catalog.count_customer_keys_by_root().await.unwrap();
        counts.sort_by_key(|(id, _)| id != &old_id);
        assert_eq!(counts, vec![(old_id.clone(), 1), (new_id.clone(), 4)]);
        // New customers are wrapped under the new version.
        let (late, _) = keys.customer_for_ingest(&CustomerId::parse("crm:late").unwrap()).await.unwrap();
        assert_eq!(catalog.customer_key(&late.customer_ref, 1).await.unwrap().unwrap().root_key_id, new_id);
        drop(keys);

        // The re-run finishes the same rotation (no third version) and
        // retires version 1 at a count of zero.
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        let done = rotate_root(&mut ring, catalog.as_ref(), 2, |_| {}).await.unwrap();
        assert!(!done.created);
        assert_eq!(done.active_key_id, new_id);
        assert_eq!(done.rewrapped, 1);
        assert_eq!(done.retired, vec![(1, old_id.clone())]);
        assert!(!dir.path().join("root.key").exists(), "retired key file removed");
        assert_eq!(catalog.count_customer_keys_by_root().await.unwrap(), vec![(new_id.clone(), 6)]);
        drop(ring);

        let keys = unseal(dir.path(), &catalog).await;
        for (id, record, bytes) in &made {
            assert_eq!(keys.customer_key(&record.customer_ref, id, 1).await.unwrap().secret().expose(), bytes);
            assert!(keys.canary_opens(record).await.unwrap());
        }
        let back = keys.data_key(&made[0].1.customer_ref, &made[0].0, &object, 1, &wrapped_dek).await.unwrap();
        assert_eq!(back.secret().expose(), dek.secret().expose(), "data keys are untouched");
        let st = status(&RootKeyring::open_file(dir.path()).unwrap(), catalog.as_ref()).await.unwrap();
        assert_eq!(st.len(), 1);
        assert!(st[0].active && st[0].customer_keys == 6 && st[0].version == Some(2), "{st:?}");
        drop(keys);

        // A further run starts a new rotation (version 3).
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        let third = rotate_root(&mut ring, catalog.as_ref(), 100, |_| {}).await.unwrap();
        assert!(third.created);
        assert_eq!(third.rewrapped, 6);
        assert_eq!(third.retired, vec![(2, new_id)]);
        assert!(dir.path().join("root.v3.key").exists() && !dir.path().join("root.v2.key").exists());
        scenario.teardown();
    }

    #[tokio::test]
    async fn a4_interrupted_before_the_switch_resumes_with_the_created_version() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let keys = unseal(dir.path(), &catalog).await;
        let made = customers(&keys, 2).await;
        let old_id = keys.root_key_id().to_owned();
        drop(keys);
        // A crash right after the new key file was renamed into place.
        let created = RootKeyring::open_file(dir.path()).unwrap().create_next().await.unwrap().key.key_id().to_owned();
        let keys = unseal(dir.path(), &catalog).await;
        assert_eq!(keys.root_key_id(), old_id, "not switched yet: the old version stays active");
        drop(keys);
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        let report = rotate_root(&mut ring, catalog.as_ref(), 10, |_| {}).await.unwrap();
        assert!(!report.created);
        assert_eq!(report.active_key_id, created);
        assert_eq!(report.rewrapped, 2);
        assert_eq!(report.retired, vec![(1, old_id)]);
        let keys = unseal(dir.path(), &catalog).await;
        for (id, record, bytes) in &made {
            assert_eq!(keys.customer_key(&record.customer_ref, id, 1).await.unwrap().secret().expose(), bytes);
        }
    }

    #[tokio::test]
    async fn e3_a_shred_between_listing_and_rewrap_wins() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let keys = unseal(dir.path(), &catalog).await;
        let made = customers(&keys, 3).await;
        let victim = made[1].clone();
        drop(keys);
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        let target = ring.create_next().await.unwrap().key.clone();
        // The rotation lists its batch ...
        let listed = catalog.customer_keys_not_under(target.key_id(), None, 10).await.unwrap();
        assert_eq!(listed.len(), 3);
        // ... a shred destroys the victim's keys ...
        let request = ShredRequest {
            reason: "erasure".into(),
            requested_by: "dpo".into(),
            requested_at_ms: 1,
            destroy_after_ms: 1,
            requires_approval: false,
        };
        catalog.request_shred(&victim.0, &request).await.unwrap();
        catalog.destroy_customer_keys(&victim.0, 2).await.unwrap();
        // ... and the batch's updates land after it.
        let (rewrapped, skipped) = rewrap_batch(&ring, target.as_ref(), catalog.as_ref(), listed).await.unwrap();
        assert_eq!((rewrapped, skipped), (2, 1));
        assert_eq!(catalog.customer_key(&victim.1.customer_ref, 1).await.unwrap(), None, "never re-created");
        assert!(catalog.customer_key_versions(&victim.1.customer_ref).await.unwrap().is_empty());
        // Finishing the rotation retires version 1: no row depends on it.
        let report = rotate_root(&mut ring, catalog.as_ref(), 10, |_| {}).await.unwrap();
        assert_eq!(report.rewrapped, 0);
        assert_eq!(report.retired.len(), 1);
        let keys = unseal(dir.path(), &catalog).await;
        assert!(matches!(
            keys.customer_key(&victim.1.customer_ref, &victim.0, 1).await,
            Err(KeyError::CustomerState(CustomerState::Shredded))
        ));
        assert!(!keys.canary_opens(&victim.1).await.unwrap());
        for (id, record, bytes) in made.iter().filter(|(id, ..)| *id != victim.0) {
            assert_eq!(keys.customer_key(&record.customer_ref, id, 1).await.unwrap().secret().expose(), bytes);
        }
    }

    #[tokio::test]
    async fn a_row_under_a_missing_version_stops_the_run_and_nothing_is_retired() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let keys = unseal(dir.path(), &catalog).await;
        customers(&keys, 1).await;
        drop(keys);
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        rotate_root(&mut ring, catalog.as_ref(), 10, |_| {}).await.unwrap();
        // A row naming a root key nobody has (restored from elsewhere).
        let (record, _) = {
            let keys = unseal(dir.path(), &catalog).await;
            keys.customer_for_ingest(&CustomerId::parse("crm:odd").unwrap()).await.unwrap()
        };
        let row = catalog.customer_key(&record.customer_ref, 1).await.unwrap().unwrap();
        let foreign = crate::catalog::CustomerKeyRecord { root_key_id: "file:00".into(), ..row.clone() };
        assert!(catalog.rewrap_customer_key(&foreign, &row.root_key_id).await.unwrap());
        let before = std::fs::read_dir(dir.path()).unwrap().count();
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        let err = rotate_root(&mut ring, catalog.as_ref(), 10, |_| {}).await.unwrap_err();
        assert!(err.to_string().contains("file:00") && err.to_string().contains("not present"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before, "no key file created or retired");
    }
}
