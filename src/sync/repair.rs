//! Repair: a digest of (document, heads) over buckets of the key space finds documents the
//! logs missed (a truncated log, a bug, a change a relay judged outside a narrowed peer's
//! grant by the record as it held it), without scanning on either side until a leaf's
//! fingerprints differ.
//!
//! A round runs only towards a peer whose summaries are quiet: its marks equal this node's,
//! or did not move since the last round. While changes flow, the summaries are what heal, and
//! digests would differ anyway by whatever is in flight, so comparing them then costs scans
//! and finds nothing.
//!
//! Between nodes whose grants read different records, the wider side digests what the
//! narrower one may read (by the records as the wider side holds them), the narrower side
//! everything it holds ([`repair_view`]); nodes whose reads are not nested do not repair each
//! other. The wider side, finding that the narrower one
//! holds a record it may not read (the record moved out of its scope by a change it never
//! received, or was deleted), tells it to take it out ([`Message::Withdraw`]); finding one it
//! may read and lacks, or holds behind, sends it. So once the wider nodes agree, every
//! narrowed node ends holding exactly what its grant lets it read, at the same heads.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;
use concord_proto::{
    DigestRange, DocumentHeads, GoodbyeReason, Message, NeedDocument, RangeDigest,
    DOCUMENTS_PER_HEADS_MAX, MESSAGE_BYTES_MAX, RANGES_PER_DIGEST_MAX,
};

use super::{Action, Engine, Replica, OUTBOX_MESSAGES_MAX};
use crate::record::NodeId;
use crate::store::digest;
use crate::store::StoreError;

/// Documents listed per leaf in one repair answer.
const REPAIR_DOCUMENTS_PER_LEAF_MAX: usize = DOCUMENTS_PER_HEADS_MAX;
/// Bytes of one leaf's listing: well under a frame, so listings queue without crowding out
/// everything else.
const REPAIR_LISTING_BYTES_MAX: usize = MESSAGE_BYTES_MAX / 16;
/// Documents named in one `Withdraw`.
const WITHDRAW_DOCUMENTS_MAX: usize = DOCUMENTS_PER_HEADS_MAX;
/// Documents a wider peer named that wait here to be taken out: a narrowing of a quarter
/// of a million records at once (beyond it, a later round names the rest again).
pub(super) const WITHDRAWING_MAX: usize = 64 * WITHDRAW_DOCUMENTS_MAX;
/// Documents taken out between two other events: a step costs tens of milliseconds.
pub(super) const WITHDRAW_STEP_DOCUMENTS: usize = 256;
/// Leaves of one peer's listings gathered before this node's documents in them are found by
/// one scan of the store (else at the next timeout). A leaf is not a range of the store's
/// keys, so each lookup scans every document: one per leaf listed made a repair that finds
/// every leaf different (a node narrowed by a new grant) cost leaves × documents.
pub(super) const PENDING_LEAVES_MAX: usize = 1024;

/// Per peer, the leaves it listed, each with the documents it listed there.
pub(super) type PendingLeaves = BTreeMap<NodeId, BTreeMap<String, BTreeSet<Vec<u8>>>>;
/// Per peer, the leaves still to list to it (and whose reads the listing covers): a round
/// that finds every leaf different lists them as the peer's outbox makes room, instead of
/// dropping what does not fit.
pub(super) type PendingListings = BTreeMap<NodeId, (Option<NodeId>, BTreeSet<String>)>;
/// Outbox places a listing leaves free for everything else.
const LISTING_ROOM_KEPT: usize = OUTBOX_MESSAGES_MAX / 4;
/// Fewest leaves listed at once from the pending ones: each listing scans the store.
const LISTING_LEAVES_MIN: usize = OUTBOX_MESSAGES_MAX / 4;

/// How this node takes part in repair with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RepairView {
    /// Whose reads this node's digest and listings cover: every document held (`None`), or
    /// those the peer may read, as they stand here.
    pub(super) reader: Option<NodeId>,
    /// This node reads at least what the narrowed peer reads, so it judges what the peer
    /// may hold.
    pub(super) judges: bool,
    /// This node reads everything (it has no grant), so the peer takes records out on its
    /// word ([`Message::Withdraw`]): a node granted less, had it been modified to ignore
    /// its grant, could otherwise make narrowed nodes drop records they may read.
    pub(super) withdraws: bool,
}

/// How this node compares with `peer` in repair; `None` when their reads are not strictly
/// nested (their digests would never agree). Between nodes that read everything, whole
/// digests. Otherwise the wider side digests what the narrower may read, the narrower
/// everything it holds, so a record it holds and may not read (moved out of its scope, or
/// deleted) shows as a difference, and the wider side tells it to take it out.
///
/// Two nodes narrowed alike do not repair each other: each holds only what it judged by its
/// own copies, and a copy one of them holds stale would be handed back to the other after a
/// wider node took it out, round after round. The wider nodes repair both, so what flows in
/// repair always flows down the order of reads, and settles once the widest nodes agree.
pub(super) fn repair_view(
    replica: &impl Replica,
    me: &NodeId,
    peer: &NodeId,
) -> Option<RepairView> {
    let reads_all = replica.reads_all(me);
    if reads_all && replica.reads_all(peer) {
        return Some(RepairView {
            reader: None,
            judges: false,
            withdraws: false,
        });
    }
    match (
        replica.reads_at_least(me, peer),
        replica.reads_at_least(peer, me),
    ) {
        (true, false) => Some(RepairView {
            reader: Some(*peer),
            judges: true,
            withdraws: reads_all,
        }),
        (false, true) => Some(RepairView {
            reader: None,
            judges: false,
            withdraws: false,
        }),
        _ => None,
    }
}

impl Engine {
    /// Sends the top of the digest to every ready peer whose summaries are quiet, or, with
    /// `only`, to those peers whatever their summaries say (a grant changed what they or
    /// this node may read: the difference is real, not changes in flight).
    pub(super) fn start_repair(&mut self, replica: &impl Replica, only: Option<&BTreeSet<NodeId>>) {
        let marks: Vec<(NodeId, u64)> = replica
            .origin_marks()
            .into_iter()
            .filter(|(_, mark)| *mark > 0)
            .collect();
        let mut due = Vec::new();
        let me = self.config.node;
        for (id, state) in self.peers.iter_mut() {
            if !state.ready || !state.summarised || only.is_some_and(|only| !only.contains(id)) {
                continue;
            }
            let view = repair_view(replica, &me, id);
            state.repair_view = Some(view);
            let Some(view) = view else {
                continue;
            };
            let reported: Vec<(NodeId, u64)> = state
                .reported
                .iter()
                .filter(|(_, mark)| **mark > 0)
                .map(|(origin, mark)| (*origin, *mark))
                .collect();
            let in_step = reported == marks;
            let still = state.reported == state.reported_at_last_repair;
            state.reported_at_last_repair = state.reported.clone();
            if in_step || still || only.is_some() {
                due.push((*id, view.reader));
            }
        }
        for (peer, reader) in due {
            match self.digest_message(replica, reader.as_ref(), &digest::children("")) {
                Ok(top) => {
                    self.stats.repair_rounds += 1;
                    self.queue_message(peer, top);
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "no repair round: the digest could not be read");
                }
            }
        }
    }

    /// The ready peers whose repair view changed since this node last looked (a grant or a
    /// revocation arrived), first when the peer connected.
    pub(super) fn repair_views_changed(&mut self, replica: &impl Replica) -> BTreeSet<NodeId> {
        let me = self.config.node;
        let mut changed = BTreeSet::new();
        for (id, state) in self.peers.iter_mut() {
            if !state.ready || !state.summarised {
                continue;
            }
            let view = repair_view(replica, &me, id);
            match state.repair_view.replace(view) {
                Some(before) if before != view => {
                    changed.insert(*id);
                }
                _ => {}
            }
        }
        changed
    }

    fn digest_message(
        &self,
        replica: &impl Replica,
        reader: Option<&NodeId>,
        prefixes: &[String],
    ) -> Result<Message, StoreError> {
        let mut ranges = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let aggregate = replica.digest(reader, prefix)?.unwrap_or_default();
            ranges.push(DigestRange {
                start: prefix.clone(),
                end: String::new(),
                count: aggregate.count,
                fingerprint: aggregate.fingerprint,
            });
        }
        Ok(Message::RangeDigest(RangeDigest { ranges }))
    }

    /// Compares the peer's buckets with ours: matching ones are done; for the others, send the
    /// finer buckets under them, or, at a leaf, our documents in it with their heads (every
    /// leaf of one digest found by one scan of the store).
    pub(super) fn receive_digest(
        &mut self,
        peer: NodeId,
        digest_message: RangeDigest,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let Some(view) = repair_view(replica, &self.config.node, &peer) else {
            // Neither reads all the other reads: their digests never agree, and a listing
            // could name records the peer may not read.
            return Ok(());
        };
        let reader = view.reader.as_ref();
        let mut finer = Vec::new();
        let mut leaves = Vec::new();
        for range in digest_message.ranges {
            let Some((depth, _)) = digest::parse_prefix(&range.start) else {
                self.disconnect(
                    actions,
                    peer,
                    GoodbyeReason::Malformed,
                    format!("bad digest bucket {:?}", range.start),
                );
                return Ok(());
            };
            let mine = replica.digest(reader, &range.start)?.unwrap_or_default();
            if mine.count == range.count && mine.fingerprint == range.fingerprint {
                continue;
            }
            if depth + 1 < digest::BUCKET_HEX_DIGITS {
                finer.extend(digest::children(&range.start));
            } else {
                leaves.push(range.start);
            }
        }
        self.list_leaves(peer, &leaves, reader, replica)?;
        for chunk in finer.chunks(RANGES_PER_DIGEST_MAX) {
            let message = self.digest_message(replica, reader, chunk)?;
            self.queue_message(peer, message);
        }
        Ok(())
    }

    /// Records that changes from elsewhere took out of this narrowed node's scope: each
    /// node that reads everything is sent this node's listing of their leaves, as in a
    /// repair round, and withdraws each (or first fetches what of it only this node holds).
    pub(super) fn offer_left_scope(
        &mut self,
        docs: &[Vec<u8>],
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let leaves: Vec<String> = docs
            .iter()
            .map(|doc| digest::leaf_prefix(digest::leaf_of(doc)))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let judges: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, state)| state.ready && state.version >= 4 && replica.reads_all(id))
            .map(|(id, _)| *id)
            .collect();
        for peer in judges {
            self.list_leaves(peer, &leaves, None, replica)?;
        }
        Ok(())
    }

    /// Queues for `peer` the documents of each leaf held here (those `reader` may read, if
    /// given) with their heads, every leaf found by one scan of the store; as many leaves
    /// as its outbox has room for, the rest when it has ([`Engine::list_pending_leaves`]).
    fn list_leaves(
        &mut self,
        peer: NodeId,
        leaves: &[String],
        reader: Option<&NodeId>,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let room = self.peers.get(&peer).map_or(0, |state| {
            state.outbox.room().saturating_sub(LISTING_ROOM_KEPT)
        });
        let (now, later) = leaves.split_at(room.min(leaves.len()));
        if !later.is_empty() {
            let pending = self
                .pending_listings
                .entry(peer)
                .or_insert_with(|| (reader.copied(), BTreeSet::new()));
            pending.0 = reader.copied();
            pending.1.extend(later.iter().cloned());
            assert!(pending.1.len() <= 1 << (4 * digest::BUCKET_HEX_DIGITS));
        }
        if now.is_empty() {
            return Ok(());
        }
        for (leaf, documents) in
            replica.leaf_documents(now, REPAIR_DOCUMENTS_PER_LEAF_MAX, reader)?
        {
            let mut listed = Vec::new();
            let mut bytes = 0usize;
            for (doc_key, heads) in documents {
                bytes += doc_key.len() + 1 + heads.len() * 32 + 1;
                if bytes > REPAIR_LISTING_BYTES_MAX {
                    // The peer takes the rest for documents it must send us: harmless, and
                    // the next round lists them.
                    break;
                }
                listed.push((
                    String::from_utf8_lossy(&doc_key).into_owned(),
                    heads.iter().map(|hash| hash.0).collect(),
                ));
            }
            self.queue_message(
                peer,
                Message::DocumentHeads(DocumentHeads {
                    leaf,
                    documents: listed,
                }),
            );
        }
        Ok(())
    }

    /// The peer's documents in a leaf: ask for what we lack, send what it lacks, and tell a
    /// narrower peer to take out what it may not read.
    pub(super) fn receive_heads(
        &mut self,
        peer: NodeId,
        heads: DocumentHeads,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let Some(view) = repair_view(replica, &self.config.node, &peer) else {
            return Ok(());
        };
        let mut listed = BTreeSet::new();
        let mut withdraw = Vec::new();
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
            // Heads of theirs that are heads here too are held here: only others are looked
            // up in the document (which loads it).
            let lacking_theirs = !their_heads.iter().all(|hash| mine.contains(hash))
                && !replica.missing_changes(&doc_key, &their_heads)?.is_empty();
            let doc = String::from_utf8_lossy(&doc_key).into_owned();
            // Whether the peer may read the record as it stands here (always, unless this
            // node judges it).
            let peer_reads = !view.judges || replica.may_read_document(&peer, &doc_key)?;
            // A change refused here (past a revoked node's cut-off, say) that the narrowed
            // peer took in with a document: its copy goes, to come back without it.
            let holds_refused = view.withdraws
                && !lacking_theirs
                && sorted_mine != sorted_theirs
                && their_heads.iter().try_fold(false, |found, hash| {
                    Ok::<bool, StoreError>(found || replica.refused_contains(&doc_key, hash)?)
                })?;
            if view.withdraws
                && !mine.is_empty()
                && !lacking_theirs
                && (holds_refused || !peer_reads)
            {
                // It holds nothing we lack: it may drop its copy.
                self.found_repair(&peer);
                withdraw.push(doc);
                continue;
            }
            if sorted_mine == sorted_theirs {
                continue;
            }
            self.found_repair(&peer);
            if lacking_theirs {
                let need = NeedDocument {
                    doc: doc.clone(),
                    have: mine.iter().map(|hash| hash.0).collect(),
                };
                self.queue_message(peer, Message::NeedDocument(need));
            }
            if !peer_reads {
                // Its changes come first; the next round tells it to take the record out.
                continue;
            }
            // What the peer lacks of it goes as an answer, sized when there is room.
            let (lacking, _) = replica.document_changes(&doc_key, &their_heads, 1, usize::MAX)?;
            if !lacking.is_empty() {
                self.queue_document(peer, doc, their_heads);
            }
        }
        // Gathered across leaves into full messages: one `Withdraw` a leaf would overflow
        // the peer's outbox when a grant narrows it in every leaf.
        if !withdraw.is_empty() {
            self.pending_withdrawals
                .entry(peer)
                .or_default()
                .extend(withdraw);
            self.send_withdrawals(peer, false);
        }
        // Documents of ours in that leaf that the peer does not hold at all (and may read):
        // found with other leaves' by one scan.
        let pending = self.pending_leaves.entry(peer).or_default();
        pending.insert(heads.leaf, listed);
        if pending.len() >= PENDING_LEAVES_MAX {
            self.compare_leaves(peer, replica)?;
        }
        Ok(())
    }

    /// Lists pending leaves to each peer whose outbox has room for enough of them.
    pub(super) fn list_pending_leaves(&mut self, replica: &impl Replica) -> Result<(), StoreError> {
        let peers: Vec<NodeId> = self.pending_listings.keys().copied().collect();
        for peer in peers {
            let room = self.peers.get(&peer).map_or(0, |state| {
                state.outbox.room().saturating_sub(LISTING_ROOM_KEPT)
            });
            let Some((reader, leaves)) = self.pending_listings.get_mut(&peer) else {
                continue;
            };
            if room < LISTING_LEAVES_MIN.min(leaves.len()) {
                continue;
            }
            let reader = *reader;
            let chunk: Vec<String> = std::iter::from_fn(|| leaves.pop_first())
                .take(room)
                .collect();
            if leaves.is_empty() {
                self.pending_listings.remove(&peer);
            }
            self.list_leaves(peer, &chunk, reader.as_ref(), replica)?;
        }
        Ok(())
    }

    /// Sends `peer` the withdrawals gathered for it, in full messages (and the rest too when
    /// `all`).
    pub(super) fn send_withdrawals(&mut self, peer: NodeId, all: bool) {
        let Some(mut docs) = self.pending_withdrawals.remove(&peer) else {
            return;
        };
        while docs.len() >= WITHDRAW_DOCUMENTS_MAX || (all && !docs.is_empty()) {
            let rest = docs.split_off(docs.len().min(WITHDRAW_DOCUMENTS_MAX));
            self.queue_message(peer, Message::Withdraw { docs });
            docs = rest;
        }
        if !docs.is_empty() {
            self.pending_withdrawals.insert(peer, docs);
        }
    }

    /// Counts a document repair found to exchange with `peer`.
    fn found_repair(&mut self, peer: &NodeId) {
        self.stats.repair_documents += 1;
        if let Some(state) = self.peers.get_mut(peer) {
            state.repair_found = true;
        }
    }

    /// Compares every peer's pending leaves with this node's documents in them.
    pub(super) fn compare_pending_leaves(
        &mut self,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let peers: Vec<NodeId> = self.pending_leaves.keys().copied().collect();
        for peer in peers {
            self.compare_leaves(peer, replica)?;
        }
        Ok(())
    }

    /// Sends `peer` the documents of its pending leaves that it did not list (and may read).
    fn compare_leaves(&mut self, peer: NodeId, replica: &impl Replica) -> Result<(), StoreError> {
        let Some(pending) = self.pending_leaves.remove(&peer) else {
            return Ok(());
        };
        assert!(pending.len() <= PENDING_LEAVES_MAX);
        let Some(view) = repair_view(replica, &self.config.node, &peer) else {
            return Ok(());
        };
        if !self.peers.get(&peer).is_some_and(|state| state.ready) {
            return Ok(());
        }
        let leaves: Vec<String> = pending.keys().cloned().collect();
        let ours =
            replica.leaf_documents(&leaves, REPAIR_DOCUMENTS_PER_LEAF_MAX, view.reader.as_ref())?;
        // A wider peer lists only what this node may read: a document here it did not list
        // and this node may not read is one it holds and judges (this node's own listing
        // tells it, and it withdraws or fetches it), not one to send it.
        let me = self.config.node;
        let narrowed = view.reader.is_none() && !replica.reads_all(&me);
        for (leaf, documents) in ours {
            let listed = pending.get(&leaf);
            for (doc_key, _) in documents {
                if listed.is_some_and(|listed| listed.contains(&doc_key)) {
                    continue;
                }
                if narrowed && !replica.may_read_document(&me, &doc_key)? {
                    continue;
                }
                self.found_repair(&peer);
                let doc = String::from_utf8_lossy(&doc_key).into_owned();
                self.queue_document(peer, doc, Vec::new());
            }
        }
        Ok(())
    }

    /// A wider peer found documents here that this node may not read.
    pub(super) fn receive_withdraw(
        &mut self,
        peer: NodeId,
        docs: Vec<String>,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let me = self.config.node;
        if replica.reads_all(&me) || !replica.reads_all(&peer) {
            tracing::debug!(%peer, "a withdrawal from a peer that does not read every record is ignored");
            return Ok(());
        }
        let room = WITHDRAWING_MAX.saturating_sub(self.withdrawing.len());
        self.stats.withdrawals_dropped += docs.len().saturating_sub(room) as u64;
        self.withdrawing.extend(docs.into_iter().take(room));
        Ok(())
    }

    /// Takes out the next [`WITHDRAW_STEP_DOCUMENTS`] documents waiting to be withdrawn.
    pub(super) fn withdraw_step(&mut self, replica: &impl Replica) -> Result<(), StoreError> {
        let step = self.withdrawing.len().min(WITHDRAW_STEP_DOCUMENTS);
        let docs: Vec<String> = self.withdrawing.drain(..step).collect();
        let keys: Vec<&[u8]> = docs.iter().map(|doc| doc.as_bytes()).collect();
        self.stats.withdrawn_documents += replica.withdraw(&keys)?.len() as u64;
        let mut covered = BTreeSet::new();
        for doc in docs {
            // Changes held for it wait on earlier changes of a record this node will not be
            // given: their places count as covered, so the logs they are in move on. Should
            // the record come back into this node's scope, it comes whole.
            for held in self.held.take(doc.as_bytes()) {
                let change = held.change;
                let after = change.sequence.saturating_sub(1);
                if replica.cover(&change.origin, after, change.sequence)? {
                    covered.insert(change.origin);
                }
            }
        }
        if !covered.is_empty() {
            self.rebalance(replica, Some(&covered));
        }
        Ok(())
    }
}
