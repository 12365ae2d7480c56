//! What only the PostgreSQL backend has: calls that ride out a server restart, and named
//! locks shared by processes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use freshindex_store::{
    DocWrite, FlowStore, InputStore, ItemStatus, ItemStore, LockStore, PgStore, PushItem, PushKind,
    SqliteStore, StoreError,
};

const T0: i64 = 1_700_000_000_000;

fn new_item(key: String) -> PushItem {
    PushItem {
        kind: PushKind::Hashes {
            content: Some(format!("content-of-{key}")),
            metadata: None,
        },
        key,
        payload: None,
        queue: None,
    }
}

#[test]
fn calls_ride_out_a_server_restart() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("restart");
    let s = PgStore::connect(&url).expect("connect");
    let f = s.register_flow("f", "{}").expect("register");
    let restarted = AtomicBool::new(false);
    let (pushed, slowest) = std::thread::scope(|scope| {
        let pusher = scope.spawn(|| {
            // Ten keys a call, one call after the other, until well after the restart.
            let mut pushed = 0usize;
            let mut after_restart = 0;
            let mut slowest = Duration::ZERO;
            while after_restart < 20 && pushed < 100_000 {
                let items: Vec<PushItem> = (pushed..pushed + 10)
                    .map(|i| new_item(format!("item-{i:06}")))
                    .collect();
                let started = Instant::now();
                let res = s.push(f, &items, T0).expect("push across the restart");
                slowest = slowest.max(started.elapsed());
                assert!(res.iter().all(|r| r == &Ok(ItemStatus::NewItem)), "{res:?}");
                pushed += 10;
                if restarted.load(Ordering::SeqCst) {
                    after_restart += 1;
                }
            }
            (pushed, slowest)
        });
        // Let the pusher run, then restart the server under it (fast shutdown: its sessions
        // are ended).
        std::thread::sleep(Duration::from_millis(300));
        pg.restart();
        restarted.store(true, Ordering::SeqCst);
        pusher.join().expect("pusher")
    });
    eprintln!("{pushed} keys pushed across the restart; slowest call {slowest:?}");
    // Twenty calls after the restart, so more than 200 keys means pushes before it too.
    assert!(pushed > 200, "{pushed}");
    // A call during the outage waited for the server.
    assert!(slowest >= Duration::from_millis(100), "{slowest:?}");
    let keys = s.queue_keys(f, "default").expect("keys");
    assert_eq!(keys.len(), pushed, "every push is in the queue");
    let counts = s.item_counts(f).expect("counts");
    assert!(
        counts.contains(&(ItemStatus::NewItem, pushed as u64)),
        "{counts:?}"
    );
}

#[test]
fn calls_give_up_after_the_retry_limit_naming_the_server() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("outage");
    let mut s = PgStore::connect(&url).expect("connect");
    s.set_retry_limit(Duration::from_secs(1));
    let f = s.register_flow("f", "{}").expect("register");
    pg.stop();
    let started = Instant::now();
    let err = s.flows().expect_err("the server is down");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let text = err.to_string();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(
        text.contains(&format!("127.0.0.1:{}/outage", pg.port())) && text.contains("listing flows"),
        "{text}"
    );
    // The store works again once the server is back.
    pg.start_again();
    assert_eq!(s.flow("f").expect("flow").map(|r| r.id), Some(f));
    // SQL errors are not retried: a request the server refuses fails at once.
    let started = Instant::now();
    let err = s
        .push(f, &[new_item("nul\0key".into())], T0)
        .expect_err("PostgreSQL text holds no NUL");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(err.to_string().contains("pushing items"), "{err}");
}

/// Polls `lock.is_held()` until it turns false (it asks the server at most once a second).
fn released_within(lock: &freshindex_store::StoreLock, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !lock.is_held() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn locks_are_shared_between_stores_and_lost_with_the_server() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("locks");
    let a = PgStore::connect(&url).expect("connect a");
    let b = PgStore::connect(&url).expect("connect b");
    assert!(a.has_shared_locks());

    let held = a.try_lock("flow/docs").expect("lock").expect("free");
    assert!(held.is_held());
    assert!(b.try_lock("flow/docs").expect("try").is_none(), "held by a");
    assert!(
        a.try_lock("flow/docs").expect("try").is_none(),
        "one holder"
    );
    let other = b
        .try_lock("flow/notes")
        .expect("lock")
        .expect("another name is free");
    // Still held a second later (the session is asked).
    std::thread::sleep(Duration::from_millis(1_100));
    assert!(held.is_held() && other.is_held());

    drop(held);
    let taken = b
        .try_lock("flow/docs")
        .expect("try")
        .expect("free once dropped");

    // A restart ends the sessions: the locks are lost, and whoever asks first takes them.
    pg.restart();
    assert!(released_within(&taken, Duration::from_secs(5)));
    assert!(released_within(&other, Duration::from_secs(5)));
    let again = a
        .try_lock("flow/docs")
        .expect("try after restart")
        .expect("free after restart");
    assert!(again.is_held());
    assert!(b.try_lock("flow/docs").expect("try").is_none());

    // The embedded store has no shared locks.
    let sqlite = SqliteStore::open_in_memory().expect("sqlite");
    assert!(!sqlite.has_shared_locks());
    assert!(matches!(
        sqlite.try_lock("flow/docs"),
        Err(StoreError::Invalid(_))
    ));
}

/// A TCP proxy in front of the server that, once armed, cuts the connection that is about to
/// receive the server's reply to `COMMIT`: the transaction committed, the client cannot know.
struct CommitCutter {
    port: u16,
    armed: std::sync::Arc<AtomicBool>,
}

impl CommitCutter {
    fn start(server_port: u16) -> CommitCutter {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let armed = std::sync::Arc::new(AtomicBool::new(false));
        let armed_in = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    return;
                };
                let (mut c_in, mut s_out) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let armed = armed_in.clone();
                std::thread::spawn(move || {
                    // Forward the server's messages one by one (type byte, length, body).
                    let (mut s_in, mut c_out) = (server, client);
                    loop {
                        let mut head = [0u8; 5];
                        if s_in.read_exact(&mut head).is_err() {
                            break;
                        }
                        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
                        let mut body = vec![0u8; (len as usize).saturating_sub(4)];
                        if s_in.read_exact(&mut body).is_err() {
                            break;
                        }
                        if head[0] == b'C'
                            && body == b"COMMIT\0"
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            let _ = c_out.shutdown(Shutdown::Both);
                            let _ = s_in.shutdown(Shutdown::Both);
                            return;
                        }
                        if c_out.write_all(&head).is_err() || c_out.write_all(&body).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Both);
                });
            }
        });
        CommitCutter { port, armed }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn fired(&self) -> bool {
        !self.armed.load(Ordering::SeqCst)
    }
}

#[test]
fn a_write_whose_commit_reply_is_lost_applies_once() {
    use freshindex_store::{PollRequest, RunStore, Trigger};
    let pg = freshindex_testpg::TestPg::start();
    pg.create_database("cut");
    let proxy = CommitCutter::start(pg.port());
    let s = PgStore::connect(&format!("postgres://postgres@127.0.0.1:{}/cut", proxy.port))
        .expect("connect through the proxy");
    let f = s.register_flow("f", "{}").expect("register");

    // A new run is one more entry of the history: run twice, it would be two.
    proxy.arm();
    let run = s.begin_run(f, Trigger::Manual, T0).expect("begin run");
    assert!(proxy.fired(), "the commit reply was cut");
    let runs = s.runs(f, 10).expect("runs");
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [run]);

    // REQUEUE ends the lease: run twice, the second would be refused (no lease any more).
    s.push(f, &[new_item("a".into())], T0).expect("push");
    let polled = s
        .poll(
            f,
            &PollRequest {
                queue: None,
                limit: 1,
                statuses: vec![],
                owner: "w".into(),
                lease_ms: 60_000,
            },
            T0,
        )
        .expect("poll");
    assert_eq!(polled.len(), 1);
    proxy.arm();
    let res = s
        .push(
            f,
            &[PushItem {
                key: "a".into(),
                kind: PushKind::Type(freshindex_core::PushType::Requeue),
                payload: None,
                queue: None,
            }],
            T0 + 1,
        )
        .expect("requeue");
    assert!(proxy.fired(), "the commit reply was cut");
    assert_eq!(res, [Ok(ItemStatus::NewItem)]);
    let e = s.get(f, "a").expect("get").expect("entry").item;
    assert_eq!((e.lease_owner, e.attempts), (None, 1));
}

#[test]
fn docs_since_never_skips_past_a_write_in_flight() {
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;

    const WRITERS: usize = 4;
    const CALLS: usize = 40;
    const KEYS_PER_CALL: usize = 3;
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("docs_order");
    let s = PgStore::connect(&url).expect("connect");
    let f = s.register_flow("up", "{}").expect("register");
    s.keep_docs(f, true).expect("keep documents");
    let finished = AtomicUsize::new(0);
    let (seen, reads) = std::thread::scope(|scope| {
        for w in 0..WRITERS {
            let (url, finished) = (&url, &finished);
            scope.spawn(move || {
                let store = PgStore::connect(url).expect("writer connects");
                for call in 0..CALLS {
                    let docs: Vec<DocWrite> = (0..KEYS_PER_CALL)
                        .map(|k| {
                            let key = format!("w{w}-{call:03}-{k}");
                            let fp = key.as_bytes().to_vec();
                            (key, Some((fp, b"{}".to_vec())))
                        })
                        .collect();
                    store.put_docs(f, &docs).expect("concurrent put_docs");
                }
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        let reader = scope.spawn(|| {
            let store = PgStore::connect(&url).expect("reader connects");
            let mut mark = 0i64;
            let mut seen = HashSet::new();
            let mut reads = 0usize;
            loop {
                let all_done = finished.load(Ordering::SeqCst) == WRITERS;
                let got = store.docs_since(f, mark, 5).expect("docs_since");
                reads += 1;
                for d in &got {
                    assert!(d.seq > mark, "seq {} at or below the mark {mark}", d.seq);
                    assert!(seen.insert(d.key.clone()), "{} read twice", d.key);
                    mark = d.seq;
                }
                if all_done && got.is_empty() {
                    return (seen, reads);
                }
            }
        });
        reader.join().expect("reader")
    });
    assert_eq!(
        seen.len(),
        WRITERS * CALLS * KEYS_PER_CALL,
        "the reader saw every document ({reads} reads)"
    );
    // Every change took its own number, in one sequence without gaps.
    let all = s.docs_since(f, 0, usize::MAX).expect("all");
    let seqs: Vec<i64> = all.iter().map(|d| d.seq).collect();
    let want: Vec<i64> = (1..=(WRITERS * CALLS * KEYS_PER_CALL) as i64).collect();
    assert_eq!(seqs, want);
}

#[test]
fn a_version_1_database_gains_the_input_tables() {
    let pg = freshindex_testpg::TestPg::start();
    let url = pg.create_database("v1");
    let s = PgStore::connect(&url).expect("create");
    let f = s.register_flow("f", "{}").expect("register");
    drop(s);
    // What version 1 left: no tables of multi-input flows.
    pg.psql(
        "v1",
        "DROP TABLE freshindex.docs, freshindex.docs_kept, freshindex.deps, \
         freshindex.members, freshindex.input_marks; \
         UPDATE freshindex.meta SET value = '1' WHERE key = 'schema_version'",
    );
    let s = PgStore::connect(&url).expect("migrate");
    assert_eq!(
        pg.psql(
            "v1",
            "SELECT value FROM freshindex.meta WHERE key = 'schema_version'"
        ),
        "2"
    );
    assert_eq!(s.flow("f").expect("flow").map(|r| r.id), Some(f));
    s.put_docs(f, &[("k".into(), Some((vec![1], b"{}".to_vec())))])
        .expect("put after migrating");
    assert_eq!(s.docs_since(f, 0, 10).expect("since").len(), 1);
}
