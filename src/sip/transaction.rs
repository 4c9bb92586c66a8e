//! RFC 3261 §17 transaction vocabulary: timer values, the states of the INVITE server and
//! client transactions the proxy keeps, and branch generation. Pure data; the proxy core
//! ([`super::proxy`]) drives it with time passed in.

use std::time::Duration;

/// RFC 3261 timer values derived from T1 (§17.1.1.1, table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Round-trip estimate, default 500 ms.
    pub t1: Duration,
    /// Cap on non-INVITE and final-response retransmission intervals (4 s).
    pub t2: Duration,
    /// How long a message may linger in the network (5 s).
    pub t4: Duration,
}

impl Timers {
    pub fn new(t1: Duration) -> Timers {
        Timers {
            t1,
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
    /// Timer B / H / F: 64·T1, the transaction timeout.
    pub fn timeout(&self) -> Duration {
        self.t1 * 64
    }
    /// Timer C: a proxy gives up on a ringing INVITE after this (> 3 minutes, §16.6 step 11).
    pub fn timer_c(&self) -> Duration {
        Duration::from_secs(181)
    }
    /// Next Timer A interval: doubles without bound (INVITE client, UDP).
    pub fn next_a(&self, current: Duration) -> Duration {
        current * 2
    }
    /// Next Timer G interval: doubles up to T2 (INVITE server final response, UDP).
    pub fn next_g(&self, current: Duration) -> Duration {
        (current * 2).min(self.t2)
    }
}

/// The timers the proxy core arms, named after RFC 3261. One call holds at most one
/// deadline per timer; the core keeps the earliest in a heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// INVITE client, UDP: retransmit the forwarded INVITE (T1, doubling) until a response.
    A,
    /// INVITE client: no response at all within 64·T1 → `408` to the caller.
    B,
    /// Proxy INVITE: provisional received but no final within ~3 min → CANCEL + `408`.
    C,
    /// INVITE server, UDP: retransmit our non-2xx final until the ACK (T1, doubling to T2).
    G,
    /// INVITE server: stop waiting for the ACK of a non-2xx final after 64·T1.
    H,
    /// Forget the call: absorbs retransmitted ACKs (T4 after Confirmed) and 2xx
    /// retransmissions (64·T1 after a 2xx, RFC 6026's Accepted state).
    Linger,
    /// precall: the agent's `fallback_wait_ms` ran out while holding.
    Fallback,
    /// precall: no provisional from this upstream within `upstream_timeout_ms` while
    /// another upstream is left to try.
    Failover,
}

/// State of the server side of an INVITE transaction (towards the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Answered `100`, no final yet (held or forwarded).
    Proceeding,
    /// A non-2xx final was sent; waiting for the ACK (Timers G, H).
    Completed,
    /// The ACK for the non-2xx final arrived; absorbing retransmissions (Linger).
    Confirmed,
    /// A 2xx was relayed; 2xx retransmissions are relayed too (RFC 6026).
    Accepted,
}

/// State of the client side (towards the agent), once forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// INVITE sent, nothing heard yet (Timers A, B).
    Calling,
    /// A provisional arrived (Timer C).
    Proceeding,
    /// A final arrived.
    Completed,
}

/// RFC 3261 §8.1.1.7 magic cookie.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// Prefix of every branch precall generates, after the magic cookie: lets a response be
/// recognised as answering one of our requests before any table look-up.
pub const BRANCH_PREFIX: &str = "z9hG4bKpc";

/// A branch for a stateful client transaction: the process seed, the call id and the
/// attempt (each failover attempt is a new client transaction).
pub fn stateful_branch(seed: u64, id: u64, attempt: usize) -> String {
    format!("{BRANCH_PREFIX}{seed:08x}s{id:x}-{attempt}")
}

/// A branch for an OPTIONS health probe of upstream number `n`, round `round`.
pub fn probe_branch(seed: u64, n: usize, round: u64) -> String {
    format!("{BRANCH_PREFIX}{seed:08x}h{n:x}-{round:x}")
}

/// A branch for a statelessly forwarded request: a hash of the incoming request's own
/// branch (and Call-ID/CSeq), so a retransmission gets the same branch (§16.11).
pub fn stateless_branch(seed: u64, parts: &[&[u8]]) -> String {
    // FNV-1a: stable across runs of one process and cheap; the seed keeps it unguessable
    // from outside across restarts.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{BRANCH_PREFIX}{h:016x}l")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_values_follow_rfc3261() {
        let t = Timers::new(Duration::from_millis(500));
        assert_eq!(t.timeout(), Duration::from_secs(32));
        assert_eq!(t.next_a(Duration::from_secs(1)), Duration::from_secs(2));
        assert_eq!(t.next_g(Duration::from_secs(2)), Duration::from_secs(4));
        assert_eq!(t.next_g(Duration::from_secs(4)), Duration::from_secs(4));
    }

    #[test]
    fn branches_are_ours_and_stateless_ones_repeat() {
        let a = stateful_branch(7, 1, 0);
        let b = stateful_branch(7, 1, 1);
        assert!(a.starts_with(MAGIC_COOKIE) && a.starts_with(BRANCH_PREFIX));
        assert_ne!(a, b);
        let x = stateless_branch(7, &[b"z9hG4bK1", b"call"]);
        assert_eq!(x, stateless_branch(7, &[b"z9hG4bK1", b"call"]));
        assert_ne!(x, stateless_branch(7, &[b"z9hG4bK2", b"call"]));
        assert_ne!(x, stateless_branch(8, &[b"z9hG4bK1", b"call"]));
    }
}
