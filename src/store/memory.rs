//! An in-memory store for simulations and tests.
//!
//! It keeps what was written apart from what is durable: [`Store::apply`] makes a batch
//! visible at once, [`Store::flush`] makes every applied batch durable, and [`MemoryStore::crash`]
//! throws away what was not flushed, keeping a prefix of the unflushed batches if asked to (a
//! disk may persist some writes early, never out of order). That is exactly the loss the
//! durability contract allows.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Batch, KeyValue, Store, StoreError};

#[derive(Default)]
struct State {
    visible: BTreeMap<Vec<u8>, Vec<u8>>,
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    unflushed: Vec<Batch>,
    /// Flushes still to fail ([`MemoryStore::fail_flushes`]).
    flush_failures: usize,
}

/// Cloning shares the same contents, as reopening the same files would.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain maps behind, still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Simulates a crash: what was flushed stays, plus the first `keep_unflushed` of the
    /// batches applied since the last flush.
    pub fn crash(&self, keep_unflushed: usize) {
        let mut state = self.state();
        let unflushed = std::mem::take(&mut state.unflushed);
        for batch in unflushed.into_iter().take(keep_unflushed) {
            apply_to(&mut state.durable, batch);
        }
        state.visible = state.durable.clone();
    }

    /// A separate store holding what this one holds durably, as a backup copy would.
    pub fn durable_copy(&self) -> Self {
        let durable = self.state().durable.clone();
        let copy = Self::new();
        {
            let mut state = copy.state();
            state.visible = durable.clone();
            state.durable = durable;
        }
        copy
    }

    /// The next `count` flushes fail, as a disk that returns an error would, and make nothing
    /// durable (0: flushes succeed again).
    pub fn fail_flushes(&self, count: usize) {
        self.state().flush_failures = count;
    }

    /// Batches applied but not yet flushed.
    pub fn unflushed_batches(&self) -> usize {
        self.state().unflushed.len()
    }
}

fn apply_to(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: Batch) {
    for (key, value) in batch.into_operations() {
        match value {
            Some(value) => map.insert(key, value),
            None => map.remove(&key),
        };
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().visible.get(key).cloned())
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let state = self.state();
        let start = match after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(state
            .visible
            .range((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    fn last_in_prefix(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let state = self.state();
        Ok(state
            .visible
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .last()
            .map(|(key, value)| (key.clone(), value.clone())))
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut state = self.state();
        apply_to(&mut state.visible, batch.clone());
        state.unflushed.push(batch);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut state = self.state();
        if state.flush_failures > 0 {
            state.flush_failures -= 1;
            return Err(StoreError::Io(std::io::Error::other(
                "a flush failure the memory store was told to give",
            )));
        }
        let unflushed = std::mem::take(&mut state.unflushed);
        for batch in unflushed {
            apply_to(&mut state.durable, batch);
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &MemoryStore, key: &[u8]) {
        let mut batch = Batch::default();
        batch.put(key.to_vec(), b"v".to_vec());
        store.apply(batch).unwrap();
    }

    #[test]
    fn crash_keeps_flushed_and_a_prefix_of_the_rest() {
        let store = MemoryStore::new();
        put(&store, b"a");
        store.flush().unwrap();
        put(&store, b"b");
        put(&store, b"c");
        assert_eq!(store.scan_prefix(b"", None, 10).unwrap().len(), 3);
        store.crash(1);
        let keys: Vec<_> = store
            .scan_prefix(b"", None, 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn scan_pages_within_a_prefix() {
        let store = MemoryStore::new();
        for key in [&b"p1"[..], b"p2", b"p3", b"q1"] {
            put(&store, key);
        }
        let page = store.scan_prefix(b"p", None, 2).unwrap();
        assert_eq!(page.len(), 2);
        let rest = store.scan_prefix(b"p", Some(&page[1].0), 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].0, b"p3".to_vec());
    }
}
