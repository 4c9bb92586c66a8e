//! Which agent, who calls: P-Asserted-Identity only from trusted peers, `tel:` URIs and
//! national notation meeting the webhook's number, the called number from To when the
//! Request-URI has no user, and in-dialog requests from UAs that ignore Record-Route.

use serde_json::json;

use crate::harness::{log_field, Agent, Config, Precall};
use crate::rig::*;
use crate::uas::{Answer, Uac, Uas};

/// Precall with agent `a` (fallback 300 ms) and the given trusted peers.
fn start(name: &str, trusted: &[&str]) -> (Precall, Uas, Uac) {
    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = Config::new(vec![Agent::new("a", AGENT_A, &uas.uri()).fallback_ms(300)]);
    cfg.trusted_peers = trusted.iter().map(|s| s.to_string()).collect();
    let precall = Precall::start(name, &cfg);
    let uac = Uac::udp(precall.udp);
    (precall, uas, uac)
}

fn pai_case(name: &str, trusted: &[&str], expect: &str) {
    let (precall, uas, uac) = start(name, trusted);
    precall.post_ok("a", "+14155550181", json!({ "who": "From" }));
    precall.post_ok("a", "+14155550182", json!({ "who": "PAI" }));
    let call = uac.call("+14155550181", AGENT_A);
    uac.send(&call.invite_with(
        "P-Asserted-Identity: \"Verified\" <sip:+14155550182@carrier.example;user=phone>\r\n",
    ));
    let inv = uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit");
    assert_eq!(
        x_precall(&inv).get("who").map(String::as_str),
        Some(expect),
        "{}",
        inv.text()
    );
    complete_call(&uac, &uas, &call);
}

#[test]
fn pai_is_believed_from_a_trusted_peer() {
    pai_case("pai-trusted", &["127.0.0.0/8"], "PAI");
}

#[test]
fn pai_is_ignored_from_an_untrusted_peer() {
    pai_case("pai-untrusted", &["10.0.0.0/8"], "From");
}

#[test]
fn anonymous_from_with_tel_pai_and_national_webhook_number() {
    let (precall, uas, uac) = start("tel-uri", &["127.0.0.0/8"]);
    // Posted in US national notation; the INVITE names the caller as a tel: URI.
    let r = precall.post_ok("a", "(415) 555-0183", json!({ "customer_name": "Tel" }));
    assert_eq!(r["phoneNumber"], "+14155550183", "{r}");
    let call = uac.call("anonymous", AGENT_A);
    uac.send(&call.invite_with("P-Asserted-Identity: <tel:+1-415-555-0183>\r\n"));
    let inv = uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit", "{}", inv.text());
    assert_eq!(
        x_precall(&inv).get("customer_name").map(String::as_str),
        Some("Tel")
    );
    let line = precall
        .wait_call_line(&call.call_id, SOON)
        .expect("no call line");
    assert_eq!(
        log_field(&line, "caller").as_deref(),
        Some("+14155550183"),
        "{line}"
    );
    complete_call(&uac, &uas, &call);
}

#[test]
fn anonymous_caller_without_identity_falls_back() {
    let (_precall, uas, uac) = start("anonymous", &["127.0.0.0/8"]);
    let call = uac.call("anonymous", AGENT_A);
    uac.send(&call.invite());
    let inv = uas.expect_invite(SOON).msg;
    assert_eq!(
        status_of(&inv),
        "fallback",
        "no number, nothing to wait for"
    );
    complete_call(&uac, &uas, &call);
}

#[test]
fn called_number_from_to_when_the_request_uri_has_no_user() {
    let (precall, uas, uac) = start("called-from-to", &["127.0.0.0/8"]);
    precall.post_ok("a", "+14155550184", json!({ "customer_name": "ToUser" }));
    let call = uac.call("+14155550184", AGENT_A);
    let invite = String::from_utf8(call.invite()).unwrap().replacen(
        &format!("INVITE {} SIP/2.0", call.request_uri()),
        &format!("INVITE sip:{} SIP/2.0", precall.udp),
        1,
    );
    uac.send(invite.as_bytes());
    let inv = uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit");
    complete_call(&uac, &uas, &call);
}

#[test]
fn in_dialog_requests_without_route_follow_the_called_number() {
    let (precall, uas, uac) = start("no-route", &["127.0.0.0/8"]);
    precall.post_ok("a", "+14155550185", json!({ "customer_name": "NoRoute" }));
    let call = uac.call("+14155550185", AGENT_A);
    uac.send(&call.invite());
    uas.expect_invite(SOON);
    let ok = uac.expect_status(&call.call_id, 200, Some("INVITE"), SOON);
    // Like SIPp's built-in uac scenario: no Route, Request-URI = the number at precall.
    let strip = |b: Vec<u8>| {
        let s = String::from_utf8(b).unwrap();
        let mut lines: Vec<String> = s
            .split("\r\n")
            .filter(|l| !l.starts_with("Route:"))
            .map(str::to_string)
            .collect();
        let method = lines[0].split(' ').next().unwrap().to_string();
        lines[0] = format!("{method} {} SIP/2.0", call.request_uri());
        lines.join("\r\n")
    };
    uac.send(strip(call.in_dialog("ACK", 1, &ok)).as_bytes());
    uas.recv_request("ACK", SOON)
        .expect("ACK without Route reaches the agent");
    uac.send(strip(call.in_dialog("BYE", 2, &ok)).as_bytes());
    let bye = uas
        .recv_request("BYE", SOON)
        .expect("BYE without Route reaches the agent");
    assert_eq!(bye.msg.call_id(), Some(call.call_id.as_str()));
    uac.expect_status(&call.call_id, 200, Some("BYE"), SOON);
}
