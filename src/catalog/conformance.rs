//! The one conformance suite every `Catalog` implementation must pass.
//!
//! Returns the destroyed wrapped-key bytes, so a caller that can see the
//! engine's files can check none of them survives there.

use super::{
    Catalog, CatalogError, CustomerKeyRecord, CustomerRecord, CustomerState, ListFilter, PageCursor, UploadRecord,
};
use crate::model::{ContentKind, CustomerId, CustomerRef, Interaction, ObjectId, ObjectRecord, ObjectSpec, UploadId};

fn spec(customer: &str, interaction: &str) -> ObjectSpec {
    ObjectSpec {
        customer_id: CustomerId::parse(customer).unwrap(),
        kind: ContentKind::ChatTranscript,
        content_type: "text/plain".into(),
        interaction: Interaction {
            interaction_id: interaction.into(),
            agent_id: "agent-7".into(),
            tags: [("lang".to_string(), "en".to_string())].into(),
            ..Default::default()
        },
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

    // Shred alice: keys, data keys, metadata and open uploads go; bob stays.
    let report = cat.shred_customer(&alice.customer_id, "erasure request", 500).await.unwrap();
    assert_eq!(report.key_versions_destroyed, 1);
    let mut shredded = report.objects.clone();
    shredded.sort();
    let mut expected = vec![a1.object_id, a2.object_id, a3.object_id];
    expected.sort();
    assert_eq!(shredded, expected);
    assert_eq!(report.discarded_uploads, vec![open.object_id]);
    assert_eq!(cat.customer_key(&alice.customer_ref, 1).await.unwrap(), None);
    let tomb = cat.object(&a1.object_id).await.unwrap().unwrap();
    assert_eq!(tomb.customer_state, CustomerState::Shredded);
    assert!(tomb.wrapped_dek.is_empty());
    assert_eq!(tomb.record.sha256, [0; 32], "no content-derived data in a tombstone");
    assert!(tomb.record.spec.interaction.tags.is_empty());
    assert_eq!(cat.upload(&open.upload_id).await.unwrap(), None);
    assert_eq!(cat.customer(&alice.customer_id).await.unwrap().unwrap().state, CustomerState::Shredded);
    let remaining = cat.list_objects(&ListFilter::default(), None, 100).await.unwrap();
    assert_eq!(remaining, vec![b1.clone()]);
    assert!(matches!(
        cat.shred_customer(&alice.customer_id, "again", 600).await,
        Err(CatalogError::CustomerState(CustomerState::Shredded))
    ));
    assert!(matches!(
        cat.shred_customer(&CustomerId::parse("nobody").unwrap(), "x", 600).await,
        Err(CatalogError::NotFound)
    ));
    // A commit racing the shred loses.
    let late = ObjectRecord { upload_id: open.upload_id, ..a1.clone() };
    assert!(cat.commit_upload(&late).await.is_err());
    assert_eq!(cat.object(&b1.object_id).await.unwrap().unwrap().wrapped_dek, vec![0xD1; 61]);

    vec![vec![0xA1; 61], vec![0xA1 ^ 0x55; 61], vec![0xC1; 61], vec![0xC2; 61], vec![0xC3; 61], vec![0xE1; 61]]
}
