//! The audit trail against a real server: every security-relevant event
//! leaves one record (I1), the chain verifies offline and names tampering
//! (I2), and an unwritable trail stops reads, shreds and commits (I3).

use recvault::api::pb;
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;
const CHAT: pb::ContentKind = pb::ContentKind::ChatTranscript;

async fn records(c: &mut Client, filter: pb::ListAuditRecordsRequest) -> pb::ListAuditRecordsResponse {
    c.list_audit_records(filter).await.expect("audit records").into_inner()
}

fn public_key(data: &std::path::Path) -> Vec<u8> {
    let text = std::fs::read_to_string(data.join("signing.pub")).expect("signing.pub");
    recvault::retention::certificate::parse_public_key(&text).expect("public key")
}

/// I1: one record per event, with principal, purpose, targets and request
/// id; none holds content; the shred certificate names the chain head that
/// includes its completion; the chain verifies offline.
#[tokio::test]
async fn i1_every_event_is_recorded_once_without_secrets() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let marker = b"AUDIT-CANARY-7f3e card 4111 1111 1111 1111";
    let mut chat = br#"{"messages":[{"from":"customer","text":""#.to_vec();
    chat.extend_from_slice(marker);
    chat.extend_from_slice(br#""}]}"#);
    let call = ingest(&mut c, &new_id(), spec("aud-1", REC, "audio/wav"), &wav(20_000)).await;
    let transcript = put(&mut c, spec("aud-1", CHAT, "application/json"), &chat).await.unwrap();

    let mut read = tonic::Request::new(pb::GetRequest {
        object_id: transcript.object_id.clone(),
        range: None,
        purpose: pb::Purpose::Coaching as i32,
    });
    read.metadata_mut().insert("x-request-id", MetadataValue::from_static("req-coach-42"));
    let mut stream = c.get(read).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}

    let hold = c
        .place_hold(pb::PlaceHoldRequest {
            customer_id: "aud-1".into(),
            interaction_id: String::new(),
            case_ref: "CASE-1".into(),
            reason: "dispute".into(),
            placed_by: "legal".into(),
        })
        .await
        .unwrap()
        .into_inner();
    c.release_hold(pb::ReleaseHoldRequest { hold_id: hold.hold_id.clone(), released_by: "legal".into() })
        .await
        .unwrap();
    let shred = c
        .shred_customer(pb::ShredCustomerRequest {
            customer_id: "aud-1".into(),
            reason: "erasure".into(),
            requested_by: "dpo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shred.state, pb::CustomerState::Shredded as i32);
    // A refused read after the shred is recorded too.
    assert_eq!(get(&mut c, &call.object_id, None).await.unwrap_err().code(), Code::FailedPrecondition);

    let all = records(&mut c, pb::ListAuditRecordsRequest { customer_id: "aud-1".into(), ..Default::default() }).await;
    let actions: Vec<&str> = all.records.iter().rev().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "key.create",
            "object.commit",
            "object.commit",
            "object.read",
            "hold.place",
            "shred.request",
            "shred.destroy",
            "shred.complete",
            "object.read",
        ],
        "hold.release targets the hold, not the customer"
    );
    let read = all.records.iter().find(|r| r.action == "object.read" && r.result == "ok").unwrap();
    assert_eq!((read.purpose.as_str(), read.request_id.as_str()), ("coaching", "req-coach-42"));
    assert_eq!(read.target, transcript.object_id);
    assert_eq!(read.principal, "test-operator", "the authenticated principal, not an address");
    let refused = all.records.first().unwrap();
    assert!(refused.result.starts_with("refused:"), "{refused:?}");
    let commits: Vec<_> = all.records.iter().filter(|r| r.action == "object.commit").map(|r| &r.target).collect();
    assert!(commits.contains(&&call.object_id) && commits.contains(&&transcript.object_id));
    let release =
        records(&mut c, pb::ListAuditRecordsRequest { action: "hold.release".into(), ..Default::default() }).await;
    assert_eq!(release.records.len(), 1);
    assert_eq!(release.records[0].target, hold.hold_id);

    // The certificate names the head that includes shred.complete.
    let complete = all.records.iter().find(|r| r.action == "shred.complete").unwrap();
    let cert: serde_json::Value = serde_json::from_str(&shred.certificate_json).unwrap();
    assert_eq!(cert["certificate"]["audit_log_head"], format!("{}:{}", complete.seq, complete.hash));

    // Prefix search and paging backwards.
    let steps = records(&mut c, pb::ListAuditRecordsRequest { action: "shred.".into(), ..Default::default() }).await;
    assert_eq!(steps.records.len(), 3);
    let page =
        records(&mut c, pb::ListAuditRecordsRequest { before_seq: complete.seq, page_size: 2, ..Default::default() })
            .await;
    assert_eq!(page.records.iter().map(|r| r.seq).collect::<Vec<_>>(), [complete.seq - 1, complete.seq - 2]);

    let data = server.stop().await;
    let v = recvault::audit::verify(&data.path().join("audit.sqlite"), &public_key(data.path())).unwrap();
    assert!(v.records >= all.records.len() as u64 && v.checkpoints >= 1, "{v:?}");
    for file in files_under(data.path()).into_iter().filter(|p| p.to_string_lossy().contains("audit")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker), "content in {}", file.display());
        assert!(!bytes.windows(16).any(|w| w == b"4111 1111 1111 1"), "card number in {}", file.display());
    }
}

/// I1 for metadata reads and refusals: `Stat`, `List`, `Search` and
/// `Sample` each leave one record (customer, filter names and counts; never
/// tag values), refused ones too; a coach's read of a transcript names the
/// transcript it asked for; a refused `MarkSensitive` is recorded.
#[tokio::test]
async fn i1_metadata_reads_and_refusals_are_recorded() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let call = put(&mut c, spec("aud-m", REC, "audio/wav"), &wav(8_000)).await.unwrap();
    let chat = put(&mut c, spec("aud-m", CHAT, "text/plain"), b"agent: hello\ncustomer: card 4111 1111 1111 1111\n")
        .await
        .unwrap();
    let mut coach = server.client_as("coach-m", &[recvault::model::Role::Coach], false).await;

    coach.stat(pb::StatRequest { object_id: call.object_id.clone() }).await.unwrap();
    coach.list(pb::ListRequest { customer_id: "aud-m".into(), ..Default::default() }).await.unwrap();
    let secret_tag = "tag-value-never-audited";
    let filter = pb::SearchFilter {
        customer_id: "aud-m".into(),
        agent_id: "agent-7".into(),
        tags: [("site".to_owned(), secret_tag.to_owned())].into(),
        ..Default::default()
    };
    coach.search(pb::SearchRequest { filter: Some(filter), ..Default::default() }).await.unwrap();
    let only = pb::SearchFilter { customer_id: "aud-m".into(), ..Default::default() };
    let drawn = pb::SampleRequest { filter: Some(only), count: 5, seed: 1, ..Default::default() };
    coach.sample(drawn).await.unwrap();
    let read = tonic::Request::new(pb::GetRequest {
        object_id: chat.object_id.clone(),
        range: None,
        purpose: pb::Purpose::Coaching as i32,
    });
    let mut stream = coach.get(read).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    let wrong_kind = pb::MarkSensitiveRequest {
        object_id: chat.object_id.clone(),
        spans: vec![pb::TimeSpan { start_ms: 0, end_ms: 10 }],
    };
    assert_eq!(c.mark_sensitive(wrong_kind).await.unwrap_err().code(), Code::InvalidArgument);
    // Opted out: a coach's `Stat` is refused, and the refusal recorded.
    c.set_consent(pb::SetConsentRequest {
        customer_id: "aud-m".into(),
        training_use: pb::TrainingUse::Deny as i32,
        updated_by: "dpo".into(),
    })
    .await
    .unwrap();
    let refused = coach.stat(pb::StatRequest { object_id: call.object_id.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let all = records(&mut c, pb::ListAuditRecordsRequest { principal: "coach-m".into(), ..Default::default() }).await;
    let seen: Vec<(&str, &str)> = all.records.iter().rev().map(|r| (r.action.as_str(), r.result.as_str())).collect();
    assert_eq!(
        seen.iter().map(|(a, r)| (*a, r.split(':').next().unwrap())).collect::<Vec<_>>(),
        [
            ("object.stat", "ok"),
            ("object.list", "ok"),
            ("object.search", "ok"),
            ("object.sample", "ok"),
            ("object.read", "ok"),
            ("object.stat", "refused"),
        ],
        "{seen:?}"
    );
    let by_action = |action: &str| all.records.iter().find(|r| r.action == action).unwrap().clone();
    for r in &all.records {
        assert_eq!(r.customer_id, "aud-m", "every record names the customer: {r:?}");
        assert!(!r.detail_json.contains(secret_tag) && !r.detail_json.contains("lisbon"), "no tag values: {r:?}");
    }
    assert_eq!(by_action("object.stat").target, call.object_id);
    let listed: serde_json::Value = serde_json::from_str(&by_action("object.list").detail_json).unwrap();
    assert_eq!(listed["returned"], 2, "{listed}");
    let searched: serde_json::Value = serde_json::from_str(&by_action("object.search").detail_json).unwrap();
    assert_eq!(searched["filters"], serde_json::json!(["agent_id", "tags"]), "{searched}");
    assert_eq!((searched["returned"].as_u64(), searched["total"].as_u64()), (Some(0), Some(0)), "{searched}");
    let sampled: serde_json::Value = serde_json::from_str(&by_action("object.sample").detail_json).unwrap();
    assert!(sampled["population"].as_u64().unwrap() >= 1, "{sampled}");
    let read = by_action("object.read");
    let detail: serde_json::Value = serde_json::from_str(&read.detail_json).unwrap();
    assert_ne!(read.target, chat.object_id, "a coach reads the redacted rendition");
    assert_eq!(detail["requested"], chat.object_id.as_str(), "{detail}");
    assert!(all.records.iter().any(|r| r.result.contains("opted out")));

    let marks =
        records(&mut c, pb::ListAuditRecordsRequest { action: "object.mark_sensitive".into(), ..Default::default() })
            .await;
    assert_eq!(marks.records.len(), 1, "{:?}", marks.records);
    assert!(marks.records[0].result.starts_with("refused:"), "{:?}", marks.records[0]);
    assert_eq!((marks.records[0].customer_id.as_str(), marks.records[0].target.as_str()), ("aud-m", &*chat.object_id));
}

/// I3: with the audit store locked by another writer, reads and shreds
/// fail closed with UNAVAILABLE and change nothing; ingest keeps acking but
/// only commits once its record can be written; all recover after.
#[tokio::test]
async fn i3_unwritable_audit_trail_fails_reads_shreds_and_commits_closed() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(30_000);
    let o = ingest(&mut c, &new_id(), spec("aud-3", REC, "audio/wav"), &audio).await;

    let lock = rusqlite::Connection::open(server.data.path().join("audit.sqlite")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let err = get(&mut c, &o.object_id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit trail"), "{}", err.message());
    // Metadata reads too: no record, no answer.
    let err = c.stat(pb::StatRequest { object_id: o.object_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = c.list(pb::ListRequest { customer_id: "aud-3".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = c
        .shred_customer(pb::ShredCustomerRequest {
            customer_id: "aud-3".into(),
            reason: "erasure".into(),
            requested_by: "dpo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let status =
        c.get_shred_status(pb::GetShredStatusRequest { customer_id: "aud-3".into() }).await.unwrap().into_inner();
    assert_eq!(status.state, pb::CustomerState::Active as i32, "no record, no shred");

    // Ingest: bytes are acked (durable in the journal), the commit waits.
    let upload = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&upload, spec("aud-3", REC, "audio/wav")).await.unwrap();
    s.data(0, &audio).await;
    s.acked(audio.len() as u64).await.unwrap();
    s.finish(None, audio.len() as u64).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    assert_eq!(get(&mut c, &o.object_id, None).await.unwrap(), audio);
    assert_eq!(c.stat(pb::StatRequest { object_id: o.object_id.clone() }).await.unwrap().into_inner().size, o.size);
    // The same upload finishes now, from its durable journal.
    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&upload, spec("aud-3", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, audio.len() as u64);
    s.finish(None, audio.len() as u64).await;
    let committed = s.committed().await.unwrap();
    assert_eq!(get(&mut c, &committed.object_id, None).await.unwrap(), audio);
    let data = server.stop().await;
    recvault::audit::verify(&data.path().join("audit.sqlite"), &public_key(data.path())).unwrap();
}

/// I2 end to end: `recvault audit verify` on a real data directory says
/// intact, then names the record an editor changed, deleted or swapped;
/// `audit tail` and `audit search` print records.
#[tokio::test]
async fn i2_cli_audit_verify_names_the_broken_record() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for i in 0..5 {
        let o = put(&mut c, spec(&format!("aud-cli-{i}"), CHAT, "text/plain"), b"hello").await.unwrap();
        get(&mut c, &o.object_id, None).await.unwrap();
    }
    let url = server.url();
    let token = server.token_for("auditor-1", &[recvault::model::Role::Auditor], false).await;
    let tail = run_cli(&["audit", "tail", "-n", "3", "--server", &url, "--token", &token]).await;
    assert!(tail.status.success(), "{}", String::from_utf8_lossy(&tail.stderr));
    let out = String::from_utf8(tail.stdout).unwrap();
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains("object.read") && out.contains("purpose=quality-review"), "{out}");
    let search =
        run_cli(&["audit", "search", "--customer", "aud-cli-2", "--json", "--server", &url, "--token", &token]).await;
    let out = String::from_utf8(search.stdout).unwrap();
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        lines.iter().map(|v| v["action"].as_str().unwrap()).collect::<Vec<_>>(),
        ["key.create", "object.commit", "object.read"]
    );
    let data = server.stop().await;
    let dir = data.path().to_str().unwrap().to_owned();
    let verify = || run_cli(&["audit", "verify", "--data-dir", &dir]);
    let ok = verify().await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("intact: 15 record(s)"));

    let db = rusqlite::Connection::open(data.path().join("audit.sqlite")).unwrap();
    let cases: [(&str, &str, &str); 3] = [
        (
            "UPDATE records SET purpose = 'legal' WHERE seq = 6",
            "UPDATE records SET purpose = 'quality-review' WHERE seq = 6",
            "record 6: its contents were changed",
        ),
        (
            "UPDATE records SET seq = -1 WHERE seq = 4; UPDATE records SET seq = 4 WHERE seq = 5; UPDATE records SET seq = 5 WHERE seq = -1",
            "UPDATE records SET seq = -1 WHERE seq = 4; UPDATE records SET seq = 4 WHERE seq = 5; UPDATE records SET seq = 5 WHERE seq = -1",
            "record 4 does not follow record 3",
        ),
        (
            "CREATE TABLE saved AS SELECT * FROM records WHERE seq = 9; DELETE FROM records WHERE seq = 9",
            "INSERT INTO records SELECT * FROM saved; DROP TABLE saved",
            "record 9 is missing",
        ),
    ];
    for (tamper, undo, expected) in cases {
        db.execute_batch(tamper).unwrap();
        let broken = verify().await;
        assert!(!broken.status.success());
        let err = String::from_utf8_lossy(&broken.stderr);
        assert!(err.contains(expected), "{tamper}: {err}");
        db.execute_batch(undo).unwrap();
        assert!(verify().await.status.success(), "undoing {tamper} restores the chain");
    }
}

/// Runs the real binary off the runtime (the server under test shares it).
fn run_cli(args: &[&str]) -> impl std::future::Future<Output = std::process::Output> + use<> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let task = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_recvault"))
            .args(&args)
            .env_remove("RECVAULT_SERVER")
            .env_remove("RECVAULT_DATA_DIR")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run recvault")
    });
    async { task.await.expect("cli task") }
}

/// Consent: an opt-out refuses coaching and quality-review reads from the
/// next request on (PERMISSION_DENIED, audited), leaves legal and
/// data-subject reads alone, and can be set before any content exists and
/// through the CLI; an opt-in default refuses customers who never agreed.
#[tokio::test]
async fn consent_opt_out_applies_to_the_next_training_read() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let o = put(&mut c, spec("consent-1", CHAT, "text/plain"), b"hello coach").await.unwrap();
    assert_eq!(read_for(&mut c, &o.object_id, pb::Purpose::Coaching).await.unwrap(), b"hello coach");
    let shown = c.get_consent(pb::GetConsentRequest { customer_id: "consent-1".into() }).await.unwrap().into_inner();
    assert_eq!((shown.training_use, shown.updated_by.as_str()), (pb::TrainingUse::Allow as i32, "default"));

    let out = run_cli(&[
        "consent",
        "set",
        "--customer",
        "consent-1",
        "--training-use",
        "deny",
        "--by",
        "crm-sync",
        "--server",
        &server.url(),
        "--token",
        &server.token_for("privacy-officer", &[recvault::model::Role::Retention], false).await,
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("training use deny (set by crm-sync"));
    for purpose in [pb::Purpose::Coaching, pb::Purpose::QualityReview] {
        let err = read_for(&mut c, &o.object_id, purpose).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("opted out of training use"), "{}", err.message());
    }
    for purpose in [pb::Purpose::Legal, pb::Purpose::DataSubjectRequest] {
        assert_eq!(read_for(&mut c, &o.object_id, purpose).await.unwrap(), b"hello coach");
    }
    let trail = records(&mut c, pb::ListAuditRecordsRequest { customer_id: "consent-1".into(), ..Default::default() })
        .await
        .records;
    let set = trail.iter().find(|r| r.action == "consent.set").expect("consent.set recorded");
    assert!(set.detail_json.contains("\"training_use\":\"deny\""), "{}", set.detail_json);
    assert!(
        trail.iter().any(|r| r.action == "object.read" && r.purpose == "coaching" && r.result.starts_with("refused"))
    );

    c.set_consent(pb::SetConsentRequest {
        customer_id: "consent-1".into(),
        training_use: pb::TrainingUse::Allow as i32,
        updated_by: "crm-sync".into(),
    })
    .await
    .unwrap();
    assert!(read_for(&mut c, &o.object_id, pb::Purpose::Coaching).await.is_ok());
    let bad = c
        .set_consent(pb::SetConsentRequest { customer_id: "consent-1".into(), training_use: 0, updated_by: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Opt-in deployments: nobody is used for training until they agree.
    let strict = TestServer::start_with(|cfg| {
        cfg.consent.default_training_use = recvault::config::TrainingUse::Deny;
    })
    .await;
    let mut c = strict.client().await;
    let o = put(&mut c, spec("consent-2", CHAT, "text/plain"), b"hi").await.unwrap();
    assert_eq!(read_for(&mut c, &o.object_id, pb::Purpose::Coaching).await.unwrap_err().code(), Code::PermissionDenied);
    assert!(read_for(&mut c, &o.object_id, pb::Purpose::Legal).await.is_ok());
    c.set_consent(pb::SetConsentRequest {
        customer_id: "consent-2".into(),
        training_use: pb::TrainingUse::Allow as i32,
        updated_by: "agent-7".into(),
    })
    .await
    .unwrap();
    assert!(read_for(&mut c, &o.object_id, pb::Purpose::Coaching).await.is_ok());
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// M2 / #4.7: no content, no key bytes (raw, hex or base64) in the server's
/// debug log, and no content echoed in any status message, across normal
/// and failing requests.
#[tokio::test]
async fn m2_no_content_or_key_bytes_in_logs_or_status_messages() {
    assert_eq!(base64(b"Many hands"), "TWFueSBoYW5kcw", "the encoder the scan relies on");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let server = ChildServer::spawn_with(&data, CHILD_CONFIG, &[("RECVAULT_LOG", "debug")], Some(&log));
    let token = server.operator_token().await;
    let mut c = connect(&server.url(), &token).await;
    let canary = "LOG-CANARY-9b7e card 4111111111111111 mail jane@example.com";
    let mut messages = Vec::new();
    // A token with the right id and a wrong secret: refused, and neither
    // secret may surface anywhere.
    let (id_part, secret) = token.rsplit_once('_').unwrap();
    let wrong_secret: String = secret.chars().rev().collect();
    let mut forged = connect(&server.url(), &format!("{id_part}_{wrong_secret}")).await;
    let refused = forged.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    messages.push(refused.message().to_owned());

    let o = put(&mut c, spec("logs-1", CHAT, "text/plain"), canary.as_bytes()).await.unwrap();
    let call = ingest(&mut c, &new_id(), spec("logs-1", REC, "audio/wav"), &wav(10_000)).await;
    assert_eq!(read_for(&mut c, &o.object_id, pb::Purpose::Coaching).await.unwrap(), canary.as_bytes());
    // Failing requests that carry the canary as content.
    for (content_type, kind) in
        [("application/json", CHAT), ("image/png", pb::ContentKind::Image), ("audio/wav", REC), ("text/plain", REC)]
    {
        let err = put(&mut c, spec("logs-1", kind, content_type), canary.as_bytes()).await.unwrap_err();
        messages.push(err.message().to_owned());
    }
    let mut nul = canary.as_bytes().to_vec();
    nul.push(0);
    messages.push(put(&mut c, spec("logs-1", CHAT, "text/plain"), &nul).await.unwrap_err().message().to_owned());
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&new_id(), spec("logs-1", CHAT, "text/plain")).await.unwrap();
    s.data(0, canary.as_bytes()).await;
    s.finish(Some(vec![0; 32]), canary.len() as u64).await;
    messages.push(s.error().await.message().to_owned());
    messages.push(get(&mut c, &o.object_id, Some((10_000, None))).await.unwrap_err().message().to_owned());
    c.set_consent(pb::SetConsentRequest {
        customer_id: "logs-1".into(),
        training_use: pb::TrainingUse::Deny as i32,
        updated_by: "crm".into(),
    })
    .await
    .unwrap();
    messages.push(read_for(&mut c, &o.object_id, pb::Purpose::Coaching).await.unwrap_err().message().to_owned());

    let (customer_keys, objects) = crate::retention::key_material(&data, "logs-1").await;
    let mut needles: Vec<Vec<u8>> = customer_keys;
    needles.extend(objects.into_iter().flat_map(|(_, keys)| keys));
    assert!(needles.len() >= 5, "customer key, wrapped key, canary and per-object keys");
    let shred = c
        .shred_customer(pb::ShredCustomerRequest {
            customer_id: "logs-1".into(),
            reason: "erasure".into(),
            requested_by: "dpo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    messages.push(get(&mut c, &call.object_id, None).await.unwrap_err().message().to_owned());
    let admin_token = server.admin_token();
    drop(server);

    let secrets = [secret, wrong_secret.as_str(), admin_token.trim().rsplit_once('_').unwrap().1];
    for m in &messages {
        for part in ["LOG-CANARY", "4111111111111111", "jane@example.com"] {
            assert!(!m.contains(part), "a status message echoes content: {m}");
        }
        for t in secrets {
            assert!(!m.contains(t), "a status message echoes a token: {m}");
        }
    }
    assert!(!shred.certificate_json.contains("LOG-CANARY"));
    let text = std::fs::read(&log).unwrap();
    assert!(text.len() > 1000, "the server logged at debug level");
    let lossy = String::from_utf8_lossy(&text);
    for part in ["LOG-CANARY", "4111111111111111", "jane@example.com"] {
        assert!(!lossy.contains(part), "content in the log");
    }
    for t in secrets {
        assert!(!lossy.contains(t), "a token secret in the log");
    }
    for key in &needles {
        assert!(!text.windows(key.len()).any(|w| w == key.as_slice()), "raw key bytes in the log");
        for form in [hex::encode(key), hex::encode_upper(key), base64(key)] {
            assert!(!lossy.contains(&form[..form.len().min(32)]), "an encoded key in the log");
        }
    }
}
