//! Keeping large sorted sets compact.
//!
//! A `BTreeSet` grown one entry at a time, in order, is a tree of nodes a little over half full
//! (each split leaves six of eleven slots in use), so a table of 20,000 leases or 60,000 kernel
//! entries takes nearly twice the memory it needs. [`compact`] rebuilds such a set with full
//! nodes. It merges through the standard library's bulk builder, which frees the old tree's nodes
//! as it goes, so the rebuild holds little more than the set itself at any moment (collecting into
//! a new set would first copy every entry into a vector and sort it).
//!
//! ```
//! use std::collections::BTreeSet;
//! let mut s: BTreeSet<u32> = BTreeSet::new();
//! for i in 0..1000 {
//!     s.insert(i);
//! }
//! flannel_core::compact::compact(&mut s);
//! assert_eq!(s.len(), 1000);
//! assert!(s.iter().copied().eq(0..1000));
//! ```

use std::collections::BTreeSet;

/// Rebuilds `set` with full nodes; its entries and their order stay the same.
pub fn compact<T: Ord>(set: &mut BTreeSet<T>) {
    // `append` into a non-empty set merges both through the bulk builder (into an empty one it
    // would only swap the trees).
    let Some(first) = set.pop_first() else {
        return;
    };
    let mut rebuilt = BTreeSet::from([first]);
    rebuilt.append(set);
    *set = rebuilt;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entries_stay_and_so_do_their_lookups() {
        for n in [0usize, 1, 2, 11, 12, 1000, 4097] {
            let mut s: BTreeSet<usize> = (0..n).rev().collect();
            s.extend((0..n).map(|i| i * 3));
            let before: Vec<usize> = s.iter().copied().collect();
            compact(&mut s);
            assert!(s.iter().copied().eq(before.iter().copied()), "n = {n}");
            assert_eq!(s.len(), before.len());
            for v in &before {
                assert!(s.contains(v));
            }
            assert!(!s.contains(&(3 * n + 1)));
        }
    }
}
