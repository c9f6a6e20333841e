//! `concord run`: the tokio shell that wires store, engine, transport and HTTP API.
//!
//! The engine runs in one task that owns it; store calls inside it are blocking and run in
//! place on the multi-threaded runtime. Local writes (through the API) wake that task, which
//! reads the node's own log from where it last pushed, so a write is shipped only after it was
//! acknowledged. Shutdown (SIGTERM or Ctrl-C) says goodbye to every peer, then makes the store
//! durable before returning.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use concord_proto::{Goodbye, GoodbyeReason};
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use super::{Node, NodeError, TLS_DIR};
use crate::net::{tls::NodeTls, Transport, TransportEvent};
use crate::sync::{self, Action, Engine, Event, Stats};

/// Transport events queued for the engine before readers wait (and QUIC slows the peer).
pub const ENGINE_QUEUE_EVENTS: usize = 4096;
/// How long shutdown waits for HTTP requests in progress.
pub const API_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Own log entries pushed per wake-up; the rest follow on the next.
pub const LOCAL_PUSH_CHANGES_MAX: usize = 4096;

/// What `/v1/status` shows, refreshed by the engine task.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub node: String,
    pub name: String,
    pub cluster: String,
    pub listen: String,
    /// SHA-256 of this node's conflict policies, hex: equal on nodes that resolve alike.
    pub policy_hash: String,
    pub peers: Vec<PeerStatus>,
    pub engine: EngineStats,
    pub bindings: Vec<crate::adapters::BindingStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub node: String,
    pub address: String,
    pub state: &'static str,
    /// Log entries held here that the peer's last summary did not cover.
    pub lag: Option<u64>,
    /// Whether the peer's conflict policies are this node's: `same`, `differ` (it shows other
    /// winners for the same records) or `unknown` (not said yet, or an older peer).
    pub policies: &'static str,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStats {
    pub changes_sent: u64,
    pub changes_received: u64,
    pub changes_applied: u64,
    pub duplicates: u64,
    pub held: u64,
    pub messages_sent: u64,
    pub malformed: u64,
    pub conflicts: u64,
    pub repair_documents: u64,
    pub local_changes_pushed: u64,
    /// `conflicts` by collection and by the policy that resolves them; what the counted
    /// fields do not cover is under collection and policy `_other`.
    pub conflicts_by_policy: Vec<ConflictCount>,
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
fn conflicts_by_policy(stats: &Stats, policies: &crate::policy::Policies) -> Vec<ConflictCount> {
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
    fn from(stats: &Stats, local: u64, conflicts_by_policy: Vec<ConflictCount>) -> Self {
        Self {
            conflicts_by_policy,
            changes_sent: stats.changes_sent,
            changes_received: stats.changes_received,
            changes_applied: stats.changes_applied,
            duplicates: stats.duplicates,
            held: stats.held,
            messages_sent: stats.messages_sent,
            malformed: stats.malformed,
            conflicts: stats.conflicts,
            repair_documents: stats.repair_documents,
            local_changes_pushed: local,
        }
    }
}

/// Handles shared by the engine task and the HTTP API.
pub struct Shared {
    pub node: Arc<Node>,
    pub transport: Arc<Transport>,
    pub status: Mutex<Status>,
    pub local_writes: Arc<Notify>,
    /// Changes applied from peers; a lagging subscriber misses notices, never blocks the node.
    pub applied: tokio::sync::broadcast::Sender<AppliedNotice>,
    pub started: Instant,
    /// The status of each adapter binding, kept up to date by its thread.
    pub bindings: Vec<Arc<Mutex<crate::adapters::BindingStatus>>>,
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

fn resolve(address: &str) -> Result<SocketAddr, NodeError> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| NodeError::Address(address.to_owned()))
}

/// Runs the node until `shutdown` completes.
pub async fn run(
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let running = start(node).await?;
    shutdown.await;
    running.stop().await
}

/// A started node: its shared handles, and what [`Running::stop`] needs.
pub struct Running {
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    engine_task: tokio::task::JoinHandle<()>,
    api_task: tokio::task::JoinHandle<()>,
    stop_api: tokio::sync::oneshot::Sender<()>,
    bindings: Vec<crate::adapters::driver::RunningBinding>,
}

/// Starts the node: transport, engine and API, all running when this returns.
pub async fn start(node: Arc<Node>) -> Result<Running, NodeError> {
    let config = node.config().clone();
    let cluster = config.cluster_id().ok_or(NodeError::NoCluster)?;
    let tls = NodeTls::load(&node.dir().join(TLS_DIR), node.id())?;
    let listen = resolve(&config.network.listen)?;
    let api = resolve(&config.network.api)?;
    let (events, events_rx) = mpsc::channel(ENGINE_QUEUE_EVENTS);
    let transport = Transport::bind(&tls, listen, events)
        .map_err(|error| NodeError::Transport(error.to_string()))?;
    // Bindings start first: a binding that does not fit its table stops the node here, with
    // the reason, before anything else runs. Their writes wake the engine like the API's.
    let local_writes = Arc::new(Notify::new());
    let mut bindings = Vec::new();
    for binding in &config.bindings {
        let wake_engine = local_writes.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || wake_engine.notify_one());
        let started = tokio::task::block_in_place(|| {
            crate::adapters::driver::start(binding, node.clone(), wake)
        });
        match started {
            Ok(running) => bindings.push(running),
            Err(error) => {
                for running in bindings {
                    tokio::task::block_in_place(|| running.stop());
                }
                return Err(NodeError::Binding(error.to_string()));
            }
        }
    }
    let api_listener =
        tokio::net::TcpListener::bind(api)
            .await
            .map_err(|source| NodeError::Io {
                path: api.to_string().into(),
                source,
            })?;
    let shared = Arc::new(Shared {
        node: node.clone(),
        transport: transport.clone(),
        status: Mutex::new(Status {
            node: node.id().to_string(),
            name: config.node.name.clone(),
            cluster: hex::encode(cluster),
            listen: transport
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            policy_hash: hex::encode(node.policies().hash()),
            ..Status::default()
        }),
        local_writes,
        applied: tokio::sync::broadcast::channel(APPLIED_NOTICES_BUFFERED).0,
        started: Instant::now(),
        bindings: bindings
            .iter()
            .map(|running| running.status.clone())
            .collect(),
    });
    tracing::info!(node = %node.id(), %listen, %api, "node running");

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(transport.clone().accept_loop()));
    for peer in &config.network.peers {
        let address = resolve(peer)?;
        tasks.push(tokio::spawn(transport.clone().dial_loop(address)));
    }
    let mut engine_config = sync::Config::new(cluster, node.id(), &config.node.name);
    engine_config.policy_hash = node.policies().hash();
    let engine_task = tokio::spawn(drive_engine(
        shared.clone(),
        Engine::new(engine_config),
        events_rx,
    ));
    let router = super::api::router(shared.clone());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(async move {
        let serve = axum::serve(api_listener, router).with_graceful_shutdown(async {
            let _ = api_stopped.await;
        });
        if let Err(error) = serve.await {
            tracing::error!(%error, "HTTP API stopped");
        }
    });

    Ok(Running {
        shared,
        tasks,
        engine_task,
        api_task,
        stop_api,
        bindings,
    })
}

impl Running {
    /// Writes through the node, as the API does: durable on return, then shipped.
    pub fn put(
        &self,
        id: &crate::record::RecordId,
        write: &crate::record::RecordWrite,
    ) -> Result<bool, NodeError> {
        let changed = self.shared.node.put(id, write)?;
        if changed {
            self.shared.local_writes.notify_one();
        }
        Ok(changed)
    }

    /// Notices of changes applied from peers, as they happen.
    pub fn applied(&self) -> tokio::sync::broadcast::Receiver<AppliedNotice> {
        self.shared.applied.subscribe()
    }

    /// Says goodbye to every peer, stops, and makes the store durable.
    pub async fn stop(self) -> Result<(), NodeError> {
        let Running {
            shared,
            tasks,
            engine_task,
            api_task,
            stop_api,
            bindings,
        } = self;
        for binding in bindings {
            tokio::task::block_in_place(|| binding.stop());
        }
        let node = shared.node.clone();
        let transport = shared.transport.clone();
        tracing::info!("shutting down");
        let _ = stop_api.send(());
        if tokio::time::timeout(API_SHUTDOWN_WAIT, api_task)
            .await
            .is_err()
        {
            tracing::warn!("HTTP API requests still running at shutdown were cut off");
        }
        // No redialing while saying goodbye.
        for task in tasks {
            task.abort();
        }
        transport
            .close_all(Goodbye {
                reason: GoodbyeReason::Shutdown,
                detail: "node shutting down".to_owned(),
            })
            .await;
        engine_task.abort();
        node.documents().sync()?;
        tracing::info!("stopped; every acknowledged write is durable");
        Ok(())
    }
}

/// The engine's task: one event at a time, actions carried out at once.
async fn drive_engine(
    shared: Arc<Shared>,
    mut engine: Engine,
    mut events: mpsc::Receiver<TransportEvent>,
) {
    let node = shared.node.clone();
    let own = node.id();
    let mut pushed_up_to = node.documents().origin_mark(&own);
    let mut local_pushed = 0u64;
    let mut connections: BTreeMap<crate::record::NodeId, u64> = BTreeMap::new();
    loop {
        let now = shared.started.elapsed();
        let deadline = engine
            .poll_timeout()
            .unwrap_or(now + sync::SUMMARY_INTERVAL_DEFAULT);
        let sleep = tokio::time::sleep(deadline.saturating_sub(now));
        let mut inputs: Vec<Event> = Vec::new();
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                match event {
                    TransportEvent::Up { peer, connection } => {
                        if connections.insert(peer, connection).is_some() {
                            inputs.push(Event::PeerDisconnected(peer));
                        }
                        inputs.push(Event::PeerConnected(peer));
                    }
                    TransportEvent::Down { peer, connection } => {
                        if connections.get(&peer) == Some(&connection) {
                            connections.remove(&peer);
                            inputs.push(Event::PeerDisconnected(peer));
                        }
                    }
                    TransportEvent::Received { peer, message } => inputs.push(Event::Received(peer, message)),
                    TransportEvent::Writable { peer } => inputs.push(Event::PeerWritable(peer)),
                }
            }
            () = shared.local_writes.notified() => {
                let changes = tokio::task::block_in_place(|| node.documents().log_after(&own, pushed_up_to, LOCAL_PUSH_CHANGES_MAX));
                match changes {
                    Ok(changes) => {
                        if let Some(last) = changes.last() {
                            pushed_up_to = last.sequence;
                            local_pushed += changes.len() as u64;
                            if changes.len() == LOCAL_PUSH_CHANGES_MAX {
                                shared.local_writes.notify_one();
                            }
                            inputs.push(Event::LocalChanges(changes));
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot read the local log"),
                }
            }
            () = sleep => inputs.push(Event::Timeout),
        }
        for input in inputs {
            let now = shared.started.elapsed();
            let actions =
                tokio::task::block_in_place(|| engine.handle(now, input, node.documents()));
            match actions {
                Ok(actions) => carry_out(&shared, actions),
                Err(error) => tracing::error!(%error, "replication step failed"),
            }
        }
        refresh_status(&shared, &engine, local_pushed);
    }
}

fn carry_out(shared: &Shared, actions: Vec<Action>) {
    for action in actions {
        match action {
            Action::Send(peer, message) => shared.transport.send(&peer, message),
            Action::Disconnect(peer, goodbye) => {
                tracing::warn!(%peer, reason = ?goodbye.reason, detail = %goodbye.detail, "disconnecting peer");
                shared.transport.disconnect(&peer, goodbye);
            }
            Action::Applied { from, changes } => {
                tracing::debug!(%from, count = changes.len(), "applied changes");
                if shared.applied.receiver_count() > 0 {
                    let at = Instant::now();
                    for change in changes {
                        let _ = shared.applied.send(AppliedNotice {
                            from,
                            origin: change.origin,
                            sequence: change.sequence,
                            doc_key: change.doc_key,
                            at,
                        });
                    }
                }
            }
        }
    }
}

fn refresh_status(shared: &Shared, engine: &Engine, local_pushed: u64) {
    let marks = shared.node.documents().origin_marks();
    let ready = engine.ready_peers();
    let peers = shared
        .transport
        .connected()
        .into_iter()
        .map(|(peer, address)| PeerStatus {
            node: peer.to_string(),
            address: address.to_string(),
            state: if ready.contains(&peer) {
                "ready"
            } else {
                "handshaking"
            },
            lag: engine.lag(&peer, &marks),
            policies: engine.peer_policies(&peer).as_str(),
        })
        .collect();
    let mut status = shared
        .status
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    status.peers = peers;
    // This runs after every engine step: the counts by policy are worked out again only
    // when a conflict was counted since the last step.
    let stats = engine.stats();
    let by_policy = if status.engine.conflicts == stats.conflicts {
        std::mem::take(&mut status.engine.conflicts_by_policy)
    } else {
        conflicts_by_policy(stats, shared.node.policies())
    };
    status.engine = EngineStats::from(stats, local_pushed, by_policy);
}

impl Shared {
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
        status
    }
}

/// The Prometheus text of `/metrics`.
pub fn metrics_text(shared: &Shared) -> String {
    let status = shared.status_now();
    let stats = &shared.transport.stats;
    let own = shared.node.id();
    let written = shared.node.documents().origin_mark(&own);
    let relaxed = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let engine = &status.engine;
    let counters: [(&str, &str, u64); 11] = [
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
            "concord_changes_duplicate_total",
            "Received changes already held.",
            engine.duplicates,
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
            "concord_messages_dropped_total",
            "Messages dropped because a peer's queue was full.",
            relaxed(&stats.messages_dropped),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PolicyKind, PolicySection};
    use crate::policy::Policies;

    #[test]
    fn conflicts_are_counted_by_collection_and_policy() {
        let policies = Policies::from_config(&[PolicySection {
            collection: "customers".into(),
            field: Some("address".into()),
            policy: PolicyKind::Lww,
            order: Vec::new(),
            script: None,
        }])
        .unwrap();
        let mut stats = Stats {
            conflicts: 10,
            ..Stats::default()
        };
        for (collection, field, count) in [
            ("customers", "address", 3),
            ("customers", "phone", 2),
            ("customers", "name", 1),
            ("orders", "total", 1),
        ] {
            stats
                .conflicts_by_field
                .insert((collection.into(), field.into()), count);
        }
        let counts: Vec<(String, String, u64)> = conflicts_by_policy(&stats, &policies)
            .into_iter()
            .map(|count| (count.collection, count.policy, count.count))
            .collect();
        let expected = [
            ("_other", "_other", 3),
            ("customers", "lww", 3),
            ("customers", "merge", 3),
            ("orders", "merge", 1),
        ];
        let expected: Vec<(String, String, u64)> = expected
            .iter()
            .map(|(collection, policy, count)| ((*collection).into(), (*policy).into(), *count))
            .collect();
        assert_eq!(counts, expected);
    }
}
