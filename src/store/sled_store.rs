//! The production store: one sled tree.
//!
//! One tree, so that a batch touching a document, its heads, its changes and the log is one
//! `apply_batch`, which sled applies atomically. sled's guarantee is the one the store passes
//! on: if `flush` succeeds, all previous writes will be recovered after a crash.

use std::path::Path;

use super::{Batch, KeyValue, Store, StoreError};

/// sled's page cache, in bytes, unless the config says otherwise.
pub const PAGE_CACHE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Opens (creating if needed) the store in `path`, with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Self { db })
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?.map(|value| value.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut entries = Vec::new();
        let iter = match after {
            Some(after) => self
                .db
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.db.range::<&[u8], _>(prefix..),
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
        match self.db.scan_prefix(prefix).next_back() {
            Some(entry) => {
                let (key, value) = entry?;
                Ok(Some((key.to_vec(), value.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.into_operations() {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        self.db.apply_batch(sled_batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}
