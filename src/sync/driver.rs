//! The one loop around the engine: it turns what the network and the node report into
//! engine events, and the engine's output into frames for each connection, within the room
//! each connection's send queue has. `concord run` (with QUIC), the engine's tests and the
//! simulator (with simulated links) all drive the engine through it, so the simulator tests
//! the code that ships.
//!
//! Sans-IO like the engine: no clock, no sockets; time is an argument. Guarantees:
//!
//! - a frame is produced for a connection only while its queue holds fewer than
//!   [`PEER_QUEUE_BYTES`] (an empty queue always takes one frame, of any size up to the frame
//!   limit), and the transport reports what it wrote with [`Input::Drained`]: nothing is ever
//!   dropped for lack of room, and a slow peer costs at most that much memory;
//! - inputs that arrive together are handled together: the `Changes` of one peer in a step
//!   are applied as one batch (up to [`BATCH_CHANGES_MAX`]), each peer's inputs in the order
//!   they came, and one flush makes everything applied in the step durable
//!   before any frame or `Applied` output leaves;
//! - the node's own new changes are read from its log from a cursor, after they were
//!   acknowledged, so a write is sent only once durable;
//! - an engine error does not stop the loop: it is counted and the step goes on with the
//!   next input; what it left undone is redone by summaries;
//! - once a peer showed that the store's writer must be replaced, every step that succeeds
//!   says so ([`Output::WriterSuperseded`]) until [`Driver::set_writer`]: no failure loses it.

use std::collections::BTreeMap;
use std::time::Duration;

use concord_proto::{encode_frame, Changes, Goodbye, Message, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};

use super::{Action, Engine, Event, Replica, StepTimes};
use crate::record::NodeId;
use crate::store::{LoggedChange, StoreError};

/// Bytes queued for one connection before the engine waits for the transport to write them:
/// room for a few frames of changes, so a fast link is never starved between two steps.
pub const PEER_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// The node's own log entries read per step for sending from memory; past this (a bulk load),
/// the rest is read from the store as peers take it.
pub const LOCAL_PUSH_CHANGES_MAX: usize = 4096;
pub const LOCAL_PUSH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Changes from one peer applied as one batch at most: what one message may carry, since the
/// batch reaches the engine as one message and is checked as such.
pub const BATCH_CHANGES_MAX: usize = concord_proto::CHANGES_PER_MESSAGE_MAX;

const _: () = assert!(
    PEER_QUEUE_BYTES >= FRAME_HEADER_BYTES + FRAME_BYTES_MAX,
    "a peer's queue holds the largest frame"
);

/// What the network and the node report to the driver.
#[derive(Debug)]
pub enum Input {
    /// A connection to `peer` came up; `connection` tells it from earlier ones.
    Up {
        peer: NodeId,
        connection: u64,
    },
    Down {
        peer: NodeId,
        connection: u64,
    },
    Received {
        peer: NodeId,
        connection: u64,
        message: Message,
    },
    /// The transport wrote `bytes` of this connection's queued frames.
    Drained {
        peer: NodeId,
        connection: u64,
        bytes: usize,
    },
    /// The node's own log grew (a write was acknowledged).
    LocalWrites,
    /// The time asked for by [`Driver::poll_timeout`] came.
    Timeout,
}

/// Changes gathered in a step, per peer, not yet handed to the engine.
type Pending = BTreeMap<NodeId, Vec<concord_proto::ShippedChange>>;

impl Input {
    /// The peer whose pending changes reach the engine before this input: the peer an
    /// input is about, except for bytes written (they only count the peer's queue).
    fn ordered_after_changes_of(&self) -> Option<NodeId> {
        match self {
            Input::Up { peer, .. } | Input::Down { peer, .. } | Input::Received { peer, .. } => {
                Some(*peer)
            }
            Input::Drained { .. } | Input::LocalWrites | Input::Timeout => None,
        }
    }

    /// Changes this input hands the engine to apply: what a step's length mostly follows.
    pub fn changes_carried(&self) -> usize {
        match self {
            Input::Received {
                message: Message::Changes(changes),
                ..
            } => changes.changes.len(),
            Input::Received {
                message: Message::DocumentChanges(changes),
                ..
            } => changes.changes.len(),
            _ => 0,
        }
    }
}

/// What the driver asks of the network and the node.
#[derive(Debug)]
pub enum Output {
    /// Queue this frame on the connection.
    Send {
        peer: NodeId,
        connection: u64,
        frame: Vec<u8>,
    },
    /// Send the goodbye, then close the connection.
    Disconnect {
        peer: NodeId,
        connection: u64,
        goodbye: Goodbye,
    },
    /// Changes from `from`, applied here and durable.
    Applied {
        from: NodeId,
        changes: Vec<LoggedChange>,
    },
    /// The store's writer must be replaced before the node writes again (see
    /// [`super::Action::WriterSuperseded`]): the shell draws a new one, makes the store write
    /// under it, and calls [`Driver::set_writer`]. Output by every step that succeeds until
    /// then, so a step whose flush failed, or a new writer that could not be taken, only
    /// delays it.
    WriterSuperseded { peer: NodeId, reason: String },
}

/// Counters of the driver itself, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Engine steps that failed (a store error); each is logged.
    pub step_errors: u64,
    pub last_error: Option<String>,
    /// The node's own changes handed to the engine.
    pub local_changes: u64,
    /// Frames the engine produced that could not be encoded (a bug; the peer is closed).
    pub frames_unencodable: u64,
    /// Connections the engine closed (a malformed message, a handshake not finished in time,
    /// a second hello): never for a change refused by the rule for colliding changes.
    pub disconnects: u64,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    connection: u64,
    queued: usize,
}

pub struct Driver {
    engine: Engine,
    queue_bytes: usize,
    /// The node's own log sequence up to which the engine was told.
    local_cursor: u64,
    links: BTreeMap<NodeId, Link>,
    stats: DriverStats,
    /// Where the last step's time went.
    last_step: StepTimes,
}

impl Driver {
    /// A driver for `engine`, whose node's own log was sent to peers up to nothing yet.
    pub fn new(engine: Engine, replica: &impl Replica) -> Self {
        let own = engine.writer();
        let local_cursor = replica.origin_mark(&own);
        Self::with_queue_bytes(engine, local_cursor, PEER_QUEUE_BYTES)
    }

    /// A driver whose connections queue at most `queue_bytes` (the simulator makes them
    /// small, so that queues fill).
    pub fn with_queue_bytes(engine: Engine, local_cursor: u64, queue_bytes: usize) -> Self {
        Self {
            engine,
            queue_bytes,
            local_cursor,
            links: BTreeMap::new(),
            stats: DriverStats::default(),
            last_step: StepTimes::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The wall clock now, ms since the Unix epoch (see [`Engine::set_clock`]).
    pub fn set_clock(&mut self, wall_ms: u64) {
        self.engine.set_clock(wall_ms);
    }

    /// The store writes under `writer` from now on: its own log is pushed from the start.
    pub fn set_writer(&mut self, writer: NodeId, replica: &impl Replica) {
        self.engine.set_writer(writer, replica);
        self.local_cursor = replica.origin_mark(&writer);
    }

    pub fn stats(&self) -> &DriverStats {
        &self.stats
    }

    /// Where the last step's time went, by phase.
    pub fn last_step_times(&self) -> &StepTimes {
        &self.last_step
    }

    pub fn poll_timeout(&self) -> Option<Duration> {
        self.engine.poll_timeout()
    }

    /// Bytes queued for `peer`'s connection and not yet written.
    pub fn queued(&self, peer: &NodeId) -> usize {
        self.links.get(peer).map_or(0, |link| link.queued)
    }

    /// Handles `inputs` at `now` and returns what to do.
    pub fn step(
        &mut self,
        now: Duration,
        inputs: Vec<Input>,
        replica: &impl Replica,
    ) -> Vec<Output> {
        self.last_step = StepTimes::default();
        let mut outputs = Vec::new();
        let mut applied = Vec::new();
        let mut pending = Pending::new();
        for input in inputs {
            let Some(input) = self.gather_changes(
                now,
                input,
                &mut pending,
                replica,
                &mut outputs,
                &mut applied,
            ) else {
                continue;
            };
            if let Some(peer) = input.ordered_after_changes_of() {
                self.flush_pending(now, &mut pending, peer, replica, &mut outputs, &mut applied);
            }
            self.handle_input(now, input, replica, &mut outputs, &mut applied);
        }
        let peers: Vec<NodeId> = pending.keys().copied().collect();
        for peer in peers {
            self.flush_pending(now, &mut pending, peer, replica, &mut outputs, &mut applied);
        }
        let durable = self
            .last_step
            .time("durable", || self.engine.make_durable(replica));
        if let Err(error) = durable {
            self.failed(&error);
            // Nothing applied may leave before it is durable; the next step tries again.
            return outputs
                .into_iter()
                .filter(|output| matches!(output, Output::Disconnect { .. }))
                .collect();
        }
        outputs.extend(applied);
        self.transmit(now, replica, &mut outputs);
        if let Some((peer, reason)) = self.engine.superseded_by() {
            outputs.push(Output::WriterSuperseded {
                peer,
                reason: reason.to_owned(),
            });
        }
        outputs
    }

    /// Changes from a peer's current connection join that peer's batch pending (one that
    /// would grow it past [`BATCH_CHANGES_MAX`] hands the batch to the engine first) and
    /// `None` is returned; any other input is returned as it came. Batches are per peer, so
    /// that changes arriving from two peers in turn are applied in two batches, not one per
    /// message; each peer's inputs still reach the engine in the order they came (the
    /// caller hands a peer's batch over before any other input of that peer).
    fn gather_changes(
        &mut self,
        now: Duration,
        input: Input,
        pending: &mut Pending,
        replica: &impl Replica,
        outputs: &mut Vec<Output>,
        applied: &mut Vec<Output>,
    ) -> Option<Input> {
        match input {
            Input::Received {
                peer,
                connection,
                message: Message::Changes(changes),
            } if self.is_current(&peer, connection) => {
                let held = pending.get(&peer).map_or(0, Vec::len);
                if held + changes.changes.len() > BATCH_CHANGES_MAX {
                    self.flush_pending(now, pending, peer, replica, outputs, applied);
                }
                pending.entry(peer).or_default().extend(changes.changes);
                None
            }
            other => Some(other),
        }
    }

    /// Hands one input other than gathered changes to the engine.
    fn handle_input(
        &mut self,
        now: Duration,
        input: Input,
        replica: &impl Replica,
        outputs: &mut Vec<Output>,
        applied: &mut Vec<Output>,
    ) {
        match input {
            Input::Up { peer, connection } => {
                if self.links.contains_key(&peer) {
                    self.handle(
                        now,
                        Event::PeerDisconnected(peer),
                        replica,
                        outputs,
                        applied,
                    );
                }
                self.links.insert(
                    peer,
                    Link {
                        connection,
                        queued: 0,
                    },
                );
                self.handle(now, Event::PeerConnected(peer), replica, outputs, applied);
            }
            Input::Down { peer, connection } => {
                if self.is_current(&peer, connection) {
                    self.links.remove(&peer);
                    self.handle(
                        now,
                        Event::PeerDisconnected(peer),
                        replica,
                        outputs,
                        applied,
                    );
                }
            }
            Input::Received {
                peer,
                connection,
                message,
            } => {
                if self.is_current(&peer, connection) {
                    self.handle(
                        now,
                        Event::Received(peer, message),
                        replica,
                        outputs,
                        applied,
                    );
                }
            }
            Input::Drained {
                peer,
                connection,
                bytes,
            } => {
                if let Some(link) = self.links.get_mut(&peer) {
                    if link.connection == connection {
                        assert!(bytes <= link.queued, "drained more than was queued");
                        link.queued -= bytes;
                    }
                }
            }
            Input::LocalWrites => self.local_writes(now, replica, outputs, applied),
            Input::Timeout => self.handle(now, Event::Timeout, replica, outputs, applied),
        }
    }

    fn is_current(&self, peer: &NodeId, connection: u64) -> bool {
        self.links
            .get(peer)
            .is_some_and(|link| link.connection == connection)
    }

    /// Hands `peer`'s pending batch of changes to the engine, if it has one.
    fn flush_pending(
        &mut self,
        now: Duration,
        pending: &mut Pending,
        peer: NodeId,
        replica: &impl Replica,
        outputs: &mut Vec<Output>,
        applied: &mut Vec<Output>,
    ) {
        if let Some(changes) = pending.remove(&peer) {
            let message = Message::Changes(Changes { changes });
            self.handle(
                now,
                Event::Received(peer, message),
                replica,
                outputs,
                applied,
            );
        }
    }

    fn handle(
        &mut self,
        now: Duration,
        event: Event,
        replica: &impl Replica,
        outputs: &mut Vec<Output>,
        applied: &mut Vec<Output>,
    ) {
        let phase = match &event {
            Event::PeerConnected(_) => "peer_up",
            Event::PeerDisconnected(_) => "peer_down",
            Event::Received(_, message) => message.kind(),
            Event::LocalChanges(_) => "own_changes",
            Event::Timeout => "timeout",
        };
        let handled = self
            .last_step
            .time(phase, || self.engine.handle(now, event, replica));
        match handled {
            Ok(actions) => {
                for action in actions {
                    match action {
                        Action::Disconnect(peer, goodbye) => {
                            self.stats.disconnects += 1;
                            if let Some(link) = self.links.remove(&peer) {
                                outputs.push(Output::Disconnect {
                                    peer,
                                    connection: link.connection,
                                    goodbye,
                                });
                            }
                        }
                        Action::Applied { from, changes } => {
                            applied.push(Output::Applied { from, changes });
                        }
                        // Output at the end of every step that succeeds, from the engine's
                        // state, until the writer is replaced: an event that failed after
                        // the engine saw it, or a step whose flush failed, does not lose it.
                        Action::WriterSuperseded { .. } => {}
                    }
                }
            }
            Err(error) => self.failed(&error),
        }
    }

    fn failed(&mut self, error: &StoreError) {
        tracing::error!(%error, "replication step failed");
        self.stats.step_errors += 1;
        self.stats.last_error = Some(error.to_string());
    }

    /// Hands the engine what the node wrote since the last time.
    fn local_writes(
        &mut self,
        now: Duration,
        replica: &impl Replica,
        outputs: &mut Vec<Output>,
        applied: &mut Vec<Output>,
    ) {
        let own = self.engine.writer();
        let page = self.last_step.time("own_log_read", || {
            replica.log_after(
                &own,
                self.local_cursor,
                LOCAL_PUSH_CHANGES_MAX,
                LOCAL_PUSH_BYTES_MAX,
            )
        });
        let changes = match page {
            Ok(changes) => changes,
            Err(error) => {
                self.failed(&error);
                return;
            }
        };
        let Some(last) = changes.last() else {
            return;
        };
        assert!(
            last.sequence > self.local_cursor,
            "the cursor only moves on"
        );
        self.local_cursor = last.sequence;
        self.stats.local_changes += changes.len() as u64;
        let full = changes.len() == LOCAL_PUSH_CHANGES_MAX;
        self.handle(now, Event::LocalChanges(changes), replica, outputs, applied);
        if full {
            // A bulk write: the rest goes from the store, as peers take it; the engine only
            // needs to know the log grew.
            let mark = replica.origin_mark(&own);
            if mark > self.local_cursor {
                let newest = replica.log_after(&own, mark - 1, 1, 1);
                match newest {
                    Ok(newest) => {
                        self.local_cursor = mark;
                        self.handle(now, Event::LocalChanges(newest), replica, outputs, applied);
                    }
                    Err(error) => self.failed(&error),
                }
            }
        }
    }

    /// Asks the engine for frames for every connection while its queue has room.
    fn transmit(&mut self, now: Duration, replica: &impl Replica, outputs: &mut Vec<Output>) {
        let peers: Vec<NodeId> = self.links.keys().copied().collect();
        for peer in peers {
            while let Some(link) = self.links.get(&peer).copied() {
                let room = if link.queued == 0 {
                    FRAME_HEADER_BYTES + FRAME_BYTES_MAX
                } else {
                    self.queue_bytes.saturating_sub(link.queued)
                };
                if room == 0 || !self.engine.has_output(&peer) {
                    break;
                }
                let polled = self.last_step.time("transmit", || {
                    self.engine.poll_transmit(now, peer, room, replica)
                });
                let message = match polled {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(error) => {
                        self.failed(&error);
                        break;
                    }
                };
                match encode_frame(&message) {
                    Ok(frame) => {
                        if let Some(link) = self.links.get_mut(&peer) {
                            link.queued += frame.len();
                        }
                        outputs.push(Output::Send {
                            peer,
                            connection: link.connection,
                            frame,
                        });
                    }
                    Err(error) => {
                        // The engine sizes every message to fit: this is a bug. Closing the
                        // connection makes the peer's summaries say again what it lacks.
                        tracing::error!(%peer, %error, "a message does not fit a frame");
                        self.stats.frames_unencodable += 1;
                        self.links.remove(&peer);
                        // A disconnection applies nothing: `applied` stays empty.
                        let mut applied = Vec::new();
                        self.handle(
                            now,
                            Event::PeerDisconnected(peer),
                            replica,
                            outputs,
                            &mut applied,
                        );
                        outputs.extend(applied);
                        outputs.push(Output::Disconnect {
                            peer,
                            connection: link.connection,
                            goodbye: super::goodbye(
                                concord_proto::GoodbyeReason::Overloaded,
                                "a message did not fit a frame",
                            ),
                        });
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::{self, RecordWrite};
    use crate::record::RecordId;
    use crate::store::{DocStore, DocStoreConfig, Durability, MemoryStore};
    use crate::sync::Config;

    const CLUSTER: [u8; 16] = [3; 16];

    struct Side {
        id: NodeId,
        store: MemoryStore,
        docs: DocStore<MemoryStore>,
        driver: Driver,
    }

    fn side(id: NodeId, store: MemoryStore) -> Side {
        let docs = DocStore::open(store.clone(), id, DocStoreConfig::default()).unwrap();
        let engine = Engine::new(Config::new(CLUSTER, id, "n"));
        let driver = Driver::new(engine, &docs);
        Side {
            id,
            store,
            docs,
            driver,
        }
    }

    /// The frames among `outputs`, as the messages the other side receives.
    fn received(from: NodeId, outputs: &[Output]) -> Vec<Input> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::Send {
                    connection, frame, ..
                } => {
                    let mut decoder = concord_proto::FrameDecoder::new();
                    decoder.push(frame).unwrap();
                    Some(Input::Received {
                        peer: from,
                        connection: *connection,
                        message: decoder.next_message().unwrap().unwrap(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    fn says_superseded(outputs: &[Output]) -> bool {
        outputs
            .iter()
            .any(|output| matches!(output, Output::WriterSuperseded { .. }))
    }

    /// Connects `a` and `b` and runs both until neither sends anything, every flush of `a`
    /// failing meanwhile if `fail_a`; returns `a`'s outputs, step by step.
    fn exchange(a: &mut Side, b: &mut Side, now: Duration, fail_a: bool) -> Vec<Vec<Output>> {
        let connection = 1;
        let mut to_a = vec![Input::Up {
            peer: b.id,
            connection,
        }];
        let mut to_b = vec![Input::Up {
            peer: a.id,
            connection,
        }];
        let mut steps_of_a = Vec::new();
        if fail_a {
            a.store.fail_flushes(usize::MAX);
        }
        for _ in 0..50 {
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            let from_a = a.driver.step(now, std::mem::take(&mut to_a), &a.docs);
            let from_b = b.driver.step(now, std::mem::take(&mut to_b), &b.docs);
            to_b = received(a.id, &from_a);
            to_a = received(b.id, &from_b);
            steps_of_a.push(from_a);
        }
        a.store.fail_flushes(0);
        steps_of_a
    }

    #[test]
    fn a_writer_superseded_in_a_step_whose_flush_failed_is_said_by_the_next_step() {
        let (a_id, b_id) = (NodeId([1; 16]), NodeId([2; 16]));
        let mut a = side(a_id, MemoryStore::new());
        let mut b = side(b_id, MemoryStore::new());
        let write = RecordWrite {
            set: vec![("v".to_owned(), serde_json::json!(1))],
            ..Default::default()
        };
        let id = RecordId::parse("items/1").unwrap();
        a.docs
            .write(&id, &a_id.actor(0), 0, Durability::Durable, |tx| {
                document::apply_write(tx, &write)
            })
            .unwrap();
        a.driver
            .step(Duration::ZERO, vec![Input::LocalWrites], &a.docs);
        exchange(&mut a, &mut b, Duration::ZERO, false);
        assert!(
            b.docs.heads(&id.to_doc_key()).unwrap().len() == 1,
            "b took a's write"
        );
        // a's store is lost and made again under the same writer; b holds more of its log.
        let mut a = side(a_id, MemoryStore::new());
        let steps = exchange(&mut a, &mut b, Duration::ZERO, true);
        assert!(a.driver.stats().step_errors > 0, "the flushes failed");
        let reason = a
            .driver
            .engine()
            .superseded()
            .expect("b showed a's writer is shared")
            .to_owned();
        assert!(
            steps.iter().all(|outputs| !says_superseded(outputs)),
            "no step whose flush failed says it"
        );
        // Flushes succeed again from here: the next step that succeeds says it, and every one after until a new writer.
        for _ in 0..2 {
            let outputs = a.driver.step(Duration::ZERO, vec![Input::Timeout], &a.docs);
            assert!(says_superseded(&outputs), "{reason}");
        }
        let fresh = NodeId([7; 16]);
        a.docs.switch_writer(a_id, fresh).unwrap();
        a.driver.set_writer(fresh, &a.docs);
        let outputs = a.driver.step(Duration::ZERO, vec![Input::Timeout], &a.docs);
        assert!(!says_superseded(&outputs));
    }
}
