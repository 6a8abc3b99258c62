//! The one conformance suite every object-store backend must pass: local
//! files and memory (unit tests below `store`), an S3-compatible server
//! (tests/it/s3.rs, against a real Garage). One function per property;
//! [`run`] calls each on a given store.
//!
//! The properties tolerate other objects in the store (a shared bucket) and
//! each other's leftovers, so they can run in any order on one store.

use std::ops::Range;

use futures::future::BoxFuture;

use super::{PART_SIZE, SINGLE_PUT_MAX, Store, StoreError};
use crate::model::ObjectId;

/// A property of the store, checked by panicking.
pub type Property = for<'a> fn(&'a Store) -> BoxFuture<'a, ()>;

/// Every property, by name.
pub const PROPERTIES: &[(&str, Property)] = &[
    ("small_object_round_trip", |s| Box::pin(small_object_round_trip(s))),
    ("small_object_is_write_once", |s| Box::pin(small_object_is_write_once(s))),
    ("multipart_round_trip", |s| Box::pin(multipart_round_trip(s))),
    ("multipart_object_is_write_once", |s| Box::pin(multipart_object_is_write_once(s))),
    ("range_reads", |s| Box::pin(range_reads(s))),
    ("delete_is_idempotent", |s| Box::pin(delete_is_idempotent(s))),
    ("abort_leaves_nothing", |s| Box::pin(abort_leaves_nothing(s))),
    ("missing_object_is_not_found", |s| Box::pin(missing_object_is_not_found(s))),
    ("listing_shows_committed_objects_only", |s| Box::pin(listing_shows_committed_objects_only(s))),
    ("published_file_round_trip_write_once", |s| Box::pin(published_file_round_trip_write_once(s))),
];

/// Runs every property against `store`, naming the one that fails.
pub async fn run(store: &Store) {
    for (name, property) in PROPERTIES {
        let on = store.clone();
        let outcome = tokio::spawn(async move { property(&on).await }).await;
        if let Err(e) = outcome {
            panic!("object store property `{name}` failed on {}: {e}", store.inner);
        }
    }
}

/// Deterministic bytes that differ at every offset and between seeds, so a
/// misplaced range or a foreign object shows.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761).wrapping_add(u64::from(seed) * 97).to_le_bytes()[1])
        .collect()
}

/// Writes `data` in `chunk`-sized pieces and commits.
async fn put(store: &Store, id: ObjectId, data: &[u8], chunk: usize) -> Result<(), StoreError> {
    let mut w = store.writer(id);
    for piece in data.chunks(chunk.max(1)) {
        w.write(piece).await?;
    }
    w.commit().await
}

async fn read_all(store: &Store, id: &ObjectId) -> Vec<u8> {
    let size = store.size(id).await.expect("size of a committed object");
    store.read_range(id, 0..size).await.expect("read a committed object").to_vec()
}

/// A size past [`SINGLE_PUT_MAX`] that ends inside a part.
fn large_len() -> usize {
    SINGLE_PUT_MAX + PART_SIZE / 2 + 12_345
}

pub async fn small_object_round_trip(store: &Store) {
    let id = ObjectId::new_random();
    let mut w = store.writer(id);
    w.write(b"hello ").await.unwrap();
    w.write(b"world").await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(store.size(&id).await.unwrap(), 11);
    assert_eq!(&store.read_range(&id, 6..11).await.unwrap()[..], b"world");

    // An empty object is an object too.
    let empty = ObjectId::new_random();
    store.writer(empty).commit().await.unwrap();
    assert_eq!(store.size(&empty).await.unwrap(), 0);
}

pub async fn small_object_is_write_once(store: &Store) {
    let id = ObjectId::new_random();
    let first = pattern(1, 70_000);
    put(store, id, &first, 65_536).await.unwrap();
    // A second commit of the same id is refused, whatever its size, and the
    // first object is untouched.
    for other in [pattern(2, 70_000), pattern(3, 10)] {
        let again = put(store, id, &other, 65_536).await;
        assert!(matches!(again, Err(StoreError::AlreadyExists)), "second commit: {again:?}");
        assert_eq!(read_all(store, &id).await, first, "the first object is intact");
    }
}

pub async fn multipart_round_trip(store: &Store) {
    let id = ObjectId::new_random();
    let data = pattern(4, large_len());
    put(store, id, &data, 1 << 20).await.unwrap();
    assert_eq!(store.size(&id).await.unwrap() as usize, data.len());
    assert!(read_all(store, &id).await == data, "a multipart object reads back bit-exact");
}

pub async fn multipart_object_is_write_once(store: &Store) {
    let id = ObjectId::new_random();
    let first = pattern(5, large_len());
    put(store, id, &first, 1 << 20).await.unwrap();
    // Neither a large nor a small second commit replaces it.
    let again = put(store, id, &pattern(6, SINGLE_PUT_MAX + 1), 1 << 20).await;
    assert!(matches!(again, Err(StoreError::AlreadyExists)), "second large commit: {again:?}");
    let again = put(store, id, b"small", 5).await;
    assert!(matches!(again, Err(StoreError::AlreadyExists)), "second small commit: {again:?}");
    assert!(read_all(store, &id).await == first, "the first object is intact");

    // Nor does a large commit replace a small object.
    let small = ObjectId::new_random();
    put(store, small, b"small", 5).await.unwrap();
    let again = put(store, small, &pattern(7, SINGLE_PUT_MAX + 1), 1 << 20).await;
    assert!(matches!(again, Err(StoreError::AlreadyExists)), "large over small: {again:?}");
    assert_eq!(read_all(store, &small).await, b"small");
}

pub async fn range_reads(store: &Store) {
    let id = ObjectId::new_random();
    let data = pattern(8, large_len());
    put(store, id, &data, 3 << 20).await.unwrap();
    let n = data.len() as u64;
    let part = PART_SIZE as u64;
    let ranges: [Range<u64>; 7] = [
        0..1,
        0..65_536,
        1_000..1_001,
        part - 10..part + 10, // across the first part boundary
        SINGLE_PUT_MAX as u64 - 3..SINGLE_PUT_MAX as u64 + 3,
        n - 1..n,
        n - 100_000..n,
    ];
    for r in ranges {
        let got = store.read_range(&id, r.clone()).await.unwrap();
        assert!(got[..] == data[r.start as usize..r.end as usize], "range {r:?}");
    }
}

pub async fn delete_is_idempotent(store: &Store) {
    let small = ObjectId::new_random();
    put(store, small, b"to be deleted", 4).await.unwrap();
    let large = ObjectId::new_random();
    put(store, large, &pattern(9, SINGLE_PUT_MAX + 1), 1 << 20).await.unwrap();
    for id in [small, large] {
        store.delete(&id).await.unwrap();
        assert!(matches!(store.size(&id).await, Err(StoreError::NotFound)));
        assert!(matches!(store.read_range(&id, 0..1).await, Err(StoreError::NotFound)));
        store.delete(&id).await.unwrap();
        assert!(!store.list_ids().await.unwrap().contains(&id.to_string()), "a deleted object is not listed");
    }
    // Deleting what never existed is fine too.
    store.delete(&ObjectId::new_random()).await.unwrap();
}

pub async fn abort_leaves_nothing(store: &Store) {
    let id = ObjectId::new_random();
    let mut w = store.writer(id);
    let data = pattern(10, SINGLE_PUT_MAX + PART_SIZE + 1);
    for piece in data.chunks(1 << 20) {
        w.write(piece).await.unwrap();
    }
    w.abort().await;
    assert!(matches!(store.size(&id).await, Err(StoreError::NotFound)));
    assert!(!store.list_ids().await.unwrap().contains(&id.to_string()));
    // Nothing left in the way of a later commit of the same id.
    put(store, id, b"after the abort", 7).await.unwrap();
    assert_eq!(read_all(store, &id).await, b"after the abort");
}

pub async fn missing_object_is_not_found(store: &Store) {
    let id = ObjectId::new_random();
    assert!(matches!(store.size(&id).await, Err(StoreError::NotFound)));
    assert!(matches!(store.read_range(&id, 0..1).await, Err(StoreError::NotFound)));
}

pub async fn listing_shows_committed_objects_only(store: &Store) {
    let small = ObjectId::new_random();
    put(store, small, b"listed", 6).await.unwrap();
    let large = ObjectId::new_random();
    put(store, large, &pattern(11, SINGLE_PUT_MAX + 1), 1 << 20).await.unwrap();
    let refused = put(store, large, &pattern(12, SINGLE_PUT_MAX + 1), 1 << 20).await;
    assert!(matches!(refused, Err(StoreError::AlreadyExists)));
    let uncommitted = ObjectId::new_random();
    let mut w = store.writer(uncommitted);
    w.write(b"never committed").await.unwrap();
    drop(w);

    let ids = store.list_ids().await.unwrap();
    assert!(ids.contains(&small.to_string()) && ids.contains(&large.to_string()), "{ids:?}");
    assert!(!ids.contains(&uncommitted.to_string()));
    for name in &ids {
        assert!(ObjectId::parse(name).is_ok(), "only object ids are listed (no staging leftovers): {name:?}");
    }
    assert_eq!(ids.iter().filter(|n| **n == large.to_string()).count(), 1);
}

/// A finished upload's file published into the store (linked into a local
/// store, copied into others) reads back whole, survives the removal of
/// the file's own name, and is write-once.
pub async fn published_file_round_trip_write_once(store: &Store) {
    for len in [1000, SINGLE_PUT_MAX + PART_SIZE + 3] {
        let (id, data) = (ObjectId::new_random(), pattern(9, len));
        let file = std::env::temp_dir().join(format!("recvault-conformance-{id}.seg"));
        std::fs::write(&file, &data).expect("write the file");
        assert!(
            matches!(store.publish_file(id, &file, len as u64 + 1).await, Err(StoreError::Short { .. })),
            "a file of the wrong length is refused"
        );
        assert!(matches!(store.size(&id).await, Err(StoreError::NotFound)), "nothing visible after a refusal");
        store.publish_file(id, &file, len as u64).await.expect("publish");
        std::fs::remove_file(&file).expect("remove the file's name");
        assert_eq!(read_all(store, &id).await, data);
        std::fs::write(&file, pattern(10, len)).expect("write another file");
        assert!(matches!(store.publish_file(id, &file, len as u64).await, Err(StoreError::AlreadyExists)));
        assert_eq!(read_all(store, &id).await, data, "a second publish changes nothing");
        let _ = std::fs::remove_file(&file);
        store.delete(&id).await.expect("delete");
    }
}
