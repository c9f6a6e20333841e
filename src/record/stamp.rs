//! The stamp every change Concord writes carries in its commit message: who wrote it (source
//! and site names) and when, as a hybrid logical clock.
//!
//! Conflict policies must be a pure function of the document, so everything they weigh
//! travels inside it: the source and site *names* (the actor alone would need the actor
//! registry, another document that may not have arrived), and a clock that orders causally
//! later writes after earlier ones whatever the writers' wall clocks say. The clock of a
//! change is `max(wall clock in ms, highest clock among its parent changes + 1)`, so a write
//! made after seeing another always stamps later, and a node whose clock runs ahead wins
//! only against writes that did not see its own, never for longer than its lead.

use automerge::{Automerge, ChangeHash};
use serde::{Deserialize, Serialize};

/// Longest commit message read as a stamp; a longer one is not Concord's.
pub const STAMP_BYTES_MAX: usize = 512;

/// What a change says of its writer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeStamp {
    /// Hybrid logical clock: milliseconds since the Unix epoch, pushed past its parents'.
    pub hlc: u64,
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
                src: None,
                site: None,
                node: None,
                reverts: None,
            })
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

/// The clock for a change written now (`wall_ms`) on top of the document's current heads.
pub fn next_hlc(doc: &Automerge, wall_ms: u64) -> u64 {
    let parents = doc
        .get_heads()
        .iter()
        .filter_map(|head| ChangeStamp::of_hash(doc, head))
        .map(|stamp| stamp.hlc)
        .max();
    match parents {
        Some(parent) => wall_ms.max(parent.saturating_add(1)),
        None => wall_ms,
    }
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
            src: Some("erp".into()),
            site: Some("paris".into()),
            node: None,
            reverts: None,
        };
        assert_eq!(ChangeStamp::of_change(Some(&stamp.to_message()), 0), stamp);
        let foreign = ChangeStamp::of_change(Some("fixed a typo"), 1_764_000_000);
        assert_eq!(foreign.hlc, 1_764_000_000_000);
        assert_eq!(foreign.src, None);
        assert_eq!(ChangeStamp::of_change(None, -5).hlc, 0);
    }
}
