//! TOML → validated [`Config`]. Binds nothing, opens nothing: a bad config fails here,
//! before any socket exists, with errors that name the key and the problem.
//!
//! Two steps: serde reads the document into raw structs that mirror the TOML layout
//! (DESIGN.md "Config sketch"; `deny_unknown_fields`, so a typo such as `lisen` is an error
//! rather than a silently ignored key), then validation turns them into the types below,
//! collecting every problem it finds (`agents[0].upstream: ...`) instead of stopping at the
//! first. A TOML syntax or type error stops the first step; it is reported with its line
//! and column.
//!
//! TLS keys (`sip.tls_cert`/`tls_key`/`tls_ca`, `http.tls_cert`/`tls_key`) are checked
//! here for presence and pairing, and that the files exist; the PEM contents are read by
//! `precall run` before any socket is bound (and by `precall check`).
//!
//! Routing rules (`[[agents.routes]]`) are compiled here (see [`crate::route`]), so a
//! broken `when` fails the load, and `precall check`, naming the agent and the rule:
//! `agents[0] ("support-agent").routes[1] ("fraud").when: column 14: ...`.
//!
//! `[store]` with `backend = "redis"` takes exactly one of `url` (one server), `cluster`
//! (Redis Cluster seed nodes) or `sentinel` (a master found through Sentinel), plus
//! `key_prefix` and `timeout_ms` ([`RedisConfig`]). With `backend = "memory"` those keys
//! are still checked but not used, so one file can serve both kinds of node.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use phonenumber::country::Id as Region;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::inject;
use crate::number;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub sip: SipConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    /// In file order: the first agent whose `numbers` match a called number wins.
    pub agents: Vec<AgentConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    /// TCP with TLS (RFC 3261 §26.2; `tls:` listeners, `sips:` and `;transport=tls`).
    Tls,
}

impl Transport {
    /// As written in a Via header (`SIP/2.0/UDP`).
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
    /// As written in a URI `transport=` parameter.
    pub fn param_name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
    /// Whether messages are framed on a connection (TCP, TLS) rather than datagrams.
    pub fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }
}

/// One `[sip] listen` entry, e.g. `udp:127.0.0.1:5060`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// Where a caller's number is read from, in order (`caller_sources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerSource {
    /// P-Asserted-Identity, believed only from `sip.trusted_peers`.
    Pai,
    /// The From header.
    From,
}

#[derive(Debug, Clone)]
pub struct SipConfig {
    pub listen: Vec<ListenAddr>,
    /// Peers whose P-Asserted-Identity is believed.
    pub trusted_peers: Vec<IpNet>,
    /// Agent id that takes calls whose called number matches no agent.
    pub default_agent: Option<String>,
    /// Default caller sources for agents that do not set their own. Default `["pai", "from"]`.
    pub caller_sources: Vec<CallerSource>,
    /// Record-Route dialog-creating requests (default true).
    pub record_route: bool,
    /// RFC 3261 T1 (default 500 ms).
    pub t1: Duration,
    /// Largest SIP message accepted, UDP or TCP (default 65535).
    pub max_message_bytes: usize,
    /// `drain_secs` (default 30): on SIGTERM, how long held calls may finish.
    pub drain: Duration,
    /// `tls_cert`, `tls_key` (for `tls:` listeners) and `tls_ca` (for TLS upstreams).
    pub tls: SipTls,
    /// Flood and hostile-peer limits (README "Limits").
    pub limits: SipLimits,
}

/// TLS settings of the SIP side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SipTls {
    /// PEM chain served on `tls:` listeners (required when there is one).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM certificates trusted for TLS upstreams, besides the bundled Mozilla roots.
    pub ca: Option<PathBuf>,
}

/// `[sip]` limits against floods, scanners and hostile peers (README "Limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipLimits {
    /// `allowed_peers`: who may send requests at all (networks); empty (default) means
    /// anyone. Configured upstreams always may (their BYEs and re-INVITEs must pass).
    pub allowed_peers: Vec<IpNet>,
    /// `max_tcp_connections` (1024): inbound connections open at once; past it a new
    /// connection is closed as soon as it is accepted.
    pub max_tcp_connections: usize,
    /// `tcp_idle_secs` (120): a connection on which no complete message went either way
    /// for this long is closed (slowloris: trickling bytes never count).
    pub tcp_idle: Duration,
    /// `max_held_calls` (10000): calls held for context at once; past it a new INVITE
    /// gets `503` with `Retry-After`.
    pub max_held_calls: usize,
    /// `invite_rate_per_sec` (100, 0 = off) and `invite_burst` (twice the rate): new
    /// INVITEs per source IP, `trusted_peers` exempt; over it `503` with `Retry-After`.
    pub invite_rate: Option<Rate>,
    /// `drop_scanners` (true): requests whose User-Agent names a known SIP scanner
    /// (friendly-scanner, sipvicious, ...) are dropped without an answer.
    pub drop_scanners: bool,
    /// `stats_secs` (60, 0 = off): how often the `stats` log line is written.
    pub stats_every: Option<Duration>,
}

impl Default for SipLimits {
    fn default() -> Self {
        SipLimits {
            allowed_peers: Vec::new(),
            max_tcp_connections: 1024,
            tcp_idle: Duration::from_secs(120),
            max_held_calls: 10_000,
            invite_rate: Some(Rate {
                per_sec: 100,
                burst: 200,
            }),
            drop_scanners: true,
            stats_every: Some(Duration::from_secs(60)),
        }
    }
}

impl Default for SipConfig {
    /// The defaults of an empty `[sip]` table, except `listen`, which is empty here.
    fn default() -> Self {
        SipConfig {
            listen: Vec::new(),
            trusted_peers: Vec::new(),
            default_agent: None,
            caller_sources: vec![CallerSource::Pai, CallerSource::From],
            record_route: true,
            t1: Duration::from_millis(500),
            max_message_bytes: 65_535,
            drain: Duration::from_secs(30),
            tls: SipTls::default(),
            limits: SipLimits::default(),
        }
    }
}

/// `http.tls_cert` and `http.tls_key`: both set, the webhook is served over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A token-bucket rate: `per_sec` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

/// A secret that never shows in `Debug` output (configs are printed and logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Webhook body limit (`max_body_bytes`, default 16384).
    pub max_body_bytes: usize,
    /// Most outgoing HTTP calls (pull look-ups and context deliveries) in flight at once
    /// (`client_concurrency`, default 256); past it a call waits for a slot, bounded by
    /// its own timeout.
    pub client_concurrency: usize,
    /// HTTPS when set.
    pub tls: Option<HttpTls>,
    /// `admin_password`: enables the status page `/ui/` (HTTP Basic, user `admin`).
    pub admin_password: Option<String>,
    /// `rate_limit_per_sec` (100, 0 = off) and `rate_limit_burst` (twice the rate):
    /// webhook requests per API key; over it `429` with `Retry-After`.
    pub rate_limit: Option<Rate>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 16_384,
            client_concurrency: 256,
            tls: None,
            admin_password: None,
            rate_limit: Some(Rate {
                per_sec: 100,
                burst: 200,
            }),
        }
    }
}

/// Which [`crate::store::ContextStore`] backs the contexts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// In this process only (the embedded default).
    Memory,
    /// Shared by every sidecar pointing at the same Redis and `key_prefix`.
    Redis(RedisConfig),
}

/// `[store]` for `backend = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub target: RedisTarget,
    /// `key_prefix`, default `precall`: keys are `{key_prefix}:{agent}:{number}`, the
    /// pub/sub channel `{key_prefix}:published`. Deployments sharing one Redis keep apart
    /// by using different prefixes.
    pub key_prefix: String,
    /// `timeout_ms`, default 500: the bound on every Redis command and connection attempt.
    pub timeout: Duration,
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `url`: one server (`redis://`, `rediss://` for TLS; user, password and db in the URL).
    Single(RedisUrl),
    /// `cluster = [urls]`: seed nodes of a Redis Cluster (any reachable one is enough).
    Cluster(Vec<RedisUrl>),
    /// `sentinel = { master = "...", urls = [...] }`: the current master of `master`, as
    /// the Sentinels at `urls` report it. `url`, when also given, supplies the credentials,
    /// db and TLS for the master (its host and port are not used).
    Sentinel {
        master: String,
        urls: Vec<RedisUrl>,
        master_url: Option<RedisUrl>,
    },
}

/// A `redis://` or `rediss://` URL as written. `Debug` and `Display` hide the password, so
/// a logged or printed config never leaks it; [`RedisUrl::expose`] gives the real thing.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL with its password, for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL asks for TLS.
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // scheme://[user[:password]@]host...: replace what follows the first ':' of the
        // userinfo, if there is userinfo at all.
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str(&self.0);
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                if userinfo.contains(':') {
                    write!(f, "{scheme}://{user}:***@{host}{path}")
                } else {
                    write!(f, "{scheme}://***@{host}{path}")
                }
            }
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// `ttl_secs`, default 300.
    pub ttl: Duration,
    /// `consume`, default true: a context is used by one call only.
    pub consume: bool,
    /// `max_contexts` (1000000, memory backend): past it a webhook for a new key gets
    /// `503` (keys already cached may still be replaced); expired ones are swept first.
    pub max_contexts: usize,
}

impl Default for StoreConfig {
    /// The defaults of an empty `[store]` table: the memory backend.
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Memory,
            ttl: Duration::from_secs(300),
            consume: true,
            max_contexts: 1_000_000,
        }
    }
}

/// Where an agent's calls go: parsed from `sip:HOST:PORT;transport=udp|tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The URI as written in the config.
    pub uri: String,
    pub transport: Transport,
    /// Resolved once at load time.
    pub addr: SocketAddr,
}

/// How context reaches the agent (`inject.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectMode {
    /// One `{prefix}{field}` header per field (v0).
    Headers,
    /// One `{prefix}Context` header: base64url (no padding) of the compact JSON object.
    Json,
    /// POST to `inject.url` before forwarding; the INVITE carries the status headers only.
    Http,
    /// Headers and the HTTP POST.
    Both,
}

impl InjectMode {
    /// As written in the config (`inject.mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            InjectMode::Headers => "headers",
            InjectMode::Json => "json",
            InjectMode::Http => "http",
            InjectMode::Both => "both",
        }
    }
    /// Whether context fields go into SIP headers one by one.
    pub fn has_field_headers(self) -> bool {
        matches!(self, InjectMode::Headers | InjectMode::Both)
    }
    /// Whether the context is POSTed to `inject.url` before forwarding.
    pub fn has_http(self) -> bool {
        matches!(self, InjectMode::Http | InjectMode::Both)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub mode: InjectMode,
    /// Header name prefix, default `X-Precall-`; must be a SIP token.
    pub prefix: String,
    /// Upper bound on the bytes of context header lines added (default 1024).
    pub max_bytes: usize,
    /// `http`/`both`: where the context is POSTed (required for those modes).
    pub url: Option<String>,
    /// `http`/`both`: bound on the POST (`timeout_ms`, default 300).
    pub timeout: Duration,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            mode: InjectMode::Headers,
            prefix: "X-Precall-".to_string(),
            max_bytes: 1024,
            url: None,
            timeout: Duration::from_millis(300),
        }
    }
}

/// Pull mode: ask an outside system for the context on a miss (`lookup_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupConfig {
    pub url: String,
    /// `lookup_timeout_ms`, default 1000.
    pub timeout: Duration,
}

/// Where a matching route sends the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// `upstream = "sip:..."` or a list: these upstreams instead of the agent's.
    Upstreams(Vec<Upstream>),
    /// `agent = "id"`: hand over to that agent (its upstreams and injection).
    Agent(String),
    /// Neither: stay with this agent, only `set` fields are added.
    Stay,
}

/// One `[[agents.routes]]` entry, validated (its `when` compiles).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: Option<String>,
    /// CEL over the context fields plus `caller`, `called`, `agent`, `status`.
    pub when: String,
    pub target: RouteTarget,
    /// Extra fields injected like context.
    pub set: Map<String, Value>,
}

impl RouteConfig {
    /// What `X-Precall-Route` carries: the name, else the index.
    pub fn label(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| index.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: String,
    pub api_keys: Vec<String>,
    /// Called numbers this agent serves, normalised to E.164 with `default_region`.
    pub numbers: Vec<String>,
    /// `upstream`: one URI or a list, tried in order on failure (never empty).
    pub upstreams: Vec<Upstream>,
    /// `upstream_timeout_ms` (default 2000): no provisional by then → the next upstream.
    pub upstream_timeout: Duration,
    /// `health_check_secs`: OPTIONS-probe each upstream this often; `None` = off.
    pub health_check: Option<Duration>,
    /// `lookup_url` (+ `lookup_timeout_ms`): pull mode.
    pub lookup: Option<LookupConfig>,
    /// `[[agents.routes]]`, evaluated in order once the context is settled.
    pub routes: Vec<RouteConfig>,
    pub default_region: phonenumber::country::Id,
    /// `fallback_wait_ms`, default 2000.
    pub fallback_wait: Duration,
    /// Fields used when no context arrived in time (and to fill fields a context lacks).
    pub defaults: Map<String, Value>,
    pub inject: InjectConfig,
    pub caller_sources: Vec<CallerSource>,
    /// `webhook_secret`: when set, webhook POSTs must carry a valid `X-Precall-Signature`
    /// (HMAC-SHA256 of `"{t}.{body}"`, README "Webhook signatures").
    pub webhook_secret: Option<Secret>,
}

impl AgentConfig {
    /// An agent with every optional key at its default: no numbers, no API keys, region
    /// US, 2 s fallback wait, no defaults, no routes, no look-up, headers injection. For
    /// tests and tools that build configs in code; set fields afterwards.
    pub fn new(id: impl Into<String>, upstreams: Vec<Upstream>) -> AgentConfig {
        AgentConfig {
            id: id.into(),
            api_keys: Vec::new(),
            numbers: Vec::new(),
            upstreams,
            upstream_timeout: Duration::from_millis(UPSTREAM_TIMEOUT_MS_DEFAULT),
            health_check: None,
            lookup: None,
            routes: Vec::new(),
            default_region: Region::US,
            fallback_wait: Duration::from_millis(2000),
            defaults: Map::new(),
            inject: InjectConfig::default(),
            caller_sources: vec![CallerSource::Pai, CallerSource::From],
            webhook_secret: None,
        }
    }
}

/// Every problem found in a config file, each naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Transport {
    /// A `transport=` value or a listen scheme, ignoring ASCII case.
    fn from_name(name: &str) -> Option<Transport> {
        if name.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if name.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if name.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.param_name())
    }
}

impl ListenAddr {
    /// `udp:ADDR:PORT`, `tcp:ADDR:PORT` or `tls:ADDR:PORT`, ADDR an IP literal (`[::1]`
    /// for IPv6).
    pub fn parse(text: &str) -> Option<ListenAddr> {
        let (scheme, addr) = text.split_once(':')?;
        Some(ListenAddr {
            transport: Transport::from_name(scheme)?,
            addr: addr.parse().ok()?,
        })
    }
}

impl fmt::Display for ListenAddr {
    /// As written in the config: `udp:127.0.0.1:5060`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transport, self.addr)
    }
}

impl Upstream {
    /// Parses `sip:HOST[:PORT][;transport=udp|tcp|tls]` (transport default udp) or
    /// `sips:HOST[:PORT]` (TLS); the port defaults to 5060, or 5061 for TLS (RFC 3261
    /// §19.1.2). An `lr` parameter is allowed and ignored. HOST is an IP literal (`[::1]`
    /// for IPv6) or a name, resolved here, once, with the system resolver: the first
    /// address wins. For TLS the certificate is checked against HOST as written.
    ///
    /// # Errors
    /// A message saying what is wrong with `uri`, without the key.
    pub fn parse(uri: &str) -> Result<Upstream, String> {
        let shape = || {
            format!("{uri:?} is not sip:HOST[:PORT][;transport=udp|tcp|tls] or sips:HOST[:PORT]")
        };
        let (rest, secure) = match uri.get(..4) {
            Some(s) if s.eq_ignore_ascii_case("sip:") => (uri.get(4..).unwrap_or(""), false),
            _ if uri
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case("sips:")) =>
            {
                (uri.get(5..).unwrap_or(""), true)
            }
            _ => return Err(shape()),
        };
        let mut parts = rest.split(';');
        let hostport = parts.next().unwrap_or("");
        let mut transport = if secure {
            Transport::Tls
        } else {
            Transport::Udp
        };
        for param in parts {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            if name.eq_ignore_ascii_case("transport") {
                transport = Transport::from_name(value).ok_or_else(|| {
                    format!("{uri:?}: transport {value:?} is not udp, tcp or tls")
                })?;
            } else if !name.eq_ignore_ascii_case("lr") {
                return Err(format!(
                    "{uri:?}: unknown parameter {param:?} (only transport=udp|tcp|tls)"
                ));
            }
        }
        if secure && transport != Transport::Tls {
            return Err(format!(
                "{uri:?}: a sips: URI is reached over TLS only (drop the transport parameter)"
            ));
        }
        if hostport.contains('@') {
            return Err(format!(
                "{uri:?}: an upstream is a host, without a user part"
            ));
        }
        let default_port = if transport == Transport::Tls {
            5061
        } else {
            5060
        };
        let (host, port) = split_host_port(hostport, default_port).ok_or_else(shape)?;
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => (host, port)
                .to_socket_addrs()
                .map_err(|e| format!("{uri:?}: cannot resolve {host:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{uri:?}: {host:?} resolves to no address"))?,
        };
        Ok(Upstream {
            uri: uri.to_string(),
            transport,
            addr,
        })
    }
}

impl Upstream {
    /// The host as written in the URI (no brackets for IPv6): the name a TLS upstream's
    /// certificate is checked against.
    pub fn host(&self) -> &str {
        let rest = self
            .uri
            .split_once(':')
            .map_or(self.uri.as_str(), |(_, rest)| rest);
        let hostport = rest.split(';').next().unwrap_or("");
        match hostport.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => hostport.split(':').next().unwrap_or(""),
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` → (host, port), port default `default_port`;
/// the host is an IPv6 literal inside brackets, else letters, digits, `.` and `-`.
fn split_host_port(hostport: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    let is_name = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    if !hostport.starts_with('[') && !is_name(host) {
        return None;
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0)?,
    };
    Some((host, port))
}

/// `sip.max_message_bytes` bounds: 65535 is the largest UDP datagram; below 256 bytes not
/// even a bare INVITE fits (small values are for tests of the limit).
const MESSAGE_BYTES: std::ops::RangeInclusive<u64> = 256..=65_535;
/// `sip.t1_ms` bounds (RFC 3261 T1 is 500 ms; every other timer is a multiple of it).
const T1_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
/// `http.max_body_bytes` bounds: room for `agentId` and `phoneNumber`, at most 1 MiB.
const BODY_BYTES: std::ops::RangeInclusive<u64> = 64..=1_048_576;
/// `fallback_wait_ms` upper bound: callers and carriers give up on a silent call long
/// before a minute.
const FALLBACK_WAIT_MS_MAX: u64 = 60_000;
/// `inject.max_bytes` upper bound: no SIP message is larger.
const INJECT_BYTES_MAX: u64 = 65_535;
/// Bounds of the `[sip]`/`[http]`/`[store]` limits (README "Limits").
const TCP_CONNECTIONS: std::ops::RangeInclusive<u64> = 1..=1_000_000;
const IDLE_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;
const HELD_CALLS: std::ops::RangeInclusive<u64> = 1..=1_000_000;
const RATE_PER_SEC: std::ops::RangeInclusive<u64> = 0..=1_000_000;
const BURST: std::ops::RangeInclusive<u64> = 1..=10_000_000;
const STATS_SECS: std::ops::RangeInclusive<u64> = 0..=86_400;
const CONTEXTS: std::ops::RangeInclusive<u64> = 1..=100_000_000;
/// `webhook_secret` length: long enough not to be guessed, short enough to be sane.
const SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=512;
/// Longest agent id / API key accepted.
const ID_MAX: usize = 128;
const KEY_MAX: usize = 512;
/// `upstream_timeout_ms`: below 50 ms even a LAN upstream may not have answered; past a
/// minute the caller has long hung up.
const UPSTREAM_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 50..=60_000;
const UPSTREAM_TIMEOUT_MS_DEFAULT: u64 = 2000;
/// `health_check_secs`: from every second to every hour.
const HEALTH_CHECK_SECS: std::ops::RangeInclusive<u64> = 1..=3600;
/// `lookup_timeout_ms` and `inject.timeout_ms`: HTTP calls made while a call is held.
const HTTP_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 10..=30_000;
/// `http.client_concurrency`.
const CLIENT_CONCURRENCY: std::ops::RangeInclusive<u64> = 1..=65_536;
/// Longest route name (it is sent as `X-Precall-Route`).
const ROUTE_NAME_MAX: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    sip: RawSip,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    agents: Vec<RawAgent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSip {
    listen: Option<Vec<String>>,
    trusted_peers: Option<Vec<String>>,
    default_agent: Option<String>,
    caller_sources: Option<Vec<String>>,
    record_route: Option<bool>,
    t1_ms: Option<u64>,
    max_message_bytes: Option<u64>,
    drain_secs: Option<u64>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_ca: Option<String>,
    allowed_peers: Option<Vec<String>>,
    max_tcp_connections: Option<u64>,
    tcp_idle_secs: Option<u64>,
    max_held_calls: Option<u64>,
    invite_rate_per_sec: Option<u64>,
    invite_burst: Option<u64>,
    drop_scanners: Option<bool>,
    stats_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    client_concurrency: Option<u64>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    admin_password: Option<String>,
    rate_limit_per_sec: Option<u64>,
    rate_limit_burst: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<String>,
    ttl_secs: Option<u64>,
    consume: Option<bool>,
    /// One Redis server (`backend = "redis"`).
    url: Option<String>,
    /// Redis Cluster seed nodes.
    cluster: Option<Vec<String>>,
    /// A master found through Redis Sentinel.
    sentinel: Option<RawSentinel>,
    key_prefix: Option<String>,
    timeout_ms: Option<u64>,
    max_contexts: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSentinel {
    master: Option<String>,
    urls: Option<Vec<String>>,
}

/// One upstream, or a list to fail over through.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a URI string such as \"sip:127.0.0.1:5070;transport=udp\""
)]
enum RawUpstream {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Option<String>,
    #[serde(default)]
    api_keys: Vec<String>,
    #[serde(default)]
    numbers: Vec<String>,
    upstream: Option<RawUpstream>,
    upstream_timeout_ms: Option<u64>,
    health_check_secs: Option<u64>,
    lookup_url: Option<String>,
    lookup_timeout_ms: Option<u64>,
    default_region: Option<String>,
    fallback_wait_ms: Option<u64>,
    /// Deserialised straight into a JSON map, which keeps the file's order.
    defaults: Option<Map<String, Value>>,
    inject: Option<RawInject>,
    caller_sources: Option<Vec<String>>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    webhook_secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    mode: Option<String>,
    prefix: Option<String>,
    max_bytes: Option<u64>,
    url: Option<String>,
    timeout_ms: Option<u64>,
}

/// One `[[agents.routes]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    when: Option<String>,
    upstream: Option<RawUpstream>,
    agent: Option<String>,
    /// Like `defaults`: straight into a JSON map, in file order.
    set: Option<Map<String, Value>>,
}

/// Problems found so far, each `key: message`.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, key: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }
}

impl Config {
    /// Parses and validates a TOML document.
    ///
    /// # Errors
    /// Every problem found, each naming its key (`agents[0].upstream: ...`); a TOML syntax
    /// or type error alone, with its line and column.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![toml_problem(text, &e)],
        })?;
        let mut problems = Problems::default();
        let sip = validate_sip(raw.sip, &mut problems);
        let http = validate_http(raw.http, &mut problems);
        let store = validate_store(raw.store, &mut problems);
        // Checked against every id written, so an agent with some other problem does
        // not also make the default look missing.
        let ids: Vec<&str> = raw.agents.iter().filter_map(|a| a.id.as_deref()).collect();
        if let Some(id) = &sip.default_agent {
            if !ids.contains(&id.as_str()) {
                problems.add("sip.default_agent", format!("no agent {id:?}"));
            }
        }
        let agents = validate_agents(raw.agents, &sip, &mut problems);
        if problems.0.is_empty() {
            Ok(Config {
                sip,
                http,
                store,
                agents,
            })
        } else {
            Err(ConfigError {
                problems: problems.0,
            })
        }
    }

    /// Reads and validates a config file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Config::from_toml_str`] fails.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{}: {e}", path.display())],
        })?;
        Config::from_toml_str(&text)
    }

    pub fn agent(&self, id: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.id == id)
    }
}

/// A TOML error as `line L, column C: message (`the line`)`: the line shows the key.
fn toml_problem(text: &str, error: &toml::de::Error) -> String {
    // Some messages span lines ("invalid table header\nexpected ..."): keep one line.
    let message = error.message().trim_end().replace('\n', "; ");
    let Some(start) = error.span().map(|span| span.start.min(text.len())) else {
        return message;
    };
    let before = text.get(..start).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_no = before.matches('\n').count() + 1;
    let column = before
        .get(line_start..)
        .map_or(1, |s| s.chars().count() + 1);
    let line_text = text
        .get(line_start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("")
        .trim();
    // The line is quoted to show the key, unless it may hold a secret (an API key, the
    // admin password, a webhook secret, a Redis URL with its password): this text reaches
    // `precall check` output and the log of a refused reload.
    let secret = ["api_key", "password", "secret", "url", "redis"]
        .iter()
        .any(|k| line_text.to_ascii_lowercase().contains(k));
    if secret {
        return format!(
            "line {line_no}, column {column}: {message} (line not shown: it may hold a secret)"
        );
    }
    format!("line {line_no}, column {column}: {message} (`{line_text}`)")
}

fn validate_sip(raw: RawSip, problems: &mut Problems) -> SipConfig {
    let listen_text = raw
        .listen
        .unwrap_or_else(|| vec!["udp:127.0.0.1:5060".into(), "tcp:127.0.0.1:5060".into()]);
    if listen_text.is_empty() {
        problems.add("sip.listen", "at least one address");
    }
    let mut listen: Vec<ListenAddr> = Vec::new();
    for (i, text) in listen_text.iter().enumerate() {
        match ListenAddr::parse(text) {
            // Port 0 (tests: "any free port") may repeat; anything else would fail to bind.
            Some(addr) if addr.addr.port() != 0 && listen.contains(&addr) => {
                problems.add(
                    format_args!("sip.listen[{i}]"),
                    format!("{text:?} is listed twice"),
                );
            }
            Some(addr) => listen.push(addr),
            None => problems.add(
                format_args!("sip.listen[{i}]"),
                format!("{text:?} is not udp:ADDR:PORT, tcp:ADDR:PORT or tls:ADDR:PORT"),
            ),
        }
    }

    let mut trusted_peers = Vec::new();
    for (i, text) in raw.trusted_peers.unwrap_or_default().iter().enumerate() {
        let net = text
            .parse::<IpNet>()
            .map(|net| net.trunc())
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => trusted_peers.push(net),
            Err(_) => problems.add(
                format_args!("sip.trusted_peers[{i}]"),
                format!("{text:?} is not an IP address or network (10.0.0.0/8)"),
            ),
        }
    }

    let caller_sources = match raw.caller_sources {
        Some(texts) => caller_sources(&texts, "sip.caller_sources", problems),
        None => vec![CallerSource::Pai, CallerSource::From],
    };

    let t1_ms = raw.t1_ms.unwrap_or(500);
    if !T1_MS.contains(&t1_ms) {
        problems.add("sip.t1_ms", in_range(t1_ms, &T1_MS));
    }
    let max_message_bytes = raw.max_message_bytes.unwrap_or(65_535);
    if !MESSAGE_BYTES.contains(&max_message_bytes) {
        problems.add(
            "sip.max_message_bytes",
            in_range(max_message_bytes, &MESSAGE_BYTES),
        );
    }
    let drain_secs = raw.drain_secs.unwrap_or(30);
    {
        if drain_secs > 3600 {
            problems.add(
                "sip.drain_secs",
                format!("{drain_secs} is more than an hour (3600)"),
            );
        }
    }
    if let Some(id) = &raw.default_agent {
        if id.is_empty() {
            problems.add(
                "sip.default_agent",
                "empty; leave the key out for no default",
            );
        }
    }

    let cert = pem_path("sip.tls_cert", raw.tls_cert, problems);
    let key = pem_path("sip.tls_key", raw.tls_key, problems);
    let ca = pem_path("sip.tls_ca", raw.tls_ca, problems);
    let has_tls_listener = listen.iter().any(|l| l.transport == Transport::Tls);
    match (&cert, &key) {
        (Some(_), None) => problems.add("sip.tls_key", "missing (sip.tls_cert is set)"),
        (None, Some(_)) => problems.add("sip.tls_cert", "missing (sip.tls_key is set)"),
        (None, None) if has_tls_listener => problems.add(
            "sip.tls_cert",
            "missing: a tls: listener needs sip.tls_cert and sip.tls_key (PEM files)",
        ),
        _ => {}
    }

    let limits = SipLimits {
        allowed_peers: nets(
            raw.allowed_peers.as_deref().unwrap_or_default(),
            "sip.allowed_peers",
            problems,
        ),
        max_tcp_connections: bounded(
            raw.max_tcp_connections,
            1024,
            &TCP_CONNECTIONS,
            "sip.max_tcp_connections",
            problems,
        ),
        tcp_idle: Duration::from_secs(bounded(
            raw.tcp_idle_secs,
            120,
            &IDLE_SECS,
            "sip.tcp_idle_secs",
            problems,
        )),
        max_held_calls: bounded(
            raw.max_held_calls,
            10_000,
            &HELD_CALLS,
            "sip.max_held_calls",
            problems,
        ),
        invite_rate: rate(
            (raw.invite_rate_per_sec, "sip.invite_rate_per_sec", 100),
            (raw.invite_burst, "sip.invite_burst"),
            problems,
        ),
        drop_scanners: raw.drop_scanners.unwrap_or(true),
        stats_every: match bounded(raw.stats_secs, 60, &STATS_SECS, "sip.stats_secs", problems) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
    };

    SipConfig {
        listen,
        trusted_peers,
        default_agent: raw.default_agent,
        caller_sources,
        record_route: raw.record_route.unwrap_or(true),
        t1: Duration::from_millis(t1_ms),
        max_message_bytes: usize::try_from(max_message_bytes).unwrap_or(65_535),
        drain: Duration::from_secs(drain_secs),
        tls: SipTls { cert, key, ca },
        limits,
    }
}

/// A PEM file path key: non-empty, and the file exists (its contents are read later).
fn pem_path(key: &str, raw: Option<String>, problems: &mut Problems) -> Option<PathBuf> {
    let text = raw?;
    if text.is_empty() {
        problems.add(key, "empty; leave the key out instead");
        return None;
    }
    let path = PathBuf::from(&text);
    if !path.is_file() {
        problems.add(key, format!("{text:?} is not a readable file"));
    }
    Some(path)
}

/// Shortest `http.admin_password`: the status page shows API keys.
const ADMIN_PASSWORD_MIN: usize = 8;

fn admin_password(raw: Option<String>, problems: &mut Problems) -> Option<String> {
    let password = raw?;
    if password.len() < ADMIN_PASSWORD_MIN || password.chars().any(|c| c.is_control()) {
        problems.add(
            "http.admin_password",
            format!("must be at least {ADMIN_PASSWORD_MIN} characters, without control characters"),
        );
        return None;
    }
    Some(password)
}

/// IP addresses or networks (`10.0.0.0/8`), host bits cleared.
fn nets(texts: &[String], key: &str, problems: &mut Problems) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let net = text
            .parse::<IpNet>()
            .map(|net| net.trunc())
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => out.push(net),
            Err(_) => problems.add(
                format_args!("{key}[{i}]"),
                format!("{text:?} is not an IP address or network (10.0.0.0/8)"),
            ),
        }
    }
    out
}

/// `value` (or `default`) checked against `range`; the default on a problem.
fn bounded<T: TryFrom<u64> + Copy>(
    value: Option<u64>,
    default: T,
    range: &std::ops::RangeInclusive<u64>,
    key: &str,
    problems: &mut Problems,
) -> T {
    match value {
        None => default,
        Some(v) if range.contains(&v) => T::try_from(v).unwrap_or(default),
        Some(v) => {
            problems.add(key, in_range(v, range));
            default
        }
    }
}

/// A rate key (`0` = off) and its burst key (default twice the rate).
fn rate(
    (per_sec, per_sec_key, default): (Option<u64>, &str, u32),
    (burst, burst_key): (Option<u64>, &str),
    problems: &mut Problems,
) -> Option<Rate> {
    let per_sec: u32 = bounded(per_sec, default, &RATE_PER_SEC, per_sec_key, problems);
    let burst: u32 = bounded(
        burst,
        per_sec.saturating_mul(2).max(1),
        &BURST,
        burst_key,
        problems,
    );
    (per_sec > 0).then_some(Rate { per_sec, burst })
}

fn validate_http(raw: RawHttp, problems: &mut Problems) -> HttpConfig {
    let fallback = SocketAddr::from(([127, 0, 0, 1], 8080));
    let listen = match raw.listen.as_deref() {
        None => fallback,
        Some(text) => text.parse().unwrap_or_else(|_| {
            problems.add(
                "http.listen",
                format!("{text:?} is not ADDR:PORT with ADDR an IP address (127.0.0.1:8080)"),
            );
            fallback
        }),
    };
    let max_body_bytes = raw.max_body_bytes.unwrap_or(16_384);
    if !BODY_BYTES.contains(&max_body_bytes) {
        problems.add("http.max_body_bytes", in_range(max_body_bytes, &BODY_BYTES));
    }
    let client_concurrency = raw.client_concurrency.unwrap_or(256);
    if !CLIENT_CONCURRENCY.contains(&client_concurrency) {
        problems.add(
            "http.client_concurrency",
            in_range(client_concurrency, &CLIENT_CONCURRENCY),
        );
    }
    let cert = pem_path("http.tls_cert", raw.tls_cert, problems);
    let key = pem_path("http.tls_key", raw.tls_key, problems);
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(HttpTls { cert, key }),
        (Some(_), None) => {
            problems.add("http.tls_key", "missing (http.tls_cert is set)");
            None
        }
        (None, Some(_)) => {
            problems.add("http.tls_cert", "missing (http.tls_key is set)");
            None
        }
        (None, None) => None,
    };
    HttpConfig {
        listen,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(16_384),
        client_concurrency: usize::try_from(client_concurrency).unwrap_or(256),
        tls,
        admin_password: admin_password(raw.admin_password, problems),
        rate_limit: rate(
            (raw.rate_limit_per_sec, "http.rate_limit_per_sec", 100),
            (raw.rate_limit_burst, "http.rate_limit_burst"),
            problems,
        ),
    }
}

fn validate_store(raw: RawStore, problems: &mut Problems) -> StoreConfig {
    let is_redis = match raw.backend.as_deref() {
        None | Some("memory") => false,
        Some("redis") => true,
        Some(other) => {
            problems.add(
                "store.backend",
                format!("{other:?} is not \"memory\" or \"redis\""),
            );
            false
        }
    };
    let ttl_secs = raw.ttl_secs.unwrap_or(300);
    if ttl_secs == 0 {
        problems.add("store.ttl_secs", "must be at least 1");
    }
    let redis = validate_redis(&raw, is_redis, problems);
    StoreConfig {
        backend: redis.map_or(StoreBackend::Memory, StoreBackend::Redis),
        ttl: Duration::from_secs(ttl_secs),
        consume: raw.consume.unwrap_or(true),
        max_contexts: bounded(
            raw.max_contexts,
            1_000_000,
            &CONTEXTS,
            "store.max_contexts",
            problems,
        ),
    }
}

/// `store.timeout_ms` bounds: a Redis answer slower than 30 s is no answer for a call.
const STORE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1..=30_000;

/// The Redis keys of `[store]`. They are checked whatever the backend (a shared file may
/// carry them on a memory node); the result is `Some` only for `backend = "redis"` without
/// problems.
fn validate_redis(raw: &RawStore, is_redis: bool, problems: &mut Problems) -> Option<RedisConfig> {
    let before = problems.0.len();
    let url = raw
        .url
        .as_deref()
        .and_then(|url| redis_url("store.url", url, problems));
    let cluster = raw.cluster.as_ref().map(|urls| {
        if urls.is_empty() {
            problems.add("store.cluster", "list at least one redis:// URL");
        }
        urls.iter()
            .enumerate()
            .filter_map(|(i, url)| redis_url(format!("store.cluster[{i}]"), url, problems))
            .collect::<Vec<_>>()
    });
    let sentinel = raw.sentinel.as_ref().map(|raw| {
        let master = raw.master.clone().unwrap_or_default();
        if master.is_empty() || master.chars().any(|c| c.is_whitespace() || c.is_control()) {
            problems.add(
                "store.sentinel.master",
                "the master's name as the Sentinels know it, e.g. \"mymaster\"",
            );
        }
        let urls = raw.urls.clone().unwrap_or_default();
        if urls.is_empty() {
            problems.add(
                "store.sentinel.urls",
                "list at least one Sentinel, e.g. [\"redis://10.0.0.1:26379\"]",
            );
        }
        let urls: Vec<RedisUrl> = (urls.iter().enumerate())
            .filter_map(|(i, url)| redis_url(format!("store.sentinel.urls[{i}]"), url, problems))
            .collect();
        (master, urls)
    });
    let key_prefix = raw
        .key_prefix
        .clone()
        .unwrap_or_else(|| "precall".to_string());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        problems.add(
            "store.key_prefix",
            format!(
                "{key_prefix:?} must be 1 to 64 characters, without spaces or control characters"
            ),
        );
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(500);
    if !STORE_TIMEOUT_MS.contains(&timeout_ms) {
        problems.add("store.timeout_ms", in_range(timeout_ms, &STORE_TIMEOUT_MS));
    }
    let target = match (url, cluster, sentinel) {
        (Some(url), None, None) => Some(RedisTarget::Single(url)),
        (None, Some(urls), None) => Some(RedisTarget::Cluster(urls)),
        (master_url, None, Some((master, urls))) => Some(RedisTarget::Sentinel {
            master,
            urls,
            master_url,
        }),
        _ => None,
    };
    if raw.cluster.is_some() && (raw.url.is_some() || raw.sentinel.is_some()) {
        problems.add(
            "store.cluster",
            "use store.cluster alone, without store.url or store.sentinel",
        );
    }
    if is_redis && raw.url.is_none() && raw.cluster.is_none() && raw.sentinel.is_none() {
        problems.add(
            "store.backend",
            "\"redis\" needs store.url, store.cluster or store.sentinel",
        );
    }
    if !is_redis || problems.0.len() > before {
        return None;
    }
    target.map(|target| RedisConfig {
        target,
        key_prefix,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// A `redis://` or `rediss://` URL the Redis client can read (host, port, db, user,
/// password); parsing it opens nothing.
fn redis_url(key: impl fmt::Display, url: &str, problems: &mut Problems) -> Option<RedisUrl> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        // Only the scheme is quoted: the rest may hold a password.
        let shown = url.split_once("://").map_or(url, |(scheme, _)| scheme);
        problems.add(
            key,
            format!("{shown:?}... is not a redis:// or rediss:// URL"),
        );
        return None;
    }
    let shown = RedisUrl(url.to_string());
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Ok(_) => Some(shown),
        Err(error) => {
            problems.add(key, format!("{shown} is not a valid Redis URL: {error}"));
            None
        }
    }
}

fn validate_agents(
    raw: Vec<RawAgent>,
    sip: &SipConfig,
    problems: &mut Problems,
) -> Vec<AgentConfig> {
    if raw.is_empty() {
        problems.add("agents", "at least one [[agents]] table");
    }
    // API key → the agent that owns it.
    let mut key_owner: HashMap<&str, &str> = HashMap::new();
    let mut seen_ids: Vec<&str> = Vec::new();
    for (i, agent) in raw.iter().enumerate() {
        let Some(id) = agent.id.as_deref() else {
            continue;
        };
        if seen_ids.contains(&id) {
            problems.add(format_args!("agents[{i}].id"), format!("duplicate {id:?}"));
        }
        seen_ids.push(id);
        for (k, key) in agent.api_keys.iter().enumerate() {
            match key_owner.get(key.as_str()) {
                Some(&owner) if owner != id => problems.add(
                    format_args!("agents[{i}].api_keys[{k}]"),
                    format!("also used by agent {owner:?}"),
                ),
                _ => {
                    key_owner.insert(key, id);
                }
            }
        }
    }
    let ids: Vec<String> = seen_ids.iter().map(|id| id.to_string()).collect();
    raw.into_iter()
        .enumerate()
        .filter_map(|(i, agent)| validate_agent(i, agent, sip, &ids, problems))
        .collect()
}

fn validate_agent(
    i: usize,
    raw: RawAgent,
    sip: &SipConfig,
    ids: &[String],
    problems: &mut Problems,
) -> Option<AgentConfig> {
    let before = problems.0.len();
    let key = |name: &str| format!("agents[{i}].{name}");

    let id = raw.id.unwrap_or_default();
    if id.is_empty() {
        problems.add(key("id"), "missing");
    } else if id.len() > ID_MAX || !id.bytes().all(is_id_byte) {
        problems.add(
            key("id"),
            format!(
                "{id:?} must be 1 to {ID_MAX} letters, digits or \"-_.~:@+\" (it appears in URLs)"
            ),
        );
    }

    if raw.api_keys.is_empty() {
        problems.add(key("api_keys"), "at least one key");
    }
    for (k, api_key) in raw.api_keys.iter().enumerate() {
        if api_key.is_empty()
            || api_key.len() > KEY_MAX
            || !api_key.bytes().all(|b| b.is_ascii_graphic())
        {
            problems.add(
                format_args!("agents[{i}].api_keys[{k}]"),
                format!("must be 1 to {KEY_MAX} visible ASCII characters, without spaces"),
            );
        }
    }

    let region_text = raw.default_region.as_deref().unwrap_or("US");
    let region = parse_region(region_text);
    if region.is_none() {
        problems.add(
            key("default_region"),
            format!("{region_text:?} is not a region code (ISO 3166 alpha-2, such as \"US\")"),
        );
    }

    let mut numbers = Vec::with_capacity(raw.numbers.len());
    // Without a region the numbers cannot be read; that problem is reported already.
    if let Some(region) = region {
        for (n, text) in raw.numbers.iter().enumerate() {
            match number::normalise(text, region) {
                Ok(e164) => numbers.push(e164.0),
                Err(_) => problems.add(
                    format_args!("agents[{i}].numbers[{n}]"),
                    format!("{text:?} is not a phone number"),
                ),
            }
        }
    }

    let upstream_uris = match raw.upstream {
        None => {
            problems.add(key("upstream"), "missing (sip:HOST:PORT;transport=udp|tcp)");
            Vec::new()
        }
        Some(RawUpstream::One(uri)) => vec![uri],
        Some(RawUpstream::Many(uris)) => {
            if uris.is_empty() {
                problems.add(key("upstream"), "an empty list: give at least one URI");
            }
            uris
        }
    };
    let upstreams = upstream_list(&key("upstream"), &upstream_uris, problems);

    let upstream_timeout_ms = raw
        .upstream_timeout_ms
        .unwrap_or(UPSTREAM_TIMEOUT_MS_DEFAULT);
    if !UPSTREAM_TIMEOUT_MS.contains(&upstream_timeout_ms) {
        problems.add(
            key("upstream_timeout_ms"),
            in_range(upstream_timeout_ms, &UPSTREAM_TIMEOUT_MS),
        );
    }
    if let Some(secs) = raw.health_check_secs {
        if !HEALTH_CHECK_SECS.contains(&secs) {
            problems.add(key("health_check_secs"), in_range(secs, &HEALTH_CHECK_SECS));
        }
    }

    let lookup_timeout_ms = raw.lookup_timeout_ms.unwrap_or(1000);
    if !HTTP_TIMEOUT_MS.contains(&lookup_timeout_ms) {
        problems.add(
            key("lookup_timeout_ms"),
            in_range(lookup_timeout_ms, &HTTP_TIMEOUT_MS),
        );
    }
    let lookup = match raw.lookup_url {
        Some(url) => {
            check_http_url(&key("lookup_url"), &url, problems);
            Some(LookupConfig {
                url,
                timeout: Duration::from_millis(lookup_timeout_ms),
            })
        }
        None => {
            if raw.lookup_timeout_ms.is_some() {
                problems.add(key("lookup_timeout_ms"), "has no effect without lookup_url");
            }
            None
        }
    };

    let fallback_wait_ms = raw.fallback_wait_ms.unwrap_or(2000);
    if fallback_wait_ms > FALLBACK_WAIT_MS_MAX {
        problems.add(
            key("fallback_wait_ms"),
            in_range(fallback_wait_ms, &(0..=FALLBACK_WAIT_MS_MAX)),
        );
    }

    let mut defaults = raw.defaults.unwrap_or_default();
    for (field, value) in defaults.iter_mut() {
        if field.is_empty() {
            problems.add(key("defaults"), "a field name is empty");
        }
        from_toml_json(value, &format!("agents[{i}].defaults.{field}"), problems);
    }

    let inject = validate_inject(&key("inject"), raw.inject.unwrap_or_default(), problems);

    // The agent's id in route keys: "agents[0] (\"support-agent\")", so that `precall
    // check` names the agent of a broken rule without the reader counting tables.
    let route_key = if id.is_empty() {
        format!("agents[{i}]")
    } else {
        format!("agents[{i}] ({id:?})")
    };
    let routes = validate_routes(&route_key, &id, raw.routes, ids, problems);

    let caller_sources = match raw.caller_sources {
        Some(texts) => caller_sources(&texts, &key("caller_sources"), problems),
        None => sip.caller_sources.clone(),
    };

    if let Some(secret) = &raw.webhook_secret {
        if !SECRET_LEN.contains(&secret.len()) || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            problems.add(
                key("webhook_secret"),
                format!(
                    "must be {} to {} visible ASCII characters, without spaces",
                    SECRET_LEN.start(),
                    SECRET_LEN.end()
                ),
            );
        }
    }

    if problems.0.len() != before {
        return None;
    }
    Some(AgentConfig {
        id,
        api_keys: raw.api_keys,
        numbers,
        upstreams,
        upstream_timeout: Duration::from_millis(upstream_timeout_ms),
        health_check: raw.health_check_secs.map(Duration::from_secs),
        lookup,
        routes,
        default_region: region?,
        fallback_wait: Duration::from_millis(fallback_wait_ms),
        defaults,
        inject,
        caller_sources,
        webhook_secret: raw.webhook_secret.map(Secret),
    })
}

fn validate_inject(key: &str, raw: RawInject, problems: &mut Problems) -> InjectConfig {
    let mode = match raw.mode.as_deref() {
        None | Some("headers") => InjectMode::Headers,
        Some("json") => InjectMode::Json,
        Some("http") => InjectMode::Http,
        Some("both") => InjectMode::Both,
        Some(other) => {
            problems.add(
                format_args!("{key}.mode"),
                format!("{other:?} is not \"headers\", \"json\", \"http\" or \"both\""),
            );
            InjectMode::Headers
        }
    };
    let defaults = InjectConfig::default();
    match (&raw.url, mode.has_http()) {
        (Some(url), true) => check_http_url(&format!("{key}.url"), url, problems),
        (None, true) => problems.add(
            format_args!("{key}.url"),
            "missing: modes \"http\" and \"both\" POST the context to it",
        ),
        (Some(_), false) => problems.add(
            format_args!("{key}.url"),
            "only modes \"http\" and \"both\" use it (set mode, or drop url)",
        ),
        (None, false) => {}
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(300);
    if !HTTP_TIMEOUT_MS.contains(&timeout_ms) {
        problems.add(
            format_args!("{key}.timeout_ms"),
            in_range(timeout_ms, &HTTP_TIMEOUT_MS),
        );
    }
    let prefix = raw.prefix.unwrap_or(defaults.prefix);
    if !inject::is_token(&prefix) {
        problems.add(
            format_args!("{key}.prefix"),
            format!("{prefix:?} is not a SIP token (letters, digits and -.!%*_+`'~)"),
        );
    }
    let max_bytes = raw.max_bytes.unwrap_or(1024);
    if max_bytes > INJECT_BYTES_MAX {
        problems.add(
            format_args!("{key}.max_bytes"),
            in_range(max_bytes, &(0..=INJECT_BYTES_MAX)),
        );
    }
    InjectConfig {
        mode,
        prefix,
        max_bytes: usize::try_from(max_bytes).unwrap_or(defaults.max_bytes),
        url: raw.url,
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// Upstream URIs → upstreams; a problem names `key`, or `key[n]` in a list of several.
fn upstream_list(key: &str, uris: &[String], problems: &mut Problems) -> Vec<Upstream> {
    let many = uris.len() > 1;
    let mut upstreams = Vec::with_capacity(uris.len());
    for (n, uri) in uris.iter().enumerate() {
        match Upstream::parse(uri) {
            Ok(upstream) => upstreams.push(upstream),
            Err(message) if many => problems.add(format_args!("{key}[{n}]"), message),
            Err(message) => problems.add(key, message),
        }
    }
    upstreams
}

/// An `http://` or `https://` URL with a host.
fn check_http_url(key: &str, url: &str, problems: &mut Problems) {
    match reqwest::Url::parse(url) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() => {}
        Ok(_) => problems.add(key, format!("{url:?} is not an http:// or https:// URL")),
        Err(error) => problems.add(key, format!("{url:?} is not a URL: {error}")),
    }
}

/// `[[agents.routes]]` of the agent `id` (`agent_key` names it in problems); `ids` are
/// every agent id in the file, for `agent = ...` hand-overs.
fn validate_routes(
    agent_key: &str,
    id: &str,
    raw: Vec<RawRoute>,
    ids: &[String],
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut names: Vec<String> = Vec::new();
    for (r, route) in raw.into_iter().enumerate() {
        let key = match &route.name {
            Some(name) if is_route_name(name) => format!("{agent_key}.routes[{r}] ({name:?})"),
            _ => format!("{agent_key}.routes[{r}]"),
        };
        if let Some(name) = &route.name {
            if !is_route_name(name) {
                problems.add(
                    format_args!("{key}.name"),
                    format!(
                        "{name:?} must be 1 to {ROUTE_NAME_MAX} letters, digits or \"-_.\", \
                         not only digits (it is sent as X-Precall-Route, where an index \
                         means an unnamed rule)"
                    ),
                );
            } else if names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                problems.add(format_args!("{key}.name"), format!("duplicate {name:?}"));
            } else {
                names.push(name.clone());
            }
        }
        let when = match route.when {
            None => {
                problems.add(
                    format_args!("{key}.when"),
                    "missing (a CEL expression, e.g. \"risk_score >= 80\")",
                );
                String::new()
            }
            Some(when) => {
                if let Err(message) = crate::route::compile(&when) {
                    problems.add(format_args!("{key}.when"), message);
                }
                when
            }
        };
        let target = match (route.upstream, route.agent) {
            (Some(_), Some(_)) => {
                problems.add(
                    &key,
                    "upstream and agent are mutually exclusive (agent hands the call over \
                     with that agent's upstream)",
                );
                RouteTarget::Stay
            }
            (Some(upstream), None) => {
                let uris = match upstream {
                    RawUpstream::One(uri) => vec![uri],
                    RawUpstream::Many(uris) => {
                        if uris.is_empty() {
                            problems.add(
                                format_args!("{key}.upstream"),
                                "an empty list: give at least one URI",
                            );
                        }
                        uris
                    }
                };
                RouteTarget::Upstreams(upstream_list(&format!("{key}.upstream"), &uris, problems))
            }
            (None, Some(agent)) => {
                if agent == id {
                    problems.add(
                        format_args!("{key}.agent"),
                        format!("{agent:?} is this agent; leave agent out to stay"),
                    );
                } else if !ids.contains(&agent) {
                    problems.add(format_args!("{key}.agent"), format!("no agent {agent:?}"));
                }
                RouteTarget::Agent(agent)
            }
            (None, None) => RouteTarget::Stay,
        };
        let mut set = route.set.unwrap_or_default();
        for (field, value) in set.iter_mut() {
            if field.is_empty() {
                problems.add(format_args!("{key}.set"), "a field name is empty");
            }
            from_toml_json(value, &format!("{key}.set.{field}"), problems);
        }
        routes.push(RouteConfig {
            name: route.name,
            when,
            target,
            set,
        });
    }
    routes
}

/// A route name: what `X-Precall-Route` carries, so a header-safe token, and not only
/// digits (that reads as the index of an unnamed rule).
fn is_route_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= ROUTE_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.bytes().all(|b| b.is_ascii_digit())
}

fn caller_sources(texts: &[String], key: &str, problems: &mut Problems) -> Vec<CallerSource> {
    if texts.is_empty() {
        problems.add(key, "at least one of \"pai\", \"from\"");
    }
    let mut sources = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        if text.eq_ignore_ascii_case("pai") {
            sources.push(CallerSource::Pai);
        } else if text.eq_ignore_ascii_case("from") {
            sources.push(CallerSource::From);
        } else {
            problems.add(
                format_args!("{key}[{i}]"),
                format!("{text:?} is not \"pai\" or \"from\""),
            );
        }
    }
    sources
}

/// A region code (`US`, `gb`) that phonenumber has metadata for. phonenumber panics when
/// asked to parse a national number in a region it has no metadata for, so such a region
/// must never reach [`number::normalise`].
fn parse_region(text: &str) -> Option<Region> {
    let region = Region::from_str(&text.to_ascii_uppercase()).ok()?;
    phonenumber::metadata::DATABASE
        .by_id(region.as_ref())
        .map(|_| region)
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~:@+".contains(&b)
}

fn in_range(value: u64, range: &std::ops::RangeInclusive<u64>) -> String {
    format!(
        "{value} is not between {} and {}",
        range.start(),
        range.end()
    )
}

/// TOML values that JSON has no word for, read through serde into JSON: a datetime
/// arrives as `{"$__toml_private_datetime": "…"}` and becomes its text; `nan` and `inf`
/// arrive as `null` (TOML has no null) and are an error.
fn from_toml_json(value: &mut Value, key: &str, problems: &mut Problems) {
    const DATETIME: &str = "$__toml_private_datetime";
    match value {
        Value::Null => problems.add(key, "nan and inf have no JSON form"),
        Value::Object(map) if map.len() == 1 && map.contains_key(DATETIME) => {
            if let Some(text) = map.remove(DATETIME) {
                *value = text;
            }
        }
        Value::Object(map) => {
            for (field, inner) in map.iter_mut() {
                from_toml_json(inner, &format!("{key}.{field}"), problems);
            }
        }
        Value::Array(items) => {
            for (n, inner) in items.iter_mut().enumerate() {
                from_toml_json(inner, &format!("{key}[{n}]"), problems);
            }
        }
        Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLED: &str = include_str!("../config/precall.toml");

    const MINIMAL: &str = r#"
[[agents]]
id = "a"
api_keys = ["k"]
upstream = "sip:127.0.0.1:5070"
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::from_toml_str(text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    /// Asserts that `text` fails with exactly one problem, which starts with `want`.
    #[track_caller]
    fn fails_with(text: &str, want: &str) {
        let got = problems(text);
        assert!(
            got.len() == 1 && got[0].starts_with(want),
            "want one problem starting {want:?}, got {got:#?}"
        );
    }

    /// MINIMAL with `extra` added to its agent table.
    fn agent_with(extra: &str) -> String {
        format!("{MINIMAL}{extra}\n")
    }

    #[test]
    fn bundled_config_is_valid_and_matches_the_design() {
        let cfg = Config::from_toml_str(BUNDLED).unwrap();
        assert_eq!(
            cfg.sip
                .listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
        );
        assert_eq!(
            cfg.sip.trusted_peers,
            ["127.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(cfg.sip.default_agent.as_deref(), Some("support-agent"));
        assert_eq!(cfg.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(cfg.http.max_body_bytes, 16384);
        assert_eq!(cfg.store.backend, StoreBackend::Memory);
        assert_eq!(cfg.store.ttl, Duration::from_secs(300));
        assert!(cfg.store.consume);
        assert_eq!(cfg.agents.len(), 1);
        let agent = &cfg.agents[0];
        assert_eq!(agent.id, "support-agent");
        assert_eq!(agent.api_keys, ["dev-key-change-me"]);
        assert_eq!(agent.numbers, ["+15550100"]);
        assert_eq!(agent.upstreams[0].uri, "sip:127.0.0.1:5070;transport=udp");
        assert_eq!(agent.upstreams[0].transport, Transport::Udp);
        assert_eq!(agent.upstreams[0].addr, "127.0.0.1:5070".parse().unwrap());
        assert_eq!(agent.default_region, Region::US);
        assert_eq!(agent.fallback_wait, Duration::from_millis(2000));
        assert_eq!(
            agent.defaults.get("customer_name"),
            Some(&Value::from("there"))
        );
        assert_eq!(agent.inject, InjectConfig::default());
        assert_eq!(
            agent.caller_sources,
            [CallerSource::Pai, CallerSource::From]
        );
    }

    #[test]
    fn bundled_second_agent_example_is_valid() {
        let start = BUNDLED.find("# [[agents]]").unwrap();
        let uncommented: String = BUNDLED[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = Config::from_toml_str(&format!("{BUNDLED}\n{uncommented}")).unwrap();
        let uk = cfg.agent("sales-uk").unwrap();
        assert_eq!(uk.numbers, ["+442079460958"]);
        assert_eq!(uk.upstreams[0].transport, Transport::Tcp);
        assert_eq!(uk.default_region, Region::GB);
    }

    #[test]
    fn defaults_when_keys_are_left_out() {
        let cfg = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(cfg.sip.listen.len(), 2);
        assert!(cfg.sip.trusted_peers.is_empty());
        assert_eq!(cfg.sip.default_agent, None);
        assert_eq!(
            cfg.sip.caller_sources,
            [CallerSource::Pai, CallerSource::From]
        );
        assert!(cfg.sip.record_route);
        assert_eq!(cfg.sip.t1, Duration::from_millis(500));
        assert_eq!(cfg.sip.max_message_bytes, 65535);
        assert_eq!(cfg.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(cfg.http.max_body_bytes, 16384);
        assert_eq!(cfg.store.ttl, Duration::from_secs(300));
        assert!(cfg.store.consume);
        let a = &cfg.agents[0];
        assert!(a.numbers.is_empty());
        assert_eq!(a.upstreams[0].addr, "127.0.0.1:5070".parse().unwrap());
        assert_eq!(a.upstreams[0].transport, Transport::Udp);
        assert_eq!(a.default_region, Region::US);
        assert_eq!(a.fallback_wait, Duration::from_millis(2000));
        assert!(a.defaults.is_empty());
        assert_eq!(a.inject, InjectConfig::default());
        assert_eq!(a.upstream_timeout, Duration::from_millis(2000));
        assert_eq!(a.health_check, None);
        assert_eq!(a.lookup, None);
        assert!(a.routes.is_empty());
        assert_eq!(cfg.http.client_concurrency, 256);
        // AgentConfig::new agrees with a parsed agent on every default.
        let built = AgentConfig::new("a", a.upstreams.clone());
        assert_eq!(
            format!("{built:?}"),
            format!(
                "{:?}",
                AgentConfig {
                    api_keys: Vec::new(),
                    ..a.clone()
                }
            )
        );
    }

    #[test]
    fn agent_caller_sources_override_sip_ones() {
        let cfg = Config::from_toml_str(&format!(
            "[sip]\ncaller_sources = [\"from\"]\n{MINIMAL}caller_sources = [\"PAI\"]\n\
             [[agents]]\nid = \"b\"\napi_keys = [\"k2\"]\nupstream = \"sip:127.0.0.1\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.sip.caller_sources, [CallerSource::From]);
        assert_eq!(cfg.agents[0].caller_sources, [CallerSource::Pai]);
        assert_eq!(cfg.agents[1].caller_sources, [CallerSource::From]);
        assert_eq!(cfg.agents[1].upstreams[0].addr.port(), 5060);
    }

    #[test]
    fn later_feature_keys_are_accepted() {
        let text = format!(
            "[sip]\ndrain_secs = 30\n[store]\nurl = \"redis://127.0.0.1:6379/0\"\nkey_prefix = \"precall\"\n{MINIMAL}"
        );
        assert!(Config::from_toml_str(&text).is_ok());
        fails_with(
            &format!("[store]\nurl = \"http://x\"\n{MINIMAL}"),
            "store.url: \"http\"... is not a redis:// or rediss:// URL",
        );
        fails_with(
            &format!("[store]\nkey_prefix = \"a b\"\n{MINIMAL}"),
            "store.key_prefix:",
        );
        fails_with(
            &format!("[sip]\ndrain_secs = 99999\n{MINIMAL}"),
            "sip.drain_secs:",
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_give_line_and_column() {
        fails_with(
            &format!("[sip]\nlisen = []\n{MINIMAL}"),
            "line 2, column 1: unknown field `lisen`",
        );
        fails_with(
            &agent_with("upstrem = \"x\""),
            "line 6, column 1: unknown field `upstrem`",
        );
        fails_with(
            &agent_with("inject = { mode = \"headers\", prefx = \"X-\" }"),
            "line 6, column",
        );
        fails_with("[sip\n", "line 1, column 5: invalid table header; expected");
        fails_with(
            "[[agents]]\nid = \"a\"\napi_keys = [\"k\"]\nupstream = 5\n",
            "line 4, column 12: expected a URI string such as",
        );
        let got = problems(&format!("[store]\nttl_secs = \"300\"\n{MINIMAL}"));
        assert!(
            got[0].starts_with("line 2, column 12: invalid type"),
            "{got:?}"
        );
        assert!(got[0].ends_with("(`ttl_secs = \"300\"`)"), "{got:?}");
        fails_with(&agent_with("fallback_wait_ms = -1"), "line 6, column 20:");
    }

    #[test]
    fn syntax_errors_do_not_echo_lines_with_secrets() {
        let got = problems("[[agents]]\nid = \"a\"\napi_keys = [\"s3cr3t-key\" \"x\"]\n");
        assert!(got[0].starts_with("line 3"), "{got:?}");
        assert!(got[0].contains("line not shown"), "{got:?}");
        assert!(!got[0].contains("s3cr3t"), "{got:?}");
        let got = problems("[http]\nadmin_password = \"pw-123456789\" x\n");
        assert!(!got[0].contains("pw-123456789"), "{got:?}");
        let got = problems("[[agents]]\nid = \"a\"\nwebhook_secret = \"whsec-42\" x\n");
        assert!(!got[0].contains("whsec-42"), "{got:?}");
        let got = problems("[store]\nurl = \"redis://:hunter2@10.0.0.1\" x\n");
        assert!(!got[0].contains("hunter2"), "{got:?}");
        let got = problems("[store]\ncluster = [\"redis://:hunter2@10.0.0.1\" \"x\"]\n");
        assert!(!got[0].contains("hunter2"), "{got:?}");
    }

    #[test]
    fn tls_and_admin_keys() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let with_sip = |keys: &str| {
            format!("[sip]\nlisten = [\"udp:127.0.0.1:0\", \"tls:127.0.0.1:0\"]\n{keys}\n{MINIMAL}")
        };
        fails_with(
            &with_sip(""),
            "sip.tls_cert: missing: a tls: listener needs",
        );
        fails_with(
            &with_sip(&format!("tls_cert = {file:?}")),
            "sip.tls_key: missing (sip.tls_cert is set)",
        );
        fails_with(
            &with_sip(&format!("tls_cert = {file:?}\ntls_key = \"/no/such.key\"")),
            "sip.tls_key: \"/no/such.key\" is not a readable file",
        );
        let cfg = Config::from_toml_str(&with_sip(&format!(
            "tls_cert = {file:?}\ntls_key = {file:?}\ntls_ca = {file:?}"
        )))
        .unwrap();
        assert_eq!(cfg.sip.listen[1].transport, Transport::Tls);
        assert_eq!(cfg.sip.tls.ca.as_deref(), Some(Path::new(file)));

        let with_http = |keys: &str| format!("[http]\n{keys}\n{MINIMAL}");
        fails_with(
            &with_http(&format!("tls_key = {file:?}")),
            "http.tls_cert: missing (http.tls_key is set)",
        );
        fails_with(
            &with_http("admin_password = \"short\""),
            "http.admin_password: must be at least 8 characters",
        );
        let cfg = Config::from_toml_str(&with_http(&format!(
            "tls_cert = {file:?}\ntls_key = {file:?}\nadmin_password = \"long enough\""
        )))
        .unwrap();
        assert!(cfg.http.tls.is_some());
        assert_eq!(cfg.http.admin_password.as_deref(), Some("long enough"));
        assert!(Config::from_toml_str(MINIMAL)
            .unwrap()
            .http
            .admin_password
            .is_none());
    }

    #[test]
    fn listen_problems_name_the_index() {
        fails_with(
            &format!("[sip]\nlisten = [\"udp:1.2.3.4:5060\", \"sctp:1.2.3.4:5060\"]\n{MINIMAL}"),
            "sip.listen[1]: \"sctp:1.2.3.4:5060\" is not udp:ADDR:PORT, tcp:ADDR:PORT or tls:ADDR:PORT",
        );
        fails_with(
            &format!("[sip]\nlisten = [\"udp:localhost:5060\"]\n{MINIMAL}"),
            "sip.listen[0]:",
        );
        fails_with(
            &format!("[sip]\nlisten = []\n{MINIMAL}"),
            "sip.listen: at least one",
        );
        fails_with(
            &format!("[sip]\nlisten = [\"udp:127.0.0.1:5060\", \"UDP:127.0.0.1:5060\"]\n{MINIMAL}"),
            "sip.listen[1]: \"UDP:127.0.0.1:5060\" is listed twice",
        );
        let cfg = Config::from_toml_str(&format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:0\", \"udp:127.0.0.1:0\", \"tcp:[::1]:5060\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(cfg.sip.listen.len(), 3);
        assert_eq!(cfg.sip.listen[2].to_string(), "tcp:[::1]:5060");
    }

    #[test]
    fn sip_value_problems() {
        fails_with(
            &format!("[sip]\ntrusted_peers = [\"10.0.0.0/8\", \"nope\"]\n{MINIMAL}"),
            "sip.trusted_peers[1]: \"nope\" is not an IP address or network",
        );
        let cfg = Config::from_toml_str(&format!(
            "[sip]\ntrusted_peers = [\"192.0.2.7\", \"10.1.2.3/8\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(cfg.sip.trusted_peers[0].to_string(), "192.0.2.7/32");
        assert_eq!(cfg.sip.trusted_peers[1].to_string(), "10.0.0.0/8");
        fails_with(
            &format!("[sip]\ncaller_sources = [\"from\", \"to\"]\n{MINIMAL}"),
            "sip.caller_sources[1]: \"to\" is not \"pai\" or \"from\"",
        );
        fails_with(
            &format!("[sip]\ncaller_sources = []\n{MINIMAL}"),
            "sip.caller_sources: at least",
        );
        fails_with(
            &format!("[sip]\nt1_ms = 0\n{MINIMAL}"),
            "sip.t1_ms: 0 is not between 1 and",
        );
        fails_with(
            &format!("[sip]\nmax_message_bytes = 70000\n{MINIMAL}"),
            "sip.max_message_bytes: 70000 is not between 256 and 65535",
        );
        fails_with(
            &format!("[sip]\ndefault_agent = \"z\"\n{MINIMAL}"),
            "sip.default_agent: no agent \"z\"",
        );
    }

    #[test]
    fn http_and_store_problems() {
        fails_with(
            &format!("[http]\nlisten = \"localhost\"\n{MINIMAL}"),
            "http.listen: \"localhost\" is not",
        );
        fails_with(
            &format!("[http]\nmax_body_bytes = 1\n{MINIMAL}"),
            "http.max_body_bytes:",
        );
        fails_with(
            &format!("[store]\nbackend = \"redis\"\n{MINIMAL}"),
            "store.backend: \"redis\" needs store.url, store.cluster or store.sentinel",
        );
        fails_with(
            &format!("[store]\nbackend = \"etcd\"\n{MINIMAL}"),
            "store.backend: \"etcd\" is not",
        );
        fails_with(
            &format!("[store]\nttl_secs = 0\n{MINIMAL}"),
            "store.ttl_secs: must be at least 1",
        );
    }

    fn redis_of(store: &str) -> RedisConfig {
        let cfg = Config::from_toml_str(&format!("[store]\n{store}\n{MINIMAL}")).unwrap();
        match cfg.store.backend {
            StoreBackend::Redis(redis) => redis,
            StoreBackend::Memory => panic!("memory backend for {store:?}"),
        }
    }

    #[test]
    fn redis_single_server_with_defaults() {
        let redis = redis_of("backend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"");
        assert_eq!(
            redis.target,
            RedisTarget::Single(RedisUrl("redis://127.0.0.1:6379/0".to_string()))
        );
        assert_eq!(redis.key_prefix, "precall");
        assert_eq!(redis.timeout, Duration::from_millis(500));
        let redis = redis_of(
            "backend = \"redis\"\nurl = \"rediss://u:pw@redis.example:6380/2\"\nkey_prefix = \"site-a\"\ntimeout_ms = 250",
        );
        assert_eq!(redis.key_prefix, "site-a");
        assert_eq!(redis.timeout, Duration::from_millis(250));
        let RedisTarget::Single(url) = &redis.target else {
            panic!("{:?}", redis.target)
        };
        assert!(url.is_tls());
        assert_eq!(url.expose(), "rediss://u:pw@redis.example:6380/2");
    }

    #[test]
    fn redis_cluster_and_sentinel() {
        let redis = redis_of(
            "backend = \"redis\"\ncluster = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]",
        );
        let RedisTarget::Cluster(urls) = &redis.target else {
            panic!("{:?}", redis.target)
        };
        assert_eq!(urls.len(), 2);
        let redis = redis_of(
            "backend = \"redis\"\nsentinel = { master = \"mymaster\", urls = [\"redis://10.0.0.1:26379\"] }",
        );
        assert_eq!(
            redis.target,
            RedisTarget::Sentinel {
                master: "mymaster".to_string(),
                urls: vec![RedisUrl("redis://10.0.0.1:26379".to_string())],
                master_url: None,
            }
        );
        // url beside sentinel: the master's credentials and db.
        let redis = redis_of(
            "backend = \"redis\"\nurl = \"redis://:pw@_/3\"\nsentinel = { master = \"m\", urls = [\"redis://s:26379\"] }",
        );
        assert!(matches!(
            redis.target,
            RedisTarget::Sentinel {
                master_url: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn redis_problems_name_the_key() {
        let redis = |store: &str| format!("[store]\nbackend = \"redis\"\n{store}\n{MINIMAL}");
        fails_with(
            &redis("cluster = []"),
            "store.cluster: list at least one redis:// URL",
        );
        fails_with(
            &redis("cluster = [\"redis://a:1\", \"http://b\"]"),
            "store.cluster[1]: \"http\"... is not a redis://",
        );
        fails_with(
            &redis("url = \"redis://a:1\"\ncluster = [\"redis://a:1\"]"),
            "store.cluster: use store.cluster alone",
        );
        fails_with(
            &redis("sentinel = { master = \"m\" }"),
            "store.sentinel.urls: list at least one Sentinel",
        );
        fails_with(
            &redis("sentinel = { urls = [\"redis://s:26379\"] }"),
            "store.sentinel.master:",
        );
        fails_with(
            &redis("sentinel = { master = \"m\", urls = [\"redis://s\"], name = \"x\" }"),
            "line ",
        );
        fails_with(
            &redis("url = \"redis://a:1\"\ntimeout_ms = 0"),
            "store.timeout_ms:",
        );
        fails_with(
            &redis("url = \"redis://a:1\"\nkey_prefix = \"\""),
            "store.key_prefix:",
        );
        fails_with(
            &redis("url = \"redis://a:notaport\""),
            "store.url: redis://a:notaport is not a valid Redis URL",
        );
    }

    #[test]
    fn redis_urls_never_show_their_password() {
        let shown = |url: &str| RedisUrl(url.to_string()).to_string();
        assert_eq!(shown("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
        assert_eq!(shown("redis://:secret@h"), "redis://:***@h");
        assert_eq!(shown("rediss://secret@h/1"), "rediss://***@h/1");
        assert_eq!(shown("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            format!("{:?}", RedisUrl("redis://u:secret@h".to_string())),
            "\"redis://u:***@h\""
        );
        // A bad URL's error quotes the scheme only.
        let got = problems(&format!("[store]\nurl = \"http://u:secret@h\"\n{MINIMAL}"));
        assert!(!got.concat().contains("secret"), "{got:?}");
        let got = problems(&format!(
            "[store]\nurl = \"redis://u:secret@h:bad\"\n{MINIMAL}"
        ));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(!got.concat().contains("secret"), "{got:?}");
    }

    #[test]
    fn redis_keys_on_a_memory_node_are_checked_but_unused() {
        let cfg = Config::from_toml_str(&format!(
            "[store]\nurl = \"redis://127.0.0.1\"\ntimeout_ms = 100\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(cfg.store.backend, StoreBackend::Memory);
    }

    #[test]
    fn agent_problems_name_the_key() {
        fails_with("", "agents: at least one");
        fails_with(
            &format!("{MINIMAL}[[agents]]\nid = \"a\"\napi_keys = [\"k2\"]\nupstream = \"sip:127.0.0.1\"\n"),
            "agents[1].id: duplicate \"a\"",
        );
        fails_with(
            &format!("{MINIMAL}[[agents]]\nid = \"y\"\napi_keys = [\"k3\", \"k\"]\nupstream = \"sip:127.0.0.1\"\n"),
            "agents[1].api_keys[1]: also used by agent \"a\"",
        );
        fails_with(
            "[[agents]]\nid = \"a\"\nupstream = \"sip:127.0.0.1\"\n",
            "agents[0].api_keys: at least one key",
        );
        fails_with(
            &agent_with("numbers = [\"+15550100\", \"555-0101\", \"abc\"]"),
            "agents[0].numbers[2]: \"abc\" is not a phone number",
        );
        fails_with(
            &agent_with("default_region = \"XX\""),
            "agents[0].default_region: \"XX\" is not a region code",
        );
        fails_with(
            &agent_with("fallback_wait_ms = 600000"),
            "agents[0].fallback_wait_ms:",
        );
        fails_with(
            &agent_with("inject = { prefix = \"X Precall\" }"),
            "agents[0].inject.prefix: \"X Precall\" is not a SIP token",
        );
        fails_with(
            &agent_with("inject = { prefix = \"\" }"),
            "agents[0].inject.prefix:",
        );
        fails_with(
            &agent_with("inject = { mode = \"xml\" }"),
            "agents[0].inject.mode: \"xml\" is not",
        );
        fails_with(
            &agent_with("inject = { max_bytes = 100000 }"),
            "agents[0].inject.max_bytes:",
        );
        fails_with(
            &agent_with("caller_sources = [\"via\"]"),
            "agents[0].caller_sources[0]: \"via\"",
        );
        fails_with(
            "[[agents]]\napi_keys = [\"k\"]\nupstream = \"sip:127.0.0.1\"\n",
            "agents[0].id: missing",
        );
        fails_with(
            "[[agents]]\nid = \"a b\"\napi_keys = [\"k\"]\nupstream = \"sip:127.0.0.1\"\n",
            "agents[0].id: \"a b\" must be",
        );
        fails_with(
            "[[agents]]\nid = \"a\"\napi_keys = [\"k\"]\n",
            "agents[0].upstream: missing",
        );
        fails_with(
            "[[agents]]\nid = \"a\"\napi_keys = [\"a key\"]\nupstream = \"sip:127.0.0.1\"\n",
            "agents[0].api_keys[0]: must be",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[sip]
listen = ["sctp:1.2.3.4:5060"]
default_agent = "z"
[store]
ttl_secs = 0
[[agents]]
id = "a"
api_keys = []
numbers = ["abc"]
upstream = "http://x"
[[agents]]
id = "a"
api_keys = ["k"]
upstream = "sip:127.0.0.1"
"#;
        let got = problems(text);
        assert_eq!(
            got,
            [
                "sip.listen[0]: \"sctp:1.2.3.4:5060\" is not udp:ADDR:PORT, tcp:ADDR:PORT or tls:ADDR:PORT",
                "store.ttl_secs: must be at least 1",
                "sip.default_agent: no agent \"z\"",
                "agents[1].id: duplicate \"a\"",
                "agents[0].api_keys: at least one key",
                "agents[0].numbers[0]: \"abc\" is not a phone number",
                "agents[0].upstream: \"http://x\" is not sip:HOST[:PORT][;transport=udp|tcp|tls] or sips:HOST[:PORT]",
            ]
        );
        // ConfigError's Display is one problem per line, for `precall check`.
        let err = Config::from_toml_str(text).unwrap_err();
        assert_eq!(err.to_string().lines().count(), 7);
    }

    #[test]
    fn upstream_forms() {
        let ok = |uri: &str| Upstream::parse(uri).unwrap();
        let u = ok("sip:127.0.0.1:5070;transport=tcp");
        assert_eq!(
            (u.transport, u.addr),
            (Transport::Tcp, "127.0.0.1:5070".parse().unwrap())
        );
        let u = ok("SIP:10.0.0.5;transport=UDP;lr");
        assert_eq!(
            (u.transport, u.addr),
            (Transport::Udp, "10.0.0.5:5060".parse().unwrap())
        );
        assert_eq!(ok("sip:[::1]:5080").addr, "[::1]:5080".parse().unwrap());
        assert_eq!(ok("sip:[::1]").addr, "[::1]:5060".parse().unwrap());
        assert!(ok("sip:localhost:5070").addr.ip().is_loopback());
        let u = ok("sips:127.0.0.1");
        assert_eq!(
            (u.transport, u.addr),
            (Transport::Tls, "127.0.0.1:5061".parse().unwrap())
        );
        let u = ok("sip:localhost;transport=TLS");
        assert_eq!((u.transport, u.addr.port()), (Transport::Tls, 5061));
        assert_eq!(u.host(), "localhost");
        assert_eq!(ok("sips:[::1]:5071").host(), "::1");
        assert_eq!(ok("sips:127.0.0.1:5071;transport=tls").addr.port(), 5071);
        for bad in [
            "127.0.0.1:5070",
            "sip:",
            "sip:127.0.0.1:0",
            "sip:127.0.0.1:99999",
            "sip:127.0.0.1:x",
            "sip:127.0.0.1;transport=sctp",
            "sip:127.0.0.1;transprot=tcp",
            "sip:agent@127.0.0.1",
            "sip:[::1",
            "sip:[nothost]:5060",
            "sip:host name",
            "sip:no-such-host.invalid",
            "sips:127.0.0.1;transport=tcp",
            "sip:127.0.0.1;transport=tlsx",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad:?}");
        }
        let cfg = Config::from_toml_str(&MINIMAL.replace(
            "upstream = \"sip:127.0.0.1:5070\"",
            "upstream = [\"sip:127.0.0.1:5071\"]",
        ))
        .unwrap();
        assert_eq!(cfg.agents[0].upstreams[0].addr.port(), 5071);
        let cfg = Config::from_toml_str(&MINIMAL.replace(
            "upstream = \"sip:127.0.0.1:5070\"",
            "upstream = [\"sip:127.0.0.1:5071\", \"sip:127.0.0.1:5072;transport=tcp\"]",
        ))
        .unwrap();
        let ports: Vec<_> = cfg.agents[0]
            .upstreams
            .iter()
            .map(|u| u.addr.port())
            .collect();
        assert_eq!(ports, vec![5071, 5072], "a list fails over in order");
        fails_with(
            &MINIMAL.replace(
                "upstream = \"sip:127.0.0.1:5070\"",
                "upstream = [\"sip:127.0.0.1:5071\", \"ftp:x\"]",
            ),
            "agents[0].upstream[1]:",
        );
        fails_with(
            &MINIMAL.replace("upstream = \"sip:127.0.0.1:5070\"", "upstream = []"),
            "agents[0].upstream: an empty list",
        );
    }

    #[test]
    fn numbers_are_normalised_with_the_agent_region() {
        let cfg = Config::from_toml_str(&agent_with(
            "numbers = [\"020 7946 0958\", \"tel:+1-415-555-0123\"]\ndefault_region = \"gb\"",
        ))
        .unwrap();
        assert_eq!(cfg.agents[0].numbers, ["+442079460958", "+14155550123"]);
        assert_eq!(cfg.agents[0].default_region, Region::GB);
    }

    #[test]
    fn defaults_keep_file_order_and_json_types() {
        let cfg = Config::from_toml_str(&agent_with(
            "[agents.defaults]\nzeta = \"z\"\nalpha = 1\nmid = true\nlist = [1.5, \"x\"]\n\
             nested = { b = 2, a = 1 }\nwhen = 1979-05-27T07:32:00Z",
        ))
        .unwrap();
        let d = &cfg.agents[0].defaults;
        assert_eq!(
            d.keys().map(String::as_str).collect::<Vec<_>>(),
            ["zeta", "alpha", "mid", "list", "nested", "when"]
        );
        assert_eq!(
            Value::Object(d.clone()).to_string(),
            r#"{"zeta":"z","alpha":1,"mid":true,"list":[1.5,"x"],"nested":{"b":2,"a":1},"when":"1979-05-27T07:32:00Z"}"#
        );
        fails_with(
            &agent_with("defaults = { x = nan }"),
            "agents[0].defaults.x: nan and inf",
        );
        fails_with(
            &agent_with("defaults = { x = [inf] }"),
            "agents[0].defaults.x[0]: nan and inf",
        );
    }

    #[test]
    fn load_names_the_file() {
        let err = Config::load(Path::new("/nonexistent/precall.toml")).unwrap_err();
        assert!(
            err.problems[0].starts_with("/nonexistent/precall.toml: "),
            "{err}"
        );
    }

    /// Two agents: "a" (MINIMAL) with `extra` in its table, then "sales".
    fn two_agents(extra: &str) -> String {
        format!(
            "{MINIMAL}{extra}\n[[agents]]\nid = \"sales\"\napi_keys = [\"k2\"]\nupstream = \"sip:127.0.0.1:5090\"\n"
        )
    }

    #[test]
    fn failover_health_check_and_lookup_keys() {
        let cfg = Config::from_toml_str(&agent_with(
            "upstream_timeout_ms = 800\nhealth_check_secs = 10\n\
             lookup_url = \"https://crm.example/precall-lookup\"\nlookup_timeout_ms = 250",
        ))
        .unwrap();
        let a = &cfg.agents[0];
        assert_eq!(a.upstream_timeout, Duration::from_millis(800));
        assert_eq!(a.health_check, Some(Duration::from_secs(10)));
        assert_eq!(
            a.lookup,
            Some(LookupConfig {
                url: "https://crm.example/precall-lookup".into(),
                timeout: Duration::from_millis(250),
            })
        );
        let cfg =
            Config::from_toml_str(&agent_with("lookup_url = \"http://127.0.0.1:9000/l\"")).unwrap();
        assert_eq!(
            cfg.agents[0].lookup.as_ref().unwrap().timeout,
            Duration::from_millis(1000)
        );

        fails_with(
            &agent_with("upstream_timeout_ms = 49"),
            "agents[0].upstream_timeout_ms: 49 is not between 50 and 60000",
        );
        fails_with(
            &agent_with("upstream_timeout_ms = 60001"),
            "agents[0].upstream_timeout_ms:",
        );
        fails_with(
            &agent_with("health_check_secs = 0"),
            "agents[0].health_check_secs: 0 is not between 1 and 3600",
        );
        fails_with(
            &agent_with("health_check_secs = 3601"),
            "agents[0].health_check_secs:",
        );
        fails_with(
            &agent_with("lookup_url = \"ftp://crm.example/x\""),
            "agents[0].lookup_url: \"ftp://crm.example/x\" is not an http:// or https:// URL",
        );
        fails_with(
            &agent_with("lookup_url = \"crm.example/x\""),
            "agents[0].lookup_url: \"crm.example/x\" is not a URL: ",
        );
        fails_with(
            &agent_with("lookup_url = \"http://\""),
            "agents[0].lookup_url:",
        );
        fails_with(
            &agent_with("lookup_url = \"http://x\"\nlookup_timeout_ms = 9"),
            "agents[0].lookup_timeout_ms: 9 is not between 10 and 30000",
        );
        fails_with(
            &agent_with("lookup_timeout_ms = 500"),
            "agents[0].lookup_timeout_ms: has no effect without lookup_url",
        );
    }

    #[test]
    fn http_client_concurrency() {
        let cfg =
            Config::from_toml_str(&format!("[http]\nclient_concurrency = 8\n{MINIMAL}")).unwrap();
        assert_eq!(cfg.http.client_concurrency, 8);
        fails_with(
            &format!("[http]\nclient_concurrency = 0\n{MINIMAL}"),
            "http.client_concurrency: 0 is not between 1 and 65536",
        );
        assert_eq!(HttpConfig::default().client_concurrency, 256);
    }

    #[test]
    fn inject_modes_url_and_timeout() {
        let inject = |extra: &str| {
            Config::from_toml_str(&agent_with(extra)).unwrap().agents[0]
                .inject
                .clone()
        };
        assert_eq!(
            inject("inject = { mode = \"json\" }").mode,
            InjectMode::Json
        );
        let http = inject("inject = { mode = \"http\", url = \"http://127.0.0.1:9000/ctx\" }");
        assert_eq!(http.mode, InjectMode::Http);
        assert_eq!(http.url.as_deref(), Some("http://127.0.0.1:9000/ctx"));
        assert_eq!(http.timeout, Duration::from_millis(300));
        let both = inject(
            "inject = { mode = \"both\", url = \"https://agent.example/c\", timeout_ms = 50 }",
        );
        assert_eq!(both.mode, InjectMode::Both);
        assert_eq!(both.timeout, Duration::from_millis(50));

        fails_with(
            &agent_with("inject = { mode = \"http\" }"),
            "agents[0].inject.url: missing",
        );
        fails_with(
            &agent_with("inject = { mode = \"both\", url = \"mailto:a@b\" }"),
            "agents[0].inject.url: \"mailto:a@b\" is not an http:// or https:// URL",
        );
        fails_with(
            &agent_with("inject = { url = \"http://x\" }"),
            "agents[0].inject.url: only modes \"http\" and \"both\"",
        );
        fails_with(
            &agent_with("inject = { mode = \"http\", url = \"http://x\", timeout_ms = 40000 }"),
            "agents[0].inject.timeout_ms: 40000 is not between 10 and 30000",
        );
        fails_with(
            &agent_with("inject = { mode = \"xml\" }"),
            "agents[0].inject.mode: \"xml\" is not",
        );
    }

    #[test]
    fn routes_parse_in_order_with_targets() {
        let cfg = Config::from_toml_str(&two_agents(
            r#"[[agents.routes]]
name = "fraud"
when = "risk_score >= 80 || flagged == true"
upstream = "sip:127.0.0.1:5080;transport=tcp"
set = { flow = "verification", level = 2 }
[[agents.routes]]
when = "lead_source != '' && int(budget) >= 5000"
agent = "sales"
[[agents.routes]]
name = "vip"
when = "tier == 'gold'"
upstream = ["sip:127.0.0.1:5081", "sip:127.0.0.1:5082"]
[[agents.routes]]
when = "status == 'fallback'"
set = { note = "no context" }"#,
        ))
        .unwrap();
        let routes = &cfg.agents[0].routes;
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0].name.as_deref(), Some("fraud"));
        assert_eq!(routes[0].when, "risk_score >= 80 || flagged == true");
        match &routes[0].target {
            RouteTarget::Upstreams(u) => {
                assert_eq!(u.len(), 1);
                assert_eq!(u[0].transport, Transport::Tcp);
                assert_eq!(u[0].addr, "127.0.0.1:5080".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Value::Object(routes[0].set.clone()).to_string(),
            r#"{"flow":"verification","level":2}"#
        );
        assert_eq!(routes[1].target, RouteTarget::Agent("sales".into()));
        assert_eq!(routes[1].label(1), "1");
        assert_eq!(routes[0].label(0), "fraud");
        match &routes[2].target {
            RouteTarget::Upstreams(u) => {
                let ports: Vec<u16> = u.iter().map(|u| u.addr.port()).collect();
                assert_eq!(ports, [5081, 5082]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(routes[3].target, RouteTarget::Stay);
        assert!(cfg.agents[1].routes.is_empty());
    }

    #[test]
    fn route_problems_name_the_agent_and_the_rule() {
        let route = |body: &str| two_agents(&format!("[[agents.routes]]\n{body}"));
        fails_with(
            &route("when = \"risk_score >=\""),
            "agents[0] (\"a\").routes[0].when: column 14: mismatched input '<EOF>'",
        );
        fails_with(
            &route("name = \"fraud\"\nwhen = \"caller.startswith('+44')\""),
            "agents[0] (\"a\").routes[0] (\"fraud\").when: unknown function \"startswith\"",
        );
        fails_with(
            &route("upstream = \"sip:127.0.0.1\""),
            "agents[0] (\"a\").routes[0].when: missing",
        );
        fails_with(
            &route("when = \"true\"\nupstream = \"sip:127.0.0.1\"\nagent = \"sales\""),
            "agents[0] (\"a\").routes[0]: upstream and agent are mutually exclusive",
        );
        fails_with(
            &route("when = \"true\"\nagent = \"nobody\""),
            "agents[0] (\"a\").routes[0].agent: no agent \"nobody\"",
        );
        fails_with(
            &route("when = \"true\"\nagent = \"a\""),
            "agents[0] (\"a\").routes[0].agent: \"a\" is this agent",
        );
        fails_with(
            &route("when = \"true\"\nupstream = \"http://x\""),
            "agents[0] (\"a\").routes[0].upstream: \"http://x\" is not sip:HOST",
        );
        fails_with(
            &route("when = \"true\"\nupstream = [\"sip:127.0.0.1\", \"sip:x y\"]"),
            "agents[0] (\"a\").routes[0].upstream[1]:",
        );
        fails_with(
            &route("when = \"true\"\nupstream = []"),
            "agents[0] (\"a\").routes[0].upstream: an empty list",
        );
        fails_with(
            &route("name = \"a b\"\nwhen = \"true\""),
            "agents[0] (\"a\").routes[0].name: \"a b\" must be 1 to 64",
        );
        fails_with(
            &route("name = \"12\"\nwhen = \"true\""),
            "agents[0] (\"a\").routes[0].name: \"12\" must be",
        );
        fails_with(
            &route(
                "name = \"x\"\nwhen = \"true\"\n[[agents.routes]]\nname = \"X\"\nwhen = \"true\"",
            ),
            "agents[0] (\"a\").routes[1] (\"X\").name: duplicate \"X\"",
        );
        fails_with(
            &route("when = \"true\"\nset = { x = nan }"),
            "agents[0] (\"a\").routes[0].set.x: nan and inf",
        );
        fails_with(
            &route("when = \"true\"\nstay = true"),
            "line 8, column 1: unknown field `stay`",
        );
        // The second agent's rules name the second agent.
        fails_with(
            &format!("{}[[agents.routes]]\nwhen = \"(\"\n", two_agents("")),
            "agents[1] (\"sales\").routes[0].when: ",
        );
        // Every broken rule is reported.
        let got = problems(&route(
            "when = \"(\"\n[[agents.routes]]\nwhen = \"true\"\n[[agents.routes]]\nwhen = \")\"",
        ));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("agents[0] (\"a\").routes[0].when: "));
        assert!(got[1].starts_with("agents[0] (\"a\").routes[2].when: "));
    }

    #[test]
    fn bundled_route_examples_are_valid() {
        // Uncomment the routing examples of the first agent and the second agent.
        let start = BUNDLED.find("# [[agents.routes]]").unwrap();
        let second = BUNDLED.find("# [[agents]]").unwrap();
        assert!(start < second);
        // Commented-out TOML lines only; prose stays a comment.
        let uncomment = |text: &str| {
            text.lines()
                .map(|l| match l.strip_prefix("# ") {
                    Some(toml) if toml.starts_with('[') || toml.contains(" = ") => toml,
                    _ => l,
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let text = format!(
            "{}\n{}\n{}",
            &BUNDLED[..start],
            uncomment(&BUNDLED[start..second]),
            uncomment(&BUNDLED[second..])
        );
        let cfg = Config::from_toml_str(&text).unwrap();
        let routes = &cfg.agents[0].routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].name.as_deref(), Some("fraud"));
        assert!(matches!(routes[0].target, RouteTarget::Upstreams(_)));
        assert_eq!(routes[1].target, RouteTarget::Agent("sales-uk".into()));
    }

    #[test]
    fn limits_default_when_left_out() {
        let cfg = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(cfg.sip.limits, SipLimits::default());
        let l = &cfg.sip.limits;
        assert!(l.allowed_peers.is_empty(), "anyone may send by default");
        assert_eq!(l.max_tcp_connections, 1024);
        assert_eq!(l.tcp_idle, Duration::from_secs(120));
        assert_eq!(l.max_held_calls, 10_000);
        assert_eq!(
            l.invite_rate,
            Some(Rate {
                per_sec: 100,
                burst: 200
            })
        );
        assert!(l.drop_scanners);
        assert_eq!(l.stats_every, Some(Duration::from_secs(60)));
        assert_eq!(
            cfg.http.rate_limit,
            Some(Rate {
                per_sec: 100,
                burst: 200
            })
        );
        assert_eq!(cfg.store.max_contexts, 1_000_000);
        assert!(cfg.agents[0].webhook_secret.is_none());
        // The bundled file spells out the same defaults.
        let bundled = Config::from_toml_str(BUNDLED).unwrap();
        assert_eq!(bundled.sip.limits, SipLimits::default());
        assert_eq!(bundled.http.rate_limit, cfg.http.rate_limit);
        assert_eq!(bundled.store.max_contexts, cfg.store.max_contexts);
    }

    #[test]
    fn limits_are_read_and_checked() {
        let text = format!(
            "[sip]\nallowed_peers = [\"192.0.2.7\", \"10.1.2.3/8\"]\nmax_tcp_connections = 5\n\
             tcp_idle_secs = 2\nmax_held_calls = 3\ninvite_rate_per_sec = 7\ndrop_scanners = false\n\
             stats_secs = 0\n[http]\nrate_limit_per_sec = 0\n[store]\nmax_contexts = 9\n{MINIMAL}\
             webhook_secret = \"0123456789abcdef\"\n"
        );
        let cfg = Config::from_toml_str(&text).unwrap();
        let l = &cfg.sip.limits;
        assert_eq!(
            l.allowed_peers,
            vec![
                "192.0.2.7/32".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        assert_eq!(
            (l.max_tcp_connections, l.tcp_idle, l.max_held_calls),
            (5, Duration::from_secs(2), 3)
        );
        assert_eq!(
            l.invite_rate,
            Some(Rate {
                per_sec: 7,
                burst: 14
            }),
            "the burst defaults to twice the rate"
        );
        assert!(!l.drop_scanners);
        assert_eq!(l.stats_every, None);
        assert_eq!(cfg.http.rate_limit, None, "0 turns the limit off");
        assert_eq!(cfg.store.max_contexts, 9);
        let secret = cfg.agents[0].webhook_secret.as_ref().unwrap();
        assert_eq!(secret.expose(), b"0123456789abcdef");
        assert!(
            !format!("{:?}", cfg.agents[0]).contains("0123456789abcdef"),
            "a secret never shows in Debug output"
        );

        let got = problems(&format!(
            "[sip]\nallowed_peers = [\"nope\"]\nmax_tcp_connections = 0\ntcp_idle_secs = 0\n\
             max_held_calls = 0\ninvite_burst = 0\n[http]\nrate_limit_burst = 0\n\
             [store]\nmax_contexts = 0\n{MINIMAL}webhook_secret = \"short\"\n"
        ));
        for want in [
            "sip.allowed_peers[0]: \"nope\" is not an IP address",
            "sip.max_tcp_connections: 0 is not between 1 and",
            "sip.tcp_idle_secs: 0 is not between 1 and",
            "sip.max_held_calls: 0 is not between 1 and",
            "sip.invite_burst: 0 is not between 1 and",
            "http.rate_limit_burst: 0 is not between 1 and",
            "store.max_contexts: 0 is not between 1 and",
            "agents[0].webhook_secret: must be 16 to 512",
        ] {
            assert!(
                got.iter().any(|p| p.starts_with(want)),
                "{want:?} not in {got:#?}"
            );
        }
        assert_eq!(got.len(), 8, "{got:#?}");
    }
}
