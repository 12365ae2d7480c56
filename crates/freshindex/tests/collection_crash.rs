//! kill -9 of `serve` while points are written to a collection: during appends (at random
//! moments), and stopped at failpoints inside a seal, a compaction, an index build and an index
//! attachment.
//! After a restart no acknowledged write is lost, no deleted point comes back (the one write
//! in flight may or may not have happened), search finds each point by its own vector, and
//! index builds resume until every sealed segment is indexed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::http::{Server, try_http};
use common::{FlowConfig, Rng, Workspace};
use serde_json::{Value, json};

const KEYS: usize = 80;
const DIM: usize = 8;

fn vector(key: usize, version: u32) -> Vec<f32> {
    let mut s =
        (key as u64 * 1_000_003 + u64::from(version)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// A key's state: `Some(version)` present, `None` deleted (or never written).
type Model = BTreeMap<usize, Option<u32>>;

/// What a writer saw: the acknowledged state, and the possible states of the keys of the
/// one request that got no answer.
struct Seen {
    model: Model,
    uncertain: BTreeMap<usize, Option<u32>>,
    writes: usize,
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Option<u16> {
    try_http(addr, "POST", path, body.to_string().as_bytes()).map(|r| r.status)
}

/// Writes until a request fails; returns what was acknowledged.
fn writer(addr: SocketAddr, mut model: Model, seed: u64) -> Seen {
    let mut rng = Rng::new(seed);
    let mut version = 1_000 * seed as u32;
    let mut writes = 0;
    loop {
        let roll = rng.below(100);
        let (ok, pending): (bool, BTreeMap<usize, Option<u32>>) = if roll < 70 {
            let mut batch = BTreeMap::new();
            for _ in 0..rng.range(1, 6) {
                version += 1;
                batch.insert(rng.below(KEYS), Some(version));
            }
            let points: Vec<Value> = batch
                .iter()
                .map(|(k, v)| {
                    json!({ "key": format!("k{k}"), "vector": vector(*k, v.unwrap_or(0)),
                            "source": format!("doc{k}") })
                })
                .collect();
            let status = post(
                addr,
                "/v1/collections/c/points:upsert",
                &json!({ "points": points }),
            );
            (status == Some(200), batch)
        } else if roll < 95 {
            let batch: BTreeMap<usize, Option<u32>> = (0..rng.range(1, 4))
                .map(|_| (rng.below(KEYS), None))
                .collect();
            let keys: Vec<String> = batch.keys().map(|k| format!("k{k}")).collect();
            let status = post(
                addr,
                "/v1/collections/c/points:delete",
                &json!({ "keys": keys }),
            );
            (status == Some(200), batch)
        } else {
            let status = post(addr, "/v1/collections/c:compact", &json!({}));
            (status == Some(200), BTreeMap::new())
        };
        if !ok {
            return Seen {
                model,
                uncertain: pending,
                writes,
            };
        }
        writes += 1;
        model.extend(pending);
    }
}

fn start(ws: &Workspace, env: &[(&str, &str)]) -> Server {
    let mut all = vec![("FRESHINDEX_SEAL_ROWS", "32")];
    all.extend_from_slice(env);
    let server = Server::start_with(ws, &ws.data(), &["--listen", "127.0.0.1:0"], &all)
        .unwrap_or_else(|f| panic!("server did not start: {f:?}"));
    let r = server.put("/v1/collections/c", &json!({ "dimension": DIM }));
    assert!(matches!(r.status, 200 | 201), "{}", r.body);
    server
}

/// Every key holds its acknowledged state (or, for the request in flight, either state), and
/// search finds each present point first by its own vector. Returns the state now.
fn verify(server: &Server, seen: &Seen, context: &str) -> Model {
    let mut now = Model::new();
    for k in 0..KEYS {
        let r = server.get(&format!("/v1/collections/c/points/k{k}"));
        let got = match r.status {
            404 => None,
            200 => {
                let v = r.json();
                let vec: Vec<f32> = serde_json::from_value(v["vector"].clone()).expect("vector");
                let version = (0..=1_000_000u32)
                    .find(|ver| vector(k, *ver) == vec)
                    .unwrap_or_else(|| panic!("{context}: k{k} holds a vector no write sent"));
                Some(version)
            }
            s => panic!("{context}: GET k{k}: {s} {}", r.body),
        };
        let acked = seen.model.get(&k).copied().flatten();
        let allowed: BTreeSet<Option<u32>> = match seen.uncertain.get(&k) {
            Some(in_flight) => [acked, *in_flight].into(),
            None => [acked].into(),
        };
        assert!(
            allowed.contains(&got),
            "{context}: k{k} is {got:?}; acknowledged {acked:?}, in flight {:?}",
            seen.uncertain.get(&k)
        );
        now.insert(k, got);
    }
    for (k, v) in now.iter().filter_map(|(k, v)| v.map(|v| (*k, v))) {
        let hits = server
            .post(
                "/v1/collections/c/search",
                &json!({ "vector": vector(k, v), "limit": 1 }),
            )
            .ok();
        assert_eq!(hits["hits"][0]["key"], format!("k{k}"), "{context}: {hits}");
    }
    now
}

fn wait_until_indexed(server: &Server, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = server.get("/v1/collections/c").ok();
        if d["rows"]["sealedUnindexed"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: builds did not resume: {d}\nbuilds not deleted: {:?}\nnodes: {}\nserver: {}",
            server.get("/v1/index-builds").ok()["builds"]
                .as_array()
                .map(|b| b
                    .iter()
                    .filter(|b| b["state"] != "Deleted")
                    .cloned()
                    .collect::<Vec<_>>())
                .unwrap_or_default(),
            server.get("/v1/index-nodes").ok(),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_at_random_moments() {
    let ws = Workspace::new(FlowConfig::default());
    let mut model = Model::new();
    let mut rng = Rng::new(42);
    let mut total = 0;
    for round in 0..4u64 {
        let server = start(&ws, &[]);
        let addr = server.addr;
        let m = model.clone();
        let handle = std::thread::spawn(move || writer(addr, m, round + 1));
        std::thread::sleep(Duration::from_millis(rng.range(200, 900) as u64));
        drop(server); // SIGKILL
        let seen = handle.join().expect("writer");
        total += seen.writes;
        let server = start(&ws, &[]);
        model = verify(&server, &seen, &format!("round {round}"));
        wait_until_indexed(&server, &format!("round {round}"));
    }
    assert!(
        total >= 20,
        "only {total} acknowledged writes: the test did not exercise much"
    );
}

#[test]
fn kill_9_inside_a_seal_a_compaction_a_build_or_an_attachment_loses_nothing() {
    let ws = Workspace::new(FlowConfig::default());
    let mut model = Model::new();
    for (i, point) in [
        "seal-written",
        "compact-written",
        "index-build-started",
        "attach-moved",
    ]
    .into_iter()
    .enumerate()
    {
        let server = start(&ws, &[("FRESHINDEX_FAILPOINT", point)]);
        let addr = server.addr;
        let m = model.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(writer(addr, m, 10 + i as u64));
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server
            .stderr()
            .contains(&format!("failpoint {point} reached"))
        {
            assert!(
                Instant::now() < deadline,
                "{point} was never reached; stderr:\n{}",
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(server); // SIGKILL while stopped inside it
        let seen = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("writer ends");
        let server = start(&ws, &[]);
        model = verify(&server, &seen, point);
        wait_until_indexed(&server, point);
        // The collection takes writes again after the restart.
        let k = 0;
        let r = server.post(
            "/v1/collections/c/points:upsert",
            &json!({ "points": [{ "key": format!("k{k}"), "vector": vector(k, 999_999) }] }),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        model.insert(k, Some(999_999));
    }
}
