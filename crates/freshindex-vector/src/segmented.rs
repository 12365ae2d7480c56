//! A collection stored in segments: the scalable successor of the SQLite collection.
//!
//! Writes land in the **growing segment**, in memory and in an [`AppendLog`] (one fsynced
//! record per [`VectorCollection::apply`]: the commit). When it holds `seal_rows` rows it is
//! **sealed**: written to an immutable segment file, indexed (HNSW, when the `hnsw` feature is
//! on and `index` is set), and the log starts a new generation. Deletes of sealed rows are
//! tombstones: in the log until the next seal, then in the segment's `.del` file. An update is
//! a delete plus an insert. Search is exact on the growing segment and on sealed segments
//! without an index, uses the index on the others (tombstones and payload filters applied
//! inside the graph search), and merges the global top k. [`SegmentedCollection::compact`]
//! rewrites segments whose share of tombstones passed `compact_ratio`.
//!
//! Files in the collection's folder:
//! - `MANIFEST`: JSON — dimension, metric, the log's generation, the sealed segments. It is
//!   replaced atomically (write, fsync, rename, fsync the folder): the commit point of a seal
//!   and of a compaction. Files it does not name are left over from one cut short, and are
//!   removed on open.
//! - `wal-GEN.log`: the growing segment's append log.
//! - `seg-ID.dat`: a sealed segment — a header, the vectors as one block of little-endian
//!   f32, then each row's key and payload (JSON), and a BLAKE3 checksum of all of it.
//! - `seg-ID.del`: the positions of deleted rows of segment ID.
//! - `seg-ID.hnsw`: its index.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use crate::ann::HnswParams;
#[cfg(feature = "hnsw")]
use crate::ann::{AnnIndex, HnswIndex};
use crate::wal::{AppendLog, sync_dir};
use crate::{Filter, Metric, Result, Row, RowPayload, SearchHit, VectorCollection, VectorError};

/// A filtered search scores a segment exactly when at most this many of its rows (or a tenth
/// of them) pass the filter.
const EXACT_BELOW: usize = 2_000;

/// Segment file magic, version 1.
const SEG_MAGIC: &[u8; 8] = b"FISEG001";

/// How a segmented collection is laid out and indexed.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentOptions {
    /// The growing segment is sealed when it holds this many rows.
    pub seal_rows: usize,
    /// A sealed segment is rewritten by [`SegmentedCollection::compact`] once this share of
    /// its rows is deleted.
    pub compact_ratio: f64,
    /// The index sealed segments get (`None`: exact search only).
    pub index: Option<HnswParams>,
    /// Build a sealed segment's index during the seal itself (holding writes meanwhile).
    /// Without it, sealed segments are searched exactly until an index built elsewhere is
    /// attached with [`SegmentedCollection::attach_index`] (what the index service does).
    pub build_at_seal: bool,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            seal_rows: 50_000,
            compact_ratio: 0.3,
            index: Some(HnswParams::default()),
            build_at_seal: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SegmentEntry {
    id: u64,
    rows: u64,
    /// Whether `seg-ID.hnsw` exists.
    indexed: bool,
    /// The search breadth its index was attached with (the collection's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ef_search: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    dimension: usize,
    metric: Metric,
    generation: u64,
    next_segment: u64,
    segments: Vec<SegmentEntry>,
}

struct Sealed {
    id: u64,
    keys: Vec<String>,
    vectors: Vec<f32>,
    payloads: Vec<RowPayload>,
    deleted: Vec<bool>,
    live: usize,
    #[cfg(feature = "hnsw")]
    index: Option<HnswIndex>,
}

impl Sealed {
    fn vector(&self, row: usize, dim: usize) -> &[f32] {
        &self.vectors[row * dim..(row + 1) * dim]
    }
}

struct State {
    manifest: Manifest,
    /// `None` when opened read-only.
    wal: Option<AppendLog>,
    growing: BTreeMap<String, (Vec<f32>, RowPayload)>,
    sealed: Vec<Sealed>,
    /// Live rows of sealed segments: key → (position in `sealed`, row).
    loc: HashMap<String, (usize, usize)>,
    /// Segments with deletions that only the log holds so far.
    dirty: BTreeSet<u64>,
}

/// A segmented collection (see the module documentation).
pub struct SegmentedCollection {
    name: String,
    dir: PathBuf,
    dimension: usize,
    metric: Metric,
    opts: SegmentOptions,
    state: RwLock<State>,
    /// The exclusive lock on `LOCK` a writable handle holds for its lifetime (`None`:
    /// read-only).
    lock: Option<std::fs::File>,
    /// Set when a manifest write failed part-way: what is on disk may no longer be what this
    /// handle holds, so it takes no more writes (reopening reads what is on disk).
    broken: std::sync::atomic::AtomicBool,
}

/// A sealed segment, for the index service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentInfo {
    /// Segment id (unique within the collection, never reused).
    pub id: u64,
    /// Rows the segment file holds (deleted ones included).
    pub rows: u64,
    /// Rows not deleted.
    pub live: u64,
    /// Whether an index serves it.
    pub indexed: bool,
    /// The segment file (immutable once sealed).
    pub data_path: PathBuf,
}

impl std::fmt::Debug for SegmentedCollection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentedCollection")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

/// Where a segmented collection's rows are, for status pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentStats {
    /// Rows in the growing segment.
    pub growing_rows: u64,
    /// Sealed segments.
    pub sealed_segments: u64,
    /// Live rows in sealed segments with an index.
    pub indexed_rows: u64,
    /// Live rows in sealed segments without one yet.
    pub unindexed_rows: u64,
    /// Deleted rows sealed segments still hold (until compaction).
    pub tombstones: u64,
}

/// Lanes of the exact scorer: independent partial sums the compiler keeps in vector
/// registers (one running sum would force it to add one product at a time).
const LANES: usize = 16;

/// Sums `f(x, y)` over pairs, in `LANES` partial sums.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += f(*x, *y);
    }
    sum
}

/// The exact score of `row` for a query `q` (see [`crate::exact_score`]).
pub(crate) fn exact_score(metric: Metric, q: &[f32], row: &[f32]) -> f32 {
    score_with(metric, q, lane_sum(q, q, |x, y| x * y).sqrt(), row)
}

/// The exact score of `row` for a query `q` whose norm is `q_norm`.
fn score_with(metric: Metric, q: &[f32], q_norm: f32, row: &[f32]) -> f32 {
    match metric {
        Metric::Cosine => {
            let dot = lane_sum(q, row, |x, y| x * y);
            let norm = lane_sum(row, row, |x, y| x * y).sqrt();
            if q_norm == 0.0 || norm == 0.0 {
                0.0
            } else {
                dot / (q_norm * norm)
            }
        }
        Metric::Dot => lane_sum(q, row, |x, y| x * y),
        Metric::L2 => -lane_sum(q, row, |x, y| (x - y) * (x - y)),
    }
}

// Little-endian encoding helpers for log records and segment files.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Some(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(b))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn f32s(&mut self, n: usize, out: &mut Vec<f32>) -> Option<()> {
        let b = self.take(n.checked_mul(4)?)?;
        out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Some(())
    }
}

fn encode_payload(p: &RowPayload) -> Result<String> {
    serde_json::to_string(p).map_err(|e| VectorError::Storage {
        collection: p.source.clone(),
        message: format!("encoding a payload: {e}"),
    })
}

/// One `apply` as a log record.
fn encode_apply(upserts: &[Row], deletes: &[String]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(&(upserts.len() as u32).to_le_bytes());
    for r in upserts {
        put_str(&mut out, &r.key);
        for x in &r.vector {
            out.extend_from_slice(&x.to_le_bytes());
        }
        put_str(&mut out, &encode_payload(&r.payload)?);
    }
    out.extend_from_slice(&(deletes.len() as u32).to_le_bytes());
    for k in deletes {
        put_str(&mut out, k);
    }
    Ok(out)
}

fn decode_apply(bytes: &[u8], dim: usize) -> Option<(Vec<Row>, Vec<String>)> {
    let mut r = Reader { bytes, at: 0 };
    let n = r.u32()? as usize;
    let mut upserts = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let key = r.str()?.to_string();
        let mut vector = Vec::with_capacity(dim);
        r.f32s(dim, &mut vector)?;
        let payload = serde_json::from_str(r.str()?).ok()?;
        upserts.push(Row {
            key,
            vector,
            payload,
        });
    }
    let n = r.u32()? as usize;
    let mut deletes = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        deletes.push(r.str()?.to_string());
    }
    (r.at == bytes.len()).then_some((upserts, deletes))
}

impl SegmentedCollection {
    fn err(&self, message: impl Into<String>) -> VectorError {
        VectorError::Storage {
            collection: self.name.clone(),
            message: message.into(),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Opens the collection in folder `dir` for writing, creating it with `create`
    /// (dimension, metric) when the folder has none. Takes the folder's lock (one writing
    /// handle per collection, across processes), replays the log (dropping a torn tail) and
    /// removes files a seal or compaction cut short left behind.
    pub fn open(
        dir: &Path,
        name: &str,
        create: Option<(usize, Metric)>,
        opts: SegmentOptions,
    ) -> Result<SegmentedCollection> {
        let storage = |m: String| VectorError::Storage {
            collection: name.into(),
            message: m,
        };
        if create.is_none() && !dir.join("MANIFEST").exists() {
            return Err(VectorError::NotFound(name.into()));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("creating {}: {e}", dir.display())))?;
        let lock = lock_dir(dir, name)?;
        let manifest = match read_manifest(dir, name)? {
            Some(m) => m,
            None => {
                let Some((dimension, metric)) = create else {
                    return Err(VectorError::NotFound(name.into()));
                };
                let m = Manifest {
                    format: 1,
                    dimension,
                    metric,
                    generation: 1,
                    next_segment: 1,
                    segments: Vec::new(),
                };
                AppendLog::create(&dir.join("wal-1.log"), 1)?;
                write_manifest(dir, &m).map_err(storage)?;
                m
            }
        };
        if let Some((d, _)) = create
            && d != manifest.dimension
        {
            return Err(VectorError::Dimension {
                collection: name.into(),
                expected: manifest.dimension,
                got: d,
            });
        }
        let wal_path = dir.join(format!("wal-{}.log", manifest.generation));
        let (wal, replay) = AppendLog::open(&wal_path)?;
        if let Some(t) = &replay.torn {
            tracing_warn(
                name,
                &format!(
                    "dropped a torn tail of the log at byte {} ({} bytes: {})",
                    t.offset, t.dropped, t.why
                ),
            );
        }
        let mut c = SegmentedCollection::empty(dir, name, &manifest, opts, Some(wal), Some(lock));
        c.remove_leftovers(&manifest)?;
        c.load(&manifest, &replay.records)?;
        Ok(c)
    }

    /// Opens a snapshot of the collection without writing anything, while another process
    /// may hold it open for writing: the manifest, the segments it names and the log's
    /// intact records (a torn tail may be an append in progress). When a writer replaced
    /// files meanwhile, it reads again.
    pub fn open_read_only(
        dir: &Path,
        name: &str,
        opts: SegmentOptions,
    ) -> Result<SegmentedCollection> {
        let mut attempt = 0;
        loop {
            let Some(manifest) = read_manifest(dir, name)? else {
                return Err(VectorError::NotFound(name.into()));
            };
            let loaded = (|| {
                // Segments (and their tombstone files) first, the log after: every deletion a
                // `.del` file holds is then also in the log read, whose insertions come with it.
                let mut c =
                    SegmentedCollection::empty(dir, name, &manifest, opts.clone(), None, None);
                c.load_segments(&manifest)?;
                let wal_path = dir.join(format!("wal-{}.log", manifest.generation));
                let replay = AppendLog::read(&wal_path)?;
                c.replay(&manifest, &replay.records)?;
                Ok(c)
            })();
            attempt += 1;
            if attempt < 20 && read_manifest(dir, name)?.as_ref() != Some(&manifest) {
                continue;
            }
            return loaded;
        }
    }

    fn empty(
        dir: &Path,
        name: &str,
        manifest: &Manifest,
        opts: SegmentOptions,
        wal: Option<AppendLog>,
        lock: Option<std::fs::File>,
    ) -> SegmentedCollection {
        SegmentedCollection {
            name: name.into(),
            dir: dir.to_path_buf(),
            dimension: manifest.dimension,
            metric: manifest.metric,
            opts,
            state: RwLock::new(State {
                wal,
                manifest: manifest.clone(),
                growing: BTreeMap::new(),
                sealed: Vec::new(),
                loc: HashMap::new(),
                dirty: BTreeSet::new(),
            }),
            lock,
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Loads the segments `manifest` names and replays the log's `records` over them.
    fn load(&mut self, manifest: &Manifest, records: &[Vec<u8>]) -> Result<()> {
        self.load_segments(manifest)?;
        self.replay(manifest, records)
    }

    fn load_segments(&mut self, manifest: &Manifest) -> Result<()> {
        let mut sealed = Vec::with_capacity(manifest.segments.len());
        for entry in &manifest.segments {
            sealed.push(self.load_segment(entry)?);
        }
        let mut loc = HashMap::new();
        for (si, s) in sealed.iter().enumerate() {
            for (row, key) in s.keys.iter().enumerate() {
                if !s.deleted[row] {
                    loc.insert(key.clone(), (si, row));
                }
            }
        }
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        state.sealed = sealed;
        state.loc = loc;
        Ok(())
    }

    fn replay(&mut self, manifest: &Manifest, records: &[Vec<u8>]) -> Result<()> {
        let dim = self.dimension;
        let wal_path = self.path(&format!("wal-{}.log", manifest.generation));
        let name = self.name.clone();
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (i, rec) in records.iter().enumerate() {
            let (upserts, deletes) =
                decode_apply(rec, dim).ok_or_else(|| VectorError::Storage {
                    collection: name.clone(),
                    message: format!(
                        "{}: record {i} is intact but not a write of this collection",
                        wal_path.display()
                    ),
                })?;
            apply_in_memory(state, upserts, &deletes);
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.lock.is_none() {
            return Err(VectorError::ReadOnly(self.name.clone()));
        }
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(self.err(
                "a manifest write failed earlier; this handle takes no more writes — reopen the collection",
            ));
        }
        Ok(())
    }

    /// Writes the manifest; a failure breaks the handle (see `broken`).
    fn commit_manifest(&self, m: &Manifest) -> Result<()> {
        write_manifest(&self.dir, m).map_err(|e| {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.err(e)
        })
    }

    /// Removes files the manifest does not name (a seal or compaction cut short).
    fn remove_leftovers(&self, m: &Manifest) -> Result<()> {
        let keep: BTreeSet<String> = m
            .segments
            .iter()
            .flat_map(|s| {
                [
                    format!("seg-{}.dat", s.id),
                    format!("seg-{}.del", s.id),
                    format!("seg-{}.hnsw", s.id),
                ]
            })
            .chain([format!("wal-{}.log", m.generation), "MANIFEST".to_string()])
            .collect();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| self.err(format!("listing {}: {e}", self.dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours =
                name.starts_with("seg-") || name.starts_with("wal-") || name.ends_with(".tmp");
            if ours && !keep.contains(&name) {
                std::fs::remove_file(entry.path())
                    .map_err(|e| self.err(format!("removing leftover {name}: {e}")))?;
            }
        }
        Ok(())
    }

    fn load_segment(&self, entry: &SegmentEntry) -> Result<Sealed> {
        let path = self.path(&format!("seg-{}.dat", entry.id));
        let (keys, vectors, payloads) = read_segment(&path, &self.name, Some(self.dimension))?;
        let rows = keys.len();
        if rows as u64 != entry.rows {
            return Err(self.err(format!(
                "{}: {rows} rows where the manifest says {}",
                path.display(),
                entry.rows
            )));
        }
        let mut deleted = vec![false; rows];
        let del_path = self.path(&format!("seg-{}.del", entry.id));
        match std::fs::read(&del_path) {
            Ok(b) => {
                for c in b.chunks_exact(4) {
                    let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
                    if let Some(d) = deleted.get_mut(i) {
                        *d = true;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.err(format!("{}: {e}", del_path.display()))),
        }
        let live = deleted.iter().filter(|d| !**d).count();
        #[cfg(feature = "hnsw")]
        let index = match (entry.indexed, &self.opts.index) {
            (true, Some(p)) => Some(HnswIndex::open(
                &self.path(&format!("seg-{}.hnsw", entry.id)),
                true,
                entry.ef_search.unwrap_or(p.ef_search),
            )?),
            _ => None,
        };
        Ok(Sealed {
            id: entry.id,
            keys,
            vectors,
            payloads,
            deleted,
            live,
            #[cfg(feature = "hnsw")]
            index,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals the growing segment now (when it holds rows).
    pub fn seal(&self) -> Result<()> {
        self.writable()?;
        let mut st = self.write();
        self.seal_locked(&mut st)
    }

    fn seal_locked(&self, st: &mut State) -> Result<()> {
        if st.growing.is_empty() && st.dirty.is_empty() {
            return Ok(());
        }
        let mut m = st.manifest.clone();
        let rows: Vec<(String, Vec<f32>, RowPayload)> = st
            .growing
            .iter()
            .map(|(k, (v, p))| (k.clone(), v.clone(), p.clone()))
            .collect();
        let new = if rows.is_empty() {
            None
        } else {
            let id = m.next_segment;
            m.next_segment += 1;
            let sealed = self.write_segment(id, rows)?;
            m.segments.push(SegmentEntry {
                id,
                rows: sealed.keys.len() as u64,
                indexed: has_index(&sealed),
                ef_search: None,
            });
            Some(sealed)
        };
        for s in st.sealed.iter().filter(|s| st.dirty.contains(&s.id)) {
            self.write_deletions(s)?;
        }
        freshindex_core::failpoint::hit("seal-written");
        m.generation += 1;
        let wal = AppendLog::create(
            &self.path(&format!("wal-{}.log", m.generation)),
            m.generation,
        )?;
        self.commit_manifest(&m)?;
        // Committed: the old log is replaced.
        let _ = std::fs::remove_file(self.path(&format!("wal-{}.log", st.manifest.generation)));
        st.manifest = m;
        st.wal = Some(wal);
        st.dirty.clear();
        st.growing.clear();
        if let Some(s) = new {
            let si = st.sealed.len();
            for (row, key) in s.keys.iter().enumerate() {
                st.loc.insert(key.clone(), (si, row));
            }
            st.sealed.push(s);
        }
        Ok(())
    }

    /// Writes `seg-ID.dat` (and its index) for `rows`, durably, and returns it loaded.
    fn write_segment(&self, id: u64, rows: Vec<(String, Vec<f32>, RowPayload)>) -> Result<Sealed> {
        let dim = self.dimension;
        let mut out = Vec::with_capacity(rows.len() * (dim * 4 + 128));
        out.extend_from_slice(SEG_MAGIC);
        out.extend_from_slice(&(rows.len() as u64).to_le_bytes());
        out.extend_from_slice(&(dim as u32).to_le_bytes());
        for (_, v, _) in &rows {
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let mut keys = Vec::with_capacity(rows.len());
        let mut vectors = Vec::with_capacity(rows.len() * dim);
        let mut payloads = Vec::with_capacity(rows.len());
        for (k, v, p) in rows {
            put_str(&mut out, &k);
            put_str(&mut out, &encode_payload(&p)?);
            keys.push(k);
            vectors.extend_from_slice(&v);
            payloads.push(p);
        }
        let sum = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&sum);
        write_durably(&self.path(&format!("seg-{id}.dat")), &out).map_err(|e| self.err(e))?;
        let n = keys.len();
        #[cfg(feature = "hnsw")]
        let index = match &self.opts.index {
            Some(params) if n > 0 && self.opts.build_at_seal => {
                let pairs: Vec<(u64, &[f32])> = (0..n)
                    .map(|i| (i as u64, &vectors[i * dim..(i + 1) * dim]))
                    .collect();
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let path = self.path(&format!("seg-{id}.hnsw"));
                let built = HnswIndex::build(dim, self.metric, params, &pairs, threads)
                    .and_then(|b| b.save(&path))
                    .and_then(|()| {
                        std::fs::File::open(&path)
                            .and_then(|f| f.sync_all())
                            .map_err(|e| self.err(format!("syncing {}: {e}", path.display())))
                    })
                    .and_then(|()| HnswIndex::open(&path, true, params.ef_search));
                match built {
                    Ok(index) => Some(index),
                    // Exact search serves the segment; the next compaction tries again.
                    Err(e) => {
                        tracing_warn(&self.name, &format!("segment {id} left unindexed: {e}"));
                        let _ = std::fs::remove_file(&path);
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Sealed {
            id,
            keys,
            vectors,
            payloads,
            deleted: vec![false; n],
            live: n,
            #[cfg(feature = "hnsw")]
            index,
        })
    }

    fn write_deletions(&self, s: &Sealed) -> Result<()> {
        let mut out = Vec::new();
        for (i, d) in s.deleted.iter().enumerate() {
            if *d {
                out.extend_from_slice(&(i as u32).to_le_bytes());
            }
        }
        write_durably(&self.path(&format!("seg-{}.del", s.id)), &out).map_err(|e| self.err(e))
    }

    /// Rewrites sealed segments whose share of deleted rows reached `compact_ratio` into one
    /// new segment of their live rows. Returns how many segments were rewritten.
    pub fn compact(&self) -> Result<usize> {
        self.writable()?;
        let mut st = self.write();
        let ratio = self.opts.compact_ratio;
        let victims: Vec<usize> = st
            .sealed
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let rows = s.keys.len();
                rows > 0 && (rows - s.live) as f64 >= ratio * rows as f64
            })
            .map(|(i, _)| i)
            .collect();
        if victims.is_empty() {
            return Ok(0);
        }
        let dim = self.dimension;
        let mut rows = Vec::new();
        for &i in &victims {
            let s = &st.sealed[i];
            for row in 0..s.keys.len() {
                if !s.deleted[row] {
                    rows.push((
                        s.keys[row].clone(),
                        s.vector(row, dim).to_vec(),
                        s.payloads[row].clone(),
                    ));
                }
            }
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = st.manifest.clone();
        let gone: BTreeSet<u64> = victims.iter().map(|&i| st.sealed[i].id).collect();
        m.segments.retain(|e| !gone.contains(&e.id));
        let new = if rows.is_empty() {
            None
        } else {
            let id = m.next_segment;
            m.next_segment += 1;
            let s = self.write_segment(id, rows)?;
            m.segments.push(SegmentEntry {
                id,
                rows: s.keys.len() as u64,
                indexed: has_index(&s),
                ef_search: None,
            });
            Some(s)
        };
        freshindex_core::failpoint::hit("compact-written");
        self.commit_manifest(&m)?;
        for id in &gone {
            for ext in ["dat", "del", "hnsw"] {
                let _ = std::fs::remove_file(self.path(&format!("seg-{id}.{ext}")));
            }
            st.dirty.remove(id);
        }
        st.manifest = m;
        let mut sealed: Vec<Sealed> = std::mem::take(&mut st.sealed)
            .into_iter()
            .filter(|s| !gone.contains(&s.id))
            .collect();
        sealed.extend(new);
        st.loc.clear();
        for (si, s) in sealed.iter().enumerate() {
            for (row, key) in s.keys.iter().enumerate() {
                if !s.deleted[row] {
                    st.loc.insert(key.clone(), (si, row));
                }
            }
        }
        st.sealed = sealed;
        Ok(gone.len())
    }

    /// Where the rows are.
    pub fn stats(&self) -> SegmentStats {
        let st = self.read();
        let mut s = SegmentStats {
            growing_rows: st.growing.len() as u64,
            sealed_segments: st.sealed.len() as u64,
            indexed_rows: 0,
            unindexed_rows: 0,
            tombstones: 0,
        };
        for seg in &st.sealed {
            if has_index(seg) {
                s.indexed_rows += seg.live as u64;
            } else {
                s.unindexed_rows += seg.live as u64;
            }
            s.tombstones += (seg.keys.len() - seg.live) as u64;
        }
        s
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The row with key `key`.
    pub fn get(&self, key: &str) -> Option<Row> {
        let st = self.read();
        if let Some((v, p)) = st.growing.get(key) {
            return Some(Row {
                key: key.into(),
                vector: v.clone(),
                payload: p.clone(),
            });
        }
        let &(si, row) = st.loc.get(key)?;
        let s = st.sealed.get(si)?;
        Some(Row {
            key: key.into(),
            vector: s.vector(row, self.dimension).to_vec(),
            payload: s.payloads.get(row)?.clone(),
        })
    }

    /// The collection's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index parameters sealed segments are indexed with (`None`: exact only).
    pub fn index_params(&self) -> Option<&HnswParams> {
        self.opts.index.as_ref()
    }

    /// The sealed segments, in manifest order.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let st = self.read();
        st.sealed
            .iter()
            .map(|s| SegmentInfo {
                id: s.id,
                rows: s.keys.len() as u64,
                live: s.live as u64,
                indexed: has_index(s),
                data_path: self.path(&format!("seg-{}.dat", s.id)),
            })
            .collect()
    }

    /// Attaches the index file `built` (made by [`build_segment_index`] from this segment's
    /// data) to sealed segment `segment`: the file moves into the collection's folder, the
    /// manifest records it, and searches use it from then on. Returns `false`, leaving `built`
    /// in place, when the segment no longer exists (compacted away) or already has an index.
    pub fn attach_index(&self, segment: u64, built: &Path) -> Result<bool> {
        self.attach_index_with(segment, built, None)
    }

    /// [`attach_index`](Self::attach_index), searching the index with `ef_search` (kept in the
    /// manifest) instead of the collection's default.
    pub fn attach_index_with(
        &self,
        segment: u64,
        built: &Path,
        ef_search: Option<usize>,
    ) -> Result<bool> {
        self.writable()?;
        let mut st = self.write();
        let Some(pos) = st.sealed.iter().position(|s| s.id == segment) else {
            return Ok(false);
        };
        if has_index(&st.sealed[pos]) {
            return Ok(false);
        }
        self.attach_locked(&mut st, pos, built, ef_search)?;
        Ok(true)
    }

    #[cfg(feature = "hnsw")]
    fn attach_locked(
        &self,
        st: &mut State,
        pos: usize,
        built: &Path,
        ef_search: Option<usize>,
    ) -> Result<()> {
        let Some(params) = &self.opts.index else {
            return Err(VectorError::Index(format!(
                "collection `{}` has no index configured",
                self.name
            )));
        };
        let id = st.sealed[pos].id;
        let dest = self.path(&format!("seg-{id}.hnsw"));
        let io =
            |what: &str, e: std::io::Error| self.err(format!("{what} {}: {e}", dest.display()));
        if let Err(e) = std::fs::rename(built, &dest) {
            if e.kind() != std::io::ErrorKind::CrossesDevices {
                return Err(io("moving the index to", e));
            }
            std::fs::copy(built, &dest).map_err(|e| io("copying the index to", e))?;
            std::fs::File::open(&dest)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("syncing", e))?;
            let _ = std::fs::remove_file(built);
        }
        sync_dir(&dest)?;
        freshindex_core::failpoint::hit("attach-moved");
        let index = HnswIndex::open(&dest, true, ef_search.unwrap_or(params.ef_search))?;
        let rows = st.sealed[pos].keys.len();
        if index.len() != rows
            || index.dimension() != self.dimension
            || index.metric() != self.metric
        {
            let _ = std::fs::remove_file(&dest);
            return Err(VectorError::Index(format!(
                "the index built for segment {id} holds {} vectors of dimension {}, the segment {rows} of {}",
                index.len(),
                index.dimension(),
                self.dimension
            )));
        }
        let mut m = st.manifest.clone();
        for e in m.segments.iter_mut().filter(|e| e.id == id) {
            e.indexed = true;
            e.ef_search = ef_search;
        }
        self.commit_manifest(&m)?;
        st.manifest = m;
        st.sealed[pos].index = Some(index);
        Ok(())
    }

    #[cfg(not(feature = "hnsw"))]
    fn attach_locked(&self, _: &mut State, _: usize, _: &Path, _: Option<usize>) -> Result<()> {
        Err(VectorError::Index(
            "this build has no HNSW support (cargo feature `hnsw`)".into(),
        ))
    }

    /// Removes every segment's index (searches go exact); returns how many there were.
    pub fn drop_indexes(&self) -> Result<usize> {
        self.writable()?;
        let mut st = self.write();
        let mut m = st.manifest.clone();
        let mut dropped = 0;
        for e in m.segments.iter_mut().filter(|e| e.indexed) {
            e.indexed = false;
            e.ef_search = None;
            dropped += 1;
        }
        if dropped == 0 {
            return Ok(0);
        }
        self.commit_manifest(&m)?;
        st.manifest = m;
        for s in st.sealed.iter_mut() {
            #[cfg(feature = "hnsw")]
            {
                s.index = None;
            }
            let _ = std::fs::remove_file(self.dir.join(format!("seg-{}.hnsw", s.id)));
        }
        Ok(dropped)
    }
}

#[cfg(feature = "hnsw")]
fn has_index(s: &Sealed) -> bool {
    s.index.is_some()
}

#[cfg(not(feature = "hnsw"))]
fn has_index(_: &Sealed) -> bool {
    false
}

fn tracing_warn(collection: &str, message: &str) {
    // The crate has no logging dependency: the message goes to stderr once per open.
    eprintln!("collection `{collection}`: {message}");
}

/// Applies one logged write to the in-memory state (also when replaying the log).
fn apply_in_memory(st: &mut State, upserts: Vec<Row>, deletes: &[String]) {
    let remove = |st: &mut State, key: &str| {
        if st.growing.remove(key).is_some() {
            return;
        }
        if let Some((si, row)) = st.loc.remove(key) {
            let s = &mut st.sealed[si];
            if !s.deleted[row] {
                s.deleted[row] = true;
                s.live -= 1;
                st.dirty.insert(s.id);
            }
        }
    };
    for k in deletes {
        remove(st, k);
    }
    for r in upserts {
        if !st.growing.contains_key(&r.key) {
            remove(st, &r.key);
        }
        st.growing.insert(r.key, (r.vector, r.payload));
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, then fsyncs the
/// folder: readers see the old file or the new one, never a part.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    sync_dir(path).map_err(|e| e.to_string())
}

/// Reads `dir/MANIFEST` (`None` when there is none).
fn read_manifest(dir: &Path, name: &str) -> Result<Option<Manifest>> {
    let path = dir.join("MANIFEST");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| VectorError::Storage {
                collection: name.into(),
                message: format!("{}: {e}", path.display()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VectorError::Storage {
            collection: name.into(),
            message: format!("{}: {e}", path.display()),
        }),
    }
}

/// Takes the exclusive lock of a collection folder (`dir/LOCK`), or says who holds it.
pub(crate) fn lock_dir(dir: &Path, name: &str) -> Result<std::fs::File> {
    let path = dir.join("LOCK");
    let storage = |m: String| VectorError::Storage {
        collection: name.into(),
        message: m,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| storage(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(VectorError::Locked {
            collection: name.into(),
            message: format!(
                "another process has it open for writing (lock {}); a running `freshindex serve` owns the collections of its data directory — go through its API, or stop it",
                path.display()
            ),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(storage(format!("{}: {e}", path.display()))),
    }
}

/// The rows of a segment file: keys, vectors (one block, `dimension` per row) and payloads.
/// `dimension` is checked when given.
#[allow(clippy::type_complexity)]
fn read_segment(
    path: &Path,
    collection: &str,
    dimension: Option<usize>,
) -> Result<(Vec<String>, Vec<f32>, Vec<RowPayload>)> {
    let corrupt = |why: &str| VectorError::Storage {
        collection: collection.into(),
        message: format!("{}: {why}", path.display()),
    };
    let bytes = std::fs::read(path).map_err(|e| corrupt(&e.to_string()))?;
    if bytes.len() < 8 + 32 || &bytes[..8] != SEG_MAGIC {
        return Err(corrupt("not a segment file"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader { bytes: body, at: 8 };
    let rows = r.u64().ok_or_else(|| corrupt("truncated header"))? as usize;
    let dim = r.u32().ok_or_else(|| corrupt("truncated header"))? as usize;
    if dimension.is_some_and(|d| d != dim) {
        return Err(corrupt("dimension does not match the collection's"));
    }
    let mut vectors = Vec::with_capacity(rows.saturating_mul(dim).min(1 << 28));
    r.f32s(
        rows.checked_mul(dim).ok_or_else(|| corrupt("bad header"))?,
        &mut vectors,
    )
    .ok_or_else(|| corrupt("truncated vectors"))?;
    let mut keys = Vec::with_capacity(rows.min(1 << 24));
    let mut payloads = Vec::with_capacity(rows.min(1 << 24));
    for _ in 0..rows {
        keys.push(r.str().ok_or_else(|| corrupt("truncated row"))?.to_string());
        let p = r.str().ok_or_else(|| corrupt("truncated row"))?;
        payloads.push(serde_json::from_str(p).map_err(|e| corrupt(&e.to_string()))?);
    }
    Ok((keys, vectors, payloads))
}

/// Builds the HNSW index of the segment file `data` and writes it durably to `out`, on
/// `threads` threads: the work of an index node. Deleted rows are indexed too (search skips
/// them). Returns the number of vectors indexed.
#[cfg(feature = "hnsw")]
pub fn build_segment_index(
    data: &Path,
    metric: Metric,
    params: &HnswParams,
    out: &Path,
    threads: usize,
) -> Result<u64> {
    let (keys, vectors, _) = read_segment(data, &data.display().to_string(), None)?;
    let n = keys.len();
    let dim = vectors.len().checked_div(n).unwrap_or(0);
    let pairs: Vec<(u64, &[f32])> = (0..n)
        .map(|i| (i as u64, &vectors[i * dim..(i + 1) * dim]))
        .collect();
    let index = HnswIndex::build(dim, metric, params, &pairs, threads)?;
    let tmp = out.with_extension("building");
    index.save(&tmp)?;
    let io = |e: std::io::Error| VectorError::Index(format!("{}: {e}", out.display()));
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)?;
    sync_dir(out)?;
    Ok(n as u64)
}

fn write_manifest(dir: &Path, m: &Manifest) -> std::result::Result<(), String> {
    let json = serde_json::to_vec_pretty(m).map_err(|e| format!("encoding the manifest: {e}"))?;
    write_durably(&dir.join("MANIFEST"), &json)
}

impl VectorCollection for SegmentedCollection {
    fn name(&self) -> &str {
        &self.name
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn apply(&self, upserts: &[Row], deletes: &[String]) -> Result<()> {
        if let Some(r) = upserts.iter().find(|r| r.vector.len() != self.dimension) {
            return Err(VectorError::Dimension {
                collection: self.name.clone(),
                expected: self.dimension,
                got: r.vector.len(),
            });
        }
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        self.writable()?;
        let record = encode_apply(upserts, deletes)?;
        let mut st = self.write();
        st.wal
            .as_mut()
            .ok_or_else(|| VectorError::ReadOnly(self.name.clone()))?
            .append(&[&record])?;
        apply_in_memory(&mut st, upserts.to_vec(), deletes);
        if st.growing.len() >= self.opts.seal_rows.max(1)
            && let Err(e) = self.seal_locked(&mut st)
        {
            // The write is committed (in the log); sealing is tried again by the next one.
            tracing_warn(&self.name, &format!("sealing failed: {e}"));
        }
        Ok(())
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
        let st = self.read();
        let dim = self.dimension;
        let q_norm = lane_sum(vector, vector, |x, y| x * y).sqrt();
        let pass = |p: &RowPayload| filter.is_none_or(|f| f.matches(p));
        let mut hits: Vec<(f32, &str, &RowPayload)> = Vec::new();
        for (key, (v, p)) in &st.growing {
            if pass(p) {
                hits.push((score_with(self.metric, vector, q_norm, v), key, p));
            }
        }
        for s in &st.sealed {
            // With a filter, the rows that pass decide the plan: few of them are scored
            // exactly (cheaper and surer than a graph search that must skip most nodes).
            let passing = match filter {
                Some(_) => (0..s.keys.len())
                    .filter(|&r| !s.deleted[r] && pass(&s.payloads[r]))
                    .count(),
                None => s.live,
            };
            if passing == 0 {
                continue;
            }
            #[cfg(feature = "hnsw")]
            if let Some(index) = &s.index
                && (filter.is_none() || passing > EXACT_BELOW.max(s.keys.len() / 10))
            {
                let keep = |id: u64| {
                    let i = id as usize;
                    i < s.deleted.len() && !s.deleted[i] && pass(&s.payloads[i])
                };
                // Without deletions or a filter every node may answer: the plain search.
                let keep: Option<&(dyn Fn(u64) -> bool + Sync)> =
                    if filter.is_none() && s.live == s.keys.len() {
                        None
                    } else {
                        Some(&keep)
                    };
                let found = index.search(vector, k, keep)?;
                // Fewer than k: a selective filter or many tombstones can cut the graph
                // search short, so the segment is searched exactly instead.
                if found.len() >= k.min(passing) {
                    for (id, sc) in found {
                        let i = id as usize;
                        hits.push((sc, &s.keys[i], &s.payloads[i]));
                    }
                    continue;
                }
            }
            for row in 0..s.keys.len() {
                if !s.deleted[row] && pass(&s.payloads[row]) {
                    hits.push((
                        score_with(self.metric, vector, q_norm, s.vector(row, dim)),
                        &s.keys[row],
                        &s.payloads[row],
                    ));
                }
            }
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        hits.truncate(k);
        Ok(hits
            .into_iter()
            .map(|(score, key, p)| SearchHit {
                key: key.to_string(),
                score,
                payload: p.clone(),
            })
            .collect())
    }

    fn count(&self) -> Result<u64> {
        let st = self.read();
        Ok(st.growing.len() as u64 + st.sealed.iter().map(|s| s.live as u64).sum::<u64>())
    }

    fn scan(&self, visit: &mut dyn FnMut(Row) -> Result<()>) -> Result<()> {
        let st = self.read();
        let dim = self.dimension;
        let mut all: Vec<(&str, &[f32], &RowPayload)> = st
            .growing
            .iter()
            .map(|(k, (v, p))| (k.as_str(), v.as_slice(), p))
            .collect();
        for s in &st.sealed {
            for row in 0..s.keys.len() {
                if !s.deleted[row] {
                    all.push((&s.keys[row], s.vector(row, dim), &s.payloads[row]));
                }
            }
        }
        all.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v, p) in all {
            visit(Row {
                key: k.to_string(),
                vector: v.to_vec(),
                payload: p.clone(),
            })?;
        }
        Ok(())
    }
}
