//! Changes held because their dependencies have not arrived.
//!
//! A held change is neither applied nor logged, so the log mark its sender sees does not move
//! past it and the sender sends it again; holding it only spares that round trip while its
//! document is fetched. So everything here may be given up at any time, and is: past a count
//! and a byte bound, after a while, and when its sender goes away.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::record::NodeId;
use crate::store::LoggedChange;

/// Changes held waiting for their dependencies, over all documents.
pub const HELD_CHANGES_MAX: usize = 10_000;
/// Bytes of held changes, over all documents (a change may be megabytes).
pub const HELD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long a change is held before it is given up (its sender sends it again).
pub const HELD_CHANGE_TTL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(super) struct HeldChange {
    pub(super) from: NodeId,
    pub(super) change: LoggedChange,
    since: Duration,
}

#[derive(Debug, Default)]
pub(super) struct Held {
    by_document: BTreeMap<Vec<u8>, Vec<HeldChange>>,
    count: usize,
    bytes: usize,
}

fn size_of(change: &LoggedChange) -> usize {
    change.change.len() + change.doc_key.len()
}

impl Held {
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Holds `change` from `from`; false when there is no room for it.
    pub(super) fn hold(&mut self, from: NodeId, change: LoggedChange, now: Duration) -> bool {
        let size = size_of(&change);
        if self.count >= HELD_CHANGES_MAX || self.bytes + size > HELD_BYTES_MAX {
            return false;
        }
        self.count += 1;
        self.bytes += size;
        self.by_document
            .entry(change.doc_key.clone())
            .or_default()
            .push(HeldChange {
                from,
                change,
                since: now,
            });
        true
    }

    /// Whether anything is held for a document.
    pub(super) fn holds_for(&self, doc_key: &[u8]) -> bool {
        self.by_document.contains_key(doc_key)
    }

    /// Everything held for a document.
    pub(super) fn take(&mut self, doc_key: &[u8]) -> Vec<HeldChange> {
        let taken = self.by_document.remove(doc_key).unwrap_or_default();
        self.forget(&taken);
        taken
    }

    /// Gives up changes held longer than [`HELD_CHANGE_TTL`]; returns how many.
    pub(super) fn expire(&mut self, now: Duration) -> usize {
        self.give_up(|held| now.saturating_sub(held.since) >= HELD_CHANGE_TTL)
    }

    /// Gives up changes that `peer` sent (it went away); returns how many.
    pub(super) fn drop_from(&mut self, peer: &NodeId) -> usize {
        self.give_up(|held| held.from == *peer)
    }

    fn give_up(&mut self, doomed: impl Fn(&HeldChange) -> bool) -> usize {
        let mut given_up = Vec::new();
        self.by_document.retain(|_, changes| {
            let (gone, kept): (Vec<HeldChange>, Vec<HeldChange>) =
                std::mem::take(changes).into_iter().partition(&doomed);
            given_up.extend(gone);
            *changes = kept;
            !changes.is_empty()
        });
        self.forget(&given_up);
        given_up.len()
    }

    fn forget(&mut self, changes: &[HeldChange]) {
        for held in changes {
            self.count -= 1;
            self.bytes -= size_of(&held.change);
        }
        assert!(
            self.count == self.by_document.values().map(Vec::len).sum::<usize>(),
            "the held count is the number of changes held"
        );
    }
}
