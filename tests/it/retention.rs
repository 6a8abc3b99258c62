//! Retention policies, expiry, legal holds, the shred pipeline, the state
//! table and certificates, against a real server (time moved by a
//! `ManualClock`, never by sleeping).

use std::time::Duration;

use recvault::api::pb;
use recvault::clock::{Clock, ManualClock};
use tonic::Code;

use crate::common::*;

const DAY: Duration = Duration::from_secs(86_400);
const REC: pb::ContentKind = pb::ContentKind::CallRecording;
const CHAT: pb::ContentKind = pb::ContentKind::ChatTranscript;
const IMG: pb::ContentKind = pb::ContentKind::Image;

fn with_queue(mut s: pb::ObjectSpec, queue: &str) -> pb::ObjectSpec {
    s.interaction.as_mut().expect("interaction").queue = queue.into();
    s
}

fn with_interaction(mut s: pb::ObjectSpec, id: &str) -> pb::ObjectSpec {
    s.interaction.as_mut().expect("interaction").interaction_id = id.into();
    s
}

async fn sweep(c: &mut Client, dry_run: bool) -> pb::RetentionReport {
    c.run_retention(pb::RunRetentionRequest { dry_run }).await.expect("sweep").into_inner()
}

async fn stat(c: &mut Client, id: &str) -> Result<pb::ObjectInfo, tonic::Status> {
    c.stat(pb::StatRequest { object_id: id.into() }).await.map(|r| r.into_inner())
}

async fn hold(c: &mut Client, customer: &str, interaction: &str) -> pb::Hold {
    c.place_hold(pb::PlaceHoldRequest {
        customer_id: customer.into(),
        interaction_id: interaction.into(),
        case_ref: "CASE-2026-17".into(),
        reason: "pending litigation".into(),
        placed_by: "legal".into(),
    })
    .await
    .expect("hold placed")
    .into_inner()
}

async fn release(c: &mut Client, hold_id: &str) -> Result<pb::Hold, tonic::Status> {
    c.release_hold(pb::ReleaseHoldRequest { hold_id: hold_id.into(), released_by: "legal".into() })
        .await
        .map(|r| r.into_inner())
}

fn ms(ts: &Option<prost_types::Timestamp>) -> i64 {
    ts.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).expect("timestamp")
}

#[tokio::test]
async fn policies_fix_expiry_at_commit_and_the_sweep_expires_the_right_objects() {
    let clock = ManualClock::new();
    let server = TestServer::start_with_clock(clock.clone(), |_| {}).await;
    let mut c = server.client().await;
    // The config's policies are listed and cannot be changed through the API.
    let listed = c.list_retention_policies(pb::ListRetentionPoliciesRequest {}).await.unwrap().into_inner();
    let names: Vec<_> = listed.policies.iter().map(|p| (p.name.as_str(), p.from_config)).collect();
    assert_eq!(names, vec![("call-recordings", true), ("chat-transcripts", true), ("images", true)]);
    let vip = pb::RetentionPolicy {
        name: "vip-calls".into(),
        kind: REC as i32,
        queue: "vip".into(),
        retain_seconds: 365 * 86_400,
        ..Default::default()
    };
    c.set_retention_policy(pb::SetRetentionPolicyRequest { policy: Some(vip.clone()), reapply: false }).await.unwrap();
    let err = c
        .set_retention_policy(pb::SetRetentionPolicyRequest {
            policy: Some(pb::RetentionPolicy { name: "images".into(), ..vip.clone() }),
            reapply: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("config file"), "{}", err.message());

    let t0 = clock.now_ms();
    let image = put(&mut c, spec("pol-1", IMG, "image/jpeg"), &jpeg(64, 64, 100)).await.unwrap();
    let chat = put(&mut c, spec("pol-1", CHAT, "text/plain"), b"hello, how can I help?").await.unwrap();
    let call = ingest(&mut c, &new_id(), spec("pol-1", REC, "audio/wav"), &wav(8000)).await;
    let vip_call = ingest(&mut c, &new_id(), with_queue(spec("pol-1", REC, "audio/wav"), "vip"), &wav(8000)).await;
    for (o, policy, days) in [
        (&image, "images", 30),
        (&chat, "chat-transcripts", 365),
        (&call, "call-recordings", 90),
        (&vip_call, "vip-calls", 365),
    ] {
        let info = stat(&mut c, &o.object_id).await.unwrap();
        assert_eq!(info.retention_policy, policy);
        assert_eq!(ms(&info.expires_at), t0 + days * 86_400_000, "{policy}: fixed at commit");
    }

    // Day 31: the image is due. A dry run reports it and changes nothing.
    clock.advance(31 * DAY);
    let dry = sweep(&mut c, true).await;
    assert_eq!((dry.dry_run, dry.objects_expired, dry.objects_held), (true, 1, 0));
    assert!(stat(&mut c, &image.object_id).await.is_ok());
    let done = sweep(&mut c, false).await;
    assert_eq!(done.objects_expired, 1);
    let err = stat(&mut c, &image.object_id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("expired"), "{}", err.message());
    let err = get(&mut c, &image.object_id, None).await.unwrap_err();
    assert_eq!((err.code(), err.message().contains("expired")), (Code::NotFound, true));
    assert!(files_under(server.data.path()).iter().all(|p| !p.to_string_lossy().contains(&image.object_id)));
    let listed = c.list(pb::ListRequest { customer_id: "pol-1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(listed.into_inner().objects.len(), 3);
    assert_eq!(sweep(&mut c, false).await.objects_expired, 0, "a second sweep finds nothing");

    // A policy change applies to new objects; with reapply, to old ones too.
    let longer = pb::RetentionPolicy { name: "vip-calls".into(), retain_seconds: 1000 * 86_400, ..vip };
    let r = c
        .set_retention_policy(pb::SetRetentionPolicyRequest { policy: Some(longer), reapply: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.objects_updated, 1);
    assert_eq!(ms(&stat(&mut c, &vip_call.object_id).await.unwrap().expires_at), t0 + 1000 * 86_400_000);

    // Day 91: the ordinary call goes; the VIP call and the chat stay.
    clock.advance(60 * DAY);
    assert_eq!(sweep(&mut c, false).await.objects_expired, 1);
    assert_eq!(stat(&mut c, &call.object_id).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut c, &vip_call.object_id, None).await.unwrap(), wav(8000));
    assert!(stat(&mut c, &chat.object_id).await.is_ok());
    // Retrying the expired Put's upload says what happened.
    let err = c
        .put(pb::PutRequest {
            upload_id: image.upload_id.clone(),
            spec: Some(spec("pol-1", IMG, "image/jpeg")),
            data: jpeg(64, 64, 100).into(),
            expected_sha256: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn holds_block_expiry_and_shredding_until_released() {
    let clock = ManualClock::new();
    let server = TestServer::start_with_clock(clock.clone(), |cfg| {
        cfg.retention.shred_grace = 7 * DAY;
    })
    .await;
    let mut c = server.client().await;
    let held =
        put(&mut c, with_interaction(spec("hold-1", IMG, "image/jpeg"), "call-9"), &jpeg(8, 8, 10)).await.unwrap();
    let free =
        put(&mut c, with_interaction(spec("hold-1", IMG, "image/jpeg"), "call-10"), &jpeg(8, 8, 11)).await.unwrap();
    let on_call = hold(&mut c, "hold-1", "call-9").await;
    clock.advance(31 * DAY);
    let r = sweep(&mut c, false).await;
    assert_eq!((r.objects_expired, r.objects_held), (1, 1), "the interaction hold keeps call-9 only");
    assert!(stat(&mut c, &held.object_id).await.is_ok());
    assert_eq!(stat(&mut c, &free.object_id).await.unwrap_err().code(), Code::NotFound);

    // A hold refuses the shred, naming itself.
    let err = shred(&mut c, "hold-1", "dpo").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&on_call.hold_id) && err.message().contains("CASE-2026-17"), "{}", err.message());
    let holds = c.list_holds(pb::ListHoldsRequest { customer_id: "hold-1".into(), include_released: false }).await;
    assert_eq!(holds.unwrap().into_inner().holds.len(), 1);
    release(&mut c, &on_call.hold_id).await.unwrap();
    assert_eq!(release(&mut c, &on_call.hold_id).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(release(&mut c, &new_id()).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(sweep(&mut c, false).await.objects_expired, 1, "released: expiry proceeds");

    // The pipeline: request, locked during grace, cancel restores (E4).
    let audio = wav(4000);
    let o = ingest(&mut c, &new_id(), spec("pipe-1", REC, "audio/wav"), &audio).await;
    let s = shred(&mut c, "pipe-1", "dpo").await.unwrap();
    assert_eq!(s.state, pb::CustomerState::PendingShred as i32);
    assert_eq!(ms(&s.destroy_after) - ms(&s.requested_at), 7 * 86_400_000);
    let err = get(&mut c, &o.object_id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("pending shred"), "{}", err.message());
    let put_err = put(&mut c, spec("pipe-1", CHAT, "text/plain"), b"x").await.unwrap_err();
    assert_eq!(put_err.code(), Code::FailedPrecondition);
    let s = c.cancel_shred(pb::CancelShredRequest { customer_id: "pipe-1".into() }).await.unwrap().into_inner();
    assert_eq!(s.state, pb::CustomerState::Active as i32);
    assert_eq!(get(&mut c, &o.object_id, None).await.unwrap(), audio);

    // Requested again; a hold placed during the grace window pauses it past
    // its deadline; releasing the hold lets it complete at once.
    shred(&mut c, "pipe-1", "dpo").await.unwrap();
    let late = hold(&mut c, "pipe-1", "").await;
    clock.advance(8 * DAY);
    let r = sweep(&mut c, false).await;
    assert_eq!((r.shreds_completed, r.shreds_waiting), (0, 1));
    let s = c.get_shred_status(pb::GetShredStatusRequest { customer_id: "pipe-1".into() }).await.unwrap().into_inner();
    assert_eq!(s.state, pb::CustomerState::PendingShred as i32);
    assert_eq!(s.blocking_holds.len(), 1);
    release(&mut c, &late.hold_id).await.unwrap();
    let s = c.get_shred_status(pb::GetShredStatusRequest { customer_id: "pipe-1".into() }).await.unwrap().into_inner();
    assert_eq!(s.state, pb::CustomerState::Shredded as i32);
    assert_eq!((s.key_versions_destroyed, s.objects_shredded), (1, 1));
    assert_eq!(get(&mut c, &o.object_id, None).await.unwrap_err().message(), "customer shredded");
}

#[tokio::test]
async fn two_person_rule() {
    let server = TestServer::start_with(|cfg| cfg.retention.shred_requires_approval = true).await;
    // H4: the two people are two authenticated principals; the names
    // typed into the requests do not count.
    let mut c = server.client_as("alice", &ALL_ROLES, true).await;
    let mut bob = server.client_as("bob", &[recvault::model::Role::Retention], false).await;
    put(&mut c, spec("tp-1", CHAT, "text/plain"), b"hi").await.unwrap();
    let s = shred(&mut c, "tp-1", "alice").await.unwrap();
    assert_eq!(s.state, pb::CustomerState::PendingShred as i32, "grace 0 but unapproved: pending");
    assert!(s.requires_approval);
    let err = c
        .approve_shred(pb::ApproveShredRequest { customer_id: "tp-1".into(), approver: "bob".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("different person"), "{}", err.message());
    let s = bob
        .approve_shred(pb::ApproveShredRequest { customer_id: "tp-1".into(), approver: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::CustomerState::Shredded as i32);
    assert_eq!((s.requested_by.as_str(), s.approved_by.as_str()), ("alice", "bob"));
    assert!(s.certificate_json.contains("\"approved_by\": \"bob\""), "{}", s.certificate_json);
}

/// The customer key state table of `docs/STATES.md`: every RPC in every
/// state, one fresh customer per cell.
#[tokio::test]
async fn state_table_every_rpc_in_every_state() {
    use Code::{FailedPrecondition as FP, Ok as OK};
    // (rpc, [ACTIVE, PENDING_SHRED, SHREDDED])
    let table: &[(&str, [Code; 3])] = &[
        ("Ingest (new upload)", [OK, FP, FP]),
        ("Ingest (resume)", [OK, FP, FP]),
        ("Put", [OK, FP, FP]),
        ("Stat", [OK, FP, FP]),
        ("Get", [OK, FP, FP]),
        ("List", [OK, FP, FP]),
        ("MarkSensitive", [OK, FP, FP]),
        ("CreatePlaybackLink", [OK, FP, FP]),
        ("Search (by customer)", [OK, OK, OK]),
        ("Sample (by customer)", [OK, OK, OK]),
        ("ShredCustomer", [OK, OK, FP]),
        ("ApproveShred", [FP, OK, FP]),
        ("CancelShred", [FP, OK, FP]),
        ("GetShredStatus", [OK, OK, OK]),
        ("GetShredCertificate", [FP, FP, OK]),
        ("PlaceHold", [OK, OK, FP]),
        ("ReleaseHold", [OK, OK, FP]),
        ("ListHolds", [OK, OK, OK]),
        ("SetConsent", [OK, OK, OK]),
        ("GetConsent", [OK, OK, OK]),
        ("ListAuditRecords (by customer)", [OK, OK, OK]),
    ];
    let doc = include_str!("../../docs/STATES.md");
    let server = TestServer::start_with(|cfg| cfg.retention.shred_requires_approval = true).await;
    let mut c = server.client_as("alice", &ALL_ROLES, true).await;
    let mut bob = server.client_as("bob", &ALL_ROLES, true).await;
    let mut n = 0;
    for (rpc, expected) in table {
        let name = |code: Code| if code == OK { "OK".to_string() } else { format!("{code:?}") };
        let row = format!("| {rpc} | {} | {} | {} |", name(expected[0]), name(expected[1]), name(expected[2]));
        assert!(doc.contains(&row), "docs/STATES.md lacks the row {row}");
        for (state, want) in expected.iter().enumerate() {
            n += 1;
            let customer = format!("st-{n}");
            // Fixture: an object, an unfinished upload, a hold to release.
            let object = put(&mut c, spec(&customer, CHAT, "text/plain"), b"state table").await.unwrap();
            let recording = put(&mut c, spec(&customer, REC, "audio/wav"), &wav(800)).await.unwrap();
            let upload = new_id();
            let mut live = Stream::start(&mut c).await.unwrap();
            live.open(&upload, spec(&customer, REC, "audio/wav")).await.unwrap();
            live.data(0, &wav(100)).await;
            live.acked(wav(100).len() as u64).await.unwrap();
            drop(live);
            // A hold to release: placed before the shred (and released by
            // it) for SHREDDED, placed in the state itself otherwise.
            let earlier = if state == 2 { Some(hold(&mut c, &customer, "").await.hold_id) } else { None };
            if state > 0 {
                if let Some(id) = &earlier {
                    release(&mut c, id).await.unwrap();
                }
                shred(&mut c, &customer, "alice").await.unwrap();
            }
            if state == 2 {
                bob.approve_shred(pb::ApproveShredRequest { customer_id: customer.clone(), approver: "bob".into() })
                    .await
                    .unwrap();
            }
            let hold_id = match earlier {
                Some(id) => id,
                None if *rpc == "ReleaseHold" => hold(&mut c, &customer, "").await.hold_id,
                None => new_id(),
            };
            let got = match *rpc {
                "Ingest (new upload)" => {
                    let mut s = Stream::start(&mut c).await.unwrap();
                    s.open(&new_id(), spec(&customer, REC, "audio/wav")).await.map(drop)
                }
                "Ingest (resume)" => {
                    let mut s = Stream::start(&mut c).await.unwrap();
                    s.open(&upload, spec(&customer, REC, "audio/wav")).await.map(drop)
                }
                "Put" => put(&mut c, spec(&customer, CHAT, "text/plain"), b"more").await.map(drop),
                "Stat" => stat(&mut c, &object.object_id).await.map(drop),
                "Get" => get(&mut c, &object.object_id, None).await.map(drop),
                "List" => {
                    c.list(pb::ListRequest { customer_id: customer.clone(), ..Default::default() }).await.map(drop)
                }
                "MarkSensitive" => c
                    .mark_sensitive(pb::MarkSensitiveRequest {
                        object_id: recording.object_id.clone(),
                        spans: vec![pb::TimeSpan { start_ms: 0, end_ms: 10 }],
                    })
                    .await
                    .map(drop),
                "CreatePlaybackLink" => c
                    .create_playback_link(pb::CreatePlaybackLinkRequest {
                        object_id: recording.object_id.clone(),
                        purpose: pb::Purpose::Legal as i32,
                        ttl_seconds: 0,
                    })
                    .await
                    .map(drop),
                // Content of a customer who is not ACTIVE is left out, not refused.
                "Search (by customer)" => c
                    .search(pb::SearchRequest {
                        filter: Some(pb::SearchFilter { customer_id: customer.clone(), ..Default::default() }),
                        ..Default::default()
                    })
                    .await
                    .map(|r| assert_eq!(r.into_inner().total, if state == 0 { 2 } else { 0 })),
                "Sample (by customer)" => c
                    .sample(pb::SampleRequest {
                        filter: Some(pb::SearchFilter { customer_id: customer.clone(), ..Default::default() }),
                        count: 5,
                        ..Default::default()
                    })
                    .await
                    .map(|r| assert_eq!(r.into_inner().population, if state == 0 { 1 } else { 0 })),
                "ShredCustomer" => shred(&mut c, &customer, "carol").await.map(drop),
                "ApproveShred" => bob
                    .approve_shred(pb::ApproveShredRequest { customer_id: customer.clone(), approver: "bob".into() })
                    .await
                    .map(drop),
                "CancelShred" => {
                    c.cancel_shred(pb::CancelShredRequest { customer_id: customer.clone() }).await.map(drop)
                }
                "GetShredStatus" => {
                    c.get_shred_status(pb::GetShredStatusRequest { customer_id: customer.clone() }).await.map(drop)
                }
                "GetShredCertificate" => {
                    c.get_shred_certificate(pb::GetShredStatusRequest { customer_id: customer.clone() }).await.map(drop)
                }
                "PlaceHold" => c
                    .place_hold(pb::PlaceHoldRequest {
                        customer_id: customer.clone(),
                        interaction_id: String::new(),
                        case_ref: "C".into(),
                        reason: "r".into(),
                        placed_by: "legal".into(),
                    })
                    .await
                    .map(drop),
                "ReleaseHold" => release(&mut c, &hold_id).await.map(drop),
                "ListHolds" => c
                    .list_holds(pb::ListHoldsRequest { customer_id: customer.clone(), include_released: true })
                    .await
                    .map(drop),
                "SetConsent" => c
                    .set_consent(pb::SetConsentRequest {
                        customer_id: customer.clone(),
                        training_use: pb::TrainingUse::Deny as i32,
                        updated_by: String::new(),
                    })
                    .await
                    .map(drop),
                "GetConsent" => c.get_consent(pb::GetConsentRequest { customer_id: customer.clone() }).await.map(drop),
                "ListAuditRecords (by customer)" => c
                    .list_audit_records(pb::ListAuditRecordsRequest {
                        customer_id: customer.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                other => panic!("no driver for {other}"),
            };
            let code = got.as_ref().err().map(|e| e.code()).unwrap_or(OK);
            assert_eq!(code, *want, "{rpc} in state {}: {got:?}", ["ACTIVE", "PENDING_SHRED", "SHREDDED"][state]);
        }
    }
    assert_eq!(n, 63);
}

/// Every key the data directory could leak for one customer: its customer
/// key versions (wrapped and unwrapped), and each object's and unfinished
/// upload's data key (wrapped and unwrapped), read from the live catalog
/// with the root key, as an attacker holding both would.
pub(crate) async fn key_material(
    data: &std::path::Path,
    customer: &str,
) -> (Vec<Vec<u8>>, Vec<(String, Vec<Vec<u8>>)>) {
    use recvault::crypto::wrap;
    use recvault::keys::{FileRootKey, RootKey};
    let root = FileRootKey::open_or_create(&data.join("root.key")).unwrap();
    let db =
        rusqlite::Connection::open_with_flags(data.join("catalog.sqlite"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let cref: Vec<u8> =
        db.query_row("SELECT customer_ref FROM customers WHERE customer_id = ?1", [customer], |r| r.get(0)).unwrap();
    let cref16: [u8; 16] = cref.clone().try_into().unwrap();
    let (version, wrapped_ck): (u32, Vec<u8>) = db
        .query_row("SELECT version, wrapped_key FROM customer_keys WHERE customer_ref = ?1", [&cref], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let ck = root.unwrap(&wrapped_ck, &wrap::customer_key_aad(&cref16, customer, version)).await.unwrap();
    let canary: Vec<u8> =
        db.query_row("SELECT canary FROM customers WHERE customer_ref = ?1", [&cref], |r| r.get(0)).unwrap();
    let customer_keys = vec![ck.expose().to_vec(), wrapped_ck, canary];
    let mut per_object = Vec::new();
    for sql in [
        "SELECT object_id, wrapped_dek FROM objects WHERE customer_ref = ?1 AND wrapped_dek IS NOT NULL",
        "SELECT object_id, wrapped_dek FROM uploads WHERE customer_ref = ?1 AND wrapped_dek IS NOT NULL",
    ] {
        let mut stmt = db.prepare(sql).unwrap();
        let rows: Vec<(String, Vec<u8>)> =
            stmt.query_map([&cref], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
        for (object_id, wrapped) in rows {
            let oid = *uuid::Uuid::parse_str(&object_id).unwrap().as_bytes();
            let dek = wrap::unwrap_key(&ck, &wrapped, &wrap::data_key_aad(&cref16, &oid, version)).unwrap();
            per_object.push((object_id, vec![dek.expose().to_vec(), wrapped]));
        }
    }
    (customer_keys, per_object)
}

fn assert_nowhere(data: &std::path::Path, what: &str, needles: &[Vec<u8>]) {
    for needle in needles {
        let hits = files_containing(data, needle);
        assert!(hits.is_empty(), "{what} ({} bytes) survives in {hits:?}", needle.len());
    }
}

/// L3 + M2 + §3.1: after a shred and after an expiry, no plaintext marker
/// and no key byte (customer key, wrapped customer key, canary, data keys,
/// wrapped data keys) remains anywhere in the data directory: catalog and
/// its WAL, objects, spool, and the server's own log.
#[tokio::test]
async fn l3_no_key_or_plaintext_residue_after_shred_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = data.join("server.log");
    let config = format!(
        "{CHILD_CONFIG}[[retention.policy]]\nname = \"short\"\nkind = \"chat-transcript\"\nretain = \"1s\"\ntag = \"ttl=short\"\n"
    );
    let server = ChildServer::spawn_with(&data, &config, &[("RECVAULT_LOG", "debug")], Some(&log));
    let mut c = server.client().await;
    let marker = b"RESIDUE-CANARY-51c0ffee";
    let text = |n: usize| {
        let mut t = Vec::new();
        for i in 0..n {
            t.extend_from_slice(format!("line {i} ").as_bytes());
            t.extend_from_slice(marker);
            t.push(b'\n');
        }
        t
    };
    // To shred: a transcript, a recording, an unfinished upload.
    put(&mut c, spec("res-s", CHAT, "text/plain"), &text(500)).await.unwrap();
    let mut audio = wav(50_000);
    audio[2000..2000 + marker.len()].copy_from_slice(marker);
    ingest(&mut c, &new_id(), spec("res-s", REC, "audio/wav"), &audio).await;
    let mut live = Stream::start(&mut c).await.unwrap();
    live.open(&new_id(), spec("res-s", REC, "audio/wav")).await.unwrap();
    live.data(0, &audio[..10_000]).await;
    live.acked(10_000).await.unwrap();
    // To expire: one tagged transcript of another customer, who stays.
    let mut short = spec("res-e", CHAT, "text/plain");
    short.interaction.as_mut().unwrap().tags.insert("ttl".into(), "short".into());
    let expiring = put(&mut c, short, &text(300)).await.unwrap();
    let kept = put(&mut c, spec("res-e", CHAT, "text/plain"), b"kept").await.unwrap();

    let (shred_customer_keys, shred_objects) = key_material(&data, "res-s").await;
    assert_eq!(shred_objects.len(), 3, "two objects and one open upload");
    let (_, e_objects) = key_material(&data, "res-e").await;
    let expired_keys: Vec<Vec<u8>> =
        e_objects.iter().filter(|(id, _)| *id == expiring.object_id).flat_map(|(_, k)| k.clone()).collect();
    assert_eq!(expired_keys.len(), 2);
    // The needles are real: before, each key is in the catalog files.
    assert!(!files_containing(&data, &shred_customer_keys[1]).is_empty(), "wrapped customer key present before");

    // Expiry (the 1-second policy; only the sweep is run by hand).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = sweep(&mut c, false).await;
    assert_eq!(r.objects_expired, 1);
    assert_eq!(stat(&mut c, &expiring.object_id).await.unwrap_err().code(), Code::NotFound);
    assert!(stat(&mut c, &kept.object_id).await.is_ok());
    assert_nowhere(&data, "an expired object's data key", &expired_keys);

    // Shred (grace 0).
    let s = shred(&mut c, "res-s", "dpo").await.unwrap();
    assert_eq!(s.state, pb::CustomerState::Shredded as i32);
    assert_eq!((s.objects_shredded, s.uploads_discarded), (2, 1));
    let _ = live.error().await;
    drop(server);
    assert!(std::fs::metadata(&log).unwrap().len() > 0, "the server logged");
    assert_nowhere(&data, "the shredded customer's key", &shred_customer_keys);
    for (object_id, keys) in &shred_objects {
        assert_nowhere(&data, &format!("data key of {object_id}"), keys);
    }
    assert_nowhere(&data, "the plaintext marker", &[marker.to_vec()]);
    assert!(files_under(&data.join("spool")).is_empty(), "journals removed");
}

/// A3: kill -9 between the destroy step and the tombstone. The customer is
/// unreadable throughout, and the restarted server finishes the shred by
/// itself (its start-up sweep) with a certificate that verifies.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a3_kill9_between_destroy_and_tombstone_converges() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = ChildServer::spawn_with(&data, CHILD_CONFIG, &[("FAILPOINTS", "shred-after-destroy=pause")], None);
    let mut c = server.client().await;
    let audio = wav(40_000);
    let o = ingest(&mut c, &new_id(), spec("crash-s", REC, "audio/wav"), &audio).await;
    let other = ingest(&mut c, &new_id(), spec("crash-keep", REC, "audio/wav"), &audio).await;
    let mut shredder = c.clone();
    let pending = tokio::spawn(async move { shred(&mut shredder, "crash-s", "dpo").await });
    // Wait for the destroy step to commit (the failpoint then holds the
    // pipeline still), by reading the catalog as another process would.
    let db =
        rusqlite::Connection::open_with_flags(data.join("catalog.sqlite"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let destroyed = || -> bool {
        db.query_row("SELECT shred_destroyed_at_ms IS NOT NULL FROM customers WHERE customer_id = 'crash-s'", [], |r| {
            r.get(0)
        })
        .unwrap_or(false)
    };
    for _ in 0..600 {
        if destroyed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(destroyed(), "the destroy step never committed");
    server.kill9();
    assert!(pending.await.unwrap().is_err(), "the request died with the server");
    let state: String =
        db.query_row("SELECT state FROM customers WHERE customer_id = 'crash-s'", [], |r| r.get(0)).unwrap();
    assert_eq!(state, "pending_shred", "killed between destroy and tombstone");
    drop(db);

    let server = ChildServer::spawn(&data);
    let mut c = server.client().await;
    let mut status = None;
    for _ in 0..600 {
        let s = c.get_shred_status(pb::GetShredStatusRequest { customer_id: "crash-s".into() }).await.unwrap();
        let s = s.into_inner();
        if s.state == pb::CustomerState::Shredded as i32 {
            status = Some(s);
            break;
        }
        // Never half-readable while it converges.
        assert_eq!(get(&mut c, &o.object_id, None).await.unwrap_err().code(), Code::FailedPrecondition);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the restarted server completes the shred");
    assert_eq!(status.objects_shredded, 1);
    let cert: serde_json::Value = serde_json::from_str(&status.certificate_json).unwrap();
    assert_eq!(cert["certificate"]["canary"]["result"], "passed");
    assert_eq!(cert["certificate"]["canary"]["unwrapped_before_destroy"], serde_json::Value::Null, "resumed");
    let public = std::fs::read_to_string(data.join("signing.pub")).unwrap();
    let key = recvault::retention::certificate::parse_public_key(&public).unwrap();
    recvault::retention::certificate::verify(&status.certificate_json, &key).unwrap();
    // The audit chain shows exactly one shred.complete, and the chain the
    // killed server was writing verifies.
    let completes = c
        .list_audit_records(pb::ListAuditRecordsRequest {
            customer_id: "crash-s".into(),
            action: "shred.complete".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completes.records.len(), 1);
    assert_eq!(
        cert["certificate"]["audit_log_head"],
        format!("{}:{}", completes.records[0].seq, completes.records[0].hash)
    );
    recvault::audit::verify(&data.join("audit.sqlite"), &key).unwrap();
    assert!(files_under(&data.join("objects")).iter().all(|p| !p.to_string_lossy().contains(&o.object_id)));
    assert_eq!(get(&mut c, &other.object_id, None).await.unwrap(), audio);
}

/// E2: a Get streaming when the shred lands stops before its next
/// decrypted batch, with FAILED_PRECONDITION, short of the end.
#[tokio::test]
async fn e2_shred_stops_a_read_in_progress() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(12 << 20); // 24 MiB: more than the HTTP/2 windows hold
    let o = ingest(&mut c, &new_id(), spec("e2-s", REC, "audio/wav"), &audio).await;
    let mut stream = c
        .get(pb::GetRequest {
            object_id: o.object_id.clone(),
            purpose: pb::Purpose::Legal as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0usize;
    while received < (1 << 20) {
        received += stream.message().await.unwrap().expect("more").data.len();
    }
    let mut other = server.client().await;
    assert_eq!(shred(&mut other, "e2-s", "dpo").await.unwrap().state, pb::CustomerState::Shredded as i32);
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => received += m.data.len(),
            Ok(None) => panic!("the read ran to its end ({received} bytes) after the shred"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(received < audio.len());
}

/// Abandoned uploads past their TTL and orphaned journals are swept and
/// counted; a live upload and committed objects are left alone (A5).
#[tokio::test]
async fn a5_abandoned_uploads_and_orphan_journals_are_swept() {
    let clock = ManualClock::new();
    let server = TestServer::start_with_clock(clock.clone(), |_| {}).await;
    let mut c = server.client().await;
    let audio = wav(20_000);
    let committed = ingest(&mut c, &new_id(), spec("gc-1", REC, "audio/wav"), &audio).await;
    let abandoned = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&abandoned, spec("gc-1", REC, "audio/wav")).await.unwrap();
    s.data(0, &audio[..4000]).await;
    s.acked(4000).await.unwrap();
    drop(s);
    let spool = server.data.path().join("spool");
    std::fs::write(spool.join(format!("{}.journal", new_id())), b"left by a crash").unwrap();
    // Not yet past the TTL: the orphan goes, the resumable upload stays.
    clock.advance(DAY);
    let r = sweep(&mut c, false).await;
    assert_eq!((r.uploads_abandoned, r.orphan_journals_removed), (0, 1));
    assert_eq!(spooled_uploads(&spool).len(), 1, "the abandoned upload's journal is kept within its TTL");
    // A live upload, older than the TTL but streaming, is not touched.
    let live_id = new_id();
    let mut live = Stream::start(&mut c).await.unwrap();
    live.open(&live_id, spec("gc-1", REC, "audio/wav")).await.unwrap();
    live.data(0, &audio[..4000]).await;
    live.acked(4000).await.unwrap();
    clock.advance(8 * DAY);
    let dry = sweep(&mut c, true).await;
    assert_eq!(dry.uploads_abandoned, 1);
    let r = sweep(&mut c, false).await;
    assert_eq!((r.uploads_abandoned, r.orphan_journals_removed), (1, 0));
    assert_eq!(spooled_uploads(&spool).len(), 1, "only the live upload's journal remains");
    // The discard destroyed received audio: it is in the audit trail.
    let discards = audit_of(&mut c, "upload.discard").await;
    assert_eq!(discards.len(), 1, "{discards:?}");
    assert_eq!(discards[0].customer_id, "gc-1");
    assert!(discards[0].detail_json.contains(&abandoned), "{:?}", discards[0]);
    let mut again = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = again.open(&abandoned, spec("gc-1", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, 0, "a discarded upload starts over");
    live.data(4000, &audio[4000..]).await;
    live.finish(Some(sha256(&audio)), audio.len() as u64).await;
    live.committed().await.unwrap();
    assert_eq!(get(&mut c, &committed.object_id, None).await.unwrap(), audio);
}

/// Derived items are stored under their source's customer key, inherit its
/// interaction and retention, and go with the customer's shred.
#[tokio::test]
async fn derived_items_share_the_customer_key_and_its_fate() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = recvault::config::Config { data_dir: data.path().to_owned(), ..Default::default() };
    cfg.retention.shred_grace = Duration::ZERO;
    let parts = recvault::server::open(&cfg).await.unwrap();
    let customer = recvault::model::CustomerId::parse("der-1").unwrap();
    let actor = recvault::audit::Actor::system("test");
    let spec = recvault::model::ObjectSpec {
        customer_id: customer.clone(),
        kind: recvault::model::ContentKind::ChatTranscript,
        content_type: "text/plain".into(),
        interaction: recvault::model::Interaction { interaction_id: "chat-7".into(), ..Default::default() },
        sensitive_spans: Vec::new(),
    };
    let source = parts
        .ingest
        .put(&actor, recvault::model::UploadId::new_random(), spec, "card 4111 1111 1111 1111".into(), None)
        .await
        .unwrap();
    let derived = parts
        .ingest
        .put_derived(
            &actor,
            recvault::model::UploadId::new_random(),
            &source.object_id,
            recvault::model::ContentKind::ChatTranscript,
            "text/plain",
            "card [REDACTED]".into(),
        )
        .await
        .unwrap();
    assert_eq!(derived.spec.customer_id, customer);
    assert_eq!(derived.spec.interaction.interaction_id, "chat-7");
    assert_eq!(derived.derived_from, Some(source.object_id));
    assert_eq!(derived.retention, source.retention, "never outlives its source");
    let stored = parts.catalog.object(&derived.object_id).await.unwrap().unwrap();
    let src = parts.catalog.object(&source.object_id).await.unwrap().unwrap();
    assert_eq!((stored.customer_ref, stored.key_version), (src.customer_ref, src.key_version));
    parts.retention.request_shred(&actor, &customer, "erasure", "dpo").await.unwrap();
    assert!(parts.retrieve.stat(&derived.object_id, false).await.is_err());
    let tomb = parts.catalog.object(&derived.object_id).await.unwrap().unwrap();
    assert!(tomb.wrapped_dek.is_empty(), "the shred destroyed the derived item's data key");
    assert!(
        parts
            .ingest
            .put_derived(
                &actor,
                recvault::model::UploadId::new_random(),
                &source.object_id,
                recvault::model::ContentKind::ChatTranscript,
                "text/plain",
                "x".into(),
            )
            .await
            .is_err(),
        "nothing is derived from shredded content"
    );
}

/// A3 for expiry: the process dies after the catalog scrubbed the data keys
/// of due objects and before their ciphertext was deleted. The objects are
/// unreadable from that commit on (NOT_FOUND "expired", before and after
/// the restart); the restarted server deletes the leftover ciphertext at
/// start; content that was not due stays readable throughout.
#[tokio::test]
async fn a3_crash_between_expiry_scrub_and_delete_converges() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "[retention]\nshred_grace = \"0s\"\nsweep_interval = \"1h\"\n\
                  [[retention.policy]]\nname = \"calls\"\nkind = \"call-recording\"\nretain = \"1s\"\n\
                  [[retention.policy]]\nname = \"chats\"\nkind = \"chat-transcript\"\nretain = \"365days\"\n";
    let mut server = ChildServer::spawn_with(&data, config, &[("FAILPOINTS", "expire-after-scrub=panic")], None);
    let mut c = server.client().await;
    let audio = wav(40_000);
    let due = ingest(&mut c, &new_id(), spec("crash-x", REC, "audio/wav"), &audio).await;
    let chat = b"agent: hello\ncustomer: hi".to_vec();
    let kept = put(&mut c, spec("crash-x", pb::ContentKind::ChatTranscript, "text/plain"), &chat).await.unwrap();
    let objects = data.join("objects");
    let ciphertext = files_under(&objects).len();
    assert_eq!(ciphertext, 2);
    // A real clock in a child process: wait out the one-second policy.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.run_retention(pb::RunRetentionRequest { dry_run: false }).await.expect_err("the sweep dies with the process");
    let exit = server.child.wait().expect("reap");
    assert!(!exit.success(), "aborted at the failpoint: {exit:?}");
    drop(server);
    assert_eq!(files_under(&objects).len(), 2, "killed before the ciphertext was deleted");

    let server = ChildServer::spawn_with(&data, config, &[], None);
    let mut c = server.client().await;
    let gone = get(&mut c, &due.object_id, None).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("expired"), "{gone:?}");
    assert_eq!(get(&mut c, &kept.object_id, None).await.unwrap(), chat);
    // The start-up vacuum deletes what the crash left (it runs right after
    // the port opens, so allow it a moment).
    for _ in 0..200 {
        if files_under(&objects).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(files_under(&objects).len(), 1, "only the transcript's ciphertext is left");
    let report = c.run_retention(pb::RunRetentionRequest { dry_run: false }).await.unwrap().into_inner();
    assert_eq!(report.objects_expired, 0, "nothing expires twice");
}
