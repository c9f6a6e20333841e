//! Replication engine: a sans-IO state machine.
//!
//! It takes events — a peer connected or went away, a message arrived, local changes were
//! written, a timer fired — and returns actions: messages to send, connections to close,
//! changes applied. It owns no socket, no clock and no random source: time is an argument
//! (`now`, a duration since any fixed epoch), the network is the caller's, and the store is
//! reached through [`Replica`]. The same code runs under QUIC in production and under the
//! simulator.
//!
//! How peers catch up (`proto/PROTOCOL.md` has the wire side): every change has a place
//! (origin node, sequence) in its origin's log. After the handshake, and every
//! `summary_interval`, each side sends a `Summary` of how much of each origin's log it holds;
//! the other streams what is missing, a bounded number of messages per event. New changes,
//! local or received, are pushed at once to every peer that is up to date for their origin;
//! a peer that is behind gets them through catch-up. Each node tells its peers, with
//! `Prune` and `Graft`, which of them are its sources for each origin (the origin itself while
//! connected, else up to two peers holding most of that origin's log), so a change reaches a
//! node about once rather than once per neighbour. Every 30 s a repair digest finds documents
//! the logs missed. Guarantees:
//!
//! - nothing is sent that is not durable (the store applies remote changes durably, and local
//!   changes reach the engine only after their write was acknowledged);
//! - a change whose dependencies are missing is never applied nor logged: it is held (bounded)
//!   while its document is fetched; if it cannot be held, it is sent again, because the log mark
//!   that the peer sees in the next summary did not move;
//! - duplicates, by log place or by hash, change nothing;
//! - a peer that sends a malformed message is disconnected; others are unaffected.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use automerge::ChangeHash;
use concord_proto::{
    Changes, DigestRange, DocumentChanges, DocumentHeads, Goodbye, GoodbyeReason, Hello, Message,
    NeedDocument, OriginMark, RangeDigest, ShippedChange, Summary, CHANGES_PER_MESSAGE_MAX,
    DOCUMENTS_PER_HEADS_MAX, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, RANGES_PER_DIGEST_MAX,
};

use crate::record::NodeId;
use crate::store::digest::{self, Aggregate};
use crate::store::{ApplyReport, DocStore, DocumentHeadsEntry, LoggedChange, Store, StoreError};

/// Where the engine defaults come from: a summary a second keeps repair latency low while
/// costing a few dozen bytes per origin per peer.
pub const SUMMARY_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Changes per `Changes` message: large enough to amortise framing, small enough that one
/// message of small records stays far below the frame limit.
pub const CHANGES_PER_MESSAGE_DEFAULT: usize = 512;
/// Catch-up messages produced per peer per event, so one event never builds an unbounded
/// backlog; the shell asks for more when the peer's queue drains.
pub const CATCH_UP_MESSAGES_PER_EVENT: usize = 8;
/// Peers that push and catch up an origin's changes to us when the origin itself is not
/// connected: two, so one slow or partitioned relay does not stall it.
pub const RELAYS_PER_ORIGIN: usize = 2;
/// How long a connected peer may take to say hello before the connection is closed (a hello
/// lost, or a peer that never speaks, must not hold a connection open forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Changes held waiting for their dependencies, over all documents.
pub const HELD_CHANGES_MAX: usize = 10_000;
/// How often each peer is sent a repair digest. Summaries already catch everything the logs
/// hold, so repair only has to find what they missed (a truncated log, a bug): a slow beat.
pub const REPAIR_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// (collection, field) pairs whose conflicts are counted apart, so a stream of ever-new field
/// names cannot grow the counters without bound.
pub const CONFLICT_FIELDS_COUNTED_MAX: usize = 1024;
/// Documents answered per `NeedDocument`-free repair pass of one leaf.
const REPAIR_DOCUMENTS_PER_LEAF_MAX: usize = DOCUMENTS_PER_HEADS_MAX;

/// The store side of replication. [`DocStore`] is the implementation; tests and the simulator
/// use it over a memory store.
pub trait Replica {
    fn origin_marks(&self) -> Vec<(NodeId, u64)>;
    fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LoggedChange>, StoreError>;
    fn apply_remote(&self, changes: Vec<LoggedChange>) -> Result<ApplyReport, StoreError>;
    fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;
    fn apply_unlogged(&self, doc_key: &[u8], changes: Vec<Vec<u8>>) -> Result<usize, StoreError>;
    fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError>;
    fn digest(&self, prefix: &str) -> Option<Aggregate>;
    fn leaf_documents(
        &self,
        leaf: &str,
        limit: usize,
    ) -> Result<Vec<DocumentHeadsEntry>, StoreError>;
    fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError>;
}

impl<S: Store> Replica for DocStore<S> {
    fn origin_marks(&self) -> Vec<(NodeId, u64)> {
        DocStore::origin_marks(self)
    }
    fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        DocStore::log_after(self, origin, after, limit)
    }
    fn apply_remote(&self, changes: Vec<LoggedChange>) -> Result<ApplyReport, StoreError> {
        DocStore::apply_remote(self, changes)
    }
    fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        DocStore::document_changes(self, doc_key, have, limit)
    }
    fn apply_unlogged(&self, doc_key: &[u8], changes: Vec<Vec<u8>>) -> Result<usize, StoreError> {
        DocStore::apply_unlogged(self, doc_key, changes)
    }
    fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
        DocStore::heads(self, doc_key)
    }
    fn digest(&self, prefix: &str) -> Option<Aggregate> {
        DocStore::digest(self, prefix)
    }
    fn leaf_documents(
        &self,
        leaf: &str,
        limit: usize,
    ) -> Result<Vec<DocumentHeadsEntry>, StoreError> {
        DocStore::leaf_documents(self, leaf, limit)
    }
    fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError> {
        DocStore::missing_changes(self, doc_key, hashes)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: [u8; 16],
    pub node: NodeId,
    pub node_name: String,
    pub summary_interval: Duration,
    pub repair_interval: Duration,
    pub changes_per_message: usize,
    /// [`crate::policy::Policies::hash`] of this node, sent to peers that speak version 2.
    pub policy_hash: [u8; 32],
    /// Deliberate bugs (simulator tests only).
    #[cfg(feature = "sabotage")]
    pub sabotage: crate::Sabotage,
}

impl Config {
    pub fn new(cluster: [u8; 16], node: NodeId, node_name: &str) -> Self {
        Self {
            cluster,
            node,
            node_name: node_name.to_owned(),
            summary_interval: SUMMARY_INTERVAL_DEFAULT,
            repair_interval: REPAIR_INTERVAL_DEFAULT,
            changes_per_message: CHANGES_PER_MESSAGE_DEFAULT,
            policy_hash: crate::policy::Policies::default().hash(),
            #[cfg(feature = "sabotage")]
            sabotage: crate::Sabotage::default(),
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// A connection to `peer` is up (its node id was authenticated by the transport).
    PeerConnected(NodeId),
    PeerDisconnected(NodeId),
    Received(NodeId, Message),
    /// Changes written on this node, durable, with their log places.
    LocalChanges(Vec<LoggedChange>),
    /// The peer's outgoing queue has room again: continue its catch-up.
    PeerWritable(NodeId),
    /// The time asked for by [`Engine::poll_timeout`] has come.
    Timeout,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(NodeId, Message),
    /// Send the goodbye, then close the connection.
    Disconnect(NodeId, Goodbye),
    /// Changes that arrived from `from` and were applied here.
    Applied {
        from: NodeId,
        changes: Vec<LoggedChange>,
    },
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub changes_sent: u64,
    /// Of `changes_sent`, those pushed as they were written or received (the rest were
    /// streamed from the log to a peer catching up).
    pub changes_pushed: u64,
    pub changes_received: u64,
    pub changes_applied: u64,
    pub duplicates: u64,
    pub held: u64,
    pub held_dropped: u64,
    pub messages_sent: u64,
    pub malformed: u64,
    /// Repair digests sent, and documents found out of step by them.
    pub repair_rounds: u64,
    pub repair_documents: u64,
    /// Fields that became conflicting as changes from peers were applied.
    pub conflicts: u64,
    /// The same by (collection, field), for the first [`CONFLICT_FIELDS_COUNTED_MAX`] pairs
    /// seen; later pairs count in `conflicts` only.
    pub conflicts_by_field: BTreeMap<(String, String), u64>,
}

/// Whether a peer resolves conflicts by the same policies as this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PeerPolicies {
    /// Not said yet, or the peer speaks protocol version 1, which cannot say it.
    #[default]
    Unknown,
    Same,
    /// The peer's policies differ: the same documents show different winners there.
    Differ,
}

impl PeerPolicies {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Same => "same",
            Self::Differ => "differ",
        }
    }
}

#[derive(Debug, Default)]
struct Peer {
    ready: bool,
    /// What the peer said of its policies.
    policies: PeerPolicies,
    /// When the connection came up: the handshake must complete within [`HANDSHAKE_TIMEOUT`].
    connected_at: Duration,
    /// Per origin: the peer holds, or was sent, every entry up to this sequence.
    sent: BTreeMap<NodeId, u64>,
    /// `sent` as it was at the previous summary from the peer.
    sent_at_last_summary: BTreeMap<NodeId, u64>,
    /// Origins whose log this peer is being streamed from the store.
    catching_up: BTreeSet<NodeId>,
    /// The peer's last reported marks, for lag.
    reported: BTreeMap<NodeId, u64>,
    /// Origins this peer receives directly and asked us not to relay (Prune).
    pruned: BTreeSet<NodeId>,
    /// Origins we asked this peer not to relay to us.
    pruned_by_us: BTreeSet<NodeId>,
}

pub struct Engine {
    config: Config,
    peers: BTreeMap<NodeId, Peer>,
    held: BTreeMap<Vec<u8>, Vec<(NodeId, LoggedChange)>>,
    held_count: usize,
    next_summary: Option<Duration>,
    next_repair: Option<Duration>,
    stats: Stats,
    /// What the last rebalance weighed; `None` until one ran with ready peers.
    balanced: Option<Balanced>,
}

/// The inputs of the last rebalance that decide whether the next may weigh only what changed.
#[derive(Debug)]
struct Balanced {
    ready: Vec<NodeId>,
    origins: BTreeSet<NodeId>,
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

fn shipped(change: &LoggedChange) -> ShippedChange {
    ShippedChange {
        origin: change.origin.0,
        sequence: change.sequence,
        doc: String::from_utf8_lossy(&change.doc_key).into_owned(),
        change: change.change.clone(),
    }
}

fn goodbye(reason: GoodbyeReason, detail: impl Into<String>) -> Goodbye {
    let mut detail = detail.into();
    detail.truncate(concord_proto::DETAIL_BYTES_MAX);
    Goodbye { reason, detail }
}

impl Engine {
    pub fn new(config: Config) -> Self {
        assert!(
            config.changes_per_message > 0 && config.changes_per_message <= CHANGES_PER_MESSAGE_MAX
        );
        Self {
            config,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            held_count: 0,
            next_summary: None,
            next_repair: None,
            stats: Stats::default(),
            balanced: None,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether `peer` resolves conflicts as this node does, as far as it said.
    pub fn peer_policies(&self, peer: &NodeId) -> PeerPolicies {
        self.peers
            .get(peer)
            .map(|state| state.policies)
            .unwrap_or_default()
    }

    /// Peers whose handshake completed.
    pub fn ready_peers(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, peer)| peer.ready)
            .map(|(id, _)| *id)
            .collect()
    }

    /// How many log entries `peer` lacks by its last summary, over all origins held here.
    pub fn lag(&self, peer: &NodeId, marks: &[(NodeId, u64)]) -> Option<u64> {
        let peer = self.peers.get(peer)?;
        Some(
            marks
                .iter()
                .map(|(origin, mark)| {
                    mark.saturating_sub(peer.reported.get(origin).copied().unwrap_or(0))
                })
                .sum(),
        )
    }

    /// When the engine next wants [`Event::Timeout`].
    pub fn poll_timeout(&self) -> Option<Duration> {
        match (self.next_summary, self.next_repair) {
            (Some(summary), Some(repair)) => Some(summary.min(repair)),
            (summary, repair) => summary.or(repair),
        }
    }

    /// Handles one event at time `now`.
    pub fn handle(
        &mut self,
        now: Duration,
        event: Event,
        replica: &impl Replica,
    ) -> Result<Vec<Action>, StoreError> {
        let mut actions = Vec::new();
        if self.next_summary.is_none() {
            self.next_summary = Some(now + self.config.summary_interval);
            self.next_repair = Some(now + self.config.repair_interval);
        }
        match event {
            Event::PeerConnected(peer) => {
                self.peers.insert(
                    peer,
                    Peer {
                        connected_at: now,
                        ..Peer::default()
                    },
                );
                let hello = Message::Hello(Hello {
                    cluster: self.config.cluster,
                    node: self.config.node.0,
                    node_name: self.config.node_name.clone(),
                    version_min: PROTOCOL_VERSION_MIN,
                    version_max: PROTOCOL_VERSION,
                });
                self.send(&mut actions, peer, hello);
            }
            Event::PeerDisconnected(peer) => {
                self.peers.remove(&peer);
                self.rebalance(replica, &mut actions, None);
            }
            Event::Received(peer, message) => self.receive(peer, message, replica, &mut actions)?,
            Event::LocalChanges(changes) => self.push(&changes, None, replica, &mut actions)?,
            Event::PeerWritable(peer) => self.drive_catch_up(peer, replica, &mut actions)?,
            Event::Timeout => {
                if self.next_summary.is_some_and(|due| now >= due) {
                    self.next_summary = Some(now + self.config.summary_interval);
                    let summary = self.summary(replica);
                    for peer in self.ready_peers() {
                        self.send(&mut actions, peer, summary.clone());
                    }
                }
                if self.next_repair.is_some_and(|due| now >= due) {
                    self.next_repair = Some(now + self.config.repair_interval);
                    let top = self.digest_message(replica, &digest::children(""));
                    for peer in self.ready_peers() {
                        self.stats.repair_rounds += 1;
                        self.send(&mut actions, peer, top.clone());
                    }
                }
                let silent: Vec<NodeId> = self
                    .peers
                    .iter()
                    .filter(|(_, state)| {
                        !state.ready && now.saturating_sub(state.connected_at) >= HANDSHAKE_TIMEOUT
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for peer in silent {
                    self.disconnect(
                        &mut actions,
                        peer,
                        GoodbyeReason::HandshakeTimeout,
                        "no hello in time".to_owned(),
                    );
                }
                for peer in self.ready_peers() {
                    self.drive_catch_up(peer, replica, &mut actions)?;
                }
            }
        }
        Ok(actions)
    }

    fn send(&mut self, actions: &mut Vec<Action>, peer: NodeId, message: Message) {
        #[cfg(feature = "sabotage")]
        if self.config.sabotage.skip_summaries && matches!(message, Message::Summary(_)) {
            return;
        }
        self.stats.messages_sent += 1;
        if let Message::Changes(changes) = &message {
            self.stats.changes_sent += changes.changes.len() as u64;
        }
        actions.push(Action::Send(peer, message));
    }

    fn disconnect(
        &mut self,
        actions: &mut Vec<Action>,
        peer: NodeId,
        reason: GoodbyeReason,
        detail: String,
    ) {
        if reason == GoodbyeReason::Malformed {
            self.stats.malformed += 1;
        }
        self.peers.remove(&peer);
        actions.push(Action::Disconnect(peer, goodbye(reason, detail)));
    }

    fn summary(&self, replica: &impl Replica) -> Message {
        Message::Summary(Summary {
            origins: replica
                .origin_marks()
                .into_iter()
                .map(|(origin, contiguous)| OriginMark {
                    origin: origin.0,
                    contiguous,
                })
                .collect(),
        })
    }

    fn receive(
        &mut self,
        peer: NodeId,
        message: Message,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let Some(state) = self.peers.get(&peer) else {
            return Ok(());
        };
        if let Err(error) = message.check() {
            self.disconnect(actions, peer, GoodbyeReason::Malformed, error.to_string());
            return Ok(());
        }
        let ready = state.ready;
        match message {
            Message::Hello(hello) => {
                if ready {
                    self.disconnect(
                        actions,
                        peer,
                        GoodbyeReason::Malformed,
                        "a second hello".to_owned(),
                    );
                } else if hello.cluster != self.config.cluster {
                    self.disconnect(
                        actions,
                        peer,
                        GoodbyeReason::WrongCluster,
                        "cluster id differs".to_owned(),
                    );
                } else if hello.version_min > PROTOCOL_VERSION
                    || hello.version_max < PROTOCOL_VERSION_MIN
                {
                    self.disconnect(
                        actions,
                        peer,
                        GoodbyeReason::UnsupportedVersion,
                        format!("this node speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}"),
                    );
                } else if hello.node != peer.0 {
                    self.disconnect(
                        actions,
                        peer,
                        GoodbyeReason::Malformed,
                        "node id differs from the certificate".to_owned(),
                    );
                } else {
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.ready = true;
                    }
                    if hello.version_max.min(PROTOCOL_VERSION) >= 2 {
                        let hash = self.config.policy_hash;
                        self.send(actions, peer, Message::PolicyHash { hash });
                    }
                    let summary = self.summary(replica);
                    self.send(actions, peer, summary);
                    self.rebalance(replica, actions, None);
                }
            }
            Message::PolicyHash { hash } => {
                let said = if hash == self.config.policy_hash {
                    PeerPolicies::Same
                } else {
                    PeerPolicies::Differ
                };
                if said == PeerPolicies::Differ {
                    tracing::warn!(
                        %peer,
                        "the peer's conflict policies differ from this node's: the same records \
                         resolve to different values there (compare [[policies]] in concord.toml)"
                    );
                }
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.policies = said;
                }
            }
            // Before the handshake nothing else counts; over a network that reorders, such a
            // message is ignored rather than taken for malice (the summaries resend its content).
            _ if !ready => {}
            Message::Summary(summary) => self.receive_summary(peer, summary, replica, actions)?,
            Message::Changes(changes) => self.receive_changes(peer, changes, replica, actions)?,
            Message::NeedDocument(need) => {
                let have: Vec<ChangeHash> =
                    need.have.iter().map(|bytes| ChangeHash(*bytes)).collect();
                let changes = replica.document_changes(
                    need.doc.as_bytes(),
                    &have,
                    CHANGES_PER_MESSAGE_MAX,
                )?;
                self.send(
                    actions,
                    peer,
                    Message::DocumentChanges(DocumentChanges {
                        doc: need.doc,
                        changes,
                    }),
                );
            }
            Message::DocumentChanges(answer) => {
                match replica.apply_unlogged(answer.doc.as_bytes(), answer.changes) {
                    Ok(_) => {}
                    Err(StoreError::InvalidDocument(detail)) => {
                        self.disconnect(actions, peer, GoodbyeReason::Malformed, detail);
                        return Ok(());
                    }
                    Err(error) => return Err(error),
                }
                if let Some(held) = self.held.remove(answer.doc.as_bytes()) {
                    self.held_count -= held.len();
                    for (from, change) in held {
                        self.apply_and_relay(from, vec![change], replica, actions)?;
                    }
                }
            }
            Message::Ping { nonce } => self.send(actions, peer, Message::Pong { nonce }),
            Message::Prune { origins } => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    for origin in origins {
                        let origin = NodeId(origin);
                        state.pruned.insert(origin);
                        state.catching_up.remove(&origin);
                    }
                }
            }
            Message::Graft { origins } => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    for origin in origins {
                        let origin = NodeId(origin);
                        state.pruned.remove(&origin);
                        // What the peer missed meanwhile comes through catch-up.
                        state.catching_up.insert(origin);
                    }
                }
                self.drive_catch_up(peer, replica, actions)?;
            }
            Message::Pong { .. } => {}
            Message::Goodbye(_) => {
                self.peers.remove(&peer);
            }
            Message::RangeDigest(digest) => self.receive_digest(peer, digest, replica, actions)?,
            Message::DocumentHeads(heads) => self.receive_heads(peer, heads, replica, actions)?,
        }
        Ok(())
    }

    fn receive_summary(
        &mut self,
        peer: NodeId,
        summary: Summary,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let marks = replica.origin_marks();
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let reported: BTreeMap<NodeId, u64> = summary
            .origins
            .iter()
            .map(|mark| (NodeId(mark.origin), mark.contiguous))
            .collect();
        // A summary lists every origin the peer holds; one it leaves out, it holds nothing of.
        let origins: BTreeSet<NodeId> = reported.keys().chain(state.sent.keys()).copied().collect();
        for origin in origins {
            let theirs = reported.get(&origin).copied().unwrap_or(0);
            let sent = state.sent.entry(origin).or_insert(0);
            let sent_before = state
                .sent_at_last_summary
                .get(&origin)
                .copied()
                .unwrap_or(0);
            // Anything sent a whole summary ago that the peer still does not hold was not
            // taken (held for dependencies and dropped, or lost): send again from its mark.
            if theirs < sent_before || theirs > *sent {
                *sent = theirs;
            }
        }
        for (origin, mine) in &marks {
            // An origin the peer reaches directly serves its own log to it.
            if state.pruned.contains(origin) {
                continue;
            }
            let sent = state.sent.entry(*origin).or_insert(0);
            if *sent < *mine {
                state.catching_up.insert(*origin);
            }
        }
        state.sent_at_last_summary = state.sent.clone();
        let changed: BTreeSet<NodeId> = reported
            .iter()
            .filter(|(origin, mark)| state.reported.get(origin) != Some(mark))
            .map(|(origin, _)| *origin)
            .collect();
        // An origin the peer no longer reports may leave the weighed set: weigh everything.
        let shrunk = state
            .reported
            .keys()
            .any(|origin| !reported.contains_key(origin));
        state.reported = reported;
        self.rebalance(replica, actions, (!shrunk).then_some(&changed));
        self.drive_catch_up(peer, replica, actions)
    }

    fn receive_changes(
        &mut self,
        peer: NodeId,
        changes: Changes,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        self.stats.changes_received += changes.changes.len() as u64;
        let mut logged = Vec::with_capacity(changes.changes.len());
        if let Some(state) = self.peers.get_mut(&peer) {
            for change in changes.changes {
                let origin = NodeId(change.origin);
                // The sender holds it: never echo it back.
                let sent = state.sent.entry(origin).or_insert(0);
                if change.sequence == *sent + 1 {
                    *sent = change.sequence;
                }
                logged.push(LoggedChange {
                    origin,
                    sequence: change.sequence,
                    doc_key: change.doc.into_bytes(),
                    change: change.change,
                });
            }
        }
        self.apply_and_relay(peer, logged, replica, actions)
    }

    fn apply_and_relay(
        &mut self,
        from: NodeId,
        changes: Vec<LoggedChange>,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let report = replica.apply_remote(changes)?;
        self.stats.duplicates += report.duplicates as u64;
        self.stats.conflicts += report.conflicts.len() as u64;
        for conflict in report.conflicts {
            let by_field = &mut self.stats.conflicts_by_field;
            let pair = (conflict.collection, conflict.field);
            if let Some(count) = by_field.get_mut(&pair) {
                *count += 1;
            } else if by_field.len() < CONFLICT_FIELDS_COUNTED_MAX {
                by_field.insert(pair, 1);
            }
        }
        if let Some((_, reason)) = report.invalid.first() {
            let detail = format!("invalid change: {reason}");
            self.disconnect(actions, from, GoodbyeReason::Malformed, detail);
        }
        let mut asked = BTreeSet::new();
        for change in report.missing_dependencies {
            if self.held_count >= HELD_CHANGES_MAX {
                // Not logged, so the sender's next summary comparison sends it again.
                self.stats.held_dropped += 1;
                continue;
            }
            self.stats.held += 1;
            if asked.insert(change.doc_key.clone()) && self.peers.contains_key(&from) {
                let have = replica.heads(&change.doc_key)?;
                let need = NeedDocument {
                    doc: String::from_utf8_lossy(&change.doc_key).into_owned(),
                    have: have.iter().map(|hash| hash.0).collect(),
                };
                self.send(actions, from, Message::NeedDocument(need));
            }
            self.held_count += 1;
            self.held
                .entry(change.doc_key.clone())
                .or_default()
                .push((from, change));
        }
        if !report.applied.is_empty() {
            self.stats.changes_applied += report.applied.len() as u64;
            self.push(&report.applied, Some(from), replica, actions)?;
            actions.push(Action::Applied {
                from,
                changes: report.applied,
            });
        }
        Ok(())
    }

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
    fn rebalance(
        &mut self,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
        changed: Option<&BTreeSet<NodeId>>,
    ) {
        let ready = self.ready_peers();
        if ready.is_empty() {
            self.balanced = None;
            return;
        }
        let mut origins: BTreeSet<NodeId> = replica
            .origin_marks()
            .into_iter()
            .map(|(origin, _)| origin)
            .collect();
        let incremental = match (&self.balanced, changed) {
            (Some(balanced), Some(changed)) if balanced.ready == ready => {
                origins.extend(changed.iter().copied());
                origins.remove(&self.config.node);
                let fresh: Vec<NodeId> = origins.difference(&balanced.origins).copied().collect();
                let mut scope: BTreeSet<NodeId> = changed.clone();
                scope.extend(fresh);
                scope.remove(&self.config.node);
                Some(scope)
            }
            _ => None,
        };
        let full = incremental.is_none();
        let scope = match incremental {
            Some(scope) => {
                if let Some(balanced) = self.balanced.as_mut() {
                    balanced.origins.extend(scope.iter().copied());
                }
                scope
            }
            None => {
                for peer in &ready {
                    origins.insert(*peer);
                    origins.extend(self.peers[peer].reported.keys().copied());
                }
                origins.remove(&self.config.node);
                self.balanced = Some(Balanced {
                    ready: ready.clone(),
                    origins: origins.clone(),
                });
                origins
            }
        };
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
        // Per ready peer (by position): its mark for the origin weighed, and whether it is
        // a source of it now.
        let mut weighed: Vec<(u64, bool)> = Vec::with_capacity(ready.len());
        for origin in &scope {
            weighed.clear();
            weighed.extend(states.iter().map(|state| {
                (
                    state.reported.get(origin).copied().unwrap_or(0),
                    !state.pruned_by_us.contains(origin),
                )
            }));
            let mut wanted: Vec<bool> = vec![false; ready.len()];
            if let Ok(position) = ready.binary_search(origin) {
                wanted[position] = true;
            } else {
                let current = weighed.iter().filter(|(_, source)| *source).count();
                let best = |sources: bool| {
                    weighed
                        .iter()
                        .filter(|(_, source)| *source == sources)
                        .map(|(mark, _)| *mark)
                        .max()
                };
                let keep = current <= RELAYS_PER_ORIGIN && current > 0 && best(false) <= best(true);
                if keep {
                    for (want, (_, source)) in wanted.iter_mut().zip(&weighed) {
                        *want = *source;
                    }
                } else {
                    let mut ranked: Vec<(std::cmp::Reverse<u64>, u64, usize)> = weighed
                        .iter()
                        .enumerate()
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
                }
            }
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
        for peer in &ready {
            let prune = prunes.remove(peer).unwrap_or_default();
            let mut graft = grafts.remove(peer).unwrap_or_default();
            graft.sort_unstable();
            let Some(state) = self.peers.get_mut(peer) else {
                continue;
            };
            for origin in &prune {
                state.pruned_by_us.insert(NodeId(*origin));
            }
            for origin in &graft {
                state.pruned_by_us.remove(&NodeId(*origin));
            }
            if !prune.is_empty() {
                self.send(actions, *peer, Message::Prune { origins: prune });
            }
            if !graft.is_empty() {
                self.send(actions, *peer, Message::Graft { origins: graft });
            }
        }
    }

    /// Sends new changes at once to every ready peer that is up to date for their origins;
    /// peers that are behind get them through catch-up.
    fn push(
        &mut self,
        changes: &[LoggedChange],
        except: Option<NodeId>,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let per_message = self.config.changes_per_message;
        let mut outgoing: Vec<(NodeId, Vec<ShippedChange>)> = Vec::new();
        let mut behind = Vec::new();
        for (peer_id, peer) in self.peers.iter_mut() {
            if !peer.ready || Some(*peer_id) == except {
                continue;
            }
            let mut batch = Vec::new();
            for change in changes {
                let sent = peer.sent.entry(change.origin).or_insert(0);
                if change.sequence <= *sent {
                    continue;
                }
                if peer.pruned.contains(&change.origin) {
                    // The peer gets this origin directly; summaries cover any gap.
                    continue;
                } else if change.sequence == *sent + 1 && !peer.catching_up.contains(&change.origin)
                {
                    *sent = change.sequence;
                    batch.push(shipped(change));
                } else {
                    peer.catching_up.insert(change.origin);
                    behind.push(*peer_id);
                }
            }
            if !batch.is_empty() {
                outgoing.push((*peer_id, batch));
            }
        }
        for (peer, batch) in outgoing {
            self.stats.changes_pushed += batch.len() as u64;
            for chunk in batch.chunks(per_message) {
                self.send(
                    actions,
                    peer,
                    Message::Changes(Changes {
                        changes: chunk.to_vec(),
                    }),
                );
            }
        }
        behind.dedup();
        for peer in behind {
            self.drive_catch_up(peer, replica, actions)?;
        }
        Ok(())
    }

    fn digest_message(&self, replica: &impl Replica, prefixes: &[String]) -> Message {
        let ranges = prefixes
            .iter()
            .map(|prefix| {
                let aggregate = replica.digest(prefix).unwrap_or_default();
                DigestRange {
                    start: prefix.clone(),
                    end: String::new(),
                    count: aggregate.count,
                    fingerprint: aggregate.fingerprint,
                }
            })
            .collect();
        Message::RangeDigest(RangeDigest { ranges })
    }

    /// Compares the peer's buckets with ours: matching ones are done; for the others, send the
    /// finer buckets under them, or, at a leaf, our documents in it with their heads.
    fn receive_digest(
        &mut self,
        peer: NodeId,
        digest: RangeDigest,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let mut finer = Vec::new();
        for range in digest.ranges {
            let Some((depth, _)) = digest::parse_prefix(&range.start) else {
                self.disconnect(
                    actions,
                    peer,
                    GoodbyeReason::Malformed,
                    format!("bad digest bucket {:?}", range.start),
                );
                return Ok(());
            };
            let mine = replica.digest(&range.start).unwrap_or_default();
            if mine.count == range.count && mine.fingerprint == range.fingerprint {
                continue;
            }
            if depth + 1 < digest::BUCKET_HEX_DIGITS {
                finer.extend(digest::children(&range.start));
            } else {
                let documents =
                    replica.leaf_documents(&range.start, REPAIR_DOCUMENTS_PER_LEAF_MAX)?;
                let documents = documents
                    .into_iter()
                    .map(|(doc_key, heads)| {
                        (
                            String::from_utf8_lossy(&doc_key).into_owned(),
                            heads.iter().map(|hash| hash.0).collect(),
                        )
                    })
                    .collect();
                self.send(
                    actions,
                    peer,
                    Message::DocumentHeads(DocumentHeads {
                        leaf: range.start,
                        documents,
                    }),
                );
            }
        }
        for chunk in finer.chunks(RANGES_PER_DIGEST_MAX) {
            let message = self.digest_message(replica, chunk);
            self.send(actions, peer, message);
        }
        Ok(())
    }

    /// The peer's documents in a leaf: ask for what we lack, send what it lacks.
    fn receive_heads(
        &mut self,
        peer: NodeId,
        heads: DocumentHeads,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let mut listed = BTreeSet::new();
        for (doc, their_heads) in heads.documents {
            let their_heads: Vec<ChangeHash> =
                their_heads.iter().map(|bytes| ChangeHash(*bytes)).collect();
            let doc_key = doc.into_bytes();
            listed.insert(doc_key.clone());
            let mine = replica.heads(&doc_key)?;
            let mut sorted_mine = mine.clone();
            sorted_mine.sort_unstable();
            let mut sorted_theirs = their_heads.clone();
            sorted_theirs.sort_unstable();
            if sorted_mine == sorted_theirs {
                continue;
            }
            self.stats.repair_documents += 1;
            let doc = String::from_utf8_lossy(&doc_key).into_owned();
            if !replica.missing_changes(&doc_key, &their_heads)?.is_empty() {
                let need = NeedDocument {
                    doc: doc.clone(),
                    have: mine.iter().map(|hash| hash.0).collect(),
                };
                self.send(actions, peer, Message::NeedDocument(need));
            }
            let theirs_lack =
                replica.document_changes(&doc_key, &their_heads, CHANGES_PER_MESSAGE_MAX)?;
            if !theirs_lack.is_empty() {
                self.send(
                    actions,
                    peer,
                    Message::DocumentChanges(DocumentChanges {
                        doc,
                        changes: theirs_lack,
                    }),
                );
            }
        }
        // Documents of ours in that leaf that the peer does not hold at all.
        for (doc_key, _) in replica.leaf_documents(&heads.leaf, REPAIR_DOCUMENTS_PER_LEAF_MAX)? {
            if listed.contains(&doc_key) {
                continue;
            }
            self.stats.repair_documents += 1;
            let changes = replica.document_changes(&doc_key, &[], CHANGES_PER_MESSAGE_MAX)?;
            let doc = String::from_utf8_lossy(&doc_key).into_owned();
            self.send(
                actions,
                peer,
                Message::DocumentChanges(DocumentChanges { doc, changes }),
            );
        }
        Ok(())
    }

    /// Streams up to [`CATCH_UP_MESSAGES_PER_EVENT`] messages of log to `peer`.
    fn drive_catch_up(
        &mut self,
        peer: NodeId,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let per_message = self.config.changes_per_message;
        for _ in 0..CATCH_UP_MESSAGES_PER_EVENT {
            let Some(state) = self.peers.get_mut(&peer) else {
                return Ok(());
            };
            let Some(origin) = state.catching_up.first().copied() else {
                return Ok(());
            };
            if state.pruned.contains(&origin) {
                state.catching_up.remove(&origin);
                continue;
            }
            let after = state.sent.get(&origin).copied().unwrap_or(0);
            let batch = replica.log_after(&origin, after, per_message)?;
            if batch.len() < per_message {
                state.catching_up.remove(&origin);
            }
            let Some(last) = batch.last() else { continue };
            state.sent.insert(origin, last.sequence);
            let changes = batch.iter().map(shipped).collect();
            self.send(actions, peer, Message::Changes(Changes { changes }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
