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

use crate::catalog::ListFilter;
use crate::error::Error;
use crate::ingest::{ClientMsg, Ingest, ServerMsg};
use crate::model::{
    ContentKind, CustomerId, Direction, Interaction, InvalidInput, ObjectId, ObjectRecord, ObjectSpec, UploadId,
};
use crate::retention::Retention;
use crate::retrieve::{ByteRange, Retrieve};
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
}

impl Service {
    pub fn new(ingest: Arc<Ingest>, retrieve: Arc<Retrieve>, retention: Arc<Retention>) -> Self {
        Self { ingest, retrieve, retention }
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
    let i = spec.interaction.unwrap_or_default();
    let interaction = Interaction {
        interaction_id: i.interaction_id,
        channel: i.channel,
        agent_id: i.agent_id,
        queue: i.queue,
        direction: Direction::from_code(u8::try_from(i.direction).unwrap_or(0)),
        started_at_ms: i.started_at.as_ref().map(ts_to_ms),
        tags: i.tags.into_iter().collect::<BTreeMap<_, _>>(),
    };
    Ok(ObjectSpec { customer_id, kind, content_type: spec.content_type, interaction })
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
            upload_id: UploadId::parse(&open.upload_id).map_err(|e| field("upload_id", e))?,
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
        }),
        upload_id: o.upload_id.to_string(),
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
        tokio::spawn(self.ingest.clone().run_stream(Box::pin(inbound), tx));
        let out = ReceiverStream::new(rx).map(|r| r.map(ingest_response).map_err(to_status));
        Ok(Response::new(Box::pin(out)))
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let req = request.into_inner();
        let run = async {
            let upload_id = UploadId::parse(&req.upload_id).map_err(|e| field("upload_id", e))?;
            let spec = parse_spec(req.spec)?;
            let sha = parse_sha(&req.expected_sha256)?;
            self.ingest.put(upload_id, spec, req.data, sha).await
        };
        let object = run.await.map_err(to_status)?;
        Ok(Response::new(pb::PutResponse { object: Some(object_info(&object)) }))
    }

    async fn stat(&self, request: Request<pb::StatRequest>) -> Result<Response<pb::ObjectInfo>, Status> {
        let run = async {
            let id = parse_object_id(&request.get_ref().object_id)?;
            self.retrieve.stat(&id).await
        };
        Ok(Response::new(object_info(&run.await.map_err(to_status)?)))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let req = request.into_inner();
        let id = parse_object_id(&req.object_id).map_err(to_status)?;
        let range = req.range.map(|r| ByteRange { start: r.start, end: r.end }).unwrap_or_default();
        let (record, chunks) = self.retrieve.read(&id, range).await.map_err(to_status)?;
        let first = pb::GetResponse { info: Some(object_info(&record)), offset: range.start, data: Bytes::new() };
        let rest =
            chunks.map(|c| c.map(|(offset, data)| pb::GetResponse { info: None, offset, data }).map_err(to_status));
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(first) }).chain(rest))))
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let req = request.into_inner();
        let run = async {
            let filter = ListFilter {
                customer_id: (!req.customer_id.is_empty())
                    .then(|| CustomerId::parse(&req.customer_id).map_err(|e| field("customer_id", e)))
                    .transpose()?,
                interaction_id: (!req.interaction_id.is_empty()).then(|| req.interaction_id.clone()),
                kind: (req.kind != 0).then(|| parse_kind(req.kind, "kind")).transpose()?,
                created_after_ms: req.created_after.as_ref().map(ts_to_ms),
                created_before_ms: req.created_before.as_ref().map(ts_to_ms),
            };
            self.retrieve.list(&filter, &req.page_token, req.page_size as usize).await
        };
        let page = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ListResponse {
            objects: page.objects.iter().map(object_info).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn shred_customer(
        &self,
        request: Request<pb::ShredCustomerRequest>,
    ) -> Result<Response<pb::ShredCustomerResponse>, Status> {
        let req = request.into_inner();
        let run = async {
            let id = CustomerId::parse(&req.customer_id).map_err(|e| field("customer_id", e))?;
            self.retention.shred_customer(&id, &req.reason).await
        };
        let o = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ShredCustomerResponse {
            customer_id: o.customer_id.as_str().to_owned(),
            key_versions_destroyed: o.key_versions_destroyed,
            objects_shredded: o.objects_shredded,
            uploads_discarded: o.uploads_discarded,
            shredded_at: Some(ms_to_ts(o.shredded_at_ms)),
        }))
    }
}
