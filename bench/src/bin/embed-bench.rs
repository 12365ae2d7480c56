//! `embed-bench`: throughput of a local transformer embedding model (all-MiniLM-L6-v2), and
//! how much the embedding pipeline costs over the model's forward pass alone.
//!
//! N chunk-sized texts (about 100–250 tokens each, generated deterministically) are embedded
//! in batches of B through `Embedder::embed` (tokenize, group by length, forward pass,
//! pooling, back in input order). In the same run, the same batches are tokenized once up
//! front and only the forward pass and pooling are timed: the floor of the pipeline. The
//! overhead is the pipeline's time over that floor.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use freshindex_engine::steps::embed::local::{Batch, LocalEmbedder};
use freshindex_engine::steps::embed::{Embedder, LocalModel};

const USAGE: &str = "\
usage: embed-bench [--model PATH] [--texts N] [--batch B] [--threads T] [--runs R]

  --model PATH  the model folder (default: $FRESHINDEX_TEST_MINILM, see scripts/fetch-test-model)
  --texts N     texts embedded (default 512)
  --batch B     texts per embed call (default 32)
  --threads T   threads of the model (default: the available parallelism)
  --runs R      runs of each measure; the best is reported (default 2)";

struct Args {
    model: PathBuf,
    texts: usize,
    batch: usize,
    threads: Option<usize>,
    runs: usize,
}

fn parse_args() -> Result<Args> {
    let mut model = std::env::var_os("FRESHINDEX_TEST_MINILM").map(PathBuf::from);
    let (mut texts, mut batch, mut threads, mut runs) = (512, 32, None, 2);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--texts" => texts = value()?.parse().context("--texts")?,
            "--batch" => batch = value()?.parse().context("--batch")?,
            "--threads" => threads = Some(value()?.parse().context("--threads")?),
            "--runs" => runs = value()?.parse().context("--runs")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    let model = model.ok_or_else(|| {
        anyhow!("no model: pass --model PATH or set FRESHINDEX_TEST_MINILM\n{USAGE}")
    })?;
    if texts == 0 || batch == 0 || runs == 0 {
        bail!("--texts, --batch and --runs must be positive");
    }
    Ok(Args {
        model,
        texts,
        batch,
        threads,
        runs,
    })
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "index",
    "is",
    "updated",
    "when",
    "a",
    "file",
    "changes",
    "on",
    "disk",
    "and",
    "each",
    "chunk",
    "of",
    "text",
    "gets",
    "an",
    "embedding",
    "vector",
    "stored",
    "in",
    "collection",
    "search",
    "returns",
    "nearest",
    "neighbours",
    "by",
    "cosine",
    "similarity",
    "configuration",
    "flow",
    "reads",
    "documents",
    "from",
    "source",
    "splits",
    "them",
    "into",
    "chunks",
    "with",
    "overlap",
    "so",
    "that",
    "context",
    "is",
    "kept",
    "across",
    "boundaries",
    "server",
    "request",
    "response",
    "latency",
    "throughput",
    "memory",
    "thread",
    "pool",
    "queue",
    "worker",
    "batch",
    "model",
    "tokenizer",
    "transformer",
    "layer",
    "attention",
    "weights",
    "database",
    "table",
    "column",
    "row",
    "transaction",
    "commit",
    "rollback",
    "schema",
    "migration",
    "user",
    "account",
    "password",
    "session",
    "token",
    "cache",
    "expiry",
    "function",
    "returns",
    "error",
    "value",
    "string",
    "number",
    "list",
    "map",
    "key",
    "for",
    "example",
    "because",
    "however",
    "therefore",
    "before",
    "after",
    "during",
    "while",
    "every",
    "small",
    "large",
    "fast",
    "slow",
    "new",
    "old",
    "first",
    "last",
    "next",
    "previous",
    "Kubernetes",
    "deployment",
    "container",
    "image",
    "registry",
    "network",
    "policy",
    "HTTP",
    "JSON",
    "payload",
    "field",
    "timestamp",
    "2024-05-17",
    "v1.2.3",
    "config.toml",
    "README",
    "fn",
    "let",
    "mut",
    "impl",
    "struct",
    "async",
    "await",
    "None",
    "Some(x)",
    "Ok(())",
    "=>",
];

/// A chunk-like text of `words` words: sentences of 6–20 words.
fn text(rng: &mut Rng, words: usize) -> String {
    let mut s = String::new();
    let mut in_sentence = 0;
    let mut sentence_len = 6 + rng.below(15);
    for _ in 0..words {
        let w = WORDS[rng.below(WORDS.len())];
        if in_sentence == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push(' ');
            s.push_str(w);
        }
        in_sentence += 1;
        if in_sentence == sentence_len {
            s.push_str(". ");
            in_sentence = 0;
            sentence_len = 6 + rng.below(15);
        }
    }
    s
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let mut rng = Rng(42);
    let texts: Vec<String> = (0..args.texts)
        .map(|_| {
            let n = 75 + rng.below(110);
            text(&mut rng, n)
        })
        .collect();
    let chunks: Vec<Vec<&str>> = texts
        .chunks(args.batch)
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();

    let t = Instant::now();
    let model = LocalEmbedder::load(
        &LocalModel::Path(args.model.display().to_string()),
        args.threads,
    )
    .map_err(|e| anyhow!(e))?;
    let load = t.elapsed();

    // Warm-up: the first pass allocates and spins up threads.
    model.embed(&chunks[0]).map_err(|e| anyhow!(e))?;

    let batches: Vec<Batch> = chunks
        .iter()
        .map(|c| model.tokenize(c))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!(e))?;
    let tokens: usize = batches.iter().map(Batch::real_tokens).sum();
    let padded: usize = batches.iter().map(|b| b.rows() * b.seq_len()).sum();

    let mut pipeline = Duration::MAX;
    let mut forward = Duration::MAX;
    for _ in 0..args.runs {
        // Interleaved, so that both see the same machine.
        pipeline = pipeline.min(best_of(1, || {
            for c in &chunks {
                model.embed(c).map_err(|e| anyhow!(e))?;
            }
            Ok(())
        })?);
        forward = forward.min(best_of(1, || {
            for b in &batches {
                model.forward(b).map_err(|e| anyhow!(e))?;
            }
            Ok(())
        })?);
    }
    let tokenize = best_of(args.runs, || {
        for c in &chunks {
            model.tokenize(c).map_err(|e| anyhow!(e))?;
        }
        Ok(())
    })?;

    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    println!(
        "model {} (max {} tokens), {} texts in batches of {}, {} threads, best of {}",
        args.model.display(),
        model.max_len(),
        texts.len(),
        args.batch,
        threads,
        args.runs
    );
    println!(
        "{tokens} tokens ({:.0} per text), {:.1}% padding; load {:.2} s",
        tokens as f64 / texts.len() as f64,
        100.0 * (padded - tokens) as f64 / padded as f64,
        load.as_secs_f64()
    );
    println!();
    println!(
        "{:<26}{:>10}{:>14}{:>12}{:>12}",
        "measure", "time", "sentences/s", "tokens/s", "vs forward"
    );
    let row = |name: &str, d: Duration| {
        let s = d.as_secs_f64();
        println!(
            "{:<26}{:>8.2} s{:>14.1}{:>12.0}{:>11.1}%",
            name,
            s,
            texts.len() as f64 / s,
            tokens as f64 / s,
            100.0 * (s / forward.as_secs_f64() - 1.0)
        );
    };
    row("embed (pipeline)", pipeline);
    row("forward + pooling only", forward);
    println!(
        "{:<26}{:>8.3} s{:>14.1}",
        "tokenize only",
        tokenize.as_secs_f64(),
        texts.len() as f64 / tokenize.as_secs_f64()
    );
    println!();
    println!(
        "pipeline overhead over the forward pass: {:.1}% (target under 10%)",
        100.0 * (pipeline.as_secs_f64() / forward.as_secs_f64() - 1.0)
    );
    Ok(())
}
