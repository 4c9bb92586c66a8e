//! SIP messages as an index of byte ranges over the received `Bytes`.
//!
//! SKELETON: types and signatures are the contract; bodies to be implemented.
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

impl Method {
    pub fn from_bytes(_token: &[u8]) -> Method {
        todo!()
    }
    pub fn as_bytes(&self) -> &[u8] {
        todo!()
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
    pub host: &'a str,
    pub port: Option<u16>,
    pub branch: Option<&'a str>,
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
    pub fn header(&self, _name: HeaderName) -> Option<&[u8]> {
        todo!()
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
    pub fn header_by_name(&self, _name: &str) -> Option<&[u8]> {
        todo!()
    }
    pub fn body(&self) -> &[u8] {
        self.slice(&self.body)
    }
    pub fn call_id(&self) -> Option<&[u8]> {
        self.header(HeaderName::CallId)
    }
    pub fn cseq(&self) -> Option<CSeq> {
        todo!()
    }
    /// The first Via value (of the first Via header; Via values may be comma-joined).
    pub fn top_via(&self) -> Option<Via<'_>> {
        todo!()
    }
    /// All Via values in order, across headers and commas.
    pub fn vias(&self) -> Vec<Via<'_>> {
        todo!()
    }
    /// Max-Forwards as a number, `None` when absent or unparsable.
    pub fn max_forwards(&self) -> Option<u32> {
        todo!()
    }
    /// Route values in order (each `<uri;params>` element, across headers and commas), as
    /// (byte range of the element, header index).
    pub fn routes(&self) -> Vec<(Range<usize>, usize)> {
        todo!()
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
