//! What replication asks of the document store: the log by origin, and applying changes that
//! arrive from peers.
//!
//! Guarantees: a remote change is logged at the place its origin gave it; a change already held
//! (same hash) is not applied twice, only its log place is recorded, so the origin's mark can
//! advance; a change whose dependencies are missing is handed back, never applied and never
//! logged, so it is asked for again rather than lost; everything applied is durable before
//! [`DocStore::apply_remote`] returns, so it can be relayed at once.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{Change, ChangeHash, ReadDoc};

use super::digest::{self, Aggregate};
use super::documents::{for_each_entry, LogPlace};
use super::layout;
use super::{DocStore, Durability, Store, StoreError};
use crate::record::{document, NodeId, RecordId};

/// One change with its place in its origin's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    pub origin: NodeId,
    pub sequence: u64,
    pub doc_key: Vec<u8>,
    /// The change in Automerge's binary change format.
    pub change: Vec<u8>,
}

/// A document key and its heads.
pub type DocumentHeadsEntry = (Vec<u8>, Vec<ChangeHash>);

/// What became of a batch of remote changes.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// New here: applied and logged (relay these).
    pub applied: Vec<LoggedChange>,
    /// Already held: by log place, or by hash (then only the log place was recorded).
    pub duplicates: usize,
    /// Dependencies not here yet: nothing was written for these.
    pub missing_dependencies: Vec<LoggedChange>,
    /// Not a valid change or document key, with the reason.
    pub invalid: Vec<(LoggedChange, String)>,
    /// Fields that became conflicting (concurrent values) with these changes.
    pub conflicts: Vec<NewConflict>,
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

    /// Up to `limit` entries of `origin`'s log after `after`, with their change bytes.
    pub fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        let entries = self.log_entries(origin, after, limit)?;
        let mut found: Vec<Option<Vec<u8>>> = Vec::with_capacity(entries.len());
        // Changes compacted into a snapshot need their document loaded: group them by
        // document so a page loads each document once, whatever the cache's size.
        let mut compacted: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
        for (index, (_, entry)) in entries.iter().enumerate() {
            let bytes = self.appended_change(&entry.doc_key, &ChangeHash(entry.hash))?;
            if bytes.is_none() {
                compacted.entry(&entry.doc_key).or_default().push(index);
            }
            found.push(bytes);
        }
        if !compacted.is_empty() {
            let mut inner = self.inner();
            for (doc_key, indexes) in compacted {
                let loaded = self.loaded(&mut inner, doc_key)?;
                for index in indexes {
                    let (sequence, entry) = &entries[index];
                    let change = loaded
                        .doc
                        .get_change_by_hash(&ChangeHash(entry.hash))
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "log entry {origin}:{sequence} names a change its document lacks"
                            ))
                        })?;
                    found[index] = Some(change.raw_bytes().to_vec());
                }
            }
        }
        Ok(entries
            .into_iter()
            .zip(found)
            .map(|((sequence, entry), change)| LoggedChange {
                origin: *origin,
                sequence,
                doc_key: entry.doc_key,
                change: change.expect("every entry was found above or failed"),
            })
            .collect())
    }

    /// A change still among a document's appended changes, read straight from its stored
    /// value: no document is loaded, which is what makes streaming a log fast.
    fn appended_change(
        &self,
        doc_key: &[u8],
        hash: &ChangeHash,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(bytes) = self.backend().get(&layout::doc_key(doc_key))? else {
            return Ok(None);
        };
        let stored: layout::StoredDoc = layout::decode("document", &bytes)?;
        Ok(stored
            .changes
            .into_iter()
            .find(|change| layout::change_hash(change).as_ref() == Some(hash)))
    }

    /// Applies changes received from a peer, durably, and says what became of each.
    pub fn apply_remote(&self, changes: Vec<LoggedChange>) -> Result<ApplyReport, StoreError> {
        let mut report = ApplyReport::default();
        let mut session = self.session();
        for logged in changes {
            if session.log_holds(&logged.origin, logged.sequence) {
                report.duplicates += 1;
                continue;
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
            let hash = change.hash();
            let place = LogPlace::Remote {
                origin: logged.origin,
                sequence: logged.sequence,
            };
            let loaded = session.document(&logged.doc_key)?;
            if document::holds_change(&loaded.doc, &hash) {
                session.queue_log_entry(&logged.doc_key, &hash, place);
                report.duplicates += 1;
                continue;
            }
            let missing = change
                .deps()
                .iter()
                .any(|dependency| !document::holds_change(&loaded.doc, dependency));
            if missing {
                #[cfg(feature = "sabotage")]
                if self.sabotage.drop_held_changes {
                    session.queue_log_entry(&logged.doc_key, &hash, place);
                    continue;
                }
                report.missing_dependencies.push(logged);
                continue;
            }
            let loaded = session.document(&logged.doc_key)?;
            // A change to an empty document cannot conflict with anything.
            let was_empty = loaded.doc.get_heads().is_empty();
            let conflicts_before = if was_empty {
                BTreeSet::new()
            } else {
                document::conflicting_fields(&loaded.doc)
            };
            if let Err(error) = loaded.doc.apply_changes([change]) {
                report.invalid.push((logged, error.to_string()));
                continue;
            }
            if !was_empty {
                let collection = String::from_utf8_lossy(&logged.doc_key);
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
            #[cfg(feature = "sabotage")]
            if self.sabotage.log_twice && !session.log_holds(&logged.origin, logged.sequence + 1) {
                let next = LogPlace::Remote {
                    origin: logged.origin,
                    sequence: logged.sequence + 1,
                };
                session.queue_log_entry(&logged.doc_key, &hash, next);
            }
            session.queue_new_changes(
                &logged.doc_key,
                &[hash],
                place,
                Some(logged.change.clone()),
            )?;
            report.applied.push(logged);
        }
        session.commit(Durability::Durable)?;
        Ok(report)
    }

    /// Changes of a document that are not ancestors of `have` (hashes it does not know are
    /// ignored), at most `limit`.
    pub fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut inner = self.inner();
        let loaded = self.loaded(&mut inner, doc_key)?;
        let known: Vec<ChangeHash> = have
            .iter()
            .filter(|hash| document::holds_change(&loaded.doc, hash))
            .copied()
            .collect();
        Ok(loaded
            .doc
            .get_changes(&known)
            .iter()
            .take(limit)
            .map(|change| change.raw_bytes().to_vec())
            .collect())
    }

    /// Applies changes fetched for a document outside the log (dependencies asked for), in
    /// any order: each is applied once its dependencies are. Returns how many were new.
    pub fn apply_unlogged(
        &self,
        doc_key: &[u8],
        changes: Vec<Vec<u8>>,
    ) -> Result<usize, StoreError> {
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
        let loaded = session.document(doc_key)?;
        let new: Vec<Change> = parsed
            .into_iter()
            .filter(|change| !document::holds_change(&loaded.doc, &change.hash()))
            .collect();
        // Only changes whose dependencies are all present (or among these) are applied;
        // Automerge would queue the rest in memory, where a crash or an eviction loses them.
        let mut ready = Vec::new();
        let mut pending = new;
        loop {
            let (now_ready, still): (Vec<Change>, Vec<Change>) =
                pending.into_iter().partition(|change| {
                    change.deps().iter().all(|dependency| {
                        document::holds_change(&loaded.doc, dependency)
                            || ready.iter().any(|done: &Change| done.hash() == *dependency)
                    })
                });
            pending = still;
            if now_ready.is_empty() {
                break;
            }
            ready.extend(now_ready);
        }
        if ready.is_empty() {
            return Ok(0);
        }
        let outcome = session.apply_and_queue(doc_key, ready, LogPlace::Unlogged)?;
        session.commit(Durability::Durable)?;
        Ok(outcome.new_changes)
    }

    /// A document's heads (empty if never written).
    pub fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
        let mut inner = self.inner();
        Ok(self.loaded(&mut inner, doc_key)?.doc.get_heads())
    }

    /// The repair aggregate of a bucket (a hex prefix of 1 to 3 digits).
    pub fn digest(&self, prefix: &str) -> Option<Aggregate> {
        self.inner().digest.get(prefix)
    }

    /// Every document in a leaf bucket with its heads, at most `limit`, by a scan of the
    /// store: only needed when a leaf's fingerprints differ between two nodes.
    pub fn leaf_documents(
        &self,
        leaf: &str,
        limit: usize,
    ) -> Result<Vec<DocumentHeadsEntry>, StoreError> {
        let Some((depth, bucket)) = digest::parse_prefix(leaf) else {
            return Ok(Vec::new());
        };
        if depth + 1 != digest::BUCKET_HEX_DIGITS {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for_each_entry(self.backend(), &[layout::TAG_DOC], |key, value| {
            if digest::leaf_of(&key[1..]) == bucket && found.len() < limit {
                let stored: layout::StoredDoc = layout::decode("document", value)?;
                found.push((key[1..].to_vec(), stored.change_hashes()));
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
        let mut inner = self.inner();
        let loaded = self.loaded(&mut inner, doc_key)?;
        Ok(hashes
            .iter()
            .filter(|hash| !document::holds_change(&loaded.doc, hash))
            .copied()
            .collect())
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
            .map(|bytes| layout::decode::<layout::LogEntry>("log entry", &bytes))
            .transpose()?
            .map(|entry| entry.doc_key))
    }
}
