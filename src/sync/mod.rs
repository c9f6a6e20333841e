//! Replication engine: a sans-IO state machine.
//!
//! It takes events — a peer connected or went away, a message arrived, local changes were
//! written, a timer fired — and returns actions (close a connection, changes were applied);
//! what it has to say to each peer it gives out only when asked, through
//! [`Engine::poll_transmit`], within the bytes the caller has room for (quinn-proto's
//! `poll_transmit` is the model). It owns no socket, no clock and no random source: time is
//! an argument (`now`, a duration since any fixed epoch), the network is the caller's, and the
//! store is reached through [`Replica`]. [`Driver`] is the one loop that feeds it and carries
//! out what it returns: `concord run`, the engine's tests and the simulator all use it.
//!
//! How peers catch up (`proto/PROTOCOL.md` has the wire side): every change has a place
//! (origin node, sequence) in its origin's log. After the handshake, and every
//! `summary_interval`, each side sends a `Summary` of how much of each origin's log it holds.
//! From then on, everything a peer lacks of the logs held here is streamed to it, as fast as
//! the transport takes it: the newest changes from memory ([`outbound::RecentChanges`]),
//! older ones from the store. New changes are therefore pushed at once to a peer that keeps
//! up, and a peer that falls behind is caught up from the store, by the same path. Each node
//! tells its peers, with `Prune` and `Graft`, which of them are its sources for each origin
//! ([`relay`]), so a change reaches a node about once rather than once per neighbour. A slow
//! repair digest ([`repair`]) finds documents the logs missed. Guarantees:
//!
//! - nothing leaves that is not durable: changes from peers are applied without waiting for
//!   the disk, and the first output asked for after them makes them durable first;
//! - every message fits one frame: messages are sized by their encoded bytes against the room
//!   the caller gives (never by count alone), and the largest change a node accepts fits a
//!   frame by itself (`concord_proto::CHANGE_BYTES_MAX`);
//! - nothing the engine counts as sent is dropped by the shell: output is produced only when
//!   the transport has room for it; what a peer still lacks after a summary interval (held for
//!   dependencies and expired, lost with a connection) is sent again from its reported mark;
//! - a change whose dependencies are missing is never applied nor logged: it is held (bounded
//!   in count, bytes and time) while its document is fetched, and otherwise sent again;
//! - duplicates, by log place or by hash, change nothing;
//! - a peer that sends a malformed message is disconnected; others are unaffected.

mod catch_up;
mod driver;
mod held;
mod outbound;
mod receive;
mod relay;
mod repair;
mod replica;
pub mod stability;
mod step_times;

use std::collections::BTreeMap;
use std::time::Duration;

use automerge::ChangeHash;
use concord_proto::{
    CompactedDocument, Goodbye, GoodbyeReason, Message, Summary, CHANGES_PER_MESSAGE_MAX,
};

pub use driver::{
    Driver, DriverStats, Input, Output, LOCAL_PUSH_BYTES_MAX, LOCAL_PUSH_CHANGES_MAX,
    PEER_QUEUE_BYTES,
};
pub use held::{HELD_BYTES_MAX, HELD_CHANGES_MAX, HELD_CHANGE_TTL};
pub use outbound::{OUTBOX_BYTES_MAX, OUTBOX_MESSAGES_MAX, RECENT_CHANGES_BYTES_MAX};
pub use replica::Replica;
pub use step_times::{PhaseTime, StepTimes};

use crate::record::NodeId;
use crate::store::{LoggedChange, RefusalReason, StoreError};
use held::Held;
use outbound::{Peer, RecentChanges};

/// Where the engine defaults come from: a summary a second keeps repair latency low while
/// costing a few dozen bytes per origin per peer.
pub const SUMMARY_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Between two steps of reclamation while documents wait to be compacted (at most
/// [`crate::store::stable::COMPACT_DOCUMENTS_PER_STEP`] a step) and the log is truncated as
/// far as it may be: a step takes some milliseconds, and a change that arrives during one
/// waits for it, so these steps take a share of the engine's time rather than all of it.
/// After a catch-up of 20,000 records, back-to-back steps had put the write-to-visible p99 at
/// 15.7-19.6 ms (3.3-3.4 ms before there was reclamation). While log entries wait beyond a
/// step's bound the next step comes at once and truncates only: a log written faster than it
/// is truncated would grow without end.
pub const RECLAIM_STEP_PAUSE: Duration = Duration::from_millis(10);
/// Changes per `Changes` message at most, whatever their size: large enough to amortise
/// framing; messages are bounded by bytes first.
pub const CHANGES_PER_MESSAGE_DEFAULT: usize = 512;
/// Peers that push and catch up an origin's changes to us when the origin itself is not
/// connected: two, so one slow or partitioned relay does not stall it.
pub const RELAYS_PER_ORIGIN: usize = 2;
/// Bytes of compacted documents waiting until their stamps are not ahead of this node's
/// clock (a few documents: each takes at most one message).
pub const COMPACTED_AHEAD_BYTES_MAX: usize = 16 * 1024 * 1024;
/// How long a connected peer may take to say hello before the connection is closed (a hello
/// lost, or a peer that never speaks, must not hold a connection open forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each peer is sent a repair digest. Summaries already catch everything the logs
/// hold, so repair only has to find what they missed (a truncated log, a bug): a slow beat.
pub const REPAIR_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// How far ahead of this node's clock a change may be stamped, unless the config says
/// otherwise: further ahead, it waits until it no longer is. CockroachDB's `max-offset` is the
/// model; a change stamped ahead would push every later write to its record ahead too, and
/// win under `lww` until the world caught up with it.
pub const CLOCK_AHEAD_MAX_DEFAULT: Duration = Duration::from_secs(2);

/// (collection, field) pairs whose conflicts are counted apart, so a stream of ever-new field
/// names cannot grow the counters without bound.
pub const CONFLICT_FIELDS_COUNTED_MAX: usize = 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: [u8; 16],
    /// This node's identity, as its certificate names it.
    pub node: NodeId,
    /// The origin of this node's own log: the writer its store writes under (see
    /// [`crate::store::claim_writer`]). Its changes are pushed from the log as they are
    /// written; every other origin, this node's former writers among them, is caught up from
    /// peers like any other.
    pub writer: NodeId,
    pub node_name: String,
    pub summary_interval: Duration,
    pub repair_interval: Duration,
    /// How often reports of what this node holds are taken and relayed, and the log
    /// truncated up to what became stable ([`stability::REPORT_INTERVAL`] unless set).
    pub report_interval: Duration,
    /// Changes per message at most; messages are bounded by bytes first.
    pub changes_per_message: usize,
    /// [`crate::policy::Policies::hash`] of this node, sent to peers that speak version 2.
    pub policy_hash: [u8; 32],
    /// How far ahead of this node's clock ([`Engine::set_clock`]) a change from a peer may be
    /// stamped: further ahead, it is not applied until it no longer is.
    pub clock_ahead_max: Duration,
    /// Whether this node runs without peers of its own (none configured): knowing no other
    /// node, it may count what it holds as stable. A node that expects peers holds nothing
    /// stable until it knows one (a new node, or one whose store was lost, would otherwise
    /// compact its own writes before any other node held them).
    pub runs_alone: bool,
    /// Deliberate bugs (simulator tests only).
    #[cfg(feature = "sabotage")]
    pub sabotage: crate::Sabotage,
}

impl Config {
    pub fn new(cluster: [u8; 16], node: NodeId, node_name: &str) -> Self {
        Self {
            cluster,
            node,
            writer: node,
            node_name: node_name.to_owned(),
            summary_interval: SUMMARY_INTERVAL_DEFAULT,
            repair_interval: REPAIR_INTERVAL_DEFAULT,
            report_interval: stability::REPORT_INTERVAL,
            changes_per_message: CHANGES_PER_MESSAGE_DEFAULT,
            policy_hash: crate::policy::Policies::default().hash(),
            clock_ahead_max: CLOCK_AHEAD_MAX_DEFAULT,
            runs_alone: false,
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
    /// The time asked for by [`Engine::poll_timeout`] has come.
    Timeout,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send the goodbye, then close the connection.
    Disconnect(NodeId, Goodbye),
    /// Changes that arrived from `from` and were applied here (durable once the caller has
    /// synced the store, as [`Driver`] does before it passes them on).
    Applied {
        from: NodeId,
        changes: Vec<LoggedChange>,
    },
    /// This node's own log, as `peer` holds it, is ahead of or beside the store's: the store
    /// was brought back from an older copy, or another store writes under the same writer.
    /// The node must write under a new writer ([`Engine::set_writer`]) before it writes again.
    WriterSuperseded { peer: NodeId, reason: String },
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub changes_sent: u64,
    /// Of `changes_sent`, those sent from memory as they were written or received (the rest
    /// were read from the store's log for a peer catching up).
    pub changes_pushed: u64,
    pub changes_received: u64,
    pub changes_applied: u64,
    pub duplicates: u64,
    pub held: u64,
    /// Held changes given up: no room to hold them, expired, their sender gone, or their
    /// document fetched without finding their dependencies. Their senders send them again.
    pub held_dropped: u64,
    pub messages_sent: u64,
    /// Bytes of the frames of `messages_sent`.
    pub bytes_sent: u64,
    pub malformed: u64,
    /// Requests (documents asked for, repair listings) not queued because the peer's queue of
    /// them was full; peers ask again.
    pub requests_dropped: u64,
    /// Log entries too large for any frame (written before the limit existed): skipped.
    pub changes_unsendable: u64,
    /// Repair digests sent, and documents found out of step by them.
    pub repair_rounds: u64,
    pub repair_documents: u64,
    /// Documents taken out because a wider peer found them outside this node's read scope.
    pub withdrawn_documents: u64,
    /// Documents a wider peer named to take out while [`repair::WITHDRAWING_MAX`] waited
    /// already: a later repair round names them again.
    pub withdrawals_dropped: u64,
    /// Changes refused by the rule for colliding changes, by reason
    /// ([`crate::store::RefusalReason::as_str`]); their senders are not disconnected.
    pub changes_refused: BTreeMap<&'static str, u64>,
    /// Changes that came with a log place held here by another change (two stores wrote
    /// under one writer): applied without a place, by the same rule.
    pub log_places_taken: u64,
    /// Changes not applied yet, stamped further ahead of this node's clock than it accepts.
    pub changes_ahead: u64,
    /// Changes whose check against the grants met an internal error: held, not applied nor
    /// refused; their senders send them again.
    pub judging_failed: u64,
    /// Fields that became conflicting as changes from peers were applied.
    pub conflicts: u64,
    /// Log entries truncated here, every known node holding them.
    pub log_entries_truncated: u64,
    /// Documents whose stable history was compacted.
    pub documents_compacted: u64,
    /// Peers caught up by whole documents, lacking entries truncated here.
    pub catch_ups: u64,
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

pub struct Engine {
    config: Config,
    peers: BTreeMap<NodeId, Peer>,
    held: Held,
    next_summary: Option<Duration>,
    next_repair: Option<Duration>,
    stats: Stats,
    /// What the last rebalance weighed; `None` until one ran with ready peers.
    balanced: Option<relay::Balanced>,
    recent: RecentChanges,
    /// Changes were applied since the store was last made durable.
    unsynced: bool,
    /// Why the writer must be replaced, and the peer that showed it (the action is reported
    /// once per writer; the driver says it after every step until the writer is replaced).
    superseded: Option<(NodeId, String)>,
    /// This node's own log is durable up to here: nothing above it is sent, since a change
    /// that left and was then lost in a crash would see its place written again.
    own_durable: u64,
    /// The wall clock, ms since the Unix epoch, as the shell last said (`None`: no bound on
    /// how far ahead changes may be stamped).
    clock_ms: Option<u64>,
    /// Leaves a peer listed in repair whose documents here are yet to be compared with the
    /// listing: gathered so that one scan of the store serves many leaves.
    pending_leaves: repair::PendingLeaves,
    /// Leaves still to list to a peer, as its outbox makes room.
    pending_listings: repair::PendingListings,
    /// Documents a narrower peer is to withdraw, gathered into full `Withdraw` messages
    /// (fewer than one message's worth each; the rest go at the next timeout).
    pending_withdrawals: BTreeMap<NodeId, Vec<String>>,
    /// Documents a wider peer told this node to take out, taken out a step at a time
    /// between other events ([`repair::WITHDRAW_STEP_DOCUMENTS`]), so that changes arriving
    /// meanwhile are not kept waiting behind a whole narrowing.
    withdrawing: std::collections::VecDeque<String>,
    /// The latest report of every node known: which log entries are stable.
    stability: stability::Stability,
    /// A summary interval passed: the log is truncated a step further towards what is
    /// stable.
    reclaim_due: bool,
    /// While the last step of reclamation left more waiting, when the next one runs: at once
    /// while log entries wait, [`RECLAIM_STEP_PAUSE`] later while only documents do, so that a
    /// backlog goes in short steps, not one long one.
    reclaim_next: Option<Duration>,
    /// Compacted documents stamped too far ahead of this node's clock, from whom, to take in
    /// once they are not (at most [`COMPACTED_AHEAD_BYTES_MAX`] together).
    compacted_ahead: Vec<(NodeId, CompactedDocument)>,
}

pub(crate) fn goodbye(reason: GoodbyeReason, detail: impl Into<String>) -> Goodbye {
    let mut detail = detail.into();
    concord_proto::clip_text(&mut detail, concord_proto::DETAIL_BYTES_MAX);
    Goodbye { reason, detail }
}

impl Engine {
    pub fn new(config: Config) -> Self {
        assert!(
            config.changes_per_message > 0 && config.changes_per_message <= CHANGES_PER_MESSAGE_MAX
        );
        let stability = stability::Stability::new(config.runs_alone);
        Self {
            config,
            peers: BTreeMap::new(),
            held: Held::default(),
            next_summary: None,
            next_repair: None,
            stats: Stats::default(),
            balanced: None,
            recent: RecentChanges::default(),
            unsynced: false,
            superseded: None,
            own_durable: 0,
            pending_leaves: repair::PendingLeaves::default(),
            pending_listings: repair::PendingListings::default(),
            pending_withdrawals: BTreeMap::new(),
            withdrawing: std::collections::VecDeque::new(),
            clock_ms: None,
            stability,
            reclaim_due: false,
            reclaim_next: None,
            compacted_ahead: Vec::new(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn node(&self) -> NodeId {
        self.config.node
    }

    /// The origin of this node's own log.
    pub fn writer(&self) -> NodeId {
        self.config.writer
    }

    /// The store writes under `writer` from now on. The former writer becomes an origin like
    /// any other: what peers hold of it beyond this store is caught up from them. Peers are
    /// told (version 3).
    pub fn set_writer(&mut self, writer: NodeId, replica: &impl Replica) {
        assert!(writer != self.config.writer, "a new writer differs");
        // What the old writer wrote beyond what was durable never left, and may be lost (the
        // store was opened again): it must not leave now that it is an origin like others.
        self.recent
            .forget_after(&self.config.writer, self.own_durable);
        self.config.writer = writer;
        self.superseded = None;
        self.own_durable = 0;
        for state in self.peers.values_mut() {
            if state.ready && state.version >= 3 {
                state.outbox.writer = true;
            }
        }
        self.balanced = None;
        self.rebalance(replica, None);
    }

    /// The wall clock now, ms since the Unix epoch: changes stamped further ahead of it than
    /// [`Config::clock_ahead_max`] are not applied yet. Handed in, as all time is.
    pub fn set_clock(&mut self, wall_ms: u64) {
        self.clock_ms = Some(wall_ms);
    }

    /// The latest clock a change may carry to be applied now.
    fn accept_until(&self) -> u64 {
        #[cfg(feature = "sabotage")]
        if self.config.sabotage.no_clock_bound {
            return u64::MAX;
        }
        self.clock_ms.map_or(u64::MAX, |clock| {
            clock.saturating_add(self.config.clock_ahead_max.as_millis() as u64)
        })
    }

    /// Why this node's writer must be replaced, if a peer showed it.
    pub fn superseded(&self) -> Option<&str> {
        self.superseded.as_ref().map(|(_, reason)| reason.as_str())
    }

    /// The peer that showed this node's writer must be replaced, and why.
    pub fn superseded_by(&self) -> Option<(NodeId, &str)> {
        self.superseded
            .as_ref()
            .map(|(peer, reason)| (*peer, reason.as_str()))
    }

    /// A peer showed that this node's own log is not the store's alone: reported once.
    fn supersede(&mut self, peer: NodeId, reason: String, actions: &mut Vec<Action>) {
        if self.superseded.is_some() {
            return;
        }
        tracing::warn!(%peer, writer = %self.config.writer, "{reason}");
        self.superseded = Some((peer, reason.clone()));
        actions.push(Action::WriterSuperseded { peer, reason });
    }

    /// `count` changes from `peer` were stamped too far ahead of this node's clock.
    fn note_ahead(&mut self, peer: NodeId, count: usize) {
        if count == 0 {
            return;
        }
        self.stats.changes_ahead += count as u64;
        if let Some(state) = self.peers.get_mut(&peer) {
            if state.changes_ahead == 0 {
                tracing::warn!(
                    %peer,
                    "changes from this peer are stamped more than {:?} ahead of this node's \
                     clock: they wait until they are not (compare the nodes' clocks)",
                    self.config.clock_ahead_max
                );
            }
            state.changes_ahead += count as u64;
        }
    }

    /// Changes from `peer` stamped too far ahead of this node's clock, on this connection.
    pub fn peer_changes_ahead(&self, peer: &NodeId) -> u64 {
        self.peers.get(peer).map_or(0, |state| state.changes_ahead)
    }

    fn count_refused(&mut self, refused: &[RefusalReason]) {
        for reason in refused {
            *self
                .stats
                .changes_refused
                .entry(reason.as_str())
                .or_default() += 1;
        }
    }

    /// A change under this node's current writer that it did not write, or one of its own
    /// that lost to such a change, came from `peer`.
    fn own_writer_shared(&mut self, peer: NodeId, actions: &mut Vec<Action>) {
        let reason = format!(
            "a change from {peer} collides with this node's own under its writer: another \
             store writes under it, or this one was brought back from an older copy"
        );
        self.supersede(peer, reason, actions);
    }

    /// What `peer` said of this node's own log (its `LogMark`, or its summary's mark for it):
    /// more than the store holds, or another change at the same place, means the store is not
    /// the only history of its writer.
    fn check_own_log(
        &mut self,
        peer: NodeId,
        contiguous: u64,
        hash: Option<ChangeHash>,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let writer = self.config.writer;
        let own = replica.origin_mark(&writer);
        if contiguous > own {
            let reason = format!(
                "peer {peer} holds this node's own log up to {contiguous} and the store only up to {own}: the store was brought back from an older copy, or lost"
            );
            self.supersede(peer, reason, actions);
        } else if let Some(hash) = hash.filter(|_| contiguous > replica.log_floor(&writer)) {
            // (At or below the floor the entry is gone: there is nothing to compare with.)
            if replica.log_hash(&writer, contiguous)? != Some(hash) {
                let reason = format!(
                    "peer {peer} holds another change at place {contiguous} of this node's own log: another store writes under the same writer"
                );
                self.supersede(peer, reason, actions);
            }
        }
        Ok(())
    }

    /// Whether `peer` resolves conflicts as this node does, as far as it said.
    /// The name `peer` gave in its hello; empty until it said hello.
    pub fn peer_name(&self, peer: &NodeId) -> &str {
        self.peers.get(peer).map_or("", |state| state.name.as_str())
    }

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

    /// The mark `peer` last reported for `origin`'s log, once it sent a summary.
    pub fn reported_mark(&self, peer: &NodeId, origin: &NodeId) -> Option<u64> {
        let state = self.peers.get(peer)?;
        state
            .summarised
            .then(|| state.reported.get(origin).copied().unwrap_or(0))
    }

    /// Changes held for missing dependencies now.
    pub fn held_now(&self) -> usize {
        self.held.count()
    }

    /// When the engine next wants [`Event::Timeout`].
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.withdrawing.is_empty() {
            // At once: the next step of withdrawals.
            return Some(Duration::ZERO);
        }
        let periodic = self.periodic_due();
        // The next step of reclamation, after its pause, if that comes first.
        match (periodic, self.reclaim_next) {
            (Some(due), Some(next)) => Some(due.min(next)),
            (due, next) => due.or(next),
        }
    }

    /// When the next summary or repair round is due.
    fn periodic_due(&self) -> Option<Duration> {
        [
            self.next_summary,
            self.next_repair,
            self.stability.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles one event at time `now`.
    pub fn handle(
        &mut self,
        now: Duration,
        event: Event,
        replica: &impl Replica,
    ) -> Result<Vec<Action>, StoreError> {
        let mut actions = Vec::new();
        if self.stability.needs_load() {
            self.stability.load(replica.known_nodes()?);
        }
        if self.next_summary.is_none() {
            self.next_summary = Some(now + self.config.summary_interval);
            self.next_repair = Some(now + self.config.repair_interval);
        }
        match event {
            Event::PeerConnected(peer) => {
                let mut state = Peer::connected(now);
                state.repair_view = Some(repair::repair_view(replica, &self.config.node, &peer));
                self.peers.insert(peer, state);
            }
            Event::PeerDisconnected(peer) => {
                self.peers.remove(&peer);
                self.pending_leaves.remove(&peer);
                self.pending_listings.remove(&peer);
                self.pending_withdrawals.remove(&peer);
                self.stats.held_dropped += self.held.drop_from(&peer) as u64;
                self.rebalance(replica, None);
            }
            Event::Received(peer, message) => {
                self.receive(now, peer, message, replica, &mut actions)?
            }
            Event::LocalChanges(changes) => self.note_new(&changes),
            Event::Timeout => {
                // Asked for at once while withdrawals wait: the periodic work only when due,
                // and one step of withdrawals after whatever events came with it.
                // Likewise, after its pause, while reclamation has more to do than one step
                // takes.
                let periodic = self.periodic_due().is_some_and(|due| now >= due);
                if periodic {
                    self.timeout(now, replica, &mut actions);
                    for (peer, compacted) in std::mem::take(&mut self.compacted_ahead) {
                        self.receive_compacted(now, peer, compacted, replica, &mut actions)?;
                    }
                }
                let reclaim = periodic && std::mem::take(&mut self.reclaim_due);
                if reclaim || self.reclaim_next.is_some_and(|next| now >= next) {
                    self.reclaim_next = match self.reclaim(replica)? {
                        stability::MoreToReclaim::Log => Some(now),
                        stability::MoreToReclaim::Documents => Some(now + RECLAIM_STEP_PAUSE),
                        stability::MoreToReclaim::Nothing => None,
                    };
                }
                if periodic {
                    self.compare_pending_leaves(replica)?;
                    let peers: Vec<NodeId> = self.pending_withdrawals.keys().copied().collect();
                    for peer in peers {
                        self.send_withdrawals(peer, true);
                    }
                }
                if !self.withdrawing.is_empty() {
                    self.withdraw_step(replica)?;
                }
            }
        }
        if !self.pending_listings.is_empty() {
            self.list_pending_leaves(replica)?;
        }
        Ok(actions)
    }

    fn timeout(&mut self, now: Duration, replica: &impl Replica, actions: &mut Vec<Action>) {
        if self.next_summary.is_some_and(|due| now >= due) {
            self.next_summary = Some(now + self.config.summary_interval);
            for state in self.peers.values_mut().filter(|state| state.ready) {
                state.outbox.summary = true;
            }
            // A step of truncation with every summary: what became stable goes a bounded
            // batch at a time, so no step holds replication up for long.
            self.reclaim_due = true;
        }
        if self.stability.due(now, self.config.report_interval) {
            self.send_reports(now, replica);
        }
        if self.next_repair.is_some_and(|due| now >= due) {
            self.next_repair = Some(now + self.config.repair_interval);
            for state in self.peers.values_mut() {
                state.repairing = std::mem::take(&mut state.repair_found);
            }
            self.start_repair(replica, None);
        }
        let regranted = self.repair_views_changed(replica);
        if !regranted.is_empty() {
            self.start_repair(replica, Some(&regranted));
        }
        self.stats.held_dropped += self.held.expire(now) as u64;
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
                actions,
                peer,
                GoodbyeReason::HandshakeTimeout,
                "no hello in time".to_owned(),
            );
        }
    }

    /// Whether repair found documents to exchange with `peer` in its last rounds: it is
    /// being caught up or narrowed, not keeping up.
    pub fn repairing(&self, peer: &NodeId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|state| state.repairing || state.repair_found)
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
        self.stats.held_dropped += self.held.drop_from(&peer) as u64;
        actions.push(Action::Disconnect(peer, goodbye(reason, detail)));
    }

    /// Makes what was applied durable before anything that depends on it leaves the node,
    /// and notes how far this node's own log is durable: writers acknowledged concurrently
    /// may have applied entries not yet flushed, and those stay here until they are.
    pub fn make_durable(&mut self, replica: &impl Replica) -> Result<(), StoreError> {
        let writer = self.config.writer;
        let own = replica.origin_mark(&writer);
        replica.sync()?;
        self.unsynced = false;
        self.own_durable = own;
        Ok(())
    }

    /// How far this node's own log is known durable (see [`Engine::make_durable`]).
    pub fn own_durable(&self) -> u64 {
        self.own_durable
    }

    fn summary(&self, replica: &impl Replica) -> Message {
        Message::Summary(Summary {
            origins: replica
                .origin_marks()
                .into_iter()
                .map(|(origin, contiguous)| concord_proto::OriginMark {
                    origin: origin.0,
                    contiguous,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests;
