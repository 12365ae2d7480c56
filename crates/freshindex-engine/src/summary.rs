//! The summary of a run, as `freshindex index --json` prints it and the run history stores it.

use freshindex_core::RunState;
use serde::{Deserialize, Serialize};

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Completed within the failed-items limit.
    Success,
    /// Completed, but more items failed than `max_failed_items` allows.
    Failed,
}

impl RunStatus {
    /// The history status of a run that completed so: more failed items than the flow allows
    /// is a [`PersistentFailure`](RunState::PersistentFailure) (the items fail again unless
    /// the source or the flow changes; they are retried first by the next run).
    pub fn run_state(self) -> RunState {
        match self {
            RunStatus::Success => RunState::Success,
            RunStatus::Failed => RunState::PersistentFailure,
        }
    }
}

/// Warning or error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueLevel {
    /// The item was skipped or handled in a degraded way; the run is fine.
    Warning,
    /// The item failed.
    Error,
}

/// A problem with one item.
#[derive(Clone, Debug, PartialEq)]
pub struct Issue {
    /// Item key (or path relative to the source root).
    pub item: String,
    /// What happened.
    pub message: String,
    /// Severity.
    pub level: IssueLevel,
}

impl Issue {
    /// A warning about `item`.
    pub fn warning(item: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            item: item.into(),
            message: message.into(),
            level: IssueLevel::Warning,
        }
    }

    /// An error about `item`.
    pub fn error(item: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            item: item.into(),
            message: message.into(),
            level: IssueLevel::Error,
        }
    }
}

/// Item counters of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemCounts {
    /// Files the scan listed.
    pub seen: u64,
    /// Indexed for the first time.
    pub new: u64,
    /// Content changed (or the flow's steps did) and was indexed again.
    pub modified: u64,
    /// Nothing to do.
    pub unchanged: u64,
    /// Gone from the source; their rows were deleted.
    pub deleted: u64,
    /// Failed; retried on the next run.
    pub failed: u64,
    /// Deliberately not indexed (binary, empty, too large, ...).
    pub skipped: u64,
}

impl ItemCounts {
    /// Items the run had work for: new, modified, deleted, failed and skipped ones — every
    /// item but those found unchanged.
    pub fn processed(&self) -> u64 {
        self.new + self.modified + self.deleted + self.failed + self.skipped
    }
}

/// Row counters of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCounts {
    /// Rows written for the first time.
    pub added: u64,
    /// Rows rewritten because their content changed.
    pub updated: u64,
    /// Rows removed.
    pub deleted: u64,
    /// Rows of processed items left as they were.
    pub unchanged: u64,
    /// Rows in the target after the run.
    pub total: u64,
}

/// Embedding counters of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedCounts {
    /// Vectors computed by the model.
    pub computed: u64,
    /// Vectors taken from the memo cache.
    pub reused: u64,
}

/// An item error in the summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemError {
    /// Item key.
    pub item: String,
    /// Message.
    pub error: String,
}

/// An item warning in the summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemWarning {
    /// Item key.
    pub item: String,
    /// Message.
    pub warning: String,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Flow name.
    pub flow: String,
    /// Outcome.
    pub status: RunStatus,
    /// Item counters.
    pub items: ItemCounts,
    /// Row counters.
    pub rows: RowCounts,
    /// Embedding counters.
    pub embeddings: EmbedCounts,
    /// Wall time.
    pub elapsed_ms: u64,
    /// Item errors (at most [`MAX_LISTED`], then one line saying how many more).
    pub errors: Vec<ItemError>,
    /// Item warnings (same cap).
    pub warnings: Vec<ItemWarning>,
}

/// Issues listed per kind in a summary.
pub const MAX_LISTED: usize = 1000;

impl RunSummary {
    /// Adds issues, keeping the lists capped.
    pub fn push_issues(
        &mut self,
        issues: &[Issue],
        total_errors: &mut u64,
        total_warnings: &mut u64,
    ) {
        for i in issues {
            match i.level {
                IssueLevel::Error => {
                    *total_errors += 1;
                    if self.errors.len() < MAX_LISTED {
                        self.errors.push(ItemError {
                            item: i.item.clone(),
                            error: i.message.clone(),
                        });
                    }
                }
                IssueLevel::Warning => {
                    *total_warnings += 1;
                    if self.warnings.len() < MAX_LISTED {
                        self.warnings.push(ItemWarning {
                            item: i.item.clone(),
                            warning: i.message.clone(),
                        });
                    }
                }
            }
        }
    }
}
