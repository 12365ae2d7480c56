//! The local-model embedder on a real model, sentence-transformers/all-MiniLM-L6-v2, against
//! reference vectors of sentence-transformers (`tests/fixtures/minilm-reference.json`, made by
//! `scripts/make-embedding-fixture.py`).
//!
//! The model folder comes from `FRESHINDEX_TEST_MINILM`; `scripts/fetch-test-model` installs
//! the model and prints it (scripts/test does both). Without it the tests fail and say so.
//!
//! The Hugging Face cache tests set environment variables, which are process-wide: they run
//! this test binary again as a child process (the ignored test `hub_child`) with its own
//! environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use freshindex_core::EmbedSpec;
use freshindex_engine::steps::embed::{Embedder, embedder_for};

const MODEL_ENV: &str = "FRESHINDEX_TEST_MINILM";
const HUB_ID: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn model_dir() -> PathBuf {
    match std::env::var_os(MODEL_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{MODEL_ENV} is not set: these tests need the all-MiniLM-L6-v2 model; run \
             `export {MODEL_ENV}=\"$(scripts/fetch-test-model)\"` first (scripts/test does)"
        ),
    }
}

struct Case {
    text: String,
    vector: Vec<f32>,
}

fn fixture() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-reference.json");
    let text = std::fs::read_to_string(&path).expect("read the fixture");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parse the fixture");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            vector: c["vector"]
                .as_array()
                .expect("vector")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn minilm() -> std::sync::Arc<dyn Embedder> {
    let spec = EmbedSpec::of_model(&format!("local:{}", model_dir().display())).expect("spec");
    embedder_for(&spec).expect("load the model")
}

#[test]
fn matches_the_reference_vectors() {
    let cases = fixture();
    assert!(cases.len() >= 10);
    let model = minilm();
    assert_eq!(model.dimension(), 384);
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let got = model.embed(&texts).expect("embed");
    assert_eq!(got.len(), cases.len());
    for (c, v) in cases.iter().zip(&got) {
        assert_eq!(v.len(), 384);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm} for {:?}", c.text);
        let cos = cosine(v, &c.vector);
        assert!(
            cos >= 0.999,
            "cosine {cos} with the reference for {:?}",
            c.text
        );
    }
}

#[test]
fn vectors_do_not_depend_on_order_or_batch_grouping() {
    let cases = fixture();
    let model = minilm();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let together = model.embed(&texts).expect("embed");

    // One at a time (no padding at all).
    for (t, want) in texts.iter().zip(&together) {
        let alone = model.embed(&[t]).expect("embed one");
        assert!(cosine(&alone[0], want) > 0.99999, "{t:?} alone");
    }

    // Shuffled, among fillers of many lengths, so that the length groups differ.
    let fillers: Vec<String> = (0..70)
        .map(|i| "filler words of a chunk ".repeat(1 + (i * 7) % 60))
        .collect();
    let mut mixed: Vec<(Option<usize>, &str)> =
        fillers.iter().map(|f| (None, f.as_str())).collect();
    for (i, t) in texts.iter().enumerate() {
        mixed.insert((i * 13) % (mixed.len() + 1), (Some(i), t));
    }
    let mixed_texts: Vec<&str> = mixed.iter().map(|(_, t)| *t).collect();
    let got = model.embed(&mixed_texts).expect("embed mixed");
    assert_eq!(got.len(), mixed.len());
    for ((i, t), v) in mixed.iter().zip(&got) {
        if let Some(i) = i {
            assert!(cosine(v, &together[*i]) > 0.99999, "{t:?} mixed");
        }
    }
    assert!(model.embed(&[]).expect("embed nothing").is_empty());
}

#[test]
fn an_absent_folder_or_file_is_named() {
    let spec = EmbedSpec::of_model("local:/nonexistent/minilm").expect("spec");
    let err = embedder_for(&spec).err().expect("an error");
    assert!(err.contains("/nonexistent/minilm"), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        model_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy config.json");
    let spec = EmbedSpec::of_model(&format!("local:{}", dir.path().display())).expect("spec");
    let err = embedder_for(&spec).err().expect("an error");
    assert!(err.contains("missing file model.safetensors"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

/// A Hugging Face hub cache in `hub` holding the test model under `refs/main`'s snapshot, with
/// a newer, empty snapshot beside it that must not be picked.
fn fake_hub(hub: &Path) {
    let repo = hub.join("models--sentence-transformers--all-MiniLM-L6-v2");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(snap.join("1_Pooling")).expect("mkdir");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs").join("main"), "0123abcd").expect("write refs/main");
    let src = model_dir();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        std::os::unix::fs::symlink(src.join(f), snap.join(f)).expect("symlink");
    }
    std::fs::create_dir_all(repo.join("snapshots").join("ffff0000")).expect("mkdir");
}

/// Runs `hub_child` in a child process with a clean Hugging Face environment plus `envs`.
fn run_child(case: &str, envs: &[(&str, &Path)]) {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args(["--exact", "hub_child", "--include-ignored", "--nocapture"])
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .env("FRESHINDEX_HUB_CASE", case)
        .env(MODEL_ENV, model_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child case {case} failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn hf_model_resolves_from_hf_home() {
    let home = tempfile::tempdir().expect("tempdir");
    fake_hub(&home.path().join("hub"));
    run_child("resolves", &[("HF_HOME", home.path())]);
}

#[test]
fn hf_model_resolves_from_hf_hub_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = dir.path().join("elsewhere");
    fake_hub(&hub);
    run_child("resolves", &[("HF_HUB_CACHE", &hub)]);
}

#[test]
fn hf_model_absent_names_where_it_looked() {
    let home = tempfile::tempdir().expect("tempdir");
    run_child("absent", &[("HF_HOME", home.path())]);
}

#[test]
#[ignore = "run by the hf_model_* tests in a child process"]
fn hub_child() {
    match std::env::var("FRESHINDEX_HUB_CASE").as_deref() {
        Ok("resolves") => {
            let spec = EmbedSpec::of_model(&format!("hf:{HUB_ID}")).expect("spec");
            let model = embedder_for(&spec).expect("load from the hub cache");
            assert_eq!(model.dimension(), 384);
            let cases = fixture();
            let v = model.embed(&[cases[1].text.as_str()]).expect("embed");
            assert!(cosine(&v[0], &cases[1].vector) >= 0.999);
        }
        Ok("absent") => {
            let home = std::env::var("HF_HOME").expect("HF_HOME");
            let spec = EmbedSpec::of_model("hf:nobody/nothing").expect("spec");
            let err = embedder_for(&spec).err().expect("an error");
            let looked = format!("{home}/hub/models--nobody--nothing/snapshots");
            assert!(err.contains(&looked), "{err}");
            assert!(
                err.contains("huggingface-cli download nobody/nothing"),
                "{err}"
            );
        }
        other => panic!("FRESHINDEX_HUB_CASE: unexpected {other:?}"),
    }
}
