//! The execution history's vocabulary (seed 004): where a recorded run stands.
//!
//! Every run of a flow — scheduled, manual, a live batch, a reset — and every skipped
//! occurrence is an entry of the flow's history. How it was started is a
//! [`Trigger`](crate::Trigger); how it stands is a [`RunState`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::schedule::Outcome;

/// Where a history entry stands. The names are the seed's (`inProgress`, `success`,
/// `transientFailure`, `persistentFailure`, `reset`, `skipped`); only `inProgress` is not
/// final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RunState {
    /// Started and not finished: running now, or left so by a process that died (the next
    /// run of the flow finds it and marks it [`RunState::TransientFailure`]).
    InProgress,
    /// Completed, with failed items within `max_failed_items`.
    Success,
    /// Could not complete for a reason that may go away by itself: the state store or a
    /// target failed (I/O), a bug, or the process running it died. The next run may succeed
    /// unchanged.
    TransientFailure,
    /// Completed with more failed items than `max_failed_items` allows, or could not run
    /// because of something the user must fix (the flow's config, a missing source folder).
    PersistentFailure,
    /// The flow's state (or some items' state) was forgotten, so that the next run
    /// reprocesses it.
    Reset,
    /// A scheduled occurrence found the flow's previous run still going and did not run.
    Skipped,
}

impl RunState {
    /// Every state, in display order.
    pub const ALL: [RunState; 6] = [
        RunState::InProgress,
        RunState::Success,
        RunState::TransientFailure,
        RunState::PersistentFailure,
        RunState::Reset,
        RunState::Skipped,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::InProgress => "inProgress",
            RunState::Success => "success",
            RunState::TransientFailure => "transientFailure",
            RunState::PersistentFailure => "persistentFailure",
            RunState::Reset => "reset",
            RunState::Skipped => "skipped",
        }
    }

    /// Whether the entry is final (everything but [`RunState::InProgress`]).
    pub fn is_finished(self) -> bool {
        match self {
            RunState::InProgress => false,
            RunState::Success
            | RunState::TransientFailure
            | RunState::PersistentFailure
            | RunState::Reset
            | RunState::Skipped => true,
        }
    }

    /// Whether the entry is a failed run (transient or persistent).
    pub fn is_failure(self) -> bool {
        match self {
            RunState::TransientFailure | RunState::PersistentFailure => true,
            RunState::InProgress | RunState::Success | RunState::Reset | RunState::Skipped => false,
        }
    }

    /// What the entry means for scheduling: a finished run succeeded or failed; an entry that
    /// is no finished run (in progress, a reset, a skipped occurrence) means nothing.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            RunState::Success => Some(Outcome::Success),
            RunState::TransientFailure | RunState::PersistentFailure => Some(Outcome::Failure),
            RunState::InProgress | RunState::Reset | RunState::Skipped => None,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown run status `{s}`; expected one of inProgress, success, transientFailure, persistentFailure, reset, skipped"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for st in RunState::ALL {
            assert_eq!(st.as_str().parse::<RunState>(), Ok(st));
            assert_eq!(
                serde_json::to_string(&st).expect("serialize"),
                format!("\"{st}\"")
            );
        }
        assert!("failed".parse::<RunState>().is_err());
    }

    #[test]
    fn predicates() {
        let finished: Vec<RunState> = RunState::ALL
            .into_iter()
            .filter(|s| !s.is_finished())
            .collect();
        assert_eq!(finished, [RunState::InProgress]);
        assert!(RunState::TransientFailure.is_failure());
        assert!(!RunState::Reset.is_failure());
        assert_eq!(RunState::Success.outcome(), Some(Outcome::Success));
        assert_eq!(RunState::Skipped.outcome(), None);
    }
}
