//! Issue #5 points 1–2: search over interaction metadata with counts, and
//! seeded, fair, repeat-free samples of interaction groups; opted-out
//! customers never appear to coaches.

use std::collections::{BTreeMap, BTreeSet};

use recvault::api::pb;
use recvault::model::Role;
use tonic::Code;

use crate::common::*;

const REC: pb::ContentKind = pb::ContentKind::CallRecording;
const CHAT: pb::ContentKind = pb::ContentKind::ChatTranscript;

fn call_spec(customer: &str, call: &str, agent: &str, queue: &str, kind: pb::ContentKind, ct: &str) -> pb::ObjectSpec {
    let mut s = spec(customer, kind, ct);
    let i = s.interaction.as_mut().unwrap();
    i.interaction_id = call.into();
    i.agent_id = agent.into();
    i.queue = queue.into();
    i.tags = [("lang".to_owned(), if agent == "agent-0" { "pt" } else { "en" }.to_owned())].into();
    s
}

/// 3 agents x 2 queues, 24 calls each with a recording and a transcript;
/// one customer (cust-7) opts out of training use.
async fn seed(server: &TestServer) -> Vec<String> {
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    let mut calls = Vec::new();
    for n in 0..24 {
        let call = format!("call-{n:02}");
        let (agent, queue, customer) =
            (format!("agent-{}", n % 3), if n % 2 == 0 { "billing" } else { "support" }, format!("cust-{}", n % 8));
        put(&mut pbx, call_spec(&customer, &call, &agent, queue, REC, "audio/basic"), &[0x55; 800]).await.unwrap();
        put(&mut pbx, call_spec(&customer, &call, &agent, queue, CHAT, "text/plain"), b"hello").await.unwrap();
        calls.push(call);
    }
    let mut dpo = server.client_as("dpo-1", &[Role::Retention], false).await;
    dpo.set_consent(pb::SetConsentRequest {
        customer_id: "cust-7".into(),
        training_use: pb::TrainingUse::Deny as i32,
        updated_by: String::new(),
    })
    .await
    .unwrap();
    calls
}

fn filter() -> pb::SearchFilter {
    pb::SearchFilter::default()
}

#[tokio::test]
async fn search_filters_pages_and_counts() {
    let server = TestServer::start().await;
    seed(&server).await;
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let mut dpo = server.client_as("dpo-2", &[Role::Retention], false).await;
    let search = |f: pb::SearchFilter, page_size: u32, page_token: String| pb::SearchRequest {
        filter: Some(f),
        page_size,
        page_token,
    };

    // The privacy officer sees all 48; a coach never sees cust-7 (calls 7, 15, 23).
    let all = dpo.search(search(filter(), 1000, String::new())).await.unwrap().into_inner();
    assert_eq!((all.total, all.objects.len()), (48, 48));
    let coached = coach.search(search(filter(), 1000, String::new())).await.unwrap().into_inner();
    assert_eq!(coached.total, 42);
    assert!(coached.objects.iter().all(|o| o.customer_id != "cust-7"));

    // Metadata filters combine; tags must all match; pages carry on.
    let f = pb::SearchFilter { agent_id: "agent-1".into(), queue: "support".into(), kind: REC as i32, ..filter() };
    let r = coach.search(search(f, 100, String::new())).await.unwrap().into_inner();
    // agent-1 & odd n: n = 1, 7, 13, 19; n = 7 is cust-7.
    assert_eq!(r.total, 3);
    assert!(r.objects.iter().all(|o| o.interaction.as_ref().unwrap().agent_id == "agent-1"));
    let pt = pb::SearchFilter { tags: [("lang".to_owned(), "pt".to_owned())].into(), ..filter() };
    let r = dpo.search(search(pt, 5, String::new())).await.unwrap().into_inner();
    assert_eq!((r.total, r.objects.len()), (16, 5));
    let mut seen: BTreeSet<String> = r.objects.iter().map(|o| o.object_id.clone()).collect();
    let mut token = r.next_page_token;
    while !token.is_empty() {
        let pt = pb::SearchFilter { tags: [("lang".to_owned(), "pt".to_owned())].into(), ..filter() };
        let r = dpo.search(search(pt, 5, token)).await.unwrap().into_inner();
        seen.extend(r.objects.iter().map(|o| o.object_id.clone()));
        token = r.next_page_token;
    }
    assert_eq!(seen.len(), 16, "pages cover every match once");

    // A tag key that is not a tag key is refused, not passed to SQL.
    let bad = pb::SearchFilter { tags: [("la\"ng".to_owned(), "x".to_owned())].into(), ..filter() };
    assert_eq!(dpo.search(search(bad, 10, String::new())).await.unwrap_err().code(), Code::InvalidArgument);
    // Ingest may not search.
    let mut pbx = server.client_as("pbx-2", &[Role::Ingest], false).await;
    assert_eq!(pbx.search(search(filter(), 10, String::new())).await.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn samples_are_reproducible_fair_by_stratum_and_never_show_opt_outs() {
    let server = TestServer::start().await;
    seed(&server).await;
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let sample = |stratify: pb::Stratify, count: u32, per_stratum: u32, seed: u64| pb::SampleRequest {
        filter: Some(filter()),
        count,
        stratify: stratify as i32,
        per_stratum,
        seed,
    };
    let groups = |r: &pb::SampleResponse| r.groups.iter().map(|g| g.interaction_id.clone()).collect::<Vec<_>>();

    let a = coach.sample(sample(pb::Stratify::None, 8, 0, 7)).await.unwrap().into_inner();
    assert_eq!(a.population, 21, "24 calls less cust-7's 3");
    assert_eq!(a.groups.len(), 8);
    let b = coach.sample(sample(pb::Stratify::None, 8, 0, 7)).await.unwrap().into_inner();
    assert_eq!(groups(&a), groups(&b), "the same seed draws the same sample");
    let c = coach.sample(sample(pb::Stratify::None, 8, 0, 8)).await.unwrap().into_inner();
    assert_ne!(groups(&a), groups(&c));
    let unique: BTreeSet<_> = groups(&a).into_iter().collect();
    assert_eq!(unique.len(), 8, "no repeats");
    for g in &a.groups {
        // Each group is the call: its recording and its transcript.
        let kinds: BTreeSet<i32> = g.objects.iter().map(|o| o.kind).collect();
        assert_eq!(kinds, [REC as i32, CHAT as i32].into(), "{}", g.interaction_id);
        assert!(g.objects.iter().all(|o| o.interaction.as_ref().unwrap().interaction_id == g.interaction_id));
    }

    // Stratified: exactly k per agent, each from its own agent.
    let s = coach.sample(sample(pb::Stratify::PerAgent, 0, 2, 7)).await.unwrap().into_inner();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for g in &s.groups {
        *per.entry(g.stratum.clone()).or_default() += 1;
        assert!(g.objects.iter().all(|o| o.interaction.as_ref().unwrap().agent_id == g.stratum));
    }
    assert_eq!(per, [("agent-0".into(), 2), ("agent-1".into(), 2), ("agent-2".into(), 2)].into());
    let q = coach.sample(sample(pb::Stratify::PerQueue, 0, 100, 3)).await.unwrap().into_inner();
    assert_eq!(q.groups.len(), 21, "asking for more than a stratum has draws all of it once");

    // Across many seeds an opted-out customer never appears.
    for seed in 0..20 {
        let r = coach.sample(sample(pb::Stratify::None, 10, 0, seed)).await.unwrap().into_inner();
        assert!(r.groups.iter().flat_map(|g| &g.objects).all(|o| o.customer_id != "cust-7"));
    }
    // Bad draws are refused with a reason.
    let err = coach.sample(sample(pb::Stratify::None, 0, 0, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("count"), "{}", err.message());
}

/// Issue #5 point 1: search by how long the interaction lasted (declared
/// by the platform), inclusive bounds; unknown durations match no bound.
#[tokio::test]
async fn search_by_duration_range() {
    let server = TestServer::start().await;
    let mut pbx = server.client_as("pbx-1", &[Role::Ingest], false).await;
    for (n, secs) in [30u64, 90, 300, 0].into_iter().enumerate() {
        let mut s = call_spec(&format!("dur-{n}"), &format!("dcall-{n}"), "agent-1", "billing", REC, "audio/basic");
        s.interaction.as_mut().unwrap().duration_ms = secs * 1000;
        put(&mut pbx, s, &[0x55; 800]).await.unwrap();
    }
    let mut coach = server.client_as("coach-1", &[Role::Coach], false).await;
    let mut total = async |min: u64, max: u64| {
        let filter = pb::SearchFilter { min_duration_ms: min, max_duration_ms: max, ..Default::default() };
        coach.search(pb::SearchRequest { filter: Some(filter), ..Default::default() }).await.map(|r| r.into_inner())
    };
    assert_eq!(total(0, 0).await.unwrap().total, 4);
    assert_eq!(total(60_000, 0).await.unwrap().total, 2, "90 s and 300 s");
    assert_eq!(total(0, 120_000).await.unwrap().total, 2, "30 s and 90 s; the unknown one matches no bound");
    let one = total(90_000, 90_000).await.unwrap();
    assert_eq!(one.total, 1);
    assert_eq!(one.objects[0].interaction.as_ref().unwrap().duration_ms, 90_000, "shown back");
    let bad = total(120_000, 60_000).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("min_duration_ms"), "{}", bad.message());
}
