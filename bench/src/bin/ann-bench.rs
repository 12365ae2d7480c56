//! `ann-bench`: the HNSW index of sealed segments (usearch) against exact search, on
//! clustered unit vectors: build time, index size, recall@10 against exact search, queries
//! per second on 1 and 2 threads, and the p99 latency of searches while another index builds.
//! The baseline, measured in the same run, is exact search: a brute-force scan of the same
//! vectors in memory (the best an exact collection can do), and the built-in SQLite
//! collection's exact search on a sample of queries.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use freshindex_bench::vectors::{
    clustered, exact_top, latencies, latencies_during, percentile, qps,
};
use freshindex_vector::ann::{AnnIndex, HnswIndex, HnswParams};
use freshindex_vector::{Metric, Row, RowPayload, SqliteCollection, VectorCollection};

const USAGE: &str = "\
usage: ann-bench [--n N] [--dim D] [--queries Q] [--clusters C] [--ef E] [--sqlite-queries S]

  --n N              vectors (default 200000)
  --dim D            dimension (default 384)
  --queries Q        queries, recall measured on all (default 1000)
  --clusters C       cluster centres (default 1000)
  --ef E             ef_search values, comma-separated (default 32,64,128)
  --sqlite-queries S queries timed on the SQLite collection (default 20; 0 skips it)";

/// The pure-Rust alternative, hnsw_rs, with the same M and ef_construction (built with its
/// parallel insert, which uses every core).
#[cfg(feature = "compare-hnsw-rs")]
fn hnsw_rs_lines(
    data: &[f32],
    dim: usize,
    queries: &[f32],
    truth: &[Vec<u64>],
    efs: &[usize],
    exact_q1: f64,
) -> Vec<String> {
    use hnsw_rs::prelude::{DistCosine, Hnsw};
    let n = data.len() / dim;
    eprintln!("building hnsw_rs (M 16, ef_construction 128)");
    let items: Vec<(&[f32], usize)> = data
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| (v, i))
        .collect();
    let t = Instant::now();
    let index: Hnsw<f32, DistCosine> = Hnsw::new(16, n, 16, 128, DistCosine {});
    index.parallel_insert_slice(&items);
    let build_s = t.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for &ef in efs {
        let mut hit = 0;
        for (q, want) in queries.chunks_exact(dim).zip(truth) {
            let got = index.search(q, 10, ef);
            hit += want
                .iter()
                .filter(|i| got.iter().any(|g| g.d_id as u64 == **i))
                .count();
        }
        let recall = hit as f64 / (truth.len() * 10) as f64;
        let search = |q: &[f32]| {
            std::hint::black_box(index.search(q, 10, ef));
        };
        let q1 = qps(queries, dim, 1, &search);
        let q2 = qps(queries, dim, 2, &search);
        out.push(format!(
            "| hnsw_rs f32, ef {ef} | {build_s:.1} s | (in memory) | {recall:.3} | {q1:.0} | {q2:.0} | {:.1}x |",
            q1 / exact_q1
        ));
    }
    out
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ann-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let (mut n, mut dim, mut nq, mut clusters, mut sqlite_q) = (200_000, 384, 1000, 1000, 20);
    let mut efs = vec![32usize, 64, 128];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--n" => n = value("--n")?.parse()?,
            "--dim" => dim = value("--dim")?.parse()?,
            "--queries" => nq = value("--queries")?.parse()?,
            "--clusters" => clusters = value("--clusters")?.parse()?,
            "--sqlite-queries" => sqlite_q = value("--sqlite-queries")?.parse()?,
            "--ef" => {
                efs = value("--ef")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    eprintln!("generating {n} x {dim} clustered vectors ({clusters} clusters), {nq} queries");
    // Queries come from the same clusters, but are not indexed.
    let mut data = clustered(n + nq, dim, clusters, 42);
    let queries = data.split_off(n * dim);

    // Ground truth and the exact baseline.
    eprintln!("exact top-10 of every query (2 threads)");
    let truth: Vec<Vec<u64>> = {
        let chunks: Vec<&[f32]> = queries.chunks_exact(dim).collect();
        let mut out = vec![Vec::new(); chunks.len()];
        std::thread::scope(|s| {
            for (part, slot) in out.chunks_mut(chunks.len().div_ceil(2)).enumerate() {
                let chunks = &chunks;
                let data = &data;
                s.spawn(move || {
                    let base = part * chunks.len().div_ceil(2);
                    for (j, o) in slot.iter_mut().enumerate() {
                        *o = exact_top(data, dim, chunks[base + j], 10);
                    }
                });
            }
        });
        out
    };
    let exact_sample = &queries[..dim * nq.min(100)];
    let exact_q1 = qps(exact_sample, dim, 1, &|q| {
        std::hint::black_box(exact_top(&data, dim, q, 10));
    });
    let exact_q2 = qps(exact_sample, dim, 2, &|q| {
        std::hint::black_box(exact_top(&data, dim, q, 10));
    });

    let pairs: Vec<(u64, &[f32])> = data
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| (i as u64, v))
        .collect();
    let mut lines = Vec::new();
    lines.push(format!(
        "| exact, in memory (baseline) | | | 1.000 | {exact_q1:.0} | {exact_q2:.0} | 1.0x |"
    ));
    let dir = std::env::temp_dir().join(format!("freshindex-ann-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut built = Vec::new();
    for half in [false, true] {
        let params = HnswParams {
            half_precision: half,
            ..HnswParams::default()
        };
        eprintln!(
            "building HNSW ({}, M {}, ef_construction {}) on 2 threads",
            if half { "f16" } else { "f32" },
            params.m,
            params.ef_construction
        );
        let t = Instant::now();
        let index = HnswIndex::build(dim, Metric::Cosine, &params, &pairs, 2)?;
        let build_s = t.elapsed().as_secs_f64();
        let path = dir.join(format!("{}.hnsw", if half { "f16" } else { "f32" }));
        index.save(&path)?;
        let size_mb = std::fs::metadata(&path)?.len() as f64 / (1 << 20) as f64;
        let t = Instant::now();
        let view = HnswIndex::open(&path, true, 64)?;
        let open_ms = t.elapsed().as_secs_f64() * 1000.0;
        drop(view);
        for &ef in &efs {
            let index = HnswIndex::open(&path, false, ef)?;
            let mut hit = 0;
            for (q, want) in queries.chunks_exact(dim).zip(&truth) {
                let got = index.search(q, 10, None)?;
                hit += want
                    .iter()
                    .filter(|i| got.iter().any(|(g, _)| g == *i))
                    .count();
            }
            let recall = hit as f64 / (truth.len() * 10) as f64;
            let search = |q: &[f32]| {
                let _ = std::hint::black_box(index.search(q, 10, None));
            };
            let q1 = qps(&queries, dim, 1, &search);
            let q2 = qps(&queries, dim, 2, &search);
            lines.push(format!(
                "| HNSW {}, ef {ef} | {build_s:.1} s | {size_mb:.0} MiB (view opens in {open_ms:.1} ms) | {recall:.3} | {q1:.0} | {q2:.0} | {:.1}x |",
                if half { "f16" } else { "f32" },
                q1 / exact_q1
            ));
        }
        built.push(path);
    }

    #[cfg(feature = "compare-hnsw-rs")]
    lines.extend(hnsw_rs_lines(&data, dim, &queries, &truth, &efs, exact_q1));

    // Search latency while another index builds on the other core.
    let index = HnswIndex::open(&built[0], false, 64)?;
    let during = latencies_during(
        &queries,
        dim,
        || {
            HnswIndex::build(dim, Metric::Cosine, &HnswParams::default(), &pairs, 1)
                .map(|_| ())
                .map_err(Into::into)
        },
        |q| {
            std::hint::black_box(index.search(q, 10, None)?);
            Ok(())
        },
    )?;
    let idle = latencies(&queries, dim, |q| {
        std::hint::black_box(index.search(q, 10, None)?);
        Ok(())
    })?;

    // The built-in SQLite collection (exact, on disk) on a sample of queries.
    let sqlite_line = if sqlite_q > 0 {
        eprintln!("loading the SQLite collection");
        let c = SqliteCollection::open(&dir.join("exact.sqlite"), "exact", Some(dim))?;
        let rows: Vec<Row> = data
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, v)| Row {
                key: format!("{i:08}"),
                vector: v.to_vec(),
                payload: RowPayload {
                    source: format!("doc-{i}"),
                    range: [0, 0],
                    text: String::new(),
                    metadata: None,
                },
            })
            .collect();
        for part in rows.chunks(10_000) {
            c.upsert(part)?;
        }
        let sample = &queries[..dim * sqlite_q.min(nq)];
        let q1 = qps(sample, dim, 1, &|q| {
            let _ = std::hint::black_box(c.search(q, 10, None));
        });
        Some(format!(
            "| exact, SQLite collection (today's target) | | | 1.000 | {q1:.1} | | {:.2}x |",
            q1 / exact_q1
        ))
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "ANN on {n} x {dim} clustered unit vectors ({clusters} clusters), {nq} queries, k = 10, M 16, ef_construction 128"
    );
    println!(
        "| index | build (2 threads) | size | recall@10 | QPS 1 thread | QPS 2 threads | QPS vs exact (1 thread) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for l in &lines {
        println!("{l}");
    }
    if let Some(l) = sqlite_line {
        println!("{l}");
    }
    println!(
        "search latency (HNSW f32, ef 64, 1 thread): idle p50 {:.3} ms, p99 {:.3} ms; while an index builds on the other core: p50 {:.3} ms, p99 {:.3} ms ({} searches)",
        percentile(&idle, 0.5),
        percentile(&idle, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len()
    );
    Ok(())
}
