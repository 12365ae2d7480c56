//! Crash safety of multi-input flows: `freshindex index` is killed with SIGKILL while a change
//! of a looked-up item (a company) is carried to the items that read it (its products), and
//! the next complete run must be exact — the products target equals a from-scratch index of
//! the same files, every product of the edited company carries its new name, none the old one.
//!
//! Two shapes of the products flow are covered: a files flow with a lookup, and a flows
//! source over a files flow (`cat`) with the same lookup. Kills land in the middle of the
//! products' dependency-triggered reprocess (after a committed batch; after a written but
//! uncommitted batch) and inside the companies run itself (after the company's document and
//! pending keys were recorded; after its target write, before its commit).
//!
//! Batches: with `--workers 1` a run's batches hold 128, then 256, ... items (the engine's
//! default `batch_items` of 1024, whose first batch is an eighth of it). The edited company
//! owns 300 products, so its reprocess takes two batches (128 + 172). A failpoint's hit count
//! spans the flows of one process: the companies flow (inputs first) writes one batch, then
//! the products batches follow.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, SystemTime};

use common::{FlowConfig, Summary, TIMEOUT, Workspace, export_diff, parse_export};
use serde_json::Value;

const COMPANIES: usize = 5;
const PRODUCTS: usize = 600;
/// The company whose name changes; every second product is one of its.
const EDITED: usize = 2;
const OLD_NAME: &str = "Oldcorp Brands";
const NEW_NAME: &str = "Newcorp Holdings Group";
/// Items of the first batch of a run with one worker.
const FIRST_BATCH: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// `products` is a files flow with a lookup on `companies`.
    FilesLookup,
    /// `products` is a flows source over the files flow `cat`, with the same lookup.
    FlowsSource,
}

/// Where the second run is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// In the products reprocess, right after its first batch committed: the rest is not
    /// written at all.
    ProductsAfterFirstCommit,
    /// In the products reprocess, after its second (last) batch reached the target but
    /// before that batch committed.
    ProductsWrittenNotCommitted,
    /// In the companies run, after the edited company's document and pending keys were
    /// recorded, before its target write.
    CompaniesPendingRecorded,
    /// In the companies run, after its target write, before its commit.
    CompaniesTargetWritten,
}

impl Kill {
    fn failpoint(self) -> (&'static str, u32) {
        match self {
            Kill::ProductsAfterFirstCommit => ("batch-committed", 2),
            Kill::ProductsWrittenNotCommitted => ("target-written", 3),
            Kill::CompaniesPendingRecorded => ("pending-recorded", 1),
            Kill::CompaniesTargetWritten => ("target-written", 1),
        }
    }
}

fn company_name(c: usize) -> String {
    match c {
        EDITED => OLD_NAME.to_string(),
        _ => format!("Maker{c} Works"),
    }
}

fn company_of(p: usize) -> usize {
    if p.is_multiple_of(2) {
        EDITED
    } else {
        // The other four companies share the odd products.
        [0, 1, 3, 4][(p / 2) % 4]
    }
}

fn company_file(c: usize, name: &str) -> String {
    format!(
        "---\nname: {name}\ncountry: Country{c}\n---\n{name} designs and ships hardware from plant {c}.\n"
    )
}

fn product_file(p: usize) -> String {
    format!(
        "---\nname: Widget {p}\ncompany: c{}.md\n---\nWidget {p} is a sturdy tool, model {p} of its line, rated {} stars.\n",
        company_of(p),
        p % 5 + 1
    )
}

/// Writes `path` and gives it an mtime of `age` ago, so that size and mtime are trusted.
fn write_dated(path: &std::path::Path, content: &str, age: Duration) {
    common::write_file(path, content);
    let f = fs::File::options()
        .write(true)
        .open(path)
        .expect("open to set mtime");
    f.set_modified(SystemTime::now() - age).expect("set mtime");
}

fn config(shape: Shape) -> String {
    let lookup_steps = r#"steps = [
  { op = "lookup", from = "companies", key = "company", as = "maker", required = true },
  { op = "template", text = "{name} by {maker.name} ({maker.country}): {text}" },
  { op = "parse" }, { op = "split" }, { op = "embed" },
]
"#;
    let companies =
        "[[flow]]\nname = \"companies\"\nsource = { type = \"files\", path = \"companies\" }\n";
    match shape {
        Shape::FilesLookup => format!(
            "[[flow]]\nname = \"products\"\nsource = {{ type = \"files\", path = \"products\" }}\n{lookup_steps}\n{companies}"
        ),
        Shape::FlowsSource => format!(
            "[[flow]]\nname = \"products\"\nsource = {{ type = \"flows\", from = \"cat\" }}\n{lookup_steps}\n{companies}\n\
             [[flow]]\nname = \"cat\"\nsource = {{ type = \"files\", path = \"products\" }}\n"
        ),
    }
}

struct Catalog {
    ws: Workspace,
    shape: Shape,
}

impl Catalog {
    fn new(shape: Shape) -> Catalog {
        let ws = Workspace::new(FlowConfig {
            name: "products".into(),
            path: "products".into(),
            ..FlowConfig::default()
        });
        fs::write(ws.config_path(), config(shape)).expect("write config");
        let old = Duration::from_secs(7200);
        for c in 0..COMPANIES {
            write_dated(
                &ws.root().join(format!("companies/c{c}.md")),
                &company_file(c, &company_name(c)),
                old,
            );
        }
        for p in 0..PRODUCTS {
            write_dated(&ws.src().join(format!("p{p:04}.md")), &product_file(p), old);
        }
        Catalog { ws, shape }
    }

    /// Renames the edited company (the file's size changes, and its mtime too).
    fn rename_company(&self) {
        write_dated(
            &self.ws.root().join(format!("companies/c{EDITED}.md")),
            &company_file(EDITED, NEW_NAME),
            Duration::from_secs(3600),
        );
    }

    /// `index --json --workers 1` to completion in `data`: the summaries by flow.
    fn index_in(&self, data: &std::path::Path) -> BTreeMap<String, Summary> {
        let out = self
            .ws
            .fi_with_data(data)
            .args(["index", "--json", "--workers", "1"])
            .run()
            .ok();
        let v = out.json();
        let all = v
            .as_array()
            .unwrap_or_else(|| panic!("several flows give a JSON array: {v}"));
        all.iter()
            .map(|s| {
                let flow = s
                    .get("flow")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("summary without `flow`: {s}"))
                    .to_string();
                (flow, Summary(s.clone()))
            })
            .collect()
    }

    fn index(&self) -> BTreeMap<String, Summary> {
        self.index_in(&self.ws.data())
    }

    fn export_in(&self, data: &std::path::Path, flow: &str) -> String {
        self.ws
            .fi_with_data(data)
            .args(["export", "--flow", flow])
            .run()
            .ok()
            .stdout
    }

    /// Exports of `companies` and `products` from a from-scratch index of the same files.
    fn fresh(&self) -> (String, String) {
        let data = tempfile::Builder::new()
            .prefix("freshindex-fresh-")
            .tempdir()
            .expect("create fresh data dir");
        let summaries = self.index_in(data.path());
        for (flow, s) in &summaries {
            s.assert_clean();
            assert!(s.n("items.seen") > 0, "flow {flow}: {}", s.0);
        }
        (
            self.export_in(data.path(), "companies"),
            self.export_in(data.path(), "products"),
        )
    }

    /// Items the products run processed again.
    fn reprocessed(&self, s: &Summary) -> u64 {
        match self.shape {
            Shape::FilesLookup => s.n("items.new") + s.n("items.modified"),
            Shape::FlowsSource => s.n("items.new") + s.n("items.modified") + s.n("items.deleted"),
        }
    }
}

/// Texts of the products rows, by source.
fn product_texts(export: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for row in parse_export(export) {
        out.entry(row.source.clone())
            .or_default()
            .push_str(&row.text);
    }
    out
}

/// The index of the product a row's source names (`p0042.md` or a key ending in it).
fn product_number(source: &str) -> usize {
    let file = source.rsplit('/').next().unwrap_or(source);
    let digits: String = file.chars().filter(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("unexpected product source {source:?}"))
}

fn assert_names(export: &str, what: &str) {
    let texts = product_texts(export);
    assert_eq!(texts.len(), PRODUCTS, "{what}: products with rows");
    for (source, text) in &texts {
        assert!(
            !text.contains(OLD_NAME),
            "{what}: product {source} still names the old company: {text:?}"
        );
        let p = product_number(source);
        if company_of(p) == EDITED {
            assert!(
                text.contains(NEW_NAME),
                "{what}: product {source} does not carry the new company name: {text:?}"
            );
        } else {
            assert!(
                text.contains(&company_name(company_of(p))),
                "{what}: product {source} lost its company's name: {text:?}"
            );
        }
    }
}

fn crash_and_recover(shape: Shape, kill: Kill) {
    let cat = Catalog::new(shape);
    let edited = (0..PRODUCTS).filter(|&p| company_of(p) == EDITED).count();
    assert!(edited > FIRST_BATCH, "the reprocess must span batches");

    let first = cat.index();
    for (flow, s) in &first {
        s.assert_clean();
        assert!(s.n("items.new") > 0, "flow {flow}: {}", s.0);
    }
    let before = cat.ws.export();
    let texts = product_texts(&before);
    assert_eq!(texts.len(), PRODUCTS, "products indexed by the first run");
    let old_rows = texts.values().filter(|t| t.contains(OLD_NAME)).count();
    assert_eq!(
        old_rows, edited,
        "products naming the company before the edit"
    );

    cat.rename_company();
    let (point, nth) = kill.failpoint();
    let mut child = cat
        .ws
        .fi()
        .args(["index", "--json", "--workers", "1"])
        .env("FRESHINDEX_FAILPOINT", format!("{point}:{nth}"))
        .spawn();
    assert!(
        child.wait_stderr(&format!("failpoint {point} reached"), TIMEOUT),
        "{shape:?}/{kill:?}: the run ended without reaching {point}:{nth}"
    );
    assert!(
        child.kill(),
        "{shape:?}/{kill:?}: the run ended before the kill"
    );

    // Where the kill landed, as the target shows it.
    let cut = product_texts(&cat.ws.export());
    let renamed = cut.values().filter(|t| t.contains(NEW_NAME)).count();
    let expect_done = match kill {
        Kill::ProductsAfterFirstCommit => {
            assert_eq!(
                renamed, FIRST_BATCH,
                "{shape:?}/{kill:?}: the kill should come after exactly one products batch"
            );
            FIRST_BATCH
        }
        Kill::ProductsWrittenNotCommitted => {
            // Both batches reached the target; the second was never committed.
            assert_eq!(renamed, edited, "{shape:?}/{kill:?}: rows after the kill");
            FIRST_BATCH
        }
        Kill::CompaniesPendingRecorded | Kill::CompaniesTargetWritten => {
            assert_eq!(
                renamed, 0,
                "{shape:?}/{kill:?}: the products must not have run yet"
            );
            0
        }
    };

    let rerun = cat.index();
    for (flow, s) in &rerun {
        assert_eq!(s.status(), "success", "flow {flow}: {}", s.0);
        assert!(s.errors().is_empty(), "flow {flow}: {}", s.0);
    }
    let products = &rerun["products"];
    let reprocessed = cat.reprocessed(products);
    let left = (edited - expect_done) as u64;
    println!(
        "{shape:?}/{kill:?}: {renamed} renamed rows after the kill, {left} products not done, the rerun reprocessed {reprocessed}"
    );
    assert!(
        reprocessed >= left,
        "{shape:?}/{kill:?}: the rerun reprocessed {reprocessed} products, {left} were not done: {}",
        products.0
    );
    assert!(
        reprocessed <= edited as u64,
        "{shape:?}/{kill:?}: the rerun reprocessed {reprocessed} products, only {edited} read the edited company: {}",
        products.0
    );
    assert_eq!(
        products.n("items.seen"),
        PRODUCTS as u64,
        "{shape:?}/{kill:?}: {}",
        products.0
    );

    let got_products = cat.ws.export();
    let got_companies = cat.export_in(&cat.ws.data(), "companies");
    assert_names(&got_products, &format!("{shape:?}/{kill:?}"));
    let (want_companies, want_products) = cat.fresh();
    assert!(
        got_products == want_products,
        "{shape:?}/{kill:?}: products after recovery differ from a from-scratch index:\n{}",
        export_diff(&want_products, &got_products)
    );
    assert!(
        got_companies == want_companies,
        "{shape:?}/{kill:?}: companies after recovery differ from a from-scratch index:\n{}",
        export_diff(&want_companies, &got_companies)
    );

    // Recovered state is a fixpoint: nothing left to do.
    let again = cat.index();
    for (flow, s) in &again {
        assert_eq!(
            s.n("items.unchanged"),
            s.n("items.seen"),
            "{shape:?}/{kill:?}: flow {flow} after recovery: {}",
            s.0
        );
        assert_eq!(s.n("embeddings.computed"), 0, "flow {flow}: {}", s.0);
    }
    assert_eq!(
        cat.ws.export(),
        got_products,
        "a no-op run changed products"
    );
}

#[test]
fn files_lookup_killed_after_the_first_products_batch_committed() {
    crash_and_recover(Shape::FilesLookup, Kill::ProductsAfterFirstCommit);
}

#[test]
fn files_lookup_killed_after_a_products_batch_was_written_but_not_committed() {
    crash_and_recover(Shape::FilesLookup, Kill::ProductsWrittenNotCommitted);
}

#[test]
fn files_lookup_killed_in_the_companies_run_after_pending_recorded() {
    crash_and_recover(Shape::FilesLookup, Kill::CompaniesPendingRecorded);
}

#[test]
fn files_lookup_killed_in_the_companies_run_after_target_written() {
    crash_and_recover(Shape::FilesLookup, Kill::CompaniesTargetWritten);
}

#[test]
fn flows_source_killed_after_the_first_products_batch_committed() {
    crash_and_recover(Shape::FlowsSource, Kill::ProductsAfterFirstCommit);
}

#[test]
fn flows_source_killed_after_a_products_batch_was_written_but_not_committed() {
    crash_and_recover(Shape::FlowsSource, Kill::ProductsWrittenNotCommitted);
}

#[test]
fn flows_source_killed_in_the_companies_run_after_pending_recorded() {
    crash_and_recover(Shape::FlowsSource, Kill::CompaniesPendingRecorded);
}

#[test]
fn flows_source_killed_in_the_companies_run_after_target_written() {
    crash_and_recover(Shape::FlowsSource, Kill::CompaniesTargetWritten);
}
