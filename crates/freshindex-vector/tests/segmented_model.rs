//! The segmented collection against an in-memory model: random upserts, deletes, seals,
//! compactions, reopenings (also after a torn append) and searches. With exact search the
//! results must be identical to the model's; with HNSW indexes, recall@10 is checked on
//! clustered data.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use freshindex_vector::ann::HnswParams;
use freshindex_vector::{
    Filter, Metric, Row, RowPayload, SegmentOptions, SegmentedCollection, VectorCollection,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const DIM: usize = 8;

fn vector(seed: u16) -> Vec<f32> {
    let mut s = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn row(key: u8, seed: u16) -> Row {
    Row {
        key: format!("k{key:02}"),
        vector: vector(seed),
        payload: RowPayload {
            source: format!(
                "{}/doc{key}",
                if key.is_multiple_of(2) { "even" } else { "odd" }
            ),
            range: [0, usize::from(seed)],
            text: format!("text {seed}"),
            metadata: None,
        },
    }
}

#[derive(Clone, Debug)]
enum Op {
    Upsert(Vec<(u8, u16)>),
    Delete(Vec<u8>),
    Seal,
    Compact,
    Reopen,
    TornReopen(Vec<u8>),
    Search(u16, bool),
    /// Build the index of every sealed segment without one, as an index node does, and
    /// attach it.
    Build,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((0u8..40, any::<u16>()), 1..6).prop_map(Op::Upsert),
        3 => proptest::collection::vec(0u8..40, 1..4).prop_map(Op::Delete),
        1 => Just(Op::Seal),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => proptest::collection::vec(any::<u8>(), 1..30).prop_map(Op::TornReopen),
        3 => (any::<u16>(), any::<bool>()).prop_map(|(q, f)| Op::Search(q, f)),
        1 => Just(Op::Build),
    ]
}

fn exact_opts() -> SegmentOptions {
    SegmentOptions {
        seal_rows: 7,
        compact_ratio: 0.3,
        index: None,
        build_at_seal: false,
    }
}

/// Indexes on sealed segments, built outside the seal (attached by `Op::Build`).
fn indexed_opts() -> SegmentOptions {
    SegmentOptions {
        index: Some(HnswParams::default()),
        ..exact_opts()
    }
}

fn open(dir: &Path, opts: SegmentOptions) -> SegmentedCollection {
    SegmentedCollection::open(dir, "m", Some((DIM, Metric::Cosine)), opts).expect("open")
}

fn scan(c: &SegmentedCollection) -> Vec<Row> {
    let mut rows = Vec::new();
    c.scan(&mut |r| {
        rows.push(r);
        Ok(())
    })
    .expect("scan");
    rows
}

/// The model's top k: cosine, best first, ties by key.
fn model_search(
    model: &BTreeMap<String, Row>,
    q: &[f32],
    k: usize,
    filter: Option<&Filter>,
) -> Vec<(String, f32)> {
    let mut hits: Vec<(String, f32)> = model
        .values()
        .filter(|r| filter.is_none_or(|f| f.matches(&r.payload)))
        .map(|r| (r.key.clone(), freshindex_vector::cosine(q, &r.vector)))
        .collect();
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    hits.truncate(k);
    hits
}

fn wal_path(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("wal-"))
        })
        .expect("a log")
}

/// Runs `ops` against the collection and the model, checking after every step.
fn run_model(ops: &[Op], opts: SegmentOptions) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = open(dir.path(), opts.clone());
    let mut model: BTreeMap<String, Row> = BTreeMap::new();
    let mut built = 0;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Upsert(rows) => {
                let rows: Vec<Row> = rows.iter().map(|(k, s)| row(*k, *s)).collect();
                c.upsert(&rows).expect("upsert");
                for r in rows {
                    model.insert(r.key.clone(), r);
                }
            }
            Op::Delete(keys) => {
                let keys: Vec<String> = keys.iter().map(|k| format!("k{k:02}")).collect();
                c.delete(&keys).expect("delete");
                for k in &keys {
                    model.remove(k);
                }
            }
            Op::Seal => c.seal().expect("seal"),
            Op::Compact => {
                c.compact().expect("compact");
            }
            Op::Reopen => {
                drop(c);
                c = open(dir.path(), opts.clone());
            }
            Op::TornReopen(junk) => {
                drop(c);
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(wal_path(dir.path()))
                    .expect("open log");
                f.write_all(junk).expect("tear");
                drop(f);
                c = open(dir.path(), opts.clone());
            }
            Op::Build =>
            {
                #[cfg(feature = "hnsw")]
                if let Some(params) = c.index_params().copied() {
                    for seg in c.segments().into_iter().filter(|s| !s.indexed) {
                        built += 1;
                        let out = dir.path().join(format!("build-{built}.hnsw"));
                        freshindex_vector::build_segment_index(
                            &seg.data_path,
                            c.metric(),
                            &params,
                            &out,
                            1,
                        )
                        .expect("build");
                        prop_assert!(c.attach_index(seg.id, &out).expect("attach"));
                        prop_assert!(!out.exists(), "the file moved into the collection");
                    }
                    prop_assert_eq!(c.stats().unindexed_rows, 0);
                }
            }
            Op::Search(q, filtered) => {
                let q = vector(*q);
                let filter = filtered.then(|| Filter {
                    source_prefix: Some("even/".into()),
                });
                let got: Vec<(String, f32)> = c
                    .search(&q, 5, filter.as_ref())
                    .expect("search")
                    .into_iter()
                    .map(|h| (h.key, h.score))
                    .collect();
                let want = model_search(&model, &q, 5, filter.as_ref());
                // Same scores, in order; every key found scores as the model says. (Index and
                // exact paths may round a score differently, which can swap equal vectors.)
                prop_assert_eq!(got.len(), want.len(), "step {}", step);
                for ((gk, gs), (_, ws)) in got.iter().zip(&want) {
                    prop_assert!(
                        (gs - ws).abs() < 1e-4,
                        "step {}: {:?} vs {:?}",
                        step,
                        got,
                        want
                    );
                    let truth = model
                        .get(gk)
                        .map(|r| freshindex_vector::cosine(&q, &r.vector));
                    prop_assert!(
                        truth.is_some_and(|t| (t - gs).abs() < 1e-4),
                        "step {}: {} is not in the model at {}",
                        step,
                        gk,
                        gs
                    );
                }
            }
        }
        let rows = scan(&c);
        let want: Vec<&Row> = model.values().collect();
        prop_assert_eq!(
            rows.iter().collect::<Vec<_>>(),
            want,
            "step {}: {:?}",
            step,
            op
        );
        prop_assert_eq!(c.count().expect("count"), model.len() as u64);
        let stats = c.stats();
        prop_assert_eq!(
            stats.growing_rows + stats.unindexed_rows + stats.indexed_rows,
            model.len() as u64
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_collection_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run_model(&ops, exact_opts())?;
    }

    #[test]
    fn the_indexed_collection_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run_model(&ops, indexed_opts())?;
    }
}

#[test]
fn leftovers_of_a_seal_cut_short_are_removed_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = open(dir.path(), exact_opts());
    let rows: Vec<Row> = (0..10).map(|k| row(k, u16::from(k) * 7)).collect();
    c.upsert(&rows).expect("upsert");
    let before = scan(&c);
    drop(c);
    for junk in [
        "seg-99.dat",
        "seg-99.hnsw",
        "wal-99.log",
        "MANIFEST.tmp",
        "seg-1.tmp",
    ] {
        std::fs::write(dir.path().join(junk), b"half written").expect("junk");
    }
    let c = open(dir.path(), exact_opts());
    assert_eq!(scan(&c), before);
    for junk in [
        "seg-99.dat",
        "seg-99.hnsw",
        "wal-99.log",
        "MANIFEST.tmp",
        "seg-1.tmp",
    ] {
        assert!(!dir.path().join(junk).exists(), "{junk} removed");
    }
}

#[test]
fn a_damaged_segment_or_manifest_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = open(dir.path(), exact_opts());
    let rows: Vec<Row> = (0..10).map(|k| row(k, u16::from(k))).collect();
    c.upsert(&rows).expect("upsert");
    c.seal().expect("seal");
    drop(c);
    let seg = dir.path().join("seg-1.dat");
    let mut bytes = std::fs::read(&seg).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&seg, &bytes).expect("write");
    let e = SegmentedCollection::open(dir.path(), "m", None, exact_opts()).expect_err("damaged");
    assert!(
        e.to_string().contains("seg-1.dat: checksum mismatch"),
        "{e}"
    );
    std::fs::write(dir.path().join("MANIFEST"), b"{").expect("write");
    let e = SegmentedCollection::open(dir.path(), "m", None, exact_opts()).expect_err("manifest");
    assert!(e.to_string().contains("MANIFEST"), "{e}");
    let e = SegmentedCollection::open(&dir.path().join("none"), "none", None, exact_opts())
        .expect_err("missing");
    assert!(e.to_string().contains("none"), "{e}");
}

#[test]
fn a_wrong_dimension_is_refused_naming_the_collection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = open(dir.path(), exact_opts());
    let mut r = row(1, 1);
    r.vector.pop();
    let e = c.upsert(&[r]).expect_err("dimension");
    assert!(e.to_string().contains("collection `m`"), "{e}");
    drop(c);
    let e = SegmentedCollection::open(
        dir.path(),
        "m",
        Some((DIM + 1, Metric::Cosine)),
        exact_opts(),
    )
    .expect_err("dimension on open");
    assert!(
        e.to_string().contains(&format!("dimension {}", DIM + 1)),
        "{e}"
    );
}

#[cfg(feature = "hnsw")]
#[test]
fn indexed_segments_keep_recall_and_honour_deletes_and_filters() {
    // Clustered unit vectors in 32 dimensions.
    let dim = 32;
    let mut s = 7u64;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    let centres: Vec<Vec<f32>> = (0..20)
        .map(|_| (0..dim).map(|_| next()).collect())
        .collect();
    let mut points: Vec<Vec<f32>> = (0..3_100)
        .map(|i| {
            let spread = 0.05 + 0.5 * (next() + 0.5);
            let mut v: Vec<f32> = centres[i % 20]
                .iter()
                .map(|x| x + spread * next())
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            v
        })
        .collect();
    let queries = points.split_off(3_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SegmentOptions {
        seal_rows: 1_000,
        compact_ratio: 0.3,
        index: Some(HnswParams::default()),
        build_at_seal: true,
    };
    let c = SegmentedCollection::open(dir.path(), "h", Some((dim, Metric::Cosine)), opts.clone())
        .expect("open");
    let rows: Vec<Row> = points
        .iter()
        .enumerate()
        .map(|(i, v)| Row {
            key: format!("r{i:05}"),
            vector: v.clone(),
            payload: RowPayload {
                source: format!("{}/{i}", if i.is_multiple_of(3) { "third" } else { "rest" }),
                range: [0, 0],
                text: String::new(),
                metadata: None,
            },
        })
        .collect();
    for part in rows.chunks(250) {
        c.upsert(part).expect("upsert");
    }
    let stats = c.stats();
    assert_eq!(
        (stats.sealed_segments, stats.indexed_rows),
        (3, 3_000),
        "{stats:?}"
    );
    // Delete every 5th row: deleted rows never come back.
    let gone: Vec<String> = (0..3_000).step_by(5).map(|i| format!("r{i:05}")).collect();
    c.delete(&gone).expect("delete");
    let mut model: BTreeMap<String, Row> = rows.into_iter().map(|r| (r.key.clone(), r)).collect();
    for k in &gone {
        model.remove(k);
    }
    let check = |c: &SegmentedCollection, filter: Option<&Filter>| {
        let mut found = 0;
        for q in &queries {
            let want = model_search(&model, q, 10, filter);
            let got = c.search(q, 10, filter).expect("search");
            assert!(
                got.iter().all(|h| model.contains_key(&h.key)),
                "a deleted row came back"
            );
            assert!(
                got.iter()
                    .all(|h| filter.is_none_or(|f| f.matches(&h.payload)))
            );
            found += want
                .iter()
                .filter(|(k, _)| got.iter().any(|h| &h.key == k))
                .count();
        }
        found as f64 / (queries.len() * 10) as f64
    };
    let r = check(&c, None);
    assert!(r >= 0.95, "recall@10 {r}");
    let third = Filter {
        source_prefix: Some("third/".into()),
    };
    let r = check(&c, Some(&third));
    assert!(r >= 0.95, "filtered recall@10 {r}");
    // After a reopen (indexes memory-mapped, deletions from the .del files and the log) and
    // a compaction, the same holds.
    drop(c);
    let c = SegmentedCollection::open(dir.path(), "h", None, opts.clone()).expect("reopen");
    assert!(check(&c, None) >= 0.95);
    c.seal().expect("seal (persists tombstones)");
    drop(c);
    let c = SegmentedCollection::open(dir.path(), "h", None, opts).expect("reopen");
    assert!(check(&c, None) >= 0.95);
    assert_eq!(c.count().expect("count"), model.len() as u64);
}
