//! Live mode for a files flow: a full traversal, then a file-system watcher feeds the queue
//! with the files that changed, batch by batch, with a periodic full traversal as a safety
//! net (watchers can drop events) and a full traversal whenever the watcher says events were
//! lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use freshindex_core::spec::FilesSource;
use freshindex_core::{FlowSpec, Trigger};
use freshindex_store::{FlowId, PushItem, PushKind};

use crate::process::{Work, metadata_hash};
use crate::run::{RunOptions, now_ms};
use crate::source::files::ScannedFile;
use crate::source::watch::SourceWatcher;
use crate::summary::{Issue, RunSummary};
use crate::{Engine, EngineError};

/// Timing of live mode.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// A batch closes once no change came for this long...
    pub quiet: Duration,
    /// ...or this long after its first change.
    pub max_delay: Duration,
    /// Full traversal this often (`None`: only when the watcher lost events).
    pub refresh_interval: Option<Duration>,
    /// A database source without notifications is asked for its recent changes this often.
    pub poll_interval: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            quiet: Duration::from_millis(30),
            max_delay: Duration::from_millis(300),
            refresh_interval: Some(Duration::from_secs(3600)),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// What live mode did.
#[derive(Debug)]
pub enum LiveEvent {
    /// A full traversal (the first one, a periodic one, or after lost events).
    Full(RunSummary),
    /// A batch of changed files.
    Batch(RunSummary),
}

/// The answer to [`LiveControl::request_full`].
pub type FullRunReply = mpsc::Receiver<Result<RunSummary, EngineError>>;

/// Steers a live loop ([`Engine::watch`]) from other threads: stop it, or have it run a full
/// traversal now (an on-demand run of a live flow: the loop runs it between two batches, so
/// it never overlaps the loop's own work).
#[derive(Debug, Default)]
pub struct LiveControl {
    stop: Arc<AtomicBool>,
    full: Mutex<Option<mpsc::Sender<Result<RunSummary, EngineError>>>>,
}

impl LiveControl {
    /// A control whose stop flag is `stop` (for example one a signal handler sets).
    pub fn with_stop_flag(stop: Arc<AtomicBool>) -> LiveControl {
        LiveControl {
            stop,
            full: Mutex::new(None),
        }
    }

    /// Asks the loop to stop; it does within about 200 ms (a run in progress ends after its
    /// current batch). A full traversal asked for and not yet taken is dropped: its
    /// requester sees the channel closed.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.take_request());
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Asks the loop for a full traversal, recorded with trigger `manual`; the reply carries
    /// its summary or error. A request not yet taken is replaced (its receiver sees the
    /// channel closed). If the loop stops first, the receiver sees the channel closed.
    pub fn request_full(&self) -> FullRunReply {
        let (tx, rx) = mpsc::channel();
        *self.full.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        // A stop that came first would never see this request: drop it here.
        if self.is_stopped() {
            drop(self.take_request());
        }
        rx
    }

    /// The pending request of a full traversal, if any.
    pub fn take_request(&self) -> Option<mpsc::Sender<Result<RunSummary, EngineError>>> {
        self.full.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Engine {
    /// Keeps a files flow's target fresh until `control` says stop: a full run, then the
    /// changes a watcher reports, in debounced batches, and the full traversals `control`
    /// asks for. A PostgreSQL-source flow's loop is the same over notifications (or polls)
    /// of its table (see [`crate::source::postgres`]). `report` hears about every run and batch. An error of the loop's own runs
    /// ends it; the error of a requested run goes to the requester and the loop goes on.
    pub fn watch(
        &self,
        spec: &FlowSpec,
        opts: &RunOptions<'_>,
        live: &LiveOptions,
        control: &LiveControl,
        report: &mut dyn FnMut(LiveEvent),
    ) -> Result<(), EngineError> {
        // A stop also ends a run in progress, between two batches.
        let opts = &RunOptions {
            cancel: Some(control.stop.as_ref()),
            ..*opts
        };
        if let Some(pg) = spec.postgres() {
            return self.watch_postgres(spec, pg, opts, live, control, report);
        }
        let Some(source) = spec.files() else {
            return Err(EngineError::Config(format!(
                "flow `{}` has a push source: live mode watches folders and databases",
                spec.name
            )));
        };
        let ignore: Vec<PathBuf> = self.data_dir().map(PathBuf::from).into_iter().collect();
        // Started before the first run, so that no change during it is missed.
        let watcher = SourceWatcher::new(source, &ignore)?;
        report(LiveEvent::Full(self.run(spec, opts)?));
        let mut last_full = Instant::now();
        let manual = RunOptions {
            trigger: Trigger::Manual,
            ..*opts
        };
        while !control.is_stopped() {
            if let Some(reply) = control.take_request() {
                let result = self.run(spec, &manual);
                if let Ok(summary) = &result {
                    report(LiveEvent::Full(summary.clone()));
                    last_full = Instant::now();
                }
                // The requester may have given up waiting.
                let _ = reply.send(result);
                continue;
            }
            if live
                .refresh_interval
                .is_some_and(|every| last_full.elapsed() >= every)
            {
                report(LiveEvent::Full(self.run(spec, opts)?));
                last_full = Instant::now();
                continue;
            }
            let Some(batch) =
                watcher.next_batch(Duration::from_millis(200), live.quiet, live.max_delay)
            else {
                continue;
            };
            if batch.rescan {
                report(LiveEvent::Full(self.run(spec, opts)?));
                last_full = Instant::now();
            } else {
                report(LiveEvent::Batch(self.refresh_files(
                    spec,
                    &batch.keys,
                    opts,
                )?));
            }
        }
        Ok(())
    }

    /// Brings the given files of a files flow up to date: each is stat-ed and pushed with its
    /// metadata hash under the last traversal's label, or deleted with its rows when it is
    /// gone; then the workers process the queue.
    ///
    /// Recorded in the flow's history as a `live` run.
    pub fn refresh_files(
        &self,
        spec: &FlowSpec,
        keys: &BTreeMap<String, PathBuf>,
        opts: &RunOptions<'_>,
    ) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        let Some(source) = spec.files() else {
            return Err(EngineError::Config(format!(
                "flow `{}` has a push source: it has no files to refresh",
                spec.name
            )));
        };
        let _lock = self.lock(&spec.name)?;
        let spec = &self.effective(spec)?;
        let flow = self.register(spec)?;
        self.recorded(flow, Trigger::Live, now_ms(), || {
            self.refresh_locked(spec, source, flow, keys, opts, started)
        })
    }

    fn refresh_locked(
        &self,
        spec: &FlowSpec,
        source: &FilesSource,
        flow: FlowId,
        keys: &BTreeMap<String, PathBuf>,
        opts: &RunOptions<'_>,
        started: Instant,
    ) -> Result<RunSummary, EngineError> {
        let store = self.store().as_ref();
        let mut ctx = self.ctx(
            flow,
            spec,
            opts.progress,
            Some(self.run_owner().to_string()),
        )?;
        ctx.stat_unlisted = true;
        store.unreserve(flow, None, Some(self.run_owner()), now_ms())?;
        let label = store
            .traversal_label(flow)?
            .unwrap_or_else(|| freshindex_core::queue::DEFAULT_QUEUE.to_string());

        let mut listed: HashMap<String, ScannedFile> = HashMap::new();
        let mut pushes = Vec::new();
        let mut gone = Vec::new();
        let mut issues = Vec::new();
        for (key, path) in keys {
            match ScannedFile::stat(key.clone(), path.clone(), source.follow_symlinks) {
                Ok((_, true)) => {}
                Ok((file, false)) => {
                    pushes.push(PushItem {
                        key: key.clone(),
                        kind: PushKind::Hashes {
                            content: None,
                            metadata: Some(metadata_hash(
                                &ctx.spec_fp,
                                file.size,
                                file.mtime_ns,
                                false,
                            )),
                        },
                        payload: None,
                        queue: Some(label.clone()),
                    });
                    listed.insert(key.clone(), file);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone.push(key.clone()),
                Err(e) => issues.push(Issue::error(key.clone(), format!("cannot stat: {e}"))),
            }
        }
        ctx.tally().summary.items.seen = listed.len() as u64;
        ctx.tally().issues(&issues);
        let mut unchanged = 0;
        for r in store.push(flow, &pushes, now_ms())?.into_iter().flatten() {
            if r.is_settled() {
                unchanged += 1;
            }
        }
        ctx.tally().summary.items.unchanged += unchanged;
        let known: Vec<String> = gone
            .into_iter()
            .filter(|k| matches!(store.get(flow, k), Ok(Some(_))))
            .collect();
        if !known.is_empty() {
            ctx.process(
                known
                    .into_iter()
                    .map(|key| Work::Gone {
                        key,
                        existed: true,
                        if_queue: None,
                        version: None,
                        warning: None,
                    })
                    .collect(),
            )?;
        }
        // Interrupted writes of these items must be finished, not taken as unchanged.
        let key_refs: Vec<&str> = listed.keys().map(String::as_str).collect();
        let pending: HashSet<String> = store
            .lineage(flow, &key_refs)?
            .into_iter()
            .filter(|(_, l)| !l.pending.is_empty())
            .map(|(k, _)| k)
            .collect();
        self.work(&ctx, &listed, Some(&pending), opts, None)?;
        ctx.into_summary(started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_pending_at_a_stop_or_after_it_is_answered_with_a_closed_channel() {
        let control = LiveControl::default();
        let before = control.request_full();
        control.stop();
        assert!(
            before.recv().is_err(),
            "a stop drops the request not yet taken"
        );
        let after = control.request_full();
        assert!(after.recv().is_err(), "a stopped loop takes no request");
        assert!(control.take_request().is_none());
    }

    #[test]
    fn a_new_request_replaces_one_not_yet_taken() {
        let control = LiveControl::default();
        let first = control.request_full();
        let second = control.request_full();
        assert!(first.recv().is_err());
        let reply = control.take_request().expect("the second request");
        drop(reply);
        assert!(second.recv().is_err());
    }
}
