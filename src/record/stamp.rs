//! The stamp every change Concord writes carries in its commit message: who wrote it (source
//! and site names) and when, as a hybrid logical clock.
//!
//! Conflict policies must be a pure function of the document, so everything they weigh
//! travels inside it: the source and site *names* (the actor alone would need the actor
//! registry, another document that may not have arrived), and a clock that orders causally
//! later writes after earlier ones whatever the writers' wall clocks say. The clock of a
//! change is a pair, milliseconds and a logical counter, compared in that order: the wall
//! clock with counter 0 when it is past every parent's milliseconds, else the latest parent's
//! milliseconds with its counter plus one. So a write made after seeing another always stamps
//! later; a burst of writes to one record within a millisecond counts up instead of pushing
//! the milliseconds ahead of the wall clock; and a node whose clock runs ahead wins only
//! against writes that did not see its own, never for longer than its lead. A stamp written
//! before the counter existed reads as counter 0.

use automerge::{Automerge, ChangeHash};
use serde::{Deserialize, Serialize};

/// Longest commit message read as a stamp; a longer one is not Concord's.
pub const STAMP_BYTES_MAX: usize = 512;

/// What a change says of its writer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeStamp {
    /// Hybrid logical clock: milliseconds since the Unix epoch, never behind its parents'.
    pub hlc: u64,
    /// The clock's logical counter: changes stamped in the same millisecond as a parent count
    /// up from it (absent, and 0, when the milliseconds moved past every parent's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lc: u32,
    /// The source that wrote it (`api`, a binding's name), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// The name of the node (site) that wrote it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The id of the node that wrote it (hex): its *author*, whose grant the change is judged
    /// by on every node that receives it (see [`crate::scope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The version (a change hash, hex) this change brought the record back to, for a revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
}

impl ChangeStamp {
    /// The commit message that carries this stamp.
    pub fn to_message(&self) -> String {
        serde_json::to_string(self).expect("a stamp serializes")
    }

    /// The stamp of a change from its commit message and timestamp (seconds). A change
    /// without a Concord stamp (written elsewhere) counts its timestamp as its clock.
    pub fn of_change(message: Option<&str>, timestamp_seconds: i64) -> Self {
        message
            .filter(|message| message.len() <= STAMP_BYTES_MAX)
            .and_then(|message| serde_json::from_str::<ChangeStamp>(message).ok())
            .unwrap_or_else(|| ChangeStamp {
                hlc: u64::try_from(timestamp_seconds)
                    .unwrap_or(0)
                    .saturating_mul(1000),
                ..ChangeStamp::default()
            })
    }

    /// The change's clock: milliseconds, then the logical counter.
    pub fn clock(&self) -> Clock {
        Clock {
            ms: self.hlc,
            counter: self.lc,
        }
    }

    /// The node that wrote the change, as its stamp names it.
    pub fn author(&self) -> Option<crate::record::NodeId> {
        self.node.as_deref().and_then(|node| node.parse().ok())
    }

    /// The stamp of change `hash` in `doc`, if the document holds it.
    pub fn of_hash(doc: &Automerge, hash: &ChangeHash) -> Option<Self> {
        let meta = doc.get_change_meta_by_hash(hash)?;
        Some(Self::of_change(meta.message.as_deref(), meta.timestamp))
    }
}

/// A hybrid logical clock: milliseconds since the Unix epoch, then a logical counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Clock {
    pub ms: u64,
    pub counter: u32,
}

impl Clock {
    /// The clock of a change written at wall clock `wall_ms` after a change clocked `self`.
    pub fn next(self, wall_ms: u64) -> Clock {
        if wall_ms > self.ms {
            Clock {
                ms: wall_ms,
                counter: 0,
            }
        } else if self.counter == u32::MAX {
            Clock {
                ms: self.ms.saturating_add(1),
                counter: 0,
            }
        } else {
            Clock {
                ms: self.ms,
                counter: self.counter + 1,
            }
        }
    }
}

/// The clock for a change written now (`wall_ms`) on top of the document's current heads.
pub fn next_clock(doc: &Automerge, wall_ms: u64) -> Clock {
    let parents = doc
        .get_heads()
        .iter()
        .filter_map(|head| ChangeStamp::of_hash(doc, head))
        .map(|stamp| stamp.clock())
        .max();
    match parents {
        Some(parent) => parent.next(wall_ms),
        None => Clock {
            ms: wall_ms,
            counter: 0,
        },
    }
}

fn is_zero(counter: &u32) -> bool {
    *counter == 0
}

/// The wall clock in milliseconds since the Unix epoch, as writes take it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_round_trips_and_foreign_changes_use_their_timestamp() {
        let stamp = ChangeStamp {
            hlc: 1_764_000_000_123,
            lc: 2,
            src: Some("erp".into()),
            site: Some("paris".into()),
            ..ChangeStamp::default()
        };
        assert_eq!(ChangeStamp::of_change(Some(&stamp.to_message()), 0), stamp);
        let foreign = ChangeStamp::of_change(Some("fixed a typo"), 1_764_000_000);
        assert_eq!(foreign.hlc, 1_764_000_000_000);
        assert_eq!(foreign.src, None);
        assert_eq!(ChangeStamp::of_change(None, -5).hlc, 0);
    }

    #[test]
    fn a_clock_counts_up_within_a_millisecond_and_resets_when_the_wall_clock_moves_on() {
        let at = |ms, counter| Clock { ms, counter };
        assert_eq!(at(100, 0).next(100), at(100, 1));
        assert_eq!(
            at(100, 7).next(90),
            at(100, 8),
            "a wall clock behind never goes back"
        );
        assert_eq!(at(100, 7).next(101), at(101, 0));
        assert_eq!(at(100, u32::MAX).next(100), at(101, 0));
        assert!(at(100, 1) > at(100, 0) && at(101, 0) > at(100, 9));
        // A stamp written before the counter existed reads as counter 0, and one with
        // counter 0 is written as before.
        let old = ChangeStamp::of_change(Some(r#"{"hlc":5,"src":"api"}"#), 0);
        assert_eq!(old.clock(), at(5, 0));
        assert!(!old.to_message().contains("\"lc\""));
    }
}
