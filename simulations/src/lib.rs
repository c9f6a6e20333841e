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

mod checks;
mod network;
mod nodes;
pub mod rng;
mod scopes;
mod workload;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use automerge::{ActorId, ChangeHash};
use concord::config::{PolicyKind, PolicySection};
use concord::policy::Policies;
use concord::record::document::{self, RecordWrite};
use concord::record::held::HeldDoc;
use concord::record::{Collection, Key};
use concord::record::{NodeId, RecordId};
use concord::scope::{
    grant_key, store_signed, Grant, Registry, Revocation, Scope, ScopeError, Scopes, Signed,
    Verified, Verify, GRANTS_COLLECTION,
};
use concord::store::{DocStore, DocStoreConfig, Durability, MemoryStore, StoreError};
use concord::sync::{Config, Driver, Engine, Input, Output};
use ring::hmac;
use serde_json::json;

pub use rng::SimRng;

use checks::short_hashes;
use network::{InFlight, Link};
use nodes::{new_driver, open_docs};
use scopes::{Scoped, REGIONS};

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
    /// Its grants and revocations, as its store holds them (in a scoped run).
    registry: Option<Registry>,
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

/// Runs one simulation.
pub fn run(seed: u64, params: &Params) -> Result<Summary, Violation> {
    run_sabotaged(seed, params, Default::default())
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
            registry: None,
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
    let scoped = rng.chance(params.scoped_percent).then(|| {
        let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
        Scoped::draw(&mut rng, &ids, params)
    });
    if let Some(index) = scoped.as_ref().and_then(|scoped| scoped.modified) {
        // The modified node sees no grant of its own and may find its door open: it would
        // compact what no honest node may, and withhold its own changes by it. What it does
        // to its own store is not under test; how the others judge it is.
        let node: &mut SimNode = &mut nodes[index];
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
    for index in 0..sim.nodes.len() {
        sim.open_registry(index)?;
    }
    sim.run()?;
    sim.summary.trace_hash = sim.trace_hash;
    Ok(sim.summary)
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
        self.check_registries()?;
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
}

#[cfg(all(test, feature = "sabotage"))]
mod sabotage_tests;
#[cfg(test)]
mod tests;
