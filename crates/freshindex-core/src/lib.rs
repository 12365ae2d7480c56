//! Domain types shared by every freshindex crate: fingerprints, item statuses, the flow
//! specification and its configuration file, schedules and the scheduler's state machine, the
//! execution history's run states, and target rows.
//!
//! This crate does no I/O beyond parsing text it is handed; it has no threads and reads no
//! clock (the scheduler is handed the time).

pub mod config;
pub mod failpoint;
pub mod fingerprint;
pub mod history;
pub mod queue;
pub mod row;
pub mod schedule;
pub mod spec;
pub mod status;
pub mod template;

pub use config::{Config, ConfigError};
pub use fingerprint::{Fingerprint, FpMap};
pub use history::RunState;
pub use queue::PushType;
pub use row::{Row, RowPayload};
pub use schedule::{
    Action, DEFAULT_MIN_SCHEDULE_INTERVAL, FlowScheduleStatus, Interval, Outcome, RunInProgress,
    Schedule, Scheduler, Trigger,
};
pub use spec::{
    Aggregate, DEFAULT_OPENAI_BASE_URL, EmbedSpec, FlowMode, FlowSpec, FlowsSource, GroupSpec,
    LookupSpec, MergeRule, ModelRef, ParseSpec, PgVectorType, PostgresSource, PostgresTarget,
    SourceSpec, SplitSpec, StepSpec, TargetSpec, TemplateSpec,
};
pub use status::ItemStatus;
