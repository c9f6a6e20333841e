//! How far behind the node is: its own log's backlog at its slowest peer that keeps up, and
//! the status refreshed after each engine step (writers pushed back while it is too far).

use super::*;
use crate::node::status::conflicts_by_policy;

/// Which peers keep up with this node's own writes, and whether writers are pushed back.
#[derive(Debug, Default)]
pub(super) struct Backlog {
    pub(super) keeping_up: std::collections::BTreeSet<crate::record::NodeId>,
    pub(super) engine_busy: bool,
    /// When the status last worked out what is stable (at most every
    /// [`RECLAMATION_STATUS_INTERVAL`]: it weighs every origin against every known node).
    reclamation_at: Option<Instant>,
}

/// How often `/v1/status` works out what is stable.
pub(super) const RECLAMATION_STATUS_INTERVAL: Duration = Duration::from_secs(1);

impl Backlog {
    /// Whether the status should work out what is stable again now.
    pub(super) fn reclamation_due(&mut self) -> bool {
        let due = self
            .reclamation_at
            .is_none_or(|at| at.elapsed() >= RECLAMATION_STATUS_INTERVAL);
        if due {
            self.reclamation_at = Some(Instant::now());
        }
        due
    }

    /// Weighs the engine's queue and each ready peer's lag on this node's own log; returns
    /// why writers should wait, if they should.
    pub(super) fn weigh(
        &mut self,
        engine: &Engine,
        own_mark: u64,
        waiting: usize,
    ) -> Option<String> {
        if waiting >= ENGINE_QUEUE_BUSY {
            self.engine_busy = true;
        } else if waiting < ENGINE_QUEUE_CALM {
            self.engine_busy = false;
        }
        let own = engine.writer();
        let ready = engine.ready_peers();
        self.keeping_up.retain(|peer| ready.contains(peer));
        let mut behind = None;
        for peer in ready {
            let Some(theirs) = engine.reported_mark(&peer, &own) else {
                continue;
            };
            let lacking = own_mark.saturating_sub(theirs);
            if lacking <= KEEPING_UP_CHANGES {
                self.keeping_up.insert(peer);
            } else if lacking > OWN_BACKLOG_LET_GO && self.keeping_up.remove(&peer) {
                tracing::warn!(
                    %peer,
                    lacking,
                    "the peer cannot keep up with this node's writes: it is caught up in the \
                     background and no longer holds writers back"
                );
            } else if lacking > OWN_BACKLOG_CHANGES_MAX && self.keeping_up.contains(&peer) {
                behind = Some(format!(
                    "peer {peer} lacks {lacking} of this node's changes (more than \
                     {OWN_BACKLOG_CHANGES_MAX})"
                ));
            }
        }
        if self.engine_busy {
            return Some(format!("{waiting} messages from peers wait to be applied"));
        }
        behind
    }
}

pub(super) fn refresh_status(
    shared: &Shared,
    driver: &Driver,
    backlog: &mut Backlog,
    waiting: usize,
) {
    let engine = driver.engine();
    let marks = shared.node.documents().origin_marks();
    let own = shared.node.writer();
    let own_mark = marks
        .iter()
        .find(|(origin, _)| *origin == own)
        .map_or(0, |(_, mark)| *mark);
    let overloaded = backlog.weigh(engine, own_mark, waiting);
    shared
        .overloaded
        .store(overloaded.is_some(), Ordering::Release);
    let ready = engine.ready_peers();
    let peers = shared
        .transport
        .connected()
        .into_iter()
        .map(|(peer, address)| PeerStatus {
            node: peer.to_string(),
            name: engine.peer_name(&peer).to_owned(),
            address: address.to_string(),
            state: if ready.contains(&peer) {
                "ready"
            } else {
                "handshaking"
            },
            lag: engine.lag(&peer, &marks),
            policies: engine.peer_policies(&peer).as_str(),
            queued_bytes: driver.queued(&peer),
            keeping_up: backlog.keeping_up.contains(&peer) && !engine.repairing(&peer),
            repairing: engine.repairing(&peer),
            changes_ahead: engine.peer_changes_ahead(&peer),
        })
        .collect::<Vec<_>>();
    let unreachable = shared
        .transport
        .dials()
        .into_iter()
        .filter_map(|(address, dial)| {
            let error = dial.last_error?;
            let connected = dial.peer.is_some_and(|node| {
                peers
                    .iter()
                    .any(|peer: &PeerStatus| peer.node == node.to_string())
            });
            (!connected).then(|| UnreachablePeer {
                address: address.to_string(),
                node: dial.peer.map(|node| node.to_string()),
                error,
                failures: dial.failures,
            })
        })
        .collect();
    let mut status = shared
        .status
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    status.peers = peers;
    status.unreachable = unreachable;
    status.overloaded = overloaded;
    status.writes_refused = shared.writes_refused.load(Ordering::Relaxed);
    // This runs after every engine step: the counts by policy are worked out again only
    // when a conflict was counted since the last step.
    let stats = engine.stats();
    let by_policy = if status.engine.conflicts == stats.conflicts {
        std::mem::take(&mut status.engine.conflicts_by_policy)
    } else {
        conflicts_by_policy(stats, shared.node.policies())
    };
    status.engine = EngineStats::from(engine, driver.stats(), by_policy);
    if backlog.reclamation_due() {
        let reclamation = engine.reclamation(shared.node.documents());
        status.reclamation = ReclamationStatus::from(reclamation);
    }
}
