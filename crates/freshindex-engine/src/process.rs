//! Processing a batch of items, shared by a run's workers and the queue API's item operations:
//! look at each item (read, fingerprint, parse, split), embed its chunks through the memo
//! cache, then — under the engine's writer lock — fence, diff against lineage and apply the
//! two-phase write (pending keys → target → commit of lineage, queue entries and cache).

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use freshindex_core::{Fingerprint, FlowSpec, FpMap, ItemStatus, Row, RowPayload};
use freshindex_store::{
    BatchCommit, BatchInputs, FenceCheck, FenceError, FlowId, ItemChange, ItemLineage, ItemRecord,
    StoreError, TrackedRow,
};
use freshindex_vector::{VectorCollection, decode_vector, encode_vector};

use crate::failpoint;
use crate::inputs::{ItemInputs, doc_fp, fields_of, front_matter};
use crate::plan::{plan_item, row_fp, row_key};
use crate::run::{Phase, Progress, now_ms};
use crate::source::files::{self, ReadError, ScannedFile};
use crate::steps::embed::{Embedder, behavior_version};
use crate::steps::parse::parse;
use crate::steps::split::Splitter;
use crate::summary::{Issue, ItemError, ItemWarning, RunStatus, RunSummary};
use crate::{Engine, EngineError};

/// One unit of work.
pub(crate) enum Work {
    /// A queue entry of a files flow, with the file the scan listed for it (`None`: the scan
    /// could not look where the item lives).
    File {
        entry: ItemRecord,
        file: Option<ScannedFile>,
        has_pending: bool,
    },
    /// Content handed over by the queue API (`index` of a push flow). `text: None` records the
    /// index without touching rows.
    Text {
        record: ItemRecord,
        text: Option<String>,
        metadata: Option<serde_json::Value>,
        is_new: bool,
    },
    /// An item the source holds in a shape that cannot be indexed: recorded as failed with
    /// `error`, its rows kept.
    Failed { record: ItemRecord, error: String },
    /// An item of a flows source (a merge key, a group): made from its members' documents.
    Derived {
        entry: ItemRecord,
        has_pending: bool,
    },
    /// An item that is gone: all its rows go.
    Gone {
        key: String,
        existed: bool,
        /// Delete only if the entry still carries this label (`deleteQueueItems`).
        if_queue: Option<String>,
        version: Option<Vec<u8>>,
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
    /// Same content as indexed: only the entry is updated (status, hashes).
    Unchanged { record: ItemRecord },
    /// New or changed content, split into chunks.
    Indexed {
        record: ItemRecord,
        chunks: Vec<PreparedChunk>,
        metadata: Option<serde_json::Value>,
        is_new: bool,
    },
    /// Deliberately produces no rows.
    Skipped { record: ItemRecord, warning: String },
    /// Failed; keeps its rows, retried later.
    Failed { record: ItemRecord, error: String },
    /// Cannot be looked at now (its folder was not listed): retried after a backoff.
    Postponed { record: ItemRecord, warning: String },
    /// Gone: all its rows go.
    Gone {
        key: String,
        existed: bool,
        if_queue: Option<String>,
        version: Option<Vec<u8>>,
        warning: Option<String>,
        /// Found gone while processing a polled entry (fenced by the lease); deletions
        /// decided without a poll are fenced by their version only.
        polled: bool,
    },
}

impl Outcome {
    fn key(&self) -> &str {
        match self {
            Outcome::Unchanged { record }
            | Outcome::Indexed { record, .. }
            | Outcome::Skipped { record, .. }
            | Outcome::Failed { record, .. }
            | Outcome::Postponed { record, .. } => &record.key,
            Outcome::Gone { key, .. } => key,
        }
    }

    fn version(&self) -> Option<&Vec<u8>> {
        match self {
            Outcome::Unchanged { record }
            | Outcome::Indexed { record, .. }
            | Outcome::Skipped { record, .. }
            | Outcome::Failed { record, .. }
            | Outcome::Postponed { record, .. } => record.version.as_ref(),
            Outcome::Gone { version, .. } => version.as_ref(),
        }
    }
}

/// Hex content hash of a files item: the bytes under the flow's processing fingerprint, so a
/// change of steps makes every item changed.
pub(crate) fn content_hash(spec_fp: &Fingerprint, bytes: &[u8]) -> String {
    Fingerprint::builder("freshindex/content")
        .fp(spec_fp)
        .fp(&Fingerprint::of(bytes))
        .finish()
        .hex_prefix(32)
}

/// Hex metadata hash of a files item (size and mtime under the processing fingerprint). Racy
/// metadata (too close to the read to be trusted) gets a hash no scan reproduces, so the next
/// scan marks the item modified and its content is compared.
pub(crate) fn metadata_hash(spec_fp: &Fingerprint, size: u64, mtime_ns: i64, racy: bool) -> String {
    let h = Fingerprint::builder("freshindex/metadata")
        .fp(spec_fp)
        .u64(size)
        .u64(mtime_ns as u64)
        .finish()
        .hex_prefix(32);
    if racy { format!("racy:{h}") } else { h }
}

/// A vector being computed by one batch, or computed and not yet committed to the cache.
enum Slot {
    Computing,
    Done(Arc<Vec<f32>>),
}

#[derive(Default)]
struct MemoState {
    inflight: FpMap<Slot>,
    /// Every key computed since this memo started (committed or in flight).
    computed: FpMap<()>,
}

/// Coordinates the memo cache across concurrent batches, so that each text is embedded once:
/// a batch that needs a vector another batch is computing waits for it; a vector computed and
/// not yet committed is taken from memory; anything else comes from the cache.
pub(crate) struct RunMemo {
    state: Mutex<MemoState>,
    done: Condvar,
    /// The cache held nothing when the memo started: keys this memo did not compute cannot be
    /// cached, so they are computed without a lookup.
    cache_was_empty: bool,
}

impl RunMemo {
    pub(crate) fn new(cache_was_empty: bool) -> RunMemo {
        RunMemo {
            state: Mutex::new(MemoState::default()),
            done: Condvar::new(),
            cache_was_empty,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The batch that computed `keys` committed them: the cache serves them from now on.
    fn committed(&self, keys: &[Fingerprint]) {
        let mut st = self.lock();
        for k in keys {
            st.inflight.remove(k);
        }
    }
}

/// The keys a batch claimed for computing. Dropped at the end of the batch's preparation —
/// normally, on an error, or while unwinding from a panic — it releases every claim still
/// `Computing`, so batches waiting for those keys wake up and compute them themselves instead
/// of waiting forever.
struct Claims<'m> {
    memo: &'m RunMemo,
    keys: Vec<Fingerprint>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut st = self.memo.lock();
        for k in &self.keys {
            if matches!(st.inflight.get(k), Some(Slot::Computing)) {
                st.inflight.remove(k);
                st.computed.remove(k);
            }
        }
        drop(st);
        self.memo.done.notify_all();
    }
}

/// Counts and issues of the items processed so far.
pub(crate) struct Tally {
    pub(crate) summary: RunSummary,
    total_errors: u64,
    total_warnings: u64,
    failed: HashSet<String>,
}

impl Tally {
    pub(crate) fn new(flow: &str) -> Tally {
        Tally {
            summary: RunSummary {
                flow: flow.to_string(),
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
            failed: HashSet::new(),
        }
    }

    pub(crate) fn issues(&mut self, issues: &[Issue]) {
        let (mut e, mut w) = (self.total_errors, self.total_warnings);
        self.summary.push_issues(issues, &mut e, &mut w);
        self.total_errors = e;
        self.total_warnings = w;
    }

    /// Adds what a worker of another process did for this run.
    pub(crate) fn absorb(&mut self, r: &crate::distributed::WorkerReport) {
        let (i, o) = (&mut self.summary.items, &r.items);
        i.new += o.new;
        i.modified += o.modified;
        i.unchanged += o.unchanged;
        i.deleted += o.deleted;
        i.failed += o.failed;
        i.skipped += o.skipped;
        let (w, o) = (&mut self.summary.rows, &r.rows);
        w.added += o.added;
        w.updated += o.updated;
        w.deleted += o.deleted;
        w.unchanged += o.unchanged;
        self.summary.embeddings.computed += r.embeddings.computed;
        self.summary.embeddings.reused += r.embeddings.reused;
        let issues: Vec<Issue> = r
            .errors
            .iter()
            .map(|e| Issue::error(e.item.as_str(), e.error.clone()))
            .chain(
                r.warnings
                    .iter()
                    .map(|w| Issue::warning(w.item.as_str(), w.warning.clone())),
            )
            .collect();
        self.issues(&issues);
    }

    /// The summary, with a last line in each capped list saying how many were left out.
    pub(crate) fn finish(mut self, max_failed_items: i64) -> RunSummary {
        let limit = max_failed_items;
        if limit >= 0 && self.summary.items.failed > limit as u64 {
            self.summary.status = RunStatus::Failed;
        }
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
            self.summary.errors.push(ItemError { item, error });
        }
        if let Some((item, warning)) =
            unlisted(self.total_warnings, self.summary.warnings.len(), "warnings")
        {
            self.summary.warnings.push(ItemWarning { item, warning });
        }
        self.summary
    }
}

/// Everything needed to process items of one flow.
pub(crate) struct Ctx<'a> {
    pub(crate) engine: &'a Engine,
    pub(crate) flow: FlowId,
    /// The name the flow's state has in the store: the flow's own, or the hidden name of a
    /// reindex task's state (see [`crate::reindex`]).
    pub(crate) record: String,
    pub(crate) spec: &'a FlowSpec,
    pub(crate) spec_fp: Fingerprint,
    pub(crate) embed_fp: Fingerprint,
    pub(crate) embedder: std::sync::Arc<dyn Embedder>,
    pub(crate) splitter: Splitter,
    pub(crate) memo: RunMemo,
    /// The target the batches write: a built-in collection or a PostgreSQL table, through
    /// the same two-phase write.
    pub(crate) collection: Arc<dyn VectorCollection>,
    pub(crate) tally: Mutex<Tally>,
    pub(crate) progress: &'a dyn Progress,
    /// The lease holder the batches process for (fenced before every write).
    pub(crate) owner: Option<String>,
    /// The flow's lookup keys and text template, parsed.
    pub(crate) shape: crate::inputs::Shape,
    /// The flows this flow reads (lookups, a flows source), by name.
    pub(crate) inputs: std::collections::HashMap<String, FlowId>,
    /// Whether other flows read this flow's items: their documents are written. Read again
    /// at the start of every batch, so a reader defined while a run is going is served from
    /// the next batch on (its definition requeued the items this run already did).
    pub(crate) keep_docs: std::sync::atomic::AtomicBool,
    /// Live batches only list the changed files: a polled entry outside the listing (one
    /// whose retry came due) is stat-ed by its key instead of being taken as unlisted.
    pub(crate) stat_unlisted: bool,
}

/// A batch after looking and embedding, ready for the diff and the write.
struct Prepared {
    outcomes: Vec<Outcome>,
    /// What each outcome writes for multi-input flows.
    inputs: Vec<ItemInputs>,
    vectors: FpMap<Vec<f32>>,
    new_memo: Vec<(Fingerprint, Vec<u8>)>,
    reused: u64,
    embed_error: Option<String>,
    /// The error of each chunk text that could not be embedded.
    embed_errors: FpMap<String>,
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

impl Ctx<'_> {
    /// The file of an entry the run's listing does not hold, when this context stats such
    /// entries (live batches): `None` for a key that does not map back to a path (escaped
    /// bytes) or a file that cannot be stat-ed — the entry is then postponed.
    pub(crate) fn stat_unlisted(&self, key: &str) -> Option<ScannedFile> {
        if !self.stat_unlisted || key.contains('\\') {
            return None;
        }
        let src = self.spec.files()?;
        ScannedFile::stat(key.to_string(), src.path.join(key), src.follow_symlinks)
            .ok()
            .map(|(file, _)| file)
    }

    /// Whether this batch writes documents (see [`Ctx::keep_docs`]).
    pub(crate) fn keeps_docs(&self) -> bool {
        self.keep_docs.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's summary: its tally judged against the flow's failed-items limit, with the
    /// target's row count and the time since `started`.
    pub(crate) fn into_summary(
        self,
        started: std::time::Instant,
    ) -> Result<RunSummary, EngineError> {
        let rows_total = freshindex_vector::VectorCollection::count(self.collection.as_ref())?;
        let tally = self.tally.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut summary = tally.finish(self.spec.max_failed_items);
        summary.rows.total = rows_total;
        summary.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(summary)
    }

    /// Processes a batch: prepares it (no lock), then writes it under the writer lock. Returns
    /// the fence refusals (items another holder or a newer version owns; nothing was written
    /// for them).
    pub(crate) fn process(&self, batch: Vec<Work>) -> Result<Vec<FenceError>, EngineError> {
        let prepared = self.prepare(batch)?;
        self.apply(prepared)
    }

    /// The outcome record of a files item: unversioned (runs fence by lease, not version).
    fn record(&self, entry: &ItemRecord, status: ItemStatus) -> ItemRecord {
        let mut r = ItemRecord::new(&entry.key, status);
        r.queue = entry.queue.clone();
        r
    }

    fn look(&self, work: Work) -> (Outcome, ItemInputs) {
        match work {
            Work::Gone {
                key,
                existed,
                if_queue,
                version,
                warning,
            } => (
                Outcome::Gone {
                    key,
                    existed,
                    if_queue,
                    version,
                    warning,
                    polled: false,
                },
                ItemInputs::gone(),
            ),
            Work::Failed { record, error } => {
                (Outcome::Failed { record, error }, ItemInputs::default())
            }
            Work::Text {
                record, text: None, ..
            } => (Outcome::Unchanged { record }, ItemInputs::default()),
            Work::Text {
                record,
                text: Some(text),
                metadata,
                is_new,
            } => {
                let fields = fields_of(&record.key, &text, metadata.as_ref());
                self.indexed(record, fields, metadata, is_new)
            }
            Work::File {
                entry,
                file,
                has_pending,
            } => self.look_file(entry, file, has_pending),
            Work::Derived { entry, has_pending } => self.look_derived(entry, has_pending),
        }
    }

    /// An item made from its fields: the lookups and the template, then its chunks; or a
    /// failed item when a required lookup finds nothing.
    fn indexed(
        &self,
        record: ItemRecord,
        fields: serde_json::Value,
        source_metadata: Option<serde_json::Value>,
        is_new: bool,
    ) -> (Outcome, ItemInputs) {
        match self.finish(fields, source_metadata) {
            Ok(f) => {
                let chunks = self.chunks(&record.key, &f.text, 0);
                (
                    Outcome::Indexed {
                        record,
                        chunks,
                        metadata: f.metadata,
                        is_new,
                    },
                    f.inputs,
                )
            }
            Err((error, inputs)) => {
                let mut record = record;
                record.content_hash = None;
                (failed(record, error), inputs)
            }
        }
    }

    /// An item of a flows source: its members' documents combined, then the lookups and
    /// the template.
    fn look_derived(&self, entry: ItemRecord, has_pending: bool) -> (Outcome, ItemInputs) {
        let key = entry.key.clone();
        let combined = match self.combine(&key) {
            Ok(c) => c,
            Err(e) => {
                let mut r = self.record(&entry, ItemStatus::Error);
                let error = format!("reading its input items: {e}");
                r.message = Some(error.clone());
                return (Outcome::Failed { record: r, error }, ItemInputs::default());
            }
        };
        let Some((fields, hash)) = combined else {
            return (
                Outcome::Gone {
                    key,
                    existed: true,
                    if_queue: None,
                    version: None,
                    warning: None,
                    polled: true,
                },
                ItemInputs::gone(),
            );
        };
        let mut record = self.record(&entry, ItemStatus::Accepted);
        if !has_pending
            && entry.status != ItemStatus::Error
            && entry.content_hash.as_deref() == Some(hash.as_str())
        {
            record.content_hash = Some(hash);
            return (Outcome::Unchanged { record }, ItemInputs::default());
        }
        record.content_hash = Some(hash);
        let is_new = entry.status == ItemStatus::NewItem;
        self.indexed(record, fields, None, is_new)
    }

    fn chunks(&self, key: &str, text: &str, offset: usize) -> Vec<PreparedChunk> {
        self.splitter
            .split(key, text)
            .into_iter()
            .map(|c| {
                let text_fp = Fingerprint::of(c.text.as_bytes());
                let start = offset + c.start;
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
            .collect()
    }

    fn look_file(
        &self,
        entry: ItemRecord,
        file: Option<ScannedFile>,
        has_pending: bool,
    ) -> (Outcome, ItemInputs) {
        let mut inputs = ItemInputs::default();
        let outcome = self.read_file(entry, file, has_pending, &mut inputs);
        match outcome {
            o @ (Outcome::Skipped { .. } | Outcome::Gone { .. }) => (o, ItemInputs::gone()),
            o => (o, inputs),
        }
    }

    fn read_file(
        &self,
        entry: ItemRecord,
        file: Option<ScannedFile>,
        has_pending: bool,
        inputs: &mut ItemInputs,
    ) -> Outcome {
        let key = entry.key.clone();
        let Some(file) = file else {
            let mut r = self.record(&entry, ItemStatus::Error);
            let w = "its folder could not be listed by this scan; retried later".to_string();
            r.message = Some(w.clone());
            return Outcome::Postponed {
                record: r,
                warning: w,
            };
        };
        let Some(max) = self.spec.files().map(|f| f.max_file_size) else {
            return Outcome::Failed {
                record: self.record(&entry, ItemStatus::Error),
                error: "not a files flow".into(),
            };
        };
        let skipped = |w: String, size: u64, mtime_ns: i64| {
            let mut r = self.record(&entry, ItemStatus::Skipped);
            r.metadata_hash = Some(metadata_hash(&self.spec_fp, size, mtime_ns, false));
            r.message = Some(w.clone());
            Outcome::Skipped {
                record: r,
                warning: w,
            }
        };
        let not_regular = |size, mtime| {
            skipped(
                "not a regular file (FIFO, socket or device); skipped".to_string(),
                size,
                mtime,
            )
        };
        if !file.regular {
            return not_regular(file.size, file.mtime_ns);
        }
        let too_large = |size: u64| {
            skipped(
                format!(
                    "file is {}, over max_file_size {}; skipped",
                    freshindex_core::spec::ByteSize(size),
                    max
                ),
                size,
                file.mtime_ns,
            )
        };
        if file.size > max.0 {
            return too_large(file.size);
        }
        let read = match files::read(&file, max.0) {
            Ok(r) => r,
            Err(ReadError::TooLarge(size)) => return too_large(size),
            Err(ReadError::NotRegular) => return not_regular(file.size, file.mtime_ns),
            Err(ReadError::Vanished(e)) => {
                return Outcome::Gone {
                    key,
                    existed: true,
                    if_queue: None,
                    version: None,
                    warning: Some(format!("vanished during the scan: {e}")),
                    polled: true,
                };
            }
            Err(ReadError::Io(e)) => {
                let error = format!("cannot read: {e}");
                let mut r = self.record(&entry, ItemStatus::Error);
                r.message = Some(error.clone());
                return Outcome::Failed { record: r, error };
            }
        };
        let hash = content_hash(&self.spec_fp, &read.bytes);
        let mut record = self.record(&entry, ItemStatus::Accepted);
        record.metadata_hash = Some(metadata_hash(
            &self.spec_fp,
            read.size,
            read.mtime_ns,
            read.racy,
        ));
        if !has_pending
            && entry.status != ItemStatus::Error
            && entry.content_hash.as_deref() == Some(hash.as_str())
        {
            record.content_hash = Some(hash);
            return Outcome::Unchanged { record };
        }
        let parsed = match parse(&read.bytes) {
            Ok(p) => p,
            Err(w) => {
                record.status = ItemStatus::Skipped;
                record.message = Some(w.clone());
                return Outcome::Skipped { record, warning: w };
            }
        };
        record.content_hash = Some(hash);
        let (chunks, metadata) = if self.spec.uses_fields() || self.keeps_docs() {
            let (meta, body, body_at) = match front_matter(parsed.text) {
                Some((m, body)) => (Some(m), body, parsed.text.len() - body.len()),
                None => (None, parsed.text, 0),
            };
            let fields = fields_of(&key, body, meta.as_ref());
            match self.finish(fields, None) {
                Ok(f) => {
                    *inputs = f.inputs;
                    if !self.spec.uses_fields() {
                        // A plain flow others read: its rows stay what they always were.
                        (self.chunks(&key, parsed.text, parsed.offset), None)
                    } else {
                        // The rendered text, when a template made it; else the body.
                        let offset = if self.spec.template().is_some() {
                            0
                        } else {
                            parsed.offset + body_at
                        };
                        (self.chunks(&key, &f.text, offset), f.metadata)
                    }
                }
                Err((error, i)) => {
                    *inputs = i;
                    record.status = ItemStatus::Error;
                    record.content_hash = None;
                    record.message = Some(error.clone());
                    return Outcome::Failed { record, error };
                }
            }
        } else {
            (self.chunks(&key, parsed.text, parsed.offset), None)
        };
        if read.changed_during_read {
            record.message = Some(
                "changed while being read; indexed the content as read, it is checked again on the next run"
                    .to_string(),
            );
        } else if read.changed_since_scan {
            record.message =
                Some("changed while the scan ran; indexed its content as of reading".to_string());
        }
        Outcome::Indexed {
            record,
            chunks,
            metadata,
            is_new: entry.status == ItemStatus::NewItem,
        }
    }

    /// Looks at a batch of items and finds a vector for every chunk: from this run's memory,
    /// from the cache, or computed (each missing text once, even across concurrent batches).
    fn prepare(&self, batch: Vec<Work>) -> Result<Prepared, EngineError> {
        let kept = self.engine.store().docs_kept(self.flow)?;
        self.keep_docs
            .store(kept, std::sync::atomic::Ordering::Relaxed);
        let (outcomes, inputs): (Vec<Outcome>, Vec<ItemInputs>) =
            batch.into_iter().map(|w| self.look(w)).unzip();
        let mut needed: Vec<(Fingerprint, &str)> = Vec::new();
        // Every chunk counts: one computed or reused embedding each.
        let mut n_needed = 0u64;
        {
            let mut seen: FpMap<()> = FpMap::default();
            for o in &outcomes {
                if let Outcome::Indexed { chunks, .. } = o {
                    n_needed += chunks.len() as u64;
                    for c in chunks {
                        if seen.insert(c.memo_key, ()).is_none() {
                            needed.push((c.memo_key, c.text.as_str()));
                        }
                    }
                }
            }
        }
        let dimension = self.embedder.dimension();
        let mut vectors: FpMap<Vec<f32>> =
            FpMap::with_capacity_and_hasher(needed.len(), Default::default());
        let mut new_memo: Vec<(Fingerprint, Vec<u8>)> = Vec::new();
        let mut embed_error: Option<String> = None;
        let mut embed_errors: FpMap<String> = FpMap::default();
        let mut looked_up: FpMap<u8> = FpMap::default();
        let mut claims = Claims {
            memo: &self.memo,
            keys: Vec::new(),
        };
        let mut pending = needed;
        while !pending.is_empty() {
            let (mut mine, mut lookup, mut wait) = (Vec::new(), Vec::new(), Vec::new());
            {
                let mut st = self.memo.lock();
                for (k, t) in pending.drain(..) {
                    match st.inflight.get(&k) {
                        Some(Slot::Done(v)) => {
                            vectors.insert(k, v.as_ref().clone());
                        }
                        Some(Slot::Computing) => wait.push((k, t)),
                        None => {
                            let tries = looked_up.get(&k).copied().unwrap_or(0);
                            let may_be_cached =
                                !self.memo.cache_was_empty || st.computed.contains_key(&k);
                            // A key another batch computed is committed once it leaves the
                            // in-flight set; one retry covers a commit racing this lookup.
                            let worth_lookup = if st.computed.contains_key(&k) {
                                tries < 2
                            } else {
                                tries < 1
                            };
                            if may_be_cached && worth_lookup {
                                lookup.push((k, t));
                            } else {
                                st.inflight.insert(k, Slot::Computing);
                                st.computed.insert(k, ());
                                claims.keys.push(k);
                                mine.push((k, t));
                            }
                        }
                    }
                }
            }
            if !lookup.is_empty() {
                let keys: Vec<Fingerprint> = lookup.iter().map(|(k, _)| *k).collect();
                for (k, bytes) in self.engine.store().memo_get(self.flow, &keys)? {
                    vectors.insert(k, decode_memo(&bytes, dimension)?);
                }
                for (k, t) in lookup {
                    if !vectors.contains_key(&k) {
                        *looked_up.entry(k).or_insert(0) += 1;
                        pending.push((k, t));
                    }
                }
            }
            for part in mine.chunks(self.spec.embed().batch_size.max(1)) {
                let texts: Vec<&str> = part.iter().map(|(_, t)| *t).collect();
                let mut results: Vec<Result<Vec<f32>, String>> = match self.embed_texts(&texts) {
                    Ok(vs) => vs.into_iter().map(Ok).collect(),
                    // One bad text must not fail its neighbours: each goes alone.
                    Err(_) if texts.len() > 1 => texts
                        .iter()
                        .map(|t| {
                            self.embed_texts(&[t])
                                .and_then(|mut v| v.pop().ok_or_else(|| "no vector".into()))
                        })
                        .collect(),
                    Err(e) => vec![Err(e)],
                };
                results.resize_with(part.len(), || Err("no vector".into()));
                let mut st = self.memo.lock();
                for ((k, _), r) in part.iter().zip(results) {
                    match r {
                        Ok(v) => {
                            new_memo.push((*k, encode_vector(&v)));
                            st.inflight.insert(*k, Slot::Done(Arc::new(v.clone())));
                            vectors.insert(*k, v);
                        }
                        Err(e) => {
                            st.inflight.remove(k);
                            st.computed.remove(k);
                            embed_errors.insert(*k, e.clone());
                            embed_error = Some(e);
                        }
                    }
                }
                drop(st);
                self.memo.done.notify_all();
            }
            if !wait.is_empty() {
                let mut st = self.memo.lock();
                while wait
                    .iter()
                    .any(|(k, _)| matches!(st.inflight.get(k), Some(Slot::Computing)))
                {
                    st = self.memo.done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                drop(st);
                // Resolved on the next round: taken from memory, the cache, or computed here
                // when the other batch failed.
                pending.extend(wait);
            }
            if embed_error.is_some() {
                break;
            }
        }
        drop(claims);
        let reused = n_needed.saturating_sub(new_memo.len() as u64);
        Ok(Prepared {
            outcomes,
            inputs,
            vectors,
            new_memo,
            reused,
            embed_error,
            embed_errors,
        })
    }

    /// Embeds texts with the flow's model, checking the answer's shape.
    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let dimension = self.embedder.dimension();
        match self.embedder.embed(texts) {
            Ok(vs) if vs.len() != texts.len() => Err(format!(
                "embedding failed: the model returned {} vectors for {} texts",
                vs.len(),
                texts.len()
            )),
            Ok(vs) if vs.iter().any(|v| v.len() != dimension) => Err(format!(
                "embedding failed: the model returned a vector of another dimension than {dimension}"
            )),
            Ok(vs) => Ok(vs),
            Err(e) => Err(format!("embedding failed: {e}")),
        }
    }

    /// Fences, diffs against lineage and writes a prepared batch: pending keys, then the
    /// target, then the commit.
    fn apply(&self, prepared: Prepared) -> Result<Vec<FenceError>, EngineError> {
        let Prepared {
            outcomes,
            inputs,
            mut vectors,
            new_memo,
            reused,
            embed_error,
            embed_errors,
        } = prepared;
        let store = self.engine.store();
        let _writer = self.engine.writer();
        // A flow deleted since this context was built takes no more writes: its collection
        // is gone and its state with it.
        if store.flow(&self.record)?.map(|r| r.id) != Some(self.flow) {
            return Err(EngineError::NotFound(format!(
                "flow `{}` was deleted while this work was in progress",
                self.spec.name
            )));
        }
        let now = now_ms();

        // Fence: items another holder took over, or with a version not newer than the indexed
        // one, are not written.
        let checks: Vec<(usize, FenceCheck)> = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let owner = match o {
                    Outcome::Gone { polled: false, .. } => None,
                    _ => self.owner.clone(),
                };
                (
                    i,
                    FenceCheck {
                        key: o.key().to_string(),
                        version: o.version().cloned(),
                        owner,
                    },
                )
            })
            .filter(|(_, c)| c.owner.is_some() || c.version.is_some())
            .collect();
        let mut refused: Vec<FenceError> = Vec::new();
        let mut blocked: HashSet<usize> = HashSet::new();
        if !checks.is_empty() {
            let list: Vec<FenceCheck> = checks.iter().map(|(_, c)| c.clone()).collect();
            for ((i, _), answer) in checks.iter().zip(store.fence(self.flow, &list, now)?) {
                if let Err(e) = answer {
                    blocked.insert(*i);
                    refused.push(e);
                }
            }
        }

        let keys: Vec<&str> = outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| !blocked.contains(i))
            .filter_map(|(_, o)| match o {
                Outcome::Indexed { record, .. } | Outcome::Skipped { record, .. } => {
                    Some(record.key.as_str())
                }
                Outcome::Gone { key, .. } => Some(key.as_str()),
                Outcome::Unchanged { .. } | Outcome::Failed { .. } | Outcome::Postponed { .. } => {
                    None
                }
            })
            .collect();
        let lineage = store.lineage(self.flow, &keys)?;
        // An item whose embedding failed keeps its document (it keeps its rows too).
        let embed_failed: HashSet<usize> = match &embed_error {
            None => HashSet::new(),
            Some(_) => outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| {
                    matches!(o, Outcome::Indexed { chunks, .. }
                        if chunks.iter().any(|c| !vectors.contains_key(&c.memo_key)))
                })
                .map(|(i, _)| i)
                .collect(),
        };
        let batch_inputs = self.batch_inputs(&outcomes, inputs, &blocked, &embed_failed);
        let empty = ItemLineage::default();
        let mut upserts: Vec<Row> = Vec::new();
        let mut upsert_vectors: Vec<Option<Fingerprint>> = Vec::new();
        let mut deletes: Vec<String> = Vec::new();
        let mut pending: Vec<(String, Vec<String>)> = Vec::new();
        let mut changes: Vec<ItemChange> = Vec::with_capacity(outcomes.len());
        let mut issues: Vec<Issue> = Vec::new();
        let mut tally = self.tally();
        tally.summary.embeddings.computed += new_memo.len() as u64;
        tally.summary.embeddings.reused += reused;
        for (i, o) in outcomes.into_iter().enumerate() {
            if blocked.contains(&i) {
                continue;
            }
            let (key, record, rows): (String, Option<ItemRecord>, Vec<(Row, TrackedRow)>) = match o
            {
                Outcome::Unchanged { record } => {
                    tally.summary.items.unchanged += 1;
                    changes.push(ItemChange::Upsert { record, rows: None });
                    continue;
                }
                Outcome::Failed { record, error } => {
                    if tally.failed.insert(record.key.clone()) {
                        tally.summary.items.failed += 1;
                    }
                    issues.push(Issue::error(record.key.clone(), error));
                    changes.push(ItemChange::Upsert { record, rows: None });
                    continue;
                }
                Outcome::Postponed { record, warning } => {
                    issues.push(Issue::warning(record.key.clone(), warning));
                    changes.push(ItemChange::Upsert { record, rows: None });
                    continue;
                }
                Outcome::Skipped { record, warning } => {
                    tally.summary.items.skipped += 1;
                    issues.push(Issue::warning(record.key.clone(), warning));
                    (record.key.clone(), Some(record), Vec::new())
                }
                Outcome::Gone {
                    key,
                    existed,
                    if_queue,
                    version,
                    warning,
                    polled: _,
                } => {
                    if existed {
                        tally.summary.items.deleted += 1;
                    }
                    if let Some(w) = warning {
                        issues.push(Issue::warning(key.clone(), w));
                    }
                    let old = lineage.get(&key).unwrap_or(&empty);
                    let plan = plan_item(old, &[]);
                    tally.summary.rows.deleted += plan.deleted;
                    if !plan.pending.is_empty() {
                        pending.push((key.clone(), plan.pending));
                    }
                    deletes.extend(plan.delete);
                    changes.push(ItemChange::Delete {
                        key,
                        if_queue,
                        version,
                    });
                    continue;
                }
                Outcome::Indexed {
                    mut record,
                    chunks,
                    metadata,
                    is_new,
                } => {
                    if let Some(e) = &embed_error
                        && let Some(missing) =
                            chunks.iter().find(|c| !vectors.contains_key(&c.memo_key))
                    {
                        // Its own text's error (another item's when the same text failed there).
                        let e = embed_errors.get(&missing.memo_key).unwrap_or(e);
                        if tally.failed.insert(record.key.clone()) {
                            tally.summary.items.failed += 1;
                        }
                        issues.push(Issue::error(record.key.clone(), e.clone()));
                        record.status = ItemStatus::Error;
                        record.message = Some(e.clone());
                        changes.push(ItemChange::Upsert { record, rows: None });
                        continue;
                    }
                    if is_new {
                        tally.summary.items.new += 1;
                    } else {
                        tally.summary.items.modified += 1;
                    }
                    if let Some(w) = &record.message {
                        issues.push(Issue::warning(record.key.clone(), w.clone()));
                    }
                    let rows = self.rows(&record.key, chunks, metadata);
                    (record.key.clone(), Some(record), rows)
                }
            };
            let old = lineage.get(&key).unwrap_or(&empty);
            let new_keys: Vec<(String, Fingerprint)> = rows
                .iter()
                .map(|(_, t)| (t.row_key.clone(), t.row_fp))
                .collect();
            let plan = plan_item(old, &new_keys);
            tally.summary.rows.added += plan.added;
            tally.summary.rows.updated += plan.updated;
            tally.summary.rows.deleted += plan.deleted;
            tally.summary.rows.unchanged += plan.unchanged;
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
            if let Some(record) = record {
                changes.push(ItemChange::Upsert {
                    record,
                    rows: Some(tracked),
                });
            }
        }
        tally.issues(&issues);
        drop(tally);
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
            store.record_pending(self.flow, &pending)?;
            failpoint::hit("pending-recorded");
            self.collection.apply(&upserts, &deletes)?;
            self.progress
                .inc(Phase::Writing, (upserts.len() + deletes.len()) as u64);
            failpoint::hit("target-written");
        }
        if !changes.is_empty() || !new_memo.is_empty() {
            let computed: Vec<Fingerprint> = new_memo.iter().map(|(k, _)| *k).collect();
            store.commit(
                self.flow,
                BatchCommit {
                    items: changes,
                    // After a partial embedding failure some new entries may serve no row.
                    gc_candidates: if embed_error.is_some() || !refused.is_empty() {
                        computed.clone()
                    } else {
                        Vec::new()
                    },
                    memo: new_memo,
                    now_ms: now,
                    inputs: batch_inputs,
                },
            )?;
            self.memo.committed(&computed);
            failpoint::hit("batch-committed");
        }
        Ok(refused)
    }

    /// Target rows of an indexed item, with their lineage records.
    fn rows(
        &self,
        key: &str,
        chunks: Vec<PreparedChunk>,
        metadata: Option<serde_json::Value>,
    ) -> Vec<(Row, TrackedRow)> {
        let meta_fp = metadata.as_ref().map(|m| {
            Fingerprint::builder("freshindex/row-metadata")
                .str(&m.to_string())
                .finish()
        });
        let mut dups: FpMap<u32> = FpMap::default();
        let mut out = Vec::with_capacity(chunks.len());
        let target = self.spec.target.identity();
        for c in chunks {
            let dup = dups.entry(c.text_fp).or_insert(0);
            let rk = row_key(key, &c.text_fp, *dup);
            *dup += 1;
            // Metadata is part of what the row holds: a metadata change rewrites the row.
            let content_fp = match &meta_fp {
                Some(m) => Fingerprint::builder("freshindex/row-content")
                    .fp(&c.text_fp)
                    .fp(m)
                    .finish(),
                None => c.text_fp,
            };
            let fp = row_fp(&target, &rk, key, c.range, &content_fp, &c.memo_key);
            out.push((
                Row {
                    key: rk.clone(),
                    // Filled in for the rows that are written (see `apply`).
                    vector: Vec::new(),
                    payload: RowPayload {
                        source: key.to_string(),
                        range: c.range,
                        text: c.text,
                        metadata: metadata.clone(),
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
}

/// A failed outcome whose record carries the error as its message.
fn failed(mut record: ItemRecord, error: String) -> Outcome {
    record.status = ItemStatus::Error;
    record.message = Some(error.clone());
    Outcome::Failed { record, error }
}

impl Ctx<'_> {
    /// What a batch's items give and read for multi-input flows — documents and
    /// dependencies — for its commit (see [`crate::inputs`]). Items the fence refused write
    /// nothing; an item whose embedding failed keeps its document.
    fn batch_inputs(
        &self,
        outcomes: &[Outcome],
        inputs: Vec<ItemInputs>,
        blocked: &HashSet<usize>,
        embed_failed: &HashSet<usize>,
    ) -> BatchInputs {
        let mut docs: Vec<freshindex_store::DocWrite> = Vec::new();
        let mut deps: Vec<(String, Vec<(FlowId, String)>)> = Vec::new();
        for (i, (o, inp)) in outcomes.iter().zip(inputs).enumerate() {
            if blocked.contains(&i) {
                continue;
            }
            if let Some(d) = inp.deps {
                deps.push((o.key().to_string(), d));
            }
            if let (true, Some(doc), false) =
                (self.keeps_docs(), inp.doc, embed_failed.contains(&i))
            {
                docs.push((
                    o.key().to_string(),
                    doc.map(|bytes| (doc_fp(&bytes), bytes)),
                ));
            }
        }
        BatchInputs { docs, deps }
    }
}

/// The embedding fingerprint of a flow: model identity and behaviour version.
pub(crate) fn embed_fingerprint(spec: &FlowSpec) -> Fingerprint {
    Fingerprint::builder("freshindex/memo/embed")
        .str(&spec.embed().identity())
        .u64(behavior_version(&spec.embed().model))
        .finish()
}
