//! The "recent changes" mode: a source that lists what changed since a saved mark. The
//! source here is an in-memory change feed (what a table with an `updated_at` column or an
//! API's change feed looks like to the engine); after every sync the target must equal a
//! from-scratch index of the feed's current state.

use std::collections::BTreeMap;
use std::sync::Mutex;

use freshindex_core::{Config, FlowSpec};
use freshindex_engine::{
    Change, ChangeKind, ChangePage, Engine, EngineError, RecentChanges, RunOptions, RunSummary,
};

/// A change feed: entries numbered from 1; the mark is the number of the last one read.
#[derive(Default)]
struct Feed {
    log: Mutex<Vec<Change>>,
    /// Fail the call that would read past this many entries (a source going away mid-sync).
    fail_after: Mutex<Option<usize>>,
    page: usize,
}

impl Feed {
    fn with_page(page: usize) -> Feed {
        Feed {
            page,
            ..Feed::default()
        }
    }

    fn upsert(&self, key: &str, version: u8, text: &str) {
        self.push(Change {
            key: key.into(),
            version: Some(vec![version]),
            kind: ChangeKind::Upsert {
                text: text.into(),
                metadata: Some(serde_json::json!({ "v": version })),
            },
        });
    }

    fn delete(&self, key: &str, version: u8) {
        self.push(Change {
            key: key.into(),
            version: Some(vec![version]),
            kind: ChangeKind::Deleted,
        });
    }

    fn push(&self, c: Change) {
        self.log.lock().expect("log").push(c);
    }

    /// The current state: the newest change of each key, deletions dropped.
    fn state(&self) -> Feed {
        let mut latest: BTreeMap<String, Change> = BTreeMap::new();
        for c in self.log.lock().expect("log").iter() {
            let newer = latest
                .get(&c.key)
                .is_none_or(|old| old.version <= c.version);
            if newer {
                latest.insert(c.key.clone(), c.clone());
            }
        }
        let out = Feed::with_page(1000);
        for c in latest.into_values() {
            if matches!(c.kind, ChangeKind::Upsert { .. }) {
                out.push(c);
            }
        }
        out
    }
}

impl RecentChanges for Feed {
    fn describe(&self) -> String {
        "test feed".into()
    }

    fn changes_since(&self, mark: Option<&str>, limit: usize) -> Result<ChangePage, EngineError> {
        let from = match mark {
            None => 0,
            Some(m) => m
                .parse::<usize>()
                .map_err(|_| EngineError::Source(format!("mark `{m}` is not a position")))?,
        };
        let log = self.log.lock().expect("log");
        if from > log.len() {
            return Err(EngineError::Source(format!(
                "mark `{from}` is past the end of the feed ({} entries)",
                log.len()
            )));
        }
        let to = (from + limit.min(self.page)).min(log.len());
        if self
            .fail_after
            .lock()
            .expect("fail")
            .is_some_and(|n| to > n)
        {
            return Err(EngineError::Source("connection reset".into()));
        }
        Ok(ChangePage {
            changes: log[from..to].to_vec(),
            mark: (to > from).then(|| to.to_string()),
            more: to < log.len(),
        })
    }
}

fn spec(name: &str) -> FlowSpec {
    let toml = format!(
        "[[flow]]\nname = \"{name}\"\nsource = {{ type = \"push\" }}\nsteps = [\n  {{ op = \"parse\" }},\n  {{ op = \"split\", chunk_size = 60, chunk_overlap = 0 }},\n  {{ op = \"embed\", model = \"builtin\" }},\n]\n"
    );
    Config::parse(&toml, None).expect("config").flows.remove(0)
}

fn export(engine: &Engine, flow: &str) -> Vec<String> {
    let mut rows = Vec::new();
    engine
        .export(flow, &mut |r| {
            let bits: Vec<u32> = r.vector.iter().map(|x| x.to_bits()).collect();
            rows.push(format!(
                "{} {} {:?} {:?} vector {:x}",
                r.key,
                r.payload.source,
                r.payload.text,
                r.payload.metadata,
                fxhash(&bits)
            ));
            Ok(())
        })
        .expect("export");
    rows
}

/// A short digest of a vector's bits (the rows compare whole; messages stay short).
fn fxhash(bits: &[u32]) -> u64 {
    bits.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Indexes the feed's current state into a new data directory: the oracle.
fn from_scratch(feed: &Feed) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let s = sync(&engine, &feed.state());
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    export(&engine, "feed")
}

fn sync(engine: &Engine, feed: &Feed) -> RunSummary {
    engine
        .sync_recent(&spec("feed"), feed, &RunOptions::default())
        .expect("sync")
}

const LONG: &str = "Otters hold hands while they sleep. They float on their backs in kelp forests. \
                    Sea otters use stones as tools to open shellfish.";

#[test]
fn syncs_follow_the_feed_exactly_and_compute_only_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let feed = Feed::with_page(2);
    feed.upsert("a", 1, LONG);
    feed.upsert("b", 1, "Herons stand still in shallow water.");
    feed.upsert("c", 1, "Kingfishers dive for small fish.");
    let s = sync(&engine, &feed);
    assert_eq!((s.items.new, s.items.failed), (3, 0), "{s:?}");
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
    let (_, stored) = engine.flow("feed").expect("flow");
    assert_eq!(stored.name, "feed");

    // Nothing new: nothing read, nothing computed.
    let s = sync(&engine, &feed);
    assert_eq!((s.items.seen, s.embeddings.computed), (0, 0), "{s:?}");

    // An edit of one sentence of `a`, a deletion, a new item, and an item changed twice.
    feed.upsert(
        "a",
        2,
        &LONG.replace("kelp forests", "kelp forests at dusk"),
    );
    feed.delete("b", 2);
    feed.upsert("d", 1, "Cormorants dry their wings in the sun.");
    feed.upsert("c", 2, "Kingfishers dive for minnows.");
    feed.upsert("c", 3, "Kingfishers nest in river banks.");
    let s = sync(&engine, &feed);
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
    assert_eq!(s.items.deleted, 1, "{s:?}");
    // The unchanged chunks of `a` come from the memo cache.
    assert!(s.embeddings.reused >= 1, "{s:?}");

    // The same content again (a source repeating itself) computes nothing.
    feed.upsert("c", 4, "Kingfishers nest in river banks.");
    feed.delete("b", 3);
    let s = sync(&engine, &feed);
    assert_eq!(s.embeddings.computed, 0, "{s:?}");
    // Only the metadata changed (`v` is 4 now): the rows are rewritten, nothing is embedded.
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
    feed.push(Change {
        key: "c".into(),
        version: Some(vec![5]),
        kind: ChangeKind::Upsert {
            text: "Kingfishers nest in river banks.".into(),
            metadata: Some(serde_json::json!({ "v": 4 })),
        },
    });
    let s = sync(&engine, &feed);
    assert_eq!((s.items.unchanged, s.embeddings.computed), (1, 0), "{s:?}");
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
}

#[test]
fn a_key_changed_several_times_within_one_page_ends_as_its_last_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let feed = Feed::with_page(100);
    feed.upsert("a", 1, LONG);
    feed.upsert("a", 2, "Short now.");
    feed.upsert("b", 1, "Herons stand still in shallow water.");
    feed.delete("b", 2);
    let s = sync(&engine, &feed);
    assert_eq!(s.items.seen, 2, "{s:?}");
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
    // And across pages, on top of what is indexed.
    feed.upsert("a", 3, LONG);
    feed.upsert("b", 3, "Herons again.");
    feed.upsert("a", 4, "Short again.");
    sync(&engine, &feed);
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
}

#[test]
fn an_older_version_cannot_bring_back_old_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let feed = Feed::with_page(10);
    feed.upsert("a", 5, "Version five of the note.");
    feed.delete("gone", 4);
    sync(&engine, &feed);
    let want = export(&engine, "feed");
    // A late, older change of `a`, and an old upsert of an item deleted at a newer version.
    feed.upsert("a", 3, "Version three, delivered late.");
    feed.upsert("gone", 2, "Should stay deleted.");
    let s = sync(&engine, &feed);
    assert_eq!(
        s.items.unchanged, 2,
        "both stale upserts are ignored: {s:?}"
    );
    assert_eq!(
        s.embeddings.computed, 1,
        "only the tombstoned item reaches the fence: {s:?}"
    );
    let got = export(&engine, "feed");
    assert_eq!(got, want, "nothing changed");
    assert!(got.iter().any(|r| r.contains("Version five")));
}

#[test]
fn a_sync_cut_short_resumes_from_the_last_committed_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let feed = Feed::with_page(2);
    for (i, animal) in ["otters", "herons", "voles", "stoats", "newts"]
        .iter()
        .enumerate()
    {
        feed.upsert(&format!("k{i}"), 1, &format!("A note about {animal}."));
    }
    *feed.fail_after.lock().expect("fail") = Some(4);
    let err = engine
        .sync_recent(&spec("feed"), &feed, &RunOptions::default())
        .expect_err("the feed fails on its third page");
    assert!(
        err.to_string().contains("test feed: connection reset"),
        "the error names the source: {err}"
    );
    // The first two pages are committed and the mark is past them.
    assert_eq!(export(&engine, "feed").len(), 4);
    let history = engine.history("feed", 10).expect("history");
    assert!(
        history[0].status.outcome() == Some(freshindex_core::Outcome::Failure),
        "{:?}",
        history[0]
    );
    assert!(
        history[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("connection reset")),
        "{:?}",
        history[0]
    );
    *feed.fail_after.lock().expect("fail") = None;
    let s = sync(&engine, &feed);
    assert_eq!(s.items.seen, 1, "only the last page is read again: {s:?}");
    assert_eq!(export(&engine, "feed"), from_scratch(&feed));
}

#[test]
fn bad_items_and_bad_marks_are_reported_and_a_reset_starts_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("engine");
    let feed = Feed::with_page(10);
    feed.upsert("ok", 1, "A fine note.");
    feed.upsert("", 1, "A note without a key.");
    let s = sync(&engine, &feed);
    assert_eq!(s.errors.len(), 1, "{s:?}");
    assert_eq!(export(&engine, "feed").len(), 1, "the good item is indexed");

    // A feed that lost its history (the mark is past its end) is an error naming the mark.
    let shorter = Feed::with_page(10);
    shorter.upsert("ok", 1, "A fine note.");
    let err = engine
        .sync_recent(&spec("feed"), &shorter, &RunOptions::default())
        .expect_err("mark past the end");
    assert!(err.to_string().contains("mark `2`"), "{err}");
    // A reset forgets the mark: the next sync reads the feed from the start.
    engine.reset("feed", false).expect("reset");
    let s = sync(&engine, &shorter);
    assert_eq!(s.items.new, 1, "{s:?}");
    assert_eq!(
        s.embeddings.computed, 0,
        "the cache survived the reset: {s:?}"
    );
    assert_eq!(export(&engine, "feed"), from_scratch(&shorter));

    // A folder flow cannot take recent changes.
    let mut files = spec("files");
    files.source = freshindex_core::SourceSpec::Files(freshindex_core::spec::FilesSource::new(
        dir.path().join("nowhere"),
    ));
    let err = engine
        .sync_recent(&files, &feed, &RunOptions::default())
        .expect_err("files flow");
    assert!(err.to_string().contains("reads a folder"), "{err}");
}
