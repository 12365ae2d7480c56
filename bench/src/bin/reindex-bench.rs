//! `reindex-bench`: a reindex task from the built-in model to a local transformer model
//! (all-MiniLM-L6-v2) on a generated corpus, and the share of its time spent in the model.
//!
//! N documents of one chunk each are indexed with the built-in model (the baseline: the same
//! pipeline with a model that costs microseconds), then a blue/green reindex task moves the
//! flow to the local model, with one worker so that the model's own threads have the CPU. The
//! model's time is measured inside the embedder's calls ([`model_time`]): the rest is the
//! pipeline (reading, splitting, queue, lineage, collection writes, the switch).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use freshindex_core::{EmbedSpec, FlowSpec};
use freshindex_engine::steps::embed::model_time;
use freshindex_engine::{Engine, ReindexRequest, RunOptions, TaskRunOptions, TaskStatus};

const USAGE: &str = "\
usage: reindex-bench [--docs N] [--model PATH] [--workers W]

  --docs N      documents (default 20000)
  --model PATH  the model folder (default: $FRESHINDEX_TEST_MINILM, see scripts/fetch-test-model)
  --workers W   worker threads of the task (default 1: the model has its own threads)";

const WORDS: &[&str] = &[
    "index",
    "search",
    "vector",
    "model",
    "update",
    "source",
    "change",
    "document",
    "query",
    "cache",
    "lineage",
    "queue",
    "worker",
    "lease",
    "segment",
    "collection",
    "embedding",
    "chunk",
    "fresh",
    "stale",
    "delete",
    "insert",
    "schedule",
    "flow",
    "target",
    "row",
    "key",
    "version",
    "server",
    "client",
    "retry",
    "backoff",
    "metric",
    "latency",
    "throughput",
    "memory",
    "disk",
];

fn doc(i: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = format!("# Note {i}\n\n");
    for w in 0..48 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        out.push(if w % 12 == 11 { '.' } else { ' ' });
    }
    out.push('\n');
    out
}

fn main() -> Result<()> {
    let mut docs = 20_000usize;
    let mut model = std::env::var_os("FRESHINDEX_TEST_MINILM").map(PathBuf::from);
    let mut workers = 1usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--docs" => docs = value()?.parse().context("--docs")?,
            "--model" => model = Some(PathBuf::from(value()?)),
            "--workers" => workers = value()?.parse().context("--workers")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    let model =
        model.ok_or_else(|| anyhow!("no model: pass --model or set FRESHINDEX_TEST_MINILM"))?;
    let dir = tempfile::Builder::new()
        .prefix("reindex-bench-")
        .tempdir()?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    for i in 0..docs {
        std::fs::write(src.join(format!("n{i:06}.md")), doc(i))?;
    }
    let engine = Engine::open(&dir.path().join("data"))?;
    let spec = FlowSpec::quick_start("docs", src).map_err(|e| anyhow!(e))?;

    let t0 = Instant::now();
    let s = engine.run(&spec, &RunOptions::default())?;
    let builtin = t0.elapsed();
    eprintln!("indexed {} items with the built-in model", s.items.seen);

    let to = EmbedSpec::of_model(&format!("local:{}", model.display())).map_err(|e| anyhow!(e))?;
    // Loading the model is not the task's work.
    freshindex_engine::steps::embed::embedder_for(&to).map_err(|e| anyhow!(e))?;
    let task = engine.create_reindex(&ReindexRequest {
        flow: "docs".into(),
        to,
        deploy_as_blue: true,
        wait_on_conflict: false,
        batch_size: Some(200),
        max_failed_items: Some(0),
    })?;
    let model_before = model_time();
    let t1 = Instant::now();
    let t = engine.run_task(
        task.id,
        &TaskRunOptions {
            workers,
            ..TaskRunOptions::default()
        },
        None,
    )?;
    let reindex = t1.elapsed();
    let in_model = model_time() - model_before;
    if t.status != TaskStatus::Succeeded {
        bail!("the task ended {:?}: {:?}", t.status, t.error);
    }
    let secs = |d: std::time::Duration| d.as_secs_f64();
    println!(
        "reindex-bench: {docs} documents (one chunk each), built-in → all-MiniLM-L6-v2, blue/green, {workers} worker(s)"
    );
    println!();
    println!("| phase | seconds | docs/s | vs built-in |");
    println!("|---|---:|---:|---:|");
    println!(
        "| index with the built-in model (baseline) | {:.1} | {:.0} | 1.0× |",
        secs(builtin),
        docs as f64 / secs(builtin)
    );
    println!(
        "| reindex task to MiniLM (total) | {:.1} | {:.1} | {:.1}× |",
        secs(reindex),
        docs as f64 / secs(reindex),
        secs(reindex) / secs(builtin)
    );
    println!(
        "| of which inside the model | {:.1} | | {:.1}% of the task |",
        secs(in_model),
        100.0 * secs(in_model) / secs(reindex)
    );
    println!(
        "| of which the pipeline (the rest) | {:.1} | | {:.1}% of the task |",
        secs(reindex) - secs(in_model),
        100.0 * (1.0 - secs(in_model) / secs(reindex))
    );
    println!();
    println!(
        "task {}: {}/{} items, {} subtasks, switched: {}",
        t.id,
        t.count,
        t.total,
        t.children.len(),
        t.switched
    );
    Ok(())
}
