//! Phone numbers → E.164 with the `phonenumber` crate, and the user part of
//! `sip:`/`sips:`/`tel:` URIs. The webhook and the SIP side normalise through the same
//! functions, so `+1 (415) 555-0123`, `14155550123` and `tel:+14155550123` all meet.
//!
//! SKELETON: signatures are the contract; bodies to be implemented.

use std::fmt;

use phonenumber::country::Id as Region;

/// A normalised number: E.164 (`+14155550123`) or, on the SIP side where parsing failed,
/// digits only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct E164(pub String);

impl E164 {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    #[error("{0:?} is not a phone number")]
    NotANumber(String),
}

/// Strict normalisation for the webhook's `phoneNumber` (and config numbers): accepts a bare
/// number in any common notation, or a `tel:`/`sip:`/`sips:` URI; parses, does not validate
/// assignment (fictional ranges pass).
///
/// # Errors
/// [`NumberError::NotANumber`] for letters, too few or too many digits.
pub fn normalise(_input: &str, _region: Region) -> Result<E164, NumberError> {
    todo!()
}

/// Lenient normalisation for the SIP side: E.164 where it parses, digits only where it
/// does not, `None` when there are no digits at all (`anonymous`).
pub fn normalise_lenient(_user: &str, _region: Region) -> Option<E164> {
    todo!()
}

/// The user part of a URI inside a header value or a Request-URI:
/// `"Alice" <sip:+1415@host;user=phone>;tag=x` → `+1415`, `<tel:+1-415;ext=1>` → `+1-415`,
/// `sip:host` → `None`. Percent-escapes are not decoded beyond what a number needs.
pub fn uri_user(_value: &str) -> Option<&str> {
    todo!()
}
