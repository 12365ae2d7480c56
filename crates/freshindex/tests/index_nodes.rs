//! The index service with separate `freshindex index-node` processes: a flow's run seals
//! segments, their builds wait `Unissued` while no node runs (`--index-threads 0`), a node
//! killed with SIGKILL in the middle of a build loses it to another node after the heartbeat
//! timeout, and at the end every segment is indexed and search answers through the indexes.
//! Also the HTTP errors of the index endpoints and BuildIndex/DropIndex over HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::http::Server;
use common::{FlowConfig, Rng, Workspace, paragraph};
use serde_json::{Value, json};

fn corpus(ws: &Workspace, files: usize) {
    let mut rng = Rng::new(7);
    for i in 0..files {
        ws.write(format!("doc{i:03}.md"), paragraph(&mut rng, 60));
    }
}

fn builds(server: &Server) -> Vec<Value> {
    server.get("/v1/index-builds").ok()["builds"]
        .as_array()
        .expect("builds")
        .clone()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An `index-node` process; its stderr lines arrive on the receiver.
fn node(ws: &Workspace, server: &Server, env: &[(&str, &str)]) -> (Child, mpsc::Receiver<String>) {
    let mut fi = ws.fi().arg("index-node").args([
        "--coordinator",
        &format!("http://{}", server.addr),
        "--threads",
        "1",
    ]);
    for (k, v) in env {
        fi = fi.env(k, v);
    }
    let (mut cmd, desc) = fi.into_command();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{desc}`: {e}"));
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// A flow indexed by `serve` with no index node of its own (`--index-threads 0`, nodes lost
/// after 2 s without a heartbeat, segments sealed at 50 rows): its sealed segments' builds
/// wait `Unissued`.
fn indexed_flow_without_nodes() -> (Workspace, Server) {
    let ws = Workspace::new(FlowConfig::with_chunks(200, 0));
    corpus(&ws, 60);
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--index-threads",
            "0",
            "--index-heartbeat-timeout-secs",
            "2",
        ],
        &[("FRESHINDEX_SEAL_ROWS", "50")],
    )
    .unwrap_or_else(|f| panic!("server did not start: {f:?}"));
    let run = server.post("/v1/flows/docs:run", &json!({})).ok();
    assert_eq!(run["status"], "success", "{run}");
    wait_for("builds of the sealed segments", || {
        !builds(&server).is_empty()
    });
    (ws, server)
}

/// Waits until a node's stderr says it stopped at the `index-build-started` failpoint.
fn wait_for_failpoint(lines: &mpsc::Receiver<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the node reaches its failpoint");
        if line.contains("failpoint index-build-started reached") {
            return;
        }
    }
}

#[test]
fn a_killed_index_node_loses_its_build_to_another_and_every_segment_gets_indexed() {
    let (ws, server) = indexed_flow_without_nodes();

    let first = builds(&server);
    assert!(first.iter().all(|b| b["state"] == "Unissued"), "{first:?}");
    let described = server.get("/v1/collections/docs").ok();
    assert_eq!(described["rows"]["indexed"], 0, "{described}");
    let total = described["rows"]["total"].as_u64().expect("total");
    assert!(total >= 150, "{described}");

    // A node that stops in the middle of its first build, then is killed.
    let (mut doomed, lines) = node(
        &ws,
        &server,
        &[("FRESHINDEX_FAILPOINT", "index-build-started")],
    );
    wait_for_failpoint(&lines);
    let in_progress: Vec<Value> = builds(&server)
        .into_iter()
        .filter(|b| b["state"] == "InProgress")
        .collect();
    assert_eq!(in_progress.len(), 1, "{in_progress:?}");
    let stolen = in_progress[0]["buildId"].as_u64().expect("id");
    let version = in_progress[0]["version"].as_u64().expect("version");
    doomed.kill().expect("kill -9");
    let _ = doomed.wait();

    // After the heartbeat timeout its build is issued again, and a healthy node builds all.
    let (mut healthy, healthy_lines) = node(&ws, &server, &[]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !builds(&server).iter().all(|b| b["state"] == "Finished") {
        seen.extend(healthy_lines.try_iter());
        assert!(
            Instant::now() < deadline,
            "builds did not finish: {:?}\nnode: {seen:?}\nserver: {}",
            builds(&server),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = server.get(&format!("/v1/index-builds?ids={stolen}")).ok();
    let b = &b["builds"][0];
    assert!(b["version"].as_u64().expect("version") > version, "{b}");
    let files = server.get(&format!("/v1/index-builds/{stolen}/files")).ok();
    let paths = files["filePaths"].as_array().expect("paths");
    assert_eq!(paths.len(), 1, "{files}");
    assert!(std::path::Path::new(paths[0].as_str().expect("path")).exists());

    let nodes = server.get("/v1/index-nodes").ok();
    let nodes = nodes["nodes"].as_array().expect("nodes").clone();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(nodes.iter().filter(|n| n["alive"] == true).count(), 1);

    let described = server.get("/v1/collections/docs").ok();
    assert_eq!(described["rows"]["total"], total, "{described}");
    assert_eq!(
        described["rows"]["indexed"].as_u64().expect("indexed")
            + described["rows"]["growing"].as_u64().expect("growing"),
        total,
        "{described}"
    );
    assert_eq!(described["rows"]["sealedUnindexed"], 0, "{described}");
    let metrics = server.get("/v1/index-metrics").ok();
    assert_eq!(metrics["builds"]["Finished"], first.len(), "{metrics}");

    // Search answers through the indexes: a chunk's own text finds it first.
    let mut rng = Rng::new(7);
    let text = paragraph(&mut rng, 60);
    let hits = server
        .post(
            "/v1/flows/docs/search",
            &json!({ "query": text, "limit": 3 }),
        )
        .ok();
    let hits = hits["hits"].as_array().expect("hits").clone();
    assert!(!hits.is_empty());
    assert_eq!(hits[0]["name"], "doc000.md", "{hits:?}");

    // DropIndex: every build Deleted, rows no longer indexed; BuildIndex builds them again.
    let dropped = server.delete("/v1/collections/docs/indexes/hnsw").ok();
    assert_eq!(dropped["deletedBuilds"], first.len(), "{dropped}");
    assert!(builds(&server).iter().all(|b| b["state"] == "Deleted"));
    assert_eq!(
        server.get("/v1/collections/docs").ok()["rows"]["indexed"],
        0
    );
    let again = server
        .post("/v1/collections/docs/indexes", &json!({ "name": "hnsw" }))
        .ok();
    let ids = again["buildIds"].as_array().expect("ids").clone();
    assert_eq!(ids.len(), first.len());
    let same = server
        .post("/v1/collections/docs/indexes", &json!({ "name": "hnsw" }))
        .ok();
    assert_eq!(same["buildIds"], again["buildIds"], "an identical request");
    wait_for("the new builds finished", || {
        let list = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        server.get(&format!("/v1/index-builds?ids={list}")).ok()["builds"]
            .as_array()
            .expect("builds")
            .iter()
            .all(|b| b["state"] == "Finished")
    });

    // Errors name what is wrong.
    server
        .get("/v1/collections/nope")
        .assert_error(404, "not_found");
    server
        .post("/v1/collections/docs/indexes", &json!({ "name": "other" }))
        .assert_error(409, "conflict");
    server
        .get("/v1/index-builds?ids=x")
        .assert_error(422, "invalid_argument");
    server
        .get("/v1/index-builds/999/files")
        .assert_error(404, "not_found");
    let unknown = server.get("/v1/index-builds?ids=999").ok();
    assert_eq!(unknown["builds"][0]["state"], "None");
    server
        .post(
            &format!("/v1/index-builds/{stolen}:report"),
            &json!({ "nodeId": 1, "version": version, "state": "Finished", "path": "/tmp/x" }),
        )
        .assert_error(409, "conflict");

    let _ = healthy.kill();
    let _ = healthy.wait();
    server.stop();
}

/// A node frozen (SIGSTOP) in the middle of a build stops heart-beating: its build goes to
/// another node, which finishes it. Thawed, the first node finishes too and reports late: the
/// report is refused (fenced by version), its file is removed, and it registers again.
#[test]
fn a_frozen_node_s_late_report_is_refused() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let (ws, server) = indexed_flow_without_nodes();

    let resume = ws.root().join("resume-frozen");
    let resume_s = resume.to_string_lossy().into_owned();
    let (mut frozen, lines) = node(
        &ws,
        &server,
        &[
            ("FRESHINDEX_FAILPOINT", "index-build-started"),
            ("FRESHINDEX_FAILPOINT_RESUME", &resume_s),
        ],
    );
    wait_for_failpoint(&lines);
    let taken: Vec<Value> = builds(&server)
        .into_iter()
        .filter(|b| b["state"] == "InProgress")
        .collect();
    assert_eq!(taken.len(), 1, "{taken:?}");
    let id = taken[0]["buildId"].as_u64().expect("id");
    let old_version = taken[0]["version"].as_u64().expect("version");
    let pid = Pid::from_raw(frozen.id() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");

    // Another node gets the build once the frozen one is declared lost, and finishes all.
    let (mut healthy, healthy_lines) = node(&ws, &server, &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut healthy_seen = Vec::new();
    while !builds(&server).iter().all(|b| b["state"] == "Finished") {
        healthy_seen.extend(healthy_lines.try_iter());
        assert!(
            Instant::now() < deadline,
            "the healthy node did not finish: {:?}\nnodes {}\nnode: {healthy_seen:?}\nserver: {}",
            builds(&server),
            server.get("/v1/index-nodes").ok(),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let finished = server.get(&format!("/v1/index-builds?ids={id}")).ok();
    let new_version = finished["builds"][0]["version"].as_u64().expect("version");
    assert!(new_version > old_version, "{finished}");
    let files = server.get(&format!("/v1/index-builds/{id}/files")).ok();

    // Thawed, it builds and reports the old version: refused; it registers again.
    std::fs::write(&resume, b"go").expect("resume file");
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen
        .iter()
        .any(|l: &String| l.contains(&format!("build {id}: report refused: 409")))
    {
        assert!(Instant::now() < deadline, "no refused report: {seen:?}");
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
        }
    }
    let after = server.get(&format!("/v1/index-builds?ids={id}")).ok();
    assert_eq!(after["builds"][0]["state"], "Finished", "{after}");
    assert_eq!(after["builds"][0]["version"], new_version, "{after}");
    assert_eq!(
        server.get(&format!("/v1/index-builds/{id}/files")).ok(),
        files,
        "the finished build's files are the healthy node's"
    );
    let stale = ws
        .data()
        .join("index-builds")
        .join(format!("b{id}-v{old_version}.hnsw"));
    assert!(!stale.exists(), "the late file is removed");
    wait_for("the thawed node registers again", || {
        seen.extend(lines.try_iter());
        seen.iter().any(|l| l.contains("registered again"))
    });
    let d = server.get("/v1/collections/docs").ok();
    assert_eq!(d["rows"]["sealedUnindexed"], 0, "{d}");
    let _ = frozen.kill();
    let _ = frozen.wait();
    let _ = healthy.kill();
    let _ = healthy.wait();
    server.stop();
}

/// Builds that fail (`FRESHINDEX_FAIL_BUILDS`: the server's first four builds fail on purpose)
/// are retried after growing pauses, then stay `Failed` with their reason while search goes on
/// exactly; dropping and defining the index again builds it.
#[test]
fn failing_builds_are_retried_then_failed_with_their_reason() {
    let ws = Workspace::new(FlowConfig::with_chunks(200, 0));
    corpus(&ws, 60);
    let server = Server::start_with(
        &ws,
        &ws.data(),
        &["--listen", "127.0.0.1:0", "--index-threads", "1"],
        &[
            ("FRESHINDEX_SEAL_ROWS", "50"),
            ("FRESHINDEX_FAIL_BUILDS", "4"),
        ],
    )
    .unwrap_or_else(|f| panic!("server did not start: {f:?}"));
    let t = Instant::now();
    server.post("/v1/flows/docs:run", &json!({})).ok();
    wait_for("the build to fail for good", || {
        builds(&server)
            .first()
            .is_some_and(|b| b["state"] == "Failed")
    });
    // Three retries after pauses of 1, 2 and 4 s.
    assert!(t.elapsed() >= Duration::from_secs(7), "{:?}", t.elapsed());
    let b = builds(&server)[0].clone();
    assert_eq!(b["retries"], 4, "{b}");
    assert!(
        b["failReason"]
            .as_str()
            .is_some_and(|r| r.contains("injected failure")),
        "{b}"
    );
    let metrics = server.get("/v1/index-metrics").ok();
    assert_eq!(metrics["builds"]["Failed"], 1, "{metrics}");
    // Exact search still answers.
    let hits = server
        .post(
            "/v1/flows/docs/search",
            &json!({ "query": "quartz", "limit": 3 }),
        )
        .ok();
    assert_eq!(hits["hits"].as_array().map(Vec::len), Some(3), "{hits}");
    // Dropped and defined again: a new build, which succeeds (the injected failures are used up).
    server.delete("/v1/collections/docs/indexes/hnsw").ok();
    let again = server.post("/v1/collections/docs/indexes", &json!({})).ok();
    let id = again["buildIds"][0].as_u64().expect("a new build");
    assert_ne!(Some(id), b["buildId"].as_u64());
    wait_for("the new build to finish", || {
        server.get(&format!("/v1/index-builds?ids={id}")).ok()["builds"][0]["state"] == "Finished"
    });
    server.stop();
}
