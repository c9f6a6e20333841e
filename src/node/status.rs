//! What `/v1/status` and `concord status` show of a running node: its engine's counters,
//! its peers, what holds reclamation back, and conflicts by policy.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::sync::{DriverStats, Engine, Stats};

/// What `/v1/status` shows, refreshed by the engine task.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub node: String,
    /// The writer this node's store writes under (a new one whenever the store was made
    /// again): the origin of its own log.
    pub writer: String,
    /// The writers this node's store wrote under before its current one.
    pub former_writers: Vec<String>,
    /// Why the store last took a new writer while running (a peer held more of its own log,
    /// or another change at one of its places), if it did.
    pub new_writer_reason: Option<String>,
    pub name: String,
    pub cluster: String,
    pub listen: String,
    /// SHA-256 of this node's conflict policies, hex: equal on nodes that resolve alike.
    pub policy_hash: String,
    pub peers: Vec<PeerStatus>,
    /// Configured peers (`network.peers`) this node cannot reach now.
    pub unreachable: Vec<UnreachablePeer>,
    pub engine: EngineStats,
    pub bindings: Vec<crate::adapters::BindingStatus>,
    /// Whether writers are being pushed back now (`/v1` writes answer 503), and why.
    pub overloaded: Option<String>,
    /// Writes refused with 503 since start, because the node could not keep up.
    pub writes_refused: u64,
    /// Why the node is degraded (its disk is full, or a write to its store failed), if it is:
    /// writes are refused with 507 meanwhile, and resume by themselves.
    pub degraded: Option<String>,
    pub disk_free_bytes: u64,
    /// The longest the engine took over one step since the node started, in milliseconds:
    /// meanwhile nothing was sent, received or reported.
    pub slowest_engine_step_ms: u64,
    pub reclamation: ReclamationStatus,
}

/// Which log entries every known node holds (they are stable), and what holds the rest back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReclamationStatus {
    /// Log entries held here that some known node does not hold yet, over every origin.
    pub unstable_entries: u64,
    /// Per origin held here: how far it is held here and by every known node.
    pub origins: Vec<OriginReclamation>,
    /// Every node known to replication (peers, and nodes their reports named).
    pub known_nodes: Vec<KnownNode>,
    /// Records whose changes became stable, waiting for their history to be compacted.
    pub compaction_pending: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OriginReclamation {
    pub origin: String,
    pub held: u64,
    pub stable: u64,
    /// Entries at and below this place were truncated from this node's log (every known node
    /// held them); a peer that lacks one is caught up by whole documents.
    pub truncated_through: u64,
    /// The known nodes at the stable mark, by name (or id when unnamed), when it is below
    /// what is held here.
    pub held_back_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KnownNode {
    pub node: String,
    pub name: String,
    /// When its latest report was taken, ms since the Unix epoch by its clock (`None`: it was
    /// never heard from since this node learned of it, so it holds back every origin).
    pub reported_ms: Option<u64>,
    /// Whether it counts (a revoked node, or one removed with `concord node remove`, does
    /// not hold reclamation back).
    pub counts: bool,
}

impl ReclamationStatus {
    pub(crate) fn from(reclamation: crate::sync::stability::Reclamation) -> Self {
        let names: BTreeMap<crate::record::NodeId, String> = reclamation
            .nodes
            .iter()
            .map(|(node, name, _, _)| {
                let label = if name.is_empty() {
                    node.to_string()
                } else {
                    name.clone()
                };
                (*node, label)
            })
            .collect();
        Self {
            compaction_pending: reclamation.compaction_pending as u64,
            unstable_entries: reclamation
                .origins
                .iter()
                .map(|origin| origin.held - origin.stable)
                .sum(),
            origins: reclamation
                .origins
                .iter()
                .map(|origin| OriginReclamation {
                    origin: origin.origin.to_string(),
                    held: origin.held,
                    stable: origin.stable,
                    truncated_through: origin.floor,
                    held_back_by: origin
                        .held_back_by
                        .iter()
                        .map(|node| names.get(node).cloned().unwrap_or_else(|| node.to_string()))
                        .collect(),
                })
                .collect(),
            known_nodes: reclamation
                .nodes
                .into_iter()
                .map(|(node, name, taken, counts)| KnownNode {
                    node: node.to_string(),
                    name,
                    reported_ms: (taken > 0).then_some(taken),
                    counts,
                })
                .collect(),
        }
    }
}

/// A configured peer address whose last dial failed, and that is not connected otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct UnreachablePeer {
    pub address: String,
    /// The node that answered there before, if one ever did.
    pub node: Option<String>,
    pub error: String,
    /// Attempts that failed in a row (they go on, with backoff up to a few seconds).
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub node: String,
    /// The peer's `node.name`, as it gave it.
    pub name: String,
    pub address: String,
    pub state: &'static str,
    /// Log entries held here that the peer's last summary did not cover.
    pub lag: Option<u64>,
    /// Whether the peer's conflict policies are this node's: `same`, `differ` (it shows other
    /// winners for the same records) or `unknown` (not said yet, or an older peer).
    pub policies: &'static str,
    /// Bytes queued for the peer that the transport has not written yet.
    pub queued_bytes: usize,
    /// Whether the peer keeps up with this node's own writes (then it holds writers back if
    /// it falls far behind). Not while it is being repaired.
    pub keeping_up: bool,
    /// Whether repair is exchanging documents with the peer: it is being caught up, or
    /// narrowed by a new grant (it takes out what it may no longer read).
    pub repairing: bool,
    /// Changes from the peer stamped further ahead of this node's clock than it accepts, on
    /// this connection: the two clocks disagree.
    pub changes_ahead: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStats {
    pub changes_sent: u64,
    pub changes_received: u64,
    pub changes_applied: u64,
    pub duplicates: u64,
    pub held: u64,
    /// Changes whose check against the grants met an internal error (held; sent again).
    pub judging_failed: u64,
    pub messages_sent: u64,
    pub malformed: u64,
    pub conflicts: u64,
    pub repair_documents: u64,
    /// Log entries truncated here, every known node holding them.
    pub log_entries_truncated: u64,
    /// Documents whose stable history was compacted here.
    pub documents_compacted: u64,
    /// Peers caught up by whole documents, lacking entries truncated here.
    pub catch_ups: u64,
    pub withdrawn_documents: u64,
    /// Documents a wider peer named to take out while the queue of them was full.
    pub withdrawals_dropped: u64,
    pub local_changes_pushed: u64,
    /// Changes held for missing dependencies now.
    pub held_now: usize,
    /// Held changes given up (their senders send them again).
    pub held_dropped: u64,
    pub requests_dropped: u64,
    pub changes_unsendable: u64,
    /// Engine steps that failed (store errors), and the last error.
    pub step_errors: u64,
    pub last_error: Option<String>,
    /// Connections this node's engine closed (malformed messages, handshakes not finished).
    pub disconnects: u64,
    /// `conflicts` by collection and by the policy that resolves them; what the counted
    /// fields do not cover is under collection and policy `_other`.
    pub conflicts_by_policy: Vec<ConflictCount>,
    /// Changes refused by the rule for colliding changes, by reason (`concord refused` lists
    /// them); their senders stay connected.
    pub changes_refused: BTreeMap<String, u64>,
    /// Changes from peers not applied yet: stamped further ahead of this node's clock than
    /// `node.clock_ahead_max_ms` (they are sent again until they are not).
    pub changes_ahead: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictCount {
    pub collection: String,
    pub policy: String,
    pub count: u64,
}

/// What [`ConflictCount`] names conflicts of fields not counted apart.
const OTHER_LABEL: &str = "_other";

/// The engine's conflict counts by collection and by the policy that now resolves each field.
pub(crate) fn conflicts_by_policy(
    stats: &Stats,
    policies: &crate::policy::Policies,
) -> Vec<ConflictCount> {
    let mut by_policy: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((collection, field), count) in &stats.conflicts_by_field {
        let policy = policies.policy(collection, field).name().to_owned();
        *by_policy.entry((collection.clone(), policy)).or_default() += count;
    }
    let counted: u64 = by_policy.values().sum();
    if stats.conflicts > counted {
        let other = (OTHER_LABEL.to_owned(), OTHER_LABEL.to_owned());
        by_policy.insert(other, stats.conflicts - counted);
    }
    by_policy
        .into_iter()
        .map(|((collection, policy), count)| ConflictCount {
            collection,
            policy,
            count,
        })
        .collect()
}

impl EngineStats {
    pub(crate) fn from(
        engine: &Engine,
        driver: &DriverStats,
        conflicts_by_policy: Vec<ConflictCount>,
    ) -> Self {
        let stats = engine.stats();
        Self {
            conflicts_by_policy,
            changes_refused: stats
                .changes_refused
                .iter()
                .map(|(reason, count)| ((*reason).to_owned(), *count))
                .collect(),
            changes_ahead: stats.changes_ahead,
            held_now: engine.held_now(),
            held_dropped: stats.held_dropped,
            requests_dropped: stats.requests_dropped,
            changes_unsendable: stats.changes_unsendable,
            step_errors: driver.step_errors,
            disconnects: driver.disconnects,
            last_error: driver.last_error.clone(),
            changes_sent: stats.changes_sent,
            changes_received: stats.changes_received,
            changes_applied: stats.changes_applied,
            duplicates: stats.duplicates,
            held: stats.held,
            judging_failed: stats.judging_failed,
            messages_sent: stats.messages_sent,
            malformed: stats.malformed,
            conflicts: stats.conflicts,
            repair_documents: stats.repair_documents,
            log_entries_truncated: stats.log_entries_truncated,
            documents_compacted: stats.documents_compacted,
            catch_ups: stats.catch_ups,
            withdrawn_documents: stats.withdrawn_documents,
            withdrawals_dropped: stats.withdrawals_dropped,
            local_changes_pushed: driver.local_changes,
        }
    }
}
