//! Collections over HTTP: create (idempotent, conflicting shapes refused), points upserted,
//! read, searched with a filter and deleted, describe, drop; aliases switched atomically while
//! a searcher keeps searching through the alias; the errors name what is wrong.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::http::Server;
use common::{FlowConfig, Workspace};
use serde_json::{Value, json};

fn points(prefix: &str, n: usize, axis: usize) -> Value {
    let list: Vec<Value> = (0..n)
        .map(|i| {
            let mut v = vec![0.0f32; 4];
            v[axis] = 1.0;
            v[(axis + 1) % 4] = i as f32 / n as f32;
            json!({ "key": format!("{prefix}{i}"), "vector": v,
                    "source": format!("{prefix}/doc{i}"), "text": format!("text {i}") })
        })
        .collect();
    json!({ "points": list })
}

#[test]
fn collections_points_and_aliases_over_http() {
    let ws = Workspace::new(FlowConfig::default());
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0"],
        &[("FRESHINDEX_SEAL_ROWS", "64")],
    )
    .unwrap_or_else(|f| panic!("server did not start: {f:?}"));

    // Create: 201, then 200 for the same shape, 409 for another.
    let r = server.put(
        "/v1/collections/blue",
        &json!({ "dimension": 4, "metric": "dot" }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.put(
        "/v1/collections/blue",
        &json!({ "dimension": 4, "metric": "dot" }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server
        .put("/v1/collections/blue", &json!({ "dimension": 8 }))
        .assert_error(409, "conflict");
    server
        .put("/v1/collections/.bad", &json!({ "dimension": 4 }))
        .assert_error(422, "invalid_argument");
    server
        .put("/v1/collections/zero", &json!({ "dimension": 0 }))
        .assert_error(422, "invalid_argument");

    // Points: 200 of them, in writes of 50, seal segments (at 64 rows) on the way.
    let all = points("a", 200, 0);
    for part in all["points"].as_array().expect("points").chunks(50) {
        server
            .post(
                "/v1/collections/blue/points:upsert",
                &json!({ "points": part }),
            )
            .ok();
    }
    let got = server.get("/v1/collections/blue/points/a7").ok();
    assert_eq!(got["source"], "a/doc7");
    assert_eq!(got["vector"].as_array().map(Vec::len), Some(4));
    server
        .get("/v1/collections/blue/points/nope")
        .assert_error(404, "not_found");
    server
        .post(
            "/v1/collections/blue/points:upsert",
            &json!({ "points": [{ "key": "x", "vector": [1.0] }] }),
        )
        .assert_error(422, "invalid_argument");
    let hits = server
        .post(
            "/v1/collections/blue/search",
            &json!({ "vector": [1.0, 0.5, 0.0, 0.0], "limit": 3 }),
        )
        .ok();
    assert_eq!(hits["hits"].as_array().map(Vec::len), Some(3), "{hits}");
    // A filter on the source.
    server
        .post("/v1/collections/blue/points:upsert", &points("b", 10, 0))
        .ok();
    let hits = server
        .post(
            "/v1/collections/blue/search",
            &json!({ "vector": [1.0, 0.5, 0.0, 0.0], "limit": 50, "sourcePrefix": "b/" }),
        )
        .ok();
    let hits = hits["hits"].as_array().expect("hits").clone();
    assert_eq!(hits.len(), 10);
    assert!(
        hits.iter()
            .all(|h| h["source"].as_str().is_some_and(|s| s.starts_with("b/")))
    );
    let deleted = server
        .post(
            "/v1/collections/blue/points:delete",
            &json!({ "keys": ["a1", "a2", "zz"] }),
        )
        .ok();
    assert_eq!(deleted["deleted"], 3);
    server
        .get("/v1/collections/blue/points/a1")
        .assert_error(404, "not_found");
    let d = server.get("/v1/collections/blue").ok();
    assert_eq!(d["rows"]["total"], 208, "{d}");
    assert_eq!(d["metric"], "dot");
    assert!(d["segments"].as_array().map(Vec::len) >= Some(2), "{d}");
    assert!(d["segments"][0]["dataPath"].is_string(), "{d}");

    // Aliases: `live` names blue, then green; a searcher through it never fails and always
    // sees one whole collection.
    server.put(
        "/v1/collections/green",
        &json!({ "dimension": 4, "metric": "dot" }),
    );
    server
        .post("/v1/collections/green/points:upsert", &points("g", 50, 2))
        .ok();
    let r = server
        .put("/v1/aliases/live", &json!({ "collection": "blue" }))
        .ok();
    assert_eq!(r["previous"], Value::Null);
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let searcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 20 {
                let r = common::http::http(
                    addr,
                    "POST",
                    "/v1/collections/live/search",
                    &[("Content-Type", "application/json")],
                    br#"{"vector":[1.0,0.0,1.0,0.0],"limit":5}"#,
                );
                assert_eq!(r.status, 200, "{}", r.body);
                let v: Value = serde_json::from_str(&r.body).expect("json");
                let hits = v["hits"].as_array().expect("hits").clone();
                assert_eq!(hits.len(), 5, "{v}");
                let firsts: std::collections::BTreeSet<char> = hits
                    .iter()
                    .filter_map(|h| h["key"].as_str().and_then(|k| k.chars().next()))
                    .collect();
                assert_eq!(firsts.len(), 1, "a mix of collections: {v}");
                seen.extend(firsts);
                n += 1;
            }
            seen
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = server
        .put("/v1/aliases/live", &json!({ "collection": "green" }))
        .ok();
    assert_eq!(r["previous"], "blue");
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let seen = searcher.join().expect("searcher");
    assert!(seen.contains(&'g'), "{seen:?}");
    let hit = server
        .post(
            "/v1/collections/live/search",
            &json!({ "vector": [0.0, 0.0, 1.0, 0.0], "limit": 1 }),
        )
        .ok();
    assert!(
        hit["hits"][0]["key"]
            .as_str()
            .is_some_and(|k| k.starts_with('g'))
    );
    let aliases = server.get("/v1/aliases").ok();
    assert_eq!(aliases["aliases"]["live"], "green");

    // Aliases cannot hide a collection, name a missing one or another alias.
    server
        .put("/v1/aliases/blue", &json!({ "collection": "green" }))
        .assert_error(422, "invalid_argument");
    server
        .put("/v1/aliases/x", &json!({ "collection": "nope" }))
        .assert_error(404, "not_found");
    server
        .put("/v1/aliases/y", &json!({ "collection": "live" }))
        .assert_error(422, "invalid_argument");
    // A collection an alias names cannot be dropped; the other can.
    server
        .delete("/v1/collections/green")
        .assert_error(409, "conflict");
    server.delete("/v1/collections/blue").ok();
    server
        .get("/v1/collections/blue")
        .assert_error(404, "not_found");
    let list = server.get("/v1/collections").ok();
    let names: Vec<&str> = list["collections"]
        .as_array()
        .expect("collections")
        .iter()
        .filter_map(|c| c["collection"].as_str())
        .collect();
    assert_eq!(names, ["green"]);
    let r = server.delete("/v1/aliases/live").ok();
    assert_eq!(r["collection"], "green");
    server
        .delete("/v1/aliases/live")
        .assert_error(404, "not_found");
    server.delete("/v1/collections/green").ok();
    server.stop();
}

/// `freshindex collections …` on a data directory: a one-shot `index` leaves its sealed
/// segments indexed; list, describe, create, alias, drop; and a collection a running `serve`
/// owns is refused for changes with a message saying so, while reading it works.
#[test]
fn collections_cli_manages_the_local_collections() {
    let ws = Workspace::new(FlowConfig::with_chunks(200, 0));
    let mut rng = common::Rng::new(3);
    for i in 0..40 {
        ws.write(format!("d{i}.md"), common::paragraph(&mut rng, 60));
    }
    let out = ws
        .fi()
        .args(["index"])
        .env("FRESHINDEX_SEAL_ROWS", "40")
        .run()
        .ok();
    assert!(
        out.stdout.contains("segment(s) of `docs` indexed"),
        "{}",
        out.stdout
    );
    let d = ws
        .fi()
        .args(["collections", "describe", "docs", "--json"])
        .run()
        .ok()
        .json();
    assert_eq!(d["flow"], "docs");
    assert_eq!(d["rows"]["sealedUnindexed"], 0, "{d}");
    assert!(d["rows"]["indexed"].as_u64() > Some(0), "{d}");
    assert!(
        d["builds"]
            .as_array()
            .is_some_and(|b| !b.is_empty() && b.iter().all(|b| b["state"] == "Finished")),
        "{d}"
    );
    // Search still answers (through the indexes) from another process.
    let hits = ws
        .fi()
        .args(["search", "--json", "-k", "3", "quartz"])
        .run()
        .ok()
        .json();
    assert!(hits.as_array().is_some_and(|h| h.len() == 3), "{hits}");

    ws.fi()
        .args([
            "collections",
            "create",
            "extra",
            "--dimension",
            "8",
            "--metric",
            "l2",
        ])
        .run()
        .ok();
    ws.fi()
        .args(["collections", "alias", "current", "extra"])
        .run()
        .ok();
    let list = ws
        .fi()
        .args(["collections", "list", "--json"])
        .run()
        .ok()
        .json();
    assert_eq!(list["aliases"]["current"], "extra", "{list}");
    let names: Vec<&str> = list["collections"]
        .as_array()
        .expect("collections")
        .iter()
        .filter_map(|c| c["collection"].as_str())
        .collect();
    assert_eq!(names, ["docs", "extra"]);
    let refused = ws
        .fi()
        .args(["collections", "drop", "extra"])
        .run()
        .failed();
    assert!(
        refused.stderr.contains("alias `current`"),
        "{}",
        refused.stderr
    );
    let refused = ws.fi().args(["collections", "drop", "docs"]).run().failed();
    assert!(refused.stderr.contains("flow `docs`"), "{}", refused.stderr);
    ws.fi()
        .args(["collections", "unalias", "current"])
        .run()
        .ok();
    ws.fi().args(["collections", "drop", "extra"]).run().ok();

    // While a server owns the flow's collection: reads work, changes are refused clearly.
    let server = Server::start(&ws);
    server.post("/v1/flows/docs:run", &json!({})).ok();
    let d = ws
        .fi()
        .args(["collections", "describe", "docs", "--json"])
        .run()
        .ok()
        .json();
    assert!(d["rows"]["total"].as_u64() > Some(0), "{d}");
    let refused = ws
        .fi()
        .args(["collections", "compact", "docs"])
        .run()
        .failed();
    assert!(
        refused
            .stderr
            .contains("another process has it open for writing"),
        "{}",
        refused.stderr
    );
    server.stop();
}
