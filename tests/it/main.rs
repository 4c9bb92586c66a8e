//! End-to-end tests of precall: the real binary (`CARGO_BIN_EXE_precall`) started per test
//! with its own port-0 config, driven with raw UDP/TCP SIP endpoints, a hand-written HTTP
//! client for the webhook, and SIPp.
//!
//! Every wait is an event with a timeout (a channel receive, a log line, a child's exit);
//! the few polls (SIPp holding its port, `/readyz`) say why. Every test has its own precall
//! process and ports, so cargo runs them in parallel. `PRECALL_IT_KEEP=1` keeps the temp
//! dirs (configs, SIPp traces) for a look after the run.
//!
//! - [`harness`]: the binary, temp dirs, config, the captured log, HTTP.
//! - [`sipmsg`]: a small SIP reader, independent of precall's parser.
//! - [`uas`]: raw UAS (the agent) and UAC (the carrier) over UDP and TCP.
//! - [`sipp`]: SIPp scenarios from `sipp-scenarios/` as child processes.
//! - [`rig`]: precall + agent + caller in one, and readers for `X-Precall-*` headers.
//! - [`selftest`]: the tools checked against each other, no precall involved.
//! - the rest: the behaviours of issue 2, one module per area; [`redis`]: issue 4, two
//!   nodes sharing a redis-server.

mod harness;
mod raw;
mod rig;
mod sipmsg;
mod sipp;
mod uas;

mod calls;
mod cli;
mod hostile;
mod load;
mod operate;
mod ops;
mod redis;
mod robustness;
mod routing;
mod rules;
mod selftest;
mod sipp_flows;
mod soak;
mod tcp;
mod torture;
mod webhook;
