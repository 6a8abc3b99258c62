//! The key hierarchy: root key (behind [`RootKey`]) → customer keys (stored
//! root-wrapped in the catalog) → one data key per object (stored
//! customer-key-wrapped in the catalog, never in the object).

pub mod keyring;
pub mod pkcs11;
pub mod root_file;
pub mod rotate;

use std::sync::Arc;

use async_trait::async_trait;
use subtle::ConstantTimeEq;

use crate::catalog::{Catalog, CatalogError, CustomerKeyRecord, CustomerRecord, CustomerState};
use crate::crypto::secret::{CustomerKey, DataKey, SecretKey};
use crate::crypto::wrap;
use crate::model::{CustomerId, CustomerRef, ObjectId, now_ms};

pub use keyring::RootKeyring;
pub use pkcs11::{Pkcs11RootKey, Pkcs11Settings};
pub use root_file::FileRootKey;

/// A holder of the root key. The local key file implements it today; a
/// PKCS#11 token and cloud KMS implement it the same way: wrap and unwrap
/// happen inside the provider and the root key never leaves it.
#[async_trait]
pub trait RootKey: Send + Sync + 'static {
    /// Identifies the root key (and version) a customer key is wrapped under.
    fn key_id(&self) -> &str;
    async fn wrap(&self, key: &SecretKey, aad: &[u8]) -> Result<Vec<u8>, KeyError>;
    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretKey, KeyError>;
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key material or its configuration is unusable; the message says
    /// what to fix.
    #[error("{0}")]
    Config(String),
    /// The service is sealed: the root key failed its known-answer check.
    #[error("{0}")]
    Sealed(String),
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
    #[error("decryption failed")]
    DecryptionFailed,
    #[error("customer is {}", .0.as_str())]
    CustomerState(CustomerState),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Known-answer value of the first root key (frozen: installations that
/// never rotated keep exactly this).
const ROOT_CHECK_META: &str = "root_check_v1";
/// Known-answer value of one root key version: this prefix + its key id.
const ROOT_CHECK_PREFIX: &str = "root_check_v1:";
/// The key id of the active root key version, once a rotation has
/// switched it (absent before the first rotation).
const ROOT_ACTIVE_META: &str = "root_active_v1";
const ROOT_CHECK_AAD: &[u8] = b"recvault v1 root known-answer check";
const ROOT_CHECK_VALUE: &[u8; 32] = b"recvault root known-answer check";

/// Customer and data key operations over the root keyring and the catalog.
pub struct KeyService {
    /// Wraps new customer keys.
    root: Arc<dyn RootKey>,
    /// Unwraps customer keys under whichever version wrapped them.
    ring: Arc<RootKeyring>,
    catalog: Arc<dyn Catalog>,
}

/// The known-answer value wrapped under `root`.
async fn wrap_check(root: &dyn RootKey) -> Result<Vec<u8>, KeyError> {
    let mut value = *ROOT_CHECK_VALUE;
    let check = SecretKey::from_slice_zeroizing(&mut value).map_err(|_| KeyError::DecryptionFailed)?;
    root.wrap(&check, ROOT_CHECK_AAD).await
}

/// Whether `stored` is the known-answer value wrapped under `root`.
async fn check_opens(root: &dyn RootKey, stored: &[u8]) -> Result<bool, KeyError> {
    match root.unwrap(stored, ROOT_CHECK_AAD).await {
        Ok(value) => Ok(bool::from(value.expose().ct_eq(ROOT_CHECK_VALUE))),
        Err(KeyError::DecryptionFailed) => Ok(false),
        Err(other) => Err(other),
    }
}

fn version_check_meta(key_id: &str) -> String {
    format!("{ROOT_CHECK_PREFIX}{key_id}")
}

/// Records the known-answer value of a new root key version (kept if one is
/// there already), and checks it.
async fn record_version_check(root: &dyn RootKey, catalog: &dyn Catalog) -> Result<(), KeyError> {
    let meta = version_check_meta(root.key_id());
    let stored = match catalog.meta_get(&meta).await? {
        Some(v) => v,
        None => catalog.meta_put_if_absent(&meta, &wrap_check(root).await?).await?,
    };
    if !check_opens(root, &stored).await? {
        return Err(KeyError::Sealed(format!(
            "root key {} does not match the check value the catalog holds for it",
            root.key_id()
        )));
    }
    Ok(())
}

/// The active root key version, after its known-answer check. Before any
/// rotation this is the one key that opens `root_check_v1` (stored on first
/// start); afterwards the catalog names the active key id.
async fn active_version<'r>(
    ring: &'r RootKeyring,
    catalog: &dyn Catalog,
) -> Result<&'r keyring::RootKeyVersion, KeyError> {
    if let Some(id) = catalog.meta_get(ROOT_ACTIVE_META).await? {
        let id = String::from_utf8(id)
            .map_err(|_| KeyError::Sealed("the catalog's active root key id is corrupt".into()))?;
        let Some(active) = ring.get(&id) else {
            return Err(KeyError::Sealed(format!(
                "the active root key {id} (named in the catalog) is not available: restore its key file \
                 (root.key or root.v<N>.key in the data directory) or token key; present: {}",
                describe(ring)
            )));
        };
        let stored = catalog
            .meta_get(&version_check_meta(&id))
            .await?
            .ok_or_else(|| KeyError::Sealed(format!("the catalog has no check value for the active root key {id}")))?;
        if !check_opens(active.key.as_ref(), &stored).await? {
            return Err(KeyError::Sealed(format!(
                "the root key at {} claims id {id} but does not match this catalog: restore the original",
                active.location
            )));
        }
        return Ok(active);
    }
    let stored = match catalog.meta_get(ROOT_CHECK_META).await? {
        Some(v) => v,
        None => catalog.meta_put_if_absent(ROOT_CHECK_META, &wrap_check(ring.newest().key.as_ref()).await?).await?,
    };
    for v in ring.versions() {
        if check_opens(v.key.as_ref(), &stored).await? {
            return Ok(v);
        }
    }
    Err(KeyError::Sealed(format!(
        "the root key ({}) does not match this data directory's catalog: the key file (or token \
         key) was replaced or belongs to another installation; restore the original root key",
        describe(ring)
    )))
}

fn describe(ring: &RootKeyring) -> String {
    ring.versions().iter().map(|v| v.key.key_id()).collect::<Vec<_>>().join(", ")
}

impl KeyService {
    /// Checks one root key against the known-answer value stored in the
    /// catalog (storing one on first start). Until this succeeds the
    /// service is sealed and serves nothing.
    pub async fn unseal(root: Arc<dyn RootKey>, catalog: Arc<dyn Catalog>) -> Result<Self, KeyError> {
        Self::unseal_ring(RootKeyring::single(root), catalog).await
    }

    /// [`KeyService::unseal`] over every root key version present: the
    /// active one (named in the catalog) must pass its known-answer check.
    pub async fn unseal_ring(ring: RootKeyring, catalog: Arc<dyn Catalog>) -> Result<Self, KeyError> {
        let root = active_version(&ring, catalog.as_ref()).await?.key.clone();
        Ok(Self { root, ring: Arc::new(ring), catalog })
    }

    pub fn root_key_id(&self) -> &str {
        self.root.key_id()
    }

    /// The customer's record and active key for storing new content,
    /// creating both on the customer's first ingest. Refused unless the
    /// customer is active.
    pub async fn customer_for_ingest(&self, id: &CustomerId) -> Result<(CustomerRecord, CustomerKey), KeyError> {
        let customer = match self.catalog.customer(id).await? {
            Some(c) => c,
            None => self.create_customer(id).await?,
        };
        if customer.state != CustomerState::Active {
            return Err(KeyError::CustomerState(customer.state));
        }
        let key = self.customer_key(&customer.customer_ref, &customer.customer_id, customer.active_version).await?;
        Ok((customer, key))
    }

    async fn create_customer(&self, id: &CustomerId) -> Result<CustomerRecord, KeyError> {
        let customer_ref = CustomerRef::new_random();
        let version = 1;
        let key = SecretKey::generate().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let wrapped =
            self.root.wrap(&key, &wrap::customer_key_aad(customer_ref.as_bytes(), id.as_str(), version)).await?;
        let canary_key = SecretKey::generate().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let canary = wrap::wrap_key(&key, &canary_key, &wrap::canary_aad(customer_ref.as_bytes(), version))
            .map_err(|_| KeyError::DecryptionFailed)?;
        let record = CustomerRecord {
            customer_ref,
            customer_id: id.clone(),
            state: CustomerState::Active,
            active_version: version,
            canary,
            created_at_ms: now_ms(),
        };
        let key_record = CustomerKeyRecord {
            customer_ref,
            version,
            root_key_id: self.root.key_id().to_owned(),
            wrapped_key: wrapped,
        };
        let stored = self.catalog.create_customer(&record, &key_record).await?;
        if stored.customer_ref == customer_ref {
            tracing::info!(%customer_ref, "customer key created");
        }
        Ok(stored)
    }

    /// Unwraps one version of a customer's key. A destroyed version is
    /// reported as the customer being shredded, before any decryption.
    pub async fn customer_key(
        &self,
        customer_ref: &CustomerRef,
        customer_id: &CustomerId,
        version: u32,
    ) -> Result<CustomerKey, KeyError> {
        let record = self
            .catalog
            .customer_key(customer_ref, version)
            .await?
            .ok_or(KeyError::CustomerState(CustomerState::Shredded))?;
        let root = self.ring.get(&record.root_key_id).ok_or_else(|| {
            // A replica started before a rotation, or a version file or
            // token key removed too early: say which key is missing.
            KeyError::Unavailable(format!(
                "customer key is wrapped under root key {}, which this server did not load; restart it after \
                 a root-key rotation, or restore that key",
                record.root_key_id
            ))
        })?;
        let key = root
            .key
            .unwrap(
                &record.wrapped_key,
                &wrap::customer_key_aad(customer_ref.as_bytes(), customer_id.as_str(), version),
            )
            .await?;
        Ok(CustomerKey::from_secret(key))
    }

    /// Whether the customer's canary still unwraps: obtains the customer
    /// key exactly as a read would and tries it. `false` once the keys are
    /// destroyed (the shred's verification step); errors other than "no
    /// such key" and "does not open" are passed on, so an unreachable key
    /// provider never counts as a verified shred.
    pub async fn canary_opens(&self, customer: &CustomerRecord) -> Result<bool, KeyError> {
        if customer.canary.is_empty() {
            return Ok(false);
        }
        let key = match self.customer_key(&customer.customer_ref, &customer.customer_id, customer.active_version).await
        {
            Ok(k) => k,
            Err(KeyError::CustomerState(_) | KeyError::DecryptionFailed) => return Ok(false),
            Err(e) => return Err(e),
        };
        let aad = wrap::canary_aad(customer.customer_ref.as_bytes(), customer.active_version);
        Ok(wrap::unwrap_key(key.secret(), &customer.canary, &aad).is_ok())
    }

    /// A fresh data key for a new object, and its wrapped form.
    pub fn new_data_key(
        customer_key: &CustomerKey,
        customer_ref: &CustomerRef,
        object_id: &ObjectId,
        version: u32,
    ) -> Result<(DataKey, Vec<u8>), KeyError> {
        let dek = SecretKey::generate().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let wrapped = wrap::wrap_key(
            customer_key.secret(),
            &dek,
            &wrap::data_key_aad(customer_ref.as_bytes(), object_id.as_bytes(), version),
        )
        .map_err(|_| KeyError::DecryptionFailed)?;
        Ok((DataKey::from_secret(dek), wrapped))
    }

    /// Unwraps an object's data key; fails opaquely if it was not wrapped
    /// for exactly this customer, object and key version.
    pub fn unwrap_data_key(
        customer_key: &CustomerKey,
        customer_ref: &CustomerRef,
        object_id: &ObjectId,
        version: u32,
        wrapped: &[u8],
    ) -> Result<DataKey, KeyError> {
        wrap::unwrap_key(
            customer_key.secret(),
            wrapped,
            &wrap::data_key_aad(customer_ref.as_bytes(), object_id.as_bytes(), version),
        )
        .map(DataKey::from_secret)
        .map_err(|_| KeyError::DecryptionFailed)
    }

    /// Convenience: customer key then data key.
    pub async fn data_key(
        &self,
        customer_ref: &CustomerRef,
        customer_id: &CustomerId,
        object_id: &ObjectId,
        version: u32,
        wrapped: &[u8],
    ) -> Result<DataKey, KeyError> {
        if wrapped.is_empty() {
            return Err(KeyError::CustomerState(CustomerState::Shredded));
        }
        let ck = self.customer_key(customer_ref, customer_id, version).await?;
        Self::unwrap_data_key(&ck, customer_ref, object_id, version, wrapped)
    }
}

impl KeyService {
    /// The readiness probe's question: does the root key still open the
    /// catalog's known-answer value? It asks both the catalog and the key
    /// provider (a token pulled from its slot, a catalog restored from
    /// another installation), so a server that would fail every request
    /// stops reporting ready.
    pub async fn check_unsealed(&self) -> Result<(), KeyError> {
        let meta = match self.catalog.meta_get(ROOT_ACTIVE_META).await? {
            None => ROOT_CHECK_META.to_owned(),
            Some(id) if id == self.root.key_id().as_bytes() => version_check_meta(self.root.key_id()),
            Some(_) => {
                return Err(KeyError::Sealed(format!(
                    "the catalog's active root key is no longer {} (a rotation ran since this server started); \
                     restart it to load the new version",
                    self.root.key_id()
                )));
            }
        };
        let stored = self
            .catalog
            .meta_get(&meta)
            .await?
            .ok_or_else(|| KeyError::Sealed("the catalog has lost its root key known-answer value".into()))?;
        if check_opens(self.root.as_ref(), &stored).await? {
            Ok(())
        } else {
            Err(KeyError::Sealed(format!(
                "the root key ({}) no longer opens the catalog's known-answer value",
                self.root.key_id()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::sqlite::SqliteCatalog;

    #[tokio::test]
    async fn d4_wrong_root_key_stays_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let first = Arc::new(FileRootKey::open_or_create(&dir.path().join("a.key")).unwrap());
        KeyService::unseal(first.clone(), catalog.clone()).await.unwrap();
        KeyService::unseal(first, catalog.clone()).await.unwrap();
        let other = Arc::new(FileRootKey::open_or_create(&dir.path().join("b.key")).unwrap());
        let err = KeyService::unseal(other, catalog).await.err().expect("sealed");
        assert!(matches!(err, KeyError::Sealed(_)));
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[tokio::test]
    async fn d4_the_readiness_check_notices_a_replaced_known_answer() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let root = Arc::new(FileRootKey::open_or_create(&dir.path().join("a.key")).unwrap());
        let keys = KeyService::unseal(root, catalog.clone()).await.unwrap();
        keys.check_unsealed().await.unwrap();
        // The known-answer value of another installation's catalog.
        let other_catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let other = Arc::new(FileRootKey::open_or_create(&dir.path().join("b.key")).unwrap());
        KeyService::unseal(other, other_catalog.clone()).await.unwrap();
        let foreign = other_catalog.meta_get(ROOT_CHECK_META).await.unwrap().unwrap();
        let keys = KeyService { root: keys.root.clone(), ring: keys.ring.clone(), catalog: other_catalog };
        assert!(!foreign.is_empty());
        let err = keys.check_unsealed().await.unwrap_err();
        assert!(matches!(err, KeyError::Sealed(_)), "{err}");
    }

    #[tokio::test]
    async fn customer_keys_are_created_once_and_data_keys_bound() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let root = Arc::new(FileRootKey::open_or_create(&dir.path().join("root.key")).unwrap());
        let keys = KeyService::unseal(root, catalog.clone()).await.unwrap();
        let id = CustomerId::parse("crm:1").unwrap();
        let (c1, k1) = keys.customer_for_ingest(&id).await.unwrap();
        let (c2, k2) = keys.customer_for_ingest(&id).await.unwrap();
        assert_eq!(c1, c2);
        assert_eq!(k1.secret().expose(), k2.secret().expose());
        let object = ObjectId::new_random();
        let (dek, wrapped) = KeyService::new_data_key(&k1, &c1.customer_ref, &object, 1).unwrap();
        let back = keys.data_key(&c1.customer_ref, &id, &object, 1, &wrapped).await.unwrap();
        assert_eq!(back.secret().expose(), dek.secret().expose());
        // F6: presented for another object, the wrapped key does not open.
        assert!(matches!(
            keys.data_key(&c1.customer_ref, &id, &ObjectId::new_random(), 1, &wrapped).await,
            Err(KeyError::DecryptionFailed)
        ));
        assert!(keys.canary_opens(&c1).await.unwrap(), "a live customer's canary opens");
        let request = crate::catalog::ShredRequest {
            reason: "test".into(),
            requested_by: "t".into(),
            requested_at_ms: 1,
            destroy_after_ms: 1,
            requires_approval: false,
        };
        catalog.request_shred(&id, &request).await.unwrap();
        catalog.destroy_customer_keys(&id, 2).await.unwrap();
        assert!(!keys.canary_opens(&c1).await.unwrap(), "after the destroy step the canary no longer opens");
        assert!(matches!(
            keys.data_key(&c1.customer_ref, &id, &object, 1, &wrapped).await,
            Err(KeyError::CustomerState(CustomerState::Shredded))
        ));
        assert!(matches!(
            keys.customer_for_ingest(&id).await,
            Err(KeyError::CustomerState(CustomerState::PendingShred))
        ));
    }
}
