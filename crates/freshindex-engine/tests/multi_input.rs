//! Multi-input flows (lookups, merges, groups) driven through the real engine on folders of
//! Markdown files with front matter, with the built-in embedder.
//!
//! The model-based test applies random operation sequences to three source folders and,
//! after every run of all flows, checks each derived flow's target against a from-scratch
//! build and the number of items each run processed against an independent model: the
//! derived items whose inputs changed, computed from the files the test wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use freshindex_core::{Config, FlowSpec};
use freshindex_engine::{Engine, EngineError, RunOptions, RunSummary};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Engine helpers
// ---------------------------------------------------------------------------------------

const TAIL: &str = r#"{ op = "parse" }, { op = "split", chunk_size = 400, chunk_overlap = 0 }, { op = "embed", model = "builtin" }"#;

fn files_flow(name: &str, path: &Path) -> String {
    format!(
        "[[flow]]\nname = \"{name}\"\nsource = {{ type = \"files\", path = '{}' }}\nsteps = [{TAIL}]\n\n",
        path.display()
    )
}

/// The config of the model test: three folders, and the flows that read them.
fn model_config(root: &Path) -> Vec<FlowSpec> {
    let mut toml = String::new();
    toml += &files_flow("companies", &root.join("companies"));
    toml += &files_flow("cat_a", &root.join("cat_a"));
    toml += &files_flow("cat_b", &root.join("cat_b"));
    toml += &format!(
        r#"[[flow]]
name = "products"
source = {{ type = "flows", from = "cat_a" }}
steps = [
  {{ op = "lookup", from = "companies", key = "company", as = "co" }},
  {{ op = "template", text = "{{name}} ({{sku}}, {{category}}) by {{co.name}} of {{co.country}}: {{text}}" }},
  {TAIL},
]

[[flow]]
name = "catalog"
source = {{ type = "flows", from = ["cat_a", "cat_b"], merge_key = "sku" }}
steps = [{TAIL}]

[[flow]]
name = "catalog_list"
source = {{ type = "flows", from = ["cat_a", "cat_b"], merge_key = "sku", merge = "list" }}
steps = [{TAIL}]

[[flow]]
name = "categories"
source = {{ type = "flows", from = "cat_a" }}
steps = [
  {{ op = "group", by = "category", aggregate = {{ n = "count", names = "list:name" }} }},
  {{ op = "template", text = "Category {{key}}: {{n}} products: {{names}}" }},
  {TAIL},
]
"#
    );
    Config::parse(&toml, None)
        .unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
        .flows
}

/// Defines every flow (inputs first), so that inputs keep documents before they run.
fn define_all(engine: &Engine, flows: &[FlowSpec]) {
    for f in flows {
        engine
            .define_flow(f)
            .unwrap_or_else(|e| panic!("define {}: {e}", f.name));
    }
}

fn run(engine: &Engine, spec: &FlowSpec) -> RunSummary {
    let opts = RunOptions {
        workers: 2,
        ..RunOptions::default()
    };
    engine
        .run(spec, &opts)
        .unwrap_or_else(|e| panic!("run {}: {e}", spec.name))
}

/// Runs every flow in the (dependency) order of the config.
fn run_all(engine: &Engine, flows: &[FlowSpec]) -> BTreeMap<String, RunSummary> {
    flows
        .iter()
        .map(|f| (f.name.clone(), run(engine, f)))
        .collect()
}

/// A target row as compared: row key, source key, text, metadata.
type RowView = (String, String, String, String);

fn export(engine: &Engine, flow: &str) -> Vec<RowView> {
    let mut rows = Vec::new();
    engine
        .export(flow, &mut |r| {
            rows.push((
                r.key,
                r.payload.source,
                r.payload.text,
                r.payload
                    .metadata
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            ));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("export {flow}: {e}"));
    rows.sort();
    rows
}

fn sources(rows: &[RowView]) -> BTreeSet<String> {
    rows.iter().map(|r| r.1.clone()).collect()
}

fn texts_of(rows: &[RowView], source: &str) -> String {
    rows.iter()
        .filter(|r| r.1 == source)
        .map(|r| r.2.as_str())
        .collect::<Vec<_>>()
        .join("|")
}

/// Writes a file and sets its mtime explicitly (a distinct second per write).
fn write_at(path: &Path, bytes: &[u8], clock: &mut u64) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("mkdir");
    }
    fs::write(path, bytes).expect("write");
    set_mtime(path, clock);
}

fn set_mtime(path: &Path, clock: &mut u64) {
    *clock += 7;
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + *clock);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
}

fn processed(s: &RunSummary) -> u64 {
    s.items.new + s.items.modified + s.items.deleted
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

const COMPANY_NAMES: [&str; 2] = ["Acme", "Globex"];
const COUNTRIES: [&str; 2] = ["France", "Peru"];
const CATEGORIES: [&str; 3] = ["tools", "toys", "food"];
const SKUS: [&str; 3] = ["s1", "s2", "s3"];
const NAMES: [&str; 3] = ["Drill", "Kite", "Bread"];
const BODIES: [&str; 3] = [
    "Sturdy and red.",
    "Light, blue and quick.",
    "Baked every morning.",
];
/// Company files that can exist; products may also name `c3.md`, which never does.
const N_COMPANIES: u8 = 3;
const N_PRODUCT_KEYS: u8 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    Companies,
    CatA,
    CatB,
}

impl Dir {
    fn folder(self) -> &'static str {
        match self {
            Dir::Companies => "companies",
            Dir::CatA => "cat_a",
            Dir::CatB => "cat_b",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Company {
    name: u8,
    country: u8,
    body: u8,
    /// Formatting only: a comment line in the front matter (0: none).
    noise: u8,
}

#[derive(Clone, Debug, PartialEq)]
struct Product {
    company: Option<u8>,
    category: Option<u8>,
    sku: Option<u8>,
    name: u8,
    body: u8,
    /// Formatting only: a comment line (0: none) and quotes around the name.
    noise: u8,
    quoted: bool,
}

#[derive(Clone, Debug, PartialEq)]
enum File {
    Company(Company),
    Product(Product),
}

/// A document as the model sees it: the item's key, its front matter fields and its body.
type Doc = BTreeMap<String, String>;

impl File {
    fn bytes(&self) -> Vec<u8> {
        let mut s = String::from("---\n");
        match self {
            File::Company(c) => {
                s += &format!("name: {}\n", COMPANY_NAMES[c.name as usize]);
                if c.noise > 0 {
                    s += &format!("# revision {}\n", c.noise);
                }
                s += &format!("country: {}\n", COUNTRIES[c.country as usize]);
                s += "---\n";
                s += BODIES[c.body as usize];
                s += "\n";
            }
            File::Product(p) => {
                if let Some(c) = p.company {
                    s += &format!("company: c{c}.md\n");
                }
                if let Some(c) = p.category {
                    s += &format!("category: {}\n", CATEGORIES[c as usize]);
                }
                if p.noise > 0 {
                    s += &format!("# revision {}\n", p.noise);
                }
                if let Some(k) = p.sku {
                    s += &format!("sku: {}\n", SKUS[k as usize]);
                }
                if p.quoted {
                    s += &format!("name: \"{}\"\n", NAMES[p.name as usize]);
                } else {
                    s += &format!("name: {}\n", NAMES[p.name as usize]);
                }
                s += "---\n";
                s += BODIES[p.body as usize];
                s += "\n";
            }
        }
        s.into_bytes()
    }

    /// The fields an item of this file has (what its flow's document holds).
    fn doc(&self, key: &str) -> Doc {
        let mut d = Doc::new();
        d.insert("key".into(), key.into());
        match self {
            File::Company(c) => {
                d.insert("name".into(), COMPANY_NAMES[c.name as usize].into());
                d.insert("country".into(), COUNTRIES[c.country as usize].into());
                d.insert("text".into(), format!("{}\n", BODIES[c.body as usize]));
            }
            File::Product(p) => {
                if let Some(c) = p.company {
                    d.insert("company".into(), format!("c{c}.md"));
                }
                if let Some(c) = p.category {
                    d.insert("category".into(), CATEGORIES[c as usize].into());
                }
                if let Some(k) = p.sku {
                    d.insert("sku".into(), SKUS[k as usize].into());
                }
                d.insert("name".into(), NAMES[p.name as usize].into());
                d.insert("text".into(), format!("{}\n", BODIES[p.body as usize]));
            }
        }
        d
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct State {
    files: BTreeMap<(Dir, String), File>,
}

impl State {
    fn keys(&self, dir: Dir) -> impl Iterator<Item = &String> {
        self.files
            .keys()
            .filter(move |(d, _)| *d == dir)
            .map(|(_, k)| k)
    }

    fn doc(&self, dir: Dir, key: &str) -> Option<Doc> {
        self.files.get(&(dir, key.to_string())).map(|f| f.doc(key))
    }

    /// Keys of `dir` whose bytes differ (created, deleted or edited).
    fn byte_changes(&self, before: &State, dir: Dir) -> usize {
        let keys: BTreeSet<&String> = self.keys(dir).chain(before.keys(dir)).collect();
        keys.into_iter()
            .filter(|k| {
                let key = (dir, (*k).clone());
                self.files.get(&key).map(File::bytes) != before.files.get(&key).map(File::bytes)
            })
            .count()
    }

    /// The members of each group: `field` of the docs of `dirs` (in priority order), each
    /// member as (priority, key, doc).
    fn groups(&self, dirs: &[Dir], field: &str) -> BTreeMap<String, Vec<(usize, Doc)>> {
        let mut out: BTreeMap<String, Vec<(usize, Doc)>> = BTreeMap::new();
        for (i, dir) in dirs.iter().enumerate() {
            for k in self.keys(*dir) {
                let doc = self.doc(*dir, k).expect("doc");
                if let Some(g) = doc.get(field).cloned() {
                    out.entry(g).or_default().push((i, doc));
                }
            }
        }
        out
    }
}

/// The groups whose members (who, and their documents) differ between two states.
fn changed_groups(before: &State, after: &State, dirs: &[Dir], field: &str) -> usize {
    let b = before.groups(dirs, field);
    let a = after.groups(dirs, field);
    let names: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
    names.into_iter().filter(|g| b.get(*g) != a.get(*g)).count()
}

/// The `products` items to process: those whose own `cat_a` document changed (created,
/// edited, deleted, renamed), and those whose looked-up company document changed (created,
/// edited, deleted).
fn changed_products(before: &State, after: &State) -> usize {
    let keys: BTreeSet<&String> = before
        .keys(Dir::CatA)
        .chain(after.keys(Dir::CatA))
        .collect();
    keys.into_iter()
        .filter(|k| {
            let b = before.doc(Dir::CatA, k);
            let a = after.doc(Dir::CatA, k);
            if a != b {
                return true;
            }
            match b.as_ref().and_then(|d| d.get("company")) {
                Some(c) => before.doc(Dir::Companies, c) != after.doc(Dir::Companies, c),
                None => false,
            }
        })
        .count()
}

/// What each flow's run must process after the step from `before` to `after`.
fn expected_processed(before: &State, after: &State) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    m.insert("companies", after.byte_changes(before, Dir::Companies));
    m.insert("cat_a", after.byte_changes(before, Dir::CatA));
    m.insert("cat_b", after.byte_changes(before, Dir::CatB));
    m.insert("products", changed_products(before, after));
    let merged = changed_groups(before, after, &[Dir::CatA, Dir::CatB], "sku");
    m.insert("catalog", merged);
    m.insert("catalog_list", merged);
    m.insert(
        "categories",
        changed_groups(before, after, &[Dir::CatA], "category"),
    );
    m
}

/// The items each derived target must have (by source key).
fn expected_items(state: &State) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut m = BTreeMap::new();
    m.insert("products", state.keys(Dir::CatA).cloned().collect());
    let skus: BTreeSet<String> = state
        .groups(&[Dir::CatA, Dir::CatB], "sku")
        .into_keys()
        .collect();
    m.insert("catalog", skus.clone());
    m.insert("catalog_list", skus);
    m.insert(
        "categories",
        state.groups(&[Dir::CatA], "category").into_keys().collect(),
    );
    m
}

#[derive(Clone, Debug)]
enum Op {
    PutCompany(u8, Company),
    DelCompany(u8),
    PutProduct(Dir, u8, Product),
    DelProduct(Dir, u8),
    /// Renames the `pick`-th existing product file of the folder to key `to`.
    Rename(Dir, u8, u8),
    /// Rewrites the `pick`-th existing file with the same bytes (a new mtime).
    Touch(u8),
    /// Changes only the formatting of the `pick`-th existing file.
    Reformat(u8, u8, bool),
}

fn company() -> impl Strategy<Value = Company> {
    (0u8..2, 0u8..2, 0u8..3, 0u8..3).prop_map(|(name, country, body, noise)| Company {
        name,
        country,
        body,
        noise,
    })
}

fn product() -> impl Strategy<Value = Product> {
    (
        proptest::option::weighted(0.9, 0u8..=N_COMPANIES),
        proptest::option::weighted(0.9, 0u8..3),
        proptest::option::weighted(0.9, 0u8..3),
        0u8..3,
        0u8..3,
        0u8..3,
        any::<bool>(),
    )
        .prop_map(
            |(company, category, sku, name, body, noise, quoted)| Product {
                company,
                category,
                sku,
                name,
                body,
                noise,
                quoted,
            },
        )
}

fn cat() -> impl Strategy<Value = Dir> {
    prop_oneof![3 => Just(Dir::CatA), 2 => Just(Dir::CatB)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..N_COMPANIES, company()).prop_map(|(c, v)| Op::PutCompany(c, v)),
        1 => (0..N_COMPANIES).prop_map(Op::DelCompany),
        5 => (cat(), 0..N_PRODUCT_KEYS, product()).prop_map(|(d, k, p)| Op::PutProduct(d, k, p)),
        2 => (cat(), 0..N_PRODUCT_KEYS).prop_map(|(d, k)| Op::DelProduct(d, k)),
        2 => (cat(), any::<u8>(), 0..N_PRODUCT_KEYS).prop_map(|(d, p, t)| Op::Rename(d, p, t)),
        1 => any::<u8>().prop_map(Op::Touch),
        1 => (any::<u8>(), 0u8..3, any::<bool>()).prop_map(|(p, n, q)| Op::Reformat(p, n, q)),
    ]
}

/// A first step that fills the folders, then steps of one to three operations.
fn scenario() -> impl Strategy<Value = (Vec<Op>, Vec<Vec<Op>>)> {
    (
        proptest::collection::vec(op(), 4..10),
        proptest::collection::vec(proptest::collection::vec(op(), 1..=3), 4..=7),
    )
}

struct World {
    root: PathBuf,
    state: State,
    clock: u64,
}

impl World {
    fn path(&self, dir: Dir, key: &str) -> PathBuf {
        self.root.join(dir.folder()).join(key)
    }

    fn put(&mut self, dir: Dir, key: String, file: File) {
        let path = self.path(dir, &key);
        write_at(&path, &file.bytes(), &mut self.clock);
        self.state.files.insert((dir, key), file);
    }

    fn delete(&mut self, dir: Dir, key: &str) {
        if self.state.files.remove(&(dir, key.to_string())).is_some() {
            fs::remove_file(self.path(dir, key)).expect("remove");
        }
    }

    fn pick(&self, n: u8, dir: Option<Dir>) -> Option<(Dir, String)> {
        let all: Vec<&(Dir, String)> = self
            .state
            .files
            .keys()
            .filter(|(d, _)| dir.is_none_or(|x| x == *d))
            .collect();
        (!all.is_empty()).then(|| all[n as usize % all.len()].clone())
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::PutCompany(c, v) => {
                self.put(Dir::Companies, format!("c{c}.md"), File::Company(v.clone()))
            }
            Op::DelCompany(c) => self.delete(Dir::Companies, &format!("c{c}.md")),
            Op::PutProduct(d, k, p) => self.put(*d, format!("p{k}.md"), File::Product(p.clone())),
            Op::DelProduct(d, k) => self.delete(*d, &format!("p{k}.md")),
            Op::Rename(d, pick, to) => {
                let Some((_, from)) = self.pick(*pick, Some(*d)) else {
                    return;
                };
                let to = format!("p{to}.md");
                if self.state.files.contains_key(&(*d, to.clone())) {
                    return;
                }
                fs::rename(self.path(*d, &from), self.path(*d, &to)).expect("rename");
                let f = self.state.files.remove(&(*d, from)).expect("file");
                self.state.files.insert((*d, to), f);
            }
            Op::Touch(pick) => {
                if let Some((d, k)) = self.pick(*pick, None) {
                    let f = self.state.files[&(d, k.clone())].clone();
                    self.put(d, k, f);
                }
            }
            Op::Reformat(pick, noise, quoted) => {
                if let Some((d, k)) = self.pick(*pick, None) {
                    let mut f = self.state.files[&(d, k.clone())].clone();
                    match &mut f {
                        File::Company(c) => c.noise = *noise,
                        File::Product(p) => {
                            p.noise = *noise;
                            p.quoted = *quoted;
                        }
                    }
                    self.put(d, k, f);
                }
            }
        }
    }
}

/// Builds the folders' current state from scratch in a new data directory.
fn from_scratch(flows: &[FlowSpec]) -> BTreeMap<String, Vec<RowView>> {
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    define_all(&engine, flows);
    let summaries = run_all(&engine, flows);
    for (name, s) in &summaries {
        assert!(
            s.errors.is_empty() && s.items.failed == 0,
            "from scratch, {name}: {s:?}"
        );
    }
    flows
        .iter()
        .map(|f| (f.name.clone(), export(&engine, &f.name)))
        .collect()
}

const DERIVED: [&str; 4] = ["products", "catalog", "catalog_list", "categories"];

fn check_scenario(first: &[Op], steps: &[Vec<Op>]) {
    let src = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    for d in [Dir::Companies, Dir::CatA, Dir::CatB] {
        fs::create_dir_all(src.path().join(d.folder())).expect("mkdir");
    }
    let flows = model_config(src.path());
    let engine = Engine::open(data.path()).expect("engine");
    define_all(&engine, &flows);
    let mut world = World {
        root: src.path().to_path_buf(),
        state: State::default(),
        clock: 0,
    };
    let all_steps = std::iter::once(first.to_vec()).chain(steps.iter().cloned());
    for (n, ops) in all_steps.enumerate() {
        let before = world.state.clone();
        for op in &ops {
            world.apply(op);
        }
        let summaries = run_all(&engine, &flows);
        let ctx = || {
            format!(
                "step {n} {ops:?}\nstate before: {before:?}\nstate after: {:?}",
                world.state
            )
        };
        // (b) exactly the items whose inputs changed were processed.
        let want = expected_processed(&before, &world.state);
        for (flow, want) in &want {
            let s = &summaries[*flow];
            assert_eq!(
                (s.items.failed, s.items.skipped, s.errors.len()),
                (0, 0, 0),
                "{flow}: {s:?}\n{}",
                ctx()
            );
            assert_eq!(
                processed(s),
                *want as u64,
                "{flow} processed {} items (new {}, modified {}, deleted {}), the model says {want}\n{}",
                processed(s),
                s.items.new,
                s.items.modified,
                s.items.deleted,
                ctx()
            );
        }
        // (a) each derived target equals a from-scratch build of the same files.
        let scratch = from_scratch(&flows);
        let items = expected_items(&world.state);
        for flow in DERIVED {
            let got = export(&engine, flow);
            assert_eq!(
                got,
                scratch[flow],
                "{flow}: the incremental target differs from a from-scratch build\n{}",
                ctx()
            );
            assert_eq!(sources(&got), items[flow], "{flow}: items\n{}", ctx());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MULTI_INPUT_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 200,
        max_shrink_time: 120_000,
        .. ProptestConfig::default()
    })]

    #[test]
    fn derived_flows_match_a_from_scratch_build_and_process_exactly_what_changed(
        (first, steps) in scenario()
    ) {
        check_scenario(&first, &steps);
    }
}

// ---------------------------------------------------------------------------------------
// Cycles and unknown inputs
// ---------------------------------------------------------------------------------------

fn lookup_flow(name: &str, from: &str) -> String {
    format!(
        "[[flow]]\nname = \"{name}\"\nsource = {{ type = \"files\", path = 'docs/{name}' }}\nsteps = [\n  {{ op = \"lookup\", from = \"{from}\", key = \"ref\", as = \"other\" }},\n  {TAIL},\n]\n\n"
    )
}

fn reading_flow(name: &str, from: &str) -> String {
    format!(
        "[[flow]]\nname = \"{name}\"\nsource = {{ type = \"flows\", from = \"{from}\" }}\nsteps = [{TAIL}]\n\n"
    )
}

/// The 1-based line of the `[[flow]]` header of flow `name` in `toml`, and of the next
/// header (or the end).
fn flow_lines(toml: &str, name: &str) -> (usize, usize) {
    let lines: Vec<&str> = toml.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == format!("name = \"{name}\""))
        .expect("flow");
    let header = (0..at)
        .rev()
        .find(|&i| lines[i] == "[[flow]]")
        .expect("header");
    let next = (at..lines.len())
        .find(|&i| lines[i] == "[[flow]]")
        .unwrap_or(lines.len());
    (header + 1, next)
}

#[test]
fn a_config_whose_lookups_make_a_cycle_is_refused_naming_the_cycle_and_the_flow() {
    let toml = format!(
        "{}{}{}",
        files_flow("plain", Path::new("docs/plain")),
        lookup_flow("a", "b"),
        lookup_flow("b", "a")
    );
    let err = Config::parse(&toml, Some(Path::new("freshindex.toml"))).expect_err("a cycle");
    assert!(err.message.contains("a → b → a"), "{err}");
    let (line, _) = err.position.expect("a position");
    let (header, next) = flow_lines(&toml, "a");
    assert!(
        (header..next).contains(&line),
        "the position is flow `a`'s (lines {header}..{next}): {err}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("freshindex.toml:{line}:")),
        "{err}"
    );
}

#[test]
fn a_three_flow_cycle_through_a_flows_source_is_refused() {
    // `a` looks up `b`, `b` reads the items of `c`, `c` reads the items of `a`.
    let toml = format!(
        "{}{}{}",
        lookup_flow("a", "b"),
        reading_flow("b", "c"),
        reading_flow("c", "a")
    );
    let err = Config::parse(&toml, None).expect_err("a cycle");
    assert!(err.message.contains("a → b → c → a"), "{err}");
    let (line, _) = err.position.expect("a position");
    let (header, next) = flow_lines(&toml, "a");
    assert!(
        (header..next).contains(&line),
        "lines {header}..{next}: {err}"
    );

    // The same cycle found from another flow names it from there.
    let toml = format!(
        "{}{}{}",
        reading_flow("c", "a"),
        lookup_flow("a", "b"),
        reading_flow("b", "c"),
    );
    let err = Config::parse(&toml, None).expect_err("a cycle");
    assert!(err.message.contains("c → a → b → c"), "{err}");
    let (line, _) = err.position.expect("a position");
    let (header, next) = flow_lines(&toml, "c");
    assert!(
        (header..next).contains(&line),
        "lines {header}..{next}: {err}"
    );
}

#[test]
fn a_config_reading_an_unknown_flow_is_refused_naming_it() {
    let toml = format!(
        "{}{}",
        files_flow("a", Path::new("docs/a")),
        reading_flow("b", "nowhere")
    );
    let err = Config::parse(&toml, None).expect_err("unknown input");
    assert!(err.message.contains("`nowhere`"), "{err}");
    assert!(err.message.contains("`b`"), "{err}");
    let (line, _) = err.position.expect("a position");
    let (header, next) = flow_lines(&toml, "b");
    assert!(
        (header..next).contains(&line),
        "lines {header}..{next}: {err}"
    );

    let toml = format!(
        "{}{}",
        files_flow("a", Path::new("docs/a")),
        lookup_flow("b", "ghost")
    );
    let err = Config::parse(&toml, None).expect_err("unknown lookup");
    assert!(err.message.contains("`ghost`"), "{err}");
}

/// The first flow of `toml`; the config is completed with files flows for the flows it
/// reads (a config must define them; the engine's store need not).
fn one_flow(toml: &str) -> FlowSpec {
    let first = Config::parse(toml, None).err().map(|e| e.message);
    let mut full = toml.to_string();
    if let Some(m) = first
        && let Some((_, rest)) = m.split_once("reads flow `")
    {
        let name = &rest[..rest.find('`').expect("name")];
        full += &files_flow(name, Path::new("docs/stub"));
    }
    Config::parse(&full, None)
        .unwrap_or_else(|e| panic!("{e}\n{full}"))
        .flows
        .remove(0)
}

fn assert_cycle_refused(engine: &Engine, spec: &FlowSpec, cycle: &[&str]) {
    match engine.define_flow(spec) {
        Err(EngineError::Config(m)) => {
            // The cycle may be named from any of its flows: compare as a rotation.
            let ring = &cycle[..cycle.len() - 1];
            let named = (0..ring.len()).any(|r| {
                let mut c: Vec<&str> = ring[r..].iter().chain(&ring[..r]).copied().collect();
                c.push(c[0]);
                m.contains(&c.join(" → "))
            });
            assert!(
                named,
                "the error names the cycle {}: {m}",
                cycle.join(" → ")
            );
        }
        other => panic!(
            "defining `{}` must be refused as a cycle: {other:?}",
            spec.name
        ),
    }
}

#[test]
fn defining_a_flow_that_closes_a_cycle_with_stored_flows_is_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    engine
        .define_flow(&one_flow(&lookup_flow("a", "b")))
        .expect("a reads b, not defined yet");
    assert_cycle_refused(&engine, &one_flow(&lookup_flow("b", "a")), &["b", "a", "b"]);
    // The refused flow is not stored.
    assert!(
        matches!(engine.flow("b"), Err(EngineError::NotFound(_))),
        "{:?}",
        engine.flow("b").map(|f| f.1.name)
    );
    // Three flows: b reads c, and c, reading a, would close a → b → c → a.
    engine
        .define_flow(&one_flow(&reading_flow("b", "c")))
        .expect("b reads c");
    assert_cycle_refused(
        &engine,
        &one_flow(&reading_flow("c", "a")),
        &["a", "b", "c", "a"],
    );
    // Redefining a stored flow so that it reads its reader is a cycle too.
    engine
        .define_flow(&one_flow(&reading_flow("c", "plain")))
        .expect("c reads plain");
    engine
        .define_flow(&one_flow(&files_flow("plain", Path::new("docs/plain"))))
        .expect("plain");
    assert_cycle_refused(
        &engine,
        &one_flow(&lookup_flow("plain", "a")),
        &["a", "b", "c", "plain", "a"],
    );
}

/// A stored flow that reads a flow not defined yet does not hide a cycle from `define_flow`:
/// the cycle search passes over undefined inputs instead of stopping at them.
#[test]
fn a_cycle_is_refused_even_when_another_stored_flow_reads_an_undefined_flow() {
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    engine
        .define_flow(&one_flow(&lookup_flow("other", "undefined")))
        .expect("other reads a flow not defined yet");
    engine
        .define_flow(&one_flow(&lookup_flow("a", "b")))
        .expect("a reads b");
    assert_cycle_refused(&engine, &one_flow(&lookup_flow("b", "a")), &["a", "b", "a"]);
}

// ---------------------------------------------------------------------------------------
// Required lookups
// ---------------------------------------------------------------------------------------

fn product_file(company: &str, category: &str, name: &str) -> String {
    format!(
        "---\ncompany: {company}\ncategory: {category}\nsku: {name}-1\nname: {name}\n---\nA fine {name}.\n"
    )
}

fn company_file(name: &str) -> String {
    format!("---\nname: {name}\ncountry: Peru\n---\nMakers of things.\n")
}

/// A required lookup of a missing company fails the item, naming the key and the lookup;
/// the company's arrival makes the next run index it. Checked with the lookup in a flow
/// that reads another flow's items and in a files flow.
#[test]
fn a_required_lookup_of_a_missing_item_fails_until_it_exists() {
    for reads_flow in [true, false] {
        let src = tempfile::tempdir().expect("tempdir");
        let data = tempfile::tempdir().expect("tempdir");
        let mut clock = 0;
        let root = src.path();
        write_at(
            &root.join("companies/acme.md"),
            company_file("Acme").as_bytes(),
            &mut clock,
        );
        write_at(
            &root.join("cat_a/drill.md"),
            product_file("acme.md", "tools", "Drill").as_bytes(),
            &mut clock,
        );
        write_at(
            &root.join("cat_a/kite.md"),
            product_file("initech.md", "toys", "Kite").as_bytes(),
            &mut clock,
        );
        let lookup = format!(
            "steps = [\n  {{ op = \"lookup\", from = \"companies\", key = \"company\", as = \"co\", required = true }},\n  {{ op = \"template\", text = \"{{name}} by {{co.name}}\" }},\n  {TAIL},\n]\n"
        );
        let products = if reads_flow {
            format!(
                "[[flow]]\nname = \"products\"\nsource = {{ type = \"flows\", from = \"cat_a\" }}\n{lookup}\n"
            )
        } else {
            format!(
                "[[flow]]\nname = \"products\"\nsource = {{ type = \"files\", path = '{}' }}\n{lookup}\n",
                root.join("cat_a").display()
            )
        };
        let mut toml = files_flow("companies", &root.join("companies"));
        if reads_flow {
            toml += &files_flow("cat_a", &root.join("cat_a"));
        }
        toml += &products;
        let flows = Config::parse(&toml, None)
            .unwrap_or_else(|e| panic!("{e}\n{toml}"))
            .flows;
        let engine = Engine::open(data.path()).expect("engine");
        define_all(&engine, &flows);
        let what = if reads_flow {
            "flows source"
        } else {
            "files source"
        };

        let s = run_all(&engine, &flows);
        let p = &s["products"];
        assert_eq!((p.items.new, p.items.failed), (1, 1), "{what}: {p:?}");
        let [e] = p.errors.as_slice() else {
            panic!("{what}: one error: {p:?}")
        };
        assert_eq!(e.item, "kite.md", "{what}: {p:?}");
        assert!(
            e.error.contains("initech.md"),
            "{what}: names the key: {}",
            e.error
        );
        assert!(
            e.error.contains("lookup `co`"),
            "{what}: names the lookup: {}",
            e.error
        );
        assert!(
            e.error.contains("`companies`"),
            "{what}: names the flow: {}",
            e.error
        );
        let rows = export(&engine, "products");
        assert_eq!(
            sources(&rows),
            BTreeSet::from(["drill.md".to_string()]),
            "{what}"
        );
        assert_eq!(texts_of(&rows, "drill.md"), "Drill by Acme", "{what}");

        // The company arrives: the next run indexes the product.
        write_at(
            &root.join("companies/initech.md"),
            company_file("Initech").as_bytes(),
            &mut clock,
        );
        let s = run_all(&engine, &flows);
        let p = &s["products"];
        assert_eq!(p.items.failed, 0, "{what}: {p:?}");
        assert!(p.errors.is_empty(), "{what}: {p:?}");
        assert_eq!(processed(p), 1, "{what}: only the failed item: {p:?}");
        let rows = export(&engine, "products");
        assert_eq!(
            sources(&rows),
            BTreeSet::from(["drill.md".to_string(), "kite.md".to_string()]),
            "{what}"
        );
        assert_eq!(texts_of(&rows, "kite.md"), "Kite by Initech", "{what}");

        // And goes again: the product fails again (like every failed item, it keeps the
        // rows it was last indexed with; not checked here).
        fs::remove_file(root.join("companies/initech.md")).expect("rm");
        let s = run_all(&engine, &flows);
        let p = &s["products"];
        assert_eq!((p.items.failed, processed(p)), (1, 0), "{what}: {p:?}");
        assert!(p.errors[0].error.contains("initech.md"), "{what}: {p:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------------------

#[test]
fn moving_a_member_reprocesses_exactly_its_two_groups_and_an_empty_group_goes() {
    let src = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let root = src.path();
    let mut clock = 0;
    let put = |key: &str, category: &str, name: &str, clock: &mut u64| {
        write_at(
            &root.join("cat_a").join(key),
            product_file("acme.md", category, name).as_bytes(),
            clock,
        );
    };
    put("x1.md", "x", "Drill", &mut clock);
    put("x2.md", "x", "Saw", &mut clock);
    put("y1.md", "y", "Kite", &mut clock);
    put("z1.md", "z", "Bread", &mut clock);
    let toml = format!(
        "{}[[flow]]\nname = \"categories\"\nsource = {{ type = \"flows\", from = \"cat_a\" }}\nsteps = [\n  {{ op = \"group\", by = \"category\", aggregate = {{ n = \"count\", names = \"list:name\" }} }},\n  {{ op = \"template\", text = \"{{key}}: {{n}} {{names}}\" }},\n  {TAIL},\n]\n",
        files_flow("cat_a", &root.join("cat_a"))
    );
    let flows = Config::parse(&toml, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .flows;
    let engine = Engine::open(data.path()).expect("engine");
    define_all(&engine, &flows);
    let s = run_all(&engine, &flows);
    assert_eq!(s["categories"].items.new, 3, "{:?}", s["categories"]);
    let rows = export(&engine, "categories");
    assert_eq!(texts_of(&rows, "x"), "x: 2 Drill, Saw");
    assert_eq!(texts_of(&rows, "y"), "y: 1 Kite");
    assert_eq!(texts_of(&rows, "z"), "z: 1 Bread");

    // Nothing changed: nothing processed.
    let s = run_all(&engine, &flows);
    assert_eq!(processed(&s["categories"]), 0, "{:?}", s["categories"]);

    // x2 moves from x to y: x and y are processed, z is not.
    put("x2.md", "y", "Saw", &mut clock);
    let s = run_all(&engine, &flows);
    let c = &s["categories"];
    assert_eq!(
        (
            c.items.new,
            c.items.modified,
            c.items.deleted,
            c.items.unchanged
        ),
        (0, 2, 0, 1),
        "{c:?}"
    );
    let rows = export(&engine, "categories");
    assert_eq!(texts_of(&rows, "x"), "x: 1 Drill");
    // Members in key order: x2.md before y1.md.
    assert_eq!(texts_of(&rows, "y"), "y: 2 Saw, Kite");
    assert_eq!(texts_of(&rows, "z"), "z: 1 Bread");
    assert_eq!(rows, from_scratch(&flows)["categories"]);

    // The last member of z goes: z's rows go, nothing else is processed.
    fs::remove_file(root.join("cat_a/z1.md")).expect("rm");
    let s = run_all(&engine, &flows);
    let c = &s["categories"];
    assert_eq!(
        (
            c.items.new,
            c.items.modified,
            c.items.deleted,
            c.items.unchanged
        ),
        (0, 0, 1, 2),
        "{c:?}"
    );
    let rows = export(&engine, "categories");
    assert_eq!(
        sources(&rows),
        BTreeSet::from(["x".to_string(), "y".to_string()]),
        "{rows:?}"
    );
    assert_eq!(rows, from_scratch(&flows)["categories"]);

    // A member that leaves every group (no category) empties x the same way.
    write_at(
        &root.join("cat_a/x1.md"),
        b"---\ncompany: acme.md\nname: Drill\n---\nNo category now.\n",
        &mut clock,
    );
    let s = run_all(&engine, &flows);
    let c = &s["categories"];
    assert_eq!(
        (c.items.deleted, c.items.unchanged, processed(c)),
        (1, 1, 1),
        "{c:?}"
    );
    assert_eq!(
        sources(&export(&engine, "categories")),
        BTreeSet::from(["y".to_string()])
    );
}

/// The `categories` config of the tests below, with `template` as its text template.
fn categories_config(root: &Path, template: &str) -> Vec<FlowSpec> {
    let toml = format!(
        "{}[[flow]]\nname = \"categories\"\nsource = {{ type = \"flows\", from = \"cat_a\" }}\nsteps = [\n  {{ op = \"group\", by = \"category\", aggregate = {{ n = \"count\", names = \"list:name\" }} }},\n  {{ op = \"template\", text = \"{template}\" }},\n  {TAIL},\n]\n",
        files_flow("cat_a", &root.join("cat_a"))
    );
    Config::parse(&toml, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .flows
}

#[test]
fn a_changed_definition_of_a_flows_source_reprocesses_every_item() {
    let src = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let root = src.path();
    let mut clock = 0;
    for (key, category, name) in [("a.md", "x", "Drill"), ("b.md", "y", "Kite")] {
        write_at(
            &root.join("cat_a").join(key),
            product_file("acme.md", category, name).as_bytes(),
            &mut clock,
        );
    }
    let engine = Engine::open(data.path()).expect("engine");
    let before = categories_config(root, "{key}: {names}");
    define_all(&engine, &before);
    run_all(&engine, &before);
    assert_eq!(texts_of(&export(&engine, "categories"), "x"), "x: Drill");

    // Only the template changes: no input changed, yet every group is made again.
    let after = categories_config(root, "Group {key} has {n}: {names}");
    let s = run_all(&engine, &after);
    assert_eq!(s["categories"].items.modified, 2, "{:?}", s["categories"]);
    assert_eq!(processed(&s["cat_a"]), 0);
    let rows = export(&engine, "categories");
    assert_eq!(texts_of(&rows, "x"), "Group x has 1: Drill");
    assert_eq!(rows, from_scratch(&after)["categories"]);
    // And once done, nothing more.
    let s = run_all(&engine, &after);
    assert_eq!(processed(&s["categories"]), 0, "{:?}", s["categories"]);
}

#[test]
fn an_input_deleted_and_defined_again_or_reset_is_followed_from_its_start() {
    let src = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let root = src.path();
    let mut clock = 0;
    write_at(
        &root.join("companies/acme.md"),
        company_file("Acme").as_bytes(),
        &mut clock,
    );
    for (key, name) in [("a.md", "Drill"), ("b.md", "Kite")] {
        write_at(
            &root.join("cat_a").join(key),
            product_file("acme.md", "x", name).as_bytes(),
            &mut clock,
        );
    }
    let toml = format!(
        "{}{}[[flow]]\nname = \"products\"\nsource = {{ type = \"flows\", from = \"cat_a\" }}\nsteps = [\n  {{ op = \"lookup\", from = \"companies\", key = \"company\", as = \"co\" }},\n  {{ op = \"template\", text = \"{{name}} by {{co.name}}\" }},\n  {TAIL},\n]\n",
        files_flow("companies", &root.join("companies")),
        files_flow("cat_a", &root.join("cat_a")),
    );
    let flows = Config::parse(&toml, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .flows;
    let engine = Engine::open(data.path()).expect("engine");
    define_all(&engine, &flows);
    run_all(&engine, &flows);
    assert_eq!(
        texts_of(&export(&engine, "products"), "a.md"),
        "Drill by Acme"
    );

    // `companies` is deleted, its file edited, and the flow defined again (a new id): the
    // products follow the new flow from its start.
    engine.delete_flow("companies").expect("delete companies");
    write_at(
        &root.join("companies/acme.md"),
        company_file("Acme Two").as_bytes(),
        &mut clock,
    );
    define_all(&engine, &flows);
    run_all(&engine, &flows);
    let rows = export(&engine, "products");
    assert_eq!(texts_of(&rows, "a.md"), "Drill by Acme Two");
    assert_eq!(rows, from_scratch(&flows)["products"]);

    // A reset of `companies` (its documents become tombstones), then its run: the products
    // end as a fresh build has them, and a further run does nothing.
    engine.reset("companies", false).expect("reset");
    let s = run_all(&engine, &flows);
    assert_eq!(s["companies"].items.new, 1, "{:?}", s["companies"]);
    let rows = export(&engine, "products");
    assert_eq!(rows, from_scratch(&flows)["products"]);
    let s = run_all(&engine, &flows);
    assert_eq!(processed(&s["products"]), 0, "{:?}", s["products"]);
}

#[test]
fn a_plain_flow_keeps_its_rows_when_another_flow_starts_reading_it() {
    let src = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let root = src.path();
    let mut clock = 0;
    write_at(
        &root.join("cat_a/a.md"),
        product_file("acme.md", "x", "Drill").as_bytes(),
        &mut clock,
    );
    let alone = Config::parse(&files_flow("cat_a", &root.join("cat_a")), None)
        .unwrap_or_else(|e| panic!("{e}"))
        .flows;
    let engine = Engine::open(data.path()).expect("engine");
    run_all(&engine, &alone);
    let before = export(&engine, "cat_a");

    // A reader appears: `cat_a` indexes its items again to record their documents, and its
    // own rows (front matter included) stay exactly the same.
    let with_reader = categories_config(root, "{key}: {names}");
    define_all(&engine, &with_reader);
    let s = run_all(&engine, &with_reader);
    assert_eq!(s["cat_a"].items.modified, 1, "{:?}", s["cat_a"]);
    assert_eq!(s["cat_a"].rows.added + s["cat_a"].rows.updated, 0);
    assert_eq!(export(&engine, "cat_a"), before);
    assert_eq!(texts_of(&export(&engine, "categories"), "x"), "x: Drill");
}
