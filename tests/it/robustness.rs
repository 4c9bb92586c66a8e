//! Hostile and unusual input: CRLF injection through the webhook, compact headers that must
//! be forwarded byte for byte, garbage datagrams and connections, malformed SIP answered
//! with 400.

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use serde_json::json;

use crate::rig::*;
use crate::sipmsg::{find, SipMsg};
use crate::uas::{Uac, SDP};

/// Every header line of the head must be `token: value` on its own line, no bare CR or LF
/// and no control characters.
fn assert_well_formed_head(msg: &SipMsg) {
    let raw = &msg.raw;
    let head_end = find(raw, b"\r\n\r\n").expect("no end of head");
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    for (i, line) in head.split("\r\n").enumerate() {
        assert!(
            !line.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f),
            "bare CR/LF or control character in line {i}: {line:?}\n{}",
            msg.text()
        );
        if i == 0 || line.starts_with(' ') || line.starts_with('\t') {
            continue;
        }
        let colon = line
            .find(':')
            .unwrap_or_else(|| panic!("header line without a colon: {line:?}\n{}", msg.text()));
        let name = line[..colon].trim_end();
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)),
            "header name is not a token: {name:?}"
        );
    }
    let declared: usize = msg.header("content-length").unwrap().parse().unwrap();
    assert_eq!(
        declared,
        raw.len() - head_end - 4,
        "Content-Length must match the body"
    );
}

#[test]
fn crlf_injection_through_the_webhook_is_neutralised() {
    let rig = Rig::udp("crlf", 10_000);
    let caller = "+14155550160";
    rig.precall.post_ok(
        "a",
        caller,
        json!({
            "note": "x\r\nVia: SIP/2.0/UDP evil.example;branch=z9hG4bKevil",
            "bell\u{7}": "ding\u{0}dong",
            "evil\r\nName": "v",
            "lf": "a\nContact: <sip:evil@evil.example>",
        }),
    );
    let call = rig.uac.call(caller, AGENT_A);
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit");
    assert_well_formed_head(&inv);
    let vias = inv.header_values("via");
    assert_eq!(vias.len(), 2, "no extra Via: {vias:?}");
    assert!(vias.iter().all(|v| !v.contains("evil")), "{vias:?}");
    let contacts: Vec<_> = inv.fields_named("contact").collect();
    assert_eq!(contacts.len(), 1, "no injected Contact: {contacts:?}");
    assert!(
        !inv.fields
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case("Name")),
        "a field name split into a header"
    );
    let note = inv
        .fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("X-Precall-note"))
        .unwrap_or_else(|| {
            panic!(
                "the note is injected (sanitised), not dropped:\n{}",
                inv.text()
            )
        });
    assert!(
        !note.line.contains('\r') && !note.line.contains('\n'),
        "one line: {:?}",
        note.line
    );
    assert!(
        note.value.contains("evil.example"),
        "the value is kept, only neutralised: {:?}",
        note.value
    );
    // The body is still the SDP, intact behind the head.
    assert_eq!(inv.body, SDP.as_bytes());
    complete_call(&rig.uac, &rig.uas, &call);
}

#[test]
fn compact_headers_are_forwarded_byte_for_byte() {
    let rig = Rig::udp("compact", 10_000);
    let caller = "+14155550161";
    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Compact" }));
    let call = rig.uac.call(caller, AGENT_A);
    let local = rig.uac.local;
    let target = rig.precall.udp;
    // Compact names, odd spacing and case, a folded header, an unknown header: each line
    // precall does not have to change must come out exactly as it went in.
    let kept = [
        format!(
            "f:   \"Caller\" <sip:{caller}@{local}>;tag={}",
            call.from_tag
        ),
        format!("t: <sip:{AGENT_A}@{target}>"),
        format!("i:{}", call.call_id),
        format!("m: <sip:{caller}@{local};transport=udp>"),
        "s: compact  test".to_string(),
        "k: timer, 100rel".to_string(),
        "c: application/sdp".to_string(),
        "x-ODD-case:   spaced   value  ".to_string(),
        "Subject-Extra: first part\r\n  continued part".to_string(),
        format!("l: {}", SDP.len()),
    ];
    let via = format!("v: SIP/2.0/UDP {local};branch={};rport", call.branch);
    let invite = format!(
        "INVITE sip:{AGENT_A}@{target} SIP/2.0\r\n{via}\r\nMax-Forwards: 70\r\nCSeq: 1 INVITE\r\n{}\r\n\r\n{SDP}",
        kept.join("\r\n")
    );
    rig.uac.send(invite.as_bytes());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(
        status_of(&inv),
        "hit",
        "the caller was read from the compact From"
    );
    let text = inv.text();
    for line in &kept {
        assert!(
            text.contains(&format!("\r\n{line}\r\n")),
            "line not forwarded byte for byte: {line:?}\n{text}"
        );
    }
    // Our Via keeps its compact name and every byte, except the parameters a server
    // transport adds (RFC 3261 §18.2.1 `received`, RFC 3581 `rport=PORT`).
    let ours = inv
        .fields
        .iter()
        .find(|f| f.line.contains(&call.branch))
        .unwrap_or_else(|| panic!("our Via is gone:\n{text}"));
    let mut restored = String::new();
    for (i, p) in ours.line.split(';').enumerate() {
        if p.starts_with("received=") {
            continue;
        }
        if i > 0 {
            restored.push(';');
        }
        restored.push_str(if p.starts_with("rport=") { "rport" } else { p });
    }
    assert_eq!(
        restored, via,
        "our compact Via line must stay as it was:\n{text}"
    );
    assert_eq!(inv.body, SDP.as_bytes());
    let ok = rig
        .uac
        .expect_status(&call.call_id, 200, Some("INVITE"), SOON);
    assert_eq!(ok.header_values("via").len(), 1, "{}", ok.text());
}

/// A tiny xorshift so "random" garbage is reproducible without a `rand` dependency.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn garbage_does_not_stop_real_calls() {
    let rig = Rig::udp("garbage", 10_000);
    let target = rig.precall.udp;
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let jl = junk.local_addr().unwrap();

    // Broken copies of a decoy INVITE (its own Call-ID and branch, so a 400 or a
    // transaction left behind by the garbage cannot be mistaken for the real call's).
    let decoy = String::from_utf8(rig.uac.call("+14155550169", AGENT_A).invite()).unwrap();
    let mut datagrams: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\r\n\r\n".to_vec(),
        decoy.as_bytes()[..60].to_vec(),
        decoy.as_bytes()[..decoy.find("\r\n\r\n").unwrap()].to_vec(),
        b"INVITE sip:x SIP/2.0\r\n\r\n".to_vec(),
        b"INVITE\r\n\r\n".to_vec(),
        b"SIP/2.0 200 OK\r\nVia: garbage\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n".to_vec(),
        format!(
            "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP {target};branch=z9hG4bKnotours\r\nFrom: <sip:a@b>;tag=1\r\n\
             To: <sip:c@d>;tag=2\r\nCall-ID: nobody\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes(),
        format!("{}Content-Length: 99999\r\n\r\n", &decoy[..decoy.find("Content-Type").unwrap()]).into_bytes(),
        vec![0u8; 1200],
        vec![b'A'; 60_000],
        "INVITE sip:\u{0}\u{ff}@[:::] SIP/9.9\r\nVia: \r\nVia: \r\n\r\n".as_bytes().to_vec(),
    ];
    let mut seed = 0x5eed_u64;
    for _ in 0..200 {
        let len = (xorshift(&mut seed) % 1500) as usize;
        datagrams.push((0..len).map(|_| xorshift(&mut seed) as u8).collect());
    }
    // Random bytes behind a plausible start line.
    for _ in 0..50 {
        let mut d = b"INVITE sip:+14155550100@127.0.0.1 SIP/2.0\r\n".to_vec();
        let len = (xorshift(&mut seed) % 800) as usize;
        d.extend((0..len).map(|_| xorshift(&mut seed) as u8));
        datagrams.push(d);
    }
    for d in &datagrams {
        let _ = junk.send_to(d, target);
    }
    // TCP: garbage on one connection, a half message left hanging on another.
    let mut t1 = TcpStream::connect(rig.precall.tcp).unwrap();
    let _ = t1.write_all(&datagrams[200]);
    let _ = t1.write_all(b"\r\n\r\nNOT SIP AT ALL\r\n\r\n");
    let mut t2 = TcpStream::connect(rig.precall.tcp).unwrap();
    let _ = t2.write_all(&decoy.as_bytes()[..100]);

    // A real call still goes through, over UDP and over TCP.
    let good = rig.uac.call("+14155550162", AGENT_A);
    let invite = good.invite();
    rig.precall
        .post_ok("a", "+14155550162", json!({ "customer_name": "Survivor" }));
    rig.uac.send(&invite);
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(inv.call_id(), Some(good.call_id.as_str()));
    assert_eq!(status_of(&inv), "hit");
    complete_call(&rig.uac, &rig.uas, &good);

    let tcp = Uac::tcp(rig.precall.tcp);
    let call = tcp.call("+14155550163", AGENT_A);
    rig.precall.post_ok(
        "a",
        "+14155550163",
        json!({ "customer_name": "TCP survivor" }),
    );
    tcp.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(inv.call_id(), Some(call.call_id.as_str()));
    tcp.expect_status(&call.call_id, 200, Some("INVITE"), SOON);

    // Precall never answered a response, and answered garbage at most with 400.
    let mut buf = vec![0u8; 65536];
    while let Ok((n, _)) = junk.recv_from(&mut buf) {
        let reply = SipMsg::parse(&buf[..n])
            .map(|m| m.start_line)
            .unwrap_or_default();
        assert!(
            reply.starts_with("SIP/2.0 400"),
            "garbage from {jl} got {reply:?}"
        );
    }
    let mut p = rig.precall;
    assert!(p.is_running(), "precall died");
    drop(t1);
    drop(t2);
}

#[test]
fn malformed_but_addressable_request_gets_400() {
    let rig = Rig::udp("bad-request", 10_000);
    let call = rig.uac.call("+14155550164", AGENT_A);
    let invite = String::from_utf8(call.invite()).unwrap();
    // Content-Length larger than the body present (RFC 3261 §18.3: 400 over UDP).
    let bad = invite.replace(
        &format!("Content-Length: {}", SDP.len()),
        "Content-Length: 5000",
    );
    rig.uac.send(bad.as_bytes());
    let r = rig.uac.expect_status(&call.call_id, 400, None, SOON);
    assert_eq!(
        r.top_branch().as_deref(),
        Some(call.branch.as_str()),
        "the 400 is addressed by our Via"
    );
    rig.uas
        .expect_nothing(QUIET, "a malformed INVITE is not forwarded");

    // Max-Forwards that is not a number.
    let call2 = rig.uac.call("+14155550164", AGENT_A);
    let bad2 = String::from_utf8(call2.invite())
        .unwrap()
        .replace("Max-Forwards: 70", "Max-Forwards: seventy");
    rig.uac.send(bad2.as_bytes());
    rig.uac.expect_status(&call2.call_id, 400, None, SOON);

    // And the listener keeps serving.
    let call3 = rig.uac.call("+14155550164", AGENT_A);
    rig.precall
        .post_ok("a", "+14155550164", json!({ "k": "v" }));
    rig.uac.send(&call3.invite());
    assert_eq!(status_of(&rig.uas.expect_invite(SOON).msg), "hit");
}

#[test]
fn oversized_context_is_truncated_to_inject_max_bytes() {
    let uas = crate::uas::Uas::udp(crate::uas::Answer::Ring200);
    let mut agent = crate::harness::Agent::new("a", AGENT_A, &uas.uri());
    agent.inject_max_bytes = 200;
    let precall =
        crate::harness::Precall::start("truncate", &crate::harness::Config::new(vec![agent]));
    let uac = Uac::udp(precall.udp);
    let caller = "+14155550165";
    precall.post_ok(
        "a",
        caller,
        json!({ "small": "s", "big": "b".repeat(600), "after": "a" }),
    );
    let call = uac.call(caller, AGENT_A);
    uac.send(&call.invite());
    let inv = uas.expect_invite(SOON).msg;
    assert_well_formed_head(&inv);
    let x = x_precall(&inv);
    assert_eq!(
        x.get("Truncated").map(String::as_str),
        Some("true"),
        "{x:?}"
    );
    assert!(
        !x.contains_key("big"),
        "a field over the limit is dropped whole: {x:?}"
    );
    assert_eq!(status_of(&inv), "hit");
    let context_bytes: usize = inv
        .fields
        .iter()
        .filter(|f| f.name.to_ascii_lowercase().starts_with("x-precall-"))
        .filter(|f| {
            ![
                "x-precall-status",
                "x-precall-wait-ms",
                "x-precall-truncated",
            ]
            .contains(&f.name.to_ascii_lowercase().as_str())
        })
        .map(|f| f.line.len() + 2)
        .sum();
    assert!(
        context_bytes <= 200,
        "context headers take {context_bytes} bytes, max_bytes is 200"
    );
    complete_call(&uac, &uas, &call);
}
