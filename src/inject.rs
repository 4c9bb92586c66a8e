//! Context → `X-Precall-*` header lines (RFC 3261 §25.1 grammar): field names made SIP
//! tokens, values cleaned of CR/LF/control characters, the total bounded by `max_bytes`.
//! Pure: no IO.
//!
//! SKELETON: signatures are the contract; bodies to be implemented.

use std::fmt;

use serde_json::{Map, Value};

use crate::config::InjectConfig;

/// How the context of a call was settled; sent as `X-Precall-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Context was cached when the INVITE arrived.
    Hit,
    /// The call was held and the webhook landed in time.
    Waited,
    /// No context in time (or no caller number): the agent's defaults.
    Fallback,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Waited => "waited",
            Status::Fallback => "fallback",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The context a call gets: the agent's defaults overlaid by the posted context
/// (posted fields win; fields only in the defaults are kept).
pub fn effective_context(_defaults: &Map<String, Value>, _context: Option<&Map<String, Value>>) -> Map<String, Value> {
    todo!()
}

/// The header (name, value) pairs a call gets, in order: context fields (within
/// `max_bytes`), then `{prefix}Status`, `{prefix}Wait-Ms`, and `{prefix}Truncated: true`
/// when fields were dropped.
pub fn header_pairs(_cfg: &InjectConfig, _status: Status, _wait_ms: u64, _context: &Map<String, Value>) -> Vec<(String, String)> {
    todo!()
}

/// [`header_pairs`] rendered as CRLF-terminated header lines ready to splice into a message.
pub fn render_headers(cfg: &InjectConfig, status: Status, wait_ms: u64, context: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in header_pairs(cfg, status, wait_ms, context) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}
