//! What the engine does with each message a peer sends: the handshake, summaries, changes,
//! documents and compacted documents, applied and relayed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use automerge::ChangeHash;
use concord_proto::{
    Changes, CompactedDocument, DocumentChanges, GoodbyeReason, Hello, Message, NeedDocument,
    Summary, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};

use super::*;
use crate::record::NodeId;
use crate::store::{Adoption, LoggedChange, StoreError, Unplaced};

impl Engine {
    pub(super) fn receive(
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
            Message::PolicyHash { hash } => self.receive_policy_hash(peer, hash),
            Message::Writer { writer } => self.receive_writer(peer, NodeId(writer), replica)?,
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
            Message::NeedDocument(need) => self.receive_need(peer, need, replica)?,
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
            Message::Prune { origins } => self.receive_prune(peer, origins, true),
            Message::Graft { origins } => self.receive_prune(peer, origins, false),
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

    /// The peer's conflict policies, by their hash: the same as this node's, or not.
    fn receive_policy_hash(&mut self, peer: NodeId, hash: concord_proto::HashBytes) {
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

    /// The peer writes as `writer` now.
    fn receive_writer(
        &mut self,
        peer: NodeId,
        writer: NodeId,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// The peer asks for a document: sent if its grant lets it read it here; otherwise, for a
    /// peer that repair may withdraw records from, what lets its log move on.
    fn receive_need(
        &mut self,
        peer: NodeId,
        need: NeedDocument,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        // A peer is given only documents its grant lets it read, as it stands here.
        if replica.may_read_document(&peer, need.doc.as_bytes())? {
            let have = need.have.iter().map(|bytes| ChangeHash(*bytes)).collect();
            self.queue_document(peer, need.doc, have);
        } else if repair::repair_view(replica, &self.config.node, &peer)
            .is_some_and(|view| view.withdraws)
        {
            let have: Vec<ChangeHash> = need.have.iter().map(|bytes| ChangeHash(*bytes)).collect();
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
        Ok(())
    }

    /// The peer stops (`prune`) or starts again (graft) taking `origins`' changes from this
    /// node; what it missed meanwhile comes from its mark.
    fn receive_prune(
        &mut self,
        peer: NodeId,
        origins: Vec<concord_proto::NodeIdBytes>,
        prune: bool,
    ) {
        if let Some(state) = self.peers.get_mut(&peer) {
            for origin in origins {
                let origin = NodeId(origin);
                if prune {
                    state.pruned.insert(origin);
                    state.wanted.remove(&origin);
                } else {
                    state.pruned.remove(&origin);
                    state.wanted.insert(origin);
                }
            }
        }
    }

    pub(super) fn receive_hello(
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

    pub(super) fn hello(&self) -> Message {
        Message::Hello(Hello {
            cluster: self.config.cluster,
            node: self.config.node.0,
            node_name: self.config.node_name.clone(),
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION,
        })
    }

    pub(super) fn receive_summary(
        &mut self,
        peer: NodeId,
        summary: Summary,
        replica: &impl Replica,
    ) {
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
    pub(super) fn receive_cover(
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

    pub(super) fn receive_changes(
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
    pub(super) fn receive_document(
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
    pub(super) fn retry_held(
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
    pub(super) fn receive_compacted(
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

    pub(super) fn apply_and_relay(
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
    pub(super) fn note_new(&mut self, changes: &[LoggedChange]) {
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
