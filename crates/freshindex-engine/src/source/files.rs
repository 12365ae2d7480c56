//! The files source: a full scan of a folder (walk + stat), and reading one file.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use freshindex_core::spec::FilesSource;

use crate::{EngineError, Issue};

/// One file the scan listed.
#[derive(Clone, Debug, PartialEq)]
pub struct ScannedFile {
    /// Item key: the path relative to the root, `/`-separated; bytes of a non-UTF-8 name are
    /// written as `\xNN`.
    pub key: String,
    /// Full path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// A regular file (not a FIFO, socket or device).
    pub regular: bool,
}

impl ScannedFile {
    /// A listed file from its `stat`.
    pub fn from_metadata(key: String, path: PathBuf, m: &std::fs::Metadata) -> ScannedFile {
        ScannedFile {
            key,
            path,
            size: m.len(),
            mtime_ns: mtime_ns(m),
            regular: m.is_file(),
        }
    }

    /// Stats `path` (following symbolic links when `follow`).
    pub fn stat(key: String, path: PathBuf, follow: bool) -> std::io::Result<(ScannedFile, bool)> {
        let m = if follow {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }?;
        let is_dir = m.is_dir();
        Ok((ScannedFile::from_metadata(key, path, &m), is_dir))
    }
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Matching files, sorted by key.
    pub files: Vec<ScannedFile>,
    /// Warnings and errors about particular paths.
    pub issues: Vec<Issue>,
    /// Keys of entries that could not be stat-ed and prefixes (`dir/`) of folders that could
    /// not be listed: items there are neither seen nor known to be deleted.
    pub unlisted: Vec<String>,
}

/// Modification time in ns since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

pub(crate) fn globset(field: &str, patterns: &[String]) -> Result<GlobSet, EngineError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| {
            EngineError::Config(format!("source.{field}: invalid pattern `{p}`: {e}"))
        })?;
        b.add(g);
    }
    b.build()
        .map_err(|e| EngineError::Config(format!("source.{field}: {e}")))
}

/// Turns a relative path into an item key. Returns the key and whether the name was valid
/// UTF-8.
pub fn path_key(rel: &Path) -> (String, bool) {
    let mut key = String::new();
    let mut valid = true;
    for (i, comp) in rel.components().enumerate() {
        if i > 0 {
            key.push('/');
        }
        let bytes = comp.as_os_str().as_bytes();
        for chunk in bytes.utf8_chunks() {
            // A literal backslash is escaped too, so that no two names share a key.
            for part in chunk.valid().split_inclusive('\\') {
                match part.strip_suffix('\\') {
                    Some(head) => {
                        key.push_str(head);
                        key.push_str("\\x5C");
                    }
                    None => key.push_str(part),
                }
            }
            for b in chunk.invalid() {
                valid = false;
                key.push_str(&format!("\\x{b:02X}"));
            }
        }
    }
    (key, valid)
}

/// A `stat` of a listed entry failed. Only "not found" means the entry is gone; any other
/// error (permissions, I/O) leaves its items as they are, neither seen nor deleted.
fn stat_failed(out: &mut Scan, key: String, e: std::io::Error) {
    if e.kind() == std::io::ErrorKind::NotFound {
        out.issues.push(Issue::warning(
            key,
            format!("vanished during the scan: {e}"),
        ));
    } else {
        out.unlisted.push(format!("{key}/"));
        out.unlisted.push(key.clone());
        out.issues
            .push(Issue::error(key, format!("cannot stat: {e}")));
    }
}

/// A folder still to list during a scan.
struct PendingDir {
    path: PathBuf,
    /// Item-key prefix of its entries ("" for the root).
    key: String,
    /// Every byte of the names on the way here was valid UTF-8.
    valid: bool,
    /// (device, inode) and path of each folder from the root down to this one, to detect
    /// symlink loops.
    ancestors: Vec<((u64, u64), PathBuf)>,
}

/// Lists every file of `src` that matches its include patterns and not its exclude patterns,
/// with its size and modification time. Folders whose (device, inode) is in `skip_dirs` (the
/// data directory) are not entered.
///
/// A hand-written walk rather than a walking crate: the entry type comes from the directory
/// listing, so a file costs exactly one `stat` and files the patterns reject cost none, which
/// keeps a no-op refresh close to the cost of listing the tree.
pub fn scan(src: &FilesSource, skip_dirs: &[(u64, u64)]) -> Result<Scan, EngineError> {
    let root = &src.path;
    let root_meta = std::fs::metadata(root)
        .map_err(|e| EngineError::Source(format!("source path {}: {e}", root.display())))?;
    if !root_meta.is_dir() {
        return Err(EngineError::Source(format!(
            "source path {} is not a folder",
            root.display()
        )));
    }
    let include = globset("include", &src.include)?;
    let exclude = globset("exclude", &src.exclude)?;
    let mut out = Scan::default();
    let mut stack = vec![PendingDir {
        path: root.clone(),
        key: String::new(),
        valid: true,
        ancestors: vec![((root_meta.dev(), root_meta.ino()), root.clone())],
    }];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir.path) {
            Ok(rd) => rd,
            Err(e) if dir.key.is_empty() => {
                return Err(EngineError::Source(format!(
                    "source path {}: cannot list: {e}",
                    root.display()
                )));
            }
            Err(e) => {
                out.issues.push(Issue::error(
                    dir.key.clone(),
                    format!("cannot list folder: {e}"),
                ));
                out.unlisted.push(format!("{}/", dir.key));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.issues.push(Issue::error(
                        dir.key.clone(),
                        format!("cannot list folder: {e}"),
                    ));
                    out.unlisted.push(format!("{}/", dir.key));
                    break;
                }
            };
            let name = entry.file_name();
            let (name_key, name_valid) = path_key(Path::new(&name));
            let key = if dir.key.is_empty() {
                name_key
            } else {
                format!("{}/{name_key}", dir.key)
            };
            let valid = dir.valid && name_valid;
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) => {
                    stat_failed(&mut out, key, e);
                    continue;
                }
            };
            // Symbolic links are followed (or ignored) here; everything else is typed by the
            // listing itself.
            let mut meta = None;
            let is_dir = if file_type.is_symlink() {
                if !src.follow_symlinks {
                    continue;
                }
                match std::fs::metadata(entry.path()) {
                    Ok(m) => {
                        let d = m.is_dir();
                        meta = Some(m);
                        d
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if include.is_match(&key) {
                            out.issues.push(Issue::warning(
                                key,
                                format!("cannot follow symlink (broken link?): {e}"),
                            ));
                        }
                        continue;
                    }
                    Err(e) => {
                        stat_failed(&mut out, key, e);
                        continue;
                    }
                }
            } else {
                file_type.is_dir()
            };
            if is_dir {
                if exclude.is_match(&key) || exclude.is_match(format!("{key}/")) {
                    continue;
                }
                let path = entry.path();
                let m = match meta {
                    Some(m) => m,
                    None => match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) => {
                            stat_failed(&mut out, key, e);
                            continue;
                        }
                    },
                };
                let id = (m.dev(), m.ino());
                if skip_dirs.contains(&id) {
                    continue;
                }
                if let Some((_, ancestor)) = dir.ancestors.iter().find(|(a, _)| *a == id) {
                    out.issues.push(Issue::warning(
                        key,
                        format!(
                            "symlink loop: points to its ancestor {}; not followed",
                            ancestor.display()
                        ),
                    ));
                    continue;
                }
                let mut ancestors = dir.ancestors.clone();
                ancestors.push((id, path.clone()));
                stack.push(PendingDir {
                    path,
                    key,
                    valid,
                    ancestors,
                });
                continue;
            }
            if !include.is_match(&key) || exclude.is_match(&key) {
                continue;
            }
            let m = match meta {
                Some(m) => m,
                None => match entry.metadata() {
                    Ok(m) => m,
                    Err(e) => {
                        stat_failed(&mut out, key, e);
                        continue;
                    }
                },
            };
            if !valid {
                out.issues.push(Issue::warning(
                    key.clone(),
                    format!("file name is not valid UTF-8; indexed as `{key}`"),
                ));
            }
            out.files
                .push(ScannedFile::from_metadata(key, entry.path(), &m));
        }
    }
    out.files.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// The content of one file and the metadata that goes with it.
#[derive(Debug)]
pub struct ReadFile {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Size after reading.
    pub size: u64,
    /// Modification time after reading.
    pub mtime_ns: i64,
    /// The file changed between the scan and the read (metadata differ from the listing).
    pub changed_since_scan: bool,
    /// The file changed while it was being read.
    pub changed_during_read: bool,
    /// The metadata is too close to the current time to be trusted by the next scan.
    pub racy: bool,
}

/// How recent a modification must be for size + mtime to be untrusted (covers coarse
/// file-system timestamps).
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Reading a file failed.
#[derive(Debug)]
pub enum ReadError {
    /// The file no longer exists.
    Vanished(std::io::Error),
    /// Larger than the cap (checked on the open handle, the listing may be stale).
    TooLarge(u64),
    /// Not a regular file any more (replaced by a FIFO, socket or device after the listing).
    NotRegular,
    /// Any other I/O error.
    Io(std::io::Error),
}

/// Reads a listed file, detecting changes since the listing and during the read.
pub fn read(file: &ScannedFile, max_size: u64) -> Result<ReadFile, ReadError> {
    use std::io::Read;
    let map = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReadError::Vanished(e)
        } else {
            ReadError::Io(e)
        }
    };
    // Non-blocking, so that a FIFO swapped in after the listing cannot hang the run; the type
    // is checked on the open handle.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&file.path)
        .map_err(map)?;
    let before = f.metadata().map_err(map)?;
    if !before.is_file() {
        return Err(ReadError::NotRegular);
    }
    if before.len() > max_size {
        return Err(ReadError::TooLarge(before.len()));
    }
    let mut bytes = Vec::with_capacity(before.len() as usize);
    // A file growing while it is read stops at the cap.
    (&mut f)
        .take(max_size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(map)?;
    if bytes.len() as u64 > max_size {
        return Err(ReadError::TooLarge(bytes.len() as u64));
    }
    let after = f.metadata().map_err(map)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let (m0, m1) = (mtime_ns(&before), mtime_ns(&after));
    let changed_during_read =
        m0 != m1 || before.len() != after.len() || bytes.len() as u64 != after.len();
    Ok(ReadFile {
        size: after.len(),
        mtime_ns: m1,
        changed_since_scan: m0 != file.mtime_ns || before.len() != file.size,
        changed_during_read,
        racy: changed_during_read || now - m1 < RACY_WINDOW_NS,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn keys_escape_invalid_bytes() {
        let p = Path::new(OsStr::from_bytes(b"dir/bad\xffname.md"));
        assert_eq!(path_key(p), ("dir/bad\\xFFname.md".to_string(), false));
        assert_eq!(path_key(Path::new("a/b.md")), ("a/b.md".to_string(), true));
        // A name that spells an escape literally does not collide with the escaped byte.
        assert_eq!(
            path_key(Path::new("a\\xFF.md")),
            ("a\\x5CxFF.md".to_string(), true)
        );
        assert_ne!(
            path_key(Path::new("a\\xFF.md")).0,
            path_key(Path::new(OsStr::from_bytes(b"a\xff.md"))).0
        );
    }
}
