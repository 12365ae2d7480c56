//! Runs that change where rows go or what is indexed, and races against the file system and
//! against another run: the target still ends equal to a from-scratch index.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;

use common::{FlowConfig, TIMEOUT, Workspace, export_diff, parse_export, sources};

/// Writes the workspace's config with an explicit target collection and size cap.
fn write_config(ws: &Workspace, collection: &str, max_file_size: &str) {
    let text = format!(
        "[[flow]]\nname = \"docs\"\n\
         source = {{ type = \"files\", path = \"docs\", max_file_size = {max_file_size:?} }}\n\
         target = {{ type = \"collection\", name = {collection:?} }}\n"
    );
    fs::write(ws.config_path(), text).expect("write config");
}

fn assert_matches_fresh(ws: &Workspace) -> String {
    let export = ws.export();
    let fresh = ws.fresh_export();
    assert!(export == fresh, "{}", export_diff(&fresh, &export));
    export
}

#[test]
fn a_second_run_of_the_same_flow_is_refused_while_one_runs() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\nSome text about otters.\n");
    let (first, resume) = ws.index_paused_after_scan();
    let second = ws.fi().args(["index", "--json"]).run().failed();
    assert!(
        second.stderr.contains("another run of flow `"),
        "{}",
        second.stderr
    );
    fs::write(&resume, "").expect("resume");
    let s = first.wait(TIMEOUT).ok().summary();
    assert_eq!(s.n("items.new"), 1, "{}", s.0);
    // Once the first run is over, the next one goes ahead.
    ws.index().assert_clean();
}

#[test]
fn another_flow_of_the_data_dir_runs_while_one_is_going() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\nSome text about otters.\n");
    fs::create_dir_all(ws.root().join("other")).expect("mkdir");
    fs::write(ws.root().join("other/b.md"), "# B\n\nAbout voles.\n").expect("write");
    let mut config = ws.flow.to_toml();
    config.push_str(
        "\n[[flow]]\nname = \"other\"\nsource = { type = \"files\", path = \"other\" }\n",
    );
    fs::write(ws.config_path(), config).expect("config");
    let resume = ws.root().join("resume");
    let mut first = ws
        .fi()
        .args(["index", "--flow", "docs", "--json"])
        .env("FRESHINDEX_FAILPOINT", "scan-done")
        .env("FRESHINDEX_FAILPOINT_RESUME", &resume)
        .spawn();
    assert!(first.wait_stderr("failpoint scan-done reached", TIMEOUT));
    // `docs` holds its lock: `other` runs; `docs` again is refused.
    let other = ws
        .fi()
        .args(["index", "--flow", "other", "--json"])
        .run()
        .ok()
        .summary();
    assert_eq!(other.n("items.new"), 1, "{}", other.0);
    let again = ws.fi().args(["index", "--flow", "docs"]).run().failed();
    assert!(
        again.stderr.contains("another run of flow `docs`"),
        "{}",
        again.stderr
    );
    fs::write(&resume, "").expect("resume");
    assert_eq!(first.wait(TIMEOUT).ok().summary().n("items.new"), 1);
}

#[test]
fn switching_the_target_and_back_leaves_no_stale_rows() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("x.md", "# X\n\nThe x document, about badgers.\n");
    ws.write("y.md", "# Y\n\nThe y document, about herons.\n");
    write_config(&ws, "first", "10MiB");
    ws.index().assert_clean();

    // Move to another collection, and delete a file while the flow writes there.
    write_config(&ws, "second", "10MiB");
    fs::remove_file(ws.src().join("x.md")).expect("rm x.md");
    let s = ws.index();
    assert_eq!(
        s.n("embeddings.computed"),
        0,
        "moving reuses the cache: {}",
        s.0
    );
    assert_eq!(s.n("rows.total"), 1, "{}", s.0);
    assert_matches_fresh(&ws);

    // Back to the first collection: x.md's row must not come back from the past.
    write_config(&ws, "first", "10MiB");
    let s = ws.index();
    assert_eq!(s.n("rows.total"), 1, "{}", s.0);
    let export = assert_matches_fresh(&ws);
    assert_eq!(
        sources(&parse_export(&export))
            .into_iter()
            .collect::<Vec<_>>(),
        ["y.md"]
    );
}

#[test]
fn two_flows_cannot_share_a_collection() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\ntext\n");
    fs::create_dir_all(ws.root().join("other")).expect("mkdir");
    fs::write(
        ws.config_path(),
        "[[flow]]\nname = \"one\"\nsource = { type = \"files\", path = \"docs\" }\n\
         target = { type = \"collection\", name = \"shared\" }\n\
         [[flow]]\nname = \"two\"\nsource = { type = \"files\", path = \"other\" }\n\
         target = { type = \"collection\", name = \"shared\" }\n",
    )
    .expect("config");
    let out = ws.fi().args(["index", "--json"]).run().failed();
    assert!(out.stderr.contains("collection `shared`"), "{}", out.stderr);
    assert!(out.stderr.contains(":5:"), "names the line: {}", out.stderr);

    // Across configs too: a flow that ran before keeps its collection.
    fs::write(
        ws.config_path(),
        "[[flow]]\nname = \"one\"\nsource = { type = \"files\", path = \"docs\" }\n\
         target = { type = \"collection\", name = \"shared\" }\n",
    )
    .expect("config");
    ws.fi().args(["index", "--json"]).run().ok();
    fs::write(
        ws.config_path(),
        "[[flow]]\nname = \"two\"\nsource = { type = \"files\", path = \"other\" }\n\
         target = { type = \"collection\", name = \"shared\" }\n",
    )
    .expect("config");
    let out = ws.fi().args(["index", "--json"]).run().failed();
    assert!(out.stderr.contains("flow `one`"), "{}", out.stderr);
}

#[test]
fn changing_max_file_size_reconsiders_files_it_skipped_or_admitted() {
    let ws = Workspace::new(FlowConfig::default());
    let big = format!(
        "# Big\n\n{}\n",
        "Plenty of words about kestrels. ".repeat(120)
    );
    ws.write("big.md", &big);
    ws.write("small.md", "# Small\n\nA short note.\n");
    write_config(&ws, "docs", "1KiB");
    let s = ws.index();
    s.assert_warning("big.md", "max_file_size");
    assert!(!sources(&parse_export(&ws.export())).contains("big.md"));

    write_config(&ws, "docs", "1MiB");
    ws.index().assert_clean();
    assert!(sources(&parse_export(&assert_matches_fresh(&ws))).contains("big.md"));

    write_config(&ws, "docs", "1KiB");
    ws.index();
    assert!(!sources(&parse_export(&assert_matches_fresh(&ws))).contains("big.md"));
}

#[test]
fn a_fifo_swapped_in_after_the_scan_is_skipped_without_hanging() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\nFirst version.\n");
    ws.write("b.md", "# B\n\nStays.\n");
    ws.index().assert_clean();
    ws.write("a.md", "# A\n\nSecond version, seen by the scan.\n");
    let (child, resume) = ws.index_paused_after_scan();
    let a = ws.src().join("a.md");
    fs::remove_file(&a).expect("rm a.md");
    let made = std::process::Command::new("mkfifo")
        .arg(&a)
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    fs::write(&resume, "").expect("resume");
    let s = child.wait(TIMEOUT).ok().summary();
    s.assert_warning("a.md", "not a regular file");
    let export = ws.export();
    let srcs = sources(&parse_export(&export));
    assert!(!srcs.contains("a.md") && srcs.contains("b.md"), "{export}");
}

#[test]
fn a_name_spelling_an_escape_does_not_collide_with_the_escaped_byte() {
    let ws = Workspace::new(FlowConfig::default());
    let literal = ws.src().join("a\\xFF.md");
    let raw = ws.src().join(std::ffi::OsStr::from_bytes(b"a\xff.md"));
    fs::write(&literal, "# Literal\n\nA backslash in the name.\n").expect("write");
    fs::write(&raw, "# Raw\n\nA byte that is not UTF-8 in the name.\n").expect("write");
    let s = ws.index();
    assert_eq!(s.n("items.new"), 2, "{}", s.0);
    assert_eq!(sources(&parse_export(&ws.export())).len(), 2);
    let again = ws.index();
    assert_eq!(again.n("items.unchanged"), 2, "{}", again.0);
    assert_eq!(again.n("embeddings.computed"), 0, "{}", again.0);
}

#[test]
fn a_flow_that_cannot_run_does_not_stop_the_others() {
    let ws = Workspace::new(FlowConfig::default());
    ws.write("a.md", "# A\n\nIndexed although the next flow is broken.\n");
    fs::write(
        ws.config_path(),
        "[[flow]]\nname = \"missing\"\nsource = { type = \"files\", path = \"nowhere\" }\n\
         [[flow]]\nname = \"docs\"\nsource = { type = \"files\", path = \"docs\" }\n",
    )
    .expect("config");
    let out = ws.fi().args(["index", "--json"]).run().failed();
    let all: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON array");
    let runs = all.as_array().expect("array");
    assert_eq!(runs.len(), 2, "{}", out.stdout);
    assert_eq!(runs[0]["flow"], "missing");
    assert_eq!(runs[0]["status"], "error");
    assert!(
        runs[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("nowhere")),
        "{}",
        out.stdout
    );
    assert_eq!(runs[1]["status"], "success");
    assert_eq!(runs[1]["items"]["new"], 1);
    assert!(out.stderr.contains("flow `missing`"), "{}", out.stderr);
}
