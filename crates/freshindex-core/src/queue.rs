//! The indexing queue's vocabulary (after the Cloud Search indexing queues): push types, queue
//! labels, limits and the retry backoff. The queue itself lives in the state store.

use std::fmt;
use std::str::FromStr;

use crate::ItemStatus;

/// The label of items pushed without one.
pub const DEFAULT_QUEUE: &str = "default";
/// Largest opaque payload an entry keeps.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024;
/// Entries a poll returns when the caller does not say.
pub const DEFAULT_POLL_LIMIT: usize = 20;
/// Most entries one poll over the API may return.
pub const MAX_POLL_LIMIT: usize = 100;
/// Longest item key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest queue label and content or metadata hash.
pub const MAX_LABEL_BYTES: usize = 512;
/// Lease of a polled entry when the caller does not say.
pub const DEFAULT_LEASE_MS: i64 = 60_000;

/// A push that states what happened to the item instead of giving hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PushType {
    /// Changed in the repository: indexed items become `MODIFIED`, unknown ones `NEW_ITEM`.
    Modified,
    /// Unchanged since the last index: the entry becomes `ACCEPTED` and its lease ends.
    NotModified,
    /// The repository could not deliver it: the lease ends and the entry is offered again
    /// only after a per-item exponential backoff.
    RepositoryError,
    /// Put a reserved entry back: its lease ends and it is available at once.
    Requeue,
}

impl PushType {
    /// Every type.
    pub const ALL: [PushType; 4] = [
        PushType::Modified,
        PushType::NotModified,
        PushType::RepositoryError,
        PushType::Requeue,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PushType::Modified => "MODIFIED",
            PushType::NotModified => "NOT_MODIFIED",
            PushType::RepositoryError => "REPOSITORY_ERROR",
            PushType::Requeue => "REQUEUE",
        }
    }
}

impl fmt::Display for PushType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PushType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PushType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown push type `{s}`; expected one of MODIFIED, NOT_MODIFIED, REPOSITORY_ERROR, REQUEUE"
                )
            })
    }
}

/// Poll priority of a status: lower is served first. `ERROR` > `MODIFIED` > `NEW_ITEM` >
/// `ACCEPTED`; `SKIPPED` (accepted, deliberately without rows) comes last.
pub fn priority(status: ItemStatus) -> i64 {
    match status {
        ItemStatus::Error => 0,
        ItemStatus::Modified => 1,
        ItemStatus::NewItem => 2,
        ItemStatus::Accepted => 3,
        ItemStatus::Skipped => 4,
    }
}

/// Statuses a poll returns when the caller gives no filter: the ones with work to do.
pub const DEFAULT_POLL_STATUSES: [ItemStatus; 3] =
    [ItemStatus::Error, ItemStatus::Modified, ItemStatus::NewItem];

/// First retry delay after a failure.
pub const RETRY_BASE_MS: i64 = 30_000;
/// Longest retry delay.
pub const RETRY_CAP_MS: i64 = 3_600_000;

/// How long an entry waits after its `attempts`-th consecutive failure (1-based): 30 s,
/// doubling, at most one hour.
pub fn retry_backoff_ms(attempts: u32) -> i64 {
    let shift = attempts.saturating_sub(1).min(20);
    RETRY_BASE_MS
        .saturating_mul(1i64 << shift)
        .min(RETRY_CAP_MS)
}

/// Checks a queue label or hash: non-empty, at most [`MAX_LABEL_BYTES`], no control
/// characters.
pub fn check_label(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    if value.len() > MAX_LABEL_BYTES {
        return Err(format!(
            "{field}: {} bytes, over the limit of {MAX_LABEL_BYTES}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field}: must not contain control characters"));
    }
    Ok(())
}

/// Checks an item key: non-empty, at most [`MAX_KEY_BYTES`], no NUL.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("name: the item name must not be empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "name: {} bytes, over the limit of {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Err("name: must not contain NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_types_round_trip() {
        for t in PushType::ALL {
            assert_eq!(t.as_str().parse::<PushType>(), Ok(t));
        }
        assert!("DELETED".parse::<PushType>().is_err());
    }

    #[test]
    fn priorities_follow_the_seed_order() {
        let mut all = ItemStatus::ALL;
        all.sort_by_key(|s| priority(*s));
        assert_eq!(
            all,
            [
                ItemStatus::Error,
                ItemStatus::Modified,
                ItemStatus::NewItem,
                ItemStatus::Accepted,
                ItemStatus::Skipped
            ]
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(retry_backoff_ms(1), 30_000);
        assert_eq!(retry_backoff_ms(2), 60_000);
        assert_eq!(retry_backoff_ms(3), 120_000);
        assert_eq!(retry_backoff_ms(40), RETRY_CAP_MS);
        assert_eq!(retry_backoff_ms(0), 30_000);
    }
}
