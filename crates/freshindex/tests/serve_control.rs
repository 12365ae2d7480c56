//! `freshindex serve` runs flows by itself: flows defined over HTTP (`PUT`/`GET`/`DELETE
//! /v1/flows/{flow}`), short-interval schedules (a lowered `--min-schedule-interval`) that
//! record successes, skipped occurrences and a failing flow that backs off, and live flows
//! that keep their target exact through creates, edits, renames, deletes and bursts.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::http::Server;
use common::{FlowConfig, TIMEOUT, Workspace};
use serde_json::{Value, json};

/// The flow's history, newest first.
fn history(server: &Server, flow: &str) -> Vec<Value> {
    let h = server
        .get(&format!("/v1/flows/{flow}/history?limit=50"))
        .ok();
    h["runs"].as_array().expect("runs").clone()
}

fn status(server: &Server, flow: &str) -> Value {
    server.get(&format!("/v1/flows/{flow}/status")).ok()
}

/// Waits until `check` holds for the flow's history; returns that history.
fn history_until(
    server: &Server,
    flow: &str,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let h = history(server, flow);
        if check(&h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{flow}: {what} did not happen; history: {h:#?}\nserver stderr:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(h: &[Value], trigger: &str, status: &str) -> usize {
    h.iter()
        .filter(|e| e["trigger"] == trigger && e["status"] == status)
        .count()
}

fn files_flow(path: &Path, extra: Value) -> Value {
    let mut v = json!({ "source": { "type": "files", "path": path } });
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v
}

#[test]
fn flows_are_defined_read_replaced_and_deleted_over_http() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\nAbout otters and their habits.\n");
    let server = Server::start(&ws);

    // Create: 201, stored as sent (defaults filled in), readable with GET. The schedule
    // starts in the future, so that no run starts by itself during the test.
    let def = files_flow(
        &ws.src(),
        json!({ "schedule": { "interval": "PT6H", "start_time": "2099-01-01T00:00:00Z" } }),
    );
    let created = server.put("/v1/flows/notes", &def);
    assert_eq!(created.status, 201, "{}", created.body);
    let created = created.json();
    assert_eq!(created["created"], true);
    let stored = server.get("/v1/flows/notes").ok();
    assert_eq!(stored, created["flow"]);
    assert_eq!(stored["name"], "notes");
    assert_eq!(stored["schedule"]["interval"], "PT6H");
    let listed = server.get("/v1/flows").ok();
    let notes = listed["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .find(|f| f["name"] == "notes")
        .unwrap_or_else(|| panic!("notes not listed: {listed}"))
        .clone();
    assert_eq!(
        notes,
        json!({"name": "notes", "source": "files", "collection": "notes", "mode": "batch",
               "state": "scheduled", "nextRunTime": "2099-01-01T00:00:00Z"})
    );
    // The definition GET returns is one PUT takes.
    let again = server.put("/v1/flows/notes", &stored);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["created"], false);

    let st = status(&server, "notes");
    assert_eq!(st["state"], "scheduled", "{st}");
    assert_eq!(st["schedule"]["interval"], "PT6H", "{st}");
    assert_eq!(
        st["schedule"]["nextRunTime"], "2099-01-01T00:00:00Z",
        "{st}"
    );
    assert_eq!(st["schedule"]["backoff"]["active"], false, "{st}");

    // Run it, search it.
    let run = server.post("/v1/flows/notes:run", &json!({})).ok();
    assert_eq!(run["items"]["new"], 1, "{run}");
    let hits = server
        .post(
            "/v1/flows/notes/search",
            &json!({ "query": "otters", "limit": 1 }),
        )
        .ok();
    assert_eq!(hits["hits"][0]["name"], "a.md", "{hits}");
    let none = server
        .post(
            "/v1/flows/notes/search",
            &json!({ "query": "otters", "sourcePrefix": "b" }),
        )
        .ok();
    assert_eq!(none["hits"], json!([]), "the prefix filters rows: {none}");
    let some = server
        .post(
            "/v1/flows/notes/search",
            &json!({ "query": "otters", "sourcePrefix": "a." }),
        )
        .ok();
    assert_eq!(some["hits"][0]["name"], "a.md", "{some}");

    // Replace: disabled now; the state says so and nothing is scheduled.
    let mut disabled = stored.clone();
    disabled["disabled"] = json!(true);
    assert_eq!(server.put("/v1/flows/notes", &disabled).status, 200);
    let st = status(&server, "notes");
    assert_eq!(st["state"], "disabled", "{st}");
    assert_eq!(st["schedule"]["nextRunTime"], Value::Null, "{st}");
    // On-demand runs still work when disabled.
    server.post("/v1/flows/notes:run", &json!({})).ok();

    // A changed definition applies from the next run, as cheaply as the change allows: a
    // change that does not touch processing recomputes nothing; new chunk sizes re-split.
    let mut lenient = disabled.clone();
    lenient["max_failed_items"] = json!(5);
    assert_eq!(server.put("/v1/flows/notes", &lenient).status, 200);
    let run = server.post("/v1/flows/notes:run", &json!({})).ok();
    assert_eq!(run["embeddings"]["computed"], 0, "{run}");
    assert_eq!(run["items"]["unchanged"], 1, "{run}");
    let mut small = disabled.clone();
    small["steps"] = json!([
        { "op": "parse" },
        { "op": "split", "chunk_size": 20, "chunk_overlap": 0 },
        { "op": "embed", "model": "builtin" },
    ]);
    assert_eq!(server.put("/v1/flows/notes", &small).status, 200);
    let run = server.post("/v1/flows/notes:run", &json!({})).ok();
    assert_eq!(run["items"]["modified"], 1, "{run}");
    assert!(run["rows"]["total"].as_u64() > Some(1), "re-split: {run}");
    assert_eq!(server.put("/v1/flows/notes", &disabled).status, 200);

    // Invalid definitions are refused, naming the field, and change nothing.
    for (body, code, needle) in [
        (
            files_flow(&ws.src(), json!({ "schedule": { "interval": "PT1M" } })),
            "invalid_argument",
            "PT1M",
        ),
        (
            files_flow(&ws.src(), json!({ "schedule": { "interval": "P1M" } })),
            "invalid_argument",
            "P1M",
        ),
        (
            json!({ "source": { "type": "files", "path": "relative/dir" } }),
            "invalid_argument",
            "source.path",
        ),
        (
            json!({ "source": { "type": "push" }, "schedule": { "interval": "PT1H" } }),
            "invalid_argument",
            "push source",
        ),
        (
            files_flow(&ws.src(), json!({ "name": "other" })),
            "invalid_argument",
            "name",
        ),
        (
            files_flow(
                &ws.src(),
                json!({ "target": { "type": "collection", "name": "docs" } }),
            ),
            "invalid_argument",
            "already the target of flow `docs`",
        ),
        (
            json!(["not", "an", "object"]),
            "invalid_body",
            "JSON object",
        ),
    ] {
        let r = server.put("/v1/flows/notes", &body);
        let message = r.assert_error(if code == "invalid_body" { 400 } else { 422 }, code);
        assert!(message.contains(needle), "{body}: {message}");
    }
    assert_eq!(server.get("/v1/flows/notes").ok(), disabled);

    // Delete: the flow, its history and its collection are gone; the name is free again.
    let deleted = server.delete("/v1/flows/notes").ok();
    assert_eq!(deleted["deleted"], true, "{deleted}");
    assert_eq!(deleted["collectionDropped"], true, "{deleted}");
    server
        .get("/v1/flows/notes")
        .assert_error(404, "flow_not_found");
    server
        .get("/v1/flows/notes/history")
        .assert_error(404, "flow_not_found");
    assert!(!ws.data().join("collections/notes.sqlite").exists());
    let created = server.put("/v1/flows/notes", &files_flow(&ws.src(), json!({})));
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(history(&server, "notes").is_empty());
}

#[test]
fn schedules_run_skip_and_back_off_and_a_success_restores_them() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\nAbout herons.\n");
    let resume = ws.root().join("resume");
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0", "--min-schedule-interval", "PT1S"],
        &[
            ("FRESHINDEX_FAILPOINT", "scan-done"),
            (
                "FRESHINDEX_FAILPOINT_RESUME",
                resume.to_str().expect("utf-8"),
            ),
        ],
    )
    .unwrap_or_else(|f| panic!("server did not start: {f:?}"));

    // The first scheduled run stops at the failpoint: the occurrences after it are skipped.
    let slow = files_flow(&ws.src(), json!({ "schedule": { "interval": "PT1S" } }));
    assert_eq!(server.put("/v1/flows/slow", &slow).status, 201);
    let h = history_until(&server, "slow", "two skipped occurrences", |h| {
        count(h, "scheduled", "skipped") >= 2
    });
    assert_eq!(count(&h, "scheduled", "inProgress"), 1, "{h:#?}");
    let skipped = h
        .iter()
        .find(|e| e["status"] == "skipped")
        .expect("skipped entry");
    assert!(
        skipped["message"]
            .as_str()
            .is_some_and(|m| m.contains("still going")),
        "{skipped}"
    );
    let st = status(&server, "slow");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["running"]["trigger"], "scheduled", "{st}");
    // A flow never runs twice at once, and is not redefined under a run.
    let refused = server.post("/v1/flows/slow:run", &json!({}));
    assert!(
        refused
            .assert_error(409, "conflict")
            .contains("in progress")
    );
    let refused = server.put("/v1/flows/slow", &slow);
    assert!(
        refused
            .assert_error(409, "conflict")
            .contains("in progress")
    );
    server
        .delete("/v1/flows/slow")
        .assert_error(409, "conflict");

    fs::write(&resume, "").expect("resume");
    let h = history_until(&server, "slow", "the run to succeed", |h| {
        count(h, "scheduled", "success") >= 2
    });
    assert_eq!(count(&h, "scheduled", "inProgress"), 0, "{h:#?}");

    // A flow whose folder is missing fails every run and backs off: 2 s, then 4 s.
    let missing = ws.root().join("missing");
    let failing = files_flow(&missing, json!({ "schedule": { "interval": "PT1S" } }));
    assert_eq!(server.put("/v1/flows/failing", &failing).status, 201);
    let h = history_until(&server, "failing", "three failed runs", |h| {
        h.iter()
            .filter(|e| e["status"] == "persistentFailure" || e["status"] == "transientFailure")
            .count()
            >= 3
    });
    let starts: Vec<i64> = h
        .iter()
        .filter(|e| e["trigger"] == "scheduled")
        .map(|e| e["started_at_ms"].as_i64().expect("start"))
        .collect();
    assert!(starts.len() >= 3, "{h:#?}");
    // Newest first: the gaps between failed runs grow.
    let gap1 = starts[1] - starts[2];
    let gap2 = starts[0] - starts[1];
    assert!(gap1 >= 1_900, "first backoff {gap1} ms: {h:#?}");
    assert!(gap2 >= 3_900, "second backoff {gap2} ms: {h:#?}");
    assert!(
        h[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing")),
        "the failure names the folder: {}",
        h[0]
    );
    let st = status(&server, "failing");
    assert!(
        st["schedule"]["consecutiveFailures"].as_u64() >= Some(3),
        "{st}"
    );
    assert_eq!(st["schedule"]["backoff"]["active"], true, "{st}");
    assert_ne!(
        st["schedule"]["backoff"]["effectiveInterval"], "PT1S",
        "{st}"
    );

    // The folder appears; a successful on-demand run ends the backoff.
    fs::create_dir_all(&missing).expect("mkdir");
    fs::write(missing.join("b.md"), "# B\n\nAbout kingfishers.\n").expect("write");
    let run = server.post("/v1/flows/failing:run", &json!({})).ok();
    assert_eq!(run["items"]["new"], 1, "{run}");
    let st = status(&server, "failing");
    assert_eq!(st["schedule"]["consecutiveFailures"], 0, "{st}");
    assert_eq!(
        st["schedule"]["backoff"]["effectiveInterval"], "PT1S",
        "{st}"
    );
    history_until(&server, "failing", "a scheduled success", |h| {
        count(h, "scheduled", "success") >= 1
    });

    // A restart keeps the history and the schedule; it serves on.
    let (exit, stderr) = server.stop();
    assert!(exit.success(), "{stderr}");
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0", "--min-schedule-interval", "PT1S"],
        &[],
    )
    .unwrap_or_else(|f| panic!("server did not restart: {f:?}"));
    let before = count(&history(&server, "slow"), "scheduled", "success");
    history_until(&server, "slow", "a scheduled run after the restart", |h| {
        count(h, "scheduled", "success") > before
    });
}

#[test]
fn a_server_refuses_config_schedules_below_its_minimum() {
    let ws = Workspace::new(FlowConfig::default());
    let mut toml = ws.flow.to_toml();
    toml.push_str("schedule = { interval = \"PT1M\" }\n");
    fs::write(ws.config_path(), toml).expect("config");
    let failure = Server::start_with(&ws, &ws.data(), &["--listen", "127.0.0.1:0"], &[])
        .err()
        .expect("the server must refuse the flow");
    assert!(!failure.status.success());
    assert!(
        failure.stderr.contains("PT1M") && failure.stderr.contains("min_schedule_interval"),
        "{}",
        failure.stderr
    );
}

fn settles(ws: &Workspace, server: &Server, what: &str) {
    common::settles(ws, what, &|| format!("server stderr:\n{}", server.stderr()));
}

#[test]
fn a_live_flow_in_serve_follows_every_change() {
    let ws = Workspace::new(FlowConfig::default());
    for i in 0..5 {
        ws.write(
            format!("notes/n{i}.md"),
            format!("# Note {i}\n\nNote {i} is about subject {i}.\n"),
        );
    }
    let server = Server::start(&ws);
    let name = &ws.flow.name;
    // The config's flow, switched to live mode over the API.
    let mut def = server.get(&format!("/v1/flows/{name}")).ok();
    def["mode"] = json!("live");
    def["refresh_interval"] = json!("PT1H");
    assert_eq!(server.put(&format!("/v1/flows/{name}"), &def).status, 200);
    settles(&ws, &server, "initial");
    let st = status(&server, name);
    assert_eq!(st["mode"], "live", "{st}");
    assert_eq!(st["state"], "live", "{st}");
    assert_eq!(st["live"]["state"], "watching", "{st}");

    ws.write("notes/new.md", "# New\n\nA brand new note about rivers.\n");
    settles(&ws, &server, "create");
    ws.write(
        "notes/n1.md",
        "# Note 1\n\nNote 1 now talks about mountains.\n",
    );
    settles(&ws, &server, "edit");
    fs::rename(
        ws.src().join("notes/n2.md"),
        ws.src().join("notes/n2-renamed.md"),
    )
    .expect("rename");
    settles(&ws, &server, "rename");
    fs::remove_file(ws.src().join("notes/n3.md")).expect("delete");
    settles(&ws, &server, "delete");
    for i in 0..1000 {
        ws.write(
            format!("burst/b{:02}/f{i:04}.md", i % 20),
            format!("# Burst {i}\n\nBurst file {i} mentions token{i}.\n"),
        );
    }
    settles(&ws, &server, "burst of 1000 creates");
    for i in (0..1000).step_by(3) {
        fs::remove_file(ws.src().join(format!("burst/b{:02}/f{i:04}.md", i % 20))).expect("delete");
    }
    settles(&ws, &server, "burst of deletes");

    // An on-demand run of a live flow is a full traversal done by its loop.
    let run = server
        .post(&format!("/v1/flows/{name}:run"), &json!({}))
        .ok();
    assert_eq!(run["items"]["new"], 0, "{run}");
    let h = history(&server, name);
    assert_eq!(h[0]["trigger"], "manual", "{h:#?}");
    assert!(count(&h, "live", "success") >= 5, "{h:#?}");
    let st = status(&server, name);
    assert!(st["live"]["batches"].as_u64() >= Some(5), "{st}");

    // Disabled: the loop stops, changes wait for the next run.
    def["disabled"] = json!(true);
    assert_eq!(server.put(&format!("/v1/flows/{name}"), &def).status, 200);
    assert_eq!(status(&server, name)["live"], Value::Null);
    ws.write(
        "notes/late.md",
        "# Late\n\nWritten while the flow is paused.\n",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ws.export().contains("late.md"));
    server
        .post(&format!("/v1/flows/{name}:run"), &json!({}))
        .ok();
    settles(&ws, &server, "on-demand run of a paused live flow");
    let (exit, stderr) = server.stop();
    assert!(exit.success(), "{stderr}");
}
