//! Reindex tasks (seed 000): move a flow's target to another embedding model.
//!
//! A task has source and destination model parameters, a status, progress, count and total,
//! children (one subtask per batch of source items), failed items, `deploy_as_blue` and
//! `wait_on_conflict`. Its work goes through the queue like a run's: planning lists the
//! source once (so the total is known before anything is processed) and pushes every item
//! into the queue of the state the task writes, labelled with its batch; the task's workers
//! then poll each batch with leases, process it (chunks are split again, which is cheap; only
//! the embedding step runs again) and count what was done from the queue's own state — so a
//! task survives a restart and resumes with correct counts.
//!
//! **Blue/green** (`deploy_as_blue`): the task writes a hidden state of the flow
//! (`~reindex-ID-FLOW` in the store) into a new collection `COLLECTION.tID`, while the flow
//! keeps serving and updating its current collection. When every batch is done and the failed
//! items are within `max_failed_items`, the task takes the flow's run lock, brings the new
//! collection up to date with a catch-up traversal (the changes that reached the flow during
//! the task), and switches: the flow's collection name becomes an alias of the new collection
//! (the first switch moves the original collection to `COLLECTION.t0`), the hidden state
//! becomes the flow's, and the flow's previous state is kept as `~previous-FLOW` with its
//! collection, for [`Engine::rollback`]. A task that fails never switches.
//!
//! **In place** (no `deploy_as_blue`): the flow's own items are re-embedded batch by batch
//! into its collection (same dimension only), under the flow's run lock.
//!
//! After a switch the flow runs with the new model even though its definition still names
//! the old one: a *deployment* record says which model the flow's declared model was
//! replaced by ([`Engine::effective`]); editing the flow's model in its definition replaces
//! the deployment (the definition wins again). Every collection a task created records its
//! model, and a search embeds the query with the model of the collection it reads
//! ([`Engine::search_with_model`]), so searches stay right before, during and after a switch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use freshindex_core::{EmbedSpec, FlowSpec, ItemStatus, PushType};
use freshindex_store::{FlowId, ListRequest, PushItem, PushKind};
use freshindex_vector::VectorCollection;
use serde::{Deserialize, Serialize};

use crate::run::{NoProgress, Target, collection_target, now_ms};
use crate::source::files;
use crate::steps::embed::embedder_for;
use crate::{Engine, EngineError, RunOptions};

/// Record kinds of the control-plane document store.
const TASK: &str = "task";
const SUBTASK: &str = "subtask";
const DEPLOYMENT: &str = "deployment:";
const COLLECTION_MODEL: &str = "collection-model:";

/// Failed items listed in a task (the count is always exact).
const MAX_LISTED_FAILURES: usize = 1000;

/// Prefix of the store names of hidden flow states (never a valid flow name).
pub const HIDDEN_PREFIX: &str = "~";

/// Whether a store name is a hidden state (a reindex task's, or a kept previous state).
pub fn is_hidden(name: &str) -> bool {
    name.starts_with(HIDDEN_PREFIX)
}

/// Status of a task or subtask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TaskStatus {
    /// Created, not started.
    Pending,
    /// Another task of the same flow is active: this one starts when it ends.
    Waiting,
    /// Working.
    Running,
    /// Done (for a blue task: switched).
    Succeeded,
    /// Ended without completing (for a blue task: never switched).
    Failed,
    /// Stopped by a cancel.
    Canceled,
}

impl TaskStatus {
    /// Pending, waiting or running.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskStatus::Pending | TaskStatus::Waiting | TaskStatus::Running
        )
    }
}

/// Where a task is in its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TaskPhase {
    /// Listing the source and making the subtasks.
    Planning,
    /// Processing the subtasks.
    Batches,
    /// Catching up and switching (blue), or catching up (in place).
    Finishing,
    /// Nothing left to do.
    Done,
}

/// An item a task could not process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedItem {
    /// Item key.
    pub item: String,
    /// The step that failed: `read`, `parse`, `split`, `embed` or `write`.
    pub stage: String,
    /// What went wrong.
    pub error: String,
}

/// A reindex task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReindexTask {
    /// Task id.
    pub id: u64,
    /// Always `reindex`.
    pub kind: String,
    /// The flow.
    pub flow: String,
    /// The model the flow had when the task was created.
    pub source: EmbedSpec,
    /// The model the task moves the flow to.
    pub dest: EmbedSpec,
    /// Status.
    pub status: TaskStatus,
    /// Where it is in its work.
    pub phase: TaskPhase,
    /// `count / total`, 0.0 to 1.0 (1.0 for an empty source once done).
    pub progress: f64,
    /// Items processed (succeeded or failed).
    pub count: u64,
    /// Items to process, known once planning listed the source (before any is processed).
    pub total: u64,
    /// Subtask ids, one per batch of source items.
    pub children: Vec<u64>,
    /// Items that failed, with the stage and the error (at most 1000 listed).
    pub failed_items: Vec<FailedItem>,
    /// How many items failed.
    pub failed_count: u64,
    /// Build the new collection beside the serving one and switch when complete.
    pub deploy_as_blue: bool,
    /// Wait for another active task of the flow instead of being refused.
    pub wait_on_conflict: bool,
    /// Items per subtask.
    pub batch_size: usize,
    /// The task fails (and does not switch) when more items than this fail; -1: no limit.
    pub max_failed_items: i64,
    /// Blue: the collection the task writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_collection: Option<String>,
    /// Blue: whether the switch happened.
    #[serde(default)]
    pub switched: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Created (ms since the epoch).
    pub created_ms: i64,
    /// Started working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    /// Ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    /// Last change.
    pub updated_ms: i64,
}

impl ReindexTask {
    /// Adds processed items: count += n, progress = count / total (seed 000's `add_count`).
    /// The total is known before anything is processed; an empty source is complete.
    pub fn add_count(&mut self, n: u64) {
        self.set_count(self.count + n);
    }

    fn set_count(&mut self, count: u64) {
        self.count = count;
        self.progress = if self.total == 0 {
            if self.phase == TaskPhase::Done {
                1.0
            } else {
                0.0
            }
        } else {
            (count as f64 / self.total as f64).min(1.0)
        };
    }

    /// The store name of the hidden state a blue task writes.
    pub fn work_record(&self) -> String {
        format!("{HIDDEN_PREFIX}reindex-{}-{}", self.id, self.flow)
    }

    fn label(&self, n: usize) -> String {
        format!("t{}-{n}", self.id)
    }
}

/// A batch of a task's items.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubTask {
    /// Subtask id.
    pub id: u64,
    /// The task.
    pub parent: u64,
    /// The queue label of its items.
    pub label: String,
    /// Its items.
    pub total: u64,
    /// Items processed.
    pub count: u64,
    /// Items that failed.
    pub failed: u64,
    /// Status.
    pub status: TaskStatus,
}

/// A request for a reindex task.
#[derive(Clone, Debug)]
pub struct ReindexRequest {
    /// The flow.
    pub flow: String,
    /// The destination model.
    pub to: EmbedSpec,
    /// Blue/green deployment.
    pub deploy_as_blue: bool,
    /// Wait for another active task of the flow instead of being refused.
    pub wait_on_conflict: bool,
    /// Items per subtask (default 100).
    pub batch_size: Option<usize>,
    /// Failed items allowed (default: the flow's `max_failed_items`).
    pub max_failed_items: Option<i64>,
}

/// Which model replaced a flow's declared model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// The model the flow's definition names (the deployment applies while it does).
    pub declared: EmbedSpec,
    /// The model the flow runs with.
    pub deployed: EmbedSpec,
    /// The state and collection before the last switch, kept for a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousState>,
    /// The task that deployed it.
    pub task: u64,
}

/// A flow's state kept after a switch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousState {
    /// Its store name.
    pub record: String,
    /// Its collection (physical name).
    pub collection: String,
    /// Its model.
    pub model: EmbedSpec,
}

/// What a rollback did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackReport {
    /// The flow.
    pub flow: String,
    /// The collection its name now points at.
    pub collection: String,
    /// The model it runs with now.
    pub model: String,
    /// The collection it left (kept: a second rollback switches back).
    pub left: String,
    /// The catch-up run's summary (changes made to the source since the switch).
    pub caught_up: Option<crate::RunSummary>,
}

/// Options of a task's execution.
#[derive(Clone, Copy, Debug)]
pub struct TaskRunOptions {
    /// Worker threads.
    pub workers: usize,
    /// Lease of a polled batch.
    pub lease_ms: i64,
    /// How long to wait for the flow's run lock before the switch (a run of the flow in
    /// progress) before trying again later.
    pub lock_wait: Duration,
}

impl Default for TaskRunOptions {
    fn default() -> Self {
        TaskRunOptions {
            workers: crate::default_workers(),
            lease_ms: freshindex_core::queue::DEFAULT_LEASE_MS,
            lock_wait: Duration::from_secs(600),
        }
    }
}

fn json<T: Serialize>(v: &T) -> Result<String, EngineError> {
    serde_json::to_string(v).map_err(|e| EngineError::Internal(format!("encoding a record: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, doc: &str) -> Result<T, EngineError> {
    serde_json::from_str(doc).map_err(|e| {
        EngineError::Store(freshindex_store::StoreError::Corrupt(format!(
            "{what}: {e}"
        )))
    })
}

/// The stage an item's error message points at.
fn stage_of(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("embed") || m.contains("model") {
        "embed"
    } else if m.contains("utf-8") || m.contains("binary") || m.contains("parse") {
        "parse"
    } else if m.contains("split") || m.contains("chunk") {
        "split"
    } else if m.contains("read") || m.contains("open") || m.contains("too large") {
        "read"
    } else {
        "write"
    }
}

impl Engine {
    // ---- records -------------------------------------------------------------------------

    fn put_task(&self, t: &ReindexTask, subs: &[SubTask]) -> Result<(), EngineError> {
        let mut docs = vec![(TASK.to_string(), t.id, json(t)?)];
        for s in subs {
            docs.push((SUBTASK.to_string(), s.id, json(s)?));
        }
        let refs: Vec<(&str, u64, String)> = docs
            .iter()
            .map(|(k, id, d)| (k.as_str(), *id, d.clone()))
            .collect();
        self.store().put_index_records(&refs)?;
        Ok(())
    }

    /// Saves a task the runner changed, unless a cancel came meanwhile (then the cancel
    /// wins, and [`EngineError::Cancelled`] stops the runner).
    fn save_progress(&self, t: &mut ReindexTask, subs: &[SubTask]) -> Result<(), EngineError> {
        let _g = self.tasks_guard();
        if self.task(t.id)?.status == TaskStatus::Canceled {
            t.status = TaskStatus::Canceled;
            return Err(EngineError::Cancelled(format!(
                "task {} was canceled",
                t.id
            )));
        }
        t.updated_ms = now_ms();
        self.put_task(t, subs)
    }

    /// A task by id.
    pub fn task(&self, id: u64) -> Result<ReindexTask, EngineError> {
        self.store()
            .index_records(TASK)?
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, d)| parse::<ReindexTask>("task", &d))
            .transpose()?
            .ok_or_else(|| EngineError::NotFound(format!("task {id} does not exist")))
    }

    /// Every task (of `flow` when given), newest first.
    pub fn tasks(&self, flow: Option<&str>) -> Result<Vec<ReindexTask>, EngineError> {
        let mut out = Vec::new();
        for (_, d) in self.store().index_records(TASK)? {
            let t: ReindexTask = parse("task", &d)?;
            if flow.is_none_or(|f| f == t.flow) {
                out.push(t);
            }
        }
        out.sort_by_key(|t| std::cmp::Reverse(t.id));
        Ok(out)
    }

    /// A task's subtasks, in order.
    pub fn subtasks(&self, task: u64) -> Result<Vec<SubTask>, EngineError> {
        let mut out: Vec<SubTask> = Vec::new();
        for (_, d) in self.store().index_records(SUBTASK)? {
            let s: SubTask = parse("subtask", &d)?;
            if s.parent == task {
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    fn next_task_id(&self) -> Result<u64, EngineError> {
        let top = |kind: &str| -> Result<u64, EngineError> {
            Ok(self
                .store()
                .index_records(kind)?
                .iter()
                .map(|(i, _)| *i)
                .max()
                .unwrap_or(0))
        };
        Ok(top(TASK)?.max(top(SUBTASK)?) + 1)
    }

    fn single_doc<T: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
    ) -> Result<Option<T>, EngineError> {
        self.store()
            .index_records(kind)?
            .into_iter()
            .next()
            .map(|(_, d)| parse(kind, &d))
            .transpose()
    }

    /// The deployment of flow `flow`: which model replaced its declared one.
    pub fn deployment(&self, flow: &str) -> Result<Option<Deployment>, EngineError> {
        self.single_doc(&format!("{DEPLOYMENT}{flow}"))
    }

    fn put_deployment(&self, flow: &str, d: &Deployment) -> Result<(), EngineError> {
        self.store()
            .put_index_records(&[(&format!("{DEPLOYMENT}{flow}"), 0, json(d)?)])?;
        Ok(())
    }

    /// Forgets what reindex tasks kept for flow `flow` (its deployment, its kept previous
    /// state and that state's collection, the hidden states of its tasks; active tasks
    /// fail); for a deleted flow.
    pub(crate) fn forget_reindex_state(&self, flow: &str) -> Result<(), EngineError> {
        for mut t in self.tasks(Some(flow))? {
            if !t.switched
                && t.deploy_as_blue
                && let Some(c) = t.new_collection.clone()
            {
                self.drop_state(&t.work_record(), &c)?;
            }
            if t.status.is_active() {
                t.status = TaskStatus::Failed;
                t.error = Some(format!("flow `{flow}` was deleted"));
                t.finished_ms = Some(now_ms());
                self.put_task(&t, &[])?;
            }
        }
        if let Some(d) = self.deployment(flow)?
            && let Some(prev) = d.previous
        {
            self.drop_state(&prev.record, &prev.collection)?;
        }
        self.store()
            .delete_index_records(&format!("{DEPLOYMENT}{flow}"), &[0])?;
        Ok(())
    }

    /// The model the vectors of collection `physical` come from, when a reindex task
    /// recorded it.
    pub fn collection_model(&self, physical: &str) -> Result<Option<EmbedSpec>, EngineError> {
        self.single_doc(&format!("{COLLECTION_MODEL}{physical}"))
    }

    fn set_collection_model(&self, physical: &str, model: &EmbedSpec) -> Result<(), EngineError> {
        self.store().put_index_records(&[(
            &format!("{COLLECTION_MODEL}{physical}"),
            0,
            json(model)?,
        )])?;
        Ok(())
    }

    /// The flow as it runs: its definition with the deployed model when a reindex replaced
    /// the model the definition names (and the definition still names it).
    pub fn effective(&self, spec: &FlowSpec) -> Result<FlowSpec, EngineError> {
        match self.deployment(&spec.name)? {
            Some(d) if d.declared == *spec.embed() && d.deployed != d.declared => {
                Ok(spec.with_embed(d.deployed))
            }
            _ => Ok(spec.clone()),
        }
    }

    /// The flow's declared model: what its definition names, behind any deployment.
    fn declared_model(&self, spec: &FlowSpec) -> Result<EmbedSpec, EngineError> {
        Ok(match self.deployment(&spec.name)? {
            Some(d) if d.deployed == *spec.embed() => d.declared,
            _ => spec.embed().clone(),
        })
    }

    /// Visits every queue entry of `flow` with one of `statuses` (all when empty) and, when
    /// given, the label `queue`, by key.
    fn each_entry(
        &self,
        flow: FlowId,
        statuses: &[ItemStatus],
        queue: Option<&str>,
        mut visit: impl FnMut(freshindex_store::QueueEntry),
    ) -> Result<(), EngineError> {
        let mut after = None;
        loop {
            let page = self.store().list(
                flow,
                &ListRequest {
                    statuses: statuses.to_vec(),
                    queue: queue.map(str::to_string),
                    after: after.take(),
                    limit: 1000,
                },
            )?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = Some(last.item.key.clone());
            page.into_iter().for_each(&mut visit);
        }
    }

    // ---- the API -------------------------------------------------------------------------

    /// Creates a reindex task. Refused with [`EngineError::Conflict`] (naming it) when another
    /// task of the flow is active, unless the request waits on conflict.
    pub fn create_reindex(&self, req: &ReindexRequest) -> Result<ReindexTask, EngineError> {
        let (_, spec) = self.flow(&req.flow)?;
        if spec.postgres().is_some() {
            return Err(EngineError::Invalid(format!(
                "flow `{}` reads a PostgreSQL source: reindex tasks read folders only so far; change the model in the flow's definition and reset it (the next run reads every row again)",
                req.flow
            )));
        }
        if spec.flows_source().is_some() {
            return Err(EngineError::Invalid(format!(
                "flow `{}` reads other flows: reindex tasks read folders only so far; change the model in the flow's definition and reset it (its next run reads its inputs again)",
                req.flow
            )));
        }
        if spec.files().is_none() {
            return Err(EngineError::Invalid(format!(
                "flow `{}` has a push source: a reindex reads every item again from its source, and a push source's items are only what was pushed; push them again into a flow with the new model",
                req.flow
            )));
        }
        if spec.target.postgres().is_some() {
            let how = if req.deploy_as_blue {
                "a blue reindex builds a second collection in the data directory and switches an alias to it, and a table has neither"
            } else {
                "a reindex task records the model of a built-in collection so searches embed with it, which a table does not keep"
            };
            return Err(EngineError::Invalid(format!(
                "flow `{}` writes to {}: {how}; change the flow's model in its config and run it (`freshindex index`; a model of another dimension needs `freshindex drop` and `freshindex setup` first)",
                req.flow, spec.target
            )));
        }
        let batch_size = req.batch_size.unwrap_or(100);
        if batch_size == 0 || batch_size > 100_000 {
            return Err(EngineError::Invalid(format!(
                "batchSize: {batch_size} is out of range 1..=100000"
            )));
        }
        if let Some(m) = req.max_failed_items
            && m < -1
        {
            return Err(EngineError::Invalid(format!(
                "maxFailedItems: {m} must be -1 (no limit) or more"
            )));
        }
        // The model must load (a missing model is a clear error now, not in the middle).
        let dest = embedder_for(&req.to).map_err(EngineError::Invalid)?;
        if !req.deploy_as_blue
            && let Ok(Some(c)) = self.existing_collection(spec.target.name())
            && c.dimension() != dest.dimension()
        {
            return Err(EngineError::Invalid(format!(
                "to: `{}` makes {}-dimensional vectors and collection `{}` holds {}-dimensional ones; an in-place reindex keeps the collection, so use deployAsBlue (a new collection)",
                req.to.model,
                dest.dimension(),
                spec.target.name(),
                c.dimension()
            )));
        }
        let _g = self.tasks_guard();
        let active: Vec<ReindexTask> = self
            .tasks(Some(&req.flow))?
            .into_iter()
            .filter(|t| t.status.is_active())
            .collect();
        if let Some(other) = active.last()
            && !req.wait_on_conflict
        {
            return Err(EngineError::Conflict(format!(
                "flow `{}` has reindex task {} {}: wait for it to end, cancel it, or ask to wait on conflict",
                req.flow,
                other.id,
                match other.status {
                    TaskStatus::Running => "running",
                    TaskStatus::Waiting => "waiting",
                    _ => "pending",
                }
            )));
        }
        let now = now_ms();
        let t = ReindexTask {
            id: self.next_task_id()?,
            kind: "reindex".into(),
            flow: req.flow.clone(),
            source: spec.embed().clone(),
            dest: req.to.clone(),
            status: if active.is_empty() {
                TaskStatus::Pending
            } else {
                TaskStatus::Waiting
            },
            phase: TaskPhase::Planning,
            progress: 0.0,
            count: 0,
            total: 0,
            children: Vec::new(),
            failed_items: Vec::new(),
            failed_count: 0,
            deploy_as_blue: req.deploy_as_blue,
            wait_on_conflict: req.wait_on_conflict,
            batch_size,
            max_failed_items: req.max_failed_items.unwrap_or(spec.max_failed_items),
            new_collection: None,
            switched: false,
            error: None,
            created_ms: now,
            started_ms: None,
            finished_ms: None,
            updated_ms: now,
        };
        self.put_task(&t, &[])?;
        Ok(t)
    }

    /// Tasks a runner may start or resume now, in id order: active ones with no earlier
    /// active task of the same flow.
    pub fn runnable_tasks(&self) -> Result<Vec<u64>, EngineError> {
        let mut all = self.tasks(None)?;
        all.sort_by_key(|t| t.id);
        let mut busy: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for t in all.into_iter().filter(|t| t.status.is_active()) {
            if busy.insert(t.flow.clone()) {
                out.push(t.id);
            }
        }
        Ok(out)
    }

    /// Cancels a task: a pending or waiting one at once; a running one stops between two
    /// batches. A blue task's new collection and hidden state are removed; an in-place task
    /// gives the flow its previous model back (its next run re-embeds what the task changed,
    /// from the cache). A task that ended cannot be canceled.
    pub fn cancel_task(&self, id: u64) -> Result<ReindexTask, EngineError> {
        let mut t = {
            let _g = self.tasks_guard();
            let mut t = self.task(id)?;
            if !t.status.is_active() {
                return Err(EngineError::Conflict(format!(
                    "task {id} already ended ({:?}); only a pending, waiting or running task can be canceled",
                    t.status
                )
                .to_lowercase()));
            }
            let was = t.status;
            t.status = TaskStatus::Canceled;
            t.finished_ms = Some(now_ms());
            t.updated_ms = now_ms();
            self.put_task(&t, &[])?;
            if was == TaskStatus::Running
                && let Some(flag) = self.task_flag(id, false)
            {
                flag.store(true, Ordering::Relaxed);
                return Ok(t);
            }
            t
        };
        // A runner that holds the task cleans up when it stops; a task no process runs (its
        // runner died) is cleaned here.
        let _runner = match self.lock(&format!("{HIDDEN_PREFIX}task-{id}")) {
            Ok(l) => l,
            Err(EngineError::Busy(_)) => return Ok(t),
            Err(e) => return Err(e),
        };
        self.clean_canceled(&mut t)?;
        Ok(t)
    }

    fn clean_canceled(&self, t: &mut ReindexTask) -> Result<(), EngineError> {
        if t.switched {
            return Ok(());
        }
        if t.deploy_as_blue {
            if let Some(c) = &t.new_collection {
                self.drop_state(&t.work_record(), c)?;
            }
        } else if t.phase != TaskPhase::Planning
            && let Some(d) = self.deployment(&t.flow)?
            && d.task == t.id
        {
            // In place: the flow goes back to the model it had.
            let back = Deployment {
                deployed: t.source.clone(),
                previous: None,
                ..d
            };
            self.put_deployment(&t.flow, &back)?;
            let (_, spec) = self.flow(&t.flow)?;
            let name = collection_target(&spec, "a reindex task applies to built-in collections")?;
            let physical = self.collections().resolve(name)?;
            self.set_collection_model(&physical, &t.source)?;
        }
        Ok(())
    }

    /// Makes a failed (or succeeded) task's failed items go again: they are queued again and
    /// the task runs once more (a blue task that failed switches when it then completes within
    /// its limit).
    pub fn retry_failed(&self, id: u64) -> Result<ReindexTask, EngineError> {
        let _g = self.tasks_guard();
        let mut t = self.task(id)?;
        if t.status.is_active() || t.status == TaskStatus::Canceled {
            return Err(EngineError::Conflict(format!(
                "task {id} is {}: only a task that ended (succeeded or failed) can retry its failed items",
                serde_json::to_string(&t.status)
                    .unwrap_or_default()
                    .trim_matches('"')
            )));
        }
        let mut subs = self.subtasks(id)?;
        if t.phase != TaskPhase::Planning {
            let (flow, _) = self.work_state(&t)?;
            let mut requeue: Vec<PushItem> = Vec::new();
            for s in &mut subs {
                if s.failed > 0 {
                    s.status = TaskStatus::Pending;
                }
            }
            self.each_entry(flow, &[ItemStatus::Error], None, |e| {
                requeue.push(PushItem {
                    key: e.item.key,
                    kind: PushKind::Type(PushType::Modified),
                    payload: None,
                    queue: Some(e.item.queue),
                })
            })?;
            for part in requeue.chunks(1000) {
                self.store().push(flow, part, now_ms())?;
            }
            t.phase = TaskPhase::Batches;
        }
        t.status = TaskStatus::Pending;
        t.error = None;
        t.finished_ms = None;
        t.updated_ms = now_ms();
        self.put_task(&t, &subs)?;
        Ok(t)
    }

    /// Executes a task until it ends (or is stopped by `stop`, which leaves it to resume
    /// later). Another process executing it makes this [`EngineError::Busy`].
    pub fn run_task(
        &self,
        id: u64,
        opts: &TaskRunOptions,
        stop: Option<&AtomicBool>,
    ) -> Result<ReindexTask, EngineError> {
        let _lock = self.lock(&format!("{HIDDEN_PREFIX}task-{id}"))?;
        let flag = self.task_flag(id, true).unwrap_or_default();
        let result = self.run_task_locked(id, opts, stop, &flag);
        self.drop_task_flag(id);
        result
    }

    fn run_task_locked(
        &self,
        id: u64,
        opts: &TaskRunOptions,
        stop: Option<&AtomicBool>,
        flag: &Arc<AtomicBool>,
    ) -> Result<ReindexTask, EngineError> {
        let mut t = {
            let _g = self.tasks_guard();
            let mut t = self.task(id)?;
            if !t.status.is_active() {
                return Ok(t);
            }
            if let Some(first) = self
                .tasks(Some(&t.flow))?
                .into_iter()
                .filter(|o| o.status.is_active() && o.id < t.id)
                .min_by_key(|o| o.id)
            {
                if t.status != TaskStatus::Waiting {
                    t.status = TaskStatus::Waiting;
                    t.updated_ms = now_ms();
                    self.put_task(&t, &[])?;
                }
                tracing::info!(task = id, waits_for = first.id, "reindex task waits");
                return Ok(t);
            }
            t.status = TaskStatus::Running;
            t.started_ms.get_or_insert(now_ms());
            t.updated_ms = now_ms();
            self.put_task(&t, &[])?;
            t
        };
        // The runner's stop (shutdown) and this task's cancel both end the work between two
        // batches; the record says which it was.
        let watcher_done = AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            if let Some(stop) = stop {
                let (flag, done) = (flag.clone(), &watcher_done);
                scope.spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        if stop.load(Ordering::Relaxed) {
                            flag.store(true, Ordering::Relaxed);
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
            }
            let r = self.drive(&mut t, opts, flag);
            watcher_done.store(true, Ordering::Relaxed);
            r
        });
        match outcome {
            Ok(()) => {}
            Err(EngineError::Cancelled(_)) => {
                let now = self.task(id)?;
                if now.status == TaskStatus::Canceled {
                    t.status = TaskStatus::Canceled;
                    t.finished_ms = now.finished_ms;
                    self.clean_canceled(&mut t)?;
                    self.put_task(&t, &[])?;
                } else {
                    // Stopped by the runner: resumed later where it is.
                    tracing::info!(task = id, "reindex task stopped; it resumes later");
                }
                return self.task(id);
            }
            Err(EngineError::Busy(m)) => {
                // The flow is busy (another process writes its collection): tried later.
                tracing::warn!(task = id, "reindex task waits: {m}");
                return self.task(id);
            }
            Err(e) => {
                t.status = TaskStatus::Failed;
                t.error = Some(e.to_string());
                t.finished_ms = Some(now_ms());
                let _g = self.tasks_guard();
                if self.task(id)?.status != TaskStatus::Canceled {
                    t.updated_ms = now_ms();
                    self.put_task(&t, &[])?;
                }
                return self.task(id);
            }
        }
        Ok(t)
    }

    /// The state a task writes, with its stored spec: the hidden state of a blue task not
    /// switched yet, else the flow's own.
    fn work_state(&self, t: &ReindexTask) -> Result<(FlowId, FlowSpec), EngineError> {
        let blue_hidden = t.deploy_as_blue && !t.switched;
        let name = if blue_hidden {
            t.work_record()
        } else {
            t.flow.clone()
        };
        let rec = self.store().flow(&name)?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "task {}: the flow state `{name}` no longer exists (the flow was deleted)",
                t.id
            ))
        })?;
        let spec: FlowSpec = parse("stored flow spec", &rec.spec_json)?;
        Ok((rec.id, spec))
    }

    fn drive(
        &self,
        t: &mut ReindexTask,
        opts: &TaskRunOptions,
        cancel: &AtomicBool,
    ) -> Result<(), EngineError> {
        let (_, flow_spec) = self.flow(&t.flow)?;
        let source = flow_spec
            .files()
            .cloned()
            .ok_or_else(|| EngineError::Invalid(format!("flow `{}` has a push source", t.flow)))?;
        let in_place = !t.deploy_as_blue || t.switched;
        // In place, the task is a run of the flow: it holds the flow's run lock throughout.
        let _flow_lock = if in_place {
            Some(self.lock_waiting(&t.flow, opts.lock_wait, cancel)?)
        } else {
            None
        };
        if t.phase == TaskPhase::Planning {
            self.plan(t, &flow_spec)?;
        }
        let (work_flow, work_spec) = self.work_state(t)?;
        let target = match (&t.new_collection, in_place) {
            (Some(c), false) => Target::Hidden {
                record: t.work_record(),
                collection: c.clone(),
            },
            _ => Target::Flow,
        };
        let batch_items = t.batch_size.clamp(1, 256);
        if t.phase == TaskPhase::Batches {
            let scan = files::scan(&source, &self.skip_dirs)?;
            let files: HashMap<String, files::ScannedFile> =
                scan.files.into_iter().map(|f| (f.key.clone(), f)).collect();
            let ctx = self.ctx_into(
                work_flow,
                &work_spec,
                &NoProgress,
                Some(self.run_owner().to_string()),
                &target,
            )?;
            // Leases of a runner that died are void: this process holds the task.
            self.store()
                .unreserve(work_flow, None, Some(self.run_owner()), now_ms())?;
            let mut subs = self.subtasks(t.id)?;
            for i in 0..subs.len() {
                if !subs[i].status.is_active() {
                    continue;
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(EngineError::Cancelled("stopped".into()));
                }
                subs[i].status = TaskStatus::Running;
                let label = subs[i].label.clone();
                let o = RunOptions {
                    workers: opts.workers,
                    lease_ms: opts.lease_ms,
                    batch_items,
                    cancel: Some(cancel),
                    queue: Some(&label),
                    ..RunOptions::default()
                };
                self.work(&ctx, &files, Some(&HashSet::new()), &o, None)?;
                self.count_subtask(work_flow, &mut subs[i])?;
                self.tally_task(t, work_flow, &subs)?;
                self.save_progress(t, &subs[i..=i])?;
                crate::failpoint::hit("reindex-batch-done");
            }
            t.phase = TaskPhase::Finishing;
            self.save_progress(t, &[])?;
        }
        if t.phase == TaskPhase::Finishing {
            self.finish(
                t, &flow_spec, &source, work_flow, &work_spec, &target, opts, cancel,
            )?;
        }
        Ok(())
    }

    /// Lists the source, makes the subtasks and queues every item under its subtask's label.
    fn plan(&self, t: &mut ReindexTask, flow_spec: &FlowSpec) -> Result<(), EngineError> {
        let source = flow_spec
            .files()
            .ok_or_else(|| EngineError::Invalid(format!("flow `{}` has a push source", t.flow)))?;
        let dest = embedder_for(&t.dest).map_err(EngineError::Config)?;
        let work_spec = flow_spec.with_embed(t.dest.clone());
        let work_flow = if t.deploy_as_blue {
            let alias = collection_target(flow_spec, "a blue reindex needs a built-in collection")?;
            let name = format!("{alias}.t{}", t.id);
            // Searches read each collection with its own model, the serving one's too.
            let current = self.collections().resolve(alias)?;
            if self.collection_model(&current)?.is_none() {
                self.set_collection_model(&current, &t.source)?;
            }
            self.collection(&name, dest.dimension())?;
            self.set_collection_model(&name, &t.dest)?;
            t.new_collection = Some(name);
            self.store()
                .register_flow(&t.work_record(), &json(&work_spec)?)?
        } else {
            // In place: the flow runs with the new model from now on.
            let declared = self.declared_model(flow_spec)?;
            self.put_deployment(
                &t.flow,
                &Deployment {
                    declared,
                    deployed: t.dest.clone(),
                    previous: None,
                    task: t.id,
                },
            )?;
            let name =
                collection_target(flow_spec, "a reindex task applies to built-in collections")?;
            let physical = self.collections().resolve(name)?;
            self.set_collection_model(&physical, &t.dest)?;
            self.register(&work_spec)?
        };
        let scan = files::scan(source, &self.skip_dirs)?;
        let keys: Vec<String> = scan.files.into_iter().map(|f| f.key).collect();
        let first = self.next_task_id()?;
        let mut subs = Vec::new();
        for (n, part) in keys.chunks(t.batch_size.max(1)).enumerate() {
            let label = t.label(n);
            let items: Vec<PushItem> = part
                .iter()
                .map(|k| PushItem {
                    key: k.clone(),
                    kind: PushKind::Type(PushType::Modified),
                    payload: None,
                    queue: Some(label.clone()),
                })
                .collect();
            self.store().push(work_flow, &items, now_ms())?;
            subs.push(SubTask {
                id: first + n as u64,
                parent: t.id,
                label,
                total: part.len() as u64,
                count: 0,
                failed: 0,
                status: TaskStatus::Pending,
            });
        }
        t.total = keys.len() as u64;
        t.children = subs.iter().map(|s| s.id).collect();
        t.phase = TaskPhase::Batches;
        t.set_count(0);
        self.save_progress(t, &subs)
    }

    /// A subtask's counts, from its queue entries.
    fn count_subtask(&self, flow: FlowId, s: &mut SubTask) -> Result<(), EngineError> {
        let (mut done, mut failed) = (0, 0);
        self.each_entry(flow, &[], Some(&s.label), |e| match e.item.status {
            ItemStatus::Error => {
                failed += 1;
                done += 1;
            }
            st if st.is_settled() => done += 1,
            _ => {}
        })?;
        s.count = done.min(s.total);
        s.failed = failed;
        s.status = TaskStatus::Succeeded;
        Ok(())
    }

    /// The task's count and failed items, from all its subtasks (as the runner holds them)
    /// and the queue.
    fn tally_task(
        &self,
        t: &mut ReindexTask,
        flow: FlowId,
        subs: &[SubTask],
    ) -> Result<(), EngineError> {
        let count: u64 = subs.iter().map(|s| s.count).sum();
        t.set_count(count.min(t.total));
        self.collect_failures(t, flow)
    }

    fn collect_failures(&self, t: &mut ReindexTask, flow: FlowId) -> Result<(), EngineError> {
        let mut failed = Vec::new();
        let mut n = 0u64;
        self.each_entry(flow, &[ItemStatus::Error], None, |e| {
            n += 1;
            if failed.len() < MAX_LISTED_FAILURES {
                let error = e.item.message.unwrap_or_default();
                failed.push(FailedItem {
                    item: e.item.key,
                    stage: stage_of(&error).to_string(),
                    error,
                });
            }
        })?;
        t.failed_items = failed;
        t.failed_count = n;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        t: &mut ReindexTask,
        flow_spec: &FlowSpec,
        source: &freshindex_core::spec::FilesSource,
        work_flow: FlowId,
        work_spec: &FlowSpec,
        target: &Target,
        opts: &TaskRunOptions,
        cancel: &AtomicBool,
    ) -> Result<(), EngineError> {
        let over =
            |t: &ReindexTask| t.max_failed_items >= 0 && t.failed_count as i64 > t.max_failed_items;
        self.collect_failures(t, work_flow)?;
        if over(t) {
            return Err(EngineError::Invalid(format!(
                "{} items failed, over maxFailedItems {}: the task did not switch; fix them and retry the failed items",
                t.failed_count, t.max_failed_items
            )));
        }
        let run_opts = RunOptions {
            workers: opts.workers,
            lease_ms: opts.lease_ms,
            cancel: Some(cancel),
            ..RunOptions::default()
        };
        let in_place = !t.deploy_as_blue || t.switched;
        if in_place {
            // Holding the flow's lock: one traversal brings in what changed meanwhile.
            self.run_locked(
                work_spec,
                source,
                work_flow,
                &run_opts,
                Instant::now(),
                target,
            )?;
        } else {
            // The bulk of the changes made during the task first, without the flow's lock...
            self.run_locked(
                work_spec,
                source,
                work_flow,
                &run_opts,
                Instant::now(),
                target,
            )?;
            // ...then the rest, and the switch, with it: no run of the flow writes meanwhile.
            let _lock = self.lock_waiting(&t.flow, opts.lock_wait, cancel)?;
            self.run_locked(
                work_spec,
                source,
                work_flow,
                &run_opts,
                Instant::now(),
                target,
            )?;
            self.collect_failures(t, work_flow)?;
            if over(t) {
                return Err(EngineError::Invalid(format!(
                    "{} items failed, over maxFailedItems {}: the task did not switch",
                    t.failed_count, t.max_failed_items
                )));
            }
            self.switch(t, flow_spec, work_flow)?;
        }
        self.collect_failures(
            t,
            if in_place {
                work_flow
            } else {
                self.flow(&t.flow)?.0
            },
        )?;
        t.phase = TaskPhase::Done;
        t.status = TaskStatus::Succeeded;
        t.finished_ms = Some(now_ms());
        t.set_count(t.count);
        self.save_progress(t, &[])?;
        if let Some(c) = &t.new_collection {
            self.after_write(c);
        }
        Ok(())
    }

    /// The blue/green switch, under the flow's run lock: the flow's collection name points at
    /// the new collection, the task's state becomes the flow's, the flow's state is kept.
    /// Done again after a crash, it finishes what is left.
    fn switch(
        &self,
        t: &mut ReindexTask,
        flow_spec: &FlowSpec,
        work_flow: FlowId,
    ) -> Result<(), EngineError> {
        let new = t
            .new_collection
            .clone()
            .ok_or_else(|| EngineError::Internal(format!("task {}: no new collection", t.id)))?;
        let alias = collection_target(
            flow_spec,
            "a blue reindex switch needs a built-in collection",
        )?
        .to_string();
        let w = self.writer();
        let current = self.collections().resolve(&alias)?;
        let old = if current == alias {
            // The first switch: the collection moves aside, its name becomes the alias.
            let moved = format!("{alias}.t0");
            // Its model is known under its next name before it moves.
            self.set_collection_model(&moved, &t.source)?;
            self.close_collection(&alias);
            self.collections()
                .replace_with_alias(&alias, &new, &moved)?;
            moved
        } else if current != new {
            self.collections().set_alias(&alias, &new)?;
            current
        } else {
            // Switched before a crash: the old one is what the deployment will name.
            self.deployment(&t.flow)?
                .and_then(|d| d.previous.map(|p| p.collection))
                .unwrap_or_default()
        };
        drop(w);
        if self.collection_model(&old)?.is_none() && !old.is_empty() {
            self.set_collection_model(&old, &t.source)?;
        }
        let prev_record = format!("{HIDDEN_PREFIX}previous-{}", t.flow);
        let flow_rec = self.store().flow(&t.flow)?;
        if flow_rec.as_ref().map(|r| r.id) != Some(work_flow) {
            // A state kept from an earlier switch goes now (with its collection).
            if let Some(d) = self.deployment(&t.flow)?
                && let Some(p) = d.previous
                && p.collection != old
            {
                self.drop_state(&p.record, &p.collection)?;
            } else if let Some(rec) = self.store().flow(&prev_record)? {
                self.store().delete_flow(rec.id)?;
            }
            let mut renames = vec![(work_flow, t.flow.clone())];
            if let Some(rec) = flow_rec {
                renames.push((rec.id, prev_record.clone()));
            }
            self.store().rename_flows(&renames)?;
            // The flow's stored spec: the deployed model, its own target name.
            self.store()
                .register_flow(&t.flow, &json(&flow_spec.with_embed(t.dest.clone()))?)?;
        }
        let declared = self.declared_model(flow_spec)?;
        self.put_deployment(
            &t.flow,
            &Deployment {
                declared,
                deployed: t.dest.clone(),
                previous: Some(PreviousState {
                    record: prev_record,
                    collection: old,
                    model: t.source.clone(),
                }),
                task: t.id,
            },
        )?;
        t.switched = true;
        tracing::info!(
            flow = t.flow,
            collection = new,
            "reindex switched the flow's collection"
        );
        Ok(())
    }

    /// Switches flow `flow` back to its state and collection before the last switch (the
    /// state it leaves is kept: a second rollback switches forward again), then brings it up
    /// to date with a run (what changed in the source since the switch).
    pub fn rollback(
        &self,
        flow: &str,
        opts: &RunOptions<'_>,
    ) -> Result<RollbackReport, EngineError> {
        let report = {
            let _lock = self.lock(flow)?;
            let (_, spec) = self.flow(flow)?;
            let Some(d) = self.deployment(flow)? else {
                return Err(EngineError::Conflict(format!(
                    "flow `{flow}` has no earlier state to roll back to (no reindex switched it)"
                )));
            };
            let Some(prev) = d.previous.clone() else {
                return Err(EngineError::Conflict(format!(
                    "flow `{flow}` has no earlier state to roll back to (it was dropped, or the last reindex was in place)"
                )));
            };
            let prev_rec = self.store().flow(&prev.record)?.ok_or_else(|| {
                EngineError::Conflict(format!(
                    "flow `{flow}`: the state kept for a rollback (`{}`) is gone",
                    prev.record
                ))
            })?;
            if !self.collections().names()?.contains(&prev.collection) {
                return Err(EngineError::Conflict(format!(
                    "flow `{flow}`: collection `{}` kept for a rollback was dropped",
                    prev.collection
                )));
            }
            let alias =
                collection_target(&spec, "a rollback switches built-in collections")?.to_string();
            let _w = self.writer();
            let current = self.collections().resolve(&alias)?;
            self.collections().set_alias(&alias, &prev.collection)?;
            let cur_rec = self
                .store()
                .flow(flow)?
                .ok_or_else(|| EngineError::NotFound(format!("flow `{flow}` is not defined")))?;
            self.store().rename_flows(&[
                (prev_rec.id, flow.to_string()),
                (cur_rec.id, prev.record.clone()),
            ])?;
            self.store()
                .register_flow(flow, &json(&spec.with_embed(prev.model.clone()))?)?;
            self.put_deployment(
                flow,
                &Deployment {
                    declared: d.declared.clone(),
                    deployed: prev.model.clone(),
                    previous: Some(PreviousState {
                        record: prev.record.clone(),
                        collection: current.clone(),
                        model: d.deployed.clone(),
                    }),
                    task: d.task,
                },
            )?;
            RollbackReport {
                flow: flow.to_string(),
                collection: prev.collection.clone(),
                model: prev.model.model.clone(),
                left: current,
                caught_up: None,
            }
        };
        let (_, spec) = self.flow(flow)?;
        let caught_up = match self.run(&spec, opts) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(flow, "catching up after the rollback: {e}");
                None
            }
        };
        Ok(RollbackReport {
            caught_up,
            ..report
        })
    }

    /// Drops the state and collection a switch kept for a rollback.
    pub fn drop_previous(&self, flow: &str) -> Result<Option<String>, EngineError> {
        let _lock = self.lock(flow)?;
        let Some(mut d) = self.deployment(flow)? else {
            return Ok(None);
        };
        let Some(prev) = d.previous.take() else {
            return Ok(None);
        };
        self.drop_state(&prev.record, &prev.collection)?;
        self.put_deployment(flow, &d)?;
        Ok(Some(prev.collection))
    }

    /// Removes a hidden state and its collection.
    fn drop_state(&self, record: &str, collection: &str) -> Result<(), EngineError> {
        if !collection.is_empty() && self.collections().resolve(collection)? == collection {
            let _w = self.writer();
            self.remove_collection(collection)?;
            self.store()
                .delete_index_records(&format!("{COLLECTION_MODEL}{collection}"), &[0])?;
        }
        if let Some(rec) = self.store().flow(record)? {
            self.store().delete_flow(rec.id)?;
        }
        Ok(())
    }

    /// Takes the flow's run lock, waiting while a run holds it.
    fn lock_waiting(
        &self,
        flow: &str,
        wait: Duration,
        cancel: &AtomicBool,
    ) -> Result<Option<crate::run::RunLock>, EngineError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.lock(flow) {
                Ok(l) => return Ok(l),
                Err(EngineError::Busy(m)) if Instant::now() < deadline => {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(EngineError::Cancelled(m));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_count_updates_progress_against_a_known_total() {
        let mut t = ReindexTask {
            id: 1,
            kind: "reindex".into(),
            flow: "f".into(),
            source: EmbedSpec::default(),
            dest: EmbedSpec::default(),
            status: TaskStatus::Running,
            phase: TaskPhase::Batches,
            progress: 0.0,
            count: 10,
            total: 100,
            children: vec![],
            failed_items: vec![],
            failed_count: 0,
            deploy_as_blue: true,
            wait_on_conflict: false,
            batch_size: 10,
            max_failed_items: 0,
            new_collection: None,
            switched: false,
            error: None,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            updated_ms: 0,
        };
        t.add_count(5);
        assert_eq!(t.count, 15);
        assert!((t.progress - 0.15).abs() < 1e-12);
        t.add_count(500);
        assert_eq!(t.progress, 1.0);
        t.total = 0;
        t.set_count(0);
        assert_eq!(
            t.progress, 0.0,
            "an empty source is not done before it is done"
        );
        t.phase = TaskPhase::Done;
        t.set_count(0);
        assert_eq!(t.progress, 1.0);
    }

    #[test]
    fn stages_are_read_from_messages() {
        assert_eq!(stage_of("embedding failed: boom"), "embed");
        assert_eq!(stage_of("not valid UTF-8 at byte 3"), "parse");
        assert_eq!(stage_of("cannot read file: permission denied"), "read");
    }
}
