//! The command line (clap): `run`, `check`, `curl`, `send`.
//!
//! SKELETON: `check`, `curl` and `send` to be implemented; `run` is wired in `app`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "precall", version, about = "SIP-side pre-call webhook sidecar for voice agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "config/precall.toml")]
        config: PathBuf,
        /// Log format: `text` or `json`.
        #[arg(long, default_value = "text")]
        log_format: String,
    },
    /// Validate a config and print the resolved agents; exit 1 naming each problem.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print a ready-to-paste curl command for an agent's webhook ("Copy cURL").
    Curl {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        phone: Option<String>,
    },
    /// Send a test webhook; print the answer and the headers a call would now receive.
    Send {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        phone: String,
        /// Extra context fields, `key=value` (repeatable).
        #[arg(long = "field", value_name = "KEY=VALUE")]
        fields: Vec<String>,
    },
}
