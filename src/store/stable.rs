//! Compacting the histories of documents whose changes became stable (see
//! [`crate::record::compaction`] for what compaction keeps).
//!
//! The documents to compact are those whose log entries truncation just dropped
//! ([`super::truncation`]): every node holds those changes, and every follower read them. The
//! cut of a document is its last cut together with the dropped changes it holds (with
//! everything they follow); the engine asks for compaction only while this node holds every
//! node's own writes up to that node's latest report ([`crate::sync::stability`]), so that no
//! change concurrent with the cut can arrive later: one made before its writer held the cut
//! is here already, and one made after follows the whole cut. A document whose held changes
//! after the cut do not all follow it is left as it is, to be tried with a later cut.
//!
//! Guarantees:
//! - a compacted document reads as before and keeps its (original) heads; its new snapshot,
//!   with the epoch beside it, replaces the old one and its appended changes in one batch;
//! - at most [`COMPACT_DOCUMENTS_PER_STEP`] documents are compacted per call, and at most
//!   [`COMPACTION_PENDING_MAX`] wait; a document past that bound (or forgotten by a restart)
//!   is compacted the next time one of its changes is truncated;
//! - per document and origin only the latest dropped change waits: an origin's later change
//!   to a document follows its earlier ones.

use std::collections::BTreeMap;

use automerge::ChangeHash;

use super::{DocStore, Durability, Store, StoreError};
use crate::record::compaction::CompactionError;
use crate::record::document;
use crate::record::held::HeldDoc;
use crate::record::stamp::ChangeStamp;
use crate::record::NodeId;

/// Most documents one call of [`DocStore::compact_stable`] compacts (or loads to find that
/// they need not be): with 256 of them (and 20,000 log entries truncated) a step of
/// reclamation took 0.7-1.5 s under steady patches; after a catch-up of 20,000 records, 16
/// documents too short to compact took 1-2 ms a step to load and skip. The engine compacts
/// only once the log is truncated as far as it may be, and while documents wait, calls it
/// again after [`crate::sync::RECLAIM_STEP_PAUSE`].
pub const COMPACT_DOCUMENTS_PER_STEP: usize = 8;
/// Most documents waiting to be compacted.
pub const COMPACTION_PENDING_MAX: usize = 100_000;
/// Changes a document must hold beyond its base before its history is compacted: compacting
/// a short history saves little, and its history stays readable (`concord history`). A
/// deleted record is compacted to its tombstone however short its history.
pub const COMPACT_HISTORY_CHANGES_MIN: usize = 128;
/// Largest compacted document (saved, with its epoch): a peer that lacks its compacted
/// history is sent it whole, in one message. A document whose visible state is larger keeps
/// its history.
pub const COMPACTED_DOCUMENT_BYTES_MAX: usize = concord_proto::CHANGE_BYTES_MAX;
const _: () = assert!(
    COMPACTED_DOCUMENT_BYTES_MAX + 2 * concord_proto::DOC_KEY_BYTES_MAX + 16
        <= concord_proto::MESSAGE_BYTES_MAX,
    "a compacted document fits one CompactedDocument message"
);

/// What became of a document compacted elsewhere ([`DocStore::adopt_compacted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    Taken,
    /// Not taken: nothing may be compacted here now, this store compacted further, or what
    /// it holds does not go on it.
    Kept,
    /// Stamped too far ahead of this node's clock: to be offered again once it is not.
    Ahead,
}

/// A compacted document saved, and its epoch encoded.
pub type SavedCompacted = (Vec<u8>, Vec<u8>);

/// Documents with changes newly stable: per document, the latest such change of each origin.
pub(super) type StablePending = BTreeMap<Vec<u8>, BTreeMap<NodeId, ChangeHash>>;

/// What one call of [`DocStore::compact_stable`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Documents compacted.
    pub documents: usize,
    /// Documents left as they were: a change after the cut does not follow it all.
    pub deferred: usize,
}

impl<S: Store> DocStore<S> {
    /// Notes changes whose log entries were dropped as stable: their documents wait to be
    /// compacted.
    pub(super) fn note_stable(&self, origin: &NodeId, dropped: Vec<(Vec<u8>, ChangeHash)>) {
        if !self.config.compact_histories {
            return;
        }
        let mut inner = self.inner();
        for (doc_key, hash) in dropped {
            let waiting = inner.stable_pending.len();
            match inner.stable_pending.get_mut(&doc_key) {
                Some(latest) => {
                    latest.insert(*origin, hash);
                }
                None if waiting < COMPACTION_PENDING_MAX => {
                    inner
                        .stable_pending
                        .insert(doc_key, BTreeMap::from([(*origin, hash)]));
                }
                None => {}
            }
        }
    }

    /// Documents waiting to be compacted.
    pub fn compaction_pending(&self) -> usize {
        self.inner().stable_pending.len()
    }

    /// Compacts up to [`COMPACT_DOCUMENTS_PER_STEP`] of the documents waiting, each at its
    /// stable cut. The caller makes sure no change concurrent with a stable cut can still
    /// arrive (see the module doc).
    pub fn compact_stable(&self) -> Result<Compacted, StoreError> {
        let waiting: Vec<(Vec<u8>, BTreeMap<NodeId, ChangeHash>)> = {
            let mut inner = self.inner();
            let mut taken = Vec::new();
            while taken.len() < COMPACT_DOCUMENTS_PER_STEP {
                let Some(entry) = inner.stable_pending.pop_first() else {
                    break;
                };
                taken.push(entry);
            }
            taken
        };
        let mut done = Compacted::default();
        if waiting.is_empty() {
            return Ok(done);
        }
        let mut session = self.session();
        for (doc_key, latest) in waiting {
            let loaded = session.document(&doc_key)?;
            // A deleted record is compacted down to its tombstone whatever its history.
            let beyond = loaded.doc.changes_beyond_base();
            let deleted = document::state(loaded.doc.local()) == document::RecordState::Deleted;
            if beyond < self.config.compact_history_changes_min && !(deleted && beyond > 0) {
                continue;
            }
            let mut cut: Vec<ChangeHash> = loaded
                .doc
                .epoch()
                .map(|epoch| epoch.cut().to_vec())
                .unwrap_or_default();
            let before = cut.len();
            cut.extend(
                latest
                    .into_values()
                    .filter(|hash| loaded.doc.holds(hash) && !cut_holds(loaded.doc.epoch(), hash)),
            );
            #[cfg(feature = "sabotage")]
            if self.sabotage.compact_unstable {
                cut.extend(loaded.doc.heads());
            }
            if cut.len() == before {
                continue;
            }
            match loaded.doc.compact(&cut, COMPACTED_DOCUMENT_BYTES_MAX) {
                Ok(()) => {
                    tracing::debug!(
                        doc = %String::from_utf8_lossy(&doc_key),
                        heads = ?loaded.doc.heads(),
                        cut = ?loaded.doc.epoch().map(|epoch| epoch.cut().to_vec()),
                        "a stable history was compacted"
                    );
                    session.rewrite_document(&doc_key)?;
                    done.documents += 1;
                }
                Err(CompactionError::ConcurrentWithCut { .. }) => done.deferred += 1,
                Err(error) => {
                    tracing::warn!(
                        doc = %String::from_utf8_lossy(&doc_key),
                        %error,
                        "a document's stable history was not compacted"
                    );
                    done.deferred += 1;
                }
            }
        }
        session.commit(Durability::Deferred)?;
        Ok(done)
    }
}

impl<S: Store> DocStore<S> {
    /// The document compacted, saved whole with its epoch, when a peer that holds `have` of
    /// it lacks part of its compacted history (it holds no change after the cut, nor every cut
    /// head), or when it holds changes concurrent with the cut (a peer compacted at the same
    /// cut may not know where their dependencies lie): the changes alone would not apply
    /// there.
    pub fn compacted_for(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
    ) -> Result<Option<SavedCompacted>, StoreError> {
        let mut inner = self.inner();
        let loaded = self.loaded(&mut inner, doc_key)?;
        let Some(epoch) = loaded.doc.epoch() else {
            return Ok(None);
        };
        let after_cut = have
            .iter()
            .any(|hash| loaded.doc.holds(hash) && !epoch.cut().contains(hash));
        let whole_cut = epoch.cut().iter().all(|hash| have.contains(hash));
        if (after_cut || whole_cut) && !epoch.holds_concurrent() {
            return Ok(None);
        }
        let (snapshot, epoch) = loaded.doc.save();
        Ok(epoch.map(|epoch| (snapshot, epoch)))
    }

    /// Takes in a document compacted elsewhere (see [`Self::compacted_for`]): what this
    /// store holds of it that the compacted one lacks goes on top of it, so nothing held here
    /// is lost. Refused (false) while anything is granted or revoked (compaction happens only
    /// then too), when this store compacted past its cut, or when any of it is stamped past
    /// `accept_until_ms` (as a change would wait, so must the document that holds it).
    pub fn adopt_compacted(
        &self,
        doc_key: &[u8],
        snapshot: &[u8],
        epoch: &[u8],
        accept_until_ms: u64,
    ) -> Result<Adoption, StoreError> {
        if self.door.get().is_some_and(|door| !door.is_open()) {
            return Ok(Adoption::Kept);
        }
        let mut incoming = HeldDoc::load(snapshot, Some(epoch))
            .map_err(|error| StoreError::InvalidDocument(error.to_string()))?;
        document::check_document(incoming.local())?;
        let ahead = incoming.local().get_changes(&[]).iter().any(|change| {
            ChangeStamp::of_change(change.message(), change.timestamp()).hlc > accept_until_ms
        });
        if ahead {
            return Ok(Adoption::Ahead);
        }
        let mut session = self.session();
        let loaded = session.document(doc_key)?;
        let held = loaded.doc.changes(&[]);
        let extra: Vec<_> = held
            .iter()
            .filter(|change| !incoming.holds_change(change))
            .cloned()
            .collect();
        let inside = match (incoming.epoch(), loaded.doc.epoch()) {
            (Some(theirs), Some(ours)) => theirs.covers(ours),
            _ => true,
        };
        if !inside {
            // Compacted here past the incoming cut: keep ours.
            return Ok(Adoption::Kept);
        }
        // Every change held here goes in: those inside the incoming cut show where the
        // dependencies of those concurrent with it lie.
        if incoming.apply(held).is_err()
            || !extra.iter().all(|change| incoming.holds_change(change))
        {
            return Ok(Adoption::Kept);
        }
        tracing::debug!(
            doc = %String::from_utf8_lossy(doc_key),
            extra = ?extra.iter().map(|change| change.hash()).collect::<Vec<_>>(),
            heads = ?incoming.heads(),
            cut = ?incoming.epoch().map(|epoch| epoch.cut().to_vec()),
            "a document compacted elsewhere was taken in"
        );
        session.replace_document(doc_key, incoming)?;
        session.commit(Durability::Deferred)?;
        Ok(Adoption::Taken)
    }
}

fn cut_holds(epoch: Option<&crate::record::compaction::Epoch>, hash: &ChangeHash) -> bool {
    epoch.is_some_and(|epoch| epoch.cut().contains(hash))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::record::document::{self, apply_delete, apply_write, RecordWrite};
    use crate::record::RecordId;
    use crate::store::{Batch, DocStoreConfig, MemoryStore};

    fn write(docs: &DocStore<MemoryStore>, node: NodeId, id: &RecordId, value: i64) {
        let write = RecordWrite {
            set: vec![
                ("n".to_owned(), json!(value)),
                ("note".to_owned(), json!("x".repeat(50))),
            ],
            ..RecordWrite::default()
        };
        docs.write(id, &node.actor(0), value, Durability::Deferred, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
    }

    /// Bytes the store keeps for one document (its `D` value, snapshot and appended changes).
    fn stored_bytes(store: &MemoryStore, id: &RecordId) -> usize {
        let doc = id.to_doc_key();
        [
            crate::store::layout::doc_key(&doc),
            crate::store::layout::snapshot_key(&doc),
            crate::store::layout::appended_prefix(&doc),
        ]
        .iter()
        .map(|prefix| {
            store
                .scan_prefix(prefix, None, usize::MAX)
                .unwrap()
                .iter()
                .map(|(key, value)| key.len() + value.len())
                .sum::<usize>()
        })
        .sum()
    }

    /// A memory store, its node, and a config that compacts stable histories.
    fn compacting_store() -> (MemoryStore, NodeId, DocStoreConfig) {
        let config = DocStoreConfig {
            compact_histories: true,
            ..DocStoreConfig::default()
        };
        (MemoryStore::new(), NodeId([7; 16]), config)
    }

    #[test]
    fn a_stable_history_is_compacted_reads_alike_and_goes_on_after_a_restart() {
        let (store, node, config) = compacting_store();
        let docs = DocStore::open(store.clone(), node, config.clone()).unwrap();
        let id = RecordId::parse("c/1").unwrap();
        for value in 0..2_000 {
            write(&docs, node, &id, value);
        }
        let before = stored_bytes(&store, &id);
        let heads = docs.read(&id, HeldDoc::heads).unwrap();
        let mark = docs.origin_mark(&node);
        // In bounded steps, as the engine truncates.
        let step = crate::store::truncation::TRUNCATE_ENTRIES_PER_STEP;
        let mut dropped = 0;
        loop {
            let now = docs.reclaim_log(&[(node, mark)]).unwrap();
            assert!(now <= step);
            dropped += now;
            if now < step {
                break;
            }
        }
        assert_eq!(dropped, 1_999);
        assert_eq!(docs.compaction_pending(), 1);
        assert_eq!(docs.compact_stable().unwrap().documents, 1);
        let after = stored_bytes(&store, &id);
        assert!(after * 5 < before, "{before} bytes compacted to {after}");
        assert_eq!(docs.read(&id, HeldDoc::heads).unwrap(), heads);
        // The change at the stable mark stays in the log, served as it was written.
        let (_, entry) = docs.log_entries(&node, 0, 10).unwrap().remove(0);
        let served = docs
            .read(&id, |doc| doc.change(&ChangeHash(entry.hash)))
            .unwrap();
        assert_eq!(served.unwrap().hash(), ChangeHash(entry.hash));
        docs.sync().unwrap();
        drop(docs);
        let docs = DocStore::open(store.clone(), node, config).unwrap();
        let fields = docs.read(&id, |doc| document::read(doc.local())).unwrap();
        assert_eq!(fields.unwrap()["n"], json!(1_999));
        write(&docs, node, &id, 5_000);
        let fields = docs.read(&id, |doc| document::read(doc.local())).unwrap();
        assert_eq!(fields.unwrap()["n"], json!(5_000));
        // Updated on, deleted and stable: the record shrinks to its tombstone.
        for value in 0..COMPACT_HISTORY_CHANGES_MIN as i64 {
            write(&docs, node, &id, 5_001 + value);
        }
        docs.write(&id, &node.actor(0), 6_000, Durability::Deferred, |tx| {
            apply_delete(tx)
        })
        .unwrap();
        write(&docs, node, &RecordId::parse("c/2").unwrap(), 1);
        let mark = docs.origin_mark(&node);
        docs.reclaim_log(&[(node, mark)]).unwrap();
        assert_eq!(docs.compact_stable().unwrap().documents, 1);
        let tombstone = stored_bytes(&store, &id);
        assert!(tombstone < 600, "a deleted record keeps {tombstone} bytes");
        assert_eq!(
            docs.read(&id, |doc| document::read(doc.local())).unwrap(),
            None
        );
    }

    /// The size of a document's `D` value.
    fn doc_value_size(store: &MemoryStore, id: &RecordId) -> usize {
        let key = crate::store::layout::doc_key(&id.to_doc_key());
        store.get(&key).unwrap().map_or(0, |value| value.len())
    }

    #[test]
    fn a_large_compacted_record_keeps_its_epoch_with_its_snapshot_not_in_each_change() {
        use crate::store::layout::{self, EpochPlace, Snapshot, StoredDoc};
        let (store, node, config) = compacting_store();
        let docs = DocStore::open(store.clone(), node, config.clone()).unwrap();
        let id = RecordId::parse("c/1").unwrap();
        let text = RecordWrite {
            set: vec![("text".to_owned(), json!("y".repeat(20_000)))],
            ..RecordWrite::default()
        };
        docs.write(&id, &node.actor(0), 0, Durability::Deferred, |tx| {
            apply_write(tx, &text)
        })
        .unwrap();
        for value in 1..300 {
            write(&docs, node, &id, value);
        }
        let mark = docs.origin_mark(&node);
        // Changes after the cut: the epoch has something to say about each.
        for value in 300..400 {
            write(&docs, node, &id, value);
        }
        docs.reclaim_log(&[(node, mark)]).unwrap();
        assert_eq!(docs.compact_stable().unwrap().documents, 1);
        let doc_key = id.to_doc_key();
        let snapshot_of =
            |store: &MemoryStore| store.get(&layout::snapshot_key(&doc_key)).unwrap().unwrap();
        let value = snapshot_of(&store);
        let (_, place) = layout::read_snapshot_value(&value).unwrap();
        let EpochPlace::Here(Some(epoch)) = place else {
            panic!("the epoch is not in the snapshot's value: {place:?}");
        };
        assert!(epoch.len() > 1_000, "an epoch of {} bytes", epoch.len());
        // Each write after it rewrites the `D` value, which holds heads and state alone.
        for value in 400..410 {
            write(&docs, node, &id, value);
            let doc_value = doc_value_size(&store, &id);
            assert!(doc_value < 200, "a D value of {doc_value} bytes");
        }
        let heads = docs.read(&id, HeldDoc::heads).unwrap();
        docs.sync().unwrap();
        drop(docs);
        let reopened = DocStore::open(store.clone(), node, config.clone()).unwrap();
        assert_eq!(reopened.read(&id, HeldDoc::heads).unwrap(), heads);
        let fields = reopened
            .read(&id, |doc| document::read(doc.local()))
            .unwrap();
        assert_eq!(fields.unwrap()["n"], json!(409));
        drop(reopened);

        // As a store of format 2 kept it: the epoch in the `D` value, the snapshot alone.
        let key = layout::doc_key(&doc_key);
        let mut stored = StoredDoc::decode(&store.get(&key).unwrap().unwrap()).unwrap();
        assert_eq!(stored.snapshot, Snapshot::External);
        stored.epoch = Some(epoch.to_vec());
        let mut batch = Batch::default();
        batch.put(key, stored.encode());
        let (snapshot, _) = layout::read_snapshot_value(&value).unwrap();
        batch.put(layout::snapshot_key(&doc_key), snapshot.to_vec());
        store.apply(batch).unwrap();
        let docs = DocStore::open(store.clone(), node, config).unwrap();
        assert_eq!(docs.read(&id, HeldDoc::heads).unwrap(), heads);
        write(&docs, node, &id, 410);
        let doc_value = doc_value_size(&store, &id);
        assert!(doc_value > epoch.len(), "the epoch stays in the D value");
        let fields = docs.read(&id, |doc| document::read(doc.local())).unwrap();
        assert_eq!(fields.unwrap()["n"], json!(410));
    }
}
