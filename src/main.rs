//! `precall`: thin entry point. Parses the command line, sets up logging, and hands over to
//! `app` (run) or `cli` (check, curl, send). `anyhow` lives here and in `cli` only.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use precall::cli::{Cli, Command};
use precall::config::Config;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run { log_format, .. } => log_format.as_str(),
        _ => "text",
    };
    init_tracing(log_format);
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("precall: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, .. } => {
            let cfg =
                Config::load(&config).with_context(|| format!("config {}", config.display()))?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                precall::app::run(cfg, shutdown).await
            })?;
            Ok(())
        }
        Command::Check { config } => precall::cli::check(&config),
        Command::Curl {
            config,
            agent,
            phone,
        } => precall::cli::curl(&config, &agent, phone.as_deref()),
        Command::Send {
            config,
            agent,
            phone,
            fields,
        } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(precall::cli::send(&config, &agent, &phone, &fields))
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM or SIGINT cancels the token: the listeners stop and `run` returns.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("signal received, stopping");
    token.cancel();
}
