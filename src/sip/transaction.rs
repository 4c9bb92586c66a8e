//! RFC 3261 §17 transaction keys and timers (pure).
