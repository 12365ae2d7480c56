//! The PostgreSQL source against a real server: runs follow inserts, updates, deletes and
//! soft deletes; bad rows fail alone, naming their key and column; the mark survives a
//! restart; live mode hears the trigger's notifications.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use freshindex_core::{Config, FlowSpec};
use freshindex_engine::{Engine, LiveControl, LiveEvent, LiveOptions, RunOptions, RunSummary};
use freshindex_testpg::TestPg;

fn spec(name: &str, url: &str, source: &str, extra: &str) -> FlowSpec {
    let toml = format!(
        "[[flow]]\nname = \"{name}\"\n{extra}\n[flow.source]\ntype = \"postgres\"\nurl = \"{url}\"\n{source}\n"
    );
    Config::parse(&toml, None).expect("config").flows.remove(0)
}

const DOCS: &str = r#"
table = "public.docs"
key_columns = ["id"]
content_columns = ["title", "body"]
metadata_columns = ["author"]
ordinal_column = "updated_at"
soft_delete_column = "deleted"
"#;

const CREATE: &str = "CREATE TABLE docs (
    id integer PRIMARY KEY,
    title text NOT NULL,
    body text,
    author text,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted boolean NOT NULL DEFAULT false
)";

/// Every item's text (its chunks joined) and metadata, by key.
fn indexed(engine: &Engine, flow: &str) -> BTreeMap<String, (String, Option<serde_json::Value>)> {
    let mut out: BTreeMap<String, (String, Option<serde_json::Value>)> = BTreeMap::new();
    let mut rows = Vec::new();
    engine
        .export(flow, &mut |r| {
            rows.push(r);
            Ok(())
        })
        .expect("export");
    rows.sort_by_key(|r| (r.payload.source.clone(), r.payload.range[0]));
    for r in rows {
        let e = out
            .entry(r.payload.source.clone())
            .or_insert_with(|| (String::new(), r.payload.metadata.clone()));
        if !e.0.is_empty() {
            e.0.push(' ');
        }
        e.0.push_str(&r.payload.text);
    }
    out
}

fn run(engine: &Engine, spec: &FlowSpec) -> RunSummary {
    engine.run(spec, &RunOptions::default()).expect("run")
}

#[test]
fn runs_follow_inserts_updates_deletes_and_soft_deletes_and_the_mark_survives_a_restart() {
    let pg = TestPg::start();
    let url = pg.create_database("follow");
    pg.psql("follow", CREATE);
    pg.psql(
        "follow",
        "INSERT INTO docs (id, title, body, author) VALUES
           (1, 'Otters', 'Otters hold hands while they sleep.', 'ana'),
           (2, 'Herons', 'Herons stand still in shallow water.', 'ben'),
           (3, 'Voles', 'Voles dig burrows under meadows.', 'cy')",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec("docs", &url, DOCS, "");
    {
        let engine = Engine::open(dir.path()).expect("engine");
        let s = run(&engine, &spec);
        assert_eq!((s.items.new, s.items.failed), (3, 0), "{s:?}");
        let got = indexed(&engine, "docs");
        assert_eq!(got.keys().collect::<Vec<_>>(), ["1", "2", "3"]);
        let (text, meta) = &got["1"];
        assert!(
            text.contains("Otters") && text.contains("hold hands"),
            "{text}"
        );
        assert_eq!(meta, &Some(serde_json::json!({ "author": "ana" })));

        // Nothing changed: nothing read again, nothing computed.
        let s = run(&engine, &spec);
        assert_eq!(
            (s.items.processed(), s.embeddings.computed),
            (0, 0),
            "{s:?}"
        );

        // An insert, an update, a delete and a soft delete.
        pg.psql(
            "follow",
            "INSERT INTO docs (id, title, body, author) VALUES (4, 'Stoats', 'Stoats turn white in winter.', 'di')",
        );
        pg.psql(
            "follow",
            "UPDATE docs SET body = 'Otters use stones as tools.', updated_at = clock_timestamp() WHERE id = 1",
        );
        pg.psql("follow", "DELETE FROM docs WHERE id = 2");
        pg.psql(
            "follow",
            "UPDATE docs SET deleted = true, updated_at = clock_timestamp() WHERE id = 3",
        );
        let s = run(&engine, &spec);
        assert_eq!(
            (s.items.new, s.items.modified, s.items.deleted),
            (1, 1, 2),
            "{s:?}"
        );
        let got = indexed(&engine, "docs");
        assert_eq!(got.keys().collect::<Vec<_>>(), ["1", "4"]);
        assert!(got["1"].0.contains("stones as tools"), "{:?}", got["1"]);
        assert!(got["4"].0.contains("white in winter"), "{:?}", got["4"]);
        // The runs are in the history.
        let history = engine.history("docs", 10).expect("history");
        assert_eq!(history.len(), 3, "{history:?}");
    }
    // A new engine over the same data directory (and a restarted database): the mark was
    // kept, so nothing is read again.
    pg.restart();
    let engine = Engine::open(dir.path()).expect("engine again");
    let s = run(&engine, &spec);
    assert_eq!(
        (s.items.seen, s.items.processed(), s.embeddings.computed),
        (0, 0, 0),
        "{s:?}"
    );
    // A row committed with an ordinal below the mark (a late transaction) is found by the
    // key scan of the next run.
    pg.psql(
        "follow",
        "INSERT INTO docs (id, title, body, updated_at) VALUES (5, 'Newts', 'Newts live in ponds.', '2000-01-01')",
    );
    let s = run(&engine, &spec);
    assert_eq!(s.items.new, 1, "{s:?}");
    assert!(indexed(&engine, "docs")["5"].0.contains("ponds"));
}

#[test]
fn bad_rows_fail_naming_their_key_and_column_while_the_others_are_indexed() {
    let pg = TestPg::start();
    let url = pg.create_database("bad");
    pg.psql("bad", CREATE);
    pg.psql(
        "bad",
        "INSERT INTO docs (id, title, body) VALUES
           (1, 'Otters', 'Otters hold hands while they sleep.'),
           (2, 'Herons', NULL),
           (3, 'Voles', 'Voles dig burrows under meadows.')",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let docs = spec("docs", &url, DOCS, "");
    let s = run(&engine, &docs);
    assert_eq!((s.items.new, s.items.failed), (2, 1), "{s:?}");
    assert_eq!(s.errors.len(), 1, "{s:?}");
    assert_eq!(s.errors[0].item, "2");
    let e = &s.errors[0].error;
    assert!(
        e.contains("row `2`") && e.contains("`body`") && e.contains("NULL"),
        "{e}"
    );
    assert_eq!(
        indexed(&engine, "docs").keys().collect::<Vec<_>>(),
        ["1", "3"]
    );
    let status = engine.status("docs").expect("status");
    assert_eq!(status.items.get("ERROR"), Some(&1), "{status:?}");
    // The history entry counts it.
    let history = engine.history("docs", 1).expect("history");
    assert_eq!(history[0].errors.len(), 1, "{:?}", history[0]);

    // Fixed at the source: indexed by the next run.
    pg.psql(
        "bad",
        "UPDATE docs SET body = 'Herons stand still.', updated_at = clock_timestamp() WHERE id = 2",
    );
    let s = run(&engine, &docs);
    assert_eq!((s.items.modified, s.items.failed), (1, 0), "{s:?}");
    assert_eq!(indexed(&engine, "docs").len(), 3);

    // A query whose content column is not text (an integer, bytea), and a row without a key.
    let typed = spec(
        "typed",
        &url,
        r#"
query = "SELECT NULLIF(id, 3) AS id, updated_at, title, CASE WHEN id = 1 THEN 'x' END AS extra FROM docs"
key_columns = ["id"]
content_columns = ["title", "extra"]
ordinal_column = "updated_at"
"#,
        "",
    );
    let s = run(&engine, &typed);
    // Row 1 is fine, row 2 has a NULL `extra`, row 3 has no key.
    assert_eq!((s.items.new, s.items.failed), (1, 2), "{s:?}");
    let by_item: BTreeMap<&str, &str> = s
        .errors
        .iter()
        .map(|e| (e.item.as_str(), e.error.as_str()))
        .collect();
    assert!(
        by_item["2"].contains("row `2`") && by_item["2"].contains("`extra`"),
        "{by_item:?}"
    );
    let keyless = by_item["(row without a key)"];
    assert!(
        keyless.contains("key column `id` is NULL") && keyless.contains("updated_at"),
        "{keyless}"
    );
    for (ty, expr) in [("int4", "id * 10"), ("bytea", "convert_to(title, 'UTF8')")] {
        let name = format!("wrong-{ty}");
        let wrong = spec(
            &name,
            &url,
            &format!(
                r#"
query = "SELECT id, updated_at, title, CASE WHEN id = 2 THEN {expr} END AS n FROM docs"
key_columns = ["id"]
content_columns = ["title", "n"]
ordinal_column = "updated_at"
"#
            ),
            "",
        );
        let s = run(&engine, &wrong);
        assert_eq!((s.items.new, s.items.failed), (0, 3), "{s:?}");
        let e = s
            .errors
            .iter()
            .find(|e| e.item == "2")
            .expect("row 2 fails");
        assert!(
            e.error.contains("row `2`")
                && e.error.contains("content column `n`")
                && e.error.contains(&format!("type {ty}")),
            "{e:?}"
        );
    }

    // An ordinal column of another type is a configuration error naming it.
    let text_ordinal = spec(
        "text-ordinal",
        &url,
        r#"
table = "docs"
key_columns = ["id"]
content_columns = ["title"]
ordinal_column = "title"
"#,
        "",
    );
    let err = engine
        .run(&text_ordinal, &RunOptions::default())
        .expect_err("a text ordinal");
    let m = err.to_string();
    assert!(
        m.contains("ordinal_column `title`") && m.contains("text") && m.contains("table docs"),
        "{m}"
    );
}

#[test]
fn keys_of_several_columns_and_a_closed_connection() {
    let pg = TestPg::start();
    let url = pg.create_database("multi");
    pg.psql(
        "multi",
        "CREATE TABLE notes (ns text, n bigint, body text NOT NULL, v bigint NOT NULL,
           PRIMARY KEY (ns, n))",
    );
    // One ordinal for several rows: pages of one row each must still see every row.
    for i in 0..5 {
        pg.psql(
            "multi",
            &format!(
                "INSERT INTO notes VALUES ('a/b', {i}, 'Note number {i} about 50% of otters.', 7)"
            ),
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let notes = spec(
        "notes",
        &url,
        r#"
table = "notes"
key_columns = ["ns", "n"]
content_columns = ["body"]
ordinal_column = "v"
"#,
        "",
    );
    let s = run(&engine, &notes);
    assert_eq!(s.items.new, 5, "{s:?}");
    let keys: Vec<String> = indexed(&engine, "notes").into_keys().collect();
    assert_eq!(keys[0], "a%2Fb/0");
    assert_eq!(keys.len(), 5);
    pg.psql("multi", "DELETE FROM notes WHERE n = 3");
    pg.psql(
        "multi",
        "UPDATE notes SET body = 'Changed.', v = 8 WHERE n = 4",
    );
    // The server ends every session: the run opens a new connection.
    pg.restart();
    let s = run(&engine, &notes);
    assert_eq!((s.items.modified, s.items.deleted), (1, 1), "{s:?}");
    assert_eq!(indexed(&engine, "notes")["a%2Fb/4"].0, "Changed.");
}

/// Waits up to `within` for `check`; returns how long it took.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn live_mode_hears_the_trigger_and_drop_removes_it() {
    let pg = TestPg::start();
    let url = pg.create_database("live");
    pg.psql("live", CREATE);
    pg.psql(
        "live",
        "INSERT INTO docs (id, title, body) VALUES (1, 'Otters', 'Otters hold hands.')",
    );
    let spec = spec(
        "live",
        &url,
        &format!("{DOCS}notify = true\n"),
        "mode = \"live\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let done = engine.setup_flow(&spec).expect("setup");
    assert!(
        done.iter().any(|l| l.contains("freshindex_live")),
        "{done:?}"
    );
    let triggers = "SELECT count(*) FROM pg_trigger WHERE tgname = 'freshindex_live'";
    assert_eq!(pg.psql("live", triggers), "1");
    // Setting up twice is fine.
    engine.setup_flow(&spec).expect("setup again");

    let control = LiveControl::default();
    // No periodic work: only notifications can bring changes in.
    let live = LiveOptions {
        refresh_interval: None,
        poll_interval: Duration::from_secs(3600),
        ..LiveOptions::default()
    };
    let (tx, rx) = mpsc::channel::<(bool, RunSummary)>();
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut report = |e: LiveEvent| {
                let _ = match e {
                    LiveEvent::Full(s) => tx.send((true, s)),
                    LiveEvent::Batch(s) => tx.send((false, s)),
                };
            };
            engine.watch(&spec, &RunOptions::default(), &live, &control, &mut report)
        });
        let (full, first) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the first run");
        assert!(full && first.items.new == 1, "{first:?}");

        pg.psql(
            "live",
            "INSERT INTO docs (id, title, body) VALUES (2, 'Herons', 'Herons stand still.')",
        );
        let took = eventually(Duration::from_secs(5), || {
            indexed(&engine, "live").contains_key("2")
        });
        assert!(took.is_some(), "the insert did not arrive");
        pg.psql(
            "live",
            "UPDATE docs SET body = 'Otters use stones.', updated_at = clock_timestamp() WHERE id = 1",
        );
        let took = eventually(Duration::from_secs(5), || {
            indexed(&engine, "live")["1"].0.contains("stones")
        });
        assert!(took.is_some(), "the update did not arrive");
        // A hard delete leaves nothing after the mark: only its notification tells.
        pg.psql("live", "DELETE FROM docs WHERE id = 2");
        let took = eventually(Duration::from_secs(5), || {
            !indexed(&engine, "live").contains_key("2")
        });
        assert!(took.is_some(), "the delete did not arrive");
        // A key changed in place: the old key goes, the new one comes.
        pg.psql(
            "live",
            "UPDATE docs SET id = 10, updated_at = clock_timestamp() WHERE id = 1",
        );
        let took = eventually(Duration::from_secs(5), || {
            let got = indexed(&engine, "live");
            got.keys().collect::<Vec<_>>() == ["10"]
        });
        assert!(took.is_some(), "{:?}", indexed(&engine, "live"));
        let quiet: Vec<(bool, RunSummary)> = rx.try_iter().collect();
        assert!(
            quiet.iter().all(|(full, _)| !full),
            "only notification batches after the first run: {quiet:?}"
        );

        // The server restarts: the loop listens again, catches up, and hears what follows.
        pg.restart();
        pg.psql(
            "live",
            "INSERT INTO docs (id, title, body) VALUES (3, 'Voles', 'Voles dig burrows.')",
        );
        let took = eventually(Duration::from_secs(10), || {
            indexed(&engine, "live").contains_key("3")
        });
        assert!(took.is_some(), "nothing arrived after the restart");
        pg.psql("live", "DELETE FROM docs WHERE id = 3");
        let took = eventually(Duration::from_secs(10), || {
            !indexed(&engine, "live").contains_key("3")
        });
        assert!(
            took.is_some(),
            "the delete after the restart did not arrive"
        );

        control.stop();
        watcher.join().expect("watcher").expect("live loop");
    });
    let removed = engine.drop_flow_resources(&spec).expect("drop");
    assert!(!removed.is_empty());
    assert_eq!(pg.psql("live", triggers), "0");
    assert_eq!(
        pg.psql(
            "live",
            "SELECT count(*) FROM pg_proc WHERE proname = 'freshindex_live_notify'"
        ),
        "0"
    );
}

#[test]
fn live_mode_without_notify_polls() {
    let pg = TestPg::start();
    let url = pg.create_database("poll");
    pg.psql("poll", CREATE);
    let spec = spec("poll", &url, DOCS, "mode = \"live\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let control = LiveControl::default();
    let live = LiveOptions {
        refresh_interval: None,
        poll_interval: Duration::from_millis(200),
        ..LiveOptions::default()
    };
    std::thread::scope(|scope| {
        let watcher = scope
            .spawn(|| engine.watch(&spec, &RunOptions::default(), &live, &control, &mut |_| {}));
        pg.psql(
            "poll",
            "INSERT INTO docs (id, title, body) VALUES (1, 'Otters', 'Otters hold hands.')",
        );
        let took = eventually(Duration::from_secs(20), || {
            engine.flow("poll").is_ok() && indexed(&engine, "poll").contains_key("1")
        });
        control.stop();
        watcher.join().expect("watcher").expect("live loop");
        assert!(took.is_some(), "the poll did not bring the insert");
    });
    // Polls that found nothing left no history entries.
    let history = engine.history("poll", 50).expect("history");
    assert!(history.len() <= 3, "{history:?}");
}
