//! The webhook HTTP API (axum): `POST /v1/precall`, `GET`/`DELETE
//! /v1/precall/{agentId}/{phoneNumber}`, `POST /v1/precall/test`, `/healthz`, `/readyz`.
//!
//! SKELETON: to be implemented.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::agent::Agents;
use crate::store::Contexts;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub agents: Arc<Agents>,
    pub contexts: Arc<Contexts>,
    /// Set once every SIP listener is bound.
    pub sip_ready: Arc<AtomicBool>,
}

/// The API router.
pub fn router(_state: AppState) -> axum::Router {
    todo!()
}
