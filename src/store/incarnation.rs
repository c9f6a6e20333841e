//! A store's incarnation: the writer it writes under.
//!
//! A node's identity is its certificate's id; what its store writes goes under the store's
//! *writer*, the origin of its own log and the first 16 bytes of every actor it writes with.
//! Automerge refuses two different changes with one actor and sequence, and so does the log
//! with one origin and sequence, so a writer must never be used by two histories. A store
//! draws a new writer whenever it is made (an empty store: a new node, or one whose store was
//! lost), brought back from a backup ([`new_incarnation`]), or found to be behind or beside
//! what its peers hold of its own log ([`super::DocStore::switch_writer`]). Every former
//! writer stays listed, so the node still knows its own older changes as its own.
//!
//! Guarantees: a writer is drawn at random by the caller (128 bits) and recorded durably
//! before anything is written under it; the owner (the node id) of a store never changes;
//! a store made before incarnations keeps writing under its node's id.

use std::collections::BTreeSet;

use super::layout;
use super::{Batch, Store, StoreError};
use crate::record::origin::NODE_ID_BYTES;
use crate::record::NodeId;

/// Most writers one store may have had: each restore, loss or divergence adds one. Past it
/// the oldest are forgotten as this node's (their changes stay, as anyone's).
pub const FORMER_WRITERS_MAX: usize = 4096;

/// How a store's incarnation came to be, as [`claim_writer`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incarnation {
    /// The store was already claimed: it goes on writing under its writer.
    Continued,
    /// The store was empty: a new writer was drawn for it.
    Created,
    /// A store made before incarnations: it writes under its node's id, as it always did.
    Legacy,
}

fn node_id(bytes: &[u8], what: &str) -> Result<NodeId, StoreError> {
    <[u8; NODE_ID_BYTES]>::try_from(bytes)
        .map(NodeId)
        .map_err(|_| StoreError::Corrupt(what.to_owned()))
}

/// The writer `store` writes under now, if it has one.
pub fn current_writer<S: Store>(store: &S) -> Result<Option<NodeId>, StoreError> {
    store
        .get(&layout::meta_key(layout::META_NODE_ID))?
        .map(|bytes| node_id(&bytes, "the store's writer id"))
        .transpose()
}

/// The writers `store` wrote under before its current one, oldest first.
pub fn former_writers<S: Store>(store: &S) -> Result<Vec<NodeId>, StoreError> {
    let Some(bytes) = store.get(&layout::meta_key(layout::META_FORMER_WRITERS))? else {
        return Ok(Vec::new());
    };
    if bytes.len() % NODE_ID_BYTES != 0 {
        return Err(StoreError::Corrupt("the store's former writers".to_owned()));
    }
    bytes
        .chunks(NODE_ID_BYTES)
        .map(|chunk| node_id(chunk, "a former writer id"))
        .collect()
}

/// The writer `owner` writes under in `store`: the store's own, or, for an empty store,
/// `fresh` (drawn at random by the caller), so that a store that was lost and made again never
/// writes under an actor and sequence that its lost self already used. A store that belongs
/// to another node is refused.
pub fn claim_writer<S: Store>(
    store: &S,
    owner: NodeId,
    fresh: NodeId,
) -> Result<(NodeId, Incarnation), StoreError> {
    let owner_key = layout::meta_key(layout::META_OWNER);
    match (store.get(&owner_key)?, current_writer(store)?) {
        (Some(stored), _) if stored != owner.0 => Err(StoreError::WrongNode {
            stored: hex::encode(stored),
            expected: owner.to_string(),
        }),
        (Some(_), Some(writer)) => Ok((writer, Incarnation::Continued)),
        (None, Some(writer)) if writer != owner => Err(StoreError::WrongNode {
            stored: writer.to_string(),
            expected: owner.to_string(),
        }),
        (None, Some(writer)) => {
            let mut batch = Batch::default();
            batch.put(owner_key, owner.0.to_vec());
            store.apply(batch)?;
            store.flush()?;
            Ok((writer, Incarnation::Legacy))
        }
        (_, None) => {
            new_incarnation(store, owner, fresh)?;
            Ok((fresh, Incarnation::Created))
        }
    }
}

/// Makes `writer` (new, drawn at random by the caller) the writer of `store`, which belongs to
/// `owner`: from now on the store writes under it, its log starting at 1. What it wrote before
/// stays, as the log of another origin, and the writer it replaces is listed among its former
/// ones. For a store brought back from a backup, whose old writer its peers may have seen
/// further than the backup reaches. Durable when it returns.
pub fn new_incarnation<S: Store>(
    store: &S,
    owner: NodeId,
    writer: NodeId,
) -> Result<(), StoreError> {
    let mut former = former_writers(store)?;
    if let Some(current) = current_writer(store)? {
        assert!(current != writer, "a new incarnation draws a new writer");
        former.push(current);
    }
    if former.len() > FORMER_WRITERS_MAX {
        former.drain(..former.len() - FORMER_WRITERS_MAX);
    }
    let mut batch = Batch::default();
    batch.put(layout::meta_key(layout::META_OWNER), owner.0.to_vec());
    batch.put(layout::meta_key(layout::META_NODE_ID), writer.0.to_vec());
    batch.put(
        layout::meta_key(layout::META_FORMER_WRITERS),
        former.iter().flat_map(|id| id.0).collect(),
    );
    store.apply(batch)?;
    store.flush()
}

/// Every writer of a store, its current one among them: whose changes are this node's own.
#[derive(Debug, Clone)]
pub struct Writers {
    pub current: NodeId,
    pub former: BTreeSet<NodeId>,
}

impl Writers {
    pub fn load<S: Store>(store: &S, current: NodeId) -> Result<Self, StoreError> {
        Ok(Self {
            current,
            former: former_writers(store)?.into_iter().collect(),
        })
    }

    /// Whether `writer` is, or was, this store's.
    pub fn owns(&self, writer: &NodeId) -> bool {
        *writer == self.current || self.former.contains(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_store_keeps_its_writer_and_lists_every_one_it_had() {
        let store = MemoryStore::new();
        let owner = NodeId([1; 16]);
        let (first, how) = claim_writer(&store, owner, NodeId([2; 16])).unwrap();
        assert_eq!((first, how), (NodeId([2; 16]), Incarnation::Created));
        let (again, how) = claim_writer(&store, owner, NodeId([3; 16])).unwrap();
        assert_eq!((again, how), (first, Incarnation::Continued));
        new_incarnation(&store, owner, NodeId([4; 16])).unwrap();
        let (now, _) = claim_writer(&store, owner, NodeId([5; 16])).unwrap();
        assert_eq!(now, NodeId([4; 16]));
        let writers = Writers::load(&store, now).unwrap();
        assert!(writers.owns(&NodeId([2; 16])) && writers.owns(&NodeId([4; 16])));
        assert!(!writers.owns(&NodeId([3; 16])));
        // Another node's store is refused.
        assert!(matches!(
            claim_writer(&store, NodeId([9; 16]), NodeId([6; 16])),
            Err(StoreError::WrongNode { .. })
        ));
    }
}
