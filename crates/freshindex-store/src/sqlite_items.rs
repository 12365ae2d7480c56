//! The indexing queue on SQLite: entries in `items`, transitions from [`crate::rules`].

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, TransactionBehavior, params};

use crate::sqlite::backend;
use crate::{
    FenceCheck, FenceError, FlowId, ItemRecord, ItemStatus, ItemStore, ListRequest, PollRequest,
    PushItem, PushRejection, QueueEntry, QueueStats, Result, SqliteStore, StoreError, rules,
};
use freshindex_core::queue::{DEFAULT_POLL_STATUSES, priority};

/// Columns of an entry, in the order [`read_entry`] reads them.
pub(crate) const ENTRY_COLS: &str = "key, status, content_hash, metadata_hash, queue, \
    enqueued_at, leased_until, lease_owner, attempts, available_at, message, version, repushed";

/// Reads an entry from a row of [`ENTRY_COLS`].
pub(crate) fn read_entry(r: &rusqlite::Row<'_>) -> Result<ItemRecord> {
    let status: String = r.get(1).map_err(backend)?;
    Ok(ItemRecord {
        key: r.get(0).map_err(backend)?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        content_hash: r.get(2).map_err(backend)?,
        metadata_hash: r.get(3).map_err(backend)?,
        queue: r.get(4).map_err(backend)?,
        enqueued_at_ms: r.get(5).map_err(backend)?,
        leased_until_ms: r.get(6).map_err(backend)?,
        lease_owner: r.get(7).map_err(backend)?,
        attempts: r
            .get::<_, i64>(8)
            .map_err(backend)?
            .clamp(0, u32::MAX as i64) as u32,
        available_at_ms: r.get(9).map_err(backend)?,
        message: r.get(10).map_err(backend)?,
        version: r.get(11).map_err(backend)?,
        repushed: r.get(12).map_err(backend)?,
        has_pending: false,
    })
}

/// One entry inside a transaction.
pub(crate) fn entry(conn: &Connection, flow: FlowId, key: &str) -> Result<Option<ItemRecord>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLS} FROM items WHERE flow_id = ?1 AND key = ?2"
        ))
        .map_err(backend)?;
    let mut rows = stmt.query(params![flow.0, key]).map_err(backend)?;
    match rows.next().map_err(backend)? {
        Some(r) => Ok(Some(read_entry(r)?)),
        None => Ok(None),
    }
}

/// The tombstone version of a deleted item.
pub(crate) fn tombstone(conn: &Connection, flow: FlowId, key: &str) -> Result<Option<Vec<u8>>> {
    let mut stmt = conn
        .prepare_cached("SELECT version FROM tombstones WHERE flow_id = ?1 AND key = ?2")
        .map_err(backend)?;
    let mut rows = stmt.query(params![flow.0, key]).map_err(backend)?;
    match rows.next().map_err(backend)? {
        Some(r) => Ok(Some(r.get(0).map_err(backend)?)),
        None => Ok(None),
    }
}

/// Records that `key` was deleted at `version`, keeping the newest version.
pub(crate) fn raise_tombstone(
    conn: &Connection,
    flow: FlowId,
    key: &str,
    version: &[u8],
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO tombstones (flow_id, key, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (flow_id, key) DO UPDATE SET version = MAX(version, excluded.version)",
    )
    .map_err(backend)?
    .execute(params![flow.0, key, version])
    .map_err(backend)?;
    Ok(())
}

/// Writes an entry (every column; the payload only when `payload` is given).
pub(crate) fn write_entry(
    conn: &Connection,
    flow: FlowId,
    e: &ItemRecord,
    payload: Option<&[u8]>,
) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO items (flow_id, key, status, prio, content_hash, metadata_hash, queue,
               enqueued_at, leased_until, lease_owner, attempts, available_at, message, version,
               repushed, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (flow_id, key) DO UPDATE SET status = excluded.status,
               prio = excluded.prio, content_hash = excluded.content_hash,
               metadata_hash = excluded.metadata_hash, queue = excluded.queue,
               enqueued_at = excluded.enqueued_at, leased_until = excluded.leased_until,
               lease_owner = excluded.lease_owner, attempts = excluded.attempts,
               available_at = excluded.available_at, message = excluded.message,
               version = excluded.version, repushed = excluded.repushed,
               payload = COALESCE(excluded.payload, items.payload)",
        )
        .map_err(backend)?;
    stmt.execute(params![
        flow.0,
        e.key,
        e.status.as_str(),
        priority(e.status),
        e.content_hash,
        e.metadata_hash,
        e.queue,
        e.enqueued_at_ms,
        e.leased_until_ms,
        e.lease_owner,
        e.attempts as i64,
        e.available_at_ms,
        e.message,
        e.version,
        e.repushed,
        payload,
    ])
    .map_err(backend)?;
    Ok(())
}

fn status_list(statuses: &[ItemStatus]) -> String {
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ItemStore for SqliteStore {
    fn items(&self, flow: FlowId) -> Result<Vec<ItemRecord>> {
        let conn = self.reader();
        let mut pending = HashSet::new();
        {
            let mut stmt = conn
                .prepare_cached("SELECT DISTINCT item_key FROM pending WHERE flow_id = ?1")
                .map_err(backend)?;
            let mut rows = stmt.query([flow.0]).map_err(backend)?;
            while let Some(r) = rows.next().map_err(backend)? {
                pending.insert(r.get::<_, String>(0).map_err(backend)?);
            }
        }
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLS} FROM items WHERE flow_id = ?1 ORDER BY key"
            ))
            .map_err(backend)?;
        let mut rows = stmt.query([flow.0]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(backend)? {
            let mut e = read_entry(r)?;
            e.has_pending = pending.remove(&e.key);
            out.push(e);
        }
        // Pending keys of items that were never committed (new items cut short by a crash):
        // no queue entry, so no label.
        for key in pending {
            let mut e = ItemRecord::new(&key, ItemStatus::NewItem);
            e.queue = String::new();
            e.has_pending = true;
            out.push(e);
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn item_counts(&self, flow: FlowId) -> Result<Vec<(ItemStatus, u64)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT status, COUNT(*) FROM items WHERE flow_id = ?1 GROUP BY status")
            .map_err(backend)?;
        let mut rows = stmt.query([flow.0]).map_err(backend)?;
        let mut counts: HashMap<ItemStatus, u64> = HashMap::new();
        while let Some(r) = rows.next().map_err(backend)? {
            let st: String = r.get(0).map_err(backend)?;
            let n: i64 = r.get(1).map_err(backend)?;
            counts.insert(st.parse().map_err(StoreError::Corrupt)?, n as u64);
        }
        Ok(ItemStatus::ALL
            .into_iter()
            .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
            .collect())
    }

    fn push(
        &self,
        flow: FlowId,
        items: &[PushItem],
        now_ms: i64,
    ) -> Result<Vec<std::result::Result<ItemStatus, PushRejection>>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let before = entry(&tx, flow, &item.key)?;
            match rules::push(before.clone(), item, now_ms) {
                Ok(after) => {
                    // A push that changes nothing (the same push repeated) writes nothing.
                    let same = before.as_ref() == Some(&after) && item.payload.is_none();
                    if !same {
                        write_entry(&tx, flow, &after, item.payload.as_deref())?;
                    }
                    out.push(Ok(after.status));
                }
                Err(rejected) => out.push(Err(rejected)),
            }
        }
        tx.commit().map_err(backend)?;
        Ok(out)
    }

    fn poll(&self, flow: FlowId, req: &PollRequest, now_ms: i64) -> Result<Vec<QueueEntry>> {
        let statuses: &[ItemStatus] = if req.statuses.is_empty() {
            &DEFAULT_POLL_STATUSES
        } else {
            &req.statuses
        };
        let lo = statuses.iter().map(|s| priority(*s)).min().unwrap_or(0);
        let hi = statuses.iter().map(|s| priority(*s)).max().unwrap_or(0);
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let mut out = Vec::new();
        {
            let sql = format!(
                "SELECT {ENTRY_COLS}, payload FROM items
                 WHERE flow_id = ?1 AND prio BETWEEN ?2 AND ?3 AND status IN ({})
                   AND (leased_until IS NULL OR leased_until <= ?4) AND available_at <= ?4
                   AND (?5 IS NULL OR queue = ?5)
                 ORDER BY prio, enqueued_at, key LIMIT ?6",
                status_list(statuses)
            );
            let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
            let mut rows = stmt
                .query(params![
                    flow.0,
                    lo,
                    hi,
                    now_ms,
                    req.queue,
                    req.limit.min(i64::MAX as usize) as i64
                ])
                .map_err(backend)?;
            while let Some(r) = rows.next().map_err(backend)? {
                let item = read_entry(r)?;
                let payload: Option<Vec<u8>> = r.get(13).map_err(backend)?;
                out.push(QueueEntry { item, payload });
            }
        }
        {
            let mut lease = tx
                .prepare_cached(
                    "UPDATE items SET leased_until = ?3, lease_owner = ?4,
                       attempts = attempts + 1, repushed = 0
                     WHERE flow_id = ?1 AND key = ?2",
                )
                .map_err(backend)?;
            let until = now_ms.saturating_add(req.lease_ms.max(1));
            for e in &mut out {
                lease
                    .execute(params![flow.0, e.item.key, until, req.owner])
                    .map_err(backend)?;
                e.item.leased_until_ms = Some(until);
                e.item.lease_owner = Some(req.owner.clone());
                e.item.attempts = e.item.attempts.saturating_add(1);
                e.item.repushed = false;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(out)
    }

    fn heartbeat(&self, flow: FlowId, owner: &str, until_ms: i64, now_ms: i64) -> Result<u64> {
        let n = self
            .conn()
            .execute(
                "UPDATE items SET leased_until = MAX(leased_until, ?3)
                 WHERE flow_id = ?1 AND lease_owner = ?2 AND leased_until > ?4",
                params![flow.0, owner, until_ms, now_ms],
            )
            .map_err(backend)?;
        Ok(n as u64)
    }

    fn unreserve(
        &self,
        flow: FlowId,
        queue: Option<&str>,
        owner: Option<&str>,
        now_ms: i64,
    ) -> Result<u64> {
        let n = self
            .conn()
            .execute(
                "UPDATE items SET leased_until = NULL, lease_owner = NULL
                 WHERE flow_id = ?1 AND leased_until > ?2
                   AND (?3 IS NULL OR queue = ?3) AND (?4 IS NULL OR lease_owner = ?4)",
                params![flow.0, now_ms, queue, owner],
            )
            .map_err(backend)?;
        Ok(n as u64)
    }

    fn get(&self, flow: FlowId, key: &str) -> Result<Option<QueueEntry>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLS}, payload FROM items WHERE flow_id = ?1 AND key = ?2"
            ))
            .map_err(backend)?;
        let mut rows = stmt.query(params![flow.0, key]).map_err(backend)?;
        match rows.next().map_err(backend)? {
            Some(r) => Ok(Some(QueueEntry {
                item: read_entry(r)?,
                payload: r.get(13).map_err(backend)?,
            })),
            None => Ok(None),
        }
    }

    fn list(&self, flow: FlowId, req: &ListRequest) -> Result<Vec<QueueEntry>> {
        let conn = self.conn();
        let status_filter = if req.statuses.is_empty() {
            String::new()
        } else {
            format!("AND status IN ({})", status_list(&req.statuses))
        };
        // `key > ?` only when paging, so that SQLite seeks to the page instead of scanning the
        // flow from its first key (`?2 IS NULL OR …` would defeat the seek).
        let after = if req.after.is_some() {
            "AND key > ?2"
        } else {
            "AND ?2 IS NULL"
        };
        let sql = format!(
            "SELECT {ENTRY_COLS}, payload FROM items
             WHERE flow_id = ?1 {after} AND (?3 IS NULL OR queue = ?3)
             {status_filter} ORDER BY key LIMIT ?4"
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
        let mut rows = stmt
            .query(params![
                flow.0,
                req.after,
                req.queue,
                req.limit.min(i64::MAX as usize) as i64
            ])
            .map_err(backend)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(backend)? {
            out.push(QueueEntry {
                item: read_entry(r)?,
                payload: r.get(13).map_err(backend)?,
            });
        }
        Ok(out)
    }

    fn relabel_all(
        &self,
        flow: FlowId,
        label: &str,
        unseen: &[String],
        unseen_label: &str,
        now_ms: i64,
    ) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        // Rows already in that state are not rewritten (a traversal repeated after a crash).
        let mut n = tx
            .execute(
                "UPDATE items SET queue = ?2, available_at = MIN(available_at, ?3)
                 WHERE flow_id = ?1 AND (queue IS NOT ?2 OR available_at > ?3)",
                params![flow.0, label, now_ms],
            )
            .map_err(backend)? as u64;
        {
            let mut back = tx
                .prepare_cached("UPDATE items SET queue = ?3 WHERE flow_id = ?1 AND key = ?2")
                .map_err(backend)?;
            for key in unseen {
                n += back
                    .execute(params![flow.0, key, unseen_label])
                    .map_err(backend)? as u64;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(n)
    }

    fn queue_keys(&self, flow: FlowId, queue: &str) -> Result<Vec<String>> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached("SELECT key FROM items WHERE flow_id = ?1 AND queue = ?2 ORDER BY key")
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![flow.0, queue], |r| r.get(0))
            .map_err(backend)?;
        rows.collect::<std::result::Result<_, _>>().map_err(backend)
    }

    fn fence(
        &self,
        flow: FlowId,
        checks: &[FenceCheck],
        now_ms: i64,
    ) -> Result<Vec<std::result::Result<(), FenceError>>> {
        let conn = self.conn();
        checks
            .iter()
            .map(|c| {
                let e = entry(&conn, flow, &c.key)?;
                let deleted = match &e {
                    Some(_) => None,
                    None => tombstone(&conn, flow, &c.key)?,
                };
                Ok(rules::fence(e.as_ref(), deleted.as_deref(), c, now_ms))
            })
            .collect()
    }

    fn queue_stats(&self, flow: FlowId, now_ms: i64) -> Result<QueueStats> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT status, COUNT(*),
                   COALESCE(SUM(leased_until > ?2), 0),
                   COALESCE(SUM(leased_until <= ?2), 0),
                   COALESCE(SUM(available_at > ?2 AND (leased_until IS NULL OR leased_until <= ?2)), 0)
                 FROM items WHERE flow_id = ?1 GROUP BY status",
            )
            .map_err(backend)?;
        let mut rows = stmt.query(params![flow.0, now_ms]).map_err(backend)?;
        let mut stats = QueueStats::default();
        let mut counts: HashMap<ItemStatus, u64> = HashMap::new();
        while let Some(r) = rows.next().map_err(backend)? {
            let st: String = r.get(0).map_err(backend)?;
            counts.insert(
                st.parse().map_err(StoreError::Corrupt)?,
                r.get::<_, i64>(1).map_err(backend)? as u64,
            );
            stats.leased += r.get::<_, i64>(2).map_err(backend)? as u64;
            stats.expired += r.get::<_, i64>(3).map_err(backend)? as u64;
            stats.backing_off += r.get::<_, i64>(4).map_err(backend)? as u64;
        }
        stats.by_status = ItemStatus::ALL
            .into_iter()
            .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
            .collect();
        Ok(stats)
    }

    fn requeue_items(
        &self,
        flow: FlowId,
        keys: &[String],
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let mut unknown = Vec::new();
        for key in keys {
            match entry(&tx, flow, key)? {
                Some(before) => {
                    write_entry(&tx, flow, &rules::requeue(before, reason, now_ms), None)?
                }
                None => unknown.push(key.clone()),
            }
        }
        tx.commit().map_err(backend)?;
        Ok(unknown)
    }
}
