//! Several `freshindex serve` processes sharing one PostgreSQL state store: workers that are
//! killed and replaced mid-run, a scheduler leader that dies and is replaced, and the database
//! restarted under a run. Every check runs against a real PostgreSQL the test starts, and
//! the real binary; the target is a PostgreSQL table every process writes.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::http::Server;
use common::{FlowConfig, Rng, TIMEOUT, Workspace, paragraph};
use freshindex_testpg::TestPg;
use serde_json::Value;

/// A config of one files flow with a PostgreSQL target table, over the shared store `store`
/// (or the embedded store when `None`), run every hour (so: once at start).
fn config(store: Option<&str>, target_url: &str, table: &str) -> String {
    let store = store
        .map(|s| format!("store = {s:?}\n"))
        .unwrap_or_default();
    format!(
        "{store}[[flow]]\n\
         name = \"docs\"\n\
         source = {{ type = \"files\", path = \"docs\", include = [\"**/*.md\"] }}\n\
         steps = [\n  \
           {{ op = \"parse\" }},\n  \
           {{ op = \"split\", chunk_size = 1000, chunk_overlap = 200 }},\n  \
           {{ op = \"embed\", model = \"builtin\", batch_size = 64 }},\n\
         ]\n\
         target = {{ type = \"postgres\", url = {target_url:?}, table = {table:?} }}\n\
         schedule = {{ interval = \"PT1H\" }}\n"
    )
}

/// Writes `n` small Markdown files (two to a folder of 100).
fn corpus(ws: &Workspace, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let words = rng.range(8, 30);
        ws.write(
            format!("d{:03}/f{i:05}.md", i / 100),
            format!("# doc {i}\n\n{}\n", paragraph(&mut rng, words)),
        );
    }
}

/// A `serve` process of the deployment.
fn serve(ws: &Workspace, name: &str, role: &str, env: &[(&str, &str)]) -> Server {
    let data = ws.root().join(format!("data-{name}"));
    Server::start_with(
        ws,
        &data,
        &[
            "--listen",
            "127.0.0.1:0",
            "--role",
            role,
            "--lease-secs",
            "3",
            "--index-threads",
            "0",
        ],
        env,
    )
    .unwrap_or_else(|f| panic!("{name} did not start: {f:?}"))
}

fn kill9(server: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-9", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The history of the flow, newest first, as a server of the deployment serves it.
fn history(server: &Server) -> Vec<Value> {
    server.get("/v1/flows/docs/history?limit=50").ok()["runs"]
        .as_array()
        .expect("runs")
        .clone()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool, context: &dyn Fn() -> String) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen\n{}",
            context()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Indexes the tree from scratch into `table` with the embedded store, and returns the rows
/// of both tables that differ (`(table, key)`, at most 20): the oracle check.
fn differs_from_scratch(ws: &Workspace, pg: &TestPg, db: &str, url: &str) -> Vec<String> {
    let scratch = ws.root().join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let cfg = scratch.join("freshindex.toml");
    std::fs::write(&cfg, config(None, url, "docs_scratch")).expect("config");
    // The same tree, through a link (item keys are relative to the folder), indexed from
    // nothing each time.
    let link = scratch.join("docs");
    if !link.exists() {
        std::os::unix::fs::symlink(ws.src(), &link).expect("link the tree");
    }
    let _ = std::fs::remove_dir_all(scratch.join("data"));
    pg.psql(db, "DROP TABLE IF EXISTS docs_scratch");
    common::Fi::new(&scratch)
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(scratch.join("data"))
        .args(["index", "--json"])
        .run()
        .ok();
    let diff = pg.psql(
        db,
        "SELECT 'shared ' || key FROM (SELECT key, text, vector::text FROM docs_rows
            EXCEPT SELECT key, text, vector::text FROM docs_scratch) a
         UNION ALL
         SELECT 'scratch ' || key FROM (SELECT key, text, vector::text FROM docs_scratch
            EXCEPT SELECT key, text, vector::text FROM docs_rows) b
         LIMIT 20",
    );
    diff.lines().map(str::to_string).collect()
}

/// Work log lines: (owner, key, polled, done, refused).
fn work_log(path: &Path) -> Vec<(String, String, i64, i64, bool)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.to_string(),
                f.get(2)?.parse().ok()?,
                f.get(3)?.parse().ok()?,
                f.get(4) == Some(&"refused"),
            ))
        })
        .collect()
}

/// No key was written by two lease holders over overlapping intervals.
fn assert_no_overlap(log: &[(String, String, i64, i64, bool)]) {
    let mut by_key: HashMap<&str, Vec<(&str, i64, i64)>> = HashMap::new();
    for (owner, key, a, b, refused) in log {
        if !refused {
            by_key.entry(key).or_default().push((owner, *a, *b));
        }
    }
    for (key, mut spans) in by_key {
        spans.sort_by_key(|s| s.1);
        for w in spans.windows(2) {
            assert!(
                w[1].1 >= w[0].2,
                "item {key} was processed by {} ({}..{}) and {} ({}..{}) at the same time",
                w[0].0,
                w[0].1,
                w[0].2,
                w[1].0,
                w[1].1,
                w[1].2
            );
        }
    }
}

#[test]
fn workers_and_schedulers_share_one_postgres_store() {
    let pg = TestPg::start();
    let url = pg.create_database("fi");
    let ws = Workspace::new(FlowConfig::default());
    let n = 20_000;
    corpus(&ws, n, 7);
    std::fs::write(ws.config_path(), config(Some(&url), &url, "docs_rows")).expect("config");
    let log = ws.root().join("work.log");
    let log_s = log.to_string_lossy().to_string();
    let env = [("FRESHINDEX_WORK_LOG", log_s.as_str())];

    // Samples, all along, how many runs of the flow are in progress at once.
    let stop = Arc::new(AtomicBool::new(false));
    let most_in_progress = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most) = (Arc::clone(&stop), Arc::clone(&most_in_progress));
        let port = pg.port();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new("psql")
                    .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p"])
                    .arg(port.to_string())
                    .args(["-U", "postgres", "-d", "fi", "-c"])
                    .arg("SELECT count(*) FROM freshindex.runs WHERE status = 'inProgress'")
                    .output();
                if let Ok(out) = out
                    && let Ok(k) = String::from_utf8_lossy(&out.stdout).trim().parse::<usize>()
                {
                    most.fetch_max(k, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Three workers first, then the scheduler (which registers the flow and runs it at once)
    // and a standby scheduler. The second run of the first scheduler will stop after its scan.
    let workers: Vec<Server> = (1..=3)
        .map(|i| serve(&ws, &format!("w{i}"), "worker", &env))
        .collect();
    let resume = ws.root().join("never");
    let resume_s = resume.to_string_lossy().to_string();
    let mut leader_env = env.to_vec();
    leader_env.push(("FRESHINDEX_FAILPOINT", "scan-done:2"));
    leader_env.push(("FRESHINDEX_FAILPOINT_RESUME", resume_s.as_str()));
    let leader = serve(&ws, "s1", "scheduler", &leader_env);
    let standby = serve(&ws, "s2", "scheduler", &env);
    let context = || {
        format!(
            "leader stderr:\n{}\nstandby stderr:\n{}\nworker 2 stderr:\n{}",
            leader.stderr(),
            standby.stderr(),
            workers[1].stderr()
        )
    };

    // Mid-run, a worker dies and another joins.
    wait_for(
        "a quarter of the items written",
        || work_log(&log).len() >= n / 4,
        &context,
    );
    let killed_owner_pid = workers[0].pid();
    kill9(&workers[0]);
    let w4 = serve(&ws, "w4", "worker", &env);
    wait_for(
        "the first run succeeds",
        || {
            history(&leader)
                .iter()
                .any(|r| r["status"] == "success" && r["trigger"] == "scheduled")
        },
        &context,
    );
    let h = history(&leader);
    assert_eq!(h.len(), 1, "one run: {h:#?}");
    let s = &h[0];
    assert_eq!(s["items"]["seen"], n, "{s}");
    let new = s["items"]["new"].as_u64().expect("new");
    // A worker killed after a commit and before its report leaves at most one batch out.
    assert!(
        new <= n as u64 && new + 1024 >= n as u64,
        "the run counts what every worker did: {s}"
    );
    let diff = differs_from_scratch(&ws, &pg, "fi", &url);
    assert!(diff.is_empty(), "target differs from scratch: {diff:?}");
    let entries = work_log(&log);
    assert_no_overlap(&entries);
    let owners: std::collections::BTreeSet<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert!(
        owners.len() >= 3,
        "several workers shared the run: {owners:?}"
    );
    assert!(
        owners
            .iter()
            .any(|o| o.contains(&format!(":{killed_owner_pid}:"))),
        "the killed worker had worked: {owners:?}"
    );

    // The leader's next run stops after its scan; it dies there, and the standby takes
    // over: the interrupted run is recorded as such, the standby's run completes, and at no
    // time were two runs in progress.
    for i in (0..n).step_by(10) {
        ws.write(
            format!("d{:03}/f{i:05}.md", i / 100),
            format!("# doc {i}, edited\n\nnew words for the second run {i}\n"),
        );
    }
    let run_now = {
        let addr = leader.addr;
        thread::spawn(move || {
            common::http::try_http(addr, "POST", "/v1/flows/docs:run", b"{}");
        })
    };
    wait_for(
        "the leader's second run reaches its scan's end",
        || leader.stderr().contains("failpoint scan-done reached"),
        &context,
    );
    kill9(&leader);
    let _ = run_now.join();
    wait_for(
        "the standby runs the flow",
        || {
            let h = history(&standby);
            h.first().is_some_and(|r| r["status"] == "success") && h.len() >= 3
        },
        &context,
    );
    let h = history(&standby);
    let statuses: Vec<&str> = h.iter().filter_map(|r| r["status"].as_str()).collect();
    assert_eq!(
        statuses,
        ["success", "transientFailure", "success"],
        "{h:#?}"
    );
    assert!(
        h[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("interrupted")),
        "{h:#?}"
    );
    let diff = differs_from_scratch(&ws, &pg, "fi", &url);
    assert!(
        diff.is_empty(),
        "target differs from scratch after the takeover: {diff:?}"
    );
    assert_no_overlap(&work_log(&log));
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    assert_eq!(
        most_in_progress.load(Ordering::Relaxed),
        1,
        "one run in progress at a time"
    );
    drop(w4);
    drop(workers);
    drop(standby);
}

#[test]
fn a_database_restart_under_a_run_loses_nothing() {
    let pg = TestPg::start();
    let url = pg.create_database("fi");
    let ws = Workspace::new(FlowConfig::default());
    let n = 4_000;
    corpus(&ws, n, 11);
    std::fs::write(ws.config_path(), config(Some(&url), &url, "docs_rows")).expect("config");
    let log = ws.root().join("work.log");
    let log_s = log.to_string_lossy().to_string();
    let env = [("FRESHINDEX_WORK_LOG", log_s.as_str())];
    let workers: Vec<Server> = (1..=2)
        .map(|i| serve(&ws, &format!("w{i}"), "worker", &env))
        .collect();
    let leader = serve(&ws, "s1", "scheduler", &env);
    let context = || {
        format!(
            "leader stderr:\n{}\nworker 1 stderr:\n{}",
            leader.stderr(),
            workers[0].stderr()
        )
    };
    wait_for(
        "some items written",
        || work_log(&log).len() >= n / 5,
        &context,
    );
    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    pg.restart();
    wait_for(
        "the run succeeds",
        || history(&leader).iter().any(|r| r["status"] == "success"),
        &context,
    );
    let h = history(&leader);
    assert_eq!(h.len(), 1, "{h:#?}");
    assert_eq!(h[0]["items"]["seen"], n);
    let (started, finished) = (
        h[0]["started_at_ms"].as_i64().expect("start"),
        h[0]["finished_at_ms"].as_i64().expect("end"),
    );
    assert!(
        started < restarted_ms && restarted_ms < finished,
        "the database restarted during the run: {started} < {restarted_ms} < {finished}"
    );
    let diff = differs_from_scratch(&ws, &pg, "fi", &url);
    assert!(diff.is_empty(), "target differs from scratch: {diff:?}");
    assert_no_overlap(&work_log(&log));
}

#[test]
fn roles_need_a_shared_store() {
    let ws = Workspace::new(FlowConfig::default());
    let out = ws
        .fi()
        .args(["serve", "--listen", "127.0.0.1:0", "--role", "worker"])
        .run();
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("--role worker") && out.stderr.contains("--store"),
        "{}",
        out.stderr
    );
}
