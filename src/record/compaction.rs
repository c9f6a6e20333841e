//! Compaction of a record's history: the changes up to a *cut* replaced by the fewest changes
//! that hold exactly what is visible at the cut, under the same operation ids.
//!
//! Automerge keeps every operation a document ever held. A record updated 100,000 times
//! carries 100,000 operations, though one is visible. Compaction keeps the visible ones:
//!
//! - every operation visible at the cut (each value of a field in conflict, each object,
//!   each element of a list or text with its values, a counter with its increments summed)
//!   is kept under its own id, with no predecessors; every element of a visible list or text
//!   that is gone is kept with one deletion, so every element keeps its place and a change
//!   concurrent with the cut can still insert after any of them;
//! - these operations, sorted by id, are cut into the fewest changes whose ids run on and
//!   whose operations came from changes with one time and message (one stamp) (the *base*),
//!   each depending on the one before and carrying that stamp, so that a conflict's candidates keep their stamps and a policy
//!   resolves them as before; an empty last change carries the latest clock of the cut. The
//!   base is a function of what is visible at the cut alone: every node compacting at the
//!   same cut produces the same bytes, however much history it held, and however often it
//!   compacted on the way;
//! - a change after the cut keeps its operations byte for byte; only its dependencies (cut
//!   heads become the base's last change) and its sequence number (an actor's changes in the
//!   cut become its changes in the base) are rewritten.
//!
//! The original history stays the one every node speaks: the wire, the log and every version
//! shown to a user name original changes. A compacted document is this node's *local* form;
//! [`Epoch`] translates both ways ([`Epoch::forward`] for a change received,
//! [`Epoch::native`] for one written here, [`Epoch::back`] to serve one again).
//!
//! Guarantees:
//! - a change after the cut, or concurrent with it (written by a node that held only part of
//!   the cut: one restored from an old backup, say), means on the compacted document what it
//!   meant on the history: what it replaced or deleted that is gone at the cut is gone from
//!   the base too, and everything visible at the cut is there under its own id. Its
//!   dependencies inside the cut are known once the change they name is seen again (known by
//!   its place, [`Epoch::holds_inside`]); until then it waits
//!   ([`CompactionError::MissingDependency`]), as Automerge holds back a change whose
//!   dependencies are missing. [`compact`] checks that the compacted document reads as the
//!   history did and names the same heads;
//! - what the compacted document reads (values, conflicts and their winners, list and text
//!   order, counters) is what the original read, and stays so as the same changes are added
//!   to both: [`compact`] checks the first, and the tests replay random histories for both;
//! - translation is exact: a change translated forward and back has its original hash again,
//!   or it is refused.
//!
//! Rich-text marks are not compacted ([`CompactionError::Unsupported`]): a mark anchors to
//! elements that may be gone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::base::{base_changes, clock_of, sink_op};
use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType, SortedVec};
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ReadDoc};

/// Why a history could not be compacted, or a change not translated.
#[derive(Debug, thiserror::Error)]
pub enum CompactionError {
    #[error("automerge: {0}")]
    Automerge(#[from] AutomergeError),
    #[error("the history holds {0}, which compaction does not handle")]
    Unsupported(&'static str),
    #[error("change {change} does not descend from the whole compacted history")]
    ConcurrentWithCut { change: ChangeHash },
    #[error("change {change} depends on {dependency}, which this document does not hold yet")]
    MissingDependency {
        change: ChangeHash,
        dependency: ChangeHash,
    },
    #[error("change {0} is not one this compacted document translated")]
    Untranslated(ChangeHash),
    #[error("the compacted document reads differently from the history it replaced")]
    Diverged,
    #[error("that version lies inside the compacted history")]
    InsideCut,
    #[error("a stored compaction epoch is unreadable: {0}")]
    Corrupt(String),
    #[error("compacted, the document would take {saved} bytes, over the {saved_max} one message carries")]
    TooLarge { saved: usize, saved_max: usize },
}

/// How an actor's sequence numbers shift in a compacted document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shift {
    /// The actor's changes in the cut (the original history).
    original: u64,
    /// The actor's changes in the base.
    base: u64,
    /// The original hash of the actor's last change in the cut: Automerge makes an actor's
    /// next change depend on it, head of the cut or not.
    last: Option<ChangeHash>,
}

impl Shift {
    fn to_local(self, seq: u64) -> u64 {
        seq - self.original + self.base
    }

    fn to_original(self, seq: u64) -> u64 {
        seq - self.base + self.original
    }
}

/// A change after the cut, as this document holds it.
#[derive(Debug, Clone)]
struct Kept {
    /// Its hash in the original history.
    original: ChangeHash,
    /// The cut heads among its original dependencies.
    cut_deps: Vec<ChangeHash>,
    /// It does not follow the whole cut: it may name operations that are gone there.
    concurrent: bool,
    /// Its original bytes, when its local form differs in more than dependencies and sequence
    /// number (it named operations that are gone at the cut).
    original_bytes: Option<Vec<u8>>,
}

/// What a compacted document stands for, and the translation between its local form and the
/// original history.
#[derive(Debug, Clone, Default)]
pub struct Epoch {
    /// Heads of the history the base replaced (original hashes), sorted.
    cut: Vec<ChangeHash>,
    /// The base's last change (none when nothing was visible at the cut).
    base: Option<ChangeHash>,
    /// Every change of the base.
    base_changes: HashSet<ChangeHash>,
    shifts: BTreeMap<ActorId, Shift>,
    /// Changes after the cut: local hash to original.
    kept: HashMap<ChangeHash, Kept>,
    /// Changes inside the cut (original hashes) that changes concurrent with it depend on:
    /// seen again since, and known by their place.
    known_inside: BTreeSet<ChangeHash>,
    /// The cut heads some change after the cut depends on: the others are heads still.
    covered: HashSet<ChangeHash>,
    /// Original hash to local, for the same changes.
    local: HashMap<ChangeHash, ChangeHash>,
}

/// An actor, its original changes in the cut, its changes in the base, its last in the cut.
type StoredShift = (Vec<u8>, u64, u64, Option<[u8; 32]>);
/// A local hash, the original hash, the cut heads among its original dependencies.
type StoredKeptFirst = ([u8; 32], [u8; 32], Vec<[u8; 32]>);
/// The same, whether it is concurrent with the cut, and its original bytes if it differs.
type StoredKept = ([u8; 32], [u8; 32], Vec<[u8; 32]>, bool, Option<Vec<u8>>);

/// An epoch as kept beside its document's snapshot.
#[derive(Serialize, Deserialize)]
struct StoredEpoch {
    cut: Vec<[u8; 32]>,
    base: Option<[u8; 32]>,
    base_changes: Vec<[u8; 32]>,
    shifts: Vec<StoredShift>,
    kept: Vec<StoredKept>,
    known_inside: Vec<[u8; 32]>,
}

/// An epoch as the first compacting version kept it (no changes known inside the cut).
#[derive(Serialize, Deserialize)]
struct StoredEpochFirst {
    cut: Vec<[u8; 32]>,
    base: Option<[u8; 32]>,
    base_changes: Vec<[u8; 32]>,
    shifts: Vec<StoredShift>,
    kept: Vec<StoredKeptFirst>,
}

/// What [`Epoch::forward`] made of a change received.
#[derive(Debug)]
pub enum Forwarded {
    /// The change lies inside the compacted history: there is nothing to apply.
    InsideCut,
    /// The change, as this document holds it.
    Local(Box<Change>),
}

impl Epoch {
    /// Heads of the compacted history, as original hashes.
    pub fn cut(&self) -> &[ChangeHash] {
        &self.cut
    }

    /// The base's last change (local), if anything was visible at the cut.
    pub fn base(&self) -> Option<ChangeHash> {
        self.base
    }

    /// Changes in the base.
    pub fn base_len(&self) -> usize {
        self.base_changes.len()
    }

    /// Changes after the cut this epoch translated.
    pub fn translated(&self) -> usize {
        self.kept.len()
    }

    /// Whether `change` (an original) lies inside the compacted history: an actor's changes
    /// in a history closed under dependencies are its first ones.
    pub fn holds_inside(&self, change: &Change) -> bool {
        self.holds_inside_at(change.actor_id(), change.seq())
    }

    /// Whether the `seq`th change of `actor` (in the original history) lies inside the
    /// compacted history.
    pub fn holds_inside_at(&self, actor: &ActorId, seq: u64) -> bool {
        self.shifts
            .get(actor)
            .is_some_and(|shift| seq <= shift.original)
    }

    /// Whether this epoch's compacted history holds all of `other`'s: a history closed under
    /// dependencies is each actor's first changes, so it is a matter of counting them.
    pub fn covers(&self, other: &Epoch) -> bool {
        other
            .shifts
            .iter()
            .all(|(actor, shift)| self.shift(actor).original >= shift.original)
    }

    /// Whether `dep`, a dependency of original `change`, lies in the compacted history: a cut
    /// head, the change's actor's last change in the cut, or one known to lie inside it.
    pub fn is_cut_dependency(&self, change: &Change, dep: &ChangeHash) -> bool {
        self.cut.contains(dep)
            || self.shift(change.actor_id()).last == Some(*dep)
            || self.known_inside.contains(dep)
    }

    /// The local form of an original change received, to apply to the compacted document.
    pub fn forward(&mut self, original: &Change) -> Result<Forwarded, CompactionError> {
        let hash = original.hash();
        if self.holds_inside(original) {
            // A change concurrent with the cut may name it.
            self.note_inside(original);
            return Ok(Forwarded::InsideCut);
        }
        let mut cut_deps = Vec::new();
        let mut deps = BTreeSet::new();
        // Whether it follows the whole cut, through a dependency that does.
        let mut follows = false;
        for dep in original.deps() {
            if self.is_cut_dependency(original, dep) {
                cut_deps.push(*dep);
            } else if let Some(local) = self.local.get(dep) {
                follows |= self.kept.get(local).is_some_and(|kept| !kept.concurrent);
                deps.insert(*local);
            } else {
                return Err(CompactionError::MissingDependency {
                    change: hash,
                    dependency: *dep,
                });
            }
        }
        // Whatever of the cut it names, it goes on the base: what it replaced that is gone at
        // the cut is not in the base either, and what is visible there is, under its own id.
        if !cut_deps.is_empty() {
            deps.extend(self.base);
        }
        let heads_named = cut_deps.iter().filter(|dep| self.cut.contains(dep)).count();
        let concurrent = !follows && heads_named != self.cut.len();
        let seq = self.shift(original.actor_id()).to_local(original.seq());
        let local = rewritten(original, seq, deps);
        let kept = Kept {
            original: hash,
            cut_deps,
            concurrent,
            original_bytes: None,
        };
        self.keep(local.hash(), kept);
        if self.back(&local)?.hash() != hash {
            self.forget(&local.hash());
            return Err(CompactionError::Unsupported(
                "a change that does not encode to its own hash again",
            ));
        }
        Ok(Forwarded::Local(Box::new(local)))
    }

    /// The original form of a change written here on the compacted document, to log and send.
    pub fn native(&mut self, local: &Change) -> Result<Change, CompactionError> {
        let own_last = self.shift(local.actor_id()).last;
        let mut follows = false;
        let mut cut_deps = BTreeSet::new();
        let mut deps = BTreeSet::new();
        for dep in local.deps() {
            if Some(*dep) == self.base {
                follows = true;
                cut_deps.extend(self.cut.iter().copied());
            } else if self.base_changes.contains(dep) {
                // The writer's own last change in the base stands for its last in the cut.
                cut_deps.extend(own_last);
            } else {
                let kept = self
                    .kept
                    .get(dep)
                    .ok_or(CompactionError::Untranslated(*dep))?;
                follows |= !kept.concurrent;
                deps.insert(kept.original);
            }
        }
        // Nothing visible at the cut: a change written on the base alone follows every head.
        if self.base.is_none() && local.deps().is_empty() {
            follows = true;
            cut_deps.extend(self.cut.iter().copied());
        }
        deps.extend(cut_deps.iter().copied());
        let cut_deps = cut_deps.into_iter().collect();
        let seq = self.shift(local.actor_id()).to_original(local.seq());
        let original = rewritten(local, seq, deps);
        let kept = Kept {
            original: original.hash(),
            cut_deps,
            concurrent: !follows,
            original_bytes: None,
        };
        self.keep(local.hash(), kept);
        Ok(original)
    }

    /// The original form of a change this document holds after the cut.
    pub fn back(&self, local: &Change) -> Result<Change, CompactionError> {
        let kept = self
            .kept
            .get(&local.hash())
            .ok_or(CompactionError::Untranslated(local.hash()))?;
        if let Some(bytes) = &kept.original_bytes {
            return Change::from_bytes(bytes.clone())
                .map_err(|error| CompactionError::Corrupt(error.to_string()));
        }
        let mut deps: BTreeSet<ChangeHash> = kept.cut_deps.iter().copied().collect();
        for dep in local.deps() {
            if !self.base_changes.contains(dep) {
                let original = self
                    .kept
                    .get(dep)
                    .ok_or(CompactionError::Untranslated(*dep))?;
                deps.insert(original.original);
            }
        }
        let seq = self.shift(local.actor_id()).to_original(local.seq());
        Ok(rewritten(local, seq, deps))
    }

    /// The original heads a compacted document's heads stand for.
    pub fn original_heads(&self, local: &[ChangeHash]) -> Result<Vec<ChangeHash>, CompactionError> {
        let mut heads = BTreeSet::new();
        // A cut head no change after the cut depends on is a head still, whatever else is.
        heads.extend(
            self.cut
                .iter()
                .filter(|head| !self.covered.contains(*head))
                .copied(),
        );
        for head in local {
            if Some(*head) == self.base {
                heads.extend(self.cut.iter().copied());
            } else {
                let kept = self
                    .kept
                    .get(head)
                    .ok_or(CompactionError::Untranslated(*head))?;
                heads.insert(kept.original);
            }
        }
        if local.is_empty() {
            heads.extend(self.cut.iter().copied());
        }
        Ok(heads.into_iter().collect())
    }

    /// The original heads of `doc`, a document in this epoch's local form (the whole
    /// compacted document, or a version of it that holds the base).
    fn heads_within(&self, doc: &Automerge) -> Result<Vec<ChangeHash>, CompactionError> {
        let mut heads = BTreeSet::new();
        let holds_base = self
            .base
            .is_none_or(|base| doc.get_change_by_hash(&base).is_some());
        if holds_base {
            let covered: HashSet<&ChangeHash> = doc
                .get_changes(&[])
                .iter()
                .filter_map(|change| self.kept.get(&change.hash()))
                .flat_map(|kept| kept.cut_deps.iter())
                .collect();
            heads.extend(self.cut.iter().filter(|head| !covered.contains(head)));
        }
        for head in doc.get_heads() {
            if Some(head) != self.base {
                let kept = self
                    .kept
                    .get(&head)
                    .ok_or(CompactionError::Untranslated(head))?;
                heads.insert(kept.original);
            }
        }
        Ok(heads.into_iter().collect())
    }

    /// The local heads of original `heads`, or `None` when they name a version inside the
    /// compacted history other than the cut (no longer readable).
    pub fn local_heads(&self, heads: &[ChangeHash]) -> Option<Vec<ChangeHash>> {
        let mut local = BTreeSet::new();
        let mut cut = 0;
        for head in heads {
            if self.cut.contains(head) {
                cut += 1;
            } else {
                local.insert(*self.local.get(head)?);
            }
        }
        if cut > 0 {
            if local.is_empty() && cut != self.cut.len() {
                return None;
            }
            local.extend(self.base);
        }
        Some(local.into_iter().collect())
    }

    /// The epoch encoded, to keep beside its document's snapshot.
    pub fn to_bytes(&self) -> Vec<u8> {
        let hashes = |hashes: &mut dyn Iterator<Item = ChangeHash>| {
            let mut bytes: Vec<[u8; 32]> = hashes.map(|hash| hash.0).collect();
            bytes.sort_unstable();
            bytes
        };
        let mut kept: Vec<StoredKept> = self
            .kept
            .iter()
            .map(|(local, kept)| {
                (
                    local.0,
                    kept.original.0,
                    hashes(&mut kept.cut_deps.iter().copied()),
                    kept.concurrent,
                    kept.original_bytes.clone(),
                )
            })
            .collect();
        kept.sort_unstable();
        let stored = StoredEpoch {
            cut: hashes(&mut self.cut.iter().copied()),
            base: self.base.map(|hash| hash.0),
            base_changes: hashes(&mut self.base_changes.iter().copied()),
            shifts: self
                .shifts
                .iter()
                .map(|(actor, shift)| {
                    let last = shift.last.map(|hash| hash.0);
                    (actor.to_bytes().to_vec(), shift.original, shift.base, last)
                })
                .collect(),
            kept,
            known_inside: hashes(&mut self.known_inside.iter().copied()),
        };
        postcard::to_allocvec(&stored).expect("an epoch always encodes")
    }

    /// An epoch encoded by [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CompactionError> {
        let stored: StoredEpoch = match postcard::from_bytes(bytes) {
            Ok(stored) => stored,
            Err(error) => match postcard::from_bytes::<StoredEpochFirst>(bytes) {
                Ok(first) => StoredEpoch {
                    cut: first.cut,
                    base: first.base,
                    base_changes: first.base_changes,
                    shifts: first.shifts,
                    kept: first
                        .kept
                        .into_iter()
                        .map(|(local, original, cut_deps)| (local, original, cut_deps, false, None))
                        .collect(),
                    known_inside: Vec::new(),
                },
                Err(_) => return Err(CompactionError::Corrupt(error.to_string())),
            },
        };
        let mut epoch = Epoch {
            cut: stored.cut.into_iter().map(ChangeHash).collect(),
            base: stored.base.map(ChangeHash),
            base_changes: stored.base_changes.into_iter().map(ChangeHash).collect(),
            shifts: stored
                .shifts
                .into_iter()
                .map(|(actor, original, base, last)| {
                    let last = last.map(ChangeHash);
                    (
                        ActorId::from(actor),
                        Shift {
                            original,
                            base,
                            last,
                        },
                    )
                })
                .collect(),
            known_inside: stored.known_inside.into_iter().map(ChangeHash).collect(),
            ..Epoch::default()
        };
        for (local, original, cut_deps, concurrent, original_bytes) in stored.kept {
            let kept = Kept {
                original: ChangeHash(original),
                cut_deps: cut_deps.into_iter().map(ChangeHash).collect(),
                concurrent,
                original_bytes,
            };
            epoch.keep(ChangeHash(local), kept);
        }
        Ok(epoch)
    }

    /// Whether local change `hash` is one of the base's.
    pub fn is_base(&self, hash: &ChangeHash) -> bool {
        self.base_changes.contains(hash)
    }

    /// Forgets a translated change taken out of the document.
    pub fn forget_original(&mut self, original: &ChangeHash) {
        if let Some(local) = self.local.get(original).copied() {
            self.forget(&local);
        }
    }

    fn shift(&self, actor: &ActorId) -> Shift {
        self.shifts.get(actor).copied().unwrap_or_default()
    }

    fn keep(&mut self, local: ChangeHash, kept: Kept) {
        self.covered.extend(
            kept.cut_deps
                .iter()
                .filter(|dep| self.cut.contains(dep))
                .copied(),
        );
        self.local.insert(kept.original, local);
        self.kept.insert(local, kept);
    }

    /// `local` (translated by [`Self::forward`]) without the predecessors that name
    /// operations `exists` does not hold: a change concurrent with the cut may replace what
    /// is gone at it, which the compacted document does not hold. Its original bytes are kept
    /// to send it again as it was.
    pub fn without_missing(
        &mut self,
        local: Change,
        exists: impl Fn(&OpId) -> bool,
    ) -> Result<Change, CompactionError> {
        let Some(kept) = self.kept.get(&local.hash()).filter(|kept| kept.concurrent) else {
            return Ok(local);
        };
        let mut kept = kept.clone();
        let mut expanded = local.decode();
        let start = expanded.start_op.get();
        let actor = expanded.actor_id.clone();
        // An operation of this change before `index`, or one the document holds.
        let held = |id: &OpId, index: usize| {
            (id.1 == actor && id.0 >= start && id.0 < start + index as u64) || exists(id)
        };
        let mut stripped = false;
        for (index, op) in expanded.operations.iter_mut().enumerate() {
            let in_place = match &op.obj {
                ObjectId::Root => true,
                ObjectId::Id(obj) => held(obj, index),
            } && match &op.key {
                Key::Seq(ElementId::Id(element)) => held(element, index),
                _ => true,
            };
            let pred: Vec<OpId> = op
                .pred
                .iter()
                .filter(|id| held(id, index))
                .cloned()
                .collect();
            let effect = matches!(op.action, OpType::Delete | OpType::Increment(_));
            let element = match (&op.action, &op.key) {
                (OpType::Delete, Key::Seq(ElementId::Id(element))) => Some(element.clone()),
                _ => None,
            };
            if let Some(element) = element.filter(|_| in_place && pred.is_empty()) {
                // A list element deleted again, whose values are gone at the cut: the base
                // holds the element, deleted; this deletes it once more, touching it as the
                // original did (the base of a later cut anchors it under the same id).
                op.pred = SortedVec::from(vec![element]);
                stripped = true;
            } else if !in_place || (effect && pred.is_empty()) {
                // In an object or after an element gone at the cut, or replacing only what
                // is gone there: no effect on the history either.
                *op = sink_op();
                stripped = true;
            } else if pred.len() != op.pred.len() {
                op.pred = SortedVec::from(pred);
                stripped = true;
            }
        }
        if !stripped {
            return Ok(local);
        }
        let mut original = self.back(&local)?;
        kept.original_bytes = Some(original.bytes().to_vec());
        self.forget(&local.hash());
        expanded.hash = None;
        let without = Change::from(expanded);
        self.keep(without.hash(), kept);
        Ok(without)
    }

    fn forget(&mut self, local: &ChangeHash) {
        if let Some(kept) = self.kept.remove(local) {
            self.local.remove(&kept.original);
            self.covered = self
                .kept
                .values()
                .flat_map(|kept| kept.cut_deps.iter())
                .filter(|dep| self.cut.contains(dep))
                .copied()
                .collect();
        }
    }

    /// Notes `change` as lying inside the cut, if it does and is not a cut head; whether that
    /// was not known.
    pub fn note_inside(&mut self, change: &Change) -> bool {
        let hash = change.hash();
        self.holds_inside(change) && !self.cut.contains(&hash) && self.known_inside.insert(hash)
    }

    /// Changes known to lie inside the cut (see [`Self::note_inside`]).
    pub fn known_inside_len(&self) -> usize {
        self.known_inside.len()
    }

    /// Whether the local change `local` does not follow the whole cut.
    pub fn is_concurrent(&self, local: &ChangeHash) -> bool {
        self.kept.get(local).is_some_and(|kept| kept.concurrent)
    }

    /// Whether changes concurrent with the cut were placed on it: a peer compacted at the
    /// same cut may not know where their dependencies lie.
    pub fn holds_concurrent(&self) -> bool {
        !self.known_inside.is_empty()
    }
}

/// Whether `doc` holds the operation `id`.
fn op_exists(doc: &Automerge, id: &OpId) -> bool {
    doc.import_obj(&format!("{}@{}", id.0, id.1.to_hex_string()))
        .is_ok_and(|exid| doc.hash_for_opid(&exid).is_some())
}

/// Adds `local` (from [`Epoch::forward`]) to the changes `batch` waits to apply to `doc`; one
/// concurrent with the cut goes in at once, the batch before it, without the predecessors
/// `doc` does not hold then.
pub fn add_forwarded(
    doc: &mut Automerge,
    epoch: &mut Epoch,
    batch: &mut Vec<Change>,
    local: Change,
) -> Result<(), CompactionError> {
    if !epoch.is_concurrent(&local.hash()) {
        batch.push(local);
        return Ok(());
    }
    doc.apply_changes(std::mem::take(batch))?;
    let local = epoch.without_missing(local, |id| op_exists(doc, id))?;
    doc.apply_changes([local])?;
    Ok(())
}

/// `change` with sequence number `seq` and dependencies `deps`, its operations as they were.
fn rewritten(change: &Change, seq: u64, deps: BTreeSet<ChangeHash>) -> Change {
    let mut expanded = change.decode();
    expanded.hash = None;
    expanded.seq = seq;
    expanded.deps = deps.into_iter().collect();
    Change::from(expanded)
}

/// A compacted document saved as its changes, one after another: Automerge's document format
/// infers each change's first operation from its dependencies, which the base's changes,
/// keeping their operations' own ids, do not follow. Any Automerge loads it.
pub fn save_changes(doc: &Automerge) -> Vec<u8> {
    let mut saved = Vec::new();
    for mut change in doc.get_changes(&[]) {
        saved.extend_from_slice(&change.bytes());
    }
    saved
}

/// Compacts `doc` (the local form under `epoch`, `None` for a document never compacted) at
/// `cut` (local heads): the new document and its epoch.
pub fn compact(
    doc: &Automerge,
    epoch: Option<&Epoch>,
    cut: &[ChangeHash],
) -> Result<(Automerge, Epoch), CompactionError> {
    let at = doc.fork_at(cut)?;
    // The cut's own heads: `cut` may name changes that others of it follow.
    let cut = &at.get_heads();
    let inside = at.get_changes(&[]);
    let base = base_changes(&inside, clock_of(&at, cut))?;
    let original_cut = match epoch {
        Some(epoch) => epoch.heads_within(&at)?,
        None => cut
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let mut next = Epoch {
        cut: original_cut,
        base: base.last().map(Change::hash),
        base_changes: base.iter().map(Change::hash).collect(),
        shifts: shifts(&inside, &base, epoch)?,
        // What was known inside the old cut is inside this one.
        known_inside: epoch
            .map(|epoch| epoch.known_inside.clone())
            .unwrap_or_default(),
        ..Epoch::default()
    };
    let mut compacted = Automerge::new();
    compacted.apply_changes(base)?;
    let mut after = Vec::new();
    for change in doc.get_changes(cut) {
        let original = match epoch {
            Some(epoch) => epoch.back(&change)?,
            None => change,
        };
        // Changes come in causal order: a dependency not translated yet, nor a cut head, lies
        // inside the cut (the change is concurrent with part of it).
        for dep in original.deps() {
            if !next.local.contains_key(dep) && !next.cut.contains(dep) {
                next.known_inside.insert(*dep);
            }
        }
        match next.forward(&original)? {
            Forwarded::Local(local) => {
                add_forwarded(&mut compacted, &mut next, &mut after, *local)?
            }
            Forwarded::InsideCut => return Err(CompactionError::Diverged),
        }
    }
    compacted.apply_changes(after)?;
    if compacted.hydrate(None) != doc.hydrate(None) {
        return Err(CompactionError::Diverged);
    }
    let heads_before = match epoch {
        Some(epoch) => epoch.heads_within(doc)?,
        None => doc.get_heads(),
    };
    if next.heads_within(&compacted)? != heads_before {
        return Err(CompactionError::Diverged);
    }
    Ok((compacted, next))
}

/// Each actor's changes in the cut (original) and in the base, and its last in the cut.
fn shifts(
    inside: &[Change],
    base: &[Change],
    epoch: Option<&Epoch>,
) -> Result<BTreeMap<ActorId, Shift>, CompactionError> {
    let mut last: BTreeMap<ActorId, &Change> = BTreeMap::new();
    for change in inside {
        let at = last.entry(change.actor_id().clone()).or_insert(change);
        if change.seq() > at.seq() {
            *at = change;
        }
    }
    let mut shifts: BTreeMap<ActorId, Shift> = BTreeMap::new();
    for (actor, change) in last {
        let shift = match epoch {
            None => Shift {
                original: change.seq(),
                base: 0,
                last: Some(change.hash()),
            },
            Some(old) => {
                let before = old.shift(&actor);
                let last = match old.kept.get(&change.hash()) {
                    Some(kept) => Some(kept.original),
                    None => before.last,
                };
                Shift {
                    original: before.to_original(change.seq()),
                    base: 0,
                    last,
                }
            }
        };
        shifts.insert(actor, shift);
    }
    // An actor of the compacted history with nothing visible any more is in the cut all
    // the same: its changes are still known by their place.
    if let Some(old) = epoch {
        for (actor, shift) in &old.shifts {
            shifts.entry(actor.clone()).or_insert(Shift {
                original: shift.original,
                base: 0,
                last: shift.last,
            });
        }
    }
    for change in base {
        let shift = shifts.entry(change.actor_id().clone()).or_default();
        shift.base = shift.base.max(change.seq());
    }
    Ok(shifts)
}

#[cfg(test)]
#[path = "compaction_tests.rs"]
mod tests;
