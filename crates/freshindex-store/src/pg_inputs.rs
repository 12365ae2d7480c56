//! [`InputStore`] on PostgreSQL: documents, dependencies, memberships and marks of multi-input
//! flows (tables `docs`, `docs_kept`, `deps`, `members`, `input_marks`, schema 2).
//!
//! Sequence numbers: a write of a flow's documents holds the flow's [`DOCS_SEQ_LOCK`]
//! exclusively until it commits, so `MAX(seq) + 1` is given in commit order; `docs_since`
//! takes the same lock shared before it reads, so it waits for writes in flight and no
//! smaller number can commit after a read that returned a larger one.
//!
//! Batches that name a key more than once behave as the SQLite backend, which applies them
//! one after the other: the last write of a key is the one that stays.

use std::collections::HashMap;

use postgres::Transaction;

use crate::pg::{DOCS_SEQ_LOCK, Fail, PgResult, flow_lock_key};
use crate::{DocWrite, FlowId, InputStore, MemberChange, PgStore, Result, StoredDoc};

/// A row of `docs` to write: (seq, fp, doc).
type DocRow<'a> = (i64, &'a [u8], Option<&'a [u8]>);

/// `limit` as a SQL `LIMIT`.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Takes the flow's document lock for the rest of the transaction.
fn lock_docs(tx: &mut Transaction<'_>, flow: FlowId, exclusive: bool) -> PgResult<()> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, $2)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, $2)"
    };
    tx.execute(sql, &[&DOCS_SEQ_LOCK, &flow_lock_key(flow)])?;
    Ok(())
}

/// The last occurrence of each key, in the order of the first occurrences.
fn last_of_each<T>(items: &[(String, T)]) -> Vec<&(String, T)> {
    let mut at: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    let mut order: Vec<&str> = Vec::with_capacity(items.len());
    for (i, (k, _)) in items.iter().enumerate() {
        if at.insert(k.as_str(), i).is_none() {
            order.push(k.as_str());
        }
    }
    order
        .into_iter()
        .filter_map(|k| at.get(k).map(|&i| &items[i]))
        .collect()
}

fn stored_doc(r: &postgres::Row) -> PgResult<StoredDoc> {
    Ok(StoredDoc {
        key: r.try_get(0)?,
        seq: r.try_get(1)?,
        fp: r.try_get(2)?,
        doc: r.try_get(3)?,
    })
}

fn set_mark(tx: &mut Transaction<'_>, flow: FlowId, up: FlowId, mark: i64) -> PgResult<()> {
    tx.execute(
        "INSERT INTO freshindex.input_marks (flow_id, up_flow, seq) VALUES ($1, $2, $3)
         ON CONFLICT (flow_id, up_flow) DO UPDATE SET seq = excluded.seq",
        &[&flow.0, &up.0, &mark],
    )?;
    Ok(())
}

impl InputStore for PgStore {
    fn docs_kept(&self, flow: FlowId) -> Result<bool> {
        self.run("reading whether the flow keeps documents", |c| {
            Ok(c.query_one(
                "SELECT EXISTS (SELECT 1 FROM freshindex.docs_kept WHERE flow_id = $1)",
                &[&flow.0],
            )?
            .try_get(0)?)
        })
    }

    fn keep_docs(&self, flow: FlowId, on: bool) -> Result<()> {
        if on {
            return self.write("starting to keep documents", |tx| {
                tx.execute(
                    "INSERT INTO freshindex.docs_kept (flow_id) VALUES ($1)
                     ON CONFLICT DO NOTHING",
                    &[&flow.0],
                )?;
                Ok(())
            });
        }
        self.write("forgetting the flow's documents", |tx| {
            // No write of the flow's documents is in flight while they are forgotten.
            lock_docs(tx, flow, true)?;
            tx.execute(
                "DELETE FROM freshindex.docs_kept WHERE flow_id = $1",
                &[&flow.0],
            )?;
            tx.execute("DELETE FROM freshindex.docs WHERE flow_id = $1", &[&flow.0])?;
            tx.execute(
                "DELETE FROM freshindex.input_marks WHERE up_flow = $1",
                &[&flow.0],
            )?;
            Ok(())
        })
    }

    fn put_docs(&self, flow: FlowId, docs: &[DocWrite]) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        self.write("writing documents", |tx| put_docs_in(tx, flow, docs))
    }

    fn docs(&self, flow: FlowId, keys: &[String]) -> Result<Vec<StoredDoc>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.run("reading documents", |c| {
            let mut found: HashMap<String, StoredDoc> = HashMap::with_capacity(keys.len());
            for r in c.query(
                "SELECT key, seq, fp, doc FROM freshindex.docs
                 WHERE flow_id = $1 AND key = ANY($2) AND doc IS NOT NULL",
                &[&flow.0, &keys],
            )? {
                let d = stored_doc(&r)?;
                found.insert(d.key.clone(), d);
            }
            // In the order asked, as the SQLite backend answers.
            Ok(keys.iter().filter_map(|k| found.get(k).cloned()).collect())
        })
    }

    fn docs_since(&self, flow: FlowId, after: i64, limit: usize) -> Result<Vec<StoredDoc>> {
        self.run("reading documents by sequence number", |c| {
            let mut tx = c.transaction()?;
            // Waits for the writes of the flow's documents in flight; the query below (a new
            // snapshot) sees them committed.
            lock_docs(&mut tx, flow, false)?;
            let out = tx
                .query(
                    "SELECT key, seq, fp, doc FROM freshindex.docs
                     WHERE flow_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&flow.0, &after, &sql_limit(limit)],
                )?
                .iter()
                .map(stored_doc)
                .collect::<PgResult<Vec<_>>>()?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn set_deps(&self, flow: FlowId, deps: &[(String, Vec<(FlowId, String)>)]) -> Result<()> {
        if deps.is_empty() {
            return Ok(());
        }
        self.write("recording lookup dependencies", |tx| {
            set_deps_in(tx, flow, deps)
        })
    }

    fn dependents(&self, flow: FlowId, up: FlowId, keys: &[String]) -> Result<Vec<String>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = self.run("reading lookup dependents", |c| {
            c.query(
                "SELECT DISTINCT key FROM freshindex.deps
                 WHERE up_flow = $1 AND up_key = ANY($2) AND flow_id = $3",
                &[&up.0, &keys, &flow.0],
            )?
            .iter()
            .map(|r| r.try_get::<_, String>(0).map_err(Fail::from))
            .collect::<PgResult<Vec<String>>>()
        })?;
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
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        self.run("reading the groups of members", |c| {
            let mut out = HashMap::with_capacity(keys.len());
            for r in c.query(
                "SELECT up_key, grp, fp FROM freshindex.members
                 WHERE flow_id = $1 AND up_flow = $2 AND up_key = ANY($3)",
                &[&flow.0, &up.0, &keys],
            )? {
                out.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?));
            }
            Ok(out)
        })
    }

    fn group_members(&self, flow: FlowId, group: &str) -> Result<Vec<(FlowId, String)>> {
        self.run(&format!("reading the members of group `{group}`"), |c| {
            c.query(
                "SELECT up_flow, up_key FROM freshindex.members
                 WHERE flow_id = $1 AND grp = $2 ORDER BY up_flow, up_key",
                &[&flow.0, &group],
            )?
            .iter()
            .map(|r| Ok((FlowId(r.try_get(0)?), r.try_get(1)?)))
            .collect()
        })
    }

    fn update_members(
        &self,
        flow: FlowId,
        up: FlowId,
        changes: &[MemberChange],
        mark: i64,
    ) -> Result<()> {
        // A member named twice takes its last change.
        let mut gone: Vec<&str> = Vec::new();
        let mut put_keys: Vec<&str> = Vec::new();
        let mut put_groups: Vec<&str> = Vec::new();
        let mut put_fps: Vec<&[u8]> = Vec::new();
        for (key, group) in last_of_each(changes) {
            match group {
                Some((g, fp)) => {
                    put_keys.push(key.as_str());
                    put_groups.push(g.as_str());
                    put_fps.push(fp.as_slice());
                }
                None => gone.push(key.as_str()),
            }
        }
        self.write("updating members", |tx| {
            if !gone.is_empty() {
                tx.execute(
                    "DELETE FROM freshindex.members
                     WHERE flow_id = $1 AND up_flow = $2 AND up_key = ANY($3)",
                    &[&flow.0, &up.0, &gone],
                )?;
            }
            if !put_keys.is_empty() {
                tx.execute(
                    "INSERT INTO freshindex.members (flow_id, up_flow, up_key, grp, fp)
                     SELECT $1, $2, k, g, f FROM unnest($3::text[], $4::text[], $5::bytea[])
                       AS t(k, g, f)
                     ON CONFLICT (flow_id, up_flow, up_key) DO UPDATE
                       SET grp = excluded.grp, fp = excluded.fp",
                    &[&flow.0, &up.0, &put_keys, &put_groups, &put_fps],
                )?;
            }
            set_mark(tx, flow, up, mark)
        })
    }

    fn input_mark(&self, flow: FlowId, up: FlowId) -> Result<Option<i64>> {
        self.run("reading an input mark", |c| {
            Ok(c.query_opt(
                "SELECT seq FROM freshindex.input_marks WHERE flow_id = $1 AND up_flow = $2",
                &[&flow.0, &up.0],
            )?
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?)
        })
    }

    fn set_input_mark(&self, flow: FlowId, up: FlowId, mark: i64) -> Result<()> {
        self.write("recording an input mark", |tx| set_mark(tx, flow, up, mark))
    }

    fn forget_inputs(&self, flow: FlowId) -> Result<()> {
        self.write("forgetting the flow's inputs", |tx| {
            for table in ["deps", "members", "input_marks"] {
                tx.execute(
                    &format!("DELETE FROM freshindex.{table} WHERE flow_id = $1"),
                    &[&flow.0],
                )?;
            }
            Ok(())
        })
    }
}

/// [`InputStore::put_docs`] inside the caller's transaction (also a batch's commit).
pub(crate) fn put_docs_in(
    tx: &mut Transaction<'_>,
    flow: FlowId,
    docs: &[DocWrite],
) -> PgResult<()> {
    if docs.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
    lock_docs(tx, flow, true)?;
    let mut seq: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM freshindex.docs WHERE flow_id = $1",
            &[&flow.0],
        )?
        .try_get(0)?;
    // Each key's fingerprint, when it has a live document (`None`: a tombstone).
    let mut now: HashMap<String, Option<Vec<u8>>> = HashMap::with_capacity(docs.len());
    for r in tx.query(
        "SELECT key, fp, doc IS NOT NULL FROM freshindex.docs
             WHERE flow_id = $1 AND key = ANY($2)",
        &[&flow.0, &keys],
    )? {
        let live: bool = r.try_get(2)?;
        now.insert(r.try_get(0)?, live.then(|| r.try_get(1)).transpose()?);
    }
    // The rows to write: (seq, fp, doc) by key, the last change of each key.
    let mut rows: HashMap<&str, DocRow<'_>> = HashMap::new();
    for (key, doc) in docs {
        let live = now.get(key.as_str()).and_then(|fp| fp.as_deref());
        let changes = match (live, doc) {
            (Some(fp), Some((new_fp, _))) => fp != new_fp.as_slice(),
            (None, Some(_)) => true,
            (Some(_), None) => true,
            (None, None) => false,
        };
        if !changes {
            continue;
        }
        seq += 1;
        let row = match doc {
            Some((fp, bytes)) => (seq, fp.as_slice(), Some(bytes.as_slice())),
            None => (seq, &[][..], None),
        };
        rows.insert(key.as_str(), row);
        now.insert(key.clone(), doc.as_ref().map(|(fp, _)| fp.clone()));
    }
    if rows.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut fps = Vec::with_capacity(rows.len());
    let mut bodies = Vec::with_capacity(rows.len());
    for (key, (seq, fp, doc)) in rows {
        keys.push(key);
        seqs.push(seq);
        fps.push(fp);
        bodies.push(doc);
    }
    tx.execute(
        "INSERT INTO freshindex.docs AS d (flow_id, key, seq, fp, doc)
             SELECT $1, k, s, f, b
             FROM unnest($2::text[], $3::bigint[], $4::bytea[], $5::bytea[]) AS t(k, s, f, b)
             ON CONFLICT (flow_id, key) DO UPDATE
               SET seq = excluded.seq, fp = excluded.fp, doc = excluded.doc",
        &[&flow.0, &keys, &seqs, &fps, &bodies],
    )?;
    Ok(())
}

/// [`InputStore::set_deps`] inside the caller's transaction (also a batch's commit).
pub(crate) fn set_deps_in(
    tx: &mut Transaction<'_>,
    flow: FlowId,
    deps: &[(String, Vec<(FlowId, String)>)],
) -> PgResult<()> {
    if deps.is_empty() {
        return Ok(());
    }
    // An item named twice keeps the last list.
    let items = last_of_each(deps);
    let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
    let mut dep_keys: Vec<&str> = Vec::new();
    let mut up_flows: Vec<i64> = Vec::new();
    let mut up_keys: Vec<&str> = Vec::new();
    for (key, ups) in &items {
        for (up, up_key) in ups {
            dep_keys.push(key.as_str());
            up_flows.push(up.0);
            up_keys.push(up_key.as_str());
        }
    }

    tx.execute(
        "DELETE FROM freshindex.deps WHERE flow_id = $1 AND key = ANY($2)",
        &[&flow.0, &keys],
    )?;
    if !dep_keys.is_empty() {
        tx.execute(
            "INSERT INTO freshindex.deps (flow_id, key, up_flow, up_key)
                 SELECT $1, k, f, u FROM unnest($2::text[], $3::bigint[], $4::text[])
                   AS t(k, f, u)
                 ON CONFLICT DO NOTHING",
            &[&flow.0, &dep_keys, &up_flows, &up_keys],
        )?;
    }
    Ok(())
}
