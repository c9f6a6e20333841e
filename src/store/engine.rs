//! The engines a node's store runs on, and the one store type the node holds.
//!
//! [`Engine`] names an engine (`store.engine` in `concord.toml`); [`DiskStore`] is a store on
//! either, opened by [`DiskStore::open`], which finds the engine of an existing store from its
//! files, so a node keeps working on the engine its store was made with, and refuses a config
//! that names another (a store moves between engines through `concord backup` and
//! `concord restore`, whose format is engine-neutral). Outside `store/`, no code names an
//! engine's types.

use std::path::Path;

use super::{fjall_store, sled_store, Batch, FjallStore, KeyValue, SledStore, Store, StoreError};

/// A storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// sled 0.34: a B-tree over a log of pages.
    Sled,
    /// fjall 3: an LSM tree.
    Fjall,
}

impl Engine {
    /// The engine `concord init` writes into a new node's config (see BENCHMARKS.md for the
    /// figures behind the choice).
    pub const DEFAULT: Engine = Engine::Fjall;
    /// The engine of a config that names none: stores were made on sled before there was a
    /// choice.
    pub const UNNAMED: Engine = Engine::Sled;

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Fjall => "fjall",
        }
    }

    /// The engine whose store the directory `path` holds, if it holds one.
    pub fn of_store(path: &Path) -> Option<Engine> {
        if fjall_store::holds_store(path) {
            Some(Engine::Fjall)
        } else if sled_store::holds_store(path) {
            Some(Engine::Sled)
        } else {
            None
        }
    }

    fn lock_file(self) -> &'static str {
        match self {
            Engine::Sled => sled_store::LOCK_FILE,
            Engine::Fjall => fjall_store::LOCK_FILE,
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sled" => Ok(Engine::Sled),
            "fjall" => Ok(Engine::Fjall),
            other => Err(format!("unknown store engine {other:?}: sled or fjall")),
        }
    }
}

/// A store on disk, on either engine.
pub enum DiskStore {
    Sled(SledStore),
    Fjall(FjallStore),
}

impl DiskStore {
    /// Opens the store in `path` on the engine its files were made with, or creates one on
    /// `configured` (else [`Engine::UNNAMED`]). Refuses a store on another engine than
    /// `configured` names.
    pub fn open(
        path: &Path,
        configured: Option<Engine>,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let engine = match (Engine::of_store(path), configured) {
            (Some(found), Some(configured)) if found != configured => {
                return Err(StoreError::EngineMismatch {
                    path: path.display().to_string(),
                    found,
                    configured,
                })
            }
            (Some(found), _) => found,
            (None, configured) => configured.unwrap_or(Engine::UNNAMED),
        };
        Self::create(path, engine, cache_bytes)
    }

    /// Opens or creates the store in `path` on `engine`.
    pub fn create(path: &Path, engine: Engine, cache_bytes: u64) -> Result<Self, StoreError> {
        Ok(match engine {
            Engine::Sled => DiskStore::Sled(SledStore::open(path, cache_bytes)?),
            Engine::Fjall => DiskStore::Fjall(FjallStore::open(path, cache_bytes)?),
        })
    }

    pub fn engine(&self) -> Engine {
        match self {
            DiskStore::Sled(_) => Engine::Sled,
            DiskStore::Fjall(_) => Engine::Fjall,
        }
    }

    /// Why the store can no longer be used in this process, if it cannot.
    pub fn stuck(&self) -> Option<String> {
        match self {
            DiskStore::Sled(store) => store.stuck(),
            DiskStore::Fjall(_) => None,
        }
    }

    fn inner(&self) -> &dyn Store {
        match self {
            DiskStore::Sled(store) => store,
            DiskStore::Fjall(store) => store,
        }
    }
}

/// Whether the store in `path` is held open by a running process, by its engine's lock file
/// alone: no waiting, and without opening it (which a damaged store can hang).
pub fn in_use(path: &Path) -> std::io::Result<bool> {
    let Some(engine) = Engine::of_store(path) else {
        return Ok(false);
    };
    let lock = path.join(engine.lock_file());
    let file = match std::fs::File::open(&lock) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

impl Store for DiskStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().get(key)
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner().scan_prefix(prefix, after, limit)
    }

    fn last_in_prefix(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.inner().last_in_prefix(prefix)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.inner().apply(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner().flush()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner().size_on_disk()
    }

    fn failed(&self) -> bool {
        self.inner().failed()
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.inner().reopen()
    }
}

/// A (possibly damaged) store opened only to read what it still holds: what `concord recover`
/// walks, in a child process, since an engine may panic or hang on damaged files.
pub struct DamagedStore(Damaged);

enum Damaged {
    Sled(sled_store::Damaged),
    Fjall(fjall_store::Damaged),
}

impl DamagedStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(DamagedStore(
            match Engine::of_store(path).unwrap_or(Engine::UNNAMED) {
                Engine::Sled => Damaged::Sled(sled_store::Damaged::open(path)?),
                Engine::Fjall => Damaged::Fjall(fjall_store::Damaged::open(path)?),
            },
        ))
    }

    /// The entries with keys in `[low, high)`, forward or backward, each entry or the error
    /// that stopped it.
    pub fn range(
        &self,
        low: &[u8],
        high: &[u8],
        backward: bool,
    ) -> Box<dyn Iterator<Item = Result<KeyValue, StoreError>> + '_> {
        match &self.0 {
            Damaged::Sled(store) => store.range(low, high, backward),
            Damaged::Fjall(store) => store.range(low, high, backward),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_opens_on_the_engine_it_was_made_with_and_refuses_another() {
        for engine in [Engine::Sled, Engine::Fjall] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            let store = DiskStore::open(&path, Some(engine), 1 << 20).unwrap();
            let mut batch = Batch::default();
            batch.put(b"k".to_vec(), b"v".to_vec());
            store.apply(batch).unwrap();
            store.flush().unwrap();
            assert!(in_use(&path).unwrap(), "{engine}");
            drop(store);
            // sled lets go of its lock shortly after the last handle is dropped.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while in_use(&path).unwrap() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(!in_use(&path).unwrap(), "{engine}");
            assert_eq!(Engine::of_store(&path), Some(engine));
            let other = match engine {
                Engine::Sled => Engine::Fjall,
                Engine::Fjall => Engine::Sled,
            };
            let refused = DiskStore::open(&path, Some(other), 1 << 20).err().unwrap();
            assert!(
                matches!(refused, StoreError::EngineMismatch { found, .. } if found == engine),
                "{refused}"
            );
            let unnamed = DiskStore::open(&path, None, 1 << 20).unwrap();
            assert_eq!(unnamed.engine(), engine);
            assert_eq!(unnamed.get(b"k").unwrap(), Some(b"v".to_vec()));
        }
    }
}
