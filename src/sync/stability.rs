//! Stability: which entries of each origin's log every known node holds.
//!
//! Every node takes, every [`REPORT_INTERVAL`], a report of how far it holds each origin's log,
//! and sends its peers (`Holdings`, protocol version 5) the latest report of every node it
//! knows, its own among them, so that reports cross nodes that never connect. An entry is
//! *stable* once every known node reports holding it: what reclamation may drop from the log
//! without any peer having to be caught up another way.
//!
//! Guarantees:
//! - a report replaces only an older report of the same node (by the time it was taken, by its
//!   node's clock), so reports that arrive late or twice change nothing;
//! - the stable mark of an origin is the least mark over every known node that counts (one
//!   revoked or removed does not), a node known but not yet heard from counting as holding nothing; a
//!   node's marks only move forward while its store lives, so the stable mark never passes
//!   what a known node holds (a node whose store was lost holds less than it reported, and is
//!   caught up like a new one);
//! - a node that expects peers ([`super::Config::runs_alone`] false) and knows no other node
//!   holds nothing stable: a new node, or one whose store was lost, does not count its own
//!   writes stable before any other node could hold them;
//! - the nodes known are kept in the store, durably ([`super::Replica::note_known_node`]), so
//!   a restart, even a crash, forgets none; at most [`KNOWN_NODES_MAX`] are tracked, and past it a new node is not
//!   tracked (nothing becomes stable that it has not reported).

use std::collections::BTreeMap;
use std::time::Duration;

use concord_proto::{Holdings, Message, OriginMark};

use super::{Engine, Replica};
use crate::record::NodeId;
use crate::store::StoreError;

/// What waits after a step of reclamation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MoreToReclaim {
    Nothing,
    /// Log entries past the step's bound: the next step comes at once, as a log written
    /// faster than it is truncated would grow without end; it truncates before anything is
    /// compacted.
    Log,
    /// Only documents waiting to be compacted: the next step comes after
    /// [`super::RECLAIM_STEP_PAUSE`].
    Documents,
}

/// How often a node takes and relays reports: stability trails the logs by a few of these per
/// hop, which costs nothing but the delay before history is reclaimed.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Most nodes whose reports are tracked (and kept in the store).
pub const KNOWN_NODES_MAX: usize = 1024;

/// How far one node holds each origin's log, as it said at `taken`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub name: String,
    /// When the node took it, by its clock (0: not heard from yet).
    pub taken: u64,
    pub marks: BTreeMap<NodeId, u64>,
}

impl Report {
    pub fn from_message(holdings: &Holdings) -> Self {
        Self {
            name: holdings.name.clone(),
            taken: holdings.taken,
            marks: holdings
                .origins
                .iter()
                .map(|mark| (NodeId(mark.origin), mark.contiguous))
                .collect(),
        }
    }

    pub fn to_message(&self, node: &NodeId) -> Holdings {
        Holdings {
            node: node.0,
            name: self.name.clone(),
            taken: self.taken,
            origins: self
                .marks
                .iter()
                .map(|(origin, contiguous)| OriginMark {
                    origin: origin.0,
                    contiguous: *contiguous,
                })
                .collect(),
        }
    }
}

/// What became of a report handed to [`Stability::note`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    /// Newer than the one held, of a node known before.
    Newer,
    /// Of a node not known before: to be kept in the store.
    NewNode,
    /// Not newer than the one held: nothing changed.
    Stale,
    /// Of a node not known, with [`KNOWN_NODES_MAX`] known already: not tracked.
    Full,
}

/// One origin's log as stability sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginStability {
    pub origin: NodeId,
    /// Every entry up to here is held here.
    pub held: u64,
    /// Every entry up to here is held by every known node that counts.
    pub stable: u64,
    /// The log's entries at and below here were truncated here.
    pub floor: u64,
    /// The nodes whose reports hold the stable mark where it is (those at the least mark),
    /// when it is below what is held here.
    pub held_back_by: Vec<NodeId>,
}

/// The latest report of every node known.
#[derive(Debug, Default)]
pub struct Stability {
    reports: BTreeMap<NodeId, Report>,
    /// The nodes the store keeps were read in.
    loaded: bool,
    /// When this node next takes and relays reports.
    next_report: Option<Duration>,
    /// Whether this node may count what it holds as stable while it knows no other node.
    runs_alone: bool,
}

impl Stability {
    /// No node known yet; `runs_alone` as [`super::Config::runs_alone`].
    pub fn new(runs_alone: bool) -> Self {
        Self {
            runs_alone,
            ..Self::default()
        }
    }

    /// Whether nothing can be stable yet: this node expects peers and knows none (only its own
    /// report, if any, is held).
    fn awaits_peers(&self) -> bool {
        !self.runs_alone && self.reports.len() < 2
    }

    /// Whether the nodes the store keeps still have to be read in ([`Stability::load`]).
    pub fn needs_load(&self) -> bool {
        !self.loaded
    }

    /// Takes in the nodes known before this start, as not heard from yet.
    pub fn load(&mut self, known: Vec<(NodeId, String)>) {
        self.loaded = true;
        for (node, name) in known {
            if self.reports.len() >= KNOWN_NODES_MAX {
                break;
            }
            self.reports.entry(node).or_insert(Report {
                name,
                ..Report::default()
            });
        }
    }

    /// Keeps `report` of `node` if it is newer than the one held.
    pub fn note(&mut self, node: NodeId, report: Report) -> Noted {
        let known = self.reports.len();
        match self.reports.get_mut(&node) {
            Some(held) if held.taken >= report.taken => Noted::Stale,
            Some(held) => {
                *held = report;
                Noted::Newer
            }
            None if known >= KNOWN_NODES_MAX => Noted::Full,
            None => {
                self.reports.insert(node, report);
                Noted::NewNode
            }
        }
    }

    /// Knows `node` (a peer that said hello), as not heard from yet if it was not known.
    pub fn know(&mut self, node: NodeId, name: &str) -> Noted {
        if self.reports.contains_key(&node) {
            return Noted::Stale;
        }
        self.note(
            node,
            Report {
                name: name.to_owned(),
                ..Report::default()
            },
        )
    }

    /// Whether reports are due at `now`; if so, they are next due `interval` later.
    pub fn due(&mut self, now: Duration, interval: Duration) -> bool {
        let due = self.next_report.is_none_or(|at| now >= at);
        if due {
            self.next_report = Some(now + interval);
        }
        due
    }

    pub fn next_due(&self) -> Option<Duration> {
        self.next_report
    }

    /// Takes this node's own report at `clock_ms`, later than its previous one, unless its
    /// marks are those of the previous one (then there is nothing new to send).
    pub fn take_own(&mut self, node: NodeId, name: &str, clock_ms: u64, marks: &[(NodeId, u64)]) {
        let marks_now: BTreeMap<NodeId, u64> = marks.iter().copied().collect();
        if let Some(held) = self.reports.get(&node) {
            if held.taken > 0 && held.marks == marks_now {
                return;
            }
        }
        let previous = self.reports.get(&node).map_or(0, |report| report.taken);
        let report = Report {
            name: name.to_owned(),
            taken: clock_ms.max(previous + 1),
            marks: marks_now,
        };
        self.reports.insert(node, report);
    }

    #[cfg(test)]
    pub fn report(&self, node: &NodeId) -> Option<&Report> {
        self.reports.get(node)
    }

    /// Every node known, with its report.
    pub fn reports(&self) -> impl Iterator<Item = (&NodeId, &Report)> {
        self.reports.iter()
    }

    /// The reports taken later than `sent` says each node's was sent, but not `peer`'s own.
    pub fn newer_than<'a>(
        &'a self,
        sent: &'a BTreeMap<NodeId, u64>,
        peer: &'a NodeId,
    ) -> impl Iterator<Item = (&'a NodeId, &'a Report)> + 'a {
        self.reports.iter().filter(move |(node, report)| {
            *node != peer && report.taken > 0 && sent.get(node).is_none_or(|at| report.taken > *at)
        })
    }

    /// Each origin held here (`held`), with its stable mark over the known nodes that
    /// `counts`.
    pub fn origins(
        &self,
        held: &[(NodeId, u64)],
        counts: impl Fn(&NodeId) -> bool,
    ) -> Vec<OriginStability> {
        let counted: Vec<(&NodeId, &Report)> = self
            .reports
            .iter()
            .filter(|(node, _)| counts(node))
            .collect();
        held.iter()
            .map(|(origin, held)| {
                let mark_of = |report: &Report| report.marks.get(origin).copied().unwrap_or(0);
                let stable = counted
                    .iter()
                    .map(|(_, report)| mark_of(report))
                    .min()
                    .filter(|_| !self.awaits_peers())
                    .unwrap_or(0)
                    .min(*held);
                let held_back_by = if stable < *held {
                    counted
                        .iter()
                        .filter(|(_, report)| mark_of(report) == stable)
                        .map(|(node, _)| **node)
                        .collect()
                } else {
                    Vec::new()
                };
                OriginStability {
                    origin: *origin,
                    held: *held,
                    stable,
                    floor: 0,
                    held_back_by,
                }
            })
            .collect()
    }
}

/// Which entries of each origin's log held here are stable, and what holds them back.
#[derive(Debug, Clone, Default)]
pub struct Reclamation {
    pub origins: Vec<OriginStability>,
    /// Every node known, with its name and when its latest report was taken (0: never heard
    /// from), and whether it counts.
    pub nodes: Vec<(NodeId, String, u64, bool)>,
    /// Documents with changes newly stable, waiting to be compacted.
    pub compaction_pending: usize,
}

impl Engine {
    /// Takes this node's report and sends every peer that speaks version 5 the reports it was
    /// not sent yet (none about itself). A report that finds no room in a peer's outbox is
    /// sent at the next interval.
    pub(super) fn send_reports(&mut self, now: Duration, replica: &impl Replica) {
        let clock_ms = self
            .clock_ms
            .unwrap_or_else(|| u64::try_from(now.as_millis()).unwrap_or(u64::MAX));
        let (node, name) = (self.config.node, self.config.node_name.clone());
        self.stability
            .take_own(node, &name, clock_ms, &replica.origin_marks());
        let peers: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, state)| state.ready && state.version >= 5)
            .map(|(id, _)| *id)
            .collect();
        for peer in peers {
            let Some(state) = self.peers.get_mut(&peer) else {
                continue;
            };
            let due: Vec<(NodeId, u64, Message)> = self
                .stability
                .newer_than(&state.reports_sent, &peer)
                .map(|(node, report)| {
                    let message = Message::Holdings(report.to_message(node));
                    (*node, report.taken, message)
                })
                .collect();
            for (node, taken, message) in due {
                if !state.outbox.push(message) {
                    break;
                }
                state.reports_sent.insert(node, taken);
            }
        }
    }

    /// Keeps a report relayed or sent by a peer; a node not known before is kept in the store.
    pub(super) fn receive_holdings(
        &mut self,
        holdings: &Holdings,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let node = NodeId(holdings.node);
        if node == self.config.node {
            return Ok(());
        }
        if self.stability.note(node, Report::from_message(holdings)) == Noted::NewNode {
            replica.note_known_node(&node, &holdings.name)?;
        }
        Ok(())
    }

    /// Knows `peer`, which said hello: until it reports, it holds nothing stable.
    pub(super) fn know_node(
        &mut self,
        peer: NodeId,
        name: &str,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        if self.stability.know(peer, name) == Noted::NewNode {
            replica.note_known_node(&peer, name)?;
        }
        Ok(())
    }

    /// One step of reclamation: truncates each origin's log towards what every known node
    /// holds (as far as the store's local followers allow), within its bound; once the log
    /// is truncated as far as it may be, compacts documents that became stable, within
    /// theirs. Returns what waits beyond them.
    pub(super) fn reclaim(&mut self, replica: &impl Replica) -> Result<MoreToReclaim, StoreError> {
        let held = replica.origin_marks();
        let stable: Vec<(NodeId, u64)> = self
            .stability
            .origins(&held, |node| counts(replica, node))
            .iter()
            .map(|origin| (origin.origin, origin.stable))
            .collect();
        let truncated = replica.reclaim_log(&stable)?;
        self.stats.log_entries_truncated += truncated as u64;
        if truncated >= crate::store::truncation::TRUNCATE_ENTRIES_PER_STEP {
            // More of the log waits: the next step truncates again at once, and documents
            // are compacted in steps of their own once it is done, so that no step does both.
            return Ok(MoreToReclaim::Log);
        }
        let mut compaction_more = false;
        #[cfg(feature = "sabotage")]
        let anyway = self.config.sabotage.compact_unstable;
        #[cfg(not(feature = "sabotage"))]
        let anyway = false;
        if anyway || self.holds_every_report(&held, |node| counts(replica, node)) {
            let compacted = replica.compact_stable()?;
            self.stats.documents_compacted += compacted.documents as u64;
            compaction_more = replica.compaction_pending() > 0;
        }
        Ok(if compaction_more {
            MoreToReclaim::Documents
        } else {
            MoreToReclaim::Nothing
        })
    }

    /// Whether this node holds everything every node held at its latest report, its own
    /// writes among it (under whichever writers it wrote): then a change made before its
    /// writer held what is stable is here already, and one made after follows it all, so
    /// what is stable may be compacted ([`crate::store::stable`]).
    fn holds_every_report(&self, held: &[(NodeId, u64)], counts: impl Fn(&NodeId) -> bool) -> bool {
        let held_of = |origin: &NodeId| {
            held.iter()
                .find(|(held, _)| held == origin)
                .map_or(0, |(_, mark)| *mark)
        };
        self.stability.reports().all(|(node, report)| {
            *node == self.config.node
                || !counts(node)
                || report
                    .marks
                    .iter()
                    .all(|(origin, mark)| held_of(origin) >= *mark)
        })
    }

    /// Which entries of each origin's log held here are stable, over the known nodes that
    /// count (neither revoked nor removed).
    pub fn reclamation(&self, replica: &impl Replica) -> Reclamation {
        let counts = |node: &NodeId| counts(replica, node);
        let held = replica.origin_marks();
        let mut origins = self.stability.origins(&held, counts);
        for origin in &mut origins {
            origin.floor = replica.log_floor(&origin.origin);
        }
        Reclamation {
            compaction_pending: replica.compaction_pending(),
            origins,
            nodes: self
                .stability
                .reports()
                .map(|(node, report)| (*node, report.name.clone(), report.taken, counts(node)))
                .collect(),
        }
    }
}

/// Whether a known node counts towards what is stable: a revoked node's changes past its
/// cut-off are refused everywhere, and a removed node never comes back, so neither holds
/// anything back.
fn counts(replica: &impl Replica, node: &NodeId) -> bool {
    !replica.is_revoked(node) && !replica.is_removed(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(byte: u8) -> NodeId {
        NodeId([byte; 16])
    }

    fn report(taken: u64, marks: &[(u8, u64)]) -> Report {
        Report {
            name: String::new(),
            taken,
            marks: marks.iter().map(|(o, m)| (node(*o), *m)).collect(),
        }
    }

    #[test]
    fn the_stable_mark_is_the_least_over_known_nodes_and_a_silent_node_holds_nothing() {
        let mut stability = Stability::new(false);
        stability.take_own(node(1), "a", 100, &[(node(1), 50), (node(2), 30)]);
        assert_eq!(
            stability.note(node(2), report(10, &[(1, 40), (2, 30)])),
            Noted::NewNode
        );
        let held = [(node(1), 50), (node(2), 30)];
        let origins = stability.origins(&held, |_| true);
        assert_eq!((origins[0].stable, origins[1].stable), (40, 30));
        assert_eq!(origins[0].held_back_by, vec![node(2)]);
        assert!(origins[1].held_back_by.is_empty());
        // A node known from a hello, not heard from yet, holds nothing.
        assert_eq!(stability.know(node(3), "c"), Noted::NewNode);
        let origins = stability.origins(&held, |_| true);
        assert_eq!((origins[0].stable, origins[1].stable), (0, 0));
        assert_eq!(origins[0].held_back_by, vec![node(3)]);
        // Unless it does not count (revoked).
        let origins = stability.origins(&held, |n| *n != node(3));
        assert_eq!(origins[0].stable, 40);
    }

    #[test]
    fn a_node_that_expects_peers_holds_nothing_stable_until_it_knows_one() {
        let held = [(node(1), 50)];
        // A new node, or one whose store was lost: its own writes are not stable yet.
        let mut waiting = Stability::new(false);
        waiting.take_own(node(1), "a", 100, &held);
        assert_eq!(waiting.origins(&held, |_| true)[0].stable, 0);
        waiting.know(node(2), "b");
        waiting.note(node(2), report(10, &[(1, 20)]));
        assert_eq!(waiting.origins(&held, |_| true)[0].stable, 20);
        // A node removed from the cluster is known still: the node is no longer waiting.
        assert_eq!(waiting.origins(&held, |n| *n != node(2))[0].stable, 50);
        // A node configured without peers counts itself alone.
        let mut alone = Stability::new(true);
        alone.take_own(node(1), "a", 100, &held);
        assert_eq!(alone.origins(&held, |_| true)[0].stable, 50);
    }

    #[test]
    fn only_a_newer_report_replaces_one_and_late_or_repeated_ones_change_nothing() {
        let mut stability = Stability::default();
        stability.note(node(2), report(10, &[(1, 40)]));
        assert_eq!(
            stability.note(node(2), report(10, &[(1, 99)])),
            Noted::Stale
        );
        assert_eq!(stability.note(node(2), report(9, &[(1, 99)])), Noted::Stale);
        assert_eq!(
            stability.note(node(2), report(11, &[(1, 45)])),
            Noted::Newer
        );
        assert_eq!(stability.report(&node(2)).unwrap().marks[&node(1)], 45);
        // Its own report is always later than its previous one, whatever the clock says.
        stability.take_own(node(1), "a", 500, &[(node(1), 1)]);
        stability.take_own(node(1), "a", 400, &[(node(1), 2)]);
        assert_eq!(stability.report(&node(1)).unwrap().taken, 501);
        // Nor is a report taken again when nothing moved: there is nothing new to send.
        stability.take_own(node(1), "a", 900, &[(node(1), 2)]);
        assert_eq!(stability.report(&node(1)).unwrap().taken, 501);
    }

    #[test]
    fn reports_are_relayed_once_each_and_never_to_their_own_node() {
        let mut stability = Stability::default();
        stability.note(node(2), report(10, &[]));
        stability.note(node(3), report(20, &[]));
        stability.know(node(4), "silent");
        let mut sent = BTreeMap::new();
        let first: Vec<NodeId> = stability
            .newer_than(&sent, &node(2))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(first, vec![node(3)]);
        sent.insert(node(3), 20);
        assert_eq!(stability.newer_than(&sent, &node(2)).count(), 0);
        stability.note(node(3), report(30, &[]));
        assert_eq!(stability.newer_than(&sent, &node(2)).count(), 1);
    }

    #[test]
    fn known_nodes_are_bounded() {
        let mut stability = Stability::default();
        stability.load(
            (0..KNOWN_NODES_MAX + 5)
                .map(|i| {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    (NodeId(id), String::new())
                })
                .collect(),
        );
        assert_eq!(stability.reports().count(), KNOWN_NODES_MAX);
        assert_eq!(stability.note(node(0xff), report(1, &[])), Noted::Full);
    }
}
