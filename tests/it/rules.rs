//! Issue 3: routing rules, delivery modes, pull look-ups and upstream failover, against
//! the real binary with several agent UASs and a small HTTP server in the test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{run_to_exit, Agent, Config, Precall, TempDir};
use crate::rig::*;
use crate::uas::{Answer, Uac, Uas};

/// A request the stub received.
#[derive(Debug)]
pub struct StubRequest {
    pub path: String,
    pub body: Value,
    pub at: Instant,
}

/// A one-purpose HTTP server: records each POST and answers with a fixed status and body
/// after a fixed delay.
pub struct HttpStub {
    pub addr: SocketAddr,
    rx: mpsc::Receiver<StubRequest>,
}

impl HttpStub {
    pub fn start(status: u16, body: &'static str, delay: Duration) -> HttpStub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let tx = tx.clone();
                thread::spawn(move || serve(stream, status, body, delay, tx));
            }
        });
        HttpStub { addr, rx }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn recv(&self, timeout: Duration) -> Option<StubRequest> {
        self.rx.recv_timeout(timeout).ok()
    }
}

fn serve(
    stream: TcpStream,
    status: u16,
    body: &str,
    delay: Duration,
    tx: mpsc::Sender<StubRequest>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut raw = vec![0; length];
        if reader.read_exact(&mut raw).is_err() {
            return;
        }
        let at = Instant::now();
        let body_json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        let _ = tx.send(StubRequest {
            path,
            body: body_json,
            at,
        });
        thread::sleep(delay); // the stub's answer delay is the behaviour under test
        let reason = if status == 200 { "OK" } else { "Status" };
        let answer = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut w = &stream;
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

const FRAUD_ROUTE: &str = r#"
[[agents.routes]]
name = "fraud"
when = "risk_score >= 80 || flagged == true"
upstream = "VERIFY"
set = { flow = "verification" }

[[agents.routes]]
when = "lead_source != '' && int(budget) >= 5000"
agent = "sales"
"#;

/// Agent `a` with the fraud and lead rules, agent `sales` (its own number and UAS), and a
/// verification UAS; returns (precall, a's UAS, sales' UAS, verification UAS, caller).
fn routed_rig(name: &str) -> (Precall, Uas, Uas, Uas, Uac) {
    let uas_a = Uas::udp(Answer::Ring200);
    let uas_sales = Uas::udp(Answer::Ring200);
    let uas_verify = Uas::udp(Answer::Ring200);
    let routes = FRAUD_ROUTE.replace("VERIFY", &uas_verify.uri());
    let cfg = Config::new(vec![
        Agent::new("a", AGENT_A, &uas_a.uri())
            .fallback_ms(300)
            .extra(&routes),
        Agent::new("sales", AGENT_B, &uas_sales.uri()).defaults(r#"team = "sales""#),
    ]);
    let precall = Precall::start(name, &cfg);
    let uac = Uac::udp(precall.udp);
    (precall, uas_a, uas_sales, uas_verify, uac)
}

#[test]
fn a_high_risk_score_lands_on_the_verification_upstream_with_the_route_header() {
    let (precall, uas_a, _sales, verify, uac) = routed_rig("route-fraud");
    precall.post_ok("a", "+14155550301", json!({"risk_score": 92}));
    let call = uac.call("+14155550301", AGENT_A);
    uac.send(&call.invite());
    let inv = verify.expect_invite(SOON).msg;
    let x = x_precall(&inv);
    assert_eq!(x.get("Route").map(String::as_str), Some("fraud"), "{x:?}");
    assert_eq!(x.get("flow").map(String::as_str), Some("verification"));
    assert_eq!(x.get("risk_score").map(String::as_str), Some("92"));
    assert_eq!(x.get("Status").map(String::as_str), Some("hit"));
    uas_a.expect_nothing(QUIET, "the default upstream gets nothing");
    complete_call(&uac, &verify, &call);
}

#[test]
fn a_lead_with_budget_lands_on_the_sales_agent() {
    let (precall, uas_a, sales, _verify, uac) = routed_rig("route-lead");
    precall.post_ok(
        "a",
        "+14155550302",
        json!({"lead_source": "webinar", "budget": "10000"}),
    );
    let call = uac.call("+14155550302", AGENT_A);
    uac.send(&call.invite());
    let inv = sales.expect_invite(SOON).msg;
    let x = x_precall(&inv);
    assert_eq!(
        x.get("Route").map(String::as_str),
        Some("1"),
        "unnamed: the index"
    );
    assert_eq!(x.get("budget").map(String::as_str), Some("10000"));
    assert_eq!(x.get("lead_source").map(String::as_str), Some("webinar"));
    uas_a.expect_nothing(QUIET, "handed over to sales");
}

#[test]
fn no_matching_rule_goes_to_the_default_upstream() {
    let (precall, uas_a, sales, verify, uac) = routed_rig("route-none");
    precall.post_ok(
        "a",
        "+14155550303",
        json!({"risk_score": 10, "budget": "100"}),
    );
    let call = uac.call("+14155550303", AGENT_A);
    uac.send(&call.invite());
    let inv = uas_a.expect_invite(SOON).msg;
    assert!(inv.header("X-Precall-Route").is_none(), "{}", inv.text());
    // a fallback (no context at all) matches nothing either: no field to compare
    let call2 = uac.call("+14155550304", AGENT_A);
    uac.send(&call2.invite());
    let inv2 = uas_a.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv2), "fallback");
    sales.expect_nothing(QUIET, "no rule matched");
    verify.expect_nothing(QUIET, "no rule matched");
}

#[test]
fn check_rejects_a_broken_expression_naming_agent_and_rule() {
    let dir = TempDir::new("route-check");
    let cfg = Config::new(vec![Agent::new("a", AGENT_A, "sip:127.0.0.1:5070").extra(
        "[[agents.routes]]\nname = \"oops\"\nwhen = \"risk_score >= \"\nupstream = \"sip:127.0.0.1:5080\"\n",
    )]);
    let path = dir.join("precall.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let (status, out) = run_to_exit(&["check", "-c", path.to_str().unwrap()], SOON);
    assert!(!status.success(), "{out}");
    assert!(out.contains("routes[0]"), "names the rule: {out}");
    assert!(
        out.contains("\"a\"") || out.contains("agents[0]"),
        "names the agent: {out}"
    );
}

/// base64url without padding, decoded (the test's own, independent of precall's).
fn b64url_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c:?}"),
        }
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s.trim().as_bytes() {
        acc = (acc << 6) | val(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn json_mode_carries_the_posted_context_in_one_header() {
    let uas = Uas::udp(Answer::Ring200);
    let rig = Rig::build("inject-json", uas, 300, |cfg| {
        cfg.agents[0] = cfg.agents[0]
            .clone()
            .inject(r#"mode = "json""#)
            .defaults("");
    });
    let posted =
        json!({"customer_name": "Ada", "tier": "gold", "last_order": {"id": "A-1"}, "n": 3});
    rig.precall.post_ok("a", "+14155550305", posted.clone());
    let call = rig.uac.call("+14155550305", AGENT_A);
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    let header = inv
        .header("X-Precall-Context")
        .unwrap_or_else(|| panic!("no X-Precall-Context:\n{}", inv.text()));
    let decoded: Value = serde_json::from_slice(&b64url_decode(header)).unwrap();
    assert_eq!(decoded, posted);
    assert!(
        inv.header("X-Precall-customer_name").is_none(),
        "one header only"
    );
    assert_eq!(status_of(&inv), "hit");
}

#[test]
fn http_delivery_arrives_before_the_invite() {
    let stub = HttpStub::start(204, "", Duration::ZERO);
    let uas = Uas::udp(Answer::Ring200);
    let url = stub.url("/context");
    let rig = Rig::build("deliver-http", uas, 300, |cfg| {
        cfg.agents[0] = cfg.agents[0].clone().inject(&format!(
            r#"mode = "http", url = "{url}", timeout_ms = 1000"#
        ));
    });
    rig.precall
        .post_ok("a", "+14155550306", json!({"tier": "gold"}));
    let call = rig.uac.call("+14155550306", AGENT_A);
    rig.uac.send(&call.invite());
    let delivered = stub.recv(SOON).expect("the context was POSTed");
    let inv = rig.uas.expect_invite(SOON);
    assert!(delivered.at <= inv.at, "delivery before the INVITE");
    assert_eq!(delivered.path, "/context");
    let b = &delivered.body;
    assert_eq!(b["callId"], call.call_id.as_str());
    assert_eq!(b["agentId"], "a");
    assert_eq!(b["caller"], "+14155550306");
    assert_eq!(b["status"], "hit");
    assert_eq!(b["context"]["tier"], "gold");
    assert!(b["waitMs"].is_u64() && b.get("route").is_some(), "{b}");
    assert_eq!(status_of(&inv.msg), "hit");
    assert!(
        inv.msg.header("X-Precall-tier").is_none(),
        "http mode: status headers only"
    );
    assert!(inv.msg.header("X-Precall-Delivery").is_none());
}

#[test]
fn a_dead_delivery_url_still_lets_the_call_through() {
    // a port that was just free: connection refused
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let uas = Uas::udp(Answer::Ring200);
    let rig = Rig::build("deliver-dead", uas, 300, |cfg| {
        cfg.agents[0] = cfg.agents[0].clone().inject(&format!(
            r#"mode = "http", url = "http://{dead}/x", timeout_ms = 300"#
        ));
    });
    let call = rig.uac.call("+14155550307", AGENT_A);
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(
        inv.header("X-Precall-Delivery"),
        Some("failed"),
        "{}",
        inv.text()
    );
    complete_call(&rig.uac, &rig.uas, &call);
}

fn lookup_rig(name: &str, stub: &HttpStub, fallback_ms: u64) -> Rig {
    let url = stub.url("/lookup");
    Rig::build(name, Uas::udp(Answer::Ring200), fallback_ms, |cfg| {
        cfg.agents[0] = cfg.agents[0]
            .clone()
            .extra(&format!("lookup_url = \"{url}\"\nlookup_timeout_ms = 1000"));
    })
}

#[test]
fn a_pull_lookup_answering_in_100ms_releases_a_2s_call_in_about_100ms() {
    let stub = HttpStub::start(
        200,
        r#"{"customer_name":"Grace","tier":"vip"}"#,
        Duration::from_millis(100),
    );
    let rig = lookup_rig("lookup-hit", &stub, 2000);
    let call = rig.uac.call("+14155550308", AGENT_A);
    let sent = Instant::now();
    rig.uac.send(&call.invite());
    let asked = stub.recv(SOON).expect("the look-up was asked");
    assert_eq!(asked.body["agentId"], "a");
    assert_eq!(asked.body["phoneNumber"], "+14155550308");
    assert_eq!(asked.body["calledNumber"], AGENT_A);
    assert_eq!(asked.body["callId"], call.call_id.as_str());
    let inv = rig.uas.expect_invite(SOON);
    let waited = inv.at.duration_since(sent);
    assert_eq!(status_of(&inv.msg), "looked-up");
    assert_eq!(inv.msg.header("X-Precall-customer_name"), Some("Grace"));
    assert!(
        waited >= Duration::from_millis(90) && waited < Duration::from_millis(1500),
        "released by the look-up, not the 2 s fallback: {waited:?}"
    );
}

#[test]
fn a_lookup_404_falls_back() {
    let stub = HttpStub::start(404, r#"{"error":"unknown"}"#, Duration::ZERO);
    let rig = lookup_rig("lookup-404", &stub, 400);
    let call = rig.uac.call("+14155550309", AGENT_A);
    rig.uac.send(&call.invite());
    stub.recv(SOON).expect("the look-up was asked");
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "fallback");
    assert!(wait_ms_of(&inv) >= 400, "held the full fallback wait");
}

#[test]
fn a_503_from_the_first_upstream_lands_the_call_on_the_second() {
    let first = Uas::udp(Answer::Reject(503));
    let second = Uas::udp(Answer::Ring200);
    let list = format!("[\"{}\", \"{}\"]", first.uri(), second.uri());
    let cfg = Config::new(vec![Agent::new("a", AGENT_A, "")
        .upstream_toml(&list)
        .fallback_ms(200)]);
    let precall = Precall::start("failover-503", &cfg);
    let uac = Uac::udp(precall.udp);
    let call = uac.call("+14155550310", AGENT_A);
    uac.send(&call.invite());
    first.expect_invite(SOON);
    let ack = first
        .recv_request("ACK", SOON)
        .expect("precall ACKs the 503");
    assert_eq!(ack.msg.call_id(), Some(call.call_id.as_str()));
    second.expect_invite(SOON);
    complete_call(&uac, &second, &call);
}

#[test]
fn all_upstreams_down_gives_the_caller_503() {
    // TCP upstreams on ports nobody listens on: connection refused, at once
    let dead1 = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dead2 = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let list = format!("[\"sip:{dead1};transport=tcp\", \"sip:{dead2};transport=tcp\"]");
    let cfg = Config::new(vec![Agent::new("a", AGENT_A, "")
        .upstream_toml(&list)
        .fallback_ms(100)]);
    let precall = Precall::start("failover-dead", &cfg);
    let uac = Uac::udp(precall.udp);
    let call = uac.call("+14155550311", AGENT_A);
    let sent = Instant::now();
    uac.send(&call.invite());
    uac.expect_status(&call.call_id, 503, Some("INVITE"), SOON);
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "promptly, not after Timer B"
    );
}
