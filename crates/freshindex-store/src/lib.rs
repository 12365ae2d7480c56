//! The state store: everything freshindex remembers between runs, behind traits.
//!
//! - [`FlowStore`]: registered flows and their specs.
//! - [`ItemStore`]: per source item state (status, metadata, content hash, spec fingerprint).
//! - [`LineageStore`]: which target rows each item produced, the two-phase "pending" keys, and
//!   the atomic batch commit that moves both forward together with the memo cache.
//! - [`MemoStore`]: the content-addressed memo cache of expensive step results, with garbage
//!   collection of entries no tracked row uses.
//! - [`RunStore`]: run summaries.
//!
//! [`SqliteStore`] is the embedded backend (one file, no threads of its own; calls are
//! serialized by a mutex). Nothing above this crate sees SQL: a PostgreSQL backend implements
//! the same traits.

mod sqlite;
mod types;

pub use sqlite::SqliteStore;
pub use types::*;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, corruption, locking).
    #[error("state store: {0}")]
    Backend(String),
    /// The stored schema is newer than this program understands.
    #[error(
        "state store schema version {found} is newer than this program supports ({supported}); upgrade freshindex"
    )]
    SchemaTooNew {
        /// Version found in the store.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// Stored data could not be decoded.
    #[error("state store holds invalid data: {0}")]
    Corrupt(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Registered flows.
pub trait FlowStore {
    /// Registers a flow or updates its stored spec; returns its id.
    fn register_flow(&self, name: &str, spec_json: &str) -> Result<FlowId>;
    /// A registered flow by name.
    fn flow(&self, name: &str) -> Result<Option<FlowRecord>>;
    /// Every registered flow, by name.
    fn flows(&self) -> Result<Vec<FlowRecord>>;
}

/// Per-item state.
pub trait ItemStore {
    /// Every item of a flow, sorted by key, with a flag for items that have pending row keys.
    fn items(&self, flow: FlowId) -> Result<Vec<ItemRecord>>;
    /// Item counts by status.
    fn item_counts(&self, flow: FlowId) -> Result<Vec<(ItemStatus, u64)>>;
}

/// Lineage and the two-phase commit of target mutations.
pub trait LineageStore {
    /// Tracked rows and pending keys of the given items.
    fn lineage(
        &self,
        flow: FlowId,
        items: &[&str],
    ) -> Result<std::collections::HashMap<String, ItemLineage>>;
    /// Phase one: durably records row keys that a target write is about to touch, per item.
    fn record_pending(&self, flow: FlowId, pending: &[(String, Vec<String>)]) -> Result<()>;
    /// Phase two, after the target write: in one transaction, stores the items' new state and
    /// tracked rows, clears their pending keys, adds new memo entries and queues the memo keys
    /// the old rows used as garbage-collection candidates. An item committed with
    /// `rows: None` keeps its tracked rows and its pending keys.
    fn commit(&self, flow: FlowId, batch: BatchCommit) -> Result<()>;
    /// Number of tracked rows of a flow.
    fn tracked_count(&self, flow: FlowId) -> Result<u64>;
}

/// The memo cache.
pub trait MemoStore {
    /// Cached values for the keys that have one.
    fn memo_get(
        &self,
        flow: FlowId,
        keys: &[Fingerprint],
    ) -> Result<std::collections::HashMap<Fingerprint, Vec<u8>>>;
    /// Removes candidate entries that no tracked row uses; returns how many were removed.
    fn memo_gc(&self, flow: FlowId) -> Result<u64>;
    /// Entry count and total value bytes.
    fn memo_stats(&self, flow: FlowId) -> Result<(u64, u64)>;
}

/// Run history.
pub trait RunStore {
    /// Stores a finished run's summary (JSON); keeps the last [`RUNS_KEPT`] per flow.
    fn record_run(&self, flow: FlowId, status: &str, summary_json: &str) -> Result<()>;
    /// The last run's summary (JSON).
    fn last_run(&self, flow: FlowId) -> Result<Option<String>>;
}

/// Runs kept per flow.
pub const RUNS_KEPT: u32 = 50;

/// Everything the engine needs from a state store.
pub trait StateStore:
    FlowStore + ItemStore + LineageStore + MemoStore + RunStore + Send + Sync
{
}

impl<T: FlowStore + ItemStore + LineageStore + MemoStore + RunStore + Send + Sync> StateStore
    for T
{
}
