//! Object storage on a real S3-compatible server: a Garage node started on
//! loopback in a temporary directory for each test. The store's
//! conformance suite (`recvault::store::conformance`, also run on local
//! files and memory) runs against it, then the whole service does.
//!
//! Garage is `cargo install garage --locked` (`.ci/run` does it). Without the
//! binary these tests skip with a loud line on stderr, unless
//! `RECVAULT_REQUIRE_GARAGE=1` (set by CI) makes that a failure.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recvault::api::pb;
use recvault::config::{StorageBackend, StorageSection, WriteOnceMode};
use recvault::model::ObjectId;
use recvault::store::{S3Credentials, S3Settings, Store, StoreError, WriteOnce, conformance};
use tonic::Code;
use zeroize::Zeroizing;

use crate::common::*;

const BUCKET: &str = "recvault-test";
const REGION: &str = "garage";

/// The `garage` binary: on PATH, or where `cargo install` puts it.
fn garage_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("garage"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join("garage"));
    on_path.chain(cargo_home).find(|p| p.is_file())
}

/// A single-node Garage on loopback ports, with one key allowed on one
/// bucket. Killed, and its directory removed, on drop.
pub struct Garage {
    child: Child,
    dir: tempfile::TempDir,
    binary: PathBuf,
    endpoint: String,
    key_id: String,
    secret: String,
}

impl Garage {
    /// `None` (after a loud line on stderr) when Garage is not installed.
    pub fn start(test: &str) -> Option<Self> {
        let Some(binary) = garage_binary() else {
            if std::env::var("RECVAULT_REQUIRE_GARAGE").as_deref() == Ok("1") {
                panic!(
                    "garage is not installed and RECVAULT_REQUIRE_GARAGE=1: cargo install garage --locked --version 2.5.0"
                );
            }
            // Straight to stderr: the harness captures eprintln! of passing
            // tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPED {test}: no `garage` binary on PATH or in $CARGO_HOME/bin \
                 (cargo install garage --locked --version 2.5.0) !!!!!!!!\n"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let [s3_port, rpc_port] = [free_port(), free_port()];
        let secret = hex::encode(rand_bytes::<32>());
        let config = format!(
            "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\nrpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
        );
        std::fs::write(dir.path().join("garage.toml"), config).expect("garage config");
        let log = std::fs::File::create(dir.path().join("garage.log")).expect("garage log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(dir.path().join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn garage server");
        let mut garage = Self {
            child,
            dir,
            binary,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            key_id: String::new(),
            secret: String::new(),
        };
        garage.set_up();
        Some(garage)
    }

    /// One node holding everything, a key, a bucket the key may use.
    fn set_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cli(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "garage did not start: {}", self.log());
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("garage exited ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let node = self.cli_ok(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().expect("node id").to_owned();
        self.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli_ok(&["layout", "apply", "--version", "1"]);
        let key: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["json-api", "CreateKey", r#"{"name":"recvault-test"}"#]))
                .expect("CreateKey answers JSON");
        self.key_id = key["accessKeyId"].as_str().expect("accessKeyId").to_owned();
        self.secret = key["secretAccessKey"].as_str().expect("secretAccessKey").to_owned();
        self.cli_ok(&["bucket", "create", BUCKET]);
        self.cli_ok(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &self.key_id]);
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .expect("run the garage CLI")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    fn settings(&self, write_once: WriteOnce) -> S3Settings {
        self.settings_with_secret(write_once, &self.secret)
    }

    fn settings_with_secret(&self, write_once: WriteOnce, secret: &str) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint.clone()),
            bucket: BUCKET.into(),
            region: REGION.into(),
            path_style: true,
            allow_http: true,
            credentials: S3Credentials::new(Zeroizing::new(self.key_id.clone()), Zeroizing::new(secret.to_owned())),
            write_once,
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            // What `sign_payload` defaults to over plain http.
            sign_payload: true,
        }
    }

    /// A store on the bucket, checked and ready. Right after the layout is
    /// applied the S3 API may still answer 503 for a moment.
    pub async fn store(&self, write_once: WriteOnce) -> Store {
        self.store_with(&self.settings(write_once)).await
    }

    pub async fn store_with(&self, settings: &S3Settings) -> Store {
        let store = Store::s3(settings).expect("s3 store");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match store.check().await {
                Ok(()) => return store,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("garage's S3 API is not ready: {e}\n{}", self.log()),
            }
        }
    }

    /// The `[storage]` section of a server on this bucket, with the key
    /// pair in two owner-only files under `dir`.
    pub fn storage_section(&self, dir: &Path) -> StorageSection {
        let write = |name: &str, value: &str| {
            let path = dir.join(name);
            std::fs::write(&path, value).expect("credential file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
            path
        };
        StorageSection {
            backend: StorageBackend::S3,
            endpoint: Some(self.endpoint.clone()),
            bucket: Some(BUCKET.into()),
            region: REGION.into(),
            path_style: true,
            allow_http: true,
            access_key_id_file: Some(write("s3-access-key-id", &self.key_id)),
            secret_access_key_file: Some(write("s3-secret-access-key", &format!("{}\n", self.secret))),
            write_once: WriteOnceMode::CheckFirst,
            ..StorageSection::default()
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut b).expect("random bytes");
    b
}

/// Garage has no conditional create (`If-None-Match: *` is ignored on PUT
/// and on completing a multipart upload), so commits look first.
#[tokio::test]
async fn s3_store_conformance_on_garage() {
    let Some(garage) = Garage::start("s3_store_conformance_on_garage") else { return };
    let store = garage.store(WriteOnce::CheckFirst).await;
    conformance::run(&store).await;
    // Unsigned payloads, the default over https: the suite again, on a
    // fresh prefix of keys (it makes its own).
    let mut unsigned = garage.settings(WriteOnce::CheckFirst);
    unsigned.sign_payload = false;
    conformance::run(&garage.store_with(&unsigned).await).await;
}

/// `write_once = "conditional"` is trusted only after the server has shown
/// it refuses to overwrite; Garage overwrites, so the store refuses to
/// start, saying what to set. Should a later Garage refuse, the mode must
/// then pass the whole conformance suite.
#[tokio::test]
async fn s3_conditional_mode_is_checked_against_the_server() {
    let Some(garage) = Garage::start("s3_conditional_mode_is_checked_against_the_server") else { return };
    // Ready first, in the mode that works.
    let _ = garage.store(WriteOnce::CheckFirst).await;
    let store = Store::s3(&garage.settings(WriteOnce::Conditional)).unwrap();
    match store.check().await {
        Err(StoreError::Unsupported(why)) => {
            assert!(why.contains("check-first"), "the error says what to set: {why}");
            let _ = writeln!(std::io::stderr(), "garage, conditional create: unsupported ({why})");
        }
        Ok(()) => {
            let _ = writeln!(std::io::stderr(), "garage, conditional create: supported; running the suite");
            conformance::run(&store).await;
        }
        Err(e) => panic!("unexpected: {e}"),
    }
    let leftovers: Vec<_> = garage_list(&garage, "probe").await;
    assert!(leftovers.is_empty(), "the check leaves no probe objects: {leftovers:?}");

    // Wrong credentials: refused with the server's answer, and the secret
    // appears in no error and no Debug output.
    let wrong = "0".repeat(64);
    let settings = garage.settings_with_secret(WriteOnce::CheckFirst, &wrong);
    assert!(!format!("{settings:?}").contains(&wrong), "settings Debug hides the secret");
    assert!(!format!("{settings:?}").contains(&garage.secret));
    let store = Store::s3(&settings).unwrap();
    assert!(!format!("{store:?}").contains(&wrong), "store Debug hides the secret");
    let err = store.check().await.unwrap_err().to_string();
    assert!(!err.contains(&wrong), "{err}");
    assert!(err.contains("403") || err.to_lowercase().contains("forbidden") || err.contains("Access"), "{err}");
}

/// Keys under `prefix` in the bucket, straight from the server.
async fn garage_list(garage: &Garage, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&garage.endpoint)
        .with_bucket_name(BUCKET)
        .with_region(REGION)
        .with_allow_http(true)
        .with_access_key_id(&garage.key_id)
        .with_secret_access_key(&garage.secret)
        .build()
        .unwrap();
    let listed: Vec<_> =
        s3.list(Some(&object_store::path::Path::from(prefix))).try_collect().await.expect("list the bucket");
    listed.into_iter().map(|m| m.location.to_string()).collect()
}

/// The whole service on Garage: a call recording large enough for a
/// multipart upload goes in, comes back bit-exact by range and whole, lives
/// in the bucket only as ciphertext (nothing under the data directory), and
/// is gone from the bucket once its customer is shredded.
#[tokio::test]
async fn the_service_runs_on_s3() {
    let Some(garage) = Garage::start("the_service_runs_on_s3") else { return };
    let _ = garage.store(WriteOnce::CheckFirst).await;
    let secrets = tempfile::tempdir().unwrap();
    let storage = garage.storage_section(secrets.path());
    let server = TestServer::start_with(move |cfg| cfg.storage = storage).await;
    let mut c = server.client().await;

    // 18 MB of audio: past the single-PUT limit, so a multipart upload.
    let audio = wav(9_000_000);
    assert!(audio.len() > recvault::store::SINGLE_PUT_MAX);
    let call = ingest(&mut c, &new_id(), spec("s3-1", pb::ContentKind::CallRecording, "audio/wav"), &audio).await;
    let chat =
        put(&mut c, spec("s3-1", pb::ContentKind::ChatTranscript, "text/plain"), b"hello from s3").await.unwrap();
    let other = put(&mut c, spec("s3-2", pb::ContentKind::ChatTranscript, "text/plain"), b"keep me").await.unwrap();
    assert!(get(&mut c, &call.object_id, None).await.unwrap() == audio, "bit-exact");
    let (a, b) = (8_000_000u64, 8_500_000u64);
    assert!(get(&mut c, &call.object_id, Some((a, Some(b - 1)))).await.unwrap() == audio[a as usize..b as usize]);

    let store = garage.store(WriteOnce::CheckFirst).await;
    let id = ObjectId::parse(&call.object_id).unwrap();
    let stored = store.size(&id).await.unwrap();
    assert_eq!(
        stored,
        recvault::crypto::format::ciphertext_len(audio.len() as u64, recvault::crypto::format::DEFAULT_SEGMENT_SIZE)
    );
    let ciphertext = store.read_range(&id, 0..stored).await.unwrap();
    assert!(!ciphertext.windows(64).any(|w| w == &audio[100_000..100_064]), "the bucket holds ciphertext only");
    assert!(!server.data.path().join("objects").exists(), "no local objects beside an S3 bucket");
    let in_bucket = garage_list(&garage, "").await;
    assert!(in_bucket.iter().all(|k| k.starts_with("objects/")), "only committed objects: {in_bucket:?}");
    assert_eq!(in_bucket.len(), 3);

    let status = shred(&mut c, "s3-1", "").await.unwrap();
    assert_eq!(status.state, pb::CustomerState::Shredded as i32);
    assert_eq!(status.objects_shredded, 2);
    for shredded in [&call.object_id, &chat.object_id] {
        assert_eq!(get(&mut c, shredded, None).await.unwrap_err().code(), Code::FailedPrecondition);
        let id = ObjectId::parse(shredded).unwrap();
        assert!(matches!(store.size(&id).await, Err(StoreError::NotFound)), "ciphertext gone from the bucket");
    }
    let in_bucket = garage_list(&garage, "").await;
    assert_eq!(in_bucket.len(), 1, "{in_bucket:?}");
    assert!(in_bucket[0].ends_with(&other.object_id));
    assert_eq!(get(&mut c, &other.object_id, None).await.unwrap(), b"keep me");
}

/// C1/C3/C4 against a real S3 server: the fault-injecting wrapper sits
/// between the service and Garage. A transient failure is retried, a PUT
/// that landed but lost its answer is found by the retry (one object), and
/// a 403 fails at once with nothing committed. With S3 the service itself
/// makes one attempt (the client retries each request), so the test gives
/// the store a retrying policy to reach the service-level paths.
#[tokio::test]
async fn c1_c3_c4_store_faults_on_garage() {
    use recvault::store::RetryPolicy;
    use recvault::store::faulty::{Fault, FaultPlan, FaultyStore, Op};
    use std::sync::Arc;
    let Some(garage) = Garage::start("c1_c3_c4_store_faults_on_garage") else { return };
    let _ = garage.store(WriteOnce::CheckFirst).await;
    let secrets = tempfile::tempdir().unwrap();
    let storage = garage.storage_section(secrets.path());
    let plan = FaultPlan::new();
    let p = plan.clone();
    let quick = RetryPolicy {
        max_attempts: 3,
        base_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        op_timeout: Duration::from_secs(60),
    };
    let server = TestServer::start_store(
        tempfile::tempdir().unwrap(),
        Arc::new(recvault::clock::SystemClock),
        move |cfg| cfg.storage = storage,
        move |s| s.map_backend(|b| Arc::new(FaultyStore::new(b, p))).with_retry(quick),
    )
    .await;
    let mut c = server.client().await;
    let audio = wav(100_000);
    plan.inject(Op::Put, Fault::Transient, 1);
    let first = ingest(&mut c, &new_id(), spec("s3-faults", pb::ContentKind::CallRecording, "audio/wav"), &audio).await;
    plan.inject(Op::Put, Fault::LoseResponse, 1);
    let second =
        ingest(&mut c, &new_id(), spec("s3-faults", pb::ContentKind::CallRecording, "audio/wav"), &audio).await;
    for o in [&first, &second] {
        assert_eq!(get(&mut c, &o.object_id, None).await.unwrap(), audio);
    }
    assert_eq!(garage_list(&garage, "objects/").await.len(), 2, "exactly one object per upload");

    let before = plan.calls(Op::Put);
    plan.inject(Op::Put, Fault::PermissionDenied, 1);
    let mut s = Stream::start(&mut c).await.unwrap();
    s.open(&new_id(), spec("s3-faults", pb::ContentKind::CallRecording, "audio/wav")).await.unwrap();
    s.data_chunks(0, &audio).await;
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    assert_eq!(s.error().await.code(), Code::Unavailable);
    assert_eq!(plan.calls(Op::Put) - before, 1, "a 403 is not retried");
    assert_eq!(garage_list(&garage, "objects/").await.len(), 2, "nothing committed");
}

/// A TCP proxy between the service and Garage that breaks connections the
/// way networks do (threat plan C1, below the S3 client): while `resets`
/// is above zero, each new connection is cut (RST) once either direction
/// has carried `cut` bytes (mid-request for an upload, mid-answer for a
/// read); every forwarded chunk waits `delay` (a slow body).
struct BreakingProxy {
    addr: std::net::SocketAddr,
    resets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BreakingProxy {
    async fn start(upstream: &str) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let upstream: std::net::SocketAddr = upstream.trim_start_matches("http://").parse().expect("upstream address");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (resets, cut, delay_ms) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(64 * 1024)), Arc::new(AtomicU64::new(0)));
        let (r, c, d) = (resets.clone(), cut.clone(), delay_ms.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let cut_after = r
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .ok()
                    .map(|_| c.load(Ordering::SeqCst));
                let delay = Duration::from_millis(d.load(Ordering::SeqCst));
                tokio::spawn(pipe(client, server, cut_after, delay));
            }
        });
        Self { addr, resets, cut, delay_ms }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the next `n` connections after `after` bytes either way.
    fn reset_next(&self, n: usize, after: usize) {
        self.cut.store(after, std::sync::atomic::Ordering::SeqCst);
        self.resets.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn resets_left(&self) -> usize {
        self.resets.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn slow(&self, ms: u64) {
        self.delay_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn pipe(client: tokio::net::TcpStream, server: tokio::net::TcpStream, cut_after: Option<usize>, delay: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0usize;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if let Some(limit) = cut_after
                && sent + n > limit
            {
                return true; // cut: drop both sides mid-request
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return false;
            }
            sent += n;
        }
    };
    let (cut_flag, cut_flag2) = {
        let f = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (f.clone(), f)
    };
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0usize;
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(limit) = cut_after
                && sent + n > limit
            {
                // Cut mid-answer: half of this chunk, then the reset.
                let _ = cw.write_all(&buf[..n / 2]).await;
                cut_flag2.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
    };
    let cut = tokio::select! {
        cut = upstream => cut,
        () = downstream => cut_flag.load(std::sync::atomic::Ordering::SeqCst),
    };
    if cut {
        // RST rather than FIN: the client sees a reset connection.
        let stream = cr.reunite(cw).expect("halves of one stream");
        let _ = stream.set_zero_linger();
        drop(stream);
    }
}

/// C1 below the S3 client: connections reset in the middle of requests and
/// slow bodies, between the service and a real Garage, while a 40 MB call
/// streams in (so parts are uploaded during the call, by the follower, and
/// at finish). The client's own retries carry the upload through; whatever
/// happens, the object is committed exactly once and reads back bit-exact,
/// and reads through a breaking connection never return wrong bytes.
#[tokio::test]
async fn c1_connection_resets_and_slow_bodies_below_the_s3_client() {
    let Some(garage) = Garage::start("c1_connection_resets_and_slow_bodies_below_the_s3_client") else { return };
    let _ = garage.store(WriteOnce::CheckFirst).await;
    let proxy = BreakingProxy::start(&garage.endpoint).await;
    let secrets = tempfile::tempdir().unwrap();
    let mut storage = garage.storage_section(secrets.path());
    storage.endpoint = Some(proxy.endpoint());
    let server = TestServer::start_with(move |cfg| cfg.storage = storage).await;
    let mut c = server.client().await;

    // 40 MB: past the follower's first feed (24 MiB), so parts go up while
    // the call is still streaming. Cut the next three connections 100 KiB
    // into their requests, and slow every chunk a little.
    let audio = wav(20_000_000);
    proxy.reset_next(3, 100 * 1024);
    proxy.slow(1);
    let upload_id = new_id();
    let mut s = Stream::start(&mut c).await.unwrap();
    let (object_id, _, _) =
        s.open(&upload_id, spec("s3-resets", pb::ContentKind::CallRecording, "audio/wav")).await.unwrap();
    s.data_chunks(0, &audio).await;
    s.finish(Some(sha256(&audio)), audio.len() as u64).await;
    let info = match s.committed().await {
        Ok(info) => info,
        Err(status) => {
            // Resets beyond the client's retries fail the commit cleanly;
            // the journal keeps every byte and a second finish commits.
            assert_eq!(status.code(), Code::Unavailable, "{status}");
            let mut s = Stream::start(&mut c).await.unwrap();
            let (_, durable, _) =
                s.open(&upload_id, spec("s3-resets", pb::ContentKind::CallRecording, "audio/wav")).await.unwrap();
            assert_eq!(durable, audio.len() as u64);
            s.finish(Some(sha256(&audio)), audio.len() as u64).await;
            s.committed().await.expect("a second finish commits")
        }
    };
    assert_eq!(info.object_id, object_id);
    assert_eq!(proxy.resets_left(), 0, "the resets happened");
    proxy.slow(0);
    assert!(get(&mut c, &object_id, None).await.unwrap() == audio, "bit-exact");
    assert_eq!(garage_list(&garage, "objects/").await.len(), 1, "exactly one object");

    // Reads through connections cut mid-answer: bit-exact after the
    // client's retries, or an error — never other bytes.
    for _ in 0..3 {
        proxy.reset_next(1, 256 * 1024);
        match get(&mut c, &object_id, Some((1_000_000, Some(5_000_000)))).await {
            Ok(bytes) => assert!(bytes == audio[1_000_000..=5_000_000], "a range read through a reset is bit-exact"),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status}"),
        }
    }
}
