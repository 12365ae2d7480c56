//! `freshindex reindex …`: move a flow to another embedding model in this process (see
//! `freshindex_engine::reindex`), roll a switch back, and look at tasks. While a `serve` runs
//! on the data directory, use its API instead (`POST /v1/tasks/reindex`): the server writes
//! the flow's collection.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use freshindex_core::EmbedSpec;
use freshindex_engine::{
    Engine, ReindexRequest, ReindexTask, RunOptions, TaskRunOptions, TaskStatus,
};

/// Options of a new reindex task.
#[derive(Args, Debug)]
pub struct ReindexArgs {
    /// The flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// The destination model: `builtin`, `local:PATH`, `hf:ORG/NAME` or `openai:MODEL`.
    #[arg(long)]
    pub to: Option<String>,
    /// Blue/green: build a new collection beside the serving one and switch the flow to it
    /// when it is complete (the old one is kept for `reindex rollback`).
    #[arg(long)]
    pub blue: bool,
    /// Wait for another task of the flow to end instead of failing.
    #[arg(long)]
    pub wait_on_conflict: bool,
    /// Items per subtask.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: Option<u32>,
    /// Failed items allowed before the task fails (and does not switch); -1: no limit.
    /// Default: the flow's max_failed_items.
    #[arg(long, allow_hyphen_values = true)]
    pub max_failed_items: Option<i64>,
    /// Worker threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Print the task as JSON at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ReindexCommand {
    /// Switch the flow back to its state and collection before the last switch, and bring
    /// it up to date.
    Rollback {
        /// The flow.
        #[arg(long)]
        flow: String,
    },
    /// Drop the state and collection the last switch kept for a rollback.
    DropPrevious {
        /// The flow.
        #[arg(long)]
        flow: String,
    },
    /// Reindex tasks, newest first.
    List {
        /// Only this flow's.
        #[arg(long)]
        flow: Option<String>,
    },
    /// One task as JSON, with its subtasks.
    Show {
        /// Task id.
        id: u64,
    },
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: u64,
    },
    /// Queue a task's failed items again and run it to its end.
    RetryFailed {
        /// Task id.
        id: u64,
    },
}

fn print_task(t: &ReindexTask, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(t)?);
        return Ok(());
    }
    println!(
        "task {} ({} → {}): {} — {}/{} items, {} failed{}",
        t.id,
        t.source.model,
        t.dest.model,
        serde_json::to_string(&t.status)?.trim_matches('"'),
        t.count,
        t.total,
        t.failed_count,
        t.error
            .as_ref()
            .map(|e| format!("; {e}"))
            .unwrap_or_default()
    );
    for f in t.failed_items.iter().take(20) {
        println!("  failed {} [{}]: {}", f.item, f.stage, f.error);
    }
    if t.switched {
        println!(
            "switched: flow `{}` now reads {}",
            t.flow,
            t.new_collection.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// Runs a task here until it ends; waits while another task of the flow is active.
fn drive(engine: &Engine, id: u64, workers: Option<u16>) -> Result<ReindexTask> {
    let opts = TaskRunOptions {
        workers: workers.map_or_else(freshindex_engine::default_workers, usize::from),
        ..TaskRunOptions::default()
    };
    loop {
        let t = engine.run_task(id, &opts, None)?;
        match t.status {
            TaskStatus::Waiting | TaskStatus::Pending | TaskStatus::Running => {
                std::thread::sleep(Duration::from_millis(500));
            }
            _ => return Ok(t),
        }
    }
}

/// `freshindex reindex` with its options, or one of its subcommands.
pub fn run(data_dir: &Path, args: ReindexArgs, command: Option<ReindexCommand>) -> Result<bool> {
    let engine = crate::open_engine(data_dir)?;
    match command {
        None => {
            let (Some(flow), Some(to)) = (args.flow, args.to) else {
                bail!(
                    "reindex: --flow and --to are required (or a subcommand: rollback, list, show, cancel, retry-failed, drop-previous)"
                );
            };
            let to = EmbedSpec::of_model(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            let t = engine.create_reindex(&ReindexRequest {
                flow,
                to,
                deploy_as_blue: args.blue,
                wait_on_conflict: args.wait_on_conflict,
                batch_size: args.batch_size.map(|n| n as usize),
                max_failed_items: args.max_failed_items,
            })?;
            if !args.json {
                eprintln!("task {} created", t.id);
            }
            let t = drive(&engine, t.id, args.workers)?;
            print_task(&t, args.json)?;
            Ok(t.status == TaskStatus::Succeeded)
        }
        Some(ReindexCommand::Rollback { flow }) => {
            let r = engine.rollback(&flow, &RunOptions::default())?;
            println!(
                "flow `{}` reads {} again (model {}); {} is kept (a second rollback switches back)",
                r.flow, r.collection, r.model, r.left
            );
            Ok(true)
        }
        Some(ReindexCommand::DropPrevious { flow }) => {
            match engine.drop_previous(&flow)? {
                Some(c) => println!("dropped {c} and the state kept with it"),
                None => println!("flow `{flow}` keeps no previous state"),
            }
            Ok(true)
        }
        Some(ReindexCommand::List { flow }) => {
            for t in engine.tasks(flow.as_deref())? {
                print_task(&t, false)?;
            }
            Ok(true)
        }
        Some(ReindexCommand::Show { id }) => {
            let t = engine.task(id)?;
            let mut v = serde_json::to_value(&t)?;
            v["subtasks"] = serde_json::to_value(engine.subtasks(id)?)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(true)
        }
        Some(ReindexCommand::Cancel { id }) => {
            print_task(&engine.cancel_task(id)?, false)?;
            Ok(true)
        }
        Some(ReindexCommand::RetryFailed { id }) => {
            engine.retry_failed(id)?;
            let t = drive(&engine, id, args.workers)?;
            print_task(&t, args.json)?;
            Ok(t.status == TaskStatus::Succeeded)
        }
    }
}
