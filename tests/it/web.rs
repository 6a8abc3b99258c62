//! Issue #5 point 5: the HTTP port. Signed playback links serve one object
//! to one principal for one purpose with `Range` (206/416), and stop
//! working when they expire, are tampered with or point elsewhere, when
//! the token behind them is revoked, the customer opts out or is shredded.
//! Coaches get the same redacted/silenced views as over gRPC. The JSON API
//! goes through the gRPC handlers' authorisation. The port speaks TLS with
//! the gRPC certificate when `[tls]` is set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use recvault::api::pb;
use recvault::clock::ManualClock;
use recvault::model::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::Code;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;
const CHAT: pb::ContentKind = pb::ContentKind::ChatTranscript;

/// One HTTP/1.1 exchange, by hand: the status, lower-cased headers and body.
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, request: &[u8]) -> Reply {
    io.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    io.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t == "chunked") {
        body = dechunk(&body);
    }
    Reply { status, headers, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let len = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + len]);
        raw = &raw[eol + 4 + len..];
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: recvault.test\r\nconnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        r.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(tcp, &request("GET", path, headers, b"")).await
}

pub async fn http_post(addr: SocketAddr, path: &str, token: Option<&str>, body: &serde_json::Value) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(tcp, &request("POST", path, &headers, body.to_string().as_bytes())).await
}

async fn link(c: &mut Client, object_id: &str, purpose: pb::Purpose) -> Result<pb::PlaybackLink, tonic::Status> {
    let req = pb::CreatePlaybackLinkRequest { object_id: object_id.into(), purpose: purpose as i32, ttl_seconds: 0 };
    Ok(c.create_playback_link(req).await?.into_inner())
}

fn call_spec(customer: &str, call: &str, kind: pb::ContentKind, content_type: &str) -> pb::ObjectSpec {
    let mut s = spec(customer, kind, content_type);
    s.interaction.as_mut().unwrap().interaction_id = call.into();
    s
}

#[tokio::test]
async fn playback_links_serve_ranges_until_expired_tampered_or_revoked() {
    let clock = ManualClock::new();
    let server = TestServer::start_with_clock(clock.clone(), |_| {}).await;
    let http = server.http.expect("the HTTP port is on by default");
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    let audio = wav(100_000);
    let rec = put(&mut pbx, call_spec("web-1", "call-1", REC, "audio/wav"), &audio).await.unwrap();
    let other = put(&mut pbx, call_spec("web-1", "call-2", REC, "audio/wav"), &wav(5_000)).await.unwrap();
    let coach_token = server.token_for("coach-1", &[Role::Coach], false).await;
    let mut coach = connect(&server.url(), &coach_token).await;

    let l = link(&mut coach, &rec.object_id, pb::Purpose::Coaching).await.unwrap();
    assert_eq!(l.url, format!("http://{http}{}", l.path));
    assert!(l.path.starts_with("/play/"), "{}", l.path);
    assert_eq!(l.info.as_ref().unwrap().object_id, rec.object_id);
    let size = audio.len();

    // Whole object, then ranges as a browser seeking would ask.
    let whole = http_get(http, &l.path, &[]).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.body, audio);
    assert_eq!(whole.header("content-type"), "audio/wav");
    assert_eq!(whole.header("accept-ranges"), "bytes");
    assert_eq!(whole.header("cache-control"), "no-store");
    assert_eq!(whole.header("referrer-policy"), "no-referrer");
    let part = http_get(http, &l.path, &[("range", "bytes=70000-140001")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), format!("bytes 70000-140001/{size}"));
    assert_eq!(part.body, audio[70_000..=140_001]);
    let tail = http_get(http, &l.path, &[("range", "bytes=-100")]).await;
    assert_eq!((tail.status, &tail.body[..]), (206, &audio[size - 100..]));
    let open_ended = http_get(http, &l.path, &[("range", "bytes=199000-")]).await;
    assert_eq!((open_ended.status, &open_ended.body[..]), (206, &audio[199_000..]));
    let beyond = http_get(http, &l.path, &[("range", &format!("bytes={size}-"))]).await;
    assert_eq!(beyond.status, 416);
    assert_eq!(beyond.header("content-range"), format!("bytes */{size}"));
    // The refused range is in the audit trail, as a refused `Get` is.
    let refusals = link_refusals(&server).await;
    assert!(refusals.iter().any(|(_, r)| r.contains(&format!("{size} bytes"))), "{refusals:?}");

    // Tampered: any changed character; pointed at another object with the
    // MAC kept; a made-up link.
    let token = l.path.strip_prefix("/play/").unwrap();
    let (payload, mac) = token.split_once('.').unwrap();
    let mut flipped = token.to_owned().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let mut grant: serde_json::Value = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
    grant["object"] = other.object_id.clone().into();
    let elsewhere = format!("{}.{mac}", B64.encode(grant.to_string()));
    for bad in [flipped.as_str(), elsewhere.as_str(), "x.y", "nothing"] {
        let r = http_get(http, &format!("/play/{bad}"), &[]).await;
        assert_eq!(r.status, 403, "{bad}: {}", r.text());
        assert!(r.text().contains("not valid"), "{}", r.text());
    }
    // Each is recorded like a gRPC call without credentials, under the
    // caller's address.
    let mut auditor = server.client_as("auditor-1", &[Role::Auditor], false).await;
    let denied = audit_of(&mut auditor, "auth.denied").await;
    let forged: Vec<_> = denied.iter().filter(|r| r.target == "/play").collect();
    assert_eq!(forged.len(), 4, "{denied:?}");
    assert!(forged.iter().all(|r| r.principal.starts_with("unauthenticated@") && r.result.contains("not valid")));

    // A caller may ask for a shorter life, not a longer one.
    let long = pb::CreatePlaybackLinkRequest {
        object_id: rec.object_id.clone(),
        purpose: pb::Purpose::Coaching as i32,
        ttl_seconds: 3600,
    };
    assert_eq!(coach.create_playback_link(long).await.unwrap_err().code(), Code::InvalidArgument);

    // Expiry (10 minutes by default), by the server's clock.
    clock.advance(std::time::Duration::from_secs(599));
    assert_eq!(http_get(http, &l.path, &[("range", "bytes=0-9")]).await.status, 206);
    clock.advance(std::time::Duration::from_secs(1));
    let expired = http_get(http, &l.path, &[]).await;
    assert_eq!(expired.status, 403);
    assert!(expired.text().contains("expired"), "{}", expired.text());
    // Signed by the server, an expired link still names its holder.
    let refusals = link_refusals(&server).await;
    assert!(refusals.iter().any(|(who, why)| who == "coach-1" && why.contains("expired")), "{refusals:?}");

    // Revoking the token stops the links it was given.
    let fresh = link(&mut coach, &rec.object_id, pb::Purpose::Coaching).await.unwrap();
    assert_eq!(http_get(http, &fresh.path, &[("range", "bytes=0-9")]).await.status, 206);
    let token_id = coach_token.split('_').nth(1).unwrap();
    server.auth.revoke_token(token_id).await.unwrap();
    let revoked = http_get(http, &fresh.path, &[("range", "bytes=0-9")]).await;
    assert_eq!(revoked.status, 403);
    assert!(revoked.text().contains("no longer valid") || revoked.text().contains("revoked"), "{}", revoked.text());

    // Links are reads: role and purpose as for Get.
    assert_eq!(link(&mut pbx, &rec.object_id, pb::Purpose::Coaching).await.unwrap_err().code(), Code::PermissionDenied);
    let mut coach2 = server.client_as("coach-2", &[Role::Coach], false).await;
    assert_eq!(link(&mut coach2, &rec.object_id, pb::Purpose::Legal).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(
        link(&mut coach2, &rec.object_id, pb::Purpose::Unspecified).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(link(&mut coach2, &new_id(), pb::Purpose::Coaching).await.unwrap_err().code(), Code::NotFound);

    // Every request made with a link is in the audit trail, with its purpose.
    let reads = server_audit(&server, "object.read").await;
    assert!(reads.iter().any(|(who, why)| who == "coach-1" && why == "coaching"), "link reads are audited: {reads:?}");
    assert!(server_audit(&server, "link.create").await.iter().any(|(who, _)| who == "coach-1"));
}

/// (principal, result) of the `object.read` records refused on a playback
/// link; each must name the object's customer.
async fn link_refusals(server: &TestServer) -> Vec<(String, String)> {
    let mut auditor = server.client_as("auditor-1", &[Role::Auditor], false).await;
    audit_of(&mut auditor, "object.read")
        .await
        .into_iter()
        .filter(|r| r.detail_json.contains(r#""via":"link""#) && r.result.starts_with("refused"))
        .inspect(|r| assert!(!r.customer_id.is_empty(), "a refusal names the customer: {r:?}"))
        .map(|r| (r.principal, r.result))
        .collect()
}

/// (principal, purpose) of the audit records of `action`.
async fn server_audit(server: &TestServer, action: &str) -> Vec<(String, String)> {
    let mut auditor = server.client_as("auditor-1", &[Role::Auditor], false).await;
    audit_of(&mut auditor, action).await.into_iter().map(|r| (r.principal, r.purpose)).collect()
}

#[tokio::test]
async fn coaches_get_redacted_and_silenced_views_and_lose_them_on_opt_out_or_shred() {
    let server = TestServer::start().await;
    let http = server.http.unwrap();
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    let transcript = b"agent: how can I help?\ncustomer: my card is 4111 1111 1111 1111, mail me at ana@example.com\n";
    let chat = put(&mut pbx, call_spec("web-2", "call-9", CHAT, "text/plain"), transcript).await.unwrap();
    let mut rec_spec = call_spec("web-2", "call-9", REC, "audio/wav");
    rec_spec.sensitive_spans = vec![pb::TimeSpan { start_ms: 1000, end_ms: 2000 }];
    let audio = wav(40_000);
    let rec = put(&mut pbx, rec_spec, &audio).await.unwrap();
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;

    // The transcript link serves the redacted rendition.
    let l = link(&mut coach, &chat.object_id, pb::Purpose::Coaching).await.unwrap();
    assert_eq!(l.info.as_ref().unwrap().derived_from, chat.object_id);
    let text = http_get(http, &l.path, &[]).await;
    assert_eq!(text.status, 200);
    assert!(text.text().contains("[card]") && text.text().contains("[email]"), "{}", text.text());
    assert!(!text.text().contains("4111") && !text.text().contains("ana@"), "{}", text.text());

    // The recording link is silenced over the span, as over gRPC.
    let l = link(&mut coach, &rec.object_id, pb::Purpose::Coaching).await.unwrap();
    let heard = http_get(http, &l.path, &[]).await.body;
    assert_eq!(heard, read_for(&mut coach, &rec.object_id, pb::Purpose::Coaching).await.unwrap());
    assert_ne!(heard, audio);
    assert!(heard[44 + 16_000..44 + 32_000].iter().all(|b| *b == 0), "PCM silence over 1-2 s");
    // A seek into the span is silenced too.
    let seek = http_get(http, &l.path, &[("range", "bytes=20000-20999")]).await;
    assert_eq!(seek.status, 206);
    assert!(seek.body.iter().all(|b| *b == 0));

    // An opt-out applies to the next request made with a live link.
    let mut dpo = server.client_as("dpo-1", &[Role::Retention], false).await;
    let set = |training_use: pb::TrainingUse| pb::SetConsentRequest {
        customer_id: "web-2".into(),
        training_use: training_use as i32,
        updated_by: String::new(),
    };
    dpo.set_consent(set(pb::TrainingUse::Deny)).await.unwrap();
    let refused = http_get(http, &l.path, &[("range", "bytes=0-9")]).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.text().contains("opted out"), "{}", refused.text());
    let refusals = link_refusals(&server).await;
    assert!(refusals.iter().any(|(_, r)| r.contains("opted out")), "an opted-out link read is audited");
    assert_eq!(
        link(&mut coach, &rec.object_id, pb::Purpose::Coaching).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    dpo.set_consent(set(pb::TrainingUse::Allow)).await.unwrap();
    assert_eq!(http_get(http, &l.path, &[("range", "bytes=0-9")]).await.status, 206);

    // A shred stops it too.
    dpo.shred_customer(pb::ShredCustomerRequest {
        customer_id: "web-2".into(),
        reason: "erasure".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let gone = http_get(http, &l.path, &[("range", "bytes=0-9")]).await;
    assert_eq!(gone.status, 409, "{}", gone.text());
    assert!(gone.text().contains("shredded"), "{}", gone.text());
    let refusals = link_refusals(&server).await;
    assert!(refusals.iter().any(|(_, r)| r.contains("shredded")), "a shredded link read is audited");
}

#[tokio::test]
async fn the_json_api_is_authorised_like_grpc_and_the_page_is_served() {
    let server = TestServer::start().await;
    let http = server.http.unwrap();
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    for n in 0..6 {
        let call = format!("call-{n}");
        let mut s = call_spec(&format!("cust-{n}"), &call, REC, "audio/wav");
        s.interaction.as_mut().unwrap().agent_id = format!("agent-{}", n % 2);
        put(&mut pbx, s, &wav(800)).await.unwrap();
    }
    let coach = server.token_for("coach-1", &[Role::Coach], false).await;
    let ingest = server.token_for("pbx-2", &[Role::Ingest], false).await;

    let me = http_post(http, "/api/whoami", Some(&coach), &serde_json::json!({})).await;
    assert_eq!(me.status, 405, "whoami is a GET");
    let me = {
        let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        let auth = format!("Bearer {coach}");
        exchange(tcp, &request("GET", "/api/whoami", &[("authorization", &auth)], b"")).await
    };
    let me: serde_json::Value = serde_json::from_slice(&me.body).unwrap();
    assert_eq!(me["principal"], "coach-1");
    assert_eq!(me["roles"], serde_json::json!(["coach"]));

    let body = serde_json::json!({ "filter": { "kind": "call-recording" }, "per_agent": 2, "seed": 7 });
    let drawn = http_post(http, "/api/sample", Some(&coach), &body).await;
    assert_eq!(drawn.status, 200, "{}", drawn.text());
    let drawn: serde_json::Value = serde_json::from_slice(&drawn.body).unwrap();
    assert_eq!(drawn["population"], 6);
    assert_eq!(drawn["groups"].as_array().unwrap().len(), 4, "2 per agent");
    let again = http_post(http, "/api/sample", Some(&coach), &body).await;
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&again.body).unwrap(), drawn, "same seed, same sample");
    let first = &drawn["groups"][0]["objects"][0];
    assert_eq!(first["kind"], "call-recording");
    let made = http_post(
        http,
        "/api/links",
        Some(&coach),
        &serde_json::json!({ "object_id": first["object_id"], "purpose": "coaching" }),
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.text());
    let made: serde_json::Value = serde_json::from_slice(&made.body).unwrap();
    assert_eq!(http_get(http, made["path"].as_str().unwrap(), &[]).await.body, wav(800));

    // Refusals keep their meaning: no token, wrong role, bad input.
    let none = http_post(http, "/api/search", None, &serde_json::json!({})).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), "Bearer");
    let wrong = http_post(http, "/api/sample", Some(&ingest), &body).await;
    assert_eq!(wrong.status, 403);
    assert!(wrong.text().contains("may not call Sample"), "{}", wrong.text());
    let bad = http_post(http, "/api/search", Some(&coach), &serde_json::json!({ "filter": { "kind": "fax" } })).await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("call-recording"), "{}", bad.text());
    let typo = http_post(http, "/api/search", Some(&coach), &serde_json::json!({ "filtre": {} })).await;
    assert_eq!(typo.status, 400);
    let searched =
        http_post(http, "/api/search", Some(&coach), &serde_json::json!({ "filter": { "agent_id": "agent-1" } })).await;
    let searched: serde_json::Value = serde_json::from_slice(&searched.body).unwrap();
    assert_eq!(searched["total"], 3);

    // The page and its assets, with a strict content security policy.
    let page = http_get(http, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"));
    assert!(page.text().contains("/app.js") && page.text().contains("Draw sample"));
    assert!(page.header("content-security-policy").contains("script-src 'self'"));
    assert_eq!(http_get(http, "/app.js", &[]).await.status, 200);
    assert_eq!(http_get(http, "/nope", &[]).await.status, 404);
}

#[tokio::test]
async fn the_http_port_can_be_disabled() {
    let server = TestServer::start_with(|c| c.http.enabled = false).await;
    assert!(server.http.is_none());
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    let rec = put(&mut pbx, spec("web-3", REC, "audio/wav"), &wav(800)).await.unwrap();
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let refused = link(&mut coach, &rec.object_id, pb::Purpose::Coaching).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("[http]"), "{}", refused.message());
}

/// Issue #4 point 1: with `[tls]`, the HTTP port speaks TLS with the same
/// certificate (checked against the test CA) and nothing else.
#[tokio::test]
async fn the_http_port_speaks_tls_when_the_grpc_port_does() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::access::make_pki(dir.path(), &[]);
    let server = TestServer::start_with(|c| {
        c.tls = Some(recvault::config::TlsSection {
            cert_file: dir.path().join("server.pem"),
            key_file: dir.path().join("server.key"),
            client_ca_file: None,
            require_client_cert: false,
        });
    })
    .await;
    let http = server.http.unwrap();
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake with the server certificate");
    let r = exchange(tls, &request("GET", "/healthz", &[], b"")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    // Plain HTTP to the TLS port gets no page.
    let plain = tokio::net::TcpStream::connect(http).await.unwrap();
    let mut plain = plain;
    plain.write_all(&request("GET", "/healthz", &[], b"")).await.unwrap();
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw).await;
    assert!(!String::from_utf8_lossy(&raw).contains("ok\n"));
}
