//! The SQLite backend: one file, WAL journal, `synchronous = FULL` so that a commit is on disk
//! before the target write that depends on it (the two-phase protocol needs that order).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::rows::{decode_rows, encode_rows, for_each_memo_key, fp_from};
use crate::{
    BatchCommit, FlowId, FlowRecord, FlowStore, ItemChange, ItemLineage, ItemStatus, LineageStore,
    MemoStore, Result, RunEnd, RunId, RunRecord, RunState, RunStore, StoreError, Trigger,
};
use freshindex_core::{Fingerprint, FpMap};

/// Schema version this build writes.
const SCHEMA_VERSION: i64 = 6;

/// Version 1 kept file metadata per item; version 2 turns items into queue entries. Items
/// become `MODIFIED` (or stay `NEW_ITEM`) under label `B`, so the next run re-reads each once
/// (the memo cache spares every embedding) and its first traversal, labelled `A`, deletes
/// what is gone.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE items RENAME TO items_v1;
ALTER TABLE flows ADD COLUMN traversal_label TEXT;
";
const MIGRATE_1_TO_2_COPY: &str = "
INSERT INTO items (flow_id, key, status, prio, queue, enqueued_at, attempts, available_at,
  message, repushed)
SELECT flow_id, key,
  CASE status WHEN 'NEW_ITEM' THEN 'NEW_ITEM' ELSE 'MODIFIED' END,
  CASE status WHEN 'NEW_ITEM' THEN 2 ELSE 1 END,
  'B', 0, 0, 0, message, 0
FROM items_v1;
DROP TABLE items_v1;
";

/// Version 3 turns the run summaries into the execution history: a trigger, a start, an
/// end that is empty while in progress, the seed's statuses, an optional summary and a
/// message. Kept summaries become finished manual runs (`failed` → `persistentFailure`: too
/// many failed items was the only failure v2 recorded), started `elapsed_ms` before they
/// finished. The index moves to the new table (index names are global: renaming the table
/// keeps its index under the old name).
const MIGRATE_2_TO_3: &str = "
ALTER TABLE runs RENAME TO runs_v2;
DROP INDEX IF EXISTS runs_flow;
";
const MIGRATE_2_TO_3_COPY: &str = "
INSERT INTO runs (id, flow_id, trigger, status, started_at_ms, finished_at_ms, summary_json,
  message)
SELECT id, flow_id, 'manual',
  CASE status WHEN 'success' THEN 'success' ELSE 'persistentFailure' END,
  finished_at_ms - CASE WHEN json_valid(summary_json)
    THEN COALESCE(json_extract(summary_json, '$.elapsed_ms'), 0) ELSE 0 END,
  finished_at_ms, summary_json, NULL
FROM runs_v2;
DROP TABLE runs_v2;
";

/// Version 4 gives each flow the high-water mark of its source's recent changes, and flow
/// ids that are never reused (AUTOINCREMENT): a deleted flow's id cannot be taken by a new
/// flow, so nothing a late writer left under the old id can surface in the new one.
const MIGRATE_3_TO_4: &str = "
ALTER TABLE flows RENAME TO flows_v3;
";
const MIGRATE_3_TO_4_COPY: &str = "
INSERT INTO flows (id, name, spec_json, traversal_label)
SELECT id, name, spec_json, traversal_label FROM flows_v3;
DROP TABLE flows_v3;
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flows (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  spec_json TEXT NOT NULL,
  traversal_label TEXT,
  -- The source's high-water mark of recent changes processed (opaque to the store).
  change_mark TEXT
);
-- The indexing queue: one entry per (flow, item key). `prio` is the status's poll priority;
-- `items_poll` serves polls in order without sorting.
CREATE TABLE IF NOT EXISTS items (
  flow_id INTEGER NOT NULL,
  key TEXT NOT NULL,
  status TEXT NOT NULL,
  prio INTEGER NOT NULL,
  content_hash TEXT,
  metadata_hash TEXT,
  payload BLOB,
  queue TEXT NOT NULL,
  enqueued_at INTEGER NOT NULL,
  leased_until INTEGER,
  lease_owner TEXT,
  attempts INTEGER NOT NULL,
  available_at INTEGER NOT NULL,
  message TEXT,
  version BLOB,
  repushed INTEGER NOT NULL,
  PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_poll ON items (flow_id, prio, enqueued_at, key);
-- The newest version of each deleted versioned item: an index or delete with a version not
-- newer is refused, so a stale connector cannot bring a deleted item back.
CREATE TABLE IF NOT EXISTS tombstones (
  flow_id INTEGER NOT NULL,
  key TEXT NOT NULL,
  version BLOB NOT NULL,
  PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
-- Lineage: the rows each item produced, one record per item (see `encode_rows`). One write per
-- item instead of one per row; garbage collection scans these records instead of keeping an
-- index of memo keys, which every row insert would pay for.
CREATE TABLE IF NOT EXISTS tracked (
  flow_id INTEGER NOT NULL,
  item_key TEXT NOT NULL,
  n_rows INTEGER NOT NULL,
  rows BLOB NOT NULL,
  PRIMARY KEY (flow_id, item_key)
) WITHOUT ROWID;
-- One record per interrupted-write attempt of an item: its row keys as a JSON array. (One
-- row per item instead of one per key: the initial index records a pending set per item.)
CREATE TABLE IF NOT EXISTS pending (
  id INTEGER PRIMARY KEY,
  flow_id INTEGER NOT NULL,
  item_key TEXT NOT NULL,
  row_keys TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_item ON pending (flow_id, item_key);
CREATE TABLE IF NOT EXISTS memo (
  flow_id INTEGER NOT NULL,
  key BLOB NOT NULL,
  value BLOB NOT NULL,
  UNIQUE (flow_id, key)
);
-- Entry count and value bytes of each flow's memo cache, kept with every change so that status
-- does not read the whole cache.
CREATE TABLE IF NOT EXISTS memo_totals (
  flow_id INTEGER PRIMARY KEY,
  entries INTEGER NOT NULL,
  bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS memo_gc (
  flow_id INTEGER NOT NULL,
  key BLOB NOT NULL,
  PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
-- The execution history: one entry per run (or skipped occurrence), ids in recording order.
-- `finished_at_ms` is NULL while the run is in progress; `summary_json` is the engine's run
-- summary of a run that completed; `message` says why a run could not run or was
-- interrupted, or annotates an event.
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY,
  flow_id INTEGER NOT NULL,
  trigger TEXT NOT NULL,
  status TEXT NOT NULL,
  started_at_ms INTEGER NOT NULL,
  finished_at_ms INTEGER,
  summary_json TEXT,
  message TEXT
);
CREATE INDEX IF NOT EXISTS runs_flow ON runs (flow_id, id);
-- The index service's records (builds, indexes, nodes) as JSON documents (schema 5).
CREATE TABLE IF NOT EXISTS index_records (
  kind TEXT NOT NULL,
  id INTEGER NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY (kind, id)
);
-- Multi-input flows (schema 6): documents of items other flows read, with a per-flow
-- sequence number; lookup dependencies; members of merged and grouped items; marks.
CREATE TABLE IF NOT EXISTS docs (
  flow_id INTEGER NOT NULL,
  key TEXT NOT NULL,
  seq INTEGER NOT NULL,
  fp BLOB NOT NULL,
  doc BLOB,
  PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS docs_by_seq ON docs (flow_id, seq);
CREATE TABLE IF NOT EXISTS docs_kept (flow_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS deps (
  flow_id INTEGER NOT NULL,
  key TEXT NOT NULL,
  up_flow INTEGER NOT NULL,
  up_key TEXT NOT NULL,
  PRIMARY KEY (flow_id, key, up_flow, up_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deps_by_input ON deps (up_flow, up_key, flow_id);
CREATE TABLE IF NOT EXISTS members (
  flow_id INTEGER NOT NULL,
  up_flow INTEGER NOT NULL,
  up_key TEXT NOT NULL,
  grp TEXT NOT NULL,
  fp BLOB NOT NULL,
  PRIMARY KEY (flow_id, up_flow, up_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_group ON members (flow_id, grp);
CREATE TABLE IF NOT EXISTS input_marks (
  flow_id INTEGER NOT NULL,
  up_flow INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  PRIMARY KEY (flow_id, up_flow)
);
";

/// The embedded state store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// A second connection for lookups that may run beside a writer on another thread (memo
    /// lookups, loading items): WAL lets it read the last committed state without waiting for
    /// the writer's lock. `None` for in-memory stores, which cannot share data across
    /// connections.
    reader: Option<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

pub(crate) fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn add_memo_totals(
    tx: &rusqlite::Transaction<'_>,
    flow: FlowId,
    entries: i64,
    bytes: i64,
) -> Result<()> {
    if entries == 0 && bytes == 0 {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO memo_totals (flow_id, entries, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (flow_id) DO UPDATE SET entries = entries + excluded.entries,
           bytes = bytes + excluded.bytes",
        params![flow.0, entries, bytes],
    )
    .map_err(backend)?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and migrates its schema.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let mut store = Self::init(conn)?;
        let reader = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        reader
            .busy_timeout(std::time::Duration::from_secs(30))
            .map_err(backend)?;
        reader
            .execute_batch("PRAGMA cache_size = -32768;")
            .map_err(backend)?;
        store.reader = Some(Mutex::new(reader));
        Ok(store)
    }

    /// An in-memory store (tests).
    pub fn open_in_memory() -> Result<SqliteStore> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(conn: Connection) -> Result<SqliteStore> {
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(backend)?;
        conn.execute_batch(
            "PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -65536;",
        )
        .map_err(backend)?;
        let found = schema_version(&conn)?;
        if let Some(v) = found
            && v > SCHEMA_VERSION
        {
            return Err(StoreError::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        // Opening an up-to-date store writes nothing (a no-op run should not pay for fsyncs).
        if found != Some(SCHEMA_VERSION) {
            conn.execute_batch("BEGIN IMMEDIATE").map_err(backend)?;
            // Another process may have migrated while this one waited for the write lock.
            let found = match schema_version(&conn) {
                Ok(v) => v,
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            };
            let migrated = (|| {
                if found == Some(SCHEMA_VERSION) {
                    return conn.execute_batch("COMMIT");
                }
                // Tables whose shape changed are renamed first, the schema creates the new
                // ones, then the old rows are copied over.
                if found == Some(1) {
                    conn.execute_batch(MIGRATE_1_TO_2)?;
                }
                if matches!(found, Some(1 | 2)) {
                    conn.execute_batch(MIGRATE_2_TO_3)?;
                }
                if matches!(found, Some(1..=3)) {
                    conn.execute_batch(MIGRATE_3_TO_4)?;
                }
                // 4 → 5 and 5 → 6 only add tables, which the schema creates.
                conn.execute_batch(SCHEMA)?;
                if found == Some(1) {
                    conn.execute_batch(MIGRATE_1_TO_2_COPY)?;
                }
                if matches!(found, Some(1 | 2)) {
                    conn.execute_batch(MIGRATE_2_TO_3_COPY)?;
                }
                if matches!(found, Some(1..=3)) {
                    conn.execute_batch(MIGRATE_3_TO_4_COPY)?;
                }
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )?;
                conn.execute_batch("COMMIT")
            })();
            if let Err(e) = migrated {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(backend(e));
            }
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: None,
        })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A poisoned lock means a panic mid-call; SQLite rolled back any open transaction when
        // the guard's statement was dropped, so the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reading connection (the main one for in-memory stores).
    pub(crate) fn reader(&self) -> MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => r.lock().unwrap_or_else(|p| p.into_inner()),
            None => self.conn(),
        }
    }
}

/// The schema version the store's file records (`None`: a new file).
fn schema_version(conn: &Connection) -> Result<Option<i64>> {
    let found: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .or_else(|e| match e {
            // A brand-new file has no meta table yet.
            rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => {
                Ok(None)
            }
            other => Err(other),
        })
        .map_err(backend)?;
    found
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| StoreError::Corrupt(format!("schema_version `{v}`")))
        })
        .transpose()
}

impl FlowStore for SqliteStore {
    fn register_flow(&self, name: &str, spec_json: &str) -> Result<FlowId> {
        let conn = self.conn();
        let stored: Option<String> = conn
            .query_row("SELECT spec_json FROM flows WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend)?;
        if stored.as_deref() != Some(spec_json) {
            conn.execute(
                "INSERT INTO flows (name, spec_json) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET spec_json = excluded.spec_json",
                params![name, spec_json],
            )
            .map_err(backend)?;
        }
        conn.query_row("SELECT id FROM flows WHERE name = ?1", [name], |r| {
            r.get(0).map(FlowId)
        })
        .map_err(backend)
    }

    fn rename_flows(&self, renames: &[(FlowId, String)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        // Temporary names first, so that two flows can swap theirs.
        for (id, _) in renames {
            tx.execute(
                "UPDATE flows SET name = '#renaming-' || id WHERE id = ?1",
                [id.0],
            )
            .map_err(backend)?;
        }
        for (id, name) in renames {
            let n = tx
                .execute(
                    "UPDATE flows SET name = ?1 WHERE id = ?2",
                    params![name, id.0],
                )
                .map_err(|e| {
                    StoreError::Invalid(format!("renaming flow {} to `{name}`: {e}", id.0))
                })?;
            if n != 1 {
                return Err(StoreError::Invalid(format!("no flow has id {}", id.0)));
            }
        }
        tx.commit().map_err(backend)
    }

    fn flow(&self, name: &str) -> Result<Option<FlowRecord>> {
        self.conn()
            .query_row(
                "SELECT id, name, spec_json FROM flows WHERE name = ?1",
                [name],
                |r| {
                    Ok(FlowRecord {
                        id: FlowId(r.get(0)?),
                        name: r.get(1)?,
                        spec_json: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
    }

    fn flows(&self) -> Result<Vec<FlowRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, name, spec_json FROM flows ORDER BY name")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(FlowRecord {
                    id: FlowId(r.get(0)?),
                    name: r.get(1)?,
                    spec_json: r.get(2)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<std::result::Result<_, _>>().map_err(backend)
    }

    fn traversal_label(&self, flow: FlowId) -> Result<Option<String>> {
        self.conn()
            .query_row(
                "SELECT traversal_label FROM flows WHERE id = ?1",
                [flow.0],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(backend)
    }

    fn set_traversal_label(&self, flow: FlowId, label: &str) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE flows SET traversal_label = ?2 WHERE id = ?1",
                params![flow.0, label],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn change_mark(&self, flow: FlowId) -> Result<Option<String>> {
        self.conn()
            .query_row(
                "SELECT change_mark FROM flows WHERE id = ?1",
                [flow.0],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(backend)
    }

    fn set_change_mark(&self, flow: FlowId, mark: Option<&str>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE flows SET change_mark = ?2 WHERE id = ?1",
                params![flow.0, mark],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn reset_flow(&self, flow: FlowId, drop_cache: bool) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.execute(
            "UPDATE flows SET traversal_label = NULL, change_mark = NULL WHERE id = ?1",
            [flow.0],
        )
        .map_err(backend)?;
        tx.execute("DELETE FROM tombstones WHERE flow_id = ?1", [flow.0])
            .map_err(backend)?;
        if drop_cache {
            for table in ["memo", "memo_totals", "memo_gc"] {
                tx.execute(&format!("DELETE FROM {table} WHERE flow_id = ?1"), [flow.0])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn delete_flow(&self, flow: FlowId) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        for table in [
            "items",
            "tombstones",
            "tracked",
            "pending",
            "memo",
            "memo_totals",
            "memo_gc",
            "runs",
            "docs",
            "docs_kept",
            "deps",
            "members",
            "input_marks",
        ] {
            tx.execute(&format!("DELETE FROM {table} WHERE flow_id = ?1"), [flow.0])
                .map_err(backend)?;
        }
        let existed = tx
            .execute("DELETE FROM flows WHERE id = ?1", [flow.0])
            .map_err(backend)?
            > 0;
        tx.commit().map_err(backend)?;
        Ok(existed)
    }
}

impl LineageStore for SqliteStore {
    fn lineage(&self, flow: FlowId, items: &[&str]) -> Result<HashMap<String, ItemLineage>> {
        let conn = self.conn();
        let mut tracked = conn
            .prepare_cached("SELECT rows FROM tracked WHERE flow_id = ?1 AND item_key = ?2")
            .map_err(backend)?;
        let mut pending = conn
            .prepare_cached(
                "SELECT row_keys FROM pending WHERE flow_id = ?1 AND item_key = ?2 ORDER BY id",
            )
            .map_err(backend)?;
        let mut out = HashMap::with_capacity(items.len());
        for &item in items {
            let mut lin = ItemLineage::default();
            let blob: Option<Vec<u8>> = tracked
                .query_row(params![flow.0, item], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            if let Some(blob) = blob {
                lin.tracked = decode_rows(&blob)
                    .map_err(|e| StoreError::Corrupt(format!("lineage of item `{item}`: {e}")))?;
            }
            let mut rows = pending.query(params![flow.0, item]).map_err(backend)?;
            while let Some(r) = rows.next().map_err(backend)? {
                let json: String = r.get(0).map_err(backend)?;
                let keys: Vec<String> = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("pending keys of `{item}`: {e}")))?;
                for k in keys {
                    if !lin.pending.contains(&k) {
                        lin.pending.push(k);
                    }
                }
            }
            out.insert(item.to_string(), lin);
        }
        Ok(out)
    }

    fn record_pending(&self, flow: FlowId, pending: &[(String, Vec<String>)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO pending (flow_id, item_key, row_keys) VALUES (?1, ?2, ?3)",
                )
                .map_err(backend)?;
            // An accepted entry whose rows are about to change is no longer settled: if the
            // write is cut short, the entry stays pollable and the next run finishes it, even
            // when the item comes back with the metadata the scan remembers.
            let mut unsettle = tx
                .prepare_cached(
                    "UPDATE items SET status = 'MODIFIED', prio = ?3
                     WHERE flow_id = ?1 AND key = ?2 AND status IN ('ACCEPTED', 'SKIPPED')",
                )
                .map_err(backend)?;
            for (item, keys) in pending {
                let json = serde_json::to_string(keys)
                    .map_err(|e| StoreError::Backend(format!("encoding pending keys: {e}")))?;
                ins.execute(params![flow.0, item, json]).map_err(backend)?;
                unsettle
                    .execute(params![
                        flow.0,
                        item,
                        freshindex_core::queue::priority(ItemStatus::Modified)
                    ])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn commit(&self, flow: FlowId, batch: BatchCommit) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        {
            let mut old_rows = tx
                .prepare_cached("SELECT rows FROM tracked WHERE flow_id = ?1 AND item_key = ?2")
                .map_err(backend)?;
            let mut gc_candidate = tx
                .prepare_cached("INSERT OR IGNORE INTO memo_gc (flow_id, key) VALUES (?1, ?2)")
                .map_err(backend)?;
            let mut del_tracked = tx
                .prepare_cached("DELETE FROM tracked WHERE flow_id = ?1 AND item_key = ?2")
                .map_err(backend)?;
            let mut del_pending = tx
                .prepare_cached("DELETE FROM pending WHERE flow_id = ?1 AND item_key = ?2")
                .map_err(backend)?;
            let mut del_item = tx
                .prepare_cached("DELETE FROM items WHERE flow_id = ?1 AND key = ?2")
                .map_err(backend)?;
            let mut ins_tracked = tx
                .prepare_cached(
                    "INSERT INTO tracked (flow_id, item_key, n_rows, rows) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(backend)?;
            let mut ins_memo = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO memo (flow_id, key, value) VALUES (?1, ?2, ?3)",
                )
                .map_err(backend)?;
            let (mut entries, mut bytes) = (0i64, 0i64);
            for (key, value) in &batch.memo {
                if ins_memo
                    .execute(params![flow.0, &key.0[..], value])
                    .map_err(backend)?
                    == 1
                {
                    entries += 1;
                    bytes += value.len() as i64;
                }
            }
            add_memo_totals(&tx, flow, entries, bytes)?;
            for k in &batch.gc_candidates {
                gc_candidate
                    .execute(params![flow.0, &k.0[..]])
                    .map_err(backend)?;
            }
            for change in &batch.items {
                let key = change.key();
                let new_rows = match change {
                    ItemChange::Delete {
                        if_queue, version, ..
                    } => {
                        let before = crate::sqlite_items::entry(&tx, flow, key)?;
                        match (before, if_queue) {
                            // Seen again since the deletion was decided: its rows are gone
                            // from the target, so it is indexed again.
                            (Some(mut e), Some(label)) if &e.queue != label => {
                                if e.status != ItemStatus::Modified {
                                    e.status = ItemStatus::Modified;
                                    e.enqueued_at_ms = batch.now_ms;
                                }
                                e.content_hash = None;
                                crate::sqlite_items::write_entry(&tx, flow, &e, None)?;
                            }
                            (before, _) => {
                                let indexed = before.and_then(|e| e.version);
                                let newest = match (indexed, version.clone()) {
                                    (Some(a), Some(b)) => Some(a.max(b)),
                                    (a, b) => a.or(b),
                                };
                                if let Some(v) = newest {
                                    crate::sqlite_items::raise_tombstone(&tx, flow, key, &v)?;
                                }
                                del_item.execute(params![flow.0, key]).map_err(backend)?;
                            }
                        }
                        Some(&[][..])
                    }
                    ItemChange::Upsert { record, rows } => {
                        let before = crate::sqlite_items::entry(&tx, flow, key)?;
                        let after = crate::rules::index(before, record, batch.now_ms);
                        crate::sqlite_items::write_entry(&tx, flow, &after, None)?;
                        rows.as_deref()
                    }
                };
                if let Some(rows) = new_rows {
                    // The item's lineage is now exact: whatever was pending is resolved. (An
                    // item committed without rows keeps its pending keys for a later run.)
                    del_pending.execute(params![flow.0, key]).map_err(backend)?;
                    // Memo keys the old rows used may now be unused: candidates for the GC.
                    let old: Option<Vec<u8>> = old_rows
                        .query_row(params![flow.0, key], |r| r.get(0))
                        .optional()
                        .map_err(backend)?;
                    if let Some(old) = old {
                        let kept: FpMap<()> = rows
                            .iter()
                            .filter_map(|r| r.memo_key)
                            .map(|m| (m, ()))
                            .collect();
                        for row in decode_rows(&old)? {
                            if let Some(m) = row.memo_key
                                && !kept.contains_key(&m)
                            {
                                gc_candidate
                                    .execute(params![flow.0, &m.0[..]])
                                    .map_err(backend)?;
                            }
                        }
                        del_tracked.execute(params![flow.0, key]).map_err(backend)?;
                    }
                    if !rows.is_empty() {
                        ins_tracked
                            .execute(params![flow.0, key, rows.len() as i64, encode_rows(rows)])
                            .map_err(backend)?;
                    }
                }
            }
        }
        crate::sqlite_inputs::put_docs_in(&tx, flow, &batch.inputs.docs)?;
        crate::sqlite_inputs::set_deps_in(&tx, flow, &batch.inputs.deps)?;
        tx.commit().map_err(backend)
    }

    fn tracked_count(&self, flow: FlowId) -> Result<u64> {
        self.conn()
            .query_row(
                "SELECT COALESCE(SUM(n_rows), 0) FROM tracked WHERE flow_id = ?1",
                [flow.0],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(backend)
    }
}

impl MemoStore for SqliteStore {
    fn memo_get(
        &self,
        flow: FlowId,
        keys: &[Fingerprint],
    ) -> Result<HashMap<Fingerprint, Vec<u8>>> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached("SELECT value FROM memo WHERE flow_id = ?1 AND key = ?2")
            .map_err(backend)?;
        let mut out = HashMap::new();
        for key in keys {
            if out.contains_key(key) {
                continue;
            }
            let v: Option<Vec<u8>> = stmt
                .query_row(params![flow.0, &key.0[..]], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            if let Some(v) = v {
                out.insert(*key, v);
            }
        }
        Ok(out)
    }

    fn memo_gc(&self, flow: FlowId) -> Result<u64> {
        let mut conn = self.conn();
        let any: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM memo_gc WHERE flow_id = ?1)",
                [flow.0],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if !any {
            return Ok(0);
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let mut unused: FpMap<()> = FpMap::default();
        {
            let mut stmt = tx
                .prepare("SELECT key FROM memo_gc WHERE flow_id = ?1")
                .map_err(backend)?;
            let mut rows = stmt.query([flow.0]).map_err(backend)?;
            while let Some(r) = rows.next().map_err(backend)? {
                if let Some(k) = fp_from(Some(r.get(0).map_err(backend)?))? {
                    unused.insert(k, ());
                }
            }
            // One pass over the lineage drops every candidate a row still uses.
            let mut stmt = tx
                .prepare("SELECT rows FROM tracked WHERE flow_id = ?1")
                .map_err(backend)?;
            let mut rows = stmt.query([flow.0]).map_err(backend)?;
            while let Some(r) = rows.next().map_err(backend)? {
                let blob = r.get_ref(0).map_err(backend)?;
                for_each_memo_key(
                    blob.as_blob()
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    |k| {
                        unused.remove(&k);
                    },
                )?;
            }
        }
        let mut removed = 0;
        {
            let mut del = tx
                .prepare("DELETE FROM memo WHERE flow_id = ?1 AND key = ?2 RETURNING length(value)")
                .map_err(backend)?;
            let mut bytes = 0i64;
            for k in unused.keys() {
                let len: Option<i64> = del
                    .query_row(params![flow.0, &k.0[..]], |r| r.get(0))
                    .optional()
                    .map_err(backend)?;
                if let Some(len) = len {
                    removed += 1;
                    bytes += len;
                }
            }
            add_memo_totals(&tx, flow, -(removed as i64), -bytes)?;
        }
        tx.execute("DELETE FROM memo_gc WHERE flow_id = ?1", [flow.0])
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(removed)
    }

    fn memo_stats(&self, flow: FlowId) -> Result<(u64, u64)> {
        self.conn()
            .query_row(
                "SELECT entries, bytes FROM memo_totals WHERE flow_id = ?1",
                [flow.0],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(backend)
    }
}

/// Deletes the flow's entries older than the newest [`crate::RUNS_KEPT`], except those still
/// in progress.
fn prune_runs(tx: &rusqlite::Transaction<'_>, flow: i64) -> Result<()> {
    tx.prepare_cached(
        "DELETE FROM runs WHERE flow_id = ?1 AND status != 'inProgress' AND id NOT IN
           (SELECT id FROM runs WHERE flow_id = ?1 ORDER BY id DESC LIMIT ?2)",
    )
    .map_err(backend)?
    .execute(params![flow, crate::RUNS_KEPT])
    .map_err(backend)?;
    Ok(())
}

fn read_run(r: &rusqlite::Row<'_>) -> Result<RunRecord> {
    let trigger: String = r.get(2).map_err(backend)?;
    let status: String = r.get(3).map_err(backend)?;
    Ok(RunRecord {
        id: RunId(r.get(0).map_err(backend)?),
        flow: FlowId(r.get(1).map_err(backend)?),
        trigger: trigger.parse().map_err(StoreError::Corrupt)?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        started_at_ms: r.get(4).map_err(backend)?,
        finished_at_ms: r.get(5).map_err(backend)?,
        summary_json: r.get(6).map_err(backend)?,
        message: r.get(7).map_err(backend)?,
    })
}

fn final_status(status: RunState, what: &str) -> Result<()> {
    if status.is_finished() {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} needs a final status, not `{status}`"
        )))
    }
}

impl crate::IndexRecordStore for SqliteStore {
    fn put_index_records(&self, records: &[(&str, u64, String)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO index_records (kind, id, doc) VALUES (?1, ?2, ?3)",
                )
                .map_err(backend)?;
            for (kind, id, doc) in records {
                put.execute(rusqlite::params![kind, *id as i64, doc])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn index_records(&self, kind: &str) -> Result<Vec<(u64, String)>> {
        let conn = self.conn();
        let mut q = conn
            .prepare_cached("SELECT id, doc FROM index_records WHERE kind = ?1 ORDER BY id")
            .map_err(backend)?;
        let rows = q
            .query_map([kind], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .map_err(backend)?;
        rows.collect::<std::result::Result<_, _>>().map_err(backend)
    }

    fn delete_index_records(&self, kind: &str, ids: &[u64]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut del = tx
                .prepare_cached("DELETE FROM index_records WHERE kind = ?1 AND id = ?2")
                .map_err(backend)?;
            for id in ids {
                del.execute(rusqlite::params![kind, *id as i64])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }
}

impl crate::LockStore for SqliteStore {
    fn try_lock(&self, name: &str) -> Result<Option<crate::StoreLock>> {
        Err(StoreError::Invalid(format!(
            "lock `{name}`: the SQLite store has no shared locks (its data directory's lock files serve instead)"
        )))
    }
}

impl RunStore for SqliteStore {
    fn begin_run(&self, flow: FlowId, trigger: Trigger, started_at_ms: i64) -> Result<RunId> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.execute(
            "INSERT INTO runs (flow_id, trigger, status, started_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                flow.0,
                trigger.as_str(),
                RunState::InProgress.as_str(),
                started_at_ms
            ],
        )
        .map_err(backend)?;
        let id = RunId(tx.last_insert_rowid());
        prune_runs(&tx, flow.0)?;
        tx.commit().map_err(backend)?;
        Ok(id)
    }

    fn finish_run(&self, run: RunId, end: &RunEnd) -> Result<bool> {
        final_status(end.status, "finishing a run")?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let flow: Option<i64> = tx
            .query_row(
                "UPDATE runs SET status = ?2, finished_at_ms = ?3, summary_json = ?4, message = ?5
                 WHERE id = ?1 RETURNING flow_id",
                params![
                    run.0,
                    end.status.as_str(),
                    end.finished_at_ms,
                    end.summary_json,
                    end.message
                ],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        if let Some(flow) = flow {
            // An old entry kept only because it was in progress may go now.
            prune_runs(&tx, flow)?;
        }
        tx.commit().map_err(backend)?;
        Ok(flow.is_some())
    }

    fn record_run_event(
        &self,
        flow: FlowId,
        trigger: Trigger,
        status: RunState,
        at_ms: i64,
        message: Option<&str>,
    ) -> Result<RunId> {
        final_status(status, "a history event")?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.execute(
            "INSERT INTO runs (flow_id, trigger, status, started_at_ms, finished_at_ms, message)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
            params![flow.0, trigger.as_str(), status.as_str(), at_ms, message],
        )
        .map_err(backend)?;
        let id = RunId(tx.last_insert_rowid());
        prune_runs(&tx, flow.0)?;
        tx.commit().map_err(backend)?;
        Ok(id)
    }

    fn runs(&self, flow: FlowId, limit: usize) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, flow_id, trigger, status, started_at_ms, finished_at_ms, summary_json,
                   message
                 FROM runs WHERE flow_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(backend)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![flow.0, limit]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(backend)? {
            out.push(read_run(r)?);
        }
        Ok(out)
    }

    fn last_run(&self, flow: FlowId) -> Result<Option<String>> {
        self.conn()
            .query_row(
                "SELECT summary_json FROM runs WHERE flow_id = ?1 AND summary_json IS NOT NULL
                 ORDER BY id DESC LIMIT 1",
                [flow.0],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
    }

    fn interrupt_runs(&self, flow: Option<FlowId>, at_ms: i64, message: &str) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let flows: Vec<i64> = {
            let mut stmt = tx
                .prepare(
                    "UPDATE runs SET status = ?2, finished_at_ms = MAX(started_at_ms, ?3),
                       message = ?4
                     WHERE status = ?1 AND (?5 IS NULL OR flow_id = ?5)
                     RETURNING flow_id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![
                        RunState::InProgress.as_str(),
                        RunState::TransientFailure.as_str(),
                        at_ms,
                        message,
                        flow.map(|f| f.0)
                    ],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(backend)?
        };
        let mut pruned: Vec<i64> = flows.clone();
        pruned.sort_unstable();
        pruned.dedup();
        for f in pruned {
            prune_runs(&tx, f)?;
        }
        tx.commit().map_err(backend)?;
        Ok(flows.len() as u64)
    }
}
