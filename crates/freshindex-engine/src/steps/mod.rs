//! The steps of a flow: parse, split, embed. Each has a behaviour version that is part of the
//! fingerprint of everything it produces; bump it when its output changes for the same input.

pub mod embed;
pub mod parse;
pub mod split;

use freshindex_core::{Fingerprint, FlowSpec};

/// Fingerprint of the steps an item is processed with: when it changes, every item is
/// processed again (the memo cache still spares unchanged embeddings).
pub fn processing_fingerprint(spec: &FlowSpec) -> Fingerprint {
    let split = spec.split();
    Fingerprint::builder("freshindex/processing")
        .u64(parse::BEHAVIOR_VERSION)
        .u64(split::BEHAVIOR_VERSION)
        .u64(split.chunk_size as u64)
        .u64(split.chunk_overlap as u64)
        .str(&spec.embed().identity())
        .u64(embed::behavior_version(&spec.embed().model))
        .str(&spec.target.identity())
        // The size cap decides whether a file is indexed at all.
        .u64(spec.files().map_or(0, |f| f.max_file_size.0))
        .finish()
}
