//! The binary over a PostgreSQL source: `setup` installs the notify trigger, `index` reads
//! the table, `search` finds a row's text, a second `index` after changes applies them, and
//! `drop` removes the trigger.

mod common;

use common::Fi;
use freshindex_testpg::TestPg;

#[test]
fn setup_index_search_and_drop_over_a_table() {
    let pg = TestPg::start();
    let url = pg.create_database("cli");
    pg.psql(
        "cli",
        "CREATE TABLE docs (id integer PRIMARY KEY, title text NOT NULL, body text NOT NULL,
           updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO docs (id, title, body) VALUES
           (1, 'Astronomy', 'The telescope tracked a faint nebula while the comet crossed Orion.'),
           (2, 'Cooking', 'Whisk butter and flour into a roux, then add milk slowly.')",
    );
    let dir = tempfile::Builder::new()
        .prefix("freshindex-pg-cli-")
        .tempdir()
        .expect("temp dir");
    std::fs::write(
        dir.path().join("freshindex.toml"),
        r#"
[[flow]]
name = "docs"

[flow.source]
type = "postgres"
url_env = "DOCS_DATABASE_URL"
table = "public.docs"
key_columns = ["id"]
content_columns = ["title", "body"]
ordinal_column = "updated_at"
notify = true
"#,
    )
    .expect("config");
    let fi = || Fi::new(dir.path()).env("DOCS_DATABASE_URL", &url);

    let out = fi().args(["setup"]).run().ok();
    assert!(
        out.stdout.contains("trigger freshindex_docs"),
        "{}",
        out.stdout
    );
    let triggers = "SELECT count(*) FROM pg_trigger WHERE tgname = 'freshindex_docs'";
    assert_eq!(pg.psql("cli", triggers), "1");

    let s = fi().args(["index", "--json"]).run().ok().summary();
    assert_eq!(s.n("items.new"), 2, "{}", s.0);
    s.assert_clean();

    let hits = fi()
        .args(["search", "telescope nebula comet", "--json"])
        .run()
        .ok()
        .json();
    assert_eq!(hits[0]["source"], "1", "{hits}");
    assert!(
        hits[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("faint nebula")),
        "{hits}"
    );

    pg.psql("cli", "DELETE FROM docs WHERE id = 1");
    let s = fi().args(["index", "--json"]).run().ok().summary();
    assert_eq!(s.n("items.deleted"), 1, "{}", s.0);
    let hits = fi()
        .args(["search", "telescope nebula comet", "--json"])
        .run()
        .ok()
        .json();
    assert!(
        hits.as_array()
            .is_some_and(|h| h.iter().all(|h| h["source"] != "1")),
        "{hits}"
    );

    // Without the variable, the error names it.
    let out = Fi::new(dir.path()).args(["index"]).run().failed();
    assert!(out.stderr.contains("DOCS_DATABASE_URL"), "{}", out.stderr);

    let out = fi().args(["drop"]).run().ok();
    assert!(out.stdout.contains("removed"), "{}", out.stdout);
    assert_eq!(pg.psql("cli", triggers), "0");
}
