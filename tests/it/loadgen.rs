//! Smoke run of `recvault loadgen calls` against the real binary: a few
//! short calls with dropped-and-resumed streams, transcripts and images.
//! Asserts what must hold at any speed (no errors, every committed object
//! verified by SHA-256); never a time. The figures are in BENCHMARKS.md.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use recvault::loadgen::{Against, CallsArgs, TargetArgs, calls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_smoke_run_commits_and_verifies_every_object() {
    let work = tempfile::tempdir().expect("tempdir");
    let args = CallsArgs {
        target: TargetArgs {
            server: None,
            token: None,
            server_pid: None,
            server_bin: Some(env!("CARGO_BIN_EXE_recvault").into()),
            server_config: None,
            work_dir: work.path().to_owned(),
            connections: 2,
            seed: 7,
        },
        calls: 20,
        duration: Duration::from_secs(5),
        ramp: Duration::from_secs(1),
        frame_ms: (20, 200),
        call_secs: (1, 3),
        drop_fraction: 0.3,
        transcript_fraction: 0.5,
        image_fraction: 0.5,
        customers: 10,
        fsync_probe: Duration::from_millis(200),
        against: Against::Server,
    };
    let r = calls(&args).await.expect("the load generator runs");
    assert_eq!(r.errors(), 0, "{r}");
    assert!(r.calls_committed >= 20, "{r}");
    assert!(r.resumes > 0 && r.transcripts > 0 && r.images > 0, "{r}");
    assert_eq!(r.mismatched, 0, "{r}");
    assert_eq!(r.verified, r.committed(), "{r}");
    assert!(r.server_peak_rss.is_some_and(|b| b > 0), "{r}");
    assert!(r.fsync_ceiling.is_some_and(|c| c > 0.0), "{r}");
    // The started server and its data directory are gone.
    let left: Vec<_> = std::fs::read_dir(work.path()).expect("work dir").collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `recvault loadgen calls --against both`: the same short call load into
/// the transport sink, then into recvault, with dropped-and-resumed streams
/// and Puts on both sides. A sink that answered otherwise than the server
/// (a durable offset past what was sent, no Put, no commit) would show as
/// errors in its report; one that acked only at the finish, as fewer acks
/// than calls. Nothing is timed.
#[test]
fn loadgen_calls_against_the_sink_and_the_server() {
    let work = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_recvault");
    let stdout = run_loadgen(
        [
            "calls",
            "--against",
            "both",
            "--calls",
            "12",
            "--duration",
            "4s",
            "--ramp",
            "1s",
            "--call-secs",
            "1-3",
            "--drop-fraction",
            "0.5",
            "--transcript-fraction",
            "0.5",
            "--image-fraction",
            "0.5",
            "--connections",
            "2",
            "--fsync-probe",
            "0s",
            "--seed",
            "3",
            "--server-bin",
            bin,
        ],
        work.path(),
    );
    let (sink, server) = stdout.split_once("\nloadgen calls: ").expect("two reports");
    assert!(sink.starts_with("loadgen calls against the transport sink"), "{stdout}");
    for report in [sink, server] {
        assert!(report.contains("  errors 0\n"), "{stdout}");
        assert!(!report.contains("resumed streams 0 "), "no stream was resumed: {stdout}");
    }
    // Each call is acked at its finish; the sink's timer acks in between.
    assert!(number_after(sink, "  acks ") > number_after(sink, "calls started "), "{stdout}");
    assert!(sink.contains("nothing to verify: the sink keeps nothing"), "{stdout}");
    assert!(server.contains("mismatches 0"), "{stdout}");
    assert!(server.contains("recvault against the transport sink, same load and seed:"), "{stdout}");
}

/// `recvault loadgen bulk` into local files: all three sides run in the
/// same round (the fsync'd file, the gRPC sink started as a process of its
/// own, recvault), the committed object's SHA-256 is checked, and the
/// server, the sink and their files are gone afterwards. Nothing is timed.
#[test]
fn loadgen_bulk_local_runs_the_file_the_sink_and_recvault() {
    let work = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_recvault");
    let stdout =
        run_loadgen(["bulk", "--size", "9MiB", "--chunk", "256KiB", "--rounds", "1", "--server-bin", bin], work.path());
    for row in [
        "(a) peer: the same bytes to a file + fsync",
        "(b) peer: the same stream into a discarding gRPC sink",
        "recvault: every byte durable and acknowledged",
        "recvault: object committed in storage",
        "SHA-256 of every committed object matches",
    ] {
        assert!(stdout.contains(row), "no {row:?} in {stdout}");
    }
}

/// `recvault loadgen bulk` into a real Garage bucket, the real binary as
/// server: runs both sides (raw multipart PUT and the upload through
/// recvault) and checks the committed object's SHA-256. Figures for 1 GiB
/// are in BENCHMARKS.md; nothing here is timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_bulk_into_s3_runs_both_sides() {
    // Garage is started and checked from this async test; loadgen runs as a
    // separate process.
    let Some(garage) = crate::s3::Garage::start("loadgen_bulk_into_s3_runs_both_sides") else { return };
    garage.store(recvault::store::WriteOnce::CheckFirst).await;
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = recvault::config::Config { storage: garage.storage_section(work.path()), ..Default::default() };
    let config = work.path().join("s3.toml");
    std::fs::write(&config, toml::to_string(&cfg).expect("toml")).expect("config");
    let bin = env!("CARGO_BIN_EXE_recvault");
    // Blocking: the server it starts is a child of its own, not of this runtime.
    let args = ["bulk", "--size", "24MiB", "--rounds", "1", "--server-bin", bin, "--server-config"].map(OsStr::new);
    let stdout = run_loadgen(args.into_iter().chain([config.as_os_str()]), &work.path().join("runs"));
    assert!(stdout.contains("peer: raw multipart PUT of the same bytes"), "{stdout}");
    assert!(stdout.contains("(b) peer: the same stream into a discarding gRPC sink"), "{stdout}");
    assert!(stdout.contains("recvault: object committed in storage"), "{stdout}");
    assert!(stdout.contains("SHA-256 of every committed object matches"), "{stdout}");
}

/// Runs `recvault loadgen ARGS --work-dir WORK` to its end and returns what
/// it printed; it must succeed, and leave nothing in `work` (the servers,
/// the sink and their data directories are gone).
fn run_loadgen(args: impl IntoIterator<Item = impl AsRef<OsStr>>, work: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_recvault"))
        .arg("loadgen")
        .args(args)
        .arg("--work-dir")
        .arg(work)
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(work).expect("work dir").collect();
    assert!(left.is_empty(), "{left:?}");
    stdout
}

/// The number that follows `label` in a report.
fn number_after(report: &str, label: &str) -> u64 {
    let rest = &report[report.find(label).unwrap_or_else(|| panic!("no {label:?} in {report}")) + label.len()..];
    rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no number after {label:?}"))
}
