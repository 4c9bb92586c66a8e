//! The webhook HTTP API (axum): `POST /v1/precall`, `GET`/`DELETE
//! /v1/precall/{agentId}/{phoneNumber}`, `POST /v1/precall/test`, `/healthz`, `/readyz`,
//! `/metrics` (Prometheus text), and the status page under `/ui/` when
//! `http.admin_password` is set ([`ui`]).
//! The contract is DESIGN.md "Webhook API"; every error is `{"error": "..."}` ([`ApiError`]).
//!
//! # Order of checks
//! `POST /v1/precall` and `POST /v1/precall/test`, first failure wins:
//! 1. `415` Content-Type is not `application/json` (parameters such as `charset` allowed).
//! 2. `401` no key (`missing API key`) or a key of no agent (`invalid API key`). Headers
//!    only: a client without a valid key gets nothing more, not even whether the agent it
//!    names exists, and we never read its body.
//! 3. `429` over `http.rate_limit_per_sec` for this key, with `Retry-After`.
//! 4. `413` body over `http.max_body_bytes` (a declared Content-Length is refused unread).
//! 5. `401` the key's agent has a `webhook_secret` and `X-Precall-Signature` is missing,
//!    malformed, more than 300 s old or new, or does not match ([`signature`]). Checked on
//!    the raw bytes before they are parsed.
//! 6. `400` body not JSON, not an object, `agentId` / `phoneNumber` missing or not a string.
//! 7. `404` `agentId` names no agent; `401` the key is valid but belongs to another agent.
//! 8. `422` `phoneNumber` does not parse as a phone number (the agent's `default_region`).
//! 9. Only then the store: `202` (or `200` for `/test`, which stores nothing and answers
//!    the route the agent's rules pick for the payload and the headers a call would get); `503` `store unavailable` when the store fails, cause only logged;
//!    `503` `context store full` (with `Retry-After`) when `store.max_contexts` is reached
//!    and the key is new.
//!
//! `GET` and `DELETE /v1/precall/{agentId}/{phoneNumber}`: `400` undecodable path, `401`
//! key, `429` rate, `404`/`401` agent, `422` number, then the store. The number in the path is
//! normalised like the body's; encode `+` as `%2B` or leave it literal (a `+` in a path is
//! a plus, not a space). `GET` answers `404` when nothing is cached; `DELETE` answers `204`
//! whether or not something was, so a retry sees the same result.
//!
//! Anything else: `404` unknown path, `405` known path with another method (with `Allow`).
//! Nothing is cached on any error, since the store is the last step.
//!
//! The webhook log line carries the agent and the number, never the key or a context value.

mod auth;
mod error;
mod handlers;
mod observe;
pub mod ratelimit;
#[cfg(test)]
mod security_tests;
pub mod signature;
#[cfg(test)]
mod tests;
pub mod ui;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::agent::Agents;
use crate::metrics::CallLog;
use crate::store::Contexts;

pub use auth::API_KEY_HEADER;
pub use error::ApiError;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub agents: Arc<Agents>,
    pub contexts: Arc<Contexts>,
    /// Set once every SIP listener is bound.
    pub sip_ready: Arc<AtomicBool>,
    /// `http.rate_limit_per_sec` per API key.
    pub limiter: Arc<ratelimit::KeyLimiter>,
    /// Metrics and the status page's view of the SIP side.
    pub ops: Ops,
}

/// What `/metrics` and `/ui/` read.
#[derive(Clone, Default)]
pub struct Ops {
    /// The installed Prometheus recorder; `None`: `/metrics` answers 503.
    pub metrics: Option<PrometheusHandle>,
    /// Held calls and finished calls, published by the SIP core.
    pub call_log: Arc<CallLog>,
}

/// The API router.
pub fn router(state: AppState) -> axum::Router {
    let counted = axum::middleware::from_fn_with_state(state.clone(), observe::count_webhook);
    let router = axum::Router::new()
        .route("/v1/precall", post(handlers::post_precall).layer(counted))
        .route("/v1/precall/test", post(handlers::test_precall))
        .route(
            "/v1/precall/{agent_id}/{phone_number}",
            get(handlers::get_precall).delete(handlers::delete_precall),
        )
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(observe::metrics_text));
    // No admin password, no status page: its paths are unknown (404).
    let router = match state.agents.config.http.admin_password {
        Some(_) => router.merge(ui::router(state.clone())),
        None => router,
    };
    router
        // Applies to the routes above, so it must come after them.
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found)
        .with_state(state)
}
