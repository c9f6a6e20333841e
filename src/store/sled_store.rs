//! The production store: one sled tree.
//!
//! One tree, so that a batch touching a document, its heads, its changes and the log is one
//! `apply_batch`, which sled applies atomically. sled's guarantee is the one the store passes
//! on: if `flush` succeeds, all previous writes will be recovered after a crash.
//!
//! sled refuses every write for good once one of its writes to disk failed (a full disk, most
//! often), though reads go on. [`SledStore::reopen`] drops the database and opens it again
//! from what is durable, so that a node whose disk had space freed writes again without a
//! restart; what was applied and never flushed is gone then, as after a crash.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use super::{Batch, KeyValue, Store, StoreError};

/// sled's page cache, in bytes, unless the config says otherwise.
pub const PAGE_CACHE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

pub struct SledStore {
    path: PathBuf,
    cache_bytes: u64,
    /// `None` only between closing and opening again in [`SledStore::reopen`].
    db: RwLock<Option<sled::Db>>,
    /// A write to disk failed: sled refuses writes until the database is opened again.
    failed: AtomicBool,
    /// sled did not close within [`CLOSE_WAIT`] when it was to be opened again: it is stuck
    /// waiting on a write that will not come, and only a new process can open the store.
    stuck: AtomicBool,
}

/// How long reopening waits for sled to close (it flushes as it closes).
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|error| match error {
            // sled reports a store another process holds as an I/O error about its lock.
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
            {
                StoreError::Locked
            }
            other => other.into(),
        })
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        match error {
            sled::Error::Io(io) => StoreError::Io(io),
            sled::Error::Corruption { .. } => StoreError::EngineCorrupt(error.to_string()),
            other => StoreError::Engine(other.to_string()),
        }
    }
}

/// Whether `path` holds a sled store (sled keeps its settings in a file named `conf`).
pub(super) fn holds_store(path: &Path) -> bool {
    path.join("conf").is_file() || path.join("db").is_file()
}

/// The file sled locks while a process holds the store open.
pub(super) const LOCK_FILE: &str = "db";

/// Reads the keys in `[low, high)` of the (possibly damaged) sled store at `path`, forward or
/// backward, each entry or the error that stopped it: what salvage walks.
pub(super) struct Damaged(sled::Db);

impl Damaged {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self(sled::Config::new().path(path).open()?))
    }

    pub(super) fn range(
        &self,
        low: &[u8],
        high: &[u8],
        backward: bool,
    ) -> Box<dyn Iterator<Item = Result<KeyValue, StoreError>> + '_> {
        let entries = self.0.range(low.to_vec()..high.to_vec());
        let entry = |entry: sled::Result<(sled::IVec, sled::IVec)>| {
            entry
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .map_err(StoreError::from)
        };
        if backward {
            Box::new(entries.rev().map(entry))
        } else {
            Box::new(entries.map(entry))
        }
    }
}

impl SledStore {
    /// Why the store can no longer be used in this process, if it cannot.
    pub fn stuck(&self) -> Option<String> {
        self.stuck.load(Ordering::Acquire).then(|| {
            "the store could not be opened again after a write to its disk failed (sled is \
             waiting on a write that will not come): the node stops, and a restart opens the \
             store"
                .to_owned()
        })
    }

    /// Opens (creating if needed) the store in `path`, with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = open_db(path, cache_bytes)?;
        Ok(Self {
            path: path.to_owned(),
            cache_bytes,
            db: RwLock::new(Some(db)),
            failed: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
        })
    }

    fn db(&self) -> Result<RwLockReadGuard<'_, Option<sled::Db>>, StoreError> {
        let guard = self
            .db
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed);
        }
        Ok(guard)
    }

    /// Once a write failed, sled's own writes may block for good (waiting on a buffer that
    /// never reaches the disk): later writes fail at once instead.
    fn refuse_if_failed(&self) -> Result<(), StoreError> {
        super::refuse_if_failed(&self.failed)
    }

    /// Notes a write error: sled refuses every later write once one failed on disk.
    fn written<T>(&self, result: sled::Result<T>) -> Result<T, StoreError> {
        result.map_err(|error| {
            if matches!(error, sled::Error::Io(_)) {
                self.failed.store(true, Ordering::Release);
            }
            error.into()
        })
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let db = db.as_ref().expect("checked by db()");
        Ok(db.get(key)?.map(|value| value.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let db = self.db()?;
        let db = db.as_ref().expect("checked by db()");
        let mut entries = Vec::new();
        let iter = match after {
            Some(after) => {
                db.range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            None => db.range::<&[u8], _>(prefix..),
        };
        for entry in iter {
            let (key, value) = entry?;
            if !key.starts_with(prefix) || entries.len() >= limit {
                break;
            }
            entries.push((key.to_vec(), value.to_vec()));
        }
        Ok(entries)
    }

    fn last_in_prefix(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let db = self.db()?;
        let db = db.as_ref().expect("checked by db()");
        match db.scan_prefix(prefix).next_back() {
            Some(entry) => {
                let (key, value) = entry?;
                Ok(Some((key.to_vec(), value.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.refuse_if_failed()?;
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.into_operations() {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        let db = self.db()?;
        let db = db.as_ref().expect("checked by db()");
        self.written(db.apply_batch(sled_batch))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.refuse_if_failed()?;
        let db = self.db()?;
        let db = db.as_ref().expect("checked by db()");
        self.written(db.flush()).map(|_| ())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let db = db.as_ref().expect("checked by db()");
        Ok(db.size_on_disk()?)
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        // Closed first: sled locks its files while open. It flushes as it closes, and after a
        // write failed it may wait for good: it closes on a thread of its own, given a while.
        let stuck = || {
            self.stuck.store(true, Ordering::Release);
            StoreError::Closed
        };
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        let old = loop {
            if let Ok(mut db) = self.db.try_write() {
                break db.take();
            }
            if std::time::Instant::now() >= deadline {
                return Err(stuck());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        if let Some(old) = old {
            let (closed, done) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                drop(old);
                let _ = closed.send(());
            });
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done.recv_timeout(left).is_err() {
                return Err(stuck());
            }
        }
        let opened = open_db(&self.path, self.cache_bytes)?;
        *self
            .db
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(opened);
        self.failed.store(false, Ordering::Release);
        Ok(())
    }
}
