//! `live-bench`: freshness of live mode. Indexes a corpus with `freshindex index --watch`,
//! then edits one file at a time and measures the time from the write returning to the edit
//! being indexed (its queue entry accepted with the new content hash — the commit comes after
//! the target write, so the edit is searchable by then). Also reports the CPU an idle watcher
//! uses, and, as the baseline measured in the same run, the wall time of the alternative: a
//! one-shot `freshindex index` of the unchanged corpus.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use freshindex_core::ItemStatus;
use freshindex_store::{FlowStore, ItemStore, SqliteStore};

const USAGE: &str = "\
usage: live-bench [--docs N] [--edits M] [--bin PATH]

  --docs N    documents in the corpus (default 20000)
  --edits M   single-file edits measured (default 200)
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

fn run() -> Result<()> {
    let (mut docs, mut edits, mut bin) = (20_000usize, 200usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |n: &str| args.next().with_context(|| format!("{n} needs a value"));
        match a.as_str() {
            "--docs" => docs = value("--docs")?.parse()?,
            "--edits" => edits = value("--edits")?.parse()?,
            "--bin" => bin = Some(PathBuf::from(value("--bin")?)),
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
    let data = work.join("data");
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

    let t = Instant::now();
    let mut child = Command::new(&bin)
        .arg("--data-dir")
        .arg(&data)
        .args(["index", "--watch"])
        .arg(&corpus)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
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
    let initial = t.elapsed().as_secs_f64();

    let store = SqliteStore::open(&data.join("state.sqlite"))?;
    let flow = store
        .flow("corpus")?
        .context("flow `corpus` not registered")?
        .id;
    let mut latencies = Vec::with_capacity(edits);
    for n in 0..edits {
        let i = rng.below(docs as u64) as usize;
        let p = doc_path(&corpus, i);
        let key = p.strip_prefix(&corpus)?.to_string_lossy().into_owned();
        let before = store.get(flow, &key)?.and_then(|e| e.item.content_hash);
        let mut text = std::fs::read_to_string(&p)?;
        text.push_str(&format!(
            "Edit {n}: token{n}x{i} {}\n",
            paragraph(&mut rng, 12)
        ));
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
                bail!("edit {n} of {key} not indexed after 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle CPU: five quiet seconds.
    std::thread::sleep(Duration::from_millis(500));
    let hz = 100.0;
    let c0 = cpu_ticks(child.id())?;
    std::thread::sleep(Duration::from_secs(5));
    let c1 = cpu_ticks(child.id())?;
    let idle_cpu = (c1 - c0) as f64 / hz / 5.0 * 100.0;
    let _ = child.kill();
    let _ = child.wait();

    // Baseline: what keeping fresh costs without live mode — a run over the whole corpus.
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

    latencies.sort_by(f64::total_cmp);
    println!("live mode, {docs} docs, {edits} single-file edits (write returned -> indexed)");
    println!("initial index + watcher start: {initial:.2} s");
    println!("| measure | ms | vs baseline |");
    println!("|---|---|---|");
    println!("| baseline: one-shot `index` of the unchanged corpus | {baseline_ms:.1} | 1.00x |");
    for (name, p) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)] {
        let v = percentile(&latencies, p);
        println!(
            "| edit visible, {name} | {v:.1} | {:.2}x |",
            v / baseline_ms
        );
    }
    println!("idle watcher CPU over 5 s: {idle_cpu:.2}% of one core");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
