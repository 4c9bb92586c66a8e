//! RFC 4475 torture messages against the real binary, over UDP and over TCP: every one of
//! the 49 fixtures in `tests/fixtures/rfc4475/` is sent as is, precall's answer is checked
//! against the table below, and after each one a plain call still completes.
//!
//! The table is the record of what precall does with each message and why (issue 7's
//! closing note repeats it). precall is a proxy that carries calls to agents, with one
//! agent here that is also the default (so any INVITE it can route reaches it):
//! - valid INVITEs are forwarded to the agent, whose `200` reaches the sender;
//! - valid requests precall does not carry (out of dialog: REGISTER, MESSAGE, unknown
//!   methods) get `405`, an OPTIONS is answered `200` by precall itself, a Request-URI
//!   scheme it cannot route gets `416`, `Proxy-Require` gets `420`, Max-Forwards 0 `483`;
//! - responses that answer nothing precall sent are dropped (never relayed: reflection);
//! - malformed requests get `400` (`505` for another SIP version) when Via, From, To,
//!   Call-ID and CSeq can be found to address it, else they are dropped.
//!
//! Over TCP the answers are the same, with what framing adds: a message without
//! Content-Length (inv2543), or whose head or Content-Length cannot be framed, gets its
//! `400` (when addressable) and then the connection is closed, because nothing after it can
//! be trusted; a Content-Length larger than what is sent (clerr) just waits for more bytes
//! until `sip.tcp_idle_secs` closes the connection.
//!
//! UDP answers go where RFC 3261 §18.2.2 says: the source address at the Via port (5060
//! for all of these, or the source port with `rport`). So the sender binds 127.0.0.X:5060,
//! another loopback address than precall's and the agent's, and nothing needs rewriting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::{Agent, Config};
use crate::raw::{plain_call, recv_where, start, udp_on_alias, RawTcp};
use crate::rig::{AGENT_A, QUIET, SOON};
use crate::sipmsg::SipMsg;
use crate::uas::{Answer, Uac, Uas};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// A response with this code.
    Answer(u16),
    /// Forwarded to the agent (it receives the message's Call-ID) and the agent's `200`
    /// comes back to the sender.
    Forwarded,
    /// Forwarded to the agent; the agent's answer is relayed where the message's Via
    /// says (a stateless relay has nothing else to go by), not on this connection.
    ForwardedOnly,
    /// No answer at all.
    Nothing,
}

use Want::*;

/// One fixture: what precall answers over UDP and over TCP, whether the TCP connection
/// is closed afterwards, and why.
struct Case {
    file: &'static str,
    udp: Want,
    tcp: Want,
    tcp_closes: bool,
    why: &'static str,
}

const fn case(
    file: &'static str,
    udp: Want,
    tcp: Want,
    tcp_closes: bool,
    why: &'static str,
) -> Case {
    Case {
        file,
        udp,
        tcp,
        tcp_closes,
        why,
    }
}

const CASES: [Case; 49] = [
    // --- RFC 4475 §3.1.1: valid messages
    case("wellformed/wsinv", Forwarded, ForwardedOnly, false, "odd whitespace, folding, compact headers, a To tag: a re-INVITE forwarded statelessly to the (default) agent; the answer follows its Via (UDP)"),
    case("wellformed/intmeth", Answer(405), Answer(405), false, "an unknown method out of dialog: precall carries calls only"),
    case("wellformed/esc01", Forwarded, Forwarded, false, "escaped characters in the Request-URI and From: forwarded as is"),
    case("wellformed/escnull", Answer(405), Answer(405), false, "REGISTER: precall is no registrar"),
    case("wellformed/esc02", Answer(405), Answer(405), false, "RE%47IST%45R is an unknown method (methods are not unescaped)"),
    case("wellformed/lwsdisp", Answer(200), Answer(200), false, "OPTIONS answered by precall"),
    case("wellformed/longreq", Forwarded, Forwarded, false, "long header values: an INVITE forwarded (no branch: RFC 2543 matching)"),
    case("wellformed/dblreq", Answer(405), Answer(405), true, "UDP: the REGISTER counts, the INVITE after its Content-Length is discarded; TCP: that INVITE is a second message (forwarded), and the 5 bytes after its body cannot be framed: closed"),
    case("wellformed/semiuri", Answer(200), Answer(200), false, "OPTIONS answered by precall"),
    case("wellformed/transports", Answer(200), Answer(200), false, "OPTIONS with unknown transports in lower Vias: answered"),
    case("wellformed/mpart01", Answer(405), Answer(405), false, "MESSAGE with a binary multipart body: not carried"),
    case("wellformed/unreason", Nothing, Nothing, false, "a response to nothing precall sent: dropped"),
    case("wellformed/noreason", Nothing, Nothing, false, "a response to nothing precall sent: dropped"),
    // --- §3.2, §3.3: semantics
    case("wellformed/badbranch", Answer(200), Answer(200), false, "OPTIONS whose branch is only the magic cookie: answered"),
    case("wellformed/unkscm", Answer(416), Answer(416), false, "unknown Request-URI scheme: 416 Unsupported URI Scheme"),
    case("wellformed/novelsc", Answer(416), Answer(416), false, "soap.beep: Request-URI: 416"),
    case("wellformed/unksm2", Answer(405), Answer(405), false, "REGISTER with odd To/From schemes: not carried"),
    case("wellformed/bext01", Answer(420), Answer(420), false, "Proxy-Require: 420 Bad Extension with Unsupported"),
    case("wellformed/invut", Forwarded, Forwarded, false, "unknown body type: the agent's business, forwarded"),
    case("wellformed/regaut01", Answer(405), Answer(405), false, "REGISTER with an unknown auth scheme: not carried"),
    case("wellformed/bcast", Nothing, Nothing, false, "a response with a broadcast Via: never relayed"),
    case("wellformed/zeromf", Answer(483), Answer(483), false, "OPTIONS with Max-Forwards 0 not for precall: 483"),
    case("wellformed/cparam01", Answer(405), Answer(405), false, "REGISTER: not carried"),
    case("wellformed/cparam02", Answer(405), Answer(405), false, "REGISTER: not carried"),
    case("wellformed/regescrt", Answer(405), Answer(405), false, "REGISTER: not carried"),
    case("wellformed/sdp01", Forwarded, Forwarded, false, "Accept of an unknown type: forwarded"),
    // --- §3.4: RFC 2543
    case("wellformed/inv2543", Forwarded, Answer(400), true, "no branch, no Max-Forwards: matched the RFC 2543 way, forwarded with Max-Forwards 70; over TCP it has no Content-Length: 400 and closed"),
    // --- §3.1.2, §3.3: invalid messages
    case("malformed/badinv01", Answer(400), Answer(400), false, "Via ;;,;,,"),
    case("malformed/clerr", Answer(400), Nothing, true, "Content-Length larger than the body: 400 over UDP; over TCP precall waits for the rest until the idle timeout"),
    case("malformed/ncl", Answer(400), Answer(400), true, "negative Content-Length"),
    case("malformed/scalar02", Answer(400), Answer(400), false, "CSeq number too large"),
    case("malformed/scalarlg", Nothing, Nothing, false, "a response with huge numbers: dropped"),
    case("malformed/quotbal", Answer(400), Answer(400), false, "unbalanced quotes in To"),
    case("malformed/ltgtruri", Answer(400), Answer(400), true, "<> around the Request-URI"),
    case("malformed/lwsruri", Answer(400), Answer(400), true, "whitespace inside the Request-URI"),
    case("malformed/lwsstart", Answer(400), Answer(400), true, "two spaces in the start line"),
    case("malformed/trws", Answer(400), Answer(400), true, "trailing whitespace after SIP/2.0"),
    case("malformed/escruri", Answer(400), Answer(400), true, "headers (?Route=) in the Request-URI"),
    case("malformed/baddate", Answer(400), Answer(400), false, "Date not in GMT"),
    case("malformed/regbadct", Answer(400), Answer(400), false, "Contact URI with ? not in <>"),
    case("malformed/badaspec", Answer(400), Answer(400), false, "spaces inside <>"),
    case("malformed/baddn", Answer(400), Answer(400), false, "display name with a comma, unquoted"),
    case("malformed/badvers", Answer(505), Answer(505), true, "SIP/7.0: 505 Version Not Supported"),
    case("malformed/mismatch01", Answer(400), Answer(400), false, "CSeq method differs from the method"),
    case("malformed/mismatch02", Answer(400), Answer(400), false, "unknown method, CSeq INVITE (RFC 4475 prefers 501; 400 is allowed)"),
    case("malformed/bigcode", Nothing, Nothing, true, "a response with a 10-digit code: dropped"),
    case("malformed/insuf", Nothing, Nothing, false, "no From, To, Call-ID: nothing to address a 400 to, dropped"),
    case("malformed/multi01", Answer(400), Nothing, true, "two Call-IDs, CSeqs, Froms, Tos: 400; over TCP its Content-Length (154) exceeds the body (152): waits, closed when idle"),
    case("malformed/mcl01", Answer(400), Answer(400), true, "two different Content-Lengths"),
];

fn fixture(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rfc4475")
        .join(format!("{file}.sip"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Call-ID of a fixture, read leniently (`Call-ID:` or `i:`).
fn call_id_of(bytes: &[u8]) -> Option<String> {
    SipMsg::parse(bytes)
        .and_then(|m| m.call_id().map(str::to_string))
        .or_else(|| {
            String::from_utf8_lossy(bytes).lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                matches!(name.trim().to_ascii_lowercase().as_str(), "call-id" | "i")
                    .then(|| value.trim().to_string())
            })
        })
}

/// What the agent received with this Call-ID within `timeout`.
fn agent_got(uas: &Uas, call_id: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(r) =
        uas.recv_request("INVITE", deadline.saturating_duration_since(Instant::now()))
    {
        if r.msg.call_id() == Some(call_id) {
            return true;
        }
    }
    false
}

struct Rig {
    precall: crate::harness::Precall,
    uas: Uas,
    uac: Uac,
}

fn rig(name: &str) -> Rig {
    let uas = Uas::udp(Answer::Ring200);
    let mut cfg = Config::new(vec![Agent::new("a", AGENT_A, &uas.uri()).fallback_ms(100)]);
    cfg.default_agent = Some("a".to_string());
    let precall = start(name, &cfg, &[("sip", "tcp_idle_secs = 2")]);
    let uac = Uac::udp(precall.udp);
    Rig { precall, uas, uac }
}

#[test]
fn rfc4475_torture_messages_over_udp() {
    let r = rig("torture-udp");
    let sock = udp_on_alias(5060);
    let mut failures = Vec::new();
    for (n, c) in CASES.iter().enumerate() {
        let bytes = fixture(c.file);
        let call_id = call_id_of(&bytes).unwrap_or_default();
        sock.send_to(&bytes, r.precall.udp).unwrap();
        let got = match c.udp {
            Answer(code) => {
                let m = recv_where(&sock, SOON, |m| {
                    m.status().is_some_and(|s| s >= 200 || s == code)
                });
                match m {
                    Some(m) if m.status() == Some(code) => Ok(()),
                    Some(m) => Err(format!("got {}", m.start_line)),
                    None => Err("no answer".to_string()),
                }
            }
            Forwarded => {
                if !agent_got(&r.uas, &call_id, SOON) {
                    Err("not forwarded to the agent".to_string())
                } else if recv_where(&sock, SOON, |m| m.status() == Some(200)).is_none() {
                    Err("the agent's 200 did not come back".to_string())
                } else {
                    Ok(())
                }
            }
            Nothing | ForwardedOnly => match recv_where(&sock, QUIET, |_| true) {
                Some(m) => Err(format!("answered {}", m.start_line)),
                None => Ok(()),
            },
        };
        if let Err(e) = got {
            failures.push(format!(
                "{} (UDP, want {:?}: {}): {e}",
                c.file, c.udp, c.why
            ));
        }
        plain_call(&r.uac, &r.uas, &format!("+1415555{:04}", 2000 + n));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    let mut p = r.precall;
    assert!(p.is_running());
}

#[test]
fn rfc4475_torture_messages_over_tcp() {
    let r = rig("torture-tcp");
    let mut failures = Vec::new();
    for (n, c) in CASES.iter().enumerate() {
        let bytes = fixture(c.file);
        let call_id = call_id_of(&bytes).unwrap_or_default();
        let mut conn = RawTcp::connect(r.precall.tcp);
        conn.send(&bytes);
        let got = match c.tcp {
            Answer(code) => match conn.recv(SOON) {
                // dblreq: the second message (an INVITE) is forwarded too.
                Some(m) if m.status() == Some(code) => Ok(()),
                Some(m) => Err(format!("got {}", m.start_line)),
                None => Err("no answer".to_string()),
            },
            ForwardedOnly => {
                if agent_got(&r.uas, &call_id, SOON) {
                    Ok(())
                } else {
                    Err("not forwarded to the agent".to_string())
                }
            }
            Forwarded => {
                if !agent_got(&r.uas, &call_id, SOON) {
                    Err("not forwarded to the agent".to_string())
                } else {
                    let deadline = Instant::now() + SOON;
                    let mut ok = false;
                    while let Some(m) =
                        conn.recv(deadline.saturating_duration_since(Instant::now()))
                    {
                        if m.status() == Some(200) {
                            ok = true;
                            break;
                        }
                    }
                    if ok {
                        Ok(())
                    } else {
                        Err("the agent's 200 did not come back".to_string())
                    }
                }
            }
            Nothing => match conn.recv(QUIET) {
                Some(m) => Err(format!("answered {}", m.start_line)),
                None => Ok(()),
            },
        };
        if let Err(e) = got {
            failures.push(format!(
                "{} (TCP, want {:?}: {}): {e}",
                c.file, c.tcp, c.why
            ));
        }
        // Closed when framing was lost (clerr: by the 2 s idle timeout); else still open.
        let window = if c.tcp == Nothing && c.tcp_closes {
            Duration::from_secs(5)
        } else {
            QUIET
        };
        let closed = conn.wait_closed(window);
        if closed != c.tcp_closes {
            failures.push(format!(
                "{} (TCP): connection {} (want {})",
                c.file,
                if closed { "closed" } else { "left open" },
                if c.tcp_closes { "closed" } else { "open" }
            ));
        }
        if c.file.ends_with("dblreq")
            && !agent_got(&r.uas, "dblreq.0ha0isnda977644900765@192.0.2.15", SOON)
        {
            failures.push("dblreq (TCP): the second message, an INVITE, was not forwarded".into());
        }
        plain_call(&r.uac, &r.uas, &format!("+1415555{:04}", 2100 + n));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    let mut p = r.precall;
    assert!(p.is_running());
}
