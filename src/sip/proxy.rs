//! The RFC 3261 §16 proxy core, sans-IO: messages, contexts and time go in, datagrams and
//! store look-ups come out. It never reads a clock or touches a socket, so tests drive it
//! with raw bytes and a fake `Instant` (STYLE.md §1).
//!
//! What it does:
//! - INVITE (out of dialog): transaction-stateful. `100 Trying` at once; work out the agent
//!   (called number) and the caller; ask the shell for the caller's context
//!   ([`Output::Lookup`]) and hold until it comes back ([`Proxy::handle_context`]) or the
//!   agent's fallback wait runs out ([`Timer::Fallback`]); then forward with the context
//!   injected, retransmit over UDP (Timer A), give up with `408` (Timer B), relay
//!   provisionals and finals with our Via removed, ACK non-2xx finals hop by hop.
//! - CANCEL: `200`, then `487` for a held INVITE (nothing forwarded) or a CANCEL upstream.
//! - Everything else is forwarded statelessly (§16.11) along Route (loose routing, our own
//!   Record-Route entries popped) or, with no Route to us, by called number to the agent's
//!   upstream, as the INVITE was. OPTIONS to precall itself → `200`.
//!
//! Forwarding edits only what §16.6 requires (our Via on top, `received`/`rport` on the
//! sender's Via per RFC 3581, Max-Forwards − 1, Record-Route, Route pop) plus the injected
//! headers; every other byte is copied as received ([`Message::edit`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use tracing::{debug, info, info_span, warn, Span};

use crate::agent::{self, Agents};
use crate::config::{AgentConfig, Transport, Upstream};
use crate::inject::{self, Status};
use crate::metrics::{self as observe, CallLog, CallRecord};
use crate::number;
use crate::route::RouteInput;
use crate::store::{CallerKey, Context};

use super::message::{HeaderName, Message, Method, Via};
use super::parse::{self, ParseError};
use super::transaction::{self, ClientState, ServerState, Timer, Timers};
use super::uri;

/// Identifies a held call between [`Output::Lookup`] and [`Proxy::handle_context`].
pub type HoldId = u64;
/// A TCP connection, numbered by the shell.
pub type ConnId = u64;

/// One socket precall listens on, with the address it puts in Via and Record-Route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub transport: Transport,
    /// Advertised address: the bound address, or a concrete one for `0.0.0.0`.
    pub addr: SocketAddr,
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// The TCP connection it arrived on.
    pub conn: Option<ConnId>,
    /// Index of the listener that received it.
    pub listener: usize,
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub transport: Transport,
    pub to: SocketAddr,
    /// For TCP: the connection to use when known; else the shell finds or opens one to `to`.
    pub conn: Option<ConnId>,
    /// For UDP: the listener socket to send from.
    pub listener: usize,
    pub bytes: Bytes,
}

/// What the core wants done.
#[derive(Debug, Clone)]
pub enum Output {
    Transmit(Transmit),
    /// Find the context for `key` (see `store::Contexts::claim`), answer with
    /// [`Proxy::handle_context`] (or [`Proxy::handle_lookup_failed`]).
    Lookup {
        hold: HoldId,
        key: CallerKey,
    },
    /// The held call no longer waits (fallback, CANCEL): drop its watch.
    CancelLookup {
        hold: HoldId,
    },
    /// A context reached a call that no longer waited: put it back so it is not lost.
    Restore {
        key: CallerKey,
        ctx: Context,
    },
    /// POST `body` (JSON) to `url` within `timeout`; answer with
    /// [`Proxy::handle_http_response`]. Never blocks the core: the call waits meanwhile.
    Http(HttpCall),
}

/// An outgoing HTTP call the core asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub purpose: HttpPurpose,
    pub url: String,
    pub timeout: Duration,
    pub body: Bytes,
}

/// What an [`HttpCall`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpPurpose {
    /// `inject.mode = "http"|"both"`: deliver the context before forwarding this call.
    Deliver { call: u64 },
    /// `lookup_url`: ask for the context of this held call.
    Lookup { hold: HoldId },
}

/// How an [`HttpCall`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAnswer {
    /// An answer with its status and (size-bounded) body.
    Status { code: u16, body: Bytes },
    /// No answer: connection error, timeout, body too large, no concurrency slot.
    Failed(String),
}

/// How a context reached a held call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// It was cached when the INVITE arrived.
    Cached,
    /// A webhook landed while the call was held.
    Posted,
}

/// Counters for logs and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub parse_errors: u64,
    pub dropped: u64,
    pub held_now: usize,
    /// Route expressions that failed at run time (missing field, wrong type).
    pub route_errors: u64,
    /// Pull look-ups that failed or answered nothing usable.
    pub lookup_misses: u64,
    /// HTTP deliveries that failed (the call went on with `Delivery: failed`).
    pub delivery_failures: u64,
    /// Attempts abandoned for the next upstream (timeout, 5xx/408, transport error).
    pub failovers: u64,
}

/// The server (caller-facing) and client (agent-facing) halves of one INVITE transaction.
struct Call {
    invite: Message,
    source: Peer,
    server_key: ServerKey,
    server: ServerState,
    agents: Arc<Agents>,
    agent: usize,
    caller: Option<number::E164>,
    arrived: Instant,
    /// `Some` while held waiting for context.
    hold: Option<CallerKey>,
    settled: Option<(Status, u64)>,
    to_tag: String,
    /// Last response sent to the caller: re-sent for a retransmitted INVITE and by Timer G.
    last_response: Bytes,
    g_interval: Duration,
    client: Option<Client>,
    /// Earlier attempts (failover): kept so their late non-2xx finals are still ACKed.
    old_clients: Vec<Client>,
    /// The called number as matched (E.164 where it parses), for routes and payloads.
    called: String,
    /// How the call is forwarded, decided once its context is settled.
    plan: Option<Plan>,
    /// Waiting for the HTTP delivery before forwarding.
    delivering: bool,
    cancel_wanted: bool,
    logged: bool,
    deadlines: [Option<Instant>; TIMERS],
    /// `call{call_id, agent, caller}`: entered around everything done for this call.
    span: Span,
}

/// The forwarding decision for a settled call: which agent's injection, which upstreams
/// (in failover order), and the header lines to add.
struct Plan {
    /// The agent whose upstreams and injection apply (differs after a hand-over route).
    agent: usize,
    upstreams: Vec<Upstream>,
    /// Index of the next upstream to try.
    next: usize,
    /// Attempts made so far (names the branches).
    attempts: usize,
    context: Map<String, Value>,
    route: Option<String>,
    headers: Bytes,
}

struct Client {
    branch: String,
    target: Transmit,
    state: ClientState,
    a_interval: Duration,
    /// Route elements that were popped (ours), so CANCEL/ACK carry the same route set.
    popped_routes: usize,
}

/// RFC 3261 §17.2.3: a server transaction is the top Via's branch plus sent-by (the
/// method is implied: INVITE, with its ACK and CANCEL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServerKey {
    branch: String,
    sent_by: String,
}

impl ServerKey {
    fn of(via: &Via<'_>) -> Option<ServerKey> {
        let branch = via.branch?;
        let sent_by = match via.port {
            Some(p) => format!("{}:{p}", via.host.to_ascii_lowercase()),
            None => via.host.to_ascii_lowercase(),
        };
        Some(ServerKey {
            branch: branch.to_string(),
            sent_by,
        })
    }
}

const TIMERS: usize = 8;

fn timer_index(t: Timer) -> usize {
    match t {
        Timer::A => 0,
        Timer::B => 1,
        Timer::C => 2,
        Timer::G => 3,
        Timer::H => 4,
        Timer::Linger => 5,
        Timer::Fallback => 6,
        Timer::Failover => 7,
    }
}

const ALL_TIMERS: [Timer; TIMERS] = [
    Timer::A,
    Timer::B,
    Timer::C,
    Timer::G,
    Timer::H,
    Timer::Linger,
    Timer::Fallback,
    Timer::Failover,
];

/// The proxy core.
pub struct Proxy {
    agents: Arc<Agents>,
    listeners: Vec<Listener>,
    timers: Timers,
    max_message_bytes: usize,
    record_route: bool,
    seed: u64,
    /// Every To tag precall generates starts with this, so an ACK for one is recognised.
    tag_prefix: String,
    next_id: u64,
    calls: HashMap<u64, Call>,
    by_server: HashMap<ServerKey, u64>,
    by_client: HashMap<String, u64>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    out: VecDeque<Output>,
    stats: Stats,
    health: Health,
    /// SIGTERM: no new calls (`503` + `Retry-After`); everything in flight continues.
    draining: bool,
    /// Held-call count and finished calls, for the status page.
    call_log: Arc<CallLog>,
    guard: guard::Guard,
}

/// Upstream liveness from OPTIONS probes (`health_check_secs`). Only probed upstreams
/// can be down; an unprobed one is always tried.
#[derive(Default)]
struct Health {
    probed: HashMap<(Transport, SocketAddr), Probe>,
    interval: Option<Duration>,
    next_probe: Option<Instant>,
    round: u64,
    by_branch: HashMap<String, (Transport, SocketAddr)>,
}

struct Probe {
    uri: String,
    up: bool,
    answered: bool,
}

impl Health {
    fn new(agents: &Agents) -> Health {
        let mut health = Health::default();
        for agent in &agents.config.agents {
            let Some(every) = agent.health_check else {
                continue;
            };
            health.interval = Some(health.interval.map_or(every, |i| i.min(every)));
            let route_upstreams = agent.routes.iter().flat_map(|r| match &r.target {
                crate::config::RouteTarget::Upstreams(list) => list.as_slice(),
                _ => &[],
            });
            for up in agent.upstreams.iter().chain(route_upstreams) {
                health
                    .probed
                    .entry((up.transport, up.addr))
                    .or_insert(Probe {
                        uri: up.uri.clone(),
                        up: true,
                        answered: true,
                    });
            }
        }
        health
    }

    fn is_down(&self, up: &Upstream) -> bool {
        self.probed
            .get(&(up.transport, up.addr))
            .is_some_and(|p| !p.up)
    }
}

impl Proxy {
    /// `seed` makes generated branches and tags unique to this process.
    pub fn new(agents: Arc<Agents>, listeners: Vec<Listener>, seed: u64) -> Proxy {
        let sip = &agents.config.sip;
        let health = Health::new(&agents);
        Proxy {
            guard: guard::Guard::new(&sip.limits),
            timers: Timers::new(sip.t1),
            max_message_bytes: sip.max_message_bytes,
            record_route: sip.record_route,
            agents,
            listeners,
            seed,
            tag_prefix: format!("pc{:x}", seed & 0xffff_ffff),
            next_id: 1,
            calls: HashMap::new(),
            by_server: HashMap::new(),
            by_client: HashMap::new(),
            deadlines: BinaryHeap::new(),
            out: VecDeque::new(),
            stats: Stats::default(),
            health,
            draining: false,
            call_log: Arc::new(CallLog::new()),
        }
    }

    /// Shares the held-call count and the finished calls with the status page (`/ui/`).
    /// Call before the first input.
    pub fn set_call_log(&mut self, call_log: Arc<CallLog>) {
        self.call_log = call_log;
    }

    /// The agent table new calls use (the shell reads TLS settings from its config).
    pub fn agents(&self) -> &Arc<Agents> {
        &self.agents
    }

    /// The span of call `id` (a no-op span when it is gone), to enter around its work.
    fn call_span(&self, id: u64) -> Span {
        self.calls
            .get(&id)
            .map_or_else(Span::none, |c| c.span.clone())
    }

    /// Call once when the shell starts: arms the first health-probe round.
    pub fn start(&mut self, now: Instant) {
        if self.health.interval.is_some() {
            self.health.next_probe = Some(now);
        }
    }

    /// One OPTIONS probe round: an upstream whose last probe went unanswered is down,
    /// every probed upstream gets a new OPTIONS.
    fn probe_upstreams(&mut self, now: Instant) {
        let Some(every) = self.health.interval else {
            return;
        };
        self.health.round += 1;
        let round = self.health.round;
        self.health.by_branch.clear();
        let mut sends = Vec::new();
        for (n, ((transport, addr), probe)) in self.health.probed.iter_mut().enumerate() {
            if !probe.answered && probe.up {
                probe.up = false;
                warn!(upstream = %probe.uri, "upstream down: OPTIONS probe unanswered");
            }
            probe.answered = false;
            let branch = transaction::probe_branch(self.seed, n, round);
            sends.push((*transport, *addr, branch));
        }
        for (transport, addr, branch) in sends {
            let listener = self.listener_for(transport);
            let Some(l) = self.listeners.get(listener).copied() else {
                continue;
            };
            let bytes = format!(
                "OPTIONS sip:{target} SIP/2.0\r\n\
                 Via: SIP/2.0/{t} {us};branch={branch};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:precall@{us}>;tag={tag}-probe\r\n\
                 To: <sip:{target}>\r\n\
                 Call-ID: {branch}@precall\r\n\
                 CSeq: {round} OPTIONS\r\n\
                 Content-Length: 0\r\n\r\n",
                target = hostport(addr),
                t = transport.via_name(),
                us = hostport(l.addr),
                tag = self.tag_prefix,
            );
            self.health.by_branch.insert(branch, (transport, addr));
            self.out.push_back(Output::Transmit(Transmit {
                transport,
                to: addr,
                conn: None,
                listener,
                bytes: Bytes::from(bytes),
            }));
        }
        self.health.next_probe = Some(now + every);
    }

    /// A response to one of our OPTIONS probes: any answer but `503` means alive.
    fn on_probe_response(&mut self, key: (Transport, SocketAddr), code: u16) {
        if code < 200 {
            return;
        }
        if let Some(probe) = self.health.probed.get_mut(&key) {
            probe.answered = true;
            let up = code != 503;
            if up != probe.up {
                if up {
                    info!(upstream = %probe.uri, "upstream up: answered OPTIONS");
                } else {
                    warn!(upstream = %probe.uri, "upstream down: answered OPTIONS with 503");
                }
            }
            probe.up = up;
        }
    }

    /// Swaps in a new agent table (config reload). Calls in flight keep the one they
    /// started with; health states of upstreams that stay are kept.
    pub fn set_agents(&mut self, now: Instant, agents: Arc<Agents>) {
        let mut health = Health::new(&agents);
        for (key, probe) in &mut health.probed {
            if let Some(old) = self.health.probed.get(key) {
                probe.up = old.up;
                probe.answered = old.answered;
            }
        }
        health.next_probe = health
            .interval
            .map(|_| self.health.next_probe.unwrap_or(now));
        health.round = self.health.round;
        health.by_branch = std::mem::take(&mut self.health.by_branch);
        self.health = health;
        self.agents = agents;
    }

    /// Starts the graceful drain: new INVITEs get `503` with `Retry-After`; held calls,
    /// forwarded calls, responses and in-dialog requests carry on.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// Calls that still wait for their outcome: held, being delivered, or forwarded
    /// without a final answer. The drain is over when this reaches 0.
    pub fn pending_calls(&self) -> usize {
        self.calls
            .values()
            .filter(|c| c.server == ServerState::Proceeding)
            .count()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            held_now: self.calls.values().filter(|c| c.hold.is_some()).count(),
            ..self.stats
        }
    }

    /// Number of INVITE transactions in memory (held, ringing or lingering).
    pub fn calls_in_memory(&self) -> usize {
        self.calls.len()
    }

    /// The next thing to do; call until `None` after every `handle_*`.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest deadline; call [`Proxy::handle_timeout`] when it passes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let call = self.deadlines.peek().map(|Reverse((at, _))| *at);
        match (call, self.health.next_probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A UDP datagram arrived.
    pub fn handle_datagram(&mut self, now: Instant, from: Peer, bytes: Bytes) {
        match parse::parse_datagram(bytes.clone(), self.max_message_bytes) {
            Ok(msg) => self.handle_message(now, from, msg),
            Err(error) => self.reject_unparseable(from, &bytes, &error),
        }
    }

    /// One message framed from a TCP stream arrived.
    pub fn handle_stream_message(&mut self, now: Instant, from: Peer, bytes: Bytes) {
        match parse::parse_stream_message(bytes.clone(), self.max_message_bytes) {
            Ok(msg) => self.handle_message(now, from, msg),
            Err(error) => self.reject_unparseable(from, &bytes, &error),
        }
    }

    /// Malformed SIP: `400` when Via/From/To/Call-ID/CSeq could be salvaged from a request,
    /// else dropped. Never answers a response.
    fn reject_unparseable(&mut self, from: Peer, bytes: &Bytes, error: &ParseError) {
        self.stats.parse_errors += 1;
        observe::count_parse_error();
        let Some(s) = parse::salvage(bytes) else {
            self.stats.dropped += 1;
            debug!(peer = %from.addr, %error, "dropped unparseable message");
            return;
        };
        debug!(peer = %from.addr, %error, "answering 400 to malformed request");
        let (code, reason) = guard::unparseable_status(bytes, error);
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(format!("SIP/2.0 {code} {reason}\r\n").as_bytes());
        for via in &s.vias {
            push_header(&mut out, b"Via", via);
        }
        push_header(&mut out, b"From", &s.from);
        push_header(&mut out, b"To", &s.to);
        push_header(&mut out, b"Call-ID", &s.call_id);
        push_header(&mut out, b"CSeq", &s.cseq);
        out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        // Address it like any response: the source, at the Via port unless rport.
        self.out.push_back(Output::Transmit(Transmit {
            transport: from.transport,
            to: from.addr,
            conn: from.conn,
            listener: from.listener,
            bytes: Bytes::from(out),
        }));
    }

    /// A parsed message arrived.
    pub fn handle_message(&mut self, now: Instant, from: Peer, msg: Message) {
        if msg.is_request() {
            self.on_request(now, from, msg);
        } else {
            self.on_response(now, msg);
        }
    }

    /// The answer to [`Output::Lookup`]: the context for a held call.
    pub fn handle_context(&mut self, now: Instant, hold: HoldId, ctx: Context, how: Settled) {
        let _span = self.call_span(hold).entered();
        let still_held = self.calls.get(&hold).is_some_and(|c| c.hold.is_some());
        if !still_held {
            // Fell back, was cancelled, or is gone: the context must not be lost.
            if let Some(key) = self.calls.get(&hold).and_then(|c| c.caller_key()) {
                self.out.push_back(Output::Restore { key, ctx });
            } else {
                debug!(hold, "context for a call no longer in memory");
            }
            return;
        }
        let status = match how {
            Settled::Cached => Status::Hit,
            Settled::Posted => Status::Waited,
        };
        self.settle(now, hold, status, Some(&ctx));
    }

    /// The look-up for a held call failed (store unreachable): forward at once with the
    /// agent's defaults rather than wait for a webhook that cannot be stored.
    pub fn handle_lookup_failed(&mut self, now: Instant, hold: HoldId, reason: &str) {
        let _span = self.call_span(hold).entered();
        metrics::counter!(observe::LOOKUP_FAILURES).increment(1);
        if self.calls.get(&hold).is_some_and(|c| c.hold.is_some()) {
            info!(hold, reason, "context look-up failed; falling back");
            self.settle(now, hold, Status::Fallback, None);
        }
    }

    /// The answer to an [`Output::Http`].
    pub fn handle_http_response(&mut self, now: Instant, purpose: HttpPurpose, answer: HttpAnswer) {
        let _span = match purpose {
            HttpPurpose::Deliver { call } => self.call_span(call),
            HttpPurpose::Lookup { hold } => self.call_span(hold),
        }
        .entered();
        match purpose {
            HttpPurpose::Deliver { call } => {
                if !self.calls.get(&call).is_some_and(|c| c.delivering) {
                    return; // cancelled meanwhile
                }
                let ok = matches!(
                    answer,
                    HttpAnswer::Status {
                        code: 200..=299,
                        ..
                    }
                );
                if !ok {
                    self.stats.delivery_failures += 1;
                    metrics::counter!(observe::DELIVERY_FAILURES, "agent" => self.agent_label(call))
                        .increment(1);
                    info!(call, answer = ?answer_summary(&answer), "context delivery failed; forwarding anyway");
                }
                self.finish_plan(now, call, !ok);
            }
            HttpPurpose::Lookup { hold } => {
                if self.calls.get(&hold).is_none_or(|c| c.hold.is_none()) {
                    return; // released by a webhook or the fallback meanwhile
                }
                let context = match &answer {
                    HttpAnswer::Status { code: 200, body } => serde_json::from_slice::<Value>(body)
                        .ok()
                        .and_then(|v| match v {
                            Value::Object(map) => Some(map),
                            _ => None,
                        }),
                    _ => None,
                };
                match context {
                    Some(map) => {
                        self.out.push_back(Output::CancelLookup { hold });
                        self.settle(now, hold, Status::LookedUp, Some(&map));
                    }
                    // 404/204, an error or a body that is not a JSON object: keep holding.
                    None => {
                        self.stats.lookup_misses += 1;
                        metrics::counter!(observe::LOOKUP_MISSES, "agent" => self.agent_label(hold))
                            .increment(1);
                        debug!(hold, answer = ?answer_summary(&answer), "look-up gave nothing");
                    }
                }
            }
        }
    }

    /// Sending to `to` failed at the transport (TCP connect refused or reset): every
    /// attempt still waiting on that upstream moves to the next one, or gets `503`.
    pub fn handle_transport_error(&mut self, now: Instant, transport: Transport, to: SocketAddr) {
        let affected: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| {
                c.client.as_ref().is_some_and(|cl| {
                    cl.state == ClientState::Calling
                        && cl.target.to == to
                        && cl.target.transport == transport
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in affected {
            let _span = self.call_span(id).entered();
            if self.has_next_upstream(id) {
                self.fail_over(now, id, "transport error");
            } else {
                if let Some(client) = self.calls.get_mut(&id).and_then(|c| c.client.as_mut()) {
                    client.state = ClientState::Completed;
                }
                if let Some(call) = self.calls.get_mut(&id) {
                    for t in [Timer::A, Timer::B, Timer::C, Timer::Failover] {
                        call.deadlines[timer_index(t)] = None;
                    }
                }
                self.send_final_to_caller(now, id, 503, "Service Unavailable");
                self.log_call(id, "unreachable", 503);
            }
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.health.next_probe.is_some_and(|at| at <= now) {
            self.probe_upstreams(now);
        }
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            for timer in ALL_TIMERS {
                let due = self
                    .calls
                    .get(&id)
                    .and_then(|c| c.deadlines[timer_index(timer)])
                    .is_some_and(|d| d <= now);
                if due {
                    let _span = self.call_span(id).entered();
                    if let Some(call) = self.calls.get_mut(&id) {
                        call.deadlines[timer_index(timer)] = None;
                    }
                    self.on_timer(now, id, timer);
                }
            }
        }
    }

    // ----------------------------------------------------------------- requests

    fn on_request(&mut self, now: Instant, from: Peer, msg: Message) {
        let Some(method) = msg.method().cloned() else {
            return;
        };
        if self.refuse_request(now, &from, &msg, &method) {
            return; // scanners, allowed_peers, 416, 420, out-of-dialog (guard.rs)
        }
        match method {
            Method::Invite => self.on_invite(now, from, msg),
            Method::Ack => self.on_ack(now, from, msg),
            Method::Cancel => self.on_cancel(now, from, msg),
            _ => self.forward_stateless(now, from, msg),
        }
    }

    fn on_invite(&mut self, now: Instant, from: Peer, msg: Message) {
        let Some(key) = self.server_key(&msg) else {
            self.respond(&msg, &from, 400, "Bad Request (no branch)", None);
            return;
        };
        if let Some(&id) = self.by_server.get(&key) {
            // A retransmission: re-send whatever we last said (§17.2.1).
            if let Some(call) = self.calls.get(&id) {
                if matches!(
                    call.server,
                    ServerState::Proceeding | ServerState::Completed
                ) {
                    let t = call.reply_target(call.last_response.clone());
                    self.out.push_back(Output::Transmit(t));
                }
            }
            return;
        }
        if has_to_tag(&msg) {
            // re-INVITE inside a dialog: end to end, like any in-dialog request.
            self.forward_stateless(now, from, msg);
            return;
        }
        if msg.max_forwards() == Some(0) {
            self.respond(&msg, &from, 483, "Too Many Hops", None);
            return;
        }
        if self.draining {
            // Shutting down: another node (or this one, restarted) should take it.
            self.respond_with(
                &msg,
                &from,
                503,
                "Service Unavailable",
                "Retry-After: 5\r\n",
            );
            return;
        }
        if self.refuse_invite(now, &from, &msg) {
            return; // INVITE rate, held-call cap (guard.rs)
        }
        let agents = Arc::clone(&self.agents);
        let called = called_user(&msg);
        let Some(agent) = agents.for_called(called.as_deref()) else {
            debug!(called = ?called, "no agent for called number");
            self.respond(&msg, &from, 404, "Not Found", None);
            return;
        };
        let Some(agent_index) = agents
            .config
            .agents
            .iter()
            .position(|a| std::ptr::eq(a, agent))
        else {
            return;
        };
        let caller = agent::caller_number(
            &agent.caller_sources,
            msg.header_str(HeaderName::PAssertedIdentity),
            msg.header_str(HeaderName::From),
            agent::is_trusted(&agents.config, from.addr.ip()),
            agent.default_region,
        );
        let id = self.next_id;
        self.next_id += 1;
        let to_tag = format!("{}-{id:x}", self.tag_prefix);
        let span = info_span!(
            "call",
            call_id = %String::from_utf8_lossy(msg.call_id().unwrap_or_default()),
            agent = %agent.id,
            caller = caller.as_ref().map_or("-", |c| c.as_str()),
        );
        let _entered = span.clone().entered();
        let trying = self.build_response(&msg, &from, 100, "Trying", None);
        let mut call = Call {
            invite: msg,
            source: from,
            server_key: key.clone(),
            server: ServerState::Proceeding,
            agents: Arc::clone(&agents),
            agent: agent_index,
            caller,
            arrived: now,
            hold: None,
            settled: None,
            to_tag,
            last_response: trying.clone(),
            g_interval: self.timers.t1,
            client: None,
            cancel_wanted: false,
            logged: false,
            old_clients: Vec::new(),
            called: called
                .as_deref()
                .and_then(|u| number::normalise_lenient(u, agent.default_region))
                .map(|n| n.0)
                .unwrap_or_default(),
            plan: None,
            delivering: false,
            deadlines: [None; TIMERS],
            span,
        };
        // Queued after the look-up (below): by the time the caller sees the 100, the call
        // is registered as waiting, so a webhook sent on the 100 always finds it.
        let trying = Output::Transmit(call.reply_target(trying));
        let fallback_wait = agent.fallback_wait;
        let hold_key = call.caller_key();
        call.hold = hold_key.clone();
        if call.hold.is_some() {
            self.call_log.hold_started();
        }
        self.calls.insert(id, call);
        self.by_server.insert(key, id);
        match hold_key {
            Some(key) => {
                self.arm(id, Timer::Fallback, now + fallback_wait);
                if let Some(lookup) = &agent.lookup {
                    // Pull mode: ask while holding; a webhook may still win the race.
                    let body = self
                        .calls
                        .get(&id)
                        .map(|c| lookup_payload(c, &key))
                        .unwrap_or_default();
                    self.out.push_back(Output::Http(HttpCall {
                        purpose: HttpPurpose::Lookup { hold: id },
                        url: lookup.url.clone(),
                        timeout: lookup.timeout,
                        body,
                    }));
                }
                self.out.push_back(Output::Lookup { hold: id, key });
                self.out.push_back(trying);
            }
            // No caller number to look up (anonymous): nothing can arrive for it.
            None => {
                self.out.push_back(trying);
                self.settle(now, id, Status::Fallback, None);
            }
        }
    }

    fn on_ack(&mut self, now: Instant, from: Peer, msg: Message) {
        if let Some(key) = self.server_key(&msg) {
            if let Some(&id) = self.by_server.get(&key) {
                if let Some(call) = self.calls.get_mut(&id) {
                    match call.server {
                        ServerState::Completed => {
                            // ACK for our non-2xx final: hop by hop, absorbed (§17.2.1).
                            call.server = ServerState::Confirmed;
                            call.deadlines[timer_index(Timer::G)] = None;
                            call.deadlines[timer_index(Timer::H)] = None;
                            let linger = if from.transport == Transport::Udp {
                                self.timers.t4
                            } else {
                                Duration::ZERO
                            };
                            self.arm(id, Timer::Linger, now + linger);
                            return;
                        }
                        ServerState::Confirmed => return,
                        // Some UACs reuse the INVITE's branch for the 2xx ACK: that ACK
                        // is end to end, so it is forwarded like any other.
                        ServerState::Proceeding | ServerState::Accepted => {}
                    }
                }
            }
        }
        let to_tag = msg.header_str(HeaderName::To).and_then(uri::tag_of);
        if to_tag.is_some_and(|t| t.starts_with(self.tag_prefix.as_str())) {
            // The ACK for a final precall generated itself statelessly (404, 483, ...) or
            // for a transaction already forgotten: hop by hop, it ends here.
            return;
        }
        self.forward_stateless(now, from, msg);
    }

    fn on_cancel(&mut self, now: Instant, from: Peer, msg: Message) {
        let Some(key) = self.server_key(&msg) else {
            self.respond(&msg, &from, 400, "Bad Request (no branch)", None);
            return;
        };
        let Some(&id) = self.by_server.get(&key) else {
            self.respond(&msg, &from, 481, "Call/Transaction Does Not Exist", None);
            return;
        };
        let _span = self.call_span(id).entered();
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let tag = call.to_tag.clone();
        self.respond(&msg, &from, 200, "OK", Some(&tag));
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.server != ServerState::Proceeding {
            return; // a final was already sent: the CANCEL has no effect (§9.2)
        }
        if call.hold.take().is_some() {
            self.call_log.hold_ended();
            // Held: nothing was forwarded, so nothing to cancel upstream.
            call.deadlines[timer_index(Timer::Fallback)] = None;
            self.out.push_back(Output::CancelLookup { hold: id });
            self.send_final_to_caller(now, id, 487, "Request Terminated");
            self.log_call(id, "cancelled", 487);
            return;
        }
        if call.client.is_none() {
            // Settled but not forwarded yet (HTTP delivery in flight): stop here.
            call.plan = None;
            call.delivering = false;
            self.send_final_to_caller(now, id, 487, "Request Terminated");
            self.log_call(id, "cancelled", 487);
            return;
        }
        match call.client.as_ref().map(|c| c.state) {
            Some(ClientState::Proceeding) => self.send_cancel_upstream(id),
            // §9.1: no provisional yet, so the CANCEL waits for one.
            Some(ClientState::Calling) => call.cancel_wanted = true,
            _ => {}
        }
    }

    /// Forwards a request without keeping state (§16.11): along our Record-Route, or by
    /// called number to the agent's upstream when no Route points at us.
    fn forward_stateless(&mut self, now: Instant, from: Peer, msg: Message) {
        let is_ack = msg.method() == Some(&Method::Ack);
        if msg.max_forwards() == Some(0) {
            if !is_ack {
                if msg.method() == Some(&Method::Options) && self.is_for_us(&msg) {
                    self.answer_options(&msg, &from);
                } else {
                    self.respond(&msg, &from, 483, "Too Many Hops", None);
                }
            }
            return;
        }
        let routes = msg.routes();
        let popped = routes
            .iter()
            .take_while(|(range, _)| {
                std::str::from_utf8(msg.slice(range))
                    .ok()
                    .and_then(uri::parse_target)
                    .is_some_and(|t| self.is_local(&t))
            })
            .count();
        let target = if popped > 0 {
            match routes.get(popped) {
                Some((range, _)) => std::str::from_utf8(msg.slice(range))
                    .ok()
                    .and_then(uri::parse_target)
                    .and_then(|t| Some((t.socket_addr()?, t.transport, t.secure))),
                None => request_uri_target(&msg),
            }
        } else {
            None
        };
        let target = match target {
            Some((addr, transport, secure)) => Some((
                addr,
                transport.unwrap_or(if secure {
                    Transport::Tls
                } else {
                    Transport::Udp
                }),
            )),
            None => self.route_without_route_set(&msg),
        };
        let Some((to, transport)) = target else {
            if msg.method() == Some(&Method::Options) && self.is_for_us(&msg) {
                self.answer_options(&msg, &from);
            } else if !is_ack {
                self.respond(&msg, &from, 404, "Not Found", None);
            }
            return;
        };
        if self.refuse_relay(now, &from, &msg, to) {
            return; // no open relay (guard.rs)
        }
        let listener = self.listener_for(transport);
        let branch = transaction::stateless_branch(
            self.seed,
            &[
                msg.top_via()
                    .and_then(|v| v.branch)
                    .unwrap_or("")
                    .as_bytes(),
                msg.call_id().unwrap_or_default(),
                msg.header(HeaderName::CSeq).unwrap_or_default(),
            ],
        );
        let bytes = self.forwarded_bytes(
            &msg,
            &from,
            (listener, transport),
            &branch,
            popped,
            false,
            &[],
        );
        self.out.push_back(Output::Transmit(Transmit {
            transport,
            to,
            conn: None,
            listener,
            bytes: Bytes::from(bytes),
        }));
    }

    /// No Route to us: a Request-URI aimed at a configured upstream goes there; else the
    /// called number picks the agent, whose upstream gets it (SIPp's `uac` ignores
    /// Record-Route). Any other host is refused: precall is not an open relay.
    fn route_without_route_set(&self, msg: &Message) -> Option<(SocketAddr, Transport)> {
        if let Some((addr, transport, _)) = request_uri_target(msg) {
            if let Some(up) = self
                .agents
                .config
                .agents
                .iter()
                .flat_map(|a| &a.upstreams)
                .find(|u| u.addr == addr)
            {
                return Some((addr, transport.unwrap_or(up.transport)));
            }
        }
        let called = called_user(msg)?;
        let agent = self.agents.for_called(Some(&called))?;
        let up = agent.upstreams.first()?;
        Some((up.addr, up.transport))
    }

    fn answer_options(&mut self, msg: &Message, from: &Peer) {
        self.respond_with(
            msg,
            from,
            200,
            "OK",
            "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK\r\nAccept: application/sdp\r\n",
        );
    }

    // ---------------------------------------------------------------- responses

    fn on_response(&mut self, now: Instant, msg: Message) {
        let Some(top) = msg.top_via() else {
            return;
        };
        let Some(branch) = top.branch else {
            self.stats.dropped += 1;
            return;
        };
        if !branch.starts_with(transaction::BRANCH_PREFIX) {
            // Not an answer to anything we sent: never relay it (reflection).
            self.stats.dropped += 1;
            return;
        }
        if let Some(&key) = self.health.by_branch.get(branch) {
            if let Some(code) = msg.status() {
                self.on_probe_response(key, code);
            }
            return;
        }
        let id = self.by_client.get(branch).copied();
        match id {
            Some(id) => self.on_upstream_response(now, id, msg),
            None => self.relay_stateless_response(msg),
        }
    }

    /// A response to a statelessly forwarded request: strip our Via, send to the next.
    fn relay_stateless_response(&mut self, msg: Message) {
        let vias = msg.vias();
        let Some(next) = vias.get(1) else {
            self.stats.dropped += 1;
            return;
        };
        let Some(to) = via_destination(next) else {
            self.stats.dropped += 1;
            return;
        };
        let transport = if next.transport.eq_ignore_ascii_case("TCP") {
            Transport::Tcp
        } else if next.transport.eq_ignore_ascii_case("TLS") {
            Transport::Tls
        } else {
            Transport::Udp
        };
        let bytes = strip_top_via(&msg);
        self.out.push_back(Output::Transmit(Transmit {
            transport,
            to,
            conn: None,
            listener: self.listener_for(transport),
            bytes: Bytes::from(bytes),
        }));
    }

    fn on_upstream_response(&mut self, now: Instant, id: u64, msg: Message) {
        let Some(code) = msg.status() else {
            return;
        };
        let _span = self.call_span(id).entered();
        metrics::counter!(
            observe::UPSTREAM_RESPONSES,
            "agent" => self.agent_label(id),
            "code" => observe::code_label(code)
        )
        .increment(1);
        if msg.cseq().is_some_and(|c| c.method == Method::Cancel) {
            return; // the answer to our CANCEL: nothing to relay
        }
        let branch = msg
            .top_via()
            .and_then(|v| v.branch)
            .unwrap_or("")
            .to_string();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let is_current = call.client.as_ref().is_some_and(|c| c.branch == branch);
        if !is_current {
            // An earlier attempt (we failed over): ACK its non-2xx finals so the upstream
            // stops retransmitting; relay a 2xx, which must go end to end.
            match code {
                300..=699 => {
                    let to_line = msg.header(HeaderName::To).map(<[u8]>::to_vec);
                    self.send_ack_upstream(id, &branch, to_line.as_deref());
                }
                200..=299 => {
                    let t = call.reply_target(Bytes::from(strip_top_via(&msg)));
                    self.out.push_back(Output::Transmit(t));
                }
                _ => {}
            }
            return;
        }
        let Some(client) = call.client.as_mut() else {
            return;
        };
        let previous = client.state;
        match code {
            100..=199 => {
                if previous == ClientState::Calling {
                    client.state = ClientState::Proceeding;
                }
                if previous == ClientState::Completed {
                    return;
                }
                for t in [Timer::A, Timer::B, Timer::Failover] {
                    call.deadlines[timer_index(t)] = None;
                }
                let timer_c = now + self.timers.timer_c();
                self.arm(id, Timer::C, timer_c);
                let Some(call) = self.calls.get_mut(&id) else {
                    return;
                };
                if code > 100 && call.server == ServerState::Proceeding {
                    let bytes = Bytes::from(strip_top_via(&msg));
                    call.last_response = bytes.clone();
                    let t = call.reply_target(bytes);
                    self.out.push_back(Output::Transmit(t));
                }
                let cancel = call.cancel_wanted;
                if cancel {
                    call.cancel_wanted = false;
                    self.send_cancel_upstream(id);
                }
            }
            200..=299 => {
                client.state = ClientState::Completed;
                for t in [Timer::A, Timer::B, Timer::C, Timer::Failover] {
                    call.deadlines[timer_index(t)] = None;
                }
                // 2xx (and its retransmissions) go end to end (§16.7, RFC 6026).
                let bytes = Bytes::from(strip_top_via(&msg));
                let t = call.reply_target(bytes);
                self.out.push_back(Output::Transmit(t));
                if call.server == ServerState::Proceeding {
                    call.server = ServerState::Accepted;
                    let linger = now + self.timers.timeout();
                    self.arm(id, Timer::Linger, linger);
                    self.log_call(id, "answered", code);
                }
            }
            _ => {
                client.state = ClientState::Completed;
                for t in [Timer::A, Timer::B, Timer::C, Timer::Failover] {
                    call.deadlines[timer_index(t)] = None;
                }
                let cancelled = call.cancel_wanted || call.server != ServerState::Proceeding;
                // ACK the non-2xx hop by hop (§17.1.1.3), for retransmissions too.
                let to_line = msg.header(HeaderName::To).map(<[u8]>::to_vec);
                self.send_ack_upstream(id, &branch, to_line.as_deref());
                if previous == ClientState::Completed {
                    return;
                }
                let failover_code = code == 408 || (500..=599).contains(&code);
                if failover_code && !cancelled && self.has_next_upstream(id) {
                    self.fail_over(now, id, &format!("answered {code}"));
                    return;
                }
                if failover_code && self.plan_attempted_several(id) {
                    // Every upstream failed: the caller learns the service is unavailable.
                    self.send_final_to_caller(now, id, 503, "Service Unavailable");
                    self.log_call(id, "upstreams-failed", 503);
                    return;
                }
                let relayed = Bytes::from(strip_top_via(&msg));
                self.send_bytes_final_to_caller(now, id, relayed);
                self.log_call(id, "answered", code);
            }
        }
    }

    /// Whether the call's plan had more than one upstream to try.
    fn plan_attempted_several(&self, id: u64) -> bool {
        self.calls
            .get(&id)
            .and_then(|c| c.plan.as_ref())
            .is_some_and(|p| p.upstreams.len() > 1)
    }

    // ------------------------------------------------------------------- timers

    fn on_timer(&mut self, now: Instant, id: u64, timer: Timer) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        match timer {
            Timer::A => {
                if let Some(client) = call.client.as_mut() {
                    if client.state == ClientState::Calling {
                        self.out.push_back(Output::Transmit(client.target.clone()));
                        client.a_interval = self.timers.next_a(client.a_interval);
                        let next = now + client.a_interval;
                        self.arm(id, Timer::A, next);
                    }
                }
            }
            Timer::B => {
                let silent = call.client.as_ref().map(|c| c.state) == Some(ClientState::Calling);
                if silent && self.has_next_upstream(id) {
                    self.fail_over(now, id, "no answer (Timer B)");
                } else if silent {
                    if let Some(call) = self.calls.get_mut(&id) {
                        if let Some(client) = call.client.as_mut() {
                            client.state = ClientState::Completed;
                        }
                        call.deadlines[timer_index(Timer::A)] = None;
                    }
                    self.send_final_to_caller(now, id, 408, "Request Timeout");
                    self.log_call(id, "timeout", 408);
                }
            }
            Timer::C => {
                if call.client.as_ref().map(|c| c.state) == Some(ClientState::Proceeding) {
                    self.send_cancel_upstream(id);
                    self.send_final_to_caller(now, id, 408, "Request Timeout");
                    self.log_call(id, "timeout", 408);
                }
            }
            Timer::G => {
                if call.server == ServerState::Completed && call.source.transport == Transport::Udp
                {
                    let t = call.reply_target(call.last_response.clone());
                    self.out.push_back(Output::Transmit(t));
                    call.g_interval = self.timers.next_g(call.g_interval);
                    let next = now + call.g_interval;
                    self.arm(id, Timer::G, next);
                }
            }
            Timer::H => {
                if call.server == ServerState::Completed {
                    call.server = ServerState::Confirmed;
                    self.arm(id, Timer::Linger, now);
                }
            }
            Timer::Linger => self.remove_call(id),
            Timer::Failover => {
                if call.client.as_ref().map(|c| c.state) == Some(ClientState::Calling) {
                    self.fail_over(now, id, "no provisional within upstream_timeout_ms");
                }
            }
            Timer::Fallback => {
                if call.hold.is_some() {
                    self.out.push_back(Output::CancelLookup { hold: id });
                    self.settle(now, id, Status::Fallback, None);
                }
            }
        }
    }

    // ---------------------------------------------------------------- internals

    fn arm(&mut self, id: u64, timer: Timer, at: Instant) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.deadlines[timer_index(timer)] = Some(at);
            self.deadlines.push(Reverse((at, id)));
        }
    }

    fn remove_call(&mut self, id: u64) {
        if let Some(call) = self.calls.remove(&id) {
            if call.hold.is_some() {
                self.call_log.hold_ended();
                self.out.push_back(Output::CancelLookup { hold: id });
            }
            self.by_server.remove(&call.server_key);
            if let Some(client) = call.client {
                self.by_client.remove(&client.branch);
            }
        }
    }

    /// The call's context is settled (hit, waited, looked-up or fallback): apply the
    /// agent's routes, then deliver over HTTP first when the injection mode asks for it,
    /// else forward at once.
    fn settle(&mut self, now: Instant, id: u64, status: Status, ctx: Option<&Map<String, Value>>) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.hold.take().is_some() {
            self.call_log.hold_ended();
        }
        call.deadlines[timer_index(Timer::Fallback)] = None;
        let waited = now.saturating_duration_since(call.arrived);
        let wait_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        call.settled = Some((status, wait_ms));
        let agents = Arc::clone(&call.agents);
        let Some(agent) = agents.config.agents.get(call.agent) else {
            return;
        };
        metrics::histogram!(observe::HOLD_WAIT, "agent" => agent.id.clone())
            .record(waited.as_secs_f64());
        let mut context = inject::effective_context(&agent.defaults, ctx);
        let caller = call.caller.as_ref().map_or("", |c| c.as_str()).to_string();
        let called = call.called.clone();
        let call_agent = call.agent;
        let (route, plan_agent, upstreams) =
            self.apply_routes(&agents, call_agent, &mut context, &caller, &called, status);
        let Some(target) = agents.config.agents.get(plan_agent) else {
            return;
        };
        let plan = Plan {
            agent: plan_agent,
            upstreams,
            next: 0,
            attempts: 0,
            context,
            route,
            headers: Bytes::new(),
        };
        let delivery = match (&target.inject.url, target.inject.mode.has_http()) {
            (Some(url), true) => Some((url.clone(), target.inject.timeout)),
            _ => None,
        };
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        match delivery {
            Some((url, timeout)) => {
                let body = delivery_payload(call, target, &plan, status, wait_ms);
                call.plan = Some(plan);
                call.delivering = true;
                self.out.push_back(Output::Http(HttpCall {
                    purpose: HttpPurpose::Deliver { call: id },
                    url,
                    timeout,
                    body,
                }));
            }
            None => {
                call.plan = Some(plan);
                self.finish_plan(now, id, false);
            }
        }
    }

    /// Evaluates the agent's `[[agents.routes]]` in order: the first match may add fields,
    /// send the call to other upstreams or hand it to another agent. Returns the route
    /// label, the agent whose injection and upstreams apply, and those upstreams. A rule
    /// whose expression fails at run time does not match; it is logged and counted.
    fn apply_routes(
        &mut self,
        agents: &Agents,
        agent_index: usize,
        context: &mut Map<String, Value>,
        caller: &str,
        called: &str,
        status: Status,
    ) -> (Option<String>, usize, Vec<Upstream>) {
        let Some(agent) = agents.config.agents.get(agent_index) else {
            return (None, agent_index, Vec::new());
        };
        if agent.routes.is_empty() {
            return (None, agent_index, agent.upstreams.clone());
        }
        let routing = agents.route(
            agent_index,
            &RouteInput {
                context,
                caller,
                called,
                agent: &agent.id,
                status: status.as_str(),
            },
        );
        for (rule, error) in &routing.errors {
            self.stats.route_errors += 1;
            metrics::counter!(observe::ROUTE_ERRORS, "agent" => agent.id.clone()).increment(1);
            debug!(agent = %agent.id, rule, %error, "route expression failed; rule does not match");
        }
        let Some(decision) = routing.decision else {
            return (None, agent_index, agent.upstreams.clone());
        };
        let set = decision.route.set.clone();
        let label = decision.label.clone();
        metrics::counter!(
            observe::ROUTE_MATCHES,
            "agent" => agent.id.clone(),
            "route" => label.clone()
        )
        .increment(1);
        let target = agents.index_of(&decision.agent.id).unwrap_or(agent_index);
        let upstreams = decision.upstreams.to_vec();
        inject::apply_set(context, &set);
        (Some(label), target, upstreams)
    }

    /// Renders the header lines for the plan and forwards to the first usable upstream.
    fn finish_plan(&mut self, now: Instant, id: u64, delivery_failed: bool) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        call.delivering = false;
        let agents = Arc::clone(&call.agents);
        let Some((status, wait_ms)) = call.settled else {
            return;
        };
        let Some(plan) = call.plan.as_mut() else {
            return;
        };
        let Some(agent) = agents.config.agents.get(plan.agent) else {
            return;
        };
        let mut extra: Vec<(&str, String)> = Vec::new();
        if let Some(route) = &plan.route {
            extra.push(("Route", route.clone()));
        }
        if delivery_failed {
            extra.push(("Delivery", "failed".to_string()));
        }
        plan.headers = Bytes::from(render_injection(
            &agent.inject,
            status,
            wait_ms,
            &plan.context,
            &extra,
        ));
        self.try_next_upstream(now, id);
    }

    /// Sends the INVITE to the next upstream in the plan that is not known to be down;
    /// with none left, the caller gets `503`.
    fn try_next_upstream(&mut self, now: Instant, id: u64) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.server != ServerState::Proceeding {
            return;
        }
        let Some(plan) = call.plan.as_mut() else {
            return;
        };
        let mut chosen = None;
        while let Some(up) = plan.upstreams.get(plan.next) {
            plan.next += 1;
            if self.health.is_down(up) {
                debug!(upstream = %up.uri, "skipping upstream marked down by health checks");
                continue;
            }
            chosen = Some(up.clone());
            break;
        }
        let Some(upstream) = chosen else {
            let tried = plan.attempts;
            self.send_final_to_caller(now, id, 503, "Service Unavailable");
            self.log_call(
                id,
                if tried == 0 {
                    "no-upstream"
                } else {
                    "upstreams-failed"
                },
                503,
            );
            return;
        };
        let attempt = plan.attempts;
        plan.attempts += 1;
        let more_left = plan.next < plan.upstreams.len();
        let plan_agent = plan.agent;
        let headers = plan.headers.clone();
        let upstream_timeout = call
            .agents
            .config
            .agents
            .get(plan_agent)
            .map_or(Duration::from_secs(2), |a| a.upstream_timeout);
        let listener = self.listener_for(upstream.transport);
        let branch = transaction::stateful_branch(self.seed, id, attempt);
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let popped = self.leading_local_routes(&call.invite);
        let bytes = self.forwarded_bytes(
            &call.invite,
            &call.source,
            (listener, upstream.transport),
            &branch,
            popped,
            self.record_route,
            &headers,
        );
        let target = Transmit {
            transport: upstream.transport,
            to: upstream.addr,
            conn: None,
            listener,
            bytes: Bytes::from(bytes),
        };
        self.out.push_back(Output::Transmit(target.clone()));
        debug!(upstream = %upstream.uri, attempt, "forwarded INVITE");
        let t1 = self.timers.t1;
        if let Some(call) = self.calls.get_mut(&id) {
            if let Some(old) = call.client.take() {
                call.old_clients.push(old);
            }
            call.client = Some(Client {
                branch: branch.clone(),
                target,
                state: ClientState::Calling,
                a_interval: t1,
                popped_routes: popped,
            });
            for t in [Timer::A, Timer::B, Timer::C, Timer::Failover] {
                call.deadlines[timer_index(t)] = None;
            }
        }
        self.by_client.insert(branch, id);
        if upstream.transport == Transport::Udp {
            self.arm(id, Timer::A, now + t1);
        }
        let b = now + self.timers.timeout();
        self.arm(id, Timer::B, b);
        if more_left {
            self.arm(id, Timer::Failover, now + upstream_timeout);
        }
    }

    /// Gives up on the current attempt (no CANCEL is possible before a provisional, and a
    /// failed final needs none) and tries the next upstream.
    fn fail_over(&mut self, now: Instant, id: u64, why: &str) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if let Some(client) = call.client.as_mut() {
            client.state = ClientState::Completed;
            info!(upstream = %client.target.to, why, "upstream failed; trying the next");
        }
        for t in [Timer::A, Timer::B, Timer::C, Timer::Failover] {
            call.deadlines[timer_index(t)] = None;
        }
        self.stats.failovers += 1;
        metrics::counter!(observe::FAILOVERS, "agent" => self.agent_label(id)).increment(1);
        self.try_next_upstream(now, id);
    }

    /// Whether the plan still has an upstream to try after the current one.
    fn has_next_upstream(&self, id: u64) -> bool {
        self.calls
            .get(&id)
            .and_then(|c| c.plan.as_ref())
            .is_some_and(|p| {
                p.upstreams[p.next.min(p.upstreams.len())..]
                    .iter()
                    .any(|u| !self.health.is_down(u))
            })
    }

    /// How many leading Route elements point at us.
    fn leading_local_routes(&self, msg: &Message) -> usize {
        msg.routes()
            .iter()
            .take_while(|(range, _)| {
                std::str::from_utf8(msg.slice(range))
                    .ok()
                    .and_then(uri::parse_target)
                    .is_some_and(|t| self.is_local(&t))
            })
            .count()
    }

    /// The §16.6 edits: our Via on top, `received`/`rport` on the sender's Via,
    /// Max-Forwards − 1, `popped` leading Route elements removed, Record-Route (double when
    /// the two sides use different listeners, RFC 5658), and `inject` lines at the end of
    /// the header section. Everything else is copied byte for byte. `out` is the listener
    /// whose address is advertised and the transport the message goes out on (Via names
    /// the transport, RFC 3261 §18.1.1).
    #[allow(clippy::too_many_arguments)]
    fn forwarded_bytes(
        &self,
        msg: &Message,
        source: &Peer,
        (out_listener, out_transport): (usize, Transport),
        branch: &str,
        popped: usize,
        record_route: bool,
        inject: &[u8],
    ) -> Vec<u8> {
        let mut edit = msg.edit();
        let out = self.listeners.get(out_listener).copied();
        let our_via = match out {
            Some(l) => format!(
                "Via: SIP/2.0/{} {};branch={branch};rport\r\n",
                out_transport.via_name(),
                hostport(l.addr)
            ),
            None => String::new(),
        };
        let first_via_line = msg
            .headers_named(HeaderName::Via)
            .next()
            .map_or(msg.start_line.end, |h| h.line.start);
        edit.insert(first_via_line, our_via.as_bytes());
        if let Some(via) = msg.top_via() {
            if let Some(new_value) = via_with_received(msg, &via, source) {
                edit.replace(via.range.clone(), new_value.as_bytes());
            }
        }
        match msg.headers_named(HeaderName::MaxForwards).next() {
            Some(h) => {
                let n = msg.max_forwards().unwrap_or(70).saturating_sub(1);
                edit.replace(h.value.clone(), n.to_string().as_bytes());
            }
            None => {
                edit.insert(msg.headers_end, b"Max-Forwards: 70\r\n");
            }
        }
        if popped > 0 {
            for range in route_removals(msg, popped) {
                edit.remove(range);
            }
        }
        if record_route {
            let mut rr = Vec::new();
            let inbound = self.listeners.get(source.listener).copied();
            if let Some(l) = out {
                rr.extend_from_slice(record_route_line(l).as_bytes());
            }
            if let Some(l) = inbound {
                if Some(l) != out {
                    rr.extend_from_slice(record_route_line(l).as_bytes());
                }
            }
            let at = msg
                .headers_named(HeaderName::RecordRoute)
                .next()
                .map_or(msg.headers_end, |h| h.line.start);
            edit.insert(at, &rr);
        }
        if !inject.is_empty() {
            edit.insert(msg.headers_end, inject);
        }
        edit.finish()
    }

    fn send_final_to_caller(&mut self, now: Instant, id: u64, code: u16, reason: &str) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let bytes =
            self.build_response(&call.invite, &call.source, code, reason, Some(&call.to_tag));
        self.send_bytes_final_to_caller(now, id, bytes);
    }

    /// Sends a non-2xx final to the caller and enters Completed (Timers G and H).
    fn send_bytes_final_to_caller(&mut self, now: Instant, id: u64, bytes: Bytes) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.server != ServerState::Proceeding {
            return;
        }
        call.server = ServerState::Completed;
        call.last_response = bytes.clone();
        let t = call.reply_target(bytes);
        let udp = call.source.transport == Transport::Udp;
        self.out.push_back(Output::Transmit(t));
        if udp {
            let g = now + self.timers.t1;
            self.arm(id, Timer::G, g);
        }
        let h = now + self.timers.timeout();
        self.arm(id, Timer::H, h);
    }

    /// CANCEL for the forwarded INVITE (§9.1): same Request-URI, Call-ID, From, To,
    /// CSeq number and branch, the same route set.
    fn send_cancel_upstream(&mut self, id: u64) {
        let Some(branch) = self
            .calls
            .get(&id)
            .and_then(|c| c.client.as_ref())
            .map(|c| c.branch.clone())
        else {
            return;
        };
        self.send_upstream_request(id, &branch, b"CANCEL", None);
    }

    /// ACK for a non-2xx final from upstream (§17.1.1.3): To from the response.
    fn send_ack_upstream(&mut self, id: u64, branch: &str, to: Option<&[u8]>) {
        self.send_upstream_request(id, branch, b"ACK", to);
    }

    fn send_upstream_request(&mut self, id: u64, branch: &str, method: &[u8], to: Option<&[u8]>) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let client = call
            .client
            .iter()
            .chain(call.old_clients.iter())
            .find(|c| c.branch == branch);
        let Some(client) = client else {
            return;
        };
        if let Some(bytes) = self.upstream_request(call, client, method, to) {
            let mut t = client.target.clone();
            t.bytes = bytes;
            self.out.push_back(Output::Transmit(t));
        }
    }

    fn upstream_request(
        &self,
        call: &Call,
        client: &Client,
        method: &[u8],
        to: Option<&[u8]>,
    ) -> Option<Bytes> {
        let inv = &call.invite;
        let listener = self.listeners.get(client.target.listener).copied()?;
        let seq = inv.cseq()?.seq;
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(method);
        out.push(b' ');
        out.extend_from_slice(inv.request_uri()?);
        out.extend_from_slice(b" SIP/2.0\r\n");
        out.extend_from_slice(
            format!(
                "Via: SIP/2.0/{} {};branch={};rport\r\n",
                client.target.transport.via_name(),
                hostport(listener.addr),
                client.branch
            )
            .as_bytes(),
        );
        for (range, _) in inv.routes().iter().skip(client.popped_routes) {
            push_header(&mut out, b"Route", inv.slice(range));
        }
        out.extend_from_slice(b"Max-Forwards: 70\r\n");
        push_header(&mut out, b"From", inv.header(HeaderName::From)?);
        push_header(&mut out, b"To", to.or_else(|| inv.header(HeaderName::To))?);
        push_header(&mut out, b"Call-ID", inv.call_id()?);
        out.extend_from_slice(b"CSeq: ");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(method);
        out.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        Some(Bytes::from(out))
    }

    /// A response to `req` built by us: its Vias (the top one with `received`/`rport`),
    /// From, To (with `to_tag` added when it has none and this is not a 100), Call-ID, CSeq.
    fn build_response(
        &self,
        req: &Message,
        source: &Peer,
        code: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) -> Bytes {
        let mut out = Vec::with_capacity(384);
        out.extend_from_slice(format!("SIP/2.0 {code} {reason}\r\n").as_bytes());
        let top = req.top_via();
        let top_edit = top
            .as_ref()
            .and_then(|v| via_with_received(req, v, source).map(|s| (v.range.clone(), s)));
        for h in req.headers_named(HeaderName::Via) {
            let line = req.slice(&h.line);
            match &top_edit {
                Some((range, value)) if h.line.start <= range.start && range.end <= h.line.end => {
                    out.extend_from_slice(req.slice(&(h.line.start..range.start)));
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(req.slice(&(range.end..h.line.end)));
                }
                _ => out.extend_from_slice(line),
            }
        }
        for name in [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
        ] {
            if let Some(h) = req.headers_named(name).next() {
                if name == HeaderName::To && code > 100 && !has_to_tag(req) {
                    if let Some(tag) = to_tag {
                        out.extend_from_slice(req.slice(&(h.line.start..h.value.end)));
                        out.extend_from_slice(b";tag=");
                        out.extend_from_slice(tag.as_bytes());
                        out.extend_from_slice(req.slice(&(h.value.end..h.line.end)));
                        continue;
                    }
                }
                out.extend_from_slice(req.slice(&h.line));
            }
        }
        out.extend_from_slice(b"Server: precall\r\nContent-Length: 0\r\n\r\n");
        Bytes::from(out)
    }

    /// Builds and sends a response to a request we do not keep state for.
    fn respond(
        &mut self,
        req: &Message,
        from: &Peer,
        code: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) {
        let tag = to_tag.unwrap_or(&self.tag_prefix).to_string();
        let bytes = self.build_response(req, from, code, reason, Some(&tag));
        let t = reply_target(req.top_via().as_ref(), from, bytes);
        self.out.push_back(Output::Transmit(t));
    }

    /// The configured id of call `id`'s agent, as a metric label (`unknown` when gone).
    fn agent_label(&self, id: u64) -> String {
        self.calls
            .get(&id)
            .and_then(|c| c.agents.config.agents.get(c.agent))
            .map_or_else(|| "unknown".to_string(), |a| a.id.clone())
    }

    /// The one place a call's outcome is known: logs it, counts it
    /// (`precall_calls_total`) and publishes it to the status page, once per call.
    fn log_call(&mut self, id: u64, outcome: &'static str, answer: u16) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.logged {
            return;
        }
        call.logged = true;
        let agent = call
            .agents
            .config
            .agents
            .get(call.agent)
            .map_or("?", |a| a.id.as_str());
        let call_id = String::from_utf8_lossy(call.invite.call_id().unwrap_or_default());
        let caller = call.caller.as_ref().map_or("-", |c| c.as_str());
        let (status, wait_ms) = match call.settled {
            Some((s, w)) => (s.as_str(), w),
            None => ("cancelled", 0),
        };
        info!(call_id = %call_id, agent, caller, status, wait_ms, answer, outcome, "call");
        metrics::counter!(
            observe::CALLS,
            "agent" => agent.to_string(),
            "status" => status,
            "outcome" => outcome
        )
        .increment(1);
        self.call_log.push(CallRecord {
            ended_ms: 0, // stamped by the log: the core reads no clock
            call_id: call_id.into_owned(),
            agent: agent.to_string(),
            caller: caller.to_string(),
            status,
            wait_ms,
            answer,
            outcome,
        });
    }

    /// The listener whose address goes into Via/Record-Route for `transport`: one of that
    /// transport, else (TLS without a `tls:` listener) a TCP one, else the first.
    fn listener_for(&self, transport: Transport) -> usize {
        let find = |t: Transport| self.listeners.iter().position(|l| l.transport == t);
        find(transport)
            .or_else(|| {
                (transport == Transport::Tls)
                    .then(|| find(Transport::Tcp))
                    .flatten()
            })
            .unwrap_or(0)
    }

    /// Whether a URI points at one of our listeners.
    fn is_local(&self, target: &uri::UriTarget<'_>) -> bool {
        let Some(ip) = target.ip() else {
            return false;
        };
        let port = target.port.unwrap_or(5060);
        self.listeners.iter().any(|l| {
            l.addr.port() == port
                && (l.addr.ip() == ip || (l.addr.ip().is_unspecified() && ip.is_loopback()))
        })
    }

    /// A request whose Request-URI is precall itself with no user part.
    fn is_for_us(&self, msg: &Message) -> bool {
        msg.request_uri()
            .and_then(|u| std::str::from_utf8(u).ok())
            .and_then(uri::parse_target)
            .is_some_and(|t| t.user.is_none() && self.is_local(&t))
    }
}

impl Call {
    fn caller_key(&self) -> Option<CallerKey> {
        let agent = self.agents.config.agents.get(self.agent)?;
        Some(CallerKey {
            agent: agent.id.clone(),
            number: self.caller.clone()?,
        })
    }

    fn reply_target(&self, bytes: Bytes) -> Transmit {
        reply_target(self.invite.top_via().as_ref(), &self.source, bytes)
    }
}

/// Where a response to a request from `source` goes (RFC 3261 §18.2.2, RFC 3581): over TCP
/// the same connection; over UDP the source address, at the Via port unless `rport` asked
/// for the source port.
fn reply_target(via: Option<&Via<'_>>, source: &Peer, bytes: Bytes) -> Transmit {
    let mut to = source.addr;
    if source.transport == Transport::Udp {
        if let Some(via) = via {
            if via.rport.is_none() {
                to.set_port(via.port.unwrap_or(5060));
            }
        }
    }
    Transmit {
        transport: source.transport,
        to,
        conn: source.conn,
        listener: source.listener,
        bytes,
    }
}

/// Where a relayed response goes: the Via's `received` (else host) and `rport` (else port).
fn via_destination(via: &Via<'_>) -> Option<SocketAddr> {
    let host = via.received.unwrap_or(via.host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host.parse().ok()?;
    let port = match via.rport {
        Some(Some(p)) => p,
        _ => via.port.unwrap_or(5060),
    };
    Some(SocketAddr::new(ip, port))
}

/// The sender's Via value with `received` (when the source IP differs from sent-by, or
/// rport was asked for) and `rport=PORT` filled in (RFC 3581). `None`: nothing to change.
fn via_with_received(msg: &Message, via: &Via<'_>, source: &Peer) -> Option<String> {
    let value = std::str::from_utf8(msg.slice(&via.range)).ok()?;
    let ip = source.addr.ip();
    let host = via
        .host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(via.host);
    let same_host = host.parse::<IpAddr>().ok() == Some(ip);
    let wants_rport = via.rport == Some(None);
    if (same_host && !wants_rport) || via.received.is_some() {
        return None;
    }
    let mut out = String::with_capacity(value.len() + 40);
    for (i, part) in value.split(';').enumerate() {
        if i > 0 {
            out.push(';');
        }
        if i > 0 && wants_rport && part.trim().eq_ignore_ascii_case("rport") {
            out.push_str(&format!("rport={}", source.addr.port()));
        } else {
            out.push_str(part);
        }
    }
    out.push_str(";received=");
    out.push_str(&ip.to_string());
    Some(out)
}

/// The response without its top Via value (our own): the whole header line when it held
/// only that value, else the value and its comma.
fn strip_top_via(msg: &Message) -> Vec<u8> {
    let vias = msg.vias();
    let mut edit = msg.edit();
    if let Some(top) = vias.first() {
        let same_line_next = vias.get(1).filter(|v| v.header_index == top.header_index);
        match (same_line_next, msg.headers.get(top.header_index)) {
            (Some(next), _) => {
                edit.remove(top.range.start..next.range.start);
            }
            (None, Some(h)) => {
                edit.remove(h.line.clone());
            }
            (None, None) => {}
        }
    }
    edit.finish()
}

/// Byte ranges removing the first `n` Route elements (whole lines where a line empties).
fn route_removals(msg: &Message, n: usize) -> Vec<Range<usize>> {
    let routes = msg.routes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n.min(routes.len()) {
        let (range, header) = &routes[i];
        let later_same_line = routes
            .iter()
            .skip(i + 1)
            .find(|(_, h)| h == header)
            .map(|(r, _)| r.start);
        let removing_rest_of_line = routes
            .iter()
            .enumerate()
            .filter(|(_, (_, h))| h == header)
            .all(|(j, _)| j < n);
        if removing_rest_of_line {
            if let Some(h) = msg.headers.get(*header) {
                out.push(h.line.clone());
            }
            // skip the other elements of this line
            while i < routes.len() && routes[i].1 == *header {
                i += 1;
            }
            continue;
        }
        match later_same_line {
            Some(next_start) => out.push(range.start..next_start),
            None => out.push(range.clone()),
        }
        i += 1;
    }
    out
}

fn record_route_line(l: Listener) -> String {
    format!(
        "Record-Route: <sip:{};transport={};lr>\r\n",
        hostport(l.addr),
        l.transport.param_name()
    )
}

fn hostport(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn has_to_tag(msg: &Message) -> bool {
    msg.header_str(HeaderName::To)
        .and_then(uri::tag_of)
        .is_some()
}

/// The called number: the Request-URI user, else the To user.
fn called_user(msg: &Message) -> Option<String> {
    let from_ruri = msg
        .request_uri()
        .and_then(|u| std::str::from_utf8(u).ok())
        .and_then(number::uri_user);
    if let Some(user) = from_ruri {
        return Some(user.to_string());
    }
    msg.header_str(HeaderName::To)
        .and_then(number::uri_user)
        .map(str::to_string)
}

fn request_uri_target(msg: &Message) -> Option<(SocketAddr, Option<Transport>, bool)> {
    let t = msg
        .request_uri()
        .and_then(|u| std::str::from_utf8(u).ok())
        .and_then(uri::parse_target)?;
    Some((t.socket_addr()?, t.transport, t.secure))
}

/// The header lines for a call: the injection mode's context headers, then the status
/// headers and `extra` (`Route`, `Delivery`) under the agent's prefix.
fn render_injection(
    cfg: &crate::config::InjectConfig,
    status: Status,
    wait_ms: u64,
    context: &Map<String, Value>,
    extra: &[(&str, String)],
) -> Vec<u8> {
    inject::render_for_mode(cfg, status, wait_ms, context, extra)
}

/// `inject.mode = "http"`: what the agent's endpoint receives before the INVITE.
fn delivery_payload(
    call: &Call,
    target: &AgentConfig,
    plan: &Plan,
    status: Status,
    wait_ms: u64,
) -> Bytes {
    let call_id = String::from_utf8_lossy(call.invite.call_id().unwrap_or_default());
    let body = inject::delivery_body(&inject::Delivery {
        call_id: &call_id,
        agent_id: &target.id,
        caller: call.caller.as_ref().map_or("", |c| c.as_str()),
        called: &call.called,
        status,
        wait_ms,
        route: plan.route.as_deref(),
        context: &plan.context,
    });
    Bytes::from(body.to_string())
}

/// `lookup_url`: what the pull look-up sends.
fn lookup_payload(call: &Call, key: &CallerKey) -> Bytes {
    let body = serde_json::json!({
        "agentId": key.agent,
        "phoneNumber": key.number.as_str(),
        "calledNumber": call.called,
        "callId": String::from_utf8_lossy(call.invite.call_id().unwrap_or_default()),
    });
    Bytes::from(body.to_string())
}

/// A short description of an HTTP answer for logs (never the body: it may hold context).
fn answer_summary(answer: &HttpAnswer) -> String {
    match answer {
        HttpAnswer::Status { code, body } => format!("{code} ({} bytes)", body.len()),
        HttpAnswer::Failed(reason) => reason.clone(),
    }
}

mod guard;
pub use guard::GuardStats;

#[cfg(test)]
mod tests;
