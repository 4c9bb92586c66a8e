//! Per-key webhook rate limit (`http.rate_limit_per_sec`, `http.rate_limit_burst`), with
//! the `governor` crate (GCRA): over it, `429 Too Many Requests` with `Retry-After`.
//!
//! Keyed by the API key presented, checked only once that key has authenticated, so the
//! table holds at most one entry per configured key: a flood of made-up keys cannot grow
//! it (those are refused with `401` first).

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::error::ApiError;
use crate::config::Rate;
use crate::limits::retry_after_secs;

/// The limiter shared by the handlers; `None` inside when the limit is off.
pub struct KeyLimiter {
    limiter: Option<DefaultKeyedRateLimiter<Vec<u8>>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for KeyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("on", &self.limiter.is_some())
            .finish()
    }
}

impl KeyLimiter {
    pub fn new(rate: Option<Rate>) -> KeyLimiter {
        let limiter = rate.and_then(|rate| {
            let per_sec = NonZeroU32::new(rate.per_sec)?;
            let burst = NonZeroU32::new(rate.burst.max(1))?;
            Some(DefaultKeyedRateLimiter::hashmap(
                Quota::per_second(per_sec).allow_burst(burst),
            ))
        });
        KeyLimiter {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from `key`'s allowance.
    ///
    /// # Errors
    /// [`ApiError::RateLimited`] with the seconds until the next request would pass.
    pub fn check(&self, key: &[u8]) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        match limiter.check_key(&key.to_vec()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(ApiError::RateLimited {
                retry_after_secs: retry_after_secs(not_until.wait_time_from(self.clock.now())),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_key_then_429() {
        let l = KeyLimiter::new(Some(Rate {
            per_sec: 1,
            burst: 2,
        }));
        assert!(l.check(b"k1").is_ok());
        assert!(l.check(b"k1").is_ok());
        match l.check(b"k1") {
            Err(ApiError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("want 429, got {other:?}"),
        }
        assert!(l.check(b"k2").is_ok(), "another key has its own allowance");
    }

    #[test]
    fn off_means_off() {
        let l = KeyLimiter::new(None);
        for _ in 0..1000 {
            assert!(l.check(b"k").is_ok());
        }
    }
}
