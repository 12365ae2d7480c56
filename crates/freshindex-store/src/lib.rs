//! The state store: everything freshindex remembers between runs, behind traits.
//!
//! - [`FlowStore`]: registered flows and their specs.
//! - [`ItemStore`]: per source item state: the indexing queue (seed 001) — status, hashes,
//!   payload, label, lease, attempts, backoff, version.
//! - [`LineageStore`]: which target rows each item produced, the two-phase "pending" keys, and
//!   the atomic batch commit that moves both forward together with the memo cache.
//! - [`MemoStore`]: the content-addressed memo cache of expensive step results, with garbage
//!   collection of entries no tracked row uses.
//! - [`RunStore`]: the execution history: every run (and skipped occurrence) of a flow.
//! - [`IndexRecordStore`]: the index service's records.
//! - [`LockStore`]: named locks held across processes (shared by machines on PostgreSQL).
//!
//! [`SqliteStore`] is the embedded backend (one file, no threads of its own; calls are
//! serialized by a mutex). [`PgStore`] keeps the same state in a PostgreSQL database shared
//! by many processes and machines. Nothing above this crate sees SQL; [`open_store`] opens a
//! store named by a URL.

mod pg;
mod pg_inputs;
mod pg_items;
mod rows;
pub mod rules;
mod sqlite;
mod sqlite_inputs;
mod sqlite_items;
mod types;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use pg::{DEFAULT_RETRY_LIMIT, PgStore};
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
    /// The caller passed a value the store refuses (a bug of the caller).
    #[error("state store: invalid request: {0}")]
    Invalid(String),
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
    /// The label the flow's last completed full traversal pushed with.
    fn traversal_label(&self, flow: FlowId) -> Result<Option<String>>;
    /// Records the label of a completed full traversal (after its `deleteQueueItems`).
    fn set_traversal_label(&self, flow: FlowId, label: &str) -> Result<()>;
    /// The high-water mark of the flow source's recent changes that were processed (opaque:
    /// the source makes and reads it); `None` before the first.
    fn change_mark(&self, flow: FlowId) -> Result<Option<String>>;
    /// Records the mark once the changes up to it are committed (`None` forgets it).
    fn set_change_mark(&self, flow: FlowId, mark: Option<&str>) -> Result<()>;
    /// The last step of a reset of the flow, after the caller deleted every item (and so,
    /// through [`LineageStore::commit`], every tracked row, after deleting those rows from the
    /// target): forgets the tombstones of deleted items (so that re-indexing an item at any
    /// version works again), the traversal label and the change mark, and with `drop_cache` the memo cache
    /// (entries, totals, collection candidates). One transaction. Items, lineage and pending
    /// keys are not touched here: forgetting lineage before its rows leave the target would
    /// orphan them.
    fn reset_flow(&self, flow: FlowId, drop_cache: bool) -> Result<()>;
    /// Forgets the flow altogether, in one transaction: its registration, queue entries,
    /// tombstones, lineage, pending keys, memo cache and history. The caller removes the
    /// flow's target first (rows forgotten here could not be found again). Returns whether
    /// the flow existed; its name is free for a new flow afterwards.
    fn delete_flow(&self, flow: FlowId) -> Result<bool>;
    /// Gives flows new names, in one transaction (names may be swapped between them); each
    /// keeps its id and all its state. Refused when a new name belongs to a flow not renamed.
    fn rename_flows(&self, renames: &[(FlowId, String)]) -> Result<()>;
}

/// Per-item state.
pub trait ItemStore {
    /// Every item of a flow, sorted by key, with a flag for items that have pending row keys.
    /// Items known only from pending keys (a first write cut short) come with an empty label.
    fn items(&self, flow: FlowId) -> Result<Vec<ItemRecord>>;
    /// Item counts by status.
    fn item_counts(&self, flow: FlowId) -> Result<Vec<(ItemStatus, u64)>>;

    /// Pushes items in one transaction; one result per item, in order.
    ///
    /// With hashes: an unknown item becomes `NEW_ITEM`; an `ACCEPTED`/`SKIPPED` entry whose
    /// given hashes all equal the stored ones stays as it is, any difference makes it
    /// `MODIFIED`; `NEW_ITEM`, `MODIFIED` and `ERROR` entries keep their status. Given hashes
    /// are stored. Types: `MODIFIED` (unknown → `NEW_ITEM`, accepted → `MODIFIED`, others keep
    /// their status); `NOT_MODIFIED` → `ACCEPTED` and the lease ends; `REPOSITORY_ERROR` ends
    /// the lease and backs off by the entry's attempts; `REQUEUE` ends a live lease (refused
    /// without one) and makes the entry available now. A type other than `MODIFIED` on an
    /// unknown item is refused. A push with hashes or `MODIFIED` also ends any retry backoff,
    /// and, on a leased entry whose content changed, marks it re-pushed (see
    /// [`ItemChange::Upsert`]). Every accepted push sets the label and, when given, the payload.
    /// A status change sets the enqueue time to `now_ms`.
    fn push(
        &self,
        flow: FlowId,
        items: &[PushItem],
        now_ms: i64,
    ) -> Result<Vec<std::result::Result<ItemStatus, PushRejection>>>;

    /// Returns and leases the highest-priority available entries: status priority
    /// (`ERROR` > `MODIFIED` > `NEW_ITEM` > `ACCEPTED` > `SKIPPED`), then enqueue time, then key.
    /// Available means: in the status filter, carrying the label if one is given, no live
    /// lease, and past its retry backoff. Each returned entry gets a lease until
    /// `now_ms + lease_ms` held by the request's owner, and one more attempt.
    fn poll(&self, flow: FlowId, req: &PollRequest, now_ms: i64) -> Result<Vec<QueueEntry>>;

    /// Extends every live lease `owner` holds on the flow to `until_ms` (a heartbeat); returns
    /// how many. Expired leases are not revived.
    fn heartbeat(&self, flow: FlowId, owner: &str, until_ms: i64, now_ms: i64) -> Result<u64>;

    /// Ends the leases on the flow's entries, only those with the label and only those held by
    /// the owner when given; returns how many live leases ended.
    fn unreserve(
        &self,
        flow: FlowId,
        queue: Option<&str>,
        owner: Option<&str>,
        now_ms: i64,
    ) -> Result<u64>;

    /// One entry with its payload.
    fn get(&self, flow: FlowId, key: &str) -> Result<Option<QueueEntry>>;

    /// Entries in key order, with payloads.
    fn list(&self, flow: FlowId, req: &ListRequest) -> Result<Vec<QueueEntry>>;

    /// The bulk form of a full traversal's pushes: every entry of the flow takes the label
    /// `label` — as a push with unchanged hashes would do (status kept, retry backoff ended) —
    /// except the entries in `unseen`, which take `unseen_label`, so that
    /// `deleteQueueItems(unseen_label)` removes them. One transaction. A traversal pushes the
    /// items whose hashes changed after this. Returns how many entries changed.
    fn relabel_all(
        &self,
        flow: FlowId,
        label: &str,
        unseen: &[String],
        unseen_label: &str,
        now_ms: i64,
    ) -> Result<u64>;

    /// Keys of the entries that carry the label, sorted.
    fn queue_keys(&self, flow: FlowId, queue: &str) -> Result<Vec<String>>;

    /// Checks, before a target write, that an index or delete of each item may proceed: the
    /// version (if any) is newer than the indexed one, and a caller that names itself as a lease
    /// holder still is the entry's holder (its lease may have run out, but nobody polled,
    /// indexed or unreserved the entry since). One answer per check, in order.
    fn fence(
        &self,
        flow: FlowId,
        checks: &[FenceCheck],
        now_ms: i64,
    ) -> Result<Vec<std::result::Result<(), FenceError>>>;

    /// Queue depth by status and lease counts.
    fn queue_stats(&self, flow: FlowId, now_ms: i64) -> Result<QueueStats>;

    /// A reset of chosen items: each entry of `keys` is to be processed again from scratch
    /// ([`rules::requeue`]) — it becomes `MODIFIED` (a `NEW_ITEM` stays new) and forgets its
    /// content hash and indexed version; its retry backoff ends and its attempts restart. Its
    /// label, metadata hash, payload and rows stay, so a full traversal that finds the same
    /// metadata still polls it (it has work) and looking at it finds no content hash to
    /// match: the next run reads and reprocesses exactly these items. An entry under a live
    /// lease is marked re-pushed (the index that ends the lease leaves it `MODIFIED`). One
    /// transaction; the enqueue time of a changed status is `now_ms`. Returns the keys the
    /// queue does not hold, in the order given (not an error).
    /// `reason`, when given, becomes the entry's message.
    fn requeue_items(
        &self,
        flow: FlowId,
        keys: &[String],
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>>;
}

/// Lineage and the two-phase commit of target mutations.
pub trait LineageStore {
    /// Tracked rows and pending keys of the given items.
    fn lineage(
        &self,
        flow: FlowId,
        items: &[&str],
    ) -> Result<std::collections::HashMap<String, ItemLineage>>;
    /// Phase one: durably records row keys that a target write is about to touch, per item, and
    /// makes accepted entries among them `MODIFIED` (an interrupted write leaves them pollable).
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

/// The execution history (seed 004): one entry per run of a flow — scheduled, manual, live,
/// reset — and per skipped occurrence, newest kept.
///
/// A run is recorded when it starts ([`begin_run`](RunStore::begin_run), `inProgress`) and
/// again when it ends ([`finish_run`](RunStore::finish_run)). An entry left `inProgress` by a
/// process that died stays so until the next process that runs the flow marks it
/// interrupted ([`interrupt_runs`](RunStore::interrupt_runs)). Every write keeps the newest
/// [`RUNS_KEPT`] entries of the flow and deletes older ones — except entries still
/// `inProgress`, which are never deleted.
pub trait RunStore {
    /// Records that a run of `flow` started: a new `inProgress` entry.
    fn begin_run(&self, flow: FlowId, trigger: Trigger, started_at_ms: i64) -> Result<RunId>;
    /// Records how the run `run` ended. Refuses ([`StoreError::Invalid`]) a status that is not
    /// final. Returns `false` when the history holds no such entry.
    fn finish_run(&self, run: RunId, end: &RunEnd) -> Result<bool>;
    /// Records an entry that is no run and is final when recorded (a skipped occurrence, with
    /// why in `message`). Refuses `inProgress` ([`StoreError::Invalid`]).
    fn record_run_event(
        &self,
        flow: FlowId,
        trigger: Trigger,
        status: RunState,
        at_ms: i64,
        message: Option<&str>,
    ) -> Result<RunId>;
    /// The flow's newest `limit` entries, newest (last recorded) first.
    fn runs(&self, flow: FlowId, limit: usize) -> Result<Vec<RunRecord>>;
    /// The summary (JSON) of the flow's last run that completed (the newest entry with one).
    fn last_run(&self, flow: FlowId) -> Result<Option<String>>;
    /// Marks the entries of `flow` (of every flow when `None`) still `inProgress` as
    /// `transientFailure`, finished at `at_ms`, with `message`; returns how many. For runs
    /// left so by a process that died: call it only where no live process can be running
    /// them (the engine calls it for a flow once it holds the flow's run lock).
    fn interrupt_runs(&self, flow: Option<FlowId>, at_ms: i64, message: &str) -> Result<u64>;
}

/// The index service's records, kept as JSON documents by kind and id. The service holds its
/// state in memory and writes every record it changes through to here, so that a restarted
/// service resumes its builds with the same ids.
pub trait IndexRecordStore {
    /// Writes (inserts or replaces) `records` — `(kind, id, JSON)` — in one transaction.
    fn put_index_records(&self, records: &[(&str, u64, String)]) -> Result<()>;
    /// Every record of `kind`, by id.
    fn index_records(&self, kind: &str) -> Result<Vec<(u64, String)>>;
    /// Deletes records of `kind` by id.
    fn delete_index_records(&self, kind: &str, ids: &[u64]) -> Result<()>;
}

/// Named locks held across processes through the store: how processes that share a store on
/// several machines keep "a flow never runs twice at once" and elect one scheduler.
pub trait LockStore {
    /// Whether the store's locks are shared by processes on other machines (PostgreSQL);
    /// when false the engine uses its data directory's lock files instead.
    fn has_shared_locks(&self) -> bool {
        false
    }
    /// Takes the named lock when it is free: `Ok(Some(lock))`, held until the [`StoreLock`]
    /// is dropped or the session holding it is lost; `Ok(None)` when another holder has it.
    fn try_lock(&self, name: &str) -> Result<Option<StoreLock>>;
}

/// What holds a lock of a [`LockStore`] (a database session, for PostgreSQL).
pub trait HeldLock: Send + Sync {
    /// Whether the lock is still held: false once the session holding it was lost (the
    /// database restarted, the network failed), after which another process may take it.
    fn is_held(&self) -> bool;
}

/// A lock taken from a [`LockStore`]; dropping it releases the lock.
pub struct StoreLock(Box<dyn HeldLock>);

impl StoreLock {
    /// Wraps what holds the lock.
    pub fn new(held: Box<dyn HeldLock>) -> StoreLock {
        StoreLock(held)
    }

    /// Whether the lock is still held (see [`HeldLock::is_held`]).
    pub fn is_held(&self) -> bool {
        self.0.is_held()
    }
}

impl std::fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLock").finish_non_exhaustive()
    }
}

/// Runs kept per flow.
pub const RUNS_KEPT: u32 = 50;

/// A document write of [`InputStore::put_docs`]: the item key, and `Some((fingerprint,
/// bytes))` or `None` (the item has no document).
pub type DocWrite = (String, Option<(Vec<u8>, Vec<u8>)>);

/// A membership change of [`InputStore::update_members`]: the member's key, and
/// `Some((group, fingerprint))` or `None` (no longer a member).
pub type MemberChange = (String, Option<(String, Vec<u8>)>);

/// Everything the engine needs from a state store.
/// What multi-input flows keep (see [`InputStore`]'s methods): the fields of the items of
/// flows that other flows read ("documents", with a per-flow sequence number that every
/// change takes), the lookup dependencies of items, the membership of merged and grouped
/// items, and how far each reading flow has followed each input's sequence.
pub trait InputStore {
    /// Whether `flow` keeps the documents of its items.
    fn docs_kept(&self, flow: FlowId) -> Result<bool>;
    /// Starts keeping documents (`true`), or stops: the flow's documents are forgotten, and
    /// the readers' marks on it too (they read it again from the start).
    fn keep_docs(&self, flow: FlowId, on: bool) -> Result<()>;
    /// Writes documents in one transaction: `Some((fingerprint, bytes))` stores an item's
    /// document, `None` records that the item has none (a tombstone, when it had one).
    /// Only a write that changes something (another fingerprint, a tombstone of a live
    /// document) takes the next sequence number.
    fn put_docs(&self, flow: FlowId, docs: &[DocWrite]) -> Result<()>;
    /// The live documents of `keys` (tombstones and unknown keys are left out).
    fn docs(&self, flow: FlowId, keys: &[String]) -> Result<Vec<StoredDoc>>;
    /// Documents and tombstones whose sequence number is greater than `after`, in sequence
    /// order, at most `limit`. Over a shared store the read waits for writes in flight, so
    /// no smaller number can commit after it.
    fn docs_since(&self, flow: FlowId, after: i64, limit: usize) -> Result<Vec<StoredDoc>>;
    /// Replaces the lookup dependencies of items of `flow`: each item's list of (flow, key)
    /// it read. One transaction.
    fn set_deps(&self, flow: FlowId, deps: &[(String, Vec<(FlowId, String)>)]) -> Result<()>;
    /// The items of `flow` that depend on any of `keys` of flow `up`, sorted, once each.
    fn dependents(&self, flow: FlowId, up: FlowId, keys: &[String]) -> Result<Vec<String>>;
    /// The group (and the document fingerprint it was placed with) of each of `keys` of
    /// flow `up` among the members of `flow`'s items.
    fn member_groups(
        &self,
        flow: FlowId,
        up: FlowId,
        keys: &[String],
    ) -> Result<HashMap<String, (String, Vec<u8>)>>;
    /// The members of item `group` of `flow`: (input flow, key), sorted.
    fn group_members(&self, flow: FlowId, group: &str) -> Result<Vec<(FlowId, String)>>;
    /// Applies membership changes of items of flow `up` and moves `flow`'s mark on `up` to
    /// `mark`, in one transaction. `None` removes the member.
    fn update_members(
        &self,
        flow: FlowId,
        up: FlowId,
        changes: &[MemberChange],
        mark: i64,
    ) -> Result<()>;
    /// How far `flow` has followed the documents of `up`; `None` when it never did (a
    /// mark of 0 is a flow that followed `up` while it had no documents).
    fn input_mark(&self, flow: FlowId, up: FlowId) -> Result<Option<i64>>;
    /// Moves `flow`'s mark on `up`.
    fn set_input_mark(&self, flow: FlowId, up: FlowId, mark: i64) -> Result<()>;
    /// Forgets what `flow` read of other flows: its dependencies, members and marks (a
    /// reset: the next run reads its inputs from the start).
    fn forget_inputs(&self, flow: FlowId) -> Result<()>;
}

pub trait StateStore:
    FlowStore
    + ItemStore
    + LineageStore
    + MemoStore
    + RunStore
    + IndexRecordStore
    + LockStore
    + InputStore
    + Send
    + Sync
{
}

impl<
    T: FlowStore
        + ItemStore
        + LineageStore
        + MemoStore
        + RunStore
        + IndexRecordStore
        + LockStore
        + InputStore
        + Send
        + Sync,
> StateStore for T
{
}

/// Opens the store a URL names: `postgres://…` or `postgresql://…` connects a [`PgStore`]
/// (see [`PgStore::connect`]). Any other value is refused with an error naming it: the
/// embedded store is no URL, it is `state.sqlite` in the data directory, which the caller
/// opens itself when no store is named. `data_dir` is the caller's data directory (unused by
/// PostgreSQL; kept so that stores living beside the data can be added).
pub fn open_store(spec: &str, data_dir: &Path) -> Result<Arc<dyn StateStore>> {
    let _ = data_dir;
    let spec = spec.trim();
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        return Ok(Arc::new(PgStore::connect(spec)?));
    }
    let shown = pg::redact_url(spec);
    Err(StoreError::Invalid(format!(
        "state store `{shown}` is not supported: give a PostgreSQL URL \
         (`postgres://user@host:5432/database`), or name no store to use `state.sqlite` in \
         the data directory"
    )))
}
