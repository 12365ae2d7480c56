//! Vector collections: the built-in target of a flow.
//!
//! A collection holds rows (key, vector, payload) of one dimension and answers top-k searches
//! under a metric. [`VectorCollection`] is the API every collection implementation keeps.
//! [`SegmentedCollection`] is the one flows write to: segments, an append log, HNSW indexes
//! on sealed segments. [`SqliteCollection`] (one SQLite file, exact search) is the earlier
//! format, still read, and migrated by [`Collections`] on first write. [`PgTable`] keeps the
//! same API over a table of a PostgreSQL database (a flow's `postgres` target). No threads of
//! their own.

pub mod ann;
pub mod postgres;
pub mod segmented;
mod sqlite;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use freshindex_core::{Row, RowPayload};
pub use postgres::{Ensured, PgTable, VectorColumn};
#[cfg(feature = "hnsw")]
pub use segmented::build_segment_index;
pub use segmented::{SegmentInfo, SegmentOptions, SegmentStats, SegmentedCollection};
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
    /// Another process has the collection open for writing.
    #[error("collection `{collection}`: {message}")]
    Locked {
        /// Collection name.
        collection: String,
        /// Who holds it, and what to do.
        message: String,
    },
    /// A write to a collection opened read-only.
    #[error("collection `{0}` is open read-only here")]
    ReadOnly(String),
    /// An ANN index could not be built, saved, opened or searched.
    #[error("index: {0}")]
    Index(String),
    /// A PostgreSQL table target failed (connection, shape, dimension, a statement).
    #[error("PostgreSQL table `{table}` at {endpoint}: {message}")]
    Postgres {
        /// The table, as configured.
        table: String,
        /// `host:port/dbname` (never credentials).
        endpoint: String,
        /// The table does not fit the flow (shape, dimension, name, connection string): the
        /// user must fix it, and trying again unchanged fails again.
        user: bool,
        /// What failed.
        message: String,
    },
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

/// The folder of a data directory's collections: one [`SegmentedCollection`] folder per
/// collection. A collection still in the older one-file SQLite format (`NAME.sqlite`) is
/// migrated when it is first opened for writing.
#[derive(Clone, Debug)]
pub struct Collections {
    dir: PathBuf,
    opts: SegmentOptions,
    /// The aliases file as last read: (its modification stamp, alias → collection).
    aliases: std::sync::Arc<std::sync::Mutex<AliasCache>>,
}

type AliasStamp = (std::time::SystemTime, u64);
type AliasCache = (Option<AliasStamp>, BTreeMap<String, String>);

/// Checks a collection or alias name: 1 to 128 of `A-Z a-z 0-9 _ - .`, not starting with a
/// dot, and not ending like the files the folder keeps beside collections.
pub fn check_collection_name(what: &str, name: &str) -> std::result::Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 128 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "{what}: `{name}` is not a valid name (1 to 128 of A-Z a-z 0-9 _ - ., not starting with a dot)"
        ));
    }
    if name.ends_with(".sqlite") || name.ends_with(".migrating") {
        return Err(format!(
            "{what}: `{name}` ends like a file the collections folder keeps"
        ));
    }
    Ok(())
}

impl Collections {
    /// Collections stored under `dir` (created on first use), with default segment options.
    pub fn new(dir: &Path) -> Collections {
        Collections::with_options(dir, SegmentOptions::default())
    }

    /// Collections stored under `dir`, laid out and indexed by `opts`.
    pub fn with_options(dir: &Path, opts: SegmentOptions) -> Collections {
        Collections {
            dir: dir.to_path_buf(),
            opts,
            aliases: Default::default(),
        }
    }

    fn aliases_path(&self) -> PathBuf {
        self.dir.join(".aliases.json")
    }

    /// Every alias and the collection it names (read again when another process changed
    /// the file).
    pub fn aliases(&self) -> Result<BTreeMap<String, String>> {
        let path = self.aliases_path();
        let stamp = match std::fs::metadata(&path) {
            Ok(m) => Some((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Self::storage(
                    ".aliases",
                    format!("{}: {e}", path.display()),
                ));
            }
        };
        let mut cache = self.aliases.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != stamp || stamp.is_none() {
            let map = match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| Self::storage(".aliases", format!("{}: {e}", path.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => {
                    return Err(Self::storage(
                        ".aliases",
                        format!("{}: {e}", path.display()),
                    ));
                }
            };
            *cache = (stamp, map);
        }
        Ok(cache.1.clone())
    }

    /// The collection `name` stands for: the target of an alias of that name, else `name`.
    pub fn resolve(&self, name: &str) -> Result<String> {
        Ok(self
            .aliases()?
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string()))
    }

    fn exists(&self, name: &str) -> bool {
        self.folder(name).join("MANIFEST").exists() || self.legacy(name).exists()
    }

    /// Points alias `alias` at `collection`, atomically (one rename): a search through the
    /// alias reads the old collection or the new one, never neither. Returns the collection
    /// it named before.
    pub fn set_alias(&self, alias: &str, collection: &str) -> Result<Option<String>> {
        let invalid = |m: String| Self::storage(alias, m);
        check_collection_name("alias", alias).map_err(invalid)?;
        if self.exists(alias) {
            return Err(invalid(format!(
                "alias: a collection is named `{alias}`; an alias cannot hide it"
            )));
        }
        let mut map = self.aliases()?;
        if map.contains_key(collection) {
            return Err(invalid(format!(
                "collection: `{collection}` is an alias; point `{alias}` at a collection"
            )));
        }
        if !self.exists(collection) {
            return Err(VectorError::NotFound(collection.into()));
        }
        let old = map.insert(alias.into(), collection.into());
        self.write_aliases(&map)?;
        Ok(old)
    }

    /// Turns collection `name` into an alias of `target`, moving its own folder to `move_to`.
    /// The alias is written first — names resolve through aliases first — and the folder
    /// moves after, so a reader of `name` finds the old collection or `target`, never
    /// neither. The caller closes its own handle of `name` first. Called again after a crash
    /// between the two steps, it finishes the move.
    pub fn replace_with_alias(&self, name: &str, target: &str, move_to: &str) -> Result<()> {
        check_collection_name("collection", move_to).map_err(|m| Self::storage(move_to, m))?;
        if !self.exists(target) {
            return Err(VectorError::NotFound(target.into()));
        }
        if self.legacy(name).exists() {
            return Err(Self::storage(
                name,
                "collection: still in the one-file format; write to it once to migrate it".into(),
            ));
        }
        let mut map = self.aliases()?;
        if map.contains_key(target) {
            return Err(Self::storage(
                target,
                format!("collection: `{target}` is an alias"),
            ));
        }
        if map.get(name).map(String::as_str) != Some(target) {
            map.insert(name.into(), target.into());
            self.write_aliases(&map)?;
        }
        let (from, to) = (self.folder(name), self.folder(move_to));
        if from.exists() {
            if to.exists() {
                return Err(Self::storage(
                    move_to,
                    format!("cannot move `{name}` here: {} exists", to.display()),
                ));
            }
            std::fs::rename(&from, &to).map_err(|e| {
                Self::storage(
                    name,
                    format!("moving {} to {}: {e}", from.display(), to.display()),
                )
            })?;
            // The folder's entry in the collections folder is durable.
            wal::sync_dir(&to)?;
        }
        Ok(())
    }

    /// Removes alias `alias`; returns the collection it named.
    pub fn remove_alias(&self, alias: &str) -> Result<Option<String>> {
        let mut map = self.aliases()?;
        let old = map.remove(alias);
        if old.is_some() {
            self.write_aliases(&map)?;
        }
        Ok(old)
    }

    fn write_aliases(&self, map: &BTreeMap<String, String>) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Self::storage(
                ".aliases",
                format!("cannot create {}: {e}", self.dir.display()),
            )
        })?;
        let json =
            serde_json::to_vec_pretty(map).map_err(|e| Self::storage(".aliases", e.to_string()))?;
        segmented::write_durably(&self.aliases_path(), &json)
            .map_err(|e| Self::storage(".aliases", e))?;
        // The next read sees the new file.
        self.aliases.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
        Ok(())
    }

    /// The names of the collections in the folder (not aliases).
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(Self::storage("*", format!("{}: {e}", self.dir.display()))),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".sqlite") {
                names.push(stem.to_string());
            } else if e.path().join("MANIFEST").exists() {
                names.push(name);
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Creates collection `name` with `dimension` and `metric` and opens it for writing; an
    /// existing one of the same shape is opened, another shape is refused.
    pub fn create(
        &self,
        name: &str,
        dimension: usize,
        metric: Metric,
    ) -> Result<SegmentedCollection> {
        check_collection_name("collection", name).map_err(|m| Self::storage(name, m))?;
        if dimension == 0 || dimension > 65_536 {
            return Err(Self::storage(
                name,
                format!("dimension: {dimension} is not in 1..=65536"),
            ));
        }
        if self.aliases()?.contains_key(name) {
            return Err(Self::storage(
                name,
                format!("collection: `{name}` is an alias"),
            ));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Self::storage(name, format!("cannot create {}: {e}", self.dir.display()))
        })?;
        self.migrate(name)?;
        let c = SegmentedCollection::open(
            &self.folder(name),
            name,
            Some((dimension, metric)),
            self.opts.clone(),
        )?;
        if c.metric() != metric {
            return Err(Self::storage(
                name,
                format!("metric: the collection exists with {:?}", c.metric()),
            ));
        }
        Ok(c)
    }

    /// The folder of collection `name`.
    pub fn folder(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn legacy(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sqlite"))
    }

    fn storage(name: &str, message: String) -> VectorError {
        VectorError::Storage {
            collection: name.into(),
            message,
        }
    }

    /// Opens the collection `name` for writing (this process becomes its only writer),
    /// creating it with `dimension` if it does not exist.
    pub fn open_or_create(&self, name: &str, dimension: usize) -> Result<SegmentedCollection> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Self::storage(name, format!("cannot create {}: {e}", self.dir.display()))
        })?;
        self.migrate(name)?;
        SegmentedCollection::open(
            &self.folder(name),
            name,
            Some((dimension, Metric::Cosine)),
            self.opts.clone(),
        )
    }

    /// Opens an existing collection for writing (migrating one in the older format).
    pub fn open_writable(&self, name: &str) -> Result<SegmentedCollection> {
        if !self.folder(name).join("MANIFEST").exists() && !self.legacy(name).exists() {
            return Err(VectorError::NotFound(name.into()));
        }
        self.migrate(name)?;
        SegmentedCollection::open(&self.folder(name), name, None, self.opts.clone())
    }

    /// A read-only snapshot of segmented collection `name` (with its segment statistics);
    /// `None` for a collection still in the one-file format.
    pub fn open_snapshot(&self, name: &str) -> Result<Option<SegmentedCollection>> {
        let folder = self.folder(name);
        if folder.join("MANIFEST").exists() {
            return SegmentedCollection::open_read_only(&folder, name, self.opts.clone()).map(Some);
        }
        if self.legacy(name).exists() {
            return Ok(None);
        }
        Err(VectorError::NotFound(name.into()))
    }

    /// Opens an existing collection to read it, without writing anything: usable while
    /// another process has it open for writing.
    pub fn open(&self, name: &str) -> Result<Box<dyn VectorCollection>> {
        let folder = self.folder(name);
        if folder.join("MANIFEST").exists() {
            return Ok(Box::new(SegmentedCollection::open_read_only(
                &folder,
                name,
                self.opts.clone(),
            )?));
        }
        let legacy = self.legacy(name);
        if legacy.exists() {
            return Ok(Box::new(SqliteCollection::open(&legacy, name, None)?));
        }
        Err(VectorError::NotFound(name.into()))
    }

    /// Converts a one-file SQLite collection into a segmented one. Crash-safe: the new
    /// collection is built in `NAME.migrating` and renamed into place before the old file is
    /// removed; a migration cut short starts over.
    fn migrate(&self, name: &str) -> Result<()> {
        let legacy = self.legacy(name);
        let folder = self.folder(name);
        if !legacy.exists() {
            return Ok(());
        }
        // One migration at a time across processes; the loser finds it done.
        let lock_path = self.dir.join(format!(".migrate-{name}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|e| Self::storage(name, format!("{}: {e}", lock_path.display())))?;
        if !folder.join("MANIFEST").exists() {
            let old = SqliteCollection::open(&legacy, name, None)?;
            let tmp = self.dir.join(format!("{name}.migrating"));
            let fs = |what: &str, p: &Path, e: std::io::Error| {
                Self::storage(name, format!("migrating: {what} {}: {e}", p.display()))
            };
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| fs("removing", &tmp, e))?;
            }
            let opts = SegmentOptions {
                build_at_seal: false,
                ..self.opts.clone()
            };
            let new = SegmentedCollection::open(
                &tmp,
                name,
                Some((old.dimension(), Metric::Cosine)),
                opts,
            )?;
            let mut batch = Vec::with_capacity(1024);
            old.scan(&mut |row| {
                batch.push(row);
                if batch.len() == 1024 {
                    new.upsert(&batch)?;
                    batch.clear();
                }
                Ok(())
            })?;
            new.upsert(&batch)?;
            new.seal()?;
            drop(new);
            drop(old);
            if folder.exists() {
                // Only a lock file can be there (a failed open): nothing to keep, unless a
                // handle holds it.
                let held = segmented::lock_dir(&folder, name)?;
                std::fs::remove_dir_all(&folder).map_err(|e| fs("removing", &folder, e))?;
                drop(held);
            }
            std::fs::rename(&tmp, &folder).map_err(|e| fs("renaming", &tmp, e))?;
            wal::sync_dir(&folder)?;
        }
        remove_sqlite_files(&legacy, name)?;
        drop(lock);
        let _ = std::fs::remove_file(&lock_path);
        Ok(())
    }

    /// Removes the collection's files. Fails when another handle has it open for writing.
    /// Returns whether it existed.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let folder = self.folder(name);
        let legacy = self.legacy(name);
        let mut existed = legacy.exists();
        remove_sqlite_files(&legacy, name)?;
        if folder.exists() {
            existed |= folder.join("MANIFEST").exists();
            // Holding the lock proves no handle writes it; the manifest goes first, so a
            // removal cut short leaves no collection behind, only files.
            let lock = segmented::lock_dir(&folder, name)?;
            let gone = |e: std::io::Error| {
                Self::storage(name, format!("cannot remove {}: {e}", folder.display()))
            };
            match std::fs::remove_file(folder.join("MANIFEST")) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(gone(e)),
            }
            // Moved aside while still locked: a collection created under the name meanwhile
            // gets a folder of its own, which this removal never touches.
            let aside = self
                .dir
                .join(format!(".removing-{name}-{}", std::process::id()));
            std::fs::rename(&folder, &aside).map_err(gone)?;
            drop(lock);
            std::fs::remove_dir_all(&aside).map_err(gone)?;
        }
        Ok(existed)
    }
}

/// Removes a SQLite collection file, its journal files first: a crash part-way must not leave
/// a journal that SQLite would replay into a new collection created at the same path.
fn remove_sqlite_files(path: &Path, name: &str) -> Result<()> {
    for suffix in ["-wal", "-journal", "-shm", ""] {
        let mut p = path.to_path_buf().into_os_string();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Collections::storage(
                    name,
                    format!("cannot remove {}: {e}", PathBuf::from(p).display()),
                ));
            }
        }
    }
    Ok(())
}

/// The exact score of `row` for the query `q` under `metric` ("higher is closer"): what every
/// exact search scores with, so that targets of one flow rank alike.
pub fn exact_score(metric: Metric, q: &[f32], row: &[f32]) -> f32 {
    segmented::exact_score(metric, q, row)
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
