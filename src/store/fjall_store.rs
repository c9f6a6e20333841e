//! The store on fjall: one keyspace of an LSM tree.
//!
//! One keyspace, so that a batch touching a document, its heads, its changes and the log is one
//! write batch, which fjall applies atomically (the batch is one journal entry). Its
//! guarantee is the one the store passes on: once [`Store::flush`] (a journal sync) succeeds,
//! every batch committed before it survives a crash; a batch never survives in part.
//!
//! fjall refuses every write once a write to its journal failed (it is "poisoned"), though
//! reads go on. [`FjallStore::reopen`] drops the database and opens it again from what is
//! durable, as after a crash, so that a node whose disk had space freed writes again without
//! a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use super::{Batch, KeyValue, Store, StoreError};

/// The one keyspace the store keeps its keys in.
const KEYSPACE: &str = "concord";

/// Bytes of journal fjall keeps at most (the least it accepts).
const JOURNALS_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Bytes a keyspace's memtable takes before it is written out as a table (and its journal
/// let go). fjall's default, 64 MiB, flushes tables of 12-19 MiB that hold every version of
/// a key rewritten meanwhile and the tombstones of truncated log entries, up to four of them
/// before a compaction merges them: 100-160 MiB of files for a store holding 8-60 MiB under
/// steady patches (the churn benchmark). Set when a store is made: fjall keeps a keyspace's
/// options with it.
const MEMTABLE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Threads fjall flushes and compacts in. With more than one, fjall 3.1's first worker hands
/// every compaction task it receives back to the queue and takes the next, so that it stays
/// free for flushes: while the other compacts, it spins (10% of a relaying node's CPU in a
/// three-node churn run, `perf record`, beside 13% for the compactions themselves).
const WORKER_THREADS: usize = 1;

/// fjall marks a database with this file (its format version inside).
const VERSION_FILE: &str = "version";
/// The file fjall locks while a process holds the store open.
pub(super) const LOCK_FILE: &str = "lock";

struct Open {
    db: fjall::Database,
    keys: fjall::Keyspace,
}

pub struct FjallStore {
    path: PathBuf,
    cache_bytes: u64,
    /// `None` only between closing and opening again in [`FjallStore::reopen`].
    open: RwLock<Option<Open>>,
    /// A write to disk failed: fjall refuses writes until the database is opened again.
    failed: AtomicBool,
}

impl From<fjall::Error> for StoreError {
    fn from(error: fjall::Error) -> Self {
        match error {
            fjall::Error::Io(io) => StoreError::Io(io),
            fjall::Error::Locked => StoreError::Locked,
            fjall::Error::Storage(fjall::LsmError::Io(io)) => StoreError::Io(io),
            corrupt @ (fjall::Error::JournalRecovery(_)
            | fjall::Error::InvalidVersion(_)
            | fjall::Error::Decompress(_)
            | fjall::Error::InvalidTrailer
            | fjall::Error::InvalidTag(_)
            | fjall::Error::Unrecoverable) => StoreError::EngineCorrupt(format!("{corrupt:?}")),
            other => StoreError::Engine(format!("{other:?}")),
        }
    }
}

/// Whether an I/O error met opening a store that exists says it is damaged.
fn damage_shows_as(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind;
    matches!(
        kind,
        ErrorKind::AlreadyExists
            | ErrorKind::NotFound
            | ErrorKind::InvalidData
            | ErrorKind::UnexpectedEof
    )
}

/// Whether `path` holds a fjall store.
pub(super) fn holds_store(path: &Path) -> bool {
    path.join(VERSION_FILE).is_file()
}

fn open_db(path: &Path, cache_bytes: u64) -> Result<Open, StoreError> {
    let db = fjall::Database::builder(path)
        .cache_size(cache_bytes)
        // Durability is the store's to decide: a write is durable at `flush`, not before.
        .manual_journal_persist(true)
        // Journals are kept until their writes are flushed into tables: fjall's least bound,
        // so that they do not take half a gigabyte beside a small store.
        .max_journaling_size(JOURNALS_BYTES_MAX)
        .worker_threads(WORKER_THREADS)
        .open()?;
    let keys = db.keyspace(KEYSPACE, || {
        fjall::KeyspaceCreateOptions::default()
            .data_block_compression_policy(fjall::config::CompressionPolicy::all(
                fjall::CompressionType::Lz4,
            ))
            .max_memtable_size(MEMTABLE_BYTES_MAX)
    })?;
    Ok(Open { db, keys })
}

impl FjallStore {
    /// Opens (creating if needed) the store in `path`, with a block cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let existed = holds_store(path);
        let open = open_db(path, cache_bytes).map_err(|error| match error {
            // A store that was there and lost a file fjall needs is damaged: fjall takes the
            // missing part for a new one and stumbles on what it finds ("File exists").
            StoreError::Io(io) if existed && damage_shows_as(io.kind()) => {
                StoreError::EngineCorrupt(format!("opening it: {io}"))
            }
            other => other,
        })?;
        Ok(Self {
            path: path.to_owned(),
            cache_bytes,
            open: RwLock::new(Some(open)),
            failed: AtomicBool::new(false),
        })
    }

    fn handle(&self) -> Result<RwLockReadGuard<'_, Option<Open>>, StoreError> {
        let guard = self
            .open
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed);
        }
        Ok(guard)
    }

    fn refuse_if_failed(&self) -> Result<(), StoreError> {
        super::refuse_if_failed(&self.failed)
    }

    /// Notes a write error: fjall refuses every later write once one failed.
    fn written<T>(&self, result: fjall::Result<T>) -> Result<T, StoreError> {
        result.map_err(|error| {
            if matches!(
                error,
                fjall::Error::Io(_) | fjall::Error::Poisoned | fjall::Error::Storage(_)
            ) {
                self.failed.store(true, Ordering::Release);
            }
            error.into()
        })
    }
}

fn pair(guard: fjall::Guard) -> Result<KeyValue, StoreError> {
    let (key, value) = guard.into_inner()?;
    Ok((key.to_vec(), value.to_vec()))
}

impl Store for FjallStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let open = self.handle()?;
        let open = open.as_ref().expect("checked by handle()");
        Ok(open.keys.get(key)?.map(|value| value.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let open = self.handle()?;
        let open = open.as_ref().expect("checked by handle()");
        let iter = match after {
            Some(after) => open
                .keys
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => open.keys.prefix(prefix),
        };
        let mut entries = Vec::new();
        for guard in iter {
            if entries.len() >= limit {
                break;
            }
            let (key, value) = pair(guard)?;
            if !key.starts_with(prefix) {
                break;
            }
            entries.push((key, value));
        }
        Ok(entries)
    }

    fn last_in_prefix(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let open = self.handle()?;
        let open = open.as_ref().expect("checked by handle()");
        open.keys.prefix(prefix).next_back().map(pair).transpose()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.refuse_if_failed()?;
        let open = self.handle()?;
        let open = open.as_ref().expect("checked by handle()");
        // The last operation on a key wins, as in sled's batches: fjall gives every entry of
        // a batch the same sequence number, so a key is written once.
        let mut last: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> =
            std::collections::BTreeMap::new();
        for (key, value) in batch.into_operations() {
            last.insert(key, value);
        }
        let mut writes = open.db.batch();
        for (key, value) in last {
            match value {
                Some(value) => writes.insert(&open.keys, key, value),
                None => writes.remove(&open.keys, key),
            }
        }
        self.written(writes.commit())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.refuse_if_failed()?;
        let open = self.handle()?;
        let open = open.as_ref().expect("checked by handle()");
        self.written(open.db.persist(fjall::PersistMode::SyncAll))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let open = self.handle()?;
        let open = open.as_ref().expect("checked by handle()");
        Ok(open.db.disk_space()?)
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut open = self
            .open
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Closed first: fjall locks its files while open.
        drop(open.take());
        *open = Some(open_db(&self.path, self.cache_bytes)?);
        self.failed.store(false, Ordering::Release);
        Ok(())
    }
}

/// Reads the keys in `[low, high)` of the (possibly damaged) fjall store at `path`, forward
/// or backward, each entry or the error that stopped it: what salvage walks.
pub(super) struct Damaged(Open);

impl Damaged {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self(open_db(path, super::PAGE_CACHE_BYTES_DEFAULT)?))
    }

    pub(super) fn range(
        &self,
        low: &[u8],
        high: &[u8],
        backward: bool,
    ) -> Box<dyn Iterator<Item = Result<KeyValue, StoreError>> + '_> {
        let entries = self.0.keys.range(low.to_vec()..high.to_vec());
        if backward {
            Box::new(entries.rev().map(pair))
        } else {
            Box::new(entries.map(pair))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &FjallStore, key: &[u8], value: &[u8]) {
        let mut batch = Batch::default();
        batch.put(key.to_vec(), value.to_vec());
        store.apply(batch).unwrap();
    }

    #[test]
    fn scans_pages_and_the_last_key_within_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path(), 1 << 20).unwrap();
        for key in [&b"p1"[..], b"p2", b"p3", b"q1"] {
            put(&store, key, b"v");
        }
        let page = store.scan_prefix(b"p", None, 2).unwrap();
        assert_eq!(page.len(), 2);
        let rest = store.scan_prefix(b"p", Some(&page[1].0), 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].0, b"p3".to_vec());
        assert_eq!(store.last_in_prefix(b"p").unwrap().unwrap().0, b"p3");
        assert_eq!(store.last_in_prefix(b"r").unwrap(), None);
    }

    #[test]
    fn the_last_operation_on_a_key_in_a_batch_wins_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path(), 1 << 20).unwrap();
        let mut batch = Batch::default();
        batch.put(b"a".to_vec(), b"1".to_vec());
        batch.remove(b"a".to_vec());
        batch.put(b"b".to_vec(), b"1".to_vec());
        batch.put(b"b".to_vec(), b"2".to_vec());
        store.apply(batch).unwrap();
        store.flush().unwrap();
        store.reopen().unwrap();
        assert_eq!(store.get(b"a").unwrap(), None);
        assert_eq!(store.get(b"b").unwrap(), Some(b"2".to_vec()));
        assert!(holds_store(dir.path()));
        drop(store);
        assert!(matches!(
            (
                FjallStore::open(dir.path(), 1 << 20),
                FjallStore::open(dir.path(), 1 << 20)
            ),
            (Ok(_), Err(StoreError::Locked))
        ));
    }
}
