//! The one conformance suite every `Catalog` implementation must pass.
//!
//! Returns the destroyed wrapped-key bytes, so a caller that can see the
//! engine's files can check none of them survives there.

use super::{
    Catalog, CatalogError, CustomerKeyRecord, CustomerRecord, CustomerState, ListFilter, PageCursor, ShredRequest,
    StoredPolicy, UploadRecord,
};
use crate::model::{
    Consent, ContentKind, CustomerId, CustomerRef, Hold, HoldId, Interaction, ObjectId, ObjectRecord, ObjectSpec,
    Retention, RetentionPolicy, Role, TimeSpan, TokenRecord, UploadId,
};

fn spec(customer: &str, interaction: &str) -> ObjectSpec {
    ObjectSpec {
        customer_id: CustomerId::parse(customer).unwrap(),
        kind: ContentKind::ChatTranscript,
        content_type: "text/plain".into(),
        interaction: Interaction {
            interaction_id: interaction.into(),
            agent_id: "agent-7".into(),
            tags: [("lang".to_string(), "en".to_string())].into(),
            duration_ms: Some(if interaction == "call-2" { 300_000 } else { 60_000 }),
            ..Default::default()
        },
        sensitive_spans: Vec::new(),
    }
}

async fn new_customer(cat: &dyn Catalog, id: &str, marker: u8) -> CustomerRecord {
    let customer = CustomerRecord {
        customer_ref: CustomerRef::new_random(),
        customer_id: CustomerId::parse(id).unwrap(),
        state: CustomerState::Active,
        active_version: 1,
        canary: vec![marker ^ 0x55; 61],
        created_at_ms: 1,
    };
    let key = CustomerKeyRecord {
        customer_ref: customer.customer_ref,
        version: 1,
        root_key_id: "test".into(),
        wrapped_key: vec![marker; 61],
    };
    let stored = cat.create_customer(&customer, &key).await.unwrap();
    assert_eq!(stored, customer);
    // A racing second creation returns the first customer unchanged.
    let racer = CustomerRecord { customer_ref: CustomerRef::new_random(), ..customer.clone() };
    assert_eq!(cat.create_customer(&racer, &key).await.unwrap(), customer);
    customer
}

async fn commit(cat: &dyn Catalog, customer: &CustomerRecord, interaction: &str, at: i64, dek: u8) -> ObjectRecord {
    let upload = UploadRecord {
        upload_id: UploadId::new_random(),
        object_id: ObjectId::new_random(),
        customer_ref: customer.customer_ref,
        spec: spec(customer.customer_id.as_str(), interaction),
        key_version: 1,
        wrapped_dek: vec![dek; 61],
        nonce_prefix: [dek; 7],
        created_at_ms: at,
        committed: false,
    };
    assert_eq!(cat.create_upload(&upload).await.unwrap(), upload);
    let record = ObjectRecord {
        object_id: upload.object_id,
        upload_id: upload.upload_id,
        spec: upload.spec.clone(),
        size: 42,
        sha256: [dek; 32],
        created_at_ms: at,
        retention: Retention { policy: "chats".into(), expires_at_ms: Some(at + 10_000) },
        derived_from: None,
    };
    let stored = cat.commit_upload(&record).await.unwrap();
    assert_eq!(stored, record);
    // Idempotent: a retried commit returns the first object.
    let retry = ObjectRecord { created_at_ms: at + 1000, ..record.clone() };
    assert_eq!(cat.commit_upload(&retry).await.unwrap(), record);
    let u = cat.upload(&upload.upload_id).await.unwrap().unwrap();
    assert!(u.committed);
    assert!(u.wrapped_dek.is_empty(), "the upload row drops its key copy at commit");
    record
}

/// Runs the suite. Returns key bytes that must no longer exist anywhere.
pub async fn run(cat: &dyn Catalog) -> Vec<Vec<u8>> {
    // meta
    assert_eq!(cat.meta_get("k").await.unwrap(), None);
    assert_eq!(cat.meta_put_if_absent("k", b"one").await.unwrap(), b"one");
    assert_eq!(cat.meta_put_if_absent("k", b"two").await.unwrap(), b"one");

    // Consent: recorded even before a customer has content; replaced.
    let carol = CustomerId::parse("crm:carol").unwrap();
    assert_eq!(cat.consent(&carol).await.unwrap(), None);
    let deny =
        Consent { customer_id: carol.clone(), training_use: false, updated_by: "crm-sync".into(), updated_at_ms: 5 };
    cat.set_consent(&deny).await.unwrap();
    assert_eq!(cat.consent(&carol).await.unwrap(), Some(deny.clone()));
    let allow = Consent { training_use: true, updated_at_ms: 6, ..deny };
    cat.set_consent(&allow).await.unwrap();
    assert_eq!(cat.consent(&carol).await.unwrap(), Some(allow));

    // Tokens: stored by hash, ids unique, revocation idempotent.
    let token = TokenRecord {
        token_id: "0123456789abcdef0123456789abcdef".into(),
        name: "telephony-1".into(),
        roles: vec![Role::Ingest, Role::Coach],
        unredacted: true,
        secret_sha256: [7; 32],
        created_by: "local-admin".into(),
        created_at_ms: 10,
        expires_at_ms: Some(99),
        revoked_at_ms: None,
    };
    cat.create_token(&token).await.unwrap();
    assert!(matches!(cat.create_token(&token).await, Err(CatalogError::Conflict(_))));
    assert_eq!(cat.token(&token.token_id).await.unwrap(), Some(token.clone()));
    assert_eq!(cat.token("ffffffffffffffffffffffffffffffff").await.unwrap(), None);
    let later = TokenRecord {
        token_id: "fedcba9876543210fedcba9876543210".into(),
        roles: vec![Role::Auditor],
        unredacted: false,
        expires_at_ms: None,
        created_at_ms: 11,
        ..token.clone()
    };
    cat.create_token(&later).await.unwrap();
    let all = cat.tokens().await.unwrap();
    assert_eq!(all.iter().map(|t| t.token_id.as_str()).collect::<Vec<_>>(), [&later.token_id, &token.token_id]);
    let revoked = cat.revoke_token(&token.token_id, 20).await.unwrap();
    assert_eq!(revoked.revoked_at_ms, Some(20));
    assert_eq!(cat.revoke_token(&token.token_id, 30).await.unwrap().revoked_at_ms, Some(20));
    assert!(matches!(cat.revoke_token("nope", 30).await, Err(CatalogError::NotFound)));

    let alice = new_customer(cat, "crm:alice", 0xA1).await;
    let bob = new_customer(cat, "crm:bob", 0xB0).await;
    assert_eq!(cat.customer(&alice.customer_id).await.unwrap(), Some(alice.clone()));
    assert_eq!(cat.customer(&CustomerId::parse("nobody").unwrap()).await.unwrap(), None);
    let key = cat.customer_key(&alice.customer_ref, 1).await.unwrap().unwrap();
    assert_eq!(key.wrapped_key, vec![0xA1; 61]);
    assert_eq!(cat.customer_key(&alice.customer_ref, 2).await.unwrap(), None);

    // Uploads: an existing id returns the existing record.
    let a1 = commit(cat, &alice, "call-1", 100, 0xC1).await;
    let a2 = commit(cat, &alice, "call-2", 200, 0xC2).await;
    let a3 = commit(cat, &alice, "call-2", 300, 0xC3).await;
    let b1 = commit(cat, &bob, "call-9", 250, 0xD1).await;
    let open = UploadRecord {
        upload_id: UploadId::new_random(),
        object_id: ObjectId::new_random(),
        customer_ref: alice.customer_ref,
        spec: spec("crm:alice", "call-3"),
        key_version: 1,
        wrapped_dek: vec![0xE1; 61],
        nonce_prefix: [1; 7],
        created_at_ms: 400,
        committed: false,
    };
    cat.create_upload(&open).await.unwrap();
    let dup = UploadRecord { object_id: ObjectId::new_random(), ..open.clone() };
    assert_eq!(cat.create_upload(&dup).await.unwrap(), open);
    // Unfinished uploads are never listed.
    let all = cat.list_objects(&ListFilter::default(), None, 100).await.unwrap();
    let ids: Vec<_> = all.iter().map(|o| o.object_id).collect();
    assert_eq!(ids, vec![a3.object_id, b1.object_id, a2.object_id, a1.object_id], "newest first");

    // Filters and pages.
    let only_alice = ListFilter { customer_id: Some(alice.customer_id.clone()), ..Default::default() };
    let page1 = cat.list_objects(&only_alice, None, 2).await.unwrap();
    assert_eq!(page1.iter().map(|o| o.object_id).collect::<Vec<_>>(), vec![a3.object_id, a2.object_id]);
    let last = page1.last().unwrap();
    let cursor = PageCursor { created_at_ms: last.created_at_ms, object_id: last.object_id };
    let page2 = cat.list_objects(&only_alice, Some(cursor), 2).await.unwrap();
    assert_eq!(page2.iter().map(|o| o.object_id).collect::<Vec<_>>(), vec![a1.object_id]);
    let by_interaction = ListFilter {
        interaction_id: Some("call-2".into()),
        created_after_ms: Some(250),
        created_before_ms: Some(301),
        kind: Some(ContentKind::ChatTranscript),
        ..Default::default()
    };
    let found = cat.list_objects(&by_interaction, None, 10).await.unwrap();
    assert_eq!(found, vec![a3.clone()]);
    let images = ListFilter { kind: Some(ContentKind::Image), ..Default::default() };
    assert!(cat.list_objects(&images, None, 10).await.unwrap().is_empty());

    // Search filters and counts: metadata, tags, originals, consent.
    assert_eq!(cat.count_objects(&ListFilter::default()).await.unwrap(), 4);
    assert_eq!(cat.count_objects(&only_alice).await.unwrap(), 3);
    let tagged = ListFilter {
        agent_id: Some("agent-7".into()),
        tags: vec![("lang".into(), "en".into())],
        originals_only: true,
        ..Default::default()
    };
    assert_eq!(cat.count_objects(&tagged).await.unwrap(), 4);
    let other_tag = ListFilter { tags: vec![("lang".into(), "pt".into())], ..Default::default() };
    assert_eq!(cat.count_objects(&other_tag).await.unwrap(), 0);
    // Duration bounds are inclusive; "call-2" lasted 5 minutes, the others 1.
    let lasted = |min: Option<u64>, max: Option<u64>| ListFilter {
        min_duration_ms: min,
        max_duration_ms: max,
        ..Default::default()
    };
    assert_eq!(cat.count_objects(&lasted(Some(60_000), None)).await.unwrap(), 4);
    assert_eq!(cat.count_objects(&lasted(Some(60_001), None)).await.unwrap(), 2, "the two call-2 objects");
    assert_eq!(cat.count_objects(&lasted(None, Some(60_000))).await.unwrap(), 2);
    assert_eq!(cat.count_objects(&lasted(Some(60_001), Some(299_999))).await.unwrap(), 0);
    let other_agent = ListFilter { agent_id: Some("agent-8".into()), ..Default::default() };
    assert!(cat.list_objects(&other_agent, None, 10).await.unwrap().is_empty());
    let ids = |v: Vec<ObjectRecord>| v.into_iter().map(|o| o.object_id).collect::<Vec<_>>();
    let bob_out = Consent {
        customer_id: bob.customer_id.clone(),
        training_use: false,
        updated_by: "crm".into(),
        updated_at_ms: 7,
    };
    cat.set_consent(&bob_out).await.unwrap();
    let opt_out_default = ListFilter { training_use: Some(true), ..Default::default() };
    assert_eq!(
        ids(cat.list_objects(&opt_out_default, None, 10).await.unwrap()),
        vec![a3.object_id, a2.object_id, a1.object_id],
        "an opted-out customer vanishes"
    );
    let opt_in_default = ListFilter { training_use: Some(false), ..Default::default() };
    assert_eq!(cat.count_objects(&opt_in_default).await.unwrap(), 0, "with opt-in, nobody who did not opt in");
    let alice_in = Consent {
        customer_id: alice.customer_id.clone(),
        training_use: true,
        updated_by: "crm".into(),
        updated_at_ms: 8,
    };
    cat.set_consent(&alice_in).await.unwrap();
    assert_eq!(cat.count_objects(&opt_in_default).await.unwrap(), 3);

    let stored = cat.object(&a1.object_id).await.unwrap().unwrap();
    assert_eq!(stored.record, a1);
    assert_eq!(stored.wrapped_dek, vec![0xC1; 61]);
    assert_eq!(stored.customer_state, CustomerState::Active);
    assert_eq!(cat.object(&ObjectId::new_random()).await.unwrap(), None);

    // Discarding an upload forgets it; committed uploads cannot be discarded.
    let gone = UploadRecord { upload_id: UploadId::new_random(), object_id: ObjectId::new_random(), ..open.clone() };
    cat.create_upload(&gone).await.unwrap();
    cat.discard_upload(&gone.upload_id).await.unwrap();
    assert_eq!(cat.upload(&gone.upload_id).await.unwrap(), None);
    cat.discard_upload(&a1.upload_id).await.unwrap();
    assert!(cat.upload(&a1.upload_id).await.unwrap().is_some());

    // Policies: config-defined ones change only through the config.
    let policy = |name: &str, days: u64| RetentionPolicy {
        name: name.into(),
        kind: ContentKind::ChatTranscript,
        queue: None,
        channel: None,
        tag: Some(("lang".into(), "en".into())),
        retain_secs: days * 86_400,
    };
    cat.put_policy(&StoredPolicy { policy: policy("chats", 30), from_config: true, updated_at_ms: 1 }).await.unwrap();
    cat.put_policy(&StoredPolicy { policy: policy("extra", 60), from_config: false, updated_at_ms: 2 }).await.unwrap();
    assert!(matches!(
        cat.put_policy(&StoredPolicy { policy: policy("chats", 1), from_config: false, updated_at_ms: 3 }).await,
        Err(CatalogError::Conflict(_))
    ));
    assert!(matches!(cat.delete_policy("chats", false).await, Err(CatalogError::Conflict(_))));
    assert!(matches!(cat.delete_policy("nope", false).await, Err(CatalogError::NotFound)));
    cat.delete_policy("extra", false).await.unwrap();
    let policies = cat.policies().await.unwrap();
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].policy, policy("chats", 30));
    assert!(policies[0].from_config);

    // Holds: on a customer, on an interaction; listing; release once.
    let hold = |customer: &str, interaction: Option<&str>| Hold {
        hold_id: HoldId::new_random(),
        customer_id: CustomerId::parse(customer).unwrap(),
        interaction_id: interaction.map(str::to_owned),
        case_ref: "CASE-1".into(),
        reason: "litigation".into(),
        placed_by: "legal".into(),
        placed_at_ms: 50,
        released_by: None,
        released_at_ms: None,
    };
    let on_call1 = cat.place_hold(&hold("crm:alice", Some("call-1"))).await.unwrap();
    let on_bob = cat.place_hold(&hold("crm:bob", None)).await.unwrap();
    assert_eq!(cat.holds(Some(&alice.customer_id), false).await.unwrap(), vec![on_call1.clone()]);
    assert_eq!(cat.holds(None, false).await.unwrap().len(), 2);

    // Expiry: a1 (held interaction) and b1 (held customer) stay; a2 goes.
    assert_eq!(cat.count_expiring(10_050).await.unwrap(), super::ExpiryCount { due: 0, held: 0 });
    let due = cat.count_expiring(10_250).await.unwrap();
    assert_eq!(due, super::ExpiryCount { due: 3, held: 2 }, "a1, a2, b1 due; a1 and b1 held");
    let expired = cat.expire_objects(10_250, 100).await.unwrap();
    assert_eq!(expired.iter().map(|e| e.object_id).collect::<Vec<_>>(), vec![a2.object_id]);
    assert!(cat.expire_objects(10_250, 100).await.unwrap().is_empty(), "expiry is idempotent");
    let tomb = cat.object(&a2.object_id).await.unwrap().unwrap();
    assert_eq!(tomb.expired_at_ms, Some(10_250));
    assert!(tomb.wrapped_dek.is_empty());
    assert_eq!(tomb.record.sha256, [0; 32], "no content-derived data in an expiry tombstone");
    assert!(tomb.record.spec.interaction.tags.is_empty() && tomb.record.spec.interaction.interaction_id.is_empty());
    let upload = cat.upload(&a2.upload_id).await.unwrap().unwrap();
    assert!(upload.spec.interaction.tags.is_empty(), "the upload row is scrubbed too");
    assert_eq!(cat.expired_objects(None, 10).await.unwrap(), vec![a2.object_id]);
    assert!(cat.list_objects(&only_alice, None, 10).await.unwrap().iter().all(|o| o.object_id != a2.object_id));
    // Sensitive spans merge; an erased object takes none.
    let span = |a, b| TimeSpan { start_ms: a, end_ms: b };
    assert_eq!(cat.add_sensitive_spans(&a3.object_id, &[span(5, 9)]).await.unwrap(), vec![span(5, 9)]);
    let merged = cat.add_sensitive_spans(&a3.object_id, &[span(8, 12), span(0, 1)]).await.unwrap();
    assert_eq!(merged, vec![span(0, 1), span(5, 12)]);
    assert_eq!(cat.object(&a3.object_id).await.unwrap().unwrap().record.spec.sensitive_spans, merged);
    assert!(matches!(cat.add_sensitive_spans(&a2.object_id, &[span(0, 1)]).await, Err(CatalogError::NotFound)));
    assert!(tomb.record.spec.sensitive_spans.is_empty());
    // Re-fixing retention moves a3's expiry out.
    cat.set_retention(&a3.object_id, &Retention { policy: "chats".into(), expires_at_ms: Some(99_999) }).await.unwrap();
    assert_eq!(cat.object(&a3.object_id).await.unwrap().unwrap().record.retention.expires_at_ms, Some(99_999));
    assert_eq!(cat.unfinished_uploads(i64::MAX).await.unwrap(), vec![open.clone()]);
    assert!(cat.unfinished_uploads(400).await.unwrap().is_empty());

    // Shred pipeline. Holds refuse the request, naming the hold.
    let request = ShredRequest {
        reason: "erasure request".into(),
        requested_by: "alice-admin".into(),
        requested_at_ms: 500,
        destroy_after_ms: 500,
        requires_approval: true,
    };
    match cat.request_shred(&alice.customer_id, &request).await {
        Err(CatalogError::Held(holds)) => assert_eq!(holds, vec![on_call1.clone()]),
        other => panic!("expected Held, got {other:?}"),
    }
    let released = cat.release_hold(&on_call1.hold_id, "legal", 450).await.unwrap();
    assert_eq!(released.released_at_ms, Some(450));
    assert!(matches!(cat.release_hold(&on_call1.hold_id, "legal", 451).await, Err(CatalogError::Conflict(_))));
    assert!(matches!(cat.release_hold(&HoldId::new_random(), "legal", 451).await, Err(CatalogError::NotFound)));
    assert_eq!(cat.holds(Some(&alice.customer_id), true).await.unwrap(), vec![released]);

    // Request, cancel, request again.
    let ticket = cat.request_shred(&alice.customer_id, &request).await.unwrap();
    assert_eq!(ticket.state, CustomerState::PendingShred);
    assert_eq!(cat.customer(&alice.customer_id).await.unwrap().unwrap().state, CustomerState::PendingShred);
    assert_eq!(cat.object(&a1.object_id).await.unwrap().unwrap().customer_state, CustomerState::PendingShred);
    assert!(cat.list_objects(&only_alice, None, 10).await.unwrap().is_empty(), "pending customers are not listed");
    assert!(matches!(cat.commit_upload(&a1).await, Err(CatalogError::CustomerState(CustomerState::PendingShred))));
    let again = ShredRequest { reason: "other".into(), ..request.clone() };
    assert_eq!(cat.request_shred(&alice.customer_id, &again).await.unwrap(), ticket, "a repeat is idempotent");
    assert_eq!(cat.cancel_shred(&alice.customer_id).await.unwrap().state, CustomerState::Active);
    assert_eq!(cat.customer(&alice.customer_id).await.unwrap().unwrap().state, CustomerState::Active);
    assert!(matches!(
        cat.cancel_shred(&alice.customer_id).await,
        Err(CatalogError::CustomerState(CustomerState::Active))
    ));
    cat.request_shred(&alice.customer_id, &request).await.unwrap();
    assert_eq!(cat.pending_shreds().await.unwrap().len(), 1);

    // Two-person rule.
    assert!(matches!(cat.approve_shred(&alice.customer_id, "alice-admin", 510).await, Err(CatalogError::Conflict(_))));
    let approved = cat.approve_shred(&alice.customer_id, "second-admin", 520).await.unwrap();
    assert_eq!(approved.approved_by.as_deref(), Some("second-admin"));
    assert_eq!(approved.approved_at_ms, Some(520));

    // A hold placed during the grace window blocks the destroy step.
    let late_hold = cat.place_hold(&hold("crm:alice", None)).await.unwrap();
    assert!(matches!(cat.destroy_customer_keys(&alice.customer_id, 530).await, Err(CatalogError::Held(_))));
    cat.release_hold(&late_hold.hold_id, "legal", 540).await.unwrap();

    // Destroy: keys, data keys, metadata and open uploads go; bob stays.
    assert!(matches!(cat.complete_shred(&alice.customer_id, "{}", 545).await, Err(CatalogError::Conflict(_))));
    let destroyed = cat.destroy_customer_keys(&alice.customer_id, 550).await.unwrap();
    let d = destroyed.destroyed.clone().expect("destroyed");
    assert_eq!(d.key_versions, vec![1]);
    assert_eq!(d.root_key_ids, vec!["test".to_string()]);
    assert_eq!(d.objects, 2, "a1 and a3 (a2 had already expired)");
    assert_eq!(d.uploads, 1);
    let mut ids = [a1.object_id.to_string(), a3.object_id.to_string()];
    ids.sort();
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{}\n{}\n", ids[0], ids[1]).as_bytes());
    assert_eq!(d.objects_digest.as_slice(), digest.as_ref());
    assert_eq!(cat.destroy_customer_keys(&alice.customer_id, 560).await.unwrap(), destroyed, "idempotent");
    assert!(matches!(cat.cancel_shred(&alice.customer_id).await, Err(CatalogError::Conflict(_))));
    assert!(matches!(cat.place_hold(&hold("crm:alice", None)).await, Err(CatalogError::Conflict(_))));
    assert!(cat.customer_key_versions(&alice.customer_ref).await.unwrap().is_empty());
    assert_eq!(cat.customer_key(&alice.customer_ref, 1).await.unwrap(), None);
    let tomb = cat.object(&a1.object_id).await.unwrap().unwrap();
    assert_eq!(tomb.customer_state, CustomerState::Shredded);
    assert!(tomb.wrapped_dek.is_empty());
    assert_eq!(tomb.record.sha256, [0; 32], "no content-derived data in a tombstone");
    assert!(tomb.record.spec.interaction.tags.is_empty());
    assert_eq!(cat.upload(&open.upload_id).await.unwrap(), None);
    assert_eq!(cat.customer(&alice.customer_id).await.unwrap().unwrap().state, CustomerState::PendingShred);
    let mut tombs = cat.tombstoned_objects(&alice.customer_ref).await.unwrap();
    tombs.sort();
    let mut expected = vec![a1.object_id, a2.object_id, a3.object_id];
    expected.sort();
    assert_eq!(tombs, expected);

    let done = cat.complete_shred(&alice.customer_id, "{\"signed\":true}", 570).await.unwrap();
    assert_eq!(done.state, CustomerState::Shredded);
    assert_eq!(done.certificate.as_deref(), Some("{\"signed\":true}"));
    assert_eq!(cat.complete_shred(&alice.customer_id, "other", 580).await.unwrap(), done, "idempotent");
    let customer = cat.customer(&alice.customer_id).await.unwrap().unwrap();
    assert_eq!(customer.state, CustomerState::Shredded);
    assert!(customer.canary.is_empty(), "the canary goes with the keys");
    assert_eq!(cat.shred_ticket(&alice.customer_id).await.unwrap(), Some(done));
    assert!(cat.pending_shreds().await.unwrap().is_empty());
    let remaining = cat.list_objects(&ListFilter::default(), None, 100).await.unwrap();
    assert_eq!(remaining, vec![b1.clone()]);
    assert!(matches!(
        cat.request_shred(&alice.customer_id, &request).await,
        Err(CatalogError::CustomerState(CustomerState::Shredded))
    ));
    assert!(matches!(
        cat.place_hold(&hold("crm:alice", None)).await,
        Err(CatalogError::CustomerState(CustomerState::Shredded))
    ));
    assert!(matches!(
        cat.request_shred(&CustomerId::parse("nobody").unwrap(), &request).await,
        Err(CatalogError::NotFound)
    ));
    assert_eq!(cat.shred_ticket(&bob.customer_id).await.unwrap(), None);
    // A commit racing the shred loses.
    let late = ObjectRecord { upload_id: open.upload_id, ..a1.clone() };
    assert!(cat.commit_upload(&late).await.is_err());
    assert_eq!(cat.object(&b1.object_id).await.unwrap().unwrap().wrapped_dek, vec![0xD1; 61]);
    drop(on_bob);

    vec![vec![0xA1; 61], vec![0xA1 ^ 0x55; 61], vec![0xC1; 61], vec![0xC2; 61], vec![0xC3; 61], vec![0xE1; 61]]
}

/// The catalog side of root-key rotation (A4, E3): listing rows not yet
/// under the new root key, compare-and-set re-wrapping that never
/// re-creates a shredded customer's key, counts per root key, and the
/// compare-and-set of the active version.
pub async fn root_rotation(cat: &dyn Catalog) {
    // The active version switches once: a second runner expecting the old
    // value loses.
    assert!(cat.meta_compare_and_set("active", None, b"v1").await.unwrap());
    assert!(!cat.meta_compare_and_set("active", None, b"v9").await.unwrap(), "already set");
    assert!(cat.meta_compare_and_set("active", Some(b"v1"), b"v2").await.unwrap());
    assert!(!cat.meta_compare_and_set("active", Some(b"v1"), b"v3").await.unwrap(), "stale expectation");
    assert_eq!(cat.meta_get("active").await.unwrap().as_deref(), Some(&b"v2"[..]));

    let mut customers = Vec::new();
    for (i, id) in ["crm:r1", "crm:r2", "crm:r3", "crm:r4"].into_iter().enumerate() {
        customers.push(new_customer(cat, id, 0x10 + i as u8).await);
    }
    assert_eq!(cat.count_customer_keys_by_root().await.unwrap(), vec![("test".to_string(), 4)]);

    // Paged, ordered by customer ref, each row with its customer id.
    let first = cat.customer_keys_not_under("new", None, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    let last = &first[2].1;
    let rest = cat.customer_keys_not_under("new", Some((last.customer_ref, last.version)), 3).await.unwrap();
    assert_eq!(rest.len(), 1);
    let all: Vec<_> = first.iter().chain(&rest).collect();
    let mut refs: Vec<_> = all.iter().map(|(_, k)| *k.customer_ref.as_bytes()).collect();
    let sorted = {
        let mut s = refs.clone();
        s.sort();
        s
    };
    assert_eq!(refs, sorted, "ordered by customer ref");
    refs.dedup();
    assert_eq!(refs.len(), 4);
    for (id, key) in &all {
        let c = customers.iter().find(|c| c.customer_ref == key.customer_ref).unwrap();
        assert_eq!(id, &c.customer_id);
        assert_eq!(key.root_key_id, "test");
    }
    assert!(cat.customer_keys_not_under("test", None, 10).await.unwrap().is_empty());

    // Compare-and-set on the old root key id.
    let (_, k0) = all[0];
    let rewrapped = CustomerKeyRecord { root_key_id: "new".into(), wrapped_key: vec![0x77; 61], ..k0.clone() };
    assert!(cat.rewrap_customer_key(&rewrapped, "test").await.unwrap());
    assert!(!cat.rewrap_customer_key(&rewrapped, "test").await.unwrap(), "already re-wrapped");
    assert_eq!(cat.customer_key(&k0.customer_ref, 1).await.unwrap(), Some(rewrapped.clone()));
    let other = CustomerKeyRecord { root_key_id: "other".into(), ..rewrapped.clone() };
    assert!(!cat.rewrap_customer_key(&other, "test").await.unwrap(), "a stale old id changes nothing");
    assert_eq!(cat.customer_key(&k0.customer_ref, 1).await.unwrap(), Some(rewrapped));
    assert_eq!(cat.count_customer_keys_by_root().await.unwrap(), vec![("new".to_string(), 1), ("test".to_string(), 3)]);
    assert_eq!(cat.customer_keys_not_under("new", None, 10).await.unwrap().len(), 3);

    // E3: a rotation that listed a row before a shred destroyed it must not
    // bring the key back.
    let (victim_id, victim_key) = all[1];
    let request = ShredRequest {
        reason: "erasure".into(),
        requested_by: "dpo".into(),
        requested_at_ms: 10,
        destroy_after_ms: 10,
        requires_approval: false,
    };
    cat.request_shred(victim_id, &request).await.unwrap();
    cat.destroy_customer_keys(victim_id, 20).await.unwrap();
    let late = CustomerKeyRecord { root_key_id: "new".into(), wrapped_key: vec![0x78; 61], ..victim_key.clone() };
    assert!(!cat.rewrap_customer_key(&late, "test").await.unwrap(), "the shred wins");
    assert_eq!(cat.customer_key(&victim_key.customer_ref, 1).await.unwrap(), None);
    assert!(cat.customer_key_versions(&victim_key.customer_ref).await.unwrap().is_empty());
    assert_eq!(cat.count_customer_keys_by_root().await.unwrap(), vec![("new".to_string(), 1), ("test".to_string(), 2)]);
    let left = cat.customer_keys_not_under("new", None, 10).await.unwrap();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|(id, _)| id != victim_id));
}

/// The shared upload journal (`ingest.journal = "catalog"`): epochs fence
/// stale writers, appends must continue the journal, a shred stops them,
/// and the records go when the upload commits or is discarded.
pub async fn journal(cat: &dyn Catalog) {
    let dora = new_customer(cat, "crm:dora", 0xD0).await;
    let open = |interaction: &str| UploadRecord {
        upload_id: UploadId::new_random(),
        object_id: ObjectId::new_random(),
        customer_ref: dora.customer_ref,
        spec: spec("crm:dora", interaction),
        key_version: 1,
        wrapped_dek: vec![0xD1; 61],
        nonce_prefix: [0xD1; 7],
        created_at_ms: 10,
        committed: false,
    };
    let upload = open("call-j1");
    cat.create_upload(&upload).await.unwrap();
    let id = &upload.upload_id;
    assert!(cat.journal_chunks(id, 0, 10).await.unwrap().is_empty());
    let first = cat.claim_journal(id).await.unwrap();
    cat.append_journal(id, first, 0, 5, b"sealed-0").await.unwrap();
    cat.append_journal(id, first, 5, 9, b"sealed-5").await.unwrap();
    // Not continuing the journal (a gap, an overlap), or empty (a replay
    // would fetch it for ever).
    for (start, end) in [(10, 12), (4, 12), (9, 9)] {
        assert!(matches!(cat.append_journal(id, first, start, end, b"x").await, Err(CatalogError::Conflict(_))));
    }
    // A second writer claims the upload; the first is fenced off.
    let second = cat.claim_journal(id).await.unwrap();
    assert!(second > first);
    let stale = cat.append_journal(id, first, 9, 12, b"zombie").await.unwrap_err();
    assert!(matches!(&stale, CatalogError::Conflict(m) if m.contains("taken over")), "{stale}");
    cat.append_journal(id, second, 9, 12, b"sealed-9").await.unwrap();
    let chunks = cat.journal_chunks(id, 0, 10).await.unwrap();
    let starts: Vec<(u64, u64)> = chunks.iter().map(|c| (c.start, c.end)).collect();
    assert_eq!(starts, vec![(0, 5), (5, 9), (9, 12)]);
    assert_eq!(chunks[2].sealed, b"sealed-9");
    // Paged by start offset.
    let page = cat.journal_chunks(id, 5, 1).await.unwrap();
    assert_eq!(page.iter().map(|c| c.start).collect::<Vec<_>>(), vec![5]);

    // Commit removes the records with it; the upload can no longer be
    // claimed or appended to.
    let record = ObjectRecord {
        object_id: upload.object_id,
        upload_id: upload.upload_id,
        spec: upload.spec.clone(),
        size: 12,
        sha256: [0xD2; 32],
        created_at_ms: 20,
        retention: Retention { policy: String::new(), expires_at_ms: None },
        derived_from: None,
    };
    cat.commit_upload(&record).await.unwrap();
    assert!(cat.journal_chunks(id, 0, 10).await.unwrap().is_empty());
    assert!(matches!(cat.claim_journal(id).await, Err(CatalogError::NotFound)));
    assert!(matches!(cat.append_journal(id, second, 12, 13, b"late").await, Err(CatalogError::NotFound)));

    // Discarding an upload removes its records.
    let discarded = open("call-j2");
    cat.create_upload(&discarded).await.unwrap();
    let epoch = cat.claim_journal(&discarded.upload_id).await.unwrap();
    cat.append_journal(&discarded.upload_id, epoch, 0, 3, b"abc").await.unwrap();
    cat.discard_upload(&discarded.upload_id).await.unwrap();
    assert!(cat.journal_chunks(&discarded.upload_id, 0, 10).await.unwrap().is_empty());
    assert!(matches!(cat.claim_journal(&discarded.upload_id).await, Err(CatalogError::NotFound)));

    // A shred request (from any replica) stops the next append; the
    // destroy step removes the records of unfinished uploads.
    let live = open("call-j3");
    cat.create_upload(&live).await.unwrap();
    let epoch = cat.claim_journal(&live.upload_id).await.unwrap();
    cat.append_journal(&live.upload_id, epoch, 0, 4, b"live").await.unwrap();
    let request = ShredRequest {
        reason: "erasure".into(),
        requested_by: "dpo".into(),
        requested_at_ms: 30,
        destroy_after_ms: 30,
        requires_approval: false,
    };
    cat.request_shred(&dora.customer_id, &request).await.unwrap();
    assert!(matches!(
        cat.append_journal(&live.upload_id, epoch, 4, 8, b"more").await,
        Err(CatalogError::CustomerState(CustomerState::PendingShred))
    ));
    cat.destroy_customer_keys(&dora.customer_id, 31).await.unwrap();
    assert!(cat.journal_chunks(&live.upload_id, 0, 10).await.unwrap().is_empty());

    // The sweep lock can be taken (only one process may hold it; the
    // PostgreSQL tests check a second session is refused).
    let lock = cat.try_sweep_lock().await.unwrap();
    assert!(lock.is_some());
}
