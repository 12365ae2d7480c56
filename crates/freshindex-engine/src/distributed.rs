//! Many processes, one shared state store (PostgreSQL): what changes when a run's work is
//! shared.
//!
//! Over a store with shared locks ([`LockStore::has_shared_locks`]):
//! - a flow's run lock is the store's lock `flow:NAME`, so a flow never runs twice at once
//!   across machines; the registry lock is the store's `registry`;
//! - every process polls under its own lease holder name (`engine@HOST:PID`), so the fence
//!   tells one process's batches from another's, and a run no longer voids leases it finds
//!   (they may be another process's, alive);
//! - a run (the process that holds the flow's run lock: the scheduler's, or a one-shot
//!   `index`) scans, pushes and deletes as always, processes with its own workers (none, with
//!   `workers = 0`), then **drains**: it waits until no entry of the flow is leased or
//!   available, processing what becomes available, and adds up the counters the helping
//!   processes reported;
//! - **workers** ([`Engine::help_runs`], `serve --role worker`) look for flows with a run in
//!   progress and work on their queues: leased batches, heartbeat, fence, two-phase writes,
//!   the same path as the run's own workers. After each batch a worker reports its counters
//!   for the run (a `run-work` record of the store).
//!
//! What is not shared: a built-in collection lives in one data directory, so only the process
//! that runs the flow writes it — workers help only flows whose target every process reaches
//! (a PostgreSQL table). Item files are read by their path: workers must see the flow's
//! folder at the same path (a shared or replicated file system).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use freshindex_core::{FlowSpec, ItemStatus, RunState, TargetSpec, Trigger};
use freshindex_store::{FlowId, StateStore};
use serde::{Deserialize, Serialize};

use crate::process::Ctx;
use crate::run::{RunOptions, now_ms};
use crate::summary::{EmbedCounts, ItemCounts, ItemError, ItemWarning, RowCounts};
use crate::{Engine, EngineError};

/// The lease holder name of this process over a shared store: `engine@HOST:PID:NONCE`.
pub(crate) fn process_owner() -> String {
    let host = host_name();
    // A nonce besides the pid: containers that share a host name may share pids too.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    format!("engine@{host}:{}:{nonce:08x}", std::process::id())
}

/// This machine's host name (`host` when it cannot be read).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Opens a shared state store from its URL.
pub(crate) fn open_shared_store(url: &str) -> Result<Arc<dyn StateStore>, EngineError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(freshindex_store::PgStore::connect(url)?))
    } else {
        Err(EngineError::Config(format!(
            "store: `{}` is not a state store this program knows; give a postgres:// URL, or nothing for the embedded SQLite store",
            redact(url)
        )))
    }
}

/// A URL with its password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Whether every process sharing the store can write the flow's target (so workers of other
/// processes may help its runs).
pub fn shared_target(spec: &FlowSpec) -> bool {
    !matches!(spec.target, TargetSpec::Collection(_))
}

/// What a worker did for one run of a flow: its counters, cumulative, rewritten after each of
/// its batches. Kept as a record of kind `run-work:FLOW_ID:RUN_ID`, id from the worker's
/// name and its pass; the run adds them up when it ends and deletes them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The worker's lease holder name.
    pub owner: String,
    /// Item counters.
    pub items: ItemCounts,
    /// Row counters.
    pub rows: RowCounts,
    /// Embedding counters.
    pub embeddings: EmbedCounts,
    /// Item errors (capped like a run's).
    pub errors: Vec<ItemError>,
    /// Item warnings (capped).
    pub warnings: Vec<ItemWarning>,
    /// When it was written (ms since the epoch).
    pub updated_ms: i64,
}

fn report_kind(flow: FlowId, run: i64) -> String {
    format!("run-work:{}:{run}", flow.0)
}

/// A stable record id for a worker name (63 bits, so that every backend stores it).
fn owner_id(owner: &str) -> u64 {
    let h = blake3::hash(owner.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b) >> 1
}

/// The flow's run in progress that workers may help, if any: the newest `inProgress` entry of
/// the history the store keeps (skipped occurrences are recorded while a run goes on), unless
/// it is a live batch (live batches list their own files and do not drain).
fn run_in_progress(store: &dyn StateStore, flow: FlowId) -> Result<Option<i64>, EngineError> {
    Ok(store
        .runs(flow, freshindex_store::RUNS_KEPT as usize)?
        .into_iter()
        .find(|r| r.status == RunState::InProgress)
        .filter(|r| r.trigger != Trigger::Live)
        .map(|r| r.id.0))
}

/// Entries of the flow that a poll could take now, and entries under a live lease.
fn queue_work(store: &dyn StateStore, flow: FlowId) -> Result<(u64, u64), EngineError> {
    let stats = store.queue_stats(flow, now_ms())?;
    let work: u64 = stats
        .by_status
        .iter()
        .filter(|(s, _)| {
            matches!(
                s,
                ItemStatus::Error | ItemStatus::Modified | ItemStatus::NewItem
            )
        })
        .map(|(_, n)| n)
        .sum();
    let available = work.saturating_sub(stats.leased + stats.backing_off);
    Ok((available, stats.leased))
}

/// What one pass of [`Engine::help_runs`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HelpReport {
    /// Flows whose runs this pass worked for.
    pub flows: Vec<String>,
    /// Entries processed.
    pub items: u64,
    /// Flows whose batches failed in this pass (logged).
    pub failed: Vec<String>,
}

impl Engine {
    /// Waits, at the end of a run over a shared store, until no entry of the flow is leased
    /// or available (processing what becomes available with the run's own workers, when it
    /// has any: entries of a killed worker come back when their leases expire), then adds
    /// the counters other processes' workers reported for this run to the run's own.
    pub(crate) fn drain_shared(
        &self,
        ctx: &Ctx<'_>,
        files: &HashMap<String, crate::source::files::ScannedFile>,
        opts: &RunOptions<'_>,
    ) -> Result<(), EngineError> {
        let store = self.store().as_ref();
        let flow = ctx.flow;
        let mut quiet_since: Option<std::time::Instant> = None;
        let mut said = false;
        loop {
            if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(EngineError::Cancelled(
                    "stopped before the end: the work not done stays queued for the next run"
                        .into(),
                ));
            }
            let (available, leased) = queue_work(store, flow)?;
            if available == 0 && leased == 0 {
                // A worker writes its counters just after its last commit: a short grace
                // lets the last report land before the run adds them up.
                match quiet_since {
                    Some(t) if t.elapsed() >= std::time::Duration::from_millis(300) => break,
                    Some(_) => {}
                    None => quiet_since = Some(std::time::Instant::now()),
                }
            } else {
                quiet_since = None;
            }
            // Workers of other processes help only flows with a shared target: the run
            // processes the rest itself, whatever its worker count.
            if available > 0 && (opts.workers > 0 || !shared_target(ctx.spec)) {
                self.work(ctx, files, None, opts, None)?;
                continue;
            }
            if available > 0 && !said {
                tracing::info!(
                    flow = ctx.spec.name,
                    available,
                    leased,
                    "waiting for the workers of other processes"
                );
                said = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let Some(run) = run_in_progress(store, flow)? else {
            return Ok(());
        };
        let kind = report_kind(flow, run);
        let reports = store.index_records(&kind)?;
        let mut ids = Vec::with_capacity(reports.len());
        let mut tally = ctx.tally();
        for (id, doc) in reports {
            ids.push(id);
            match serde_json::from_str::<WorkerReport>(&doc) {
                Ok(r) => tally.absorb(&r),
                Err(e) => tracing::warn!("a worker's report of run {run} is unreadable: {e}"),
            }
        }
        drop(tally);
        store.delete_index_records(&kind, &ids)?;
        Ok(())
    }

    /// One pass of a worker process: for every flow with a run in progress (in any process
    /// sharing the store) whose target this process can write and whose queue has entries
    /// available, processes leased batches until none is left — with `opts.workers` threads,
    /// the heartbeat and the fence, exactly as the run's own workers do — and reports its
    /// counters for the run after each batch. Returns what it did; an empty report means
    /// there was nothing to do (the caller waits a little before the next pass).
    pub fn help_runs(
        &self,
        opts: &RunOptions<'_>,
        stop: &AtomicBool,
    ) -> Result<HelpReport, EngineError> {
        let store = self.store().as_ref();
        let mut report = HelpReport::default();
        if !store.has_shared_locks() {
            return Ok(report);
        }
        for spec in self.stored_flows()? {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if spec.files().is_none() || !shared_target(&spec) {
                continue;
            }
            let Some(rec) = store.flow(&spec.name)? else {
                continue;
            };
            let Some(run) = run_in_progress(store, rec.id)? else {
                continue;
            };
            if queue_work(store, rec.id)?.0 == 0 {
                continue;
            }
            let mut ctx = match self.ctx(
                rec.id,
                &spec,
                opts.progress,
                Some(self.run_owner().to_string()),
            ) {
                Ok(ctx) => ctx,
                Err(e) => {
                    tracing::warn!(flow = spec.name, "worker: {e}");
                    report.failed.push(spec.name.clone());
                    continue;
                }
            };
            // Nothing was listed here: polled entries are stat-ed by their keys.
            ctx.stat_unlisted = true;
            let kind = report_kind(rec.id, run);
            // One record per pass: each pass counts from zero in a context of its own.
            static PASS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let pass = PASS.fetch_add(1, Ordering::Relaxed);
            let id = owner_id(&format!("{}#{pass}", self.run_owner()));
            let done = std::sync::atomic::AtomicU64::new(0);
            let write_report = |ctx: &Ctx<'_>| {
                let doc = {
                    let t = ctx.tally();
                    let s = &t.summary;
                    done.store(s.items.processed() + s.items.unchanged, Ordering::Relaxed);
                    WorkerReport {
                        owner: self.run_owner().to_string(),
                        items: s.items.clone(),
                        rows: s.rows.clone(),
                        embeddings: s.embeddings.clone(),
                        errors: s.errors.clone(),
                        warnings: s.warnings.clone(),
                        updated_ms: now_ms(),
                    }
                };
                let put = serde_json::to_string(&doc)
                    .map_err(|e| e.to_string())
                    .and_then(|json| {
                        store
                            .put_index_records(&[(kind.as_str(), id, json)])
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = put {
                    tracing::warn!(flow = ctx.spec.name, "reporting a batch to the run: {e}");
                }
            };
            // Report serially: two threads of this worker rewrite one record.
            let serial = std::sync::Mutex::new(());
            let after = |ctx: &Ctx<'_>| {
                let _one = serial.lock().unwrap_or_else(|p| p.into_inner());
                write_report(ctx);
            };
            let work_opts = RunOptions {
                workers: opts.workers.max(1),
                cancel: Some(stop),
                queue: None,
                ..*opts
            };
            let empty = HashMap::new();
            let result = self.work(&ctx, &empty, None, &work_opts, Some(&after));
            match result {
                Ok(()) | Err(EngineError::Cancelled(_)) => {}
                // One flow that fails here (its target unreachable from this process) does
                // not keep the others from being helped.
                Err(e) => {
                    tracing::warn!(flow = spec.name, "worker: {e}");
                    report.failed.push(spec.name.clone());
                    continue;
                }
            }
            report.items += done.load(Ordering::Relaxed);
            report.flows.push(spec.name.clone());
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn owner_ids_are_stable_and_fit_63_bits() {
        let a = owner_id("engine@a:1");
        assert_eq!(a, owner_id("engine@a:1"));
        assert_ne!(a, owner_id("engine@a:2"));
        assert!(a < (1 << 63));
    }
}
