//! Bytes → [`Message`]: strict start line, header index (compact names mapped, folded lines
//! handled), Content-Length framing for datagrams and streams, and limits.
//!
//! What is checked, and why (RFC 3261 §7, §18.3, §20, §25; RFC 4475 for the corner cases):
//! - the start line exactly: `Method SP Request-URI SP SIP/2.0` or
//!   `SIP/2.0 SP 3DIGIT SP Reason-Phrase`, single spaces, nothing trailing;
//! - every line ends in CRLF (see [`parse_head`] for why a bare LF is refused);
//! - Via, From, To, Call-ID and CSeq are present, once each where single-valued, and
//!   parse: the proxy reads them, answers with them, and must agree with the next hop on
//!   what they say;
//! - Content-Length is digits and consistent, and frames the body;
//! - Contact and Date, when present, have their RFC 3261 shape (RFC 4475 regbadct,
//!   baddate).
//!
//! Everything else (unknown headers, URI details, SDP) is indexed and forwarded as is.

use std::ops::Range;

use bytes::Bytes;

use super::message::{
    is_token_char, is_valid_address, long_form, parse_cseq, parse_decimal_usize, parse_via_list,
    split_list, trim_range, Header, HeaderName, Message, Method, StartLine,
};

/// More header fields than any sane SIP message carries (RFC 4475 longreq has 45); bounds
/// the work and memory one datagram can cost.
pub const MAX_HEADERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More bytes are needed (stream framing only); not a failure.
    #[error("incomplete message")]
    Incomplete,
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("bad start line")]
    BadStartLine,
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("bad {name} header")]
    BadHeader { name: &'static str },
    #[error("too many headers")]
    TooManyHeaders,
    #[error("Content-Length {declared} larger than the {present} body bytes present")]
    BodyTooShort { declared: usize, present: usize },
    #[error("malformed header section")]
    BadHeaderSection,
}

/// Parses one UDP datagram. Leading CRLFs are skipped; bytes past Content-Length are
/// discarded (RFC 3261 §18.3); without Content-Length the body runs to the end.
///
/// Requires Via, From, To, Call-ID, CSeq (well-formed) and, when present, a numeric
/// Max-Forwards and Content-Length; a request's CSeq method must match its method.
///
/// The returned message's `raw` is exactly the message: the skipped CRLFs and the
/// discarded trailing bytes are not part of it, so forwarding `raw` (or an [`Editor`]
/// result) never forwards them.
///
/// [`Editor`]: super::message::Editor
///
/// # Errors
/// See [`ParseError`]. `Incomplete` is never returned: a datagram is all there is.
pub fn parse_datagram(buf: Bytes, max_len: usize) -> Result<Message, ParseError> {
    parse_message(buf, max_len, Transport::Datagram)
}

/// Stream framing (TCP): how many bytes at the front of `buf` make the next message,
/// after skipping `skip` leading CRLF keep-alive bytes. Content-Length is mandatory.
///
/// A buffer holding nothing but keep-alive bytes is `Incomplete` (drain them with
/// [`keepalive_len`] if you want to answer RFC 5626 pings). Only the framing is checked
/// here (start line, header syntax, Content-Length): a message that frames but is
/// otherwise bad fails in [`parse_stream_message`] and the connection can carry on.
///
/// # Errors
/// [`ParseError::Incomplete`] to read more; [`ParseError::TooLarge`] when the head or the
/// declared message exceeds `max_len`; other errors when the head cannot be framed (the
/// connection should be closed).
pub fn frame_stream(buf: &[u8], max_len: usize) -> Result<Frame, ParseError> {
    let skip = keepalive_len(buf);
    if skip > max_len {
        return Err(ParseError::TooLarge {
            len: skip,
            max: max_len,
        });
    }
    let msg = buf.get(skip..).unwrap_or_default();
    if msg.is_empty() {
        return Err(ParseError::Incomplete);
    }
    let head = match parse_head(msg, false) {
        Err(ParseError::Incomplete) if msg.len() > max_len => {
            return Err(ParseError::TooLarge {
                len: msg.len(),
                max: max_len,
            })
        }
        other => other?,
    };
    let head_len = head.headers_end + 2;
    if head_len > max_len {
        return Err(ParseError::TooLarge {
            len: head_len,
            max: max_len,
        });
    }
    let declared =
        content_length(msg, &head.headers)?.ok_or(ParseError::MissingHeader("Content-Length"))?;
    let len = head_len.checked_add(declared).ok_or(ParseError::TooLarge {
        len: usize::MAX,
        max: max_len,
    })?;
    if len > max_len {
        return Err(ParseError::TooLarge { len, max: max_len });
    }
    if msg.len() < len {
        return Err(ParseError::Incomplete);
    }
    Ok(Frame { skip, len })
}

/// Number of CR/LF keep-alive bytes at the front of `buf` (RFC 5626 §3.5.1 sends
/// `CRLFCRLF` pings over streams; some UAs send them over UDP too).
pub fn keepalive_len(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count()
}

/// One framed message in a stream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// CRLF keep-alive bytes before the message.
    pub skip: usize,
    /// Length of the message itself.
    pub len: usize,
}

/// Parses one framed stream message (Content-Length required).
///
/// # Errors
/// See [`ParseError`].
pub fn parse_stream_message(buf: Bytes, max_len: usize) -> Result<Message, ParseError> {
    parse_message(buf, max_len, Transport::Stream)
}

/// What can be recovered from bytes that failed to parse, to address a `400`: present only
/// when the start line looks like a request and Via, From, To, Call-ID and CSeq header
/// lines are found (raw values, compact forms included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Salvage {
    pub vias: Vec<Bytes>,
    pub from: Bytes,
    pub to: Bytes,
    pub call_id: Bytes,
    pub cseq: Bytes,
}

/// A lenient scan of unparseable bytes for what a `400` needs. Never answers a response.
///
/// Lines may end in CRLF or a bare LF here (the message is being refused anyway), but a
/// salvaged value never contains CR or LF other than a CRLF fold followed by SP/HTAB, so
/// copying it into a `400` cannot inject header lines. Stops at the first empty line.
pub fn salvage(buf: &Bytes) -> Option<Salvage> {
    let bytes: &[u8] = buf;
    let mut pos = keepalive_len(bytes);
    let (first, next) = lenient_line(bytes, pos);
    let first = bytes.get(first)?;
    // A response is never answered (RFC 3261 §18.3/§16.7; hickory's reflection rule).
    if first.is_empty()
        || first
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
        || !first.first().copied().is_some_and(is_token_char)
    {
        return None;
    }
    pos = next;
    let mut vias = Vec::new();
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    while pos < bytes.len() {
        let (line, mut next) = lenient_line(bytes, pos);
        if line.is_empty() {
            break;
        }
        let mut value_end = line.end;
        // Continuation lines belong to this field.
        while bytes.get(next).is_some_and(|b| matches!(b, b' ' | b'\t')) {
            let (cont, after) = lenient_line(bytes, next);
            value_end = cont.end;
            next = after;
        }
        let line_bytes = bytes.get(line.clone()).unwrap_or_default();
        let name_len = line_bytes.iter().take_while(|b| is_token_char(**b)).count();
        let rest = line_bytes.get(name_len..).unwrap_or_default();
        let ws = rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        if name_len > 0 && rest.get(ws) == Some(&b':') {
            let value = trim_range(bytes, line.start + name_len + ws + 1..value_end);
            let name = long_form(line_bytes.get(..name_len).unwrap_or_default());
            let slot = match HeaderName::from_bytes(name) {
                HeaderName::Via => None,
                HeaderName::From => Some(&mut from),
                HeaderName::To => Some(&mut to),
                HeaderName::CallId => Some(&mut call_id),
                HeaderName::CSeq => Some(&mut cseq),
                _ => {
                    pos = next;
                    continue;
                }
            };
            if !value.is_empty() {
                if !is_safe_value(bytes.get(value.clone()).unwrap_or_default()) {
                    return None;
                }
                let value = buf.slice(value);
                match slot {
                    None => vias.push(value),
                    Some(slot) => {
                        slot.get_or_insert(value);
                    }
                }
            }
        }
        pos = next;
    }
    if vias.is_empty() {
        return None;
    }
    Some(Salvage {
        vias,
        from: from?,
        to: to?,
        call_id: call_id?,
        cseq: cseq?,
    })
}

/// The line starting at `pos` (without its LF and a CR before it) and where the next one
/// starts.
fn lenient_line(bytes: &[u8], pos: usize) -> (Range<usize>, usize) {
    let rest = bytes.get(pos..).unwrap_or_default();
    match rest.iter().position(|b| *b == b'\n') {
        Some(lf) => {
            let end = if lf > 0 && rest.get(lf - 1) == Some(&b'\r') {
                pos + lf - 1
            } else {
                pos + lf
            };
            (pos..end, pos + lf + 1)
        }
        None => (pos..bytes.len(), bytes.len()),
    }
}

/// No CR or LF except a CRLF followed by SP/HTAB (a fold).
fn is_safe_value(value: &[u8]) -> bool {
    value.iter().enumerate().all(|(i, b)| match b {
        b'\r' => {
            value.get(i + 1) == Some(&b'\n')
                && value.get(i + 2).is_some_and(|b| matches!(b, b' ' | b'\t'))
        }
        b'\n' => {
            i > 0
                && value.get(i - 1) == Some(&b'\r')
                && value.get(i + 1).is_some_and(|b| matches!(b, b' ' | b'\t'))
        }
        _ => true,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Datagram,
    Stream,
}

fn parse_message(buf: Bytes, max_len: usize, transport: Transport) -> Result<Message, ParseError> {
    if buf.len() > max_len {
        return Err(ParseError::TooLarge {
            len: buf.len(),
            max: max_len,
        });
    }
    let start = keepalive_len(&buf);
    let msg = buf.get(start..).unwrap_or_default();
    if msg.is_empty() {
        return Err(ParseError::BadStartLine);
    }
    let head = parse_head(msg, true)?;
    let declared = validate(msg, &head)?;
    let body_start = head.headers_end + 2;
    let present = msg.len().saturating_sub(body_start);
    let body_len = match (declared, transport) {
        (Some(declared), _) if declared > present => {
            return Err(ParseError::BodyTooShort { declared, present })
        }
        (Some(declared), _) => declared,
        (None, Transport::Datagram) => present,
        (None, Transport::Stream) => return Err(ParseError::MissingHeader("Content-Length")),
    };
    let end = body_start + body_len;
    // Zero-copy: the message shares the datagram's allocation but ends where its body does,
    // so trailing bytes (RFC 4475 dblreq) are gone for good.
    let raw = buf.slice(start..start + end);
    let start_line = match head.kind {
        StartKind::Request { method, uri } => StartLine::Request {
            method: Method::from_raw(&raw, method),
            uri,
        },
        StartKind::Response { code, reason } => StartLine::Response { code, reason },
    };
    Ok(Message {
        raw,
        start: start_line,
        start_line: head.start_line,
        headers: head.headers,
        headers_end: head.headers_end,
        body: body_start..end,
    })
}

/// The start line and header index of a message, offsets relative to its first byte.
#[derive(Debug)]
struct Head {
    kind: StartKind,
    start_line: Range<usize>,
    headers: Vec<Header>,
    /// Offset of the empty line's CRLF.
    headers_end: usize,
}

#[derive(Debug)]
enum StartKind {
    Request {
        method: Range<usize>,
        uri: Range<usize>,
    },
    Response {
        code: u16,
        reason: Range<usize>,
    },
}

/// Indexes the start line and header fields of `buf` (which starts at the start line).
///
/// Every line must end in CRLF; a bare CR or LF anywhere in the head is refused. Why not
/// be liberal: precall forwards the head byte for byte, so the next hop must see exactly
/// the header boundaries we saw. A bare LF that we took for a line end but the next hop
/// did not (or the other way round) would let a header hide inside another one, e.g. a
/// second Via or Route smuggled past our checks. RFC 3261 §7 requires CRLF; SIPp, Kamailio
/// and carriers send it.
///
/// With `complete` false (a stream buffer) running out of bytes before the empty line is
/// `Incomplete`; with `complete` true (a datagram) it is an error.
fn parse_head(buf: &[u8], complete: bool) -> Result<Head, ParseError> {
    let out_of_bytes = |err| {
        if complete {
            err
        } else {
            ParseError::Incomplete
        }
    };
    let (line_end, mut pos) = next_line(buf, 0)
        .map_err(|()| ParseError::BadStartLine)?
        .ok_or_else(|| out_of_bytes(ParseError::BadStartLine))?;
    let kind = parse_start_line(buf.get(..line_end).unwrap_or_default())?;
    let start_line = 0..pos;
    let mut headers = Vec::new();
    loop {
        let (line_end, next) = next_line(buf, pos)
            .map_err(|()| ParseError::BadHeaderSection)?
            .ok_or_else(|| out_of_bytes(ParseError::BadHeaderSection))?;
        if line_end == pos {
            return Ok(Head {
                kind,
                start_line,
                headers,
                headers_end: pos,
            });
        }
        // field-name *(SP / HTAB) ":" ... (a line starting with SP/HTAB here would be a
        // continuation of the start line, which is not allowed).
        let line = buf.get(pos..line_end).unwrap_or_default();
        let name_len = line.iter().take_while(|b| is_token_char(**b)).count();
        let ws = line
            .get(name_len..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        if name_len == 0 || line.get(name_len + ws) != Some(&b':') {
            return Err(ParseError::BadHeaderSection);
        }
        let value_start = pos + name_len + ws + 1;
        let (mut value_end, mut field_end) = (line_end, next);
        while let Some(&b) = buf.get(field_end) {
            if !matches!(b, b' ' | b'\t') {
                break;
            }
            let (cont_end, cont_next) = next_line(buf, field_end)
                .map_err(|()| ParseError::BadHeaderSection)?
                .ok_or_else(|| out_of_bytes(ParseError::BadHeaderSection))?;
            value_end = cont_end;
            field_end = cont_next;
        }
        if field_end >= buf.len() {
            // Cannot tell yet whether a continuation line follows.
            return Err(out_of_bytes(ParseError::BadHeaderSection));
        }
        if headers.len() == MAX_HEADERS {
            return Err(ParseError::TooManyHeaders);
        }
        let name_range = pos..pos + name_len;
        headers.push(Header {
            name: HeaderName::from_bytes(buf.get(name_range.clone()).unwrap_or_default()),
            name_range,
            value: trim_range(buf, value_start..value_end),
            line: pos..field_end,
        });
        pos = field_end;
    }
}

/// The line starting at `pos`: `Ok(Some((index of its CR, index after its LF)))`,
/// `Ok(None)` when no LF follows yet, `Err` for a bare CR or LF.
fn next_line(buf: &[u8], pos: usize) -> Result<Option<(usize, usize)>, ()> {
    let rest = buf.get(pos..).unwrap_or_default();
    let Some(lf) = rest.iter().position(|b| *b == b'\n') else {
        // A CR not at the very end can only be a bare CR.
        return match rest.iter().position(|b| *b == b'\r') {
            Some(cr) if cr + 1 < rest.len() => Err(()),
            _ => Ok(None),
        };
    };
    if lf == 0 || rest.get(lf - 1) != Some(&b'\r') {
        return Err(());
    }
    if rest.get(..lf - 1).unwrap_or_default().contains(&b'\r') {
        return Err(());
    }
    Ok(Some((pos + lf - 1, pos + lf + 1)))
}

/// `Method SP Request-URI SP SIP-Version` or `SIP-Version SP Status-Code SP Reason-Phrase`
/// (RFC 3261 §7.1, §7.2), exactly: single spaces, nothing trailing (RFC 4475 lwsstart,
/// trws, lwsruri, ltgtruri, bigcode, badvers). Only SIP/2.0 is spoken ("SIP" in any case,
/// §7.1).
fn parse_start_line(line: &[u8]) -> Result<StartKind, ParseError> {
    let bad = ParseError::BadStartLine;
    if line
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
    {
        if !is_sip_2_0(line.get(..7).unwrap_or_default()) || line.get(7) != Some(&b' ') {
            return Err(bad);
        }
        let Some(digits) = line.get(8..11) else {
            return Err(bad);
        };
        if !digits.iter().all(u8::is_ascii_digit) || line.get(11) != Some(&b' ') {
            return Err(bad);
        }
        let code = digits
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&code) {
            return Err(bad);
        }
        return Ok(StartKind::Response {
            code,
            reason: 12..line.len(),
        });
    }
    let mut parts = line.splitn(3, |b| *b == b' ');
    let (Some(method), Some(uri), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    if method.is_empty() || !method.iter().all(|b| is_token_char(*b)) {
        return Err(bad);
    }
    if !is_sip_2_0(version) || !is_request_uri(uri) {
        return Err(bad);
    }
    let uri_start = method.len() + 1;
    Ok(StartKind::Request {
        method: 0..method.len(),
        uri: uri_start..uri_start + uri.len(),
    })
}

fn is_sip_2_0(version: &[u8]) -> bool {
    version.len() == 7
        && version
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
        && version.get(4..) == Some(b"2.0".as_slice())
}

/// An absolute URI with no whitespace, controls, quotes or angle brackets. For `sip:` and
/// `sips:` the Request-URI may not carry headers (RFC 3261 §19.1.1 table 1; RFC 4475
/// escruri): no `?` after the userinfo.
fn is_request_uri(uri: &[u8]) -> bool {
    let Some((scheme, rest)) = super::message::split_absolute_uri(uri) else {
        return false;
    };
    if scheme.eq_ignore_ascii_case(b"sip") || scheme.eq_ignore_ascii_case(b"sips") {
        let host_part = match rest.iter().position(|b| *b == b'@') {
            Some(at) => rest.get(at + 1..).unwrap_or_default(),
            None => rest,
        };
        return !host_part.contains(&b'?');
    }
    true
}

/// Checks the headers precall relies on; returns the Content-Length, if any.
fn validate(buf: &[u8], head: &Head) -> Result<Option<usize>, ParseError> {
    let headers = &head.headers;
    let value = |h: &Header| buf.get(h.value.clone()).unwrap_or_default();
    let named = |name: HeaderName| headers.iter().filter(move |h| h.name == name);

    for (name, label) in [
        (HeaderName::Via, "Via"),
        (HeaderName::From, "From"),
        (HeaderName::To, "To"),
        (HeaderName::CallId, "Call-ID"),
        (HeaderName::CSeq, "CSeq"),
    ] {
        if named(name).next().is_none() {
            return Err(ParseError::MissingHeader(label));
        }
    }
    // Single-valued fields appear once (RFC 3261 §7.3.1; RFC 4475 multi01): with two
    // Call-IDs or CSeqs, we and the next hop could pick different ones.
    for (name, label) in [
        (HeaderName::From, "From"),
        (HeaderName::To, "To"),
        (HeaderName::CallId, "Call-ID"),
        (HeaderName::CSeq, "CSeq"),
        (HeaderName::MaxForwards, "Max-Forwards"),
    ] {
        if named(name).nth(1).is_some() {
            return Err(ParseError::BadHeader { name: label });
        }
    }
    for via in named(HeaderName::Via) {
        if parse_via_list(buf, via.value.clone()).is_none() {
            return Err(ParseError::BadHeader { name: "Via" });
        }
    }
    for (name, label) in [(HeaderName::From, "From"), (HeaderName::To, "To")] {
        if named(name).any(|h| !is_valid_address(buf, h.value.clone())) {
            return Err(ParseError::BadHeader { name: label });
        }
    }
    if named(HeaderName::CallId).any(|h| {
        let v = value(h);
        v.is_empty() || v.iter().any(|&b| b <= b' ' || b == 0x7f)
    }) {
        return Err(ParseError::BadHeader { name: "Call-ID" });
    }
    for cseq in named(HeaderName::CSeq) {
        let (_, method) =
            parse_cseq(buf, cseq.value.clone()).ok_or(ParseError::BadHeader { name: "CSeq" })?;
        if let StartKind::Request { method: start, .. } = &head.kind {
            // RFC 3261 §8.2.2.3/§16.3; RFC 4475 mismatch01, mismatch02.
            if buf.get(start.clone()) != buf.get(method) {
                return Err(ParseError::BadHeader { name: "CSeq" });
            }
        }
    }
    if named(HeaderName::MaxForwards).any(|h| {
        let v = value(h);
        v.is_empty() || !v.iter().all(u8::is_ascii_digit)
    }) {
        return Err(ParseError::BadHeader {
            name: "Max-Forwards",
        });
    }
    for contact in named(HeaderName::Contact) {
        let elements = split_list(buf, contact.value.clone());
        let ok = !elements.is_empty()
            && elements.iter().all(|e| {
                buf.get(e.clone()) == Some(b"*".as_slice()) || is_valid_address(buf, e.clone())
            });
        if !ok {
            return Err(ParseError::BadHeader { name: "Contact" });
        }
    }
    for header in headers.iter().filter(|h| h.name == HeaderName::Other) {
        let name = buf.get(header.name_range.clone()).unwrap_or_default();
        if name.eq_ignore_ascii_case(b"Date") && !is_rfc1123_gmt(value(header)) {
            return Err(ParseError::BadHeader { name: "Date" });
        }
    }
    content_length(buf, headers)
}

/// The Content-Length: digits, and the same in every Content-Length header (RFC 4475
/// ncl, mcl01). `None` when absent.
fn content_length(buf: &[u8], headers: &[Header]) -> Result<Option<usize>, ParseError> {
    let mut found = None;
    for header in headers
        .iter()
        .filter(|h| h.name == HeaderName::ContentLength)
    {
        let n = parse_decimal_usize(buf.get(header.value.clone()).unwrap_or_default()).ok_or(
            ParseError::BadHeader {
                name: "Content-Length",
            },
        )?;
        if found.is_some_and(|f| f != n) {
            return Err(ParseError::BadHeader {
                name: "Content-Length",
            });
        }
        found = Some(n);
    }
    Ok(found)
}

/// `rfc1123-date = wkday "," SP date1 SP time SP "GMT"` (RFC 3261 §20.17; RFC 4475
/// baddate: only GMT is a valid zone).
fn is_rfc1123_gmt(v: &[u8]) -> bool {
    const DAYS: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    // "Sat, 15 Oct 2005 04:44:56 GMT"
    //  0123456789012345678901234567 8
    let one_of = |set: &[&[u8]], range: Range<usize>| {
        v.get(range)
            .is_some_and(|s| set.iter().any(|x| x.eq_ignore_ascii_case(s)))
    };
    let digits = |range: Range<usize>| {
        v.get(range)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let at = |i: usize, b: u8| v.get(i) == Some(&b);
    v.len() == 29
        && one_of(&DAYS, 0..3)
        && at(3, b',')
        && at(4, b' ')
        && digits(5..7)
        && at(7, b' ')
        && one_of(&MONTHS, 8..11)
        && at(11, b' ')
        && digits(12..16)
        && at(16, b' ')
        && digits(17..19)
        && at(19, b':')
        && digits(20..22)
        && at(22, b':')
        && digits(23..25)
        && at(25, b' ')
        && v.get(26..29)
            .is_some_and(|z| z.eq_ignore_ascii_case(b"GMT"))
}

#[cfg(test)]
mod tests;
