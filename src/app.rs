//! Wires config, store, SIP and HTTP together for `precall run`: binds every socket first
//! (so a port clash fails before anything runs), then serves until told to stop.
//!
//! Operating signals (see README "Operating"):
//! - **drain** (SIGTERM/SIGINT): new INVITEs get `503` + `Retry-After`; held calls finish
//!   (context or fallback), responses and in-dialog requests are still relayed, webhooks
//!   are still taken; the process exits 0 once no call waits for an outcome, or after
//!   `sip.drain_secs`. A second signal stops at once.
//! - **reload** (SIGHUP, `precall reload`): the config file is read again and validated;
//!   a bad one is refused (logged) and the running config stays. Agents, keys, numbers,
//!   waits, routes, upstreams and injection change atomically for new calls and webhooks;
//!   calls in flight keep the config they started with. Listen addresses and `[store]`
//!   need a restart (logged when they differ).
//!
//! Observability: the Prometheus recorder is installed first (before anything counts),
//! `/metrics` renders it, and the SIP core publishes held and finished calls to the
//! status page (`/ui/`) through a shared [`CallLog`]. TLS certificates (`sip.tls_*`,
//! `http.tls_*`) are read before any socket is bound, so a bad file stops the start.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::Request;
use axum::response::IntoResponse;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{error, info, warn};

use crate::agent::Agents;
use crate::config::{Config, StoreBackend, Transport};
use crate::metrics::CallLog;
use crate::sip::proxy::{Listener, Proxy};
use crate::sip::transport::{self, Control, Stop};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{ContextStore, Contexts, StoreError};
use crate::webhook::{self, AppState, Ops};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error("TLS for {what}: {source}")]
    Tls {
        what: &'static str,
        source: crate::tls::TlsError,
    },
    /// The store could not be set up (a Redis URL the client cannot use). Redis being
    /// down is not this: the node starts, falls back, and reports not ready.
    #[error("cannot set up the store: {0}")]
    Store(#[from] StoreError),
}

/// What the process's signals ask for.
pub struct Signals {
    /// First SIGTERM/SIGINT.
    pub drain: CancellationToken,
    /// Second SIGTERM/SIGINT.
    pub stop_now: CancellationToken,
    /// One message per SIGHUP.
    pub reload: mpsc::Receiver<()>,
}

/// Runs the sidecar until it has drained (or was stopped at once).
///
/// With the Redis store, nothing waits for Redis here: the node starts even while Redis is
/// down (calls fall back, webhooks answer 503, `/readyz` says not ready) and connects
/// when it can.
///
/// # Errors
/// A socket could not be bound, or the store could not be set up.
pub async fn run(config_path: PathBuf, config: Config, signals: Signals) -> Result<(), StartError> {
    let metrics = crate::metrics::install();
    let config = Arc::new(config);
    let agents = Arc::new(Agents::new(Arc::clone(&config)));
    let background = CancellationToken::new();
    let _background_guard = background.clone().drop_guard();
    if let Some(handle) = metrics.clone() {
        // Histograms and idle series are maintained here, not on the scrape path.
        let stop = background.child_token();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        });
    }

    let sip_tls = match (&config.sip.tls.cert, &config.sip.tls.key) {
        (Some(cert), Some(key))
            if config
                .sip
                .listen
                .iter()
                .any(|l| l.transport == Transport::Tls) =>
        {
            Some(
                crate::tls::server_config(cert, key, &[]).map_err(|source| StartError::Tls {
                    what: "SIP",
                    source,
                })?,
            )
        }
        _ => None,
    };
    let http_tls = match &config.http.tls {
        Some(tls) => Some(
            crate::tls::server_config(&tls.cert, &tls.key, &[b"http/1.1"]).map_err(|source| {
                StartError::Tls {
                    what: "HTTP",
                    source,
                }
            })?,
        ),
        None => None,
    };

    let store: Arc<dyn ContextStore> = match &config.store.backend {
        StoreBackend::Memory => {
            let memory = Arc::new(MemoryStore::with_max_entries(config.store.max_contexts));
            memory.spawn_sweeper(Duration::from_secs(1), background.child_token());
            memory
        }
        StoreBackend::Redis(redis) => {
            info!(key_prefix = %redis.key_prefix, target = ?redis.target, "using the redis store");
            Arc::new(RedisStore::new(redis)?)
        }
    };
    let contexts = Arc::new(Contexts::new(store, config.store.consume, config.store.ttl));
    // One subscription per process (none for the memory store).
    let _subscriber = contexts.spawn_subscriber(background.child_token());

    let sockets = transport::bind_with_tls(&config.sip.listen, sip_tls)
        .await
        .map_err(|source| StartError::Bind {
            what: "SIP",
            addr: config
                .sip
                .listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
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
    // Every socket is bound: the kernel queues SIP from here on, so readiness holds as
    // soon as anyone can ask for it.
    let sip_ready = Arc::new(AtomicBool::new(true));
    if http_tls.is_some() {
        info!("listening for HTTPS on {http_addr}");
    } else {
        info!("listening for HTTP on {http_addr}");
    }
    let call_log = Arc::new(CallLog::new());
    let ops = Ops {
        metrics,
        call_log: Arc::clone(&call_log),
    };

    // The webhook router is rebuilt on reload; requests go to whichever is current.
    // One limiter for the process: a reload keeps its buckets (and `rate_limit`).
    let limiter = Arc::new(webhook::ratelimit::KeyLimiter::new(config.http.rate_limit));
    let state = AppState {
        agents: Arc::clone(&agents),
        contexts: Arc::clone(&contexts),
        sip_ready: Arc::clone(&sip_ready),
        limiter: Arc::clone(&limiter),
        ops: ops.clone(),
    };
    let state_template = state.clone();
    let live = Arc::new(RwLock::new(webhook::router(state)));
    let served = Arc::clone(&live);
    let front = axum::Router::new().fallback(move |request: Request| {
        let router = served.read().ok().map(|r| r.clone());
        async move {
            match router {
                Some(router) => router.oneshot(request).await.into_response(),
                None => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
    });
    let http_stop = CancellationToken::new();
    let http_shutdown = http_stop.clone();
    let http_task = match http_tls {
        None => tokio::spawn(async move {
            let served = axum::serve(http, front)
                .with_graceful_shutdown(http_shutdown.cancelled_owned())
                .await;
            if let Err(error) = served {
                error!(%error, "HTTP server failed");
            }
        }),
        Some(tls) => {
            let https = crate::tls::HttpsListener::new(http, tls, http_shutdown.child_token())
                .map_err(|source| StartError::Bind {
                    what: "HTTPS",
                    addr: config.http.listen.to_string(),
                    source,
                })?;
            tokio::spawn(async move {
                let served = axum::serve(https, front)
                    .with_graceful_shutdown(http_shutdown.cancelled_owned())
                    .await;
                if let Err(error) = served {
                    error!(%error, "HTTPS server failed");
                }
            })
        }
    };

    {
        // Draining: no new calls, so not ready (load balancers take the node out).
        let drain = signals.drain.clone();
        let ready = Arc::clone(&sip_ready);
        tokio::spawn(async move {
            drain.cancelled().await;
            ready.store(false, std::sync::atomic::Ordering::Release);
        });
    }
    let (control_tx, control_rx) = mpsc::channel(4);
    tokio::spawn(reload_loop(
        config_path,
        Arc::clone(&config),
        signals.reload,
        live,
        state_template,
        control_tx,
    ));

    let seed = random_seed();
    let mut proxy = Proxy::new(Arc::clone(&agents), listeners.clone(), seed);
    proxy.set_call_log(call_log);
    info!(agents = config.agents.len(), "precall ready");
    transport::run(
        proxy,
        sockets,
        contexts,
        config.sip.max_message_bytes,
        transport::HttpClient::new(config.http.client_concurrency),
        control_rx,
        Stop {
            drain: signals.drain,
            now: signals.stop_now,
            drain_for: config.sip.drain,
        },
        transport::ShellOptions::from_limits(&config.sip.limits),
    )
    .await;
    http_stop.cancel();
    let _ = http_task.await;
    info!("precall stopped");
    Ok(())
}

/// Applies each SIGHUP: validate the file again, then swap agents into the webhook and
/// the SIP loop; a bad file changes nothing.
async fn reload_loop(
    path: PathBuf,
    running: Arc<Config>,
    mut reload: mpsc::Receiver<()>,
    live: Arc<RwLock<axum::Router>>,
    template: AppState,
    control: mpsc::Sender<Control>,
) {
    while reload.recv().await.is_some() {
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(e) => {
                error!(config = %path.display(), problems = %e.problems.join("; "), "reload refused; the running config stays");
                continue;
            }
        };
        if config.sip.listen != running.sip.listen || config.http.listen != running.http.listen {
            warn!("listen addresses changed: restart precall to apply them");
        }
        if config.sip.tls.cert != running.sip.tls.cert
            || config.sip.tls.key != running.sip.tls.key
            || config.http.tls != running.http.tls
        {
            warn!("TLS certificate paths changed: restart precall to apply them");
        }
        if config.store.backend != running.store.backend
            || config.store.ttl != running.store.ttl
            || config.store.consume != running.store.consume
        {
            warn!("[store] changed: restart precall to apply it");
        }
        let agents = Arc::new(Agents::new(Arc::new(config)));
        let state = AppState {
            agents: Arc::clone(&agents),
            ..template.clone()
        };
        if let Ok(mut router) = live.write() {
            *router = webhook::router(state);
        }
        if control
            .send(Control::Reload(Arc::clone(&agents)))
            .await
            .is_err()
        {
            return;
        }
        info!(agents = agents.config.agents.len(), config = %path.display(), "config reloaded");
    }
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
