//! The incremental engine: sources, steps, memoization, lineage diff and the two-phase write
//! of target mutations.
//!
//! A run ([`Engine::run`]) is synchronous for its caller and uses two threads: the caller's
//! thread scans the source (walk + stat) and classifies items against the state store by
//! metadata; then a scoped *preparer* thread reads, fingerprints, parses, splits and embeds
//! (through the memo cache) batch N+1 while the caller's thread, the *writer*, diffs batch N
//! against lineage and writes the minimal mutations with the two-phase protocol (record
//! pending keys → write the target → commit lineage, item state and cache together). A
//! one-slot channel connects them, so CPU work overlaps SQLite writes and memory stays flat.

pub use freshindex_core::failpoint;
pub mod distributed;
pub mod history;
pub mod indexing;
pub(crate) mod inputs;
pub mod items;
pub mod live;
pub mod plan;
pub(crate) mod process;
pub mod reindex;
pub mod run;
pub mod setup;
pub mod source;
pub mod steps;
pub mod summary;

pub use freshindex_core::{RunState, Trigger};
pub use history::{HistoryItems, ResetItemsReport, ResetReport, RunEntry};
pub use items::{DeleteReport, IndexOutcome, IndexRequest};
pub use live::{FullRunReply, LiveControl, LiveEvent, LiveOptions};
pub use reindex::{
    Deployment, FailedItem, ReindexRequest, ReindexTask, RollbackReport, SubTask, TaskPhase,
    TaskRunOptions, TaskStatus,
};
pub use run::{Engine, Phase, Progress, RUN_OWNER, RunOptions, Searched, default_workers};
pub use source::recent::{Change, ChangeKind, ChangePage, RecentChanges};
pub use summary::{Issue, IssueLevel, RunStatus, RunSummary};

/// Errors that stop a run (per-item problems are [`Issue`]s instead).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The flow spec is not usable.
    #[error("config: {0}")]
    Config(String),
    /// The source cannot be scanned at all.
    #[error("source: {0}")]
    Source(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] freshindex_store::StoreError),
    /// The target failed.
    #[error(transparent)]
    Target(freshindex_vector::VectorError),
    /// No such flow in the state.
    #[error("{0}")]
    NotFound(String),
    /// Another run holds the data directory.
    #[error("{0}")]
    Busy(String),
    /// A bug: a worker thread panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request conflicts with the item's state (a stale version, a lease another holder
    /// took, a run of the flow in progress).
    #[error("{0}")]
    Conflict(String),
    /// A request value is invalid (names the field).
    #[error("{0}")]
    Invalid(String),
    /// The run was told to stop (the server is shutting down, a live flow is redefined)
    /// before it finished; what it did is committed, and the next run does the rest.
    #[error("{0}")]
    Cancelled(String),
}

impl From<freshindex_vector::VectorError> for EngineError {
    fn from(e: freshindex_vector::VectorError) -> EngineError {
        match e {
            // Another process writes the collection: the same "wait or go through it" as a
            // flow lock held elsewhere.
            freshindex_vector::VectorError::Locked { .. } => EngineError::Busy(e.to_string()),
            // A table that does not fit the flow: its config, not a passing failure.
            freshindex_vector::VectorError::Postgres { user: true, .. } => {
                EngineError::Config(e.to_string())
            }
            e => EngineError::Target(e),
        }
    }
}

impl EngineError {
    /// Whether the user can fix it (config, paths) rather than the system (storage).
    pub fn is_user_error(&self) -> bool {
        match self {
            EngineError::Config(_)
            | EngineError::Source(_)
            | EngineError::NotFound(_)
            | EngineError::Busy(_)
            | EngineError::Conflict(_)
            | EngineError::Invalid(_) => true,
            EngineError::Store(_)
            | EngineError::Target(_)
            | EngineError::Internal(_)
            | EngineError::Cancelled(_) => false,
        }
    }

    /// The history status of a run that ended with this error: a
    /// [`PersistentFailure`](RunState::PersistentFailure) when the user must fix something
    /// ([`is_user_error`](Self::is_user_error): the flow's config, a missing or unreadable
    /// source folder, a conflict) — running again unchanged fails again — and a
    /// [`TransientFailure`](RunState::TransientFailure) when the system failed (state store or
    /// target I/O, a bug), which the next run may not meet.
    pub fn run_state(&self) -> RunState {
        if self.is_user_error() {
            RunState::PersistentFailure
        } else {
            RunState::TransientFailure
        }
    }
}
