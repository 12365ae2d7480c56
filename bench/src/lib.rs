//! Pieces the benchmark binaries share: a minimal HTTP client and a `freshindex serve` child,
//! clustered vectors and measuring helpers.

pub mod http;
pub mod queue;
pub mod vectors;
