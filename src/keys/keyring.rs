//! Root-key versions held at once: the active one wraps, any present one unwraps (chosen by a row's `root_key_id`).
//!
//! Version 1 is what existed before rotation: `root.key` in the data
//! directory, or the PKCS#11 key labelled `root_key.key_label`. Rotation
//! adds version N as `root.v<N>.key` beside it, or as a token key labelled
//! `<key_label>.v<N>`. Which version is active is recorded in the catalog,
//! not here, so every replica and every restart agrees.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::pkcs11::{self, Pkcs11RootKey, Pkcs11Settings};
use super::root_file::{self, FileRootKey};
use super::{KeyError, RootKey};

/// One root key version present in its provider.
pub struct RootKeyVersion {
    pub version: u32,
    pub key: Arc<dyn RootKey>,
    /// Where it lives (a file path, or token/label), for operators.
    pub location: String,
}

/// Where the versions live, so rotation can add and retire them.
enum Source {
    File(PathBuf),
    Pkcs11(Pkcs11Settings),
    /// One key handed in by the caller (tests, embedders): it unwraps and
    /// wraps, but cannot grow or retire versions.
    Fixed,
}

/// The root key versions of an installation, oldest first.
pub struct RootKeyring {
    versions: Vec<RootKeyVersion>,
    source: Source,
}

impl RootKeyring {
    /// A ring of one key that cannot be rotated.
    pub fn single(key: Arc<dyn RootKey>) -> Self {
        let location = key.key_id().to_owned();
        Self { versions: vec![RootKeyVersion { version: 1, key, location }], source: Source::Fixed }
    }

    /// The key files of a data directory: `root.key` and `root.v<N>.key`.
    /// On first start (no key file at all) `root.key` is created; once a
    /// rotation retired `root.key`, it is never created again while a
    /// later version exists.
    pub fn open_file(data_dir: &Path) -> Result<Self, KeyError> {
        let mut versions = Vec::new();
        let base = FileRootKey::default_path(data_dir);
        let entries = std::fs::read_dir(data_dir)
            .map_err(|e| KeyError::Config(format!("cannot list the data directory {}: {e}", data_dir.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| KeyError::Config(format!("cannot list the data directory {}: {e}", data_dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(v) = file_version(name) {
                let path = entry.path();
                versions.push(RootKeyVersion {
                    version: v,
                    key: Arc::new(FileRootKey::open_or_create(&path)?),
                    location: path.display().to_string(),
                });
            } else if name.starts_with("root.v") && name.ends_with(".key.tmp") {
                // Left by a crash before its rename: that key never wrapped
                // anything, and its bytes should not linger.
                root_file::erase_file(&entry.path())?;
            }
        }
        if base.exists() || versions.is_empty() {
            versions.push(RootKeyVersion {
                version: 1,
                key: Arc::new(FileRootKey::open_or_create(&base)?),
                location: base.display().to_string(),
            });
        }
        versions.sort_by_key(|v| v.version);
        Ok(Self { versions, source: Source::File(data_dir.to_owned()) })
    }

    /// The versions of the configured key in a PKCS#11 token. Version 1
    /// is generated only if the token holds no version at all and
    /// `create_key` is set (as before rotation existed).
    pub async fn open_pkcs11(settings: Pkcs11Settings) -> Result<Self, KeyError> {
        tokio::task::spawn_blocking(move || Self::open_pkcs11_blocking(settings))
            .await
            .map_err(|_| KeyError::Unavailable("pkcs11 open task failed".into()))?
    }

    fn open_pkcs11_blocking(settings: Pkcs11Settings) -> Result<Self, KeyError> {
        let mut present = pkcs11::present_versions(&settings)?;
        if present.is_empty() {
            // Opening version 1 generates it (create_key) or names the fix.
            present.push(1);
        }
        let mut versions = Vec::new();
        for v in present {
            let s = Pkcs11Settings { key_label: pkcs11::version_label(&settings.key_label, v), ..settings.clone() };
            let location = format!("pkcs11 token {:?} key {:?}", s.token_label, s.key_label);
            versions.push(RootKeyVersion { version: v, key: Arc::new(Pkcs11RootKey::open_blocking(&s)?), location });
        }
        Ok(Self { versions, source: Source::Pkcs11(settings) })
    }

    pub fn versions(&self) -> &[RootKeyVersion] {
        &self.versions
    }

    /// The version whose key has this id, if present.
    pub fn get(&self, key_id: &str) -> Option<&RootKeyVersion> {
        self.versions.iter().find(|v| v.key.key_id() == key_id)
    }

    pub fn newest(&self) -> &RootKeyVersion {
        // Never empty: every constructor adds at least one version.
        self.versions.last().expect("a keyring holds at least one version")
    }

    /// Creates the next version in the provider (a new key file, or a key
    /// generated inside the token) and returns it.
    pub async fn create_next(&mut self) -> Result<&RootKeyVersion, KeyError> {
        let version = self.newest().version + 1;
        let created = match &self.source {
            Source::File(dir) => {
                let path = dir.join(format!("root.v{version}.key"));
                let key = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || FileRootKey::create_atomic(&path)
                })
                .await
                .map_err(|_| KeyError::Unavailable("key file task failed".into()))??;
                RootKeyVersion { version, key: Arc::new(key), location: path.display().to_string() }
            }
            Source::Pkcs11(settings) => {
                let s = Pkcs11Settings {
                    key_label: pkcs11::version_label(&settings.key_label, version),
                    create_key: true,
                    ..settings.clone()
                };
                let location = format!("pkcs11 token {:?} key {:?}", s.token_label, s.key_label);
                RootKeyVersion { version, key: Arc::new(Pkcs11RootKey::open(s).await?), location }
            }
            Source::Fixed => return Err(KeyError::Config("this root key cannot be rotated".into())),
        };
        self.versions.push(created);
        Ok(self.newest())
    }

    /// Destroys a version in its provider (the key file overwritten and
    /// removed, or the token object destroyed). The caller has verified
    /// that no customer key is wrapped under it any more.
    pub async fn retire(&mut self, version: u32) -> Result<(), KeyError> {
        let Some(pos) = self.versions.iter().position(|v| v.version == version) else { return Ok(()) };
        let retired = self.versions.remove(pos);
        // The provider's own handle goes first, so nothing can use it after.
        drop(retired.key);
        match &self.source {
            Source::File(dir) => {
                let path = if version == 1 {
                    FileRootKey::default_path(dir)
                } else {
                    dir.join(format!("root.v{version}.key"))
                };
                tokio::task::spawn_blocking(move || root_file::erase_file(&path))
                    .await
                    .map_err(|_| KeyError::Unavailable("key file task failed".into()))?
            }
            Source::Pkcs11(settings) => {
                let s = Pkcs11Settings {
                    key_label: pkcs11::version_label(&settings.key_label, version),
                    ..settings.clone()
                };
                tokio::task::spawn_blocking(move || pkcs11::destroy_key_blocking(&s))
                    .await
                    .map_err(|_| KeyError::Unavailable("pkcs11 task failed".into()))?
            }
            Source::Fixed => Err(KeyError::Config("this root key cannot be retired".into())),
        }
    }
}

/// `root.v<N>.key` → N (N ≥ 2; version 1 is `root.key`).
fn file_version(name: &str) -> Option<u32> {
    let n: u32 = name.strip_prefix("root.v")?.strip_suffix(".key")?.parse().ok()?;
    (n >= 2 && name == format!("root.v{n}.key")).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_file_names() {
        assert_eq!(file_version("root.v2.key"), Some(2));
        assert_eq!(file_version("root.v17.key"), Some(17));
        for name in ["root.key", "root.v1.key", "root.v02.key", "root.v2.key.tmp", "root.vx.key", "root.v+3.key"] {
            assert_eq!(file_version(name), None, "{name}");
        }
    }

    #[tokio::test]
    async fn a_file_ring_grows_and_retires_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = RootKeyring::open_file(dir.path()).unwrap();
        assert_eq!(ring.versions().len(), 1);
        let v1 = ring.newest().key.key_id().to_owned();
        let v2 = ring.create_next().await.unwrap().key.key_id().to_owned();
        assert_ne!(v1, v2);
        assert!(dir.path().join("root.v2.key").exists());
        // A crash between writing and renaming leaves only a temp file,
        // erased at the next open.
        std::fs::write(dir.path().join("root.v3.key.tmp"), b"partial").unwrap();
        let mut again = RootKeyring::open_file(dir.path()).unwrap();
        assert!(!dir.path().join("root.v3.key.tmp").exists());
        let ids: Vec<_> = again.versions().iter().map(|v| (v.version, v.key.key_id().to_owned())).collect();
        assert_eq!(ids, vec![(1, v1.clone()), (2, v2.clone())]);
        again.retire(1).await.unwrap();
        assert!(!dir.path().join("root.key").exists());
        // With a later version present, root.key is not created again.
        let reopened = RootKeyring::open_file(dir.path()).unwrap();
        assert_eq!(reopened.versions().len(), 1);
        assert_eq!(reopened.newest().key.key_id(), v2);
        assert!(reopened.get(&v1).is_none());
    }
}
