//! The endpoint handlers. Each one runs its checks in the order documented in the
//! module docs of [`super`], and touches the store only after every check passed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use super::auth::{self, Authenticated};
use super::error::ApiError;
use super::{signature, AppState};
use crate::agent::Routing;
use crate::config::{AgentConfig, RouteTarget};
use crate::inject::{self, Status};
use crate::number::{self, E164};
use crate::route::RouteInput;
use crate::store::CallerKey;

/// The body fields that address the context; every other field is the context.
const AGENT_ID: &str = "agentId";
const PHONE_NUMBER: &str = "phoneNumber";

/// `POST /v1/precall`: cache the context and release any call held for it.
pub async fn post_precall(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let posted = validate_post(&state, &headers, body).await?;
    let fields = posted.context.len();
    let published = state
        .contexts
        .publish(&posted.key, Arc::new(posted.context))
        .await?;
    // Agent and number only: never the key, never a context value.
    tracing::info!(
        agent = %posted.agent.id,
        caller = %posted.key.number,
        fields,
        released = published.released,
        stored = published.stored,
        "context accepted"
    );
    let summary = json!({
        "status": "accepted",
        "agentId": posted.agent.id,
        "phoneNumber": posted.key.number.as_str(),
        "fields": fields,
        "released": published.released,
        "stored": published.stored,
        "ttlSecs": state.contexts.ttl.as_secs(),
    });
    Ok((StatusCode::ACCEPTED, Json(summary)).into_response())
}

/// `POST /v1/precall/test`: what a call would get for this payload, caching nothing.
///
/// The call is imagined as a hit (context cached when the INVITE arrives) from the posted
/// number to the agent's first number (`""` when it lists none). Its routing rules are
/// evaluated as a call's would be; the answer's `route` is `null` when none matched, else
/// `{index, name, label, upstream, agent, set}` with `upstream` where the call would go
/// and `agent` the hand-over agent or `null`. The headers are those of the injection
/// config that would apply (the hand-over agent's for `agent = ...`), with the rule's
/// `set` fields over the context and `X-Precall-Route`. `routeErrors` lists the rules
/// whose expression failed on this payload (they do not match). A delivery (`http`,
/// `both`) is not made.
pub async fn test_precall(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let posted = validate_post(&state, &headers, body).await?;
    let answer = dry_run(&state, posted.agent, &posted.key, &posted.context);
    Ok((StatusCode::OK, Json(answer)).into_response())
}

/// The dry run behind `/v1/precall/test` (and the status page's Test form): what a call
/// from `key.number` to `agent` would get with `context` cached.
pub(super) fn dry_run(
    state: &AppState,
    agent: &AgentConfig,
    key: &CallerKey,
    context: &Map<String, Value>,
) -> Value {
    let mut effective = inject::effective_context(&agent.defaults, Some(context));
    let called = agent.numbers.first().map_or("", String::as_str);
    let routing = match state.agents.index_of(&agent.id) {
        Some(index) => state.agents.route(
            index,
            &RouteInput {
                context: &effective,
                caller: key.number.as_str(),
                called,
                agent: &agent.id,
                status: Status::Hit.as_str(),
            },
        ),
        None => Routing::default(),
    };
    let route_errors: Vec<Value> = routing
        .errors
        .iter()
        .map(|(index, error)| json!({ "index": index, "error": error }))
        .collect();
    let (inject_cfg, route, extra) = match &routing.decision {
        None => (&agent.inject, Value::Null, Vec::new()),
        Some(decision) => {
            inject::apply_set(&mut effective, &decision.route.set);
            let handed_over = match &decision.route.target {
                RouteTarget::Agent(id) => Some(id.as_str()),
                RouteTarget::Upstreams(_) | RouteTarget::Stay => None,
            };
            let route = json!({
                "index": decision.index,
                "name": decision.route.name,
                "label": decision.label,
                "upstream": decision.upstreams.iter().map(|u| u.uri.as_str()).collect::<Vec<_>>(),
                "agent": handed_over,
                "set": decision.route.set,
            });
            (
                &decision.agent.inject,
                route,
                vec![("Route", decision.label.clone())],
            )
        }
    };
    let headers: Vec<Value> =
        inject::pairs_for_mode(inject_cfg, Status::Hit, 0, &effective, &extra)
            .into_iter()
            .map(|(name, value)| json!({ "name": name, "value": value }))
            .collect();
    json!({
        "agentId": agent.id,
        "phoneNumber": key.number.as_str(),
        "status": Status::Hit.as_str(),
        "mode": inject_cfg.mode.as_str(),
        "headers": headers,
        "route": route,
        "routeErrors": route_errors,
    })
}

/// The status page's dry run (`POST /ui/api/test`, behind the admin password instead of
/// an API key): the body of `/v1/precall/test`, checked the same way from step 3 on.
pub(super) async fn ui_dry_run(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_body(headers, body, state.agents.config.http.max_body_bytes).await?;
    let payload = Payload::parse(&bytes)?;
    let Some(agent) = state.agents.config.agent(&payload.agent_id) else {
        return Err(ApiError::UnknownAgent(payload.agent_id));
    };
    let number = normalise(&payload.phone_number, agent)?;
    let key = CallerKey {
        agent: agent.id.clone(),
        number,
    };
    Ok(dry_run(state, agent, &key, &payload.context))
}

/// `GET /v1/precall/{agentId}/{phoneNumber}`: the cached context, left in place.
pub async fn get_precall(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (agent, key) = validate_path(&state, &headers, path)?;
    let Some(context) = state.contexts.store.get(&key).await? else {
        return Err(ApiError::NoContext {
            agent: agent.id.clone(),
            number: key.number.0,
        });
    };
    let answer = json!({
        "agentId": agent.id,
        "phoneNumber": key.number.as_str(),
        "context": context.as_ref(),
    });
    Ok((StatusCode::OK, Json(answer)).into_response())
}

/// `DELETE /v1/precall/{agentId}/{phoneNumber}`: 204 whether or not there was a context,
/// so a retried DELETE gets the same answer (idempotent, RFC 9110 §9.2.2).
pub async fn delete_precall(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (agent, key) = validate_path(&state, &headers, path)?;
    let existed = state.contexts.store.delete(&key).await?;
    tracing::info!(agent = %agent.id, caller = %key.number, existed, "context deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
}

/// `GET /readyz`: every SIP listener is bound, precall takes new calls (not draining),
/// and the store answers.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let reason = if !state.sip_ready.load(Ordering::Acquire) {
        Some("not taking calls (SIP listeners not bound yet, or draining)")
    } else if let Err(error) = state.contexts.store.ping().await {
        tracing::warn!(%error, "not ready: store unavailable");
        Some("store unavailable")
    } else {
        None
    };
    match reason {
        None => (StatusCode::OK, Json(json!({ "ready": true }))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

/// Any path we do not serve.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// A path we serve, with a method we do not (axum adds the `Allow` header).
pub async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// A POSTed payload that passed every check.
struct Posted<'a> {
    agent: &'a AgentConfig,
    key: CallerKey,
    /// The body minus `agentId` and `phoneNumber`, in posting order.
    context: Map<String, Value>,
}

/// The POST checks, in order: 415, 401 (missing/invalid key), 413, 400, 404 / 401 (key of
/// another agent), 422.
async fn validate_post<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Posted<'a>, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let authenticated = auth::authenticate(&state.agents.config, headers)?;
    state
        .limiter
        .check(auth::presented_key(headers).unwrap_or_default())?;
    let max = state.agents.config.http.max_body_bytes;
    let bytes = read_body(headers, body, max).await?;
    let secret = authenticated
        .agent_index()
        .and_then(|i| state.agents.config.agents.get(i))
        .and_then(|a| a.webhook_secret.as_ref());
    if let Some(secret) = secret {
        signature::verify(
            secret.expose(),
            headers.get(signature::HEADER).map(|v| v.as_bytes()),
            &bytes,
            signature::unix_now(),
        )?;
    }
    let payload = Payload::parse(&bytes)?;
    let agent = authorised_agent(state, &authenticated, &payload.agent_id)?;
    let number = normalise(&payload.phone_number, agent)?;
    Ok(Posted {
        agent,
        key: CallerKey {
            agent: agent.id.clone(),
            number,
        },
        context: payload.context,
    })
}

/// The GET/DELETE checks, in order: 400 (undecodable path), 401 (missing/invalid key),
/// 404 / 401 (key of another agent), 422.
fn validate_path<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(&'a AgentConfig, CallerKey), ApiError> {
    let Path((agent_id, phone_number)) =
        path.map_err(|rejection| ApiError::BadPath(rejection.body_text()))?;
    let authenticated = auth::authenticate(&state.agents.config, headers)?;
    state
        .limiter
        .check(auth::presented_key(headers).unwrap_or_default())?;
    let agent = authorised_agent(state, &authenticated, &agent_id)?;
    let number = normalise(&phone_number, agent)?;
    Ok((
        agent,
        CallerKey {
            agent: agent.id.clone(),
            number,
        },
    ))
}

/// The agent named `agent_id`, if the request's key is one of its keys.
fn authorised_agent<'a>(
    state: &'a AppState,
    authenticated: &Authenticated,
    agent_id: &str,
) -> Result<&'a AgentConfig, ApiError> {
    let Some((index, agent)) =
        (state.agents.config.agents.iter().enumerate()).find(|(_, agent)| agent.id == agent_id)
    else {
        return Err(ApiError::UnknownAgent(agent_id.to_string()));
    };
    if authenticated.allows(index) {
        Ok(agent)
    } else {
        Err(ApiError::KeyNotForAgent(agent_id.to_string()))
    }
}

/// The webhook's phoneNumber, normalised as the SIP side normalises callers.
fn normalise(phone_number: &str, agent: &AgentConfig) -> Result<E164, ApiError> {
    number::normalise(phone_number, agent.default_region)
        .map_err(|_| ApiError::BadNumber(phone_number.to_string()))
}

/// `application/json`, parameters (`; charset=utf-8`) allowed, any letter case.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads at most `max` bytes of body. A declared `Content-Length` over the limit is
/// refused before reading anything; a chunked body is cut off the moment it passes it.
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ApiError::TooLarge { max });
    }
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| ApiError::BodyUnreadable(error.to_string()))?;
        if buffer.len().saturating_add(chunk.len()) > max {
            return Err(ApiError::TooLarge { max });
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}

/// A webhook body, split into its address and its context.
#[derive(Debug)]
struct Payload {
    agent_id: String,
    phone_number: String,
    context: Map<String, Value>,
}

impl Payload {
    /// Checks in order: valid JSON, an object, `agentId`, `phoneNumber`.
    fn parse(bytes: &[u8]) -> Result<Payload, ApiError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|error| ApiError::BadJson(error.to_string()))?;
        let Value::Object(object) = value else {
            return Err(ApiError::NotAnObject);
        };
        let agent_id = string_field(&object, AGENT_ID)?;
        let phone_number = string_field(&object, PHONE_NUMBER)?;
        let context = object
            .into_iter()
            .filter(|(name, _)| name != AGENT_ID && name != PHONE_NUMBER)
            .collect();
        Ok(Payload {
            agent_id,
            phone_number,
            context,
        })
    }
}

fn string_field(object: &Map<String, Value>, name: &'static str) -> Result<String, ApiError> {
    match object.get(name) {
        None => Err(ApiError::MissingField(name)),
        Some(Value::String(value)) => Ok(value.clone()),
        Some(_) => Err(ApiError::NotAString(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_keeps_context_fields_in_posting_order() {
        let body = br#"{"zeta":1,"agentId":"a","mid":{"x":[1]},"phoneNumber":"+1","alpha":"A"}"#;
        let payload = Payload::parse(body).unwrap();
        assert_eq!(payload.agent_id, "a");
        assert_eq!(payload.phone_number, "+1");
        let names: Vec<&str> = payload.context.keys().map(String::as_str).collect();
        assert_eq!(names, ["zeta", "mid", "alpha"]);
    }

    #[test]
    fn payload_errors_name_the_problem() {
        let message = |body: &[u8]| Payload::parse(body).unwrap_err().to_string();
        assert!(message(b"{").starts_with("body is not valid JSON: "));
        assert_eq!(message(b"[1]"), "body must be a JSON object");
        assert_eq!(message(br#"{"phoneNumber":"+1"}"#), "agentId is required");
        assert_eq!(message(br#"{"agentId":7}"#), "agentId must be a string");
        assert_eq!(message(br#"{"agentId":null}"#), "agentId must be a string");
        assert_eq!(message(br#"{"agentId":"a"}"#), "phoneNumber is required");
        assert_eq!(
            message(br#"{"agentId":"a","phoneNumber":14155550123}"#),
            "phoneNumber must be a string"
        );
    }

    #[test]
    fn content_type_must_be_json() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            is_json(&headers)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("Application/JSON"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
