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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_proto::{Goodbye, GoodbyeReason};
use tokio::sync::mpsc;

use super::{Node, NodeError, TLS_DIR};
use crate::net::{tls::NodeTls, Transport};
use crate::sync::{self, Driver, Engine, Input, Output};

mod backlog;
#[cfg(test)]
mod tests;

pub use super::metrics::metrics_text;
use super::shared::resolve;
pub use super::shared::{
    degraded, AppliedNotice, Refusal, Shared, APPLIED_NOTICES_BUFFERED, RETRY_AFTER_SECONDS,
};
pub use super::status::{
    ConflictCount, EngineStats, KnownNode, OriginReclamation, PeerStatus, ReclamationStatus,
    Status, UnreachablePeer,
};
use backlog::{refresh_status, Backlog};

/// Transport events queued for the engine before readers wait (and QUIC slows the peer).
pub const ENGINE_QUEUE_EVENTS: usize = 4096;
/// Transport events handled in one engine step at most.
pub const ENGINE_EVENTS_PER_STEP_MAX: usize = 1024;
/// Changes from peers one engine step takes at most (the event that reaches it is the
/// step's last). A step applies them, makes them durable, and only then sends and reports:
/// with no bound, a node behind its peers took every waiting event in one step and sent
/// nothing for 15-41 s (three nodes under steady patches, 2026-12-07). What waits stays in
/// the engine's queue, which pushes writers back once it fills ([`ENGINE_QUEUE_BUSY`]).
pub const ENGINE_CHANGES_PER_STEP_MAX: usize = 8192;
const _: () = assert!(
    ENGINE_CHANGES_PER_STEP_MAX >= concord_proto::CHANGES_PER_MESSAGE_MAX,
    "a step takes at least one whole message of changes"
);
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

/// Runs the node until `shutdown` completes. Returns an error, after stopping what still
/// runs, if the engine task or a binding dies first: a node that no longer replicates must
/// not go on acknowledging writes.
pub async fn run(
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    start(node).await?.run_until(shutdown).await
}

/// Starts every binding of the node's config; the first that fails stops those started.
fn start_bindings(
    node: &Arc<Node>,
) -> Result<Vec<crate::adapters::driver::RunningBinding>, NodeError> {
    tokio::task::block_in_place(|| {
        crate::adapters::driver::forget_unbound_followers(node.as_ref())
    })
    .map_err(|error| NodeError::Binding(error.to_string()))?;
    let mut bindings = Vec::new();
    for binding in &node.config().bindings {
        let started =
            tokio::task::block_in_place(|| crate::adapters::driver::start(binding, node.clone()));
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
    Ok(bindings)
}

/// Grants and revocations arrive from peers like records: read them again every second. A
/// revoked node's connections close at once and are refused from then on.
async fn refresh_grants_every_second(node: Arc<Node>, transport: Arc<Transport>) {
    let mut every = tokio::time::interval(SCOPES_REFRESH);
    loop {
        every.tick().await;
        let node = node.clone();
        let transport = transport.clone();
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
}

/// The replication engine's settings, from the node's config and store.
fn engine_config(node: &Node, cluster: [u8; 16]) -> sync::Config {
    let config = node.config();
    let mut engine_config = sync::Config::new(cluster, node.id(), &config.node.name);
    engine_config.writer = node.writer();
    engine_config.policy_hash = node.policies().hash();
    engine_config.clock_ahead_max = Duration::from_millis(config.node.clock_ahead_max_ms);
    engine_config.runs_alone = config.network.peers.is_empty();
    engine_config
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
    // the reason, before anything else runs.
    let bindings = start_bindings(&node)?;
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
    transport.set_revoked(node.scopes().shut_out());
    tasks.push(tokio::spawn(refresh_grants_every_second(
        node.clone(),
        transport.clone(),
    )));
    for peer in &config.network.peers {
        let address = resolve(peer)?;
        tasks.push(tokio::spawn(transport.clone().dial_loop(address)));
    }
    let driver = Driver::new(Engine::new(engine_config(&node, cluster)), node.documents());
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
        self.shared.node.put(id, write)
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
            () = shared.node.documents().local_writes().written() => {}
            () = sleep => {}
        }
        let mut changes: usize = inputs.iter().map(Input::changes_carried).sum();
        while inputs.len() < ENGINE_EVENTS_PER_STEP_MAX && changes < ENGINE_CHANGES_PER_STEP_MAX {
            match events.try_recv() {
                Ok(event) => {
                    changes += event.changes_carried();
                    inputs.push(event);
                }
                Err(_) => break,
            }
        }
        if shared.node.documents().local_writes().take() {
            inputs.push(Input::LocalWrites);
        }
        let now = shared.started.elapsed();
        let timed_out = now >= deadline;
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
        // What arrived is applied and sent first; the periodic work (summaries, repair, a
        // step of reclamation) then takes a step of its own, so that nothing waits for it but
        // what arrives while it runs.
        let arrived = (!inputs.is_empty() || !timed_out).then_some(inputs);
        let periodic = timed_out.then(|| vec![Input::Timeout]);
        for inputs in [arrived, periodic].into_iter().flatten() {
            run_step(
                &shared,
                &mut driver,
                &mut backlog,
                now,
                inputs,
                events.len(),
            );
        }
    }
}

/// One step of the driver over `inputs`, what it asks for carried out, and the status
/// refreshed after it (`waiting`: events queued behind it).
fn run_step(
    shared: &Shared,
    driver: &mut Driver,
    backlog: &mut Backlog,
    now: Duration,
    inputs: Vec<Input>,
    waiting: usize,
) {
    let node = &shared.node;
    driver.set_clock(u64::try_from(super::now_ms()).unwrap_or(0));
    let step_started = Instant::now();
    let inputs_count = inputs.len();
    let outputs = tokio::task::block_in_place(|| driver.step(now, inputs, node.documents()));
    let stepped = step_started.elapsed();
    if let Some(reason) = carry_out(shared, outputs) {
        take_new_writer(shared, driver, &reason);
    }
    if node.documents().pending_reissues() > 0 && driver.engine().superseded().is_none() {
        reissue(shared);
    }
    refresh_status(shared, driver, backlog, waiting);
    let phases = driver.last_step_times();
    note_step_time(
        shared,
        inputs_count,
        stepped,
        phases,
        step_started.elapsed(),
    );
}

/// An engine step longer than this is logged: meanwhile the node sent, received and reported
/// nothing.
const ENGINE_STEP_SLOW: Duration = Duration::from_secs(1);

/// Keeps the slowest engine step for status and metrics, and logs a slow one with where its
/// time went (the driver's step, or carrying out and refreshing the status after it).
fn note_step_time(
    shared: &Shared,
    inputs: usize,
    stepped: Duration,
    phases: &sync::StepTimes,
    whole: Duration,
) {
    let whole_ms = u64::try_from(whole.as_millis()).unwrap_or(u64::MAX);
    shared
        .slowest_engine_step_ms
        .fetch_max(whole_ms, Ordering::Relaxed);
    if whole >= ENGINE_STEP_SLOW {
        tracing::warn!(
            inputs,
            step_ms = stepped.as_millis() as u64,
            whole_ms,
            %phases,
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
        // Written durably: the store wakes the engine to ship it.
        Ok(_) => {}
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
                if changes
                    .iter()
                    .any(|change| crate::scope::is_grant_doc(&change.doc_key))
                {
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
