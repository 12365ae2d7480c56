//! The `openai:` embedder against a local server of the protocol: batching, ordering,
//! retries and their limits, timeouts, errors, the API key, `dimensions`, the concurrency
//! limit, and a flow run through the engine.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::openai_server::{DEFAULT_DIM, Fault, OpenAiServer, embedding_of};
use freshindex_core::{Config, EmbedSpec};
use freshindex_engine::steps::embed::Embedder;
use freshindex_engine::steps::embed::openai::{OpenAiEmbedder, PROBE_TEXT};
use freshindex_engine::{Engine, RunOptions};

/// A spec for the server, with a key variable that is never set, short timeouts and few
/// retries.
fn spec(server: &OpenAiServer) -> EmbedSpec {
    EmbedSpec {
        model: "openai:test-model".into(),
        base_url: Some(server.base_url()),
        api_key_env: Some("FRESHINDEX_TEST_OPENAI_KEY_NEVER_SET".into()),
        timeout_secs: Some(1),
        max_retries: Some(3),
        ..EmbedSpec::default()
    }
}

fn embedder(spec: &EmbedSpec) -> OpenAiEmbedder {
    OpenAiEmbedder::new("test-model", spec).expect("embedder")
}

#[test]
fn the_dimension_is_probed_and_one_call_carries_every_text() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    assert_eq!(e.dimension(), DEFAULT_DIM);
    let probe = server.requests();
    assert_eq!(probe.len(), 1, "one probe request");
    assert_eq!(probe[0].inputs(), vec![PROBE_TEXT]);

    server.clear_requests();
    let texts = ["alpha", "beta", "", "delta", "epsilon"];
    let v = e.embed(&texts).expect("embed");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "one call, one request");
    let r = &reqs[0];
    assert_eq!(r.request_line, "POST /v1/embeddings HTTP/1.1");
    assert_eq!(r.body["model"], "test-model");
    assert_eq!(r.body["encoding_format"], "float");
    assert!(r.body.get("dimensions").is_none(), "{}", r.body);
    assert_eq!(
        r.header("authorization"),
        None,
        "no key variable, no header"
    );
    assert_eq!(
        r.inputs(),
        vec!["alpha", "beta", " ", "delta", "epsilon"],
        "an empty text is sent as a space"
    );
    let want: Vec<Vec<f32>> = ["alpha", "beta", " ", "delta", "epsilon"]
        .iter()
        .map(|t| embedding_of(t, DEFAULT_DIM))
        .collect();
    assert_eq!(v, want);
    assert_eq!(e.embed(&[]).expect("nothing"), Vec::<Vec<f32>>::new());
    assert_eq!(server.requests().len(), 1, "nothing to embed, no request");
}

#[test]
fn vectors_come_back_in_index_order_when_the_server_lists_them_shuffled() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    server.reverse_data(true);
    let texts = ["one", "two", "three", "four"];
    let v = e.embed(&texts).expect("embed");
    let want: Vec<Vec<f32>> = texts.iter().map(|t| embedding_of(t, DEFAULT_DIM)).collect();
    assert_eq!(v, want);
}

#[test]
fn server_errors_are_retried_until_one_succeeds() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    server.clear_requests();
    server.fail_next(1, Fault::Status(500));
    server.fail_next(1, Fault::Status(503));
    let v = e.embed(&["retry me"]).expect("embed after retries");
    assert_eq!(v, vec![embedding_of("retry me", DEFAULT_DIM)]);
    assert_eq!(server.requests().len(), 3);
    let stats = e.stats();
    assert_eq!(
        (stats.requests, stats.retries),
        (4, 2),
        "probe + 3; {stats:?}"
    );
}

#[test]
fn a_throttled_request_waits_for_retry_after() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    server.clear_requests();
    server.fail_next(1, Fault::Throttle("1".into()));
    let t = Instant::now();
    e.embed(&["slow down"]).expect("embed after the wait");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "Retry-After: 1 is honoured, waited {waited:?}"
    );
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn a_stalled_request_times_out_and_is_retried() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    server.clear_requests();
    server.fail_next(1, Fault::Stall(Duration::from_secs(3)));
    let t = Instant::now();
    let v = e.embed(&["stall"]).expect("embed after a timeout");
    assert_eq!(v, vec![embedding_of("stall", DEFAULT_DIM)]);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(server.requests().len(), 2);
    assert_eq!(e.stats().retries, 1);
}

#[test]
fn exhausted_retries_are_an_error_naming_the_model_and_the_attempts() {
    let server = OpenAiServer::start();
    let mut s = spec(&server);
    s.max_retries = Some(2);
    let e = embedder(&s);
    server.clear_requests();
    server.fail_next(3, Fault::Error(503, "overloaded".into()));
    let err = e.embed(&["never"]).expect_err("fails");
    assert!(err.contains("openai:test-model"), "{err}");
    assert!(err.contains(&server.base_url()), "{err}");
    assert!(err.contains("HTTP 503: overloaded"), "{err}");
    assert!(err.contains("(3 attempts)"), "{err}");
    assert_eq!(server.requests().len(), 3);

    // Timeouts all the way.
    s.max_retries = Some(1);
    let e = embedder(&s);
    server.clear_requests();
    server.fail_next(2, Fault::Stall(Duration::from_secs(2)));
    let err = e.embed(&["stalls"]).expect_err("times out");
    assert!(err.contains("timed out after 1 s (2 attempts)"), "{err}");
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn client_errors_are_not_retried() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    server.clear_requests();
    server.fail_next(1, Fault::Error(400, "input is too long".into()));
    let err = e.embed(&["too long"]).expect_err("400");
    assert!(err.contains("HTTP 400: input is too long"), "{err}");
    assert!(err.contains("openai:test-model"), "{err}");
    assert_eq!(server.requests().len(), 1, "no retry");

    server.clear_requests();
    server.fail_next(1, Fault::Error(401, "Incorrect API key provided".into()));
    let err = e.embed(&["who"]).expect_err("401");
    assert!(
        err.contains("HTTP 401: Incorrect API key provided"),
        "{err}"
    );
    assert!(
        err.contains("$FRESHINDEX_TEST_OPENAI_KEY_NEVER_SET is not set"),
        "names the key variable: {err}"
    );
    assert_eq!(server.requests().len(), 1, "no retry");
    assert_eq!(e.stats().retries, 0);
}

#[test]
fn construction_fails_clearly_on_a_bad_model_or_an_unreachable_server() {
    let server = OpenAiServer::start();
    server.fail_next(
        1,
        Fault::Error(404, "The model `nope` does not exist".into()),
    );
    let err = OpenAiEmbedder::new("nope", &spec(&server))
        .err()
        .expect("bad model");
    assert!(err.contains("openai:nope"), "{err}");
    assert!(
        err.contains("HTTP 404: The model `nope` does not exist"),
        "{err}"
    );
    assert!(err.contains("dimension"), "says what it was doing: {err}");

    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut s = spec(&server);
    s.base_url = Some(format!("http://127.0.0.1:{closed}/v1"));
    s.max_retries = Some(1);
    let err = OpenAiEmbedder::new("test-model", &s)
        .err()
        .expect("unreachable");
    assert!(err.contains(&format!("127.0.0.1:{closed}")), "{err}");
    assert!(err.contains("(2 attempts)"), "{err}");

    s.base_url = Some("ftp://example.invalid".into());
    let err = OpenAiEmbedder::new("test-model", &s)
        .err()
        .expect("bad scheme");
    assert!(err.contains("not an http:// or https:// URL"), "{err}");
}

/// Set in the child process of [`the_api_key_is_sent_from_the_named_variable`] (the
/// environment cannot be changed safely inside a test process).
const KEY_VAR: &str = "FRESHINDEX_TEST_OPENAI_KEY_FOR_HEADER";

#[test]
fn the_api_key_is_sent_from_the_named_variable() {
    if let Ok(key) = std::env::var(KEY_VAR) {
        let server = OpenAiServer::start();
        let mut s = spec(&server);
        s.api_key_env = Some(KEY_VAR.into());
        let e = embedder(&s);
        e.embed(&["secret"]).expect("embed");
        let reqs = server.requests();
        assert_eq!(reqs.len(), 2);
        for r in &reqs {
            assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {key}").as_str())
            );
        }
        // A 401 with a key names the variable to check.
        server.fail_next(1, Fault::Error(401, "Incorrect API key provided".into()));
        let err = e.embed(&["again"]).expect_err("401");
        assert!(
            err.contains(&format!("check the API key in ${KEY_VAR}")),
            "{err}"
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "the_api_key_is_sent_from_the_named_variable",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KEY_VAR, "sk-test-1234")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran the test:\n{stdout}"
    );
}

#[test]
fn dimensions_are_sent_and_no_probe_is_needed() {
    let server = OpenAiServer::start();
    let mut s = spec(&server);
    s.dimensions = Some(4);
    let e = embedder(&s);
    assert_eq!(e.dimension(), 4);
    assert!(server.requests().is_empty(), "no probe");
    let v = e.embed(&["short"]).expect("embed");
    assert_eq!(v, vec![embedding_of("short", 4)]);
    assert_eq!(server.requests()[0].body["dimensions"], 4);
}

#[test]
fn a_vector_of_the_wrong_dimension_is_an_error() {
    let server = OpenAiServer::start();
    let e = embedder(&spec(&server));
    server.force_dimension(Some(5));
    let err = e.embed(&["odd"]).expect_err("mismatch");
    assert!(err.contains("openai:test-model"), "{err}");
    assert!(err.contains("5 dimensions, expected 8"), "{err}");

    // A server that ignores `dimensions`.
    server.force_dimension(Some(8));
    let mut s = spec(&server);
    s.dimensions = Some(4);
    let err = embedder(&s).embed(&["odd"]).expect_err("mismatch");
    assert!(err.contains("8 dimensions, expected 4"), "{err}");
}

/// The most requests in flight when `threads` threads embed at once.
fn max_in_flight(max_concurrency: usize, threads: usize) -> usize {
    let server = OpenAiServer::start();
    let mut s = spec(&server);
    s.max_concurrency = Some(max_concurrency);
    let e = Arc::new(embedder(&s));
    server.delay(Duration::from_millis(100));
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let e = e.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for j in 0..3 {
                    let text = format!("thread {i} call {j}");
                    let v = e.embed(&[text.as_str()]).expect("embed");
                    assert_eq!(v, vec![embedding_of(&text, DEFAULT_DIM)]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(server.requests().len(), 1 + threads * 3);
    server.max_in_flight()
}

#[test]
fn requests_in_flight_stay_within_max_concurrency() {
    let limited = max_in_flight(2, 8);
    assert!(
        limited <= 2,
        "{limited} requests in flight with max_concurrency 2"
    );
    // The server does see overlapping requests when the limit allows them.
    let open = max_in_flight(8, 8);
    assert!(open > 2, "{open} requests in flight with max_concurrency 8");
}

#[test]
fn a_flow_indexes_a_folder_through_the_server_and_search_finds_it() {
    let server = OpenAiServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).expect("docs");
    let notes = [
        ("otters.md", "Otters hold hands while they sleep."),
        ("herons.md", "Herons stand still in shallow water."),
        ("kingfishers.md", "Kingfishers dive for small fish."),
        ("empty-ish.txt", "Voles dig tunnels under the snow."),
    ];
    for (name, text) in notes {
        std::fs::write(docs.join(name), text).expect("write");
    }
    let toml = format!(
        "[[flow]]\nname = \"notes\"\nsource = {{ type = \"files\", path = {docs:?} }}\n\
         steps = [\n  {{ op = \"parse\" }},\n  {{ op = \"split\", chunk_size = 200, chunk_overlap = 0 }},\n  \
         {{ op = \"embed\", model = \"openai:test-model\", base_url = \"{}\", \
         api_key_env = \"FRESHINDEX_TEST_OPENAI_KEY_NEVER_SET\", batch_size = 3 }},\n]\n",
        server.base_url()
    );
    let flow = Config::parse(&toml, None).expect("config").flows.remove(0);
    let engine = Engine::open(&dir.path().join("data")).expect("engine");
    let s = engine.run(&flow, &RunOptions::default()).expect("run");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.items.new, 4, "{s:?}");

    let mut rows = Vec::new();
    engine
        .export("notes", &mut |r| {
            rows.push((r.payload.text.clone(), r.vector.clone()));
            Ok(())
        })
        .expect("export");
    assert_eq!(rows.len(), 4);
    for (text, vector) in &rows {
        assert_eq!(vector, &embedding_of(text, DEFAULT_DIM), "{text}");
    }
    let reqs = server.requests();
    assert!(
        reqs.iter().all(|r| r.inputs().len() <= 3),
        "batch_size 3: {:?}",
        reqs.iter().map(|r| r.inputs().len()).collect::<Vec<_>>()
    );
    let embedded: usize = reqs[1..].iter().map(|r| r.inputs().len()).sum();
    assert_eq!(embedded, 4, "each chunk embedded once, after the probe");

    let hits = engine
        .search("notes", "Herons stand still in shallow water.", 2, None)
        .expect("search");
    assert_eq!(
        hits.first().map(|h| h.payload.text.as_str()),
        Some("Herons stand still in shallow water.")
    );
}
