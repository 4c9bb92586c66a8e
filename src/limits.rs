//! Pure helpers for what a hostile or broken peer may cost (README "Limits"): keyed token
//! buckets with the time passed in, network lists, known scanners, `Retry-After` values.
//! No IO, no clock: the SIP core and the tests hand in `now`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::Rate;

/// What [`KeyedBuckets::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A token was taken.
    Allowed,
    /// The key's bucket is empty; a token is back after `retry_after`.
    Limited { retry_after: Duration },
    /// The table of keys is full of active ones: allowed without being tracked. Failing
    /// open here is deliberate: refusing would let a spoofed-source flood lock out every
    /// new peer, and the held-call cap still bounds what the flood costs.
    Untracked,
}

/// One token bucket per key (a source IP): `rate.burst` tokens, refilled at
/// `rate.per_sec`. Memory is bounded by `max_keys`; a full table first forgets keys whose
/// bucket has refilled (they are indistinguishable from new keys).
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    per_sec: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(rate: Rate, max_keys: usize) -> KeyedBuckets<K> {
        KeyedBuckets {
            per_sec: f64::from(rate.per_sec.max(1)),
            burst: f64::from(rate.burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token from `key`'s bucket at `now`.
    pub fn check(&mut self, now: Instant, key: &K) -> Verdict {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.forget_full(now);
            if self.buckets.len() >= self.max_keys {
                return Verdict::Untracked;
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, now, per_sec, burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Verdict::Allowed
        } else {
            let wait = (1.0 - bucket.tokens) / per_sec;
            Verdict::Limited {
                retry_after: Duration::from_secs_f64(wait.clamp(0.0, 86_400.0)),
            }
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Drops every key whose bucket is full again at `now`.
    pub fn forget_full(&mut self, now: Instant) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets
            .retain(|_, b| refilled(b, now, per_sec, burst) < burst);
    }
}

fn refilled(bucket: &Bucket, now: Instant, per_sec: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * per_sec).min(burst)
}

/// Whether `ip` is in one of `nets`; an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what
/// a dual-stack socket reports) also matches the IPv4 networks.
pub fn is_in(nets: &[IpNet], ip: IpAddr) -> bool {
    let v4 = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    nets.iter()
        .any(|net| net.contains(&ip) || v4.is_some_and(|v4| net.contains(&v4)))
}

/// User-Agent fragments (lower case) of SIP scanners and password crackers seen on the
/// internet: SIPVicious (`friendly-scanner`, `sipvicious`), sipcli, SIPScan, VaxSIPUserAgent,
/// iWar, sundayddr, SiVuS, smap, PPLSIP.
const SCANNERS: [&str; 10] = [
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sipscan",
    "vaxsipuseragent",
    "iwar",
    "sundayddr",
    "sivus",
    "pplsip",
];

/// Whether a User-Agent value names a known scanner (`smap` too, as a whole word).
pub fn is_scanner(user_agent: &[u8]) -> bool {
    let ua = String::from_utf8_lossy(user_agent).to_ascii_lowercase();
    SCANNERS.iter().any(|s| ua.contains(s)) || ua.split_whitespace().any(|w| w == "smap")
}

/// `Retry-After` seconds for a wait: rounded up, at least 1 (RFC 3261 §20.33 has no
/// fractions, and 0 would invite an immediate retry).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_sec: u32, burst: u32) -> Rate {
        Rate { per_sec, burst }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = KeyedBuckets::new(rate(10, 3), 100);
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(b.check(t0, &ip), Verdict::Allowed);
        }
        let Verdict::Limited { retry_after } = b.check(t0, &ip) else {
            panic!("the fourth at once is over the burst");
        };
        assert_eq!(
            retry_after,
            Duration::from_millis(100),
            "one token per 100 ms"
        );
        // Another source has its own bucket.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(b.check(t0, &other), Verdict::Allowed);
        // 100 ms later exactly one more.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.check(t1, &ip), Verdict::Allowed);
        assert!(matches!(b.check(t1, &ip), Verdict::Limited { .. }));
        // After a long pause, the burst again, never more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.check(t2, &ip), Verdict::Allowed);
        }
        assert!(matches!(b.check(t2, &ip), Verdict::Limited { .. }));
    }

    #[test]
    fn time_going_backwards_does_not_mint_tokens() {
        let mut b = KeyedBuckets::new(rate(1, 1), 10);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert_eq!(b.check(t0, &1u8), Verdict::Allowed);
        assert!(matches!(
            b.check(t0 - Duration::from_secs(5), &1u8),
            Verdict::Limited { .. }
        ));
    }

    #[test]
    fn the_key_table_is_bounded() {
        let mut b = KeyedBuckets::new(rate(1, 2), 3);
        let t0 = Instant::now();
        for k in 0..3u32 {
            assert_eq!(b.check(t0, &k), Verdict::Allowed);
        }
        assert_eq!(b.len(), 3);
        // Full of active keys: a fourth is let through untracked.
        assert_eq!(b.check(t0, &99), Verdict::Untracked);
        assert_eq!(b.len(), 3);
        // Once the others have refilled they are forgotten, and the new key is tracked.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.check(later, &99), Verdict::Allowed);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn networks_match_mapped_addresses() {
        let nets: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        assert!(is_in(&nets, "10.1.2.3".parse().unwrap()));
        assert!(is_in(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(is_in(&nets, "2001:db8::7".parse().unwrap()));
        assert!(!is_in(&nets, "11.0.0.1".parse().unwrap()));
        assert!(!is_in(&nets, "::ffff:11.0.0.1".parse().unwrap()));
        assert!(!is_in(&[], "10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn scanners_are_recognised() {
        for ua in [
            "friendly-scanner",
            "Friendly-Scanner 1.0",
            "sipvicious",
            "sipcli/v1.8",
            "VaxSIPUserAgent/3.1",
            "smap 0.6.0",
            "SIPScan",
        ] {
            assert!(is_scanner(ua.as_bytes()), "{ua}");
        }
        for ua in [
            "Asterisk PBX 20.1",
            "SIPp",
            "Linphone/5",
            "smapper",
            "FreeSWITCH",
        ] {
            assert!(!is_scanner(ua.as_bytes()), "{ua}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
