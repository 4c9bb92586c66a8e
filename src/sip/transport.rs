//! The IO shell around [`Proxy`]: UDP sockets, TCP listeners and connections, the one
//! timer, and the context look-ups. Everything SIP-shaped is decided in the core; this
//! module only moves bytes and answers the core's requests.
//!
//! One task owns the core. Sockets and look-ups feed it through a channel; it drains
//! [`Proxy::poll_output`] after every input and sleeps until [`Proxy::poll_timeout`].
//! A held call costs a map entry in the core and one small task awaiting its watch here,
//! so thousands can be held without blocking anything else.
//!
//! TLS is TCP with a rustls session in between: a `tls:` listener accepts TCP, runs the
//! handshake on the connection's own task, then hands the stream to the same reader and
//! writer tasks as TCP, with the same Content-Length framing, connection cap, idle
//! timeout and bounded write queue; an outgoing TLS connection is a TCP connect plus a
//! TLS client handshake (see [`crate::tls`] for certificate checks).
//! Every message in or out is counted (`precall_sip_messages_total`) from its first bytes.
//!
//! # What a hostile network can cost (README "Limits")
//! - TCP and TLS (one budget): at most `sip.max_tcp_connections` inbound connections (more
//!   are closed as soon as accepted; a TLS handshake in progress counts, and must finish
//!   within [`crate::tls::HANDSHAKE_TIMEOUT`] or `sip.tcp_idle_secs`, whichever is
//!   shorter); a connection with no complete message either way for `sip.tcp_idle_secs` is
//!   closed (trickled bytes do not count: slowloris); at most [`WRITE_QUEUE`] messages wait
//!   to be written to one connection (a peer that does not read is dropped); bytes that
//!   cannot be framed get a `400` when one can be addressed, then the connection closes.
//! - Out of file descriptors: `accept` fails; counted, logged at most every 10 s, retried
//!   after a pause, and everything else (UDP, calls in flight) goes on.
//! - UDP: a full receive buffer makes the kernel drop datagrams; the drops are read from
//!   `/proc/net/udp` and reported in the `stats` line. ICMP errors (port unreachable) are
//!   received through `IP_RECVERR` and become [`Proxy::handle_transport_error`], so a call
//!   to an upstream that is not listening gets `503` at once instead of `408` after Timer B.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::FutureExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::Agents;
use crate::config::{ListenAddr, SipLimits, Transport};
use crate::metrics::{self as observe, Direction};
use crate::store::{Claim, Contexts};

use super::parse::{self, ParseError};
use super::proxy::{
    ConnId, HoldId, HttpAnswer, HttpCall, HttpPurpose, Output, Peer, Proxy, Settled, Transmit,
};

/// A bound SIP socket, before the loop starts.
pub enum BoundSocket {
    Udp(Arc<UdpSocket>),
    Tcp(TcpListener),
    /// A TCP listener whose connections start with a TLS handshake.
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
}

/// Binds every `sip.listen` entry; logs `listening for SIP/UDP on ADDR` per socket.
/// `tls:` entries need [`bind_with_tls`].
///
/// # Errors
/// A socket could not be bound, or a `tls:` entry has no certificate.
pub async fn bind(listen: &[ListenAddr]) -> io::Result<Vec<(BoundSocket, SocketAddr)>> {
    bind_with_tls(listen, None).await
}

/// Like [`bind`], with the server config (`sip.tls_cert`/`tls_key`) for `tls:` entries.
///
/// # Errors
/// A socket could not be bound, or a `tls:` entry and no `tls` config.
pub async fn bind_with_tls(
    listen: &[ListenAddr],
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<Vec<(BoundSocket, SocketAddr)>> {
    let mut out = Vec::with_capacity(listen.len());
    for l in listen {
        match l.transport {
            Transport::Udp => {
                let std = bind_udp(l.addr)?;
                let sock = UdpSocket::from_std(std)?;
                let addr = sock.local_addr()?;
                info!("listening for SIP/UDP on {addr}");
                out.push((BoundSocket::Udp(Arc::new(sock)), addr));
            }
            Transport::Tcp => {
                let sock = TcpListener::bind(l.addr).await?;
                let addr = sock.local_addr()?;
                info!("listening for SIP/TCP on {addr}");
                out.push((BoundSocket::Tcp(sock), addr));
            }
            Transport::Tls => {
                let Some(config) = tls.clone() else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{l}: no TLS certificate (sip.tls_cert, sip.tls_key)"),
                    ));
                };
                let sock = TcpListener::bind(l.addr).await?;
                let addr = sock.local_addr()?;
                info!("listening for SIP/TLS on {addr}");
                out.push((
                    BoundSocket::Tls(sock, tokio_rustls::TlsAcceptor::from(config)),
                    addr,
                ));
            }
        }
    }
    Ok(out)
}

/// Socket buffer asked for on UDP listeners: a burst of INVITEs (a carrier failing over,
/// a SIPp ramp) must queue in the kernel rather than be dropped before the reader runs.
/// The kernel caps it at `net.core.rmem_max`/`wmem_max`; the size granted is logged.
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

fn bind_udp(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, it only drops sooner under bursts.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    if let Err(error) = recv_icmp_errors(&socket, addr) {
        debug!(%error, "IP_RECVERR not available: ICMP errors from upstreams go unseen");
    }
    debug!(
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket.into())
}

/// Asks the kernel to report ICMP errors (port/host unreachable) for datagrams sent from
/// this unconnected socket (Linux `IP_RECVERR`/`IPV6_RECVERR`, ip(7)): without it they are
/// silently discarded, and a call to an upstream that is down waits for Timer B.
#[cfg(target_os = "linux")]
fn recv_icmp_errors(socket: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = match addr {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_RECVERR),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd, a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn recv_icmp_errors(_socket: &socket2::Socket, _addr: SocketAddr) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "Linux only"))
}

/// Reads the socket's error queue (filled thanks to [`recv_icmp_errors`]): each entry's
/// address is where the datagram that failed was going, which becomes a transport error
/// for the calls waiting on that address.
#[cfg(target_os = "linux")]
async fn udp_errors(
    sock: Arc<UdpSocket>,
    tx: mpsc::Sender<Event>,
    stats: Arc<ShellStats>,
    shutdown: CancellationToken,
) {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 512];
    loop {
        let ready = tokio::select! {
            () = shutdown.cancelled() => return,
            r = sock.ready(tokio::io::Interest::ERROR) => r,
        };
        if ready.is_err() {
            return;
        }
        loop {
            let got = sock.try_io(tokio::io::Interest::ERROR, || {
                socket2::SockRef::from(&*sock).recv_from_with_flags(&mut buf, libc::MSG_ERRQUEUE)
            });
            match got {
                Ok((_, dest)) => {
                    let Some(to) = dest.as_socket() else { continue };
                    stats.icmp_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(%to, "ICMP error for a datagram sent to this address");
                    let ev = Event::TransportError {
                        transport: Transport::Udp,
                        to,
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    debug!(%error, "reading the UDP error queue failed");
                    break;
                }
            }
        }
    }
}

/// Datagrams the kernel dropped on this socket (receive buffer full), from the `drops`
/// column of `/proc/net/udp[6]` for the socket's inode. `None` where that is unavailable.
fn udp_kernel_drops(sock: &UdpSocket) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", sock.as_raw_fd())).ok()?;
        let link = link.to_string_lossy();
        let inode = link
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .to_string();
        let mut total = None;
        for table in ["/proc/net/udp", "/proc/net/udp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.get(9) == Some(&inode.as_str()) {
                    let drops: u64 = cols.get(12).and_then(|d| d.parse().ok())?;
                    total = Some(total.unwrap_or(0) + drops);
                }
            }
        }
        total
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock;
        None
    }
}

/// The address to advertise in Via/Record-Route for a socket bound to `bound`: itself,
/// or for `0.0.0.0`/`::` the local address the kernel would use towards `towards`.
pub fn advertised(bound: SocketAddr, towards: Option<SocketAddr>) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = towards
        .and_then(|dst| {
            let any: SocketAddr = if dst.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = StdUdpSocket::bind(any).ok()?;
            s.connect(dst).ok()?;
            s.local_addr().ok().map(|a| a.ip())
        })
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, bound.port())
}

enum Event {
    Datagram {
        listener: usize,
        from: SocketAddr,
        bytes: Bytes,
    },
    Stream {
        listener: usize,
        transport: Transport,
        conn: ConnId,
        from: SocketAddr,
        bytes: Bytes,
    },
    Context {
        hold: HoldId,
        ctx: crate::store::Context,
        how: Settled,
    },
    LookupFailed {
        hold: HoldId,
        reason: String,
    },
    Http {
        purpose: HttpPurpose,
        answer: HttpAnswer,
    },
    TransportError {
        transport: Transport,
        to: SocketAddr,
    },
    /// Close this TCP/TLS connection once what the core has just queued for it is written
    /// (after a `400` to unframeable bytes).
    CloseConn {
        conn: ConnId,
    },
}

/// How the shell is bounded (README "Limits"); [`ShellOptions::from_limits`] reads them
/// from `[sip]`.
#[derive(Debug, Clone)]
pub struct ShellOptions {
    /// Inbound TCP connections open at once.
    pub max_tcp_connections: usize,
    /// No complete message either way for this long: the connection is closed.
    pub tcp_idle: Duration,
    /// How often to log the `stats` line; `None`: never.
    pub stats_every: Option<Duration>,
}

impl Default for ShellOptions {
    fn default() -> Self {
        ShellOptions::from_limits(&SipLimits::default())
    }
}

impl ShellOptions {
    pub fn from_limits(limits: &SipLimits) -> ShellOptions {
        ShellOptions {
            max_tcp_connections: limits.max_tcp_connections,
            tcp_idle: limits.tcp_idle,
            stats_every: limits.stats_every,
        }
    }
}

/// Most messages waiting to be written to one TCP connection. A peer that stops reading
/// while sending (or while we answer it) is dropped past this, rather than growing a queue.
pub const WRITE_QUEUE: usize = 1024;

/// What the shell counted since start (for the `stats` line).
#[derive(Debug, Default)]
pub struct ShellStats {
    /// Inbound connections closed at once because `max_tcp_connections` were open.
    pub tcp_refused: AtomicU64,
    /// Connections closed by the idle timeout.
    pub tcp_idle_closed: AtomicU64,
    /// Connections dropped because their write queue was full.
    pub tcp_write_overflow: AtomicU64,
    /// Connections closed because their bytes could not be framed.
    pub tcp_unframeable: AtomicU64,
    /// `accept` failures (out of file descriptors, ...).
    pub accept_errors: AtomicU64,
    /// ICMP errors received for datagrams we sent.
    pub icmp_errors: AtomicU64,
}

/// Upper bound on an HTTP answer's body (look-ups): past it the answer counts as failed.
const HTTP_BODY_MAX: usize = 64 * 1024;

/// Outgoing HTTP for deliveries and look-ups: one shared client, a concurrency bound,
/// every call with its own timeout. Never awaited by the SIP loop.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    slots: Arc<tokio::sync::Semaphore>,
}

impl HttpClient {
    pub fn new(concurrency: usize) -> HttpClient {
        HttpClient {
            client: reqwest::Client::builder()
                .user_agent(concat!("precall/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_default(),
            slots: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
        }
    }

    fn spawn(&self, call: HttpCall, tx: mpsc::Sender<Event>) {
        let this = self.clone();
        tokio::spawn(async move {
            let answer = this.post(&call).await;
            let _ = tx
                .send(Event::Http {
                    purpose: call.purpose,
                    answer,
                })
                .await;
        });
    }

    async fn post(&self, call: &HttpCall) -> HttpAnswer {
        // No slot free: the call is not worth queueing behind others (a look-up answers
        // "nothing", a delivery counts as failed), so nothing waits unboundedly.
        let Ok(_permit) = self.slots.try_acquire() else {
            return HttpAnswer::Failed("too many outgoing HTTP calls".to_string());
        };
        let request = self
            .client
            .post(&call.url)
            .header("content-type", "application/json")
            .timeout(call.timeout)
            .body(call.body.clone());
        let work = async {
            let mut response = request.send().await.map_err(|e| e.to_string())?;
            let code = response.status().as_u16();
            if response
                .content_length()
                .is_some_and(|n| n > HTTP_BODY_MAX as u64)
            {
                return Err(format!("answer body over {HTTP_BODY_MAX} bytes"));
            }
            let mut body = BytesMut::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
                if body.len() + chunk.len() > HTTP_BODY_MAX {
                    return Err(format!("answer body over {HTTP_BODY_MAX} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(HttpAnswer::Status {
                code,
                body: body.freeze(),
            })
        };
        match tokio::time::timeout(call.timeout, work).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(reason)) => HttpAnswer::Failed(reason),
            Err(_) => HttpAnswer::Failed("timed out".to_string()),
        }
    }
}

/// Open TCP and TLS connections: by id (for responses on the connection a request came in
/// on) and by transport and remote address (to reuse a connection for a new request).
#[derive(Default)]
struct Connections {
    next: AtomicU64,
    by_id: DashMap<ConnId, ConnHandle>,
    by_addr: DashMap<(Transport, SocketAddr), ConnId>,
    /// Inbound (accepted) connections open now.
    inbound: AtomicUsize,
    stats: Arc<ShellStats>,
}

/// What the rest of the shell holds of one connection.
#[derive(Clone)]
struct ConnHandle {
    tx: mpsc::Sender<Bytes>,
    /// Cancel to close the connection (its reader stops; the writer ends once the queue
    /// is drained and every sender is gone).
    close: CancellationToken,
}

impl Connections {
    /// Queues `bytes` on connection `id`; a full queue closes the connection.
    fn send(&self, id: ConnId, bytes: Bytes) {
        let Some(handle) = self.by_id.get(&id).map(|h| h.clone()) else {
            return;
        };
        match handle.tx.try_send(bytes) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats
                    .tcp_write_overflow
                    .fetch_add(1, Ordering::Relaxed);
                warn!(conn = id, "closing a connection whose peer does not read");
                self.forget(id);
                handle.close.cancel();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.forget(id),
        }
    }

    /// Removes `id` from the maps (its tasks end on their own).
    fn forget(&self, id: ConnId) {
        if let Some((_, handle)) = self.by_id.remove(&id) {
            handle.close.cancel();
        }
        self.by_addr.retain(|_, v| *v != id);
    }
}

/// What outgoing TLS connections need: the client config (bundled roots plus
/// `sip.tls_ca`) and the name to check per address (the configured upstream's host).
/// Rebuilt from the config at start and on every reload.
#[derive(Clone)]
struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    names: Arc<HashMap<SocketAddr, ServerName<'static>>>,
}

impl TlsClient {
    fn from_agents(agents: &Agents) -> Option<TlsClient> {
        let config = &agents.config;
        let client = match crate::tls::client_config(config.sip.tls.ca.as_deref()) {
            Ok(client) => client,
            Err(error) => {
                warn!(%error, "no TLS client config: TLS upstreams cannot be reached");
                return None;
            }
        };
        let mut names = HashMap::new();
        let route_upstreams = config.agents.iter().flat_map(|a| {
            a.routes.iter().flat_map(|r| match &r.target {
                crate::config::RouteTarget::Upstreams(list) => list.as_slice(),
                _ => &[],
            })
        });
        for up in config
            .agents
            .iter()
            .flat_map(|a| a.upstreams.iter())
            .chain(route_upstreams)
            .filter(|u| u.transport == Transport::Tls)
        {
            if let Ok(name) = ServerName::try_from(up.host().to_string()) {
                names.entry(up.addr).or_insert(name);
            }
        }
        Some(TlsClient {
            connector: tokio_rustls::TlsConnector::from(client),
            names: Arc::new(names),
        })
    }

    /// The name checked for a connection to `to`: the configured host, else the address.
    fn name_for(&self, to: SocketAddr) -> ServerName<'static> {
        self.names
            .get(&to)
            .cloned()
            .unwrap_or_else(|| ServerName::IpAddress(to.ip().into()))
    }
}

/// Upper bound on bytes buffered for one TCP connection before it is dropped.
const TCP_READ_CHUNK: usize = 16 * 1024;

/// What the rest of the process tells the SIP loop.
pub enum Control {
    /// A reloaded config: new calls use these agents; calls in flight keep theirs.
    Reload(Arc<Agents>),
}

/// How the SIP loop stops.
pub struct Stop {
    /// Cancelled on SIGTERM/SIGINT: drain (no new calls; held ones finish).
    pub drain: CancellationToken,
    /// Cancelled on a second signal: stop at once.
    pub now: CancellationToken,
    /// Upper bound on the drain (`sip.drain_secs`).
    pub drain_for: Duration,
}

/// Runs the SIP side until it has drained after `stop.drain`, or `stop.now`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut proxy: Proxy,
    sockets: Vec<(BoundSocket, SocketAddr)>,
    contexts: Arc<Contexts>,
    max_message_bytes: usize,
    http: HttpClient,
    mut control: mpsc::Receiver<Control>,
    stop: Stop,
    options: ShellOptions,
) {
    // The sockets stay open through the drain (responses, in-dialog requests) and close
    // when this function returns.
    let io_stop = CancellationToken::new();
    let _io_guard = io_stop.clone().drop_guard();
    let shutdown = io_stop.clone();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let (tx, mut rx) = mpsc::channel::<Event>(65_536);
    proxy.start(tokio::time::Instant::now().into_std());
    let conns = Arc::new(Connections::default());
    let stream = StreamOptions {
        max_message_bytes,
        idle: options.tcp_idle,
    };
    let mut udp: HashMap<usize, Arc<UdpSocket>> = HashMap::new();
    let mut tls_client = TlsClient::from_agents(proxy.agents());
    for (index, (sock, _)) in sockets.into_iter().enumerate() {
        match sock {
            BoundSocket::Udp(s) => {
                udp.insert(index, Arc::clone(&s));
                #[cfg(target_os = "linux")]
                tokio::spawn(udp_errors(
                    Arc::clone(&s),
                    tx.clone(),
                    Arc::clone(&conns.stats),
                    shutdown.child_token(),
                ));
                tokio::spawn(udp_reader(index, s, tx.clone(), shutdown.child_token()));
            }
            BoundSocket::Tcp(l) => {
                tokio::spawn(tcp_acceptor(
                    index,
                    l,
                    None,
                    Arc::clone(&conns),
                    tx.clone(),
                    stream,
                    options.max_tcp_connections,
                    shutdown.child_token(),
                ));
            }
            BoundSocket::Tls(l, acceptor) => {
                tokio::spawn(tcp_acceptor(
                    index,
                    l,
                    Some(acceptor),
                    Arc::clone(&conns),
                    tx.clone(),
                    stream,
                    options.max_tcp_connections,
                    shutdown.child_token(),
                ));
            }
        }
    }
    let mut stats_tick = options.stats_every.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut reported_drops: u64 = 0;
    let mut to_close: Vec<ConnId> = Vec::new();
    let mut waiting: HashMap<HoldId, AbortHandle> = HashMap::new();
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut immediate: VecDeque<Event> = VecDeque::new();
    loop {
        match proxy.poll_timeout() {
            Some(at) => sleep.as_mut().reset(tokio::time::Instant::from_std(at)),
            None => sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + Duration::from_secs(3600)),
        }
        let drain_at = drain_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            () = stop.now.cancelled() => {
                warn!(pending = proxy.pending_calls(), "stopping at once");
                break;
            }
            () = stop.drain.cancelled(), if drain_deadline.is_none() => {
                proxy.start_drain();
                drain_deadline = Some(tokio::time::Instant::now() + stop.drain_for);
                info!(pending = proxy.pending_calls(), drain_secs = stop.drain_for.as_secs(), "draining: new calls get 503");
            }
            () = tokio::time::sleep_until(drain_at), if drain_deadline.is_some() => {
                warn!(pending = proxy.pending_calls(), "drain time ran out");
                break;
            }
            Some(Control::Reload(agents)) = control.recv() => {
                tls_client = TlsClient::from_agents(&agents).or(tls_client);
                proxy.set_agents(tokio::time::Instant::now().into_std(), agents);
                info!("SIP side uses the reloaded config");
            }
            () = &mut sleep => {
                proxy.handle_timeout(tokio::time::Instant::now().into_std());
            }
            _ = tick(&mut stats_tick) => {
                log_stats(&proxy, &contexts, &conns, &udp, &mut reported_drops);
            }
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                immediate.push_back(ev);
            }
        }
        let mut batch = 0;
        // Handle what arrived, then drain what the core wants done; look-ups answered
        // synchronously (memory store hits) loop back through `immediate`.
        loop {
            while let Some(ev) = immediate.pop_front() {
                let now = tokio::time::Instant::now().into_std();
                match ev {
                    Event::Datagram {
                        listener,
                        from,
                        bytes,
                    } => {
                        let peer = Peer {
                            transport: Transport::Udp,
                            addr: from,
                            conn: None,
                            listener,
                        };
                        proxy.handle_datagram(now, peer, bytes);
                    }
                    Event::Stream {
                        listener,
                        transport,
                        conn,
                        from,
                        bytes,
                    } => {
                        let peer = Peer {
                            transport,
                            addr: from,
                            conn: Some(conn),
                            listener,
                        };
                        proxy.handle_stream_message(now, peer, bytes);
                    }
                    Event::Context { hold, ctx, how } => {
                        waiting.remove(&hold);
                        proxy.handle_context(now, hold, ctx, how);
                    }
                    Event::LookupFailed { hold, reason } => {
                        waiting.remove(&hold);
                        proxy.handle_lookup_failed(now, hold, &reason);
                    }
                    Event::Http { purpose, answer } => {
                        proxy.handle_http_response(now, purpose, answer)
                    }
                    Event::TransportError { transport, to } => {
                        proxy.handle_transport_error(now, transport, to)
                    }
                    // After the outputs below: the 400 must be queued first.
                    Event::CloseConn { conn } => to_close.push(conn),
                }
                // Take what else is already queued without going back to select!, a
                // bounded batch so timers are not starved under load.
                batch += 1;
                if immediate.is_empty() && batch < 64 {
                    if let Ok(ev) = rx.try_recv() {
                        immediate.push_back(ev);
                    }
                }
            }
            while let Some(out) = proxy.poll_output() {
                match out {
                    Output::Transmit(t) => {
                        transmit(&udp, &conns, tls_client.as_ref(), &tx, t, stream)
                    }
                    Output::Lookup { hold, key } => {
                        let contexts2 = Arc::clone(&contexts);
                        let claim = async move { contexts2.claim(&key).await };
                        let mut claim = Box::pin(claim);
                        match (&mut claim).now_or_never() {
                            Some(Ok(Claim::Hit(ctx))) => {
                                immediate.push_back(Event::Context {
                                    hold,
                                    ctx,
                                    how: Settled::Cached,
                                });
                            }
                            Some(Ok(Claim::Pending(watch))) => {
                                let tx = tx.clone();
                                let task = tokio::spawn(async move {
                                    let ctx = watch.await;
                                    let _ = tx
                                        .send(Event::Context {
                                            hold,
                                            ctx,
                                            how: Settled::Posted,
                                        })
                                        .await;
                                });
                                waiting.insert(hold, task.abort_handle());
                            }
                            Some(Err(e)) => {
                                immediate.push_back(Event::LookupFailed {
                                    hold,
                                    reason: e.to_string(),
                                });
                            }
                            None => {
                                let tx = tx.clone();
                                let task = tokio::spawn(async move {
                                    let ev = match claim.await {
                                        Ok(Claim::Hit(ctx)) => Event::Context {
                                            hold,
                                            ctx,
                                            how: Settled::Cached,
                                        },
                                        Ok(Claim::Pending(watch)) => {
                                            let ctx = watch.await;
                                            Event::Context {
                                                hold,
                                                ctx,
                                                how: Settled::Posted,
                                            }
                                        }
                                        Err(e) => Event::LookupFailed {
                                            hold,
                                            reason: e.to_string(),
                                        },
                                    };
                                    let _ = tx.send(ev).await;
                                });
                                waiting.insert(hold, task.abort_handle());
                            }
                        }
                    }
                    Output::CancelLookup { hold } => {
                        if let Some(task) = waiting.remove(&hold) {
                            task.abort();
                        }
                    }
                    Output::Http(call) => http.spawn(call, tx.clone()),
                    Output::Restore { key, ctx } => {
                        let contexts = Arc::clone(&contexts);
                        tokio::spawn(async move {
                            if let Err(error) = contexts.restore(&key, ctx).await {
                                warn!(%error, %key, "could not put back an unused context");
                            }
                        });
                    }
                }
            }
            for conn in to_close.drain(..) {
                // Dropping the handle lets the writer finish the queue, then close.
                conns.by_id.remove(&conn);
                conns.by_addr.retain(|_, v| *v != conn);
            }
            if immediate.is_empty() {
                break;
            }
        }
        if drain_deadline.is_some() && proxy.pending_calls() == 0 {
            info!("drained: every call has its outcome");
            break;
        }
    }
    for (_, task) in waiting {
        task.abort();
    }
}

/// The next tick of the stats interval; never, when there is none.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The periodic `stats` line: what is held and in memory now, and what was refused or
/// dropped since start. The soak test (`scripts/soak.sh`) reads it.
fn log_stats(
    proxy: &Proxy,
    contexts: &Contexts,
    conns: &Connections,
    udp: &HashMap<usize, Arc<UdpSocket>>,
    reported_drops: &mut u64,
) {
    let core = proxy.stats();
    let guard = proxy.guard_stats();
    let shell = &conns.stats;
    let udp_drops: u64 = udp.values().filter_map(|s| udp_kernel_drops(s)).sum();
    if udp_drops > *reported_drops {
        warn!(
            dropped = udp_drops - *reported_drops,
            "the kernel dropped UDP datagrams: receive buffer full"
        );
        *reported_drops = udp_drops;
    }
    let stored = contexts
        .store
        .len_now()
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    info!(
        held = core.held_now,
        calls = proxy.calls_in_memory(),
        waiting = contexts.waiting(),
        contexts = stored,
        tcp = conns.by_id.len(),
        tcp_inbound = conns.inbound.load(Ordering::Relaxed),
        parse_errors = core.parse_errors,
        dropped = core.dropped,
        scanners = guard.scanners_dropped,
        peers_refused = guard.peers_refused,
        rate_limited = guard.rate_limited,
        capacity_refused = guard.capacity_refused,
        relay_refused = guard.relay_refused,
        out_of_dialog = guard.out_of_dialog_refused,
        udp_drops,
        tcp_refused = load(&shell.tcp_refused),
        tcp_idle_closed = load(&shell.tcp_idle_closed),
        tcp_write_overflow = load(&shell.tcp_write_overflow),
        tcp_unframeable = load(&shell.tcp_unframeable),
        accept_errors = load(&shell.accept_errors),
        icmp_errors = load(&shell.icmp_errors),
        "stats"
    );
}

/// Per-connection stream settings.
#[derive(Debug, Clone, Copy)]
struct StreamOptions {
    max_message_bytes: usize,
    idle: Duration,
}

fn transmit(
    udp: &HashMap<usize, Arc<UdpSocket>>,
    conns: &Arc<Connections>,
    tls: Option<&TlsClient>,
    tx: &mpsc::Sender<Event>,
    t: Transmit,
    stream: StreamOptions,
) {
    observe::count_sip(Direction::Out, &t.bytes);
    if t.transport == Transport::Udp {
        let sock = udp.get(&t.listener).or_else(|| udp.values().next());
        let Some(sock) = sock else {
            warn!(to = %t.to, "no UDP socket to send from");
            return;
        };
        let sent = match sock.try_send_to(&t.bytes, t.to) {
            Err(e) if reports_earlier_error(&e) => sock.try_send_to(&t.bytes, t.to),
            sent => sent,
        };
        match sent {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let sock = Arc::clone(sock);
                tokio::spawn(async move {
                    let sent = match sock.send_to(&t.bytes, t.to).await {
                        Err(e) if reports_earlier_error(&e) => sock.send_to(&t.bytes, t.to).await,
                        sent => sent,
                    };
                    if let Err(error) = sent {
                        debug!(%error, to = %t.to, "UDP send failed");
                    }
                });
            }
            Err(error) => debug!(%error, to = %t.to, "UDP send failed"),
        }
        return;
    }
    // TCP and TLS: the connection the request came on, else one open to that address.
    // A TLS connection also carries what is addressed as TCP (a relayed response whose
    // Via says TCP goes back on the connection it came from, RFC 3261 §18.2.2), never
    // the other way round: TLS traffic is not downgraded to a plain connection.
    let conn = t
        .conn
        .filter(|c| conns.by_id.contains_key(c))
        .or_else(|| conns.by_addr.get(&(t.transport, t.to)).map(|c| *c))
        .or_else(|| {
            (t.transport == Transport::Tcp)
                .then(|| conns.by_addr.get(&(Transport::Tls, t.to)).map(|c| *c))
                .flatten()
        });
    if let Some(conn) = conn {
        conns.send(conn, t.bytes);
        return;
    }
    // No connection to that address yet: open one; it also reads what comes back.
    let tls = match (t.transport, tls) {
        (Transport::Tls, Some(tls)) => Some(tls.clone()),
        (Transport::Tls, None) => {
            warn!(to = %t.to, "no TLS client config: cannot reach a TLS peer");
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx
                    .send(Event::TransportError {
                        transport: Transport::Tls,
                        to: t.to,
                    })
                    .await;
            });
            return;
        }
        _ => None,
    };
    let conns = Arc::clone(conns);
    let tx = tx.clone();
    tokio::spawn(async move {
        let transport = t.transport;
        let failed = |error: String| {
            warn!(%error, to = %t.to, transport = transport.param_name(), "connect failed");
            Event::TransportError {
                transport,
                to: t.to,
            }
        };
        let socket = match TcpStream::connect(t.to).await {
            Ok(socket) => socket,
            Err(error) => {
                let _ = tx.send(failed(error.to_string())).await;
                return;
            }
        };
        let _ = socket.set_nodelay(true);
        let id = match tls {
            None => {
                let (reader, writer) = socket.into_split();
                let wire = Wire {
                    transport,
                    peer: t.to,
                    listener: t.listener,
                    slot: None,
                };
                register(&conns, reader, writer, wire, tx, stream)
            }
            Some(tls) => {
                let name = tls.name_for(t.to);
                let handshake = tls.connector.connect(name, socket);
                let tls_stream =
                    match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(error)) => {
                            let _ = tx.send(failed(format!("TLS: {error}"))).await;
                            return;
                        }
                        Err(_) => {
                            let _ = tx.send(failed("TLS handshake timed out".into())).await;
                            return;
                        }
                    };
                let (reader, writer) = tokio::io::split(tls_stream);
                let wire = Wire {
                    transport,
                    peer: t.to,
                    listener: t.listener,
                    slot: None,
                };
                register(&conns, reader, writer, wire, tx, stream)
            }
        };
        debug!(conn = id, to = %t.to, transport = transport.param_name(), "opened connection");
        conns.send(id, t.bytes);
    });
}

/// Whether a failed UDP send may only have reported an ICMP error for an earlier datagram
/// (to another peer): Linux hands a pending socket error to the next send (`sock_error`),
/// which fails without sending and clears it, so the datagram is sent once more.
fn reports_earlier_error(error: &io::Error) -> bool {
    let earlier = matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    );
    if earlier {
        debug!(%error, "a UDP send reported an earlier ICMP error; sending again");
    }
    earlier
}

async fn udp_reader(
    listener: usize,
    sock: Arc<UdpSocket>,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            r = recv_datagram(&sock, &mut buf) => r,
        };
        match received {
            Ok((n, from)) => {
                let Some(data) = buf.get(..n) else { continue };
                // Keep-alives (CRLF or empty) need no work.
                if data
                    .iter()
                    .all(|b| matches!(b, b'\r' | b'\n' | b' ' | b'\0'))
                {
                    continue;
                }
                observe::count_sip(Direction::In, data);
                let bytes = Bytes::copy_from_slice(data);
                if tx
                    .send(Event::Datagram {
                        listener,
                        from,
                        bytes,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // ICMP port unreachable and the like surface here on some platforms: keep going.
            Err(error) => debug!(%error, "UDP receive error"),
        }
    }
}

/// The next datagram on `sock`. Waits for readable readiness only: tokio's
/// `UdpSocket::recv_from` also wakes on error readiness and clears it when the read then
/// finds nothing, which races [`udp_errors`] for the same readiness: an ICMP error left in
/// the error queue was then not read until the next one arrived, and the call it was for
/// waited for Timer B.
async fn recv_datagram(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    loop {
        sock.readable().await?;
        match sock.try_recv_from(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            received => return received,
        }
    }
}

/// At most one `warn` line per this long for a repeating failure (accept errors, refused
/// connections): a flood must not flood the log too. The counts are in the `stats` line.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether `last` (the time of the last warning) is old enough to warn again.
fn warn_due(last: &Mutex<Option<Instant>>) -> bool {
    let mut last = last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    let due = last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
    if due {
        *last = Some(now);
    }
    due
}

/// Accepts TCP connections (with a TLS handshake first when `tls` is set), at most
/// `max_connections` at once: a TLS connection takes its slot before the handshake, so
/// clients that never finish one cannot get around the cap.
#[allow(clippy::too_many_arguments)]
async fn tcp_acceptor(
    listener: usize,
    sock: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: Arc<Connections>,
    tx: mpsc::Sender<Event>,
    stream: StreamOptions,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let transport = if tls.is_some() {
        Transport::Tls
    } else {
        Transport::Tcp
    };
    let (warned_full, warned_error) = (Mutex::new(None), Mutex::new(None));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = sock.accept() => r,
        };
        match accepted {
            Ok((socket, from)) => {
                if conns.inbound.load(Ordering::Relaxed) >= max_connections {
                    // Closed at once (dropped): the peer sees the connection end.
                    conns.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                    if warn_due(&warned_full) {
                        warn!(peer = %from, max_connections, transport = transport.param_name(), "too many connections; closing new ones");
                    }
                    continue;
                }
                let _ = socket.set_nodelay(true);
                let wire = Wire {
                    transport,
                    peer: from,
                    listener,
                    slot: Some(InboundSlot::take(&conns)),
                };
                let Some(acceptor) = &tls else {
                    let (reader, writer) = socket.into_split();
                    let id = register(&conns, reader, writer, wire, tx.clone(), stream);
                    debug!(conn = id, peer = %from, "accepted TCP connection");
                    continue;
                };
                // The handshake runs on its own task: a slow or silent client never holds
                // up the next accept. It holds its slot (given back on failure) for the
                // handshake timeout at most, or `tcp_idle_secs` when that is shorter, so
                // a silent TLS client lasts no longer than a silent TCP one.
                let handshake = acceptor.accept(socket);
                let conns = Arc::clone(&conns);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let limit = crate::tls::HANDSHAKE_TIMEOUT.min(stream.idle);
                    let stream_tls = match tokio::time::timeout(limit, handshake).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(error)) => {
                            debug!(%error, peer = %from, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(peer = %from, "TLS handshake timed out");
                            return;
                        }
                    };
                    let (reader, writer) = tokio::io::split(stream_tls);
                    let id = register(&conns, reader, writer, wire, tx, stream);
                    debug!(conn = id, peer = %from, "accepted TLS connection");
                });
            }
            Err(error) => {
                // Out of file descriptors (EMFILE/ENFILE) and the like: the pending
                // connection stays in the backlog. Back off rather than spin; UDP and the
                // calls in flight are unaffected.
                conns.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if warn_due(&warned_error) {
                    warn!(%error, "TCP accept failed; retrying shortly");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One of the `max_tcp_connections` inbound slots: taken at accept (before any TLS
/// handshake), given back when dropped (the connection closed, or its handshake failed).
struct InboundSlot(Arc<Connections>);

impl InboundSlot {
    fn take(conns: &Arc<Connections>) -> InboundSlot {
        conns.inbound.fetch_add(1, Ordering::Relaxed);
        InboundSlot(Arc::clone(conns))
    }
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        self.0.inbound.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who is at the other end of a connection and how it is reached.
struct Wire {
    /// `Tcp` or `Tls`: what the messages read from it are marked with, and the key it is
    /// found under for reuse.
    transport: Transport,
    peer: SocketAddr,
    /// The listener its messages count as received on.
    listener: usize,
    /// Held while an inbound connection is open; `None` for the ones we open.
    slot: Option<InboundSlot>,
}

/// Registers a connection (TCP, or TLS after its handshake) and starts its reader and
/// writer tasks; returns its id. Both kinds get the same framing, idle timeout and
/// bounded write queue.
fn register<R, W>(
    conns: &Arc<Connections>,
    mut reader: R,
    mut writer: W,
    wire: Wire,
    tx: mpsc::Sender<Event>,
    opts: StreamOptions,
) -> ConnId
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Wire {
        transport,
        peer,
        listener,
        slot,
    } = wire;
    let id = conns.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let close = CancellationToken::new();
    conns.by_id.insert(
        id,
        ConnHandle {
            tx: out_tx,
            close: close.clone(),
        },
    );
    conns.by_addr.insert((transport, peer), id);
    let started = Instant::now();
    // Milliseconds since `started` of the last complete message read or written: the
    // idle timer counts from it.
    let progress = Arc::new(AtomicU64::new(0));
    let since = move |at: Instant| {
        u64::try_from(at.duration_since(started).as_millis()).unwrap_or(u64::MAX)
    };
    let writer_progress = Arc::clone(&progress);
    let writer_close = close.clone();
    let writer_tx = tx.clone();
    tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            // A TLS writer buffers records until flushed; for TCP the flush is a no-op.
            let written = match writer.write_all(&bytes).await {
                Ok(()) => writer.flush().await,
                Err(error) => Err(error),
            };
            if let Err(error) = written {
                debug!(%error, conn = id, "write failed");
                // A reset connection: calls waiting on this peer fail over or get 503.
                let _ = writer_tx
                    .send(Event::TransportError {
                        transport,
                        to: peer,
                    })
                    .await;
                writer_close.cancel();
                break;
            }
            writer_progress.fetch_max(since(Instant::now()), Ordering::Relaxed);
        }
        // Every sender is gone (the connection was forgotten) or writing failed.
        let _ = writer.shutdown().await;
    });
    let conns = Arc::clone(conns);
    tokio::spawn(async move {
        // Given back when this task ends, whichever way.
        let _slot = slot;
        let mut buf = BytesMut::with_capacity(TCP_READ_CHUNK);
        'conn: loop {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(TCP_READ_CHUNK);
            }
            let last = Duration::from_millis(progress.load(Ordering::Relaxed));
            let deadline = tokio::time::Instant::from_std(started + last + opts.idle);
            let read = tokio::select! {
                () = close.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => {
                    let last = Duration::from_millis(progress.load(Ordering::Relaxed));
                    if started + last + opts.idle <= Instant::now() {
                        conns.stats.tcp_idle_closed.fetch_add(1, Ordering::Relaxed);
                        debug!(conn = id, peer = %peer, "closing idle connection");
                        break;
                    }
                    continue; // something was written meanwhile
                }
                r = reader.read_buf(&mut buf) => r,
            };
            match read {
                Ok(0) => break,
                Err(error) => {
                    if error.kind() == io::ErrorKind::ConnectionReset {
                        let _ = tx
                            .send(Event::TransportError {
                                transport,
                                to: peer,
                            })
                            .await;
                    }
                    break;
                }
                Ok(_) => {}
            }
            loop {
                match parse::frame_stream(&buf, opts.max_message_bytes) {
                    Ok(frame) => {
                        let _ = buf.split_to(frame.skip);
                        let bytes = buf.split_to(frame.len).freeze();
                        progress.fetch_max(since(Instant::now()), Ordering::Relaxed);
                        observe::count_sip(Direction::In, &bytes);
                        if tx
                            .send(Event::Stream {
                                listener,
                                transport,
                                conn: id,
                                from: peer,
                                bytes,
                            })
                            .await
                            .is_err()
                        {
                            break 'conn;
                        }
                    }
                    Err(ParseError::Incomplete) => {
                        // only keep-alive CRLFs so far: drop them (RFC 5626 pings keep
                        // a connection alive)
                        if buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                            if !buf.is_empty() {
                                progress.fetch_max(since(Instant::now()), Ordering::Relaxed);
                            }
                            buf.clear();
                        }
                        break;
                    }
                    Err(error) => {
                        // Framing is lost: nothing after this can be trusted. Let the core
                        // answer 400 when it can address one (it counts the parse error),
                        // then close once that is sent.
                        conns.stats.tcp_unframeable.fetch_add(1, Ordering::Relaxed);
                        debug!(%error, peer = %peer, "closing connection with unframeable data");
                        let end = buf.len().min(opts.max_message_bytes);
                        let bytes = buf.split_to(end).freeze();
                        observe::count_sip(Direction::In, &bytes);
                        let _ = tx
                            .send(Event::Stream {
                                listener,
                                transport,
                                conn: id,
                                from: peer,
                                bytes,
                            })
                            .await;
                        let _ = tx.send(Event::CloseConn { conn: id }).await;
                        debug!(conn = id, "connection closing after unframeable data");
                        return;
                    }
                }
            }
        }
        conns.forget(id);
        debug!(conn = id, "connection closed");
    });
    id
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A port nobody listens on (it was bound a moment ago and released).
    fn closed_udp_port() -> SocketAddr {
        StdUdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_icmp_port_unreachable_becomes_a_transport_error() {
        let sock = Arc::new(
            UdpSocket::from_std(bind_udp("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap(),
        );
        let (tx, mut rx) = mpsc::channel(16);
        let stats = Arc::new(ShellStats::default());
        let stop = CancellationToken::new();
        tokio::spawn(udp_errors(
            Arc::clone(&sock),
            tx.clone(),
            Arc::clone(&stats),
            stop.child_token(),
        ));
        tokio::spawn(udp_reader(0, Arc::clone(&sock), tx, stop.child_token()));
        for i in 0..100 {
            let closed = closed_udp_port();
            let _ = sock.send_to(b"INVITE", closed).await;
            let ev = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
            match ev {
                Ok(Some(Event::TransportError { transport, to })) => {
                    assert_eq!((transport, to), (Transport::Udp, closed), "datagram {i}");
                }
                Ok(Some(_)) => panic!("datagram {i}: another event"),
                Ok(None) | Err(_) => panic!("datagram {i}: no transport error within 1 s"),
            }
        }
        assert_eq!(stats.icmp_errors.load(Ordering::Relaxed), 100);
        stop.cancel();
    }

    fn udp(to: SocketAddr, bytes: Bytes) -> Transmit {
        Transmit {
            transport: Transport::Udp,
            to,
            conn: None,
            listener: 0,
            bytes,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_right_after_an_icmp_error_still_goes_out() {
        // Nothing reads the error queue here, so the ICMP error of each datagram to the
        // closed port is still pending on the socket when the next send is made.
        let sock = Arc::new(
            UdpSocket::from_std(bind_udp("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap(),
        );
        let peer = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let udp = HashMap::from([(0, Arc::clone(&sock))]);
        let conns = Arc::new(Connections::default());
        let (tx, _rx) = mpsc::channel(16);
        let stream = StreamOptions {
            max_message_bytes: 65_535,
            idle: Duration::from_secs(60),
        };
        for i in 0..20 {
            let closed = closed_udp_port();
            transmit(&udp, &conns, None, &tx, udp_to(closed, "OPTIONS"), stream);
            let text = format!("ping {i}");
            let to_peer = udp_to(peer.local_addr().unwrap(), &text);
            transmit(&udp, &conns, None, &tx, to_peer, stream);
            let mut buf = [0u8; 64];
            let (n, _) = peer
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} never arrived: {e}"));
            assert_eq!(&buf[..n], text.as_bytes());
        }
    }

    fn udp_to(to: SocketAddr, text: &str) -> Transmit {
        udp(to, Bytes::copy_from_slice(text.as_bytes()))
    }
}
