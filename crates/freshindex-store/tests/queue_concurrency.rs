//! The indexing queue under concurrent workers: every entry is delivered to exactly one
//! worker while its lease holds, an expired lease passes the entry to another worker and
//! fences the first one out, and a heartbeat keeps a lease alive. Time is injected (`now_ms`
//! values); nothing sleeps. The checks run on SQLite and on PostgreSQL, where every worker has
//! a store of its own (its own connections, as a separate process would).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Barrier};

use freshindex_store::{
    BatchCommit, FenceCheck, FenceError, FlowId, ItemChange, ItemRecord, ItemStatus, PgStore,
    PollRequest, PushItem, PushKind, SqliteStore, StateStore,
};

const T0: i64 = 1_700_000_000_000;
const LEASE_MS: i64 = 30_000;

fn key(i: usize) -> String {
    format!("item-{i:05}")
}

fn content_of(key: &str) -> String {
    format!("content-of-{key}")
}

/// Pushes `n` new items (with content hashes) in batches of 1,000.
fn push_items(s: &dyn StateStore, f: FlowId, n: usize, now_ms: i64) {
    let keys: Vec<usize> = (0..n).collect();
    for chunk in keys.chunks(1_000) {
        let items: Vec<PushItem> = chunk
            .iter()
            .map(|&i| PushItem {
                key: key(i),
                kind: PushKind::Hashes {
                    content: Some(content_of(&key(i))),
                    metadata: None,
                },
                payload: None,
                queue: None,
            })
            .collect();
        let res = s.push(f, &items, now_ms).expect("push");
        assert!(res.iter().all(|r| r == &Ok(ItemStatus::NewItem)));
    }
}

fn poll_req(owner: &str, limit: usize) -> PollRequest {
    PollRequest {
        queue: None,
        limit,
        statuses: vec![],
        owner: owner.into(),
        lease_ms: LEASE_MS,
    }
}

fn owner_checks(owner: &str, keys: &[String]) -> Vec<FenceCheck> {
    keys.iter()
        .map(|k| FenceCheck {
            key: k.clone(),
            version: None,
            owner: Some(owner.into()),
        })
        .collect()
}

/// Indexes the keys as `ACCEPTED` (an empty row set) in one commit.
fn index(s: &dyn StateStore, f: FlowId, keys: &[String], now_ms: i64) {
    let items = keys
        .iter()
        .map(|k| {
            let mut record = ItemRecord::new(k, ItemStatus::Accepted);
            record.content_hash = Some(content_of(k));
            ItemChange::Upsert {
                record,
                rows: Some(vec![]),
            }
        })
        .collect();
    s.commit(
        f,
        BatchCommit {
            items,
            memo: vec![],
            gc_candidates: vec![],
            now_ms,
            inputs: Default::default(),
        },
    )
    .expect("commit");
}

fn keys_of(entries: &[freshindex_store::QueueEntry]) -> Vec<String> {
    entries.iter().map(|e| e.item.key.clone()).collect()
}

/// Eight workers, each on its own store handle from `stores` (cycled), poll, fence and index
/// ten thousand items.
fn eight_workers_index_exactly_once(stores: &[Arc<dyn StateStore>]) {
    const ITEMS: usize = 10_000;
    const WORKERS: usize = 8;
    let store = stores[0].clone();
    let f = store.register_flow("f", "{}").expect("register");
    push_items(&*store, f, ITEMS, T0);
    // The fake clock moves one millisecond per call: leases (30 s) never expire here.
    let clock = Arc::new(AtomicI64::new(T0));
    let start = Arc::new(Barrier::new(WORKERS));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let store = stores[w % stores.len()].clone();
            let (clock, start) = (clock.clone(), start.clone());
            std::thread::spawn(move || {
                let owner = format!("w{w}");
                let mut received = Vec::new();
                start.wait();
                loop {
                    let now = clock.fetch_add(1, Ordering::SeqCst);
                    let batch = store.poll(f, &poll_req(&owner, 100), now).expect("poll");
                    if batch.is_empty() {
                        break;
                    }
                    assert!(batch.len() <= 100);
                    let keys = keys_of(&batch);
                    for e in &batch {
                        assert_eq!(e.item.lease_owner.as_deref(), Some(owner.as_str()));
                        assert_eq!(e.item.leased_until_ms, Some(now + LEASE_MS));
                    }
                    // "Process", then index what the lease still covers.
                    let now = clock.fetch_add(1, Ordering::SeqCst);
                    let fenced = store
                        .fence(f, &owner_checks(&owner, &keys), now)
                        .expect("fence");
                    assert!(
                        fenced.iter().all(Result::is_ok),
                        "{owner} lost a lease it holds: {fenced:?}"
                    );
                    index(&*store, f, &keys, clock.fetch_add(1, Ordering::SeqCst));
                    received.extend(keys);
                }
                received
            })
        })
        .collect();
    let per_worker: Vec<Vec<String>> = workers
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect();
    let delivered: usize = per_worker.iter().map(Vec::len).sum();
    let union: HashSet<&String> = per_worker.iter().flatten().collect();
    assert_eq!(union.len(), ITEMS, "every item was delivered");
    assert_eq!(delivered, ITEMS, "no item was delivered twice");
    assert!(
        per_worker.iter().filter(|w| !w.is_empty()).count() > 1,
        "the work was shared"
    );
    let now = clock.load(Ordering::SeqCst);
    let items = store.items(f).expect("items");
    assert_eq!(items.len(), ITEMS);
    for i in &items {
        assert_eq!(i.status, ItemStatus::Accepted, "{}", i.key);
        assert_eq!((i.leased_until_ms, i.attempts), (None, 0), "{}", i.key);
        assert_eq!(i.content_hash, Some(content_of(&i.key)));
    }
    let stats = store.queue_stats(f, now).expect("stats");
    assert_eq!(stats.leased, 0);
    assert!(
        stats
            .by_status
            .contains(&(ItemStatus::Accepted, ITEMS as u64))
    );
    assert!(
        store
            .poll(f, &poll_req("late", 100), now)
            .expect("poll")
            .is_empty()
    );
}

#[test]
fn eight_workers_index_ten_thousand_items_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn StateStore> =
        Arc::new(SqliteStore::open(&dir.path().join("q.sqlite")).expect("open"));
    eight_workers_index_exactly_once(&[store]);
}

#[test]
fn eight_workers_on_postgres_index_ten_thousand_items_exactly_once() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("workers");
    let stores: Vec<Arc<dyn StateStore>> = (0..8)
        .map(|_| Arc::new(PgStore::connect(&url).expect("connect")) as Arc<dyn StateStore>)
        .collect();
    eight_workers_index_exactly_once(&stores);
}

#[test]
fn an_expired_lease_passes_to_another_worker_and_a_heartbeat_keeps_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    expired_lease_passes_on(&SqliteStore::open(&dir.path().join("q.sqlite")).expect("open"));
}

#[test]
fn an_expired_lease_passes_to_another_worker_on_postgres() {
    let pg = freshindex_testpg::TestPg::start();
    expired_lease_passes_on(&PgStore::connect(&pg.create_database("leases")).expect("connect"));
}

fn expired_lease_passes_on(s: &dyn StateStore) {
    let f = s.register_flow("f", "{}").expect("register");
    push_items(s, f, 30, T0);

    // W1 and W3 each take ten entries at T0 (leases until T0 + 30 s).
    let w1 = keys_of(&s.poll(f, &poll_req("w1", 10), T0).expect("w1 poll"));
    let w3 = keys_of(&s.poll(f, &poll_req("w3", 10), T0).expect("w3 poll"));
    assert_eq!((w1.len(), w3.len()), (10, 10));
    // W3 heartbeats at T0 + 20 s; W1 has stopped.
    assert_eq!(
        s.heartbeat(f, "w3", T0 + 20_000 + LEASE_MS, T0 + 20_000)
            .expect("heartbeat"),
        10
    );
    // Just before the lease ends, W2 gets only the ten entries nobody holds.
    let rest = keys_of(
        &s.poll(f, &poll_req("w2", 100), T0 + LEASE_MS - 1)
            .expect("w2 poll"),
    );
    assert_eq!(rest.len(), 10);
    assert!(rest.iter().all(|k| !w1.contains(k) && !w3.contains(k)));
    // At the end of the lease W1's heartbeat is too late: an expired lease is not revived.
    assert_eq!(
        s.heartbeat(f, "w1", T0 + 2 * LEASE_MS, T0 + LEASE_MS)
            .expect("late heartbeat"),
        0
    );
    // Now W2's poll receives exactly W1's entries, and not W3's (kept alive by the heartbeat).
    let now = T0 + LEASE_MS;
    let taken = s.poll(f, &poll_req("w2", 100), now).expect("w2 poll 2");
    assert_eq!(
        keys_of(&taken).into_iter().collect::<BTreeSet<_>>(),
        w1.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(taken.iter().all(|e| e.item.attempts == 2));
    // A third worker finds nothing: W3's entries are still leased past their first lease.
    assert!(
        s.poll(f, &poll_req("w4", 100), now + 5_000)
            .expect("w4 poll")
            .is_empty()
    );
    // W1 comes back: its fence check reports the lease lost to W2, so it writes nothing.
    let fenced = s
        .fence(f, &owner_checks("w1", &w1), now + 1)
        .expect("w1 fence");
    for (k, r) in w1.iter().zip(&fenced) {
        assert_eq!(
            r,
            &Err(FenceError::LeaseLost {
                key: k.clone(),
                holder: "w2".into()
            })
        );
    }
    // W3 still holds its entries and indexes them; W2 indexes what it took.
    let fenced = s
        .fence(f, &owner_checks("w3", &w3), now + 6_000)
        .expect("w3 fence");
    assert!(fenced.iter().all(Result::is_ok), "{fenced:?}");
    index(s, f, &w3, now + 6_000);
    let w2: Vec<String> = keys_of(&taken);
    let fenced = s
        .fence(f, &owner_checks("w2", &w2), now + 7_000)
        .expect("w2 fence");
    assert!(fenced.iter().all(Result::is_ok), "{fenced:?}");
    index(s, f, &w2, now + 7_000);
    for k in w1.iter().chain(&w3) {
        let e = s.get(f, k).expect("get").expect("entry");
        assert_eq!(e.item.status, ItemStatus::Accepted, "{k}");
        assert_eq!(e.item.lease_owner, None, "{k}");
    }
    // After W2's index, W1 still may not index: its lease ended and W2's newer work stands.
    let fenced = s
        .fence(f, &owner_checks("w1", &w1), now + 8_000)
        .expect("w1 fence 2");
    for (k, r) in w1.iter().zip(&fenced) {
        assert_eq!(
            r,
            &Err(FenceError::LeaseLost {
                key: k.clone(),
                holder: String::new()
            })
        );
    }
}

/// Pollers released together at one instant (same `now_ms`) split the queue without overlap.
/// Poller `p` uses `stores[p % stores.len()]`.
fn same_instant_pollers_are_disjoint(stores: &[&dyn StateStore]) {
    const ITEMS: usize = 2_000;
    const POLLERS: usize = 8;
    let s = stores[0];
    let f = s.register_flow("f", "{}").expect("register");
    push_items(s, f, ITEMS, T0);
    let start = Barrier::new(POLLERS);
    let got: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..POLLERS)
            .map(|p| {
                let start = &start;
                let s = stores[p % stores.len()];
                scope.spawn(move || {
                    let owner = format!("p{p}");
                    let mut mine = Vec::new();
                    start.wait();
                    loop {
                        // Odd pollers also ask for ACCEPTED entries: still disjoint.
                        let mut req = poll_req(&owner, 7 + p);
                        if p % 2 == 1 {
                            req.statuses = vec![ItemStatus::NewItem, ItemStatus::Accepted];
                        }
                        let batch = s.poll(f, &req, T0 + 1).expect("poll");
                        if batch.is_empty() {
                            break mine;
                        }
                        mine.extend(keys_of(&batch));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poller"))
            .collect()
    });
    let mut seen = HashSet::new();
    for (p, keys) in got.iter().enumerate() {
        for k in keys {
            assert!(
                seen.insert(k.clone()),
                "{k} delivered twice (again to p{p})"
            );
        }
    }
    assert_eq!(seen.len(), ITEMS);
    // Each entry's lease names the poller that received it.
    for (p, keys) in got.iter().enumerate() {
        for k in keys.iter().step_by(97) {
            let e = s.get(f, k).expect("get").expect("entry");
            assert_eq!(e.item.lease_owner, Some(format!("p{p}")));
        }
    }
}

#[test]
fn concurrent_pollers_at_the_same_instant_never_share_an_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    same_instant_pollers_are_disjoint(&[
        &SqliteStore::open(&dir.path().join("q.sqlite")).expect("open")
    ]);
    same_instant_pollers_are_disjoint(&[&SqliteStore::open_in_memory().expect("open")]);
}

#[test]
fn concurrent_pollers_on_postgres_never_share_an_entry() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("pollers");
    // Eight stores, one per poller: eight pools, as eight processes would have.
    let stores: Vec<PgStore> = (0..8)
        .map(|_| PgStore::connect(&url).expect("connect"))
        .collect();
    let refs: Vec<&dyn StateStore> = stores.iter().map(|s| s as &dyn StateStore).collect();
    same_instant_pollers_are_disjoint(&refs);
}
