//! Micro-benchmarks of the sans-IO hot core: what every proxied call costs before a
//! socket is touched. End-to-end figures (CPU per call against Kamailio, setup latency,
//! release lag, webhook throughput, memory) come from `bench/run-all.sh`.
//!
//! `cargo bench --bench core` (add `-- parse` etc. to run one group). Measurement time is
//! kept short: the machines are shared and these are for spotting regressions and
//! hotspots, not for absolute numbers.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use serde_json::{json, Map, Value};

use precall::agent::{self, Agents};
use precall::config::{CallerSource, Config, Transport};
use precall::inject::{self, Status};
use precall::number;
use precall::sip::parse::parse_datagram;
use precall::sip::proxy::{Listener, Output, Peer, Proxy, Settled};
use precall::store::memory::MemoryStore;
use precall::store::{CallerKey, Claim, Contexts};

/// The bench config: one agent, as in `bench/precall-hit.toml`.
const CONFIG: &str = r#"
[sip]
listen = ["udp:127.0.0.1:5060"]
trusted_peers = ["127.0.0.0/8"]

[http]
listen = "127.0.0.1:18080"

[store]
consume = false

[[agents]]
id = "bench-agent"
api_keys = ["bench-key"]
numbers = ["+15550100"]
upstream = "sip:127.0.0.1:5070;transport=udp"
default_region = "US"
defaults = { customer_name = "there" }
"#;

/// An INVITE as SIPp's bench UAC sends it (`../shared/bench/scenarios/uac.xml`), SDP body.
fn invite(branch: &str) -> Bytes {
    let sdp = "v=0\r\n\
               o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
               s=-\r\n\
               c=IN IP4 127.0.0.1\r\n\
               t=0 0\r\n\
               m=audio 6000 RTP/AVP 0\r\n\
               a=rtpmap:0 PCMU/8000\r\n";
    Bytes::from(format!(
        "INVITE sip:+15550100@127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch}\r\n\
         From: <sip:+15552000042@127.0.0.1:5061>;tag=4711SIPpTag0042\r\n\
         To: <sip:+15550100@127.0.0.1:5060>\r\n\
         Call-ID: 42-4711@127.0.0.1\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:+15552000042@127.0.0.1:5061>\r\n\
         Max-Forwards: 70\r\n\
         Subject: precall bench\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    ))
}

/// The ~200-byte context `bench/post_contexts.py` posts (minus agentId/phoneNumber).
fn context() -> Map<String, Value> {
    let v = json!({
        "customer_name": "Customer 2000042",
        "tier": "gold",
        "account_number": "ACC-52000042",
        "last_order": {"id": "A-0042", "status": "shipped"},
        "language": "en-US",
        "note": "returning caller, prefers callbacks in the afternoon",
    });
    match v {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn agents() -> Arc<Agents> {
    let config = Config::from_toml_str(CONFIG).expect("bench config is valid");
    Arc::new(Agents::new(Arc::new(config)))
}

fn udp(addr: &str) -> SocketAddr {
    addr.parse().expect("literal address")
}

fn carrier() -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: udp("127.0.0.1:5061"),
        conn: None,
        listener: 0,
    }
}

fn new_proxy(agents: &Arc<Agents>) -> Proxy {
    let listeners = vec![Listener {
        transport: Transport::Udp,
        addr: udp("127.0.0.1:5060"),
    }];
    Proxy::new(Arc::clone(agents), listeners, 42)
}

fn bench_parse(c: &mut Criterion) {
    let msg = invite("z9hG4bK-parse-1");
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("invite_with_sdp", |b| {
        b.iter(|| parse_datagram(black_box(msg.clone()), 65535))
    });
    g.finish();
}

fn bench_proxy(c: &mut Criterion) {
    let agents = agents();
    let ctx = Arc::new(context());
    let len = invite("z9hG4bK-proxy-0").len() as u64;
    let mut g = c.benchmark_group("proxy");
    g.throughput(Throughput::Bytes(len));

    // INVITE in → 100 Trying + Lookup out; the context (a cache hit) in → forwarded
    // INVITE with X-Precall-* headers out. A fresh core per call (built outside the
    // timing) so the transaction maps stay the size a steady load keeps them.
    let mut n = 0u64;
    g.bench_function("invite_hit_forward", |b| {
        b.iter_batched(
            || {
                n += 1;
                (new_proxy(&agents), invite(&format!("z9hG4bK-bench-{n}")))
            },
            |(mut proxy, bytes)| {
                let now = Instant::now();
                proxy.handle_datagram(now, carrier(), bytes);
                let mut hold = None;
                while let Some(out) = proxy.poll_output() {
                    if let Output::Lookup { hold: id, .. } = out {
                        hold = Some(id);
                    }
                    black_box(&out);
                }
                if let Some(id) = hold {
                    proxy.handle_context(now, id, Arc::clone(&ctx), Settled::Cached);
                }
                while let Some(out) = proxy.poll_output() {
                    black_box(&out);
                }
                proxy
            },
            BatchSize::SmallInput,
        )
    });

    // The same in one long-lived core: each call is answered 200 by the agent and
    // forgotten when its linger timer fires, so the maps stay small and what is measured
    // includes the response relay and the timer heap.
    let mut proxy = new_proxy(&agents);
    let mut now = Instant::now();
    let mut m = 0u64;
    g.bench_function("invite_hit_forward_200_relay", |b| {
        b.iter_batched(
            || {
                m += 1;
                invite(&format!("z9hG4bK-steady-{m}"))
            },
            |bytes| {
                now += Duration::from_millis(1);
                proxy.handle_datagram(now, carrier(), bytes);
                let mut hold = None;
                while let Some(out) = proxy.poll_output() {
                    if let Output::Lookup { hold: id, .. } = out {
                        hold = Some(id);
                    }
                }
                if let Some(id) = hold {
                    proxy.handle_context(now, id, Arc::clone(&ctx), Settled::Cached);
                }
                let mut forwarded = None;
                while let Some(out) = proxy.poll_output() {
                    if let Output::Transmit(t) = out {
                        forwarded = Some(t.bytes);
                    }
                }
                if let Some(fwd) = forwarded {
                    let ok = ok_for(&fwd);
                    proxy.handle_datagram(now, upstream(), ok);
                    while let Some(out) = proxy.poll_output() {
                        black_box(&out);
                    }
                }
                proxy.handle_timeout(now);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn upstream() -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: udp("127.0.0.1:5070"),
        conn: None,
        listener: 0,
    }
}

/// The agent's 200 OK for a forwarded INVITE: its Vias, From, To (tagged), Call-ID, CSeq.
fn ok_for(forwarded: &[u8]) -> Bytes {
    let text = String::from_utf8_lossy(forwarded);
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for line in text.split("\r\n") {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        match name.as_str() {
            "via" | "from" | "call-id" | "cseq" | "record-route" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            "to" => {
                out.push_str(line);
                out.push_str(";tag=agent\r\n");
            }
            _ => {}
        }
        if line.is_empty() {
            break;
        }
    }
    out.push_str("Contact: <sip:agent@127.0.0.1:5070>\r\nContent-Length: 0\r\n\r\n");
    Bytes::from(out)
}

fn bench_route(c: &mut Criterion) {
    let agents = agents();
    let from = "<sip:+15552000042@127.0.0.1:5061>;tag=4711SIPpTag0042";
    let sources = [CallerSource::Pai, CallerSource::From];
    let region = phonenumber::country::Id::US;
    let mut g = c.benchmark_group("route");
    g.bench_function("for_called_e164", |b| {
        b.iter(|| black_box(agents.for_called(black_box(Some("+15550100")))).is_some())
    });
    g.bench_function("for_called_national", |b| {
        b.iter(|| black_box(agents.for_called(black_box(Some("5550100")))).is_some())
    });
    g.bench_function("caller_number_from", |b| {
        b.iter(|| {
            agent::caller_number(
                black_box(&sources),
                None,
                black_box(Some(from)),
                true,
                region,
            )
        })
    });
    g.finish();
}

fn bench_number(c: &mut Criterion) {
    let region = phonenumber::country::Id::US;
    let mut g = c.benchmark_group("number");
    for (name, input) in [
        ("e164", "+14155550123"),
        ("formatted", "+1 (415) 555-0123"),
        ("national", "415-555-0123"),
    ] {
        g.bench_function(format!("normalise_{name}"), |b| {
            b.iter(|| number::normalise(black_box(input), region))
        });
    }
    g.bench_function("normalise_lenient_e164", |b| {
        b.iter(|| number::normalise_lenient(black_box("+15552000042"), region))
    });
    g.bench_function("normalise_lenient_anonymous", |b| {
        b.iter(|| number::normalise_lenient(black_box("anonymous"), region))
    });
    g.finish();
}

fn bench_inject(c: &mut Criterion) {
    let agents = agents();
    let Some(agent) = agents.config.agents.first() else {
        return;
    };
    let ctx = context();
    let effective = inject::effective_context(&agent.defaults, Some(&ctx));
    let rendered = inject::render_headers(&agent.inject, Status::Hit, 0, &effective);
    let mut g = c.benchmark_group("inject");
    g.throughput(Throughput::Bytes(rendered.len() as u64));
    g.bench_function("effective_context", |b| {
        b.iter(|| inject::effective_context(black_box(&agent.defaults), Some(black_box(&ctx))))
    });
    g.bench_function("render_headers", |b| {
        b.iter(|| {
            inject::render_headers(
                black_box(&agent.inject),
                Status::Hit,
                0,
                black_box(&effective),
            )
        })
    });
    g.finish();
}

/// The store side of a hit: what the shell's `Output::Lookup` costs for a cached caller
/// (register a watch, read the store, close the watch), and a webhook's publish. The
/// memory store answers without awaiting, so `now_or_never` drives it without a runtime.
fn bench_store(c: &mut Criterion) {
    let store = Arc::new(MemoryStore::new());
    let contexts = Contexts::new(store, false, Duration::from_secs(3600));
    let ctx = Arc::new(context());
    let key = CallerKey {
        agent: "bench-agent".to_string(),
        number: number::E164("+15552000042".to_string()),
    };
    let published = contexts.publish(&key, Arc::clone(&ctx)).now_or_never();
    assert!(
        matches!(published, Some(Ok(_))),
        "memory store publishes at once"
    );
    let mut g = c.benchmark_group("store");
    g.bench_function("claim_hit", |b| {
        b.iter(|| match contexts.claim(black_box(&key)).now_or_never() {
            Some(Ok(Claim::Hit(found))) => black_box(found),
            _ => unreachable!("the context was published above"),
        })
    });
    g.bench_function("publish_no_waiter", |b| {
        b.iter(|| {
            contexts
                .publish(black_box(&key), Arc::clone(&ctx))
                .now_or_never()
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_parse, bench_proxy, bench_route, bench_number, bench_inject, bench_store
}
criterion_main!(benches);
