//! SIP over TCP: a caller on precall's TCP listener, an agent reached over TCP, framing by
//! Content-Length with partial reads and several messages in one segment.

use std::time::Duration;

use serde_json::json;

use crate::rig::*;
use crate::uas::{Answer, Uac, Uas};

#[test]
fn tcp_caller_to_tcp_agent() {
    let rig = Rig::build("tcp", Uas::tcp(Answer::Ring200), 10_000, |_| {});
    let caller = "+14155550170";
    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Over TCP" }));
    let uac = Uac::tcp(rig.precall.tcp);
    let call = uac.call(caller, AGENT_A);
    uac.send(&call.invite());
    uac.expect_status(&call.call_id, 100, Some("INVITE"), SOON);

    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit");
    assert_eq!(
        x_precall(&inv).get("customer_name").map(String::as_str),
        Some("Over TCP")
    );
    let vias = inv.header_values("via");
    assert!(
        vias[0].starts_with("SIP/2.0/TCP"),
        "precall's Via names TCP towards a TCP upstream: {vias:?}"
    );
    assert!(vias[1].starts_with("SIP/2.0/TCP"), "{vias:?}");
    complete_call(&uac, &rig.uas, &call);
}

#[test]
fn tcp_framing_partial_writes_and_pipelined_messages() {
    let rig = Rig::udp("tcp-framing", 10_000);
    let caller = "+14155550171";
    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Slow writer" }));
    let uac = Uac::tcp(rig.precall.tcp);

    // One INVITE written in three pieces: mid start line, mid header, mid body. The gaps
    // make the pieces arrive as separate reads; nothing waits on them.
    let call = uac.call(caller, AGENT_A);
    let invite = call.invite();
    let cuts = [10, invite.len() / 2, invite.len() - 20];
    uac.send(&invite[..cuts[0]]);
    std::thread::sleep(Duration::from_millis(50));
    uac.send(&invite[cuts[0]..cuts[1]]);
    std::thread::sleep(Duration::from_millis(50));
    uac.send(&invite[cuts[1]..cuts[2]]);
    rig.uas
        .expect_nothing(QUIET, "an incomplete body is not a message yet");
    uac.send(&invite[cuts[2]..]);
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(inv.call_id(), Some(call.call_id.as_str()));
    assert_eq!(inv.body, crate::uas::SDP.as_bytes());
    uac.expect_status(&call.call_id, 200, Some("INVITE"), SOON);

    // Two OPTIONS and a CRLF keep-alive in one write: two answers.
    let mut both = Vec::new();
    let mut ids = Vec::new();
    for n in 0..2 {
        let c = uac.call(caller, "x");
        ids.push(c.call_id.clone());
        both.extend_from_slice(
            format!(
                "OPTIONS sip:{t} SIP/2.0\r\nVia: SIP/2.0/TCP {l};branch={b}\r\nMax-Forwards: 70\r\n\
                 From: <sip:m@{l}>;tag={f}\r\nTo: <sip:{t}>\r\nCall-ID: {c}\r\nCSeq: {n} OPTIONS\r\n\
                 Content-Length: 0\r\n\r\n",
                t = rig.precall.tcp,
                l = uac.local,
                b = c.branch,
                f = c.from_tag,
                c = c.call_id
            )
            .as_bytes(),
        );
        both.extend_from_slice(b"\r\n\r\n");
    }
    uac.send(&both);
    for id in &ids {
        uac.expect_status(id, 200, Some("OPTIONS"), SOON);
    }
}
