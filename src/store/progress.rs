//! How much of each origin's log a store holds: every entry up to a contiguous mark, the
//! entries above a gap, and the runs senders covered. Guarantees: the mark only moves forward,
//! and what is tracked above a gap is bounded ([`GAP_SEQUENCES_TRACKED_MAX`],
//! [`COVERED_RUNS_TRACKED_MAX`]); what is forgotten there is only sent again.

use std::collections::{BTreeMap, BTreeSet};

use super::documents::for_each_entry;
use super::layout;
use super::{Store, StoreError};
use crate::record::NodeId;

/// Which entries of one origin's log are held: all up to `contiguous`, and `above` beyond it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginProgress {
    pub contiguous: u64,
    pub above: BTreeSet<u64>,
    /// Runs `(after, through]` a sender covered above the contiguous mark, by `after`: the
    /// mark moves over one once it reaches it. In memory only, at most
    /// [`COVERED_RUNS_TRACKED_MAX`]: one forgotten is covered again after the next summary.
    pub covered_above: std::collections::BTreeMap<u64, u64>,
}

/// Most covered runs kept above a gap, per origin.
pub const COVERED_RUNS_TRACKED_MAX: usize = 1024;

/// Most sequence numbers tracked above a gap, per origin. Past it the highest are forgotten:
/// they stay in the log, only the contiguous mark may lag, so peers send them again.
pub const GAP_SEQUENCES_TRACKED_MAX: usize = 100_000;

impl OriginProgress {
    pub fn holds(&self, sequence: u64) -> bool {
        sequence <= self.contiguous || self.above.contains(&sequence)
    }

    /// Counts every entry up to `through` as held (a sender covered them).
    pub fn cover(&mut self, through: u64) {
        if through <= self.contiguous {
            return;
        }
        self.contiguous = through;
        self.above = self.above.split_off(&(through + 1));
        self.advance();
    }

    /// Counts the entries of `(after, through]` as held: at once if the mark reaches `after`,
    /// else once it does.
    pub fn cover_run(&mut self, after: u64, through: u64) {
        if through <= self.contiguous {
            return;
        }
        if after <= self.contiguous {
            self.cover(through);
            return;
        }
        let run = self.covered_above.entry(after).or_insert(through);
        *run = (*run).max(through);
        if self.covered_above.len() > COVERED_RUNS_TRACKED_MAX {
            self.covered_above.pop_last();
        }
    }

    /// Moves the mark over the entries and covered runs that follow it.
    fn advance(&mut self) {
        loop {
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
            let Some((&after, &through)) = self.covered_above.first_key_value() else {
                return;
            };
            if after > self.contiguous {
                return;
            }
            self.covered_above.pop_first();
            if through > self.contiguous {
                self.contiguous = through;
                self.above = self.above.split_off(&(through + 1));
            }
        }
    }

    pub fn insert(&mut self, sequence: u64) {
        if sequence <= self.contiguous {
            return;
        }
        if sequence == self.contiguous + 1 {
            self.contiguous = sequence;
            self.advance();
        } else {
            self.above.insert(sequence);
            if self.above.len() > GAP_SEQUENCES_TRACKED_MAX {
                self.above.pop_last();
            }
        }
    }
}

/// Reads the whole log once to learn how much of each origin is held.
pub(super) fn scan_origins<S: Store>(
    store: &S,
    floors: &BTreeMap<NodeId, u64>,
) -> Result<BTreeMap<NodeId, OriginProgress>, StoreError> {
    let mut origins: BTreeMap<NodeId, OriginProgress> = BTreeMap::new();
    // Entries at or below a floor were held, then truncated.
    for (origin, floor) in floors {
        origins.entry(*origin).or_default().cover(*floor);
    }
    for_each_entry(store, layout::LOG_PREFIX, |key, _| {
        let origin = layout::log_origin(key)?;
        let sequence = layout::log_sequence(key)?;
        origins.entry(origin).or_default().insert(sequence);
        Ok(())
    })?;
    // Where senders covered the log for this node (what it may read of it is all held).
    let prefix = layout::cover_prefix();
    for_each_entry(store, &prefix, |key, value| {
        let origin = layout::node_after(&prefix, key)?;
        let mark = layout::decode_u64("a cover mark", value)?;
        origins.entry(origin).or_default().cover(mark);
        Ok(())
    })?;
    Ok(origins)
}
