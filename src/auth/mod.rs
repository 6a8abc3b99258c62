//! Who may do what: callers are identified by a bearer token or a verified
//! client certificate, hold roles, and each role opens a fixed set of RPCs
//! (the permission table below, documented in docs/ACCESS.md).
//!
//! Tokens look like `rvt_<id>_<secret>`: the id (32 hex digits) finds the
//! record, the secret (64 hex digits, 256 random bits) is checked against
//! its stored SHA-256 in constant time. Only the hash is ever stored; the
//! token is printed once, when it is created.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest;
use subtle::ConstantTimeEq;

use crate::catalog::{Catalog, CatalogError};
use crate::clock::Clock;
use crate::crypto::secret::random_bytes;
use crate::error::Error;
use crate::model::{Purpose, Role, TokenRecord};

/// Every RPC of the service, for the permission table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rpc {
    Ingest,
    Put,
    Stat,
    Get,
    List,
    MarkSensitive,
    Search,
    Sample,
    CreatePlaybackLink,
    ShredCustomer,
    ApproveShred,
    CancelShred,
    GetShredStatus,
    GetShredCertificate,
    PlaceHold,
    ReleaseHold,
    ListHolds,
    ListRetentionPolicies,
    SetRetentionPolicy,
    DeleteRetentionPolicy,
    RunRetention,
    ListAuditRecords,
    SetConsent,
    GetConsent,
    CreateToken,
    RevokeToken,
    ListTokens,
    WhoAmI,
}

impl Rpc {
    pub const ALL: [Rpc; 28] = [
        Self::Ingest,
        Self::Put,
        Self::Stat,
        Self::Get,
        Self::List,
        Self::MarkSensitive,
        Self::Search,
        Self::Sample,
        Self::CreatePlaybackLink,
        Self::ShredCustomer,
        Self::ApproveShred,
        Self::CancelShred,
        Self::GetShredStatus,
        Self::GetShredCertificate,
        Self::PlaceHold,
        Self::ReleaseHold,
        Self::ListHolds,
        Self::ListRetentionPolicies,
        Self::SetRetentionPolicy,
        Self::DeleteRetentionPolicy,
        Self::RunRetention,
        Self::ListAuditRecords,
        Self::SetConsent,
        Self::GetConsent,
        Self::CreateToken,
        Self::RevokeToken,
        Self::ListTokens,
        Self::WhoAmI,
    ];

    /// The gRPC method name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "Ingest",
            Self::Put => "Put",
            Self::Stat => "Stat",
            Self::Get => "Get",
            Self::List => "List",
            Self::MarkSensitive => "MarkSensitive",
            Self::Search => "Search",
            Self::Sample => "Sample",
            Self::CreatePlaybackLink => "CreatePlaybackLink",
            Self::ShredCustomer => "ShredCustomer",
            Self::ApproveShred => "ApproveShred",
            Self::CancelShred => "CancelShred",
            Self::GetShredStatus => "GetShredStatus",
            Self::GetShredCertificate => "GetShredCertificate",
            Self::PlaceHold => "PlaceHold",
            Self::ReleaseHold => "ReleaseHold",
            Self::ListHolds => "ListHolds",
            Self::ListRetentionPolicies => "ListRetentionPolicies",
            Self::SetRetentionPolicy => "SetRetentionPolicy",
            Self::DeleteRetentionPolicy => "DeleteRetentionPolicy",
            Self::RunRetention => "RunRetention",
            Self::ListAuditRecords => "ListAuditRecords",
            Self::SetConsent => "SetConsent",
            Self::GetConsent => "GetConsent",
            Self::CreateToken => "CreateToken",
            Self::RevokeToken => "RevokeToken",
            Self::ListTokens => "ListTokens",
            Self::WhoAmI => "WhoAmI",
        }
    }
}

/// The permission table: whether `role` may call `rpc`. Content reads
/// (`Get`, and playback links, which are reads by HTTP) are further bound
/// to a purpose ([`check_purpose`]); the break-glass grant opens both to
/// any role that holds it.
pub fn allowed(role: Role, rpc: Rpc) -> bool {
    use Rpc::*;
    match role {
        // Upload only: not even metadata of what was stored.
        Role::Ingest => matches!(rpc, Ingest | Put | MarkSensitive | WhoAmI),
        Role::Coach => matches!(
            rpc,
            Stat | Get | List | MarkSensitive | Search | Sample | CreatePlaybackLink | GetConsent | WhoAmI
        ),
        // Metadata, policies, holds, shreds and consent; never content.
        Role::Retention => matches!(
            rpc,
            Stat | List
                | MarkSensitive
                | Search
                | ShredCustomer
                | ApproveShred
                | CancelShred
                | GetShredStatus
                | GetShredCertificate
                | PlaceHold
                | ReleaseHold
                | ListHolds
                | ListRetentionPolicies
                | SetRetentionPolicy
                | DeleteRetentionPolicy
                | RunRetention
                | SetConsent
                | GetConsent
                | WhoAmI
        ),
        Role::Admin => {
            matches!(rpc, CreateToken | RevokeToken | ListTokens | ListRetentionPolicies | GetShredStatus | WhoAmI)
        }
        Role::Auditor => matches!(rpc, ListAuditRecords | GetShredCertificate | GetShredStatus | WhoAmI),
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Token { token_id: String },
    Certificate { subject: String },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub roles: BTreeSet<Role>,
    /// Break-glass: unredacted content, and reads for legal and
    /// data-subject-request purposes.
    pub unredacted: bool,
    pub credential: Credential,
}

impl Principal {
    pub fn may(&self, rpc: Rpc) -> bool {
        (matches!(rpc, Rpc::Get | Rpc::CreatePlaybackLink) && self.unredacted)
            || self.roles.iter().any(|r| allowed(*r, rpc))
    }

    fn roles_text(&self) -> String {
        let mut names: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        if self.unredacted {
            names.push("unredacted");
        }
        if names.is_empty() { "no role".into() } else { names.join(", ") }
    }

    /// Refuses `rpc` unless a role (or the grant) opens it.
    pub fn authorize(&self, rpc: Rpc) -> Result<(), Error> {
        if self.may(rpc) {
            return Ok(());
        }
        let who: Vec<&str> = Role::ALL.into_iter().filter(|r| allowed(*r, rpc)).map(|r| r.name()).collect();
        let hint = match (rpc, who.is_empty()) {
            (Rpc::Get | Rpc::CreatePlaybackLink, _) => "a coach role or the unredacted (break-glass) grant".to_owned(),
            (_, true) => "no role".to_owned(),
            (_, false) => format!("role {}", who.join(" or ")),
        };
        Err(Error::PermissionDenied(format!(
            "{} ({}) may not call {}: it needs {hint}",
            self.name,
            self.roles_text(),
            rpc.name()
        )))
    }
}

/// Checks a content read's declared purpose against the caller: coaching
/// and quality review are for coaches; legal and data-subject-request reads
/// need the break-glass grant; a read must declare one.
pub fn check_purpose(p: &Principal, purpose: Purpose) -> Result<(), Error> {
    match purpose {
        Purpose::Unspecified => Err(Error::Invalid(
            "purpose is required for content reads: COACHING, QUALITY_REVIEW, LEGAL or DATA_SUBJECT_REQUEST".into(),
        )),
        Purpose::Coaching | Purpose::QualityReview if p.roles.contains(&Role::Coach) || p.unredacted => Ok(()),
        Purpose::Legal | Purpose::DataSubjectRequest if p.unredacted => Ok(()),
        _ => Err(Error::PermissionDenied(format!(
            "{} ({}) may not read content for purpose {}: coaching and quality-review reads need the coach role, \
             legal and data-subject-request reads the unredacted (break-glass) grant",
            p.name,
            p.roles_text(),
            purpose.name()
        ))),
    }
}

/// A client certificate subject mapped to a principal (`[[auth.certificate]]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePrincipal {
    /// Matched against the certificate's subject common name and its DNS
    /// and URI subject alternative names.
    pub subject: String,
    /// The principal's name in the audit trail (default: `subject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub roles: Vec<Role>,
    #[serde(default)]
    pub unredacted: bool,
}

/// Checks a principal or token name: 1–64 of `[A-Za-z0-9._:@-]`.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("name must be 1-64 characters of [A-Za-z0-9._:@-], got {name:?}")))
    }
}

const TOKEN_PREFIX: &str = "rvt_";

fn sha256(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data).as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Splits a token into its id and secret; `None` if it is not one.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex32 = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex32(id, 32) && hex32(secret, 64)).then_some((id, secret))
}

/// What a new token is: the secret string (shown once) and its record.
pub struct NewToken {
    pub token: zeroize::Zeroizing<String>,
    pub record: TokenRecord,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken").field("token", &"[redacted]").field("record", &self.record).finish()
    }
}

/// Identifies callers and manages tokens.
pub struct Authenticator {
    catalog: Arc<dyn Catalog>,
    certificates: Vec<CertificatePrincipal>,
    clock: Arc<dyn Clock>,
}

/// File in the data directory holding the bootstrap admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

impl Authenticator {
    pub fn new(catalog: Arc<dyn Catalog>, certificates: Vec<CertificatePrincipal>, clock: Arc<dyn Clock>) -> Self {
        Self { catalog, certificates, clock }
    }

    /// Identifies a caller from its bearer token and/or the verified
    /// certificate it presented over mutual TLS. With both, they must name
    /// the same principal.
    pub async fn authenticate(&self, bearer: Option<&str>, peer_cert: Option<&[u8]>) -> Result<Principal, Error> {
        let from_cert = match peer_cert {
            Some(der) => Some(self.certificate_principal(der)?),
            None => None,
        };
        let from_token = match bearer {
            Some(t) => Some(self.token_principal(t).await?),
            None => None,
        };
        match (from_cert, from_token) {
            (Some(c), Some(t)) if c.name != t.name => Err(Error::Unauthenticated(format!(
                "the client certificate names {} but the token names {}: use one identity",
                c.name, t.name
            ))),
            (_, Some(t)) => Ok(t),
            (Some(c), None) => Ok(c),
            (None, None) => Err(Error::Unauthenticated(
                "no credentials: send `authorization: Bearer <token>` (recvault token create) or a client \
                 certificate"
                    .into(),
            )),
        }
    }

    async fn token_principal(&self, token: &str) -> Result<Principal, Error> {
        let invalid = || Error::Unauthenticated("invalid token: unknown, malformed or wrong secret".into());
        let (id, secret) = parse_token(token.trim()).ok_or_else(invalid)?;
        let record = self.catalog.token(id).await?.ok_or_else(invalid)?;
        if !bool::from(sha256(secret.as_bytes()).ct_eq(&record.secret_sha256)) {
            return Err(invalid());
        }
        self.live_token(record)
    }

    /// The principal of a token record that is neither revoked nor expired.
    fn live_token(&self, record: TokenRecord) -> Result<Principal, Error> {
        if record.revoked_at_ms.is_some() {
            return Err(Error::Unauthenticated(format!("token {} ({}) was revoked", record.token_id, record.name)));
        }
        if record.expires_at_ms.is_some_and(|t| self.clock.now_ms() >= t) {
            return Err(Error::Unauthenticated(format!(
                "token {} ({}) expired at {}: ask an admin for a new one",
                record.token_id,
                record.name,
                crate::model::format_ms(record.expires_at_ms.unwrap_or_default())
            )));
        }
        Ok(Principal {
            name: record.name,
            roles: record.roles.into_iter().collect(),
            unredacted: record.unredacted,
            credential: Credential::Token { token_id: record.token_id },
        })
    }

    /// The principal behind a credential named earlier (`token:<id>` or
    /// `certificate:<subject>`, as a signed playback link carries it),
    /// if it is still valid now: a revoked or expired token, or a
    /// certificate mapping removed from the config, is refused.
    pub async fn recheck(&self, credential: &str) -> Result<Principal, Error> {
        let gone = || Error::Unauthenticated("the credential this link was issued to is no longer valid".into());
        if let Some(id) = credential.strip_prefix("token:") {
            let record = self.catalog.token(id).await?.ok_or_else(gone)?;
            return self.live_token(record);
        }
        let subject = credential.strip_prefix("certificate:").ok_or_else(gone)?;
        let mapping = self.certificates.iter().find(|m| m.subject == subject).ok_or_else(gone)?;
        Ok(Principal {
            name: mapping.name.clone().unwrap_or_else(|| mapping.subject.clone()),
            roles: mapping.roles.iter().copied().collect(),
            unredacted: mapping.unredacted,
            credential: Credential::Certificate { subject: mapping.subject.clone() },
        })
    }

    fn certificate_principal(&self, der: &[u8]) -> Result<Principal, Error> {
        let names = certificate_names(der)
            .ok_or_else(|| Error::Unauthenticated("the client certificate cannot be parsed".into()))?;
        let mapping = self.certificates.iter().find(|m| names.iter().any(|n| n == &m.subject)).ok_or_else(|| {
            Error::Unauthenticated(format!(
                "the client certificate ({}) is not mapped to a principal: add an [[auth.certificate]] entry",
                names.first().map(String::as_str).unwrap_or("no subject")
            ))
        })?;
        Ok(Principal {
            name: mapping.name.clone().unwrap_or_else(|| mapping.subject.clone()),
            roles: mapping.roles.iter().copied().collect(),
            unredacted: mapping.unredacted,
            credential: Credential::Certificate { subject: mapping.subject.clone() },
        })
    }

    /// Creates a token; the returned secret is shown once and never stored.
    pub async fn create_token(
        &self,
        created_by: &str,
        name: &str,
        roles: &[Role],
        unredacted: bool,
        ttl: Option<std::time::Duration>,
    ) -> Result<NewToken, Error> {
        let new = self.new_token(created_by, name, roles, unredacted, ttl)?;
        self.catalog.create_token(&new.record).await?;
        Ok(new)
    }

    /// A fresh token, not yet stored.
    fn new_token(
        &self,
        created_by: &str,
        name: &str,
        roles: &[Role],
        unredacted: bool,
        ttl: Option<std::time::Duration>,
    ) -> Result<NewToken, Error> {
        check_name(name)?;
        if roles.is_empty() && !unredacted {
            return Err(Error::Invalid("a token needs at least one role (or the unredacted grant)".into()));
        }
        let rng = |_| Error::Unavailable("random generator failed".into());
        let id: [u8; 16] = random_bytes().map_err(rng)?;
        let secret: zeroize::Zeroizing<[u8; 32]> = zeroize::Zeroizing::new(random_bytes().map_err(rng)?);
        let secret_hex = zeroize::Zeroizing::new(hex::encode(secret.as_slice()));
        let now = self.clock.now_ms();
        let mut roles: Vec<Role> = roles.to_vec();
        roles.sort();
        roles.dedup();
        let record = TokenRecord {
            token_id: hex::encode(id),
            name: name.to_owned(),
            roles,
            unredacted,
            secret_sha256: sha256(secret_hex.as_bytes()),
            created_by: created_by.to_owned(),
            created_at_ms: now,
            expires_at_ms: ttl.map(|t| now.saturating_add(t.as_millis() as i64)),
            revoked_at_ms: None,
        };
        let token = zeroize::Zeroizing::new(format!("{TOKEN_PREFIX}{}_{}", record.token_id, secret_hex.as_str()));
        Ok(NewToken { token, record })
    }

    pub async fn revoke_token(&self, token_id: &str) -> Result<TokenRecord, Error> {
        self.catalog.revoke_token(token_id, self.clock.now_ms()).await.map_err(|e| match e {
            CatalogError::NotFound => Error::NotFound(format!("token {token_id} not found")),
            other => other.into(),
        })
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        Ok(self.catalog.tokens().await?)
    }

    /// First start: creates the `local-admin` token and writes it to
    /// `admin.token` (mode 0600) in the data directory, where the CLI finds
    /// it. Does nothing once any token exists or the file is there.
    pub async fn bootstrap_admin(&self, data_dir: &Path) -> Result<Option<PathBuf>, Error> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        if !self.catalog.tokens().await?.is_empty() {
            return Ok(None);
        }
        // The file first, then the catalog row: a crash in between leaves a
        // token file nothing accepts, replaced at the next start (no token
        // exists yet), never a token row nobody holds (a lock-out).
        let new = self.new_token("system:bootstrap", "local-admin", &[Role::Admin], false, None)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Internal(format!("cannot replace the stale admin token {}: {e}", path.display())));
            }
            _ => {}
        }
        write_private(&path, new.token.as_bytes()).map_err(|e| {
            Error::Internal(format!("cannot write the bootstrap admin token to {}: {e}", path.display()))
        })?;
        self.catalog.create_token(&new.record).await?;
        tracing::info!(path = %path.display(), token_id = %new.record.token_id, "created the local admin token");
        Ok(Some(path))
    }
}

/// Creates a secret file readable by its owner only (0600), whole or not at
/// all: written and fsynced under `<name>.tmp`, then hard-linked into place
/// (which fails if the file exists) and its directory fsynced, so a crash
/// never leaves an empty or short key file that would stop the next start.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // Left only by a crash before its link: never used.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, path);
    std::fs::remove_file(&tmp)?;
    linked?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// The subject common names and DNS/URI subject alternative names of a
/// DER certificate (already verified by the TLS layer).
pub fn certificate_names(der: &[u8]) -> Option<Vec<String>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_owned)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) => names.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::sqlite::SqliteCatalog;
    use crate::clock::ManualClock;

    fn principal(roles: &[Role], unredacted: bool) -> Principal {
        Principal {
            name: "p".into(),
            roles: roles.iter().copied().collect(),
            unredacted,
            credential: Credential::Token { token_id: "x".into() },
        }
    }

    #[test]
    fn h1_roles_separate_duties() {
        // ingest cannot read; coach cannot shred; retention and admin cannot
        // read content; auditor sees the trail only.
        assert!(!allowed(Role::Ingest, Rpc::Get) && !allowed(Role::Ingest, Rpc::List));
        assert!(!allowed(Role::Coach, Rpc::ShredCustomer));
        for r in [Role::Retention, Role::Admin, Role::Auditor, Role::Ingest] {
            assert!(!allowed(r, Rpc::Get), "{r}");
        }
        assert!(principal(&[Role::Admin], true).may(Rpc::Get), "break-glass opens Get");
        for rpc in Rpc::ALL {
            assert_eq!(
                allowed(Role::Auditor, rpc),
                matches!(rpc, Rpc::ListAuditRecords | Rpc::GetShredCertificate | Rpc::GetShredStatus | Rpc::WhoAmI)
            );
        }
    }

    #[test]
    fn purposes_are_bound_to_roles() {
        let coach = principal(&[Role::Coach], false);
        assert!(check_purpose(&coach, Purpose::Coaching).is_ok());
        assert!(check_purpose(&coach, Purpose::QualityReview).is_ok());
        assert!(matches!(check_purpose(&coach, Purpose::Legal), Err(Error::PermissionDenied(_))));
        assert!(matches!(check_purpose(&coach, Purpose::Unspecified), Err(Error::Invalid(_))));
        let officer = principal(&[Role::Retention], true);
        assert!(check_purpose(&officer, Purpose::DataSubjectRequest).is_ok());
    }

    #[tokio::test]
    async fn h5_tokens_authenticate_until_revoked_or_expired() {
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let clock = ManualClock::new();
        let auth = Authenticator::new(catalog, Vec::new(), clock.clone());
        let t = auth
            .create_token("admin", "telephony-1", &[Role::Ingest], false, Some(std::time::Duration::from_secs(60)))
            .await
            .unwrap();
        let p = auth.authenticate(Some(&t.token), None).await.unwrap();
        assert_eq!((p.name.as_str(), p.roles.len()), ("telephony-1", 1));
        assert!(!format!("{t:?}").contains(t.token.as_str()), "Debug never shows the secret");
        // A wrong secret with the right id is refused like an unknown token.
        let mut forged = t.token.to_string();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        for bad in [forged.as_str(), "rvt_nope", "", "Bearer x"] {
            assert!(matches!(auth.authenticate(Some(bad), None).await, Err(Error::Unauthenticated(_))), "{bad}");
        }
        assert!(matches!(auth.authenticate(None, None).await, Err(Error::Unauthenticated(_))));
        clock.advance(std::time::Duration::from_secs(61));
        let err = auth.authenticate(Some(&t.token), None).await.unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        let u = auth.create_token("admin", "coach-1", &[Role::Coach], false, None).await.unwrap();
        auth.revoke_token(&u.record.token_id).await.unwrap();
        let err = auth.authenticate(Some(&u.token), None).await.unwrap_err();
        assert!(err.to_string().contains("revoked"), "{err}");
    }

    #[tokio::test]
    async fn bootstrap_writes_one_private_admin_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let auth = Authenticator::new(catalog, Vec::new(), ManualClock::new());
        let path = auth.bootstrap_admin(dir.path()).await.unwrap().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(&path).unwrap();
        let p = auth.authenticate(Some(&token), None).await.unwrap();
        assert_eq!(p.roles, [Role::Admin].into());
        assert_eq!(auth.bootstrap_admin(dir.path()).await.unwrap(), None);
    }
}
