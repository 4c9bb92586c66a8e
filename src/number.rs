//! Phone numbers → E.164 with the `phonenumber` crate, and the user part of
//! `sip:`/`sips:`/`tel:` URIs. The webhook and the SIP side normalise through the same
//! functions, so `+1 (415) 555-0123`, `14155550123` and `tel:+14155550123` all meet.
//!
//! # The rule
//! Normalising asks whether a number *parses*, never whether it is assigned: fictional
//! ranges (`+1 415 555 01xx`, `+1 555 …`, the seven-digit `+15550100`) pass like any other.
//!
//! [`normalise`] (strict: the webhook's `phoneNumber`, config numbers):
//! 1. A value holding `:` or `<` is a URI or a header value: its [`uri_user`] is the number
//!    (`tel:+14155550123`, `sip:+14155550123@host;user=phone`, `sips:…`); no user part:
//!    not a number.
//! 2. After trimming whitespace, the number may hold one leading `+` (or `%2B`), the digits,
//!    and the visual separators space, tab, no-break space, `-`, `.`, `(`, `)`, `/` and `%20`.
//!    Anything else (letters, `*`, `#`, `;ext=`, a `+` further in) is
//!    [`NumberError::NotANumber`], and so is fewer than 3 or more than 15 digits.
//! 3. With a leading `+`, the digits are parsed as an international number
//!    (`phonenumber::parse(None, …)`), which also drops a written trunk prefix
//!    (`+44 (0)20 7946 0958` → `+442079460958`). When phonenumber refuses them (an unknown
//!    country code, a malformed national part) the result is `+` and the digits as written.
//! 4. Without `+`: a number starting with the region's international call prefix
//!    (`011` for US, `00` for most others) is treated as if that prefix were `+` (step 3).
//!    Otherwise it is parsed as a national number of the region
//!    (`phonenumber::parse(Some(region), …)`: `415-555-0123`, `14155550123`, `5550100` in
//!    the US all gain `+1`); when phonenumber refuses it, the digits as written
//!    (an extension such as `1000`).
//! 5. A phonenumber result of more than 15 digits is not used; the fallback of step 3 or 4
//!    applies instead.
//!
//! [`normalise_lenient`] (the SIP side): what [`normalise`] gives where it succeeds; else
//! the digits of the user part, without any `+` (a `+` promises E.164, which this is not);
//! `None` when there are no digits at all (`anonymous`). Digits inside percent-escapes are
//! not counted. So a user part and a webhook number meet whenever the webhook's number is a
//! number at all.
//!
//! Why international numbers are parsed without a region: phonenumber 0.3 strips the
//! *given* region's national prefix even from a number with another country code
//! (`+44 1632 960000` with region US loses its `1`). Parsing `+…` without a region, and
//! doing the international-prefix step ourselves, avoids that.
//!
//! There is no fast path for input that already looks like E.164: phonenumber may still
//! change it (a written trunk prefix, `+4402079460958` → `+442079460958`), so a shortcut
//! would not be provably equivalent. Cost: phonenumber keeps its compiled regexes in one
//! mutex-guarded LRU of 100 entries; a warm call is tens of microseconds in a debug build,
//! but numbers from many different countries in a row make it recompile regexes.

use std::fmt;

use phonenumber::country::Id as Region;
use phonenumber::metadata::DATABASE;
use phonenumber::{Mode, PhoneNumber};

/// Fewer digits than this cannot be a phone number (not even a short code).
const MIN_DIGITS: usize = 3;
/// E.164 allows at most 15 digits, country code included.
const MAX_DIGITS: usize = 15;

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
/// assignment (fictional ranges pass). The exact rule is in the module docs.
///
/// # Errors
/// [`NumberError::NotANumber`] for letters, too few (< 3) or too many (> 15) digits.
pub fn normalise(input: &str, region: Region) -> Result<E164, NumberError> {
    number_part(input)
        .and_then(Dialled::scan)
        .map(|dialled| dialled.to_e164(region))
        .ok_or_else(|| NumberError::NotANumber(input.to_string()))
}

/// Lenient normalisation for the SIP side: E.164 where it parses, digits only where it
/// does not, `None` when there are no digits at all (`anonymous`).
pub fn normalise_lenient(user: &str, region: Region) -> Option<E164> {
    let part = number_part(user)?;
    if let Some(dialled) = Dialled::scan(part) {
        return Some(dialled.to_e164(region));
    }
    let digits = digits_outside_escapes(part);
    (!digits.is_empty()).then_some(E164(digits))
}

/// The user part of a URI inside a header value or a Request-URI:
/// `"Alice" <sip:+1415@host;user=phone>;tag=x` → `+1415`, `<tel:+1-415;ext=1>` → `+1-415`,
/// `sip:+1415;npdi@host` → `+1415`, `sip:host` → `None`. Percent-escapes are not decoded
/// here (the normalisers understand `%2B` and `%20`). Schemes other than `sip:`, `sips:`
/// and `tel:` give `None`.
pub fn uri_user(value: &str) -> Option<&str> {
    let uri = addr_uri(value);
    if let Some(rest) = strip_scheme(uri, "tel:") {
        // RFC 3966: the number runs to the first parameter.
        let end = rest
            .find(|c: char| c == ';' || c == '?' || c == '>' || c.is_whitespace())
            .unwrap_or(rest.len());
        return non_empty(rest.get(..end)?);
    }
    let rest = strip_scheme(uri, "sip:").or_else(|| strip_scheme(uri, "sips:"))?;
    // RFC 3261 §19.1.1: userinfo "@" hostport; a `?` starts the headers, so an `@`
    // after it belongs to a header value, not to the userinfo.
    let bound = rest
        .find(|c: char| c == '>' || c == '?' || c.is_whitespace())
        .unwrap_or(rest.len());
    let head = rest.get(..bound)?;
    let userinfo = head.get(..head.find('@')?)?;
    // Drop a password (`user:pw`) and user parameters (`+1415;npdi;rn=…`).
    let end = userinfo.find([':', ';']).unwrap_or(userinfo.len());
    non_empty(userinfo.get(..end)?)
}

/// The URI of a header value: inside the first `<…>` outside a quoted display name, else
/// the whole (trimmed) value.
fn addr_uri(value: &str) -> &str {
    let bytes = value.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' if in_quotes => i += 1, // quoted-pair: skip the escaped byte
            b'"' => in_quotes = !in_quotes,
            b'<' if !in_quotes => {
                let inner = value.get(i + 1..).unwrap_or("");
                let end = inner.find('>').unwrap_or(inner.len());
                return inner.get(..end).unwrap_or("").trim();
            }
            _ => {}
        }
        i += 1;
    }
    value.trim()
}

/// `uri` without `scheme` (compared ignoring ASCII case), when it starts with it.
fn strip_scheme<'a>(uri: &'a str, scheme: &str) -> Option<&'a str> {
    let head = uri.get(..scheme.len())?;
    if head.eq_ignore_ascii_case(scheme) {
        uri.get(scheme.len()..)
    } else {
        None
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The part of an input that should hold the number: a URI's user part when the input is
/// a URI or a header value, else the input itself.
fn number_part(input: &str) -> Option<&str> {
    if input.contains([':', '<']) {
        uri_user(input)
    } else {
        Some(input)
    }
}

/// The digits of `s` that are not part of a `%XX` escape.
fn digits_outside_escapes(s: &str) -> String {
    let mut out = String::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            bytes.next();
            bytes.next();
        } else if b.is_ascii_digit() {
            out.push(char::from(b));
        }
    }
    out
}

/// A number as dialled: whether it began with `+`, and its digits (at most 15, so they
/// live on the stack).
struct Dialled {
    is_international: bool,
    /// `+` followed by the digits; `buf[1..=len]` are the digits.
    buf: [u8; MAX_DIGITS + 1],
    len: usize,
}

impl Dialled {
    /// Step 2 of the rule: `None` unless `s` is an optional `+`, 3..=15 digits and
    /// visual separators.
    fn scan(s: &str) -> Option<Dialled> {
        let bytes = s.trim().as_bytes();
        let mut dialled = Dialled {
            is_international: false,
            buf: [b'+'; MAX_DIGITS + 1],
            len: 0,
        };
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'0'..=b'9' => {
                    dialled.len += 1;
                    *dialled.buf.get_mut(dialled.len)? = b;
                }
                b'+' if i == 0 => dialled.is_international = true,
                b' ' | b'\t' | b'-' | b'.' | b'(' | b')' | b'/' => {}
                // U+00A0 NO-BREAK SPACE, as pasted from documents.
                0xC2 if bytes.get(i + 1) == Some(&0xA0) => i += 1,
                b'%' => {
                    match bytes.get(i + 1..i + 3)? {
                        [b'2', b'B' | b'b'] if i == 0 => dialled.is_international = true,
                        [b'2', b'0'] => {}
                        _ => return None,
                    }
                    i += 2;
                }
                _ => return None,
            }
            i += 1;
        }
        (dialled.len >= MIN_DIGITS).then_some(dialled)
    }

    fn digits(&self) -> &str {
        // Only ASCII digits are ever stored, so this cannot fail.
        std::str::from_utf8(self.buf.get(1..=self.len).unwrap_or(&[])).unwrap_or("")
    }

    /// Steps 3 to 5 of the rule.
    fn to_e164(&self, region: Region) -> E164 {
        let digits = self.digits();
        if self.is_international {
            return international(digits);
        }
        // phonenumber unwraps the region's metadata when reading a national number:
        // without metadata there is no national reading, only the digits.
        let Some(meta) = DATABASE.by_id(region.as_ref()) else {
            return E164(digits.to_string());
        };
        let idd = meta.international_prefix();
        if let Some(found) = idd.and_then(|idd| idd.find(digits)) {
            if found.start() == 0 && digits.len() >= found.end() + MIN_DIGITS {
                if let Some(rest) = digits.get(found.end()..) {
                    return international(rest);
                }
            }
        }
        phonenumber::parse(Some(region), digits)
            .ok()
            .and_then(|n| e164_of(&n))
            .unwrap_or_else(|| E164(digits.to_string()))
    }
}

/// Digits after `+` (or after an international call prefix) → E.164; `+digits` where
/// phonenumber refuses them.
fn international(digits: &str) -> E164 {
    let mut buf = [b'+'; MAX_DIGITS + 1];
    let plus_digits = buf
        .get_mut(1..=digits.len())
        .map(|slot| slot.copy_from_slice(digits.as_bytes()))
        .and_then(|()| buf.get(..=digits.len()))
        .and_then(|bytes| std::str::from_utf8(bytes).ok());
    match plus_digits {
        Some(text) => phonenumber::parse(None, text)
            .ok()
            .and_then(|n| e164_of(&n))
            .unwrap_or_else(|| E164(text.to_string())),
        None => E164(format!("+{digits}")),
    }
}

/// phonenumber's E.164 text, when it is `+` and 3..=15 digits.
fn e164_of(number: &PhoneNumber) -> Option<E164> {
    let text = number.format().mode(Mode::E164).to_string();
    let digits = text.strip_prefix('+')?;
    let is_e164 = (MIN_DIGITS..=MAX_DIGITS).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit());
    is_e164.then_some(E164(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use phonenumber::country::Id;

    fn norm(s: &str) -> Result<String, NumberError> {
        normalise(s, Id::US).map(|n| n.0)
    }

    fn lenient(s: &str) -> Option<String> {
        normalise_lenient(s, Id::US).map(|n| n.0)
    }

    #[test]
    fn common_notations_meet() {
        for s in [
            "+1 (415) 555-0123",
            "14155550123",
            "415-555-0123",
            "(415) 555.0123",
            "+14155550123",
            " +1 415 555 0123 ",
            "+1\u{a0}415\u{a0}555\u{a0}0123",
            "%2B14155550123",
            "011 1 415 555 0123",
            "tel:+14155550123",
            "tel:+1-415-555-0123;phone-context=example.com",
            "sip:+14155550123@host;user=phone",
            "SIPS:+14155550123@host",
            "<sip:+1-415-555-0123@host>",
            "\"Alice\" <sip:+14155550123@host;user=phone>;tag=x",
        ] {
            assert_eq!(norm(s).as_deref(), Ok("+14155550123"), "{s:?}");
        }
    }

    #[test]
    fn other_countries() {
        assert_eq!(norm("+44 20 7946 0958").as_deref(), Ok("+442079460958"));
        assert_eq!(norm("+44 (0)20 7946 0958").as_deref(), Ok("+442079460958"));
        assert_eq!(
            normalise("020 7946 0958", Id::GB).map(|n| n.0).as_deref(),
            Ok("+442079460958")
        );
        assert_eq!(
            normalise("00 44 20 7946 0958", Id::GB)
                .map(|n| n.0)
                .as_deref(),
            Ok("+442079460958")
        );
    }

    /// phonenumber 0.3, given region US, strips the US national prefix `1` even from
    /// `+44 1…`; international numbers must keep every digit whatever the region.
    #[test]
    fn foreign_numbers_keep_their_digits_whatever_the_region() {
        assert_eq!(norm("+44 1632 960000").as_deref(), Ok("+441632960000"));
        assert_eq!(norm("011 44 1632 960000").as_deref(), Ok("+441632960000"));
        assert_eq!(norm("+49 151 1234567").as_deref(), Ok("+491511234567"));
    }

    #[test]
    fn fictional_and_short_ranges_parse() {
        assert_eq!(norm("+1 415 555 0100").as_deref(), Ok("+14155550100"));
        assert_eq!(norm("+1 555 123 4567").as_deref(), Ok("+15551234567"));
        assert_eq!(norm("+15550100").as_deref(), Ok("+15550100"));
        assert_eq!(norm("15550100").as_deref(), Ok("+15550100"));
        assert_eq!(norm("5550100").as_deref(), Ok("+15550100"));
        // An unknown country code still has the shape of a number.
        assert_eq!(norm("+999 123 456").as_deref(), Ok("+999123456"));
        // phonenumber cannot read `1000` as a US number: kept as dialled (an extension).
        assert_eq!(norm("1000").as_deref(), Ok("1000"));
    }

    #[test]
    fn not_a_number() {
        for s in [
            "",
            "   ",
            "abc",
            "1-800-FLOWERS",
            "415 555 0123 ext. 5",
            "+14155550123;ext=5",
            "12",
            "+12",
            "1234567890123456",
            "+1 415 555 0123 45678",
            "1+4155550123",
            "++14155550123",
            "*67 415 555 0123",
            "sip:alice@example.com",
            "sip:example.com",
            "mailto:+14155550123",
            "%41%42%43",
            "４１５５５５０１２３", // full-width digits: not ASCII digits
        ] {
            assert!(
                matches!(normalise(s, Id::US), Err(NumberError::NotANumber(ref e)) if e == s),
                "{s:?} → {:?}",
                normalise(s, Id::US)
            );
        }
    }

    #[test]
    fn fifteen_digits_is_the_limit() {
        assert_eq!(norm("+123456789012345").map(|n| n.len()), Ok(16));
        // A 15-digit national number would gain a country code past 15 digits: kept.
        assert_eq!(norm("234567890123456").as_deref(), Ok("234567890123456"));
    }

    #[test]
    fn lenient_agrees_with_strict_where_strict_succeeds() {
        for s in [
            "+1 (415) 555-0123",
            "4155550123",
            "+15550100",
            "1000",
            "+999123456",
        ] {
            assert_eq!(lenient(s), norm(s).ok(), "{s:?}");
        }
    }

    #[test]
    fn lenient_falls_back_to_digits() {
        assert_eq!(lenient("anonymous"), None);
        assert_eq!(lenient(""), None);
        assert_eq!(lenient("alice"), None);
        assert_eq!(lenient("12"), Some("12".into()));
        assert_eq!(lenient("*67"), Some("67".into()));
        assert_eq!(
            lenient("+1234567890123456"),
            Some("1234567890123456".into())
        );
        assert_eq!(lenient("user42"), Some("42".into()));
        // Digits of escapes do not count; `%41` is `A`.
        assert_eq!(lenient("%41%42"), None);
        // Given a whole URI, only its user part counts, never the host's digits.
        assert_eq!(lenient("sip:10.0.0.1"), None);
        assert_eq!(lenient("<sip:alice@10.0.0.1>"), None);
        assert_eq!(
            lenient("sip:+14155550123@10.0.0.1").as_deref(),
            Some("+14155550123")
        );
    }

    #[test]
    fn uri_user_cases() {
        let cases: &[(&str, Option<&str>)] = &[
            ("\"Alice\" <sip:+1415@host;user=phone>;tag=x", Some("+1415")),
            ("<sip:alice@host>", Some("alice")),
            ("sip:+1415@h", Some("+1415")),
            ("sip:+1415@h;tag=abc", Some("+1415")),
            ("tel:+1-415-555;phone-context=x", Some("+1-415-555")),
            ("<tel:+1-415;ext=1>", Some("+1-415")),
            ("sips:+1415@h", Some("+1415")),
            ("SIP:Bob@h", Some("Bob")),
            ("sip:host", None),
            ("sip:host;transport=udp", None),
            ("<sip:host?x=a@b>", None),
            ("sip:+1415;npdi;rn=+1999@h", Some("+1415")),
            ("sip:alice:secret@h", Some("alice")),
            ("\"Eve <sip:evil@x>\" <sip:bob@h>", Some("bob")),
            ("\"a \\\" <sip:x@y>\" <sip:carol@h>", Some("carol")),
            ("Bob <sip:+44@h>", Some("+44")),
            ("< sip:+44@h >", Some("+44")),
            ("sip:@h", None),
            ("tel:", None),
            ("", None),
            ("<", None),
            ("\"unterminated <sip:x@h>", None),
            ("http://x@y", None),
            ("anonymous", None),
            ("é<sip:é@h>", Some("é")),
            ("sipé", None),
        ];
        for (value, want) in cases {
            assert_eq!(uri_user(value), *want, "{value:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Number-shaped input in any region: never a panic, and success means E.164 or
        /// digits, 3..=15 of them.
        #[test]
        fn number_shaped_input_never_panics(
            s in "[+]?[0-9 ()./-]{0,20}",
            region in proptest::sample::select(vec![Id::US, Id::GB, Id::DE, Id::IT, Id::BR, Id::RU, Id::NZ, Id::JP]),
        ) {
            if let Ok(n) = normalise(&s, region) {
                let digits = n.0.strip_prefix('+').unwrap_or(&n.0);
                proptest::prop_assert!((3..=15).contains(&digits.len()), "{s:?} → {n}");
                proptest::prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{s:?} → {n}");
            }
            let _ = normalise_lenient(&s, region);
        }

        #[test]
        fn any_input_never_panics(s in proptest::prelude::any::<String>()) {
            let _ = normalise(&s, Id::US);
            let _ = normalise_lenient(&s, Id::US);
            let _ = uri_user(&s);
        }
    }

    #[test]
    fn never_panics_on_odd_bytes() {
        let odd = [
            "%", "%2", "+%2B1", "\u{0}", "é", "<<<>>>", "\"", "\\", "tel:é", "sip:é@", "%2Bé",
        ];
        for s in odd {
            let _ = normalise(s, Id::US);
            let _ = normalise_lenient(s, Id::US);
            let _ = uri_user(s);
        }
    }
}
