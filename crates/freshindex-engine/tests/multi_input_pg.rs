//! Multi-input flows on PostgreSQL, against a real server: a table of products (a PostgreSQL
//! source whose metadata columns are its fields) looks up a table of companies, over the
//! shared PostgreSQL state store, with a group of the products by category. A changed
//! company reprocesses exactly its products; a deleted one leaves them without a maker; a
//! product moved to another category recomputes the two groups only.

use std::collections::BTreeMap;

use freshindex_core::{Config, FlowSpec};
use freshindex_engine::{Engine, RunOptions, RunSummary};
use freshindex_testpg::TestPg;

fn config(url: &str) -> Vec<FlowSpec> {
    let toml = format!(
        r#"
[[flow]]
name = "products"
[flow.source]
type = "postgres"
url = "{url}"
table = "public.products"
key_columns = ["id"]
content_columns = ["body"]
metadata_columns = ["name", "company_id", "category"]
ordinal_column = "updated_at"
[[flow.steps]]
op = "lookup"
from = "companies"
key = "company_id"
as = "maker"
[[flow.steps]]
op = "template"
text = "{{name}} by {{maker.name}}: {{text}}"
[[flow.steps]]
op = "parse"
[[flow.steps]]
op = "split"
[[flow.steps]]
op = "embed"

[[flow]]
name = "companies"
[flow.source]
type = "postgres"
url = "{url}"
table = "public.companies"
key_columns = ["id"]
content_columns = ["about"]
metadata_columns = ["name"]
ordinal_column = "updated_at"

[[flow]]
name = "categories"
source = {{ type = "flows", from = "products" }}
steps = [
  {{ op = "group", by = "category", aggregate = {{ count = "count", names = "list:name" }} }},
  {{ op = "template", text = "{{key}}: {{names}}" }},
  {{ op = "parse" }}, {{ op = "split" }}, {{ op = "embed" }},
]
"#
    );
    Config::parse(&toml, None).expect("config").flows
}

const CREATE: &str = "
CREATE TABLE companies (
    id text PRIMARY KEY, name text NOT NULL, about text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE products (
    id integer PRIMARY KEY, name text NOT NULL, company_id text, category text,
    body text NOT NULL, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// Every item's text (its chunks joined), by item key.
fn texts(engine: &Engine, flow: &str) -> BTreeMap<String, String> {
    let mut rows = Vec::new();
    engine
        .export(flow, &mut |r| {
            rows.push(r);
            Ok(())
        })
        .expect("export");
    rows.sort_by_key(|r| (r.payload.source.clone(), r.payload.range[0]));
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for r in rows {
        out.entry(r.payload.source.clone())
            .or_default()
            .push_str(&r.payload.text);
    }
    out
}

/// Runs every flow, inputs first; the summaries by flow.
fn run_all(engine: &Engine, flows: &[FlowSpec]) -> BTreeMap<String, RunSummary> {
    let refs: Vec<&FlowSpec> = flows.iter().collect();
    freshindex_core::spec::dependency_order(&refs)
        .into_iter()
        .map(|f| {
            let s = engine.run(f, &RunOptions::default()).expect("run");
            (f.name.clone(), s)
        })
        .collect()
}

fn processed(s: &RunSummary) -> u64 {
    s.items.new + s.items.modified + s.items.deleted
}

#[test]
fn lookups_and_groups_follow_tables_over_the_postgres_store() {
    let pg = TestPg::start();
    let src = pg.create_database("shop");
    let state = pg.create_database("state");
    pg.psql("shop", CREATE);
    pg.psql(
        "shop",
        "INSERT INTO companies (id, name, about) VALUES
           ('acme', 'Acme', 'Tools since 1920.'), ('globex', 'Globex', 'Gadgets.');
         INSERT INTO products (id, name, company_id, category, body)
           SELECT i, 'Item ' || i, CASE WHEN i % 3 = 0 THEN 'globex' ELSE 'acme' END,
                  CASE WHEN i % 2 = 0 THEN 'even' ELSE 'odd' END, 'Body of item ' || i || '.'
           FROM generate_series(1, 30) AS i;",
    );
    let flows = config(&src);
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open_with_store(dir.path(), Some(&state)).expect("engine");
    for f in freshindex_core::spec::dependency_order(&flows.iter().collect::<Vec<_>>()) {
        engine.define_flow(f).expect("define");
    }

    let first = run_all(&engine, &flows);
    assert_eq!(first["products"].items.new, 30);
    assert_eq!(first["categories"].items.new, 2);
    let products = texts(&engine, "products");
    assert_eq!(products["1"], "Item 1 by Acme: Body of item 1.");
    assert_eq!(products["3"], "Item 3 by Globex: Body of item 3.");

    // Nothing changed: nothing is processed.
    let again = run_all(&engine, &flows);
    for (name, s) in &again {
        assert_eq!(processed(s), 0, "{name}: {s:?}");
    }

    // Globex is renamed: exactly its 10 products are processed again.
    pg.psql(
        "shop",
        "UPDATE companies SET name = 'Globex Corp', updated_at = clock_timestamp() WHERE id = 'globex'",
    );
    let renamed = run_all(&engine, &flows);
    assert_eq!(renamed["companies"].items.modified, 1);
    assert_eq!(
        processed(&renamed["products"]),
        10,
        "{:?}",
        renamed["products"]
    );
    let products = texts(&engine, "products");
    assert_eq!(products["3"], "Item 3 by Globex Corp: Body of item 3.");
    assert_eq!(products["1"], "Item 1 by Acme: Body of item 1.");
    // The products' documents changed (their maker did), so both groups follow.
    assert_eq!(processed(&renamed["categories"]), 2);

    // Product 2 moves from `even` to `odd`: its own row and the two groups.
    pg.psql(
        "shop",
        "UPDATE products SET category = 'odd', updated_at = clock_timestamp() WHERE id = 2",
    );
    let moved = run_all(&engine, &flows);
    assert_eq!(processed(&moved["products"]), 1);
    assert_eq!(processed(&moved["categories"]), 2);
    let groups = texts(&engine, "categories");
    assert!(groups["odd"].contains("Item 2,"), "{}", groups["odd"]);
    assert!(!groups["even"].contains("Item 2,"), "{}", groups["even"]);

    // Acme is deleted: its 20 products lose their maker, Globex's keep theirs.
    pg.psql("shop", "DELETE FROM companies WHERE id = 'acme'");
    let deleted = run_all(&engine, &flows);
    assert_eq!(deleted["companies"].items.deleted, 1);
    assert_eq!(processed(&deleted["products"]), 20);
    let products = texts(&engine, "products");
    assert_eq!(products["1"], "Item 1 by : Body of item 1.");
    assert_eq!(products["3"], "Item 3 by Globex Corp: Body of item 3.");

    // A from-scratch build over the same tables (embedded store) gives the same targets.
    let fresh_dir = tempfile::tempdir().expect("tempdir");
    let fresh = Engine::open(fresh_dir.path()).expect("engine");
    for f in freshindex_core::spec::dependency_order(&flows.iter().collect::<Vec<_>>()) {
        fresh.define_flow(f).expect("define");
    }
    run_all(&fresh, &flows);
    for flow in ["products", "categories"] {
        assert_eq!(texts(&engine, flow), texts(&fresh, flow), "{flow}");
    }
}
