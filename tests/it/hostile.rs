//! Issue 7 against the real binary: no open relay, `allowed_peers`, scanner traffic, the
//! SIP limits (INVITE rate, held calls, TCP connections and idle timeout, message size),
//! the webhook's rate limit, signatures and store bound, and faults (upstream unreachable
//! over TCP and UDP, upstream silent, out of file descriptors, a UDP flood).
//!
//! Every flood is bounded in count and aimed at 127.0.0.1 only. Sources other than the
//! agent use other loopback addresses (127.0.0.X), so precall sees them as strangers.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{http_request, log_field, Agent, Config, Precall};
use crate::raw::{plain_call, recv_where, start, udp_on_alias, RawTcp};
use crate::rig::{complete_call, AGENT_A, QUIET, SOON};
use crate::sipmsg::SipMsg;
use crate::uas::{token, Answer, Uac, Uas};

/// A request from `from` (Via, Contact), with `extra` header lines.
fn request(from: SocketAddr, method: &str, ruri: &str, to: &str, extra: &str) -> (String, Vec<u8>) {
    let call_id = format!("{}@hostile.test", token("h"));
    let bytes = format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK{b};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+14155550777@{from}>;tag={t}\r\nTo: {to}\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:+14155550777@{from}>\r\n\
         {extra}Content-Length: 0\r\n\r\n",
        b = token("b"),
        t = token("t"),
    );
    (call_id, bytes.into_bytes())
}

/// The status of the first response to `call_id` on `sock` within `timeout`.
fn answer(sock: &UdpSocket, call_id: &str, timeout: Duration) -> Option<SipMsg> {
    recv_where(sock, timeout, |m| {
        m.call_id() == Some(call_id) && m.status().is_some_and(|s| s >= 200)
    })
}

/// The last `stats` line's value of `field`, waiting up to `timeout` for `ok(value)`.
fn stats_until(p: &Precall, field: &str, timeout: Duration, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let last = p
            .log
            .lines()
            .iter()
            .rev()
            .find(|l| l.contains(" stats "))
            .and_then(|l| log_field(l, field))
            .and_then(|v| v.parse().ok());
        if let Some(v) = last {
            if ok(v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "stats {field} = {last:?}, never as expected; log:\n{}",
            p.log.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agent_config(uas: &Uas, fallback_ms: u64) -> Config {
    Config::new(vec![
        Agent::new("a", AGENT_A, &uas.uri()).fallback_ms(fallback_ms)
    ])
}

#[test]
fn precall_is_no_open_relay() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let p = start("no-relay", &cfg, &[("sip", "stats_secs = 1")]);
    let sock = udp_on_alias(0);
    let me = sock.local_addr().unwrap();
    let ours = format!("Route: <sip:{};lr>\r\n", p.udp);
    let attempts = [
        // Along our Route, then on to the victim in the Request-URI.
        ("BYE", "sip:victim@203.0.113.1", ours.clone()),
        // Along our Route, then on to the victim as the next Route.
        (
            "INFO",
            "sip:victim@203.0.113.1",
            format!("{ours}Route: <sip:203.0.113.1;lr>\r\n"),
        ),
        ("MESSAGE", "sip:victim@203.0.113.1:5060", ours.clone()),
    ];
    for (method, ruri, routes) in attempts {
        let (id, bytes) = request(me, method, ruri, "<sip:victim@203.0.113.1>;tag=x1", &routes);
        sock.send_to(&bytes, p.udp).unwrap();
        let r = answer(&sock, &id, SOON).unwrap_or_else(|| panic!("{method}: no answer"));
        assert_eq!(r.status(), Some(403), "{method}: {}", r.start_line);
    }
    // A new INVITE for a number nobody serves, at another host: 404, nothing forwarded.
    let (id, bytes) = request(
        me,
        "INVITE",
        "sip:999@203.0.113.1",
        "<sip:999@203.0.113.1>",
        "",
    );
    sock.send_to(&bytes, p.udp).unwrap();
    assert_eq!(answer(&sock, &id, SOON).and_then(|m| m.status()), Some(404));
    uas.expect_nothing(QUIET, "no refused request reaches the agent");
    // For the agent's number, whatever the host: only ever to the agent's upstream.
    let (id, bytes) = request(
        me,
        "INVITE",
        &format!("sip:{AGENT_A}@203.0.113.1"),
        &format!("<sip:{AGENT_A}@203.0.113.1>"),
        "",
    );
    sock.send_to(&bytes, p.udp).unwrap();
    let inv = uas.expect_invite(SOON);
    assert_eq!(inv.msg.call_id(), Some(id.as_str()));
    stats_until(&p, "relay_refused", SOON, |n| n == 3);
}

#[test]
fn allowed_peers_keep_strangers_out() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let p = start(
        "allowed-peers",
        &cfg,
        &[("sip", "allowed_peers = [\"127.0.0.1/32\"]")],
    );
    let sock = udp_on_alias(0);
    let me = sock.local_addr().unwrap();
    for method in ["INVITE", "OPTIONS", "REGISTER"] {
        let (id, bytes) = request(
            me,
            method,
            &format!("sip:{AGENT_A}@{}", p.udp),
            &format!("<sip:{AGENT_A}@{}>", p.udp),
            "",
        );
        sock.send_to(&bytes, p.udp).unwrap();
        let r = answer(&sock, &id, SOON).unwrap_or_else(|| panic!("{method}: no answer"));
        assert_eq!(r.status(), Some(403), "{method} from {me}");
    }
    uas.expect_nothing(QUIET, "a stranger's INVITE never reaches the agent");
    // 127.0.0.1 is allowed: calls work.
    let uac = Uac::udp(p.udp);
    plain_call(&uac, &uas, "+14155550701");
}

#[test]
fn scanner_traffic_costs_little_and_never_reaches_an_agent() {
    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = agent_config(&uas, 100);
    cfg.default_agent = Some("a".to_string());
    let p = start("scanners", &cfg, &[("sip", "stats_secs = 1")]);
    let sock = udp_on_alias(0);
    let me = sock.local_addr().unwrap();
    // What a friendly-scanner sweep sends: OPTIONS and REGISTER for extensions, with its
    // User-Agent. Dropped without an answer.
    let mut sent = 0u64;
    for ext in 100..400 {
        for method in ["OPTIONS", "REGISTER", "INVITE"] {
            let (_, bytes) = request(
                me,
                method,
                &format!("sip:{ext}@{}", p.udp),
                &format!("<sip:{ext}@{}>", p.udp),
                "User-Agent: friendly-scanner\r\n",
            );
            sock.send_to(&bytes, p.udp).unwrap();
            sent += 1;
        }
    }
    assert!(
        recv_where(&sock, QUIET, |_| true).is_none(),
        "a scanner gets no answer"
    );
    stats_until(&p, "scanners", SOON, |n| n == sent);
    // Without the give-away User-Agent: REGISTER 405, MESSAGE 405, OPTIONS answered by
    // precall itself; none of it reaches the agent (the default agent takes any number).
    for (method, code) in [
        ("REGISTER", 405),
        ("MESSAGE", 405),
        ("SUBSCRIBE", 405),
        ("OPTIONS", 200),
    ] {
        let (id, bytes) = request(
            me,
            method,
            &format!("sip:100@{}", p.udp),
            &format!("<sip:100@{}>", p.udp),
            "User-Agent: Some PBX\r\n",
        );
        sock.send_to(&bytes, p.udp).unwrap();
        let r = answer(&sock, &id, SOON).unwrap_or_else(|| panic!("{method}: no answer"));
        assert_eq!(r.status(), Some(code), "{method}");
    }
    uas.expect_nothing(QUIET, "scanner traffic never reaches an agent");
    let uac = Uac::udp(p.udp);
    plain_call(&uac, &uas, "+14155550702");
}

#[test]
fn invites_over_the_per_source_rate_get_503() {
    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = agent_config(&uas, 10_000);
    // Only 127.0.0.1 is trusted (exempt); the test source is 127.0.0.X.
    cfg.trusted_peers = vec!["127.0.0.1/32".to_string()];
    let p = start(
        "invite-rate",
        &cfg,
        &[
            ("sip", "invite_rate_per_sec = 2"),
            ("sip", "invite_burst = 5"),
        ],
    );
    let sock = udp_on_alias(0);
    let me = sock.local_addr().unwrap();
    let mut held = 0;
    let mut refused = Vec::new();
    for _ in 0..10 {
        let (id, bytes) = request(
            me,
            "INVITE",
            &format!("sip:{AGENT_A}@{}", p.udp),
            &format!("<sip:{AGENT_A}@{}>", p.udp),
            "",
        );
        sock.send_to(&bytes, p.udp).unwrap();
        let r = recv_where(&sock, SOON, |m| m.call_id() == Some(id.as_str())).expect("an answer");
        match r.status() {
            Some(100) => held += 1,
            Some(503) => refused.push(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(held, 5, "the burst");
    assert_eq!(refused.len(), 5);
    assert!(refused.iter().all(|r| r
        .header("Retry-After")
        .is_some_and(|v| v.parse::<u64>().unwrap() >= 1)));
    // The trusted carrier is not limited.
    let uac = Uac::udp(p.udp);
    for i in 0..8 {
        let call = uac.call(&format!("+141555507{i:02}"), AGENT_A);
        uac.send(&call.invite());
        uac.recv_where(SOON, &|m| {
            m.call_id() == Some(call.call_id.as_str()) && m.status() == Some(100)
        })
        .expect("a 100 for the trusted carrier");
    }
}

#[test]
fn held_calls_are_capped_and_the_next_gets_503() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 10_000);
    let p = start("held-cap", &cfg, &[("sip", "max_held_calls = 3")]);
    let uac = Uac::udp(p.udp);
    let calls: Vec<_> = (0..3)
        .map(|i| uac.call(&format!("+141555508{i:02}"), AGENT_A))
        .collect();
    for c in &calls {
        uac.send(&c.invite());
        uac.expect_status(&c.call_id, 100, Some("INVITE"), SOON);
    }
    let fourth = uac.call("+14155550810", AGENT_A);
    uac.send(&fourth.invite());
    let r = uac.expect_status(&fourth.call_id, 503, Some("INVITE"), SOON);
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!(
        (1..=10).contains(&retry),
        "until the first held call falls back: {retry}"
    );
    // A webhook releases one: room for a new call, which is held as usual.
    p.post_ok("a", "+14155550800", json!({ "customer_name": "Ada" }));
    assert_eq!(
        uas.expect_invite(SOON).msg.call_id(),
        Some(calls[0].call_id.as_str())
    );
    let fifth = uac.call("+14155550811", AGENT_A);
    uac.send(&fifth.invite());
    uac.expect_status(&fifth.call_id, 100, Some("INVITE"), SOON);
}

#[test]
fn tcp_connections_are_capped() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let p = start(
        "tcp-cap",
        &cfg,
        &[
            ("sip", "max_tcp_connections = 4"),
            ("sip", "stats_secs = 1"),
        ],
    );
    let mut open: Vec<RawTcp> = (0..4).map(|_| RawTcp::connect(p.tcp)).collect();
    // Give the acceptor time to take all four.
    std::thread::sleep(Duration::from_millis(300));
    let mut fifth = RawTcp::connect(p.tcp);
    assert!(
        fifth.wait_closed(SOON),
        "the fifth connection is closed at once"
    );
    for c in &mut open {
        assert!(
            !c.wait_closed(Duration::from_millis(10)),
            "the first four stay open"
        );
    }
    stats_until(&p, "tcp_refused", SOON, |n| n >= 1);
    // One goes away: a new one is served.
    drop(open.pop());
    std::thread::sleep(Duration::from_millis(300));
    let tcp = Uac::tcp(p.tcp);
    let call = tcp.call("+14155550820", AGENT_A);
    tcp.send(&call.invite());
    assert_eq!(
        uas.expect_invite(SOON).msg.call_id(),
        Some(call.call_id.as_str())
    );
    complete_call(&tcp, &uas, &call);
}

#[test]
fn slowloris_and_idle_tcp_connections_are_closed() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let p = start("slowloris", &cfg, &[("sip", "tcp_idle_secs = 1")]);
    let t0 = Instant::now();
    let mut silent = RawTcp::connect(p.tcp);
    let mut trickle = RawTcp::connect(p.tcp);
    let mut pinger = RawTcp::connect(p.tcp);
    let head = format!(
        "INVITE sip:{AGENT_A}@{} SIP/2.0\r\nVia: SIP/2.0/TCP x;branch=z9hG4bKslow\r\n",
        p.tcp
    );
    let mut trickle_closed_at = None;
    let mut i = 0;
    while Instant::now() - t0 < Duration::from_secs(4) {
        // A byte of a message that never ends, every 100 ms.
        if trickle_closed_at.is_none() {
            trickle.send(&head.as_bytes()[i % head.len()..i % head.len() + 1]);
            i += 1;
            if trickle.wait_closed(Duration::from_millis(100)) {
                trickle_closed_at = Some(t0.elapsed());
            }
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
        // A whole OPTIONS every 300 ms keeps a connection alive.
        if i % 3 == 0 {
            let (_, bytes) = request(
                "127.0.0.1:9".parse().unwrap(),
                "OPTIONS",
                &format!("sip:{}", p.tcp),
                &format!("<sip:{}>", p.tcp),
                "",
            );
            pinger.send(&bytes);
        }
    }
    let at = trickle_closed_at.expect("the trickling connection was closed");
    assert!(
        at >= Duration::from_millis(800) && at <= Duration::from_millis(3000),
        "closed after {at:?}, want about tcp_idle_secs"
    );
    assert!(
        silent.wait_closed(Duration::from_millis(10)),
        "the silent one too"
    );
    assert!(
        !pinger.wait_closed(Duration::from_millis(10)),
        "a connection carrying whole messages stays"
    );
}

#[test]
fn oversized_messages_are_refused() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let p = start("max-size", &cfg, &[("sip", "max_message_bytes = 2000")]);
    let uac = Uac::udp(p.udp);
    let call = uac.call("+14155550830", AGENT_A);
    let big = "X-Filler: ".to_string() + &"x".repeat(3000) + "\r\n";
    uac.send(&call.invite_with(&big));
    let r = uac.expect_status(&call.call_id, 400, None, SOON);
    assert!(
        r.start_line.contains("exceeds the limit"),
        "{}",
        r.start_line
    );
    uas.expect_nothing(QUIET, "not forwarded");
    // Over TCP: 400, and the connection is closed (its framing cannot be trusted).
    let mut conn = RawTcp::connect(p.tcp);
    let tcp_call = Uac::tcp(p.tcp).call("+14155550831", AGENT_A);
    conn.send(&tcp_call.invite_with(&big));
    let r = conn.recv(SOON).expect("a 400 over TCP");
    assert_eq!(r.status(), Some(400));
    assert!(conn.wait_closed(SOON));
    plain_call(&uac, &uas, "+14155550832");
}

// ------------------------------------------------------------------------- webhook

fn post(
    p: &Precall,
    key: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> crate::harness::HttpResponse {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    http_request(p.http, "POST", "/v1/precall", &headers, body.as_bytes())
}

#[test]
fn webhook_rate_limit_signatures_and_store_bound() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 2000);
    let secret = "whsec_it_0123456789";
    let p = start(
        "webhook-security",
        &cfg,
        &[
            ("http", "rate_limit_per_sec = 1"),
            ("http", "rate_limit_burst = 3"),
            ("store", "max_contexts = 2"),
            ("agents.a", &format!("webhook_secret = \"{secret}\"")),
        ],
    );
    let key = p.api_key("a");
    let body = |phone: &str| {
        json!({ "agentId": "a", "phoneNumber": phone, "customer_name": "Signed" }).to_string()
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let sign = |b: &str, t: u64| precall_signature(secret, t, b);

    // Unsigned, badly signed, stale: 401, nothing cached.
    let b1 = body("+14155550840");
    let r = post(&p, &key, &b1, &[]);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("missing X-Precall-Signature"))
    );
    let stale = sign(&b1, now() - 600);
    let r = post(&p, &key, &b1, &[("X-Precall-Signature", &stale)]);
    assert_eq!(r.status, 401, "{}", r.body);
    // Signed: accepted, and the call gets the context.
    let good = sign(&b1, now());
    let r = post(&p, &key, &b1, &[("X-Precall-Signature", &good)]);
    assert_eq!(r.status, 202, "{}", r.body);
    let uac = Uac::udp(p.udp);
    let call = uac.call("+14155550840", AGENT_A);
    uac.send(&call.invite());
    let inv = uas.expect_invite(SOON).msg;
    assert_eq!(inv.header("X-Precall-customer_name"), Some("Signed"));
    complete_call(&uac, &uas, &call);

    // The burst of 3 is spent (three requests so far): the next gets 429 + Retry-After.
    let b2 = body("+14155550841");
    let r = post(&p, &key, &b2, &[("X-Precall-Signature", &sign(&b2, now()))]);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("Retry-After").is_some());
    // A wrong key is still a 401, never a 429.
    assert_eq!(post(&p, "not-a-key", &b2, &[]).status, 401);

    // After a rest, two new keys fit the store (the first was consumed by the call)...
    std::thread::sleep(Duration::from_millis(2100));
    for phone in ["+14155550842", "+14155550843"] {
        let b = body(phone);
        let r = post(&p, &key, &b, &[("X-Precall-Signature", &sign(&b, now()))]);
        assert_eq!(r.status, 202, "{phone}: {}", r.body);
    }
    // ...and a third does not: 503, with Retry-After.
    std::thread::sleep(Duration::from_millis(1100));
    let b3 = body("+14155550844");
    let r = post(&p, &key, &b3, &[("X-Precall-Signature", &sign(&b3, now()))]);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("context store full"))
    );
    assert!(r.header("Retry-After").is_some());
    // The key never shows in the log.
    assert!(!p.log.text().contains(&key), "the API key was logged");
    assert!(!p.log.text().contains(secret), "the secret was logged");
}

/// The signature a sender computes (README "Webhook signatures"), here with `openssl`-free
/// Rust: HMAC-SHA256 by hand would be a second implementation; use the library's.
fn precall_signature(secret: &str, t: u64, body: &str) -> String {
    precall::webhook::signature::sign(secret.as_bytes(), t, body.as_bytes())
}

// -------------------------------------------------------------------------- faults

/// A port on 127.0.0.1 where nothing listens (TCP or UDP).
fn dead_port() -> u16 {
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = t.local_addr().unwrap().port();
    drop(t);
    port
}

#[test]
fn unreachable_tcp_upstream_gets_503_at_once() {
    let port = dead_port();
    let cfg = Config::new(vec![Agent::new(
        "a",
        AGENT_A,
        &format!("sip:127.0.0.1:{port};transport=tcp"),
    )
    .fallback_ms(50)]);
    let p = Precall::start("tcp-refused", &cfg);
    let uac = Uac::udp(p.udp);
    let call = uac.call("+14155550850", AGENT_A);
    let t0 = Instant::now();
    uac.send(&call.invite());
    uac.expect_status(&call.call_id, 503, Some("INVITE"), SOON);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn unreachable_udp_upstream_gets_503_at_once_not_after_timer_b() {
    // A free port below the ephemeral range (32768+ on Linux): the other tests bind port 0,
    // so none of them can take it between this check and the call, which would swallow
    // the datagram instead of answering it with ICMP port unreachable.
    let port = (20_000u16 + (std::process::id() % 5_000) as u16..30_000)
        .find(|p| UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free UDP port below the ephemeral range");
    let cfg = Config::new(vec![Agent::new(
        "a",
        AGENT_A,
        &format!("sip:127.0.0.1:{port};transport=udp"),
    )
    .fallback_ms(50)]);
    let p = start("udp-refused", &cfg, &[("sip", "stats_secs = 1")]);
    let uac = Uac::udp(p.udp);
    let call = uac.call("+14155550851", AGENT_A);
    let t0 = Instant::now();
    uac.send(&call.invite());
    uac.expect_status(&call.call_id, 503, Some("INVITE"), SOON);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "503 after {:?}: the ICMP port unreachable was not seen (Timer B is 32 s)",
        t0.elapsed()
    );
    stats_until(&p, "icmp_errors", SOON, |n| n >= 1);
}

#[test]
fn silent_upstream_gets_408_after_timer_b() {
    let uas = Uas::udp(Answer::Silent);
    let cfg = agent_config(&uas, 50);
    // T1 = 50 ms: Timer B = 64·T1 = 3.2 s.
    let p = start("timer-b", &cfg, &[("sip", "t1_ms = 50")]);
    let uac = Uac::udp(p.udp);
    let call = uac.call("+14155550852", AGENT_A);
    uac.send(&call.invite());
    let t0 = Instant::now();
    uac.expect_status(&call.call_id, 100, Some("INVITE"), SOON);
    uac.expect_status(&call.call_id, 408, Some("INVITE"), Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(3000) && took < Duration::from_millis(6000),
        "408 after {took:?}, want 3.2 s + the 50 ms fallback"
    );
    // Timer A retransmitted the INVITE meanwhile (50, 100, 200, 400, 800, 1600 ms).
    let mut invites = 0;
    while uas
        .recv_request("INVITE", Duration::from_millis(10))
        .is_some()
    {
        invites += 1;
    }
    assert!(
        invites >= 5,
        "only {invites} INVITEs reached the silent agent"
    );
}

#[test]
fn out_of_file_descriptors_is_survived() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("prlimit not installed: skipping");
        return;
    }
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let toml = crate::raw::toml_with(&cfg, &[("sip", "stats_secs = 1")]);
    let p = Precall::start_with("no-fds", &cfg, &toml, &["prlimit", "--nofile=48:48", "--"]);
    let uac = Uac::udp(p.udp);
    plain_call(&uac, &uas, "+14155550860");
    // More connections than descriptors: accept fails with EMFILE.
    let hogs: Vec<std::net::TcpStream> = (0..80)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&p.tcp, SOON).ok())
        .collect();
    assert!(hogs.len() >= 40, "only {} connections opened", hogs.len());
    p.log
        .wait_for(SOON, |l| l.contains("TCP accept failed"))
        .expect("the accept failure is logged");
    stats_until(&p, "accept_errors", SOON, |n| n >= 1);
    // UDP calls go on regardless.
    plain_call(&uac, &uas, "+14155550861");
    // And once the connections are gone, TCP is served again.
    drop(hogs);
    std::thread::sleep(Duration::from_millis(500));
    let tcp = Uac::tcp(p.tcp);
    let call = tcp.call("+14155550862", AGENT_A);
    tcp.send(&call.invite());
    let deadline = Instant::now() + SOON;
    loop {
        let inv = uas.recv_request("INVITE", deadline.saturating_duration_since(Instant::now()));
        match inv {
            Some(r) if r.msg.call_id() == Some(call.call_id.as_str()) => break,
            Some(_) => continue,
            None => panic!("the TCP call after the descriptors came back was not forwarded"),
        }
    }
    complete_call(&tcp, &uas, &call);
    let mut p = p;
    assert!(p.is_running());
}

#[test]
fn a_full_udp_buffer_is_counted_and_calls_go_on() {
    let uas = Uas::udp(Answer::Ring200);
    let cfg = agent_config(&uas, 100);
    let p = start("udp-flood", &cfg, &[("sip", "stats_secs = 1")]);
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Stop precall so nothing reads the socket, flood it with far more than its receive
    // buffer holds (4 MiB at most), then let it run again.
    const N: u64 = 20_000;
    let datagram = vec![b'#'; 1000];
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &p.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} failed");
    };
    signal("-STOP");
    for _ in 0..N {
        let _ = junk.send_to(&datagram, p.udp);
    }
    signal("-CONT");
    let uac = Uac::udp(p.udp);
    plain_call(&uac, &uas, "+14155550870");
    // Every datagram is accounted for: read and refused as garbage, or dropped by the
    // kernel (and the drop is logged).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let line = p
            .log
            .lines()
            .into_iter()
            .rev()
            .find(|l| l.contains(" stats "))
            .unwrap_or_default();
        let field = |f: &str| {
            log_field(&line, f)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if field("parse_errors") + field("udp_drops") == N {
            assert!(field("udp_drops") > 0, "the buffer never filled: {line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every datagram is accounted for: {line}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.log
        .wait_for(SOON, |l| l.contains("the kernel dropped UDP datagrams"))
        .expect("the drops are logged");
    let mut p = p;
    assert!(p.is_running());
}
