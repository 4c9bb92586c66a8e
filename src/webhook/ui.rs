//! The status page at `/ui/`: per agent the webhook URL, a ready-to-paste cURL, the API
//! key (masked, with Copy), the fallback wait and a Test form; the calls held now and the
//! last 100 finished calls. Plain HTML, CSS and JS compiled into the binary
//! (`include_str!`), no build step, no outside resources.
//!
//! Off unless `http.admin_password` is set (its paths are then unknown: 404). Every path
//! under `/ui/` asks for HTTP Basic credentials, user `admin`, compared in constant time.
//! The page shows API keys (Copy API key) and, in Copy cURL, the webhook secrets of signed
//! agents, so it is as sensitive as the config: serve the
//! webhook over HTTPS (`http.tls_cert`/`tls_key`) when the page is used beyond localhost.
//!
//! JSON under `/ui/api/`: `GET agents`, `GET calls` (`{held, calls}`, newest first) and
//! `POST test`: the dry run of `POST /v1/precall/test` for the body's `agentId`, with the
//! admin password standing in for the agent's API key (the page need not hand keys to
//! its own requests).
//!
//! A link such as `/ui/#test={"agentId":"a","phoneNumber":"+14155550123","tier":"gold"}`
//! (URL-encoded) opens the page with that agent's Test form filled in and run: a shareable
//! "what would this call get" link, and how the headless-browser test drives the form.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};

use super::{auth, handlers, AppState};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// The status page's user name.
pub const ADMIN_USER: &str = "admin";

/// The `/ui/` routes, each behind the admin password.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/ui/api/agents", get(agents))
        .route("/ui/api/calls", get(calls))
        .route("/ui/api/test", post(test))
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// HTTP Basic with user `admin` and `http.admin_password`; every answer gets headers that
/// keep it out of caches and frames.
async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let allowed = state
        .agents
        .config
        .http
        .admin_password
        .as_deref()
        .is_some_and(|password| is_admin(request.headers(), password));
    let mut response = if allowed {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                r#"Basic realm="precall status", charset="UTF-8""#,
            )],
            Json(json!({ "error": "admin credentials required" })),
        )
            .into_response()
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; form-action 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether the request carries `Authorization: Basic base64(admin:PASSWORD)`; the
/// comparison's time does not depend on how much of a guess was right.
fn is_admin(headers: &HeaderMap, password: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().trim_ascii())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.split_at_checked(6) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()) else {
        return false;
    };
    let expected = format!("{ADMIN_USER}:{password}");
    bool::from(auth::constant_time_eq(&decoded, expected.as_bytes()))
}

/// `GET /ui/api/agents`.
async fn agents(State(state): State<AppState>) -> Json<Value> {
    let config = &state.agents.config;
    let agents: Vec<Value> = config
        .agents
        .iter()
        .map(|a| {
            let key = a.api_keys.first().map_or("", String::as_str);
            json!({
                "id": a.id,
                "numbers": a.numbers,
                "apiKey": key,
                "maskedKey": mask(key),
                // For Copy cURL: a signed agent's webhooks need X-Precall-Signature, so the
                // snippet computes it, like `precall curl` (the page already holds keys).
                "webhookSecret": a
                    .webhook_secret
                    .as_ref()
                    .map(|s| String::from_utf8_lossy(s.expose()).into_owned()),
                "fallbackWaitMs": u64::try_from(a.fallback_wait.as_millis()).unwrap_or(u64::MAX),
                "upstreams": a.upstreams.iter().map(|u| u.uri.as_str()).collect::<Vec<_>>(),
                "injectMode": a.inject.mode.as_str(),
                "routes": a.routes.len(),
            })
        })
        .collect();
    Json(json!({
        "agents": agents,
        "webhookPath": "/v1/precall",
        "held": state.ops.call_log.held(),
        "defaultAgent": config.sip.default_agent,
    }))
}

/// `GET /ui/api/calls`: held now and the last 100 calls, newest first.
async fn calls(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "held": state.ops.call_log.held(),
        "calls": state.ops.call_log.recent(),
    }))
}

/// `POST /ui/api/test`: the dry run for the body's agent.
async fn test(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match handlers::ui_dry_run(&state, &headers, body).await {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}

/// An API key as the page shows it before Copy: the first 4 and last 2 characters
/// (fewer for short keys), the rest as dots.
fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let (head, tail) = match chars.len() {
        0 => return String::new(),
        1..=7 => (1, 0),
        8..=11 => (2, 1),
        _ => (4, 2),
    };
    let mut out: String = chars.iter().take(head).collect();
    out.push_str(&"•".repeat(chars.len().saturating_sub(head + tail).min(12)));
    out.extend(chars.iter().skip(chars.len() - tail));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        );
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn basic_auth_needs_admin_and_the_password() {
        assert!(is_admin(&basic("admin:s3cret-pw"), "s3cret-pw"));
        assert!(!is_admin(&basic("admin:s3cret-pX"), "s3cret-pw"));
        assert!(!is_admin(&basic("root:s3cret-pw"), "s3cret-pw"));
        assert!(!is_admin(&basic("admin:s3cret-pw2"), "s3cret-pw"));
        assert!(!is_admin(&basic("admin:"), "s3cret-pw"));
        assert!(!is_admin(&HeaderMap::new(), "s3cret-pw"));
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, "Bearer s3cret-pw".parse().unwrap());
        assert!(!is_admin(&bearer, "s3cret-pw"));
        let mut junk = HeaderMap::new();
        junk.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert!(!is_admin(&junk, "s3cret-pw"));
    }

    #[test]
    fn keys_are_masked() {
        assert_eq!(mask("dev-key-change-me"), "dev-•••••••••••me");
        assert_eq!(mask("abcdefgh"), "ab•••••h");
        assert_eq!(mask("abc"), "a••");
        assert_eq!(mask(""), "");
        assert!(!mask("supersecretkey123").contains("secret"));
    }
}
