//! Optional webhook signatures (`agents.webhook_secret`), Stripe-style:
//!
//! ```text
//! X-Precall-Signature: t=1733328000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd
//! ```
//!
//! `t` is the sender's Unix time in seconds; `v1` is the lower-case hex HMAC-SHA256, keyed
//! with the agent's secret, of the bytes `"{t}.{raw body}"`. Several `v1` values may be
//! given (one per secret while rotating); one matching is enough. A `t` more than
//! [`TOLERANCE`] away from precall's clock is refused, so a captured request cannot be
//! replayed later. The comparison is constant-time (`hmac`'s `verify_slice`).
//!
//! The signature covers POST bodies (`/v1/precall`, `/v1/precall/test`): what carries
//! context. `GET`/`DELETE` rely on the API key alone.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::error::ApiError;

/// The request header.
pub const HEADER: &str = "x-precall-signature";

/// How far `t` may be from now, either way, in seconds.
pub const TOLERANCE_SECS: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// The header value for `body` sent at `t` (Unix seconds): `t=T,v1=HEX`.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    let hex: String = mac(secret, t, body)
        .map(|m| {
            m.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default();
    format!("t={t},v1={hex}")
}

/// The MAC over `"{t}.{body}"`. HMAC takes a key of any length (RFC 2104), so `None`
/// cannot happen; it is handled rather than unwrapped all the same.
fn mac(secret: &[u8], t: u64, body: &[u8]) -> Option<HmacSha256> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).ok()?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// Checks the header against `body` at `now` (Unix seconds).
///
/// # Errors
/// [`ApiError::BadSignature`] naming what is wrong: missing, malformed, timestamp out of
/// range, or no `v1` matching.
pub fn verify(secret: &[u8], header: Option<&[u8]>, body: &[u8], now: u64) -> Result<(), ApiError> {
    let header = header.ok_or(ApiError::BadSignature("missing X-Precall-Signature"))?;
    let header = std::str::from_utf8(header)
        .map_err(|_| ApiError::BadSignature("malformed X-Precall-Signature"))?;
    let mut t: Option<u64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((name, value)) = part.trim().split_once('=') else {
            return Err(ApiError::BadSignature("malformed X-Precall-Signature"));
        };
        match name.trim() {
            "t" => {
                t = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| ApiError::BadSignature("malformed X-Precall-Signature"))?,
                )
            }
            "v1" => signatures.push(
                from_hex(value.trim())
                    .ok_or(ApiError::BadSignature("malformed X-Precall-Signature"))?,
            ),
            _ => {} // other schemes: ignored, like Stripe's v0
        }
    }
    let t = t.ok_or(ApiError::BadSignature("malformed X-Precall-Signature"))?;
    if signatures.is_empty() {
        return Err(ApiError::BadSignature("malformed X-Precall-Signature"));
    }
    if t.abs_diff(now) > TOLERANCE_SECS {
        return Err(ApiError::BadSignature(
            "X-Precall-Signature timestamp is more than 300 s from now",
        ));
    }
    let expected =
        mac(secret, t, body).ok_or(ApiError::BadSignature("X-Precall-Signature does not match"))?;
    let matched = signatures
        .iter()
        .any(|sig| expected.clone().verify_slice(sig).is_ok());
    if matched {
        Ok(())
    } else {
        Err(ApiError::BadSignature("X-Precall-Signature does not match"))
    }
}

/// Lower- or upper-case hex → bytes; `None` for anything else (odd length included).
fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 256 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(*pair.first()?)? << 4 | digit(*pair.get(1)?)?))
        .collect()
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_0123456789abcdef";
    const BODY: &[u8] = br#"{"agentId":"a","phoneNumber":"+14155550123"}"#;

    fn message(e: ApiError) -> String {
        e.to_string()
    }

    #[test]
    fn known_answer() {
        // Computed independently: printf '%s' '1700000000.{"a":1}' |
        //   openssl dgst -sha256 -hmac 'whsec_0123456789abcdef'
        assert_eq!(
            sign(SECRET, 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=9f5e37cdc7ea587c7c02062d93283cad000d66a831b2a1676418696db47ed6c2"
        );
    }

    #[test]
    fn a_fresh_signature_verifies() {
        let now = 1_700_000_000;
        let header = sign(SECRET, now, BODY);
        assert!(verify(SECRET, Some(header.as_bytes()), BODY, now).is_ok());
        assert!(verify(SECRET, Some(header.as_bytes()), BODY, now + 300).is_ok());
        assert!(verify(SECRET, Some(header.as_bytes()), BODY, now - 300).is_ok());
        // Upper-case hex and a second (rotated-out) signature are fine.
        let upper = header
            .to_ascii_uppercase()
            .replace("T=", "t=")
            .replace("V1=", "v1=");
        assert!(verify(SECRET, Some(upper.as_bytes()), BODY, now).is_ok());
        let two = format!(
            "t={now},v1={},{}",
            "00".repeat(32),
            header.split(',').nth(1).unwrap()
        );
        assert!(verify(SECRET, Some(two.as_bytes()), BODY, now).is_ok());
    }

    #[test]
    fn every_failure_is_refused_and_named() {
        let now = 1_700_000_000;
        let header = sign(SECRET, now, BODY);
        let fail = |h: Option<&[u8]>, body: &[u8], at: u64| {
            message(verify(SECRET, h, body, at).unwrap_err())
        };
        assert_eq!(fail(None, BODY, now), "missing X-Precall-Signature");
        assert_eq!(
            fail(Some(b"garbage"), BODY, now),
            "malformed X-Precall-Signature"
        );
        assert_eq!(
            fail(Some(b"t=abc,v1=00"), BODY, now),
            "malformed X-Precall-Signature"
        );
        assert_eq!(
            fail(Some(b"t=1,v1=0g"), BODY, now),
            "malformed X-Precall-Signature"
        );
        assert_eq!(
            fail(Some(format!("t={now}").as_bytes()), BODY, now),
            "malformed X-Precall-Signature"
        );
        assert!(fail(Some(header.as_bytes()), BODY, now + 301).contains("more than 300 s"));
        assert!(fail(Some(header.as_bytes()), BODY, now - 301).contains("more than 300 s"));
        // One byte of the body changed, or another secret: no match.
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 1;
        assert_eq!(
            fail(Some(header.as_bytes()), &tampered, now),
            "X-Precall-Signature does not match"
        );
        let other = sign(b"another-secret-0123", now, BODY);
        assert_eq!(
            fail(Some(other.as_bytes()), BODY, now),
            "X-Precall-Signature does not match"
        );
        // The timestamp is signed too: moving it breaks the signature.
        let moved = header.replace(&format!("t={now}"), &format!("t={}", now + 1));
        assert_eq!(
            fail(Some(moved.as_bytes()), BODY, now),
            "X-Precall-Signature does not match"
        );
    }
}
