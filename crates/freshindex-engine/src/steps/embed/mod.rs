//! Embed: chunk texts to vectors through the [`Embedder`] trait.
//!
//! Models, by the flow's `model`:
//! - `builtin`: hashed n-gram features, 384 dimensions, no download ([`builtin`]);
//! - `local:PATH` and `hf:ORG/NAME`: a BERT-family sentence-embedding model in Hugging Face
//!   format, run on the CPU ([`local`], cargo feature `local-models`);
//! - `openai:MODEL`: a server of the OpenAI embeddings protocol ([`openai`]).
//!
//! Loaded models are shared by every flow and search of the process ([`embedder_for`] keeps
//! them by identity), so a search does not load a model again.

pub mod builtin;
#[cfg(feature = "local-models")]
pub mod local;
pub mod openai;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use builtin::BuiltinEmbedder;
use freshindex_core::{EmbedSpec, ModelRef};

/// An embedding model.
pub trait Embedder: Send + Sync {
    /// Output dimension.
    fn dimension(&self) -> usize;
    /// Embeds each text; the result has one vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String>;
}

/// Dimension of the built-in model.
pub const BUILTIN_DIMENSION: usize = 384;

/// Behaviour version of a model: part of every cache key of its results.
pub fn behavior_version(model: &str) -> u64 {
    match ModelRef::parse(model) {
        Ok(ModelRef::Builtin) => 1,
        Ok(ModelRef::Local(_) | ModelRef::Hf(_)) => 1,
        _ => 0,
    }
}

/// Environment variable of a test hook: a text that contains its value fails to embed, with
/// every model (`FRESHINDEX_EMBED_FAIL=poison`). `FRESHINDEX_EMBED_FAIL_FILE=PATH` does the
/// same with each line of a file, read again at every call (so a test can heal the model).
pub const FAIL_ENV: &str = "FRESHINDEX_EMBED_FAIL";

/// See [`FAIL_ENV`].
pub const FAIL_FILE_ENV: &str = "FRESHINDEX_EMBED_FAIL_FILE";

/// Nanoseconds this process spent inside embedding models (summed over threads).
static MODEL_NS: AtomicU64 = AtomicU64::new(0);

/// Time this process spent inside embedding models so far (summed over the threads that
/// called them): what the model costs in a run, next to the run's own time.
pub fn model_time() -> std::time::Duration {
    std::time::Duration::from_nanos(MODEL_NS.load(Ordering::Relaxed))
}

/// Counts the time of the model's calls in [`model_time`].
struct Timed(Arc<dyn Embedder>);

impl Embedder for Timed {
    fn dimension(&self) -> usize {
        self.0.dimension()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let started = Instant::now();
        let r = self.0.embed(texts);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        MODEL_NS.fetch_add(ns, Ordering::Relaxed);
        r
    }
}

/// The embedder for a spec, loaded once per process and identity.
pub fn embedder_for(spec: &EmbedSpec) -> Result<Arc<dyn Embedder>, String> {
    static LOADED: Mutex<Option<HashMap<String, Arc<dyn Embedder>>>> = Mutex::new(None);
    let key = format!("{};threads={:?}", spec.identity(), spec.threads);
    if let Some(e) = LOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Ok(with_fail_hook(e.clone()));
    }
    let model: Arc<dyn Embedder> = match spec.model_ref() {
        ModelRef::Builtin => Arc::new(BuiltinEmbedder),
        ModelRef::OpenAi(name) => Arc::new(openai::OpenAiEmbedder::new(&name, spec)?),
        ModelRef::Local(path) => load_local(spec, LocalModel::Path(path))?,
        ModelRef::Hf(id) => load_local(spec, LocalModel::Hub(id))?,
        ModelRef::Invalid(m) => return Err(format!("model: unknown model `{m}`")),
    };
    let model: Arc<dyn Embedder> = Arc::new(Timed(model));
    // Two threads loading the same model at once both load it; the first one kept wins.
    let kept = LOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert(model)
        .clone();
    Ok(with_fail_hook(kept))
}

/// Where a local model comes from.
#[derive(Clone, Debug)]
pub enum LocalModel {
    /// A folder.
    Path(String),
    /// A model id of the local Hugging Face cache.
    Hub(String),
}

#[cfg(feature = "local-models")]
fn load_local(spec: &EmbedSpec, model: LocalModel) -> Result<Arc<dyn Embedder>, String> {
    Ok(Arc::new(local::LocalEmbedder::load(&model, spec.threads)?))
}

#[cfg(not(feature = "local-models"))]
fn load_local(spec: &EmbedSpec, _model: LocalModel) -> Result<Arc<dyn Embedder>, String> {
    Err(format!(
        "model: `{}` is a local transformer model, and this build has no local models \
         (build with the cargo feature `local-models`)",
        spec.model
    ))
}

fn with_fail_hook(e: Arc<dyn Embedder>) -> Arc<dyn Embedder> {
    let marker = std::env::var(FAIL_ENV).ok().filter(|m| !m.is_empty());
    let file = std::env::var_os(FAIL_FILE_ENV).map(std::path::PathBuf::from);
    if marker.is_none() && file.is_none() {
        return e;
    }
    Arc::new(FailOn {
        inner: e,
        marker,
        file,
    })
}

/// The [`FAIL_ENV`] test hook.
struct FailOn {
    inner: Arc<dyn Embedder>,
    marker: Option<String>,
    file: Option<std::path::PathBuf>,
}

impl FailOn {
    fn markers(&self) -> Vec<String> {
        let mut out: Vec<String> = self.marker.iter().cloned().collect();
        if let Some(f) = &self.file
            && let Ok(text) = std::fs::read_to_string(f)
        {
            out.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        out
    }
}

impl Embedder for FailOn {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let markers = self.markers();
        if let Some(t) = texts
            .iter()
            .find(|t| markers.iter().any(|m| t.contains(m.as_str())))
        {
            let head: String = t.chars().take(40).collect();
            return Err(format!(
                "model refused the text `{head}` (test hook {FAIL_ENV})"
            ));
        }
        self.inner.embed(texts)
    }
}
