//! The index service over real segmented collections and a real state store: build states,
//! idempotent requests, drop during a build, retries with backoff up to the limit, lost nodes
//! and fencing of their late reports, least-loaded assignment, orphan cleanup, and a restart
//! that resumes with the same ids.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use freshindex_engine::EngineError;
use freshindex_engine::indexing::{
    IndexParams, IndexService, IndexServiceOptions, IndexState, ReportOutcome, SegmentHost,
    execute_build,
};
use freshindex_store::SqliteStore;
use freshindex_vector::{
    Metric, Row, RowPayload, SegmentInfo, SegmentOptions, SegmentedCollection, VectorCollection,
};

const DIM: usize = 16;

/// The engine's role for the service, over real collections.
struct Host(Mutex<HashMap<String, Arc<SegmentedCollection>>>);

impl Host {
    fn get(&self, name: &str) -> Option<Arc<SegmentedCollection>> {
        self.0.lock().expect("lock").get(name).cloned()
    }
}

impl SegmentHost for Host {
    fn segments(
        &self,
        collection: &str,
    ) -> Result<Option<(Metric, usize, Vec<SegmentInfo>)>, EngineError> {
        Ok(self
            .get(collection)
            .map(|c| (c.metric(), c.dimension(), c.segments())))
    }
    fn attach(
        &self,
        collection: &str,
        segment: u64,
        file: &Path,
        ef_search: usize,
    ) -> Result<bool, EngineError> {
        match self.get(collection) {
            Some(c) => Ok(c.attach_index_with(segment, file, Some(ef_search))?),
            None => Ok(false),
        }
    }
    fn drop_indexes(&self, collection: &str) -> Result<(), EngineError> {
        if let Some(c) = self.get(collection) {
            c.drop_indexes()?;
        }
        Ok(())
    }
}

fn vector(i: usize) -> Vec<f32> {
    let mut s = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn rows(range: std::ops::Range<usize>) -> Vec<Row> {
    range
        .map(|i| Row {
            key: format!("k{i:04}"),
            vector: vector(i),
            payload: RowPayload {
                source: format!("doc{i}"),
                range: [0, 1],
                text: String::new(),
                metadata: None,
            },
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    host: Host,
    store: Arc<SqliteStore>,
    build_dir: std::path::PathBuf,
    collection: Arc<SegmentedCollection>,
}

/// A collection of 150 rows in 3 sealed segments of 50.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("state.sqlite")).expect("store"));
    let opts = SegmentOptions {
        seal_rows: 50,
        ..Default::default()
    };
    let c = Arc::new(
        SegmentedCollection::open(
            &dir.path().join("c"),
            "c",
            Some((DIM, Metric::Cosine)),
            opts,
        )
        .expect("open"),
    );
    for part in rows(0..150).chunks(50) {
        c.upsert(part).expect("upsert");
    }
    assert_eq!(c.segments().len(), 3);
    let host = Host(Mutex::new(HashMap::from([("c".to_string(), c.clone())])));
    let build_dir = dir.path().join("builds");
    Fixture {
        host,
        store,
        build_dir,
        collection: c,
        _dir: dir,
    }
}

fn service(f: &Fixture, timeout_ms: u64) -> IndexService {
    let mut opts = IndexServiceOptions::new(f.build_dir.clone());
    opts.heartbeat_timeout_ms = timeout_ms;
    opts.max_retries = 2;
    opts.retry_pause_ms = 1_000;
    IndexService::open(f.store.clone(), opts).expect("service")
}

/// Builds `b` as a node does and reports it finished.
fn build_and_report(
    s: &IndexService,
    host: &dyn SegmentHost,
    node: u64,
    b: &freshindex_engine::indexing::IndexBuild,
    now: i64,
) -> ReportOutcome {
    execute_build(b, 1).expect("build");
    s.report_finished(host, b.build_id, b.version, node, &b.output_path, now)
        .expect("report")
}

fn state(s: &IndexService, id: u64) -> IndexState {
    s.builds(&[id])[0]
        .1
        .as_ref()
        .map_or(IndexState::None, |b| b.state)
}

#[test]
fn builds_go_from_unissued_to_finished_and_requests_are_idempotent() {
    let f = fixture();
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let builds = s.builds_of(Some("c"));
    assert_eq!(builds.len(), 3);
    assert!(builds.iter().all(|b| b.state == IndexState::Unissued));
    let ids: Vec<u64> = builds.iter().map(|b| b.build_id).collect();
    // The same request again: the same index and builds.
    let (index, again) = s.build_index(&f.host, "c", "hnsw", None, 1).expect("build");
    assert_eq!(again, ids);
    assert_eq!(
        s.build_index(&f.host, "c", "hnsw", None, 2)
            .expect("again")
            .0,
        index
    );
    // Another definition while one is live is a conflict.
    let other = IndexParams {
        m: 8,
        ..IndexParams::defaults(Metric::Cosine)
    };
    assert!(matches!(
        s.build_index(&f.host, "c", "hnsw", Some(other), 3),
        Err(EngineError::Conflict(_))
    ));
    assert_eq!(state(&s, 9_999), IndexState::None);

    let node = s.register_node("local-test", 1, 10).expect("node").node_id;
    let mut finished = 0;
    while let Some(b) = s.take(node, 20).expect("take") {
        assert_eq!(state(&s, b.build_id), IndexState::InProgress);
        // Capacity 1: nothing else is in progress meanwhile.
        assert_eq!(
            s.builds_of(Some("c"))
                .iter()
                .filter(|x| x.state == IndexState::InProgress)
                .count(),
            1
        );
        let r = build_and_report(&s, &f.host, node, &b, 30);
        assert_eq!(r, ReportOutcome::Accepted);
        assert_eq!(state(&s, b.build_id), IndexState::Finished);
        let done = &s.builds(&[b.build_id])[0].1;
        let files = &done.as_ref().expect("build").file_paths;
        assert!(files.iter().all(|p| p.exists()), "{files:?}");
        finished += 1;
    }
    assert_eq!(finished, 3);
    let stats = f.collection.stats();
    assert_eq!(stats.indexed_rows, 150);
    assert_eq!(stats.unindexed_rows, 0);
    // Indexed search finds an exact match first.
    let hits = f.collection.search(&vector(77), 5, None).expect("search");
    assert_eq!(hits[0].key, "k0077");
    let m = s.metrics();
    assert_eq!(m.builds.get("Finished"), Some(&3));
    assert_eq!(m.nodes.len(), 1);
    assert_eq!(m.nodes[0].load, 0);
}

#[test]
fn dropping_an_index_deletes_its_builds_and_a_later_report_is_ignored() {
    let f = fixture();
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let node = s.register_node("n", 3, 0).expect("node").node_id;
    let first = s.take(node, 1).expect("take").expect("a build");
    build_and_report(&s, &f.host, node, &first, 2);
    let second = s.take(node, 3).expect("take").expect("a build");
    assert_eq!(state(&s, second.build_id), IndexState::InProgress);
    execute_build(&second, 1).expect("build");

    let (_, n) = s.drop_index(&f.host, "c", "hnsw", 4).expect("drop");
    assert_eq!(n, 3);
    for b in s.builds_of(Some("c")) {
        assert_eq!(b.state, IndexState::Deleted, "build {}", b.build_id);
    }
    assert_eq!(f.collection.stats().indexed_rows, 0);
    assert!(
        !f.collection
            .dir()
            .join(format!("seg-{}.hnsw", first.segment))
            .exists(),
        "the finished build's file is removed"
    );
    // The node finishes the build it had; its report is ignored and its file removed.
    let r = s
        .report_finished(
            &f.host,
            second.build_id,
            second.version,
            node,
            &second.output_path,
            5,
        )
        .expect("report");
    assert!(matches!(r, ReportOutcome::Ignored(_)), "{r:?}");
    assert!(!second.output_path.exists());
    assert_eq!(state(&s, second.build_id), IndexState::Deleted);
    // A dropped index is not defined again by sync: searches stay exact.
    s.sync(&f.host, "c", 6).expect("sync");
    assert!(s.take(node, 7).expect("take").is_none());
    // Defining it again builds every segment anew.
    let (_, builds) = s.build_index(&f.host, "c", "hnsw", None, 8).expect("build");
    assert_eq!(builds.len(), 3);
}

#[test]
fn failed_builds_are_retried_with_backoff_then_fail_with_their_reason() {
    let f = fixture();
    let s = service(&f, 1_000_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let node = s.register_node("n", 3, 0).expect("node").node_id;
    let b = s.take(node, 0).expect("take").expect("a build");
    let id = b.build_id;
    s.report_failed(id, b.version, node, "disk full", 10)
        .expect("fail");
    let after = s.builds(&[id])[0].1.clone().expect("build");
    assert_eq!(after.state, IndexState::Unissued);
    assert_eq!(after.retries, 1);
    assert_eq!(after.fail_reason.as_deref(), Some("disk full"));
    // Least retried first: the two untouched builds come before it.
    let others: Vec<u64> = (0..2)
        .filter_map(|_| s.take(node, 20).expect("take"))
        .map(|b| b.build_id)
        .collect();
    assert_eq!(others.len(), 2);
    assert!(!others.contains(&id));
    // Not before its pause (1 s after the first failure).
    assert!(s.take(node, 500).expect("take").is_none());
    let b2 = s.take(node, 1_100).expect("take").expect("retried");
    assert_eq!((b2.build_id, b2.version), (id, b.version + 1));
    s.report_failed(id, b2.version, node, "disk full again", 1_200)
        .expect("fail");
    // The second pause is twice the first.
    assert!(s.take(node, 3_000).expect("take").is_none());
    let b3 = s.take(node, 3_300).expect("take").expect("retried");
    s.report_failed(id, b3.version, node, "still full", 3_400)
        .expect("fail");
    let last = s.builds(&[id])[0].1.clone().expect("build");
    assert_eq!(last.state, IndexState::Failed);
    assert_eq!(last.fail_reason.as_deref(), Some("still full"));
    assert_eq!(last.retries, 3);
    assert!(s.take(node, 1_000_000).expect("take").is_none());
}

#[test]
fn a_lost_node_loses_its_builds_and_its_late_report_is_ignored() {
    let f = fixture();
    let s = service(&f, 1_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let a = s.register_node("a", 1, 0).expect("a").node_id;
    let b = s.register_node("b", 1, 0).expect("b").node_id;
    let taken = s.take(a, 100).expect("take").expect("a build");
    execute_build(&taken, 1).expect("build");
    // b keeps heart-beating; a falls silent past the timeout.
    s.heartbeat(b, 900).expect("beat");
    s.heartbeat(b, 1_800).expect("beat");
    let moved = loop {
        let t = s.take(b, 1_900).expect("take").expect("b gets work");
        if t.build_id == taken.build_id {
            break t;
        }
        build_and_report(&s, &f.host, b, &t, 1_900);
    };
    assert_eq!(moved.version, taken.version + 1);
    // a comes back: its report is fenced off and its file removed; it must register again.
    assert!(taken.output_path.exists());
    let r = s
        .report_finished(
            &f.host,
            taken.build_id,
            taken.version,
            a,
            &taken.output_path,
            2_000,
        )
        .expect("report");
    assert!(matches!(r, ReportOutcome::Ignored(_)), "{r:?}");
    assert!(!taken.output_path.exists());
    assert!(matches!(
        s.heartbeat(a, 2_000),
        Err(EngineError::Conflict(_))
    ));
    assert_eq!(state(&s, moved.build_id), IndexState::InProgress);
    // A stray file of an old version is an orphan; the current one's output is not.
    std::fs::create_dir_all(&f.build_dir).expect("dir");
    let stray = f
        .build_dir
        .join(format!("b{}-v{}.building", moved.build_id, taken.version));
    std::fs::write(&stray, b"partial").expect("write");
    std::fs::write(&moved.output_path, b"in progress").expect("write");
    assert_eq!(s.sweep_orphans(), 1);
    assert!(!stray.exists());
    assert!(moved.output_path.exists());
    execute_build(&moved, 1).expect("build");
    let r = s
        .report_finished(
            &f.host,
            moved.build_id,
            moved.version,
            b,
            &moved.output_path,
            2_100,
        )
        .expect("report");
    assert_eq!(r, ReportOutcome::Accepted);
    while let Some(t) = s.take(b, 2_200).expect("take") {
        build_and_report(&s, &f.host, b, &t, 2_300);
    }
    assert_eq!(f.collection.stats().indexed_rows, 150);
}

#[test]
fn builds_go_to_the_least_loaded_live_node() {
    let f = fixture();
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let a = s.register_node("a", 2, 0).expect("a").node_id;
    let b = s.register_node("b", 2, 0).expect("b").node_id;
    // a asks first, but the assignment spreads the three builds over both nodes.
    let first = s.take(a, 1).expect("take").expect("a build");
    let load: HashMap<u64, u32> = s.nodes().iter().map(|n| (n.node.node_id, n.load)).collect();
    assert_eq!(load[&a] + load[&b], 3);
    assert!(load[&a] <= 2 && load[&b] <= 2 && load[&a].abs_diff(load[&b]) <= 1);
    assert_eq!(first.node_id, Some(a));
}

#[test]
fn a_restarted_service_resumes_with_the_same_ids_and_reissues_builds_in_progress() {
    let f = fixture();
    let (ids, taken) = {
        let s = service(&f, 30_000);
        s.sync(&f.host, "c", 0).expect("sync");
        let node = s.register_node("n", 1, 0).expect("node").node_id;
        let taken = s.take(node, 1).expect("take").expect("a build");
        let ids: Vec<u64> = s.builds_of(None).iter().map(|b| b.build_id).collect();
        (ids, taken)
    };
    let s = service(&f, 30_000);
    let again: Vec<u64> = s.builds_of(None).iter().map(|b| b.build_id).collect();
    assert_eq!(again, ids);
    let b = s.builds(&[taken.build_id])[0].1.clone().expect("build");
    assert_eq!(b.state, IndexState::Unissued);
    assert_eq!(b.version, taken.version + 1);
    // New builds get new ids after the old ones.
    f.collection.upsert(&rows(150..200)).expect("upsert");
    s.sync(&f.host, "c", 2).expect("sync");
    let newest = s.builds_of(None).iter().map(|b| b.build_id).max();
    assert_eq!(newest, ids.iter().max().map(|m| m + 1));
}

#[test]
fn a_stale_report_never_deletes_the_path_it_names() {
    let f = fixture();
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let node = s.register_node("n", 1, 0).expect("node").node_id;
    let precious = f.collection.dir().join("MANIFEST");
    for (id, version) in [(9_999, 1), (1, 7)] {
        let r = s
            .report_finished(&f.host, id, version, node, &precious, 1)
            .expect("report");
        assert!(matches!(r, ReportOutcome::Ignored(_)), "{r:?}");
        assert!(
            precious.exists(),
            "a report for build {id} removed {precious:?}"
        );
    }
}

#[test]
fn a_build_without_a_report_times_out_and_is_issued_again() {
    let f = fixture();
    let mut opts = IndexServiceOptions::new(f.build_dir.clone());
    opts.build_timeout_ms = 10_000;
    opts.retry_pause_ms = 0;
    let s = IndexService::open(f.store.clone(), opts).expect("service");
    s.sync(&f.host, "c", 0).expect("sync");
    let node = s.register_node("n", 1, 0).expect("node").node_id;
    let lost = s.take(node, 0).expect("take").expect("a build");
    // The node keeps heart-beating but never reports (it lost the answer, or crashed a
    // thread): after the timeout the build is issued again, with a failure counted.
    s.heartbeat(node, 9_000).expect("beat");
    assert_eq!(state(&s, lost.build_id), IndexState::InProgress);
    s.heartbeat(node, 10_500).expect("beat");
    let b = s.builds(&[lost.build_id])[0].1.clone().expect("build");
    assert_eq!(b.state, IndexState::Unissued);
    assert_eq!(b.retries, 1);
    assert!(
        b.fail_reason
            .as_deref()
            .is_some_and(|r| r.contains("timed out"))
    );
    // Least retried first: the others come before it, then it comes back.
    let again = loop {
        let t = s.take(node, 10_600).expect("take").expect("issued again");
        if t.build_id == lost.build_id {
            break t;
        }
        build_and_report(&s, &f.host, node, &t, 10_600);
    };
    assert_eq!(again.version, lost.version + 1);
}

#[test]
fn a_node_for_one_collection_takes_only_its_builds() {
    let f = fixture();
    let other = Arc::new(
        SegmentedCollection::open(
            &f.build_dir.with_file_name("d"),
            "d",
            Some((DIM, Metric::Cosine)),
            SegmentOptions {
                seal_rows: 50,
                ..Default::default()
            },
        )
        .expect("open"),
    );
    other.upsert(&rows(0..50)).expect("upsert");
    f.host.0.lock().expect("lock").insert("d".into(), other);
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    s.sync(&f.host, "d", 0).expect("sync");
    let node = s
        .register_node_for("inline", 1, Some("d"), 0)
        .expect("node")
        .node_id;
    let b = s.take(node, 1).expect("take").expect("d's build");
    assert_eq!(b.collection, "d");
    build_and_report(&s, &f.host, node, &b, 2);
    assert!(
        s.take(node, 3).expect("take").is_none(),
        "c's builds are not its"
    );
    assert!(
        s.builds_of(Some("c"))
            .iter()
            .all(|b| b.state == IndexState::Unissued && b.retries == 0)
    );
}

#[test]
fn a_dropped_and_recreated_collection_gets_new_builds() {
    let f = fixture();
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let old: Vec<u64> = s.builds_of(Some("c")).iter().map(|b| b.build_id).collect();
    // The collection goes (its folder with it) and one of the same name comes back.
    let dir = f.collection.dir().to_path_buf();
    f.host.0.lock().expect("lock").remove("c");
    s.forget_collection("c", 1).expect("forget");
    assert!(
        s.builds(&old)
            .iter()
            .all(|(_, b)| b.as_ref().is_some_and(|b| b.state == IndexState::Deleted))
    );
    let fresh = Arc::new(
        SegmentedCollection::open(
            &dir.with_file_name("c2"),
            "c",
            Some((DIM, Metric::Dot)),
            SegmentOptions {
                seal_rows: 50,
                ..Default::default()
            },
        )
        .expect("open"),
    );
    fresh.upsert(&rows(0..50)).expect("upsert");
    f.host.0.lock().expect("lock").insert("c".into(), fresh);
    s.sync(&f.host, "c", 2).expect("sync");
    let new: Vec<_> = s
        .builds_of(Some("c"))
        .into_iter()
        .filter(|b| b.state == IndexState::Unissued)
        .collect();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].index_params.metric, Metric::Dot);
    assert!(!old.contains(&new[0].build_id));
}

/// A host whose attachments wait for a signal: shows what goes on during one.
struct SlowHost<'h> {
    inner: &'h Host,
    entered: std::sync::mpsc::SyncSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl SegmentHost for SlowHost<'_> {
    fn segments(
        &self,
        collection: &str,
    ) -> Result<Option<(Metric, usize, Vec<SegmentInfo>)>, EngineError> {
        self.inner.segments(collection)
    }
    fn attach(
        &self,
        collection: &str,
        segment: u64,
        file: &Path,
        ef_search: usize,
    ) -> Result<bool, EngineError> {
        let _ = self.entered.send(());
        let _ = self.release.lock().expect("lock").recv();
        self.inner.attach(collection, segment, file, ef_search)
    }
    fn drop_indexes(&self, collection: &str) -> Result<(), EngineError> {
        self.inner.drop_indexes(collection)
    }
}

#[test]
fn an_attachment_holds_up_neither_heartbeats_nor_takes_and_a_drop_waits_for_it() {
    let f = fixture();
    let s = service(&f, 30_000);
    s.sync(&f.host, "c", 0).expect("sync");
    let a = s.register_node("a", 1, 0).expect("a").node_id;
    let b = s.register_node("b", 1, 0).expect("b").node_id;
    let first = s.take(a, 1).expect("take").expect("a build");
    execute_build(&first, 1).expect("build");
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
    let (release, release_rx) = std::sync::mpsc::channel();
    let slow = SlowHost {
        inner: &f.host,
        entered: entered_tx,
        release: Mutex::new(release_rx),
    };
    std::thread::scope(|scope| {
        let report = scope.spawn(|| {
            s.report_finished(
                &slow,
                first.build_id,
                first.version,
                a,
                &first.output_path,
                2,
            )
        });
        entered.recv().expect("the attachment started");
        // Meanwhile the service answers.
        s.heartbeat(a, 3).expect("heartbeat");
        assert!(s.take(b, 3).expect("take").is_some());
        // A second report of the same build is refused while it is attached.
        let again = s
            .report_failed(first.build_id, first.version, a, "twice", 3)
            .expect("report");
        assert!(matches!(again, ReportOutcome::Ignored(_)), "{again:?}");
        // A drop waits for the attachment, then deletes what it attached.
        let dropping = scope.spawn(|| s.drop_index(&f.host, "c", "hnsw", 4));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!dropping.is_finished(), "the drop waits for the attachment");
        release.send(()).expect("release");
        assert_eq!(
            report.join().expect("report thread").expect("report"),
            ReportOutcome::Accepted
        );
        dropping.join().expect("drop thread").expect("drop");
    });
    assert_eq!(state(&s, first.build_id), IndexState::Deleted);
    assert_eq!(f.collection.stats().indexed_rows, 0);
}
