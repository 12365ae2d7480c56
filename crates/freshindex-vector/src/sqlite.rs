//! A collection in one SQLite file with exact search.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    Filter, Metric, Result, Row, RowPayload, SearchHit, VectorCollection, VectorError, cosine,
    decode_vector, encode_vector_into,
};

/// A durable collection with exact cosine search.
pub struct SqliteCollection {
    name: String,
    dimension: usize,
    metric: Metric,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteCollection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCollection")
            .field("name", &self.name)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

/// Stored metadata (JSON text written by `apply`); unreadable text is dropped rather than
/// failing a search.
fn parse_metadata(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// A candidate in the top-k heap, ordered so that the worst is on top.
struct Scored {
    score: f32,
    id: i64,
}

impl PartialEq for Scored {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reverse score: BinaryHeap is a max-heap and we want the worst on top. Ties: the larger
        // row id is worse, so results are deterministic.
        o.score
            .total_cmp(&self.score)
            .then_with(|| self.id.cmp(&o.id))
    }
}

impl SqliteCollection {
    /// Opens the collection file; creates it when `create_dimension` is given.
    pub fn open(path: &Path, name: &str, create_dimension: Option<usize>) -> Result<Self> {
        let err = |message: String| VectorError::Storage {
            collection: name.into(),
            message,
        };
        let conn = Connection::open(path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| err(e.to_string()))?;
        conn.execute_batch(
            "PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -65536;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rows (
               id INTEGER PRIMARY KEY,
               key TEXT NOT NULL UNIQUE,
               source TEXT NOT NULL,
               start INTEGER NOT NULL,
               end INTEGER NOT NULL,
               text TEXT NOT NULL,
               vector BLOB NOT NULL,
               metadata TEXT
             );",
        )
        .map_err(|e| err(e.to_string()))?;
        let stored: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'dimension'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| err(e.to_string()))?;
        let dimension = match (stored, create_dimension) {
            (Some(d), want) => {
                let d: usize = d
                    .parse()
                    .map_err(|_| err(format!("stored dimension `{d}` is invalid")))?;
                if let Some(w) = want.filter(|w| *w != d) {
                    return Err(VectorError::Dimension {
                        collection: name.into(),
                        expected: d,
                        got: w,
                    });
                }
                d
            }
            (None, Some(d)) => {
                conn.execute_batch(&format!(
                    "INSERT INTO meta (key, value) VALUES ('dimension', '{d}'), ('metric', 'cosine'), ('rows', '0');"
                ))
                .map_err(|e| err(e.to_string()))?;
                d
            }
            (None, None) => return Err(VectorError::NotFound(name.into())),
        };
        // Files written before rows carried metadata get the column.
        let has_metadata: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('rows') WHERE name = 'metadata')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| err(e.to_string()))?;
        if !has_metadata {
            conn.execute_batch("ALTER TABLE rows ADD COLUMN metadata TEXT")
                .map_err(|e| err(e.to_string()))?;
        }
        // Files written before the row count was kept get it once.
        let counted: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'rows')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| err(e.to_string()))?;
        if !counted {
            conn.execute(
                "INSERT INTO meta (key, value) SELECT 'rows', COUNT(*) FROM rows",
                [],
            )
            .map_err(|e| err(e.to_string()))?;
        }
        Ok(SqliteCollection {
            name: name.into(),
            dimension,
            metric: Metric::Cosine,
            conn: Mutex::new(conn),
        })
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, e: impl std::fmt::Display) -> VectorError {
        VectorError::Storage {
            collection: self.name.clone(),
            message: e.to_string(),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        decode_vector(bytes)
            .filter(|v| v.len() == self.dimension)
            .ok_or_else(|| self.err(format!("stored vector of {} bytes", bytes.len())))
    }
}

impl VectorCollection for SqliteCollection {
    fn name(&self) -> &str {
        &self.name
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn apply(&self, upserts: &[Row], deletes: &[String]) -> Result<()> {
        for row in upserts {
            if row.vector.len() != self.dimension {
                return Err(VectorError::Dimension {
                    collection: self.name.clone(),
                    expected: self.dimension,
                    got: row.vector.len(),
                });
            }
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        // The row count is kept in `meta`, in the same transaction, so `count` is O(1).
        let mut delta: i64 = 0;
        {
            let mut del = tx
                .prepare_cached("DELETE FROM rows WHERE key = ?1")
                .map_err(|e| self.err(e))?;
            for key in deletes {
                delta -= del.execute([key]).map_err(|e| self.err(e))? as i64;
            }
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO rows (key, source, start, end, text, vector, metadata)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|e| self.err(e))?;
            let mut upd = tx
                .prepare_cached(
                    "UPDATE rows SET source = ?2, start = ?3, end = ?4, text = ?5, vector = ?6,
                       metadata = ?7
                     WHERE key = ?1",
                )
                .map_err(|e| self.err(e))?;
            let mut buf = Vec::with_capacity(self.dimension * 4);
            for row in upserts {
                encode_vector_into(&row.vector, &mut buf);
                let metadata = row.payload.metadata.as_ref().map(|m| m.to_string());
                let values = params![
                    row.key,
                    row.payload.source,
                    row.payload.range[0] as i64,
                    row.payload.range[1] as i64,
                    row.payload.text,
                    buf,
                    metadata,
                ];
                if ins.execute(values).map_err(|e| self.err(e))? == 1 {
                    delta += 1;
                } else {
                    upd.execute(values).map_err(|e| self.err(e))?;
                }
            }
            if delta != 0 {
                tx.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + ?1 WHERE key = 'rows'",
                    [delta],
                )
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn search(&self, vector: &[f32], k: usize, filter: Option<&Filter>) -> Result<Vec<SearchHit>> {
        if vector.len() != self.dimension {
            return Err(VectorError::Dimension {
                collection: self.name.clone(),
                expected: self.dimension,
                got: vector.len(),
            });
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let conn = self.conn();
        // `k` comes from users: never let it size an allocation beyond what can be returned.
        let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(k.min(1024) + 1);
        {
            let (sql, prefix) = match filter.and_then(|f| f.source_prefix.as_deref()) {
                Some(p) => (
                    "SELECT id, vector FROM rows WHERE substr(source, 1, length(?1)) = ?1",
                    Some(p),
                ),
                None => ("SELECT id, vector FROM rows", None),
            };
            let mut stmt = conn.prepare_cached(sql).map_err(|e| self.err(e))?;
            let mut rows = match prefix {
                Some(p) => stmt.query([p]),
                None => stmt.query([]),
            }
            .map_err(|e| self.err(e))?;
            while let Some(r) = rows.next().map_err(|e| self.err(e))? {
                let id: i64 = r.get(0).map_err(|e| self.err(e))?;
                let bytes = r.get_ref(1).map_err(|e| self.err(e))?;
                let bytes = bytes.as_blob().map_err(|e| self.err(e))?;
                let v = self.decode(bytes)?;
                heap.push(Scored {
                    score: cosine(vector, &v),
                    id,
                });
                if heap.len() > k {
                    heap.pop();
                }
            }
        }
        let mut best = heap.into_vec();
        best.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        let mut stmt = conn
            .prepare_cached(
                "SELECT key, source, start, end, text, metadata FROM rows WHERE id = ?1",
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(best.len());
        for s in best {
            let hit = stmt
                .query_row([s.id], |r| {
                    Ok(SearchHit {
                        key: r.get(0)?,
                        score: s.score,
                        payload: RowPayload {
                            source: r.get(1)?,
                            range: [r.get::<_, i64>(2)? as usize, r.get::<_, i64>(3)? as usize],
                            text: r.get(4)?,
                            metadata: parse_metadata(r.get(5)?),
                        },
                    })
                })
                .map_err(|e| self.err(e))?;
            out.push(hit);
        }
        Ok(out)
    }

    fn count(&self) -> Result<u64> {
        self.conn()
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rows'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    fn scan(&self, visit: &mut dyn FnMut(Row) -> Result<()>) -> Result<()> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT key, source, start, end, text, vector, metadata FROM rows ORDER BY key",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let bytes: Vec<u8> = r.get(5).map_err(|e| self.err(e))?;
            let row = Row {
                key: r.get(0).map_err(|e| self.err(e))?,
                vector: self.decode(&bytes)?,
                payload: RowPayload {
                    source: r.get(1).map_err(|e| self.err(e))?,
                    range: [
                        r.get::<_, i64>(2).map_err(|e| self.err(e))? as usize,
                        r.get::<_, i64>(3).map_err(|e| self.err(e))? as usize,
                    ],
                    text: r.get(4).map_err(|e| self.err(e))?,
                    metadata: parse_metadata(r.get(6).map_err(|e| self.err(e))?),
                },
            };
            visit(row)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, v: [f32; 3], source: &str) -> Row {
        Row {
            key: key.into(),
            vector: v.to_vec(),
            payload: RowPayload {
                source: source.into(),
                range: [0, 1],
                text: key.into(),
                metadata: None,
            },
        }
    }

    #[test]
    fn upsert_delete_search_scan() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("fi-vec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| VectorError::Storage {
            collection: "t".into(),
            message: e.to_string(),
        })?;
        let path = dir.join("t.sqlite");
        let c = SqliteCollection::open(&path, "t", Some(3))?;
        c.upsert(&[
            row("a", [1.0, 0.0, 0.0], "x/1"),
            row("b", [0.0, 1.0, 0.0], "y/2"),
            row("c", [0.7, 0.7, 0.0], "x/3"),
        ])?;
        assert_eq!(c.count()?, 3);
        let hits = c.search(&[1.0, 0.1, 0.0], 2, None)?;
        assert_eq!(
            hits.iter().map(|h| h.key.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        let f = Filter {
            source_prefix: Some("y/".into()),
        };
        let hits = c.search(&[1.0, 0.1, 0.0], 5, Some(&f))?;
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].key, "b");
        // Upsert replaces; delete is idempotent.
        c.apply(
            &[row("a", [0.0, 0.0, 1.0], "x/1")],
            &["b".into(), "zz".into()],
        )?;
        c.delete(&["b".into()])?;
        let mut keys = Vec::new();
        c.scan(&mut |r| {
            keys.push((r.key, r.vector));
            Ok(())
        })?;
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], ("a".to_string(), vec![0.0, 0.0, 1.0]));
        // Durable: reopen sees the same rows; a wrong dimension is refused.
        drop(c);
        let c = SqliteCollection::open(&path, "t", None)?;
        assert_eq!(c.count()?, 2);
        assert!(matches!(
            c.upsert(&[Row {
                key: "d".into(),
                vector: vec![1.0],
                payload: RowPayload {
                    source: "s".into(),
                    range: [0, 0],
                    text: String::new(),
                    metadata: None
                }
            }]),
            Err(VectorError::Dimension { .. })
        ));
        assert!(matches!(
            SqliteCollection::open(&dir.join("missing.sqlite"), "missing", None),
            Err(VectorError::NotFound(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
