//! Pieces the benchmark binaries share: a minimal HTTP client and a `freshindex serve` child.

pub mod http;
