//! The queue's poll + index loop, shared by the queue and distributed benchmarks.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use freshindex_core::ItemStatus;
use freshindex_store::{BatchCommit, FlowId, ItemChange, ItemRecord, PollRequest, StateStore};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `workers` threads poll batches of `batch` and index them until the queue is empty.
pub fn poll_index_all(
    store: &Arc<dyn StateStore>,
    flow: FlowId,
    workers: usize,
    batch: usize,
) -> Result<(f64, usize)> {
    let t = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || -> Result<usize> {
                let owner = format!("w{w}");
                let mut done = 0;
                loop {
                    let req = PollRequest {
                        queue: None,
                        limit: batch,
                        statuses: Vec::new(),
                        owner: owner.clone(),
                        lease_ms: 60_000,
                    };
                    let got = store.poll(flow, &req, now_ms())?;
                    if got.is_empty() {
                        return Ok(done);
                    }
                    let items = got
                        .into_iter()
                        .map(|e| {
                            let mut r = ItemRecord::new(&e.item.key, ItemStatus::Accepted);
                            r.content_hash = e.item.content_hash;
                            ItemChange::Upsert {
                                record: r,
                                rows: Some(Vec::new()),
                            }
                        })
                        .collect::<Vec<_>>();
                    done += items.len();
                    store.commit(
                        flow,
                        BatchCommit {
                            items,
                            now_ms: now_ms(),
                            inputs: Default::default(),
                            ..BatchCommit::default()
                        },
                    )?;
                }
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok((t.elapsed().as_secs_f64(), total))
}
