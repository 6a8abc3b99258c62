//! `recvault loadgen`: benchmarks against a real `recvault serve` process
//! (issue #7; figures and commands in BENCHMARKS.md). Four modes: many
//! concurrent live calls streaming G.711 in real time (also, as their peer,
//! into a gRPC sink that answers alike and keeps nothing), server memory while
//! one large object goes in and out, range reads in a long recording, and
//! one large upload against the same bytes written without recvault and
//! sent into a gRPC sink (`src/loadgen/sink.rs`).
//!
//! Without `--server` it starts `recvault serve` itself (this binary) on a
//! fresh data directory under `--work-dir` and a loopback port, and removes
//! both at the end; with `--server` it loads a running one (pass
//! `--server-pid` to get its CPU and memory). It measures and reports; it
//! never asserts a time. Every committed object's SHA-256 is checked
//! against what was sent, so a run also checks correctness under load.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt;
use ring::digest;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;

use crate::api::pb;
use crate::api::pb::ingest_response::Msg as ServerMsg;
use crate::api::pb::recvault_client::RecvaultClient;
use crate::cli::{BearerAuth, Client};

mod sink;

/// G.711 (μ-law or A-law): 8 000 samples of one byte per second.
pub const G711_BYTES_PER_SEC: u64 = 8_000;
/// Largest data message the generator sends (a resumed stream catches up
/// in pieces of this size).
const MAX_MSG: u64 = 64 << 10;
/// /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Subcommand)]
pub enum LoadgenCmd {
    /// N concurrent live calls streaming G.711 in real time, some dropped and
    /// resumed, with transcript and image uploads; checks every object.
    /// `--against sink` or `both` runs the same load into the transport sink.
    Calls(CallsArgs),
    /// Server RSS while one large object is ingested and read back.
    Memory(MemoryArgs),
    /// Latency of small range reads in the middle of a long recording,
    /// against full reads of the same object.
    Seek(SeekArgs),
    /// One large recording streamed into the server's storage, against the
    /// same bytes written without recvault in the same run: a raw multipart
    /// PUT into the same bucket (S3 storage) or an fsync'd file (local).
    Bulk(BulkArgs),
    /// The discarding gRPC sink `bulk` compares against (started by it).
    #[command(hide = true)]
    Sink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

/// Which server to load.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// A running server to load. Without it, `recvault serve` is started on
    /// a temporary data directory and a loopback port.
    #[arg(long)]
    pub server: Option<String>,
    /// Token with the ingest and coach roles, for --server.
    #[arg(long, env = "RECVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Process id of --server, to report its CPU time and memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Binary to start the server from [default: this one].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Configuration file for the started server.
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Where the started server's data directory is made (and removed).
    #[arg(long, default_value = ".")]
    pub work_dir: PathBuf,
    /// HTTP/2 connections; calls are spread over them.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Seed of every random choice: the same seed replays the same load.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Clone, Args)]
pub struct CallsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Concurrent calls (a call that ends is replaced by a new one).
    #[arg(long, default_value_t = 100)]
    pub calls: usize,
    /// How long calls are placed; calls still running then hang up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The first calls start spread over this time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ramp: Duration,
    /// Audio frame length in ms, MIN-MAX (drawn once per call).
    #[arg(long, default_value = "20-200", value_parser = parse_min_max)]
    pub frame_ms: (u64, u64),
    /// Call length in seconds, MIN-MAX.
    #[arg(long, default_value = "20-90", value_parser = parse_min_max)]
    pub call_secs: (u64, u64),
    /// Fraction of calls whose stream drops once mid-call and is resumed
    /// (same upload id, from the durable offset) after 0.2-1 s.
    #[arg(long, default_value_t = 0.05)]
    pub drop_fraction: f64,
    /// Fraction of calls followed by a chat transcript upload (Put, 2-20 KB).
    #[arg(long, default_value_t = 0.3)]
    pub transcript_fraction: f64,
    /// Fraction of calls followed by an image upload (Put, 20-200 KB PNG).
    #[arg(long, default_value_t = 0.1)]
    pub image_fraction: f64,
    /// Customers the calls are spread over.
    #[arg(long, default_value_t = 10_000)]
    pub customers: u64,
    /// Before the load, measure the disk's fdatasync ceiling in --work-dir
    /// for this long (64 writers appending 1 KiB each): the peer of the
    /// journal's acks per second. 0 skips it.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub fsync_probe: Duration,
    /// What takes the load: recvault, the transport sink (the same gRPC
    /// calls answered as the server answers them, nothing kept: what the
    /// transport alone costs), or both one after the other.
    #[arg(long, value_enum, default_value_t = Against::Server)]
    pub against: Against,
}

/// The side `loadgen calls` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Against {
    Server,
    Sink,
    /// The sink first, then recvault, with the same seed.
    Both,
}

#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Object size (K, M, G suffixes are binary: 4G = 4 GiB).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub size: u64,
    /// Size of each data message.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub chunk: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SeekArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Length of the G.711 recording in seconds (3600: 28.8 MB).
    #[arg(long, default_value_t = 3600)]
    pub secs: u64,
    /// Range reads to time.
    #[arg(long, default_value_t = 1000)]
    pub reads: usize,
    /// Length of each range.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub range: u64,
    /// Full reads of the same object, the peer.
    #[arg(long, default_value_t = 10)]
    pub full_reads: usize,
}

#[derive(Debug, Clone, Args)]
pub struct BulkArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Object size (K, M, G suffixes are binary).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Size of each data message.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub chunk: u64,
    /// Uploads of each kind; the best and the median are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Runs one mode and prints its report; fails when anything went wrong
/// (an error status, a hash mismatch), after printing.
pub async fn run(cmd: LoadgenCmd) -> anyhow::Result<()> {
    match cmd {
        LoadgenCmd::Calls(a) => {
            // Each report is printed as soon as its run ends.
            let peer = if a.against == Against::Server { None } else { Some(calls_against_sink(&a).await?) };
            if let Some(r) = &peer {
                print!("{r}");
            }
            let server = if a.against == Against::Sink { None } else { Some(calls(&a).await?) };
            if let Some(r) = &server {
                print!("{r}");
            }
            if let (Some(peer), Some(server)) = (&peer, &server) {
                print!("{}", PeerComparison { peer, server });
            }
            for r in peer.iter().chain(&server) {
                if !r.passed() {
                    bail!("{} errors, {} of {} objects verified", r.errors(), r.verified, r.committed());
                }
            }
            Ok(())
        }
        LoadgenCmd::Memory(a) => memory(&a).await,
        LoadgenCmd::Seek(a) => seek(&a).await,
        LoadgenCmd::Bulk(a) => bulk(&a).await,
        LoadgenCmd::Sink { listen } => sink::serve(listen).await,
    }
}

// ---------------------------------------------------------------- target --

/// A process started for the run (a server, the sink); killed and its
/// data directory removed on drop.
struct Started {
    child: Child,
    dir: Option<PathBuf>,
    /// Kept open so the process never writes into a closed pipe; `None`
    /// only while its first line is being read.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Started {
    /// Starts `cmd` and waits for the line `{announce}ADDR ...` it prints
    /// once it listens; returns it with `http://ADDR`.
    async fn spawn(mut cmd: Command, dir: Option<PathBuf>, announce: &'static str) -> anyhow::Result<(Self, String)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", cmd.get_program().to_string_lossy()))?;
        let stdout = child.stdout.take();
        // From here on, every way out (a first line that cannot be read,
        // for one) kills the process and removes its directory on drop.
        let mut started = Self { child, dir, _stdout: None };
        let stdout = stdout.context("no stdout of the started process")?;
        let (line, reader) = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).map(|_| (line, reader))
        })
        .await?
        .with_context(|| format!("cannot read the first line of {}", cmd.get_program().to_string_lossy()))?;
        started._stdout = Some(reader);
        let Some(addr) = line.strip_prefix(announce).and_then(|r| r.split_whitespace().next()) else {
            let status = started.child.try_wait().ok().flatten();
            bail!("{} did not start (exit {status:?}); it printed {line:?}", cmd.get_program().to_string_lossy());
        };
        let url = format!("http://{addr}");
        Ok((started, url))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

struct Target {
    url: String,
    token: String,
    pid: Option<u32>,
    started: Option<Started>,
    connections: usize,
}

impl Target {
    async fn open(a: &TargetArgs) -> anyhow::Result<Self> {
        let connections = a.connections.max(1);
        if let Some(url) = &a.server {
            let token = a
                .token
                .clone()
                .context("--server needs --token (or RECVAULT_TOKEN) with the ingest and coach roles")?;
            return Ok(Self { url: url.clone(), token, pid: a.server_pid, started: None, connections });
        }
        let bin = match &a.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("cannot find this binary to start the server")?,
        };
        std::fs::create_dir_all(&a.work_dir).with_context(|| format!("cannot create {}", a.work_dir.display()))?;
        let dir = a.work_dir.join(format!("recvault-loadgen-{}", uuid::Uuid::new_v4()));
        let mut cmd = Command::new(&bin);
        // Both ports on free loopback ports: a server already running here
        // (on the defaults, say) must not make the run fail to bind.
        cmd.arg("serve").arg("--data-dir").arg(&dir).args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
        if let Some(c) = &a.server_config {
            cmd.arg("--config").arg(c);
        }
        cmd.env("RECVAULT_LOG", "warn")
            .env_remove("RECVAULT_CONFIG")
            .env_remove("RECVAULT_DATA_DIR")
            .env_remove("RECVAULT_LISTEN");
        // The line `recvault serving on ADDR (...)` comes once the server
        // has unsealed and bound its port.
        let (started, url) = Started::spawn(cmd, Some(dir.clone()), "recvault serving on ").await?;
        let pid = started.pid();
        let admin = std::fs::read_to_string(dir.join(crate::auth::ADMIN_TOKEN_FILE))
            .context("the started server wrote no admin token")?;
        let token = connect(&url, admin.trim())
            .await?
            .create_token(pb::CreateTokenRequest {
                name: "loadgen".into(),
                roles: vec![pb::Role::Ingest as i32, pb::Role::Coach as i32],
                unredacted: false,
                ttl_seconds: 7 * 86_400,
            })
            .await
            .context("cannot create the load generator's token")?
            .into_inner()
            .token;
        Ok(Self { url, token, pid: Some(pid), started: Some(started), connections })
    }

    /// The transport sink (`src/loadgen/sink.rs`), started from this binary.
    async fn sink(a: &TargetArgs) -> anyhow::Result<Self> {
        let (started, url) = start_sink().await?;
        let pid = started.pid();
        Ok(Self {
            url,
            token: "none".into(),
            pid: Some(pid),
            started: Some(started),
            connections: a.connections.max(1),
        })
    }

    async fn clients(&self) -> anyhow::Result<Vec<Client>> {
        let mut v = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            v.push(connect(&self.url, &self.token).await?);
        }
        Ok(v)
    }

    fn data_dir(&self) -> Option<&std::path::Path> {
        self.started.as_ref().and_then(|s| s.dir.as_deref())
    }
}

/// Starts the transport sink (`src/loadgen/sink.rs`) from this binary, on a
/// free loopback port; returns it with its `http://ADDR`.
async fn start_sink() -> anyhow::Result<(Started, String)> {
    let exe = std::env::current_exe().context("cannot find this binary to start the sink")?;
    let mut cmd = Command::new(exe);
    cmd.args(["loadgen", "sink", "--listen", "127.0.0.1:0"]);
    Started::spawn(cmd, None, "recvault sink on ").await
}

/// One HTTP/2 connection. Streams multiplex on it; the server advertises
/// no stream limit (tonic's default), so thousands share one connection.
async fn connect(url: &str, token: &str) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect()
        .await
        .with_context(|| format!("cannot reach recvault at {url}"))?;
    Ok(RecvaultClient::with_interceptor(channel, BearerAuth::new(Some(token))?)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20))
}

// ------------------------------------------------------------- measuring --

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds so far.
    pub cpu_secs: f64,
    /// Resident set now, bytes.
    pub rss: u64,
    /// Peak resident set so far (VmHWM), bytes.
    pub hwm: u64,
    pub threads: u64,
}

pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(ProcSample {
        cpu_secs: ticks as f64 / TICKS_PER_SEC,
        rss: kib("VmRSS:")? << 10,
        hwm: kib("VmHWM:")? << 10,
        threads: kib("Threads:")?,
    })
}

/// Samples a process's RSS in the background; `take_peak` returns the
/// highest RSS since the last call.
struct RssSampler {
    peak: Arc<AtomicU64>,
    threads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let threads = Arc::new(AtomicU64::new(0));
        let (p, t) = (peak.clone(), threads.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Some(s) = proc_sample(pid) {
                    p.fetch_max(s.rss, Ordering::Relaxed);
                    t.fetch_max(s.threads, Ordering::Relaxed);
                }
            }
        });
        Self { peak, threads, task }
    }

    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Latencies in 0.1 ms buckets up to 60 s (beyond: the last bucket), plus
/// the exact maximum. Shared by every call task.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max_us: AtomicU64,
}

const BUCKET_US: u64 = 100;
const BUCKETS: usize = 600_000;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = ((us / BUCKET_US) as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q` quantile in ms (upper edge of its bucket, at most the max).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                let edge = (i as u64 + 1) * BUCKET_US;
                return edge.min(self.max_us.load(Ordering::Relaxed)) as f64 / 1000.0;
            }
        }
        self.max_ms()
    }

    pub fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} ms  (n = {})",
            self.quantile_ms(0.50),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999),
            self.max_ms(),
            self.count()
        )
    }
}

// ---------------------------------------------------------- randomness --

/// SplitMix64: small, seeded, good enough to draw a load.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo { lo } else { lo + self.next_u64() % (hi - lo + 1) }
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Content of a call's recording at `[offset, offset + len)`: a pure
/// function of (seed, offset), so a resumed stream resends the same bytes.
pub fn audio(seed: u64, offset: u64, len: u64) -> Bytes {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let word = mix(seed ^ (pos / 8).wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes();
        let from = (pos % 8) as usize;
        let take = ((end - pos) as usize).min(8 - from);
        out.extend_from_slice(&word[from..from + take]);
        pos += take as u64;
    }
    Bytes::from(out)
}

/// Upload ids are fresh in every run (a replayed seed must not resume the
/// last run's uploads on a long-running server); the rest is seeded.
fn fresh_upload_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data).as_ref().try_into().expect("SHA-256 is 32 bytes")
}

// ----------------------------------------------------------------- calls --

/// fdatasyncs per second that `writers` threads sustain in `dir`, each
/// appending 1 KiB to its own file and syncing it: what a journal flush
/// costs the disk, without the server.
pub fn fsync_ceiling(dir: &std::path::Path, writers: usize, for_how_long: Duration) -> std::io::Result<f64> {
    use std::io::Write;
    let deadline = std::time::Instant::now() + for_how_long;
    let started = std::time::Instant::now();
    let counts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|i| {
                scope.spawn(move || -> std::io::Result<u64> {
                    let path = dir.join(format!("fsync-probe-{}-{i}", std::process::id()));
                    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
                    let block = [0x5Au8; 1024];
                    let mut n = 0;
                    while std::time::Instant::now() < deadline {
                        f.write_all(&block)?;
                        f.sync_data()?;
                        n += 1;
                    }
                    drop(f);
                    std::fs::remove_file(&path)?;
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("probe panicked"))))
            .sum::<std::io::Result<u64>>()
    })?;
    Ok(counts as f64 / started.elapsed().as_secs_f64())
}

/// What one call does, drawn up front from the slot's seeded generator.
struct CallPlan {
    upload_id: String,
    customer: String,
    interaction: String,
    agent: String,
    queue: &'static str,
    seed: u64,
    frame: Duration,
    bytes: u64,
    drop_at: Option<u64>,
    reconnect: Duration,
    transcript: Option<usize>,
    image: Option<usize>,
}

impl CallPlan {
    fn draw(rng: &mut Rng, a: &CallsArgs, slot: usize, n: u64) -> Self {
        const QUEUES: [&str; 4] = ["billing", "support", "sales", "retention"];
        let bytes = rng.between(a.call_secs.0.max(1), a.call_secs.1.max(1)) * G711_BYTES_PER_SEC;
        let dropped = rng.chance(a.drop_fraction);
        let drop_at = rng.between(bytes / 5, bytes * 4 / 5);
        Self {
            upload_id: fresh_upload_id(),
            customer: format!("lg-{}", rng.between(0, a.customers.max(1) - 1)),
            interaction: format!("call-{slot}-{n}"),
            agent: format!("agent-{}", rng.between(0, 499)),
            queue: QUEUES[rng.between(0, 3) as usize],
            seed: rng.next_u64(),
            frame: Duration::from_millis(rng.between(a.frame_ms.0.max(1), a.frame_ms.1.max(1))),
            bytes,
            drop_at: dropped.then_some(drop_at),
            reconnect: Duration::from_millis(rng.between(200, 1000)),
            transcript: rng.chance(a.transcript_fraction).then(|| rng.between(2_000, 20_000) as usize),
            image: rng.chance(a.image_fraction).then(|| rng.between(20_000, 200_000) as usize),
        }
    }

    fn spec(&self, kind: pb::ContentKind, content_type: &str, channel: &str) -> pb::ObjectSpec {
        pb::ObjectSpec {
            customer_id: self.customer.clone(),
            kind: kind as i32,
            content_type: content_type.into(),
            interaction: Some(pb::Interaction {
                interaction_id: self.interaction.clone(),
                channel: channel.into(),
                agent_id: self.agent.clone(),
                queue: self.queue.into(),
                direction: pb::Direction::Inbound as i32,
                started_at: None,
                tags: Default::default(),
                duration_ms: 0,
            }),
            sensitive_spans: Vec::new(),
        }
    }
}

/// An object the run committed, to check against the server's Stat.
struct Expected {
    object_id: String,
    sha256: [u8; 32],
    size: u64,
}

/// Counters shared by every call task.
#[derive(Default)]
struct Shared {
    ack: Histogram,
    open: Histogram,
    /// Commits and `Put`s during the load, and at the hang-up, when every
    /// call still running commits at once and then makes its `Put`s: a
    /// burst no contact centre sends (calls end spread out), which alone
    /// would make these latencies look a hundred times worse.
    commit: Histogram,
    put: Histogram,
    commit_drain: Histogram,
    put_drain: Histogram,
    lag: Histogram,
    bytes_sent: AtomicU64,
    bytes_acked: AtomicU64,
    messages: AtomicU64,
    calls_started: AtomicU64,
    calls_committed: AtomicU64,
    abandoned: AtomicU64,
    refused: AtomicU64,
    acks: AtomicU64,
    resumes: AtomicU64,
    transcripts: AtomicU64,
    images: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    committed: Mutex<Vec<Expected>>,
}

impl Shared {
    fn error(&self, what: String) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(what).or_default() += 1;
    }

    fn expect(&self, e: Expected) {
        self.committed.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Streams one call in real time until it ends (or `hang_up`), dropping and
/// resuming the stream once if planned; returns after the commit (true), or
/// false when the call hung up before its first byte was sent (its open
/// took longer than the call had left: there is nothing to commit).
async fn call(sh: &Shared, client: &mut Client, p: &CallPlan, hang_up: Instant) -> Result<bool, String> {
    use pb::ingest_request::{Data, Finish, Msg, Open};
    let t0 = Instant::now();
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut hashed = 0u64;
    let mut next = 0u64;
    let mut acked = 0u64;
    let mut drop_at = p.drop_at;
    let spec = p.spec(pb::ContentKind::CallRecording, "audio/pcmu", "voice");
    loop {
        let (tx, rx) = mpsc::channel::<pb::IngestRequest>(64);
        let opening = Instant::now();
        let open = Msg::Open(Open { upload_id: p.upload_id.clone(), spec: Some(spec.clone()) });
        tx.send(pb::IngestRequest { msg: Some(open) }).await.map_err(|_| "request stream closed".to_owned())?;
        let mut resp = client.ingest(ReceiverStream::new(rx)).await.map_err(status_text)?.into_inner();
        let durable = match resp.message().await.map_err(status_text)? {
            Some(pb::IngestResponse { msg: Some(ServerMsg::Opened(o)) }) => o.durable_offset,
            other => return Err(format!("expected opened, got {other:?}")),
        };
        sh.open.record(opening.elapsed());
        if durable > next {
            return Err(format!("durable offset {durable} beyond the {next} bytes sent"));
        }
        next = durable;
        if durable > acked {
            sh.bytes_acked.fetch_add(durable - acked, Ordering::Relaxed);
            acked = durable;
        }
        let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut tick = tokio::time::interval(p.frame);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut finishing: Option<Instant> = None;
        let mut drop_now = false;
        while !drop_now {
            tokio::select! {
                at = tick.tick(), if finishing.is_none() => {
                    let now = Instant::now();
                    sh.lag.record(now - at);
                    let ended = now >= hang_up;
                    // At hang-up everything recorded so far is delivered,
                    // including what a dropped stream lost and must resend.
                    let due = if ended { hashed } else {
                        ((now - t0).as_millis() as u64 * G711_BYTES_PER_SEC / 1000).min(p.bytes)
                    };
                    while next < due {
                        let n = (due - next).min(MAX_MSG);
                        let data = audio(p.seed, next, n);
                        if next + n > hashed {
                            hash.update(&data[(hashed - next) as usize..]);
                            hashed = next + n;
                        }
                        pending.push_back((next + n, now));
                        let msg = Msg::Data(Data { offset: next, data });
                        tx.send(pb::IngestRequest { msg: Some(msg) }).await.map_err(|_| "request stream closed".to_owned())?;
                        sh.bytes_sent.fetch_add(n, Ordering::Relaxed);
                        sh.messages.fetch_add(1, Ordering::Relaxed);
                        next += n;
                    }
                    if drop_at.is_some_and(|d| next >= d) {
                        drop_at = None;
                        drop_now = true;
                    } else if ended || next >= p.bytes {
                        if next == 0 {
                            return Ok(false);
                        }
                        let sha = hash.clone().finish();
                        let finish = Finish { expected_sha256: Bytes::copy_from_slice(sha.as_ref()), expected_size: next };
                        tx.send(pb::IngestRequest { msg: Some(Msg::Finish(finish)) }).await.map_err(|_| "request stream closed".to_owned())?;
                        finishing = Some(Instant::now());
                    }
                }
                m = resp.message() => {
                    let now = Instant::now();
                    match m.map_err(status_text)? {
                        Some(pb::IngestResponse { msg: Some(ServerMsg::Ack(a)) }) => {
                            sh.acks.fetch_add(1, Ordering::Relaxed);
                            while pending.front().is_some_and(|&(end, _)| end <= a.durable_offset) {
                                if let Some((_, sent)) = pending.pop_front() {
                                    sh.ack.record(now - sent);
                                }
                            }
                            if a.durable_offset > acked {
                                sh.bytes_acked.fetch_add(a.durable_offset - acked, Ordering::Relaxed);
                                acked = a.durable_offset;
                            }
                        }
                        Some(pb::IngestResponse { msg: Some(ServerMsg::Committed(info)) }) => {
                            if let Some(f) = finishing {
                                let h = if f >= hang_up { &sh.commit_drain } else { &sh.commit };
                                h.record(now - f);
                            }
                            let sha: [u8; 32] = hash.finish().as_ref().try_into().expect("32 bytes");
                            if info.sha256[..] != sha || info.size != next {
                                return Err("committed object differs from what was sent".into());
                            }
                            sh.expect(Expected { object_id: info.object_id, sha256: sha, size: info.size });
                            return Ok(true);
                        }
                        Some(other) => return Err(format!("unexpected message {other:?}")),
                        None => return Err("stream ended before the commit".into()),
                    }
                }
            }
        }
        // Drop the stream as a network failure would (the HTTP/2 stream is
        // reset), wait, and resume from the durable offset.
        drop(resp);
        drop(tx);
        sh.resumes.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(p.reconnect).await;
    }
}

/// A chat transcript of `len` bytes: plain UTF-8 lines.
fn transcript(seed: u64, len: usize) -> Bytes {
    const WORDS: [&str; 12] =
        ["hello", "invoice", "payment", "thanks", "olá", "account", "refund", "bitte", "merci", "order", "call", "ok"];
    let mut rng = Rng::new(seed);
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(if rng.chance(0.5) { "agent: " } else { "customer: " });
        for _ in 0..rng.between(3, 12) {
            s.push_str(WORDS[rng.between(0, WORDS.len() as u64 - 1) as usize]);
            s.push(' ');
        }
        s.push('\n');
    }
    Bytes::from(s)
}

/// A PNG of `len` bytes: a real header (what the server checks) and noise.
fn image(seed: u64, len: usize) -> Bytes {
    let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    v.extend_from_slice(&640u32.to_be_bytes());
    v.extend_from_slice(&480u32.to_be_bytes());
    v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    let n = len.saturating_sub(v.len()) as u64;
    v.extend_from_slice(&audio(seed, 0, n));
    Bytes::from(v)
}

async fn put_one(
    sh: &Shared,
    client: &mut Client,
    spec: pb::ObjectSpec,
    data: Bytes,
    hang_up: Instant,
) -> Result<(), String> {
    let sha = sha256(&data);
    let size = data.len() as u64;
    let started = Instant::now();
    let histogram = if started >= hang_up { &sh.put_drain } else { &sh.put };
    let r = client
        .put(pb::PutRequest {
            upload_id: fresh_upload_id(),
            spec: Some(spec),
            data,
            expected_sha256: Bytes::copy_from_slice(&sha),
        })
        .await
        .map_err(status_text)?
        .into_inner();
    histogram.record(started.elapsed());
    let info = r.object.ok_or("a Put answered no object")?;
    if info.sha256[..] != sha || info.size != size {
        return Err("stored item differs from what was sent".into());
    }
    sh.expect(Expected { object_id: info.object_id, sha256: sha, size });
    Ok(())
}

/// One slot: back-to-back calls until `hang_up`, so `--calls` stay live.
async fn slot(sh: Arc<Shared>, mut client: Client, a: Arc<CallsArgs>, index: usize, hang_up: Instant) {
    let mut rng = Rng::new(mix(a.target.seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407)));
    tokio::time::sleep(a.ramp.mul_f64(rng.unit())).await;
    let mut n = 0u64;
    while Instant::now() + Duration::from_secs(1) < hang_up {
        let plan = CallPlan::draw(&mut rng, &a, index, n);
        n += 1;
        sh.calls_started.fetch_add(1, Ordering::Relaxed);
        match call(&sh, &mut client, &plan, hang_up).await {
            Ok(true) => {}
            Ok(false) => {
                sh.abandoned.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The server's documented answer at `ingest.max_streams`: a
            // telephony platform tries again later (or another replica),
            // so the call backs off instead of hammering the server.
            Err(e) if e.starts_with("Unavailable") && e.contains(crate::ingest::BUSY) => {
                sh.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1).mul_f64(1.0 + rng.unit())).await;
                continue;
            }
            Err(e) => {
                sh.error(format!("ingest: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        sh.calls_committed.fetch_add(1, Ordering::Relaxed);
        if let Some(len) = plan.transcript {
            let spec = plan.spec(pb::ContentKind::ChatTranscript, "text/plain; charset=utf-8", "chat");
            match put_one(&sh, &mut client, spec, transcript(plan.seed, len), hang_up).await {
                Ok(()) => {
                    sh.transcripts.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => sh.error(format!("put transcript: {e}")),
            }
        }
        if let Some(len) = plan.image {
            let spec = plan.spec(pb::ContentKind::Image, "image/png", "chat");
            match put_one(&sh, &mut client, spec, image(plan.seed, len), hang_up).await {
                Ok(()) => {
                    sh.images.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => sh.error(format!("put image: {e}")),
            }
        }
    }
}

/// The outcome of `loadgen calls`.
#[derive(Debug, Default)]
pub struct CallsReport {
    /// Against the transport sink, which keeps nothing to verify.
    pub sink: bool,
    pub calls: usize,
    pub connections: usize,
    pub seed: u64,
    /// Calls placed until hang-up, and the drain after it.
    pub load_secs: f64,
    pub drain_secs: f64,
    pub calls_started: u64,
    pub calls_committed: u64,
    /// Calls that hung up before their first byte (open slower than the call).
    pub abandoned: u64,
    /// Calls refused at the server's `ingest.max_streams` (retried after 1-2 s).
    pub refused: u64,
    /// Acks received: one per journal fsync of a stream.
    pub acks: u64,
    /// The disk's fdatasync ceiling, measured just before the load.
    pub fsync_ceiling: Option<f64>,
    pub resumes: u64,
    pub transcripts: u64,
    pub images: u64,
    pub messages: u64,
    pub bytes_sent: u64,
    pub bytes_acked: u64,
    pub ack: String,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub open: String,
    pub commit: String,
    pub put: String,
    pub commit_drain: String,
    pub put_drain: String,
    pub lag: String,
    pub server_cpu_secs: Option<f64>,
    pub server_idle_rss: Option<u64>,
    pub server_peak_rss: Option<u64>,
    pub server_hwm: Option<u64>,
    pub server_peak_threads: Option<u64>,
    pub loadgen_cpu_secs: Option<f64>,
    pub errors: BTreeMap<String, u64>,
    pub verified: u64,
    pub mismatched: u64,
}

impl CallsReport {
    pub fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Objects committed: calls plus the items put after them.
    pub fn committed(&self) -> u64 {
        self.calls_committed + self.transcripts + self.images
    }

    /// No errors, and every object checked (the sink's have nothing to
    /// check them against: it echoes the client's SHA-256).
    pub fn passed(&self) -> bool {
        self.errors() == 0 && self.mismatched == 0 && (self.sink || self.verified == self.committed())
    }

    /// Server CPU per data message received, in microseconds.
    pub fn cpu_us_per_message(&self) -> Option<f64> {
        self.server_cpu_secs.filter(|_| self.messages > 0).map(|c| c * 1e6 / self.messages as f64)
    }
}

/// Both sides of `loadgen calls --against both`, side by side.
struct PeerComparison<'a> {
    peer: &'a CallsReport,
    server: &'a CallsReport,
}

impl std::fmt::Display for PeerComparison<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, s) = (self.peer, self.server);
        writeln!(f, "recvault against the transport sink, same load and seed:")?;
        writeln!(
            f,
            "  ack p99 {:.0} ms against {:.0} ms ({:.2} x); p50 {:.0} against {:.0} ms",
            s.ack_p99_ms,
            p.ack_p99_ms,
            s.ack_p99_ms / p.ack_p99_ms.max(f64::MIN_POSITIVE),
            s.ack_p50_ms,
            p.ack_p50_ms
        )?;
        if let (Some(sc), Some(pc)) = (s.cpu_us_per_message(), p.cpu_us_per_message()) {
            writeln!(
                f,
                "  CPU per data message {sc:.1} us against {pc:.1} us ({:.2} x)",
                sc / pc.max(f64::MIN_POSITIVE)
            )?;
        }
        if let (Some(sl), Some(pl)) = (s.loadgen_cpu_secs, p.loadgen_cpu_secs) {
            writeln!(f, "  load generator CPU {sl:.1} s against {pl:.1} s")?;
        }
        Ok(())
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

impl std::fmt::Display for CallsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let wall = self.load_secs + self.drain_secs;
        writeln!(
            f,
            "loadgen calls{}: {} concurrent calls on {} connections, seed {}",
            if self.sink { " against the transport sink (nothing kept)" } else { "" },
            self.calls,
            self.connections,
            self.seed
        )?;
        writeln!(f, "  load {:.1} s + drain after hang-up {:.1} s", self.load_secs, self.drain_secs)?;
        writeln!(
            f,
            "  calls started {}  committed {}  hung up before any audio {}  resumed streams {}  transcripts {}  images {}",
            self.calls_started, self.calls_committed, self.abandoned, self.resumes, self.transcripts, self.images
        )?;
        if self.refused > 0 {
            writeln!(
                f,
                "  refused at the server's ingest.max_streams {} (UNAVAILABLE, each retried after 1-2 s; not errors)",
                self.refused
            )?;
        }
        writeln!(
            f,
            "  audio sent {:.1} MiB in {} messages, acked durable {:.1} MiB: {:.2} MB/s over the load ({:.2} MB/s offered = calls x 8000 B/s)",
            mib(self.bytes_sent),
            self.messages,
            mib(self.bytes_acked),
            self.bytes_acked as f64 / self.load_secs / 1e6,
            self.calls as f64 * G711_BYTES_PER_SEC as f64 / 1e6
        )?;
        writeln!(f, "  ack latency     {}", self.ack)?;
        writeln!(
            f,
            "  acks {} = {:.0}/s over the load ({})",
            self.acks,
            self.acks as f64 / self.load_secs,
            if self.sink {
                "one per batch of a stream, as the server batches"
            } else {
                "one per journal fdatasync of a stream"
            }
        )?;
        if let Some(c) = self.fsync_ceiling {
            writeln!(
                f,
                "  disk fdatasync ceiling before the load (64 writers, 1 KiB appends): {:.0}/s; acks/s = {:.2} x that",
                c,
                self.acks as f64 / self.load_secs / c
            )?;
        }
        writeln!(f, "  open latency    {}", self.open)?;
        writeln!(f, "  commit latency  {}", self.commit)?;
        writeln!(f, "  put latency     {}", self.put)?;
        writeln!(f, "  at the hang-up, every call still running committing at once, then its Puts:")?;
        writeln!(f, "    commit        {}", self.commit_drain)?;
        writeln!(f, "    put           {}", self.put_drain)?;
        writeln!(f, "  generator lag   {}", self.lag)?;
        if let Some(cpu) = self.server_cpu_secs {
            writeln!(
                f,
                "  {} CPU {:.1} s = {:.2} cores over {:.1} s, {:.1} us per data message",
                if self.sink { "sink" } else { "server" },
                cpu,
                cpu / wall,
                wall,
                self.cpu_us_per_message().unwrap_or(0.0)
            )?;
        }
        if let (Some(idle), Some(peak), Some(hwm)) = (self.server_idle_rss, self.server_peak_rss, self.server_hwm) {
            writeln!(
                f,
                "  {} RSS idle {:.0} MiB, peak sampled {:.0} MiB, VmHWM {:.0} MiB, threads peak {}",
                if self.sink { "sink" } else { "server" },
                mib(idle),
                mib(peak),
                mib(hwm),
                self.server_peak_threads.unwrap_or(0)
            )?;
        }
        if let Some(cpu) = self.loadgen_cpu_secs {
            writeln!(f, "  load generator CPU {:.1} s = {:.2} cores", cpu, cpu / wall)?;
        }
        writeln!(f, "  errors {}", self.errors())?;
        for (what, n) in &self.errors {
            writeln!(f, "    {n} x {what}")?;
        }
        if self.sink {
            return writeln!(f, "  nothing to verify: the sink keeps nothing ({} objects answered)", self.committed());
        }
        writeln!(
            f,
            "  verified {} of {} committed objects by Stat (SHA-256 and size), mismatches {}",
            self.verified,
            self.committed(),
            self.mismatched
        )
    }
}

/// Runs `loadgen calls` and returns its report (printing is the caller's).
pub async fn calls(a: &CallsArgs) -> anyhow::Result<CallsReport> {
    calls_on(a, Target::open(&a.target).await?, false).await
}

/// The same load against the transport sink: the floor under recvault's
/// figures on this machine (no journal, no crypto, no catalog).
pub async fn calls_against_sink(a: &CallsArgs) -> anyhow::Result<CallsReport> {
    calls_on(a, Target::sink(&a.target).await?, true).await
}

async fn calls_on(a: &CallsArgs, target: Target, sink: bool) -> anyhow::Result<CallsReport> {
    let clients = target.clients().await?;
    let fsync_ceiling = if a.fsync_probe.is_zero() || sink {
        None
    } else {
        let (dir, d) = (a.target.work_dir.clone(), a.fsync_probe);
        Some(tokio::task::spawn_blocking(move || fsync_ceiling(&dir, 64, d)).await??)
    };
    let pid = target.pid;
    let idle = pid.and_then(proc_sample);
    let me = proc_sample(std::process::id());
    let sampler = pid.map(|p| RssSampler::start(p, Duration::from_millis(250)));
    let sh = Arc::new(Shared::default());
    let args = Arc::new(a.clone());
    let start = Instant::now();
    let hang_up = start + a.duration;
    let tasks: Vec<_> = (0..a.calls)
        .map(|i| tokio::spawn(slot(sh.clone(), clients[i % clients.len()].clone(), args.clone(), i, hang_up)))
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            sh.error(format!("call task failed: {e}"));
        }
    }
    let end = Instant::now();
    let after = pid.and_then(proc_sample);
    let me_after = proc_sample(std::process::id());
    let peak = sampler.as_ref().map(|s| s.take_peak().max(after.map_or(0, |s| s.rss)));
    let peak_threads = sampler.as_ref().map(|s| s.threads.load(Ordering::Relaxed));
    drop(sampler);

    // Every committed object, as the server now describes it (the sink
    // kept none to describe).
    let expected = std::mem::take(&mut *sh.committed.lock().unwrap_or_else(|p| p.into_inner()));
    let expected = if sink { Vec::new() } else { expected };
    let checks = futures::stream::iter(expected.into_iter().enumerate().map(|(i, e)| {
        let mut c = clients[i % clients.len()].clone();
        async move {
            match c.stat(pb::StatRequest { object_id: e.object_id.clone() }).await {
                Ok(info) => {
                    let info = info.into_inner();
                    Ok(info.sha256[..] == e.sha256 && info.size == e.size)
                }
                Err(s) => Err(status_text(s)),
            }
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    let (mut verified, mut mismatched) = (0, 0);
    for c in checks {
        match c {
            Ok(true) => verified += 1,
            Ok(false) => mismatched += 1,
            Err(e) => sh.error(format!("stat: {e}")),
        }
    }
    drop(target);
    let load_end = hang_up.min(end);
    Ok(CallsReport {
        sink,
        calls: a.calls,
        connections: clients.len(),
        seed: a.target.seed,
        load_secs: (load_end - start).as_secs_f64(),
        drain_secs: (end - load_end).as_secs_f64(),
        calls_started: sh.calls_started.load(Ordering::Relaxed),
        calls_committed: sh.calls_committed.load(Ordering::Relaxed),
        abandoned: sh.abandoned.load(Ordering::Relaxed),
        refused: sh.refused.load(Ordering::Relaxed),
        acks: sh.acks.load(Ordering::Relaxed),
        fsync_ceiling,
        resumes: sh.resumes.load(Ordering::Relaxed),
        transcripts: sh.transcripts.load(Ordering::Relaxed),
        images: sh.images.load(Ordering::Relaxed),
        messages: sh.messages.load(Ordering::Relaxed),
        bytes_sent: sh.bytes_sent.load(Ordering::Relaxed),
        bytes_acked: sh.bytes_acked.load(Ordering::Relaxed),
        ack: sh.ack.line(),
        ack_p50_ms: sh.ack.quantile_ms(0.5),
        ack_p99_ms: sh.ack.quantile_ms(0.99),
        ack_max_ms: sh.ack.max_ms(),
        open: sh.open.line(),
        commit: sh.commit.line(),
        put: sh.put.line(),
        commit_drain: sh.commit_drain.line(),
        put_drain: sh.put_drain.line(),
        lag: sh.lag.line(),
        server_cpu_secs: idle.zip(after).map(|(i, a)| a.cpu_secs - i.cpu_secs),
        server_idle_rss: idle.map(|s| s.rss),
        server_peak_rss: peak,
        server_hwm: after.map(|s| s.hwm),
        server_peak_threads: peak_threads,
        loadgen_cpu_secs: me.zip(me_after).map(|(i, a)| a.cpu_secs - i.cpu_secs),
        errors: std::mem::take(&mut *sh.errors.lock().unwrap_or_else(|p| p.into_inner())),
        verified,
        mismatched,
    })
}

// ---------------------------------------------------------------- memory --

/// Streams `size` bytes of audio as one upload, as fast as the server takes
/// them; returns the committed object and (with a sampler) the peak RSS
/// until every byte was acknowledged, before the commit began.
async fn ingest_bulk(
    client: &mut Client,
    seed: u64,
    size: u64,
    chunk: u64,
    sha256: [u8; 32],
    sampler: Option<&RssSampler>,
) -> anyhow::Result<(pb::ObjectInfo, u64)> {
    ingest_bulk_with(client, seed, size, chunk, sha256, sampler, || {}).await
}

/// SHA-256 of the bytes [`bulk_pieces`] makes. The callers hash before
/// they upload, not while sending: a timed upload then measures the
/// server, not the generator's hashing on the same cores (the peers hash
/// nothing).
fn bulk_sha256(seed: u64, size: u64, chunk: u64) -> [u8; 32] {
    let mut hash = digest::Context::new(&digest::SHA256);
    for piece in bulk_pieces(seed, size, chunk) {
        hash.update(&piece);
    }
    hash.finish().as_ref().try_into().expect("32 bytes")
}

/// `sha256`: [`bulk_sha256`] of the same bytes, sent with the finish and
/// checked against the committed object.
async fn ingest_bulk_with(
    client: &mut Client,
    seed: u64,
    size: u64,
    chunk: u64,
    sha256: [u8; 32],
    sampler: Option<&RssSampler>,
    mut on_all_acked: impl FnMut(),
) -> anyhow::Result<(pb::ObjectInfo, u64)> {
    use pb::ingest_request::{Data, Finish, Msg, Open};
    let (tx, rx) = mpsc::channel::<pb::IngestRequest>(4);
    let spec = pb::ObjectSpec {
        customer_id: "lg-bulk".into(),
        kind: pb::ContentKind::CallRecording as i32,
        content_type: "audio/pcmu".into(),
        interaction: None,
        sensitive_spans: Vec::new(),
    };
    let upload_id = fresh_upload_id();
    tx.send(pb::IngestRequest { msg: Some(Msg::Open(Open { upload_id, spec: Some(spec) })) }).await?;
    let mut resp = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    // A fixed random block, its first 8 bytes replaced by the chunk index,
    // so every chunk differs without generating gigabytes of noise.
    let sender = tokio::spawn(async move {
        let mut offset = 0u64;
        for piece in bulk_pieces(seed, size, chunk) {
            let n = piece.len() as u64;
            let data = Data { offset, data: piece };
            if tx.send(pb::IngestRequest { msg: Some(Msg::Data(data)) }).await.is_err() {
                break;
            }
            offset += n;
        }
        let finish = Finish { expected_sha256: Bytes::copy_from_slice(&sha256), expected_size: size };
        let _ = tx.send(pb::IngestRequest { msg: Some(Msg::Finish(finish)) }).await;
    });
    let mut streaming_peak = 0;
    let info = loop {
        match resp.message().await?.and_then(|m| m.msg) {
            Some(ServerMsg::Committed(info)) => break info,
            Some(ServerMsg::Ack(a)) if a.durable_offset == size => {
                on_all_acked();
                streaming_peak = sampler.map_or(0, RssSampler::take_peak);
            }
            Some(_) => {}
            None => bail!("the ingest stream ended before the commit"),
        }
    };
    sender.await?;
    anyhow::ensure!(info.sha256[..] == sha256 && info.size == size, "the committed object differs from what was sent");
    Ok((info, streaming_peak))
}

/// Reads an object (or a range) and returns its bytes' count and SHA-256,
/// keeping up to `keep` bytes.
async fn read_object(
    client: &mut Client,
    object_id: &str,
    range: Option<pb::ByteRange>,
    keep: usize,
) -> anyhow::Result<(u64, [u8; 32], Vec<u8>)> {
    let mut stream = client
        .get(pb::GetRequest { object_id: object_id.into(), range, purpose: pb::Purpose::QualityReview as i32 })
        .await?
        .into_inner();
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut n = 0u64;
    let mut kept = Vec::new();
    while let Some(m) = stream.message().await? {
        hash.update(&m.data);
        n += m.data.len() as u64;
        if kept.len() < keep {
            let take = (keep - kept.len()).min(m.data.len());
            kept.extend_from_slice(&m.data[..take]);
        }
    }
    Ok((n, hash.finish().as_ref().try_into().expect("32 bytes"), kept))
}

async fn memory(a: &MemoryArgs) -> anyhow::Result<()> {
    let target = Target::open(&a.target).await?;
    let pid = target.pid.context("memory needs the server's process id: start it here or pass --server-pid")?;
    let mut client = target.clients().await?.remove(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = proc_sample(pid).context("cannot read the server's /proc entry")?;
    let sampler = RssSampler::start(pid, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(100)).await;
    sampler.take_peak();
    let chunk = a.chunk.clamp(1, 1 << 20);
    let sha = bulk_sha256(a.target.seed, a.size, chunk);
    let t = Instant::now();
    let (info, streaming_peak) = ingest_bulk(&mut client, a.target.seed, a.size, chunk, sha, Some(&sampler)).await?;
    let ingest_secs = t.elapsed().as_secs_f64();
    let commit_peak = sampler.take_peak();
    let spool = target.data_dir().map(|d| dir_size(&d.join("spool")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_read = proc_sample(pid).context("cannot read the server's /proc entry")?;
    sampler.take_peak();
    let t = Instant::now();
    let (n, read_sha, _) = read_object(&mut client, &info.object_id, None, 0).await?;
    let read_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let read_peak = sampler.take_peak();
    anyhow::ensure!(n == a.size && read_sha == sha, "the object read back differs from what was sent");
    let end = proc_sample(pid).context("cannot read the server's /proc entry")?;
    let over = |b: u64| mib(b.saturating_sub(idle.rss));
    println!("loadgen memory: one {:.0} MiB call recording in {} KiB messages", mib(a.size), a.chunk >> 10);
    println!("  server RSS idle                        {:7.1} MiB", mib(idle.rss));
    println!(
        "  peak while streaming (until all acked) {:7.1} MiB  (+{:.1} MiB over idle)",
        mib(streaming_peak),
        over(streaming_peak)
    );
    if commit_peak == 0 {
        // The commit (last segment, publish, catalog row) ended between two
        // samples; VmHWM below still covers it.
        println!(
            "  peak while committing (journal->object)  none sampled (under 20 ms)  ingest+commit {:.1} s, {:.3} GB/s",
            ingest_secs,
            a.size as f64 / ingest_secs / 1e9
        );
    } else {
        println!(
            "  peak while committing (journal->object){:7.1} MiB  (+{:.1} MiB over idle)  ingest+commit {:.1} s, {:.3} GB/s",
            mib(commit_peak),
            over(commit_peak),
            ingest_secs,
            a.size as f64 / ingest_secs / 1e9
        );
    }
    println!(
        "  RSS after the commit, before the read  {:7.1} MiB  (+{:.1} MiB over idle)",
        mib(before_read.rss),
        over(before_read.rss)
    );
    println!(
        "  peak while reading it back             {:7.1} MiB  (+{:.1} MiB over idle)  {:.1} s, {:.2} GB/s",
        mib(read_peak),
        over(read_peak),
        read_secs,
        a.size as f64 / read_secs / 1e9
    );
    println!(
        "  VmHWM at the end                       {:7.1} MiB  (+{:.1} MiB over idle)",
        mib(end.hwm),
        over(end.hwm)
    );
    if let Some(s) = spool {
        println!("  spool left after commit                {:7.1} MiB", mib(s));
    }
    println!("  SHA-256 of the object read back matches what was sent");
    Ok(())
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

// ------------------------------------------------------------------ bulk --

/// The bytes `ingest_bulk` sends, piece by piece, so a peer can write the
/// very same object.
fn bulk_pieces(seed: u64, size: u64, chunk: u64) -> impl Iterator<Item = Bytes> {
    let block = audio(seed, 0, chunk).to_vec();
    (0..size.div_ceil(chunk)).map(move |i| {
        let n = chunk.min(size - i * chunk);
        let mut piece = block[..n as usize].to_vec();
        let tag = i.to_le_bytes();
        let k = piece.len().min(8);
        piece[..k].copy_from_slice(&tag[..k]);
        Bytes::from(piece)
    })
}

/// Writes the bulk object without recvault: a multipart PUT with the
/// service's own part size and client settings, or a file and its fsync.
async fn bulk_peer(
    bucket: Option<&Arc<dyn object_store::ObjectStore>>,
    dir: &std::path::Path,
    a: &BulkArgs,
) -> anyhow::Result<Duration> {
    use object_store::ObjectStoreExt;
    let t = Instant::now();
    match bucket {
        Some(s3) => {
            let path = object_store::path::Path::from(format!("loadgen-raw/{}", uuid::Uuid::new_v4()));
            let upload = s3.put_multipart(&path).await?;
            let mut mp = object_store::WriteMultipart::new_with_chunk_size(upload, crate::store::PART_SIZE);
            for piece in bulk_pieces(a.target.seed, a.size, a.chunk) {
                mp.wait_for_capacity(2).await?;
                mp.write(&piece);
            }
            mp.finish().await?;
            let took = t.elapsed();
            s3.delete(&path).await?;
            Ok(took)
        }
        None => {
            use std::io::Write;
            let path = dir.join(format!("loadgen-raw-{}", uuid::Uuid::new_v4()));
            let (seed, size, chunk) = (a.target.seed, a.size, a.chunk);
            let p = path.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&p)?;
                for piece in bulk_pieces(seed, size, chunk) {
                    f.write_all(&piece)?;
                }
                f.sync_all()
            })
            .await??;
            let took = t.elapsed();
            std::fs::remove_file(&path)?;
            Ok(took)
        }
    }
}

async fn bulk(a: &BulkArgs) -> anyhow::Result<()> {
    let config = match &a.target.server_config {
        Some(path) => crate::config::Config::from_file(path)?,
        None => crate::config::Config::default(),
    };
    let s3 = config.storage.s3()?;
    let bucket = s3.as_ref().map(crate::store::s3_client).transpose().map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = Target::open(&a.target).await?;
    let mut client = target.clients().await?.remove(0);
    let chunk = a.chunk.clamp(1, 1 << 20);
    let peer_dir = target.data_dir().map_or_else(|| a.target.work_dir.clone(), |d| d.to_owned());
    let (sink, sink_url) = start_sink().await?;
    let mut sink_client = connect(&sink_url, "none").await?;
    let (mut peer, mut sunk, mut acked, mut committed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let sha = bulk_sha256(a.target.seed, a.size, chunk);
    let mut cpu = BulkCpu::default();
    // Alternating rounds, so a drift in the machine's load hits every side.
    for _ in 0..a.rounds.max(1) {
        peer.push(bulk_peer(bucket.as_ref(), &peer_dir, a).await?);
        let (t, before) = (Instant::now(), cpu_of(Some(sink.pid())));
        ingest_bulk_timed(&mut sink_client, a.target.seed, a.size, chunk, sha, t).await?;
        sunk.push(t.elapsed());
        cpu.sink += cpu_of(Some(sink.pid())) - before;
        let (t, before) = (Instant::now(), cpu_of(target.pid));
        let all_acked = ingest_bulk_timed(&mut client, a.target.seed, a.size, chunk, sha, t).await?;
        committed.push(t.elapsed());
        acked.push(all_acked);
        cpu.server += cpu_of(target.pid) - before;
    }
    for v in [&mut peer, &mut sunk, &mut acked, &mut committed] {
        v.sort();
    }
    let median = |v: &[Duration]| v[v.len() / 2];
    let gbps = |d: Duration| a.size as f64 / d.as_secs_f64() / 1e9;
    let place = match &s3 {
        Some(s) => format!("S3 bucket {:?} at {}", s.bucket, s.endpoint.as_deref().unwrap_or("Amazon S3")),
        None => "local files".to_owned(),
    };
    let peer_name =
        if s3.is_some() { "raw multipart PUT of the same bytes" } else { "the same bytes to a file + fsync" };
    println!(
        "loadgen bulk: one {:.0} MiB recording in {} KiB messages into {place}, {} rounds",
        mib(a.size),
        chunk >> 10,
        a.rounds.max(1)
    );
    println!("  {:<52} {:>9} {:>9} {:>8} {:>8}", "", "best", "median", "vs (a)", "vs (b)");
    let row = |name: &str, v: &[Duration]| {
        println!(
            "  {:<52} {:>7.2} s {:>7.2} s {:>6.2} x {:>6.2} x   ({:.3} GB/s median)",
            name,
            v[0].as_secs_f64(),
            median(v).as_secs_f64(),
            median(&peer).as_secs_f64() / median(v).as_secs_f64(),
            median(&sunk).as_secs_f64() / median(v).as_secs_f64(),
            gbps(median(v))
        )
    };
    row(&format!("(a) peer: {peer_name}"), &peer);
    row("(b) peer: the same stream into a discarding gRPC sink", &sunk);
    row("recvault: every byte durable and acknowledged", &acked);
    row("recvault: object committed in storage", &committed);
    let per_gib = |secs: f64| secs / a.rounds.max(1) as f64 / (a.size as f64 / f64::from(1u32 << 30));
    println!(
        "  CPU per GiB received (user + system): the sink {:.2} s, the recvault server {:.2} s{}",
        per_gib(cpu.sink),
        per_gib(cpu.server),
        if target.pid.is_some() { "" } else { " (no --server-pid: not measured)" }
    );
    println!("  SHA-256 of every committed object matches what was sent");
    Ok(())
}

/// CPU seconds the sink and the server spent on their rounds of `bulk`.
#[derive(Debug, Default)]
struct BulkCpu {
    sink: f64,
    server: f64,
}

/// CPU seconds used so far by `pid` (0 when unknown or gone).
fn cpu_of(pid: Option<u32>) -> f64 {
    pid.and_then(proc_sample).map_or(0.0, |p| p.cpu_secs)
}

/// [`ingest_bulk`], returning when the last byte was acknowledged (the
/// commit's time is the caller's once this returns).
async fn ingest_bulk_timed(
    client: &mut Client,
    seed: u64,
    size: u64,
    chunk: u64,
    sha256: [u8; 32],
    start: Instant,
) -> anyhow::Result<Duration> {
    let mut acked = None;
    ingest_bulk_with(client, seed, size, chunk, sha256, None, || {
        acked.get_or_insert(start.elapsed());
    })
    .await?;
    Ok(acked.unwrap_or_else(|| start.elapsed()))
}

// ------------------------------------------------------------------ seek --

async fn seek(a: &SeekArgs) -> anyhow::Result<()> {
    let target = Target::open(&a.target).await?;
    let mut client = target.clients().await?.remove(0);
    let size = a.secs * G711_BYTES_PER_SEC;
    let seed = a.target.seed;
    // The recording: `audio(seed, ..)` throughout, so any range can be
    // checked against what was sent.
    let (tx, rx) = mpsc::channel::<pb::IngestRequest>(4);
    {
        use pb::ingest_request::{Data, Finish, Msg, Open};
        let spec = pb::ObjectSpec {
            customer_id: "lg-seek".into(),
            kind: pb::ContentKind::CallRecording as i32,
            content_type: "audio/pcmu".into(),
            interaction: None,
            sensitive_spans: Vec::new(),
        };
        let upload_id = fresh_upload_id();
        tx.send(pb::IngestRequest { msg: Some(Msg::Open(Open { upload_id, spec: Some(spec) })) }).await?;
        tokio::spawn(async move {
            let mut offset = 0;
            while offset < size {
                let n = (size - offset).min(1 << 20);
                let data = Data { offset, data: audio(seed, offset, n) };
                if tx.send(pb::IngestRequest { msg: Some(Msg::Data(data)) }).await.is_err() {
                    return;
                }
                offset += n;
            }
            let _ = tx.send(pb::IngestRequest { msg: Some(Msg::Finish(Finish::default())) }).await;
        });
    }
    let mut resp = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    let info = loop {
        match resp.message().await?.and_then(|m| m.msg) {
            Some(ServerMsg::Committed(info)) => break info,
            Some(_) => {}
            None => bail!("the ingest stream ended before the commit"),
        }
    };
    anyhow::ensure!(info.size == size && info.sha256[..] == sha256(&audio(seed, 0, size)), "committed object differs");

    let mut rng = Rng::new(mix(seed ^ 0x5EE4));
    let ranges = Histogram::default();
    let mut two_segments = 0;
    let seg = u64::from(crate::crypto::format::DEFAULT_SEGMENT_SIZE);
    for _ in 0..a.reads {
        let start = rng.between(size / 4, size * 3 / 4 - a.range);
        let end = start + a.range - 1;
        if end / seg > start / seg {
            two_segments += 1;
        }
        let t = Instant::now();
        let (n, _, got) =
            read_object(&mut client, &info.object_id, Some(pb::ByteRange { start, end: Some(end) }), a.range as usize)
                .await?;
        ranges.record(t.elapsed());
        anyhow::ensure!(
            n == a.range && got == audio(seed, start, a.range),
            "range {start}-{end} read back wrong bytes"
        );
    }
    // The fixed cost of any read (authorization, catalog, the fsynced audit
    // record that precedes content): 1-byte reads, one segment each.
    let tiny = Histogram::default();
    for _ in 0..(a.reads / 4).max(1) {
        let start = rng.between(size / 4, size * 3 / 4);
        let t = Instant::now();
        let (n, _, got) =
            read_object(&mut client, &info.object_id, Some(pb::ByteRange { start, end: Some(start) }), 1).await?;
        tiny.record(t.elapsed());
        anyhow::ensure!(n == 1 && got == audio(seed, start, 1), "byte {start} read back wrong");
    }
    let full = Histogram::default();
    for _ in 0..a.full_reads {
        let t = Instant::now();
        let (n, _, _) = read_object(&mut client, &info.object_id, None, 0).await?;
        full.record(t.elapsed());
        anyhow::ensure!(n == size, "full read returned {n} bytes");
    }
    println!(
        "loadgen seek: {} s G.711 recording ({:.1} MB, {} segments of {} KiB)",
        a.secs,
        size as f64 / 1e6,
        size.div_ceil(seg),
        seg >> 10
    );
    println!(
        "  {} KiB range reads in the middle half ({} of {} span two segments): {}",
        a.range >> 10,
        two_segments,
        a.reads,
        ranges.line()
    );
    println!("  1-byte reads, one segment (fixed cost of a read): {}", tiny.line());
    println!("  full reads of the same object (peer): {}", full.line());
    println!(
        "  full / range at p50: {:.1} x   ({:.2} GB/s full read)",
        full.quantile_ms(0.5) / ranges.quantile_ms(0.5).max(0.001),
        size as f64 / (full.quantile_ms(0.5) / 1000.0) / 1e9
    );
    Ok(())
}

// ------------------------------------------------------------ arguments --

/// `MIN-MAX` or a single value.
pub fn parse_min_max(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: u64 = lo.trim().parse().map_err(|_| format!("{s:?}: expected MIN-MAX"))?;
    let hi: u64 = hi.trim().parse().map_err(|_| format!("{s:?}: expected MIN-MAX"))?;
    if lo > hi || lo == 0 {
        return Err(format!("{s:?}: expected 0 < MIN <= MAX"));
    }
    Ok((lo, hi))
}

/// A byte count: `65536`, `64K`, `64KiB`, `1M`, `4GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits].parse().map_err(|_| format!("{s:?}: expected a size like 64KiB or 4GiB"))?;
    let shift = match t[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(format!("{s:?}: expected a size like 64KiB or 4GiB")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn audio_is_a_function_of_offset() {
        let whole = audio(7, 0, 1000);
        for (start, len) in [(0, 1000), (3, 5), (8, 8), (13, 987), (999, 1)] {
            assert_eq!(audio(7, start, len), whole.slice(start as usize..(start + len) as usize), "{start}+{len}");
        }
        assert_ne!(audio(8, 0, 64), whole.slice(..64));
    }

    #[test]
    fn histogram_quantiles() {
        let h = Histogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        // Quantiles are the upper edge of their 0.1 ms bucket.
        assert_eq!(h.quantile_ms(0.5), 50.1);
        assert_eq!(h.quantile_ms(0.99), 99.1);
        assert_eq!(h.max_ms(), 100.0);
        assert_eq!(Histogram::default().quantile_ms(0.5), 0.0);
    }

    #[test]
    fn arguments() {
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("4 parsecs").is_err());
        assert_eq!(parse_min_max("20-200"), Ok((20, 200)));
        assert_eq!(parse_min_max("50"), Ok((50, 50)));
        assert!(parse_min_max("200-20").is_err());
    }

    /// A process whose first line cannot be read (not UTF-8 here) is
    /// killed and its directory removed, not left running.
    #[tokio::test]
    async fn a_process_that_does_not_announce_itself_is_not_left_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let pid_file = tmp.path().join("pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("echo $$ > {}; printf '\\377\\n'; exec sleep 600", pid_file.display()));
        let err = Started::spawn(cmd, Some(dir.clone()), "listening on ").await.err().expect("no announcement");
        assert!(format!("{err:#}").contains("cannot read the first line of sh"), "{err:#}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists(), "process {} still exists", pid.trim());
        assert!(!dir.exists(), "its directory was removed");
    }

    #[test]
    fn proc_sample_reads_this_process() {
        let s = proc_sample(std::process::id()).expect("/proc of this process");
        assert!(s.rss > 0 && s.hwm >= s.rss && s.threads >= 1);
    }
}
