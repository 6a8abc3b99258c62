//! The gRPC contract end to end against an in-process server on loopback.

use recvault::api::pb;
use tonic::Code;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;

#[tokio::test]
async fn streamed_wav_round_trips_and_ranges_match_slices() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // Several segments plus a partial one.
    let audio = wav(400_000);
    let info = ingest(&mut c, &new_id(), spec("cust-1", REC, "audio/wav"), &audio).await;
    assert_eq!(info.size, audio.len() as u64);
    assert_eq!(info.sha256.to_vec(), sha256(&audio));
    assert_eq!(info.content_type, "audio/wav");
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
    let seg = 65536u64;
    let n = audio.len() as u64;
    for (start, end) in [
        (0, Some(0)),
        (0, Some(seg - 1)),
        (seg - 1, Some(seg)),
        (seg, Some(2 * seg - 1)),
        (12345, Some(300_000)),
        (n - 1, None),
        (n - 10, Some(n + 1000)), // end clamped
        (3 * seg + 7, None),
    ] {
        let got = get(&mut c, &info.object_id, Some((start, end))).await.unwrap();
        let hi = end.map(|e| (e + 1).min(n)).unwrap_or(n);
        assert_eq!(got, audio[start as usize..hi as usize], "range {start}-{end:?}");
    }
    let err = get(&mut c, &info.object_id, Some((n, None))).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // The refused range is audited like any refused read.
    let reads = audit_of(&mut c, "object.read").await;
    assert!(reads.iter().any(|r| r.target == info.object_id && r.result.starts_with("refused")), "{reads:?}");
    let stat = c.stat(pb::StatRequest { object_id: info.object_id.clone() }).await.unwrap().into_inner();
    assert_eq!(stat, info);
    assert_eq!(stat.interaction.unwrap().tags.get("site").map(String::as_str), Some("lisbon"));
}

#[tokio::test]
async fn put_stores_small_items_idempotently() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let image = jpeg(640, 480, 5000);
    let upload_id = new_id();
    let req = pb::PutRequest {
        upload_id: upload_id.clone(),
        spec: Some(spec("cust-2", pb::ContentKind::Image, "image/jpg")),
        data: image.clone().into(),
        expected_sha256: sha256(&image).into(),
    };
    let first = c.put(req.clone()).await.unwrap().into_inner().object.unwrap();
    assert_eq!(first.content_type, "image/jpeg", "aliases are canonicalised");
    // B3: a retried Put returns the same object.
    let again = c.put(req).await.unwrap().into_inner().object.unwrap();
    assert_eq!(first, again);
    assert_eq!(get(&mut c, &first.object_id, None).await.unwrap(), image);
    let transcript = "agent: hello\ncustomer: olá, my order is late\n".as_bytes();
    let t = put(&mut c, spec("cust-2", pb::ContentKind::ChatTranscript, "text/plain; charset=UTF-8"), transcript)
        .await
        .unwrap();
    assert_eq!(get(&mut c, &t.object_id, None).await.unwrap(), transcript);
}

#[tokio::test]
async fn b1_resume_after_a_dropped_stream_yields_the_one_shot_object() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(1_500_000);
    let upload_id = new_id();
    let cut = 1_234_567usize;
    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id, durable, _) = s.open(&upload_id, spec("cust-3", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, 0);
    s.data_chunks(0, &audio[..cut]).await;
    let acked = s.acked(cut as u64).await.unwrap();
    assert_eq!(acked, cut as u64);
    drop(s); // the network drops

    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id2, durable, committed) = s.open(&upload_id, spec("cust-3", REC, "audio/wav")).await.unwrap();
    assert_eq!((object_id2.as_str(), durable, committed), (object_id.as_str(), cut as u64, false));
    // B2: a gap or an overlap is refused, naming the durable offset.
    s.data(durable + 10, b"xx").await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&format!("durable offset {cut}")), "{}", err.message());

    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&upload_id, spec("cust-3", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, cut as u64, "a refused message changes nothing");
    s.data_chunks(durable, &audio[cut..]).await;
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    let info = s.committed().await.unwrap();
    assert_eq!(info.object_id, object_id);
    assert_eq!(info.sha256.to_vec(), sha256(&audio));
    assert_eq!(get(&mut c, &object_id, None).await.unwrap(), audio);
}

#[tokio::test]
async fn b3_finishing_twice_returns_the_same_object() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(10_000);
    let upload_id = new_id();
    let first = ingest(&mut c, &upload_id, spec("cust-4", REC, "audio/wav"), &audio).await;
    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id, durable, committed) = s.open(&upload_id, spec("cust-4", REC, "audio/wav")).await.unwrap();
    assert_eq!((object_id.as_str(), durable, committed), (first.object_id.as_str(), audio.len() as u64, true));
    s.finish(None, 0).await;
    assert_eq!(s.committed().await.unwrap(), first);
    // The same upload id for another object is refused.
    let mut s = Stream::start(&mut c).await.unwrap();
    s.send(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
        upload_id: upload_id.clone(),
        spec: Some(spec("someone-else", REC, "audio/wav")),
    }))
    .await;
    assert_eq!(s.error().await.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn b4_a_newer_stream_takes_an_upload_over() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(100_000);
    let upload_id = new_id();
    let mut old = Stream::start(&mut c).await.unwrap();
    old.open(&upload_id, spec("cust-5", REC, "audio/wav")).await.unwrap();
    old.data(0, &audio[..1000]).await;
    old.acked(1000).await.unwrap();
    let mut new = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = new.open(&upload_id, spec("cust-5", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, 1000);
    assert_eq!(old.error().await.code(), Code::Aborted);
    new.data_chunks(1000, &audio[1000..]).await;
    new.finish(Some(sha256(&audio)), 0).await;
    let info = new.committed().await.unwrap();
    assert_eq!(get(&mut c, &info.object_id, None).await.unwrap(), audio);
}

#[tokio::test]
async fn g3_and_bad_sequences_are_refused_with_actionable_statuses() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // Data before open.
    let mut s = Stream::start(&mut c).await.unwrap();
    s.data(0, b"RIFF").await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("open"), "{}", err.message());
    // Empty stream.
    let mut s = Stream::start(&mut c).await.unwrap();
    drop(std::mem::replace(&mut s.tx, tokio::sync::mpsc::channel(1).0));
    let err = s.error().await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("empty stream"), "{}", err.message());
    // Finish with a wrong SHA-256: nothing committed.
    let audio = wav(1000);
    let upload_id = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id, _, _) = s.open(&upload_id, spec("cust-6", REC, "audio/wav")).await.unwrap();
    s.data(0, &audio).await;
    s.finish(Some(vec![0u8; 32]), 0).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("SHA-256"), "{}", err.message());
    let err = get(&mut c, &object_id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A wrong expected size keeps the upload for completion.
    let mut s = Stream::start(&mut c).await.unwrap();
    let upload_id = new_id();
    s.open(&upload_id, spec("cust-6", REC, "audio/wav")).await.unwrap();
    s.data(0, &audio[..500]).await;
    s.finish(None, audio.len() as u64).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("offset 500"), "{}", err.message());
}

#[tokio::test]
async fn reading_an_unfinished_upload_is_not_found() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(50_000);
    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id, _, _) = s.open(&new_id(), spec("cust-7", REC, "audio/wav")).await.unwrap();
    s.data(0, &audio).await;
    s.acked(audio.len() as u64).await.unwrap();
    for err in [
        get(&mut c, &object_id, None).await.unwrap_err(),
        c.stat(pb::StatRequest { object_id: object_id.clone() }).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    let list =
        c.list(pb::ListRequest { customer_id: "cust-7".into(), ..Default::default() }).await.unwrap().into_inner();
    assert!(list.objects.is_empty(), "nothing uncommitted is listed");
}

#[tokio::test]
async fn g7_malformed_ids_and_metadata_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for id in ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000", "6F9619FF-8B86-D011-B42D-00C04FC964FF"] {
        let err = c.stat(pb::StatRequest { object_id: id.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {err:?}");
        assert!(err.message().starts_with("object_id"), "{}", err.message());
    }
    let err = c.stat(pb::StatRequest { object_id: new_id() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for customer in ["", "../etc/passwd", "a b", &"x".repeat(129)] {
        let err = put(&mut c, spec(customer, pb::ContentKind::ChatTranscript, "text/plain"), b"hi").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{customer:?}");
        assert!(err.message().starts_with("customer_id"), "{}", err.message());
    }
    // G8: control characters in metadata.
    let mut sp = spec("cust-8", pb::ContentKind::ChatTranscript, "text/plain");
    sp.interaction.as_mut().unwrap().agent_id = "bad\u{7}agent".into();
    let err = put(&mut c, sp, b"hi").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // An unknown customer has nothing to list.
    let err = c.list(pb::ListRequest { customer_id: "nobody".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn g4_type_mismatch_is_refused_and_leaves_nothing() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let image = jpeg(100, 100, 100);
    let upload_id = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&upload_id, spec("cust-9", REC, "audio/wav")).await.unwrap();
    s.data(0, &image).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("audio/wav"), "{}", err.message());
    // Nothing left: the same upload id starts from zero.
    let mut s = Stream::start(&mut c).await.unwrap();
    let (_, durable, _) = s.open(&upload_id, spec("cust-9", REC, "audio/wav")).await.unwrap();
    assert_eq!(durable, 0);
    drop(s);
    let err = put(&mut c, spec("cust-9", pb::ContentKind::Image, "image/png"), &image).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Unknown declared type.
    let err = put(&mut c, spec("cust-9", pb::ContentKind::Image, "application/x-msdownload"), b"MZ").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("image/png"), "lists what is accepted: {}", err.message());
}

#[tokio::test]
async fn g1_g2_caps_answer_resource_exhausted() {
    let server = TestServer::start_with(|cfg| {
        cfg.ingest.caps.call_recording = 100_000;
        cfg.ingest.put_cap = 64 << 10;
    })
    .await;
    let mut c = server.client().await;
    let audio = wav(100_000);
    let upload_id = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id, _, _) = s.open(&upload_id, spec("cust-10", REC, "audio/wav")).await.unwrap();
    s.data_chunks(0, &audio).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("size cap"), "{}", err.message());
    assert_eq!(get(&mut c, &object_id, None).await.unwrap_err().code(), Code::NotFound);
    // Put over its cap.
    let err = put(&mut c, spec("cust-10", pb::ContentKind::ChatTranscript, "text/plain"), &vec![b'a'; 65 << 10])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("Ingest"), "points at the streaming call: {}", err.message());
    // A message over the transport limit.
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&new_id(), spec("cust-10", REC, "audio/wav")).await.unwrap();
    s.data(0, &vec![0u8; 2 << 20]).await;
    assert_eq!(s.error().await.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn list_filters_and_pages_newest_first() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut sp = spec("cust-11", pb::ContentKind::ChatTranscript, "text/plain");
        sp.interaction.as_mut().unwrap().interaction_id = format!("chat-{}", i % 2);
        let o = put(&mut c, sp, &format!("line {i}\n").into_bytes()).await.unwrap();
        ids.push(o.object_id);
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list(pb::ListRequest {
                customer_id: "cust-11".into(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.objects.len() <= 3);
        seen.extend(page.objects.into_iter().map(|o| o.object_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids, "every object once, newest first");
    let page =
        c.list(pb::ListRequest { interaction_id: "chat-1".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page.objects.len(), 3);
    let err = c
        .list(pb::ListRequest { customer_id: "cust-11".into(), page_token: "garbage".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn e1_shred_makes_every_read_fail_and_stops_uploads() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(200_000);
    let kept = ingest(&mut c, &new_id(), spec("cust-keep", REC, "audio/wav"), &audio).await;
    let gone = ingest(&mut c, &new_id(), spec("cust-gone", REC, "audio/wav"), &audio).await;
    // An upload in progress for the same customer.
    let mut live = Stream::start(&mut c).await.unwrap();
    let live_upload = new_id();
    live.open(&live_upload, spec("cust-gone", REC, "audio/wav")).await.unwrap();
    live.data(0, &audio[..5000]).await;
    live.acked(5000).await.unwrap();

    let r = c
        .shred_customer(pb::ShredCustomerRequest {
            customer_id: "cust-gone".into(),
            reason: "erasure request #42".into(),
            requested_by: "dpo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.key_versions_destroyed, r.objects_shredded, r.uploads_discarded), (1, 1, 1));
    assert_eq!(r.state, pb::CustomerState::Shredded as i32, "grace 0: shredded before the call returns");
    assert!(r.certificate_json.contains("\"objects_unrecoverable\": 1"), "{}", r.certificate_json);
    // The live stream was stopped when the shred was requested.
    let err = live.error().await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let stat = c.stat(pb::StatRequest { object_id: gone.object_id.clone() }).await.unwrap_err();
    let read = get(&mut c, &gone.object_id, None).await.unwrap_err();
    let list = c.list(pb::ListRequest { customer_id: "cust-gone".into(), ..Default::default() }).await.unwrap_err();
    let put_err =
        put(&mut c, spec("cust-gone", pb::ContentKind::ChatTranscript, "text/plain"), b"hi").await.unwrap_err();
    let mut s = Stream::start(&mut c).await.unwrap();
    s.send(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
        upload_id: live_upload.clone(),
        spec: Some(spec("cust-gone", REC, "audio/wav")),
    }))
    .await;
    let reopen = s.error().await;
    let again = c
        .shred_customer(pb::ShredCustomerRequest {
            customer_id: "cust-gone".into(),
            reason: "again".into(),
            requested_by: "dpo".into(),
        })
        .await
        .unwrap_err();
    for err in [stat, read, list, put_err, reopen, again] {
        assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "customer shredded"));
    }
    // The other customer is untouched.
    assert_eq!(get(&mut c, &kept.object_id, None).await.unwrap(), audio);
    // The ciphertext and journal are gone from disk too.
    let leftovers: Vec<_> =
        files_under(server.data.path()).into_iter().filter(|p| p.to_string_lossy().contains(&gone.object_id)).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let err = c
        .shred_customer(pb::ShredCustomerRequest {
            customer_id: "never-seen".into(),
            reason: "x".into(),
            requested_by: "dpo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn l3_no_plaintext_reaches_the_data_directory() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let marker = b"PLAINTEXT-CANARY-7f3a9c";
    let mut text = Vec::new();
    for i in 0..20_000 {
        text.extend_from_slice(format!("line {i} ").as_bytes());
        text.extend_from_slice(marker);
        text.push(b'\n');
    }
    // Committed via streaming, via Put, and one upload left in progress.
    let mut sp = spec("cust-12", pb::ContentKind::ChatTranscript, "text/plain");
    sp.interaction.as_mut().unwrap().interaction_id = "chat-canary".into();
    ingest(&mut c, &new_id(), sp.clone(), &text).await;
    put(&mut c, sp.clone(), &text[..100_000]).await.unwrap();
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&new_id(), sp).await.unwrap();
    s.data(0, &text[..200_000]).await;
    s.acked(200_000).await.unwrap();
    let hits = files_containing(server.data.path(), marker);
    assert!(hits.is_empty(), "plaintext found in {hits:?}");
    assert_eq!(spooled_uploads(&server.data.path().join("spool")).len(), 1, "the open upload has a journal");
}

#[tokio::test]
async fn f1_f3_tampered_or_truncated_objects_fail_opaquely() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(100_000);
    let a = ingest(&mut c, &new_id(), spec("cust-13", REC, "audio/wav"), &audio).await;
    let b = ingest(&mut c, &new_id(), spec("cust-13", REC, "audio/wav"), &audio).await;
    let path = |id: &str| server.data.path().join("objects/objects").join(&id[..2]).join(id);
    let pa = path(&a.object_id);
    let original = std::fs::read(&pa).unwrap();
    let mut messages = Vec::new();
    // F1: a flipped bit in the body, the header and the commitment.
    for at in [original.len() - 5, 20, 70] {
        let mut t = original.clone();
        t[at] ^= 1;
        std::fs::write(&pa, &t).unwrap();
        let err = get(&mut c, &a.object_id, None).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "flip at {at}");
        messages.push(err.message().to_owned());
    }
    // F3/F4: truncated (by a byte, to less than its header, to nothing),
    // extended.
    for t in [
        original[..original.len() - 1].to_vec(),
        original[..10].to_vec(),
        Vec::new(),
        [original.clone(), vec![0; 16]].concat(),
    ] {
        std::fs::write(&pa, &t).unwrap();
        let err = get(&mut c, &a.object_id, Some((0, Some(10)))).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss);
        messages.push(err.message().to_owned());
    }
    // F6: another object's ciphertext in its place.
    std::fs::write(&pa, std::fs::read(path(&b.object_id)).unwrap()).unwrap();
    let err = get(&mut c, &a.object_id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    messages.push(err.message().to_owned());
    // Gone from the store while the catalog still names it.
    std::fs::remove_file(&pa).unwrap();
    let err = get(&mut c, &a.object_id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    messages.push(err.message().to_owned());
    messages.dedup();
    assert_eq!(messages.len(), 1, "one opaque message: {messages:?}");
    std::fs::write(&pa, &original).unwrap();
    assert_eq!(get(&mut c, &a.object_id, None).await.unwrap(), audio);
}

/// Range reads touch only the covering segments: with segment 0 and the
/// final segment corrupted, a range inside segments 1-2 still reads, while
/// a range touching a corrupted segment fails.
#[tokio::test]
async fn range_reads_decrypt_only_the_covering_segments() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let audio = wav(200_000); // 400 044 bytes: 7 segments of 64 KiB
    let o = ingest(&mut c, &new_id(), spec("cust-15", REC, "audio/wav"), &audio).await;
    let path = server.data.path().join("objects/objects").join(&o.object_id[..2]).join(&o.object_id);
    let mut bytes = std::fs::read(&path).unwrap();
    let header = 96;
    bytes[header + 10] ^= 0xFF; // segment 0
    let last = bytes.len() - 20;
    bytes[last] ^= 0xFF; // final segment
    std::fs::write(&path, &bytes).unwrap();
    let seg = 65536u64;
    let got = get(&mut c, &o.object_id, Some((seg + 5, Some(3 * seg - 1)))).await.unwrap();
    assert_eq!(got, audio[(seg + 5) as usize..(3 * seg) as usize]);
    for range in [(0, Some(10)), (seg - 1, Some(seg)), (6 * seg, None)] {
        let err = get(&mut c, &o.object_id, Some(range)).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{range:?}");
    }
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "recvault.v1.Recvault".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    // What `grpcurl -plaintext ADDR list` asks.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "recvault.v1.Recvault"), "{names:?}");
}

#[tokio::test]
async fn d4_a_wrong_root_key_refuses_to_start() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    ingest(&mut c, &new_id(), spec("cust-14", REC, "audio/wav"), &wav(1000)).await;
    drop(c);
    let data = server.stop().await;
    let key = data.path().join("root.key");
    std::fs::remove_file(&key).unwrap();
    let cfg = recvault::config::Config {
        data_dir: data.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let err = match recvault::server::bind(&cfg).await {
        Ok(_) => panic!("started with a different root key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("does not match"), "{err}");
}

/// `ingest.max_streams`: one stream more than the limit is refused at once
/// with UNAVAILABLE and a message saying the server is busy, costs the running
/// stream nothing, and the place comes back when a stream ends.
#[tokio::test]
async fn streams_beyond_max_streams_are_refused_and_admitted_again_once_one_ends() {
    let server = TestServer::start_with(|c| c.ingest.max_streams = 1).await;
    let mut c = server.client().await;
    let first_id = new_id();
    let mut first = Stream::start(&mut c).await.unwrap();
    first.open(&first_id, spec("cust-cap", REC, "audio/pcmu")).await.unwrap();
    first.data(0, &[0x55; 8000]).await;
    assert_eq!(first.acked(8000).await.unwrap(), 8000);

    let refused = match Stream::start(&mut c).await {
        Err(status) => status,
        Ok(mut s) => {
            s.send(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
                upload_id: new_id(),
                spec: Some(spec("cust-cap", REC, "audio/pcmu")),
            }))
            .await;
            s.error().await
        }
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // Refused before authentication: it says the server is busy and to
    // retry, and nothing of the configuration.
    assert!(refused.message().contains(recvault::ingest::BUSY), "{}", refused.message());
    assert!(refused.message().contains("retry") && !refused.message().contains("max_streams"), "{}", refused.message());

    // The running stream is untouched: it goes on and commits.
    first.data(8000, &[0x55; 8000]).await;
    first.finish(None, 16000).await;
    assert_eq!(first.committed().await.unwrap().size, 16000);
    drop(first);

    // Its place is given back once its session has ended.
    let mut last = None;
    for _ in 0..100 {
        let mut s = Stream::start(&mut c).await.unwrap();
        match s.open(&new_id(), spec("cust-cap", REC, "audio/pcmu")).await {
            Ok(_) => {
                last = Some(s);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    assert!(last.is_some(), "a stream is admitted again after the first one ended");
}

/// A client that keeps its connection and goes on sending but reads no
/// answer must not hold its stream, and its `ingest.max_streams` place, for
/// ever: once an ack has waited the idle timeout to be delivered, the stream
/// is ended with DEADLINE_EXCEEDED (its acknowledged bytes kept) and the
/// place is given back. (Before, the session waited on that ack for ever,
/// where even the idle timer could not end it.)
#[tokio::test]
async fn a_client_that_reads_no_answers_loses_its_stream_and_gives_its_place_back() {
    let server = TestServer::start_with(|c| {
        c.ingest.max_streams = 1;
        c.ingest.idle_timeout = std::time::Duration::from_secs(1);
        // Nearly every message is flushed, and acked, on its own.
        c.ingest.commit_interval = std::time::Duration::from_millis(1);
    })
    .await;
    // A 1 KiB window for this stream's answers: a hundred or so unread
    // acks fill it, and then the server's queue.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut deaf = with_token(channel, Some(&server.token_for("deaf", &ALL_ROLES, false).await));
    let mut s = Stream::start(&mut deaf).await.unwrap();
    s.open(&new_id(), spec("cust-deaf", REC, "audio/pcmu")).await.unwrap();

    let mut c = server.client().await;
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut offset = 0u64;
    let mut admitted = None;
    for i in 0u64.. {
        assert!(std::time::Instant::now() < give_up, "the deaf stream still holds the only place");
        // Not awaited for ever: once the server stops reading, this side's
        // send queue fills too.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), s.data(offset, &[0x55; 160])).await;
        offset += 160;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        if i % 50 == 49 {
            let opened = match Stream::start(&mut c).await {
                Ok(mut other) => other.open(&new_id(), spec("cust-deaf", REC, "audio/pcmu")).await.map(|_| other),
                Err(status) => Err(status),
            };
            match opened {
                Ok(other) => {
                    admitted = Some(other);
                    break;
                }
                Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
            }
        }
    }
    assert!(admitted.is_some());
    // Reading on, the deaf client gets its acks and then why it was ended.
    let status = loop {
        match s.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("read no answer"), "{}", status.message());
}
