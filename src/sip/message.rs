//! SIP messages as an index of byte ranges over the received `Bytes`.
//!
//! Why our own: a proxy must forward every byte it does not have to change exactly as
//! received (RFC 3261 §16.6); `rsip` re-serialises lossily and mis-frames (see DESIGN.md
//! "Why the wire parser is our own"). So a [`Message`] keeps the raw bytes and the ranges of
//! the start line, each header and the body; typed views are computed on demand for the few
//! headers precall reads, and edits are byte splices ([`Editor`]).

use std::ops::Range;

use bytes::Bytes;

/// Header names precall reads or edits; compact forms (RFC 3261 §7.3.3) map to the same
/// variant. Everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    MaxForwards,
    ContentLength,
    ContentType,
    Route,
    RecordRoute,
    PAssertedIdentity,
    Other,
}

/// One header field line (or folded lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    /// The name as written (e.g. `v` or `Via`).
    pub name_range: Range<usize>,
    /// The value, leading/trailing whitespace trimmed; may contain folded line breaks.
    pub value: Range<usize>,
    /// The whole field: from the first byte of the name to just after its final CRLF
    /// (including continuation lines).
    pub line: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Register,
    Update,
    Info,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    /// Any other token (`NEWMETHOD`).
    Other(Bytes),
}

/// The methods precall names, with their wire spelling. Methods are case-sensitive
/// (RFC 3261 §7.1), so `invite` is an extension method, not INVITE.
const KNOWN_METHODS: [(&[u8], Method); 14] = [
    (b"INVITE", Method::Invite),
    (b"ACK", Method::Ack),
    (b"BYE", Method::Bye),
    (b"CANCEL", Method::Cancel),
    (b"OPTIONS", Method::Options),
    (b"REGISTER", Method::Register),
    (b"UPDATE", Method::Update),
    (b"INFO", Method::Info),
    (b"PRACK", Method::Prack),
    (b"SUBSCRIBE", Method::Subscribe),
    (b"NOTIFY", Method::Notify),
    (b"REFER", Method::Refer),
    (b"MESSAGE", Method::Message),
    (b"PUBLISH", Method::Publish),
];

impl Method {
    /// The method for a token, compared case-sensitively; anything unknown (including a
    /// differently cased known name) is `Other`, which copies the token.
    pub fn from_bytes(token: &[u8]) -> Method {
        known_method(token).unwrap_or_else(|| Method::Other(Bytes::copy_from_slice(token)))
    }

    /// Like [`Method::from_bytes`] but an unknown method shares `raw` instead of copying.
    pub(crate) fn from_raw(raw: &Bytes, range: Range<usize>) -> Method {
        let token = raw.get(range.clone()).unwrap_or_default();
        match known_method(token) {
            Some(m) => m,
            None if range.end <= raw.len() && range.start <= range.end => {
                Method::Other(raw.slice(range))
            }
            None => Method::Other(Bytes::copy_from_slice(token)),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Method::Other(token) => token,
            known => KNOWN_METHODS
                .iter()
                .find(|(_, m)| m == known)
                .map(|(name, _)| *name)
                .unwrap_or_default(),
        }
    }
}

fn known_method(token: &[u8]) -> Option<Method> {
    KNOWN_METHODS
        .iter()
        .find(|(name, _)| *name == token)
        .map(|(_, m)| m.clone())
}

impl HeaderName {
    /// Maps a header name as written (long or compact form, any case) to its variant.
    pub fn from_bytes(name: &[u8]) -> HeaderName {
        let long = long_form(name);
        KNOWN_HEADERS
            .iter()
            .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(long))
            .map(|(_, h)| *h)
            .unwrap_or(HeaderName::Other)
    }

    /// The canonical long name (`Call-ID`), `None` for `Other`.
    pub fn as_str(&self) -> Option<&'static str> {
        KNOWN_HEADERS
            .iter()
            .find(|(_, h)| h == self)
            .map(|(n, _)| *n)
    }
}

const KNOWN_HEADERS: [(&str, HeaderName); 12] = [
    ("Via", HeaderName::Via),
    ("From", HeaderName::From),
    ("To", HeaderName::To),
    ("Call-ID", HeaderName::CallId),
    ("CSeq", HeaderName::CSeq),
    ("Contact", HeaderName::Contact),
    ("Max-Forwards", HeaderName::MaxForwards),
    ("Content-Length", HeaderName::ContentLength),
    ("Content-Type", HeaderName::ContentType),
    ("Route", HeaderName::Route),
    ("Record-Route", HeaderName::RecordRoute),
    ("P-Asserted-Identity", HeaderName::PAssertedIdentity),
];

/// Compact header forms (RFC 3261 §7.3.3 and the IANA SIP header registry), so that a
/// by-name lookup of `Subject` also finds `s:`.
const COMPACT_FORMS: [(u8, &str); 20] = [
    (b'a', "Accept-Contact"),
    (b'b', "Referred-By"),
    (b'c', "Content-Type"),
    (b'd', "Request-Disposition"),
    (b'e', "Content-Encoding"),
    (b'f', "From"),
    (b'i', "Call-ID"),
    (b'j', "Reject-Contact"),
    (b'k', "Supported"),
    (b'l', "Content-Length"),
    (b'm', "Contact"),
    (b'n', "Identity-Info"),
    (b'o', "Event"),
    (b'r', "Refer-To"),
    (b's', "Subject"),
    (b't', "To"),
    (b'u', "Allow-Events"),
    (b'v', "Via"),
    (b'x', "Session-Expires"),
    (b'y', "Identity"),
];

/// The long form of a header name: a one-letter compact form is expanded, anything else is
/// returned as is.
pub(crate) fn long_form(name: &[u8]) -> &[u8] {
    match name {
        [c] => COMPACT_FORMS
            .iter()
            .find(|(letter, _)| *letter == c.to_ascii_lowercase())
            .map(|(_, long)| long.as_bytes())
            .unwrap_or(name),
        _ => name,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: Method,
        /// The Request-URI bytes.
        uri: Range<usize>,
    },
    Response {
        code: u16,
        reason: Range<usize>,
    },
}

/// A parsed SIP message. Cloning is cheap (`Bytes` is reference counted).
#[derive(Debug, Clone)]
pub struct Message {
    pub raw: Bytes,
    pub start: StartLine,
    /// Start line including its CRLF.
    pub start_line: Range<usize>,
    pub headers: Vec<Header>,
    /// Offset of the empty line (CRLF) that ends the header section.
    pub headers_end: usize,
    /// The body as framed by Content-Length (or to the end of a datagram without one).
    pub body: Range<usize>,
}

/// A view of one Via value (`SIP/2.0/UDP host:port;branch=..;rport`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via<'a> {
    /// `UDP`, `TCP`, `TLS`, ... as written.
    pub transport: &'a str,
    /// The sent-by host as written, except that an IPv6 reference loses its brackets
    /// (`[2001:db8::1]` → `2001:db8::1`) so that it parses as an `IpAddr`.
    pub host: &'a str,
    pub port: Option<u16>,
    /// The `branch` parameter (the first one, should there be several).
    pub branch: Option<&'a str>,
    /// The `received` parameter as written (an IPv6 address may come with or without
    /// brackets, RFC 5118 §4.5).
    pub received: Option<&'a str>,
    /// `None`: no rport; `Some(None)`: `;rport` without value; `Some(Some(p))`: `;rport=p`.
    pub rport: Option<Option<u16>>,
    /// Byte range of this Via value within `Message::raw` (without the separating comma).
    pub range: Range<usize>,
    /// Index into `Message::headers` of the header line holding this value.
    pub header_index: usize,
}

/// `CSeq: 314159 INVITE`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl Message {
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }
    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }
    pub fn request_uri(&self) -> Option<&[u8]> {
        match &self.start {
            StartLine::Request { uri, .. } => self.raw.get(uri.clone()),
            StartLine::Response { .. } => None,
        }
    }
    /// Bytes of a range of this message (empty when out of bounds).
    pub fn slice(&self, range: &Range<usize>) -> &[u8] {
        self.raw.get(range.clone()).unwrap_or_default()
    }
    /// Value of the first header with this name.
    pub fn header(&self, name: HeaderName) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| self.slice(&h.value))
    }
    /// Value as `&str` (None when absent or not UTF-8).
    pub fn header_str(&self, name: HeaderName) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }
    /// All headers with this name, in order.
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &Header> + '_ {
        self.headers.iter().filter(move |h| h.name == name)
    }
    /// First header whose name (compared case-insensitively, long form) is `name`; for
    /// `Other` headers such as `X-Precall-Status`.
    pub fn header_by_name(&self, name: &str) -> Option<&[u8]> {
        let wanted = long_form(name.as_bytes());
        self.headers
            .iter()
            .find(|h| long_form(self.slice(&h.name_range)).eq_ignore_ascii_case(wanted))
            .map(|h| self.slice(&h.value))
    }
    pub fn body(&self) -> &[u8] {
        self.slice(&self.body)
    }
    pub fn call_id(&self) -> Option<&[u8]> {
        self.header(HeaderName::CallId)
    }
    /// CSeq of the first CSeq header, `None` when absent or malformed.
    pub fn cseq(&self) -> Option<CSeq> {
        let header = self.headers.iter().find(|h| h.name == HeaderName::CSeq)?;
        let (seq, method) = parse_cseq(&self.raw, header.value.clone())?;
        Some(CSeq {
            seq,
            method: Method::from_raw(&self.raw, method),
        })
    }
    /// The first Via value (of the first Via header; Via values may be comma-joined).
    pub fn top_via(&self) -> Option<Via<'_>> {
        let (index, header) = self
            .headers
            .iter()
            .enumerate()
            .find(|(_, h)| h.name == HeaderName::Via)?;
        let first = parse_via_list(&self.raw, header.value.clone())?
            .into_iter()
            .next()?;
        self.via_view(first, index)
    }
    /// All Via values in order, across headers and commas. A Via header that does not
    /// parse (impossible for a message from [`crate::sip::parse`]) contributes nothing.
    pub fn vias(&self) -> Vec<Via<'_>> {
        let mut out = Vec::new();
        for (index, header) in self.headers.iter().enumerate() {
            if header.name != HeaderName::Via {
                continue;
            }
            for spans in parse_via_list(&self.raw, header.value.clone()).unwrap_or_default() {
                if let Some(via) = self.via_view(spans, index) {
                    out.push(via);
                }
            }
        }
        out
    }
    /// Max-Forwards as a number, `None` when absent or unparsable.
    pub fn max_forwards(&self) -> Option<u32> {
        parse_decimal_u32(self.header(HeaderName::MaxForwards)?)
    }
    /// Route values in order (each `<uri;params>` element, across headers and commas), as
    /// (byte range of the element, header index).
    pub fn routes(&self) -> Vec<(Range<usize>, usize)> {
        self.header_elements(HeaderName::Route)
    }
    /// Elements of a comma-separated header (Route, Record-Route, Contact, ...) in order,
    /// across headers: commas inside `<>` or a quoted string do not split, each element is
    /// trimmed of whitespace, empty elements are skipped. Returns (byte range of the
    /// element, header index).
    pub fn header_elements(&self, name: HeaderName) -> Vec<(Range<usize>, usize)> {
        let mut out = Vec::new();
        for (index, header) in self.headers.iter().enumerate() {
            if header.name != name {
                continue;
            }
            for element in split_list(&self.raw, header.value.clone()) {
                out.push((element, index));
            }
        }
        out
    }

    fn via_view(&self, spans: ViaSpans, header_index: usize) -> Option<Via<'_>> {
        let text = |r: &Range<usize>| std::str::from_utf8(self.raw.get(r.clone())?).ok();
        let opt_text = |r: &Option<Range<usize>>| match r {
            Some(r) => text(r).map(Some),
            None => Some(None),
        };
        Some(Via {
            transport: text(&spans.transport)?,
            host: text(&spans.host)?,
            port: spans.port,
            branch: opt_text(&spans.branch)?,
            received: opt_text(&spans.received)?,
            rport: spans.rport,
            range: spans.range,
            header_index,
        })
    }
    /// An editor that splices changes into a copy of this message.
    pub fn edit(&self) -> Editor<'_> {
        Editor {
            msg: self,
            ops: Vec::new(),
        }
    }
}

/// Byte-splicing editor: collects non-overlapping replacements of ranges of the original
/// message and emits the new message; every byte not covered by an edit is copied as is.
pub struct Editor<'a> {
    msg: &'a Message,
    /// (range in the original, replacement bytes); an insert is an empty range.
    ops: Vec<(Range<usize>, Vec<u8>)>,
}

impl<'a> Editor<'a> {
    pub fn insert(&mut self, at: usize, bytes: &[u8]) -> &mut Self {
        self.ops.push((at..at, bytes.to_vec()));
        self
    }
    pub fn replace(&mut self, range: Range<usize>, bytes: &[u8]) -> &mut Self {
        self.ops.push((range, bytes.to_vec()));
        self
    }
    pub fn remove(&mut self, range: Range<usize>) -> &mut Self {
        self.ops.push((range, Vec::new()));
        self
    }
    /// The edited message. Operations are applied in offset order (inserts at one offset in
    /// the order they were added); overlapping ranges are a caller bug and the later one
    /// is skipped.
    pub fn finish(mut self) -> Vec<u8> {
        let raw = &self.msg.raw;
        self.ops.sort_by_key(|(r, _)| (r.start, r.end));
        let extra: usize = self.ops.iter().map(|(_, b)| b.len()).sum();
        let mut out = Vec::with_capacity(raw.len() + extra);
        let mut pos = 0;
        for (range, bytes) in &self.ops {
            if range.start < pos || range.end > raw.len() || range.start > range.end {
                continue;
            }
            out.extend_from_slice(&raw[pos..range.start]);
            out.extend_from_slice(bytes);
            pos = range.end;
        }
        out.extend_from_slice(&raw[pos..]);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Grammar helpers shared by the views above and by the parser's validation, so that what
// `parse` accepts is exactly what the views can read.
// ---------------------------------------------------------------------------------------

/// RFC 3261 §25.1 `token` characters.
pub(crate) fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Linear white space inside a header value: SP, HTAB, and the CRLF of a folded line
/// (the parser only lets CRLF into a value when a SP/HTAB follows it).
pub(crate) fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// `range` narrowed to exclude leading and trailing LWS.
pub(crate) fn trim_range(raw: &[u8], range: Range<usize>) -> Range<usize> {
    let bytes = raw.get(range.clone()).unwrap_or_default();
    let lead = bytes.iter().take_while(|b| is_lws(**b)).count();
    let rest = bytes.get(lead..).unwrap_or_default();
    let trail = rest.iter().rev().take_while(|b| is_lws(**b)).count();
    let start = range.start + lead;
    let end = (range.start + bytes.len() - trail).max(start);
    start..end
}

/// Unsigned decimal that fits in a `u32` (leading zeros allowed: `0068` is 68).
pub(crate) fn parse_decimal_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, d| {
        acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
    })
}

/// Unsigned decimal that fits in a `usize`.
pub(crate) fn parse_decimal_usize(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0usize, |acc, d| {
        acc.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// `CSeq = 1*DIGIT LWS Method` with the sequence number below 2**31 (RFC 3261 §8.1.1.5).
/// Returns the number and the range of the method token.
pub(crate) fn parse_cseq(raw: &[u8], value: Range<usize>) -> Option<(u32, Range<usize>)> {
    let mut c = Cursor::new(raw, value);
    let digits = c.take_while(|b| b.is_ascii_digit());
    let seq = parse_decimal_u32(c.bytes(&digits))?;
    if seq >= 1 << 31 {
        return None;
    }
    if c.skip_lws() == 0 {
        return None;
    }
    let method = c.take_while(is_token_char);
    if method.is_empty() {
        return None;
    }
    c.skip_lws();
    c.at_end().then_some((seq, method))
}

/// Byte ranges of one Via value; see [`Via`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ViaSpans {
    pub transport: Range<usize>,
    pub host: Range<usize>,
    pub port: Option<u16>,
    pub branch: Option<Range<usize>>,
    pub received: Option<Range<usize>>,
    pub rport: Option<Option<u16>>,
    pub range: Range<usize>,
}

/// Parses a Via header value: `1#(sent-protocol LWS sent-by *(SEMI via-params))` with LWS
/// allowed around `/`, `:`, `;`, `=` and `,` (RFC 3261 §20.42, §25.1; RFC 4475 wsinv).
/// `None` when any value is malformed (empty values, `;;`, a bad port, ...).
pub(crate) fn parse_via_list(raw: &[u8], value: Range<usize>) -> Option<Vec<ViaSpans>> {
    let mut c = Cursor::new(raw, value);
    let mut out = Vec::new();
    loop {
        c.skip_lws();
        out.push(parse_via_parm(&mut c)?);
        c.skip_lws();
        if c.at_end() {
            return Some(out);
        }
        if !c.eat(b',') {
            return None;
        }
    }
}

fn parse_via_parm(c: &mut Cursor<'_>) -> Option<ViaSpans> {
    let start = c.pos;
    // sent-protocol: protocol-name SLASH protocol-version SLASH transport
    if c.take_while(is_token_char).is_empty() {
        return None;
    }
    let mut transport = 0..0;
    for _ in 0..2 {
        c.skip_lws();
        if !c.eat(b'/') {
            return None;
        }
        c.skip_lws();
        transport = c.take_while(is_token_char);
        if transport.is_empty() {
            return None;
        }
    }
    if c.skip_lws() == 0 {
        return None;
    }
    // sent-by: host [ COLON port ]; an IPv6 reference keeps its brackets on the wire but
    // the view's host is the bare address.
    let host = if c.eat(b'[') {
        let inner = c.take_while(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if inner.is_empty() || !c.eat(b']') {
            return None;
        }
        inner
    } else {
        let name = c.take_while(is_token_char);
        if name.is_empty() {
            return None;
        }
        name
    };
    let mut end = c.pos;
    let mut port = None;
    let save = c.pos;
    c.skip_lws();
    if c.eat(b':') {
        c.skip_lws();
        let digits = c.take_while(|b| b.is_ascii_digit());
        port = Some(parse_port(c.bytes(&digits))?);
        end = c.pos;
    } else {
        c.pos = save;
    }
    let mut branch = None;
    let mut received = None;
    let mut rport = None;
    loop {
        let save = c.pos;
        c.skip_lws();
        if !c.eat(b';') {
            c.pos = save;
            break;
        }
        let (name, value) = parse_generic_param(c)?;
        end = c.pos;
        let name_bytes = c.bytes(&name);
        if name_bytes.eq_ignore_ascii_case(b"branch") {
            let value = token_value(c, value)?;
            branch.get_or_insert(value);
        } else if name_bytes.eq_ignore_ascii_case(b"received") {
            let value = token_value(c, value)?;
            received.get_or_insert(value);
        } else if name_bytes.eq_ignore_ascii_case(b"rport") {
            let value = match value {
                None => None,
                Some(v) => Some(parse_port(c.bytes(&v))?),
            };
            rport.get_or_insert(value);
        }
    }
    Some(ViaSpans {
        transport,
        host,
        port,
        branch,
        received,
        rport,
        range: start..end,
    })
}

/// A Via parameter value that must be a plain token (or address), not a quoted string.
fn token_value(c: &Cursor<'_>, value: Option<Range<usize>>) -> Option<Range<usize>> {
    let value = value?;
    (c.bytes(&value).first() != Some(&b'"')).then_some(value)
}

fn parse_port(digits: &[u8]) -> Option<u16> {
    if digits.len() > 5 {
        return None;
    }
    u16::try_from(parse_decimal_u32(digits)?).ok()
}

/// After a `;`: `token [ EQUAL gen-value ]` where gen-value is a token, a host (IPv4 or a
/// bracketed IPv6 reference, or a bare IPv6 address as in `received=2001:db8::1`), or a
/// quoted string. Leaves the cursor just after the parameter.
fn parse_generic_param(c: &mut Cursor<'_>) -> Option<(Range<usize>, Option<Range<usize>>)> {
    c.skip_lws();
    let name = c.take_while(is_token_char);
    if name.is_empty() {
        return None;
    }
    let save = c.pos;
    c.skip_lws();
    if !c.eat(b'=') {
        c.pos = save;
        return Some((name, None));
    }
    c.skip_lws();
    let value = if c.peek() == Some(b'"') {
        c.quoted_string()?
    } else {
        c.take_while(|b| is_token_char(b) || matches!(b, b':' | b'[' | b']'))
    };
    if value.is_empty() {
        return None;
    }
    Some((name, Some(value)))
}

/// Splits a comma-separated header value into trimmed, non-empty element ranges; commas
/// inside `<...>` or a quoted string (with `\`-escapes) do not split.
pub(crate) fn split_list(raw: &[u8], value: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let bytes = raw.get(value.clone()).unwrap_or_default();
    let mut element_start = 0;
    let mut in_quotes = false;
    let mut in_angle = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quotes = false;
            }
            continue;
        }
        match b {
            b'"' => in_quotes = true,
            b'<' => in_angle = true,
            b'>' => in_angle = false,
            b',' if !in_angle => {
                push_trimmed(raw, value.start + element_start..value.start + i, &mut out);
                element_start = i + 1;
            }
            _ => {}
        }
    }
    push_trimmed(raw, value.start + element_start..value.end, &mut out);
    out
}

fn push_trimmed(raw: &[u8], range: Range<usize>, out: &mut Vec<Range<usize>>) {
    let trimmed = trim_range(raw, range);
    if !trimmed.is_empty() {
        out.push(trimmed);
    }
}

/// Checks one From/To/Contact/Route element: `name-addr` (`[display-name] <URI>`) or
/// `addr-spec`, then `*(SEMI generic-param)` (RFC 3261 §20.10, §25.1). A display name is a
/// quoted string or tokens (no LWS needed before `<`, RFC 4475 lwsdisp; unquoted UTF-8 is
/// tolerated because carriers send it and it cannot be mistaken for a delimiter, but a
/// comma is not: RFC 4475 baddn); no LWS inside the brackets (badaspec); an addr-spec
/// without brackets may not contain `,` or `?` (regbadct). The URI itself is only checked
/// for a scheme and for not containing whitespace, quotes or brackets.
pub(crate) fn is_valid_address(raw: &[u8], element: Range<usize>) -> bool {
    let mut c = Cursor::new(raw, trim_range(raw, element));
    if c.at_end() {
        return false;
    }
    if has_name_addr(&c) {
        // display-name
        if c.peek() == Some(b'"') {
            if c.quoted_string().is_none() {
                return false;
            }
            c.skip_lws();
        } else {
            c.take_while(|b| is_token_char(b) || is_lws(b) || b >= 0x80);
        }
        if !c.eat(b'<') {
            return false;
        }
        let uri = c.take_while(|b| b != b'>');
        if !c.eat(b'>') || !is_valid_uri(c.bytes(&uri), true) {
            return false;
        }
    } else {
        let uri = c.take_while(|b| b != b';' && !is_lws(b));
        if !is_valid_uri(c.bytes(&uri), false) {
            return false;
        }
    }
    loop {
        c.skip_lws();
        if c.at_end() {
            return true;
        }
        if !c.eat(b';') || parse_generic_param(&mut c).is_none() {
            return false;
        }
    }
}

/// Whether an element is in name-addr form: it starts with a quote, or a `<` comes before
/// any `;` (outside quotes).
fn has_name_addr(c: &Cursor<'_>) -> bool {
    let bytes = c.bytes(&(c.pos..c.end));
    if bytes.first() == Some(&b'"') {
        return true;
    }
    bytes
        .iter()
        .position(|b| *b == b'<' || *b == b';')
        .is_some_and(|i| bytes.get(i) == Some(&b'<'))
}

/// Splits an absolute URI into a well-formed scheme (RFC 3986: ALPHA *( ALPHA / DIGIT / "+"
/// / "-" / "." )) and a non-empty rest whose bytes are all visible and not `"`, `<`, `>`.
/// The one URI shape check shared by header values and the Request-URI.
pub(crate) fn split_absolute_uri(uri: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = uri.iter().position(|b| *b == b':')?;
    let scheme = uri.get(..colon)?;
    let rest = uri.get(colon + 1..)?;
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    let rest_ok = !rest.is_empty()
        && rest
            .iter()
            .all(|&b| b > b' ' && b != 0x7f && !matches!(b, b'"' | b'<' | b'>'));
    (scheme_ok && rest_ok).then_some((scheme, rest))
}

/// A URI as far as a proxy needs to trust it: `scheme ":" 1*char`, no whitespace, CTLs,
/// quotes or angle brackets; outside `<>` also no `,` or `?` (RFC 3261 §20.10).
fn is_valid_uri(uri: &[u8], bracketed: bool) -> bool {
    split_absolute_uri(uri)
        .is_some_and(|(_, rest)| bracketed || !rest.iter().any(|b| matches!(b, b',' | b'?')))
}

/// A forward-only scanner over `raw[pos..end]`; every access is bounds-checked.
pub(crate) struct Cursor<'a> {
    raw: &'a [u8],
    pub pos: usize,
    end: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(raw: &'a [u8], range: Range<usize>) -> Cursor<'a> {
        let end = range.end.min(raw.len());
        Cursor {
            raw,
            pos: range.start.min(end),
            end,
        }
    }
    pub fn at_end(&self) -> bool {
        self.pos >= self.end
    }
    pub fn peek(&self) -> Option<u8> {
        if self.at_end() {
            None
        } else {
            self.raw.get(self.pos).copied()
        }
    }
    pub fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    pub fn take_while(&mut self, mut f: impl FnMut(u8) -> bool) -> Range<usize> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if !f(b) {
                break;
            }
            self.pos += 1;
        }
        start..self.pos
    }
    /// Skips LWS, returning how many bytes were skipped.
    pub fn skip_lws(&mut self) -> usize {
        self.take_while(is_lws).len()
    }
    pub fn bytes(&self, range: &Range<usize>) -> &'a [u8] {
        self.raw.get(range.clone()).unwrap_or_default()
    }
    /// A quoted string starting at the cursor, including its quotes; `\` escapes the next
    /// byte. `None` when unterminated.
    pub fn quoted_string(&mut self) -> Option<Range<usize>> {
        let start = self.pos;
        if !self.eat(b'"') {
            return None;
        }
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => return Some(start..self.pos),
                b'\\' => {
                    self.peek()?;
                    self.pos += 1;
                }
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Range<usize> {
        0..s.len()
    }

    #[test]
    fn trim_and_split() {
        let v = b" \r\n a , <b,c> , \"d,\\\"e\" <f> ,, ";
        let parts: Vec<_> = split_list(v, 0..v.len())
            .into_iter()
            .map(|r| std::str::from_utf8(&v[r]).unwrap())
            .collect();
        assert_eq!(parts, ["a", "<b,c>", "\"d,\\\"e\" <f>"]);
        assert_eq!(trim_range(b"   ", 0..3), 3..3);
        assert_eq!(trim_range(b"x", 5..9), 5..5);
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal_u32(b"0068"), Some(68));
        assert_eq!(parse_decimal_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_decimal_u32(b"4294967296"), None);
        assert_eq!(parse_decimal_u32(b""), None);
        assert_eq!(parse_decimal_u32(b"1a"), None);
        assert_eq!(parse_decimal_usize(b"553"), Some(553));
    }

    #[test]
    fn cseq_values() {
        fn ok(s: &str) -> Option<(u32, &str)> {
            parse_cseq(s.as_bytes(), 0..s.len()).map(|(n, m)| (n, &s[m]))
        }
        assert_eq!(ok("1 INVITE"), Some((1, "INVITE")));
        assert_eq!(ok("0009\r\n  INVITE"), Some((9, "INVITE")));
        assert_eq!(ok("2147483648 INVITE"), None);
        assert_eq!(ok("1INVITE"), None);
        assert_eq!(ok("1 INVITE ACK"), None);
    }

    #[test]
    fn addresses() {
        let ok = |s: &str| is_valid_address(s.as_bytes(), r(s));
        for good in [
            "sip:a@example.com",
            "sip:a@example.com;tag=1",
            "<sip:a@example.com>",
            "Alice <sip:a@example.com>;tag=x",
            "\"A, B\" <sip:a@example.com>",
            "Jörg <sip:j@example.com>",
            "caller<sip:caller@example.com>;tag=323",
            "<urn:service:sos>",
            "sip:a@example.com ; tag = 1",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "",
            "a@example.com",
            "A, B <sip:a@example.com>",
            "< sip:a@example.com>",
            "<sip:a@example.com >",
            "\"open <sip:a@example.com>",
            "sip:a@example.com?x=y",
            "sip:a@example.com;",
            "sip:a@example.com;tag=",
            "<sip:a@example.com> junk",
            "1sip:a@example.com",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }

    #[test]
    fn via_lists() {
        let v = "SIP/2.0/UDP a;branch=z9hG4bK1;branch=z9hG4bK2,SIP/2.0/TCP [::1]";
        let vias = parse_via_list(v.as_bytes(), r(v)).unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!(&v[vias[0].branch.clone().unwrap()], "z9hG4bK1");
        assert_eq!(&v[vias[1].host.clone()], "::1");
        assert_eq!(&v[vias[1].range.clone()], "SIP/2.0/TCP [::1]");
        assert_eq!(parse_via_list(b"", 0..0), None);
    }

    #[test]
    fn long_forms() {
        assert_eq!(long_form(b"s"), b"Subject");
        assert_eq!(long_form(b"V"), b"Via");
        assert_eq!(long_form(b"q"), b"q");
        assert_eq!(long_form(b"Via"), b"Via");
    }
}
