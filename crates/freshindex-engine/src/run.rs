//! One run of a flow, and the read-side operations (search, export, status) over its state.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use freshindex_core::{Fingerprint, FlowSpec, FpMap, ItemStatus, Row, RowPayload};
use freshindex_store::{
    BatchCommit, FlowId, ItemChange, ItemLineage, ItemRecord, SqliteStore, StateStore, StoreError,
    TrackedRow,
};
use freshindex_vector::{
    Collections, Filter, SearchHit, SqliteCollection, VectorCollection, decode_vector,
    encode_vector,
};

use crate::failpoint;
use crate::plan::{plan_item, row_fp, row_key};
use crate::source::files::{self, ReadError, ScannedFile};
use crate::steps::embed::{Embedder, behavior_version, embedder_for};
use crate::steps::parse::parse;
use crate::steps::processing_fingerprint;
use crate::steps::split::Splitter;
use crate::summary::{Issue, RunStatus, RunSummary};
use crate::{EngineError, summary};

/// The phases a run reports progress for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Walking and stat-ing the source.
    Scanning,
    /// Reading, splitting and embedding changed items.
    Processing,
    /// Writing rows to the target.
    Writing,
}

/// Receives progress; the CLI draws bars or log lines from it.
pub trait Progress: Send + Sync {
    /// A phase starts; `total` when known.
    fn start(&self, phase: Phase, total: Option<u64>);
    /// `n` more units of the phase are done.
    fn inc(&self, phase: Phase, n: u64);
    /// The phase is over.
    fn finish(&self, phase: Phase);
}

/// Progress that goes nowhere.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: Phase, _: Option<u64>) {}
    fn inc(&self, _: Phase, _: u64) {}
    fn finish(&self, _: Phase) {}
}

/// Options of a run.
pub struct RunOptions<'a> {
    /// Items per full batch (one two-phase write per batch). Large batches matter: every
    /// commit rewrites the index pages its random keys land on, so fewer, larger commits write
    /// far less. The first batches are smaller so that writing starts early.
    pub batch_items: usize,
    /// Progress receiver.
    pub progress: &'a dyn Progress,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            batch_items: 1024,
            progress: &NoProgress,
        }
    }
}

/// The engine over one data directory: a state store and a folder of collections.
pub struct Engine {
    store: Arc<dyn StateStore>,
    collections: Collections,
    skip_dirs: Vec<(u64, u64)>,
    /// Held (flock) for the whole of a run: one run at a time per data directory.
    lock_path: Option<PathBuf>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("collections", &self.collections)
            .finish_non_exhaustive()
    }
}

/// A flow's state, for `freshindex status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlowStatus {
    /// Flow name.
    pub flow: String,
    /// Target collection.
    pub collection: String,
    /// Items by status.
    pub items: BTreeMap<String, u64>,
    /// Rows in the target.
    pub rows: u64,
    /// Memo-cache entries.
    pub cache_entries: u64,
    /// Memo-cache value bytes.
    pub cache_bytes: u64,
    /// The last run's summary.
    pub last_run: Option<serde_json::Value>,
}

impl Engine {
    /// Opens (creating) the data directory `dir`: `state.sqlite` and `collections/`.
    pub fn open(dir: &Path) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::Config(format!("data dir {}: cannot create: {e}", dir.display()))
        })?;
        let meta = std::fs::metadata(dir)
            .map_err(|e| EngineError::Config(format!("data dir {}: {e}", dir.display())))?;
        let store = SqliteStore::open(&dir.join("state.sqlite"))?;
        Ok(Engine {
            store: Arc::new(store),
            collections: Collections::new(&dir.join("collections")),
            skip_dirs: vec![(meta.dev(), meta.ino())],
            lock_path: Some(dir.join("run.lock")),
        })
    }

    /// An engine over any store and collections folder.
    pub fn new(store: Arc<dyn StateStore>, collections_dir: PathBuf) -> Engine {
        Engine {
            store,
            collections: Collections::new(&collections_dir),
            skip_dirs: Vec::new(),
            lock_path: None,
        }
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Flows that have run in this data directory, with the spec they last ran with.
    pub fn stored_flows(&self) -> Result<Vec<FlowSpec>, EngineError> {
        self.store
            .flows()?
            .into_iter()
            .map(|f| {
                serde_json::from_str(&f.spec_json).map_err(|e| {
                    EngineError::Config(format!("stored spec of flow `{}`: {e}", f.name))
                })
            })
            .collect()
    }

    fn stored_flow(&self, name: &str) -> Result<(FlowId, FlowSpec), EngineError> {
        let rec = self.store.flow(name)?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "flow `{name}` has not run in this data directory yet"
            ))
        })?;
        let spec = serde_json::from_str(&rec.spec_json)
            .map_err(|e| EngineError::Config(format!("stored spec of flow `{name}`: {e}")))?;
        Ok((rec.id, spec))
    }

    /// Runs a flow once: brings its target in line with its source.
    pub fn run(&self, spec: &FlowSpec, opts: &RunOptions<'_>) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        let spec_json = serde_json::to_string(spec).map_err(|e| {
            EngineError::Config(format!(
                "flow `{}`: cannot store its spec (source path {}): {e}",
                spec.name,
                spec.files().path.display()
            ))
        })?;
        let embedder = embedder_for(spec.embed()).map_err(EngineError::Config)?;
        let splitter = Splitter::new(spec.split()).map_err(EngineError::Config)?;
        let _lock = self.lock()?;
        let stored = self.stored_flows()?;
        if let Some(other) = stored
            .iter()
            .find(|f| f.name != spec.name && f.target.collection() == spec.target.collection())
        {
            return Err(EngineError::Config(format!(
                "flow `{}`: collection `{}` is already the target of flow `{}` in this data directory; give each flow its own collection",
                spec.name,
                spec.target.collection(),
                other.name
            )));
        }
        if let Some(before) = stored.iter().find(|f| f.name == spec.name)
            && before.target.collection() != spec.target.collection()
            && let Some(rec) = self.store.flow(&spec.name)?
        {
            self.leave_target(rec.id, before.target.collection())?;
        }
        let flow = self.store.register_flow(&spec.name, &spec_json)?;

        let progress = opts.progress;
        progress.start(Phase::Scanning, None);
        // Loading the stored items (CPU in SQLite) overlaps the walk (system calls).
        let (prior, scan) = std::thread::scope(|scope| {
            let items = scope.spawn(|| self.store.items(flow));
            let scan = files::scan(spec.files(), &self.skip_dirs);
            let items = items
                .join()
                .unwrap_or_else(|_| Err(StoreError::Backend("loading items panicked".into())));
            (items, scan)
        });
        let (prior, mut scan): (Vec<ItemRecord>, _) = (prior?, scan?);
        debug_assert!(prior.is_sorted_by(|a, b| a.key <= b.key));
        progress.inc(Phase::Scanning, scan.files.len() as u64);
        progress.finish(Phase::Scanning);
        failpoint::hit("scan-done");
        let collection = self
            .collections
            .open_or_create(spec.target.collection(), embedder.dimension())?;

        let prep = Prep {
            store: self.store.as_ref(),
            flow,
            spec,
            spec_fp: processing_fingerprint(spec),
            embed_fp: Fingerprint::builder("freshindex/memo/embed")
                .str(&spec.embed().identity())
                .u64(behavior_version(&spec.embed().model))
                .finish(),
            embedder,
            splitter,
            cache_was_empty: self.store.memo_stats(flow)?.0 == 0,
        };
        let mut run = FlowRun {
            engine: self,
            flow,
            spec,
            collection,
            summary: RunSummary {
                flow: spec.name.clone(),
                status: RunStatus::Success,
                items: Default::default(),
                rows: Default::default(),
                embeddings: Default::default(),
                elapsed_ms: 0,
                errors: Vec::new(),
                warnings: Vec::new(),
            },
            total_errors: 0,
            total_warnings: 0,
            progress,
        };
        run.summary.items.seen = scan.files.len() as u64;
        run.issues(&scan.issues);

        // Classify by metadata: only candidates are read.
        let (work, unchanged) = classify(
            prior,
            std::mem::take(&mut scan.files),
            &scan.unlisted,
            |p| prep.forced(p),
        );
        run.summary.items.unchanged += unchanged;

        progress.start(Phase::Processing, Some(work.len() as u64));
        progress.start(Phase::Writing, None);
        let batch_items = opts.batch_items.max(1);
        // Two stages: a preparer thread reads, splits and embeds batch N+1 while this thread
        // diffs and writes batch N. A bounded channel of one batch keeps memory flat.
        std::thread::scope(|scope| -> Result<(), EngineError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Prepared, EngineError>>(1);
            let prep = &prep;
            let preparer = scope.spawn(move || {
                let mut recent = Recent {
                    all: prep.cache_was_empty.then(FpMap::default),
                    ..Recent::default()
                };
                let mut work = work.into_iter().peekable();
                // Small first batches get the writer going early; full batches then amortize
                // each commit over many rows.
                let mut size = (batch_items / 8).max(1);
                while work.peek().is_some() {
                    let batch: Vec<Work> = work.by_ref().take(size).collect();
                    size = (size * 2).min(batch_items);
                    let prepared = prep.prepare(batch, &mut recent);
                    let failed = prepared.is_err();
                    // A closed channel means the writer stopped on an error.
                    if tx.send(prepared).is_err() || failed {
                        break;
                    }
                }
            });
            let mut result = Ok(());
            while let Ok(prepared) = rx.recv() {
                let step = prepared.and_then(|p| {
                    let n = p.items;
                    run.apply(p)?;
                    progress.inc(Phase::Processing, n);
                    Ok(())
                });
                if let Err(e) = step {
                    result = Err(e);
                    break;
                }
            }
            drop(rx);
            if let Err(panic) = preparer.join() {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                result = result.and(Err(EngineError::Internal(format!(
                    "the preparing thread panicked: {why}"
                ))));
            }
            result
        })?;
        progress.finish(Phase::Processing);
        progress.finish(Phase::Writing);
        self.store.memo_gc(flow)?;
        let mut summary = run.finish()?;
        summary.elapsed_ms = started.elapsed().as_millis() as u64;
        let status = match summary.status {
            RunStatus::Success => "success",
            RunStatus::Failed => "failed",
        };
        let json = serde_json::to_string(&summary)
            .map_err(|e| EngineError::Config(format!("summary: {e}")))?;
        self.store.record_run(flow, status, &json)?;
        Ok(summary)
    }

    /// Takes the data directory's run lock, or says who holds it.
    fn lock(&self) -> Result<Option<std::fs::File>, EngineError> {
        let Some(path) = &self.lock_path else {
            return Ok(None);
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| EngineError::Config(format!("lock file {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(EngineError::Busy(format!(
                "another freshindex run is using this data directory (lock {}); wait for it to finish",
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(EngineError::Config(format!(
                "lock file {}: {e}",
                path.display()
            ))),
        }
    }

    /// The flow's target changed: deletes every row it tracked (and any pending key) from
    /// the old collection and forgets its items, so that the run rebuilds the new target from
    /// scratch while the memo cache keeps every embedding. Crash-safe: the lineage is
    /// forgotten only after its rows are deleted, and the old target stays the registered one
    /// until this completes, so an interrupted switch is redone.
    fn leave_target(&self, flow: FlowId, old: &str) -> Result<(), EngineError> {
        let old = match self.collections.open(old) {
            Ok(c) => Some(c),
            Err(freshindex_vector::VectorError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let items = self.store.items(flow)?;
        for part in items.chunks(1024) {
            let keys: Vec<&str> = part.iter().map(|i| i.key.as_str()).collect();
            let lineage = self.store.lineage(flow, &keys)?;
            if let Some(old) = &old {
                let deletes: Vec<String> = lineage
                    .values()
                    .flat_map(|l| {
                        l.tracked
                            .iter()
                            .map(|r| r.row_key.clone())
                            .chain(l.pending.iter().cloned())
                    })
                    .collect();
                old.delete(&deletes)?;
            }
            self.store.commit(
                flow,
                BatchCommit {
                    items: keys
                        .iter()
                        .map(|k| ItemChange::Delete { key: k.to_string() })
                        .collect(),
                    memo: Vec::new(),
                    gc_candidates: Vec::new(),
                },
            )?;
        }
        Ok(())
    }

    fn collection_of(&self, spec: &FlowSpec) -> Result<SqliteCollection, EngineError> {
        Ok(self.collections.open(spec.target.collection())?)
    }

    /// The `k` chunks of `flow` closest to `query`.
    pub fn search(
        &self,
        flow: &str,
        query: &str,
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<SearchHit>, EngineError> {
        let (_, spec) = self.stored_flow(flow)?;
        let embedder = embedder_for(spec.embed()).map_err(EngineError::Config)?;
        let v = embedder
            .embed(&[query])
            .map_err(|e| EngineError::Config(format!("embedding the query: {e}")))?;
        let v = v
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Config("embedder returned no vector".into()))?;
        Ok(self.collection_of(&spec)?.search(&v, k, filter)?)
    }

    /// Every row of the flow's target, in key order.
    pub fn export(
        &self,
        flow: &str,
        visit: &mut dyn FnMut(Row) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let (_, spec) = self.stored_flow(flow)?;
        let collection = match self.collection_of(&spec) {
            Ok(c) => c,
            // A flow whose source was empty never wrote a row.
            Err(EngineError::Target(freshindex_vector::VectorError::NotFound(_))) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut failure = None;
        let scanned = collection.scan(&mut |row| {
            visit(row).map_err(|e| {
                let msg = e.to_string();
                failure = Some(e);
                freshindex_vector::VectorError::Storage {
                    collection: spec.target.collection().into(),
                    message: msg,
                }
            })
        });
        // The visitor's own error wins over the wrapper the scan returns for it.
        match (failure, scanned) {
            (Some(e), _) => Err(e),
            (None, r) => Ok(r?),
        }
    }

    /// A flow's state.
    pub fn status(&self, flow: &str) -> Result<FlowStatus, EngineError> {
        let (id, spec) = self.stored_flow(flow)?;
        let items = self
            .store
            .item_counts(id)?
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect();
        let rows = match self.collection_of(&spec) {
            Ok(c) => c.count()?,
            // Nothing was ever written (an empty source).
            Err(EngineError::Target(freshindex_vector::VectorError::NotFound(_))) => 0,
            Err(e) => return Err(e),
        };
        let (cache_entries, cache_bytes) = self.store.memo_stats(id)?;
        let last_run = match self.store.last_run(id)? {
            Some(j) => Some(
                serde_json::from_str(&j)
                    .map_err(|e| EngineError::Config(format!("stored run summary: {e}")))?,
            ),
            None => None,
        };
        Ok(FlowStatus {
            flow: spec.name.clone(),
            collection: spec.target.collection().to_string(),
            items,
            rows,
            cache_entries,
            cache_bytes,
            last_run,
        })
    }
}

/// Decodes a cached vector, checking its dimension.
fn decode_memo(bytes: &[u8], dimension: usize) -> Result<Vec<f32>, EngineError> {
    decode_vector(bytes)
        .filter(|v| v.len() == dimension)
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "memo entry of {} bytes for dimension {dimension}",
                bytes.len()
            ))
            .into()
        })
}

/// Whether a stored item lies where the scan could not look (see `Scan::unlisted`).
fn is_unlisted(unlisted: &[String], key: &str) -> bool {
    unlisted
        .iter()
        .any(|u| key == u || (u.ends_with('/') && key.starts_with(u.as_str())))
}

/// Merge-joins the stored items with the listed files (both sorted by key, in byte order):
/// returns the work — deletions first, then files to look at — and the number of files left
/// alone because their size and mtime are the stored ones.
fn classify(
    prior: Vec<ItemRecord>,
    files: Vec<ScannedFile>,
    unlisted: &[String],
    forced: impl Fn(&ItemRecord) -> bool,
) -> (Vec<Work>, u64) {
    let mut gone = Vec::new();
    let mut look = Vec::new();
    let mut unchanged = 0;
    let mut prior = prior.into_iter().peekable();
    for file in files {
        // Stored items before this file's key were not listed: deleted.
        while let Some(p) = prior.next_if(|p| p.key < file.key) {
            if !is_unlisted(unlisted, &p.key) {
                gone.push(Work::Gone {
                    key: p.key.clone(),
                    prior: Some(p),
                    warning: None,
                });
            }
        }
        let before = prior.next_if(|p| p.key == file.key);
        let needs_look = match &before {
            None => true,
            Some(p) => forced(p) || p.racy || p.size != file.size || p.mtime_ns != file.mtime_ns,
        };
        if needs_look {
            look.push(Work::File {
                file,
                prior: before,
            });
        } else {
            unchanged += 1;
        }
    }
    for p in prior {
        if !is_unlisted(unlisted, &p.key) {
            gone.push(Work::Gone {
                key: p.key.clone(),
                prior: Some(p),
                warning: None,
            });
        }
    }
    gone.extend(look);
    (gone, unchanged)
}

/// One unit of work of a run.
enum Work {
    /// A listed file to look at.
    File {
        file: ScannedFile,
        prior: Option<ItemRecord>,
    },
    /// An item that is gone (not listed, or vanished before its read).
    Gone {
        key: String,
        prior: Option<ItemRecord>,
        warning: Option<String>,
    },
}

/// A chunk ready for embedding and writing.
struct PreparedChunk {
    text: String,
    range: [usize; 2],
    text_fp: Fingerprint,
    memo_key: Fingerprint,
}

/// What looking at one item decided.
enum Outcome {
    /// Same content as before: refresh the stored metadata only (when `dirty`).
    Unchanged { record: ItemRecord, dirty: bool },
    /// New or changed content, split into chunks.
    Indexed {
        record: ItemRecord,
        chunks: Vec<PreparedChunk>,
        is_new: bool,
    },
    /// Deliberately produces no rows.
    Skipped { record: ItemRecord, warning: String },
    /// Failed; keeps its rows, retried next run.
    Failed { record: ItemRecord, error: String },
    /// Gone: all its rows go.
    Gone {
        key: String,
        existed: bool,
        warning: Option<String>,
    },
}

/// The read-only half of a run: looks at items and embeds their chunks. Runs on its own
/// thread, one batch ahead of the writer.
struct Prep<'a> {
    store: &'a dyn StateStore,
    flow: FlowId,
    spec: &'a FlowSpec,
    spec_fp: Fingerprint,
    embed_fp: Fingerprint,
    embedder: Box<dyn Embedder>,
    splitter: Splitter,
    /// The memo cache held nothing when the run started (a first index): only keys this run
    /// computed can be in it, so no other lookup is made (see `Recent::all`).
    cache_was_empty: bool,
}

/// A batch after looking and embedding, ready for the diff and the write.
struct Prepared {
    outcomes: Vec<Outcome>,
    vectors: FpMap<Vec<f32>>,
    new_memo: Vec<(Fingerprint, Vec<u8>)>,
    /// Vectors computed by earlier batches of this run, read from the cache at apply time.
    deferred: Vec<Fingerprint>,
    reused: u64,
    embed_error: Option<String>,
    items: u64,
}

/// Memo keys this run computed. The writer may not have committed those of the last few
/// batches yet, and a text computed once in a run is never computed again: a later batch that
/// needs one reads it from the cache when it is applied, after those batches committed.
#[derive(Default)]
struct Recent {
    /// Per batch still possibly uncommitted, oldest first.
    batches: std::collections::VecDeque<FpMap<()>>,
    /// Every key computed in the run, kept only when the cache started empty: then a key
    /// outside this set cannot be cached and needs no lookup.
    all: Option<FpMap<()>>,
}

/// Batches the preparer may run ahead of the writer's commits (channel slot + the one being
/// written), plus one for margin.
const RECENT_BATCHES: usize = 3;

/// The writing half of a run: diffs against lineage and applies the two-phase write.
struct FlowRun<'a> {
    engine: &'a Engine,
    flow: FlowId,
    spec: &'a FlowSpec,
    collection: SqliteCollection,
    summary: RunSummary,
    total_errors: u64,
    total_warnings: u64,
    progress: &'a dyn Progress,
}

impl Prep<'_> {
    /// Must be processed whatever its metadata says.
    fn forced(&self, p: &ItemRecord) -> bool {
        !p.status.is_settled() || p.has_pending || p.spec_fp.as_ref() != Some(&self.spec_fp)
    }

    fn record(&self, key: &str, status: ItemStatus, size: u64, mtime_ns: i64) -> ItemRecord {
        ItemRecord {
            key: key.to_string(),
            status,
            size,
            mtime_ns,
            racy: false,
            content_hash: None,
            spec_fp: Some(self.spec_fp),
            message: None,
            has_pending: false,
        }
    }

    fn look(&self, work: Work) -> Outcome {
        let (file, prior) = match work {
            Work::Gone {
                key,
                prior,
                warning,
            } => {
                return Outcome::Gone {
                    key,
                    existed: prior.is_some(),
                    warning,
                };
            }
            Work::File { file, prior } => (file, prior),
        };
        let max = self.spec.files().max_file_size;
        let key = file.key.as_str();
        let not_regular = || {
            let w = "not a regular file (FIFO, socket or device); skipped".to_string();
            let mut r = self.record(key, ItemStatus::Skipped, file.size, file.mtime_ns);
            r.message = Some(w.clone());
            Outcome::Skipped {
                record: r,
                warning: w,
            }
        };
        if !file.regular {
            return not_regular();
        }
        let too_large = |size: u64| {
            let w = format!(
                "file is {}, over max_file_size {}; skipped",
                freshindex_core::spec::ByteSize(size),
                max
            );
            let mut r = self.record(key, ItemStatus::Skipped, size, file.mtime_ns);
            r.message = Some(w.clone());
            Outcome::Skipped {
                record: r,
                warning: w,
            }
        };
        if file.size > max.0 {
            return too_large(file.size);
        }
        let read = match files::read(&file, max.0) {
            Ok(r) => r,
            Err(ReadError::TooLarge(size)) => return too_large(size),
            Err(ReadError::NotRegular) => return not_regular(),
            Err(ReadError::Vanished(e)) => {
                return Outcome::Gone {
                    key: file.key.clone(),
                    existed: prior.is_some(),
                    warning: Some(format!("vanished during the scan: {e}")),
                };
            }
            Err(ReadError::Io(e)) => {
                let error = format!("cannot read: {e}");
                let mut r = prior
                    .clone()
                    .unwrap_or_else(|| self.record(key, ItemStatus::Error, 0, 0));
                r.status = ItemStatus::Error;
                r.message = Some(error.clone());
                r.has_pending = false;
                return Outcome::Failed { record: r, error };
            }
        };
        let hash = Fingerprint::of(&read.bytes);
        let mut record = self.record(key, ItemStatus::Accepted, read.size, read.mtime_ns);
        record.racy = read.racy;
        record.content_hash = Some(hash);
        if let Some(p) = &prior
            && !self.forced(p)
            && p.content_hash == Some(hash)
        {
            record.status = p.status;
            record.message = p.message.clone();
            let dirty = (p.size, p.mtime_ns, p.racy) != (record.size, record.mtime_ns, record.racy);
            return Outcome::Unchanged { record, dirty };
        }
        let parsed = match parse(&read.bytes) {
            Ok(p) => p,
            Err(w) => {
                record.status = ItemStatus::Skipped;
                record.message = Some(w.clone());
                return Outcome::Skipped { record, warning: w };
            }
        };
        let chunks = self
            .splitter
            .split(key, parsed.text)
            .into_iter()
            .map(|c| {
                let text_fp = Fingerprint::of(c.text.as_bytes());
                let start = parsed.offset + c.start;
                PreparedChunk {
                    text: c.text.to_string(),
                    range: [start, start + c.text.len()],
                    memo_key: Fingerprint::builder("freshindex/memo")
                        .fp(&self.embed_fp)
                        .fp(&text_fp)
                        .finish(),
                    text_fp,
                }
            })
            .collect();
        let mut warning = None;
        if read.changed_during_read {
            warning = Some(
                "changed while being read; indexed the content as read, it is checked again on the next run"
                    .to_string(),
            );
        } else if read.changed_since_scan {
            warning =
                Some("changed while the scan ran; indexed its content as of reading".to_string());
        }
        if let Some(w) = warning {
            record.message = Some(w);
        }
        let is_new = prior.as_ref().is_none_or(|p| p.content_hash.is_none());
        Outcome::Indexed {
            record,
            chunks,
            is_new,
        }
    }

    /// Looks at a batch of items and embeds their chunks through the memo cache: every chunk
    /// is looked up, each missing text computed once.
    fn prepare(&self, batch: Vec<Work>, recent: &mut Recent) -> Result<Prepared, EngineError> {
        let items = batch.len() as u64;
        let outcomes: Vec<Outcome> = batch.into_iter().map(|w| self.look(w)).collect();
        let mut needed: Vec<Fingerprint> = Vec::new();
        for o in &outcomes {
            if let Outcome::Indexed { chunks, .. } = o {
                needed.extend(chunks.iter().map(|c| c.memo_key));
            }
        }
        let mut vectors: FpMap<Vec<f32>> =
            FpMap::with_capacity_and_hasher(needed.len(), Default::default());
        let mut deferred: FpMap<()> = FpMap::default();
        for k in &needed {
            if recent.batches.iter().any(|m| m.contains_key(k)) {
                deferred.insert(*k, ());
            }
        }
        let lookup: Vec<Fingerprint> = needed
            .iter()
            .filter(|k| !deferred.contains_key(k))
            .filter(|k| recent.all.as_ref().is_none_or(|all| all.contains_key(k)))
            .copied()
            .collect();
        for (k, bytes) in self.store.memo_get(self.flow, &lookup)? {
            vectors.insert(k, decode_memo(&bytes, self.embedder.dimension())?);
        }
        let mut missing: Vec<(Fingerprint, &str)> = Vec::new();
        {
            let mut queued: FpMap<()> = FpMap::default();
            for o in &outcomes {
                if let Outcome::Indexed { chunks, .. } = o {
                    for c in chunks {
                        if !vectors.contains_key(&c.memo_key)
                            && !deferred.contains_key(&c.memo_key)
                            && queued.insert(c.memo_key, ()).is_none()
                        {
                            missing.push((c.memo_key, c.text.as_str()));
                        }
                    }
                }
            }
        }
        let mut new_memo: Vec<(Fingerprint, Vec<u8>)> = Vec::with_capacity(missing.len());
        let mut computed: FpMap<()> =
            FpMap::with_capacity_and_hasher(missing.len(), Default::default());
        let mut embed_error: Option<String> = None;
        for part in missing.chunks(self.spec.embed().batch_size) {
            let texts: Vec<&str> = part.iter().map(|(_, t)| *t).collect();
            match self.embedder.embed(&texts) {
                Ok(vs) if vs.len() == texts.len() => {
                    for ((k, _), v) in part.iter().zip(vs) {
                        new_memo.push((*k, encode_vector(&v)));
                        computed.insert(*k, ());
                        vectors.insert(*k, v);
                    }
                }
                Ok(vs) => {
                    embed_error = Some(format!(
                        "embedder returned {} vectors for {} texts",
                        vs.len(),
                        texts.len()
                    ))
                }
                Err(e) => embed_error = Some(format!("embedding failed: {e}")),
            }
        }
        if let Some(all) = &mut recent.all {
            all.extend(computed.keys().map(|k| (*k, ())));
        }
        recent.batches.push_back(computed);
        while recent.batches.len() > RECENT_BATCHES {
            recent.batches.pop_front();
        }
        let reused = (needed.len() - new_memo.len()) as u64;
        Ok(Prepared {
            outcomes,
            vectors,
            new_memo,
            deferred: deferred.into_keys().collect(),
            reused,
            embed_error,
            items,
        })
    }
}

impl FlowRun<'_> {
    fn issues(&mut self, issues: &[Issue]) {
        let (mut e, mut w) = (self.total_errors, self.total_warnings);
        self.summary.push_issues(issues, &mut e, &mut w);
        self.total_errors = e;
        self.total_warnings = w;
    }

    /// Diffs a prepared batch against lineage and writes it: pending keys, then the target,
    /// then the commit.
    fn apply(&mut self, prepared: Prepared) -> Result<(), EngineError> {
        let Prepared {
            outcomes,
            mut vectors,
            new_memo,
            deferred,
            reused,
            embed_error,
            items: _,
        } = prepared;
        // Computed by a batch that has committed since this one was prepared.
        for (k, bytes) in self.engine.store.memo_get(self.flow, &deferred)? {
            vectors.insert(k, decode_memo(&bytes, self.collection.dimension())?);
        }
        self.summary.embeddings.computed += new_memo.len() as u64;
        self.summary.embeddings.reused += reused;

        // Lineage diff for every item whose rows may change.
        let keys: Vec<&str> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Indexed { record, .. } | Outcome::Skipped { record, .. } => {
                    Some(record.key.as_str())
                }
                Outcome::Gone { key, .. } => Some(key.as_str()),
                Outcome::Unchanged { .. } | Outcome::Failed { .. } => None,
            })
            .collect();
        let lineage = self.engine.store.lineage(self.flow, &keys)?;
        let empty = ItemLineage::default();
        let mut upserts: Vec<Row> = Vec::new();
        let mut upsert_vectors: Vec<Option<Fingerprint>> = Vec::new();
        let mut deletes: Vec<String> = Vec::new();
        let mut pending: Vec<(String, Vec<String>)> = Vec::new();
        let mut changes: Vec<ItemChange> = Vec::with_capacity(outcomes.len());
        let mut issues: Vec<Issue> = Vec::new();
        for o in outcomes {
            let (key, record, rows): (String, Option<ItemRecord>, Vec<(Row, TrackedRow)>) = match o
            {
                Outcome::Unchanged { record, dirty } => {
                    self.summary.items.unchanged += 1;
                    if dirty {
                        changes.push(ItemChange::Upsert { record, rows: None });
                    }
                    continue;
                }
                Outcome::Failed { record, error } => {
                    self.summary.items.failed += 1;
                    issues.push(Issue::error(record.key.clone(), error));
                    changes.push(ItemChange::Upsert { record, rows: None });
                    continue;
                }
                Outcome::Skipped { record, warning } => {
                    self.summary.items.skipped += 1;
                    issues.push(Issue::warning(record.key.clone(), warning));
                    (record.key.clone(), Some(record), Vec::new())
                }
                Outcome::Gone {
                    key,
                    existed,
                    warning,
                } => {
                    if existed {
                        self.summary.items.deleted += 1;
                    }
                    if let Some(w) = warning {
                        issues.push(Issue::warning(key.clone(), w));
                    }
                    (key, None, Vec::new())
                }
                Outcome::Indexed {
                    mut record,
                    chunks,
                    is_new,
                } => {
                    if let Some(e) = &embed_error
                        && chunks.iter().any(|c| !vectors.contains_key(&c.memo_key))
                    {
                        self.summary.items.failed += 1;
                        issues.push(Issue::error(record.key.clone(), e.clone()));
                        record.status = ItemStatus::Error;
                        record.message = Some(e.clone());
                        changes.push(ItemChange::Upsert { record, rows: None });
                        continue;
                    }
                    if is_new {
                        self.summary.items.new += 1;
                    } else {
                        self.summary.items.modified += 1;
                    }
                    if let Some(w) = &record.message {
                        issues.push(Issue::warning(record.key.clone(), w.clone()));
                    }
                    let rows = self.rows(&record.key, chunks);
                    (record.key.clone(), Some(record), rows)
                }
            };
            let old = lineage.get(&key).unwrap_or(&empty);
            let new_keys: Vec<(String, Fingerprint)> = rows
                .iter()
                .map(|(_, t)| (t.row_key.clone(), t.row_fp))
                .collect();
            let plan = plan_item(old, &new_keys);
            self.summary.rows.added += plan.added;
            self.summary.rows.updated += plan.updated;
            self.summary.rows.deleted += plan.deleted;
            self.summary.rows.unchanged += plan.unchanged;
            if !plan.pending.is_empty() {
                pending.push((key.clone(), plan.pending));
            }
            deletes.extend(plan.delete);
            let mut tracked = Vec::with_capacity(rows.len());
            let mut rows: Vec<Option<Row>> = rows
                .into_iter()
                .map(|(row, t)| {
                    tracked.push(t);
                    Some(row)
                })
                .collect();
            for i in plan.upsert {
                if let Some(row) = rows[i].take() {
                    upserts.push(row);
                    upsert_vectors.push(tracked[i].memo_key);
                }
            }
            changes.push(match record {
                Some(record) => ItemChange::Upsert {
                    record,
                    rows: Some(tracked),
                },
                None => ItemChange::Delete { key },
            });
        }
        self.issues(&issues);
        // Vectors go to the rows that are written: moved on their last use, copied before.
        let mut uses: FpMap<u32> = FpMap::default();
        for k in upsert_vectors.iter().flatten() {
            *uses.entry(*k).or_insert(0) += 1;
        }
        for (row, k) in upserts.iter_mut().zip(&upsert_vectors) {
            let Some(k) = k else { continue };
            let last = uses.get_mut(k).is_some_and(|n| {
                *n -= 1;
                *n == 0
            });
            row.vector = if last {
                vectors.remove(k)
            } else {
                vectors.get(k).cloned()
            }
            .unwrap_or_default();
        }

        // Two-phase write: pending keys, then the target, then the commit.
        if !upserts.is_empty() || !deletes.is_empty() {
            self.engine.store.record_pending(self.flow, &pending)?;
            failpoint::hit("pending-recorded");
            self.collection.apply(&upserts, &deletes)?;
            self.progress
                .inc(Phase::Writing, (upserts.len() + deletes.len()) as u64);
            failpoint::hit("target-written");
        }
        if !changes.is_empty() || !new_memo.is_empty() {
            self.engine.store.commit(
                self.flow,
                BatchCommit {
                    items: changes,
                    // After a partial embedding failure some new entries may serve no row.
                    gc_candidates: if embed_error.is_some() {
                        new_memo.iter().map(|(k, _)| *k).collect()
                    } else {
                        Vec::new()
                    },
                    memo: new_memo,
                },
            )?;
            failpoint::hit("batch-committed");
        }
        Ok(())
    }

    /// Target rows of an indexed item, with their lineage records.
    fn rows(&self, key: &str, chunks: Vec<PreparedChunk>) -> Vec<(Row, TrackedRow)> {
        let mut dups: FpMap<u32> = FpMap::default();
        let mut out = Vec::with_capacity(chunks.len());
        for c in chunks {
            let dup = dups.entry(c.text_fp).or_insert(0);
            let rk = row_key(key, &c.text_fp, *dup);
            *dup += 1;
            let fp = row_fp(
                self.spec.target.collection(),
                &rk,
                key,
                c.range,
                &c.text_fp,
                &c.memo_key,
            );
            out.push((
                Row {
                    key: rk.clone(),
                    // Filled in for the rows that are written (see `apply`).
                    vector: Vec::new(),
                    payload: RowPayload {
                        source: key.to_string(),
                        range: c.range,
                        text: c.text,
                    },
                },
                TrackedRow {
                    row_key: rk,
                    row_fp: fp,
                    memo_key: Some(c.memo_key),
                },
            ));
        }
        out
    }

    fn finish(mut self) -> Result<RunSummary, EngineError> {
        self.summary.rows.total = self.collection.count()?;
        let limit = self.spec.max_failed_items;
        if limit >= 0 && self.summary.items.failed > limit as u64 {
            self.summary.status = RunStatus::Failed;
        }
        // The lists are capped; a last line says how many were left out.
        let unlisted = |total: u64, listed: usize, what: &str| {
            (total as usize > listed).then(|| {
                (
                    "...".to_string(),
                    format!("{} more {what} not listed", total as usize - listed),
                )
            })
        };
        if let Some((item, error)) =
            unlisted(self.total_errors, self.summary.errors.len(), "errors")
        {
            self.summary.errors.push(summary::ItemError { item, error });
        }
        if let Some((item, warning)) =
            unlisted(self.total_warnings, self.summary.warnings.len(), "warnings")
        {
            self.summary
                .warnings
                .push(summary::ItemWarning { item, warning });
        }
        Ok(self.summary)
    }
}
