//! Records exchanged with the state store.

pub use freshindex_core::{Fingerprint, ItemStatus};

/// Identifies a registered flow inside one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId(pub i64);

/// A registered flow.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRecord {
    /// Store id.
    pub id: FlowId,
    /// Flow name.
    pub name: String,
    /// The spec the flow last ran with (JSON).
    pub spec_json: String,
}

/// What the store remembers of one source item.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemRecord {
    /// Item key (relative path for files).
    pub key: String,
    /// Current status.
    pub status: ItemStatus,
    /// Size in bytes when last read.
    pub size: u64,
    /// Modification time (ns since the epoch) when last read.
    pub mtime_ns: i64,
    /// The metadata was taken too close to the file's modification time to be trusted: a later
    /// write in the same timestamp tick could leave size and mtime unchanged. The next scan
    /// fingerprints the content instead of trusting the metadata.
    pub racy: bool,
    /// BLAKE3 of the content last processed.
    pub content_hash: Option<Fingerprint>,
    /// Fingerprint of the flow steps the item was processed with.
    pub spec_fp: Option<Fingerprint>,
    /// Last error or warning message.
    pub message: Option<String>,
    /// Row keys were recorded as pending and never committed (a crash happened mid-write).
    pub has_pending: bool,
}

/// One target row an item produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrackedRow {
    /// Row key in the target.
    pub row_key: String,
    /// Fingerprint of the row's full content (vector source, payload).
    pub row_fp: Fingerprint,
    /// The memo-cache entry the row's vector came from.
    pub memo_key: Option<Fingerprint>,
}

/// Lineage of one item.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemLineage {
    /// Committed rows.
    pub tracked: Vec<TrackedRow>,
    /// Keys recorded before a target write that was never committed.
    pub pending: Vec<String>,
}

/// A change to one item, committed after its target write.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemChange {
    /// New state for the item; `rows: None` leaves its tracked rows as they are (a failed item
    /// keeps the rows of its last good content; an unchanged item only refreshes metadata).
    Upsert {
        /// The item state.
        record: ItemRecord,
        /// Its new tracked rows, if they changed.
        rows: Option<Vec<TrackedRow>>,
    },
    /// The item is gone: forget it and its rows.
    Delete {
        /// Item key.
        key: String,
    },
}

impl ItemChange {
    /// The item key.
    pub fn key(&self) -> &str {
        match self {
            ItemChange::Upsert { record, .. } => &record.key,
            ItemChange::Delete { key } => key,
        }
    }
}

/// One atomic commit of a batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchCommit {
    /// Item changes.
    pub items: Vec<ItemChange>,
    /// New memo-cache entries.
    pub memo: Vec<(Fingerprint, Vec<u8>)>,
    /// Memo keys to check at the next garbage collection besides those of removed rows (new
    /// entries whose items failed after all, so that no row may use them).
    pub gc_candidates: Vec<Fingerprint>,
}
