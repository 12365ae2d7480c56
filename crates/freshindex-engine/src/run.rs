//! One run of a flow, and the read-side operations (search, export, status) over its state.
//!
//! A run of a files flow is a full traversal after the indexing-queue model: the scan pushes
//! every listed file into the flow's queue with its metadata hash under this traversal's label
//! (`A` and `B` alternate), `deleteQueueItems` of the previous label removes what was not seen,
//! and `workers` threads poll leased batches of the entries that need work, process them and
//! index them (see [`crate::process`]). A heartbeat thread extends the run's leases.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use freshindex_core::queue::DEFAULT_LEASE_MS;
use freshindex_core::spec::FilesSource;
use freshindex_core::spec::PostgresTarget;
use freshindex_core::{FlowSpec, Row, RunState, TargetSpec, Trigger};
use freshindex_store::{
    BatchCommit, FenceError, FlowId, ItemChange, ItemRecord, PollRequest, PushItem, PushKind,
    RunEnd, RunId, SqliteStore, StateStore, StoreError,
};
use freshindex_vector::{
    Collections, Filter, Metric, PgTable, SearchHit, SegmentInfo, SegmentedCollection,
    VectorCollection,
};

use crate::indexing::{IndexService, IndexServiceOptions, SegmentHost};

use crate::EngineError;
use crate::failpoint;
use crate::process::{Ctx, RunMemo, Tally, Work, embed_fingerprint, metadata_hash};
use crate::source::files::{self, ScannedFile};
use crate::steps::embed::embedder_for;
use crate::steps::processing_fingerprint;
use crate::steps::split::Splitter;
use crate::summary::{Issue, RunSummary};

/// Milliseconds since the epoch: the queue's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The phases a run reports progress for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Walking and stat-ing the source, pushing into the queue.
    Scanning,
    /// Processing the queue: reading, splitting and embedding the entries that need work.
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
    /// Most entries a worker polls at once (one two-phase write per batch). Large batches
    /// matter: every commit rewrites the index pages its random keys land on, so fewer, larger
    /// commits write far less. The first batches are smaller so that writing starts early.
    pub batch_items: usize,
    /// Worker threads polling the queue.
    pub workers: usize,
    /// Lease of a polled batch; the heartbeat extends it every third of it.
    pub lease_ms: i64,
    /// Progress receiver.
    pub progress: &'a dyn Progress,
    /// How the run was started, as its history entry records it.
    pub trigger: Trigger,
    /// Set from another thread to stop the run between two batches: it ends with
    /// [`EngineError::Cancelled`], and what it committed stays.
    pub cancel: Option<&'a AtomicBool>,
    /// Workers poll only entries with this label (a reindex task's batch); all when `None`.
    pub queue: Option<&'a str>,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            batch_items: 1024,
            workers: default_workers(),
            lease_ms: DEFAULT_LEASE_MS,
            progress: &NoProgress,
            trigger: Trigger::Manual,
            cancel: None,
            queue: None,
        }
    }
}

/// One worker per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The lease holder of a run's workers. One run at a time holds a data directory, so a lease
/// of this holder found at the start of a run is left over from a run that died.
pub const RUN_OWNER: &str = "engine";

/// The message of a history entry a dead process left `inProgress`, as the next run of the
/// flow records it.
pub const INTERRUPTED: &str = "interrupted: the process running it stopped before it finished (killed, crashed or the machine went down); found by the next run of the flow";

/// Where a processing context writes.
pub(crate) enum Target {
    /// The flow's own state, to its collection (through its alias).
    Flow,
    /// A hidden state of the flow (a blue reindex), to a collection by physical name.
    Hidden { record: String, collection: String },
}

/// The label after `label` in the alternation of full traversals.
fn next_label(label: &str) -> &'static str {
    if label == "A" { "B" } else { "A" }
}

/// The engine over one data directory: a state store and a folder of collections.
pub struct Engine {
    store: Arc<dyn StateStore>,
    collections: Collections,
    pub(crate) skip_dirs: Vec<(u64, u64)>,
    /// The data directory (`None` for an engine over a bare store): its `locks/` folder holds
    /// a lock per flow, held for the whole of a run of that flow.
    dir: Option<PathBuf>,
    /// Open collections, shared by runs and item operations.
    open: Mutex<HashMap<String, Arc<SegmentedCollection>>>,
    /// PostgreSQL tables of `postgres` targets, by connection string and table: one
    /// connection each, shared by runs and item operations.
    pg_tables: Mutex<HashMap<String, Arc<PgTable>>>,
    /// Serializes two-phase writes, so that a fence check and the write it allows are atomic
    /// with respect to every other write of this process.
    writer: Mutex<()>,
    /// The index service, once opened; with its lock file (one service per data directory).
    indexes: Mutex<Option<(Arc<IndexService>, Option<std::fs::File>)>>,
    /// Where index nodes write their files.
    build_dir: PathBuf,
    /// Serializes changes to task records in this process.
    tasks: Mutex<()>,
    /// Cancel flags of the tasks this process runs.
    task_flags: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    /// The lease holder this process's workers poll as ([`RUN_OWNER`], or one name per
    /// process over a store that processes on other machines share).
    owner: String,
}

impl SegmentHost for Engine {
    fn segments(
        &self,
        collection: &str,
    ) -> Result<Option<(Metric, usize, Vec<SegmentInfo>)>, EngineError> {
        Ok(self
            .existing_collection(collection)?
            .map(|c| (c.metric(), c.dimension(), c.segments())))
    }

    fn attach(
        &self,
        collection: &str,
        segment: u64,
        file: &Path,
        ef_search: usize,
    ) -> Result<bool, EngineError> {
        match self.existing_collection(collection)? {
            Some(c) => Ok(c.attach_index_with(segment, file, Some(ef_search))?),
            None => Ok(false),
        }
    }

    fn drop_indexes(&self, collection: &str) -> Result<(), EngineError> {
        if let Some(c) = self.existing_collection(collection)? {
            c.drop_indexes()?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("collections", &self.collections)
            .finish_non_exhaustive()
    }
}

/// Search hits with the collection and model that answered.
#[derive(Clone, Debug)]
pub struct Searched {
    /// Hits, best first.
    pub hits: Vec<SearchHit>,
    /// The collection searched (its physical name), or the PostgreSQL table.
    pub collection: String,
    /// The model the query was embedded with.
    pub model: String,
}

/// A flow's state, for `freshindex status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlowStatus {
    /// Flow name.
    pub flow: String,
    /// Target collection, or PostgreSQL table.
    pub collection: String,
    /// The target, described (`collection `docs``, `PostgreSQL table `public.chunks``).
    pub target: String,
    /// Items by status.
    pub items: BTreeMap<String, u64>,
    /// Rows in the target.
    pub rows: u64,
    /// Memo-cache entries.
    pub cache_entries: u64,
    /// Memo-cache value bytes.
    pub cache_bytes: u64,
    /// The summary of the last run that completed (see [`Engine::history`] for every run).
    pub last_run: Option<serde_json::Value>,
}

impl Engine {
    /// Opens (creating) the data directory `dir`: `state.sqlite` and `collections/`.
    pub fn open(dir: &Path) -> Result<Engine, EngineError> {
        Engine::open_with_store(dir, None)
    }

    /// Opens (creating) the data directory `dir` with the state store `store`: `None` or an
    /// empty string for the embedded `state.sqlite`, else a `postgres://` URL of a store that
    /// processes on other machines may share (see [`crate::distributed`]).
    pub fn open_with_store(dir: &Path, store: Option<&str>) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::Config(format!("data dir {}: cannot create: {e}", dir.display()))
        })?;
        let meta = std::fs::metadata(dir)
            .map_err(|e| EngineError::Config(format!("data dir {}: {e}", dir.display())))?;
        let store: Arc<dyn StateStore> = match store.filter(|s| !s.is_empty()) {
            None => Arc::new(SqliteStore::open(&dir.join("state.sqlite"))?),
            Some(url) => crate::distributed::open_shared_store(url)?,
        };
        let mut engine = Engine::new(store, dir.join("collections"));
        // A tuning knob (and what tests use to get many segments from a small corpus).
        if let Some(n) = std::env::var("FRESHINDEX_SEAL_ROWS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            engine.collections = Collections::with_options(
                &dir.join("collections"),
                freshindex_vector::SegmentOptions {
                    seal_rows: n,
                    ..Default::default()
                },
            );
        }
        engine.skip_dirs = vec![(meta.dev(), meta.ino())];
        engine.dir = Some(dir.to_path_buf());
        Ok(engine)
    }

    /// An engine over any store and collections folder.
    pub fn new(store: Arc<dyn StateStore>, collections_dir: PathBuf) -> Engine {
        let owner = if store.has_shared_locks() {
            crate::distributed::process_owner()
        } else {
            RUN_OWNER.to_string()
        };
        Engine {
            owner,
            store,
            build_dir: collections_dir.with_file_name("index-builds"),
            indexes: Mutex::new(None),
            collections: Collections::new(&collections_dir),
            skip_dirs: Vec::new(),
            dir: None,
            open: Mutex::new(HashMap::new()),
            pg_tables: Mutex::new(HashMap::new()),
            writer: Mutex::new(()),
            tasks: Mutex::new(()),
            task_flags: Mutex::new(HashMap::new()),
        }
    }

    /// The data directory, for an engine opened on one.
    pub(crate) fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    pub(crate) fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn tasks_guard(&self) -> MutexGuard<'_, ()> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cancel flag of task `id` in this process (made when `create`).
    pub(crate) fn task_flag(&self, id: u64, create: bool) -> Option<Arc<AtomicBool>> {
        let mut flags = self.task_flags.lock().unwrap_or_else(|p| p.into_inner());
        if create {
            Some(flags.entry(id).or_default().clone())
        } else {
            flags.get(&id).cloned()
        }
    }

    pub(crate) fn drop_task_flag(&self, id: u64) {
        self.task_flags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The collection `name`, opened once and shared; created with `dimension` if missing.
    pub(crate) fn collection(
        &self,
        name: &str,
        dimension: usize,
    ) -> Result<Arc<SegmentedCollection>, EngineError> {
        let name = &self.collections.resolve(name)?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.get(name) {
            if c.dimension() != dimension {
                return Err(freshindex_vector::VectorError::Dimension {
                    collection: name.into(),
                    expected: c.dimension(),
                    got: dimension,
                }
                .into());
            }
            return Ok(c.clone());
        }
        let c = Arc::new(self.collections.open_or_create(name, dimension)?);
        open.insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// The flow whose target is collection `name` (directly or through an alias).
    pub fn collection_owner(&self, name: &str) -> Result<Option<String>, EngineError> {
        let name = self.collections.resolve(name)?;
        for spec in self.stored_flows()? {
            if let Some(c) = spec.target.collection()
                && self.collections.resolve(c)? == name
            {
                return Ok(Some(spec.name));
            }
        }
        Ok(None)
    }

    /// The handle on a `postgres` target's table, opened once and shared (by connection
    /// string and table, so a new password gets a new connection).
    pub(crate) fn pg_table(&self, target: &PostgresTarget) -> Result<Arc<PgTable>, EngineError> {
        let url = target.resolve_url().map_err(EngineError::Config)?;
        let key = format!("{url}#{}", target.table);
        let mut tables = self.pg_tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let t = Arc::new(PgTable::new(&url, &target.table)?);
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// The target a flow writes to, ready for vectors of `dimension`: its collection
    /// (created if missing), or its PostgreSQL table (created if missing, like `freshindex
    /// setup`; an existing one of another dimension is refused).
    pub(crate) fn target_writer(
        &self,
        target: &TargetSpec,
        dimension: usize,
    ) -> Result<Arc<dyn VectorCollection>, EngineError> {
        match target {
            TargetSpec::Collection(c) => Ok(self.collection(&c.name, dimension)?),
            TargetSpec::Postgres(p) => {
                let table = self.pg_table(p)?;
                table.ensure_checked(dimension, p.vector_type)?;
                Ok(table)
            }
        }
    }

    /// Before a full traversal of a flow with a PostgreSQL target: creates its table when it
    /// is missing. A table created while the flow's lineage tracks rows (someone dropped it)
    /// holds none of them, so the flow's items are forgotten first and the traversal writes
    /// them all again (embeddings come from the memo cache).
    pub(crate) fn prepare_table(&self, flow: FlowId, spec: &FlowSpec) -> Result<(), EngineError> {
        let Some(p) = spec.target.postgres() else {
            return Ok(());
        };
        let dimension = embedder_for(spec.embed())
            .map_err(EngineError::Config)?
            .dimension();
        if self.pg_table(p)?.ensure(dimension, p.vector_type)?.created {
            let forgotten = self.forget_items(flow, None)?.0;
            if forgotten > 0 {
                tracing::warn!(
                    table = p.table,
                    "the table was missing and is created again: its {forgotten} item(s) are indexed again"
                );
            }
        }
        Ok(())
    }

    /// The target for writing as it is, without creating it (`None`: it does not exist).
    pub(crate) fn existing_target(
        &self,
        target: &TargetSpec,
    ) -> Result<Option<Arc<dyn VectorCollection>>, EngineError> {
        match target {
            TargetSpec::Collection(c) => Ok(self
                .existing_collection(&c.name)?
                .map(|c| c as Arc<dyn VectorCollection>)),
            TargetSpec::Postgres(p) => {
                let table = self.pg_table(p)?;
                Ok(table
                    .exists()?
                    .then_some(table as Arc<dyn VectorCollection>))
            }
        }
    }

    /// Creates collection `name` (or opens it when it exists with this shape) for writing.
    pub fn create_collection(
        &self,
        name: &str,
        dimension: usize,
        metric: Metric,
    ) -> Result<(Arc<SegmentedCollection>, bool), EngineError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.get(name) {
            if c.dimension() != dimension || c.metric() != metric {
                return Err(EngineError::Conflict(format!(
                    "collection `{name}` exists with dimension {} and metric {:?}",
                    c.dimension(),
                    c.metric()
                )));
            }
            return Ok((c.clone(), false));
        }
        let existed = self.collections.names()?.iter().any(|n| n == name);
        let c = match self.collections.create(name, dimension, metric) {
            Ok(c) => c,
            Err(freshindex_vector::VectorError::Dimension { expected, .. }) => {
                return Err(EngineError::Conflict(format!(
                    "collection `{name}` exists with dimension {expected}"
                )));
            }
            Err(freshindex_vector::VectorError::Storage { message, .. })
                if message.starts_with("metric:") =>
            {
                return Err(EngineError::Conflict(format!(
                    "collection `{name}`: {message}"
                )));
            }
            Err(freshindex_vector::VectorError::Storage { message, .. })
                if message.contains("not a valid name")
                    || message.starts_with("dimension:")
                    || message.contains("is an alias")
                    || message.contains("ends like") =>
            {
                return Err(EngineError::Invalid(message));
            }
            Err(e) => return Err(e.into()),
        };
        let c = Arc::new(c);
        open.insert(name.to_string(), c.clone());
        Ok((c, !existed))
    }

    /// Drops collection `name` with its indexes. Refused while a flow writes to it or an
    /// alias names it. Returns whether it existed.
    pub fn drop_collection(&self, name: &str) -> Result<bool, EngineError> {
        if let Some(flow) = self.collection_owner(name)? {
            return Err(EngineError::Conflict(format!(
                "collection `{name}` is the target of flow `{flow}`; delete the flow instead"
            )));
        }
        if let Some((alias, _)) = self
            .collections
            .aliases()?
            .into_iter()
            .find(|(_, c)| c == name)
        {
            return Err(EngineError::Conflict(format!(
                "alias `{alias}` names collection `{name}`; point it elsewhere or remove it first"
            )));
        }
        let _writer = self.writer();
        self.remove_collection(name)
    }

    /// Closes and removes collection `name` (a physical name) and forgets its index builds.
    pub(crate) fn remove_collection(&self, name: &str) -> Result<bool, EngineError> {
        self.close_collection(name);
        let existed = self.collections.remove(name)?;
        if let Some(s) = self.index_service()? {
            s.forget_collection(name, now_ms())?;
        }
        Ok(existed)
    }

    /// The existing collection `name`, opened for writing once and shared (`None`: no such
    /// collection). This process becomes its writer.
    pub fn open_collection(
        &self,
        name: &str,
    ) -> Result<Option<Arc<SegmentedCollection>>, EngineError> {
        self.existing_collection(name)
    }

    /// The existing collection `name` for writing, opened once and shared (`None`: there is
    /// no such collection).
    pub(crate) fn existing_collection(
        &self,
        name: &str,
    ) -> Result<Option<Arc<SegmentedCollection>>, EngineError> {
        let name = &self.collections.resolve(name)?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.get(name) {
            return Ok(Some(c.clone()));
        }
        match self.collections.open_writable(name) {
            Ok(c) => {
                let c = Arc::new(c);
                open.insert(name.to_string(), c.clone());
                Ok(Some(c))
            }
            Err(freshindex_vector::VectorError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The index service of this data directory, opened on first use; `None` when another
    /// process (a running `serve`) holds it — that process builds the indexes.
    pub fn index_service(&self) -> Result<Option<Arc<IndexService>>, EngineError> {
        self.index_service_with(None)
    }

    /// Opens the index service with `opts` (e.g. another heartbeat timeout), unless it is
    /// open already. Fails when another process holds it.
    pub fn open_index_service(
        &self,
        opts: IndexServiceOptions,
    ) -> Result<Arc<IndexService>, EngineError> {
        self.index_service_with(Some(opts))?.ok_or_else(|| {
            EngineError::Busy(
                "another process (a running `freshindex serve`?) runs this data directory's index service".into(),
            )
        })
    }

    fn index_service_with(
        &self,
        opts: Option<IndexServiceOptions>,
    ) -> Result<Option<Arc<IndexService>>, EngineError> {
        let mut slot = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, _)) = slot.as_ref() {
            return Ok(Some(s.clone()));
        }
        let lock = match self.data_dir() {
            Some(dir) => {
                let path = dir.join("locks").join("index-service.lock");
                let file = open_lock_file(&path)?;
                match file.try_lock() {
                    Ok(()) => Some(file),
                    Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(EngineError::Internal(format!(
                            "lock file {}: {e}",
                            path.display()
                        )));
                    }
                }
            }
            None => None,
        };
        let mut opts = opts.unwrap_or_else(|| IndexServiceOptions::new(self.build_dir.clone()));
        if self.store.has_shared_locks() && opts.records_prefix.is_empty() {
            // Other data directories share the store: this one's service keeps to its own
            // records (it serves this directory's collections only).
            opts.records_prefix = format!(
                "{}:{}:",
                crate::distributed::host_name(),
                self.build_dir.display()
            );
        }
        let service = Arc::new(IndexService::open(self.store.clone(), opts)?);
        *slot = Some((service.clone(), lock));
        Ok(Some(service))
    }

    /// Where index nodes write their files (the default build folder of the service).
    pub fn build_dir(&self) -> &Path {
        &self.build_dir
    }

    /// Brings the index builds of every flow's collection in line with its segments (new
    /// builds for newly sealed segments). Collections another process writes are skipped.
    pub fn sync_indexes(&self) -> Result<(), EngineError> {
        let Some(service) = self.index_service()? else {
            return Ok(());
        };
        // Every collection of the folder, flows' or not (by their own names, never aliases).
        for name in self.collections.names()? {
            match service.sync(self, &name, now_ms()) {
                Ok(()) | Err(EngineError::Busy(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Builds the pending indexes of `collection` on this thread, as a node of its own (what
    /// a one-shot `index` does after its run). Returns how many builds finished.
    pub fn build_indexes_now(
        &self,
        collection: &str,
        threads: usize,
    ) -> Result<usize, EngineError> {
        let Some(service) = self.index_service()? else {
            return Ok(0);
        };
        let collection = &self.collections.resolve(collection)?;
        service.sync(self, collection, now_ms())?;
        if !service
            .builds_of(Some(collection))
            .iter()
            .any(|b| b.state == crate::indexing::IndexState::Unissued)
        {
            return Ok(0);
        }
        let grant = service.register_node_for(
            &format!("inline:{}", std::process::id()),
            1,
            Some(collection),
            now_ms(),
        )?;
        let mut done = 0;
        let result = (|| {
            while let Some(build) = service.take(grant.node_id, now_ms())? {
                match crate::indexing::execute_build(&build, threads) {
                    Ok(_) => {
                        service.report_finished(
                            self,
                            build.build_id,
                            build.version,
                            grant.node_id,
                            &build.output_path,
                            now_ms(),
                        )?;
                        done += 1;
                    }
                    Err(e) => {
                        tracing::warn!(build = build.build_id, "index build failed: {e}");
                        service.report_failed(
                            build.build_id,
                            build.version,
                            grant.node_id,
                            &e,
                            now_ms(),
                        )?;
                    }
                }
            }
            Ok(())
        })();
        service.deregister_node(grant.node_id)?;
        result.map(|()| done)
    }

    /// The folder of collections.
    pub fn collections(&self) -> &Collections {
        &self.collections
    }

    /// Forgets the open handle of collection `name` (before its files are removed); returns
    /// its row count when it was open or can be opened.
    pub(crate) fn close_collection(&self, name: &str) -> Option<u64> {
        let name = &self
            .collections
            .resolve(name)
            .unwrap_or_else(|_| name.to_string());
        let open = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match open {
            Some(c) => c.count().ok(),
            None => self
                .collections
                .open(name)
                .ok()
                .and_then(|c| c.count().ok()),
        }
    }

    /// Flows registered in this data directory, with their stored specs.
    pub fn stored_flows(&self) -> Result<Vec<FlowSpec>, EngineError> {
        self.store
            .flows()?
            .into_iter()
            .filter(|f| !crate::reindex::is_hidden(&f.name))
            .map(|f| {
                serde_json::from_str(&f.spec_json).map_err(|e| {
                    EngineError::Config(format!("stored spec of flow `{}`: {e}", f.name))
                })
            })
            .collect()
    }

    /// A registered flow's id and the spec it was registered (or last ran) with.
    pub fn flow(&self, name: &str) -> Result<(FlowId, FlowSpec), EngineError> {
        self.stored_flow(name)
    }

    fn stored_flow(&self, name: &str) -> Result<(FlowId, FlowSpec), EngineError> {
        let rec = self.store.flow(name)?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "flow `{name}` is not defined in this data directory"
            ))
        })?;
        let spec = serde_json::from_str(&rec.spec_json)
            .map_err(|e| EngineError::Config(format!("stored spec of flow `{name}`: {e}")))?;
        Ok((rec.id, spec))
    }

    /// Registers a flow (or its new spec): refuses a collection another flow owns and, when
    /// the flow's target changed, moves its rows out of the old collection first.
    pub(crate) fn register(&self, spec: &FlowSpec) -> Result<FlowId, EngineError> {
        let spec_json = serde_json::to_string(spec).map_err(|e| {
            EngineError::Config(format!("flow `{}`: cannot store its spec: {e}", spec.name))
        })?;
        let _registry = self.registry_lock()?;
        let stored = self.stored_flows()?;
        let identity = spec.target.identity();
        if let Some(other) = stored
            .iter()
            .find(|f| f.name != spec.name && f.target.identity() == identity)
        {
            return Err(EngineError::Config(format!(
                "flow `{}`: {} is already the target of flow `{}` in this data directory; give each flow its own target",
                spec.name, spec.target, other.name
            )));
        }
        if let Some(before) = stored.iter().find(|f| f.name == spec.name)
            && before.target.identity() != identity
            && let Some(rec) = self.store.flow(&spec.name)?
        {
            self.leave_target(rec.id, &before.target)?;
        }
        // A flow may not read itself through others.
        let mut all: Vec<&FlowSpec> = stored.iter().filter(|f| f.name != spec.name).collect();
        all.push(spec);
        freshindex_core::spec::check_cycles(&all).map_err(EngineError::Config)?;
        let id = self.store.register_flow(&spec.name, &spec_json)?;
        self.link_inputs(spec, id, &stored)?;
        Ok(id)
    }

    /// The processing context of a flow.
    pub(crate) fn ctx<'a>(
        &'a self,
        flow: FlowId,
        spec: &'a FlowSpec,
        progress: &'a dyn Progress,
        owner: Option<String>,
    ) -> Result<Ctx<'a>, EngineError> {
        self.ctx_into(flow, spec, progress, owner, &Target::Flow)
    }

    /// The processing context of a flow's state, writing to `target`.
    pub(crate) fn ctx_into<'a>(
        &'a self,
        flow: FlowId,
        spec: &'a FlowSpec,
        progress: &'a dyn Progress,
        owner: Option<String>,
        target: &Target,
    ) -> Result<Ctx<'a>, EngineError> {
        let embedder = embedder_for(spec.embed()).map_err(EngineError::Config)?;
        let splitter = Splitter::new(spec.split()).map_err(EngineError::Config)?;
        let (record, collection): (String, Arc<dyn VectorCollection>) = match target {
            Target::Flow => (
                spec.name.clone(),
                self.target_writer(&spec.target, embedder.dimension())?,
            ),
            Target::Hidden { record, collection } => (
                record.clone(),
                self.collection(collection, embedder.dimension())?,
            ),
        };
        Ok(Ctx {
            engine: self,
            flow,
            record,
            spec,
            spec_fp: processing_fingerprint(spec),
            embed_fp: embed_fingerprint(spec),
            // Over a shared store other processes fill the cache too: nothing is known absent.
            memo: RunMemo::new(
                !self.store.has_shared_locks() && self.store.memo_stats(flow)?.0 == 0,
            ),
            embedder,
            splitter,
            collection,
            tally: Mutex::new(Tally::new(&spec.name)),
            progress,
            owner,
            stat_unlisted: false,
            shape: crate::inputs::Shape::of(spec)?,
            inputs: crate::inputs::resolve_inputs(self, spec)?,
            keep_docs: self.store.docs_kept(flow)?.into(),
        })
    }

    /// Runs a flow once: brings its target in line with its source (a full traversal of a
    /// folder; for a PostgreSQL source, its recent changes and a scan of its keys — see
    /// [`crate::source::postgres`]).
    ///
    /// The run is recorded in the flow's execution history: `inProgress` once it holds the
    /// data directory (entries a dead process left `inProgress` are marked interrupted first),
    /// then how it ended — with its summary when it completed ([`RunStatus::run_state`](crate::RunStatus::run_state)), with
    /// the error when it could not ([`EngineError::run_state`]). A spec refused before the run
    /// takes the data directory (a push source, an unknown model) and a data directory held
    /// by another run ([`EngineError::Busy`]) leave no entry.
    pub fn run(&self, spec: &FlowSpec, opts: &RunOptions<'_>) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        let spec = &self.effective(spec)?;
        if let Some(pg) = spec.postgres() {
            let source = crate::source::postgres::PgSource::new(pg)?;
            return self.run_postgres(spec, &source, opts);
        }
        if spec.flows_source().is_some() {
            return self.run_flows(spec, opts);
        }
        let Some(source) = spec.files() else {
            return Err(EngineError::Config(format!(
                "flow `{}` has a push source: its items arrive through the queue API (`freshindex serve`), not through runs",
                spec.name
            )));
        };
        // Checked before taking the lock, so a bad spec fails fast.
        check_steps(spec)?;
        let lock = self.lock_run(&spec.name)?;
        let started_ms = now_ms();
        let flow = self.register_or_record(spec, opts.trigger, started_ms)?;
        let summary = if self.store.has_shared_locks() {
            self.run_watching_lock(&spec.name, lock, opts, |o| {
                self.recorded(flow, opts.trigger, started_ms, || {
                    self.run_locked(spec, source, flow, o, started, &Target::Flow)
                })
            })?
        } else {
            let _held = lock;
            self.recorded(flow, opts.trigger, started_ms, || {
                self.run_locked(spec, source, flow, opts, started, &Target::Flow)
            })?
        };
        if let Some(c) = spec.target.collection() {
            self.after_write(c);
        }
        Ok(summary)
    }

    /// Registers the flow of a run; when that fails, a flow the data directory knows keeps
    /// the failed attempt in its history.
    pub(crate) fn register_or_record(
        &self,
        spec: &FlowSpec,
        trigger: Trigger,
        started_ms: i64,
    ) -> Result<FlowId, EngineError> {
        match self.register(spec) {
            Ok(flow) => Ok(flow),
            Err(e) => {
                if let Ok(Some(rec)) = self.store.flow(&spec.name)
                    && let Ok(run) = self.begin_run(rec.id, trigger, started_ms)
                {
                    self.finish_failed_run(run, &e);
                }
                Err(e)
            }
        }
    }

    /// Compacts the collections this engine has open (segments past their tombstone ratio are
    /// rewritten); new segments get index builds. Returns how many segments were rewritten.
    pub fn compact_collections(&self) -> Result<usize, EngineError> {
        let open: Vec<(String, Arc<SegmentedCollection>)> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let mut rewritten = 0;
        for (name, c) in open {
            let n = c.compact()?;
            if n > 0 {
                rewritten += n;
                self.after_write(&name);
            }
        }
        Ok(rewritten)
    }

    /// New index builds for segments that writes to `collection` sealed (logged on failure).
    pub fn sync_collection_indexes(&self, collection: &str) {
        self.after_write(collection);
    }

    /// After a run or a write: new builds for segments the writes sealed. A failure here
    /// costs speed, not data (the segments are searched exactly), so it is only logged.
    pub(crate) fn after_write(&self, collection: &str) {
        let synced = self.index_service().and_then(|s| match s {
            Some(s) => s.sync(self, &self.collections.resolve(collection)?, now_ms()),
            None => Ok(()),
        });
        if let Err(e) = synced {
            tracing::warn!(collection, "index builds not updated: {e}");
        }
    }

    /// Runs `body` as one entry of the flow's history: `inProgress` first, then its summary,
    /// or its error.
    pub(crate) fn recorded(
        &self,
        flow: FlowId,
        trigger: Trigger,
        started_ms: i64,
        body: impl FnOnce() -> Result<RunSummary, EngineError>,
    ) -> Result<RunSummary, EngineError> {
        let run = self.begin_run(flow, trigger, started_ms)?;
        match body() {
            Ok(summary) => {
                let json = serde_json::to_string(&summary)
                    .map_err(|e| EngineError::Internal(format!("encoding the run summary: {e}")))?;
                self.finish_run(run, summary.status.run_state(), Some(json), None)?;
                Ok(summary)
            }
            Err(e) => {
                self.finish_failed_run(run, &e);
                Err(e)
            }
        }
    }

    /// Records the start of a run (or a reset) of `flow` in its history, once this process
    /// holds the flow's run lock: entries of the flow still `inProgress` belong to a
    /// process that died, and are marked interrupted first.
    pub(crate) fn begin_run(
        &self,
        flow: FlowId,
        trigger: Trigger,
        started_at_ms: i64,
    ) -> Result<RunId, EngineError> {
        let interrupted = self
            .store
            .interrupt_runs(Some(flow), started_at_ms, INTERRUPTED)?;
        if interrupted > 0 {
            tracing::warn!("{interrupted} run(s) of this flow were interrupted earlier");
        }
        Ok(self.store.begin_run(flow, trigger, started_at_ms)?)
    }

    /// Records how a run (or a reset) ended: its final status, its summary (JSON) when it
    /// completed, and why it failed or a note.
    pub(crate) fn finish_run(
        &self,
        run: RunId,
        status: RunState,
        summary_json: Option<String>,
        message: Option<String>,
    ) -> Result<(), EngineError> {
        let end = RunEnd {
            status,
            summary_json,
            message: message.map(|m| m.replace('\n', " ")),
            finished_at_ms: now_ms(),
        };
        self.store.finish_run(run, &end)?;
        Ok(())
    }

    /// Records that a run (or a reset) failed with `e`. A failure to record it is only
    /// logged: the caller returns `e`, which says more.
    pub(crate) fn finish_failed_run(&self, run: RunId, e: &EngineError) {
        if let Err(fe) = self.finish_run(run, e.run_state(), None, Some(e.to_string())) {
            tracing::warn!("recording the failure of run {}: {fe}", run.0);
        }
    }

    /// The run itself, under the run lock, with the flow registered: a full traversal of the
    /// flow's state `flow`, written to `target`.
    pub(crate) fn run_locked(
        &self,
        spec: &FlowSpec,
        source: &FilesSource,
        flow: FlowId,
        opts: &RunOptions<'_>,
        started: Instant,
        target: &Target,
    ) -> Result<RunSummary, EngineError> {
        let store = self.store.as_ref();
        let progress = opts.progress;
        if let Target::Flow = target {
            self.prepare_table(flow, spec)?;
        }

        // Changes of the flows this one reads requeue their dependents before the entries
        // are loaded, so the traversal sees them as work.
        let input_issues = self.sync_inputs(flow, spec)?;
        progress.start(Phase::Scanning, None);
        // Loading the stored entries (CPU in SQLite) overlaps the walk (system calls).
        let (prior, scan) = std::thread::scope(|scope| {
            let items = scope.spawn(|| store.items(flow));
            let scan = files::scan(source, &self.skip_dirs);
            let items = items
                .join()
                .unwrap_or_else(|_| Err(StoreError::Backend("loading items panicked".into())));
            (items, scan)
        });
        let (prior, mut scan): (Vec<ItemRecord>, _) = (prior?, scan?);
        let ctx = self.ctx_into(flow, spec, progress, Some(self.owner.clone()), target)?;
        ctx.tally().summary.items.seen = scan.files.len() as u64;
        ctx.tally().issues(&scan.issues);
        ctx.tally().issues(&input_issues);

        // Leases of a run that died are void: this run holds the data directory. (Over a
        // shared store the owner names this process: other processes' leases stay.)
        store.unreserve(flow, None, Some(&self.owner), now_ms())?;

        // Full traversal: push every listed file under the new label.
        let done_label = store
            .traversal_label(flow)?
            .unwrap_or_else(|| "B".to_string());
        let label = next_label(&done_label).to_string();
        let pending_keys: HashSet<String> = prior
            .iter()
            .filter(|p| p.has_pending)
            .map(|p| p.key.clone())
            .collect();
        let plan = traversal(&prior, &scan.files, &scan.unlisted, |f| {
            metadata_hash(&ctx.spec_fp, f.size, f.mtime_ns, false)
        });
        drop(prior);
        // Unchanged entries take the new label in bulk; changed and new ones are pushed.
        store.relabel_all(flow, &label, &plan.unseen, &done_label, now_ms())?;
        for part in plan.pushes.chunks(8192) {
            let part: Vec<PushItem> = part
                .iter()
                .map(|(key, meta)| PushItem {
                    key: key.clone(),
                    kind: PushKind::Hashes {
                        content: None,
                        metadata: Some(meta.clone()),
                    },
                    payload: None,
                    queue: Some(label.clone()),
                })
                .collect();
            store.push(flow, &part, now_ms())?;
        }
        let unchanged = plan.unchanged;
        let todo = plan.pushes.len() as u64 + plan.unsettled;
        ctx.tally().summary.items.unchanged += unchanged;
        progress.inc(Phase::Scanning, scan.files.len() as u64);
        progress.finish(Phase::Scanning);
        failpoint::hit("scan-done");

        // deleteQueueItems(previous label): whatever this traversal did not see is gone.
        let gone = store.queue_keys(flow, &done_label)?;
        let gone = gone
            .into_iter()
            .map(|k| (k, Some(done_label.clone())))
            .chain(plan.orphans.into_iter().map(|k| (k, None)))
            .collect::<Vec<_>>();
        for part in gone.chunks(opts.batch_items.max(1)) {
            let work = part
                .iter()
                .map(|(key, if_queue)| Work::Gone {
                    key: key.clone(),
                    existed: if_queue.is_some(),
                    if_queue: if_queue.clone(),
                    version: None,
                    warning: None,
                })
                .collect();
            ctx.process(work)?;
        }
        store.set_traversal_label(flow, &label)?;

        // Workers poll leased batches until nothing is left to do.
        let files: HashMap<String, ScannedFile> = std::mem::take(&mut scan.files)
            .into_iter()
            .map(|f| (f.key.clone(), f))
            .collect();
        progress.start(Phase::Processing, Some(todo));
        progress.start(Phase::Writing, None);
        self.work(&ctx, &files, Some(&pending_keys), opts, None)?;
        if store.has_shared_locks() && opts.queue.is_none() {
            // Workers of other processes may still hold batches of this run.
            self.drain_shared(&ctx, &files, opts)?;
        }
        progress.finish(Phase::Processing);
        progress.finish(Phase::Writing);

        store.memo_gc(flow)?;
        ctx.into_summary(started)
    }

    /// The workers of a run, and the heartbeat that keeps their leases. `pending_keys`: the
    /// items whose writes were cut short, when the caller knows them (a traversal loaded
    /// every entry); `None` looks each batch's lineage up. `after_batch` is called after
    /// each batch a worker wrote. `opts.workers` may be 0 only over a shared store (the run
    /// leaves the work to other processes' workers).
    pub(crate) fn work(
        &self,
        ctx: &Ctx<'_>,
        files: &HashMap<String, ScannedFile>,
        pending_keys: Option<&HashSet<String>>,
        opts: &RunOptions<'_>,
        after_batch: Option<&(dyn Fn(&Ctx<'_>) + Sync)>,
    ) -> Result<(), EngineError> {
        let store = self.store.as_ref();
        let owner = self.owner.as_str();
        let n_workers = if store.has_shared_locks() && crate::distributed::shared_target(ctx.spec) {
            opts.workers
        } else {
            opts.workers.max(1)
        };
        let flow = ctx.flow;
        let lease_ms = opts.lease_ms.max(1);
        let batch_items = opts.batch_items.max(1);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| -> Result<(), EngineError> {
            let (beat_tx, beat_rx) = std::sync::mpsc::channel::<()>();
            let beat = scope.spawn(move || {
                let every = std::time::Duration::from_millis((lease_ms / 3).max(1) as u64);
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    beat_rx.recv_timeout(every)
                {
                    let now = now_ms();
                    if let Err(e) = store.heartbeat(flow, owner, now + lease_ms, now) {
                        tracing::warn!("extending leases: {e}");
                    }
                }
            });
            let workers: Vec<_> = (0..n_workers)
                .map(|_| {
                    let stop = &stop;
                    scope.spawn(move || -> Result<(), EngineError> {
                        // Small first batches get writing going early; full batches then
                        // amortize each commit over many rows.
                        let mut size = (batch_items / 8).max(1);
                        while !stop.load(Ordering::Relaxed) {
                            if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                                stop.store(true, Ordering::Relaxed);
                                return Err(EngineError::Cancelled(
                                    "stopped before the end: the work not done stays queued for the next run".into(),
                                ));
                            }
                            let req = PollRequest {
                                queue: opts.queue.map(str::to_string),
                                limit: size,
                                statuses: Vec::new(),
                                owner: owner.to_string(),
                                lease_ms,
                            };
                            let polled_ms = now_ms();
                            let entries = store.poll(flow, &req, polled_ms)?;
                            if entries.is_empty() {
                                break;
                            }
                            size = (size * 2).min(batch_items);
                            let n = entries.len() as u64;
                            let pending_here: HashSet<String> = match pending_keys {
                                Some(_) => HashSet::new(),
                                None => {
                                    let keys: Vec<&str> =
                                        entries.iter().map(|e| e.item.key.as_str()).collect();
                                    store
                                        .lineage(flow, &keys)?
                                        .into_iter()
                                        .filter(|(_, l)| !l.pending.is_empty())
                                        .map(|(k, _)| k)
                                        .collect()
                                }
                            };
                            let derived = ctx.spec.flows_source().is_some();
                            let work: Vec<Work> = entries
                                .into_iter()
                                .map(|e| if derived {
                                    Work::Derived {
                                        has_pending: pending_keys
                                            .unwrap_or(&pending_here)
                                            .contains(&e.item.key),
                                        entry: e.item,
                                    }
                                } else { Work::File {
                                    file: files
                                        .get(&e.item.key)
                                        .cloned()
                                        .or_else(|| ctx.stat_unlisted(&e.item.key)),
                                    has_pending: pending_keys
                                        .unwrap_or(&pending_here)
                                        .contains(&e.item.key),
                                    entry: e.item,
                                }})
                                .collect();
                            let keys: Option<Vec<String>> = work_log().map(|_| {
                                entries_keys(&work)
                            });
                            let result = ctx.process(work);
                            if let (Some(keys), Ok(refused)) = (&keys, &result) {
                                log_work(owner, keys, refused, polled_ms);
                            }
                            match result {
                                Ok(refused) => {
                                    // Another holder owns these now; it writes them.
                                    let issues: Vec<Issue> = refused
                                        .iter()
                                        .map(|r| {
                                            Issue::warning(r.key(), format!("not written: {r}"))
                                        })
                                        .collect();
                                    ctx.tally().issues(&issues);
                                }
                                Err(e) => {
                                    stop.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                            ctx.progress.inc(Phase::Processing, n);
                            if let Some(after) = after_batch {
                                after(ctx);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            let mut result = Ok(());
            for w in workers {
                let r = w.join().unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into());
                    Err(EngineError::Internal(format!("a worker panicked: {why}")))
                });
                if result.is_ok() {
                    result = r;
                }
            }
            drop(beat_tx);
            let _ = beat.join();
            // A failed run leaves no lease behind: its entries are pollable at once.
            if result.is_err() {
                let _ = store.unreserve(flow, None, Some(owner), now_ms());
            }
            result
        })
    }

    /// Takes the run lock of flow `flow` (`<data-dir>/locks/flow-<name>.lock`, flow names are
    /// valid file names; over a shared store, the store's lock `flow:<name>`), or says that
    /// another run of the flow holds it. Runs of different flows go on side by side; two runs
    /// of one flow never do, in this process or another (on this machine or, over a shared
    /// store, on any).
    pub(crate) fn lock(&self, flow: &str) -> Result<Option<RunLock>, EngineError> {
        if self.store.has_shared_locks() {
            return match self.store.try_lock(&format!("flow:{flow}"))? {
                Some(l) => Ok(Some(RunLock::Store(l))),
                None => Err(EngineError::Busy(format!(
                    "another run of flow `{flow}` is going in a process that shares the state store; wait for it to finish"
                ))),
            };
        }
        let Some(dir) = self.data_dir() else {
            return Ok(None);
        };
        let path = dir.join("locks").join(format!("flow-{flow}.lock"));
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RunLock::File(file))),
            Err(std::fs::TryLockError::WouldBlock) => Err(EngineError::Busy(format!(
                "another run of flow `{flow}` is going (lock {}); wait for it to finish",
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(EngineError::Internal(format!(
                "lock file {}: {e}",
                path.display()
            ))),
        }
    }

    /// Runs `body`, holding `lock` (the run lock of `flow` over a shared store), with options
    /// whose cancel flag is also raised when the lock is lost for good. A lock whose database
    /// session ended (a restart, a network failure) is taken again when it is free, and the
    /// run goes on; when another process took it meanwhile, the run stops between two batches
    /// with an error saying so, instead of going on beside another run of the flow.
    fn run_watching_lock(
        &self,
        flow: &str,
        lock: Option<RunLock>,
        opts: &RunOptions<'_>,
        body: impl FnOnce(&RunOptions<'_>) -> Result<RunSummary, EngineError>,
    ) -> Result<RunSummary, EngineError> {
        let stop = AtomicBool::new(false);
        let lost = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let mut lock = lock;
        std::thread::scope(|scope| {
            let (stop, lost, done, lock) = (&stop, &lost, &done, &mut lock);
            scope.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if lock.as_ref().is_some_and(|l| !l.is_held()) && !lost.load(Ordering::Relaxed)
                    {
                        match self.lock(flow) {
                            Ok(again) => {
                                tracing::warn!(
                                    flow,
                                    "the run lock's session ended; the lock was taken again"
                                );
                                *lock = again;
                            }
                            Err(EngineError::Busy(_)) => {
                                lost.store(true, Ordering::Relaxed);
                                stop.store(true, Ordering::Relaxed);
                            }
                            // The database is still away: try again at the next look.
                            Err(_) => {}
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            });
            let o = RunOptions {
                cancel: Some(stop),
                ..*opts
            };
            let result = body(&o);
            done.store(true, Ordering::Relaxed);
            result.map_err(|e| match e {
                EngineError::Cancelled(_) if lost.load(Ordering::Relaxed) => {
                    EngineError::Internal(
                        "the run lost its lock (the state store's session ended) and stopped: another process may run the flow now; what it committed stays".into(),
                    )
                }
                e => e,
            })
        })
    }

    /// The run lock of a run: [`Engine::lock`], but over a shared store a lock held briefly
    /// (another process storing the flow's definition at its start) is waited for, up to 3 s,
    /// before the run is refused as busy.
    pub(crate) fn lock_run(&self, flow: &str) -> Result<Option<RunLock>, EngineError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(3);
        loop {
            match self.lock(flow) {
                Err(EngineError::Busy(_))
                    if self.store.has_shared_locks() && Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Waits for the registry lock (`<data-dir>/locks/registry.lock`, or the shared store's
    /// lock `registry`), held while a flow's spec is checked against the others and stored,
    /// so that two processes cannot give one collection to two flows.
    fn registry_lock(&self) -> Result<Option<RunLock>, EngineError> {
        if self.store.has_shared_locks() {
            let deadline = Instant::now() + std::time::Duration::from_secs(120);
            loop {
                if let Some(l) = self.store.try_lock("registry")? {
                    return Ok(Some(RunLock::Store(l)));
                }
                if Instant::now() > deadline {
                    return Err(EngineError::Busy(
                        "the flow registry of the shared state store stayed locked for 2 minutes"
                            .into(),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let Some(dir) = self.data_dir() else {
            return Ok(None);
        };
        let path = dir.join("locks").join("registry.lock");
        let file = open_lock_file(&path)?;
        file.lock()
            .map_err(|e| EngineError::Internal(format!("lock file {}: {e}", path.display())))?;
        Ok(Some(RunLock::File(file)))
    }

    /// The lease holder this process's workers poll as.
    pub fn run_owner(&self) -> &str {
        &self.owner
    }

    /// The flow's target changed: deletes every row it tracked (and any pending key) from
    /// the old collection and forgets its items, so that the run rebuilds the new target from
    /// scratch while the memo cache keeps every embedding. Crash-safe: the lineage is
    /// forgotten only after its rows are deleted, and the old target stays the registered one
    /// until this completes, so an interrupted switch is redone. A reset of the flow does the
    /// same with its current target. Returns how many items were forgotten and how many
    /// tracked rows deleted.
    pub(crate) fn leave_target(
        &self,
        flow: FlowId,
        old: &TargetSpec,
    ) -> Result<(u64, u64), EngineError> {
        let old = self.existing_target(old)?;
        self.forget_items(flow, old.as_deref())
    }

    /// Forgets every item of the flow (queue entries, lineage, pending keys), each part
    /// after deleting the rows its lineage tracks from `old` when given. Returns how many
    /// items were forgotten and how many tracked rows they had.
    fn forget_items(
        &self,
        flow: FlowId,
        old: Option<&dyn VectorCollection>,
    ) -> Result<(u64, u64), EngineError> {
        let items = self.store.items(flow)?;
        let mut rows = 0u64;
        for part in items.chunks(1024) {
            let keys: Vec<&str> = part.iter().map(|i| i.key.as_str()).collect();
            let lineage = self.store.lineage(flow, &keys)?;
            rows += lineage
                .values()
                .map(|l| l.tracked.len() as u64)
                .sum::<u64>();
            if let Some(old) = old {
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
                        .map(|k| ItemChange::Delete {
                            key: k.to_string(),
                            if_queue: None,
                            version: None,
                        })
                        .collect(),
                    memo: Vec::new(),
                    gc_candidates: Vec::new(),
                    now_ms: now_ms(),
                    inputs: Default::default(),
                },
            )?;
        }
        Ok((items.len() as u64, rows))
    }

    /// The flow's target for reading: the handle this engine writes through when it has one
    /// open, else a read-only snapshot (another process may be writing it).
    /// A PostgreSQL table is read through this process's handle (created on first use); a
    /// missing table is [`VectorError::NotFound`](freshindex_vector::VectorError::NotFound).
    fn collection_of(&self, spec: &FlowSpec) -> Result<Arc<dyn VectorCollection>, EngineError> {
        match &spec.target {
            TargetSpec::Collection(c) => self.reader(&self.collections.resolve(&c.name)?),
            TargetSpec::Postgres(p) => {
                let table = self.pg_table(p)?;
                if !table.exists()? {
                    return Err(freshindex_vector::VectorError::NotFound(p.table.clone()).into());
                }
                Ok(table)
            }
        }
    }

    /// Collection `name` (a physical name) for reading: this process's open handle, or a
    /// read-only snapshot.
    fn reader(&self, name: &str) -> Result<Arc<dyn VectorCollection>, EngineError> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.get(name) {
            return Ok(c.clone());
        }
        drop(open);
        Ok(Arc::from(self.collections.open(name)?))
    }

    /// The `k` chunks of `flow` closest to `query`.
    pub fn search(
        &self,
        flow: &str,
        query: &str,
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<SearchHit>, EngineError> {
        Ok(self.search_with_model(flow, query, k, filter)?.hits)
    }

    /// A search of the flow's target that says which collection and model answered: the
    /// flow's collection name is resolved first, and the query is embedded with the model of
    /// the collection found — so a search during a reindex switch reads one collection with
    /// its own model, never a mix.
    pub fn search_with_model(
        &self,
        flow: &str,
        query: &str,
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Searched, EngineError> {
        let (_, spec) = self.stored_flow(flow)?;
        let Some(name) = spec.target.collection() else {
            // A table: no aliases, no reindex switch, the flow's own model.
            let embedder = embedder_for(spec.embed()).map_err(EngineError::Config)?;
            let v = embed_query(embedder.as_ref(), query)?;
            let hits = self.collection_of(&spec)?.search(&v, k, filter)?;
            return Ok(Searched {
                hits,
                collection: spec.target.name().to_string(),
                model: spec.embed().model.clone(),
            });
        };
        // A reindex switch moves a collection right after pointing the name elsewhere: a
        // search that resolved the name just before reads the new collection on its retry.
        let mut attempt = 0;
        let (physical, model, hits) = loop {
            attempt += 1;
            let physical = self.collections.resolve(name)?;
            let model = match self.collection_model(&physical)? {
                Some(m) => m,
                None => spec.embed().clone(),
            };
            let embedder = embedder_for(&model).map_err(EngineError::Config)?;
            let v = embed_query(embedder.as_ref(), query)?;
            match self
                .reader(&physical)
                .and_then(|c| Ok(c.search(&v, k, filter)?))
            {
                Ok(hits) => break (physical, model, hits),
                Err(EngineError::Target(freshindex_vector::VectorError::NotFound(_)))
                    if attempt < 3 && self.collections.resolve(name)? != physical => {}
                Err(e) => return Err(e),
            }
        };
        Ok(Searched {
            hits,
            collection: physical,
            model: model.model,
        })
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
                    collection: spec.target.name().into(),
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
            collection: spec.target.name().to_string(),
            target: spec.target.to_string(),
            items,
            rows,
            cache_entries,
            cache_bytes,
            last_run,
        })
    }
}

/// Whether a stored item lies where the scan could not look (see `Scan::unlisted`).
fn is_unlisted(unlisted: &[String], key: &str) -> bool {
    unlisted
        .iter()
        .any(|u| key == u || (u.ends_with('/') && key.starts_with(u.as_str())))
}

/// A full traversal, decided from the stored entries and the listing (both sorted by key).
struct Traversal {
    /// Listed items whose metadata hash differs from the stored one (or that are new), with
    /// their metadata hash: pushed with it.
    pushes: Vec<(String, String)>,
    /// Stored items of the previous traversal the scan did not list (and that do not lie
    /// where it could not look): `deleteQueueItems` removes them.
    unseen: Vec<String>,
    /// Items known only from pending keys of an interrupted first write (no queue entry) that
    /// the scan did not list: their keys are deleted directly.
    orphans: Vec<String>,
    /// Listed items whose push leaves them accepted (same metadata, settled status).
    unchanged: u64,
    /// Listed items with the same metadata whose entry still has work (failed, or cut short).
    unsettled: u64,
}

fn traversal(
    prior: &[ItemRecord],
    files: &[ScannedFile],
    unlisted: &[String],
    meta: impl Fn(&ScannedFile) -> String,
) -> Traversal {
    let mut out = Traversal {
        pushes: Vec::new(),
        unseen: Vec::new(),
        orphans: Vec::new(),
        unchanged: 0,
        unsettled: 0,
    };
    let mut prior = prior.iter().peekable();
    let unseen = |p: &ItemRecord, out: &mut Traversal| {
        if is_unlisted(unlisted, &p.key) {
            return;
        }
        if p.queue.is_empty() {
            out.orphans.push(p.key.clone());
        } else {
            out.unseen.push(p.key.clone());
        }
    };
    for f in files {
        while let Some(p) = prior.next_if(|p| p.key < f.key) {
            unseen(p, &mut out);
        }
        let m = meta(f);
        match prior.next_if(|p| p.key == f.key) {
            Some(p) if p.metadata_hash.as_deref() == Some(m.as_str()) => {
                if p.status.is_settled() {
                    out.unchanged += 1;
                } else {
                    out.unsettled += 1;
                }
            }
            _ => out.pushes.push((f.key.clone(), m)),
        }
    }
    for p in prior {
        unseen(p, &mut out);
    }
    out
}

/// The flow's built-in collection; for a target outside the data directory (a PostgreSQL
/// table), `what` is refused with an error saying why.
pub(crate) fn collection_target<'s>(
    spec: &'s FlowSpec,
    what: &str,
) -> Result<&'s str, EngineError> {
    spec.target.collection().ok_or_else(|| {
        EngineError::Invalid(format!(
            "flow `{}` writes to {}: {what}",
            spec.name, spec.target
        ))
    })
}

/// The query's vector.
fn embed_query(
    embedder: &dyn crate::steps::embed::Embedder,
    query: &str,
) -> Result<Vec<f32>, EngineError> {
    embedder
        .embed(&[query])
        .map_err(|e| EngineError::Config(format!("embedding the query: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| EngineError::Config("embedder returned no vector".into()))
}

/// Checks that the flow's steps can be built (a known model, a valid splitter).
pub(crate) fn check_steps(spec: &FlowSpec) -> Result<(), EngineError> {
    embedder_for(spec.embed()).map_err(EngineError::Config)?;
    Splitter::new(spec.split()).map_err(EngineError::Config)?;
    Ok(())
}

/// `FRESHINDEX_WORK_LOG=PATH`: every batch a worker wrote appends one line per item to
/// `PATH` — lease holder, key, poll time, end time (ms), and `refused` when the fence
/// refused it — so that tests can check that no item was processed by two workers at once.
fn work_log() -> Option<std::path::PathBuf> {
    std::env::var_os("FRESHINDEX_WORK_LOG").map(std::path::PathBuf::from)
}

fn entries_keys(work: &[Work]) -> Vec<String> {
    work.iter()
        .filter_map(|w| match w {
            Work::File { entry, .. } | Work::Derived { entry, .. } => Some(entry.key.clone()),
            _ => None,
        })
        .collect()
}

fn log_work(owner: &str, keys: &[String], refused: &[FenceError], polled_ms: i64) {
    use std::io::Write as _;
    let Some(path) = work_log() else { return };
    let refused: HashSet<&str> = refused.iter().map(FenceError::key).collect();
    let done = now_ms();
    let mut text = String::new();
    for k in keys {
        let flag = if refused.contains(k.as_str()) {
            "\trefused"
        } else {
            ""
        };
        text.push_str(&format!("{owner}\t{k}\t{polled_ms}\t{done}{flag}\n"));
    }
    // One append per batch: lines of concurrent writers do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        tracing::warn!("work log {}: {e}", path.display());
    }
}

/// A held run lock: a lock file of the data directory, or a lock of a shared state store.
/// Dropping it releases the lock.
#[derive(Debug)]
pub(crate) enum RunLock {
    /// An exclusive lock on a file of `<data-dir>/locks/` (held, never read).
    File(#[allow(dead_code)] std::fs::File),
    /// A lock of the shared state store.
    Store(freshindex_store::StoreLock),
}

impl RunLock {
    /// Whether the lock still holds (a shared store's lock is lost with its session).
    pub(crate) fn is_held(&self) -> bool {
        match self {
            RunLock::File(_) => true,
            RunLock::Store(l) => l.is_held(),
        }
    }
}

/// Opens (creating it and its folder) a lock file.
fn open_lock_file(path: &Path) -> Result<std::fs::File, EngineError> {
    // The data directory's own files: a failure here is the system's, not the flow's.
    let err =
        |e: std::io::Error| EngineError::Internal(format!("lock file {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(err)
}
