//! Wires config, store, SIP and HTTP together for `precall run`.
