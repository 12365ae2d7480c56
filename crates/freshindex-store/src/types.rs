//! Records exchanged with the state store.

pub use freshindex_core::{Fingerprint, ItemStatus, RunState, Trigger};

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

/// What the store remembers of one source item: its indexing-queue entry.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemRecord {
    /// Item key (relative path for files, the connector's item name for pushed items).
    pub key: String,
    /// Queue status.
    pub status: ItemStatus,
    /// Latest known content hash (from a push with hashes, or from the last index).
    pub content_hash: Option<String>,
    /// Latest known metadata hash.
    pub metadata_hash: Option<String>,
    /// Queue label.
    pub queue: String,
    /// When the entry entered its current status (ms since the epoch): within a status the
    /// entry that waited longest is polled first.
    pub enqueued_at_ms: i64,
    /// End of the current lease, if the entry was polled; a time in the past is an expired
    /// lease (the entry is pollable again).
    pub leased_until_ms: Option<i64>,
    /// Who holds or last held the lease.
    pub lease_owner: Option<String>,
    /// Polls since the entry was last indexed successfully.
    pub attempts: u32,
    /// Not offered by poll before this time (retry backoff).
    pub available_at_ms: i64,
    /// Last error or warning.
    pub message: Option<String>,
    /// Version of the last index (opaque bytes, compared lexicographically).
    pub version: Option<Vec<u8>>,
    /// A push reported a change while the entry was leased: the index that ends the lease
    /// leaves it `MODIFIED` (the indexed content predates the change) unless it carries the
    /// pushed content hash.
    pub repushed: bool,
    /// Row keys were recorded as pending and never committed (a crash happened mid-write).
    pub has_pending: bool,
}

impl ItemRecord {
    /// A fresh entry in `status`, with nothing known yet.
    pub fn new(key: &str, status: ItemStatus) -> ItemRecord {
        ItemRecord {
            key: key.to_string(),
            status,
            content_hash: None,
            metadata_hash: None,
            queue: freshindex_core::queue::DEFAULT_QUEUE.to_string(),
            enqueued_at_ms: 0,
            leased_until_ms: None,
            lease_owner: None,
            attempts: 0,
            available_at_ms: 0,
            message: None,
            version: None,
            repushed: false,
            has_pending: false,
        }
    }

    /// Whether a live lease holds the entry at `now_ms`.
    pub fn is_leased(&self, now_ms: i64) -> bool {
        self.leased_until_ms.is_some_and(|t| t > now_ms)
    }
}

/// A queue entry with its payload.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry {
    /// The entry.
    pub item: ItemRecord,
    /// The opaque payload of the last push that carried one.
    pub payload: Option<Vec<u8>>,
}

/// What a push says about an item: a type, or hashes the queue compares with the stored ones.
#[derive(Clone, Debug, PartialEq)]
pub enum PushKind {
    /// An explicit type.
    Type(freshindex_core::PushType),
    /// Hashes: unknown item → `NEW_ITEM`; an accepted item whose given hashes all equal the
    /// stored ones stays accepted; any difference → `MODIFIED`.
    Hashes {
        /// Content hash.
        content: Option<String>,
        /// Metadata hash.
        metadata: Option<String>,
    },
}

/// One item of a push.
#[derive(Clone, Debug, PartialEq)]
pub struct PushItem {
    /// Item key.
    pub key: String,
    /// Type or hashes.
    pub kind: PushKind,
    /// Opaque payload, stored when given (at most
    /// [`MAX_PAYLOAD_BYTES`](freshindex_core::queue::MAX_PAYLOAD_BYTES)).
    pub payload: Option<Vec<u8>>,
    /// Queue label; [`DEFAULT_QUEUE`](freshindex_core::queue::DEFAULT_QUEUE) when absent.
    pub queue: Option<String>,
}

/// Why a push of one item was refused (the other items of the push still apply).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushRejection {
    /// A type other than `MODIFIED` names an item the queue does not hold.
    #[error("item `{0}` is not in the queue")]
    UnknownItem(String),
    /// `REQUEUE` of an item that no live lease holds.
    #[error("item `{0}` is not reserved; REQUEUE applies only to a polled item whose lease holds")]
    NotReserved(String),
    /// Payload over the limit.
    #[error("item `{key}`: payload of {bytes} bytes is over the limit of {limit}")]
    PayloadTooLarge {
        /// Item key.
        key: String,
        /// Payload size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

/// A poll.
#[derive(Clone, Debug, PartialEq)]
pub struct PollRequest {
    /// Only entries with this label; any label when `None`.
    pub queue: Option<String>,
    /// Most entries to return.
    pub limit: usize,
    /// Statuses to return; empty means `ERROR`, `MODIFIED` and `NEW_ITEM` (`ACCEPTED` entries
    /// are returned only when asked for).
    pub statuses: Vec<ItemStatus>,
    /// Lease holder recorded on the returned entries.
    pub owner: String,
    /// Lease length.
    pub lease_ms: i64,
}

/// A listing of entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListRequest {
    /// Only these statuses (all when empty).
    pub statuses: Vec<ItemStatus>,
    /// Only this label.
    pub queue: Option<String>,
    /// Keys after this one (paging).
    pub after: Option<String>,
    /// Most entries.
    pub limit: usize,
}

/// Why an index or delete of one item may not proceed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The version is not newer than the indexed one.
    #[error(
        "item `{key}`: version is not newer than the indexed version; a newer index already happened"
    )]
    StaleVersion {
        /// Item key.
        key: String,
    },
    /// The caller no longer holds the entry's lease: its lease expired and another poller
    /// took the entry, or an index or unreserve ended the lease.
    #[error("item `{key}`: the caller no longer holds its lease ({})", holder_text(.holder))]
    LeaseLost {
        /// Item key.
        key: String,
        /// Current holder (empty: nobody).
        holder: String,
    },
}

impl FenceError {
    /// The item refused.
    pub fn key(&self) -> &str {
        match self {
            FenceError::StaleVersion { key } | FenceError::LeaseLost { key, .. } => key,
        }
    }
}

fn holder_text(holder: &str) -> String {
    if holder.is_empty() {
        "no lease is held on it now".into()
    } else {
        format!("now held by `{holder}`")
    }
}

/// A fence check before an index or delete.
#[derive(Clone, Debug, PartialEq)]
pub struct FenceCheck {
    /// Item key.
    pub key: String,
    /// The version about to be written, if versioned.
    pub version: Option<Vec<u8>>,
    /// The lease holder the caller is, if it polled the item: then it must still be the
    /// entry's lease holder.
    pub owner: Option<String>,
}

/// Queue depth and leases of a flow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueStats {
    /// Entries by status.
    pub by_status: Vec<(ItemStatus, u64)>,
    /// Entries under a live lease.
    pub leased: u64,
    /// Entries whose lease expired without an index.
    pub expired: u64,
    /// Entries waiting out a retry backoff.
    pub backing_off: u64,
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
    /// The outcome of processing the item — the queue's `index`. `rows: None` leaves its
    /// tracked rows as they are (a failed item keeps the rows of its last good content; an
    /// unchanged item only refreshes its hashes).
    ///
    /// - `ACCEPTED` / `SKIPPED`: the lease ends, attempts reset, the record's hashes, version
    ///   and message are stored — except that an entry re-pushed as changed while it was leased
    ///   stays `MODIFIED` with the pushed hashes, unless the record carries the pushed content
    ///   hash (the indexed content is then the new one).
    /// - `ERROR`: the lease ends, the message is stored and the entry waits out
    ///   [`retry_backoff_ms`](freshindex_core::queue::retry_backoff_ms) of its attempts.
    /// - An existing entry keeps its label and enqueue time (unless its status changes); a new
    ///   one takes the record's label.
    Upsert {
        /// The item state.
        record: ItemRecord,
        /// Its new tracked rows, if they changed.
        rows: Option<Vec<TrackedRow>>,
    },
    /// The item is gone: forget it and its rows. With `if_queue`, an entry relabelled since
    /// the deletion was decided (a traversal saw it again) is kept and marked `MODIFIED`, its
    /// rows gone, so that it is indexed again.
    Delete {
        /// Item key.
        key: String,
        /// Delete only if the entry still carries this label.
        if_queue: Option<String>,
        /// The delete's version. The deleted entry leaves a tombstone with the newest of this
        /// and its indexed version, so that a stale index cannot bring the item back.
        version: Option<Vec<u8>>,
    },
}

impl ItemChange {
    /// The item key.
    pub fn key(&self) -> &str {
        match self {
            ItemChange::Upsert { record, .. } => &record.key,
            ItemChange::Delete { key, .. } => key,
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
    /// The commit's time (ms since the epoch): indexed entries leave their lease and failed
    /// ones wait out a retry backoff from here.
    pub now_ms: i64,
    /// What the batch's items give and read for multi-input flows, committed with them.
    pub inputs: BatchInputs,
}

/// The documents and lookup dependencies of a batch (see [`crate::InputStore`]), written in
/// the batch's commit: a document is never newer than the item state it comes with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchInputs {
    /// Documents, as [`crate::InputStore::put_docs`] takes them.
    pub docs: Vec<crate::DocWrite>,
    /// Dependencies, as [`crate::InputStore::set_deps`] takes them.
    pub deps: Vec<(String, Vec<(FlowId, String)>)>,
}

/// Identifies an entry of the execution history (increasing in the order entries are
/// recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub i64);

/// One entry of a flow's execution history: a run, or an event that is not a run (a skipped
/// occurrence).
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// Entry id.
    pub id: RunId,
    /// The flow.
    pub flow: FlowId,
    /// How it was started.
    pub trigger: Trigger,
    /// Where it stands.
    pub status: RunState,
    /// When it started (ms since the epoch); an event's time.
    pub started_at_ms: i64,
    /// When it ended; `None` while in progress.
    pub finished_at_ms: Option<i64>,
    /// What the run did (the engine's run summary, JSON), when it completed.
    pub summary_json: Option<String>,
    /// Why a run could not run or was interrupted; a note on an event.
    pub message: Option<String>,
}

/// How a run ended (see [`RunStore::finish_run`](crate::RunStore::finish_run)).
#[derive(Clone, Debug, PartialEq)]
pub struct RunEnd {
    /// The final status (anything but [`RunState::InProgress`]).
    pub status: RunState,
    /// What the run did (JSON), when it completed.
    pub summary_json: Option<String>,
    /// Why it could not complete, or a note.
    pub message: Option<String>,
    /// When it ended (ms since the epoch).
    pub finished_at_ms: i64,
}

/// An item's document as its flow last indexed it (see [`crate::InputStore`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDoc {
    /// The item key.
    pub key: String,
    /// The flow's sequence number of the last change.
    pub seq: i64,
    /// Fingerprint of the document (empty for a tombstone).
    pub fp: Vec<u8>,
    /// The document (JSON bytes); `None` for a tombstone.
    pub doc: Option<Vec<u8>>,
}
