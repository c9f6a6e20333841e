//! Who sends this node each origin's changes: the relay choice (Plumtree's eager and lazy
//! push, with summaries as the lazy half).
//!
//! For every origin this node picks its sources among the ready peers (the origin itself
//! while connected, otherwise [`RELAYS_PER_ORIGIN`] peers holding most of that origin's log)
//! and tells every other peer, with `Prune`, not to send it; a peer chosen again is told so
//! with `Graft`. The choice is a pure function of the ready peers, their reported marks and
//! the prunes already sent, so it is the same however often it is weighed.

use std::collections::{BTreeMap, BTreeSet};

use super::outbound::Peer;
use super::{Engine, Replica, RELAYS_PER_ORIGIN};
use crate::record::NodeId;

/// The inputs of the last rebalance that decide whether the next may weigh only what changed.
#[derive(Debug)]
pub(super) struct Balanced {
    pub(super) ready: Vec<NodeId>,
    pub(super) origins: BTreeSet<NodeId>,
}

/// A deterministic, well-mixed order of peers per origin, so relaying spreads over peers.
fn spread(origin: &NodeId, peer: &NodeId) -> u64 {
    let mut mixed = 0xcbf2_9ce4_8422_2325u64;
    for byte in origin.0.iter().chain(peer.0.iter()) {
        mixed ^= u64::from(*byte);
        mixed = mixed.wrapping_mul(0x0100_0000_01b3);
    }
    mixed
}

impl Engine {
    /// Chooses, for every origin, who pushes and catches up its changes to us: the origin
    /// itself while connected, otherwise [`RELAYS_PER_ORIGIN`] peers, kept while no other peer
    /// reports holding more of that origin's log. Every other peer is asked not to (Prune);
    /// a peer chosen again is told so (Graft). Each change then reaches each node about once,
    /// and after a partition an origin's missing log comes from one or two peers, not from
    /// every peer (Plumtree's eager and lazy push, with summaries as the lazy half).
    ///
    /// `changed` names the origins whose reported marks moved since the last rebalance. The
    /// choice for an origin depends only on the ready peers, their marks for that origin and
    /// the prunes already sent, so when the ready peers are the same as last time only those
    /// origins, and origins seen for the first time, are weighed again; the outcome is the
    /// one a full pass would give. `None` weighs every origin.
    pub(super) fn rebalance(&mut self, replica: &impl Replica, changed: Option<&BTreeSet<NodeId>>) {
        let ready = self.ready_peers();
        if ready.is_empty() {
            self.balanced = None;
            return;
        }
        let (scope, full) = self.origins_to_weigh(&ready, replica, changed);
        let mut prunes: BTreeMap<NodeId, Vec<[u8; 16]>> = BTreeMap::new();
        let mut grafts: BTreeMap<NodeId, Vec<[u8; 16]>> = BTreeMap::new();
        if full {
            // Prunes of origins no longer weighed at all (a peer that left) are lifted.
            for peer in &ready {
                let stale: Vec<[u8; 16]> = self.peers[peer]
                    .pruned_by_us
                    .difference(&scope)
                    .map(|origin| origin.0)
                    .collect();
                if !stale.is_empty() {
                    grafts.entry(*peer).or_default().extend(stale);
                }
            }
        }
        let states: Vec<&Peer> = ready.iter().map(|peer| &self.peers[peer]).collect();
        // A peer whose grant reads less than this node's sends it no origin's log but its
        // own (its covers would not be true for this node): it is never a relay.
        let serves: Vec<bool> = ready
            .iter()
            .map(|peer| replica.reads_at_least(peer, &self.config.node))
            .collect();
        for origin in &scope {
            // Per ready peer (by position): its mark for the origin, and whether it is a
            // source of it now.
            let weighed: Vec<(u64, bool)> = states
                .iter()
                .map(|state| {
                    (
                        state.reported.get(origin).copied().unwrap_or(0),
                        !state.pruned_by_us.contains(origin),
                    )
                })
                .collect();
            let wanted = choose_sources(origin, &ready, &states, &weighed, &serves);
            for (position, peer) in ready.iter().enumerate() {
                let (_, source) = weighed[position];
                if wanted[position] != source {
                    let list = if source {
                        prunes.entry(*peer).or_default()
                    } else {
                        grafts.entry(*peer).or_default()
                    };
                    list.push(origin.0);
                }
            }
        }
        self.tell_prunes_and_grafts(&ready, prunes, grafts);
    }

    /// The origins a rebalance weighs, and whether that is every one (a full pass, which
    /// records what it weighed) rather than only those `changed` and new.
    fn origins_to_weigh(
        &mut self,
        ready: &[NodeId],
        replica: &impl Replica,
        changed: Option<&BTreeSet<NodeId>>,
    ) -> (BTreeSet<NodeId>, bool) {
        let mut origins: BTreeSet<NodeId> = replica
            .origin_marks()
            .into_iter()
            .map(|(origin, _)| origin)
            .collect();
        match (&mut self.balanced, changed) {
            (Some(balanced), Some(changed)) if balanced.ready == ready => {
                origins.extend(changed.iter().copied());
                origins.remove(&self.config.writer);
                let fresh: Vec<NodeId> = origins.difference(&balanced.origins).copied().collect();
                let mut scope: BTreeSet<NodeId> = changed.clone();
                scope.extend(fresh);
                scope.remove(&self.config.writer);
                balanced.origins.extend(scope.iter().copied());
                (scope, false)
            }
            _ => {
                for peer in ready {
                    let state = &self.peers[peer];
                    origins.insert(state.writer.unwrap_or(*peer));
                    origins.extend(state.reported.keys().copied());
                }
                origins.remove(&self.config.writer);
                self.balanced = Some(Balanced {
                    ready: ready.to_vec(),
                    origins: origins.clone(),
                });
                (origins, true)
            }
        }
    }

    /// Queues what each ready peer is told: a prune not yet sent is taken back by a graft,
    /// and the other way round, so the peer hears the latest choice.
    fn tell_prunes_and_grafts(
        &mut self,
        ready: &[NodeId],
        mut prunes: BTreeMap<NodeId, Vec<[u8; 16]>>,
        mut grafts: BTreeMap<NodeId, Vec<[u8; 16]>>,
    ) {
        for peer in ready {
            let prune = prunes.remove(peer).unwrap_or_default();
            let mut graft = grafts.remove(peer).unwrap_or_default();
            graft.sort_unstable();
            let Some(state) = self.peers.get_mut(peer) else {
                continue;
            };
            for origin in prune {
                let origin = NodeId(origin);
                state.pruned_by_us.insert(origin);
                state.outbox.graft.remove(&origin);
                state.outbox.prune.insert(origin);
            }
            for origin in graft {
                let origin = NodeId(origin);
                state.pruned_by_us.remove(&origin);
                state.outbox.prune.remove(&origin);
                state.outbox.graft.insert(origin);
            }
        }
    }
}

/// Which ready peers (by position) should push `origin`'s changes here: the origin itself
/// when it is among them, else the current sources while they are few enough, all serve and
/// none left out holds more, else the [`RELAYS_PER_ORIGIN`] that hold the most.
fn choose_sources(
    origin: &NodeId,
    ready: &[NodeId],
    states: &[&Peer],
    weighed: &[(u64, bool)],
    serves: &[bool],
) -> Vec<bool> {
    let mut wanted: Vec<bool> = vec![false; ready.len()];
    // The origin itself: the peer writing under it now, or, before version 3, the peer
    // whose id it is. A node's former writer is not itself: it may hold less of it.
    let itself = states
        .iter()
        .position(|state| state.writer == Some(*origin))
        .or_else(|| {
            ready
                .binary_search(origin)
                .ok()
                .filter(|&position| states[position].writer.is_none())
        });
    if let Some(position) = itself {
        wanted[position] = true;
        return wanted;
    }
    let current = weighed.iter().filter(|(_, source)| *source).count();
    let best = |sources: bool| {
        weighed
            .iter()
            .zip(serves)
            .filter(|((_, source), serves)| *source == sources && **serves)
            .map(|((mark, _), _)| *mark)
            .max()
    };
    let sources_serve = weighed
        .iter()
        .zip(serves)
        .all(|((_, source), serves)| !*source || *serves);
    let keep =
        current <= RELAYS_PER_ORIGIN && current > 0 && sources_serve && best(false) <= best(true);
    if keep {
        for (want, (_, source)) in wanted.iter_mut().zip(weighed) {
            *want = *source;
        }
        return wanted;
    }
    let mut ranked: Vec<(std::cmp::Reverse<u64>, u64, usize)> = weighed
        .iter()
        .enumerate()
        .filter(|(position, _)| serves[*position])
        .map(|(position, (mark, _))| {
            (
                std::cmp::Reverse(*mark),
                spread(origin, &ready[position]),
                position,
            )
        })
        .collect();
    ranked.sort_unstable();
    for (_, _, position) in ranked.into_iter().take(RELAYS_PER_ORIGIN) {
        wanted[position] = true;
    }
    wanted
}
