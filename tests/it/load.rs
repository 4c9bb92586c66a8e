//! Many held calls at once: 200 INVITEs held, then released by 200 webhooks posted in
//! parallel; every call must be forwarded `waited`, none lost, none duplicated.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::rig::*;

const CALLS: usize = 200;
const POSTERS: usize = 8;

#[test]
fn two_hundred_held_calls_released_by_two_hundred_webhooks() {
    let rig = Rig::udp("held-200", 60_000);
    let callers: Vec<String> = (0..CALLS)
        .map(|i| format!("+1415555{:04}", 3000 + i))
        .collect();
    let calls: Vec<_> = callers.iter().map(|c| rig.uac.call(c, AGENT_A)).collect();
    // Sent in one burst, more than a default socket buffer holds: like a real UAC, resend
    // every INVITE still without a provisional each T1 (timer A; doubling is not needed).
    let mut trying = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while trying.len() < CALLS {
        for c in calls.iter().filter(|c| !trying.contains(&c.call_id)) {
            rig.uac.send(&c.invite());
        }
        let round = Instant::now() + Duration::from_millis(500);
        while trying.len() < CALLS {
            let left = round.saturating_duration_since(Instant::now());
            let Some(m) = rig.uac.recv(left) else { break };
            assert_eq!(
                m.status(),
                Some(100),
                "held calls get only a 100 so far: {}",
                m.start_line
            );
            trying.insert(m.call_id().unwrap().to_string());
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {CALLS} INVITEs got a 100",
            trying.len()
        );
    }
    rig.uas.expect_nothing(QUIET, "all 200 calls are held");

    let t_release = Instant::now();
    let precall = Arc::new((rig.precall.http, rig.precall.api_key("a")));
    let chunks: Vec<Vec<String>> = callers
        .chunks(CALLS / POSTERS)
        .map(|c| c.to_vec())
        .collect();
    let posters: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let precall = precall.clone();
            std::thread::spawn(move || {
                for phone in chunk {
                    let body = json!({ "agentId": "a", "phoneNumber": phone, "customer_name": format!("n{phone}") });
                    let auth = format!("Bearer {}", precall.1);
                    let r = crate::harness::http_request(
                        precall.0,
                        "POST",
                        "/v1/precall",
                        &[("Authorization", &auth), ("Content-Type", "application/json")],
                        body.to_string().as_bytes(),
                    );
                    assert_eq!(r.status, 202, "{phone}: {}", r.body);
                    assert_eq!(r.json()["released"], 1, "{phone}: the webhook releases its held call");
                }
            })
        })
        .collect();
    for p in posters {
        p.join().expect("a webhook poster failed");
    }

    let mut forwarded: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while forwarded.len() < CALLS {
        let left = deadline.saturating_duration_since(Instant::now());
        let inv = rig.uas.recv_request("INVITE", left).unwrap_or_else(|| {
            panic!(
                "only {} of {CALLS} held calls were forwarded",
                forwarded.len()
            )
        });
        let id = inv.msg.call_id().unwrap().to_string();
        let st = status_of(&inv.msg);
        assert!(
            forwarded.insert(id.clone(), st).is_none(),
            "{id} forwarded twice"
        );
        let from = inv.msg.header("from").unwrap_or("");
        let name = x_precall(&inv.msg)
            .get("customer_name")
            .cloned()
            .unwrap_or_default();
        assert!(
            from.contains(&name[1..]),
            "{id}: context of another caller: {name} for {from}"
        );
    }
    let all_forwarded = t_release.elapsed();
    let not_waited: Vec<_> = forwarded.iter().filter(|(_, s)| *s != "waited").collect();
    assert!(
        not_waited.is_empty(),
        "{} calls not `waited`: {not_waited:?}",
        not_waited.len()
    );
    assert!(
        all_forwarded < Duration::from_secs(20),
        "release took {all_forwarded:?}"
    );

    let mut answered = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.len() < CALLS {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = rig
            .uac
            .recv_where(left, &|m| m.status() == Some(200))
            .unwrap_or_else(|| panic!("only {} of {CALLS} calls got their 200", answered.len()));
        answered.insert(m.call_id().unwrap().to_string());
    }
    let mut p = rig.precall;
    assert!(p.is_running());
}
