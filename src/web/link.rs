//! Short-lived signed playback links.
//!
//! A link is a bearer capability for one object, one principal and one
//! purpose until it expires: `<payload>.<mac>`, both base64url without
//! padding, where the payload is compact JSON and the MAC is HMAC-SHA256
//! under the service's link key (`link.key` in the data directory, 32
//! random bytes, mode 0600, created on first start). The MAC is checked in
//! constant time before the payload is parsed, so a tampered or forged
//! link is refused without looking at what it claims. A valid MAC only
//! says the server issued the link: every request made with it still
//! re-authorises the credential it names (a revoked token stops its links),
//! the purpose, the customer's consent and state.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::auth::Credential;
use crate::model::{ObjectId, Purpose};

/// File in the data directory holding the link key.
pub const LINK_KEY_FILE: &str = "link.key";
const KEY_MAGIC: &[u8; 8] = b"RVLINKK1";
/// Links longer than this are refused before any work.
pub const MAX_LINK_LEN: usize = 2048;

/// What a link grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Format version.
    pub v: u8,
    /// The object served (hyphenated UUID).
    pub object: String,
    /// The principal's name, for the audit trail.
    pub principal: String,
    /// `token:<id>` or `certificate:<subject>`: re-checked on every use.
    pub credential: String,
    pub purpose: String,
    pub expires_at_ms: i64,
}

impl Grant {
    pub fn credential_of(c: &Credential) -> String {
        match c {
            Credential::Token { token_id } => format!("token:{token_id}"),
            Credential::Certificate { subject } => format!("certificate:{subject}"),
        }
    }

    pub fn purpose(&self) -> Option<Purpose> {
        Purpose::from_name(&self.purpose)
    }

    pub fn object_id(&self) -> Option<ObjectId> {
        ObjectId::parse(&self.object).ok()
    }
}

/// Why a link was refused. Deliberately coarse: a forged link learns
/// nothing about what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("this link is not valid: ask for a new one")]
    Invalid,
    #[error("this link expired at {0}: ask for a new one")]
    Expired(String),
}

/// The HMAC key of playback links.
pub struct LinkKey {
    key: hmac::Key,
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    pub fn default_path(data_dir: &Path) -> PathBuf {
        data_dir.join(LINK_KEY_FILE)
    }

    /// A key from its 32 bytes (tests).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, bytes) }
    }

    /// Opens the key file, creating it (0600) on first start. A key file
    /// readable by group or others is refused, like the root key.
    pub fn open_or_create(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = Zeroizing::new(
                    crate::crypto::secret::random_bytes::<32>().map_err(|e| format!("cannot make a link key: {e}"))?,
                );
                let mut file = Zeroizing::new(KEY_MAGIC.to_vec());
                file.extend_from_slice(bytes.as_slice());
                crate::auth::write_private(path, &file)
                    .map_err(|e| format!("cannot write the link key {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "created the playback link key");
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) => Err(format!("cannot read the link key {}: {e}", path.display())),
            Ok(meta) => {
                let mode = meta.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "link key {} has mode {:04o}, readable by group or others; run `chmod 600 {}`",
                        path.display(),
                        mode & 0o777,
                        path.display()
                    ));
                }
                let file = Zeroizing::new(
                    std::fs::read(path).map_err(|e| format!("cannot read the link key {}: {e}", path.display()))?,
                );
                let body = file
                    .strip_prefix(KEY_MAGIC.as_slice())
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| format!("{} is not a recvault link key", path.display()))?;
                let mut bytes = Zeroizing::new([0u8; 32]);
                bytes.copy_from_slice(body);
                Ok(Self::from_bytes(&bytes))
            }
        }
    }

    /// The link text for `grant`.
    pub fn sign(&self, grant: &Grant) -> String {
        let payload = serde_json::to_vec(grant).expect("a grant serialises");
        let tag = hmac::sign(&self.key, &payload);
        format!("{}.{}", B64.encode(&payload), B64.encode(tag.as_ref()))
    }

    /// The grant of a link this key signed, if it has not expired at `now_ms`.
    pub fn verify(&self, link: &str, now_ms: i64) -> Result<Grant, LinkError> {
        let grant = self.open(link)?;
        unexpired(&grant, now_ms)?;
        Ok(grant)
    }

    /// The grant of a link this key signed, expired or not: an expired
    /// link still names, reliably, who it was issued to (for the audit
    /// record of its refusal).
    pub fn open(&self, link: &str) -> Result<Grant, LinkError> {
        if link.len() > MAX_LINK_LEN {
            return Err(LinkError::Invalid);
        }
        let (payload, tag) = link.split_once('.').ok_or(LinkError::Invalid)?;
        let payload = B64.decode(payload).map_err(|_| LinkError::Invalid)?;
        let tag = B64.decode(tag).map_err(|_| LinkError::Invalid)?;
        // Constant-time comparison inside ring.
        hmac::verify(&self.key, &payload, &tag).map_err(|_| LinkError::Invalid)?;
        let grant: Grant = serde_json::from_slice(&payload).map_err(|_| LinkError::Invalid)?;
        if grant.v != 1 || grant.object_id().is_none() || grant.purpose().is_none() {
            return Err(LinkError::Invalid);
        }
        Ok(grant)
    }
}

/// Refuses a grant that has expired at `now_ms`.
pub fn unexpired(grant: &Grant, now_ms: i64) -> Result<(), LinkError> {
    if now_ms >= grant.expires_at_ms {
        return Err(LinkError::Expired(crate::model::format_ms(grant.expires_at_ms)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(expires_at_ms: i64) -> Grant {
        Grant {
            v: 1,
            object: ObjectId::new_random().to_string(),
            principal: "coach-1".into(),
            credential: "token:00112233445566778899aabbccddeeff".into(),
            purpose: "coaching".into(),
            expires_at_ms,
        }
    }

    #[test]
    fn a_signed_link_verifies_until_it_expires() {
        let key = LinkKey::from_bytes(&[7; 32]);
        let g = grant(1_000);
        let link = key.sign(&g);
        assert_eq!(key.verify(&link, 999), Ok(g));
        assert!(matches!(key.verify(&link, 1_000), Err(LinkError::Expired(_))));
    }

    #[test]
    fn tampered_forged_and_foreign_links_are_refused() {
        let key = LinkKey::from_bytes(&[7; 32]);
        let link = key.sign(&grant(i64::MAX));
        let (payload, tag) = link.split_once('.').unwrap();
        // Another object (or a longer expiry) in the payload, same MAC.
        let mut other = grant(i64::MAX);
        other.object = ObjectId::new_random().to_string();
        let forged = format!("{}.{tag}", B64.encode(serde_json::to_vec(&other).unwrap()));
        assert_eq!(key.verify(&forged, 0), Err(LinkError::Invalid));
        // Every single-character change of the link.
        for i in 0..link.len() {
            let mut bytes = link.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            if changed != link {
                assert!(key.verify(&changed, 0).is_err(), "accepted a change at {i}");
            }
        }
        // Signed by another server's key.
        assert_eq!(LinkKey::from_bytes(&[8; 32]).verify(&link, 0), Err(LinkError::Invalid));
        // Truncated, empty, oversized.
        assert_eq!(key.verify(payload, 0), Err(LinkError::Invalid));
        assert_eq!(key.verify("", 0), Err(LinkError::Invalid));
        assert_eq!(key.verify(&"A".repeat(MAX_LINK_LEN + 1), 0), Err(LinkError::Invalid));
    }

    #[test]
    fn the_key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = LinkKey::default_path(dir.path());
        let link = LinkKey::open_or_create(&path).unwrap().sign(&grant(i64::MAX));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(LinkKey::open_or_create(&path).unwrap().verify(&link, 0).is_ok(), "same key after a restart");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(LinkKey::open_or_create(&path).unwrap_err().contains("chmod 600"));
    }
}
