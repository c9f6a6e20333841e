//! Applying changes that arrive from peers: grouped by document, judged at the door, ordered
//! by their dependencies, and logged at the places their origins gave them.
//!
//! Guarantees: a remote change is logged at the place its origin gave it; a change already
//! held (same hash) is not applied twice, only its log place is recorded, so the origin's mark
//! can advance; a change whose dependencies are missing is handed back, never applied and
//! never logged, so it is asked for again rather than lost; everything applied is durable
//! before [`DocStore::apply_remote`] returns, so it can be relayed at once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::{Change, ChangeHash};

use super::collision;
use super::door::WriteDoor;
use super::layout::{self, RefusalReason};
use super::log::LoggedChange;
use super::replication::Unplaced;
use super::session::{LogPlace, NewChange};
use super::{DocStore, Durability, Store, StoreError};
use crate::record::compaction::CompactionError;
use crate::record::held::HeldDoc;
use crate::record::stamp::ChangeStamp;
use crate::record::{document, NodeId, RecordId};

/// What the door says of a change from elsewhere (see [`DocStore::judge_incoming`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Admit,
    /// Not applied now, nor refused: it is decided once it comes with its log place.
    Wait,
    /// Not applied now, nor refused: judging it met an internal error (the record as of its
    /// dependencies could not be built). Nothing of it is written, so its sender sends it
    /// again; a check that cannot decide never admits.
    Held,
    /// Refused for this reason (`instead`: the refused change it depends on, if that is why).
    Refuse(RefusalReason, ChangeHash),
}

/// Of changes judged by the door: those admitted, then those refused, each with its item (the
/// ones that wait are neither).
type Admitted<T> = (Vec<(T, Change)>, Vec<(T, Change)>);

/// One document's changes in a batch from a peer, parsed, in arrival order.
type Group = Vec<(LoggedChange, Change)>;

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
    /// Changes whose check against the grants met an internal error: held, neither applied
    /// nor refused; nothing was written for these (their senders send them again).
    pub judging_failed: usize,
}

/// Judges one change by the door: its early `verdict` if the grants alone decided it,
/// otherwise the record as of its dependencies (built on `scratch`, the document with the
/// changes admitted before it) against the record with it. Returns the verdict and whether
/// the change is in `scratch` now; an error when the record as of its dependencies, or with
/// the change, could not be built: the caller holds the change rather than guess.
fn judge_on(
    door: &dyn WriteDoor,
    scratch: &mut HeldDoc,
    change: &Change,
    author: Option<&NodeId>,
    place: Option<(NodeId, u64)>,
    collection: &str,
    verdict: Option<Result<(), RefusalReason>>,
) -> Result<(Result<(), RefusalReason>, bool), String> {
    if let Some(verdict) = verdict {
        return Ok((verdict, false));
    }
    #[cfg(test)]
    if tests::JUDGING_FAILS.with(std::cell::Cell::get) {
        return Err("a failure the test injected".to_owned());
    }
    if scratch.heads() == change.deps() {
        // Its dependencies are the document as it stands: the common case.
        let before = document::read(scratch.local());
        scratch
            .apply(vec![change.clone()])
            .map_err(|error| format!("applying it: {error}"))?;
        let after = document::read(scratch.local());
        let verdict = door.judge(author, place, collection, before.as_ref(), after.as_ref());
        return Ok((verdict, true));
    }
    let mut fork = scratch
        .fork_before(change)
        .ok_or_else(|| "the record as of its dependencies could not be built".to_owned())?;
    let before = document::read(fork.local());
    fork.apply(vec![change.clone()])
        .map_err(|error| format!("applying it to the record as of its dependencies: {error}"))?;
    let after = document::read(fork.local());
    let verdict = door.judge(author, place, collection, before.as_ref(), after.as_ref());
    Ok((verdict, false))
}

/// What one change is judged by: the door, its author and log place, and its collection.
struct Judging<'a> {
    door: &'a dyn WriteDoor,
    author: Option<&'a NodeId>,
    place: Option<(NodeId, u64)>,
    collection: &'a str,
}

impl Judging<'_> {
    /// The verdict on `change` against the record as of its dependencies (see [`judge_on`]):
    /// admitted, it stays in `scratch` for the changes after it; refused, `scratch` is as it
    /// was; held when it could not be judged (its sender sends it again).
    fn judge(
        &self,
        scratch: &mut HeldDoc,
        change: &Change,
        verdict: Option<Result<(), RefusalReason>>,
    ) -> Verdict {
        let heads = scratch.heads();
        let judged = judge_on(
            self.door,
            scratch,
            change,
            self.author,
            self.place,
            self.collection,
            verdict,
        )
        .and_then(|(verdict, taken_in)| {
            // Admitted: what follows it is judged with it, so it must apply.
            if verdict.is_ok() && !taken_in {
                scratch
                    .apply(vec![change.clone()])
                    .map_err(|error| format!("applying it once admitted: {error}"))?;
            }
            Ok((verdict, taken_in))
        });
        match judged {
            Ok((Ok(()), _)) => Verdict::Admit,
            Ok((Err(reason), taken_in)) => {
                if taken_in {
                    if let Ok(Some(undone)) = scratch.fork_at(&heads) {
                        *scratch = undone;
                    }
                }
                Verdict::Refuse(reason, ChangeHash([0; 32]))
            }
            Err(error) => {
                tracing::warn!(
                    change = %change.hash(),
                    %error,
                    "a change could not be judged against the grants: held, not applied; its \
                     sender sends it again"
                );
                Verdict::Held
            }
        }
    }
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

/// What became of one change tried alone against a document.
pub(super) enum Tried {
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
            if loaded.doc.holds_change(&change) {
                loaded.doc.note_held(&change);
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
                .all(|dependency| loaded.doc.holds_dependency(change, dependency));
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
                if loaded.doc.holds_dependency(change, dependency) {
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
            keep_place(session, doc_key, &logged, &hash);
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
            keep_place(session, doc_key, &logged, &change.hash());
        }
        for (logged, change) in slots.into_iter().flatten() {
            #[cfg(feature = "sabotage")]
            if self.sabotage.drop_held_changes {
                keep_place(session, doc_key, &logged, &change.hash());
                continue;
            }
            // A change that waits on a refused one is refused too, not asked for forever.
            if self.refuse_if_dependency_refused(session, doc_key, &change, report)? {
                keep_place(session, doc_key, &logged, &change.hash());
                continue;
            }
            report.missing_dependencies.push(logged);
        }
        if ready.is_empty() {
            return Ok(());
        }
        self.apply_ready(session, doc_key, ready, report)
    }

    /// Applies changes whose dependencies are all here and that their authors' grants
    /// admit, together when they all apply, else one at a time; queues the applied ones with
    /// their log places and reports them and the conflicts they made.
    fn apply_ready(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        ready: Vec<(LoggedChange, Change)>,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        let loaded = session.document(doc_key)?;
        // A change to an empty document cannot conflict with anything.
        let was_empty = loaded.doc.heads().is_empty();
        let conflicts_before = if was_empty {
            BTreeSet::new()
        } else {
            document::conflicting_fields(loaded.doc.local())
        };
        let applied = if loaded
            .doc
            .apply(ready.iter().map(|(_, change)| change.clone()).collect())
            .is_ok()
        {
            ready
        } else {
            self.apply_one_at_a_time(session, doc_key, ready, report)?
        };
        if applied.is_empty() {
            return Ok(());
        }
        if !was_empty {
            let loaded = session.document(doc_key)?;
            let collection = String::from_utf8_lossy(doc_key);
            let collection = collection.split('/').next().unwrap_or_default();
            for field in document::conflicting_fields(loaded.doc.local()) {
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
            new.push(NewChange {
                hash: change.hash(),
                place: LogPlace::Remote {
                    origin: logged.origin,
                    sequence: logged.sequence,
                },
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

    /// When a group does not apply together (one of them is invalid, or collides with a
    /// change held): starts again from the stored document and applies them one at a time,
    /// so that only those are refused; returns those that applied and still stand.
    fn apply_one_at_a_time(
        &self,
        session: &mut super::WriteSession<'_, S>,
        doc_key: &[u8],
        ready: Vec<(LoggedChange, Change)>,
        report: &mut ApplyReport,
    ) -> Result<Vec<(LoggedChange, Change)>, StoreError> {
        session.forget(doc_key);
        let mut applied = Vec::with_capacity(ready.len());
        for (logged, change) in ready {
            match self.try_one(session, doc_key, &change, report)? {
                Tried::Applied => applied.push((logged, change)),
                Tried::Refused => keep_place(session, doc_key, &logged, &change.hash()),
                Tried::Invalid(reason) => report.invalid.push((logged, reason)),
            }
        }
        // A change applied here may have been taken out again by a later one of the same
        // batch that collides with it and stands: refused now, it keeps only its place.
        let loaded = session.document(doc_key)?;
        let (kept, taken_out): (Vec<_>, Vec<_>) = applied
            .into_iter()
            .partition(|(_, change)| loaded.doc.holds_change(change));
        for (logged, change) in taken_out {
            keep_place(session, doc_key, &logged, &change.hash());
        }
        Ok(kept)
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
        doc: &HeldDoc,
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
        let mut scratch: Option<HeldDoc> = None;
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
            let judging = Judging {
                door: door.as_ref(),
                author: author.as_ref(),
                place: *place,
                collection,
            };
            let judged = judging.judge(scratch, change, verdict);
            match &judged {
                Verdict::Refuse(..) => {
                    refused.insert(change.hash());
                }
                Verdict::Held => {
                    waiting.insert(change.hash());
                }
                Verdict::Admit | Verdict::Wait => {}
            }
            verdicts.push(judged);
        }
        if refused.is_empty() && waiting.is_empty() {
            return None;
        }
        Some(verdicts)
    }

    /// Judges `ready` (changes to one document from elsewhere, in dependency order) by the
    /// door, records those it refuses as refused, and returns the rest, then the refused ones.
    pub(super) fn admit<T>(
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
                Verdict::Held => report.judging_failed += 1,
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
    pub(super) fn refuse_if_dependency_refused(
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
    pub(super) fn try_one(
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
        let held = match loaded.doc.apply(vec![change.clone()]) {
            Ok(()) if loaded.doc.holds_change(change) => return Ok(Tried::Applied),
            Ok(()) => return Ok(Tried::Invalid("its dependencies were refused".to_owned())),
            Err(CompactionError::Automerge(automerge::AutomergeError::DuplicateSeqNumber(
                seq,
                actor,
            ))) => match loaded.doc.change_at(&actor, seq) {
                Some(held) => held,
                None => {
                    return Ok(Tried::Invalid(format!(
                        "actor {actor} already has sequence {seq} in this document"
                    )))
                }
            },
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
        let (rebuilt, removed) = loaded
            .doc
            .without(&[held.hash()])
            .map_err(|error| StoreError::Corrupt(format!("rebuilding a document: {error}")))?;
        let mut effects = Vec::new();
        let mut replaces = Vec::new();
        for taken in &removed {
            if let Some((writer, source)) = NodeId::split_actor(taken.actor_id()) {
                if writers.owns(&writer) {
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
        let taken_out: HashSet<ChangeHash> = removed.iter().map(Change::hash).collect();
        for (index, taken) in removed.iter().enumerate() {
            let (reason, instead) = if index == 0 {
                (RefusalReason::DuplicateSequence, change.hash())
            } else {
                // The refused change it depends on directly, so that the chain from it to the
                // change that lost can be followed link by link (see
                // `DocStore::refused_dependencies`).
                let direct = taken
                    .deps()
                    .iter()
                    .copied()
                    .find(|dependency| taken_out.contains(dependency))
                    .unwrap_or(held.hash());
                (RefusalReason::DependsOnRefused, direct)
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
        match loaded.doc.apply(vec![change.clone()]) {
            Ok(()) if loaded.doc.holds_change(change) => Ok(Tried::Applied),
            Ok(()) => Ok(Tried::Invalid("its dependencies were refused".to_owned())),
            Err(error) => Ok(Tried::Invalid(error.to_string())),
        }
    }
}

/// Keeps the log place of a change from elsewhere that is not applied (a duplicate, or a
/// refused change): the log moves on past it.
fn keep_place<S: Store>(
    session: &mut super::WriteSession<'_, S>,
    doc_key: &[u8],
    logged: &LoggedChange,
    hash: &ChangeHash,
) {
    let place = LogPlace::Remote {
        origin: logged.origin,
        sequence: logged.sequence,
    };
    session.queue_log_entry(doc_key, hash, place, &[]);
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;
    use std::sync::{Arc, RwLock};

    use serde_json::json;

    use super::*;
    use crate::record::document::{apply_write, RecordWrite};
    use crate::scope::{Grant, Scope, ScopeDoor, Scopes, Verified};
    use crate::store::{DocStoreConfig, MemoryStore};

    thread_local! {
        /// Whether judging a change against the grants meets an internal error, on this
        /// thread (see [`judge_on`]).
        pub(in crate::store) static JUDGING_FAILS: Cell<bool> = const { Cell::new(false) };
    }

    #[test]
    fn a_change_whose_check_fails_is_held_counted_and_applied_once_it_comes_again() {
        let author = NodeId([1; 16]);
        let receiver = NodeId([2; 16]);
        let a = DocStore::open(MemoryStore::new(), author, DocStoreConfig::default()).unwrap();
        a.name_writer(&author.actor(0), "api", "a", author);
        let id = RecordId::parse("items/1").unwrap();
        let write = RecordWrite {
            set: vec![
                ("region".to_owned(), json!("eu")),
                ("v".to_owned(), json!(1)),
            ],
            ..Default::default()
        };
        a.write(&id, &author.actor(0), 1_000, Durability::Durable, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
        // The receiver judges the author's changes by what they write: its grant is filtered.
        let b = DocStore::open(MemoryStore::new(), receiver, DocStoreConfig::default()).unwrap();
        let mut scopes = Scopes::default();
        scopes.insert(
            Verified::Grant(Grant {
                cluster: [1; 16],
                node: author.0,
                read: vec![Scope::parse("items").unwrap()],
                write: vec![Scope::parse("items:region=eu").unwrap()],
                issued_ms: 1,
            }),
            b"signature",
        );
        b.set_door(Arc::new(ScopeDoor::new(
            receiver,
            Arc::new(RwLock::new(scopes)),
        )));
        let log = a.log_after(&author, 0, 100, usize::MAX).unwrap();
        let saved = a.export(&id).unwrap().unwrap();
        JUDGING_FAILS.with(|fails| fails.set(true));
        let held = b.apply_remote(log.clone(), u64::MAX);
        // An import of the same change is refused, and says why.
        let imported = b.import(&id, &saved, u64::MAX);
        JUDGING_FAILS.with(|fails| fails.set(false));
        assert!(
            matches!(imported, Err(StoreError::Unjudged(_))),
            "{imported:?}"
        );
        let held = held.unwrap();
        assert_eq!(held.judging_failed, 1);
        assert!(held.applied.is_empty());
        assert!(held.refused.is_empty());
        assert!(
            b.heads(&id.to_doc_key()).unwrap().is_empty(),
            "nothing of it was written"
        );
        // Sent again once the error is gone, it is judged and applied.
        let again = b.apply_remote(log, u64::MAX).unwrap();
        assert_eq!(again.judging_failed, 0);
        assert_eq!(again.applied.len(), 1);
        assert_eq!(
            b.heads(&id.to_doc_key()).unwrap(),
            a.heads(&id.to_doc_key()).unwrap()
        );
    }
}
