//! Service configuration: an optional TOML file, then command-line flags and
//! `RECVAULT_*` environment variables on top. Unknown keys are refused, so a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ingest::SizeCaps;
use crate::model::{ContentKind, RetentionPolicy};

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./recvault-data";
/// Default gRPC address (loopback only: nothing is exposed by default).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
/// Default of `blocking_threads`.
pub const DEFAULT_BLOCKING_THREADS: usize = 64;
/// Default address of the HTTP port (coaching page, playback links).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7421";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Holds `catalog.sqlite`, `root.key`, `spool/` and (with the local
    /// storage backend) `objects/`.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// TLS on the gRPC port; without it the server listens in plain TCP,
    /// which is refused beyond loopback unless `allow_plaintext` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSection>,
    /// Serve plain TCP on a non-loopback address (behind a TLS-terminating
    /// proxy, say). Loopback is always allowed.
    pub allow_plaintext: bool,
    /// Most threads the server runs blocking work on (journal writes and
    /// fsyncs, SQLite, the local store, PKCS#11). Past what the disk does
    /// in parallel more only queue in the kernel, each with a stack and an
    /// allocator heap: with tokio's 512, 1 500 live calls on per-stream
    /// fsyncs took 2.8 GiB and a p99 ack of 950 ms, with 64 they took 360
    /// MiB and 260 ms (BENCHMARKS.md, "The blocking pool capped"). 8 to 4096.
    pub blocking_threads: usize,
    pub auth: AuthSection,
    pub catalog: CatalogSection,
    pub storage: StorageSection,
    pub root_key: RootKeySection,
    pub ingest: IngestSection,
    pub retention: RetentionSection,
    pub consent: ConsentSection,
    pub http: HttpSection,
    pub health: HealthSection,
    pub log: LogSection,
}

/// Readiness probing (`GET /ready` and the gRPC health service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    /// How often the gRPC health status is re-probed when nobody asks
    /// `/ready`.
    #[serde(with = "humantime_serde_compat")]
    pub probe_interval: Duration,
    /// Longest wait for the catalog, the root key provider or the store in
    /// one probe; slower counts as not ready.
    #[serde(with = "humantime_serde_compat")]
    pub probe_timeout: Duration,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self { probe_interval: Duration::from_secs(10), probe_timeout: Duration::from_secs(2) }
    }
}

/// Logging on stderr; the level filter is env `RECVAULT_LOG` (e.g.
/// `info,recvault=debug`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` for people, `json` (one object per line) for log shippers.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key; refused if group or others can read it.
    pub key_file: PathBuf,
    /// PEM CA certificate(s) that sign client certificates: enables mutual
    /// TLS. Clients without a certificate still connect (and use a token)
    /// unless `require_client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub require_client_cert: bool,
}

/// Where metadata and wrapped keys live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogSection {
    /// `sqlite` (catalog.sqlite in the data directory) or `postgres`
    /// (shared by replicas; docs/POSTGRES.md).
    pub backend: CatalogBackend,
    /// PostgreSQL connection string ("host=db user=recvault dbname=recvault").
    /// Prefer `url_file` when it carries a password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the connection string; refused if group or others can
    /// read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// PostgreSQL schema holding recvault's tables (created if missing).
    pub schema: String,
}

impl Default for CatalogSection {
    fn default() -> Self {
        Self { backend: CatalogBackend::Sqlite, url: None, url_file: None, schema: "recvault".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogBackend {
    Sqlite,
    Postgres,
}

impl CatalogSection {
    /// The PostgreSQL connection string, read from `url_file` if given.
    pub fn connection_string(&self) -> anyhow::Result<zeroize::Zeroizing<String>> {
        match (&self.url, &self.url_file) {
            (Some(u), None) => Ok(zeroize::Zeroizing::new(u.clone())),
            (None, Some(path)) => read_secret_file("catalog.url_file", path),
            _ => anyhow::bail!("catalog.backend = \"postgres\" needs exactly one of catalog.url and catalog.url_file"),
        }
    }
}

/// Reads a secret (a password, a key) from the file named by config key
/// `key`, trimmed of surrounding whitespace. Refused if group or others may
/// read the file, or if it is empty.
pub fn read_secret_file(key: &str, path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    check_private_file(key, path)?;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{key} {}: {e}", path.display()))?,
    );
    let secret = zeroize::Zeroizing::new(text.trim().to_owned());
    anyhow::ensure!(!secret.is_empty(), "{key} {} is empty", path.display());
    Ok(secret)
}

/// Where ciphertext lives (docs/S3.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// `local` (objects/ in the data directory) or `s3` (an S3-compatible
    /// bucket).
    pub backend: StorageBackend,
    /// s3: base URL of the server; absent means Amazon S3 in `region`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// s3: the bucket (it must exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// s3: the region requests are signed for.
    pub region: String,
    /// s3: `endpoint/bucket/key` URLs rather than `bucket.endpoint/key`.
    pub path_style: bool,
    /// s3: permit an `http://` endpoint.
    pub allow_http: bool,
    /// s3: file holding the access key id; refused if group or others can
    /// read it. Without the two files: env `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    /// s3: file holding the secret access key; same rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// s3: how commits stay write-once: `conditional` (the server refuses
    /// to create an existing key) or `check-first` (look, then write).
    pub write_once: WriteOnceMode,
    /// s3: retries of a failed request (5xx, timeout, dropped connection).
    pub max_retries: usize,
    /// s3: no retry starts later than this after the first attempt.
    #[serde(with = "humantime_serde_compat")]
    pub retry_timeout: Duration,
    /// s3: longest time of one HTTP request.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// s3: put the SHA-256 of each request body in its signature. Unset:
    /// only over plain `http://`, as the AWS SDKs do (over TLS the body is
    /// already integrity-checked in transit, and an object is AES-GCM
    /// sealed end to end, so the hash only costs a pass over every byte on
    /// both sides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign_payload: Option<bool>,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            endpoint: None,
            bucket: None,
            region: "us-east-1".into(),
            path_style: true,
            allow_http: false,
            access_key_id_file: None,
            secret_access_key_file: None,
            write_once: WriteOnceMode::Conditional,
            max_retries: 5,
            retry_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(60),
            sign_payload: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Local,
    S3,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteOnceMode {
    #[default]
    Conditional,
    CheckFirst,
}

/// The environment variables holding S3 credentials when no files are named.
pub const S3_ENV_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const S3_ENV_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";

impl StorageSection {
    /// The S3 settings, credentials read, when `backend = "s3"`.
    pub fn s3(&self) -> anyhow::Result<Option<crate::store::S3Settings>> {
        if self.backend != StorageBackend::S3 {
            return Ok(None);
        }
        self.validate()?;
        let credentials = match (&self.access_key_id_file, &self.secret_access_key_file) {
            (Some(id), Some(secret)) => crate::store::S3Credentials::new(
                read_secret_file("storage.access_key_id_file", id)?,
                read_secret_file("storage.secret_access_key_file", secret)?,
            ),
            _ => {
                let var = |name: &str| -> anyhow::Result<zeroize::Zeroizing<String>> {
                    match std::env::var(name) {
                        Ok(v) if !v.trim().is_empty() => Ok(zeroize::Zeroizing::new(v.trim().to_owned())),
                        _ => anyhow::bail!(
                            "storage.backend = \"s3\" needs credentials: set storage.access_key_id_file and \
                             storage.secret_access_key_file (mode 0600), or env {S3_ENV_ACCESS_KEY_ID} and \
                             {S3_ENV_SECRET_ACCESS_KEY} ({name} is not set)"
                        ),
                    }
                };
                crate::store::S3Credentials::new(var(S3_ENV_ACCESS_KEY_ID)?, var(S3_ENV_SECRET_ACCESS_KEY)?)
            }
        };
        Ok(Some(crate::store::S3Settings {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone().unwrap_or_default(),
            region: self.region.clone(),
            path_style: self.path_style,
            allow_http: self.allow_http,
            credentials,
            write_once: match self.write_once {
                WriteOnceMode::Conditional => crate::store::WriteOnce::Conditional,
                WriteOnceMode::CheckFirst => crate::store::WriteOnce::CheckFirst,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
            request_timeout: self.request_timeout,
            // `validate` let through only http:// and https:// endpoints;
            // none is Amazon S3, over https.
            sign_payload: self
                .sign_payload
                .unwrap_or_else(|| self.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"))),
        }))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.backend == StorageBackend::Local {
            let set = [
                ("endpoint", self.endpoint.is_some()),
                ("bucket", self.bucket.is_some()),
                ("access_key_id_file", self.access_key_id_file.is_some()),
                ("secret_access_key_file", self.secret_access_key_file.is_some()),
            ];
            if let Some((key, _)) = set.iter().find(|(_, is_set)| *is_set) {
                anyhow::bail!("storage.{key} is used only with storage.backend = \"s3\"");
            }
            return Ok(());
        }
        match self.bucket.as_deref() {
            None => anyhow::bail!("storage.backend = \"s3\" needs storage.bucket (the bucket must already exist)"),
            Some(b) => anyhow::ensure!(
                (3..=63).contains(&b.len())
                    && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'),
                "storage.bucket = {b:?} is not a bucket name (3 to 63 of a-z, 0-9, '-' and '.')"
            ),
        }
        anyhow::ensure!(!self.region.trim().is_empty(), "storage.region must not be empty");
        if let Some(e) = &self.endpoint {
            let scheme = e.split_once("://").map(|(s, _)| s);
            anyhow::ensure!(
                matches!(scheme, Some("http" | "https")),
                "storage.endpoint = {e:?} must be an http:// or https:// URL"
            );
            let authority = e.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
            anyhow::ensure!(
                !authority.contains('@'),
                "storage.endpoint must not carry credentials: give them in storage.access_key_id_file and \
                 storage.secret_access_key_file"
            );
            anyhow::ensure!(
                scheme != Some("http") || self.allow_http,
                "storage.endpoint = {e:?} is plain http: set storage.allow_http = true (loopback or a trusted \
                 network only), or use https"
            );
        }
        anyhow::ensure!(
            self.access_key_id_file.is_some() == self.secret_access_key_file.is_some(),
            "storage.access_key_id_file and storage.secret_access_key_file go together (or neither: env \
             {S3_ENV_ACCESS_KEY_ID} and {S3_ENV_SECRET_ACCESS_KEY})"
        );
        anyhow::ensure!(self.max_retries <= 20, "storage.max_retries must be at most 20");
        anyhow::ensure!(
            self.retry_timeout >= Duration::from_secs(1) && self.retry_timeout <= Duration::from_secs(300),
            "storage.retry_timeout must be between 1s and 5m (signed requests expire)"
        );
        anyhow::ensure!(self.request_timeout >= Duration::from_secs(1), "storage.request_timeout must be at least 1s");
        Ok(())
    }
}

/// Who holds the root key that wraps every customer key (docs/KEYS.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RootKeySection {
    /// `file` (root.key in the data directory) or `pkcs11` (a key inside an
    /// HSM or token that never leaves it).
    pub provider: RootKeyProvider,
    /// pkcs11: the module (shared library) of the token's vendor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
    /// pkcs11: label of the token holding the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_label: Option<String>,
    /// pkcs11: file holding the user PIN; refused if group or others can read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    /// pkcs11: label of the AES-256 key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_label: Option<String>,
    /// pkcs11: generate the key inside the token if no key has `key_label`.
    pub create_key: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootKeyProvider {
    #[default]
    File,
    Pkcs11,
}

impl RootKeySection {
    /// The PKCS#11 settings, when `provider = "pkcs11"`; every key named.
    pub fn pkcs11(&self) -> anyhow::Result<Option<crate::keys::Pkcs11Settings>> {
        if self.provider != RootKeyProvider::Pkcs11 {
            return Ok(None);
        }
        let missing = |key: &str| anyhow::anyhow!("root_key.provider = \"pkcs11\" needs root_key.{key}");
        let non_empty = |v: &Option<String>, key: &str| -> anyhow::Result<String> {
            match v {
                Some(s) if !s.trim().is_empty() => Ok(s.clone()),
                Some(_) => anyhow::bail!("root_key.{key} must not be empty"),
                None => Err(missing(key)),
            }
        };
        let token_label = non_empty(&self.token_label, "token_label")?;
        anyhow::ensure!(token_label.len() <= 32, "root_key.token_label is longer than 32 bytes (the PKCS#11 limit)");
        Ok(Some(crate::keys::Pkcs11Settings {
            module: self.module.clone().ok_or_else(|| missing("module"))?,
            token_label,
            pin_file: self.pin_file.clone().ok_or_else(|| missing("pin_file"))?,
            key_label: non_empty(&self.key_label, "key_label")?,
            create_key: self.create_key,
        }))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.provider == RootKeyProvider::File {
            let set = [
                ("module", self.module.is_some()),
                ("token_label", self.token_label.is_some()),
                ("pin_file", self.pin_file.is_some()),
                ("key_label", self.key_label.is_some()),
                ("create_key", self.create_key),
            ];
            if let Some((key, _)) = set.iter().find(|(_, is_set)| *is_set) {
                anyhow::bail!("root_key.{key} is used only with root_key.provider = \"pkcs11\"");
            }
        }
        self.pkcs11().map(|_| ())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Client certificates (mutual TLS) mapped to principals and roles.
    #[serde(rename = "certificate", skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<crate::auth::CertificatePrincipal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsentSection {
    /// Training use (coaching, quality review) of a customer with no
    /// recorded consent: `allow` (opt-out) or `deny` (opt-in).
    pub default_training_use: TrainingUse,
}

impl Default for ConsentSection {
    fn default() -> Self {
        Self { default_training_use: TrainingUse::Allow }
    }
}

/// The HTTP port: the coaching page and signed playback links. It speaks
/// TLS with the gRPC port's certificate when `[tls]` is configured, and
/// like the gRPC port it is plain TCP only on loopback or with
/// `allow_plaintext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Lifetime of playback links (and the longest a caller may ask for).
    #[serde(with = "humantime_serde_compat")]
    pub link_ttl: Duration,
    /// Base URL of links when the port is reached through a proxy or a
    /// name (e.g. `https://recvault.example`); default: the bound address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Serve Prometheus metrics at `/metrics` (unauthenticated: counts
    /// only, no ids; bind `listen` where only the scraper reaches it).
    pub metrics: bool,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: DEFAULT_HTTP_LISTEN.parse().expect("valid default address"),
            link_ttl: Duration::from_secs(600),
            public_url: None,
            metrics: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainingUse {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Time between retention sweeps (expiry, due shreds, garbage).
    #[serde(with = "humantime_serde_compat")]
    pub sweep_interval: Duration,
    /// Grace window between a shred request and key destruction; "0s"
    /// shreds at once.
    #[serde(with = "humantime_serde_compat")]
    pub shred_grace: Duration,
    /// Two-person rule: a shred needs approval by someone other than the
    /// requester.
    pub shred_requires_approval: bool,
    /// Unfinished uploads idle this long are discarded.
    #[serde(with = "humantime_serde_compat")]
    pub abandoned_upload_ttl: Duration,
    /// Retention policies; the longest matching one wins. An object no
    /// policy matches is kept until its customer is shredded.
    #[serde(rename = "policy")]
    pub policies: Vec<PolicyConfig>,
}

/// One `[[retention.policy]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    pub kind: ContentKind,
    /// How long after commit, e.g. "90days".
    #[serde(with = "humantime_serde_compat")]
    pub retain: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// "key=value": only objects carrying this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl PolicyConfig {
    pub fn to_policy(&self) -> anyhow::Result<RetentionPolicy> {
        let tag = match &self.tag {
            None => None,
            Some(t) => {
                let (k, v) = t.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("retention policy {}: tag must be written key=value, got {t:?}", self.name)
                })?;
                Some((k.to_owned(), v.to_owned()))
            }
        };
        let policy = RetentionPolicy {
            name: self.name.clone(),
            kind: self.kind,
            queue: self.queue.clone(),
            channel: self.channel.clone(),
            tag,
            retain_secs: self.retain.as_secs(),
        };
        policy.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(policy)
    }
}

impl Default for RetentionSection {
    fn default() -> Self {
        let day = 86_400;
        let policy = |name: &str, kind, days: u64| PolicyConfig {
            name: name.into(),
            kind,
            retain: Duration::from_secs(days * day),
            queue: None,
            channel: None,
            tag: None,
        };
        Self {
            sweep_interval: Duration::from_secs(600),
            shred_grace: Duration::from_secs(7 * day),
            shred_requires_approval: false,
            abandoned_upload_ttl: Duration::from_secs(7 * day),
            policies: vec![
                policy("call-recordings", ContentKind::CallRecording, 90),
                policy("chat-transcripts", ContentKind::ChatTranscript, 365),
                policy("images", ContentKind::Image, 30),
            ],
        }
    }
}

impl RetentionSection {
    pub fn policies(&self) -> anyhow::Result<Vec<RetentionPolicy>> {
        self.policies.iter().map(PolicyConfig::to_policy).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// Longest wait of received bytes for their fsync and ack.
    #[serde(with = "humantime_serde_compat")]
    pub commit_interval: Duration,
    /// Flush early once this many bytes are pending. While a flush is
    /// under way a stream holds about this much more (up to one message
    /// past it), then stops reading.
    pub commit_bytes: usize,
    /// Close a stream silent this long, or whose client reads no answer for
    /// this long (its durable bytes are kept).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Largest body of the unary Put.
    pub put_cap: u64,
    pub caps: SizeCaps,
    /// Where unfinished uploads are journalled before their bytes are
    /// acknowledged: `local` (files under `spool/`), `catalog` (the
    /// catalog's database, so any replica sharing it can resume an upload
    /// another one acknowledged), or `auto` (`catalog` with PostgreSQL,
    /// `local` with SQLite). docs/REPLICAS.md.
    pub journal: JournalMode,
    /// How a local journal's writes are made durable before an ack:
    /// `file` (an `fdatasync` of each stream's journal) or `log` (every
    /// stream's records appended to one shared log, synced once per batch
    /// whatever the number of streams: for thousands of live calls).
    pub sync: SyncMode,
    /// Most ingest streams at once; one more is refused at once with
    /// `UNAVAILABLE` (retry, or another replica). 0: no limit. Size it from
    /// `recvault loadgen calls` on the server's hardware (BENCHMARKS.md).
    pub max_streams: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    #[default]
    File,
    Log,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalMode {
    #[default]
    Auto,
    Local,
    Catalog,
}

impl Config {
    /// Whether upload journals live in the catalog (`ingest.journal`).
    pub fn shared_journal(&self) -> bool {
        match self.ingest.journal {
            JournalMode::Local => false,
            JournalMode::Catalog => true,
            JournalMode::Auto => self.catalog.backend == CatalogBackend::Postgres,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            tls: None,
            allow_plaintext: false,
            blocking_threads: DEFAULT_BLOCKING_THREADS,
            auth: AuthSection::default(),
            catalog: CatalogSection::default(),
            storage: StorageSection::default(),
            root_key: RootKeySection::default(),
            ingest: IngestSection::default(),
            retention: RetentionSection::default(),
            consent: ConsentSection::default(),
            http: HttpSection::default(),
            health: HealthSection::default(),
            log: LogSection::default(),
        }
    }
}

impl Default for IngestSection {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(100),
            commit_bytes: 4 << 20,
            idle_timeout: Duration::from_secs(120),
            put_cap: 4 << 20,
            caps: SizeCaps::default(),
            journal: JournalMode::Auto,
            sync: SyncMode::File,
            max_streams: 0,
        }
    }
}

/// Environment variables that set a config key start with this, then the
/// key's path in upper case with `__` between sections:
/// `RECVAULT__STORAGE__BUCKET`, `RECVAULT__LOG__FORMAT`,
/// `RECVAULT__DATA_DIR`. (One `_` after `RECVAULT` is the CLI's own
/// variables: `RECVAULT_CONFIG`, `RECVAULT_LOG`, `RECVAULT_SERVER`, ...)
pub const ENV_PREFIX: &str = "RECVAULT__";

/// The effective configuration and where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The `RECVAULT__*` variables applied, in the order applied.
    pub env_keys: Vec<String>,
}

impl Config {
    /// Reads a TOML file; every problem names the file and the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::load(Some(path), std::iter::empty())?.config)
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(one_line)?;
        let cfg = Self::from_table(table, &[])?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The file (if any) with `RECVAULT__*` variables of `env` on top,
    /// validated. Pass `std::env::vars()` for the process environment.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Loaded> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), one_line(e)))?
            }
        };
        let defaults = toml::Table::try_from(Config::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        vars.sort();
        let mut applied = Vec::new();
        for (name, value) in &vars {
            let dotted = apply_env(&mut table, &defaults, name, value)?;
            applied.push((name.clone(), dotted));
        }
        let origin = match path {
            Some(p) => format!("config file {}", p.display()),
            None => "config".to_owned(),
        };
        let config = Self::from_table(table, &applied).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        config.validate().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        Ok(Loaded { config, env_keys: applied.into_iter().map(|(name, _)| name).collect() })
    }

    /// Deserialises, naming the key's full path on failure (and the
    /// variable, when one set it).
    fn from_table(table: toml::Table, env: &[(String, String)]) -> anyhow::Result<Self> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let by_env = env
                .iter()
                .find(|(_, dotted)| path == *dotted || path.starts_with(&format!("{dotted}.")))
                .map(|(name, _)| format!(" (set by env {name})"))
                .unwrap_or_default();
            let inner = one_line(e.into_inner());
            if path == "." || path.is_empty() {
                anyhow::anyhow!("{inner}{by_env}")
            } else {
                anyhow::anyhow!("{path}: {inner}{by_env}")
            }
        })
    }

    /// Reads every file the configuration names, with the checks the
    /// server applies when it opens them (owner-only secrets, non-empty,
    /// readable certificates), and keeps none of the contents.
    pub fn check_files(&self) -> anyhow::Result<()> {
        if self.catalog.backend == CatalogBackend::Postgres {
            self.catalog.connection_string()?;
        }
        self.storage.s3()?;
        if let Some(p) = self.root_key.pkcs11()? {
            anyhow::ensure!(
                p.module.is_file(),
                "root_key.module {} is not a file (the token vendor's PKCS#11 library)",
                p.module.display()
            );
            crate::keys::pkcs11::read_pin(&p.pin_file).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(t) = &self.tls {
            check_private_file("tls.key_file", &t.key_file)?;
            for (key, path) in
                [("tls.cert_file", Some(&t.cert_file)), ("tls.client_ca_file", t.client_ca_file.as_ref())]
            {
                if let Some(path) = path {
                    std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{key} {}: {e}", path.display()))?;
                }
            }
        }
        Ok(())
    }

    /// The configuration as TOML with every secret replaced by
    /// `[redacted]`: a password in `catalog.url`, and any key named like a
    /// password, secret or PIN (files holding secrets are shown by path).
    pub fn redacted_toml(&self) -> anyhow::Result<String> {
        let mut c = self.clone();
        c.catalog.url = c.catalog.url.as_deref().map(redact_connection_string);
        let mut table = toml::Table::try_from(&c).map_err(|e| anyhow::anyhow!("{e}"))?;
        redact_named_secrets(&mut table);
        toml::to_string_pretty(&table).map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (8..=4096).contains(&self.blocking_threads),
            "blocking_threads = {} is out of range: give 8 to 4096 (64 by default)",
            self.blocking_threads
        );
        anyhow::ensure!(
            self.tls.is_some() || self.allow_plaintext || self.listen.ip().is_loopback(),
            "listen = {} is beyond loopback without TLS: configure [tls] (cert_file, key_file), or set \
             allow_plaintext = true if a TLS-terminating proxy is in front",
            self.listen
        );
        let h = &self.http;
        if h.enabled {
            anyhow::ensure!(
                self.tls.is_some() || self.allow_plaintext || h.listen.ip().is_loopback(),
                "http.listen = {} is beyond loopback without TLS: configure [tls] (the HTTP port uses the same \
                 certificate), set allow_plaintext = true behind a TLS-terminating proxy, or http.enabled = false",
                h.listen
            );
            anyhow::ensure!(
                (Duration::from_secs(10)..=Duration::from_secs(86_400)).contains(&h.link_ttl),
                "http.link_ttl must be between 10s and 1day"
            );
            if let Some(u) = &h.public_url {
                anyhow::ensure!(
                    (u.starts_with("https://") || u.starts_with("http://")) && !u.contains(['?', '#', ' ']),
                    "http.public_url must be an http:// or https:// base URL without query, got {u:?}"
                );
            }
        }
        if let Some(t) = &self.tls {
            anyhow::ensure!(
                !t.require_client_cert || t.client_ca_file.is_some(),
                "tls.require_client_cert needs tls.client_ca_file (the CA that signs client certificates)"
            );
        }
        if self.catalog.backend == CatalogBackend::Postgres {
            anyhow::ensure!(
                self.catalog.url.is_some() != self.catalog.url_file.is_some(),
                "catalog.backend = \"postgres\" needs exactly one of catalog.url and catalog.url_file"
            );
        }
        self.storage.validate()?;
        self.check_s3_copy_limit()?;
        self.root_key.validate()?;
        for c in &self.auth.certificates {
            anyhow::ensure!(
                !c.subject.is_empty() && (!c.roles.is_empty() || c.unredacted),
                "auth.certificate {:?}: needs a subject and at least one role",
                c.subject
            );
            crate::auth::check_name(c.name.as_deref().unwrap_or(&c.subject)).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let i = &self.ingest;
        anyhow::ensure!(
            !i.commit_interval.is_zero() && i.commit_interval <= Duration::from_secs(5),
            "ingest.commit_interval must be between 1ms and 5s"
        );
        anyhow::ensure!(
            (64 << 10..=64 << 20).contains(&i.commit_bytes),
            "ingest.commit_bytes must be between 64 KiB and 64 MiB"
        );
        anyhow::ensure!(i.idle_timeout >= Duration::from_secs(1), "ingest.idle_timeout must be at least 1s");
        anyhow::ensure!(
            (1..=64 << 20).contains(&i.put_cap),
            "ingest.put_cap must be between 1 byte and 64 MiB (larger items use the streaming Ingest call)"
        );
        let r = &self.retention;
        anyhow::ensure!(r.sweep_interval >= Duration::from_secs(1), "retention.sweep_interval must be at least 1s");
        anyhow::ensure!(
            r.shred_grace <= Duration::from_secs(90 * 86_400),
            "retention.shred_grace must be at most 90 days (0s shreds at once)"
        );
        anyhow::ensure!(
            r.abandoned_upload_ttl >= Duration::from_secs(3600),
            "retention.abandoned_upload_ttl must be at least 1h (a dropped call must have time to resume)"
        );
        let hs = &self.health;
        anyhow::ensure!(
            hs.probe_timeout >= Duration::from_millis(100) && hs.probe_timeout <= Duration::from_secs(60),
            "health.probe_timeout must be between 100ms and 1m"
        );
        anyhow::ensure!(
            hs.probe_interval >= Duration::from_secs(1) && hs.probe_interval >= hs.probe_timeout,
            "health.probe_interval must be at least 1s and at least health.probe_timeout"
        );
        let policies = r.policies()?;
        let mut names = std::collections::HashSet::new();
        for p in &policies {
            anyhow::ensure!(names.insert(&p.name), "retention policy {} is defined twice", p.name);
        }
        Ok(())
    }
}

/// Sets the key named by env variable `name` in `table`, typed like the
/// default value at that path (a string where the default is a string,
/// otherwise a TOML value: `true`, `5`, `["a"]`). Returns the dotted path.
fn apply_env(table: &mut toml::Table, defaults: &toml::Table, name: &str, value: &str) -> anyhow::Result<String> {
    let segments: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
    let dotted = segments.join(".");
    anyhow::ensure!(
        segments.iter().all(|s| !s.is_empty()),
        "env {name}: a config key is RECVAULT__ then its path with `__` between sections, e.g.          RECVAULT__STORAGE__BUCKET"
    );
    let (last, sections) = segments.split_last().expect("split yields at least one segment");
    let mut here = table;
    let mut default = Some(defaults);
    for (i, section) in sections.iter().enumerate() {
        if default.and_then(|d| d.get(section)).is_some_and(|v| !v.is_table()) {
            anyhow::bail!("env {name}: {} is a value, not a section", segments[..=i].join("."));
        }
        let entry = here.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        here = match entry {
            toml::Value::Table(t) => t,
            _ => anyhow::bail!("env {name}: {} is a value, not a section", segments[..=i].join(".")),
        };
        default = default.and_then(|d| d.get(section)).and_then(toml::Value::as_table);
    }
    // Keys without a default (optional ones) are strings, except lists and
    // tables (`auth.certificate`) and the booleans of absent sections.
    let structured = value.trim_start().starts_with(['[', '{']) || value == "true" || value == "false";
    let typed = match default.and_then(|d| d.get(last)).or_else(|| here.get(last)) {
        Some(toml::Value::String(_)) => toml::Value::String(value.to_owned()),
        None if !structured => toml::Value::String(value.to_owned()),
        _ => {
            let mut parsed: toml::Table = toml::from_str(&format!("v = {value}"))
                .map_err(|_| anyhow::anyhow!("env {name} = {value:?} is not a valid value for {dotted}"))?;
            parsed.remove("v").expect("parsed `v = ...`")
        }
    };
    here.insert(last.clone(), typed);
    Ok(dotted)
}

/// A TOML error on one line (they carry a snippet of the file).
fn one_line(e: impl std::fmt::Display) -> anyhow::Error {
    let text = e.to_string();
    // Leave out the quoted source lines ("3 | url = ..."): the line may
    // hold a secret, and the message already names line and column.
    let snippet = |l: &str| l.starts_with('|') || l.split_once(" |").is_some_and(|(n, _)| n.parse::<u32>().is_ok());
    let parts: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !snippet(l)).collect();
    anyhow::anyhow!("{}", parts.join("; "))
}

/// Refuses a file holding a secret that group or others may read.
pub fn check_private_file(key: &str, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{key} {}: {e}", path.display()))?;
    anyhow::ensure!(meta.is_file(), "{key} {} is not a regular file", path.display());
    let mode = meta.permissions().mode() & 0o777;
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{key} {} has mode {mode:04o}, readable by group or others; run `chmod 600 {}`",
        path.display(),
        path.display()
    );
    Ok(())
}

const REDACTED: &str = "[redacted]";

/// A PostgreSQL connection string without its password, in either form:
/// `postgres://user:PASSWORD@host/db?password=...` or
/// `host=db user=u password=PASSWORD` (values may be 'quoted').
pub fn redact_connection_string(s: &str) -> String {
    if let Some((scheme, rest)) = s.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
                None => format!("{userinfo}@{host}"),
            },
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}={REDACTED}"),
                        _ => p.to_owned(),
                    })
                    .collect();
                format!("{path}?{}", params.join("&"))
            }
            None => tail.to_owned(),
        };
        return format!("{scheme}://{authority}{tail}");
    }
    // key=value pairs separated by spaces; a value may be 'quoted' with \' escapes.
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            out.push(key);
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            value.push('\'');
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else if c == '\'' {
                    break;
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if key.eq_ignore_ascii_case("password") {
            value = REDACTED.to_owned();
        }
        out.push(format!("{key}={value}"));
    }
    out.join(" ")
}

/// Replaces string values whose key names a password, secret or PIN; a
/// `*_file` key names where a secret is, which is not itself secret.
fn redact_named_secrets(table: &mut toml::Table) {
    for (key, value) in table.iter_mut() {
        let k = key.to_ascii_lowercase();
        let secret =
            !k.ends_with("_file") && ["password", "secret", "pin"].iter().any(|w| k.split('_').any(|p| p == *w));
        match value {
            toml::Value::String(s) if secret => *s = REDACTED.to_owned(),
            toml::Value::Table(t) => redact_named_secrets(t),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        redact_named_secrets(t);
                    }
                }
            }
            _ => {}
        }
    }
}

/// S3 limits one copied part (UploadPartCopy) to 5 GiB of object bytes.
pub const S3_COPY_PART_MAX: u64 = 5 << 30;

/// The largest plaintext whose ciphertext fits in one S3 copied part.
pub fn s3_copy_max_plaintext() -> u64 {
    use crate::crypto::format::{DEFAULT_SEGMENT_SIZE, TAG_LEN, ciphertext_len};
    let stride = u64::from(DEFAULT_SEGMENT_SIZE) + TAG_LEN as u64;
    let mut p = S3_COPY_PART_MAX * u64::from(DEFAULT_SEGMENT_SIZE) / stride;
    while ciphertext_len(p, DEFAULT_SEGMENT_SIZE) > S3_COPY_PART_MAX {
        p -= 1;
    }
    p
}

impl Config {
    /// `write_once = "conditional"` on S3 puts a large object in place with
    /// one server-side copy of at most 5 GiB: the size caps must fit.
    fn check_s3_copy_limit(&self) -> anyhow::Result<()> {
        if self.storage.backend != StorageBackend::S3 || self.storage.write_once != WriteOnceMode::Conditional {
            return Ok(());
        }
        let max = s3_copy_max_plaintext();
        let caps = &self.ingest.caps;
        for (key, cap) in
            [("call_recording", caps.call_recording), ("chat_transcript", caps.chat_transcript), ("image", caps.image)]
        {
            anyhow::ensure!(
                cap <= max,
                "ingest.caps.{key} = {cap} is too large for storage.write_once = \"conditional\" on S3: a large \
                 object is copied into place create-only in one part, and S3 copies at most 5 GiB; lower it to at \
                 most {max}, or set storage.write_once = \"check-first\" (docs/S3.md)"
            );
        }
        Ok(())
    }
}

/// `Duration` as a humantime string ("100ms", "2m").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_unknown_keys_are_refused() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg, Config::default());
        let cfg = Config::from_toml("listen = \"127.0.0.1:9000\"\n[ingest]\ncommit_interval = \"50ms\"\n").unwrap();
        assert_eq!(cfg.ingest.commit_interval, Duration::from_millis(50));
        let err = Config::from_toml("lisen = \"127.0.0.1:9000\"").unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(Config::from_toml("[ingest]\ncommit_interval = \"0s\"").is_err());
    }

    #[test]
    fn the_blocking_pool_is_capped_within_a_range() {
        assert_eq!(Config::default().blocking_threads, 64);
        assert_eq!(Config::from_toml("blocking_threads = 256").unwrap().blocking_threads, 256);
        for bad in ["blocking_threads = 0", "blocking_threads = 7", "blocking_threads = 5000"] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains("blocking_threads") && err.contains("8 to 4096"), "{bad}: {err}");
        }
    }

    #[test]
    fn retention_policies_from_the_config() {
        let cfg = Config::from_toml(
            "[retention]\nshred_grace = \"0s\"\n[[retention.policy]]\nname = \"disputes\"\nkind = \"call-recording\"\n\
             retain = \"2years\"\ntag = \"dispute=yes\"\nqueue = \"billing\"\n",
        )
        .unwrap();
        let policies = cfg.retention.policies().unwrap();
        assert_eq!(policies.len(), 1, "a [[retention.policy]] list replaces the defaults");
        assert_eq!(policies[0].tag, Some(("dispute".into(), "yes".into())));
        assert_eq!(policies[0].queue.as_deref(), Some("billing"));
        assert!(cfg.retention.shred_grace.is_zero());
        for bad in [
            "[[retention.policy]]\nname = \"x\"\nkind = \"call-recording\"\nretain = \"1d\"\ntag = \"novalue\"",
            "[[retention.policy]]\nname = \"x\"\nkind = \"video\"\nretain = \"1d\"",
            "[[retention.policy]]\nname = \"x\"\nkind = \"image\"\nretain = \"0s\"",
            "[[retention.policy]]\nname = \"x\"\nkind = \"image\"\nretain = \"1d\"\n\
             [[retention.policy]]\nname = \"x\"\nkind = \"image\"\nretain = \"2d\"",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plaintext_beyond_loopback_needs_tls_or_an_explicit_opt_in() {
        let err = Config::from_toml("listen = \"0.0.0.0:7420\"").unwrap_err().to_string();
        assert!(err.contains("[tls]"), "{err}");
        assert!(Config::from_toml("listen = \"0.0.0.0:7420\"\nallow_plaintext = true").is_ok());
        let cfg = Config::from_toml(
            "listen = \"0.0.0.0:7420\"\n[tls]\ncert_file = \"s.pem\"\nkey_file = \"s.key\"\n\
             client_ca_file = \"ca.pem\"\n[[auth.certificate]]\nsubject = \"pbx-1.example\"\nname = \"telephony-1\"\n\
             roles = [\"ingest\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.auth.certificates[0].roles, vec![crate::model::Role::Ingest]);
        for bad in [
            "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nrequire_client_cert = true",
            "[[auth.certificate]]\nsubject = \"x\"\nroles = []",
            "[[auth.certificate]]\nsubject = \"x\"\nroles = [\"superuser\"]",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn root_key_provider_is_file_by_default_and_pkcs11_needs_every_key() {
        assert_eq!(Config::default().root_key.provider, RootKeyProvider::File);
        assert!(Config::default().root_key.pkcs11().unwrap().is_none());
        let cfg = Config::from_toml(
            "[root_key]\nprovider = \"pkcs11\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n\
             token_label = \"recvault\"\npin_file = \"/etc/recvault/hsm.pin\"\nkey_label = \"root-1\"\n\
             create_key = true\n",
        )
        .unwrap();
        let p = cfg.root_key.pkcs11().unwrap().expect("pkcs11 settings");
        assert_eq!(p.token_label, "recvault");
        assert_eq!(p.key_label, "root-1");
        assert!(p.create_key);
        for (bad, expect) in [
            ("[root_key]\nprovider = \"pkcs11\"\ntoken_label = \"t\"\npin_file = \"p\"\nkey_label = \"k\"", "module"),
            ("[root_key]\nprovider = \"pkcs11\"\nmodule = \"m\"\npin_file = \"p\"\nkey_label = \"k\"", "token_label"),
            ("[root_key]\nprovider = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"\nkey_label = \"k\"", "pin_file"),
            (
                "[root_key]\nprovider = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"\npin_file = \"p\"\nkey_label = \"\"",
                "key_label",
            ),
            ("[root_key]\nkey_label = \"k\"", "only with"),
            ("[root_key]\nprovider = \"kms\"", "kms"),
            ("[root_key]\npin = \"1234\"", "pin"),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn storage_is_local_by_default_and_s3_needs_a_bucket() {
        assert_eq!(Config::default().storage.backend, StorageBackend::Local);
        assert!(Config::default().storage.s3().unwrap().is_none());
        let s3 = "[storage]\nbackend = \"s3\"\nwrite_once = \"check-first\"\n";
        let ok = format!("{s3}bucket = \"recvault\"\nendpoint = \"http://127.0.0.1:3900\"\nallow_http = true\n");
        let cfg = Config::from_toml(&ok).unwrap();
        assert_eq!(cfg.storage.bucket.as_deref(), Some("recvault"));
        for (bad, expect) in [
            (s3.to_owned(), "needs storage.bucket"),
            (format!("{s3}bucket = \"Not_A_Bucket\""), "is not a bucket name"),
            (format!("{s3}bucket = \"b-1\"\nendpoint = \"http://h:3900\""), "allow_http = true"),
            (format!("{s3}bucket = \"b-1\"\nendpoint = \"h:3900\""), "http:// or https://"),
            (format!("{s3}bucket = \"b-1\"\nendpoint = \"https://k:s@h:3900\""), "must not carry credentials"),
            (format!("{s3}bucket = \"b-1\"\naccess_key_id_file = \"/k\""), "go together"),
            (format!("{s3}bucket = \"b-1\"\nretry_timeout = \"1h\""), "retry_timeout"),
            (format!("{s3}bucket = \"b-1\"\nsecret_key = \"x\""), "secret_key"),
            ("[storage]\nbucket = \"b-1\"".to_owned(), "only with storage.backend = \"s3\""),
            ("[storage]\nbackend = \"gcs\"".to_owned(), "gcs"),
        ] {
            let err = Config::from_toml(&bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn conditional_s3_commits_need_caps_within_one_copied_part() {
        use crate::crypto::format::{DEFAULT_SEGMENT_SIZE, ciphertext_len};
        let max = s3_copy_max_plaintext();
        assert!(ciphertext_len(max, DEFAULT_SEGMENT_SIZE) <= S3_COPY_PART_MAX);
        assert!(ciphertext_len(max + 1, DEFAULT_SEGMENT_SIZE) > S3_COPY_PART_MAX);
        assert_eq!(max, 5_367_398_608, "the number deploy/recvault.toml names");
        let s3 = "[storage]\nbackend = \"s3\"\nbucket = \"recvault\"\n";
        let err = Config::from_toml(s3).unwrap_err().to_string();
        assert!(err.contains("ingest.caps.call_recording") && err.contains(&max.to_string()), "{err}");
        assert!(Config::from_toml(&format!("{s3}[ingest.caps]\ncall_recording = {max}\n")).is_ok());
        assert!(Config::from_toml(&format!("{s3}write_once = \"check-first\"\n")).is_ok());
    }

    #[test]
    fn s3_credentials_come_from_private_files_or_the_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (id, secret) = (dir.path().join("id"), dir.path().join("secret"));
        std::fs::write(&id, "GK0123\n").unwrap();
        std::fs::write(&secret, "very-secret-value\n").unwrap();
        std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let storage = StorageSection {
            backend: StorageBackend::S3,
            bucket: Some("recvault".into()),
            access_key_id_file: Some(id),
            secret_access_key_file: Some(secret.clone()),
            write_once: WriteOnceMode::CheckFirst,
            ..StorageSection::default()
        };
        let err = storage.s3().unwrap_err().to_string();
        assert!(err.contains("storage.secret_access_key_file") && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let settings = storage.s3().unwrap().expect("s3 settings");
        let debug = format!("{settings:?}");
        assert!(!debug.contains("very-secret-value") && !debug.contains("GK0123"), "{debug}");
        // Payload hashes are signed over plain http only, unless set.
        assert!(!settings.sign_payload, "no endpoint is Amazon S3, over https");
        let https = StorageSection { endpoint: Some("https://s3.example.net".into()), ..storage.clone() };
        assert!(!https.s3().unwrap().unwrap().sign_payload);
        let http =
            StorageSection { endpoint: Some("http://10.0.0.5:3900".into()), allow_http: true, ..storage.clone() };
        assert!(http.s3().unwrap().unwrap().sign_payload);
        let forced = StorageSection { sign_payload: Some(true), ..https };
        assert!(forced.s3().unwrap().unwrap().sign_payload);
        std::fs::write(&secret, "\n").unwrap();
        assert!(storage.s3().unwrap_err().to_string().contains("is empty"));
        // Without files, the environment (not set in this test process:
        // changing it would race other tests).
        if std::env::var_os(S3_ENV_ACCESS_KEY_ID).is_none() {
            let from_env = StorageSection { access_key_id_file: None, secret_access_key_file: None, ..storage };
            let err = from_env.s3().unwrap_err().to_string();
            assert!(err.contains("access_key_id_file") && err.contains(S3_ENV_ACCESS_KEY_ID), "{err}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_overrides_reach_every_key_typed_like_its_default() {
        let loaded = Config::load(
            None,
            env(&[
                ("RECVAULT__DATA_DIR", "/srv/recvault"),
                ("RECVAULT__CATALOG__BACKEND", "postgres"),
                ("RECVAULT__CATALOG__URL", "host=db user=r"),
                ("RECVAULT__HTTP__METRICS", "false"),
                ("RECVAULT__INGEST__CAPS__IMAGE", "1048576"),
                ("RECVAULT__RETENTION__SHRED_GRACE", "1day"),
                ("RECVAULT__STORAGE__BUCKET", "123"),
                ("RECVAULT__STORAGE__BACKEND", "s3"),
                ("RECVAULT__STORAGE__WRITE_ONCE", "check-first"),
                ("RECVAULT__AUTH__CERTIFICATE", "[{subject = \"pbx\", roles = [\"ingest\"]}]"),
                ("RECVAULT_LOG", "debug"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        let c = &loaded.config;
        assert_eq!(c.data_dir, PathBuf::from("/srv/recvault"));
        assert_eq!(c.catalog.backend, CatalogBackend::Postgres);
        assert!(!c.http.metrics);
        assert_eq!(c.ingest.caps.image, 1 << 20);
        assert_eq!(c.retention.shred_grace, Duration::from_secs(86_400));
        assert_eq!(c.storage.bucket.as_deref(), Some("123"), "a string key stays a string");
        assert_eq!(c.auth.certificates[0].subject, "pbx");
        assert_eq!(loaded.env_keys.len(), 10, "only RECVAULT__ variables: {:?}", loaded.env_keys);

        for (name, value, expect) in [
            ("RECVAULT__LISEN", "x", "lisen"),
            ("RECVAULT__HTTP__METRICS", "maybe", "not a valid value for http.metrics"),
            ("RECVAULT__LISTEN__PORT", "1", "listen is a value, not a section"),
            ("RECVAULT__", "x", "RECVAULT__STORAGE__BUCKET"),
            ("RECVAULT__INGEST____X", "x", "RECVAULT__STORAGE__BUCKET"),
            ("RECVAULT__HTTP__LINK_TTL", "1s", "http.link_ttl"),
        ] {
            let err = Config::load(None, env(&[(name, value)])).unwrap_err().to_string();
            assert!(err.contains(expect), "{name}={value}: {err}");
        }
        let err = Config::load(None, env(&[("RECVAULT__STORAGE__BUKKET", "x")])).unwrap_err().to_string();
        assert!(err.contains("storage.bukket") && err.contains("(set by env RECVAULT__STORAGE__BUKKET)"), "{err}");
    }

    #[test]
    fn the_file_names_the_full_path_of_a_bad_key() {
        let err = Config::from_toml("[storage]\nbukket = \"x\"").unwrap_err().to_string();
        assert!(err.starts_with("storage.bukket: unknown field"), "{err}");
        let err = Config::from_toml("[[retention.policy]]\nname = \"x\"\nkind = \"image\"\nretain = \"1d\"\nqueue = 5")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("retention.policy[0].queue:"), "{err}");
    }

    #[test]
    fn connection_string_passwords_are_redacted_in_both_forms() {
        for (given, shown) in [
            ("host=db user=r password=s3cret dbname=x", "host=db user=r password=[redacted] dbname=x"),
            ("host=db password = 'with space \\' quote' port=5", "host=db password=[redacted] port=5"),
            ("host=db PASSWORD=x", "host=db PASSWORD=[redacted]"),
            ("host=db user=r", "host=db user=r"),
            ("postgres://u:s3cret@db:5432/x?sslmode=require", "postgres://u:[redacted]@db:5432/x?sslmode=require"),
            ("postgresql://u@db/x?password=s3cret&a=b", "postgresql://u@db/x?password=[redacted]&a=b"),
            ("postgres://u:p@ss@db", "postgres://u:[redacted]@db"),
        ] {
            assert_eq!(redact_connection_string(given), shown, "{given}");
        }
        let cfg = Config {
            catalog: CatalogSection {
                backend: CatalogBackend::Postgres,
                url: Some("host=db password=s3cret".into()),
                url_file: None,
                schema: "recvault".into(),
            },
            ..Config::default()
        };
        let shown = cfg.redacted_toml().unwrap();
        assert!(!shown.contains("s3cret") && shown.contains("password=[redacted]"), "{shown}");
        let mut table: toml::Table =
            toml::from_str("[x]\npassword = \"a\"\npin_file = \"/p\"\ntoken_label = \"t\"\nsecret_key = \"k\"")
                .unwrap();
        redact_named_secrets(&mut table);
        let x = table["x"].as_table().unwrap();
        assert_eq!(x["password"].as_str(), Some(REDACTED));
        assert_eq!(x["secret_key"].as_str(), Some(REDACTED));
        assert_eq!(x["pin_file"].as_str(), Some("/p"), "a path to a secret is not the secret");
        assert_eq!(x["token_label"].as_str(), Some("t"));
    }

    #[test]
    fn the_shipped_example_is_the_defaults() {
        let cfg = Config::from_toml(include_str!("../deploy/recvault.toml")).unwrap();
        assert_eq!(cfg, Config::default());
    }
}
