//! Root key held in a local key file: the embedded default.
//!
//! File layout (v1, do not change): 8 bytes magic `RVROOTK1`, 16 bytes key
//! id, 32 bytes key. Created on first start with mode 0600; a file that is
//! readable by group or others is refused. Root-key rotation adds versions
//! `root.v<N>.key` beside `root.key` (version 1), each in this same layout.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{KeyError, RootKey};
use crate::crypto::secret::{RootKeyMaterial, SecretKey, random_bytes};
use crate::crypto::wrap;

const MAGIC: &[u8; 8] = b"RVROOTK1";
const FILE_LEN: usize = 8 + 16 + 32;

/// A root key read from (or created in) a local file.
pub struct FileRootKey {
    key: RootKeyMaterial,
    key_id: String,
}

impl FileRootKey {
    /// Opens the key file, creating it (mode 0600) if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, KeyError> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Self::open(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(file_error(path, e)),
        }
    }

    fn create(path: &Path) -> Result<Self, KeyError> {
        // Whole or not at all: a power cut must not leave an empty key
        // file that stops the next start (threat plan A2).
        Self::create_atomic(path)
    }

    /// Creates a new key file whole or not at all: written to a temp file
    /// of its own, synced, then hard-linked into place create-only, so a
    /// crash never leaves a short key file that would stop the next start,
    /// and two processes creating it at once (a first `serve` and a `keys
    /// status`) end up with the same key: the one that loses the link opens
    /// the winner's file. Used for rotated versions too.
    pub fn create_atomic(path: &Path) -> Result<Self, KeyError> {
        // A temp file of a crash before its link holds a key that never
        // wrapped anything; the old fixed name is cleared for that reason.
        erase_file(&temp_path(path))?;
        let unique: [u8; 8] = random_bytes().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let mut name = temp_path(path).into_os_string();
        name.push(format!(".{}", hex::encode(unique)));
        let tmp = PathBuf::from(name);
        let created = Self::create_via(&tmp, path)?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {
                // Unlink only: the bytes are the key's file now.
                std::fs::remove_file(&tmp).map_err(|e| file_error(&tmp, e))?;
                sync_parent(path)?;
                Ok(created)
            }
            Err(e) => {
                // Our key never wrapped anything: erase it.
                erase_file(&tmp)?;
                drop(created);
                if e.kind() == std::io::ErrorKind::AlreadyExists { Self::open(path) } else { Err(file_error(path, e)) }
            }
        }
    }

    fn create_via(write_to: &Path, path: &Path) -> Result<Self, KeyError> {
        let key = SecretKey::generate().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let id: [u8; 16] = random_bytes().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let mut contents = zeroize::Zeroizing::new(Vec::with_capacity(FILE_LEN));
        contents.extend_from_slice(MAGIC);
        contents.extend_from_slice(&id);
        contents.extend_from_slice(key.expose());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(write_to)
            .map_err(|e| file_error(write_to, e))?;
        file.write_all(&contents).map_err(|e| file_error(write_to, e))?;
        file.sync_all().map_err(|e| file_error(write_to, e))?;
        sync_parent(write_to)?;
        tracing::info!(path = %path.display(), "created a new root key file");
        Ok(Self { key: RootKeyMaterial::from_secret(key), key_id: format!("file:{}", hex::encode(id)) })
    }

    fn open(path: &Path) -> Result<Self, KeyError> {
        let meta = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
        if !meta.is_file() {
            return Err(KeyError::Config(format!("root key {} is not a regular file", path.display())));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Config(format!(
                "root key file {} has mode {mode:04o}, readable by group or others; run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let mut contents = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| file_error(path, e))?);
        if contents.len() != FILE_LEN || &contents[..8] != MAGIC {
            return Err(KeyError::Config(format!(
                "{} is not a recvault root key file (expected {FILE_LEN} bytes starting with RVROOTK1)",
                path.display()
            )));
        }
        let id = hex::encode(&contents[8..24]);
        let key = SecretKey::from_slice_zeroizing(&mut contents[24..])
            .map_err(|_| KeyError::Config("root key file is corrupt".into()))?;
        Ok(Self { key: RootKeyMaterial::from_secret(key), key_id: format!("file:{id}") })
    }

    /// Where the key file lives by default inside a data directory.
    pub fn default_path(data_dir: &Path) -> PathBuf {
        data_dir.join("root.key")
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync_parent(path: &Path) -> Result<(), KeyError> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| file_error(dir, e))?;
    }
    Ok(())
}

/// Retires a key file: overwrites its bytes with zeros, syncs, removes it
/// and syncs the directory. Absent already counts as done. On
/// copy-on-write file systems and flash the old blocks may survive the
/// overwrite (docs/KEYS.md says what to do about backups and media).
pub fn erase_file(path: &Path) -> Result<(), KeyError> {
    let len = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => return Err(KeyError::Config(format!("{} is not a regular file", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_error(path, e)),
    };
    let mut file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| file_error(path, e))?;
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(FILE_LEN)];
    file.write_all(&zeros).map_err(|e| file_error(path, e))?;
    file.sync_all().map_err(|e| file_error(path, e))?;
    drop(file);
    std::fs::remove_file(path).map_err(|e| file_error(path, e))?;
    sync_parent(path)
}

fn file_error(path: &Path, e: std::io::Error) -> KeyError {
    KeyError::Config(format!("root key file {}: {e}", path.display()))
}

#[async_trait]
impl RootKey for FileRootKey {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    async fn wrap(&self, key: &SecretKey, aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        wrap::wrap_key(self.key.secret(), key, aad).map_err(|_| KeyError::Unavailable("wrap failed".into()))
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretKey, KeyError> {
        wrap::unwrap_key(self.key.secret(), wrapped, aad).map_err(|_| KeyError::DecryptionFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn created_with_0600_and_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let a = FileRootKey::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = FileRootKey::open_or_create(&path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        let k = SecretKey::generate().unwrap();
        let w = a.wrap(&k, b"aad").await.unwrap();
        assert_eq!(b.unwrap(&w, b"aad").await.unwrap().expose(), k.expose());
    }

    #[test]
    fn creators_racing_end_with_one_key_and_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let ids: Vec<String> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| FileRootKey::open_or_create(&path).unwrap().key_id().to_owned()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let on_disk = FileRootKey::open(&path).unwrap();
        assert!(ids.iter().all(|id| id == on_disk.key_id()), "every creator holds the key on disk: {ids:?}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("root.key")]);
    }

    #[test]
    fn refuses_group_or_world_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        FileRootKey::open_or_create(&path).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = FileRootKey::open_or_create(&path).err().expect("refused");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn refuses_a_file_that_is_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        std::fs::write(&path, b"hello").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = FileRootKey::open_or_create(&path).err().expect("refused");
        assert!(err.to_string().contains("not a recvault root key"), "{err}");
    }
}
