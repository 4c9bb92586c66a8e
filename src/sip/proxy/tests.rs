//! Core tests: raw bytes in, bytes and look-ups out, a fake clock. No sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::*;
use crate::agent::Agents;
use crate::config::{
    AgentConfig, CallerSource, Config, HttpConfig, InjectConfig, ListenAddr, SipConfig,
    StoreConfig, Transport, Upstream,
};
use crate::sip::parse::parse_datagram;

const US: phonenumber::country::Id = phonenumber::country::Id::US;

fn agent(id: &str, number: &str, upstream: &str, transport: Transport) -> AgentConfig {
    AgentConfig {
        id: id.to_string(),
        api_keys: vec![format!("{id}-key")],
        numbers: vec![number.to_string()],
        upstreams: vec![Upstream {
            uri: format!("sip:{upstream}"),
            transport,
            addr: upstream.parse().unwrap(),
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

fn config() -> Config {
    Config {
        sip: SipConfig {
            listen: vec![
                ListenAddr {
                    transport: Transport::Udp,
                    addr: "127.0.0.1:5060".parse().unwrap(),
                },
                ListenAddr {
                    transport: Transport::Tcp,
                    addr: "127.0.0.1:5060".parse().unwrap(),
                },
            ],
            trusted_peers: vec!["127.0.0.0/8".parse().unwrap()],
            default_agent: None,
            ..SipConfig::default()
        },
        http: HttpConfig {
            rate_limit: None,
            ..HttpConfig::default()
        },
        store: StoreConfig::default(),
        agents: vec![
            agent(
                "support-agent",
                "+15550100",
                "127.0.0.1:5070",
                Transport::Udp,
            ),
            agent("sales-agent", "+15550200", "127.0.0.1:5080", Transport::Tcp),
        ],
    }
}

fn proxy() -> Proxy {
    let config = Arc::new(config());
    let listeners = vec![
        Listener {
            transport: Transport::Udp,
            addr: "127.0.0.1:5060".parse().unwrap(),
        },
        Listener {
            transport: Transport::Tcp,
            addr: "127.0.0.1:5060".parse().unwrap(),
        },
    ];
    Proxy::new(Arc::new(Agents::new(config)), listeners, 42)
}

const CARRIER: &str = "127.0.0.1:5061";
const UAS: &str = "127.0.0.1:5070";

fn carrier() -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: CARRIER.parse().unwrap(),
        conn: None,
        listener: 0,
    }
}

fn uas_peer() -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: UAS.parse().unwrap(),
        conn: None,
        listener: 0,
    }
}

fn invite(branch: &str, caller: &str, called: &str) -> Bytes {
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n";
    Bytes::from(format!(
        "INVITE sip:{called}@127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:{caller}@127.0.0.1:5061>;tag=a1\r\n\
         To: <sip:{called}@127.0.0.1:5060>\r\n\
         Call-ID: call-{branch}@test\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:{caller}@127.0.0.1:5061>\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    ))
}

fn cancel(branch: &str, caller: &str, called: &str) -> Bytes {
    Bytes::from(format!(
        "CANCEL sip:{called}@127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:{caller}@127.0.0.1:5061>;tag=a1\r\n\
         To: <sip:{called}@127.0.0.1:5060>\r\n\
         Call-ID: call-{branch}@test\r\n\
         CSeq: 1 CANCEL\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

fn ack_for_final(branch: &str, to_tag: &str) -> Bytes {
    Bytes::from(format!(
        "ACK sip:+15550100@127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:+14155550123@127.0.0.1:5061>;tag=a1\r\n\
         To: <sip:+15550100@127.0.0.1:5060>;tag={to_tag}\r\n\
         Call-ID: call-{branch}@test\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

/// A response from the agent to the forwarded `request` (all Vias copied).
fn answer(request: &[u8], code: u16, reason: &str) -> Bytes {
    let msg = parse_datagram(Bytes::copy_from_slice(request), 65535).unwrap();
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for h in &msg.headers {
        if matches!(
            h.name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::CallId
                | HeaderName::CSeq
                | HeaderName::RecordRoute
        ) {
            out.push_str(std::str::from_utf8(msg.slice(&h.line)).unwrap());
        }
        if h.name == HeaderName::To {
            let line = std::str::from_utf8(msg.slice(&h.line)).unwrap().trim_end();
            if code > 100 {
                out.push_str(&format!("{line};tag=uas1\r\n"));
            } else {
                out.push_str(&format!("{line}\r\n"));
            }
        }
    }
    out.push_str("Contact: <sip:agent@127.0.0.1:5070>\r\nContent-Length: 0\r\n\r\n");
    Bytes::from(out)
}

fn drain(p: &mut Proxy) -> Vec<Output> {
    std::iter::from_fn(|| p.poll_output()).collect()
}

fn transmits(outs: &[Output]) -> Vec<&Transmit> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Transmit(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn status_of(t: &Transmit) -> Option<u16> {
    parse_datagram(t.bytes.clone(), 65535).ok()?.status()
}

fn text(t: &Transmit) -> String {
    String::from_utf8_lossy(&t.bytes).into_owned()
}

fn lookup_of(outs: &[Output]) -> (HoldId, CallerKey) {
    outs.iter()
        .find_map(|o| match o {
            Output::Lookup { hold, key } => Some((*hold, key.clone())),
            _ => None,
        })
        .expect("a look-up")
}

fn ctx(v: Value) -> Context {
    Arc::new(v.as_object().unwrap().clone())
}

/// INVITE in, look-up answered from the cache: the forwarded INVITE.
fn forwarded_hit(p: &mut Proxy, t0: Instant, branch: &str) -> Transmit {
    p.handle_datagram(t0, carrier(), invite(branch, "+14155550123", "+15550100"));
    let outs = drain(p);
    let (hold, _) = lookup_of(&outs);
    p.handle_context(
        t0,
        hold,
        ctx(json!({"customer_name": "Ada", "tier": "gold"})),
        Settled::Cached,
    );
    let outs = drain(p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    t[0].clone()
}

#[test]
fn invite_gets_100_and_a_lookup_for_the_normalised_caller() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKa", "+1-415-555-0123", "+15550100"),
    );
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1, "only the 100 goes out while held");
    assert_eq!(status_of(t[0]), Some(100));
    assert_eq!(t[0].to, CARRIER.parse::<SocketAddr>().unwrap());
    let (_, key) = lookup_of(&outs);
    assert_eq!(key.agent, "support-agent");
    assert_eq!(key.number.as_str(), "+14155550123");
    assert_eq!(p.stats().held_now, 1);
}

#[test]
fn hit_forwards_with_context_and_rfc3261_edits_only() {
    let mut p = proxy();
    let original = invite("z9hG4bKb", "+14155550123", "+15550100");
    let fwd = forwarded_hit(&mut p, Instant::now(), "z9hG4bKb");
    assert_eq!(fwd.to, UAS.parse::<SocketAddr>().unwrap());
    assert_eq!(fwd.transport, Transport::Udp);
    let out = text(&fwd);
    let msg = parse_datagram(fwd.bytes.clone(), 65535).unwrap();
    let vias = msg.vias();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[0].host, "127.0.0.1");
    assert_eq!(vias[0].port, Some(5060));
    assert!(vias[0].branch.unwrap().starts_with("z9hG4bKpc"));
    assert_eq!(vias[1].branch, Some("z9hG4bKb"));
    assert_eq!(msg.max_forwards(), Some(69));
    assert!(out.contains("Record-Route: <sip:127.0.0.1:5060;transport=udp;lr>\r\n"));
    assert!(out.contains("X-Precall-customer_name: Ada\r\n"));
    assert!(out.contains("X-Precall-tier: gold\r\n"));
    assert!(out.contains("X-Precall-Status: hit\r\n"));
    assert!(out.contains("X-Precall-Wait-Ms: 0\r\n"));
    // the body and every other header line are byte-identical
    let orig = parse_datagram(original.clone(), 65535).unwrap();
    assert_eq!(msg.body(), orig.body());
    for h in &orig.headers {
        if !matches!(h.name, HeaderName::Via | HeaderName::MaxForwards) {
            let line = std::str::from_utf8(orig.slice(&h.line)).unwrap();
            assert!(out.contains(line), "{line:?} changed");
        }
    }
    assert_eq!(p.stats().held_now, 0);
}

#[test]
fn fallback_after_the_agents_wait_with_defaults() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKc", "+14155550123", "+15550100"),
    );
    let (hold, _) = lookup_of(&drain(&mut p));
    assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_millis(2000)));
    p.handle_timeout(t0 + Duration::from_millis(1999));
    assert!(
        transmits(&drain(&mut p)).is_empty(),
        "nothing before the wait is over"
    );
    p.handle_timeout(t0 + Duration::from_millis(2000));
    let outs = drain(&mut p);
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::CancelLookup { hold: h } if *h == hold)));
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    let out = text(t[0]);
    assert!(out.contains("X-Precall-Status: fallback\r\n"));
    assert!(out.contains("X-Precall-Wait-Ms: 2000\r\n"));
    assert!(out.contains("X-Precall-customer_name: there\r\n"));
    // a context arriving now must not be lost
    p.handle_context(
        t0 + Duration::from_millis(2001),
        hold,
        ctx(json!({"a": 1})),
        Settled::Posted,
    );
    let outs = drain(&mut p);
    assert!(outs.iter().any(|o| matches!(o, Output::Restore { .. })));
    assert!(transmits(&outs).is_empty());
}

#[test]
fn webhook_during_hold_forwards_as_waited() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKd", "+14155550123", "+15550100"),
    );
    let (hold, _) = lookup_of(&drain(&mut p));
    p.handle_context(
        t0 + Duration::from_millis(350),
        hold,
        ctx(json!({"account": "42"})),
        Settled::Posted,
    );
    let outs = drain(&mut p);
    let out = text(transmits(&outs)[0]);
    assert!(out.contains("X-Precall-Status: waited\r\n"));
    assert!(out.contains("X-Precall-Wait-Ms: 350\r\n"));
    assert!(out.contains("X-Precall-account: 42\r\n"));
    // the fallback timer no longer fires a second forward
    p.handle_timeout(t0 + Duration::from_millis(2500));
    assert!(transmits(&drain(&mut p))
        .iter()
        .all(|t| t.bytes.starts_with(b"INVITE")));
}

#[test]
fn retransmitted_invite_while_held_gets_100_and_is_forwarded_once() {
    let mut p = proxy();
    let t0 = Instant::now();
    let inv = invite("z9hG4bKe", "+14155550123", "+15550100");
    p.handle_datagram(t0, carrier(), inv.clone());
    let (hold, _) = lookup_of(&drain(&mut p));
    p.handle_datagram(t0 + Duration::from_millis(500), carrier(), inv);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(status_of(t[0]), Some(100));
    assert!(!outs.iter().any(|o| matches!(o, Output::Lookup { .. })));
    p.handle_context(
        t0 + Duration::from_millis(600),
        hold,
        ctx(json!({})),
        Settled::Posted,
    );
    let forwards: Vec<_> = transmits(&drain(&mut p))
        .into_iter()
        .filter(|t| t.bytes.starts_with(b"INVITE"))
        .cloned()
        .collect();
    assert_eq!(forwards.len(), 1);
}

#[test]
fn cancel_while_held_answers_200_and_487_and_forwards_nothing() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKf", "+14155550123", "+15550100"),
    );
    let (hold, _) = lookup_of(&drain(&mut p));
    p.handle_datagram(
        t0 + Duration::from_millis(100),
        carrier(),
        cancel("z9hG4bKf", "+14155550123", "+15550100"),
    );
    let outs = drain(&mut p);
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::CancelLookup { hold: h } if *h == hold)));
    let t = transmits(&outs);
    let codes: Vec<_> = t.iter().filter_map(|t| status_of(t)).collect();
    assert_eq!(codes, vec![200, 487]);
    let r487 = parse_datagram(t[1].bytes.clone(), 65535).unwrap();
    assert_eq!(r487.cseq().unwrap().method, Method::Invite);
    let to_tag = uri::tag_of(r487.header_str(HeaderName::To).unwrap())
        .unwrap()
        .to_string();
    // Timer G retransmits the 487 until the ACK
    p.handle_timeout(t0 + Duration::from_millis(600));
    let t = drain(&mut p);
    assert_eq!(
        transmits(&t)
            .iter()
            .filter_map(|t| status_of(t))
            .collect::<Vec<_>>(),
        vec![487]
    );
    p.handle_datagram(
        t0 + Duration::from_millis(700),
        carrier(),
        ack_for_final("z9hG4bKf", &to_tag),
    );
    assert!(transmits(&drain(&mut p)).is_empty(), "the ACK is absorbed");
    // nothing ever reaches the agent, not even at the fallback time
    p.handle_timeout(t0 + Duration::from_secs(40));
    assert!(transmits(&drain(&mut p)).is_empty());
    assert_eq!(
        p.calls_in_memory(),
        0,
        "the transaction is gone after linger"
    );
}

#[test]
fn provisional_and_2xx_are_relayed_without_our_via() {
    let mut p = proxy();
    let t0 = Instant::now();
    let fwd = forwarded_hit(&mut p, t0, "z9hG4bKg");
    // a 100 from the agent stops retransmissions and is not relayed
    p.handle_datagram(t0, uas_peer(), answer(&fwd.bytes, 100, "Trying"));
    assert!(transmits(&drain(&mut p)).is_empty());
    p.handle_timeout(t0 + Duration::from_millis(600));
    assert!(
        transmits(&drain(&mut p)).is_empty(),
        "no Timer A after a provisional"
    );
    for (code, reason) in [(180, "Ringing"), (200, "OK")] {
        p.handle_datagram(t0, uas_peer(), answer(&fwd.bytes, code, reason));
        let outs = drain(&mut p);
        let t = transmits(&outs);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, CARRIER.parse::<SocketAddr>().unwrap());
        let msg = parse_datagram(t[0].bytes.clone(), 65535).unwrap();
        assert_eq!(msg.status(), Some(code));
        let vias = msg.vias();
        assert_eq!(vias.len(), 1);
        assert_eq!(vias[0].branch, Some("z9hG4bKg"));
    }
    // a 2xx retransmission is relayed too (end to end)
    p.handle_datagram(t0, uas_peer(), answer(&fwd.bytes, 200, "OK"));
    assert_eq!(transmits(&drain(&mut p)).len(), 1);
}

#[test]
fn timer_a_retransmits_and_timer_b_answers_408() {
    let mut p = proxy();
    let t0 = Instant::now();
    let fwd = forwarded_hit(&mut p, t0, "z9hG4bKh");
    let mut at = t0;
    let mut retransmits = 0;
    for interval in [500u64, 1000, 2000, 4000, 8000, 16000] {
        at += Duration::from_millis(interval);
        p.handle_timeout(at);
        let outs = drain(&mut p);
        for t in transmits(&outs) {
            if t.bytes == fwd.bytes {
                retransmits += 1;
            }
        }
    }
    assert_eq!(retransmits, 6);
    p.handle_timeout(t0 + Duration::from_secs(32));
    let outs = drain(&mut p);
    let codes: Vec<_> = transmits(&outs)
        .iter()
        .filter_map(|t| status_of(t))
        .collect();
    assert_eq!(codes, vec![408]);
}

#[test]
fn non_2xx_final_is_acked_upstream_and_relayed() {
    let mut p = proxy();
    let t0 = Instant::now();
    let fwd = forwarded_hit(&mut p, t0, "z9hG4bKi");
    p.handle_datagram(t0, uas_peer(), answer(&fwd.bytes, 486, "Busy Here"));
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 2);
    let ack = parse_datagram(t[0].bytes.clone(), 65535).unwrap();
    assert_eq!(ack.method(), Some(&Method::Ack));
    assert_eq!(t[0].to, UAS.parse::<SocketAddr>().unwrap());
    let fwd_msg = parse_datagram(fwd.bytes.clone(), 65535).unwrap();
    assert_eq!(
        ack.top_via().unwrap().branch,
        fwd_msg.top_via().unwrap().branch
    );
    assert_eq!(
        uri::tag_of(ack.header_str(HeaderName::To).unwrap()),
        Some("uas1")
    );
    assert_eq!(status_of(t[1]), Some(486));
    // a retransmitted 486 is ACKed again but not relayed again
    p.handle_datagram(t0, uas_peer(), answer(&fwd.bytes, 486, "Busy Here"));
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert!(t[0].bytes.starts_with(b"ACK "));
}

#[test]
fn cancel_after_forwarding_goes_upstream_once_ringing() {
    let mut p = proxy();
    let t0 = Instant::now();
    let fwd = forwarded_hit(&mut p, t0, "z9hG4bKj");
    p.handle_datagram(
        t0,
        carrier(),
        cancel("z9hG4bKj", "+14155550123", "+15550100"),
    );
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(
        t.len(),
        1,
        "only the 200 for the CANCEL: no provisional yet"
    );
    assert_eq!(status_of(t[0]), Some(200));
    p.handle_datagram(t0, uas_peer(), answer(&fwd.bytes, 180, "Ringing"));
    let outs = drain(&mut p);
    let cancel = transmits(&outs)
        .into_iter()
        .find(|t| t.bytes.starts_with(b"CANCEL "))
        .expect("CANCEL upstream");
    let c = parse_datagram(cancel.bytes.clone(), 65535).unwrap();
    let fwd_msg = parse_datagram(fwd.bytes.clone(), 65535).unwrap();
    assert_eq!(
        c.top_via().unwrap().branch,
        fwd_msg.top_via().unwrap().branch
    );
    assert_eq!(c.cseq().unwrap().seq, 1);
    assert_eq!(c.call_id(), fwd_msg.call_id());
}

#[test]
fn unknown_called_number_is_404_and_max_forwards_0_is_483() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKk", "+14155550123", "+15559999"),
    );
    let outs = drain(&mut p);
    assert_eq!(
        transmits(&outs)
            .iter()
            .filter_map(|t| status_of(t))
            .collect::<Vec<_>>(),
        vec![404]
    );
    let inv = String::from_utf8(invite("z9hG4bKl", "+14155550123", "+15550100").to_vec())
        .unwrap()
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    p.handle_datagram(t0, carrier(), Bytes::from(inv));
    let outs = drain(&mut p);
    assert_eq!(
        transmits(&outs)
            .iter()
            .filter_map(|t| status_of(t))
            .collect::<Vec<_>>(),
        vec![483]
    );
}

#[test]
fn in_dialog_bye_follows_route_and_pops_ours() {
    let mut p = proxy();
    let bye = Bytes::from_static(
        b"BYE sip:+14155550123@127.0.0.1:5061 SIP/2.0\r\n\
          Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKbye1\r\n\
          Route: <sip:127.0.0.1:5060;transport=udp;lr>\r\n\
          Max-Forwards: 70\r\n\
          From: <sip:+15550100@127.0.0.1>;tag=uas1\r\n\
          To: <sip:+14155550123@127.0.0.1>;tag=a1\r\n\
          Call-ID: c1\r\n\
          CSeq: 2 BYE\r\n\
          Content-Length: 0\r\n\r\n",
    );
    p.handle_datagram(Instant::now(), uas_peer(), bye);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, CARRIER.parse::<SocketAddr>().unwrap());
    let out = text(t[0]);
    assert!(!out.contains("Route:"), "our Route entry is popped: {out}");
    let msg = parse_datagram(t[0].bytes.clone(), 65535).unwrap();
    assert_eq!(msg.vias().len(), 2);
    // its response comes back through us and goes to the agent
    let ok = answer(&t[0].bytes, 200, "OK");
    p.handle_datagram(Instant::now(), carrier(), ok);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, UAS.parse::<SocketAddr>().unwrap());
    assert_eq!(
        parse_datagram(t[0].bytes.clone(), 65535)
            .unwrap()
            .vias()
            .len(),
        1
    );
}

#[test]
fn bye_without_route_goes_to_the_agent_by_called_number() {
    let mut p = proxy();
    let bye = Bytes::from_static(
        b"BYE sip:+15550100@127.0.0.1:5060 SIP/2.0\r\n\
          Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKbye2\r\n\
          Max-Forwards: 70\r\n\
          From: <sip:+14155550123@127.0.0.1>;tag=a1\r\n\
          To: <sip:+15550100@127.0.0.1>;tag=uas1\r\n\
          Call-ID: c2\r\n\
          CSeq: 2 BYE\r\n\
          Content-Length: 0\r\n\r\n",
    );
    p.handle_datagram(Instant::now(), carrier(), bye);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, UAS.parse::<SocketAddr>().unwrap());
}

#[test]
fn options_to_precall_itself_is_200() {
    let mut p = proxy();
    let opt = Bytes::from_static(
        b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n\
          Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKopt\r\n\
          Max-Forwards: 70\r\n\
          From: <sip:ping@127.0.0.1>;tag=p1\r\n\
          To: <sip:127.0.0.1:5060>\r\n\
          Call-ID: opt1\r\n\
          CSeq: 1 OPTIONS\r\n\
          Content-Length: 0\r\n\r\n",
    );
    p.handle_datagram(Instant::now(), carrier(), opt);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(status_of(t[0]), Some(200));
    assert!(text(t[0]).contains("Allow: INVITE"));
}

#[test]
fn garbage_is_dropped_and_a_malformed_request_gets_400() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(t0, carrier(), Bytes::from_static(b"\x00\x01garbage\xff"));
    assert!(drain(&mut p).is_empty());
    let bad = Bytes::from_static(
        b"INVITE sip:+15550100@127.0.0.1 SIP/2.0\r\n\
          Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKbad\r\n\
          From: <sip:a@b>;tag=1\r\n\
          To: <sip:+15550100@127.0.0.1>\r\n\
          Call-ID: bad1\r\n\
          CSeq: 1 INVITE\r\n\
          Content-Length: 9999\r\n\r\n",
    );
    p.handle_datagram(t0, carrier(), bad);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(status_of(t[0]), Some(400));
    // a response we never asked for is not relayed anywhere
    p.handle_datagram(
        t0,
        uas_peer(),
        Bytes::from_static(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKother\r\nFrom: <sip:a@b>;tag=1\r\n\
              To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        ),
    );
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.stats().parse_errors, 2);
}

#[test]
fn compact_headers_are_forwarded_as_written() {
    let mut p = proxy();
    let t0 = Instant::now();
    let inv = Bytes::from_static(
        b"INVITE sip:+15550100@127.0.0.1:5060 SIP/2.0\r\n\
          v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKcompact\r\n\
          f: <sip:+14155550123@127.0.0.1>;tag=c1\r\n\
          t: <sip:+15550100@127.0.0.1>\r\n\
          i: compact-1\r\n\
          CSeq: 1 INVITE\r\n\
          m: <sip:+14155550123@127.0.0.1:5061>\r\n\
          l: 0\r\n\r\n",
    );
    p.handle_datagram(t0, carrier(), inv);
    let (hold, key) = lookup_of(&drain(&mut p));
    assert_eq!(key.number.as_str(), "+14155550123");
    p.handle_context(t0, hold, ctx(json!({})), Settled::Cached);
    let outs = drain(&mut p);
    let out = text(transmits(&outs)[0]);
    for line in [
        "v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKcompact\r\n",
        "f: <sip:+14155550123@127.0.0.1>;tag=c1\r\n",
        "t: <sip:+15550100@127.0.0.1>\r\n",
        "i: compact-1\r\n",
        "m: <sip:+14155550123@127.0.0.1:5061>\r\n",
        "l: 0\r\n",
    ] {
        assert!(out.contains(line), "{line:?} missing in {out}");
    }
    assert!(out.contains("Max-Forwards: 70\r\n"), "added when absent");
}

#[test]
fn rport_and_received_are_filled_in_rfc3581() {
    let mut p = proxy();
    let t0 = Instant::now();
    let inv = String::from_utf8(invite("z9hG4bKm", "+14155550123", "+15550100").to_vec())
        .unwrap()
        .replace("5061;branch=z9hG4bKm", "5999;branch=z9hG4bKm;rport");
    p.handle_datagram(t0, carrier(), Bytes::from(inv));
    let outs = drain(&mut p);
    let t = transmits(&outs);
    // the 100 goes to the source port (rport), not the Via port 5999
    assert_eq!(t[0].to, CARRIER.parse::<SocketAddr>().unwrap());
    assert!(text(t[0]).contains(";rport=5061;received=127.0.0.1"));
}

#[test]
fn anonymous_caller_is_forwarded_at_once_with_defaults() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(t0, carrier(), invite("z9hG4bKn", "anonymous", "+15550100"));
    let outs = drain(&mut p);
    assert!(!outs.iter().any(|o| matches!(o, Output::Lookup { .. })));
    let t = transmits(&outs);
    assert_eq!(t.len(), 2);
    assert!(text(t[1]).contains("X-Precall-Status: fallback\r\n"));
}

#[test]
fn tcp_upstream_gets_tcp_via_and_double_record_route() {
    let mut p = proxy();
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKo", "+14155550123", "+15550200"),
    );
    let (hold, key) = lookup_of(&drain(&mut p));
    assert_eq!(key.agent, "sales-agent");
    p.handle_context(t0, hold, ctx(json!({})), Settled::Cached);
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert_eq!(t[0].transport, Transport::Tcp);
    let out = text(t[0]);
    assert!(out.contains("Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKpc"));
    assert!(out.contains(
        "Record-Route: <sip:127.0.0.1:5060;transport=tcp;lr>\r\nRecord-Route: <sip:127.0.0.1:5060;transport=udp;lr>\r\n"
    ));
}

#[test]
fn ack_for_a_stateless_final_is_absorbed_not_forwarded() {
    let mut p = proxy();
    let t0 = Instant::now();
    let inv = String::from_utf8(invite("z9hG4bKq", "+14155550123", "+15550100").to_vec())
        .unwrap()
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    p.handle_datagram(t0, carrier(), Bytes::from(inv));
    let outs = drain(&mut p);
    let resp = parse_datagram(transmits(&outs)[0].bytes.clone(), 65535).unwrap();
    assert_eq!(resp.status(), Some(483));
    let tag = uri::tag_of(resp.header_str(HeaderName::To).unwrap())
        .unwrap()
        .to_string();
    let ack = String::from_utf8(ack_for_final("z9hG4bKq", &tag).to_vec()).unwrap();
    p.handle_datagram(t0, carrier(), Bytes::from(ack));
    assert!(
        transmits(&drain(&mut p)).is_empty(),
        "the ACK ends at precall"
    );
}

// ------------------------------------------------------------ issue 3: failover, pull, http

fn upstream(addr: &str) -> Upstream {
    Upstream {
        uri: format!("sip:{addr}"),
        transport: Transport::Udp,
        addr: addr.parse().unwrap(),
    }
}

/// A proxy whose support agent has the given tweaks.
fn proxy_with(tweak: impl FnOnce(&mut AgentConfig)) -> Proxy {
    let mut config = config();
    tweak(&mut config.agents[0]);
    let listeners = vec![Listener {
        transport: Transport::Udp,
        addr: "127.0.0.1:5060".parse().unwrap(),
    }];
    Proxy::new(Arc::new(Agents::new(Arc::new(config))), listeners, 42)
}

fn two_upstreams(a: &mut AgentConfig) {
    a.upstreams = vec![upstream("127.0.0.1:5070"), upstream("127.0.0.1:5071")];
}

fn invites_to(outs: &[Output]) -> Vec<SocketAddr> {
    transmits(outs)
        .into_iter()
        .filter(|t| t.bytes.starts_with(b"INVITE "))
        .map(|t| t.to)
        .collect()
}

fn http_calls(outs: &[Output]) -> Vec<HttpCall> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Http(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_503_fails_over_to_the_next_upstream_and_the_200_comes_back() {
    let mut p = proxy_with(two_upstreams);
    let t0 = Instant::now();
    let first = forwarded_hit(&mut p, t0, "z9hG4bKfo1");
    assert_eq!(first.to, "127.0.0.1:5070".parse::<SocketAddr>().unwrap());
    p.handle_datagram(
        t0,
        uas_peer(),
        answer(&first.bytes, 503, "Service Unavailable"),
    );
    let outs = drain(&mut p);
    let t = transmits(&outs);
    assert!(
        t[0].bytes.starts_with(b"ACK "),
        "the 503 is ACKed hop by hop"
    );
    assert_eq!(
        invites_to(&outs),
        vec!["127.0.0.1:5071".parse::<SocketAddr>().unwrap()]
    );
    assert!(
        t.iter().all(|t| status_of(t).is_none()),
        "the caller hears nothing of the 503"
    );
    let second = t
        .into_iter()
        .find(|t| t.bytes.starts_with(b"INVITE "))
        .unwrap()
        .clone();
    let b1 = parse_datagram(first.bytes.clone(), 65535)
        .unwrap()
        .top_via()
        .unwrap()
        .branch
        .unwrap()
        .to_string();
    let b2 = parse_datagram(second.bytes.clone(), 65535)
        .unwrap()
        .top_via()
        .unwrap()
        .branch
        .unwrap()
        .to_string();
    assert_ne!(b1, b2, "a new client transaction");
    p.handle_datagram(t0, uas_peer(), answer(&second.bytes, 200, "OK"));
    let outs = drain(&mut p);
    assert_eq!(
        transmits(&outs)
            .iter()
            .filter_map(|t| status_of(t))
            .collect::<Vec<_>>(),
        vec![200]
    );
    assert_eq!(p.stats().failovers, 1);
}

#[test]
fn when_every_upstream_fails_the_caller_gets_503() {
    let mut p = proxy_with(two_upstreams);
    let t0 = Instant::now();
    let first = forwarded_hit(&mut p, t0, "z9hG4bKfo2");
    p.handle_datagram(t0, uas_peer(), answer(&first.bytes, 500, "Server Error"));
    let outs = drain(&mut p);
    let second = transmits(&outs)
        .into_iter()
        .find(|t| t.bytes.starts_with(b"INVITE "))
        .unwrap()
        .clone();
    p.handle_datagram(
        t0,
        uas_peer(),
        answer(&second.bytes, 408, "Request Timeout"),
    );
    let outs = drain(&mut p);
    let codes: Vec<_> = transmits(&outs)
        .iter()
        .filter_map(|t| status_of(t))
        .collect();
    assert_eq!(codes, vec![503]);
}

#[test]
fn no_provisional_within_upstream_timeout_moves_on() {
    let mut p = proxy_with(two_upstreams);
    let t0 = Instant::now();
    forwarded_hit(&mut p, t0, "z9hG4bKfo3");
    p.handle_timeout(t0 + Duration::from_millis(1999));
    assert!(
        invites_to(&drain(&mut p)).iter().all(|a| a.port() == 5070),
        "only retransmissions"
    );
    p.handle_timeout(t0 + Duration::from_millis(2000));
    assert_eq!(
        invites_to(&drain(&mut p)),
        vec!["127.0.0.1:5071".parse::<SocketAddr>().unwrap()]
    );
    // the last upstream waits for Timer B (408), it has no failover timer
    p.handle_timeout(t0 + Duration::from_millis(4100));
    assert!(transmits(&drain(&mut p))
        .iter()
        .all(|t| status_of(t).is_none()));
}

#[test]
fn a_transport_error_fails_over_or_answers_503() {
    let mut p = proxy_with(two_upstreams);
    let t0 = Instant::now();
    forwarded_hit(&mut p, t0, "z9hG4bKfo4");
    p.handle_transport_error(t0, Transport::Udp, "127.0.0.1:5070".parse().unwrap());
    assert_eq!(
        invites_to(&drain(&mut p)),
        vec!["127.0.0.1:5071".parse::<SocketAddr>().unwrap()]
    );
    p.handle_transport_error(t0, Transport::Udp, "127.0.0.1:5071".parse().unwrap());
    let outs = drain(&mut p);
    assert_eq!(
        transmits(&outs)
            .iter()
            .filter_map(|t| status_of(t))
            .collect::<Vec<_>>(),
        vec![503]
    );
}

#[test]
fn pull_lookup_answer_releases_the_call_as_looked_up() {
    let mut p = proxy_with(|a| {
        a.lookup = Some(crate::config::LookupConfig {
            url: "http://127.0.0.1:9/lookup".to_string(),
            timeout: Duration::from_millis(500),
        })
    });
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKlu1", "+14155550123", "+15550100"),
    );
    let outs = drain(&mut p);
    let calls = http_calls(&outs);
    assert_eq!(calls.len(), 1);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(body["agentId"], "support-agent");
    assert_eq!(body["phoneNumber"], "+14155550123");
    assert_eq!(body["calledNumber"], "+15550100");
    assert_eq!(body["callId"], "call-z9hG4bKlu1@test");
    let HttpPurpose::Lookup { hold } = calls[0].purpose else {
        panic!("a look-up")
    };
    p.handle_http_response(
        t0 + Duration::from_millis(100),
        calls[0].purpose,
        HttpAnswer::Status {
            code: 200,
            body: Bytes::from_static(br#"{"customer_name":"Grace"}"#),
        },
    );
    let outs = drain(&mut p);
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::CancelLookup { hold: h } if *h == hold)));
    let fwd = text(transmits(&outs)[0]);
    assert!(fwd.contains("X-Precall-Status: looked-up\r\n"));
    assert!(fwd.contains("X-Precall-Wait-Ms: 100\r\n"));
    assert!(fwd.contains("X-Precall-customer_name: Grace\r\n"));
}

#[test]
fn pull_lookup_nothing_keeps_holding_until_fallback() {
    let mut p = proxy_with(|a| {
        a.lookup = Some(crate::config::LookupConfig {
            url: "http://127.0.0.1:9/lookup".to_string(),
            timeout: Duration::from_millis(500),
        })
    });
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKlu2", "+14155550123", "+15550100"),
    );
    let purpose = http_calls(&drain(&mut p))[0].purpose;
    for answer in [
        HttpAnswer::Status {
            code: 404,
            body: Bytes::new(),
        },
        HttpAnswer::Status {
            code: 200,
            body: Bytes::from_static(b"not json"),
        },
        HttpAnswer::Status {
            code: 200,
            body: Bytes::from_static(b"[1,2]"),
        },
        HttpAnswer::Failed("timed out".to_string()),
    ] {
        p.handle_http_response(t0, purpose, answer);
        assert!(
            transmits(&drain(&mut p)).is_empty(),
            "nothing forwarded early"
        );
    }
    assert_eq!(p.stats().lookup_misses, 4);
    p.handle_timeout(t0 + Duration::from_millis(2000));
    assert!(text(transmits(&drain(&mut p))[0]).contains("X-Precall-Status: fallback\r\n"));
}

fn http_mode(a: &mut AgentConfig) {
    a.inject.mode = crate::config::InjectMode::Http;
    a.inject.url = Some("http://127.0.0.1:9/context".to_string());
}

#[test]
fn http_delivery_happens_before_the_invite_and_failure_is_flagged() {
    for (answer, flagged) in [
        (
            HttpAnswer::Status {
                code: 204,
                body: Bytes::new(),
            },
            false,
        ),
        (HttpAnswer::Failed("connection refused".to_string()), true),
    ] {
        let mut p = proxy_with(http_mode);
        let t0 = Instant::now();
        p.handle_datagram(
            t0,
            carrier(),
            invite("z9hG4bKhd1", "+14155550123", "+15550100"),
        );
        let (hold, _) = lookup_of(&drain(&mut p));
        p.handle_context(t0, hold, ctx(json!({"tier": "gold"})), Settled::Cached);
        let outs = drain(&mut p);
        assert!(
            invites_to(&outs).is_empty(),
            "the INVITE waits for the delivery"
        );
        let calls = http_calls(&outs);
        assert_eq!(calls.len(), 1);
        let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(body["status"], "hit");
        assert_eq!(body["context"]["tier"], "gold");
        assert_eq!(body["caller"], "+14155550123");
        p.handle_http_response(t0, calls[0].purpose, answer);
        let outs = drain(&mut p);
        let fwd = text(transmits(&outs)[0]);
        assert!(fwd.contains("X-Precall-Status: hit\r\n"));
        assert_eq!(
            fwd.contains("X-Precall-Delivery: failed\r\n"),
            flagged,
            "{fwd}"
        );
    }
}

#[test]
fn cancel_during_http_delivery_forwards_nothing() {
    let mut p = proxy_with(http_mode);
    let t0 = Instant::now();
    p.handle_datagram(
        t0,
        carrier(),
        invite("z9hG4bKhd2", "+14155550123", "+15550100"),
    );
    let (hold, _) = lookup_of(&drain(&mut p));
    p.handle_context(t0, hold, ctx(json!({})), Settled::Cached);
    let purpose = http_calls(&drain(&mut p))[0].purpose;
    p.handle_datagram(
        t0,
        carrier(),
        cancel("z9hG4bKhd2", "+14155550123", "+15550100"),
    );
    let codes: Vec<_> = transmits(&drain(&mut p))
        .iter()
        .filter_map(|t| status_of(t))
        .collect();
    assert_eq!(codes, vec![200, 487]);
    p.handle_http_response(
        t0,
        purpose,
        HttpAnswer::Status {
            code: 200,
            body: Bytes::new(),
        },
    );
    assert!(invites_to(&drain(&mut p)).is_empty());
}

#[test]
fn health_probes_mark_a_silent_upstream_down_and_calls_skip_it() {
    let mut p = proxy_with(|a| {
        two_upstreams(a);
        a.health_check = Some(Duration::from_secs(5));
    });
    let t0 = Instant::now();
    p.start(t0);
    assert_eq!(p.poll_timeout(), Some(t0));
    p.handle_timeout(t0);
    let outs = drain(&mut p);
    let probes: Vec<_> = transmits(&outs).into_iter().cloned().collect();
    assert_eq!(probes.len(), 2);
    assert!(probes.iter().all(|t| t.bytes.starts_with(b"OPTIONS ")));
    // only 5071 answers
    let alive = probes.iter().find(|t| t.to.port() == 5071).unwrap();
    p.handle_datagram(t0, uas_peer(), answer(&alive.bytes, 200, "OK"));
    assert!(drain(&mut p).is_empty(), "probe answers are not relayed");
    p.handle_timeout(t0 + Duration::from_secs(5));
    drain(&mut p);
    let fwd = forwarded_hit(&mut p, t0 + Duration::from_secs(6), "z9hG4bKhc1");
    assert_eq!(fwd.to.port(), 5071, "the down upstream is skipped");
}
