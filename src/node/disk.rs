//! The disk under a node's data dir: writes stop before it fills, and start again by
//! themselves once it has room.
//!
//! A node keeps a reserve file (`store.reserve`, a twentieth of the filesystem, between 4 and
//! 64 MiB) beside its store: the engine needs room of its own to write its log and compact it, and
//! a write it cannot make can leave it waiting for good. While the filesystem has less free space than the reserve, the
//! node refuses writes (HTTP 507, `concord` exits 1) and says so in `/v1/status` and
//! `/metrics`, so the store itself rarely meets a full disk. If it does anyway (another
//! program filled it), the engine refuses writes from then on, and the node opens the store again
//! once there is room ([`crate::store::DocStore::reopen`]). A node that starts on a
//! full disk gives up the reserve to open its store, and serves reads; the reserve is made
//! again once the disk has room for it twice over.
//!
//! Guarantees: no acknowledged write is lost to a full disk (a write is acknowledged only once
//! durable); checking costs one `statvfs` a second.

use std::path::{Path, PathBuf};

use fs2::FileExt;

/// The reserve file inside a data dir.
pub const RESERVE_FILE: &str = "store.reserve";
/// Bounds of the reserve: a twentieth of the filesystem, between these.
pub const RESERVE_BYTES_MIN: u64 = 4 * 1024 * 1024;
pub const RESERVE_BYTES_MAX: u64 = 64 * 1024 * 1024;
const RESERVE_SHARE: u64 = 20;

/// The disk under one data dir.
#[derive(Debug, Clone)]
pub struct Disk {
    dir: PathBuf,
    reserve: u64,
}

/// What [`Disk::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskState {
    pub free_bytes: u64,
    pub reserve_bytes: u64,
    /// Whether the reserve file is in place.
    pub reserved: bool,
}

impl DiskState {
    /// Free bytes writes need: the reserve, or twice it while the reserve is not in place (the
    /// node waits until it can make it again).
    fn needed(&self) -> u64 {
        if self.reserved {
            self.reserve_bytes
        } else {
            2 * self.reserve_bytes
        }
    }

    /// Bytes writes may take before they must wait.
    pub fn room(&self) -> u64 {
        self.free_bytes.saturating_sub(self.needed())
    }

    /// Why writes must wait, if they must.
    pub fn refusal(&self) -> Option<String> {
        let needed = self.needed();
        (self.free_bytes < needed).then(|| {
            format!(
                "the disk is full: {} bytes free, and writes need {needed} free; they resume \
                 by themselves once there is room",
                self.free_bytes
            )
        })
    }
}

impl Disk {
    pub fn new(dir: &Path) -> Self {
        let total = fs2::total_space(dir).unwrap_or(RESERVE_BYTES_MAX * RESERVE_SHARE);
        Self {
            dir: dir.to_owned(),
            reserve: (total / RESERVE_SHARE).clamp(RESERVE_BYTES_MIN, RESERVE_BYTES_MAX),
        }
    }

    fn reserve_path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// Gives up the reserve file (to open a store on a full disk); whether there was one.
    pub fn release(&self) -> bool {
        std::fs::remove_file(self.reserve_path()).is_ok()
    }

    /// The disk's free space and reserve, making the reserve file again if it is missing and
    /// the disk has room for it twice over.
    pub fn check(&self) -> std::io::Result<DiskState> {
        let mut free = fs2::available_space(&self.dir)?;
        let path = self.reserve_path();
        let mut reserved = path.exists();
        if !reserved && free >= 2 * self.reserve {
            match make_reserve(&path, self.reserve) {
                Ok(()) => {
                    reserved = true;
                    free = fs2::available_space(&self.dir)?;
                }
                Err(error) => {
                    let _ = std::fs::remove_file(&path);
                    tracing::warn!(%error, "could not make the disk reserve");
                }
            }
        }
        Ok(DiskState {
            free_bytes: free,
            reserve_bytes: self.reserve,
            reserved,
        })
    }
}

fn make_reserve(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::files::FILE_MODE)
        .open(path)?;
    // Allocated, not sparse: the space must really be taken.
    file.allocate(bytes)?;
    file.sync_all()
}

/// Whether `error` says the disk is full.
pub fn is_disk_full(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull || error.raw_os_error() == Some(28)
}
