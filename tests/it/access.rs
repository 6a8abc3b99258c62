//! H1/H5 and issue #4: every role against every RPC, over real TLS with
//! real client certificates (rcgen), and the same with bearer tokens; no
//! request is served without an identity; purposes are bound to roles; an
//! opted-out customer vanishes from coaching at once.

use std::path::Path;

use recvault::api::pb;
use recvault::auth::{CertificatePrincipal, Rpc, allowed};
use recvault::model::Role;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::common::*;

const CHAT: pb::ContentKind = pb::ContentKind::ChatTranscript;

pub struct Pki {
    pub ca_pem: String,
    /// Client certificates by subject: (cert PEM, key PEM).
    clients: Vec<(String, String, String)>,
}

fn write_private(path: &Path, text: &str) {
    recvault::auth::write_private(path, text.as_bytes()).unwrap();
}

/// A CA, a server certificate for 127.0.0.1/localhost and one client
/// certificate per subject, written into `dir`.
pub fn make_pki(dir: &Path, subjects: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "recvault test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &ca).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    write_private(&dir.join("server.key"), &server_key.serialize_pem());
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let clients = subjects
        .iter()
        .map(|subject| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, *subject);
            let cert = params.signed_by(&key, &ca).unwrap();
            (subject.to_string(), cert.pem(), key.serialize_pem())
        })
        .collect();
    Pki { ca_pem: ca.pem(), clients }
}

/// A TLS client, with a client certificate and/or a bearer token.
async fn tls_client(addr: std::net::SocketAddr, ca: &str, cert: Option<(&str, &str)>, token: Option<&str>) -> Client {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = cert {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    with_token(channel, token)
}

struct Fixture {
    object_id: String,
    customer: String,
    hold_id: String,
}

/// Calls `rpc` with a plausible request. Authorization comes first in
/// every handler, so a refused call fails the same way whatever the
/// arguments; an allowed one may still fail for its own reasons.
async fn call(c: &mut Client, rpc: Rpc, fx: &Fixture, n: usize) -> Result<(), tonic::Status> {
    let customer = format!("acl-{n}");
    match rpc {
        Rpc::Ingest => {
            let mut s = Stream::start(c).await?;
            s.open(&new_id(), spec(&customer, pb::ContentKind::CallRecording, "audio/wav")).await.map(drop)
        }
        Rpc::Put => put(c, spec(&customer, pb::ContentKind::ChatTranscript, "text/plain"), b"hi").await.map(drop),
        Rpc::Stat => c.stat(pb::StatRequest { object_id: fx.object_id.clone() }).await.map(drop),
        Rpc::Get => get(c, &fx.object_id, None).await.map(drop),
        Rpc::List => c.list(pb::ListRequest { customer_id: fx.customer.clone(), ..Default::default() }).await.map(drop),
        Rpc::Search => c.search(pb::SearchRequest::default()).await.map(drop),
        Rpc::Sample => c.sample(pb::SampleRequest { count: 1, seed: n as u64, ..Default::default() }).await.map(drop),
        Rpc::CreatePlaybackLink => c
            .create_playback_link(pb::CreatePlaybackLinkRequest {
                object_id: fx.object_id.clone(),
                purpose: pb::Purpose::Coaching as i32,
                ttl_seconds: 0,
            })
            .await
            .map(drop),
        Rpc::MarkSensitive => c
            .mark_sensitive(pb::MarkSensitiveRequest {
                object_id: fx.object_id.clone(),
                spans: vec![pb::TimeSpan { start_ms: 0, end_ms: 1 }],
            })
            .await
            .map(drop),
        Rpc::ShredCustomer => c
            .shred_customer(pb::ShredCustomerRequest {
                customer_id: customer,
                reason: "acl".into(),
                requested_by: String::new(),
            })
            .await
            .map(drop),
        Rpc::ApproveShred => {
            c.approve_shred(pb::ApproveShredRequest { customer_id: customer, approver: String::new() }).await.map(drop)
        }
        Rpc::CancelShred => c.cancel_shred(pb::CancelShredRequest { customer_id: customer }).await.map(drop),
        Rpc::GetShredStatus => {
            c.get_shred_status(pb::GetShredStatusRequest { customer_id: fx.customer.clone() }).await.map(drop)
        }
        Rpc::GetShredCertificate => {
            c.get_shred_certificate(pb::GetShredStatusRequest { customer_id: fx.customer.clone() }).await.map(drop)
        }
        Rpc::PlaceHold => c
            .place_hold(pb::PlaceHoldRequest {
                customer_id: customer,
                interaction_id: String::new(),
                case_ref: "ACL-1".into(),
                reason: "acl".into(),
                placed_by: String::new(),
            })
            .await
            .map(drop),
        Rpc::ReleaseHold => c
            .release_hold(pb::ReleaseHoldRequest { hold_id: fx.hold_id.clone(), released_by: String::new() })
            .await
            .map(drop),
        Rpc::ListHolds => c.list_holds(pb::ListHoldsRequest::default()).await.map(drop),
        Rpc::ListRetentionPolicies => c.list_retention_policies(pb::ListRetentionPoliciesRequest {}).await.map(drop),
        Rpc::SetRetentionPolicy => c
            .set_retention_policy(pb::SetRetentionPolicyRequest {
                policy: Some(pb::RetentionPolicy {
                    name: format!("acl-{n}"),
                    kind: pb::ContentKind::Image as i32,
                    retain_seconds: 86_400,
                    ..Default::default()
                }),
                reapply: false,
            })
            .await
            .map(drop),
        Rpc::DeleteRetentionPolicy => c
            .delete_retention_policy(pb::DeleteRetentionPolicyRequest { name: format!("none-{n}"), reapply: false })
            .await
            .map(drop),
        Rpc::RunRetention => c.run_retention(pb::RunRetentionRequest { dry_run: true }).await.map(drop),
        Rpc::ListAuditRecords => c.list_audit_records(pb::ListAuditRecordsRequest::default()).await.map(drop),
        Rpc::SetConsent => c
            .set_consent(pb::SetConsentRequest {
                customer_id: customer,
                training_use: pb::TrainingUse::Allow as i32,
                updated_by: String::new(),
            })
            .await
            .map(drop),
        Rpc::GetConsent => c.get_consent(pb::GetConsentRequest { customer_id: customer }).await.map(drop),
        Rpc::CreateToken => c
            .create_token(pb::CreateTokenRequest {
                name: format!("made-{n}"),
                roles: vec![pb::Role::Auditor as i32],
                unredacted: false,
                ttl_seconds: 60,
            })
            .await
            .map(drop),
        Rpc::RevokeToken => c.revoke_token(pb::RevokeTokenRequest { token_id: "0".repeat(32) }).await.map(drop),
        Rpc::ListTokens => c.list_tokens(pb::ListTokensRequest {}).await.map(drop),
        Rpc::WhoAmI => c.who_am_i(pb::WhoAmIRequest {}).await.map(drop),
    }
}

fn is_auth_refusal(code: Code) -> bool {
    matches!(code, Code::PermissionDenied | Code::Unauthenticated)
}

/// H1: the role × RPC table of docs/ACCESS.md, every cell, with client
/// certificates over mutual TLS and with bearer tokens over TLS.
#[tokio::test]
async fn h1_every_role_against_every_rpc_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let subjects: Vec<String> = Role::ALL.iter().map(|r| format!("{r}.clients.example")).collect();
    let mut all_subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
    all_subjects.push("stranger.clients.example");
    let pki = make_pki(dir.path(), &all_subjects);
    let d = dir.path().to_owned();
    let server = TestServer::start_with(move |cfg| {
        cfg.tls = Some(recvault::config::TlsSection {
            cert_file: d.join("server.pem"),
            key_file: d.join("server.key"),
            client_ca_file: Some(d.join("ca.pem")),
            require_client_cert: false,
        });
        cfg.auth.certificates = Role::ALL
            .iter()
            .map(|r| CertificatePrincipal {
                subject: format!("{r}.clients.example"),
                name: Some(format!("{r}-cert")),
                roles: vec![*r],
                unredacted: false,
            })
            .collect();
    })
    .await;

    // The table in the docs is the table in the code.
    let doc = include_str!("../../docs/ACCESS.md");
    for rpc in Rpc::ALL {
        let cells: Vec<&str> = Role::ALL.iter().map(|r| if allowed(*r, rpc) { "yes" } else { "-" }).collect();
        let row = format!("| {} | {} |", rpc.name(), cells.join(" | "));
        assert!(doc.contains(&row), "docs/ACCESS.md lacks the row {row}");
    }

    // Fixture, made by an operator with every role (token over TLS).
    let operator = server.token_for("operator", &ALL_ROLES, true).await;
    let mut op = tls_client(server.addr, &pki.ca_pem, None, Some(&operator)).await;
    let object = put(&mut op, spec("acl-fixture", CHAT, "text/plain"), b"fixture").await.unwrap();
    let fx = Fixture { object_id: object.object_id.clone(), customer: "acl-fixture".into(), hold_id: new_id() };

    let mut n = 0;
    for (i, role) in Role::ALL.iter().enumerate() {
        let (_, cert, key) = &pki.clients[i];
        let token = server.token_for(&format!("{role}-token"), &[*role], false).await;
        let mut by_cert = tls_client(server.addr, &pki.ca_pem, Some((cert, key)), None).await;
        let mut by_token = tls_client(server.addr, &pki.ca_pem, None, Some(&token)).await;
        for rpc in Rpc::ALL {
            for (how, client) in [("certificate", &mut by_cert), ("token", &mut by_token)] {
                n += 1;
                let got = call(client, rpc, &fx, n).await;
                if allowed(*role, rpc) {
                    if let Err(s) = &got {
                        assert!(!is_auth_refusal(s.code()), "{role} by {how} should be allowed {}: {s:?}", rpc.name());
                    }
                } else {
                    let s = got.expect_err(&format!("{role} by {how} must not call {}", rpc.name()));
                    assert_eq!(s.code(), Code::PermissionDenied, "{role} by {how} calling {}: {s:?}", rpc.name());
                    assert!(s.message().contains(rpc.name()), "the refusal names the call: {}", s.message());
                }
            }
        }
    }

    // No identity, or a certificate mapped to no principal: every RPC
    // answers UNAUTHENTICATED.
    let (_, cert, key) = &pki.clients[Role::ALL.len()];
    let mut stranger = tls_client(server.addr, &pki.ca_pem, Some((cert, key)), None).await;
    let mut nobody = tls_client(server.addr, &pki.ca_pem, None, None).await;
    for rpc in Rpc::ALL {
        n += 1;
        for c in [&mut stranger, &mut nobody] {
            let s = call(c, rpc, &fx, n).await.expect_err("refused");
            assert_eq!(s.code(), Code::Unauthenticated, "{}: {s:?}", rpc.name());
        }
    }

    // H5: a certificate and a token naming different principals.
    let (_, cert, key) = &pki.clients[0];
    let coach_token = server.token_for("coach-token-2", &[Role::Coach], false).await;
    let mut mixed = tls_client(server.addr, &pki.ca_pem, Some((cert, key)), Some(&coach_token)).await;
    let s = mixed.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Plain TCP to the TLS port does not get an answer.
    let plain = Endpoint::from_shared(server.url()).unwrap().connect().await;
    if let Ok(channel) = plain {
        let mut c = with_token(channel, Some(&operator));
        assert!(c.who_am_i(pb::WhoAmIRequest {}).await.is_err());
    }

    // Every refusal is in the audit trail, with the principal that tried.
    let trail = op
        .list_audit_records(pb::ListAuditRecordsRequest {
            action: "auth.denied".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(trail.records.iter().any(|r| r.principal == "ingest-cert" && r.target == "Get"));
    assert!(trail.records.iter().any(|r| r.principal.starts_with("unauthenticated@127.0.0.1")));
}

/// Whether a TLS client with these settings fails to connect or to call.
async fn refused(addr: std::net::SocketAddr, tls: ClientTlsConfig, token: Option<&str>) -> bool {
    match Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect().await {
        Err(_) => true,
        Ok(ch) => with_token(ch, token).who_am_i(pb::WhoAmIRequest {}).await.is_err(),
    }
}

/// A client certificate from another CA never gets through the handshake.
#[tokio::test]
async fn h5_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), &["coach.clients.example"]);
    let other = tempfile::tempdir().unwrap();
    let rogue = make_pki(other.path(), &["coach.clients.example"]);
    let d = dir.path().to_owned();
    let server = TestServer::start_with(move |cfg| {
        cfg.tls = Some(recvault::config::TlsSection {
            cert_file: d.join("server.pem"),
            key_file: d.join("server.key"),
            client_ca_file: Some(d.join("ca.pem")),
            require_client_cert: true,
        });
        cfg.auth.certificates = vec![CertificatePrincipal {
            subject: "coach.clients.example".into(),
            name: None,
            roles: vec![Role::Coach],
            unredacted: false,
        }];
    })
    .await;
    let (_, cert, key) = &pki.clients[0];
    let mut good = tls_client(server.addr, &pki.ca_pem, Some((cert, key)), None).await;
    let me = good.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (me.principal.as_str(), me.credential.as_str()),
        ("coach.clients.example", "certificate:coach.clients.example")
    );
    let (_, cert, key) = &rogue.clients[0];
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert, key));
    assert!(refused(server.addr, tls, None).await, "a certificate signed by another CA must not authenticate");
    // require_client_cert: a token alone does not get past the handshake.
    let token = server.token_for("coach-2", &[Role::Coach], false).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    assert!(refused(server.addr, tls, Some(&token)).await);
}

/// Purposes are bound to roles; an opt-out removes a customer from every
/// coaching view from the next request on; tokens expire and are revoked
/// for the next request; the bootstrap admin token is private.
#[tokio::test]
async fn purposes_consent_and_token_lifecycle() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let admin_file = server.data.path().join(recvault::auth::ADMIN_TOKEN_FILE);
    assert_eq!(std::fs::metadata(&admin_file).unwrap().permissions().mode() & 0o777, 0o600);
    let mut admin = connect(&server.url(), std::fs::read_to_string(&admin_file).unwrap().trim()).await;
    let mut ingest = server.client_as("telephony-1", &[Role::Ingest], false).await;
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let mut dpo = server.client_as("dpo-1", &[Role::Retention], true).await;

    let kept = put(&mut ingest, spec("pc-keep", CHAT, "text/plain"), b"keep").await.unwrap();
    let gone = put(&mut ingest, spec("pc-optout", CHAT, "text/plain"), b"opt out").await.unwrap();
    // Admin cannot read content; ingest cannot read back what it wrote.
    for c in [&mut admin, &mut ingest] {
        assert_eq!(read_for(c, &kept.object_id, pb::Purpose::Legal).await.unwrap_err().code(), Code::PermissionDenied);
    }
    // A coach reads for coaching, not for legal; a purpose is required.
    assert_eq!(read_for(&mut coach, &kept.object_id, pb::Purpose::Coaching).await.unwrap(), b"keep");
    let s = read_for(&mut coach, &kept.object_id, pb::Purpose::Legal).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = coach
        .get(pb::GetRequest { object_id: kept.object_id.clone(), range: None, purpose: 0 })
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // The break-glass grant reads for a data-subject request.
    assert_eq!(read_for(&mut dpo, &gone.object_id, pb::Purpose::DataSubjectRequest).await.unwrap(), b"opt out");

    // Opt-out: gone from the coach's listing, stat and reads at once.
    dpo.set_consent(pb::SetConsentRequest {
        customer_id: "pc-optout".into(),
        training_use: pb::TrainingUse::Deny as i32,
        updated_by: String::new(),
    })
    .await
    .unwrap();
    let listed = coach.list(pb::ListRequest::default()).await.unwrap().into_inner().objects;
    assert!(listed.iter().any(|o| o.object_id == kept.object_id));
    assert!(!listed.iter().any(|o| o.customer_id == "pc-optout"), "opted-out customers vanish for coaches");
    let all = dpo.list(pb::ListRequest::default()).await.unwrap().into_inner().objects;
    assert!(all.iter().any(|o| o.customer_id == "pc-optout"), "the privacy officer still sees metadata");
    assert_eq!(
        coach.stat(pb::StatRequest { object_id: gone.object_id.clone() }).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        read_for(&mut coach, &gone.object_id, pb::Purpose::Coaching).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Tokens: created by admin, shown once, revoked for the next request.
    let made = admin
        .create_token(pb::CreateTokenRequest {
            name: "qa-1".into(),
            roles: vec![pb::Role::Coach as i32],
            unredacted: false,
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let info = made.info.unwrap();
    let mut qa = connect(&server.url(), &made.token).await;
    assert_eq!(qa.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner().principal, "qa-1");
    let listed = admin.list_tokens(pb::ListTokensRequest {}).await.unwrap().into_inner();
    let shown = listed.tokens.iter().find(|t| t.token_id == info.token_id).unwrap();
    assert_eq!(shown.name, "qa-1");
    assert!(!format!("{listed:?}").contains(&made.token), "the secret is never listed");
    admin.revoke_token(pb::RevokeTokenRequest { token_id: info.token_id.clone() }).await.unwrap();
    let s = qa.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("revoked"), "{}", s.message());
    assert!(!s.message().contains(&made.token[20..]), "no secret in errors");

    // The trail records token creation and revocation by the admin.
    let mut auditor = server.client_as("auditor-1", &[Role::Auditor], false).await;
    let trail = auditor
        .list_audit_records(pb::ListAuditRecordsRequest { action: "token.".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<(&str, &str)> = trail.records.iter().map(|r| (r.action.as_str(), r.principal.as_str())).collect();
    assert!(actions.contains(&("token.create", "local-admin")) && actions.contains(&("token.revoke", "local-admin")));
    for r in &trail.records {
        assert!(!r.detail_json.contains(&made.token[4..]), "no token in the trail");
    }
}

/// Issue #5 point 3 through the API: a coach reads a transcript's redacted
/// rendition (made once, stored as a derived item under the same customer
/// key); the break-glass grant reads the original; a shred takes both.
#[tokio::test]
async fn coaches_read_redacted_transcripts() {
    let server = TestServer::start().await;
    let mut ingest = server.client_as("chat-platform", &[Role::Ingest], false).await;
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let mut dpo = server.client_as("dpo-1", &[Role::Retention], true).await;
    let text = "Customer: my card is 4111 1111 1111 1111, mail me at jane.doe@example.com or call +44 20 7946 0958\n";
    let plain = put(&mut ingest, spec("red-1", CHAT, "text/plain"), text.as_bytes()).await.unwrap();
    let json = br#"{"messages":[{"from":"customer","text":"IBAN DE89 3704 0044 0532 0130 00 please"}]}"#;
    let structured = put(&mut ingest, spec("red-1", CHAT, "application/json"), json).await.unwrap();

    let seen = String::from_utf8(read_for(&mut coach, &plain.object_id, pb::Purpose::Coaching).await.unwrap()).unwrap();
    assert!(seen.contains("[card]") && seen.contains("[email]") && seen.contains("[phone]"), "{seen}");
    for secret in ["4111", "jane.doe", "7946"] {
        assert!(!seen.contains(secret), "{secret} reached a coach: {seen}");
    }
    assert!(seen.starts_with("Customer: my card is [card], mail me at [email]"), "{seen}");
    let seen_json = read_for(&mut coach, &structured.object_id, pb::Purpose::QualityReview).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&seen_json).unwrap();
    assert_eq!(v["messages"][0]["text"], "IBAN [iban] please");

    // The rendition is one stored object, derived from the transcript.
    let mut s = coach
        .get(pb::GetRequest { object_id: plain.object_id.clone(), range: None, purpose: pb::Purpose::Coaching as i32 })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap().info.unwrap();
    assert_eq!(first.derived_from, plain.object_id);
    assert_ne!(first.object_id, plain.object_id);
    let again = read_for(&mut coach, &plain.object_id, pb::Purpose::Coaching).await.unwrap();
    assert_eq!(String::from_utf8(again).unwrap(), seen);
    let listed = dpo
        .list(pb::ListRequest { customer_id: "red-1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .objects;
    assert_eq!(listed.iter().filter(|o| o.derived_from == plain.object_id).count(), 1, "made once");

    // The break-glass grant reads the original.
    assert_eq!(read_for(&mut dpo, &plain.object_id, pb::Purpose::Legal).await.unwrap(), text.as_bytes());

    // One shred covers the transcript and its rendition.
    dpo.shred_customer(pb::ShredCustomerRequest {
        customer_id: "red-1".into(),
        reason: "erasure".into(),
        requested_by: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        read_for(&mut coach, &first.object_id, pb::Purpose::Coaching).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let data = server.data.path().to_owned();
    for needle in [b"[card]".as_slice(), b"4111 1111", b"jane.doe"] {
        assert!(
            files_containing(&data, needle).is_empty(),
            "{} left in the data directory",
            String::from_utf8_lossy(needle)
        );
    }
}

/// Review finding of 2026-12-07: the id under which the server stores a
/// transcript's redacted rendition is derived from the transcript's object
/// id, which the uploader is told. An ingest client must not be able to
/// take it first and so choose what coaches read, unredacted, as "the
/// redacted copy": such ids are refused at `Put` and at an `Ingest` open,
/// and the coach still gets the server's own rendition.
#[tokio::test]
async fn a_client_cannot_take_the_id_of_a_redacted_rendition() {
    let server = TestServer::start().await;
    let mut ingest = server.client_as("chat-platform", &[Role::Ingest], false).await;
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let text = "Customer: my card is 4111 1111 1111 1111\n";
    let plain = put(&mut ingest, spec("plant-1", CHAT, "text/plain"), text.as_bytes()).await.unwrap();
    let source = recvault::model::ObjectId::parse(&plain.object_id).unwrap();
    let taken = recvault::retrieve::rendition_upload_id(&source).to_string();

    let refused = ingest
        .put(pb::PutRequest {
            upload_id: taken.clone(),
            spec: Some(spec("plant-1", CHAT, "text/plain")),
            data: text.as_bytes().to_vec().into(),
            expected_sha256: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("version 8"), "{}", refused.message());
    let open = pb::IngestRequest {
        msg: Some(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
            upload_id: taken,
            spec: Some(spec("plant-1", CHAT, "text/plain")),
        })),
    };
    let refused = match ingest.ingest(tokio_stream::iter([open])).await {
        Err(status) => status,
        Ok(answers) => answers.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let seen = String::from_utf8(read_for(&mut coach, &plain.object_id, pb::Purpose::Coaching).await.unwrap()).unwrap();
    assert_eq!(seen, "Customer: my card is [card]\n");

    // The upload id of a Put is optional, as its documentation says: the
    // server makes a (random) one.
    let fresh = ingest
        .put(pb::PutRequest {
            upload_id: String::new(),
            spec: Some(spec("plant-1", CHAT, "text/plain")),
            data: b"hello".to_vec().into(),
            expected_sha256: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .object
        .unwrap();
    assert_eq!(fresh.size, 5);
}

/// The same finding, below the API: whatever is found under a rendition's
/// id is served (unredacted) only if the server derived it from that
/// transcript. An object put there some other way is refused, never served.
#[tokio::test]
async fn a_rendition_the_server_did_not_derive_is_never_served() {
    let data = tempfile::tempdir().unwrap();
    let cfg = recvault::config::Config { data_dir: data.path().to_owned(), ..Default::default() };
    let parts = recvault::server::open(&cfg).await.unwrap();
    let actor = recvault::audit::Actor::system("test");
    let transcript = |customer: &str| recvault::model::ObjectSpec {
        customer_id: recvault::model::CustomerId::parse(customer).unwrap(),
        kind: recvault::model::ContentKind::ChatTranscript,
        content_type: "text/plain".into(),
        interaction: recvault::model::Interaction { interaction_id: "chat-9".into(), ..Default::default() },
        sensitive_spans: Vec::new(),
    };
    let secret = "card 4111 1111 1111 1111";
    let source = parts
        .ingest
        .put(&actor, recvault::model::UploadId::new_random(), transcript("plant-2"), secret.into(), None)
        .await
        .unwrap();
    let taken = recvault::retrieve::rendition_upload_id(&source.object_id);
    parts.ingest.put(&actor, taken, transcript("plant-2"), secret.into(), None).await.unwrap();

    let coach = recvault::audit::Actor::system("coach-1");
    let whole = recvault::retrieve::ByteRange { start: 0, end: None };
    let read = parts.retrieve.read(&coach, recvault::model::Purpose::Coaching, &source.object_id, whole, true).await;
    let Err(e) = read else { panic!("a planted rendition was served") };
    assert!(matches!(e, recvault::error::Error::Internal(_)), "{e:?}");
}

/// Issue #5 point 4: spans marked sensitive at ingest or later are silenced
/// for coaches, on the fly, in whole reads and seeks alike; the break-glass
/// grant hears the original; a format that cannot be silenced in place is
/// refused to coaches rather than served unmasked.
#[tokio::test]
async fn coaches_hear_silence_over_sensitive_spans() {
    let server = TestServer::start().await;
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let mut dpo = server.client_as("dpo-1", &[Role::Retention], true).await;
    const REC: pb::ContentKind = pb::ContentKind::CallRecording;

    // 10 s of 8 kHz G.711 mu-law; the caller read a card number out at
    // 3.0-7.5 s, marked when the recording was stored.
    let ulaw: Vec<u8> = (0..80_000u32).map(|i| (i % 200) as u8 + 1).collect();
    let mut s = spec("sens-1", REC, "audio/basic");
    s.sensitive_spans = vec![pb::TimeSpan { start_ms: 3000, end_ms: 7500 }];
    let o = put(&mut pbx, s, &ulaw).await.unwrap();
    assert_eq!(o.sensitive_spans.len(), 1);
    let heard = read_for(&mut coach, &o.object_id, pb::Purpose::Coaching).await.unwrap();
    assert_eq!(heard.len(), ulaw.len());
    assert!(heard[24_000..60_000].iter().all(|b| *b == 0xFF), "mu-law silence over the span");
    assert_eq!(&heard[..24_000], &ulaw[..24_000]);
    assert_eq!(&heard[60_000..], &ulaw[60_000..]);
    // A seek into the middle of the span is silenced too.
    let mid = get(&mut coach, &o.object_id, Some((30_000, Some(30_099)))).await.unwrap();
    assert!(mid.iter().all(|b| *b == 0xFF));
    assert_eq!(read_for(&mut dpo, &o.object_id, pb::Purpose::Legal).await.unwrap(), ulaw, "break-glass hears all");

    // A WAV marked after it was stored: the next read is silenced.
    let audio = wav(80_000); // 10 s, 16-bit mono 8 kHz, 44-byte header
    let w = ingest(&mut pbx, &new_id(), spec("sens-1", REC, "audio/wav"), &audio).await;
    assert_eq!(read_for(&mut coach, &w.object_id, pb::Purpose::Coaching).await.unwrap(), audio);
    let marked = coach
        .mark_sensitive(pb::MarkSensitiveRequest {
            object_id: w.object_id.clone(),
            spans: vec![pb::TimeSpan { start_ms: 1000, end_ms: 2000 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(marked.sensitive_spans, vec![pb::TimeSpan { start_ms: 1000, end_ms: 2000 }]);
    let heard = read_for(&mut coach, &w.object_id, pb::Purpose::Coaching).await.unwrap();
    let span = 44 + 16_000..44 + 32_000;
    assert!(heard[span.clone()].iter().all(|b| *b == 0), "PCM silence over 1-2 s");
    assert_eq!(&heard[..span.start], &audio[..span.start], "the header and the rest are untouched");
    assert_eq!(&heard[span.end..], &audio[span.end..]);

    // The platform may mark spans too, but learns nothing else of the
    // object from the answer (ingest is upload only: not even metadata).
    let by_pbx = pbx
        .mark_sensitive(pb::MarkSensitiveRequest {
            object_id: w.object_id.clone(),
            spans: vec![pb::TimeSpan { start_ms: 3000, end_ms: 3500 }],
        })
        .await
        .unwrap()
        .into_inner();
    let only_spans = pb::ObjectInfo {
        object_id: w.object_id.clone(),
        sensitive_spans: vec![
            pb::TimeSpan { start_ms: 1000, end_ms: 2000 },
            pb::TimeSpan { start_ms: 3000, end_ms: 3500 },
        ],
        ..Default::default()
    };
    assert_eq!(by_pbx, only_spans);

    // Bad spans and non-recordings are refused with a reason.
    let bad = coach
        .mark_sensitive(pb::MarkSensitiveRequest {
            object_id: w.object_id.clone(),
            spans: vec![pb::TimeSpan { start_ms: 5, end_ms: 5 }],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let chat = put(&mut pbx, spec("sens-1", CHAT, "text/plain"), b"hi").await.unwrap();
    let bad = coach
        .mark_sensitive(pb::MarkSensitiveRequest {
            object_id: chat.object_id.clone(),
            spans: vec![pb::TimeSpan { start_ms: 0, end_ms: 5 }],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // MP3 cannot be silenced in place: refused to coaches, not leaked.
    let mut mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    mp3.extend(std::iter::repeat_n(0x55u8, 4000));
    let mut s = spec("sens-1", REC, "audio/mpeg");
    s.sensitive_spans = vec![pb::TimeSpan { start_ms: 0, end_ms: 500 }];
    let m = put(&mut pbx, s, &mp3).await.unwrap();
    let refused = read_for(&mut coach, &m.object_id, pb::Purpose::Coaching).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("cannot be silenced"), "{}", refused.message());
    assert_eq!(read_for(&mut dpo, &m.object_id, pb::Purpose::Legal).await.unwrap(), mp3);
}
