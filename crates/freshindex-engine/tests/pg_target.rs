//! A PostgreSQL table as a flow's target, against a real server (`freshindex_testpg`): the
//! table holds what a built-in collection holds for the same corpus, an edit rewrites only
//! the edited file's rows (observed through each row's `xmin`, the transaction that wrote
//! it), a deletion removes them, search ranks like the collection's, and shapes that do not
//! fit (another dimension, a column of another type) are errors naming them.

use std::collections::BTreeMap;
use std::path::Path;

use freshindex_core::{EmbedSpec, FlowSpec};
use freshindex_engine::{Engine, EngineError, ReindexRequest, RunOptions};
use freshindex_testpg::TestPg;
use postgres::{Client, NoTls};

const TABLE: &str = "public.doc_chunks";

fn flow(name: &str, root: &Path, target: serde_json::Value) -> FlowSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "source": { "type": "files", "path": root },
        "steps": [
            { "op": "parse" },
            { "op": "split", "chunk_size": 200, "chunk_overlap": 0 },
            { "op": "embed" },
        ],
        "target": target,
    }))
    .expect("flow spec")
}

fn pg_target(url: &str) -> serde_json::Value {
    serde_json::json!({ "type": "postgres", "url": url, "table": TABLE })
}

fn opts() -> RunOptions<'static> {
    RunOptions {
        workers: 2,
        ..RunOptions::default()
    }
}

/// A paragraph of distinct words, about `n` × 60 bytes, so each file makes several chunks.
fn text(topic: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("The {topic} note number {i} talks about {topic} things and {topic}{i}.\n\n")
        })
        .collect()
}

fn write(root: &Path, name: &str, body: &str) {
    std::fs::write(root.join(name), body).expect("write file");
}

fn corpus(root: &Path) {
    for (name, topic) in [
        ("alpha.md", "astronomy"),
        ("beta.md", "botany"),
        ("gamma.md", "geology"),
        ("delta.md", "dentistry"),
    ] {
        write(root, name, &text(topic, 8));
    }
    std::fs::create_dir_all(root.join("sub")).expect("sub folder");
    write(root, "sub/epsilon.md", &text("entomology", 5));
}

/// (key, source, range, text) of every row, in key order.
type Rows = Vec<(String, String, [usize; 2], String)>;

fn exported(engine: &Engine, flow: &str) -> Rows {
    let mut rows = Vec::new();
    engine
        .export(flow, &mut |r| {
            rows.push((r.key, r.payload.source, r.payload.range, r.payload.text));
            Ok(())
        })
        .expect("export");
    rows
}

/// Each row's key → (source_key, xmin): the transaction that last wrote the row.
fn versions(db: &mut Client) -> BTreeMap<String, (String, String)> {
    db.query(
        &format!("SELECT key, source_key, xmin::text FROM {TABLE}"),
        &[],
    )
    .expect("read xmin")
    .into_iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

/// The keys whose row is new or was written again since `before`.
fn written_since(
    before: &BTreeMap<String, (String, String)>,
    after: &BTreeMap<String, (String, String)>,
) -> Vec<(String, String)> {
    after
        .iter()
        .filter(|(k, (_, x))| before.get(*k).is_none_or(|(_, bx)| bx != x))
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect()
}

#[test]
fn the_table_follows_the_folder_with_minimal_writes() {
    let pg = TestPg::start();
    let url = pg.create_database("target");
    let mut db = Client::connect(&url, NoTls).expect("connect");
    let root = tempfile::tempdir().expect("root");
    corpus(root.path());
    let (dir_pg, dir_col) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let on_pg = Engine::open(dir_pg.path()).expect("engine");
    let on_col = Engine::open(dir_col.path()).expect("engine");
    let spec_pg = flow("docs", root.path(), pg_target(&url));
    let spec_col = flow(
        "docs",
        root.path(),
        serde_json::json!({ "type": "collection", "name": "docs" }),
    );

    // A first run creates the table (no setup) and fills it as a collection is filled.
    let s = on_pg.run(&spec_pg, &opts()).expect("first run");
    on_col.run(&spec_col, &opts()).expect("collection run");
    assert_eq!(s.items.new, 5);
    let rows = exported(&on_pg, "docs");
    assert!(rows.len() > 10, "several chunks per file: {}", rows.len());
    assert_eq!(rows, exported(&on_col, "docs"));
    assert_eq!(s.rows.total, rows.len() as u64);
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .expect("count")
        .get(0);
    assert_eq!(n as usize, rows.len());
    // The columns hold what the payload says.
    let r = db
        .query_one(
            &format!("SELECT source_key, text, payload FROM {TABLE} WHERE key = $1"),
            &[&rows[0].0],
        )
        .expect("row");
    assert_eq!(r.get::<_, String>(0), rows[0].1);
    assert_eq!(r.get::<_, String>(1), rows[0].3);
    let payload: serde_json::Value = r.get(2);
    assert_eq!(payload["range"], serde_json::json!(rows[0].2));
    let status = on_pg.status("docs").expect("status");
    assert_eq!(status.rows, rows.len() as u64);
    assert_eq!(status.collection, TABLE);

    // A run with nothing changed writes nothing.
    let before = versions(&mut db);
    let s = on_pg.run(&spec_pg, &opts()).expect("no-op run");
    assert_eq!(s.items.unchanged, 5);
    assert_eq!(written_since(&before, &versions(&mut db)), vec![]);

    // Edit one file: a paragraph at its end. Only rows of that file are written, and its
    // unchanged first chunks are not.
    let mut body = text("botany", 8);
    body.push_str("A new closing paragraph on botany greenhouses and orchids.\n");
    write(root.path(), "beta.md", &body);
    let before = versions(&mut db);
    on_pg.run(&spec_pg, &opts()).expect("run after edit");
    on_col
        .run(&spec_col, &opts())
        .expect("collection after edit");
    let after = versions(&mut db);
    let written = written_since(&before, &after);
    assert!(!written.is_empty(), "the edit wrote rows");
    assert!(
        written.iter().all(|(_, s)| s == "beta.md"),
        "only beta.md's rows are written: {written:?}"
    );
    let beta_rows = after.values().filter(|(s, _)| s == "beta.md").count();
    assert!(
        written.len() < beta_rows,
        "beta.md's unchanged chunks stay as they were ({} of {beta_rows} written)",
        written.len()
    );
    assert_eq!(exported(&on_pg, "docs"), exported(&on_col, "docs"));

    // Delete a file: its rows go, nothing else is written.
    std::fs::remove_file(root.path().join("gamma.md")).expect("rm");
    let before = versions(&mut db);
    let s = on_pg.run(&spec_pg, &opts()).expect("run after delete");
    on_col
        .run(&spec_col, &opts())
        .expect("collection after delete");
    assert_eq!(s.items.deleted, 1);
    let after = versions(&mut db);
    assert!(after.values().all(|(s, _)| s != "gamma.md"));
    assert!(before.values().any(|(s, _)| s == "gamma.md"));
    assert_eq!(written_since(&before, &after), vec![]);
    assert_eq!(exported(&on_pg, "docs"), exported(&on_col, "docs"));

    // Search: the file about the query first, with the collection's ranking and scores.
    let hits = on_pg
        .search("docs", "dentistry notes about dentistry", 5, None)
        .expect("search");
    assert_eq!(hits[0].payload.source, "delta.md", "{hits:?}");
    let col_hits = on_col
        .search("docs", "dentistry notes about dentistry", 5, None)
        .expect("collection search");
    assert_eq!(
        hits.iter().map(|h| &h.key).collect::<Vec<_>>(),
        col_hits.iter().map(|h| &h.key).collect::<Vec<_>>()
    );
    for (a, b) in hits.iter().zip(&col_hits) {
        assert!(
            (a.score - b.score).abs() < 1e-5,
            "{} vs {}",
            a.score,
            b.score
        );
        assert_eq!(a.payload, b.payload);
    }
    // The source-prefix filter, in SQL.
    let filter = freshindex_vector::Filter {
        source_prefix: Some("sub/".into()),
    };
    let hits = on_pg
        .search("docs", "dentistry", 3, Some(&filter))
        .expect("filtered search");
    assert!(!hits.is_empty());
    assert!(hits.iter().all(|h| h.payload.source == "sub/epsilon.md"));
}

#[test]
fn wrong_shapes_are_errors_naming_the_table_column_and_dimensions() {
    let pg = TestPg::start();
    let url = pg.create_database("shapes");
    let mut db = Client::connect(&url, NoTls).expect("connect");
    let root = tempfile::tempdir().expect("root");
    corpus(root.path());
    let dir = tempfile::tempdir().expect("dir");
    let engine = Engine::open(dir.path()).expect("engine");
    let spec = flow("docs", root.path(), pg_target(&url));

    db.batch_execute(&format!(
        "CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, source_key TEXT NOT NULL, text TEXT, \
         payload JSONB, vector real[] CONSTRAINT vector_dimension CHECK (array_length(vector, 1) = 3))"
    ))
    .expect("a 3-dimensional table");
    let e = engine
        .run(&spec, &opts())
        .expect_err("wrong dimension")
        .to_string();
    for w in [TABLE, "dimension 3", "dimension 384", "127.0.0.1"] {
        assert!(e.contains(w), "`{w}` missing from: {e}");
    }
    // The user fixes it (a persistent failure), not a passing one.
    assert!(matches!(
        engine.run(&spec, &opts()),
        Err(EngineError::Config(_))
    ));
    let e = engine
        .setup_flow(&spec)
        .expect_err("setup finds it too")
        .to_string();
    assert!(e.contains("dimension 3"), "{e}");

    db.batch_execute(&format!(
        "DROP TABLE {TABLE}; CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, source_key TEXT NOT NULL, \
         text TEXT, payload TEXT, vector real[])"
    ))
    .expect("a table with a text payload");
    let e = engine
        .run(&spec, &opts())
        .expect_err("wrong type")
        .to_string();
    assert!(e.contains("column `payload`") && e.contains("jsonb"), "{e}");

    db.batch_execute(&format!(
        "DROP TABLE {TABLE}; CREATE TABLE {TABLE} (key TEXT, source_key TEXT NOT NULL, \
         text TEXT, payload JSONB, vector real[])"
    ))
    .expect("a table without a primary key");
    let e = engine.run(&spec, &opts()).expect_err("no key").to_string();
    assert!(
        e.contains("column `key`") && e.contains("primary key"),
        "{e}"
    );

    // A table the user made without the dimension check: its rows tell the dimension.
    db.batch_execute(&format!(
        "DROP TABLE {TABLE}; CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, source_key TEXT NOT NULL, \
         text TEXT, payload JSONB, vector real[]); \
         INSERT INTO {TABLE} VALUES ('x', 'x', 'x', '{{}}', '{{1,2}}')"
    ))
    .expect("a table with a 2-dimensional row");
    let e = engine
        .run(&spec, &opts())
        .expect_err("row dimension")
        .to_string();
    assert!(e.contains("dimension 2"), "{e}");

    // An unreachable server: the error names where.
    let spec = flow(
        "other",
        root.path(),
        pg_target("postgres://postgres@127.0.0.1:1/nowhere"),
    );
    let e = engine
        .run(&spec, &opts())
        .expect_err("no server")
        .to_string();
    assert!(
        e.contains("127.0.0.1:1/nowhere") && e.contains("connect") && e.contains(TABLE),
        "{e}"
    );
}

#[test]
fn setup_drop_reconnects_and_target_changes() {
    let pg = TestPg::start();
    let url = pg.create_database("life");
    let root = tempfile::tempdir().expect("root");
    corpus(root.path());
    let dir = tempfile::tempdir().expect("dir");
    let engine = Engine::open(dir.path()).expect("engine");
    let spec = flow("docs", root.path(), pg_target(&url));
    let exists = |db: &mut Client| -> bool {
        db.query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
            .expect("regclass")
            .get(0)
    };
    let mut db = Client::connect(&url, NoTls).expect("connect");

    // setup creates, then finds; it needs no run.
    let lines = engine.setup_flow(&spec).expect("setup");
    assert!(
        lines[0].contains("created") && lines[0].contains("real[]"),
        "{lines:?}"
    );
    assert!(exists(&mut db));
    let lines = engine.setup_flow(&spec).expect("setup again");
    assert!(lines[0].contains("already there"), "{lines:?}");

    let first = engine.run(&spec, &opts()).expect("run").rows.total;
    assert!(first > 0);

    // The server restarts: the engine's connection is gone, and the next call reconnects.
    drop(db);
    pg.restart();
    write(root.path(), "zeta.md", &text("zoology", 3));
    let s = engine.run(&spec, &opts()).expect("run after a restart");
    assert_eq!(s.items.new, 1);
    assert!(s.rows.total > first);
    let mut db = Client::connect(&url, NoTls).expect("connect again");
    // The server ends the engine's session under it: the next call reconnects and is made
    // again.
    let ended: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'life' AND pid <> pg_backend_pid()",
            &[],
        )
        .expect("terminate")
        .get(0);
    assert_eq!(ended, 1, "the engine's one connection");
    assert_eq!(engine.status("docs").expect("status").rows, s.rows.total);

    // Someone drops the table: the next run creates it and writes every row again.
    db.batch_execute(&format!("DROP TABLE {TABLE}"))
        .expect("drop by hand");
    let s2 = engine.run(&spec, &opts()).expect("run after a manual drop");
    assert_eq!(s2.rows.total, s.rows.total);
    assert_eq!(s2.items.new, 6, "every item indexed again");

    // Reindex tasks are for collections: refused, saying why.
    let e = engine
        .create_reindex(&ReindexRequest {
            flow: "docs".into(),
            to: EmbedSpec::default(),
            deploy_as_blue: true,
            wait_on_conflict: false,
            batch_size: None,
            max_failed_items: None,
        })
        .expect_err("blue reindex of a table");
    assert!(
        matches!(e, EngineError::Invalid(_)) && e.to_string().contains("blue"),
        "{e}"
    );

    // The flow moves to a collection: its rows leave the table, the collection gets them.
    let to_col = flow(
        "docs",
        root.path(),
        serde_json::json!({ "type": "collection", "name": "docs" }),
    );
    let s3 = engine.run(&to_col, &opts()).expect("run on a collection");
    assert_eq!(s3.rows.total, s.rows.total);
    let left: i64 = db
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the table was left clean");
    // And back: the collection is emptied, the table filled again.
    let s4 = engine.run(&spec, &opts()).expect("back to the table");
    assert_eq!(s4.rows.total, s.rows.total);
    assert_eq!(
        engine
            .collections()
            .open("docs")
            .expect("open")
            .count()
            .expect("count"),
        0
    );

    // Reset deletes the flow's rows from the table.
    let r = engine.reset("docs", false).expect("reset");
    assert_eq!(r.rows_deleted, s.rows.total);
    assert_eq!(engine.status("docs").expect("status").rows, 0);
    engine.run(&spec, &opts()).expect("run after reset");

    // delete_flow deletes the rows; the table stays (drop removes it).
    let d = engine.delete_flow("docs").expect("delete");
    assert_eq!(d.rows, Some(s.rows.total));
    assert!(!d.collection_dropped);
    assert!(exists(&mut db));
    engine.run(&spec, &opts()).expect("run again");

    // drop removes the table and forgets the flow.
    let lines = engine.drop_flow_resources(&spec).expect("drop");
    assert!(lines[0].contains("dropped"), "{lines:?}");
    assert!(lines[1].contains("forgot"), "{lines:?}");
    assert!(!exists(&mut db));
    assert!(matches!(engine.flow("docs"), Err(EngineError::NotFound(_))));
    let lines = engine.drop_flow_resources(&spec).expect("drop again");
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("was not there"), "{lines:?}");
}

#[test]
fn two_flows_cannot_share_a_table() {
    let pg = TestPg::start();
    let url = pg.create_database("shared");
    let root = tempfile::tempdir().expect("root");
    corpus(root.path());
    let dir = tempfile::tempdir().expect("dir");
    let engine = Engine::open(dir.path()).expect("engine");
    engine
        .run(&flow("a", root.path(), pg_target(&url)), &opts())
        .expect("first flow");
    // The same database under other credentials is the same place.
    let other_user = url.replace("postgres@", "postgres:pw@");
    let e = engine
        .run(&flow("b", root.path(), pg_target(&other_user)), &opts())
        .expect_err("second flow on the same table")
        .to_string();
    assert!(e.contains("flow `a`") && e.contains(TABLE), "{e}");
}
