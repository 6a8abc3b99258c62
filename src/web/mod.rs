//! The HTTP port: the coaching page, a small JSON API for it, and signed
//! playback links with `Range` support.
//!
//! The JSON API is a thin translation onto the gRPC handlers themselves
//! (`api::Service`, called with the page's bearer token as metadata), so a
//! browser goes through exactly the authentication, role, purpose, consent
//! and audit checks a gRPC client does; nothing here decides access on its
//! own except a playback link, which re-checks the credential it names, the
//! role and purpose and (through `Retrieve::read`) the customer's state and
//! consent on every request, and records each one in the audit trail.

pub mod link;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::api::pb::recvault_server::Recvault;
use crate::api::{Service, pb};
use crate::audit::{Actor, AuditLog, Event};
use crate::auth::{self as authz, Authenticator, Principal, Rpc};
use crate::clock::Clock;
use crate::error::Error;
use crate::model::{ContentKind, Direction, ObjectId, Purpose};
use crate::retrieve::{ByteRange, Retrieve};
use link::{Grant, LinkError, LinkKey};

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// Issues and checks playback links.
pub struct Links {
    key: LinkKey,
    ttl: Duration,
    base_url: String,
    clock: Arc<dyn Clock>,
}

/// A link just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub url: String,
    pub path: String,
    pub expires_at_ms: i64,
}

impl Links {
    /// `base_url`: scheme and authority the links start with (no trailing
    /// slash); `ttl`: the longest life of a link.
    pub fn new(key: LinkKey, ttl: Duration, base_url: &str, clock: Arc<dyn Clock>) -> Self {
        Self { key, ttl, base_url: base_url.trim_end_matches('/').to_owned(), clock }
    }

    /// A link to `object` for `principal` and `purpose`, living
    /// `ttl_seconds` (0: the configured lifetime, which is also the most).
    pub fn issue(
        &self,
        principal: &Principal,
        object: &ObjectId,
        purpose: Purpose,
        ttl_seconds: u32,
    ) -> Result<Issued, Error> {
        let max = self.ttl.as_secs();
        let secs = match u64::from(ttl_seconds) {
            0 => max,
            s if s <= max => s,
            s => {
                return Err(Error::Invalid(format!(
                    "ttl_seconds {s} is longer than this server's link lifetime of {max} s ([http] link_ttl)"
                )));
            }
        };
        let expires_at_ms = self.clock.now_ms().saturating_add(secs as i64 * 1000);
        let grant = Grant {
            v: 1,
            object: object.to_string(),
            principal: principal.name.clone(),
            credential: Grant::credential_of(&principal.credential),
            purpose: purpose.name().to_owned(),
            expires_at_ms,
        };
        let path = format!("/play/{}", self.key.sign(&grant));
        Ok(Issued { url: format!("{}{path}", self.base_url), path, expires_at_ms })
    }

    /// The grant of a link this server signed, expired or not.
    fn open(&self, link: &str) -> Result<Grant, LinkError> {
        self.key.open(link)
    }

    /// Refuses a grant past its expiry, by this server's clock.
    fn unexpired(&self, grant: &Grant) -> Result<(), LinkError> {
        link::unexpired(grant, self.clock.now_ms())
    }
}

/// What the HTTP handlers work with.
#[derive(Clone)]
pub struct Web {
    pub service: Arc<Service>,
    pub links: Arc<Links>,
    pub auth: Arc<Authenticator>,
    pub retrieve: Arc<Retrieve>,
    pub audit: AuditLog,
    pub readiness: Arc<crate::readiness::Readiness>,
    /// Serve `/metrics` (`[http] metrics`).
    pub metrics: bool,
}

/// The HTTP routes.
pub fn router(web: Web) -> Router {
    let mut router = Router::new();
    if web.metrics {
        router = router.route("/metrics", get(metrics));
    }
    router
        .route("/", get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/app.css", get(|| async { page(APP_CSS, "text/css; charset=utf-8") }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/api/whoami", get(whoami))
        .route("/api/search", post(search))
        .route("/api/sample", post(sample))
        .route("/api/links", post(create_link))
        .route("/play/{link}", get(play))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "no such page".into()) })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(web)
}

/// 200 when unsealed and the catalog and store answer; 503 with the reason
/// otherwise (details in the server log, not for an unauthenticated caller).
async fn ready(State(web): State<Web>) -> Response {
    match web.readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(crate::readiness::NotReady(reason)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response()
        }
    }
}

/// Prometheus text format. Unauthenticated like any scrape target: it
/// holds counts only, labelled by closed sets, never an id.
async fn metrics() -> Response {
    let body = crate::metrics::global().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Headers on every response: nothing is cached, sniffed, framed or
/// referred (a link in a Referer header would hand it to another site),
/// and the page may load only its own script, style and media.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(h, "cache-control", "no-store");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-frame-options", "DENY");
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; \
         connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    );
    response
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `shutdown` resolves; then stops accepting.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = tcp.set_nodelay(true);
        // Each request learns the peer's address, for the audit records of
        // refused callers (`unauthenticated@<ip>`, as on the gRPC port).
        let service = hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut r: axum::http::Request<_>| {
                r.extensions_mut().insert(Peer(Some(peer)));
                r
            },
        ));
        let tls = tls.clone();
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let served = match tls {
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => builder.serve_connection(TokioIo::new(stream), service).await,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "http TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}

/// A TLS acceptor for the HTTP port from the `[tls]` files (no client
/// certificates: the page uses tokens, links carry their own grant).
pub fn tls_acceptor(t: &crate::config::TlsSection) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&t.cert_file)
        .with_context(|| format!("cannot read tls.cert_file {}", t.cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls.cert_file {} is not a PEM certificate chain", t.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .with_context(|| format!("tls.key_file {} holds no PEM private key", t.key_file.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("invalid TLS certificate or key for the HTTP port")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

// ---- errors ----

fn error_response(status: StatusCode, code: &'static str, message: String) -> Response {
    let mut r = (status, axum::Json(json!({ "error": message, "code": code }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The HTTP answer to a gRPC status (the message is already written for
/// a person, and never carries internals: see `api::status`).
fn from_status(s: &tonic::Status) -> Response {
    use tonic::Code;
    let (status, code) = match s.code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::FailedPrecondition => (StatusCode::CONFLICT, "FAILED_PRECONDITION"),
        Code::OutOfRange => (StatusCode::RANGE_NOT_SATISFIABLE, "OUT_OF_RANGE"),
        Code::ResourceExhausted => (StatusCode::PAYLOAD_TOO_LARGE, "RESOURCE_EXHAUSTED"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "DATA_LOSS"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
    };
    error_response(status, code, s.message().to_owned())
}

fn from_error(e: Error) -> Response {
    from_status(&crate::api::status::to_status(e))
}

fn bad_request(message: String) -> Response {
    error_response(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

/// The address of the peer a request came from, set per connection by
/// [`serve`] (absent for a router driven some other way).
#[derive(Debug, Clone, Copy)]
struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Peer>().copied().unwrap_or(Peer(None)))
    }
}

/// A gRPC request carrying the page's credentials and the peer's address
/// (which the gRPC handlers audit refused callers under).
fn grpc_request<T>(headers: &HeaderMap, peer: Peer, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for name in ["authorization", "x-request-id"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
            request.metadata_mut().insert(name, v);
        }
    }
    request.extensions_mut().insert(tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: peer.0 });
    request
}

fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).filter(|v| v.len() <= 128)
}

// ---- JSON API ----

/// A search filter as the page sends it: names, not wire enums; times as
/// RFC 3339 or a bare date (midnight UTC).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FilterJson {
    customer_id: String,
    kind: String,
    interaction_id: String,
    agent_id: String,
    queue: String,
    channel: String,
    direction: String,
    started_after: String,
    started_before: String,
    created_after: String,
    created_before: String,
    tags: BTreeMap<String, String>,
    min_duration_ms: u64,
    max_duration_ms: u64,
}

fn timestamp(field: &str, text: &str) -> Result<Option<prost_types::Timestamp>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_owned() };
    let t = humantime::parse_rfc3339_weak(&full)
        .map_err(|_| format!("{field}: {text:?} is not a date or an RFC 3339 time"))?;
    let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{field}: before 1970"))?;
    Ok(Some(prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }))
}

impl FilterJson {
    fn to_pb(&self) -> Result<pb::SearchFilter, String> {
        let kind = match self.kind.trim() {
            "" => 0,
            name => ContentKind::from_name(name)
                .map(|k| i32::from(k.code()))
                .ok_or_else(|| format!("kind {name:?} is not known: use call-recording, chat-transcript or image"))?,
        };
        let direction = match self.direction.trim() {
            "" => Direction::Unspecified,
            "inbound" => Direction::Inbound,
            "outbound" => Direction::Outbound,
            "internal" => Direction::Internal,
            other => {
                return Err(format!("direction {other:?} is not known: use inbound, outbound or internal"));
            }
        };
        Ok(pb::SearchFilter {
            customer_id: self.customer_id.trim().to_owned(),
            kind,
            interaction_id: self.interaction_id.trim().to_owned(),
            agent_id: self.agent_id.trim().to_owned(),
            queue: self.queue.trim().to_owned(),
            channel: self.channel.trim().to_owned(),
            direction: i32::from(direction.code()),
            started_after: timestamp("started_after", &self.started_after)?,
            started_before: timestamp("started_before", &self.started_before)?,
            tags: self.tags.clone().into_iter().collect(),
            created_after: timestamp("created_after", &self.created_after)?,
            created_before: timestamp("created_before", &self.created_before)?,
            min_duration_ms: self.min_duration_ms,
            max_duration_ms: self.max_duration_ms,
        })
    }
}

fn ts_text(ts: &Option<prost_types::Timestamp>) -> Value {
    match ts {
        Some(t) => json!(crate::model::format_ms(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)),
        None => Value::Null,
    }
}

fn info_json(o: &pb::ObjectInfo) -> Value {
    let kind = u8::try_from(o.kind).ok().and_then(ContentKind::from_code).map(|k| k.name());
    let i = o.interaction.clone().unwrap_or_default();
    let direction = match Direction::from_code(u8::try_from(i.direction).unwrap_or(0)) {
        Direction::Unspecified => "",
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
        Direction::Internal => "internal",
    };
    json!({
        "object_id": o.object_id,
        "customer_id": o.customer_id,
        "kind": kind,
        "content_type": o.content_type,
        "size": o.size,
        "created_at": ts_text(&o.created_at),
        "expires_at": ts_text(&o.expires_at),
        "retention_policy": o.retention_policy,
        "derived_from": o.derived_from,
        "interaction": {
            "interaction_id": i.interaction_id,
            "channel": i.channel,
            "agent_id": i.agent_id,
            "queue": i.queue,
            "direction": direction,
            "started_at": ts_text(&i.started_at),
            "duration_ms": (i.duration_ms > 0).then_some(i.duration_ms),
            "tags": i.tags.into_iter().collect::<BTreeMap<_, _>>(),
        },
        "sensitive_spans": o.sensitive_spans.iter().map(|s| json!({"start_ms": s.start_ms, "end_ms": s.end_ms}))
            .collect::<Vec<_>>(),
    })
}

async fn whoami(State(web): State<Web>, peer: Peer, headers: HeaderMap) -> Response {
    match web.service.who_am_i(grpc_request(&headers, peer, pb::WhoAmIRequest {})).await {
        Ok(r) => {
            let r = r.into_inner();
            let roles: Vec<String> = r
                .roles
                .iter()
                .filter_map(|c| pb::Role::try_from(*c).ok())
                .map(|r| r.as_str_name().to_ascii_lowercase())
                .collect();
            axum::Json(json!({
                "principal": r.principal,
                "roles": roles,
                "unredacted": r.unredacted,
                "allowed_rpcs": r.allowed_rpcs,
            }))
            .into_response()
        }
        Err(s) => from_status(&s),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SearchJson {
    filter: FilterJson,
    page_size: u32,
    page_token: String,
}

async fn search(State(web): State<Web>, peer: Peer, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let (req, filter) = match parse_json::<SearchJson>(&body).and_then(|r| Ok((r.filter.to_pb()?, r))) {
        Ok((filter, req)) => (req, filter),
        Err(m) => return bad_request(m),
    };
    let message = pb::SearchRequest { filter: Some(filter), page_size: req.page_size, page_token: req.page_token };
    match web.service.search(grpc_request(&headers, peer, message)).await {
        Ok(r) => {
            let r = r.into_inner();
            axum::Json(json!({
                "total": r.total,
                "next_page_token": r.next_page_token,
                "objects": r.objects.iter().map(info_json).collect::<Vec<_>>(),
            }))
            .into_response()
        }
        Err(s) => from_status(&s),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SampleJson {
    filter: FilterJson,
    count: u32,
    per_agent: u32,
    per_queue: u32,
    seed: u64,
}

async fn sample(State(web): State<Web>, peer: Peer, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let (req, filter) = match parse_json::<SampleJson>(&body).and_then(|r| Ok((r.filter.to_pb()?, r))) {
        Ok((filter, req)) => (req, filter),
        Err(m) => return bad_request(m),
    };
    let (stratify, count, per_stratum) = match (req.per_agent, req.per_queue) {
        (0, 0) => (pb::Stratify::None, req.count, 0),
        (k, 0) => (pb::Stratify::PerAgent, 0, k),
        (0, k) => (pb::Stratify::PerQueue, 0, k),
        _ => return bad_request("give per_agent or per_queue, not both".into()),
    };
    let message =
        pb::SampleRequest { filter: Some(filter), count, stratify: stratify as i32, per_stratum, seed: req.seed };
    match web.service.sample(grpc_request(&headers, peer, message)).await {
        Ok(r) => {
            let r = r.into_inner();
            let groups: Vec<Value> = r
                .groups
                .iter()
                .map(|g| {
                    json!({
                        "interaction_id": g.interaction_id,
                        "stratum": g.stratum,
                        "objects": g.objects.iter().map(info_json).collect::<Vec<_>>(),
                    })
                })
                .collect();
            axum::Json(json!({ "population": r.population, "groups": groups })).into_response()
        }
        Err(s) => from_status(&s),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LinkJson {
    object_id: String,
    purpose: String,
    ttl_seconds: u32,
}

async fn create_link(State(web): State<Web>, peer: Peer, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let req: LinkJson = match parse_json(&body) {
        Ok(r) => r,
        Err(m) => return bad_request(m),
    };
    let purpose = match Purpose::from_name(req.purpose.trim()) {
        Some(p) if p != Purpose::Unspecified => p,
        _ => {
            return bad_request(
                "purpose is required: coaching, quality-review, legal or data-subject-request".to_owned(),
            );
        }
    };
    let message = pb::CreatePlaybackLinkRequest {
        object_id: req.object_id.trim().to_owned(),
        purpose: crate::api::purpose_code(purpose),
        ttl_seconds: req.ttl_seconds,
    };
    match web.service.create_playback_link(grpc_request(&headers, peer, message)).await {
        Ok(r) => {
            let r = r.into_inner();
            axum::Json(json!({
                "url": r.url,
                "path": r.path,
                "expires_at": ts_text(&r.expires_at),
                "info": r.info.as_ref().map(info_json),
            }))
            .into_response()
        }
        Err(s) => from_status(&s),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| format!("request body is not the expected JSON: {e}"))
}

// ---- playback ----

/// What a `Range` header asks for, against an object of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Whole,
    /// Inclusive byte positions.
    Part(u64, u64),
    Unsatisfiable,
}

/// RFC 9110 §14: one `bytes=` range (first-last, first-, or -suffix). A
/// header this server does not understand (another unit, several ranges,
/// a malformed spec) is ignored and the whole object served, as the RFC
/// allows.
fn wanted(range: Option<&HeaderValue>, size: u64) -> Want {
    let Some(spec) = range.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Want::Whole;
    };
    if spec.contains(',') {
        return Want::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else { return Want::Whole };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| if s.bytes().all(|b| b.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (first.is_empty(), last.is_empty()) {
        (true, true) => Want::Whole,
        (true, false) => match number(last) {
            None => Want::Whole,
            Some(0) => Want::Unsatisfiable,
            Some(_) if size == 0 => Want::Unsatisfiable,
            Some(n) => Want::Part(size.saturating_sub(n), size - 1),
        },
        (false, _) => {
            let Some(start) = number(first) else { return Want::Whole };
            let end = if last.is_empty() { Some(u64::MAX) } else { number(last) };
            match end {
                None => Want::Whole,
                Some(end) if end < start => Want::Whole,
                Some(_) if start >= size => Want::Unsatisfiable,
                Some(end) => Want::Part(start, end.min(size - 1)),
            }
        }
    }
}

/// Serves one object through a playback link. Every request re-checks the
/// link's credential, role and purpose, and reads through
/// [`Retrieve::read`] (customer state, consent, audit record, redaction).
async fn play(State(web): State<Web>, peer: Peer, Path(link): Path<String>, headers: HeaderMap) -> Response {
    let request_id = request_id(&headers);
    let opened = web.links.open(&link).and_then(|g| match (g.object_id(), g.purpose()) {
        (Some(id), Some(purpose)) => Ok((id, purpose, g)),
        _ => Err(LinkError::Invalid),
    });
    let (id, purpose, grant) = match opened {
        Ok(g) => g,
        Err(e) => {
            // A forged or altered link names no one it can be trusted
            // about: recorded like a gRPC call without credentials.
            let actor = Actor::unauthenticated(peer.0, request_id);
            let event = Event::new("auth.denied").target("/play").result(format!("refused: {e}"));
            web.audit.append_anonymous(&actor, event).await;
            return error_response(StatusCode::FORBIDDEN, "PERMISSION_DENIED", e.to_string());
        }
    };
    // An expired link was signed by this server: it names its holder.
    let holder = Actor::new(&grant.principal, request_id);
    if let Err(e) = web.links.unexpired(&grant) {
        refused(&web, &holder, id, purpose, &Error::PermissionDenied(e.to_string())).await;
        return error_response(StatusCode::FORBIDDEN, "PERMISSION_DENIED", e.to_string());
    }
    let principal = match web.auth.recheck(&grant.credential).await {
        Ok(p) => p,
        Err(e) => {
            refused(&web, &holder, id, purpose, &e).await;
            return error_response(StatusCode::FORBIDDEN, "PERMISSION_DENIED", e.to_string());
        }
    };
    let actor = Actor::new(&principal.name, request_id);
    if let Err(e) = principal.authorize(Rpc::Get).and_then(|()| authz::check_purpose(&principal, purpose)) {
        refused(&web, &actor, id, purpose, &e).await;
        return from_error(e);
    }
    let redacted = !principal.unredacted;
    // Refusals before `read` (which audits its own) are audited here, as the
    // gRPC `Get` audits them: a link to a shredded, expired or opted-out
    // customer's object is still an attempt to read it.
    let record = match web.retrieve.view(&id, purpose, redacted).await {
        Ok(r) => r,
        Err(e) => {
            refused(&web, &actor, id, purpose, &e).await;
            return from_error(e);
        }
    };
    let size = record.size;
    let (status, range) = match wanted(headers.get(header::RANGE), size) {
        Want::Whole => (StatusCode::OK, ByteRange { start: 0, end: None }),
        Want::Part(a, b) => (StatusCode::PARTIAL_CONTENT, ByteRange { start: a, end: Some(b) }),
        Want::Unsatisfiable => {
            // Recorded on the object served (a transcript's rendition, with
            // the transcript asked for), as the gRPC `Get` records it.
            let why = format!("the object has {size} bytes; ask for a range within them");
            let e = Error::OutOfRange(why.clone());
            let requested = (record.object_id != id).then_some(id);
            refused_on(&web, &actor, record.object_id, requested, purpose, &e).await;
            let mut r = error_response(StatusCode::RANGE_NOT_SATISFIABLE, "OUT_OF_RANGE", why);
            r.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return r;
        }
    };
    let (record, chunks) = match web.retrieve.read_link(&actor, purpose, &id, range, redacted).await {
        Ok(r) => r,
        Err(e) => return from_error(e),
    };
    let length = match (size, range.end) {
        (0, _) => 0,
        (_, Some(end)) => end - range.start + 1,
        (_, None) => size,
    };
    let object = record.object_id;
    let body = Body::from_stream(chunks.map(move |c| {
        c.map(|(_, data)| data).map_err(|e| {
            // Headers are gone: a shred or opt-out mid-stream ends the body early.
            tracing::info!(%object, error = %e, "playback stopped");
            std::io::Error::other(e.to_string())
        })
    }));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&record.spec.content_type));
    h.insert(header::CONTENT_LENGTH, header_value(&length.to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("inline"));
    if status == StatusCode::PARTIAL_CONTENT {
        let end = range.end.unwrap_or(size.saturating_sub(1));
        h.insert(header::CONTENT_RANGE, header_value(&format!("bytes {}-{end}/{size}", range.start)));
    }
    response
}

/// Records a link read refused before [`Retrieve::read_link`] could audit
/// it, in the `object.read` event a `Get` writes, marked `via: link`, with
/// the object's customer.
async fn refused(web: &Web, actor: &Actor, id: ObjectId, purpose: Purpose, e: &Error) {
    refused_on(web, actor, id, None, purpose, e).await;
}

/// [`refused`], on `target`, served for a request of `requested`.
async fn refused_on(
    web: &Web,
    actor: &Actor,
    target: ObjectId,
    requested: Option<ObjectId>,
    purpose: Purpose,
    e: &Error,
) {
    let event = Event::new("object.read").target(target).purpose(purpose.name()).detail("via", "link");
    let event = match requested {
        Some(id) => event.detail("requested", id.to_string()),
        None => event,
    };
    web.retrieve.refused(actor, event, Some(&target), e).await;
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// The base URL of links served on `addr`.
pub fn base_url(public_url: Option<&str>, addr: SocketAddr, tls: bool) -> String {
    match public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => format!("{}://{addr}", if tls { "https" } else { "http" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(h: &str, size: u64) -> Want {
        wanted(Some(&HeaderValue::from_str(h).unwrap()), size)
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(wanted(None, 100), Want::Whole);
        assert_eq!(want("bytes=0-9", 100), Want::Part(0, 9));
        assert_eq!(want("bytes=90-", 100), Want::Part(90, 99));
        assert_eq!(want("bytes=90-1000", 100), Want::Part(90, 99));
        assert_eq!(want("bytes=-10", 100), Want::Part(90, 99));
        assert_eq!(want("bytes=-1000", 100), Want::Part(0, 99));
        assert_eq!(want("bytes=100-", 100), Want::Unsatisfiable);
        assert_eq!(want("bytes=-0", 100), Want::Unsatisfiable);
        assert_eq!(want("bytes=0-", 0), Want::Unsatisfiable);
        assert_eq!(want("bytes=-5", 0), Want::Unsatisfiable);
        // Not understood: the whole object.
        for h in ["items=0-9", "bytes=0-9,20-29", "bytes=9-0", "bytes=a-b", "bytes=-", "bytes=+1-2", "bytes 0-9"] {
            assert_eq!(want(h, 100), Want::Whole, "{h}");
        }
    }

    #[test]
    fn base_urls() {
        let addr: SocketAddr = "127.0.0.1:7421".parse().unwrap();
        assert_eq!(base_url(None, addr, false), "http://127.0.0.1:7421");
        assert_eq!(base_url(None, addr, true), "https://127.0.0.1:7421");
        assert_eq!(base_url(Some("https://rv.example/"), addr, true), "https://rv.example");
    }
}
