//! Refused changes and the writes issued again after a collision: how the store keeps them
//! (see [`super::collision`] for the rule that decides).
//!
//! Guarantees: a refusal, the document rebuilt without the changes it took out, and the
//! effects queued to be written again commit in one atomic batch; a refused change stays
//! refused across restarts; the bytes kept are bounded ([`REFUSED_CHANGES_MAX`],
//! [`REFUSED_BYTES_MAX`]).

use std::collections::BTreeSet;

use automerge::{Change, ChangeHash};
use serde_json::{Map, Value as Json};

use super::collision::{REFUSED_BYTES_MAX, REFUSED_CHANGES_MAX};
use super::documents::for_each_entry;
use super::layout::{self, RefusalReason, RefusedChange, Reissue};
use super::{DocStore, Durability, Store, StoreError, WriteSession};
use crate::record::document::{self, ChangeEffect, RecordWrite};
use crate::record::{NodeId, RecordId};

/// Refused changes kept with their bytes, and how many bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusedUsage {
    pub changes: usize,
    pub bytes: usize,
}

impl RefusedUsage {
    pub fn add(&mut self, other: Self) {
        self.changes += other.changes;
        self.bytes += other.bytes;
    }
}

/// What [`DocStore::refused_changes`] lists of one refused change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEntry {
    pub hash: ChangeHash,
    pub doc_key: Vec<u8>,
    pub refused: RefusedChange,
}

/// A write of this node's own, issued again ([`DocStore::reissue_pending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reissued {
    pub id: RecordId,
    /// The changes of this node's own that a collision took out and this one stands for.
    pub replaces: Vec<ChangeHash>,
    /// The new change, or `None` when the document already shows what they wrote (or it
    /// could not be written: `refused`).
    pub change: Option<ChangeHash>,
    /// Why it could not be written again: the record is now outside this node's grant.
    pub refused: Option<String>,
}

/// Most refused changes [`DocStore::refused_dependencies`] follows from one refused change.
pub const REFUSED_DEPENDENCIES_FOLLOWED_MAX: usize = 8;

/// Most refused changes [`DocStore::refused_changes`] lists at once.
pub const REFUSED_LISTED_MAX: usize = 10_000;

/// What a store holds of refused changes and queued writes, read when it opens.
pub(super) fn scan<S: Store>(store: &S) -> Result<(RefusedUsage, BTreeSet<Vec<u8>>), StoreError> {
    let mut usage = RefusedUsage::default();
    for_each_entry(store, layout::REFUSED_PREFIX, |_, value| {
        let refused: RefusedChange = layout::decode("refused change", value)?;
        if !refused.change.is_empty() {
            usage.changes += 1;
            usage.bytes += refused.change.len();
        }
        Ok(())
    })?;
    let mut reissues = BTreeSet::new();
    let prefix = layout::meta_key(layout::META_REISSUE_PREFIX);
    for_each_entry(store, &prefix, |key, _| {
        reissues.insert(key[prefix.len()..].to_vec());
        Ok(())
    })?;
    Ok((usage, reissues))
}

impl<S: Store> WriteSession<'_, S> {
    /// Takes `revoked` (changes of a revoked node past its cut-off) out of the session's copy
    /// of a document, with what depends on them, refusing them; what this node's own writers
    /// did in the dependents is queued to be written again. Says how many came out, and
    /// whether one was written under the store's current writer: then the store must take a
    /// new writer before it writes again (its next change would reuse a sequence number of
    /// one taken out, which other nodes may still hold).
    pub(super) fn take_out(
        &mut self,
        doc_key: &[u8],
        revoked: &[ChangeHash],
    ) -> Result<(usize, bool), StoreError> {
        let writers = self.inner.writers.clone();
        let loaded = self.document(doc_key)?;
        let held: Vec<ChangeHash> = revoked
            .iter()
            .filter(|hash| loaded.doc.holds(hash))
            .copied()
            .collect();
        let Some(first) = held.first().copied() else {
            return Ok((0, false));
        };
        let (rebuilt, removed) = loaded
            .doc
            .without(&held)
            .map_err(|error| StoreError::Corrupt(format!("rebuilding a document: {error}")))?;
        let mut effects = Vec::new();
        let mut replaces = Vec::new();
        for taken in &removed {
            if let Some((taken_writer, source)) = NodeId::split_actor(taken.actor_id()) {
                if writers.owns(&taken_writer) && !held.contains(&taken.hash()) {
                    let Some(local) = loaded.doc.local_change(&taken.hash()) else {
                        continue;
                    };
                    effects.push((
                        source,
                        document::describe_change(loaded.doc.local(), local.deps(), local.hash()),
                    ));
                    replaces.push(taken.hash());
                }
            }
        }
        let taken_out: std::collections::HashSet<ChangeHash> =
            removed.iter().map(Change::hash).collect();
        for taken in &removed {
            let (reason, instead) = if held.contains(&taken.hash()) {
                (RefusalReason::Revoked, ChangeHash([0; 32]))
            } else {
                // The refused change it depends on directly.
                let direct = taken
                    .deps()
                    .iter()
                    .copied()
                    .find(|dependency| taken_out.contains(dependency))
                    .unwrap_or(first);
                (RefusalReason::DependsOnRefused, direct)
            };
            self.refuse(doc_key, taken, reason, instead);
        }
        let own = removed.iter().any(|taken| {
            NodeId::split_actor(taken.actor_id())
                .is_some_and(|(writer, _)| writer == writers.current)
        });
        self.replace_document(doc_key, rebuilt)?;
        if !effects.is_empty() {
            self.queue_reissue(doc_key, effects, replaces)?;
        }
        Ok((removed.len(), own))
    }

    /// Whether `hash` of `doc_key` was refused here (in this session or before).
    pub(super) fn refused_holds(
        &self,
        doc_key: &[u8],
        hash: &ChangeHash,
    ) -> Result<bool, StoreError> {
        if self.refused_now.contains(hash) {
            return Ok(true);
        }
        Ok(self
            .docs
            .backend()
            .get(&layout::refused_key(hash, doc_key))?
            .is_some())
    }

    /// Records `change` of `doc_key` as refused for `reason`, `instead` standing for it.
    pub(super) fn refuse(
        &mut self,
        doc_key: &[u8],
        change: &Change,
        reason: RefusalReason,
        instead: ChangeHash,
    ) {
        let hash = change.hash();
        if !self.refused_now.insert(hash) {
            return;
        }
        let usage = self.inner.refused;
        let size = change.raw_bytes().len();
        let kept = usage.changes + self.refused_delta.changes < REFUSED_CHANGES_MAX
            && usage.bytes + self.refused_delta.bytes + size <= REFUSED_BYTES_MAX;
        if kept {
            self.refused_delta.add(RefusedUsage {
                changes: 1,
                bytes: size,
            });
        }
        let refused = RefusedChange {
            reason,
            instead: instead.0,
            hlc: crate::record::stamp::ChangeStamp::of_change(change.message(), change.timestamp())
                .hlc,
            change: if kept {
                change.raw_bytes().to_vec()
            } else {
                Vec::new()
            },
        };
        tracing::warn!(
            doc = %String::from_utf8_lossy(doc_key),
            %hash,
            actor = %change.actor_id(),
            seq = change.seq(),
            reason = reason.as_str(),
            %instead,
            "a change was refused"
        );
        self.batch.put(
            layout::refused_key(&hash, doc_key),
            layout::encode(&refused),
        );
    }

    /// Queues the effects of this node's own changes that a collision took out of `doc_key`
    /// (each with the source index that wrote it), to be written again.
    pub(super) fn queue_reissue(
        &mut self,
        doc_key: &[u8],
        effects: Vec<(u16, ChangeEffect)>,
        replaces: Vec<ChangeHash>,
    ) -> Result<(), StoreError> {
        let key = layout::reissue_key(doc_key);
        let mut reissue: Reissue = match self.docs.backend().get(&key)? {
            Some(bytes) => layout::decode("queued write", &bytes)?,
            None => Reissue::default(),
        };
        for (source, effect) in effects {
            let json = serde_json::to_string(&effect).expect("an effect serializes");
            reissue.effects.push((source, json));
        }
        reissue.replaces.extend(replaces.iter().map(|hash| hash.0));
        self.batch.put(key, layout::encode(&reissue));
        self.reissues_now.insert(doc_key.to_vec());
        Ok(())
    }
}

/// The write that does again what `effect` did (as history shows it), within a transaction.
fn redo(
    tx: &mut automerge::transaction::Transaction<'_>,
    effect: &Json,
) -> Result<bool, crate::record::RecordError> {
    // A write with nothing to do leaves the transaction empty: Automerge then makes no change.
    let action = effect["action"].as_str().unwrap_or("update");
    if action == "delete" {
        return document::apply_delete(tx);
    }
    let set: Map<String, Json> = effect["set"].as_object().cloned().unwrap_or_default();
    let remove: Vec<String> = effect["removed"]
        .as_array()
        .map(|fields| {
            fields
                .iter()
                .filter_map(|field| field.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let write = RecordWrite {
        set: set.into_iter().collect(),
        remove,
        ..RecordWrite::default()
    };
    document::apply_write(tx, &write)?;
    Ok(true)
}

impl<S: Store> DocStore<S> {
    /// Whether change `hash` of `doc_key` was refused here.
    pub fn refused_contains(&self, doc_key: &[u8], hash: &ChangeHash) -> Result<bool, StoreError> {
        Ok(self
            .backend()
            .get(&layout::refused_key(hash, doc_key))?
            .is_some())
    }

    /// The bytes of refused change `hash` of `doc_key`, if they were kept.
    pub(super) fn refused_bytes(
        &self,
        doc_key: &[u8],
        hash: &ChangeHash,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(value) = self.backend().get(&layout::refused_key(hash, doc_key))? else {
            return Ok(None);
        };
        let refused: RefusedChange = layout::decode("refused change", &value)?;
        Ok((!refused.change.is_empty()).then_some(refused.change))
    }

    /// The changes refused here that the refused change `hash` of `doc_key` was refused for
    /// depending on, nearest first (at most [`REFUSED_DEPENDENCIES_FOLLOWED_MAX`]), when the
    /// chain ends in a change that lost a collision (two changes at one actor and sequence)
    /// and their bytes were kept. A node that never met the change that lost cannot decide
    /// about `hash` without it (its dependency is missing there, and no document holds it);
    /// given it, it decides by the same rule. Refusals by grant are not followed: every
    /// receiver judges those from the change alone.
    pub(super) fn refused_dependencies(
        &self,
        doc_key: &[u8],
        hash: &ChangeHash,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        // Each refused change is read once: its reason, what it names, and its bytes.
        let mut chain = Vec::new();
        let mut at = *hash;
        for _ in 0..=REFUSED_DEPENDENCIES_FOLLOWED_MAX {
            let Some(value) = self.backend().get(&layout::refused_key(&at, doc_key))? else {
                return Ok(Vec::new());
            };
            let refused: RefusedChange = layout::decode("refused change", &value)?;
            let (reason, instead) = (refused.reason, refused.instead);
            if at != *hash {
                if refused.change.is_empty() {
                    // Its bytes went past the budget for keeping refused changes.
                    return Ok(Vec::new());
                }
                chain.push(refused.change);
            }
            match reason {
                RefusalReason::DuplicateSequence => return Ok(chain),
                RefusalReason::DependsOnRefused
                    if chain.len() < REFUSED_DEPENDENCIES_FOLLOWED_MAX =>
                {
                    at = ChangeHash(instead);
                }
                _ => return Ok(Vec::new()),
            }
        }
        Ok(Vec::new())
    }

    /// Refused changes, at most `limit` (bounded by [`REFUSED_LISTED_MAX`]), in hash order.
    pub fn refused_changes(&self, limit: usize) -> Result<Vec<RefusedEntry>, StoreError> {
        let limit = limit.min(REFUSED_LISTED_MAX);
        let mut found = Vec::new();
        let prefix = layout::REFUSED_PREFIX;
        let mut after: Option<Vec<u8>> = None;
        while found.len() < limit {
            let page = self.backend().scan_prefix(
                prefix,
                after.as_deref(),
                (limit - found.len()).min(super::documents::SCAN_PAGE_ENTRIES),
            )?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (key, value) in page {
                let Some(hash) = key
                    .get(1..33)
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                else {
                    return Err(StoreError::Corrupt("a refused change's key".to_owned()));
                };
                found.push(RefusedEntry {
                    hash: ChangeHash(hash),
                    doc_key: key[33..].to_vec(),
                    refused: layout::decode("refused change", &value)?,
                });
            }
        }
        Ok(found)
    }

    /// Refused changes kept with their bytes, and those bytes.
    pub fn refused_usage(&self) -> RefusedUsage {
        self.inner().refused
    }

    /// Takes out of their documents the changes held at places of `writer`'s log past
    /// `cut_off` (a revoked node's writer: they count nowhere), refusing them as revoked, and
    /// what depends on them too; what this node's own writers did in those is queued to be
    /// written again ([`DocStore::reissue_pending`]). Their log places stay. Durable when it
    /// returns; says how many changes were taken out, and whether one was written under the
    /// store's current writer (then the store must take a new writer before it writes again).
    pub fn take_out_past(
        &self,
        writer: &NodeId,
        cut_off: u64,
    ) -> Result<(usize, bool), StoreError> {
        let mut by_doc: std::collections::BTreeMap<Vec<u8>, Vec<ChangeHash>> =
            std::collections::BTreeMap::new();
        let mut after = cut_off;
        loop {
            let page = self.log_entries(writer, after, super::SCAN_PAGE_ENTRIES)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = *last;
            for (_, entry) in page {
                by_doc
                    .entry(entry.doc_key)
                    .or_default()
                    .push(ChangeHash(entry.hash));
            }
        }
        let (mut taken_out, mut own) = (0, false);
        for (doc_key, revoked) in by_doc {
            let mut session = self.session();
            let (count, own_here) = session.take_out(&doc_key, &revoked)?;
            session.commit(Durability::Durable)?;
            taken_out += count;
            own |= own_here;
        }
        Ok((taken_out, own))
    }

    /// Documents with writes of this node's own waiting to be written again.
    pub fn pending_reissues(&self) -> usize {
        self.inner().reissues.len()
    }

    /// Writes again, as new changes under the current writer, what this node's own writers
    /// wrote and a collision took out (see [`super::collision`]): each effect as the same
    /// source did it, one change a document, durable when this returns. Call it only once the
    /// store writes under a writer that is its own alone.
    pub fn reissue_pending(&self, time_ms: i64) -> Result<Vec<Reissued>, StoreError> {
        let pending: Vec<Vec<u8>> = self.inner().reissues.iter().cloned().collect();
        let mut done = Vec::with_capacity(pending.len());
        for doc_key in pending {
            let key = layout::reissue_key(&doc_key);
            let reissue: Reissue = match self.backend().get(&key)? {
                Some(bytes) => layout::decode("queued write", &bytes)?,
                None => Reissue::default(),
            };
            let id = RecordId::from_doc_key(&doc_key)
                .map_err(|error| StoreError::Corrupt(format!("queued write's record: {error}")))?;
            let writer: NodeId = self.writer();
            let source = reissue.effects.first().map_or(0, |(source, _)| *source);
            let effects: Vec<Json> = reissue
                .effects
                .iter()
                .filter_map(|(_, json)| serde_json::from_str(json).ok())
                .collect();
            let mut session = self.session();
            let written = session.write(&id, &writer.actor(source), time_ms, |tx| {
                let mut changed = false;
                for effect in &effects {
                    changed |= redo(tx, effect)?;
                }
                Ok(changed)
            });
            let (change, refused) = match written {
                Ok((_, outcome)) => (outcome.change, None),
                // The record moved out of what this node may write since: the write cannot
                // be made again, and is dropped.
                Err(StoreError::OutsideGrant(reason)) => (None, Some(reason)),
                Err(error) => return Err(error),
            };
            session.batch.remove(key);
            session.commit(Durability::Durable)?;
            self.inner().reissues.remove(&doc_key);
            match &refused {
                None => tracing::warn!(
                    record = %id,
                    ?change,
                    "a write of this node's own that was taken out was written again"
                ),
                Some(reason) => tracing::warn!(
                    record = %id,
                    %reason,
                    "a write of this node's own that was taken out cannot be written again"
                ),
            }
            done.push(Reissued {
                id,
                replaces: reissue
                    .replaces
                    .iter()
                    .map(|hash| ChangeHash(*hash))
                    .collect(),
                change,
                refused,
            });
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::apply_write;
    use crate::store::{DocStoreConfig, LoggedChange, MemoryStore};
    use serde_json::json;

    fn write(docs: &DocStore<MemoryStore>, id: &RecordId, value: i64, time_ms: i64) -> ChangeHash {
        let write = RecordWrite {
            set: vec![("credit".to_owned(), json!(value))],
            ..Default::default()
        };
        let actor = docs.writer().actor(0);
        let (_, outcome) = docs
            .write(id, &actor, time_ms, Durability::Durable, |tx| {
                apply_write(tx, &write)
            })
            .unwrap();
        outcome.change.unwrap()
    }

    /// Every entry of `from`'s log after `after`, as a peer would send them.
    fn log_of(from: &DocStore<MemoryStore>, origin: NodeId, after: u64) -> Vec<LoggedChange> {
        from.log_after(&origin, after, 100, usize::MAX).unwrap()
    }

    fn credit(docs: &DocStore<MemoryStore>, id: &RecordId) -> Option<Json> {
        docs.read(id, |doc| document::read(doc.local()))
            .unwrap()
            .and_then(|fields| fields.get("credit").cloned())
    }

    /// Two stores under one writer (the second a copy of the first), both holding one
    /// change to `customers/1`: what they write next collides.
    fn two_stores_under_one_writer() -> (
        NodeId,
        RecordId,
        DocStore<MemoryStore>,
        DocStore<MemoryStore>,
    ) {
        let writer = NodeId([2; 16]);
        let id = RecordId::parse("customers/1").unwrap();
        let a = DocStore::open(MemoryStore::new(), writer, DocStoreConfig::default()).unwrap();
        write(&a, &id, 1, 1_000);
        let b = DocStore::open(
            a.backend().durable_copy(),
            writer,
            DocStoreConfig::default(),
        )
        .unwrap();
        (writer, id, a, b)
    }

    #[test]
    fn two_copies_of_one_store_agree_and_the_loser_writes_again_under_a_new_writer() {
        let owner = NodeId([1; 16]);
        // One store, then a copy of it byte for byte: both write under one writer.
        let (writer, id, a, b) = two_stores_under_one_writer();
        let early = write(&a, &id, 0, 2_000);
        let late = write(&b, &id, 42, 3_000);
        // Each receives the other's change at the same log place.
        let at_a = a.apply_remote(log_of(&b, writer, 1), u64::MAX).unwrap();
        let at_b = b.apply_remote(log_of(&a, writer, 1), u64::MAX).unwrap();
        a.sync().unwrap();
        b.sync().unwrap();
        for report in [&at_a, &at_b] {
            assert!(
                report.own_writer_shared && report.invalid.is_empty(),
                "{report:?}"
            );
            assert_eq!(report.places_taken, 1);
            assert_eq!(report.refused, vec![RefusalReason::DuplicateSequence]);
        }
        // The earlier stands on both; the later is refused on both.
        assert_eq!(credit(&a, &id), Some(json!(0)));
        assert_eq!(credit(&b, &id), Some(json!(0)));
        assert_eq!(a.heads(&id.to_doc_key()).unwrap(), vec![early]);
        assert_eq!(b.heads(&id.to_doc_key()).unwrap(), vec![early]);
        for docs in [&a, &b] {
            let refused = docs.refused_changes(10).unwrap();
            assert_eq!(refused.len(), 1);
            assert_eq!(refused[0].hash, late);
            assert_eq!(refused[0].refused.instead, early.0);
            assert!(docs.refused_contains(&id.to_doc_key(), &late).unwrap());
        }
        // The log still serves the refused change at its place, so marks move on.
        let served = log_of(&b, writer, 1);
        assert_eq!(layout::change_hash(&served[0].change), Some(late));
        // b lost its own write: it takes a new writer, then writes it again.
        assert_eq!(a.pending_reissues(), 0);
        assert_eq!(b.pending_reissues(), 1);
        let fresh = NodeId([3; 16]);
        b.switch_writer(owner, fresh).unwrap();
        let done = b.reissue_pending(4_000).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].replaces, vec![late]);
        assert_eq!(credit(&b, &id), Some(json!(42)));
        assert_eq!(b.pending_reissues(), 0);
        // It reaches a as any write does, and both agree.
        a.apply_remote(log_of(&b, fresh, 0), u64::MAX).unwrap();
        assert_eq!(credit(&a, &id), Some(json!(42)));
        assert_eq!(
            a.heads(&id.to_doc_key()).unwrap(),
            b.heads(&id.to_doc_key()).unwrap()
        );
        // A refused change sent again changes nothing.
        let again = a.apply_remote(log_of(&b, writer, 1), u64::MAX).unwrap();
        assert!(again.refused.is_empty() && again.invalid.is_empty());
    }

    #[test]
    fn a_change_applied_and_taken_out_again_in_one_batch_is_not_stored() {
        let (writer, id, a, b) = two_stores_under_one_writer();
        let other = RecordId::parse("customers/2").unwrap();
        // Under one writer: a's second change to the record and b's (with one on top of it)
        // share an actor and a sequence number, at different log places; b's is earlier.
        let late = write(&a, &id, 0, 3_000);
        write(&b, &other, 7, 1_500);
        let early = write(&b, &id, 42, 2_000);
        let on_early = write(&b, &id, 43, 2_100);
        let c = DocStore::open(
            MemoryStore::new(),
            NodeId([9; 16]),
            DocStoreConfig::default(),
        )
        .unwrap();
        c.apply_remote(log_of(&a, writer, 0)[..1].to_vec(), u64::MAX)
            .unwrap();
        // One batch: once it failed as a whole, its changes are applied one at a time, a's
        // first; then b's collides with it, stands, and takes it out again.
        let mut batch: Vec<LoggedChange> = log_of(&b, writer, 2)
            .into_iter()
            .filter(|logged| logged.doc_key == id.to_doc_key())
            .collect();
        batch.extend(log_of(&a, writer, 1));
        assert_eq!(batch.len(), 3);
        let report = c.apply_remote(batch, u64::MAX).unwrap();
        c.sync().unwrap();
        assert!(report.invalid.is_empty(), "{report:?}");
        assert_eq!(report.refused, vec![RefusalReason::DuplicateSequence]);
        assert_eq!(c.heads(&id.to_doc_key()).unwrap(), vec![on_early]);
        assert!(c.refused_contains(&id.to_doc_key(), &late).unwrap());
        assert!(!c.refused_contains(&id.to_doc_key(), &early).unwrap());
        // What is stored loads again: the change taken out is not among its changes.
        let reopened = DocStore::open(
            c.backend().durable_copy(),
            NodeId([9; 16]),
            DocStoreConfig::default(),
        )
        .unwrap();
        assert_eq!(credit(&reopened, &id), Some(json!(43)));
        assert_eq!(reopened.heads(&id.to_doc_key()).unwrap(), vec![on_early]);
        // Every place still counts, the refused change's too, so marks move on past them.
        assert_eq!(reopened.origin_mark(&writer), 4);
    }

    #[test]
    fn two_changes_at_one_place_in_one_batch_collide_by_the_rule() {
        let (writer, id, a, b) = two_stores_under_one_writer();
        let early = write(&a, &id, 0, 2_000);
        let late = write(&b, &id, 42, 3_000);
        // A third store that holds the first change gets both at once, the later first.
        let c = DocStore::open(
            MemoryStore::new(),
            NodeId([9; 16]),
            DocStoreConfig::default(),
        )
        .unwrap();
        c.apply_remote(log_of(&a, writer, 0)[..1].to_vec(), u64::MAX)
            .unwrap();
        let mut both = log_of(&b, writer, 1);
        both.extend(log_of(&a, writer, 1));
        let report = c.apply_remote(both.clone(), u64::MAX).unwrap();
        c.sync().unwrap();
        assert_eq!(
            report.refused,
            vec![RefusalReason::DuplicateSequence],
            "{report:?}"
        );
        assert_eq!(credit(&c, &id), Some(json!(0)));
        assert_eq!(c.heads(&id.to_doc_key()).unwrap(), vec![early]);
        assert!(c.refused_contains(&id.to_doc_key(), &late).unwrap());
        // The same change twice in one batch is a duplicate, not a collision.
        let twice = vec![both[0].clone(), both[0].clone()];
        let report = c.apply_remote(twice, u64::MAX).unwrap();
        assert!(
            report.refused.is_empty() && report.invalid.is_empty(),
            "{report:?}"
        );
    }

    #[test]
    fn a_change_two_links_from_a_lost_collision_is_served_with_both() {
        let (writer, id, a, b) = two_stores_under_one_writer();
        let doc_key = id.to_doc_key();
        // b's change collides with a's earlier one, and b wrote two more on top of it.
        let early = write(&a, &id, 0, 2_000);
        let late = write(&b, &id, 42, 3_000);
        let first_on_late = write(&b, &id, 43, 3_100);
        let second_on_late = write(&b, &id, 44, 3_200);
        let report = b.apply_remote(log_of(&a, writer, 1), u64::MAX).unwrap();
        b.sync().unwrap();
        assert_eq!(
            report.refused,
            vec![
                RefusalReason::DuplicateSequence,
                RefusalReason::DependsOnRefused,
                RefusalReason::DependsOnRefused
            ],
            "{report:?}"
        );
        assert_eq!(b.heads(&doc_key).unwrap(), vec![early]);
        // Each refused follower names the refused change it depends on directly, so the
        // chain from the last one reaches the change that lost link by link: a receiver
        // that never met `late` is sent both changes between, and refuses all three alike.
        let chain = b.refused_dependencies(&doc_key, &second_on_late).unwrap();
        let hashes: Vec<_> = chain
            .iter()
            .map(|bytes| layout::change_hash(bytes).unwrap())
            .collect();
        assert_eq!(hashes, vec![first_on_late, late]);
    }
}
