//! Shred certificates: a signed statement of what a shred destroyed, that
//! anyone holding the service's public key can check offline.
//!
//! The signing key is Ed25519, kept like the root key: a file in the data
//! directory (`signing.key`, mode 0600, refused if group- or
//! world-readable), created on first start. Its public half is written
//! beside it as `signing.pub` for auditors.
//!
//! Signed bytes (v1, do not change): `DOMAIN` followed by the certificate
//! serialised as compact JSON with fields in declaration order. The
//! verifier parses with unknown fields refused and re-serialises, so any
//! edit of a value, any added field and any other key breaks the signature.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

const DOMAIN: &[u8] = b"recvault shred certificate v1\n";
const FORMAT: &str = "recvault-shred-certificate/v1";
const KEY_MAGIC: &[u8; 8] = b"RVSIGNK1";
const PUB_PREFIX: &str = "recvault-ed25519 ";

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The signing key file is missing, unreadable or unsafe; the message
    /// says what to fix.
    #[error("{0}")]
    Key(String),
    #[error("not a recvault shred certificate: {0}")]
    Malformed(String),
    #[error("the certificate was signed by key {found}, not by the given public key {expected}")]
    WrongKey { found: String, expected: String },
    #[error("signature check failed: the certificate was altered or not signed by this key")]
    BadSignature,
}

/// What a shred destroyed, as certified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShredCertificate {
    pub format: String,
    pub customer_id: String,
    /// Internal key-ring id (appears in object headers).
    pub customer_ref: String,
    pub reason: String,
    pub key_versions_destroyed: Vec<u32>,
    /// Root key(s) the destroyed customer key versions were wrapped under.
    pub root_key_ids: Vec<String>,
    pub objects_unrecoverable: u64,
    /// SHA-256 (hex) over the object ids, sorted, each followed by `\n`.
    pub objects_digest_sha256: String,
    pub uploads_discarded: u64,
    pub requested_by: String,
    pub requested_at: String,
    pub approved_by: Option<String>,
    pub approved_at: Option<String>,
    pub destroyed_at: String,
    /// The canary check: did the canary unwrap before the destroy step (it
    /// must, when observed), and does it unwrap after (it must not)?
    pub canary: CanaryCheck,
    /// Head of the audit trail when the certificate was issued, if the
    /// service keeps one.
    pub audit_log_head: Option<String>,
    pub issued_at: String,
    pub signing_key_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryCheck {
    /// `None` when the pipeline resumed after a crash past the destroy step.
    pub unwrapped_before_destroy: Option<bool>,
    pub unwrapped_after_destroy: bool,
    /// Customer key versions still stored after the destroy step.
    pub key_versions_remaining: u32,
    /// "passed" or "failed".
    pub result: String,
}

impl CanaryCheck {
    pub fn passed(&self) -> bool {
        self.result == "passed"
    }
}

impl ShredCertificate {
    pub fn format_v1() -> String {
        FORMAT.to_owned()
    }
}

/// The certificate and its signature, as written to a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCertificate {
    pub certificate: ShredCertificate,
    /// Ed25519 signature (hex) over `DOMAIN || compact JSON of certificate`.
    pub signature_ed25519: String,
}

fn signed_bytes(c: &ShredCertificate) -> Vec<u8> {
    let mut bytes = DOMAIN.to_vec();
    bytes.extend_from_slice(&serde_json::to_vec(c).expect("certificate serialises"));
    bytes
}

/// A key id: the first 16 bytes (hex) of SHA-256 of the public key.
pub fn key_id(public_key: &[u8]) -> String {
    format!("ed25519:{}", hex::encode(&ring::digest::digest(&ring::digest::SHA256, public_key).as_ref()[..16]))
}

/// The service's certificate signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn default_path(data_dir: &Path) -> PathBuf {
        data_dir.join("signing.key")
    }

    pub fn public_key_path(data_dir: &Path) -> PathBuf {
        data_dir.join("signing.pub")
    }

    /// Opens the key file, creating it (mode 0600) and its `.pub` companion
    /// if absent.
    pub fn open_or_create(path: &Path) -> Result<Self, CertificateError> {
        let key = match std::fs::symlink_metadata(path) {
            Ok(_) => Self::open(path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path)?,
            Err(e) => return Err(file_error(path, e)),
        };
        let pub_path = path.with_extension("pub");
        let text = key.public_key_text();
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&pub_path, text).map_err(|e| file_error(&pub_path, e))?;
        }
        Ok(key)
    }

    fn create(path: &Path) -> Result<Self, CertificateError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = zeroize::Zeroizing::new(
            Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| CertificateError::Key("random generator failed".into()))?
                .as_ref()
                .to_vec(),
        );
        let mut contents = zeroize::Zeroizing::new(KEY_MAGIC.to_vec());
        contents.extend_from_slice(&pkcs8);
        // Whole or not at all (a temp file linked into place).
        crate::auth::write_private(path, &contents).map_err(|e| file_error(path, e))?;
        tracing::info!(path = %path.display(), "created a new certificate signing key");
        Self::from_pkcs8(&pkcs8)
    }

    fn open(path: &Path) -> Result<Self, CertificateError> {
        let meta = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_file() || mode & 0o077 != 0 {
            return Err(CertificateError::Key(format!(
                "signing key file {} must be a regular file with mode 0600 (it has {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let contents = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| file_error(path, e))?);
        match contents.strip_prefix(KEY_MAGIC.as_slice()) {
            Some(pkcs8) => Self::from_pkcs8(pkcs8),
            None => Err(CertificateError::Key(format!(
                "{} is not a recvault signing key file (expected it to start with RVSIGNK1)",
                path.display()
            ))),
        }
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CertificateError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| CertificateError::Key("signing key file is corrupt".into()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key as written to `signing.pub`.
    pub fn public_key_text(&self) -> String {
        format!("{PUB_PREFIX}{}\n", hex::encode(self.pair.public_key().as_ref()))
    }

    /// Signs `message`, which must begin with its own domain string (the
    /// audit trail's checkpoints use this; certificates use [`Self::sign`]).
    pub fn sign_message(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Signs a certificate (its `signing_key_id` is set to this key's).
    pub fn sign(&self, mut certificate: ShredCertificate) -> SignedCertificate {
        certificate.signing_key_id = self.key_id.clone();
        let sig = self.pair.sign(&signed_bytes(&certificate));
        SignedCertificate { certificate, signature_ed25519: hex::encode(sig.as_ref()) }
    }
}

fn file_error(path: &Path, e: std::io::Error) -> CertificateError {
    CertificateError::Key(format!("signing key file {}: {e}", path.display()))
}

/// Parses the text of `signing.pub` (or a bare 64-character hex key).
pub fn parse_public_key(text: &str) -> Result<Vec<u8>, CertificateError> {
    let hex_key = text.trim().strip_prefix(PUB_PREFIX.trim_end()).unwrap_or(text.trim()).trim();
    match hex::decode(hex_key) {
        Ok(k) if k.len() == 32 => Ok(k),
        _ => Err(CertificateError::Malformed(
            "the public key must be the contents of signing.pub (recvault-ed25519 <64 hex digits>)".into(),
        )),
    }
}

/// Checks an Ed25519 signature made by [`SigningKey::sign_message`].
pub fn signature_valid(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key).verify(message, signature).is_ok()
}

/// Checks a certificate file's text against a public key, offline.
pub fn verify(text: &str, public_key: &[u8]) -> Result<ShredCertificate, CertificateError> {
    let signed: SignedCertificate =
        serde_json::from_str(text).map_err(|e| CertificateError::Malformed(e.to_string()))?;
    let c = &signed.certificate;
    if c.format != FORMAT {
        return Err(CertificateError::Malformed(format!("unknown format {:?}", c.format)));
    }
    let expected = key_id(public_key);
    if c.signing_key_id != expected {
        return Err(CertificateError::WrongKey { found: c.signing_key_id.clone(), expected });
    }
    let sig = hex::decode(&signed.signature_ed25519).map_err(|_| CertificateError::BadSignature)?;
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&signed_bytes(c), &sig)
        .map_err(|_| CertificateError::BadSignature)?;
    Ok(signed.certificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShredCertificate {
        ShredCertificate {
            format: ShredCertificate::format_v1(),
            customer_id: "crm:42".into(),
            customer_ref: "0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b".into(),
            reason: "erasure request #7".into(),
            key_versions_destroyed: vec![1, 2],
            root_key_ids: vec!["file:00".into()],
            objects_unrecoverable: 3,
            objects_digest_sha256: "ab".repeat(32),
            uploads_discarded: 0,
            requested_by: "ops-a".into(),
            requested_at: "2026-11-25T10:00:00.000Z".into(),
            approved_by: Some("ops-b".into()),
            approved_at: Some("2026-11-25T11:00:00.000Z".into()),
            destroyed_at: "2026-12-02T10:00:00.000Z".into(),
            canary: CanaryCheck {
                unwrapped_before_destroy: Some(true),
                unwrapped_after_destroy: false,
                key_versions_remaining: 0,
                result: "passed".into(),
            },
            audit_log_head: None,
            issued_at: "2026-12-02T10:00:01.000Z".into(),
            signing_key_id: String::new(),
        }
    }

    #[test]
    fn signs_verifies_and_refuses_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::open_or_create(&SigningKey::default_path(dir.path())).unwrap();
        let mode = std::fs::metadata(SigningKey::default_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SigningKey::open_or_create(&SigningKey::default_path(dir.path())).unwrap();
        assert_eq!(key.key_id(), again.key_id());
        let public =
            parse_public_key(&std::fs::read_to_string(SigningKey::public_key_path(dir.path())).unwrap()).unwrap();
        let text = serde_json::to_string_pretty(&key.sign(sample())).unwrap();
        assert_eq!(verify(&text, &public).unwrap().customer_id, "crm:42");

        // Any edited value, an added field, a different key: refused.
        let edited = text.replace("\"objects_unrecoverable\": 3", "\"objects_unrecoverable\": 2");
        assert_ne!(edited, text);
        assert!(matches!(verify(&edited, &public), Err(CertificateError::BadSignature)));
        let added = text.replacen("\"format\"", "\"extra\": 1, \"format\"", 1);
        assert!(matches!(verify(&added, &public), Err(CertificateError::Malformed(_))));
        let other_dir = tempfile::tempdir().unwrap();
        let other = SigningKey::open_or_create(&SigningKey::default_path(other_dir.path())).unwrap();
        let forged = serde_json::to_string(&other.sign(sample())).unwrap();
        assert!(matches!(verify(&forged, &public), Err(CertificateError::WrongKey { .. })));
        let mut relabelled: SignedCertificate = serde_json::from_str(&forged).unwrap();
        relabelled.certificate.signing_key_id = key.key_id().to_owned();
        let relabelled = serde_json::to_string(&relabelled).unwrap();
        assert!(matches!(verify(&relabelled, &public), Err(CertificateError::BadSignature)));
        assert!(matches!(verify("{}", &public), Err(CertificateError::Malformed(_))));
    }

    #[test]
    fn refuses_a_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = SigningKey::default_path(dir.path());
        SigningKey::open_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(SigningKey::open_or_create(&path).unwrap_err().to_string().contains("chmod 600"));
    }
}
