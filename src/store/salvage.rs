//! Checking a store that came from elsewhere (a backup, or what a damaged store still held)
//! before a node opens it, and mending what does not agree.
//!
//! Guarantees, once [`check_and_mend`] returns: every document reads back whole with the heads
//! it records (one whose parts disagree is saved again as it reads; one that does not read is
//! dropped, and its changes come back from peers); every log entry names a change its document
//! holds or that was refused here (others are dropped, so the origin's mark stops before them
//! and peers send them again); every value decodes. Nothing is written under the store's
//! writer: the caller gives the store a new one ([`super::new_incarnation`]), since peers may
//! hold more of the old one than survived.

use std::collections::HashSet;

use super::documents::{for_each_entry, load_document};
use super::layout::{self, StoredDoc};
use super::{Batch, Store, StoreError};
use crate::record::{document, RecordId};

/// Deletes and rewrites queued per batch while mending.
const MEND_BATCH_OPERATIONS: usize = 1024;

/// What [`check_and_mend`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SalvageReport {
    pub documents: u64,
    /// Documents saved again because their parts disagreed (a copy taken while they changed).
    pub documents_mended: u64,
    /// Documents that did not read back, dropped (peers send them again).
    pub documents_dropped: u64,
    pub log_entries: u64,
    /// Log entries whose change the store lacks, dropped (peers send them again).
    pub log_entries_dropped: u64,
    /// Other values that did not decode, dropped.
    pub values_dropped: u64,
}

/// The first 8 bytes of a change hash: enough to tell the changes of one store apart.
fn short(hash: &[u8; 32]) -> u64 {
    u64::from_be_bytes(hash[..8].try_into().expect("8 of 32 bytes"))
}

/// Checks every document, log entry and refused change of `store` and mends what disagrees
/// (see the module doc). Durable when it returns.
pub fn check_and_mend<S: Store>(
    store: &S,
    mut progress: impl FnMut(&str, u64),
) -> Result<SalvageReport, StoreError> {
    let mut mending = Mending {
        store,
        report: SalvageReport::default(),
        batch: Batch::default(),
        held: HashSet::new(),
    };
    // Documents: each must read back whole.
    for_each_entry(store, layout::DOCS_PREFIX, |key, value| {
        mending.document(key, value)?;
        if mending.batch.len() >= MEND_BATCH_OPERATIONS {
            mending.flush()?;
        }
        if mending.report.documents.is_multiple_of(10_000) {
            progress("documents", mending.report.documents);
        }
        Ok(())
    })?;
    mending.flush()?;
    // Refused changes: a log entry may name one.
    for_each_entry(store, layout::REFUSED_PREFIX, |key, value| {
        match (
            layout::decode::<layout::RefusedChange>("refused change", value),
            key.get(1..33),
        ) {
            (Ok(_), Some(hash)) => {
                mending
                    .held
                    .insert(short(hash.try_into().expect("32 bytes")));
            }
            _ => mending.drop_value(key),
        }
        Ok(())
    })?;
    mending.flush()?;
    // The log: each entry must name a change held.
    for_each_entry(store, layout::LOG_PREFIX, |key, value| {
        mending.report.log_entries += 1;
        let keep = layout::log_origin(key).is_ok()
            && layout::log_sequence(key).is_ok()
            && layout::decode_log_entry(value)
                .is_ok_and(|entry| mending.held.contains(&short(&entry.hash)));
        if !keep {
            mending.report.log_entries_dropped += 1;
            mending.batch.remove(key.to_vec());
            if mending.batch.len() >= MEND_BATCH_OPERATIONS {
                mending.flush()?;
            }
        }
        if mending.report.log_entries.is_multiple_of(100_000) {
            progress("log entries", mending.report.log_entries);
        }
        Ok(())
    })?;
    mending.flush()?;
    mending.drop_orphans()?;
    store.flush()?;
    Ok(mending.report)
}

/// What [`check_and_mend`] carries from one key space to the next.
struct Mending<'a, S: Store> {
    store: &'a S,
    report: SalvageReport,
    /// Mends not yet applied.
    batch: Batch,
    /// The changes the store holds (documents' and refused ones), by [`short`] hash.
    held: HashSet<u64>,
}

impl<S: Store> Mending<'_, S> {
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.batch.is_empty() {
            self.store.apply(std::mem::take(&mut self.batch))?;
        }
        Ok(())
    }

    /// A value that does not decode, or whose document is gone: dropped.
    fn drop_value(&mut self, key: &[u8]) {
        self.report.values_dropped += 1;
        self.batch.remove(key.to_vec());
    }

    /// One document: its changes noted as held; saved again whole when its stored value
    /// does not match what it reads as; dropped, with its snapshot and appended changes,
    /// when it does not read back.
    fn document(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let store = self.store;
        self.report.documents += 1;
        let doc_key = layout::doc_key_of(key);
        let loaded = StoredDoc::decode(value).and_then(|mut stored| {
            RecordId::from_doc_key(doc_key)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            load_document(store, doc_key, &mut stored)
                .map(|(doc, matches, appended)| (doc, stored, matches, appended))
        });
        let (report, batch, held) = (&mut self.report, &mut self.batch, &mut self.held);
        match loaded {
            Ok((doc, mut stored, matches, appended)) => {
                for change in doc.changes(&[]) {
                    held.insert(short(&change.hash().0));
                }
                for hash in doc.epoch().map(|epoch| epoch.cut()).unwrap_or_default() {
                    held.insert(short(&hash.0));
                }
                if !matches {
                    // Saved again whole, as it reads now.
                    report.documents_mended += 1;
                    stored.set_heads(&doc.heads());
                    stored.set_record_state(document::state(doc.local()));
                    stored.changes.clear();
                    for hash in &appended.hashes {
                        batch.remove(layout::appended_key(doc_key, hash));
                    }
                    let (snapshot, epoch) = doc.save();
                    stored.place_snapshot(batch, doc_key, snapshot, epoch);
                    batch.put(key.to_vec(), stored.encode());
                }
            }
            Err(error) => {
                tracing::warn!(doc = %String::from_utf8_lossy(doc_key), %error, "a document that does not read back is dropped");
                report.documents_dropped += 1;
                batch.remove(key.to_vec());
                batch.remove(layout::snapshot_key(doc_key));
                for_each_entry(store, &layout::appended_prefix(doc_key), |key, _| {
                    batch.remove(key.to_vec());
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Snapshots and appended changes whose document is gone, or whose key does not parse.
    fn drop_orphans(&mut self) -> Result<(), StoreError> {
        let store = self.store;
        for_each_entry(store, layout::SNAPSHOTS_PREFIX, |key, _| {
            if store
                .get(&layout::doc_key(layout::doc_key_of(key)))?
                .is_none()
            {
                self.drop_value(key);
            }
            Ok(())
        })?;
        self.flush()?;
        for_each_entry(store, layout::APPENDED_PREFIX, |key, _| {
            let orphan = match layout::appended_parts(key) {
                Ok((doc_key, _)) => store.get(&layout::doc_key(doc_key))?.is_none(),
                Err(_) => true,
            };
            if orphan {
                self.drop_value(key);
            }
            Ok(())
        })?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::{apply_write, RecordWrite};
    use crate::record::NodeId;
    use crate::store::layout::LogEntry;
    use crate::store::{DocStore, DocStoreConfig, Durability, MemoryStore};
    use serde_json::json;

    #[test]
    fn a_copy_that_disagrees_with_itself_is_mended_and_opens() {
        let writer = NodeId([5; 16]);
        let docs = DocStore::open(MemoryStore::new(), writer, DocStoreConfig::default()).unwrap();
        let actor = writer.actor(0);
        for i in 0..20 {
            let id = RecordId::parse(&format!("t/r{i}")).unwrap();
            let write = RecordWrite {
                set: vec![("n".to_owned(), json!(i))],
                ..Default::default()
            };
            docs.write(&id, &actor, 1_000, Durability::Durable, |tx| {
                apply_write(tx, &write)
            })
            .unwrap();
        }
        let store = docs.backend().durable_copy();
        drop(docs);
        // A log entry whose change is not held, a document that does not read, a document
        // whose recorded heads are not its own: what a copy taken mid-write can hold.
        let mut batch = Batch::default();
        let entry = LogEntry {
            doc_key: b"t/r0".to_vec(),
            hash: [9; 32],
            tags: Vec::new(),
        };
        batch.put(layout::log_key(&writer, 999), layout::encode(&entry));
        batch.put(layout::doc_key(b"t/r1"), b"garbage".to_vec());
        let mut stored: StoredDoc = layout::decode(
            "document",
            &store.get(&layout::doc_key(b"t/r2")).unwrap().unwrap(),
        )
        .unwrap();
        stored.heads = vec![[7; 32]];
        batch.put(layout::doc_key(b"t/r2"), stored.encode());
        store.apply(batch).unwrap();
        store.flush().unwrap();
        let report = check_and_mend(&store, |_, _| {}).unwrap();
        assert_eq!(report.documents, 20);
        assert_eq!(report.documents_dropped, 1);
        assert_eq!(report.documents_mended, 1);
        assert_eq!(report.log_entries_dropped, 2, "{report:?}");
        let docs = DocStore::open(store, writer, DocStoreConfig::default()).unwrap();
        let r2 = RecordId::parse("t/r2").unwrap();
        assert_eq!(
            docs.read(&r2, |doc| document::read(doc.local()))
                .unwrap()
                .unwrap()["n"],
            json!(2)
        );
        assert_eq!(
            docs.origin_mark(&writer),
            1,
            "the log stops before t/r1's change"
        );
    }
}
