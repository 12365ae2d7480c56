//! A flow with a PostgreSQL target through the real binary and a real server: `setup` creates
//! the table, `index` fills it, `search` and `status` read it, `drop` removes it and forgets
//! the flow. The connection string comes from an environment variable (`url_env`).

mod common;

use common::Fi;
use freshindex_testpg::TestPg;
use postgres::{Client, NoTls};

const TABLE: &str = "public.cli_chunks";

fn config(root: &std::path::Path) {
    std::fs::write(
        root.join("freshindex.toml"),
        format!(
            "[[flow]]\n\
             name = \"docs\"\n\
             source = {{ type = \"files\", path = \"docs\" }}\n\
             steps = [{{ op = \"parse\" }}, {{ op = \"split\", chunk_size = 300, chunk_overlap = 0 }}, {{ op = \"embed\" }}]\n\
             [flow.target]\n\
             type = \"postgres\"\n\
             url_env = \"FRESHINDEX_TEST_PG_URL\"\n\
             table = \"{TABLE}\"\n"
        ),
    )
    .expect("config");
}

fn table_exists(db: &mut Client) -> bool {
    db.query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .expect("regclass")
        .get(0)
}

#[test]
fn setup_index_search_drop() {
    let pg = TestPg::start();
    let url = pg.create_database("cli");
    let mut db = Client::connect(&url, NoTls).expect("connect");
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path();
    config(root);
    for (name, topic) in [
        ("harbor.md", "harbor cranes and container ships"),
        ("orchard.md", "orchard apples and pear trees"),
        ("sub/comet.md", "comet tails and orbits"),
    ] {
        common::write_file(
            &root.join("docs").join(name),
            format!("# {topic}\n\n{}", format!("Notes on {topic}. ").repeat(30)),
        );
    }
    let fi = |args: &[&str]| {
        Fi::new(root)
            .arg("--data-dir")
            .arg(root.join("data"))
            .env("FRESHINDEX_TEST_PG_URL", &url)
            .args(args)
    };

    // Without the variable, the error names it.
    let out = Fi::new(root)
        .arg("--data-dir")
        .arg(root.join("data"))
        .args(["setup"])
        .run()
        .failed();
    assert!(
        out.stderr.contains("FRESHINDEX_TEST_PG_URL") && out.stderr.contains("not set"),
        "{}",
        out.stderr
    );

    let out = fi(&["setup"]).run().ok();
    assert!(
        out.stdout
            .contains("created PostgreSQL table `public.cli_chunks`")
            && out.stdout.contains("real[]"),
        "{}",
        out.stdout
    );
    assert!(table_exists(&mut db));
    let out = fi(&["setup", "--flow", "docs"]).run().ok();
    assert!(out.stdout.contains("already there"), "{}", out.stdout);

    let summary = fi(&["index", "--json"]).run().ok().summary();
    assert_eq!(summary.n("items.new"), 3);
    let total = summary.n("rows.total");
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .expect("count")
        .get(0);
    assert_eq!(n as u64, total);
    assert!(total >= 3);

    let hits = fi(&["search", "comet orbits", "--json", "-k", "3"])
        .run()
        .ok()
        .json();
    assert_eq!(hits[0]["source"], "sub/comet.md", "{hits}");
    let hits = fi(&["search", "comet", "--json", "--source-prefix", "orch"])
        .run()
        .ok()
        .json();
    assert_eq!(hits[0]["source"], "orchard.md", "{hits}");

    let status = fi(&["status", "--json"]).run().ok().json();
    assert_eq!(status["rows"], total, "{status}");
    assert_eq!(status["collection"], TABLE, "{status}");
    let export = fi(&["export"]).run().ok().stdout;
    assert_eq!(export.lines().count() as u64, total);

    let out = fi(&["drop"]).run().ok();
    assert!(
        out.stdout
            .contains("dropped PostgreSQL table `public.cli_chunks`")
            && out.stdout.contains("forgot"),
        "{}",
        out.stdout
    );
    assert!(!table_exists(&mut db));
    let out = fi(&["status", "--flow", "docs"]).run().failed();
    assert!(out.stderr.contains("not defined"), "{}", out.stderr);

    // `index` needs no setup: it creates the table.
    let summary = fi(&["index", "--json"]).run().ok().summary();
    assert_eq!(summary.n("rows.total"), total);
    assert!(table_exists(&mut db));
}
