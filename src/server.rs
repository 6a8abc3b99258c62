//! Wires the service together on embedded defaults and serves gRPC.
//!
//! Start-up order is the security order: open the root key, unseal (the
//! known-answer check) and only then bind the port, so a server with the
//! wrong key file never answers a request.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, MAX_CHUNK, pb};
use crate::audit::{Actor, AuditLog};
use crate::auth::Authenticator;
use crate::catalog::Catalog;
use crate::catalog::Revoked;
use crate::catalog::postgres::PostgresCatalog;
use crate::catalog::sqlite::SqliteCatalog;
use crate::clock::{Clock, SystemClock};
use crate::config::{CatalogBackend, Config};
use crate::ingest::{Ingest, IngestConfig};
use crate::keys::{KeyService, RootKeyring};
use crate::readiness::Readiness;
use crate::retention::certificate::SigningKey;
use crate::retention::policy::Policies;
use crate::retention::{Retention, RetentionConfig, RetentionDeps};
use crate::retrieve::{Retrieve, RetrieveDeps};
use crate::revocation::Revocations;
use crate::store::Store;
use crate::web::{self, link::LinkKey};

/// HTTP/2 frames of 1 MiB nearly halve gRPC CPU per byte on bulk streams
/// (shared/research/perf-limits.md).
const MAX_FRAME: u32 = 1 << 20;
/// A bulk stream's sender may run this far ahead of what the service has
/// taken. With 8 MiB a 1 GiB upload ran at half its speed: the stream
/// stops reading while a flush is written, and the sender then waited for
/// window updates on every flush (BENCHMARKS.md, "the flow-control
/// wait"). The connection window still bounds what one connection can
/// make the server buffer.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// The gRPC port's HTTP/2 settings; also those of the load generator's
/// loopback sink, so that peer measures the same transport.
pub(crate) fn transport() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_frame_size(MAX_FRAME)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

/// The connections accepted on `listener`, with TCP_NODELAY set on each.
/// tonic applies its own `tcp_nodelay` only to a listener it binds itself,
/// not to `serve_with_incoming`; without it an ack (a small write after
/// the previous one) can wait for the peer's delayed ACK, up to 40 ms on
/// Linux.
pub(crate) fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The service's parts, opened and unsealed.
pub struct Parts {
    pub ingest: Arc<Ingest>,
    pub retrieve: Arc<Retrieve>,
    pub retention: Arc<Retention>,
    pub catalog: Arc<dyn Catalog>,
    pub store: Store,
    pub audit: AuditLog,
    pub auth: Arc<Authenticator>,
    pub clock: Arc<dyn Clock>,
    pub revocations: Arc<Revocations>,
    /// Unsealed keys: the readiness probe re-runs their known-answer check.
    pub keys: Arc<KeyService>,
    /// The HTTP port's listener, once bound ([`bind`]); `None` when
    /// `[http]` is disabled.
    pub http: Option<TcpListener>,
}

fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    // Durably: a journal acknowledged inside a directory whose own name
    // was lost in a power cut would be lost with it (threat plan A2).
    crate::store::create_dir_durable(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict data directory {} to its owner", dir.display()))?;
    }
    Ok(())
}

/// Every root key version present in the configured provider (the data
/// directory's key files, or the token), not yet checked.
pub async fn open_root_keys(cfg: &Config) -> anyhow::Result<RootKeyring> {
    match cfg.root_key.pkcs11()? {
        None => RootKeyring::open_file(&cfg.data_dir).map_err(|e| anyhow::anyhow!("{e}")),
        Some(settings) => RootKeyring::open_pkcs11(settings).await.map_err(|e| anyhow::anyhow!("pkcs11 root key: {e}")),
    }
}

/// The configured catalog (SQLite in the data directory, or PostgreSQL).
pub async fn open_catalog(cfg: &Config) -> anyhow::Result<Arc<dyn Catalog>> {
    Ok(match cfg.catalog.backend {
        CatalogBackend::Sqlite => Arc::new(
            SqliteCatalog::open(&cfg.data_dir.join("catalog.sqlite"))
                .map_err(|e| anyhow::anyhow!("cannot open the catalog: {e}"))?,
        ),
        CatalogBackend::Postgres => {
            let url = cfg.catalog.connection_string()?;
            Arc::new(
                PostgresCatalog::connect(&url, &cfg.catalog.schema)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot open the PostgreSQL catalog: {e}"))?,
            )
        }
    })
}

/// Opens storage, catalog and root key under the data directory and
/// unseals. Fails with a message naming what to fix.
pub async fn open(cfg: &Config) -> anyhow::Result<Parts> {
    open_with_clock(cfg, Arc::new(SystemClock)).await
}

/// [`open`] with a given clock (tests move time instead of sleeping).
pub async fn open_with_clock(cfg: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Parts> {
    open_with_store(cfg, clock, |s| s).await
}

/// [`open_with_clock`] with the configured store passed through `wrap`
/// (tests put a fault-injecting backend or a quicker retry policy under
/// the service; docs/FAULTS.md).
pub async fn open_with_store(
    cfg: &Config,
    clock: Arc<dyn Clock>,
    wrap: impl FnOnce(Store) -> Store,
) -> anyhow::Result<Parts> {
    cfg.validate()?;
    let data = &cfg.data_dir;
    ensure_private_dir(data)?;
    // Either provider stays sealed until the known-answer check below passes.
    let ring = open_root_keys(cfg).await?;
    let catalog = open_catalog(cfg).await?;
    let keys = Arc::new(
        KeyService::unseal_ring(ring, catalog.clone()).await.map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?,
    );
    let signer =
        Arc::new(SigningKey::open_or_create(&SigningKey::default_path(data)).map_err(|e| anyhow::anyhow!("{e}"))?);
    let audit = AuditLog::open(&data.join("audit.sqlite"), signer.clone(), clock.clone())
        .map_err(|e| anyhow::anyhow!("cannot open the audit trail: {e}"))?;
    let store = wrap(open_store(cfg).await?);
    let spool_dir = data.join("spool");
    ensure_private_dir(&spool_dir)?;
    let mut icfg = IngestConfig::new(spool_dir.clone());
    icfg.commit_interval = cfg.ingest.commit_interval;
    icfg.commit_bytes = cfg.ingest.commit_bytes;
    icfg.idle_timeout = cfg.ingest.idle_timeout;
    icfg.put_cap = cfg.ingest.put_cap;
    icfg.caps = cfg.ingest.caps;
    icfg.shared_journal = cfg.shared_journal();
    icfg.shared_log = cfg.ingest.sync == crate::config::SyncMode::Log;
    icfg.max_streams = cfg.ingest.max_streams;
    let auth = Arc::new(Authenticator::new(catalog.clone(), cfg.auth.certificates.clone(), clock.clone()));
    auth.bootstrap_admin(data).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let policies = Policies::new(Vec::new());
    let revocations = Arc::new(Revocations::default());
    let ingest =
        Ingest::new(icfg, catalog.clone(), keys.clone(), store.clone(), policies.clone(), clock.clone(), audit.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let retrieve = Arc::new(Retrieve::new(
        RetrieveDeps {
            catalog: catalog.clone(),
            keys: keys.clone(),
            store: store.clone(),
            revocations: revocations.clone(),
            audit: audit.clone(),
            clock: clock.clone(),
            ingest: ingest.clone(),
        },
        cfg.consent.default_training_use == crate::config::TrainingUse::Allow,
    ));
    let r = &cfg.retention;
    let retention = Arc::new(Retention::new(
        RetentionDeps {
            catalog: catalog.clone(),
            store: store.clone(),
            ingest: ingest.clone(),
            keys: keys.clone(),
            spool_dir,
            policies,
            clock: clock.clone(),
            revocations: revocations.clone(),
            signer,
            audit: audit.clone(),
        },
        RetentionConfig {
            shred_grace: r.shred_grace,
            shred_requires_approval: r.shred_requires_approval,
            abandoned_upload_ttl: r.abandoned_upload_ttl,
        },
    ));
    retention
        .sync_config_policies(&r.policies()?)
        .await
        .map_err(|e| anyhow::anyhow!("cannot apply the retention policies: {e}"))?;
    Ok(Parts { ingest, retrieve, retention, catalog, store, audit, auth, clock, revocations, keys, http: None })
}

/// The ciphertext store of the config. An S3 bucket is checked before the
/// port opens: reachable with these credentials, and refusing to overwrite
/// when `write_once = "conditional"` says it will.
async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    match cfg.storage.s3()? {
        None => {
            Store::local(&cfg.data_dir.join("objects")).map_err(|e| anyhow::anyhow!("cannot open object storage: {e}"))
        }
        Some(settings) => {
            let place = match &settings.endpoint {
                Some(endpoint) => format!("bucket {:?} at {endpoint}", settings.bucket),
                None => format!("bucket {:?} in Amazon S3 region {}", settings.bucket, settings.region),
            };
            let store = Store::s3(&settings).map_err(|e| anyhow::anyhow!("storage.backend = \"s3\": {e}"))?;
            store.check().await.map_err(|e| anyhow::anyhow!("cannot use S3 {place}: {e}"))?;
            tracing::info!(bucket = %settings.bucket, write_once = ?settings.write_once, "object storage is an s3 bucket");
            Ok(store)
        }
    }
}

/// Binds the listener (after unsealing) and returns it with the parts.
pub async fn bind(cfg: &Config) -> anyhow::Result<(Parts, TcpListener)> {
    bind_with_clock(cfg, Arc::new(SystemClock)).await
}

pub async fn bind_with_clock(cfg: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<(Parts, TcpListener)> {
    bind_with_store(cfg, clock, |s| s).await
}

/// [`bind_with_clock`] over a wrapped store ([`open_with_store`]).
pub async fn bind_with_store(
    cfg: &Config,
    clock: Arc<dyn Clock>,
    wrap: impl FnOnce(Store) -> Store,
) -> anyhow::Result<(Parts, TcpListener)> {
    let mut parts = open_with_store(cfg, clock, wrap).await?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another server running?)", cfg.listen))?;
    if cfg.http.enabled {
        let http = TcpListener::bind(cfg.http.listen).await.with_context(|| {
            format!("cannot listen on http.listen {} (is another server running?)", cfg.http.listen)
        })?;
        parts.http = Some(http);
    }
    Ok((parts, listener))
}

/// Serves gRPC on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    cfg: &Config,
    parts: Parts,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Room for a full Put (or one data chunk) plus its metadata.
    let max_message = (cfg.ingest.put_cap as usize).max(MAX_CHUNK) + (64 << 10);
    let audit = parts.audit.clone();
    let local_objects = match cfg.storage.backend {
        crate::config::StorageBackend::Local => Some(cfg.data_dir.join("objects")),
        crate::config::StorageBackend::S3 => None,
    };
    let readiness = Arc::new(Readiness::new(
        parts.keys.clone(),
        parts.store.clone(),
        local_objects,
        cfg.health.probe_timeout,
        health.clone(),
    ));
    let sweeper = tokio::spawn(run_sweeper(parts.retention.clone(), cfg.retention.sweep_interval));
    let revocation_watcher = match parts.catalog.watch_revocations().await {
        Ok(None) => None,
        Ok(Some(revoked)) => {
            Some(tokio::spawn(follow_revocations(revoked, parts.ingest.clone(), parts.revocations.clone())))
        }
        Err(e) => anyhow::bail!("cannot listen for revocations by other replicas: {e}"),
    };
    let http = match parts.http {
        None => None,
        Some(listener) => {
            let addr = listener.local_addr()?;
            let key = LinkKey::open_or_create(&LinkKey::default_path(&cfg.data_dir)).map_err(|e| anyhow::anyhow!(e))?;
            let base = web::base_url(cfg.http.public_url.as_deref(), addr, cfg.tls.is_some());
            let links = Arc::new(web::Links::new(key, cfg.http.link_ttl, &base, parts.clock.clone()));
            let tls = cfg.tls.as_ref().map(web::tls_acceptor).transpose()?;
            Some((listener, links, tls))
        }
    };
    let service = Arc::new(api::Service::new(
        parts.ingest,
        parts.retrieve.clone(),
        parts.retention,
        parts.audit.clone(),
        parts.auth.clone(),
        http.as_ref().map(|(_, links, _)| links.clone()),
    ));
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = http.map(|(listener, links, tls)| {
        let router = web::router(web::Web {
            service: service.clone(),
            links,
            auth: parts.auth.clone(),
            retrieve: parts.retrieve.clone(),
            audit: parts.audit.clone(),
            readiness: readiness.clone(),
            metrics: cfg.http.metrics,
        });
        tokio::spawn(web::serve(listener, tls, router, async {
            let _ = http_stopped.await;
        }))
    });
    let service = pb::recvault_server::RecvaultServer::from_arc(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    // Health follows readiness from the first answer on (the probe sets
    // it), and then every probe_interval.
    let _ = readiness.check().await;
    let watcher = tokio::spawn(readiness.clone().watch(cfg.health.probe_interval));
    let mut builder = transport();
    if let Some(tls) = &cfg.tls {
        builder = builder.tls_config(tls_config(tls)?).context("invalid TLS configuration")?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    sweeper.abort();
    let _ = sweeper.await;
    if let Some(w) = revocation_watcher {
        w.abort();
        let _ = w.await;
    }
    watcher.abort();
    let _ = watcher.await;
    let _ = http_stop.send(());
    if let Some(t) = http_task {
        let _ = t.await;
    }
    if let Err(e) = audit.checkpoint().await {
        tracing::warn!(error = %e, "no audit checkpoint at shutdown");
    }
    Ok(())
}

/// Reads the TLS files named by the config. The private key must be
/// readable by its owner only, like the root key.
fn tls_config(t: &crate::config::TlsSection) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    crate::config::check_private_file("tls.key_file", &t.key_file)?;
    let key = zeroize::Zeroizing::new(read(&t.key_file)?);
    let identity = tonic::transport::Identity::from_pem(read(&t.cert_file)?, key.as_slice());
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &t.client_ca_file {
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
            .client_auth_optional(!t.require_client_cert);
    }
    Ok(tls)
}

/// The in-server retention sweep: once at start (which also finishes any
/// shred a crash interrupted, and deletes ciphertext an interrupted expiry
/// left), then every `interval`.
async fn run_sweeper(retention: Arc<Retention>, interval: std::time::Duration) {
    match retention.vacuum_expired().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(leftovers = n, "expired ciphertext still not deletable"),
        Err(e) => tracing::error!(error = %e, "expired-ciphertext vacuum failed"),
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match retention.sweep(&Actor::system("retention-sweep"), false).await {
            Ok(_) => {}
            Err(crate::error::Error::Busy(_)) => tracing::debug!("another replica is sweeping; skipped"),
            Err(e) => tracing::error!(error = %e, "retention sweep failed; retried at the next interval"),
        }
    }
}

/// Applies what other replicas revoked to this one: streams writing a
/// customer being shredded stop, and reads under way re-check their object
/// before the next bytes leave (docs/REPLICAS.md gives the bounds).
async fn follow_revocations(
    mut revoked: tokio::sync::mpsc::Receiver<Revoked>,
    ingest: Arc<Ingest>,
    revocations: Arc<Revocations>,
) {
    while let Some(r) = revoked.recv().await {
        revocations.bump();
        if let Revoked::Customer(customer) = r {
            let stopped = ingest.cancel_customer(&customer);
            tracing::info!(%customer, streams_stopped = stopped, "revocation by another replica applied");
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// tonic ignores `Server::tcp_nodelay` with `serve_with_incoming`; the
    /// sockets the gRPC port accepts must have it all the same.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let conn = accepted.next().await.expect("a connection").unwrap();
        assert!(conn.nodelay().unwrap());
    }
}
