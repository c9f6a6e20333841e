//! A record's history in one pass: every change, in causal order, with what it did.
//!
//! Describing a change means comparing the record just before it (at its dependencies) with
//! the record just after it. Asked of the whole document, each comparison walks the document's
//! history, so listing *n* changes cost O(n²): 100,000 changes took minutes, holding the
//! store's lock all along. Applying the changes one by one to an Automerge document is no
//! better (each application re-encodes the document). [`Replay`] instead rebuilds the record
//! from the changes' own operations ([`state::State`]), so each change costs what it holds.
//!
//! That describes exactly every change whose dependencies are all that was replayed before
//! it: each change of a history written in a line, and the first change after concurrent ones
//! meet. A change made concurrently with one replayed before it (or one holding a counter or
//! a mark, which the state does not follow) is described against the whole document at its
//! own dependencies instead, as before: exact, and slower, for the few changes that raced.
//!
//! A replay works on a copy of the document taken when it starts, so it holds nothing that
//! other reads or writes of the store wait on.

mod state;

use std::collections::BTreeSet;

use automerge::{Automerge, Change, ChangeHash};

use super::document::{self, ChangeEffect, RecordState, RESERVED_FIELD_PREFIX};
use state::State;

/// Changes of one record, described in causal order.
pub struct Replay {
    /// The whole document, as it was when the replay started.
    whole: Automerge,
    /// Every change of `whole`, in causal order.
    changes: Vec<Change>,
    /// The next change to describe.
    next: usize,
    /// The record after `changes[..next]`.
    state: State,
    /// The heads after `changes[..next]`.
    heads: BTreeSet<ChangeHash>,
    /// Changes described against the whole document (they raced, or hold what the state
    /// does not follow).
    described_whole: usize,
}

/// `after` names no change of the record.
#[derive(Debug, thiserror::Error)]
#[error("the record has no change {0}")]
pub struct UnknownChange(pub ChangeHash);

impl Replay {
    /// A replay of `whole`'s changes, starting after the change `after` (from the first when
    /// `None`), and, with a `limit`, ending that many changes later. Only the changes up to
    /// the end are taken out of the document when they are fewer than half of it, since
    /// taking a change out of Automerge costs as much as the change: the first page of a long
    /// history costs what the page holds, not the whole history.
    pub fn new(
        whole: Automerge,
        after: Option<&ChangeHash>,
        limit: Option<usize>,
    ) -> Result<Self, UnknownChange> {
        let order: Vec<(ChangeHash, Vec<ChangeHash>)> = whole
            .get_changes_meta(&[])
            .into_iter()
            .map(|meta| (meta.hash, meta.deps))
            .collect();
        let next = match after {
            None => 0,
            Some(after) => {
                order
                    .iter()
                    .position(|(hash, _)| hash == after)
                    .ok_or(UnknownChange(*after))?
                    + 1
            }
        };
        let end = limit.map_or(order.len(), |limit| {
            next.saturating_add(limit).min(order.len())
        });
        let changes = changes_in_order(&whole, &order[..end], order.len());
        let mut replay = Self {
            whole,
            changes: Vec::new(),
            next: 0,
            state: State::default(),
            heads: BTreeSet::new(),
            described_whole: 0,
        };
        for change in &changes[..next] {
            replay.step(change);
        }
        replay.changes = changes;
        replay.next = next;
        Ok(replay)
    }

    /// Changes in the record.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether the record has no change at all.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Changes described so far against the whole document, each costing a walk of its
    /// history: those that raced with one replayed before them, and all from the first that
    /// holds a counter or a mark.
    pub fn described_whole(&self) -> usize {
        self.described_whole
    }

    /// Applies `change` to the state and the heads; the fields it touched.
    fn step(&mut self, change: &Change) -> BTreeSet<String> {
        for dep in change.deps() {
            self.heads.remove(dep);
        }
        self.heads.insert(change.hash());
        self.state.apply(&change.decode())
    }

    /// Describes `change` as [`document::describe_change`] does.
    fn describe(&mut self, change: &Change) -> ChangeEffect {
        let in_line = self.state.is_followed()
            && change.deps().len() == self.heads.len()
            && change.deps().iter().all(|dep| self.heads.contains(dep));
        if !in_line {
            self.step(change);
            self.described_whole += 1;
            return document::describe_change(&self.whole, change.deps(), change.hash());
        }
        let before = self.state.record_state();
        let fields: Vec<String> = self
            .step(change)
            .into_iter()
            .filter(|field| is_field(field))
            .collect();
        if !self.state.is_followed() {
            self.described_whole += 1;
            return document::describe_change(&self.whole, change.deps(), change.hash());
        }
        let after = self.state.record_state();
        let action = action(before, after);
        let mut set = serde_json::Map::new();
        let mut removed = Vec::new();
        for field in fields {
            match self.state.field(&field) {
                Some(value) => {
                    set.insert(field, value);
                }
                None => removed.push(field),
            }
        }
        ChangeEffect {
            reverts: None,
            action,
            set,
            removed: if action == "delete" {
                Vec::new()
            } else {
                removed
            },
        }
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

/// The changes of `whole` that `order` names (hashes with their dependencies: a prefix of
/// the causal order the document gives, of its `total` changes), in that order. A prefix
/// under half the document is taken from a copy of the document at the prefix's heads (a
/// prefix of a causal order holds every dependency of its changes).
fn changes_in_order(
    whole: &Automerge,
    order: &[(ChangeHash, Vec<ChangeHash>)],
    total: usize,
) -> Vec<Change> {
    let mut changes = None;
    if order.len() < total / 2 {
        let deps: std::collections::HashSet<&ChangeHash> =
            order.iter().flat_map(|(_, deps)| deps).collect();
        let heads: Vec<ChangeHash> = order
            .iter()
            .map(|(hash, _)| *hash)
            .filter(|hash| !deps.contains(hash))
            .collect();
        changes = whole.fork_at(&heads).ok().map(|fork| fork.get_changes(&[]));
    }
    let mut changes = changes.unwrap_or_else(|| whole.get_changes(&[]));
    let position: std::collections::HashMap<ChangeHash, usize> = order
        .iter()
        .enumerate()
        .map(|(index, (hash, _))| (*hash, index))
        .collect();
    changes.retain(|change| position.contains_key(&change.hash()));
    changes.sort_by_key(|change| position[&change.hash()]);
    changes
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
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ReadDoc};
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

    /// What the replay says of every change equals what the whole document says of it; how
    /// many it described against the whole document.
    fn assert_replay_matches(doc: &Automerge) -> usize {
        let expected: Vec<ChangeEffect> = doc
            .get_changes(&[])
            .iter()
            .map(|change| document::describe_change(doc, change.deps(), change.hash()))
            .collect();
        let mut replay = Replay::new(doc.clone(), None, None).unwrap();
        let replayed: Vec<ChangeEffect> = replay.by_ref().map(|(_, effect)| effect).collect();
        assert_eq!(replayed, expected);
        // Started part way, it describes the rest alike.
        let changes = doc.get_changes(&[]);
        for start in 0..changes.len() {
            let rest: Vec<ChangeEffect> =
                Replay::new(doc.clone(), Some(&changes[start].hash()), None)
                    .unwrap()
                    .map(|(_, effect)| effect)
                    .collect();
            assert_eq!(rest, expected[start + 1..]);
        }
        // A page (a limit) holds the same changes as the replay of the whole, page after page.
        for limit in [1, 2, 3] {
            let mut after = None;
            let mut paged = Vec::new();
            loop {
                let page: Vec<(Change, ChangeEffect)> =
                    Replay::new(doc.clone(), after.as_ref(), Some(limit))
                        .unwrap()
                        .collect();
                assert!(page.len() <= limit);
                let Some((last, _)) = page.last() else {
                    break;
                };
                after = Some(last.hash());
                paged.extend(page.into_iter().map(|(_, effect)| effect));
            }
            assert_eq!(paged, expected, "pages of {limit}");
        }
        replay.described_whole()
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
        assert_eq!(assert_replay_matches(&doc), 0);
        let actions: Vec<&str> = Replay::new(doc.clone(), None, None)
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
        // Only the changes made beside others need the whole document.
        let whole = assert_replay_matches(&a);
        assert!(whole >= 1 && whole < a.get_changes(&[]).len(), "{whole}");
    }

    #[test]
    fn nested_edits_lists_and_text_replay_as_the_whole_document_describes_them() {
        let mut doc = Automerge::new();
        write(
            &mut doc,
            json!({"address": {"city": "London", "zip": "N1"}, "tags": ["a"]}),
            false,
        );
        // A merge patch edits the nested object key by key, in place.
        let patch = RecordWrite::merge_patch(
            json!({"address": {"city": "Paris", "zip": null}})
                .as_object()
                .unwrap()
                .clone(),
        );
        let mut tx = doc.transaction();
        apply_write(&mut tx, &patch).unwrap();
        tx.commit();
        // Lists and text edited in place, as an Automerge program may.
        let tags = doc.get(automerge::ROOT, "tags").unwrap().unwrap().1;
        let mut tx = doc.transaction();
        tx.insert(&tags, 0, "first").unwrap();
        tx.insert(&tags, 2, "last").unwrap();
        let note = tx
            .put_object(automerge::ROOT, "note", automerge::ObjType::Text)
            .unwrap();
        tx.splice_text(&note, 0, 0, "hello").unwrap();
        tx.commit();
        let mut tx = doc.transaction();
        tx.delete(&tags, 1).unwrap();
        tx.splice_text(&note, 5, 0, " world").unwrap();
        tx.put(&tags, 0, "replaced").unwrap();
        tx.commit();
        assert_eq!(assert_replay_matches(&doc), 0);
    }

    /// One random edit: 0-3 a root field, 4 a nested key, 5-6 a list, 7 a delete.
    fn edit(doc: &mut Automerge, kind: u8, n: u8) {
        let mut tx = doc.transaction();
        let field = format!("f{}", n % 3);
        match kind {
            0..=2 => {
                tx.put(automerge::ROOT, &field, i64::from(n)).unwrap();
            }
            3 => {
                let map = tx
                    .put_object(automerge::ROOT, "m", automerge::ObjType::Map)
                    .unwrap();
                tx.put(&map, "k", i64::from(n)).unwrap();
                let list = tx
                    .put_object(automerge::ROOT, "l", automerge::ObjType::List)
                    .unwrap();
                tx.insert(&list, 0, i64::from(n)).unwrap();
            }
            4 => {
                if let Ok(Some((_, map))) = tx.get(automerge::ROOT, "m") {
                    tx.put(&map, format!("k{}", n % 2), i64::from(n)).unwrap();
                }
            }
            5 | 6 => {
                if let Ok(Some((_, list))) = tx.get(automerge::ROOT, "l") {
                    let length = tx.length(&list);
                    if kind == 5 || length == 0 {
                        tx.insert(&list, usize::from(n) % (length + 1), i64::from(n))
                            .unwrap();
                    } else {
                        tx.delete(&list, usize::from(n) % length).unwrap();
                    }
                }
            }
            _ => {
                assert!(apply_delete(&mut tx).is_ok());
                if n.is_multiple_of(2) {
                    let _ = tx.delete(automerge::ROOT, &field);
                }
            }
        }
        tx.commit();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Random edits by two writers that fork and merge now and then: the replay says of
        /// every change what the whole document says of it.
        #[test]
        fn random_histories_replay_as_the_whole_document_describes_them(
            steps in proptest::collection::vec((0u8..3, 0u8..8, 0u8..255), 1..40)
        ) {
            let mut a = Automerge::new();
            a.set_actor(ActorId::from([1u8; 16]));
            let mut b = Automerge::new();
            b.set_actor(ActorId::from([2u8; 16]));
            for (who, kind, n) in steps {
                match who {
                    0 => edit(&mut a, kind, n),
                    1 => edit(&mut b, kind, n),
                    _ => {
                        a.merge(&mut b).unwrap();
                        b.merge(&mut a).unwrap();
                    }
                }
            }
            a.merge(&mut b).unwrap();
            let whole = assert_replay_matches(&a);
            let changes = a.get_changes(&[]).len();
            proptest::prop_assert!(whole < changes.max(1) || changes <= 2, "{whole} of {changes}");
        }
    }

    #[test]
    fn an_unknown_start_is_an_error() {
        let mut doc = Automerge::new();
        write(&mut doc, json!({"name": "Ada"}), false);
        assert!(Replay::new(doc, Some(&ChangeHash([7; 32])), None).is_err());
    }
}
