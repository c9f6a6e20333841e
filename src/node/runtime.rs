//! `concord run`: the tokio shell that wires store, engine, transport and HTTP API.
//!
//! The engine runs in one task that owns its [`Driver`]; store calls inside it are blocking
//! and run in place on the multi-threaded runtime. The task takes every transport event that
//! is waiting at once (so changes that arrive together are applied together, with one flush),
//! hands the driver the node's own new writes (the API and bindings mark them), and queues the
//! frames the driver produces on their connections. Writers are pushed back (HTTP 503 with
//! `Retry-After`) while the node cannot keep up: its engine is behind on what peers send, or a
//! peer that was keeping up falls far behind this node's own writes. Shutdown (SIGTERM or
//! Ctrl-C) stops the API, says goodbye to every peer, stops the engine task and makes the
//! store durable. If the engine task or a binding dies, [`run`] returns the error, so the node
//! never goes on accepting writes it no longer replicates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_proto::{Goodbye, GoodbyeReason};
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use super::{Node, NodeError, TLS_DIR};
use crate::net::{tls::NodeTls, Transport};
use crate::sync::{self, Driver, DriverStats, Engine, Input, Output, Stats};

/// Transport events queued for the engine before readers wait (and QUIC slows the peer).
pub const ENGINE_QUEUE_EVENTS: usize = 4096;
/// Transport events handled in one engine step at most.
pub const ENGINE_EVENTS_PER_STEP_MAX: usize = 1024;
/// How long shutdown waits for HTTP requests in progress.
pub const API_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the engine task to finish its step.
pub const ENGINE_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// The engine is behind when this many transport events wait for it; writers are pushed back
/// until fewer than [`ENGINE_QUEUE_CALM`] do.
pub const ENGINE_QUEUE_BUSY: usize = ENGINE_QUEUE_EVENTS * 3 / 4;
pub const ENGINE_QUEUE_CALM: usize = ENGINE_QUEUE_EVENTS / 4;
/// A peer keeps up with this node's own writes once it lacks at most this many of them;
/// writers are pushed back while a peer that kept up lacks more than
/// [`OWN_BACKLOG_CHANGES_MAX`].
pub const KEEPING_UP_CHANGES: u64 = 1_000;
pub const OWN_BACKLOG_CHANGES_MAX: u64 = 20_000;
/// A peer that kept up but now lacks this many of this node's writes is let go: it is
/// caught up in the background and no longer holds writers back (a warning says so).
pub const OWN_BACKLOG_LET_GO: u64 = 5 * OWN_BACKLOG_CHANGES_MAX;
/// How long a writer pushed back is told to wait, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;
/// How often `run` checks that the engine task and the bindings are alive.
const WATCHDOG_INTERVAL: Duration = Duration::from_millis(250);
/// How often the disk's free space is checked.
const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How often the disk watch looks whether to stop, and how long shutdown waits for it.
const DISK_WATCH_STOP_POLL: Duration = Duration::from_millis(50);
const DISK_WATCH_STOP_WAIT: Duration = Duration::from_secs(5);

const _: () =
    assert!(ENGINE_QUEUE_CALM < ENGINE_QUEUE_BUSY && ENGINE_QUEUE_BUSY < ENGINE_QUEUE_EVENTS);
const _: () = assert!(KEEPING_UP_CHANGES < OWN_BACKLOG_CHANGES_MAX);

/// How often a running node reads its grants and revocations again.
const SCOPES_REFRESH: Duration = Duration::from_secs(1);

/// Writes made on this node that the engine has not been told of yet.
#[derive(Debug, Default)]
pub struct LocalWrites {
    dirty: AtomicBool,
    notify: Notify,
}

impl LocalWrites {
    /// A write was acknowledged: the engine reads the log from its cursor.
    pub fn wrote(&self) {
        self.dirty.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn take(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

/// Why a write was refused before it was tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node cannot keep up: retry after a moment.
    Overloaded,
    /// The engine task stopped: the node is going down.
    EngineDown,
}

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
    fn from(reclamation: crate::sync::stability::Reclamation) -> Self {
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
    fn from(
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

/// Handles shared by the engine task and the HTTP API.
pub struct Shared {
    pub node: Arc<Node>,
    pub transport: Arc<Transport>,
    pub status: Mutex<Status>,
    pub local_writes: Arc<LocalWrites>,
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

fn resolve(address: &str) -> Result<SocketAddr, NodeError> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| NodeError::Address(address.to_owned()))
}

/// Runs the node until `shutdown` completes. Returns an error, after stopping what still
/// runs, if the engine task or a binding dies first: a node that no longer replicates must
/// not go on acknowledging writes.
pub async fn run(
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    start(node).await?.run_until(shutdown).await
}

impl Running {
    /// Runs the started node until `shutdown` completes, as [`run`].
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let running = self;
        tokio::pin!(shutdown);
        let mut watchdog = tokio::time::interval(WATCHDOG_INTERVAL);
        let failure = loop {
            tokio::select! {
                () = &mut shutdown => break None,
                _ = watchdog.tick() => {
                    if let Some(failure) = running.failure() {
                        break Some(failure);
                    }

                }
            }
        };
        if let Some(failure) = &failure {
            tracing::error!(%failure, "stopping the node");
        }
        running.stop().await?;
        match failure {
            Some(failure) => Err(NodeError::Failed(failure)),
            None => Ok(()),
        }
    }
}

/// Refuses writes while the disk is nearly full, and once it has room again opens the store
/// anew if a write to it failed meanwhile (an engine refuses writes until then), under a new writer:
/// a change of its own log may have been written and lost at a place it writes again.
///
/// It runs on a thread of its own: an engine can block in a write on a disk that filled, and the
/// node's shutdown and watchdog must not wait on that.
fn watch_disk(shared: &Shared) {
    let node = &shared.node;
    let docs = node.documents();
    let refusal = match node.disk().check() {
        Ok(state) => {
            shared
                .disk_free_bytes
                .store(state.free_bytes, Ordering::Relaxed);
            docs.set_room(state.room());
            state.refusal()
        }
        Err(error) => Some(format!("the disk's free space cannot be read: {error}")),
    };
    let was_refused = docs.write_refusal().is_some();
    match (&refusal, was_refused) {
        (Some(reason), false) => {
            tracing::warn!("{reason}");
            docs.refuse_writes(refusal.clone());
        }
        (Some(_), true) => docs.refuse_writes(refusal.clone()),
        (None, _) => {
            // Room again. If a write to the store failed meanwhile (an engine refuses every write
            // after one failed), the store is opened anew before any write is let through.
            if docs.failed() {
                if let Err(error) = docs.reopen() {
                    tracing::error!(%error, "the store could not be opened again");
                    return;
                }
                docs.refuse_writes(None);
                if let Err(error) =
                    node.new_incarnation("the store was opened again after its disk was full")
                {
                    // Writes wait until the next check tries again.
                    tracing::error!(%error, "could not take a new writer");
                    docs.refuse_writes(Some(format!(
                        "the store could not take a new writer: {error}"
                    )));
                    return;
                }
            }
            if was_refused {
                tracing::info!("the disk has room again: writes resume");
            }
            docs.refuse_writes(None);
        }
    }
}

/// Checks the disk every [`DISK_CHECK_INTERVAL`] on a thread of its own until `stop` is set.
fn spawn_disk_watch(
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("concord-disk".to_owned())
        .spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Acquire) {
                if Instant::now() >= next {
                    watch_disk(&shared);
                    next = Instant::now() + DISK_CHECK_INTERVAL;
                }
                std::thread::sleep(DISK_WATCH_STOP_POLL);
            }
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::error!(%error, "the disk watch could not start");
            None
        }
    }
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

/// A started node: its shared handles, and what [`Running::stop`] needs.
pub struct Running {
    pub shared: Arc<Shared>,
    /// Set to stop the disk watch thread.
    stop_disk_watch: Arc<AtomicBool>,
    disk_watch: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    engine_task: tokio::task::JoinHandle<()>,
    stop_engine: Option<tokio::sync::oneshot::Sender<()>>,
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
    let local_writes = Arc::new(LocalWrites::default());
    tokio::task::block_in_place(|| crate::adapters::driver::forget_unbound_followers(&node))
        .map_err(|error| NodeError::Binding(error.to_string()))?;
    let mut bindings = Vec::new();
    for binding in &config.bindings {
        let wake_engine = local_writes.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || wake_engine.wrote());
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
            .map_err(|error| NodeError::Listen {
                what: "the API (network.api)",
                address: api.to_string(),
                error,
            })?;
    let shared = Arc::new(Shared {
        node: node.clone(),
        transport: transport.clone(),
        status: Mutex::new(Status {
            node: node.id().to_string(),
            writer: node.writer().to_string(),
            former_writers: node
                .documents()
                .former_writers()
                .iter()
                .map(ToString::to_string)
                .collect(),
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
        backups: Arc::new(tokio::sync::Semaphore::new(super::api::BACKUPS_AT_ONCE)),
        disk_free_bytes: AtomicU64::new(0),
        slowest_engine_step_ms: AtomicU64::new(0),
        overloaded: AtomicBool::new(false),
        engine_alive: AtomicBool::new(true),
        writes_refused: AtomicU64::new(0),
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
    // Grants and revocations arrive from peers like records: read them again every second.
    // A revoked node's connections close at once and are refused from then on.
    let scoped = node.clone();
    let guarded = transport.clone();
    transport.set_revoked(node.scopes().shut_out());
    tasks.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(SCOPES_REFRESH);
        loop {
            every.tick().await;
            let node = scoped.clone();
            let transport = guarded.clone();
            let refreshed = move || {
                refresh_grants(&node, &transport)?;
                node.retag_step().map(|_| ())
            };
            match tokio::task::spawn_blocking(refreshed).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "reading the grants"),
                // The next tick reads them again; the panic's message went to stderr.
                Err(error) => tracing::error!(%error, "reading the grants panicked"),
            }
        }
    }));
    for peer in &config.network.peers {
        let address = resolve(peer)?;
        tasks.push(tokio::spawn(transport.clone().dial_loop(address)));
    }
    let mut engine_config = sync::Config::new(cluster, node.id(), &config.node.name);
    engine_config.writer = node.writer();
    engine_config.policy_hash = node.policies().hash();
    engine_config.clock_ahead_max = Duration::from_millis(config.node.clock_ahead_max_ms);
    engine_config.runs_alone = config.network.peers.is_empty();
    let driver = Driver::new(Engine::new(engine_config), node.documents());
    let (stop_engine, engine_stopped) = tokio::sync::oneshot::channel::<()>();
    let engine_task = tokio::spawn(drive_engine(
        shared.clone(),
        driver,
        events_rx,
        engine_stopped,
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

    let stop_disk_watch = Arc::new(AtomicBool::new(false));
    let disk_watch = spawn_disk_watch(shared.clone(), stop_disk_watch.clone());
    Ok(Running {
        shared,
        stop_disk_watch,
        disk_watch,
        tasks,
        engine_task,
        stop_engine: Some(stop_engine),
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
            self.shared.local_writes.wrote();
        }
        Ok(changed)
    }

    /// Notices of changes applied from peers, as they happen.
    pub fn applied(&self) -> tokio::sync::broadcast::Receiver<AppliedNotice> {
        self.shared.applied.subscribe()
    }

    /// Why the node cannot go on, if it cannot: its engine task or a binding died.
    pub fn failure(&self) -> Option<String> {
        if self.engine_task.is_finished() {
            return Some("the replication engine stopped unexpectedly".to_owned());
        }
        if let Some(stuck) = self.shared.node.documents().backend().stuck() {
            return Some(stuck);
        }
        self.bindings
            .iter()
            .find(|binding| binding.failed())
            .map(|binding| format!("binding {} stopped unexpectedly", binding.name()))
    }

    /// Says goodbye to every peer, stops, and makes the store durable.
    pub async fn stop(self) -> Result<(), NodeError> {
        let Running {
            shared,
            stop_disk_watch,
            disk_watch,
            tasks,
            engine_task,
            stop_engine,
            api_task,
            stop_api,
            bindings,
        } = self;
        stop_disk_watch.store(true, Ordering::Release);
        if let Some(disk_watch) = disk_watch {
            // It holds the node: the store stays open until it is gone.
            let deadline = Instant::now() + DISK_WATCH_STOP_WAIT;
            while !disk_watch.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(DISK_WATCH_STOP_POLL).await;
            }
            if !disk_watch.is_finished() {
                tracing::warn!("the disk watch did not stop in time");
            }
        }
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
        if let Some(stop_engine) = stop_engine {
            let _ = stop_engine.send(());
        }
        match tokio::time::timeout(ENGINE_SHUTDOWN_WAIT, engine_task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) if error.is_panic() => {
                tracing::error!("the replication engine had panicked");
            }
            Ok(Err(_)) => {}
            Err(_) => tracing::warn!("the replication engine did not stop in time"),
        }
        transport
            .close_all(Goodbye {
                reason: GoodbyeReason::Shutdown,
                detail: "node shutting down".to_owned(),
            })
            .await;
        node.documents().sync()?;
        tracing::info!("stopped; every acknowledged write is durable");
        Ok(())
    }
}

/// The engine's task: every waiting event at once, through the driver, and the frames out.
async fn drive_engine(
    shared: Arc<Shared>,
    mut driver: Driver,
    mut events: mpsc::Receiver<Input>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // Whatever ends this task, writers are refused from then on.
    struct Alive<'a>(&'a Shared);
    impl Drop for Alive<'_> {
        fn drop(&mut self) {
            self.0.engine_alive.store(false, Ordering::Release);
        }
    }
    let _alive = Alive(&shared);
    let node = shared.node.clone();
    let mut backlog = Backlog::default();
    loop {
        // The store may have taken a new writer outside this task (it was opened again).
        let writer = node.writer();
        if writer != driver.engine().writer() {
            tokio::task::block_in_place(|| driver.set_writer(writer, node.documents()));
        }
        let now = shared.started.elapsed();
        let deadline = driver
            .poll_timeout()
            .unwrap_or(now + sync::SUMMARY_INTERVAL_DEFAULT);
        let sleep = tokio::time::sleep(deadline.saturating_sub(now));
        let mut inputs: Vec<Input> = Vec::new();
        tokio::select! {
            _ = &mut stop => return,
            event = events.recv() => {
                let Some(event) = event else { return };
                inputs.push(event);
            }
            () = shared.local_writes.notify.notified() => {}
            () = sleep => {}
        }
        while inputs.len() < ENGINE_EVENTS_PER_STEP_MAX {
            match events.try_recv() {
                Ok(event) => inputs.push(event),
                Err(_) => break,
            }
        }
        if shared.local_writes.take() {
            inputs.push(Input::LocalWrites);
        }
        let now = shared.started.elapsed();
        if now >= deadline {
            inputs.push(Input::Timeout);
        }
        #[cfg(feature = "sabotage")]
        if crate::sabotage_from_env("CONCORD_SABOTAGE_ENGINE_PANIC")
            && inputs
                .iter()
                .any(|input| matches!(input, Input::LocalWrites))
        {
            panic!("sabotage: the engine task dies on purpose at the first local write");
        }
        // The store took a new writer outside the engine (a revocation took out changes of
        // this node's own): the engine follows it before anything more leaves.
        if node.writer() != driver.engine().writer() {
            let writer = node.writer();
            follow_writer(
                &shared,
                &mut driver,
                writer,
                "a revocation took out changes of this node's own",
            );
        }
        driver.set_clock(u64::try_from(super::now_ms()).unwrap_or(0));
        let step_started = Instant::now();
        let inputs_count = inputs.len();
        let outputs = tokio::task::block_in_place(|| driver.step(now, inputs, node.documents()));
        let stepped = step_started.elapsed();
        if let Some(reason) = carry_out(&shared, outputs) {
            take_new_writer(&shared, &mut driver, &reason);
        }
        if node.documents().pending_reissues() > 0 && driver.engine().superseded().is_none() {
            reissue(&shared);
        }
        let waiting = events.len();
        refresh_status(&shared, &driver, &mut backlog, waiting);
        note_step_time(&shared, inputs_count, stepped, step_started.elapsed());
    }
}

/// An engine step longer than this is logged: meanwhile the node sent, received and reported
/// nothing.
const ENGINE_STEP_SLOW: Duration = Duration::from_secs(1);

/// Keeps the slowest engine step for status and metrics, and logs a slow one with where its
/// time went (the driver's step, or carrying out and refreshing the status after it).
fn note_step_time(shared: &Shared, inputs: usize, stepped: Duration, whole: Duration) {
    let whole_ms = u64::try_from(whole.as_millis()).unwrap_or(u64::MAX);
    shared
        .slowest_engine_step_ms
        .fetch_max(whole_ms, Ordering::Relaxed);
    if whole >= ENGINE_STEP_SLOW {
        tracing::warn!(
            inputs,
            step_ms = stepped.as_millis() as u64,
            whole_ms,
            "the replication engine took long over one step"
        );
    }
}

/// A peer showed that this node's own log is not its store's alone: the store takes a new
/// writer before anything more is written under the old one, and the old one's log comes
/// back from the peers that hold it. If that fails (the disk), writes are refused until it
/// succeeds: the next summary asks again.
fn take_new_writer(shared: &Shared, driver: &mut Driver, reason: &str) {
    let node = &shared.node;
    match tokio::task::block_in_place(|| node.new_incarnation(reason)) {
        Ok(writer) => follow_writer(shared, driver, writer, reason),
        Err(error) => {
            tracing::error!(%error, "could not take a new writer");
        }
    }
}

/// The engine writes under the store's new `writer` from now on, and status says why.
fn follow_writer(
    shared: &Shared,
    driver: &mut Driver,
    writer: crate::record::NodeId,
    reason: &str,
) {
    let node = &shared.node;
    tokio::task::block_in_place(|| driver.set_writer(writer, node.documents()));
    let mut status = shared.status.lock().unwrap_or_else(|p| p.into_inner());
    status.writer = writer.to_string();
    status.former_writers = node
        .documents()
        .former_writers()
        .iter()
        .map(ToString::to_string)
        .collect();
    status.new_writer_reason = Some(reason.to_owned());
}

/// Writes again what this node wrote and a collision took out, under its current writer.
fn reissue(shared: &Shared) {
    let node = &shared.node;
    match tokio::task::block_in_place(|| node.documents().reissue_pending(super::now_ms())) {
        Ok(done) => {
            if !done.is_empty() {
                shared.local_writes.wrote();
            }
        }
        Err(error) => tracing::error!(%error, "could not write again what a collision took out"),
    }
}

/// Reads the grants and revocations again; a revoked node's connections close at once.
fn refresh_grants(node: &Node, transport: &Transport) -> Result<(), NodeError> {
    node.refresh_scopes()?;
    transport.set_revoked(node.scopes().shut_out());
    Ok(())
}

/// Carries out the driver's outputs; returns why the store must take a new writer, if a peer
/// showed it (the driver says so at every step until the node has a new writer).
fn carry_out(shared: &Shared, outputs: Vec<Output>) -> Option<String> {
    let mut superseded = None;
    for output in outputs {
        match output {
            Output::WriterSuperseded { peer, reason } => {
                tracing::warn!(%peer, "{reason}");
                superseded = Some(reason);
            }
            Output::Send {
                peer,
                connection,
                frame,
            } => shared.transport.send(&peer, connection, frame),
            Output::Disconnect {
                peer,
                connection,
                goodbye,
            } => {
                tracing::warn!(%peer, reason = ?goodbye.reason, detail = %goodbye.detail, "disconnecting peer");
                shared.transport.disconnect(&peer, connection, goodbye);
            }
            Output::Applied { from, changes } => {
                tracing::debug!(%from, count = changes.len(), "applied changes");
                // A grant or revocation counts from the change that brought it, not from the
                // next periodic read: what this node is sent next is judged by it.
                if changes.iter().any(|change| {
                    crate::store::collection_of(&change.doc_key) == crate::scope::GRANTS_COLLECTION
                }) {
                    if let Err(error) = refresh_grants(&shared.node, &shared.transport) {
                        tracing::warn!(%error, "reading the grants");
                    }
                }
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
    superseded
}

/// Which peers keep up with this node's own writes, and whether writers are pushed back.
#[derive(Debug, Default)]
struct Backlog {
    keeping_up: std::collections::BTreeSet<crate::record::NodeId>,
    engine_busy: bool,
    /// When the status last worked out what is stable (at most every
    /// [`RECLAMATION_STATUS_INTERVAL`]: it weighs every origin against every known node).
    reclamation_at: Option<Instant>,
}

/// How often `/v1/status` works out what is stable.
const RECLAMATION_STATUS_INTERVAL: Duration = Duration::from_secs(1);

impl Backlog {
    /// Whether the status should work out what is stable again now.
    fn reclamation_due(&mut self) -> bool {
        let due = self
            .reclamation_at
            .is_none_or(|at| at.elapsed() >= RECLAMATION_STATUS_INTERVAL);
        if due {
            self.reclamation_at = Some(Instant::now());
        }
        due
    }

    /// Weighs the engine's queue and each ready peer's lag on this node's own log; returns
    /// why writers should wait, if they should.
    fn weigh(&mut self, engine: &Engine, own_mark: u64, waiting: usize) -> Option<String> {
        if waiting >= ENGINE_QUEUE_BUSY {
            self.engine_busy = true;
        } else if waiting < ENGINE_QUEUE_CALM {
            self.engine_busy = false;
        }
        let own = engine.writer();
        let ready = engine.ready_peers();
        self.keeping_up.retain(|peer| ready.contains(peer));
        let mut behind = None;
        for peer in ready {
            let Some(theirs) = engine.reported_mark(&peer, &own) else {
                continue;
            };
            let lacking = own_mark.saturating_sub(theirs);
            if lacking <= KEEPING_UP_CHANGES {
                self.keeping_up.insert(peer);
            } else if lacking > OWN_BACKLOG_LET_GO && self.keeping_up.remove(&peer) {
                tracing::warn!(
                    %peer,
                    lacking,
                    "the peer cannot keep up with this node's writes: it is caught up in the \
                     background and no longer holds writers back"
                );
            } else if lacking > OWN_BACKLOG_CHANGES_MAX && self.keeping_up.contains(&peer) {
                behind = Some(format!(
                    "peer {peer} lacks {lacking} of this node's changes (more than \
                     {OWN_BACKLOG_CHANGES_MAX})"
                ));
            }
        }
        if self.engine_busy {
            return Some(format!("{waiting} messages from peers wait to be applied"));
        }
        behind
    }
}

fn refresh_status(shared: &Shared, driver: &Driver, backlog: &mut Backlog, waiting: usize) {
    let engine = driver.engine();
    let marks = shared.node.documents().origin_marks();
    let own = shared.node.writer();
    let own_mark = marks
        .iter()
        .find(|(origin, _)| *origin == own)
        .map_or(0, |(_, mark)| *mark);
    let overloaded = backlog.weigh(engine, own_mark, waiting);
    shared
        .overloaded
        .store(overloaded.is_some(), Ordering::Release);
    let ready = engine.ready_peers();
    let peers = shared
        .transport
        .connected()
        .into_iter()
        .map(|(peer, address)| PeerStatus {
            node: peer.to_string(),
            name: engine.peer_name(&peer).to_owned(),
            address: address.to_string(),
            state: if ready.contains(&peer) {
                "ready"
            } else {
                "handshaking"
            },
            lag: engine.lag(&peer, &marks),
            policies: engine.peer_policies(&peer).as_str(),
            queued_bytes: driver.queued(&peer),
            keeping_up: backlog.keeping_up.contains(&peer) && !engine.repairing(&peer),
            repairing: engine.repairing(&peer),
            changes_ahead: engine.peer_changes_ahead(&peer),
        })
        .collect::<Vec<_>>();
    let unreachable = shared
        .transport
        .dials()
        .into_iter()
        .filter_map(|(address, dial)| {
            let error = dial.last_error?;
            let connected = dial.peer.is_some_and(|node| {
                peers
                    .iter()
                    .any(|peer: &PeerStatus| peer.node == node.to_string())
            });
            (!connected).then(|| UnreachablePeer {
                address: address.to_string(),
                node: dial.peer.map(|node| node.to_string()),
                error,
                failures: dial.failures,
            })
        })
        .collect();
    let mut status = shared
        .status
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    status.peers = peers;
    status.unreachable = unreachable;
    status.overloaded = overloaded;
    status.writes_refused = shared.writes_refused.load(Ordering::Relaxed);
    // This runs after every engine step: the counts by policy are worked out again only
    // when a conflict was counted since the last step.
    let stats = engine.stats();
    let by_policy = if status.engine.conflicts == stats.conflicts {
        std::mem::take(&mut status.engine.conflicts_by_policy)
    } else {
        conflicts_by_policy(stats, shared.node.policies())
    };
    status.engine = EngineStats::from(engine, driver.stats(), by_policy);
    if backlog.reclamation_due() {
        let reclamation = engine.reclamation(shared.node.documents());
        status.reclamation = ReclamationStatus::from(reclamation);
    }
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

/// The Prometheus text of `/metrics`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PolicyKind, PolicySection};
    use crate::policy::Policies;
    use crate::record::NodeId;
    use crate::store::{DocStore, DocStoreConfig, MemoryStore};
    use concord_proto::{Hello, Message, OriginMark, Summary};

    /// An engine with one ready peer that reported `own_mark` of this node's log.
    fn engine_with_peer(reported: u64) -> (Engine, DocStore<MemoryStore>, NodeId) {
        let me = NodeId([1; 16]);
        let peer = NodeId([2; 16]);
        let docs = DocStore::open(MemoryStore::new(), me, DocStoreConfig::default()).unwrap();
        let mut engine = Engine::new(sync::Config::new([3; 16], me, "me"));
        let zero = Duration::ZERO;
        engine
            .handle(zero, sync::Event::PeerConnected(peer), &docs)
            .unwrap();
        let hello = Message::Hello(Hello {
            cluster: [3; 16],
            node: peer.0,
            node_name: "peer".into(),
            version_min: 1,
            version_max: 2,
        });
        engine
            .handle(zero, sync::Event::Received(peer, hello), &docs)
            .unwrap();
        report(&mut engine, &docs, peer, reported);
        (engine, docs, peer)
    }

    fn report(engine: &mut Engine, docs: &DocStore<MemoryStore>, peer: NodeId, mark: u64) {
        let summary = Message::Summary(Summary {
            origins: vec![OriginMark {
                origin: [1; 16],
                contiguous: mark,
            }],
        });
        engine
            .handle(Duration::ZERO, sync::Event::Received(peer, summary), docs)
            .unwrap();
    }

    #[test]
    fn writers_are_pushed_back_while_a_peer_that_kept_up_falls_far_behind() {
        let (mut engine, docs, peer) = engine_with_peer(0);
        let mut backlog = Backlog::default();
        // A peer catching up from nothing does not hold writers back.
        assert_eq!(backlog.weigh(&engine, 50_000, 0), None);
        // Once it keeps up, falling more than the bound behind does.
        report(&mut engine, &docs, peer, 49_500);
        assert_eq!(backlog.weigh(&engine, 50_000, 0), None);
        assert!(backlog.keeping_up.contains(&peer));
        let behind = backlog.weigh(&engine, 50_000 + OWN_BACKLOG_CHANGES_MAX + 1_000, 0);
        assert!(behind.is_some_and(|why| why.contains("lacks")));
        // So far behind that it cannot keep up: let go, writers go on.
        assert_eq!(
            backlog.weigh(&engine, 50_000 + OWN_BACKLOG_LET_GO + 1, 0),
            None
        );
        assert!(!backlog.keeping_up.contains(&peer));
    }

    #[test]
    fn writers_are_pushed_back_while_the_engine_is_behind_on_peers() {
        let (engine, _docs, _peer) = engine_with_peer(0);
        let mut backlog = Backlog::default();
        assert!(backlog.weigh(&engine, 0, ENGINE_QUEUE_BUSY).is_some());
        // Between the marks it stays as it was; below the calm mark it lets go.
        assert!(backlog.weigh(&engine, 0, ENGINE_QUEUE_CALM + 1).is_some());
        assert_eq!(backlog.weigh(&engine, 0, ENGINE_QUEUE_CALM - 1), None);
        assert_eq!(backlog.weigh(&engine, 0, ENGINE_QUEUE_CALM + 1), None);
    }

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
