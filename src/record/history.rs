//! A record's history in one pass: every change, in causal order, with what it did.
//!
//! Describing a change means comparing the record just before it (at its dependencies) with
//! the record just after it. Asked of the whole document, each comparison costs a walk of the
//! document's history, so listing *n* changes cost O(n²) and 100,000 changes took minutes.
//! [`Replay`] instead applies the changes one by one to a document of its own, so "before" is
//! simply the replayed document and "after" the same once the change is applied, and Automerge
//! reports what the change touched as it applies it. Each change costs what applying it costs.
//!
//! That holds for every change whose dependencies are exactly what was replayed before it:
//! every change of a history written in one line, and the first change after concurrent ones
//! meet. A change made concurrently with one replayed before it is described against the
//! whole document at its own dependencies instead, as before: exact, and slower, for the few
//! changes that raced.
//!
//! A replay works on a copy of the document taken when it starts, so it holds nothing that
//! other reads or writes of the store wait on.

use automerge::{Automerge, Change, ChangeHash, PatchLog};

use super::document::{self, ChangeEffect, RecordState, RESERVED_FIELD_PREFIX};

/// Changes of one record, described in causal order.
pub struct Replay {
    /// The whole document, as it was when the replay started.
    whole: Automerge,
    /// Every change of `whole`, in causal order.
    changes: Vec<Change>,
    /// The next change to describe.
    next: usize,
    /// `changes[..next]` applied.
    replayed: Automerge,
}

/// `after` names no change of the record.
#[derive(Debug, thiserror::Error)]
#[error("the record has no change {0}")]
pub struct UnknownChange(pub ChangeHash);

impl Replay {
    /// A replay of `whole`'s changes, starting after the change `after` (from the first when
    /// `None`).
    pub fn new(whole: Automerge, after: Option<&ChangeHash>) -> Result<Self, UnknownChange> {
        let changes = whole.get_changes(&[]);
        let next = match after {
            None => 0,
            Some(after) => {
                changes
                    .iter()
                    .position(|change| change.hash() == *after)
                    .ok_or(UnknownChange(*after))?
                    + 1
            }
        };
        let mut replayed = Automerge::new();
        replayed
            .apply_changes(changes[..next].iter().cloned())
            .expect("the changes of a loaded document apply to an empty one, in causal order");
        Ok(Self {
            whole,
            changes,
            next,
            replayed,
        })
    }

    /// Changes in the record.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether the record has no change at all.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Describes the next change as [`document::describe_change`] does.
    fn describe(&mut self, change: &Change) -> ChangeEffect {
        let mut deps = change.deps().to_vec();
        deps.sort_unstable();
        if deps != self.replayed.get_heads() {
            // Concurrent with a change replayed before it: described against the whole
            // document at its own dependencies.
            let effect = document::describe_change(&self.whole, change.deps(), change.hash());
            self.replayed
                .apply_changes([change.clone()])
                .expect("a change of a loaded document applies once its dependencies have");
            return effect;
        }
        let before = document::state(&self.replayed);
        let mut log = PatchLog::active();
        self.replayed
            .apply_changes_log_patches([change.clone()], &mut log)
            .expect("a change of a loaded document applies once its dependencies have");
        let after = document::state(&self.replayed);
        let patches = self.replayed.make_patches(&mut log);
        document::effect_of(&self.replayed, before, after, &patches, None)
    }
}

impl Iterator for Replay {
    type Item = (Change, ChangeEffect);

    fn next(&mut self) -> Option<Self::Item> {
        let change = self.changes.get(self.next)?.clone();
        self.next += 1;
        let effect = self.describe(&change);
        Some((change, effect))
    }
}

/// The action of a change that took a record from `before` to `after`.
pub fn action(before: RecordState, after: RecordState) -> &'static str {
    match (before, after) {
        (RecordState::Live, RecordState::Deleted) => "delete",
        (RecordState::Missing, RecordState::Live) => "create",
        (RecordState::Deleted, RecordState::Live) => "recreate",
        _ => "update",
    }
}

/// Whether a root key is one of the record's own fields (not Concord's `@` keys).
pub fn is_field(key: &str) -> bool {
    !key.starts_with(RESERVED_FIELD_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::{apply_delete, apply_write, RecordWrite};
    use automerge::ActorId;
    use serde_json::json;

    fn write(doc: &mut Automerge, fields: serde_json::Value, replace: bool) {
        let write = RecordWrite {
            set: fields.as_object().unwrap().clone().into_iter().collect(),
            replace,
            ..Default::default()
        };
        let mut tx = doc.transaction();
        apply_write(&mut tx, &write).unwrap();
        tx.commit();
    }

    fn delete(doc: &mut Automerge) {
        let mut tx = doc.transaction();
        assert!(apply_delete(&mut tx).unwrap());
        tx.commit();
    }

    /// What the replay says of every change equals what the whole document says of it.
    fn assert_replay_matches(doc: &Automerge) {
        let expected: Vec<ChangeEffect> = doc
            .get_changes(&[])
            .iter()
            .map(|change| document::describe_change(doc, change.deps(), change.hash()))
            .collect();
        let replayed: Vec<ChangeEffect> = Replay::new(doc.clone(), None)
            .unwrap()
            .map(|(_, effect)| effect)
            .collect();
        assert_eq!(replayed, expected);
        // Started part way, it describes the rest alike.
        let changes = doc.get_changes(&[]);
        for start in 0..changes.len() {
            let rest: Vec<ChangeEffect> = Replay::new(doc.clone(), Some(&changes[start].hash()))
                .unwrap()
                .map(|(_, effect)| effect)
                .collect();
            assert_eq!(rest, expected[start + 1..]);
        }
    }

    #[test]
    fn a_line_of_changes_replays_as_the_whole_document_describes_it() {
        let mut doc = Automerge::new();
        write(
            &mut doc,
            json!({"name": "Ada", "address": {"city": "London"}}),
            false,
        );
        write(&mut doc, json!({"credit": 5, "tags": ["a", "b"]}), false);
        write(&mut doc, json!({"name": "Ada L"}), true);
        delete(&mut doc);
        write(&mut doc, json!({"name": "again"}), false);
        write(&mut doc, json!({"address": {"city": "Paris"}}), false);
        assert_replay_matches(&doc);
        let actions: Vec<&str> = Replay::new(doc.clone(), None)
            .unwrap()
            .map(|(_, effect)| effect.action)
            .collect();
        assert_eq!(
            actions,
            ["create", "update", "update", "delete", "recreate", "update"]
        );
    }

    #[test]
    fn concurrent_changes_replay_as_the_whole_document_describes_them() {
        let mut a = Automerge::new();
        a.set_actor(ActorId::from([1u8; 16]));
        write(&mut a, json!({"name": "Ada", "credit": 1}), false);
        let mut b = a.fork();
        b.set_actor(ActorId::from([2u8; 16]));
        write(&mut a, json!({"credit": 2}), false);
        write(&mut b, json!({"name": "Bea"}), false);
        delete(&mut b);
        write(&mut a, json!({"credit": 3}), false);
        a.merge(&mut b).unwrap();
        write(&mut a, json!({"name": "merged"}), false);
        assert_replay_matches(&a);
    }

    #[test]
    fn an_unknown_start_is_an_error() {
        let mut doc = Automerge::new();
        write(&mut doc, json!({"name": "Ada"}), false);
        assert!(Replay::new(doc, Some(&ChangeHash([7; 32]))).is_err());
    }
}
