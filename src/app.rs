//! Wires config, store, SIP and HTTP together for `precall run`: binds every socket first
//! (so a port clash fails before anything runs), then serves until the token is cancelled.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent::Agents;
use crate::config::{Config, StoreBackend};
use crate::sip::proxy::{Listener, Proxy};
use crate::sip::transport;
use crate::store::memory::MemoryStore;
use crate::store::{ContextStore, Contexts};
use crate::webhook::{self, AppState};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: io::Error,
    },
}

/// Runs the sidecar until `shutdown` is cancelled.
///
/// # Errors
/// A socket could not be bound.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let config = Arc::new(config);
    let agents = Arc::new(Agents::new(Arc::clone(&config)));

    let store: Arc<dyn ContextStore> = match config.store.backend {
        StoreBackend::Memory => {
            let memory = Arc::new(MemoryStore::with_max_entries(config.store.max_contexts));
            memory.spawn_sweeper(Duration::from_secs(1), shutdown.child_token());
            memory
        }
    };
    let contexts = Arc::new(Contexts::new(store, config.store.consume, config.store.ttl));

    let sockets = transport::bind(&config.sip.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "SIP",
            addr: format!("{:?}", config.sip.listen),
            source,
        })?;
    let first_upstream = config
        .agents
        .first()
        .and_then(|a| a.upstreams.first())
        .map(|u| u.addr);
    let listeners: Vec<Listener> = config
        .sip
        .listen
        .iter()
        .zip(&sockets)
        .map(|(l, (_, bound))| Listener {
            transport: l.transport,
            addr: transport::advertised(*bound, first_upstream),
        })
        .collect();

    let http = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "HTTP",
            addr: config.http.listen.to_string(),
            source,
        })?;
    let http_addr: SocketAddr = http.local_addr().map_err(|source| StartError::Bind {
        what: "HTTP",
        addr: config.http.listen.to_string(),
        source,
    })?;
    info!("listening for HTTP on {http_addr}");

    let sip_ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        agents: Arc::clone(&agents),
        contexts: Arc::clone(&contexts),
        sip_ready: Arc::clone(&sip_ready),
        limiter: Arc::new(webhook::ratelimit::KeyLimiter::new(config.http.rate_limit)),
    };
    let http_shutdown = shutdown.child_token();
    let http_task = tokio::spawn(async move {
        let served = axum::serve(http, webhook::router(state))
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed");
        }
    });

    let seed = random_seed();
    let proxy = Proxy::new(Arc::clone(&agents), listeners.clone(), seed);
    sip_ready.store(true, Ordering::Release);
    info!(agents = config.agents.len(), "precall ready");
    transport::run_with(
        proxy,
        sockets,
        listeners,
        contexts,
        config.sip.max_message_bytes,
        transport::HttpClient::new(256),
        shutdown.clone(),
        transport::ShellOptions::from_limits(&config.sip.limits),
    )
    .await;
    let _ = http_task.await;
    info!("precall stopped");
    Ok(())
}

/// A per-process random value for branches and tags, from the std hasher's random keys
/// (no extra dependency for one number).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}
