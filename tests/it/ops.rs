//! Operating precall, the parts an operator looks at: Prometheus `/metrics` after a known
//! set of calls, `/readyz`, per-call spans and what must never reach the log, SIP over TLS
//! (SIPp through a TLS relay, with certificates made in the test) and HTTPS, and the
//! status page `/ui/` driven in headless Chromium.
//!
//! Debian's SIPp is built without TLS (`sipp -v` lists no TLS; `-t l1` is refused), so
//! the TLS test puts a small TLS relay (tokio-rustls) on each side: SIPp speaks TCP to
//! the relay, the relay speaks TLS to precall's `tls:` listener; precall speaks TLS to
//! the agent's `sips:` upstream, which is a relay in front of a TCP SIPp UAS. Every hop
//! that touches precall is TLS, verified against a CA generated in the test (`rcgen`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::harness::{http_request, log_field, Agent, Config, Precall, TempDir};
use crate::rig::*;
use crate::sipp::{start_uas, Sipp};
use crate::uas::{Answer, Transport, Uas};

// ---------------------------------------------------------------------------------------
// Metrics.

/// `GET /metrics` as `series{labels} → value` (labels exactly as rendered).
fn scrape(precall: &Precall) -> BTreeMap<String, f64> {
    let r = http_request(precall.http, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    r.body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metric(all: &BTreeMap<String, f64>, series: &str) -> f64 {
    *all.get(series).unwrap_or_else(|| {
        panic!(
            "no series {series} in /metrics:\n{}",
            all.keys().cloned().collect::<Vec<_>>().join("\n")
        )
    })
}

#[test]
fn metrics_count_a_known_set_of_calls() {
    // 2 hits, 1 fallback, 1 bad webhook, 1 webhook with a wrong key, 1 garbage datagram.
    let rig = Rig::udp("metrics", 3_000);
    let p = &rig.precall;
    p.post_ok("a", "+14155550501", json!({"tier": "gold"}));
    p.post_ok("a", "+14155550502", json!({"tier": "silver"}));
    let key = format!("Bearer {}", p.api_key("a"));
    let bad = http_request(
        p.http,
        "POST",
        "/v1/precall",
        &[
            ("Authorization", &key),
            ("Content-Type", "application/json"),
        ],
        b"{not json",
    );
    assert_eq!(bad.status, 400);
    let wrong_key = http_request(
        p.http,
        "POST",
        "/v1/precall",
        &[
            ("Authorization", "Bearer nope"),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(wrong_key.status, 401);

    for caller in ["+14155550501", "+14155550502"] {
        let call = rig.uac.call(caller, AGENT_A);
        rig.uac.send(&call.invite());
        assert_eq!(status_of(&rig.uas.expect_invite(SOON).msg), "hit");
        complete_call(&rig.uac, &rig.uas, &call);
    }

    // The third caller has no context: held until the fallback.
    let held = rig.uac.call("+14155550503", AGENT_A);
    rig.uac.send(&held.invite());
    rig.uac
        .expect_status(&held.call_id, 100, Some("INVITE"), SOON);
    let during = scrape(p);
    assert_eq!(metric(&during, "precall_held_calls"), 1.0);
    assert_eq!(status_of(&rig.uas.expect_invite(SOON).msg), "fallback");
    complete_call(&rig.uac, &rig.uas, &held);

    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(b"\x01\x02 not SIP at all", p.udp).unwrap();
    p.log
        .wait_for(SOON, |l| l.contains("call_id=") && l.contains("fallback"))
        .expect("the fallback call was logged");

    // Counters move with the packets; wait for the garbage to be counted.
    let deadline = std::time::Instant::now() + SOON;
    let m = loop {
        let m = scrape(p);
        if m.get("precall_sip_parse_errors_total") == Some(&1.0)
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let calls = |status: &str| {
        metric(
            &m,
            &format!(r#"precall_calls_total{{agent="a",status="{status}",outcome="answered"}}"#),
        )
    };
    assert_eq!(calls("hit"), 2.0);
    assert_eq!(calls("fallback"), 1.0);
    assert_eq!(
        metric(&m, r#"precall_webhooks_total{agent="a",code="202"}"#),
        2.0
    );
    assert_eq!(
        metric(&m, r#"precall_webhooks_total{agent="a",code="400"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"precall_webhooks_total{agent="unknown",code="401"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"precall_hold_wait_seconds_count{agent="a"}"#),
        3.0
    );
    // the fallback waited ~3 s, the hits ~0: the sum sits between
    let sum = metric(&m, r#"precall_hold_wait_seconds_sum{agent="a"}"#);
    assert!((2.9..10.0).contains(&sum), "hold wait sum {sum}");
    assert_eq!(
        metric(
            &m,
            r#"precall_hold_wait_seconds_bucket{agent="a",le="0.5"}"#
        ),
        2.0
    );
    assert_eq!(metric(&m, "precall_held_calls"), 0.0);
    assert_eq!(
        metric(&m, "precall_contexts"),
        0.0,
        "both contexts consumed"
    );
    assert_eq!(metric(&m, "precall_sip_parse_errors_total"), 1.0);
    let sip = |direction: &str, kind: &str| {
        metric(
            &m,
            &format!(r#"precall_sip_messages_total{{direction="{direction}",kind="{kind}"}}"#),
        )
    };
    assert_eq!(sip("in", "INVITE"), 3.0);
    // (at least: over UDP a slow answer makes Timer A retransmit)
    assert!(sip("out", "INVITE") >= 3.0);
    assert_eq!(sip("in", "BYE"), 3.0);
    assert_eq!(sip("out", "BYE"), 3.0);
    assert_eq!(sip("in", "ACK"), 3.0);
    // 100 Trying (ours) + 180 relayed per call, and the BYE's 200 + the INVITE's 200
    // (a 2xx the agent retransmits is relayed again)
    assert_eq!(sip("out", "1xx"), 6.0);
    assert!(sip("out", "2xx") >= 6.0);
    assert_eq!(
        metric(
            &m,
            r#"precall_upstream_responses_total{agent="a",code="200"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            r#"precall_upstream_responses_total{agent="a",code="180"}"#
        ),
        3.0
    );
    // no key, no context value in any label or value
    let text = http_request(p.http, "GET", "/metrics", &[], b"").body;
    for secret in [p.api_key("a").as_str(), "gold", "silver"] {
        assert!(!text.contains(secret), "{secret} in /metrics:\n{text}");
    }
}

#[test]
fn health_and_readiness_and_not_ready_while_draining() {
    let mut rig = Rig::udp("ready", 2_000);
    let live = http_request(rig.precall.http, "GET", "/healthz", &[], b"");
    assert_eq!(live.status, 200);
    // Every listener is bound and the memory store answers: ready.
    let ready = http_request(rig.precall.http, "GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["ready"], true);

    // A held call keeps the drain going; meanwhile the node is live but not ready.
    let held = rig.uac.call("+14155550515", AGENT_A);
    rig.uac.send(&held.invite());
    rig.uac
        .expect_status(&held.call_id, 100, Some("INVITE"), SOON);
    rig.precall.signal("TERM");
    rig.precall
        .log
        .wait_for(SOON, |l| l.contains("draining"))
        .expect("the drain was logged");
    let draining = http_request(rig.precall.http, "GET", "/readyz", &[], b"");
    assert_eq!(draining.status, 503, "{}", draining.body);
    assert_eq!(draining.json()["ready"], false);
    assert!(draining.body.contains("draining"), "{}", draining.body);
    assert_eq!(
        http_request(rig.precall.http, "GET", "/healthz", &[], b"").status,
        200
    );
    rig.uas.expect_invite(SOON);
    rig.uac
        .expect_status(&held.call_id, 200, Some("INVITE"), SOON);
    let status = rig
        .precall
        .wait_exit(Duration::from_secs(10))
        .expect("exits once drained");
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------
// Logs.

#[test]
fn calls_log_in_a_span_and_never_log_keys_or_context_values() {
    let rig = Rig::udp("spans", 300);
    let p = &rig.precall;
    p.post_ok(
        "a",
        "+14155550511",
        json!({"customer_name": "Zebulon-7731", "note": "ctx-secret-4412"}),
    );
    let call = rig.uac.call("+14155550511", AGENT_A);
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(inv.header("X-Precall-note"), Some("ctx-secret-4412"));
    complete_call(&rig.uac, &rig.uas, &call);
    // A fallback call too: the defaults are context values as well.
    let other = rig.uac.call("+14155550512", AGENT_A);
    rig.uac.send(&other.invite());
    rig.uas.expect_invite(SOON);
    complete_call(&rig.uac, &rig.uas, &other);

    let line = p
        .wait_call_line(&other.call_id, SOON)
        .expect("the fallback call's summary line");
    // The summary is inside the call's span: `call{call_id=.. agent=a caller=+1..}:`.
    let span = format!(
        "call{{call_id={} agent=a caller=\"+14155550512\"}}",
        other.call_id
    );
    assert!(line.contains(&span), "{line}");
    assert_eq!(log_field(&line, "status").as_deref(), Some("fallback"));

    let log = p.log.text();
    for secret in [p.api_key("a").as_str(), "Zebulon-7731", "ctx-secret-4412"] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
}

#[test]
fn metrics_count_routes_lookups_failovers_and_rate_limited_webhooks() {
    // Caller 1 has a context that a rule routes to the verification UAS. Caller 2 has
    // none: the pull look-up answers 404 (a miss), the call falls back, the first upstream
    // answers 503 and the call fails over to the second. A second webhook inside the
    // burst of 1 is refused with 429.
    let verify = Uas::udp(Answer::Ring200);
    let first = Uas::udp(Answer::Reject(503));
    let second = Uas::udp(Answer::Ring200);
    let stub = crate::rules::HttpStub::start(404, r#"{"error":"unknown"}"#, Duration::ZERO);
    let routes = format!(
        "lookup_url = \"{}\"\nlookup_timeout_ms = 1000\n\n[[agents.routes]]\nname = \"gold\"\n\
         when = \"tier == 'gold'\"\nupstream = \"{}\"\n",
        stub.url("/lookup"),
        verify.uri()
    );
    let mut cfg = Config::new(vec![Agent::new("a", AGENT_A, "")
        .upstream_toml(&format!("[\"{}\", \"{}\"]", first.uri(), second.uri()))
        .fallback_ms(300)
        .defaults(r#"tier = "none""#)
        .extra(&routes)]);
    cfg.http_extra = "rate_limit_per_sec = 1\nrate_limit_burst = 1".to_string();
    let p = Precall::start("metrics-routes", &cfg);
    let uac = crate::uas::Uac::udp(p.udp);

    assert_eq!(
        p.post_context("a", "+14155550601", json!({"tier": "gold"}))
            .status,
        202
    );
    assert_eq!(
        p.post_context("a", "+14155550699", json!({"tier": "gold"}))
            .status,
        429
    );

    let routed = uac.call("+14155550601", AGENT_A);
    uac.send(&routed.invite());
    let inv = verify.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit");
    complete_call(&uac, &verify, &routed);

    let failed_over = uac.call("+14155550602", AGENT_A);
    uac.send(&failed_over.invite());
    stub.recv(SOON).expect("the look-up was asked");
    assert_eq!(status_of(&first.expect_invite(SOON).msg), "fallback");
    second.expect_invite(SOON);
    complete_call(&uac, &second, &failed_over);
    for call in [&routed, &failed_over] {
        p.wait_call_line(&call.call_id, SOON)
            .expect("the call was logged");
    }

    let m = scrape(&p);
    let calls = |status: &str| {
        metric(
            &m,
            &format!(r#"precall_calls_total{{agent="a",status="{status}",outcome="answered"}}"#),
        )
    };
    assert_eq!(calls("hit"), 1.0);
    assert_eq!(calls("fallback"), 1.0);
    assert_eq!(
        metric(&m, r#"precall_route_matches_total{agent="a",route="gold"}"#),
        1.0
    );
    assert_eq!(metric(&m, r#"precall_lookup_misses_total{agent="a"}"#), 1.0);
    assert_eq!(metric(&m, r#"precall_failovers_total{agent="a"}"#), 1.0);
    assert_eq!(
        metric(
            &m,
            r#"precall_upstream_responses_total{agent="a",code="503"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"precall_upstream_responses_total{agent="a",code="200"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(&m, r#"precall_webhooks_total{agent="a",code="202"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"precall_webhooks_total{agent="a",code="429"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"precall_hold_wait_seconds_count{agent="a"}"#),
        2.0
    );
    assert_eq!(metric(&m, "precall_held_calls"), 0.0);
}

// ---------------------------------------------------------------------------------------
// TLS.

/// A test CA and one server certificate it signed for `127.0.0.1` and `localhost`, as PEM
/// files in `dir`.
struct TestPki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TestPki {
    fn new(dir: &Path) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "precall test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "precall test server");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        precall::tls::server_config(&self.cert, &self.key, &[]).unwrap()
    }

    /// Trusts only the test CA.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in precall::tls::load_certs(&self.ca).unwrap() {
            roots.add(cert).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

/// A TCP⇄TLS relay on its own runtime, stopped on drop: every connection accepted on
/// `addr` is joined byte for byte to a new connection to `to`, one side in TLS.
struct Relay {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

enum RelayMode {
    /// Accept plain TCP, connect TLS to `to` (a client that cannot speak TLS).
    TcpToTls(Arc<rustls::ClientConfig>),
    /// Accept TLS, connect plain TCP to `to` (a server that cannot speak TLS).
    TlsToTcp(Arc<rustls::ServerConfig>),
}

impl Relay {
    fn start(mode: RelayMode, to: SocketAddr, port: u16) -> Relay {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(mode);
        runtime.spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mode = Arc::clone(&mode);
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    match &*mode {
                        RelayMode::TcpToTls(client) => {
                            let connector = tokio_rustls::TlsConnector::from(Arc::clone(client));
                            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
                                .unwrap()
                                .to_owned();
                            let Ok(mut tls) = connector.connect(name, outbound).await else {
                                return;
                            };
                            let mut inbound = inbound;
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut tls).await;
                        }
                        RelayMode::TlsToTcp(server) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(server));
                            let Ok(mut tls) = acceptor.accept(inbound).await else {
                                return;
                            };
                            let mut outbound = outbound;
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
                        }
                    }
                });
            }
        });
        Relay {
            addr,
            _runtime: runtime,
        }
    }
}

/// One HTTP/1.1 request over TLS (trusting only the test CA), read to the end.
fn https_get(pki: &TestPki, addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn sipp_call_over_tls_both_ways_and_https_webhook() {
    let dir = TempDir::new("tls");
    let pki = TestPki::new(dir.path());

    // The agent: SIPp UAS on TCP behind a TLS relay, reached as sips:127.0.0.1:PORT.
    let (uas, uas_port) = start_uas("uas", &dir, Transport::Tcp, 1);
    let uas_tls = Relay::start(
        RelayMode::TlsToTcp(pki.server_config()),
        SocketAddr::from(([127, 0, 0, 1], uas_port)),
        0,
    );
    let mut cfg = Config::new(vec![Agent::new(
        "a",
        AGENT_A,
        &format!("sips:127.0.0.1:{}", uas_tls.addr.port()),
    )
    .fallback_ms(5_000)]);
    cfg.extra_listen.push("tls:127.0.0.1:0".to_string());
    cfg.sip_extra = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}",
        pki.cert, pki.key, pki.ca
    );
    cfg.http_extra = format!("tls_cert = {:?}\ntls_key = {:?}", pki.cert, pki.key);
    let precall = Precall::start("tls", &cfg);
    let sip_tls = precall.listening("SIP/TLS");

    // HTTPS webhook: health over TLS, and the context for the call.
    let health = https_get(&pki, precall.http, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let posted = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(precall.http).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(pki.client_config());
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let body =
                json!({"agentId": "a", "phoneNumber": "+14155550123", "tier": "gold"}).to_string();
            let request = format!(
                "POST /v1/precall HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                precall.api_key("a"),
                body.len()
            );
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    assert!(posted.starts_with("HTTP/1.1 202"), "{posted}");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = std::net::TcpStream::connect(precall.http).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(&mut plain, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut plain, &mut buf).unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "plain HTTP must not be served on the HTTPS port"
    );

    // The carrier: SIPp UAC over TCP into a relay that speaks TLS to precall.
    let caller_tls = Relay::start(RelayMode::TcpToTls(pki.client_config()), sip_tls, 0);
    let args: Vec<String> = [
        "-inf",
        "callers.csv",
        "-s",
        AGENT_A,
        "-t",
        "t1",
        "-m",
        "1",
        "-p",
        &crate::harness::free_port_udp_tcp().to_string(),
        "-timeout",
        "30",
        "-timeout_error",
        "-recv_timeout",
        "10000",
        "-default_behaviors",
        "all,-abortunexp",
        &caller_tls.addr.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let uac = Sipp::spawn("uac", "uac.xml", &dir, &args).wait(Duration::from_secs(60));
    assert!(uac.success(), "{}", uac.report("uac"));
    let uas = uas.wait(Duration::from_secs(30));
    assert!(uas.success(), "{}", uas.report("uas"));
    assert!(
        uas.logs.contains("X-Precall-Status: hit"),
        "the call reached the agent with its context:\n{}",
        uas.logs
    );
    assert!(uas.logs.contains("X-Precall-tier: gold"), "{}", uas.logs);
    // precall's hop to the agent is TLS: its Via says so, and its Record-Route asks for
    // TLS on the way back.
    assert!(
        uas.messages.contains("Via: SIP/2.0/TLS 127.0.0.1:"),
        "{}",
        uas.messages
    );
    assert!(
        uas.messages
            .contains(&format!("Record-Route: <sip:{sip_tls};transport=tls;lr>")),
        "{}",
        uas.messages
    );
    let line = precall
        .log
        .wait_for(SOON, |l| {
            log_field(l, "status").as_deref() == Some("hit")
                && log_field(l, "outcome").as_deref() == Some("answered")
        })
        .expect("the TLS call was logged as answered");
    assert_eq!(log_field(&line, "answer").as_deref(), Some("200"));
}

#[test]
fn tls_upstream_with_an_unknown_certificate_is_refused() {
    // Precall trusts the bundled roots only (no sip.tls_ca): a self-made certificate
    // fails verification, the attempt counts as a transport error, the caller gets 503.
    let dir = TempDir::new("tls-untrusted");
    let pki = TestPki::new(dir.path());
    let uas = Uas::tcp(Answer::Ring200);
    let relay = Relay::start(RelayMode::TlsToTcp(pki.server_config()), uas.addr, 0);
    let cfg = Config::new(vec![Agent::new(
        "a",
        AGENT_A,
        &format!("sip:127.0.0.1:{};transport=tls", relay.addr.port()),
    )
    .fallback_ms(100)]);
    let precall = Precall::start("tls-untrusted", &cfg);
    let uac = crate::uas::Uac::udp(precall.udp);
    let call = uac.call("+14155550520", AGENT_A);
    uac.send(&call.invite());
    uac.expect_status(&call.call_id, 503, Some("INVITE"), Duration::from_secs(10));
    uas.expect_nothing(QUIET, "nothing may reach an unverified upstream");
    assert!(
        precall
            .log
            .wait_for(SOON, |l| l.contains("connect failed") && l.contains("TLS"))
            .is_some(),
        "the verification failure is logged"
    );
}

/// Reads from `s` until a blank line ends a message head, EOF, or `within`.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    let _ = tokio::time::timeout(within, async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the other end closes `s` (EOF or an error) within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[test]
fn tls_connections_share_the_tcp_cap_idle_timeout_and_framing() {
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new("tls-limits");
    let pki = TestPki::new(dir.path());
    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = Config::new(vec![Agent::new("a", AGENT_A, &uas.uri())]);
    cfg.extra_listen.push("tls:127.0.0.1:0".to_string());
    cfg.sip_extra = format!(
        "tls_cert = {:?}\ntls_key = {:?}\nmax_tcp_connections = 2\ntcp_idle_secs = 1\n\
         stats_secs = 1",
        pki.cert, pki.key
    );
    let precall = Precall::start("tls-limits", &cfg);
    let addr = precall.listening("SIP/TLS");
    let client = pki.client_config();
    let options = |call_id: &str, content_length: &str| {
        format!(
            "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:9;branch=z9hG4bK{call_id};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=t{call_id}\r\nTo: <sip:{addr}>\r\n\
             Call-ID: {call_id}@tls.test\r\nCSeq: 1 OPTIONS\r\nContent-Length: {content_length}\r\n\r\n"
        )
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connect = || {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client));
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                connector.connect(name, tcp).await
            }
        };
        // A whole message over TLS is framed and answered like over TCP.
        let mut talker = connect().await.expect("TLS handshake");
        talker
            .write_all(options("framed", "0").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut talker, SOON).await;
        assert!(head.starts_with("SIP/2.0 200"), "{head}");
        let talked_at = std::time::Instant::now();
        // A client that never starts its handshake holds the second place.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let silent_at = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Two are open: a third is closed at once, mid-handshake.
        let third = tokio::time::timeout(SOON, connect()).await;
        assert!(
            matches!(third, Ok(Err(_))),
            "a third TLS connection must be refused, got {:?}",
            third.map(|r| r.map(|_| "a session"))
        );
        assert!(
            !closed_within(&mut talker, Duration::from_millis(100)).await,
            "the first stays open while it is not idle"
        );
        // Both are closed after about tcp_idle_secs without a message.
        assert!(
            closed_within(&mut silent, Duration::from_secs(4)).await,
            "a TLS client silent before its handshake is closed"
        );
        let silent_for = silent_at.elapsed();
        assert!(
            silent_for >= Duration::from_millis(800),
            "closed after {silent_for:?}, want about tcp_idle_secs"
        );
        assert!(
            closed_within(&mut talker, Duration::from_secs(4)).await,
            "an idle TLS connection is closed"
        );
        let idle_for = talked_at.elapsed();
        assert!(
            idle_for >= Duration::from_millis(800),
            "closed after {idle_for:?} idle, want about tcp_idle_secs"
        );
        // Their places are free again. Bytes that cannot be framed get a 400, then the
        // connection is closed.
        let mut broken = connect().await.expect("a place is free again");
        broken
            .write_all(options("unframeable", "-1").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut broken, SOON).await;
        assert!(head.starts_with("SIP/2.0 400"), "{head}");
        assert!(head.contains("Call-ID: unframeable@tls.test"), "{head}");
        assert!(
            closed_within(&mut broken, SOON).await,
            "closed after the 400"
        );
    });
    let stats = |field: &str, at_least: u64| {
        precall
            .log
            .wait_for(SOON, |l| {
                l.contains(" stats ")
                    && log_field(l, field)
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v >= at_least)
            })
            .unwrap_or_else(|| panic!("no stats line with {field} >= {at_least}"));
    };
    stats("tcp_refused", 1);
    stats("tcp_idle_closed", 1);
    stats("tcp_unframeable", 1);
    let line = precall
        .log
        .wait_for(SOON, |l| {
            l.contains(" stats ") && log_field(l, "tcp_inbound").as_deref() == Some("0")
        })
        .expect("every inbound slot is given back");
    assert_eq!(log_field(&line, "tcp").as_deref(), Some("0"), "{line}");
    let m = scrape(&precall);
    assert!(metric(&m, "precall_sip_parse_errors_total") >= 1.0);
    assert!(
        metric(
            &m,
            r#"precall_sip_messages_total{direction="in",kind="OPTIONS"}"#
        ) >= 2.0
    );
}

// ---------------------------------------------------------------------------------------
// The status page.

const ADMIN_PASSWORD: &str = "status-page-pw-1";

fn basic_admin() -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{ADMIN_PASSWORD}"))
    )
}

#[test]
fn status_page_is_off_without_a_password_and_behind_basic_auth_with_one() {
    let off = Rig::udp("ui-off", 1_000);
    assert_eq!(
        http_request(off.precall.http, "GET", "/ui/", &[], b"").status,
        404
    );

    let rig = Rig::build("ui-auth", Uas::udp(Answer::Ring200), 1_000, |c| {
        c.http_extra = format!("admin_password = {ADMIN_PASSWORD:?}");
    });
    let http = rig.precall.http;
    let denied = http_request(http, "GET", "/ui/api/agents", &[], b"");
    assert_eq!(denied.status, 401);
    assert!(denied
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Basic")));
    use base64::Engine as _;
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:not-the-password")
    );
    assert_eq!(
        http_request(http, "GET", "/ui/", &[("Authorization", &wrong)], b"").status,
        401
    );
    let auth = basic_admin();
    let page = http_request(http, "GET", "/ui/", &[("Authorization", &auth)], b"");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<script src=\"/ui/app.js\">"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let agents = http_request(
        http,
        "GET",
        "/ui/api/agents",
        &[("Authorization", &auth)],
        b"",
    );
    let agents = agents.json();
    assert_eq!(agents["agents"][0]["id"], "a");
    assert_eq!(agents["agents"][0]["fallbackWaitMs"], 1000);
    assert_ne!(
        agents["agents"][0]["maskedKey"],
        agents["agents"][0]["apiKey"]
    );
    let test = http_request(
        http,
        "POST",
        "/ui/api/test",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        json!({"agentId": "a", "phoneNumber": "+14155550530", "tier": "gold"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(test.status, 200, "{}", test.body);
    let headers = test.json()["headers"].clone();
    assert!(
        headers
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "X-Precall-tier" && h["value"] == "gold"),
        "{headers}"
    );
}

/// Where Chromium is, or `None` (the test then says it was skipped and why).
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|bin| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Loads `url` in headless Chromium and returns the DOM after `budget_ms` of virtual time
/// (scripts and their fetches run; timers are fast-forwarded).
fn chromium_dom(bin: &str, profile: &Path, url: &str, budget_ms: u32) -> String {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut out);
        out
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

#[test]
fn status_page_in_headless_chromium_lists_agents_calls_and_runs_the_test_form() {
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED status_page_in_headless_chromium: no chromium on PATH \
             (scripts/test.sh installs the Debian package `chromium`)"
        );
        return;
    };
    let uas_b = Uas::udp(Answer::Ring200);
    let rig = Rig::build("ui-chromium", Uas::udp(Answer::Ring200), 1_000, |c| {
        c.http_extra = format!("admin_password = {ADMIN_PASSWORD:?}");
        c.agents
            .push(Agent::new("billing-bot", AGENT_B, &uas_b.uri()).fallback_ms(2_500));
    });
    // One finished call for the "last calls" table.
    rig.precall
        .post_ok("a", "+14155550540", json!({"tier": "gold"}));
    let call = rig.uac.call("+14155550540", AGENT_A);
    rig.uac.send(&call.invite());
    rig.uas.expect_invite(SOON);
    complete_call(&rig.uac, &rig.uas, &call);
    rig.precall
        .wait_call_line(&call.call_id, SOON)
        .expect("the call finished");

    let dir = TempDir::new("chromium");
    let test = json!({"agentId": "billing-bot", "phoneNumber": "+14155550541", "plan": "platinum"});
    let fragment: String = test
        .to_string()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    // Chromium takes Basic credentials from the URL for the page; the page's own
    // fetches (built from location.origin) reuse them.
    let url = format!(
        "http://admin:{ADMIN_PASSWORD}@{}/ui/#test={fragment}",
        rig.precall.http
    );
    let dom = chromium_dom(bin, dir.path(), &url, 5_000);
    let report = || format!("DOM:\n{dom}\n\nprecall log:\n{}", rig.precall.log.text());

    // Both agents are listed, with their fallback waits and masked keys.
    assert!(dom.contains(r#"data-agent="a""#), "{}", report());
    assert!(dom.contains(r#"data-agent="billing-bot""#), "{}", report());
    assert!(dom.contains("2.5 s"), "{}", report());
    assert!(dom.contains("/v1/precall</code>"), "{}", report());
    assert!(
        !dom.contains("key-billing-bot"),
        "the key is masked on the page: {}",
        report()
    );
    // The Test form ran for billing-bot and shows the headers a call would get.
    assert!(dom.contains(r#"data-tested="yes""#), "{}", report());
    assert!(
        dom.contains("<td>X-Precall-plan</td><td>platinum</td>"),
        "{}",
        report()
    );
    assert!(
        dom.contains("<td>X-Precall-Status</td><td>hit</td>"),
        "{}",
        report()
    );
    // The finished call is in the table.
    assert!(dom.contains(r#"<tr class="call">"#), "{}", report());
    assert!(dom.contains("+14155550540"), "{}", report());
    assert!(dom.contains(&call.call_id), "{}", report());
}

#[test]
fn unusable_tls_files_are_reported_by_check_and_stop_run() {
    let dir = TempDir::new("tls-bad-files");
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let mut cfg = Config::new(vec![Agent::new(
        "a",
        AGENT_A,
        "sip:127.0.0.1:5070;transport=udp",
    )]);
    cfg.extra_listen.push("tls:127.0.0.1:0".to_string());
    cfg.sip_extra = format!("tls_cert = {not_pem:?}\ntls_key = {not_pem:?}");
    let path = dir.join("precall.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let path = path.display().to_string();

    let (status, out) =
        crate::harness::run_to_exit(&["check", "-c", &path], Duration::from_secs(20));
    assert!(!status.success(), "{out}");
    assert!(out.contains("sip.tls_cert/tls_key"), "{out}");
    assert!(out.contains("not.pem"), "{out}");

    let (status, out) = crate::harness::run_to_exit(&["run", "-c", &path], Duration::from_secs(20));
    assert!(!status.success(), "{out}");
    assert!(out.contains("TLS for SIP"), "{out}");
    assert!(
        !out.contains("listening for"),
        "nothing is bound before the certificates are read: {out}"
    );
}
