//! `multi-bench`: multi-input flows (a lookup, a template and a group) on a products and
//! companies corpus, in-process, and what one changed company costs against a full rebuild.
//!
//! The corpus: M companies (`companies/cNNN.md`: `name`, `country`, a few sentences) and N
//! products (`products/pNNNNN.md`: `name`, `company: cNNN.md`, `category`, `sku`, a body of
//! 300 to 800 bytes), as Markdown with a front matter block. Three flows on a fresh data
//! directory with the built-in embedder:
//! - `companies`: the files of `companies/`;
//! - `products`: the files of `products/`, each looking up its company (`maker`) and indexed
//!   as `{name} by {maker.name} ({maker.country}): {text}`;
//! - `categories` (with `--with-categories`, and in `--smoke`): a flows source over `products`, one item per
//!   category with its product count and names.
//!
//! Measured in one run: the full build from scratch, a no-op rerun, one company renamed
//! (its file rewritten with a new mtime) and every flow run again inputs first, and — the
//! baseline — a full rebuild into a fresh data directory. The products run after the rename
//! must reprocess exactly the products of that company.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use freshindex_core::{Config, FlowSpec};
use freshindex_engine::{Engine, RunOptions, RunStatus, RunSummary};

#[allow(dead_code)]
#[path = "../corpus.rs"]
mod corpus;
use corpus::{Generator, Rng};

const USAGE: &str = "\
usage: multi-bench [--products N] [--companies M] [--with-categories] [--categories C] [--seed S] [--smoke]

  --products N       products (default 20000)
  --companies M      companies (default 500)
  --with-categories  add the `categories` flow (group by category; see bench/README.md for
                     its limit at the default size)
  --categories C     distinct product categories (default 12)
  --seed S           seed of the corpus and of the company renamed (default 42)
  --smoke            a quick check: 400 products, 20 companies, with `categories` (flags
                     given after it win)";

const COUNTRIES: &[&str] = &[
    "Germany", "France", "Japan", "Brazil", "Canada", "Kenya", "India", "Norway", "Chile",
    "Vietnam", "Poland", "Mexico",
];

const CATEGORIES: &[&str] = &[
    "tools", "garden", "kitchen", "lighting", "audio", "office", "outdoor", "storage", "cleaning",
    "sports", "toys", "bath", "pets", "travel", "health", "hardware",
];

const SUFFIXES: &[&str] = &["Industries", "Works", "GmbH", "Labs", "and Sons", "Co"];

struct Args {
    products: usize,
    companies: usize,
    categories: usize,
    with_categories: bool,
    seed: u64,
}

fn parse_args() -> Result<Option<Args>> {
    let mut out = Args {
        products: 20_000,
        companies: 500,
        categories: 12,
        with_categories: false,
        seed: 42,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--products" => out.products = value("--products")?.parse().context("--products")?,
            "--companies" => {
                out.companies = value("--companies")?.parse().context("--companies")?
            }
            "--categories" => {
                out.categories = value("--categories")?.parse().context("--categories")?
            }
            "--with-categories" => out.with_categories = true,
            "--seed" => out.seed = value("--seed")?.parse().context("--seed")?,
            "--smoke" => {
                out.products = 400;
                out.companies = 20;
                out.with_categories = true;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    if out.products == 0 || out.companies == 0 {
        bail!("--products and --companies must be at least 1");
    }
    if out.categories == 0 || out.categories > CATEGORIES.len() {
        bail!("--categories must be between 1 and {}", CATEGORIES.len());
    }
    Ok(Some(out))
}

/// The generated corpus, and what the checks need to know about it.
struct Corpus {
    /// File name (the `companies` item key) of each company.
    company_keys: Vec<String>,
    /// Each company's name and country.
    company_meta: Vec<(String, String)>,
    /// Each company's body.
    company_body: Vec<String>,
    /// Products per company.
    products_of: Vec<usize>,
    bytes: u64,
}

fn company_file(name: &str, country: &str, body: &str) -> String {
    format!("---\nname: {name}\ncountry: {country}\n---\n{body}\n")
}

/// Sentences of pseudo-words, about `target` bytes long.
fn body(g: &Generator, rng: &mut Rng, target: usize) -> String {
    let mut s = String::new();
    while s.len() < target {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&g.paragraph(rng));
    }
    if s.len() > target {
        // Cut at the last word boundary before the target (the words are ASCII).
        let cut = s[..target].rfind(' ').unwrap_or(target);
        s.truncate(cut);
        s.push('.');
    }
    s
}

fn capitalize(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn write_corpus(root: &Path, args: &Args) -> Result<Corpus> {
    let g = Generator::new(args.seed);
    let cdir = root.join("companies");
    let pdir = root.join("products");
    std::fs::create_dir_all(&cdir)?;
    std::fs::create_dir_all(&pdir)?;
    let cw = args.companies.saturating_sub(1).to_string().len().max(3);
    let pw = args.products.saturating_sub(1).to_string().len().max(5);
    let mut bytes = 0u64;
    let mut c = Corpus {
        company_keys: Vec::new(),
        company_meta: Vec::new(),
        company_body: Vec::new(),
        products_of: vec![0; args.companies],
        bytes: 0,
    };
    for i in 0..args.companies {
        let mut rng = Rng::new(args.seed, 1_000_000 + i as u64);
        let key = format!("c{i:0cw$}.md");
        let name = format!(
            "{} {} {}",
            capitalize(&body(&g, &mut rng, 12).replace(['.', ',', '?'], "")),
            SUFFIXES[rng.below(SUFFIXES.len())],
            i
        );
        let country = COUNTRIES[rng.below(COUNTRIES.len())].to_string();
        let target = rng.between(150, 400);
        let text = body(&g, &mut rng, target);
        let file = company_file(&name, &country, &text);
        bytes += file.len() as u64;
        std::fs::write(cdir.join(&key), file)?;
        c.company_keys.push(key);
        c.company_meta.push((name, country));
        c.company_body.push(text);
    }
    for i in 0..args.products {
        let mut rng = Rng::new(args.seed, 2_000_000 + i as u64);
        let company = rng.below(args.companies);
        c.products_of[company] += 1;
        let category = CATEGORIES[rng.below(args.categories)];
        let name = format!(
            "{} {}-{}",
            capitalize(&body(&g, &mut rng, 16).replace(['.', ',', '?'], "")),
            category.to_uppercase(),
            100 + rng.below(900)
        );
        let target = rng.between(300, 800);
        let text = body(&g, &mut rng, target);
        let file = format!(
            "---\nname: {name}\ncompany: {}\ncategory: {category}\nsku: SKU-{i:06}\n---\n{text}\n",
            c.company_keys[company]
        );
        bytes += file.len() as u64;
        std::fs::write(pdir.join(format!("p{i:0pw$}.md")), file)?;
    }
    c.bytes = bytes;
    // Written "an hour ago": the engine re-hashes files modified within the last 2 s instead
    // of trusting their size and mtime, and real corpora are not indexed right after writing.
    let old = SystemTime::now() - Duration::from_secs(3600);
    for dir in [&cdir, &pdir] {
        for e in std::fs::read_dir(dir)? {
            File::options()
                .write(true)
                .open(e?.path())?
                .set_modified(old)?;
        }
    }
    Ok(c)
}

fn config_text(root: &Path, with_categories: bool) -> String {
    let steps = r#"  { op = "parse" },
  { op = "split", chunk_size = 1000, chunk_overlap = 200 },
  { op = "embed", model = "builtin" },"#;
    let mut t = format!(
        r#"[[flow]]
name = "companies"
source = {{ type = "files", path = '{companies}' }}

[[flow]]
name = "products"
source = {{ type = "files", path = '{products}' }}
steps = [
  {{ op = "lookup", from = "companies", key = "company", as = "maker", required = false }},
  {{ op = "template", text = "{{name}} by {{maker.name}} ({{maker.country}}): {{text}}" }},
{steps}
]
"#,
        companies = root.join("companies").display(),
        products = root.join("products").display(),
    );
    if with_categories {
        t.push_str(&format!(
            r#"
[[flow]]
name = "categories"
source = {{ type = "flows", from = ["products"] }}
steps = [
  {{ op = "group", by = "category", aggregate = {{ count = "count", names = "list:name" }} }},
  {{ op = "template", text = "Category {{key}}: {{count}} products: {{names}}" }},
{steps}
]
"#
        ));
    }
    t
}

/// One run of every flow: each flow's summary and time, and the total time.
struct Pass {
    runs: Vec<(RunSummary, Duration)>,
    total: Duration,
}

impl Pass {
    fn get(&self, flow: &str) -> &RunSummary {
        &self
            .runs
            .iter()
            .find(|(s, _)| s.flow == flow)
            .expect("every flow ran")
            .0
    }
}

/// Runs every flow inputs first; `define` first defines them all (a fresh data directory).
fn run_all(engine: &Engine, flows: &[FlowSpec], define: bool) -> Result<Pass> {
    let t0 = Instant::now();
    if define {
        for f in flows {
            engine
                .define_flow(f)
                .with_context(|| format!("defining flow `{}`", f.name))?;
        }
    }
    let mut runs = Vec::new();
    for f in flows {
        let t = Instant::now();
        let s = engine
            .run(f, &RunOptions::default())
            .with_context(|| format!("running flow `{}`", f.name))?;
        if s.items.failed > 0 || s.status != RunStatus::Success {
            let first = s.errors.first().map(|e| format!("{}: {}", e.item, e.error));
            bail!(
                "flow `{}`: {} items failed (first: {})",
                f.name,
                s.items.failed,
                first.unwrap_or_default()
            );
        }
        runs.push((s, t.elapsed()));
    }
    Ok(Pass {
        runs,
        total: t0.elapsed(),
    })
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multi-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let dir = tempfile::Builder::new().prefix("multi-bench-").tempdir()?;
    let root = dir.path().join("corpus");
    eprintln!(
        "writing {} products and {} companies to {}",
        args.products,
        args.companies,
        root.display()
    );
    let corpus = write_corpus(&root, &args)?;
    let config = Config::parse(&config_text(&root, args.with_categories), None)
        .map_err(|e| anyhow!("{e}"))?;
    let all: Vec<&FlowSpec> = config.flows.iter().collect();
    let flows: Vec<FlowSpec> = freshindex_core::spec::dependency_order(&all)
        .into_iter()
        .cloned()
        .collect();

    // (1) Full build from scratch, (2) no-op rerun, (3) one company renamed.
    let (build, noop, change, changed, expected) = {
        let engine = Engine::open(&dir.path().join("data"))?;
        eprintln!("full build from scratch");
        let build = run_all(&engine, &flows, true)?;
        eprintln!("no-op rerun");
        let noop = run_all(&engine, &flows, false)?;

        // The company renamed: picked by the seed among those with products.
        let mut rng = Rng::new(args.seed, 3);
        let mut pick = rng.below(args.companies);
        while corpus.products_of[pick] == 0 {
            pick = (pick + 1) % args.companies;
        }
        let key = &corpus.company_keys[pick];
        let (old_name, country) = &corpus.company_meta[pick];
        let new_name = format!("{old_name} Renamed");
        let path = root.join("companies").join(key);
        let before = std::fs::metadata(&path)?.modified()?;
        std::fs::write(
            &path,
            company_file(&new_name, country, &corpus.company_body[pick]),
        )?;
        let after = std::fs::metadata(&path)?.modified()?;
        if after <= before {
            bail!("the mtime of {} did not change", path.display());
        }
        eprintln!("company {key} renamed: {old_name} → {new_name}; rerun");
        let change = run_all(&engine, &flows, false)?;
        (
            build,
            noop,
            change,
            format!("{key} ({old_name} → {new_name})"),
            corpus.products_of[pick] as u64,
        )
    };

    // (4) The baseline: a full rebuild into a fresh data directory, same corpus.
    eprintln!("full rebuild into a fresh data directory (baseline)");
    let rebuild = {
        let engine = Engine::open(&dir.path().join("data-rebuild"))?;
        run_all(&engine, &flows, true)?
    };

    print_report(
        &args,
        &corpus,
        &[
            ("full build from scratch", &build),
            ("no-op rerun", &noop),
            ("one company renamed, rerun", &change),
            ("full rebuild, fresh data dir (baseline)", &rebuild),
        ],
        &rebuild,
        &changed,
    );

    let p = change.get("products");
    println!();
    println!(
        "company renamed: {changed}, which has {expected} products; the products run reprocessed {} (modified), computed {} embeddings and updated {} rows (added {}, deleted {})",
        p.items.modified, p.embeddings.computed, p.rows.updated, p.rows.added, p.rows.deleted
    );
    let mut bad = Vec::new();
    if p.items.modified != expected {
        bad.push(format!(
            "products reprocessed after the rename: {} (modified), expected {expected} (the company's products)",
            p.items.modified
        ));
    }
    if p.items.new + p.items.deleted + p.items.failed != 0 {
        bad.push(format!(
            "products run after the rename: new {}, deleted {}, failed {}; expected none",
            p.items.new, p.items.deleted, p.items.failed
        ));
    }
    let c = change.get("companies");
    if c.items.modified != 1 {
        bad.push(format!(
            "companies run after the rename: {} modified, expected 1",
            c.items.modified
        ));
    }
    for (s, _) in &noop.runs {
        if s.items.processed() != 0 || s.embeddings.computed != 0 {
            bad.push(format!(
                "no-op rerun of `{}`: {} items processed, {} embeddings computed; expected 0",
                s.flow,
                s.items.processed(),
                s.embeddings.computed
            ));
        }
    }
    for (s, _) in &rebuild.runs {
        let b = build.get(&s.flow);
        if b.rows.total != s.rows.total {
            bad.push(format!(
                "`{}`: {} rows after the first build, {} after the rebuild",
                s.flow, b.rows.total, s.rows.total
            ));
        }
    }
    if bad.is_empty() {
        println!("checks: OK (reprocessed == products of the company; no-op did nothing)");
        Ok(())
    } else {
        for b in &bad {
            println!("MISMATCH: {b}");
        }
        bail!("{} check(s) failed", bad.len())
    }
}

fn print_report(
    args: &Args,
    corpus: &Corpus,
    phases: &[(&str, &Pass)],
    baseline: &Pass,
    changed: &str,
) {
    let secs = |d: Duration| d.as_secs_f64();
    let base = secs(baseline.total);
    println!(
        "multi-bench: {} products, {} companies, {} categories ({:.1} MB of Markdown), built-in embedder; flows: {}",
        args.products,
        args.companies,
        args.categories,
        corpus.bytes as f64 / 1e6,
        baseline
            .runs
            .iter()
            .map(|(s, _)| s.flow.as_str())
            .collect::<Vec<_>>()
            .join(" → ")
    );
    println!("renamed: {changed}");
    println!();
    println!(
        "| phase | seconds | vs full rebuild | items processed | emb. computed | rows written |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, p) in phases {
        let sum =
            |f: &dyn Fn(&RunSummary) -> u64| -> u64 { p.runs.iter().map(|(s, _)| f(s)).sum() };
        println!(
            "| {name} | {:.3} | {:.4}× | {} | {} | {} |",
            secs(p.total),
            secs(p.total) / base,
            sum(&|s| s.items.processed()),
            sum(&|s| s.embeddings.computed),
            sum(&|s| s.rows.added + s.rows.updated + s.rows.deleted),
        );
    }
    println!();
    println!(
        "| phase | flow | seconds | seen | new | modified | unchanged | deleted | emb. computed | emb. reused | rows added | rows updated | rows deleted | rows total |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, p) in phases {
        for (s, d) in &p.runs {
            println!(
                "| {name} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.flow,
                secs(*d),
                s.items.seen,
                s.items.new,
                s.items.modified,
                s.items.unchanged,
                s.items.deleted,
                s.embeddings.computed,
                s.embeddings.reused,
                s.rows.added,
                s.rows.updated,
                s.rows.deleted,
                s.rows.total,
            );
        }
    }
}
