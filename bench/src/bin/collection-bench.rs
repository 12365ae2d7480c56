//! `collection-bench`: the segmented collection a flow writes to, end to end, on clustered unit
//! vectors — writes (append log, seals), index builds of sealed segments as an index node does
//! them (`build_segment_index` + `attach_index`), then search through the collection: recall@10
//! against exact search, queries per second on 1 and 2 threads, with a payload filter, and the
//! p99 latency of searches while another segment's index builds. The baseline, measured in the
//! same run, is the same collection before its segments are indexed (exact search over every
//! segment — what searches cost until the builds finish, and what an exact collection costs).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use freshindex_bench::vectors::{
    clustered, exact_top, latencies, latencies_during, percentile, qps,
};
use freshindex_vector::ann::HnswParams;
use freshindex_vector::{
    Filter, Metric, Row, RowPayload, SegmentOptions, SegmentedCollection, VectorCollection,
    build_segment_index,
};

const USAGE: &str = "\
usage: collection-bench [--n N] [--dim D] [--queries Q] [--seal-rows S] [--exact-queries E]

  --n N              rows (default 200000)
  --dim D            dimension (default 384)
  --queries Q        queries, recall measured on all (default 1000)
  --seal-rows S      rows per sealed segment (default 50000)
  --exact-queries E  queries timed on the unindexed collection (default 100)";

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("collection-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn keys(hits: &[freshindex_vector::SearchHit]) -> Vec<u64> {
    hits.iter().filter_map(|h| h.key.parse().ok()).collect()
}

fn run() -> Result<()> {
    let (mut n, mut dim, mut nq, mut seal_rows, mut exact_q) = (200_000, 384, 1000, 50_000, 100);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--n" => n = value("--n")?.parse()?,
            "--dim" => dim = value("--dim")?.parse()?,
            "--queries" => nq = value("--queries")?.parse()?,
            "--seal-rows" => seal_rows = value("--seal-rows")?.parse()?,
            "--exact-queries" => exact_q = value("--exact-queries")?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    let clusters = 1000;
    eprintln!("generating {n} x {dim} clustered vectors, {nq} queries");
    let mut data = clustered(n + nq, dim, clusters, 42);
    let queries = data.split_off(n * dim);
    eprintln!("exact top-10 of every query (ground truth, 2 threads)");
    let truth: Vec<Vec<u64>> = {
        let chunks: Vec<&[f32]> = queries.chunks_exact(dim).collect();
        let half = chunks.len().div_ceil(2);
        let mut out = vec![Vec::new(); chunks.len()];
        std::thread::scope(|s| {
            for (part, slot) in out.chunks_mut(half).enumerate() {
                let (chunks, data) = (&chunks, &data);
                s.spawn(move || {
                    for (j, o) in slot.iter_mut().enumerate() {
                        *o = exact_top(data, dim, chunks[part * half + j], 10);
                    }
                });
            }
        });
        out
    };

    let dir = std::env::temp_dir().join(format!(
        "freshindex-collection-bench-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = SegmentOptions {
        seal_rows,
        compact_ratio: 0.3,
        index: Some(HnswParams::default()),
        build_at_seal: false,
    };
    let c = SegmentedCollection::open(&dir.join("c"), "c", Some((dim, Metric::Cosine)), opts)?;
    eprintln!("writing {n} rows in applies of 1,000");
    let t = Instant::now();
    let rows: Vec<Row> = data
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| Row {
            key: format!("{i:08}"),
            vector: v.to_vec(),
            payload: RowPayload {
                source: format!("part{}/doc{i}", i % 10),
                range: [0, 0],
                text: String::new(),
                metadata: None,
            },
        })
        .collect();
    for part in rows.chunks(1000) {
        c.upsert(part)?;
    }
    c.seal()?;
    let write_s = t.elapsed().as_secs_f64();
    drop(rows);
    let segments = c.segments();

    // Baseline: the collection with no index (exact on every segment).
    let sample = &queries[..dim * exact_q.min(nq)];
    let search = |q: &[f32]| {
        let _ = std::hint::black_box(c.search(q, 10, None));
    };
    let exact1 = qps(sample, dim, 1, &search);
    let exact2 = qps(sample, dim, 2, &search);

    // Index builds, as a node does them (2 threads each).
    let build_dir = dir.join("builds");
    std::fs::create_dir_all(&build_dir)?;
    let mut build_s = Vec::new();
    let mut size = 0u64;
    for seg in &segments {
        let out = build_dir.join(format!("{}.hnsw", seg.id));
        let t = Instant::now();
        build_segment_index(
            &seg.data_path,
            Metric::Cosine,
            &HnswParams::default(),
            &out,
            2,
        )?;
        build_s.push(t.elapsed().as_secs_f64());
        size += std::fs::metadata(&out)?.len();
        if !c.attach_index(seg.id, &out)? {
            bail!("segment {} refused its index", seg.id);
        }
        eprintln!(
            "segment {} indexed in {:.1} s",
            seg.id,
            build_s[build_s.len() - 1]
        );
    }
    let stats = c.stats();
    if stats.unindexed_rows != 0 || stats.growing_rows != 0 {
        bail!("not every row is indexed: {stats:?}");
    }
    let mut hit = 0;
    for (q, want) in queries.chunks_exact(dim).zip(&truth) {
        let got = keys(&c.search(q, 10, None)?);
        hit += want.iter().filter(|i| got.contains(i)).count();
    }
    let recall = hit as f64 / (truth.len() * 10) as f64;
    let idx1 = qps(&queries, dim, 1, &search);
    let idx2 = qps(&queries, dim, 2, &search);
    // A filter passing a tenth of the rows.
    let filter = Filter {
        source_prefix: Some("part3/".into()),
    };
    let filtered = |q: &[f32]| {
        let _ = std::hint::black_box(c.search(q, 10, Some(&filter)));
    };
    let filt1 = qps(&queries, dim, 1, &filtered);

    // Latency while another index builds on the other core.
    let search_one = |q: &[f32]| -> Result<()> {
        std::hint::black_box(c.search(q, 10, None)?);
        Ok(())
    };
    let idle = latencies(&queries, dim, search_one)?;
    let (seg, out) = (&segments[0], build_dir.join("again.hnsw"));
    let during = latencies_during(
        &queries,
        dim,
        || {
            build_segment_index(
                &seg.data_path,
                Metric::Cosine,
                &HnswParams::default(),
                &out,
                1,
            )
            .map(|_| ())
            .map_err(Into::into)
        },
        search_one,
    )?;
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);

    let total_build: f64 = build_s.iter().sum();
    println!(
        "Segmented collection, {n} x {dim} clustered unit vectors in {} segments of {seal_rows}, {nq} queries, k = 10, HNSW M 16, ef_construction 128, ef 64",
        segments.len()
    );
    println!(
        "writes: {n} rows in {write_s:.1} s ({:.0} rows/s, every apply fsynced, seals included)",
        n as f64 / write_s
    );
    println!("| search | recall@10 | QPS 1 thread | QPS 2 threads | vs exact (1 thread) |");
    println!("|---|---|---|---|---|");
    println!(
        "| no index: exact on every segment (baseline) | 1.000 | {exact1:.1} | {exact2:.1} | 1.0x |"
    );
    println!(
        "| every segment indexed | {recall:.3} | {idx1:.0} | {idx2:.0} | {:.0}x |",
        idx1 / exact1
    );
    println!(
        "| indexed, filter passing 10% of rows | | {filt1:.0} | | {:.0}x |",
        filt1 / exact1
    );
    println!(
        "index builds: {total_build:.1} s for {} segments (2 threads each; {:.1} s per segment), {:.0} MiB of index files",
        segments.len(),
        total_build / segments.len() as f64,
        size as f64 / (1 << 20) as f64
    );
    println!(
        "search latency (1 thread): idle p50 {:.3} ms, p99 {:.3} ms; while a segment's index builds on the other core: p50 {:.3} ms, p99 {:.3} ms ({} searches)",
        percentile(&idle, 0.5),
        percentile(&idle, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len()
    );
    Ok(())
}
