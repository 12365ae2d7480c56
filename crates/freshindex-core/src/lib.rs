//! Domain types shared by every freshindex crate: fingerprints, item statuses, the flow
//! specification and its configuration file, and target rows.
//!
//! This crate does no I/O beyond parsing text it is handed; it has no threads.

pub mod config;
pub mod fingerprint;
pub mod queue;
pub mod row;
pub mod spec;
pub mod status;

pub use config::{Config, ConfigError};
pub use fingerprint::{Fingerprint, FpMap};
pub use queue::PushType;
pub use row::{Row, RowPayload};
pub use spec::{EmbedSpec, FlowSpec, ParseSpec, SourceSpec, SplitSpec, StepSpec, TargetSpec};
pub use status::ItemStatus;
