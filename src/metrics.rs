//! What an operator can see while precall runs: Prometheus metrics (`GET /metrics`, through
//! the `metrics` facade and `metrics-exporter-prometheus`, which only renders the text: no
//! listener of its own) and the recent-calls log behind the status page (`/ui/`).
//!
//! # Metrics
//! | name | type | labels | counted |
//! | --- | --- | --- | --- |
//! | `precall_calls_total` | counter | `agent`, `status`, `outcome` | once per INVITE, at its final outcome |
//! | `precall_hold_wait_seconds` | histogram | `agent` | when a call's context is settled (hits too, ≈ 0) |
//! | `precall_held_calls` | gauge | | calls held waiting for context now |
//! | `precall_webhooks_total` | counter | `agent`, `code` | every `POST /v1/precall` answer |
//! | `precall_contexts` | gauge | | contexts cached (read from the store at each scrape) |
//! | `precall_sip_messages_total` | counter | `direction`, `kind` | every SIP message in or out |
//! | `precall_sip_parse_errors_total` | counter | | unparseable SIP (datagrams and TCP frames) |
//! | `precall_upstream_responses_total` | counter | `agent`, `code` | every response from an agent's upstream |
//! | `precall_route_matches_total` | counter | `agent`, `route` | a routing rule matched |
//! | `precall_route_errors_total` | counter | `agent` | a rule's expression failed at run time |
//! | `precall_lookup_misses_total` | counter | `agent` | a pull look-up answered nothing usable |
//! | `precall_lookup_failures_total` | counter | | the store failed a call's look-up |
//! | `precall_delivery_failures_total` | counter | `agent` | an HTTP context delivery failed |
//! | `precall_failovers_total` | counter | `agent` | an upstream attempt was abandoned for the next |
//!
//! `status` is `hit | waited | looked-up | fallback`, or `cancelled` for a call cancelled
//! before its context was settled; `outcome` is how it ended (`answered`, `cancelled`,
//! `timeout`, `unreachable`, `upstreams-failed`, `no-upstream`). Labels never carry an API
//! key or a context value, and an agent label only ever names a configured agent (or
//! `unknown`), so no client can grow the label set.
//!
//! The per-message counters (`precall_sip_messages_total`) are resolved once into handles
//! and classified from the first bytes of the message, so counting a packet is an atomic
//! add: no parse, no allocation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{Counter, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;

pub const CALLS: &str = "precall_calls_total";
pub const HOLD_WAIT: &str = "precall_hold_wait_seconds";
pub const HELD_CALLS: &str = "precall_held_calls";
pub const WEBHOOKS: &str = "precall_webhooks_total";
pub const CONTEXTS: &str = "precall_contexts";
pub const SIP_MESSAGES: &str = "precall_sip_messages_total";
pub const SIP_PARSE_ERRORS: &str = "precall_sip_parse_errors_total";
pub const UPSTREAM_RESPONSES: &str = "precall_upstream_responses_total";
pub const ROUTE_MATCHES: &str = "precall_route_matches_total";
pub const ROUTE_ERRORS: &str = "precall_route_errors_total";
pub const LOOKUP_MISSES: &str = "precall_lookup_misses_total";
pub const LOOKUP_FAILURES: &str = "precall_lookup_failures_total";
pub const DELIVERY_FAILURES: &str = "precall_delivery_failures_total";
pub const FAILOVERS: &str = "precall_failovers_total";

/// Hold-wait buckets in seconds: hits are ~0, webhooks land within tens to hundreds of
/// milliseconds, fallbacks at `fallback_wait_ms` (default 2 s, at most 60 s).
const HOLD_WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same
/// handle). Call before anything counts: handles resolved earlier stay no-ops. `None` when
/// another recorder was installed first (embedding), in which case `/metrics` says so.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HOLD_WAIT.to_string()), &HOLD_WAIT_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// `# HELP` lines for the exposition.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CALLS, "INVITEs by agent, context status and final outcome");
    describe_histogram!(
        HOLD_WAIT,
        Unit::Seconds,
        "how long call setup was held for context"
    );
    describe_gauge!(HELD_CALLS, "calls held waiting for context now");
    describe_counter!(
        WEBHOOKS,
        "POST /v1/precall answers by agent and HTTP status"
    );
    describe_gauge!(CONTEXTS, "contexts cached in the store");
    describe_counter!(
        SIP_MESSAGES,
        "SIP messages by direction and method or class"
    );
    describe_counter!(SIP_PARSE_ERRORS, "SIP messages that did not parse");
    describe_counter!(UPSTREAM_RESPONSES, "responses from agents' upstreams");
    describe_counter!(ROUTE_MATCHES, "calls a routing rule matched");
    describe_counter!(
        ROUTE_ERRORS,
        "routing rule expressions that failed at run time"
    );
    describe_counter!(LOOKUP_MISSES, "pull look-ups that answered nothing usable");
    describe_counter!(LOOKUP_FAILURES, "context look-ups the store failed");
    describe_counter!(DELIVERY_FAILURES, "HTTP context deliveries that failed");
    describe_counter!(
        FAILOVERS,
        "upstream attempts abandoned for the next upstream"
    );
}

// ------------------------------------------------------------------------ SIP messages

/// Which way a SIP message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// The `kind` label values: request methods precall sees, `other` for the rest, and
/// response classes.
const KINDS: [&str; 20] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "UPDATE",
    "PRACK",
    "REFER",
    "NOTIFY",
    "SUBSCRIBE",
    "MESSAGE",
    "other",
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "6xx",
];
const OTHER: usize = 13;
const FIRST_CLASS: usize = 14;

/// The `kind` of a message from its first bytes: the method of a request (or `other`), the
/// class of a response (`2xx`). No parse: a malformed message is still counted, under the
/// kind its start suggests.
pub fn sip_kind(bytes: &[u8]) -> &'static str {
    KINDS.get(kind_index(bytes)).copied().unwrap_or("other")
}

fn kind_index(bytes: &[u8]) -> usize {
    if let Some(rest) = bytes.strip_prefix(b"SIP/2.0 ") {
        return match rest.first() {
            Some(d @ b'1'..=b'6') => FIRST_CLASS + usize::from(d - b'1'),
            _ => OTHER,
        };
    }
    let method_end = bytes.iter().take(16).position(|&b| b == b' ');
    let Some(method) = method_end.and_then(|end| bytes.get(..end)) else {
        return OTHER;
    };
    KINDS
        .iter()
        .take(OTHER)
        .position(|k| k.as_bytes() == method)
        .unwrap_or(OTHER)
}

/// One counter handle per (direction, kind), resolved on first use.
struct SipCounters {
    inbound: Vec<Counter>,
    outbound: Vec<Counter>,
}

static SIP_COUNTERS: OnceLock<SipCounters> = OnceLock::new();

fn sip_counters() -> &'static SipCounters {
    SIP_COUNTERS.get_or_init(|| {
        let resolve = |direction: &'static str| {
            KINDS
                .iter()
                .map(|&kind| {
                    metrics::counter!(SIP_MESSAGES, "direction" => direction, "kind" => kind)
                })
                .collect()
        };
        SipCounters {
            inbound: resolve("in"),
            outbound: resolve("out"),
        }
    })
}

/// Counts one SIP message (`precall_sip_messages_total`): an atomic add.
pub fn count_sip(direction: Direction, bytes: &[u8]) {
    let counters = sip_counters();
    let list = match direction {
        Direction::In => &counters.inbound,
        Direction::Out => &counters.outbound,
    };
    if let Some(counter) = list.get(kind_index(bytes)) {
        counter.increment(1);
    }
}

/// Counts one unparseable SIP message (`precall_sip_parse_errors_total`).
pub fn count_parse_error() {
    static COUNTER: OnceLock<Counter> = OnceLock::new();
    COUNTER
        .get_or_init(|| metrics::counter!(SIP_PARSE_ERRORS))
        .increment(1);
}

/// A status code as a label: the common ones without allocating.
pub fn code_label(code: u16) -> SharedString {
    const COMMON: [(u16, &str); 24] = [
        (100, "100"),
        (180, "180"),
        (181, "181"),
        (182, "182"),
        (183, "183"),
        (200, "200"),
        (202, "202"),
        (204, "204"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (480, "480"),
        (486, "486"),
        (487, "487"),
        (500, "500"),
        (503, "503"),
        (603, "603"),
        (504, "504"),
    ];
    match COMMON.iter().find(|(c, _)| *c == code) {
        Some((_, text)) => SharedString::const_str(text),
        None => SharedString::from(code.to_string()),
    }
}

// ------------------------------------------------------------------------ recent calls

/// How many finished calls the status page shows.
pub const RECENT_CALLS: usize = 100;

/// One finished call, as the status page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    /// When it ended, milliseconds since the Unix epoch.
    pub ended_ms: u64,
    pub call_id: String,
    pub agent: String,
    /// E.164, or `-` when the caller was anonymous.
    pub caller: String,
    /// `hit | waited | looked-up | fallback | cancelled`.
    pub status: &'static str,
    pub wait_ms: u64,
    /// The final status code the caller got.
    pub answer: u16,
    pub outcome: &'static str,
}

/// What the SIP core publishes for the status page: calls held now and the last
/// [`RECENT_CALLS`] finished calls. Shared between the core (writer, one push per call)
/// and the HTTP side (reader); the lock is held only to push or copy.
#[derive(Debug, Default)]
pub struct CallLog {
    held: AtomicUsize,
    recent: Mutex<VecDeque<CallRecord>>,
}

impl CallLog {
    pub fn new() -> CallLog {
        CallLog::default()
    }

    /// A call started to wait for its context.
    pub fn hold_started(&self) {
        let now = self.held.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        metrics::gauge!(HELD_CALLS).set(now as f64);
    }

    /// A held call stopped waiting (settled, cancelled or dropped).
    pub fn hold_ended(&self) {
        let before = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        metrics::gauge!(HELD_CALLS).set(before.saturating_sub(1) as f64);
    }

    /// Calls held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Records a finished call, stamping `ended_ms` with the wall clock (the core passes
    /// none: it reads no clock); the oldest falls off past [`RECENT_CALLS`].
    pub fn push(&self, mut record: CallRecord) {
        record.ended_ms = unix_ms();
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() >= RECENT_CALLS {
                recent.pop_front();
            }
            recent.push_back(record);
        }
    }

    /// The finished calls, newest first.
    pub fn recent(&self) -> Vec<CallRecord> {
        self.recent
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_first_bytes() {
        assert_eq!(sip_kind(b"INVITE sip:+1@h SIP/2.0\r\n"), "INVITE");
        assert_eq!(sip_kind(b"ACK sip:x SIP/2.0\r\n"), "ACK");
        assert_eq!(sip_kind(b"NEWMETHOD sip:x SIP/2.0\r\n"), "other");
        assert_eq!(sip_kind(b"SIP/2.0 180 Ringing\r\n"), "1xx");
        assert_eq!(sip_kind(b"SIP/2.0 200 OK\r\n"), "2xx");
        assert_eq!(sip_kind(b"SIP/2.0 487 Request Terminated\r\n"), "4xx");
        assert_eq!(sip_kind(b"SIP/2.0 603 Decline\r\n"), "6xx");
        assert_eq!(sip_kind(b"SIP/2.0 999 x\r\n"), "other");
        assert_eq!(sip_kind(b""), "other");
        assert_eq!(sip_kind(b"\x00\xff garbage"), "other");
        assert_eq!(sip_kind(b"INVITEXXXXXXXXXXXXXXXXXXXXXXX"), "other");
        // a lower-case method is another method (RFC 3261 methods are case-sensitive)
        assert_eq!(sip_kind(b"invite sip:x SIP/2.0"), "other");
    }

    #[test]
    fn common_codes_are_static_labels() {
        assert_eq!(code_label(200).as_ref(), "200");
        assert_eq!(code_label(487).as_ref(), "487");
        assert_eq!(code_label(299).as_ref(), "299");
    }

    #[test]
    fn the_call_log_keeps_the_last_hundred_newest_first() {
        let log = CallLog::new();
        for n in 0..(RECENT_CALLS as u64 + 5) {
            log.push(CallRecord {
                ended_ms: n,
                call_id: format!("c{n}"),
                agent: "a".into(),
                caller: "+1".into(),
                status: "hit",
                wait_ms: 0,
                answer: 200,
                outcome: "answered",
            });
        }
        let recent = log.recent();
        assert_eq!(recent.len(), RECENT_CALLS);
        assert_eq!(recent[0].call_id, "c104");
        assert!(recent[0].ended_ms > 0, "stamped");
        assert_eq!(recent[RECENT_CALLS - 1].call_id, "c5");
    }

    #[test]
    fn held_count_never_goes_negative() {
        let log = CallLog::new();
        log.hold_started();
        log.hold_started();
        log.hold_ended();
        assert_eq!(log.held(), 1);
        log.hold_ended();
        log.hold_ended();
        assert_eq!(log.held(), 0);
    }

    #[test]
    fn rendered_names_and_labels() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HOLD_WAIT.to_string()), &HOLD_WAIT_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(CALLS, "agent" => "a", "status" => "hit", "outcome" => "answered")
                .increment(2);
            metrics::histogram!(HOLD_WAIT, "agent" => "a").record(0.2);
            metrics::counter!(WEBHOOKS, "agent" => "a", "code" => code_label(202)).increment(1);
        });
        let text = handle.render();
        assert!(
            text.contains(r#"precall_calls_total{agent="a",status="hit",outcome="answered"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"precall_hold_wait_seconds_bucket{agent="a",le="0.25"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"precall_webhooks_total{agent="a",code="202"} 1"#),
            "{text}"
        );
    }
}
