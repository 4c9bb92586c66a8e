//! What the proxy core refuses, and why (README "Limits" and "Security"): the checks that
//! run before a request is routed, kept out of the routing code so it stays readable.
//!
//! In the order they run on a request ([`Proxy::refuse_request`]):
//! 1. `drop_scanners`: a User-Agent of a known scanner → dropped, no answer (an answer only
//!    tells the scanner there is something here).
//! 2. `allowed_peers`: a source outside them (and not an upstream) → `403`.
//! 3. RFC 3261 §16.3 step 1: a Request-URI scheme other than `sip:`, `sips:`, `tel:` → `416`
//!    (precall routes on the called number, which it cannot read from another scheme).
//! 4. §16.3 step 5: any `Proxy-Require` → `420` with `Unsupported` (precall implements no
//!    proxy extension).
//! 5. Out of dialog (no To tag), precall carries calls only: `OPTIONS` is answered by
//!    precall itself (`200`, or `483` at Max-Forwards 0 when not addressed to precall);
//!    `BYE`/`INFO`/`UPDATE`/`PRACK` → `481`; everything else (`REGISTER`, `MESSAGE`,
//!    `SUBSCRIBE`, unknown methods) → `405` with `Allow`. None of it reaches an agent.
//!
//! A new INVITE then passes [`Proxy::refuse_invite`]: per-source rate (`503` +
//! `Retry-After`, `trusted_peers` exempt) and the held-call cap (`503` + `Retry-After`).
//! And whatever is forwarded statelessly passes [`Proxy::refuse_relay`]: the next hop must
//! be an upstream, or the request must come from one (an agent's BYE goes back to the
//! caller); anything else is an open-relay attempt → `403`.
//!
//! Every refusal is counted ([`GuardStats`]); the first of a kind in a while is logged at
//! `warn`, the rest at `debug`, so a flood cannot flood the log.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, warn};

use super::{has_to_tag, reply_target, Output, Peer, Proxy, ServerKey};
use crate::config::{RouteTarget, SipLimits};
use crate::limits::{self, KeyedBuckets, Verdict};
use crate::sip::message::{HeaderName, Message, Method};
use crate::sip::parse::ParseError;
use crate::sip::{transaction, uri};

/// Most source IPs whose INVITE rate is tracked at once.
const RATE_KEYS: usize = 65_536;
/// Calls in memory (held, ringing, lingering) past which new INVITEs get `503`, as a
/// multiple of `max_held_calls`: answered calls linger for 64·T1, so this bounds memory
/// under a flood of INVITEs that are not held (anonymous callers).
const CALLS_PER_HELD: usize = 4;
/// At most one `warn` line per kind of refusal in this long.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// What precall answers to an `OPTIONS`, and lists in `Allow` of a `405`.
pub(super) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK";

/// Refusals counted since start, for the `stats` log line and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuardStats {
    /// Requests from known scanners, dropped unanswered.
    pub scanners_dropped: u64,
    /// Requests from outside `allowed_peers` (`403`, ACKs dropped).
    pub peers_refused: u64,
    /// INVITEs over the per-source rate (`503`).
    pub rate_limited: u64,
    /// INVITEs refused because too many calls were held or in memory (`503`).
    pub capacity_refused: u64,
    /// Requests whose next hop was neither an upstream nor reached from one (`403`).
    pub relay_refused: u64,
    /// Out-of-dialog requests precall does not carry (`405`, `481`).
    pub out_of_dialog_refused: u64,
    /// `416` (scheme) and `420` (Proxy-Require) answers.
    pub unsupported: u64,
}

/// The guard's state inside the core: the INVITE rate buckets, counters, log throttles.
pub(super) struct Guard {
    invites: Option<KeyedBuckets<IpAddr>>,
    pub(super) stats: GuardStats,
    warned: [Option<Instant>; 4],
}

#[derive(Clone, Copy)]
enum Warn {
    Rate = 0,
    Capacity = 1,
    Relay = 2,
    Peer = 3,
}

impl Guard {
    pub(super) fn new(limits: &SipLimits) -> Guard {
        Guard {
            invites: limits
                .invite_rate
                .map(|rate| KeyedBuckets::new(rate, RATE_KEYS)),
            stats: GuardStats::default(),
            warned: [None; 4],
        }
    }

    /// Whether a refusal of this kind at `now` deserves a `warn` line.
    fn should_warn(&mut self, kind: Warn, now: Instant) -> bool {
        let slot = &mut self.warned[kind as usize];
        let due = slot.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
        if due {
            *slot = Some(now);
        }
        due
    }
}

impl Proxy {
    /// Refusal counters since start.
    pub fn guard_stats(&self) -> GuardStats {
        self.guard.stats
    }

    /// Checks 1–5 of the module docs. `true` when the request was dealt with here
    /// (answered or dropped) and must go no further.
    pub(super) fn refuse_request(
        &mut self,
        now: Instant,
        from: &Peer,
        msg: &Message,
        method: &Method,
    ) -> bool {
        let agents = std::sync::Arc::clone(&self.agents);
        let limits = &agents.config.sip.limits;
        let is_ack = *method == Method::Ack;
        if limits.drop_scanners
            && msg
                .header_by_name("User-Agent")
                .is_some_and(limits::is_scanner)
        {
            self.guard.stats.scanners_dropped += 1;
            debug!(peer = %from.addr, "dropped a request from a known scanner");
            return true;
        }
        let ip = from.addr.ip();
        if !limits.allowed_peers.is_empty()
            && !limits::is_in(&limits.allowed_peers, ip)
            && !self.is_upstream_ip(ip)
        {
            self.guard.stats.peers_refused += 1;
            if self.guard.should_warn(Warn::Peer, now) {
                warn!(peer = %from.addr, "refused a request from outside sip.allowed_peers");
            }
            if !is_ack {
                self.respond(msg, from, 403, "Forbidden", None);
            }
            return true;
        }
        if is_ack {
            return false;
        }
        if !has_routable_scheme(msg) {
            self.guard.stats.unsupported += 1;
            self.respond(msg, from, 416, "Unsupported URI Scheme", None);
            return true;
        }
        if let Some(tags) = proxy_require(msg) {
            self.guard.stats.unsupported += 1;
            let extra = if tags.is_empty() {
                String::new()
            } else {
                format!("Unsupported: {tags}\r\n")
            };
            self.respond_with(msg, from, 420, "Bad Extension", &extra);
            return true;
        }
        if matches!(method, Method::Invite | Method::Cancel) || has_to_tag(msg) {
            return false;
        }
        match method {
            Method::Options if msg.max_forwards() == Some(0) && !self.is_for_us(msg) => {
                self.respond(msg, from, 483, "Too Many Hops", None);
            }
            Method::Options => self.answer_options(msg, from),
            Method::Bye | Method::Info | Method::Update | Method::Prack => {
                self.guard.stats.out_of_dialog_refused += 1;
                self.respond(msg, from, 481, "Call/Transaction Does Not Exist", None);
            }
            _ => {
                self.guard.stats.out_of_dialog_refused += 1;
                debug!(peer = %from.addr, method = %String::from_utf8_lossy(method.as_bytes()), "refused an out-of-dialog request");
                self.respond_with(
                    msg,
                    from,
                    405,
                    "Method Not Allowed",
                    &format!("Allow: {ALLOW}\r\n"),
                );
            }
        }
        true
    }

    /// A new INVITE (not a retransmission, not in a dialog): the per-source rate, then the
    /// held-call cap. `true` when it was refused with `503`.
    pub(super) fn refuse_invite(&mut self, now: Instant, from: &Peer, msg: &Message) -> bool {
        let agents = std::sync::Arc::clone(&self.agents);
        let ip = from.addr.ip();
        if let Some(buckets) = self.guard.invites.as_mut() {
            if !crate::agent::is_trusted(&agents.config, ip) {
                if let Verdict::Limited { retry_after } = buckets.check(now, &ip) {
                    self.guard.stats.rate_limited += 1;
                    if self.guard.should_warn(Warn::Rate, now) {
                        warn!(peer = %from.addr, "INVITE rate over sip.invite_rate_per_sec; answering 503");
                    }
                    self.respond_busy(msg, from, retry_after);
                    return true;
                }
            }
        }
        let max_held = agents.config.sip.limits.max_held_calls;
        if self.calls.len() < max_held {
            return false; // cannot be over: held calls are a subset
        }
        let mut held = 0usize;
        let mut soonest: Option<Instant> = None;
        for call in self.calls.values().filter(|c| c.hold.is_some()) {
            held += 1;
            if let Some(at) = call.deadlines[super::timer_index(super::Timer::Fallback)] {
                soonest = Some(soonest.map_or(at, |s| s.min(at)));
            }
        }
        let too_many_calls = self.calls.len() >= max_held.saturating_mul(CALLS_PER_HELD);
        if held < max_held && !too_many_calls {
            return false;
        }
        self.guard.stats.capacity_refused += 1;
        if self.guard.should_warn(Warn::Capacity, now) {
            warn!(
                held,
                calls = self.calls.len(),
                max_held_calls = max_held,
                "too many calls held or in memory; answering 503"
            );
        }
        let wait = soonest.map_or(Duration::from_secs(1), |at| {
            at.saturating_duration_since(now)
        });
        self.respond_busy(msg, from, wait);
        true
    }

    /// A request about to be forwarded statelessly to `to`. Precall is no open relay: the
    /// next hop must be an upstream, or the request must come from one (an agent's BYE or
    /// re-INVITE goes back to the caller along the route set). `true` when refused (`403`,
    /// an ACK silently dropped).
    pub(super) fn refuse_relay(
        &mut self,
        now: Instant,
        from: &Peer,
        msg: &Message,
        to: std::net::SocketAddr,
    ) -> bool {
        if self.is_upstream_ip(to.ip()) || self.is_upstream_ip(from.addr.ip()) {
            return false;
        }
        self.guard.stats.relay_refused += 1;
        if self.guard.should_warn(Warn::Relay, now) {
            warn!(peer = %from.addr, target = %to, "refused to relay a request to a host that is not an upstream");
        }
        if msg.method() != Some(&Method::Ack) {
            self.respond(msg, from, 403, "Forbidden (not a relay)", None);
        }
        true
    }

    /// Whether `ip` is the address of a configured upstream (an agent's, or a route's).
    pub(super) fn is_upstream_ip(&self, ip: IpAddr) -> bool {
        let same = |a: IpAddr| {
            a == ip
                || match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| IpAddr::V4(v4) == a),
                    IpAddr::V4(_) => false,
                }
        };
        self.agents.config.agents.iter().any(|agent| {
            agent.upstreams.iter().any(|u| same(u.addr.ip()))
                || agent.routes.iter().any(|r| match &r.target {
                    RouteTarget::Upstreams(list) => list.iter().any(|u| same(u.addr.ip())),
                    _ => false,
                })
        })
    }

    /// The server transaction key (RFC 3261 §17.2.3): the top Via's branch and sent-by when
    /// the branch has the magic cookie; otherwise (an RFC 2543 client, RFC 4475 inv2543) a
    /// key from what §17.2.3 says to compare instead: Request-URI, From tag, Call-ID, CSeq
    /// number and the top Via. An INVITE, its CANCEL and the ACK of a non-2xx final share
    /// all of these, so they still meet in one transaction.
    pub(super) fn server_key(&self, msg: &Message) -> Option<ServerKey> {
        let via = msg.top_via()?;
        if via.branch.is_some_and(|b| {
            b.len() > transaction::MAGIC_COOKIE.len() && b.starts_with(transaction::MAGIC_COOKIE)
        }) {
            return ServerKey::of(&via);
        }
        let from_tag = msg
            .header_str(HeaderName::From)
            .and_then(uri::tag_of)
            .unwrap_or("");
        let seq = msg.cseq()?.seq.to_string();
        let hash = transaction::stateless_branch(
            self.seed,
            &[
                b"rfc2543",
                msg.request_uri()?,
                from_tag.as_bytes(),
                msg.call_id()?,
                seq.as_bytes(),
                msg.slice(&via.range),
            ],
        );
        Some(ServerKey {
            branch: format!("rfc2543-{hash}"),
            sent_by: match via.port {
                Some(p) => format!("{}:{p}", via.host.to_ascii_lowercase()),
                None => via.host.to_ascii_lowercase(),
            },
        })
    }

    /// `503` with `Retry-After` (whole seconds, at least 1).
    fn respond_busy(&mut self, msg: &Message, from: &Peer, wait: Duration) {
        let extra = format!("Retry-After: {}\r\n", limits::retry_after_secs(wait));
        self.respond_with(msg, from, 503, "Service Unavailable", &extra);
    }

    /// Like `respond`, with `extra` header lines (each CRLF-terminated) before the end of
    /// the header section.
    pub(super) fn respond_with(
        &mut self,
        msg: &Message,
        from: &Peer,
        code: u16,
        reason: &str,
        extra: &str,
    ) {
        let tag = self.tag_prefix.clone();
        let mut resp = self
            .build_response(msg, from, code, reason, Some(&tag))
            .to_vec();
        let at = resp.len().saturating_sub(2);
        resp.splice(at..at, extra.bytes());
        let t = reply_target(msg.top_via().as_ref(), from, Bytes::from(resp));
        self.out.push_back(Output::Transmit(t));
    }
}

/// The status line for bytes that did not parse: `505` when the start line is a request
/// in another SIP version (RFC 4475 badvers; RFC 3261 §8.2.2... answers it so), else `400`
/// naming the problem.
pub(super) fn unparseable_status(bytes: &[u8], error: &ParseError) -> (u16, String) {
    if *error == ParseError::BadStartLine && is_other_sip_version(bytes) {
        return (505, "Version Not Supported".to_string());
    }
    (400, format!("Bad Request ({error})"))
}

/// `METHOD SP URI SP SIP/x.y` with a version other than 2.0.
fn is_other_sip_version(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(bytes.len());
    let rest = bytes.get(start..).unwrap_or_default();
    let line_end = rest
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(rest.len());
    let line = rest.get(..line_end).unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let is_version = version.len() > 4
        && version
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
        && version.get(4..).is_some_and(|v| {
            let mut nums = v.split(|b| *b == b'.');
            matches!((nums.next(), nums.next(), nums.next()), (Some(a), Some(b), None)
                if !a.is_empty() && !b.is_empty()
                    && a.iter().all(u8::is_ascii_digit) && b.iter().all(u8::is_ascii_digit))
        });
    !method.is_empty()
        && method.iter().all(|b| crate::inject::is_token_char(*b))
        && uri.contains(&b':')
        && is_version
        && version.get(4..) != Some(b"2.0".as_slice())
}

/// Whether the Request-URI is `sip:`, `sips:` or `tel:` (any case).
fn has_routable_scheme(msg: &Message) -> bool {
    let Some(uri) = msg.request_uri() else {
        return false;
    };
    let scheme = uri.split(|b| *b == b':').next().unwrap_or_default();
    [b"sip".as_slice(), b"sips", b"tel"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
}

/// The option tags of every `Proxy-Require` header, comma-joined (only well-formed tokens
/// are echoed back); `None` when there is no Proxy-Require with a value.
fn proxy_require(msg: &Message) -> Option<String> {
    let mut tags: Vec<&str> = Vec::new();
    let mut any = false;
    for h in msg.headers.iter().filter(|h| h.name == HeaderName::Other) {
        if !msg
            .slice(&h.name_range)
            .eq_ignore_ascii_case(b"Proxy-Require")
        {
            continue;
        }
        let value = std::str::from_utf8(msg.slice(&h.value)).unwrap_or("");
        for tag in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            any = true;
            if crate::inject::is_token(tag) && !tags.contains(&tag) {
                tags.push(tag);
            }
        }
    }
    any.then(|| tags.join(", "))
}

#[cfg(test)]
mod tests;
