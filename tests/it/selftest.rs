//! The test tools checked against each other, without precall: the raw UAC and UAS, the
//! SIPp scenarios (UAC against UAS, the UAS's X-Precall logging, the CANCEL scenario
//! against a fake holding proxy). When one of these fails, the tools are wrong, not precall.

use std::net::UdpSocket;
use std::time::Duration;

use crate::harness::TempDir;
use crate::rig::{complete_call, SOON};
use crate::sipmsg::{param, SipMsg};
use crate::sipp::{start_uas, Sipp};
use crate::uas::{response, Answer, Transport, Uac, Uas};

fn direct_call(transport: Transport) {
    let uas = match transport {
        Transport::Udp => Uas::udp(Answer::Ring200),
        Transport::Tcp => Uas::tcp(Answer::Ring200),
    };
    let uac = match transport {
        Transport::Udp => Uac::udp(uas.addr),
        Transport::Tcp => Uac::tcp(uas.addr),
    };
    let call = uac.call("+14155550101", "+14155550100");
    uac.send(&call.invite());
    let received = uas.expect_invite(SOON);
    assert_eq!(
        received.from, uac.local,
        "the UAS sees where the request came from"
    );
    let inv = received.msg;
    assert_eq!(inv.call_id(), Some(call.call_id.as_str()));
    assert_eq!(inv.body, crate::uas::SDP.as_bytes());
    let ringing = uac.expect_status(&call.call_id, 180, Some("INVITE"), SOON);
    let tag = param(ringing.header("to").unwrap(), "tag").expect("180 has a To tag");
    let ok = complete_call(&uac, &uas, &call);
    assert_eq!(
        param(ok.header("to").unwrap(), "tag"),
        Some(tag),
        "one tag per dialog"
    );

    // CANCEL gets its 200; a Reject UAS answers the INVITE with its code.
    uac.send(&call.cancel());
    uac.expect_status(&call.call_id, 200, Some("CANCEL"), SOON);
}

#[test]
fn raw_uac_and_uas_udp() {
    direct_call(Transport::Udp);
}

#[test]
fn raw_uac_and_uas_tcp() {
    direct_call(Transport::Tcp);
}

#[test]
fn raw_uas_reject_and_silent() {
    let busy = Uas::udp(Answer::Reject(486));
    let uac = Uac::udp(busy.addr);
    let call = uac.call("+14155550101", "+14155550100");
    uac.send(&call.invite());
    let r = uac.expect_status(&call.call_id, 486, Some("INVITE"), SOON);
    uac.send(&call.ack_non2xx(&r));
    assert!(busy.recv_request("ACK", SOON).is_some());

    let silent = Uas::udp(Answer::Silent);
    let uac = Uac::udp(silent.addr);
    let call = uac.call("+14155550101", "+14155550100");
    uac.send(&call.invite());
    silent.expect_invite(SOON);
    assert!(
        uac.recv(Duration::from_millis(300)).is_none(),
        "a silent UAS answers nothing"
    );
}

fn sipp_direct(transport: Transport) {
    let dir = TempDir::new("selftest-sipp");
    let (uas, port) = start_uas("uas", &dir, transport, 5);
    let t = if transport == Transport::Udp {
        "u1"
    } else {
        "t1"
    };
    let args: Vec<String> = [
        "-inf",
        "callers.csv",
        "-s",
        "+14155550100",
        "-t",
        t,
        "-m",
        "5",
        "-r",
        "50",
        "-p",
        &crate::harness::free_port_udp_tcp().to_string(),
        "-timeout",
        "30",
        "-timeout_error",
        "-recv_timeout",
        "5000",
        &format!("127.0.0.1:{port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let uac = Sipp::spawn("uac", "uac.xml", &dir, &args).wait(Duration::from_secs(45));
    assert!(uac.success(), "{}", uac.report("uac"));
    let uas = uas.wait(Duration::from_secs(20));
    assert!(uas.success(), "{}", uas.report("uas"));
    assert_eq!(
        uas.logs.matches(" INVITE Call-ID: ").count(),
        5,
        "{}",
        uas.logs
    );
    // The callers of the CSV went out in the From header, in order.
    assert!(
        uas.messages.contains("From: <sip:+14155550123@"),
        "{}",
        uas.report("uas")
    );
    assert!(
        uas.messages.contains("From: <sip:+14155550127@"),
        "{}",
        uas.report("uas")
    );
}

#[test]
fn sipp_uac_against_sipp_uas_udp() {
    sipp_direct(Transport::Udp);
}

#[test]
fn sipp_uac_against_sipp_uas_tcp() {
    sipp_direct(Transport::Tcp);
}

#[test]
fn sipp_uas_logs_the_x_precall_headers() {
    let dir = TempDir::new("selftest-uas-log");
    let (uas, port) = start_uas("uas", &dir, Transport::Udp, 1);
    let uac = Uac::udp(([127, 0, 0, 1], port).into());
    let call = uac.call("+14155550101", "+14155550100");
    let rr = format!("Record-Route: <sip:{};lr>\r\n", uac.local);
    uac.send(&call.invite_with(&format!(
        "{rr}X-Precall-customer_name: Ada Lovelace\r\nX-Precall-Status: hit\r\nX-Precall-Wait-Ms: 3\r\n"
    )));
    let ok = uac.expect_status(&call.call_id, 200, Some("INVITE"), SOON);
    assert_eq!(
        ok.header_values("record-route").len(),
        1,
        "uas.xml echoes Record-Route:\n{}",
        ok.text()
    );
    // No proxy here: strip the Route we would have put in (it points at ourselves).
    let strip_route = |b: Vec<u8>| {
        let s = String::from_utf8(b).unwrap();
        s.lines()
            .filter(|l| !l.starts_with("Route:"))
            .collect::<Vec<_>>()
            .join("\r\n")
            + "\r\n"
    };
    uac.send(strip_route(call.in_dialog("ACK", 1, &ok)).as_bytes());
    uac.send(strip_route(call.in_dialog("BYE", 2, &ok)).as_bytes());
    uac.expect_status(&call.call_id, 200, Some("BYE"), SOON);
    let out = uas.wait(Duration::from_secs(20));
    assert!(out.success(), "{}", out.report("uas"));
    for line in [
        format!("call 1 INVITE Call-ID: {}", call.call_id),
        "X-Precall-customer_name: Ada Lovelace".to_string(),
        "X-Precall-Status: hit".to_string(),
        "X-Precall-Wait-Ms: 3".to_string(),
    ] {
        assert!(
            out.logs.contains(&line),
            "missing {line:?} in the UAS log:\n{}",
            out.logs
        );
    }
}

/// Plays a proxy holding the call: 100, then on CANCEL a 200 and a 487 (in the given
/// order), then checks the ACK.
fn cancel_against_fake_proxy(answer_487_first: bool) {
    let dir = TempDir::new("selftest-cancel");
    let proxy = UdpSocket::bind("127.0.0.1:0").unwrap();
    proxy.set_read_timeout(Some(SOON)).unwrap();
    let args: Vec<String> = [
        "-inf",
        "callers.csv",
        "-s",
        "+14155550100",
        "-m",
        "1",
        "-d",
        "100",
        "-p",
        &crate::harness::free_udp_port().to_string(),
        "-timeout",
        "20",
        "-timeout_error",
        &proxy.local_addr().unwrap().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sipp = Sipp::spawn("cancel", "cancel.xml", &dir, &args);
    let mut buf = vec![0u8; 65536];
    let mut recv = |want: &str| {
        let (n, from) = proxy
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no {want}: {e}"));
        let m = SipMsg::parse(&buf[..n]).unwrap();
        assert_eq!(m.method(), Some(want), "{}", m.text());
        (m, from)
    };
    let (invite, from) = recv("INVITE");
    proxy
        .send_to(&response(&invite, 100, "Trying", None, "", ""), from)
        .unwrap();
    let (cancel, _) = recv("CANCEL");
    assert_eq!(
        cancel.top_branch(),
        invite.top_branch(),
        "CANCEL repeats the INVITE's branch"
    );
    let ok = response(&cancel, 200, "OK", Some("c200"), "", "");
    let terminated = response(&invite, 487, "Request Terminated", Some("t487"), "", "");
    let order = if answer_487_first {
        [&terminated, &ok]
    } else {
        [&ok, &terminated]
    };
    for r in order {
        proxy.send_to(r, from).unwrap();
    }
    let (ack, _) = recv("ACK");
    assert_eq!(
        ack.top_branch(),
        invite.top_branch(),
        "ACK for a 487 repeats the branch"
    );
    assert_eq!(
        param(ack.header("to").unwrap(), "tag").as_deref(),
        Some("t487"),
        "{}",
        ack.text()
    );
    let out = sipp.wait(Duration::from_secs(30));
    assert!(out.success(), "{}", out.report("cancel"));
}

#[test]
fn sipp_cancel_scenario_200_then_487() {
    cancel_against_fake_proxy(false);
}

#[test]
fn sipp_cancel_scenario_487_then_200() {
    cancel_against_fake_proxy(true);
}
