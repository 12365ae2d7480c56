//! The incremental engine: sources, steps, memoization, lineage diff and the two-phase write
//! of target mutations.
//!
//! A run ([`Engine::run`]) is synchronous and single-threaded on the caller's thread: scan the
//! source (walk + stat), classify items against the state store by metadata, then process the
//! candidates in batches — read, fingerprint, parse, split, embed through the memo cache, diff
//! against the item's lineage, and write the minimal mutations with the two-phase protocol
//! (record pending keys → write the target → commit lineage, item state and cache together).
//! The machine this targets gains little from a second core, so the run keeps one thread busy
//! instead of paying for coordination.

pub mod failpoint;
pub mod plan;
pub mod run;
pub mod source;
pub mod steps;
pub mod summary;

pub use run::{Engine, Phase, Progress, RunOptions};
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
    Target(#[from] freshindex_vector::VectorError),
    /// No such flow in the state.
    #[error("{0}")]
    NotFound(String),
}

impl EngineError {
    /// Whether the user can fix it (config, paths) rather than the system (storage).
    pub fn is_user_error(&self) -> bool {
        match self {
            EngineError::Config(_) | EngineError::Source(_) | EngineError::NotFound(_) => true,
            EngineError::Store(_) | EngineError::Target(_) => false,
        }
    }
}
