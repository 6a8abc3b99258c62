//! The tonic loopback sink, peer (b) of `loadgen bulk` and the transport
//! peer of `loadgen calls --against sink`: a process of its own that
//! serves only `Ingest` and `Put`, over the gRPC port's HTTP/2 settings
//! ([`crate::server::transport`]), reads every message and keeps nothing.
//! Its time for an upload, and its CPU for a call load, are what the
//! transport alone costs on this machine (loopback TCP, HTTP/2, protobuf
//! decoding): the floor under recvault's ingest, whatever the disk does.
//!
//! It answers as the server does on the wire: an ack once
//! `ingest.commit_bytes` are pending or the oldest unacknowledged byte has
//! waited `ingest.commit_interval` (the defaults), and a dropped stream
//! resumes from what it had received (kept per upload id until the
//! finish, as the server keeps its journal).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb;
use crate::api::pb::ingest_request::Msg as ClientMsg;
use crate::api::pb::ingest_response::Msg as ServerMsg;

/// Acknowledged every this many bytes, as the server does by default
/// (`ingest.commit_bytes`), so the answers on the wire are alike too.
const ACK_EVERY: u64 = 4 << 20;

/// The longest a received byte waits for its ack: the server's default
/// `ingest.commit_interval`, without the journal write and fsync after it.
const ACK_WITHIN: Duration = Duration::from_millis(100);

/// Largest message the sink takes: a data message of
/// [`crate::api::MAX_CHUNK`] and its framing (the generator sends at most
/// 1 MiB; the server also takes a `Put` body of up to `ingest.put_cap`).
const MAX_MESSAGE: usize = crate::api::MAX_CHUNK + (64 << 10);

/// Serves the sink on `listen` until the process is killed. Prints
/// `recvault sink on ADDR` once bound, for the load generator to read.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("recvault sink on {}", listener.local_addr()?);
    crate::server::transport()
        .add_service(Sink::default())
        .serve_with_incoming(crate::server::incoming(listener))
        .await?;
    Ok(())
}

/// The `recvault.v1.Recvault` service with only `Ingest` and `Put`; every
/// other method is answered UNIMPLEMENTED.
#[derive(Debug, Clone, Default)]
struct Sink {
    received: Received,
}

/// Bytes received per upload id whose stream ended before its finish: a
/// resumed stream goes on from there.
type Received = Arc<Mutex<HashMap<String, u64>>>;

impl tonic::server::NamedService for Sink {
    const NAME: &'static str = "recvault.v1.Recvault";
}

impl<B> Service<http::Request<B>> for Sink
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let received = self.received.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/recvault.v1.Recvault/Ingest" => grpc().streaming(Drain { received }, req).await,
                "/recvault.v1.Recvault/Put" => grpc().unary(Discard, req).await,
                _ => Status::unimplemented("the load generator's sink serves only Ingest and Put").into_http(),
            })
        })
    }
}

/// The gRPC handler of one method, with the sink's message size limit.
fn grpc<T, U>() -> tonic::server::Grpc<tonic_prost::ProstCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE))
}

/// One `Put`, read and dropped; the "object" echoes the client's SHA-256.
struct Discard;

impl tonic::server::UnaryService<pb::PutRequest> for Discard {
    type Response = pb::PutResponse;
    type Future = BoxFuture<Response<pb::PutResponse>, Status>;

    fn call(&mut self, req: Request<pb::PutRequest>) -> Self::Future {
        Box::pin(async move {
            let put = req.into_inner();
            let object =
                pb::ObjectInfo { size: put.data.len() as u64, sha256: put.expected_sha256, ..Default::default() };
            Ok(Response::new(pb::PutResponse { object: Some(object) }))
        })
    }
}

/// One `Ingest` stream, drained.
struct Drain {
    received: Received,
}

impl tonic::server::StreamingService<pb::IngestRequest> for Drain {
    type Response = pb::IngestResponse;
    type ResponseStream = ReceiverStream<Result<pb::IngestResponse, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<Streaming<pb::IngestRequest>>) -> Self::Future {
        let received = self.received.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                if let Err(status) = drain(req.into_inner(), &tx, &received).await {
                    let _ = tx.send(Err(status)).await;
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Reads the stream to its finish, checking only that the data is
/// contiguous and its size is what the finish claims. The committed
/// "object" echoes the client's SHA-256: the sink hashes nothing.
async fn drain(
    mut inbound: Streaming<pb::IngestRequest>,
    out: &mpsc::Sender<Result<pb::IngestResponse, Status>>,
    kept: &Received,
) -> Result<(), Status> {
    let send = |msg| async move {
        out.send(Ok(pb::IngestResponse { msg: Some(msg) })).await.map_err(|_| Status::cancelled("the client went away"))
    };
    let ack = |offset| ServerMsg::Ack(pb::ingest_response::Ack { durable_offset: offset });
    let (mut received, mut acked) = (0u64, 0u64);
    let mut upload: Option<String> = None;
    // One timer for the stream, set by the first byte not yet acked and
    // waited on while any is.
    let timer = tokio::time::sleep(ACK_WITHIN);
    tokio::pin!(timer);
    let result = loop {
        let msg = tokio::select! {
            msg = inbound.next() => msg,
            _ = &mut timer, if received > acked => {
                acked = received;
                send(ack(received)).await?;
                continue;
            }
        };
        let Some(msg) = msg else { break Err(Status::cancelled("the stream ended before its finish")) };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => break Err(e),
        };
        match msg.msg {
            Some(ClientMsg::Open(open)) => {
                received = kept.lock().unwrap_or_else(|p| p.into_inner()).get(&open.upload_id).copied().unwrap_or(0);
                acked = received;
                let opened = pb::ingest_response::Opened {
                    upload_id: open.upload_id.clone(),
                    durable_offset: received,
                    ..Default::default()
                };
                upload = Some(open.upload_id);
                send(ServerMsg::Opened(opened)).await?;
            }
            Some(ClientMsg::Data(d)) => {
                if d.offset != received {
                    break Err(Status::failed_precondition(format!(
                        "data at offset {} but the next expected offset is {received}",
                        d.offset
                    )));
                }
                let all_acked = received == acked;
                received += d.data.len() as u64;
                if received - acked >= ACK_EVERY {
                    acked = received;
                    send(ack(received)).await?;
                } else if all_acked && received > acked {
                    timer.as_mut().reset(tokio::time::Instant::now() + ACK_WITHIN);
                }
            }
            Some(ClientMsg::Finish(f)) => {
                if f.expected_size != received {
                    break Err(Status::invalid_argument(format!(
                        "finish claims {} bytes but {received} were sent",
                        f.expected_size
                    )));
                }
                if let Some(id) = &upload {
                    kept.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                }
                send(ack(received)).await?;
                let info = pb::ObjectInfo { size: received, sha256: f.expected_sha256, ..Default::default() };
                send(ServerMsg::Committed(info)).await?;
                return Ok(());
            }
            None => break Err(Status::invalid_argument("an ingest message without a body")),
        }
    };
    // Ended before the finish: what came is kept for a resume, as the
    // server keeps what it received in the upload's journal.
    if let Some(id) = upload
        && received > 0
    {
        kept.lock().unwrap_or_else(|p| p.into_inner()).insert(id, received);
    }
    result
}
