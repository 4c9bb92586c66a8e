//! Which agent a call is for and who is calling (DESIGN.md "Which agent", "Who calls").
//! Pure: takes header values as strings, returns decisions.
//!
//! SKELETON: signatures are the contract; bodies to be implemented.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{AgentConfig, CallerSource, Config};
use crate::number::E164;

/// Agents indexed by called number, built once per config.
#[derive(Debug, Clone)]
pub struct Agents {
    pub config: Arc<Config>,
    /// normalised called number → index in `config.agents` (first agent listing it wins).
    by_number: HashMap<String, usize>,
    default_agent: Option<usize>,
}

impl Agents {
    pub fn new(_config: Arc<Config>) -> Agents {
        todo!()
    }

    pub fn by_id(&self, id: &str) -> Option<&AgentConfig> {
        self.config.agent(id)
    }

    /// The agent for a called user part (Request-URI user, else To user): the first agent
    /// listing the normalised number, else `sip.default_agent`, else `None` (→ 404).
    pub fn for_called(&self, _called_user: Option<&str>) -> Option<&AgentConfig> {
        let _ = (&self.by_number, &self.default_agent);
        todo!()
    }
}

/// The caller's number from the agent's `caller_sources`, in order: P-Asserted-Identity
/// only when `peer_trusted`; normalised with the agent's region (digits only where that
/// fails). `None` when no source yields digits.
pub fn caller_number(
    _sources: &[CallerSource],
    _pai: Option<&str>,
    _from: Option<&str>,
    _peer_trusted: bool,
    _region: phonenumber::country::Id,
) -> Option<E164> {
    todo!()
}

/// Whether `ip` is within `sip.trusted_peers`.
pub fn is_trusted(config: &Config, ip: IpAddr) -> bool {
    config.sip.trusted_peers.iter().any(|net| net.contains(&ip))
}
