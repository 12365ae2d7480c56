//! [`InputStore`] on SQLite: documents, dependencies, memberships and marks of multi-input
//! flows (tables `docs`, `docs_kept`, `deps`, `members`, `input_marks`, schema 6). Writes
//! take `BEGIN IMMEDIATE`, so sequence numbers (`MAX(seq) + 1` of the flow) are given in
//! commit order.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::sqlite::backend;
use crate::{DocWrite, FlowId, InputStore, Result, SqliteStore, StoredDoc};

impl InputStore for SqliteStore {
    fn docs_kept(&self, flow: FlowId) -> Result<bool> {
        let conn = self.conn();
        conn.query_row(
            "SELECT 1 FROM docs_kept WHERE flow_id = ?1",
            [flow.0],
            |_| Ok(()),
        )
        .optional()
        .map(|r| r.is_some())
        .map_err(backend)
    }

    fn keep_docs(&self, flow: FlowId, on: bool) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        if on {
            tx.execute(
                "INSERT OR IGNORE INTO docs_kept (flow_id) VALUES (?1)",
                [flow.0],
            )
            .map_err(backend)?;
        } else {
            tx.execute("DELETE FROM docs_kept WHERE flow_id = ?1", [flow.0])
                .map_err(backend)?;
            tx.execute("DELETE FROM docs WHERE flow_id = ?1", [flow.0])
                .map_err(backend)?;
            tx.execute("DELETE FROM input_marks WHERE up_flow = ?1", [flow.0])
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)
    }

    fn put_docs(&self, flow: FlowId, docs: &[DocWrite]) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        put_docs_in(&tx, flow, docs)?;
        tx.commit().map_err(backend)
    }

    fn docs(&self, flow: FlowId, keys: &[String]) -> Result<Vec<StoredDoc>> {
        let conn = self.reader();
        let mut q = conn
            .prepare_cached(
                "SELECT seq, fp, doc FROM docs WHERE flow_id = ?1 AND key = ?2 AND doc IS NOT NULL",
            )
            .map_err(backend)?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let found = q
                .query_row(params![flow.0, key], |r| {
                    Ok(StoredDoc {
                        key: key.clone(),
                        seq: r.get(0)?,
                        fp: r.get(1)?,
                        doc: r.get(2)?,
                    })
                })
                .optional()
                .map_err(backend)?;
            out.extend(found);
        }
        Ok(out)
    }

    fn docs_since(&self, flow: FlowId, after: i64, limit: usize) -> Result<Vec<StoredDoc>> {
        let conn = self.reader();
        let mut q = conn
            .prepare_cached(
                "SELECT key, seq, fp, doc FROM docs WHERE flow_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(backend)?;
        let rows = q
            .query_map(params![flow.0, after, limit as i64], |r| {
                Ok(StoredDoc {
                    key: r.get(0)?,
                    seq: r.get(1)?,
                    fp: r.get(2)?,
                    doc: r.get(3)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<std::result::Result<_, _>>().map_err(backend)
    }

    fn set_deps(&self, flow: FlowId, deps: &[(String, Vec<(FlowId, String)>)]) -> Result<()> {
        if deps.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        set_deps_in(&tx, flow, deps)?;
        tx.commit().map_err(backend)
    }

    fn dependents(&self, flow: FlowId, up: FlowId, keys: &[String]) -> Result<Vec<String>> {
        let conn = self.reader();
        let mut q = conn
            .prepare_cached(
                "SELECT key FROM deps WHERE up_flow = ?1 AND up_key = ?2 AND flow_id = ?3",
            )
            .map_err(backend)?;
        let mut out = Vec::new();
        for k in keys {
            let rows = q
                .query_map(params![up.0, k, flow.0], |r| r.get::<_, String>(0))
                .map_err(backend)?;
            for r in rows {
                out.push(r.map_err(backend)?);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn member_groups(
        &self,
        flow: FlowId,
        up: FlowId,
        keys: &[String],
    ) -> Result<HashMap<String, (String, Vec<u8>)>> {
        let conn = self.reader();
        let mut q = conn
            .prepare_cached(
                "SELECT grp, fp FROM members WHERE flow_id = ?1 AND up_flow = ?2 AND up_key = ?3",
            )
            .map_err(backend)?;
        let mut out = HashMap::new();
        for k in keys {
            if let Some(g) = q
                .query_row(params![flow.0, up.0, k], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(backend)?
            {
                out.insert(k.clone(), g);
            }
        }
        Ok(out)
    }

    fn group_members(&self, flow: FlowId, group: &str) -> Result<Vec<(FlowId, String)>> {
        let conn = self.reader();
        let mut q = conn
            .prepare_cached(
                "SELECT up_flow, up_key FROM members WHERE flow_id = ?1 AND grp = ?2 ORDER BY up_flow, up_key",
            )
            .map_err(backend)?;
        let rows = q
            .query_map(params![flow.0, group], |r| {
                Ok((FlowId(r.get(0)?), r.get::<_, String>(1)?))
            })
            .map_err(backend)?;
        rows.collect::<std::result::Result<_, _>>().map_err(backend)
    }

    fn update_members(
        &self,
        flow: FlowId,
        up: FlowId,
        changes: &[(String, Option<(String, Vec<u8>)>)],
        mark: i64,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO members (flow_id, up_flow, up_key, grp, fp) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(backend)?;
            let mut del = tx
                .prepare_cached(
                    "DELETE FROM members WHERE flow_id = ?1 AND up_flow = ?2 AND up_key = ?3",
                )
                .map_err(backend)?;
            for (key, group) in changes {
                match group {
                    Some((g, fp)) => put.execute(params![flow.0, up.0, key, g, fp]),
                    None => del.execute(params![flow.0, up.0, key]),
                }
                .map_err(backend)?;
            }
        }
        set_mark(&tx, flow, up, mark)?;
        tx.commit().map_err(backend)
    }

    fn input_mark(&self, flow: FlowId, up: FlowId) -> Result<Option<i64>> {
        let conn = self.reader();
        conn.query_row(
            "SELECT seq FROM input_marks WHERE flow_id = ?1 AND up_flow = ?2",
            [flow.0, up.0],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)
    }

    fn set_input_mark(&self, flow: FlowId, up: FlowId, mark: i64) -> Result<()> {
        let conn = self.conn();
        set_mark(&conn, flow, up, mark)
    }

    fn forget_inputs(&self, flow: FlowId) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        for table in ["deps", "members", "input_marks"] {
            tx.execute(&format!("DELETE FROM {table} WHERE flow_id = ?1"), [flow.0])
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)
    }
}

fn set_mark(conn: &rusqlite::Connection, flow: FlowId, up: FlowId, mark: i64) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO input_marks (flow_id, up_flow, seq) VALUES (?1, ?2, ?3)",
        params![flow.0, up.0, mark],
    )
    .map(|_| ())
    .map_err(backend)
}

/// [`InputStore::put_docs`] inside the caller's write transaction (a batch's commit).
pub(crate) fn put_docs_in(conn: &Connection, flow: FlowId, docs: &[DocWrite]) -> Result<()> {
    if docs.is_empty() {
        return Ok(());
    }
    let mut seq: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM docs WHERE flow_id = ?1",
            [flow.0],
            |r| r.get(0),
        )
        .map_err(backend)?;
    let mut get = conn
        .prepare_cached("SELECT fp, doc IS NOT NULL FROM docs WHERE flow_id = ?1 AND key = ?2")
        .map_err(backend)?;
    let mut put = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO docs (flow_id, key, seq, fp, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(backend)?;
    for (key, doc) in docs {
        let before: Option<(Vec<u8>, bool)> = get
            .query_row(params![flow.0, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(backend)?;
        let changes = match (&before, doc) {
            (Some((fp, true)), Some((new_fp, _))) => fp != new_fp,
            (Some((_, false)) | None, Some(_)) => true,
            (Some((_, true)), None) => true,
            (Some((_, false)) | None, None) => false,
        };
        if !changes {
            continue;
        }
        seq += 1;
        match doc {
            Some((fp, bytes)) => put.execute(params![flow.0, key, seq, fp, bytes]),
            None => put.execute(params![flow.0, key, seq, &[] as &[u8], None::<Vec<u8>>]),
        }
        .map_err(backend)?;
    }
    Ok(())
}

/// [`InputStore::set_deps`] inside the caller's write transaction (a batch's commit).
pub(crate) fn set_deps_in(
    conn: &Connection,
    flow: FlowId,
    deps: &[(String, Vec<(FlowId, String)>)],
) -> Result<()> {
    let mut del = conn
        .prepare_cached("DELETE FROM deps WHERE flow_id = ?1 AND key = ?2")
        .map_err(backend)?;
    let mut ins = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO deps (flow_id, key, up_flow, up_key) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(backend)?;
    for (key, ups) in deps {
        del.execute(params![flow.0, key]).map_err(backend)?;
        for (up, up_key) in ups {
            ins.execute(params![flow.0, key, up.0, up_key])
                .map_err(backend)?;
        }
    }
    Ok(())
}
