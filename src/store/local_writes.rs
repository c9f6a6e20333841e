//! Telling the replication engine of this node's own new changes, in one place: a write
//! session that adds to this node's log wakes the engine once its changes are durable,
//! whichever way the write came in (the API, the CLI, an adapter, an import, a grant, a
//! write issued again after a collision).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Changes this node wrote that the engine has not read from the log yet.
#[derive(Debug, Default)]
pub struct LocalWrites {
    dirty: AtomicBool,
    notify: Notify,
}

impl LocalWrites {
    /// Durable changes were added to this node's log: the engine reads it from its cursor.
    pub(super) fn wrote(&self) {
        self.dirty.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether changes were written since the last call; clears the mark.
    pub fn take(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Resolves once changes are written (at once if some were since the last
    /// [`LocalWrites::take`] and no wait took the notice).
    pub async fn written(&self) {
        self.notify.notified().await;
    }
}
