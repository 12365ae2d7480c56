//! `freshindex-bench`: end-to-end benchmark of the `freshindex` binary on a synthetic corpus.
//!
//! Generates a seeded Markdown corpus, runs `freshindex index` as a child process for an
//! initial index, a no-op refresh and a small edit, and compares each with an in-process floor
//! (the least that scenario can cost). See `bench/README.md`.

mod corpus;
mod measure;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use corpus::Generator;
use measure::{ChildRun, HELPER_MODE};

const USAGE: &str = "\
usage: freshindex-bench [--docs N] [--seed S] [--runs R] [--work DIR] [--bin PATH]

  --docs N     documents in the synthetic corpus (default 20000)
  --seed S     seed of the corpus and of the edit (default 42)
  --runs R     runs of the in-memory floor, the initial index (each into a fresh data
               directory) and the no-op refresh; the best of each is reported (default 3)
  --work DIR   folder for the corpus and the data directory (default: a fresh temporary
               folder, removed afterwards); DIR/corpus and DIR/data must not exist
  --bin PATH   the freshindex binary (default: `freshindex` next to this binary)";

/// The engine ignores size+mtime of files modified this recently (it re-hashes them); wait
/// this long after writing so that the runs see a settled corpus, like a real one.
const SETTLE: Duration = Duration::from_millis(2500);

/// Runs of the walk floor (the best is kept).
const WALK_FLOOR_RUNS: usize = 3;

/// Targets: a scenario's wall time may be at most this many times its floor.
const FLOOR_FACTOR: f64 = 2.0;

#[derive(Debug)]
struct Args {
    docs: usize,
    seed: u64,
    runs: usize,
    work: Option<PathBuf>,
    bin: Option<PathBuf>,
}

fn parse_args(args: &[OsString]) -> Result<Option<Args>> {
    let mut out = Args {
        docs: 20_000,
        seed: 42,
        runs: 3,
        work: None,
        bin: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg
            .to_str()
            .with_context(|| format!("unexpected argument {arg:?}\n{USAGE}"))?;
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(OsString::from(v))),
            None => (arg, None),
        };
        let mut value = || -> Result<OsString> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value\n{USAGE}")),
            }
        };
        let number = |v: OsString| -> Result<u64> {
            v.to_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("{name}: not a number: {v:?}"))
        };
        match name {
            "--docs" => out.docs = number(value()?)? as usize,
            "--seed" => out.seed = number(value()?)?,
            "--runs" => out.runs = (number(value()?)? as usize).max(1),
            "--work" => out.work = Some(PathBuf::from(value()?)),
            "--bin" => out.bin = Some(PathBuf::from(value()?)),
            _ => bail!("unknown argument `{arg}`\n{USAGE}"),
        }
    }
    if out.docs == 0 {
        bail!("--docs must be at least 1");
    }
    Ok(Some(out))
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let result = if args.first().is_some_and(|a| a == HELPER_MODE) {
        measure::helper_main(&args[1..])
    } else {
        match parse_args(&args) {
            Ok(Some(args)) => run(args),
            Ok(None) => {
                println!("{USAGE}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freshindex-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The folder holding the corpus and the data directory.
struct Work {
    path: PathBuf,
    /// Created by us, so removed when the benchmark succeeds.
    temporary: bool,
}

impl Work {
    fn new(requested: Option<PathBuf>) -> Result<Work> {
        if let Some(path) = requested {
            for sub in ["corpus", "data"] {
                let p = path.join(sub);
                if p.exists() {
                    bail!(
                        "{} already exists; remove it or pick another --work folder",
                        p.display()
                    );
                }
            }
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            return Ok(Work {
                path,
                temporary: false,
            });
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "freshindex-bench-{}-{nanos:09}",
            std::process::id()
        ));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Work {
            path,
            temporary: true,
        })
    }
}

/// One `freshindex index` run.
#[derive(Debug)]
struct Scenario {
    name: String,
    wall: Duration,
    engine: Duration,
    computed: u64,
    expected: u64,
    rows_written: u64,
    rows_total: u64,
    max_rss_kib: u64,
    items: String,
    errors: usize,
    warnings: usize,
}

fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("cannot locate the bench binary")?
            .with_file_name("freshindex"),
    };
    if !bin.is_file() {
        bail!(
            "the freshindex binary is missing at {}; build it with `cargo build --release -p freshindex` (or pass --bin PATH)",
            bin.display()
        );
    }
    let work = Work::new(args.work.clone())?;
    let corpus = work.path.join("corpus");
    let data = work.path.join("data");
    let outcome = benchmark(&args, &bin, &corpus, &data);
    match &outcome {
        Ok(()) if work.temporary => {
            if let Err(e) = std::fs::remove_dir_all(&work.path) {
                eprintln!("note: cannot remove {}: {e}", work.path.display());
            }
        }
        Ok(()) => {}
        Err(_) => eprintln!("the corpus and data are kept in {}", work.path.display()),
    }
    outcome?;
    println!(
        "\nwhole benchmark: {} (generation, floors, runs and checks)",
        secs(started.elapsed())
    );
    Ok(())
}

fn benchmark(args: &Args, bin: &Path, corpus: &Path, data: &Path) -> Result<()> {
    let n = args.docs;
    let generator = Generator::new(args.seed);

    progress(format_args!(
        "generating {n} documents (seed {}) in {}",
        args.seed,
        corpus.display()
    ));
    let bytes = generator.write_corpus(corpus, n)?;
    std::thread::sleep(SETTLE);

    progress(format_args!(
        "in-memory floor: read, parse, split, embed distinct chunks"
    ));
    // Best of `runs`, for the floor and the scenarios alike: this machine is noisy.
    let mut mem = measure::in_memory_floor(corpus)?;
    for _ in 1..args.runs {
        let again = measure::in_memory_floor(corpus)?;
        mem.elapsed = mem.elapsed.min(again.elapsed);
    }
    if mem.files != n as u64 || mem.bytes != bytes {
        bail!(
            "the corpus changed under the benchmark: {} files / {} bytes written, {} / {} read",
            n,
            bytes,
            mem.files,
            mem.bytes
        );
    }
    let distinct = mem.distinct.len() as u64;

    progress(format_args!("initial index (best of {})", args.runs));
    let mut initial = scenario("initial", bin, data, corpus, distinct)?;
    for _ in 1..args.runs {
        std::fs::remove_dir_all(data)
            .with_context(|| format!("removing {} for another initial run", data.display()))?;
        let again = scenario("initial", bin, data, corpus, distinct)?;
        if again.wall < initial.wall {
            initial = again;
        }
    }

    progress(format_args!("walk floor (best of {WALK_FLOOR_RUNS})"));
    let mut walk = Duration::MAX;
    for _ in 0..WALK_FLOOR_RUNS {
        let (t, files) = measure::walk_floor(corpus)?;
        if files != n as u64 {
            bail!("walk floor saw {files} files, expected {n}");
        }
        walk = walk.min(t);
    }

    progress(format_args!("no-op refresh (best of {})", args.runs));
    let mut noop = scenario("no-op", bin, data, corpus, 0)?;
    for _ in 1..args.runs {
        let again = scenario("no-op", bin, data, corpus, 0)?;
        if again.wall < noop.wall {
            noop = again;
        }
    }

    let edit = share(n, 0.01);
    let delete = share(n - edit, 0.005);
    let add = share(n, 0.005);
    progress(format_args!(
        "edit: one paragraph in {edit} documents, delete {delete}, add {add}"
    ));
    let changed = generator.apply_edit(corpus, n, edit, delete, add)?;
    std::thread::sleep(SETTLE);
    let expected = measure::new_chunk_texts(corpus, &changed, &mem.distinct)?;
    let edited = scenario("edit 1%/-0.5%/+0.5%", bin, data, corpus, expected)?;

    print!(
        "{}",
        report(
            args,
            bytes,
            &mem,
            walk,
            &[&initial, &noop, &edited],
            (edit, delete, add)
        )
    );
    Ok(())
}

/// `fraction` of `n`, rounded, at least 1.
fn share(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).round() as usize).clamp(1, n.max(1))
}

fn progress(msg: std::fmt::Arguments<'_>) {
    eprintln!("freshindex-bench: {msg}");
}

/// Runs `freshindex --data-dir DATA index CORPUS --json` and reads its summary.
fn scenario(name: &str, bin: &Path, data: &Path, corpus: &Path, expected: u64) -> Result<Scenario> {
    let args: Vec<OsString> = vec![
        "--data-dir".into(),
        data.into(),
        "index".into(),
        corpus.into(),
        "--json".into(),
    ];
    let run: ChildRun = measure::run_child(bin, &args)?;
    if run.code != Some(0) {
        bail!(
            "scenario {name}: {} {} exited with {}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            bin.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            run.code
                .map_or_else(|| "a signal".to_string(), |c| format!("code {c}")),
            run.stderr.trim_end(),
            run.stdout.trim_end()
        );
    }
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).with_context(|| {
        format!(
            "scenario {name}: stdout is not one JSON object: {:?}",
            run.stdout
        )
    })?;
    let num = |path: &[&str]| -> Result<u64> {
        let mut at = &v;
        for p in path {
            at = &at[*p];
        }
        at.as_u64()
            .with_context(|| format!("scenario {name}: summary has no `{}`", path.join(".")))
    };
    let status = v["status"].as_str().unwrap_or("?");
    if status != "success" {
        bail!(
            "scenario {name}: run status `{status}`: {}",
            run.stdout.trim()
        );
    }
    let count = |k: &str| v[k].as_array().map_or(0, Vec::len);
    let items = [
        "seen",
        "new",
        "modified",
        "unchanged",
        "deleted",
        "failed",
        "skipped",
    ]
    .iter()
    .map(|k| Ok(format!("{k} {}", num(&["items", k])?)))
    .collect::<Result<Vec<_>>>()?
    .join(", ");
    Ok(Scenario {
        name: name.to_string(),
        wall: run.wall,
        engine: Duration::from_millis(num(&["elapsed_ms"])?),
        computed: num(&["embeddings", "computed"])?,
        expected,
        rows_written: num(&["rows", "added"])?
            + num(&["rows", "updated"])?
            + num(&["rows", "deleted"])?,
        rows_total: num(&["rows", "total"])?,
        max_rss_kib: run.max_rss_kib,
        items,
        errors: count("errors"),
        warnings: count("warnings"),
    })
}

/// Seconds with about three significant digits.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{s:.3} s")
    } else if s < 100.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn report(
    args: &Args,
    bytes: u64,
    mem: &measure::InMemory,
    walk: Duration,
    runs: &[&Scenario; 3],
    (edit, delete, add): (usize, usize, usize),
) -> String {
    let [initial, noop, edited] = *runs;
    let mut o = String::new();
    let w = &mut o;
    // Writing to a String cannot fail.
    let _ = writeln!(w);
    let _ = writeln!(w, "machine: {}", machine());
    let _ = writeln!(
        w,
        "corpus: {} docs, {:.1} MB, {} chunks ({} distinct)      seed {}",
        args.docs,
        bytes as f64 / 1e6,
        mem.chunks,
        mem.distinct.len(),
        args.seed
    );
    let _ = writeln!(
        w,
        "edit: one paragraph replaced in {edit} docs, {delete} deleted, {add} added"
    );
    let _ = writeln!(w);
    let row = |w: &mut String, cols: [&str; 7]| {
        let line = format!(
            "{:<21}{:<10}{:<10}{:<28}{:<14}{:<10}{}",
            cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6]
        );
        let _ = writeln!(w, "{}", line.trim_end());
    };
    row(
        w,
        [
            "scenario",
            "wall",
            "engine",
            "emb.computed",
            "rows written",
            "peak RSS",
            "vs floor",
        ],
    );
    row(w, ["walk floor", &secs(walk), "", "", "", "", "1.00x"]);
    row(
        w,
        [
            "in-memory floor",
            &secs(mem.elapsed),
            "",
            "",
            "",
            "",
            "1.00x",
        ],
    );
    for (s, floor) in [
        (initial, Some((mem.elapsed, "in-memory floor"))),
        (noop, Some((walk, "walk floor"))),
        (edited, None),
    ] {
        let computed = if s.computed == s.expected {
            format!("{} (expected {})", s.computed, s.expected)
        } else {
            format!("{} (expected {}) !!", s.computed, s.expected)
        };
        let vs = floor.map_or(String::new(), |(f, what)| {
            format!("{:.2}x {what}", ratio(s.wall, f))
        });
        row(
            w,
            [
                &s.name,
                &secs(s.wall),
                &secs(s.engine),
                &computed,
                &s.rows_written.to_string(),
                &format!("{:.0} MiB", s.max_rss_kib as f64 / 1024.0),
                &vs,
            ],
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "walk floor: walkdir (following links) + stat of every file, one thread, best of {WALK_FLOOR_RUNS}, measured right before the no-op run."
    );
    let _ = writeln!(
        w,
        "in-memory floor: read + parse + split every file and embed each distinct chunk text once (dedup by text with a HashSet,"
    );
    let _ = writeln!(
        w,
        "  as the engine's cache embeds each distinct text once), one thread, nothing persisted, measured right before the initial run.\n\
         initial and no-op: best of {} runs (each initial run into a fresh data directory), like the in-memory floor; the edit runs once.",
        args.runs
    );
    let _ = writeln!(
        w,
        "wall: spawn to exit of the child process; engine: its own elapsed_ms; expected emb.computed: distinct chunk texts not indexed before."
    );
    let _ = writeln!(w);
    for s in [initial, noop, edited] {
        let _ = writeln!(
            w,
            "{:<21}items: {}; rows total {}; {} errors, {} warnings",
            s.name, s.items, s.rows_total, s.errors, s.warnings
        );
    }
    if initial.rows_total != mem.chunks {
        let _ = writeln!(
            w,
            "!! initial: {} rows in the collection, but the corpus splits into {} chunks",
            initial.rows_total, mem.chunks
        );
    }
    for s in [initial, noop, edited] {
        if s.computed != s.expected {
            let _ = writeln!(
                w,
                "!! MISMATCH {}: the engine computed {} embeddings, {} expected",
                s.name, s.computed, s.expected
            );
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "targets");
    let noop_x = ratio(noop.wall, walk);
    let initial_x = ratio(initial.wall, mem.elapsed);
    let targets = [
        (
            format!("no-op wall <= {FLOOR_FACTOR:.0}x walk floor"),
            format!("{noop_x:.2}x"),
            noop_x <= FLOOR_FACTOR,
        ),
        (
            format!("initial wall <= {FLOOR_FACTOR:.0}x in-memory floor"),
            format!("{initial_x:.2}x"),
            initial_x <= FLOOR_FACTOR,
        ),
        (
            "edit emb.computed == expected".to_string(),
            format!("{} vs {}", edited.computed, edited.expected),
            edited.computed == edited.expected,
        ),
    ];
    for (what, value, ok) in targets {
        let _ = writeln!(w, "  {what:<38}{value:<16}{}", verdict(ok));
    }
    o
}

/// Processor count, model and memory of this machine.
fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(String::new(), |kib| {
            format!(", {:.1} GiB RAM", kib / 1024.0 / 1024.0)
        });
    format!("nproc {nproc}, {model}{mem_gib}")
}
