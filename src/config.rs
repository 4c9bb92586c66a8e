//! TOML → validated [`Config`]. Binds nothing, opens nothing: a bad config fails here,
//! before any socket exists, with errors that name the key and the problem.
//!
//! SKELETON: the validated types below are the contract the rest of the crate codes against.
//! `Config::from_toml_str` / `Config::load` are to be implemented (raw serde structs →
//! validation → these types).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub sip: SipConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    /// In file order: the first agent whose `numbers` match a called number wins.
    pub agents: Vec<AgentConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// As written in a Via header (`SIP/2.0/UDP`).
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
    /// As written in a URI `transport=` parameter.
    pub fn param_name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// One `[sip] listen` entry, e.g. `udp:127.0.0.1:5060`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// Where a caller's number is read from, in order (`caller_sources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerSource {
    /// P-Asserted-Identity, believed only from `sip.trusted_peers`.
    Pai,
    /// The From header.
    From,
}

#[derive(Debug, Clone)]
pub struct SipConfig {
    pub listen: Vec<ListenAddr>,
    /// Peers whose P-Asserted-Identity is believed.
    pub trusted_peers: Vec<IpNet>,
    /// Agent id that takes calls whose called number matches no agent.
    pub default_agent: Option<String>,
    /// Default caller sources for agents that do not set their own. Default `["pai", "from"]`.
    pub caller_sources: Vec<CallerSource>,
    /// Record-Route dialog-creating requests (default true).
    pub record_route: bool,
    /// RFC 3261 T1 (default 500 ms).
    pub t1: Duration,
    /// Largest SIP message accepted, UDP or TCP (default 65535).
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Webhook body limit (`max_body_bytes`, default 16384).
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreBackend {
    Memory,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// `ttl_secs`, default 300.
    pub ttl: Duration,
    /// `consume`, default true: a context is used by one call only.
    pub consume: bool,
}

/// Where an agent's calls go: parsed from `sip:HOST:PORT;transport=udp|tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The URI as written in the config.
    pub uri: String,
    pub transport: Transport,
    /// Resolved once at load time.
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectMode {
    Headers,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub mode: InjectMode,
    /// Header name prefix, default `X-Precall-`; must be a SIP token.
    pub prefix: String,
    /// Upper bound on the bytes of context header lines added (default 1024).
    pub max_bytes: usize,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            mode: InjectMode::Headers,
            prefix: "X-Precall-".to_string(),
            max_bytes: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: String,
    pub api_keys: Vec<String>,
    /// Called numbers this agent serves, normalised to E.164 with `default_region`.
    pub numbers: Vec<String>,
    pub upstream: Upstream,
    pub default_region: phonenumber::country::Id,
    /// `fallback_wait_ms`, default 2000.
    pub fallback_wait: Duration,
    /// Fields used when no context arrived in time (and to fill fields a context lacks).
    pub defaults: Map<String, Value>,
    pub inject: InjectConfig,
    pub caller_sources: Vec<CallerSource>,
}

/// Every problem found in a config file, each naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Parses and validates a TOML document.
    ///
    /// # Errors
    /// Every problem found, each naming its key (`agents[0].upstream: ...`).
    pub fn from_toml_str(_text: &str) -> Result<Config, ConfigError> {
        todo!("config validation")
    }

    /// Reads and validates a config file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Config::from_toml_str`] fails.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{}: {e}", path.display())],
        })?;
        Config::from_toml_str(&text)
    }

    pub fn agent(&self, id: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.id == id)
    }
}
