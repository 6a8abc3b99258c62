//! `recvault` binary: see `recvault --help`.

use clap::Parser;

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
    let serving = matches!(cli.command, recvault::cli::Command::Serve(_));
    // Logs go to stderr; stdout carries results only.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RECVAULT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if serving { "info" } else { "warn" })),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("recvault: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(recvault::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("recvault: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
