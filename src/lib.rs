//! Concord: masterless replication of business records as Automerge documents.
//!
//! The parts, one module each: [`record`] (the record model), [`store`] (the engines on disk and in
//! memory, document layout, cache), [`sync`] (the replication engine and its driver),
//! [`net`] (QUIC transport), [`adapters`] (tables as collections), [`policy`] (conflict
//! policies) and [`node`] (a node's data dir, config, record operations, `run` and the API);
//! [`files`] creates a node's files owner-only.

// Functions stay short enough to read at once (`clippy.toml` sets the bound).
#![deny(clippy::too_many_lines)]

pub mod adapters;
pub mod config;
pub mod files;
pub mod net;
pub mod node;
pub mod policy;
pub mod record;
pub mod rng;
pub mod scope;
pub mod store;
pub mod sync;

/// Deliberate bugs, compiled only with the `sabotage` feature, for the simulator's tests that
/// show each check finds what it should. Production builds do not contain them.
#[cfg(feature = "sabotage")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sabotage {
    /// A change whose dependencies are missing is dropped, yet its log place is recorded.
    pub drop_held_changes: bool,
    /// No summary is ever sent, so nothing is caught up.
    pub skip_summaries: bool,
    /// A received change is entered into the log twice: at its place and at the next one.
    pub log_twice: bool,
    /// Messages of changes are sized by count alone, as before they were sized by bytes: a
    /// batch of large changes outgrows a frame and never goes.
    pub count_only_batches: bool,
    /// A store made again (lost, or restored from a backup) writes under the writer its
    /// former self used, as stores did before incarnations (the simulator honours it).
    pub reuse_writer: bool,
    /// Of two colliding changes, the one a node received first stands there, whatever the
    /// rule says: nodes that received them in different orders disagree.
    pub first_arrival_stands: bool,
    /// Changes from peers are applied however far ahead of the node's clock they are stamped.
    pub no_clock_bound: bool,
    /// The node's own writes skip the check against its grant, as a modified node's would:
    /// its peers must refuse what it writes outside it.
    pub skip_scope_checks: bool,
    /// Changes from peers are applied whatever their authors' grants and revocations say.
    pub receivers_admit_everything: bool,
    /// Histories are compacted at every document's heads as soon as any of its changes is
    /// stable, whether or not this node holds what every node holds: a change concurrent with
    /// the cut may still arrive.
    pub compact_unstable: bool,
    /// A revocation counts only for what arrives after it: what the node held past its
    /// cut-off stays (the simulator sets it on one node).
    pub revocation_by_arrival: bool,
}

/// Whether the deliberate bug named by the environment variable `name` is switched on (a test
/// build with the `sabotage` feature only: `name` set to `1`).
#[cfg(feature = "sabotage")]
pub fn sabotage_from_env(name: &str) -> bool {
    std::env::var(name).is_ok_and(|value| value == "1")
}
