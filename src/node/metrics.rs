//! The Prometheus text of `/metrics`: every counter and gauge of a running node.

use std::sync::atomic::Ordering;

use super::shared::Shared;
use crate::sync;

/// The Prometheus text of `/metrics`.
// A table of literals (name, help, value per metric), long by nature: exempt from the bound.
#[allow(clippy::too_many_lines)]
pub fn metrics_text(shared: &Shared) -> String {
    let status = shared.status_now();
    let stats = &shared.transport.stats;
    let own = shared.node.writer();
    let written = shared.node.documents().origin_mark(&own);
    let relaxed = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let engine = &status.engine;
    let counters: Vec<(&str, &str, u64)> = vec![
        (
            "concord_changes_written_total",
            "Changes written on this node.",
            written,
        ),
        (
            "concord_changes_received_total",
            "Changes received from peers.",
            engine.changes_received,
        ),
        (
            "concord_changes_applied_total",
            "Received changes that were new here.",
            engine.changes_applied,
        ),
        (
            "concord_changes_sent_total",
            "Changes sent to peers.",
            engine.changes_sent,
        ),
        (
            "concord_repaired_documents_total",
            "Documents found out of step by the repair digest.",
            engine.repair_documents,
        ),
        (
            "concord_withdrawn_documents_total",
            "Documents taken out because a peer that reads more found them outside this \
             node's read scope.",
            engine.withdrawn_documents,
        ),
        (
            "concord_log_entries_truncated_total",
            "Log entries truncated here, every known node holding them.",
            engine.log_entries_truncated,
        ),
        (
            "concord_documents_compacted_total",
            "Documents whose history, once every node held it, was compacted here.",
            engine.documents_compacted,
        ),
        (
            "concord_catch_ups_total",
            "Peers caught up by whole documents, lacking log entries truncated here.",
            engine.catch_ups,
        ),
        (
            "concord_withdrawals_dropped_total",
            "Documents a peer named to take out while this node's queue of them was full (a \
             later repair round names them again).",
            engine.withdrawals_dropped,
        ),
        (
            "concord_changes_duplicate_total",
            "Received changes already held.",
            engine.duplicates,
        ),
        (
            "concord_changes_judging_failed_total",
            "Received changes whose check against the grants met an internal error: held, \
             neither applied nor refused (their senders send them again).",
            engine.judging_failed,
        ),
        (
            "concord_bytes_sent_total",
            "Bytes of frames sent to peers.",
            relaxed(&stats.bytes_sent),
        ),
        (
            "concord_bytes_received_total",
            "Bytes received from peers.",
            relaxed(&stats.bytes_received),
        ),
        (
            "concord_frames_overflowed_total",
            "Frames refused by a full connection queue (a bug; the connection is closed).",
            relaxed(&stats.frames_overflowed),
        ),
        (
            "concord_changes_clock_ahead_total",
            "Changes from peers stamped further ahead of this node's clock than it accepts (not applied until they are not).",
            engine.changes_ahead,
        ),
        (
            "concord_peer_disconnects_total",
            "Connections the engine closed: malformed messages, handshakes not finished in time.",
            engine.disconnects,
        ),
        (
            "concord_engine_step_errors_total",
            "Replication engine steps that failed with a store error.",
            engine.step_errors,
        ),
        (
            "concord_writes_refused_total",
            "Writes refused with 503 because the node could not keep up.",
            status.writes_refused,
        ),
        (
            "concord_held_dropped_total",
            "Changes held for missing dependencies and given up (their senders send them again).",
            engine.held_dropped,
        ),
        (
            "concord_requests_dropped_total",
            "Document and repair requests not queued because a peer's queue of them was full.",
            engine.requests_dropped,
        ),
        (
            "concord_frames_refused_total",
            "Malformed or oversized frames that closed a connection.",
            relaxed(&stats.frames_refused),
        ),
        (
            "concord_handshakes_refused_total",
            "Connections refused or failed at the TLS handshake.",
            relaxed(&stats.handshakes_refused),
        ),
    ];
    let mut text = String::new();
    for (name, help, value) in counters {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        ));
    }
    type BindingCounter = (
        &'static str,
        &'static str,
        fn(&crate::adapters::BindingStatus) -> u64,
    );
    let binding_counters: [BindingCounter; 5] = [
        (
            "concord_adapter_rows_captured_total",
            "Row changes captured from a bound table.",
            |binding| binding.rows_captured,
        ),
        (
            "concord_adapter_records_written_total",
            "Record changes written from a bound table.",
            |binding| binding.records_written,
        ),
        (
            "concord_adapter_rows_applied_total",
            "Rows inserted, updated or deleted in a bound table.",
            |binding| binding.rows_applied,
        ),
        (
            "concord_adapter_rows_unchanged_total",
            "Records compared with their row and found equal.",
            |binding| binding.rows_unchanged,
        ),
        (
            "concord_adapter_rows_quarantined",
            "Rows set aside with an error, retried with backoff.",
            |binding| binding.quarantined,
        ),
    ];
    for (name, help, value) in binding_counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for binding in &status.bindings {
            text.push_str(&format!(
                "{name}{{binding=\"{}\"}} {}\n",
                binding.name,
                value(binding)
            ));
        }
    }
    text.push_str("# HELP concord_conflicts_total Fields that became conflicting (concurrent values) as peers' changes were applied, by collection and by the policy that resolves them.\n# TYPE concord_conflicts_total counter\n");
    for conflict in &engine.conflicts_by_policy {
        text.push_str(&format!(
            "concord_conflicts_total{{collection=\"{}\",policy=\"{}\"}} {}\n",
            conflict.collection, conflict.policy, conflict.count
        ));
    }
    let gauges = [
        (
            "concord_held_changes",
            "Changes held now for missing dependencies.",
            engine.held_now as u64,
        ),
        (
            "concord_overloaded",
            "1 while writers are pushed back (503) because the node cannot keep up.",
            u64::from(status.overloaded.is_some()),
        ),
        (
            "concord_log_entries_unstable",
            "Log entries held here that some known node does not hold yet (they cannot be \
             reclaimed).",
            status.reclamation.unstable_entries,
        ),
        (
            "concord_documents_compaction_pending",
            "Records whose changes became stable, waiting for their history to be compacted.",
            status.reclamation.compaction_pending,
        ),
        (
            "concord_known_nodes",
            "Nodes known to replication: each holds reclamation back until it holds an entry.",
            status.reclamation.known_nodes.len() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        ));
    }
    text.push_str("# HELP concord_changes_refused_total Changes refused: they collide with another change of the same actor and sequence, depend on a refused one, lie outside their author's grant, or come from a revoked node past its cut-off.\n# TYPE concord_changes_refused_total counter\n");
    for reason in [
        crate::store::RefusalReason::DuplicateSequence,
        crate::store::RefusalReason::DependsOnRefused,
        crate::store::RefusalReason::OutsideGrant,
        crate::store::RefusalReason::Revoked,
    ] {
        let reason = reason.as_str();
        let count = engine.changes_refused.get(reason).copied().unwrap_or(0);
        text.push_str(&format!(
            "concord_changes_refused_total{{reason=\"{reason}\"}} {count}\n"
        ));
    }
    text.push_str("# HELP concord_engine_step_slowest_seconds The longest the replication engine took over one step since start.\n# TYPE concord_engine_step_slowest_seconds gauge\n");
    text.push_str(&format!(
        "concord_engine_step_slowest_seconds {:.3}\n",
        status.slowest_engine_step_ms as f64 / 1000.0
    ));
    text.push_str("# HELP concord_degraded 1 while writes are refused because the disk is full or a write to the store failed.\n# TYPE concord_degraded gauge\n");
    text.push_str(&format!(
        "concord_degraded {}\n",
        u8::from(status.degraded.is_some())
    ));
    text.push_str("# HELP concord_disk_free_bytes Free bytes on the data dir's disk, as last checked.\n# TYPE concord_disk_free_bytes gauge\n");
    text.push_str(&format!(
        "concord_disk_free_bytes {}\n",
        status.disk_free_bytes
    ));
    let (cached, cached_bytes) = shared.node.documents().cache_usage();
    text.push_str("# HELP concord_document_cache_documents Documents held loaded.\n# TYPE concord_document_cache_documents gauge\n");
    text.push_str(&format!("concord_document_cache_documents {cached}\n"));
    text.push_str("# HELP concord_document_cache_bytes Memory the loaded documents are taken to hold (bounded by store.cache_mib).\n# TYPE concord_document_cache_bytes gauge\n");
    text.push_str(&format!("concord_document_cache_bytes {cached_bytes}\n"));
    text.push_str("# HELP concord_peers_connected Peers with a connection.\n# TYPE concord_peers_connected gauge\n");
    text.push_str(&format!("concord_peers_connected {}\n", status.peers.len()));
    text.push_str("# HELP concord_peers_policy_differ Peers whose conflict policies differ from this node's.\n# TYPE concord_peers_policy_differ gauge\n");
    let differ = status
        .peers
        .iter()
        .filter(|peer| peer.policies == sync::PeerPolicies::Differ.as_str())
        .count();
    text.push_str(&format!("concord_peers_policy_differ {differ}\n"));
    text.push_str("# HELP concord_replication_lag Log entries a peer lacks by its last summary.\n# TYPE concord_replication_lag gauge\n");
    for peer in &status.peers {
        text.push_str(&format!(
            "concord_replication_lag{{peer=\"{}\"}} {}\n",
            peer.node,
            peer.lag.unwrap_or(0)
        ));
    }
    text
}
