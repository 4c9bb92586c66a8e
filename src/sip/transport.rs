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
//! writer tasks and Content-Length framing as TCP; an outgoing TLS connection is a TCP
//! connect plus a TLS client handshake (see [`crate::tls`] for certificate checks).
//! Every message in or out is counted (`precall_sip_messages_total`) from its first bytes.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
use crate::config::{ListenAddr, Transport};
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
    debug!(
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket.into())
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
    by_id: DashMap<ConnId, mpsc::UnboundedSender<Bytes>>,
    by_addr: DashMap<(Transport, SocketAddr), ConnId>,
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
pub async fn run(
    mut proxy: Proxy,
    sockets: Vec<(BoundSocket, SocketAddr)>,
    contexts: Arc<Contexts>,
    max_message_bytes: usize,
    http: HttpClient,
    mut control: mpsc::Receiver<Control>,
    stop: Stop,
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
    let mut udp: HashMap<usize, Arc<UdpSocket>> = HashMap::new();
    let mut tls_client = TlsClient::from_agents(proxy.agents());
    for (index, (sock, _)) in sockets.into_iter().enumerate() {
        match sock {
            BoundSocket::Udp(s) => {
                udp.insert(index, Arc::clone(&s));
                tokio::spawn(udp_reader(index, s, tx.clone(), shutdown.child_token()));
            }
            BoundSocket::Tcp(l) => {
                tokio::spawn(tcp_acceptor(
                    index,
                    l,
                    None,
                    Arc::clone(&conns),
                    tx.clone(),
                    max_message_bytes,
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
                    max_message_bytes,
                    shutdown.child_token(),
                ));
            }
        }
    }

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
                        transmit(&udp, &conns, tls_client.as_ref(), &tx, t, max_message_bytes)
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

fn transmit(
    udp: &HashMap<usize, Arc<UdpSocket>>,
    conns: &Arc<Connections>,
    tls: Option<&TlsClient>,
    tx: &mpsc::Sender<Event>,
    t: Transmit,
    max_message_bytes: usize,
) {
    observe::count_sip(Direction::Out, &t.bytes);
    if t.transport == Transport::Udp {
        let sock = udp.get(&t.listener).or_else(|| udp.values().next());
        let Some(sock) = sock else {
            warn!(to = %t.to, "no UDP socket to send from");
            return;
        };
        match sock.try_send_to(&t.bytes, t.to) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let sock = Arc::clone(sock);
                tokio::spawn(async move {
                    if let Err(error) = sock.send_to(&t.bytes, t.to).await {
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
    if let Some(sender) = conn.and_then(|c| conns.by_id.get(&c)) {
        let _ = sender.send(t.bytes);
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
        let stream = match TcpStream::connect(t.to).await {
            Ok(stream) => stream,
            Err(error) => {
                let _ = tx.send(failed(error.to_string())).await;
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let sender = match tls {
            None => {
                let (reader, writer) = stream.into_split();
                let (_, sender) = register(
                    &conns,
                    reader,
                    writer,
                    transport,
                    t.to,
                    t.listener,
                    tx,
                    max_message_bytes,
                );
                sender
            }
            Some(tls) => {
                let name = tls.name_for(t.to);
                let handshake = tls.connector.connect(name, stream);
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
                let (_, sender) = register(
                    &conns,
                    reader,
                    writer,
                    transport,
                    t.to,
                    t.listener,
                    tx,
                    max_message_bytes,
                );
                sender
            }
        };
        debug!(to = %t.to, transport = transport.param_name(), "opened connection");
        let _ = sender.send(t.bytes);
    });
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
            r = sock.recv_from(&mut buf) => r,
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

/// Accepts TCP connections (with a TLS handshake first when `tls` is set).
async fn tcp_acceptor(
    listener: usize,
    sock: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: Arc<Connections>,
    tx: mpsc::Sender<Event>,
    max_message_bytes: usize,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = sock.accept() => r,
        };
        match accepted {
            Ok((stream, from)) => {
                let _ = stream.set_nodelay(true);
                match &tls {
                    None => {
                        let (reader, writer) = stream.into_split();
                        let (id, _) = register(
                            &conns,
                            reader,
                            writer,
                            Transport::Tcp,
                            from,
                            listener,
                            tx.clone(),
                            max_message_bytes,
                        );
                        debug!(conn = id, peer = %from, "accepted TCP connection");
                    }
                    Some(acceptor) => {
                        // The handshake runs on its own task: a slow or silent client
                        // never holds up the next accept.
                        let handshake = acceptor.accept(stream);
                        let conns = Arc::clone(&conns);
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let limit = crate::tls::HANDSHAKE_TIMEOUT;
                            let stream = match tokio::time::timeout(limit, handshake).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    debug!(%error, peer = %from, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    debug!(peer = %from, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let (reader, writer) = tokio::io::split(stream);
                            let (id, _) = register(
                                &conns,
                                reader,
                                writer,
                                Transport::Tls,
                                from,
                                listener,
                                tx,
                                max_message_bytes,
                            );
                            debug!(conn = id, peer = %from, "accepted TLS connection");
                        });
                    }
                }
            }
            Err(error) => {
                // e.g. out of file descriptors: back off briefly rather than spin.
                warn!(%error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Registers a connection (TCP, or TLS after its handshake) and starts its reader and
/// writer tasks.
#[allow(clippy::too_many_arguments)]
fn register<R, W>(
    conns: &Arc<Connections>,
    mut reader: R,
    mut writer: W,
    transport: Transport,
    peer: SocketAddr,
    listener: usize,
    tx: mpsc::Sender<Event>,
    max_message_bytes: usize,
) -> (ConnId, mpsc::UnboundedSender<Bytes>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = conns.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Bytes>();
    conns.by_id.insert(id, out_tx.clone());
    conns.by_addr.insert((transport, peer), id);
    tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            if let Err(error) = writer.write_all(&bytes).await {
                debug!(%error, conn = id, "write failed");
                break;
            }
            // A TLS writer buffers records until flushed; for TCP this is a no-op.
            if let Err(error) = writer.flush().await {
                debug!(%error, conn = id, "flush failed");
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let conns = Arc::clone(conns);
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(TCP_READ_CHUNK);
        'conn: loop {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(TCP_READ_CHUNK);
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            loop {
                match parse::frame_stream(&buf, max_message_bytes) {
                    Ok(frame) => {
                        let _ = buf.split_to(frame.skip);
                        let bytes = buf.split_to(frame.len).freeze();
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
                        // only keep-alive CRLFs so far: drop them
                        if buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                            buf.clear();
                        }
                        break;
                    }
                    Err(error) => {
                        // Framing is lost: nothing after this can be trusted.
                        observe::count_parse_error();
                        warn!(%error, peer = %peer, "closing connection with unframeable data");
                        break 'conn;
                    }
                }
            }
        }
        conns.by_id.remove(&id);
        conns.by_addr.remove_if(&(transport, peer), |_, v| *v == id);
        debug!(conn = id, "connection closed");
    });
    (id, out_tx)
}
