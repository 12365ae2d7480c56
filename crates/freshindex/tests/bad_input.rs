//! Bad input: each kind is reported per item (warning or error naming the
//! item key), the run still completes with exit 0, and every good file is
//! indexed. Invalid configs are refused with a precise one-line error.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};

use common::{
    FlowConfig, Summary, TIMEOUT, Workspace, check_chunks, export_diff, parse_export, sources,
    write_file,
};

/// Good files every test tree contains next to the bad one.
const GOOD: &[(&str, &str)] = &[
    (
        "good/one.md",
        "# One\n\nA perfectly ordinary markdown file about lighthouses.\n",
    ),
    ("two.txt", "Plain text about tide pools and sea glass.\n"),
];

fn workspace_with_good_files(flow: FlowConfig) -> Workspace {
    let ws = Workspace::new(flow);
    for (path, content) in GOOD {
        ws.write(path, content);
    }
    ws
}

/// Asserts every good file has rows in the export and returns the export.
fn assert_good_files_indexed(ws: &Workspace) -> String {
    let export = ws.export();
    let srcs = sources(&parse_export(&export));
    for (path, _) in GOOD {
        assert!(srcs.contains(*path), "{path} missing from export: {srcs:?}");
    }
    export
}

fn assert_not_exported(export: &str, item: &str) {
    let srcs = sources(&parse_export(export));
    assert!(
        !srcs.contains(item),
        "{item} should have no rows, export sources: {srcs:?}"
    );
}

/// One skipped file of a given kind: counters, warning and good files.
fn check_single_skip(flow: FlowConfig, item: &str, content: &[u8], needle: &str) {
    let ws = workspace_with_good_files(flow);
    ws.write(item, content);
    let s = ws.index();
    s.assert_warning(item, needle);
    assert_eq!(s.n("items.skipped"), 1, "{}", s.0);
    assert_eq!(s.n("items.failed"), 0, "{}", s.0);
    assert_eq!(s.status(), "success", "{}", s.0);
    let export = assert_good_files_indexed(&ws);
    assert_not_exported(&export, item);
}

#[test]
fn binary_file_is_skipped() {
    check_single_skip(
        FlowConfig::default(),
        "blob.md",
        b"# Looks like markdown\n\0\0\x01\x02 but is not",
        "binary",
    );
}

#[test]
fn invalid_utf8_content_is_skipped() {
    check_single_skip(
        FlowConfig::default(),
        "latin1.md",
        b"# Caf\xe9\n\nna\xefve text in latin-1\n",
        "not valid UTF-8",
    );
}

#[test]
fn empty_file_is_skipped() {
    check_single_skip(FlowConfig::default(), "empty.md", b"", "empty");
}

#[test]
fn file_over_max_file_size_is_skipped() {
    let flow = FlowConfig {
        max_file_size: Some("1KiB".into()),
        ..FlowConfig::default()
    };
    let big = "All work and no play. ".repeat(200);
    check_single_skip(flow, "big.md", big.as_bytes(), "max_file_size");
}

#[test]
fn all_skip_kinds_together_are_counted_exactly() {
    let flow = FlowConfig {
        max_file_size: Some("1KiB".into()),
        ..FlowConfig::default()
    };
    let ws = workspace_with_good_files(flow);
    ws.write("bad/blob.md", b"\0\0\0binary\0");
    ws.write("bad/latin1.txt", b"caf\xe9\n");
    ws.write("bad/empty.md", b"");
    ws.write("bad/big.txt", "x".repeat(4096));
    let s = ws.index();
    s.assert_warning("bad/blob.md", "binary");
    s.assert_warning("bad/latin1.txt", "not valid UTF-8");
    s.assert_warning("bad/empty.md", "empty");
    s.assert_warning("bad/big.txt", "max_file_size");
    assert_eq!(s.n("items.skipped"), 4, "{}", s.0);
    assert_eq!(s.n("items.failed"), 0, "{}", s.0);
    assert!(s.errors().is_empty(), "{}", s.0);
    assert_eq!(s.n("items.new"), GOOD.len() as u64, "{}", s.0);
    let export = assert_good_files_indexed(&ws);
    assert_eq!(sources(&parse_export(&export)).len(), GOOD.len());
}

/// Runs the binary on `ws` so that file permissions apply (see [`common::unprivileged_fi`]);
/// asserts exit 0.
fn unprivileged(ws: &Workspace) -> impl Fn(&[&str]) -> common::Outcome + '_ {
    let fi = common::unprivileged_fi(ws);
    move |args: &[&str]| fi().args(args).run().ok()
}

#[test]
fn unreadable_file_is_a_failed_item_with_the_os_error() {
    let ws = workspace_with_good_files(FlowConfig::default());
    ws.write("secret.md", "# Secret\n\nYou cannot read this.\n");
    let fi = unprivileged(&ws);
    fs::set_permissions(
        ws.src().join("secret.md"),
        fs::Permissions::from_mode(0o000),
    )
    .expect("chmod 000");

    let s = fi(&["index", "--json"]).summary();
    s.assert_error("secret.md", "Permission denied");
    assert_eq!(s.n("items.failed"), 1, "{}", s.0);
    assert_eq!(s.n("items.new"), GOOD.len() as u64, "{}", s.0);

    let export = fi(&["export", "--flow", "docs"]).stdout;
    let srcs = sources(&parse_export(&export));
    for (path, _) in GOOD {
        assert!(srcs.contains(*path), "{path} missing from export: {srcs:?}");
    }
    assert!(!srcs.contains("secret.md"));
}

/// A folder that becomes unreadable keeps its items: the run cannot tell whether its files
/// still exist, so it reports the folder and deletes nothing under it.
#[test]
fn unreadable_folder_keeps_its_items() {
    let ws = workspace_with_good_files(FlowConfig::default());
    ws.write("locked/inner.md", "# Inner\n\nIndexed while readable.\n");
    ws.write(
        "locked/deeper/more.md",
        "# More\n\nAlso indexed while readable.\n",
    );
    let fi = unprivileged(&ws);
    let first = fi(&["index", "--json"]).summary();
    assert_eq!(first.n("items.new"), GOOD.len() as u64 + 2, "{}", first.0);
    let before = fi(&["export", "--flow", "docs"]).stdout;

    // Listable but not enterable (r--), then not even listable (---).
    for mode in [0o644, 0o000] {
        fs::set_permissions(ws.src().join("locked"), fs::Permissions::from_mode(mode))
            .expect("chmod locked");
        let s = fi(&["index", "--json"]).summary();
        assert_eq!(s.n("items.deleted"), 0, "mode {mode:o}: {}", s.0);
        assert!(
            s.0["errors"].as_array().is_some_and(|e| e
                .iter()
                .any(|e| e["item"].as_str().is_some_and(|i| i.starts_with("locked")))),
            "mode {mode:o}: the folder is reported: {}",
            s.0
        );
        assert_eq!(
            fi(&["export", "--flow", "docs"]).stdout,
            before,
            "mode {mode:o}"
        );
    }
    fs::set_permissions(ws.src().join("locked"), fs::Permissions::from_mode(0o777))
        .expect("chmod back");
}

/// Runs `index --json` paused at the `scan-done` failpoint, applies `mutate`
/// while the process waits, then lets it finish.
fn index_with_mutation_after_scan(ws: &Workspace, mutate: impl FnOnce()) -> Summary {
    let (child, resume) = ws.index_paused_after_scan();
    mutate();
    fs::write(&resume, "").expect("create resume file");
    child.wait(TIMEOUT).ok().summary()
}

#[test]
fn file_vanishing_between_scan_and_read_is_a_warning() {
    let ws = workspace_with_good_files(FlowConfig::default());
    ws.write("gone.md", "# Gone\n\nThis file was indexed once.\n");
    ws.index().assert_clean();
    assert!(sources(&parse_export(&ws.export())).contains("gone.md"));

    // Change it (so the next run must read it) and add a never-indexed file;
    // both disappear right after the scan.
    ws.write("gone.md", "# Gone\n\nThis file changed, then vanished.\n");
    ws.write("ghost.md", "# Ghost\n\nNever indexed.\n");
    let s = index_with_mutation_after_scan(&ws, || {
        fs::remove_file(ws.src().join("gone.md")).expect("rm gone.md");
        fs::remove_file(ws.src().join("ghost.md")).expect("rm ghost.md");
    });
    s.assert_warning("gone.md", "vanished");
    s.assert_warning("ghost.md", "vanished");
    assert_eq!(s.status(), "success", "{}", s.0);

    let export = assert_good_files_indexed(&ws);
    assert_not_exported(&export, "gone.md");
    assert_not_exported(&export, "ghost.md");
    let fresh = ws.fresh_export();
    assert!(export == fresh, "{}", export_diff(&fresh, &export));
}

#[test]
fn file_changing_between_scan_and_read_indexes_the_new_content() {
    let ws = workspace_with_good_files(FlowConfig::default());
    ws.write("moving.md", "# Moving\n\nFirst version.\n");
    ws.index().assert_clean();

    ws.write(
        "moving.md",
        "# Moving\n\nSecond version, seen by the scan.\n",
    );
    let s = index_with_mutation_after_scan(&ws, || {
        ws.write(
            "moving.md",
            "# Moving\n\nThird version about albatrosses, written after the scan finished.\n",
        );
    });
    s.assert_warning("moving.md", "changed while");
    assert_eq!(s.status(), "success", "{}", s.0);

    let export = assert_good_files_indexed(&ws);
    let rows = parse_export(&export);
    let texts: Vec<&str> = rows
        .iter()
        .filter(|r| r.source == "moving.md")
        .map(|r| r.text.as_str())
        .collect();
    assert!(
        texts.iter().any(|t| t.contains("albatrosses")),
        "new content not indexed: {texts:?}"
    );
    assert!(
        !texts.iter().any(|t| t.contains("Second version")),
        "stale content indexed: {texts:?}"
    );
    let fresh = ws.fresh_export();
    assert!(export == fresh, "{}", export_diff(&fresh, &export));
}

#[test]
fn symlink_loop_is_a_warning_on_the_link() {
    let ws = workspace_with_good_files(FlowConfig::default());
    ws.write(
        "sub/inner.md",
        "# Inner\n\nReachable once, not through the loop.\n",
    );
    // sub/loop -> .. points back at the source root.
    symlink("..", ws.src().join("sub/loop")).expect("symlink");
    let s = ws.index();
    s.assert_warning("sub/loop", "symlink loop");
    assert_eq!(s.status(), "success", "{}", s.0);

    let export = assert_good_files_indexed(&ws);
    let srcs = sources(&parse_export(&export));
    assert!(srcs.contains("sub/inner.md"), "{srcs:?}");
    assert!(
        srcs.iter().all(|s| !s.starts_with("sub/loop/")),
        "files indexed through the loop: {srcs:?}"
    );
}

#[test]
fn very_long_lines_are_chunked_within_chunk_size() {
    let ws = workspace_with_good_files(FlowConfig::default());
    // ~200 KB on a single line, once with spaces and once without any.
    let words = "streaming vectors index incremental ".repeat(5600);
    let solid = "abcdefghij".repeat(20_000);
    ws.write("long-words.txt", &words);
    ws.write("long-solid.txt", &solid);
    let s = ws.index();
    s.assert_clean();
    assert_eq!(s.n("items.new"), GOOD.len() as u64 + 2, "{}", s.0);

    let export = assert_good_files_indexed(&ws);
    let rows = parse_export(&export);
    for (name, content) in [("long-words.txt", &words), ("long-solid.txt", &solid)] {
        let mine: Vec<&common::Row> = rows.iter().filter(|r| r.source == name).collect();
        assert!(
            mine.len() >= 200,
            "{name}: {} chunks for ~200 KB at chunk_size 1000",
            mine.len()
        );
        if let Err(e) = check_chunks(content, &mine, 1000) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn deeply_nested_tree_is_indexed() {
    let ws = workspace_with_good_files(FlowConfig::default());
    let dir: String = (0..100).map(|i| format!("d{i}/")).collect();
    let deep = format!("{dir}deep.md");
    ws.write(&deep, "# Deep\n\nA file a hundred directories down.\n");
    let s = ws.index();
    s.assert_clean();
    let export = assert_good_files_indexed(&ws);
    assert!(
        sources(&parse_export(&export)).contains(&deep),
        "{deep} not exported"
    );
}

#[test]
fn non_utf8_file_name_is_indexed_with_escaped_key() {
    let ws = workspace_with_good_files(FlowConfig::default());
    let name = OsStr::from_bytes(b"bad\xff.md");
    write_file(
        &ws.src().join(name),
        "# Odd name\n\nThe name of this file is not UTF-8.\n",
    );
    let key = "bad\\xFF.md";
    let s = ws.index();
    s.assert_warning(key, "not valid UTF-8");
    assert_eq!(s.n("items.skipped"), 0, "{}", s.0);
    assert_eq!(s.n("items.failed"), 0, "{}", s.0);
    let export = assert_good_files_indexed(&ws);
    assert!(
        sources(&parse_export(&export)).contains(key),
        "no rows with source {key:?}"
    );
}

/// Whether `text` contains `n` as a whole number (not part of a longer one).
fn mentions_number(text: &str, n: usize) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|tok| tok == n.to_string())
}

/// A config whose `source` table is on line 10 and split step on line 13
/// (numbers nothing else in the file uses), with the given pieces.
fn config_with(source_extra: &str, split: &str) -> String {
    format!(
        "# freshindex configuration
#
# A flow with one mistake in it.
#
#
#
#
[[flow]]
name = \"docs\"
source = {{ type = \"files\", path = \"docs\", include = [\"**/*.md\"]{source_extra} }}
steps = [
  {{ op = \"parse\" }},
  {{ op = \"split\", {split} }},
  {{ op = \"embed\", model = \"builtin\", batch_size = 64 }},
]
target = {{ type = \"collection\", name = \"docs\" }}
"
    )
}

/// Asserts `index` refuses `config` with a one-line error naming `key` and
/// `line`.
fn assert_config_rejected(config: &str, key: &str, line: usize) {
    let ws = workspace_with_good_files(FlowConfig::default());
    fs::write(ws.config_path(), config).expect("write config");
    let out = ws.fi().args(["index", "--json"]).run().failed();
    // The temp dir's random name may contain digits: take it out before
    // looking for the line number.
    let root = ws.root().to_string_lossy().into_owned();
    let err = out.stderr.trim().replace(&root, "<workspace>");
    assert!(err.contains(key), "stderr does not name `{key}`: {err}");
    assert!(
        mentions_number(&err, line),
        "stderr lacks line {line}: {err}"
    );
    assert_eq!(err.lines().count(), 1, "expected a one-line error: {err}");
}

#[test]
fn unknown_config_key_is_rejected_with_key_and_line() {
    let config = config_with("", "chunk_sise = 1000, chunk_overlap = 200");
    assert_config_rejected(&config, "chunk_sise", 13);
}

#[test]
fn invalid_chunk_size_value_is_rejected_with_key_and_line() {
    let config = config_with("", "chunk_size = \"big\", chunk_overlap = 200");
    assert_config_rejected(&config, "chunk_size", 13);
}

#[test]
fn invalid_max_file_size_value_is_rejected_with_key_and_line() {
    let config = config_with(
        ", max_file_size = \"3 parsecs\"",
        "chunk_size = 1000, chunk_overlap = 200",
    );
    assert_config_rejected(&config, "max_file_size", 10);
}

#[test]
fn overlap_not_smaller_than_size_is_rejected() {
    let ws = workspace_with_good_files(FlowConfig::with_chunks(300, 300));
    let out = ws.fi().args(["index", "--json"]).run().failed();
    assert!(
        out.stderr.contains("chunk_overlap"),
        "stderr: {}",
        out.stderr
    );

    let bigger = Workspace::new(FlowConfig::with_chunks(200, 500));
    let out = bigger.fi().args(["index", "--json"]).run().failed();
    assert!(
        out.stderr.contains("chunk_overlap"),
        "stderr: {}",
        out.stderr
    );
}
