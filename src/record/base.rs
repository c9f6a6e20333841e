//! The base of a compacted history: the fewest changes that hold exactly what is visible at
//! a cut, under the operations' own ids (see [`super::compaction`] for how it is used).
//!
//! Guarantees: the base is a function of the changes up to the cut alone (their operations,
//! and the stamp of the change each operation came from), so every node compacting at the
//! same cut writes the same bytes; it starts with the *sink* (an operation written and
//! deleted, for deletions of what is gone at the cut) and ends with an empty change that
//! carries the cut's latest clock and ends where its last operation did.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::num::NonZeroU64;

use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjType, ReadDoc, ScalarValue,
};

use super::compaction::CompactionError;
use super::stamp::ChangeStamp;

/// The actor of the base's first change, which holds the *sink*: an operation already
/// deleted, that a change concurrent with the cut deletes instead of what is gone at the cut
/// (Automerge keeps a deletion only as a mark on what it deletes).
const SINK_ACTOR: [u8; 16] = *b"concord:compact!";
/// The (reserved) field the sink is written under, and deleted.
const SINK_FIELD: &str = "@compacted";

fn sink_actor() -> ActorId {
    ActorId::from(SINK_ACTOR.as_slice())
}

/// An operation with no effect: a deletion of the sink.
pub(super) fn sink_op() -> Op {
    Op {
        action: OpType::Delete,
        obj: ObjectId::Root,
        key: Key::Map(SINK_FIELD.into()),
        pred: SortedVec::from(vec![OpId(1, sink_actor())]),
        insert: false,
    }
}

/// The base's first change: the sink, written and deleted.
fn sink_change() -> Change {
    let put = Op {
        action: OpType::Put(ScalarValue::Null),
        obj: ObjectId::Root,
        key: Key::Map(SINK_FIELD.into()),
        pred: SortedVec::from(Vec::new()),
        insert: false,
    };
    Change::from(ExpandedChange {
        operations: vec![put, sink_op()],
        actor_id: sink_actor(),
        hash: None,
        seq: 1,
        start_op: NonZeroU64::MIN,
        time: 0,
        message: None,
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    })
}

/// The stamp the base's last change carries: the latest clock among the cut's heads, and
/// nothing else (no author: the base's operations have many), so that a change written on
/// the compacted document stamps after everything in the cut, as it would have.
pub(super) fn clock_of(at: &Automerge, cut: &[ChangeHash]) -> Option<(String, i64)> {
    cut.iter()
        .filter_map(|hash| at.get_change_by_hash(hash))
        .map(|change| {
            let stamp = ChangeStamp::of_change(change.message(), change.timestamp());
            (stamp.clock(), change.timestamp(), change.hash())
        })
        .max()
        .map(|(clock, time, _)| {
            let stamp = ChangeStamp {
                hlc: clock.ms,
                lc: clock.counter,
                ..ChangeStamp::default()
            };
            (stamp.to_message(), time)
        })
}

/// Every operation of a history, by id, with what later operations did to it.
#[derive(Default)]
struct Replay {
    ops: BTreeMap<OpId, Op>,
    /// Operations some later one (not an increment) replaced or deleted.
    hidden: HashSet<OpId>,
    /// The increments made to each counter.
    increments: HashMap<OpId, i64>,
    /// The operations inside each object, by id.
    inside: HashMap<ObjectId, Vec<OpId>>,
    /// The index (in the history replayed) of the change each operation came from.
    source: HashMap<OpId, usize>,
}

impl Replay {
    fn of(changes: &[Change]) -> Result<Self, CompactionError> {
        let mut replay = Self::default();
        for (position, change) in changes.iter().enumerate() {
            let expanded = change.decode();
            let start = expanded.start_op.get();
            for (index, op) in expanded.operations.into_iter().enumerate() {
                let id = OpId(start + index as u64, expanded.actor_id.clone());
                replay.source.insert(id.clone(), position);
                replay.add(id, op)?;
            }
        }
        Ok(replay)
    }

    fn add(&mut self, id: OpId, op: Op) -> Result<(), CompactionError> {
        match &op.action {
            OpType::MarkBegin(_) | OpType::MarkEnd(_) => {
                return Err(CompactionError::Unsupported("rich-text marks"))
            }
            OpType::Increment(by) => {
                for pred in op.pred.iter() {
                    *self.increments.entry(pred.clone()).or_default() += by;
                }
            }
            _ => self.hidden.extend(op.pred.iter().cloned()),
        }
        self.inside
            .entry(op.obj.clone())
            .or_default()
            .push(id.clone());
        self.ops.insert(id, op);
        Ok(())
    }

    /// Whether the operation holds a value that nothing replaced.
    fn visible(&self, id: &OpId) -> bool {
        !self.hidden.contains(id)
            && self
                .ops
                .get(id)
                .is_some_and(|op| matches!(op.action, OpType::Put(_) | OpType::Make(_)))
    }

    /// A visible operation as the base holds it: no predecessors, a counter's increments
    /// summed into it.
    fn kept_value(&self, id: &OpId, op: &Op, pred: Vec<OpId>) -> Op {
        let action = match &op.action {
            OpType::Put(ScalarValue::Counter(counter)) => {
                let start = i64::from(counter);
                let total = start + self.increments.get(id).copied().unwrap_or(0);
                OpType::Put(ScalarValue::counter(total))
            }
            other => other.clone(),
        };
        Op {
            action,
            obj: op.obj.clone(),
            key: op.key.clone(),
            pred: SortedVec::from(pred),
            insert: op.insert,
        }
    }

    /// The operations the base keeps: what is visible from the root, and the gone list
    /// elements that anchor visible ones.
    fn kept(&self) -> BTreeMap<OpId, Op> {
        let mut kept = BTreeMap::new();
        let mut objects = vec![(ObjectId::Root, ObjType::Map)];
        while let Some((obj, kind)) = objects.pop() {
            let ids = self.inside.get(&obj).map(Vec::as_slice).unwrap_or_default();
            let found = match kind {
                ObjType::Map | ObjType::Table => self.kept_in_map(ids),
                ObjType::List | ObjType::Text => self.kept_in_sequence(ids),
            };
            for (id, op) in found {
                if let OpType::Make(kind) = op.action {
                    if self.visible(&id) {
                        objects.push((ObjectId::Id(id.clone()), kind));
                    }
                }
                kept.insert(id, op);
            }
        }
        kept
    }

    fn kept_in_map(&self, ids: &[OpId]) -> Vec<(OpId, Op)> {
        ids.iter()
            .filter(|id| self.visible(id))
            .filter_map(|id| Some((id.clone(), self.kept_value(id, self.ops.get(id)?, vec![]))))
            .collect()
    }

    fn kept_in_sequence(&self, ids: &[OpId]) -> Vec<(OpId, Op)> {
        let mut elements: BTreeMap<OpId, Vec<OpId>> = BTreeMap::new();
        for id in ids {
            let Some(op) = self.ops.get(id) else { continue };
            if op.insert {
                elements.entry(id.clone()).or_default();
            } else if let Key::Seq(ElementId::Id(element)) = &op.key {
                elements
                    .entry(element.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
        // Every element of a visible sequence, gone or not: a change concurrent with the cut
        // may insert after any of them.
        let needed: BTreeSet<OpId> = elements.keys().cloned().collect();
        let mut kept = Vec::new();
        for element in needed {
            let (Some(insert), Some(ops)) = (self.ops.get(&element), elements.get(&element)) else {
                continue;
            };
            kept.push((element.clone(), self.kept_value(&element, insert, vec![])));
            let shown = self.visible(&element);
            let values: Vec<&OpId> = ops.iter().filter(|id| self.visible(id)).collect();
            for id in &values {
                let Some(op) = self.ops.get(*id) else {
                    continue;
                };
                let pred = if shown { vec![] } else { vec![element.clone()] };
                kept.push(((*id).clone(), self.kept_value(id, op, pred)));
            }
            if !shown && values.is_empty() {
                // Gone, but an anchor: one deletion, under the id of the last value or
                // deletion that touched it (which nothing else kept uses; not an increment,
                // which a change concurrent with a compacted history may not keep).
                let last = ops
                    .iter()
                    .filter(|id| {
                        self.ops
                            .get(*id)
                            .is_some_and(|op| !matches!(op.action, OpType::Increment(_)))
                    })
                    .max();
                if let (Some(last), Some(insert)) = (last, self.ops.get(&element)) {
                    kept.push((
                        last.clone(),
                        Op {
                            action: OpType::Delete,
                            obj: insert.obj.clone(),
                            key: Key::Seq(ElementId::Id(element.clone())),
                            pred: SortedVec::from(vec![element.clone()]),
                            insert: false,
                        },
                    ));
                }
            }
        }
        kept
    }
}

/// A change's message and time.
type Stamp = (Option<String>, i64);

/// The base: the operations kept, sorted by id, in the fewest changes whose ids run on and
/// whose operations came from changes with one stamp (time and message), each depending on
/// the one before and carrying that stamp; then an empty change that ends where the
/// cut's last operation did (so that no operation written later reuses an id) and carries
/// `clock` (message, time).
pub(super) fn base_changes(
    inside: &[Change],
    clock: Option<(String, i64)>,
) -> Result<Vec<Change>, CompactionError> {
    let replay = Replay::of(inside)?;
    // The stamp (message, time) of the change an operation came from: the same for an
    // operation wherever its history was compacted before.
    let stamp_of = |id: &OpId| {
        replay
            .source
            .get(id)
            .and_then(|from| inside.get(*from))
            .map(|change| (change.message().map(str::to_owned), change.timestamp()))
    };
    let mut runs: Vec<(OpId, Option<Stamp>, Vec<Op>)> = Vec::new();
    for (id, op) in replay.kept() {
        let stamp = stamp_of(&id);
        match runs.last_mut() {
            Some((start, run_stamp, ops))
                if start.1 == id.1 && start.0 + ops.len() as u64 == id.0 && *run_stamp == stamp =>
            {
                ops.push(op)
            }
            _ => runs.push((id, stamp, vec![op])),
        }
    }
    // The change that ends last, the greater actor first among equals.
    let top = inside
        .iter()
        .map(|change| (change.max_op(), change.actor_id()))
        .max();
    if let Some((max_op, actor)) = top {
        runs.push((OpId(max_op + 1, actor.clone()), None, Vec::new()));
    }
    let mut seqs: HashMap<ActorId, u64> = HashMap::new();
    let mut changes: Vec<Change> = Vec::with_capacity(runs.len() + 1);
    changes.push(sink_change());
    seqs.insert(sink_actor(), 1);
    let last = runs.len().saturating_sub(1);
    for (index, (start, stamp, operations)) in runs.into_iter().enumerate() {
        let seq = seqs.entry(start.1.clone()).or_default();
        *seq += 1;
        let start_op = NonZeroU64::new(start.0).ok_or(CompactionError::Diverged)?;
        let (message, time) = match (stamp, &clock) {
            (Some(stamp), _) => stamp,
            (None, Some((message, time))) if index == last => (Some(message.clone()), *time),
            (None, _) => (None, 0),
        };
        let change = Change::from(ExpandedChange {
            operations,
            actor_id: start.1,
            hash: None,
            seq: *seq,
            start_op,
            time,
            message,
            deps: changes.last().map(Change::hash).into_iter().collect(),
            extra_bytes: Vec::new(),
            author: None,
        });
        changes.push(change);
    }
    Ok(changes)
}
