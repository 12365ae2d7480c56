//! The append log: how a collection's growing segment is made durable.
//!
//! A file starts with a header (magic `FIWAL001`, then the log's generation as a u64, little
//! endian) followed by records, each framed as:
//!
//! ```text
//! [len: u32 LE][checksum: 8 bytes][payload: len bytes]
//! ```
//!
//! where the checksum is the first 8 bytes of BLAKE3 over the length field and the payload.
//! [`AppendLog::append`] writes a group of records and fsyncs before it returns: that is the
//! commit, and an acknowledged write survives a crash. A crash during an append leaves a torn
//! tail (a partial record, or one whose checksum does not match); [`AppendLog::open`] replays
//! the records before it, reports what it dropped, and truncates the file there so that new
//! appends follow the last good record. Records are opaque bytes to the log.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Result, VectorError};

/// File magic of an append log, version 1.
const MAGIC: &[u8; 8] = b"FIWAL001";
const HEADER_LEN: u64 = 16;
const FRAME_LEN: usize = 12;
/// A record longer than this is taken for a corrupt length field, not allocated.
pub const MAX_RECORD: usize = 256 << 20;

/// What [`AppendLog::open`] dropped at the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Byte offset of the first record that was not intact (the file is cut there).
    pub offset: u64,
    /// Bytes dropped.
    pub dropped: u64,
    /// Why the record was not taken.
    pub why: String,
}

/// The records of a log found on open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The generation the log was created with.
    pub generation: u64,
    /// The intact records, in append order.
    pub records: Vec<Vec<u8>>,
    /// A torn or corrupt tail that was dropped.
    pub torn: Option<TornTail>,
}

/// An append-only, checksummed, fsynced log of records.
#[derive(Debug)]
pub struct AppendLog {
    file: File,
    path: PathBuf,
    len: u64,
    generation: u64,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> VectorError {
    VectorError::Storage {
        collection: path.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

fn checksum(len: &[u8; 4], payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(len);
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// Fsyncs the folder holding `path`, so that a created or renamed file's entry is durable.
pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        let d = File::open(dir).map_err(|e| io_err(dir, "opening the folder", e))?;
        d.sync_all()
            .map_err(|e| io_err(dir, "syncing the folder", e))?;
    }
    Ok(())
}

impl AppendLog {
    /// Creates an empty log at `path` (replacing any file there), durably.
    pub fn create(path: &Path, generation: u64) -> Result<AppendLog> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "creating", e))?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&generation.to_le_bytes());
        file.write_all(&header)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(path, "writing the header", e))?;
        sync_dir(path)?;
        Ok(AppendLog {
            file,
            path: path.to_path_buf(),
            len: HEADER_LEN,
            generation,
        })
    }

    /// Reads a log without changing it: its intact records, and the torn tail a reader would
    /// drop (a writer's append in progress looks the same to another process).
    pub fn read(path: &Path) -> Result<Replay> {
        let bytes = std::fs::read(path).map_err(|e| io_err(path, "reading", e))?;
        Ok(parse(path, &bytes)?.0)
    }

    /// Opens an existing log: replays its intact records, and cuts off a torn tail.
    pub fn open(path: &Path) -> Result<(AppendLog, Replay)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "opening", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_err(path, "reading", e))?;
        let (replay, at) = parse(path, &bytes)?;
        let generation = replay.generation;
        let torn = replay.torn.is_some();
        let len = at as u64;
        if torn {
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err(path, "cutting the torn tail", e))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| io_err(path, "seeking", e))?;
        Ok((
            AppendLog {
                file,
                path: path.to_path_buf(),
                len,
                generation,
            },
            replay,
        ))
    }

    /// Appends `records` and fsyncs: once this returns, they survive a crash. On an error
    /// the log is cut back to where it was, so that a failed append leaves no partial
    /// record behind a later one.
    pub fn append(&mut self, records: &[&[u8]]) -> Result<()> {
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.len() + FRAME_LEN).sum());
        for r in records {
            if r.len() > MAX_RECORD {
                return Err(VectorError::Storage {
                    collection: self.path.display().to_string(),
                    message: format!(
                        "a record of {} bytes is over the limit of {MAX_RECORD}",
                        r.len()
                    ),
                });
            }
            let len = (r.len() as u32).to_le_bytes();
            buf.extend_from_slice(&len);
            buf.extend_from_slice(&checksum(&len, r));
            buf.extend_from_slice(r);
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(io_err(&self.path, "appending", e));
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Size of the file in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The generation the log was created with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether `bytes` starts with an intact record.
fn intact_at(bytes: &[u8]) -> bool {
    if bytes.len() < FRAME_LEN {
        return false;
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&bytes[..4]);
    let n = u32::from_le_bytes(len) as usize;
    n <= MAX_RECORD
        && bytes.len() >= FRAME_LEN + n
        && checksum(&len, &bytes[FRAME_LEN..FRAME_LEN + n]) == bytes[4..12]
}

/// Parses a log's bytes: the replay, and the offset where the intact records end.
fn parse(path: &Path, bytes: &[u8]) -> Result<(Replay, usize)> {
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
        return Err(VectorError::Storage {
            collection: path.display().to_string(),
            message: "not an append log (bad header); it was not written by this program or was cut before its header".into(),
        });
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&bytes[8..16]);
    let generation = u64::from_le_bytes(generation);
    let mut records = Vec::new();
    let mut at = HEADER_LEN as usize;
    let mut torn = None;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let why = if rest.len() < FRAME_LEN {
            Some(format!("{} bytes, less than a record frame", rest.len()))
        } else {
            let mut len = [0u8; 4];
            len.copy_from_slice(&rest[..4]);
            let n = u32::from_le_bytes(len) as usize;
            if n > MAX_RECORD {
                Some(format!("record length {n} is over the limit"))
            } else if rest.len() < FRAME_LEN + n {
                Some(format!(
                    "record of {n} bytes cut after {}",
                    rest.len() - FRAME_LEN
                ))
            } else if checksum(&len, &rest[FRAME_LEN..FRAME_LEN + n]) != rest[4..12] {
                // A torn append leaves nothing intact after it (one fsynced append at a time):
                // an intact record right after a damaged one is damage in the middle of
                // acknowledged data, which truncating would throw away.
                if intact_at(&rest[FRAME_LEN + n..]) {
                    return Err(VectorError::Storage {
                        collection: path.display().to_string(),
                        message: format!(
                            "the record at byte {at} is damaged but intact records follow it: the log is corrupt in the middle (disk damage?); it is left as it is — move it aside to open the collection without the records from there on"
                        ),
                    });
                }
                Some("checksum mismatch".to_string())
            } else {
                records.push(rest[FRAME_LEN..FRAME_LEN + n].to_vec());
                at += FRAME_LEN + n;
                None
            }
        };
        if let Some(why) = why {
            torn = Some(TornTail {
                offset: at as u64,
                dropped: (bytes.len() - at) as u64,
                why,
            });
            break;
        }
    }
    Ok((
        Replay {
            generation,
            records,
            torn,
        },
        at,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reopen(path: &Path) -> Replay {
        AppendLog::open(path).expect("open").1
    }

    #[test]
    fn records_survive_reopening_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.log");
        let mut log = AppendLog::create(&path, 7).expect("create");
        log.append(&[b"one", b""]).expect("append");
        log.append(&[b"three"]).expect("append");
        drop(log);
        let replay = reopen(&path);
        assert_eq!(replay.generation, 7);
        assert_eq!(replay.records, [b"one".to_vec(), vec![], b"three".to_vec()]);
        assert_eq!(replay.torn, None);
        // Appending after a reopen continues the log.
        let (mut log, _) = AppendLog::open(&path).expect("open");
        log.append(&[b"four"]).expect("append");
        assert_eq!(reopen(&path).records.len(), 4);
    }

    #[test]
    fn a_torn_tail_at_any_byte_is_dropped_and_the_log_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.log");
        let mut log = AppendLog::create(&path, 1).expect("create");
        log.append(&[b"kept-1", b"kept-2"]).expect("append");
        let good = log.len_bytes();
        log.append(&[b"the last record, cut by a crash"])
            .expect("append");
        let full = std::fs::read(&path).expect("read");
        drop(log);
        for cut in good as usize..full.len() {
            std::fs::write(&path, &full[..cut]).expect("write cut");
            let (mut log, replay) = AppendLog::open(&path).expect("open");
            assert_eq!(
                replay.records,
                [b"kept-1".to_vec(), b"kept-2".to_vec()],
                "cut {cut}"
            );
            if cut == good as usize {
                assert_eq!(replay.torn, None);
            } else {
                let torn = replay.torn.expect("torn tail reported");
                assert_eq!(torn.offset, good, "cut {cut}");
                assert_eq!(torn.dropped, cut as u64 - good, "cut {cut}");
            }
            assert_eq!(std::fs::metadata(&path).expect("meta").len(), good);
            log.append(&[b"after"]).expect("append after the cut");
            assert_eq!(reopen(&path).records.len(), 3, "cut {cut}");
        }
    }

    #[test]
    fn a_corrupt_record_ends_the_log_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.log");
        let mut log = AppendLog::create(&path, 1).expect("create");
        log.append(&[b"first"]).expect("append");
        let second = log.len_bytes() as usize;
        log.append(&[b"second"]).expect("append");
        let third = log.len_bytes() as usize;
        log.append(&[b"third"]).expect("append");
        drop(log);
        let clean = std::fs::read(&path).expect("read");
        // Damage in the last record: a tail, cut.
        let mut bytes = clean.clone();
        bytes[third + FRAME_LEN + 2] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        let replay = reopen(&path);
        assert_eq!(replay.records, [b"first".to_vec(), b"second".to_vec()]);
        let torn = replay.torn.expect("torn");
        assert_eq!(torn.offset, third as u64);
        assert_eq!(torn.why, "checksum mismatch");
        // Damage with an intact record after it: corruption in the middle, refused, and the
        // file left as it is.
        let mut bytes = clean.clone();
        bytes[second + FRAME_LEN + 2] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        let e = AppendLog::open(&path).expect_err("corrupt in the middle");
        assert!(e.to_string().contains("corrupt in the middle"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
        std::fs::write(&path, &clean[..third]).expect("write");
        // A length field gone wild is not allocated.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 20]);
        std::fs::write(&path, &bytes).expect("write");
        let torn = reopen(&path).torn.expect("torn");
        assert!(torn.why.contains("over the limit"), "{}", torn.why);
    }

    #[test]
    fn a_file_that_is_no_log_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        std::fs::write(&path, b"hello").expect("write");
        let e = AppendLog::open(&path).expect_err("not a log");
        assert!(e.to_string().contains("x.log"), "{e}");
        assert!(e.to_string().contains("bad header"), "{e}");
        let e = AppendLog::open(&dir.path().join("missing.log")).expect_err("missing");
        assert!(e.to_string().contains("missing.log"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever was appended comes back, and any cut of the file keeps a prefix of the
        /// appended groups' records.
        #[test]
        fn any_cut_keeps_a_prefix(
            groups in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..4),
                1..6,
            ),
            cut_frac in 0.0f64..1.0,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("p.log");
            let mut log = AppendLog::create(&path, 3).expect("create");
            let mut all = Vec::new();
            for g in &groups {
                let refs: Vec<&[u8]> = g.iter().map(Vec::as_slice).collect();
                log.append(&refs).expect("append");
                all.extend(g.iter().cloned());
            }
            drop(log);
            prop_assert_eq!(&reopen(&path).records, &all);
            let full = std::fs::read(&path).expect("read");
            let cut = HEADER_LEN as usize
                + ((full.len() - HEADER_LEN as usize) as f64 * cut_frac) as usize;
            std::fs::write(&path, &full[..cut]).expect("cut");
            let got = reopen(&path).records;
            prop_assert!(got.len() <= all.len());
            prop_assert_eq!(&all[..got.len()], &got[..]);
        }
    }
}
