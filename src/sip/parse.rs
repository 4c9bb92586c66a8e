//! Bytes → [`Message`]: strict start line, header index (compact names mapped, folded lines
//! handled), Content-Length framing for datagrams and streams, and limits.
//!
//! SKELETON: signatures are the contract; bodies to be implemented.

use bytes::Bytes;

use super::message::Message;

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
/// # Errors
/// See [`ParseError`].
pub fn parse_datagram(_buf: Bytes, _max_len: usize) -> Result<Message, ParseError> {
    todo!()
}

/// Stream framing (TCP): how many bytes at the front of `buf` make the next message,
/// after skipping `skip` leading CRLF keep-alive bytes. Content-Length is mandatory.
///
/// # Errors
/// [`ParseError::Incomplete`] to read more; [`ParseError::TooLarge`] when the head or the
/// declared message exceeds `max_len`; other errors when the head cannot be framed (the
/// connection should be closed).
pub fn frame_stream(_buf: &[u8], _max_len: usize) -> Result<Frame, ParseError> {
    todo!()
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
pub fn parse_stream_message(_buf: Bytes, _max_len: usize) -> Result<Message, ParseError> {
    todo!()
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
pub fn salvage(_buf: &Bytes) -> Option<Salvage> {
    todo!()
}
