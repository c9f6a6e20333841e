//! The simulated nodes: the production engine and store of each, stepped through the
//! production driver; crashes, lost and restored stores, restarts and new writers.

use super::*;

pub(crate) fn store_config(params: &Params) -> DocStoreConfig {
    DocStoreConfig {
        cache_documents: NonZeroUsize::new(params.cache_documents.max(1)).expect("at least one"),
        compact_after_changes: 5,
        compact_histories: params.compact_histories,
        // Short histories are compacted too, so that most records of a run are.
        compact_history_changes_min: 4,
        ..DocStoreConfig::default()
    }
}

/// The documents of node `id` in `store`, written under `writer`.
pub(crate) fn open_docs(
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

/// How often simulated nodes take reports and truncate their logs.
pub(crate) const SIM_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// The production driver around a fresh engine for node `id` writing under `writer`, its own
/// log sent up to what the store holds (a restarted node pushes nothing old from memory).
pub(crate) fn new_driver(
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
    /// Hands inputs to a node's driver and carries out what it returns.
    pub(super) fn step(&mut self, index: usize, inputs: Vec<Input>) -> Result<(), Violation> {
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
        let mut grants_arrived = false;
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
                Output::Applied { changes, .. } => {
                    // As `concord run`: a grant or revocation counts from the change that
                    // brought it.
                    grants_arrived |= changes
                        .iter()
                        .any(|change| concord::scope::is_grant_doc(&change.doc_key));
                }
            }
        }
        if grants_arrived {
            self.refresh_registry(index)?;
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
    pub(super) fn reissue(&mut self, index: usize) -> Result<(), Violation> {
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
    pub(super) fn reusing_writers(&self) -> bool {
        #[cfg(feature = "sabotage")]
        return self.sabotage.reuse_writer;
        #[cfg(not(feature = "sabotage"))]
        false
    }

    /// A peer showed that node `index`'s own log is not its store's alone: as `concord run`
    /// does, the store takes a new writer. Only a store that reused its former writer can
    /// get here; anywhere else it means a change left before it was durable.
    pub(super) fn take_new_writer(&mut self, index: usize, reason: &str) -> Result<(), Violation> {
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
    pub(super) fn random_node_id(&mut self) -> NodeId {
        let mut bytes = [0u8; 16];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        NodeId(bytes)
    }

    pub(super) fn index_of(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|node| node.id == id)
            .expect("peers are nodes")
    }

    pub(super) fn crash(&mut self) -> Result<(), Violation> {
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
    pub(super) fn lose_store(&mut self, index: usize) -> Result<(), Violation> {
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
    pub(super) fn forget_acknowledged_unheld(
        &mut self,
        lost: Option<usize>,
    ) -> Result<(), Violation> {
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

    pub(super) fn restart(&mut self, index: usize) -> Result<(), Violation> {
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
        let node = &mut self.nodes[index];
        node.docs = docs;
        node.driver = driver;
        node.up = true;
        node.restart_at = None;
        self.record_trace(format!("{} restart node {index}", self.now_ms));
        if store_lost {
            // What it wrote and others held comes back from them; the end checks it.
            return self.open_registry(index);
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
        self.open_registry(index)
    }
}
