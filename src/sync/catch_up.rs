//! Catching a peer up by whole documents, where the log no longer reaches back far enough.
//!
//! A node drops the log entries every node it knows holds ([`crate::store::truncation`]). A
//! peer that lacks some of them after all (a node new to the cluster, one whose store was made
//! again, one away while it was not known) cannot be sent them. Such a peer is sent every
//! document it may read, each with all of its changes, and then told with `Covered` that,
//! of each origin's log, it now holds everything up to the floor this node had when the catch
//! up began. From there it is sent the log as any peer is.
//!
//! Guarantees: the cover goes only after every document was handed to the transport (answers
//! go before a cover on the one ordered connection), and names no place above the floor the
//! catch up began at, so everything it covers is in the documents sent; a peer is caught up
//! this way only by a node that reads at least everything it reads (it would ignore the cover
//! otherwise); one catch up per peer at a time, a page of documents at a time, within the
//! bound of the peer's queue of document answers.

use std::collections::BTreeMap;

use super::outbound::OUTBOX_MESSAGES_MAX;
use super::{Engine, Replica};
use crate::record::NodeId;
use crate::store::StoreError;

/// Documents listed from the store per step of a catch up.
pub const CATCH_UP_DOCUMENTS_PER_STEP: usize = 256;

/// One peer's catch up by documents.
#[derive(Debug, Default)]
pub(super) struct CatchUp {
    /// The last document key listed (`None`: none yet).
    after: Option<Vec<u8>>,
    /// Every document was listed.
    listed: bool,
    /// Per origin: the peer's mark and this node's floor when the catch up began.
    ranges: BTreeMap<NodeId, (u64, u64)>,
}

impl Engine {
    /// Starts catching `peer` up by documents if, by its summary, it lacks entries of a log
    /// that this node truncated, and nothing else catches it up already.
    /// `held`: this node's marks, as the summary's handling read them.
    pub(super) fn consider_catch_up(
        &mut self,
        peer: NodeId,
        held: &[(NodeId, u64)],
        replica: &impl Replica,
    ) {
        let me = self.config.node;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.catch_up.is_some() || state.version < 4 || !replica.reads_at_least(&me, &peer) {
            return;
        }
        let ranges: BTreeMap<NodeId, (u64, u64)> = held
            .iter()
            .filter_map(|(origin, _)| {
                let floor = replica.log_floor(origin);
                let theirs = state.reported.get(origin).copied().unwrap_or(0);
                (theirs < floor).then_some((*origin, (theirs, floor)))
            })
            .collect();
        if ranges.is_empty() {
            return;
        }
        tracing::info!(%peer, origins = ranges.len(), "the peer lacks log entries truncated here: it is caught up by whole documents");
        self.stats.catch_ups += 1;
        state.catch_up = Some(CatchUp {
            ranges,
            ..CatchUp::default()
        });
    }

    /// Lists the next documents of `peer`'s catch up into its queue of document answers, as
    /// it makes room, and once every one of them went, covers what they hold.
    pub(super) fn catch_up_step(
        &mut self,
        peer: NodeId,
        replica: &impl Replica,
    ) -> Result<(), StoreError> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let Some(catch_up) = state.catch_up.as_mut() else {
            return Ok(());
        };
        if catch_up.listed {
            if state.outbox.documents_queued() == 0 {
                for (origin, (after, through)) in std::mem::take(&mut catch_up.ranges) {
                    state.outbox.covered.push((origin, after, through));
                }
                state.catch_up = None;
            }
            return Ok(());
        }
        let room = OUTBOX_MESSAGES_MAX.saturating_sub(state.outbox.documents_queued());
        if room < CATCH_UP_DOCUMENTS_PER_STEP {
            return Ok(());
        }
        let after = catch_up.after.clone();
        let page = replica.documents_after(after.as_deref(), CATCH_UP_DOCUMENTS_PER_STEP)?;
        let mut readable = Vec::with_capacity(page.len());
        for doc_key in &page {
            if replica.may_read_document(&peer, doc_key)? {
                readable.push(String::from_utf8_lossy(doc_key).into_owned());
            }
        }
        if let Some(catch_up) = self
            .peers
            .get_mut(&peer)
            .and_then(|state| state.catch_up.as_mut())
        {
            catch_up.listed = page.len() < CATCH_UP_DOCUMENTS_PER_STEP;
            catch_up.after = page.last().cloned().or(after);
        }
        for doc in readable {
            self.queue_document(peer, doc, Vec::new());
        }
        Ok(())
    }
}
