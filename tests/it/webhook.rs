//! The webhook API on the real binary: the 202 summary, GET/DELETE, the dry run, health,
//! and every error status with its JSON body — and nothing cached on any error.

use serde_json::json;

use crate::harness::{http_request, Agent, Config, HttpResponse, Precall};
use crate::rig::AGENT_B;
use crate::uas::{Answer, Uas};

fn start(name: &str) -> (Precall, Uas) {
    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = Config::new(vec![
        Agent::new("a", crate::rig::AGENT_A, &uas.uri()),
        Agent::new("b", AGENT_B, &uas.uri()),
    ]);
    cfg.max_body_bytes = 1024;
    (Precall::start(name, &cfg), uas)
}

fn post(p: &Precall, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    http_request(p.http, "POST", "/v1/precall", headers, body)
}

fn get(p: &Precall, agent: &str, phone: &str) -> HttpResponse {
    let key = format!("Bearer {}", p.api_key(agent));
    http_request(
        p.http,
        "GET",
        &format!("/v1/precall/{agent}/{phone}"),
        &[("Authorization", &key)],
        b"",
    )
}

/// A JSON `{"error": "..."}` with a non-empty message.
fn assert_error(r: &HttpResponse, status: u16, what: &str) {
    assert_eq!(
        r.status, status,
        "{what}: expected {status}, got {} {}",
        r.status, r.body
    );
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: error Content-Type {ct:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {:?}", r.body));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no \"error\" string in {v}"));
    assert!(!msg.is_empty(), "{what}: empty error message");
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const KEY_A: (&str, &str) = ("Authorization", "Bearer key-a");

#[test]
fn accepted_get_delete_and_notations() {
    let (p, _uas) = start("webhook-ok");
    let r = post(
        &p,
        &[("X-API-Key", "key-a"), JSON],
        json!({ "agentId": "a", "phoneNumber": "tel:+1-415-555-0130", "customer_name": "Ada", "score": 7 })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 202, "X-API-Key auth and a tel: URI: {}", r.body);
    let v = r.json();
    assert_eq!(
        (
            v["status"].as_str(),
            v["agentId"].as_str(),
            v["phoneNumber"].as_str()
        ),
        (Some("accepted"), Some("a"), Some("+14155550130"))
    );
    assert_eq!(v["fields"], 2);
    assert_eq!(v["stored"], true);

    // The three notations of the contract meet on one key.
    for phone in ["+14155550130", "14155550130"] {
        let g = get(&p, "a", phone);
        assert_eq!(g.status, 200, "GET with {phone}: {}", g.body);
        let ctx = g.json();
        assert!(
            ctx.to_string().contains("Ada"),
            "GET returns the context: {ctx}"
        );
    }
    assert_eq!(
        get(&p, "b", "+14155550130").status,
        404,
        "contexts are per agent"
    );

    let key = format!("Bearer {}", p.api_key("a"));
    let d = http_request(
        p.http,
        "DELETE",
        "/v1/precall/a/+14155550130",
        &[("Authorization", &key)],
        b"",
    );
    assert_eq!(d.status, 204, "{}", d.body);
    assert_eq!(get(&p, "a", "+14155550130").status, 404, "deleted");
}

/// What is wrong, the status expected, request headers, body, and the phone number whose
/// context must not exist afterwards ("" when there is none to check).
type BadCase<'a> = (&'a str, u16, Vec<(&'a str, &'a str)>, Vec<u8>, &'a str);

#[test]
fn every_bad_webhook_gets_its_status_and_nothing_is_cached() {
    let (p, _uas) = start("webhook-bad");
    let big = "x".repeat(2000);
    let cases: Vec<BadCase> = vec![
        (
            "truncated JSON",
            400,
            vec![KEY_A, JSON],
            br#"{"agentId":"a","phoneNumber":"+14155550131","#.to_vec(),
            "+14155550131",
        ),
        (
            "missing phoneNumber",
            400,
            vec![KEY_A, JSON],
            br#"{"agentId":"a","name":"x"}"#.to_vec(),
            "",
        ),
        (
            "missing agentId",
            400,
            vec![KEY_A, JSON],
            br#"{"phoneNumber":"+14155550132","name":"x"}"#.to_vec(),
            "+14155550132",
        ),
        (
            "phoneNumber not a string",
            400,
            vec![KEY_A, JSON],
            br#"{"agentId":"a","phoneNumber":14155550133}"#.to_vec(),
            "+14155550133",
        ),
        (
            "agentId not a string",
            400,
            vec![KEY_A, JSON],
            br#"{"agentId":7,"phoneNumber":"+14155550134"}"#.to_vec(),
            "+14155550134",
        ),
        (
            "body not an object",
            400,
            vec![KEY_A, JSON],
            br#"["a","+14155550135"]"#.to_vec(),
            "",
        ),
        (
            "no key",
            401,
            vec![JSON],
            br#"{"agentId":"a","phoneNumber":"+14155550136","n":1}"#.to_vec(),
            "+14155550136",
        ),
        (
            "wrong key",
            401,
            vec![("Authorization", "Bearer nope"), JSON],
            br#"{"agentId":"a","phoneNumber":"+14155550137","n":1}"#.to_vec(),
            "+14155550137",
        ),
        (
            "another agent's key",
            401,
            vec![("Authorization", "Bearer key-b"), JSON],
            br#"{"agentId":"a","phoneNumber":"+14155550138","n":1}"#.to_vec(),
            "+14155550138",
        ),
        (
            "unknown agent",
            404,
            vec![KEY_A, JSON],
            br#"{"agentId":"nobody","phoneNumber":"+14155550139","n":1}"#.to_vec(),
            "",
        ),
        (
            "body over max_body_bytes",
            413,
            vec![KEY_A, JSON],
            format!(r#"{{"agentId":"a","phoneNumber":"+14155550140","blob":"{big}"}}"#)
                .into_bytes(),
            "+14155550140",
        ),
        (
            "text/plain",
            415,
            vec![KEY_A, ("Content-Type", "text/plain")],
            br#"{"agentId":"a","phoneNumber":"+14155550141","n":1}"#.to_vec(),
            "+14155550141",
        ),
        (
            "no content type",
            415,
            vec![KEY_A],
            br#"{"agentId":"a","phoneNumber":"+14155550142","n":1}"#.to_vec(),
            "+14155550142",
        ),
        (
            "letters",
            422,
            vec![KEY_A, JSON],
            br#"{"agentId":"a","phoneNumber":"call-me-maybe","n":1}"#.to_vec(),
            "",
        ),
        (
            "too few digits",
            422,
            vec![KEY_A, JSON],
            br#"{"agentId":"a","phoneNumber":"12","n":1}"#.to_vec(),
            "",
        ),
        (
            "too many digits",
            422,
            vec![KEY_A, JSON],
            br#"{"agentId":"a","phoneNumber":"+1415555014312345678","n":1}"#.to_vec(),
            "",
        ),
    ];
    for (what, status, headers, body, phone) in &cases {
        let r = post(&p, headers, body);
        assert_error(&r, *status, what);
        if !phone.is_empty() {
            let g = get(&p, "a", phone);
            assert_eq!(
                g.status, 404,
                "{what}: something was cached for {phone}: {}",
                g.body
            );
        }
    }
    // GET and DELETE are authenticated too.
    let g = http_request(p.http, "GET", "/v1/precall/a/+14155550131", &[], b"");
    assert_error(&g, 401, "GET without key");
    let g = get(&p, "a", "not-a-number");
    assert!(
        g.status == 422 || g.status == 404,
        "GET with a non-number: {} {}",
        g.status,
        g.body
    );
    // Still serving after all that.
    let ok = post(
        &p,
        &[KEY_A, JSON],
        br#"{"agentId":"a","phoneNumber":"+14155550143","n":1}"#,
    );
    assert_eq!(ok.status, 202, "{}", ok.body);
}

#[test]
fn dry_run_shows_headers_and_caches_nothing() {
    let (p, _uas) = start("webhook-test");
    let r = post_to(
        &p,
        "/v1/precall/test",
        json!({ "agentId": "a", "phoneNumber": "+14155550150", "customer_name": "Dry", "note": "bad\r\nVia: x" }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let headers = v["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("no headers array: {v}"));
    let find = |name: &str| {
        headers
            .iter()
            .find(|h| {
                h["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .and_then(|h| h["value"].as_str())
            .map(str::to_string)
    };
    assert_eq!(
        find("X-Precall-customer_name").as_deref(),
        Some("Dry"),
        "{v}"
    );
    assert_eq!(
        find("X-Precall-tier").as_deref(),
        Some("standard"),
        "defaults filled in: {v}"
    );
    assert!(find("X-Precall-Status").is_some(), "{v}");
    let note = find("X-Precall-note").unwrap_or_else(|| panic!("note header missing: {v}"));
    assert!(
        !note.contains('\r') && !note.contains('\n'),
        "sanitised in the dry run too: {note:?}"
    );
    assert_eq!(
        get(&p, "a", "+14155550150").status,
        404,
        "a dry run caches nothing"
    );
}

#[test]
fn health_and_readiness() {
    let (p, _uas) = start("health");
    let h = http_request(p.http, "GET", "/healthz", &[], b"");
    assert_eq!(h.status, 200, "{}", h.body);
    // Readiness is a polled API by nature (an orchestrator asks until it says yes): it may
    // trail the "listening" lines by a moment, but must turn 200 without any traffic.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = http_request(p.http, "GET", "/readyz", &[], b"");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "not ready is a 503: {}", r.body);
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn post_to(p: &Precall, path: &str, body: serde_json::Value) -> HttpResponse {
    http_request(
        p.http,
        "POST",
        path,
        &[KEY_A, JSON],
        body.to_string().as_bytes(),
    )
}
