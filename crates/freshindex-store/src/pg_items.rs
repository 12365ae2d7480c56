//! The indexing queue on PostgreSQL: entries in `freshindex.items`, transitions from
//! [`crate::rules`] applied under row locks.

use std::collections::{HashMap, HashSet};

use postgres::{GenericClient, Row, Statement, Transaction};

use crate::pg::{Fail, PgResult};
use crate::{
    FenceCheck, FenceError, FlowId, ItemRecord, ItemStatus, ItemStore, ListRequest, PgStore,
    PollRequest, PushItem, PushRejection, QueueEntry, QueueStats, Result, StoreError, rules,
};
use freshindex_core::queue::{DEFAULT_POLL_STATUSES, priority};

/// Columns of an entry, in the order [`read_entry`] reads them (the payload, when selected,
/// follows at [`PAYLOAD_COL`]).
const ENTRY_COLS: &str = "key, status, content_hash, metadata_hash, queue, enqueued_at, \
    leased_until, lease_owner, attempts, available_at, message, version, repushed";
const PAYLOAD_COL: usize = 13;

/// Reads an entry from a row of [`ENTRY_COLS`].
fn read_entry(r: &Row) -> PgResult<ItemRecord> {
    let status: &str = r.try_get(1)?;
    Ok(ItemRecord {
        key: r.try_get(0)?,
        status: status
            .parse()
            .map_err(|e| Fail::Store(StoreError::Corrupt(e)))?,
        content_hash: r.try_get(2)?,
        metadata_hash: r.try_get(3)?,
        queue: r.try_get(4)?,
        enqueued_at_ms: r.try_get(5)?,
        leased_until_ms: r.try_get(6)?,
        lease_owner: r.try_get(7)?,
        attempts: r.try_get::<_, i64>(8)?.clamp(0, u32::MAX as i64) as u32,
        available_at_ms: r.try_get(9)?,
        message: r.try_get(10)?,
        version: r.try_get(11)?,
        repushed: r.try_get(12)?,
        has_pending: false,
    })
}

fn read_queue_entry(r: &Row) -> PgResult<QueueEntry> {
    Ok(QueueEntry {
        item: read_entry(r)?,
        payload: r.try_get(PAYLOAD_COL)?,
    })
}

/// Locks the entries of `keys` (sorted: concurrent writers lock in the same order) and
/// returns them by key.
pub(crate) fn lock_entries(
    tx: &mut Transaction<'_>,
    flow: FlowId,
    keys: &[&str],
) -> PgResult<HashMap<String, ItemRecord>> {
    let mut out = HashMap::with_capacity(keys.len());
    if keys.is_empty() {
        return Ok(out);
    }
    for r in tx.query(
        &format!(
            "SELECT {ENTRY_COLS} FROM freshindex.items WHERE flow_id = $1 AND key = ANY($2)
             ORDER BY key FOR UPDATE"
        ),
        &[&flow.0, &keys],
    )? {
        let e = read_entry(&r)?;
        out.insert(e.key.clone(), e);
    }
    Ok(out)
}

/// Locks one entry.
pub(crate) fn lock_entry(
    tx: &mut Transaction<'_>,
    flow: FlowId,
    key: &str,
) -> PgResult<Option<ItemRecord>> {
    tx.query_opt(
        &format!(
            "SELECT {ENTRY_COLS} FROM freshindex.items WHERE flow_id = $1 AND key = $2
             FOR UPDATE"
        ),
        &[&flow.0, &key],
    )?
    .as_ref()
    .map(read_entry)
    .transpose()
}

/// Records that `key` was deleted at `version`, keeping the newest version.
pub(crate) fn raise_tombstone(
    tx: &mut Transaction<'_>,
    flow: FlowId,
    key: &str,
    version: &[u8],
) -> PgResult<()> {
    tx.execute(
        "INSERT INTO freshindex.tombstones AS t (flow_id, key, version) VALUES ($1, $2, $3)
         ON CONFLICT (flow_id, key) DO UPDATE SET version = GREATEST(t.version, excluded.version)",
        &[&flow.0, &key, &version],
    )?;
    Ok(())
}

const INSERT_ENTRY: &str = "INSERT INTO freshindex.items AS i (flow_id, key, status, prio,
    content_hash, metadata_hash, queue, enqueued_at, leased_until, lease_owner, attempts,
    available_at, message, version, repushed, payload)
  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// Prepared writes of entries.
pub(crate) struct EntryWriter {
    /// Replaces a locked entry (every column; the payload only when given).
    upsert: Statement,
    /// Creates an entry unless one exists.
    insert: Statement,
}

impl EntryWriter {
    pub(crate) fn prepare(tx: &mut Transaction<'_>) -> PgResult<EntryWriter> {
        Ok(EntryWriter {
            upsert: tx.prepare(&format!(
                "{INSERT_ENTRY} ON CONFLICT (flow_id, key) DO UPDATE SET status = excluded.status,
                   prio = excluded.prio, content_hash = excluded.content_hash,
                   metadata_hash = excluded.metadata_hash, queue = excluded.queue,
                   enqueued_at = excluded.enqueued_at, leased_until = excluded.leased_until,
                   lease_owner = excluded.lease_owner, attempts = excluded.attempts,
                   available_at = excluded.available_at, message = excluded.message,
                   version = excluded.version, repushed = excluded.repushed,
                   payload = COALESCE(excluded.payload, i.payload)"
            ))?,
            insert: tx.prepare(&format!("{INSERT_ENTRY} ON CONFLICT DO NOTHING"))?,
        })
    }

    /// Writes `e`, computed from the entry as read under its lock: `exists` says there was
    /// one. Returns false when there was none and another transaction created it since (the
    /// caller reads it again and recomputes).
    pub(crate) fn store(
        &self,
        tx: &mut Transaction<'_>,
        flow: FlowId,
        exists: bool,
        e: &ItemRecord,
        payload: Option<&[u8]>,
    ) -> PgResult<bool> {
        let stmt = if exists { &self.upsert } else { &self.insert };
        let n = tx.execute(
            stmt,
            &[
                &flow.0,
                &e.key,
                &e.status.as_str(),
                &priority(e.status),
                &e.content_hash,
                &e.metadata_hash,
                &e.queue,
                &e.enqueued_at_ms,
                &e.leased_until_ms,
                &e.lease_owner,
                &i64::from(e.attempts),
                &e.available_at_ms,
                &e.message,
                &e.version,
                &e.repushed,
                &payload,
            ],
        )?;
        Ok(exists || n == 1)
    }
}

fn status_names(statuses: &[ItemStatus]) -> Vec<&'static str> {
    statuses.iter().map(|s| s.as_str()).collect()
}

fn counts_by_status(counts: &HashMap<ItemStatus, u64>) -> Vec<(ItemStatus, u64)> {
    ItemStatus::ALL
        .into_iter()
        .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
        .collect()
}

fn count(r: &Row, i: usize) -> PgResult<u64> {
    Ok(r.try_get::<_, i64>(i)?.max(0) as u64)
}

/// Entries by key, and the tombstone versions of deleted keys.
type EntriesAndTombstones = (HashMap<String, ItemRecord>, HashMap<String, Vec<u8>>);

/// Entries and tombstones of `keys`, read without locks.
fn entries_and_tombstones(
    c: &mut impl GenericClient,
    flow: FlowId,
    keys: &[&str],
) -> PgResult<EntriesAndTombstones> {
    let mut entries = HashMap::new();
    for r in c.query(
        &format!("SELECT {ENTRY_COLS} FROM freshindex.items WHERE flow_id = $1 AND key = ANY($2)"),
        &[&flow.0, &keys],
    )? {
        let e = read_entry(&r)?;
        entries.insert(e.key.clone(), e);
    }
    let mut tombstones = HashMap::new();
    for r in c.query(
        "SELECT key, version FROM freshindex.tombstones WHERE flow_id = $1 AND key = ANY($2)",
        &[&flow.0, &keys],
    )? {
        tombstones.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok((entries, tombstones))
}

impl ItemStore for PgStore {
    fn items(&self, flow: FlowId) -> Result<Vec<ItemRecord>> {
        self.run("listing items", |c| {
            // One snapshot for both reads.
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let mut pending: HashSet<String> = HashSet::new();
            for r in tx.query(
                "SELECT DISTINCT item_key FROM freshindex.pending WHERE flow_id = $1",
                &[&flow.0],
            )? {
                pending.insert(r.try_get(0)?);
            }
            let mut out = Vec::new();
            for r in tx.query(
                &format!(
                    "SELECT {ENTRY_COLS} FROM freshindex.items WHERE flow_id = $1 ORDER BY key"
                ),
                &[&flow.0],
            )? {
                let mut e = read_entry(&r)?;
                e.has_pending = pending.remove(&e.key);
                out.push(e);
            }
            tx.commit()?;
            // Pending keys of items that were never committed (new items cut short by a
            // crash): no queue entry, so no label.
            for key in pending {
                let mut e = ItemRecord::new(&key, ItemStatus::NewItem);
                e.queue = String::new();
                e.has_pending = true;
                out.push(e);
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
    }

    fn item_counts(&self, flow: FlowId) -> Result<Vec<(ItemStatus, u64)>> {
        self.run("counting items", |c| {
            let mut counts = HashMap::new();
            for r in c.query(
                "SELECT status, COUNT(*) FROM freshindex.items WHERE flow_id = $1 GROUP BY status",
                &[&flow.0],
            )? {
                let st: &str = r.try_get(0)?;
                counts.insert(
                    st.parse()
                        .map_err(|e| Fail::Store(StoreError::Corrupt(e)))?,
                    count(&r, 1)?,
                );
            }
            Ok(counts_by_status(&counts))
        })
    }

    fn push(
        &self,
        flow: FlowId,
        items: &[PushItem],
        now_ms: i64,
    ) -> Result<Vec<std::result::Result<ItemStatus, PushRejection>>> {
        let mut keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        self.write("pushing items", |tx| {
            let mut known = lock_entries(tx, flow, &keys)?;
            let writer = EntryWriter::prepare(tx)?;
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let result = loop {
                    let before = known.get(&item.key).cloned();
                    let after = match rules::push(before.clone(), item, now_ms) {
                        Ok(after) => after,
                        Err(rejected) => break Err(rejected),
                    };
                    // A push that changes nothing (the same push repeated) writes nothing.
                    if before.as_ref() == Some(&after) && item.payload.is_none() {
                        break Ok(after.status);
                    }
                    if writer.store(tx, flow, before.is_some(), &after, item.payload.as_deref())? {
                        let status = after.status;
                        known.insert(item.key.clone(), after);
                        break Ok(status);
                    }
                    // Another transaction created the entry meanwhile: push onto it.
                    match lock_entry(tx, flow, &item.key)? {
                        Some(e) => known.insert(item.key.clone(), e),
                        None => known.remove(&item.key),
                    };
                };
                out.push(result);
            }
            Ok(out)
        })
    }

    fn poll(&self, flow: FlowId, req: &PollRequest, now_ms: i64) -> Result<Vec<QueueEntry>> {
        let statuses: &[ItemStatus] = if req.statuses.is_empty() {
            &DEFAULT_POLL_STATUSES
        } else {
            &req.statuses
        };
        let names = status_names(statuses);
        let lo = statuses.iter().map(|s| priority(*s)).min().unwrap_or(0);
        let hi = statuses.iter().map(|s| priority(*s)).max().unwrap_or(0);
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        let until = now_ms.saturating_add(req.lease_ms.max(1));
        let cols = ENTRY_COLS
            .split(", ")
            .map(|c| format!("i.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // Entries another poll is leasing right now are skipped, not waited for: concurrent
        // pollers take disjoint entries, and a row whose lease committed meanwhile fails the
        // re-checked conditions.
        let sql = format!(
            "WITH picked AS (
               SELECT key FROM freshindex.items
               WHERE flow_id = $1 AND prio BETWEEN $2 AND $3 AND status = ANY($4)
                 AND (leased_until IS NULL OR leased_until <= $5) AND available_at <= $5
                 AND ($6::TEXT IS NULL OR queue = $6)
               ORDER BY prio, enqueued_at, key
               LIMIT $7
               FOR UPDATE SKIP LOCKED)
             UPDATE freshindex.items i SET leased_until = $8, lease_owner = $9,
               attempts = i.attempts + 1, repushed = FALSE
             FROM picked WHERE i.flow_id = $1 AND i.key = picked.key
             RETURNING {cols}, i.payload"
        );
        self.write("polling the queue", |tx| {
            let mut out = tx
                .query(
                    &sql,
                    &[
                        &flow.0, &lo, &hi, &names, &now_ms, &req.queue, &limit, &until, &req.owner,
                    ],
                )?
                .iter()
                .map(read_queue_entry)
                .collect::<PgResult<Vec<_>>>()?;
            out.sort_by(|a, b| {
                (priority(a.item.status), a.item.enqueued_at_ms, &a.item.key).cmp(&(
                    priority(b.item.status),
                    b.item.enqueued_at_ms,
                    &b.item.key,
                ))
            });
            Ok(out)
        })
    }

    fn heartbeat(&self, flow: FlowId, owner: &str, until_ms: i64, now_ms: i64) -> Result<u64> {
        self.write("extending leases", |tx| {
            Ok(tx.execute(
                "UPDATE freshindex.items SET leased_until = GREATEST(leased_until, $3)
                 WHERE flow_id = $1 AND lease_owner = $2 AND leased_until > $4",
                &[&flow.0, &owner, &until_ms, &now_ms],
            )?)
        })
    }

    fn unreserve(
        &self,
        flow: FlowId,
        queue: Option<&str>,
        owner: Option<&str>,
        now_ms: i64,
    ) -> Result<u64> {
        self.write("ending leases", |tx| {
            Ok(tx.execute(
                "UPDATE freshindex.items SET leased_until = NULL, lease_owner = NULL
                 WHERE flow_id = $1 AND leased_until > $2
                   AND ($3::TEXT IS NULL OR queue = $3) AND ($4::TEXT IS NULL OR lease_owner = $4)",
                &[&flow.0, &now_ms, &queue, &owner],
            )?)
        })
    }

    fn get(&self, flow: FlowId, key: &str) -> Result<Option<QueueEntry>> {
        self.run(&format!("reading item `{key}`"), |c| {
            c.query_opt(
                &format!(
                    "SELECT {ENTRY_COLS}, payload FROM freshindex.items
                     WHERE flow_id = $1 AND key = $2"
                ),
                &[&flow.0, &key],
            )?
            .as_ref()
            .map(read_queue_entry)
            .transpose()
        })
    }

    fn list(&self, flow: FlowId, req: &ListRequest) -> Result<Vec<QueueEntry>> {
        let names = status_names(&req.statuses);
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        self.run("listing queue entries", |c| {
            c.query(
                &format!(
                    "SELECT {ENTRY_COLS}, payload FROM freshindex.items
                     WHERE flow_id = $1 AND ($2::TEXT IS NULL OR key > $2)
                       AND ($3::TEXT IS NULL OR queue = $3)
                       AND (cardinality($4::TEXT[]) = 0 OR status = ANY($4))
                     ORDER BY key LIMIT $5"
                ),
                &[&flow.0, &req.after, &req.queue, &names, &limit],
            )?
            .iter()
            .map(read_queue_entry)
            .collect()
        })
    }

    fn relabel_all(
        &self,
        flow: FlowId,
        label: &str,
        unseen: &[String],
        unseen_label: &str,
        now_ms: i64,
    ) -> Result<u64> {
        self.write("relabelling the queue", |tx| {
            // Rows already in that state are not rewritten (a traversal repeated after a
            // crash).
            let mut n = tx.execute(
                "UPDATE freshindex.items SET queue = $2, available_at = LEAST(available_at, $3)
                 WHERE flow_id = $1 AND (queue IS DISTINCT FROM $2 OR available_at > $3)",
                &[&flow.0, &label, &now_ms],
            )?;
            if !unseen.is_empty() {
                n += tx.execute(
                    "UPDATE freshindex.items SET queue = $3 WHERE flow_id = $1 AND key = ANY($2)",
                    &[&flow.0, &unseen, &unseen_label],
                )?;
            }
            Ok(n)
        })
    }

    fn queue_keys(&self, flow: FlowId, queue: &str) -> Result<Vec<String>> {
        self.run(&format!("listing the keys of queue `{queue}`"), |c| {
            c.query(
                "SELECT key FROM freshindex.items WHERE flow_id = $1 AND queue = $2 ORDER BY key",
                &[&flow.0, &queue],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
        })
    }

    fn fence(
        &self,
        flow: FlowId,
        checks: &[FenceCheck],
        now_ms: i64,
    ) -> Result<Vec<std::result::Result<(), FenceError>>> {
        let keys: Vec<&str> = checks.iter().map(|c| c.key.as_str()).collect();
        self.run("checking fences", |c| {
            let (entries, tombstones) = entries_and_tombstones(c, flow, &keys)?;
            Ok(checks
                .iter()
                .map(|check| {
                    let e = entries.get(&check.key);
                    let deleted = match e {
                        Some(_) => None,
                        None => tombstones.get(&check.key).map(Vec::as_slice),
                    };
                    rules::fence(e, deleted, check, now_ms)
                })
                .collect())
        })
    }

    fn queue_stats(&self, flow: FlowId, now_ms: i64) -> Result<QueueStats> {
        self.run("reading queue statistics", |c| {
            let mut stats = QueueStats::default();
            let mut counts = HashMap::new();
            for r in c.query(
                "SELECT status, COUNT(*),
                   COUNT(*) FILTER (WHERE leased_until > $2),
                   COUNT(*) FILTER (WHERE leased_until <= $2),
                   COUNT(*) FILTER (WHERE available_at > $2
                     AND (leased_until IS NULL OR leased_until <= $2))
                 FROM freshindex.items WHERE flow_id = $1 GROUP BY status",
                &[&flow.0, &now_ms],
            )? {
                let st: &str = r.try_get(0)?;
                counts.insert(
                    st.parse()
                        .map_err(|e| Fail::Store(StoreError::Corrupt(e)))?,
                    count(&r, 1)?,
                );
                stats.leased += count(&r, 2)?;
                stats.expired += count(&r, 3)?;
                stats.backing_off += count(&r, 4)?;
            }
            stats.by_status = counts_by_status(&counts);
            Ok(stats)
        })
    }

    fn requeue_items(
        &self,
        flow: FlowId,
        keys: &[String],
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        let mut sorted: Vec<&str> = keys.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        self.write("requeueing items", |tx| {
            let mut known = lock_entries(tx, flow, &sorted)?;
            let writer = EntryWriter::prepare(tx)?;
            let mut unknown = Vec::new();
            for key in keys {
                match known.remove(key) {
                    Some(before) => {
                        let after = rules::requeue(before, reason, now_ms);
                        writer.store(tx, flow, true, &after, None)?;
                        known.insert(key.clone(), after);
                    }
                    None => unknown.push(key.clone()),
                }
            }
            Ok(unknown)
        })
    }
}
