//! `freshindex queue …`: the indexing-queue verbs against the local data directory, without a
//! server — for debugging and scripting. `--json` prints the HTTP API's shapes (the same
//! item objects as `GET /v1/flows/{flow}/items`).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use freshindex_core::queue::{MAX_PAYLOAD_BYTES, MAX_POLL_LIMIT, check_key, check_label};
use freshindex_core::{Config, PushType};
use freshindex_engine::Engine;
use freshindex_server::now_ms;
use freshindex_server::wire::{self, Item};
use freshindex_store::{FlowId, ListRequest, PollRequest, PushItem, PushKind, QueueEntry};
use serde_json::json;

/// Options every queue command takes.
#[derive(Args, Debug)]
pub struct Common {
    /// The flow (needed when the data directory and config hold several).
    #[arg(long)]
    flow: Option<String>,
    /// JSON output (the HTTP API's shapes).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// List queue entries in key order.
    List {
        #[command(flatten)]
        common: Common,
        /// Only entries with this status (repeatable): NEW_ITEM, MODIFIED, ACCEPTED, SKIPPED,
        /// ERROR.
        #[arg(long = "status", value_name = "STATUS")]
        statuses: Vec<String>,
        /// Only entries with this label.
        #[arg(long)]
        queue: Option<String>,
        /// Entries after this key.
        #[arg(long)]
        after: Option<String>,
        /// At most this many entries (default: all).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One entry with its payload.
    Show {
        #[command(flatten)]
        common: Common,
        /// The item key.
        key: String,
    },
    /// Push an item: a type, or hashes the queue compares with the stored ones.
    Push {
        #[command(flatten)]
        common: Common,
        /// The item key.
        key: String,
        /// MODIFIED, NOT_MODIFIED, REPOSITORY_ERROR or REQUEUE.
        #[arg(
            long = "type",
            value_name = "TYPE",
            conflicts_with_all = ["content_hash", "metadata_hash"],
            required_unless_present_any = ["content_hash", "metadata_hash"]
        )]
        kind: Option<String>,
        /// Content hash (instead of --type).
        #[arg(long)]
        content_hash: Option<String>,
        /// Metadata hash (instead of --type).
        #[arg(long)]
        metadata_hash: Option<String>,
        /// Queue label (default: `default`).
        #[arg(long)]
        queue: Option<String>,
        /// Opaque payload stored with the entry (its UTF-8 bytes, at most 8 KiB).
        #[arg(long)]
        payload: Option<String>,
    },
    /// Lease the highest-priority available entries.
    Poll {
        #[command(flatten)]
        common: Common,
        /// Most entries (1 to 100).
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only entries with this label.
        #[arg(long)]
        queue: Option<String>,
        /// Statuses to return (repeatable; default ERROR, MODIFIED, NEW_ITEM).
        #[arg(long = "status", value_name = "STATUS")]
        statuses: Vec<String>,
        /// Lease length in seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        lease_secs: u64,
        /// Lease holder recorded on the entries.
        #[arg(long, default_value = "cli")]
        owner: String,
    },
    /// End leases: all of the flow's, or those of one label and/or holder.
    Unreserve {
        #[command(flatten)]
        common: Common,
        /// Only entries with this label.
        #[arg(long)]
        queue: Option<String>,
        /// Only leases this holder has.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete every item still labelled QUEUE, with its rows (the end of a full traversal).
    DeleteQueueItems {
        #[command(flatten)]
        common: Common,
        /// The label whose items go.
        queue: String,
    },
}

/// Runs a queue command.
pub fn run(data_dir: &Path, config: Option<&Path>, cmd: QueueCommand) -> Result<()> {
    let engine = crate::open_engine(data_dir)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        QueueCommand::List {
            common,
            statuses,
            queue,
            after,
            limit,
        } => {
            let (_, flow) = resolve_flow(&engine, config, common.flow)?;
            if let Some(q) = &queue {
                check_label("--queue", q).map_err(|e| anyhow!(e))?;
            }
            let req = ListRequest {
                statuses: parse_statuses(&statuses)?,
                queue,
                after,
                limit: 0,
            };
            let entries = list_all(&engine, flow, req, limit)?;
            let now = now_ms();
            if common.json {
                let items: Vec<Item> = entries.iter().map(|e| Item::from_entry(e, now)).collect();
                writeln!(out, "{}", json!({ "items": items }))?;
            } else if entries.is_empty() {
                writeln!(out, "no items")?;
            } else {
                for e in &entries {
                    writeln!(out, "{}", entry_line(e, now))?;
                }
            }
        }
        QueueCommand::Show { common, key } => {
            let (name, flow) = resolve_flow(&engine, config, common.flow)?;
            let entry = engine
                .store()
                .get(flow, &key)?
                .ok_or_else(|| anyhow!("item `{key}` is not in the queue of flow `{name}`"))?;
            let item = Item::from_entry(&entry, now_ms());
            if common.json {
                writeln!(out, "{}", serde_json::to_string(&item)?)?;
            } else {
                show_item(&mut out, &item, entry.payload.as_deref())?;
            }
        }
        QueueCommand::Push {
            common,
            key,
            kind,
            content_hash,
            metadata_hash,
            queue,
            payload,
        } => {
            let (name, flow) = resolve_flow(&engine, config, common.flow)?;
            check_key(&key).map_err(|e| anyhow!("KEY: {e}"))?;
            let kind = match kind {
                Some(t) => {
                    PushKind::Type(t.parse::<PushType>().map_err(|e| anyhow!("--type: {e}"))?)
                }
                None => {
                    for (field, v) in [
                        ("--content-hash", &content_hash),
                        ("--metadata-hash", &metadata_hash),
                    ] {
                        if let Some(v) = v {
                            check_label(field, v).map_err(|e| anyhow!(e))?;
                        }
                    }
                    PushKind::Hashes {
                        content: content_hash,
                        metadata: metadata_hash,
                    }
                }
            };
            if let Some(q) = &queue {
                check_label("--queue", q).map_err(|e| anyhow!(e))?;
            }
            if let Some(p) = &payload
                && p.len() > MAX_PAYLOAD_BYTES
            {
                bail!(
                    "--payload: {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                    p.len()
                );
            }
            let item = PushItem {
                key: key.clone(),
                kind,
                payload: payload.map(String::into_bytes),
                queue,
            };
            let now = now_ms();
            let store = engine.store();
            let result = store
                .push(flow, std::slice::from_ref(&item), now)?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("the store returned no result for the push"))?;
            result.map_err(|e| anyhow!("flow `{name}`: {e}"))?;
            let entry = store
                .get(flow, &key)?
                .ok_or_else(|| anyhow!("item `{key}` vanished right after its push"))?;
            let item = Item::from_entry(&entry, now);
            if common.json {
                writeln!(out, "{}", serde_json::to_string(&item)?)?;
            } else {
                writeln!(out, "{}: {} (queue {})", item.name, item.status, item.queue)?;
            }
        }
        QueueCommand::Poll {
            common,
            limit,
            queue,
            statuses,
            lease_secs,
            owner,
        } => {
            let (_, flow) = resolve_flow(&engine, config, common.flow)?;
            let limit = wire::check_limit("--limit", Some(limit), 20, MAX_POLL_LIMIT)
                .map_err(|e| anyhow!(e.message))?;
            if let Some(q) = &queue {
                check_label("--queue", q).map_err(|e| anyhow!(e))?;
            }
            check_label("--owner", &owner).map_err(|e| anyhow!(e))?;
            let req = PollRequest {
                queue,
                limit,
                statuses: parse_statuses(&statuses)?,
                owner,
                lease_ms: lease_secs as i64 * 1000,
            };
            let now = now_ms();
            let entries = engine.store().poll(flow, &req, now)?;
            if common.json {
                let items: Vec<Item> = entries.iter().map(|e| Item::from_entry(e, now)).collect();
                writeln!(out, "{}", json!({ "items": items }))?;
            } else if entries.is_empty() {
                writeln!(out, "nothing to poll")?;
            } else {
                for e in &entries {
                    writeln!(out, "{}", entry_line(e, now))?;
                }
            }
        }
        QueueCommand::Unreserve {
            common,
            queue,
            owner,
        } => {
            let (_, flow) = resolve_flow(&engine, config, common.flow)?;
            for (field, v) in [("--queue", &queue), ("--owner", &owner)] {
                if let Some(v) = v {
                    check_label(field, v).map_err(|e| anyhow!(e))?;
                }
            }
            let n = engine
                .store()
                .unreserve(flow, queue.as_deref(), owner.as_deref(), now_ms())?;
            if common.json {
                writeln!(out, "{}", json!({ "unreserved": n }))?;
            } else {
                writeln!(out, "released {n} lease{}", plural(n))?;
            }
        }
        QueueCommand::DeleteQueueItems { common, queue } => {
            let (name, _) = resolve_flow(&engine, config, common.flow)?;
            check_label("QUEUE", &queue).map_err(|e| anyhow!(e))?;
            let n = engine
                .delete_queue_items(&name, &queue)
                .with_context(|| format!("flow `{name}`"))?;
            if common.json {
                writeln!(out, "{}", json!({ "queue": queue, "deleted": n }))?;
            } else {
                writeln!(out, "deleted {n} item{} labelled {queue}", plural(n))?;
            }
        }
    }
    Ok(())
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The flow a queue command applies to: `--flow`, or the only flow of the data directory and
/// config. A flow the config declares but the data directory does not know yet is registered
/// (a push flow that was never served).
fn resolve_flow(
    engine: &Engine,
    config: Option<&Path>,
    flow: Option<String>,
) -> Result<(String, FlowId)> {
    let declared = match crate::config_path(config) {
        Some(p) => Config::load(&p)?.flows,
        None => Vec::new(),
    };
    let name = match flow {
        Some(f) => f,
        None => {
            let mut names: Vec<String> = engine
                .store()
                .flows()?
                .into_iter()
                .map(|f| f.name)
                .chain(declared.iter().map(|f| f.name.clone()))
                .collect();
            names.sort();
            names.dedup();
            match names.len() {
                1 => names.remove(0),
                0 => bail!(
                    "--flow: no flow is defined in the data directory or the config; declare one in freshindex.toml"
                ),
                _ => bail!("--flow: several flows ({}); pick one", names.join(", ")),
            }
        }
    };
    if let Some(rec) = engine.store().flow(&name)? {
        return Ok((name, rec.id));
    }
    match declared.iter().find(|f| f.name == name) {
        Some(spec) => {
            let id = engine
                .define_flow(spec)
                .with_context(|| format!("flow `{name}`"))?;
            Ok((name, id))
        }
        None => bail!("--flow: flow `{name}` is not defined in the data directory or the config"),
    }
}

fn parse_statuses(raw: &[String]) -> Result<Vec<freshindex_core::ItemStatus>> {
    raw.iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
        .map(|s| wire::parse_status("--status", s).map_err(|e| anyhow!(e.message)))
        .collect()
}

/// Every entry the request selects, paging through the store, at most `limit`.
fn list_all(
    engine: &Engine,
    flow: FlowId,
    mut req: ListRequest,
    limit: Option<usize>,
) -> Result<Vec<QueueEntry>> {
    const PAGE: usize = 1000;
    let mut all = Vec::new();
    loop {
        let want = limit.map_or(PAGE, |l| (l - all.len()).min(PAGE));
        if want == 0 {
            return Ok(all);
        }
        req.limit = want;
        let page = engine.store().list(flow, &req)?;
        let done = page.len() < want;
        req.after = page.last().map(|e| e.item.key.clone());
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
}

fn entry_line(e: &QueueEntry, now: i64) -> String {
    let item = Item::from_entry(e, now);
    let mut line = format!("{:<9} {}  queue={}", item.status, item.name, item.queue);
    if let (Some(owner), Some(until)) = (&item.lease_owner, item.lease_expire_time_ms) {
        line.push_str(&format!(
            "  leased by {owner} for {}s",
            ((until - now).max(0) + 999) / 1000
        ));
    }
    if item.attempts > 0 {
        line.push_str(&format!("  attempts={}", item.attempts));
    }
    if let Some(m) = &item.message {
        line.push_str(&format!("  ({})", m.replace('\n', " ")));
    }
    line
}

fn show_item(out: &mut impl Write, item: &Item, payload: Option<&[u8]>) -> Result<()> {
    writeln!(out, "name       {}", item.name)?;
    writeln!(out, "status     {}", item.status)?;
    writeln!(out, "queue      {}", item.queue)?;
    let fields = [
        ("content #", item.content_hash.as_deref()),
        ("metadata #", item.metadata_hash.as_deref()),
        ("version", item.version.as_deref()),
        ("lease", item.lease_owner.as_deref()),
        ("message", item.message.as_deref()),
    ];
    for (label, v) in fields {
        if let Some(v) = v {
            writeln!(out, "{label:<10} {v}")?;
        }
    }
    writeln!(out, "attempts   {}", item.attempts)?;
    if let Some(p) = payload {
        match std::str::from_utf8(p) {
            Ok(text) => writeln!(out, "payload    {text}")?,
            Err(_) => writeln!(out, "payload    (base64) {}", wire::encode_b64(p))?,
        }
    }
    Ok(())
}
