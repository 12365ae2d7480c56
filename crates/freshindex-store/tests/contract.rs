//! The contract every state-store backend keeps. Each check takes a fresh store; the backend
//! list at the bottom runs them all (a PostgreSQL backend adds itself there).

use freshindex_store::{
    BatchCommit, Fingerprint, FlowStore, ItemChange, ItemRecord, ItemStatus, RUNS_KEPT,
    SqliteStore, StateStore, TrackedRow,
};

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn record(key: &str, status: ItemStatus, hash: u8) -> ItemRecord {
    ItemRecord {
        key: key.into(),
        status,
        size: 10,
        mtime_ns: 1_700_000_000_000_000_000,
        racy: false,
        content_hash: Some(fp(hash)),
        spec_fp: Some(fp(200)),
        message: None,
        has_pending: false,
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
        },
    )
    .expect("commit");
    let items = s.items(a).expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], record("x", ItemStatus::Accepted, 1));
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
                ItemChange::Delete { key: "new".into() },
            ],
            memo: vec![],
            gc_candidates: vec![],
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
        },
    )
    .expect("commit");
    s.commit(
        g,
        BatchCommit {
            items: vec![],
            memo: vec![(fp(1), vec![9; 4])],
            gc_candidates: vec![],
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
            items: vec![ItemChange::Delete { key: "a".into() }],
            memo: vec![],
            gc_candidates: vec![],
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

fn runs(s: &dyn StateStore) {
    let f = s.register_flow("r", "{}").expect("register");
    assert!(s.last_run(f).expect("none").is_none());
    for i in 0..(RUNS_KEPT + 5) {
        s.record_run(f, "success", &format!("{{\"n\":{i}}}"))
            .expect("record");
    }
    assert_eq!(
        s.last_run(f).expect("last"),
        Some(format!("{{\"n\":{}}}", RUNS_KEPT + 4))
    );
}

type Check = fn(&dyn StateStore);

const CHECKS: [(&str, Check); 4] = [
    ("flows_and_items", flows_and_items),
    ("two_phase", two_phase),
    ("memo_gc", memo_gc),
    ("runs", runs),
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
