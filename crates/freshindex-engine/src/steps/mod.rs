//! The steps of a flow: parse, split, embed. Each has a behaviour version that is part of the
//! fingerprint of everything it produces; bump it when its output changes for the same input.

pub mod embed;
pub mod parse;
pub mod split;

use freshindex_core::{Fingerprint, FlowSpec, StepSpec};

/// Fingerprint of the steps an item is processed with: when it changes, every item is
/// processed again (the memo cache still spares unchanged embeddings).
pub fn processing_fingerprint(spec: &FlowSpec) -> Fingerprint {
    let split = spec.split();
    // The multi-input steps (and a flows source) shape every item's text and fields; flows
    // without them keep the fingerprint they always had.
    let multi: Vec<&StepSpec> = spec
        .steps()
        .iter()
        .filter(|s| {
            matches!(
                s,
                StepSpec::Group(_) | StepSpec::Lookup(_) | StepSpec::Template(_)
            )
        })
        .collect();
    let mut b = Fingerprint::builder("freshindex/processing");
    if !multi.is_empty() || spec.flows_source().is_some() {
        let shape = serde_json::json!({ "steps": multi, "source": spec.flows_source() });
        b = b.str(&shape.to_string());
    }
    b.u64(parse::BEHAVIOR_VERSION)
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
