//! Caller context storage: the [`ContextStore`] trait (async, so a Redis backend can
//! follow), the embedded in-memory backend, and [`Contexts`], which adds the wait registry
//! that wakes held calls the instant their context lands.
//!
//! SKELETON: signatures are the contract; bodies to be implemented.

pub mod memory;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

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
}

/// A context cache with TTL. Implementations must be cheap to call from the SIP path.
#[async_trait::async_trait]
pub trait ContextStore: Send + Sync + 'static {
    /// Stores (replaces) the context for `key`, expiring after `ttl`.
    async fn put(&self, key: &CallerKey, ctx: Context, ttl: Duration) -> Result<(), StoreError>;
    /// The unexpired context for `key`, leaving it in place.
    async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError>;
    /// Atomically removes and returns the unexpired context for `key` (consume-once).
    async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError>;
    /// Removes the context; `true` when there was one.
    async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError>;
    /// Number of unexpired contexts held (for gauges and tests).
    async fn len(&self) -> Result<usize, StoreError>;
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What [`Contexts::claim`] found for an INVITE.
pub enum Claim {
    /// Cached already.
    Hit(Context),
    /// Not cached: await the [`Watch`]; it resolves the instant a webhook for the key lands.
    Pending(Watch),
}

/// A registered interest in one key. Dropping it unregisters.
pub struct Watch {
    _private: (),
}

impl Future for Watch {
    type Output = Context;
    fn poll(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Context> {
        todo!()
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
pub struct Contexts {
    pub store: Arc<dyn ContextStore>,
    pub consume: bool,
    pub ttl: Duration,
}

impl Contexts {
    pub fn new(_store: Arc<dyn ContextStore>, _consume: bool, _ttl: Duration) -> Contexts {
        todo!()
    }

    /// A webhook landed: release every call held for `key` at once (they all get `ctx`);
    /// store it unless `consume` is on and a held call used it.
    ///
    /// # Errors
    /// The store failed; nothing was stored (held calls may still have been released).
    pub async fn publish(&self, _key: &CallerKey, _ctx: Context) -> Result<Published, StoreError> {
        todo!()
    }

    /// An INVITE arrived: the cached context (taken when `consume`), or a watch to await.
    ///
    /// # Errors
    /// The store failed.
    pub async fn claim(&self, _key: &CallerKey) -> Result<Claim, StoreError> {
        todo!()
    }

    /// Puts back a context that was delivered to a call which had already fallen back,
    /// so it is not lost.
    ///
    /// # Errors
    /// The store failed.
    pub async fn restore(&self, _key: &CallerKey, _ctx: Context) -> Result<(), StoreError> {
        todo!()
    }

    /// Number of calls currently waiting (all keys).
    pub fn waiting(&self) -> usize {
        todo!()
    }
}
