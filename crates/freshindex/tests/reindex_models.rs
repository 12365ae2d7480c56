//! Reindex tasks through a real `serve`: from the built-in model to all-MiniLM-L6-v2 with a
//! blue/green switch under a concurrent searcher, failed items and their retry, a server
//! killed in the middle of a task, and conflicts.
//!
//! The MiniLM test needs the model folder in `FRESHINDEX_TEST_MINILM` (`scripts/test` installs
//! it: see `scripts/fetch-test-model`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::http::Server;
use common::{FlowConfig, Rng, Workspace, paragraph};

fn minilm() -> String {
    std::env::var("FRESHINDEX_TEST_MINILM").unwrap_or_else(|_| {
        panic!(
            "FRESHINDEX_TEST_MINILM is not set: run scripts/fetch-test-model (scripts/test does) and export the folder it prints"
        )
    })
}

/// Waits until task `id` ends; returns it.
fn wait_task(server: &Server, id: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let t = server.get(&format!("/v1/tasks/{id}")).ok();
        match t["status"].as_str() {
            Some("succeeded" | "failed" | "canceled") => return t,
            _ if Instant::now() > deadline => panic!(
                "task {id} did not end within {within:?}: {t}\nserver stderr:\n{}",
                server.stderr()
            ),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn corpus(ws: &Workspace, n: usize) {
    let mut rng = Rng::new(7);
    for i in 0..n {
        ws.write(format!("doc{i:03}.md"), paragraph(&mut rng, 60));
    }
    ws.write(
        "quokka.md",
        "The quokka is a small marsupial that lives on Rottnest Island near Perth.",
    );
}

fn search(server: &Server, query: &str) -> Value {
    server
        .post(
            "/v1/flows/docs/search",
            &json!({ "query": query, "limit": 3 }),
        )
        .ok()
}

#[test]
fn blue_reindex_to_minilm_switches_without_a_failed_search_and_rolls_back() {
    let model = format!("local:{}", minilm());
    let ws = Workspace::new(FlowConfig::default());
    corpus(&ws, 300);
    ws.index();
    let server = Arc::new(Server::start(&ws));

    // A searcher throughout: never an error, never an empty answer, and every answer from one
    // collection read with that collection's own model.
    let stop = Arc::new(AtomicBool::new(false));
    let searcher = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<(String, String)> = Vec::new();
            let mut problems: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = server.post(
                    "/v1/flows/docs/search",
                    &json!({ "query": "a small marsupial living on an island", "limit": 3 }),
                );
                if r.status != 200 {
                    problems.push(format!("HTTP {}: {}", r.status, r.body));
                    continue;
                }
                let v = r.json();
                let (m, c) = (
                    v["model"].as_str().unwrap_or("").to_string(),
                    v["collection"].as_str().unwrap_or("").to_string(),
                );
                if v["hits"].as_array().is_none_or(|h| h.is_empty()) {
                    problems.push(format!("empty answer: {v}"));
                }
                let consistent = (m == "builtin" && (c == "docs" || c == "docs.t0"))
                    || (m.starts_with("local:") && c.starts_with("docs.t") && c != "docs.t0");
                if !consistent {
                    problems.push(format!("model {m} read collection {c}"));
                }
                if seen.last() != Some(&(m.clone(), c.clone())) {
                    seen.push((m, c));
                }
            }
            (seen, problems)
        })
    };

    let created = server.post(
        "/v1/tasks/reindex",
        &json!({ "flow": "docs", "to": model, "deployAsBlue": true, "batchSize": 40 }),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_u64().expect("task id");

    // An edit while the task works reaches the flow's serving collection at once (a run),
    // and the new collection by the switch.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = server.get(&format!("/v1/tasks/{id}")).ok();
        if t["total"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the task never planned: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    ws.write(
        "axolotl.md",
        "The axolotl is a salamander that keeps its larval gills for its whole life.",
    );
    server.post("/v1/flows/docs:run", &json!({})).ok();

    let t = wait_task(&server, id, Duration::from_secs(600));
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["total"], 301, "{t}");
    assert_eq!(t["count"], 301, "{t}");
    assert_eq!(t["progress"], 1.0);
    assert_eq!(t["failedCount"], 0);
    assert_eq!(t["children"].as_array().map(Vec::len), Some(8), "{t}");
    assert_eq!(t["switched"], true);
    let new = t["newCollection"]
        .as_str()
        .expect("new collection")
        .to_string();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (seen, problems) = searcher.join().expect("searcher");
    assert!(problems.is_empty(), "searches went wrong: {problems:?}");
    assert_eq!(
        seen.first().map(|s| s.0.as_str()),
        Some("builtin"),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().map(|s| s.1.as_str()),
        Some(new.as_str()),
        "{seen:?}"
    );

    // After the switch: the new model answers, and the edit made during the task is there.
    let r = search(&server, "which amphibian keeps its gills as an adult");
    assert_eq!(r["model"].as_str(), Some(model.as_str()), "{r}");
    assert_eq!(r["hits"][0]["name"], "axolotl.md", "{r}");
    let r = search(&server, "a small marsupial living on an island");
    assert_eq!(r["hits"][0]["name"], "quokka.md", "{r}");
    let minilm_score = r["hits"][0]["score"].as_f64().expect("score");

    // Rollback: the built-in model's collection serves again, up to date.
    let rb = server.post("/v1/flows/docs:rollback", &json!({})).ok();
    assert_eq!(rb["collection"], "docs.t0", "{rb}");
    let r = search(&server, "which amphibian keeps its gills as an adult");
    assert_eq!(r["model"], "builtin", "{r}");
    assert_eq!(r["collection"], "docs.t0", "{r}");
    let r = search(&server, "a small marsupial living on an island");
    assert!(
        (r["hits"][0]["score"].as_f64().expect("score") - minilm_score).abs() > 1e-6,
        "the old model's scores are back: {r}"
    );
    let names = server.get("/v1/collections").ok();
    assert!(
        names.to_string().contains(&new),
        "the new collection is kept: {names}"
    );
}

#[test]
fn failed_items_keep_the_old_collection_until_they_are_retried() {
    let ws = Workspace::new(FlowConfig::default());
    corpus(&ws, 20);
    ws.write("bad1.md", "this text carries the POISON marker");
    ws.write("bad2.md", "and so does this one: POISON");
    ws.index();
    let fail = ws.root().join("fail-markers");
    std::fs::write(&fail, "").expect("marker file");
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0"],
        &[(
            "FRESHINDEX_EMBED_FAIL_FILE",
            fail.to_str().expect("utf-8 path"),
        )],
    )
    .unwrap_or_else(|f| panic!("server did not start: {f:?}"));
    // The model now refuses the marked texts.
    std::fs::write(&fail, "POISON\n").expect("marker file");
    let created = server.post(
        "/v1/tasks/reindex",
        &json!({ "flow": "docs", "to": "builtin", "deployAsBlue": true, "batchSize": 5, "maxFailedItems": 0 }),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_u64().expect("id");
    let t = wait_task(&server, id, Duration::from_secs(120));
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["switched"], false);
    assert_eq!(t["count"], 23, "{t}");
    assert_eq!(t["failedCount"], 2, "{t}");
    let failed: Vec<(&str, &str)> = t["failedItems"]
        .as_array()
        .expect("failed items")
        .iter()
        .map(|f| {
            (
                f["item"].as_str().unwrap_or(""),
                f["stage"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![("bad1.md", "embed"), ("bad2.md", "embed")],
        "{t}"
    );
    // Each item's own error (the model names the text it refused).
    for (i, text) in [(0, "this text carries"), (1, "and so does this one")] {
        assert!(
            t["failedItems"][i]["error"]
                .as_str()
                .is_some_and(|e| e.contains(text)),
            "{t}"
        );
    }
    assert!(
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("maxFailedItems")),
        "{t}"
    );
    // Not switched: the flow's collection is its own.
    let r = search(&server, "marsupial");
    assert_eq!(r["collection"], "docs", "{r}");

    // The model is healed; the failed items go again and the task switches.
    std::fs::write(&fail, "").expect("marker file");
    let retried = server
        .post(&format!("/v1/tasks/{id}:retryFailed"), &json!({}))
        .ok();
    assert_eq!(retried["status"], "pending", "{retried}");
    let t = wait_task(&server, id, Duration::from_secs(120));
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["failedCount"], 0, "{t}");
    assert_eq!(t["count"], 23, "{t}");
    assert_eq!(t["switched"], true, "{t}");
    let r = search(&server, "POISON marker");
    assert_eq!(r["collection"], t["newCollection"], "{r}");
    assert!(
        r["hits"]
            .as_array()
            .expect("hits")
            .iter()
            .any(|h| h["name"] == "bad1.md"),
        "{r}"
    );
    // A task that ended cannot be canceled; an unknown one is 404.
    server
        .post(&format!("/v1/tasks/{id}:cancel"), &json!({}))
        .assert_error(409, "conflict");
    server
        .get("/v1/tasks/999999")
        .assert_error(404, "not_found");
}

#[test]
fn a_task_resumes_after_its_server_is_killed_and_conflicts_are_named() {
    let ws = Workspace::new(FlowConfig::default());
    corpus(&ws, 39);
    ws.index();
    let before = ws.export();
    let resume = ws.root().join("never");
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0"],
        &[
            ("FRESHINDEX_FAILPOINT", "reindex-batch-done:2"),
            (
                "FRESHINDEX_FAILPOINT_RESUME",
                resume.to_str().expect("utf-8"),
            ),
        ],
    )
    .unwrap_or_else(|f| panic!("server did not start: {f:?}"));
    let created = server.post(
        "/v1/tasks/reindex",
        &json!({ "flow": "docs", "to": "builtin", "deployAsBlue": true, "batchSize": 10 }),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_u64().expect("id");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server
        .stderr()
        .contains("failpoint reindex-batch-done reached")
    {
        assert!(
            Instant::now() < deadline,
            "no failpoint: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // While it runs: a second task is refused naming it, or waits when asked to.
    let refused = server.post(
        "/v1/tasks/reindex",
        &json!({ "flow": "docs", "to": "builtin", "deployAsBlue": true }),
    );
    let msg = refused.assert_error(409, "conflict");
    assert!(msg.contains(&format!("task {id}")), "{msg}");
    let waiting = server.post(
        "/v1/tasks/reindex",
        &json!({ "flow": "docs", "to": "builtin", "deployAsBlue": true, "waitOnConflict": true }),
    );
    assert_eq!(waiting.status, 201, "{}", waiting.body);
    assert_eq!(waiting.json()["status"], "waiting");
    let second = waiting.json()["id"].as_u64().expect("id");
    let t = server.get(&format!("/v1/tasks/{id}")).ok();
    assert_eq!(
        (t["status"].as_str(), t["count"].as_u64()),
        (Some("running"), Some(20)),
        "{t}"
    );

    // kill -9 in the middle of the task.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    drop(server);

    let server = Server::start(&ws);
    let t = wait_task(&server, id, Duration::from_secs(120));
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(
        (t["total"].as_u64(), t["count"].as_u64()),
        (Some(40), Some(40)),
        "{t}"
    );
    let subs: Vec<u64> = t["subtasks"]
        .as_array()
        .expect("subtasks")
        .iter()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(subs, vec![10, 10, 10, 10], "{t}");
    // Then the waiting task runs.
    let t2 = wait_task(&server, second, Duration::from_secs(120));
    assert_eq!(t2["status"], "succeeded", "{t2}");
    let list = server.get("/v1/tasks?flow=docs").ok();
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(2), "{list}");
    server.stop();
    // The same model: the switched collection holds exactly what the flow held.
    assert_eq!(ws.export(), before);
}

#[test]
fn the_cli_runs_a_task_rolls_it_back_and_names_a_missing_model() {
    let ws = Workspace::new(FlowConfig::default());
    corpus(&ws, 12);
    ws.index();
    let before = ws.export();
    let t = ws
        .fi()
        .args([
            "reindex",
            "--flow",
            "docs",
            "--to",
            "builtin",
            "--blue",
            "--batch-size",
            "5",
            "--json",
        ])
        .run()
        .ok()
        .json();
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(
        (t["total"].as_u64(), t["count"].as_u64()),
        (Some(13), Some(13)),
        "{t}"
    );
    assert_eq!(t["children"].as_array().map(Vec::len), Some(3), "{t}");
    let new = t["newCollection"].as_str().expect("collection").to_string();
    let list = ws
        .fi()
        .args(["collections", "list", "--json"])
        .run()
        .ok()
        .stdout;
    assert!(list.contains(&new) && list.contains("docs.t0"), "{list}");
    assert_eq!(ws.export(), before, "the same model: the same rows");
    let out = ws
        .fi()
        .args(["reindex", "rollback", "--flow", "docs"])
        .run()
        .ok();
    assert!(out.stdout.contains("docs.t0"), "{}", out.stdout);
    let out = ws.fi().args(["reindex", "list"]).run().ok();
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);

    // A model that is not there: the error says where it looked, and nothing changed.
    let empty = ws.root().join("empty-hf-home");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = ws
        .fi()
        .env("HF_HOME", &empty)
        .env("HF_HUB_CACHE", empty.join("hub"))
        .args([
            "reindex",
            "--flow",
            "docs",
            "--to",
            "hf:nobody/nothing",
            "--blue",
        ])
        .run()
        .failed();
    assert!(
        out.stderr.contains("nobody/nothing") && out.stderr.contains(&*empty.to_string_lossy()),
        "{}",
        out.stderr
    );
    assert_eq!(ws.export(), before);
}
