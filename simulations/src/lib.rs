//! Deterministic simulation of Concord nodes: crashes and document merges.
//!
//! Several nodes, each a [`DocStore`] over a [`MemoryStore`], take random writes, deletes and
//! re-creations of a small set of records (many writers on the same records), exchange
//! documents pairwise (the merge path replication will use), and crash: a crash keeps what was
//! flushed plus a random prefix of what was not, exactly the loss the durability contract
//! allows, and the node reopens from what is left. Every choice comes from one seeded
//! [`SimRng`], so a seed replays the same run; the trace hash proves it.
//!
//! Checks, in two phases as the design asks:
//! - safety, after every crash and at the end: every change a node acknowledged (a durable
//!   write, a synced deferred write, a merge) is still in that node's document, and every
//!   document reopens and matches its recorded heads;
//! - liveness, once faults stop: after every pair of nodes has exchanged every record, all
//!   nodes hold identical documents (same heads, same JSON).
//!
//! Replication over a simulated network, partitions and the engine's own checks build on this
//! when the replication engine lands.

pub mod rng;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::num::NonZeroUsize;

use automerge::{ChangeHash, ReadDoc};
use concord::record::document::{self, RecordWrite};
use concord::record::{NodeId, RecordId};
use concord::store::{DocStore, DocStoreConfig, Durability, MemoryStore, Store};
use serde_json::json;

pub use rng::SimRng;

/// Most steps one run may take.
pub const STEPS_MAX: u64 = 10_000_000;
/// Most nodes one run may have.
pub const NODES_MAX: usize = 64;
/// Trace lines kept for a failure report.
const TRACE_TAIL_LINES: usize = 40;

#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub records: usize,
    pub steps: u64,
    /// Percent of steps that crash a node.
    pub crash_percent: u64,
    /// Percent of steps that merge one record between two nodes.
    pub merge_percent: u64,
    /// Documents each node keeps loaded; small, so that reloads from the store are exercised.
    pub cache_documents: usize,
    /// Appended changes before compaction; small, so that snapshots are exercised.
    pub compact_after_changes: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            nodes: 3,
            records: 8,
            steps: 300,
            crash_percent: 3,
            merge_percent: 25,
            cache_documents: 4,
            compact_after_changes: 5,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub writes: u64,
    pub deletes: u64,
    pub merges: u64,
    pub crashes: u64,
    pub unflushed_batches_lost: u64,
    pub acknowledged_changes: u64,
    pub trace_hash: u64,
}

/// A broken guarantee, with the seed and the trace around it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub message: String,
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "violation at step {} of seed {}: {}",
            self.step, self.seed, self.message
        )?;
        writeln!(f, "trace before it:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

struct SimNode {
    id: NodeId,
    store: MemoryStore,
    docs: DocStore<MemoryStore>,
    /// Changes this node acknowledged, per record.
    acknowledged: BTreeMap<usize, BTreeSet<ChangeHash>>,
    /// Deferred writes not yet synced.
    pending: Vec<(usize, ChangeHash)>,
}

struct Sim {
    seed: u64,
    params: Params,
    rng: SimRng,
    nodes: Vec<SimNode>,
    ids: Vec<RecordId>,
    summary: Summary,
    trace: Vec<String>,
    trace_hash: u64,
    step: u64,
}

fn store_config(params: &Params) -> DocStoreConfig {
    DocStoreConfig {
        cache_documents: NonZeroUsize::new(params.cache_documents.max(1)).expect("at least one"),
        compact_after_changes: params.compact_after_changes.max(1),
    }
}

/// Runs one simulation.
pub fn run(seed: u64, params: &Params) -> Result<Summary, Violation> {
    assert!(
        params.nodes >= 1 && params.nodes <= NODES_MAX,
        "1..={NODES_MAX} nodes"
    );
    assert!(params.records >= 1, "at least one record");
    assert!(params.steps <= STEPS_MAX, "at most {STEPS_MAX} steps");
    let mut rng = SimRng::new(seed);
    let nodes = (0..params.nodes)
        .map(|_| {
            let mut bytes = [0u8; 16];
            for chunk in bytes.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let id = NodeId(bytes);
            let store = MemoryStore::new();
            let docs = DocStore::open(store.clone(), id, store_config(params))
                .expect("a fresh memory store opens");
            SimNode {
                id,
                store,
                docs,
                acknowledged: BTreeMap::new(),
                pending: Vec::new(),
            }
        })
        .collect();
    let ids = (0..params.records)
        .map(|index| RecordId::parse(&format!("items/r{index}")).expect("valid id"))
        .collect();
    let mut sim = Sim {
        seed,
        params: params.clone(),
        rng,
        nodes,
        ids,
        summary: Summary::default(),
        trace: Vec::new(),
        trace_hash: 0xcbf2_9ce4_8422_2325,
        step: 0,
    };
    sim.run()?;
    sim.summary.trace_hash = sim.trace_hash;
    Ok(sim.summary)
}

impl Sim {
    fn run(&mut self) -> Result<(), Violation> {
        // Safety phase: faults on.
        for step in 0..self.params.steps {
            self.step = step;
            let roll = self.rng.below(100);
            if roll < self.params.crash_percent {
                self.crash()?;
            } else if roll < self.params.crash_percent + self.params.merge_percent {
                self.merge_random()?;
            } else {
                self.edit()?;
            }
        }
        // Liveness phase: no more faults; sync everything, then exchange until quiet.
        self.step = self.params.steps;
        for node in 0..self.nodes.len() {
            self.sync(node)?;
        }
        for record in 0..self.ids.len() {
            for _round in 0..2 {
                for from in 0..self.nodes.len() {
                    for to in 0..self.nodes.len() {
                        if from != to {
                            self.merge(from, to, record)?;
                        }
                    }
                }
            }
        }
        self.check_converged()?;
        for node in 0..self.nodes.len() {
            self.check_acknowledged(node)?;
        }
        Ok(())
    }

    fn record_trace(&mut self, line: String) {
        for byte in line.bytes() {
            self.trace_hash ^= u64::from(byte);
            self.trace_hash = self.trace_hash.wrapping_mul(0x0100_0000_01b3);
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
            step: self.step,
            message,
            trace_tail: self.trace[start..].to_vec(),
        }
    }

    fn fail<T>(&self, what: &str, error: impl std::fmt::Display) -> Result<T, Violation> {
        Err(self.violation(format!("{what}: {error}")))
    }

    fn edit(&mut self) -> Result<(), Violation> {
        let node = self.rng.index(self.nodes.len());
        let record = self.rng.index(self.ids.len());
        let deferred = self.rng.chance(30);
        let durability = if deferred {
            Durability::Deferred
        } else {
            Durability::Durable
        };
        let delete = self.rng.chance(15);
        let actor = self.nodes[node].id.actor(self.rng.below(2) as u16);
        let time = self.step as i64;
        let id = self.ids[record].clone();
        let result = if delete {
            self.summary.deletes += 1;
            self.nodes[node]
                .docs
                .write(&id, &actor, time, durability, |tx| {
                    document::apply_delete(tx)
                })
                .map(|(_, outcome)| outcome)
        } else {
            self.summary.writes += 1;
            let field = format!("f{}", self.rng.below(4));
            let mut write = RecordWrite::default();
            if self.rng.chance(20) {
                write.remove.push(field);
            } else {
                write.set.push((field, json!(self.rng.below(1000))));
            }
            write.replace = self.rng.chance(5);
            self.nodes[node]
                .docs
                .write(&id, &actor, time, durability, |tx| {
                    document::apply_write(tx, &write)
                })
                .map(|(_, outcome)| outcome)
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(error) => return self.fail("a write failed", error),
        };
        self.record_trace(format!(
            "step {} node {node} {} {} {:?} -> {:?}",
            self.step,
            if delete { "delete" } else { "write" },
            id,
            durability,
            outcome.change
        ));
        if let Some(hash) = outcome.change {
            if deferred {
                self.nodes[node].pending.push((record, hash));
                if self.rng.chance(20) {
                    self.sync(node)?;
                }
            } else {
                self.acknowledge(node, record, hash);
            }
        }
        Ok(())
    }

    fn acknowledge(&mut self, node: usize, record: usize, hash: ChangeHash) {
        self.summary.acknowledged_changes += 1;
        self.nodes[node]
            .acknowledged
            .entry(record)
            .or_default()
            .insert(hash);
    }

    fn sync(&mut self, node: usize) -> Result<(), Violation> {
        if let Err(error) = self.nodes[node].docs.sync() {
            return self.fail("sync failed", error);
        }
        let pending = std::mem::take(&mut self.nodes[node].pending);
        for (record, hash) in pending {
            self.acknowledge(node, record, hash);
        }
        self.record_trace(format!("step {} node {node} sync", self.step));
        Ok(())
    }

    fn merge_random(&mut self) -> Result<(), Violation> {
        if self.nodes.len() < 2 {
            return Ok(());
        }
        let from = self.rng.index(self.nodes.len());
        let mut to = self.rng.index(self.nodes.len() - 1);
        if to >= from {
            to += 1;
        }
        let record = self.rng.index(self.ids.len());
        self.merge(from, to, record)
    }

    /// Sends record `record` from node `from` to node `to`, as a saved document.
    fn merge(&mut self, from: usize, to: usize, record: usize) -> Result<(), Violation> {
        let id = self.ids[record].clone();
        // The sender makes its writes durable before anything leaves it.
        let saved = match self.nodes[from].docs.export(&id) {
            Ok(saved) => saved,
            Err(error) => return self.fail("exporting a document to send failed", error),
        };
        let pending = std::mem::take(&mut self.nodes[from].pending);
        for (pending_record, hash) in pending {
            self.acknowledge(from, pending_record, hash);
        }
        let Some(saved) = saved else { return Ok(()) };
        self.summary.merges += 1;
        let outcome = match self.nodes[to].docs.import(&id, &saved) {
            Ok(outcome) => outcome,
            Err(error) => return self.fail("a merge failed", error),
        };
        self.record_trace(format!(
            "step {} merge {id} node {from} -> node {to}: {} new",
            self.step, outcome.new_changes
        ));
        // A merge is durable when it returns: everything the receiver now holds is acknowledged.
        let hashes: Vec<ChangeHash> = match self.nodes[to].docs.read(&id, |doc| {
            doc.get_changes(&[])
                .iter()
                .map(|change| change.hash())
                .collect()
        }) {
            Ok(hashes) => hashes,
            Err(error) => return self.fail("reading a merged document failed", error),
        };
        let pending: BTreeSet<ChangeHash> = self.nodes[to]
            .pending
            .iter()
            .filter(|(pending_record, _)| *pending_record == record)
            .map(|(_, hash)| *hash)
            .collect();
        for hash in hashes {
            // A merge flushes the store, so this node's own deferred writes became durable too.
            if !pending.contains(&hash) {
                self.nodes[to]
                    .acknowledged
                    .entry(record)
                    .or_default()
                    .insert(hash);
            }
        }
        Ok(())
    }

    fn crash(&mut self) -> Result<(), Violation> {
        let node = self.rng.index(self.nodes.len());
        let unflushed = self.nodes[node].store.unflushed_batches();
        let keep = self.rng.index(unflushed + 1);
        self.summary.crashes += 1;
        self.summary.unflushed_batches_lost += (unflushed - keep) as u64;
        self.nodes[node].store.crash(keep);
        self.nodes[node].pending.clear();
        let reopened = DocStore::open(
            self.nodes[node].store.clone(),
            self.nodes[node].id,
            store_config(&self.params),
        );
        match reopened {
            Ok(docs) => self.nodes[node].docs = docs,
            Err(error) => return self.fail("the store did not reopen after a crash", error),
        }
        self.record_trace(format!(
            "step {} crash node {node}: kept {keep} of {unflushed} unflushed batches",
            self.step
        ));
        self.check_acknowledged(node)
    }

    /// Safety: every acknowledged change is in the node's document, which loads cleanly.
    fn check_acknowledged(&self, node: usize) -> Result<(), Violation> {
        for (record, hashes) in &self.nodes[node].acknowledged {
            let id = &self.ids[*record];
            let missing = self.nodes[node].docs.read(id, |doc| {
                hashes
                    .iter()
                    .filter(|hash| doc.get_change_by_hash(hash).is_none())
                    .count()
            });
            match missing {
                Ok(0) => {}
                Ok(count) => {
                    return Err(self.violation(format!(
                        "node {node} lost {count} acknowledged changes of {id}"
                    )))
                }
                Err(error) => return self.fail(&format!("node {node} cannot load {id}"), error),
            }
        }
        Ok(())
    }

    /// Liveness: all nodes hold the same documents.
    fn check_converged(&self) -> Result<(), Violation> {
        for id in &self.ids {
            let mut states = Vec::new();
            for (index, node) in self.nodes.iter().enumerate() {
                let state = node.docs.read(id, |doc| {
                    let mut heads = doc.get_heads();
                    heads.sort_unstable();
                    (heads, document::read(doc))
                });
                match state {
                    Ok(state) => states.push((index, state)),
                    Err(error) => return self.fail("reading for convergence failed", error),
                }
            }
            let (_, first) = &states[0];
            for (index, state) in &states[1..] {
                if state != first {
                    let mut message = format!("{id} did not converge: node 0 has {:?}", first.1);
                    let _ = write!(message, ", node {index} has {:?}", state.1);
                    return Err(self.violation(message));
                }
            }
        }
        // The stores themselves agree with what the nodes read.
        for node in &self.nodes {
            if let Err(error) = node.store.flush() {
                return self.fail("final flush failed", error);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_run() {
        let params = Params::default();
        let first = run(7, &params).unwrap();
        let second = run(7, &params).unwrap();
        assert_eq!(first, second);
        let other = run(8, &params).unwrap();
        assert_ne!(first.trace_hash, other.trace_hash);
    }

    #[test]
    fn sweep_of_seeds_holds_the_guarantees() {
        let params = Params::default();
        let mut crashes = 0;
        for seed in 0..200 {
            let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
            crashes += summary.crashes;
        }
        assert!(crashes > 0, "the sweep must include crashes");
    }
}
