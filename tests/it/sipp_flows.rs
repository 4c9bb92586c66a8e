//! SIPp on both sides of precall: `uac.xml` as the carrier, `uas.xml` as the agent,
//! `cancel.xml` for a CANCEL while held. These are the README demo, run as tests.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Agent, Config, Precall, TempDir};
use crate::rig::*;
use crate::sipp::{start_uas, Sipp};
use crate::uas::Transport;

/// The callers of `sipp-scenarios/callers.csv`.
fn csv_callers() -> Vec<String> {
    std::fs::read_to_string(crate::sipp::scenario_dir().join("callers.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(';').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn sipp_call_flow(name: &str, transport: Transport) {
    const CALLS: u32 = 20;
    let dir = TempDir::new(name);
    let (uas, uas_port) = start_uas("uas", &dir, transport, CALLS);
    let upstream = format!("sip:127.0.0.1:{uas_port};transport={}", transport.param());
    let mut cfg = Config::new(vec![Agent::new("a", AGENT_A, &upstream).fallback_ms(5_000)]);
    // Five CSV callers, twenty calls: the contexts must serve every call.
    cfg.consume = false;
    let precall = Precall::start(name, &cfg);
    let callers = csv_callers();
    assert!(callers.len() >= 3, "callers.csv has callers: {callers:?}");
    for c in &callers {
        precall.post_ok(
            "a",
            c,
            json!({ "customer_name": format!("Caller {c}"), "plan": "gold" }),
        );
    }

    let target = match transport {
        Transport::Udp => precall.udp,
        Transport::Tcp => precall.tcp,
    };
    let t = if transport == Transport::Udp {
        "u1"
    } else {
        "t1"
    };
    let args: Vec<String> = [
        "-inf",
        "callers.csv",
        "-s",
        AGENT_A,
        "-t",
        t,
        "-m",
        &CALLS.to_string(),
        "-r",
        "20",
        "-l",
        "10",
        "-p",
        &crate::harness::free_port_udp_tcp().to_string(),
        "-timeout",
        "60",
        "-timeout_error",
        "-recv_timeout",
        "10000",
        "-default_behaviors",
        "all,-abortunexp",
        &target.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let uac = Sipp::spawn("uac", "uac.xml", &dir, &args).wait(Duration::from_secs(90));
    assert!(uac.success(), "{}", uac.report("uac"));

    let uas = uas.wait(Duration::from_secs(30));
    assert!(uas.success(), "{}", uas.report("uas"));
    let hits = uas.logs.matches("X-Precall-Status: hit").count();
    assert_eq!(
        hits, CALLS as usize,
        "every call reached the agent as a hit:\n{}",
        uas.logs
    );
    for c in &callers {
        assert!(
            uas.logs
                .contains(&format!("X-Precall-customer_name: Caller {c}")),
            "context of {c} missing:\n{}",
            uas.logs
        );
    }
    assert!(uas.logs.contains("X-Precall-Wait-Ms: "), "{}", uas.logs);
}

#[test]
fn sipp_uac_and_uas_through_precall_udp() {
    sipp_call_flow("sipp-flow-udp", Transport::Udp);
}

#[test]
fn sipp_uac_and_uas_through_precall_tcp() {
    sipp_call_flow("sipp-flow-tcp", Transport::Tcp);
}

#[test]
fn sipp_cancel_while_held() {
    let rig = Rig::udp("sipp-cancel", 10_000);
    let dir = TempDir::new("sipp-cancel");
    let args: Vec<String> = [
        "-inf",
        "callers.csv",
        "-s",
        AGENT_A,
        "-m",
        "3",
        "-r",
        "10",
        "-d",
        "300",
        "-p",
        &crate::harness::free_udp_port().to_string(),
        "-timeout",
        "30",
        "-timeout_error",
        "-recv_timeout",
        "5000",
        &rig.precall.udp.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cancel = Sipp::spawn("cancel", "cancel.xml", &dir, &args).wait(Duration::from_secs(60));
    assert!(cancel.success(), "{}", cancel.report("cancel"));
    assert!(
        cancel.messages.matches("SIP/2.0 487").count() >= 3,
        "{}",
        cancel.report("cancel")
    );
    rig.uas.expect_nothing(
        Duration::from_millis(800),
        "cancelled calls must not be forwarded",
    );
}
