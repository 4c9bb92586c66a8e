//! Calls through precall with raw SIP: hit, waited, fallback, CANCEL and retransmission
//! while held, consume-once, agents kept apart, routing and proxy basics.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{log_field, Agent, Config, Precall};
use crate::rig::*;
use crate::sipmsg::SipMsg;
use crate::uas::{Answer, Uac, Uas};

#[test]
fn context_hit_is_injected_and_the_dialog_completes() {
    let rig = Rig::udp("hit", 10_000);
    let caller = "+14155550111";
    // Posted in another notation than the INVITE will use: both must normalise to E.164.
    let accepted = rig.precall.post_ok(
        "a",
        "+1 (415) 555-0111",
        json!({ "customer_name": "Ada Lovelace", "account_id": 12345, "vip": true, "tags": ["gold", "beta"] }),
    );
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["agentId"], "a");
    assert_eq!(
        accepted["phoneNumber"], caller,
        "webhook phoneNumber must come back as E.164"
    );
    assert_eq!(accepted["fields"], 4);
    assert_eq!(accepted["released"], 0);
    assert_eq!(accepted["stored"], true);
    assert_eq!(accepted["ttlSecs"], 300);

    let call = rig.uac.call(caller, AGENT_A);
    let sent = call.invite();
    rig.uac.send(&sent);
    let inv = rig.uas.expect_invite(SOON).msg;

    let x = x_precall(&inv);
    assert_eq!(status_of(&inv), "hit");
    assert_eq!(
        x.get("customer_name").map(String::as_str),
        Some("Ada Lovelace"),
        "{x:?}"
    );
    assert_eq!(
        x.get("account_id").map(String::as_str),
        Some("12345"),
        "numbers as JSON text: {x:?}"
    );
    assert_eq!(
        x.get("vip").map(String::as_str),
        Some("true"),
        "booleans as JSON text: {x:?}"
    );
    assert_eq!(
        x.get("tags").map(String::as_str),
        Some(r#"["gold","beta"]"#),
        "arrays as compact JSON: {x:?}"
    );
    assert_eq!(
        x.get("tier").map(String::as_str),
        Some("standard"),
        "defaults fill fields the context lacks: {x:?}"
    );
    assert!(
        wait_ms_of(&inv) < 1000,
        "a hit is not held: {}",
        wait_ms_of(&inv)
    );

    // RFC 3261 §16.6 edits, and nothing else.
    let vias = inv.header_values("via");
    assert_eq!(
        vias.len(),
        2,
        "precall pushes exactly one Via:\n{}",
        inv.text()
    );
    assert!(
        vias[0].contains(&rig.precall.udp.to_string()),
        "top Via is precall's: {vias:?}"
    );
    assert!(
        vias[1].contains(&call.branch),
        "our Via stays below it: {vias:?}"
    );
    assert_eq!(inv.header("max-forwards"), Some("69"));
    let rr = inv.header_values("record-route");
    assert!(
        rr.iter()
            .any(|r| r.contains(&rig.precall.udp.to_string()) && r.contains(";lr")),
        "precall Record-Routes with ;lr: {rr:?}"
    );
    assert_eq!(inv.request_uri(), Some(call.request_uri().as_str()));
    assert_eq!(
        inv.body,
        SipMsg::parse(&sent).unwrap().body,
        "the SDP goes through untouched"
    );
    assert_eq!(inv.call_id(), Some(call.call_id.as_str()));

    // 100 Trying at once, then the agent's answers relayed.
    let first = rig.uac.recv(SOON).expect("no response at all");
    assert_eq!(
        first.status(),
        Some(100),
        "100 Trying first, got {}",
        first.start_line
    );
    complete_call(&rig.uac, &rig.uas, &call);

    let line = rig
        .precall
        .wait_call_line(&call.call_id, SOON)
        .expect("no per-call log line");
    assert_eq!(log_field(&line, "status").as_deref(), Some("hit"), "{line}");
    assert_eq!(log_field(&line, "agent").as_deref(), Some("a"), "{line}");
    assert_eq!(
        log_field(&line, "caller").as_deref(),
        Some(caller),
        "{line}"
    );
    assert!(log_field(&line, "wait_ms").is_some(), "{line}");
}

#[test]
fn held_call_is_released_by_the_webhook() {
    let rig = Rig::udp("waited", 15_000);
    let caller = "+14155550112";
    let call = rig.uac.call(caller, AGENT_A);
    let t0 = Instant::now();
    rig.uac.send(&call.invite());
    rig.uac
        .expect_status(&call.call_id, 100, Some("INVITE"), SOON);
    rig.uas.expect_nothing(
        Duration::from_millis(600),
        "a miss must be held until the webhook",
    );

    let held_for = t0.elapsed();
    let accepted = rig.precall.post_ok(
        "a",
        "14155550112",
        json!({ "customer_name": "Grace", "intent": "billing" }),
    );
    assert_eq!(
        accepted["released"], 1,
        "the webhook releases the held call: {accepted}"
    );
    let inv = rig.uas.expect_invite(SOON);
    let released_after = inv.at.duration_since(t0);

    assert_eq!(status_of(&inv.msg), "waited");
    let x = x_precall(&inv.msg);
    assert_eq!(x.get("customer_name").map(String::as_str), Some("Grace"));
    assert_eq!(x.get("intent").map(String::as_str), Some("billing"));
    let wait_ms = u128::from(wait_ms_of(&inv.msg));
    assert!(
        wait_ms + 50 >= held_for.as_millis() && wait_ms <= released_after.as_millis() + 50,
        "Wait-Ms {wait_ms} should be the time held ({} ms .. {} ms)",
        held_for.as_millis(),
        released_after.as_millis()
    );
    complete_call(&rig.uac, &rig.uas, &call);
    let line = rig
        .precall
        .wait_call_line(&call.call_id, SOON)
        .expect("no per-call log line");
    assert_eq!(
        log_field(&line, "status").as_deref(),
        Some("waited"),
        "{line}"
    );
}

#[test]
fn fallback_forwards_with_the_agent_defaults() {
    let rig = Rig::udp("fallback", 300);
    let call = rig.uac.call("+14155550113", AGENT_A);
    let t0 = Instant::now();
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON);
    let took = inv.at.duration_since(t0);

    assert_eq!(status_of(&inv.msg), "fallback");
    let x = x_precall(&inv.msg);
    assert_eq!(
        x.get("customer_name").map(String::as_str),
        Some("there"),
        "{x:?}"
    );
    assert_eq!(x.get("tier").map(String::as_str), Some("standard"), "{x:?}");
    assert!(
        took >= Duration::from_millis(280),
        "forwarded before fallback_wait_ms: {took:?}"
    );
    assert!(
        took < Duration::from_millis(3000),
        "fallback far too late: {took:?}"
    );
    let wait_ms = wait_ms_of(&inv.msg);
    assert!(
        (280..3000).contains(&wait_ms),
        "Wait-Ms {wait_ms} should be about 300"
    );
    complete_call(&rig.uac, &rig.uas, &call);
}

#[test]
fn cancel_while_held_gets_200_and_487_and_nothing_is_forwarded() {
    let rig = Rig::udp("cancel", 10_000);
    let caller = "+14155550114";
    let call = rig.uac.call(caller, AGENT_A);
    rig.uac.send(&call.invite());
    rig.uac
        .expect_status(&call.call_id, 100, Some("INVITE"), SOON);

    rig.uac.send(&call.cancel());
    rig.uac
        .expect_status(&call.call_id, 200, Some("CANCEL"), SOON);
    let terminated = rig
        .uac
        .expect_status(&call.call_id, 487, Some("INVITE"), SOON);
    assert!(
        crate::sipmsg::param(terminated.header("to").unwrap_or(""), "tag").is_some(),
        "a 487 carries a To tag:\n{}",
        terminated.text()
    );
    rig.uac.send(&call.ack_non2xx(&terminated));

    // A context arriving after the CANCEL must not resurrect the call, nor be lost with
    // it: the caller's next call gets it. (The 202's `released` is not checked here: a
    // watch dropped in the same instant may still count, and hands the context back.)
    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Late" }));
    rig.uas.expect_nothing(
        Duration::from_millis(800),
        "a cancelled call must not be forwarded",
    );
    // The 487 is not retransmitted once ACKed, and no 200 for the INVITE ever comes.
    let extra = rig.uac.recv_where(Duration::from_millis(300), &|m| {
        m.call_id() == Some(call.call_id.as_str())
            && m.cseq_method() == Some("INVITE")
            && m.status() != Some(100)
    });
    assert!(
        extra.is_none(),
        "unexpected after ACK: {:?}",
        extra.map(|m| m.start_line)
    );

    let again = rig.uac.call(caller, AGENT_A);
    rig.uac.send(&again.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(inv.call_id(), Some(again.call_id.as_str()));
    assert_eq!(
        x_precall(&inv).get("customer_name").map(String::as_str),
        Some("Late"),
        "the context posted after the CANCEL serves the next call:\n{}",
        inv.text()
    );
    complete_call(&rig.uac, &rig.uas, &again);
}

#[test]
fn retransmitted_invite_while_held_gets_100_again_and_is_forwarded_once() {
    let rig = Rig::udp("retrans", 10_000);
    let caller = "+14155550115";
    let call = rig.uac.call(caller, AGENT_A);
    let invite = call.invite();
    rig.uac.send(&invite);
    rig.uac
        .expect_status(&call.call_id, 100, Some("INVITE"), SOON);
    rig.uac.send(&invite);
    rig.uac
        .expect_status(&call.call_id, 100, Some("INVITE"), SOON);
    rig.uas
        .expect_nothing(QUIET, "still held after the retransmission");

    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Once" }));
    let inv = rig.uas.expect_invite(SOON);
    assert_eq!(status_of(&inv.msg), "waited");
    // The UAS answered 180 at once, so no timer-A retransmission is due either: any second
    // INVITE would be the caller's retransmission leaking through.
    if let Some(again) = rig.uas.recv_request("INVITE", Duration::from_millis(1200)) {
        panic!("INVITE forwarded twice:\n{}", again.msg.text());
    }
    complete_call(&rig.uac, &rig.uas, &call);
}

#[test]
fn context_is_consumed_by_one_call() {
    let rig = Rig::udp("consume", 300);
    let caller = "+14155550116";
    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Only once" }));

    let first = rig.uac.call(caller, AGENT_A);
    rig.uac.send(&first.invite());
    let inv1 = rig.uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv1), "hit");
    assert_eq!(
        x_precall(&inv1).get("customer_name").map(String::as_str),
        Some("Only once")
    );
    complete_call(&rig.uac, &rig.uas, &first);

    let second = rig.uac.call(caller, AGENT_A);
    rig.uac.send(&second.invite());
    let inv2 = rig.uas.expect_invite(SOON).msg;
    assert_eq!(inv2.call_id(), Some(second.call_id.as_str()));
    assert_eq!(
        status_of(&inv2),
        "fallback",
        "the context was used by the first call"
    );
    assert_eq!(
        x_precall(&inv2).get("customer_name").map(String::as_str),
        Some("there")
    );
    complete_call(&rig.uac, &rig.uas, &second);

    let get = crate::harness::http_request(
        rig.precall.http,
        "GET",
        &format!("/v1/precall/a/{caller}"),
        &[("Authorization", "Bearer key-a")],
        b"",
    );
    assert_eq!(
        get.status, 404,
        "consumed context must be gone: {}",
        get.body
    );
}

#[test]
fn two_agents_are_kept_apart() {
    let uas_a = Uas::udp(Answer::Ring200);
    let uas_b = Uas::udp(Answer::Ring200);
    let cfg = Config::new(vec![
        Agent::new("a", AGENT_A, &uas_a.uri()).fallback_ms(300),
        Agent::new("b", AGENT_B, &uas_b.uri())
            .fallback_ms(300)
            .defaults(r#"customer_name = "B default", queue = "b-queue""#),
    ]);
    let precall = Precall::start("two-agents", &cfg);
    let uac = Uac::udp(precall.udp);
    let caller = "+14155550117";
    precall.post_ok(
        "a",
        caller,
        json!({ "customer_name": "For A only", "secret": "a-only" }),
    );

    // Same caller, B's number: B's upstream, B's defaults, none of A's context.
    let to_b = uac.call(caller, AGENT_B);
    uac.send(&to_b.invite());
    let inv_b = uas_b.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv_b), "fallback");
    let xb = x_precall(&inv_b);
    assert_eq!(
        xb.get("customer_name").map(String::as_str),
        Some("B default"),
        "{xb:?}"
    );
    assert_eq!(
        xb.get("queue").map(String::as_str),
        Some("b-queue"),
        "{xb:?}"
    );
    assert!(
        !xb.contains_key("secret"),
        "A's context leaked to B: {xb:?}"
    );
    uas_a.expect_nothing(QUIET, "a call to B's number must not reach A");
    complete_call(&uac, &uas_b, &to_b);

    // A's context was not consumed by B's call.
    let to_a = uac.call(caller, AGENT_A);
    uac.send(&to_a.invite());
    let inv_a = uas_a.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv_a), "hit");
    assert_eq!(
        x_precall(&inv_a).get("secret").map(String::as_str),
        Some("a-only")
    );
    complete_call(&uac, &uas_a, &to_a);

    // A key belongs to one agent: A's key cannot post for B.
    let r = crate::harness::http_request(
        precall.http,
        "POST",
        "/v1/precall",
        &[
            ("Authorization", "Bearer key-a"),
            ("Content-Type", "application/json"),
        ],
        json!({ "agentId": "b", "phoneNumber": caller, "x": 1 })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.body);
}

#[test]
fn unknown_called_number_gets_404_and_the_default_agent_catches_it_when_set() {
    let rig = Rig::udp("unknown-number", 300);
    let call = rig.uac.call("+14155550118", "+14155559999");
    rig.uac.send(&call.invite());
    let not_found = rig
        .uac
        .expect_status(&call.call_id, 404, Some("INVITE"), SOON);
    rig.uac.send(&call.ack_non2xx(&not_found));
    rig.uas
        .expect_nothing(QUIET, "an unknown number must not reach any agent");

    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = Config::new(vec![Agent::new("a", AGENT_A, &uas.uri()).fallback_ms(300)]);
    cfg.default_agent = Some("a".to_string());
    let precall = Precall::start("default-agent", &cfg);
    let uac = Uac::udp(precall.udp);
    let call = uac.call("+14155550118", "+14155559999");
    uac.send(&call.invite());
    let inv = uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "fallback");
    complete_call(&uac, &uas, &call);
}

#[test]
fn options_to_precall_itself_gets_200() {
    let rig = Rig::udp("options", 300);
    let target = rig.precall.udp;
    let call = rig.uac.call("+14155550119", "x");
    let options = format!(
        "OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={};rport\r\nMax-Forwards: 70\r\n\
         From: <sip:monitor@{}>;tag={}\r\nTo: <sip:{target}>\r\nCall-ID: {}\r\nCSeq: 7 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        rig.uac.local, call.branch, rig.uac.local, call.from_tag, call.call_id
    );
    rig.uac.send(options.as_bytes());
    let ok = rig
        .uac
        .expect_status(&call.call_id, 200, Some("OPTIONS"), SOON);
    assert_eq!(ok.top_branch().as_deref(), Some(call.branch.as_str()));
    rig.uas.expect_nothing(
        QUIET,
        "a keepalive OPTIONS is answered by precall, not forwarded",
    );
}

#[test]
fn agent_rejection_is_relayed_and_acked_hop_by_hop() {
    let rig = Rig::build("reject", Uas::udp(Answer::Reject(486)), 300, |_| {});
    let caller = "+14155550120";
    rig.precall
        .post_ok("a", caller, json!({ "customer_name": "Busy" }));
    let call = rig.uac.call(caller, AGENT_A);
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON);
    let busy = rig
        .uac
        .expect_status(&call.call_id, 486, Some("INVITE"), SOON);
    assert_eq!(
        busy.header_values("via").len(),
        1,
        "precall's Via removed:\n{}",
        busy.text()
    );
    // Precall ACKs the 486 towards the agent itself (RFC 3261 §17.1.1.3: same branch as
    // the INVITE it sent).
    let ack = rig
        .uas
        .recv_request("ACK", SOON)
        .expect("precall must ACK the 486 upstream");
    assert_eq!(
        ack.msg.top_branch(),
        inv.msg.top_branch(),
        "hop-by-hop ACK reuses the branch"
    );
    rig.uac.send(&call.ack_non2xx(&busy));
}

#[test]
fn max_forwards_zero_gets_483() {
    let rig = Rig::udp("max-forwards", 300);
    let call = rig.uac.call("+14155550121", AGENT_A);
    let invite = String::from_utf8(call.invite())
        .unwrap()
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    rig.uac.send(invite.as_bytes());
    let too_many = rig
        .uac
        .expect_status(&call.call_id, 483, Some("INVITE"), SOON);
    if let Some(inv) = rig.uas.recv_request("INVITE", QUIET) {
        panic!(
            "an INVITE with Max-Forwards 0 was forwarded:\n{}",
            inv.msg.text()
        );
    }
    // The ACK for precall's own 483 ends there (hop by hop, RFC 3261 §17.2.1).
    rig.uac.send(&call.ack_non2xx(&too_many));
    rig.uas
        .expect_nothing(QUIET, "the ACK for precall's own 483 must be absorbed");
}
