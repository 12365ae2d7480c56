//! `freshindex`: keep a vector index in sync with a folder, recomputing only what changed.
//!
//! One process, one thread doing the work (see `freshindex-engine`); progress bars are drawn
//! by indicatif's own ticker thread when stderr is a terminal.

mod collections_cmd;
mod index_node;
mod progress;
mod queue_cmd;
mod reindex_cmd;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};

use freshindex_core::config::REFERENCE_CONFIG;
use freshindex_core::spec::sanitize_name;
use freshindex_core::{Config, FlowSpec};
use freshindex_engine::{Engine, RunEntry, RunOptions, RunStatus, RunSummary, default_workers};

/// Keep AI and search indexes fresh: detect what changed in a source, recompute only that,
/// apply the minimal changes to the target index.
#[derive(Parser, Debug)]
#[command(name = "freshindex", version, about)]
struct Cli {
    /// Data directory holding the state and the collections.
    #[arg(
        long,
        global = true,
        env = "FRESHINDEX_DATA_DIR",
        default_value = ".freshindex"
    )]
    data_dir: PathBuf,
    /// Configuration file (default: ./freshindex.toml when it exists).
    #[arg(long, global = true, env = "FRESHINDEX_CONFIG")]
    config: Option<PathBuf>,
    /// State store shared by every process of a deployment: a postgres:// URL (default: the
    /// config's `store`, else the data directory's embedded SQLite store).
    #[arg(long, global = true, env = "FRESHINDEX_STORE", hide_env_values = true)]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring a flow's target in line with its source (incremental).
    Index {
        /// Index this folder with the default flow (no config needed).
        path: Option<PathBuf>,
        /// Run only this flow of the config.
        #[arg(long)]
        flow: Option<String>,
        /// Print one JSON object per flow on stdout (an array when several flows run).
        #[arg(long)]
        json: bool,
        /// Worker threads polling the flow's indexing queue (default: one per core).
        #[arg(long, env = "FRESHINDEX_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: Option<u16>,
        /// Lease of a polled batch, in seconds (workers extend it while they work).
        #[arg(long, env = "FRESHINDEX_LEASE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=86_400))]
        lease_secs: u32,
        /// Live mode: after the run, keep watching the folder and index each change as it
        /// happens, until Ctrl-C or SIGTERM (one flow).
        #[arg(long)]
        watch: bool,
    },
    /// Search a flow's target.
    Search {
        /// The query text.
        query: String,
        /// How many chunks to return.
        #[arg(short, long, default_value_t = 5)]
        k: usize,
        /// The flow to search (needed when several flows ran in this data directory).
        #[arg(long)]
        flow: Option<String>,
        /// Only chunks whose source path starts with this prefix.
        #[arg(long)]
        source_prefix: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print every row of a flow's target as JSON Lines, sorted by key.
    Export {
        /// The flow to export.
        #[arg(long)]
        flow: Option<String>,
    },
    /// Items by status, rows, cache size and the last run of a flow.
    Status {
        /// The flow (default: every flow of the data directory).
        #[arg(long)]
        flow: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A flow's execution history: its runs and resets, newest first.
    History {
        /// The flow (default: every flow of the data directory).
        #[arg(long)]
        flow: Option<String>,
        /// The flow, as a positional argument (`freshindex history docs`).
        #[arg(value_name = "FLOW", conflicts_with = "flow")]
        flow_arg: Option<String>,
        /// Entries per flow (the newest; at least the last 50 are kept).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// JSON output: one array of entries, newest first per flow.
        #[arg(long)]
        json: bool,
    },
    /// Forget a flow's state so that the next `index` reprocesses every item (its rows are
    /// deleted from the target; the embedding cache is kept unless --drop-cache), or with
    /// --items, only those items.
    Reset {
        /// The flow (needed when several flows ran in this data directory).
        #[arg(long)]
        flow: Option<String>,
        /// Also drop the flow's embedding cache: the next run computes every embedding again.
        #[arg(long, conflicts_with = "items")]
        drop_cache: bool,
        /// Reset only these items (keys as `queue list` shows them): the next run reads and
        /// reprocesses exactly them; nothing is deleted. Unknown keys are reported.
        #[arg(long, num_args = 1.., value_name = "KEY")]
        items: Vec<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Create what the config's flows need outside the program (the notify trigger of a
    /// `postgres` source with `notify = true`, a `postgres` target's table; optional: a run
    /// creates the table too). Says what was created or already there.
    Setup {
        /// Only this flow of the config.
        #[arg(long)]
        flow: Option<String>,
    },
    /// Remove what `setup` creates (a `postgres` source's trigger; a `postgres` target's
    /// table: DROP TABLE IF EXISTS, and the flow's state for that target).
    Drop {
        /// Only this flow of the config.
        #[arg(long)]
        flow: Option<String>,
    },
    /// Write a commented freshindex.toml showing every option.
    Init {
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Build index files for a `freshindex serve` (the coordinator) until stopped: registers,
    /// takes builds over HTTP, reads segment files and writes index files in the folder the
    /// coordinator names (shared by both), and reports them.
    IndexNode {
        /// The coordinator's base URL, e.g. http://10.0.0.5:7700.
        #[arg(long, env = "FRESHINDEX_COORDINATOR")]
        coordinator: String,
        /// Bearer token of the coordinator.
        #[arg(long, env = "FRESHINDEX_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// What this node calls itself (default: hostname:pid).
        #[arg(long)]
        address: Option<String>,
        /// Threads per build (default: one per core).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: Option<u16>,
    },
    /// Serve the HTTP API (queue verbs, search, metrics) until SIGTERM or Ctrl-C.
    Serve {
        /// Address to listen on; port 0 picks a free one. The first line on stdout says
        /// which (`listening on http://ADDR`).
        #[arg(long, env = "FRESHINDEX_LISTEN", default_value = "127.0.0.1:7700")]
        listen: std::net::SocketAddr,
        /// Bearer token every request but /healthz must carry; required on a non-loopback
        /// address.
        #[arg(long, env = "FRESHINDEX_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Lease of polled items, in seconds.
        #[arg(long, env = "FRESHINDEX_LEASE_SECS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        lease_secs: u64,
        /// Shortest schedule interval a flow may have (ISO 8601 duration such as PT5M;
        /// lower it for tests, not below PT1S).
        #[arg(long, env = "FRESHINDEX_MIN_SCHEDULE_INTERVAL", default_value = "PT5M",
              value_parser = parse_interval)]
        min_schedule_interval: freshindex_core::Interval,
        /// Most runs (scheduled and on demand) in progress at once; further due runs wait
        /// for a slot in order of due time.
        #[arg(long, env = "FRESHINDEX_MAX_CONCURRENT_RUNS", default_value_t = 2,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        max_concurrent_runs: u16,
        /// Serve the API only: no scheduled runs, no live flows (on-demand runs still work).
        #[arg(long)]
        no_scheduler: bool,
        /// Build threads of the server's own index node (0: leave index builds to
        /// `freshindex index-node` processes).
        #[arg(long, env = "FRESHINDEX_INDEX_THREADS", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(0..=64))]
        index_threads: u16,
        /// Seconds without a heartbeat after which an index node is declared lost and its
        /// builds go to other nodes.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        index_heartbeat_timeout_secs: u64,
        /// What this process does among several sharing a PostgreSQL store: `all`, `worker`
        /// (processes the batches of runs in progress, starts none) or `scheduler` (starts
        /// runs, one leader at a time; leaves processing to the workers).
        #[arg(long, env = "FRESHINDEX_ROLE", default_value = "all")]
        role: freshindex_server::Role,
        /// Worker threads of each run this process starts (default: one per core; with
        /// `--role scheduler`: 0, the workers of other processes do the work).
        #[arg(long, value_parser = clap::value_parser!(u16).range(0..=256))]
        run_workers: Option<u16>,
    },
    /// The collections of the local data directory: list, describe, create, drop, alias,
    /// unalias, compact, build-indexes.
    Collections {
        #[command(subcommand)]
        command: collections_cmd::CollectionsCommand,
    },
    /// Move a flow to another embedding model (a reindex task, run here), or: rollback,
    /// drop-previous, list, show, cancel, retry-failed.
    #[command(args_conflicts_with_subcommands = true)]
    Reindex {
        #[command(flatten)]
        args: reindex_cmd::ReindexArgs,
        #[command(subcommand)]
        command: Option<reindex_cmd::ReindexCommand>,
    },
    /// The indexing queue of the local data directory (no server): list, show, push, poll,
    /// unreserve, delete-queue-items.
    Queue {
        #[command(subcommand)]
        command: queue_cmd::QueueCommand,
    },
}

/// One line of `freshindex export`.
#[derive(serde::Serialize)]
struct ExportLine<'a> {
    key: &'a str,
    source: &'a str,
    range: [usize; 2],
    text: &'a str,
    vector: &'a [f32],
}

/// `--min-schedule-interval`: an ISO 8601 duration of at least one second.
fn parse_interval(text: &str) -> Result<freshindex_core::Interval, String> {
    freshindex_core::Interval::parse(text)
}

/// Exit code when a run completed but failed items exceeded `max_failed_items`.
const EXIT_TOO_MANY_FAILURES: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line naming the cause.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("freshindex: error: {}", chain.join(": ").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The state store every command opens (see [`Cli::store`]), settled once at start.
static STORE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

fn run(cli: Cli) -> Result<ExitCode> {
    let store = cli.store.clone().filter(|s| !s.is_empty()).or_else(|| {
        config_path(cli.config.as_deref())
            .and_then(|p| Config::load(&p).ok())
            .and_then(|c| c.store)
    });
    let _ = STORE.set(store);
    match cli.command {
        Command::Init { force } => {
            let path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("freshindex.toml"));
            if path.exists() && !force {
                bail!(
                    "{} already exists; pass --force to overwrite it",
                    path.display()
                );
            }
            std::fs::write(&path, REFERENCE_CONFIG)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            token,
            lease_secs,
            min_schedule_interval,
            max_concurrent_runs,
            no_scheduler,
            index_threads,
            index_heartbeat_timeout_secs,
            role,
            run_workers,
        } => {
            let flows = match config_path(cli.config.as_deref()) {
                Some(p) => Config::load(&p)?.flows,
                None => Vec::new(),
            };
            if role != freshindex_server::Role::All && store_url().is_none() {
                bail!(
                    "--role {}: roles divide the work of processes that share a PostgreSQL store; pass --store postgres://… (or set `store` in the config)",
                    match role {
                        freshindex_server::Role::Worker => "worker",
                        _ => "scheduler",
                    }
                );
            }
            serve(freshindex_server::ServeOptions {
                data_dir: cli.data_dir.clone(),
                store: store_url().map(str::to_string),
                role,
                flows,
                listen,
                token,
                lease: std::time::Duration::from_secs(lease_secs),
                control: freshindex_server::ControlOptions {
                    min_schedule_interval,
                    max_concurrent_runs: usize::from(max_concurrent_runs),
                    scheduler: !no_scheduler && role != freshindex_server::Role::Worker,
                    run_workers: match (run_workers, role) {
                        (Some(n), _) => Some(usize::from(n)),
                        (None, freshindex_server::Role::Scheduler) => Some(0),
                        (None, _) => None,
                    },
                },
                index_threads: usize::from(index_threads),
                index_heartbeat_timeout: std::time::Duration::from_secs(
                    index_heartbeat_timeout_secs,
                ),
            })
        }
        Command::IndexNode {
            coordinator,
            token,
            address,
            threads,
        } => {
            let address = address.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into());
                format!("{host}:{}", std::process::id())
            });
            index_node::run(index_node::NodeOptions {
                coordinator,
                token,
                address,
                threads: threads.map_or_else(default_workers, usize::from),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Collections { command } => {
            collections_cmd::run(&cli.data_dir, command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reindex { args, command } => {
            if reindex_cmd::run(&cli.data_dir, args, command)? {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(EXIT_TOO_MANY_FAILURES))
            }
        }
        Command::Queue { command } => {
            queue_cmd::run(&cli.data_dir, cli.config.as_deref(), command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Index {
            path,
            flow,
            json,
            workers,
            lease_secs,
            watch,
        } => {
            let (flows, inputs) =
                flows_to_run(cli.config.as_deref(), path.as_deref(), flow.as_deref())?;
            let engine = open_engine(&cli.data_dir)?;
            // Flows the chosen one reads are defined (not run) when the data directory does
            // not know them yet.
            // Flows that read others, and the flows they read, are defined before any runs,
            // so that each knows its readers from its first run (it then keeps the documents
            // they read).
            let linked: Vec<&FlowSpec> = flows
                .iter()
                .filter(|f| {
                    f.is_multi_input()
                        || flows.iter().any(|g| g.inputs().contains(&f.name.as_str()))
                })
                .collect();
            if !watch {
                for spec in linked {
                    engine
                        .define_flow(spec)
                        .with_context(|| format!("defining flow `{}`", spec.name))?;
                }
            }
            for spec in &inputs {
                if engine.flow(&spec.name).is_err() {
                    engine
                        .define_flow(spec)
                        .with_context(|| format!("defining flow `{}`", spec.name))?;
                }
            }
            if watch {
                let [spec] = flows.as_slice() else {
                    bail!(
                        "--watch keeps one flow fresh; the config has {} flows: choose one with --flow",
                        flows.len()
                    );
                };
                return watch_flow(&engine, spec, json, workers, lease_secs);
            }
            // Every flow gets its run: one that cannot run is reported and the others go on.
            let mut results: Vec<serde_json::Value> = Vec::new();
            let (mut could_not_run, mut too_many_failures) = (false, false);
            for spec in &flows {
                let progress = progress::for_terminal(&spec.name, std::io::stderr().is_terminal());
                let opts = RunOptions {
                    progress: progress.as_ref(),
                    workers: workers.map_or_else(default_workers, usize::from),
                    lease_ms: i64::from(lease_secs) * 1000,
                    ..RunOptions::default()
                };
                let outcome = engine.run(spec, &opts);
                drop(progress);
                match outcome {
                    Ok(summary) => {
                        if !json {
                            print_summary(&summary);
                        }
                        // Indexes of the segments the run sealed, so that searches are fast
                        // from the start. A failure leaves them to exact search.
                        // A table outside the data directory has no segments to index.
                        let Some(collection) = spec.target.collection() else {
                            too_many_failures |= summary.status == RunStatus::Failed;
                            results.push(serde_json::to_value(&summary)?);
                            continue;
                        };
                        match engine.build_indexes_now(collection, default_workers()) {
                            Ok(0) => {}
                            Ok(n) if !json => {
                                println!("  indexes: {n} segment(s) of `{collection}` indexed");
                            }
                            Ok(_) => {}
                            Err(e) => eprintln!(
                                "freshindex: warning: flow `{}`: indexes not built (searches stay exact): {e}",
                                spec.name
                            ),
                        }
                        too_many_failures |= summary.status == RunStatus::Failed;
                        results.push(serde_json::to_value(&summary)?);
                    }
                    Err(e) if flows.len() == 1 => {
                        return Err(anyhow!(e).context(format!("flow `{}`", spec.name)));
                    }
                    Err(e) => {
                        could_not_run = true;
                        let message = e.to_string().replace('\n', " ");
                        eprintln!("freshindex: error: flow `{}`: {message}", spec.name);
                        results.push(serde_json::json!({
                            "flow": spec.name,
                            "status": "error",
                            "error": message,
                        }));
                    }
                }
            }
            if json {
                let out = if results.len() == 1 {
                    serde_json::to_string(&results[0])?
                } else {
                    serde_json::to_string(&results)?
                };
                println!("{out}");
            }
            if could_not_run {
                return Ok(ExitCode::FAILURE);
            }
            if too_many_failures {
                eprintln!("freshindex: error: failed items exceed max_failed_items");
                return Ok(ExitCode::from(EXIT_TOO_MANY_FAILURES));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Search {
            query,
            k,
            flow,
            source_prefix,
            json,
        } => {
            let engine = open_engine(&cli.data_dir)?;
            let flow = pick_flow(&engine, cli.config.as_deref(), flow)?;
            let filter = source_prefix.map(|p| freshindex_vector::Filter {
                source_prefix: Some(p),
            });
            let hits = engine.search(&flow, &query, k, filter.as_ref())?;
            let mut out = std::io::stdout().lock();
            if json {
                let v: Vec<serde_json::Value> = hits
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "key": h.key,
                            "source": h.payload.source,
                            "range": h.payload.range,
                            "score": h.score,
                            "text": h.payload.text,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else if hits.is_empty() {
                writeln!(out, "no results")?;
            } else {
                for (i, h) in hits.iter().enumerate() {
                    writeln!(
                        out,
                        "{}. {} [{}..{}]  score {:.4}\n   {}",
                        i + 1,
                        h.payload.source,
                        h.payload.range[0],
                        h.payload.range[1],
                        h.score,
                        snippet(&h.payload.text, 240)
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { flow } => {
            let engine = open_engine(&cli.data_dir)?;
            let flow = pick_flow(&engine, cli.config.as_deref(), flow)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut closed = false;
            let result = engine.export(&flow, &mut |row| {
                let line = ExportLine {
                    key: &row.key,
                    source: &row.payload.source,
                    range: row.payload.range,
                    text: &row.payload.text,
                    vector: &row.vector,
                };
                let written = serde_json::to_writer(&mut out, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"));
                written.map_err(|e| {
                    closed = e.kind() == std::io::ErrorKind::BrokenPipe;
                    freshindex_engine::EngineError::Config(format!("writing stdout: {e}"))
                })
            });
            match result.and_then(|()| {
                out.flush().map_err(|e| {
                    closed = e.kind() == std::io::ErrorKind::BrokenPipe;
                    freshindex_engine::EngineError::Config(format!("writing stdout: {e}"))
                })
            }) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                // The reader went away (`| head`): not an error of ours.
                Err(_) if closed => Ok(ExitCode::SUCCESS),
                Err(e) => Err(e.into()),
            }
        }
        Command::History {
            flow,
            flow_arg,
            limit,
            json,
        } => {
            let engine = open_engine(&cli.data_dir)?;
            let names = match flow.or(flow_arg) {
                Some(f) => vec![f],
                None => engine.stored_flows()?.into_iter().map(|f| f.name).collect(),
            };
            let histories = names
                .iter()
                .map(|n| engine.history(n, limit as usize).map(|h| (n, h)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = std::io::stdout().lock();
            if json {
                let all: Vec<&RunEntry> = histories.iter().flat_map(|(_, h)| h).collect();
                writeln!(out, "{}", serde_json::to_string(&all)?)?;
            } else if histories.is_empty() {
                writeln!(out, "no flow has run in {}", cli.data_dir.display())?;
            } else {
                for (name, entries) in &histories {
                    writeln!(out, "flow {name}")?;
                    if entries.is_empty() {
                        writeln!(out, "  no runs yet")?;
                    } else {
                        write!(out, "{}", history_table(entries))?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup { ref flow } | Command::Drop { ref flow } => {
            let setup = matches!(cli.command, Command::Setup { .. });
            let Some(path) = config_path(cli.config.as_deref()) else {
                bail!(
                    "no freshindex.toml in the current directory; pass --config or write one with `freshindex init`"
                );
            };
            let config = Config::load(&path)?;
            let flows = match flow {
                Some(name) => vec![config.flow(name).map_err(|e| anyhow!(e))?.clone()],
                None => config.flows,
            };
            let engine = open_engine(&cli.data_dir)?;
            for spec in &flows {
                let lines = if setup {
                    engine.setup_flow(spec)
                } else {
                    engine.drop_flow_resources(spec)
                }
                .with_context(|| format!("flow `{}`", spec.name))?;
                for line in lines {
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reset {
            flow,
            drop_cache,
            items,
            json,
        } => {
            let engine = open_engine(&cli.data_dir)?;
            let flow = pick_flow(&engine, cli.config.as_deref(), flow)?;
            if items.is_empty() {
                let r = engine.reset(&flow, drop_cache)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{}: reset — forgot {} item{}, deleted {} row{}; embedding cache {} ({} entries). The next `index` reprocesses every item.",
                        r.flow,
                        r.items,
                        plural(r.items),
                        r.rows_deleted,
                        plural(r.rows_deleted),
                        if r.cache_dropped { "dropped" } else { "kept" },
                        r.cache_entries
                    );
                }
            } else {
                let r = engine.reset_items(&flow, &items)?;
                for key in &r.unknown {
                    eprintln!(
                        "freshindex: warning: flow `{}` has no item `{key}`; nothing to reset",
                        r.flow
                    );
                }
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let n = r.reset.len() as u64;
                    println!(
                        "{}: reset {n} item{}; the next `index` reprocesses {}.",
                        r.flow,
                        plural(n),
                        if n == 1 { "it" } else { "them" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { flow, json } => {
            let engine = open_engine(&cli.data_dir)?;
            let names = match flow {
                Some(f) => vec![f],
                None => engine.stored_flows()?.into_iter().map(|f| f.name).collect(),
            };
            let statuses = names
                .iter()
                .map(|n| engine.status(n))
                .collect::<Result<Vec<_>, _>>()?;
            if json {
                let out = if statuses.len() == 1 {
                    serde_json::to_string(&statuses[0])?
                } else {
                    serde_json::to_string(&statuses)?
                };
                println!("{out}");
            } else if statuses.is_empty() {
                println!("no flow has run in {}", cli.data_dir.display());
            } else {
                for s in statuses {
                    println!("flow {} → {}", s.flow, s.target);
                    let items: Vec<String> =
                        s.items.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    println!("  items  {}", items.join(" · "));
                    println!("  rows   {}", s.rows);
                    println!(
                        "  cache  {} entries, {}",
                        s.cache_entries,
                        freshindex_core::spec::ByteSize(s.cache_bytes)
                    );
                    if let Some(last) = s.last_run
                        && let Ok(sum) = serde_json::from_value::<RunSummary>(last)
                    {
                        println!(
                            "  last run: {} in {} ms, {} new, {} modified, {} deleted, {} failed",
                            match sum.status {
                                RunStatus::Success => "success",
                                RunStatus::Failed => "failed",
                            },
                            sum.elapsed_ms,
                            sum.items.new,
                            sum.items.modified,
                            sum.items.deleted,
                            sum.items.failed
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `freshindex index --watch`: live mode until Ctrl-C or SIGTERM. A line per run or batch on
/// stderr (and its JSON summary on stdout with `--json`).
fn watch_flow(
    engine: &Engine,
    spec: &freshindex_core::FlowSpec,
    json: bool,
    workers: Option<u16>,
    lease_secs: u32,
) -> Result<ExitCode> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handlers")?;
    }
    let opts = RunOptions {
        workers: workers.map_or_else(default_workers, usize::from),
        lease_ms: i64::from(lease_secs) * 1000,
        ..RunOptions::default()
    };
    let live = freshindex_engine::LiveOptions {
        refresh_interval: spec
            .mode()
            .refresh_interval()
            .map(|i| i.as_std())
            .or(freshindex_engine::LiveOptions::default().refresh_interval),
        ..freshindex_engine::LiveOptions::default()
    };
    let path = match (spec.files(), spec.postgres()) {
        (Some(f), _) => f.path.display().to_string(),
        (None, Some(pg)) => pg
            .table
            .as_deref()
            .map_or_else(|| "the query".to_string(), |t| format!("table {t}")),
        (None, None) => String::new(),
    };
    let mut first = true;
    let mut report = |event: freshindex_engine::LiveEvent| {
        let (kind, summary) = match &event {
            freshindex_engine::LiveEvent::Full(s) => ("full scan", s),
            freshindex_engine::LiveEvent::Batch(s) => ("changes", s),
        };
        let i = &summary.items;
        eprintln!(
            "[{}] {kind}: {} new, {} modified, {} deleted, {} failed; {} embeddings computed ({} ms)",
            spec.name,
            i.new,
            i.modified,
            i.deleted,
            i.failed,
            summary.embeddings.computed,
            summary.elapsed_ms
        );
        if first {
            eprintln!("[{}] watching {path} (Ctrl-C to stop)", spec.name);
            first = false;
        }
        if json && let Ok(line) = serde_json::to_string(summary) {
            println!("{line}");
        }
    };
    engine
        .watch(
            spec,
            &opts,
            &live,
            &freshindex_engine::LiveControl::with_stop_flag(stop),
            &mut report,
        )
        .with_context(|| format!("flow `{}`", spec.name))?;
    eprintln!("[{}] stopped", spec.name);
    Ok(ExitCode::SUCCESS)
}

/// `freshindex serve`: logs on stderr, the bound address as the first line of stdout.
fn serve(opts: freshindex_server::ServeOptions) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let report = freshindex_server::run(opts, |addr| {
        let mut out = std::io::stdout().lock();
        // Scripts and tests wait for this line to learn the port.
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })?;
    eprintln!(
        "stopped; released {} lease{} this server handed out",
        report.leases_released,
        if report.leases_released == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

/// The state store URL the commands use, if not the embedded one.
fn store_url() -> Option<&'static str> {
    STORE.get().and_then(|s| s.as_deref())
}

/// Opens the engine over the data directory and the state store the command line or the
/// config names.
pub(crate) fn open_engine(data_dir: &Path) -> Result<Engine> {
    match store_url() {
        Some(url) => Engine::open_with_store(data_dir, Some(url)).with_context(|| {
            format!(
                "state store {}",
                freshindex_engine::distributed::redact(url)
            )
        }),
        None => Engine::open(data_dir).with_context(|| format!("data dir {}", data_dir.display())),
    }
}

/// The config file to use: the explicit one, or ./freshindex.toml when present.
fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let p = PathBuf::from("freshindex.toml");
            p.exists().then_some(p)
        }
    }
}

fn flows_to_run(
    config: Option<&Path>,
    path: Option<&Path>,
    flow: Option<&str>,
) -> Result<(Vec<FlowSpec>, Vec<FlowSpec>)> {
    if let Some(path) = path {
        let abs = std::fs::canonicalize(path)
            .with_context(|| format!("source path {}", path.display()))?;
        if !abs.is_dir() {
            bail!("source path {} is not a folder", path.display());
        }
        let name = flow.map(str::to_string).unwrap_or_else(|| {
            sanitize_name(
                &abs.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        });
        return Ok((
            vec![FlowSpec::quick_start(&name, abs).map_err(|e| anyhow!(e))?],
            Vec::new(),
        ));
    }
    let Some(config) = config_path(config) else {
        bail!(
            "no freshindex.toml in the current directory; pass a folder (`freshindex index PATH`) or write a config with `freshindex init`"
        );
    };
    let config = Config::load(&config)?;
    let all: Vec<&FlowSpec> = config.flows.iter().collect();
    match flow {
        Some(name) => {
            let spec = config.flow(name).map_err(|e| anyhow!(e))?;
            // The flows it reads, inputs first, so that the engine knows them.
            let mut needed: Vec<&str> = spec.inputs();
            let mut i = 0;
            while i < needed.len() {
                if let Ok(f) = config.flow(needed[i]) {
                    for n in f.inputs() {
                        if !needed.contains(&n) {
                            needed.push(n);
                        }
                    }
                }
                i += 1;
            }
            let inputs = freshindex_core::spec::dependency_order(&all)
                .into_iter()
                .filter(|f| needed.contains(&f.name.as_str()))
                .cloned()
                .collect();
            Ok((vec![spec.clone()], inputs))
        }
        // Every flow after the flows it reads: one pass brings them all up to date.
        None => Ok((
            freshindex_core::spec::dependency_order(&all)
                .into_iter()
                .cloned()
                .collect(),
            Vec::new(),
        )),
    }
}

/// The flow a read command applies to.
fn pick_flow(engine: &Engine, config: Option<&Path>, flow: Option<String>) -> Result<String> {
    if let Some(f) = flow {
        return Ok(f);
    }
    let stored: Vec<String> = engine.stored_flows()?.into_iter().map(|f| f.name).collect();
    match stored.len() {
        0 => bail!("no flow has run in this data directory yet; run `freshindex index` first"),
        1 => return Ok(stored[0].clone()),
        _ => {}
    }
    if let Some(path) = config_path(config)
        && let Ok(c) = Config::load(&path)
        && c.flows.len() == 1
    {
        return Ok(c.flows[0].name.clone());
    }
    bail!(
        "several flows in this data directory ({}); pick one with --flow",
        stored.join(", ")
    )
}

fn snippet(text: &str, max_chars: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        flat
    } else {
        let cut: String = flat.chars().take(max_chars).collect();
        format!("{cut}…")
    }
}

fn print_summary(s: &RunSummary) {
    let status = match s.status {
        RunStatus::Success => "success",
        RunStatus::Failed => "FAILED (too many failed items)",
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{}: {status} in {:.2} s\n  items       seen {} · new {} · modified {} · unchanged {} · deleted {} · failed {} · skipped {}\n  rows        added {} · updated {} · deleted {} · unchanged {} · total {}\n  embeddings  computed {} · reused {}",
        s.flow,
        s.elapsed_ms as f64 / 1000.0,
        s.items.seen,
        s.items.new,
        s.items.modified,
        s.items.unchanged,
        s.items.deleted,
        s.items.failed,
        s.items.skipped,
        s.rows.added,
        s.rows.updated,
        s.rows.deleted,
        s.rows.unchanged,
        s.rows.total,
        s.embeddings.computed,
        s.embeddings.reused,
    );
    for e in &s.errors {
        let _ = writeln!(err, "  error    {}: {}", e.item, e.error);
    }
    for w in &s.warnings {
        let _ = writeln!(err, "  warning  {}: {}", w.item, w.warning);
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A duration for humans: `340 ms`, `12.3 s`, `4m 05s`, `2h 03m`.
fn human_duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m {:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h {:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// The history table of one flow: one line per entry, columns aligned.
fn history_table(entries: &[RunEntry]) -> String {
    let header = [
        "ID",
        "TRIGGER",
        "STARTED",
        "DURATION",
        "STATUS",
        "ITEMS DONE/FAILED",
        "ROWS +/~/-",
        "EMBEDDINGS NEW/REUSED",
        "FIRST ERROR / NOTE",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for e in entries {
        let started =
            freshindex_core::schedule::format_utc_timestamp(e.started_at_ms / 1000 * 1000)
                .unwrap_or_else(|| e.started_at_ms.to_string());
        let note = match (&e.message, e.errors.first()) {
            (Some(m), _) => m.clone(),
            (None, Some(err)) => format!("{}: {}", err.item, err.error),
            (None, None) => String::new(),
        };
        lines.push(vec![
            e.id.to_string(),
            e.trigger.to_string(),
            started,
            e.duration_ms.map_or_else(|| "-".into(), human_duration),
            e.status.to_string(),
            e.items.as_ref().map_or_else(
                || "-".into(),
                |i| format!("{}/{}", i.processed, i.counts.failed),
            ),
            e.rows.as_ref().map_or_else(
                || "-".into(),
                |r| format!("{}/{}/{}", r.added, r.updated, r.deleted),
            ),
            e.embeddings
                .as_ref()
                .map_or_else(|| "-".into(), |m| format!("{}/{}", m.computed, m.reused)),
            snippet(&note, 100),
        ]);
    }
    let mut widths = vec![0usize; header.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::from(" ");
        for (i, (cell, w)) in line.iter().zip(&widths).enumerate() {
            text.push(' ');
            if i + 1 == line.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$} "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}
