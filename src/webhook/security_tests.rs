//! Webhook security (issue 7): a wrong key reveals nothing, the per-key rate limit, HMAC
//! signatures, and a full context store. Driven through `router(state).oneshot`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::ratelimit::KeyLimiter;
use super::signature;
use super::{router, AppState};
use crate::agent::Agents;
use crate::config::{
    AgentConfig, CallerSource, Config, HttpConfig, InjectConfig, Rate, Secret, SipConfig,
    StoreBackend, StoreConfig, Transport, Upstream,
};
use crate::store::memory::MemoryStore;
use crate::store::Contexts;

const KEY_A: &str = "key-a-0123";
const KEY_B: &str = "key-b-4567";
const SECRET: &str = "whsec_0123456789abcdef";

fn agent(id: &str, key: &str, secret: Option<&str>) -> AgentConfig {
    AgentConfig {
        id: id.to_string(),
        api_keys: vec![key.to_string()],
        numbers: vec!["+15550100".to_string()],
        upstreams: vec![Upstream {
            uri: "sip:127.0.0.1:5070".to_string(),
            transport: Transport::Udp,
            addr: SocketAddr::from(([127, 0, 0, 1], 5070)),
        }],
        upstream_timeout: Duration::from_millis(2000),
        health_check: None,
        lookup: None,
        routes: Vec::new(),
        default_region: phonenumber::country::Id::US,
        fallback_wait: Duration::from_millis(2000),
        defaults: Map::new(),
        inject: InjectConfig::default(),
        caller_sources: vec![CallerSource::Pai, CallerSource::From],
        webhook_secret: secret.map(|s| Secret(s.to_string())),
    }
}

/// Agent `a` (key A, signed webhooks) and agent `b` (key B, unsigned).
fn state(rate: Option<Rate>, max_contexts: usize) -> AppState {
    let config = Config {
        sip: SipConfig {
            listen: Vec::new(),
            trusted_peers: Vec::new(),
            default_agent: None,
            ..SipConfig::default()
        },
        http: HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body_bytes: 4096,
            rate_limit: rate,
            ..HttpConfig::default()
        },
        store: StoreConfig {
            backend: StoreBackend::Memory,
            ttl: Duration::from_secs(300),
            consume: true,
            max_contexts,
        },
        agents: vec![agent("a", KEY_A, Some(SECRET)), agent("b", KEY_B, None)],
    };
    let store = Arc::new(MemoryStore::with_max_entries(max_contexts));
    AppState {
        limiter: Arc::new(KeyLimiter::new(config.http.rate_limit)),
        contexts: Arc::new(Contexts::new(store, true, config.store.ttl)),
        agents: Arc::new(Agents::new(Arc::new(config))),
        sip_ready: Arc::new(AtomicBool::new(true)),
        ops: crate::webhook::Ops::default(),
    }
}

async fn send(state: &AppState, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

fn post(key: &str, body: &str, signature: Option<String>) -> Request<Body> {
    let mut r = Request::builder()
        .method(Method::POST)
        .uri("/v1/precall")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {key}"));
    if let Some(sig) = signature {
        r = r.header(signature::HEADER, sig);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

fn payload(agent: &str, phone: &str) -> String {
    json!({ "agentId": agent, "phoneNumber": phone, "note": "x" }).to_string()
}

fn signed(body: &str) -> Option<String> {
    Some(signature::sign(
        SECRET.as_bytes(),
        signature::unix_now(),
        body.as_bytes(),
    ))
}

#[tokio::test]
async fn a_wrong_key_says_the_same_whether_the_agent_exists_or_not() {
    let s = state(None, 100);
    let exists = send(&s, post("wrong-key", &payload("b", "+14155550123"), None)).await;
    let missing = send(
        &s,
        post("wrong-key", &payload("no-such-agent", "+14155550123"), None),
    )
    .await;
    assert_eq!(exists.0, StatusCode::UNAUTHORIZED);
    assert_eq!((exists.0, &exists.2), (missing.0, &missing.2));
    // The same on the GET path, and with a wrong key of the right length.
    for path in ["/v1/precall/b/+14155550123", "/v1/precall/zz/+14155550123"] {
        let r = Request::builder()
            .uri(path)
            .header(header::AUTHORIZATION, "Bearer key-x-0000")
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(&s, r).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body, json!({ "error": "invalid API key" }), "{path}");
    }
}

#[tokio::test]
async fn each_key_is_rate_limited_with_429_and_retry_after() {
    let s = state(
        Some(Rate {
            per_sec: 1,
            burst: 2,
        }),
        100,
    );
    for n in 0..2 {
        let (status, _, body) = send(
            &s,
            post(KEY_B, &payload("b", &format!("+1415555010{n}")), None),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, headers, body) = send(&s, post(KEY_B, &payload("b", "+14155550109"), None)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(
        body,
        json!({ "error": "too many requests for this API key" })
    );
    // GET counts against the same key.
    let get = Request::builder()
        .uri("/v1/precall/b/+14155550100")
        .header(header::AUTHORIZATION, format!("Bearer {KEY_B}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, get).await.0, StatusCode::TOO_MANY_REQUESTS);
    // Another key has its own allowance; wrong keys are refused before the limiter.
    let a = payload("a", "+14155550100");
    assert_eq!(
        send(&s, post(KEY_A, &a, signed(&a))).await.0,
        StatusCode::ACCEPTED
    );
    for _ in 0..5 {
        assert_eq!(
            send(&s, post("wrong-key", &a, None)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
}

#[tokio::test]
async fn signed_agents_need_a_valid_fresh_signature() {
    let s = state(None, 100);
    let b = payload("a", "+14155550123");
    let now = signature::unix_now();
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing X-Precall-Signature"),
        (
            Some("t=1,v1=zz".to_string()),
            "malformed X-Precall-Signature",
        ),
        (
            Some(signature::sign(SECRET.as_bytes(), now - 301, b.as_bytes())),
            "X-Precall-Signature timestamp is more than 300 s from now",
        ),
        (
            Some(signature::sign(b"not-the-secret-0000", now, b.as_bytes())),
            "X-Precall-Signature does not match",
        ),
        (
            Some(signature::sign(SECRET.as_bytes(), now, b"{}")),
            "X-Precall-Signature does not match",
        ),
    ];
    for (sig, want) in cases {
        let (status, headers, answer) = send(&s, post(KEY_A, &b, sig.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{sig:?}");
        assert_eq!(answer, json!({ "error": want }), "{sig:?}");
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    }
    assert!(s.contexts.store.is_empty().await.unwrap(), "nothing cached");
    // The signature is checked on the raw bytes, before they are parsed.
    let (status, _, _) = send(&s, post(KEY_A, "{not json", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(&s, post(KEY_A, "{not json", signed("{not json"))).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "signed garbage is then a 400"
    );
    // A good signature: accepted. An agent without a secret needs none.
    assert_eq!(
        send(&s, post(KEY_A, &b, signed(&b))).await.0,
        StatusCode::ACCEPTED
    );
    let nb = payload("b", "+14155550123");
    assert_eq!(
        send(&s, post(KEY_B, &nb, None)).await.0,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_with_503() {
    let s = state(None, 2);
    for n in 0..2 {
        let b = payload("b", &format!("+1415555012{n}"));
        assert_eq!(
            send(&s, post(KEY_B, &b, None)).await.0,
            StatusCode::ACCEPTED
        );
    }
    let (status, headers, body_json) =
        send(&s, post(KEY_B, &payload("b", "+14155550129"), None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_json, json!({ "error": "context store full" }));
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // A key already cached may still be replaced.
    let again = payload("b", "+14155550120");
    assert_eq!(
        send(&s, post(KEY_B, &again, None)).await.0,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn the_status_page_hands_copy_curl_the_secret_of_signed_agents_only() {
    let base = state(None, 100);
    let mut config = (*base.agents.config).clone();
    config.http.admin_password = Some("status-pw-123".to_string());
    let state = AppState {
        agents: Arc::new(Agents::new(Arc::new(config))),
        ..base
    };
    use base64::Engine as _;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:status-pw-123")
    );
    let request = Request::builder()
        .uri("/ui/api/agents")
        .header(header::AUTHORIZATION, auth)
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&state, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["agents"][0]["id"], "a");
    assert_eq!(body["agents"][0]["webhookSecret"], SECRET);
    assert_eq!(body["agents"][1]["id"], "b");
    assert_eq!(body["agents"][1]["webhookSecret"], Value::Null);
}
