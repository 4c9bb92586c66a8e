//! `GET /metrics` and the webhook counter (`precall_webhooks_total{agent,code}`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{auth, AppState};
use crate::metrics as observe;

/// Counts every answer of `POST /v1/precall`, errors included. The agent label is the
/// agent the presented key belongs to (keys are unique per agent), `unknown` without a
/// valid key: never the key, never the `agentId` a client wrote, so no client can add
/// label values.
pub async fn count_webhook(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let agent = auth::authenticate(&state.agents.config, request.headers())
        .ok()
        .and_then(|a| a.agent_index())
        .and_then(|i| state.agents.config.agents.get(i))
        .map_or_else(|| "unknown".to_string(), |a| a.id.clone());
    let response = next.run(request).await;
    metrics::counter!(
        observe::WEBHOOKS,
        "agent" => agent,
        "code" => observe::code_label(response.status().as_u16())
    )
    .increment(1);
    response
}

/// `GET /metrics`: the Prometheus text exposition. The context gauge is read from the
/// store at scrape time (one count, not per request).
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.ops.metrics else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response();
    };
    refresh_contexts_gauge(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Sets `precall_contexts`. A count known without IO (the memory store) is read at once.
/// A remote count (a Redis SCAN) runs on a task of its own, one at a time: a scrape that
/// is abandoned half-way (its client timed out) must not abandon a store request with it
/// (that breaks the Redis connection), and overlapping scrapes must not stack SCANs.
/// While a count runs, other scrapes show the last value.
async fn refresh_contexts_gauge(state: &AppState) {
    if let Some(n) = state.contexts.store.len_now() {
        metrics::gauge!(observe::CONTEXTS).set(n as f64);
        return;
    }
    static COUNTING: AtomicBool = AtomicBool::new(false);
    if COUNTING.swap(true, Ordering::AcqRel) {
        return;
    }
    let store = Arc::clone(&state.contexts.store);
    let count = tokio::spawn(async move {
        let counted = store.len().await;
        COUNTING.store(false, Ordering::Release);
        match counted {
            Ok(n) => metrics::gauge!(observe::CONTEXTS).set(n as f64),
            Err(error) => tracing::debug!(%error, "context count unavailable for /metrics"),
        }
    });
    let _ = count.await;
}
