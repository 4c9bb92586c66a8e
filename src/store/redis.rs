//! The Redis backend: several sidecars, one cache.
//!
//! # Keys and values
//! A context lives at `{key_prefix}:{agent}:{number}` (the number in E.164, so it never
//! holds a `:` and the key reads back unambiguously), as the compact JSON of the context
//! in posting order, written with `SET key value PX ttl`: Redis expires it, nothing here
//! sweeps. Consume-once is `GETDEL` (Redis 6.2 or later), atomic on the server, so two
//! sidecars can never both take one context. Putting a context back is `SET ... NX`, which
//! never overwrites a newer one.
//!
//! # Waking calls held on another node
//! After writing a context, a node `PUBLISH`es its key on `{key_prefix}:published`. Each
//! process keeps one subscription to that channel ([`ContextStore::subscribe`]; not one per
//! call), and [`super::Contexts::spawn_subscriber`] releases the calls it holds for an
//! announced key with what `GETDEL` (or `GET` without `consume`) finds. The write comes
//! before the announcement and a held call registers before it reads, so no wake-up is
//! lost when webhook and INVITE race across nodes. The subscription reconnects on its own
//! with backoff; announcements made while it was down are lost, so on every (re)subscribe
//! it reports [`StoreEvent::Resynced`] and every key with held calls is read again. A
//! `PING` every few seconds on the subscription finds a connection that died silently.
//!
//! # Faults
//! Every command, connection attempt included, is bounded by `store.timeout_ms` (default
//! 500 ms), so a slow Redis costs a call at most that before it falls back; the SIP loop
//! itself never awaits Redis (a look-up that is not ready at once runs on a task of its
//! own). When Redis fails, a small circuit breaker refuses commands at once for a backoff
//! that doubles from 50 ms up to 2 s, so calls fall back without waiting on a dead server
//! and a recovering one is not stormed; the first command after the backoff tries again,
//! and a successful re-subscription closes the breaker at once. Meanwhile webhooks answer
//! 503 `store unavailable` (the sender retries, nothing is dropped silently), calls that
//! miss fall back immediately with the reason logged, and `/readyz` says not ready.
//! One loss is inherent to timeouts: a `GETDEL` that Redis executes after its caller gave up
//! takes a context nobody receives (that call fell back already).
//! Nothing waits for Redis at start, so a node starts while Redis is down: commands connect
//! when first used, and the subscription keeps trying in the background.
//!
//! # Deployments
//! One server (`store.url`, with its replicas if any, the client talks to the master),
//! Redis Cluster (`store.cluster`: commands are single-key and routed by slot; classic
//! pub/sub is cluster-wide, so the subscription may sit on any node), and Sentinel
//! (`store.sentinel`: the master is asked of the Sentinels at every (re)connection, so a
//! failover is followed at the next reconnect; a demoted master answering `READONLY`
//! counts as a failure and makes the next command ask again).

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, Cmd, ErrorKind, IntoConnectionInfo, RedisError, RedisResult, Value};
use serde_json::Map;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{CallerKey, Context, ContextStore, StoreError, StoreEvent};
use crate::config::{RedisConfig, RedisTarget, RedisUrl};
use crate::number::E164;

/// First backoff after a failure; it doubles with each failure in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest backoff: how late, at most, a recovered Redis is noticed without a subscriber.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the subscription is pinged to find a connection that died silently.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Announcements buffered between the subscription and the subscriber loop.
const FEED_CAPACITY: usize = 4096;
/// Redis refuses an expiry past its clock's range; ten years is forever for a context.
const TTL_MAX_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// The Redis key of a context: `{prefix}:{agent}:{number}`.
pub fn redis_key(prefix: &str, key: &CallerKey) -> String {
    format!("{prefix}:{}:{}", key.agent, key.number.as_str())
}

/// The inverse of [`redis_key`]; `None` for anything else (another prefix, garbage). The
/// number is what follows the last `:`, since an E.164 number never holds one.
pub fn parse_redis_key(prefix: &str, redis_key: &str) -> Option<CallerKey> {
    let rest = redis_key.strip_prefix(prefix)?.strip_prefix(':')?;
    let (agent, number) = rest.rsplit_once(':')?;
    if agent.is_empty() || number.is_empty() {
        return None;
    }
    Some(CallerKey {
        agent: agent.to_string(),
        number: E164(number.to_string()),
    })
}

/// The pub/sub channel announcements go to: `{prefix}:published`.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:published")
}

/// A SCAN `MATCH` pattern for every key under `prefix`, glob characters escaped.
fn match_pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 3);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str(":*");
    pattern
}

/// The [`ContextStore`] on Redis. Cheap to share: everything lives behind one `Arc`.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Where the connections come from.
enum Target {
    Single(Client),
    Cluster {
        client: ClusterClient,
        /// Seed nodes, for the subscription (any node hears every PUBLISH).
        seeds: Vec<Client>,
    },
    /// The client is asked for the current master at every (re)connection.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A live connection: cheap to clone, used concurrently.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(conn) => cmd.query_async(conn).await,
            Conn::Cluster(conn) => cmd.query_async(conn).await,
        }
    }
}

struct Inner {
    target: Target,
    prefix: String,
    channel: String,
    timeout: Duration,
    /// The connection in use; `None` until first used and after a failure that may mean
    /// it points at the wrong server or a dead socket.
    conn: Mutex<Option<Conn>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    health: Health,
}

impl RedisStore {
    /// Builds the clients; connects to nothing (the first command does), so a node starts
    /// with Redis down.
    ///
    /// # Errors
    /// A URL the Redis client cannot use (config validation already checks them).
    pub fn new(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let target = match &config.target {
            RedisTarget::Single(url) => Target::Single(open(url)?),
            RedisTarget::Cluster(urls) => {
                let client = ClusterClient::builder(urls.iter().map(RedisUrl::expose))
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout)
                    .retries(1)
                    .build()
                    .map_err(|error| unusable("cluster", &error))?;
                let seeds = urls.iter().map(open).collect::<Result<Vec<_>, _>>()?;
                Target::Cluster { client, seeds }
            }
            RedisTarget::Sentinel {
                master,
                urls,
                master_url,
            } => {
                let mut node = SentinelNodeConnectionInfo::default();
                if let Some(url) = master_url {
                    let info = url
                        .expose()
                        .into_connection_info()
                        .map_err(|error| unusable(&url.to_string(), &error))?;
                    node = node.set_redis_connection_info(info.redis_settings().clone());
                    if url.is_tls() {
                        node = node.set_tls_mode(redis::TlsMode::Secure);
                    }
                }
                let sentinels: Vec<&str> = urls.iter().map(RedisUrl::expose).collect();
                let client = SentinelClient::build(
                    sentinels,
                    master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|error| unusable("sentinel", &error))?;
                Target::Sentinel(tokio::sync::Mutex::new(client))
            }
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                target,
                prefix: config.key_prefix.clone(),
                channel: channel(&config.key_prefix),
                timeout: config.timeout,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                health: Health::default(),
            }),
        })
    }

    fn key(&self, key: &CallerKey) -> String {
        redis_key(&self.inner.prefix, key)
    }

    /// `SET key value PX ttl [NX]`; whether it was written.
    async fn set(
        &self,
        key: &CallerKey,
        ctx: &Context,
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .min(TTL_MAX_MS);
        if ttl_ms == 0 {
            // Never visible, as in the memory store; Redis would refuse PX 0.
            return Ok(false);
        }
        let value = serde_json::to_string(ctx.as_ref())
            .map_err(|error| StoreError::Unavailable(format!("cannot encode context: {error}")))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value).arg("PX").arg(ttl_ms);
        if only_if_absent {
            cmd.arg("NX");
        }
        let answer: Value = self.inner.run("SET", self.inner.timeout, &cmd).await?;
        Ok(!matches!(answer, Value::Nil))
    }

    /// A read (`GET` or `GETDEL`), decoded.
    async fn read(
        &self,
        command: &'static str,
        key: &CallerKey,
    ) -> Result<Option<Context>, StoreError> {
        let redis_key = self.key(key);
        let mut cmd = redis::cmd(command);
        cmd.arg(&redis_key);
        let bytes: Option<Vec<u8>> = self.inner.run(command, self.inner.timeout, &cmd).await?;
        Ok(bytes.and_then(|bytes| decode(&redis_key, &bytes)))
    }
}

/// A stored value back to a context; `None` (logged) when it is not a JSON object, which
/// only a foreign writer under our prefix can cause.
fn decode(redis_key: &str, bytes: &[u8]) -> Option<Context> {
    match serde_json::from_slice::<Map<String, serde_json::Value>>(bytes) {
        Ok(map) => Some(Arc::new(map)),
        Err(error) => {
            warn!(%error, key = redis_key, "ignored a value that is not a context");
            None
        }
    }
}

fn open(url: &RedisUrl) -> Result<Client, StoreError> {
    Client::open(url.expose()).map_err(|error| unusable(&url.to_string(), &error))
}

fn unusable(what: &str, error: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("cannot use {what}: {error}"))
}

impl Inner {
    fn current(&self) -> Option<Conn> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn discard_connection(&self) {
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        // One attempt per reconnection: the breaker (`Health`) paces the attempts, and a
        // command never waits through a chain of retries.
        ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    /// The connection in use, or a new one.
    async fn connection(&self) -> RedisResult<Conn> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let _gate = self.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let conn = match &self.target {
            Target::Single(client) => Conn::Single(ConnectionManager::new_lazy_with_config(
                client.clone(),
                self.manager_config(),
            )?),
            Target::Cluster { client, .. } => Conn::Cluster(client.get_async_connection().await?),
            Target::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                Conn::Single(ConnectionManager::new_lazy_with_config(
                    client,
                    self.manager_config(),
                )?)
            }
        };
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `cmd` within `timeout` (connecting included), through the breaker.
    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        timeout: Duration,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.guarded(
            what,
            timeout,
            |mut conn| async move { conn.query(cmd).await },
        )
        .await
    }

    /// Runs `op` on a connection within `timeout`, through the breaker: refused at once
    /// while it is open; a failure opens it (and drops the connection, so the next
    /// attempt starts afresh: a new socket, the current Sentinel master).
    async fn guarded<T, F, Fut>(
        &self,
        what: &'static str,
        timeout: Duration,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.health.check(Instant::now())?;
        let attempt = async {
            let conn = self.connection().await?;
            op(conn).await
        };
        let failure = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(value)) => {
                self.health.succeeded();
                return Ok(value);
            }
            Ok(Err(error)) if !is_failure(&error) => {
                return Err(StoreError::Unavailable(format!("redis {what}: {error}")));
            }
            Ok(Err(error)) => format!("redis {what}: {error}"),
            Err(_) => format!("redis {what}: no answer within {} ms", timeout.as_millis()),
        };
        self.discard_connection();
        self.health.failed(Instant::now(), &failure);
        Err(StoreError::Unavailable(failure))
    }

    /// A client for the subscription: the server, a cluster seed (rotating through them
    /// with `attempt`), or the current Sentinel master.
    async fn subscription_client(&self, attempt: usize) -> RedisResult<Client> {
        match &self.target {
            Target::Single(client) => Ok(client.clone()),
            Target::Cluster { seeds, .. } => match seeds.get(attempt % seeds.len().max(1)) {
                Some(client) => Ok(client.clone()),
                None => Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "no cluster seed nodes",
                ))),
            },
            Target::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }
}

/// Whether an error says Redis is unreachable or unusable (so the breaker opens), as
/// opposed to a surprising answer about one key.
fn is_failure(error: &RedisError) -> bool {
    !matches!(
        error.kind(),
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse
    )
}

#[async_trait::async_trait]
impl ContextStore for RedisStore {
    async fn put(&self, key: &CallerKey, ctx: Context, ttl: Duration) -> Result<(), StoreError> {
        self.set(key, &ctx, ttl, false).await.map(|_| ())
    }

    /// `SET ... NX`: atomic on the server.
    async fn put_if_absent(
        &self,
        key: &CallerKey,
        ctx: Context,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.set(key, &ctx, ttl, true).await
    }

    async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
        self.read("GET", key).await
    }

    /// `GETDEL`: one node gets it, whatever the race.
    async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
        self.read("GETDEL", key).await
    }

    async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(key));
        let removed: u64 = self.inner.run("DEL", self.inner.timeout, &cmd).await?;
        Ok(removed > 0)
    }

    /// Counts the keys under the prefix: `SCAN` from here on one server; on a cluster, a
    /// script runs the same `SCAN` on every master and the counts are summed. It walks the
    /// keyspace, so it is for tests and tools, not for a hot path; its budget is ten times
    /// `timeout_ms`.
    async fn len(&self) -> Result<usize, StoreError> {
        let pattern = match_pattern(&self.inner.prefix);
        let budget = self.inner.timeout.saturating_mul(10);
        self.inner
            .guarded("SCAN", budget, |mut conn| async move {
                match &mut conn {
                    Conn::Cluster(cluster) => {
                        let mut cmd = redis::cmd("EVAL");
                        cmd.arg(COUNT_SCRIPT).arg(0).arg(&pattern);
                        let routing = RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllMasters,
                            Some(ResponsePolicy::Aggregate(AggregateOp::Sum)),
                        ));
                        let total = cluster.route_command(cmd, routing).await?;
                        redis::from_redis_value::<usize>(total).map_err(RedisError::from)
                    }
                    Conn::Single(_) => {
                        let mut cursor: u64 = 0;
                        let mut total = 0usize;
                        loop {
                            let mut cmd = redis::cmd("SCAN");
                            cmd.arg(cursor)
                                .arg("MATCH")
                                .arg(&pattern)
                                .arg("COUNT")
                                .arg(1000);
                            let (next, keys): (u64, Vec<Vec<u8>>) = conn.query(&cmd).await?;
                            total = total.saturating_add(keys.len());
                            if next == 0 {
                                return Ok(total);
                            }
                            cursor = next;
                        }
                    }
                }
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // On a cluster PING goes to every master: ready means every slot is served.
        let _: Value = self
            .inner
            .run("PING", self.inner.timeout, &redis::cmd("PING"))
            .await?;
        Ok(())
    }

    /// `PUBLISH {prefix}:published {key}`.
    async fn announce(&self, key: &CallerKey) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.inner.channel).arg(self.key(key));
        let _: Value = self.inner.run("PUBLISH", self.inner.timeout, &cmd).await?;
        Ok(())
    }

    /// Starts the subscription task; it ends when the receiver is dropped. `None` outside
    /// a tokio runtime.
    fn subscribe(&self) -> Option<mpsc::Receiver<StoreEvent>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        runtime.spawn(listen(Arc::clone(&self.inner), tx));
        Some(rx)
    }
}

/// Counts the keys matching `ARGV[1]` on the node it runs on (cluster `len`).
const COUNT_SCRIPT: &str = r#"
local cursor = "0"
local total = 0
repeat
  local page = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = page[1]
  total = total + #page[2]
until cursor == "0"
return total
"#;

/// The subscription: connect, `SUBSCRIBE`, report [`StoreEvent::Resynced`], forward every
/// announcement; on any loss, back off and start over. Ends when `tx` is closed.
async fn listen(inner: Arc<Inner>, tx: mpsc::Sender<StoreEvent>) {
    let mut failures: u32 = 0;
    let mut attempt: usize = 0;
    loop {
        let subscribed = tokio::select! {
            () = tx.closed() => return,
            subscribed = tokio::time::timeout(inner.timeout, subscribe_once(&inner, attempt)) => subscribed,
        };
        attempt = attempt.wrapping_add(1);
        let error = match subscribed {
            Ok(Ok((sink, stream))) => {
                if failures > 0 {
                    info!(channel = %inner.channel, "redis subscription back");
                } else {
                    info!(channel = %inner.channel, "subscribed to redis announcements");
                }
                failures = 0;
                // Redis answers: let commands through at once rather than after the backoff.
                inner.health.succeeded();
                if tx.send(StoreEvent::Resynced).await.is_err() {
                    return;
                }
                match pump(&inner, &tx, sink, stream).await {
                    Pumped::Closed => return,
                    Pumped::Lost(reason) => reason,
                }
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {} ms", inner.timeout.as_millis()),
        };
        failures = failures.saturating_add(1);
        if failures == 1 {
            warn!(%error, channel = %inner.channel, "no redis subscription: calls held here are released only by webhooks on this node until it is back");
        } else {
            debug!(%error, failures, "redis subscription still down");
        }
        let pause = backoff(failures);
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

async fn subscribe_once(
    inner: &Inner,
    attempt: usize,
) -> RedisResult<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
    let client = inner.subscription_client(attempt).await?;
    let (mut sink, stream) = client.get_async_pubsub().await?.split();
    sink.subscribe(&inner.channel).await?;
    Ok((sink, stream))
}

enum Pumped {
    /// The feed's receiver is gone: stop for good.
    Closed,
    /// The connection is gone: reconnect.
    Lost(String),
}

async fn pump(
    inner: &Inner,
    tx: &mpsc::Sender<StoreEvent>,
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
) -> Pumped {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.tick().await;
    loop {
        tokio::select! {
            () = tx.closed() => return Pumped::Closed,
            message = stream.next() => {
                let Some(message) = message else {
                    return Pumped::Lost("connection closed".to_string());
                };
                let payload = message.get_payload_bytes();
                let Some(key) = std::str::from_utf8(payload)
                    .ok()
                    .and_then(|text| parse_redis_key(&inner.prefix, text))
                else {
                    debug!(len = payload.len(), "ignored an announcement that names no context key");
                    continue;
                };
                if tx.send(StoreEvent::Published(key)).await.is_err() {
                    return Pumped::Closed;
                }
            }
            _ = keepalive.tick() => {
                match tokio::time::timeout(inner.timeout, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Pumped::Lost(format!("PING failed: {error}")),
                    Err(_) => return Pumped::Lost(format!(
                        "no answer to PING within {} ms", inner.timeout.as_millis()
                    )),
                }
            }
        }
    }
}

/// The pause after `failures` failures in a row (at least one): 50 ms doubling to 2 s.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_MIN
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

/// The circuit breaker in front of every command: after a failure, commands are refused
/// at once until the backoff has passed. Time is passed in, so tests need no clock.
#[derive(Debug, Default)]
struct Health {
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// Failures in a row; 0 while healthy.
    failures: u32,
    /// No command before this instant.
    retry_at: Option<Instant>,
    last_error: String,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Err` while the breaker is open.
    fn check(&self, now: Instant) -> Result<(), StoreError> {
        let state = self.lock();
        match state.retry_at {
            Some(at) if now < at => Err(StoreError::Unavailable(format!(
                "{} (next attempt in {} ms)",
                state.last_error,
                at.saturating_duration_since(now).as_millis()
            ))),
            _ => Ok(()),
        }
    }

    fn succeeded(&self) {
        let mut state = self.lock();
        if state.failures > 0 {
            info!(failures = state.failures, "redis store reachable again");
        }
        state.failures = 0;
        state.retry_at = None;
    }

    fn failed(&self, now: Instant, error: &str) {
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        let pause = backoff(state.failures);
        state.retry_at = now.checked_add(pause);
        state.last_error = error.to_string();
        if state.failures == 1 {
            warn!(%error, "redis store unavailable: webhooks answer 503, calls that miss fall back at once");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(agent: &str, number: &str) -> CallerKey {
        CallerKey {
            agent: agent.to_string(),
            number: E164(number.to_string()),
        }
    }

    #[test]
    fn keys_are_prefix_agent_number_and_read_back() {
        let k = key("support-agent", "+14155550123");
        assert_eq!(
            redis_key("precall", &k),
            "precall:support-agent:+14155550123"
        );
        assert_eq!(
            parse_redis_key("precall", "precall:support-agent:+14155550123"),
            Some(k)
        );
        // An agent id with a colon still reads back: the number is after the last one.
        let odd = key("team:sales", "+1");
        assert_eq!(
            parse_redis_key("p", &redis_key("p", &odd)),
            Some(odd.clone())
        );
        assert_eq!(channel("precall"), "precall:published");
    }

    #[test]
    fn foreign_keys_are_not_ours() {
        assert_eq!(parse_redis_key("precall", "other:a:+1"), None);
        assert_eq!(parse_redis_key("precall", "precallx:a:+1"), None);
        assert_eq!(parse_redis_key("precall", "precall:a"), None);
        assert_eq!(parse_redis_key("precall", "precall::+1"), None);
        assert_eq!(parse_redis_key("precall", "precall:a:"), None);
        assert_eq!(parse_redis_key("precall", ""), None);
    }

    #[test]
    fn the_scan_pattern_escapes_glob_characters() {
        assert_eq!(match_pattern("precall"), "precall:*");
        assert_eq!(match_pattern("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\:*");
    }

    #[test]
    fn backoff_doubles_from_50_ms_to_2_s() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(6), Duration::from_millis(1600));
        assert_eq!(backoff(7), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
        assert_eq!(backoff(0), BACKOFF_MIN);
    }

    #[test]
    fn the_breaker_refuses_during_the_backoff_and_closes_on_success() {
        let health = Health::default();
        let t0 = Instant::now();
        health.check(t0).unwrap();
        health.failed(t0, "redis GET: connection refused");
        let refused = health.check(t0 + Duration::from_millis(10)).unwrap_err();
        assert!(
            refused.to_string().contains("connection refused"),
            "{refused}"
        );
        // The backoff has passed: one attempt goes through.
        health.check(t0 + Duration::from_millis(50)).unwrap();
        // It fails again: twice as long.
        let t1 = t0 + Duration::from_millis(50);
        health.failed(t1, "again");
        assert!(health.check(t1 + Duration::from_millis(99)).is_err());
        health.check(t1 + Duration::from_millis(100)).unwrap();
        health.succeeded();
        health.check(t1).unwrap();
        assert_eq!(health.lock().failures, 0);
    }

    #[test]
    fn only_answers_about_one_key_leave_the_breaker_closed() {
        let type_error = RedisError::from((ErrorKind::UnexpectedReturnType, "not a string"));
        assert!(!is_failure(&type_error));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_failure(&io));
    }

    #[test]
    fn undecodable_values_are_absent() {
        assert_eq!(decode("k", b"not json"), None);
        assert_eq!(decode("k", b"[1,2]"), None);
        let ctx = decode("k", br#"{"b":1,"a":"x"}"#).unwrap();
        let names: Vec<&str> = ctx.keys().map(String::as_str).collect();
        assert_eq!(names, ["b", "a"], "posting order kept");
    }

    #[tokio::test]
    async fn nothing_connects_until_used_and_a_dead_server_fails_fast() {
        // Port 1 on loopback: nothing listens there; the connection is refused at once.
        let config = RedisConfig {
            target: RedisTarget::Single(test_url("redis://127.0.0.1:1/0")),
            key_prefix: "precall".to_string(),
            timeout: Duration::from_millis(300),
        };
        let store = RedisStore::new(&config).unwrap();
        let started = std::time::Instant::now();
        let error = store.get(&key("a", "+1")).await.unwrap_err();
        assert!(error.to_string().contains("redis GET"), "{error}");
        // The breaker is open now: refused without trying.
        let again = store.ping().await.unwrap_err();
        assert!(again.to_string().contains("next attempt in"), "{again}");
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    /// A `redis-server` on a free port for one test, killed on drop.
    struct Server {
        port: u16,
        child: std::process::Child,
    }

    impl Server {
        fn start() -> Server {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("the store tests need redis-server (apt-get install redis-server)");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Server { port, child }
        }

        fn store(&self, prefix: &str) -> RedisStore {
            RedisStore::new(&RedisConfig {
                target: RedisTarget::Single(test_url(&format!(
                    "redis://127.0.0.1:{}/0",
                    self.port
                ))),
                key_prefix: prefix.to_string(),
                timeout: Duration::from_millis(500),
            })
            .unwrap()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn ctx(name: &str) -> Context {
        let mut map = Map::new();
        map.insert("customer_name".to_string(), name.into());
        map.insert("n".to_string(), 7.into());
        Arc::new(map)
    }

    const TTL: Duration = Duration::from_secs(300);

    /// The trait's contract on a real server (the memory store's tests check the same).
    #[tokio::test]
    async fn the_contract_on_a_real_redis() {
        let server = Server::start();
        let store = server.store("t");
        let k = key("a", "+1");
        store.ping().await.unwrap();
        assert_eq!(store.get(&k).await.unwrap(), None);
        store.put(&k, ctx("Ada"), TTL).await.unwrap();
        assert_eq!(store.get(&k).await.unwrap(), Some(ctx("Ada")));
        assert!(!store.put_if_absent(&k, ctx("Bob"), TTL).await.unwrap());
        assert_eq!(store.len().await.unwrap(), 1);
        assert_eq!(store.take(&k).await.unwrap(), Some(ctx("Ada")));
        assert_eq!(store.take(&k).await.unwrap(), None, "consume-once");
        assert!(store.put_if_absent(&k, ctx("Bob"), TTL).await.unwrap());
        assert!(store.delete(&k).await.unwrap());
        assert!(!store.delete(&k).await.unwrap());
        assert!(store.is_empty().await.unwrap());
        // Agents and prefixes keep apart.
        store.put(&k, ctx("Ada"), TTL).await.unwrap();
        assert_eq!(store.get(&key("b", "+1")).await.unwrap(), None);
        let other = server.store("u");
        assert_eq!(other.get(&k).await.unwrap(), None);
        assert_eq!(
            other.len().await.unwrap(),
            0,
            "len counts its own prefix only"
        );
        assert_eq!(store.len().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn contexts_expire_with_their_ttl() {
        let server = Server::start();
        let store = server.store("t");
        store
            .put(&key("a", "+1"), ctx("Ada"), Duration::from_millis(100))
            .await
            .unwrap();
        assert!(store.get(&key("a", "+1")).await.unwrap().is_some());
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while store.get(&key("a", "+1")).await.unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store
            .put(&key("a", "+2"), ctx("Ada"), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(store.get(&key("a", "+2")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn concurrent_takes_hand_a_context_to_exactly_one() {
        let server = Server::start();
        let stores: Vec<RedisStore> = (0..4).map(|_| server.store("t")).collect();
        for round in 0..20 {
            let k = key("a", &format!("+{round}"));
            stores[0].put(&k, ctx("Ada"), TTL).await.unwrap();
            let takes = stores.iter().map(|store| store.take(&k));
            let winners = futures_util::future::join_all(takes)
                .await
                .into_iter()
                .filter(|taken| matches!(taken, Ok(Some(_))))
                .count();
            assert_eq!(winners, 1, "round {round}");
        }
    }

    #[tokio::test]
    async fn a_feed_starts_resynced_and_hears_its_own_prefix_only() {
        let server = Server::start();
        let (a, b) = (server.store("t"), server.store("t"));
        let mut feed = b.subscribe().unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), feed.recv())
            .await
            .unwrap();
        assert_eq!(first, Some(StoreEvent::Resynced), "subscribed");
        a.announce(&key("a", "+1")).await.unwrap();
        // Another deployment's announcement on its own channel is not heard.
        server.store("u").announce(&key("a", "+9")).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(5), feed.recv())
            .await
            .unwrap();
        assert_eq!(heard, Some(StoreEvent::Published(key("a", "+1"))));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), feed.recv())
                .await
                .is_err(),
            "nothing else"
        );
    }

    fn test_url(url: &str) -> RedisUrl {
        let cfg = crate::config::Config::from_toml_str(&format!(
            "[store]\nbackend = \"redis\"\nurl = \"{url}\"\n[[agents]]\nid = \"a\"\napi_keys = [\"k\"]\nupstream = \"sip:127.0.0.1:5070\"\n"
        ))
        .unwrap();
        match cfg.store.backend {
            crate::config::StoreBackend::Redis(RedisConfig {
                target: RedisTarget::Single(url),
                ..
            }) => url,
            other => panic!("{other:?}"),
        }
    }
}
