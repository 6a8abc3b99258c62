//! `recvault` binary: see `recvault --help`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = recvault::cli::Cli::parse();
    // Crash tests set failpoints through FAILPOINTS; absent from release
    // builds (the `failpoints` feature is off).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
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
