//! Grants and revocations in a scoped run: regions granted per node, a revocation issued
//! mid-run at one node, and each node's own [`Registry`] (the one `concord run` keeps) fed by
//! the `_grants` records its store holds, as they reach it.

use super::*;

/// The values of the field grants narrow by, in a scoped run.
pub(crate) const REGIONS: [&str; 2] = ["north", "south"];

/// How signed items are checked in a run: an HMAC key of the simulator's, deterministic, so
/// that a seed replays exactly (the cluster CA's ECDSA signatures are randomized). The
/// modified node's checker ignores every item that names it: it sees nothing granted to or
/// revoked of itself.
struct SimVerifier {
    key: hmac::Key,
    ignores: Option<NodeId>,
}

impl Verify for SimVerifier {
    fn verify(&self, signed: &Signed) -> Result<Verified, ScopeError> {
        let item = signed.open_with(CLUSTER, |body, signature| {
            hmac::verify(&self.key, body, signature).map_err(|_| ScopeError::BadSignature)
        })?;
        let named = match &item {
            Verified::Grant(grant) => grant.node,
            Verified::Revocation(revocation) => revocation.node,
            Verified::Removal(removal) => removal.node,
        };
        if self.ignores.is_some_and(|ignored| ignored.0 == named) {
            return Err(ScopeError::Malformed(
                "the modified node ignores what names it".into(),
            ));
        }
        Ok(item)
    }
}

/// Grants, a node modified to ignore its own, and its revocation, in a scoped run: every
/// node's store judges changes through the door its own registry gives it.
pub(crate) struct Scoped {
    key: hmac::Key,
    /// What the authority issued, signed: the grants every node holds from the start (the
    /// cluster was granted before the run), then the revocation. A store opened again is
    /// given those it lacks, as an operator gives a node made again the cluster's grants.
    signed: Vec<Vec<u8>>,
    /// The same, as the set every honest node must end up holding: what the checks judge by.
    issued: Scopes,
    pub(crate) modified: Option<usize>,
    /// The safety step at which the modified node is revoked, if it is.
    pub(crate) revoke_at: Option<u64>,
    /// The node that applies the revocation by arrival order (with the sabotage only).
    #[cfg_attr(not(feature = "sabotage"), allow(dead_code))]
    late: Option<usize>,
    /// The modified node's changes: record, change, and its place in its log, in order.
    pub(crate) forged: Vec<(usize, ChangeHash, (NodeId, u64))>,
}

impl Scoped {
    /// Draws the grants of a scoped run: some nodes (never the first, which writes everything
    /// and moves records between regions) may write one region's records, and read only those
    /// in some runs; one of them may be modified to ignore its grant, and revoked mid-run.
    pub(crate) fn draw(rng: &mut SimRng, ids: &[NodeId], params: &Params) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &rng.next_u64().to_le_bytes());
        let mut signed = Vec::new();
        let mut issued = Scopes::default();
        let mut granted = Vec::new();
        for (index, node) in ids.iter().enumerate().skip(1) {
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
            let grant = Verified::Grant(Grant {
                cluster: CLUSTER,
                node: node.0,
                read: vec![read],
                write: vec![scope],
                issued_ms: 0,
            });
            signed.push(sign(&key, &grant));
            issued.insert(grant, &[]);
            granted.push(index);
        }
        let modified =
            (!granted.is_empty() && rng.chance(50)).then(|| granted[rng.index(granted.len())]);
        let revoke_at = modified
            .filter(|_| rng.chance(50))
            .map(|_| rng.below(params.steps.max(1)));
        // One honest node besides the first, to apply the revocation late under the sabotage.
        let late = (1..ids.len()).find(|index| Some(*index) != modified);
        Self {
            key,
            signed,
            issued,
            modified,
            revoke_at,
            late,
            forged: Vec::new(),
        }
    }

    /// What the authority issued so far.
    pub(crate) fn scopes(&self) -> &Scopes {
        &self.issued
    }

    /// A registry for node `index` (as `concord run` makes one when it opens its store).
    pub(crate) fn registry(&self, id: NodeId, index: usize, sabotage: Sabotage) -> Registry {
        let verifier = SimVerifier {
            key: self.key.clone(),
            ignores: (self.modified == Some(index)).then_some(id),
        };
        #[cfg_attr(not(feature = "sabotage"), allow(unused_mut))]
        let mut registry = Registry::new(id, Some(Box::new(verifier)));
        #[cfg(feature = "sabotage")]
        if self.late == Some(index) {
            registry.set_sabotage(sabotage);
        }
        #[cfg(not(feature = "sabotage"))]
        let _ = sabotage;
        registry
    }
}

/// `item` signed with the run's key.
fn sign(key: &hmac::Key, item: &Verified) -> Vec<u8> {
    Signed::sign_with(item, |body| Ok(hmac::sign(key, body).as_ref().to_vec()))
        .expect("the simulator's signature never fails")
        .to_bytes()
}

impl Sim {
    /// Gives node `index`'s store its registry's door and what the authority issued that it
    /// lacks, and reads its grants, as `concord run` does when it opens a store.
    pub(super) fn open_registry(&mut self, index: usize) -> Result<(), Violation> {
        let Some(scoped) = &self.scoped else {
            return Ok(());
        };
        let node = &self.nodes[index];
        let registry = scoped.registry(node.id, index, self.sabotage);
        node.docs.set_door(Arc::new(registry.door()));
        let actor = node.writer.actor(0);
        for signed in &scoped.signed {
            let id = RecordId::new(
                Collection::new(GRANTS_COLLECTION).expect("a valid collection"),
                Key::new(&grant_key(signed)).expect("a valid key"),
            );
            let held = node
                .docs
                .stored(&id)
                .map_err(|error| self.violation(format!("node {index}: {error}")))?;
            if held.is_none() {
                store_signed(&node.docs, &actor, 0, signed, Durability::Durable)
                    .map_err(|error| self.violation(format!("node {index}: {error}")))?;
            }
        }
        self.nodes[index].registry = Some(registry);
        self.refresh_registry(index)
    }

    /// Node `index` reads its grants again (after changes to `_grants` reached it), and acts
    /// on what its registry took out, as `concord run` does.
    pub(super) fn refresh_registry(&mut self, index: usize) -> Result<(), Violation> {
        let node = &self.nodes[index];
        let Some(registry) = &node.registry else {
            return Ok(());
        };
        let refreshed = registry
            .refresh(&node.docs)
            .map_err(|error| self.violation(format!("node {index}: {error}")))?;
        if refreshed.taken_out > 0 {
            self.record_trace(format!(
                "{} node {index} takes out {} changes past the cut-off",
                self.now_ms, refreshed.taken_out
            ));
        }
        if refreshed.took_out_own {
            self.take_new_writer(index, REVOCATION_TOOK_OUT_OWN)?;
        }
        Ok(())
    }

    /// The authority revokes the modified node at the first honest node that is up, its
    /// changes counting up to what that node holds of its log now. The revocation reaches
    /// the others as a record of `_grants`, whenever their links let it.
    pub(super) fn revoke(&mut self) -> Result<(), Violation> {
        let Some(modified) = self.scoped.as_ref().and_then(|scoped| scoped.modified) else {
            return Ok(());
        };
        let Some(at) =
            (0..self.nodes.len()).find(|index| *index != modified && self.nodes[*index].up)
        else {
            self.record_trace(format!("{} no node up to revoke at", self.now_ms));
            return Ok(());
        };
        let writer = self.nodes[modified].writer;
        let cut_off = self.nodes[at].docs.origin_mark(&writer);
        let revocation = Verified::Revocation(Revocation {
            cluster: CLUSTER,
            node: self.nodes[modified].id.0,
            cut_off: vec![(writer.0, cut_off)],
            issued_ms: self.now_ms,
        });
        let Some(scoped) = self.scoped.as_mut() else {
            return Ok(());
        };
        let signed = sign(&scoped.key, &revocation);
        scoped.signed.push(signed.clone());
        scoped.issued.insert(revocation, &[]);
        let time_ms = self.node_now(at).as_millis() as i64;
        let node = &self.nodes[at];
        store_signed(
            &node.docs,
            &node.writer.actor(0),
            time_ms,
            &signed,
            Durability::Durable,
        )
        .map_err(|error| self.violation(format!("node {at}: {error}")))?;
        self.summary.revoked = true;
        self.record_trace(format!(
            "{} node {modified} revoked at node {at}, its log counting up to {cut_off}",
            self.now_ms
        ));
        self.forget_acknowledged_unheld(None)?;
        self.refresh_registry(at)?;
        self.step(at, Vec::new())
    }

    /// After convergence, in a scoped run: every honest node holds the grants and the
    /// revocation the authority issued, no more and no less.
    pub(super) fn check_registries(&self) -> Result<(), Violation> {
        let Some(scoped) = &self.scoped else {
            return Ok(());
        };
        let expected = scoped.issued.describe();
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(registry) = node.registry.as_ref().filter(|_| !self.is_modified(index)) else {
                continue;
            };
            let held = registry.scopes().describe();
            if held != expected {
                return Err(self.violation(format!(
                    "node {index} holds grants {held:?}, not those issued: {expected:?}"
                )));
            }
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
