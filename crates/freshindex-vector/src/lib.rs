//! Vector collections: the built-in target of a flow.
//!
//! A collection holds rows (key, vector, payload) of one dimension and answers top-k searches
//! under a metric. [`VectorCollection`] is the API every collection implementation keeps;
//! [`SqliteCollection`] is the first one: durable on disk (one SQLite file per collection, every
//! `apply` one durable transaction) with exact search. No threads of its own.

pub mod ann;
pub mod segmented;
mod sqlite;
pub mod wal;

use std::path::{Path, PathBuf};

pub use freshindex_core::{Row, RowPayload};
pub use segmented::{SegmentOptions, SegmentStats, SegmentedCollection};
pub use sqlite::SqliteCollection;

/// Errors of collections.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    /// Storage failed.
    #[error("collection `{collection}`: {message}")]
    Storage {
        /// Collection name.
        collection: String,
        /// What failed.
        message: String,
    },
    /// A vector of the wrong dimension.
    #[error("collection `{collection}`: vector of dimension {got} where {expected} is required")]
    Dimension {
        /// Collection name.
        collection: String,
        /// The collection's dimension.
        expected: usize,
        /// The offered dimension.
        got: usize,
    },
    /// No such collection.
    #[error("no collection named `{0}`")]
    NotFound(String),
    /// An ANN index could not be built, saved, opened or searched.
    #[error("index: {0}")]
    Index(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, VectorError>;

/// How similarity is scored; every score is "higher is closer".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Cosine similarity.
    Cosine,
    /// Inner product (for vectors normalised by the model, the same ranking as cosine).
    Dot,
    /// Euclidean: the score is minus the squared distance.
    L2,
}

/// A payload condition for search.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// Only rows whose source starts with this prefix.
    pub source_prefix: Option<String>,
}

impl Filter {
    /// Whether a row's payload passes.
    pub fn matches(&self, payload: &RowPayload) -> bool {
        self.source_prefix
            .as_deref()
            .is_none_or(|p| payload.source.starts_with(p))
    }
}

/// One search result.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    /// Row key.
    pub key: String,
    /// Similarity score under the collection's metric.
    pub score: f32,
    /// The row's payload.
    pub payload: RowPayload,
}

/// The API every collection implementation keeps.
pub trait VectorCollection: Send + Sync {
    /// Collection name.
    fn name(&self) -> &str;
    /// Vector dimension.
    fn dimension(&self) -> usize;
    /// Upserts `upserts` and deletes `deletes` (by key) in one durable, atomic step. Both are
    /// idempotent: re-applying the same call after a crash leaves the same contents.
    fn apply(&self, upserts: &[Row], deletes: &[String]) -> Result<()>;
    /// Upserts rows by key.
    fn upsert(&self, rows: &[Row]) -> Result<()> {
        self.apply(rows, &[])
    }
    /// Deletes rows by key; unknown keys are ignored.
    fn delete(&self, keys: &[String]) -> Result<()> {
        self.apply(&[], keys)
    }
    /// The `k` rows closest to `vector` that pass `filter`, best first.
    fn search(&self, vector: &[f32], k: usize, filter: Option<&Filter>) -> Result<Vec<SearchHit>>;
    /// Number of rows.
    fn count(&self) -> Result<u64>;
    /// Every row, in key order.
    fn scan(&self, visit: &mut dyn FnMut(Row) -> Result<()>) -> Result<()>;
}

/// The folder of a data directory's collections.
#[derive(Clone, Debug)]
pub struct Collections {
    dir: PathBuf,
}

impl Collections {
    /// Collections stored under `dir` (created on first use).
    pub fn new(dir: &Path) -> Collections {
        Collections {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sqlite"))
    }

    /// Opens the collection `name`, creating it with `dimension` if it does not exist.
    pub fn open_or_create(&self, name: &str, dimension: usize) -> Result<SqliteCollection> {
        std::fs::create_dir_all(&self.dir).map_err(|e| VectorError::Storage {
            collection: name.into(),
            message: format!("cannot create {}: {e}", self.dir.display()),
        })?;
        SqliteCollection::open(&self.path(name), name, Some(dimension))
    }

    /// Removes the collection's files (the database and its journal files). The caller makes
    /// sure nothing has it open. Returns whether it existed.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let path = self.path(name);
        let existed = path.exists();
        // Journal files first: a crash part-way must not leave a journal that SQLite would
        // replay into a new collection created at the same path.
        for suffix in ["-wal", "-journal", "-shm", ""] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(VectorError::Storage {
                        collection: name.into(),
                        message: format!("cannot remove {}: {e}", PathBuf::from(p).display()),
                    });
                }
            }
        }
        Ok(existed)
    }

    /// Opens an existing collection.
    pub fn open(&self, name: &str) -> Result<SqliteCollection> {
        let path = self.path(name);
        if !path.exists() {
            return Err(VectorError::NotFound(name.into()));
        }
        SqliteCollection::open(&path, name, None)
    }
}

/// Cosine similarity of two vectors of equal length (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Encodes a vector as little-endian f32 bytes.
pub fn encode_vector(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_vector_into(v, &mut out);
    out
}

/// Encodes a vector into `out` (cleared first), reusing its allocation.
pub fn encode_vector_into(v: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.resize(v.len() * 4, 0);
    // Fixed-size chunks let the compiler turn this into plain (vectorized) copies.
    for (dst, x) in out.chunks_exact_mut(4).zip(v) {
        dst.copy_from_slice(&x.to_le_bytes());
    }
}

/// Decodes little-endian f32 bytes; `None` when the length is not a multiple of 4.
pub fn decode_vector(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}
