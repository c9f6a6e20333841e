//! Deterministic simulation of Concord nodes: the production replication engine and document
//! store, on a simulated network and clock, under faults.
//!
//! Each node is a [`concord::sync::Driver`] around the engine, over a [`DocStore`] on a
//! [`MemoryStore`]: the same driver and engine `concord run` runs, minus sockets. Each
//! direction of a link sends at a bandwidth (some links are slow) and each connection's send
//! queue is small, so queues fill and the engine waits for room, as it does over QUIC. The
//! network delivers encoded frames after a latency with jitter (so messages reorder), and in
//! the safety phase drops and duplicates them, cuts links both ways or one way, cuts links one
//! by one and restores them in random order, crashes nodes (a crash keeps what was flushed
//! plus a random prefix of the rest, the loss the durability contract allows) and restarts
//! them, loses a node's whole store now and then (it comes back empty, or from a backup taken
//! earlier in the run, under a new writer as `concord run` and `concord restore` do), skews their clocks, and keeps edge offices offline but for short windows. The
//! workload writes small fields, now and then values up to the largest change a node accepts
//! (and over it, which must be refused and leave nothing), and bursts of hundreds of updates
//! to one record (a long history). Every choice comes from one seeded [`SimRng`], so a seed
//! replays the same run; the trace hash proves it.
//!
//! Then the liveness phase: faults stop, every node is up, every link heals. Checks:
//! - safety, after every crash: every write the node acknowledged is still in its store (after
//!   a store is lost, the writes that no other node held yet are lost with it; every other
//!   acknowledged write must come back);
//! - convergence: within [`CONVERGE_SIM_MS_MAX`] of healing (or, once a store was lost,
//!   [`CONVERGE_AFTER_STORE_LOSS_SIM_MS_MAX`]), every node holds every record with
//!   the same heads and the same JSON, resolves every conflict to the same value under each
//!   conflict policy (`lww`, `priority` by source, `custom`, `manual`), and holds every
//!   origin's log as far as every other node (no log stays behind anywhere);
//! - no engine step fails;
//! - no acknowledged write (from any node) is missing from the merged history anywhere;
//! - a record deleted by an acknowledged delete is live at the end only if a write causally
//!   after that delete re-created it.

pub mod rng;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use automerge::{ActorId, ChangeHash};
use concord::config::{PolicyKind, PolicySection};
use concord::policy::Policies;
use concord::record::document::{self, RecordWrite};
use concord::record::held::HeldDoc;
use concord::record::{NodeId, RecordId};
use concord::scope::{Grant, Revocation, Scope, ScopeDoor, Scopes, Verified};
use concord::store::{DocStore, DocStoreConfig, Durability, MemoryStore, StoreError};
use concord::sync::{Config, Driver, Engine, Input, Output};
use serde_json::json;

pub use rng::SimRng;

/// Most nodes one run may have.
pub const NODES_MAX: usize = 64;
/// Most workload operations one run may make.
pub const STEPS_MAX: u64 = 1_000_000;
/// Simulated time the liveness phase may take before convergence counts as failed. Below the
/// repair interval (30 s) on purpose: summaries alone must converge a healed cluster, repair
/// is the net under them, not the way things normally heal.
pub const CONVERGE_SIM_MS_MAX: u64 = 20_000;
/// The same after a run in which a store was lost: a change that its author's lost log was
/// the only one to place (peers had fetched it with its document, without a log place) is in
/// no log any more, and only repair's fingerprints find it. Two repair rounds on top.
pub const CONVERGE_AFTER_STORE_LOSS_SIM_MS_MAX: u64 =
    CONVERGE_SIM_MS_MAX + 2 * concord::sync::REPAIR_INTERVAL_DEFAULT.as_millis() as u64;
/// The same with partial replicas. A narrowed node that a relay judged out of scope for a
/// change (by the record as the relay held it) is healed by repair; and a change that only a
/// narrowed node still holds (its author's store lost) reaches one node that reads everything
/// in one round and the others from there in the next, as it is in no log. Three rounds on
/// top: rounds run only towards peers whose summaries are quiet.
pub const CONVERGE_PARTIAL_SIM_MS_MAX: u64 =
    CONVERGE_SIM_MS_MAX + 3 * concord::sync::REPAIR_INTERVAL_DEFAULT.as_millis() as u64;
/// A connection with a link cut one way is given up after this long (QUIC's idle timeout).
const ONE_WAY_TIMEOUT_MS: u64 = 3_000;
/// Trace lines kept for a failure report.
const TRACE_TAIL_LINES: usize = 60;
const CLUSTER: [u8; 16] = [0x5a; 16];

#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub records: usize,
    /// Workload operations (writes and deletes) in the safety phase.
    pub steps: u64,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub drop_percent: u64,
    pub duplicate_percent: u64,
    /// Percent of steps that start or end a partition.
    pub partition_percent: u64,
    /// Percent of steps that crash a node.
    pub crash_percent: u64,
    /// Percent of crashes that lose the node's whole store; half of those bring back the
    /// node's last backup, if it has one.
    pub store_loss_percent: u64,
    /// Per mille of workload steps on a node that back its store up first.
    pub backup_permille: u64,
    /// Clocks drift within ± this of true time (well within the engine's bound on how far
    /// ahead a change may be stamped).
    pub skew_ms_max: u64,
    /// Percent of runs in which one node's clock runs far ahead, by `far_ahead_ms`: its
    /// changes wait at every other node until their clocks catch up, and move no one's.
    pub far_ahead_percent: u64,
    pub far_ahead_ms: u64,
    /// Nodes (the last ones) that are offline most of the time.
    pub edge_offices: usize,
    /// Documents each node keeps loaded: fewer than the records, so reloads from the store
    /// happen (at 4 of 12 a run took 2.5x as long; at 8, reloads still happen often).
    pub cache_documents: usize,
    /// Bytes a connection's send queue holds before the engine waits for room: small, so
    /// queues fill often.
    pub queue_bytes: usize,
    /// Bandwidth of each direction of a link, and of the slow ones.
    pub bandwidth_bytes_per_ms: u64,
    pub slow_bandwidth_bytes_per_ms: u64,
    /// Percent of links that are slow.
    pub slow_link_percent: u64,
    /// Per mille of writes that write a large value (up to the largest change, a tenth of
    /// them over it).
    pub large_value_permille: u64,
    /// Per mille of steps that update one record many times in a row (a long history).
    pub burst_permille: u64,
    pub burst_writes_max: u64,
    /// Percent of runs with grants: some nodes may write only one region's records, one of
    /// those may be modified to ignore its grant, and that one may be revoked mid-run.
    pub scoped_percent: u64,
    /// Percent of granted nodes whose grant narrows what they read to their region too
    /// (partial replication); the others read every record and write only their region's.
    pub partial_reads_percent: u64,
    /// Whether stores compact the histories every node holds (`store.compact_histories`).
    pub compact_histories: bool,
    /// Print every trace line to stderr as it happens (a run's result does not depend on it).
    pub print_trace: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            nodes: 5,
            records: 12,
            steps: 200,
            latency_ms: 5,
            jitter_ms: 20,
            drop_percent: 2,
            duplicate_percent: 2,
            partition_percent: 4,
            crash_percent: 2,
            store_loss_percent: 25,
            backup_permille: 20,
            skew_ms_max: 500,
            far_ahead_percent: 20,
            far_ahead_ms: 10_000,
            edge_offices: 1,
            cache_documents: 8,
            queue_bytes: 64 * 1024,
            // 50 MB/s, and 2 MB/s for the slow links: the largest change takes 2 s there.
            bandwidth_bytes_per_ms: 50_000,
            slow_bandwidth_bytes_per_ms: 2_000,
            slow_link_percent: 10,
            large_value_permille: 4,
            burst_permille: 10,
            burst_writes_max: 600,
            scoped_percent: 30,
            // Partial replication does not yet converge under concurrent moves (see
            // BENCHMARKS.md): it is drawn only when asked for.
            partial_reads_percent: 0,
            compact_histories: DocStoreConfig::default().compact_histories,
            print_trace: false,
        }
    }
}

impl Params {
    fn without_compaction(&self) -> Self {
        Self {
            compact_histories: false,
            ..self.clone()
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub writes: u64,
    pub deletes: u64,
    pub acknowledged: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub messages: u64,
    pub bytes: u64,
    pub changes_sent: u64,
    /// Of `changes_sent`, those pushed as written or received (the rest: catch-up).
    pub changes_pushed: u64,
    /// Changes received that the receiver already held.
    pub duplicates_received: u64,
    /// Changes sent over the number of (change, other node) deliveries a run needs.
    pub copies_per_node_reached_milli: u64,
    pub converge_sim_ms: u64,
    /// Large values written, and writes over the change limit refused.
    pub large_writes: u64,
    pub refused_writes: u64,
    /// Writes made by bursts to one record.
    pub burst_writes: u64,
    /// Frames that waited because their connection's queue was full.
    pub queue_full_waits: u64,
    /// One node's clock ran `far_ahead_ms` ahead of the others'.
    pub far_ahead: bool,
    /// Changes not applied when they arrived, stamped too far ahead of their receiver's clock
    /// (they are sent again until they are not).
    pub changes_ahead: u64,
    /// Records narrowed nodes took out on the word of a node that reads everything (since
    /// each node's last restart).
    pub withdrawn_documents: u64,
    /// Log entries truncated as every known node held them, and peers caught up by whole
    /// documents as they lacked some (since each node's last restart).
    pub log_entries_truncated: u64,
    pub catch_ups: u64,
    /// Documents whose stable history was compacted (since each node's last restart).
    pub documents_compacted: u64,
    /// Stores lost whole, and of those, brought back from a backup.
    pub stores_lost: u64,
    pub stores_restored: u64,
    /// Acknowledged writes that no other node held when their store was lost (a revoked node
    /// counts for none).
    pub lost_with_store: u64,
    /// Stores that took a new writer while running, as peers showed them behind or beside
    /// their own log (only when stores reuse writers, a sabotage).
    pub writers_superseded: u64,
    /// Documents whose writes of a node's own, taken out by a collision, were written again.
    pub writes_reissued: u64,
    /// Changes refused by the rule for colliding changes, on every node.
    pub changes_refused: u64,
    /// Acknowledged changes refused by the rule for colliding changes and not written again
    /// (their author lost them too); only when stores reuse writers (a sabotage).
    pub acknowledged_refused: u64,
    /// Fields in conflict at the end, each resolved alike by every node under every policy
    /// of `checked_policies`.
    pub conflicts_at_end: u64,
    /// A run with grants; writes its nodes' own doors refused (outside their grants).
    pub scoped: bool,
    pub scope_refused_writes: u64,
    /// Changes a node modified to ignore its grant wrote, and of those, the ones every other
    /// node left out (outside its grant, past its revocation's cut-off, or on top of those).
    pub forged_writes: u64,
    pub forged_refused: u64,
    pub revoked: bool,
    /// Acknowledged writes made on top of changes a revocation cut off, which their node could
    /// not write again (the record is outside its grant now).
    pub acknowledged_cut_off: u64,
    pub trace_hash: u64,
}

/// A broken guarantee, with the seed and the trace before it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    pub message: String,
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "violation at {} ms (simulated) of seed {}: {}",
            self.at_ms, self.seed, self.message
        )?;
        writeln!(f, "trace before it:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Deliberate bugs in the engine and store, to show that the checks find them: the real ones
/// with this crate's `sabotage` feature (its tests of the checks), none otherwise.
#[cfg(feature = "sabotage")]
type Sabotage = concord::Sabotage;
#[cfg(not(feature = "sabotage"))]
#[derive(Debug, Clone, Copy, Default)]
struct Sabotage;

/// A record as one node holds it: sorted heads and JSON.
/// A record as one node sees it: its heads, its JSON, and its JSON as each policy of
/// [`checked_policies`] resolves it (every node must agree on all of them).
type RecordView = (
    Vec<ChangeHash>,
    Option<serde_json::Map<String, serde_json::Value>>,
    Vec<Option<serde_json::Map<String, serde_json::Value>>>,
);

/// The collection every simulated record is in.
const COLLECTION: &str = "items";
/// How a node says it takes a new writer because a revocation took out changes of its own
/// (the engine's reason starts alike).
const REVOCATION_TOOK_OUT_OWN: &str = "a revocation took out changes of this node's own";
/// The values of the field grants narrow by, in a scoped run.
const REGIONS: [&str; 2] = ["north", "south"];

/// Grants, a node modified to ignore its own, and its revocation, in a scoped run: every
/// node's store judges changes through the same door `concord run` gives it.
struct Scoped {
    /// What every honest node holds: the grants and, once made, the revocation.
    scopes: Arc<RwLock<Scopes>>,
    /// How the modified node sees them: nothing granted to or revoked of itself.
    modified_view: Arc<RwLock<Scopes>>,
    modified: Option<usize>,
    /// The safety step at which the modified node is revoked, if it is.
    revoke_at: Option<u64>,
    /// The modified node's changes: record, change, and its place in its log, in order.
    forged: Vec<(usize, ChangeHash, (NodeId, u64))>,
}

impl Scoped {
    fn door(&self, node: &SimNode, index: usize) -> Arc<dyn concord::store::WriteDoor> {
        let view = if self.modified == Some(index) {
            self.modified_view.clone()
        } else {
            self.scopes.clone()
        };
        Arc::new(ScopeDoor::new(node.id, view))
    }

    fn scopes(&self) -> std::sync::RwLockReadGuard<'_, Scopes> {
        self.scopes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
/// The source names of each node's two writers (actors 0 and 1).
const WRITER_SOURCES: [&str; 2] = ["api", "erp"];

/// Whether `held` holds the acknowledged change `hash`, whose place `written` knows.
fn holds(held: &HeldDoc, hash: &ChangeHash, written: &HashMap<ChangeHash, (ActorId, u64)>) -> bool {
    match written.get(hash) {
        Some((actor, seq)) => held.holds_written(hash, actor, *seq),
        None => held.holds(hash),
    }
}

/// The policies under which every node must resolve every conflict identically.
fn checked_policies() -> Vec<Policies> {
    [
        (PolicyKind::Lww, vec![], None),
        (PolicyKind::Priority, vec!["erp".to_owned()], None),
        (PolicyKind::Custom, vec![], Some(CUSTOM_RESOLVER.to_owned())),
        (PolicyKind::Manual, vec![], None),
    ]
    .into_iter()
    .map(|(policy, order, script)| {
        Policies::from_config(&[PolicySection {
            collection: COLLECTION.to_owned(),
            field: None,
            policy,
            order,
            script,
        }])
        .expect("the checked policies compile")
    })
    .collect()
}

/// The `custom` policy the simulator checks: the value that sorts last as text, ties by the
/// earliest clock, so that the winner depends on values, clocks and candidate order alike.
const CUSTOM_RESOLVER: &str = r#"
let best = 0;
for i in 1..candidates.len() {
    let challenger = `${candidates[i].value}`;
    let holder = `${candidates[best].value}`;
    if challenger > holder || (challenger == holder && candidates[i].hlc < candidates[best].hlc) {
        best = i;
    }
}
best
"#;

struct SimNode {
    id: NodeId,
    /// The writer its store writes under: a new one each time the store is made again.
    writer: NodeId,
    store: MemoryStore,
    /// A copy of the store taken earlier in the run.
    backup: Option<MemoryStore>,
    /// The store was lost in the last crash: it restarts under a new writer.
    store_lost: bool,
    docs: DocStore<MemoryStore>,
    driver: Driver,
    skew_ms: i64,
    up: bool,
    restart_at: Option<u64>,
    edge: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// Connection id while connected; messages of older connections are dropped.
    connection: Option<u64>,
    cut_forward: bool,
    cut_backward: bool,
    one_way_since: Option<u64>,
    reconnect_at: u64,
    bandwidth_bytes_per_ms: u64,
    /// When each direction (smaller to larger index, then back) finishes sending what it has.
    busy_until: [u64; 2],
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Happening {
    /// A frame arrives.
    Deliver {
        from: usize,
        to: usize,
        connection: u64,
        frame: Vec<u8>,
    },
    /// A frame left `node`'s queue to `peer`: its room is free again.
    Drained {
        node: usize,
        peer: usize,
        connection: u64,
        bytes: usize,
    },
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    order: u64,
    happening: Happening,
}

struct Sim {
    seed: u64,
    params: Params,
    sabotage: Sabotage,
    rng: SimRng,
    nodes: Vec<SimNode>,
    ids: Vec<RecordId>,
    links: BTreeMap<(usize, usize), Link>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    next_order: u64,
    next_connection: u64,
    now_ms: u64,
    faults_on: bool,
    /// Acknowledged changes: (record, hash, was a delete, node). The node is `NODES_MAX` more
    /// than its index once its store was lost: other nodes held the change then, and the node
    /// gets it back from them, so a later crash of the node may find it missing still.
    acknowledged: Vec<(usize, ChangeHash, bool, usize)>,
    /// Each acknowledged change's actor and sequence number: inside a compacted history a
    /// change is known by its place alone.
    written: HashMap<ChangeHash, (ActorId, u64)>,
    summary: Summary,
    trace: Vec<String>,
    trace_hash: u64,
    policies: Vec<Policies>,
    scoped: Option<Scoped>,
}

fn store_config(params: &Params) -> DocStoreConfig {
    DocStoreConfig {
        cache_documents: NonZeroUsize::new(params.cache_documents.max(1)).expect("at least one"),
        compact_after_changes: 5,
        compact_histories: params.compact_histories,
        // Short histories are compacted too, so that most records of a run are.
        compact_history_changes_min: 4,
        ..DocStoreConfig::default()
    }
}

/// Runs one simulation.
pub fn run(seed: u64, params: &Params) -> Result<Summary, Violation> {
    run_sabotaged(seed, params, Default::default())
}

/// The documents of node `id` in `store`, written under `writer`.
fn open_docs(
    store: &MemoryStore,
    id: NodeId,
    writer: NodeId,
    params: &Params,
    sabotage: Sabotage,
) -> Result<DocStore<MemoryStore>, concord::store::StoreError> {
    #[cfg_attr(not(feature = "sabotage"), allow(unused_mut))]
    let mut docs = DocStore::open(store.clone(), writer, store_config(params))?;
    // Named writers, so conflict policies have sources and sites to rank: the node's site,
    // whichever writer its store has.
    let site = id.to_string()[..8].to_owned();
    for (index, source) in WRITER_SOURCES.iter().enumerate() {
        docs.name_writer(&writer.actor(index as u16), source, &site, id);
    }
    #[cfg(feature = "sabotage")]
    docs.set_sabotage(sabotage);
    #[cfg(not(feature = "sabotage"))]
    let _ = sabotage;
    Ok(docs)
}

fn run_sabotaged(seed: u64, params: &Params, sabotage: Sabotage) -> Result<Summary, Violation> {
    assert!(
        params.nodes >= 2 && params.nodes <= NODES_MAX,
        "2..={NODES_MAX} nodes"
    );
    assert!(params.records >= 1 && params.steps <= STEPS_MAX);
    assert!(
        params.edge_offices < params.nodes,
        "at least one node is not an edge office"
    );
    let mut rng = SimRng::new(seed);
    let far_ahead = rng.chance(params.far_ahead_percent);
    let mut nodes = Vec::with_capacity(params.nodes);
    for index in 0..params.nodes {
        let mut bytes = [0u8; 16];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let id = NodeId(bytes);
        let skew_ms = if params.skew_ms_max == 0 {
            0
        } else {
            rng.below(2 * params.skew_ms_max + 1) as i64 - params.skew_ms_max as i64
        };
        // The first node (never an edge office) runs far ahead in some runs.
        let skew_ms = if index == 0 && far_ahead {
            params.far_ahead_ms as i64
        } else {
            skew_ms
        };
        let store = MemoryStore::new();
        let docs = open_docs(&store, id, id, params, sabotage).expect("a fresh memory store opens");
        let driver = new_driver(id, id, &docs, params, sabotage);
        nodes.push(SimNode {
            id,
            writer: id,
            store,
            backup: None,
            store_lost: false,
            docs,
            driver,
            skew_ms,
            up: true,
            restart_at: None,
            edge: index >= params.nodes - params.edge_offices,
        });
    }
    let mut links = BTreeMap::new();
    for a in 0..params.nodes {
        for b in a + 1..params.nodes {
            let bandwidth_bytes_per_ms = if rng.chance(params.slow_link_percent) {
                params.slow_bandwidth_bytes_per_ms
            } else {
                params.bandwidth_bytes_per_ms
            };
            links.insert(
                (a, b),
                Link {
                    bandwidth_bytes_per_ms: bandwidth_bytes_per_ms.max(1),
                    ..Link::default()
                },
            );
        }
    }
    let scoped = if rng.chance(params.scoped_percent) {
        let mut scopes = Scopes::default();
        let mut granted = Vec::new();
        // The first node is never granted: it writes everything, and moves records between
        // regions.
        for (index, node) in nodes.iter().enumerate().skip(1) {
            if !rng.chance(50) {
                continue;
            }
            let region = REGIONS[rng.index(REGIONS.len())];
            let scope =
                Scope::parse(&format!("{COLLECTION}:region={region}")).expect("a valid scope");
            let partial_reads =
                params.partial_reads_percent > 0 && rng.chance(params.partial_reads_percent);
            let read = if partial_reads {
                scope.clone()
            } else {
                Scope::parse(COLLECTION).expect("a valid scope")
            };
            let grant = Grant {
                cluster: CLUSTER,
                node: node.id.0,
                read: vec![read],
                write: vec![scope],
                issued_ms: 0,
            };
            scopes.insert(Verified::Grant(grant), &[]);
            granted.push(index);
        }
        let modified =
            (!granted.is_empty() && rng.chance(50)).then(|| granted[rng.index(granted.len())]);
        let revoke_at = modified
            .filter(|_| rng.chance(50))
            .map(|_| rng.below(params.steps.max(1)));
        let modified_view = modified.map_or_else(
            || scopes.clone(),
            |index| scopes.without_node(&nodes[index].id),
        );
        let scoped = Scoped {
            scopes: Arc::new(RwLock::new(scopes)),
            modified_view: Arc::new(RwLock::new(modified_view)),
            modified,
            revoke_at,
            forged: Vec::new(),
        };
        if let Some(index) = modified {
            // The modified node sees no grant of its own and may find its door open: it would
            // compact what no honest node may, and withhold its own changes by it. What it
            // does to its own store is not under test; how the others judge it is.
            let node = &mut nodes[index];
            node.docs = open_docs(
                &node.store,
                node.id,
                node.id,
                &params.without_compaction(),
                sabotage,
            )
            .expect("a fresh memory store opens");
            node.driver = new_driver(node.id, node.id, &node.docs, params, sabotage);
        }
        for (index, node) in nodes.iter().enumerate() {
            node.docs.set_door(scoped.door(node, index));
        }
        Some(scoped)
    } else {
        None
    };
    let mut sim = Sim {
        seed,
        params: params.clone(),
        sabotage,
        rng,
        nodes,
        ids: (0..params.records)
            .map(|index| RecordId::parse(&format!("{COLLECTION}/r{index}")).expect("valid id"))
            .collect(),
        links,
        in_flight: BinaryHeap::new(),
        next_order: 0,
        next_connection: 1,
        now_ms: 0,
        faults_on: true,
        acknowledged: Vec::new(),
        written: HashMap::new(),
        summary: Summary::default(),
        trace: Vec::new(),
        trace_hash: 0xcbf2_9ce4_8422_2325,
        policies: checked_policies(),
        scoped,
    };
    sim.summary.far_ahead = far_ahead;
    sim.summary.scoped = sim.scoped.is_some();
    sim.run()?;
    sim.summary.trace_hash = sim.trace_hash;
    Ok(sim.summary)
}

/// How often simulated nodes take reports and truncate their logs.
const SIM_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// The production driver around a fresh engine for node `id` writing under `writer`, its own
/// log sent up to what the store holds (a restarted node pushes nothing old from memory).
fn new_driver(
    id: NodeId,
    writer: NodeId,
    docs: &DocStore<MemoryStore>,
    params: &Params,
    sabotage: Sabotage,
) -> Driver {
    #[cfg_attr(not(feature = "sabotage"), allow(unused_mut))]
    let mut config = Config::new(CLUSTER, id, "sim");
    config.writer = writer;
    config.changes_per_message = 64;
    // Reports and truncation twenty times as often as in a real node: runs last seconds of
    // simulated time, and the log is to be truncated under every fault.
    config.report_interval = SIM_REPORT_INTERVAL;
    #[cfg(feature = "sabotage")]
    {
        config.sabotage = sabotage;
    }
    #[cfg(not(feature = "sabotage"))]
    let _ = sabotage;
    Driver::with_queue_bytes(
        Engine::new(config),
        docs.origin_mark(&writer),
        params.queue_bytes,
    )
}

impl Sim {
    fn run(&mut self) -> Result<(), Violation> {
        // Safety phase.
        for step in 0..self.params.steps {
            let pause = 1 + self.rng.below(30);
            self.advance(pause)?;
            if self
                .scoped
                .as_ref()
                .is_some_and(|scoped| scoped.revoke_at == Some(step))
            {
                self.revoke()?;
            }
            let roll = self.rng.below(100);
            if roll < self.params.crash_percent {
                self.crash()?;
            } else if roll < self.params.crash_percent + self.params.partition_percent {
                self.partition_fault();
            } else {
                self.workload()?;
            }
        }
        // Liveness phase: faults stop, everything heals.
        self.faults_on = false;
        self.record_trace(format!("{} heal", self.now_ms));
        let healed_at = self.now_ms;
        for index in 0..self.nodes.len() {
            if !self.nodes[index].up {
                self.restart(index)?;
            }
        }
        for link in self.links.values_mut() {
            link.cut_forward = false;
            link.cut_backward = false;
            link.one_way_since = None;
        }
        loop {
            self.advance(100)?;
            if (self.now_ms - healed_at) % 1000 < 100 && self.converged()? {
                break;
            }
            let mut budget = if self.has_partial_replicas() {
                CONVERGE_PARTIAL_SIM_MS_MAX
            } else if self.summary.stores_lost > 0 {
                CONVERGE_AFTER_STORE_LOSS_SIM_MS_MAX
            } else {
                CONVERGE_SIM_MS_MAX
            };
            // What a node far ahead wrote waits until the others' clocks catch up with it.
            if self.summary.far_ahead {
                budget += self.params.far_ahead_ms;
            }
            if self.now_ms - healed_at > budget {
                let detail = self.divergence()?;
                return Err(self.violation(format!(
                    "no convergence within {budget} ms of healing: {detail}"
                )));
            }
        }
        self.summary.converge_sim_ms = self.now_ms - healed_at;
        self.check_history()?;
        self.check_scopes()?;
        for id in &self.ids {
            let found = self.nodes[0]
                .docs
                .read(id, |held| {
                    let doc = held.local();
                    concord::policy::conflicts(doc, COLLECTION, &self.policies[0]).len()
                })
                .map_err(|error| self.violation(format!("node 0 cannot read {id}: {error}")))?;
            self.summary.conflicts_at_end += found as u64;
        }
        let deliveries =
            (self.summary.writes + self.summary.deletes) * (self.nodes.len() as u64 - 1);
        let total = |count: fn(&concord::sync::Stats) -> u64| {
            self.nodes
                .iter()
                .map(|node| count(node.driver.engine().stats()))
                .sum::<u64>()
        };
        self.summary.changes_sent = total(|stats| stats.changes_sent);
        self.summary.changes_pushed = total(|stats| stats.changes_pushed);
        self.summary.duplicates_received = total(|stats| stats.duplicates);
        // Since each node's last restart: a restart begins its counters again.
        self.summary.changes_refused = total(|stats| stats.changes_refused.values().sum());
        self.summary.changes_ahead = total(|stats| stats.changes_ahead);
        self.summary.withdrawn_documents = total(|stats| stats.withdrawn_documents);
        self.summary.log_entries_truncated = total(|stats| stats.log_entries_truncated);
        self.summary.catch_ups = total(|stats| stats.catch_ups);
        self.summary.documents_compacted = total(|stats| stats.documents_compacted);
        if let Some(per_delivery) = (self.summary.changes_sent * 1000).checked_div(deliveries) {
            self.summary.copies_per_node_reached_milli = per_delivery;
        }
        Ok(())
    }

    fn record_trace(&mut self, line: String) {
        for byte in line.bytes() {
            self.trace_hash ^= u64::from(byte);
            self.trace_hash = self.trace_hash.wrapping_mul(0x0100_0000_01b3);
        }
        if self.params.print_trace {
            eprintln!("{line}");
        }
        self.trace.push(line);
        if self.trace.len() > TRACE_TAIL_LINES * 2 {
            self.trace.drain(..TRACE_TAIL_LINES);
        }
    }

    fn violation(&self, message: String) -> Violation {
        let start = self.trace.len().saturating_sub(TRACE_TAIL_LINES);
        Violation {
            seed: self.seed,
            at_ms: self.now_ms,
            message,
            trace_tail: self.trace[start..].to_vec(),
        }
    }

    fn fault(&mut self, kind: &'static str) {
        *self.summary.faults.entry(kind).or_default() += 1;
    }

    fn node_now(&self, index: usize) -> Duration {
        let local = self.now_ms as i64 + self.nodes[index].skew_ms + self.params.skew_ms_max as i64;
        Duration::from_millis(local.max(0) as u64)
    }

    /// Hands inputs to a node's driver and carries out what it returns.
    fn step(&mut self, index: usize, inputs: Vec<Input>) -> Result<(), Violation> {
        let now = self.node_now(index);
        let node = &mut self.nodes[index];
        node.driver.set_clock(now.as_millis() as u64);
        // What the engine and store log is told apart by node.
        let span = tracing::info_span!("node", index).entered();
        let outputs = node.driver.step(now, inputs, &node.docs);
        drop(span);
        if let Some(error) = node.driver.stats().last_error.clone() {
            return Err(self.violation(format!("node {index}: engine step failed: {error}")));
        }
        let mut superseded = None;
        for output in outputs {
            match output {
                Output::WriterSuperseded { reason, .. } => superseded = Some(reason),
                Output::Send {
                    peer,
                    connection,
                    frame,
                } => {
                    let to = self.index_of(peer);
                    self.send(index, to, connection, frame);
                }
                Output::Disconnect { peer, goodbye, .. } => {
                    let to = self.index_of(peer);
                    self.record_trace(format!(
                        "{} node {index} disconnects {to}: {:?}",
                        self.now_ms, goodbye.reason
                    ));
                    self.disconnect(index.min(to), index.max(to))?;
                }
                Output::Applied { .. } => {}
            }
        }
        if let Some(reason) = superseded {
            self.take_new_writer(index, &reason)?;
        }
        let node = &self.nodes[index];
        if node.docs.pending_reissues() > 0 && node.driver.engine().superseded().is_none() {
            self.reissue(index)?;
        }
        Ok(())
    }

    /// Writes again what node `index` wrote and a collision took out, as `concord run` does;
    /// the acknowledged changes they stand for are now the new ones.
    fn reissue(&mut self, index: usize) -> Result<(), Violation> {
        let time_ms = self.node_now(index).as_millis() as i64;
        let done = match self.nodes[index].docs.reissue_pending(time_ms) {
            Ok(done) => done,
            Err(error) => return Err(self.violation(format!("node {index}: {error}"))),
        };
        for reissued in done {
            self.summary.writes_reissued += 1;
            self.record_trace(format!(
                "{} node {index} writes {} again: {:?}",
                self.now_ms, reissued.id, reissued.change
            ));
            if reissued.refused.is_some() {
                // Written on top of a revoked node's changes that were cut off, and outside
                // the node's grant now: it cannot be written again.
                self.summary.acknowledged_cut_off += reissued.replaces.len() as u64;
            }
            if let Some(change) = reissued.change {
                let place = self.nodes[index]
                    .docs
                    .read(&reissued.id, |held| {
                        held.change(&change)
                            .map(|written| (written.actor_id().clone(), written.seq()))
                    })
                    .ok()
                    .flatten();
                if let Some(place) = place {
                    self.written.insert(change, place);
                }
            }
            for entry in &mut self.acknowledged {
                if reissued.replaces.contains(&entry.1) {
                    match reissued.change {
                        Some(change) => entry.1 = change,
                        // The document already shows what it wrote: nothing to follow.
                        None => entry.0 = usize::MAX,
                    }
                }
            }
            self.acknowledged.retain(|entry| entry.0 != usize::MAX);
        }
        self.step(index, vec![Input::LocalWrites])
    }

    /// Whether stores made again reuse their former writer (a sabotage of the tests).
    fn reusing_writers(&self) -> bool {
        #[cfg(feature = "sabotage")]
        return self.sabotage.reuse_writer;
        #[cfg(not(feature = "sabotage"))]
        false
    }

    /// A peer showed that node `index`'s own log is not its store's alone: as `concord run`
    /// does, the store takes a new writer. Only a store that reused its former writer can
    /// get here; anywhere else it means a change left before it was durable.
    fn take_new_writer(&mut self, index: usize, reason: &str) -> Result<(), Violation> {
        // Or a revocation took out changes of its own (written on top of the revoked node's).
        if !self.reusing_writers() && !reason.starts_with(REVOCATION_TOOK_OUT_OWN) {
            return Err(self.violation(format!(
                "node {index}: {reason} (a change of its own left before it was durable?)"
            )));
        }
        let fresh = self.random_node_id();
        self.summary.writers_superseded += 1;
        self.record_trace(format!(
            "{} node {index} takes writer {fresh}: {reason}",
            self.now_ms
        ));
        let node = &mut self.nodes[index];
        if let Err(error) = node.docs.switch_writer(node.id, fresh) {
            return Err(self.violation(format!("node {index}: {error}")));
        }
        node.writer = fresh;
        node.driver.set_writer(fresh, &node.docs);
        Ok(())
    }

    /// A node or writer id from the run's randomness.
    fn random_node_id(&mut self) -> NodeId {
        let mut bytes = [0u8; 16];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        NodeId(bytes)
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|node| node.id == id)
            .expect("peers are nodes")
    }

    fn schedule(&mut self, at: u64, happening: Happening) {
        self.next_order += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            order: self.next_order,
            happening,
        }));
    }

    /// Puts a frame on the wire: it leaves the sender's queue once the link has sent it at
    /// its bandwidth, and arrives a latency later, unless a fault takes it.
    fn send(&mut self, from: usize, to: usize, connection: u64, frame: Vec<u8>) {
        let key = (from.min(to), from.max(to));
        let link = self.links[&key];
        if link.connection != Some(connection) {
            return;
        }
        self.summary.messages += 1;
        self.summary.bytes += frame.len() as u64;
        let forward = from < to;
        let direction = usize::from(!forward);
        let start = link.busy_until[direction].max(self.now_ms);
        if start > self.now_ms {
            self.summary.queue_full_waits += 1;
        }
        let sent_at = start + (frame.len() as u64).div_ceil(link.bandwidth_bytes_per_ms);
        if let Some(link) = self.links.get_mut(&key) {
            link.busy_until[direction] = sent_at;
        }
        self.schedule(
            sent_at,
            Happening::Drained {
                node: from,
                peer: to,
                connection,
                bytes: frame.len(),
            },
        );
        let cut = if forward {
            link.cut_forward
        } else {
            link.cut_backward
        };
        if cut {
            return;
        }
        if self.faults_on && self.rng.chance(self.params.drop_percent) {
            self.fault("message dropped");
            return;
        }
        let copies = if self.faults_on && self.rng.chance(self.params.duplicate_percent) {
            self.fault("message duplicated");
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.params.latency_ms + self.rng.below(self.params.jitter_ms + 1);
            self.schedule(
                sent_at + delay,
                Happening::Deliver {
                    from,
                    to,
                    connection,
                    frame: frame.clone(),
                },
            );
        }
    }

    /// Moves simulated time forward by `ms`, delivering messages and firing timers on the way.
    fn advance(&mut self, ms: u64) -> Result<(), Violation> {
        let until = self.now_ms + ms;
        loop {
            let next_message = self.in_flight.peek().map(|Reverse(message)| message.at);
            let next_timer = self.next_timer();
            let next = [next_message, next_timer].into_iter().flatten().min();
            match next {
                Some(at) if at <= until => {
                    self.now_ms = self.now_ms.max(at);
                    if next_message == Some(at) {
                        let Reverse(message) = self.in_flight.pop().expect("peeked");
                        self.happen(message.happening)?;
                    } else {
                        self.fire_timers()?;
                    }
                }
                _ => break,
            }
        }
        self.now_ms = until;
        self.maintain_links()?;
        Ok(())
    }

    fn next_timer(&self) -> Option<u64> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.up)
            .filter_map(|(index, node)| {
                let due = node.driver.poll_timeout()?;
                let local_now = self.node_now(index).as_millis() as u64;
                Some(self.now_ms + due.as_millis().saturating_sub(u128::from(local_now)) as u64)
            })
            .min()
    }

    fn fire_timers(&mut self) -> Result<(), Violation> {
        for index in 0..self.nodes.len() {
            if !self.nodes[index].up {
                continue;
            }
            let due = self.nodes[index].driver.poll_timeout();
            if due.is_some_and(|due| due <= self.node_now(index)) {
                self.step(index, vec![Input::Timeout])?;
            }
        }
        Ok(())
    }

    fn happen(&mut self, happening: Happening) -> Result<(), Violation> {
        match happening {
            Happening::Deliver {
                from,
                to,
                connection,
                frame,
            } => self.deliver(from, to, connection, frame),
            Happening::Drained {
                node,
                peer,
                connection,
                bytes,
            } => {
                if !self.nodes[node].up {
                    return Ok(());
                }
                let peer = self.nodes[peer].id;
                self.step(
                    node,
                    vec![Input::Drained {
                        peer,
                        connection,
                        bytes,
                    }],
                )
            }
        }
    }

    fn deliver(
        &mut self,
        from: usize,
        to: usize,
        connection: u64,
        frame: Vec<u8>,
    ) -> Result<(), Violation> {
        let key = (from.min(to), from.max(to));
        if self.links[&key].connection != Some(connection) || !self.nodes[to].up {
            return Ok(());
        }
        let mut decoder = concord_proto::FrameDecoder::new();
        let decoded = decoder.push(&frame).and_then(|()| decoder.next_message());
        let Ok(Some(message)) = decoded else {
            return Err(self.violation("a frame the engine produced does not decode".to_owned()));
        };
        let peer = self.nodes[from].id;
        self.step(
            to,
            vec![Input::Received {
                peer,
                connection,
                message,
            }],
        )
    }

    /// Connects links that can be connected, gives up one-way links, restarts crashed nodes,
    /// and opens and closes edge offices' windows.
    fn maintain_links(&mut self) -> Result<(), Violation> {
        for index in 0..self.nodes.len() {
            if let Some(at) = self.nodes[index].restart_at {
                if at <= self.now_ms && !self.nodes[index].up {
                    self.restart(index)?;
                }
            }
        }
        let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
        for key in keys {
            let (a, b) = key;
            let link = self.links[&key];
            let edge_offline = self.faults_on
                && (self.nodes[a].edge || self.nodes[b].edge)
                && (self.now_ms / 1000) % 20 >= 2;
            let usable = self.nodes[a].up
                && self.nodes[b].up
                && !(link.cut_forward && link.cut_backward)
                && !edge_offline;
            match link.connection {
                Some(_) if !usable => self.disconnect(a, b)?,
                Some(_)
                    if link
                        .one_way_since
                        .is_some_and(|since| self.now_ms - since >= ONE_WAY_TIMEOUT_MS) =>
                {
                    self.fault("connection lost to a one-way cut");
                    self.disconnect(a, b)?;
                }
                None if usable
                    && !link.cut_forward
                    && !link.cut_backward
                    && self.now_ms >= link.reconnect_at =>
                {
                    self.connect(a, b)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn connect(&mut self, a: usize, b: usize) -> Result<(), Violation> {
        let connection = self.next_connection;
        self.next_connection += 1;
        if let Some(link) = self.links.get_mut(&(a, b)) {
            link.connection = Some(connection);
        }
        self.record_trace(format!("{} connect {a} {b}", self.now_ms));
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        self.step(
            a,
            vec![Input::Up {
                peer: id_b,
                connection,
            }],
        )?;
        self.step(
            b,
            vec![Input::Up {
                peer: id_a,
                connection,
            }],
        )
    }

    fn disconnect(&mut self, a: usize, b: usize) -> Result<(), Violation> {
        let reconnect_in = 100 + self.rng.below(2000);
        let Some(link) = self.links.get_mut(&(a, b)) else {
            return Ok(());
        };
        let Some(connection) = link.connection.take() else {
            return Ok(());
        };
        link.one_way_since = None;
        link.reconnect_at = self.now_ms + reconnect_in;
        self.record_trace(format!("{} disconnect {a} {b}", self.now_ms));
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        if self.nodes[a].up {
            self.step(
                a,
                vec![Input::Down {
                    peer: id_b,
                    connection,
                }],
            )?;
        }
        if self.nodes[b].up {
            self.step(
                b,
                vec![Input::Down {
                    peer: id_a,
                    connection,
                }],
            )?;
        }
        Ok(())
    }

    fn partition_fault(&mut self) {
        let keys: Vec<(usize, usize)> = self.links.keys().copied().collect();
        match self.rng.below(4) {
            0 => {
                // Symmetric: a random group is cut off from the rest.
                let group: BTreeSet<usize> = (0..self.nodes.len())
                    .filter(|_| self.rng.chance(40))
                    .collect();
                for (a, b) in &keys {
                    if group.contains(a) != group.contains(b) {
                        let link = self.links.get_mut(&(*a, *b)).expect("link");
                        link.cut_forward = true;
                        link.cut_backward = true;
                    }
                }
                self.fault("symmetric partition");
                self.record_trace(format!("{} partition {group:?}", self.now_ms));
            }
            1 => {
                // One way: one link drops one direction only.
                let key = keys[self.rng.index(keys.len())];
                let forward = self.rng.chance(50);
                let now = self.now_ms;
                let link = self.links.get_mut(&key).expect("link");
                if forward {
                    link.cut_forward = true;
                } else {
                    link.cut_backward = true;
                }
                link.one_way_since = Some(now);
                self.fault("one-way cut");
                self.record_trace(format!(
                    "{} one-way cut {key:?} forward={forward}",
                    self.now_ms
                ));
            }
            2 => {
                // Links cut one by one (one more per fault), restored later in random order.
                let key = keys[self.rng.index(keys.len())];
                let link = self.links.get_mut(&key).expect("link");
                link.cut_forward = true;
                link.cut_backward = true;
                self.fault("link cut");
                self.record_trace(format!("{} cut {key:?}", self.now_ms));
            }
            _ => {
                // Restore a random cut link: restorations come in random order.
                let cut: Vec<(usize, usize)> = keys
                    .iter()
                    .copied()
                    .filter(|key| {
                        let link = self.links[key];
                        link.cut_forward || link.cut_backward
                    })
                    .collect();
                if !cut.is_empty() {
                    let key = cut[self.rng.index(cut.len())];
                    let link = self.links.get_mut(&key).expect("link");
                    link.cut_forward = false;
                    link.cut_backward = false;
                    link.one_way_since = None;
                    self.fault("link restored");
                    self.record_trace(format!("{} restore {key:?}", self.now_ms));
                }
            }
        }
    }

    fn crash(&mut self) -> Result<(), Violation> {
        let index = self.rng.index(self.nodes.len());
        // The modified node keeps its one writer, so its revocation names all it wrote.
        if !self.nodes[index].up || self.is_modified(index) {
            return Ok(());
        }
        let unflushed = self.nodes[index].store.unflushed_batches();
        let keep = self.rng.index(unflushed + 1);
        self.fault("crash");
        self.record_trace(format!(
            "{} crash node {index} keeping {keep} of {unflushed} unflushed batches",
            self.now_ms
        ));
        for b in 0..self.nodes.len() {
            if b != index {
                self.disconnect(index.min(b), index.max(b))?;
            }
        }
        self.nodes[index].up = false;
        self.nodes[index].store.crash(keep);
        self.nodes[index].restart_at = Some(self.now_ms + 200 + self.rng.below(5000));
        if self.rng.chance(self.params.store_loss_percent) {
            self.lose_store(index)?;
        }
        Ok(())
    }

    /// The disk under `index`'s store dies: the node comes back with an empty store, or with
    /// its last backup. The acknowledged writes no other node holds are lost with it.
    fn lose_store(&mut self, index: usize) -> Result<(), Violation> {
        let restore = self.rng.chance(50) && self.nodes[index].backup.is_some();
        let store = match &self.nodes[index].backup {
            Some(backup) if restore => backup.durable_copy(),
            _ => MemoryStore::new(),
        };
        self.summary.stores_lost += 1;
        self.summary.stores_restored += u64::from(restore);
        self.fault("store lost");
        self.record_trace(format!(
            "{} node {index} loses its store{}",
            self.now_ms,
            if restore {
                ", restored from its backup"
            } else {
                ""
            }
        ));
        self.nodes[index].store = store;
        self.nodes[index].store_lost = true;
        for entry in &mut self.acknowledged {
            if entry.3 == index {
                entry.3 = index + NODES_MAX;
            }
        }
        self.forget_acknowledged_unheld(Some(index))
    }

    /// Drops the acknowledged writes no node can hand on any more: held by none but a revoked
    /// node (nobody takes from it again) or a store just lost (`lost`, read as it is now). A
    /// down node holds what it made durable.
    fn forget_acknowledged_unheld(&mut self, lost: Option<usize>) -> Result<(), Violation> {
        let mut holders = Vec::with_capacity(self.nodes.len());
        for (other, node) in self.nodes.iter().enumerate() {
            let docs = if lost == Some(other) || !node.up {
                // A store brought back from a backup still names the writer it had then.
                let writer = concord::store::claim_writer(&node.store, node.id, node.writer)
                    .map(|(writer, _)| writer);
                let params = self.node_params(other);
                match writer.and_then(|writer| {
                    open_docs(&node.store, node.id, writer, &params, self.sabotage)
                }) {
                    Ok(docs) => Some(docs),
                    Err(error) => {
                        return Err(
                            self.violation(format!("node {other}'s store does not open: {error}"))
                        )
                    }
                }
            } else {
                None
            };
            holders.push(docs);
        }
        let revoked = self
            .scoped
            .as_ref()
            .and_then(|scoped| scoped.modified)
            .filter(|_| self.summary.revoked);
        let before = self.acknowledged.len();
        let mut kept = Vec::with_capacity(before);
        for entry in std::mem::take(&mut self.acknowledged) {
            let (record, hash, _, _) = entry;
            let id = &self.ids[record];
            let held = self
                .nodes
                .iter()
                .zip(&holders)
                .enumerate()
                .filter(|(other, _)| revoked != Some(*other))
                .any(|(_, (node, opened))| {
                    let docs = opened.as_ref().unwrap_or(&node.docs);
                    docs.read(id, |held| holds(held, &hash, &self.written))
                        .unwrap_or(false)
                });
            if held {
                kept.push(entry);
            }
        }
        self.summary.lost_with_store += (before - kept.len()) as u64;
        self.acknowledged = kept;
        Ok(())
    }

    fn restart(&mut self, index: usize) -> Result<(), Violation> {
        let store_lost = std::mem::take(&mut self.nodes[index].store_lost);
        if store_lost {
            // A store made again writes under a new writer, as `concord run` (an empty store)
            // and `concord restore` (a backup) give it.
            #[cfg_attr(not(feature = "sabotage"), allow(unused_mut))]
            let mut writer = self.random_node_id();
            #[cfg(feature = "sabotage")]
            if self.sabotage.reuse_writer {
                writer = self.nodes[index].writer;
            }
            let node = &self.nodes[index];
            // A backup under the reused writer already names it.
            let named = concord::store::incarnation::current_writer(&node.store)
                .is_ok_and(|current| current == Some(writer));
            if !named {
                if let Err(error) = concord::store::new_incarnation(&node.store, node.id, writer) {
                    return Err(self.violation(format!("node {index}: {error}")));
                }
            }
            self.record_trace(format!("{} node {index} writes as {writer}", self.now_ms));
            self.nodes[index].writer = writer;
        }
        let node = &self.nodes[index];
        let docs = match open_docs(
            &node.store,
            node.id,
            node.writer,
            &self.node_params(index),
            self.sabotage,
        ) {
            Ok(docs) => docs,
            Err(error) => {
                return Err(self.violation(format!(
                    "node {index} does not reopen after a crash: {error}"
                )))
            }
        };
        let driver = new_driver(node.id, node.writer, &docs, &self.params, self.sabotage);
        if let Some(scoped) = &self.scoped {
            docs.set_door(scoped.door(node, index));
        }
        let node = &mut self.nodes[index];
        node.docs = docs;
        node.driver = driver;
        node.up = true;
        node.restart_at = None;
        self.record_trace(format!("{} restart node {index}", self.now_ms));
        if store_lost {
            // What it wrote and others held comes back from them; the end checks it.
            return self.apply_cut_offs(index);
        }
        // Safety: every write this node acknowledged survived the crash.
        let mine: Vec<(usize, ChangeHash)> = self
            .acknowledged
            .iter()
            .filter(|(_, _, _, by)| *by == index)
            .map(|(record, hash, _, _)| (*record, *hash))
            .collect();
        for (record, hash) in mine {
            let present = self.nodes[index]
                .docs
                .read(&self.ids[record], |held| holds(held, &hash, &self.written));
            // A record that left the node's read scope keeps only its own changes, for its log.
            let kept = || {
                self.nodes[index]
                    .docs
                    .keeps_own_change(&self.ids[record].to_doc_key(), &hash)
            };
            if !matches!(present, Ok(true)) && !matches!(kept(), Ok(true)) {
                return Err(self.violation(format!(
                    "node {index} lost acknowledged change {hash} of {} in a crash",
                    self.ids[record]
                )));
            }
        }
        // As `concord run` reads its grants at start: what a revocation cut off comes out
        // (what this node wrote on top of it is written again).
        self.apply_cut_offs(index)
    }

    fn workload(&mut self) -> Result<(), Violation> {
        let index = self.rng.index(self.nodes.len());
        if !self.nodes[index].up {
            return Ok(());
        }
        if self.faults_on && self.rng.below(1000) < self.params.backup_permille {
            let backup = self.nodes[index].store.durable_copy();
            self.nodes[index].backup = Some(backup);
            self.record_trace(format!("{} node {index} backed up", self.now_ms));
        }
        let record = self.rng.index(self.ids.len());
        if self.rng.below(1000) < self.params.burst_permille {
            return self.burst(index, record);
        }
        let delete = self.rng.chance(15);
        let actor = self.nodes[index].writer.actor(self.rng.below(2) as u16);
        let mut write = RecordWrite::default();
        let mut size = 0;
        if !delete {
            let field = format!("f{}", self.rng.below(4));
            if self.rng.below(1000) < self.params.large_value_permille {
                size = self.large_value_size();
                write.set.push((field, json!("L".repeat(size))));
            } else if self.rng.chance(15) {
                write.remove.push(field);
            } else {
                write.set.push((field, json!(self.rng.below(1000))));
            }
            write.replace = self.rng.chance(5);
            // In a scoped run, writes set a record's region too, some moving it.
            if self.scoped.is_some() && (write.replace || self.rng.chance(30)) {
                let region = REGIONS[self.rng.index(REGIONS.len())];
                write.set.push(("region".to_owned(), json!(region)));
            }
        }
        let outcome = match self.write(index, record, &actor, delete.then_some(()), &write) {
            Ok(outcome) => outcome,
            Err(StoreError::OutsideGrant(_)) => {
                self.summary.scope_refused_writes += 1;
                return Ok(());
            }
            Err(error) if size > 0 => {
                return self.refused(index, record, size, &error);
            }
            Err(error) => {
                return Err(self.violation(format!("node {index}: a write failed: {error}")))
            }
        };
        if size > 0 {
            self.summary.large_writes += 1;
        }
        if outcome.is_some() {
            self.step(index, vec![Input::LocalWrites])?;
        }
        Ok(())
    }

    /// A value's size for a large write: up to the largest change, halved a random number
    /// of times; one in ten is over the limit, and must be refused.
    fn large_value_size(&mut self) -> usize {
        let largest = concord_proto::CHANGE_BYTES_MAX - 1024;
        if self.rng.chance(10) {
            largest + 1024 + self.rng.index(4096) + 1
        } else {
            largest >> self.rng.below(10)
        }
    }

    /// A write over the change limit: refused, and the record is as it was.
    fn refused(
        &mut self,
        index: usize,
        record: usize,
        size: usize,
        error: &StoreError,
    ) -> Result<(), Violation> {
        let over = size + 1024 > concord_proto::CHANGE_BYTES_MAX;
        let refusal = matches!(
            error,
            StoreError::ChangeTooLarge { .. } | StoreError::Record(_)
        );
        if !over || !refusal {
            return Err(self.violation(format!(
                "node {index}: a write of a {size}-byte value failed: {error}"
            )));
        }
        self.summary.refused_writes += 1;
        self.record_trace(format!(
            "{} node {index} refused a {size}-byte write of {}",
            self.now_ms, self.ids[record]
        ));
        // Nothing of it may be left in the store, nor in the log.
        let mark = self.nodes[index]
            .docs
            .origin_mark(&self.nodes[index].writer);
        let logged = self.nodes[index]
            .docs
            .log_after(&self.nodes[index].writer, mark, 1, usize::MAX)
            .map_err(|error| self.violation(format!("node {index}: {error}")))?;
        if !logged.is_empty() {
            return Err(self.violation(format!("node {index}: a refused write left a log entry")));
        }
        Ok(())
    }

    /// Many updates of one record in a row, each acknowledged, then shipped together: a long
    /// history that must reach every node.
    fn burst(&mut self, index: usize, record: usize) -> Result<(), Violation> {
        let writes = 1 + self.rng.below(self.params.burst_writes_max.max(1));
        let actor = self.nodes[index].writer.actor(0);
        for count in 0..writes {
            let write = RecordWrite {
                set: vec![("stock".to_owned(), json!(count))],
                ..RecordWrite::default()
            };
            match self.write(index, record, &actor, None, &write) {
                Ok(_) => {}
                Err(StoreError::OutsideGrant(_)) => {
                    self.summary.scope_refused_writes += 1;
                    break;
                }
                Err(error) => {
                    return Err(self.violation(format!("node {index}: a write failed: {error}")))
                }
            }
            self.summary.burst_writes += 1;
        }
        self.step(index, vec![Input::LocalWrites])
    }

    /// One durable write (or delete) on `index`, recorded as acknowledged if it changed
    /// anything; the change it made, if any.
    fn write(
        &mut self,
        index: usize,
        record: usize,
        actor: &automerge::ActorId,
        delete: Option<()>,
        write: &RecordWrite,
    ) -> Result<Option<ChangeHash>, StoreError> {
        let id = self.ids[record].clone();
        let time = self.node_now(index).as_millis() as i64;
        let result = if delete.is_some() {
            self.nodes[index]
                .docs
                .write(&id, actor, time, Durability::Durable, |tx| {
                    document::apply_delete(tx)
                })
        } else {
            write.check()?;
            self.nodes[index]
                .docs
                .write(&id, actor, time, Durability::Durable, |tx| {
                    document::apply_write(tx, write).map(|()| true)
                })
        };
        let (_, outcome) = result?;
        let Some(hash) = outcome.change else {
            return Ok(None);
        };
        // No change a node accepted may have pushed its clock further ahead than the bound.
        let bound = concord::sync::CLOCK_AHEAD_MAX_DEFAULT.as_millis() as u64;
        let written = self.nodes[index]
            .docs
            .read(&id, |held| held.change(&hash))?;
        let Some(written) = written else {
            return Err(StoreError::Corrupt(format!(
                "the change {hash} a write just made is not in its document"
            )));
        };
        self.written
            .insert(hash, (written.actor_id().clone(), written.seq()));
        let stamp =
            concord::record::stamp::ChangeStamp::of_change(written.message(), written.timestamp());
        if stamp.hlc > time as u64 + bound + 1 {
            return Err(StoreError::Corrupt(format!(
                "a write at {time} ms was stamped {}: a change it accepted moved its clock \
                 more than {bound} ms ahead",
                stamp.hlc
            )));
        }
        let delete = delete.is_some();
        if delete {
            self.summary.deletes += 1;
        } else {
            self.summary.writes += 1;
        }
        if let Some(scoped) = self
            .scoped
            .as_mut()
            .filter(|scoped| scoped.modified == Some(index))
        {
            // What the modified node writes is judged by the others, not acknowledged to
            // anyone: the end checks which of it every other node holds.
            let writer = self.nodes[index].writer;
            let place = (writer, self.nodes[index].docs.origin_mark(&writer));
            scoped.forged.push((record, hash, place));
            self.summary.forged_writes += 1;
        } else {
            self.summary.acknowledged += 1;
            self.acknowledged.push((record, hash, delete, index));
        }
        let deps = if self.params.print_trace {
            format!(" after {}", short_hashes(written.deps()))
        } else {
            String::new()
        };
        self.record_trace(format!(
            "{} node {index} {} {id} -> {hash}{deps}",
            self.now_ms,
            if delete { "delete" } else { "write" }
        ));
        Ok(Some(hash))
    }

    fn record_state(&self, index: usize, record: usize) -> Result<RecordView, Violation> {
        self.nodes[index]
            .docs
            .read(&self.ids[record], |held| {
                let doc = held.local();
                let heads = held.heads();
                let resolved = self
                    .policies
                    .iter()
                    .map(|policies| concord::policy::read(doc, None, COLLECTION, policies))
                    .collect();
                (heads, document::read(doc), resolved)
            })
            .map_err(|error| {
                self.violation(format!(
                    "node {index} cannot read {}: {error}",
                    self.ids[record]
                ))
            })
    }

    fn converged(&self) -> Result<bool, Violation> {
        // No origin's log stays behind anywhere. An origin held up to 0 is one held by no
        // node's prefix: a node may hold entries of it above a hole that a lost store left
        // for good (their changes reach every node by repair all the same).
        let held = |node: &SimNode| -> Vec<(NodeId, u64)> {
            node.docs
                .origin_marks()
                .into_iter()
                .filter(|(_, mark)| *mark > 0)
                .collect()
        };
        // Among the nodes that read every record: a narrowed node's marks say only how far
        // senders covered each log for it (what it holds is checked record by record below).
        let marks = held(&self.nodes[0]);
        if (1..self.nodes.len())
            .any(|index| self.reads_all(index) && held(&self.nodes[index]) != marks)
        {
            return Ok(false);
        }
        for record in 0..self.ids.len() {
            let first = self.record_state(0, record)?;
            for index in 1..self.nodes.len() {
                if !self.holds_what_it_may(index, record, &first)? {
                    return Ok(false);
                }
            }
        }
        // And they hold everything the modified node holds but what it wrote itself and what
        // they refused (written on top of its changes that were cut off).
        Ok(self.modified_holds_more().is_empty())
    }

    /// Whether node `index` holds of `record` what it should once converged, given `full`,
    /// node 0's view of it (node 0 is never granted: it holds every record). A node that
    /// reads every record agrees with node 0; a node narrowed by its grant agrees on every
    /// record its grant lets it read as node 0 holds it, and holds no other live record (a
    /// deleted one it may hold, as node 0 does, or not at all). The modified node keeps what
    /// it wrote outside its grant: `converged` checks it apart.
    fn holds_what_it_may(
        &self,
        index: usize,
        record: usize,
        full: &RecordView,
    ) -> Result<bool, Violation> {
        if self.is_modified(index) {
            return Ok(true);
        }
        let held = self.record_state(index, record)?;
        let Some(scoped) = &self.scoped else {
            return Ok(held == *full);
        };
        let scopes = scoped.scopes();
        let node = self.nodes[index].id;
        if scopes.reads_all(&node) {
            return Ok(held == *full);
        }
        Ok(match &full.1 {
            Some(fields) if scopes.may_read(&node, COLLECTION, fields) => held == *full,
            Some(_) => held.0.is_empty(),
            None => held.0.is_empty() || held == *full,
        })
    }

    /// Whether some node's grant narrows what it reads to some records of a collection.
    fn has_partial_replicas(&self) -> bool {
        self.scoped.as_ref().is_some_and(|scoped| {
            let scopes = scoped.scopes();
            self.nodes.iter().any(|node| {
                scopes
                    .grant(&node.id)
                    .is_some_and(|grant| grant.read.iter().any(|read| read.filter.is_some()))
            })
        })
    }

    /// Whether node `index` reads every record (no grant narrows it, or the run has none).
    fn reads_all(&self, index: usize) -> bool {
        self.scoped
            .as_ref()
            .is_none_or(|scoped| scoped.scopes().reads_all(&self.nodes[index].id))
    }

    /// The parameters node `index`'s store opens with (the modified node never compacts).
    fn node_params(&self, index: usize) -> Params {
        if self.is_modified(index) {
            self.params.without_compaction()
        } else {
            self.params.clone()
        }
    }

    /// Whether node `index` is the one modified to ignore its grant (in a scoped run).
    fn is_modified(&self, index: usize) -> bool {
        self.scoped
            .as_ref()
            .is_some_and(|scoped| scoped.modified == Some(index))
    }

    /// The authority revokes the modified node, its changes counting up to what node 0
    /// holds of its log now; every node holds the revocation at once (as it would hold any
    /// record), and those running take out what it cut off.
    fn revoke(&mut self) -> Result<(), Violation> {
        let Some(modified) = self.scoped.as_ref().and_then(|scoped| scoped.modified) else {
            return Ok(());
        };
        let writer = self.nodes[modified].writer;
        let cut_off = self.nodes[0].docs.origin_mark(&writer);
        let revocation = Revocation {
            cluster: CLUSTER,
            node: self.nodes[modified].id.0,
            cut_off: vec![(writer.0, cut_off)],
            issued_ms: self.now_ms,
        };
        if let Some(scoped) = &self.scoped {
            scoped
                .scopes
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(Verified::Revocation(revocation), &[]);
        }
        self.summary.revoked = true;
        self.record_trace(format!(
            "{} node {modified} revoked, its log counting up to {cut_off}",
            self.now_ms
        ));
        self.forget_acknowledged_unheld(None)?;
        for index in 0..self.nodes.len() {
            if self.nodes[index].up {
                self.apply_cut_offs(index)?;
                self.step(index, Vec::new())?;
            }
        }
        Ok(())
    }

    /// Takes out of node `index`'s store what revocations cut off, as `concord run` does when
    /// it reads a revocation (the modified node does not: it ignores its own).
    fn apply_cut_offs(&mut self, index: usize) -> Result<(), Violation> {
        let Some(scoped) = self.scoped.as_ref().filter(|_| !self.is_modified(index)) else {
            return Ok(());
        };
        let cut_offs = scoped.scopes().cut_offs();
        let mut own = false;
        for (writer, cut_off) in cut_offs {
            match self.nodes[index].docs.take_out_past(&writer, cut_off) {
                Ok((taken, own_here)) => {
                    own |= own_here;
                    if taken > 0 {
                        self.record_trace(format!(
                            "{} node {index} takes out {taken} changes past the cut-off",
                            self.now_ms
                        ));
                    }
                }
                Err(error) => return Err(self.violation(format!("node {index}: {error}"))),
            }
        }
        if own {
            self.take_new_writer(index, REVOCATION_TOOK_OUT_OWN)?;
        }
        Ok(())
    }

    /// After convergence, in a scoped run: each change the modified node wrote is held by
    /// every other node exactly when the rule allows it (its author's grant, judged on the
    /// record as of its dependencies and as it leaves them, and the revocation's cut-off),
    /// and none that depends on one left out.
    fn check_scopes(&mut self) -> Result<(), Violation> {
        let Some(scoped) = &self.scoped else {
            return Ok(());
        };
        let Some(modified) = scoped.modified else {
            return Ok(());
        };
        let author = self.nodes[modified].id;
        let scopes = scoped.scopes().clone();
        let mut left_out: BTreeSet<ChangeHash> = BTreeSet::new();
        let mut refused = 0;
        for (record, hash, place) in scoped.forged.clone() {
            let id = &self.ids[record];
            let logged = self.nodes[modified]
                .docs
                .log_hash(&place.0, place.1)
                .map_err(|error| self.violation(format!("node {modified}: {error}")))?;
            // A place at or below the floor was truncated, every node holding it.
            let truncated = place.1 <= self.nodes[modified].docs.log_floor(&place.0);
            if logged != Some(hash) && !truncated {
                return Err(self.violation(format!(
                    "the modified node's change {hash} is not at {}:{} of its log",
                    place.0, place.1
                )));
            }
            let written = &self.written;
            let judged = self.nodes[modified]
                .docs
                .read(id, |held| {
                    let Some(change) = held.change(&hash) else {
                        // Inside the modified node's compacted history, it cannot be judged
                        // again: the other nodes must agree on it among themselves.
                        return holds(held, &hash, written).then_some(None);
                    };
                    if change.deps().iter().any(|dep| left_out.contains(dep)) {
                        return Some(Some(false));
                    }
                    let mut fork = held.fork_before(&change)?;
                    let before = document::read(fork.local());
                    fork.apply(vec![change]).ok()?;
                    let after = document::read(fork.local());
                    Some(Some(
                        scopes
                            .judge_change(
                                Some(&author),
                                Some(place),
                                COLLECTION,
                                before.as_ref(),
                                after.as_ref(),
                            )
                            .is_ok(),
                    ))
                })
                .map_err(|error| self.violation(format!("node {modified}: {error}")))?;
            let Some(mut allowed) = judged else {
                return Err(self.violation(format!(
                    "the modified node lost its own change {hash} of {id}"
                )));
            };
            if allowed == Some(false) {
                left_out.insert(hash);
                refused += 1;
            }
            for index in (0..self.nodes.len()).filter(|index| *index != modified) {
                let (holds, holds_record) = self.nodes[index]
                    .docs
                    .read(id, |held| {
                        (holds(held, &hash, written), !held.heads().is_empty())
                    })
                    .map_err(|error| self.violation(format!("node {index}: {error}")))?;
                if !holds && !holds_record {
                    // A node narrowed by its grant holds nothing of a record it may not read
                    // (`converged` checked that it holds what it may).
                    continue;
                }
                let expected = *allowed.get_or_insert(holds);
                if holds != expected {
                    return Err(self.violation(format!(
                        "node {index} {} the modified node's change {hash} of {id}, which the \
                         rule {}",
                        if holds { "holds" } else { "lacks" },
                        if expected { "allows" } else { "refuses" }
                    )));
                }
            }
        }
        self.summary.forged_refused = refused;
        Ok(())
    }

    fn divergence(&self) -> Result<String, Violation> {
        for record in 0..self.ids.len() {
            let first = self.record_state(0, record)?;
            for index in 1..self.nodes.len() {
                let other = self.record_state(index, record)?;
                if !self.holds_what_it_may(index, record, &first)? {
                    let all: Vec<BTreeSet<ChangeHash>> = (0..self.nodes.len())
                        .map(|node| {
                            self.nodes[node]
                                .docs
                                .read(&self.ids[record], |held| {
                                    held.changes(&[])
                                        .iter()
                                        .map(|change| change.hash())
                                        .collect()
                                })
                                .unwrap_or_default()
                        })
                        .collect();
                    let union: BTreeSet<ChangeHash> = all.iter().flatten().copied().collect();
                    let doc_key = self.ids[record].to_doc_key();
                    let refused: Vec<Vec<(String, &'static str)>> = self
                        .nodes
                        .iter()
                        .map(|node| {
                            node.docs
                                .refused_changes(1000)
                                .unwrap_or_default()
                                .into_iter()
                                .filter(|entry| entry.doc_key == doc_key)
                                .map(|entry| {
                                    (
                                        entry.hash.to_string()[..8].to_owned(),
                                        entry.refused.reason.as_str(),
                                    )
                                })
                                .collect()
                        })
                        .collect();
                    // Changes after each node's compacted history that others hold there,
                    // and each node's heads and cut.
                    let missing: Vec<(usize, Vec<String>, String, String)> = all
                        .iter()
                        .enumerate()
                        .map(|(node, held)| {
                            let (heads, cut) = self.nodes[node]
                                .docs
                                .read(&self.ids[record], |held| {
                                    (
                                        short_hashes(&held.heads()),
                                        held.epoch().map_or_else(String::new, |epoch| {
                                            short_hashes(epoch.cut())
                                        }),
                                    )
                                })
                                .unwrap_or_default();
                            (
                                node,
                                union
                                    .difference(held)
                                    .map(|hash| hash.to_string()[..8].to_owned())
                                    .collect(),
                                heads,
                                cut,
                            )
                        })
                        .collect();
                    let marks: Vec<Vec<(String, u64)>> = self
                        .nodes
                        .iter()
                        .map(|node| {
                            node.docs
                                .origin_marks()
                                .into_iter()
                                .map(|(o, m)| (o.to_string()[..6].to_owned(), m))
                                .collect()
                        })
                        .collect();
                    let queues: Vec<Vec<(usize, usize, bool)>> = self
                        .nodes
                        .iter()
                        .map(|node| {
                            self.nodes
                                .iter()
                                .enumerate()
                                .map(|(peer, other)| {
                                    (
                                        peer,
                                        node.driver.queued(&other.id),
                                        node.driver.engine().has_output(&other.id),
                                    )
                                })
                                .collect()
                        })
                        .collect();
                    let reads: Vec<String> = self
                        .nodes
                        .iter()
                        .map(|node| {
                            self.scoped.as_ref().map_or_else(String::new, |scoped| {
                                scoped.scopes().grant(&node.id).map_or_else(
                                    || "all".to_owned(),
                                    |grant| {
                                        grant
                                            .read
                                            .iter()
                                            .map(ToString::to_string)
                                            .collect::<Vec<_>>()
                                            .join(",")
                                    },
                                )
                            })
                        })
                        .collect();
                    // Node 0's and this node's local changes: hash, original, local deps.
                    let local = |node: usize| {
                        self.nodes[node]
                            .docs
                            .read(&self.ids[record], |held| {
                                held.local()
                                    .get_changes(&[])
                                    .iter()
                                    .map(|change| {
                                        let original = held
                                            .epoch()
                                            .and_then(|epoch| epoch.back(change).ok())
                                            .map(|original| short_hashes(&[original.hash()]))
                                            .unwrap_or_default();
                                        format!(
                                            "{}={} <- [{}]",
                                            short_hashes(&[change.hash()]),
                                            original,
                                            short_hashes(change.deps())
                                        )
                                    })
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default()
                    };
                    let locals = (local(0), local(index));
                    return Ok(format!(
                        "locals {locals:?}; queues {queues:?}; missing, heads and cut per node {missing:?}; refused per node \
                         {refused:?}; reads {reads:?}; modified node {:?}; marks {marks:?}; \
                         ids {:?}; ",
                        self.scoped.as_ref().and_then(|scoped| scoped.modified),
                        self.nodes
                            .iter()
                            .map(|n| n.id.to_string()[..6].to_owned())
                            .collect::<Vec<_>>()
                    ) + format!(
                        "{}: node 0 has {} (heads {}), node {index} has {} (heads {})",
                        self.ids[record],
                        brief(&first.1),
                        short_hashes(&first.0),
                        brief(&other.1),
                        short_hashes(&other.0)
                    )
                    .as_str());
                }
            }
        }
        // The records agree: some origin's log is held further on some node than another.
        let all: Vec<BTreeMap<NodeId, u64>> = self
            .nodes
            .iter()
            .map(|node| node.docs.origin_marks().into_iter().collect())
            .collect();
        let origins: BTreeSet<NodeId> =
            all.iter().flat_map(|marks| marks.keys().copied()).collect();
        let mut report = String::new();
        let modified = self.scoped.as_ref().and_then(|scoped| scoped.modified);
        for (id, hash, holders) in self.modified_holds_more() {
            report.push_str(&format!(
                "{id}: change {} that the modified node {modified:?} holds is neither held nor \
                 refused by node 0 (held by nodes {holders:?}); ",
                &hash.to_string()[..8]
            ));
        }
        for origin in origins {
            let marks: Vec<u64> = all
                .iter()
                .map(|marks| marks.get(&origin).copied().unwrap_or(0))
                .collect();
            if marks.iter().any(|mark| *mark != marks[0]) {
                report.push_str(&format!(
                    "origin {} held up to {marks:?} on the nodes; ",
                    &origin.to_string()[..8]
                ));
            }
        }
        if report.is_empty() {
            report.push_str("none found");
        } else {
            let reads: Vec<bool> = (0..self.nodes.len())
                .map(|index| self.reads_all(index))
                .collect();
            report.push_str(&format!("reads every record: {reads:?}"));
            for (index, node) in self.nodes.iter().enumerate() {
                report.push_str(&format!(
                    "\nnode {index} writes as {}: {:?}",
                    &node.writer.to_string()[..8],
                    node.driver.engine().stats()
                ));
            }
        }
        Ok(report)
    }

    /// What the modified node holds that node 0 neither holds nor refused (not counting what it
    /// forged): each such change with its record and the nodes that hold it. Once the modified
    /// node is revoked nobody takes anything from it, so a change only it still holds (its
    /// origin lost its store) is lost with the revocation, not owed.
    fn modified_holds_more(&self) -> Vec<(RecordId, ChangeHash, Vec<usize>)> {
        let Some((scoped, modified)) = self
            .scoped
            .as_ref()
            .and_then(|scoped| Some((scoped, scoped.modified?)))
        else {
            return Vec::new();
        };
        let forged: BTreeSet<ChangeHash> = scoped.forged.iter().map(|(_, hash, _)| *hash).collect();
        let holds = |index: usize, id: &RecordId, change: &automerge::Change| {
            self.nodes[index]
                .docs
                .read(id, |held| held.holds_change(change))
                .unwrap_or(false)
        };
        let mut owed = Vec::new();
        for id in &self.ids {
            let doc_key = id.to_doc_key();
            let changes = self.nodes[modified]
                .docs
                .read(id, |held| held.changes(&[]))
                .unwrap_or_default();
            for change in changes {
                let hash = change.hash();
                let refused = self.nodes[0]
                    .docs
                    .refused_contains(&doc_key, &hash)
                    .unwrap_or(false);
                if forged.contains(&hash) || holds(0, id, &change) || refused {
                    continue;
                }
                let holders: Vec<usize> = (0..self.nodes.len())
                    .filter(|index| holds(*index, id, &change))
                    .collect();
                if self.summary.revoked && holders == [modified] {
                    continue;
                }
                owed.push((id.clone(), hash, holders));
            }
        }
        owed
    }

    /// After convergence: no acknowledged change is missing, and deletes stayed deleted unless
    /// re-created by a write causally after them.
    fn check_history(&mut self) -> Result<(), Violation> {
        let acknowledged = self.acknowledged.clone();
        for (record, hash, was_delete, by) in acknowledged.iter().copied() {
            let id = &self.ids[record];
            // A delete written again in one change with a later write of its node (both taken
            // out by a collision or a revocation) is followed by that write.
            let was_delete = &(was_delete
                && !acknowledged
                    .iter()
                    .any(|(_, other, delete, _)| *other == hash && !delete));
            // A store made again under its old writer (a sabotage) writes changes that may
            // lose to what its former self wrote: refused everywhere, and written again only
            // if their author still holds them when it learns.
            let refused = self.reusing_writers()
                && self.nodes.iter().any(|node| {
                    node.docs
                        .refused_contains(&id.to_doc_key(), &hash)
                        .unwrap_or(false)
                });
            if refused {
                self.summary.acknowledged_refused += 1;
                continue;
            }
            // Written on top of a revoked node's changes past its cut-off, which come out with
            // them everywhere; its author writes it again if it still holds it (not when its
            // store was lost before the revocation reached it). A narrowed node may never
            // have been sent it.
            let cut_off = self.summary.revoked
                && (0..self.nodes.len())
                    .filter(|index| !self.is_modified(*index) && self.reads_all(*index))
                    .all(|index| {
                        self.nodes[index]
                            .docs
                            .refused_contains(&id.to_doc_key(), &hash)
                            .unwrap_or(false)
                    });
            if cut_off {
                self.summary.acknowledged_cut_off += 1;
                continue;
            }
            let hash = &hash;
            let written = &self.written;
            let check = self.nodes[0].docs.read(id, |held| {
                let doc = held.local();
                if !holds(held, hash, written) {
                    return Err(format!(
                        "acknowledged change {hash} of {id} (by node {}) is missing",
                        by % NODES_MAX
                    ));
                }
                // A delete inside the compacted history is not checked here: compaction keeps
                // what the history read at the cut (it refuses a base that reads otherwise).
                let local_delete = held.local_heads(std::slice::from_ref(hash));
                if let (true, Some([delete])) = (
                    *was_delete && document::state(doc) == document::RecordState::Live,
                    local_delete.as_deref(),
                ) {
                    // Some change that made the record live must descend from the delete.
                    // A change placed on a compacted history beside the cut (concurrent with
                    // it) reads there on the whole cut: one that writes the tombstone false
                    // after the delete re-created the record too.
                    let recreated = doc.get_changes(&[]).iter().any(|change| {
                        let effect = document::describe_change(doc, change.deps(), change.hash());
                        let revives = change.decode().operations.iter().any(|op| {
                            op.key == automerge::legacy::Key::Map(document::DELETED_KEY.into())
                                && matches!(
                                    op.action,
                                    automerge::legacy::OpType::Put(
                                        automerge::ScalarValue::Boolean(false)
                                    )
                                )
                        });
                        (matches!(effect.action, "create" | "recreate") || revives)
                            && doc
                                .fork_at(&[change.hash()])
                                .is_ok_and(|past| document::holds_change(&past, delete))
                    });
                    if !recreated {
                        return Err(format!(
                            "{id} is live although deleted by {hash} and never re-created after it"
                        ));
                    }
                }
                Ok(())
            });
            match check {
                Ok(Ok(())) => {}
                Ok(Err(message)) => return Err(self.violation(message)),
                Err(error) => return Err(self.violation(format!("cannot read {id}: {error}"))),
            }
        }
        Ok(())
    }
}

/// Hashes by their first 8 hex digits.
fn short_hashes(hashes: &[ChangeHash]) -> String {
    let short: Vec<String> = hashes
        .iter()
        .map(|hash| hash.to_string()[..8].to_owned())
        .collect();
    short.join(" ")
}

/// A record's JSON cut short: values may be megabytes.
fn brief(record: &Option<serde_json::Map<String, serde_json::Value>>) -> String {
    let mut text = format!("{record:?}");
    if text.len() > 200 {
        let mut cut = 200;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(all(test, feature = "sabotage"))]
mod sabotage_tests;
#[cfg(test)]
mod tests;
