//! The "recent changes" mode of change detection (seed 002): a source that can list what
//! changed since a saved high-water mark — a table with an `updated_at` column, an API with a
//! change feed — is asked only for that, instead of being listed in full.
//!
//! It is cheap, but blind to deletions the source does not report (a row deleted outright
//! leaves no trace after the mark), so a flow in this mode keeps a periodic full scan as a
//! safety net, as live mode does. The mark is opaque to the engine: the source makes it and
//! reads it back; the state store keeps it per flow and forgets it on a reset.
//!
//! Delivery is at least once: the mark is saved after the changes before it are committed,
//! so a crash between the two makes the next sync see those changes again, which costs
//! nothing (the memo cache and the lineage diff make re-indexing the same content a no-op).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use freshindex_core::queue::{DEFAULT_QUEUE, check_key};
use freshindex_core::{Fingerprint, FlowSpec, ItemStatus};
use freshindex_store::ItemRecord;

use crate::process::{Ctx, Work, content_hash};
use crate::run::{RunOptions, now_ms};
use crate::summary::{Issue, RunSummary};
use crate::{Engine, EngineError};

/// Most changes one page holds, at most (a source may return fewer).
pub const MAX_PAGE: usize = 1024;

/// What became of one item.
#[derive(Clone, Debug, PartialEq)]
pub enum ChangeKind {
    /// Its content now (new or changed), with metadata stored on its rows.
    Upsert {
        /// The text to index.
        text: String,
        /// Returned by search with every row of the item.
        metadata: Option<serde_json::Value>,
    },
    /// The source reports it deleted (a soft-delete flag, a tombstone in a change feed).
    Deleted,
    /// The source holds it in a shape that cannot be indexed (a missing or mistyped content
    /// value): recorded as a failed item with `error`, its rows kept, and tried again when
    /// it changes or the next full scan of the source finds it. A change whose key is empty
    /// (a row without a key) is only reported.
    Invalid {
        /// What is wrong, naming the item and the field.
        error: String,
    },
}

/// One changed item.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The item key.
    pub key: String,
    /// The item's version at the source (a row version, a modification time), compared as
    /// bytes: a change older than what is indexed is ignored (fencing), so a source that
    /// repeats itself or reorders cannot bring back old content. `None`: no fencing.
    pub version: Option<Vec<u8>>,
    /// What changed.
    pub kind: ChangeKind,
}

/// A page of changes, in the order the source made them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangePage {
    /// The changes.
    pub changes: Vec<Change>,
    /// The mark after the last change of this page: the next call starts from it. `None`
    /// keeps the previous mark (nothing changed).
    pub mark: Option<String>,
    /// Whether more changes are ready now (the sync asks again at once).
    pub more: bool,
}

/// A source that lists what changed since a mark.
pub trait RecentChanges: Send + Sync {
    /// Names the source in messages (`table public.docs`, `https://…/changes`).
    fn describe(&self) -> String;

    /// The changes after `mark` (`None`: from the beginning), oldest first, at most `limit`.
    /// A mark the source no longer understands is an error naming it; the caller then
    /// resets the flow (a full reprocess) rather than guess.
    fn changes_since(&self, mark: Option<&str>, limit: usize) -> Result<ChangePage, EngineError>;
}

impl Engine {
    /// Brings a flow up to date with the recent changes of `source`: pages of changes after
    /// the flow's saved mark, each processed (chunks, embeddings through the memo cache, the
    /// target) and committed before the mark moves past it. Recorded in the flow's history
    /// with `opts.trigger`.
    ///
    /// The flow's items come from `source`, so its spec must not read a folder (a push flow,
    /// or a flow over a database source).
    pub fn sync_recent(
        &self,
        spec: &FlowSpec,
        source: &dyn RecentChanges,
        opts: &RunOptions<'_>,
    ) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        if spec.files().is_some() {
            return Err(EngineError::Config(format!(
                "flow `{}` reads a folder; recent changes come from a source that lists them ({})",
                spec.name,
                source.describe()
            )));
        }
        crate::run::check_steps(spec)?;
        let _lock = self.lock(&spec.name)?;
        let flow = self.register(spec)?;
        let summary = self.recorded(flow, opts.trigger, now_ms(), || {
            // No lease holder: changes are fenced by version only.
            let ctx = self.ctx(flow, spec, opts.progress, None)?;
            self.sync_pages(&ctx, source)?;
            ctx.into_summary(started)
        })?;
        if let Some(c) = spec.target.collection() {
            self.after_write(c);
        }
        Ok(summary)
    }

    /// The pages of changes after the flow's mark, each processed and committed before the
    /// mark moves past it. The caller holds the flow's run lock. Returns the keys of the
    /// changes read.
    pub(crate) fn sync_pages(
        &self,
        ctx: &Ctx<'_>,
        source: &dyn RecentChanges,
    ) -> Result<HashSet<String>, EngineError> {
        let store = self.store().as_ref();
        let mut mark = store.change_mark(ctx.flow)?;
        let mut read = HashSet::new();
        loop {
            let page = source
                .changes_since(mark.as_deref(), MAX_PAGE)
                .map_err(|e| match e {
                    EngineError::Source(m) => {
                        EngineError::Source(format!("{}: {m}", source.describe()))
                    }
                    e => e,
                })?;
            read.extend(page.changes.iter().map(|c| c.key.clone()));
            self.apply_changes(ctx, page.changes)?;
            if let Some(m) = page.mark {
                store.set_change_mark(ctx.flow, Some(&m))?;
                mark = Some(m);
            }
            if !page.more {
                return Ok(read);
            }
        }
    }

    /// Processes one batch of changes (the newest of each key; those older than what is
    /// indexed are skipped) and commits it.
    pub(crate) fn apply_changes(
        &self,
        ctx: &Ctx<'_>,
        changes: Vec<Change>,
    ) -> Result<(), EngineError> {
        let store = self.store().as_ref();
        let flow = ctx.flow;
        let changes = newest_per_key(changes);
        let mut work = Vec::with_capacity(changes.len());
        let mut issues = Vec::new();
        let mut stale = 0u64;
        let mut keyless = 0u64;
        for change in changes {
            if let Err(e) = check_key(&change.key) {
                match change.kind {
                    // A row without a usable key: reported, counted, nothing stored.
                    ChangeKind::Invalid { error } => {
                        keyless += 1;
                        let item = if change.key.is_empty() {
                            NO_KEY.to_string()
                        } else {
                            change.key
                        };
                        issues.push(Issue::error(item, error));
                    }
                    ChangeKind::Upsert { .. } | ChangeKind::Deleted => {
                        issues.push(Issue::error(change.key.clone(), e));
                    }
                }
                continue;
            }
            let existing = store.get(flow, &change.key)?.map(|e| e.item);
            // Older than what is indexed: skipped before any work (the fence in the write
            // refuses it anyway, and catches deleted items' tombstones).
            let indexed = existing.as_ref().and_then(|e| e.version.as_ref());
            if let (Some(old), Some(new)) = (indexed, change.version.as_ref())
                && new <= old
            {
                stale += 1;
                continue;
            }
            let queue = existing
                .as_ref()
                .map_or_else(|| DEFAULT_QUEUE.to_string(), |e| e.queue.clone());
            work.push(match change.kind {
                ChangeKind::Deleted => Work::Gone {
                    existed: existing.is_some(),
                    key: change.key,
                    if_queue: None,
                    version: change.version,
                    warning: None,
                },
                ChangeKind::Invalid { error } => {
                    let mut record = ItemRecord::new(&change.key, ItemStatus::Error);
                    record.message = Some(error.clone());
                    // Unversioned, so that the next full scan of the source finds it
                    // different and tries it again.
                    record.version = None;
                    record.queue = queue;
                    Work::Failed { record, error }
                }
                ChangeKind::Upsert { text, metadata } => {
                    let hash = content_hash(&ctx.spec_fp, text.as_bytes());
                    let meta_hash = metadata
                        .as_ref()
                        .map(|m| Fingerprint::of(m.to_string().as_bytes()).hex_prefix(32));
                    let same = existing.as_ref().is_some_and(|e| {
                        e.status == ItemStatus::Accepted
                            && e.content_hash.as_deref() == Some(hash.as_str())
                            && e.metadata_hash == meta_hash
                    });
                    let mut record = ItemRecord::new(&change.key, ItemStatus::Accepted);
                    record.content_hash = Some(hash);
                    record.metadata_hash = meta_hash;
                    record.version = change.version;
                    record.queue = queue;
                    Work::Text {
                        is_new: existing.is_none(),
                        record,
                        // Same content as indexed: only the entry is recorded.
                        text: (!same).then_some(text),
                        metadata,
                    }
                }
            });
        }
        {
            let mut tally = ctx.tally();
            tally.summary.items.seen += work.len() as u64 + stale + keyless;
            tally.summary.items.unchanged += stale;
            tally.summary.items.failed += keyless;
            tally.issues(&issues);
        }
        // Changes older than what is indexed are refused by the fence: that is the point of
        // versions, not an error.
        let stale = ctx.process(work)?;
        ctx.tally().summary.items.unchanged += stale.len() as u64;
        Ok(())
    }
}

/// The item named in the error of a changed row that has no key.
pub const NO_KEY: &str = "(row without a key)";

/// One change per key: a page may hold several changes of one item (a row updated twice),
/// and one batch must not process an item twice against the same stored lineage. The newest
/// wins: the later one in the page, unless its version is older than the earlier one's.
fn newest_per_key(changes: Vec<Change>) -> Vec<Change> {
    let mut at: HashMap<String, usize> = HashMap::with_capacity(changes.len());
    let mut out: Vec<Change> = Vec::with_capacity(changes.len());
    for c in changes {
        match at.get(&c.key) {
            Some(&i) => {
                let older = match (&c.version, &out[i].version) {
                    (Some(new), Some(old)) => new < old,
                    _ => false,
                };
                if !older {
                    out[i] = c;
                }
            }
            None => {
                at.insert(c.key.clone(), out.len());
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, version: Option<u8>, text: &str) -> Change {
        Change {
            key: key.into(),
            version: version.map(|v| vec![v]),
            kind: ChangeKind::Upsert {
                text: text.into(),
                metadata: None,
            },
        }
    }

    #[test]
    fn the_newest_change_of_a_key_wins_within_a_page() {
        let page = vec![
            change("a", Some(1), "a1"),
            change("b", None, "b1"),
            change("a", Some(3), "a3"),
            change("a", Some(2), "a2 late"),
            change("b", None, "b2"),
            Change {
                key: "c".into(),
                version: Some(vec![1]),
                kind: ChangeKind::Deleted,
            },
        ];
        let kept = newest_per_key(page);
        let texts: Vec<(String, Option<String>)> = kept
            .iter()
            .map(|c| {
                let text = match &c.kind {
                    ChangeKind::Upsert { text, .. } => Some(text.clone()),
                    ChangeKind::Deleted | ChangeKind::Invalid { .. } => None,
                };
                (c.key.clone(), text)
            })
            .collect();
        assert_eq!(
            texts,
            [
                ("a".to_string(), Some("a3".to_string())),
                ("b".to_string(), Some("b2".to_string())),
                ("c".to_string(), None),
            ]
        );
    }
}
