//! `freshindex serve` as a real process on an OS-assigned port: a connector doing full
//! traversals through push → poll → index → deleteQueueItems, the error table, bearer
//! tokens, and a graceful SIGTERM that releases the server's leases.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use common::http::{Resp, Server, b64, pct, push_workspace, unb64};
use common::{Workspace, parse_export};

/// A stand-in for a content hash: FNV-1a of the text.
fn hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A connector over a changing item set: full traversals labelled A, B, A, … that push every
/// current item with its content hash, index what the queue hands out, and end with
/// `deleteQueueItems` of the previous label.
struct Connector {
    /// Strictly increasing versions across traversals (big-endian, so byte order is number
    /// order).
    version: u64,
    previous_label: Option<String>,
}

impl Connector {
    fn next_version(&mut self) -> String {
        self.version += 1;
        b64(&self.version.to_be_bytes())
    }

    /// One traversal; returns the keys the queue handed out for indexing.
    fn traverse(
        &mut self,
        server: &Server,
        items: &BTreeMap<String, String>,
        label: &str,
    ) -> BTreeSet<String> {
        let keys: Vec<&String> = items.keys().collect();
        // The first item alone, the others in a batch: both forms of items:push.
        let push_json = |k: &str| {
            json!({
                "name": k,
                "contentHash": hash(&items[k]),
                "queue": label,
                "payload": b64(format!("payload of {k}").as_bytes()),
            })
        };
        let one = server
            .post(
                "/v1/flows/docs/items:push",
                &json!({ "item": push_json(keys[0]) }),
            )
            .ok();
        assert_eq!(one["name"], keys[0].as_str());
        assert_eq!(one["queue"], label);
        let batch: Vec<Value> = keys[1..].iter().map(|k| push_json(k)).collect();
        let pushed = server
            .post("/v1/flows/docs/items:push", &json!({ "items": batch }))
            .ok();
        let pushed = pushed["items"].as_array().expect("items array");
        assert_eq!(pushed.len(), keys.len() - 1);
        for (p, k) in pushed.iter().zip(&keys[1..]) {
            assert_eq!(p["name"], k.as_str(), "{p}");
            assert!(p.get("error").is_none(), "{p}");
        }

        let mut handed_out = BTreeSet::new();
        loop {
            let polled = server
                .post("/v1/flows/docs/items:poll", &json!({ "limit": 2 }))
                .ok();
            let polled = polled["items"].as_array().expect("items array").clone();
            if polled.is_empty() {
                break;
            }
            assert!(polled.len() <= 2);
            for it in polled {
                let name = it["name"].as_str().expect("name").to_string();
                assert!(it["leased"].as_bool().expect("leased"), "{it}");
                let text = items
                    .get(&name)
                    .unwrap_or_else(|| panic!("poll handed out {name:?}, not a current item"));
                let payload = unb64(it["payload"].as_str().expect("payload"));
                assert_eq!(payload, format!("payload of {name}").as_bytes());
                assert!(handed_out.insert(name.clone()), "{name} handed out twice");
                let indexed = server
                    .post(
                        &format!("/v1/flows/docs/items/{}:index", pct(&name)),
                        &json!({
                            "item": {
                                "version": self.next_version(),
                                "content": { "text": text },
                                "contentHash": hash(text),
                            },
                            "owner": it["leaseOwner"],
                        }),
                    )
                    .ok();
                assert_eq!(indexed["name"], name.as_str(), "{indexed}");
                assert_eq!(indexed["status"], "ACCEPTED", "{indexed}");
            }
        }
        if let Some(prev) = self.previous_label.replace(label.to_string()) {
            let gone = server
                .post(
                    &format!("/v1/flows/docs/queues/{}:deleteQueueItems", pct(&prev)),
                    &json!({}),
                )
                .ok();
            assert_eq!(gone["queue"], prev.as_str());
        }
        handed_out
    }
}

/// The rows of the `docs` target by source item: the export of a stopped server.
fn target_by_item(ws: &Workspace) -> BTreeMap<String, Vec<String>> {
    let mut by_item: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in parse_export(&ws.export()) {
        by_item.entry(row.source).or_default().push(row.text);
    }
    by_item
}

fn assert_target_matches(ws: &Workspace, items: &BTreeMap<String, String>) {
    let target = target_by_item(ws);
    assert_eq!(
        target.keys().collect::<Vec<_>>(),
        items.keys().collect::<Vec<_>>(),
        "the target holds rows of exactly the current items"
    );
    for (key, text) in items {
        // Each test text fits in one chunk.
        assert_eq!(target[key], vec![text.clone()], "rows of {key:?}");
    }
}

#[test]
fn traversals_keep_the_target_equal_to_the_item_set() {
    let ws = push_workspace();
    let mut items: BTreeMap<String, String> = [
        (
            "guide/intro.md",
            "Lantern orbit meadow: an introduction to the guide.",
        ),
        (
            "guide/setup:linux.md",
            "Copper harbor quartz: setting up on Linux.",
        ),
        (
            "notes/2024 plans.txt",
            "Thunder ledger canyon: plans for the year.",
        ),
        ("faq", "Violet anchor prism: questions asked often."),
        (
            "100%/raw",
            "Falcon ember glacier: a key with a percent sign.",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut connector = Connector {
        version: 0,
        previous_label: None,
    };

    let server = Server::start(&ws);
    let first = connector.traverse(&server, &items, "A");
    assert_eq!(
        first,
        items.keys().cloned().collect(),
        "every new item is indexed"
    );
    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200);
    for line in [
        "freshindex_queue_items{flow=\"docs\",status=\"ACCEPTED\"} 5",
        "freshindex_queue_leases_held{flow=\"docs\"} 0",
        "freshindex_api_requests_total{verb=\"index\"} 5",
        "freshindex_api_requests_total{verb=\"push\"} 2",
        "freshindex_embeddings_computed_total 5",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "metrics lack {line:?}:\n{}",
            metrics.body
        );
    }
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "serve exited with {status}; stderr:\n{stderr}"
    );
    assert_target_matches(&ws, &items);

    // The next traversal, by a restarted server: one edit, one deletion, one addition.
    items.insert(
        "guide/intro.md".into(),
        "Summit tunnel beacon: the introduction, rewritten.".into(),
    );
    items.remove("faq");
    items.insert(
        "guide/new ☃.md".into(),
        "Marble willow cobalt: a new page with a snowman in its name.".into(),
    );
    let server = Server::start(&ws);
    let second = connector.traverse(&server, &items, "B");
    assert_eq!(
        second,
        BTreeSet::from(["guide/intro.md".to_string(), "guide/new ☃.md".to_string()]),
        "only the edited and the added item are indexed again"
    );
    server
        .get(&format!("/v1/flows/docs/items/{}", pct("faq")))
        .assert_error(404, "item_not_found");
    let kept = server
        .get(&format!("/v1/flows/docs/items/{}", pct("100%/raw")))
        .ok();
    assert_eq!(
        (kept["status"].as_str(), kept["queue"].as_str()),
        (Some("ACCEPTED"), Some("B"))
    );
    let hits = server
        .post(
            "/v1/flows/docs/search",
            &json!({ "query": "summit tunnel beacon introduction rewritten", "limit": 3 }),
        )
        .ok();
    let top = &hits["hits"][0];
    assert_eq!(top["name"], "guide/intro.md", "{hits}");
    assert_eq!(top["text"], items["guide/intro.md"].as_str());
    let listed = server.get("/v1/flows/docs/items?pageSize=2").ok();
    let mut names: Vec<String> = Vec::new();
    let mut page = listed;
    loop {
        for it in page["items"].as_array().expect("items") {
            names.push(it["name"].as_str().expect("name").to_string());
        }
        match page["nextPageToken"].as_str() {
            Some(t) => {
                page = server
                    .get(&format!(
                        "/v1/flows/docs/items?pageSize=2&pageToken={}",
                        pct(t)
                    ))
                    .ok()
            }
            None => break,
        }
    }
    assert_eq!(
        names,
        items.keys().cloned().collect::<Vec<_>>(),
        "paged listing"
    );
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "serve exited with {status}; stderr:\n{stderr}"
    );
    assert_target_matches(&ws, &items);

    // A traversal that changes nothing indexes nothing and deletes nothing.
    let server = Server::start(&ws);
    assert!(connector.traverse(&server, &items, "A").is_empty());
    server.stop();
    assert_target_matches(&ws, &items);
}

fn push(server: &Server, flow: &str, item: Value) -> Resp {
    server.post(
        &format!("/v1/flows/{flow}/items:push"),
        &json!({ "item": item }),
    )
}

#[test]
fn bad_requests_get_the_documented_errors() {
    let ws = push_workspace();
    let server = Server::start(&ws);
    let json_type = [("Content-Type", "application/json")];

    // 400: not JSON, and JSON of the wrong shape (the message names the field).
    server
        .send(
            "POST",
            "/v1/flows/docs/items:push",
            &json_type,
            b"{\"item\": {",
        )
        .assert_error(400, "malformed_json");
    let m = push(&server, "docs", json!({ "name": "x", "contentHash": 5 }))
        .assert_error(400, "invalid_body");
    assert!(m.contains("item.contentHash"), "{m}");
    let m = push(&server, "docs", json!({ "name": "x", "contentHahs": "h" }))
        .assert_error(400, "invalid_body");
    assert!(m.contains("contentHahs"), "{m}");
    server
        .send(
            "POST",
            "/v1/flows/docs/items:push",
            &[],
            br#"{"item":{"name":"x","contentHash":"h"}}"#,
        )
        .assert_error(415, "unsupported_media_type");

    // 422: values out of range or contradictory.
    let m = push(
        &server,
        "docs",
        json!({ "name": "x", "type": "MODIFIED", "contentHash": "h" }),
    )
    .assert_error(422, "invalid_argument");
    assert!(m.contains("not both"), "{m}");
    push(&server, "docs", json!({ "name": "x" })).assert_error(422, "invalid_argument");
    push(&server, "docs", json!({ "name": "", "contentHash": "h" }))
        .assert_error(422, "invalid_argument");
    let m = server
        .post("/v1/flows/docs/items:poll", &json!({ "limit": 500 }))
        .assert_error(422, "invalid_argument");
    assert!(m.starts_with("limit"), "{m}");
    server
        .post("/v1/flows/docs/items:poll", &json!({ "limit": 0 }))
        .assert_error(422, "invalid_argument");
    let m = server
        .post(
            "/v1/flows/docs/items:poll",
            &json!({ "statusCodes": ["DONE"] }),
        )
        .assert_error(422, "invalid_argument");
    assert!(m.contains("statusCodes[0]"), "{m}");

    // 413: a payload over 8 KiB decoded; exactly 8 KiB is fine.
    let m = push(
        &server,
        "docs",
        json!({ "name": "big", "contentHash": "h", "payload": b64(&[1u8; 8193]) }),
    )
    .assert_error(413, "payload_too_large");
    assert!(m.contains("item.payload"), "{m}");
    push(
        &server,
        "docs",
        json!({ "name": "big", "contentHash": "h", "payload": b64(&[1u8; 8192]) }),
    )
    .ok();

    // 404: unknown flow, item, route; 405: a known path with the wrong method.
    push(&server, "nope", json!({ "name": "x", "contentHash": "h" }))
        .assert_error(404, "flow_not_found");
    server
        .get("/v1/flows/docs/items/never%2Fpushed")
        .assert_error(404, "item_not_found");
    server
        .delete("/v1/flows/docs/items/never%2Fpushed")
        .assert_error(404, "item_not_found");
    server
        .get("/v1/whatever")
        .assert_error(404, "route_not_found");
    server
        .post("/v1/flows/docs/items/big:frobnicate", &json!({}))
        .assert_error(404, "route_not_found");
    server
        .send("PUT", "/v1/flows/docs/items:poll", &[], b"")
        .assert_error(405, "method_not_allowed");

    // 409: a stale version, a REQUEUE of an item nobody holds.
    let index = |version: &[u8]| {
        server.post(
            "/v1/flows/docs/items/v%2Fitem:index",
            &json!({ "item": { "version": b64(version), "content": { "text": "Versioned text." } } }),
        )
    };
    index(&[0, 2]).ok();
    index(&[0, 1]).assert_error(409, "conflict");
    index(&[0, 2]).assert_error(409, "conflict");
    index(&[0, 3]).ok();
    server
        .delete(&format!(
            "/v1/flows/docs/items/v%2Fitem?version={}",
            pct(&b64(&[0, 1]))
        ))
        .assert_error(409, "conflict");
    push(
        &server,
        "docs",
        json!({ "name": "v/item", "type": "REQUEUE" }),
    )
    .assert_error(409, "not_reserved");
    push(
        &server,
        "docs",
        json!({ "name": "unknown", "type": "NOT_MODIFIED" }),
    )
    .assert_error(404, "item_not_found");

    // A batch applies what it can and says which items were refused.
    let batch = server
        .post(
            "/v1/flows/docs/items:push",
            &json!({ "items": [
                { "name": "b1", "contentHash": "h" },
                { "name": "unknown", "type": "REQUEUE" },
            ]}),
        )
        .ok();
    assert_eq!(batch["items"][0]["status"], "NEW_ITEM", "{batch}");
    assert_eq!(
        batch["items"][1]["error"]["code"], "item_not_found",
        "{batch}"
    );

    // The counters saw the failures too, and bad input never produced a 5xx.
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("freshindex_api_request_errors_total{verb=\"push\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    let (status, stderr) = server.stop();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("internal error"), "{stderr}");
}

#[test]
fn a_token_guards_everything_but_healthz() {
    let ws = push_workspace();
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0"],
        &[("FRESHINDEX_TOKEN", "s3cret-token")],
    )
    .unwrap_or_else(|f| panic!("{f:?}"));
    let path = "/v1/flows/docs/items";
    let r = common::http::http(server.addr, "GET", path, &[], b"");
    let m = r.assert_error(401, "unauthorized");
    assert!(m.contains("Bearer"), "{m}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    for wrong in [
        "Bearer s3cret-tokem",
        "Bearer s3cret",
        "Basic czNjcmV0LXRva2Vu",
        "s3cret-token",
    ] {
        common::http::http(server.addr, "GET", path, &[("Authorization", wrong)], b"")
            .assert_error(401, "unauthorized");
    }
    common::http::http(server.addr, "GET", "/metrics", &[], b"").assert_error(401, "unauthorized");
    let open = common::http::http(server.addr, "GET", "/healthz", &[], b"");
    assert_eq!(open.status, 200, "{}", open.body);
    // The right token, any case of the scheme.
    common::http::http(
        server.addr,
        "GET",
        path,
        &[("Authorization", "bearer s3cret-token")],
        b"",
    )
    .ok();
    server.get(path).ok();
    server.stop();
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let ws = push_workspace();
    let failure = match Server::start_with(&ws, &ws.data(), &["--listen", "0.0.0.0:0"], &[]) {
        Ok(_) => panic!("serve started on 0.0.0.0 without a token"),
        Err(f) => f,
    };
    assert_eq!(failure.status.code(), Some(1), "{failure:?}");
    assert!(failure.stderr.contains("without a token"), "{failure:?}");
    assert!(failure.stderr.contains("--token"), "{failure:?}");
    // With a token it starts.
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "0.0.0.0:0", "--token", "t0ken"],
        &[],
    )
    .unwrap_or_else(|f| panic!("{f:?}"));
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let r = common::http::http(
        local,
        "GET",
        "/v1/flows",
        &[("Authorization", "Bearer t0ken")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop();
}

#[test]
fn sigterm_releases_the_leases_of_the_server() {
    let ws = push_workspace();
    let server = Server::start(&ws);
    for k in ["a", "b", "c", "d"] {
        push(
            &server,
            "docs",
            json!({ "name": k, "contentHash": format!("h-{k}") }),
        )
        .ok();
    }
    let polled = server
        .post("/v1/flows/docs/items:poll", &json!({ "limit": 2 }))
        .ok();
    assert_eq!(polled["items"].as_array().expect("items").len(), 2);
    let owner = polled["items"][0]["leaseOwner"]
        .as_str()
        .expect("owner")
        .to_string();
    assert_eq!(owner, format!("http-{}", server.pid()));
    let named = server
        .post(
            "/v1/flows/docs/items:poll",
            &json!({ "limit": 1, "owner": "worker-7" }),
        )
        .ok();
    assert_eq!(named["items"][0]["leaseOwner"], "worker-7");
    let leased = server.get("/v1/flows/docs/items").ok();
    let n_leased = leased["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["leased"] == true)
        .count();
    assert_eq!(n_leased, 3);

    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "serve exited with {status}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("released 3 leases"), "{stderr}");

    // Nothing lost, nothing still leased.
    let out = ws
        .fi()
        .args(["queue", "list", "--flow", "docs", "--json"])
        .run()
        .ok();
    let items = out.json()["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), 4, "{items:?}");
    for it in &items {
        assert_eq!(it["status"], "NEW_ITEM", "{it}");
        assert_eq!(it["leased"], false, "{it}");
    }
    // A new server hands all four out at once.
    let server = Server::start(&ws);
    let again = server
        .post("/v1/flows/docs/items:poll", &json!({ "limit": 10 }))
        .ok();
    assert_eq!(again["items"].as_array().expect("items").len(), 4);
    server.stop();
}

#[test]
fn concurrent_pollers_never_get_the_same_item() {
    let ws = push_workspace();
    let server = Server::start(&ws);
    let items: Vec<Value> = (0..60)
        .map(|i| json!({ "name": format!("item-{i:02}"), "contentHash": "h" }))
        .collect();
    server
        .post("/v1/flows/docs/items:push", &json!({ "items": items }))
        .ok();
    let handed_out: Vec<Vec<String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let server = &server;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let polled = server
                            .post(
                                "/v1/flows/docs/items:poll",
                                &json!({ "limit": 3, "owner": format!("worker-{w}") }),
                            )
                            .ok();
                        let polled = polled["items"].as_array().expect("items").clone();
                        if polled.is_empty() {
                            return mine;
                        }
                        mine.extend(
                            polled
                                .iter()
                                .map(|i| i["name"].as_str().expect("name").to_string()),
                        );
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let all: Vec<&String> = handed_out.iter().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), 60, "every item handed out once: {handed_out:?}");
    assert_eq!(
        distinct.len(),
        60,
        "no item handed out twice: {handed_out:?}"
    );
    let (status, stderr) = server.stop();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("released 60 leases"), "{stderr}");
}

/// `{flow}:run`, `:resetItems`, `:reset`, `status` and `history` of a files flow, beside a
/// push flow that cannot run.
#[test]
fn runs_resets_status_and_history_of_a_files_flow() {
    let ws = Workspace::new(common::FlowConfig {
        name: "files".into(),
        ..common::FlowConfig::default()
    });
    let config = std::fs::read_to_string(ws.config_path()).expect("read config");
    std::fs::write(
        ws.config_path(),
        format!("{config}\n{}", common::http::PUSH_FLOW_TOML),
    )
    .expect("write config");
    ws.write("a.md", "# Alpha\n\nThe river runs past the stone garden.\n");
    ws.write(
        "b.md",
        "# Beta\n\nA lantern in the harbor, a beacon on the summit.\n",
    );
    ws.write("sub/c.txt", "Copper and cobalt under the glacier.\n");
    let server = Server::start(&ws);

    let first = server.post("/v1/flows/files:run", &json!({})).ok();
    assert_eq!(first["flow"], "files", "{first}");
    assert_eq!(first["status"], "success", "{first}");
    assert_eq!(first["items"]["seen"], 3, "{first}");
    assert_eq!(first["items"]["new"], 3, "{first}");
    assert!(first["rows"]["added"].as_u64().unwrap() >= 3, "{first}");
    assert!(
        first["embeddings"]["computed"].as_u64().unwrap() >= 3,
        "{first}"
    );

    let status = server.get("/v1/flows/files/status").ok();
    assert_eq!(status["flow"], "files", "{status}");
    assert_eq!(status["collection"], "files", "{status}");
    assert_eq!(status["rows"], first["rows"]["total"], "{status}");
    assert!(status["cacheEntries"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(status["lastRun"]["items"]["new"], 3, "{status}");
    let hist = status["history"].as_array().expect("history array");
    assert_eq!(hist.len(), 1, "{status}");
    assert_eq!(hist[0]["trigger"], "manual", "{status}");
    assert_eq!(hist[0]["status"], "success", "{status}");
    let runs = server.get("/v1/flows/files/history?limit=5").ok();
    assert_eq!(runs["runs"], status["history"], "{runs}");
    server
        .get("/v1/flows/files/history?limit=51")
        .assert_error(422, "invalid_argument");

    // Reprocess exactly one item.
    let items = server.get("/v1/flows/files/items").ok();
    let items = items["items"].as_array().expect("items array");
    assert_eq!(items.len(), 3, "{items:?}");
    let key = items[0]["name"].as_str().expect("name").to_string();
    let requeued = server
        .post(
            "/v1/flows/files:resetItems",
            &json!({ "names": [key, "no/such/item"] }),
        )
        .ok();
    assert_eq!(requeued["requeued"], 1, "{requeued}");
    assert_eq!(requeued["unknown"], json!(["no/such/item"]), "{requeued}");
    let again = server.post("/v1/flows/files:run", &json!({})).ok();
    assert_eq!(again["items"]["modified"], 1, "{again}");
    assert_eq!(again["items"]["new"], 0, "{again}");
    assert_eq!(again["embeddings"]["computed"], 0, "{again}");
    server
        .post("/v1/flows/files:resetItems", &json!({ "names": [] }))
        .assert_error(422, "invalid_argument");

    // Forget everything: the next run reprocesses every item, embeddings from the cache.
    let reset = server.post("/v1/flows/files:reset", &json!({})).ok();
    assert_eq!(reset["flow"], "files", "{reset}");
    assert_eq!(reset["reset"], true, "{reset}");
    let all = server.post("/v1/flows/files:run", &json!({})).ok();
    assert_eq!(all["items"]["new"], 3, "{all}");
    assert_eq!(all["embeddings"]["computed"], 0, "{all}");
    assert!(all["embeddings"]["reused"].as_u64().unwrap() >= 3, "{all}");
    let runs = server.get("/v1/flows/files/history").ok();
    // Three runs, a reset of items and a reset, newest first.
    let runs = runs["runs"].as_array().expect("runs array");
    assert_eq!(runs.len(), 5, "{runs:?}");
    assert_eq!(runs[1]["trigger"], "reset", "{runs:?}");

    // A push flow takes no runs; unknown flows and methods are 404.
    let msg = server
        .post("/v1/flows/docs:run", &json!({}))
        .assert_error(422, "invalid_argument");
    assert!(msg.contains("push source"), "{msg}");
    server
        .post("/v1/flows/nope:run", &json!({}))
        .assert_error(404, "flow_not_found");
    server
        .get("/v1/flows/nope/status")
        .assert_error(404, "flow_not_found");
    server
        .post("/v1/flows/files:explode", &json!({}))
        .assert_error(404, "route_not_found");
}
