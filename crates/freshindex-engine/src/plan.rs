//! Lineage diff: the minimal target mutations that take an item from its tracked rows to its
//! new rows. Pure functions, so the two-phase protocol can be checked exhaustively.

use std::collections::{HashMap, HashSet};

use freshindex_core::Fingerprint;
use freshindex_store::ItemLineage;

/// Row key of the `dup`-th occurrence of a chunk text (fingerprint `text_fp`) in an item: stable
/// for unchanged content, so an edit elsewhere in the document keeps the key.
pub fn row_key(item_key: &str, text_fp: &Fingerprint, dup: u32) -> String {
    let fp = Fingerprint::builder("freshindex/row-key")
        .str(item_key)
        .fp(text_fp)
        .u64(dup as u64)
        .finish();
    fp.hex_prefix(16)
}

/// Fingerprint of everything a row holds and where it is written, to tell an unchanged row
/// from one that must be written (a new target collection rewrites every row).
pub fn row_fp(
    collection: &str,
    row_key: &str,
    source: &str,
    range: [usize; 2],
    text_fp: &Fingerprint,
    vector_key: &Fingerprint,
) -> Fingerprint {
    Fingerprint::builder("freshindex/row")
        .str(collection)
        .str(row_key)
        .str(source)
        .u64(range[0] as u64)
        .u64(range[1] as u64)
        .fp(text_fp)
        .fp(vector_key)
        .finish()
}

/// What to do with one item's rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemPlan {
    /// Indexes (into the new rows) of rows to upsert.
    pub upsert: Vec<usize>,
    /// Keys to delete from the target.
    pub delete: Vec<String>,
    /// Keys to record as pending before the write: every key the write touches (the union of
    /// the old and new keys it changes). After a crash each is rewritten or deleted by the next
    /// plan, whatever the interrupted write left in it — even a key whose new content equals
    /// its tracked content, since the interrupted write may have deleted or overwritten it.
    pub pending: Vec<String>,
    /// New rows.
    pub added: u64,
    /// Rewritten rows.
    pub updated: u64,
    /// Removed tracked rows.
    pub deleted: u64,
    /// Tracked rows left untouched.
    pub unchanged: u64,
}

impl ItemPlan {
    /// Whether the plan touches the target.
    pub fn writes(&self) -> bool {
        !self.upsert.is_empty() || !self.delete.is_empty()
    }
}

/// Diffs an item's lineage (tracked rows and keys left pending by an interrupted write) against
/// its new rows `(key, fingerprint)`.
pub fn plan_item(old: &ItemLineage, new: &[(String, Fingerprint)]) -> ItemPlan {
    let tracked: HashMap<&str, &Fingerprint> = old
        .tracked
        .iter()
        .map(|r| (r.row_key.as_str(), &r.row_fp))
        .collect();
    let new_keys: HashSet<&str> = new.iter().map(|(k, _)| k.as_str()).collect();
    // A pending key may hold anything an interrupted write left there: rewrite it.
    let pending: HashSet<&str> = old.pending.iter().map(String::as_str).collect();
    let mut plan = ItemPlan::default();
    for (i, (key, fp)) in new.iter().enumerate() {
        match tracked.get(key.as_str()) {
            Some(old_fp) if *old_fp == fp && !pending.contains(key.as_str()) => plan.unchanged += 1,
            Some(_) => {
                plan.updated += 1;
                plan.upsert.push(i);
                plan.pending.push(key.clone());
            }
            None => {
                plan.added += 1;
                plan.upsert.push(i);
                plan.pending.push(key.clone());
            }
        }
    }
    for r in &old.tracked {
        if !new_keys.contains(r.row_key.as_str()) {
            plan.deleted += 1;
            plan.delete.push(r.row_key.clone());
            plan.pending.push(r.row_key.clone());
        }
    }
    // Keys an interrupted write may have left in the target: delete those not in the new set.
    for k in &old.pending {
        if !new_keys.contains(k.as_str()) && !tracked.contains_key(k.as_str()) {
            plan.delete.push(k.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshindex_store::TrackedRow;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    #[test]
    fn edit_keeps_unchanged_rows() {
        let old = ItemLineage {
            tracked: (0..5)
                .map(|i| TrackedRow {
                    row_key: format!("k{i}"),
                    row_fp: fp(i),
                    memo_key: None,
                })
                .collect(),
            pending: vec![],
        };
        // Seed 002's example: 3 of 5 chunks unchanged, 2 replaced by 2 new ones.
        let new = vec![
            ("k0".to_string(), fp(0)),
            ("k1".to_string(), fp(1)),
            ("k2".to_string(), fp(2)),
            ("n1".to_string(), fp(9)),
            ("n2".to_string(), fp(8)),
        ];
        let p = plan_item(&old, &new);
        assert_eq!((p.added, p.updated, p.deleted, p.unchanged), (2, 0, 2, 3));
        assert_eq!(p.upsert, vec![3, 4]);
        assert_eq!(p.delete, vec!["k3".to_string(), "k4".to_string()]);
        assert_eq!(p.pending, ["n1", "n2", "k3", "k4"]);
    }

    proptest! {
        /// Two-phase model: whatever subset of an interrupted write reached the target, one
        /// run of the plan leaves the target holding exactly the new rows of the item.
        #[test]
        fn plan_restores_target_after_any_interruption(
            tracked in proptest::collection::btree_map(0u8..20, 0u8..4, 0..8),
            interrupted in proptest::collection::btree_map(0u8..20, 0u8..4, 0..8),
            reached in proptest::collection::vec(any::<bool>(), 40),
            new in proptest::collection::btree_map(0u8..20, 0u8..4, 0..8),
        ) {
            let rows = |m: &BTreeMap<u8, u8>| -> Vec<(String, u8)> {
                m.iter().map(|(k, v)| (format!("k{k}"), *v)).collect()
            };
            let fps = |r: &[(String, u8)]| -> Vec<(String, Fingerprint)> {
                r.iter().map(|(k, v)| (k.clone(), fp(*v))).collect()
            };
            let committed = rows(&tracked);
            let lineage = ItemLineage {
                tracked: committed
                    .iter()
                    .map(|(k, v)| TrackedRow { row_key: k.clone(), row_fp: fp(*v), memo_key: None })
                    .collect(),
                pending: vec![],
            };
            // The target starts equal to the lineage.
            let mut target: BTreeMap<String, u8> = committed.iter().cloned().collect();
            // An attempt records pending keys, then crashes after an arbitrary part of its write.
            let attempt = rows(&interrupted);
            let p1 = plan_item(&lineage, &fps(&attempt));
            for (n, i) in p1.upsert.iter().enumerate() {
                if reached[n] {
                    target.insert(attempt[*i].0.clone(), attempt[*i].1);
                }
            }
            for (n, k) in p1.delete.iter().enumerate() {
                if reached[20 + n] {
                    target.remove(k);
                }
            }
            let after_crash = ItemLineage { tracked: lineage.tracked.clone(), pending: p1.pending.clone() };
            // The next run plans from the lineage and pending keys, and completes.
            let want = rows(&new);
            let p2 = plan_item(&after_crash, &fps(&want));
            for k in &p2.delete {
                target.remove(k);
            }
            for i in &p2.upsert {
                target.insert(want[*i].0.clone(), want[*i].1);
            }
            let expected: BTreeMap<String, u8> = want.into_iter().collect();
            prop_assert_eq!(target, expected);
        }
    }
}
