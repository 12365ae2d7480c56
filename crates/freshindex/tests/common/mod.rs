//! Shared helpers for the integration tests of the `freshindex` binary.
//!
//! Every test drives the real binary on real files in temporary directories.
//! Each child process is run with a timeout, so a hang fails the test instead
//! of blocking CI, and its stdout/stderr are drained by background threads so
//! a chatty child can never block on a full pipe.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod http;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_freshindex");

/// Upper bound for any single child process. Generous because tests may run
/// against a debug build on a loaded CI machine; it only exists to turn a
/// hang into a failure.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// Environment variables the binary reads; they are removed from every child
/// unless a test sets them explicitly, so the caller's environment cannot leak
/// into a test.
const BINARY_ENV: &[&str] = &[
    "FRESHINDEX_CONFIG",
    "FRESHINDEX_DATA_DIR",
    "FRESHINDEX_FAILPOINT",
    "FRESHINDEX_FAILPOINT_RESUME",
    "FRESHINDEX_LISTEN",
    "FRESHINDEX_TOKEN",
    "FRESHINDEX_LEASE_SECS",
];

// ---------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------

/// Small seeded PRNG (SplitMix64): reproducible across platforms and crate
/// versions, which matters more here than statistical quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Reads an optional numeric override from the environment, used to replay a
/// failing seed or to run longer locally.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be an unsigned integer, got {v:?}"))
    })
}

/// Small vocabulary so that words, sentences and sometimes whole chunks repeat
/// across files.
pub const VOCAB: &[&str] = &[
    "index", "vector", "chunk", "river", "stone", "garden", "cache", "lantern", "orbit", "signal",
    "copper", "meadow", "engine", "harbor", "pixel", "quartz", "maple", "thunder", "ledger",
    "canyon", "violet", "anchor", "prism", "falcon", "ember", "glacier", "cobalt", "willow",
    "summit", "tunnel", "beacon", "marble",
];

/// A sentence-like paragraph of `words` words from [`VOCAB`].
pub fn paragraph(rng: &mut Rng, words: usize) -> String {
    let mut out = String::new();
    for i in 0..words {
        let w = *rng.pick(VOCAB);
        if i == 0 {
            let mut c = w.chars();
            let first = c.next().expect("non-empty word").to_ascii_uppercase();
            out.push(first);
            out.push_str(c.as_str());
        } else {
            out.push(' ');
            out.push_str(w);
        }
        // Sentence breaks give the splitter natural boundaries to use.
        if i + 1 < words && rng.chance(12) {
            out.push('.');
        }
    }
    out.push('.');
    out
}

// ---------------------------------------------------------------------------
// Workspace and configuration
// ---------------------------------------------------------------------------

/// Settings of the single flow the config-based tests use.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    pub name: String,
    /// Source folder, relative to the config file's directory.
    pub path: String,
    pub include: Vec<String>,
    pub max_file_size: Option<String>,
    pub chunk_size: usize,
    pub chunk_overlap: usize,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            name: "docs".into(),
            path: "docs".into(),
            include: vec!["**/*.md".into(), "**/*.txt".into()],
            max_file_size: None,
            chunk_size: 1000,
            chunk_overlap: 200,
        }
    }
}

impl FlowConfig {
    pub fn with_chunks(chunk_size: usize, chunk_overlap: usize) -> Self {
        FlowConfig {
            chunk_size,
            chunk_overlap,
            ..FlowConfig::default()
        }
    }

    pub fn to_toml(&self) -> String {
        let include = self
            .include
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let max = self
            .max_file_size
            .as_ref()
            .map(|m| format!(", max_file_size = {m:?}"))
            .unwrap_or_default();
        format!(
            "[[flow]]\n\
             name = {name:?}\n\
             source = {{ type = \"files\", path = {path:?}, include = [{include}]{max} }}\n\
             steps = [\n  \
               {{ op = \"parse\" }},\n  \
               {{ op = \"split\", chunk_size = {cs}, chunk_overlap = {co} }},\n  \
               {{ op = \"embed\", model = \"builtin\", batch_size = 64 }},\n\
             ]\n\
             target = {{ type = \"collection\", name = {name:?} }}\n",
            name = self.name,
            path = self.path,
            cs = self.chunk_size,
            co = self.chunk_overlap,
        )
    }
}

/// A temporary directory holding a config file (`freshindex.toml`), a source
/// tree (`docs/`) and a persistent data dir (`data/`).
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub flow: FlowConfig,
}

impl Workspace {
    /// Creates the workspace with the given flow config written to disk.
    pub fn new(flow: FlowConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("freshindex-test-")
            .tempdir()
            .expect("create temp dir");
        let ws = Workspace { dir, flow };
        fs::create_dir_all(ws.src()).expect("create source dir");
        ws.write_config();
        ws
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn src(&self) -> PathBuf {
        self.root().join(&self.flow.path)
    }

    pub fn data(&self) -> PathBuf {
        self.root().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.root().join("freshindex.toml")
    }

    pub fn write_config(&self) {
        fs::write(self.config_path(), self.flow.to_toml()).expect("write config");
    }

    pub fn set_chunks(&mut self, chunk_size: usize, chunk_overlap: usize) {
        self.flow.chunk_size = chunk_size;
        self.flow.chunk_overlap = chunk_overlap;
        self.write_config();
    }

    /// Writes a file under the source tree, creating parent directories.
    pub fn write(&self, rel: impl AsRef<Path>, content: impl AsRef<[u8]>) {
        write_file(&self.src().join(rel), content);
    }

    /// A command with `--config` and `--data-dir` pointing at this workspace.
    pub fn fi(&self) -> Fi {
        self.fi_with_data(&self.data())
    }

    /// Same config, other data dir (e.g. a fresh one for a from-scratch run).
    pub fn fi_with_data(&self, data: &Path) -> Fi {
        Fi::new(self.root())
            .arg("--config")
            .arg(self.config_path())
            .arg("--data-dir")
            .arg(data)
    }

    /// `index --json` in the persistent data dir; asserts exit 0.
    pub fn index(&self) -> Summary {
        self.fi().args(["index", "--json"]).run().ok().summary()
    }

    /// `export --flow NAME` of the persistent data dir, raw JSONL.
    pub fn export(&self) -> String {
        self.export_from(&self.data())
    }

    pub fn export_from(&self, data: &Path) -> String {
        self.fi_with_data(data)
            .args(["export", "--flow"])
            .arg(&self.flow.name)
            .run()
            .ok()
            .stdout
    }

    /// Starts `index --json` and waits until it stops at the `scan-done` failpoint (the tree
    /// is listed, no file read yet). It goes on once the returned resume file exists.
    pub fn index_paused_after_scan(&self) -> (Running, PathBuf) {
        let resume = self.root().join("resume-after-scan");
        let mut child = self
            .fi()
            .args(["index", "--json"])
            .env("FRESHINDEX_FAILPOINT", "scan-done")
            .env("FRESHINDEX_FAILPOINT_RESUME", &resume)
            .spawn();
        assert!(
            child.wait_stderr("failpoint scan-done reached", TIMEOUT),
            "the run ended without reaching the scan-done failpoint"
        );
        (child, resume)
    }

    /// Indexes the current tree with the current config into a brand-new data
    /// dir and returns its export: the oracle every incremental state must
    /// match byte for byte.
    pub fn fresh_export(&self) -> String {
        let data = tempfile::Builder::new()
            .prefix("freshindex-fresh-")
            .tempdir()
            .expect("create fresh data dir");
        let summary = self
            .fi_with_data(data.path())
            .args(["index", "--json"])
            .run()
            .ok()
            .summary();
        assert_eq!(
            summary.status(),
            "success",
            "from-scratch index failed: {}",
            summary.0
        );
        self.export_from(data.path())
    }
}

/// Waits until the workspace's target equals a from-scratch index of its tree (a live
/// process is updating it); `context` adds to the failure message (a server's stderr).
#[allow(dead_code)]
pub fn settles(ws: &Workspace, what: &str, context: &dyn Fn() -> String) {
    let want = ws.fresh_export();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = ws.export();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the live target did not converge\n--- live\n{got}\n--- fresh\n{want}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn write_file(path: &Path, content: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parent dirs");
    }
    fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// True when the tests run with effective uid 0 (file permissions are then
/// not enforced, so "unreadable file" needs an unprivileged child).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

/// Unprivileged uid/gid ("nobody") used when the tests run as root.
pub const NOBODY: u32 = 65534;

fn make_world_accessible(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path).expect("stat");
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = if meta.is_dir() { 0o777 } else { 0o666 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    if meta.is_dir() {
        for entry in fs::read_dir(path).expect("read dir") {
            make_world_accessible(&entry.expect("dir entry").path());
        }
    }
}

/// Commands (with `--config` and `--data-dir` of `ws`) under which file permissions apply.
/// Root bypasses them, so as root the binary runs as an unprivileged user on a tree (and data
/// dir location) that user can use; call it before making anything unreadable.
pub fn unprivileged_fi(ws: &Workspace) -> impl Fn() -> Fi + '_ {
    use std::os::unix::fs::PermissionsExt;
    let program = if is_root() {
        let copy = ws.root().join("freshindex-bin");
        fs::copy(BIN, &copy).expect("copy binary");
        make_world_accessible(ws.root());
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        Some(copy)
    } else {
        None
    };
    move || {
        let fi = match &program {
            Some(p) => Fi::with_program(p, ws.root()).run_as_user(NOBODY, NOBODY),
            None => Fi::new(ws.root()),
        };
        fi.arg("--config")
            .arg(ws.config_path())
            .arg("--data-dir")
            .arg(ws.data())
    }
}

/// Builder around `Command` for the binary under test.
pub struct Fi {
    cmd: Command,
    desc: String,
}

impl Fi {
    /// A command running the binary with `cwd` as working directory and a
    /// clean `FRESHINDEX_*` environment.
    pub fn new(cwd: &Path) -> Self {
        Fi::with_program(Path::new(BIN), cwd)
    }

    /// Like [`Fi::new`] but running another copy of the binary.
    pub fn with_program(program: &Path, cwd: &Path) -> Self {
        let mut cmd = Command::new(program);
        cmd.current_dir(cwd).stdin(Stdio::null());
        for var in BINARY_ENV {
            cmd.env_remove(var);
        }
        Fi {
            cmd,
            desc: "freshindex".into(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let _ = write!(self.desc, " {}", arg.as_ref().to_string_lossy());
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        let _ = write!(self.desc, " [{key}={}]", value.as_ref().to_string_lossy());
        self.cmd.env(key, value);
        self
    }

    /// Runs the child as another user (used to make permissions bite when
    /// the tests run as root).
    pub fn run_as_user(mut self, uid: u32, gid: u32) -> Self {
        use std::os::unix::process::CommandExt;
        let _ = write!(self.desc, " [uid={uid}]");
        self.cmd.uid(uid).gid(gid);
        self
    }

    pub fn spawn(mut self) -> Running {
        let mut child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{}`: {e}", self.desc));

        let mut out = child.stdout.take().expect("piped stdout");
        let stdout = thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        });

        // Stderr is forwarded line by line so tests can wait for a specific
        // line (failpoints) while the rest keeps being drained.
        let err = child.stderr.take().expect("piped stderr");
        let (tx, stderr_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });

        Running {
            child,
            stdout: Some(stdout),
            stderr_rx,
            stderr_lines: Vec::new(),
            stderr_closed: false,
            desc: self.desc,
        }
    }

    /// The command and its description, for tests that manage the child themselves (a
    /// server whose first stdout line they read).
    pub fn into_command(self) -> (Command, String) {
        (self.cmd, self.desc)
    }

    /// Spawns and waits (with [`TIMEOUT`]).
    pub fn run(self) -> Outcome {
        self.spawn().wait(TIMEOUT)
    }
}

/// A running child process of the binary.
pub struct Running {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr_rx: Receiver<String>,
    stderr_lines: Vec<String>,
    stderr_closed: bool,
    pub desc: String,
}

impl Running {
    /// Waits until a stderr line contains `needle`. Returns `false` if the
    /// child closed stderr (i.e. exited) without printing it. Kills the child
    /// and panics after `timeout`.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr_closed {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr_lines.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => self.stderr_closed = true,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "timed out after {timeout:?} waiting for stderr line {needle:?} from `{}`; stderr so far:\n{}",
                        self.desc,
                        self.stderr_lines.join("\n")
                    );
                }
            }
        }
    }

    /// Whether the child has already exited (without reaping output).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait on child").is_some()
    }

    /// Sends SIGKILL (what `Child::kill` does on Unix) and reaps the child.
    /// Returns `true` if the SIGKILL is what ended it, `false` if the child
    /// had already exited on its own.
    pub fn kill(mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let _ = self.child.kill();
        let status = self.child.wait().expect("reap killed child");
        status.signal() == Some(9)
    }

    /// Waits for the child to exit; kills it and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on child") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.drain_stderr(Instant::now() + Duration::from_secs(5));
                panic!(
                    "`{}` did not finish within {timeout:?}; stderr:\n{}",
                    self.desc,
                    self.stderr_lines.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        let stdout = self
            .stdout
            .take()
            .expect("stdout reader")
            .join()
            .expect("stdout reader thread");
        self.drain_stderr(Instant::now() + Duration::from_secs(30));
        Outcome {
            status,
            stdout: String::from_utf8(stdout)
                .unwrap_or_else(|e| panic!("stdout of `{}` is not UTF-8: {e}", self.desc)),
            stderr: self.stderr_lines.join("\n"),
            desc: self.desc.clone(),
        }
    }

    fn drain_stderr(&mut self, deadline: Instant) {
        while !self.stderr_closed {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_rx.recv_timeout(left) {
                Ok(line) => self.stderr_lines.push(line),
                Err(RecvTimeoutError::Disconnected) => self.stderr_closed = true,
                // A grandchild holding the pipe open must not hang the test.
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
    }
}

/// Result of a finished child.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub desc: String,
}

impl Outcome {
    /// Asserts exit code 0, showing the command and its stderr otherwise.
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "`{}` exited with {}\nstderr:\n{}\nstdout:\n{}",
            self.desc,
            self.status,
            self.stderr,
            self.stdout
        );
        self
    }

    /// Asserts a non-zero exit (a refused run).
    pub fn failed(self) -> Self {
        assert!(
            !self.status.success(),
            "`{}` was expected to fail but exited 0\nstdout:\n{}\nstderr:\n{}",
            self.desc,
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout of `{}` is not one JSON value ({e}):\n{}",
                self.desc, self.stdout
            )
        })
    }

    /// The summary of a single-flow `index --json`: stdout must be exactly one
    /// JSON object.
    pub fn summary(&self) -> Summary {
        let v = self.json();
        assert!(
            v.is_object(),
            "`{}` should print one JSON object, got: {v}",
            self.desc
        );
        Summary(v)
    }
}

// ---------------------------------------------------------------------------
// JSON summary and export
// ---------------------------------------------------------------------------

/// The JSON summary of one flow's run.
#[derive(Debug, Clone)]
pub struct Summary(pub Value);

impl Summary {
    /// A counter by dotted path, e.g. `n("items.seen")`.
    pub fn n(&self, path: &str) -> u64 {
        let mut v = &self.0;
        for part in path.split('.') {
            v = v
                .get(part)
                .unwrap_or_else(|| panic!("summary has no `{path}`: {}", self.0));
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("summary `{path}` is not an unsigned integer: {}", self.0))
    }

    pub fn status(&self) -> &str {
        self.0
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("summary has no string `status`: {}", self.0))
    }

    /// `(item, message)` pairs of the `errors` array.
    pub fn errors(&self) -> Vec<(String, String)> {
        self.pairs("errors", "error")
    }

    /// `(item, message)` pairs of the `warnings` array.
    pub fn warnings(&self) -> Vec<(String, String)> {
        self.pairs("warnings", "warning")
    }

    fn pairs(&self, list: &str, field: &str) -> Vec<(String, String)> {
        let arr = self
            .0
            .get(list)
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("summary has no `{list}` array: {}", self.0));
        arr.iter()
            .map(|e| {
                let get = |k: &str| {
                    e.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_else(|| panic!("`{list}` entry without string `{k}`: {e}"))
                        .to_string()
                };
                (get("item"), get(field))
            })
            .collect()
    }

    /// Asserts a warning for `item` whose message contains `needle`.
    pub fn assert_warning(&self, item: &str, needle: &str) {
        let w = self.warnings();
        assert!(
            w.iter().any(|(i, m)| i == item && m.contains(needle)),
            "expected a warning for item {item:?} containing {needle:?}; warnings: {w:?}\nsummary: {}",
            self.0
        );
    }

    /// Asserts an error for `item` whose message contains `needle`.
    pub fn assert_error(&self, item: &str, needle: &str) {
        let e = self.errors();
        assert!(
            e.iter().any(|(i, m)| i == item && m.contains(needle)),
            "expected an error for item {item:?} containing {needle:?}; errors: {e:?}\nsummary: {}",
            self.0
        );
    }

    /// Asserts the run completed cleanly: success, no error, no warning.
    pub fn assert_clean(&self) {
        assert_eq!(self.status(), "success", "summary: {}", self.0);
        assert!(self.errors().is_empty(), "unexpected errors: {}", self.0);
        assert!(
            self.warnings().is_empty(),
            "unexpected warnings: {}",
            self.0
        );
    }
}

/// One exported row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub source: String,
    pub range: (usize, usize),
    pub text: String,
    pub vector_len: usize,
}

/// Parses `export` JSONL output, checking every line has the contract shape.
pub fn parse_export(jsonl: &str) -> Vec<Row> {
    jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("export line is not JSON ({e}): {line}"));
            let s = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("export line without string `{k}`: {line}"))
                    .to_string()
            };
            let range = v
                .get("range")
                .and_then(Value::as_array)
                .filter(|a| a.len() == 2)
                .unwrap_or_else(|| panic!("export line without `range: [start, end]`: {line}"));
            let pos = |i: usize| {
                range[i]
                    .as_u64()
                    .unwrap_or_else(|| panic!("bad range in export line: {line}"))
                    as usize
            };
            let vector = v
                .get("vector")
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("export line without `vector` array: {line}"));
            Row {
                key: s("key"),
                source: s("source"),
                range: (pos(0), pos(1)),
                text: s("text"),
                vector_len: vector.len(),
            }
        })
        .collect()
}

/// Number of non-empty lines of a JSONL document.
pub fn line_count(jsonl: &str) -> usize {
    jsonl.lines().filter(|l| !l.trim().is_empty()).count()
}

/// Distinct chunk texts of an export.
pub fn distinct_texts(rows: &[Row]) -> BTreeSet<String> {
    rows.iter().map(|r| r.text.clone()).collect()
}

/// The exact number of embeddings a run must compute: distinct chunk texts
/// after the run that no row used before it (the cache keeps exactly the
/// texts of the previous rows).
pub fn expected_computed(before: &[Row], after: &[Row]) -> usize {
    let old = distinct_texts(before);
    distinct_texts(after)
        .into_iter()
        .filter(|t| !old.contains(t))
        .count()
}

/// Sources present in an export.
pub fn sources(rows: &[Row]) -> BTreeSet<String> {
    rows.iter().map(|r| r.source.clone()).collect()
}

/// Checks export invariants that hold for any tree: sorted by key, unique
/// keys, a non-empty vector of one common dimension on every row.
pub fn assert_export_well_formed(jsonl: &str) {
    let rows = parse_export(jsonl);
    for pair in rows.windows(2) {
        assert!(
            pair[0].key < pair[1].key,
            "export not strictly sorted by key: {:?} then {:?}",
            pair[0].key,
            pair[1].key
        );
    }
    if let Some(first) = rows.first() {
        assert!(first.vector_len > 0, "empty vector in export");
        assert!(
            rows.iter().all(|r| r.vector_len == first.vector_len),
            "vectors of different dimensions in one export"
        );
    }
}

/// Checks the chunks of one file against its `content`: each chunk text is
/// exactly the bytes of its `range`, has at most `max_chars` characters, and
/// together the chunks cover the file except for whitespace between them.
pub fn check_chunks(content: &str, rows: &[&Row], max_chars: usize) -> Result<(), String> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for r in rows {
        let (start, end) = r.range;
        let slice = content.get(start..end).ok_or_else(|| {
            format!(
                "range {:?} of {} is not a valid byte range of its {}-byte file",
                r.range,
                r.source,
                content.len()
            )
        })?;
        if start >= end || slice != r.text {
            return Err(format!(
                "chunk text of {} differs from the file bytes of its range {:?}: {:?} vs {:?}",
                r.source, r.range, r.text, slice
            ));
        }
        let chars = r.text.chars().count();
        if chars > max_chars {
            return Err(format!(
                "chunk {:?} of {} has {chars} chars, chunk_size is {max_chars}",
                r.range, r.source
            ));
        }
        ranges.push((start, end));
    }
    ranges.sort();
    let mut covered = 0;
    for (start, end) in ranges {
        if start > covered && !content[covered..start].trim().is_empty() {
            return Err(format!("bytes {covered}..{start} are in no chunk"));
        }
        covered = covered.max(end);
    }
    if !content[covered..].trim().is_empty() {
        return Err(format!("bytes {covered}.. are in no chunk"));
    }
    Ok(())
}

/// A short human-readable diff of two JSONL exports (first differing lines).
pub fn export_diff(expected: &str, got: &str) -> String {
    let exp: BTreeSet<&str> = expected.lines().collect();
    let got_set: BTreeSet<&str> = got.lines().collect();
    let shorten = |l: &str| -> String {
        // Vectors make lines long; the key/source/range/text prefix is what
        // helps when reading a failure.
        let mut cut = l.find("\"vector\"").unwrap_or(l.len()).min(300);
        while !l.is_char_boundary(cut) {
            cut -= 1;
        }
        l[..cut].to_string()
    };
    let mut out = format!(
        "expected {} lines, got {} lines\n",
        expected.lines().count(),
        got.lines().count()
    );
    for l in exp.difference(&got_set).take(8) {
        let _ = writeln!(out, "  missing: {}", shorten(l));
    }
    for l in got_set.difference(&exp).take(8) {
        let _ = writeln!(out, "  extra:   {}", shorten(l));
    }
    if exp == got_set {
        out.push_str("  (same lines, different order or duplicates)\n");
    }
    out
}
