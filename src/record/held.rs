//! A record's document as a node holds it: one Automerge document, compacted or not, that
//! speaks the original history to everyone else.
//!
//! A document never compacted is its own history: every method is Automerge's. Once
//! compacted ([`super::compaction`]), the Automerge document is this node's local form, and
//! [`HeldDoc`] translates at its edges: heads, changes served and changes applied are original
//! ones; a write made here is logged as the original change it stands for. Reads of values go
//! to [`HeldDoc::local`], which reads exactly as the original would.
//!
//! Guarantees: no method hands out a local hash or a local change as if it were original (the
//! Automerge document is reachable for reads only, through [`HeldDoc::local`], and for writes
//! through [`HeldDoc::write`]); a version inside the compacted history, other than the cut
//! itself, is reported as no longer held rather than read wrongly.

use std::collections::BTreeSet;

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ReadDoc};

use super::compaction::{self, CompactionError, Epoch, Forwarded};

/// A record's Automerge document, with what it was compacted from.
#[derive(Debug, Clone, Default)]
pub struct HeldDoc {
    doc: Automerge,
    epoch: Option<Epoch>,
    /// The epoch learned where changes inside the compacted history lie since it was last
    /// taken (see [`Self::take_epoch_grew`]).
    epoch_grew: bool,
}

impl HeldDoc {
    pub fn new(doc: Automerge, epoch: Option<Epoch>) -> Self {
        Self {
            doc,
            epoch,
            epoch_grew: false,
        }
    }

    /// Whether the epoch learned something since the last call: the document's stored form
    /// should be written whole.
    pub fn take_epoch_grew(&mut self) -> bool {
        std::mem::take(&mut self.epoch_grew)
    }

    /// Notes `change`, held already: if it lies inside the compacted history, changes
    /// concurrent with that history that name it can be placed.
    pub fn note_held(&mut self, change: &Change) {
        if let Some(epoch) = &mut self.epoch {
            self.epoch_grew |= epoch.note_inside(change);
        }
    }

    /// The document to read values from (never hashes: see [`Self::heads`]).
    pub fn local(&self) -> &Automerge {
        &self.doc
    }

    /// Changes the document holds other than its base: its whole history when never
    /// compacted.
    pub fn changes_beyond_base(&self) -> usize {
        let changes = self.doc.stats().num_changes as usize;
        changes - self.epoch.as_ref().map_or(0, Epoch::base_len)
    }

    /// What the document was compacted from, if it was.
    pub fn epoch(&self) -> Option<&Epoch> {
        self.epoch.as_ref()
    }

    /// The heads, as original hashes, sorted.
    pub fn heads(&self) -> Vec<ChangeHash> {
        let local = self.doc.get_heads();
        match &self.epoch {
            None => local,
            Some(epoch) => epoch.original_heads(&local).unwrap_or(local),
        }
    }

    /// Whether the document holds the original change `hash` (a change inside the compacted
    /// history other than a cut head is not known by its hash alone: see
    /// [`Self::holds_change`]).
    pub fn holds(&self, hash: &ChangeHash) -> bool {
        match &self.epoch {
            None => self
                .doc
                .get_missing_deps(std::slice::from_ref(hash))
                .is_empty(),
            Some(epoch) => epoch.local_heads(std::slice::from_ref(hash)).is_some(),
        }
    }

    /// Whether the document holds the original change `hash`, the `seq`th of `actor`: inside
    /// the compacted history a change is known by its place alone.
    pub fn holds_written(&self, hash: &ChangeHash, actor: &ActorId, seq: u64) -> bool {
        self.epoch
            .as_ref()
            .is_some_and(|epoch| epoch.holds_inside_at(actor, seq))
            || self.holds(hash)
    }

    /// Whether the document holds `change`.
    pub fn holds_change(&self, change: &Change) -> bool {
        self.epoch
            .as_ref()
            .is_some_and(|epoch| epoch.holds_inside(change))
            || self.holds(&change.hash())
    }

    /// Whether the document holds `dep`, a dependency of `change`.
    pub fn holds_dependency(&self, change: &Change, dep: &ChangeHash) -> bool {
        self.holds(dep)
            || self
                .epoch
                .as_ref()
                .is_some_and(|epoch| epoch.is_cut_dependency(change, dep))
    }

    /// The document as `change` found it (at its dependencies), if it holds them all.
    pub fn fork_before(&self, change: &Change) -> Option<Self> {
        let deps = change.deps();
        if !deps.iter().all(|dep| self.holds_dependency(change, dep)) {
            return None;
        }
        let local = match &self.epoch {
            None => deps.to_vec(),
            Some(epoch) => {
                let outside: Vec<ChangeHash> = deps
                    .iter()
                    .filter(|dep| !epoch.is_cut_dependency(change, dep))
                    .copied()
                    .collect();
                let mut local = epoch.local_heads(&outside)?;
                if outside.len() < deps.len() {
                    local.extend(epoch.local_heads(epoch.cut())?);
                }
                local
            }
        };
        Some(Self::new(
            self.doc.fork_at(&local).ok()?,
            self.epoch.clone(),
        ))
    }

    /// The original change `hash`, if the document holds it outside the compacted history.
    pub fn change(&self, hash: &ChangeHash) -> Option<Change> {
        match &self.epoch {
            None => self.doc.get_change_by_hash(hash),
            Some(epoch) => {
                let local = epoch.local_heads(std::slice::from_ref(hash))?;
                let [local] = local.as_slice() else {
                    return None;
                };
                let change = self.doc.get_change_by_hash(local)?;
                epoch.back(&change).ok()
            }
        }
    }

    /// The original changes not in the history of `have` (original heads the document holds),
    /// in causal order; after a compaction, only those after the cut.
    pub fn changes(&self, have: &[ChangeHash]) -> Vec<Change> {
        match &self.epoch {
            None => self.doc.get_changes(have),
            Some(epoch) => {
                let local = epoch.local_heads(have).unwrap_or_default();
                self.doc
                    .get_changes(&local)
                    .iter()
                    .filter_map(|change| epoch.back(change).ok())
                    .collect()
            }
        }
    }

    /// Applies original changes, in any order. After a compaction, a change whose
    /// dependencies are not held (nor among `changes`) is left out, as Automerge would hold it
    /// back; one concurrent with the compacted history goes on it (see
    /// [`compaction`]'s guarantees).
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), CompactionError> {
        let Self {
            doc,
            epoch,
            epoch_grew,
        } = self;
        let Some(epoch) = epoch else {
            return Ok(doc.apply_changes(changes)?);
        };
        let known_before = epoch.known_inside_len();
        let mut local = Vec::with_capacity(changes.len());
        let mut pending = changes;
        loop {
            let before = pending.len();
            let mut waiting = Vec::new();
            for change in pending {
                match epoch.forward(&change) {
                    Ok(Forwarded::Local(change)) => {
                        compaction::add_forwarded(doc, epoch, &mut local, *change)?
                    }
                    Ok(Forwarded::InsideCut) => {}
                    Err(CompactionError::MissingDependency { dependency, .. }) => {
                        tracing::debug!(change = %change.hash(), %dependency, "waits for a dependency");
                        waiting.push(change)
                    }
                    Err(error) => return Err(error),
                }
            }
            pending = waiting;
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        *epoch_grew |= epoch.known_inside_len() != known_before;
        Ok(doc.apply_changes(local)?)
    }

    /// The document as it was at original `heads`; `None` when they lie inside the compacted
    /// history (other than its cut).
    pub fn fork_at(&self, heads: &[ChangeHash]) -> Result<Option<Self>, AutomergeError> {
        let local = match &self.epoch {
            None => heads.to_vec(),
            Some(epoch) => match epoch.local_heads(heads) {
                Some(local) => local,
                None => return Ok(None),
            },
        };
        Ok(Some(Self::new(
            self.doc.fork_at(&local)?,
            self.epoch.clone(),
        )))
    }

    /// Original `heads` as the local document names them, to read it at that version;
    /// `None` when they lie inside the compacted history.
    pub fn local_heads(&self, heads: &[ChangeHash]) -> Option<Vec<ChangeHash>> {
        match &self.epoch {
            None => Some(heads.to_vec()),
            Some(epoch) => epoch.local_heads(heads),
        }
    }

    /// Writes one change as `actor` through `edit`: the original change it stands for, or
    /// `None` when the edit changed nothing. An edit that fails is rolled back.
    pub fn write<T, E: From<CompactionError>>(
        &mut self,
        actor: &ActorId,
        options: CommitOptions,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<(T, Option<Change>), E> {
        self.doc.set_actor(actor.clone());
        let mut transaction = self.doc.transaction();
        let value = match edit(&mut transaction) {
            Ok(value) => value,
            Err(error) => {
                transaction.rollback();
                return Err(error);
            }
        };
        let (hash, _) = transaction.commit_with(options);
        let Some(hash) = hash else {
            return Ok((value, None));
        };
        let local = self
            .doc
            .get_change_by_hash(&hash)
            .ok_or(CompactionError::Untranslated(hash))?;
        let original = match &mut self.epoch {
            None => local,
            Some(epoch) => epoch.native(&local)?,
        };
        Ok((value, Some(original)))
    }

    /// The original changes of `incoming` this document lacks. `incoming` is either a copy of
    /// this document's local form (as [`Self::save`] exports it) edited elsewhere, whose new
    /// changes stand for originals as a write here would, or a document of the original
    /// history.
    pub fn changes_added(&self, incoming: &Automerge) -> Result<Vec<Change>, CompactionError> {
        let Some(epoch) = &self.epoch else {
            return Ok(self.doc.get_changes_added(incoming));
        };
        let local_form = epoch
            .base()
            .is_some_and(|base| incoming.get_change_by_hash(&base).is_some());
        if !local_form {
            return Ok(incoming
                .get_changes(&[])
                .into_iter()
                .filter(|change| !self.holds_change(change))
                .collect());
        }
        let mut preview = epoch.clone();
        self.doc
            .get_changes_added(incoming)
            .iter()
            .map(|change| preview.native(change))
            .collect()
    }

    /// The local form of original change `hash`, to describe it on [`Self::local`].
    pub fn local_change(&self, hash: &ChangeHash) -> Option<Change> {
        match &self.epoch {
            None => self.doc.get_change_by_hash(hash),
            Some(epoch) => match epoch.local_heads(std::slice::from_ref(hash))?.as_slice() {
                [local] if !epoch.cut().contains(hash) => self.doc.get_change_by_hash(local),
                _ => None,
            },
        }
    }

    /// The original change by `actor` with sequence `seq`, if the document holds it outside
    /// the compacted history.
    pub fn change_at(&self, actor: &ActorId, seq: u64) -> Option<Change> {
        self.changes(&[])
            .into_iter()
            .find(|change| change.actor_id() == actor && change.seq() == seq)
    }

    /// The document without original changes `losers` and every change that depends on
    /// them, rebuilt from what remains (a compacted history stays); and the original changes
    /// taken out, in causal order.
    pub fn without(&self, losers: &[ChangeHash]) -> Result<(Self, Vec<Change>), CompactionError> {
        let mut out: BTreeSet<ChangeHash> = losers.iter().copied().collect();
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        let mut epoch = self.epoch.clone();
        // In causal order: a change's dependencies come before it.
        for local in self.doc.get_changes(&[]) {
            let original = match &self.epoch {
                Some(epoch) if epoch.is_base(&local.hash()) => {
                    kept.push(local);
                    continue;
                }
                Some(epoch) => epoch.back(&local)?,
                None => local.clone(),
            };
            if out.contains(&original.hash()) || original.deps().iter().any(|dep| out.contains(dep))
            {
                out.insert(original.hash());
                if let Some(epoch) = &mut epoch {
                    epoch.forget_original(&original.hash());
                }
                removed.push(original);
            } else {
                kept.push(local);
            }
        }
        let mut doc = Automerge::new().with_actor(self.doc.get_actor().clone());
        doc.apply_changes(kept)?;
        Ok((Self::new(doc, epoch), removed))
    }

    /// Takes back the change `hash` just written, which found the document at original
    /// heads `before`.
    pub fn undo(
        &mut self,
        before: &[ChangeHash],
        hash: &ChangeHash,
    ) -> Result<(), CompactionError> {
        let local = self.local_heads(before).ok_or(CompactionError::InsideCut)?;
        self.doc = self.doc.fork_at(&local)?;
        if let Some(epoch) = &mut self.epoch {
            epoch.forget_original(hash);
        }
        Ok(())
    }

    /// Compacts the history up to original heads `cut`, unless the compacted document
    /// saved with its epoch would take more than `saved_bytes_max` bytes (it is then left as
    /// it is).
    pub fn compact(
        &mut self,
        cut: &[ChangeHash],
        saved_bytes_max: usize,
    ) -> Result<(), CompactionError> {
        let local = self.local_heads(cut).ok_or(CompactionError::InsideCut)?;
        let (doc, epoch) = compaction::compact(&self.doc, self.epoch.as_ref(), &local)?;
        let saved = compaction::save_changes(&doc).len() + epoch.to_bytes().len();
        if saved > saved_bytes_max {
            return Err(CompactionError::TooLarge {
                saved,
                saved_max: saved_bytes_max,
            });
        }
        let actor = self.doc.get_actor().clone();
        self.doc = doc.with_actor(actor);
        self.epoch = Some(epoch);
        Ok(())
    }

    /// The local document saved, and its epoch encoded (`None` for a document never
    /// compacted). A compacted document is saved as its changes one after another
    /// ([`compaction::save_changes`]), which any Automerge loads.
    pub fn save(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match &self.epoch {
            None => (self.doc.save(), None),
            Some(epoch) => (compaction::save_changes(&self.doc), Some(epoch.to_bytes())),
        }
    }

    /// A document saved by [`Self::save`].
    pub fn load(saved: &[u8], epoch: Option<&[u8]>) -> Result<Self, CompactionError> {
        Ok(Self::new(
            Automerge::load(saved)?,
            epoch.map(Epoch::from_bytes).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::ROOT;

    use super::*;

    fn actor(byte: u8) -> ActorId {
        ActorId::from(vec![byte; 18])
    }

    fn put(doc: &mut HeldDoc, actor: &ActorId, field: &str, value: i64) -> Change {
        let ((), change) = doc
            .write::<_, CompactionError>(actor, CommitOptions::default(), |tx| {
                tx.put(ROOT, field, value)?;
                Ok(())
            })
            .unwrap();
        change.unwrap()
    }

    #[test]
    fn a_compacted_document_saved_and_loaded_goes_on_with_a_plain_one() {
        let (paris, tokyo) = (actor(1), actor(2));
        let mut a = HeldDoc::default();
        let mut b = HeldDoc::default();
        for i in 0..100 {
            let change = put(&mut a, &paris, "price", i);
            b.apply(vec![change]).unwrap();
        }
        let cut = a.heads();
        a.compact(&cut, usize::MAX).unwrap();
        assert_eq!(a.heads(), b.heads());
        let (saved, epoch) = a.save();
        let mut a = HeldDoc::load(&saved, epoch.as_deref()).unwrap();
        // Both write on; each applies the other's originals.
        let from_a = put(&mut a, &paris, "price", 1000);
        let from_b = put(&mut b, &tokyo, "stock", 7);
        a.apply(vec![from_b.clone()]).unwrap();
        b.apply(vec![from_a.clone()]).unwrap();
        assert_eq!(a.heads(), b.heads());
        assert_eq!(a.local().hydrate(None), b.local().hydrate(None));
        assert_eq!(a.change(&from_b.hash()).unwrap().hash(), from_b.hash());
        assert_eq!(a.changes(&cut).len(), 2);
        assert!(a.holds_change(&b.changes(&[])[3]), "inside the cut");
        assert!(a.fork_at(b.changes(&[])[3].deps()).unwrap().is_none());
        assert!(a.fork_at(&[from_a.hash()]).unwrap().is_some());
    }
}
