//! What the engine has to say to each peer, and how it is given out: only when asked, and only
//! as much as the caller has room for.
//!
//! Per peer there is no queue of messages waiting to be sent: there are flags (a hello, a
//! summary, a pong due), sets (origins to prune or graft), a short bounded list of small
//! messages and document requests, and, for the logs, only how far each origin was sent.
//! [`Engine::poll_transmit`] builds the next message from them, sized by its encoded bytes
//! against the room given: control first, then document answers, then changes, read from the
//! newest changes kept in memory ([`RecentChanges`]) or from the store's log. What is never
//! asked for is never built, so a slow peer costs no memory, and nothing the engine counts as
//! sent waits anywhere but in the transport.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use automerge::ChangeHash;
use concord_proto::{
    varint_bytes, Changes, CompactedDocument, DocumentChanges, Message, ShippedChange,
    CHANGES_PER_MESSAGE_MAX, FRAME_BYTES_MAX, FRAME_HEADER_BYTES, ORIGINS_PER_SUMMARY_MAX,
    VERSION_BYTES,
};

use super::{Engine, PeerPolicies, Replica};
use crate::record::NodeId;
use crate::store::{LogPage, LoggedChange, StoreError};

/// Bytes of changes kept in memory for peers that keep up (the newest ones some peer has yet
/// to be sent); older ones are read from the store.
pub const RECENT_CHANGES_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Small messages (repair digests and listings, documents asked for) waiting per peer, by
/// count and by bytes. Past either, a new one is dropped and counted: every one of them is
/// asked again (a held change expires and asks again; repair runs again).
pub const OUTBOX_MESSAGES_MAX: usize = 1024;
pub const OUTBOX_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Runs of log places skipped for a peer (outside its grant) waiting to be said with
/// `Covered`; a fill stops once this many wait, so none is ever dropped.
pub const COVERED_RANGES_MAX: usize = 256;
/// Log entries looked through for one message to a peer whose grant narrows what it reads:
/// entries outside the grant cost no bytes, so without this bound one poll could look through
/// a whole log.
pub const ENTRIES_LOOKED_THROUGH_MAX: usize = 8192;
/// Largest frame, header included: a message never asks for more room than this.
const FRAME_WITH_HEADER_BYTES_MAX: usize = FRAME_HEADER_BYTES + FRAME_BYTES_MAX;
/// Bytes a `Changes` message adds around its changes: variant and count.
const CHANGES_OVERHEAD_BYTES: usize = 1 + varint_bytes(CHANGES_PER_MESSAGE_MAX as u64);
/// Bytes a frame adds around its message.
const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + VERSION_BYTES;

/// A document the peer asked for (or that repair found it lacks), answered as room allows.
#[derive(Debug)]
pub(super) struct DocumentRequest {
    pub(super) doc: String,
    pub(super) have: Vec<ChangeHash>,
}

/// Everything due to one peer that is not its share of the logs.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    pub(super) hello: bool,
    pub(super) policy_hash: bool,
    pub(super) writer: bool,
    pub(super) summary: bool,
    pub(super) prune: BTreeSet<NodeId>,
    pub(super) graft: BTreeSet<NodeId>,
    pub(super) pong: Option<u64>,
    /// Runs `(after, through]` of logs looked through for this peer and skipped (outside its
    /// grant), said with `Covered`. A run never holds a place sent: a change lost or
    /// overtaken on the way is not covered, so the peer's mark stops at it until it comes
    /// again. At most [`COVERED_RANGES_MAX`].
    pub(super) covered: Vec<(NodeId, u64, u64)>,
    messages: VecDeque<Message>,
    messages_bytes: usize,
    documents: VecDeque<DocumentRequest>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        !self.hello
            && !self.policy_hash
            && !self.writer
            && !self.summary
            && self.prune.is_empty()
            && self.graft.is_empty()
            && self.pong.is_none()
            && self.covered.is_empty()
            && self.messages.is_empty()
            && self.documents.is_empty()
    }

    /// Document answers queued.
    pub(super) fn documents_queued(&self) -> usize {
        self.documents.len()
    }

    /// How many more small messages fit.
    pub(super) fn room(&self) -> usize {
        OUTBOX_MESSAGES_MAX.saturating_sub(self.messages.len())
    }

    /// Queues a small message; false if the outbox is full.
    pub(super) fn push(&mut self, message: Message) -> bool {
        let size = message.frame_len();
        if self.messages.len() >= OUTBOX_MESSAGES_MAX
            || self.messages_bytes + size > OUTBOX_BYTES_MAX
        {
            return false;
        }
        self.messages_bytes += size;
        self.messages.push_back(message);
        true
    }
}

/// One connected peer.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) ready: bool,
    /// The protocol version agreed in the handshake.
    pub(super) version: u16,
    /// What the peer said of its policies.
    pub(super) policies: PeerPolicies,
    /// The origin the peer's own log is written under, as it said (version 3).
    pub(super) writer: Option<NodeId>,
    /// The name the peer gave in its hello (its `node.name`; bounded by the wire format).
    pub(super) name: String,
    /// When the connection came up: the handshake must complete within `HANDSHAKE_TIMEOUT`.
    pub(super) connected_at: Duration,
    /// The peer's first summary arrived: until then no log is streamed to it, since what it
    /// holds is not known.
    pub(super) summarised: bool,
    /// Per origin: the peer holds, or was sent, every entry up to this sequence.
    pub(super) sent: BTreeMap<NodeId, u64>,
    /// `sent` as it was at the previous summary from the peer.
    pub(super) sent_at_last_summary: BTreeMap<NodeId, u64>,
    /// What this node held of each origin when the peer's previous summary arrived.
    pub(super) held_at_last_summary: BTreeMap<NodeId, u64>,
    /// Origins whose log may hold entries the peer was not sent.
    pub(super) wanted: BTreeSet<NodeId>,
    /// The origin served last, so that origins take turns.
    pub(super) turn: Option<NodeId>,
    /// The peer's last reported marks, for lag.
    pub(super) reported: BTreeMap<NodeId, u64>,
    /// `reported` as it was at the last repair round, to see whether anything moves.
    pub(super) reported_at_last_repair: BTreeMap<NodeId, u64>,
    /// Origins this peer receives directly and asked us not to relay (Prune).
    pub(super) pruned: BTreeSet<NodeId>,
    /// Origins we asked this peer not to relay to us.
    pub(super) pruned_by_us: BTreeSet<NodeId>,
    /// Changes from the peer stamped too far ahead of this node's clock.
    pub(super) changes_ahead: u64,
    /// Repair found documents to exchange with the peer since the current round started,
    /// and did in the round before.
    pub(super) repair_found: bool,
    pub(super) repairing: bool,
    /// How this node took part in repair with the peer when last looked at (`None`: not
    /// yet, `Some(None)`: their reads were not nested): a grant that changes it starts a
    /// round at once instead of at the next interval.
    pub(super) repair_view: Option<Option<super::repair::RepairView>>,
    pub(super) outbox: Outbox,
    /// Per node known: when the report of it last sent to this peer was taken.
    pub(super) reports_sent: BTreeMap<NodeId, u64>,
    /// The peer lacks log entries truncated here: it is sent whole documents.
    pub(super) catch_up: Option<super::catch_up::CatchUp>,
}

impl Peer {
    pub(super) fn connected(now: Duration) -> Self {
        let mut peer = Peer {
            connected_at: now,
            ..Peer::default()
        };
        peer.outbox.hello = true;
        peer
    }
}

/// The newest changes that some peer has yet to be sent, kept in memory, bounded by bytes
/// (oldest out first): what a peer that keeps up is sent next, without reading the store.
#[derive(Debug, Default)]
pub(crate) struct RecentChanges {
    changes: BTreeMap<(NodeId, u64), LoggedChange>,
    order: VecDeque<(NodeId, u64)>,
    bytes: usize,
}

impl RecentChanges {
    pub(crate) fn insert(&mut self, change: &LoggedChange) {
        let size = change.change.len() + change.doc_key.len();
        if size > RECENT_CHANGES_BYTES_MAX / 4 {
            return;
        }
        let place = (change.origin, change.sequence);
        if self.changes.insert(place, change.clone()).is_some() {
            return;
        }
        self.order.push_back(place);
        self.bytes += size;
        while self.bytes > RECENT_CHANGES_BYTES_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(evicted) = self.changes.remove(&oldest) {
                self.bytes -= evicted.change.len() + evicted.doc_key.len();
            }
        }
        assert!(self.changes.len() == self.order.len());
    }

    fn get(&self, origin: &NodeId, sequence: u64) -> Option<&LoggedChange> {
        self.changes.get(&(*origin, sequence))
    }

    /// Forgets `origin`'s changes after `sequence`: they never became durable here.
    pub(crate) fn forget_after(&mut self, origin: &NodeId, sequence: u64) {
        let forgotten: Vec<(NodeId, u64)> = self
            .changes
            .range((*origin, sequence + 1)..=(*origin, u64::MAX))
            .map(|(place, _)| *place)
            .collect();
        for place in &forgotten {
            if let Some(change) = self.changes.remove(place) {
                self.bytes -= change.change.len() + change.doc_key.len();
            }
        }
        if !forgotten.is_empty() {
            self.order.retain(|place| self.changes.contains_key(place));
        }
        assert!(self.changes.len() == self.order.len());
    }
}

fn shipped(change: &LoggedChange) -> ShippedChange {
    ShippedChange {
        origin: change.origin.0,
        sequence: change.sequence,
        doc: String::from_utf8_lossy(&change.doc_key).into_owned(),
        change: change.change.clone(),
    }
}

/// What one `Changes` message has gathered so far, as `next_changes` goes through the
/// origins, and how it may grow.
#[derive(Default)]
struct Gathering {
    /// Changes one message may carry.
    per_message: usize,
    /// Bytes of changes the message may carry.
    budget: usize,
    /// The peer's grant narrows what it reads.
    narrowed: bool,
    /// The peer is told with `Covered` how far each log was looked through for it.
    covers: bool,
    /// The peer is told of places whose changes were compacted away here.
    covers_compacted: bool,
    shipped: Vec<ShippedChange>,
    /// Changes refused here that shipped ones depend on: they follow as documents.
    refused_dependencies: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of `shipped`.
    used: usize,
    /// Of `shipped`, those taken from memory rather than the store.
    pushed: u64,
    /// The first change found did not fit the room given: the message waits for more.
    waits_for_room: bool,
    /// Log entries read for a narrowed peer so far.
    looked_through: usize,
}

/// Where `next_changes` stands in one origin's log for a peer.
struct LogWalk {
    origin: NodeId,
    /// The last place sent or covered.
    after: u64,
    /// The last place that may leave.
    last: u64,
}

/// Whether no frame can carry a change whose entry is `size` bytes (one written before
/// changes were bounded): such a change is logged here and skipped.
fn unsendable(change: &LoggedChange, size: usize) -> bool {
    let too_large =
        size + FRAME_OVERHEAD_BYTES + CHANGES_OVERHEAD_BYTES > FRAME_WITH_HEADER_BYTES_MAX;
    if too_large {
        tracing::error!(
            origin = %change.origin,
            sequence = change.sequence,
            size,
            "a log entry is larger than any frame and is skipped"
        );
    }
    too_large
}

/// What filling a `Changes` message from one origin came to.
enum Fill {
    /// The origin has nothing more for this peer.
    Exhausted,
    /// The message is full.
    Full,
}

impl Engine {
    /// Whether `peer` has anything to be sent, were there room.
    pub fn has_output(&self, peer: &NodeId) -> bool {
        self.peers.get(peer).is_some_and(|state| {
            state.outbox.hello
                || state.ready
                    && (!state.outbox.is_empty()
                        || state.catch_up.is_some()
                        || state.summarised && !state.wanted.is_empty())
        })
    }

    /// The next message for `peer`, at most `room` bytes as a whole frame, or `None` when
    /// there is nothing to send or the next message needs more room. A caller whose queue to
    /// the peer is empty must give at least a whole frame's room (`FRAME_BYTES_MAX` and its
    /// header), so that any message can go. Makes applied changes durable first.
    pub fn poll_transmit(
        &mut self,
        _now: Duration,
        peer: NodeId,
        room: usize,
        replica: &impl Replica,
    ) -> Result<Option<Message>, StoreError> {
        if !self.has_output(&peer) {
            return Ok(None);
        }
        self.make_durable(replica)?;
        self.catch_up_step(peer, replica)?;
        let room = room.min(FRAME_WITH_HEADER_BYTES_MAX);
        let message = match self.next_control(peer, room, replica)? {
            Some(message) => Some(message),
            None if self.control_waiting(&peer) => None,
            None => match self.next_changes(peer, room, replica)? {
                Some(message) => Some(message),
                // Looking through the logs found nothing the peer may read, only a cover.
                None if self.control_waiting(&peer) => self.next_control(peer, room, replica)?,
                None => None,
            },
        };
        if let Some(message) = &message {
            #[cfg(feature = "sabotage")]
            if self.config.sabotage.skip_summaries && matches!(message, Message::Summary(_)) {
                return Ok(None);
            }
            let size = message.frame_len();
            #[cfg(feature = "sabotage")]
            let size = if self.config.sabotage.count_only_batches {
                size.min(room)
            } else {
                size
            };
            assert!(
                size <= room,
                "a message never outgrows the room it was given"
            );
            self.stats.messages_sent += 1;
            self.stats.bytes_sent += size as u64;
            if let Message::Changes(changes) = message {
                self.stats.changes_sent += changes.changes.len() as u64;
            }
        }
        Ok(message)
    }

    /// Whether a control message or document answer is due to `peer` (and must go before
    /// any changes).
    fn control_waiting(&self, peer: &NodeId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|state| !state.outbox.is_empty())
    }

    fn next_control(
        &mut self,
        peer: NodeId,
        room: usize,
        replica: &impl Replica,
    ) -> Result<Option<Message>, StoreError> {
        let fits = |message: &Message| message.frame_len() <= room;
        let hello = self.hello();
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(None);
        };
        if state.outbox.hello {
            if !fits(&hello) {
                return Ok(None);
            }
            state.outbox.hello = false;
            return Ok(Some(hello));
        }
        if !state.ready {
            return Ok(None);
        }
        if state.outbox.policy_hash {
            let message = Message::PolicyHash {
                hash: self.config.policy_hash,
            };
            if !fits(&message) {
                return Ok(None);
            }
            state.outbox.policy_hash = false;
            return Ok(Some(message));
        }
        if state.outbox.writer {
            let message = Message::Writer {
                writer: self.config.writer.0,
            };
            if !fits(&message) {
                return Ok(None);
            }
            state.outbox.writer = false;
            return Ok(Some(message));
        }
        if state.outbox.summary {
            let summary = self.summary(replica);
            if !fits(&summary) {
                return Ok(None);
            }
            if let Some(state) = self.peers.get_mut(&peer) {
                state.outbox.summary = false;
            }
            return Ok(Some(summary));
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(None);
        };
        match next_queued(&mut state.outbox, fits) {
            Some(next) => Ok(next),
            None => self.next_document_answer(peer, room, replica),
        }
    }

    /// The next answer to a document request of `peer`'s, as it fits in `room`: the whole
    /// document where it was compacted past what the peer has, else its changes the peer
    /// lacks, a page at a time.
    fn next_document_answer(
        &mut self,
        peer: NodeId,
        room: usize,
        replica: &impl Replica,
    ) -> Result<Option<Message>, StoreError> {
        let fits = |message: &Message| message.frame_len() <= room;
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(None);
        };
        while let Some(request) = state.outbox.documents.front() {
            if state.version >= 6 {
                let whole = replica.compacted_for(request.doc.as_bytes(), &request.have)?;
                if let Some((snapshot, epoch)) = whole {
                    let answer = Message::CompactedDocument(CompactedDocument {
                        doc: request.doc.clone(),
                        snapshot,
                        epoch,
                    });
                    if !fits(&answer) {
                        if answer.frame_len() <= FRAME_WITH_HEADER_BYTES_MAX {
                            return Ok(None);
                        }
                        // Compaction keeps a document one frame can carry; this one cannot
                        // be sent whole, and its changes after the cut alone would not apply.
                        tracing::warn!(%peer, doc = %request.doc, "a compacted document is too large to send");
                        state.outbox.documents.pop_front();
                        continue;
                    }
                    state.outbox.documents.pop_front();
                    return Ok(Some(answer));
                }
            }
            // Each change also costs its length prefix: at most 4 bytes below a frame.
            let budget = room.saturating_sub(
                FRAME_OVERHEAD_BYTES
                    + 1
                    + varint_bytes(request.doc.len() as u64)
                    + request.doc.len()
                    + varint_bytes(CHANGES_PER_MESSAGE_MAX as u64),
            );
            let per_change_prefix = varint_bytes(FRAME_BYTES_MAX as u64);
            let (changes, complete) = replica.document_changes(
                request.doc.as_bytes(),
                &request.have,
                CHANGES_PER_MESSAGE_MAX,
                budget,
            )?;
            // Length prefixes trimmed off the budget after the fact: drop the changes they
            // would push over it.
            let mut changes = changes;
            let mut size: usize = changes.iter().map(Vec::len).sum();
            while !changes.is_empty() && size + changes.len() * per_change_prefix > budget {
                size -= changes.pop().map_or(0, |change| change.len());
            }
            if changes.is_empty() {
                if complete {
                    // Nothing the peer lacks.
                    state.outbox.documents.pop_front();
                    continue;
                }
                // The next change needs more room than there is now.
                return Ok(None);
            }
            let answer = Message::DocumentChanges(DocumentChanges {
                doc: request.doc.clone(),
                changes,
            });
            if !fits(&answer) {
                return Ok(None);
            }
            state.outbox.documents.pop_front();
            return Ok(Some(answer));
        }
        Ok(None)
    }

    /// Up to one `Changes` message of what `peer` lacks of the logs held here, origins taking
    /// turns, the newest changes from memory and the rest from the store.
    fn next_changes(
        &mut self,
        peer: NodeId,
        room: usize,
        replica: &impl Replica,
    ) -> Result<Option<Message>, StoreError> {
        let budget = room.saturating_sub(FRAME_OVERHEAD_BYTES + CHANGES_OVERHEAD_BYTES);
        #[cfg(feature = "sabotage")]
        let budget = if self.config.sabotage.count_only_batches {
            usize::MAX
        } else {
            budget
        };
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(None);
        };
        if !state.ready || !state.summarised || state.wanted.is_empty() {
            return Ok(None);
        }
        // Origins after the one served last come first.
        let mut origins: Vec<NodeId> = match state.turn {
            Some(turn) => state
                .wanted
                .range((std::ops::Bound::Excluded(turn), std::ops::Bound::Unbounded))
                .chain(state.wanted.range(..=turn))
                .copied()
                .collect(),
            None => state.wanted.iter().copied().collect(),
        };
        origins.dedup();
        // A peer whose grant narrows what it reads is sent only that, and told with `Covered`
        // how far each log was looked through for it; it is sent the logs of other origins
        // only by a node that reads at least all it reads, so that every cover is true.
        let narrowed = !replica.reads_all(&peer);
        let serves_others = replica.reads_at_least(&self.config.node, &peer);
        let mut gathering = Gathering {
            per_message: self.config.changes_per_message,
            budget,
            narrowed,
            covers: narrowed && state.version >= 4,
            // Places whose changes were compacted away here are covered for every peer that
            // takes covers (see `crate::store::LogPage::compacted`).
            covers_compacted: state.version >= 4,
            ..Gathering::default()
        };
        for origin in origins {
            let state = self.peers.get_mut(&peer).expect("looked up above");
            if state.pruned.contains(&origin) {
                state.wanted.remove(&origin);
                continue;
            }
            state.turn = Some(origin);
            // A peer that reads everything is sent every log held here, holes and all: it is
            // never told a place is covered, and a narrowed node may hold the last entries of
            // a log whose writer's store was lost.
            if origin != self.config.writer && narrowed && !serves_others {
                state.wanted.remove(&origin);
                continue;
            }
            let after = state.sent.get(&origin).copied().unwrap_or(0);
            // Of this node's own log, only what is durable leaves.
            let mut last = if origin == self.config.writer {
                self.own_durable
            } else {
                u64::MAX
            };
            if narrowed {
                // What a narrowed peer is not sent is covered, and a cover must name only
                // places this node looked at: none past a gap in what it holds of the log.
                last = last.min(replica.origin_mark(&origin));
            }
            let mut walk = LogWalk {
                origin,
                after,
                last,
            };
            let fill = self.gather_from(peer, &mut walk, &mut gathering, replica)?;
            let state = self.peers.get_mut(&peer).expect("looked up above");
            state.sent.insert(origin, walk.after);
            match fill {
                Fill::Exhausted => {
                    state.wanted.remove(&origin);
                }
                Fill::Full => break,
            }
        }
        if gathering.waits_for_room || gathering.shipped.is_empty() {
            // A cover may be due (nothing the peer may read was found): it goes next.
            return Ok(None);
        }
        self.stats.changes_pushed += gathering.pushed;
        self.queue_refused_dependencies(peer, gathering.refused_dependencies);
        Ok(Some(Message::Changes(Changes {
            changes: gathering.shipped,
        })))
    }

    /// Adds what `peer` lacks of one origin's log to the message being gathered, page by
    /// page, until the log has no more for it or the message is full.
    fn gather_from(
        &mut self,
        peer: NodeId,
        walk: &mut LogWalk,
        gathering: &mut Gathering,
        replica: &impl Replica,
    ) -> Result<Fill, StoreError> {
        loop {
            if walk.after >= walk.last {
                return Ok(Fill::Exhausted);
            }
            let left = gathering.per_message - gathering.shipped.len();
            if left == 0 {
                return Ok(Fill::Full);
            }
            let fill = if gathering.narrowed {
                self.gather_narrowed_page(peer, walk, left, gathering, replica)?
            } else {
                self.gather_page(peer, walk, left, gathering, replica)?
            };
            if let Some(fill) = fill {
                return Ok(fill);
            }
        }
    }

    /// One page of the log for a peer whose grant narrows what it reads: what it may read
    /// is added, and what it may not is covered. `None` while the walk goes on.
    fn gather_narrowed_page(
        &mut self,
        peer: NodeId,
        walk: &mut LogWalk,
        left: usize,
        gathering: &mut Gathering,
        replica: &impl Replica,
    ) -> Result<Option<Fill>, StoreError> {
        let (origin, last, covers) = (walk.origin, walk.last, gathering.covers);
        let state = self.peers.get_mut(&peer).expect("looked up above");
        let covered = &mut state.outbox.covered;
        if gathering.looked_through >= ENTRIES_LOOKED_THROUGH_MAX
            || covers && covered.len() >= COVERED_RANGES_MAX
        {
            return Ok(Some(Fill::Full));
        }
        let limit = left.max(ENTRIES_LOOKED_THROUGH_MAX / 8);
        let LogPage {
            changes: page,
            through,
            refused_dependencies,
            ..
        } = replica.log_readable_after(
            Some(&peer),
            &origin,
            walk.after,
            limit,
            gathering.budget.saturating_sub(gathering.used),
        )?;
        gathering.looked_through += limit;
        gathering.refused_dependencies.extend(refused_dependencies);
        let mut skip = |from: u64, to: u64| {
            if covers && to > from {
                note_skipped(covered, origin, from, to);
            }
        };
        if page.is_empty() {
            if through <= walk.after {
                return Ok(Some(Fill::Exhausted));
            }
            // Nothing the peer may read up to there.
            skip(walk.after, through.min(last));
            walk.after = through.min(last);
            return Ok(None);
        }
        for change in page {
            if change.sequence > last {
                return Ok(Some(Fill::Exhausted));
            }
            let entry = shipped(&change);
            let size = entry.encoded_len();
            if unsendable(&change, size) {
                self.stats.changes_unsendable += 1;
                skip(walk.after, change.sequence);
                walk.after = change.sequence;
                continue;
            }
            if gathering.used + size > gathering.budget {
                gathering.waits_for_room = gathering.shipped.is_empty();
                return Ok(Some(Fill::Full));
            }
            // What the page looked through before it is outside the peer's grant.
            skip(walk.after, change.sequence - 1);
            gathering.used += size;
            walk.after = change.sequence;
            gathering.shipped.push(entry);
            if gathering.shipped.len() == gathering.per_message {
                return Ok(Some(Fill::Full));
            }
        }
        // What the page looked through past its last change is outside the peer's grant too.
        skip(walk.after, through.min(last));
        walk.after = walk.after.max(through.min(last));
        Ok(None)
    }

    /// One page of the log for a peer that reads everything this node does: the next change
    /// from memory when it is there, else a page from the store, with compacted places
    /// covered for a peer that takes covers. `None` while the walk goes on.
    fn gather_page(
        &mut self,
        peer: NodeId,
        walk: &mut LogWalk,
        left: usize,
        gathering: &mut Gathering,
        replica: &impl Replica,
    ) -> Result<Option<Fill>, StoreError> {
        let (origin, last, covers_compacted) = (walk.origin, walk.last, gathering.covers_compacted);
        let from_memory = self.recent.get(&origin, walk.after + 1).cloned();
        let in_memory = from_memory.is_some();
        let page = match from_memory {
            Some(change) => LogPage {
                through: change.sequence,
                changes: vec![change],
                ..LogPage::default()
            },
            None => replica.log_readable_after(
                None,
                &origin,
                walk.after,
                left,
                gathering.budget.saturating_sub(gathering.used),
            )?,
        };
        if page.changes.is_empty() && (page.compacted.is_empty() || !covers_compacted) {
            return Ok(Some(Fill::Exhausted));
        }
        gathering
            .refused_dependencies
            .extend(page.refused_dependencies);
        let mut compacted = page.compacted.into_iter().peekable();
        let mut stopped = false;
        for change in page.changes {
            if covers_compacted
                && !self.cover_compacted(
                    peer,
                    origin,
                    &mut walk.after,
                    &mut compacted,
                    change.sequence.min(last.saturating_add(1)),
                )
            {
                return Ok(Some(Fill::Full));
            }
            stopped = true;
            if change.sequence > last {
                return Ok(Some(Fill::Exhausted));
            }
            let entry = shipped(&change);
            let size = entry.encoded_len();
            if unsendable(&change, size) {
                self.stats.changes_unsendable += 1;
                walk.after = change.sequence;
                continue;
            }
            if gathering.used + size > gathering.budget {
                gathering.waits_for_room = gathering.shipped.is_empty();
                return Ok(Some(Fill::Full));
            }
            gathering.used += size;
            walk.after = change.sequence;
            gathering.pushed += u64::from(in_memory);
            gathering.shipped.push(entry);
            if gathering.shipped.len() == gathering.per_message {
                return Ok(Some(Fill::Full));
            }
            stopped = false;
        }
        if !stopped
            && covers_compacted
            && !self.cover_compacted(
                peer,
                origin,
                &mut walk.after,
                &mut compacted,
                last.saturating_add(1),
            )
        {
            return Ok(Some(Fill::Full));
        }
        Ok(None)
    }

    /// Covers for `peer` the places of `origin`'s log in `places` below `before` (their changes
    /// were compacted away here), moving `after` over them; false once the peer's covers are
    /// full.
    fn cover_compacted(
        &mut self,
        peer: NodeId,
        origin: NodeId,
        after: &mut u64,
        places: &mut std::iter::Peekable<std::vec::IntoIter<u64>>,
        before: u64,
    ) -> bool {
        let Some(state) = self.peers.get_mut(&peer) else {
            return false;
        };
        while let Some(place) = places.peek().copied().filter(|place| *place < before) {
            if state.outbox.covered.len() >= COVERED_RANGES_MAX {
                return false;
            }
            places.next();
            note_skipped(&mut state.outbox.covered, origin, place - 1, place);
            *after = place;
        }
        true
    }

    /// Queues for `peer`, one document message each, the changes refused here that changes it
    /// is sent depend on (see [`crate::store::LogPage::refused_dependencies`]).
    fn queue_refused_dependencies(&mut self, peer: NodeId, mut changes: Vec<(Vec<u8>, Vec<u8>)>) {
        changes.sort_unstable();
        changes.dedup();
        for (doc_key, change) in changes {
            let Ok(doc) = String::from_utf8(doc_key) else {
                continue;
            };
            self.queue_message(
                peer,
                Message::DocumentChanges(DocumentChanges {
                    doc,
                    changes: vec![change],
                }),
            );
        }
    }

    /// Queues a small message for `peer`, counted as dropped if its outbox is full.
    pub(super) fn queue_message(&mut self, peer: NodeId, message: Message) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if message.introduced_in() > state.version.max(concord_proto::PROTOCOL_VERSION_MIN) {
            // A peer that agreed an older version could not decode it (before the handshake
            // only the first version's messages go); what a newer message says only speeds up
            // what repair and the summaries reach anyway.
            return;
        }
        if let Message::NeedDocument(need) = &message {
            let already = state.outbox.messages.iter().any(
                |queued| matches!(queued, Message::NeedDocument(other) if other.doc == need.doc),
            );
            if already {
                return;
            }
        }
        if !state.outbox.push(message) {
            self.stats.requests_dropped += 1;
        }
    }

    /// Queues the changes of `doc` that are not ancestors of `have` for `peer`.
    pub(super) fn queue_document(&mut self, peer: NodeId, doc: String, have: Vec<ChangeHash>) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state
            .outbox
            .documents
            .iter()
            .any(|queued| queued.doc == doc)
        {
            // The one queued answers from older heads: it covers this request too.
            return;
        }
        if state.outbox.documents.len() >= OUTBOX_MESSAGES_MAX {
            self.stats.requests_dropped += 1;
            return;
        }
        state
            .outbox
            .documents
            .push_back(DocumentRequest { doc, have });
    }
}

/// Adds the run `(after, through]` of `origin`'s log to the runs to cover, joined to the last
/// one when it goes on from it.
fn note_skipped(covered: &mut Vec<(NodeId, u64, u64)>, origin: NodeId, after: u64, through: u64) {
    if let Some(last) = covered.last_mut() {
        if last.0 == origin && last.2 == after {
            last.2 = through;
            return;
        }
    }
    covered.push((origin, after, through));
}

/// The next queued control message for a peer, in order: grafts, prunes, covered ranges, a
/// pong, then other messages. `None` when none is queued; `Some(None)` when the next one
/// does not fit (`fits`) and must wait.
fn next_queued(outbox: &mut Outbox, fits: impl Fn(&Message) -> bool) -> Option<Option<Message>> {
    for grafting in [false, true] {
        let set = if grafting {
            &mut outbox.graft
        } else {
            &mut outbox.prune
        };
        if set.is_empty() {
            continue;
        }
        let origins: Vec<[u8; 16]> = set
            .iter()
            .take(ORIGINS_PER_SUMMARY_MAX)
            .map(|origin| origin.0)
            .collect();
        let message = if grafting {
            Message::Graft { origins }
        } else {
            Message::Prune { origins }
        };
        if !fits(&message) {
            return Some(None);
        }
        for _ in 0..ORIGINS_PER_SUMMARY_MAX {
            if set.pop_first().is_none() {
                break;
            }
        }
        return Some(Some(message));
    }
    if !outbox.covered.is_empty() {
        let take = outbox.covered.len().min(ORIGINS_PER_SUMMARY_MAX);
        let ranges: Vec<concord_proto::CoveredRange> = outbox.covered[..take]
            .iter()
            .map(|(origin, after, through)| concord_proto::CoveredRange {
                origin: origin.0,
                after: *after,
                through: *through,
            })
            .collect();
        let message = Message::Covered { ranges };
        if !fits(&message) {
            return Some(None);
        }
        outbox.covered.drain(..take);
        return Some(Some(message));
    }
    if let Some(nonce) = outbox.pong {
        let message = Message::Pong { nonce };
        if !fits(&message) {
            return Some(None);
        }
        outbox.pong = None;
        return Some(Some(message));
    }
    if let Some(front) = outbox.messages.front() {
        if !fits(front) {
            return Some(None);
        }
        let message = outbox
            .messages
            .pop_front()
            .expect("the front was just seen");
        outbox.messages_bytes -= message.frame_len();
        return Some(Some(message));
    }
    None
}
