//! The control plane of `freshindex serve`: when flows run by themselves, on-demand runs,
//! flow definitions, and live flows.
//!
//! Threads:
//! - **scheduler** (`freshindex-scheduler`): wraps the pure [`Scheduler`] state machine. It
//!   ticks with the wall clock, acts on what the tick says (start a run on a new thread,
//!   record a skipped occurrence, log a wait for a slot) and sleeps until the next occurrence
//!   or until something changes (a run ends, a flow is defined), at most [`MAX_SLEEP_MS`] so
//!   that a clock change is noticed.
//! - **a thread per scheduled run** (`run-<flow>`), which reports its outcome back.
//! - **a thread per live flow** (`live-<flow>`): [`Engine::watch`] under a supervisor that
//!   restarts it with a growing pause when it fails (a missing folder, a full disk) and
//!   serves on-demand runs while it waits.
//!
//! On-demand runs (`:run`) go through the same single-instance check as scheduled ones: the
//! scheduler knows every run of this process, so a run of a flow that is going is refused at
//! once; a run held by another process (the flow's lock file) is refused by the engine. An
//! on-demand run of a live flow is a full traversal done by its live loop, between batches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use freshindex_core::schedule::{Action, FlowScheduleStatus, Outcome, Scheduler};
use freshindex_core::{FlowSpec, Interval, RunState, Trigger};
use freshindex_engine::{
    Engine, EngineError, LiveControl, LiveEvent, LiveOptions, RunOptions, RunSummary,
};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::now_ms;

/// The scheduler thread wakes at least this often (a wall-clock change is seen by then).
pub const MAX_SLEEP_MS: i64 = 60_000;

/// Over a shared store: how often a process that is not the scheduler tries to become it
/// (and how long a leader sleeps at most, so that it notices a lost lock).
const LEADER_RETRY_MS: u64 = 1_000;

/// Over a shared store: how often the leader reads the flows again (definitions stored by
/// other processes).
const RELOAD_MS: i64 = 10_000;

/// A live flow that fails waits this long before its first restart, doubling up to
/// [`LIVE_RESTART_MAX`].
const LIVE_RESTART_MIN: Duration = Duration::from_secs(1);
const LIVE_RESTART_MAX: Duration = Duration::from_secs(300);

/// How long shutdown waits for scheduled runs in progress before leaving them (the next run
/// of such a flow marks its history entry interrupted and finishes its work).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Settings of the control plane.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// Shortest schedule interval a flow may have.
    pub min_schedule_interval: Interval,
    /// Most runs (scheduled and on demand) in progress at once.
    pub max_concurrent_runs: usize,
    /// Whether schedules and live flows are served at all (off: on-demand runs only).
    pub scheduler: bool,
    /// Worker threads of the runs this process starts (`None`: one per core; `Some(0)`:
    /// over a shared store, the runs of flows with a shared target leave processing to the
    /// workers of other processes).
    pub run_workers: Option<usize>,
}

/// Why a control-plane request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The definition or request is invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// A run of the flow is in progress (409).
    #[error("{0}")]
    Conflict(String),
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a live flow's thread is doing, for status pages.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveState {
    /// `starting`, `watching` or `restarting`.
    pub state: &'static str,
    /// Why the live loop last stopped with an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Restarts after errors since the server started.
    pub restarts: u32,
    /// Full traversals done by the loop (the first, periodic ones, after lost events, on
    /// demand).
    pub full_runs: u64,
    /// Batches of changes the watcher reported.
    pub batches: u64,
    /// When the last traversal or batch ended (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_update_ms: Option<i64>,
}

struct LiveFlow {
    control: Arc<LiveControl>,
    state: Arc<Mutex<LiveState>>,
    thread: JoinHandle<()>,
}

struct SchedState {
    sched: Scheduler,
    /// Something changed since the last tick: tick again before sleeping.
    dirty: bool,
    stop: bool,
}

/// The control plane (see the module documentation).
pub struct Control {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    opts: ControlOptions,
    state: Mutex<SchedState>,
    wake: Condvar,
    live: Mutex<BTreeMap<String, LiveFlow>>,
    runs: Mutex<Vec<JoinHandle<()>>>,
    scheduler_thread: Mutex<Option<JoinHandle<()>>>,
    /// Set at shutdown: runs in progress stop after their current batch.
    stopping: AtomicBool,
    /// Serializes changes of definitions (and the start of the live loops).
    admin: Mutex<()>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// The scheduling-relevant outcome of a run's result.
fn outcome_of(result: &Result<RunSummary, EngineError>) -> Outcome {
    match result {
        Ok(summary) => summary
            .status
            .run_state()
            .outcome()
            .unwrap_or(Outcome::Success),
        // Another process runs the flow: as if the occurrence had found it running.
        Err(EngineError::Busy(_)) => Outcome::NotRun,
        Err(_) => Outcome::Failure,
    }
}

/// Failed runs since the last success, newest first in `history`, and when the newest of
/// them started.
fn failures_in(history: &[freshindex_engine::RunEntry]) -> (u32, Option<i64>) {
    let mut failures = 0;
    let mut newest = None;
    for entry in history {
        match entry.status.outcome() {
            Some(Outcome::Success) => break,
            Some(Outcome::Failure) => {
                failures += 1;
                newest.get_or_insert(entry.started_at_ms);
            }
            Some(Outcome::NotRun) | None => {}
        }
    }
    (failures, newest)
}

/// Checks what `serve` needs of a flow beyond its own validity: the schedule's interval
/// within the deployment's bounds, and a schedule only where there is something to run.
pub fn check_servable(spec: &FlowSpec, min: Interval) -> Result<(), String> {
    spec.check_min_interval(min)?;
    if spec.schedule().is_some() && !spec.has_runs() {
        return Err(format!(
            "schedule: flow `{}` has a push source; its items arrive through the queue API, so there is nothing to run on a schedule",
            spec.name
        ));
    }
    Ok(())
}

impl Control {
    /// Builds the control plane over every flow of the data directory: their schedules, and
    /// the failure counts their histories tell. No thread runs until [`Control::start`].
    pub fn new(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        opts: ControlOptions,
    ) -> Result<Arc<Control>, EngineError> {
        let control = Arc::new(Control {
            engine: Arc::clone(&engine),
            metrics,
            state: Mutex::new(SchedState {
                sched: Scheduler::new(opts.max_concurrent_runs),
                dirty: true,
                stop: false,
            }),
            opts,
            wake: Condvar::new(),
            live: Mutex::new(BTreeMap::new()),
            runs: Mutex::new(Vec::new()),
            scheduler_thread: Mutex::new(None),
            stopping: AtomicBool::new(false),
            admin: Mutex::new(()),
        });
        let now = now_ms();
        for spec in engine.stored_flows()? {
            control.set_flow(&spec, now);
            let history = engine.history(&spec.name, freshindex_store::RUNS_KEPT as usize)?;
            if let (failures, Some(last)) = failures_in(&history) {
                lock(&control.state)
                    .sched
                    .restore_failures(&spec.name, failures, last);
            }
        }
        Ok(control)
    }

    /// Starts the threads: the live loops of live flows and the scheduler (unless
    /// `opts.scheduler` is off). Called once the server listens.
    pub fn start(self: &Arc<Self>) -> Result<(), EngineError> {
        if !self.opts.scheduler {
            return Ok(());
        }
        let _admin = lock(&self.admin);
        for spec in self.engine.stored_flows()? {
            self.start_live(&spec);
        }
        let c = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("freshindex-scheduler".into())
            .spawn(move || c.scheduler_loop())
            .map_err(|e| EngineError::Internal(format!("starting the scheduler: {e}")))?;
        *lock(&self.scheduler_thread) = Some(thread);
        Ok(())
    }

    /// Claims flow `name` for a run or a change of its definition: refused while a run of it
    /// is in progress in this process. While claimed, its scheduled occurrences skip and
    /// on-demand runs are refused. End a claim with [`Control::finished`].
    fn claim(&self, name: &str, doing: &str) -> Result<(), ControlError> {
        let mut st = lock(&self.state);
        if let Some(run) = st.sched.run_in_progress(name) {
            return Err(ControlError::Conflict(format!(
                "a {} run of flow `{name}` is in progress (started {}); {doing} when it has finished",
                run.trigger,
                fmt_time(run.started)
            )));
        }
        st.sched.run_started(name, now_ms());
        Ok(())
    }

    /// Gives the scheduler a flow's schedule.
    fn set_flow(&self, spec: &FlowSpec, now: i64) {
        let mut st = lock(&self.state);
        st.sched
            .set_flow(&spec.name, spec.schedule(), spec.disabled, now);
        st.dirty = true;
        self.wake.notify_all();
    }

    /// Stores a flow definition (validated first) and applies it: the scheduler gets its
    /// schedule, a live flow's loop restarts with it. Returns whether the flow is new.
    pub fn define(&self, spec: &FlowSpec) -> Result<bool, ControlError> {
        check_servable(spec, self.opts.min_schedule_interval).map_err(ControlError::Invalid)?;
        // One definition change at a time; the claim keeps runs of the flow out meanwhile.
        let _admin = lock(&self.admin);
        self.claim(&spec.name, "define the flow again")?;
        let result = self.define_claimed(spec);
        self.finished(&spec.name, Outcome::NotRun);
        result
    }

    fn define_claimed(&self, spec: &FlowSpec) -> Result<bool, ControlError> {
        let existed = self
            .engine
            .store()
            .flow(&spec.name)
            .map_err(EngineError::from)?;
        // The live loop holds the flow between its batches: stop it before storing.
        let was_live = self.stop_live(&spec.name);
        let stored = self.engine.define_flow(spec);
        if let Err(e) = stored {
            // The old definition goes on as before.
            if was_live && let Ok((_, old)) = self.engine.flow(&spec.name) {
                self.start_live(&old);
            }
            return Err(match e {
                // An unknown model, a bad splitter, a collection another flow owns.
                EngineError::Config(m) => ControlError::Invalid(m),
                e => e.into(),
            });
        }
        self.set_flow(spec, now_ms());
        self.start_live(spec);
        Ok(existed.is_none())
    }

    /// Deletes a flow: its schedule, live loop, target and state.
    pub fn delete(&self, name: &str) -> Result<freshindex_engine::DeleteReport, ControlError> {
        let _admin = lock(&self.admin);
        self.claim(name, "delete the flow")?;
        let was_live = self.stop_live(name);
        let result = match self.engine.delete_flow(name) {
            Ok(report) => {
                lock(&self.state).sched.remove_flow(name);
                Ok(report)
            }
            Err(e) => {
                if was_live && let Ok((_, spec)) = self.engine.flow(name) {
                    self.start_live(&spec);
                }
                Err(e.into())
            }
        };
        self.finished(name, Outcome::NotRun);
        result
    }

    /// After a reset of a live flow, its loop traverses the folder again at once instead of
    /// at its next periodic refresh (a reset forgets what the loop's batches rely on).
    pub fn after_reset(&self, name: &str) {
        if let Some(live) = lock(&self.live).get(name) {
            // Nobody waits for this run; its summary goes to the history.
            drop(live.control.request_full());
        }
    }

    /// Runs a files or database flow now, on the calling thread, and returns its summary. Refused while
    /// a run of the flow is in progress.
    pub fn run_now(&self, name: &str) -> Result<RunSummary, ControlError> {
        self.claim(name, "run it again")?;
        // Read under the claim: a definition stored before is the one that runs.
        let result = self.engine.flow(name).map_err(ControlError::from).and_then(|(_, spec)| {
            if !spec.has_runs() {
                return Err(ControlError::Invalid(format!(
                    "flow `{name}` has a push source: its items arrive through `items:push` and `items/{{key}}:index`, not through runs"
                )));
            }
            Ok(self.execute(&spec, Trigger::Manual))
        });
        match result {
            Ok(run) => {
                self.finished(name, outcome_of(&run));
                Ok(run?)
            }
            Err(e) => {
                self.finished(name, Outcome::NotRun);
                Err(e)
            }
        }
    }

    /// Runs the flow: through its live loop when it has one, else directly.
    fn execute(&self, spec: &FlowSpec, trigger: Trigger) -> Result<RunSummary, EngineError> {
        let live = lock(&self.live)
            .get(&spec.name)
            .filter(|l| !l.thread.is_finished())
            .map(|l| Arc::clone(&l.control));
        match live {
            // The live loop counts the runs it does.
            Some(control) => control.request_full().recv().unwrap_or_else(|_| {
                Err(EngineError::Busy(format!(
                    "the live loop of flow `{}` stopped before it could run; try again",
                    spec.name
                )))
            }),
            None => {
                let defaults = RunOptions::default();
                let result = self.engine.run(
                    spec,
                    &RunOptions {
                        trigger,
                        cancel: Some(&self.stopping),
                        workers: self.opts.run_workers.unwrap_or(defaults.workers),
                        ..defaults
                    },
                );
                if let Ok(summary) = &result {
                    self.metrics.count_run(summary);
                }
                result
            }
        }
    }

    /// Tells the scheduler a run ended.
    fn finished(&self, name: &str, outcome: Outcome) {
        let mut st = lock(&self.state);
        st.sched.run_finished(name, outcome, now_ms());
        st.dirty = true;
        self.wake.notify_all();
    }

    /// What the scheduler and the live loop know about a flow.
    pub fn status(&self, name: &str) -> (Option<FlowScheduleStatus>, Option<LiveState>) {
        let mut sched = lock(&self.state).sched.status(name);
        if !self.opts.scheduler
            && let Some(s) = &mut sched
        {
            // Nothing runs by itself: say so rather than show times that will not come.
            s.schedule = None;
            s.next_due = None;
            s.waiting = None;
        }
        let live = lock(&self.live).get(name).map(|l| lock(&l.state).clone());
        (sched, live)
    }

    fn scheduler_loop(self: Arc<Self>) {
        let shared = self.engine.store().has_shared_locks();
        let mut leader: Option<freshindex_store::StoreLock> = None;
        let mut reloaded = 0i64;
        let mut st = lock(&self.state);
        loop {
            if st.stop {
                return;
            }
            let now = now_ms();
            if shared {
                // One scheduler acts at a time among the processes sharing the store: the
                // holder of its lock `scheduler`. Another takes over when the leader's
                // session ends (the process died, or lost the database).
                drop(st);
                let was = leader.as_ref().is_some_and(|l| l.is_held());
                if !was {
                    leader = match self.engine.store().try_lock("scheduler") {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!("scheduler: taking the leader lock: {e}");
                            None
                        }
                    };
                }
                let is = leader.is_some();
                if is && (!was || now - reloaded > RELOAD_MS) {
                    if !was {
                        tracing::info!("this process is the scheduler now (leader)");
                    }
                    // Definitions may have changed in other processes; a new leader also
                    // takes up the failure counts the histories tell.
                    self.reload_flows(now, !was);
                    reloaded = now;
                }
                st = lock(&self.state);
                if !is {
                    st = self
                        .wake
                        .wait_timeout(st, Duration::from_millis(LEADER_RETRY_MS))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
            }
            st.dirty = false;
            let actions = st.sched.tick(now);
            if !actions.is_empty() {
                drop(st);
                for action in actions {
                    self.act(action);
                }
                st = lock(&self.state);
                continue;
            }
            if st.dirty {
                continue;
            }
            let most = if shared {
                LEADER_RETRY_MS as i64
            } else {
                MAX_SLEEP_MS
            };
            let sleep = st
                .sched
                .next_wakeup()
                .map_or(most, |at| at.saturating_sub(now))
                .clamp(1, most);
            st = self
                .wake
                .wait_timeout(st, Duration::from_millis(sleep as u64))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Gives the scheduler every stored flow again, with the failure counts their histories
    /// tell (a new leader, or definitions changed by other processes).
    fn reload_flows(&self, now: i64, restore: bool) {
        let flows = match self.engine.stored_flows() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("scheduler: reading the flows: {e}");
                return;
            }
        };
        for spec in flows {
            self.set_flow(&spec, now);
            if restore
                && let Ok(history) = self
                    .engine
                    .history(&spec.name, freshindex_store::RUNS_KEPT as usize)
                && let (failures, Some(last)) = failures_in(&history)
            {
                lock(&self.state)
                    .sched
                    .restore_failures(&spec.name, failures, last);
            }
        }
    }

    fn act(self: &Arc<Self>, action: Action) {
        match action {
            Action::Start { flow, due, .. } => {
                tracing::info!(flow, due = %fmt_time(due), "scheduled run starts");
                let c = Arc::clone(self);
                let name = flow.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("run-{flow}"))
                    .spawn(move || c.scheduled_run(&name));
                match spawned {
                    Ok(handle) => {
                        let mut runs = lock(&self.runs);
                        runs.retain(|h| !h.is_finished());
                        runs.push(handle);
                    }
                    Err(e) => {
                        tracing::error!(flow, "cannot start a run thread: {e}");
                        self.finished(&flow, Outcome::Failure);
                    }
                }
            }
            Action::Skip { flow, due } => {
                let running = lock(&self.state).sched.run_in_progress(&flow);
                let message = match running {
                    Some(r) => format!(
                        "skipped: the {} run that started {} was still going",
                        r.trigger,
                        fmt_time(r.started)
                    ),
                    None => "skipped: the previous run was still going".to_string(),
                };
                tracing::info!(flow, due = %fmt_time(due), "{message}");
                self.record_skip(&flow, due, &message);
            }
            Action::Wait {
                flow,
                due,
                in_progress,
            } => {
                tracing::info!(
                    flow,
                    due = %fmt_time(due),
                    in_progress,
                    "waiting for a slot: max_concurrent_runs runs are in progress"
                );
            }
        }
    }

    fn record_skip(&self, flow: &str, due: i64, message: &str) {
        Metrics::add(&self.metrics.runs_skipped, 1);
        let recorded = self.engine.store().flow(flow).and_then(|rec| match rec {
            Some(rec) => self
                .engine
                .store()
                .record_run_event(
                    rec.id,
                    Trigger::Scheduled,
                    RunState::Skipped,
                    due,
                    Some(message),
                )
                .map(|_| ()),
            None => Ok(()),
        });
        if let Err(e) = recorded {
            tracing::warn!(flow, "recording a skipped occurrence: {e}");
        }
    }

    fn scheduled_run(&self, name: &str) {
        let result = self
            .engine
            .flow(name)
            .and_then(|(_, spec)| self.execute(&spec, Trigger::Scheduled));
        let outcome = outcome_of(&result);
        match &result {
            Ok(s) => {
                tracing::info!(flow = name, status = ?s.status, elapsed_ms = s.elapsed_ms, "scheduled run ended")
            }
            Err(EngineError::Busy(m)) => {
                self.record_skip(name, now_ms(), &format!("skipped: {m}"));
            }
            Err(e) => tracing::warn!(flow = name, "scheduled run failed: {e}"),
        }
        self.finished(name, outcome);
    }

    /// Starts the live loop of a live, enabled files or database flow (when schedules are
    /// served).
    fn start_live(&self, spec: &FlowSpec) {
        if !self.opts.scheduler
            || !spec.mode().is_live()
            || spec.disabled
            || !spec.has_runs()
            || self.stopping.load(Ordering::Relaxed)
        {
            return;
        }
        let control = Arc::new(LiveControl::default());
        let state = Arc::new(Mutex::new(LiveState {
            state: "starting",
            ..LiveState::default()
        }));
        let (engine, metrics) = (Arc::clone(&self.engine), Arc::clone(&self.metrics));
        let (c, s, sp) = (Arc::clone(&control), Arc::clone(&state), spec.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("live-{}", spec.name))
            .spawn(move || live_loop(&engine, &metrics, &sp, &c, &s));
        match spawned {
            Ok(thread) => {
                let old = lock(&self.live).insert(
                    spec.name.clone(),
                    LiveFlow {
                        control,
                        state,
                        thread,
                    },
                );
                // Callers stop a flow's loop before starting another; never leave two.
                if let Some(old) = old {
                    old.control.stop();
                    let _ = old.thread.join();
                }
            }
            Err(e) => tracing::error!(flow = spec.name, "cannot start the live loop: {e}"),
        }
    }

    /// Stops a flow's live loop and waits for it; returns whether there was one.
    fn stop_live(&self, name: &str) -> bool {
        let Some(live) = lock(&self.live).remove(name) else {
            return false;
        };
        live.control.stop();
        if live.thread.join().is_err() {
            tracing::error!(flow = name, "the live loop panicked");
        }
        true
    }

    /// Stops the scheduler and the live loops, and waits (a while) for scheduled runs.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        {
            let mut st = lock(&self.state);
            st.stop = true;
            self.wake.notify_all();
        }
        if let Some(t) = lock(&self.scheduler_thread).take() {
            let _ = t.join();
        }
        let live: Vec<(String, LiveFlow)> =
            std::mem::take(&mut *lock(&self.live)).into_iter().collect();
        for (_, l) in &live {
            l.control.stop();
        }
        for (name, l) in live {
            if l.thread.join().is_err() {
                tracing::error!(flow = name, "the live loop panicked");
            }
        }
        let runs = std::mem::take(&mut *lock(&self.runs));
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while runs.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = runs.iter().filter(|h| !h.is_finished()).count();
        if left > 0 {
            tracing::warn!(
                "leaving {left} scheduled run(s) in progress; the next run of each flow finishes its work"
            );
        }
    }
}

/// A live flow's thread: [`Engine::watch`], restarted after errors with a growing pause,
/// during which on-demand runs are served directly.
fn live_loop(
    engine: &Engine,
    metrics: &Metrics,
    spec: &FlowSpec,
    control: &LiveControl,
    state: &Mutex<LiveState>,
) {
    let live = LiveOptions {
        refresh_interval: spec
            .mode()
            .refresh_interval()
            .map(Interval::as_std)
            .or(LiveOptions::default().refresh_interval),
        ..LiveOptions::default()
    };
    let opts = RunOptions {
        trigger: Trigger::Live,
        ..RunOptions::default()
    };
    let mut pause = LIVE_RESTART_MIN;
    while !control.is_stopped() {
        lock(state).state = "watching";
        let mut healthy = false;
        let mut report = |event: LiveEvent| {
            let mut s = lock(state);
            let summary = match &event {
                LiveEvent::Full(summary) => {
                    s.full_runs += 1;
                    healthy = true;
                    summary
                }
                LiveEvent::Batch(summary) => {
                    s.batches += 1;
                    summary
                }
            };
            s.last_update_ms = Some(now_ms());
            metrics.count_run(summary);
        };
        let result = engine.watch(spec, &opts, &live, control, &mut report);
        let Err(e) = result else {
            break;
        };
        if healthy {
            pause = LIVE_RESTART_MIN;
        }
        tracing::warn!(
            flow = spec.name,
            "live loop stopped: {e}; restarting in {pause:?}"
        );
        {
            let mut s = lock(state);
            s.state = "restarting";
            s.last_error = Some(e.to_string());
            s.restarts += 1;
        }
        let until = Instant::now() + pause;
        while !control.is_stopped() && Instant::now() < until {
            if let Some(reply) = control.take_request() {
                let manual = RunOptions {
                    trigger: Trigger::Manual,
                    ..RunOptions::default()
                };
                let result = engine.run(spec, &manual);
                let ok = result.is_ok();
                let _ = reply.send(result);
                if ok {
                    // The source is back: watch it again now.
                    pause = LIVE_RESTART_MIN;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pause = (pause * 2).min(LIVE_RESTART_MAX);
    }
}

/// A UTC timestamp for messages.
pub fn fmt_time(ms: i64) -> String {
    freshindex_core::schedule::format_utc_timestamp(ms).unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshindex_engine::{HistoryItems, RunEntry};

    fn entry(status: RunState, started: i64) -> RunEntry {
        RunEntry {
            id: started,
            flow: "f".into(),
            trigger: Trigger::Scheduled,
            status,
            started_at_ms: started,
            finished_at_ms: None,
            duration_ms: None,
            items: None::<HistoryItems>,
            rows: None,
            embeddings: None,
            errors: Vec::new(),
            warnings: Vec::new(),
            message: None,
        }
    }

    #[test]
    fn failures_count_back_to_the_last_success_ignoring_skips_and_resets() {
        use RunState::*;
        // Newest first.
        let h = [
            entry(Skipped, 9),
            entry(TransientFailure, 8),
            entry(Reset, 7),
            entry(PersistentFailure, 6),
            entry(InProgress, 5),
            entry(Success, 4),
            entry(TransientFailure, 3),
        ];
        assert_eq!(failures_in(&h), (2, Some(8)));
        assert_eq!(failures_in(&h[5..]), (0, None));
        assert_eq!(failures_in(&[]), (0, None));
    }
}
