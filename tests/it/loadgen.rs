//! Smoke run of `recvault loadgen calls` against the real binary: a few
//! short calls with dropped-and-resumed streams, transcripts and images.
//! Asserts what must hold at any speed (no errors, every committed object
//! verified by SHA-256); never a time. The figures are in BENCHMARKS.md.

use std::time::Duration;

use recvault::loadgen::{CallsArgs, TargetArgs, calls};

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
