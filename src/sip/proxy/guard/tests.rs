//! Guard tests, sans IO: scanners, allowed peers, 416/420/405/481/505, the INVITE rate and
//! the held-call cap, no open relay, RFC 2543 transactions; then property tests of the
//! forward-editor and of context injection at the proxy level.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::agent::Agents;
use crate::config::{
    AgentConfig, CallerSource, Config, HttpConfig, InjectConfig, ListenAddr, Rate, SipConfig,
    SipLimits, StoreConfig, Transport, Upstream,
};
use crate::inject::{self, Status};
use crate::sip::message::{HeaderName, Message};
use crate::sip::parse::parse_datagram;
use crate::sip::proxy::{Listener, Output, Peer, Proxy, Settled, Transmit};
use crate::store::Context;

const US: phonenumber::country::Id = phonenumber::country::Id::US;
const UAS: &str = "127.0.0.1:5070";
/// Precall itself.
const US_ADDR: &str = "127.0.0.1:5060";

fn agent() -> AgentConfig {
    AgentConfig {
        id: "a".to_string(),
        api_keys: vec!["k".to_string()],
        numbers: vec!["+15550100".to_string()],
        upstreams: vec![Upstream {
            uri: format!("sip:{UAS}"),
            transport: Transport::Udp,
            addr: UAS.parse().unwrap(),
        }],
        upstream_timeout: Duration::from_millis(2000),
        health_check: None,
        lookup: None,
        routes: Vec::new(),
        default_region: US,
        fallback_wait: Duration::from_millis(2000),
        defaults: json!({"customer_name": "there"})
            .as_object()
            .unwrap()
            .clone(),
        inject: InjectConfig::default(),
        caller_sources: vec![CallerSource::Pai, CallerSource::From],
        webhook_secret: None,
    }
}

fn proxy_with(tweak: impl FnOnce(&mut SipLimits)) -> Proxy {
    let mut limits = SipLimits::default();
    tweak(&mut limits);
    let config = Config {
        sip: SipConfig {
            listen: vec![ListenAddr {
                transport: Transport::Udp,
                addr: US_ADDR.parse().unwrap(),
            }],
            trusted_peers: vec!["127.0.0.0/8".parse().unwrap()],
            default_agent: None,
            limits,
            ..SipConfig::default()
        },
        http: HttpConfig {
            rate_limit: None,
            ..HttpConfig::default()
        },
        store: StoreConfig::default(),
        agents: vec![agent()],
    };
    let listeners = vec![Listener {
        transport: Transport::Udp,
        addr: US_ADDR.parse().unwrap(),
    }];
    Proxy::new(Arc::new(Agents::new(Arc::new(config))), listeners, 7)
}

fn proxy() -> Proxy {
    proxy_with(|_| {})
}

fn peer(addr: &str) -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: addr.parse().unwrap(),
        conn: None,
        listener: 0,
    }
}

/// A carrier on loopback (trusted, so not rate limited).
fn carrier() -> Peer {
    peer("127.0.0.1:5061")
}

/// A request from `source` with the given start line, extra header lines and To tag.
fn request(method: &str, ruri: &str, branch: &str, source: &str, extra: &str) -> Bytes {
    Bytes::from(format!(
        "{method} {ruri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {source};branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:+14155550123@{source}>;tag=f1\r\n\
         To: <sip:+15550100@{US_ADDR}>\r\n\
         Call-ID: {branch}@test\r\n\
         CSeq: 1 {method}\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    ))
}

fn invite(branch: &str, source: &str) -> Bytes {
    request(
        "INVITE",
        &format!("sip:+15550100@{US_ADDR}"),
        branch,
        source,
        "",
    )
}

fn drain(p: &mut Proxy) -> Vec<Output> {
    std::iter::from_fn(|| p.poll_output()).collect()
}

fn transmits(outs: &[Output]) -> Vec<Transmit> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Transmit(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn parsed(t: &Transmit) -> Message {
    parse_datagram(t.bytes.clone(), 65535).unwrap()
}

/// The one answer to a request that must not go anywhere else.
fn only_answer(p: &mut Proxy) -> Message {
    let outs = drain(p);
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Lookup { .. })),
        "no call is held for a refused request"
    );
    let t = transmits(&outs);
    assert_eq!(t.len(), 1, "exactly one answer: {t:?}");
    let m = parsed(&t[0]);
    assert!(m.status().is_some(), "a response, not a forwarded request");
    m
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.header_by_name(name)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[test]
fn scanners_get_no_answer() {
    let mut p = proxy();
    let t0 = Instant::now();
    for method in ["OPTIONS", "REGISTER", "INVITE"] {
        let req = request(
            method,
            "sip:100@127.0.0.1",
            &format!("z9hG4bKscan{method}"),
            "192.0.2.66:5060",
            "User-Agent: friendly-scanner\r\n",
        );
        p.handle_datagram(t0, peer("192.0.2.66:5060"), req);
        assert!(drain(&mut p).is_empty(), "{method} from a scanner");
    }
    assert_eq!(p.guard_stats().scanners_dropped, 3);
    // Turned off, the same OPTIONS is answered like any other.
    let mut p = proxy_with(|l| l.drop_scanners = false);
    let req = request(
        "OPTIONS",
        "sip:100@127.0.0.1",
        "z9hG4bKscan2",
        "192.0.2.66:5060",
        "User-Agent: friendly-scanner\r\n",
    );
    p.handle_datagram(t0, peer("192.0.2.66:5060"), req);
    assert_eq!(only_answer(&mut p).status(), Some(200));
}

#[test]
fn allowed_peers_restrict_who_may_send() {
    let mut p = proxy_with(|l| l.allowed_peers = vec!["10.0.0.0/8".parse().unwrap()]);
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        peer("192.0.2.50:5060"),
        invite("z9hG4bKout", "192.0.2.50:5060"),
    );
    assert_eq!(only_answer(&mut p).status(), Some(403));
    // An ACK from outside is dropped, never answered.
    let ack = request(
        "ACK",
        "sip:+15550100@127.0.0.1",
        "z9hG4bKout",
        "192.0.2.50:5060",
        "",
    );
    p.handle_datagram(t0, peer("192.0.2.50:5060"), ack);
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.guard_stats().peers_refused, 2);
    // Inside the list: held as usual.
    p.handle_datagram(
        t0,
        peer("10.1.2.3:5060"),
        invite("z9hG4bKin", "10.1.2.3:5060"),
    );
    let outs = drain(&mut p);
    assert!(outs.iter().any(|o| matches!(o, Output::Lookup { .. })));
    // The agent's own address is always allowed (its BYE must reach the caller).
    let bye = in_dialog(
        "BYE",
        "sip:caller@10.1.2.3:5060",
        "z9hG4bKbye",
        UAS,
        &format!("Route: <sip:{US_ADDR};lr>\r\n"),
    );
    p.handle_datagram(t0, peer(UAS), bye);
    let t = transmits(&drain(&mut p));
    assert_eq!(t.len(), 1);
    assert!(t[0].bytes.starts_with(b"BYE "), "forwarded, not refused");
    assert_eq!(t[0].to, "10.1.2.3:5060".parse::<SocketAddr>().unwrap());
}

#[test]
fn unknown_request_uri_scheme_gets_416() {
    let mut p = proxy();
    for (i, ruri) in [
        "nobodyKnowsThisScheme:totallyopaquecontent",
        "soap.beep://192.0.2.103:3002",
        "http://example.com/x",
    ]
    .iter()
    .enumerate()
    {
        for method in ["INVITE", "OPTIONS"] {
            p.handle_datagram(
                Instant::now(),
                carrier(),
                request(
                    method,
                    ruri,
                    &format!("z9hG4bKs{i}{method}"),
                    "127.0.0.1:5061",
                    "",
                ),
            );
            assert_eq!(only_answer(&mut p).status(), Some(416), "{method} {ruri}");
        }
    }
    // tel: is understood: routed on its number.
    p.handle_datagram(
        Instant::now(),
        carrier(),
        request(
            "INVITE",
            "tel:+15550100",
            "z9hG4bKtel",
            "127.0.0.1:5061",
            "",
        ),
    );
    assert!(drain(&mut p)
        .iter()
        .any(|o| matches!(o, Output::Lookup { .. })));
}

#[test]
fn proxy_require_gets_420_naming_the_extensions() {
    let mut p = proxy();
    let extra = "Require: nothingSupportsThis\r\n\
                 Proxy-Require: noProxiesSupportThis, norDoAnyProxiesSupportThis\r\n";
    for method in ["OPTIONS", "INVITE"] {
        p.handle_datagram(
            Instant::now(),
            carrier(),
            request(
                method,
                "sip:+15550100@127.0.0.1",
                &format!("z9hG4bKpr{method}"),
                "127.0.0.1:5061",
                extra,
            ),
        );
        let r = only_answer(&mut p);
        assert_eq!(r.status(), Some(420));
        assert_eq!(
            header(&r, "Unsupported"),
            Some("noProxiesSupportThis, norDoAnyProxiesSupportThis")
        );
    }
    // Require alone is the UAS's business: the INVITE is held as usual.
    p.handle_datagram(
        Instant::now(),
        carrier(),
        request(
            "INVITE",
            "sip:+15550100@127.0.0.1",
            "z9hG4bKreq",
            "127.0.0.1:5061",
            "Require: 100rel\r\n",
        ),
    );
    assert!(drain(&mut p)
        .iter()
        .any(|o| matches!(o, Output::Lookup { .. })));
}

#[test]
fn out_of_dialog_requests_never_reach_an_agent() {
    let mut p = proxy();
    let cases = [
        ("REGISTER", "sip:127.0.0.1", 405),
        ("REGISTER", "sip:+15550100@127.0.0.1", 405),
        ("MESSAGE", "sip:+15550100@127.0.0.1", 405),
        ("SUBSCRIBE", "sip:+15550100@127.0.0.1", 405),
        ("NEWMETHOD", "sip:+15550100@127.0.0.1", 405),
        ("BYE", "sip:+15550100@127.0.0.1", 481),
        ("INFO", "sip:+15550100@127.0.0.1", 481),
        ("OPTIONS", "sip:+15550100@example.com", 200),
        ("OPTIONS", "sip:127.0.0.1:5060", 200),
    ];
    for (i, (method, ruri, code)) in cases.iter().enumerate() {
        p.handle_datagram(
            Instant::now(),
            carrier(),
            request(
                method,
                ruri,
                &format!("z9hG4bKood{i}"),
                "127.0.0.1:5061",
                "",
            ),
        );
        let r = only_answer(&mut p);
        assert_eq!(r.status(), Some(*code), "{method} {ruri}");
        if *code == 405 {
            assert!(header(&r, "Allow").is_some_and(|a| a.contains("INVITE")));
        }
    }
    assert_eq!(p.guard_stats().out_of_dialog_refused, 7);
    // Max-Forwards 0 on an OPTIONS that is not for precall: 483 (RFC 4475 zeromf).
    let zero = String::from_utf8(
        request(
            "OPTIONS",
            "sip:user@example.com",
            "z9hG4bKmf0",
            "127.0.0.1:5061",
            "",
        )
        .to_vec(),
    )
    .unwrap()
    .replace("Max-Forwards: 70", "Max-Forwards: 0");
    p.handle_datagram(Instant::now(), carrier(), Bytes::from(zero));
    assert_eq!(only_answer(&mut p).status(), Some(483));
}

#[test]
fn invites_over_the_rate_get_503_with_retry_after() {
    let mut p = proxy_with(|l| {
        l.invite_rate = Some(Rate {
            per_sec: 2,
            burst: 2,
        })
    });
    let src = "192.0.2.9:5060";
    let t0 = Instant::now();
    for n in 0..2 {
        let inv = invite(&format!("z9hG4bKr{n}"), src);
        p.handle_datagram(t0, peer(src), inv.clone());
        assert!(drain(&mut p)
            .iter()
            .any(|o| matches!(o, Output::Lookup { .. })));
        // A retransmission is not a new INVITE: it costs no token.
        p.handle_datagram(t0, peer(src), inv);
        let t = transmits(&drain(&mut p));
        assert_eq!(parsed(&t[0]).status(), Some(100));
    }
    p.handle_datagram(t0, peer(src), invite("z9hG4bKr2", src));
    let r = only_answer(&mut p);
    assert_eq!(r.status(), Some(503));
    assert_eq!(header(&r, "Retry-After"), Some("1"));
    assert_eq!(p.guard_stats().rate_limited, 1);
    // A trusted peer (loopback here) is not limited.
    for n in 0..5 {
        p.handle_datagram(
            t0,
            carrier(),
            invite(&format!("z9hG4bKt{n}"), "127.0.0.1:5061"),
        );
        assert!(drain(&mut p)
            .iter()
            .any(|o| matches!(o, Output::Lookup { .. })));
    }
    // Half a second later there is a token again.
    p.handle_datagram(
        t0 + Duration::from_millis(500),
        peer(src),
        invite("z9hG4bKr3", src),
    );
    assert!(drain(&mut p)
        .iter()
        .any(|o| matches!(o, Output::Lookup { .. })));
}

#[test]
fn held_calls_are_capped_with_503() {
    let mut p = proxy_with(|l| l.max_held_calls = 2);
    let t0 = Instant::now();
    let mut holds = Vec::new();
    for n in 0..2 {
        p.handle_datagram(
            t0,
            carrier(),
            invite(&format!("z9hG4bKh{n}"), "127.0.0.1:5061"),
        );
        let outs = drain(&mut p);
        holds.extend(outs.iter().filter_map(|o| match o {
            Output::Lookup { hold, .. } => Some(*hold),
            _ => None,
        }));
    }
    assert_eq!(holds.len(), 2);
    let t1 = t0 + Duration::from_millis(500);
    p.handle_datagram(t1, carrier(), invite("z9hG4bKh2", "127.0.0.1:5061"));
    let r = only_answer(&mut p);
    assert_eq!(r.status(), Some(503));
    assert_eq!(
        header(&r, "Retry-After"),
        Some("2"),
        "1.5 s until the first held call falls back, rounded up"
    );
    assert_eq!(p.guard_stats().capacity_refused, 1);
    // One call is released: room for the next.
    let ctx: Context = Arc::new(Map::new());
    p.handle_context(t1, holds[0], ctx, Settled::Posted);
    drain(&mut p);
    p.handle_datagram(t1, carrier(), invite("z9hG4bKh3", "127.0.0.1:5061"));
    assert!(drain(&mut p)
        .iter()
        .any(|o| matches!(o, Output::Lookup { .. })));
}

/// An in-dialog request (To tag) through precall's Record-Route, to `ruri`.
fn in_dialog(method: &str, ruri: &str, branch: &str, source: &str, routes: &str) -> Bytes {
    Bytes::from(format!(
        "{method} {ruri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {source};branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         {routes}\
         From: <sip:+14155550123@{source}>;tag=f1\r\n\
         To: <sip:+15550100@{US_ADDR}>;tag=t1\r\n\
         Call-ID: {branch}@test\r\n\
         CSeq: 2 {method}\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

#[test]
fn precall_is_no_open_relay() {
    let mut p = proxy();
    let t0 = Instant::now();
    let victim: SocketAddr = "203.0.113.1:5060".parse().unwrap();
    let outsider = "192.0.2.50:5060";
    let ours = format!("Route: <sip:{US_ADDR};lr>\r\n");
    let attempts = [
        // Our Route, then the victim as Request-URI.
        in_dialog("BYE", "sip:x@203.0.113.1", "z9hG4bKrel1", outsider, &ours),
        // Our Route, then the victim as the next Route.
        in_dialog(
            "INFO",
            "sip:+15550100@127.0.0.1",
            "z9hG4bKrel2",
            outsider,
            &format!("{ours}Route: <sip:203.0.113.1;lr>\r\n"),
        ),
        // A re-INVITE along our Route to the victim.
        in_dialog(
            "INVITE",
            "sip:x@203.0.113.1:5060",
            "z9hG4bKrel3",
            outsider,
            &ours,
        ),
    ];
    for req in attempts {
        p.handle_datagram(t0, peer(outsider), req);
        let outs = drain(&mut p);
        let t = transmits(&outs);
        assert!(
            t.iter().all(|t| t.to != victim),
            "sent to the victim: {t:?}"
        );
        assert_eq!(t.len(), 1);
        assert_eq!(parsed(&t[0]).status(), Some(403));
    }
    // An ACK is dropped silently.
    p.handle_datagram(
        t0,
        peer(outsider),
        in_dialog("ACK", "sip:x@203.0.113.1", "z9hG4bKrel4", outsider, &ours),
    );
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.guard_stats().relay_refused, 4);

    // Without a Route, a request for a number nobody serves is 404, and one for the
    // agent's number goes to the agent's upstream, never to the host in the URI.
    p.handle_datagram(
        t0,
        carrier(),
        request(
            "INVITE",
            "sip:999@203.0.113.1",
            "z9hG4bKrel5",
            "127.0.0.1:5061",
            "",
        )
        .into_iter()
        .collect::<Vec<u8>>()
        .replace_to(
            "To: <sip:+15550100@127.0.0.1:5060>",
            "To: <sip:999@203.0.113.1>",
        ),
    );
    assert_eq!(only_answer(&mut p).status(), Some(404));
    p.handle_datagram(
        t0,
        carrier(),
        request(
            "INVITE",
            "sip:+15550100@203.0.113.1",
            "z9hG4bKrel6",
            "127.0.0.1:5061",
            "",
        ),
    );
    let outs = drain(&mut p);
    let (hold, _) = outs
        .iter()
        .find_map(|o| match o {
            Output::Lookup { hold, key } => Some((*hold, key.clone())),
            _ => None,
        })
        .unwrap();
    p.handle_context(t0, hold, Arc::new(Map::new()), Settled::Cached);
    let t = transmits(&drain(&mut p));
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, UAS.parse::<SocketAddr>().unwrap());

    // The agent's BYE back to the caller is not a relay: it comes from an upstream.
    p.handle_datagram(
        t0,
        peer(UAS),
        in_dialog(
            "BYE",
            "sip:caller@192.0.2.77:5060",
            "z9hG4bKrel7",
            UAS,
            &ours,
        ),
    );
    let t = transmits(&drain(&mut p));
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, "192.0.2.77:5060".parse::<SocketAddr>().unwrap());
}

trait ReplaceTo {
    fn replace_to(self, from: &str, to: &str) -> Bytes;
}

impl ReplaceTo for Vec<u8> {
    fn replace_to(self, from: &str, to: &str) -> Bytes {
        Bytes::from(String::from_utf8(self).unwrap().replace(from, to))
    }
}

/// RFC 4475 §3.4 inv2543: no branch, no Max-Forwards, no From tag, no Content-Length.
const INV2543: &[u8] = b"INVITE sip:+15550100@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP iftgw.example.com\r\n\
From: <sip:+13035551111@ift.client.example.net;user=phone>\r\n\
Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>\r\n\
To: sip:+16505552222@ss1.example.net;user=phone\r\n\
Call-ID: inv2543.1717@ift.client.example.com\r\n\
CSeq: 56 INVITE\r\n\
Content-Type: application/sdp\r\n\
\r\n\
v=0\r\n";

#[test]
fn rfc2543_invites_are_matched_without_a_branch() {
    let mut p = proxy();
    let t0 = Instant::now();
    let inv = Bytes::from_static(INV2543);
    p.handle_datagram(t0, carrier(), inv.clone());
    let outs = drain(&mut p);
    assert_eq!(parsed(&transmits(&outs)[0]).status(), Some(100));
    assert!(outs.iter().any(|o| matches!(o, Output::Lookup { .. })));
    // The retransmission is recognised: a 100 again, no second call.
    p.handle_datagram(t0, carrier(), inv);
    let outs = drain(&mut p);
    assert!(!outs.iter().any(|o| matches!(o, Output::Lookup { .. })));
    assert_eq!(parsed(&transmits(&outs)[0]).status(), Some(100));
    assert_eq!(p.calls_in_memory(), 1);
    // Its CANCEL (same Request-URI, Via, From, Call-ID, CSeq number) finds it.
    let cancel = String::from_utf8(INV2543.to_vec())
        .unwrap()
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("CSeq: 56 INVITE", "CSeq: 56 CANCEL");
    let cancel = cancel.split("\r\n\r\n").next().unwrap().to_string() + "\r\n\r\n";
    p.handle_datagram(t0, carrier(), Bytes::from(cancel));
    let codes: Vec<_> = transmits(&drain(&mut p))
        .iter()
        .filter_map(|t| parsed(t).status())
        .collect();
    assert_eq!(codes, vec![200, 487]);
}

#[test]
fn other_sip_versions_get_505() {
    let mut p = proxy();
    let badvers = b"OPTIONS sip:t.watson@example.org SIP/7.0\r\n\
Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw\r\n\
Max-Forwards:     70\r\n\
From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe\r\n\
To:      T. Watson <sip:t.watson@example.org>\r\n\
Call-ID: badvers.31417@c.example.com\r\n\
CSeq:    1 OPTIONS\r\n\
l: 0\r\n\r\n";
    p.handle_datagram(Instant::now(), carrier(), Bytes::from_static(badvers));
    let t = transmits(&drain(&mut p));
    assert_eq!(t.len(), 1);
    assert!(t[0]
        .bytes
        .starts_with(b"SIP/2.0 505 Version Not Supported\r\n"));
    // Other start-line problems stay 400.
    let lws = b"INVITE  sip:user@example.com  SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: lws\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n";
    p.handle_datagram(Instant::now(), carrier(), Bytes::from_static(lws));
    let t = transmits(&drain(&mut p));
    assert!(t[0].bytes.starts_with(b"SIP/2.0 400 "));
}

// ----------------------------------------------------------------------- properties

/// A header line precall does not interpret: a token name (not one the parser reads)
/// and a value of printable ASCII or any non-ASCII Unicode, maybe folded.
fn extra_header() -> impl Strategy<Value = String> {
    let name =
        "[A-Za-z][A-Za-z0-9!%*_+`'~.-]{0,20}".prop_filter("not a header precall reads", |n| {
            HeaderName::from_bytes(n.as_bytes()) == HeaderName::Other
                && !["proxy-require", "user-agent", "date"]
                    .contains(&n.to_ascii_lowercase().as_str())
        });
    let value = proptest::collection::vec(
        prop_oneof![
            8 => proptest::char::range(' ', '~'),
            1 => proptest::char::range('\u{80}', '\u{10ffff}'),
        ],
        0..40,
    )
    .prop_map(|chars| chars.into_iter().collect::<String>().trim().to_string());
    (name, value, any::<bool>()).prop_map(|(n, v, fold)| {
        if fold && !v.is_empty() {
            format!("{n}: {v}\r\n  folded {v}")
        } else {
            format!("{n}: {v}")
        }
    })
}

/// An INVITE for the agent with `extra` headers (possibly compact core headers) and a
/// binary body.
fn invite_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(extra_header(), 0..6),
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
        "[a-zA-Z0-9.!%*_+`'~-]{1,30}",
        1u32..100_000,
        0u32..300,
    )
        .prop_map(|(extra, body, compact, call_id, cseq, max_forwards)| {
            let (via, from, to, cid, cl) = if compact {
                ("v", "f", "t", "i", "l")
            } else {
                ("Via", "From", "To", "Call-ID", "Content-Length")
            };
            let mut head = format!(
                "INVITE sip:+15550100@127.0.0.1:5060 SIP/2.0\r\n\
                 {via}: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKprop\r\n\
                 Max-Forwards: {max_forwards}\r\n\
                 {from}: <sip:+14155550123@192.0.2.10>;tag=p1\r\n\
                 {to}: <sip:+15550100@127.0.0.1>\r\n\
                 {cid}: {call_id}\r\n\
                 CSeq: {cseq} INVITE\r\n"
            );
            for line in &extra {
                head.push_str(line);
                head.push_str("\r\n");
            }
            head.push_str(&format!("{cl}: {}\r\n\r\n", body.len()));
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&body);
            bytes
        })
}

/// Feeds `bytes` (which parse) to a fresh proxy as a new INVITE from a trusted carrier,
/// answers its look-up with `context`, and returns what went to the agent.
fn forward(bytes: &[u8], context: Map<String, Value>) -> Option<Transmit> {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(t0, carrier(), Bytes::copy_from_slice(bytes));
    let outs = drain(&mut p);
    let hold = outs.iter().find_map(|o| match o {
        Output::Lookup { hold, .. } => Some(*hold),
        _ => None,
    });
    if let Some(hold) = hold {
        p.handle_context(t0, hold, Arc::new(context), Settled::Cached);
    }
    let outs = [outs, drain(&mut p)].concat();
    transmits(&outs)
        .into_iter()
        .find(|t| t.to == UAS.parse::<SocketAddr>().unwrap())
}

/// The header lines of `m` as written (continuations included), in order.
fn lines(m: &Message) -> Vec<Vec<u8>> {
    m.headers
        .iter()
        .map(|h| m.slice(&h.line).to_vec())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Any INVITE that parses, once forwarded, parses again with the same Call-ID, CSeq and
    /// body, and every header line precall has no business changing is still there, once,
    /// in order.
    #[test]
    fn forwarded_invites_reparse_with_the_same_identity(bytes in invite_strategy()) {
        let Ok(original) = parse_datagram(Bytes::copy_from_slice(&bytes), 65535) else {
            return Ok(());
        };
        let fwd = forward(&bytes, Map::new());
        if original.max_forwards() == Some(0) {
            prop_assert!(fwd.is_none(), "Max-Forwards 0 is answered 483, not forwarded");
            return Ok(());
        }
        let fwd = fwd.expect("an INVITE for the agent is forwarded");
        let out = parse_datagram(fwd.bytes.clone(), 65535).expect("the forwarded INVITE parses");
        prop_assert_eq!(out.call_id(), original.call_id());
        prop_assert_eq!(out.cseq().map(|c| c.seq), original.cseq().map(|c| c.seq));
        prop_assert_eq!(out.body(), original.body());
        prop_assert_eq!(out.max_forwards(), original.max_forwards().map(|n| n - 1).or(Some(70)));
        let kept: Vec<Vec<u8>> = original
            .headers
            .iter()
            .filter(|h| !matches!(h.name, HeaderName::Via | HeaderName::MaxForwards))
            .map(|h| original.slice(&h.line).to_vec())
            .collect();
        let out_lines = lines(&out);
        let mut at = 0;
        for line in &kept {
            let found = out_lines[at..].iter().position(|l| l == line);
            prop_assert!(found.is_some(), "line {:?} lost", String::from_utf8_lossy(line));
            at += found.unwrap_or(0) + 1;
        }
    }

    /// The same for requests inside a dialog (forwarded statelessly along our Route).
    #[test]
    fn forwarded_in_dialog_requests_reparse(
        bytes in invite_strategy(),
        method in prop::sample::select(vec!["BYE", "INFO", "UPDATE", "INVITE", "ACK", "NOTIFY"]),
    ) {
        // Keep the body bytes as they are: only the head is rewritten.
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(bytes[..head_end].to_vec()).unwrap();
        let head = head
            .replacen("INVITE sip:+15550100@127.0.0.1:5060", &format!("{method} sip:agent@{UAS}"), 1)
            .replacen("CSeq: ", "Route: <sip:127.0.0.1:5060;lr>\r\nCSeq: ", 1)
            .replacen(" INVITE\r\n", &format!(" {method}\r\n"), 1)
            .replacen("<sip:+15550100@127.0.0.1>", "<sip:+15550100@127.0.0.1>;tag=uas1", 1);
        let body = bytes[head_end..].to_vec();
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
        let Ok(original) = parse_datagram(Bytes::copy_from_slice(&bytes), 65535) else {
            return Ok(());
        };
        let mut p = proxy();
        p.handle_datagram(Instant::now(), carrier(), Bytes::copy_from_slice(&bytes));
        let t = transmits(&drain(&mut p));
        if original.max_forwards() == Some(0) {
            return Ok(());
        }
        prop_assert_eq!(t.len(), 1);
        prop_assert_eq!(t[0].to, UAS.parse::<SocketAddr>().unwrap());
        let out = parse_datagram(t[0].bytes.clone(), 65535).expect("the forwarded request parses");
        prop_assert_eq!(out.method(), original.method());
        prop_assert_eq!(out.call_id(), original.call_id());
        prop_assert_eq!(out.cseq().map(|c| c.seq), original.cseq().map(|c| c.seq));
        prop_assert_eq!(out.body(), original.body());
        prop_assert_eq!(out.routes().len(), 0, "our Route was popped");
    }

    /// Random byte mutations of a valid INVITE: whatever still parses and is forwarded
    /// re-parses with the same Call-ID, CSeq and body; nothing panics either way.
    #[test]
    fn mutated_invites_never_break_the_editor(
        bytes in invite_strategy(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = bytes;
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let Ok(original) = parse_datagram(Bytes::copy_from_slice(&bytes), 65535) else {
            // Still must not panic when fed whole.
            let _ = forward(&bytes, Map::new());
            return Ok(());
        };
        if let Some(fwd) = forward(&bytes, Map::new()) {
            if fwd.bytes.starts_with(b"INVITE ") {
                let out = parse_datagram(fwd.bytes.clone(), 65535)
                    .expect("a forwarded INVITE parses");
                prop_assert_eq!(out.call_id(), original.call_id());
                prop_assert_eq!(out.cseq().map(|c| c.seq), original.cseq().map(|c| c.seq));
                prop_assert_eq!(out.body(), original.body());
            }
        }
    }

    /// Context with any field names and values (control characters, CR/LF, NUL, any
    /// Unicode): the forwarded INVITE parses, keeps the original header lines, and adds
    /// exactly our Via, Record-Route and the `X-Precall-*` lines `inject` renders.
    #[test]
    fn injected_context_never_breaks_framing(
        fields in proptest::collection::vec((any::<String>(), any::<String>()), 0..8),
        numbers in proptest::collection::vec((any::<String>(), any::<i64>()), 0..3),
    ) {
        let mut context = Map::new();
        for (k, v) in fields {
            context.insert(k, Value::String(v));
        }
        for (k, n) in numbers {
            context.insert(k, json!({ "n": n, "list": [n, "x\r\ny"] }));
        }
        let bytes = invite("z9hG4bKinj", "127.0.0.1:5061");
        let original = parse_datagram(bytes.clone(), 65535).unwrap();
        let fwd = forward(&bytes, context.clone()).expect("forwarded");
        let out = parse_datagram(fwd.bytes.clone(), 65535).expect("the forwarded INVITE parses");
        prop_assert_eq!(out.call_id(), original.call_id());
        prop_assert_eq!(out.body(), original.body());
        prop_assert_eq!(out.vias().len(), 2, "exactly one Via added");
        let rr = out.headers_named(HeaderName::RecordRoute).count();
        prop_assert_eq!(rr, 1);

        let cfg = InjectConfig::default();
        let effective = inject::effective_context(&agent().defaults, Some(&context));
        let want: Vec<String> = inject::header_pairs(&cfg, Status::Hit, 0, &effective)
            .into_iter()
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        let original_lines = lines(&original);
        let added: Vec<String> = lines(&out)
            .into_iter()
            .filter(|l| !original_lines.contains(l))
            .map(|l| String::from_utf8(l).expect("UTF-8").trim_end_matches("\r\n").to_string())
            .filter(|l| !l.starts_with("Via: ") && !l.starts_with("Max-Forwards: ") && !l.starts_with("Record-Route: "))
            .collect();
        prop_assert_eq!(&added, &want);
        for line in &added {
            prop_assert!(!line.chars().any(|c| c.is_control()), "control character in {:?}", line);
            let name = line.split(':').next().unwrap_or("");
            prop_assert!(inject::is_token(name), "name {:?} is not a token", name);
        }
    }
}
