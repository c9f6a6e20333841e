//! The store side of replication, as the engine sees it: the [`Replica`] trait and its
//! implementation by [`DocStore`].

use automerge::ChangeHash;

use crate::record::NodeId;
use crate::store::digest::Aggregate;
use crate::store::{
    Adoption, ApplyReport, DocStore, DocumentHeadsEntry, LogPage, LoggedChange, Store, StoreError,
    UnloggedOutcome, Unplaced,
};

/// The store side of replication. [`DocStore`] is the implementation; tests and the simulator
/// use it over a memory store.
pub trait Replica {
    fn origin_marks(&self) -> Vec<(NodeId, u64)>;
    /// The sequence up to which `origin`'s whole log is held (0 for an origin not held).
    fn origin_mark(&self, origin: &NodeId) -> u64;
    /// The hash of the change at `(origin, sequence)` of the log, if held.
    fn log_hash(&self, origin: &NodeId, sequence: u64) -> Result<Option<ChangeHash>, StoreError>;
    /// Entries of `origin`'s log after `after`: at most `limit`, and no more once `bytes_max`
    /// bytes of changes are gathered.
    fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<LoggedChange>, StoreError>;
    /// [`Replica::log_after`] of what `reader` may read (everything, for `None`), looking
    /// through at most `limit` entries: with the place up to which the log was looked
    /// through, and the places whose changes were compacted away.
    fn log_readable_after(
        &self,
        reader: Option<&NodeId>,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<LogPage, StoreError>;
    /// Whether `reader` may read every record (no grant narrows it).
    fn reads_all(&self, reader: &NodeId) -> bool;
    /// Whether `wider` may read every record `narrower` may read.
    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool;
    /// Whether `reader` may read the document as it stands here.
    fn may_read_document(&self, reader: &NodeId, doc_key: &[u8]) -> Result<bool, StoreError>;
    /// Whether `node` was revoked.
    fn is_revoked(&self, node: &NodeId) -> bool;
    /// Whether `node` was removed from the cluster.
    fn is_removed(&self, node: &NodeId) -> bool;
    /// Whether this node refused the change `hash` to the document.
    fn refused_contains(&self, doc_key: &[u8], hash: &ChangeHash) -> Result<bool, StoreError>;
    /// Whether the log holds `(origin, sequence)`.
    fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool;
    /// A sender covered `origin`'s log after `after` up to `through` for this node (see
    /// [`Message::Covered`]); says whether the mark moved.
    fn cover(&self, origin: &NodeId, after: u64, through: u64) -> Result<bool, StoreError>;
    /// Applies changes from a peer (none stamped past `accept_until_ms`); durable only after
    /// [`Replica::sync`].
    fn apply_remote(
        &self,
        changes: Vec<LoggedChange>,
        accept_until_ms: u64,
    ) -> Result<ApplyReport, StoreError>;
    /// A document's changes that are not ancestors of `have`, within `limit` changes and
    /// `bytes_max` bytes; and whether that is all of them.
    fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), StoreError>;
    /// Applies changes fetched for a document outside the log; durable only after
    /// [`Replica::sync`]. `unplaced`: what becomes of a revoked node's changes among them.
    fn apply_unlogged(
        &self,
        doc_key: &[u8],
        changes: Vec<Vec<u8>>,
        accept_until_ms: u64,
        unplaced: Unplaced,
    ) -> Result<UnloggedOutcome, StoreError>;
    fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError>;
    /// A repair bucket's aggregate: of every document held, or with a `reader`, of those it
    /// may read.
    fn digest(
        &self,
        reader: Option<&NodeId>,
        prefix: &str,
    ) -> Result<Option<Aggregate>, StoreError>;
    /// The documents of leaf buckets, with a `reader` only those it may read.
    fn leaf_documents(
        &self,
        leaves: &[String],
        limit: usize,
        reader: Option<&NodeId>,
    ) -> Result<Vec<(String, Vec<DocumentHeadsEntry>)>, StoreError>;
    /// Takes out documents a wider peer found outside this node's read scope; those that
    /// were held.
    fn withdraw(&self, doc_keys: &[&[u8]]) -> Result<Vec<Vec<u8>>, StoreError>;
    fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError>;
    /// Makes everything applied so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// The nodes replication knows, kept across restarts, with their names.
    fn known_nodes(&self) -> Result<Vec<(NodeId, String)>, StoreError>;
    /// Keeps `node` among the nodes known.
    fn note_known_node(&self, node: &NodeId, name: &str) -> Result<(), StoreError>;
    /// The place at and below which `origin`'s log was truncated (0: none).
    fn log_floor(&self, origin: &NodeId) -> u64;
    /// Truncates the logs up to the stable marks given, as far as local followers allow.
    fn reclaim_log(&self, stable: &[(NodeId, u64)]) -> Result<usize, StoreError>;
    /// Documents waiting to be compacted.
    fn compaction_pending(&self) -> usize;
    /// The document compacted, saved whole with its epoch, when a peer holding `have` of it
    /// lacks part of its compacted history.
    fn compacted_for(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
    ) -> Result<Option<crate::store::stable::SavedCompacted>, StoreError>;
    /// Takes in a document compacted elsewhere, unless any of it is stamped past
    /// `accept_until_ms` (see [`DocStore::adopt_compacted`]).
    fn adopt_compacted(
        &self,
        doc_key: &[u8],
        snapshot: &[u8],
        epoch: &[u8],
        accept_until_ms: u64,
    ) -> Result<Adoption, StoreError>;
    /// Compacts a bounded number of the documents whose changes truncation found stable;
    /// asked only while no change concurrent with what is stable can still arrive.
    fn compact_stable(&self) -> Result<crate::store::Compacted, StoreError>;
    /// Up to `limit` document keys after `after`, in order.
    fn documents_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;
}

impl<S: Store> Replica for DocStore<S> {
    fn origin_marks(&self) -> Vec<(NodeId, u64)> {
        DocStore::origin_marks(self)
    }
    fn origin_mark(&self, origin: &NodeId) -> u64 {
        DocStore::origin_mark(self, origin)
    }
    fn log_hash(&self, origin: &NodeId, sequence: u64) -> Result<Option<ChangeHash>, StoreError> {
        DocStore::log_hash(self, origin, sequence)
    }
    fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        DocStore::log_after(self, origin, after, limit, bytes_max)
    }
    fn log_readable_after(
        &self,
        reader: Option<&NodeId>,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<LogPage, StoreError> {
        DocStore::log_readable_after(self, reader, origin, after, limit, bytes_max)
    }
    fn reads_all(&self, reader: &NodeId) -> bool {
        DocStore::reads_all(self, reader)
    }
    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool {
        DocStore::reads_at_least(self, wider, narrower)
    }
    fn may_read_document(&self, reader: &NodeId, doc_key: &[u8]) -> Result<bool, StoreError> {
        DocStore::may_read_document(self, reader, doc_key)
    }
    fn is_revoked(&self, node: &NodeId) -> bool {
        DocStore::is_revoked(self, node)
    }

    fn is_removed(&self, node: &NodeId) -> bool {
        DocStore::is_removed(self, node)
    }
    fn refused_contains(&self, doc_key: &[u8], hash: &ChangeHash) -> Result<bool, StoreError> {
        DocStore::refused_contains(self, doc_key, hash)
    }
    fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool {
        DocStore::log_holds(self, origin, sequence)
    }
    fn cover(&self, origin: &NodeId, after: u64, through: u64) -> Result<bool, StoreError> {
        DocStore::cover(self, origin, after, through)
    }
    fn apply_remote(
        &self,
        changes: Vec<LoggedChange>,
        accept_until_ms: u64,
    ) -> Result<ApplyReport, StoreError> {
        DocStore::apply_remote(self, changes, accept_until_ms)
    }
    fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), StoreError> {
        DocStore::document_changes(self, doc_key, have, limit, bytes_max)
    }
    fn apply_unlogged(
        &self,
        doc_key: &[u8],
        changes: Vec<Vec<u8>>,
        accept_until_ms: u64,
        unplaced: Unplaced,
    ) -> Result<UnloggedOutcome, StoreError> {
        DocStore::apply_unlogged(self, doc_key, changes, accept_until_ms, unplaced)
    }
    fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
        DocStore::heads(self, doc_key)
    }
    fn digest(
        &self,
        reader: Option<&NodeId>,
        prefix: &str,
    ) -> Result<Option<Aggregate>, StoreError> {
        match reader {
            Some(reader) => DocStore::scoped_digest(self, reader, prefix),
            None => Ok(DocStore::digest(self, prefix)),
        }
    }
    fn leaf_documents(
        &self,
        leaves: &[String],
        limit: usize,
        reader: Option<&NodeId>,
    ) -> Result<Vec<(String, Vec<DocumentHeadsEntry>)>, StoreError> {
        DocStore::leaf_documents(self, leaves, limit, reader)
    }
    fn withdraw(&self, doc_keys: &[&[u8]]) -> Result<Vec<Vec<u8>>, StoreError> {
        DocStore::withdraw(self, doc_keys)
    }
    fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError> {
        DocStore::missing_changes(self, doc_key, hashes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        DocStore::sync(self)
    }
    fn known_nodes(&self) -> Result<Vec<(NodeId, String)>, StoreError> {
        DocStore::known_nodes(self)
    }
    fn note_known_node(&self, node: &NodeId, name: &str) -> Result<(), StoreError> {
        DocStore::note_known_node(self, node, name)
    }
    fn log_floor(&self, origin: &NodeId) -> u64 {
        DocStore::log_floor(self, origin)
    }
    fn reclaim_log(&self, stable: &[(NodeId, u64)]) -> Result<usize, StoreError> {
        DocStore::reclaim_log(self, stable)
    }
    fn compact_stable(&self) -> Result<crate::store::Compacted, StoreError> {
        DocStore::compact_stable(self)
    }
    fn compacted_for(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
    ) -> Result<Option<crate::store::stable::SavedCompacted>, StoreError> {
        DocStore::compacted_for(self, doc_key, have)
    }
    fn compaction_pending(&self) -> usize {
        DocStore::compaction_pending(self)
    }
    fn adopt_compacted(
        &self,
        doc_key: &[u8],
        snapshot: &[u8],
        epoch: &[u8],
        accept_until_ms: u64,
    ) -> Result<Adoption, StoreError> {
        DocStore::adopt_compacted(self, doc_key, snapshot, epoch, accept_until_ms)
    }
    fn documents_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        DocStore::documents_after(self, after, limit)
    }
}
