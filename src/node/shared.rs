//! The handles a running node's engine task and HTTP API share, and what admits a write:
//! writers are pushed back while the node cannot keep up, refused once its engine stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::status::Status;
use super::{Node, NodeError};
use crate::net::Transport;

/// How long a writer pushed back is told to wait, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Why a write was refused before it was tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node cannot keep up: retry after a moment.
    Overloaded,
    /// The engine task stopped: the node is going down.
    EngineDown,
}

/// Handles shared by the engine task and the HTTP API.
pub struct Shared {
    pub node: Arc<Node>,
    pub transport: Arc<Transport>,
    pub status: Mutex<Status>,
    /// Set by the engine task while writers should be pushed back.
    pub overloaded: AtomicBool,
    /// Cleared when the engine task ends.
    pub engine_alive: AtomicBool,
    /// Writes refused because of [`Shared::overloaded`].
    pub writes_refused: AtomicU64,
    /// Changes applied from peers; a lagging subscriber misses notices, never blocks the node.
    pub applied: tokio::sync::broadcast::Sender<AppliedNotice>,
    pub started: Instant,
    /// The status of each adapter binding, kept up to date by its thread.
    pub bindings: Vec<Arc<Mutex<crate::adapters::BindingStatus>>>,
    /// Backups streamed at once (`GET /v1/backup`): each reads the whole store.
    pub backups: Arc<tokio::sync::Semaphore>,
    /// Free bytes on the data dir's disk, as last checked.
    pub disk_free_bytes: AtomicU64,
    /// The longest engine step so far, in milliseconds.
    pub slowest_engine_step_ms: AtomicU64,
}

/// Notices kept for slow subscribers of applied changes.
pub const APPLIED_NOTICES_BUFFERED: usize = 4096;

/// A change from a peer, applied here.
#[derive(Debug, Clone)]
pub struct AppliedNotice {
    pub from: crate::record::NodeId,
    pub origin: crate::record::NodeId,
    pub sequence: u64,
    pub doc_key: Vec<u8>,
    pub at: Instant,
}

pub(crate) fn resolve(address: &str) -> Result<SocketAddr, NodeError> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| NodeError::Address(address.to_owned()))
}

/// Why the node is degraded now (writes refused, or its store failed a write), if it is.
pub fn degraded(shared: &Shared) -> Option<String> {
    let docs = shared.node.documents();
    docs.write_refusal()
        .or_else(|| docs.room_exhausted())
        .or_else(|| {
            docs.failed().then(|| {
                "a write to the store's disk failed: writes resume once the disk has room"
                    .to_owned()
            })
        })
}

impl Shared {
    /// Whether a write may be tried now. Counts the refusals.
    pub fn admit_write(&self) -> Result<(), Refusal> {
        if !self.engine_alive.load(Ordering::Acquire) {
            return Err(Refusal::EngineDown);
        }
        if self.overloaded.load(Ordering::Acquire) {
            self.writes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Overloaded);
        }
        Ok(())
    }

    /// The status as of now: the engine's part as of its last step, the bindings' counters
    /// read live (a binding's work does not always wake the engine after it is counted).
    pub fn status_now(&self) -> Status {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        status.bindings = self
            .bindings
            .iter()
            .map(|binding| {
                binding
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
            })
            .collect();
        status.degraded = degraded(self);
        status.disk_free_bytes = self.disk_free_bytes.load(Ordering::Relaxed);
        status.slowest_engine_step_ms = self.slowest_engine_step_ms.load(Ordering::Relaxed);
        status
    }
}
