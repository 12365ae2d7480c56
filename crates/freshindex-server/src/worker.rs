//! The worker of a `serve` process over a shared state store: a thread that helps the runs in
//! progress of every process sharing the store ([`Engine::help_runs`]), and waits a little
//! when there is nothing to do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use freshindex_engine::{Engine, RunOptions};

/// Pause between two passes that found nothing to do.
const IDLE: Duration = Duration::from_millis(250);

/// Starts the worker thread; it stops when `stop` is set.
pub(crate) fn start(
    engine: Arc<Engine>,
    lease: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("freshindex-worker".into())
        .spawn(move || {
            let mut pause = IDLE;
            while !stop.load(Ordering::Relaxed) {
                let opts = RunOptions {
                    lease_ms: lease.as_millis().clamp(1, i64::MAX as u128) as i64,
                    ..RunOptions::default()
                };
                match engine.help_runs(&opts, &stop) {
                    Ok(r) if !r.failed.is_empty() && r.flows.is_empty() => {
                        // Every flow with work failed: wait longer before trying again.
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Ok(r) if !r.flows.is_empty() => {
                        tracing::info!(flows = ?r.flows, items = r.items, "worked for runs in progress");
                        pause = IDLE;
                        continue;
                    }
                    Ok(_) => pause = IDLE,
                    Err(e) => {
                        // The store reconnects by itself; a failing flow is retried later.
                        tracing::warn!("worker: {e}");
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
                std::thread::sleep(pause);
            }
        })
        .map(|_| ())
}
