//! What most call tests share: an agent UAS, precall in front of it, a caller, and readers
//! for the `X-Precall-*` headers of a forwarded INVITE.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::{Agent, Config, Precall};
use crate::sipmsg::SipMsg;
use crate::uas::{Answer, Call, Uac, Uas};

/// Agent A's called number.
pub const AGENT_A: &str = "+14155550100";
/// Agent B's called number.
pub const AGENT_B: &str = "+14155550200";

/// The patience for anything that should happen "at once" on loopback: generous, because
/// the machine is small and shared; it only costs time when a test is failing.
pub const SOON: Duration = Duration::from_secs(5);
/// How long to watch for something that must NOT happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// Precall with one agent `a` at [`AGENT_A`] in front of a UDP UAS, and a UDP caller.
pub struct Rig {
    pub precall: Precall,
    pub uas: Uas,
    pub uac: Uac,
}

impl Rig {
    pub fn udp(name: &str, fallback_ms: u64) -> Rig {
        Rig::build(name, Uas::udp(Answer::Ring200), fallback_ms, |_| {})
    }

    pub fn build(name: &str, uas: Uas, fallback_ms: u64, tweak: impl FnOnce(&mut Config)) -> Rig {
        let mut cfg = Config::new(vec![
            Agent::new("a", AGENT_A, &uas.uri()).fallback_ms(fallback_ms)
        ]);
        tweak(&mut cfg);
        let precall = Precall::start(name, &cfg);
        let uac = Uac::udp(precall.udp);
        Rig { precall, uas, uac }
    }
}

/// The `X-Precall-*` headers of a message: suffix after the prefix → value (one each).
pub fn x_precall(msg: &SipMsg) -> BTreeMap<String, String> {
    msg.fields
        .iter()
        .filter_map(|f| {
            let lower = f.name.to_ascii_lowercase();
            lower
                .strip_prefix("x-precall-")
                .map(|_| (f.name["X-Precall-".len()..].to_string(), f.value.clone()))
        })
        .collect()
}

/// `X-Precall-Status`, or a panic showing the message.
pub fn status_of(msg: &SipMsg) -> String {
    msg.header("X-Precall-Status")
        .unwrap_or_else(|| panic!("no X-Precall-Status in:\n{}", msg.text()))
        .to_string()
}

/// `X-Precall-Wait-Ms` as a number, or a panic showing the message.
pub fn wait_ms_of(msg: &SipMsg) -> u64 {
    msg.header("X-Precall-Wait-Ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric X-Precall-Wait-Ms in:\n{}", msg.text()))
}

/// After the agent got the INVITE: the caller gets the 200, ACKs it and hangs up through
/// the Record-Route path; the agent sees ACK and BYE, the caller the BYE's 200.
pub fn complete_call(uac: &Uac, uas: &Uas, call: &Call) -> SipMsg {
    let ok = uac.expect_status(&call.call_id, 200, Some("INVITE"), SOON);
    assert_eq!(
        ok.header_values("via").len(),
        1,
        "precall must strip its own Via from the 200:\n{}",
        ok.text()
    );
    uac.send(&call.in_dialog("ACK", 1, &ok));
    let ack = uas.recv_request("ACK", SOON).unwrap_or_else(|| {
        panic!(
            "the 2xx ACK never reached the agent (Route {:?})",
            ok.header_values("record-route")
        )
    });
    assert_eq!(ack.msg.call_id(), Some(call.call_id.as_str()));
    uac.send(&call.in_dialog("BYE", 2, &ok));
    let bye = uas
        .recv_request("BYE", SOON)
        .expect("the BYE never reached the agent");
    assert_eq!(bye.msg.call_id(), Some(call.call_id.as_str()));
    uac.expect_status(&call.call_id, 200, Some("BYE"), SOON);
    ok
}
