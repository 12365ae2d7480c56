//! In-memory counters of this process and the Prometheus text rendering of `/metrics`.
//!
//! Counters are atomics bumped by the handlers; queue depth and leases are read from the
//! state store at scrape time (they are shared with other processes of the data directory).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use freshindex_store::QueueStats;

/// The API verbs counted per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `items:push` and `items/{key}:push`.
    Push,
    /// `items:poll`.
    Poll,
    /// `items/{key}:index`.
    Index,
    /// `items:unreserve`.
    Unreserve,
    /// `DELETE items/{key}`.
    Delete,
    /// `deleteQueueItems`.
    DeleteQueueItems,
    /// `GET items`.
    List,
    /// `GET items/{key}`.
    Get,
    /// `search`.
    Search,
}

impl Verb {
    /// Every verb.
    pub const ALL: [Verb; 9] = [
        Verb::Push,
        Verb::Poll,
        Verb::Index,
        Verb::Unreserve,
        Verb::Delete,
        Verb::DeleteQueueItems,
        Verb::List,
        Verb::Get,
        Verb::Search,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Push => "push",
            Verb::Poll => "poll",
            Verb::Index => "index",
            Verb::Unreserve => "unreserve",
            Verb::Delete => "delete",
            Verb::DeleteQueueItems => "delete_queue_items",
            Verb::List => "list",
            Verb::Get => "get",
            Verb::Search => "search",
        }
    }

    fn index(self) -> usize {
        match self {
            Verb::Push => 0,
            Verb::Poll => 1,
            Verb::Index => 2,
            Verb::Unreserve => 3,
            Verb::Delete => 4,
            Verb::DeleteQueueItems => 5,
            Verb::List => 6,
            Verb::Get => 7,
            Verb::Search => 8,
        }
    }
}

/// Counters since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 9],
    errors: [AtomicU64; 9],
    /// Items accepted by pushes.
    pub items_pushed: AtomicU64,
    /// Entries handed out by polls.
    pub items_polled: AtomicU64,
    /// Rows written by index calls.
    pub rows_written: AtomicU64,
    /// Rows deleted by index calls (delete and deleteQueueItems report no row counts).
    pub rows_deleted: AtomicU64,
    /// Embeddings computed by index calls.
    pub embeddings_computed: AtomicU64,
    /// Embeddings index calls took from the memo cache.
    pub embeddings_reused: AtomicU64,
    /// Runs (scheduled, on demand, live traversals and batches) that completed within their
    /// failed-items limit.
    pub runs_succeeded: AtomicU64,
    /// Runs that completed with more failed items than their flow allows.
    pub runs_failed: AtomicU64,
    /// Scheduled occurrences skipped because the flow's previous run was still going.
    pub runs_skipped: AtomicU64,
}

impl Metrics {
    /// Counts a request and whether it failed.
    pub fn request(&self, verb: Verb, ok: bool) {
        self.requests[verb.index()].fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors[verb.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a run that completed, with its rows and embeddings.
    pub fn count_run(&self, summary: &freshindex_engine::RunSummary) {
        let ok = summary.status == freshindex_engine::RunStatus::Success;
        Metrics::add(
            if ok {
                &self.runs_succeeded
            } else {
                &self.runs_failed
            },
            1,
        );
        Metrics::add(
            &self.rows_written,
            summary.rows.added + summary.rows.updated,
        );
        Metrics::add(&self.rows_deleted, summary.rows.deleted);
        Metrics::add(&self.embeddings_computed, summary.embeddings.computed);
        Metrics::add(&self.embeddings_reused, summary.embeddings.reused);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition: these counters and the given per-flow queue stats.
    pub fn render(&self, flows: &[(String, QueueStats)]) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        header(
            &mut out,
            "freshindex_queue_items",
            "gauge",
            "Queue entries by flow and status.",
        );
        for (flow, stats) in flows {
            for (status, n) in &stats.by_status {
                let _ = writeln!(
                    out,
                    "freshindex_queue_items{{flow=\"{}\",status=\"{}\"}} {n}",
                    escape(flow),
                    status.as_str()
                );
            }
        }
        for (name, help, pick) in [
            (
                "freshindex_queue_leases_held",
                "Queue entries under a live lease.",
                (|s: &QueueStats| s.leased) as fn(&QueueStats) -> u64,
            ),
            (
                "freshindex_queue_leases_expired",
                "Queue entries whose lease expired without an index.",
                |s: &QueueStats| s.expired,
            ),
            (
                "freshindex_queue_items_backing_off",
                "Queue entries waiting out a retry backoff.",
                |s: &QueueStats| s.backing_off,
            ),
        ] {
            header(&mut out, name, "gauge", help);
            for (flow, stats) in flows {
                let _ = writeln!(out, "{name}{{flow=\"{}\"}} {}", escape(flow), pick(stats));
            }
        }
        header(
            &mut out,
            "freshindex_api_requests_total",
            "counter",
            "API requests by verb.",
        );
        for v in Verb::ALL {
            let _ = writeln!(
                out,
                "freshindex_api_requests_total{{verb=\"{}\"}} {}",
                v.as_str(),
                get(&self.requests[v.index()])
            );
        }
        header(
            &mut out,
            "freshindex_api_request_errors_total",
            "counter",
            "API requests answered with an error, by verb.",
        );
        for v in Verb::ALL {
            let _ = writeln!(
                out,
                "freshindex_api_request_errors_total{{verb=\"{}\"}} {}",
                v.as_str(),
                get(&self.errors[v.index()])
            );
        }
        for (name, help, counter) in [
            (
                "freshindex_items_pushed_total",
                "Items accepted by pushes.",
                &self.items_pushed,
            ),
            (
                "freshindex_items_polled_total",
                "Entries handed out (leased) by polls.",
                &self.items_polled,
            ),
            (
                "freshindex_rows_written_total",
                "Target rows written by index calls and runs.",
                &self.rows_written,
            ),
            (
                "freshindex_rows_deleted_total",
                "Target rows deleted by index calls (an item whose new content has fewer chunks) and runs.",
                &self.rows_deleted,
            ),
            (
                "freshindex_embeddings_computed_total",
                "Embeddings computed by index calls and runs.",
                &self.embeddings_computed,
            ),
            (
                "freshindex_embeddings_reused_total",
                "Embeddings index calls and runs took from the memo cache.",
                &self.embeddings_reused,
            ),
            (
                "freshindex_runs_succeeded_total",
                "Runs (scheduled, on demand, live) completed within their failed-items limit.",
                &self.runs_succeeded,
            ),
            (
                "freshindex_runs_failed_total",
                "Runs completed with more failed items than their flow allows.",
                &self.runs_failed,
            ),
            (
                "freshindex_runs_skipped_total",
                "Scheduled occurrences skipped because the flow's previous run was still going.",
                &self.runs_skipped,
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", get(counter));
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshindex_core::ItemStatus;

    #[test]
    fn renders_counters_and_queue_depth() {
        let m = Metrics::default();
        m.request(Verb::Push, true);
        m.request(Verb::Push, false);
        Metrics::add(&m.embeddings_reused, 3);
        let stats = QueueStats {
            by_status: vec![(ItemStatus::NewItem, 2), (ItemStatus::Accepted, 5)],
            leased: 1,
            expired: 0,
            backing_off: 0,
        };
        let text = m.render(&[("we\"ird".into(), stats)]);
        for line in [
            "freshindex_api_requests_total{verb=\"push\"} 2",
            "freshindex_api_request_errors_total{verb=\"push\"} 1",
            "freshindex_queue_items{flow=\"we\\\"ird\",status=\"ACCEPTED\"} 5",
            "freshindex_queue_leases_held{flow=\"we\\\"ird\"} 1",
            "freshindex_embeddings_reused_total 3",
            "# TYPE freshindex_queue_items gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
