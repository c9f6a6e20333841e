//! Repair: a digest of (document, heads) over buckets of the key space finds documents the
//! logs missed (a truncated log, a bug), without scanning on either side until a leaf's
//! fingerprints differ.
//!
//! A round runs only towards a peer whose summaries are quiet: its marks equal this node's,
//! or did not move since the last round. While changes flow, the summaries are what heal, and
//! digests would differ anyway by whatever is in flight, so comparing them then costs scans
//! and finds nothing.

use std::collections::BTreeSet;

use automerge::ChangeHash;
use concord_proto::{
    DigestRange, DocumentHeads, GoodbyeReason, Message, NeedDocument, RangeDigest,
    DOCUMENTS_PER_HEADS_MAX, MESSAGE_BYTES_MAX, RANGES_PER_DIGEST_MAX,
};

use super::{Action, Engine, Replica};
use crate::record::NodeId;
use crate::store::digest;
use crate::store::StoreError;

/// Documents listed per leaf in one repair answer.
const REPAIR_DOCUMENTS_PER_LEAF_MAX: usize = DOCUMENTS_PER_HEADS_MAX;
/// Bytes of one leaf's listing: well under a frame, so listings queue without crowding out
/// everything else.
const REPAIR_LISTING_BYTES_MAX: usize = MESSAGE_BYTES_MAX / 16;

impl Engine {
    /// Sends the top of the digest to every ready peer whose summaries are quiet.
    pub(super) fn start_repair(&mut self, replica: &impl Replica) {
        let marks: Vec<(NodeId, u64)> = replica
            .origin_marks()
            .into_iter()
            .filter(|(_, mark)| *mark > 0)
            .collect();
        let top = self.digest_message(replica, &digest::children(""));
        let mut due = Vec::new();
        for (id, state) in self.peers.iter_mut() {
            if !state.ready || !state.summarised {
                continue;
            }
            let reported: Vec<(NodeId, u64)> = state
                .reported
                .iter()
                .filter(|(_, mark)| **mark > 0)
                .map(|(origin, mark)| (*origin, *mark))
                .collect();
            let in_step = reported == marks;
            let still = state.reported == state.reported_at_last_repair;
            state.reported_at_last_repair = state.reported.clone();
            if in_step || still {
                due.push(*id);
            }
        }
        for peer in due {
            self.stats.repair_rounds += 1;
            self.queue_message(peer, top.clone());
        }
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
    /// finer buckets under them, or, at a leaf, our documents in it with their heads (every
    /// leaf of one digest found by one scan of the store).
    pub(super) fn receive_digest(
        &mut self,
        peer: NodeId,
        digest_message: RangeDigest,
        replica: &impl Replica,
        actions: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
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
            let mine = replica.digest(&range.start).unwrap_or_default();
            if mine.count == range.count && mine.fingerprint == range.fingerprint {
                continue;
            }
            if depth + 1 < digest::BUCKET_HEX_DIGITS {
                finer.extend(digest::children(&range.start));
            } else {
                leaves.push(range.start);
            }
        }
        for (leaf, documents) in replica.leaf_documents(&leaves, REPAIR_DOCUMENTS_PER_LEAF_MAX)? {
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
        for chunk in finer.chunks(RANGES_PER_DIGEST_MAX) {
            let message = self.digest_message(replica, chunk);
            self.queue_message(peer, message);
        }
        Ok(())
    }

    /// The peer's documents in a leaf: ask for what we lack, send what it lacks.
    pub(super) fn receive_heads(
        &mut self,
        peer: NodeId,
        heads: DocumentHeads,
        replica: &impl Replica,
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
                self.queue_message(peer, Message::NeedDocument(need));
            }
            // What the peer lacks of it goes as an answer, sized when there is room.
            let (lacking, _) = replica.document_changes(&doc_key, &their_heads, 1, usize::MAX)?;
            if !lacking.is_empty() {
                self.queue_document(peer, doc, their_heads);
            }
        }
        // Documents of ours in that leaf that the peer does not hold at all.
        let ours = replica.leaf_documents(&[heads.leaf], REPAIR_DOCUMENTS_PER_LEAF_MAX)?;
        for (doc_key, _) in ours.into_iter().flat_map(|(_, documents)| documents) {
            if listed.contains(&doc_key) {
                continue;
            }
            self.stats.repair_documents += 1;
            let doc = String::from_utf8_lossy(&doc_key).into_owned();
            self.queue_document(peer, doc, Vec::new());
        }
        Ok(())
    }
}
