//! The replication log as replication reads it: how much of each origin's log is held, its
//! entries after a mark (all of them, or those a reader may read), covers that move a mark
//! over what a reader may not read, and the scope tags kept beside entries.
//!
//! Guarantees: entries are read in their origin's order, in pages bounded by count and bytes;
//! an entry a reader may not read is never handed out for that reader; the mark of an origin
//! only moves forward. An entry whose change lies inside its document's compacted history
//! (its bytes are gone) is named apart ([`LogPage::compacted`]): every node held that change
//! when it was compacted here, or lacks the log that made it stable and is caught up by whole
//! documents ([`crate::sync`]'s catch up), so the reader may be told the place is covered.

use std::collections::HashMap;

use automerge::ChangeHash;

use super::layout;
use super::{DocStore, Store, StoreError};
use crate::record::{document, NodeId};

/// Most log entries one step of [`DocStore::retag_log_step`] looks through.
pub const RETAG_ENTRIES_PER_STEP: usize = 256;
/// One change with its place in its origin's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    pub origin: NodeId,
    pub sequence: u64,
    pub doc_key: Vec<u8>,
    /// The change in Automerge's binary change format.
    pub change: Vec<u8>,
}

/// Entries of one origin's log, as one read of it found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogPage {
    /// The entries the reader may read, with their changes.
    pub changes: Vec<LoggedChange>,
    /// The place up to which the log was looked through.
    pub through: u64,
    /// Places (in order) whose changes lie inside their documents' compacted histories.
    pub compacted: Vec<u64>,
    /// For the changes served that were refused here for depending on a change that lost a
    /// collision: that change and any refused between them, with their documents (see
    /// [`DocStore::refused_dependencies`]). A receiver that never met them needs them to
    /// decide about the served changes as this node did.
    pub refused_dependencies: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<S: Store> DocStore<S> {
    /// For every origin held, the sequence up to which its whole log is held.
    pub fn origin_marks(&self) -> Vec<(NodeId, u64)> {
        self.inner()
            .origins
            .iter()
            .map(|(origin, progress)| (*origin, progress.contiguous))
            .collect()
    }

    /// The sequence up to which `origin`'s whole log is held (0 for an unknown origin).
    pub fn origin_mark(&self, origin: &NodeId) -> u64 {
        self.inner()
            .origins
            .get(origin)
            .map_or(0, |progress| progress.contiguous)
    }

    /// The hash of the change at `(origin, sequence)` of the log, if held.
    pub fn log_hash(
        &self,
        origin: &NodeId,
        sequence: u64,
    ) -> Result<Option<ChangeHash>, StoreError> {
        let Some(value) = self.backend().get(&layout::log_key(origin, sequence))? else {
            return Ok(None);
        };
        let entry = layout::decode_log_entry(&value)?;
        Ok(Some(ChangeHash(entry.hash)))
    }

    /// Entries of `origin`'s log after `after`, with their change bytes: at most `limit`, and
    /// no more once `bytes_max` bytes of changes are gathered (the entry that crosses it is
    /// included, so a page is never empty while the log has entries).
    pub fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        Ok(self
            .log_readable_after(None, origin, after, limit, bytes_max)?
            .changes)
    }

    /// [`DocStore::log_after`] of what `reader` may read (all, for `None`), with the place up
    /// to which the log was looked through: the entries it skipped, being outside the reader's
    /// grant, cost neither bytes nor a read of their document (their log entries' tags
    /// tell, [`layout::LogEntry::tags`]). At most `limit` entries are looked through.
    pub fn log_readable_after(
        &self,
        reader: Option<&NodeId>,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<LogPage, StoreError> {
        let entries = self.log_entries(origin, after, limit)?;
        let door = reader.and(self.door.get()).filter(|door| !door.is_open());
        let reader = reader.filter(|reader| door.is_some_and(|door| !door.reads_all(reader)));
        let mut found = Vec::with_capacity(entries.len());
        let mut compacted = Vec::new();
        let mut refused_dependencies = Vec::new();
        let mut bytes = 0usize;
        let mut looked_through = after;
        // Appended changes are read from their document's stored value, read once for a run of
        // entries of one document, or from their own `C` key; a change compacted into a
        // snapshot needs its document loaded.
        let mut last: Option<(Vec<u8>, Option<layout::StoredDoc>)> = None;
        // Taken at the first change that needs its document loaded, then kept for the page:
        // one wait behind writers per page, not one per change.
        let mut inner = None;
        for (sequence, entry) in entries {
            if !found.is_empty() && bytes >= bytes_max {
                break;
            }
            if let (Some(reader), Some(door)) = (reader, door) {
                let collection = super::documents::collection_of(&entry.doc_key);
                let readable = match door.may_read_tagged(reader, collection, &entry.tags) {
                    Some(readable) => readable,
                    // Logged before a filter named its fields: the record as it stands says.
                    None => {
                        // It takes the lock itself.
                        inner = None;
                        self.may_read_document(reader, &entry.doc_key)?
                    }
                };
                if !readable {
                    looked_through = sequence;
                    continue;
                }
            }
            if last
                .as_ref()
                .is_none_or(|(doc_key, _)| *doc_key != entry.doc_key)
            {
                let stored = self
                    .backend()
                    .get(&layout::doc_key(&entry.doc_key))?
                    .map(|value| layout::StoredDoc::decode(&value))
                    .transpose()?;
                last = Some((entry.doc_key.clone(), stored));
            }
            let hash = ChangeHash(entry.hash);
            let stored = last.as_mut().and_then(|(_, stored)| stored.as_mut());
            let appended = self.appended_change(stored, &entry.doc_key, &hash)?;
            let change = match appended {
                Some(change) => change,
                None => match self.change_elsewhere(
                    &mut inner,
                    origin,
                    sequence,
                    &entry.doc_key,
                    &hash,
                    &mut refused_dependencies,
                )? {
                    Elsewhere::Found(change) => change,
                    Elsewhere::Skipped => {
                        looked_through = sequence;
                        continue;
                    }
                    Elsewhere::Compacted => {
                        compacted.push(sequence);
                        looked_through = sequence;
                        continue;
                    }
                },
            };
            bytes += change.len();
            looked_through = sequence;
            found.push(LoggedChange {
                origin: *origin,
                sequence,
                doc_key: entry.doc_key,
                change,
            });
        }
        Ok(LogPage {
            changes: found,
            through: looked_through,
            compacted,
            refused_dependencies,
        })
    }

    /// A change appended to its document since its snapshot: from the document's stored
    /// value (`stored`, read once for a run of entries of one document; each change is one
    /// log entry, so it is taken, not copied), or under a `C` key of its own (a document with
    /// a long history).
    fn appended_change(
        &self,
        stored: Option<&mut layout::StoredDoc>,
        doc_key: &[u8],
        hash: &ChangeHash,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let inline = stored.and_then(|stored| {
            let at = stored
                .changes
                .iter()
                .position(|change| layout::change_hash(change).as_ref() == Some(hash))?;
            Some(std::mem::take(&mut stored.changes[at]))
        });
        match inline {
            Some(change) => Ok(Some(change)),
            None => self.backend().get(&layout::appended_key(doc_key, hash)),
        }
    }

    /// The bytes of a logged change that neither its document's stored value nor a `C` key
    /// of its own holds: from the document itself, the changes refused here (with the refused
    /// changes it depends on added to `refused_dependencies`, which follow it), or this
    /// node's own changes kept from a record it withdrew. `inner` is taken at the first
    /// change that needs its document loaded, and kept for the page.
    fn change_elsewhere<'a>(
        &'a self,
        inner: &mut Option<parking_lot::MutexGuard<'a, super::documents::Inner>>,
        origin: &NodeId,
        sequence: u64,
        doc_key: &[u8],
        hash: &ChangeHash,
        refused_dependencies: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Elsewhere, StoreError> {
        let (held, has_epoch) = {
            let inner = inner.get_or_insert_with(|| self.inner());
            let loaded = self.loaded(inner, doc_key)?;
            (
                loaded
                    .doc
                    .change(hash)
                    .map(|change| change.raw_bytes().to_vec()),
                loaded.doc.epoch().is_some(),
            )
        };
        if let Some(change) = held {
            return Ok(Elsewhere::Found(change));
        }
        // A change refused here keeps its place, and is served from where refused changes
        // are kept: its receiver decides about it alike.
        if let Some(change) = self.refused_bytes(doc_key, hash)? {
            for dependency in self.refused_dependencies(doc_key, hash)? {
                refused_dependencies.push((doc_key.to_vec(), dependency));
            }
            return Ok(Elsewhere::Found(change));
        }
        if self.refused_contains(doc_key, hash)? {
            // Refused past the budget for keeping refused changes.
            return Ok(Elsewhere::Skipped);
        }
        // Withdrawn here once (it left this node's read scope): this node's own changes to it
        // are kept, even after the record came back without one of them.
        if let Some(change) = self.backend().get(&layout::kept_key(doc_key, hash))? {
            return Ok(Elsewhere::Found(change));
        }
        if self.backend().get(&layout::kept_prefix(doc_key))?.is_some() {
            return Ok(Elsewhere::Skipped);
        }
        // Logged when it was applied, neither refused nor withdrawn: compacted since.
        if has_epoch {
            return Ok(Elsewhere::Compacted);
        }
        Err(StoreError::Corrupt(format!(
            "log entry {origin}:{sequence} names a change {hash} its document {} lacks",
            String::from_utf8_lossy(doc_key)
        )))
    }

    /// One step of giving the log entries logged before a read filter named a field of their
    /// collection the values of the fields filters name now, so that a sender tells a
    /// narrowed reader's changes by their tags instead of loading every document (see
    /// [`DocStore::log_readable_after`]): at most [`RETAG_ENTRIES_PER_STEP`] entries after the
    /// log key `after`, under the store's lock, so writers wait for one step at most. A
    /// missing field takes the record's value as it stands here, which is what a sender
    /// reads from the record when the tag lacks it; the values an entry was logged with stay.
    /// Returns where the next step starts (`None`: the whole log is done) and how many entries
    /// were rewritten. Not flushed: an entry a crash loses its new tags for is judged by its
    /// record again.
    pub fn retag_log_step(
        &self,
        after: Option<&[u8]>,
    ) -> Result<(Option<Vec<u8>>, usize), StoreError> {
        let Some(door) = self.door.get().filter(|door| !door.is_open()) else {
            return Ok((None, 0));
        };
        let inner = self.inner();
        let page = self
            .backend()
            .scan_prefix(layout::LOG_PREFIX, after, RETAG_ENTRIES_PER_STEP)?;
        let mut batch = super::Batch::default();
        let mut current: HashMap<Vec<u8>, layout::ScopeTag> = HashMap::new();
        for (key, value) in &page {
            let mut entry = layout::decode_log_entry(value)?;
            let fields = door.filter_fields(super::documents::collection_of(&entry.doc_key));
            let lacks = |tag: &layout::ScopeTag| {
                fields
                    .iter()
                    .any(|field| !tag.iter().any(|(name, _)| name == field))
            };
            if fields.is_empty() || !entry.tags.is_empty() && !entry.tags.iter().any(lacks) {
                continue;
            }
            let now = match current.get(&entry.doc_key) {
                Some(tag) => tag.clone(),
                None => {
                    let tag = match inner.cache.peek(&entry.doc_key) {
                        Some(loaded) => super::session::scope_tag(loaded.doc.local(), &fields),
                        None => super::session::scope_tag(
                            self.load(&entry.doc_key)?.doc.local(),
                            &fields,
                        ),
                    };
                    current.insert(entry.doc_key.clone(), tag.clone());
                    tag
                }
            };
            if entry.tags.is_empty() {
                entry.tags.push(now);
            } else {
                for tag in &mut entry.tags {
                    for (field, value) in &now {
                        if !tag.iter().any(|(name, _)| name == field) {
                            tag.push((field.clone(), value.clone()));
                        }
                    }
                }
            }
            batch.put(key.clone(), layout::encode_log_entry(&entry));
        }
        let rewritten = batch.len();
        if rewritten > 0 {
            self.take_room(batch.bytes())?;
            self.backend().apply(batch)?;
        }
        drop(inner);
        let next = (page.len() == RETAG_ENTRIES_PER_STEP)
            .then(|| page.last().map(|(key, _)| key.clone()))
            .flatten();
        Ok((next, rewritten))
    }

    /// Whether `reader` may read the document of `doc_key` as it stands here (a missing or
    /// deleted record only under a scope of its whole collection).
    pub fn may_read_document(&self, reader: &NodeId, doc_key: &[u8]) -> Result<bool, StoreError> {
        if self.reads_all(reader) {
            return Ok(true);
        }
        let mut inner = self.inner();
        self.may_read_locked(&mut inner, reader, doc_key)
    }

    /// [`Self::may_read_document`] with the store's lock already held.
    pub(super) fn may_read_locked(
        &self,
        inner: &mut super::documents::Inner,
        reader: &NodeId,
        doc_key: &[u8],
    ) -> Result<bool, StoreError> {
        let Some(door) = self.door.get().filter(|door| !door.is_open()) else {
            return Ok(true);
        };
        if door.reads_all(reader) {
            return Ok(true);
        }
        let collection = super::documents::collection_of(doc_key);
        if let Some(readable) = door.may_read_tagged(reader, collection, &[Vec::new()]) {
            return Ok(readable);
        }
        let loaded = self.loaded(inner, doc_key)?;
        let fields = document::read(loaded.doc.local());
        Ok(fields.is_some_and(|fields| door.may_read(reader, collection, &fields)))
    }

    /// Whether `reader` may read every record (no grant narrows it).
    pub fn reads_all(&self, reader: &NodeId) -> bool {
        self.door
            .get()
            .filter(|door| !door.is_open())
            .is_none_or(|door| door.reads_all(reader))
    }

    /// Whether `wider` may read every record `narrower` may read.
    pub fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool {
        self.door
            .get()
            .filter(|door| !door.is_open())
            .is_none_or(|door| door.reads_at_least(wider, narrower))
    }

    /// Whether `node` was revoked.
    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.door
            .get()
            .filter(|door| !door.is_open())
            .is_some_and(|door| door.is_revoked(node))
    }

    /// Whether `node` was removed from the cluster (removals leave the door open).
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.door.get().is_some_and(|door| door.is_removed(node))
    }

    /// Whether the log holds `(origin, sequence)`.
    pub fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool {
        self.inner()
            .origins
            .get(origin)
            .is_some_and(|progress| progress.holds(sequence))
    }

    /// A sender's word that nothing of `origin`'s log after `after` up to `through` is this
    /// node's to read: the mark moves to `through` if it stands at `after` or beyond, else
    /// once it gets there (see [`super::progress::OriginProgress::cover_run`]). The mark a
    /// cover moved is kept across restarts.
    pub fn cover(&self, origin: &NodeId, after: u64, through: u64) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        let progress = inner.origins.entry(*origin).or_default();
        let before = progress.contiguous;
        progress.cover_run(after, through);
        let mark = progress.contiguous;
        if mark == before {
            return Ok(false);
        }
        drop(inner);
        let mut batch = super::Batch::default();
        batch.put(layout::cover_key(origin), mark.to_be_bytes().to_vec());
        self.backend().apply(batch)?;
        Ok(true)
    }
}

/// Where [`DocStore::change_elsewhere`] found a logged change.
enum Elsewhere {
    /// Its bytes.
    Found(Vec<u8>),
    /// Not served: refused past the budget for keeping refused changes, or withdrawn here
    /// without being kept.
    Skipped,
    /// Compacted into its document's snapshot since it was logged.
    Compacted,
}
