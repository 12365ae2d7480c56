//! `freshindex collections …`: the collections of the local data directory — list, describe,
//! create, drop, aliases, compaction and index builds — without a server. Reading works while
//! a `serve` runs (a snapshot); changes need the collection free (a running `serve` owns the
//! collections of its data directory: use its HTTP API then).

use std::path::Path;

use anyhow::{Result, bail};
use clap::Subcommand;
use freshindex_engine::{Engine, default_workers};
use freshindex_vector::{Metric, VectorCollection};
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum CollectionsCommand {
    /// Every collection with its rows, the flow writing it and its aliases.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Dimension, metric, rows (total, indexed, pending), segments and the index builds.
    Describe {
        /// The collection (or an alias).
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Create an empty collection.
    Create {
        /// Its name.
        name: String,
        /// Vector dimension.
        #[arg(long)]
        dimension: usize,
        /// Similarity metric: cosine, dot or l2.
        #[arg(long, default_value = "cosine", value_parser = parse_metric)]
        metric: Metric,
    },
    /// Drop a collection (not one a flow writes or an alias names).
    Drop {
        /// The collection.
        name: String,
    },
    /// Point an alias at a collection (atomically replacing what it named).
    Alias {
        /// The alias.
        alias: String,
        /// The collection it names from now on.
        collection: String,
    },
    /// Remove an alias.
    Unalias {
        /// The alias.
        alias: String,
    },
    /// Rewrite segments with many deleted rows now.
    Compact {
        /// The collection (or an alias).
        name: String,
    },
    /// Build the indexes of sealed segments that have none, here and now.
    BuildIndexes {
        /// The collection (or an alias).
        name: String,
    },
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    match s {
        "cosine" => Ok(Metric::Cosine),
        "dot" => Ok(Metric::Dot),
        "l2" => Ok(Metric::L2),
        other => Err(format!("`{other}`: expected cosine, dot or l2")),
    }
}

fn describe(engine: &Engine, name: &str) -> Result<Value> {
    let cols = engine.collections();
    let physical = cols.resolve(name)?;
    let flow = engine.collection_owner(&physical)?;
    let Some(c) = cols.open_snapshot(&physical)? else {
        let c = cols.open(&physical)?;
        return Ok(json!({
            "collection": physical, "flow": flow, "format": "sqlite (migrated on the next write)",
            "dimension": c.dimension(), "rows": { "total": c.count()? },
        }));
    };
    let stats = c.stats();
    let builds: Vec<Value> = match engine.index_service()? {
        Some(s) => s
            .builds_of(Some(&physical))
            .iter()
            .map(|b| {
                json!({ "buildId": b.build_id, "segment": b.segment, "state": b.state,
                             "failReason": b.fail_reason })
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(json!({
        "collection": physical,
        "flow": flow,
        "dimension": c.dimension(),
        "metric": c.metric(),
        "rows": {
            "total": c.count()?,
            "indexed": stats.indexed_rows,
            "pending": stats.growing_rows + stats.unindexed_rows,
            "growing": stats.growing_rows,
            "sealedUnindexed": stats.unindexed_rows,
            "tombstones": stats.tombstones,
        },
        "segments": c.segments(),
        "builds": builds,
    }))
}

/// Runs a `collections` command on the data directory.
pub fn run(data_dir: &Path, command: CollectionsCommand) -> Result<()> {
    let engine = crate::open_engine(data_dir)?;
    let cols = engine.collections();
    match command {
        CollectionsCommand::List { json } => {
            let aliases = cols.aliases()?;
            let mut list = Vec::new();
            for name in cols.names()? {
                let rows = cols.open(&name).and_then(|c| c.count()).ok();
                let named_by: Vec<&String> = aliases
                    .iter()
                    .filter(|(_, c)| **c == name)
                    .map(|(a, _)| a)
                    .collect();
                list.push(json!({ "collection": name, "rows": rows,
                                  "flow": engine.collection_owner(&name)?, "aliases": named_by }));
            }
            if json {
                println!("{}", json!({ "collections": list, "aliases": aliases }));
            } else if list.is_empty() {
                println!("no collections");
            } else {
                for c in &list {
                    println!(
                        "{}  rows {}{}{}",
                        c["collection"].as_str().unwrap_or_default(),
                        c["rows"].as_u64().map_or("?".into(), |n| n.to_string()),
                        c["flow"]
                            .as_str()
                            .map_or(String::new(), |f| format!("  flow {f}")),
                        match c["aliases"].as_array() {
                            Some(a) if !a.is_empty() => format!(
                                "  aliases {}",
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            _ => String::new(),
                        }
                    );
                }
            }
        }
        CollectionsCommand::Describe { name, json } => {
            let d = describe(&engine, &name)?;
            if json {
                println!("{d}");
            } else {
                println!("{}", serde_json::to_string_pretty(&d)?);
            }
        }
        CollectionsCommand::Create {
            name,
            dimension,
            metric,
        } => {
            let (_, created) = engine.create_collection(&name, dimension, metric)?;
            if created {
                println!("created `{name}` (dimension {dimension}, {metric:?})");
            } else {
                println!("`{name}` exists with dimension {dimension} and {metric:?}");
            }
        }
        CollectionsCommand::Drop { name } => {
            if !engine.drop_collection(&name)? {
                bail!("no collection named `{name}`");
            }
            println!("dropped `{name}`");
        }
        CollectionsCommand::Alias { alias, collection } => {
            match cols.set_alias(&alias, &collection)? {
                Some(old) => println!("`{alias}` now names `{collection}` (was `{old}`)"),
                None => println!("`{alias}` names `{collection}`"),
            }
        }
        CollectionsCommand::Unalias { alias } => match cols.remove_alias(&alias)? {
            Some(c) => println!("removed `{alias}` (it named `{c}`)"),
            None => bail!("no alias named `{alias}`"),
        },
        CollectionsCommand::Compact { name } => {
            let Some(c) = engine.open_collection(&name)? else {
                bail!("no collection named `{name}`");
            };
            let n = c.compact()?;
            println!("{n} segment(s) rewritten");
            let built = engine.build_indexes_now(&cols.resolve(&name)?, default_workers())?;
            if built > 0 {
                println!("{built} segment(s) indexed");
            }
        }
        CollectionsCommand::BuildIndexes { name } => {
            if engine.open_collection(&name)?.is_none() {
                bail!("no collection named `{name}`");
            }
            let physical = cols.resolve(&name)?;
            if engine.index_service()?.is_none() {
                bail!("a running `freshindex serve` builds the indexes of this data directory");
            }
            let built = engine.build_indexes_now(&physical, default_workers())?;
            println!("{built} segment(s) indexed");
        }
    }
    Ok(())
}
