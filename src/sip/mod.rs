//! SIP: wire parsing and editing, transactions, the proxy core, and the IO shell.

pub mod message;
pub mod parse;
pub mod proxy;
pub mod transaction;
pub mod transport;
pub mod uri;
