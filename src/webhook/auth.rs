//! API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, checked against every key
//! of every agent in constant time.
//!
//! Authentication needs only the headers, so it runs before the body is read and before
//! the agent named in the body is looked up: a caller without a valid key learns nothing
//! about which agents exist. Which agent the key is good for is answered afterwards, from
//! the [`Authenticated`] set.

use axum::http::{header, HeaderMap};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use crate::config::Config;

/// The header a key may also come in (for clients that cannot set `Authorization`).
pub const API_KEY_HEADER: &str = "x-api-key";

/// A request whose key matched at least one agent's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// `valid_for[i]`: the key is one of `config.agents[i].api_keys`.
    valid_for: Vec<bool>,
}

impl Authenticated {
    /// Whether the key belongs to the agent at `index` in `config.agents`.
    pub fn allows(&self, index: usize) -> bool {
        self.valid_for.get(index).copied().unwrap_or(false)
    }

    /// The agent the key belongs to (config validation makes every key one agent's).
    pub fn agent_index(&self) -> Option<usize> {
        self.valid_for.iter().position(|&valid| valid)
    }
}

/// Checks the request's key against every configured key.
///
/// # Errors
/// [`ApiError::MissingKey`] when no key was presented, [`ApiError::InvalidKey`] when it
/// matches no agent's key.
pub fn authenticate(config: &Config, headers: &HeaderMap) -> Result<Authenticated, ApiError> {
    let presented = presented_key(headers).ok_or(ApiError::MissingKey)?;
    let mut any = Choice::from(0);
    // Every key is compared, whatever matched before: the time taken depends on the
    // configuration and the presented key's length, never on how close a guess was.
    let valid_for = config
        .agents
        .iter()
        .map(|agent| {
            let mut matched = Choice::from(0);
            for key in &agent.api_keys {
                matched |= constant_time_eq(presented, key.as_bytes());
            }
            any |= matched;
            bool::from(matched)
        })
        .collect();
    if bool::from(any) {
        Ok(Authenticated { valid_for })
    } else {
        Err(ApiError::InvalidKey)
    }
}

/// The key the request presents: a Bearer token in `Authorization`, else `X-API-Key`.
/// Surrounding spaces are trimmed; an empty key counts as none.
pub fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| bearer_token(value.as_bytes()));
    let api_key = headers
        .get(API_KEY_HEADER)
        .map(|value| value.as_bytes().trim_ascii())
        .filter(|key| !key.is_empty());
    bearer.or(api_key)
}

/// The token of a `Bearer` credential (RFC 6750 §2.1: the scheme is case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, token) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.first().is_none_or(|b| *b != b' ') {
        return None;
    }
    Some(token.trim_ascii()).filter(|token| !token.is_empty())
}

/// Equality whose timing does not depend on where `presented` and `expected` differ, nor
/// on `expected`'s length: the loop runs over `presented` (which the client knows anyway)
/// and reads `expected` cyclically, without a length branch. (`subtle`'s slice `ct_eq`
/// returns early on a length mismatch, which would time the configured key's length.)
pub(super) fn constant_time_eq(presented: &[u8], expected: &[u8]) -> Choice {
    let Some(cycle) = std::num::NonZeroUsize::new(expected.len()) else {
        return Choice::from(0); // an empty configured key never matches
    };
    let mut equal = (presented.len() as u64).ct_eq(&(expected.len() as u64));
    for (i, byte) in presented.iter().enumerate() {
        let other = expected.get(i % cycle).copied().unwrap_or(0);
        equal &= byte.ct_eq(&other);
    }
    equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn bearer_or_x_api_key() {
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        let h = headers(&[("authorization", "bearer   abc  ")]);
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        let h = headers(&[("x-api-key", " abc ")]);
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        let h = headers(&[("authorization", "Bearer abc"), ("x-api-key", "other")]);
        assert_eq!(presented_key(&h), Some(&b"abc"[..]), "Authorization wins");
    }

    #[test]
    fn no_usable_key() {
        assert_eq!(presented_key(&HeaderMap::new()), None);
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearerabc")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic YWRtaW4=")])),
            None
        );
        assert_eq!(presented_key(&headers(&[("x-api-key", "  ")])), None);
        // Another scheme in Authorization still lets X-API-Key through.
        let h = headers(&[("authorization", "Basic YWRtaW4="), ("x-api-key", "abc")]);
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let eq = |a: &[u8], b: &[u8]| bool::from(constant_time_eq(a, b));
        assert!(eq(b"dev-key", b"dev-key"));
        assert!(!eq(b"dev-kez", b"dev-key"));
        assert!(!eq(b"dev-ke", b"dev-key"));
        assert!(
            !eq(b"dev-keydev-key", b"dev-key"),
            "a repeated key is not the key"
        );
        assert!(!eq(b"", b"dev-key"));
        assert!(!eq(b"", b""), "an empty configured key matches nothing");
    }
}
