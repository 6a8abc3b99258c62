//! Shared harness: a real server (in-process or as a child process) on a
//! loopback port with its own data directory, and content generators.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use recvault::api::pb;
use recvault::api::pb::recvault_client::RecvaultClient;
use recvault::auth::Authenticator;
use recvault::clock::{Clock, ManualClock, SystemClock};
use recvault::config::Config;
use recvault::model::Role;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub type Client = recvault::cli::Client;

/// The role set of the harness's default caller: everything, with the
/// break-glass grant, so suites that are not about access control can call
/// every RPC. Access control itself is tested in `access.rs`.
pub const ALL_ROLES: [Role; 5] = Role::ALL;

/// A server running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The HTTP port (coaching page, playback links).
    pub http: Option<SocketAddr>,
    pub data: tempfile::TempDir,
    pub auth: Arc<Authenticator>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        Self::start_in(data, tune).await
    }

    pub async fn start_in(data: tempfile::TempDir, tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_full(data, Arc::new(SystemClock), tune).await
    }

    /// A server whose clock the test moves.
    pub async fn start_with_clock(clock: Arc<ManualClock>, tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_full(tempfile::tempdir().expect("tempdir"), clock, tune).await
    }

    /// Tests shred at once (grace 0) unless they tune it back.
    pub async fn start_full(data: tempfile::TempDir, clock: Arc<dyn Clock>, tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_store(data, clock, tune, |s| s).await
    }

    /// A server whose object store is first passed through `wrap` (a
    /// fault-injecting backend, a quicker retry policy).
    pub async fn start_store(
        data: tempfile::TempDir,
        clock: Arc<dyn Clock>,
        tune: impl FnOnce(&mut Config),
        wrap: impl FnOnce(recvault::store::Store) -> recvault::store::Store,
    ) -> Self {
        let mut cfg = Config {
            data_dir: data.path().to_owned(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        cfg.retention.shred_grace = std::time::Duration::ZERO;
        cfg.http.listen = "127.0.0.1:0".parse().expect("addr");
        tune(&mut cfg);
        let (parts, listener) = recvault::server::bind_with_store(&cfg, clock, wrap).await.expect("server starts");
        let addr = listener.local_addr().expect("addr");
        let http = parts.http.as_ref().map(|l| l.local_addr().expect("http addr"));
        let auth = parts.auth.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            recvault::server::serve(&cfg, parts, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        Self { addr, http, data, auth, stop: Some(stop), task: Some(task) }
    }

    /// A new token for principal `name` with these roles.
    pub async fn token_for(&self, name: &str, roles: &[Role], unredacted: bool) -> String {
        let t = self.auth.create_token("test-harness", name, roles, unredacted, None).await.expect("token");
        t.token.as_str().to_owned()
    }

    /// A client acting as principal `name` with these roles.
    pub async fn client_as(&self, name: &str, roles: &[Role], unredacted: bool) -> Client {
        connect(&self.url(), &self.token_for(name, roles, unredacted).await).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with every role and the break-glass grant.
    pub async fn client(&self) -> Client {
        self.client_as("test-operator", &ALL_ROLES, true).await
    }

    /// Stops the server and hands back its data directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.data, dir)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A client sending `token`.
pub async fn connect(url: &str, token: &str) -> Client {
    let channel =
        tonic::transport::Endpoint::from_shared(url.to_owned()).expect("url").connect().await.expect("connect");
    with_token(channel, Some(token))
}

pub fn with_token(channel: Channel, token: Option<&str>) -> Client {
    RecvaultClient::with_interceptor(channel, recvault::cli::BearerAuth::new(token).expect("token"))
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// A server as a child process (for kill -9 and CLI tests).
pub struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// The HTTP port, when the serving line names one.
    pub http: Option<SocketAddr>,
    pub data_dir: PathBuf,
}

/// Config of child servers: shreds complete at once.
pub const CHILD_CONFIG: &str = "[retention]\nshred_grace = \"0s\"\n";

impl ChildServer {
    pub fn spawn(data_dir: &Path) -> Self {
        Self::spawn_with(data_dir, CHILD_CONFIG, &[], None)
    }

    /// With a config (written into the data directory), extra environment
    /// and, optionally, the server's log (stderr) appended to a file.
    pub fn spawn_with(data_dir: &Path, config: &str, envs: &[(&str, &str)], log: Option<&Path>) -> Self {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let config_path = data_dir.join("test-config.toml");
        std::fs::write(&config_path, config).expect("config");
        let stderr = match log {
            Some(path) => {
                Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).expect("log file"))
            }
            None => Stdio::null(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_recvault"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(data_dir)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn recvault serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the serving line");
        let addr = line
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the server: {line:?}"));
        // "...; coaching page http://127.0.0.1:PORT/"
        let http = line
            .split_once("coaching page http://")
            .and_then(|(_, rest)| rest.trim_end().trim_end_matches('/').parse().ok());
        Self { child, addr, http, data_dir: data_dir.to_owned() }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bootstrap admin token the server wrote into its data directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join(recvault::auth::ADMIN_TOKEN_FILE)).expect("admin.token")
    }

    /// A new token with every role and the break-glass grant, created
    /// through the server's own API with the admin token.
    pub async fn operator_token(&self) -> String {
        let mut admin = connect(&self.url(), &self.admin_token()).await;
        let roles = ALL_ROLES.iter().map(|r| recvault::api::role_code(*r)).collect();
        let r = admin
            .create_token(pb::CreateTokenRequest {
                name: "test-operator".into(),
                roles,
                unredacted: true,
                ttl_seconds: 0,
            })
            .await
            .expect("create token");
        r.into_inner().token
    }

    /// A client with every role and the break-glass grant.
    pub async fn client(&self) -> Client {
        connect(&self.url(), &self.operator_token().await).await
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spec(customer: &str, kind: pb::ContentKind, content_type: &str) -> pb::ObjectSpec {
    pb::ObjectSpec {
        customer_id: customer.into(),
        kind: kind as i32,
        content_type: content_type.into(),
        interaction: Some(pb::Interaction {
            interaction_id: "call-1".into(),
            channel: "voice".into(),
            agent_id: "agent-7".into(),
            queue: "billing".into(),
            direction: pb::Direction::Inbound as i32,
            started_at: None,
            tags: [("site".to_owned(), "lisbon".to_owned())].into(),
            duration_ms: 0,
        }),
        sensitive_spans: Vec::new(),
    }
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A 16-bit mono 8 kHz PCM WAV of `samples` samples, deterministic.
pub fn wav(samples: usize) -> Vec<u8> {
    let data_len = (samples * 2) as u32;
    let mut v = Vec::with_capacity(44 + samples * 2);
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // PCM
    v.extend_from_slice(&1u16.to_le_bytes()); // mono
    v.extend_from_slice(&8000u32.to_le_bytes());
    v.extend_from_slice(&16000u32.to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data_len.to_le_bytes());
    let mut x: u32 = 0x1234_5678;
    for i in 0..samples {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let tone = ((i as f32 * 0.05).sin() * 8000.0) as i16;
        let s = tone.wrapping_add((x & 0xff) as i16);
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

/// A minimal baseline JPEG header (SOI, SOF0 with the given size), enough
/// for content sniffing, followed by filler.
pub fn jpeg(width: u16, height: u16, filler: usize) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0];
    v.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(&width.to_be_bytes());
    v.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
    v.extend((0..filler).map(|i| (i * 31 % 251) as u8));
    v.extend_from_slice(&[0xFF, 0xD9]);
    v
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec()
}

/// A hand-driven ingest stream.
pub struct Stream {
    pub tx: mpsc::Sender<pb::IngestRequest>,
    pub rx: tonic::Streaming<pb::IngestResponse>,
}

impl Stream {
    pub async fn start(client: &mut Client) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let rx = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// Opens and returns (object_id, durable_offset, committed).
    pub async fn open(&mut self, upload_id: &str, spec: pb::ObjectSpec) -> Result<(String, u64, bool), tonic::Status> {
        self.send(pb::ingest_request::Msg::Open(pb::ingest_request::Open {
            upload_id: upload_id.into(),
            spec: Some(spec),
        }))
        .await;
        match self.next().await? {
            Some(pb::ingest_response::Msg::Opened(o)) => Ok((o.object_id, o.durable_offset, o.committed)),
            other => panic!("expected opened, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: pb::ingest_request::Msg) {
        // The server may already have ended the stream; its status then
        // arrives on `rx`.
        let _ = self.tx.send(pb::IngestRequest { msg: Some(msg) }).await;
    }

    pub async fn data(&mut self, offset: u64, data: &[u8]) {
        self.send(pb::ingest_request::Msg::Data(pb::ingest_request::Data {
            offset,
            data: Bytes::copy_from_slice(data),
        }))
        .await;
    }

    /// Sends `data` from `offset` in 256 KiB messages.
    pub async fn data_chunks(&mut self, offset: u64, data: &[u8]) {
        for (i, c) in data.chunks(256 << 10).enumerate() {
            self.data(offset + (i * (256 << 10)) as u64, c).await;
        }
    }

    pub async fn finish(&mut self, sha: Option<Vec<u8>>, size: u64) {
        self.send(pb::ingest_request::Msg::Finish(pb::ingest_request::Finish {
            expected_sha256: sha.map(Bytes::from).unwrap_or_default(),
            expected_size: size,
        }))
        .await;
    }

    pub async fn next(&mut self) -> Result<Option<pb::ingest_response::Msg>, tonic::Status> {
        Ok(self.rx.message().await?.and_then(|r| r.msg))
    }

    /// Reads until the committed object, skipping acks.
    pub async fn committed(&mut self) -> Result<pb::ObjectInfo, tonic::Status> {
        loop {
            match self.next().await? {
                Some(pb::ingest_response::Msg::Committed(info)) => return Ok(info),
                Some(_) => continue,
                None => panic!("stream ended without a commit"),
            }
        }
    }

    /// Reads acks until one covers `offset`.
    pub async fn acked(&mut self, offset: u64) -> Result<u64, tonic::Status> {
        loop {
            match self.next().await? {
                Some(pb::ingest_response::Msg::Ack(a)) if a.durable_offset >= offset => return Ok(a.durable_offset),
                Some(_) => continue,
                None => panic!("stream ended before offset {offset} was acked"),
            }
        }
    }

    /// The final status of a stream the server is expected to fail.
    pub async fn error(&mut self) -> tonic::Status {
        loop {
            match self.next().await {
                Err(s) => return s,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
            }
        }
    }
}

/// Sends `data` from `offset` in 256 KiB messages, then a finish with its
/// digest and size, from a task of its own, so the caller can read answers
/// meanwhile (a server that fails the stream stops reading).
pub fn spawn_sender(s: &Stream, offset: u64, data: &[u8]) -> tokio::task::JoinHandle<()> {
    let tx = s.tx.clone();
    let rest = data[offset as usize..].to_vec();
    let (sha, size) = (sha256(data), data.len() as u64);
    tokio::spawn(async move {
        let msg = |m| pb::IngestRequest { msg: Some(m) };
        for (i, c) in rest.chunks(256 << 10).enumerate() {
            let data =
                pb::ingest_request::Data { offset: offset + (i * (256 << 10)) as u64, data: Bytes::copy_from_slice(c) };
            if tx.send(msg(pb::ingest_request::Msg::Data(data))).await.is_err() {
                return;
            }
        }
        let finish = pb::ingest_request::Finish { expected_sha256: Bytes::from(sha), expected_size: size };
        let _ = tx.send(msg(pb::ingest_request::Msg::Finish(finish))).await;
    })
}

/// One-shot ingest of `data`; returns the committed object.
pub async fn ingest(client: &mut Client, upload_id: &str, spec: pb::ObjectSpec, data: &[u8]) -> pb::ObjectInfo {
    let mut s = Stream::start(client).await.expect("stream");
    let (_, durable, _) = s.open(upload_id, spec).await.expect("open");
    assert_eq!(durable, 0);
    s.data_chunks(0, data).await;
    s.finish(Some(sha256(data)), data.len() as u64).await;
    s.committed().await.expect("commit")
}

/// Unary Put of `data` under a fresh upload id, without an expected digest.
pub async fn put(client: &mut Client, spec: pb::ObjectSpec, data: &[u8]) -> Result<pb::ObjectInfo, tonic::Status> {
    let req = pb::PutRequest {
        upload_id: new_id(),
        spec: Some(spec),
        data: Bytes::copy_from_slice(data),
        expected_sha256: Bytes::new(),
    };
    Ok(client.put(req).await?.into_inner().object.expect("a Put answers its object"))
}

/// Reads an object (or a range) back.
pub async fn get(
    client: &mut Client,
    object_id: &str,
    range: Option<(u64, Option<u64>)>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .get(pb::GetRequest {
            object_id: object_id.into(),
            range: range.map(|(start, end)| pb::ByteRange { start, end }),
            purpose: pb::Purpose::QualityReview as i32,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut expect_offset = range.map(|r| r.0).unwrap_or(0);
    while let Some(m) = stream.message().await? {
        if !m.data.is_empty() {
            assert_eq!(m.offset, expect_offset, "chunks arrive in order with their offsets");
        }
        expect_offset += m.data.len() as u64;
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Reads a whole object with a declared purpose.
pub async fn read_for(c: &mut Client, object_id: &str, purpose: pb::Purpose) -> Result<Vec<u8>, tonic::Status> {
    let mut stream =
        c.get(pb::GetRequest { object_id: object_id.into(), range: None, purpose: purpose as i32 }).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Every regular file under `dir`.
/// The uploads with journal files in a spool directory (each has a
/// segments file and a records file), by object id.
pub fn spooled_uploads(spool: &Path) -> std::collections::BTreeSet<String> {
    files_under(spool)
        .iter()
        .filter_map(|p| p.file_name()?.to_str().and_then(recvault::ingest::spool::spool_file_id).map(str::to_owned))
        .collect()
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Files under `dir` containing `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).map(|b| b.windows(needle.len()).any(|w| w == needle)).unwrap_or(false))
        .collect()
}

/// Requests a customer's shred ("erasure request", by `by`).
pub async fn shred(c: &mut Client, customer: &str, by: &str) -> Result<pb::ShredStatus, tonic::Status> {
    c.shred_customer(pb::ShredCustomerRequest {
        customer_id: customer.into(),
        reason: "erasure request".into(),
        requested_by: by.into(),
    })
    .await
    .map(|r| r.into_inner())
}

/// The audit records of `action` (or a prefix ending in a dot), newest
/// first, as a caller with the auditor role (or any role opening
/// `ListAuditRecords`) sees them.
pub async fn audit_of(c: &mut Client, action: &str) -> Vec<pb::AuditRecord> {
    let req = pb::ListAuditRecordsRequest { action: action.into(), page_size: 1000, ..Default::default() };
    c.list_audit_records(req).await.expect("audit records").into_inner().records
}
