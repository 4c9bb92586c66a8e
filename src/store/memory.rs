//! The embedded in-memory backend: a DashMap with per-entry expiry and a sweeper, so
//! expired contexts never pile up.
//!
//! SKELETON: to be implemented.
