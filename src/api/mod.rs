//! gRPC edge: the only module that sees protobuf types. Each handler parses
//! its request into domain types, calls one use-case and maps the result
//! (errors through [`status::to_status`]).

pub mod status;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{self, Actor, AuditLog, Event};
use crate::auth::{self as authz, Authenticator, Principal, Rpc};
use crate::catalog::{CustomerState, ListFilter, StoredPolicy};
use crate::error::Error;
use crate::ingest::{ClientMsg, Ingest, ServerMsg};
use crate::model::{
    ContentKind, CustomerId, Direction, Hold, HoldId, Interaction, InvalidInput, ObjectId, ObjectRecord, ObjectSpec,
    Purpose, RetentionPolicy, Role, TimeSpan, TokenRecord, UploadId,
};
use crate::retention::{Retention, ShredStatus, SweepReport};
use crate::retrieve::sample::Strata;
use crate::retrieve::{ByteRange, Retrieve, SampleDraw};
use status::to_status;

/// Generated protobuf and gRPC code of `proto/recvault/v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("recvault.v1");

    /// Encoded descriptors, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("recvault_descriptor");
}

/// Largest `data` of one ingest message the server accepts.
pub const MAX_CHUNK: usize = 1 << 20;

/// The Recvault gRPC service.
pub struct Service {
    ingest: Arc<Ingest>,
    retrieve: Arc<Retrieve>,
    retention: Arc<Retention>,
    audit: AuditLog,
    auth: Arc<Authenticator>,
    /// Issues playback links; `None` when the HTTP port is disabled.
    links: Option<Arc<crate::web::Links>>,
}

impl Service {
    pub fn new(
        ingest: Arc<Ingest>,
        retrieve: Arc<Retrieve>,
        retention: Arc<Retention>,
        audit: AuditLog,
        auth: Arc<Authenticator>,
        links: Option<Arc<crate::web::Links>>,
    ) -> Self {
        Self { ingest, retrieve, retention, audit, auth, links }
    }

    /// Identifies the caller and checks that its roles open `rpc`. A refusal
    /// is recorded in the audit trail (best effort) and answered with
    /// UNAUTHENTICATED or PERMISSION_DENIED.
    async fn authorize<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<(Actor, Principal), Status> {
        let request_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok());
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v));
        let cert = request.peer_certs().and_then(|c| c.first().map(|d| d.to_vec()));
        let principal = match self.auth.authenticate(bearer, cert.as_deref()).await {
            Ok(p) => p,
            Err(e) => {
                let actor = Actor::unauthenticated(request.remote_addr(), request_id);
                tracing::info!(principal = %actor.principal, rpc = rpc.name(), "call refused");
                let event = Event::new("auth.denied").target(rpc.name()).result(format!("refused: {e}"));
                self.audit.append_anonymous(&actor, event).await;
                return Err(to_status(e));
            }
        };
        let actor = Actor::new(&principal.name, request_id);
        if let Err(e) = principal.authorize(rpc) {
            self.denied(&actor, rpc, &e).await;
            return Err(to_status(e));
        }
        Ok((actor, principal))
    }

    /// Records a refused request (best effort, after the fact), naming the
    /// customer of `object` when the catalog knows it, and answers it.
    async fn refused(&self, actor: &Actor, event: Event, object: Option<&ObjectId>, e: Error) -> Status {
        self.retrieve.refused(actor, event, object, &e).await;
        to_status(e)
    }

    /// Answers a metadata read (`Stat`, `List`, `Search`, `Sample`) with
    /// its audit record: written before the answer leaves (no record, no
    /// answer, as for a `Get`), or after a refusal (best effort). `facts`
    /// adds what was found: counts, never tags or hashes.
    async fn looked_up<T>(
        &self,
        actor: &Actor,
        event: Event,
        found: Result<T, Error>,
        facts: impl FnOnce(&T, Event) -> Event,
    ) -> Result<T, Status> {
        match found {
            Ok(found) => {
                self.audit.append(actor, facts(&found, event)).await.map_err(to_status)?;
                Ok(found)
            }
            Err(e) => Err(self.refused(actor, event, None, e).await),
        }
    }

    async fn denied(&self, actor: &Actor, rpc: Rpc, e: &Error) {
        tracing::info!(principal = %actor.principal, rpc = rpc.name(), "call refused");
        let event = Event::new("auth.denied").target(rpc.name()).result(format!("refused: {e}"));
        let _ = self.audit.append(actor, event).await;
    }
}

/// A role as its wire enum value.
pub fn role_code(r: Role) -> i32 {
    let code = match r {
        Role::Ingest => pb::Role::Ingest,
        Role::Coach => pb::Role::Coach,
        Role::Retention => pb::Role::Retention,
        Role::Admin => pb::Role::Admin,
        Role::Auditor => pb::Role::Auditor,
    };
    code as i32
}

/// A purpose as its wire enum value.
pub fn purpose_code(p: Purpose) -> i32 {
    let code = match p {
        Purpose::Unspecified => pb::Purpose::Unspecified,
        Purpose::Coaching => pb::Purpose::Coaching,
        Purpose::QualityReview => pb::Purpose::QualityReview,
        Purpose::Legal => pb::Purpose::Legal,
        Purpose::DataSubjectRequest => pb::Purpose::DataSubjectRequest,
    };
    code as i32
}

fn parse_role(code: i32) -> Result<Role, Error> {
    match pb::Role::try_from(code) {
        Ok(pb::Role::Ingest) => Ok(Role::Ingest),
        Ok(pb::Role::Coach) => Ok(Role::Coach),
        Ok(pb::Role::Retention) => Ok(Role::Retention),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Auditor) => Ok(Role::Auditor),
        _ => Err(Error::Invalid(format!("role {code} is not known: use INGEST, COACH, RETENTION, ADMIN or AUDITOR"))),
    }
}

fn token_info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        token_id: t.token_id.clone(),
        name: t.name.clone(),
        roles: t.roles.iter().copied().map(role_code).collect(),
        unredacted: t.unredacted,
        created_by: t.created_by.clone(),
        created_at: Some(ms_to_ts(t.created_at_ms)),
        expires_at: t.expires_at_ms.map(ms_to_ts),
        revoked_at: t.revoked_at_ms.map(ms_to_ts),
    }
}

/// Whether the caller sees only customers who allow training use (a coach
/// without the break-glass grant or the retention role).
fn training_only(p: &Principal) -> bool {
    !p.unredacted && !p.roles.contains(&Role::Retention)
}

fn parse_purpose(code: i32) -> Result<Purpose, Error> {
    match pb::Purpose::try_from(code) {
        Ok(pb::Purpose::Unspecified) => Ok(Purpose::Unspecified),
        Ok(pb::Purpose::Coaching) => Ok(Purpose::Coaching),
        Ok(pb::Purpose::QualityReview) => Ok(Purpose::QualityReview),
        Ok(pb::Purpose::Legal) => Ok(Purpose::Legal),
        Ok(pb::Purpose::DataSubjectRequest) => Ok(Purpose::DataSubjectRequest),
        Err(_) => Err(Error::Invalid(format!(
            "purpose {code} is not known: use COACHING, QUALITY_REVIEW, LEGAL or DATA_SUBJECT_REQUEST"
        ))),
    }
}

fn consent_info(c: &crate::model::Consent) -> pb::Consent {
    pb::Consent {
        customer_id: c.customer_id.to_string(),
        training_use: if c.training_use { pb::TrainingUse::Allow } else { pb::TrainingUse::Deny } as i32,
        updated_by: c.updated_by.clone(),
        updated_at: (c.updated_at_ms > 0).then(|| ms_to_ts(c.updated_at_ms)),
    }
}

fn audit_record(r: audit::Record) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        at: Some(ms_to_ts(r.at_ms)),
        principal: r.principal,
        action: r.action,
        customer_id: r.customer_id.unwrap_or_default(),
        target: r.target.unwrap_or_default(),
        purpose: r.purpose.unwrap_or_default(),
        result: r.result,
        request_id: r.request_id,
        detail_json: r.detail,
        hash: hex::encode(r.hash),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn field(name: &str, e: InvalidInput) -> Error {
    Error::Invalid(format!("{name}: {e}"))
}

fn parse_object_id(s: &str) -> Result<ObjectId, Error> {
    ObjectId::parse(s).map_err(|e| field("object_id", e))
}

fn parse_kind(code: i32, name: &str) -> Result<ContentKind, Error> {
    u8::try_from(code)
        .ok()
        .and_then(ContentKind::from_code)
        .ok_or_else(|| Error::Invalid(format!("{name} must be CALL_RECORDING, CHAT_TRANSCRIPT or IMAGE (got {code})")))
}

fn ts_to_ms(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds.saturating_mul(1000).saturating_add(i64::from(ts.nanos) / 1_000_000)
}

fn ms_to_ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn parse_spec(spec: Option<pb::ObjectSpec>) -> Result<ObjectSpec, Error> {
    let spec = spec.ok_or_else(|| Error::Invalid("spec is required (customer_id, kind, content_type)".into()))?;
    let customer_id = CustomerId::parse(&spec.customer_id).map_err(|e| field("customer_id", e))?;
    let kind = parse_kind(spec.kind, "kind")?;
    let sensitive_spans = spec.sensitive_spans.iter().map(time_span).collect();
    let i = spec.interaction.unwrap_or_default();
    let interaction = Interaction {
        interaction_id: i.interaction_id,
        channel: i.channel,
        agent_id: i.agent_id,
        queue: i.queue,
        direction: Direction::from_code(u8::try_from(i.direction).unwrap_or(0)),
        started_at_ms: i.started_at.as_ref().map(ts_to_ms),
        tags: i.tags.into_iter().collect::<BTreeMap<_, _>>(),
        duration_ms: (i.duration_ms > 0).then_some(i.duration_ms),
    };
    Ok(ObjectSpec { customer_id, kind, content_type: spec.content_type, interaction, sensitive_spans })
}

/// The audit event of a metadata lookup: the customer it was limited to,
/// if any, and the names (not the values) of the other filters it used.
fn lookup_event(action: &'static str, filter: &ListFilter) -> Event {
    let event = Event::new(action);
    let event = match &filter.customer_id {
        Some(c) => event.customer(c),
        None => event,
    };
    let used: Vec<&str> = [
        ("interaction_id", filter.interaction_id.is_some()),
        ("kind", filter.kind.is_some()),
        ("created", filter.created_after_ms.is_some() || filter.created_before_ms.is_some()),
        ("agent_id", filter.agent_id.is_some()),
        ("queue", filter.queue.is_some()),
        ("channel", filter.channel.is_some()),
        ("direction", filter.direction.is_some()),
        ("started", filter.started_after_ms.is_some() || filter.started_before_ms.is_some()),
        ("duration", filter.min_duration_ms.is_some() || filter.max_duration_ms.is_some()),
        ("tags", !filter.tags.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if used.is_empty() { event } else { event.detail("filters", used) }
}

fn parse_search_filter(f: Option<pb::SearchFilter>) -> Result<ListFilter, Error> {
    let f = f.unwrap_or_default();
    let some = |s: String| (!s.is_empty()).then_some(s);
    for (k, v) in &f.tags {
        // The same rule as at ingest; keys also become JSON path members.
        crate::model::Interaction { tags: [(k.clone(), v.clone())].into(), ..Default::default() }
            .validate()
            .map_err(|e| field("filter.tags", e))?;
    }
    if f.min_duration_ms > 0 && f.max_duration_ms > 0 && f.min_duration_ms > f.max_duration_ms {
        return Err(Error::Invalid(format!(
            "filter.min_duration_ms {} is more than filter.max_duration_ms {}",
            f.min_duration_ms, f.max_duration_ms
        )));
    }
    Ok(ListFilter {
        customer_id: (!f.customer_id.is_empty()).then(|| parse_customer(&f.customer_id)).transpose()?,
        interaction_id: some(f.interaction_id),
        kind: (f.kind != 0).then(|| parse_kind(f.kind, "filter.kind")).transpose()?,
        created_after_ms: f.created_after.as_ref().map(ts_to_ms),
        created_before_ms: f.created_before.as_ref().map(ts_to_ms),
        agent_id: some(f.agent_id),
        queue: some(f.queue),
        channel: some(f.channel),
        direction: (f.direction != 0).then(|| Direction::from_code(u8::try_from(f.direction).unwrap_or(0))),
        started_after_ms: f.started_after.as_ref().map(ts_to_ms),
        started_before_ms: f.started_before.as_ref().map(ts_to_ms),
        min_duration_ms: (f.min_duration_ms > 0).then_some(f.min_duration_ms),
        max_duration_ms: (f.max_duration_ms > 0).then_some(f.max_duration_ms),
        tags: f.tags.into_iter().collect(),
        originals_only: false,
        training_use: None,
    })
}

fn time_span(s: &pb::TimeSpan) -> TimeSpan {
    TimeSpan { start_ms: s.start_ms, end_ms: s.end_ms }
}

fn span_info(s: &TimeSpan) -> pb::TimeSpan {
    pb::TimeSpan { start_ms: s.start_ms, end_ms: s.end_ms }
}

fn parse_sha(b: &[u8]) -> Result<Option<[u8; 32]>, Error> {
    match b.len() {
        0 => Ok(None),
        32 => Ok(Some(b.try_into().expect("32 bytes"))),
        n => Err(Error::Invalid(format!("expected_sha256 must be 32 bytes (the raw digest, not hex); got {n}"))),
    }
}

fn parse_ingest(req: pb::IngestRequest) -> Result<ClientMsg, Error> {
    use pb::ingest_request::Msg;
    match req.msg {
        Some(Msg::Open(open)) => Ok(ClientMsg::Open {
            upload_id: UploadId::parse_client(&open.upload_id).map_err(|e| field("upload_id", e))?,
            spec: parse_spec(open.spec)?,
        }),
        Some(Msg::Data(d)) => {
            if d.data.len() > MAX_CHUNK {
                return Err(Error::TooLarge(format!("a data message carries at most {MAX_CHUNK} bytes; split it")));
            }
            Ok(ClientMsg::Data { offset: d.offset, data: d.data })
        }
        Some(Msg::Finish(f)) => Ok(ClientMsg::Finish {
            expected_sha256: parse_sha(&f.expected_sha256)?,
            expected_size: (f.expected_size != 0).then_some(f.expected_size),
        }),
        None => Err(Error::Invalid("empty ingest message: set open, data or finish".into())),
    }
}

/// Domain object to its wire form.
pub fn object_info(o: &ObjectRecord) -> pb::ObjectInfo {
    let i = &o.spec.interaction;
    pb::ObjectInfo {
        object_id: o.object_id.to_string(),
        customer_id: o.spec.customer_id.as_str().to_owned(),
        kind: i32::from(o.spec.kind.code()),
        content_type: o.spec.content_type.clone(),
        size: o.size,
        sha256: Bytes::copy_from_slice(&o.sha256),
        created_at: Some(ms_to_ts(o.created_at_ms)),
        interaction: Some(pb::Interaction {
            interaction_id: i.interaction_id.clone(),
            channel: i.channel.clone(),
            agent_id: i.agent_id.clone(),
            queue: i.queue.clone(),
            direction: i32::from(i.direction.code()),
            started_at: i.started_at_ms.map(ms_to_ts),
            tags: i.tags.clone().into_iter().collect(),
            duration_ms: i.duration_ms.unwrap_or(0),
        }),
        upload_id: o.upload_id.to_string(),
        expires_at: o.retention.expires_at_ms.map(ms_to_ts),
        retention_policy: o.retention.policy.clone(),
        derived_from: o.derived_from.map(|d| d.to_string()).unwrap_or_default(),
        sensitive_spans: o.spec.sensitive_spans.iter().map(span_info).collect(),
    }
}

fn parse_customer(s: &str) -> Result<CustomerId, Error> {
    CustomerId::parse(s).map_err(|e| field("customer_id", e))
}

fn state_code(s: CustomerState) -> i32 {
    match s {
        CustomerState::Active => pb::CustomerState::Active as i32,
        CustomerState::PendingShred => pb::CustomerState::PendingShred as i32,
        CustomerState::Shredded => pb::CustomerState::Shredded as i32,
    }
}

fn hold_info(h: &Hold) -> pb::Hold {
    pb::Hold {
        hold_id: h.hold_id.to_string(),
        customer_id: h.customer_id.to_string(),
        interaction_id: h.interaction_id.clone().unwrap_or_default(),
        case_ref: h.case_ref.clone(),
        reason: h.reason.clone(),
        placed_by: h.placed_by.clone(),
        placed_at: Some(ms_to_ts(h.placed_at_ms)),
        released_by: h.released_by.clone().unwrap_or_default(),
        released_at: h.released_at_ms.map(ms_to_ts),
    }
}

fn shred_status(s: ShredStatus) -> pb::ShredStatus {
    let mut out = pb::ShredStatus {
        customer_id: s.customer_id.to_string(),
        state: state_code(s.state),
        blocking_holds: s.blocking_holds.iter().map(hold_info).collect(),
        ..Default::default()
    };
    if let Some(t) = s.ticket {
        out.reason = t.reason;
        out.requested_by = t.requested_by;
        out.requested_at = Some(ms_to_ts(t.requested_at_ms));
        out.destroy_after = Some(ms_to_ts(t.destroy_after_ms));
        out.requires_approval = t.requires_approval;
        out.approved_by = t.approved_by.unwrap_or_default();
        out.approved_at = t.approved_at_ms.map(ms_to_ts);
        if let Some(d) = t.destroyed {
            out.destroyed_at = Some(ms_to_ts(d.at_ms));
            out.key_versions_destroyed = d.key_versions.len() as u32;
            out.objects_shredded = d.objects;
            out.uploads_discarded = d.uploads;
        }
        out.certificate_json = t.certificate.unwrap_or_default();
    }
    out
}

fn policy_info(p: &StoredPolicy) -> pb::RetentionPolicy {
    let (tag_key, tag_value) = p.policy.tag.clone().unwrap_or_default();
    pb::RetentionPolicy {
        name: p.policy.name.clone(),
        kind: i32::from(p.policy.kind.code()),
        queue: p.policy.queue.clone().unwrap_or_default(),
        channel: p.policy.channel.clone().unwrap_or_default(),
        tag_key,
        tag_value,
        retain_seconds: p.policy.retain_secs,
        from_config: p.from_config,
    }
}

fn parse_policy(p: Option<pb::RetentionPolicy>) -> Result<RetentionPolicy, Error> {
    let p = p.ok_or_else(|| Error::Invalid("policy is required".into()))?;
    let some = |s: String| (!s.is_empty()).then_some(s);
    let tag = match (some(p.tag_key), some(p.tag_value)) {
        (None, None) => None,
        (Some(k), Some(v)) => Some((k, v)),
        _ => return Err(Error::Invalid("a tag criterion needs both tag_key and tag_value".into())),
    };
    let policy = RetentionPolicy {
        name: p.name,
        kind: parse_kind(p.kind, "policy.kind")?,
        queue: some(p.queue),
        channel: some(p.channel),
        tag,
        retain_secs: p.retain_seconds,
    };
    policy.validate()?;
    Ok(policy)
}

fn sweep_report(r: SweepReport) -> pb::RetentionReport {
    pb::RetentionReport {
        dry_run: r.dry_run,
        objects_expired: r.objects_expired,
        objects_held: r.objects_held,
        shreds_completed: r.shreds_completed,
        shreds_waiting: r.shreds_waiting,
        uploads_abandoned: r.uploads_abandoned,
        orphan_journals_removed: r.orphan_journals_removed,
        leftovers: r.leftovers,
    }
}

fn ingest_response(m: ServerMsg) -> pb::IngestResponse {
    use pb::ingest_response::{Ack, Msg, Opened};
    let msg = match m {
        ServerMsg::Opened { upload_id, object_id, durable_offset, committed } => Msg::Opened(Opened {
            upload_id: upload_id.to_string(),
            object_id: object_id.to_string(),
            durable_offset,
            committed: committed.is_some(),
        }),
        ServerMsg::Ack { durable_offset } => Msg::Ack(Ack { durable_offset }),
        ServerMsg::Committed(o) => Msg::Committed(object_info(&o)),
    };
    pb::IngestResponse { msg: Some(msg) }
}

#[tonic::async_trait]
impl pb::recvault_server::Recvault for Service {
    type IngestStream = BoxStream<pb::IngestResponse>;
    type GetStream = BoxStream<pb::GetResponse>;

    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        // Before authorising: a stream over the limit is refused without a
        // catalog read, so refusals stay cheap while the server is full
        // (all that a refused caller learns is that the server is busy).
        let admission = self.ingest.admit().map_err(to_status)?;
        let (caller, _) = self.authorize(&request, Rpc::Ingest).await?;
        let inbound = request.into_inner().map(|r| match r {
            Ok(req) => parse_ingest(req),
            Err(status) if matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => {
                Err(Error::TooLarge(format!(
                    "a message exceeded the server's size limit ({}); send data in messages of at most {MAX_CHUNK} bytes",
                    status.message()
                )))
            }
            Err(status) => Err(Error::Unavailable(format!("the request stream broke: {}", status.message()))),
        });
        let (tx, rx) = mpsc::channel(16);
        // Its own task: the session must run to a clean end (journal
        // settled, lease released) even when the client vanishes.
        let ingest = self.ingest.clone();
        tokio::spawn(async move {
            ingest.run_stream(caller, Box::pin(inbound), tx).await;
            drop(admission);
        });
        let out = ReceiverStream::new(rx).map(|r| r.map(ingest_response).map_err(to_status));
        Ok(Response::new(Box::pin(out)))
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let (caller, _) = self.authorize(&request, Rpc::Put).await?;
        let req = request.into_inner();
        let run = async {
            let upload_id = if req.upload_id.is_empty() {
                UploadId::new_random()
            } else {
                UploadId::parse_client(&req.upload_id).map_err(|e| field("upload_id", e))?
            };
            let spec = parse_spec(req.spec)?;
            let sha = parse_sha(&req.expected_sha256)?;
            self.ingest.put(&caller, upload_id, spec, req.data, sha).await
        };
        let object = run.await.map_err(to_status)?;
        Ok(Response::new(pb::PutResponse { object: Some(object_info(&object)) }))
    }

    async fn stat(&self, request: Request<pb::StatRequest>) -> Result<Response<pb::ObjectInfo>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::Stat).await?;
        let id = parse_object_id(&request.get_ref().object_id).map_err(to_status)?;
        let event = Event::new("object.stat").target(id);
        match self.retrieve.stat(&id, training_only(&principal)).await {
            Ok(record) => {
                self.audit.append(&caller, event.customer(&record.spec.customer_id)).await.map_err(to_status)?;
                Ok(Response::new(object_info(&record)))
            }
            Err(e) => Err(self.refused(&caller, event, Some(&id), e).await),
        }
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::Get).await?;
        let req = request.into_inner();
        let id = parse_object_id(&req.object_id).map_err(to_status)?;
        let purpose = parse_purpose(req.purpose).map_err(to_status)?;
        if let Err(e) = authz::check_purpose(&principal, purpose) {
            let event = Event::new("object.read").target(id).purpose(purpose.name());
            return Err(self.refused(&caller, event, Some(&id), e).await);
        }
        let range = req.range.map(|r| ByteRange { start: r.start, end: r.end }).unwrap_or_default();
        let (record, chunks) =
            self.retrieve.read(&caller, purpose, &id, range, !principal.unredacted).await.map_err(to_status)?;
        let first = pb::GetResponse { info: Some(object_info(&record)), offset: range.start, data: Bytes::new() };
        let rest =
            chunks.map(|c| c.map(|(offset, data)| pb::GetResponse { info: None, offset, data }).map_err(to_status));
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(first) }).chain(rest))))
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::List).await?;
        let req = request.into_inner();
        let parse = || {
            Ok::<_, Error>(ListFilter {
                customer_id: (!req.customer_id.is_empty())
                    .then(|| CustomerId::parse(&req.customer_id).map_err(|e| field("customer_id", e)))
                    .transpose()?,
                interaction_id: (!req.interaction_id.is_empty()).then(|| req.interaction_id.clone()),
                kind: (req.kind != 0).then(|| parse_kind(req.kind, "kind")).transpose()?,
                created_after_ms: req.created_after.as_ref().map(ts_to_ms),
                created_before_ms: req.created_before.as_ref().map(ts_to_ms),
                ..Default::default()
            })
        };
        let filter = parse().map_err(to_status)?;
        let found =
            self.retrieve.list(&filter, &req.page_token, req.page_size as usize, training_only(&principal)).await;
        let page = self
            .looked_up(&caller, lookup_event("object.list", &filter), found, |page, event| {
                event.detail("returned", page.objects.len())
            })
            .await?;
        Ok(Response::new(pb::ListResponse {
            objects: page.objects.iter().map(object_info).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn mark_sensitive(
        &self,
        request: Request<pb::MarkSensitiveRequest>,
    ) -> Result<Response<pb::ObjectInfo>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::MarkSensitive).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_object_id(&req.object_id)?;
            let spans: Vec<TimeSpan> = req.spans.iter().map(time_span).collect();
            let record = self.retrieve.mark_sensitive(&caller, &id, &spans).await?;
            // The answer describes the object only to a caller who could
            // `Stat` it: an ingest platform (upload only, "not even
            // metadata") and a coach marking an opted-out customer's call
            // learn the spans now marked, nothing else.
            let may_stat = principal.may(Rpc::Stat)
                && (!training_only(&principal) || self.retrieve.training_use(&record.spec.customer_id).await?);
            Ok::<_, Error>(if may_stat {
                object_info(&record)
            } else {
                pb::ObjectInfo {
                    object_id: record.object_id.to_string(),
                    sensitive_spans: record.spec.sensitive_spans.iter().map(span_info).collect(),
                    ..Default::default()
                }
            })
        };
        Ok(Response::new(run.await.map_err(to_status)?))
    }

    async fn search(&self, request: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::Search).await?;
        let req = request.into_inner();
        let filter = parse_search_filter(req.filter).map_err(to_status)?;
        let event = lookup_event("object.search", &filter);
        let found =
            self.retrieve.search(filter, &req.page_token, req.page_size as usize, training_only(&principal)).await;
        let (page, total) = self
            .looked_up(&caller, event, found, |(page, total), event| {
                event.detail("returned", page.objects.len()).detail("total", total)
            })
            .await?;
        Ok(Response::new(pb::SearchResponse {
            objects: page.objects.iter().map(object_info).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            total,
        }))
    }

    async fn sample(&self, request: Request<pb::SampleRequest>) -> Result<Response<pb::SampleResponse>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::Sample).await?;
        let req = request.into_inner();
        let parse = || {
            let strata = match pb::Stratify::try_from(req.stratify) {
                Ok(pb::Stratify::None) => Strata::None,
                Ok(pb::Stratify::PerAgent) => Strata::Agent,
                Ok(pb::Stratify::PerQueue) => Strata::Queue,
                Err(_) => return Err(Error::Invalid("stratify must be STRATIFY_NONE, PER_AGENT or PER_QUEUE".into())),
            };
            if strata == Strata::None && !(1..=1000).contains(&req.count) {
                return Err(Error::Invalid(format!("count must be 1-1000 for a uniform draw, got {}", req.count)));
            }
            if strata != Strata::None && !(1..=100).contains(&req.per_stratum) {
                return Err(Error::Invalid(format!(
                    "per_stratum must be 1-100 for a stratified draw, got {}",
                    req.per_stratum
                )));
            }
            let draw =
                SampleDraw { strata, count: req.count as usize, per_stratum: req.per_stratum as usize, seed: req.seed };
            Ok((parse_search_filter(req.filter.clone())?, draw))
        };
        let (filter, draw) = parse().map_err(to_status)?;
        let event = lookup_event("object.sample", &filter);
        let found = self.retrieve.sample(filter, draw, training_only(&principal)).await;
        let (groups, population) = self
            .looked_up(&caller, event, found, |(groups, population), event| {
                let objects: usize = groups.iter().map(|g| g.objects.len()).sum();
                event.detail("groups", groups.len()).detail("returned", objects).detail("population", population)
            })
            .await?;
        Ok(Response::new(pb::SampleResponse {
            groups: groups
                .iter()
                .map(|g| pb::InteractionGroup {
                    interaction_id: g.key.clone(),
                    stratum: g.stratum.clone(),
                    objects: g.objects.iter().map(object_info).collect(),
                })
                .collect(),
            population,
        }))
    }

    async fn shred_customer(
        &self,
        request: Request<pb::ShredCustomerRequest>,
    ) -> Result<Response<pb::ShredStatus>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::ShredCustomer).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_customer(&req.customer_id)?;
            self.retention.request_shred(&caller, &id, &req.reason, &principal.name).await
        };
        Ok(Response::new(shred_status(run.await.map_err(to_status)?)))
    }

    async fn approve_shred(
        &self,
        request: Request<pb::ApproveShredRequest>,
    ) -> Result<Response<pb::ShredStatus>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::ApproveShred).await?;
        let req = request.into_inner();
        let run =
            async { self.retention.approve_shred(&caller, &parse_customer(&req.customer_id)?, &principal.name).await };
        Ok(Response::new(shred_status(run.await.map_err(to_status)?)))
    }

    async fn cancel_shred(
        &self,
        request: Request<pb::CancelShredRequest>,
    ) -> Result<Response<pb::ShredStatus>, Status> {
        let (caller, _) = self.authorize(&request, Rpc::CancelShred).await?;
        let run =
            async { self.retention.cancel_shred(&caller, &parse_customer(&request.get_ref().customer_id)?).await };
        Ok(Response::new(shred_status(run.await.map_err(to_status)?)))
    }

    async fn get_shred_status(
        &self,
        request: Request<pb::GetShredStatusRequest>,
    ) -> Result<Response<pb::ShredStatus>, Status> {
        self.authorize(&request, Rpc::GetShredStatus).await?;
        let run = async { self.retention.shred_status(&parse_customer(&request.get_ref().customer_id)?).await };
        Ok(Response::new(shred_status(run.await.map_err(to_status)?)))
    }

    async fn get_shred_certificate(
        &self,
        request: Request<pb::GetShredStatusRequest>,
    ) -> Result<Response<pb::ShredCertificate>, Status> {
        self.authorize(&request, Rpc::GetShredCertificate).await?;
        let run = async {
            let id = parse_customer(&request.get_ref().customer_id)?;
            self.retention.certificate(&id).await.map(|c| (id, c))
        };
        let (id, certificate_json) = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ShredCertificate {
            customer_id: id.to_string(),
            certificate_json,
            signing_key_id: self.retention.signing_key_id().to_owned(),
        }))
    }

    async fn place_hold(&self, request: Request<pb::PlaceHoldRequest>) -> Result<Response<pb::Hold>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::PlaceHold).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_customer(&req.customer_id)?;
            let interaction = (!req.interaction_id.is_empty()).then_some(req.interaction_id);
            self.retention.place_hold(&caller, id, interaction, &req.case_ref, &req.reason, &principal.name).await
        };
        Ok(Response::new(hold_info(&run.await.map_err(to_status)?)))
    }

    async fn release_hold(&self, request: Request<pb::ReleaseHoldRequest>) -> Result<Response<pb::Hold>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::ReleaseHold).await?;
        let req = request.into_inner();
        let run = async {
            let id = HoldId::parse(&req.hold_id).map_err(|e| field("hold_id", e))?;
            self.retention.release_hold(&caller, &id, &principal.name).await
        };
        Ok(Response::new(hold_info(&run.await.map_err(to_status)?)))
    }

    async fn list_holds(
        &self,
        request: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        self.authorize(&request, Rpc::ListHolds).await?;
        let req = request.into_inner();
        let run = async {
            let customer = (!req.customer_id.is_empty()).then(|| parse_customer(&req.customer_id)).transpose()?;
            self.retention.holds(customer.as_ref(), req.include_released).await
        };
        let holds = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ListHoldsResponse { holds: holds.iter().map(hold_info).collect() }))
    }

    async fn list_retention_policies(
        &self,
        request: Request<pb::ListRetentionPoliciesRequest>,
    ) -> Result<Response<pb::ListRetentionPoliciesResponse>, Status> {
        self.authorize(&request, Rpc::ListRetentionPolicies).await?;
        let policies = self.retention.policies().await.map_err(to_status)?;
        Ok(Response::new(pb::ListRetentionPoliciesResponse { policies: policies.iter().map(policy_info).collect() }))
    }

    async fn set_retention_policy(
        &self,
        request: Request<pb::SetRetentionPolicyRequest>,
    ) -> Result<Response<pb::RetentionPolicyChange>, Status> {
        let (caller, _) = self.authorize(&request, Rpc::SetRetentionPolicy).await?;
        let req = request.into_inner();
        let run = async { self.retention.set_policy(&caller, parse_policy(req.policy)?, req.reapply).await };
        Ok(Response::new(pb::RetentionPolicyChange { objects_updated: run.await.map_err(to_status)? }))
    }

    async fn delete_retention_policy(
        &self,
        request: Request<pb::DeleteRetentionPolicyRequest>,
    ) -> Result<Response<pb::RetentionPolicyChange>, Status> {
        let (caller, _) = self.authorize(&request, Rpc::DeleteRetentionPolicy).await?;
        let req = request.into_inner();
        let updated = self.retention.delete_policy(&caller, &req.name, req.reapply).await.map_err(to_status)?;
        Ok(Response::new(pb::RetentionPolicyChange { objects_updated: updated }))
    }

    async fn run_retention(
        &self,
        request: Request<pb::RunRetentionRequest>,
    ) -> Result<Response<pb::RetentionReport>, Status> {
        let (caller, _) = self.authorize(&request, Rpc::RunRetention).await?;
        let report = self.retention.sweep(&caller, request.get_ref().dry_run).await.map_err(to_status)?;
        Ok(Response::new(sweep_report(report)))
    }

    async fn set_consent(&self, request: Request<pb::SetConsentRequest>) -> Result<Response<pb::Consent>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::SetConsent).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_customer(&req.customer_id)?;
            let allow = match pb::TrainingUse::try_from(req.training_use) {
                Ok(pb::TrainingUse::Allow) => true,
                Ok(pb::TrainingUse::Deny) => false,
                _ => return Err(Error::Invalid("training_use must be ALLOW or DENY".into())),
            };
            let by = if req.updated_by.trim().is_empty() { principal.name.clone() } else { req.updated_by.clone() };
            self.retrieve.set_consent(&caller, &id, allow, &by).await
        };
        Ok(Response::new(consent_info(&run.await.map_err(to_status)?)))
    }

    async fn get_consent(&self, request: Request<pb::GetConsentRequest>) -> Result<Response<pb::Consent>, Status> {
        self.authorize(&request, Rpc::GetConsent).await?;
        let run = async { self.retrieve.consent(&parse_customer(&request.get_ref().customer_id)?).await };
        Ok(Response::new(consent_info(&run.await.map_err(to_status)?)))
    }

    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        self.authorize(&request, Rpc::ListAuditRecords).await?;
        let req = request.into_inner();
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let filter = audit::Filter {
            customer_id: nonempty(req.customer_id),
            action: nonempty(req.action),
            principal: nonempty(req.principal),
            since_ms: req.since.as_ref().map(ts_to_ms),
            until_ms: req.until.as_ref().map(ts_to_ms),
            before_seq: (req.before_seq > 0).then_some(req.before_seq),
            limit: match req.page_size {
                0 => 50,
                n => n.min(1000) as usize,
            },
        };
        let head = self.audit.head();
        let records = self.audit.search(filter).await.map_err(to_status)?;
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records: records.into_iter().map(audit_record).collect(),
            head: head.to_string(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::CreateToken).await?;
        let req = request.into_inner();
        let run = async {
            let roles = req.roles.iter().map(|r| parse_role(*r)).collect::<Result<Vec<_>, _>>()?;
            let ttl = (req.ttl_seconds > 0).then(|| std::time::Duration::from_secs(req.ttl_seconds));
            let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            let event = Event::new("token.create")
                .target(&req.name)
                .detail("roles", &names)
                .detail("unredacted", req.unredacted)
                .detail("ttl_seconds", req.ttl_seconds);
            self.audit.append(&caller, event.clone()).await?;
            let created = self.auth.create_token(&principal.name, &req.name, &roles, req.unredacted, ttl).await;
            if let Err(e) = &created {
                let _ = self.audit.append(&caller, event.result(format!("failed: {e}"))).await;
            }
            created
        };
        let new = run.await.map_err(to_status)?;
        tracing::info!(token_id = %new.record.token_id, name = %new.record.name, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: new.token.as_str().to_owned(),
            info: Some(token_info(&new.record)),
        }))
    }

    async fn revoke_token(&self, request: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::TokenInfo>, Status> {
        let (caller, _) = self.authorize(&request, Rpc::RevokeToken).await?;
        let id = request.into_inner().token_id;
        let run = async {
            self.audit.append(&caller, Event::new("token.revoke").target(&id)).await?;
            self.auth.revoke_token(&id).await
        };
        let record = run.await.map_err(to_status)?;
        tracing::info!(token_id = %record.token_id, name = %record.name, "token revoked");
        Ok(Response::new(token_info(&record)))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.authorize(&request, Rpc::ListTokens).await?;
        let tokens = self.auth.tokens().await.map_err(to_status)?;
        Ok(Response::new(pb::ListTokensResponse { tokens: tokens.iter().map(token_info).collect() }))
    }

    async fn create_playback_link(
        &self,
        request: Request<pb::CreatePlaybackLinkRequest>,
    ) -> Result<Response<pb::PlaybackLink>, Status> {
        let (caller, principal) = self.authorize(&request, Rpc::CreatePlaybackLink).await?;
        let req = request.into_inner();
        let id = parse_object_id(&req.object_id).map_err(to_status)?;
        let purpose = parse_purpose(req.purpose).map_err(to_status)?;
        let event = Event::new("link.create").target(id).purpose(purpose.name());
        let run = async {
            let links = self.links.as_ref().ok_or_else(|| {
                Error::Precondition("playback links need the HTTP port: set [http] enabled = true".into())
            })?;
            authz::check_purpose(&principal, purpose)?;
            let record = self.retrieve.view(&id, purpose, !principal.unredacted).await?;
            let link = links.issue(&principal, &record.object_id, purpose, req.ttl_seconds)?;
            let event = event
                .clone()
                .customer(&record.spec.customer_id)
                .detail("served", record.object_id.to_string())
                .detail("expires_at", crate::model::format_ms(link.expires_at_ms));
            self.audit.append(&caller, event).await?;
            Ok((link, record))
        };
        match run.await {
            Ok((link, record)) => Ok(Response::new(pb::PlaybackLink {
                url: link.url,
                path: link.path,
                expires_at: Some(ms_to_ts(link.expires_at_ms)),
                info: Some(object_info(&record)),
            })),
            Err(e) => Err(self.refused(&caller, event, Some(&id), e).await),
        }
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let (_, p) = self.authorize(&request, Rpc::WhoAmI).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            principal: p.name.clone(),
            roles: p.roles.iter().copied().map(role_code).collect(),
            unredacted: p.unredacted,
            credential: match &p.credential {
                authz::Credential::Token { token_id } => format!("token:{token_id}"),
                authz::Credential::Certificate { subject } => format!("certificate:{subject}"),
            },
            allowed_rpcs: Rpc::ALL.into_iter().filter(|r| p.may(*r)).map(|r| r.name().to_owned()).collect(),
        }))
    }
}
