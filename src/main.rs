//! `precall`: thin entry point. Parses the command line, sets up logging, and hands over to
//! `app` (run) or `cli` (check, curl, send). `anyhow` lives here and in `cli` only.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use precall::app::Signals;
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
        Command::Run {
            config, pid_file, ..
        } => {
            let cfg =
                Config::load(&config).with_context(|| format!("config {}", config.display()))?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            if let Some(pid_file) = &pid_file {
                std::fs::write(pid_file, format!("{}\n", std::process::id()))
                    .with_context(|| format!("writing {}", pid_file.display()))?;
            }
            let result = runtime.block_on(async {
                let signals = listen_for_signals()?;
                precall::app::run(config, cfg, signals).await?;
                anyhow::Ok(())
            });
            if let Some(pid_file) = &pid_file {
                let _ = std::fs::remove_file(pid_file);
            }
            result
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
        Command::Reload { pid_file } => precall::cli::reload(&pid_file),
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: files and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM/SIGINT: the first drains, the second stops at once; SIGHUP reloads.
fn listen_for_signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let drain = CancellationToken::new();
    let stop_now = CancellationToken::new();
    let (reload_tx, reload) = tokio::sync::mpsc::channel(4);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (d, s) = (drain.clone(), stop_now.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if d.is_cancelled() {
                tracing::warn!("second signal: stopping at once");
                s.cancel();
                return;
            }
            tracing::info!("signal received: draining");
            d.cancel();
        }
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            if reload_tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(Signals {
        drain,
        stop_now,
        reload,
    })
}
