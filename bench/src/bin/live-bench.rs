//! `live-bench`: freshness of live mode. Indexes a corpus in live mode — with
//! `freshindex index --watch` and with `freshindex serve` on a flow with `mode = "live"` —
//! then edits one file at a time and measures the time from the write returning to:
//! - *indexed*: the file's queue entry accepted with the new content hash (the commit comes
//!   after the target write, so the edit is searchable by then);
//! - *in search* (serve): a search over HTTP for a token only the edit contains, limited to
//!   the file's rows (`sourcePrefix`), returns the edited chunk (the time includes that
//!   search, which is exact and scans every row).
//!
//! Also reports the CPU an idle process uses, and, as the baseline measured in the same run,
//! the wall time of the alternative: a one-shot `freshindex index` of the unchanged corpus.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use freshindex_bench::http::{Http, Server};
use freshindex_core::ItemStatus;
use freshindex_store::{FlowId, FlowStore, ItemStore, SqliteStore};

const USAGE: &str = "\
usage: live-bench [--docs N] [--edits M] [--mode watch|serve|both] [--bin PATH]

  --docs N    documents in the corpus (default 20000)
  --edits M   single-file edits measured per mode (default 200)
  --mode      which live mode to measure (default both)
  --bin PATH  the freshindex binary (default: `freshindex` next to this binary)";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn paragraph(rng: &mut Rng, words: usize) -> String {
    const SYL: [&str; 12] = [
        "ka", "lo", "mi", "ren", "sta", "vo", "qui", "del", "tor", "ne", "bra", "shi",
    ];
    let mut out = String::new();
    for w in 0..words {
        if w > 0 {
            out.push(' ');
        }
        for _ in 0..(1 + rng.below(3)) {
            out.push_str(SYL[rng.below(SYL.len() as u64) as usize]);
        }
    }
    out.push('.');
    out
}

fn doc_path(corpus: &Path, i: usize) -> PathBuf {
    corpus.join(format!("d{:02}/doc-{i:05}.md", i % 50))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("live-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What one live mode measured.
struct Measured {
    mode: &'static str,
    initial_s: f64,
    indexed_ms: Vec<f64>,
    /// Serve only.
    in_search_ms: Vec<f64>,
    idle_cpu_pct: f64,
}

/// A process in live mode, ready for edits.
struct Live {
    child: Option<Child>,
    server: Option<Server>,
    http: Option<Http>,
}

impl Live {
    fn pid(&self) -> Option<u32> {
        match (&self.child, &self.server) {
            (Some(c), _) => Some(c.id()),
            (None, Some(s)) => Some(s.child.id()),
            (None, None) => None,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `index --watch`: ready once it says it is watching.
fn start_watch(bin: &Path, data: &Path, corpus: &Path) -> Result<Live> {
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(data)
        .args(["index", "--watch"])
        .arg(corpus)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end: a closed pipe would make the child's next log line fail.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(600))
            .context("live mode did not start")?;
        if line.contains("watching") {
            break;
        }
    }
    Ok(Live {
        child: Some(child),
        server: None,
        http: None,
    })
}

/// `serve` with the corpus as a live flow: ready once its first full traversal is done.
fn start_serve(bin: &Path, data: &Path, corpus: &Path, work: &Path) -> Result<Live> {
    let config = work.join("freshindex.toml");
    std::fs::write(
        &config,
        format!(
            "[[flow]]\nname = \"corpus\"\nsource = {{ type = \"files\", path = {:?} }}\nmode = \"live\"\n",
            corpus.display().to_string()
        ),
    )?;
    let server = Server::start(bin, data, &config, Stdio::null())?;
    let mut http = Http::connect(&server.addr)?;
    let t = Instant::now();
    loop {
        let (code, body) = http.get("/v1/flows/corpus/status")?;
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if v["live"]["fullRuns"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("serve did not finish its first traversal: {body}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Live {
        child: None,
        server: Some(server),
        http: Some(http),
    })
}

/// Whether a search for `token` among the rows of `key` returns the chunk that holds it (the
/// built-in model is a hashing embedder, so over the whole corpus a rare token does not rank
/// its chunk first reliably; what is measured is that search serves the new row).
fn found(http: &mut Http, token: &str, key: &str) -> Result<bool> {
    let (code, body) = http.post(
        "/v1/flows/corpus/search",
        &format!("{{\"query\": \"{token}\", \"limit\": 3, \"sourcePrefix\": \"{key}\"}}"),
    )?;
    if code != 200 {
        bail!("search answered {code}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let hits = v["hits"].as_array().context("no hits array")?;
    Ok(hits
        .iter()
        .any(|h| h["name"] == key && h["text"].as_str().is_some_and(|t| t.contains(token))))
}

#[allow(clippy::too_many_arguments)]
fn measure(
    mode: &'static str,
    bin: &Path,
    work: &Path,
    corpus: &Path,
    docs: usize,
    edits: usize,
    rng: &mut Rng,
) -> Result<Measured> {
    let data = work.join(format!("data-{mode}"));
    let t = Instant::now();
    let mut live = match mode {
        "watch" => start_watch(bin, &data, corpus)?,
        _ => start_serve(bin, &data, corpus, work)?,
    };
    let initial_s = t.elapsed().as_secs_f64();
    let store = SqliteStore::open(&data.join("state.sqlite"))?;
    let flow: FlowId = store
        .flow("corpus")?
        .context("flow `corpus` not registered")?
        .id;
    let mut indexed_ms = Vec::with_capacity(edits);
    let mut in_search_ms = Vec::new();
    for n in 0..edits {
        let i = rng.below(docs as u64) as usize;
        let p = doc_path(corpus, i);
        let key = p.strip_prefix(corpus)?.to_string_lossy().into_owned();
        let before = store.get(flow, &key)?.and_then(|e| e.item.content_hash);
        let token = format!("token{n}x{i}{mode}");
        let mut text = std::fs::read_to_string(&p)?;
        text.push_str(&format!("\nEdit {n}: {token} {token}\n"));
        std::fs::write(&p, text)?;
        let t0 = Instant::now();
        loop {
            if let Some(e) = store.get(flow, &key)?
                && e.item.status == ItemStatus::Accepted
                && e.item.content_hash.is_some()
                && e.item.content_hash != before
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("{mode}: edit {n} of {key} not indexed after 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        indexed_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        if let Some(http) = &mut live.http {
            while !found(http, &token, &key)? {
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("{mode}: edit {n} of {key} not in search after 30 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            in_search_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle CPU: five quiet seconds.
    std::thread::sleep(Duration::from_millis(500));
    let pid = live.pid().context("no process")?;
    let hz = 100.0;
    let c0 = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(5));
    let c1 = cpu_ticks(pid)?;
    drop(live);
    Ok(Measured {
        mode,
        initial_s,
        indexed_ms,
        in_search_ms,
        idle_cpu_pct: (c1 - c0) as f64 / hz / 5.0 * 100.0,
    })
}

fn run() -> Result<()> {
    let (mut docs, mut edits, mut bin, mut modes) =
        (20_000usize, 200usize, None, vec!["watch", "serve"]);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |n: &str| args.next().with_context(|| format!("{n} needs a value"));
        match a.as_str() {
            "--docs" => docs = value("--docs")?.parse()?,
            "--edits" => edits = value("--edits")?.parse()?,
            "--bin" => bin = Some(PathBuf::from(value("--bin")?)),
            "--mode" => {
                modes = match value("--mode")?.as_str() {
                    "watch" => vec!["watch"],
                    "serve" => vec!["serve"],
                    "both" => vec!["watch", "serve"],
                    other => bail!("--mode: `{other}` is not watch, serve or both"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    let bin = match bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("no parent")?
            .join("freshindex"),
    };
    let work = std::env::temp_dir().join(format!("freshindex-live-bench-{}", std::process::id()));
    let corpus = work.join("corpus");
    let mut rng = Rng(42);
    let old = SystemTime::now() - Duration::from_secs(3600);
    for i in 0..docs {
        let p = doc_path(&corpus, i);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        let mut text = format!("# Document {i}\n\n");
        for _ in 0..(3 + rng.below(5)) {
            let words = 40 + rng.below(60) as usize;
            text.push_str(&paragraph(&mut rng, words));
            text.push_str("\n\n");
        }
        std::fs::write(&p, text)?;
        std::fs::File::options()
            .write(true)
            .open(&p)?
            .set_modified(old)?;
    }

    let mut results = Vec::new();
    for mode in &modes {
        results.push(measure(mode, &bin, &work, &corpus, docs, edits, &mut rng)?);
    }

    // Baseline: what keeping fresh costs without live mode — a run over the whole corpus.
    let data = work.join(format!("data-{}", modes[0]));
    let t = Instant::now();
    let status = Command::new(&bin)
        .arg("--data-dir")
        .arg(&data)
        .args(["index"])
        .arg(&corpus)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("the baseline run failed");
    }
    let baseline_ms = t.elapsed().as_secs_f64() * 1000.0;

    println!(
        "live mode, {docs} docs, {edits} single-file edits per mode (from the write returning)"
    );
    println!("| measure | ms | vs baseline |");
    println!("|---|---|---|");
    println!("| baseline: one-shot `index` of the unchanged corpus | {baseline_ms:.1} | 1.00x |");
    for m in &mut results {
        for (what, lat) in [
            ("indexed", &mut m.indexed_ms),
            ("in search", &mut m.in_search_ms),
        ] {
            if lat.is_empty() {
                continue;
            }
            lat.sort_by(f64::total_cmp);
            for (name, p) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)] {
                let v = percentile(lat, p);
                println!(
                    "| {}: {what}, {name} | {v:.1} | {:.2}x |",
                    m.mode,
                    v / baseline_ms
                );
            }
        }
    }
    for m in &results {
        println!(
            "{}: initial index + start {:.2} s; idle CPU over 5 s {:.2}% of one core",
            m.mode, m.initial_s, m.idle_cpu_pct
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
