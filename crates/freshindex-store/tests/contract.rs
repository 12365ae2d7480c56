//! The contract every state-store backend keeps. Each check takes a fresh store; the backend
//! list at the bottom runs them all (a PostgreSQL backend adds itself there).

use freshindex_core::PushType;
use freshindex_store::{
    BatchCommit, DocWrite, FenceCheck, FenceError, Fingerprint, FlowStore, ItemChange, ItemRecord,
    ItemStatus, ItemStore, ListRequest, PgStore, PollRequest, PushItem, PushKind, PushRejection,
    RUNS_KEPT, RunEnd, RunId, RunRecord, RunState, RunStore, SqliteStore, StateStore, StoreError,
    StoredDoc, TrackedRow, Trigger,
};

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

/// The commit time of every batch below.
const NOW_MS: i64 = 1_700_000_000_000;

fn record(key: &str, status: ItemStatus, hash: u8) -> ItemRecord {
    let mut r = ItemRecord::new(key, status);
    r.content_hash = Some(format!("hash-{hash}"));
    r.metadata_hash = Some("meta".into());
    r
}

fn batch(items: Vec<ItemChange>) -> BatchCommit {
    BatchCommit {
        items,
        memo: vec![],
        gc_candidates: vec![],
        now_ms: NOW_MS,
        inputs: Default::default(),
    }
}

fn delete(key: &str) -> ItemChange {
    ItemChange::Delete {
        key: key.into(),
        if_queue: None,
        version: None,
    }
}

fn row(key: &str, memo: u8) -> TrackedRow {
    TrackedRow {
        row_key: key.into(),
        row_fp: fp(memo.wrapping_add(100)),
        memo_key: Some(fp(memo)),
    }
}

fn flows_and_items(s: &dyn StateStore) {
    let a = s.register_flow("a", "{}").expect("register");
    let a2 = s.register_flow("a", "{\"v\":2}").expect("re-register");
    assert_eq!(a, a2, "re-registering keeps the id");
    let b = s.register_flow("b", "{}").expect("register b");
    assert_ne!(a, b);
    assert_eq!(
        s.flow("a").expect("flow").map(|f| f.spec_json),
        Some("{\"v\":2}".to_string())
    );
    assert_eq!(s.flows().expect("flows").len(), 2);
    assert!(s.flow("zz").expect("missing").is_none());

    s.commit(
        a,
        BatchCommit {
            items: vec![
                ItemChange::Upsert {
                    record: record("x", ItemStatus::Accepted, 1),
                    rows: Some(vec![row("r1", 1)]),
                },
                ItemChange::Upsert {
                    record: record("y", ItemStatus::Error, 2),
                    rows: None,
                },
            ],
            memo: vec![],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("commit");
    let items = s.items(a).expect("items");
    assert_eq!(items.len(), 2);
    // A new entry takes the record's state and enters the queue at the commit time.
    let mut want = record("x", ItemStatus::Accepted, 1);
    want.enqueued_at_ms = NOW_MS;
    want.available_at_ms = NOW_MS;
    assert_eq!(items[0], want);
    assert_eq!(items[1].status, ItemStatus::Error);
    assert!(
        s.items(b).expect("items of b").is_empty(),
        "flows are isolated"
    );
    let counts = s.item_counts(a).expect("counts");
    assert!(counts.contains(&(ItemStatus::Accepted, 1)));
    assert!(counts.contains(&(ItemStatus::Error, 1)));
}

fn two_phase(s: &dyn StateStore) {
    let f = s.register_flow("f", "{}").expect("register");
    s.commit(
        f,
        BatchCommit {
            items: vec![ItemChange::Upsert {
                record: record("doc", ItemStatus::Accepted, 1),
                rows: Some(vec![row("r1", 1), row("r2", 2)]),
            }],
            memo: vec![],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("commit");
    // Phase one of a second write, then a "crash": pending survives, lineage is unchanged.
    s.record_pending(
        f,
        &[
            ("doc".into(), vec!["r3".into()]),
            ("new".into(), vec!["n1".into()]),
        ],
    )
    .expect("pending");
    let items = s.items(f).expect("items");
    let doc = items.iter().find(|i| i.key == "doc").expect("doc");
    assert!(doc.has_pending);
    // An item that only ever got pending keys shows up, so that the next run cleans it.
    let new = items
        .iter()
        .find(|i| i.key == "new")
        .expect("pending-only item");
    assert!(new.has_pending && !new.status.is_settled());
    let lin = s.lineage(f, &["doc", "new", "none"]).expect("lineage");
    assert_eq!(lin["doc"].tracked.len(), 2);
    assert_eq!(lin["doc"].pending, vec!["r3".to_string()]);
    assert_eq!(lin["new"].pending, vec!["n1".to_string()]);
    assert!(lin["none"].tracked.is_empty() && lin["none"].pending.is_empty());
    // The commit replaces the lineage and clears pending keys.
    s.commit(
        f,
        BatchCommit {
            items: vec![
                ItemChange::Upsert {
                    record: record("doc", ItemStatus::Accepted, 2),
                    rows: Some(vec![row("r1", 1), row("r3", 3)]),
                },
                delete("new"),
            ],
            memo: vec![],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("commit 2");
    let lin = s.lineage(f, &["doc", "new"]).expect("lineage");
    let keys: Vec<&str> = lin["doc"]
        .tracked
        .iter()
        .map(|r| r.row_key.as_str())
        .collect();
    assert_eq!(keys, ["r1", "r3"]);
    assert!(lin["doc"].pending.is_empty() && lin["new"].pending.is_empty());
    assert_eq!(s.items(f).expect("items").len(), 1);
    assert_eq!(s.tracked_count(f).expect("count"), 2);
    // rows: None keeps the lineage, pending keys included.
    s.record_pending(f, &[("doc".into(), vec!["r9".into()])])
        .expect("pending");
    s.commit(
        f,
        BatchCommit {
            items: vec![ItemChange::Upsert {
                record: record("doc", ItemStatus::Error, 2),
                rows: None,
            }],
            memo: vec![],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("commit 3");
    assert_eq!(s.tracked_count(f).expect("count"), 2);
    assert_eq!(
        s.lineage(f, &["doc"]).expect("lineage")["doc"].pending,
        ["r9"]
    );
}

fn memo_gc(s: &dyn StateStore) {
    let f = s.register_flow("m", "{}").expect("register");
    let g = s.register_flow("other", "{}").expect("register");
    s.commit(
        f,
        BatchCommit {
            items: vec![
                ItemChange::Upsert {
                    record: record("a", ItemStatus::Accepted, 1),
                    rows: Some(vec![row("a1", 1), row("a2", 2)]),
                },
                ItemChange::Upsert {
                    record: record("b", ItemStatus::Accepted, 1),
                    rows: Some(vec![row("b1", 2)]),
                },
            ],
            memo: vec![(fp(1), vec![1; 8]), (fp(2), vec![2; 8])],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("commit");
    s.commit(
        g,
        BatchCommit {
            items: vec![],
            memo: vec![(fp(1), vec![9; 4])],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("other flow");
    assert_eq!(s.memo_stats(f).expect("stats"), (2, 16));
    let got = s.memo_get(f, &[fp(1), fp(2), fp(3)]).expect("get");
    assert_eq!(got.len(), 2);
    assert_eq!(got[&fp(1)], vec![1; 8]);
    // Deleting `a` leaves memo 1 unused and memo 2 still used by `b`.
    s.commit(
        f,
        BatchCommit {
            items: vec![delete("a")],
            memo: vec![],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("delete a");
    // Entries stay until the end-of-run GC (a rename later in the run may still use them).
    assert_eq!(s.memo_stats(f).expect("stats").0, 2);
    assert_eq!(s.memo_gc(f).expect("gc"), 1);
    assert_eq!(s.memo_stats(f).expect("stats after gc"), (1, 8));
    assert_eq!(s.memo_stats(g).expect("other flow's stats"), (1, 4));
    let got = s.memo_get(f, &[fp(1), fp(2)]).expect("get");
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![fp(2)]);
    assert_eq!(s.memo_gc(f).expect("gc again"), 0);
    // An entry committed as a candidate (its item failed after all) goes at the next GC.
    s.commit(
        f,
        BatchCommit {
            items: vec![],
            memo: vec![(fp(7), vec![7; 8])],
            gc_candidates: vec![fp(7)],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("orphan entry");
    assert_eq!(s.memo_gc(f).expect("gc orphan"), 1);
    assert!(s.memo_get(f, &[fp(7)]).expect("get").is_empty());
    // Another flow's cache is its own.
    assert_eq!(
        s.memo_get(g, &[fp(1)]).expect("get other")[&fp(1)],
        vec![9; 4]
    );
}

fn end(status: RunState, summary: Option<&str>, message: Option<&str>, at: i64) -> RunEnd {
    RunEnd {
        status,
        summary_json: summary.map(str::to_string),
        message: message.map(str::to_string),
        finished_at_ms: at,
    }
}

/// The execution history: begin and finish, events, newest first, flows apart.
fn runs(s: &dyn StateStore) {
    let f = s.register_flow("r", "{}").expect("register");
    let g = s.register_flow("g", "{}").expect("register g");
    assert!(s.last_run(f).expect("none").is_none());
    assert!(s.runs(f, 10).expect("no runs").is_empty());

    let r1 = s.begin_run(f, Trigger::Manual, NOW_MS).expect("begin");
    assert_eq!(
        s.runs(f, 10).expect("runs"),
        [RunRecord {
            id: r1,
            flow: f,
            trigger: Trigger::Manual,
            status: RunState::InProgress,
            started_at_ms: NOW_MS,
            finished_at_ms: None,
            summary_json: None,
            message: None,
        }]
    );
    assert!(
        s.last_run(f).expect("last").is_none(),
        "a run in progress has no summary yet"
    );
    let done = end(RunState::Success, Some("{\"n\":1}"), None, NOW_MS + 5);
    assert!(s.finish_run(r1, &done).expect("finish"));
    let got = &s.runs(f, 10).expect("runs")[0];
    assert_eq!(
        (got.status, got.finished_at_ms, got.summary_json.as_deref()),
        (RunState::Success, Some(NOW_MS + 5), Some("{\"n\":1}"))
    );
    assert_eq!(s.last_run(f).expect("last").as_deref(), Some("{\"n\":1}"));

    // A run that could not run: a message, no summary; the last summary stays the last one.
    let r2 = s
        .begin_run(f, Trigger::Scheduled, NOW_MS + 10)
        .expect("begin 2");
    let failed = end(
        RunState::TransientFailure,
        None,
        Some("disk full"),
        NOW_MS + 11,
    );
    assert!(s.finish_run(r2, &failed).expect("finish 2"));
    assert_eq!(s.last_run(f).expect("last").as_deref(), Some("{\"n\":1}"));
    // Only final statuses end a run; an unknown run is reported.
    assert!(matches!(
        s.finish_run(r2, &end(RunState::InProgress, None, None, NOW_MS)),
        Err(StoreError::Invalid(_))
    ));
    assert!(
        !s.finish_run(RunId(r2.0 + 1000), &failed)
            .expect("finish unknown")
    );

    // Events are final when recorded.
    let e = s
        .record_run_event(
            f,
            Trigger::Scheduled,
            RunState::Skipped,
            NOW_MS + 20,
            Some("the previous run is still going"),
        )
        .expect("event");
    assert!(matches!(
        s.record_run_event(f, Trigger::Manual, RunState::InProgress, NOW_MS, None),
        Err(StoreError::Invalid(_))
    ));
    let all = s.runs(f, 10).expect("runs");
    assert_eq!(
        all.iter().map(|r| r.id).collect::<Vec<_>>(),
        [e, r2, r1],
        "newest first"
    );
    assert_eq!(
        (
            all[0].trigger,
            all[0].status,
            all[0].started_at_ms,
            all[0].finished_at_ms,
            all[0].message.as_deref()
        ),
        (
            Trigger::Scheduled,
            RunState::Skipped,
            NOW_MS + 20,
            Some(NOW_MS + 20),
            Some("the previous run is still going")
        )
    );
    assert_eq!(
        (
            all[1].status,
            all[1].message.as_deref(),
            all[1].summary_json.as_deref()
        ),
        (RunState::TransientFailure, Some("disk full"), None)
    );
    assert_eq!(
        s.runs(f, 2)
            .expect("limit")
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [e, r2]
    );
    assert!(s.runs(g, 10).expect("g").is_empty(), "flows are apart");
    assert!(s.last_run(g).expect("g last").is_none());
}

/// The newest [`RUNS_KEPT`] entries are kept, and an entry in progress is never deleted.
fn runs_pruning(s: &dyn StateStore) {
    let f = s.register_flow("p", "{}").expect("register");
    let stuck = s.begin_run(f, Trigger::Manual, NOW_MS).expect("begin");
    let n = i64::from(RUNS_KEPT) + 10;
    for i in 0..n {
        let r = s
            .begin_run(f, Trigger::Manual, NOW_MS + i + 1)
            .expect("begin");
        let summary = format!("{{\"n\":{i}}}");
        let done = end(RunState::Success, Some(&summary), None, NOW_MS + i + 1);
        s.finish_run(r, &done).expect("finish");
    }
    // Events count as entries too.
    s.record_run_event(f, Trigger::Reset, RunState::Reset, NOW_MS + n + 1, None)
        .expect("event");
    let all = s.runs(f, 1000).expect("runs");
    assert_eq!(all.len(), RUNS_KEPT as usize + 1);
    assert_eq!(all[0].status, RunState::Reset);
    assert_eq!(
        all[1].summary_json.as_deref(),
        Some(format!("{{\"n\":{}}}", n - 1).as_str())
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let last = all.last().expect("oldest");
    assert_eq!((last.id, last.status), (stuck, RunState::InProgress));
    assert_eq!(
        s.last_run(f).expect("last"),
        Some(format!("{{\"n\":{}}}", n - 1))
    );
    // Once it ends, the old entry goes too.
    let over = end(
        RunState::TransientFailure,
        None,
        Some("late"),
        NOW_MS + n + 2,
    );
    assert!(s.finish_run(stuck, &over).expect("finish stuck"));
    let all = s.runs(f, 1000).expect("runs");
    assert_eq!(all.len(), RUNS_KEPT as usize);
    assert!(all.iter().all(|r| r.id != stuck));
}

/// Entries a dead process left in progress are marked interrupted, per flow or all.
fn runs_interrupted(s: &dyn StateStore) {
    let f = s.register_flow("i", "{}").expect("register");
    let g = s.register_flow("j", "{}").expect("register g");
    let a = s.begin_run(f, Trigger::Manual, NOW_MS).expect("a");
    let b = s.begin_run(g, Trigger::Live, NOW_MS).expect("b");
    let done = s.begin_run(f, Trigger::Manual, NOW_MS + 1).expect("done");
    s.finish_run(done, &end(RunState::Success, Some("{}"), None, NOW_MS + 2))
        .expect("finish");
    assert_eq!(
        s.interrupt_runs(Some(f), NOW_MS + 100, "interrupted")
            .expect("interrupt f"),
        1
    );
    let by_id = |flow, id| {
        s.runs(flow, 10)
            .expect("runs")
            .into_iter()
            .find(|r: &RunRecord| r.id == id)
            .expect("entry")
    };
    let ra = by_id(f, a);
    assert_eq!(
        (ra.status, ra.finished_at_ms, ra.message.as_deref()),
        (
            RunState::TransientFailure,
            Some(NOW_MS + 100),
            Some("interrupted")
        )
    );
    assert_eq!(
        by_id(f, done).status,
        RunState::Success,
        "finished runs stay"
    );
    assert_eq!(by_id(g, b).status, RunState::InProgress, "other flows stay");
    assert_eq!(
        s.interrupt_runs(Some(f), NOW_MS + 100, "again")
            .expect("again"),
        0
    );
    assert_eq!(s.interrupt_runs(None, NOW_MS + 200, "all").expect("all"), 1);
    assert_eq!(by_id(g, b).status, RunState::TransientFailure);
    // An interruption never ends a run before it started (clocks of two processes).
    let c = s
        .begin_run(f, Trigger::Scheduled, NOW_MS + 1000)
        .expect("c");
    s.interrupt_runs(Some(f), NOW_MS + 500, "early")
        .expect("interrupt c");
    assert_eq!(by_id(f, c).finished_at_ms, Some(NOW_MS + 1000));
}

/// What resets need: re-queueing chosen items, and forgetting a flow's leftovers.
fn reset_support(s: &dyn StateStore) {
    let f = s.register_flow("z", "{}").expect("register");
    let mut x = record("x", ItemStatus::Accepted, 1);
    x.version = Some(vec![4]);
    x.queue = "A".into();
    let mut sk = record("s", ItemStatus::Skipped, 2);
    sk.queue = "A".into();
    s.commit(
        f,
        BatchCommit {
            items: vec![
                ItemChange::Upsert {
                    record: x,
                    rows: Some(vec![row("x1", 1)]),
                },
                ItemChange::Upsert {
                    record: sk,
                    rows: Some(vec![]),
                },
            ],
            memo: vec![(fp(1), vec![1, 2, 3, 4])],
            gc_candidates: vec![],
            now_ms: NOW_MS,
            inputs: Default::default(),
        },
    )
    .expect("commit");
    s.push(f, &[push("n", hashes("n1"), "A")], NOW_MS)
        .expect("push n");
    s.push(f, &[push("w", hashes("w1"), "A")], NOW_MS)
        .expect("push w");
    let leased = s.poll(f, &poll("p", 10), NOW_MS).expect("poll");
    assert_eq!(leased.len(), 2, "n and w are leased");

    let t = NOW_MS + 10;
    let unknown = s
        .requeue_items(
            f,
            &["x".into(), "ghost".into(), "s".into(), "n".into()],
            None,
            t,
        )
        .expect("requeue");
    assert_eq!(unknown, ["ghost"]);
    let x = s.get(f, "x").expect("get x").expect("x").item;
    assert_eq!(
        (
            x.status,
            x.content_hash.as_deref(),
            x.version.as_deref(),
            x.metadata_hash.as_deref(),
            x.queue.as_str(),
            x.enqueued_at_ms
        ),
        (ItemStatus::Modified, None, None, Some("meta"), "A", t),
        "processed again from scratch, its label and metadata kept"
    );
    assert_eq!(
        s.lineage(f, &["x"]).expect("lineage")["x"].tracked,
        [row("x1", 1)],
        "rows stay"
    );
    assert_eq!(
        s.get(f, "s").expect("get s").expect("s").item.status,
        ItemStatus::Modified
    );
    // A new item stays new; under a live lease it is marked re-pushed, so the holder's index
    // of what it read before the reset does not settle it.
    let n = s.get(f, "n").expect("get n").expect("n").item;
    assert_eq!((n.status, n.repushed), (ItemStatus::NewItem, true));
    assert!(!s.get(f, "w").expect("get w").expect("w").item.repushed);
    let mut indexed = record("n", ItemStatus::Accepted, 1);
    indexed.content_hash = Some("n1".into());
    s.commit(
        f,
        BatchCommit {
            items: vec![ItemChange::Upsert {
                record: indexed,
                rows: Some(vec![]),
            }],
            now_ms: t + 1,
            inputs: Default::default(),
            ..BatchCommit::default()
        },
    )
    .expect("index n");
    assert_eq!(
        s.get(f, "n").expect("get n").expect("n").item.status,
        ItemStatus::Modified
    );
    // The requeued entries are polled (modified first, the longest waiting first), then the
    // new entry whose lease ran out.
    let polled = s.poll(f, &poll("q", 10), t + 40_000).expect("poll again");
    let keys: Vec<&str> = polled.iter().map(|e| e.item.key.as_str()).collect();
    assert_eq!(keys, ["s", "x", "n", "w"]);

    // A reset forgets tombstones and the traversal label; the cache only when asked.
    s.commit(f, batch(vec![delete("x")])).expect("delete x");
    let mut v = record("v", ItemStatus::Accepted, 1);
    v.version = Some(vec![9]);
    s.commit(
        f,
        batch(vec![ItemChange::Upsert {
            record: v,
            rows: Some(vec![]),
        }]),
    )
    .expect("index v");
    s.commit(f, batch(vec![delete("v")])).expect("delete v");
    s.set_traversal_label(f, "A").expect("label");
    let stale = s
        .fence(f, &[fence_check("v", Some(&[3]), None)], t)
        .expect("fence");
    assert_eq!(stale, [Err(FenceError::StaleVersion { key: "v".into() })]);
    assert_eq!(s.change_mark(f).expect("mark"), None);
    s.set_change_mark(f, Some("2026-01-01T00:00:00Z#17"))
        .expect("set mark");
    assert_eq!(
        s.change_mark(f).expect("mark").as_deref(),
        Some("2026-01-01T00:00:00Z#17")
    );
    s.reset_flow(f, false).expect("reset keeping the cache");
    assert_eq!(s.traversal_label(f).expect("label"), None);
    assert_eq!(
        s.change_mark(f).expect("mark"),
        None,
        "a reset forgets the mark"
    );
    assert_eq!(
        s.fence(f, &[fence_check("v", Some(&[3]), None)], t)
            .expect("fence"),
        [Ok(())],
        "tombstones are forgotten"
    );
    assert_eq!(s.memo_stats(f).expect("memo"), (1, 4));
    s.reset_flow(f, true).expect("reset dropping the cache");
    assert_eq!(s.memo_stats(f).expect("memo"), (0, 0));
    assert!(s.memo_get(f, &[fp(1)]).expect("memo get").is_empty());
    assert_eq!(s.memo_gc(f).expect("gc"), 0);

    // Deleting a flow forgets all of it and leaves other flows alone; the name is free again.
    let other = s.register_flow("other", "{}").expect("register other");
    s.push(other, &[push("o", hashes("1"), "q")], t)
        .expect("push to other");
    s.commit(
        other,
        BatchCommit {
            memo: vec![(fp(7), vec![1, 2])],
            now_ms: t,
            inputs: Default::default(),
            ..BatchCommit::default()
        },
    )
    .expect("memo of other");
    s.commit(
        f,
        BatchCommit {
            memo: vec![(fp(8), vec![3])],
            now_ms: t,
            inputs: Default::default(),
            ..BatchCommit::default()
        },
    )
    .expect("memo of z");
    let run = s.begin_run(f, Trigger::Manual, t).expect("run");
    assert!(s.delete_flow(f).expect("delete flow"));
    assert!(!s.delete_flow(f).expect("delete again"), "gone already");
    assert!(s.flow("z").expect("flow").is_none());
    assert!(s.items(f).expect("items").is_empty());
    assert!(
        s.lineage(f, &["s", "n"])
            .expect("lineage")
            .values()
            .all(|l| l.tracked.is_empty() && l.pending.is_empty())
    );
    assert_eq!(s.memo_stats(f).expect("memo"), (0, 0));
    assert!(
        s.runs(f, 10).expect("runs").is_empty(),
        "history of run {} forgotten",
        run.0
    );
    assert_eq!(s.items(other).expect("other items").len(), 1);
    assert_eq!(s.memo_stats(other).expect("other memo").0, 1);
    let again = s.register_flow("z", "{}").expect("register the name again");
    assert!(s.items(again).expect("items").is_empty());
    assert_ne!(again, f, "a new flow gets a new id");
    // Not even the newest id is reused after its flow is deleted.
    let last = s.register_flow("last", "{}").expect("register last");
    assert!(s.delete_flow(last).expect("delete last"));
    let next = s.register_flow("next", "{}").expect("register next");
    assert!(next.0 > last.0, "{next:?} after {last:?}");
}

fn push(key: &str, kind: PushKind, queue: &str) -> PushItem {
    PushItem {
        key: key.into(),
        kind,
        payload: Some(key.as_bytes().to_vec()),
        queue: Some(queue.into()),
    }
}

fn hashes(content: &str) -> PushKind {
    PushKind::Hashes {
        content: Some(content.into()),
        metadata: None,
    }
}

fn poll(owner: &str, limit: usize) -> PollRequest {
    PollRequest {
        queue: None,
        limit,
        statuses: vec![],
        owner: owner.into(),
        lease_ms: 30_000,
    }
}

fn fence_check(key: &str, version: Option<&[u8]>, owner: Option<&str>) -> FenceCheck {
    FenceCheck {
        key: key.into(),
        version: version.map(<[u8]>::to_vec),
        owner: owner.map(str::to_string),
    }
}

/// A deleted versioned item leaves a tombstone: only a newer version brings it back.
fn tombstones(s: &dyn StateStore) {
    let f = s.register_flow("t", "{}").expect("register");
    let mut r = record("x", ItemStatus::Accepted, 1);
    r.version = Some(vec![2]);
    s.commit(
        f,
        batch(vec![ItemChange::Upsert {
            record: r,
            rows: Some(vec![]),
        }]),
    )
    .expect("index v2");
    // Deleted at version 5 (newer than the indexed 2).
    s.commit(
        f,
        batch(vec![ItemChange::Delete {
            key: "x".into(),
            if_queue: None,
            version: Some(vec![5]),
        }]),
    )
    .expect("delete v5");
    assert!(s.get(f, "x").expect("get").is_none());
    let fenced = s
        .fence(
            f,
            &[
                fence_check("x", Some(&[3]), None),
                fence_check("x", Some(&[5]), None),
                fence_check("x", Some(&[6]), None),
                fence_check("x", None, None),
            ],
            NOW_MS,
        )
        .expect("fence");
    assert_eq!(
        fenced,
        [
            Err(FenceError::StaleVersion { key: "x".into() }),
            Err(FenceError::StaleVersion { key: "x".into() }),
            Ok(()),
            Ok(()),
        ]
    );
    // An unversioned delete of an indexed item keeps its indexed version as the tombstone.
    let mut r = record("y", ItemStatus::Accepted, 1);
    r.version = Some(vec![7]);
    s.commit(
        f,
        batch(vec![ItemChange::Upsert {
            record: r,
            rows: Some(vec![]),
        }]),
    )
    .expect("index y");
    s.commit(f, batch(vec![delete("y")])).expect("delete y");
    assert_eq!(
        s.fence(f, &[fence_check("y", Some(&[7]), None)], NOW_MS)
            .expect("fence y"),
        [Err(FenceError::StaleVersion { key: "y".into() })]
    );
}

/// The indexing queue in one walk: push, poll and leases, fence, index, labels, deletes. (The
/// model-based test in `queue_model.rs` checks the rules in depth.)
fn queue(s: &dyn StateStore) {
    let f = s.register_flow("q", "{}").expect("register");
    let t = NOW_MS;
    let pushed = s
        .push(
            f,
            &[
                push("b", hashes("h1"), "A"),
                push("a", hashes("h1"), "A"),
                push("zz", PushKind::Type(PushType::NotModified), "A"),
            ],
            t,
        )
        .expect("push");
    assert_eq!(
        pushed,
        [
            Ok(ItemStatus::NewItem),
            Ok(ItemStatus::NewItem),
            Err(PushRejection::UnknownItem("zz".into()))
        ]
    );
    // Same status and enqueue time: key order. A second poller does not get the leased entry.
    let got = s.poll(f, &poll("w1", 1), t).expect("poll");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].item.key, "a");
    assert_eq!(got[0].payload.as_deref(), Some(&b"a"[..]));
    assert_eq!(got[0].item.lease_owner.as_deref(), Some("w1"));
    assert_eq!(got[0].item.leased_until_ms, Some(t + 30_000));
    assert_eq!(got[0].item.attempts, 1);
    let got = s.poll(f, &poll("w2", 5), t).expect("poll 2");
    assert_eq!(
        got.iter().map(|e| e.item.key.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert!(s.poll(f, &poll("w3", 5), t).expect("poll 3").is_empty());
    let stats = s.queue_stats(f, t).expect("stats");
    assert_eq!(stats.leased, 2);
    assert!(stats.by_status.contains(&(ItemStatus::NewItem, 2)));
    // Fencing: another holder's lease, then versions.
    assert_eq!(
        s.fence(f, &[fence_check("a", None, Some("w2"))], t)
            .expect("fence"),
        [Err(FenceError::LeaseLost {
            key: "a".into(),
            holder: "w1".into()
        })]
    );
    assert_eq!(
        s.heartbeat(f, "w1", t + 60_000, t + 1).expect("heartbeat"),
        1
    );
    assert_eq!(
        s.fence(f, &[fence_check("a", Some(&[1]), Some("w1"))], t + 1)
            .expect("fence"),
        [Ok(())]
    );
    let mut indexed = record("a", ItemStatus::Accepted, 1);
    indexed.content_hash = Some("h1".into());
    indexed.version = Some(vec![1]);
    s.commit(
        f,
        batch(vec![ItemChange::Upsert {
            record: indexed,
            rows: Some(vec![row("a1", 1)]),
        }]),
    )
    .expect("index a");
    let a = s.get(f, "a").expect("get").expect("a");
    assert_eq!(a.item.status, ItemStatus::Accepted);
    assert_eq!(a.item.leased_until_ms, None);
    assert_eq!(a.item.attempts, 0);
    assert_eq!(a.item.queue, "A", "an index keeps the label");
    assert_eq!(a.payload.as_deref(), Some(&b"a"[..]), "and the payload");
    assert_eq!(
        s.fence(f, &[fence_check("a", Some(&[1]), None)], t + 2)
            .expect("fence"),
        [Err(FenceError::StaleVersion { key: "a".into() })]
    );
    // Equal hashes keep it accepted; a new one makes it MODIFIED, relabelled.
    let pushed = s
        .push(f, &[push("a", hashes("h1"), "A")], t + 3)
        .expect("same");
    assert_eq!(pushed, [Ok(ItemStatus::Accepted)]);
    let pushed = s
        .push(f, &[push("a", hashes("h2"), "B")], t + 4)
        .expect("changed");
    assert_eq!(pushed, [Ok(ItemStatus::Modified)]);
    assert_eq!(s.queue_keys(f, "A").expect("keys"), ["b"]);
    assert_eq!(s.queue_keys(f, "B").expect("keys"), ["a"]);
    // Unreserve by label and owner; then REQUEUE needs a lease.
    assert_eq!(
        s.unreserve(f, Some("A"), Some("w1"), t + 5).expect("none"),
        0
    );
    assert_eq!(s.unreserve(f, Some("A"), Some("w2"), t + 5).expect("b"), 1);
    assert_eq!(
        s.push(
            f,
            &[push("b", PushKind::Type(PushType::Requeue), "A")],
            t + 5
        )
        .expect("requeue"),
        [Err(PushRejection::NotReserved("b".into()))]
    );
    // deleteQueueItems("A") decided on [b]; b is seen again (relabelled) before the commit:
    // it stays, MODIFIED. `a` (label B) is deleted unconditionally.
    s.push(f, &[push("b", hashes("h1"), "B")], t + 6)
        .expect("relabel");
    s.commit(
        f,
        batch(vec![
            ItemChange::Delete {
                key: "b".into(),
                if_queue: Some("A".into()),
                version: None,
            },
            delete("a"),
        ]),
    )
    .expect("delete");
    let left = s.list(
        f,
        &ListRequest {
            limit: 10,
            ..ListRequest::default()
        },
    );
    let left = left.expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].item.key, "b");
    assert_eq!(left[0].item.status, ItemStatus::Modified);
    assert_eq!(s.tracked_count(f).expect("rows"), 0);
    // The traversal label.
    assert_eq!(s.traversal_label(f).expect("label"), None);
    s.set_traversal_label(f, "B").expect("set label");
    assert_eq!(s.traversal_label(f).expect("label").as_deref(), Some("B"));
}

fn stored(key: &str, seq: i64, fp: u8, body: Option<&str>) -> StoredDoc {
    StoredDoc {
        key: key.into(),
        seq,
        fp: if body.is_some() { vec![fp; 4] } else { vec![] },
        doc: body.map(|b| b.as_bytes().to_vec()),
    }
}

fn doc(key: &str, fp: u8, body: &str) -> DocWrite {
    (key.into(), Some((vec![fp; 4], body.as_bytes().to_vec())))
}

fn gone(key: &str) -> DocWrite {
    (key.into(), None)
}

fn keys(ks: &[&str]) -> Vec<String> {
    ks.iter().map(|k| k.to_string()).collect()
}

fn docs_and_sequence(s: &dyn StateStore) {
    let up = s.register_flow("up", "{}").expect("register up");
    let other = s.register_flow("other", "{}").expect("register other");
    assert!(!s.docs_kept(up).expect("kept"));
    s.keep_docs(up, true).expect("keep");
    s.keep_docs(up, true).expect("keep again");
    assert!(s.docs_kept(up).expect("kept"));
    assert!(!s.docs_kept(other).expect("kept other"));
    s.put_docs(up, &[]).expect("empty write");
    assert!(s.docs_since(up, 0, 100).expect("since").is_empty());

    // New documents take the next numbers; a tombstone of an unknown key takes none.
    s.put_docs(up, &[doc("a", 1, "A1"), doc("b", 2, "B1"), gone("ghost")])
        .expect("put");
    assert_eq!(
        s.docs_since(up, 0, 100).expect("since"),
        vec![stored("a", 1, 1, Some("A1")), stored("b", 2, 2, Some("B1"))]
    );
    // The same fingerprint again changes nothing (not even the bytes).
    s.put_docs(up, &[doc("a", 1, "A1 again")]).expect("same fp");
    assert!(s.docs_since(up, 2, 100).expect("since").is_empty());
    assert_eq!(
        s.docs(up, &keys(&["a"])).expect("docs"),
        vec![stored("a", 1, 1, Some("A1"))]
    );
    // Another fingerprint does.
    s.put_docs(up, &[doc("a", 3, "A2")]).expect("new fp");
    assert_eq!(
        s.docs_since(up, 2, 100).expect("since"),
        vec![stored("a", 3, 3, Some("A2"))]
    );
    // A tombstone of a live document does; a second one, or one of an unknown key, does not.
    s.put_docs(up, &[gone("b")]).expect("tombstone");
    assert_eq!(
        s.docs_since(up, 3, 100).expect("since"),
        vec![stored("b", 4, 0, None)]
    );
    s.put_docs(up, &[gone("b"), gone("ghost2")])
        .expect("tombstones again");
    assert!(s.docs_since(up, 4, 100).expect("since").is_empty());
    // A document after a tombstone takes a number even with the old fingerprint.
    s.put_docs(up, &[doc("b", 2, "B2")]).expect("revive");
    assert_eq!(
        s.docs_since(up, 4, 100).expect("since"),
        vec![stored("b", 5, 2, Some("B2"))]
    );
    // A key written twice in one call keeps its last write (each change took a number).
    s.put_docs(up, &[doc("c", 7, "C"), gone("c")])
        .expect("twice");
    assert_eq!(
        s.docs_since(up, 5, 100).expect("since"),
        vec![stored("c", 7, 0, None)]
    );
    // `docs` answers live documents only, in the order asked.
    assert_eq!(
        s.docs(up, &keys(&["b", "c", "zz", "a", "ghost"]))
            .expect("docs"),
        vec![stored("b", 5, 2, Some("B2")), stored("a", 3, 3, Some("A2"))]
    );
    // `docs_since`: sequence order, tombstones included, at most `limit`.
    assert_eq!(
        s.docs_since(up, 0, 2).expect("since"),
        vec![stored("a", 3, 3, Some("A2")), stored("b", 5, 2, Some("B2"))]
    );
    assert_eq!(
        s.docs_since(up, 3, 10).expect("since"),
        vec![stored("b", 5, 2, Some("B2")), stored("c", 7, 0, None)]
    );
    assert!(s.docs_since(up, 7, 10).expect("since").is_empty());
    assert!(s.docs_since(up, 0, 0).expect("limit 0").is_empty());
    // Flows are isolated; numbers are per flow.
    assert!(s.docs_since(other, 0, 10).expect("since").is_empty());
    assert!(s.docs(other, &keys(&["a"])).expect("docs").is_empty());
    s.put_docs(other, &[doc("a", 1, "O")]).expect("put other");
    assert_eq!(
        s.docs_since(other, 0, 10).expect("since"),
        vec![stored("a", 1, 1, Some("O"))]
    );

    // Stopping forgets the documents and the readers' marks on the flow, nothing else.
    let reader = s.register_flow("reader", "{}").expect("register reader");
    s.set_input_mark(reader, up, 7).expect("mark on up");
    s.set_input_mark(reader, other, 1).expect("mark on other");
    s.set_input_mark(up, other, 1).expect("up's own mark");
    s.set_deps(reader, &[("r".into(), vec![(up, "a".into())])])
        .expect("deps");
    s.keep_docs(up, false).expect("stop keeping");
    assert!(!s.docs_kept(up).expect("kept"));
    assert!(s.docs_since(up, 0, 100).expect("since").is_empty());
    assert!(s.docs(up, &keys(&["a", "b"])).expect("docs").is_empty());
    assert_eq!(s.input_mark(reader, up).expect("mark"), None);
    assert_eq!(s.input_mark(reader, other).expect("mark"), Some(1));
    assert_eq!(s.input_mark(up, other).expect("mark"), Some(1));
    assert_eq!(
        s.dependents(reader, up, &keys(&["a"])).expect("dependents"),
        vec!["r".to_string()]
    );
    assert_eq!(s.docs_since(other, 0, 10).expect("since").len(), 1);
    // Numbers start again (the readers read from the start).
    s.keep_docs(up, true).expect("keep again");
    s.put_docs(up, &[doc("a", 3, "A2")]).expect("put after");
    assert_eq!(
        s.docs_since(up, 0, 10).expect("since"),
        vec![stored("a", 1, 3, Some("A2"))]
    );
}

fn deps_members_marks(s: &dyn StateStore) {
    let up = s.register_flow("up", "{}").expect("register up");
    let other = s.register_flow("other", "{}").expect("register other");
    let down = s.register_flow("down", "{}").expect("register down");
    let side = s.register_flow("side", "{}").expect("register side");

    // Dependencies: each item's edges, replaced as a whole.
    s.set_deps(down, &[]).expect("empty");
    s.set_deps(
        down,
        &[
            ("zeta".into(), vec![(up, "a".into()), (up, "b".into())]),
            ("beta".into(), vec![(up, "a".into()), (up, "a".into())]),
            ("mid".into(), vec![(other, "a".into())]),
        ],
    )
    .expect("deps");
    s.set_deps(side, &[("s".into(), vec![(up, "a".into())])])
        .expect("side deps");
    assert_eq!(
        s.dependents(down, up, &keys(&["a"])).expect("dependents"),
        keys(&["beta", "zeta"])
    );
    assert_eq!(
        s.dependents(down, up, &keys(&["b", "a", "zz", "a"]))
            .expect("dependents"),
        keys(&["beta", "zeta"])
    );
    assert_eq!(
        s.dependents(down, other, &keys(&["a"]))
            .expect("dependents"),
        keys(&["mid"])
    );
    assert_eq!(
        s.dependents(side, up, &keys(&["a"])).expect("dependents"),
        keys(&["s"])
    );
    assert!(s.dependents(down, up, &[]).expect("none").is_empty());
    assert!(
        s.dependents(up, down, &keys(&["zeta"]))
            .expect("reverse")
            .is_empty()
    );
    s.set_deps(
        down,
        &[
            ("zeta".into(), vec![(up, "c".into())]),
            ("beta".into(), vec![]),
        ],
    )
    .expect("replace deps");
    assert!(
        s.dependents(down, up, &keys(&["a", "b"]))
            .expect("old")
            .is_empty()
    );
    assert_eq!(
        s.dependents(down, up, &keys(&["c"])).expect("new"),
        keys(&["zeta"])
    );
    assert_eq!(
        s.dependents(down, other, &keys(&["a"])).expect("untouched"),
        keys(&["mid"])
    );

    // Members and marks.
    assert_eq!(s.input_mark(down, up).expect("mark"), None);
    s.update_members(
        down,
        up,
        &[
            ("b".into(), Some(("g1".into(), vec![2]))),
            ("a".into(), Some(("g1".into(), vec![1]))),
            ("c".into(), Some(("g2".into(), vec![3]))),
        ],
        5,
    )
    .expect("members");
    assert_eq!(s.input_mark(down, up).expect("mark"), Some(5));
    assert_eq!(s.input_mark(up, down).expect("reverse mark"), None);
    assert_eq!(s.input_mark(down, other).expect("other mark"), None);
    let groups = s
        .member_groups(down, up, &keys(&["a", "c", "zz"]))
        .expect("groups");
    assert_eq!(groups.len(), 2);
    assert_eq!(groups.get("a"), Some(&("g1".to_string(), vec![1])));
    assert_eq!(groups.get("c"), Some(&("g2".to_string(), vec![3])));
    assert!(
        s.member_groups(side, up, &keys(&["a"]))
            .expect("isolated")
            .is_empty()
    );
    assert_eq!(
        s.group_members(down, "g1").expect("members"),
        vec![(up, "a".to_string()), (up, "b".to_string())]
    );
    s.update_members(
        down,
        other,
        &[("x".into(), Some(("g1".into(), vec![9])))],
        2,
    )
    .expect("members of other");
    assert_eq!(
        s.group_members(down, "g1").expect("members"),
        vec![
            (up, "a".to_string()),
            (up, "b".to_string()),
            (other, "x".to_string())
        ]
    );
    assert_eq!(s.input_mark(down, other).expect("mark"), Some(2));
    // Moves and removals; the mark moves with them.
    s.update_members(
        down,
        up,
        &[
            ("a".into(), Some(("g2".into(), vec![4]))),
            ("b".into(), None),
            ("ghost".into(), None),
        ],
        7,
    )
    .expect("move");
    assert_eq!(
        s.group_members(down, "g1").expect("g1"),
        vec![(other, "x".to_string())]
    );
    assert_eq!(
        s.group_members(down, "g2").expect("g2"),
        vec![(up, "a".to_string()), (up, "c".to_string())]
    );
    let groups = s
        .member_groups(down, up, &keys(&["a", "b"]))
        .expect("groups");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups.get("a"), Some(&("g2".to_string(), vec![4])));
    assert!(s.group_members(down, "nothing").expect("empty").is_empty());
    assert_eq!(s.input_mark(down, up).expect("mark"), Some(7));
    s.update_members(down, up, &[], 8).expect("mark only");
    assert_eq!(s.input_mark(down, up).expect("mark"), Some(8));
    s.set_input_mark(down, up, 9).expect("set mark");
    assert_eq!(s.input_mark(down, up).expect("mark"), Some(9));
    s.set_input_mark(side, up, 3).expect("side mark");
    s.update_members(side, up, &[("a".into(), Some(("s".into(), vec![1])))], 3)
        .expect("side members");

    // Documents `down` keeps itself are no input of it.
    s.keep_docs(down, true).expect("keep");
    s.put_docs(down, &[doc("zeta", 1, "Z")]).expect("own docs");

    // A reset forgets what `down` read, nothing of other flows and not its own documents.
    s.forget_inputs(down).expect("forget");
    assert!(
        s.dependents(down, up, &keys(&["c"]))
            .expect("deps")
            .is_empty()
    );
    assert!(
        s.dependents(down, other, &keys(&["a"]))
            .expect("deps")
            .is_empty()
    );
    assert!(s.group_members(down, "g1").expect("g1").is_empty());
    assert!(s.group_members(down, "g2").expect("g2").is_empty());
    assert_eq!(s.input_mark(down, up).expect("mark"), None);
    assert_eq!(s.input_mark(down, other).expect("mark"), None);
    assert!(s.docs_kept(down).expect("kept"));
    assert_eq!(s.docs_since(down, 0, 10).expect("own docs").len(), 1);
    assert_eq!(
        s.dependents(side, up, &keys(&["a"])).expect("side deps"),
        keys(&["s"])
    );
    assert_eq!(s.input_mark(side, up).expect("side mark"), Some(3));
    assert_eq!(s.group_members(side, "s").expect("side").len(), 1);

    // Deleting a flow forgets its documents, dependencies, members and marks.
    s.update_members(down, up, &[("a".into(), Some(("g".into(), vec![1])))], 4)
        .expect("members again");
    s.set_deps(down, &[("zeta".into(), vec![(up, "a".into())])])
        .expect("deps again");
    assert!(s.delete_flow(down).expect("delete"));
    assert!(!s.docs_kept(down).expect("kept"));
    assert!(s.docs_since(down, 0, 10).expect("docs").is_empty());
    assert!(
        s.dependents(down, up, &keys(&["a"]))
            .expect("deps")
            .is_empty()
    );
    assert!(s.group_members(down, "g").expect("members").is_empty());
    assert_eq!(s.input_mark(down, up).expect("mark"), None);
    // Other flows keep theirs.
    assert_eq!(
        s.dependents(side, up, &keys(&["a"])).expect("side deps"),
        keys(&["s"])
    );
    assert_eq!(s.input_mark(side, up).expect("side mark"), Some(3));
    assert_eq!(s.group_members(side, "s").expect("side").len(), 1);
}

type Check = fn(&dyn StateStore);

const CHECKS: [(&str, Check); 11] = [
    ("tombstones", tombstones),
    ("flows_and_items", flows_and_items),
    ("two_phase", two_phase),
    ("memo_gc", memo_gc),
    ("runs", runs),
    ("runs_pruning", runs_pruning),
    ("runs_interrupted", runs_interrupted),
    ("reset_support", reset_support),
    ("queue", queue),
    ("docs_and_sequence", docs_and_sequence),
    ("deps_members_marks", deps_members_marks),
];

#[test]
fn sqlite_in_memory_keeps_the_contract() {
    for (name, check) in CHECKS {
        let s = SqliteStore::open_in_memory().expect("open");
        eprintln!("check {name}");
        check(&s);
    }
}

#[test]
fn sqlite_file_keeps_the_contract_and_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, check) in CHECKS {
        let path = dir.path().join(format!("{name}.sqlite"));
        let s = SqliteStore::open(&path).expect("open");
        check(&s);
        drop(s);
        // Reopening sees the same state.
        let s = SqliteStore::open(&path).expect("reopen");
        assert!(
            !s.flows().expect("flows").is_empty(),
            "{name}: state persisted"
        );
    }
}

#[test]
fn postgres_keeps_the_contract_and_persists() {
    let pg = freshindex_testpg::TestPg::start();
    for (name, check) in CHECKS {
        let url = pg.create_database(name);
        let s = PgStore::connect(&url).expect("connect");
        eprintln!("check {name}");
        check(&s);
        drop(s);
        // A new connection (another process) sees the same state.
        let s = PgStore::connect(&url).expect("reconnect");
        assert!(
            !s.flows().expect("flows").is_empty(),
            "{name}: state persisted"
        );
    }
}

#[test]
fn postgres_schema_is_versioned() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("versions");
    let s = PgStore::connect(&url).expect("create the schema");
    let f = s.register_flow("docs", "{}").expect("register");
    drop(s);
    let version = |db: &str| {
        pg.psql(
            db,
            "SELECT value FROM freshindex.meta WHERE key = 'schema_version'",
        )
    };
    assert_eq!(version("versions"), "2");
    // Connecting to an up-to-date database writes nothing: the meta row and the tables are
    // the ones the first connect made.
    let state = |db: &str| {
        pg.psql(
            db,
            "SELECT xmin::text || ' ' || (SELECT string_agg(relname || ':' || xmin::text, ',' \
             ORDER BY relname) FROM pg_class WHERE relnamespace = 'freshindex'::regnamespace) \
             FROM freshindex.meta",
        )
    };
    let before = state("versions");
    let s = PgStore::connect(&url).expect("reconnect");
    assert_eq!(state("versions"), before);
    assert_eq!(s.flow("docs").expect("flow").map(|r| r.id), Some(f));
    drop(s);
    // Processes that start at once on an empty database migrate it once between them.
    let url2 = pg.create_database("race");
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| PgStore::connect(&url2).map(drop)))
            .collect();
        for h in handles {
            h.join()
                .expect("connect thread")
                .expect("concurrent connect");
        }
    });
    assert_eq!(version("race"), "2");
    // A database a newer release migrated is refused, and left as it is.
    pg.psql(
        "versions",
        "UPDATE freshindex.meta SET value = '99' WHERE key = 'schema_version'",
    );
    match PgStore::connect(&url) {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (99, 2));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert_eq!(version("versions"), "99");
    // Errors name what failed: a database that does not exist is not retried.
    let started = std::time::Instant::now();
    let err = PgStore::connect(&pg.db_url("missing")).expect_err("no such database");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1") && text.contains("missing"),
        "{text}"
    );
    // `open_store` takes PostgreSQL URLs only, naming any other value.
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = freshindex_store::open_store(&url2, dir.path()).expect("open_store");
    assert!(opened.has_shared_locks());
    let err = freshindex_store::open_store("mysql://u:pw@h/db", dir.path())
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(text.contains("mysql://u:***@h/db"), "{text}");
}

/// The schema of version 1 (file metadata per item), as that release created it.
const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE flows (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec_json TEXT NOT NULL);
CREATE TABLE items (
  flow_id INTEGER NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL, size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL, racy INTEGER NOT NULL, content_hash BLOB, spec_fp BLOB,
  message TEXT, PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE TABLE tracked (
  flow_id INTEGER NOT NULL, item_key TEXT NOT NULL, n_rows INTEGER NOT NULL,
  rows BLOB NOT NULL, PRIMARY KEY (flow_id, item_key)
) WITHOUT ROWID;
CREATE TABLE pending (
  id INTEGER PRIMARY KEY, flow_id INTEGER NOT NULL, item_key TEXT NOT NULL,
  row_keys TEXT NOT NULL
);
CREATE INDEX pending_item ON pending (flow_id, item_key);
CREATE TABLE memo (
  flow_id INTEGER NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL, UNIQUE (flow_id, key)
);
CREATE TABLE memo_totals (
  flow_id INTEGER PRIMARY KEY, entries INTEGER NOT NULL, bytes INTEGER NOT NULL
);
CREATE TABLE memo_gc (
  flow_id INTEGER NOT NULL, key BLOB NOT NULL, PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE TABLE runs (
  id INTEGER PRIMARY KEY, flow_id INTEGER NOT NULL, finished_at_ms INTEGER NOT NULL,
  status TEXT NOT NULL, summary_json TEXT NOT NULL
);
CREATE INDEX runs_flow ON runs (flow_id, id);
INSERT INTO meta (key, value) VALUES ('schema_version', '1');
";

#[test]
fn sqlite_migrates_a_version_1_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v1.sqlite");
    {
        let c = rusqlite::Connection::open(&path).expect("create v1");
        c.execute_batch(SCHEMA_V1).expect("v1 schema");
        c.execute(
            "INSERT INTO flows (id, name, spec_json) VALUES (7, 'docs', '{}')",
            [],
        )
        .expect("flow");
        for (key, status, message) in [
            ("x", "ACCEPTED", None),
            ("y", "NEW_ITEM", None),
            ("z", "ERROR", Some("boom")),
            ("s", "SKIPPED", Some("binary")),
        ] {
            c.execute(
                "INSERT INTO items VALUES (7, ?1, ?2, 10, 1, 0, x'0101', x'0202', ?3)",
                rusqlite::params![key, status, message],
            )
            .expect("item");
        }
        // One tracked row of `x` in the (unchanged) lineage encoding, using memo entry 1.
        let mut rows = vec![2u8, 0];
        rows.extend_from_slice(b"x1");
        rows.extend_from_slice(&[101; 32]);
        rows.push(1);
        rows.extend_from_slice(&[1; 32]);
        c.execute(
            "INSERT INTO tracked VALUES (7, 'x', 1, ?1)",
            rusqlite::params![rows],
        )
        .expect("tracked");
        c.execute(
            "INSERT INTO memo VALUES (7, ?1, x'00112233')",
            rusqlite::params![vec![1u8; 32]],
        )
        .expect("memo");
        c.execute("INSERT INTO memo_totals VALUES (7, 1, 4)", [])
            .expect("totals");
        c.execute("INSERT INTO runs VALUES (1, 7, 1000, 'failed', '{}')", [])
            .expect("run");
    }
    let check = |s: &dyn StateStore| {
        let flow = s.flow("docs").expect("flow").expect("docs");
        assert_eq!(flow.id.0, 7);
        let f = flow.id;
        assert_eq!(s.traversal_label(f).expect("label"), None);
        let items = s.items(f).expect("items");
        let got: Vec<(&str, ItemStatus, &str, Option<&str>)> = items
            .iter()
            .map(|i| {
                (
                    i.key.as_str(),
                    i.status,
                    i.queue.as_str(),
                    i.message.as_deref(),
                )
            })
            .collect();
        // Every item is re-read once under label B; nothing was indexed yet.
        assert_eq!(
            got,
            [
                ("s", ItemStatus::Modified, "B", Some("binary")),
                ("x", ItemStatus::Modified, "B", None),
                ("y", ItemStatus::NewItem, "B", None),
                ("z", ItemStatus::Modified, "B", Some("boom")),
            ]
        );
        for i in &items {
            assert_eq!(
                i.content_hash, None,
                "{}: v1 hashes are not queue hashes",
                i.key
            );
            assert_eq!(
                (i.leased_until_ms, i.attempts, i.version.as_ref()),
                (None, 0, None)
            );
        }
        let lin = s.lineage(f, &["x"]).expect("lineage");
        assert_eq!(lin["x"].tracked, [row("x1", 1)]);
        assert_eq!(s.memo_stats(f).expect("memo"), (1, 4));
        assert_eq!(
            s.memo_get(f, &[fp(1)]).expect("memo get")[&fp(1)],
            [0, 0x11, 0x22, 0x33]
        );
        // Through version 2 to the execution history of version 3.
        let runs: Vec<(RunState, i64)> = s
            .runs(f, 10)
            .expect("runs")
            .iter()
            .map(|r| (r.status, r.started_at_ms))
            .collect();
        assert_eq!(runs, [(RunState::PersistentFailure, 1000)]);
    };
    let s = SqliteStore::open(&path).expect("migrate");
    check(&s);
    drop(s);
    // Reopening a migrated store changes nothing.
    let s = SqliteStore::open(&path).expect("reopen");
    check(&s);
    let f = s.flow("docs").expect("flow").expect("docs").id;
    // The migrated entries are pollable, MODIFIED before NEW_ITEM.
    let polled = s.poll(f, &poll("w", 10), NOW_MS).expect("poll");
    assert_eq!(
        polled
            .iter()
            .map(|e| e.item.key.as_str())
            .collect::<Vec<_>>(),
        ["s", "x", "z", "y"]
    );
    let version: String = rusqlite::Connection::open(&path)
        .expect("open raw")
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .expect("schema version");
    assert_eq!(version, "6");
}

/// The schema of version 2 (the indexing queue; runs as plain summaries), as that release
/// created it.
const SCHEMA_V2: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE flows (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec_json TEXT NOT NULL,
  traversal_label TEXT
);
CREATE TABLE items (
  flow_id INTEGER NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL, prio INTEGER NOT NULL,
  content_hash TEXT, metadata_hash TEXT, payload BLOB, queue TEXT NOT NULL,
  enqueued_at INTEGER NOT NULL, leased_until INTEGER, lease_owner TEXT,
  attempts INTEGER NOT NULL, available_at INTEGER NOT NULL, message TEXT, version BLOB,
  repushed INTEGER NOT NULL, PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE INDEX items_poll ON items (flow_id, prio, enqueued_at, key);
CREATE TABLE tombstones (
  flow_id INTEGER NOT NULL, key TEXT NOT NULL, version BLOB NOT NULL,
  PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE TABLE tracked (
  flow_id INTEGER NOT NULL, item_key TEXT NOT NULL, n_rows INTEGER NOT NULL,
  rows BLOB NOT NULL, PRIMARY KEY (flow_id, item_key)
) WITHOUT ROWID;
CREATE TABLE pending (
  id INTEGER PRIMARY KEY, flow_id INTEGER NOT NULL, item_key TEXT NOT NULL,
  row_keys TEXT NOT NULL
);
CREATE INDEX pending_item ON pending (flow_id, item_key);
CREATE TABLE memo (
  flow_id INTEGER NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL, UNIQUE (flow_id, key)
);
CREATE TABLE memo_totals (
  flow_id INTEGER PRIMARY KEY, entries INTEGER NOT NULL, bytes INTEGER NOT NULL
);
CREATE TABLE memo_gc (
  flow_id INTEGER NOT NULL, key BLOB NOT NULL, PRIMARY KEY (flow_id, key)
) WITHOUT ROWID;
CREATE TABLE runs (
  id INTEGER PRIMARY KEY, flow_id INTEGER NOT NULL, finished_at_ms INTEGER NOT NULL,
  status TEXT NOT NULL, summary_json TEXT NOT NULL
);
CREATE INDEX runs_flow ON runs (flow_id, id);
INSERT INTO meta (key, value) VALUES ('schema_version', '2');
";

#[test]
fn sqlite_migrates_a_version_2_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v2.sqlite");
    {
        let c = rusqlite::Connection::open(&path).expect("create v2");
        c.execute_batch(SCHEMA_V2).expect("v2 schema");
        c.execute_batch(
            "INSERT INTO flows VALUES (3, 'docs', '{}', 'A');
             INSERT INTO items (flow_id, key, status, prio, content_hash, queue, enqueued_at,
               attempts, available_at, repushed)
             VALUES (3, 'a.md', 'ACCEPTED', 3, 'h', 'A', 5, 0, 5, 0);
             INSERT INTO runs VALUES (10, 3, 2000, 'success', '{\"n\":1,\"elapsed_ms\":500}');
             INSERT INTO runs VALUES (11, 3, 3000, 'failed', '{\"n\":2,\"elapsed_ms\":40}');
             INSERT INTO runs VALUES (12, 3, 4000, 'success', 'not json');",
        )
        .expect("v2 rows");
    }
    let s = SqliteStore::open(&path).expect("migrate");
    let f = s.flow("docs").expect("flow").expect("docs").id;
    let runs = s.runs(f, 10).expect("runs");
    /// id, trigger, status, start, end, summary.
    type Migrated<'a> = (i64, Trigger, RunState, i64, Option<i64>, Option<&'a str>);
    let got: Vec<Migrated<'_>> = runs
        .iter()
        .map(|r| {
            (
                r.id.0,
                r.trigger,
                r.status,
                r.started_at_ms,
                r.finished_at_ms,
                r.summary_json.as_deref(),
            )
        })
        .collect();
    // Kept summaries become finished manual runs, started `elapsed_ms` before they ended;
    // `failed` (too many failed items) is a persistent failure.
    assert_eq!(
        got,
        [
            (
                12,
                Trigger::Manual,
                RunState::Success,
                4000,
                Some(4000),
                Some("not json")
            ),
            (
                11,
                Trigger::Manual,
                RunState::PersistentFailure,
                2960,
                Some(3000),
                Some("{\"n\":2,\"elapsed_ms\":40}")
            ),
            (
                10,
                Trigger::Manual,
                RunState::Success,
                1500,
                Some(2000),
                Some("{\"n\":1,\"elapsed_ms\":500}")
            ),
        ]
    );
    assert!(runs.iter().all(|r| r.message.is_none()));
    assert_eq!(s.last_run(f).expect("last").as_deref(), Some("not json"));
    // The rest of the state is untouched.
    assert_eq!(s.traversal_label(f).expect("label").as_deref(), Some("A"));
    let a = s.get(f, "a.md").expect("get").expect("a.md").item;
    assert_eq!(
        (a.status, a.content_hash.as_deref()),
        (ItemStatus::Accepted, Some("h"))
    );
    // New entries follow the migrated ones.
    let next = s.begin_run(f, Trigger::Manual, 5000).expect("begin");
    assert!(next.0 > 12);
    drop(s);
    let s = SqliteStore::open(&path).expect("reopen");
    assert_eq!(s.runs(f, 10).expect("runs").len(), 4);
    let raw = rusqlite::Connection::open(&path).expect("open raw");
    let version: String = raw
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .expect("schema version");
    assert_eq!(version, "6");
    let marks: Vec<Option<String>> = raw
        .prepare("SELECT change_mark FROM flows")
        .expect("flows have a change mark (v4)")
        .query_map([], |r| r.get(0))
        .expect("marks")
        .collect::<Result<_, _>>()
        .expect("marks");
    assert!(marks.iter().all(Option::is_none), "{marks:?}");
    let index_table: String = raw
        .query_row(
            "SELECT tbl_name FROM sqlite_master WHERE type = 'index' AND name = 'runs_flow'",
            [],
            |r| r.get(0),
        )
        .expect("runs index");
    assert_eq!(index_table, "runs", "the index moved to the new table");
    let old: i64 = raw
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'runs_v2'",
            [],
            |r| r.get(0),
        )
        .expect("old table");
    assert_eq!(old, 0);
}
