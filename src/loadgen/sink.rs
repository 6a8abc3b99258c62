//! The tonic loopback sink, peer (b) of `loadgen bulk`: a process of its
//! own that serves only `Ingest`, over the gRPC port's HTTP/2 settings
//! ([`crate::server::transport`]), reads every message and keeps nothing.
//! Its time for an upload is what the transport alone costs on this
//! machine (loopback TCP, HTTP/2, protobuf decoding): the floor under
//! recvault's ingest, whatever the disk does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};

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

/// Largest message the sink takes: a data message of
/// [`crate::api::MAX_CHUNK`] and its framing (the generator sends at most
/// 1 MiB; the server also takes a `Put` body of up to `ingest.put_cap`).
const MAX_MESSAGE: usize = crate::api::MAX_CHUNK + (64 << 10);

/// Serves the sink on `listen` until the process is killed. Prints
/// `recvault sink on ADDR` once bound, for the load generator to read.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("recvault sink on {}", listener.local_addr()?);
    crate::server::transport().add_service(Sink).serve_with_incoming(crate::server::incoming(listener)).await?;
    Ok(())
}

/// The `recvault.v1.Recvault` service with only `Ingest`; every other
/// method is answered UNIMPLEMENTED.
#[derive(Debug, Clone, Copy)]
struct Sink;

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
        Box::pin(async move {
            if req.uri().path() != "/recvault.v1.Recvault/Ingest" {
                return Ok(Status::unimplemented("the load generator's sink serves only Ingest").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE));
            Ok(grpc.streaming(Drain, req).await)
        })
    }
}

/// One `Ingest` stream, drained.
struct Drain;

impl tonic::server::StreamingService<pb::IngestRequest> for Drain {
    type Response = pb::IngestResponse;
    type ResponseStream = ReceiverStream<Result<pb::IngestResponse, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<Streaming<pb::IngestRequest>>) -> Self::Future {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                if let Err(status) = drain(req.into_inner(), &tx).await {
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
) -> Result<(), Status> {
    let send = |msg| async move {
        out.send(Ok(pb::IngestResponse { msg: Some(msg) })).await.map_err(|_| Status::cancelled("the client went away"))
    };
    let (mut received, mut acked) = (0u64, 0u64);
    while let Some(msg) = inbound.next().await {
        match msg?.msg {
            Some(ClientMsg::Open(open)) => {
                let opened = pb::ingest_response::Opened { upload_id: open.upload_id, ..Default::default() };
                send(ServerMsg::Opened(opened)).await?;
            }
            Some(ClientMsg::Data(d)) => {
                if d.offset != received {
                    return Err(Status::failed_precondition(format!(
                        "data at offset {} but the next expected offset is {received}",
                        d.offset
                    )));
                }
                received += d.data.len() as u64;
                if received - acked >= ACK_EVERY {
                    acked = received;
                    send(ServerMsg::Ack(pb::ingest_response::Ack { durable_offset: received })).await?;
                }
            }
            Some(ClientMsg::Finish(f)) => {
                if f.expected_size != received {
                    return Err(Status::invalid_argument(format!(
                        "finish claims {} bytes but {received} were sent",
                        f.expected_size
                    )));
                }
                send(ServerMsg::Ack(pb::ingest_response::Ack { durable_offset: received })).await?;
                let info = pb::ObjectInfo { size: received, sha256: f.expected_sha256, ..Default::default() };
                send(ServerMsg::Committed(info)).await?;
                return Ok(());
            }
            None => return Err(Status::invalid_argument("an ingest message without a body")),
        }
    }
    Err(Status::cancelled("the stream ended before its finish"))
}
