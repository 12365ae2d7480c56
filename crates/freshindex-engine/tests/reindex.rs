//! Reindex tasks on the engine: planning and counts, the blue/green switch and its rollback,
//! changes made during a task, conflicts and waiting, cancel, in place. The model moves from
//! the built-in one to the built-in one here (what is tested is the machinery; the test with
//! a real second model drives the binary: `crates/freshindex/tests/reindex_models.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use freshindex_core::{EmbedSpec, FlowSpec};
use freshindex_engine::{
    Engine, EngineError, ReindexRequest, RunOptions, TaskPhase, TaskRunOptions, TaskStatus,
};

fn write_docs(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for i in 0..n {
        std::fs::write(
            dir.join(format!("doc{i:03}.md")),
            format!(
                "# Document {i}\n\nThis is document number {i} about topic {}.\n",
                i % 7
            ),
        )
        .expect("write");
    }
}

fn setup(n: usize) -> (tempfile::TempDir, Engine, FlowSpec) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_docs(&dir.path().join("src"), n);
    let engine = Engine::open(&dir.path().join("data")).expect("engine");
    let spec = FlowSpec::quick_start("docs", dir.path().join("src")).expect("spec");
    engine
        .run(&spec, &RunOptions::default())
        .expect("first run");
    (dir, engine, spec)
}

fn request(blue: bool) -> ReindexRequest {
    ReindexRequest {
        flow: "docs".into(),
        to: EmbedSpec::of_model("builtin").expect("model"),
        deploy_as_blue: blue,
        wait_on_conflict: false,
        batch_size: Some(4),
        max_failed_items: None,
    }
}

fn opts() -> TaskRunOptions {
    TaskRunOptions {
        workers: 2,
        ..TaskRunOptions::default()
    }
}

/// Source key → texts of its rows, from the flow's current target.
fn rows(engine: &Engine) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    engine
        .export("docs", &mut |row| {
            out.entry(row.payload.source.clone())
                .or_default()
                .push(row.payload.text.clone());
            Ok(())
        })
        .expect("export");
    for v in out.values_mut() {
        v.sort();
    }
    out
}

#[test]
fn a_blue_task_counts_every_item_switches_and_rolls_back() {
    let (_dir, engine, _spec) = setup(10);
    let before = rows(&engine);
    let t = engine.create_reindex(&request(true)).expect("create");
    assert_eq!(t.status, TaskStatus::Pending);
    assert_eq!((t.total, t.count), (0, 0));
    let t = engine.run_task(t.id, &opts(), None).expect("run");
    assert_eq!(t.status, TaskStatus::Succeeded, "{t:?}");
    assert_eq!((t.total, t.count, t.failed_count), (10, 10, 0));
    assert_eq!(t.progress, 1.0);
    assert_eq!(t.children.len(), 3, "10 items in batches of 4");
    let subs = engine.subtasks(t.id).expect("subtasks");
    assert_eq!(
        subs.iter().map(|s| (s.total, s.count)).collect::<Vec<_>>(),
        vec![(4, 4), (4, 4), (2, 2)]
    );
    assert!(t.switched);
    let new = t.new_collection.clone().expect("new collection");
    assert_eq!(engine.collections().resolve("docs").expect("resolve"), new);
    assert!(
        engine
            .collections()
            .names()
            .expect("names")
            .contains(&"docs.t0".to_string()),
        "the first switch moves the original collection aside"
    );
    assert_eq!(rows(&engine), before, "the new collection holds every row");
    // The flow's own state is the task's now: a run finds nothing to do.
    let (_, spec) = engine.flow("docs").expect("flow");
    let s = engine.run(&spec, &RunOptions::default()).expect("run");
    assert_eq!(s.embeddings.computed, 0);
    assert_eq!(s.rows.added + s.rows.updated + s.rows.deleted, 0);

    let r = engine
        .rollback("docs", &RunOptions::default())
        .expect("rollback");
    assert_eq!(
        (r.collection.as_str(), r.left.as_str()),
        ("docs.t0", new.as_str())
    );
    assert_eq!(
        engine.collections().resolve("docs").expect("resolve"),
        "docs.t0"
    );
    assert_eq!(rows(&engine), before);
    // A second rollback switches forward again.
    let r = engine
        .rollback("docs", &RunOptions::default())
        .expect("roll forward");
    assert_eq!(r.collection, new);
    // Dropping the kept state makes rollback impossible, with a clear error.
    assert_eq!(
        engine.drop_previous("docs").expect("drop"),
        Some("docs.t0".to_string())
    );
    assert!(
        !engine
            .collections()
            .names()
            .expect("names")
            .contains(&"docs.t0".to_string())
    );
    let e = engine
        .rollback("docs", &RunOptions::default())
        .expect_err("nothing to roll back to");
    assert!(e.to_string().contains("no earlier state"), "{e}");
}

#[test]
fn changes_made_during_a_task_reach_the_new_collection() {
    let (dir, engine, spec) = setup(9);
    let t = engine.create_reindex(&request(true)).expect("create");
    // Stopped at once: the plan is made (total known), no batch processed.
    let stop = AtomicBool::new(true);
    let t = engine.run_task(t.id, &opts(), Some(&stop)).expect("run");
    assert_eq!(t.status, TaskStatus::Running);
    assert_eq!((t.total, t.count), (9, 0));
    assert_eq!(t.phase, TaskPhase::Batches);
    // Meanwhile the flow's source changes, and the flow keeps running on the old collection.
    let src = dir.path().join("src");
    std::fs::write(src.join("doc001.md"), "# Changed\n\nzebra crossing").expect("edit");
    std::fs::remove_file(src.join("doc002.md")).expect("delete");
    std::fs::write(src.join("new.md"), "# New\n\nquokka").expect("add");
    engine.run(&spec, &RunOptions::default()).expect("run");
    let expected = rows(&engine);
    // Resumed: it completes, catches up and switches.
    let t = engine.run_task(t.id, &opts(), None).expect("resume");
    assert_eq!(t.status, TaskStatus::Succeeded, "{t:?}");
    assert_eq!(t.count, 9, "{t:?}");
    assert!(t.switched);
    assert_eq!(rows(&engine), expected);
    let hits = engine.search("docs", "quokka", 1, None).expect("search");
    assert_eq!(hits[0].payload.source, "new.md");
}

#[test]
fn a_second_task_is_refused_or_waits_for_the_first() {
    let (_dir, engine, _spec) = setup(5);
    let first = engine.create_reindex(&request(true)).expect("create");
    let e = engine
        .create_reindex(&request(true))
        .expect_err("a second task is refused");
    assert!(matches!(e, EngineError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains(&format!("task {}", first.id)), "{e}");
    let second = engine
        .create_reindex(&ReindexRequest {
            wait_on_conflict: true,
            ..request(true)
        })
        .expect("waits");
    assert_eq!(second.status, TaskStatus::Waiting);
    assert_eq!(engine.runnable_tasks().expect("runnable"), vec![first.id]);
    let still = engine
        .run_task(second.id, &opts(), None)
        .expect("run second");
    assert_eq!(
        still.status,
        TaskStatus::Waiting,
        "it waits while the first is active"
    );
    let first = engine.run_task(first.id, &opts(), None).expect("run first");
    assert_eq!(first.status, TaskStatus::Succeeded);
    assert_eq!(engine.runnable_tasks().expect("runnable"), vec![second.id]);
    let second = engine
        .run_task(second.id, &opts(), None)
        .expect("run second");
    assert_eq!(second.status, TaskStatus::Succeeded, "{second:?}");
    assert_eq!(
        engine.collections().resolve("docs").expect("resolve"),
        second.new_collection.expect("collection")
    );
}

#[test]
fn a_canceled_task_leaves_nothing_behind_and_never_switches() {
    let (_dir, engine, _spec) = setup(6);
    let before = rows(&engine);
    let t = engine.create_reindex(&request(true)).expect("create");
    let stop = AtomicBool::new(true);
    let t = engine.run_task(t.id, &opts(), Some(&stop)).expect("plan");
    let new = t.new_collection.clone().expect("collection");
    assert!(engine.collections().names().expect("names").contains(&new));
    let t = engine.cancel_task(t.id).expect("cancel");
    assert_eq!(t.status, TaskStatus::Canceled);
    assert!(!engine.collections().names().expect("names").contains(&new));
    assert_eq!(
        engine.collections().resolve("docs").expect("resolve"),
        "docs"
    );
    assert_eq!(rows(&engine), before);
    let e = engine.cancel_task(t.id).expect_err("ended");
    assert!(matches!(e, EngineError::Conflict(_)), "{e:?}");
    // Nothing runs it again.
    assert!(engine.runnable_tasks().expect("runnable").is_empty());
}

#[test]
fn an_in_place_task_rewrites_the_flows_own_collection() {
    let (_dir, engine, _spec) = setup(7);
    let before = rows(&engine);
    let t = engine.create_reindex(&request(false)).expect("create");
    let t = engine.run_task(t.id, &opts(), None).expect("run");
    assert_eq!(t.status, TaskStatus::Succeeded, "{t:?}");
    assert_eq!((t.total, t.count), (7, 7));
    assert!(!t.switched);
    assert!(t.new_collection.is_none());
    assert_eq!(
        engine.collections().resolve("docs").expect("resolve"),
        "docs"
    );
    assert_eq!(rows(&engine), before);
}

#[test]
fn a_push_flow_cannot_be_reindexed_and_the_error_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let config = freshindex_core::Config::parse(
        "[[flow]]\nname = \"pushed\"\nsource = { type = \"push\" }\n",
        None,
    )
    .expect("config");
    engine.define_flow(&config.flows[0]).expect("define");
    let e = engine
        .create_reindex(&ReindexRequest {
            flow: "pushed".into(),
            ..request(true)
        })
        .expect_err("refused");
    assert!(e.to_string().contains("push source"), "{e}");
    let e = engine
        .create_reindex(&ReindexRequest {
            flow: "nope".into(),
            ..request(true)
        })
        .expect_err("unknown flow");
    assert!(matches!(e, EngineError::NotFound(_)), "{e:?}");
}
