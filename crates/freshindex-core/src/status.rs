//! The state of one source item, as the state store keeps it.

use std::fmt;
use std::str::FromStr;

/// Where a source item stands. The names and priority follow the indexing-queue model:
/// `ERROR` > `MODIFIED` > `NEW_ITEM` > `ACCEPTED` for work still to do; `SKIPPED` is an
/// accepted item that produced no rows on purpose (binary, empty, too large).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ItemStatus {
    /// Never indexed.
    NewItem,
    /// Indexed before and changed since.
    Modified,
    /// Indexed and unchanged.
    Accepted,
    /// Seen and deliberately not indexed (a warning says why).
    Skipped,
    /// The last attempt failed; retried on the next run.
    Error,
}

impl ItemStatus {
    /// Every status, in display order.
    pub const ALL: [ItemStatus; 5] = [
        ItemStatus::NewItem,
        ItemStatus::Modified,
        ItemStatus::Accepted,
        ItemStatus::Skipped,
        ItemStatus::Error,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::NewItem => "NEW_ITEM",
            ItemStatus::Modified => "MODIFIED",
            ItemStatus::Accepted => "ACCEPTED",
            ItemStatus::Skipped => "SKIPPED",
            ItemStatus::Error => "ERROR",
        }
    }

    /// Whether the item's last processing finished (its rows are what its content derives).
    pub fn is_settled(self) -> bool {
        match self {
            ItemStatus::Accepted | ItemStatus::Skipped => true,
            ItemStatus::NewItem | ItemStatus::Modified | ItemStatus::Error => false,
        }
    }
}

impl fmt::Display for ItemStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ItemStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ItemStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown item status `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for st in ItemStatus::ALL {
            assert_eq!(st.as_str().parse::<ItemStatus>(), Ok(st));
        }
        assert!("nope".parse::<ItemStatus>().is_err());
    }
}
