//! What else replication asks of the document store: changes fetched outside the log,
//! a document's changes and heads, repair digests (whole and per reader), and withdrawing
//! documents that left this node's read scope.
//!
//! Guarantees: a change fetched outside the log is judged by the same door as one from the
//! log; a withdrawn document leaves nothing readable behind but this node's own changes, kept
//! so its log still serves them.

use std::collections::{BTreeMap, HashSet};

use automerge::{Change, ChangeHash};

use super::apply::{clock_of, ApplyReport, Tried};
use super::digest::{self, Aggregate};
use super::documents::for_each_entry;
use super::layout::{self, RefusalReason};
use super::session::{LogPlace, NewChange};
use super::{DocStore, Durability, Store, StoreError, WriteSession};
use crate::record::held::HeldDoc;
use crate::record::{NodeId, RecordId};

/// A document key and its heads.
pub type DocumentHeadsEntry = (Vec<u8>, Vec<ChangeHash>);

/// Documents taken out in one write batch by [`DocStore::withdraw`].
pub const WITHDRAW_SESSION_DOCUMENTS: usize = 256;

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

impl<S: Store> DocStore<S> {
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
            .filter(|hash| loaded.doc.holds(hash))
            .copied()
            .collect();
        let all = loaded.doc.changes(&known);
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
        let fresh: Vec<Change> = fresh
            .into_iter()
            .filter(|change| !loaded.doc.holds_change(change))
            .collect();
        let (ready, pending) = dependencies_present(&loaded.doc, fresh);
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
                    outcome.new = self.apply_unlogged_one_at_a_time(
                        &mut session,
                        doc_key,
                        ready,
                        &mut report,
                    )?;
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

    /// When unlogged changes do not apply together (one collides with a change held, or is
    /// invalid): one at a time, from the stored document. Returns how many are new here.
    fn apply_unlogged_one_at_a_time(
        &self,
        session: &mut WriteSession<'_, S>,
        doc_key: &[u8],
        ready: Vec<Change>,
        report: &mut ApplyReport,
    ) -> Result<usize, StoreError> {
        session.forget(doc_key);
        let mut applied = Vec::new();
        for change in ready {
            match self.try_one(session, doc_key, &change, report)? {
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
        // One applied here may have been taken out again by a later one that collides with
        // it and stands: only what the document holds is queued.
        let loaded = session.document(doc_key)?;
        applied.retain(|new| loaded.doc.holds(&new.hash));
        let new = applied.len();
        if !applied.is_empty() {
            session.queue_new_changes(doc_key, applied)?;
        }
        Ok(new)
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
            Some(bytes) => Ok(layout::StoredDoc::decode(&bytes)?.change_hashes()),
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
            layout::DOCS_PREFIX,
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
            if self.may_read_locked(&mut inner, &reader, layout::doc_key_of(key))? {
                let stored: layout::StoredDoc = layout::StoredDoc::decode(value)?;
                readable.push((layout::doc_key_of(key).to_vec(), stored.change_hashes()));
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
        for_each_entry(self.backend(), layout::DOCS_PREFIX, |key, value| {
            if let Some(&index) = wanted.get(&digest::leaf_of(layout::doc_key_of(key))) {
                let readable = match reader {
                    Some(reader) => self.may_read_document(reader, layout::doc_key_of(key))?,
                    None => true,
                };
                let documents = &mut found[index].1;
                if readable && documents.len() < limit {
                    let stored: layout::StoredDoc = layout::StoredDoc::decode(value)?;
                    documents.push((layout::doc_key_of(key).to_vec(), stored.change_hashes()));
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
                .filter(|hash| !loaded.doc.holds(hash))
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

/// Of `pending`, those whose dependencies are all in `doc` or among them, in an order that
/// applies, and the rest. Only those are applied: Automerge would queue the rest in memory,
/// where a crash or an eviction loses them.
fn dependencies_present(doc: &HeldDoc, mut pending: Vec<Change>) -> (Vec<Change>, Vec<Change>) {
    let mut ready: Vec<Change> = Vec::new();
    let mut ready_hashes: HashSet<ChangeHash> = HashSet::new();
    loop {
        let (now_ready, still): (Vec<Change>, Vec<Change>) =
            pending.into_iter().partition(|change| {
                change.deps().iter().all(|dependency| {
                    doc.holds_dependency(change, dependency) || ready_hashes.contains(dependency)
                })
            });
        pending = still;
        if now_ready.is_empty() {
            return (ready, pending);
        }
        ready_hashes.extend(now_ready.iter().map(Change::hash));
        ready.extend(now_ready);
    }
}
