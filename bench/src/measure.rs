//! Measurements: the engine binary run as a child process, and the in-process floors.

use std::collections::HashSet;
use std::ffi::OsString;
use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use freshindex_core::{Fingerprint, SplitSpec};
use freshindex_engine::steps::embed::BuiltinEmbedder;
use freshindex_engine::steps::parse::parse;
use freshindex_engine::steps::split::Splitter;
use nix::sys::resource::{UsageWho, getrusage};
use walkdir::WalkDir;

/// First argument that turns the bench binary into the measuring helper.
pub const HELPER_MODE: &str = "__measure-child";

/// One run of the engine binary.
#[derive(Debug)]
pub struct ChildRun {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Wall time from spawn to exit.
    pub wall: Duration,
    /// Peak resident set size in KiB.
    pub max_rss_kib: u64,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
}

/// The helper process: `freshindex-bench __measure-child PROGRAM ARGS...` runs the program,
/// then prints its exit code, wall time and peak RSS as one JSON object on stdout.
///
/// The peak RSS is `ru_maxrss` of `getrusage(RUSAGE_CHILDREN)`, which is exact (the kernel
/// keeps it) but covers every child a process ever waited for; a fresh helper per run makes
/// it the peak of that one run. (The workspace forbids `unsafe`, which rules out calling
/// `wait4` directly.)
pub fn helper_main(args: &[OsString]) -> Result<()> {
    let (program, rest) = args.split_first().context("helper: no program given")?;
    let start = Instant::now();
    let out = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", Path::new(program).display()))?;
    let wall = start.elapsed();
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage")?;
    let report = serde_json::json!({
        "code": out.status.code(),
        "wall_ns": wall.as_nanos() as u64,
        "max_rss_kib": usage.max_rss(),
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
    });
    println!("{report}");
    Ok(())
}

/// Runs `program args...` through a fresh helper process and returns what it measured.
pub fn run_child(program: &Path, args: &[OsString]) -> Result<ChildRun> {
    let exe = std::env::current_exe().context("cannot locate the bench binary")?;
    let out = Command::new(exe)
        .arg(HELPER_MODE)
        .arg(program)
        .args(args)
        .env_remove("FRESHINDEX_CONFIG")
        .env_remove("FRESHINDEX_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .context("cannot start the measuring helper")?;
    if !out.status.success() {
        bail!(
            "measuring helper failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("measuring helper: unreadable report")?;
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok(ChildRun {
        code: v["code"].as_i64().map(|c| c as i32),
        wall: Duration::from_nanos(v["wall_ns"].as_u64().context("helper report: wall_ns")?),
        max_rss_kib: v["max_rss_kib"]
            .as_u64()
            .context("helper report: max_rss_kib")?,
        stdout: text("stdout"),
        stderr: text("stderr"),
    })
}

/// The walk floor: walk the corpus (following links) and stat every entry, as a refresh must
/// at least do. Returns the time and the number of files.
pub fn walk_floor(root: &Path) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let mut files = 0u64;
    for entry in WalkDir::new(root).follow_links(true) {
        let entry = entry.context("walking the corpus")?;
        let md = std::fs::metadata(entry.path())
            .with_context(|| format!("cannot stat {}", entry.path().display()))?;
        if md.is_file() {
            files += 1;
            black_box(md.len());
        }
    }
    Ok((start.elapsed(), files))
}

/// Splits files exactly as the engine does: its parser, and its splitter with the default
/// spec (1000 characters, 200 overlap), keyed by the `/`-separated relative path.
#[derive(Debug)]
pub struct Chunker {
    splitter: Splitter,
}

impl Chunker {
    /// A chunker with the engine's default split spec.
    pub fn new() -> Result<Chunker> {
        let spec = SplitSpec {
            chunk_size: 1000,
            chunk_overlap: 200,
        };
        let splitter = Splitter::new(&spec).map_err(anyhow::Error::msg)?;
        Ok(Chunker { splitter })
    }

    /// Calls `f` with every chunk text of the file `root/key`; files the parser skips have no
    /// chunks. Returns the file size.
    pub fn each_chunk(&self, root: &Path, key: &str, mut f: impl FnMut(&str)) -> Result<u64> {
        let path = root.join(key);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if let Ok(parsed) = parse(&bytes) {
            for c in self.splitter.split(key, parsed.text) {
                f(c.text);
            }
        }
        Ok(bytes.len() as u64)
    }
}

/// What the in-memory floor processed.
#[derive(Debug)]
pub struct InMemory {
    /// Time of the whole pass.
    pub elapsed: Duration,
    /// Files read.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Chunks produced.
    pub chunks: u64,
    /// Fingerprints of the distinct chunk texts (each embedded once).
    pub distinct: HashSet<Fingerprint>,
}

/// The in-memory floor: read, parse and split every file and embed each distinct chunk text
/// once with the built-in model, on one thread, persisting nothing.
pub fn in_memory_floor(root: &Path) -> Result<InMemory> {
    let chunker = Chunker::new()?;
    let embedder = BuiltinEmbedder;
    let start = Instant::now();
    let mut out = InMemory {
        elapsed: Duration::ZERO,
        files: 0,
        bytes: 0,
        chunks: 0,
        distinct: HashSet::new(),
    };
    for entry in WalkDir::new(root).follow_links(true) {
        let entry = entry.context("walking the corpus")?;
        if !entry.file_type().is_file() {
            continue;
        }
        let key = relative_key(root, entry.path())?;
        out.files += 1;
        out.bytes += chunker.each_chunk(root, &key, |text| {
            out.chunks += 1;
            if out.distinct.insert(Fingerprint::of(text.as_bytes())) {
                black_box(embedder.embed_one(text));
            }
        })?;
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// How many distinct chunk texts of the files `keys` are not in `before`: the embeddings an
/// incremental run must compute when only these files are new or changed.
pub fn new_chunk_texts(root: &Path, keys: &[String], before: &HashSet<Fingerprint>) -> Result<u64> {
    let chunker = Chunker::new()?;
    let mut new = HashSet::new();
    for key in keys {
        chunker.each_chunk(root, key, |text| {
            let fp = Fingerprint::of(text.as_bytes());
            if !before.contains(&fp) {
                new.insert(fp);
            }
        })?;
    }
    Ok(new.len() as u64)
}

/// The item key of a file: its path relative to the root, `/`-separated.
fn relative_key(root: &Path, path: &Path) -> Result<String> {
    let rel = path
        .strip_prefix(root)
        .with_context(|| format!("{} is outside the corpus", path.display()))?;
    let parts: Vec<&str> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_str()
                .with_context(|| format!("non-UTF-8 file name {}", rel.display()))
        })
        .collect::<Result<_>>()?;
    Ok(parts.join("/"))
}
