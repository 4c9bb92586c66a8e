//! `GET /metrics` and the webhook counter (`precall_webhooks_total{agent,code}`).

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
/// store at scrape time (one `len`, not per request).
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.ops.metrics else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response();
    };
    match state.contexts.store.len().await {
        Ok(n) => metrics::gauge!(observe::CONTEXTS).set(n as f64),
        Err(error) => tracing::debug!(%error, "context count unavailable for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}
