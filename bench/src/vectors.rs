//! Clustered vectors and the measuring helpers the vector benchmarks share.

use std::time::Instant;

/// A SplitMix64 stream of floats in [-0.5, 0.5).
pub struct Rng(pub u64);

impl Rng {
    /// The next float.
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    }
}

/// `n` unit vectors around `clusters` random centres, flat.
pub fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let centres: Vec<f32> = (0..clusters * dim).map(|_| rng.next_f32()).collect();
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = &centres[(i % clusters) * dim..][..dim];
        let start = out.len();
        // Points spread from the centre at different distances, as documents about one
        // topic do: near neighbours are nearer than the rest of the cluster.
        let spread = 0.05 + 0.5 * (rng.next_f32() + 0.5);
        out.extend(c.iter().map(|x| x + spread * rng.next_f32()));
        let v = &mut out[start..];
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

/// Dot product.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Exact top-k by brute force (unit vectors: dot = cosine).
pub fn exact_top(data: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<u64> {
    let mut best: Vec<(f32, u64)> = Vec::with_capacity(k + 1);
    for (i, v) in data.chunks_exact(dim).enumerate() {
        let s = dot(q, v);
        if best.len() < k || s > best[best.len() - 1].0 {
            let at = best.partition_point(|(b, _)| *b >= s);
            best.insert(at, (s, i as u64));
            best.truncate(k);
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// Runs `f` over the queries on `threads` threads; queries per second.
pub fn qps(queries: &[f32], dim: usize, threads: usize, f: &(dyn Fn(&[f32]) + Sync)) -> f64 {
    let n = queries.len() / dim;
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in 0..threads {
            s.spawn(move || {
                for (i, q) in queries.chunks_exact(dim).enumerate() {
                    if i % threads == part {
                        f(q);
                    }
                }
            });
        }
    });
    n as f64 / t.elapsed().as_secs_f64()
}

/// The `p` quantile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Search latencies in ms, sorted: `search` over each query once.
pub fn latencies(
    queries: &[f32],
    dim: usize,
    mut search: impl FnMut(&[f32]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(queries.len() / dim);
    for q in queries.chunks_exact(dim) {
        let t = Instant::now();
        search(q)?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Search latencies in ms, sorted: `search` over the queries in turn for as long as `work`
/// runs on another thread (an index build on the other core).
pub fn latencies_during(
    queries: &[f32],
    dim: usize,
    work: impl FnOnce() -> anyhow::Result<()> + Send,
    mut search: impl FnMut(&[f32]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let running = std::sync::atomic::AtomicBool::new(true);
    let mut out = Vec::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let worker = s.spawn(|| {
            let r = work();
            running.store(false, std::sync::atomic::Ordering::Relaxed);
            r
        });
        let n = queries.len() / dim;
        let mut i = 0;
        while running.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            search(&queries[(i % n) * dim..][..dim])?;
            out.push(t.elapsed().as_secs_f64() * 1000.0);
            i += 1;
        }
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("the work thread panicked"))?
    })?;
    out.sort_by(f64::total_cmp);
    Ok(out)
}
