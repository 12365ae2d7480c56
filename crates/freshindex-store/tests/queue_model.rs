//! Model-based test of the indexing queue.
//!
//! `Model` below is a small in-memory queue written from the doc comments of `ItemStore`
//! (`push`, `poll`, `heartbeat`, `unreserve`, `fence`, `list`, `queue_keys`, `queue_stats`) and
//! of `ItemChange::Upsert` / `ItemChange::Delete` — deliberately without calling
//! `freshindex_store::rules`, which is what it checks. A proptest drives random sequences of
//! operations against both the model and a real `SqliteStore` (in memory and on disk) or
//! `PgStore` (a real PostgreSQL the test starts) under an
//! injected clock, and after every operation compares every entry, every answer of the
//! operation and the derived views (`get`, `items`, `queue_keys`, `queue_stats`).
//!
//! Where the doc leaves a detail open, the model states the reading it takes (marked
//! "Reading:"); a change of the rules there is a deliberate change of this model too.

use std::collections::BTreeMap;

use freshindex_core::PushType;
use freshindex_core::queue::{DEFAULT_QUEUE, MAX_PAYLOAD_BYTES, retry_backoff_ms};
use freshindex_store::{
    BatchCommit, FenceCheck, FenceError, FlowId, FlowStore, ItemChange, ItemRecord, ItemStatus,
    ItemStore, ListRequest, PollRequest, PushItem, PushKind, PushRejection, QueueEntry, QueueStats,
    SqliteStore, StateStore,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const KEYS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const LABELS: [&str; 3] = ["A", "B", DEFAULT_QUEUE];
const OWNERS: [&str; 3] = ["w1", "w2", "w3"];
const HASHES: [&str; 3] = ["h1", "h2", "h3"];
const START_MS: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// Poll priority, lower first: ERROR > MODIFIED > NEW_ITEM > ACCEPTED > SKIPPED.
fn rank(s: ItemStatus) -> u8 {
    match s {
        ItemStatus::Error => 0,
        ItemStatus::Modified => 1,
        ItemStatus::NewItem => 2,
        ItemStatus::Accepted => 3,
        ItemStatus::Skipped => 4,
    }
}

/// One queue entry as the model sees it (everything the store reports but the message).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    status: ItemStatus,
    content: Option<String>,
    metadata: Option<String>,
    label: String,
    enqueued_at: i64,
    leased_until: Option<i64>,
    owner: Option<String>,
    attempts: u32,
    available_at: i64,
    version: Option<Vec<u8>>,
    /// A change was pushed while a live lease held the entry.
    repushed: bool,
    payload: Option<Payload>,
}

/// An opaque payload, shown by size (some are 8 KiB).
#[derive(Clone, PartialEq, Eq)]
struct Payload(Vec<u8>);

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.first() {
            Some(b) => write!(f, "{} x {b}", self.0.len()),
            None => f.write_str("empty"),
        }
    }
}

impl Entry {
    fn live(&self, now: i64) -> bool {
        matches!(self.leased_until, Some(t) if t > now)
    }

    /// A status change restarts the wait (enqueue time).
    fn set_status(&mut self, s: ItemStatus, now: i64) {
        if self.status != s {
            self.status = s;
            self.enqueued_at = now;
        }
    }

    fn release(&mut self) {
        self.leased_until = None;
        self.owner = None;
    }

    /// "A push with hashes or MODIFIED also ends any retry backoff".
    fn end_backoff(&mut self, now: i64) {
        if self.available_at > now {
            self.available_at = now;
        }
    }

    /// A push reported a change.
    fn changed(&mut self, now: i64, content_given: bool) {
        if matches!(self.status, ItemStatus::Accepted | ItemStatus::Skipped) {
            self.set_status(ItemStatus::Modified, now);
        }
        if self.live(now) {
            self.repushed = true;
            // Reading: an index under a lease that saw a change must carry "the pushed content
            // hash" to be accepted; a change pushed without a content hash has none, so the
            // latest content is unknown and no index of the leased content may accept it.
            if !content_given {
                self.content = None;
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Model {
    entries: BTreeMap<String, Entry>,
    /// Newest indexed version of each deleted item.
    tombstones: BTreeMap<String, Vec<u8>>,
}

/// What an index commits (the parts of `ItemRecord` the doc says the store reads).
#[derive(Clone, Debug)]
struct Outcome {
    failed: bool,
    content: Option<String>,
    metadata: Option<String>,
    version: Option<Vec<u8>>,
    label: String,
}

impl Model {
    fn push(
        &mut self,
        key: &str,
        kind: &PushKind,
        payload: Option<&Vec<u8>>,
        label: Option<&str>,
        now: i64,
    ) -> Result<ItemStatus, PushRejection> {
        if let Some(p) = payload
            && p.len() > MAX_PAYLOAD_BYTES
        {
            return Err(PushRejection::PayloadTooLarge {
                key: key.to_string(),
                bytes: p.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let label = label.unwrap_or(DEFAULT_QUEUE).to_string();
        let Some(e) = self.entries.get_mut(key) else {
            let (content, metadata) = match kind {
                PushKind::Hashes { content, metadata } => (content.clone(), metadata.clone()),
                PushKind::Type(PushType::Modified) => (None, None),
                PushKind::Type(_) => return Err(PushRejection::UnknownItem(key.to_string())),
            };
            // Reading: a new entry is available at once.
            self.entries.insert(
                key.to_string(),
                Entry {
                    status: ItemStatus::NewItem,
                    content,
                    metadata,
                    label,
                    enqueued_at: now,
                    leased_until: None,
                    owner: None,
                    attempts: 0,
                    available_at: now,
                    version: None,
                    repushed: false,
                    payload: payload.cloned().map(Payload),
                },
            );
            return Ok(ItemStatus::NewItem);
        };
        match kind {
            PushKind::Hashes { content, metadata } => {
                let differs = |given: &Option<String>, stored: &Option<String>| {
                    given.is_some() && given != stored
                };
                if differs(content, &e.content) || differs(metadata, &e.metadata) {
                    e.changed(now, content.is_some());
                }
                if content.is_some() {
                    e.content = content.clone();
                }
                if metadata.is_some() {
                    e.metadata = metadata.clone();
                }
                e.end_backoff(now);
            }
            PushKind::Type(PushType::Modified) => {
                e.changed(now, false);
                e.end_backoff(now);
            }
            PushKind::Type(PushType::NotModified) => {
                e.set_status(ItemStatus::Accepted, now);
                e.release();
                // Reading: NOT_MODIFIED is a successful outcome: attempts and backoff reset,
                // and a change pushed under the lease is superseded.
                e.attempts = 0;
                e.available_at = now;
                e.repushed = false;
            }
            PushKind::Type(PushType::RepositoryError) => {
                e.release();
                e.available_at = now + retry_backoff_ms(e.attempts);
            }
            PushKind::Type(PushType::Requeue) => {
                if !e.live(now) {
                    return Err(PushRejection::NotReserved(key.to_string()));
                }
                e.release();
                e.available_at = now;
            }
        }
        e.label = label;
        if let Some(p) = payload {
            e.payload = Some(Payload(p.clone()));
        }
        Ok(e.status)
    }

    fn poll(&mut self, req: &PollRequest, now: i64) -> Vec<(String, Entry)> {
        let statuses: Vec<ItemStatus> = if req.statuses.is_empty() {
            vec![ItemStatus::Error, ItemStatus::Modified, ItemStatus::NewItem]
        } else {
            req.statuses.clone()
        };
        let mut candidates: Vec<(u8, i64, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                statuses.contains(&e.status)
                    && req.queue.as_ref().is_none_or(|q| *q == e.label)
                    && !e.live(now)
                    && e.available_at <= now
            })
            .map(|(k, e)| (rank(e.status), e.enqueued_at, k.clone()))
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .take(req.limit)
            .map(|(_, _, k)| {
                let e = self.entries.get_mut(&k).expect("candidate exists");
                // Reading: the lease is at least 1 ms long.
                e.leased_until = Some(now + req.lease_ms.max(1));
                e.owner = Some(req.owner.clone());
                e.attempts += 1;
                // Reading: the poller reads the latest content, so a change pushed under an
                // earlier lease is now being handled.
                e.repushed = false;
                (k, e.clone())
            })
            .collect()
    }

    fn heartbeat(&mut self, owner: &str, until: i64, now: i64) -> u64 {
        let mut n = 0;
        for e in self.entries.values_mut() {
            if e.live(now) && e.owner.as_deref() == Some(owner) {
                e.leased_until = e.leased_until.max(Some(until));
                n += 1;
            }
        }
        n
    }

    fn unreserve(&mut self, label: Option<&str>, owner: Option<&str>, now: i64) -> u64 {
        let mut n = 0;
        for e in self.entries.values_mut() {
            if e.live(now)
                && label.is_none_or(|l| l == e.label)
                && owner.is_none_or(|o| Some(o) == e.owner.as_deref())
            {
                e.release();
                n += 1;
            }
        }
        n
    }

    fn fence(
        &self,
        key: &str,
        version: Option<&Vec<u8>>,
        owner: Option<&str>,
        now: i64,
    ) -> Result<(), FenceError> {
        let Some(e) = self.entries.get(key) else {
            if let (Some(v), Some(deleted)) = (version, self.tombstones.get(key))
                && v <= deleted
            {
                return Err(FenceError::StaleVersion {
                    key: key.to_string(),
                });
            }
            return Ok(());
        };
        if let (Some(v), Some(indexed)) = (version, &e.version)
            && v <= indexed
        {
            return Err(FenceError::StaleVersion {
                key: key.to_string(),
            });
        }
        // A caller without an owner did not poll, so there is no lease to lose; one that names
        // itself must still be the holder (its lease may have run out, but nobody may have
        // polled, indexed or unreserved the entry since).
        let _ = now;
        if let Some(o) = owner
            && e.owner.as_deref() != Some(o)
        {
            return Err(FenceError::LeaseLost {
                key: key.to_string(),
                holder: e.owner.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn index(&mut self, key: &str, out: &Outcome, now: i64) {
        let e = self
            .entries
            .entry(key.to_string())
            .or_insert_with(|| Entry {
                status: ItemStatus::NewItem,
                content: None,
                metadata: None,
                label: out.label.clone(),
                enqueued_at: now,
                leased_until: None,
                owner: None,
                attempts: 0,
                available_at: now,
                version: None,
                repushed: false,
                payload: None,
            });
        e.release();
        if out.failed {
            e.set_status(ItemStatus::Error, now);
            e.available_at = now + retry_backoff_ms(e.attempts);
        } else {
            let carries_pushed = out.content.is_some() && out.content == e.content;
            if e.repushed && !carries_pushed {
                e.set_status(ItemStatus::Modified, now);
            } else {
                e.set_status(ItemStatus::Accepted, now);
                e.content = out.content.clone();
                // Reading: the content hash becomes the indexed one, even none; a metadata hash
                // or version the record does not carry keeps the stored one (the version
                // fence only moves forward).
                if out.metadata.is_some() {
                    e.metadata = out.metadata.clone();
                }
            }
            if out.version.is_some() {
                e.version = out.version.clone();
            }
            e.attempts = 0;
            e.available_at = now;
        }
        e.repushed = false;
    }

    fn delete(&mut self, key: &str, if_queue: Option<&str>, now: i64) {
        if let (Some(e), Some(label)) = (self.entries.get_mut(key), if_queue)
            && e.label != label
        {
            e.set_status(ItemStatus::Modified, now);
            e.content = None;
            return;
        }
        if let Some(v) = self.entries.remove(key).and_then(|e| e.version) {
            let t = self.tombstones.entry(key.to_string()).or_default();
            if v > *t {
                *t = v;
            }
        }
    }

    fn stats(&self, now: i64) -> QueueStats {
        let mut s = QueueStats {
            by_status: ItemStatus::ALL
                .into_iter()
                .map(|st| {
                    let n = self.entries.values().filter(|e| e.status == st).count();
                    (st, n as u64)
                })
                .collect(),
            ..QueueStats::default()
        };
        for e in self.entries.values() {
            if e.live(now) {
                s.leased += 1;
            } else {
                if e.leased_until.is_some() {
                    s.expired += 1;
                }
                if e.available_at > now {
                    s.backing_off += 1;
                }
            }
        }
        s
    }

    fn list(&self, req: &ListRequest) -> Vec<(String, Entry)> {
        self.entries
            .iter()
            .filter(|(k, e)| {
                (req.statuses.is_empty() || req.statuses.contains(&e.status))
                    && req.queue.as_ref().is_none_or(|q| *q == e.label)
                    && req.after.as_ref().is_none_or(|a| k.as_str() > a.as_str())
            })
            .take(req.limit)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }
}

/// A store entry in the model's terms.
fn observed(q: &QueueEntry) -> (String, Entry) {
    let i = &q.item;
    (
        i.key.clone(),
        Entry {
            status: i.status,
            content: i.content_hash.clone(),
            metadata: i.metadata_hash.clone(),
            label: i.queue.clone(),
            enqueued_at: i.enqueued_at_ms,
            leased_until: i.leased_until_ms,
            owner: i.lease_owner.clone(),
            attempts: i.attempts,
            available_at: i.available_at_ms,
            version: i.version.clone(),
            repushed: i.repushed,
            payload: q.payload.clone().map(Payload),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Pick<T> {
    None,
    /// Whatever the entry currently has (lease holder, content hash, next version).
    Current,
    Fixed(T),
}

#[derive(Clone, Debug)]
struct PushOp {
    key: usize,
    /// Push to a leased entry instead (the `key`-th one), when there is one.
    to_leased: bool,
    kind: PushKind,
    payload: Option<Payload>,
    label: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Push(Vec<PushOp>),
    Poll {
        limit: usize,
        label: Option<usize>,
        statuses: Vec<ItemStatus>,
        owner: usize,
        lease_ms: i64,
    },
    /// Fence, then (if the fence allows) commit an `Upsert`.
    Index {
        key: usize,
        /// Index a leased entry instead (the `key`-th one), when there is one.
        of_leased: bool,
        owner: Pick<usize>,
        version: Pick<Vec<u8>>,
        content: Pick<&'static str>,
        metadata: Option<&'static str>,
        failed: bool,
        label: usize,
        rows: bool,
    },
    Heartbeat {
        owner: usize,
        extend_ms: i64,
    },
    Unreserve {
        label: Option<usize>,
        owner: Option<usize>,
    },
    Delete {
        key: usize,
        if_queue: Option<usize>,
    },
    /// `deleteQueueItems(label)`: the label's keys, each deleted if it still carries the label.
    DeleteQueue {
        label: usize,
    },
    List {
        statuses: Vec<ItemStatus>,
        label: Option<usize>,
        after: Option<usize>,
        limit: usize,
    },
    Advance(i64),
}

fn hash() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(prop::sample::select(&HASHES[..]))
}

fn statuses(max: usize) -> impl Strategy<Value = Vec<ItemStatus>> {
    prop::sample::subsequence(
        vec![
            ItemStatus::Error,
            ItemStatus::Modified,
            ItemStatus::NewItem,
            ItemStatus::Accepted,
        ],
        0..=max,
    )
}

fn push_op() -> impl Strategy<Value = PushOp> {
    let kind = prop_oneof![
        3 => (hash(), hash()).prop_map(|(c, m)| PushKind::Hashes {
            content: c.map(str::to_string),
            metadata: m.map(str::to_string),
        }),
        2 => prop::sample::select(PushType::ALL.to_vec()).prop_map(PushKind::Type),
    ];
    let payload = prop_oneof![
        6 => Just(None),
        3 => (0u8..4).prop_map(|b| Some(Payload(vec![b]))),
        1 => Just(Some(Payload(vec![7; MAX_PAYLOAD_BYTES]))),
        1 => Just(Some(Payload(vec![8; MAX_PAYLOAD_BYTES + 1]))),
    ];
    (
        0..KEYS.len(),
        prop::bool::weighted(0.5),
        kind,
        payload,
        prop::option::of(0..LABELS.len()),
    )
        .prop_map(|(key, to_leased, kind, payload, label)| PushOp {
            key,
            to_leased,
            kind,
            payload,
            label,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let poll = (
        1usize..=5,
        prop::option::of(0..LABELS.len()),
        statuses(4),
        0..OWNERS.len(),
        prop::sample::select(vec![1i64, 5_000, 30_000, 60_000, 600_000]),
    )
        .prop_map(|(limit, label, statuses, owner, lease_ms)| Op::Poll {
            limit,
            label,
            statuses,
            owner,
            lease_ms,
        });
    let index = (
        (0..KEYS.len(), prop::bool::weighted(0.5)),
        prop_oneof![
            1 => Just(Pick::None),
            3 => Just(Pick::Current),
            2 => (0..OWNERS.len()).prop_map(Pick::Fixed),
        ],
        prop_oneof![
            2 => Just(Pick::None),
            2 => Just(Pick::Current),
            2 => prop::collection::vec(0u8..3, 1..=2).prop_map(Pick::Fixed),
        ],
        prop_oneof![
            1 => Just(Pick::None),
            2 => Just(Pick::Current),
            2 => prop::sample::select(&HASHES[..]).prop_map(Pick::Fixed),
        ],
        hash(),
        prop::bool::weighted(0.25),
        0..LABELS.len(),
        any::<bool>(),
    )
        .prop_map(
            |((key, of_leased), owner, version, content, metadata, failed, label, rows)| {
                Op::Index {
                    key,
                    of_leased,
                    owner,
                    version,
                    content,
                    metadata,
                    failed,
                    label,
                    rows,
                }
            },
        );
    let advance = prop_oneof![
        6 => 0i64..2_000,
        3 => 4_000i64..70_000,
        1 => 70_000i64..4_000_000,
    ]
    .prop_map(Op::Advance);
    prop_oneof![
        5 => prop::collection::vec(push_op(), 1..=3).prop_map(Op::Push),
        4 => poll,
        4 => index,
        1 => (0..OWNERS.len(), 0i64..70_000)
            .prop_map(|(owner, extend_ms)| Op::Heartbeat { owner, extend_ms }),
        1 => (prop::option::of(0..LABELS.len()), prop::option::of(0..OWNERS.len()))
            .prop_map(|(label, owner)| Op::Unreserve { label, owner }),
        1 => (0..KEYS.len(), prop::option::of(0..LABELS.len()))
            .prop_map(|(key, if_queue)| Op::Delete { key, if_queue }),
        1 => (0..LABELS.len()).prop_map(|label| Op::DeleteQueue { label }),
        1 => (statuses(2), prop::option::of(0..LABELS.len()),
              prop::option::of(0..KEYS.len()), 0usize..7)
            .prop_map(|(statuses, label, after, limit)| Op::List { statuses, label, after, limit }),
        3 => advance,
    ]
}

// ---------------------------------------------------------------------------------------------
// Running operations on both
// ---------------------------------------------------------------------------------------------

struct Harness<'a> {
    store: &'a dyn StateStore,
    flow: FlowId,
    model: Model,
    now: i64,
}

fn all() -> ListRequest {
    ListRequest {
        limit: usize::MAX,
        ..ListRequest::default()
    }
}

fn commit(store: &dyn StateStore, flow: FlowId, items: Vec<ItemChange>, now_ms: i64) {
    store
        .commit(
            flow,
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

impl<'a> Harness<'a> {
    fn new(store: &'a dyn StateStore) -> Self {
        let flow = store.register_flow("f", "{}").expect("register");
        Harness {
            store,
            flow,
            model: Model::default(),
            now: START_MS,
        }
    }

    /// `KEYS[key]`, or with `leased` the `key`-th entry under a live lease (if any).
    fn key(&self, key: usize, leased: bool) -> &'static str {
        let live: Vec<&'static str> = KEYS
            .into_iter()
            .filter(|k| self.model.entries.get(*k).is_some_and(|e| e.live(self.now)))
            .collect();
        if leased && !live.is_empty() {
            live[key % live.len()]
        } else {
            KEYS[key]
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (s, f, now) = (self.store, self.flow, self.now);
        match op {
            Op::Push(items) => {
                let keys: Vec<&str> = items.iter().map(|p| self.key(p.key, p.to_leased)).collect();
                let push: Vec<PushItem> = items
                    .iter()
                    .zip(&keys)
                    .map(|(p, key)| PushItem {
                        key: key.to_string(),
                        kind: p.kind.clone(),
                        payload: p.payload.clone().map(|p| p.0),
                        queue: p.label.map(|l| LABELS[l].to_string()),
                    })
                    .collect();
                let got = s.push(f, &push, now).expect("push");
                let want: Vec<_> = items
                    .iter()
                    .zip(&keys)
                    .map(|(p, key)| {
                        self.model.push(
                            key,
                            &p.kind,
                            p.payload.as_ref().map(|p| &p.0),
                            p.label.map(|l| LABELS[l]),
                            now,
                        )
                    })
                    .collect();
                prop_assert_eq!(got, want, "push results");
            }
            Op::Poll {
                limit,
                label,
                statuses,
                owner,
                lease_ms,
            } => {
                let req = PollRequest {
                    queue: label.map(|l| LABELS[l].to_string()),
                    limit: *limit,
                    statuses: statuses.clone(),
                    owner: OWNERS[*owner].to_string(),
                    lease_ms: *lease_ms,
                };
                let got: Vec<_> = s
                    .poll(f, &req, now)
                    .expect("poll")
                    .iter()
                    .map(observed)
                    .collect();
                let want = self.model.poll(&req, now);
                prop_assert_eq!(got, want, "poll {:?}", req);
            }
            Op::Index {
                key,
                of_leased,
                owner,
                version,
                content,
                metadata,
                failed,
                label,
                rows,
            } => {
                let key = self.key(*key, *of_leased);
                let current = self.model.entries.get(key);
                let owner = match owner {
                    Pick::None => None,
                    Pick::Current => current.and_then(|e| e.owner.clone()),
                    Pick::Fixed(o) => Some(OWNERS[*o].to_string()),
                };
                let version = match version {
                    Pick::None => None,
                    // Appending a byte gives the next version up (lexicographic order).
                    Pick::Current => Some(
                        current
                            .and_then(|e| e.version.clone())
                            .map(|mut v| {
                                v.push(0);
                                v
                            })
                            .unwrap_or_else(|| vec![0]),
                    ),
                    Pick::Fixed(v) => Some(v.clone()),
                };
                let content = match content {
                    Pick::None => None,
                    Pick::Current => current.and_then(|e| e.content.clone()),
                    Pick::Fixed(h) => Some(h.to_string()),
                };
                let check = FenceCheck {
                    key: key.to_string(),
                    version: version.clone(),
                    owner: owner.clone(),
                };
                let got = s
                    .fence(f, std::slice::from_ref(&check), now)
                    .expect("fence");
                let want = self
                    .model
                    .fence(key, version.as_ref(), owner.as_deref(), now);
                prop_assert_eq!(&got, &vec![want.clone()], "fence {:?}", check);
                if want.is_ok() {
                    let status = if *failed {
                        ItemStatus::Error
                    } else {
                        ItemStatus::Accepted
                    };
                    let mut record = ItemRecord::new(key, status);
                    record.content_hash = content.clone();
                    record.metadata_hash = metadata.map(str::to_string);
                    record.version = version.clone();
                    record.message = failed.then(|| "failed".to_string());
                    record.queue = LABELS[*label].to_string();
                    // Fields the store owns: an index must ignore whatever the record says.
                    record.enqueued_at_ms = 7;
                    record.leased_until_ms = Some(now + 999_999);
                    record.lease_owner = Some("junk".into());
                    record.attempts = 42;
                    record.available_at_ms = 123;
                    record.repushed = true;
                    record.has_pending = true;
                    commit(
                        s,
                        f,
                        vec![ItemChange::Upsert {
                            record,
                            rows: rows.then(Vec::new),
                        }],
                        now,
                    );
                    self.model.index(
                        key,
                        &Outcome {
                            failed: *failed,
                            content,
                            metadata: metadata.map(str::to_string),
                            version,
                            label: LABELS[*label].to_string(),
                        },
                        now,
                    );
                }
            }
            Op::Heartbeat { owner, extend_ms } => {
                let until = now + extend_ms;
                let got = s
                    .heartbeat(f, OWNERS[*owner], until, now)
                    .expect("heartbeat");
                let want = self.model.heartbeat(OWNERS[*owner], until, now);
                prop_assert_eq!(got, want, "heartbeat count");
            }
            Op::Unreserve { label, owner } => {
                let label = label.map(|l| LABELS[l]);
                let owner = owner.map(|o| OWNERS[o]);
                let got = s.unreserve(f, label, owner, now).expect("unreserve");
                let want = self.model.unreserve(label, owner, now);
                prop_assert_eq!(got, want, "unreserve count");
            }
            Op::Delete { key, if_queue } => {
                let if_queue = if_queue.map(|l| LABELS[l]);
                commit(
                    s,
                    f,
                    vec![ItemChange::Delete {
                        key: KEYS[*key].to_string(),
                        if_queue: if_queue.map(str::to_string),
                        version: None,
                    }],
                    now,
                );
                self.model.delete(KEYS[*key], if_queue, now);
            }
            Op::DeleteQueue { label } => {
                let label = LABELS[*label];
                let keys = s.queue_keys(f, label).expect("queue keys");
                let deletes = keys
                    .iter()
                    .map(|k| ItemChange::Delete {
                        key: k.clone(),
                        if_queue: Some(label.to_string()),
                        version: None,
                    })
                    .collect();
                commit(s, f, deletes, now);
                for k in &keys {
                    self.model.delete(k, Some(label), now);
                }
            }
            Op::List {
                statuses,
                label,
                after,
                limit,
            } => {
                let req = ListRequest {
                    statuses: statuses.clone(),
                    queue: label.map(|l| LABELS[l].to_string()),
                    after: after.map(|k| KEYS[k].to_string()),
                    limit: *limit,
                };
                let got: Vec<_> = s
                    .list(f, &req)
                    .expect("list")
                    .iter()
                    .map(observed)
                    .collect();
                prop_assert_eq!(got, self.model.list(&req), "list {:?}", req);
            }
            Op::Advance(ms) => self.now += ms,
        }
        Ok(())
    }

    /// The whole queue and every derived view agree with the model.
    fn check(&self) -> Result<(), TestCaseError> {
        let (s, f, now) = (self.store, self.flow, self.now);
        let listed: Vec<_> = s
            .list(f, &all())
            .expect("list")
            .iter()
            .map(observed)
            .collect();
        let want = self.model.list(&all());
        prop_assert_eq!(&listed, &want, "entries");
        for key in KEYS {
            let got = s.get(f, key).expect("get").map(|q| observed(&q).1);
            prop_assert_eq!(got.as_ref(), self.model.entries.get(key), "get {}", key);
        }
        for label in LABELS {
            let want: Vec<String> = want
                .iter()
                .filter(|(_, e)| e.label == label)
                .map(|(k, _)| k.clone())
                .collect();
            prop_assert_eq!(
                s.queue_keys(f, label).expect("queue keys"),
                want,
                "keys of {}",
                label
            );
        }
        prop_assert_eq!(
            s.queue_stats(f, now).expect("stats"),
            self.model.stats(now),
            "queue stats"
        );
        // `items` is the same queue seen as records.
        let items = s.items(f).expect("items");
        let listed_items: Vec<ItemRecord> = s
            .list(f, &all())
            .expect("list")
            .into_iter()
            .map(|q| q.item)
            .collect();
        prop_assert_eq!(items, listed_items, "items() and list() agree");
        Ok(())
    }
}

fn run_ops(store: &dyn StateStore, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(store);
    for (i, op) in ops.iter().enumerate() {
        h.apply(op)
            .map_err(|e| TestCaseError::fail(format!("op #{i} {op:?}: {e}")))?;
        h.check()
            .map_err(|e| TestCaseError::fail(format!("after op #{i} {op:?}: {e}")))?;
    }
    Ok(())
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        // No regression files next to the sources: a failure prints the shrunk op sequence.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn in_memory_store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let store = SqliteStore::open_in_memory().expect("open");
        run_ops(&store, &ops)?;
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn file_store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("queue.sqlite");
        {
            let store = SqliteStore::open(&path).expect("open");
            run_ops(&store, &ops)?;
        }
        // Everything survives a reopen.
        let store = SqliteStore::open(&path).expect("reopen");
        let flow = store.register_flow("f", "{}").expect("register");
        let reopened = store.list(flow, &all()).expect("list");
        let again = SqliteStore::open(&path).expect("reopen twice");
        prop_assert_eq!(reopened, again.list(flow, &all()).expect("list"));
    }
}

/// The same model against PostgreSQL: one server for the test, a fresh database per case
/// (shrinking included).
#[test]
fn postgres_store_matches_the_model() {
    let pg = freshindex_testpg::TestPg::start();
    let mut runner = proptest::test_runner::TestRunner::new(config(32));
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        let i = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = pg.create_database(&format!("model{i}"));
        let store = freshindex_store::PgStore::connect(&url).expect("connect");
        run_ops(&store, &ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed scenarios (readable regressions of what the model checks)
// ---------------------------------------------------------------------------------------------

fn scenario(ops: &[Op]) {
    let store = SqliteStore::open_in_memory().expect("open");
    if let Err(e) = run_ops(&store, ops) {
        panic!("{e}");
    }
}

fn push(key: usize, kind: PushKind) -> Op {
    Op::Push(vec![PushOp {
        key,
        to_leased: false,
        kind,
        payload: None,
        label: None,
    }])
}

fn hashes(c: Option<&str>, m: Option<&str>) -> PushKind {
    PushKind::Hashes {
        content: c.map(str::to_string),
        metadata: m.map(str::to_string),
    }
}

fn poll_all(owner: usize) -> Op {
    Op::Poll {
        limit: 5,
        label: None,
        statuses: vec![],
        owner,
        lease_ms: 30_000,
    }
}

fn index_current(key: usize, content: Pick<&'static str>) -> Op {
    Op::Index {
        key,
        of_leased: false,
        owner: Pick::Current,
        version: Pick::None,
        content,
        metadata: None,
        failed: false,
        label: 2,
        rows: true,
    }
}

/// A `MODIFIED` push while the entry is leased: the worker's index of the content it read
/// (carrying the hash it had) must not make the entry `ACCEPTED`, or the change is lost.
#[test]
fn modified_push_under_lease_is_not_lost() {
    let store = SqliteStore::open_in_memory().expect("open");
    let f = store.register_flow("f", "{}").expect("register");
    let now = START_MS;
    store
        .push(
            f,
            &[PushItem {
                key: "a".into(),
                kind: hashes(Some("h1"), None),
                payload: None,
                queue: None,
            }],
            now,
        )
        .expect("push");
    let req = PollRequest {
        queue: None,
        limit: 1,
        statuses: vec![],
        owner: "w1".into(),
        lease_ms: 30_000,
    };
    assert_eq!(store.poll(f, &req, now).expect("poll").len(), 1);
    store
        .push(
            f,
            &[PushItem {
                key: "a".into(),
                kind: PushKind::Type(PushType::Modified),
                payload: None,
                queue: None,
            }],
            now + 1,
        )
        .expect("push modified");
    let mut record = ItemRecord::new("a", ItemStatus::Accepted);
    record.content_hash = Some("h1".into());
    commit(
        &store,
        f,
        vec![ItemChange::Upsert {
            record,
            rows: Some(vec![]),
        }],
        now + 2,
    );
    let e = store.get(f, "a").expect("get").expect("entry");
    assert_eq!(e.item.status, ItemStatus::Modified, "{e:?}");
    // And it is offered again.
    let again = store.poll(f, &req, now + 3).expect("poll again");
    assert_eq!(again.len(), 1);
}

#[test]
fn scenarios_match_the_model() {
    // Priority, then enqueue time, then key.
    scenario(&[
        push(3, hashes(Some("h1"), None)),
        Op::Advance(1),
        push(1, hashes(Some("h1"), None)),
        push(0, hashes(Some("h1"), None)),
        poll_all(0),
        index_current(3, Pick::Current),
        Op::Advance(10),
        push(3, hashes(Some("h2"), None)),
        Op::Advance(40_000),
        poll_all(1),
    ]);
    // Equal hashes keep an accepted entry; a different one makes it MODIFIED.
    scenario(&[
        push(0, hashes(Some("h1"), Some("h2"))),
        poll_all(0),
        index_current(0, Pick::Current),
        push(0, hashes(Some("h1"), None)),
        push(0, hashes(None, Some("h2"))),
        push(0, hashes(None, Some("h3"))),
        poll_all(1),
    ]);
    // A change pushed under a lease (with and without a content hash).
    scenario(&[
        push(0, hashes(Some("h1"), None)),
        push(1, hashes(Some("h1"), None)),
        push(2, hashes(Some("h1"), None)),
        poll_all(0),
        push(0, hashes(Some("h2"), None)),
        push(1, hashes(None, Some("h3"))),
        push(2, PushKind::Type(PushType::Modified)),
        index_current(0, Pick::Fixed("h1")),
        index_current(1, Pick::Fixed("h1")),
        index_current(2, Pick::Fixed("h1")),
        poll_all(1),
        index_current(0, Pick::Fixed("h2")),
    ]);
    // Failures back off; REPOSITORY_ERROR too; REQUEUE needs a lease; NOT_MODIFIED accepts.
    scenario(&[
        push(0, hashes(Some("h1"), None)),
        push(1, hashes(Some("h1"), None)),
        push(1, PushKind::Type(PushType::Requeue)),
        poll_all(0),
        Op::Index {
            key: 0,
            of_leased: false,
            owner: Pick::Current,
            version: Pick::None,
            content: Pick::None,
            metadata: None,
            failed: true,
            label: 0,
            rows: false,
        },
        push(1, PushKind::Type(PushType::RepositoryError)),
        poll_all(1),
        Op::Advance(30_000),
        poll_all(1),
        push(1, PushKind::Type(PushType::Requeue)),
        push(0, PushKind::Type(PushType::NotModified)),
        push(4, PushKind::Type(PushType::NotModified)),
    ]);
    // Lease loss and fencing.
    scenario(&[
        push(0, hashes(Some("h1"), None)),
        Op::Poll {
            limit: 1,
            label: None,
            statuses: vec![],
            owner: 0,
            lease_ms: 1_000,
        },
        Op::Advance(1_000),
        Op::Heartbeat {
            owner: 0,
            extend_ms: 10_000,
        },
        poll_all(1),
        Op::Index {
            key: 0,
            of_leased: false,
            owner: Pick::Fixed(0),
            version: Pick::Fixed(vec![1]),
            content: Pick::Current,
            metadata: None,
            failed: false,
            label: 2,
            rows: true,
        },
        index_current(0, Pick::Current),
        Op::Index {
            key: 0,
            of_leased: false,
            owner: Pick::None,
            version: Pick::Fixed(vec![1]),
            content: Pick::Current,
            metadata: None,
            failed: false,
            label: 2,
            rows: true,
        },
        Op::Index {
            key: 0,
            of_leased: false,
            owner: Pick::None,
            version: Pick::Fixed(vec![0]),
            content: Pick::Current,
            metadata: None,
            failed: false,
            label: 2,
            rows: true,
        },
    ]);
}
