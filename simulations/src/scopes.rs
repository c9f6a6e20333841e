//! Grants and revocations in a scoped run: regions granted per node, a revocation issued
//! mid-run, and its cut-offs applied at each node as it learns of it.

use super::*;

/// The values of the field grants narrow by, in a scoped run.
pub(crate) const REGIONS: [&str; 2] = ["north", "south"];

/// Grants, a node modified to ignore its own, and its revocation, in a scoped run: every
/// node's store judges changes through the same door `concord run` gives it.
pub(crate) struct Scoped {
    /// What every honest node holds: the grants and, once made, the revocation.
    pub(crate) scopes: Arc<RwLock<Scopes>>,
    /// How the modified node sees them: nothing granted to or revoked of itself.
    pub(crate) modified_view: Arc<RwLock<Scopes>>,
    pub(crate) modified: Option<usize>,
    /// The safety step at which the modified node is revoked, if it is.
    pub(crate) revoke_at: Option<u64>,
    /// The modified node's changes: record, change, and its place in its log, in order.
    pub(crate) forged: Vec<(usize, ChangeHash, (NodeId, u64))>,
}

impl Scoped {
    pub(crate) fn door(&self, node: &SimNode, index: usize) -> Arc<dyn concord::store::WriteDoor> {
        let view = if self.modified == Some(index) {
            self.modified_view.clone()
        } else {
            self.scopes.clone()
        };
        Arc::new(ScopeDoor::new(node.id, view))
    }

    pub(crate) fn scopes(&self) -> std::sync::RwLockReadGuard<'_, Scopes> {
        self.scopes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Sim {
    /// The authority revokes the modified node, its changes counting up to what node 0
    /// holds of its log now; every node holds the revocation at once (as it would hold any
    /// record), and those running take out what it cut off.
    pub(super) fn revoke(&mut self) -> Result<(), Violation> {
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
    pub(super) fn apply_cut_offs(&mut self, index: usize) -> Result<(), Violation> {
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
    pub(super) fn check_scopes(&mut self) -> Result<(), Violation> {
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
}
