//! Documents on top of a [`Store`]: open a store and scan it back into memory, load, read
//! and list documents through the bounded cache ([`super::cache`]), and the entry points of
//! writes.
//!
//! Writes go through a [`WriteSession`] ([`super::session`]): one write is a session of one,
//! a bulk load is a session of a thousand. Only a committed session puts its documents back
//! into the cache, so the cache never runs ahead of the disk. Guarantees: a store of an unknown
//! format or of another node is refused at open; a document read back from disk is checked
//! against its recorded heads.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use automerge::transaction::Transaction;
use automerge::{ActorId, Automerge, Change, ChangeHash};

use super::cache::{Appended, DocCache, Loaded, CACHE_DOCUMENTS_DEFAULT, CACHE_MIB_DEFAULT};
use super::digest::DigestTree;
use super::door::WriteDoor;
use super::group_commit::GroupCommit;
use super::incarnation::Writers;
use super::layout::{self, EpochPlace, LogEntry, Snapshot, StoredDoc};
use super::progress::{scan_origins, OriginProgress};
use super::session::WriteSession;
use super::{Batch, Store, StoreError};
use crate::record::held::HeldDoc;
use crate::record::origin::{check_source_name, SOURCES_PER_NODE_MAX};
use crate::record::stamp::{self, ChangeStamp};
use crate::record::{document, Collection, Key, NodeId, RecordError, RecordId};

/// Appended changes of one document before they are compacted into its snapshot.
pub const COMPACT_AFTER_CHANGES_DEFAULT: u32 = 32;
/// Most appended changes one may configure before compaction.
pub const COMPACT_AFTER_CHANGES_MAX: u32 = 10_000;
/// A document whose snapshot is an `S` value takes a new one once its appended changes weigh
/// this part of the snapshot (and there are at least `compact_after_changes` of them): the
/// bytes written for its snapshots stay within a few times those of its changes, however long
/// its history.
pub const SNAPSHOT_GROWTH_PARTS: usize = 4;
/// Bytes of appended changes in a document's `D` value that force a compaction, whatever
/// their count.
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
    /// Compact the histories of documents once they are stable ([`super::stable`]); on
    /// unless the config says otherwise (`store.compact_histories`).
    pub compact_histories: bool,
    /// Changes a document holds beyond its base before its stable history is compacted
    /// ([`super::stable::COMPACT_HISTORY_CHANGES_MIN`] unless a test says otherwise).
    pub compact_history_changes_min: usize,
}

impl Default for DocStoreConfig {
    fn default() -> Self {
        Self {
            cache_documents: NonZeroUsize::new(CACHE_DOCUMENTS_DEFAULT).expect("nonzero constant"),
            cache_bytes: CACHE_MIB_DEFAULT * 1024 * 1024,
            compact_after_changes: COMPACT_AFTER_CHANGES_DEFAULT,
            compact_histories: true,
            compact_history_changes_min: super::stable::COMPACT_HISTORY_CHANGES_MIN,
        }
    }
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
    /// Per origin, the place at and below which its log was truncated
    /// ([`super::truncation`]).
    pub(super) floors: BTreeMap<NodeId, u64>,
    /// Documents with changes newly stable, to compact ([`super::stable`]).
    pub(super) stable_pending: super::stable::StablePending,
    /// Whether this store ever withdrew a document (holds a `K` key): until it has, no write
    /// needs to look for kept changes of its own ([`DocStore::lacks_kept_own_change`]).
    pub(super) withdrew_any: bool,
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

pub struct DocStore<S: Store> {
    pub(super) store: S,
    #[cfg(feature = "sabotage")]
    pub(super) sabotage: crate::Sabotage,
    pub(super) config: DocStoreConfig,
    inner: parking_lot::Mutex<Inner>,
    pub(super) group_commit: GroupCommit,
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
    /// Wakes the engine when a session adds durable changes to this node's log.
    pub(super) local_writes: super::local_writes::LocalWrites,
}

/// What a batch is taken to cost on disk, per byte of its keys and values: sled writes each
/// to its log, then again when it compacts.
const DISK_BYTES_PER_BATCH_BYTE: i64 = 2;
const ROOM_EXHAUSTED: &str = "the disk is full: writes resume by themselves once there is room";

pub use super::layout::collection_of;

impl<S: Store> DocStore<S> {
    /// Opens the documents of `node` in `store`. A fresh store is claimed for `node`; a store
    /// that belongs to another node is refused.
    pub fn open(store: S, node: NodeId, config: DocStoreConfig) -> Result<Self, StoreError> {
        // The format first: a store of an unknown layout is not read any further.
        let format_key = layout::meta_key(layout::META_FORMAT);
        // A fresh store takes this format; an older one reads as this one, and is marked with
        // it since it may now hold what only this one has (`C` keys), which a build that
        // knows only the older one must refuse.
        let found = match store.get(&format_key)? {
            Some(bytes) => Some(
                <[u8; 4]>::try_from(bytes.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("the store's format version".to_owned()))?,
            ),
            None => None,
        };
        if let Some(found) = found.filter(|found| *found > layout::STORE_FORMAT_VERSION) {
            return Err(StoreError::UnknownFormat {
                found,
                known: layout::STORE_FORMAT_VERSION,
            });
        }
        if found != Some(layout::STORE_FORMAT_VERSION) {
            let mut batch = Batch::default();
            batch.put(
                format_key,
                layout::STORE_FORMAT_VERSION.to_be_bytes().to_vec(),
            );
            store.apply(batch)?;
            store.flush()?;
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
            inner: parking_lot::Mutex::new(inner),
            config,
            group_commit: GroupCommit::default(),
            writers: Mutex::new(std::collections::HashMap::new()),
            write_refusal: Mutex::new(None),
            room: std::sync::atomic::AtomicI64::new(i64::MAX),
            door: std::sync::OnceLock::new(),
            local_writes: super::local_writes::LocalWrites::default(),
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

    pub(super) fn stamp(&self, actor: &ActorId, doc: &Automerge, time_ms: i64) -> ChangeStamp {
        let wall_ms = u64::try_from(time_ms).unwrap_or(0);
        let names = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(actor)
            .cloned();
        let clock = stamp::next_clock(doc, wall_ms);
        ChangeStamp {
            hlc: clock.ms,
            lc: clock.counter,
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

    /// The store's state, behind a lock that hands itself over fairly: a waiter that has
    /// waited a while gets it before the one that released it can take it again, so the
    /// engine is not kept out by writers that follow each other.
    pub(super) fn inner(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
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
    /// This node's own durable changes the engine has not been told of.
    pub fn local_writes(&self) -> &super::local_writes::LocalWrites {
        &self.local_writes
    }

    pub fn session(&self) -> WriteSession<'_, S> {
        WriteSession::new(self, self.inner())
    }

    /// Whether this store keeps a change of its own to the document (it was withdrawn once)
    /// that `doc` lacks: written here now, the record would take sequence numbers that change
    /// already holds.
    pub(super) fn lacks_kept_own_change(
        &self,
        doc_key: &[u8],
        doc: &HeldDoc,
    ) -> Result<bool, StoreError> {
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
                if !doc.holds(&hash) {
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
        read: impl FnOnce(&HeldDoc) -> T,
    ) -> Result<T, StoreError> {
        let mut inner = self.inner();
        let loaded = self.loaded(&mut inner, &id.to_doc_key())?;
        Ok(read(&loaded.doc))
    }

    /// State written by [`WriteSession::put_state`].
    pub fn state(&self, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(&layout::meta_key(name))
    }

    /// The nodes replication knows, with their names (see [`crate::sync::stability`]).
    pub fn known_nodes(&self) -> Result<Vec<(NodeId, String)>, StoreError> {
        let mut known = Vec::new();
        for_each_entry(&self.store, &layout::known_prefix(), |key, value| {
            let name = String::from_utf8_lossy(value).into_owned();
            known.push((layout::known_node(key)?, name));
            Ok(())
        })?;
        Ok(known)
    }

    /// Keeps `node` among the nodes replication knows, durably at once.
    pub fn note_known_node(&self, node: &NodeId, name: &str) -> Result<(), StoreError> {
        let mut session = self.session();
        // Durably: a node forgotten in a crash would hold nothing back from being stable.
        session.put_state(&layout::known_node_name(node), name.as_bytes().to_vec());
        session.commit(Durability::Durable)
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
            .scan_prefix(layout::WITHDRAWALS_PREFIX, Some(&from), limit)?
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
            .map(|(key, value)| (layout::meta_name_of(&key).to_vec(), value))
            .collect())
    }

    /// What the store holds about a document, without loading it into Automerge.
    pub fn stored(&self, id: &RecordId) -> Result<Option<StoredDoc>, StoreError> {
        self.store
            .get(&layout::doc_key(&id.to_doc_key()))?
            .map(|bytes| StoredDoc::decode(&bytes))
            .transpose()
    }

    /// Up to `limit` records of a collection (live and deleted) after key `after`, in key order.
    pub fn scan_collection(
        &self,
        collection: &Collection,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let prefix = layout::collection_prefix(collection.as_str());
        let after = after.map(|key| RecordId::new(collection.clone(), key.clone()));
        self.scan_records(&prefix, after.as_ref(), limit)
    }

    /// Up to `limit` document keys after `after`, in order.
    pub fn documents_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let after_key = after.map(layout::doc_key);
        Ok(self
            .store
            .scan_prefix(layout::DOCS_PREFIX, after_key.as_deref(), limit)?
            .into_iter()
            .map(|(key, _)| layout::doc_key_of(&key).to_vec())
            .collect())
    }

    /// Up to `limit` records of every collection (live and deleted) after `after`, in the
    /// order of their document keys.
    pub fn scan_all_records(
        &self,
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        self.scan_records(layout::DOCS_PREFIX, after, limit)
    }

    fn scan_records(
        &self,
        prefix: &[u8],
        after: Option<&RecordId>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let after_key = after.map(|id| layout::doc_key(&id.to_doc_key()));
        let entries = self
            .store
            .scan_prefix(prefix, after_key.as_deref(), limit)?;
        entries
            .into_iter()
            .map(|(key, value)| {
                let id = RecordId::from_doc_key(layout::doc_key_of(&key))
                    .map_err(|error| StoreError::Corrupt(format!("stored record id: {error}")))?;
                let stored = StoredDoc::decode(&value)?;
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
            if doc.heads().is_empty() {
                None
            } else {
                Some(doc.save().0)
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
        let mut stored: StoredDoc = StoredDoc::decode(&bytes)?;
        let (doc, heads_match, appended) = load_document(&self.store, doc_key, &mut stored)?;
        // Check after reading back: the document must be exactly what was recorded.
        if !heads_match {
            return Err(StoreError::Corrupt(format!(
                "{}: its heads do not match its changes",
                String::from_utf8_lossy(doc_key)
            )));
        }
        Ok(Loaded {
            doc,
            stored,
            appended,
        })
    }
}

/// The document `stored` describes, from its snapshot and appended changes (in its `D` value
/// and under its `C` keys); whether its heads are the ones recorded; and what its `C` keys
/// hold. An epoch kept in the `S` value is taken into `stored`.
pub(super) fn load_document<S: Store>(
    store: &S,
    doc_key: &[u8],
    stored: &mut StoredDoc,
) -> Result<(HeldDoc, bool, Appended), StoreError> {
    let corrupt =
        |what: String| StoreError::Corrupt(format!("{}: {what}", String::from_utf8_lossy(doc_key)));
    let mut appended = Appended::default();
    let mut doc = match &stored.snapshot {
        Snapshot::None => HeldDoc::default(),
        Snapshot::Inline(snapshot) => {
            appended.snapshot_bytes = snapshot.len();
            HeldDoc::load(snapshot, stored.epoch.as_deref())
                .map_err(|e| corrupt(format!("snapshot: {e}")))?
        }
        Snapshot::External => {
            let value = store
                .get(&layout::snapshot_key(doc_key))?
                .ok_or_else(|| corrupt("its snapshot is missing".to_owned()))?;
            let (snapshot, place) = layout::read_snapshot_value(&value)
                .map_err(|e| corrupt(format!("snapshot: {e}")))?;
            if let EpochPlace::Here(epoch) = place {
                stored.epoch = epoch.map(<[u8]>::to_vec);
                stored.epoch_with_snapshot = true;
            }
            appended.snapshot_bytes = snapshot.len();
            HeldDoc::load(snapshot, stored.epoch.as_deref())
                .map_err(|e| corrupt(format!("snapshot: {e}")))?
        }
    };
    let mut changes = stored
        .changes
        .iter()
        .map(|bytes| Change::from_bytes(bytes.clone()).map_err(|e| corrupt(format!("change: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // Only a document whose snapshot is an `S` value has `C` keys (see [`super::session`]).
    let under_keys = if stored.snapshot == Snapshot::External {
        appended_changes(store, doc_key)?
    } else {
        Vec::new()
    };
    for (hash, bytes) in under_keys {
        appended.hashes.push(hash);
        appended.bytes += bytes.len();
        changes.push(Change::from_bytes(bytes).map_err(|e| corrupt(format!("change: {e}")))?);
    }
    doc.apply(changes)
        .map_err(|e| corrupt(format!("applying changes: {e}")))?;
    let heads = doc.heads();
    Ok((doc, heads == stored.change_hashes(), appended))
}

/// The changes under a document's `C` keys, by hash.
pub(super) fn appended_changes<S: Store>(
    store: &S,
    doc_key: &[u8],
) -> Result<Vec<(ChangeHash, Vec<u8>)>, StoreError> {
    let mut changes = Vec::new();
    for_each_entry(store, &layout::appended_prefix(doc_key), |key, value| {
        let (_, hash) = layout::appended_parts(key)?;
        changes.push((hash, value.to_vec()));
        Ok(())
    })?;
    Ok(changes)
}

/// What a store holds, read back into the state a [`DocStore`] keeps in memory. The log says
/// where the writer's sequence continues and how much of every origin is held; no counter is
/// rewritten on every write.
fn scan_inner<S: Store>(
    store: &S,
    writer: NodeId,
    config: &DocStoreConfig,
) -> Result<Inner, StoreError> {
    let floors = super::truncation::scan_floors(store)?;
    let origins = scan_origins(store, &floors)?;
    let (digest, live_records) = scan_documents(store)?;
    // Above the last entry, and above a floor that truncated them all.
    let last_entry = match store.last_in_prefix(&layout::log_prefix(&writer))? {
        Some((key, _)) => layout::log_sequence(&key)?,
        None => 0,
    };
    let next_log_sequence = last_entry.max(floors.get(&writer).copied().unwrap_or(0)) + 1;
    let writers = Writers::load(store, writer)?;
    let (refused, reissues) = super::refused::scan(store)?;
    let next_withdrawal = match store.last_in_prefix(layout::WITHDRAWALS_PREFIX)? {
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
        floors,
        stable_pending: BTreeMap::new(),
        withdrew_any: store.last_in_prefix(layout::KEPT_PREFIX)?.is_some(),
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
    for_each_entry(store, layout::DOCS_PREFIX, |key, value| {
        let stored: StoredDoc = StoredDoc::decode(value)?;
        let doc_key = layout::doc_key_of(key);
        digest.update(doc_key, &[], &stored.change_hashes());
        live += u64::from(counts_as_live(doc_key, stored.record_state()));
        Ok(())
    })?;
    Ok((digest, live))
}

/// Whether a document counts in the live-record count: a live record of a user collection.
pub(super) fn counts_as_live(doc_key: &[u8], state: document::RecordState) -> bool {
    doc_key.first() != Some(&b'_') && state == document::RecordState::Live
}

#[cfg(test)]
#[path = "documents_tests.rs"]
mod tests;
