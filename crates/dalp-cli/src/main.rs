//! The `dalp` binary: parses the command line and hands over to the commands, which call
//! the libraries. Errors print once, with their causes, and exit non-zero.

mod cli;
mod commands;
mod target;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DALP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // DALP_LOG_FORMAT=json: one JSON object per line, with the request's span (request_id,
    // method, route) on every line logged while serving it — the same request id the audit
    // records carry.
    let logs = if std::env::var("DALP_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed()
    } else {
        // Colours only for a terminal: redirected logs stay plain text.
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed()
    };
    // Store-operation latency for /metrics, whatever the log level.
    let store =
        dalp_app::telemetry::StoreLayer.with_filter(dalp_app::telemetry::store_layer_filter());
    tracing_subscriber::registry().with(logs).with(store).init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
