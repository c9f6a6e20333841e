//! Documents on top of a [`Store`]: load, write, merge, list, with a bounded cache.
//!
//! Writes go through a [`WriteSession`], which holds the store's lock, takes every document
//! it touches out of the cache into its own working set, edits them there, and commits them
//! as one atomic batch: one write is a session of one, a bulk load is a session of a
//! thousand. Only a committed session puts its documents back into the cache; one dropped
//! without committing drops them, so the cache never runs ahead of the disk, and no eviction
//! mid-session can lose its work.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use lru::LruCache;

use super::digest::DigestTree;
use super::group_commit::GroupCommit;
use super::incarnation::Writers;
use super::layout::{
    self, LogEntry, RefusalReason, ScopeTag, Snapshot, StoredDoc, SNAPSHOT_INLINE_BYTES_MAX,
};
use super::{Batch, Store, StoreError};
use crate::record::document::CHANGE_BYTES_MAX;
use crate::record::origin::{check_source_name, SOURCES_PER_NODE_MAX};
use crate::record::stamp::{self, ChangeStamp};
use crate::record::{document, Collection, Key, NodeId, RecordError, RecordId};

/// Documents kept loaded unless the config says otherwise (~20 KB each when loaded).
pub const CACHE_DOCUMENTS_DEFAULT: usize = 4096;
/// Most documents the cache may be configured to hold.
pub const CACHE_DOCUMENTS_MAX: usize = 1_000_000;
/// Memory the cache's documents may take unless the config says otherwise, in MiB: a
/// document's history grows with every change, so a count alone does not bound the cache.
pub const CACHE_MIB_DEFAULT: usize = 64;
/// Most memory the cache may be configured to take, in MiB.
pub const CACHE_MIB_MAX: usize = 64 * 1024;
/// Memory a loaded Automerge document takes whatever it holds, and per operation in its
/// history, as measured (`CONCORD_MEASURE_CHANGES=N cargo test --release -p concord --lib
/// loaded_document_memory -- --ignored --nocapture`): the loaded form keeps every operation
/// ever made, uncompressed, so it outgrows the saved form many times over.
pub const LOADED_DOCUMENT_BYTES: usize = 16 * 1024;
pub const LOADED_BYTES_PER_OP: usize = 100;
/// Appended changes of one document before they are compacted into its snapshot.
pub const COMPACT_AFTER_CHANGES_DEFAULT: u32 = 32;
/// Most appended changes one may configure before compaction.
pub const COMPACT_AFTER_CHANGES_MAX: u32 = 10_000;
/// Bytes of appended changes of one document that force a compaction, whatever their count.
pub const COMPACT_AFTER_BYTES: usize = 16 * 1024;
/// Entries read from the store per page when scanning.
pub const SCAN_PAGE_ENTRIES: usize = 512;
/// Most documents one write session may touch.
pub const SESSION_DOCUMENTS_MAX: usize = 100_000;

#[derive(Debug, Clone)]
pub struct DocStoreConfig {
    pub cache_documents: NonZeroUsize,
    /// Memory the cached documents may take, by their weight ([`Loaded::weight`]).
    pub cache_bytes: usize,
    pub compact_after_changes: u32,
}

impl Default for DocStoreConfig {
    fn default() -> Self {
        Self {
            cache_documents: NonZeroUsize::new(CACHE_DOCUMENTS_DEFAULT).expect("nonzero constant"),
            cache_bytes: CACHE_MIB_DEFAULT * 1024 * 1024,
            compact_after_changes: COMPACT_AFTER_CHANGES_DEFAULT,
        }
    }
}

/// Judges every change before it is stored, by the scopes its author's grant allows (see
/// [`crate::scope`]): this node's own writes (API, CLI, imports, adapters: they all write
/// through [`WriteSession::write`] or merge), and changes from peers, relayed or fetched, by
/// the same rule, so every node decides alike about a change.
pub trait WriteDoor: Send + Sync {
    /// This node's id: the author of its own writes.
    fn node(&self) -> NodeId;
    /// Whether nothing is granted nor revoked: then every change is allowed, unread.
    fn is_open(&self) -> bool;
    /// The verdict on a change by `author` (`None`: it names none) at `place` (its origin's
    /// log place; `None` for a write of this node's own or a change fetched outside the log)
    /// to a record of `collection`, when it does not depend on the record; `None` when it does.
    fn verdict(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
    ) -> Option<Result<(), RefusalReason>>;
    /// The verdict on such a change that leaves a record of `collection` as `after`,
    /// from `before` (`None`: missing or deleted).
    fn judge(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
        before: Option<&serde_json::Map<String, serde_json::Value>>,
        after: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(), RefusalReason>;
    /// Why this node may not write that record of `collection`, in a sentence for its user.
    fn explain(&self, reason: RefusalReason, collection: &str) -> String;
    /// The fields that read filters name for records of `collection`, sorted: the log keeps
    /// their values beside each change of such a record ([`layout::LogEntry::tags`]).
    fn filter_fields(&self, collection: &str) -> Vec<String>;
    /// Whether `reader` may read a record of `collection` that had one of `tags`' values;
    /// `None` when the tags do not say (a field they lack).
    fn may_read_tagged(&self, reader: &NodeId, collection: &str, tags: &[ScopeTag])
        -> Option<bool>;
    /// Whether `reader` may read a live record of `collection` whose fields are `fields`.
    fn may_read(
        &self,
        reader: &NodeId,
        collection: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> bool;
    /// Whether `reader` reads every record.
    fn reads_all(&self, reader: &NodeId) -> bool;
    /// Whether `wider` may read every record that `narrower` may read.
    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool;
    /// A text that changes whenever what `reader` may read changes (its read scopes, or
    /// its revocation).
    fn read_scopes_key(&self, reader: &NodeId) -> String;
    /// Whether `node` was revoked.
    fn is_revoked(&self, node: &NodeId) -> bool;
    /// A place of revoked `author`'s log that still counts (its cut-off), if any does.
    fn counted_place(&self, author: &NodeId) -> Option<(NodeId, u64)>;
}

/// Kept changes of one document read per page when a write checks them.
const KEPT_PAGE_ENTRIES: usize = 256;

/// When a commit returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the writes are durable (group commit with concurrent writers).
    Durable,
    /// At once; durable after the next [`DocStore::sync`] or durable commit.
    Deferred,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOutcome {
    /// The change it made, or `None` when the write changed nothing.
    pub change: Option<ChangeHash>,
    /// The document's heads after the write.
    pub heads: Vec<ChangeHash>,
}

/// What an import merged in.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportOutcome {
    pub new_changes: usize,
    pub heads: Vec<ChangeHash>,
}

/// A record as listed from the store, without loading its document.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub id: RecordId,
    pub stored: StoredDoc,
}

pub(super) struct Loaded {
    pub(super) doc: Automerge,
    pub(super) stored: StoredDoc,
}

impl Loaded {
    fn empty() -> Self {
        Self {
            doc: Automerge::new(),
            stored: StoredDoc::default(),
        }
    }

    /// The memory this document is taken to hold: the loaded document, by the operations in
    /// its history, and the saved bytes kept beside it.
    fn weight(&self) -> usize {
        let ops = usize::try_from(self.doc.stats().num_ops).unwrap_or(usize::MAX);
        let inline = match &self.stored.snapshot {
            Snapshot::Inline(snapshot) => snapshot.len(),
            Snapshot::None | Snapshot::External => 0,
        };
        ops.saturating_mul(LOADED_BYTES_PER_OP)
            .saturating_add(LOADED_DOCUMENT_BYTES + inline + self.stored.appended_bytes())
    }
}

/// The loaded documents, least recently used first out: at most so many, and at most so much
/// memory by their weight. The document put last always stays, whatever it weighs, so that
/// one document larger than the whole budget is still served from memory while it is in use.
pub(super) struct DocCache {
    entries: LruCache<Vec<u8>, (Loaded, usize)>,
    bytes: usize,
    bytes_max: usize,
}

impl DocCache {
    fn new(documents: NonZeroUsize, bytes_max: usize) -> Self {
        Self {
            entries: LruCache::new(documents),
            bytes: 0,
            bytes_max,
        }
    }

    /// The cached document, without making it the most recently used.
    pub(super) fn peek(&self, doc_key: &[u8]) -> Option<&Loaded> {
        self.entries.peek(doc_key).map(|(loaded, _)| loaded)
    }

    fn contains(&self, doc_key: &[u8]) -> bool {
        self.entries.contains(doc_key)
    }

    fn get_mut(&mut self, doc_key: &[u8]) -> Option<&mut Loaded> {
        self.entries.get_mut(doc_key).map(|(loaded, _)| loaded)
    }

    fn pop(&mut self, doc_key: &[u8]) -> Option<Loaded> {
        let (loaded, weight) = self.entries.pop(doc_key)?;
        self.bytes -= weight;
        Some(loaded)
    }

    fn put(&mut self, doc_key: Vec<u8>, loaded: Loaded) {
        let weight = loaded.weight();
        if let Some((_, (_, out))) = self.entries.push(doc_key, (loaded, weight)) {
            self.bytes -= out;
        }
        self.bytes += weight;
        while self.bytes > self.bytes_max && self.entries.len() > 1 {
            let Some((_, (_, out))) = self.entries.pop_lru() else {
                break;
            };
            self.bytes -= out;
        }
    }

    /// Documents held, and the memory they are taken to hold.
    pub(super) fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }
}

pub(super) struct Inner {
    /// The writer this store writes under now, and those it wrote under before.
    pub(super) writers: Writers,
    pub(super) cache: DocCache,
    pub(super) next_log_sequence: u64,
    /// How much of each origin's log this store holds.
    pub(super) origins: BTreeMap<NodeId, OriginProgress>,
    /// Fingerprints of (document, heads) by bucket, for repair.
    pub(super) digest: DigestTree,
    /// Live records in user collections, kept up to date on every commit.
    pub(super) live_records: u64,
    /// Refused changes kept with their bytes, and those bytes (see [`super::collision`]).
    pub(super) refused: super::refused::RefusedUsage,
    /// Documents with writes of this node's own waiting to be written again.
    pub(super) reissues: BTreeSet<Vec<u8>>,
    /// Bumped by every commit that changes a document's heads: what a scoped digest was
    /// computed at ([`DocStore::scoped_digest`]).
    pub(super) digest_generation: u64,
    /// Repair digests of what a narrowed reader may read, at most
    /// [`SCOPED_DIGESTS_CACHED_MAX`], the latest last.
    pub(super) scoped_digests: Vec<ScopedDigest>,
    /// A scoped digest being built, page by page, that commits meanwhile keep up to date.
    pub(super) scoped_building: Option<ScopedBuild>,
    /// The sequence the next withdrawn document takes in the withdrawal feed.
    pub(super) next_withdrawal: u64,
}

/// Most entries the withdrawal feed keeps ([`DocStore::withdrawals_after`]): each withdrawal
/// past it takes out the oldest, so a binding that falls this far behind misses some.
pub const WITHDRAWALS_KEPT_MAX: u64 = 65_536;

/// Most scoped repair digests kept (one per narrowed peer in repair).
pub const SCOPED_DIGESTS_CACHED_MAX: usize = 16;

/// The repair digest of the documents one reader may read, as this store held them at a
/// generation, under that reader's read scopes.
pub(super) struct ScopedDigest {
    pub(super) reader: NodeId,
    pub(super) generation: u64,
    pub(super) scopes: String,
    pub(super) tree: std::sync::Arc<DigestTree>,
}

/// A scoped digest being built by [`DocStore::scoped_digest`], one page of the store at a
/// time under the lock: a commit carries its new heads into it for the documents already
/// read (those up to `upto`), so the build needs no snapshot of the store and never holds
/// the lock for more than a page.
#[derive(Debug)]
pub(super) struct ScopedBuild {
    pub(super) reader: NodeId,
    /// The last document key (its store key, tag included) read into `tree`.
    pub(super) upto: Vec<u8>,
    pub(super) tree: DigestTree,
    /// A commit changed a document the reader reads by its fields: whether the build held
    /// it before is not known, so the tree is used once and not cached.
    pub(super) spoiled: bool,
}

/// Which entries of one origin's log are held: all up to `contiguous`, and `above` beyond it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginProgress {
    pub contiguous: u64,
    pub above: BTreeSet<u64>,
    /// Runs `(after, through]` a sender covered above the contiguous mark, by `after`: the
    /// mark moves over one once it reaches it. In memory only, at most
    /// [`COVERED_RUNS_TRACKED_MAX`]: one forgotten is covered again after the next summary.
    pub covered_above: std::collections::BTreeMap<u64, u64>,
}

/// Most covered runs kept above a gap, per origin.
pub const COVERED_RUNS_TRACKED_MAX: usize = 1024;

/// Most sequence numbers tracked above a gap, per origin. Past it the highest are forgotten:
/// they stay in the log, only the contiguous mark may lag, so peers send them again.
pub const GAP_SEQUENCES_TRACKED_MAX: usize = 100_000;

impl OriginProgress {
    pub fn holds(&self, sequence: u64) -> bool {
        sequence <= self.contiguous || self.above.contains(&sequence)
    }

    /// Counts every entry up to `through` as held (a sender covered them).
    pub fn cover(&mut self, through: u64) {
        if through <= self.contiguous {
            return;
        }
        self.contiguous = through;
        self.above = self.above.split_off(&(through + 1));
        self.advance();
    }

    /// Counts the entries of `(after, through]` as held: at once if the mark reaches `after`,
    /// else once it does.
    pub fn cover_run(&mut self, after: u64, through: u64) {
        if through <= self.contiguous {
            return;
        }
        if after <= self.contiguous {
            self.cover(through);
            return;
        }
        let run = self.covered_above.entry(after).or_insert(through);
        *run = (*run).max(through);
        if self.covered_above.len() > COVERED_RUNS_TRACKED_MAX {
            self.covered_above.pop_last();
        }
    }

    /// Moves the mark over the entries and covered runs that follow it.
    fn advance(&mut self) {
        loop {
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
            let Some((&after, &through)) = self.covered_above.first_key_value() else {
                return;
            };
            if after > self.contiguous {
                return;
            }
            self.covered_above.pop_first();
            if through > self.contiguous {
                self.contiguous = through;
                self.above = self.above.split_off(&(through + 1));
            }
        }
    }

    pub fn insert(&mut self, sequence: u64) {
        if sequence <= self.contiguous {
            return;
        }
        if sequence == self.contiguous + 1 {
            self.contiguous = sequence;
            self.advance();
        } else {
            self.above.insert(sequence);
            if self.above.len() > GAP_SEQUENCES_TRACKED_MAX {
                self.above.pop_last();
            }
        }
    }
}

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

pub struct DocStore<S: Store> {
    pub(super) store: S,
    #[cfg(feature = "sabotage")]
    pub(super) sabotage: crate::Sabotage,
    config: DocStoreConfig,
    inner: Mutex<Inner>,
    group_commit: GroupCommit,
    /// Source and site names of this node's writers, and the node, stamped on their changes.
    writers: Mutex<std::collections::HashMap<ActorId, (String, String, NodeId)>>,
    /// Why every write is refused now (the disk is nearly full), if it is.
    write_refusal: Mutex<Option<String>>,
    /// Bytes writes may still take on disk before they are refused, as the disk was last
    /// measured ([`DocStore::set_room`]); unbounded until then.
    room: std::sync::atomic::AtomicI64,
    /// What judges this node's own writes, once the node set it (once: read without a lock
    /// on every write).
    pub(super) door: std::sync::OnceLock<std::sync::Arc<dyn WriteDoor>>,
}

/// What a batch is taken to cost on disk, per byte of its keys and values: sled writes each
/// to its log, then again when it compacts.
const DISK_BYTES_PER_BATCH_BYTE: i64 = 2;
const ROOM_EXHAUSTED: &str = "the disk is full: writes resume by themselves once there is room";

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

/// The collection a document key names.
pub fn collection_of(doc_key: &[u8]) -> &str {
    let end = doc_key
        .iter()
        .position(|&byte| byte == b'/')
        .unwrap_or(doc_key.len());
    std::str::from_utf8(&doc_key[..end]).unwrap_or_default()
}

impl<S: Store> DocStore<S> {
    /// Opens the documents of `node` in `store`. A fresh store is claimed for `node`; a store
    /// that belongs to another node is refused.
    pub fn open(store: S, node: NodeId, config: DocStoreConfig) -> Result<Self, StoreError> {
        // The format first: a store of an unknown layout is not read any further.
        let format_key = layout::meta_key(layout::META_FORMAT);
        match store.get(&format_key)? {
            Some(bytes) => {
                let found = <[u8; 4]>::try_from(bytes.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("the store's format version".to_owned()))?;
                if found > layout::STORE_FORMAT_VERSION {
                    return Err(StoreError::UnknownFormat {
                        found,
                        known: layout::STORE_FORMAT_VERSION,
                    });
                }
            }
            None => {
                let mut batch = Batch::default();
                batch.put(
                    format_key,
                    layout::STORE_FORMAT_VERSION.to_be_bytes().to_vec(),
                );
                store.apply(batch)?;
                store.flush()?;
            }
        }
        match store.get(&layout::meta_key(layout::META_NODE_ID))? {
            Some(stored) if stored != node.0 => {
                return Err(StoreError::WrongNode {
                    stored: hex::encode(stored),
                    expected: node.to_string(),
                })
            }
            Some(_) => {}
            None => {
                let mut batch = Batch::default();
                batch.put(layout::meta_key(layout::META_NODE_ID), node.0.to_vec());
                store.apply(batch)?;
                store.flush()?;
            }
        }
        let inner = scan_inner(&store, node, &config)?;
        Ok(Self {
            store,
            #[cfg(feature = "sabotage")]
            sabotage: crate::Sabotage::default(),
            inner: Mutex::new(inner),
            config,
            group_commit: GroupCommit::default(),
            writers: Mutex::new(std::collections::HashMap::new()),
            write_refusal: Mutex::new(None),
            room: std::sync::atomic::AtomicI64::new(i64::MAX),
            door: std::sync::OnceLock::new(),
        })
    }

    /// Has `door` judge every write of this node's own from now on. A store has one door;
    /// setting another is a bug.
    pub fn set_door(&self, door: std::sync::Arc<dyn WriteDoor>) {
        assert!(self.door.set(door).is_ok(), "a store's door is set once");
    }

    /// Opens the store again (after a write to disk failed, sled refuses writes from then on)
    /// and reads back what it holds: what was applied and never made durable is gone, as after
    /// a crash, and no write that was acknowledged is among it. The caller gives the store a
    /// new writer afterwards, since a change of its own log may have been written and lost at
    /// a place it now writes again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut inner = self.inner();
        self.store.reopen()?;
        let writer = inner.writers.current;
        *inner = scan_inner(&self.store, writer, &self.config)?;
        self.group_commit.forget_undurable();
        Ok(())
    }

    /// Whether a write to disk failed: writes fail until [`DocStore::reopen`].
    pub fn failed(&self) -> bool {
        self.store.failed()
    }

    /// Refuses every write with `reason` (the disk is nearly full), or accepts them again.
    pub fn refuse_writes(&self, reason: Option<String>) {
        *self
            .write_refusal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }

    /// Sets the bytes writes may take on disk from now on before they are refused (the disk's
    /// free space less its reserve), so that between two measurements writes cannot run the
    /// disk dry.
    pub fn set_room(&self, bytes: u64) {
        self.room.store(
            i64::try_from(bytes).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// Takes `bytes` of batch from the room writes have; refuses them if there is none.
    pub(super) fn take_room(&self, bytes: usize) -> Result<(), StoreError> {
        let cost = i64::try_from(bytes)
            .unwrap_or(i64::MAX)
            .saturating_mul(DISK_BYTES_PER_BATCH_BYTE);
        let left = self
            .room
            .fetch_sub(cost, std::sync::atomic::Ordering::AcqRel);
        if left == i64::MAX {
            self.room
                .store(i64::MAX, std::sync::atomic::Ordering::Release);
            return Ok(());
        }
        if left < cost {
            return Err(StoreError::DiskFull(ROOM_EXHAUSTED.to_owned()));
        }
        Ok(())
    }

    /// Why writes wait for the disk to be measured again, if they do: they took all the room
    /// it had when last measured.
    pub fn room_exhausted(&self) -> Option<String> {
        (self.room.load(std::sync::atomic::Ordering::Acquire) <= 0)
            .then(|| ROOM_EXHAUSTED.to_owned())
    }

    /// Why writes are refused now, if they are.
    pub fn write_refusal(&self) -> Option<String> {
        self.write_refusal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The writer this store writes under now: the origin of its own log (see
    /// [`super::incarnation`]).
    pub fn writer(&self) -> NodeId {
        self.inner().writers.current
    }

    /// Whether `writer` is, or was, this store's: its changes are this node's own.
    pub fn owns_writer(&self, writer: &NodeId) -> bool {
        self.inner().writers.owns(writer)
    }

    /// Every writer this store had before its current one.
    pub fn former_writers(&self) -> Vec<NodeId> {
        self.inner().writers.former.iter().copied().collect()
    }

    /// Makes `fresh` (drawn at random by the caller) this store's writer from now on, for the
    /// store of `owner`: its own log starts again at 1 under it, and writes made with an
    /// actor of a former writer are made with the same source under `fresh`. For a store
    /// found behind, or beside, what its peers hold of its own log. Durable when it returns.
    pub fn switch_writer(&self, owner: NodeId, fresh: NodeId) -> Result<NodeId, StoreError> {
        let mut inner = self.inner();
        let old = inner.writers.current;
        super::incarnation::new_incarnation(&self.store, owner, fresh)?;
        inner.writers.former.insert(old);
        inner.writers.current = fresh;
        let next = match self.store.last_in_prefix(&layout::log_prefix(&fresh))? {
            Some((key, _)) => layout::log_sequence(&key)? + 1,
            None => 1,
        };
        inner.next_log_sequence = next;
        drop(inner);
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let renamed: Vec<(ActorId, (String, String, NodeId))> = writers
            .iter()
            .filter_map(|(actor, names)| {
                let (writer, index) = NodeId::split_actor(actor)?;
                (writer == old).then(|| (fresh.actor(index), names.clone()))
            })
            .collect();
        writers.extend(renamed);
        Ok(old)
    }

    /// Documents held loaded now, and the memory they are taken to hold.
    pub fn cache_usage(&self) -> (usize, usize) {
        self.inner().cache.usage()
    }

    /// Names the source, site and node of `actor`: its changes are stamped with them from now
    /// on (see [`crate::record::stamp`]). Bounded by the sources a node may register.
    pub fn name_writer(&self, actor: &ActorId, source: &str, site: &str, node: NodeId) {
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if writers.len() < SOURCES_PER_NODE_MAX || writers.contains_key(actor) {
            writers.insert(actor.clone(), (source.to_owned(), site.to_owned(), node));
        }
    }

    fn stamp(&self, actor: &ActorId, doc: &Automerge, time_ms: i64) -> ChangeStamp {
        let wall_ms = u64::try_from(time_ms).unwrap_or(0);
        let names = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(actor)
            .cloned();
        ChangeStamp {
            hlc: stamp::next_hlc(doc, wall_ms),
            src: names.as_ref().map(|(source, _, _)| source.clone()),
            site: names.as_ref().map(|(_, site, _)| site.clone()),
            node: names.map(|(_, _, node)| node.to_string()),
            reverts: None,
        }
    }

    /// Whether this node's own writes pass its door (a `sabotage` build can skip it, as a
    /// modified node would).
    pub(super) fn checks_own_writes(&self) -> bool {
        #[cfg(feature = "sabotage")]
        if self.sabotage.skip_scope_checks {
            return false;
        }
        true
    }

    /// Switches deliberate bugs on (simulator tests only).
    #[cfg(feature = "sabotage")]
    pub fn set_sabotage(&mut self, sabotage: crate::Sabotage) {
        self.sabotage = sabotage;
    }

    pub fn backend(&self) -> &S {
        &self.store
    }

    pub(super) fn inner(&self) -> MutexGuard<'_, Inner> {
        // A session that fails forgets what it touched before the guard is released, so a
        // poisoned lock still guards consistent state.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the index of source `name` on this node, registering it (durably) if new.
    pub fn source_index(&self, name: &str) -> Result<(u16, bool), StoreError> {
        if !check_source_name(name) {
            return Err(StoreError::InvalidSourceName(name.to_owned()));
        }
        let _inner = self.inner();
        let mut key = layout::META_SOURCE_PREFIX.to_vec();
        key.extend_from_slice(name.as_bytes());
        let key = layout::meta_key(&key);
        if let Some(bytes) = self.store.get(&key)? {
            let index: [u8; 2] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("source {name:?} index")))?;
            return Ok((u16::from_be_bytes(index), false));
        }
        let prefix = layout::meta_key(layout::META_SOURCE_PREFIX);
        let existing = self
            .store
            .scan_prefix(&prefix, None, SOURCES_PER_NODE_MAX + 1)?
            .len();
        if existing >= SOURCES_PER_NODE_MAX {
            return Err(StoreError::TooManySources(existing));
        }
        let index = u16::try_from(existing).expect("SOURCES_PER_NODE_MAX fits in u16");
        let mut batch = Batch::default();
        batch.put(key, index.to_be_bytes().to_vec());
        self.store.apply(batch)?;
        self.store.flush()?;
        Ok((index, true))
    }

    /// Every source registered on this node, with its index.
    pub fn sources(&self) -> Result<Vec<(String, u16)>, StoreError> {
        let prefix = layout::meta_key(layout::META_SOURCE_PREFIX);
        let mut sources = Vec::new();
        for (key, value) in self
            .store
            .scan_prefix(&prefix, None, SOURCES_PER_NODE_MAX)?
        {
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let index: [u8; 2] = value
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("source {name:?} index")))?;
            sources.push((name, u16::from_be_bytes(index)));
        }
        Ok(sources)
    }

    /// Starts a write session.
    pub fn session(&self) -> WriteSession<'_, S> {
        let inner = self.inner();
        let next_log_sequence = inner.next_log_sequence;
        WriteSession {
            docs: self,
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

    /// Whether this store keeps a change of its own to the document (it was withdrawn once)
    /// that `doc` lacks: written here now, the record would take sequence numbers that change
    /// already holds.
    fn lacks_kept_own_change(&self, doc_key: &[u8], doc: &Automerge) -> Result<bool, StoreError> {
        let prefix = layout::kept_prefix(doc_key);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .backend()
                .scan_prefix(&prefix, after.as_deref(), KEPT_PAGE_ENTRIES)?;
            for (key, _) in &page {
                let Ok(hash) = ChangeHash::try_from(&key[prefix.len()..]) else {
                    continue;
                };
                if !document::holds_change(doc, &hash) {
                    return Ok(true);
                }
            }
            if page.len() < KEPT_PAGE_ENTRIES {
                return Ok(false);
            }
            after = page.last().map(|(key, _)| key.clone());
        }
    }

    /// Writes to one document with `actor` at wall-clock time `time_ms` (ms since the Unix
    /// epoch) and commits: a session of one write.
    pub fn write<T>(
        &self,
        id: &RecordId,
        actor: &ActorId,
        time_ms: i64,
        durability: Durability,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<T, RecordError>,
    ) -> Result<(T, WriteOutcome), StoreError> {
        let mut session = self.session();
        let result = session.write(id, actor, time_ms, edit)?;
        session.commit(durability)?;
        Ok(result)
    }

    /// Merges a saved Automerge document (from any implementation) into the record.
    /// Merges a saved Automerge document from elsewhere into `id`, by the rules every way in
    /// follows: no change stamped past `accept_until_ms` (ms since the Unix epoch: this node's
    /// clock and the bound it allows), no change over the size limit, and the merged record
    /// must hold only what a write could have put there ([`document::check_document`]).
    /// Nothing is stored otherwise.
    pub fn import(
        &self,
        id: &RecordId,
        bytes: &[u8],
        accept_until_ms: u64,
    ) -> Result<ImportOutcome, StoreError> {
        let incoming = Automerge::load(bytes)
            .map_err(|error| StoreError::InvalidDocument(error.to_string()))?;
        let mut session = self.session();
        let outcome = session.merge(id, &incoming, accept_until_ms)?;
        session.commit(Durability::Durable)?;
        Ok(outcome)
    }

    /// Reads a document through the cache. A record never written reads as an empty document.
    pub fn read<T>(
        &self,
        id: &RecordId,
        read: impl FnOnce(&Automerge) -> T,
    ) -> Result<T, StoreError> {
        let mut inner = self.inner();
        let loaded = self.loaded(&mut inner, &id.to_doc_key())?;
        Ok(read(&loaded.doc))
    }

    /// State written by [`WriteSession::put_state`].
    pub fn state(&self, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(&layout::meta_key(name))
    }

    /// Up to `limit` documents this store withdrew (they left its read scope) after the
    /// withdrawal numbered `after`, oldest first, each with its number: what a binding follows
    /// to take their rows out of its table. Only the last [`WITHDRAWALS_KEPT_MAX`] are kept,
    /// so a first number past `after + 1` means some were missed.
    pub fn withdrawals_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let from = layout::withdrawal_key(after);
        self.store
            .scan_prefix(&[layout::TAG_WITHDRAWAL], Some(&from), limit)?
            .into_iter()
            .map(|(key, doc_key)| Ok((layout::withdrawal_sequence(&key)?, doc_key)))
            .collect()
    }

    /// The number of the last withdrawal made (0: none yet).
    pub fn last_withdrawal(&self) -> u64 {
        self.inner().next_withdrawal - 1
    }

    /// Up to `limit` state entries whose names start with `prefix`, after `after` (a full
    /// name), with their names.
    pub fn states(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<super::KeyValue>, StoreError> {
        let after = after.map(layout::meta_key);
        Ok(self
            .store
            .scan_prefix(&layout::meta_key(prefix), after.as_deref(), limit)?
            .into_iter()
            .map(|(key, value)| (key[1..].to_vec(), value))
            .collect())
    }

    /// What the store holds about a document, without loading it into Automerge.
    pub fn stored(&self, id: &RecordId) -> Result<Option<StoredDoc>, StoreError> {
        self.store
            .get(&layout::doc_key(&id.to_doc_key()))?
            .map(|bytes| layout::decode("document", &bytes))
            .transpose()
    }

    /// Up to `limit` records of a collection (live and deleted) after key `after`, in key order.
    pub fn scan_collection(
        &self,
        collection: &Collection,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let mut prefix = vec![layout::TAG_DOC];
        prefix.extend_from_slice(collection.as_str().as_bytes());
        prefix.push(b'/');
        let after_key = after.map(|key| {
            layout::doc_key(&RecordId::new(collection.clone(), key.clone()).to_doc_key())
        });
        let entries = self
            .store
            .scan_prefix(&prefix, after_key.as_deref(), limit)?;
        entries
            .into_iter()
            .map(|(key, value)| {
                let id = RecordId::from_doc_key(&key[1..])
                    .map_err(|error| StoreError::Corrupt(format!("stored record id: {error}")))?;
                let stored = layout::decode("document", &value)?;
                Ok(StoredRecord { id, stored })
            })
            .collect()
    }

    /// Live records in user collections (system collections start with `_`), counted at open
    /// and kept up to date by every commit: no scan.
    pub fn count_live(&self) -> Result<u64, StoreError> {
        Ok(self.inner().live_records)
    }

    /// Up to `limit` log entries of `origin` with sequence numbers above `after`.
    pub fn log_entries(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let prefix = layout::log_prefix(origin);
        let after_key = layout::log_key(origin, after);
        self.store
            .scan_prefix(&prefix, Some(&after_key), limit)?
            .into_iter()
            .map(|(key, value)| {
                Ok((
                    layout::log_sequence(&key)?,
                    layout::decode_log_entry(&value)?,
                ))
            })
            .collect()
    }

    /// Makes every write so far durable; returns at once when it already is.
    pub fn sync(&self) -> Result<(), StoreError> {
        let ticket = self.group_commit.last_ticket();
        self.group_commit
            .wait_durable(ticket, || self.store.flush())
    }

    /// The document saved whole, for sending elsewhere; `None` if it was never written.
    ///
    /// Only durable changes may leave a node: a change that escaped and was then lost in a
    /// crash would see its actor's sequence number reused by a different change, which no
    /// Automerge document can merge. So this makes every write durable first.
    pub fn export(&self, id: &RecordId) -> Result<Option<Vec<u8>>, StoreError> {
        self.sync()?;
        self.read(id, |doc| {
            if doc.get_heads().is_empty() {
                None
            } else {
                Some(doc.save())
            }
        })
    }

    /// The cached document for `doc_key`, loading it from the store on a miss.
    pub(super) fn loaded<'a>(
        &self,
        inner: &'a mut Inner,
        doc_key: &[u8],
    ) -> Result<&'a mut Loaded, StoreError> {
        if !inner.cache.contains(doc_key) {
            let loaded = self.load(doc_key)?;
            inner.cache.put(doc_key.to_vec(), loaded);
        }
        Ok(inner
            .cache
            .get_mut(doc_key)
            .expect("present: found or inserted just above under the same lock"))
    }

    pub(super) fn load(&self, doc_key: &[u8]) -> Result<Loaded, StoreError> {
        let Some(bytes) = self.store.get(&layout::doc_key(doc_key))? else {
            return Ok(Loaded::empty());
        };
        let stored: StoredDoc = layout::decode("document", &bytes)?;
        let (doc, heads_match) = load_document(&self.store, doc_key, &stored)?;
        // Check after reading back: the document must be exactly what was recorded.
        if !heads_match {
            return Err(StoreError::Corrupt(format!(
                "{}: its heads do not match its changes",
                String::from_utf8_lossy(doc_key)
            )));
        }
        Ok(Loaded { doc, stored })
    }
}

/// The document `stored` describes, from its snapshot and appended changes; and whether its
/// heads are the ones recorded.
pub(super) fn load_document<S: Store>(
    store: &S,
    doc_key: &[u8],
    stored: &StoredDoc,
) -> Result<(Automerge, bool), StoreError> {
    let corrupt =
        |what: String| StoreError::Corrupt(format!("{}: {what}", String::from_utf8_lossy(doc_key)));
    let mut doc = match &stored.snapshot {
        Snapshot::None => Automerge::new(),
        Snapshot::Inline(snapshot) => {
            Automerge::load(snapshot).map_err(|e| corrupt(format!("snapshot: {e}")))?
        }
        Snapshot::External => {
            let snapshot = store
                .get(&layout::snapshot_key(doc_key))?
                .ok_or_else(|| corrupt("its snapshot is missing".to_owned()))?;
            Automerge::load(&snapshot).map_err(|e| corrupt(format!("snapshot: {e}")))?
        }
    };
    let changes = stored
        .changes
        .iter()
        .map(|bytes| Change::from_bytes(bytes.clone()).map_err(|e| corrupt(format!("change: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    doc.apply_changes(changes)
        .map_err(|e| corrupt(format!("applying changes: {e}")))?;
    let mut heads = doc.get_heads();
    heads.sort_unstable();
    Ok((doc, heads == stored.change_hashes()))
}

/// What a store holds, read back into the state a [`DocStore`] keeps in memory. The log says
/// where the writer's sequence continues and how much of every origin is held; no counter is
/// rewritten on every write.
fn scan_inner<S: Store>(
    store: &S,
    writer: NodeId,
    config: &DocStoreConfig,
) -> Result<Inner, StoreError> {
    let origins = scan_origins(store)?;
    let (digest, live_records) = scan_documents(store)?;
    let next_log_sequence = match store.last_in_prefix(&layout::log_prefix(&writer))? {
        Some((key, _)) => layout::log_sequence(&key)? + 1,
        None => 1,
    };
    let writers = Writers::load(store, writer)?;
    let (refused, reissues) = super::refused::scan(store)?;
    let next_withdrawal = match store.last_in_prefix(&[layout::TAG_WITHDRAWAL])? {
        Some((key, _)) => layout::withdrawal_sequence(&key)? + 1,
        None => 1,
    };
    Ok(Inner {
        writers,
        cache: DocCache::new(config.cache_documents, config.cache_bytes),
        next_log_sequence,
        origins,
        digest,
        live_records,
        refused,
        reissues,
        digest_generation: 0,
        scoped_digests: Vec::new(),
        scoped_building: None,
        next_withdrawal,
    })
}

/// Calls `visit` with every entry whose key starts with `prefix`, in key order, one page of
/// [`SCAN_PAGE_ENTRIES`] at a time, so memory stays bounded whatever the prefix holds.
pub(super) fn for_each_entry<S: Store>(
    store: &S,
    prefix: &[u8],
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan_prefix(prefix, after.as_deref(), SCAN_PAGE_ENTRIES)?;
        let full = page.len() == SCAN_PAGE_ENTRIES;
        after = page.last().map(|(key, _)| key.clone());
        for (key, value) in &page {
            visit(key, value)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// Reads every document's heads once to build the repair digest and count live records.
fn scan_documents<S: Store>(store: &S) -> Result<(DigestTree, u64), StoreError> {
    let mut digest = DigestTree::default();
    let mut live = 0;
    for_each_entry(store, &[layout::TAG_DOC], |key, value| {
        let stored: StoredDoc = layout::decode("document", value)?;
        digest.update(&key[1..], &[], &stored.change_hashes());
        live += u64::from(counts_as_live(&key[1..], stored.record_state()));
        Ok(())
    })?;
    Ok((digest, live))
}

/// Whether a document counts in the live-record count: a live record of a user collection.
fn counts_as_live(doc_key: &[u8], state: document::RecordState) -> bool {
    doc_key.first() != Some(&b'_') && state == document::RecordState::Live
}

/// Reads the whole log once to learn how much of each origin is held.
fn scan_origins<S: Store>(store: &S) -> Result<BTreeMap<NodeId, OriginProgress>, StoreError> {
    let mut origins: BTreeMap<NodeId, OriginProgress> = BTreeMap::new();
    for_each_entry(store, &[layout::TAG_LOG], |key, _| {
        let origin = layout::log_origin(key)?;
        let sequence = layout::log_sequence(key)?;
        origins.entry(origin).or_default().insert(sequence);
        Ok(())
    })?;
    // Where senders covered the log for this node (what it may read of it is all held).
    let prefix = layout::cover_prefix();
    for_each_entry(store, &prefix, |key, value| {
        let origin = key
            .get(prefix.len()..)
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
            .ok_or_else(|| StoreError::Corrupt("a cover key".to_owned()))?;
        let mark = <[u8; 8]>::try_from(value)
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("a cover mark".to_owned()))?;
        origins.entry(NodeId(origin)).or_default().cover(mark);
        Ok(())
    })?;
    Ok(origins)
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
        let loaded = self.document(&doc_key)?;
        if docs.lacks_kept_own_change(&doc_key, &loaded.doc)? {
            // Automerge numbers an actor's changes per document: written afresh here, the
            // record would take sequence numbers this node's kept changes to it already hold.
            return Err(StoreError::OutsideGrant(format!(
                "{id} was taken out of this node: it lies outside what the node may read, and \
                 a node that reads it holds it; write it there"
            )));
        }
        let mut stamp = docs.stamp(actor, &loaded.doc, time_ms);
        stamp.reverts = reverts.map(|version| version.to_string());
        let before = loaded.doc.get_heads();
        loaded.doc.set_actor(actor.clone());
        let mut transaction = loaded.doc.transaction();
        let value = match edit(&mut transaction) {
            Ok(value) => value,
            Err(error) => {
                transaction.rollback();
                return Err(error.into());
            }
        };
        let (hash, _) = transaction.commit_with(
            CommitOptions::default()
                .with_time(time_ms.div_euclid(1000))
                .with_message(stamp.to_message()),
        );
        let Some(hash) = hash else {
            let heads = loaded.doc.get_heads();
            return Ok((
                value,
                WriteOutcome {
                    change: None,
                    heads,
                },
            ));
        };
        if let Some(door) = docs.door.get().filter(|_| docs.checks_own_writes()) {
            let node = door.node();
            let collection = id.collection.as_str();
            let verdict = door
                .verdict(Some(&node), None, collection)
                .unwrap_or_else(|| {
                    door.judge(
                        Some(&node),
                        None,
                        collection,
                        document::read_at(&loaded.doc, Some(&before)).as_ref(),
                        document::read(&loaded.doc).as_ref(),
                    )
                });
            if let Err(reason) = verdict {
                // Refused: the document goes back to what it was, and nothing was queued.
                loaded.doc = loaded.doc.fork_at(&before).map_err(|error| {
                    StoreError::Corrupt(format!("undoing a refused change: {error}"))
                })?;
                return Err(StoreError::OutsideGrant(door.explain(reason, collection)));
            }
        }
        let bytes = loaded
            .doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| {
                StoreError::Corrupt(format!("change {hash} vanished from its document"))
            })?
            .raw_bytes()
            .to_vec();
        if bytes.len() > CHANGE_BYTES_MAX {
            // A change no peer could be sent is never stored: the document goes back to what
            // it was, and nothing of it was queued.
            loaded.doc = loaded
                .doc
                .fork_at(&before)
                .map_err(|error| StoreError::Corrupt(format!("undoing a change: {error}")))?;
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
        let incoming_changes = loaded.doc.get_changes_added(incoming);
        if let Some(oversized) = incoming_changes
            .iter()
            .find(|change| change.raw_bytes().len() > CHANGE_BYTES_MAX)
        {
            return Err(StoreError::ChangeTooLarge {
                size: oversized.raw_bytes().len(),
                size_max: CHANGE_BYTES_MAX,
            });
        }
        if let Some(ahead) = incoming_changes
            .iter()
            .find(|change| super::replication::clock_of(change) > accept_until_ms)
        {
            return Err(StoreError::ClockAhead {
                change: ahead.hash().to_string(),
                clock_ms: super::replication::clock_of(ahead),
                accept_until_ms,
            });
        }
        // Each change is judged by its author's grant, as every node it reaches will judge it.
        let judged: Vec<(Option<(NodeId, u64)>, &Change)> = incoming_changes
            .iter()
            .map(|change| (None, change))
            .collect();
        let verdicts = docs.judge_incoming(&loaded.doc, &doc_key, &judged, super::Unplaced::Refuse);
        if let Some((change, reason)) = verdicts.and_then(|verdicts| {
            incoming_changes
                .iter()
                .zip(verdicts)
                .find_map(|(change, verdict)| match verdict {
                    super::replication::Verdict::Refuse(reason, _) => Some((change, reason)),
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
        if let Err(error) = document::check_document(&loaded.doc) {
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
        let before = loaded.doc.get_heads();
        loaded
            .doc
            .apply_changes(changes)
            .map_err(|error| StoreError::InvalidDocument(error.to_string()))?;
        // Only changes that were applied count: the ones now above the old heads.
        let new_hashes: Vec<ChangeHash> = loaded
            .doc
            .get_changes(&before)
            .iter()
            .map(Change::hash)
            .collect();
        if new_hashes.is_empty() {
            return Ok(ImportOutcome {
                new_changes: 0,
                heads: loaded.doc.get_heads(),
            });
        }
        let new = new_hashes
            .iter()
            .map(|hash| NewChange {
                hash: *hash,
                place,
                bytes: None,
            })
            .collect();
        let heads = self.queue_new_changes(doc_key, new)?;
        Ok(ImportOutcome {
            new_changes: new_hashes.len(),
            heads,
        })
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

    /// Replaces the session's copy of a document with `doc` (rebuilt without changes that
    /// were refused) and queues its stored form whole: a new snapshot, no appended changes.
    pub(super) fn replace_document(
        &mut self,
        doc_key: &[u8],
        doc: Automerge,
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
        let loaded = self
            .working
            .get_mut(doc_key)
            .expect("the caller took the document into the session");
        let heads = loaded.doc.get_heads();
        let door = self.docs.door.get().filter(|door| !door.is_open());
        let collection = collection_of(doc_key);
        let mut tags = Vec::new();
        if let Some(door) = door {
            let fields = door.filter_fields(collection);
            if !fields.is_empty() {
                let after = scope_tag(&loaded.doc, &fields);
                match self.tags_before.insert(doc_key.to_vec(), after.clone()) {
                    Some(before) if before != after => tags.push(before),
                    _ => {}
                }
                tags.push(after);
            }
        }
        // A record that changes from elsewhere into one this node may not read stays until a
        // node that reads everything, holding every change of it this node holds, tells it to
        // take it out (see `crate::sync::repair`): this node may be the only one left with
        // another's change to it (its author's store lost).
        let left_scope = door.is_some_and(|door| {
            let node = door.node();
            !door.reads_all(&node)
                && new.iter().any(|change| change.place != LogPlace::Local)
                && match document::read(&loaded.doc) {
                    Some(fields) => !door.may_read(&node, collection, &fields),
                    // Deleted: kept only under a scope of the whole collection.
                    None => door.may_read_tagged(&node, collection, &[Vec::new()]) != Some(true),
                }
        });
        if left_scope {
            self.left_scope.insert(doc_key.to_vec());
        }
        let stored = &mut loaded.stored;
        let old_heads = stored.change_hashes();
        stored.set_heads(&heads);
        let was_live = counts_as_live(doc_key, stored.record_state());
        self.withdrawn.remove(doc_key);
        self.heads_changed
            .push((doc_key.to_vec(), old_heads, stored.change_hashes()));
        stored.set_record_state(document::state(&loaded.doc));
        let is_live = counts_as_live(doc_key, stored.record_state());
        self.live_delta += i64::from(is_live) - i64::from(was_live);
        let mut places = Vec::with_capacity(new.len());
        // Changes that a compaction folds into the snapshot anyway are not encoded one by one.
        let compacting =
            force_snapshot || stored.changes.len() + new.len() >= compact_after_changes;
        for change in new {
            places.push((change.hash, change.place));
            if compacting {
                continue;
            }
            let bytes = match change.bytes {
                Some(bytes) => bytes,
                None => loaded
                    .doc
                    .get_change_by_hash(&change.hash)
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "change {} vanished from its document",
                            change.hash
                        ))
                    })?
                    .raw_bytes()
                    .to_vec(),
            };
            stored.changes.push(bytes);
        }
        if compacting || stored.appended_bytes() >= COMPACT_AFTER_BYTES {
            let snapshot = loaded.doc.save();
            stored.changes.clear();
            if snapshot.len() <= SNAPSHOT_INLINE_BYTES_MAX {
                if stored.snapshot == Snapshot::External {
                    self.batch.remove(layout::snapshot_key(doc_key));
                }
                stored.snapshot = Snapshot::Inline(snapshot);
            } else {
                self.batch.put(layout::snapshot_key(doc_key), snapshot);
                stored.snapshot = Snapshot::External;
            }
        }
        self.batch
            .put(layout::doc_key(doc_key), layout::encode(&*stored));
        for (hash, place) in places {
            self.queue_log_entry(doc_key, &hash, place, &tags);
        }
        Ok(heads)
    }

    /// Takes a document out of this store because this node may not read it (see
    /// [`DocStore::withdraw`]): its stored form goes, what this node wrote itself stays where
    /// its log can serve it.
    fn drop_document(
        &mut self,
        doc_key: &[u8],
        stored: &StoredDoc,
        own_changes: Vec<(ChangeHash, Vec<u8>)>,
    ) {
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
        }
        self.withdrawn.insert(doc_key.to_vec());
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
        let in_use = self.working.contains_key(doc_key) || self.inner.cache.contains(doc_key);
        if !in_use {
            let Some(bytes) = self.docs.store.get(&layout::doc_key(doc_key))? else {
                return Ok(false);
            };
            let stored: StoredDoc = layout::decode("document", &bytes)?;
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
                self.drop_document(doc_key, &stored, own);
                return Ok(true);
            }
        }
        let loaded = self.document(doc_key)?;
        if loaded.stored.heads.is_empty() {
            return Ok(false);
        }
        let stored = loaded.stored.clone();
        let changes = loaded.doc.get_changes(&[]);
        let own = changes
            .iter()
            .filter(|change| self.owns_change(change))
            .map(|change| (change.hash(), change.raw_bytes().to_vec()))
            .collect();
        self.drop_document(doc_key, &stored, own);
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
                        .insert(doc_key.to_vec(), scope_tag(&loaded.doc, &fields));
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::{apply_delete, apply_write, RecordWrite};
    use crate::store::digest;
    use crate::store::MemoryStore;
    use serde_json::json;

    fn open(store: MemoryStore, node: NodeId, compact: u32) -> DocStore<MemoryStore> {
        let config = DocStoreConfig {
            cache_documents: NonZeroUsize::new(2).unwrap(),
            compact_after_changes: compact,
            ..DocStoreConfig::default()
        };
        DocStore::open(store, node, config).unwrap()
    }

    fn set(docs: &DocStore<MemoryStore>, id: &RecordId, actor: &ActorId, field: &str, value: i64) {
        let write = RecordWrite {
            set: vec![(field.to_owned(), json!(value))],
            ..Default::default()
        };
        docs.write(id, actor, 0, Durability::Durable, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
    }

    /// Every leaf of the digest of what `reader` may read, as cached now and as a build
    /// from scratch finds it.
    fn scoped_leaves(
        docs: &DocStore<MemoryStore>,
        reader: &NodeId,
    ) -> Vec<Option<digest::Aggregate>> {
        (0..digest::LEAVES)
            .map(|leaf| docs.scoped_digest(reader, &format!("{leaf:03x}")).unwrap())
            .collect()
    }

    #[test]
    fn a_scoped_digest_follows_commits_made_while_and_after_it_is_built() {
        use crate::scope::{Grant, Scope, ScopeDoor, Scopes, Verified};
        let node = NodeId::random().unwrap();
        let reader = NodeId([9; 16]);
        let docs = open(MemoryStore::new(), node, 4);
        let mut scopes = Scopes::default();
        scopes.insert(
            Verified::Grant(Grant {
                cluster: [1; 16],
                node: reader.0,
                read: vec![Scope::parse("gw").unwrap()],
                write: Vec::new(),
                issued_ms: 1,
            }),
            b"signature",
        );
        let scopes = std::sync::Arc::new(std::sync::RwLock::new(scopes));
        docs.set_door(std::sync::Arc::new(ScopeDoor::new(node, scopes)));
        let actor = node.actor(0);
        let records = 3 * SCAN_PAGE_ENTRIES / 2;
        for n in 0..records {
            for collection in ["gw", "other"] {
                set(
                    &docs,
                    &RecordId::parse(&format!("{collection}/{n}")).unwrap(),
                    &actor,
                    "n",
                    1,
                );
            }
        }
        // Built a page at a time while writes go on, before and after the pages read so far;
        // then kept up to date by each commit.
        let write_some = |round: usize| {
            for n in 0..records {
                let collection = if n % 2 == 0 { "gw" } else { "other" };
                let key = (n * 7 + round) % (2 * records);
                let id = RecordId::parse(&format!("{collection}/{key}")).unwrap();
                set(&docs, &id, &actor, "n", (n + round) as i64);
            }
        };
        docs.begin_scoped_build(&reader);
        let mut after = docs.scoped_build_page(None).unwrap();
        let mut round = 1;
        while let Some(last) = after {
            write_some(round);
            round += 1;
            after = docs.scoped_build_page(Some(&last)).unwrap();
        }
        let (tree, generation) = docs.finish_scoped_build().unwrap();
        assert_eq!(generation, Some(docs.inner().digest_generation));
        let built: Vec<_> = (0..digest::LEAVES)
            .map(|leaf| tree.get(&format!("{leaf:03x}")))
            .collect();
        docs.inner().scoped_digests.clear();
        assert_eq!(built, scoped_leaves(&docs, &reader));
        write_some(round);
        let kept = {
            let inner = docs.inner();
            assert_eq!(inner.scoped_digests.len(), 1);
            assert_eq!(inner.scoped_digests[0].generation, inner.digest_generation);
            inner.scoped_digests[0].tree.clone()
        };
        docs.inner().scoped_digests.clear();
        let fresh = scoped_leaves(&docs, &reader);
        let kept: Vec<_> = (0..digest::LEAVES)
            .map(|leaf| kept.get(&format!("{leaf:03x}")))
            .collect();
        assert_eq!(kept, fresh);
        assert_ne!(
            built, fresh,
            "the writes after the build changed the digest"
        );
        // It covers the readable collection alone.
        let count: u64 = fresh
            .iter()
            .flatten()
            .map(|aggregate| aggregate.count)
            .sum();
        let gw = crate::record::Collection::new("gw").unwrap();
        let held = docs.scan_collection(&gw, None, 10 * records).unwrap().len();
        assert!(held > records, "the writer added records to gw");
        assert_eq!(count, held as u64);
    }

    #[test]
    fn a_withdrawal_keeps_this_stores_own_changes_whether_or_not_the_document_is_loaded() {
        let node = NodeId::random().unwrap();
        let docs = open(MemoryStore::new(), node, 4);
        let own = node.actor(0);
        let other = NodeId::random().unwrap().actor(0);
        let ids: Vec<RecordId> = (0..5)
            .map(|n| RecordId::parse(&format!("c/{n}")).unwrap())
            .collect();
        let mut written = Vec::new();
        for id in &ids {
            set(&docs, id, &other, "a", 1);
            let theirs = docs.heads(&id.to_doc_key()).unwrap()[0];
            set(&docs, id, &own, "b", 2);
            let ours = docs.heads(&id.to_doc_key()).unwrap()[0];
            written.push((theirs, ours));
        }
        // The cache holds two documents: c/0 is read from its stored form, c/4 is in use.
        assert!(!docs.inner().cache.contains(&ids[0].to_doc_key()));
        assert!(docs.inner().cache.contains(&ids[4].to_doc_key()));
        let keys = [ids[0].to_doc_key(), ids[4].to_doc_key()];
        let taken = docs.withdraw(&[&keys[0], &keys[1]]).unwrap();
        assert_eq!(taken.len(), 2);
        for (key, index) in keys.iter().zip([0, 4]) {
            let (theirs, ours) = written[index];
            assert!(docs.heads(key).unwrap().is_empty());
            assert!(docs.keeps_own_change(key, &ours).unwrap());
            assert!(!docs.keeps_own_change(key, &theirs).unwrap());
        }
        assert_eq!(docs.count_live().unwrap(), 3);
    }

    #[test]
    fn a_write_is_stamped_to_the_millisecond_with_its_writer() {
        let node = NodeId::random().unwrap();
        let docs = open(MemoryStore::new(), node, 4);
        let actor = node.actor(0);
        docs.name_writer(&actor, "erp", "paris", node);
        let id = RecordId::parse("c/1").unwrap();
        let write = |time_ms: i64, value: i64| {
            let write = RecordWrite {
                set: vec![("v".to_owned(), json!(value))],
                ..Default::default()
            };
            docs.write(&id, &actor, time_ms, Durability::Durable, |tx| {
                apply_write(tx, &write)
            })
            .unwrap();
        };
        write(1_764_000_000_250, 1);
        // A second write in the same millisecond still stamps after the first.
        write(1_764_000_000_250, 2);
        let stamps: Vec<(ChangeStamp, i64)> = docs
            .read(&id, |doc| {
                doc.get_changes(&[])
                    .iter()
                    .map(|change| {
                        let stamp = ChangeStamp::of_change(change.message(), change.timestamp());
                        (stamp, change.timestamp())
                    })
                    .collect()
            })
            .unwrap();
        let expected = |hlc| ChangeStamp {
            hlc,
            src: Some("erp".into()),
            site: Some("paris".into()),
            node: Some(node.to_string()),
            reverts: None,
        };
        assert_eq!(
            stamps,
            vec![
                (expected(1_764_000_000_250), 1_764_000_000),
                (expected(1_764_000_000_251), 1_764_000_000),
            ]
        );
    }

    #[test]
    fn writes_survive_reopen_and_compaction() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 4);
        let actor = node.actor(0);
        let ids: Vec<_> = (0..5)
            .map(|i| RecordId::parse(&format!("c/{i}")).unwrap())
            .collect();
        for round in 0..10 {
            for id in &ids {
                set(&docs, id, &actor, "n", round);
            }
        }
        docs.write(&ids[0], &actor, 0, Durability::Durable, |tx| {
            apply_delete(tx)
        })
        .unwrap();
        store.crash(0);
        let reopened = open(store, node, 4);
        assert_eq!(reopened.read(&ids[0], document::read).unwrap(), None);
        // The repair digest rebuilt from disk equals the one kept up to date by the writes.
        for prefix in crate::store::digest::children("") {
            assert_eq!(reopened.digest(&prefix), docs.digest(&prefix));
        }
        // The live count rebuilt from disk equals the one kept by the writes: 4 of 5 live.
        assert_eq!(reopened.count_live().unwrap(), 4);
        assert_eq!(docs.count_live().unwrap(), 4);
        let documents: u64 = crate::store::digest::children("")
            .iter()
            .map(|prefix| reopened.digest(prefix).unwrap().count)
            .sum();
        assert_eq!(documents, 5);
        for id in &ids[1..] {
            let fields = reopened.read(id, document::read).unwrap().unwrap();
            assert_eq!(fields.get("n"), Some(&json!(9)));
        }
        let listed = reopened
            .scan_collection(&Collection::new("c").unwrap(), None, 100)
            .unwrap();
        assert_eq!(listed.len(), 5);
        assert_eq!(
            listed[0].stored.record_state(),
            document::RecordState::Deleted
        );
        // 10 rounds of 5 records plus a delete, all logged in order under this node.
        let log = reopened.log_entries(&node, 0, 1000).unwrap();
        assert_eq!(log.len(), 51);
        assert!(log.windows(2).all(|pair| pair[0].0 + 1 == pair[1].0));
    }

    #[test]
    fn deferred_writes_are_lost_only_until_synced() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 32);
        let id = RecordId::parse("c/x").unwrap();
        let write = RecordWrite {
            set: vec![("a".to_owned(), json!(1))],
            ..Default::default()
        };
        docs.write(&id, &node.actor(0), 0, Durability::Deferred, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
        store.crash(0);
        let reopened = open(store.clone(), node, 32);
        assert_eq!(reopened.read(&id, document::read).unwrap(), None);
        reopened
            .write(&id, &node.actor(0), 0, Durability::Deferred, |tx| {
                apply_write(tx, &write)
            })
            .unwrap();
        reopened.sync().unwrap();
        store.crash(0);
        let again = open(store, node, 32);
        assert!(again.read(&id, document::read).unwrap().is_some());
    }

    #[test]
    fn refuses_a_store_of_an_unknown_format() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        open(store.clone(), node, 32);
        let mut batch = Batch::default();
        batch.put(
            layout::meta_key(layout::META_FORMAT),
            (layout::STORE_FORMAT_VERSION + 1).to_be_bytes().to_vec(),
        );
        store.apply(batch).unwrap();
        let refused = DocStore::open(store, node, DocStoreConfig::default());
        let Err(error) = refused else {
            panic!("a store of a newer format opened");
        };
        assert!(matches!(error, StoreError::UnknownFormat { .. }));
        assert!(error.to_string().contains("newer concord"), "{error}");
    }

    #[test]
    fn refuses_another_nodes_store() {
        let store = MemoryStore::new();
        open(store.clone(), NodeId::random().unwrap(), 32);
        let other = DocStore::open(store, NodeId::random().unwrap(), DocStoreConfig::default());
        assert!(matches!(other, Err(StoreError::WrongNode { .. })));
    }

    #[test]
    fn failed_edit_writes_nothing() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 32);
        let id = RecordId::parse("c/x").unwrap();
        let result = docs.write(&id, &node.actor(0), 0, Durability::Durable, |tx| {
            apply_write(tx, &RecordWrite::default())?;
            Err::<(), _>(RecordError::InvalidFieldName {
                field: String::new(),
                reason: "test",
            })
        });
        assert!(result.is_err());
        assert_eq!(store.unflushed_batches(), 0);
        assert_eq!(docs.read(&id, |doc| doc.get_heads()).unwrap(), vec![]);
    }

    #[test]
    fn large_documents_keep_their_snapshot_apart() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 32);
        let id = RecordId::parse("c/big").unwrap();
        // Incompressible text, since snapshots are compressed.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let text: String = (0..3 * SNAPSHOT_INLINE_BYTES_MAX)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect();
        let write = RecordWrite {
            set: vec![("text".to_owned(), json!(text))],
            ..Default::default()
        };
        docs.write(&id, &node.actor(0), 0, Durability::Durable, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
        assert_eq!(
            docs.stored(&id).unwrap().unwrap().snapshot,
            Snapshot::External
        );
        set(&docs, &id, &node.actor(0), "small", 1);
        store.crash(0);
        let reopened = open(store, node, 32);
        let fields = reopened.read(&id, document::read).unwrap().unwrap();
        assert_eq!(fields["text"], json!(text));
        assert_eq!(fields["small"], json!(1));
    }

    #[test]
    fn uncommitted_session_leaves_nothing_behind() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 32);
        let first = RecordId::parse("c/1").unwrap();
        let second = RecordId::parse("c/2").unwrap();
        let write = RecordWrite {
            set: vec![("a".to_owned(), json!(1))],
            ..Default::default()
        };
        {
            let mut session = docs.session();
            session
                .write(&first, &node.actor(0), 0, |tx| apply_write(tx, &write))
                .unwrap();
            session
                .write(&second, &node.actor(0), 0, |tx| apply_write(tx, &write))
                .unwrap();
            // Dropped without commit, as after an error in a bulk load.
        }
        assert_eq!(docs.read(&first, document::read).unwrap(), None);
        assert_eq!(docs.read(&second, document::read).unwrap(), None);
        let mut session = docs.session();
        session
            .write(&first, &node.actor(0), 0, |tx| apply_write(tx, &write))
            .unwrap();
        session
            .write(&second, &node.actor(0), 0, |tx| apply_write(tx, &write))
            .unwrap();
        session.commit(Durability::Durable).unwrap();
        // One session, one atomic batch, then one flush.
        assert_eq!(store.unflushed_batches(), 0);
        assert!(docs.read(&second, document::read).unwrap().is_some());
        assert_eq!(docs.log_entries(&node, 0, 10).unwrap().len(), 2);
    }

    #[test]
    fn the_cache_holds_no_more_memory_than_its_budget_however_long_the_histories() {
        let budget = 256 * 1024;
        let config = DocStoreConfig {
            cache_documents: NonZeroUsize::new(1000).unwrap(),
            cache_bytes: budget,
            compact_after_changes: 8,
        };
        let node = NodeId::random().unwrap();
        let docs = DocStore::open(MemoryStore::new(), node, config).unwrap();
        let actor = node.actor(0);
        let ids: Vec<RecordId> = (0..40)
            .map(|i| RecordId::parse(&format!("t/r{i}")).unwrap())
            .collect();
        for round in 0..60 {
            for id in &ids {
                set(&docs, id, &actor, &format!("f{}", round % 5), round);
            }
            let (held, bytes) = docs.inner().cache.usage();
            assert!(
                bytes <= budget || held == 1,
                "{held} documents, {bytes} bytes"
            );
        }
        let (held, _) = docs.inner().cache.usage();
        assert!(
            held < ids.len(),
            "the budget, not the count, bounded the cache: {held}"
        );
        // What left the cache reads back whole.
        for id in &ids {
            let value = docs.read(id, document::read).unwrap();
            assert_eq!(value.map(|fields| fields.len()), Some(5));
        }
    }

    /// The weight of a loaded document per byte of its saved form (see
    /// [`LOADED_BYTES_PER_SAVED_BYTE`]): documents as the store loads them (snapshot, then
    /// changes), kept alive, against the process's resident memory.
    #[test]
    #[ignore = "a measurement: cargo test --release -p concord loaded_document_memory -- --ignored --nocapture"]
    fn loaded_document_memory() {
        use automerge::transaction::Transactable;
        fn resident_bytes() -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        // One size a process (`CONCORD_MEASURE_CHANGES`), since freed memory is reused.
        let changes: usize = std::env::var("CONCORD_MEASURE_CHANGES")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(100);
        // The saved forms first, then the documents loaded from them, as the store loads.
        let saved: Vec<Vec<u8>> = (0..300)
            .map(|d| {
                let mut doc = Automerge::new();
                for i in 0..changes {
                    let mut tx = doc.transaction();
                    tx.put(automerge::ROOT, format!("f{}", i % 6), (d * i) as i64)
                        .unwrap();
                    tx.put(automerge::ROOT, "name", format!("customer {d} {i}"))
                        .unwrap();
                    tx.commit();
                }
                doc.save()
            })
            .collect();
        let before = resident_bytes();
        let held: Vec<Automerge> = saved
            .iter()
            .map(|bytes| Automerge::load(bytes).unwrap())
            .collect();
        let grown = resident_bytes().saturating_sub(before);
        let ops: usize = held.iter().map(|doc| doc.stats().num_ops as usize).sum();
        let weights: usize = held
            .iter()
            .map(|doc| {
                Loaded {
                    doc: doc.clone(),
                    stored: StoredDoc::default(),
                }
                .weight()
            })
            .sum();
        println!(
            "{changes} changes a document: {grown} resident bytes for {} documents, {ops} ops: \
             {:.0} per document, {:.0} per op; weighed at {weights} ({:.2} of resident)",
            held.len(),
            grown as f64 / held.len() as f64,
            grown as f64 / ops as f64,
            weights as f64 / grown as f64,
        );
    }

    #[test]
    fn a_session_larger_than_the_cache_loses_nothing() {
        // Found by the simulator: a session that touched more documents than the cache holds
        // reloaded an evicted one from the store, which did not have the session's writes yet.
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 32);
        let ids: Vec<_> = (0..5)
            .map(|i| RecordId::parse(&format!("c/{i}")).unwrap())
            .collect();
        let mut session = docs.session();
        for (round, id) in ids.iter().chain(ids.iter()).enumerate() {
            let write = RecordWrite {
                set: vec![(format!("f{round}"), json!(round))],
                ..Default::default()
            };
            session
                .write(id, &node.actor(0), 0, |tx| apply_write(tx, &write))
                .unwrap();
        }
        session.commit(Durability::Durable).unwrap();
        let reopened = open(store, node, 32);
        let first = reopened.read(&ids[0], document::read).unwrap().unwrap();
        assert_eq!(first.get("f0"), Some(&json!(0)));
        assert_eq!(first.get("f5"), Some(&json!(5)));
        // Every log entry names a change its document holds.
        assert_eq!(
            reopened.log_after(&node, 0, 100, usize::MAX).unwrap().len(),
            10
        );
    }

    #[test]
    fn withdrawals_are_numbered_in_order_and_survive_a_crash() {
        let store = MemoryStore::new();
        let node = NodeId::random().unwrap();
        let docs = open(store.clone(), node, 4);
        let actor = node.actor(0);
        let ids: Vec<_> = (0..3)
            .map(|i| RecordId::parse(&format!("c/{i}")).unwrap())
            .collect();
        for id in &ids {
            set(&docs, id, &actor, "n", 1);
        }
        assert_eq!(docs.last_withdrawal(), 0);
        let (two, zero) = (ids[2].to_doc_key(), ids[0].to_doc_key());
        // A document not held is not withdrawn, and takes no number.
        let taken = docs.withdraw(&[&two, b"c/absent", &zero]).unwrap();
        assert_eq!(taken, vec![two.clone(), zero.clone()]);
        // One batch numbers its withdrawals in key order.
        assert_eq!(
            docs.withdrawals_after(0, 10).unwrap(),
            vec![(1, zero.clone()), (2, two.clone())]
        );
        assert_eq!(docs.withdrawals_after(1, 10).unwrap(), vec![(2, two)]);
        // Withdrawals are written without a flush of their own: the next durable write makes
        // them durable with it.
        set(&docs, &ids[1], &actor, "n", 2);
        store.crash(0);
        let reopened = open(store, node, 4);
        assert_eq!(reopened.last_withdrawal(), 2);
        let one = ids[1].to_doc_key();
        assert_eq!(reopened.withdraw(&[&one]).unwrap(), vec![one.clone()]);
        assert_eq!(
            reopened.withdrawals_after(2, 10).unwrap(),
            vec![(3, ids[1].to_doc_key())]
        );
    }
}
