//! Command-line behaviour: the quick start without a config, `init`, option
//! placement, config discovery, the JSON output shapes, and that the data dir
//! inside a scanned tree is never indexed.

mod common;

use std::fs;
use std::path::Path;

use common::{Fi, FlowConfig, Summary, parse_export, sources, write_file};
use serde_json::Value;

/// Three notes on unrelated topics, so a query made of one note's words has
/// a single obvious best match.
fn write_notes(dir: &Path) {
    write_file(
        &dir.join("astro.md"),
        "# Astronomy\n\nThe telescope tracked a faint nebula while the comet \
         crossed the constellation of Orion. Astronomers logged the nebula, \
         the comet and the telescope settings every night.\n",
    );
    write_file(
        &dir.join("kitchen/cooking.md"),
        "# Cooking\n\nWhisk butter and flour into a roux, then add milk \
         slowly. Season the sauce with nutmeg and simmer gently.\n",
    );
    write_file(
        &dir.join("garden.txt"),
        "Prune the roses in early spring and water the tomatoes at dawn; \
         mulch keeps the soil moist.\n",
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("freshindex-cli-")
        .tempdir()
        .expect("temp dir")
}

#[test]
fn quick_start_index_folder_then_search() {
    let cwd = tempdir();
    write_notes(&cwd.path().join("notes"));

    // No config, no --data-dir: default flow named after the folder, data
    // in ./.freshindex.
    let s = Fi::new(cwd.path())
        .args(["index", "notes", "--json"])
        .run()
        .ok()
        .summary();
    assert_eq!(s.0["flow"], "notes", "{}", s.0);
    s.assert_clean();
    assert_eq!(s.n("items.new"), 3, "{}", s.0);
    assert!(
        cwd.path().join(".freshindex").is_dir(),
        "default data dir .freshindex not created in the cwd"
    );

    let out = Fi::new(cwd.path())
        .args(["search", "telescope nebula comet", "--json"])
        .run()
        .ok();
    let hits = out.json();
    let hits = hits.as_array().expect("search --json prints an array");
    assert!(!hits.is_empty(), "no search results");
    assert_eq!(
        hits[0]["source"], "astro.md",
        "best hit should be astro.md: {}",
        out.stdout
    );
    for hit in hits {
        assert!(hit["key"].is_string(), "{hit}");
        assert!(hit["source"].is_string(), "{hit}");
        assert!(hit["score"].is_number(), "{hit}");
        assert!(hit["text"].is_string(), "{hit}");
        let range = hit["range"].as_array().expect("range array");
        assert_eq!(range.len(), 2, "{hit}");
    }

    let top1 = Fi::new(cwd.path())
        .args(["search", "roux butter nutmeg", "-k", "1", "--json"])
        .run()
        .ok()
        .json();
    let top1 = top1.as_array().expect("array");
    assert_eq!(top1.len(), 1, "-k 1 returns one hit: {top1:?}");
    assert_eq!(top1[0]["source"], "kitchen/cooking.md");
}

#[test]
fn index_json_summary_has_the_contract_shape() {
    let cwd = tempdir();
    write_notes(&cwd.path().join("notes"));
    let s = Fi::new(cwd.path())
        .args(["index", "notes", "--json"])
        .run()
        .ok()
        .summary();
    let v = &s.0;
    assert!(v["flow"].is_string(), "{v}");
    assert_eq!(v["status"], "success", "{v}");
    for k in [
        "seen",
        "new",
        "modified",
        "unchanged",
        "deleted",
        "failed",
        "skipped",
    ] {
        s.n(&format!("items.{k}"));
    }
    for k in ["added", "updated", "deleted", "unchanged", "total"] {
        s.n(&format!("rows.{k}"));
    }
    s.n("embeddings.computed");
    s.n("embeddings.reused");
    s.n("elapsed_ms");
    assert!(v["errors"].is_array() && v["warnings"].is_array(), "{v}");
    assert_eq!(s.n("items.seen"), 3);
    assert!(s.n("rows.total") >= 3);
    assert_eq!(s.n("rows.added"), s.n("rows.total"));
}

#[test]
fn several_flows_print_a_json_array() {
    let cwd = tempdir();
    write_notes(&cwd.path().join("a"));
    write_notes(&cwd.path().join("b"));
    let flow = |name: &str| {
        FlowConfig {
            name: name.into(),
            path: name.into(),
            ..FlowConfig::default()
        }
        .to_toml()
    };
    fs::write(
        cwd.path().join("freshindex.toml"),
        format!("{}\n{}", flow("a"), flow("b")),
    )
    .expect("write config");

    // No PATH and no --config: ./freshindex.toml is picked up.
    let out = Fi::new(cwd.path()).args(["index", "--json"]).run().ok();
    let v = out.json();
    let runs = v.as_array().expect("several flows print a JSON array");
    let names: Vec<&str> = runs.iter().filter_map(|r| r["flow"].as_str()).collect();
    assert_eq!(names.len(), 2, "{v}");
    assert!(names.contains(&"a") && names.contains(&"b"), "{v}");
    for r in runs {
        Summary(r.clone()).assert_clean();
    }

    // --flow runs only that flow: a single object again.
    let only_b = Fi::new(cwd.path())
        .args(["index", "--flow", "b", "--json"])
        .run()
        .ok()
        .summary();
    assert_eq!(only_b.0["flow"], "b", "{}", only_b.0);
    assert_eq!(only_b.n("items.unchanged"), 3, "{}", only_b.0);

    // Each flow's target holds its own rows; identical trees give identical
    // chunks (keys may differ per flow, texts may not).
    let export = |name: &str| {
        Fi::new(cwd.path())
            .args(["export", "--flow", name])
            .run()
            .ok()
            .stdout
    };
    let texts = |jsonl: String| -> Vec<(String, String)> {
        parse_export(&jsonl)
            .into_iter()
            .map(|r| (r.source, r.text))
            .collect()
    };
    assert_eq!(texts(export("a")), texts(export("b")));
}

#[test]
fn global_options_work_before_and_after_the_subcommand() {
    let cwd = tempdir();
    write_notes(&cwd.path().join("notes"));
    let d1 = cwd.path().join("data-one");
    let d2 = cwd.path().join("data-two");

    // --data-dir after the subcommand...
    Fi::new(cwd.path())
        .args(["index", "notes", "--json", "--data-dir"])
        .arg(&d1)
        .run()
        .ok();
    // ...and through the environment.
    Fi::new(cwd.path())
        .env("FRESHINDEX_DATA_DIR", &d2)
        .args(["index", "notes", "--json"])
        .run()
        .ok();
    assert!(d1.is_dir() && d2.is_dir(), "data dirs not created");
    assert!(
        !cwd.path().join(".freshindex").exists(),
        "default data dir used despite --data-dir / FRESHINDEX_DATA_DIR"
    );

    // --data-dir before the subcommand.
    let e1 = Fi::new(cwd.path())
        .arg("--data-dir")
        .arg(&d1)
        .args(["export", "--flow", "notes"])
        .run()
        .ok()
        .stdout;
    let e2 = Fi::new(cwd.path())
        .args(["export", "--flow", "notes", "--data-dir"])
        .arg(&d2)
        .run()
        .ok()
        .stdout;
    assert!(!e1.is_empty(), "empty export");
    // Two independent indexes of the same tree: identical, vectors included.
    assert_eq!(e1, e2);

    // --config after the subcommand, pointing at a file outside the cwd name.
    let cfg = cwd.path().join("other.toml");
    let flow = FlowConfig {
        path: "notes".into(),
        ..FlowConfig::default()
    };
    fs::write(&cfg, flow.to_toml()).expect("write config");
    let s = Fi::new(cwd.path())
        .args(["index", "--json", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&d1)
        .run()
        .ok()
        .summary();
    assert_eq!(s.0["flow"], "docs", "{}", s.0);
    assert_eq!(s.n("items.seen"), 3, "{}", s.0);
}

/// Source folders named by an uncommented `path = "..."` in a source
/// definition of a config file.
fn source_paths(config: &str) -> Vec<String> {
    let mut header = String::new();
    let mut out = Vec::new();
    for raw in config.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            header = line.to_string();
        }
        if !(line.contains("source") || header.contains("source")) {
            continue;
        }
        if let Some(pos) = line.find("path") {
            let rest = &line[pos + 4..];
            let value = rest
                .trim_start()
                .strip_prefix('=')
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('"'))
                .and_then(|r| r.split('"').next());
            if let Some(v) = value {
                out.push(v.to_string());
            }
        }
    }
    out
}

#[test]
fn init_writes_a_config_that_index_accepts() {
    let cwd = tempdir();
    Fi::new(cwd.path()).arg("init").run().ok();
    let config_path = cwd.path().join("freshindex.toml");
    let config = fs::read_to_string(&config_path).expect("init wrote freshindex.toml");
    assert!(
        config.lines().any(|l| l.trim_start().starts_with('#')),
        "init config should be commented:\n{config}"
    );

    for dir in source_paths(&config) {
        write_notes(&cwd.path().join(dir));
    }
    let out = Fi::new(cwd.path()).args(["index", "--json"]).run().ok();
    let v = out.json();
    let runs: Vec<Value> = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    assert!(!runs.is_empty(), "no flow ran");
    for r in runs {
        assert_eq!(r["status"], "success", "{r}\nconfig:\n{config}");
    }
}

#[test]
fn data_dir_inside_the_scanned_tree_is_not_indexed() {
    let tree = tempdir();
    write_notes(tree.path());
    // Index the cwd itself, twice: the second run sees the data dir the first
    // run created inside the tree.
    for run in 0..2 {
        let s = Fi::new(tree.path())
            .args(["index", ".", "--json"])
            .run()
            .ok()
            .summary();
        s.assert_clean();
        assert_eq!(s.n("items.seen"), 3, "run {run}: {}", s.0);
        if run == 1 {
            assert_eq!(s.n("embeddings.computed"), 0, "{}", s.0);
            assert_eq!(s.n("items.unchanged"), 3, "{}", s.0);
        }
    }
    assert!(tree.path().join(".freshindex").is_dir());
    let export = Fi::new(tree.path()).arg("export").run().ok().stdout;
    let srcs = sources(&parse_export(&export));
    assert_eq!(srcs.len(), 3, "{srcs:?}");
    assert!(
        srcs.iter().all(|s| !s.starts_with(".freshindex")),
        "data dir indexed: {srcs:?}"
    );
}

#[test]
fn status_reports_json_after_an_index() {
    let cwd = tempdir();
    write_notes(&cwd.path().join("notes"));
    Fi::new(cwd.path()).args(["index", "notes"]).run().ok();
    let out = Fi::new(cwd.path()).args(["status", "--json"]).run().ok();
    let v = out.json();
    assert!(v.is_object() || v.is_array(), "{v}");
}

#[test]
fn indexing_a_missing_folder_fails_with_an_error() {
    let cwd = tempdir();
    let out = Fi::new(cwd.path())
        .args(["index", "does-not-exist", "--json"])
        .run()
        .failed();
    assert!(!out.stderr.trim().is_empty(), "no error message on stderr");
}
