//! The embedded in-memory backend: a DashMap with per-entry expiry and a sweeper, so
//! expired contexts never pile up.
//!
//! Expiry is decided by the `*_at(now)` methods, which take the time as an argument: the
//! [`ContextStore`] impl passes `Instant::now()`, and tests pass instants of their own, so
//! TTL behaviour is tested without sleeping. An expired entry is invisible to every read
//! the moment its deadline passes; the sweeper only reclaims the memory.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::{CallerKey, Context, ContextStore, StoreError};

/// One cached context and when it stops being visible.
#[derive(Debug, Clone)]
struct Entry {
    ctx: Context,
    /// `None` when `now + ttl` does not fit in an `Instant` (a TTL of centuries): never expires.
    expires_at: Option<Instant>,
}

impl Entry {
    fn new(ctx: Context, now: Instant, ttl: Duration) -> Entry {
        Entry {
            ctx,
            expires_at: now.checked_add(ttl),
        }
    }

    /// Live up to, not including, its deadline: a zero TTL is never visible.
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// The in-memory [`ContextStore`]: one process, no persistence.
///
/// Optionally bounded (`store.max_contexts`): when full, a context for a key not held yet
/// is refused with [`StoreError::Full`] (the webhook answers `503`), after one sweep of
/// expired entries. Refusing rather than evicting is deliberate: a context dropped to make
/// room would silently turn some caller's call into a fallback, while a refused webhook
/// tells its sender, who can retry. Keys already held can always be replaced.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: DashMap<CallerKey, Entry>,
    /// `None`: unbounded.
    max_entries: Option<usize>,
    /// When a full store last swept for room: at most one such sweep per
    /// [`FULL_SWEEP_EVERY`], so a flood of new keys against a full store costs no more
    /// than a refusal each.
    last_full_sweep: Mutex<Option<Instant>>,
}

/// See [`MemoryStore::last_full_sweep`].
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A store holding at most `max` contexts (see the type's docs for the policy).
    pub fn with_max_entries(max: usize) -> MemoryStore {
        MemoryStore {
            max_entries: Some(max),
            ..MemoryStore::default()
        }
    }

    /// Whether a new key may be added at `now`: below the bound, or below it again after
    /// sweeping expired entries (at most once per [`FULL_SWEEP_EVERY`]).
    fn has_room_for(&self, key: &CallerKey, now: Instant) -> Result<(), StoreError> {
        let Some(max) = self.max_entries else {
            return Ok(());
        };
        if self.entries.len() < max || self.entries.contains_key(key) {
            return Ok(());
        }
        let sweep_due = {
            let mut last = self
                .last_full_sweep
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last.is_none_or(|at| now.saturating_duration_since(at) >= FULL_SWEEP_EVERY);
            if due {
                *last = Some(now);
            }
            due
        };
        if sweep_due {
            self.sweep(now);
        }
        if self.entries.len() < max {
            Ok(())
        } else {
            Err(StoreError::Full { max })
        }
    }

    /// [`MemoryStore::put_at`] within the bound.
    ///
    /// # Errors
    /// [`StoreError::Full`] when the store is full and `key` is not in it.
    pub fn try_put_at(
        &self,
        key: &CallerKey,
        ctx: Context,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.has_room_for(key, now)?;
        self.put_at(key, ctx, ttl, now);
        Ok(())
    }

    /// Stores (replaces) `ctx` for `key`, visible until `now + ttl`.
    pub fn put_at(&self, key: &CallerKey, ctx: Context, ttl: Duration, now: Instant) {
        self.entries.insert(key.clone(), Entry::new(ctx, now, ttl));
    }

    /// Stores `ctx` unless a live context is already there; `true` when stored.
    /// Atomic: the shard lock is held from the check to the insert.
    pub fn put_if_absent_at(
        &self,
        key: &CallerKey,
        ctx: Context,
        ttl: Duration,
        now: Instant,
    ) -> bool {
        match self.entries.entry(key.clone()) {
            MapEntry::Occupied(existing) if existing.get().is_live(now) => false,
            MapEntry::Occupied(mut expired) => {
                expired.insert(Entry::new(ctx, now, ttl));
                true
            }
            MapEntry::Vacant(slot) => {
                slot.insert(Entry::new(ctx, now, ttl));
                true
            }
        }
    }

    /// The context for `key` if it is live at `now`.
    pub fn get_at(&self, key: &CallerKey, now: Instant) -> Option<Context> {
        self.entries
            .get(key)
            .filter(|entry| entry.is_live(now))
            .map(|entry| entry.ctx.clone())
    }

    /// Removes and returns the context for `key` if it is live at `now`. Atomic: two
    /// concurrent takes never both get it (`remove_if` checks and removes under one lock).
    pub fn take_at(&self, key: &CallerKey, now: Instant) -> Option<Context> {
        match self.entries.remove_if(key, |_, entry| entry.is_live(now)) {
            Some((_, entry)) => Some(entry.ctx),
            None => {
                // Either absent or expired; drop an expired one now rather than at the next sweep.
                self.entries.remove_if(key, |_, entry| !entry.is_live(now));
                None
            }
        }
    }

    /// Removes the entry for `key`; `true` when a live one was there.
    pub fn delete_at(&self, key: &CallerKey, now: Instant) -> bool {
        self.entries
            .remove(key)
            .is_some_and(|(_, entry)| entry.is_live(now))
    }

    /// Number of entries live at `now`.
    pub fn len_at(&self, now: Instant) -> usize {
        self.entries
            .iter()
            .filter(|entry| entry.is_live(now))
            .count()
    }

    /// Drops every entry expired at `now`; returns how many were dropped.
    pub fn sweep(&self, now: Instant) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, entry| entry.is_live(now));
        before.saturating_sub(self.entries.len())
    }

    /// Entries held, live or expired-but-not-yet-swept (what the memory actually costs).
    pub fn raw_len(&self) -> usize {
        self.entries.len()
    }

    /// Runs [`MemoryStore::sweep`] every `every` until `shutdown` is cancelled, so a flood
    /// of contexts that no call ever claims costs memory for at most `ttl + every`.
    ///
    /// # Panics
    /// Outside a tokio runtime (as `tokio::spawn` does), or if `every` is zero.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            // A stalled runtime should not cause a burst of back-to-back sweeps.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = ticks.tick() => {
                        let swept = store.sweep(tokio::time::Instant::now().into_std());
                        if swept > 0 {
                            tracing::debug!(swept, "expired contexts swept");
                        }
                    }
                }
            }
        })
    }
}

#[async_trait::async_trait]
impl ContextStore for MemoryStore {
    async fn put(&self, key: &CallerKey, ctx: Context, ttl: Duration) -> Result<(), StoreError> {
        self.try_put_at(key, ctx, ttl, Instant::now())
    }

    async fn put_if_absent(
        &self,
        key: &CallerKey,
        ctx: Context,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        self.has_room_for(key, now)?;
        Ok(self.put_if_absent_at(key, ctx, ttl, now))
    }

    async fn get(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
        Ok(self.get_at(key, Instant::now()))
    }

    async fn take(&self, key: &CallerKey) -> Result<Option<Context>, StoreError> {
        Ok(self.take_at(key, Instant::now()))
    }

    async fn delete(&self, key: &CallerKey) -> Result<bool, StoreError> {
        Ok(self.delete_at(key, Instant::now()))
    }

    async fn len(&self) -> Result<usize, StoreError> {
        Ok(self.len_at(Instant::now()))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn len_now(&self) -> Option<usize> {
        Some(self.len_at(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::number::E164;
    use serde_json::{Map, Value};

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

    const TTL: Duration = Duration::from_secs(300);

    #[test]
    fn get_leaves_and_take_removes() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+14155550123"), ctx("Ada"), TTL, t0);
        assert_eq!(store.get_at(&key("+14155550123"), t0), Some(ctx("Ada")));
        assert_eq!(store.len_at(t0), 1);
        assert_eq!(store.take_at(&key("+14155550123"), t0), Some(ctx("Ada")));
        assert_eq!(store.take_at(&key("+14155550123"), t0), None);
        assert_eq!(store.get_at(&key("+14155550123"), t0), None);
        assert_eq!(store.len_at(t0), 0);
    }

    #[test]
    fn keys_are_agent_and_number() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+14155550123"), ctx("Ada"), TTL, t0);
        let other_agent = CallerKey {
            agent: "sales-agent".to_string(),
            number: E164("+14155550123".to_string()),
        };
        assert_eq!(store.get_at(&other_agent, t0), None);
        assert_eq!(store.get_at(&key("+14155550124"), t0), None);
    }

    #[test]
    fn put_replaces_and_restarts_the_ttl() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+1"), ctx("Ada"), TTL, t0);
        store.put_at(&key("+1"), ctx("Grace"), TTL, t0 + Duration::from_secs(200));
        let later = t0 + Duration::from_secs(400);
        assert_eq!(store.get_at(&key("+1"), later), Some(ctx("Grace")));
    }

    #[test]
    fn expired_entries_are_invisible_to_every_read() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+1"), ctx("Ada"), TTL, t0);
        let just_before = t0 + TTL - Duration::from_millis(1);
        assert_eq!(store.get_at(&key("+1"), just_before), Some(ctx("Ada")));
        let at_deadline = t0 + TTL;
        assert_eq!(store.get_at(&key("+1"), at_deadline), None);
        assert_eq!(store.len_at(at_deadline), 0);
        assert_eq!(store.take_at(&key("+1"), at_deadline), None);
        // take dropped the expired entry on the spot.
        assert_eq!(store.raw_len(), 0);
    }

    #[test]
    fn delete_reports_only_live_entries() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+1"), ctx("Ada"), TTL, t0);
        store.put_at(&key("+2"), ctx("Bob"), TTL, t0);
        assert!(store.delete_at(&key("+1"), t0));
        assert!(!store.delete_at(&key("+1"), t0));
        assert!(!store.delete_at(&key("+2"), t0 + TTL));
        assert_eq!(store.raw_len(), 0);
    }

    #[test]
    fn sweep_drops_only_expired_entries() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+1"), ctx("old"), Duration::from_secs(10), t0);
        store.put_at(&key("+2"), ctx("new"), Duration::from_secs(100), t0);
        assert_eq!(store.sweep(t0 + Duration::from_secs(50)), 1);
        assert_eq!(store.raw_len(), 1);
        assert_eq!(
            store.get_at(&key("+2"), t0 + Duration::from_secs(50)),
            Some(ctx("new"))
        );
    }

    #[test]
    fn put_if_absent_keeps_a_live_entry_but_replaces_an_expired_one() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        assert!(store.put_if_absent_at(&key("+1"), ctx("first"), TTL, t0));
        assert!(!store.put_if_absent_at(&key("+1"), ctx("second"), TTL, t0));
        assert_eq!(store.get_at(&key("+1"), t0), Some(ctx("first")));
        let later = t0 + TTL;
        assert!(store.put_if_absent_at(&key("+1"), ctx("third"), TTL, later));
        assert_eq!(store.get_at(&key("+1"), later), Some(ctx("third")));
    }

    #[test]
    fn a_huge_ttl_never_expires_instead_of_overflowing() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+1"), ctx("Ada"), Duration::MAX, t0);
        assert_eq!(
            store.get_at(&key("+1"), t0 + Duration::from_secs(1 << 30)),
            Some(ctx("Ada"))
        );
    }

    #[test]
    fn a_zero_ttl_is_never_visible() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.put_at(&key("+1"), ctx("Ada"), Duration::ZERO, t0);
        assert_eq!(store.get_at(&key("+1"), t0), None);
    }

    #[test]
    fn concurrent_takes_hand_the_context_to_exactly_one() {
        for _ in 0..50 {
            let store = Arc::new(MemoryStore::new());
            let t0 = Instant::now();
            store.put_at(&key("+1"), ctx("Ada"), TTL, t0);
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let store = Arc::clone(&store);
                    std::thread::spawn(move || store.take_at(&key("+1"), t0).is_some())
                })
                .collect();
            let winners = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&won| won)
                .count();
            assert_eq!(winners, 1);
        }
    }

    #[test]
    fn a_full_store_refuses_new_keys_but_replaces_old_ones() {
        let store = MemoryStore::with_max_entries(2);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        store.try_put_at(&key("+1"), ctx("a"), ttl, t0).unwrap();
        store.try_put_at(&key("+2"), ctx("b"), ttl, t0).unwrap();
        assert!(matches!(
            store.try_put_at(&key("+3"), ctx("c"), ttl, t0),
            Err(StoreError::Full { max: 2 })
        ));
        assert_eq!(store.get_at(&key("+3"), t0), None, "nothing stored");
        // A key already held may be replaced.
        store.try_put_at(&key("+1"), ctx("a2"), ttl, t0).unwrap();
        assert_eq!(store.get_at(&key("+1"), t0), Some(ctx("a2")));
        // Taken contexts make room at once.
        assert!(store.take_at(&key("+2"), t0).is_some());
        store.try_put_at(&key("+3"), ctx("c"), ttl, t0).unwrap();
        // Expired ones are swept to make room (at most one sweep per second).
        let later = t0 + Duration::from_secs(11);
        store.try_put_at(&key("+4"), ctx("d"), ttl, later).unwrap();
        assert_eq!(store.raw_len(), 1, "both expired entries were swept");
    }

    #[tokio::test]
    async fn trait_methods_use_the_real_clock() {
        let store = MemoryStore::new();
        store.put(&key("+1"), ctx("Ada"), TTL).await.unwrap();
        assert_eq!(store.get(&key("+1")).await.unwrap(), Some(ctx("Ada")));
        assert_eq!(store.len().await.unwrap(), 1);
        assert!(!store
            .put_if_absent(&key("+1"), ctx("Bob"), TTL)
            .await
            .unwrap());
        assert_eq!(store.take(&key("+1")).await.unwrap(), Some(ctx("Ada")));
        assert!(!store.delete(&key("+1")).await.unwrap());
        store.ping().await.unwrap();
    }

    #[tokio::test]
    async fn the_sweeper_reclaims_expired_entries_and_stops_on_shutdown() {
        let store = Arc::new(MemoryStore::new());
        store
            .put(&key("+1"), ctx("Ada"), Duration::from_millis(20))
            .await
            .unwrap();
        store.put(&key("+2"), ctx("Bob"), TTL).await.unwrap();
        let shutdown = CancellationToken::new();
        let sweeper = store.spawn_sweeper(Duration::from_millis(10), shutdown.clone());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(
            store.raw_len(),
            1,
            "the expired entry was reclaimed, the live one kept"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), sweeper)
            .await
            .expect("sweeper stops on shutdown")
            .unwrap();
    }
}
