//! Caller context storage: the [`ContextStore`] trait, the embedded in-memory backend, the
//! Redis backend (several sidecars, one cache), and [`Contexts`], which adds the wait
//! registry that wakes held calls the instant their context lands.
//!
//! # The wait registry
//! A held call waits on a [`Watch`]: one `tokio::sync::oneshot` receiver, whose sender sits
//! in a registry (`key → waiters`) behind a `std::sync::Mutex` that is never held across an
//! await. `publish` sends to every waiter under that lock, so a watch holds its context
//! from that instant on whether or not anyone is polling it yet; that is what makes the
//! INVITE/webhook race safe (see [`Contexts`]). A watch unregisters itself on drop, and a
//! key's entry goes with its last waiter, so the registry holds only live waits.
//!
//! # Several nodes
//! The registry is per process; a shared store ([`redis`]) tells the other nodes about a
//! context it stored. [`ContextStore::announce`] is called after every store write that a
//! held call may be waiting for, and [`ContextStore::subscribe`] yields a [`StoreEvent`]
//! for every announcement, from any node. [`Contexts::spawn_subscriber`] runs one loop per
//! process over that feed: for a key this node has held calls for, it claims the context
//! from the store (taken when `consume`) and releases them. Because a node registers its
//! watch before it reads the store, and the announcing node writes before it announces, a
//! webhook on A racing an INVITE on B is seen by B's read or by B's subscriber, never by
//! neither. When the feed was down (announcements lost), it says so with
//! [`StoreEvent::Resynced`] once it is back, and every key with held calls is read again.
//! The in-memory store announces nothing and has no feed.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use serde_json::{Map, Value};

use crate::number::E164;

/// A posted context: the webhook body minus `agentId`/`phoneNumber`, in posting order.
pub type Context = Arc<Map<String, Value>>;

/// (agent, normalised caller number): what a context is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerKey {
    pub agent: String,
    pub number: E164,
}

impl fmt::Display for CallerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.agent, self.number)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The memory backend holds `store.max_contexts` contexts: no room for a new key.
    #[error("context store full ({max} contexts)")]
    Full { max: usize },
}

/// A context cache with TTL. Implementations must be cheap to call from the SIP path.
#[async_trait::async_trait]
pub trait ContextStore: Send + Sync + 'static {
    /// Stores (replaces) the context for `key`, expiring after `ttl`.
    async fn put(&self, key: &CallerKey, ctx: Context, ttl: Duration) -> Result<(), StoreError>;
    /// Stores the context unless an unexpired one is already there; `true` when stored.
    /// Used to put back a context without overwriting a newer one. The default is a
    /// `get` then a `put` (not atomic); backends that can do better should.
    async fn put_if_absent(
        &self,
        key: &CallerKey,
        ctx: Context,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        if self.get(key).await?.is_some() {
            return Ok(false);
        }
        self.put(key, ctx, ttl).await?;
        Ok(true)
    }
    /// The unexpired context for `key`, leaving it in place.
    async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError>;
    /// Atomically removes and returns the unexpired context for `key` (consume-once).
    async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError>;
    /// Removes the context; `true` when there was one.
    async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError>;
    /// Number of unexpired contexts held (for gauges and tests).
    async fn len(&self) -> Result<usize, StoreError>;
    /// Whether no unexpired context is held.
    async fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len().await? == 0)
    }
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// The number of contexts when it is known without any IO (for the periodic stats
    /// line, which must never wait on, or abandon half-way, a request to a remote store).
    fn len_now(&self) -> Option<usize> {
        None
    }
    /// Tells the other processes sharing this store that a context for `key` was just
    /// stored, so a call they hold for it is released ([`StoreEvent::Published`]). Called
    /// after the write, never before. The default does nothing: a store no other process
    /// sees has nobody to tell.
    async fn announce(&self, key: &CallerKey) -> Result<(), StoreError> {
        let _ = key;
        Ok(())
    }
    /// The feed of announcements from every process sharing the store (this one
    /// included), for [`Contexts::spawn_subscriber`]. Each call starts a new feed; the
    /// feed stops when the receiver is dropped. The default is `None`: nothing to hear.
    fn subscribe(&self) -> Option<mpsc::Receiver<StoreEvent>> {
        None
    }
}

/// What a shared store's feed reports ([`ContextStore::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Some process stored a context for this key.
    Published(CallerKey),
    /// The feed is (again) connected. Announcements made while it was not are lost, so
    /// every key with held calls must be read from the store again.
    Resynced,
}

/// What [`Contexts::claim`] found for an INVITE.
pub enum Claim {
    /// Cached already.
    Hit(Context),
    /// Not cached: await the [`Watch`]; it resolves the instant a webhook for the key lands.
    Pending(Watch),
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Hit(ctx) => f.debug_tuple("Hit").field(ctx).finish(),
            Claim::Pending(watch) => f.debug_tuple("Pending").field(watch).finish(),
        }
    }
}

/// A registered interest in one key: a future resolving to the context the next webhook
/// for that key brings. Dropping it unregisters.
///
/// The context is handed over at `publish` time, not at poll time, so a watch that is
/// dropped after a webhook released it (the call was cancelled or fell back in the same
/// instant) would swallow that context. When the store consumes contexts, dropping such a
/// watch therefore puts its context back in the background (like [`Contexts::restore`]);
/// [`Watch::close`] does the same synchronously by handing it to the caller instead.
///
/// A watch resolves at most once; polled again after that, it stays pending.
pub struct Watch {
    key: CallerKey,
    /// This waiter's id in the registry entry for `key`.
    id: u64,
    /// `None` once the context was returned by `poll` or `close`.
    rx: Option<oneshot::Receiver<Context>>,
    shared: Arc<Shared>,
}

impl Watch {
    /// The key this watch waits for.
    pub fn key(&self) -> &CallerKey {
        &self.key
    }

    /// Stops waiting. Returns the context if a webhook had already released this watch
    /// (so the caller can use it, or [`Contexts::restore`] it); after `close` nothing
    /// can be delivered to this watch any more.
    pub fn close(mut self) -> Option<Context> {
        // Unregister first: under the registry lock, so a concurrent publish either
        // delivered already (and try_recv sees it) or will not find us at all.
        self.shared.registry.unregister(&self.key, self.id);
        self.rx.take().and_then(|mut rx| rx.try_recv().ok())
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("key", &self.key)
            .field("id", &self.id)
            .field("resolved", &self.rx.is_none())
            .finish()
    }
}

impl Future for Watch {
    type Output = Context;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Context> {
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Pending;
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(ctx)) => {
                self.rx = None;
                Poll::Ready(ctx)
            }
            // The sender is only ever dropped after sending or after this watch
            // unregistered, and the registry lives as long as this watch: not reachable.
            // Never resolving is the safe answer: the caller's fallback timer still fires.
            Poll::Ready(Err(_)) => {
                self.rx = None;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.registry.unregister(&self.key, self.id);
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let Ok(ctx) = rx.try_recv() else {
            return;
        };
        if !self.shared.consume {
            // publish stored it regardless of the held calls: nothing to put back.
            return;
        }
        let key = self.key.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = Arc::clone(&self.shared);
                runtime.spawn(async move {
                    if let Err(error) = shared.restore(&key, ctx).await {
                        tracing::warn!(%error, %key, "could not put back a context released to a dropped call");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(%key, "context released to a dropped call is lost: no runtime to put it back");
            }
        }
    }
}

/// The result of [`Contexts::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Held calls released by this context.
    pub released: usize,
    /// Whether the context was cached for later calls (false when held calls consumed it).
    pub stored: bool,
}

/// The store plus the wait registry, with the consume/TTL policy of `[store]`.
///
/// No lost wake-up: `claim` registers its watch *before* reading the store, and `publish`
/// wakes registered watches *before* deciding whether to store, so a webhook racing an
/// INVITE is seen by exactly one of the two paths.
///
/// The public fields are read-only after [`Contexts::new`]: the policy is captured there
/// and shared with every [`Watch`].
pub struct Contexts {
    pub store: Arc<dyn ContextStore>,
    pub consume: bool,
    pub ttl: Duration,
    shared: Arc<Shared>,
}

impl fmt::Debug for Contexts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contexts")
            .field("consume", &self.consume)
            .field("ttl", &self.ttl)
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl Contexts {
    pub fn new(store: Arc<dyn ContextStore>, consume: bool, ttl: Duration) -> Contexts {
        let shared = Arc::new(Shared {
            store: Arc::clone(&store),
            consume,
            ttl,
            registry: Registry::default(),
        });
        Contexts {
            store,
            consume,
            ttl,
            shared,
        }
    }

    /// A webhook landed: release every call held for `key` at once (they all get `ctx`);
    /// store it unless `consume` is on and a held call used it, and announce it to the
    /// other processes sharing the store.
    ///
    /// A call that registered after the first release but read the store before the write
    /// would otherwise wait in vain; so after writing, the registry is checked once more
    /// and such a call gets the context from the store.
    ///
    /// # Errors
    /// The store failed; the context may or may not be stored (held calls may still have
    /// been released). A retry of the same webhook is safe: it replaces.
    pub async fn publish(&self, key: &CallerKey, ctx: Context) -> Result<Published, StoreError> {
        let shared = &self.shared;
        let released = shared.registry.release(key, &ctx);
        if shared.consume && released > 0 {
            return Ok(Published {
                released,
                stored: false,
            });
        }
        shared.store.put(key, ctx, shared.ttl).await?;
        shared.store.announce(key).await?;
        let late = shared.deliver_from_store(key).await?;
        Ok(Published {
            released: released + late,
            stored: !(shared.consume && late > 0),
        })
    }

    /// An INVITE arrived: the cached context (taken when `consume`), or a watch to await.
    ///
    /// # Errors
    /// The store failed.
    pub async fn claim(&self, key: &CallerKey) -> Result<Claim, StoreError> {
        let shared = &self.shared;
        // Register before reading: a publish from here on either lands in the store before
        // our read, or finds this watch. Never neither.
        let watch = shared.register(key);
        let found = if shared.consume {
            shared.store.take(key).await
        } else {
            shared.store.get(key).await
        };
        match found {
            // A webhook that released the watch meanwhile is newer than what was cached
            // (publish replaces): the call gets that one.
            Ok(Some(cached)) => Ok(Claim::Hit(watch.close().unwrap_or(cached))),
            Ok(None) => Ok(Claim::Pending(watch)),
            Err(error) => match watch.close() {
                Some(delivered) => Ok(Claim::Hit(delivered)),
                None => Err(error),
            },
        }
    }

    /// Puts back a context that was delivered to a call which had already fallen back,
    /// so it is not lost.
    ///
    /// A call held for the key right now gets it at once (as if it had just been
    /// published); otherwise it is stored for `ttl` from now, unless a newer context
    /// arrived meanwhile, which it does not overwrite.
    ///
    /// # Errors
    /// The store failed.
    pub async fn restore(&self, key: &CallerKey, ctx: Context) -> Result<(), StoreError> {
        self.shared.restore(key, ctx).await
    }

    /// Number of calls currently waiting (all keys).
    pub fn waiting(&self) -> usize {
        self.shared.registry.lock().count
    }

    /// Runs the one subscriber loop of this process over the store's feed (see the
    /// module docs, "Several nodes"), until `shutdown` is cancelled or the feed ends.
    /// `None` when the store has no feed (the in-memory store).
    ///
    /// Each event is handled on a task of its own, and only for keys this process holds
    /// calls for, so a busy feed costs one registry look-up per announcement.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_subscriber(
        &self,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let mut feed = self.shared.store.subscribe()?;
        let shared = Arc::clone(&self.shared);
        Some(tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => break,
                    event = feed.recv() => event,
                };
                let keys = match event {
                    None => break,
                    Some(StoreEvent::Published(key)) => vec![key],
                    Some(StoreEvent::Resynced) => shared.registry.keys(),
                };
                for key in keys {
                    if !shared.registry.has_waiters(&key) {
                        continue;
                    }
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        match shared.deliver_from_store(&key).await {
                            Ok(0) => {}
                            Ok(released) => {
                                tracing::debug!(%key, released, "held calls released by another node's webhook");
                            }
                            Err(error) => {
                                // The calls keep waiting; their fallback timer still runs.
                                tracing::warn!(%error, %key, "could not read a context another node announced");
                            }
                        }
                    });
                }
            }
        }))
    }
}

/// What [`Contexts`] shares with its watches (a dropped watch may need to restore).
struct Shared {
    store: Arc<dyn ContextStore>,
    consume: bool,
    ttl: Duration,
    registry: Registry,
}

impl Shared {
    fn register(self: &Arc<Self>, key: &CallerKey) -> Watch {
        let (id, rx) = self.registry.register(key);
        Watch {
            key: key.clone(),
            id,
            rx: Some(rx),
            shared: Arc::clone(self),
        }
    }

    async fn restore(&self, key: &CallerKey, ctx: Context) -> Result<(), StoreError> {
        let released = self.registry.release(key, &ctx);
        if self.consume && released > 0 {
            return Ok(());
        }
        if self.store.put_if_absent(key, ctx, self.ttl).await? {
            self.store.announce(key).await?;
        }
        Ok(())
    }

    /// For calls held here for `key`: read the store (take when `consume`) and release
    /// them with what is there. Returns how many were released. A context taken for
    /// calls that went away meanwhile is put back.
    async fn deliver_from_store(&self, key: &CallerKey) -> Result<usize, StoreError> {
        if !self.registry.has_waiters(key) {
            return Ok(0);
        }
        let found = if self.consume {
            self.store.take(key).await?
        } else {
            self.store.get(key).await?
        };
        let Some(ctx) = found else {
            // Taken by another call (on any node), deleted or expired meanwhile.
            return Ok(0);
        };
        let released = self.registry.release(key, &ctx);
        if released == 0 && self.consume {
            self.restore(key, ctx).await?;
        }
        Ok(released)
    }
}

/// key → the calls waiting for it.
#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    by_key: HashMap<CallerKey, Vec<Waiter>>,
    /// Sum of the vector lengths, for [`Contexts::waiting`].
    count: usize,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Context>,
}

impl Registry {
    /// Nothing panics while the lock is held, but should it ever, the map is still
    /// consistent: keep serving rather than poison every later call.
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, key: &CallerKey) -> (u64, oneshot::Receiver<Context>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.lock();
        waiters
            .by_key
            .entry(key.clone())
            .or_default()
            .push(Waiter { id, tx });
        waiters.count += 1;
        (id, rx)
    }

    /// Removes waiter `id`, and the key's entry with its last waiter. A no-op when a
    /// publish already took it.
    fn unregister(&self, key: &CallerKey, id: u64) {
        let mut waiters = self.lock();
        let Some(list) = waiters.by_key.get_mut(key) else {
            return;
        };
        let before = list.len();
        list.retain(|waiter| waiter.id != id);
        let removed = before - list.len();
        if list.is_empty() {
            waiters.by_key.remove(key);
        }
        waiters.count = waiters.count.saturating_sub(removed);
    }

    fn has_waiters(&self, key: &CallerKey) -> bool {
        self.lock().by_key.contains_key(key)
    }

    /// Every key with at least one waiter.
    fn keys(&self) -> Vec<CallerKey> {
        self.lock().by_key.keys().cloned().collect()
    }

    /// Hands `ctx` to every waiter for `key` and forgets them; how many received it.
    /// Sends under the lock, so a watch that unregisters (drop, close) either got the
    /// context or was never sent one.
    fn release(&self, key: &CallerKey, ctx: &Context) -> usize {
        let mut waiters = self.lock();
        let Some(list) = waiters.by_key.remove(key) else {
            return 0;
        };
        waiters.count = waiters.count.saturating_sub(list.len());
        list.into_iter()
            .map(|waiter| waiter.tx.send(Arc::clone(ctx)))
            .filter(Result::is_ok)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;
    use futures_util::FutureExt;
    use serde_json::{Map, Value};
    use tokio::sync::Notify;

    const TTL: Duration = Duration::from_secs(300);

    fn key(number: &str) -> CallerKey {
        CallerKey {
            agent: "support-agent".to_string(),
            number: E164(number.to_string()),
        }
    }

    fn ctx(name: &str) -> Context {
        let mut map = Map::new();
        map.insert("customer_name".to_string(), Value::String(name.to_string()));
        Arc::new(map)
    }

    fn contexts(consume: bool) -> (Arc<MemoryStore>, Contexts) {
        let store = Arc::new(MemoryStore::new());
        let contexts = Contexts::new(store.clone(), consume, TTL);
        (store, contexts)
    }

    fn pending(claim: Claim) -> Watch {
        match claim {
            Claim::Pending(watch) => watch,
            Claim::Hit(ctx) => panic!("expected a pending claim, got a hit with {ctx:?}"),
        }
    }

    fn hit(claim: Claim) -> Context {
        match claim {
            Claim::Hit(ctx) => ctx,
            Claim::Pending(watch) => panic!("expected a hit, got {watch:?}"),
        }
    }

    /// Entries in the registry (keys), to prove nothing leaks.
    fn registry_keys(contexts: &Contexts) -> usize {
        contexts.shared.registry.lock().by_key.len()
    }

    #[tokio::test]
    async fn publish_before_claim_is_a_hit_and_consume_takes_it() {
        let (store, contexts) = contexts(true);
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 0,
                stored: true
            }
        );
        assert_eq!(hit(contexts.claim(&key("+1")).await.unwrap()), ctx("Ada"));
        assert_eq!(store.len().await.unwrap(), 0, "consumed by the call");
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        assert_eq!(contexts.waiting(), 1);
        drop(watch);
    }

    #[tokio::test]
    async fn without_consume_a_hit_leaves_the_context_for_the_next_call() {
        let (store, contexts) = contexts(false);
        contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(hit(contexts.claim(&key("+1")).await.unwrap()), ctx("Ada"));
        assert_eq!(hit(contexts.claim(&key("+1")).await.unwrap()), ctx("Ada"));
        assert_eq!(store.len().await.unwrap(), 1);
        assert_eq!(contexts.waiting(), 0, "a hit leaves no watch behind");
        assert_eq!(registry_keys(&contexts), 0);
    }

    #[tokio::test]
    async fn a_pending_claim_resolves_when_the_webhook_lands() {
        let (store, contexts) = contexts(true);
        let mut watch = pending(contexts.claim(&key("+1")).await.unwrap());
        assert!(
            (&mut watch).now_or_never().is_none(),
            "nothing published yet"
        );
        assert_eq!(contexts.waiting(), 1);
        // A webhook for another caller releases nothing.
        let other = contexts.publish(&key("+2"), ctx("Bob")).await.unwrap();
        assert_eq!(
            other,
            Published {
                released: 0,
                stored: true
            }
        );
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 1,
                stored: false
            }
        );
        assert_eq!(watch.await, ctx("Ada"));
        assert_eq!(contexts.waiting(), 0);
        assert_eq!(registry_keys(&contexts), 0);
        assert_eq!(
            store.get(&key("+1")).await.unwrap(),
            None,
            "the held call consumed it"
        );
    }

    #[tokio::test]
    async fn without_consume_a_released_context_is_also_stored() {
        let (store, contexts) = contexts(false);
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 1,
                stored: true
            }
        );
        assert_eq!(watch.await, ctx("Ada"));
        assert_eq!(store.get(&key("+1")).await.unwrap(), Some(ctx("Ada")));
    }

    #[tokio::test]
    async fn one_publish_releases_every_call_held_for_the_key() {
        let (_store, contexts) = contexts(true);
        let watches: Vec<Watch> = vec![
            pending(contexts.claim(&key("+1")).await.unwrap()),
            pending(contexts.claim(&key("+1")).await.unwrap()),
            pending(contexts.claim(&key("+1")).await.unwrap()),
        ];
        let elsewhere = pending(contexts.claim(&key("+2")).await.unwrap());
        assert_eq!(contexts.waiting(), 4);
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 3,
                stored: false
            }
        );
        for watch in watches {
            assert_eq!(watch.now_or_never(), Some(ctx("Ada")));
        }
        assert_eq!(contexts.waiting(), 1, "the call for +2 still waits");
        drop(elsewhere);
        assert_eq!(contexts.waiting(), 0);
        assert_eq!(registry_keys(&contexts), 0);
    }

    #[tokio::test]
    async fn dropping_a_watch_unregisters_it() {
        let (store, contexts) = contexts(true);
        let first = pending(contexts.claim(&key("+1")).await.unwrap());
        let second = pending(contexts.claim(&key("+1")).await.unwrap());
        drop(first);
        assert_eq!(contexts.waiting(), 1);
        assert_eq!(registry_keys(&contexts), 1);
        drop(second);
        assert_eq!(contexts.waiting(), 0);
        assert_eq!(
            registry_keys(&contexts),
            0,
            "the key goes with its last waiter"
        );
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 0,
                stored: true
            }
        );
        assert_eq!(store.len().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn close_hands_back_a_context_that_was_already_delivered() {
        let (store, contexts) = contexts(true);
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        assert_eq!(watch.close(), None);
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(watch.close(), Some(ctx("Ada")));
        tokio::task::yield_now().await;
        assert_eq!(
            store.len().await.unwrap(),
            0,
            "close leaves restoring to the caller"
        );
    }

    #[tokio::test]
    async fn a_dropped_watch_puts_back_a_context_it_never_saw() {
        let (store, contexts) = contexts(true);
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 1,
                stored: false
            }
        );
        drop(watch); // e.g. the call fell back in the same instant
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(store.get(&key("+1")).await.unwrap(), Some(ctx("Ada")));
    }

    #[tokio::test]
    async fn restore_releases_a_waiting_call_or_stores_without_overwriting() {
        let (store, contexts) = contexts(true);
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        contexts.restore(&key("+1"), ctx("late")).await.unwrap();
        assert_eq!(watch.now_or_never(), Some(ctx("late")));
        assert_eq!(store.len().await.unwrap(), 0);

        contexts.restore(&key("+1"), ctx("late")).await.unwrap();
        assert_eq!(store.get(&key("+1")).await.unwrap(), Some(ctx("late")));

        contexts.publish(&key("+2"), ctx("newer")).await.unwrap();
        contexts.restore(&key("+2"), ctx("older")).await.unwrap();
        assert_eq!(store.get(&key("+2")).await.unwrap(), Some(ctx("newer")));
    }

    #[tokio::test]
    async fn contexts_expire_after_the_ttl() {
        let store = Arc::new(MemoryStore::new());
        let contexts = Contexts::new(store, true, Duration::from_millis(30));
        contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let watch = pending(contexts.claim(&key("+1")).await.unwrap());
        drop(watch);
    }

    /// A store whose reads stop at a gate, so a test can publish between `claim`'s
    /// registration and its store read: the race the design must survive.
    struct GatedStore {
        inner: MemoryStore,
        entered: Notify,
        gate: Notify,
    }

    #[async_trait::async_trait]
    impl ContextStore for GatedStore {
        async fn put(
            &self,
            key: &CallerKey,
            ctx: Context,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.put(key, ctx, ttl).await
        }
        async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
            self.entered.notify_one();
            self.gate.notified().await;
            self.inner.get(key).await
        }
        async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
            self.entered.notify_one();
            self.gate.notified().await;
            self.inner.take(key).await
        }
        async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError> {
            self.inner.delete(key).await
        }
        async fn len(&self) -> Result<usize, StoreError> {
            self.inner.len().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// Starts a claim and stops it inside its store read.
    async fn claim_paused_in_store_read(
        consume: bool,
        cached: Option<Context>,
    ) -> (
        Arc<GatedStore>,
        Arc<Contexts>,
        tokio::task::JoinHandle<Claim>,
    ) {
        let store = Arc::new(GatedStore {
            inner: MemoryStore::new(),
            entered: Notify::new(),
            gate: Notify::new(),
        });
        if let Some(cached) = cached {
            store.inner.put(&key("+1"), cached, TTL).await.unwrap();
        }
        let contexts = Arc::new(Contexts::new(store.clone(), consume, TTL));
        let claiming = {
            let contexts = contexts.clone();
            tokio::spawn(async move { contexts.claim(&key("+1")).await.unwrap() })
        };
        store.entered.notified().await;
        (store, contexts, claiming)
    }

    #[tokio::test]
    async fn a_publish_between_registration_and_the_store_read_is_not_lost() {
        let (store, contexts, claiming) = claim_paused_in_store_read(true, None).await;
        assert_eq!(contexts.waiting(), 1, "registered before reading the store");
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 1,
                stored: false
            }
        );
        store.gate.notify_one();
        let watch = pending(claiming.await.unwrap());
        assert_eq!(
            watch.now_or_never(),
            Some(ctx("Ada")),
            "the watch already holds it"
        );
        assert_eq!(store.inner.len_at(std::time::Instant::now()), 0);
    }

    #[tokio::test]
    async fn without_consume_the_racing_publish_is_read_back_as_a_hit() {
        let (store, contexts, claiming) = claim_paused_in_store_read(false, None).await;
        let published = contexts.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 1,
                stored: true
            }
        );
        store.gate.notify_one();
        assert_eq!(hit(claiming.await.unwrap()), ctx("Ada"));
        assert_eq!(contexts.waiting(), 0);
        assert_eq!(registry_keys(&contexts), 0);
    }

    #[tokio::test]
    async fn a_hit_prefers_the_context_that_landed_during_the_read() {
        let (store, contexts, claiming) = claim_paused_in_store_read(true, Some(ctx("old"))).await;
        let published = contexts.publish(&key("+1"), ctx("new")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 1,
                stored: false
            }
        );
        store.gate.notify_one();
        assert_eq!(hit(claiming.await.unwrap()), ctx("new"));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            store.inner.len_at(std::time::Instant::now()),
            0,
            "nothing left over"
        );
    }

    /// A store whose writes stop at a gate, so a test can start a claim between
    /// `publish`'s release and its write.
    struct PutGatedStore {
        inner: MemoryStore,
        entered: Notify,
        gate: Notify,
    }

    #[async_trait::async_trait]
    impl ContextStore for PutGatedStore {
        async fn put(
            &self,
            key: &CallerKey,
            ctx: Context,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.entered.notify_one();
            self.gate.notified().await;
            self.inner.put(key, ctx, ttl).await
        }
        async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
            self.inner.get(key).await
        }
        async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
            self.inner.take(key).await
        }
        async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError> {
            self.inner.delete(key).await
        }
        async fn len(&self) -> Result<usize, StoreError> {
            self.inner.len().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_claim_between_the_release_and_the_write_is_released_after_the_write() {
        for consume in [true, false] {
            let store = Arc::new(PutGatedStore {
                inner: MemoryStore::new(),
                entered: Notify::new(),
                gate: Notify::new(),
            });
            let contexts = Arc::new(Contexts::new(store.clone(), consume, TTL));
            let publishing = {
                let contexts = contexts.clone();
                tokio::spawn(async move { contexts.publish(&key("+1"), ctx("Ada")).await })
            };
            // publish found nobody to release and is now writing.
            store.entered.notified().await;
            let watch = pending(contexts.claim(&key("+1")).await.unwrap());
            store.gate.notify_one();
            let published = publishing.await.unwrap().unwrap();
            assert_eq!(
                published,
                Published {
                    released: 1,
                    stored: !consume
                },
                "consume = {consume}"
            );
            assert_eq!(watch.now_or_never(), Some(ctx("Ada")));
            let left = store.inner.len_at(std::time::Instant::now());
            assert_eq!(left, usize::from(!consume), "consume = {consume}");
        }
    }

    /// Several nodes in one test: each its own [`Contexts`] over one shared memory store,
    /// with `announce`/`subscribe` over a broadcast bus. A model of the Redis store.
    struct BusStore {
        inner: Arc<MemoryStore>,
        bus: tokio::sync::broadcast::Sender<StoreEvent>,
    }

    #[async_trait::async_trait]
    impl ContextStore for BusStore {
        async fn put(
            &self,
            key: &CallerKey,
            ctx: Context,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.put(key, ctx, ttl).await
        }
        async fn put_if_absent(
            &self,
            key: &CallerKey,
            ctx: Context,
            ttl: Duration,
        ) -> Result<bool, StoreError> {
            self.inner.put_if_absent(key, ctx, ttl).await
        }
        async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
            self.inner.get(key).await
        }
        async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
            self.inner.take(key).await
        }
        async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError> {
            self.inner.delete(key).await
        }
        async fn len(&self) -> Result<usize, StoreError> {
            self.inner.len().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn announce(&self, key: &CallerKey) -> Result<(), StoreError> {
            let _ = self.bus.send(StoreEvent::Published(key.clone()));
            Ok(())
        }
        fn subscribe(&self) -> Option<mpsc::Receiver<StoreEvent>> {
            let mut heard = self.bus.subscribe();
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                while let Ok(event) = heard.recv().await {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
            });
            Some(rx)
        }
    }

    struct Cluster {
        shared: Arc<MemoryStore>,
        bus: tokio::sync::broadcast::Sender<StoreEvent>,
        nodes: Vec<Contexts>,
        shutdown: CancellationToken,
    }

    fn cluster(nodes: usize, consume: bool) -> Cluster {
        let shared = Arc::new(MemoryStore::new());
        let (bus, _) = tokio::sync::broadcast::channel(64);
        let shutdown = CancellationToken::new();
        let nodes = (0..nodes)
            .map(|_| {
                let store = Arc::new(BusStore {
                    inner: shared.clone(),
                    bus: bus.clone(),
                });
                let contexts = Contexts::new(store, consume, TTL);
                contexts.spawn_subscriber(shutdown.clone()).unwrap();
                contexts
            })
            .collect();
        Cluster {
            shared,
            bus,
            nodes,
            shutdown,
        }
    }

    const SOON: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_call_held_on_one_node_is_released_by_a_webhook_on_another() {
        let cluster = cluster(2, true);
        let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
        let watch = pending(b.claim(&key("+1")).await.unwrap());
        let published = a.publish(&key("+1"), ctx("Ada")).await.unwrap();
        assert_eq!(
            published,
            Published {
                released: 0,
                stored: true
            },
            "A holds no call: it stores and announces"
        );
        let got = tokio::time::timeout(SOON, watch)
            .await
            .expect("B's call released");
        assert_eq!(got, ctx("Ada"));
        assert_eq!(
            cluster.shared.len().await.unwrap(),
            0,
            "B's call consumed it"
        );
        assert_eq!(b.waiting(), 0);
        cluster.shutdown.cancel();
    }

    #[tokio::test]
    async fn without_consume_every_node_holding_calls_gets_it_and_it_stays() {
        let cluster = cluster(3, false);
        let mut watches = Vec::new();
        for node in &cluster.nodes[1..] {
            watches.push(pending(node.claim(&key("+1")).await.unwrap()));
        }
        cluster.nodes[0]
            .publish(&key("+1"), ctx("Ada"))
            .await
            .unwrap();
        for watch in watches {
            assert_eq!(tokio::time::timeout(SOON, watch).await.unwrap(), ctx("Ada"));
        }
        assert_eq!(cluster.shared.len().await.unwrap(), 1);
        cluster.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_consumed_context_announced_to_two_nodes_goes_to_exactly_one() {
        for _ in 0..20 {
            let cluster = cluster(3, true);
            let mut watches = Vec::new();
            for node in &cluster.nodes[1..] {
                watches.push(pending(node.claim(&key("+1")).await.unwrap()));
            }
            cluster.nodes[0]
                .publish(&key("+1"), ctx("Ada"))
                .await
                .unwrap();
            let deadline = tokio::time::Instant::now() + SOON;
            let mut got = Vec::new();
            while got.is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "nobody got it");
                tokio::time::sleep(Duration::from_millis(1)).await;
                got = watches
                    .iter_mut()
                    .filter_map(|watch| watch.now_or_never())
                    .collect();
            }
            assert_eq!(got, [ctx("Ada")]);
            // The loser's node found nothing left: nothing comes, nothing is put back.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let late: Vec<Context> = watches
                .iter_mut()
                .filter_map(|watch| watch.now_or_never())
                .collect();
            assert!(late.is_empty(), "{late:?}");
            assert_eq!(cluster.shared.len().await.unwrap(), 0);
            let still_waiting: usize = cluster.nodes.iter().map(Contexts::waiting).sum();
            assert_eq!(
                still_waiting, 1,
                "the other call still waits (for its fallback)"
            );
            cluster.shutdown.cancel();
        }
    }

    #[tokio::test]
    async fn after_a_resync_held_calls_read_the_store_again() {
        let cluster = cluster(2, true);
        let b = &cluster.nodes[1];
        let watch = pending(b.claim(&key("+1")).await.unwrap());
        // Written while B's feed was down: no announcement reached B.
        cluster
            .shared
            .put(&key("+1"), ctx("Ada"), TTL)
            .await
            .unwrap();
        let _ = cluster.bus.send(StoreEvent::Resynced);
        assert_eq!(tokio::time::timeout(SOON, watch).await.unwrap(), ctx("Ada"));
        cluster.shutdown.cancel();
    }

    #[tokio::test]
    async fn an_announcement_for_a_key_nobody_holds_touches_nothing() {
        let cluster = cluster(2, true);
        cluster.nodes[0]
            .publish(&key("+1"), ctx("Ada"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            cluster.shared.len().await.unwrap(),
            1,
            "left for the call that comes later"
        );
        assert_eq!(
            hit(cluster.nodes[1].claim(&key("+1")).await.unwrap()),
            ctx("Ada")
        );
        cluster.shutdown.cancel();
    }

    #[tokio::test]
    async fn the_memory_store_has_no_feed() {
        let (_, contexts) = contexts(true);
        assert!(contexts
            .spawn_subscriber(CancellationToken::new())
            .is_none());
    }

    /// A store that is down.
    struct DownStore;

    #[async_trait::async_trait]
    impl ContextStore for DownStore {
        async fn put(&self, _: &CallerKey, _: Context, _: Duration) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".to_string()))
        }
        async fn get(&self, _: &CallerKey) -> Result<Option<Context>, StoreError> {
            Err(StoreError::Unavailable("down".to_string()))
        }
        async fn take(&self, _: &CallerKey) -> Result<Option<Context>, StoreError> {
            Err(StoreError::Unavailable("down".to_string()))
        }
        async fn delete(&self, _: &CallerKey) -> Result<bool, StoreError> {
            Err(StoreError::Unavailable("down".to_string()))
        }
        async fn len(&self) -> Result<usize, StoreError> {
            Err(StoreError::Unavailable("down".to_string()))
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".to_string()))
        }
    }

    #[tokio::test]
    async fn store_errors_surface_and_leave_no_watch_behind() {
        let contexts = Contexts::new(Arc::new(DownStore), true, TTL);
        assert!(contexts.claim(&key("+1")).await.is_err());
        assert_eq!(contexts.waiting(), 0);
        assert_eq!(registry_keys(&contexts), 0);
        assert!(contexts.publish(&key("+1"), ctx("Ada")).await.is_err());
    }
}
