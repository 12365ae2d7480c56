//! `queue-bench`: throughput of the indexing queue on the embedded store, and over HTTP.
//!
//! Embedded: pushes N items with content hashes in batches of 100 (one transaction each), then
//! W worker threads poll leased batches of 100 and index them (one commit per batch), for
//! W = 1 and 4; then a second full traversal re-pushes every item under another label. The
//! baseline, measured in the same run, is the least such a queue can cost here: plain SQLite
//! inserts of the same rows in transactions of 100 with the same durability settings.
//!
//! HTTP (with `--bin`): starts `freshindex serve` on a push flow and measures round trips of
//! push (one item per request) and of poll (100) followed by one index per item.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use freshindex_bench::http::Http;
use freshindex_bench::queue::poll_index_all;
use freshindex_store::{FlowId, FlowStore, ItemStore, PushItem, PushKind, SqliteStore, StateStore};

const USAGE: &str = "\
usage: queue-bench [--items N] [--http-items M] [--bin PATH]

  --items N       items in the embedded runs (default 100000)
  --http-items M  items in the HTTP runs (default 5000)
  --bin PATH      the freshindex binary for the HTTP runs (default: `freshindex` next to
                  this binary; the HTTP runs are skipped when it is missing)";

const BATCH: usize = 100;

struct Args {
    items: usize,
    http_items: usize,
    bin: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Args>> {
    let mut out = Args {
        items: 100_000,
        http_items: 5_000,
        bin: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--items" => out.items = value("--items")?.parse().context("--items")?,
            "--http-items" => {
                out.http_items = value("--http-items")?.parse().context("--http-items")?
            }
            "--bin" => out.bin = Some(PathBuf::from(value("--bin")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    Ok(Some(out))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A fresh folder under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        let p = std::env::temp_dir().join(format!(
            "freshindex-queue-bench-{}-{tag}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(i: usize) -> String {
    format!("repo/dir{:03}/item-{i:07}", i % 997)
}

fn push_all(store: &SqliteStore, flow: FlowId, n: usize, label: &str) -> Result<f64> {
    let t = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    for start in (0..n).step_by(BATCH) {
        batch.clear();
        for i in start..(start + BATCH).min(n) {
            batch.push(PushItem {
                key: key(i),
                kind: PushKind::Hashes {
                    content: Some(format!("{:016x}", i * 7919)),
                    metadata: None,
                },
                payload: None,
                queue: Some(label.to_string()),
            });
        }
        for r in store.push(flow, &batch, now_ms())? {
            r.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The baseline: plain inserts of the same rows, 100 per transaction, same durability.
fn sqlite_floor(dir: &Path, n: usize) -> Result<f64> {
    let conn = rusqlite::Connection::open(dir.join("floor.sqlite"))?;
    conn.execute_batch(
        "PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE t (key TEXT PRIMARY KEY, hash TEXT NOT NULL) WITHOUT ROWID;",
    )?;
    let t = Instant::now();
    let mut conn = conn;
    for start in (0..n).step_by(BATCH) {
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare_cached("INSERT INTO t (key, hash) VALUES (?1, ?2)")?;
            for i in start..(start + BATCH).min(n) {
                ins.execute(rusqlite::params![key(i), format!("{:016x}", i * 7919)])?;
            }
        }
        tx.commit()?;
    }
    Ok(t.elapsed().as_secs_f64())
}

struct Line {
    what: String,
    items: usize,
    secs: f64,
}

fn print_table(title: &str, lines: &[Line], baseline: f64) {
    println!("\n{title}");
    println!(
        "| {:<44} | {:>8} | {:>9} | {:>10} | {:>9} |",
        "operation", "items", "seconds", "items/s", "vs floor"
    );
    println!(
        "|{:-<46}|{:->10}|{:->11}|{:->12}|{:->11}|",
        "", "", "", "", ""
    );
    for l in lines {
        let rate = l.items as f64 / l.secs.max(1e-9);
        println!(
            "| {:<44} | {:>8} | {:>9.3} | {:>10.0} | {:>8.2}x |",
            l.what,
            l.items,
            l.secs,
            rate,
            rate / baseline
        );
    }
}

fn embedded(n: usize) -> Result<()> {
    let floor_dir = Scratch::new("floor")?;
    let floor = sqlite_floor(&floor_dir.0, n)?;
    let floor_rate = n as f64 / floor;
    let mut lines = vec![Line {
        what: "floor: SQLite insert, 100 per transaction".into(),
        items: n,
        secs: floor,
    }];
    for workers in [1usize, 4] {
        let dir = Scratch::new(&format!("w{workers}"))?;
        let store = Arc::new(SqliteStore::open(&dir.0.join("state.sqlite"))?);
        let flow = store.register_flow("bench", "{}")?;
        let push = push_all(&store, flow, n, "A")?;
        let (index, done) = poll_index_all(
            &(store.clone() as Arc<dyn StateStore>),
            flow,
            workers,
            BATCH,
        )?;
        if done != n {
            bail!("{workers} workers indexed {done} items of {n}");
        }
        let repush = push_all(&store, flow, n, "B")?;
        lines.push(Line {
            what: format!("push (new items), batches of {BATCH}"),
            items: n,
            secs: push,
        });
        lines.push(Line {
            what: format!("poll {BATCH} + index, {workers} worker(s)"),
            items: n,
            secs: index,
        });
        lines.push(Line {
            what: "re-push unchanged under label B (traversal)".into(),
            items: n,
            secs: repush,
        });
        lines.push(Line {
            what: format!("all three, per item-operation ({workers} worker(s))"),
            items: 3 * n,
            secs: push + index + repush,
        });
    }
    print_table(
        &format!("embedded queue, {n} items (state.sqlite, WAL, synchronous=FULL)"),
        &lines,
        floor_rate,
    );
    Ok(())
}

/// The server and its scratch folder (removed after the server stops).
struct Server {
    _inner: freshindex_bench::http::Server,
    addr: String,
    _dir: Scratch,
}

fn start_server(bin: &Path) -> Result<Server> {
    let dir = Scratch::new("http")?;
    let config = dir.0.join("freshindex.toml");
    std::fs::write(
        &config,
        "[[flow]]\nname = \"bench\"\nsource = { type = \"push\" }\n",
    )?;
    let inner =
        freshindex_bench::http::Server::start(bin, &dir.0.join("data"), &config, Stdio::null())?;
    let addr = inner.addr.clone();
    Ok(Server {
        _inner: inner,
        addr,
        _dir: dir,
    })
}

fn http(bin: &Path, n: usize) -> Result<()> {
    let server = start_server(bin)?;
    let mut c = Http::connect(&server.addr)?;
    let mut lines = Vec::new();
    // Floor: the cheapest round trip the server has.
    let t = Instant::now();
    for _ in 0..n {
        let (status, _) = c.post("/healthz", "")?;
        if status >= 500 {
            bail!("healthz answered {status}");
        }
    }
    let floor = t.elapsed().as_secs_f64();
    lines.push(Line {
        what: "floor: round trip to /healthz".into(),
        items: n,
        secs: floor,
    });
    let t = Instant::now();
    for i in 0..n {
        let body = format!(
            r#"{{"item":{{"name":"{}","contentHash":"h{i}","queue":"A"}}}}"#,
            key(i)
        );
        let (status, text) = c.post("/v1/flows/bench/items:push", &body)?;
        if status != 200 {
            bail!("push answered {status}: {text}");
        }
    }
    lines.push(Line {
        what: "push, one item per request".into(),
        items: n,
        secs: t.elapsed().as_secs_f64(),
    });
    let t = Instant::now();
    let mut indexed = 0;
    loop {
        let (status, text) = c.post("/v1/flows/bench/items:poll", r#"{"limit":100}"#)?;
        if status != 200 {
            bail!("poll answered {status}: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            break;
        }
        for it in items {
            let name = it["name"].as_str().context("poll item without name")?;
            let path = format!(
                "/v1/flows/bench/items/{}:index",
                name.replace('%', "%25").replace('/', "%2F")
            );
            let body = format!(
                r#"{{"item":{{"version":"{}","contentHash":"{}","content":{{"text":"item {name}: a short text about queues and leases"}}}}}}"#,
                b64(&(indexed as u64 + 1).to_be_bytes()),
                it["contentHash"].as_str().unwrap_or("")
            );
            let (status, text) = c.post(&path, &body)?;
            if status != 200 {
                bail!("index answered {status}: {text}");
            }
            indexed += 1;
        }
    }
    lines.push(Line {
        what: "poll 100 + index each (with content)".into(),
        items: indexed,
        secs: t.elapsed().as_secs_f64(),
    });
    print_table(
        &format!("HTTP API, {n} items, one keep-alive connection"),
        &lines,
        n as f64 / floor,
    );
    Ok(())
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    let run = || -> Result<()> {
        let Some(args) = parse_args()? else {
            return Ok(());
        };
        embedded(args.items)?;
        let bin = match args.bin {
            Some(b) => b,
            None => std::env::current_exe()?
                .parent()
                .context("no parent of this binary")?
                .join("freshindex"),
        };
        if bin.exists() {
            http(&bin, args.http_items)?;
        } else {
            println!("\n(HTTP runs skipped: {} not found)", bin.display());
        }
        Ok(())
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("queue-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
