//! The index service (seed 003's IndexCoord): it tracks an index build per sealed segment of a
//! collection and hands the builds to index nodes.
//!
//! - **Indexes**: a collection has at most one live index (`hnsw` with default parameters
//!   unless defined otherwise). [`IndexService::build_index`] defines one (an identical request
//!   returns the existing ids); [`IndexService::drop_index`] marks every build of it `Deleted`,
//!   removes its files and leaves the collection searched exactly.
//! - **Builds**: one per (index, sealed segment without an index), created `Unissued` by
//!   [`IndexService::sync`]. Each has a version, bumped whenever it is (re)issued: a node's
//!   report counts only for the version it was given (fencing).
//! - **Nodes** register ([`IndexService::register_node`]), heartbeat, and take builds
//!   ([`IndexService::take`]). Assignment gives the least-retried ready build to the
//!   least-loaded live node with a free slot. A node silent for longer than the heartbeat
//!   timeout is declared lost: its builds return to `Unissued` with their version bumped.
//! - **Reports**: `Finished` attaches the file to the segment (the collection then searches
//!   it through the index); `Failed` retries with a doubling pause up to `max_retries`, then
//!   stays `Failed` with its reason. A report for another version, a lost node or a deleted
//!   build is ignored and its file removed.
//! - **Files**: nodes write `b<build>-v<version>.hnsw` into the shared build folder; any file
//!   there that is not the current version of a build in progress is an orphan, removed by
//!   [`IndexService::sweep_orphans`].
//!
//! State lives in memory and is written through to the state store
//! ([`IndexRecordStore`](freshindex_store::IndexRecordStore)) on every change, so a restarted
//! service resumes with the same ids; builds that were in progress are issued again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use freshindex_store::StateStore;
use freshindex_vector::ann::HnswParams;
use freshindex_vector::{Metric, SegmentInfo};
use serde::{Deserialize, Serialize};

use crate::EngineError;

const KIND_INDEX: &str = "index";
const KIND_BUILD: &str = "build";
const KIND_NODE: &str = "node";
/// One record (id 0) with the next ids, so that no id is reused after a restart.
const KIND_COUNTERS: &str = "counters";

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Counters {
    index: u64,
    build: u64,
    node: u64,
}

/// The name of the index a collection gets when none was defined.
pub const DEFAULT_INDEX: &str = "hnsw";

/// The state of an index build, as seed 003 names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IndexState {
    /// No such build.
    None,
    /// Waiting for a node.
    Unissued,
    /// A node builds it.
    InProgress,
    /// Built; the segment searches through it.
    Finished,
    /// Failed more often than the retry limit allows (the reason is kept).
    Failed,
    /// Its index was dropped, or its segment compacted away.
    Deleted,
}

/// Parameters of an index: the metric and HNSW's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexParams {
    /// Similarity metric (the collection's).
    pub metric: Metric,
    /// HNSW's M.
    pub m: usize,
    /// ef_construction.
    pub ef_construction: usize,
    /// ef at search time.
    pub ef_search: usize,
    /// Store vectors as 16-bit floats.
    #[serde(default)]
    pub half_precision: bool,
}

impl IndexParams {
    /// The HNSW part.
    pub fn hnsw(&self) -> HnswParams {
        HnswParams {
            m: self.m,
            ef_construction: self.ef_construction,
            ef_search: self.ef_search,
            half_precision: self.half_precision,
        }
    }

    /// Defaults for `metric`.
    pub fn defaults(metric: Metric) -> IndexParams {
        let h = HnswParams::default();
        IndexParams {
            metric,
            m: h.m,
            ef_construction: h.ef_construction,
            ef_search: h.ef_search,
            half_precision: h.half_precision,
        }
    }
}

/// An index of a collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexDef {
    /// Index id.
    pub index_id: u64,
    /// Its collection.
    pub collection: String,
    /// Its name.
    pub name: String,
    /// Its parameters.
    pub params: IndexParams,
    /// Dropped (kept so that sync does not define the default again).
    pub dropped: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// One index build: an index over one sealed segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexBuild {
    /// Build id.
    pub build_id: u64,
    /// Index id.
    pub index_id: u64,
    /// Index name.
    pub index_name: String,
    /// Collection.
    pub collection: String,
    /// Segment id within the collection.
    pub segment: u64,
    /// The segment file(s) the build reads.
    pub data_paths: Vec<PathBuf>,
    /// Type parameters (`dim`).
    pub type_params: BTreeMap<String, String>,
    /// Index parameters.
    pub index_params: IndexParams,
    /// State.
    pub state: IndexState,
    /// Why it failed (last failure while retrying, the final one once `Failed`).
    pub fail_reason: Option<String>,
    /// Bumped at every issue: reports for another version are ignored.
    pub version: u64,
    /// The node building it (while `InProgress`).
    pub node_id: Option<u64>,
    /// Failed attempts so far.
    pub retries: u32,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Last issued to a node.
    pub issued_ms: Option<i64>,
    /// Finished, failed for good or deleted.
    pub ended_ms: Option<i64>,
    /// Not issued again before this time (a pause after a failure).
    pub ready_at_ms: i64,
    /// Where the node writes the index (for the current version).
    pub output_path: PathBuf,
    /// The index files once finished.
    pub file_paths: Vec<PathBuf>,
    /// Whether the current version was handed to its node.
    #[serde(default)]
    pub handed_out: bool,
}

/// An index node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexNode {
    /// Node id.
    pub node_id: u64,
    /// Where it runs (as it said when registering).
    pub address: String,
    /// Builds it runs at once.
    pub capacity: u32,
    /// Registered, ms since the epoch.
    pub registered_ms: i64,
    /// Last heartbeat.
    pub last_heartbeat_ms: i64,
    /// False once it missed the heartbeat timeout.
    pub alive: bool,
    /// Builds only this collection's indexes (a one-shot run's own node).
    #[serde(default)]
    pub only_collection: Option<String>,
}

/// What [`IndexService::register_node`] gives a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeGrant {
    /// Its id.
    pub node_id: u64,
    /// Heartbeat at least this often.
    pub heartbeat_interval_ms: u64,
    /// Declared lost after this long without one.
    pub heartbeat_timeout_ms: u64,
}

/// How a report was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ReportOutcome {
    /// Recorded.
    Accepted,
    /// The report was for a version, node or build that is no longer current; its file was
    /// removed.
    Ignored(String),
}

/// Figures of the service.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexMetrics {
    /// Builds by state.
    pub builds: BTreeMap<String, u64>,
    /// Time from creation to first issue, ms: (median, max) of finished builds.
    pub queue_wait_ms: (u64, u64),
    /// Time from issue to finish, ms: (median, max) of finished builds.
    pub build_ms: (u64, u64),
    /// Nodes, with the builds each runs.
    pub nodes: Vec<NodeLoad>,
}

/// A node and its load.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeLoad {
    /// The node.
    #[serde(flatten)]
    pub node: IndexNode,
    /// Builds in progress on it.
    pub load: u32,
}

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct IndexServiceOptions {
    /// Where nodes write index files (a folder every node and the service can reach).
    pub build_dir: PathBuf,
    /// A node is lost after this long without a heartbeat.
    pub heartbeat_timeout_ms: u64,
    /// Failed attempts before a build stays `Failed`.
    pub max_retries: u32,
    /// A build in progress this long without a report counts as failed ("timed out") and is
    /// issued again: nothing stays `InProgress` forever, whatever happened to the node.
    pub build_timeout_ms: u64,
    /// The pause after the first failure; it doubles with each one, up to 5 minutes.
    pub retry_pause_ms: u64,
    /// Prefix of the kinds of the service's records in the store: empty for a store of its
    /// own; over a store other data directories share, one per data directory, so that the
    /// services of several directories keep apart (each owns its directory's collections).
    pub records_prefix: String,
}

impl IndexServiceOptions {
    /// Defaults with builds written under `build_dir`.
    pub fn new(build_dir: PathBuf) -> IndexServiceOptions {
        IndexServiceOptions {
            build_dir,
            heartbeat_timeout_ms: 30_000,
            max_retries: 3,
            retry_pause_ms: 1_000,
            build_timeout_ms: 30 * 60 * 1000,
            records_prefix: String::new(),
        }
    }
}

/// What the service needs from the collections it indexes (the engine provides it).
pub trait SegmentHost: Send + Sync {
    /// The collection's metric, dimension and sealed segments (`None`: no such collection).
    fn segments(
        &self,
        collection: &str,
    ) -> Result<Option<(Metric, usize, Vec<SegmentInfo>)>, EngineError>;
    /// Attaches a built file to a segment, searched with `ef_search`; `false` when the
    /// segment is gone or indexed.
    fn attach(
        &self,
        collection: &str,
        segment: u64,
        file: &Path,
        ef_search: usize,
    ) -> Result<bool, EngineError>;
    /// Removes every index of the collection.
    fn drop_indexes(&self, collection: &str) -> Result<(), EngineError>;
}

#[derive(Default)]
struct State {
    indexes: BTreeMap<u64, IndexDef>,
    builds: BTreeMap<u64, IndexBuild>,
    nodes: BTreeMap<u64, IndexNode>,
    next_index: u64,
    next_build: u64,
    next_node: u64,
    /// Builds whose file is being attached right now (outside the lock): nothing reissues,
    /// deletes or fails them meanwhile, and drops wait for them.
    attaching: std::collections::BTreeSet<u64>,
}

/// The index service (see the module documentation).
pub struct IndexService {
    store: Arc<dyn StateStore>,
    opts: IndexServiceOptions,
    state: Mutex<State>,
    /// Signalled when an attachment ends.
    attached: std::sync::Condvar,
}

impl std::fmt::Debug for IndexService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexService")
            .field("build_dir", &self.opts.build_dir)
            .finish_non_exhaustive()
    }
}

fn json<T: Serialize>(v: &T) -> Result<String, EngineError> {
    serde_json::to_string(v).map_err(|e| EngineError::Internal(format!("encoding: {e}")))
}

fn load<T: for<'de> Deserialize<'de>>(
    store: &dyn StateStore,
    kind: &str,
) -> Result<BTreeMap<u64, T>, EngineError> {
    store
        .index_records(kind)?
        .into_iter()
        .map(|(id, doc)| {
            serde_json::from_str(&doc)
                .map(|v| (id, v))
                .map_err(|e| EngineError::Internal(format!("stored index {kind} {id}: {e}")))
        })
        .collect()
}

fn median_max(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    match v.last() {
        Some(&max) => (v[v.len() / 2], max),
        None => (0, 0),
    }
}

impl IndexService {
    /// The store kind of the service's records of kind `k`.
    fn kind(&self, k: &str) -> String {
        format!("{}{k}", self.opts.records_prefix)
    }

    /// The service over `store`, resuming its recorded state: builds that were in progress
    /// go back to `Unissued` (their nodes belong to a previous life of the service).
    pub fn open(
        store: Arc<dyn StateStore>,
        opts: IndexServiceOptions,
    ) -> Result<IndexService, EngineError> {
        let kind = |k: &str| format!("{}{k}", opts.records_prefix);
        let indexes: BTreeMap<u64, IndexDef> = load(store.as_ref(), &kind(KIND_INDEX))?;
        let builds: BTreeMap<u64, IndexBuild> = load(store.as_ref(), &kind(KIND_BUILD))?;
        let nodes: BTreeMap<u64, IndexNode> = load(store.as_ref(), &kind(KIND_NODE))?;
        let saved: Counters = load::<Counters>(store.as_ref(), &kind(KIND_COUNTERS))?
            .remove(&0)
            .unwrap_or_default();
        let st = State {
            next_index: indexes
                .keys()
                .next_back()
                .map_or(1, |k| k + 1)
                .max(saved.index),
            next_build: builds
                .keys()
                .next_back()
                .map_or(1, |k| k + 1)
                .max(saved.build),
            next_node: nodes
                .keys()
                .next_back()
                .map_or(1, |k| k + 1)
                .max(saved.node),
            indexes,
            builds,
            nodes,
            attaching: Default::default(),
        };
        let service = IndexService {
            store,
            opts,
            state: Mutex::new(st),
            attached: std::sync::Condvar::new(),
        };
        {
            let mut st = service.lock();
            let mut changed_nodes = Vec::new();
            for n in st.nodes.values_mut().filter(|n| n.alive) {
                n.alive = false;
                changed_nodes.push(n.clone());
            }
            let mut changed = Vec::new();
            for b in st.builds.values_mut() {
                if b.state == IndexState::InProgress {
                    reissue(b, &service.opts.build_dir);
                    changed.push(b.clone());
                }
            }
            service.save(&[], &changed, &changed_nodes)?;
            service.save_counters(&st)?;
        }
        Ok(service)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, once no build of `collection` is being attached.
    fn lock_settled(&self, collection: &str) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        while st.attaching.iter().any(|id| {
            st.builds
                .get(id)
                .is_some_and(|b| b.collection == collection)
        }) {
            st = self.attached.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st
    }

    /// The folder nodes write into.
    pub fn build_dir(&self) -> &Path {
        &self.opts.build_dir
    }

    /// The settings.
    pub fn options(&self) -> &IndexServiceOptions {
        &self.opts
    }

    fn save_counters(&self, st: &State) -> Result<(), EngineError> {
        let c = Counters {
            index: st.next_index,
            build: st.next_build,
            node: st.next_node,
        };
        self.store
            .put_index_records(&[(&self.kind(KIND_COUNTERS), 0, json(&c)?)])?;
        Ok(())
    }

    fn save(
        &self,
        indexes: &[IndexDef],
        builds: &[IndexBuild],
        nodes: &[IndexNode],
    ) -> Result<(), EngineError> {
        let (ki, kb, kn) = (
            self.kind(KIND_INDEX),
            self.kind(KIND_BUILD),
            self.kind(KIND_NODE),
        );
        let mut records = Vec::new();
        for i in indexes {
            records.push((ki.as_str(), i.index_id, json(i)?));
        }
        for b in builds {
            records.push((kb.as_str(), b.build_id, json(b)?));
        }
        for n in nodes {
            records.push((kn.as_str(), n.node_id, json(n)?));
        }
        if !records.is_empty() {
            self.store.put_index_records(&records)?;
        }
        Ok(())
    }

    /// Defines index `name` on `collection` (the default parameters of its metric unless
    /// given), and creates the builds of its sealed segments. An identical request returns the
    /// same index and builds; another definition while one is live is a conflict.
    pub fn build_index(
        &self,
        host: &dyn SegmentHost,
        collection: &str,
        name: &str,
        params: Option<IndexParams>,
        now_ms: i64,
    ) -> Result<(u64, Vec<u64>), EngineError> {
        let Some((metric, _, _)) = host.segments(collection)? else {
            return Err(EngineError::NotFound(format!(
                "no collection named `{collection}`"
            )));
        };
        let params = params.unwrap_or_else(|| IndexParams::defaults(metric));
        if params.metric != metric {
            return Err(EngineError::Invalid(format!(
                "indexParams.metric: the collection `{collection}` uses {metric:?}, not {:?}",
                params.metric
            )));
        }
        params
            .hnsw()
            .validate()
            .map_err(|e| EngineError::Invalid(format!("indexParams: {e}")))?;
        let index_id = {
            let mut st = self.lock();
            match st
                .indexes
                .values()
                .find(|i| i.collection == collection && !i.dropped)
            {
                Some(i) if i.name == name && i.params == params => i.index_id,
                Some(i) => {
                    return Err(EngineError::Conflict(format!(
                        "collection `{collection}` already has index `{}` (id {}) with other parameters; drop it first",
                        i.name, i.index_id
                    )));
                }
                None => {
                    let def = IndexDef {
                        index_id: st.next_index,
                        collection: collection.into(),
                        name: name.into(),
                        params,
                        dropped: false,
                        created_ms: now_ms,
                    };
                    self.save(std::slice::from_ref(&def), &[], &[])?;
                    st.next_index += 1;
                    self.save_counters(&st)?;
                    st.indexes.insert(def.index_id, def.clone());
                    def.index_id
                }
            }
        };
        self.sync(host, collection, now_ms)?;
        let st = self.lock();
        let builds = st
            .builds
            .values()
            .filter(|b| b.index_id == index_id && b.state != IndexState::Deleted)
            .map(|b| b.build_id)
            .collect();
        Ok((index_id, builds))
    }

    /// The live index of a collection.
    pub fn index_of(&self, collection: &str) -> Option<IndexDef> {
        self.lock()
            .indexes
            .values()
            .find(|i| i.collection == collection && !i.dropped)
            .cloned()
    }

    /// Drops index `name` of `collection`: its builds become `Deleted` (a node's later
    /// report is ignored), their files and the collection's index files are removed. Returns
    /// the index id and how many builds it had.
    pub fn drop_index(
        &self,
        host: &dyn SegmentHost,
        collection: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<(u64, usize), EngineError> {
        let mut st = self.lock_settled(collection);
        let Some(mut def) = st
            .indexes
            .values()
            .find(|i| i.collection == collection && i.name == name && !i.dropped)
            .cloned()
        else {
            return Err(EngineError::NotFound(format!(
                "collection `{collection}` has no index named `{name}`"
            )));
        };
        def.dropped = true;
        let mut changed: Vec<IndexBuild> = st
            .builds
            .values()
            .filter(|b| b.index_id == def.index_id && b.state != IndexState::Deleted)
            .cloned()
            .collect();
        for b in &mut changed {
            b.state = IndexState::Deleted;
            b.node_id = None;
            b.ended_ms = Some(now_ms);
        }
        // Recorded first: memory follows the store, never the other way round.
        self.save(std::slice::from_ref(&def), &changed, &[])?;
        for b in &changed {
            let _ = std::fs::remove_file(&b.output_path);
            st.builds.insert(b.build_id, b.clone());
        }
        st.indexes.insert(def.index_id, def.clone());
        // Under the service's lock, so that no build of a newer index attaches meanwhile.
        host.drop_indexes(collection)?;
        Ok((def.index_id, changed.len()))
    }

    /// Brings the builds of `collection` in line with its segments: a build `Unissued` for
    /// each sealed segment without an index that has none, and `Deleted` for builds whose
    /// segment is gone. A collection that never had an index defined gets the default one.
    pub fn sync(
        &self,
        host: &dyn SegmentHost,
        collection: &str,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        let Some((metric, dim, segments)) = host.segments(collection)? else {
            return Ok(());
        };
        let mut st = self.lock();
        let def = match st
            .indexes
            .values()
            .find(|i| i.collection == collection && !i.dropped)
        {
            Some(d) => d.clone(),
            None if st.indexes.values().any(|i| i.collection == collection) => return Ok(()),
            None => {
                let d = IndexDef {
                    index_id: st.next_index,
                    collection: collection.into(),
                    name: DEFAULT_INDEX.into(),
                    params: IndexParams::defaults(metric),
                    dropped: false,
                    created_ms: now_ms,
                };
                self.save(std::slice::from_ref(&d), &[], &[])?;
                st.next_index += 1;
                self.save_counters(&st)?;
                st.indexes.insert(d.index_id, d.clone());
                d
            }
        };
        let mut changed = Vec::new();
        let live: std::collections::BTreeSet<u64> = segments.iter().map(|s| s.id).collect();
        let attaching = st.attaching.clone();
        for b in st.builds.values_mut().filter(|b| {
            b.index_id == def.index_id
                && !matches!(b.state, IndexState::Deleted)
                && !live.contains(&b.segment)
                && !attaching.contains(&b.build_id)
        }) {
            let _ = std::fs::remove_file(&b.output_path);
            b.state = IndexState::Deleted;
            b.node_id = None;
            b.ended_ms = Some(now_ms);
            changed.push(b.clone());
        }
        for seg in segments.iter().filter(|s| !s.indexed && s.rows > 0) {
            let has = st.builds.values().any(|b| {
                b.index_id == def.index_id && b.segment == seg.id && b.state != IndexState::Deleted
            });
            if has {
                continue;
            }
            let build_id = st.next_build;
            st.next_build += 1;
            self.save_counters(&st)?;
            let b = IndexBuild {
                build_id,
                index_id: def.index_id,
                index_name: def.name.clone(),
                collection: collection.into(),
                segment: seg.id,
                data_paths: vec![seg.data_path.clone()],
                type_params: BTreeMap::from([("dim".to_string(), dim.to_string())]),
                index_params: def.params,
                state: IndexState::Unissued,
                fail_reason: None,
                version: 1,
                node_id: None,
                retries: 0,
                created_ms: now_ms,
                issued_ms: None,
                ended_ms: None,
                ready_at_ms: now_ms,
                output_path: output_path(&self.opts.build_dir, build_id, 1),
                file_paths: Vec::new(),
                handed_out: false,
            };
            st.builds.insert(build_id, b.clone());
            changed.push(b);
        }
        self.save(&[], &changed, &[])
    }

    /// Forgets the indexes of a dropped collection: its builds become `Deleted` and its
    /// index definitions dropped.
    pub fn forget_collection(&self, collection: &str, now_ms: i64) -> Result<(), EngineError> {
        let mut st = self.lock_settled(collection);
        let defs: Vec<u64> = st
            .indexes
            .values()
            .filter(|d| d.collection == collection)
            .map(|d| d.index_id)
            .collect();
        self.store
            .delete_index_records(&self.kind(KIND_INDEX), &defs)?;
        for id in &defs {
            st.indexes.remove(id);
        }
        let mut changed = Vec::new();
        for b in st
            .builds
            .values_mut()
            .filter(|b| b.collection == collection && b.state != IndexState::Deleted)
        {
            let _ = std::fs::remove_file(&b.output_path);
            b.state = IndexState::Deleted;
            b.node_id = None;
            b.ended_ms = Some(now_ms);
            changed.push(b.clone());
        }
        self.save(&[], &changed, &[])
    }

    /// Registers a node at `address` running `capacity` builds at once.
    pub fn register_node(
        &self,
        address: &str,
        capacity: u32,
        now_ms: i64,
    ) -> Result<NodeGrant, EngineError> {
        self.register_node_for(address, capacity, None, now_ms)
    }

    /// Registers a node that builds only `collection`'s indexes (when given).
    pub fn register_node_for(
        &self,
        address: &str,
        capacity: u32,
        collection: Option<&str>,
        now_ms: i64,
    ) -> Result<NodeGrant, EngineError> {
        if address.trim().is_empty() {
            return Err(EngineError::Invalid("address: must not be empty".into()));
        }
        let mut st = self.lock();
        let node = IndexNode {
            node_id: st.next_node,
            address: address.into(),
            capacity: capacity.max(1),
            registered_ms: now_ms,
            last_heartbeat_ms: now_ms,
            alive: true,
            only_collection: collection.map(str::to_string),
        };
        self.save(&[], &[], std::slice::from_ref(&node))?;
        st.next_node += 1;
        self.save_counters(&st)?;
        st.nodes.insert(node.node_id, node.clone());
        let timeout = self.opts.heartbeat_timeout_ms;
        Ok(NodeGrant {
            node_id: node.node_id,
            heartbeat_interval_ms: (timeout / 3).max(1),
            heartbeat_timeout_ms: timeout,
        })
    }

    /// Forgets node `node_id` (a node that stops on purpose); its builds are issued again.
    pub fn deregister_node(&self, node_id: u64) -> Result<(), EngineError> {
        let mut st = self.lock();
        let mut changed = Vec::new();
        let attaching = st.attaching.clone();
        for b in st.builds.values_mut() {
            if b.state == IndexState::InProgress
                && b.node_id == Some(node_id)
                && !attaching.contains(&b.build_id)
            {
                reissue(b, &self.opts.build_dir);
                changed.push(b.clone());
            }
        }
        self.save(&[], &changed, &[])?;
        if st.nodes.remove(&node_id).is_some() {
            self.store
                .delete_index_records(&self.kind(KIND_NODE), &[node_id])?;
        }
        Ok(())
    }

    /// A heartbeat of node `node_id`. A node declared lost must register again
    /// ([`EngineError::Conflict`]).
    pub fn heartbeat(&self, node_id: u64, now_ms: i64) -> Result<(), EngineError> {
        let mut st = self.lock();
        self.expire_locked(&mut st, now_ms)?;
        let Some(n) = st.nodes.get_mut(&node_id) else {
            return Err(EngineError::NotFound(format!("no index node {node_id}")));
        };
        if !n.alive {
            return Err(EngineError::Conflict(format!(
                "index node {node_id} was declared lost (no heartbeat for {} ms); its builds went to other nodes — register again",
                self.opts.heartbeat_timeout_ms
            )));
        }
        n.last_heartbeat_ms = now_ms;
        Ok(())
    }

    /// Declares lost the nodes silent past the timeout; their builds go back to `Unissued`.
    pub fn expire(&self, now_ms: i64) -> Result<(), EngineError> {
        let mut st = self.lock();
        self.expire_locked(&mut st, now_ms)
    }

    fn expire_locked(&self, st: &mut State, now_ms: i64) -> Result<(), EngineError> {
        let limit = i64::try_from(self.opts.build_timeout_ms).unwrap_or(i64::MAX);
        let late: Vec<u64> = st
            .builds
            .values()
            .filter(|b| {
                b.state == IndexState::InProgress
                    && b.issued_ms
                        .is_some_and(|t| now_ms.saturating_sub(t) > limit)
                    && !st.attaching.contains(&b.build_id)
            })
            .map(|b| b.build_id)
            .collect();
        let mut timed_out = Vec::new();
        for id in late {
            if let Some(b) = st.builds.get_mut(&id) {
                let reason = format!(
                    "timed out: no report from node {:?} within {} ms",
                    b.node_id, self.opts.build_timeout_ms
                );
                let _ = std::fs::remove_file(&b.output_path);
                self.failed_locked(b, &reason, now_ms);
                timed_out.push(b.clone());
            }
        }
        self.save(&[], &timed_out, &[])?;
        let timeout = self.opts.heartbeat_timeout_ms as i64;
        let mut lost = Vec::new();
        for n in st.nodes.values_mut() {
            if n.alive && now_ms - n.last_heartbeat_ms > timeout {
                n.alive = false;
                lost.push(n.clone());
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        let mut changed = Vec::new();
        let attaching = st.attaching.clone();
        for b in st.builds.values_mut() {
            if b.state == IndexState::InProgress
                && lost.iter().any(|n| Some(n.node_id) == b.node_id)
                && !attaching.contains(&b.build_id)
            {
                reissue(b, &self.opts.build_dir);
                changed.push(b.clone());
            }
        }
        for n in &lost {
            tracing::warn!(
                node = n.node_id,
                address = %n.address,
                builds = changed.len(),
                "index node lost (no heartbeat); its builds are issued again"
            );
        }
        self.save(&[], &changed, &lost)
    }

    fn assign_locked(&self, st: &mut State, now_ms: i64) -> Vec<IndexBuild> {
        let mut ready: Vec<(u32, u64)> = st
            .builds
            .values()
            .filter(|b| b.state == IndexState::Unissued && b.ready_at_ms <= now_ms)
            .map(|b| (b.retries, b.build_id))
            .collect();
        ready.sort_unstable();
        let mut load: BTreeMap<u64, u32> = st
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| (n.node_id, 0))
            .collect();
        for b in st.builds.values() {
            if b.state == IndexState::InProgress
                && let Some(l) = b.node_id.and_then(|n| load.get_mut(&n))
            {
                *l += 1;
            }
        }
        let mut changed = Vec::new();
        for (_, build_id) in ready {
            let Some(collection) = st.builds.get(&build_id).map(|b| b.collection.clone()) else {
                continue;
            };
            let Some((&node, _)) = load
                .iter()
                .filter(|(id, l)| {
                    st.nodes.get(id).is_some_and(|n| {
                        **l < n.capacity
                            && n.only_collection.as_ref().is_none_or(|c| *c == collection)
                    })
                })
                .min_by_key(|(id, l)| (**l, **id))
            else {
                continue;
            };
            if let Some(l) = load.get_mut(&node) {
                *l += 1;
            }
            if let Some(b) = st.builds.get_mut(&build_id) {
                b.state = IndexState::InProgress;
                b.node_id = Some(node);
                b.issued_ms = Some(now_ms);
                b.handed_out = false;
                changed.push(b.clone());
            }
        }
        changed
    }

    /// Node `node_id` asks for work (also a heartbeat): builds are assigned, then one build
    /// assigned to it and not yet handed out is returned.
    pub fn take(&self, node_id: u64, now_ms: i64) -> Result<Option<IndexBuild>, EngineError> {
        self.heartbeat(node_id, now_ms)?;
        let mut st = self.lock();
        let mut changed = self.assign_locked(&mut st, now_ms);
        let mine = st
            .builds
            .values_mut()
            .filter(|b| {
                b.state == IndexState::InProgress && b.node_id == Some(node_id) && !b.handed_out
            })
            .min_by_key(|b| (b.retries, b.build_id));
        let taken = mine.map(|b| {
            b.handed_out = true;
            b.clone()
        });
        if let Some(t) = &taken {
            changed.retain(|b| b.build_id != t.build_id);
            changed.push(t.clone());
        }
        self.save(&[], &changed, &[])?;
        Ok(taken)
    }

    /// Checks that a report of `build_id` at `version` from `node_id` is current.
    fn current(
        st: &mut State,
        build_id: u64,
        version: u64,
        node_id: u64,
    ) -> Result<&mut IndexBuild, String> {
        let node_alive = st.nodes.get(&node_id).is_some_and(|n| n.alive);
        if st.attaching.contains(&build_id) {
            return Err(format!("build {build_id} is being attached"));
        }
        let Some(b) = st.builds.get_mut(&build_id) else {
            return Err(format!("no build {build_id}"));
        };
        if b.state != IndexState::InProgress {
            return Err(format!("build {build_id} is {:?}", b.state));
        }
        if b.version != version || b.node_id != Some(node_id) {
            return Err(format!(
                "build {build_id} version {version} was issued again (now version {} on node {:?})",
                b.version, b.node_id
            ));
        }
        if !node_alive {
            return Err(format!("node {node_id} was declared lost"));
        }
        Ok(b)
    }

    /// Node `node_id` finished version `version` of `build_id`, writing `file`.
    pub fn report_finished(
        &self,
        host: &dyn SegmentHost,
        build_id: u64,
        version: u64,
        node_id: u64,
        file: &Path,
        now_ms: i64,
    ) -> Result<ReportOutcome, EngineError> {
        let mut st = self.lock();
        let b = match Self::current(&mut st, build_id, version, node_id) {
            Ok(b) => b,
            Err(why) => {
                // The stale node's file, by the name this service gave it (never a path
                // taken from the request).
                if st.builds.contains_key(&build_id) {
                    let _ =
                        std::fs::remove_file(output_path(&self.opts.build_dir, build_id, version));
                }
                return Ok(ReportOutcome::Ignored(why));
            }
        };
        if file != b.output_path {
            return Err(EngineError::Invalid(format!(
                "path: build {build_id} version {version} writes {}, not {}",
                b.output_path.display(),
                file.display()
            )));
        }
        let (collection, segment, ef) = (b.collection.clone(), b.segment, b.index_params.ef_search);
        // Attached without the service's lock (it may wait for the collection): heartbeats and
        // other builds go on; nothing changes this build meanwhile (see `attaching`).
        st.attaching.insert(build_id);
        drop(st);
        let attached = host.attach(&collection, segment, file, ef);
        let file_paths = match attached {
            Ok(true) => host
                .segments(&collection)
                .ok()
                .flatten()
                .and_then(|(_, _, segs)| segs.into_iter().find(|s| s.id == segment))
                .map(|s| vec![s.data_path.with_extension("hnsw")])
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut st = self.lock();
        st.attaching.remove(&build_id);
        self.attached.notify_all();
        let b = st
            .builds
            .get_mut(&build_id)
            .ok_or_else(|| EngineError::Internal(format!("build {build_id} vanished")))?;
        match attached {
            Ok(true) => {
                b.state = IndexState::Finished;
                b.file_paths = file_paths;
                b.node_id = None;
                b.ended_ms = Some(now_ms);
                b.fail_reason = None;
            }
            Ok(false) => {
                let _ = std::fs::remove_file(file);
                b.state = IndexState::Deleted;
                b.node_id = None;
                b.ended_ms = Some(now_ms);
            }
            // The collection is busy elsewhere (another process writes it): not the build's
            // fault; issued again shortly, without counting a failure.
            Err(EngineError::Busy(_)) => {
                let _ = std::fs::remove_file(file);
                reissue(b, &self.opts.build_dir);
                b.ready_at_ms = now_ms + 5_000;
            }
            Err(e) => {
                let _ = std::fs::remove_file(file);
                self.failed_locked(b, &format!("attaching the index: {e}"), now_ms);
            }
        }
        let b = b.clone();
        self.save(&[], &[b], &[])?;
        Ok(ReportOutcome::Accepted)
    }

    fn failed_locked(&self, b: &mut IndexBuild, reason: &str, now_ms: i64) {
        b.retries += 1;
        b.fail_reason = Some(reason.into());
        b.node_id = None;
        if b.retries > self.opts.max_retries {
            b.state = IndexState::Failed;
            b.ended_ms = Some(now_ms);
        } else {
            let pause = self
                .opts
                .retry_pause_ms
                .saturating_mul(1 << (b.retries - 1).min(20))
                .min(300_000);
            reissue(b, &self.opts.build_dir);
            b.ready_at_ms = now_ms + pause as i64;
        }
    }

    /// Node `node_id` failed version `version` of `build_id` for `reason`.
    pub fn report_failed(
        &self,
        build_id: u64,
        version: u64,
        node_id: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<ReportOutcome, EngineError> {
        let mut st = self.lock();
        let b = match Self::current(&mut st, build_id, version, node_id) {
            Ok(b) => b,
            Err(why) => return Ok(ReportOutcome::Ignored(why)),
        };
        let _ = std::fs::remove_file(&b.output_path);
        self.failed_locked(b, reason, now_ms);
        let b = b.clone();
        self.save(&[], &[b], &[])?;
        Ok(ReportOutcome::Accepted)
    }

    /// Builds by id (`None` for an unknown id: state `None`).
    pub fn builds(&self, ids: &[u64]) -> Vec<(u64, Option<IndexBuild>)> {
        let st = self.lock();
        ids.iter()
            .map(|id| (*id, st.builds.get(id).cloned()))
            .collect()
    }

    /// Every build of `collection` (all collections when `None`).
    pub fn builds_of(&self, collection: Option<&str>) -> Vec<IndexBuild> {
        self.lock()
            .builds
            .values()
            .filter(|b| collection.is_none_or(|c| b.collection == c))
            .cloned()
            .collect()
    }

    /// The nodes and their load.
    pub fn nodes(&self) -> Vec<NodeLoad> {
        let st = self.lock();
        st.nodes
            .values()
            .map(|n| NodeLoad {
                node: n.clone(),
                load: st
                    .builds
                    .values()
                    .filter(|b| b.state == IndexState::InProgress && b.node_id == Some(n.node_id))
                    .count() as u32,
            })
            .collect()
    }

    /// Figures: builds by state, queue waits, build times, nodes.
    pub fn metrics(&self) -> IndexMetrics {
        let nodes = self.nodes();
        let st = self.lock();
        let mut builds = BTreeMap::new();
        let (mut waits, mut times) = (Vec::new(), Vec::new());
        for b in st.builds.values() {
            *builds.entry(format!("{:?}", b.state)).or_insert(0) += 1;
            if b.state == IndexState::Finished
                && let (Some(i), Some(e)) = (b.issued_ms, b.ended_ms)
            {
                waits.push((i - b.created_ms).max(0) as u64);
                times.push((e - i).max(0) as u64);
            }
        }
        IndexMetrics {
            builds,
            queue_wait_ms: median_max(waits),
            build_ms: median_max(times),
            nodes,
        }
    }

    /// Removes files of the build folder that are no current build's output: left by a node
    /// that was declared lost, a deleted build, or a crash. Returns how many.
    pub fn sweep_orphans(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.opts.build_dir) else {
            return 0;
        };
        let st = self.lock();
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((id, version)) = parse_output_name(&name) else {
                continue;
            };
            let current = st
                .builds
                .get(&id)
                .is_some_and(|b| b.state == IndexState::InProgress && b.version == version);
            if !current && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Sends a build back to `Unissued` under a new version.
fn reissue(b: &mut IndexBuild, build_dir: &Path) {
    b.state = IndexState::Unissued;
    b.node_id = None;
    b.handed_out = false;
    b.version += 1;
    b.output_path = output_path(build_dir, b.build_id, b.version);
}

/// Where a node writes version `version` of build `build_id`.
pub fn output_path(build_dir: &Path, build_id: u64, version: u64) -> PathBuf {
    build_dir.join(format!("b{build_id}-v{version}.hnsw"))
}

/// `b<id>-v<version>.<anything>` → (id, version).
fn parse_output_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix('b')?;
    let (id, rest) = rest.split_once("-v")?;
    let (version, _) = rest.split_once('.')?;
    Some((id.parse().ok()?, version.parse().ok()?))
}

/// How many builds of this process fail on purpose (`FRESHINDEX_FAIL_BUILDS=<n>`): a test hook
/// for the retry path.
fn injected_failure() -> Option<String> {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LEFT: AtomicI64 = AtomicI64::new(i64::MIN);
    if LEFT.load(Ordering::Relaxed) == i64::MIN {
        let n = std::env::var("FRESHINDEX_FAIL_BUILDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let _ = LEFT.compare_exchange(i64::MIN, n, Ordering::Relaxed, Ordering::Relaxed);
    }
    (LEFT.fetch_sub(1, Ordering::Relaxed) > 0)
        .then(|| "injected failure (FRESHINDEX_FAIL_BUILDS)".to_string())
}

/// Does the work of a build on this machine: reads the segment file, builds the index on
/// `threads` threads and writes it to the build's output path. What an index node runs.
pub fn execute_build(build: &IndexBuild, threads: usize) -> Result<u64, String> {
    crate::failpoint::hit("index-build-started");
    if let Some(e) = injected_failure() {
        return Err(e);
    }
    let data = build
        .data_paths
        .first()
        .ok_or_else(|| format!("build {} names no data path", build.build_id))?;
    if let Some(dir) = build.output_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    #[cfg(feature = "hnsw")]
    {
        freshindex_vector::build_segment_index(
            data,
            build.index_params.metric,
            &build.index_params.hnsw(),
            &build.output_path,
            threads,
        )
        .map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "hnsw"))]
    {
        let _ = (data, threads);
        Err("this build has no HNSW support (cargo feature `hnsw`)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_round_trip() {
        let p = output_path(Path::new("/x"), 12, 3);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert_eq!(parse_output_name(name), Some((12, 3)));
        assert_eq!(parse_output_name("b12-v3.building"), Some((12, 3)));
        assert_eq!(parse_output_name("seg-1.hnsw"), None);
    }
}
