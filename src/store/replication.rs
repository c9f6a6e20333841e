//! What replication asks of the document store: the log by origin, and applying changes that
//! arrive from peers.
//!
//! Guarantees: a remote change is logged at the place its origin gave it; a change already held
//! (same hash) is not applied twice, only its log place is recorded, so the origin's mark can
//! advance; a change whose dependencies are missing is handed back, never applied and never
//! logged, so it is asked for again rather than lost; everything applied is durable before
//! [`DocStore::apply_remote`] returns, so it can be relayed at once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::{Change, ChangeHash, ReadDoc};

use super::collision;
use super::digest::{self, Aggregate};
use super::documents::{for_each_entry, LogPlace, NewChange};
use super::layout::{self, RefusalReason};
use super::{DocStore, Durability, Store, StoreError};
use crate::record::stamp::ChangeStamp;
use crate::record::{document, NodeId, RecordId};

/// Most log entries one step of [`DocStore::retag_log_step`] looks through.
pub const RETAG_ENTRIES_PER_STEP: usize = 256;
/// Documents taken out in one write batch by [`DocStore::withdraw`].
pub const WITHDRAW_SESSION_DOCUMENTS: usize = 256;

/// One change with its place in its origin's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    pub origin: NodeId,
    pub sequence: u64,
    pub doc_key: Vec<u8>,
    /// The change in Automerge's binary change format.
    pub change: Vec<u8>,
}

/// What the door says of a change from elsewhere (see [`DocStore::judge_incoming`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Admit,
    /// Not applied now, nor refused: it is decided once it comes with its log place.
    Wait,
    /// Refused for this reason (`instead`: the refused change it depends on, if that is why).
    Refuse(RefusalReason, ChangeHash),
}

/// Of changes judged by the door: those admitted, then those refused, each with its item (the
/// ones that wait are neither).
type Admitted<T> = (Vec<(T, Change)>, Vec<(T, Change)>);

/// One document's changes in a batch from a peer, parsed, in arrival order.
type Group = Vec<(LoggedChange, Change)>;

/// A document key and its heads.
pub type DocumentHeadsEntry = (Vec<u8>, Vec<ChangeHash>);

/// What became of a batch of remote changes.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// New here: applied and logged (relay these).
    pub applied: Vec<LoggedChange>,
    /// Records these changes took out of this narrowed node's read scope: kept until a node
    /// that reads everything withdraws them.
    pub left_scope: Vec<Vec<u8>>,
    /// Already held: by log place, or by hash (then only the log place was recorded).
    pub duplicates: usize,
    /// Dependencies not here yet: nothing was written for these.
    pub missing_dependencies: Vec<LoggedChange>,
    /// Not a valid change or document key, with the reason.
    pub invalid: Vec<(LoggedChange, String)>,
    /// Fields that became conflicting (concurrent values) with these changes.
    pub conflicts: Vec<NewConflict>,
    /// Changes refused by the rule for colliding changes (see [`super::collision`]), this
    /// batch's and those a change of it took out, with why.
    pub refused: Vec<RefusalReason>,
    /// A change refused or taken out was written under this store's current writer: another
    /// store writes under it too, or this one was brought back from an older copy. The node
    /// must take a new writer (and then write again what it lost: [`DocStore::reissue_pending`]).
    pub own_writer_shared: bool,
    /// A revocation took out a change written under this store's current writer: the node
    /// must take a new writer before it writes again (and then write again what it lost).
    pub own_writes_taken_out: bool,
    /// Changes that came with a log place this store holds with another change: applied
    /// without a place, by the rule for colliding changes.
    pub places_taken: usize,
    /// Changes stamped further ahead of this node's clock than it accepts: nothing was written
    /// for these (their senders send them again).
    pub ahead: Vec<LoggedChange>,
}

/// A change's clock: its stamp's, in ms since the Unix epoch.
pub fn clock_of(change: &Change) -> u64 {
    ChangeStamp::of_change(change.message(), change.timestamp()).hlc
}

/// The hash of a change in Automerge's binary format.
fn change_hash_of(bytes: &[u8]) -> Option<ChangeHash> {
    layout::change_hash(bytes).or_else(|| {
        Change::from_bytes(bytes.to_vec())
            .ok()
            .map(|change| change.hash())
    })
}

/// What became of changes fetched for a document outside the log.
#[derive(Debug, Default)]
pub struct UnloggedOutcome {
    /// Changes new here, applied.
    pub new: usize,
    /// Changes refused, with why (see [`ApplyReport::refused`]).
    pub refused: Vec<RefusalReason>,
    /// See [`ApplyReport::own_writer_shared`].
    pub own_writer_shared: bool,
    /// Changes left out, stamped further ahead of this node's clock than it accepts.
    pub ahead: usize,
}

/// What becomes of a change of a revoked node that comes without its log place, whose
/// place decides whether it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplaced {
    /// Refused: an import, which no log place ever follows.
    Refuse,
    /// Neither admitted nor refused, with what depends on it: it waits until it comes with
    /// its place, which decides it, as on every other node.
    Wait,
    /// Admitted as within the cut-off: a peer that reads every record holds it, so it
    /// judged it by its place, and the place itself may never come to this narrowed node
    /// (senders cover what it may not read).
    Vouched,
}

/// What became of one change tried alone against a document.
enum Tried {
    Applied,
    /// Refused (now or before): only its log place is kept.
    Refused,
    Invalid(String),
}

/// A field that became conflicting as a remote change was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConflict {
    pub collection: String,
    pub field: String,
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
            .0)
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
    ) -> Result<(Vec<LoggedChange>, u64), StoreError> {
        let entries = self.log_entries(origin, after, limit)?;
        let door = reader.and(self.door.get()).filter(|door| !door.is_open());
        let reader = reader.filter(|reader| door.is_some_and(|door| !door.reads_all(reader)));
        let mut found = Vec::with_capacity(entries.len());
        let mut bytes = 0usize;
        let mut looked_through = after;
        // Appended changes are read from their document's stored value, read once for a run of
        // entries of one document; a change compacted into a snapshot needs its document
        // loaded.
        let mut last: Option<(Vec<u8>, Option<layout::StoredDoc>)> = None;
        for (sequence, entry) in entries {
            if !found.is_empty() && bytes >= bytes_max {
                break;
            }
            if let (Some(reader), Some(door)) = (reader, door) {
                let collection = super::documents::collection_of(&entry.doc_key);
                let readable = match door.may_read_tagged(reader, collection, &entry.tags) {
                    Some(readable) => readable,
                    // Logged before a filter named its fields: the record as it stands says.
                    None => self.may_read_document(reader, &entry.doc_key)?,
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
                    .map(|value| layout::decode::<layout::StoredDoc>("document", &value))
                    .transpose()?;
                last = Some((entry.doc_key.clone(), stored));
            }
            let hash = ChangeHash(entry.hash);
            let appended =
                last.as_mut()
                    .and_then(|(_, stored)| stored.as_mut())
                    .and_then(|stored| {
                        let at = stored.changes.iter().position(|change| {
                            layout::change_hash(change).as_ref() == Some(&hash)
                        })?;
                        // Each change is one log entry: taken, not copied.
                        Some(std::mem::take(&mut stored.changes[at]))
                    });
            let change = match appended {
                Some(change) => change,
                None => {
                    let held = {
                        let mut inner = self.inner();
                        let loaded = self.loaded(&mut inner, &entry.doc_key)?;
                        loaded
                            .doc
                            .get_change_by_hash(&hash)
                            .map(|change| change.raw_bytes().to_vec())
                    };
                    match held {
                        Some(change) => change,
                        // A change refused here keeps its place, and is served from where
                        // refused changes are kept: its receiver decides about it alike.
                        None => match self.refused_bytes(&entry.doc_key, &hash)? {
                            Some(change) => change,
                            None if self.refused_contains(&entry.doc_key, &hash)? => {
                                // Refused past the budget for keeping refused changes.
                                looked_through = sequence;
                                continue;
                            }
                            None => {
                                // Withdrawn here once (it left this node's read scope): this
                                // node's own changes to it are kept, even after the record
                                // came back without one of them.
                                let kept = self
                                    .backend()
                                    .get(&layout::kept_key(&entry.doc_key, &hash))?;
                                match kept {
                                    Some(change) => change,
                                    None if self
                                        .backend()
                                        .get(&layout::kept_prefix(&entry.doc_key))?
                                        .is_some() =>
                                    {
                                        looked_through = sequence;
                                        continue;
                                    }
                                    None => {
                                        return Err(StoreError::Corrupt(format!(
                                            "log entry {origin}:{sequence} names a change \
                                             {hash} its document {} lacks",
                                            String::from_utf8_lossy(&entry.doc_key)
                                        )))
                                    }
                                }
                            }
                        },
                    }
                }
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
        Ok((found, looked_through))
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
            .scan_prefix(&[layout::TAG_LOG], after, RETAG_ENTRIES_PER_STEP)?;
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
                        Some(loaded) => super::documents::scope_tag(&loaded.doc, &fields),
                        None => {
                            super::documents::scope_tag(&self.load(&entry.doc_key)?.doc, &fields)
                        }
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
    fn may_read_locked(
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
        let fields = document::read(&loaded.doc);
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

    /// Whether the log holds `(origin, sequence)`.
    pub fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool {
        self.inner()
            .origins
            .get(origin)
            .is_some_and(|progress| progress.holds(sequence))
    }

    /// A sender's word that nothing of `origin`'s log after `after` up to `through` is this
    /// node's to read: the mark moves to `through` if it stands at `after` or beyond, else
    /// once it gets there (see [`super::documents::OriginProgress::cover_run`]). The mark a
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

    /// Applies changes received from a peer and says what became of each. Changes to one
    /// document are applied together, in one Automerge call, and the document is saved once.
    /// Not yet durable when it returns: the caller makes it so ([`DocStore::sync`]) before
    /// anything that depends on these changes leaves the node.
    /// A change whose clock is past `accept_until_ms` (ms since the Unix epoch: the receiver's
    /// clock and the bound it allows) is not applied, nor given its place: it is handed back in
    /// [`ApplyReport::ahead`], and its sender sends it again, until it is no longer ahead.
    pub fn apply_remote(
        &self,
        changes: Vec<LoggedChange>,
        accept_until_ms: u64,
    ) -> Result<ApplyReport, StoreError> {
        let mut report = ApplyReport::default();
        let mut session = self.session();
        let mut groups: Vec<(Vec<u8>, Group)> = Vec::new();
        let mut group_of: HashMap<Vec<u8>, usize> = HashMap::new();
        // Per place met in this batch, the change's checksum (the first four bytes of its
        // hash, in its header): telling a change sent twice from another one at its place
        // costs no hashing. Two changes alike in those four bytes are taken as one; were they
        // not, the repair of documents by their heads brings the other.
        let mut seen: HashMap<(NodeId, u64), Option<[u8; 4]>> = HashMap::new();
        let mut places_taken: Vec<LoggedChange> = Vec::new();
        for logged in changes {
            let place = (logged.origin, logged.sequence);
            let checksum = layout::change_checksum(&logged.change);
            if let Some(first) = seen.get(&place) {
                // Twice in one batch: the same change is a duplicate; another one at the same
                // place (two stores wrote under one writer, and both reached this node at
                // once) goes on by the rule for colliding changes, like one met later.
                if *first == checksum {
                    report.duplicates += 1;
                } else {
                    places_taken.push(logged);
                }
                continue;
            }
            seen.insert(place, checksum);
            if session.log_holds(&logged.origin, logged.sequence) {
                // The same place with another change is no duplicate: two stores wrote under
                // one writer. The change goes on without a place, by the rule for colliding
                // changes.
                let held = if session.places.contains(&place) {
                    None
                } else {
                    self.log_hash(&logged.origin, logged.sequence)?
                };
                let covered_here = held.is_none() && !session.places.contains(&place);
                if held.is_some_and(|held| change_hash_of(&logged.change) != Some(held)) {
                    if logged.origin == session.inner.writers.current {
                        report.own_writer_shared = true;
                    }
                    places_taken.push(logged);
                    continue;
                }
                if !covered_here {
                    report.duplicates += 1;
                    continue;
                }
                // A place a sender covered (it judged the change outside this node's grant
                // by the record as it held it then), and another sends the change: it is
                // applied and logged there like any other; held already, it is a duplicate.
            }
            if let Err(error) = RecordId::from_doc_key(&logged.doc_key) {
                report.invalid.push((logged, error.to_string()));
                continue;
            }
            let change = match Change::from_bytes(logged.change.clone()) {
                Ok(change) => change,
                Err(error) => {
                    report.invalid.push((logged, error.to_string()));
                    continue;
                }
            };
            if clock_of(&change) > accept_until_ms {
                report.ahead.push(logged);
                continue;
            }
            match group_of.get(&logged.doc_key) {
                Some(&index) => groups[index].1.push((logged, change)),
                None => {
                    group_of.insert(logged.doc_key.clone(), groups.len());
                    groups.push((logged.doc_key.clone(), vec![(logged, change)]));
                }
            }
        }
        for (doc_key, group) in groups {
            self.apply_group(&mut session, &doc_key, group, &mut report)?;
        }
        report.left_scope = std::mem::take(&mut session.left_scope)
            .into_iter()
            .collect();
        session.commit(Durability::Deferred)?;
        report.places_taken = places_taken.len();
        let mut by_doc: BTreeMap<Vec<u8>, Vec<LoggedChange>> = BTreeMap::new();
        for logged in places_taken {
            by_doc
                .entry(logged.doc_key.clone())
                .or_default()
                .push(logged);
        }
        for (doc_key, logged) in by_doc {
            let changes = logged.iter().map(|change| change.change.clone()).collect();
            match self.apply_unlogged(&doc_key, changes, accept_until_ms, Unplaced::Wait) {
                Ok(outcome) => {
                    report.refused.extend(outcome.refused);
                    report.own_writer_shared |= outcome.own_writer_shared;
                }
                Err(StoreError::InvalidDocument(reason)) => {
                    for change in logged {
                        report.invalid.push((change, reason.clone()));
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(report)
    }

    /// Applies one document's share of [`DocStore::apply_remote`]: duplicates only record
    /// their log place, changes whose dependencies are neither held nor among the group are
    /// handed back, the rest are applied in dependency order in one call.
    fn apply_group(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        group: Group,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        let loaded = session.document(doc_key)?;
        let mut fresh: Vec<(LoggedChange, Change)> = Vec::with_capacity(group.len());
        let mut duplicates = Vec::new();
        for (logged, change) in group {
            if document::holds_change(&loaded.doc, &change.hash()) {
                // Held already, fetched before its place came: its place may show that it
                // is past a revoked node's cut-off, and then it comes out.
                let revoked = self
                    .door
                    .get()
                    .filter(|door| !door.is_open())
                    .is_some_and(|door| {
                        let author =
                            ChangeStamp::of_change(change.message(), change.timestamp()).author();
                        let collection = String::from_utf8_lossy(doc_key);
                        let collection = collection.split('/').next().unwrap_or_default();
                        door.verdict(
                            author.as_ref(),
                            Some((logged.origin, logged.sequence)),
                            collection,
                        ) == Some(Err(RefusalReason::Revoked))
                    });
                duplicates.push((logged, change.hash(), revoked));
            } else {
                fresh.push((logged, change));
            }
        }
        if let [(_, change)] = fresh.as_slice() {
            // One change (the common case): ready if every dependency is held.
            let ready = change
                .deps()
                .iter()
                .all(|dependency| document::holds_change(&loaded.doc, dependency));
            let order = if ready { vec![0] } else { Vec::new() };
            return self.apply_ordered(session, doc_key, fresh, &order, duplicates, report);
        }
        // Kahn's order over the group: a change is ready once each dependency is held or is
        // a ready change of the group; one that waits on a hash found nowhere is blocked,
        // and so is everything that waits on it.
        let mut index_of: HashMap<ChangeHash, usize> = HashMap::with_capacity(fresh.len());
        for (index, (_, change)) in fresh.iter().enumerate() {
            index_of.entry(change.hash()).or_insert(index);
        }
        let mut unresolved = vec![0usize; fresh.len()];
        let mut blocked = vec![false; fresh.len()];
        let mut waiters: HashMap<usize, Vec<usize>> = HashMap::new();
        for (index, (_, change)) in fresh.iter().enumerate() {
            for dependency in change.deps() {
                if document::holds_change(&loaded.doc, dependency) {
                    continue;
                }
                match index_of.get(dependency) {
                    Some(&other) if other != index => {
                        unresolved[index] += 1;
                        waiters.entry(other).or_default().push(index);
                    }
                    _ => blocked[index] = true,
                }
            }
        }
        let mut queue: Vec<usize> = (0..fresh.len())
            .filter(|&index| unresolved[index] == 0 && !blocked[index])
            .collect();
        let mut order = Vec::with_capacity(fresh.len());
        let mut done = vec![false; fresh.len()];
        while let Some(index) = queue.pop() {
            if std::mem::replace(&mut done[index], true) {
                continue;
            }
            order.push(index);
            for &waiter in waiters.get(&index).map(Vec::as_slice).unwrap_or_default() {
                unresolved[waiter] -= 1;
                if unresolved[waiter] == 0 && !blocked[waiter] {
                    queue.push(waiter);
                }
            }
        }
        self.apply_ordered(session, doc_key, fresh, &order, duplicates, report)
    }

    /// The rest of [`DocStore::apply_group`]: records the duplicates' log places, applies the
    /// changes at `order` (indexes into `fresh`, in dependency order) in one Automerge call and
    /// hands the others back as missing their dependencies.
    fn apply_ordered(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        fresh: Group,
        order: &[usize],
        duplicates: Vec<(LoggedChange, ChangeHash, bool)>,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        let revoked: Vec<ChangeHash> = duplicates
            .iter()
            .filter(|(_, _, past_cut_off)| *past_cut_off)
            .map(|(_, hash, _)| *hash)
            .collect();
        self.apply_ordered_changes(session, doc_key, fresh, order, duplicates, report)?;
        // Held changes whose place came now, past a revoked node's cut-off, come out last,
        // with whatever this batch applied on top of them.
        if !revoked.is_empty() {
            let (taken_out, own) = session.take_out(doc_key, &revoked)?;
            report
                .refused
                .extend(std::iter::repeat_n(RefusalReason::Revoked, taken_out));
            report.own_writes_taken_out |= own;
        }
        Ok(())
    }

    /// [`DocStore::apply_ordered`] but the take-out.
    fn apply_ordered_changes(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        fresh: Group,
        order: &[usize],
        duplicates: Vec<(LoggedChange, ChangeHash, bool)>,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        for (logged, hash, _) in duplicates {
            let place = LogPlace::Remote {
                origin: logged.origin,
                sequence: logged.sequence,
            };
            session.queue_log_entry(doc_key, &hash, place, &[]);
            report.duplicates += 1;
        }
        let mut slots: Vec<Option<(LoggedChange, Change)>> = fresh.into_iter().map(Some).collect();
        let ready: Vec<(LoggedChange, Change)> = order
            .iter()
            .filter_map(|&index| slots[index].take())
            .collect();
        let (ready, refused) = self.admit(
            session,
            doc_key,
            ready,
            |logged| Some((logged.origin, logged.sequence)),
            Unplaced::Wait,
            report,
        )?;
        for (logged, change) in refused {
            // Refused by its author's grant: its log place is kept, as for any refused change.
            let place = LogPlace::Remote {
                origin: logged.origin,
                sequence: logged.sequence,
            };
            session.queue_log_entry(doc_key, &change.hash(), place, &[]);
        }
        for (logged, change) in slots.into_iter().flatten() {
            #[cfg(feature = "sabotage")]
            if self.sabotage.drop_held_changes {
                let place = LogPlace::Remote {
                    origin: logged.origin,
                    sequence: logged.sequence,
                };
                session.queue_log_entry(doc_key, &change.hash(), place, &[]);
                continue;
            }
            // A change that waits on a refused one is refused too, not asked for forever.
            if self.refuse_if_dependency_refused(session, doc_key, &change, report)? {
                let place = LogPlace::Remote {
                    origin: logged.origin,
                    sequence: logged.sequence,
                };
                session.queue_log_entry(doc_key, &change.hash(), place, &[]);
                continue;
            }
            report.missing_dependencies.push(logged);
        }
        if ready.is_empty() {
            return Ok(());
        }
        let loaded = session.document(doc_key)?;
        // A change to an empty document cannot conflict with anything.
        let was_empty = loaded.doc.get_heads().is_empty();
        let conflicts_before = if was_empty {
            BTreeSet::new()
        } else {
            document::conflicting_fields(&loaded.doc)
        };
        let applied = if loaded
            .doc
            .apply_changes(ready.iter().map(|(_, change)| change.clone()))
            .is_ok()
        {
            ready
        } else {
            // One of them is invalid, or collides with a change held: start again from the
            // stored document and apply them one at a time, so that only those are refused.
            session.forget(doc_key);
            let mut applied = Vec::with_capacity(ready.len());
            for (logged, change) in ready {
                match self.try_one(session, doc_key, &change, report)? {
                    Tried::Applied => applied.push((logged, change)),
                    Tried::Refused => {
                        let place = LogPlace::Remote {
                            origin: logged.origin,
                            sequence: logged.sequence,
                        };
                        session.queue_log_entry(doc_key, &change.hash(), place, &[]);
                    }
                    Tried::Invalid(reason) => report.invalid.push((logged, reason)),
                }
            }
            applied
        };
        if applied.is_empty() {
            return Ok(());
        }
        let loaded = session.document(doc_key)?;
        if !was_empty {
            let collection = String::from_utf8_lossy(doc_key);
            let collection = collection.split('/').next().unwrap_or_default();
            for field in document::conflicting_fields(&loaded.doc) {
                if !conflicts_before.contains(&field) {
                    report.conflicts.push(NewConflict {
                        collection: collection.to_owned(),
                        field,
                    });
                }
            }
        }
        let mut new = Vec::with_capacity(applied.len());
        for (logged, change) in &applied {
            // A change new here under this store's own writer was written by another store,
            // unless it is one of its own kept from a record it withdrew that came back.
            if !self.keeps_own_change(doc_key, &change.hash())? {
                self.note_own_writer(session, change, report);
            }
            let place = LogPlace::Remote {
                origin: logged.origin,
                sequence: logged.sequence,
            };
            new.push(NewChange {
                hash: change.hash(),
                place,
                bytes: Some(logged.change.clone()),
            });
        }
        session.queue_new_changes(doc_key, new)?;
        #[cfg(feature = "sabotage")]
        if self.sabotage.log_twice {
            for (logged, change) in &applied {
                if !session.log_holds(&logged.origin, logged.sequence + 1) {
                    let next = LogPlace::Remote {
                        origin: logged.origin,
                        sequence: logged.sequence + 1,
                    };
                    session.queue_log_entry(doc_key, &change.hash(), next, &[]);
                }
            }
        }
        report
            .applied
            .extend(applied.into_iter().map(|(logged, _)| logged));
        Ok(())
    }

    /// The verdicts of the door (see [`super::WriteDoor`]) on changes from elsewhere to the
    /// document `doc` of `doc_key`, each with its log place if it has one, in dependency order:
    /// each judged by its author's grant against the record as of its dependencies and as it
    /// leaves them, and one that depends on a refused change refused for that (`instead`: the
    /// refused dependency). `None` when there is no door or nothing is refused.
    /// `unplaced` says what becomes of a change of a revoked node that came without its log
    /// place (see [`Unplaced`]).
    pub(super) fn judge_incoming(
        &self,
        doc: &automerge::Automerge,
        doc_key: &[u8],
        changes: &[(Option<(NodeId, u64)>, &Change)],
        unplaced: Unplaced,
    ) -> Option<Vec<Verdict>> {
        #[cfg(feature = "sabotage")]
        if self.sabotage.receivers_admit_everything && unplaced != Unplaced::Refuse {
            return None;
        }
        let door = self.door.get().filter(|door| !door.is_open())?;
        let doc_key_text = String::from_utf8_lossy(doc_key);
        let collection = doc_key_text.split('/').next().unwrap_or_default();
        let mut early = Vec::with_capacity(changes.len());
        let mut places = Vec::with_capacity(changes.len());
        let mut decided = true;
        for (place, change) in changes {
            let author = ChangeStamp::of_change(change.message(), change.timestamp()).author();
            let place = match (place, &author) {
                (None, Some(author)) if unplaced == Unplaced::Vouched => door.counted_place(author),
                _ => *place,
            };
            let verdict = door.verdict(author.as_ref(), place, collection);
            decided &= verdict.is_some_and(|verdict| verdict.is_ok());
            early.push((author, verdict));
            places.push(place);
        }
        if decided {
            return None;
        }
        // The record as of each change's dependencies needs the changes admitted before it: a
        // scratch copy of the document takes them in.
        let mut scratch: Option<automerge::Automerge> = None;
        let mut refused: HashSet<ChangeHash> = HashSet::new();
        let mut waiting: HashSet<ChangeHash> = HashSet::new();
        let mut verdicts = Vec::with_capacity(changes.len());
        for (((_, change), (author, verdict)), place) in changes.iter().zip(early).zip(&places) {
            if let Some(dependency) = change
                .deps()
                .iter()
                .find(|dependency| refused.contains(dependency))
            {
                refused.insert(change.hash());
                verdicts.push(Verdict::Refuse(
                    RefusalReason::DependsOnRefused,
                    *dependency,
                ));
                continue;
            }
            let unplaced_revoked = unplaced == Unplaced::Wait
                && place.is_none()
                && matches!(verdict, Some(Err(RefusalReason::Revoked)));
            if unplaced_revoked || change.deps().iter().any(|dep| waiting.contains(dep)) {
                waiting.insert(change.hash());
                verdicts.push(Verdict::Wait);
                continue;
            }
            let scratch = scratch.get_or_insert_with(|| doc.clone());
            let heads = scratch.get_heads();
            // Whether the change is in `scratch` already, judged on top of it.
            let mut taken_in = false;
            let verdict = match verdict {
                Some(verdict) => verdict,
                None if heads == change.deps() => {
                    // Its dependencies are the document as it stands: the common case.
                    let before = document::read(&*scratch);
                    let _ = scratch.apply_changes([(*change).clone()]);
                    taken_in = true;
                    let after = document::read(&*scratch);
                    door.judge(
                        author.as_ref(),
                        *place,
                        collection,
                        before.as_ref(),
                        after.as_ref(),
                    )
                }
                None => {
                    let before = document::read_at(&*scratch, Some(change.deps()));
                    let after = scratch.fork_at(change.deps()).ok().and_then(|mut fork| {
                        let _ = fork.apply_changes([(*change).clone()]);
                        document::read(&fork)
                    });
                    door.judge(
                        author.as_ref(),
                        *place,
                        collection,
                        before.as_ref(),
                        after.as_ref(),
                    )
                }
            };
            match verdict {
                Ok(()) => {
                    if !taken_in {
                        let _ = scratch.apply_changes([(*change).clone()]);
                    }
                    verdicts.push(Verdict::Admit);
                }
                Err(reason) => {
                    if taken_in {
                        if let Ok(undone) = scratch.fork_at(&heads) {
                            *scratch = undone;
                        }
                    }
                    refused.insert(change.hash());
                    verdicts.push(Verdict::Refuse(reason, ChangeHash([0; 32])));
                }
            }
        }
        if refused.is_empty() && waiting.is_empty() {
            return None;
        }
        Some(verdicts)
    }

    /// Judges `ready` (changes to one document from elsewhere, in dependency order) by the
    /// door, records those it refuses as refused, and returns the rest, then the refused ones.
    fn admit<T>(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        ready: Vec<(T, Change)>,
        place_of: impl Fn(&T) -> Option<(NodeId, u64)>,
        unplaced: Unplaced,
        report: &mut ApplyReport,
    ) -> Result<Admitted<T>, StoreError> {
        let verdicts = {
            let loaded = session.document(doc_key)?;
            let judged: Vec<(Option<(NodeId, u64)>, &Change)> = ready
                .iter()
                .map(|(item, change)| (place_of(item), change))
                .collect();
            self.judge_incoming(&loaded.doc, doc_key, &judged, unplaced)
        };
        let Some(verdicts) = verdicts else {
            return Ok((ready, Vec::new()));
        };
        let mut admitted = Vec::with_capacity(ready.len());
        let mut refused = Vec::new();
        for ((item, change), verdict) in ready.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Admit => admitted.push((item, change)),
                Verdict::Wait => {}
                Verdict::Refuse(reason, instead) => {
                    session.refuse(doc_key, &change, reason, instead);
                    report.refused.push(reason);
                    refused.push((item, change));
                }
            }
        }
        Ok((admitted, refused))
    }

    /// Refuses `change` if one of its dependencies was refused here; says whether it did.
    fn refuse_if_dependency_refused(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<bool, StoreError> {
        for dependency in change.deps() {
            if session.refused_holds(doc_key, dependency)? {
                session.refuse(
                    doc_key,
                    change,
                    RefusalReason::DependsOnRefused,
                    *dependency,
                );
                report.refused.push(RefusalReason::DependsOnRefused);
                self.note_own_writer(session, change, report);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Marks the report if `change` was written under this store's current writer.
    fn note_own_writer(
        &self,
        session: &super::WriteSession<'_, S>,
        change: &Change,
        report: &mut ApplyReport,
    ) {
        let current = session.inner.writers.current;
        if NodeId::split_actor(change.actor_id()).is_some_and(|(writer, _)| writer == current) {
            report.own_writer_shared = true;
        }
    }

    /// Applies one change to the session's copy of a document, by the rule for colliding
    /// changes when the document holds another with its actor and sequence (see
    /// [`super::collision`]): the change that loses is refused, and a change held that loses
    /// is taken out with everything that depends on it, this node's own effects among them
    /// queued to be written again.
    fn try_one(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<Tried, StoreError> {
        if session.refused_holds(doc_key, &change.hash())? {
            return Ok(Tried::Refused);
        }
        if self.refuse_if_dependency_refused(session, doc_key, change, report)? {
            return Ok(Tried::Refused);
        }
        let writers = session.inner.writers.clone();
        let loaded = session.document(doc_key)?;
        let held = match loaded.doc.apply_changes([change.clone()]) {
            Ok(()) if document::holds_change(&loaded.doc, &change.hash()) => {
                return Ok(Tried::Applied)
            }
            Ok(()) => return Ok(Tried::Invalid("its dependencies were refused".to_owned())),
            Err(automerge::AutomergeError::DuplicateSeqNumber(seq, actor)) => {
                match collision::held_at(&loaded.doc, &actor, seq) {
                    Some(held) => held,
                    None => {
                        return Ok(Tried::Invalid(format!(
                            "actor {actor} already has sequence {seq} in this document"
                        )))
                    }
                }
            }
            Err(error) => return Ok(Tried::Invalid(error.to_string())),
        };
        #[cfg(feature = "sabotage")]
        let stands =
            collision::stands_against(change, &held) && !self.sabotage.first_arrival_stands;
        #[cfg(not(feature = "sabotage"))]
        let stands = collision::stands_against(change, &held);
        if !stands {
            session.refuse(
                doc_key,
                change,
                RefusalReason::DuplicateSequence,
                held.hash(),
            );
            report.refused.push(RefusalReason::DuplicateSequence);
            self.note_own_writer(session, change, report);
            return Ok(Tried::Refused);
        }
        // The change held loses: out it goes, with what depends on it, and what this node's
        // own writers did in those changes is kept to be written again.
        let (rebuilt, removed) = collision::without(&loaded.doc, &[held.hash()])?;
        let mut effects = Vec::new();
        let mut replaces = Vec::new();
        for taken in &removed {
            if let Some((writer, source)) = NodeId::split_actor(taken.actor_id()) {
                if writers.owns(&writer) {
                    effects.push((
                        source,
                        document::describe_change(&loaded.doc, taken.deps(), taken.hash()),
                    ));
                    replaces.push(taken.hash());
                }
            }
        }
        for (index, taken) in removed.iter().enumerate() {
            let (reason, instead) = if index == 0 {
                (RefusalReason::DuplicateSequence, change.hash())
            } else {
                (RefusalReason::DependsOnRefused, held.hash())
            };
            self.note_own_writer(session, taken, report);
            session.refuse(doc_key, taken, reason, instead);
            report.refused.push(reason);
        }
        session.replace_document(doc_key, rebuilt)?;
        if !effects.is_empty() {
            session.queue_reissue(doc_key, effects, replaces)?;
        }
        let loaded = session.document(doc_key)?;
        match loaded.doc.apply_changes([change.clone()]) {
            Ok(()) if document::holds_change(&loaded.doc, &change.hash()) => Ok(Tried::Applied),
            Ok(()) => Ok(Tried::Invalid("its dependencies were refused".to_owned())),
            Err(error) => Ok(Tried::Invalid(error.to_string())),
        }
    }

    /// Changes of a document that are not ancestors of `have` (hashes it does not know are
    /// ignored), in dependency order: as many as fit in `bytes_max` bytes and `limit` changes.
    /// Says whether that is all of them.
    pub fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), StoreError> {
        let mut inner = self.inner();
        let loaded = self.loaded(&mut inner, doc_key)?;
        let known: Vec<ChangeHash> = have
            .iter()
            .filter(|hash| document::holds_change(&loaded.doc, hash))
            .copied()
            .collect();
        let all = loaded.doc.get_changes(&known);
        let mut taken = Vec::new();
        let mut bytes = 0usize;
        for change in &all {
            let size = change.raw_bytes().len();
            if taken.len() >= limit || bytes + size > bytes_max {
                break;
            }
            bytes += size;
            taken.push(change.raw_bytes().to_vec());
        }
        let complete = taken.len() == all.len();
        Ok((taken, complete))
    }

    /// Applies changes fetched for a document outside the log (dependencies asked for), in
    /// any order: each is applied once its dependencies are, colliding ones by the rule (see
    /// [`super::collision`]). Not yet durable when it returns, as [`DocStore::apply_remote`].
    pub fn apply_unlogged(
        &self,
        doc_key: &[u8],
        changes: Vec<Vec<u8>>,
        accept_until_ms: u64,
        unplaced: Unplaced,
    ) -> Result<UnloggedOutcome, StoreError> {
        if RecordId::from_doc_key(doc_key).is_err() {
            return Err(StoreError::InvalidDocument(format!(
                "{:?} is not a record id",
                String::from_utf8_lossy(doc_key)
            )));
        }
        let mut parsed = Vec::with_capacity(changes.len());
        for bytes in changes {
            parsed.push(
                Change::from_bytes(bytes)
                    .map_err(|error| StoreError::InvalidDocument(error.to_string()))?,
            );
        }
        let mut session = self.session();
        let mut fresh = Vec::with_capacity(parsed.len());
        let mut ahead = 0;
        for change in parsed {
            if clock_of(&change) > accept_until_ms {
                ahead += 1;
                continue;
            }
            if !session.refused_holds(doc_key, &change.hash())? {
                fresh.push(change);
            }
        }
        let loaded = session.document(doc_key)?;
        let mut pending: Vec<Change> = fresh
            .into_iter()
            .filter(|change| !document::holds_change(&loaded.doc, &change.hash()))
            .collect();
        // Only changes whose dependencies are all present (or among these) are applied;
        // Automerge would queue the rest in memory, where a crash or an eviction loses them.
        let mut ready: Vec<Change> = Vec::new();
        let mut ready_hashes: HashSet<ChangeHash> = HashSet::new();
        loop {
            let (now_ready, still): (Vec<Change>, Vec<Change>) =
                pending.into_iter().partition(|change| {
                    change.deps().iter().all(|dependency| {
                        document::holds_change(&loaded.doc, dependency)
                            || ready_hashes.contains(dependency)
                    })
                });
            pending = still;
            if now_ready.is_empty() {
                break;
            }
            ready_hashes.extend(now_ready.iter().map(Change::hash));
            ready.extend(now_ready);
        }
        let mut report = ApplyReport::default();
        // What waits on a refused change is refused too.
        for change in pending {
            self.refuse_if_dependency_refused(&mut session, doc_key, &change, &mut report)?;
        }
        let (admitted, _) = self.admit(
            &mut session,
            doc_key,
            ready.into_iter().map(|change| ((), change)).collect(),
            |_| None,
            unplaced,
            &mut report,
        )?;
        let ready: Vec<Change> = admitted.into_iter().map(|(_, change)| change).collect();
        let mut outcome = UnloggedOutcome::default();
        if !ready.is_empty() {
            match session.apply_and_queue(doc_key, ready.clone(), LogPlace::Unlogged) {
                Ok(applied) => outcome.new = applied.new_changes,
                Err(StoreError::InvalidDocument(_)) => {
                    // A change collides with one held, or is invalid: one at a time, from the
                    // stored document.
                    session.forget(doc_key);
                    let mut applied = Vec::new();
                    for change in ready {
                        match self.try_one(&mut session, doc_key, &change, &mut report)? {
                            Tried::Applied => applied.push(NewChange {
                                hash: change.hash(),
                                place: LogPlace::Unlogged,
                                bytes: Some(change.raw_bytes().to_vec()),
                            }),
                            Tried::Refused => {}
                            Tried::Invalid(reason) => {
                                return Err(StoreError::InvalidDocument(reason));
                            }
                        }
                    }
                    outcome.new = applied.len();
                    if !applied.is_empty() {
                        session.queue_new_changes(doc_key, applied)?;
                    }
                }
                Err(error) => return Err(error),
            }
        }
        outcome.refused = report.refused;
        outcome.own_writer_shared = report.own_writer_shared;
        outcome.ahead = ahead;
        session.commit(Durability::Deferred)?;
        Ok(outcome)
    }

    /// A document's heads (empty if never written).
    pub fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
        // From the stored form (its heads are those of the document it holds: a load checks
        // so): repair asks this of every document a peer lists, and building each one in
        // Automerge cost most of a round.
        let inner = self.inner();
        if let Some(loaded) = inner.cache.peek(doc_key) {
            return Ok(loaded.stored.change_hashes());
        }
        let stored = self.store.get(&layout::doc_key(doc_key))?;
        drop(inner);
        match stored {
            Some(bytes) => {
                Ok(layout::decode::<layout::StoredDoc>("document", &bytes)?.change_hashes())
            }
            None => Ok(Vec::new()),
        }
    }

    /// The repair aggregate of a bucket (a hex prefix of 1 to 3 digits).
    pub fn digest(&self, prefix: &str) -> Option<Aggregate> {
        self.inner().digest.get(prefix)
    }

    /// The repair aggregate of a bucket over the documents `reader` may read, as they stand
    /// here ([`DocStore::may_read_document`]); the whole store's when nothing narrows
    /// `reader`. Built by one scan of the store and kept until a commit changes any heads or
    /// the reader's scopes change, so a repair round between nodes in step costs no scan.
    pub fn scoped_digest(
        &self,
        reader: &NodeId,
        prefix: &str,
    ) -> Result<Option<Aggregate>, StoreError> {
        let Some(door) = self.door.get().filter(|door| !door.is_open()) else {
            return Ok(self.digest(prefix));
        };
        if door.reads_all(reader) {
            return Ok(self.digest(prefix));
        }
        let scopes = door.read_scopes_key(reader);
        {
            let inner = self.inner();
            let cached = inner.scoped_digests.iter().find(|cached| {
                cached.reader == *reader
                    && cached.generation == inner.digest_generation
                    && cached.scopes == scopes
            });
            if let Some(cached) = cached {
                return Ok(cached.tree.get(prefix));
            }
        }
        let (tree, generation) = self.build_scoped_digest(reader)?;
        let aggregate = tree.get(prefix);
        let mut inner = self.inner();
        if let Some(generation) = generation {
            inner
                .scoped_digests
                .retain(|cached| cached.reader != *reader);
            if inner.scoped_digests.len() >= super::documents::SCOPED_DIGESTS_CACHED_MAX {
                inner.scoped_digests.remove(0);
            }
            inner.scoped_digests.push(super::documents::ScopedDigest {
                reader: *reader,
                generation,
                scopes,
                tree: std::sync::Arc::new(tree),
            });
        }
        Ok(aggregate)
    }

    /// The digest of what `reader` may read, read one page of the store at a time under the
    /// lock while commits go on (they keep the pages read so far up to date), and the digest
    /// generation it stands at; no generation if a commit meanwhile changed a document the
    /// reader reads by its fields (the tree is then only close, and is not to be kept).
    fn build_scoped_digest(
        &self,
        reader: &NodeId,
    ) -> Result<(digest::DigestTree, Option<u64>), StoreError> {
        self.begin_scoped_build(reader);
        let mut after = None;
        let built = loop {
            match self.scoped_build_page(after.as_deref()) {
                Ok(Some(last)) => after = Some(last),
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        let finished = self.finish_scoped_build();
        built?;
        finished
    }

    pub(super) fn begin_scoped_build(&self, reader: &NodeId) {
        self.inner().scoped_building = Some(super::documents::ScopedBuild {
            reader: *reader,
            upto: Vec::new(),
            tree: digest::DigestTree::default(),
            spoiled: false,
        });
    }

    /// Reads the page of documents after `after` into the build under the lock; the last
    /// key read, or `None` once every document was read.
    pub(super) fn scoped_build_page(
        &self,
        after: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut inner = self.inner();
        let page = self.backend().scan_prefix(
            &[layout::TAG_DOC],
            after,
            super::documents::SCAN_PAGE_ENTRIES,
        )?;
        let reader = inner
            .scoped_building
            .as_ref()
            .map(|build| build.reader)
            .ok_or_else(|| StoreError::Corrupt("a scoped digest build vanished".into()))?;
        let mut readable = Vec::new();
        for (key, value) in &page {
            if self.may_read_locked(&mut inner, &reader, &key[1..])? {
                let stored: layout::StoredDoc = layout::decode("document", value)?;
                readable.push((key[1..].to_vec(), stored.change_hashes()));
            }
        }
        let build = inner
            .scoped_building
            .as_mut()
            .ok_or_else(|| StoreError::Corrupt("a scoped digest build vanished".into()))?;
        for (doc_key, heads) in readable {
            build.tree.update(&doc_key, &[], &heads);
        }
        let last = page.last().map(|(key, _)| key.clone());
        if let Some(last) = &last {
            build.upto.clone_from(last);
        }
        Ok(last.filter(|_| page.len() == super::documents::SCAN_PAGE_ENTRIES))
    }

    /// The build's tree, and the digest generation it stands at unless it is spoiled.
    pub(super) fn finish_scoped_build(
        &self,
    ) -> Result<(digest::DigestTree, Option<u64>), StoreError> {
        let mut inner = self.inner();
        let build = inner
            .scoped_building
            .take()
            .ok_or_else(|| StoreError::Corrupt("a scoped digest build vanished".into()))?;
        let generation = (!build.spoiled).then_some(inner.digest_generation);
        Ok((build.tree, generation))
    }

    /// Whether a change of this node's own to a document it withdrew is kept for its log.
    pub fn keeps_own_change(&self, doc_key: &[u8], hash: &ChangeHash) -> Result<bool, StoreError> {
        Ok(self
            .backend()
            .get(&layout::kept_key(doc_key, hash))?
            .is_some())
    }

    /// Takes documents out of this store: a node that reads at least what this one reads
    /// found them outside this node's read scope. What this node wrote to them stays, for
    /// its log. Returns those that were held and are now taken out, in the order given.
    /// One write batch per [`WITHDRAW_SESSION_DOCUMENTS`], so that a long list neither makes
    /// one huge batch nor holds the store from other writes for long.
    pub fn withdraw(&self, doc_keys: &[&[u8]]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut withdrawn = Vec::new();
        for chunk in doc_keys.chunks(WITHDRAW_SESSION_DOCUMENTS) {
            let mut session = self.session();
            for doc_key in chunk {
                if session.withdraw(doc_key)? {
                    withdrawn.push(doc_key.to_vec());
                }
            }
            session.commit(Durability::Deferred)?;
        }
        Ok(withdrawn)
    }

    /// Every document in each of `leaves` (leaf buckets) with its heads, at most `limit` per
    /// leaf, by one scan of the store however many leaves are asked for: only needed when
    /// leaves' fingerprints differ between two nodes. With a `reader`, only the documents it
    /// may read.
    pub fn leaf_documents(
        &self,
        leaves: &[String],
        limit: usize,
        reader: Option<&NodeId>,
    ) -> Result<Vec<(String, Vec<DocumentHeadsEntry>)>, StoreError> {
        let mut wanted: BTreeMap<usize, usize> = BTreeMap::new();
        let mut found: Vec<(String, Vec<DocumentHeadsEntry>)> = Vec::new();
        for leaf in leaves {
            let Some((depth, bucket)) = digest::parse_prefix(leaf) else {
                continue;
            };
            if depth + 1 != digest::BUCKET_HEX_DIGITS || wanted.contains_key(&bucket) {
                continue;
            }
            wanted.insert(bucket, found.len());
            found.push((leaf.clone(), Vec::new()));
        }
        if wanted.is_empty() {
            return Ok(found);
        }
        for_each_entry(self.backend(), &[layout::TAG_DOC], |key, value| {
            if let Some(&index) = wanted.get(&digest::leaf_of(&key[1..])) {
                let readable = match reader {
                    Some(reader) => self.may_read_document(reader, &key[1..])?,
                    None => true,
                };
                let documents = &mut found[index].1;
                if readable && documents.len() < limit {
                    let stored: layout::StoredDoc = layout::decode("document", value)?;
                    documents.push((key[1..].to_vec(), stored.change_hashes()));
                }
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Which of `hashes` the document does not hold.
    pub fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError> {
        let missing: Vec<ChangeHash> = {
            let mut inner = self.inner();
            let loaded = self.loaded(&mut inner, doc_key)?;
            hashes
                .iter()
                .filter(|hash| !document::holds_change(&loaded.doc, hash))
                .copied()
                .collect()
        };
        // A change refused here is known, not missing: asking for it again would repeat.
        let mut unknown = Vec::with_capacity(missing.len());
        for hash in missing {
            if !self.refused_contains(doc_key, &hash)? {
                unknown.push(hash);
            }
        }
        Ok(unknown)
    }

    /// The document key stored under a log entry, for checks and tests.
    pub fn log_document(
        &self,
        origin: &NodeId,
        sequence: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .backend()
            .get(&layout::log_key(origin, sequence))?
            .map(|bytes| layout::decode_log_entry(&bytes))
            .transpose()?
            .map(|entry| entry.doc_key))
    }
}
