//! Operating precall: reload on SIGHUP without dropping calls, a bad config refused, and
//! the graceful drain on SIGTERM.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Agent, Config, Precall};
use crate::rig::*;
use crate::uas::{Answer, Uac, Uas};

#[test]
fn sighup_adds_an_agent_while_a_call_held_under_the_old_config_completes() {
    let uas_a = Uas::udp(Answer::Ring200);
    let uas_b = Uas::udp(Answer::Ring200);
    let mut cfg = Config::new(vec![
        Agent::new("a", AGENT_A, &uas_a.uri()).fallback_ms(20_000)
    ]);
    let mut precall = Precall::start("reload-add", &cfg);
    let uac = Uac::udp(precall.udp);

    let held = uac.call("+14155550401", AGENT_A);
    uac.send(&held.invite());
    uac.expect_status(&held.call_id, 100, Some("INVITE"), SOON);
    // Before the reload, agent b's number is unknown.
    let early = uac.call("+14155550402", AGENT_B);
    uac.send(&early.invite());
    uac.expect_status(&early.call_id, 404, Some("INVITE"), SOON);

    cfg.agents
        .push(Agent::new("b", AGENT_B, &uas_b.uri()).fallback_ms(100));
    std::fs::write(&precall.config_path, cfg.to_toml()).unwrap();
    precall.config = cfg.clone(); // the test's own view of the keys
    precall.signal("HUP");
    precall
        .log
        .wait_for(SOON, |l| l.contains("config reloaded"))
        .expect("the reload was logged");

    let routed = uac.call("+14155550402", AGENT_B);
    uac.send(&routed.invite());
    let inv = uas_b.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "fallback");
    // b's webhook key works now too
    precall.post_ok("b", "+14155550403", json!({"x": 1}));

    // the call held since before the reload is released and completes
    precall.post_ok("a", "+14155550401", json!({"tier": "gold"}));
    let inv = uas_a.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "waited");
    assert_eq!(inv.header("X-Precall-tier"), Some("gold"));
    complete_call(&uac, &uas_a, &held);
}

#[test]
fn a_broken_config_on_sighup_is_refused_and_the_old_one_serves() {
    let rig = Rig::udp("reload-bad", 200);
    std::fs::write(
        &rig.precall.config_path,
        "[sip]\nlisten = 7\n[[agents]]\nid = \"\"\n",
    )
    .unwrap();
    rig.precall.signal("HUP");
    let line = rig
        .precall
        .log
        .wait_for(SOON, |l| l.contains("reload refused"))
        .expect("the refusal was logged");
    assert!(
        line.contains("sip.listen") || line.contains("line"),
        "names the problem: {line}"
    );
    rig.precall
        .post_ok("a", "+14155550404", json!({"tier": "gold"}));
    let call = rig.uac.call("+14155550404", AGENT_A);
    rig.uac.send(&call.invite());
    let inv = rig.uas.expect_invite(SOON).msg;
    assert_eq!(status_of(&inv), "hit");
    complete_call(&rig.uac, &rig.uas, &call);
}

#[test]
fn sigterm_lets_held_calls_finish_refuses_new_ones_and_exits_0() {
    let mut rig = Rig::udp("drain", 1_500);
    let held = rig.uac.call("+14155550405", AGENT_A);
    rig.uac.send(&held.invite());
    rig.uac
        .expect_status(&held.call_id, 100, Some("INVITE"), SOON);
    let released = rig.uac.call("+14155550406", AGENT_A);
    rig.uac.send(&released.invite());
    rig.uac
        .expect_status(&released.call_id, 100, Some("INVITE"), SOON);

    rig.precall.signal("TERM");
    rig.precall
        .log
        .wait_for(SOON, |l| l.contains("draining"))
        .expect("the drain was logged");

    // new calls are turned away with a hint to retry elsewhere
    let late = rig.uac.call("+14155550407", AGENT_A);
    rig.uac.send(&late.invite());
    let refused = rig
        .uac
        .expect_status(&late.call_id, 503, Some("INVITE"), SOON);
    assert!(
        refused.header("Retry-After").is_some(),
        "{}",
        refused.text()
    );

    // webhooks still release held calls during the drain
    rig.precall
        .post_ok("a", "+14155550406", json!({"tier": "gold"}));
    let first = rig.uas.expect_invite(SOON).msg;
    assert_eq!(first.call_id(), Some(released.call_id.as_str()));
    assert_eq!(status_of(&first), "waited");
    rig.uac
        .expect_status(&released.call_id, 200, Some("INVITE"), SOON);
    // the other falls back when its wait runs out, and is answered
    let second = rig.uas.expect_invite(SOON).msg;
    assert_eq!(second.call_id(), Some(held.call_id.as_str()));
    assert_eq!(status_of(&second), "fallback");
    rig.uac
        .expect_status(&held.call_id, 200, Some("INVITE"), SOON);

    let status = rig
        .precall
        .wait_exit(Duration::from_secs(10))
        .expect("precall exits once drained");
    assert!(status.success(), "exit status {status:?}");
}
