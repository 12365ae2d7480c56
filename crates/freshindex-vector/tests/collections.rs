//! The folder of collections: one writer per collection across handles, read-only snapshots
//! beside a writer, and the migration of a one-file SQLite collection on its first write.

use freshindex_vector::{
    Collections, Row, RowPayload, SqliteCollection, VectorCollection, VectorError,
};

fn row(i: usize) -> Row {
    Row {
        key: format!("k{i:03}"),
        vector: vec![i as f32, 1.0, (i % 7) as f32],
        payload: RowPayload {
            source: format!("doc{i}"),
            range: [0, i],
            text: format!("text {i}"),
            metadata: None,
        },
    }
}

fn scan(c: &dyn VectorCollection) -> Vec<Row> {
    let mut rows = Vec::new();
    c.scan(&mut |r| {
        rows.push(r);
        Ok(())
    })
    .expect("scan");
    rows
}

#[test]
fn one_writer_at_a_time_and_readers_see_committed_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cols = Collections::new(dir.path());
    let w = cols.open_or_create("c", 3).expect("writer");
    w.upsert(&(0..10).map(row).collect::<Vec<_>>())
        .expect("upsert");
    // A second writer is refused with a message naming the collection.
    match cols.open_writable("c") {
        Err(e @ VectorError::Locked { .. }) => assert!(e.to_string().contains("`c`"), "{e}"),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    // A reader sees what was committed, and cannot write.
    let r = cols.open("c").expect("reader");
    assert_eq!(r.count().expect("count"), 10);
    assert!(matches!(
        r.upsert(&[row(11)]),
        Err(VectorError::ReadOnly(_))
    ));
    w.seal().expect("seal");
    w.delete(&["k003".into()]).expect("delete");
    let r = cols.open("c").expect("reader");
    assert_eq!(scan(r.as_ref()), scan(&w));
    // Dropping the writer releases the collection; removing it needs no writer.
    assert!(matches!(cols.remove("c"), Err(VectorError::Locked { .. })));
    drop(w);
    assert!(cols.remove("c").expect("remove"));
    assert!(matches!(cols.open("c"), Err(VectorError::NotFound(_))));
}

#[test]
fn a_sqlite_collection_is_migrated_on_its_first_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = SqliteCollection::open(&dir.path().join("c.sqlite"), "c", Some(3)).expect("old");
    old.upsert(&(0..2500).map(row).collect::<Vec<_>>())
        .expect("upsert");
    old.delete(&["k100".into()]).expect("delete");
    let before = scan(&old);
    drop(old);
    let cols = Collections::new(dir.path());
    // Reading does not migrate.
    assert_eq!(scan(cols.open("c").expect("read").as_ref()), before);
    assert!(dir.path().join("c.sqlite").exists());
    // A left-over of a migration cut short is discarded.
    std::fs::create_dir_all(dir.path().join("c.migrating")).expect("mkdir");
    std::fs::write(dir.path().join("c.migrating/MANIFEST"), b"{garbage").expect("write");
    let c = cols.open_or_create("c", 3).expect("migrated");
    assert_eq!(scan(&c), before);
    assert!(!dir.path().join("c.sqlite").exists());
    assert!(!dir.path().join("c.migrating").exists());
    let hits = c.search(&[5.0, 1.0, 5.0], 1, None).expect("search");
    assert_eq!(hits.len(), 1);
    drop(c);
    assert_eq!(scan(&cols.open_writable("c").expect("reopen")), before);
}

/// Searches keep answering right while writes seal segments, compactions rewrite them and
/// indexes built elsewhere are attached: every stable point is found first by its own vector.
#[cfg(feature = "hnsw")]
#[test]
fn search_stays_correct_during_seals_compactions_and_index_attachments() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use freshindex_vector::ann::HnswParams;
    use freshindex_vector::{Metric, SegmentOptions, SegmentedCollection, build_segment_index};

    const DIM: usize = 16;
    fn v(seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..DIM)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }
    fn point(key: String, seed: u64) -> Row {
        Row {
            key,
            vector: v(seed),
            payload: RowPayload {
                source: String::new(),
                range: [0, 0],
                text: String::new(),
                metadata: None,
            },
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SegmentOptions {
        seal_rows: 40,
        compact_ratio: 0.3,
        index: Some(HnswParams::default()),
        build_at_seal: false,
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
    let stable: Vec<Row> = (0..60).map(|i| point(format!("s{i}"), 1_000 + i)).collect();
    c.upsert(&stable).expect("stable points");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<Row> = (0..10)
                    .map(|j| point(format!("x{}", (n + j) % 97), n + j + 50_000))
                    .collect();
                c.upsert(&batch).expect("upsert");
                c.delete(&[format!("x{}", (n * 7) % 97), format!("x{}", (n * 11) % 97)])
                    .expect("delete");
                if n.is_multiple_of(5) {
                    c.compact().expect("compact");
                }
                n += 1;
            }
            n
        })
    };
    let builder = {
        let (c, stop) = (c.clone(), stop.clone());
        let out_dir = dir.path().join("builds");
        std::fs::create_dir_all(&out_dir).expect("mkdir");
        std::thread::spawn(move || {
            let mut attached = 0;
            while !stop.load(Ordering::Relaxed) {
                for seg in c.segments().into_iter().filter(|s| !s.indexed) {
                    let out = out_dir.join(format!("{}.hnsw", seg.id));
                    // The segment may be compacted away meanwhile: then its data file is gone
                    // or the attachment is refused.
                    if build_segment_index(
                        &seg.data_path,
                        Metric::Cosine,
                        &HnswParams::default(),
                        &out,
                        1,
                    )
                    .is_ok()
                        && c.attach_index(seg.id, &out).expect("attach")
                    {
                        attached += 1;
                    }
                    let _ = std::fs::remove_file(&out);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            attached
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut searches = 0;
    while std::time::Instant::now() < deadline {
        for r in &stable {
            let hits = c.search(&r.vector, 3, None).expect("search");
            assert_eq!(hits.first().map(|h| h.key.as_str()), Some(r.key.as_str()));
            searches += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    let attached = builder.join().expect("builder");
    assert!(
        writes > 20 && attached > 2,
        "writes {writes}, indexes attached {attached}"
    );
    assert!(searches > 100);
    assert_eq!(
        c.count().expect("count") as usize,
        60 + 97 - scan_missing(c.as_ref())
    );
}

/// How many of the churned keys `x0..x96` are absent now.
fn scan_missing(c: &dyn VectorCollection) -> usize {
    let rows = scan(c);
    97 - rows.iter().filter(|r| r.key.starts_with('x')).count()
}
