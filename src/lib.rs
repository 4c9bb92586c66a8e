//! precall: a SIP-side pre-call webhook sidecar for voice agents.
//!
//! External systems POST caller context to a webhook before the call arrives; precall sits
//! in the SIP path in front of the agent, recognises the caller on the INVITE, holds call
//! setup until that context lands or the agent's fallback wait runs out, and forwards the
//! INVITE with the context attached as `X-Precall-*` headers.
//!
//! # Layout
//! A sans-IO core (no sockets, no clocks: time is passed in) and a thin tokio shell.
//!
//! - [`config`]: TOML → validated [`config::Config`]; binds nothing.
//! - [`number`]: phone numbers → E.164 (`phonenumber`), user parts of `sip:`/`sips:`/`tel:` URIs.
//! - [`agent`]: which agent a call is for, who is calling (pure).
//! - [`inject`]: context → `X-Precall-*` header lines (or one JSON header), sanitised and bounded (pure).
//! - [`route`]: routing rules: CEL expressions over the settled context pick where a call goes (pure).
//! - [`limits`]: keyed token buckets, network lists, scanner names (pure; README "Limits").
//! - [`sip::message`], [`sip::parse`]: zero-copy SIP parser over `bytes::Bytes`, byte-splicing editor.
//! - [`sip::uri`]: the routing-relevant parts of SIP URIs (host, port, transport, lr, tag).
//! - [`sip::transaction`]: RFC 3261 §17 timers and transaction keys (pure).
//! - [`sip::proxy`]: RFC 3261 §16 proxy core: hold, routes, HTTP delivery and look-up requests,
//!   forward with failover, CANCEL, Record-Route, health probes, drain (sans-IO).
//! - [`sip::transport`]: the IO shell: UDP/TCP sockets, the timer, context look-ups and the
//!   outgoing HTTP client driving the proxy core.
//! - [`store`]: the `ContextStore` trait, the in-memory and Redis backends, and the wait
//!   registry (with the cross-node wake for Redis).
//! - [`webhook`]: the axum HTTP API (`/v1/precall`, health).
//! - [`metrics`]: Prometheus metric names and handles, the recent-calls log of the status page.
//! - [`tls`]: rustls (ring) server and client configs from PEM files, the HTTPS listener.
//! - [`app`]: wires config, store, SIP and HTTP together for `precall run`; drain and reload.
//! - [`cli`]: clap commands `run`, `check`, `curl`, `send`, `reload`.

pub mod agent;
pub mod app;
pub mod cli;
pub mod config;
pub mod inject;
pub mod limits;
pub mod metrics;
pub mod number;
pub mod route;
pub mod sip;
pub mod store;
pub mod tls;
pub mod webhook;
