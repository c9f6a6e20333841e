//! The guarantees checked after the faults stop: every node converges on every record and
//! every log, every acknowledged write is held, deletes stay deleted, partial replicas hold
//! exactly what they may read, and history agrees.

use super::*;

/// Hashes by their first 8 hex digits.
pub(crate) fn short_hashes(hashes: &[ChangeHash]) -> String {
    let short: Vec<String> = hashes
        .iter()
        .map(|hash| hash.to_string()[..8].to_owned())
        .collect();
    short.join(" ")
}

/// A record's JSON cut short: values may be megabytes.
pub(crate) fn brief(record: &Option<serde_json::Map<String, serde_json::Value>>) -> String {
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

impl Sim {
    pub(super) fn record_state(
        &self,
        index: usize,
        record: usize,
    ) -> Result<RecordView, Violation> {
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

    pub(super) fn converged(&self) -> Result<bool, Violation> {
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
    pub(super) fn holds_what_it_may(
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
    pub(super) fn has_partial_replicas(&self) -> bool {
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
    pub(super) fn reads_all(&self, index: usize) -> bool {
        self.scoped
            .as_ref()
            .is_none_or(|scoped| scoped.scopes().reads_all(&self.nodes[index].id))
    }

    /// The parameters node `index`'s store opens with (the modified node never compacts).
    pub(super) fn node_params(&self, index: usize) -> Params {
        if self.is_modified(index) {
            self.params.without_compaction()
        } else {
            self.params.clone()
        }
    }

    /// Whether node `index` is the one modified to ignore its grant (in a scoped run).
    pub(super) fn is_modified(&self, index: usize) -> bool {
        self.scoped
            .as_ref()
            .is_some_and(|scoped| scoped.modified == Some(index))
    }

    pub(super) fn divergence(&self) -> Result<String, Violation> {
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
    pub(super) fn modified_holds_more(&self) -> Vec<(RecordId, ChangeHash, Vec<usize>)> {
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
    pub(super) fn check_history(&mut self) -> Result<(), Violation> {
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
