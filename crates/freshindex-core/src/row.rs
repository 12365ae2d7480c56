//! Target rows: what a flow writes into its target.

use serde::{Deserialize, Serialize};

/// The payload stored beside a chunk's vector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowPayload {
    /// The source item key (a path relative to the source root for files).
    pub source: String,
    /// Byte range of the chunk in the source item, `[start, end)`.
    pub range: [usize; 2],
    /// The chunk text.
    pub text: String,
    /// Metadata of the source item (pushed items carry it with their content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// One target row: a stable key, a vector and its payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Stable key derived from the source key and the chunk content.
    pub key: String,
    /// The embedding.
    pub vector: Vec<f32>,
    /// Source, range and text.
    pub payload: RowPayload,
}
