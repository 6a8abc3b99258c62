//! `recvault` binary: see `recvault --help`.

use clap::Parser;

// At thousands of live calls glibc malloc's arena searches (`_int_malloc`)
// were 5 % of the machine's CPU; mimalloc's thread-local free lists halved
// the ack p50 at 3 000 calls (BENCHMARKS.md, "Concurrent live calls").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = recvault::cli::Cli::parse();
    // Crash tests set failpoints through FAILPOINTS; absent from release
    // builds (the `failpoints` feature is off).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // `FAILPOINTS=name=panic` stops the whole process at that point, as
    // `kill -9` would (no destructor, no flush), instead of unwinding one
    // task: the crash tests (tests/it/crash.rs) need the process gone.
    #[cfg(feature = "failpoints")]
    {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or("");
            if text.starts_with("failpoint ") {
                eprintln!("recvault: {text}: aborting (crash test)");
                std::process::abort();
            }
            default(info);
        }));
    }
    // `serve` reads its configuration before logging starts: the config
    // chooses the log format.
    let serve_config = match &cli.command {
        recvault::cli::Command::Serve(a) => match a.resolve() {
            Ok(loaded) => Some(loaded.config),
            Err(e) => return fail(e),
        },
        _ => None,
    };
    // Logs go to stderr; stdout carries results only.
    match &serve_config {
        Some(cfg) => recvault::cli::init_logging(cfg.log.format, "info"),
        None => recvault::cli::init_logging(recvault::config::LogFormat::Text, "warn"),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(cfg) = &serve_config {
        builder.max_blocking_threads(cfg.blocking_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("recvault: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match serve_config {
            Some(cfg) => recvault::cli::serve(cfg).await,
            None => recvault::cli::run(cli).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// One line on stderr: the error and its causes.
fn fail(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("recvault: {}", format!("{e:#}").replace('\n', " "));
    std::process::ExitCode::FAILURE
}
