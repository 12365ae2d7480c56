//! Push change detection for a files source: a file-system watcher (inotify through the
//! `notify` crate), debounced into batches of changed item keys.
//!
//! Watchers can drop events (a kernel queue overflow, a folder moved in from outside the tree,
//! a watch that could not be added), so a batch says when the caller must fall back to a full
//! scan (`rescan`) — and live mode also runs a periodic full scan as a safety net.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use freshindex_core::spec::FilesSource;
use globset::GlobSet;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::EngineError;
use crate::source::files::{globset, path_key};

/// Changes seen by the watcher since the last batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    /// Items that may have been created, modified or deleted, by key, with their path (files
    /// only; the caller stats each to tell which).
    pub keys: BTreeMap<String, PathBuf>,
    /// Events were lost or cannot be mapped to files (overflow, a folder created, moved or
    /// removed): only a full scan is exact.
    pub rescan: bool,
}

impl ChangeBatch {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.rescan
    }
}

/// A debounced watcher of one files source.
pub struct SourceWatcher {
    _watcher: RecommendedWatcher,
    events: Receiver<notify::Result<notify::Event>>,
    root: PathBuf,
    include: GlobSet,
    exclude: GlobSet,
    /// Folders whose events are not the source's (the data directory inside the source).
    ignore: Vec<PathBuf>,
}

impl std::fmt::Debug for SourceWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceWatcher")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl SourceWatcher {
    /// Watches `src`'s folder recursively; events under the `ignore` folders (the data
    /// directory, whose writes would otherwise wake the watcher) are dropped.
    pub fn new(src: &FilesSource, ignore: &[PathBuf]) -> Result<SourceWatcher, EngineError> {
        let include = globset("include", &src.include)?;
        let exclude = globset("exclude", &src.exclude)?;
        // Events carry canonical paths; the root must be comparable with them.
        let root = src
            .path
            .canonicalize()
            .map_err(|e| EngineError::Source(format!("source path {}: {e}", src.path.display())))?;
        let (tx, events) = channel();
        let mut watcher = notify::recommended_watcher(tx)
            .map_err(|e| EngineError::Source(format!("cannot start a file watcher: {e}")))?;
        watcher
            .watch(&root, RecursiveMode::Recursive)
            .map_err(|e| EngineError::Source(format!("cannot watch {}: {e}", root.display())))?;
        Ok(SourceWatcher {
            _watcher: watcher,
            events,
            root,
            include,
            exclude,
            ignore: ignore
                .iter()
                .filter_map(|p| p.canonicalize().ok())
                .collect(),
        })
    }

    /// Waits up to `wait` for a change, then gathers more until `quiet` passes without one or
    /// `max_delay` has passed since the first (a steady stream of writes still yields batches).
    /// `None` when nothing changed within `wait`, or when the watcher is gone.
    pub fn next_batch(
        &self,
        wait: Duration,
        quiet: Duration,
        max_delay: Duration,
    ) -> Option<ChangeBatch> {
        let mut batch = ChangeBatch::default();
        let first = match self.events.recv_timeout(wait) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
        };
        self.add(&mut batch, first);
        let started = Instant::now();
        loop {
            let left = max_delay.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            match self.events.recv_timeout(quiet.min(left)) {
                Ok(ev) => self.add(&mut batch, ev),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        (!batch.is_empty()).then_some(batch)
    }

    fn add(&self, batch: &mut ChangeBatch, event: notify::Result<notify::Event>) {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("file watcher: {e}; a full scan follows");
                batch.rescan = true;
                return;
            }
        };
        if event.need_rescan() {
            batch.rescan = true;
            return;
        }
        match event.kind {
            EventKind::Access(_) => return,
            EventKind::Any
            | EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Other => {}
        }
        for path in &event.paths {
            if self.ignore.iter().any(|i| path.starts_with(i)) {
                continue;
            }
            match self.key_of(path) {
                Some(Mapped::File(key)) => {
                    batch.keys.insert(key, path.clone());
                }
                Some(Mapped::Folder) => batch.rescan = true,
                None => {}
            }
        }
    }

    /// The item key of an event path under the root: a file the patterns select, or a folder
    /// (whose files the event does not list).
    fn key_of(&self, path: &Path) -> Option<Mapped> {
        let rel = path.strip_prefix(&self.root).ok()?;
        if rel.as_os_str().is_empty() {
            return Some(Mapped::Folder);
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => return Some(Mapped::Folder),
            // A path that is gone may have been a folder: its files' keys share its prefix, so
            // only a scan can tell. A gone path the patterns select is taken as a file.
            Err(_) if !self.selects(rel) => return Some(Mapped::Folder),
            Ok(_) | Err(_) => {}
        }
        if !self.selects(rel) {
            return None;
        }
        Some(Mapped::File(path_key(rel).0))
    }

    fn selects(&self, rel: &Path) -> bool {
        self.include.is_match(rel) && !self.exclude.is_match(rel)
    }
}

enum Mapped {
    File(String),
    Folder,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path) -> FilesSource {
        FilesSource::new(dir.to_path_buf())
    }

    /// Waits for a batch that satisfies `done`, merging batches (events may arrive split).
    fn collect(w: &SourceWatcher, done: impl Fn(&ChangeBatch) -> bool) -> ChangeBatch {
        let mut all = ChangeBatch::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&all) && Instant::now() < deadline {
            if let Some(b) = w.next_batch(
                Duration::from_millis(200),
                Duration::from_millis(50),
                Duration::from_millis(500),
            ) {
                all.keys.extend(b.keys);
                all.rescan |= b.rescan;
            }
        }
        all
    }

    #[test]
    fn created_edited_and_deleted_files_come_back_as_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/old.md"), "old").expect("write");
        let w = SourceWatcher::new(&source(dir.path()), &[]).expect("watch");
        std::fs::write(dir.path().join("a.md"), "a").expect("write");
        std::fs::write(dir.path().join("sub/old.md"), "edited").expect("write");
        std::fs::write(dir.path().join("ignored.bin"), "x").expect("write");
        let b = collect(&w, |b| {
            b.keys.contains_key("a.md") && b.keys.contains_key("sub/old.md")
        });
        assert!(b.keys.contains_key("a.md"), "{b:?}");
        assert!(b.keys.contains_key("sub/old.md"), "{b:?}");
        assert!(
            !b.keys.contains_key("ignored.bin"),
            "patterns filter keys: {b:?}"
        );
        std::fs::remove_file(dir.path().join("a.md")).expect("rm");
        let b = collect(&w, |b| b.keys.contains_key("a.md"));
        assert_eq!(b.keys.keys().collect::<Vec<_>>(), ["a.md"], "{b:?}");
    }

    #[test]
    fn a_folder_moved_in_asks_for_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(outside.path().join("docs")).expect("mkdir");
        std::fs::write(outside.path().join("docs/x.md"), "x").expect("write");
        let w = SourceWatcher::new(&source(dir.path()), &[]).expect("watch");
        std::fs::rename(outside.path().join("docs"), dir.path().join("docs")).expect("mv");
        let b = collect(&w, |b| b.rescan);
        assert!(b.rescan, "{b:?}");
    }

    #[test]
    fn events_under_ignored_folders_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join(".data");
        std::fs::create_dir(&data).expect("mkdir");
        let w =
            SourceWatcher::new(&source(dir.path()), std::slice::from_ref(&data)).expect("watch");
        std::fs::create_dir(data.join("collections")).expect("mkdir");
        std::fs::write(data.join("notes.md"), "x").expect("write");
        assert_eq!(
            w.next_batch(
                Duration::from_millis(300),
                Duration::from_millis(20),
                Duration::from_millis(100)
            ),
            None
        );
    }

    #[test]
    fn quiet_sources_yield_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = SourceWatcher::new(&source(dir.path()), &[]).expect("watch");
        assert_eq!(
            w.next_batch(
                Duration::from_millis(100),
                Duration::from_millis(20),
                Duration::from_millis(100)
            ),
            None
        );
    }
}
