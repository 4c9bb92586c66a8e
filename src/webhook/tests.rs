//! The API driven through `router(state).oneshot(request)`: no server, no sockets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::{router, AppState};
use crate::agent::Agents;
use crate::config::{
    AgentConfig, CallerSource, Config, HttpConfig, InjectConfig, InjectMode, RouteConfig,
    RouteTarget, SipConfig, StoreConfig, Transport, Upstream,
};
use crate::number::E164;
use crate::store::memory::MemoryStore;
use crate::store::{CallerKey, Claim, Context, ContextStore, Contexts, StoreError};

const SUPPORT_KEY: &str = "dev-key-change-me";
const SALES_KEY: &str = "sales-key";
const MAX_BODY: usize = 512;

fn agent(id: &str, keys: &[&str], region: phonenumber::country::Id) -> AgentConfig {
    let mut defaults = Map::new();
    defaults.insert("customer_name".to_string(), json!("there"));
    defaults.insert("tier".to_string(), json!("standard"));
    AgentConfig {
        id: id.to_string(),
        api_keys: keys.iter().map(|key| key.to_string()).collect(),
        numbers: vec!["+15550100".to_string()],
        upstreams: vec![Upstream {
            uri: "sip:127.0.0.1:5070;transport=udp".to_string(),
            transport: Transport::Udp,
            addr: SocketAddr::from(([127, 0, 0, 1], 5070)),
        }],
        upstream_timeout: Duration::from_millis(2000),
        health_check: None,
        lookup: None,
        routes: Vec::new(),
        default_region: region,
        fallback_wait: Duration::from_millis(2000),
        defaults,
        inject: InjectConfig::default(),
        caller_sources: vec![CallerSource::Pai, CallerSource::From],
        webhook_secret: None,
    }
}

fn config() -> Config {
    Config {
        sip: SipConfig {
            listen: Vec::new(),
            trusted_peers: Vec::new(),
            default_agent: Some("support-agent".to_string()),
            ..SipConfig::default()
        },
        http: HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body_bytes: MAX_BODY,
            rate_limit: None,
            ..HttpConfig::default()
        },
        store: StoreConfig::default(),
        agents: vec![
            agent(
                "support-agent",
                &["old-key", SUPPORT_KEY],
                phonenumber::country::Id::US,
            ),
            agent("sales-agent", &[SALES_KEY], phonenumber::country::Id::GB),
        ],
    }
}

struct Harness {
    state: AppState,
    store: Arc<MemoryStore>,
}

impl Harness {
    fn new() -> Harness {
        let store = Arc::new(MemoryStore::new());
        Harness::with_store(store.clone(), store)
    }

    fn with_store(store: Arc<MemoryStore>, backend: Arc<dyn ContextStore>) -> Harness {
        Harness::with_config(store, backend, config())
    }

    fn with_config(
        store: Arc<MemoryStore>,
        backend: Arc<dyn ContextStore>,
        config: Config,
    ) -> Harness {
        let contexts = Contexts::new(backend, config.store.consume, config.store.ttl);
        let limiter = crate::webhook::ratelimit::KeyLimiter::new(config.http.rate_limit);
        let state = AppState {
            agents: Arc::new(Agents::new(Arc::new(config))),
            contexts: Arc::new(contexts),
            sip_ready: Arc::new(AtomicBool::new(true)),
            ops: crate::webhook::Ops::default(),
            limiter: Arc::new(limiter),
        };
        Harness { state, store }
    }

    /// Sends one request; the answer's status, headers and JSON body (`Null` when empty).
    async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, headers, body)
    }

    /// Contexts cached, expired or not.
    fn cached(&self) -> usize {
        self.store.raw_len()
    }
}

fn post(path: &str, key: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    request.body(body.into()).unwrap()
}

fn request(method: Method, path: &str, key: Option<&str>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    request.body(Body::empty()).unwrap()
}

const ADA: &str = r#"{"agentId":"support-agent","phoneNumber":"+1 (415) 555-0123","customer_name":"Ada","account_id":"A-17","vip":true}"#;

fn key(agent: &str, number: &str) -> CallerKey {
    CallerKey {
        agent: agent.to_string(),
        number: E164(number.to_string()),
    }
}

#[tokio::test]
async fn post_caches_the_context_and_answers_202() {
    let h = Harness::new();
    let (status, _, body) = h.send(post("/v1/precall", Some(SUPPORT_KEY), ADA)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        body,
        json!({
            "status": "accepted",
            "agentId": "support-agent",
            "phoneNumber": "+14155550123",
            "fields": 3,
            "released": 0,
            "stored": true,
            "ttlSecs": 300,
        })
    );
    let cached = h
        .store
        .get(&key("support-agent", "+14155550123"))
        .await
        .unwrap()
        .unwrap();
    let names: Vec<&str> = cached.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["customer_name", "account_id", "vip"],
        "posting order kept"
    );
}

#[tokio::test]
async fn x_api_key_and_any_of_the_agents_keys_are_accepted() {
    let h = Harness::new();
    let with_header = Request::builder()
        .method(Method::POST)
        .uri("/v1/precall")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header("X-API-Key", SUPPORT_KEY)
        .body(Body::from(ADA))
        .unwrap();
    assert_eq!(h.send(with_header).await.0, StatusCode::ACCEPTED);
    let old_key = post("/v1/precall", Some("old-key"), ADA);
    assert_eq!(h.send(old_key).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn the_agents_region_normalises_national_numbers() {
    let h = Harness::new();
    let body = r#"{"agentId":"sales-agent","phoneNumber":"020 7946 0018","name":"Alan"}"#;
    let (status, _, answer) = h.send(post("/v1/precall", Some(SALES_KEY), body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["phoneNumber"], "+442079460018");
}

/// Every refusal: its status, its message, and an empty cache afterwards.
#[tokio::test]
async fn every_error_names_the_problem_and_caches_nothing() {
    let h = Harness::new();
    let big = format!(
        r#"{{"agentId":"support-agent","phoneNumber":"+14155550123","pad":"{}"}}"#,
        "x".repeat(MAX_BODY)
    );
    let no_content_type = Request::builder()
        .method(Method::POST)
        .uri("/v1/precall")
        .header(header::AUTHORIZATION, format!("Bearer {SUPPORT_KEY}"))
        .body(Body::from(ADA))
        .unwrap();
    let mut text_plain = post("/v1/precall", Some(SUPPORT_KEY), ADA);
    text_plain
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            no_content_type,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ),
        (
            text_plain,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ),
        (
            post("/v1/precall", None, ADA),
            StatusCode::UNAUTHORIZED,
            "missing API key",
        ),
        (
            post("/v1/precall", Some("guess"), ADA),
            StatusCode::UNAUTHORIZED,
            "invalid API key",
        ),
        (
            post("/v1/precall", Some(SALES_KEY), ADA),
            StatusCode::UNAUTHORIZED,
            "API key not valid for agent \"support-agent\"",
        ),
        (
            post(
                "/v1/precall",
                Some("guess"),
                r#"{"agentId":"nobody","phoneNumber":"+14155550123"}"#,
            ),
            StatusCode::UNAUTHORIZED,
            "invalid API key",
        ),
        (
            post(
                "/v1/precall",
                Some(SUPPORT_KEY),
                r#"{"agentId":"x","phoneNumber":"+14155550123"}"#,
            ),
            StatusCode::NOT_FOUND,
            "unknown agent \"x\"",
        ),
        (
            post("/v1/precall", Some(SUPPORT_KEY), big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body is larger than 512 bytes",
        ),
        (
            post("/v1/precall", Some(SUPPORT_KEY), "[1,2]"),
            StatusCode::BAD_REQUEST,
            "body must be a JSON object",
        ),
        (
            post("/v1/precall", Some(SUPPORT_KEY), ""),
            StatusCode::BAD_REQUEST,
            "body is not valid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (
            post("/v1/precall", Some(SUPPORT_KEY), r#"{"phoneNumber":"+1"}"#),
            StatusCode::BAD_REQUEST,
            "agentId is required",
        ),
        (
            post(
                "/v1/precall",
                Some(SUPPORT_KEY),
                r#"{"agentId":["support-agent"],"phoneNumber":"+1"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "agentId must be a string",
        ),
        (
            post(
                "/v1/precall",
                Some(SUPPORT_KEY),
                r#"{"agentId":"support-agent"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "phoneNumber is required",
        ),
        (
            post(
                "/v1/precall",
                Some(SUPPORT_KEY),
                r#"{"agentId":"support-agent","phoneNumber":14155550123}"#,
            ),
            StatusCode::BAD_REQUEST,
            "phoneNumber must be a string",
        ),
        (
            post(
                "/v1/precall",
                Some(SUPPORT_KEY),
                r#"{"agentId":"support-agent","phoneNumber":"call me maybe"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "phoneNumber \"call me maybe\" is not a phone number",
        ),
    ];
    for (request, expected_status, expected_error) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, headers, body) = h.send(request).await;
        assert_eq!(status, expected_status, "{what}: {body}");
        assert_eq!(body, json!({ "error": expected_error }), "{what}");
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        assert_eq!(h.cached(), 0, "{what} → {status} cached something");
    }
}

#[tokio::test]
async fn a_malformed_json_error_says_where() {
    let h = Harness::new();
    let (status, _, body) = h
        .send(post("/v1/precall", Some(SUPPORT_KEY), r#"{"agentId": "#))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with("body is not valid JSON: ") && message.contains("line 1"),
        "{message}"
    );
}

#[tokio::test]
async fn a_chunked_body_is_cut_off_at_the_limit() {
    let h = Harness::new();
    let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; MAX_BODY / 2])));
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let (status, _, answer) = h.send(post("/v1/precall", Some(SUPPORT_KEY), body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"], "body is larger than 512 bytes");
    assert_eq!(h.cached(), 0);
}

#[tokio::test]
async fn a_body_of_exactly_the_limit_is_accepted() {
    let h = Harness::new();
    let mut body = ADA.to_string();
    body.push_str(&" ".repeat(MAX_BODY - ADA.len()));
    assert_eq!(body.len(), MAX_BODY);
    let (status, _, _) = h.send(post("/v1/precall", Some(SUPPORT_KEY), body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_webhook_releases_the_call_held_for_its_caller() {
    let h = Harness::new();
    let Claim::Pending(watch) = h
        .state
        .contexts
        .claim(&key("support-agent", "+14155550123"))
        .await
        .unwrap()
    else {
        panic!("nothing was cached yet");
    };
    let (status, _, body) = h.send(post("/v1/precall", Some(SUPPORT_KEY), ADA)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["released"], 1);
    assert_eq!(body["stored"], false, "consumed by the held call");
    let context = watch.now_or_never().expect("released at once");
    assert_eq!(context["customer_name"], "Ada");
    assert_eq!(h.cached(), 0);
}

#[tokio::test]
async fn get_returns_the_cached_context_without_consuming_it() {
    let h = Harness::new();
    h.send(post("/v1/precall", Some(SUPPORT_KEY), ADA)).await;
    // `%2B`, a literal `+`, and national notation all name the same caller.
    for path in [
        "/v1/precall/support-agent/%2B14155550123",
        "/v1/precall/support-agent/+14155550123",
        "/v1/precall/support-agent/4155550123",
    ] {
        let (status, _, body) = h.send(request(Method::GET, path, Some(SUPPORT_KEY))).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(
            body,
            json!({
                "agentId": "support-agent",
                "phoneNumber": "+14155550123",
                "context": { "customer_name": "Ada", "account_id": "A-17", "vip": true },
            }),
            "{path}"
        );
    }
    assert_eq!(h.cached(), 1);
}

#[tokio::test]
async fn get_refuses_like_post_does() {
    let h = Harness::new();
    let cases = [
        (
            "/v1/precall/support-agent/%2B14155550199",
            Some(SUPPORT_KEY),
            StatusCode::NOT_FOUND,
            "no context for agent \"support-agent\" and phoneNumber \"+14155550199\"",
        ),
        (
            "/v1/precall/support-agent/%2B14155550123",
            None,
            StatusCode::UNAUTHORIZED,
            "missing API key",
        ),
        (
            "/v1/precall/support-agent/%2B14155550123",
            Some(SALES_KEY),
            StatusCode::UNAUTHORIZED,
            "API key not valid for agent \"support-agent\"",
        ),
        (
            "/v1/precall/nobody/%2B14155550123",
            Some(SUPPORT_KEY),
            StatusCode::NOT_FOUND,
            "unknown agent \"nobody\"",
        ),
        (
            "/v1/precall/support-agent/letters",
            Some(SUPPORT_KEY),
            StatusCode::UNPROCESSABLE_ENTITY,
            "phoneNumber \"letters\" is not a phone number",
        ),
    ];
    for (path, key, expected_status, expected_error) in cases {
        let (status, _, body) = h.send(request(Method::GET, path, key)).await;
        assert_eq!(status, expected_status, "{path}");
        assert_eq!(body, json!({ "error": expected_error }), "{path}");
    }
}

#[tokio::test]
async fn delete_drops_the_context_and_is_idempotent() {
    let h = Harness::new();
    h.send(post("/v1/precall", Some(SUPPORT_KEY), ADA)).await;
    assert_eq!(h.cached(), 1);
    let path = "/v1/precall/support-agent/%2B14155550123";
    for _ in 0..2 {
        let (status, _, body) = h
            .send(request(Method::DELETE, path, Some(SUPPORT_KEY)))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(body, Value::Null);
        assert_eq!(h.cached(), 0);
    }
    let (status, _, _) = h.send(request(Method::GET, path, Some(SUPPORT_KEY))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = h.send(request(Method::DELETE, path, Some(SALES_KEY))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn test_shows_the_headers_a_call_would_get_and_caches_nothing() {
    let h = Harness::new();
    let body = r#"{"agentId":"support-agent","phoneNumber":"+14155550123","customer_name":"Ada\r\nVia: SIP/2.0/UDP evil","vip":true}"#;
    let (status, _, answer) = h
        .send(post("/v1/precall/test", Some(SUPPORT_KEY), body))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["agentId"], "support-agent");
    assert_eq!(answer["phoneNumber"], "+14155550123");
    assert_eq!(answer["status"], "hit");
    assert_eq!(answer["route"], Value::Null);
    let headers: Vec<(&str, &str)> = answer["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["name"].as_str().unwrap(), h["value"].as_str().unwrap()))
        .collect();
    let value_of = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
    };
    let name = value_of("X-Precall-customer_name");
    assert!(!name.contains(['\r', '\n']), "{name:?}");
    assert!(
        name.starts_with("Ada") && name.ends_with("evil"),
        "{name:?}"
    );
    assert_eq!(value_of("X-Precall-vip"), "true");
    assert_eq!(
        value_of("X-Precall-tier"),
        "standard",
        "defaults fill the gaps"
    );
    assert_eq!(value_of("X-Precall-Status"), "hit");
    assert_eq!(value_of("X-Precall-Wait-Ms"), "0");
    assert!(headers.iter().all(|(_, v)| !v.contains(['\r', '\n'])));
    assert_eq!(h.cached(), 0, "a dry run caches nothing");
}

#[tokio::test]
async fn test_validates_like_post() {
    let h = Harness::new();
    let (status, _, body) = h.send(post("/v1/precall/test", Some(SALES_KEY), ADA)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body["error"],
        "API key not valid for agent \"support-agent\""
    );
    let bad_number = r#"{"agentId":"support-agent","phoneNumber":"12"}"#;
    let (status, _, _) = h
        .send(post("/v1/precall/test", Some(SUPPORT_KEY), bad_number))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn health_and_readiness() {
    let h = Harness::new();
    let (status, _, body) = h.send(request(Method::GET, "/healthz", None)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));
    let (status, _, body) = h.send(request(Method::GET, "/readyz", None)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "ready": true })));

    h.state.sip_ready.store(false, Ordering::Release);
    let (status, _, body) = h.send(request(Method::GET, "/readyz", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    assert!(body["reason"].as_str().unwrap().contains("SIP"), "{body}");
}

/// A store that is down.
struct DownStore;

#[async_trait::async_trait]
impl ContextStore for DownStore {
    async fn put(&self, _: &CallerKey, _: Context, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "connection refused by 10.1.2.3".into(),
        ))
    }
    async fn get(&self, _: &CallerKey) -> Result<Option<Context>, StoreError> {
        Err(StoreError::Unavailable(
            "connection refused by 10.1.2.3".into(),
        ))
    }
    async fn take(&self, _: &CallerKey) -> Result<Option<Context>, StoreError> {
        Err(StoreError::Unavailable(
            "connection refused by 10.1.2.3".into(),
        ))
    }
    async fn delete(&self, _: &CallerKey) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable(
            "connection refused by 10.1.2.3".into(),
        ))
    }
    async fn len(&self) -> Result<usize, StoreError> {
        Err(StoreError::Unavailable(
            "connection refused by 10.1.2.3".into(),
        ))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "connection refused by 10.1.2.3".into(),
        ))
    }
}

#[tokio::test]
async fn a_store_failure_is_a_503_that_leaks_nothing() {
    let h = Harness::with_store(Arc::new(MemoryStore::new()), Arc::new(DownStore));
    let store_down = json!({ "error": "store unavailable" });
    let (status, _, body) = h.send(post("/v1/precall", Some(SUPPORT_KEY), ADA)).await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, store_down.clone())
    );
    let path = "/v1/precall/support-agent/%2B14155550123";
    let (status, _, body) = h.send(request(Method::GET, path, Some(SUPPORT_KEY))).await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, store_down)
    );
    let (status, _, body) = h.send(request(Method::GET, "/readyz", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({ "ready": false, "reason": "store unavailable" })
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let h = Harness::new();
    let (status, _, body) = h.send(request(Method::GET, "/v2/nothing", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({ "error": "no route for GET /v2/nothing" }));

    let (status, headers, body) = h.send(request(Method::GET, "/v1/precall", None)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body, json!({ "error": "method GET not allowed here" }));
    assert_eq!(headers[header::ALLOW], "POST");

    let (status, headers, _) = h
        .send(request(Method::PUT, "/v1/precall/support-agent/%2B1", None))
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let allow = headers[header::ALLOW].to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("DELETE"), "{allow}");
}

#[tokio::test]
async fn an_undecodable_path_is_a_400() {
    let h = Harness::new();
    let (status, _, body) = h
        .send(request(
            Method::GET,
            "/v1/precall/support-agent/%FF%FE",
            Some(SUPPORT_KEY),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = body["error"].as_str().unwrap();
    assert!(message.starts_with("invalid path: "), "{message}");
}

/// Log capture for one test thread. The subscriber is the process-wide default, set
/// once, so no callsite's interest can be cached as "never" by a thread that had no
/// subscriber; each line goes to the buffer of the thread that logged it (none: dropped).
mod capture {
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex, Once};

    thread_local! {
        static BUFFER: RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { RefCell::new(None) };
    }

    struct ThreadWriter;

    impl std::io::Write for ThreadWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            BUFFER.with(|b| {
                if let Some(buffer) = b.borrow().as_ref() {
                    buffer.lock().unwrap().extend_from_slice(bytes);
                }
            });
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Starts capturing this thread's log lines; read them from the returned buffer.
    pub fn start() -> Arc<Mutex<Vec<u8>>> {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadWriter)
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .finish();
            let _ = tracing::subscriber::set_global_default(subscriber);
        });
        let buffer = Arc::new(Mutex::new(Vec::new()));
        BUFFER.with(|b| *b.borrow_mut() = Some(Arc::clone(&buffer)));
        buffer
    }
}

#[tokio::test]
async fn the_log_names_agent_and_number_but_never_the_key_or_context_values() {
    // Current-thread runtime: the whole request is handled on this thread.
    let logs = capture::start();
    let h = Harness::new();
    let secret = r#"{"agentId":"support-agent","phoneNumber":"+14155550123","ssn":"078-05-1120"}"#;
    assert_eq!(
        h.send(post("/v1/precall", Some(SUPPORT_KEY), secret))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let (status, _, _) = h
        .send(post("/v1/precall", Some("wrong-key-123"), secret))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("context accepted"), "{logged}");
    assert!(
        logged.contains("support-agent") && logged.contains("+14155550123"),
        "{logged}"
    );
    for never in [SUPPORT_KEY, "wrong-key-123", "078-05-1120", "ssn"] {
        assert!(!logged.contains(never), "{never:?} was logged: {logged}");
    }
}

/// `config()` with routing rules on support-agent, and sales-agent delivering in `json`
/// mode under its own prefix.
fn routed_config() -> Config {
    let mut config = config();
    let route = |name: Option<&str>, when: &str, target: RouteTarget, set: Value| RouteConfig {
        name: name.map(str::to_string),
        when: when.to_string(),
        target,
        set: match set {
            Value::Object(map) => map,
            _ => Map::new(),
        },
    };
    config.agents[0].routes = vec![
        route(
            Some("fraud"),
            "risk_score >= 80 || flagged == true",
            RouteTarget::Upstreams(vec![Upstream {
                uri: "sip:127.0.0.1:5090;transport=udp".to_string(),
                transport: Transport::Udp,
                addr: SocketAddr::from(([127, 0, 0, 1], 5090)),
            }]),
            json!({"flow": "verification"}),
        ),
        route(
            None,
            "lead_source != '' && int(budget) >= 5000",
            RouteTarget::Agent("sales-agent".to_string()),
            json!({"queue": "hot"}),
        ),
        route(
            Some("uk"),
            "caller.startsWith('+44') && called == '+15550100' && agent == 'support-agent' && status == 'hit'",
            RouteTarget::Stay,
            json!({}),
        ),
    ];
    config.agents[1].inject = InjectConfig {
        mode: InjectMode::Json,
        prefix: "X-Sales-".to_string(),
        ..InjectConfig::default()
    };
    config.agents[1].upstreams[0].uri = "sip:127.0.0.1:5080;transport=udp".to_string();
    config
}

/// POSTs `body` to `/v1/precall/test` as support-agent against `routed_config()`.
async fn dry_run(body: &str) -> Value {
    let store = Arc::new(MemoryStore::new());
    let h = Harness::with_config(store.clone(), store, routed_config());
    let (status, _, answer) = h
        .send(post(
            "/v1/precall/test",
            Some(SUPPORT_KEY),
            body.to_string(),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(h.cached(), 0, "a dry run caches nothing");
    answer
}

fn header_list(answer: &Value) -> Vec<(String, String)> {
    answer["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn test_reports_a_route_to_other_upstreams_with_its_set_fields() {
    let answer = dry_run(
        r#"{"agentId":"support-agent","phoneNumber":"+14155550123","risk_score":92,"flow":"normal"}"#,
    )
    .await;
    assert_eq!(
        answer["route"],
        json!({
            "index": 0,
            "name": "fraud",
            "label": "fraud",
            "upstream": ["sip:127.0.0.1:5090;transport=udp"],
            "agent": null,
            "set": {"flow": "verification"},
        })
    );
    assert_eq!(answer["routeErrors"], json!([]));
    assert_eq!(answer["mode"], "headers");
    let headers = header_list(&answer);
    let has = |name: &str, value: &str| headers.contains(&(name.to_string(), value.to_string()));
    // `set` wins over the posted field of the same name.
    assert!(has("X-Precall-flow", "verification"), "{headers:?}");
    assert!(!has("X-Precall-flow", "normal"), "{headers:?}");
    assert!(has("X-Precall-risk_score", "92"), "{headers:?}");
    assert!(has("X-Precall-Route", "fraud"), "{headers:?}");
    assert!(has("X-Precall-Status", "hit"), "{headers:?}");
}

#[tokio::test]
async fn test_reports_a_hand_over_with_the_other_agents_injection() {
    let answer = dry_run(
        r#"{"agentId":"support-agent","phoneNumber":"+14155550123","lead_source":"ads","budget":"10000"}"#,
    )
    .await;
    assert_eq!(answer["route"]["index"], 1);
    assert_eq!(answer["route"]["name"], Value::Null);
    assert_eq!(answer["route"]["label"], "1");
    assert_eq!(answer["route"]["agent"], "sales-agent");
    assert_eq!(
        answer["route"]["upstream"],
        json!(["sip:127.0.0.1:5080;transport=udp"])
    );
    // Rule 0 read fields the payload lacks: reported, without values, not matched.
    let errors = answer["routeErrors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["index"], 0);
    let error = errors[0]["error"].as_str().unwrap();
    assert!(error.starts_with("no field "), "{error}");
    // The sales agent's json mode and prefix.
    assert_eq!(answer["mode"], "json");
    let headers = header_list(&answer);
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "X-Sales-Context",
            "X-Sales-Status",
            "X-Sales-Wait-Ms",
            "X-Sales-Route"
        ]
    );
    assert_eq!(headers[3].1, "1");
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&headers[0].1)
        .unwrap();
    let context: Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!(
        context,
        json!({
            "lead_source": "ads", "budget": "10000",
            "customer_name": "there", "tier": "standard", "queue": "hot"
        })
    );
}

#[tokio::test]
async fn test_route_sees_caller_called_agent_and_status() {
    let answer =
        dry_run(r#"{"agentId":"support-agent","phoneNumber":"+44 20 7946 0958","risk_score":1,"flagged":false,"lead_source":""}"#)
            .await;
    assert_eq!(answer["route"]["label"], "uk");
    assert_eq!(
        answer["route"]["upstream"],
        json!(["sip:127.0.0.1:5070;transport=udp"])
    );
    assert_eq!(answer["routeErrors"], json!([]));
}

#[tokio::test]
async fn test_without_a_matching_route_says_null() {
    let answer = dry_run(
        r#"{"agentId":"support-agent","phoneNumber":"+14155550123","risk_score":"SECRET-92"}"#,
    )
    .await;
    assert_eq!(answer["route"], Value::Null);
    let errors = answer["routeErrors"].as_array().unwrap();
    let failed: Vec<u64> = errors
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(failed, [0, 1]);
    assert!(!answer["routeErrors"].to_string().contains("SECRET"));
    let headers = header_list(&answer);
    assert!(headers.iter().all(|(n, _)| n != "X-Precall-Route"));
}
