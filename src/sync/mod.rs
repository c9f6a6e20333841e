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
mod relay;
mod repair;
pub mod stability;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use automerge::ChangeHash;
use concord_proto::{
    Changes, CompactedDocument, DocumentChanges, Goodbye, GoodbyeReason, Hello, Message,
    NeedDocument, Summary, CHANGES_PER_MESSAGE_MAX, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};

pub use driver::{
    Driver, DriverStats, Input, Output, LOCAL_PUSH_BYTES_MAX, LOCAL_PUSH_CHANGES_MAX,
    PEER_QUEUE_BYTES,
};
pub use held::{HELD_BYTES_MAX, HELD_CHANGES_MAX, HELD_CHANGE_TTL};
pub use outbound::{OUTBOX_BYTES_MAX, OUTBOX_MESSAGES_MAX, RECENT_CHANGES_BYTES_MAX};

use crate::record::NodeId;
use crate::store::digest::Aggregate;
use crate::store::{
    Adoption, ApplyReport, DocStore, DocumentHeadsEntry, LogPage, LoggedChange, RefusalReason,
    Store, StoreError, UnloggedOutcome, Unplaced,
};
use held::Held;
use outbound::{Peer, RecentChanges};

/// Where the engine defaults come from: a summary a second keeps repair latency low while
/// costing a few dozen bytes per origin per peer.
pub const SUMMARY_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
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

/// The store side of replication. [`DocStore`] is the implementation; tests and the simulator
/// use it over a memory store.
pub trait Replica {
    fn origin_marks(&self) -> Vec<(NodeId, u64)>;
    /// The sequence up to which `origin`'s whole log is held (0 for an origin not held).
    fn origin_mark(&self, origin: &NodeId) -> u64;
    /// The hash of the change at `(origin, sequence)` of the log, if held.
    fn log_hash(&self, origin: &NodeId, sequence: u64) -> Result<Option<ChangeHash>, StoreError>;
    /// Entries of `origin`'s log after `after`: at most `limit`, and no more once `bytes_max`
    /// bytes of changes are gathered.
    fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<LoggedChange>, StoreError>;
    /// [`Replica::log_after`] of what `reader` may read (everything, for `None`), looking
    /// through at most `limit` entries: with the place up to which the log was looked
    /// through, and the places whose changes were compacted away.
    fn log_readable_after(
        &self,
        reader: Option<&NodeId>,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<LogPage, StoreError>;
    /// Whether `reader` may read every record (no grant narrows it).
    fn reads_all(&self, reader: &NodeId) -> bool;
    /// Whether `wider` may read every record `narrower` may read.
    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool;
    /// Whether `reader` may read the document as it stands here.
    fn may_read_document(&self, reader: &NodeId, doc_key: &[u8]) -> Result<bool, StoreError>;
    /// Whether `node` was revoked.
    fn is_revoked(&self, node: &NodeId) -> bool;
    /// Whether `node` was removed from the cluster.
    fn is_removed(&self, node: &NodeId) -> bool;
    /// Whether this node refused the change `hash` to the document.
    fn refused_contains(&self, doc_key: &[u8], hash: &ChangeHash) -> Result<bool, StoreError>;
    /// Whether the log holds `(origin, sequence)`.
    fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool;
    /// A sender covered `origin`'s log after `after` up to `through` for this node (see
    /// [`Message::Covered`]); says whether the mark moved.
    fn cover(&self, origin: &NodeId, after: u64, through: u64) -> Result<bool, StoreError>;
    /// Applies changes from a peer (none stamped past `accept_until_ms`); durable only after
    /// [`Replica::sync`].
    fn apply_remote(
        &self,
        changes: Vec<LoggedChange>,
        accept_until_ms: u64,
    ) -> Result<ApplyReport, StoreError>;
    /// A document's changes that are not ancestors of `have`, within `limit` changes and
    /// `bytes_max` bytes; and whether that is all of them.
    fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), StoreError>;
    /// Applies changes fetched for a document outside the log; durable only after
    /// [`Replica::sync`]. `unplaced`: what becomes of a revoked node's changes among them.
    fn apply_unlogged(
        &self,
        doc_key: &[u8],
        changes: Vec<Vec<u8>>,
        accept_until_ms: u64,
        unplaced: Unplaced,
    ) -> Result<UnloggedOutcome, StoreError>;
    fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError>;
    /// A repair bucket's aggregate: of every document held, or with a `reader`, of those it
    /// may read.
    fn digest(
        &self,
        reader: Option<&NodeId>,
        prefix: &str,
    ) -> Result<Option<Aggregate>, StoreError>;
    /// The documents of leaf buckets, with a `reader` only those it may read.
    fn leaf_documents(
        &self,
        leaves: &[String],
        limit: usize,
        reader: Option<&NodeId>,
    ) -> Result<Vec<(String, Vec<DocumentHeadsEntry>)>, StoreError>;
    /// Takes out documents a wider peer found outside this node's read scope; those that
    /// were held.
    fn withdraw(&self, doc_keys: &[&[u8]]) -> Result<Vec<Vec<u8>>, StoreError>;
    fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError>;
    /// Makes everything applied so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// The nodes replication knows, kept across restarts, with their names.
    fn known_nodes(&self) -> Result<Vec<(NodeId, String)>, StoreError>;
    /// Keeps `node` among the nodes known.
    fn note_known_node(&self, node: &NodeId, name: &str) -> Result<(), StoreError>;
    /// The place at and below which `origin`'s log was truncated (0: none).
    fn log_floor(&self, origin: &NodeId) -> u64;
    /// Truncates the logs up to the stable marks given, as far as local followers allow.
    fn reclaim_log(&self, stable: &[(NodeId, u64)]) -> Result<usize, StoreError>;
    /// Documents waiting to be compacted.
    fn compaction_pending(&self) -> usize;
    /// The document compacted, saved whole with its epoch, when a peer holding `have` of it
    /// lacks part of its compacted history.
    fn compacted_for(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
    ) -> Result<Option<crate::store::stable::SavedCompacted>, StoreError>;
    /// Takes in a document compacted elsewhere, unless any of it is stamped past
    /// `accept_until_ms` (see [`DocStore::adopt_compacted`]).
    fn adopt_compacted(
        &self,
        doc_key: &[u8],
        snapshot: &[u8],
        epoch: &[u8],
        accept_until_ms: u64,
    ) -> Result<Adoption, StoreError>;
    /// Compacts a bounded number of the documents whose changes truncation found stable;
    /// asked only while no change concurrent with what is stable can still arrive.
    fn compact_stable(&self) -> Result<crate::store::Compacted, StoreError>;
    /// Up to `limit` document keys after `after`, in order.
    fn documents_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;
}

impl<S: Store> Replica for DocStore<S> {
    fn origin_marks(&self) -> Vec<(NodeId, u64)> {
        DocStore::origin_marks(self)
    }
    fn origin_mark(&self, origin: &NodeId) -> u64 {
        DocStore::origin_mark(self, origin)
    }
    fn log_hash(&self, origin: &NodeId, sequence: u64) -> Result<Option<ChangeHash>, StoreError> {
        DocStore::log_hash(self, origin, sequence)
    }
    fn log_after(
        &self,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        DocStore::log_after(self, origin, after, limit, bytes_max)
    }
    fn log_readable_after(
        &self,
        reader: Option<&NodeId>,
        origin: &NodeId,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<LogPage, StoreError> {
        DocStore::log_readable_after(self, reader, origin, after, limit, bytes_max)
    }
    fn reads_all(&self, reader: &NodeId) -> bool {
        DocStore::reads_all(self, reader)
    }
    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool {
        DocStore::reads_at_least(self, wider, narrower)
    }
    fn may_read_document(&self, reader: &NodeId, doc_key: &[u8]) -> Result<bool, StoreError> {
        DocStore::may_read_document(self, reader, doc_key)
    }
    fn is_revoked(&self, node: &NodeId) -> bool {
        DocStore::is_revoked(self, node)
    }

    fn is_removed(&self, node: &NodeId) -> bool {
        DocStore::is_removed(self, node)
    }
    fn refused_contains(&self, doc_key: &[u8], hash: &ChangeHash) -> Result<bool, StoreError> {
        DocStore::refused_contains(self, doc_key, hash)
    }
    fn log_holds(&self, origin: &NodeId, sequence: u64) -> bool {
        DocStore::log_holds(self, origin, sequence)
    }
    fn cover(&self, origin: &NodeId, after: u64, through: u64) -> Result<bool, StoreError> {
        DocStore::cover(self, origin, after, through)
    }
    fn apply_remote(
        &self,
        changes: Vec<LoggedChange>,
        accept_until_ms: u64,
    ) -> Result<ApplyReport, StoreError> {
        DocStore::apply_remote(self, changes, accept_until_ms)
    }
    fn document_changes(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), StoreError> {
        DocStore::document_changes(self, doc_key, have, limit, bytes_max)
    }
    fn apply_unlogged(
        &self,
        doc_key: &[u8],
        changes: Vec<Vec<u8>>,
        accept_until_ms: u64,
        unplaced: Unplaced,
    ) -> Result<UnloggedOutcome, StoreError> {
        DocStore::apply_unlogged(self, doc_key, changes, accept_until_ms, unplaced)
    }
    fn heads(&self, doc_key: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
        DocStore::heads(self, doc_key)
    }
    fn digest(
        &self,
        reader: Option<&NodeId>,
        prefix: &str,
    ) -> Result<Option<Aggregate>, StoreError> {
        match reader {
            Some(reader) => DocStore::scoped_digest(self, reader, prefix),
            None => Ok(DocStore::digest(self, prefix)),
        }
    }
    fn leaf_documents(
        &self,
        leaves: &[String],
        limit: usize,
        reader: Option<&NodeId>,
    ) -> Result<Vec<(String, Vec<DocumentHeadsEntry>)>, StoreError> {
        DocStore::leaf_documents(self, leaves, limit, reader)
    }
    fn withdraw(&self, doc_keys: &[&[u8]]) -> Result<Vec<Vec<u8>>, StoreError> {
        DocStore::withdraw(self, doc_keys)
    }
    fn missing_changes(
        &self,
        doc_key: &[u8],
        hashes: &[ChangeHash],
    ) -> Result<Vec<ChangeHash>, StoreError> {
        DocStore::missing_changes(self, doc_key, hashes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        DocStore::sync(self)
    }
    fn known_nodes(&self) -> Result<Vec<(NodeId, String)>, StoreError> {
        DocStore::known_nodes(self)
    }
    fn note_known_node(&self, node: &NodeId, name: &str) -> Result<(), StoreError> {
        DocStore::note_known_node(self, node, name)
    }
    fn log_floor(&self, origin: &NodeId) -> u64 {
        DocStore::log_floor(self, origin)
    }
    fn reclaim_log(&self, stable: &[(NodeId, u64)]) -> Result<usize, StoreError> {
        DocStore::reclaim_log(self, stable)
    }
    fn compact_stable(&self) -> Result<crate::store::Compacted, StoreError> {
        DocStore::compact_stable(self)
    }
    fn compacted_for(
        &self,
        doc_key: &[u8],
        have: &[ChangeHash],
    ) -> Result<Option<crate::store::stable::SavedCompacted>, StoreError> {
        DocStore::compacted_for(self, doc_key, have)
    }
    fn compaction_pending(&self) -> usize {
        DocStore::compaction_pending(self)
    }
    fn adopt_compacted(
        &self,
        doc_key: &[u8],
        snapshot: &[u8],
        epoch: &[u8],
        accept_until_ms: u64,
    ) -> Result<Adoption, StoreError> {
        DocStore::adopt_compacted(self, doc_key, snapshot, epoch, accept_until_ms)
    }
    fn documents_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        DocStore::documents_after(self, after, limit)
    }
}

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
        self.periodic_due()
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
                if self.periodic_due().is_some_and(|due| now >= due) {
                    self.timeout(now, replica, &mut actions);
                    for (peer, compacted) in std::mem::take(&mut self.compacted_ahead) {
                        self.receive_compacted(now, peer, compacted, replica, &mut actions)?;
                    }
                    if std::mem::take(&mut self.reclaim_due) {
                        self.reclaim(replica)?;
                    }
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

    fn receive(
        &mut self,
        now: Duration,
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
                let name = hello.node_name.clone();
                self.receive_hello(peer, ready, hello, replica, actions);
                if self.peers.get(&peer).is_some_and(|state| state.ready) {
                    self.know_node(peer, &name, replica)?;
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
            Message::Writer { writer } => {
                let writer = NodeId(writer);
                if let Some(state) = self.peers.get_mut(&peer) {
                    if state.writer != Some(writer) {
                        state.writer = Some(writer);
                        if state.ready {
                            self.rebalance(replica, None);
                        }
                    }
                }
                // Tell the peer how far its own log is held here, so that a peer brought
                // back from an older copy learns it before it writes much.
                let contiguous = replica.origin_mark(&writer);
                if contiguous > 0 {
                    if let Some(hash) = replica.log_hash(&writer, contiguous)? {
                        self.queue_message(
                            peer,
                            Message::LogMark {
                                origin: writer.0,
                                contiguous,
                                hash: hash.0,
                            },
                        );
                    }
                }
            }
            Message::LogMark {
                origin,
                contiguous,
                hash,
            } => {
                if NodeId(origin) == self.config.writer {
                    let hash = Some(ChangeHash(hash));
                    self.check_own_log(peer, contiguous, hash, replica, actions)?;
                }
            }
            // Before the handshake nothing else counts; over a network that reorders, such a
            // message is ignored rather than taken for malice (the summaries resend its content).
            _ if !ready => {}
            Message::Summary(summary) => {
                let writer = self.config.writer;
                let own = summary
                    .origins
                    .iter()
                    .find(|mark| NodeId(mark.origin) == writer)
                    .map(|mark| mark.contiguous);
                if let Some(contiguous) = own {
                    self.check_own_log(peer, contiguous, None, replica, actions)?;
                }
                self.receive_summary(peer, summary, replica)
            }
            Message::Changes(changes) => {
                self.receive_changes(now, peer, changes, replica, actions)?
            }
            Message::NeedDocument(need) => {
                // A peer is given only documents its grant lets it read, as it stands here.
                if replica.may_read_document(&peer, need.doc.as_bytes())? {
                    let have = need.have.iter().map(|bytes| ChangeHash(*bytes)).collect();
                    self.queue_document(peer, need.doc, have);
                } else if repair::repair_view(replica, &self.config.node, &peer)
                    .is_some_and(|view| view.withdraws)
                {
                    let have: Vec<ChangeHash> =
                        need.have.iter().map(|bytes| ChangeHash(*bytes)).collect();
                    let doc_key = need.doc.as_bytes();
                    if replica.missing_changes(doc_key, &have)?.is_empty() {
                        // It asks because a change it was sent waits on the record's earlier
                        // changes, which it will never be given: told to take the record
                        // out, it also lets that change's place go, and its log moves on.
                        self.queue_message(
                            peer,
                            Message::Withdraw {
                                docs: vec![need.doc],
                            },
                        );
                    } else {
                        // It holds changes of it this node lacks, maybe the last copies
                        // (their author's store lost): they come here first, and repair
                        // tells it to take the record out once they have.
                        let mine = replica.heads(doc_key)?;
                        self.queue_message(
                            peer,
                            Message::NeedDocument(NeedDocument {
                                doc: need.doc,
                                have: mine.iter().map(|hash| hash.0).collect(),
                            }),
                        );
                    }
                } else {
                    tracing::debug!(%peer, doc = %need.doc, "a document outside the peer's grant is not sent");
                }
            }
            Message::Covered { ranges } => {
                for range in ranges {
                    self.receive_cover(peer, range, replica)?;
                }
            }
            Message::Withdraw { docs } => self.receive_withdraw(peer, docs, replica)?,
            Message::Holdings(holdings) => self.receive_holdings(&holdings, replica)?,
            Message::DocumentChanges(answer) => {
                self.receive_document(now, peer, answer, replica, actions)?
            }
            Message::CompactedDocument(compacted) => {
                self.receive_compacted(now, peer, compacted, replica, actions)?
            }
            Message::Ping { nonce } => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.outbox.pong = Some(nonce);
                }
            }
            Message::Prune { origins } => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    for origin in origins {
                        let origin = NodeId(origin);
                        state.pruned.insert(origin);
                        state.wanted.remove(&origin);
                    }
                }
            }
            Message::Graft { origins } => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    for origin in origins {
                        let origin = NodeId(origin);
                        state.pruned.remove(&origin);
                        // What the peer missed meanwhile comes from its mark.
                        state.wanted.insert(origin);
                    }
                }
            }
            Message::Pong { .. } => {}
            Message::Goodbye(_) => {
                self.peers.remove(&peer);
                self.stats.held_dropped += self.held.drop_from(&peer) as u64;
            }
            Message::RangeDigest(digest) => self.receive_digest(peer, digest, replica, actions)?,
            Message::DocumentHeads(heads) => self.receive_heads(peer, heads, replica)?,
        }
        Ok(())
    }

    fn receive_hello(
        &mut self,
        peer: NodeId,
        ready: bool,
        hello: Hello,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) {
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
        } else if hello.version_min > PROTOCOL_VERSION || hello.version_max < PROTOCOL_VERSION_MIN {
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
                state.name = hello.node_name;
                state.version = hello.version_max.min(PROTOCOL_VERSION);
                state.outbox.policy_hash = state.version >= 2;
                state.outbox.writer = state.version >= 3;
                state.outbox.summary = true;
            }
            self.rebalance(replica, None);
        }
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            cluster: self.config.cluster,
            node: self.config.node.0,
            node_name: self.config.node_name.clone(),
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION,
        })
    }

    fn receive_summary(&mut self, peer: NodeId, summary: Summary, replica: &impl Replica) {
        let marks = replica.origin_marks();
        let marks_by_origin: BTreeMap<NodeId, u64> = marks.iter().copied().collect();
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
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
            let before = state.reported.get(&origin).copied().unwrap_or(0);
            let sent_before = state
                .sent_at_last_summary
                .get(&origin)
                .copied()
                .unwrap_or(0);
            let sent = state.sent.entry(origin).or_insert(0);
            // Sent a whole summary ago, still not held, and the peer made no progress on this
            // origin since: not taken (held for dependencies and given up, or lost). Send
            // again from its mark. A peer that is still working through what it was sent
            // moves its mark, and is left alone.
            let stalled = state.summarised && theirs == before && theirs < sent_before;
            if stalled || theirs > *sent {
                *sent = theirs;
            }
        }
        for (origin, mine) in &marks {
            // An origin the peer reaches directly serves its own log to it.
            if state.pruned.contains(origin) {
                continue;
            }
            if state.sent.get(origin).copied().unwrap_or(0) < *mine {
                state.wanted.insert(*origin);
            }
        }
        // A source of ours that holds more of an origin than we do while we made no progress
        // on it since its previous summary may not know it is a source: a Prune and the Graft
        // that took it back can arrive in the other order over a network that reorders. Tell
        // it again; a Graft is idempotent.
        for (origin, theirs) in &reported {
            let ours = marks_by_origin.get(origin).copied().unwrap_or(0);
            let stuck = state.held_at_last_summary.get(origin).copied() == Some(ours);
            if *theirs > ours
                && stuck
                && !state.pruned_by_us.contains(origin)
                && *origin != self.config.writer
            {
                state.outbox.prune.remove(origin);
                state.outbox.graft.insert(*origin);
            }
        }
        state.held_at_last_summary = marks_by_origin;
        state.summarised = true;
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
        self.rebalance(replica, (!shrunk).then_some(&changed));
        self.consider_catch_up(peer, &marks, replica);
    }

    /// A peer covered a run of an origin's log for this node (nothing in it is this node's
    /// to read): the mark moves over it, now or once it reaches the run.
    fn receive_cover(
        &mut self,
        peer: NodeId,
        range: concord_proto::CoveredRange,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let origin = NodeId(range.origin);
        if !self.peers.contains_key(&peer) {
            return Ok(());
        }
        if !replica.reads_at_least(&peer, &self.config.node) {
            // Only a peer that may read all this node reads knows what of a log is not its.
            return Ok(());
        }
        // A run names only places the peer skipped, never one it sent: a change still on its
        // way, held or lost is not covered by it.
        if range.through > range.after && replica.cover(&origin, range.after, range.through)? {
            self.rebalance(replica, Some(&BTreeSet::from([origin])));
        }
        Ok(())
    }

    fn receive_changes(
        &mut self,
        now: Duration,
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
        self.apply_and_relay(now, peer, logged, true, replica, actions)
    }

    /// The answer to a `NeedDocument` (or a repair): applied, then the changes held for that
    /// document are tried again. If some still lack dependencies and the answer brought
    /// something new (it was cut to fit a frame), the rest of the document is asked for.
    fn receive_document(
        &mut self,
        now: Duration,
        peer: NodeId,
        answer: DocumentChanges,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let doc_key = answer.doc.into_bytes();
        // A narrowed node may never be sent a revoked node's change with its place (senders
        // cover what it may not read, and the record may have been out of its scope then):
        // a peer that reads every record (it has no grant) vouches for those it holds.
        let me = self.config.node;
        if replica.is_revoked(&peer) && !replica.reads_all(&me) {
            // A revoked node could hand a narrowed one back, round after round, a stale copy
            // of a record a wider node took out of it.
            tracing::debug!(%peer, "a document from a revoked node is ignored");
            return Ok(());
        }
        let unplaced = if !replica.reads_all(&me) && replica.reads_all(&peer) {
            Unplaced::Vouched
        } else {
            Unplaced::Wait
        };
        let held_before = !replica.heads(&doc_key)?.is_empty();
        let outcome =
            match replica.apply_unlogged(&doc_key, answer.changes, self.accept_until(), unplaced) {
                Ok(outcome) => outcome,
                Err(StoreError::InvalidDocument(detail)) => {
                    self.disconnect(actions, peer, GoodbyeReason::Malformed, detail);
                    return Ok(());
                }
                Err(error) => return Err(error),
            };
        let new = outcome.new;
        self.unsynced |= new > 0 || !outcome.refused.is_empty();
        self.count_refused(&outcome.refused);
        self.note_ahead(peer, outcome.ahead);
        if outcome.own_writer_shared {
            self.own_writer_shared(peer, actions);
        }
        self.retry_held(now, &doc_key, new > 0, replica, actions)?;
        if !held_before
            && !replica.reads_all(&me)
            && !self.held.holds_for(&doc_key)
            && !replica.may_read_document(&me, &doc_key)?
        {
            // A record new here that, merged with what waited on it, this node may not read
            // goes at once: its senders hold every change of it, and nothing here waits on
            // it (a change refused here may be what would have kept it in scope).
            if !replica.withdraw(&[&doc_key])?.is_empty() {
                self.stats.withdrawn_documents += 1;
            }
        }
        Ok(())
    }

    /// Tries again the changes held for `doc_key`, each sender's together; `ask_for_missing`:
    /// whether those still lacking dependencies ask for the document again.
    fn retry_held(
        &mut self,
        now: Duration,
        doc_key: &[u8],
        ask_for_missing: bool,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let mut by_sender: BTreeMap<NodeId, Vec<LoggedChange>> = BTreeMap::new();
        for entry in self.held.take(doc_key) {
            by_sender.entry(entry.from).or_default().push(entry.change);
        }
        for (from, changes) in by_sender {
            self.apply_and_relay(now, from, changes, ask_for_missing, replica, actions)?;
        }
        Ok(())
    }

    /// A document compacted by `peer`, whole: taken in (what this node holds of it goes on
    /// top), then the changes held for it are tried again, as after a document's changes.
    fn receive_compacted(
        &mut self,
        now: Duration,
        peer: NodeId,
        compacted: CompactedDocument,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let doc_key = compacted.doc.as_bytes().to_vec();
        let until = self.accept_until();
        match replica.adopt_compacted(&doc_key, &compacted.snapshot, &compacted.epoch, until) {
            Ok(Adoption::Taken) => self.unsynced = true,
            Ok(Adoption::Ahead) => {
                self.note_ahead(peer, 1);
                let bytes = |compacted: &CompactedDocument| {
                    compacted.snapshot.len() + compacted.epoch.len()
                };
                self.compacted_ahead
                    .retain(|(_, waiting)| waiting.doc != compacted.doc);
                let waiting: usize = self.compacted_ahead.iter().map(|(_, c)| bytes(c)).sum();
                if waiting + bytes(&compacted) <= COMPACTED_AHEAD_BYTES_MAX {
                    self.compacted_ahead.push((peer, compacted));
                }
                return Ok(());
            }
            Ok(Adoption::Kept) => {
                tracing::debug!(%peer, doc = %String::from_utf8_lossy(&doc_key), "a compacted document was not taken in");
                return Ok(());
            }
            Err(StoreError::InvalidDocument(detail)) => {
                self.disconnect(actions, peer, GoodbyeReason::Malformed, detail);
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        self.retry_held(now, &doc_key, true, replica, actions)
    }

    fn apply_and_relay(
        &mut self,
        now: Duration,
        from: NodeId,
        changes: Vec<LoggedChange>,
        ask_for_missing: bool,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let report = replica.apply_remote(changes, self.accept_until())?;
        self.unsynced = true;
        self.count_refused(&report.refused);
        self.stats.judging_failed += report.judging_failed as u64;
        self.stats.log_places_taken += report.places_taken as u64;
        self.note_ahead(from, report.ahead.len());
        if report.own_writer_shared {
            self.own_writer_shared(from, actions);
        }
        if report.own_writes_taken_out {
            self.supersede(
                from,
                "a revocation took out changes of this node's own written on top of the \
                 revoked node's: it writes them again under a new writer"
                    .to_owned(),
                actions,
            );
        }
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
        if !report.left_scope.is_empty() {
            self.offer_left_scope(&report.left_scope, replica)?;
        }
        if let Some((_, reason)) = report.invalid.first() {
            let detail = format!("invalid change: {reason}");
            self.disconnect(actions, from, GoodbyeReason::Malformed, detail);
        }
        let mut asked = BTreeSet::new();
        for change in report.missing_dependencies {
            let connected = self.peers.contains_key(&from);
            if !ask_for_missing || !connected || !self.held.hold(from, change.clone(), now) {
                // Not logged, so the sender sends it again after its next summary from us.
                self.stats.held_dropped += 1;
                continue;
            }
            self.stats.held += 1;
            if asked.insert(change.doc_key.clone()) {
                let have = replica.heads(&change.doc_key)?;
                let need = NeedDocument {
                    doc: String::from_utf8_lossy(&change.doc_key).into_owned(),
                    have: have.iter().map(|hash| hash.0).collect(),
                };
                self.queue_message(from, Message::NeedDocument(need));
            }
        }
        if !report.applied.is_empty() {
            self.stats.changes_applied += report.applied.len() as u64;
            self.note_new(&report.applied);
            actions.push(Action::Applied {
                from,
                changes: report.applied,
            });
        }
        Ok(())
    }

    /// New changes in the log (written here, or applied from a peer): kept in memory for the
    /// peers that keep up, and due to every peer that has not been sent them. The peer they
    /// came from is not sent them back: its mark moved as they arrived.
    fn note_new(&mut self, changes: &[LoggedChange]) {
        let mut newest: BTreeMap<NodeId, u64> = BTreeMap::new();
        for change in changes {
            let entry = newest.entry(change.origin).or_insert(0);
            *entry = (*entry).max(change.sequence);
        }
        // The lowest sequence of each origin some peer still needs: only changes from there on
        // are kept in memory (a change every peer already has, as from its sender, is not).
        let mut needed_from: BTreeMap<NodeId, u64> = BTreeMap::new();
        for state in self.peers.values_mut() {
            if !state.ready || !state.summarised {
                continue;
            }
            for (origin, sequence) in &newest {
                if state.pruned.contains(origin) {
                    continue;
                }
                let sent = state.sent.get(origin).copied().unwrap_or(0);
                if sent < *sequence {
                    state.wanted.insert(*origin);
                    let from = needed_from.entry(*origin).or_insert(u64::MAX);
                    *from = (*from).min(sent + 1);
                }
            }
        }
        for change in changes {
            if needed_from
                .get(&change.origin)
                .is_some_and(|from| change.sequence >= *from)
            {
                self.recent.insert(change);
            }
        }
    }
}

#[cfg(test)]
mod tests;
