//! Raw SIP endpoints for the tests, over plain std sockets: a UAS standing in for the voice
//! agent behind precall, and a UAC standing in for the carrier.
//!
//! Both run a reader thread that hands every message to the test through a channel, so a
//! test waits for "the next INVITE" or "a 487" as an event with a timeout. The UAS answers
//! like a simple agent (180, 200 with SDP, 200 to BYE/OPTIONS) and sends its responses
//! where RFC 3261 §18.2.2 says: the top Via's sent-by, `received`/`rport` honoured.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sipmsg::{frame, param, SipMsg};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn via(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
    pub fn param(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// How the UAS answers an INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 180 Ringing then 200 OK with SDP; 200 to BYE, OPTIONS and other requests.
    Ring200,
    /// A final error (e.g. 486) to the INVITE; 200 to other requests.
    Reject(u16),
    /// Record only, answer nothing.
    Silent,
}

/// A message received by an endpoint, with where it came from and when.
#[derive(Debug, Clone)]
pub struct Received {
    pub msg: SipMsg,
    pub from: SocketAddr,
    pub at: Instant,
}

/// Unique-enough tokens for tags, branches and Call-IDs.
pub fn token(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{label}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------
// A message inbox shared by UAS and UAC: a channel plus a buffer of messages skipped over
// while waiting for a particular one.

struct Inbox {
    rx: Mutex<Receiver<Received>>,
    pending: Mutex<VecDeque<Received>>,
}

impl Inbox {
    fn new(rx: Receiver<Received>) -> Inbox {
        Inbox {
            rx: Mutex::new(rx),
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// The first message (pending ones first) matching `pred`, waiting up to `timeout`;
    /// non-matching messages stay queued in order.
    fn take(&self, timeout: Duration, pred: &dyn Fn(&SipMsg) -> bool) -> Option<Received> {
        {
            let mut pending = self.pending.lock().unwrap();
            if let Some(i) = pending.iter().position(|r| pred(&r.msg)) {
                return pending.remove(i);
            }
        }
        let deadline = Instant::now() + timeout;
        let rx = self.rx.lock().unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) if pred(&r.msg) => return Some(r),
                Ok(r) => self.pending.lock().unwrap().push_back(r),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Everything received so far, without waiting.
    fn drain(&self) -> Vec<Received> {
        let mut out: Vec<Received> = self.pending.lock().unwrap().drain(..).collect();
        let rx = self.rx.lock().unwrap();
        while let Ok(r) = rx.try_recv() {
            out.push(r);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// UAS.

/// A SIP UAS on 127.0.0.1 (UDP or TCP), answering per [`Answer`], stopped on drop.
pub struct Uas {
    pub addr: SocketAddr,
    pub transport: Transport,
    inbox: Inbox,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Uas {
    pub fn udp(answer: Answer) -> Uas {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut answerer = Answerer::new(answer, addr, Transport::Udp);
            while !stop2.load(Ordering::Relaxed) {
                let (n, from) = match sock.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(_) => continue,
                };
                let Some(msg) = SipMsg::parse(&buf[..n]) else {
                    continue;
                };
                for resp in answerer.answer(&msg) {
                    let to = response_destination(&msg, from);
                    let _ = sock.send_to(&resp, to);
                }
                let _ = tx.send(Received {
                    msg,
                    from,
                    at: Instant::now(),
                });
            }
        });
        Uas {
            addr,
            transport: Transport::Udp,
            inbox: Inbox::new(rx),
            stop,
            streams: Arc::new(Mutex::new(Vec::new())),
            threads: vec![t],
        }
    }

    pub fn tcp(answer: Answer) -> Uas {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (stop2, streams2) = (stop.clone(), streams.clone());
        let t = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                let from = stream.peer_addr().unwrap();
                streams2.lock().unwrap().push(stream.try_clone().unwrap());
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut answerer = Answerer::new(answer, addr, Transport::Tcp);
                    let mut writer = stream.try_clone().unwrap();
                    read_stream(stream, from, &tx, |msg| {
                        for resp in answerer.answer(msg) {
                            let _ = writer.write_all(&resp);
                        }
                    });
                });
            }
        });
        Uas {
            addr,
            transport: Transport::Tcp,
            inbox: Inbox::new(rx),
            stop,
            streams,
            threads: vec![t],
        }
    }

    /// The upstream URI for this UAS in a precall config.
    pub fn uri(&self) -> String {
        format!("sip:{};transport={}", self.addr, self.transport.param())
    }

    /// The next request of `method`, waiting up to `timeout`.
    pub fn recv_request(&self, method: &str, timeout: Duration) -> Option<Received> {
        self.inbox.take(timeout, &|m| m.method() == Some(method))
    }

    /// The next INVITE, or a panic naming what else arrived.
    pub fn expect_invite(&self, timeout: Duration) -> Received {
        match self.recv_request("INVITE", timeout) {
            Some(r) => r,
            None => panic!(
                "UAS {} got no INVITE within {timeout:?}; other messages: {:?}",
                self.addr,
                self.inbox
                    .drain()
                    .iter()
                    .map(|r| r.msg.start_line.clone())
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// Asserts that no request at all arrives within `window`.
    pub fn expect_nothing(&self, window: Duration, why: &str) {
        if let Some(r) = self.inbox.take(window, &|m| m.is_request()) {
            panic!("UAS {}: {why}, but got:\n{}", self.addr, r.msg.text());
        }
    }
}

impl Drop for Uas {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.transport == Transport::Tcp {
            // Wake the accept loop, and end the connection readers.
            let _ = TcpStream::connect(self.addr);
            for s in self.streams.lock().unwrap().iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads SIP messages framed by Content-Length from a stream until it closes.
fn read_stream(
    mut stream: TcpStream,
    from: SocketAddr,
    tx: &Sender<Received>,
    mut on_msg: impl FnMut(&SipMsg),
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        while let Some(len) = frame(&buf) {
            let raw: Vec<u8> = buf.drain(..len).collect();
            if let Some(msg) = SipMsg::parse(&raw) {
                on_msg(&msg);
                if tx
                    .send(Received {
                        msg,
                        from,
                        at: Instant::now(),
                    })
                    .is_err()
                {
                    return;
                }
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// RFC 3261 §18.2.2 / RFC 3581: top Via's `received` and `rport` if present, else its
/// sent-by (port 5060 by default); the source address when the Via cannot be read.
pub fn response_destination(req: &SipMsg, source: SocketAddr) -> SocketAddr {
    let Some(via) = req.header_values("via").into_iter().next() else {
        return source;
    };
    let sent_by = via
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("");
    let (mut host, mut port) = match sent_by.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(5060)),
        None => (sent_by.to_string(), 5060u16),
    };
    if let Some(r) = param(&via, "received").filter(|r| !r.is_empty()) {
        host = r;
    }
    if let Some(p) = param(&via, "rport").and_then(|p| p.parse().ok()) {
        port = p;
    }
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or(source)
}

/// The UAS's answering logic, shared by UDP and TCP.
struct Answerer {
    answer: Answer,
    local: SocketAddr,
    transport: Transport,
}

impl Answerer {
    fn new(answer: Answer, local: SocketAddr, transport: Transport) -> Answerer {
        Answerer {
            answer,
            local,
            transport,
        }
    }

    fn answer(&mut self, msg: &SipMsg) -> Vec<Vec<u8>> {
        let Some(method) = msg.method() else {
            return Vec::new();
        };
        let contact = format!(
            "Contact: <sip:agent@{};transport={}>\r\n",
            self.local,
            self.transport.param()
        );
        // One tag per call, the same in the 180 and the 200 (and stable across retransmissions).
        let tag = format!("uas{:x}", fnv1a(msg.call_id().unwrap_or("").as_bytes()));
        match (self.answer, method) {
            (Answer::Silent, _) | (_, "ACK") => Vec::new(),
            (Answer::Ring200, "INVITE") => vec![
                response(msg, 180, "Ringing", Some(&tag), &contact, ""),
                response(
                    msg,
                    200,
                    "OK",
                    Some(&tag),
                    &format!("{contact}Content-Type: application/sdp\r\n"),
                    SDP,
                ),
            ],
            (Answer::Reject(code), "INVITE") => {
                vec![response(msg, code, "Rejected", Some(&tag), "", "")]
            }
            _ => vec![response(msg, 200, "OK", Some(&tag), &contact, "")],
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub const SDP: &str = "v=0\r\no=agent 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

/// A response to `req`: Vias, From, To (+ tag), Call-ID and CSeq copied verbatim,
/// Record-Route too for a 1xx/2xx to a dialog-creating INVITE (RFC 3261 §12.1.1).
pub fn response(
    req: &SipMsg,
    code: u16,
    reason: &str,
    to_tag: Option<&str>,
    extra_headers: &str,
    body: &str,
) -> Vec<u8> {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for f in req.fields_named("via") {
        out.push_str(&f.line);
        out.push_str("\r\n");
    }
    for f in req.fields_named("from") {
        out.push_str(&f.line);
        out.push_str("\r\n");
    }
    for f in req.fields_named("to") {
        out.push_str(&f.line);
        if let (Some(tag), None) = (to_tag, param(&f.value, "tag")) {
            out.push_str(";tag=");
            out.push_str(tag);
        }
        out.push_str("\r\n");
    }
    for name in ["call-id", "cseq"] {
        for f in req.fields_named(name) {
            out.push_str(&f.line);
            out.push_str("\r\n");
        }
    }
    if req.method() == Some("INVITE") && code < 300 {
        for f in req.fields_named("record-route") {
            out.push_str(&f.line);
            out.push_str("\r\n");
        }
    }
    out.push_str(extra_headers);
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------
// UAC.

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

/// A caller: one socket (UDP, or a TCP connection to precall), a reader thread, an inbox.
pub struct Uac {
    pub transport: Transport,
    pub local: SocketAddr,
    pub target: SocketAddr,
    conn: Conn,
    inbox: Inbox,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Uac {
    pub fn udp(target: SocketAddr) -> Uac {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let local = sock.local_addr().unwrap();
        let reader = sock.try_clone().unwrap();
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = reader.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(msg) = SipMsg::parse(&buf[..n]) {
                    let _ = tx.send(Received {
                        msg,
                        from,
                        at: Instant::now(),
                    });
                }
            }
        });
        Uac {
            transport: Transport::Udp,
            local,
            target,
            conn: Conn::Udp(sock),
            inbox: Inbox::new(rx),
            stop,
            thread: Some(thread),
        }
    }

    pub fn tcp(target: SocketAddr) -> Uac {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        stream.set_nodelay(true).unwrap();
        let local = stream.local_addr().unwrap();
        let reader = stream.try_clone().unwrap();
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || read_stream(reader, target, &tx, |_| {}));
        Uac {
            transport: Transport::Tcp,
            local,
            target,
            conn: Conn::Tcp(stream),
            inbox: Inbox::new(rx),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Some(thread),
        }
    }

    /// Sends raw bytes to precall.
    pub fn send(&self, bytes: &[u8]) {
        match &self.conn {
            Conn::Udp(s) => {
                s.send_to(bytes, self.target).unwrap();
            }
            Conn::Tcp(s) => {
                (&*s).write_all(bytes).unwrap();
            }
        }
    }

    /// The next message of any kind.
    pub fn recv(&self, timeout: Duration) -> Option<SipMsg> {
        self.inbox.take(timeout, &|_| true).map(|r| r.msg)
    }

    /// The next response matching `pred`; others stay queued.
    pub fn recv_where(&self, timeout: Duration, pred: &dyn Fn(&SipMsg) -> bool) -> Option<SipMsg> {
        self.inbox.take(timeout, pred).map(|r| r.msg)
    }

    /// The next response with `code` for `call_id` (and the CSeq method, when given).
    pub fn expect_status(
        &self,
        call_id: &str,
        code: u16,
        cseq_method: Option<&str>,
        timeout: Duration,
    ) -> SipMsg {
        let got = self.recv_where(timeout, &|m| {
            m.status() == Some(code)
                && m.call_id() == Some(call_id)
                && (cseq_method.is_none() || m.cseq_method() == cseq_method)
        });
        got.unwrap_or_else(|| {
            panic!(
                "caller got no {code} ({cseq_method:?}) for {call_id} within {timeout:?}; got instead: {:?}",
                self.drain_lines()
            )
        })
    }

    /// Start lines of everything received and not taken yet.
    pub fn drain_lines(&self) -> Vec<String> {
        self.inbox
            .drain()
            .into_iter()
            .map(|r| {
                format!(
                    "{} ({})",
                    r.msg.start_line,
                    r.msg.cseq_method().unwrap_or("?")
                )
            })
            .collect()
    }

    /// A new call from `caller` (a number) to `called`.
    pub fn call(&self, caller: &str, called: &str) -> Call {
        Call {
            call_id: format!("{}@it.test", token("call")),
            caller: caller.to_string(),
            called: called.to_string(),
            branch: format!("z9hG4bK{}", token("b")),
            from_tag: token("ft"),
            local: self.local,
            target: self.target,
            transport: self.transport,
        }
    }
}

impl Drop for Uac {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Conn::Tcp(s) = &self.conn {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One call's identifiers and the requests a caller sends in it.
#[derive(Debug, Clone)]
pub struct Call {
    pub call_id: String,
    pub caller: String,
    pub called: String,
    pub branch: String,
    pub from_tag: String,
    pub local: SocketAddr,
    pub target: SocketAddr,
    pub transport: Transport,
}

impl Call {
    fn via(&self, branch: &str) -> String {
        format!(
            "Via: SIP/2.0/{} {};branch={branch};rport\r\n",
            self.transport.via(),
            self.local
        )
    }

    fn from(&self) -> String {
        format!(
            "From: \"Caller\" <sip:{}@{}>;tag={}\r\n",
            self.caller, self.local, self.from_tag
        )
    }

    pub fn request_uri(&self) -> String {
        format!("sip:{}@{}", self.called, self.target)
    }

    /// The INVITE with SDP; `extra` are additional CRLF-terminated header lines.
    pub fn invite_with(&self, extra: &str) -> Vec<u8> {
        format!(
            "INVITE {ruri} SIP/2.0\r\n{via}Max-Forwards: 70\r\n{from}To: <sip:{called}@{target}>\r\n\
             Call-ID: {cid}\r\nCSeq: 1 INVITE\r\nContact: <sip:{caller}@{local};transport={tp}>\r\n\
             {extra}Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{SDP}",
            ruri = self.request_uri(),
            via = self.via(&self.branch),
            from = self.from(),
            called = self.called,
            target = self.target,
            cid = self.call_id,
            caller = self.caller,
            local = self.local,
            tp = self.transport.param(),
            len = SDP.len(),
        )
        .into_bytes()
    }

    pub fn invite(&self) -> Vec<u8> {
        self.invite_with("")
    }

    /// CANCEL for the INVITE: same Request-URI, branch, From, To, Call-ID, CSeq number.
    pub fn cancel(&self) -> Vec<u8> {
        format!(
            "CANCEL {} SIP/2.0\r\n{}Max-Forwards: 70\r\n{}To: <sip:{}@{}>\r\nCall-ID: {}\r\n\
             CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n",
            self.request_uri(),
            self.via(&self.branch),
            self.from(),
            self.called,
            self.target,
            self.call_id
        )
        .into_bytes()
    }

    /// ACK for a non-2xx final response: same branch, To from the response (§17.1.1.3).
    pub fn ack_non2xx(&self, resp: &SipMsg) -> Vec<u8> {
        format!(
            "ACK {} SIP/2.0\r\n{}Max-Forwards: 70\r\n{}To: {}\r\nCall-ID: {}\r\nCSeq: 1 ACK\r\n\
             Content-Length: 0\r\n\r\n",
            self.request_uri(),
            self.via(&self.branch),
            self.from(),
            resp.header("to").unwrap_or(""),
            self.call_id
        )
        .into_bytes()
    }

    /// An in-dialog request after a 2xx: Request-URI = the remote Contact, Route = the
    /// Record-Route set (in order, UAC side §12.1.2), new branch, sent to precall.
    pub fn in_dialog(&self, method: &str, cseq: u32, ok: &SipMsg) -> Vec<u8> {
        let contact = ok.header("contact").unwrap_or("<sip:unknown>");
        let ruri = contact
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap_or("sip:unknown")
            .to_string();
        let mut routes = String::new();
        for rr in ok.header_values("record-route") {
            routes.push_str(&format!("Route: {rr}\r\n"));
        }
        format!(
            "{method} {ruri} SIP/2.0\r\n{}Max-Forwards: 70\r\n{routes}{}To: {}\r\nCall-ID: {}\r\n\
             CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
            self.via(&format!("z9hG4bK{}", token("ind"))),
            self.from(),
            ok.header("to").unwrap_or(""),
            self.call_id
        )
        .into_bytes()
    }
}
