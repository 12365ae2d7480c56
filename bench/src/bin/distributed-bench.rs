//! `distributed-bench`: freshindex over a shared PostgreSQL state store, with 1, 2 and 4
//! worker processes, against the embedded SQLite store in the same run.
//!
//! A PostgreSQL server is started for the run (from the installed binaries, as the tests do).
//! N generated Markdown documents (2 to 8 KB, several chunks each) are indexed with the
//! built-in embedder into a PostgreSQL table:
//! - the baseline: one `freshindex index` process on the embedded SQLite store;
//! - then, for each worker count W: W `serve --role worker` processes and one
//!   `serve --role scheduler` (which scans, pushes and waits) on a PostgreSQL store; the time
//!   is the run's own duration in its history entry.
//!
//! Then the queue alone: N entries pushed, and 4 threads in this process polling batches of
//! 100 and committing each as indexed (one poll + one commit per batch), on PostgreSQL and on
//! SQLite.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use freshindex_bench::http::{Http, Server};
use freshindex_bench::queue::poll_index_all;
use freshindex_store::{FlowId, PgStore, PushItem, PushKind, SqliteStore, StateStore};
use freshindex_testpg::TestPg;

#[allow(dead_code)]
#[path = "../corpus.rs"]
mod corpus;
use corpus::Generator;

const USAGE: &str = "\
usage: distributed-bench [--docs N] [--workers LIST] [--queue-items M] [--bin PATH]

  --docs N         documents (default 20000)
  --workers LIST   worker process counts, comma-separated (default 1,2,4)
  --queue-items M  entries of the queue measurement (default 20000)
  --bin PATH       the freshindex binary (default: `freshindex` next to this binary)";

struct Args {
    docs: usize,
    workers: Vec<usize>,
    queue_items: usize,
    bin: PathBuf,
}

fn parse_args() -> Result<Option<Args>> {
    let me = std::env::current_exe()?;
    let mut out = Args {
        docs: 20_000,
        workers: vec![1, 2, 4],
        queue_items: 20_000,
        bin: me.with_file_name("freshindex"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--docs" => out.docs = value("--docs")?.parse().context("--docs")?,
            "--workers" => {
                out.workers = value("--workers")?
                    .split(',')
                    .map(|w| w.trim().parse().context("--workers"))
                    .collect::<Result<_>>()?
            }
            "--queue-items" => {
                out.queue_items = value("--queue-items")?.parse().context("--queue-items")?
            }
            "--bin" => out.bin = PathBuf::from(value("--bin")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if !out.bin.is_file() {
        bail!(
            "{} not found: build it (`cargo build --release -p freshindex`) or pass --bin",
            out.bin.display()
        );
    }
    Ok(Some(out))
}

fn config(store: Option<&str>, target: &str, table: &str) -> String {
    let store = store
        .map(|s| format!("store = {s:?}\n"))
        .unwrap_or_default();
    format!(
        "{store}[[flow]]\n\
         name = \"docs\"\n\
         source = {{ type = \"files\", path = \"docs\", include = [\"**/*.md\"] }}\n\
         steps = [{{ op = \"parse\" }}, {{ op = \"split\" }}, {{ op = \"embed\", model = \"builtin\" }}]\n\
         target = {{ type = \"postgres\", url = {target:?}, table = {table:?} }}\n\
         schedule = {{ interval = \"PT1H\" }}\n"
    )
}

struct Line {
    what: String,
    items: usize,
    secs: f64,
}

/// The baseline: one `freshindex index` on the embedded store.
fn sqlite_run(args: &Args, root: &Path, target: &str) -> Result<f64> {
    let cfg = root.join("sqlite.toml");
    std::fs::write(&cfg, config(None, target, "rows_sqlite"))?;
    let t = Instant::now();
    let out = std::process::Command::new(&args.bin)
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(root.join("data-sqlite"))
        .args(["index", "--json"])
        .output()?;
    if !out.status.success() {
        bail!(
            "the SQLite run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// W workers and a scheduler on a PostgreSQL store; the run's duration from its history.
fn shared_run(args: &Args, root: &Path, pg: &TestPg, w: usize) -> Result<f64> {
    let url = pg.create_database(&format!("bench_w{w}"));
    let cfg = root.join(format!("shared-{w}.toml"));
    std::fs::write(&cfg, config(Some(&url), &url, "rows"))?;
    let mut servers = Vec::new();
    for i in 0..w {
        servers.push(Server::start_with(
            &args.bin,
            &root.join(format!("data-w{w}-{i}")),
            &cfg,
            &["--role", "worker", "--index-threads", "0"],
            Stdio::null(),
        )?);
    }
    let scheduler = Server::start_with(
        &args.bin,
        &root.join(format!("data-s{w}")),
        &cfg,
        &["--role", "scheduler", "--index-threads", "0"],
        Stdio::null(),
    )?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut http = Http::connect(&scheduler.addr)?;
        let (status, body) = http.get("/v1/flows/docs/history?limit=5")?;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if let Some(run) = v["runs"].as_array().and_then(|r| r.first())
                && run["status"] != "inProgress"
            {
                if run["status"] != "success" {
                    bail!("the run with {w} workers ended {}: {run}", run["status"]);
                }
                let ms = run["duration_ms"].as_u64().context("duration")?;
                return Ok(ms as f64 / 1000.0);
            }
        }
        if Instant::now() > deadline {
            bail!("the run with {w} workers did not end within an hour");
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Pushes `n` entries, then 4 threads poll batches of 100 and commit them indexed; returns
/// the poll + commit seconds.
fn queue_run(store: Arc<dyn StateStore>, n: usize) -> Result<f64> {
    let flow: FlowId = store.register_flow("bench", "{}")?;
    for start in (0..n).step_by(100) {
        let items: Vec<PushItem> = (start..(start + 100).min(n))
            .map(|i| PushItem {
                key: format!("dir{:03}/item-{i:07}", i % 997),
                kind: PushKind::Hashes {
                    content: Some(format!("{:016x}", i * 7919)),
                    metadata: None,
                },
                payload: None,
                queue: None,
            })
            .collect();
        store.push(flow, &items, now_ms())?;
    }
    let (secs, total) = poll_index_all(&store, flow, 4, 100)?;
    if total != n {
        bail!("the queue handed out {total} entries, not {n}");
    }
    Ok(secs)
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let root = tempfile::Builder::new()
        .prefix("freshindex-distributed-bench-")
        .tempdir()?;
    let gen_ = Generator::new(42);
    for i in 0..args.docs {
        let p = root.path().join("docs").join(Generator::doc_path(i));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, gen_.document(i))?;
    }
    let pg = TestPg::start();
    let target = pg.create_database("bench_sqlite");
    eprintln!("indexing {} documents on SQLite (baseline)...", args.docs);
    let base = sqlite_run(&args, root.path(), &target)?;
    let mut lines = vec![Line {
        what: "SQLite store, 1 process (baseline)".into(),
        items: args.docs,
        secs: base,
    }];
    for &w in &args.workers {
        eprintln!("indexing on PostgreSQL with {w} worker process(es)...");
        let secs = shared_run(&args, root.path(), &pg, w)?;
        lines.push(Line {
            what: format!("PostgreSQL store, scheduler + {w} worker process(es)"),
            items: args.docs,
            secs,
        });
    }
    println!(
        "\nIndexing {} documents (built-in embedder, PostgreSQL table target)\n",
        args.docs
    );
    println!("| setup | seconds | docs/s | vs baseline |");
    println!("|---|---:|---:|---:|");
    for l in &lines {
        println!(
            "| {} | {:.1} | {:.0} | {:.2}× |",
            l.what,
            l.secs,
            l.items as f64 / l.secs,
            (l.items as f64 / l.secs) / (args.docs as f64 / base)
        );
    }

    eprintln!("measuring the queue...");
    let pg_store: Arc<dyn StateStore> =
        Arc::new(PgStore::connect(&pg.create_database("bench_queue"))?);
    let pg_secs = queue_run(pg_store, args.queue_items)?;
    let sqlite_dir = root.path().join("queue-sqlite");
    std::fs::create_dir_all(&sqlite_dir)?;
    let sqlite_store: Arc<dyn StateStore> =
        Arc::new(SqliteStore::open(&sqlite_dir.join("state.sqlite"))?);
    let sqlite_secs = queue_run(sqlite_store, args.queue_items)?;
    let n = args.queue_items as f64;
    println!(
        "\nQueue: poll (100) + commit as indexed, 4 threads, {} entries\n",
        args.queue_items
    );
    println!("| store | seconds | entries/s | batches (poll + commit)/s | vs SQLite |");
    println!("|---|---:|---:|---:|---:|");
    for (what, secs) in [("SQLite (baseline)", sqlite_secs), ("PostgreSQL", pg_secs)] {
        println!(
            "| {what} | {secs:.2} | {:.0} | {:.0} | {:.2}× |",
            n / secs,
            n / 100.0 / secs,
            sqlite_secs / secs
        );
    }
    Ok(())
}
