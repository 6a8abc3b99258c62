//! The `recvault` command line: `serve`, and client commands that talk to a
//! server over gRPC. Client commands print results on stdout and, on
//! failure, one line on stderr with a non-zero exit code.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::api::pb;
use crate::api::pb::recvault_client::RecvaultClient;
use crate::config::Config;
use crate::ingest::sniff;
use crate::model::{ContentKind, Direction};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";

#[derive(Debug, Parser)]
#[command(
    name = "recvault",
    version,
    about = "Encrypted, crypto-shreddable store for contact-centre recordings, transcripts and images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded defaults: ./recvault-data, 127.0.0.1:7420).
    Serve(ServeArgs),
    /// Configuration: `config check` validates and prints the effective
    /// configuration, secrets redacted.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Store a file; prints the new object id.
    Put(PutArgs),
    /// Read an object (or an inclusive byte range of it).
    Get(GetArgs),
    /// Show an object's metadata.
    Stat(StatArgs),
    /// List a customer's objects, newest first.
    Ls(LsArgs),
    /// Crypto-shred a customer: request (then approve/cancel/status).
    Shred(ShredCmd),
    /// Legal holds: place, release, list.
    #[command(subcommand)]
    Hold(HoldCmd),
    /// Retention policies and sweeps.
    #[command(subcommand)]
    Retention(RetentionCmd),
    /// Shred certificates: fetch, and verify offline.
    #[command(subcommand)]
    Certificate(CertificateCmd),
    /// The audit trail: recent records, search, and offline verification.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// A customer's consent to training use (coaching, quality review).
    #[command(subcommand)]
    Consent(ConsentCmd),
    /// Find objects by interaction metadata (newest first, with the total).
    Search {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many objects (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Draw interactions for coaching: --count N at random, or
    /// --per-agent K / --per-queue K; the same --seed draws the same sample.
    Sample {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, conflicts_with_all = ["per_agent", "per_queue"])]
        count: Option<u32>,
        #[arg(long, conflicts_with = "per_queue")]
        per_agent: Option<u32>,
        #[arg(long)]
        per_queue: Option<u32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Mark time spans of a call recording sensitive: silenced for coaches.
    MarkSensitive {
        object_id: String,
        /// START-END in milliseconds (repeatable).
        #[arg(long = "span", value_parser = parse_span, required = true)]
        spans: Vec<pb::TimeSpan>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Bearer tokens (role admin): create, revoke, list.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Who the server takes you to be, and what you may call.
    Whoami(ServerArg),
    /// A short-lived signed HTTP link to an object's content, for a browser,
    /// an audio player or curl (send `Range` to seek). Prints the URL.
    Link {
        object_id: String,
        /// Why it will be read: coaching, quality-review, legal or data-subject-request.
        #[arg(long, value_parser = parse_purpose)]
        purpose: crate::model::Purpose,
        /// Lifetime, e.g. 2m (at most the server's link_ttl, the default).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Root keys, offline against the config and data directory (stop
    /// every server first): versions, and rotation.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Benchmarks against a real server: concurrent live calls, memory
    /// with one large object, range reads (BENCHMARKS.md).
    #[command(subcommand)]
    Loadgen(crate::loadgen::LoadgenCmd),
}

/// What `search` and `sample` look for; all given must match.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    #[arg(long)]
    pub customer: Option<String>,
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<ContentKind>,
    #[arg(long)]
    pub interaction: Option<String>,
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub channel: Option<String>,
    /// inbound, outbound or internal
    #[arg(long, value_parser = parse_direction)]
    pub direction: Option<Direction>,
    /// KEY=VALUE (repeatable: every tag must match).
    #[arg(long = "tag", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Interactions started at or after this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub since: Option<std::time::SystemTime>,
    /// Interactions started before this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub until: Option<std::time::SystemTime>,
    /// Interactions that lasted at least this long (e.g. 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_duration: Option<Duration>,
    /// Interactions that lasted at most this long (e.g. 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

impl FilterArgs {
    fn to_pb(&self) -> pb::SearchFilter {
        pb::SearchFilter {
            customer_id: self.customer.clone().unwrap_or_default(),
            kind: self.kind.map(|k| i32::from(k.code())).unwrap_or(0),
            interaction_id: self.interaction.clone().unwrap_or_default(),
            agent_id: self.agent.clone().unwrap_or_default(),
            queue: self.queue.clone().unwrap_or_default(),
            channel: self.channel.clone().unwrap_or_default(),
            direction: self.direction.map(|d| i32::from(d.code())).unwrap_or(0),
            started_after: self.since.map(timestamp),
            started_before: self.until.map(timestamp),
            tags: self.tags.iter().cloned().collect(),
            created_after: None,
            created_before: None,
            min_duration_ms: self.min_duration.map_or(0, |d| d.as_millis() as u64),
            max_duration_ms: self.max_duration.map_or(0, |d| d.as_millis() as u64),
        }
    }
}

fn print_object(out: &mut impl Write, indent: &str, o: &pb::ObjectInfo) -> std::io::Result<()> {
    let i = o.interaction.clone().unwrap_or_default();
    writeln!(
        out,
        "{indent}{}  {:15}  {:>12}  {}  {}  interaction={} agent={} queue={}",
        o.object_id,
        kind_name(o.kind),
        o.size,
        format_time(&o.created_at),
        o.content_type,
        i.interaction_id,
        i.agent_id,
        i.queue
    )
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token; prints it once (only its hash is kept).
    Create {
        /// Principal name, e.g. telephony-1 (named in the audit trail).
        #[arg(long)]
        name: String,
        /// ingest, coach, retention, admin or auditor (repeatable).
        #[arg(long = "role", value_parser = parse_role)]
        roles: Vec<crate::model::Role>,
        /// Break-glass grant: unredacted content, legal and
        /// data-subject-request reads.
        #[arg(long)]
        unredacted: bool,
        /// Lifetime, e.g. 90days (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke a token by its id (effective for the next request).
    Revoke {
        token_id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List tokens (ids, names, roles; never secrets).
    Ls {
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate a configuration as `serve` would (file, then RECVAULT__*
    /// env, then flags; secret files and their permissions) without
    /// opening storage or the catalog, and print the effective
    /// configuration as TOML with secrets redacted. Exit 1 on any problem.
    Check {
        #[command(flatten)]
        serve: ServeArgs,
        /// Skip reading the files the configuration names (secrets, TLS,
        /// PKCS#11 module): for checking a config away from the machine or
        /// pod it is meant for.
        #[arg(long)]
        skip_files: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsentCmd {
    /// Record a customer's choice (e.g. when they opt out); applies to the
    /// next read.
    Set {
        #[arg(long)]
        customer: String,
        #[arg(long, value_parser = ["allow", "deny"])]
        training_use: String,
        /// Who records it (default: $USER).
        #[arg(long, env = "RECVAULT_ACTOR")]
        by: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show the consent that applies to a customer now.
    Show {
        #[arg(long)]
        customer: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Root key versions present, which is active, and how many customer
    /// keys each wraps.
    Status(LocalArgs),
    /// Re-wrap every customer key under a new root key version, then
    /// retire the old version once no customer key depends on it. Touches
    /// no object. Resumable: after an interruption run it again.
    RotateRoot {
        /// Customer keys re-wrapped per catalog round trip.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        #[command(flatten)]
        local: LocalArgs,
    },
}

/// The config and data directory of an offline admin command.
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// TOML configuration file (as given to `serve`).
    #[arg(long, env = "RECVAULT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: the config's, or ./recvault-data].
    #[arg(long, env = "RECVAULT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl LocalArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        cfg.validate()?;
        if !cfg.data_dir.is_dir() {
            bail!("no data directory at {} (pass --data-dir or --config)", cfg.data_dir.display());
        }
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (flags and env override it).
    #[arg(long, env = "RECVAULT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (catalog, root key, spool, objects).
    #[arg(long, env = "RECVAULT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7420].
    #[arg(long, env = "RECVAULT_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// HTTP listen address: coaching page and playback links
    /// [default: 127.0.0.1:7421].
    #[arg(long, env = "RECVAULT_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Log format on stderr (overrides `[log] format`).
    #[arg(long, env = "RECVAULT_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
}

impl ServeArgs {
    /// The effective configuration: defaults, the file, `RECVAULT__*`
    /// variables, then these flags (and their env shorthands), validated.
    pub fn resolve(&self) -> anyhow::Result<crate::config::Loaded> {
        let mut loaded = Config::load(self.config.as_deref(), std::env::vars())?;
        let cfg = &mut loaded.config;
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        if let Some(l) = self.http_listen {
            cfg.http.listen = l;
        }
        if let Some(f) = self.log_format {
            cfg.log.format = f;
        }
        cfg.validate()?;
        Ok(loaded)
    }
}

/// Installs the stderr logger: `format` from the config, level filter from
/// env `RECVAULT_LOG` (default `default_level`).
pub fn init_logging(format: crate::config::LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RECVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        crate::config::LogFormat::Text => builder.init(),
        // One JSON object per line, the event's fields at the top level
        // next to timestamp, level, target and message.
        crate::config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServerArg {
    /// Server URL (https:// for a server with TLS).
    #[arg(long, env = "RECVAULT_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Bearer token (from `recvault token create`). Default for a server on
    /// this host: the admin token in $RECVAULT_DATA_DIR (./recvault-data).
    #[arg(long, env = "RECVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file.
    #[arg(long, env = "RECVAULT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate that signed the server's certificate.
    #[arg(long, env = "RECVAULT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --client-key).
    #[arg(long, env = "RECVAULT_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, env = "RECVAULT_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ServerArg {
    /// The token to send: given, from a file, or (for a server on this
    /// host) the bootstrap admin token in the local data directory.
    fn bearer(&self) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
        if let Some(t) = &self.token {
            return Ok(Some(zeroize::Zeroizing::new(t.trim().to_owned())));
        }
        if let Some(path) = &self.token_file {
            let t = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            return Ok(Some(zeroize::Zeroizing::new(t.trim().to_owned())));
        }
        let local = self.server.contains("://127.0.0.1") || self.server.contains("://localhost");
        if local {
            let dir = std::env::var_os("RECVAULT_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_DATA_DIR));
            if let Ok(t) = std::fs::read_to_string(dir.join(crate::auth::ADMIN_TOKEN_FILE)) {
                return Ok(Some(zeroize::Zeroizing::new(t.trim().to_owned())));
            }
        }
        Ok(None)
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerAuth {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let value = match token {
            None => None,
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<_> = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the token contains characters a token never has"))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Self(value))
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A client of the service, sending the caller's credentials.
pub type Client = RecvaultClient<tonic::service::interceptor::InterceptedService<Channel, BearerAuth>>;

#[derive(Debug, Args)]
pub struct PutArgs {
    pub file: PathBuf,
    /// Customer id from your CRM (1–128 of A-Z a-z 0-9 . _ : -).
    #[arg(long)]
    pub customer: String,
    /// call-recording | chat-transcript | image
    #[arg(long, value_parser = parse_kind)]
    pub kind: ContentKind,
    /// MIME type; guessed from the content when omitted.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Interaction (call/chat) id this item belongs to.
    #[arg(long)]
    pub interaction: Option<String>,
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub channel: Option<String>,
    /// inbound | outbound | internal
    #[arg(long, value_parser = parse_direction)]
    pub direction: Option<Direction>,
    /// Free tag, repeatable: --tag k=v
    #[arg(long = "tag", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Upload id to resume or retry an earlier put (default: a new one).
    #[arg(long)]
    pub upload_id: Option<String>,
    /// A time span of the recording coaches must not hear, START-END in
    /// milliseconds (repeatable), e.g. a card number read out.
    #[arg(long = "sensitive", value_parser = parse_span)]
    pub sensitive: Vec<pb::TimeSpan>,
    /// How long the interaction lasted (e.g. 4m32s), as the platform
    /// measured it; searchable with --min-duration/--max-duration.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub object_id: String,
    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Inclusive byte range START-END (END optional), as in HTTP.
    #[arg(long, value_parser = parse_range)]
    pub range: Option<(u64, Option<u64>)>,
    /// Why you read it (checked against your roles and recorded in the
    /// audit trail): coaching, quality-review, legal or data-subject-request.
    #[arg(long, value_parser = parse_purpose)]
    pub purpose: crate::model::Purpose,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct StatArgs {
    pub object_id: String,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[arg(long)]
    pub customer: Option<String>,
    #[arg(long)]
    pub interaction: Option<String>,
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<ContentKind>,
    #[command(flatten)]
    pub server: ServerArg,
}

/// `recvault shred --customer C --reason R` requests a shred; the
/// subcommands act on a pending one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ShredCmd {
    #[command(subcommand)]
    pub action: Option<ShredAction>,
    #[arg(long, required = true)]
    pub customer: Option<String>,
    /// Why (ticket, erasure request); kept in the certificate.
    #[arg(long, required = true)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub actor: ActorArg,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Subcommand)]
pub enum ShredAction {
    /// Approve a pending shred (two-person rule: not the requester).
    Approve(CustomerActorArgs),
    /// Cancel a pending shred before its keys are destroyed.
    Cancel(CustomerArgs),
    /// Show a customer's shred state.
    Status(CustomerArgs),
}

#[derive(Debug, Args)]
pub struct ActorArg {
    /// Who is acting (recorded; default: $USER).
    #[arg(long = "by", env = "RECVAULT_ACTOR")]
    pub by: Option<String>,
}

impl ActorArg {
    fn name(&self) -> anyhow::Result<String> {
        // The server records the authenticated principal; this name is
        // only a hint for older servers.
        Ok(self.by.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_default())
    }
}

#[derive(Debug, Args)]
pub struct CustomerArgs {
    #[arg(long)]
    pub customer: String,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Args)]
pub struct CustomerActorArgs {
    #[arg(long)]
    pub customer: String,
    #[command(flatten)]
    pub actor: ActorArg,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Subcommand)]
pub enum HoldCmd {
    /// Place a legal hold on a customer (or one interaction of it).
    Place {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        interaction: Option<String>,
        /// Case or ticket reference.
        #[arg(long = "case")]
        case_ref: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        actor: ActorArg,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Release a hold by id.
    Release {
        hold_id: String,
        #[command(flatten)]
        actor: ActorArg,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List holds in force (with --all, released ones too).
    Ls {
        #[arg(long)]
        customer: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCmd {
    /// Run one retention sweep now and print its counts.
    Run {
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the retention policies.
    Policies {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Add or replace a policy (not one defined in the config file).
    Set {
        name: String,
        #[arg(long, value_parser = parse_kind)]
        kind: ContentKind,
        /// How long after commit, e.g. 90days, 2years.
        #[arg(long, value_parser = humantime::parse_duration)]
        retain: std::time::Duration,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        channel: Option<String>,
        /// Only objects with this tag: key=value
        #[arg(long, value_parser = parse_tag)]
        tag: Option<(String, String)>,
        /// Recompute the expiry of existing objects too.
        #[arg(long)]
        reapply: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a policy (not one defined in the config file).
    Rm {
        name: String,
        #[arg(long)]
        reapply: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertificateCmd {
    /// Fetch a shredded customer's signed certificate.
    Get {
        #[arg(long)]
        customer: String,
        /// Write to FILE instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Verify a certificate offline against the service's public key.
    Verify {
        file: PathBuf,
        /// The service's signing.pub [default: DATA_DIR/signing.pub].
        #[arg(long)]
        public_key: Option<PathBuf>,
        #[arg(long, env = "RECVAULT_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// The newest records.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Print JSON lines instead of columns.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Records matching filters, newest first.
    Search {
        #[arg(long)]
        customer: Option<String>,
        /// An action (object.read) or a prefix ending in a dot (shred.).
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        /// RFC 3339 time, e.g. 2026-11-01T00:00:00Z.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        until: Option<std::time::SystemTime>,
        #[arg(short = 'n', long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Walk the whole hash chain and check every signed checkpoint,
    /// offline; names the first broken record.
    Verify {
        /// The service's signing.pub [default: DATA_DIR/signing.pub].
        #[arg(long)]
        public_key: Option<PathBuf>,
        #[arg(long, env = "RECVAULT_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

fn parse_purpose(s: &str) -> Result<crate::model::Purpose, String> {
    crate::model::Purpose::from_name(s)
        .ok_or_else(|| format!("unknown purpose {s:?}: use coaching, quality-review, legal or data-subject-request"))
}

fn parse_span(s: &str) -> Result<pb::TimeSpan, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("span {s:?}: write START-END in milliseconds"))?;
    let num = |v: &str| v.trim().parse::<u64>().map_err(|_| format!("span {s:?}: {v:?} is not a number of ms"));
    let (start_ms, end_ms) = (num(a)?, num(b)?);
    if end_ms <= start_ms {
        return Err(format!("span {s:?}: the end must be after the start"));
    }
    Ok(pb::TimeSpan { start_ms, end_ms })
}

fn parse_role(s: &str) -> Result<crate::model::Role, String> {
    crate::model::Role::from_name(s)
        .ok_or_else(|| format!("unknown role {s:?}: use ingest, coach, retention, admin or auditor"))
}

fn role_name(code: i32) -> &'static str {
    match pb::Role::try_from(code) {
        Ok(pb::Role::Ingest) => "ingest",
        Ok(pb::Role::Coach) => "coach",
        Ok(pb::Role::Retention) => "retention",
        Ok(pb::Role::Admin) => "admin",
        Ok(pb::Role::Auditor) => "auditor",
        _ => "?",
    }
}

fn print_token(t: &pb::TokenInfo) {
    let mut roles: Vec<&str> = t.roles.iter().map(|r| role_name(*r)).collect();
    if t.unredacted {
        roles.push("unredacted");
    }
    let state = if t.revoked_at.is_some() {
        format!("revoked {}", format_time(&t.revoked_at))
    } else if t.expires_at.is_some() {
        format!("expires {}", format_time(&t.expires_at))
    } else {
        "active".into()
    };
    println!("{}  {:<20} {:<30} {}", t.token_id, t.name, roles.join(","), state);
}

async fn token(c: TokenCmd) -> anyhow::Result<()> {
    match c {
        TokenCmd::Create { name, roles, unredacted, ttl, server } => {
            let roles = roles.into_iter().map(crate::api::role_code).collect();
            let r = connect(&server)
                .await?
                .create_token(pb::CreateTokenRequest {
                    name,
                    roles,
                    unredacted,
                    ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            // The token alone on stdout (for `export RECVAULT_TOKEN=$(...)`);
            // its id on stderr, for revoking it later.
            println!("{}", r.token);
            if let Some(info) = &r.info {
                eprintln!("token id {} for {} (shown once; keep it secret)", info.token_id, info.name);
            }
        }
        TokenCmd::Revoke { token_id, server } => {
            let t = connect(&server)
                .await?
                .revoke_token(pb::RevokeTokenRequest { token_id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_token(&t);
        }
        TokenCmd::Ls { server } => {
            let r = connect(&server).await?.list_tokens(pb::ListTokensRequest {}).await.map_err(status_error)?;
            for t in &r.get_ref().tokens {
                print_token(t);
            }
        }
    }
    Ok(())
}

async fn keys(c: KeysCmd) -> anyhow::Result<()> {
    use crate::keys::rotate;
    let print_status = |status: &[rotate::VersionStatus]| {
        for v in status {
            let version = v.version.map_or_else(|| "missing".to_owned(), |n| format!("v{n}"));
            let active = if v.active { "active" } else { "" };
            let location = v.location.as_deref().unwrap_or("not present: restore it before retiring anything");
            println!("{version:<8} {active:<6} {:>8} customer key(s)  {}  {location}", v.customer_keys, v.key_id);
        }
    };
    let err = |e: crate::keys::KeyError| anyhow::anyhow!("{e}");
    match c {
        KeysCmd::Status(local) => {
            let cfg = local.load()?;
            let ring = crate::server::open_root_keys(&cfg).await?;
            let catalog = crate::server::open_catalog(&cfg).await?;
            print_status(&rotate::status(&ring, catalog.as_ref()).await.map_err(err)?);
        }
        KeysCmd::RotateRoot { batch_size, local } => {
            if batch_size == 0 {
                bail!("--batch-size must be at least 1");
            }
            let cfg = local.load()?;
            let mut ring = crate::server::open_root_keys(&cfg).await?;
            let catalog = crate::server::open_catalog(&cfg).await?;
            // Re-wrapping every customer key is audited like the server's
            // own key events: first (no record, no rotation), then its outcome.
            let (audit, actor) = local_audit(&cfg)?;
            let event = crate::audit::Event::new("key.rotate_root").detail("batch_size", batch_size);
            audit.append(&actor, event.clone()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let rotated = rotate::rotate_root(&mut ring, catalog.as_ref(), batch_size, |r| {
                // One line per batch, flushed: operators (and the crash
                // test) see how far an interrupted run got.
                println!("batch done: {} re-wrapped, {} skipped so far", r.rewrapped, r.skipped);
                std::io::stdout().flush().ok();
            })
            .await;
            let outcome = match &rotated {
                Ok(r) => event
                    .detail("active_key_id", &r.active_key_id)
                    .detail("rewrapped", r.rewrapped)
                    .detail("skipped", r.skipped)
                    .detail("retired", r.retired.iter().map(|(v, _)| *v).collect::<Vec<_>>()),
                Err(e) => event.result(format!("failed: {e}")),
            };
            // Best effort: the keys are re-wrapped whether or not this lands.
            if let Err(e) = audit.append(&actor, outcome).await {
                eprintln!("warning: the rotation's outcome could not be added to the audit trail: {e}");
            }
            let report = rotated.map_err(err)?;
            let how = if report.created { "new version" } else { "finished an interrupted rotation" };
            println!(
                "rotated to root key {} ({how}): {} customer key(s) re-wrapped, {} skipped (shredded or re-wrapped \
                 meanwhile)",
                report.active_key_id, report.rewrapped, report.skipped
            );
            for (version, id) in &report.retired {
                println!("retired v{version} {id}: no customer key depends on it");
            }
            let status = rotate::status(&ring, catalog.as_ref()).await.map_err(err)?;
            print_status(&status);
            let left: u64 = status.iter().filter(|v| !v.active).map(|v| v.customer_keys).sum();
            if left > 0 {
                bail!("{left} customer key(s) are still under an older root key version; run rotate-root again");
            }
        }
    }
    Ok(())
}

/// The audit trail of the data directory, for the offline `keys` commands,
/// and who runs them: `local:<user>`, an operator at the host.
fn local_audit(cfg: &Config) -> anyhow::Result<(crate::audit::AuditLog, crate::audit::Actor)> {
    use crate::retention::certificate::SigningKey;
    let data = &cfg.data_dir;
    let signer = std::sync::Arc::new(
        SigningKey::open_or_create(&SigningKey::default_path(data)).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let clock: std::sync::Arc<dyn crate::clock::Clock> = std::sync::Arc::new(crate::clock::SystemClock);
    let audit = crate::audit::AuditLog::open(&data.join("audit.sqlite"), signer, clock)
        .map_err(|e| anyhow::anyhow!("cannot open the audit trail: {e}"))?;
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "unknown".into());
    Ok((audit, crate::audit::Actor::new(&format!("local:{user}"), None)))
}

async fn whoami(server: ServerArg) -> anyhow::Result<()> {
    let r = connect(&server).await?.who_am_i(pb::WhoAmIRequest {}).await.map_err(status_error)?.into_inner();
    let mut roles: Vec<&str> = r.roles.iter().map(|c| role_name(*c)).collect();
    if r.unredacted {
        roles.push("unredacted");
    }
    println!("principal: {}", r.principal);
    println!("credential: {}", r.credential);
    println!("roles: {}", roles.join(", "));
    println!("may call: {}", r.allowed_rpcs.join(", "));
    Ok(())
}

fn parse_kind(s: &str) -> Result<ContentKind, String> {
    ContentKind::from_name(s).ok_or_else(|| format!("unknown kind {s:?}: use call-recording, chat-transcript or image"))
}

fn parse_direction(s: &str) -> Result<Direction, String> {
    match s {
        "inbound" => Ok(Direction::Inbound),
        "outbound" => Ok(Direction::Outbound),
        "internal" => Ok(Direction::Internal),
        _ => Err(format!("unknown direction {s:?}: use inbound, outbound or internal")),
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("tag {s:?} must look like key=value"))
}

/// `START-END` or `START-` (inclusive end).
pub fn parse_range(s: &str) -> Result<(u64, Option<u64>), String> {
    let bad = || format!("range {s:?} must look like START-END or START- (inclusive byte offsets)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start = a.parse().map_err(|_| bad())?;
    let end = if b.is_empty() { None } else { Some(b.parse().map_err(|_| bad())?) };
    if end.is_some_and(|e| e < start) {
        return Err(format!("range {s:?} ends before it starts"));
    }
    Ok((start, end))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a.resolve()?.config).await,
        Command::Config(ConfigCmd::Check { serve, skip_files }) => config_check(&serve, skip_files),
        Command::Put(a) => put(a).await,
        Command::Get(a) => get(a).await,
        Command::Stat(a) => stat(a).await,
        Command::Ls(a) => ls(a).await,
        Command::Shred(a) => shred(a).await,
        Command::Hold(c) => hold(c).await,
        Command::Retention(c) => retention(c).await,
        Command::Certificate(c) => certificate(c).await,
        Command::Audit(c) => audit(c).await,
        Command::Consent(c) => consent(c).await,
        Command::Token(c) => token(c).await,
        Command::Keys(c) => keys(c).await,
        Command::Search { filter, limit, server } => {
            let r = connect(&server)
                .await?
                .search(pb::SearchRequest { filter: Some(filter.to_pb()), page_size: limit, page_token: String::new() })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            for o in &r.objects {
                print_object(&mut out, "", o)?;
            }
            eprintln!("{} shown of {} matching", r.objects.len(), r.total);
            Ok(())
        }
        Command::Link { object_id, purpose, ttl, server } => {
            let ttl_seconds = match ttl {
                None => 0,
                Some(t) if t.as_secs() == 0 => anyhow::bail!("--ttl must be at least 1s"),
                Some(t) => u32::try_from(t.as_secs()).context("--ttl is too long")?,
            };
            let link = connect(&server)
                .await?
                .create_playback_link(pb::CreatePlaybackLinkRequest {
                    object_id,
                    purpose: crate::api::purpose_code(purpose),
                    ttl_seconds,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", link.url);
            if let Some(at) = &link.expires_at {
                eprintln!("valid until {}", crate::model::format_ms(at.seconds * 1000));
            }
            Ok(())
        }
        Command::Sample { filter, count, per_agent, per_queue, seed, server } => {
            let (stratify, count, per_stratum) = match (count, per_agent, per_queue) {
                (_, Some(k), _) => (pb::Stratify::PerAgent, 0, k),
                (_, _, Some(k)) => (pb::Stratify::PerQueue, 0, k),
                (n, None, None) => (pb::Stratify::None, n.unwrap_or(10), 0),
            };
            let r = connect(&server)
                .await?
                .sample(pb::SampleRequest {
                    filter: Some(filter.to_pb()),
                    count,
                    stratify: stratify as i32,
                    per_stratum,
                    seed,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            for g in &r.groups {
                let stratum = if g.stratum.is_empty() { String::new() } else { format!("  [{}]", g.stratum) };
                writeln!(out, "interaction {}{stratum}", g.interaction_id)?;
                for o in &g.objects {
                    print_object(&mut out, "  ", o)?;
                }
            }
            eprintln!("{} interactions drawn from {} (seed {seed})", r.groups.len(), r.population);
            Ok(())
        }
        Command::MarkSensitive { object_id, spans, server } => {
            let info = connect(&server)
                .await?
                .mark_sensitive(pb::MarkSensitiveRequest { object_id, spans })
                .await
                .map_err(status_error)?
                .into_inner();
            for s in &info.sensitive_spans {
                println!("{}-{}", s.start_ms, s.end_ms);
            }
            Ok(())
        }
        Command::Whoami(s) => whoami(s).await,
        Command::Loadgen(c) => crate::loadgen::run(c).await,
    }
}

/// `recvault config check`: the same resolution and file checks as
/// `serve`, then the effective configuration on stdout.
fn config_check(a: &ServeArgs, skip_files: bool) -> anyhow::Result<()> {
    let loaded = a.resolve()?;
    if !skip_files {
        loaded.config.check_files()?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "# recvault effective configuration (secrets redacted)")?;
    match &a.config {
        Some(p) => writeln!(out, "# file: {}", p.display())?,
        None => writeln!(out, "# file: none (embedded defaults)")?,
    }
    for name in &loaded.env_keys {
        writeln!(out, "# env: {name}")?;
    }
    out.write_all(loaded.config.redacted_toml()?.as_bytes())?;
    let files = if skip_files { "files not checked (--skip-files)" } else { "files checked" };
    eprintln!("config ok ({files})");
    Ok(())
}

/// Runs the server on a resolved configuration.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    // The same checks `config check` makes, before anything is opened.
    cfg.check_files()?;
    let (parts, listener) = crate::server::bind(&cfg).await?;
    let addr = listener.local_addr()?;
    let page = match &parts.http {
        Some(http) => {
            let base = crate::web::base_url(cfg.http.public_url.as_deref(), http.local_addr()?, cfg.tls.is_some());
            format!("; coaching page {base}/")
        }
        None => String::new(),
    };
    // One machine-readable line on stdout: scripts and tests wait for it
    // (the gRPC address is its fourth word).
    println!("recvault serving on {addr} (data in {}){page}", cfg.data_dir.display());
    std::io::stdout().flush().ok();
    if cfg.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plain TCP beyond loopback (allow_plaintext): tokens cross the network in clear");
    }
    crate::server::serve(&cfg, parts, listener, crate::server::shutdown_signal()).await
}

async fn connect(server: &ServerArg) -> anyhow::Result<Client> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.server.clone())
        .with_context(|| format!("invalid --server URL {:?}", server.server))?
        .connect_timeout(Duration::from_secs(5))
        .http2_adaptive_window(true);
    if server.server.starts_with("https://") || server.ca_cert.is_some() || server.client_cert.is_some() {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &server.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca-cert {}", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&server.client_cert, &server.client_key) {
            let cert = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let key =
                zeroize::Zeroizing::new(std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?);
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key.as_slice()));
        }
        endpoint = endpoint.tls_config(tls).context("invalid TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach recvault at {}: {}", server.server, root_cause(&e)))?;
    let token = server.bearer()?;
    let auth = BearerAuth::new(token.as_deref().map(String::as_str))?;
    Ok(RecvaultClient::with_interceptor(channel, auth)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A gRPC status as one line.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(s.code()), s.message())
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::OutOfRange => "out of range",
        Code::DataLoss => "data loss",
        Code::Unavailable => "unavailable",
        Code::Aborted => "aborted",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Internal => "internal",
        Code::PermissionDenied => "permission denied",
        Code::Unauthenticated => "unauthenticated",
        _ => "error",
    }
}

fn guess_type(kind: ContentKind, path: &Path) -> anyhow::Result<String> {
    let mut head = vec![0u8; 4096];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = f.read(&mut head)?;
    head.truncate(n);
    if let Some(t) = sniff::guess_content_type(kind, &head) {
        return Ok(t.to_owned());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let by_ext = match (kind, ext.as_str()) {
        (ContentKind::ChatTranscript, "txt" | "log" | "") => Some("text/plain; charset=utf-8"),
        (ContentKind::ChatTranscript, "json") => Some("application/json"),
        (ContentKind::CallRecording, "ul" | "ulaw" | "pcmu") => Some("audio/pcmu"),
        (ContentKind::CallRecording, "al" | "alaw" | "pcma") => Some("audio/pcma"),
        _ => None,
    };
    by_ext
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("cannot tell the content type of {}; pass --content-type", path.display()))
}

fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().try_into().expect("32 bytes"))
}

async fn put(a: PutArgs) -> anyhow::Result<()> {
    let content_type = match &a.content_type {
        Some(t) => t.clone(),
        None => guess_type(a.kind, &a.file)?,
    };
    let size = std::fs::metadata(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?.len();
    let sha = sha256_file(&a.file)?;
    let upload_id = match &a.upload_id {
        Some(u) => crate::model::UploadId::parse_client(u).map_err(|e| anyhow::anyhow!("--upload-id: {e}"))?,
        None => crate::model::UploadId::new_random(),
    };
    let spec = pb::ObjectSpec {
        customer_id: a.customer.clone(),
        kind: i32::from(a.kind.code()),
        content_type,
        interaction: Some(pb::Interaction {
            interaction_id: a.interaction.clone().unwrap_or_default(),
            channel: a.channel.clone().unwrap_or_default(),
            agent_id: a.agent.clone().unwrap_or_default(),
            queue: a.queue.clone().unwrap_or_default(),
            direction: i32::from(a.direction.unwrap_or_default().code()),
            started_at: None,
            tags: a.tags.iter().cloned().collect(),
            duration_ms: a.duration.map_or(0, |d| d.as_millis() as u64),
        }),
        sensitive_spans: a.sensitive.clone(),
    };
    let bar = if std::io::stderr().is_terminal() && size >= 8 << 20 {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut client = connect(&a.server).await?;
    // A dropped stream is resumed from the server's durable offset.
    let mut attempts = 0;
    let info = loop {
        match ingest_file(&mut client, &a.file, upload_id, &spec, size, sha, &bar).await {
            Ok(info) => break info,
            Err(IngestFailure::Status(s))
                if matches!(s.code(), Code::Unavailable | Code::Aborted | Code::Unknown | Code::DeadlineExceeded)
                    && attempts < 5 =>
            {
                attempts += 1;
                tracing::warn!(attempt = attempts, status = %s.message(), "stream dropped; resuming");
                tokio::time::sleep(Duration::from_millis(200 << attempts)).await;
                client = connect(&a.server).await?;
            }
            Err(IngestFailure::Status(s)) => return Err(status_error(s)),
            Err(IngestFailure::Local(e)) => return Err(e),
        }
    };
    bar.finish_and_clear();
    if info.sha256[..] != sha {
        bail!("the server committed content with a different SHA-256; the file may have changed while uploading");
    }
    println!("{}", info.object_id);
    Ok(())
}

enum IngestFailure {
    Status(tonic::Status),
    Local(anyhow::Error),
}

impl From<tonic::Status> for IngestFailure {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

/// One ingest stream: open, send from the durable offset, finish.
async fn ingest_file(
    client: &mut Client,
    path: &Path,
    upload_id: crate::model::UploadId,
    spec: &pb::ObjectSpec,
    size: u64,
    sha: [u8; 32],
    bar: &indicatif::ProgressBar,
) -> Result<pb::ObjectInfo, IngestFailure> {
    use pb::ingest_request::{Data, Finish, Msg, Open};
    use pb::ingest_response::Msg as Resp;
    let (tx, rx) = mpsc::channel::<pb::IngestRequest>(8);
    let open =
        pb::IngestRequest { msg: Some(Msg::Open(Open { upload_id: upload_id.to_string(), spec: Some(spec.clone()) })) };
    tx.send(open).await.map_err(|_| IngestFailure::Local(anyhow::anyhow!("request stream closed")))?;
    let mut responses = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    let (durable, committed) = match responses.next().await {
        Some(Ok(pb::IngestResponse { msg: Some(Resp::Opened(o)) })) => (o.durable_offset, o.committed),
        Some(Err(s)) => return Err(s.into()),
        _ => return Err(IngestFailure::Local(anyhow::anyhow!("the server did not answer the open"))),
    };
    bar.set_position(durable);
    let path = path.to_owned();
    let sender = tokio::spawn(async move {
        let finish = pb::IngestRequest {
            msg: Some(Msg::Finish(Finish { expected_sha256: Bytes::copy_from_slice(&sha), expected_size: size })),
        };
        if committed {
            let _ = tx.send(finish).await;
            return Ok(());
        }
        let mut file = tokio::fs::File::open(&path).await?;
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        file.seek(std::io::SeekFrom::Start(durable)).await?;
        let mut offset = durable;
        loop {
            let mut buf = vec![0u8; crate::api::MAX_CHUNK];
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            let msg = pb::IngestRequest { msg: Some(Msg::Data(Data { offset, data: Bytes::from(buf) })) };
            offset += filled as u64;
            if tx.send(msg).await.is_err() {
                return Ok(());
            }
        }
        let _ = tx.send(finish).await;
        Ok::<(), std::io::Error>(())
    });
    let mut result =
        Err(IngestFailure::Status(tonic::Status::unavailable("the stream ended before the object was committed")));
    while let Some(msg) = responses.next().await {
        match msg {
            Ok(pb::IngestResponse { msg: Some(Resp::Ack(a)) }) => bar.set_position(a.durable_offset),
            Ok(pb::IngestResponse { msg: Some(Resp::Committed(info)) }) => {
                result = Ok(info);
                break;
            }
            Ok(_) => {}
            Err(s) => {
                result = Err(s.into());
                break;
            }
        }
    }
    sender.abort();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_millis(10), sender).await {
        return Err(IngestFailure::Local(anyhow::anyhow!("reading {}: {e}", "the file")));
    }
    result
}

async fn get(a: GetArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.server).await?;
    let req = pb::GetRequest {
        object_id: a.object_id.clone(),
        range: a.range.map(|(start, end)| pb::ByteRange { start, end }),
        purpose: crate::api::purpose_code(a.purpose),
    };
    let mut stream = client.get(req).await.map_err(status_error)?.into_inner();
    let (mut out, tmp): (Box<dyn Write>, Option<PathBuf>) = match &a.output {
        Some(path) => {
            let tmp = partial_path(path);
            let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            (Box::new(std::io::BufWriter::new(f)), Some(tmp))
        }
        None => (Box::new(std::io::BufWriter::new(std::io::stdout().lock())), None),
    };
    let result = async {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut expected = None;
        let mut written = 0u64;
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(status_error)?;
            if let Some(info) = msg.info {
                expected = Some(info);
            }
            hash.update(&msg.data);
            written += msg.data.len() as u64;
            out.write_all(&msg.data)?;
        }
        out.flush()?;
        // A whole-object read is checked end to end against the SHA-256
        // recorded at ingest.
        if a.range.is_none()
            && let Some(info) = expected
            && (info.size != written || hash.finish().as_ref() != &info.sha256[..])
        {
            bail!("the content read does not match its recorded SHA-256; not trusting it");
        }
        Ok(())
    }
    .await;
    drop(out);
    match (result, tmp, &a.output) {
        (Ok(()), Some(tmp), Some(path)) => {
            std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(())
        }
        (Ok(()), _, _) => Ok(()),
        (Err(e), tmp, _) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            Err(e)
        }
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

fn kind_name(code: i32) -> &'static str {
    u8::try_from(code).ok().and_then(ContentKind::from_code).map(ContentKind::name).unwrap_or("unknown")
}

fn format_time(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|t| {
            let d = Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
            Some(humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + d).to_string())
        })
        .unwrap_or_default()
}

fn direction_name(code: i32) -> &'static str {
    match Direction::from_code(u8::try_from(code).unwrap_or(0)) {
        Direction::Unspecified => "",
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
        Direction::Internal => "internal",
    }
}

async fn stat(a: StatArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.server).await?;
    let info =
        client.stat(pb::StatRequest { object_id: a.object_id.clone() }).await.map_err(status_error)?.into_inner();
    let i = info.interaction.clone().unwrap_or_default();
    let fields: Vec<(&str, String)> = vec![
        ("object_id", info.object_id.clone()),
        ("customer_id", info.customer_id.clone()),
        ("kind", kind_name(info.kind).to_owned()),
        ("content_type", info.content_type.clone()),
        ("size", info.size.to_string()),
        ("sha256", hex::encode(&info.sha256)),
        ("created_at", format_time(&info.created_at)),
        (
            "expires_at",
            if info.expires_at.is_some() { format_time(&info.expires_at) } else { "never (no policy)".into() },
        ),
        ("retention", info.retention_policy.clone()),
        ("derived_from", info.derived_from.clone()),
        ("upload_id", info.upload_id.clone()),
        ("interaction_id", i.interaction_id.clone()),
        ("channel", i.channel.clone()),
        ("agent_id", i.agent_id.clone()),
        ("queue", i.queue.clone()),
        ("direction", direction_name(i.direction).to_owned()),
        ("started_at", format_time(&i.started_at)),
        (
            "duration",
            if i.duration_ms == 0 {
                String::new()
            } else {
                humantime::format_duration(Duration::from_millis(i.duration_ms)).to_string()
            },
        ),
    ];
    if a.json {
        let mut map: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), serde_json::Value::String(v))).collect();
        map.insert("size".into(), serde_json::json!(info.size));
        map.insert("tags".into(), serde_json::json!(i.tags));
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (k, v) in fields {
            if !v.is_empty() {
                println!("{k:15} {v}");
            }
        }
        for (k, v) in &i.tags {
            println!("{:15} {k}={v}", "tag");
        }
    }
    Ok(())
}

async fn ls(a: LsArgs) -> anyhow::Result<()> {
    if a.customer.is_none() && a.interaction.is_none() {
        bail!("say whose objects to list: --customer ID or --interaction ID");
    }
    let mut client = connect(&a.server).await?;
    let mut token = String::new();
    loop {
        let page = client
            .list(pb::ListRequest {
                customer_id: a.customer.clone().unwrap_or_default(),
                interaction_id: a.interaction.clone().unwrap_or_default(),
                kind: a.kind.map(|k| i32::from(k.code())).unwrap_or(0),
                created_after: None,
                created_before: None,
                page_size: 500,
                page_token: token.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut out = std::io::stdout().lock();
        for o in &page.objects {
            writeln!(
                out,
                "{}  {:15}  {:>12}  {}  {}  {}",
                o.object_id,
                kind_name(o.kind),
                o.size,
                format_time(&o.created_at),
                o.content_type,
                o.interaction.as_ref().map(|i| i.interaction_id.as_str()).unwrap_or("")
            )?;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    Ok(())
}

async fn shred(a: ShredCmd) -> anyhow::Result<()> {
    let status = match a.action {
        None => {
            let (Some(customer_id), Some(reason)) = (a.customer, a.reason) else {
                bail!("say whom to shred and why: --customer ID --reason TEXT");
            };
            let requested_by = a.actor.name()?;
            let mut client = connect(&a.server).await?;
            client.shred_customer(pb::ShredCustomerRequest { customer_id, reason, requested_by }).await
        }
        Some(ShredAction::Approve(c)) => {
            let approver = c.actor.name()?;
            let mut client = connect(&c.server).await?;
            client.approve_shred(pb::ApproveShredRequest { customer_id: c.customer, approver }).await
        }
        Some(ShredAction::Cancel(c)) => {
            let mut client = connect(&c.server).await?;
            client.cancel_shred(pb::CancelShredRequest { customer_id: c.customer }).await
        }
        Some(ShredAction::Status(c)) => {
            let mut client = connect(&c.server).await?;
            client.get_shred_status(pb::GetShredStatusRequest { customer_id: c.customer }).await
        }
    };
    print_shred_status(&status.map_err(status_error)?.into_inner());
    Ok(())
}

fn print_shred_status(r: &pb::ShredStatus) {
    let state = pb::CustomerState::try_from(r.state).unwrap_or(pb::CustomerState::Unspecified);
    match state {
        pb::CustomerState::Shredded => println!(
            "shredded customer {}: {} key version(s) destroyed, {} object(s) and {} unfinished upload(s) made \
             unrecoverable at {}; certificate: recvault certificate get --customer {}",
            r.customer_id,
            r.key_versions_destroyed,
            r.objects_shredded,
            r.uploads_discarded,
            format_time(&r.destroyed_at),
            r.customer_id
        ),
        pb::CustomerState::PendingShred => {
            println!(
                "customer {} is pending shred (requested by {} at {}): content is locked; keys are destroyed after {}",
                r.customer_id,
                r.requested_by,
                format_time(&r.requested_at),
                format_time(&r.destroy_after)
            );
            if r.requires_approval && r.approved_by.is_empty() {
                println!(
                    "waiting for approval by someone other than {}: recvault shred approve --customer {}",
                    r.requested_by, r.customer_id
                );
            }
            for h in &r.blocking_holds {
                println!("blocked by legal hold {} (case {}): {}", h.hold_id, h.case_ref, h.reason);
            }
            println!("to cancel: recvault shred cancel --customer {}", r.customer_id);
        }
        _ => {
            println!("customer {} is active", r.customer_id);
            for h in &r.blocking_holds {
                println!("under legal hold {} (case {}): {}", h.hold_id, h.case_ref, h.reason);
            }
        }
    }
}

fn print_hold(h: &pb::Hold) {
    let scope = if h.interaction_id.is_empty() { String::new() } else { format!(" interaction {}", h.interaction_id) };
    let released = if h.released_by.is_empty() {
        String::new()
    } else {
        format!("  released by {} at {}", h.released_by, format_time(&h.released_at))
    };
    println!(
        "{}  customer {}{}  case {}  placed by {} at {}  {}{}",
        h.hold_id,
        h.customer_id,
        scope,
        h.case_ref,
        h.placed_by,
        format_time(&h.placed_at),
        h.reason,
        released
    );
}

async fn hold(c: HoldCmd) -> anyhow::Result<()> {
    match c {
        HoldCmd::Place { customer, interaction, case_ref, reason, actor, server } => {
            let placed_by = actor.name()?;
            let h = connect(&server)
                .await?
                .place_hold(pb::PlaceHoldRequest {
                    customer_id: customer,
                    interaction_id: interaction.unwrap_or_default(),
                    case_ref,
                    reason,
                    placed_by,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_hold(&h);
        }
        HoldCmd::Release { hold_id, actor, server } => {
            let released_by = actor.name()?;
            let h = connect(&server)
                .await?
                .release_hold(pb::ReleaseHoldRequest { hold_id, released_by })
                .await
                .map_err(status_error)?
                .into_inner();
            print_hold(&h);
        }
        HoldCmd::Ls { customer, all, server } => {
            let r = connect(&server)
                .await?
                .list_holds(pb::ListHoldsRequest { customer_id: customer.unwrap_or_default(), include_released: all })
                .await
                .map_err(status_error)?
                .into_inner();
            for h in &r.holds {
                print_hold(h);
            }
        }
    }
    Ok(())
}

async fn retention(c: RetentionCmd) -> anyhow::Result<()> {
    match c {
        RetentionCmd::Run { dry_run, server } => {
            let r = connect(&server)
                .await?
                .run_retention(pb::RunRetentionRequest { dry_run })
                .await
                .map_err(status_error)?
                .into_inner();
            let (verb, shreds) = if dry_run { ("would expire", "would complete") } else { ("expired", "completed") };
            println!("{verb} {} object(s); {} kept by legal holds", r.objects_expired, r.objects_held);
            println!("shreds: {shreds} {}, {} still waiting", r.shreds_completed, r.shreds_waiting);
            println!(
                "garbage: {} abandoned upload(s), {} orphaned journal(s){}",
                r.uploads_abandoned,
                r.orphan_journals_removed,
                if dry_run { " would be removed" } else { " removed" }
            );
            if r.leftovers > 0 {
                println!("{} item(s) could not be deleted yet (already unreadable; retried next sweep)", r.leftovers);
            }
        }
        RetentionCmd::Policies { server } => {
            let r = connect(&server)
                .await?
                .list_retention_policies(pb::ListRetentionPoliciesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            for p in &r.policies {
                let mut criteria = Vec::new();
                if !p.queue.is_empty() {
                    criteria.push(format!("queue={}", p.queue));
                }
                if !p.channel.is_empty() {
                    criteria.push(format!("channel={}", p.channel));
                }
                if !p.tag_key.is_empty() {
                    criteria.push(format!("tag {}={}", p.tag_key, p.tag_value));
                }
                println!(
                    "{:20} {:15} {:>12}  {}{}",
                    p.name,
                    kind_name(p.kind),
                    humantime::format_duration(std::time::Duration::from_secs(p.retain_seconds)).to_string(),
                    criteria.join(" "),
                    if p.from_config { "  (config file)" } else { "" }
                );
            }
        }
        RetentionCmd::Set { name, kind, retain, queue, channel, tag, reapply, server } => {
            let (tag_key, tag_value) = tag.unwrap_or_default();
            let policy = pb::RetentionPolicy {
                name: name.clone(),
                kind: i32::from(kind.code()),
                queue: queue.unwrap_or_default(),
                channel: channel.unwrap_or_default(),
                tag_key,
                tag_value,
                retain_seconds: retain.as_secs(),
                from_config: false,
            };
            let r = connect(&server)
                .await?
                .set_retention_policy(pb::SetRetentionPolicyRequest { policy: Some(policy), reapply })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("policy {name} set; {} existing object(s) got a new expiry", r.objects_updated);
        }
        RetentionCmd::Rm { name, reapply, server } => {
            let r = connect(&server)
                .await?
                .delete_retention_policy(pb::DeleteRetentionPolicyRequest { name: name.clone(), reapply })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("policy {name} deleted; {} existing object(s) got a new expiry", r.objects_updated);
        }
    }
    Ok(())
}

async fn certificate(c: CertificateCmd) -> anyhow::Result<()> {
    match c {
        CertificateCmd::Get { customer, output, server } => {
            let r = connect(&server)
                .await?
                .get_shred_certificate(pb::GetShredStatusRequest { customer_id: customer })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Some(path) => {
                    std::fs::write(&path, format!("{}\n", r.certificate_json))
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                    eprintln!("certificate written to {} (signed by {})", path.display(), r.signing_key_id);
                }
                None => println!("{}", r.certificate_json),
            }
        }
        CertificateCmd::Verify { file, public_key, data_dir } => {
            use crate::retention::certificate;
            let key_path = public_key.unwrap_or_else(|| certificate::SigningKey::public_key_path(&data_dir));
            let key_text = std::fs::read_to_string(&key_path).map_err(|e| {
                anyhow::anyhow!("cannot read the public key {}: {e} (pass --public-key FILE)", key_path.display())
            })?;
            let key = certificate::parse_public_key(&key_text)?;
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let cert = certificate::verify(&text, &key).map_err(|e| anyhow::anyhow!("INVALID: {e}"))?;
            println!(
                "valid: customer {} shredded at {} ({} key version(s), {} object(s), canary check {}), signed by {}",
                cert.customer_id,
                cert.destroyed_at,
                cert.key_versions_destroyed.len(),
                cert.objects_unrecoverable,
                cert.canary.result,
                cert.signing_key_id
            );
        }
    }
    Ok(())
}

async fn consent(c: ConsentCmd) -> anyhow::Result<()> {
    let r = match c {
        ConsentCmd::Set { customer, training_use, by, server } => {
            let training_use = if training_use == "allow" { pb::TrainingUse::Allow } else { pb::TrainingUse::Deny };
            connect(&server)
                .await?
                .set_consent(pb::SetConsentRequest {
                    customer_id: customer,
                    training_use: training_use as i32,
                    updated_by: by.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "cli".into()),
                })
                .await
        }
        ConsentCmd::Show { customer, server } => {
            connect(&server).await?.get_consent(pb::GetConsentRequest { customer_id: customer }).await
        }
    }
    .map_err(status_error)?
    .into_inner();
    let use_ = if r.training_use == pb::TrainingUse::Deny as i32 { "deny" } else { "allow" };
    let at = r.updated_at.map(|t| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t.seconds.max(0) as u64))
            .to_string()
    });
    println!(
        "customer {}: training use {use_} (set by {}{})",
        r.customer_id,
        r.updated_by,
        at.map(|a| format!(" at {a}")).unwrap_or_default()
    );
    Ok(())
}

fn print_audit(records: &[pb::AuditRecord], json: bool) {
    for r in records.iter().rev() {
        let at = r.at.as_ref().map(|t| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH
                    + Duration::from_millis((t.seconds * 1000 + i64::from(t.nanos / 1_000_000)) as u64),
            )
            .to_string()
        });
        if json {
            let v = serde_json::json!({
                "seq": r.seq, "at": at, "principal": r.principal, "action": r.action,
                "customer_id": r.customer_id, "target": r.target, "purpose": r.purpose,
                "result": r.result, "request_id": r.request_id,
                "detail": serde_json::from_str::<serde_json::Value>(&r.detail_json).unwrap_or_default(),
                "hash": r.hash,
            });
            println!("{v}");
        } else {
            let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
            println!(
                "{:>6}  {}  {:<16} {:<22} customer={} target={} purpose={} result={} request={} {}",
                r.seq,
                at.unwrap_or_default(),
                r.action,
                r.principal,
                dash(&r.customer_id),
                dash(&r.target),
                dash(&r.purpose),
                r.result,
                r.request_id,
                r.detail_json
            );
        }
    }
}

async fn audit(c: AuditCmd) -> anyhow::Result<()> {
    let ts = |t: std::time::SystemTime| {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
    };
    match c {
        AuditCmd::Tail { lines, json, server } => {
            let r = connect(&server)
                .await?
                .list_audit_records(pb::ListAuditRecordsRequest { page_size: lines, ..Default::default() })
                .await
                .map_err(status_error)?
                .into_inner();
            print_audit(&r.records, json);
        }
        AuditCmd::Search { customer, action, principal, since, until, limit, json, server } => {
            let mut client = connect(&server).await?;
            let mut req = pb::ListAuditRecordsRequest {
                customer_id: customer.unwrap_or_default(),
                action: action.unwrap_or_default(),
                principal: principal.unwrap_or_default(),
                since: since.map(ts),
                until: until.map(ts),
                before_seq: 0,
                page_size: limit.min(1000),
            };
            let mut all = Vec::new();
            while all.len() < limit as usize {
                let page = client.list_audit_records(req.clone()).await.map_err(status_error)?.into_inner();
                let Some(last) = page.records.last() else { break };
                req.before_seq = last.seq;
                let full = page.records.len() as u32 == req.page_size;
                all.extend(page.records);
                if !full {
                    break;
                }
            }
            all.truncate(limit as usize);
            print_audit(&all, json);
        }
        AuditCmd::Verify { public_key, data_dir } => {
            use crate::retention::certificate;
            let key_path = public_key.unwrap_or_else(|| certificate::SigningKey::public_key_path(&data_dir));
            let key_text = std::fs::read_to_string(&key_path).map_err(|e| {
                anyhow::anyhow!("cannot read the public key {}: {e} (pass --public-key FILE)", key_path.display())
            })?;
            let key = certificate::parse_public_key(&key_text)?;
            let path = data_dir.join("audit.sqlite");
            if !path.exists() {
                anyhow::bail!("no audit trail at {} (pass --data-dir DIR)", path.display());
            }
            let v = crate::audit::verify(&path, &key).map_err(|e| anyhow::anyhow!("BROKEN: {e}"))?;
            println!(
                "intact: {} record(s), head {}, {} signed checkpoint(s); {} record(s) after the last checkpoint",
                v.records, v.head, v.checkpoints, v.unsigned_tail
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_http() {
        assert_eq!(parse_range("0-99"), Ok((0, Some(99))));
        assert_eq!(parse_range("100-"), Ok((100, None)));
        assert!(parse_range("5-4").is_err());
        assert!(parse_range("x-1").is_err());
        assert!(parse_range("12").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
