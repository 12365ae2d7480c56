//! Item-level operations of the queue API that touch targets: `index` with content (push
//! flows), `delete` and `deleteQueueItems`. They take the same path as a run's workers:
//! fence, lineage diff, two-phase write, commit.

use freshindex_core::queue::{DEFAULT_QUEUE, check_key, check_label};
use freshindex_core::{FlowSpec, ItemStatus};
use freshindex_store::{FlowId, ItemRecord};

use crate::process::Work;
use crate::run::{NoProgress, check_steps};
use crate::{Engine, EngineError};

/// An `index` request carrying an item's content.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexRequest {
    /// Item key.
    pub key: String,
    /// Opaque version; an index whose version is not newer than the indexed one is refused
    /// with [`EngineError::Conflict`].
    pub version: Option<Vec<u8>>,
    /// The item's text (push flows). `None` records the index without content: the item
    /// becomes `ACCEPTED` and keeps its rows.
    pub text: Option<String>,
    /// Metadata stored with each row (a JSON object).
    pub metadata: Option<serde_json::Value>,
    /// Content hash to store (compared by later pushes with hashes).
    pub content_hash: Option<String>,
    /// Metadata hash to store.
    pub metadata_hash: Option<String>,
    /// Label for an item the queue does not hold yet.
    pub queue: Option<String>,
    /// The lease holder, if the caller polled the item: refused when another holder's live
    /// lease holds it.
    pub owner: Option<String>,
}

/// What an index did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexOutcome {
    /// The item's status afterwards.
    pub status: String,
    /// Rows written (added or updated).
    pub rows_written: u64,
    /// Rows deleted.
    pub rows_deleted: u64,
    /// Embeddings computed.
    pub embeddings_computed: u64,
    /// Embeddings taken from the memo cache.
    pub embeddings_reused: u64,
    /// Why the item failed, when its status is `ERROR`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What deleting a flow removed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeleteReport {
    /// The flow.
    pub flow: String,
    /// Its target collection (or PostgreSQL table).
    pub collection: String,
    /// Rows the collection held (when it was open or could be opened); for a table, the
    /// rows deleted from it.
    pub rows: Option<u64>,
    /// Whether the collection's files existed and were removed.
    pub collection_dropped: bool,
}

impl Engine {
    /// Registers a flow definition (or replaces the stored one) without running it, so that
    /// the queue API can serve it and the next run uses it. Checks the steps (model, splitter)
    /// and refuses a target collection another flow owns. Takes the flow's run lock: refused
    /// with [`EngineError::Busy`] while a run of the flow is going (a new target would move
    /// rows under it).
    pub fn define_flow(&self, spec: &FlowSpec) -> Result<FlowId, EngineError> {
        let spec = &self.effective(spec)?;
        check_steps(spec)?;
        let _lock = self.lock(&spec.name)?;
        self.register(spec)
    }

    /// Deletes a flow: drops its target collection, then forgets all its state (queue,
    /// lineage, memo cache, history). A PostgreSQL table is the database's: the rows the
    /// flow's lineage tracks are deleted from it and the table stays (`freshindex drop`
    /// removes it). Refused with [`EngineError::Busy`] while a run of the flow is going.
    /// Crash-safe: a deletion cut short leaves the flow defined, and deleting it again
    /// finishes the job.
    pub fn delete_flow(&self, flow: &str) -> Result<DeleteReport, EngineError> {
        // A name no flow has names no lock file either.
        self.flow(flow)?;
        let _lock = self.lock(flow)?;
        let (id, spec) = self.flow(flow)?;
        let _writer = self.writer();
        let (collection, rows, collection_dropped) = match spec.target.collection() {
            Some(name) => {
                let collection = self.collections().resolve(name)?;
                let rows = self.close_collection(&collection);
                let dropped = self.collections().remove(&collection)?;
                if collection != name {
                    self.collections().remove_alias(name)?;
                }
                if let Some(s) = self.index_service()? {
                    s.forget_collection(&collection, crate::run::now_ms())?;
                }
                (collection, rows, dropped)
            }
            None => {
                let (_, rows) = self.leave_target(id, &spec.target)?;
                (spec.target.name().to_string(), Some(rows), false)
            }
        };
        self.store().delete_flow(id)?;
        drop(_writer);
        // What reindex tasks kept for the flow goes with it.
        self.forget_reindex_state(flow)?;
        Ok(DeleteReport {
            flow: spec.name,
            collection,
            rows,
            collection_dropped,
        })
    }

    /// Indexes one item of a flow with the content the request carries: runs the flow's steps
    /// into its target and makes the item `ACCEPTED`. Without content, records the index
    /// (status, hashes, version) and leaves the item's rows as they are.
    pub fn index_item(&self, flow: &str, req: IndexRequest) -> Result<IndexOutcome, EngineError> {
        let (id, spec) = self.flow(flow)?;
        check_key(&req.key).map_err(EngineError::Invalid)?;
        if let Some(q) = &req.queue {
            check_label("queue", q).map_err(EngineError::Invalid)?;
        }
        if spec.files().is_some() {
            return Err(EngineError::Invalid(format!(
                "flow `{flow}` reads a folder: its runs read and index its items; index applies to push flows"
            )));
        }
        if spec.postgres().is_some() {
            return Err(EngineError::Invalid(format!(
                "flow `{flow}` reads a PostgreSQL source: its runs read and index its rows; index applies to push flows"
            )));
        }
        let existing = self.store().get(id, &req.key)?.map(|e| e.item);
        let mut record = ItemRecord::new(&req.key, ItemStatus::Accepted);
        record.content_hash = req.content_hash;
        record.metadata_hash = req.metadata_hash;
        record.version = req.version;
        record.queue = req
            .queue
            .or_else(|| existing.as_ref().map(|e| e.queue.clone()))
            .unwrap_or_else(|| DEFAULT_QUEUE.to_string());
        let is_new = existing
            .as_ref()
            .is_none_or(|e| e.status == ItemStatus::NewItem);
        let ctx = self.ctx(id, &spec, &NoProgress, req.owner)?;
        let refused = ctx.process(vec![Work::Text {
            record,
            text: req.text,
            metadata: req.metadata,
            is_new,
        }])?;
        if let Some(r) = refused.into_iter().next() {
            return Err(EngineError::Conflict(r.to_string()));
        }
        let summary = ctx.tally().summary.clone();
        let after = self.store().get(id, &req.key)?.map(|e| e.item);
        Ok(IndexOutcome {
            status: after
                .as_ref()
                .map_or(ItemStatus::Accepted, |e| e.status)
                .as_str()
                .to_string(),
            rows_written: summary.rows.added + summary.rows.updated,
            rows_deleted: summary.rows.deleted,
            embeddings_computed: summary.embeddings.computed,
            embeddings_reused: summary.embeddings.reused,
            message: summary.errors.first().map(|e| e.error.clone()),
        })
    }

    /// Deletes one item and, through lineage, its rows. Returns whether the item existed.
    /// A version not newer than the indexed one is refused with [`EngineError::Conflict`].
    pub fn delete_item(
        &self,
        flow: &str,
        key: &str,
        version: Option<Vec<u8>>,
    ) -> Result<bool, EngineError> {
        let (id, spec) = self.flow(flow)?;
        if self.store().get(id, key)?.is_none() {
            return Ok(false);
        }
        let ctx = self.ctx(id, &spec, &NoProgress, None)?;
        let refused = ctx.process(vec![Work::Gone {
            key: key.to_string(),
            existed: true,
            if_queue: None,
            version,
            warning: None,
        }])?;
        if let Some(r) = refused.into_iter().next() {
            return Err(EngineError::Conflict(r.to_string()));
        }
        Ok(true)
    }

    /// `deleteQueueItems`: deletes every item of the flow still labelled `queue`, with its
    /// rows; returns how many were deleted. An item pushed under another label meanwhile is kept (and
    /// indexed again if its rows were already deleted).
    pub fn delete_queue_items(&self, flow: &str, queue: &str) -> Result<u64, EngineError> {
        let (id, spec) = self.flow(flow)?;
        check_label("queue", queue).map_err(EngineError::Invalid)?;
        let keys = self.store().queue_keys(id, queue)?;
        let ctx = self.ctx(id, &spec, &NoProgress, None)?;
        for part in keys.chunks(1024) {
            ctx.process(
                part.iter()
                    .map(|key| Work::Gone {
                        key: key.clone(),
                        existed: true,
                        if_queue: Some(queue.to_string()),
                        version: None,
                        warning: None,
                    })
                    .collect(),
            )?;
        }
        // The end of a traversal: the cache entries of deleted and replaced rows can go.
        self.store().memo_gc(id)?;
        // Entries pushed under another label meanwhile were kept: they do not count.
        let mut deleted = 0;
        for key in &keys {
            if self.store().get(id, key)?.is_none() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
