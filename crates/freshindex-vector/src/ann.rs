//! Approximate nearest-neighbour (ANN) indexes over a fixed set of vectors — what a sealed
//! segment gets once its index is built.
//!
//! [`AnnIndex`] is the small trait the collection searches through; [`HnswIndex`] implements
//! it with usearch's HNSW (a proven C++ core; feature `hnsw`). The index is built from
//! `(id, vector)` pairs, where the id is the row's position in its segment, saved to a file,
//! and opened again either loaded into memory or memory-mapped (a view: opening costs
//! milliseconds whatever the size). Scores follow the collection's [`Metric`], higher is
//! closer, so results merge with exact search's.

use std::path::Path;

use crate::{Metric, Result, VectorError};

/// Build and search parameters of an HNSW index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HnswParams {
    /// Links per node (HNSW's M).
    pub m: usize,
    /// Candidates kept while inserting (ef_construction).
    pub ef_construction: usize,
    /// Candidates kept while searching (ef); at least k is used.
    pub ef_search: usize,
    /// Store vectors as 16-bit floats: half the memory, faster search, slightly lower recall.
    pub half_precision: bool,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 128,
            ef_search: 64,
            half_precision: false,
        }
    }
}

impl HnswParams {
    /// Checks the parameters; the error names the one out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let check = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name}: {v} is out of range ({lo}..={hi})"))
            }
        };
        check("m", self.m, 2, 128)?;
        check("ef_construction", self.ef_construction, 8, 4096)?;
        check("ef_search", self.ef_search, 1, 4096)
    }
}

/// A search hit of an index: the row's id within its segment and its score (higher is
/// closer).
pub type AnnHit = (u64, f32);

/// An ANN index over the rows of one segment.
pub trait AnnIndex: Send + Sync {
    /// Vectors in the index.
    fn len(&self) -> usize;
    /// Whether the index is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `k` nearest ids to `query` among those `keep` accepts (all when `None`), best
    /// first. Rows `keep` rejects (deleted, filtered out) do not take places in the result.
    fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: Option<&(dyn Fn(u64) -> bool + Sync)>,
    ) -> Result<Vec<AnnHit>>;
    /// Writes the index to `path` (replacing it).
    fn save(&self, path: &Path) -> Result<()>;
    /// Bytes the index takes in memory (for a view: the mapped file).
    fn memory_bytes(&self) -> usize;
}

/// Turns a distance of the metric into a score where higher is closer.
fn score(metric: Metric, distance: f32) -> f32 {
    match metric {
        // usearch's cosine and inner-product distances are 1 - similarity.
        Metric::Cosine | Metric::Dot => 1.0 - distance,
        // Squared Euclidean distance: closer is smaller.
        Metric::L2 => -distance,
    }
}

#[cfg(feature = "hnsw")]
pub use hnsw::HnswIndex;

#[cfg(feature = "hnsw")]
mod hnsw {
    use super::*;
    use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

    /// An HNSW index by usearch.
    pub struct HnswIndex {
        index: Index,
        metric: Metric,
        dimension: usize,
    }

    impl std::fmt::Debug for HnswIndex {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HnswIndex")
                .field("metric", &self.metric)
                .field("dimension", &self.dimension)
                .field("len", &self.index.size())
                .finish()
        }
    }

    fn err(what: &str, e: impl std::fmt::Display) -> VectorError {
        VectorError::Index(format!("{what}: {e}"))
    }

    fn options(dimension: usize, metric: Metric, params: &HnswParams) -> IndexOptions {
        IndexOptions {
            dimensions: dimension,
            metric: match metric {
                Metric::Cosine => MetricKind::Cos,
                Metric::Dot => MetricKind::IP,
                Metric::L2 => MetricKind::L2sq,
            },
            quantization: if params.half_precision {
                ScalarKind::F16
            } else {
                ScalarKind::F32
            },
            connectivity: params.m,
            expansion_add: params.ef_construction,
            expansion_search: params.ef_search,
            multi: false,
        }
    }

    impl HnswIndex {
        /// Builds an index of `vectors` (`(id, vector)`, every vector of `dimension`) on
        /// `threads` threads.
        pub fn build(
            dimension: usize,
            metric: Metric,
            params: &HnswParams,
            vectors: &[(u64, &[f32])],
            threads: usize,
        ) -> Result<HnswIndex> {
            params.validate().map_err(VectorError::Index)?;
            if let Some((id, v)) = vectors.iter().find(|(_, v)| v.len() != dimension) {
                return Err(VectorError::Index(format!(
                    "vector {id} has dimension {}, the index {dimension}",
                    v.len()
                )));
            }
            let threads = threads.max(1);
            let index = Index::new(&options(dimension, metric, params))
                .map_err(|e| err("creating the index", e))?;
            index
                .reserve_capacity_and_threads(vectors.len(), threads)
                .map_err(|e| err("reserving space", e))?;
            let chunk = vectors.len().div_ceil(threads).max(1);
            std::thread::scope(|scope| {
                let handles: Vec<_> = vectors
                    .chunks(chunk)
                    .map(|part| {
                        let index = &index;
                        scope.spawn(move || -> Result<()> {
                            for (id, v) in part {
                                index.add(*id, v).map_err(|e| err("adding a vector", e))?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in handles {
                    h.join()
                        .map_err(|_| VectorError::Index("a build thread panicked".into()))??;
                }
                Ok::<(), VectorError>(())
            })?;
            Ok(HnswIndex {
                index,
                metric,
                dimension,
            })
        }

        /// Opens an index file written by [`AnnIndex::save`]: loaded into memory, or with
        /// `view`, memory-mapped (the file must stay in place while the index is open).
        /// `ef_search` replaces the search breadth stored in the file.
        pub fn open(path: &Path, view: bool, ef_search: usize) -> Result<HnswIndex> {
            let p = path
                .to_str()
                .ok_or_else(|| VectorError::Index(format!("{}: not UTF-8", path.display())))?;
            let meta = Index::metadata(p).map_err(|e| err(&format!("reading {p}"), e))?;
            let metric = match meta.metric {
                MetricKind::Cos => Metric::Cosine,
                MetricKind::IP => Metric::Dot,
                MetricKind::L2sq => Metric::L2,
                other => {
                    return Err(VectorError::Index(format!(
                        "{p}: metric {other:?} is not one a collection uses"
                    )));
                }
            };
            let index = if view {
                Index::restore_view(p)
            } else {
                Index::restore(p)
            }
            .map_err(|e| err(&format!("opening {p}"), e))?;
            index.change_expansion_search(ef_search.max(1));
            Ok(HnswIndex {
                dimension: index.dimensions(),
                index,
                metric,
            })
        }

        /// The metric the index was built with.
        pub fn metric(&self) -> Metric {
            self.metric
        }

        /// The dimension of its vectors.
        pub fn dimension(&self) -> usize {
            self.dimension
        }
    }

    impl AnnIndex for HnswIndex {
        fn len(&self) -> usize {
            self.index.size()
        }

        fn search(
            &self,
            query: &[f32],
            k: usize,
            keep: Option<&(dyn Fn(u64) -> bool + Sync)>,
        ) -> Result<Vec<AnnHit>> {
            if query.len() != self.dimension {
                return Err(VectorError::Index(format!(
                    "query of dimension {}, the index {}",
                    query.len(),
                    self.dimension
                )));
            }
            if k == 0 || self.index.size() == 0 {
                return Ok(Vec::new());
            }
            let found = match keep {
                None => self.index.search(query, k),
                Some(keep) => self.index.filtered_search(query, k, keep),
            }
            .map_err(|e| err("searching", e))?;
            Ok(found
                .keys
                .into_iter()
                .zip(found.distances)
                .map(|(id, d)| (id, score(self.metric, d)))
                .collect())
        }

        fn save(&self, path: &Path) -> Result<()> {
            let p = path
                .to_str()
                .ok_or_else(|| VectorError::Index(format!("{}: not UTF-8", path.display())))?;
            self.index
                .save(p)
                .map_err(|e| err(&format!("saving {p}"), e))
        }

        fn memory_bytes(&self) -> usize {
            self.index.memory_usage()
        }
    }
}

#[cfg(all(test, feature = "hnsw"))]
mod tests {
    use super::*;

    /// Clustered unit vectors: `n` points around `clusters` random centres.
    fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let centres: Vec<Vec<f32>> = (0..clusters)
            .map(|_| (0..dim).map(|_| next()).collect())
            .collect();
        (0..n)
            .map(|i| {
                let c = &centres[i % clusters];
                // Points spread from the centre at different distances, as documents about
                // one topic do: near neighbours are nearer than the rest of the cluster.
                let spread = 0.05 + 0.5 * (next() + 0.5);
                let mut v: Vec<f32> = c.iter().map(|x| x + spread * next()).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                v
            })
            .collect()
    }

    fn exact(data: &[Vec<f32>], q: &[f32], k: usize, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut scored: Vec<(f32, u64)> = data
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i as u64))
            .map(|(i, v)| (crate::cosine(q, v), i as u64))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.into_iter().take(k).map(|(_, i)| i).collect()
    }

    fn recall(index: &dyn AnnIndex, data: &[Vec<f32>], queries: &[Vec<f32>]) -> f64 {
        let mut hit = 0;
        for q in queries {
            let want = exact(data, q, 10, |_| true);
            let got: Vec<u64> = index
                .search(q, 10, None)
                .expect("search")
                .into_iter()
                .map(|(i, _)| i)
                .collect();
            hit += want.iter().filter(|i| got.contains(i)).count();
        }
        hit as f64 / (queries.len() * 10) as f64
    }

    #[test]
    fn finds_the_true_neighbours_of_clustered_data() {
        // Queries come from the same clusters, but are not in the index.
        let mut data = clustered(5_100, 64, 50, 7);
        let queries = data.split_off(5_000);
        let pairs: Vec<(u64, &[f32])> = data
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        let index =
            HnswIndex::build(64, Metric::Cosine, &HnswParams::default(), &pairs, 2).expect("build");
        assert_eq!(index.len(), 5_000);
        let r = recall(&index, &data, &queries);
        assert!(r >= 0.95, "recall@10 {r}");
        // Scores are cosine similarities, best first.
        let hits = index.search(&data[3], 3, None).expect("search");
        assert_eq!(hits[0].0, 3);
        assert!((hits[0].1 - 1.0).abs() < 1e-4, "{hits:?}");
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "{hits:?}");
    }

    #[test]
    fn a_filter_keeps_rejected_ids_out_without_losing_places() {
        let data = clustered(2_000, 32, 20, 1);
        let pairs: Vec<(u64, &[f32])> = data
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        let index =
            HnswIndex::build(32, Metric::Cosine, &HnswParams::default(), &pairs, 1).expect("build");
        let even = |id: u64| id.is_multiple_of(2);
        let hits = index.search(&data[11], 10, Some(&even)).expect("search");
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|(id, _)| id.is_multiple_of(2)), "{hits:?}");
        let want = exact(&data, &data[11], 10, even);
        let found = hits.iter().filter(|(id, _)| want.contains(id)).count();
        assert!(found >= 9, "{hits:?} vs {want:?}");
    }

    #[test]
    fn saved_indexes_open_loaded_or_mapped_with_the_same_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = clustered(1_000, 16, 10, 3);
        let pairs: Vec<(u64, &[f32])> = data
            .iter()
            .enumerate()
            .map(|(i, v)| (100 + i as u64, v.as_slice()))
            .collect();
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            let index =
                HnswIndex::build(16, metric, &HnswParams::default(), &pairs, 1).expect("build");
            let path = dir.path().join(format!("{metric:?}.hnsw"));
            index.save(&path).expect("save");
            let want = index.search(&data[5], 5, None).expect("search");
            assert_eq!(want[0].0, 105, "{metric:?}: {want:?}");
            for view in [false, true] {
                let opened = HnswIndex::open(&path, view, 64).expect("open");
                assert_eq!(opened.metric(), metric);
                assert_eq!(opened.len(), 1_000);
                assert_eq!(opened.search(&data[5], 5, None).expect("search"), want);
            }
        }
    }

    #[test]
    fn bad_input_is_an_error_naming_it() {
        let v = [0.5_f32; 8];
        let w = [0.5_f32; 7];
        let e = HnswIndex::build(
            8,
            Metric::Cosine,
            &HnswParams::default(),
            &[(1, &v), (2, &w)],
            1,
        )
        .expect_err("dimension");
        assert!(e.to_string().contains("vector 2 has dimension 7"), "{e}");
        let bad = HnswParams {
            m: 1,
            ..HnswParams::default()
        };
        let e = HnswIndex::build(8, Metric::Cosine, &bad, &[(1, &v)], 1).expect_err("params");
        assert!(e.to_string().contains("m: 1 is out of range"), "{e}");
        let index = HnswIndex::build(8, Metric::Cosine, &HnswParams::default(), &[(1, &v)], 1)
            .expect("build");
        let e = index.search(&w, 1, None).expect_err("query dimension");
        assert!(e.to_string().contains("query of dimension 7"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.hnsw");
        std::fs::write(&junk, b"not an index").expect("write");
        assert!(HnswIndex::open(&junk, false, 64).is_err());
        assert!(HnswIndex::open(&dir.path().join("missing.hnsw"), true, 64).is_err());
    }
}
