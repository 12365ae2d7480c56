//! `freshindex index-node`: a process that builds index files for a `freshindex serve`
//! coordinator. It registers, heartbeats, takes builds over HTTP, reads the segment files
//! and writes the index files at the paths the coordinator names (a folder both can reach),
//! then reports `Finished` or `Failed`. When the coordinator declares it lost (no heartbeat
//! in time), it registers again; what it was building is then someone else's, and its late
//! report is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use freshindex_engine::indexing::{IndexBuild, execute_build};
use serde_json::{Value, json};

/// Settings of an index node.
pub struct NodeOptions {
    /// Base URL of the coordinator (`http://host:port`).
    pub coordinator: String,
    /// Bearer token.
    pub token: Option<String>,
    /// What the node calls itself.
    pub address: String,
    /// Threads per build.
    pub threads: usize,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// `POST path` with `body`: the status and the JSON answer (`Null` when empty).
    fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.post(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.send_json(body).with_context(|| format!("POST {url}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of POST {url}"))?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON: {text}"))?
        };
        Ok((status, v))
    }
}

fn message(v: &Value) -> String {
    v.pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(|| v.to_string(), str::to_string)
}

fn register(c: &Client, address: &str) -> Result<(u64, u64)> {
    let (status, v) = c.post(
        "/v1/index-nodes",
        &json!({ "address": address, "capacity": 1 }),
    )?;
    if status != 201 {
        bail!(
            "registering with the coordinator: {status}: {}",
            message(&v)
        );
    }
    let id = v["nodeId"]
        .as_u64()
        .ok_or_else(|| anyhow!("registering: no nodeId in {v}"))?;
    let interval = v["heartbeatIntervalMs"].as_u64().unwrap_or(10_000).max(100);
    Ok((id, interval))
}

/// Runs the node until the process is stopped.
pub fn run(opts: NodeOptions) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let client = Arc::new(Client {
        agent,
        base: opts.coordinator.trim_end_matches('/').to_string(),
        token: opts.token.clone(),
    });
    let (id, interval) = register(&client, &opts.address)?;
    let node = Arc::new(AtomicU64::new(id));
    let lost = Arc::new(AtomicBool::new(false));
    eprintln!("index node {id} registered with {}", client.base);
    {
        let (client, node, lost) = (client.clone(), node.clone(), lost.clone());
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(interval));
                let id = node.load(Ordering::Relaxed);
                match client.post(&format!("/v1/index-nodes/{id}:heartbeat"), &json!({})) {
                    Ok((200, _)) => {}
                    Ok((404 | 409, v)) => {
                        eprintln!("index node {id}: {}", message(&v));
                        lost.store(true, Ordering::Relaxed);
                    }
                    Ok((s, v)) => eprintln!("heartbeat: {s}: {}", message(&v)),
                    Err(e) => eprintln!("heartbeat: {e:#}"),
                }
            }
        });
    }
    loop {
        if lost.swap(false, Ordering::Relaxed) {
            match register(&client, &opts.address) {
                Ok((id, _)) => {
                    node.store(id, Ordering::Relaxed);
                    eprintln!("index node registered again as {id}");
                }
                Err(e) => {
                    eprintln!("{e:#}");
                    lost.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let id = node.load(Ordering::Relaxed);
        let (status, v) = match client.post(&format!("/v1/index-nodes/{id}:take"), &json!({})) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("taking a build: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        match status {
            204 => {
                std::thread::sleep(Duration::from_millis(300));
                continue;
            }
            200 => {}
            404 | 409 => {
                lost.store(true, Ordering::Relaxed);
                continue;
            }
            s => {
                eprintln!("taking a build: {s}: {}", message(&v));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        let build: IndexBuild = serde_json::from_value(v)
            .context("the coordinator sent a build this node cannot read")?;
        eprintln!(
            "building {} (collection `{}`, segment {}, version {})",
            build.build_id, build.collection, build.segment, build.version
        );
        let body = match execute_build(&build, opts.threads) {
            Ok(_) => json!({
                "nodeId": id, "version": build.version, "state": "Finished",
                "path": build.output_path,
            }),
            Err(e) => {
                eprintln!("build {} failed: {e}", build.build_id);
                json!({ "nodeId": id, "version": build.version, "state": "Failed", "reason": e })
            }
        };
        match client.post(
            &format!("/v1/index-builds/{}:report", build.build_id),
            &body,
        ) {
            Ok((200, _)) => eprintln!("build {} reported", build.build_id),
            Ok((s, v)) => eprintln!(
                "build {}: report refused: {s}: {}",
                build.build_id,
                message(&v)
            ),
            Err(e) => eprintln!("build {}: report failed: {e:#}", build.build_id),
        }
    }
}
