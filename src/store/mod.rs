//! Store: the only part that touches the disk.
//!
//! [`Store`] is the storage seam: an ordered key-value space with atomic batches and an
//! explicit durability point. [`DiskStore`] is the production store, on one of two engines
//! ([`Engine`]: [`SledStore`] or [`FjallStore`]), the only code that names them;
//! [`MemoryStore`] serves simulations and tests and separates written bytes from durable
//! ones, so a simulated crash loses exactly what the contract allows.
//!
//! [`DocStore`] lays documents out on top of any `Store` (see [`layout`]): per document its
//! appended changes, a snapshot compacted from them, its heads and record state; a replication
//! log ordered by (origin node, sequence); the node's metadata. Loaded documents sit in a
//! bounded cache. Guarantees:
//!
//! - a write and every index entry it touches are applied in one atomic batch;
//! - a write is acknowledged only once durable: if [`Store::flush`] succeeds, every batch
//!   applied before it survives a crash (sled's contract, kept by `MemoryStore` too);
//! - a document read back from disk is checked against its recorded heads.

mod apply;
pub mod backup;
mod cache;
mod collision;
pub mod digest;
mod documents;
mod door;
pub mod engine;
mod fjall_store;
mod group_commit;
pub mod incarnation;
pub mod layout;
mod local_writes;
mod log;
mod memory;
mod progress;
mod refused;
mod replication;
pub mod salvage;
mod session;
mod sled_store;
pub mod stable;
pub mod truncation;

pub use apply::{ApplyReport, NewConflict};
pub use cache::{
    CACHE_DOCUMENTS_DEFAULT, CACHE_DOCUMENTS_MAX, CACHE_MIB_DEFAULT, CACHE_MIB_MAX,
    LOADED_BYTES_PER_OP, LOADED_DOCUMENT_BYTES,
};
pub use documents::{
    collection_of, DocStore, DocStoreConfig, Durability, ImportOutcome, StoredRecord, WriteOutcome,
    COMPACT_AFTER_CHANGES_DEFAULT, COMPACT_AFTER_CHANGES_MAX, SCAN_PAGE_ENTRIES,
};
pub use door::WriteDoor;
pub use engine::{DiskStore, Engine};
pub use fjall_store::FjallStore;
pub use incarnation::{claim_writer, new_incarnation, Incarnation};
pub use layout::{LogEntry, ScopeTag, Snapshot, StoredDoc};
pub use layout::{RefusalReason, RefusedChange};
pub use local_writes::LocalWrites;
pub use log::{LogPage, LoggedChange};
pub use memory::MemoryStore;
pub use progress::OriginProgress;
pub use refused::{RefusedEntry, RefusedUsage, Reissued, REFUSED_LISTED_MAX};
pub use replication::{DocumentHeadsEntry, UnloggedOutcome, Unplaced};
pub use session::WriteSession;
pub use sled_store::{SledStore, PAGE_CACHE_BYTES_DEFAULT};
pub use stable::{Adoption, Compacted};

use crate::record::RecordError;

impl From<crate::record::compaction::CompactionError> for StoreError {
    fn from(error: crate::record::compaction::CompactionError) -> Self {
        Self::Compaction(Box::new(error))
    }
}

/// One key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Writes that are applied together or not at all.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    operations: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.operations.push((key, Some(value)));
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        self.operations.push((key, None));
    }

    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// Bytes of the keys and values it writes.
    pub fn bytes(&self) -> usize {
        self.operations
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum()
    }

    pub fn into_operations(self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.operations
    }
}

/// An ordered key-value space with atomic batches and a durability point.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries whose keys start with `prefix`, in key order, starting after the
    /// key `after` when given. Pages keep memory bounded however large the prefix is.
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// The entry with the greatest key that starts with `prefix`.
    fn last_in_prefix(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError>;

    /// Applies every operation of the batch atomically. Not yet durable.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;

    /// Makes every batch applied before this call durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Bytes the store occupies on disk (0 for memory).
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Whether a write to disk failed, after which the store refuses writes until it is
    /// opened again ([`Store::reopen`]).
    fn failed(&self) -> bool {
        false
    }

    /// Opens the store again from what is durable: what was applied and never flushed is lost,
    /// as in a crash. For a store whose disk had space freed after it filled.
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What an engine answers a write after one of its writes to disk failed, until it is opened
/// again ([`Store::reopen`]).
fn refuse_if_failed(failed: &std::sync::atomic::AtomicBool) -> Result<(), StoreError> {
    if failed.load(std::sync::atomic::Ordering::Acquire) {
        return Err(StoreError::DiskFull(
            "a write to the store's disk failed: writes resume once the disk has room".to_owned(),
        ));
    }
    Ok(())
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine could not read or write its files.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    /// The engine found its files damaged.
    #[error("the store's files are damaged: {0}")]
    EngineCorrupt(String),
    /// Another process holds the store open.
    #[error("the store is open in another process")]
    Locked,
    /// The engine failed otherwise.
    #[error("storage: {0}")]
    Engine(String),
    #[error(
        "the store in {path} is a {found} store, and the config names {configured}: move the \
         node with `concord backup` and `concord restore` (nothing was changed)"
    )]
    EngineMismatch {
        path: String,
        found: engine::Engine,
        configured: engine::Engine,
    },
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// A write of this node's own that its grant does not allow (see [`crate::scope`]).
    #[error("{0}")]
    OutsideGrant(String),
    #[error(
        "change {0} could not be checked against the grants (an internal error, in the node's \
         log): nothing of it was written"
    )]
    Unjudged(String),
    #[error("the store is closed (it is being opened again after a write failed)")]
    Closed,
    #[error(
        "change {change} is stamped {} ms later than this node accepts (its clock plus \
         `clock_ahead_max_ms`): a writer's clock runs ahead; nothing was stored",
        clock_ms.saturating_sub(*accept_until_ms)
    )]
    ClockAhead {
        change: String,
        clock_ms: u64,
        accept_until_ms: u64,
    },
    #[error("{0}")]
    DiskFull(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("not an Automerge document: {0}")]
    InvalidDocument(String),
    #[error("a compacted history: {0}")]
    Compaction(Box<crate::record::compaction::CompactionError>),
    #[error(
        "a change of {size} bytes is over the limit of {size_max} bytes (4 MiB less 4 KiB); \
         nothing was stored"
    )]
    ChangeTooLarge { size: usize, size_max: usize },
    #[error(
        "this store has format {found}, and this build of concord reads formats up to \
         {known}: run a newer concord on it (nothing was changed)"
    )]
    UnknownFormat { found: u32, known: u32 },
    #[error("this store belongs to node {stored}, not to node {expected}")]
    WrongNode { stored: String, expected: String },
    #[error("a write session may touch at most {0} documents")]
    SessionTooLarge(usize),
    #[error("the node already has {0} sources, the most it may have")]
    TooManySources(usize),
    #[error("source name {0:?} is invalid: it must be 1-64 characters of a-z, 0-9, '_', '-', ':' or '.'")]
    InvalidSourceName(String),
}
