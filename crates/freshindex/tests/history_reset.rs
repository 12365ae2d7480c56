//! The execution history and resets, through the real binary: every run is recorded with its
//! trigger, status and counts (also a run that cannot run, and one killed mid-write, which
//! the next run marks interrupted); `reset` and `reset --items` make the next run reprocess
//! exactly what they say — from the embedding cache unless it was dropped — and the target
//! ends as a from-scratch index would build it.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use serde_json::Value;

use common::{FlowConfig, Summary, TIMEOUT, Workspace, line_count};

/// Files every tree starts with: several chunks each, so that rows outnumber items.
fn write_notes(ws: &Workspace, n: usize) {
    for i in 0..n {
        let mut text = format!("# Note {i}\n\n");
        for p in 0..4 {
            text.push_str(&format!(
                "Paragraph {p} of note {i} talks about lighthouse {i} and tide pool {p}. {}\n\n",
                "Sea glass gathers where the waves slow down. ".repeat(8)
            ));
        }
        ws.write(format!("n{i}.md"), text);
    }
}

/// `history --json` of the workspace's data directory, newest first.
fn history(ws: &Workspace) -> Vec<Value> {
    history_of(ws.fi().args(["history", "--json", "--limit", "100"]).run())
}

fn history_of(out: common::Outcome) -> Vec<Value> {
    out.ok()
        .json()
        .as_array()
        .cloned()
        .expect("history --json prints an array")
}

fn n(v: &Value, path: &str) -> u64 {
    let mut at = v;
    for part in path.split('.') {
        at = &at[part];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("`{path}` is not a count in {v}"))
}

fn reset(ws: &Workspace, args: &[&str]) -> Value {
    ws.fi()
        .args(["reset", "--json"])
        .args(args)
        .run()
        .ok()
        .json()
}

#[test]
fn runs_are_recorded_with_trigger_status_and_counts() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 3);
    let first = ws.index();
    let h = history(&ws);
    assert_eq!(h.len(), 1, "{h:?}");
    let e = &h[0];
    assert_eq!(
        (&e["flow"], &e["trigger"], &e["status"], &e["message"]),
        (
            &Value::from("docs"),
            &Value::from("manual"),
            &Value::from("success"),
            &Value::Null
        ),
        "{e}"
    );
    assert_eq!(n(e, "items.processed"), 3, "{e}");
    assert_eq!(n(e, "items.new"), 3, "{e}");
    assert_eq!(n(e, "items.failed"), 0, "{e}");
    for counter in [
        "rows.added",
        "rows.updated",
        "rows.deleted",
        "embeddings.computed",
        "embeddings.reused",
    ] {
        assert_eq!(n(e, counter), first.n(counter), "{counter}: {e}");
    }
    assert!(n(e, "rows.added") > 3, "several chunks per note: {e}");
    let (started, finished) = (n(e, "started_at_ms"), n(e, "finished_at_ms"));
    assert!(finished >= started, "{e}");
    assert_eq!(n(e, "duration_ms"), finished - started, "{e}");
    assert_eq!(e["errors"], Value::Array(vec![]), "{e}");

    // A run with nothing to do is recorded too, newest first.
    ws.index();
    let h = history(&ws);
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(n(&h[0], "id") > n(&h[1], "id"));
    assert_eq!(n(&h[0], "items.processed"), 0, "{}", h[0]);
    assert_eq!(n(&h[0], "items.unchanged"), 3, "{}", h[0]);
    assert_eq!(n(&h[0], "embeddings.computed"), 0, "{}", h[0]);
    let limited = history_of(ws.fi().args(["history", "--json", "--limit", "1"]).run());
    assert_eq!(limited, h[..1]);
    let named = history_of(ws.fi().args(["history", "docs", "--json"]).run());
    assert_eq!(named, h, "the flow as a positional argument");
    let unknown = ws.fi().args(["history", "nope"]).run().failed();
    assert!(unknown.stderr.contains("nope"), "{}", unknown.stderr);

    let table = ws.fi().args(["history"]).run().ok().stdout;
    for needle in ["flow docs", "STATUS", "manual", "success", "3/0"] {
        assert!(table.contains(needle), "{needle:?} in:\n{table}");
    }
    assert_eq!(
        table.lines().count(),
        4,
        "flow line, header, two runs:\n{table}"
    );
}

#[test]
fn failed_items_over_max_failed_items_are_a_persistent_failure() {
    let ws = Workspace::new(FlowConfig::default());
    fs::write(
        ws.config_path(),
        format!("{}max_failed_items = 0\n", ws.flow.to_toml()),
    )
    .expect("config");
    write_notes(&ws, 2);
    ws.write("secret.md", "# Secret\n\nNobody may read this.\n");
    let fi = common::unprivileged_fi(&ws);
    fs::set_permissions(
        ws.src().join("secret.md"),
        fs::Permissions::from_mode(0o000),
    )
    .expect("chmod 000");
    let out = fi().args(["index", "--json"]).run();
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);

    let h = history_of(fi().args(["history", "--json"]).run());
    let e = &h[0];
    assert_eq!(e["status"], "persistentFailure", "{e}");
    assert_eq!(n(e, "items.failed"), 1, "{e}");
    assert_eq!(n(e, "items.processed"), 3, "{e}");
    assert_eq!(e["errors"][0]["item"], "secret.md", "{e}");
    assert!(
        e["errors"][0]["error"]
            .as_str()
            .is_some_and(|m| m.contains("Permission denied")),
        "{e}"
    );
    assert_eq!(e["message"], Value::Null, "the run itself completed: {e}");

    // Readable again: the failed item is retried and the run succeeds.
    fs::set_permissions(
        ws.src().join("secret.md"),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod back");
    fi().args(["index", "--json"]).run().ok();
    let h = history_of(fi().args(["history", "--json"]).run());
    assert_eq!(h[0]["status"], "success", "{}", h[0]);
    assert_eq!(n(&h[0], "items.processed"), 1, "{}", h[0]);
}

#[test]
fn a_run_whose_source_is_missing_is_an_error_entry() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 2);
    ws.index();
    fs::rename(ws.src(), ws.root().join("moved-away")).expect("move the source away");
    let out = ws.fi().args(["index", "--json"]).run().failed();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);

    let h = history(&ws);
    assert_eq!(h.len(), 2, "{h:?}");
    let e = &h[0];
    assert_eq!(e["status"], "persistentFailure", "a user error: {e}");
    assert_eq!(e["trigger"], "manual", "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("docs"), "names the source: {e}");
    assert!(
        out.stderr.contains(message),
        "the history keeps the error the run printed: {message:?} vs {}",
        out.stderr
    );
    for counter in ["items", "rows", "embeddings", "finished_at_ms"] {
        let want_null = counter != "finished_at_ms";
        assert_eq!(e[counter].is_null(), want_null, "{counter}: {e}");
    }
    assert_eq!(h[1]["status"], "success");
    // `status` still shows the last run that completed.
    let status = ws
        .fi()
        .args(["status", "--json", "--flow", "docs"])
        .run()
        .ok()
        .json();
    assert_eq!(status["last_run"]["status"], "success", "{status}");
}

#[test]
fn reset_reprocesses_every_item_from_the_cache() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 5);
    let first = ws.index();
    let before = ws.export();
    let rows = first.n("rows.total");

    let r = reset(&ws, &[]);
    assert_eq!(
        (n(&r, "items"), n(&r, "rows_deleted"), &r["cache_dropped"]),
        (5, rows, &Value::Bool(false)),
        "{r}"
    );
    assert_eq!(ws.export(), "", "the target is empty until the next run");
    let status = ws.fi().args(["status", "--json"]).run().ok().json();
    assert!(
        status["items"]
            .as_object()
            .is_some_and(|m| m.values().all(|v| v == 0)),
        "{status}"
    );
    assert!(
        n(&status, "cache_entries") > 0,
        "the cache is kept: {status}"
    );

    let s = ws.index();
    assert_eq!(s.n("items.new"), 5, "{}", s.0);
    assert_eq!(s.n("embeddings.computed"), 0, "{}", s.0);
    assert_eq!(s.n("embeddings.reused"), first.n("embeddings.computed"));
    assert_eq!(s.n("rows.added"), rows, "{}", s.0);
    assert_eq!(ws.export(), before);

    let h = history(&ws);
    let triggers: Vec<(&str, &str)> = h
        .iter()
        .map(|e| {
            (
                e["trigger"].as_str().unwrap_or(""),
                e["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        triggers,
        [
            ("manual", "success"),
            ("reset", "reset"),
            ("manual", "success")
        ]
    );
    let note = h[1]["message"].as_str().unwrap_or_default();
    assert!(note.contains("forgot 5 item"), "{note}");
    // The next run has nothing to do again.
    let again = ws.index();
    assert_eq!(again.n("items.unchanged"), 5, "{}", again.0);
}

#[test]
fn reset_drop_cache_recomputes_every_embedding() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 4);
    let first = ws.index();
    let before = ws.export();
    let r = reset(&ws, &["--drop-cache"]);
    assert_eq!(r["cache_dropped"], true, "{r}");
    assert!(n(&r, "cache_entries") > 0, "{r}");
    let status = ws.fi().args(["status", "--json"]).run().ok().json();
    assert_eq!(n(&status, "cache_entries"), 0, "{status}");
    let s = ws.index();
    assert_eq!(s.n("items.new"), 4, "{}", s.0);
    assert_eq!(
        s.n("embeddings.computed"),
        first.n("embeddings.computed"),
        "{}",
        s.0
    );
    assert_eq!(s.n("embeddings.reused"), 0, "{}", s.0);
    assert_eq!(ws.export(), before);
    // --drop-cache applies to a whole reset only.
    ws.fi()
        .args(["reset", "--drop-cache", "--items", "n0.md"])
        .run()
        .failed();
}

#[test]
fn reset_items_reprocesses_exactly_those_items() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 5);
    ws.index();
    let before = ws.export();
    let out = ws
        .fi()
        .args([
            "reset", "--json", "--items", "n1.md", "n3.md", "ghost.md", "n1.md",
        ])
        .run()
        .ok();
    let r = out.json();
    assert_eq!(
        r,
        serde_json::json!({"flow": "docs", "reset": ["n1.md", "n3.md"], "unknown": ["ghost.md"]})
    );
    assert!(out.stderr.contains("ghost.md"), "{}", out.stderr);

    // Unchanged files, yet exactly these two are read and processed again.
    let s = ws.index();
    assert_eq!(s.n("items.modified"), 2, "{}", s.0);
    assert_eq!(s.n("items.unchanged"), 3, "{}", s.0);
    assert_eq!(s.n("items.new"), 0, "{}", s.0);
    assert_eq!(s.n("embeddings.computed"), 0, "{}", s.0);
    assert!(s.n("embeddings.reused") > 0, "{}", s.0);
    for counter in ["rows.added", "rows.updated", "rows.deleted"] {
        assert_eq!(
            s.n(counter),
            0,
            "{counter}: same content, same rows: {}",
            s.0
        );
    }
    assert_eq!(ws.export(), before);
    let again = ws.index();
    assert_eq!(again.n("items.unchanged"), 5, "{}", again.0);

    let h = history(&ws);
    assert_eq!(
        (&h[2]["trigger"], &h[2]["status"]),
        (&Value::from("reset"), &Value::from("reset"))
    );
    let note = h[2]["message"].as_str().unwrap_or_default();
    assert!(
        note.contains("n1.md") && note.contains("ghost.md"),
        "{note}"
    );
    let human = ws
        .fi()
        .args(["reset", "--items", "n0.md"])
        .run()
        .ok()
        .stdout;
    assert!(human.contains("reset 1 item"), "{human}");
}

#[test]
fn reset_is_refused_while_a_run_of_the_flow_is_going() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 3);
    ws.index();
    ws.write("n0.md", "# Note 0\n\nRewritten while nothing runs.\n");
    let (child, resume) = ws.index_paused_after_scan();
    let h = history(&ws);
    assert_eq!(h[0]["status"], "inProgress", "{}", h[0]);
    assert_eq!(h[0]["finished_at_ms"], Value::Null, "{}", h[0]);
    for args in [vec!["reset"], vec!["reset", "--items", "n1.md"]] {
        let out = ws.fi().args(&args).run().failed();
        assert!(
            out.stderr.contains("another run of flow"),
            "{args:?}: {}",
            out.stderr
        );
    }
    fs::write(&resume, "").expect("resume");
    let s = Summary(child.wait(TIMEOUT).ok().json());
    assert_eq!(s.n("items.modified"), 1, "{}", s.0);
    let h = history(&ws);
    assert_eq!(h.len(), 2, "refused resets leave no entry: {h:?}");
    assert_eq!(h[0]["status"], "success", "{}", h[0]);
}

#[test]
fn a_run_killed_mid_write_is_marked_interrupted_by_the_next_run() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 4);
    ws.index();
    ws.write("n2.md", "# Note 2\n\nEdited before the crash.\n");
    let mut child = ws
        .fi()
        .args(["index", "--json"])
        .env("FRESHINDEX_FAILPOINT", "target-written")
        .spawn();
    assert!(
        child.wait_stderr("failpoint target-written reached", TIMEOUT),
        "the run ended before writing"
    );
    assert!(child.kill(), "SIGKILL ended the run");
    let h = history(&ws);
    assert_eq!(h[0]["status"], "inProgress", "{}", h[0]);
    let killed = n(&h[0], "id");

    let s = ws.index();
    assert_eq!(s.status(), "success", "{}", s.0);
    let h = history(&ws);
    assert_eq!(h.len(), 3, "{h:?}");
    assert_eq!(h[0]["status"], "success", "{}", h[0]);
    let e = &h[1];
    assert_eq!(n(e, "id"), killed);
    assert_eq!(e["status"], "transientFailure", "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("interrupted")),
        "{e}"
    );
    assert!(n(e, "finished_at_ms") >= n(e, "started_at_ms"), "{e}");
    assert_eq!(ws.export(), ws.fresh_export());
}

#[test]
fn reset_after_a_crash_mid_write_leaves_no_row_behind() {
    let ws = Workspace::new(FlowConfig::default());
    write_notes(&ws, 4);
    // The very first index is killed after writing rows it never committed: only pending
    // keys know them.
    let mut child = ws
        .fi()
        .args(["index", "--json"])
        .env("FRESHINDEX_FAILPOINT", "target-written")
        .spawn();
    assert!(child.wait_stderr("failpoint target-written reached", TIMEOUT));
    assert!(child.kill());
    assert!(line_count(&ws.export()) > 0, "the killed run wrote rows");

    let r = reset(&ws, &[]);
    assert!(n(&r, "items") > 0, "{r}");
    assert_eq!(ws.export(), "", "no orphan rows");
    let h = history(&ws);
    assert_eq!(
        (&h[0]["status"], &h[1]["status"]),
        (&Value::from("reset"), &Value::from("transientFailure")),
        "the reset found the killed run: {h:?}"
    );
    let s = ws.index();
    assert_eq!(s.n("items.new"), 4, "{}", s.0);
    assert_eq!(ws.export(), ws.fresh_export());
}
