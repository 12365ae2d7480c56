//! A flow's execution history as readers see it, and resets: forgetting a flow's state (or
//! some items' state) so that the next run reprocesses it.
//!
//! Runs record themselves ([`Engine::run`]); a reset is recorded the same way — an
//! `inProgress` entry with trigger `reset` when it starts, status `reset` when it is done —
//! so that a reset cut short by a crash shows up as interrupted.

use serde::{Deserialize, Serialize};

use freshindex_core::{RunState, Trigger};
use freshindex_store::{RunRecord, StoreError};

use crate::run::now_ms;
use crate::summary::{EmbedCounts, ItemCounts, ItemError, ItemWarning, RowCounts, RunSummary};
use crate::{Engine, EngineError};

/// Item counters of a history entry: the run summary's, and how many had work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryItems {
    /// Items the run had work for ([`ItemCounts::processed`]).
    pub processed: u64,
    /// The run's item counters (`failed` among them).
    #[serde(flatten)]
    pub counts: ItemCounts,
}

/// One entry of a flow's execution history, as `freshindex history --json` prints it.
///
/// The counters, errors and warnings come from the run's summary: they are `null` (and the
/// lists empty) for an entry without one — a run in progress, a run that could not run or was
/// interrupted (`message` says why), a reset or a skipped occurrence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    /// Entry id, increasing in recording order.
    pub id: i64,
    /// Flow name.
    pub flow: String,
    /// How it was started.
    pub trigger: Trigger,
    /// Where it stands.
    pub status: RunState,
    /// Start (ms since the epoch).
    pub started_at_ms: i64,
    /// End; `null` while in progress.
    pub finished_at_ms: Option<i64>,
    /// `finished_at_ms - started_at_ms`; `null` while in progress.
    pub duration_ms: Option<u64>,
    /// Item counters.
    pub items: Option<HistoryItems>,
    /// Row counters.
    pub rows: Option<RowCounts>,
    /// Embedding counters.
    pub embeddings: Option<EmbedCounts>,
    /// Item errors (capped as in the run summary).
    pub errors: Vec<ItemError>,
    /// Item warnings (capped as in the run summary).
    pub warnings: Vec<ItemWarning>,
    /// Why the run could not run or was interrupted; what a reset did.
    pub message: Option<String>,
}

impl RunEntry {
    fn from_record(flow: &str, r: RunRecord) -> Result<RunEntry, EngineError> {
        let summary: Option<RunSummary> = match &r.summary_json {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                StoreError::Corrupt(format!("summary of run {} of `{flow}`: {e}", r.id.0))
            })?),
            None => None,
        };
        let (items, rows, embeddings, errors, warnings) = match summary {
            Some(s) => (
                Some(HistoryItems {
                    processed: s.items.processed(),
                    counts: s.items,
                }),
                Some(s.rows),
                Some(s.embeddings),
                s.errors,
                s.warnings,
            ),
            None => (None, None, None, Vec::new(), Vec::new()),
        };
        Ok(RunEntry {
            id: r.id.0,
            flow: flow.to_string(),
            trigger: r.trigger,
            status: r.status,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            duration_ms: r
                .finished_at_ms
                .map(|f| f.saturating_sub(r.started_at_ms).max(0) as u64),
            items,
            rows,
            embeddings,
            errors,
            warnings,
            message: r.message,
        })
    }
}

/// What a reset of a flow did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReport {
    /// Flow name.
    pub flow: String,
    /// Items forgotten (queue entries, and items known only from an interrupted first write).
    pub items: u64,
    /// Rows deleted from the target (the rows the lineage tracked).
    pub rows_deleted: u64,
    /// Memo-cache entries dropped (`--drop-cache`), or kept for the next run to reuse.
    pub cache_entries: u64,
    /// Whether the memo cache was dropped.
    pub cache_dropped: bool,
}

/// What a reset of chosen items did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetItemsReport {
    /// Flow name.
    pub flow: String,
    /// Items the next run reprocesses, in the order given.
    pub reset: Vec<String>,
    /// Keys the flow's queue does not hold (nothing was done for them).
    pub unknown: Vec<String>,
}

impl Engine {
    /// The newest `limit` entries of a flow's execution history, newest first.
    pub fn history(&self, flow: &str, limit: usize) -> Result<Vec<RunEntry>, EngineError> {
        let (id, spec) = self.flow(flow)?;
        self.store()
            .runs(id, limit)?
            .into_iter()
            .map(|r| RunEntry::from_record(&spec.name, r))
            .collect()
    }

    /// Forgets everything the flow derived, so that its next run reprocesses every item:
    /// deletes from its collection every row its lineage tracks (crash-safely: each item is
    /// forgotten only after its rows are deleted), then its queue entries, lineage, pending
    /// keys, tombstones and traversal label. The memo cache is kept — the next run reuses
    /// every embedding, and the cache entries it does not use again are collected at its end
    /// as usual — unless `drop_cache`. Takes the flow's run lock (refused with
    /// [`EngineError::Busy`] while a run holds it) and records a `reset` history entry.
    pub fn reset(&self, flow: &str, drop_cache: bool) -> Result<ResetReport, EngineError> {
        // A name no flow has names no lock file either.
        self.flow(flow)?;
        let _lock = self.lock(flow)?;
        let (id, spec) = self.flow(flow)?;
        let run = self.begin_run(id, Trigger::Reset, now_ms())?;
        let result = (|| {
            // No write of this process (the queue API) may interleave with the reset.
            let _writer = self.writer();
            let (cache_entries, _) = self.store().memo_stats(id)?;
            // Inputs and documents first (see `reset_inputs` for why that order is safe).
            self.reset_inputs(id)?;
            let (items, rows_deleted) = self.leave_target(id, &spec.target)?;
            self.store().reset_flow(id, drop_cache)?;
            Ok(ResetReport {
                flow: spec.name.clone(),
                items,
                rows_deleted,
                cache_entries,
                cache_dropped: drop_cache,
            })
        })();
        match result {
            Ok(report) => {
                let note = format!(
                    "forgot {} item(s), deleted {} row(s); embedding cache {} ({} entries)",
                    report.items,
                    report.rows_deleted,
                    if drop_cache { "dropped" } else { "kept" },
                    report.cache_entries
                );
                self.finish_run(run, RunState::Reset, None, Some(note))?;
                Ok(report)
            }
            Err(e) => {
                self.finish_failed_run(run, &e);
                Err(e)
            }
        }
    }

    /// Makes the next run reprocess exactly the items `keys` (item keys as the queue lists
    /// them): their queue entries become `MODIFIED` with their content hash and version
    /// forgotten ([`ItemStore::requeue_items`](freshindex_store::ItemStore::requeue_items)),
    /// so that even an unchanged file is read, split and embedded again (through the memo
    /// cache); rows whose content comes out the same are not rewritten. Keys the queue does
    /// not hold are reported back, not refused. Takes the flow's run lock (refused
    /// with [`EngineError::Busy`] while a run holds it) and records a `reset` history entry.
    pub fn reset_items(
        &self,
        flow: &str,
        keys: &[String],
    ) -> Result<ResetItemsReport, EngineError> {
        if keys.is_empty() {
            return Err(EngineError::Invalid(
                "items: name at least one item key to reset".into(),
            ));
        }
        let mut unique: Vec<String> = Vec::with_capacity(keys.len());
        for k in keys {
            if !unique.contains(k) {
                unique.push(k.clone());
            }
        }
        // A name no flow has names no lock file either.
        self.flow(flow)?;
        let _lock = self.lock(flow)?;
        let (id, spec) = self.flow(flow)?;
        let run = self.begin_run(id, Trigger::Reset, now_ms())?;
        let result = (|| {
            let _writer = self.writer();
            let unknown = self.store().requeue_items(id, &unique, None, now_ms())?;
            let reset = unique
                .iter()
                .filter(|k| !unknown.contains(k))
                .cloned()
                .collect();
            Ok::<_, EngineError>(ResetItemsReport {
                flow: spec.name.clone(),
                reset,
                unknown,
            })
        })();
        match result {
            Ok(report) => {
                let mut note = format!(
                    "reset {} item(s): {}",
                    report.reset.len(),
                    listed(&report.reset)
                );
                if !report.unknown.is_empty() {
                    note.push_str(&format!("; not in the queue: {}", listed(&report.unknown)));
                }
                self.finish_run(run, RunState::Reset, None, Some(note))?;
                Ok(report)
            }
            Err(e) => {
                self.finish_failed_run(run, &e);
                Err(e)
            }
        }
    }
}

/// Keys for a history note: the first ten, then how many more.
fn listed(keys: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut out = keys
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        out.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    out
}
