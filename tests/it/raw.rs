//! What the hostile-network tests (issue 7) share: config keys the harness does not model,
//! raw sockets on other loopback addresses (127.0.0.X, so a source is neither the agent
//! nor "us"), and a plain call to prove precall still works.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::harness::{Config, Precall};
use crate::rig::{complete_call, AGENT_A, SOON};
use crate::sipmsg::{frame, SipMsg};
use crate::uas::{Uac, Uas};

/// `config`'s TOML with `keys` (TOML lines) added to `[sip]`, `[http]`, `[store]`, or to
/// agent `agents.ID`.
pub fn toml_with(config: &Config, keys: &[(&str, &str)]) -> String {
    let mut toml = config.to_toml();
    for (section, line) in keys {
        let anchor = match section.strip_prefix("agents.") {
            Some(id) => format!("[[agents]]\nid = \"{id}\"\n"),
            None => format!("[{section}]\n"),
        };
        let at = toml
            .find(&anchor)
            .unwrap_or_else(|| panic!("no {anchor:?} in\n{toml}"))
            + anchor.len();
        toml.insert_str(at, &format!("{line}\n"));
    }
    toml
}

/// Starts precall with `config` plus `keys` (see [`toml_with`]).
pub fn start(name: &str, config: &Config, keys: &[(&str, &str)]) -> Precall {
    Precall::start_with(name, config, &toml_with(config, keys), &[])
}

/// A UDP socket on a loopback address other than 127.0.0.1 (Linux routes all of
/// 127.0.0.0/8 to `lo`), at `port` (0: any). The address is picked per process so tests
/// running in parallel rarely meet; every candidate is tried before giving up.
pub fn udp_on_alias(port: u16) -> UdpSocket {
    let start = std::process::id() as usize;
    for i in 0..240 {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let last = 2 + ((start + n + i * 7) % 240) as u8;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(ip, port)) {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            return s;
        }
    }
    panic!("no 127.0.0.X:{port} free for a test socket");
}

/// The first message on `sock` matching `pred` within `timeout`; others are dropped.
pub fn recv_where(
    sock: &UdpSocket,
    timeout: Duration,
    pred: impl Fn(&SipMsg) -> bool,
) -> Option<SipMsg> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Some(m) = SipMsg::parse(&buf[..n]) {
                if pred(&m) {
                    return Some(m);
                }
            }
        }
    }
    None
}

/// A raw TCP connection to precall: send bytes, read framed messages, see it closed.
pub struct RawTcp {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub closed: bool,
}

impl RawTcp {
    pub fn connect(to: SocketAddr) -> RawTcp {
        let stream = TcpStream::connect_timeout(&to, SOON).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        RawTcp {
            stream,
            buf: Vec::new(),
            closed: false,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads until a whole message is buffered (returned), the peer closes, or `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<SipMsg> {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 65536];
        loop {
            if let Some(len) = frame(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..len).collect();
                return SipMsg::parse(&raw);
            }
            if self.closed || Instant::now() >= deadline {
                return None;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Whether the peer closes the connection within `timeout` (anything read meanwhile
    /// is kept).
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 65536];
        while !self.closed && Instant::now() < deadline {
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
        self.closed
    }
}

/// A call from `caller` to agent A that falls back (no webhook) and completes: INVITE,
/// forwarded, 200, ACK, BYE. Proof that precall still works after whatever came before.
pub fn plain_call(uac: &Uac, uas: &Uas, caller: &str) {
    let call = uac.call(caller, AGENT_A);
    uac.send(&call.invite());
    // INVITEs of other calls (forwarded torture messages) may still be queued: skip them.
    let deadline = Instant::now() + SOON;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let inv = uas
            .recv_request("INVITE", left)
            .unwrap_or_else(|| panic!("the plain call from {caller} was not forwarded"));
        if inv.msg.call_id() == Some(call.call_id.as_str()) {
            break;
        }
    }
    complete_call(uac, uas, &call);
}
