//! `openai:MODEL`: a server of the OpenAI embeddings protocol.

use freshindex_core::EmbedSpec;

use super::Embedder;

/// Embeds through `POST {base_url}/embeddings`.
pub struct OpenAiEmbedder {
    model: String,
}

impl OpenAiEmbedder {
    /// A client for `model` with the spec's settings.
    pub fn new(model: &str, _spec: &EmbedSpec) -> Result<OpenAiEmbedder, String> {
        Ok(OpenAiEmbedder {
            model: model.to_string(),
        })
    }
}

impl Embedder for OpenAiEmbedder {
    fn dimension(&self) -> usize {
        0
    }

    fn embed(&self, _texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        Err(format!("openai:{}: not available yet", self.model))
    }
}
