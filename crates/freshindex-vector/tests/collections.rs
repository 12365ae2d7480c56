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
