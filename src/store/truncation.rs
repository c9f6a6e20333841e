//! Truncating the replication log below what every replica holds, and the local followers of
//! the log that hold it back.
//!
//! The entries of an origin's log that every node known holds are stable (see
//! [`crate::sync::stability`]): no peer needs them from the log. Once every local follower
//! (a binding that writes records out to its table, following the log) has read them too,
//! they are dropped. An origin's *floor* says how far: every entry at or below it is gone, and
//! a peer that lacks one of them is caught up by whole documents ([`crate::sync`]).
//!
//! Guarantees:
//! - entries are dropped only up to a place this store holds every entry up to (its
//!   contiguous mark), and only up to where every follower read;
//! - nothing is dropped while anything is granted or revoked: a revoked node's changes count
//!   or not by their places, which a node caught up by documents would not be sent (a cluster
//!   that grants may revoke);
//! - the entries and the new floor go in one batch; a floor only rises;
//! - after a restart the marks still count every place at or below a floor as held, and this
//!   store's own log continues above its floor, never at a place used before;
//! - a follower's marks are written with the follower's own progress, in its sessions.

use std::collections::BTreeMap;

use automerge::ChangeHash;

use super::documents::for_each_entry;
use super::layout::{self, FollowerMarks};
use super::{DocStore, Durability, Store, StoreError, WriteSession};
use crate::record::NodeId;

/// Most log entries one call of [`DocStore::reclaim_log`] drops: one batch, bounded. The
/// engine calls it every summary interval (a second), and at once again while a call stops
/// at this bound, with nothing compacted in between, so a backlog goes in back-to-back steps
/// however large it is, each a few milliseconds, and anything that arrives meanwhile waits
/// for one step at most. After a catch-up of 20,000 records, steps of 4,096 took 6-33 ms each
/// (the write-to-visible p99 16.4 ms), steps of 1,024 took 1.6-3.6 ms (6.5 ms).
pub const TRUNCATE_ENTRIES_PER_STEP: usize = 1_024;

/// Every origin's floor, as the store keeps them.
pub(super) fn scan_floors<S: Store>(store: &S) -> Result<BTreeMap<NodeId, u64>, StoreError> {
    let prefix = layout::floor_prefix();
    let mut floors = BTreeMap::new();
    for_each_entry(store, &prefix, |key, value| {
        let origin = layout::node_after(&prefix, key)?;
        floors.insert(origin, layout::decode_u64("a log floor", value)?);
        Ok(())
    })?;
    Ok(floors)
}

impl<S: Store> DocStore<S> {
    /// The place at and below which `origin`'s log entries are gone (0: none are).
    pub fn log_floor(&self, origin: &NodeId) -> u64 {
        self.inner().floors.get(origin).copied().unwrap_or(0)
    }

    /// Every local follower of the log, with how far it read each origin's log.
    pub fn followers(&self) -> Result<Vec<(String, FollowerMarks)>, StoreError> {
        let prefix = layout::follower_prefix();
        let mut followers = Vec::new();
        for_each_entry(self.backend(), &prefix, |key, value| {
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            followers.push((name, layout::decode("follower marks", value)?));
            Ok(())
        })?;
        Ok(followers)
    }

    /// How far the follower `name` read each origin's log, if it is a follower.
    pub fn follower_marks(&self, name: &str) -> Result<Option<FollowerMarks>, StoreError> {
        self.state(&layout::follower_name(name))?
            .map(|value| layout::decode("follower marks", &value))
            .transpose()
    }

    /// Drops, for every origin, the log entries every known node holds (`stable`: the place
    /// up to which they all do) that every follower read, at most
    /// [`TRUNCATE_ENTRIES_PER_STEP`] in all; returns how many it dropped.
    pub fn reclaim_log(&self, stable: &[(NodeId, u64)]) -> Result<usize, StoreError> {
        // A revoked node's changes count or not by their places, and a node caught up by
        // documents gets them without: logs are kept whole while anything is granted or
        // revoked (a revocation can follow any grant).
        if self.door.get().is_some_and(|door| !door.is_open()) {
            return Ok(0);
        }
        let followers = self.followers()?;
        let mut dropped = 0;
        for (origin, stable) in stable {
            let read = followers
                .iter()
                .map(|(_, marks)| {
                    marks
                        .iter()
                        .find(|(o, _)| *o == origin.0)
                        .map_or(0, |(_, mark)| *mark)
                })
                .min()
                .unwrap_or(u64::MAX);
            // The entry at the stable mark stays: it is what peers compare their marks with.
            let through = stable.saturating_sub(1).min(read);
            if dropped >= TRUNCATE_ENTRIES_PER_STEP {
                break;
            }
            dropped += self.truncate_log(origin, through, TRUNCATE_ENTRIES_PER_STEP - dropped)?;
        }
        Ok(dropped)
    }

    /// Drops at most `limit` entries of `origin`'s log at or below `through` (no further than
    /// the place up to which every entry is held), and raises its floor over them.
    pub fn truncate_log(
        &self,
        origin: &NodeId,
        through: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let (floor, through) = {
            let inner = self.inner();
            let held = inner
                .origins
                .get(origin)
                .map_or(0, |progress| progress.contiguous);
            let floor = inner.floors.get(origin).copied().unwrap_or(0);
            (floor, through.min(held))
        };
        if through <= floor || limit == 0 {
            return Ok(0);
        }
        let entries = self.log_entries(origin, floor, limit)?;
        let gone: Vec<u64> = entries
            .iter()
            .map(|(sequence, _)| *sequence)
            .take_while(|sequence| *sequence <= through)
            .collect();
        let stable = entries
            .iter()
            .take(gone.len())
            .map(|(_, entry)| (entry.doc_key.clone(), ChangeHash(entry.hash)))
            .collect();
        // Entries past a full page may be left below `through`: the floor stops at the last
        // one dropped, so it never names a place whose entry is still here.
        let new_floor = match gone.last() {
            Some(last) if entries.len() == limit && gone.len() == limit => *last,
            _ => through,
        };
        let mut session = self.session();
        for sequence in &gone {
            session.batch.remove(layout::log_key(origin, *sequence));
        }
        session.put_state(
            &layout::floor_name(origin),
            new_floor.to_be_bytes().to_vec(),
        );
        session.commit(Durability::Deferred)?;
        self.inner().floors.insert(*origin, new_floor);
        self.note_stable(origin, stable);
        Ok(gone.len())
    }
}

impl<S: Store> WriteSession<'_, S> {
    /// Queues the marks of the follower `name` (how far it read each origin's log).
    pub fn put_follower_marks(&mut self, name: &str, marks: &FollowerMarks) {
        self.put_state(&layout::follower_name(name), layout::encode(marks));
    }

    /// Queues the removal of the follower `name`: it no longer holds the log back.
    pub fn remove_follower(&mut self, name: &str) {
        self.remove_state(&layout::follower_name(name));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::record::document::{apply_write, RecordWrite};
    use crate::record::RecordId;
    use crate::store::{DocStoreConfig, MemoryStore};

    fn write(docs: &DocStore<MemoryStore>, node: NodeId, key: usize, value: i64) {
        let id = RecordId::parse(&format!("c/{key}")).unwrap();
        let write = RecordWrite {
            set: vec![("n".to_owned(), json!(value))],
            ..RecordWrite::default()
        };
        docs.write(&id, &node.actor(0), 0, Durability::Durable, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
    }

    fn sequences(docs: &DocStore<MemoryStore>, origin: &NodeId) -> Vec<u64> {
        let entries = docs.log_entries(origin, 0, 1000).unwrap();
        entries.into_iter().map(|(sequence, _)| sequence).collect()
    }

    #[test]
    fn a_truncated_log_keeps_its_marks_and_its_writer_never_reuses_a_place() {
        let store = MemoryStore::new();
        let node = NodeId([7; 16]);
        let docs = DocStore::open(store.clone(), node, DocStoreConfig::default()).unwrap();
        for value in 0..10 {
            write(&docs, node, value as usize % 3, value);
        }
        // Not past what is held, and a page at a time.
        assert_eq!(docs.truncate_log(&node, 4, 3).unwrap(), 3);
        assert_eq!(docs.log_floor(&node), 3);
        assert_eq!(docs.truncate_log(&node, 4, 3).unwrap(), 1);
        assert_eq!(docs.log_floor(&node), 4);
        assert_eq!(sequences(&docs, &node), (5..=10).collect::<Vec<_>>());
        assert_eq!(docs.truncate_log(&node, 99, 100).unwrap(), 6);
        assert_eq!(docs.log_floor(&node), 10);
        assert_eq!(docs.origin_mark(&node), 10);
        // Documents keep every change: only the log's entries went.
        let id = RecordId::parse("c/0").unwrap();
        let fields = docs
            .read(&id, |doc| crate::record::document::read(doc.local()))
            .unwrap()
            .unwrap();
        assert_eq!(fields["n"], json!(9));
        docs.sync().unwrap();
        drop(docs);
        store.crash(0);
        let docs = DocStore::open(store, node, DocStoreConfig::default()).unwrap();
        assert_eq!(docs.origin_mark(&node), 10);
        assert_eq!(docs.log_floor(&node), 10);
        write(&docs, node, 5, 1);
        assert_eq!(sequences(&docs, &node), vec![11]);
        assert_eq!(docs.origin_mark(&node), 11);
    }

    #[test]
    fn followers_and_the_stable_mark_hold_truncation_back() {
        let node = NodeId([7; 16]);
        let docs = DocStore::open(MemoryStore::new(), node, DocStoreConfig::default()).unwrap();
        for value in 0..10 {
            write(&docs, node, 0, value);
        }
        let mut session = docs.session();
        session.put_follower_marks("out-table", &vec![(node.0, 3)]);
        session.commit(Durability::Deferred).unwrap();
        // Stable up to 8: the follower read only 3.
        assert_eq!(docs.reclaim_log(&[(node, 8)]).unwrap(), 3);
        assert_eq!(docs.log_floor(&node), 3);
        let mut session = docs.session();
        session.put_follower_marks("out-table", &vec![(node.0, 10)]);
        session.commit(Durability::Deferred).unwrap();
        // The entry at the stable mark stays.
        assert_eq!(docs.reclaim_log(&[(node, 8)]).unwrap(), 4);
        assert_eq!(sequences(&docs, &node), vec![8, 9, 10]);
        // A follower that lists no entry of an origin read none of it.
        let other = NodeId([8; 16]);
        let mut session = docs.session();
        session.put_follower_marks("out-table", &vec![(other.0, 10)]);
        session.commit(Durability::Deferred).unwrap();
        assert_eq!(docs.reclaim_log(&[(node, 10)]).unwrap(), 0);
        let mut session = docs.session();
        session.remove_follower("out-table");
        session.commit(Durability::Deferred).unwrap();
        assert_eq!(docs.reclaim_log(&[(node, 10)]).unwrap(), 2);
        assert_eq!(sequences(&docs, &node), vec![10]);
    }
}
