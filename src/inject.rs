//! Context → `X-Precall-*` header lines (RFC 3261 §25.1 grammar): field names made SIP
//! tokens, values cleaned of CR/LF/control characters, the total bounded by `max_bytes`.
//! Pure: no IO.
//!
//! # Rules (DESIGN.md "Injection")
//! - Names: `{prefix}{field}`. Each character of the field name that is not a token
//!   character (RFC 3261: ASCII letters and digits and `` -.!%*_+`'~ ``) becomes `-`
//!   (one `-` per character, so `é` → `-`); an empty field name is skipped. A name equal,
//!   ignoring ASCII case, to one precall adds itself ([`RESERVED`]: `Status`, `Wait-Ms`,
//!   `Truncated`, `Route`, `Context`, `Delivery`) becomes `{prefix}Ctx-{field}`, so a posted
//!   field can never pose as precall's own header. One header per name: a field whose
//!   header name repeats an earlier one (ignoring ASCII case, e.g. `a b` after `a-b`) is
//!   dropped, because SIP does not allow repeating a header that is not a list.
//! - Values: strings as they are; numbers and booleans as JSON text; objects and arrays as
//!   compact JSON; `null` omits the field (so a posted `null` clears a default). Every
//!   control character (C0 including CR, LF and TAB, DEL, C1 including U+0085) and U+2028 /
//!   U+2029 becomes a space, then surrounding whitespace is trimmed: a value can never end
//!   a header line or start a new one (no `Via:` injection).
//! - Size: `max_bytes` bounds the bytes of the context lines, each counted as
//!   `name: value\r\n`. A field that does not fit is dropped whole (never cut, a cut value
//!   could mislead); later, smaller fields may still fit. When any field was dropped for
//!   size, `{prefix}Truncated: true` is added.
//! - Always added after the context, not counted against `max_bytes`: `{prefix}Status`
//!   and `{prefix}Wait-Ms`.
//!
//! # Delivery modes ([`pairs_for_mode`], DESIGN.md / issue 3 "Delivery modes")
//! - `headers`, `both`: the field headers above (`both` also POSTs the context, which is
//!   the caller's job: [`delivery_body`] builds the body).
//! - `json`: one `{prefix}Context` header holding base64url without padding (RFC 4648
//!   §5) of the compact JSON object, fields in context order, `null` fields left out like
//!   in `headers`. The line counts against `max_bytes` like a field; when it does not fit
//!   it is left out whole and `{prefix}Truncated: true` is added (an agent must never
//!   receive half an object).
//! - `http`: no context headers at all; the context travels in the POST.
//!
//! Then, in every mode: `{prefix}Status`, `{prefix}Wait-Ms`, the extra headers the
//! caller passes (`Route`, `Delivery`), values cleaned like context values, and
//! `{prefix}Truncated: true` last when something was dropped for size.

use std::fmt;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::config::{InjectConfig, InjectMode};

/// Header names (after the prefix) that precall itself sets or will set; context fields
/// with these names are renamed `Ctx-{field}`.
pub const RESERVED: [&str; 6] = [
    "Status",
    "Wait-Ms",
    "Truncated",
    "Route",
    "Context",
    "Delivery",
];

/// How the context of a call was settled; sent as `X-Precall-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Context was cached when the INVITE arrived.
    Hit,
    /// The call was held and the webhook landed in time.
    Waited,
    /// No context in time (or no caller number): the agent's defaults.
    Fallback,
    /// The pull look-up (`lookup_url`) answered with context while the call was held.
    LookedUp,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Waited => "waited",
            Status::Fallback => "fallback",
            Status::LookedUp => "looked-up",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `b` is an RFC 3261 §25.1 token character.
pub fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Whether `s` is a non-empty RFC 3261 token (what a header name must be).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// The context a call gets: the agent's defaults overlaid by the posted context
/// (posted fields win; fields only in the defaults are kept). Order: the posted fields in
/// posting order, then the defaults the post did not set, in config order.
pub fn effective_context(
    defaults: &Map<String, Value>,
    context: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let Some(context) = context else {
        return defaults.clone();
    };
    let mut out = context.clone();
    for (key, value) in defaults {
        if !out.contains_key(key) {
            out.insert(key.clone(), value.clone());
        }
    }
    out
}

/// A matched route's `set` fields laid over the context: a `set` field replaces the
/// context field of the same name (in place), others are appended in `set` order.
pub fn apply_set(context: &mut Map<String, Value>, set: &Map<String, Value>) {
    for (field, value) in set {
        context.insert(field.clone(), value.clone());
    }
}

/// The header (name, value) pairs a call gets in `headers` mode, whatever `cfg.mode`
/// says, in order: context fields (within `max_bytes`), then `{prefix}Status`,
/// `{prefix}Wait-Ms`, and `{prefix}Truncated: true` when fields were dropped. The rules
/// are in the module docs.
pub fn header_pairs(
    cfg: &InjectConfig,
    status: Status,
    wait_ms: u64,
    context: &Map<String, Value>,
) -> Vec<(String, String)> {
    pairs(cfg, InjectMode::Headers, status, wait_ms, context, &[])
}

/// The header (name, value) pairs a call gets for `cfg.mode` (module docs, "Delivery
/// modes"): the context headers of the mode, then `{prefix}Status`, `{prefix}Wait-Ms`,
/// then each `extra` pair as `{prefix}{name}: value` (e.g. `("Route", label)`,
/// `("Delivery", "failed".into())`; a name is made a token, a value is cleaned like a
/// context value), then `{prefix}Truncated: true` when something was dropped for size.
pub fn pairs_for_mode(
    cfg: &InjectConfig,
    status: Status,
    wait_ms: u64,
    context: &Map<String, Value>,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    pairs(cfg, cfg.mode, status, wait_ms, context, extra)
}

/// [`pairs_for_mode`] rendered as CRLF-terminated header lines ready to splice into a
/// message.
pub fn render_for_mode(
    cfg: &InjectConfig,
    status: Status,
    wait_ms: u64,
    context: &Map<String, Value>,
    extra: &[(&str, String)],
) -> Vec<u8> {
    render(pairs_for_mode(cfg, status, wait_ms, context, extra))
}

/// What an `http`/`both` delivery POSTs to `inject.url`, before the INVITE is forwarded.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub call_id: &'a str,
    pub agent_id: &'a str,
    /// The caller's number as normalised, `""` when unknown.
    pub caller: &'a str,
    /// The called number as normalised, `""` when unknown.
    pub called: &'a str,
    pub status: Status,
    pub wait_ms: u64,
    /// The matched rule's label (`X-Precall-Route`), `None` when no rule matched.
    pub route: Option<&'a str>,
    /// The effective context, route `set` fields applied.
    pub context: &'a Map<String, Value>,
}

/// The JSON body of an HTTP delivery: `{callId, agentId, caller, called, status, waitMs,
/// route, context}`, `route` `null` when no rule matched. The context goes as it is
/// (JSON carries any value safely; `null` fields included), unbounded by `max_bytes`,
/// which is about SIP headers.
pub fn delivery_body(delivery: &Delivery<'_>) -> Value {
    json!({
        "callId": delivery.call_id,
        "agentId": delivery.agent_id,
        "caller": delivery.caller,
        "called": delivery.called,
        "status": delivery.status.as_str(),
        "waitMs": delivery.wait_ms,
        "route": delivery.route,
        "context": delivery.context,
    })
}

/// The `json` mode header value: base64url, no padding, of the compact JSON object
/// without its `null` fields.
pub fn json_header_value(context: &Map<String, Value>) -> String {
    let without_nulls: Map<String, Value> = context
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let compact = Value::Object(without_nulls).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(compact)
}

fn pairs(
    cfg: &InjectConfig,
    mode: InjectMode,
    status: Status,
    wait_ms: u64,
    context: &Map<String, Value>,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let prefix = cfg.prefix.as_str();
    let mut pairs = Vec::with_capacity(context.len() + 4 + extra.len());
    let is_truncated = match mode {
        InjectMode::Headers | InjectMode::Both => field_pairs(cfg, context, &mut pairs),
        InjectMode::Json => {
            let name = format!("{prefix}Context");
            let value = json_header_value(context);
            // `name: value\r\n`
            let line_bytes = name.len().saturating_add(value.len()).saturating_add(4);
            if line_bytes <= cfg.max_bytes {
                pairs.push((name, value));
                false
            } else {
                true
            }
        }
        InjectMode::Http => false,
    };
    pairs.push((format!("{prefix}Status"), status.as_str().to_string()));
    pairs.push((format!("{prefix}Wait-Ms"), wait_ms.to_string()));
    for (name, value) in extra {
        let name: String = name
            .chars()
            .map(|c| match u8::try_from(c) {
                Ok(b) if is_token_char(b) => c,
                _ => '-',
            })
            .collect();
        pairs.push((format!("{prefix}{name}"), sanitise(value.clone())));
    }
    if is_truncated {
        pairs.push((format!("{prefix}Truncated"), "true".to_string()));
    }
    pairs
}

/// Pushes the per-field context headers within `max_bytes`; whether a field was dropped
/// for size.
fn field_pairs(
    cfg: &InjectConfig,
    context: &Map<String, Value>,
    pairs: &mut Vec<(String, String)>,
) -> bool {
    let prefix = cfg.prefix.as_str();
    let first = pairs.len();
    let mut used_bytes = 0usize;
    let mut is_truncated = false;
    for (field, value) in context {
        let Some(name) = header_name(prefix, field) else {
            continue;
        };
        let Some(value) = header_value(value) else {
            continue;
        };
        if pairs[first..]
            .iter()
            .any(|(seen, _): &(String, String)| seen.eq_ignore_ascii_case(&name))
        {
            continue;
        }
        // `name: value\r\n`
        let line_bytes = name.len() + value.len() + 4;
        match used_bytes.checked_add(line_bytes) {
            Some(total) if total <= cfg.max_bytes => {
                used_bytes = total;
                pairs.push((name, value));
            }
            _ => is_truncated = true,
        }
    }
    is_truncated
}

/// [`header_pairs`] rendered as CRLF-terminated header lines ready to splice into a message.
pub fn render_headers(
    cfg: &InjectConfig,
    status: Status,
    wait_ms: u64,
    context: &Map<String, Value>,
) -> Vec<u8> {
    render(header_pairs(cfg, status, wait_ms, context))
}

fn render(pairs: Vec<(String, String)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `{prefix}{field}` with the field made a token, or `{prefix}Ctx-{field}` for a reserved
/// name; `None` for an empty field name.
fn header_name(prefix: &str, field: &str) -> Option<String> {
    if field.is_empty() {
        return None;
    }
    let is_reserved = RESERVED.iter().any(|r| r.eq_ignore_ascii_case(field));
    let mut name = String::with_capacity(prefix.len() + field.len() + 4);
    name.push_str(prefix);
    if is_reserved {
        name.push_str("Ctx-");
    }
    name.extend(field.chars().map(|c| match u8::try_from(c) {
        Ok(b) if is_token_char(b) => c,
        _ => '-',
    }));
    Some(name)
}

/// The header value for a context value; `None` for `null`.
fn header_value(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        // Display of Number, Array and Object is compact JSON.
        other => other.to_string(),
    };
    Some(sanitise(text))
}

/// Whether `c` must not reach the wire inside a header value.
fn is_line_breaking(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Control characters → spaces, then surrounding whitespace trimmed. Reuses `text` when
/// there is nothing to do, which is the common case.
fn sanitise(text: String) -> String {
    let cleaned = if text.contains(is_line_breaking) {
        text.chars()
            .map(|c| if is_line_breaking(c) { ' ' } else { c })
            .collect()
    } else {
        text
    };
    let trimmed = cleaned.trim();
    if trimmed.len() == cleaned.len() {
        cleaned
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InjectMode;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn cfg(max_bytes: usize) -> InjectConfig {
        InjectConfig {
            mode: InjectMode::Headers,
            prefix: "X-Precall-".into(),
            max_bytes,
            ..InjectConfig::default()
        }
    }

    fn pairs(ctx: Value) -> Vec<(String, String)> {
        header_pairs(&cfg(1024), Status::Hit, 7, &obj(ctx))
    }

    fn p(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    #[test]
    fn effective_context_posted_wins_and_orders_first() {
        let defaults = obj(json!({"customer_name": "there", "lang": "en", "tier": "basic"}));
        let posted = obj(json!({"tier": "gold", "customer_name": "Ada", "order": 42}));
        let eff = effective_context(&defaults, Some(&posted));
        let keys: Vec<&str> = eff.keys().map(String::as_str).collect();
        assert_eq!(keys, ["tier", "customer_name", "order", "lang"]);
        assert_eq!(eff["customer_name"], "Ada");
        assert_eq!(eff["tier"], "gold");
        assert_eq!(eff["lang"], "en");
        assert_eq!(effective_context(&defaults, None), defaults);
    }

    #[test]
    fn status_and_wait_always_come_last() {
        let got = header_pairs(&cfg(1024), Status::Fallback, 2000, &Map::new());
        assert_eq!(
            got,
            [
                p("X-Precall-Status", "fallback"),
                p("X-Precall-Wait-Ms", "2000")
            ]
        );
        assert_eq!(
            render_headers(&cfg(1024), Status::Waited, 5, &obj(json!({"a": "b"}))),
            b"X-Precall-a: b\r\nX-Precall-Status: waited\r\nX-Precall-Wait-Ms: 5\r\n"
        );
    }

    #[test]
    fn value_types() {
        let got = pairs(json!({
            "s": "text", "i": 42, "f": 1.5, "neg": -3, "t": true, "f2": false,
            "o": {"a": 1, "b": [1, "x"]}, "arr": [1, 2], "n": null, "empty": ""
        }));
        assert_eq!(
            got,
            [
                p("X-Precall-s", "text"),
                p("X-Precall-i", "42"),
                p("X-Precall-f", "1.5"),
                p("X-Precall-neg", "-3"),
                p("X-Precall-t", "true"),
                p("X-Precall-f2", "false"),
                p("X-Precall-o", r#"{"a":1,"b":[1,"x"]}"#),
                p("X-Precall-arr", "[1,2]"),
                p("X-Precall-empty", ""),
                p("X-Precall-Status", "hit"),
                p("X-Precall-Wait-Ms", "7"),
            ]
        );
    }

    #[test]
    fn crlf_injection_is_neutralised() {
        let got = pairs(json!({"a": "x\r\nVia: evil", "b": "\r\n", "c": " lead\ttab "}));
        assert_eq!(got[0], p("X-Precall-a", "x  Via: evil"));
        assert_eq!(got[1], p("X-Precall-b", ""));
        assert_eq!(got[2], p("X-Precall-c", "lead tab"));
        let wire = render_headers(
            &cfg(1024),
            Status::Hit,
            0,
            &obj(json!({"a": "x\r\nVia: evil"})),
        );
        let wire = String::from_utf8(wire).unwrap();
        assert_eq!(wire.matches("\r\n").count(), 3);
        assert!(!wire.contains("\r\nVia"));
    }

    #[test]
    fn every_control_and_separator_becomes_space() {
        let got = pairs(
            json!({"v": "a\u{0}b\u{7}c\u{1b}d\u{7f}e\u{85}f\u{9b}g\u{2028}h\u{2029}i\rj\nk"}),
        );
        assert_eq!(got[0].1, "a b c d e f g h i j k");
        // Nested JSON: serde escapes C0 but not DEL or U+2028; they must still go.
        let got = pairs(json!({"o": {"k": "x\u{7f}\u{2028}y\n"}}));
        assert_eq!(got[0].1, "{\"k\":\"x  y\\n\"}");
    }

    #[test]
    fn unicode_values_pass_unicode_names_become_tokens() {
        let got =
            pairs(json!({"name": "Zoë 日本", "prénom": "Ada", "a b:c": 1, "ok-._!%*+`'~": 2}));
        assert_eq!(got[0], p("X-Precall-name", "Zoë 日本"));
        assert_eq!(got[1], p("X-Precall-pr-nom", "Ada"));
        assert_eq!(got[2], p("X-Precall-a-b-c", "1"));
        assert_eq!(got[3], p("X-Precall-ok-._!%*+`'~", "2"));
    }

    #[test]
    fn empty_names_are_skipped_and_repeated_names_dropped() {
        let got = pairs(json!({"": "x", "a-b": 1, "a b": 2, "A-B": 3, "c": 4}));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "X-Precall-a-b",
                "X-Precall-c",
                "X-Precall-Status",
                "X-Precall-Wait-Ms"
            ]
        );
        assert_eq!(got[0].1, "1");
    }

    #[test]
    fn reserved_names_are_renamed() {
        let got = pairs(json!({"status": "evil", "WAIT-MS": 0, "Truncated": false,
            "route": "x", "Context": "y", "delivery": "z", "Statuses": "fine"}));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "X-Precall-Ctx-status",
                "X-Precall-Ctx-WAIT-MS",
                "X-Precall-Ctx-Truncated",
                "X-Precall-Ctx-route",
                "X-Precall-Ctx-Context",
                "X-Precall-Ctx-delivery",
                "X-Precall-Statuses",
                "X-Precall-Status",
                "X-Precall-Wait-Ms",
            ]
        );
        assert_eq!(got[7].1, "hit");
        assert!(!got.iter().any(|(n, _)| n == "X-Precall-Truncated"));
    }

    #[test]
    fn truncation_drops_whole_fields_and_keeps_smaller_later_ones() {
        // "X-Precall-a: 12345\r\n" = 20 bytes.
        let ctx = obj(json!({"a": "12345", "big": "x".repeat(100), "b": "12345", "c": "123456"}));
        let got = header_pairs(&cfg(40), Status::Hit, 1, &ctx);
        assert_eq!(
            got,
            [
                p("X-Precall-a", "12345"),
                p("X-Precall-b", "12345"),
                p("X-Precall-Status", "hit"),
                p("X-Precall-Wait-Ms", "1"),
                p("X-Precall-Truncated", "true"),
            ]
        );
        // Exactly fitting is not truncated.
        let got = header_pairs(
            &cfg(40),
            Status::Hit,
            1,
            &obj(json!({"a": "12345", "b": "12345"})),
        );
        assert!(!got.iter().any(|(n, _)| n.ends_with("Truncated")));
        // max_bytes 0: only the fixed headers and the flag.
        let got = header_pairs(&cfg(0), Status::Hit, 1, &obj(json!({"a": "1"})));
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], p("X-Precall-Truncated", "true"));
    }

    #[test]
    fn size_counts_the_cleaned_value() {
        // "X-Precall-a: b\r\n" = 16 bytes once the padding is trimmed.
        let got = header_pairs(&cfg(16), Status::Hit, 1, &obj(json!({"a": "   b   "})));
        assert_eq!(got[0], p("X-Precall-a", "b"));
    }

    #[test]
    fn custom_prefix() {
        let cfg = InjectConfig {
            prefix: "X-Ctx-".into(),
            ..cfg(1024)
        };
        let got = header_pairs(&cfg, Status::Waited, 3, &obj(json!({"status": 1})));
        assert_eq!(got[0].0, "X-Ctx-Ctx-status");
        assert_eq!(got[1], p("X-Ctx-Status", "waited"));
    }

    fn mode_cfg(mode: InjectMode, max_bytes: usize) -> InjectConfig {
        InjectConfig {
            mode,
            ..cfg(max_bytes)
        }
    }

    fn decode(value: &str) -> Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn headers_mode_matches_header_pairs_plus_extras() {
        let ctx = obj(json!({"a": "1", "route": "posted"}));
        let plain = header_pairs(&cfg(1024), Status::Waited, 9, &ctx);
        assert_eq!(
            pairs_for_mode(&cfg(1024), Status::Waited, 9, &ctx, &[]),
            plain
        );
        let extra = [
            ("Route", "fraud".to_string()),
            ("Delivery", "failed".to_string()),
        ];
        let got = pairs_for_mode(&cfg(1024), Status::Waited, 9, &ctx, &extra);
        assert_eq!(
            got,
            [
                p("X-Precall-a", "1"),
                p("X-Precall-Ctx-route", "posted"),
                p("X-Precall-Status", "waited"),
                p("X-Precall-Wait-Ms", "9"),
                p("X-Precall-Route", "fraud"),
                p("X-Precall-Delivery", "failed"),
            ]
        );
        // `both` puts the same headers on the INVITE.
        assert_eq!(
            pairs_for_mode(
                &mode_cfg(InjectMode::Both, 1024),
                Status::Waited,
                9,
                &ctx,
                &extra
            ),
            got
        );
    }

    #[test]
    fn extras_are_cleaned_and_come_before_truncated() {
        let ctx = obj(json!({"big": "x".repeat(50)}));
        let extra = [
            ("Route", " a\r\nVia: x ".to_string()),
            ("bad name", "v".to_string()),
        ];
        let got = pairs_for_mode(&cfg(10), Status::Hit, 0, &ctx, &extra);
        assert_eq!(
            got,
            [
                p("X-Precall-Status", "hit"),
                p("X-Precall-Wait-Ms", "0"),
                p("X-Precall-Route", "a  Via: x"),
                p("X-Precall-bad-name", "v"),
                p("X-Precall-Truncated", "true"),
            ]
        );
    }

    #[test]
    fn json_mode_is_one_header_that_decodes_to_the_context() {
        let ctx = obj(json!({
            "customer_name": "Zoë", "risk_score": 92, "tags": ["vip", 1],
            "nested": {"a": {"b": null}}, "line": "x\r\nVia: evil", "cleared": null
        }));
        let json_cfg = mode_cfg(InjectMode::Json, 1024);
        let got = pairs_for_mode(&json_cfg, Status::Hit, 3, &ctx, &[("Route", "1".into())]);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "X-Precall-Context",
                "X-Precall-Status",
                "X-Precall-Wait-Ms",
                "X-Precall-Route"
            ]
        );
        let value = &got[0].1;
        assert!(value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let mut want = ctx.clone();
        want.remove("cleared");
        assert_eq!(decode(value), Value::Object(want));
        // Compact JSON, in context order.
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .unwrap();
        assert!(raw.starts_with(br#"{"customer_name":"Z"#));
        // An empty context is still an (empty) object.
        let got = pairs_for_mode(&json_cfg, Status::Fallback, 0, &Map::new(), &[]);
        assert_eq!(got[0], p("X-Precall-Context", "e30"));
        assert_eq!(decode("e30"), json!({}));
    }

    #[test]
    fn json_header_too_big_is_dropped_whole() {
        let ctx = obj(json!({"a": "12345"}));
        let value = json_header_value(&ctx);
        // "X-Precall-Context: " + value + CRLF
        let exact = "X-Precall-Context".len() + value.len() + 4;
        let fits = pairs_for_mode(
            &mode_cfg(InjectMode::Json, exact),
            Status::Hit,
            0,
            &ctx,
            &[],
        );
        assert_eq!(fits[0].0, "X-Precall-Context");
        assert!(!fits.iter().any(|(n, _)| n == "X-Precall-Truncated"));
        let got = pairs_for_mode(
            &mode_cfg(InjectMode::Json, exact - 1),
            Status::Hit,
            0,
            &ctx,
            &[],
        );
        assert_eq!(
            got,
            [
                p("X-Precall-Status", "hit"),
                p("X-Precall-Wait-Ms", "0"),
                p("X-Precall-Truncated", "true"),
            ]
        );
    }

    #[test]
    fn http_mode_carries_status_headers_only() {
        let ctx = obj(json!({"a": "1", "b": 2}));
        let http_cfg = InjectConfig {
            url: Some("http://127.0.0.1:9/ctx".into()),
            ..mode_cfg(InjectMode::Http, 1024)
        };
        let got = pairs_for_mode(
            &http_cfg,
            Status::LookedUp,
            120,
            &ctx,
            &[("Delivery", "failed".into())],
        );
        assert_eq!(
            got,
            [
                p("X-Precall-Status", "looked-up"),
                p("X-Precall-Wait-Ms", "120"),
                p("X-Precall-Delivery", "failed"),
            ]
        );
        assert_eq!(
            render_for_mode(&http_cfg, Status::Hit, 0, &ctx, &[]),
            b"X-Precall-Status: hit\r\nX-Precall-Wait-Ms: 0\r\n"
        );
    }

    #[test]
    fn delivery_body_shape() {
        let ctx = obj(json!({"customer_name": "Ada", "n": null}));
        let body = delivery_body(&Delivery {
            call_id: "abc@host",
            agent_id: "support-agent",
            caller: "+14155550123",
            called: "+15550100",
            status: Status::Waited,
            wait_ms: 140,
            route: Some("fraud"),
            context: &ctx,
        });
        assert_eq!(
            body.to_string(),
            r#"{"callId":"abc@host","agentId":"support-agent","caller":"+14155550123","called":"+15550100","status":"waited","waitMs":140,"route":"fraud","context":{"customer_name":"Ada","n":null}}"#
        );
        let body = delivery_body(&Delivery {
            call_id: "c",
            agent_id: "a",
            caller: "",
            called: "",
            status: Status::Fallback,
            wait_ms: 0,
            route: None,
            context: &Map::new(),
        });
        assert_eq!(body["route"], Value::Null);
        assert_eq!(body["context"], json!({}));
    }

    #[test]
    fn set_fields_override_in_place_and_append() {
        let mut ctx = obj(json!({"flow": "normal", "a": 1}));
        apply_set(&mut ctx, &obj(json!({"b": true, "flow": "verification"})));
        assert_eq!(
            Value::Object(ctx).to_string(),
            r#"{"flow":"verification","a":1,"b":true}"#
        );
    }

    #[test]
    fn token_check() {
        assert!(is_token("X-Precall-"));
        assert!(!is_token(""));
        assert!(!is_token("X Precall"));
        assert!(!is_token("X:"));
        assert!(!is_token("é"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever is posted, every rendered line is `token: value` with no CR, LF or
        /// other control character inside.
        #[test]
        fn rendered_lines_are_always_clean(
            fields in proptest::collection::vec((any::<String>(), any::<String>()), 0..8),
            max_bytes in 0usize..2048,
        ) {
            let ctx: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let wire = render_headers(&cfg(max_bytes), Status::Hit, 0, &ctx);
            let wire = String::from_utf8(wire).unwrap();
            let lines: Vec<&str> = wire.split_terminator("\r\n").collect();
            let context_bytes: usize = lines
                .iter()
                .filter(|l| !l.starts_with("X-Precall-Status:") && !l.starts_with("X-Precall-Wait-Ms:")
                    && !l.starts_with("X-Precall-Truncated:"))
                .map(|l| l.len() + 2)
                .sum();
            prop_assert!(context_bytes <= max_bytes);
            for line in lines {
                let (name, value) = line.split_once(": ").unwrap();
                prop_assert!(is_token(name), "{name:?}");
                prop_assert!(!value.contains(is_line_breaking), "{value:?}");
            }
        }

        /// `json` mode: the header decodes back to the context (nulls aside), or is left
        /// out with Truncated when it does not fit; the line never exceeds max_bytes.
        #[test]
        fn json_header_round_trips(
            fields in proptest::collection::vec((any::<String>(), any::<String>()), 0..8),
            max_bytes in 0usize..2048,
        ) {
            let ctx: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let got = pairs_for_mode(&mode_cfg(InjectMode::Json, max_bytes), Status::Hit, 0, &ctx, &[]);
            match got.first() {
                Some((name, value)) if name == "X-Precall-Context" => {
                    prop_assert!(name.len() + value.len() + 4 <= max_bytes);
                    prop_assert_eq!(decode(value), Value::Object(ctx));
                    prop_assert!(!got.iter().any(|(n, _)| n == "X-Precall-Truncated"));
                }
                _ => prop_assert_eq!(&got.last().unwrap().0, "X-Precall-Truncated"),
            }
        }
    }
}
