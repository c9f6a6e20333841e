//! Write sessions: edits to many documents, committed as one atomic batch.
//!
//! A session holds the store's lock, takes every document it touches out of the cache into
//! its own working set, edits them there, and queues their values, log entries and index
//! changes into one batch. Guarantees: a committed session's batch is applied whole or not at
//! all, and only then are its documents put back into the cache and its log places, heads and
//! counts applied to the store's state in memory; a session dropped without committing leaves
//! nothing behind, in the store or in memory.

use parking_lot::MutexGuard;
use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, Change, ChangeHash};

use super::cache::Loaded;
use super::documents::{
    appended_changes, collection_of, counts_as_live, Durability, ImportOutcome, Inner,
    WriteOutcome, COMPACT_AFTER_BYTES, SESSION_DOCUMENTS_MAX, SNAPSHOT_GROWTH_PARTS,
    WITHDRAWALS_KEPT_MAX,
};
use super::layout::{self, LogEntry, ScopeTag, Snapshot, StoredDoc};
use super::{Batch, DocStore, Store, StoreError};
use crate::record::document::CHANGE_BYTES_MAX;
use crate::record::held::HeldDoc;
use crate::record::stamp::ChangeStamp;
use crate::record::{document, NodeId, RecordError, RecordId};

/// A change applied to a session's copy of a document, to be queued for the store.
pub(super) struct NewChange {
    pub(super) hash: ChangeHash,
    pub(super) place: LogPlace,
    /// Its encoding, when the caller has it.
    pub(super) bytes: Option<Vec<u8>>,
}

/// Where a change goes in the replication log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogPlace {
    /// Written here: the next sequence number of this node's own log.
    Local,
    /// Received with its place in its origin's log.
    Remote { origin: NodeId, sequence: u64 },
    /// Received without a place (a dependency fetched directly); its place arrives later.
    Unlogged,
}

/// Edits to many documents, committed as one atomic batch. Holds the store's lock.
pub struct WriteSession<'a, S: Store> {
    pub(super) docs: &'a DocStore<S>,
    pub(super) inner: MutexGuard<'a, Inner>,
    pub(super) batch: Batch,
    /// Documents this session touched, taken out of the cache until commit (see
    /// [`WriteSession::document`]).
    working: BTreeMap<Vec<u8>, Loaded>,
    next_log_sequence: u64,
    /// Log places queued in this session, applied to `Inner::origins` on commit.
    pub(super) places: std::collections::HashSet<(NodeId, u64)>,
    /// Head changes queued in this session, applied to `Inner::digest` on commit.
    heads_changed: Vec<(Vec<u8>, Vec<ChangeHash>, Vec<ChangeHash>)>,
    /// Change in the number of live records, applied to `Inner::live_records` on commit.
    live_delta: i64,
    /// Changes refused in this session, and their bytes kept; applied to `Inner` on commit.
    pub(super) refused_now: std::collections::HashSet<ChangeHash>,
    pub(super) refused_delta: super::refused::RefusedUsage,
    /// Documents given writes to issue again in this session, applied to `Inner` on commit.
    pub(super) reissues_now: BTreeSet<Vec<u8>>,
    /// Per document touched in a collection that read filters narrow, its scope tag as the
    /// session last saw it: the "before" of its next changes' log entries.
    tags_before: std::collections::HashMap<Vec<u8>, ScopeTag>,
    /// Documents withdrawn in this session (they left this node's read scope): not cached.
    withdrawn: BTreeSet<Vec<u8>>,
    /// Documents that changes from elsewhere took out of this node's read scope in this
    /// session: kept until a node that reads everything withdraws them.
    pub(super) left_scope: BTreeSet<Vec<u8>>,
}

/// What the log keeps of a record beside a change: its values of `fields` (see
/// [`layout::ScopeTag`]).
pub(super) fn scope_tag(doc: &Automerge, fields: &[String]) -> ScopeTag {
    let record = document::read(doc);
    fields
        .iter()
        .map(|field| {
            let value = record
                .as_ref()
                .and_then(|record| record.get(field))
                .and_then(|value| serde_json::to_string(value).ok());
            (field.clone(), value)
        })
        .collect()
}

impl<'a, S: Store> WriteSession<'a, S> {
    /// A session over `docs`, holding its lock (`inner`) until it is committed or dropped.
    pub(super) fn new(docs: &'a DocStore<S>, inner: MutexGuard<'a, Inner>) -> Self {
        let next_log_sequence = inner.next_log_sequence;
        Self {
            docs,
            inner,
            batch: Batch::default(),
            working: BTreeMap::new(),
            next_log_sequence,
            places: std::collections::HashSet::new(),
            heads_changed: Vec::new(),
            live_delta: 0,
            refused_now: std::collections::HashSet::new(),
            refused_delta: super::refused::RefusedUsage::default(),
            reissues_now: BTreeSet::new(),
            tags_before: std::collections::HashMap::new(),
            withdrawn: BTreeSet::new(),
            left_scope: BTreeSet::new(),
        }
    }
}

impl<S: Store> WriteSession<'_, S> {
    /// Runs `edit` inside an Automerge transaction on the document, as `actor`, at wall-clock
    /// time `time_ms` (ms since the Unix epoch: the change's hybrid logical clock starts from
    /// it, its Automerge time is it in whole seconds). If `edit` fails, the document is left
    /// as it was and nothing is queued.
    pub fn write<T>(
        &mut self,
        id: &RecordId,
        actor: &ActorId,
        time_ms: i64,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<T, RecordError>,
    ) -> Result<(T, WriteOutcome), StoreError> {
        self.write_reverting(id, actor, time_ms, None, edit)
    }

    /// Writes `write` into the record as `actor` at `time_ms`: the one way a record write made
    /// on this node (through the API, the CLI, a batch, a revert or an adapter's row) enters
    /// the store. The write's field rules and size limits ([`RecordWrite::check`]) come first;
    /// then, in [`WriteSession::write`], the node's grant and the size of the change made.
    pub fn put_record(
        &mut self,
        id: &RecordId,
        actor: &ActorId,
        time_ms: i64,
        write: &document::RecordWrite,
    ) -> Result<WriteOutcome, StoreError> {
        self.put_record_reverting(id, actor, time_ms, None, write)
    }

    /// [`WriteSession::put_record`] for a revert to the version `reverts`.
    pub fn put_record_reverting(
        &mut self,
        id: &RecordId,
        actor: &ActorId,
        time_ms: i64,
        reverts: Option<ChangeHash>,
        write: &document::RecordWrite,
    ) -> Result<WriteOutcome, StoreError> {
        write.check()?;
        let (_, outcome) = self.write_reverting(id, actor, time_ms, reverts, |tx| {
            document::apply_write(tx, write)
        })?;
        Ok(outcome)
    }

    /// Deletes the record (a tombstone, its fields removed) as `actor` at `time_ms`, passing
    /// the checks a write does; whether it was live.
    pub fn delete_record(
        &mut self,
        id: &RecordId,
        actor: &ActorId,
        time_ms: i64,
        reverts: Option<ChangeHash>,
    ) -> Result<(bool, WriteOutcome), StoreError> {
        self.write_reverting(id, actor, time_ms, reverts, |tx| document::apply_delete(tx))
    }

    /// [`WriteSession::write`], for a change that brings the record back to `reverts` (a
    /// version of its history): its stamp says so, and history shows it as a revert.
    pub fn write_reverting<T>(
        &mut self,
        id: &RecordId,
        actor: &ActorId,
        time_ms: i64,
        reverts: Option<ChangeHash>,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<T, RecordError>,
    ) -> Result<(T, WriteOutcome), StoreError> {
        let doc_key = id.to_doc_key();
        let docs = self.docs;
        // A writer handed an actor before the store took a new writer writes as the same
        // source under the new one: no change is ever made under a superseded writer.
        let current = self.inner.writers.current;
        let actor = &match NodeId::split_actor(actor) {
            Some((writer, index)) if writer != current && self.inner.writers.owns(&writer) => {
                current.actor(index)
            }
            _ => actor.clone(),
        };
        let withdrew_any = self.inner.withdrew_any;
        let loaded = self.document(&doc_key)?;
        if withdrew_any && docs.lacks_kept_own_change(&doc_key, &loaded.doc)? {
            // Automerge numbers an actor's changes per document: written afresh here, the
            // record would take sequence numbers this node's kept changes to it already hold.
            return Err(StoreError::OutsideGrant(format!(
                "{id} was taken out of this node: it lies outside what the node may read, and \
                 a node that reads it holds it; write it there"
            )));
        }
        let mut stamp = docs.stamp(actor, loaded.doc.local(), time_ms);
        stamp.reverts = reverts.map(|version| version.to_string());
        let before = loaded.doc.heads();
        let options = CommitOptions::default()
            .with_time(time_ms.div_euclid(1000))
            .with_message(stamp.to_message());
        let (value, change) = loaded
            .doc
            .write::<_, StoreError>(actor, options, |tx| edit(tx).map_err(StoreError::from))?;
        let Some(change) = change else {
            let heads = loaded.doc.heads();
            return Ok((
                value,
                WriteOutcome {
                    change: None,
                    heads,
                },
            ));
        };
        let hash = change.hash();
        if let Some(door) = docs.door.get().filter(|_| docs.checks_own_writes()) {
            let node = door.node();
            let collection = id.collection.as_str();
            let verdict = door
                .verdict(Some(&node), None, collection)
                .unwrap_or_else(|| {
                    let then = loaded.doc.fork_at(&before).ok().flatten();
                    door.judge(
                        Some(&node),
                        None,
                        collection,
                        then.and_then(|then| document::read(then.local())).as_ref(),
                        document::read(loaded.doc.local()).as_ref(),
                    )
                });
            if let Err(reason) = verdict {
                // Refused: the document goes back to what it was, and nothing was queued.
                loaded.doc.undo(&before, &hash)?;
                return Err(StoreError::OutsideGrant(door.explain(reason, collection)));
            }
        }
        let bytes = change.raw_bytes().to_vec();
        if bytes.len() > CHANGE_BYTES_MAX {
            // A change no peer could be sent is never stored: the document goes back to what
            // it was, and nothing of it was queued.
            loaded.doc.undo(&before, &hash)?;
            return Err(StoreError::ChangeTooLarge {
                size: bytes.len(),
                size_max: CHANGE_BYTES_MAX,
            });
        }
        let heads = self.queue_new_changes(
            &doc_key,
            vec![NewChange {
                hash,
                place: LogPlace::Local,
                bytes: Some(bytes),
            }],
        )?;
        Ok((
            value,
            WriteOutcome {
                change: Some(hash),
                heads,
            },
        ))
    }

    /// Merges every change of `incoming` that the document lacks.
    pub fn merge(
        &mut self,
        id: &RecordId,
        incoming: &Automerge,
        accept_until_ms: u64,
    ) -> Result<ImportOutcome, StoreError> {
        let doc_key = id.to_doc_key();
        let docs = self.docs;
        let loaded = self.document(&doc_key)?;
        let incoming_changes = loaded.doc.changes_added(incoming)?;
        if let Some(oversized) = incoming_changes
            .iter()
            .find(|change| change.raw_bytes().len() > CHANGE_BYTES_MAX)
        {
            return Err(StoreError::ChangeTooLarge {
                size: oversized.raw_bytes().len(),
                size_max: CHANGE_BYTES_MAX,
            });
        }
        for change in &incoming_changes {
            document::check_change(change)?;
        }
        if let Some(ahead) = incoming_changes
            .iter()
            .find(|change| super::apply::clock_of(change) > accept_until_ms)
        {
            return Err(StoreError::ClockAhead {
                change: ahead.hash().to_string(),
                clock_ms: super::apply::clock_of(ahead),
                accept_until_ms,
            });
        }
        // Each change is judged by its author's grant, as every node it reaches will judge it.
        let judged: Vec<(Option<(NodeId, u64)>, &Change)> = incoming_changes
            .iter()
            .map(|change| (None, change))
            .collect();
        let verdicts = docs.judge_incoming(&loaded.doc, &doc_key, &judged, super::Unplaced::Refuse);
        if let Some(held) = verdicts.as_ref().and_then(|verdicts| {
            incoming_changes
                .iter()
                .zip(verdicts)
                .find(|(_, verdict)| **verdict == super::apply::Verdict::Held)
        }) {
            return Err(StoreError::Unjudged(held.0.hash().to_string()));
        }
        if let Some((change, reason)) = verdicts.and_then(|verdicts| {
            incoming_changes
                .iter()
                .zip(verdicts)
                .find_map(|(change, verdict)| match verdict {
                    super::apply::Verdict::Refuse(reason, _) => Some((change, reason)),
                    _ => None,
                })
        }) {
            let author = ChangeStamp::of_change(change.message(), change.timestamp()).author();
            return Err(StoreError::OutsideGrant(format!(
                "change {} by {}: {}",
                change.hash(),
                author.map_or_else(|| "no named node".to_owned(), |author| author.to_string()),
                reason.as_str().replace('_', " ")
            )));
        }
        let outcome = self.apply_and_queue(&doc_key, incoming_changes, LogPlace::Local)?;
        let loaded = self.document(&doc_key)?;
        if let Err(error) = document::check_document(loaded.doc.local()) {
            // Nothing of it is kept: the session's copy goes, unwritten.
            self.abandon(&doc_key);
            return Err(error.into());
        }
        Ok(outcome)
    }

    /// Applies changes to the session's copy of a document and queues whichever of them were
    /// new. Changes whose dependencies are missing must not be among them: Automerge would
    /// queue those in memory only.
    pub(super) fn apply_and_queue(
        &mut self,
        doc_key: &[u8],
        changes: Vec<Change>,
        place: LogPlace,
    ) -> Result<ImportOutcome, StoreError> {
        let loaded = self.document(doc_key)?;
        let before = loaded.doc.heads();
        loaded
            .doc
            .apply(changes)
            .map_err(|error| StoreError::InvalidDocument(error.to_string()))?;
        // Only changes that were applied count: the ones now above the old heads.
        let new: Vec<NewChange> = loaded
            .doc
            .changes(&before)
            .into_iter()
            .map(|change| NewChange {
                hash: change.hash(),
                place,
                bytes: Some(change.raw_bytes().to_vec()),
            })
            .collect();
        if new.is_empty() {
            return Ok(ImportOutcome {
                new_changes: 0,
                heads: loaded.doc.heads(),
            });
        }
        let new_changes = new.len();
        let heads = self.queue_new_changes(doc_key, new)?;
        Ok(ImportOutcome { new_changes, heads })
    }

    /// Queues `new` changes, already applied to the session's copy of the document, with the
    /// document's new stored form and their log entries, compacting when due. A change's
    /// `bytes`, when the caller has them, save encoding it again.
    pub(super) fn queue_new_changes(
        &mut self,
        doc_key: &[u8],
        new: Vec<NewChange>,
    ) -> Result<Vec<ChangeHash>, StoreError> {
        self.queue_changes(doc_key, new, false)
    }

    /// Queues the session's copy of a document whole (its history was compacted): a new
    /// snapshot with its epoch, no appended changes.
    pub(super) fn rewrite_document(&mut self, doc_key: &[u8]) -> Result<(), StoreError> {
        self.queue_changes(doc_key, Vec::new(), true)?;
        Ok(())
    }

    /// Replaces the session's copy of a document with `doc` (rebuilt without changes that
    /// were refused) and queues its stored form whole: a new snapshot, no appended changes.
    pub(super) fn replace_document(
        &mut self,
        doc_key: &[u8],
        doc: HeldDoc,
    ) -> Result<(), StoreError> {
        self.document(doc_key)?.doc = doc;
        self.queue_changes(doc_key, Vec::new(), true)?;
        Ok(())
    }

    fn queue_changes(
        &mut self,
        doc_key: &[u8],
        new: Vec<NewChange>,
        force_snapshot: bool,
    ) -> Result<Vec<ChangeHash>, StoreError> {
        let compact_after_changes = self.docs.config.compact_after_changes as usize;
        let tags = self.scope_tags(doc_key, &new);
        let loaded = self
            .working
            .get_mut(doc_key)
            .expect("the caller took the document into the session");
        // What its epoch learned goes with the changes that need it: a change concurrent with
        // the compacted history is read back through it.
        let force_snapshot = loaded.doc.take_epoch_grew() || force_snapshot;
        let heads = loaded.doc.heads();
        let stored = &mut loaded.stored;
        let old_heads = stored.change_hashes();
        stored.set_heads(&heads);
        // A document withdrawn earlier in this session was counted out already.
        let was_live =
            !self.withdrawn.remove(doc_key) && counts_as_live(doc_key, stored.record_state());
        self.heads_changed
            .push((doc_key.to_vec(), old_heads, stored.change_hashes()));
        stored.set_record_state(document::state(loaded.doc.local()));
        let is_live = counts_as_live(doc_key, stored.record_state());
        self.live_delta += i64::from(is_live) - i64::from(was_live);
        let mut places = Vec::with_capacity(new.len());
        let mut bytes_new = Vec::with_capacity(new.len());
        for change in new {
            places.push((change.hash, change.place));
            if force_snapshot {
                // Folded into the snapshot below: not encoded one by one.
                continue;
            }
            let bytes = match change.bytes {
                Some(bytes) => bytes,
                None => loaded
                    .doc
                    .change(&change.hash)
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "change {} vanished from its document",
                            change.hash
                        ))
                    })?
                    .raw_bytes()
                    .to_vec(),
            };
            bytes_new.push((change.hash, bytes));
        }
        let compacting =
            force_snapshot || compaction_due(loaded, &bytes_new, compact_after_changes);
        store_document(&mut self.batch, doc_key, loaded, bytes_new, compacting);
        for (hash, place) in places {
            self.queue_log_entry(doc_key, &hash, place, &tags);
        }
        Ok(heads)
    }

    /// The scope tags the log entries of the document's new changes carry (its values of the
    /// fields read filters name, before and after), and whether the changes took the record
    /// out of this node's read scope: a record that changes from elsewhere into one this node
    /// may not read stays until a node that reads everything, holding every change of it this
    /// node holds, tells it to take it out (see `crate::sync::repair`): this node may be the
    /// only one left with another's change to it (its author's store lost).
    fn scope_tags(&mut self, doc_key: &[u8], new: &[NewChange]) -> Vec<ScopeTag> {
        let Some(door) = self.docs.door.get().filter(|door| !door.is_open()) else {
            return Vec::new();
        };
        let loaded = self
            .working
            .get(doc_key)
            .expect("the caller took the document into the session");
        let collection = collection_of(doc_key);
        let mut tags = Vec::new();
        let fields = door.filter_fields(collection);
        if !fields.is_empty() {
            let after = scope_tag(loaded.doc.local(), &fields);
            match self.tags_before.insert(doc_key.to_vec(), after.clone()) {
                Some(before) if before != after => tags.push(before),
                _ => {}
            }
            tags.push(after);
        }
        let node = door.node();
        let left_scope = !door.reads_all(&node)
            && new.iter().any(|change| change.place != LogPlace::Local)
            && match document::read(loaded.doc.local()) {
                Some(fields) => !door.may_read(&node, collection, &fields),
                // Deleted: kept only under a scope of the whole collection.
                None => door.may_read_tagged(&node, collection, &[Vec::new()]) != Some(true),
            };
        if left_scope {
            self.left_scope.insert(doc_key.to_vec());
        }
        tags
    }

    /// Takes a document out of this store because this node may not read it (see
    /// [`DocStore::withdraw`]): its stored form goes, what this node wrote itself stays where
    /// its log can serve it.
    fn drop_document(
        &mut self,
        doc_key: &[u8],
        stored: &StoredDoc,
        appended: &[ChangeHash],
        own_changes: Vec<(ChangeHash, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let was_live = counts_as_live(doc_key, stored.record_state());
        self.heads_changed
            .push((doc_key.to_vec(), stored.change_hashes(), Vec::new()));
        self.live_delta -= i64::from(was_live);
        for (hash, bytes) in own_changes {
            self.batch.put(layout::kept_key(doc_key, &hash), bytes);
        }
        // The log may still name other stores' changes to it, which this store no longer
        // holds: the mark says why, should the record come back without them.
        self.batch.put(layout::kept_prefix(doc_key), Vec::new());
        self.batch.remove(layout::doc_key(doc_key));
        if stored.snapshot == Snapshot::External {
            self.batch.remove(layout::snapshot_key(doc_key));
            for (hash, _) in appended_changes(&self.docs.store, doc_key)? {
                self.batch.remove(layout::appended_key(doc_key, &hash));
            }
        }
        for hash in appended {
            self.batch.remove(layout::appended_key(doc_key, hash));
        }
        self.withdrawn.insert(doc_key.to_vec());
        Ok(())
    }

    /// Whether this store wrote `change` (under any of its writers).
    fn owns_change(&self, change: &Change) -> bool {
        NodeId::split_actor(change.actor_id())
            .is_some_and(|(writer, _)| self.inner.writers.owns(&writer))
    }

    /// Carries the commit's new heads into each cached scoped digest whose reader's access to
    /// every changed document is decided by its collection alone (so the same before and
    /// after): a repair round towards a narrowed peer then scans the store once, not once
    /// per message while writes go on. A digest over a collection read by its fields is
    /// left behind, to be built again when next asked for.
    fn update_scoped_digests(
        &mut self,
        heads_changed: &[(Vec<u8>, Vec<ChangeHash>, Vec<ChangeHash>)],
    ) {
        let generation = self.inner.digest_generation;
        let Some(door) = self.docs.door.get().filter(|door| !door.is_open()) else {
            return;
        };
        let decide = |reader: &NodeId| -> Option<Vec<bool>> {
            heads_changed
                .iter()
                .map(|(doc_key, _, _)| {
                    door.may_read_tagged(reader, collection_of(doc_key), &[Vec::new()])
                })
                .collect()
        };
        for cached in &mut self.inner.scoped_digests {
            if cached.generation + 1 != generation {
                continue;
            }
            let Some(decided) = decide(&cached.reader) else {
                continue;
            };
            let tree = std::sync::Arc::make_mut(&mut cached.tree);
            for ((doc_key, old, new), readable) in heads_changed.iter().zip(decided) {
                if readable {
                    tree.update(doc_key, old, new);
                }
            }
            cached.generation = generation;
        }
        if let Some(build) = &mut self.inner.scoped_building {
            let Some(decided) = decide(&build.reader) else {
                build.spoiled = true;
                return;
            };
            for ((doc_key, old, new), readable) in heads_changed.iter().zip(decided) {
                if readable && layout::doc_key(doc_key) <= build.upto {
                    build.tree.update(doc_key, old, new);
                }
            }
        }
    }

    /// Takes a held document out (see [`DocStore::withdraw`]); false if it is not held. A
    /// document stored as changes alone (no snapshot yet), and not in use, is read from its
    /// stored form without building it in Automerge, which costs most of a withdrawal.
    pub(super) fn withdraw(&mut self, doc_key: &[u8]) -> Result<bool, StoreError> {
        // Asked twice in one session: taken out (and counted out) once.
        if self.withdrawn.contains(doc_key) {
            return Ok(false);
        }
        let in_use = self.working.contains_key(doc_key) || self.inner.cache.contains(doc_key);
        if !in_use {
            let Some(bytes) = self.docs.store.get(&layout::doc_key(doc_key))? else {
                return Ok(false);
            };
            let stored: StoredDoc = StoredDoc::decode(&bytes)?;
            if stored.heads.is_empty() {
                return Ok(false);
            }
            if stored.snapshot == Snapshot::None {
                let mut own = Vec::new();
                for raw in &stored.changes {
                    let change = Change::from_bytes(raw.clone()).map_err(|error| {
                        StoreError::Corrupt(format!(
                            "{}: change: {error}",
                            String::from_utf8_lossy(doc_key)
                        ))
                    })?;
                    if self.owns_change(&change) {
                        own.push((change.hash(), raw.clone()));
                    }
                }
                self.drop_document(doc_key, &stored, &[], own)?;
                return Ok(true);
            }
        }
        let loaded = self.document(doc_key)?;
        if loaded.stored.heads.is_empty() {
            return Ok(false);
        }
        let stored = loaded.stored.clone();
        let appended = loaded.appended.hashes.clone();
        let changes = loaded.doc.changes(&[]);
        let own = changes
            .iter()
            .filter(|change| self.owns_change(change))
            .map(|change| (change.hash(), change.raw_bytes().to_vec()))
            .collect();
        self.drop_document(doc_key, &stored, &appended, own)?;
        Ok(true)
    }

    /// The session's copy of a document: taken out of the cache (or loaded from the store) the
    /// first time the session touches it, and kept here until commit. Neither an eviction nor
    /// a reload from the store, which does not hold this session's writes yet, can then lose
    /// what the session did to it.
    pub(super) fn document(&mut self, doc_key: &[u8]) -> Result<&mut Loaded, StoreError> {
        if !self.working.contains_key(doc_key) {
            if self.working.len() >= SESSION_DOCUMENTS_MAX {
                return Err(StoreError::SessionTooLarge(SESSION_DOCUMENTS_MAX));
            }
            let loaded = match self.inner.cache.pop(doc_key) {
                Some(loaded) => loaded,
                None => self.docs.load(doc_key)?,
            };
            if let Some(door) = self.docs.door.get().filter(|door| !door.is_open()) {
                let fields = door.filter_fields(collection_of(doc_key));
                if !fields.is_empty() {
                    self.tags_before
                        .insert(doc_key.to_vec(), scope_tag(loaded.doc.local(), &fields));
                }
            }
            self.working.insert(doc_key.to_vec(), loaded);
        }
        Ok(self
            .working
            .get_mut(doc_key)
            .expect("present: found or inserted just above"))
    }

    /// Queues one log entry for `hash` of `doc_key` at `place`.
    pub(super) fn queue_log_entry(
        &mut self,
        doc_key: &[u8],
        hash: &ChangeHash,
        place: LogPlace,
        tags: &[ScopeTag],
    ) {
        let (origin, sequence) = match place {
            LogPlace::Unlogged => return,
            LogPlace::Local => {
                let sequence = self.next_log_sequence;
                self.next_log_sequence += 1;
                (self.inner.writers.current, sequence)
            }
            LogPlace::Remote { origin, sequence } => (origin, sequence),
        };
        let entry = LogEntry {
            doc_key: doc_key.to_vec(),
            hash: hash.0,
            tags: tags.to_vec(),
        };
        self.batch.put(
            layout::log_key(&origin, sequence),
            layout::encode_log_entry(&entry),
        );
        self.places.insert((origin, sequence));
    }

    /// Whether the log holds `(origin, sequence)`, counting this session's queued entries.
    pub(super) fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool {
        self.inner
            .origins
            .get(origin)
            .is_some_and(|progress| progress.holds(sequence))
            || self.places.contains(&(*origin, sequence))
    }

    /// Drops the session's copy of a document and everything queued for it, so that the
    /// session commits nothing of it (a merge found it breaks a rule).
    pub(super) fn abandon(&mut self, doc_key: &[u8]) {
        self.working.remove(doc_key);
        self.heads_changed.retain(|(key, _, _)| key != doc_key);
        self.batch = Batch::default();
        self.places.clear();
        self.live_delta = 0;
        self.tags_before.remove(doc_key);
        self.withdrawn.remove(doc_key);
        self.next_log_sequence = self.inner.next_log_sequence;
    }

    /// Drops the session's copy of a document that nothing was queued for yet, as after an
    /// edit that failed halfway: the next touch loads it from the store again.
    pub(super) fn forget(&mut self, doc_key: &[u8]) {
        assert!(
            !self.heads_changed.iter().any(|(key, _, _)| key == doc_key),
            "a document with queued writes is never forgotten"
        );
        self.working.remove(doc_key);
    }

    /// Queues a write of the node's own state (`name` under the meta space, not a record): it
    /// commits atomically with the session's documents, so a cursor saved this way never runs
    /// ahead of or behind the records it covers.
    pub fn put_state(&mut self, name: &[u8], value: Vec<u8>) {
        assert!(
            !name.starts_with(layout::META_NODE_ID)
                && !name.starts_with(layout::META_SOURCE_PREFIX)
                && name != layout::META_FORMAT,
            "node state never overwrites the node id, the format or the source registry"
        );
        self.batch.put(layout::meta_key(name), value);
    }

    /// Queues the removal of state written by [`WriteSession::put_state`].
    pub fn remove_state(&mut self, name: &[u8]) {
        self.batch.remove(layout::meta_key(name));
    }

    /// Applies everything queued as one atomic batch, then waits as `durability` says.
    pub fn commit(mut self, durability: Durability) -> Result<(), StoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        let mut next_withdrawal = self.inner.next_withdrawal;
        for doc_key in &self.withdrawn {
            batch.put(layout::withdrawal_key(next_withdrawal), doc_key.clone());
            if next_withdrawal > WITHDRAWALS_KEPT_MAX {
                batch.remove(layout::withdrawal_key(
                    next_withdrawal - WITHDRAWALS_KEPT_MAX,
                ));
            }
            next_withdrawal += 1;
        }
        let logged_here = self.next_log_sequence > self.inner.next_log_sequence;
        let ticket = if batch.is_empty() {
            None
        } else {
            if let Some(reason) = self.docs.write_refusal() {
                return Err(StoreError::DiskFull(reason));
            }
            self.docs.take_room(batch.bytes())?;
            self.docs.store.apply(batch)?;
            self.inner.next_log_sequence = self.next_log_sequence;
            self.inner.next_withdrawal = next_withdrawal;
            self.inner.withdrew_any |= !self.withdrawn.is_empty();
            for (origin, sequence) in std::mem::take(&mut self.places) {
                self.inner
                    .origins
                    .entry(origin)
                    .or_default()
                    .insert(sequence);
            }
            let heads_changed = std::mem::take(&mut self.heads_changed);
            if !heads_changed.is_empty() {
                self.inner.digest_generation += 1;
                self.update_scoped_digests(&heads_changed);
            }
            for (doc_key, old, new) in heads_changed {
                self.inner.digest.update(&doc_key, &old, &new);
            }
            let refused = std::mem::take(&mut self.refused_delta);
            self.inner.refused.add(refused);
            let reissues = std::mem::take(&mut self.reissues_now);
            self.inner.reissues.extend(reissues);
            let live = self.inner.live_records as i64 + self.live_delta;
            assert!(live >= 0, "the live-record count never goes below zero");
            self.inner.live_records = live as u64;
            Some(self.docs.group_commit.ticket())
        };
        // Written: the session's documents go back to the cache, now matching the store.
        let withdrawn = std::mem::take(&mut self.withdrawn);
        for (doc_key, loaded) in std::mem::take(&mut self.working) {
            if !withdrawn.contains(&doc_key) {
                self.inner.cache.put(doc_key, loaded);
            }
        }
        let docs = self.docs;
        drop(self);
        if let (Some(ticket), Durability::Durable) = (ticket, durability) {
            docs.group_commit
                .wait_durable(ticket, || docs.store.flush())?;
            // Changes of this node's own, durable: the engine ships them. (A deferred
            // commit's are shipped when the engine next reads the log.)
            if logged_here {
                docs.local_writes.wrote();
            }
        }
        Ok(())
    }
}

/// Whether the document's snapshot is written again with `bytes_new`: once the changes
/// appended to it weigh a part of it (a document whose history is long is not saved whole
/// every few changes), or, for changes kept inside the `D` value, once they weigh
/// [`COMPACT_AFTER_BYTES`].
fn compaction_due(
    loaded: &Loaded,
    bytes_new: &[(ChangeHash, Vec<u8>)],
    compact_after_changes: usize,
) -> bool {
    let (stored, appended) = (&loaded.stored, &loaded.appended);
    let count = stored.changes.len() + appended.hashes.len() + bytes_new.len();
    let bytes = stored.appended_bytes()
        + appended.bytes
        + bytes_new.iter().map(|(_, b)| b.len()).sum::<usize>();
    (count >= compact_after_changes && bytes >= appended.snapshot_bytes / SNAPSHOT_GROWTH_PARTS)
        || (stored.snapshot != Snapshot::External && bytes >= COMPACT_AFTER_BYTES)
}

/// Queues the document's stored value with its new changes: saved whole when `compacting`,
/// else each change under a key of its own beside an external snapshot (the `D` value stays
/// small: heads and state, its epoch kept with the snapshot), or inside the `D` value.
fn store_document(
    batch: &mut Batch,
    doc_key: &[u8],
    loaded: &mut Loaded,
    bytes_new: Vec<(ChangeHash, Vec<u8>)>,
    compacting: bool,
) {
    let stored = &mut loaded.stored;
    let appended = &mut loaded.appended;
    if compacting {
        let (snapshot, epoch) = loaded.doc.save();
        stored.changes.clear();
        for hash in appended.hashes.drain(..) {
            batch.remove(layout::appended_key(doc_key, &hash));
        }
        appended.bytes = 0;
        appended.snapshot_bytes = snapshot.len();
        stored.place_snapshot(batch, doc_key, snapshot, epoch);
    } else if stored.snapshot == Snapshot::External {
        for (hash, bytes) in bytes_new {
            appended.bytes += bytes.len();
            appended.hashes.push(hash);
            batch.put(layout::appended_key(doc_key, &hash), bytes);
        }
    } else {
        stored
            .changes
            .extend(bytes_new.into_iter().map(|(_, bytes)| bytes));
    }
    batch.put(layout::doc_key(doc_key), stored.encode());
}
