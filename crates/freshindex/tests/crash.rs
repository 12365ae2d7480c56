//! Crash-safety test: `freshindex index` is killed with SIGKILL many times,
//! at failpoints inside the batch commit protocol (so some kills land between
//! the target write and the state commit for sure) and at random moments.
//! The tree is mutated between kills so every run has work to do. Completed
//! runs must always converge to exactly what a from-scratch index of the same
//! tree produces.

mod common;

use std::collections::HashMap;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    FlowConfig, Rng, TIMEOUT, Workspace, assert_export_well_formed, export_diff, line_count,
    paragraph,
};

const INITIAL_FILES: usize = 3000;
const DIRS: usize = 30;
/// Kills that must actually interrupt a run.
const MIN_KILLS: usize = 20;
const TARGET_KILLS: usize = 30;
/// A completed run plus a from-scratch comparison after this many kills.
const VERIFY_EVERY: usize = 3;
/// Fixed so failures replay; `FRESHINDEX_CRASH_SEED` explores other runs.
const SEED: u64 = 0xC0A5_4001;

#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// SIGKILL once the process reports reaching `point` for the nth time.
    Failpoint(&'static str, u32),
    /// SIGKILL after a random delay.
    Delay(Duration),
}

/// The tree: path -> (note id, revision). Content is a pure function of
/// (id, revision), so the test never has to keep file contents around.
struct Tree {
    ws: Workspace,
    rng: Rng,
    files: HashMap<String, (u32, u32)>,
    paths: Vec<String>,
    next_id: u32,
}

impl Tree {
    fn content(id: u32, rev: u32) -> String {
        // Every 40th note shares its text with the others of its kind, so the
        // embedding cache sees identical chunks across files.
        let key = if id.is_multiple_of(40) { 0 } else { id };
        let mut rng = Rng::new(((key as u64) << 32) | rev as u64);
        let paras = rng.range(1, 3);
        let mut out = format!("# Note {key}\n\n");
        for _ in 0..paras {
            let n = rng.range(10, 50);
            out.push_str(&paragraph(&mut rng, n));
            out.push_str("\n\n");
        }
        out.push_str(&format!("Revision {rev} of note {key}.\n"));
        out
    }

    fn add(&mut self) {
        self.next_id += 1;
        let id = self.next_id;
        let path = format!("d{:02}/note-{id:05}.md", self.rng.below(DIRS));
        self.ws.write(&path, Self::content(id, 0));
        self.files.insert(path.clone(), (id, 0));
        self.paths.push(path);
    }

    fn random_index(&mut self) -> usize {
        self.rng.below(self.paths.len())
    }

    fn edit(&mut self) {
        let i = self.random_index();
        let path = &self.paths[i];
        let entry = self.files.get_mut(path).expect("tracked file");
        entry.1 += 1;
        self.ws.write(path, Self::content(entry.0, entry.1));
    }

    fn delete(&mut self) {
        let i = self.random_index();
        let path = self.paths.swap_remove(i);
        self.files.remove(&path);
        fs::remove_file(self.ws.src().join(&path)).expect("delete file");
    }

    fn rename(&mut self) {
        let i = self.random_index();
        let from = self.paths[i].clone();
        let (id, rev) = self.files.remove(&from).expect("tracked file");
        self.next_id += 1;
        let to = format!(
            "d{:02}/moved-{}-{id:05}.md",
            self.rng.below(DIRS),
            self.next_id
        );
        let dest = self.ws.src().join(&to);
        fs::create_dir_all(dest.parent().expect("parent")).expect("create dir");
        fs::rename(self.ws.src().join(&from), dest).expect("rename file");
        self.files.insert(to.clone(), (id, rev));
        self.paths[i] = to;
    }

    /// A random mix of edits, deletes, adds and renames, sized so a run
    /// usually spans one to a few batches.
    fn mutate(&mut self) -> String {
        let n = self.rng.range(40, 700);
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let r = self.rng.below(100);
            // Keep the tree around its initial size.
            let grow = self.paths.len() < INITIAL_FILES;
            match r {
                0..60 => {
                    self.edit();
                    counts[0] += 1;
                }
                60..75 if !grow => {
                    self.delete();
                    counts[1] += 1;
                }
                60..90 => {
                    self.add();
                    counts[2] += 1;
                }
                _ => {
                    self.rename();
                    counts[3] += 1;
                }
            }
        }
        format!(
            "{} edits, {} deletes, {} adds, {} renames",
            counts[0], counts[1], counts[2], counts[3]
        )
    }

    /// Runs `index` to completion and checks the result against a
    /// from-scratch index of the same tree.
    fn verify(&self, log: &[String]) -> Duration {
        let started = Instant::now();
        let summary = self.ws.index();
        let took = started.elapsed();
        let context = || format!("history:\n  {}\nsummary: {}", log.join("\n  "), summary.0);
        assert_eq!(summary.status(), "success", "{}", context());
        assert!(
            summary.errors().is_empty(),
            "errors after recovery; {}",
            context()
        );
        assert_eq!(
            summary.n("items.seen"),
            self.paths.len() as u64,
            "items.seen; {}",
            context()
        );

        let export = self.ws.export();
        assert_eq!(
            summary.n("rows.total"),
            line_count(&export) as u64,
            "rows.total vs export lines; {}",
            context()
        );
        assert_export_well_formed(&export);
        let fresh = self.ws.fresh_export();
        assert!(
            export == fresh,
            "export after crash recovery differs from a from-scratch index:\n{}\n{}",
            export_diff(&fresh, &export),
            context()
        );
        took
    }
}

#[test]
fn sigkill_at_failpoints_and_random_moments_never_corrupts_the_index() {
    let seed = common::env_u64("FRESHINDEX_CRASH_SEED").unwrap_or(SEED);
    let mut tree = Tree {
        ws: Workspace::new(FlowConfig::default()),
        rng: Rng::new(seed),
        files: HashMap::new(),
        paths: Vec::new(),
        next_id: 0,
    };
    for _ in 0..INITIAL_FILES {
        tree.add();
    }
    let mut log = vec![format!("seed {seed}: created {INITIAL_FILES} files")];

    // Kill the very first (full) index too: recovery from a half-built index.
    let schedule = [
        KillAt::Failpoint("target-written", 2),
        KillAt::Failpoint("pending-recorded", 1),
        KillAt::Delay(Duration::ZERO),
        KillAt::Failpoint("batch-committed", 1),
        KillAt::Failpoint("target-written", 1),
        KillAt::Failpoint("scan-done", 1),
        KillAt::Delay(Duration::ZERO),
        KillAt::Failpoint("pending-recorded", 2),
        KillAt::Failpoint("target-written", 3),
        KillAt::Failpoint("batch-committed", 2),
    ];
    // Upper bound for random delays: how long the latest completed run took.
    let mut last_run = Duration::from_millis(500);
    let mut kills = 0;
    let mut since_verify = 0;
    let mut round = 0;

    while kills < TARGET_KILLS {
        assert!(
            round < TARGET_KILLS * 4,
            "only {kills} of {round} runs could be interrupted; history:\n  {}",
            log.join("\n  ")
        );
        let mut at = schedule[round % schedule.len()];
        if let KillAt::Failpoint(point, _) = at
            && round >= schedule.len()
        {
            // Later rounds vary the batch number.
            at = KillAt::Failpoint(point, tree.rng.range(1, 3) as u32);
        }
        if let KillAt::Delay(_) = at {
            let max_ms = last_run.as_millis().max(20) as usize;
            at = KillAt::Delay(Duration::from_millis(tree.rng.below(max_ms) as u64));
        }
        if round > 0 {
            let what = tree.mutate();
            log.push(format!("round {round}: mutate ({what})"));
        }
        round += 1;

        let mut fi = tree.ws.fi().args(["index", "--json"]);
        if let KillAt::Failpoint(point, nth) = at {
            fi = fi.env("FRESHINDEX_FAILPOINT", format!("{point}:{nth}"));
        }
        let started = Instant::now();
        let mut child = fi.spawn();
        let killed = match at {
            KillAt::Failpoint(point, _) => {
                if child.wait_stderr(&format!("failpoint {point} reached"), TIMEOUT) {
                    child.kill()
                } else {
                    // Fewer batches than `nth`: the run completed normally.
                    let out = child.wait(TIMEOUT).ok();
                    assert!(
                        out.summary().errors().is_empty(),
                        "run without kill reported errors: {}",
                        out.stdout
                    );
                    false
                }
            }
            KillAt::Delay(d) => {
                thread::sleep(d);
                child.kill()
            }
        };
        if killed {
            kills += 1;
            since_verify += 1;
            log.push(format!("  killed at {at:?} (kill #{kills})"));
        } else {
            log.push(format!("  {at:?}: the run finished before the kill"));
            last_run = started.elapsed();
        }

        if since_verify >= VERIFY_EVERY {
            last_run = tree.verify(&log);
            log.push("  completed run verified against from-scratch index".into());
            since_verify = 0;
        }
    }
    assert!(kills >= MIN_KILLS);

    // Mandatory final check after one more mutation and a completed run...
    let what = tree.mutate();
    log.push(format!("final: mutate ({what})"));
    tree.verify(&log);

    // ...and the recovered state must be a true fixpoint: nothing left to do.
    let export = tree.ws.export();
    let again = tree.ws.index();
    assert_eq!(again.n("embeddings.computed"), 0, "{}", again.0);
    for counter in ["rows.added", "rows.updated", "rows.deleted"] {
        assert_eq!(again.n(counter), 0, "{counter}: {}", again.0);
    }
    assert_eq!(
        again.n("items.unchanged"),
        again.n("items.seen"),
        "{}",
        again.0
    );
    assert_eq!(tree.ws.export(), export, "no-op run changed the export");
    println!("{}", log.join("\n"));
}

/// A run killed while it deletes the rows of a vanished file, after the target write: when the
/// file comes back exactly as it was (same size and mtime — `mv` keeps them), the next run
/// still restores its rows, although the scan's metadata says nothing changed.
#[test]
fn a_deletion_cut_short_is_finished_when_the_file_returns_unchanged() {
    let ws = Workspace::new(FlowConfig::default());
    for i in 0..3 {
        ws.write(
            format!("d{i}.md"),
            format!("# Doc {i}\n\nDocument {i} talks about topic {i} in plain words.\n"),
        );
    }
    // Old enough that size and mtime are trusted.
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    for i in 0..3 {
        let f = fs::File::options()
            .write(true)
            .open(ws.src().join(format!("d{i}.md")))
            .expect("open");
        f.set_modified(old).expect("set mtime");
    }
    let first = ws.index();
    assert_eq!(first.n("items.new"), 3, "{}", first.0);
    let full = ws.export();

    let aside = ws.root().join("d1.aside");
    fs::rename(ws.src().join("d1.md"), &aside).expect("move out");
    let mut child = ws
        .fi()
        .args(["index", "--json"])
        .env("FRESHINDEX_FAILPOINT", "target-written:1")
        .spawn();
    assert!(
        child.wait_stderr("failpoint target-written reached", TIMEOUT),
        "the deletion never reached its target write"
    );
    assert!(child.kill(), "the run ended before the kill");
    fs::rename(&aside, ws.src().join("d1.md")).expect("move back");

    let after = ws.index();
    assert!(after.errors().is_empty(), "{}", after.0);
    assert_eq!(
        ws.export(),
        full,
        "the returned file's rows were not restored"
    );
    assert_eq!(ws.export(), ws.fresh_export());
}
