//! Engines driven through the production driver on virtual time over an in-memory network,
//! quinn-proto style: every message goes through the real frame encoding, links can be cut
//! and restored, and a frame frees its room in the sender's queue once it is delivered.

use concord_proto::{Changes, Hello};

use crate::store::{DocStore, Unplaced};
use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroUsize;

use serde_json::json;

use super::*;
use crate::record::document::{self, RecordWrite};
use crate::record::RecordId;
use crate::store::{DocStoreConfig, Durability, MemoryStore};
use concord_proto::{ShippedChange, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};

const CLUSTER: [u8; 16] = [9; 16];

struct TestNode {
    id: NodeId,
    driver: Driver,
    docs: DocStore<MemoryStore>,
}

impl TestNode {
    fn engine(&self) -> &Engine {
        self.driver.engine()
    }
}

struct Network {
    nodes: Vec<TestNode>,
    /// Connection id of each connected pair (smaller index first).
    links: BTreeMap<(usize, usize), u64>,
    next_connection: u64,
    in_flight: VecDeque<(usize, usize, u64, Vec<u8>)>,
    now: Duration,
    bytes: u64,
    /// The largest frame seen.
    largest_frame: usize,
}

impl Network {
    fn new(count: usize) -> Self {
        Self::with_config(count, |_, _| {})
    }

    /// `count` nodes, each engine's config adjusted by `adjust(index, config)`.
    fn with_config(count: usize, adjust: impl Fn(usize, &mut Config)) -> Self {
        Self::with_queue(count, PEER_QUEUE_BYTES, adjust)
    }

    fn with_queue(count: usize, queue_bytes: usize, adjust: impl Fn(usize, &mut Config)) -> Self {
        Self::build(count, queue_bytes, true, adjust)
    }

    /// `count` nodes that compact stable histories or not (`compact`).
    fn build(
        count: usize,
        queue_bytes: usize,
        compact: bool,
        adjust: impl Fn(usize, &mut Config),
    ) -> Self {
        let nodes = (0..count)
            .map(|index| {
                let id = NodeId([index as u8 + 1; 16]);
                let config = DocStoreConfig {
                    cache_documents: NonZeroUsize::new(8).unwrap(),
                    compact_after_changes: 4,
                    compact_histories: compact,
                    ..DocStoreConfig::default()
                };
                let docs = DocStore::open(MemoryStore::new(), id, config).unwrap();
                let mut engine_config = Config::new(CLUSTER, id, &format!("n{index}"));
                engine_config.changes_per_message = 16;
                adjust(index, &mut engine_config);
                TestNode {
                    id,
                    driver: Driver::with_queue_bytes(Engine::new(engine_config), 0, queue_bytes),
                    docs,
                }
            })
            .collect();
        Self {
            nodes,
            links: BTreeMap::new(),
            next_connection: 1,
            in_flight: VecDeque::new(),
            now: Duration::ZERO,
            bytes: 0,
            largest_frame: 0,
        }
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes.iter().position(|node| node.id == id).unwrap()
    }

    fn step(&mut self, at: usize, inputs: Vec<Input>) {
        let node = &mut self.nodes[at];
        let outputs = node.driver.step(self.now, inputs, &node.docs);
        assert_eq!(
            node.driver.stats().step_errors,
            0,
            "{:?}",
            node.driver.stats()
        );
        for output in outputs {
            match output {
                Output::Send {
                    peer,
                    connection,
                    frame,
                } => {
                    let to = self.index_of(peer);
                    self.bytes += frame.len() as u64;
                    self.largest_frame = self.largest_frame.max(frame.len());
                    assert!(frame.len() <= FRAME_HEADER_BYTES + FRAME_BYTES_MAX);
                    self.in_flight.push_back((at, to, connection, frame));
                }
                Output::Disconnect { peer, .. } => {
                    let other = self.index_of(peer);
                    self.cut(at, other);
                }
                Output::Applied { .. } => {}
                Output::WriterSuperseded { reason, .. } => {
                    panic!("node {at:?}: no store here is restored or shared: {reason}")
                }
            }
        }
    }

    fn connection(&self, a: usize, b: usize) -> Option<u64> {
        self.links.get(&(a.min(b), a.max(b))).copied()
    }

    fn connect(&mut self, a: usize, b: usize) {
        let connection = self.next_connection;
        self.next_connection += 1;
        self.links.insert((a.min(b), a.max(b)), connection);
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        self.step(
            a,
            vec![Input::Up {
                peer: id_b,
                connection,
            }],
        );
        self.step(
            b,
            vec![Input::Up {
                peer: id_a,
                connection,
            }],
        );
    }

    fn cut(&mut self, a: usize, b: usize) {
        if let Some(connection) = self.links.remove(&(a.min(b), a.max(b))) {
            let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
            self.step(
                a,
                vec![Input::Down {
                    peer: id_b,
                    connection,
                }],
            );
            self.step(
                b,
                vec![Input::Down {
                    peer: id_a,
                    connection,
                }],
            );
            self.in_flight
                .retain(|(from, to, _, _)| !((*from == a && *to == b) || (*from == b && *to == a)));
        }
    }

    /// Delivers one frame: the receiver handles it, the sender's queue gets its room back.
    fn deliver(&mut self, from: usize, to: usize, connection: u64, frame: Vec<u8>) {
        if self.connection(from, to) != Some(connection) {
            return;
        }
        let message = decode(&frame);
        let (sender, receiver) = (self.nodes[from].id, self.nodes[to].id);
        self.step(
            to,
            vec![Input::Received {
                peer: sender,
                connection,
                message,
            }],
        );
        if self.connection(from, to) == Some(connection) {
            self.step(
                from,
                vec![Input::Drained {
                    peer: receiver,
                    connection,
                    bytes: frame.len(),
                }],
            );
        }
    }

    /// Connects `a` and `b` but completes only the handshake: the hellos are delivered,
    /// everything else in flight is dropped (so no summary, nothing streamed).
    fn handshake_only(&mut self, a: usize, b: usize) {
        self.connect(a, b);
        let handshake: Vec<_> = self.in_flight.drain(..).collect();
        for (from, to, connection, frame) in handshake {
            if matches!(decode(&frame), Message::Hello(_)) {
                let sender = self.nodes[from].id;
                self.step(
                    to,
                    vec![Input::Received {
                        peer: sender,
                        connection,
                        message: decode(&frame),
                    }],
                );
            }
        }
        self.in_flight.clear();
    }

    /// Hands `to` a `Changes` message of `changes` from `from`, over their connection.
    fn receive_changes(&mut self, to: usize, from: usize, changes: &[LoggedChange]) {
        let sender = self.nodes[from].id;
        let connection = self.connection(from, to).expect("connected");
        self.step(
            to,
            vec![Input::Received {
                peer: sender,
                connection,
                message: Message::Changes(Changes {
                    changes: changes.iter().map(shipped).collect(),
                }),
            }],
        );
    }

    fn timeout_all(&mut self) {
        for index in 0..self.nodes.len() {
            self.step(index, vec![Input::Timeout]);
        }
    }

    /// Delivers messages (and timeouts) until nothing is left to do.
    fn settle(&mut self) {
        for _round in 0..10_000 {
            while let Some((from, to, connection, frame)) = self.in_flight.pop_front() {
                self.deliver(from, to, connection, frame);
            }
            self.now += SUMMARY_INTERVAL_DEFAULT;
            self.timeout_all();
            if self
                .in_flight
                .iter()
                .all(|(_, _, _, frame)| is_summary(frame))
            {
                while let Some((from, to, connection, frame)) = self.in_flight.pop_front() {
                    self.deliver(from, to, connection, frame);
                }
                if self.in_flight.is_empty() {
                    return;
                }
            }
        }
        panic!("the network never settled");
    }

    /// Lets `duration` pass, a summary interval at a time, delivering everything sent.
    fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        while self.now < until {
            self.now += SUMMARY_INTERVAL_DEFAULT;
            self.timeout_all();
            while let Some((from, to, connection, frame)) = self.in_flight.pop_front() {
                self.deliver(from, to, connection, frame);
            }
        }
    }

    fn reclamation(&self, at: usize) -> stability::Reclamation {
        self.nodes[at].engine().reclamation(&self.nodes[at].docs)
    }

    fn write_value(&mut self, at: usize, key: &str, field: &str, value: serde_json::Value) {
        let id = RecordId::parse(key).unwrap();
        let write = RecordWrite {
            set: vec![(field.to_owned(), value)],
            ..Default::default()
        };
        let actor = self.nodes[at].id.actor(0);
        self.nodes[at]
            .docs
            .write(&id, &actor, 0, Durability::Durable, |tx| {
                document::apply_write(tx, &write)
            })
            .unwrap();
        self.step(at, vec![Input::LocalWrites]);
    }

    fn write(&mut self, at: usize, key: &str, field: &str, value: i64) {
        self.write_value(at, key, field, json!(value));
    }

    fn delete(&mut self, at: usize, key: &str) {
        let id = RecordId::parse(key).unwrap();
        let actor = self.nodes[at].id.actor(0);
        self.nodes[at]
            .docs
            .write(&id, &actor, 0, Durability::Durable, |tx| {
                document::apply_delete(tx)
            })
            .unwrap();
        self.step(at, vec![Input::LocalWrites]);
    }

    fn record(
        &self,
        at: usize,
        key: &str,
    ) -> (
        Vec<ChangeHash>,
        Option<serde_json::Map<String, serde_json::Value>>,
    ) {
        let id = RecordId::parse(key).unwrap();
        self.nodes[at]
            .docs
            .read(&id, |doc| {
                let mut heads = doc.heads();
                heads.sort();
                (heads, document::read(doc.local()))
            })
            .unwrap()
    }

    fn assert_converged(&self, keys: &[&str]) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.assert_converged_among(&all, keys);
    }

    /// `nodes` hold the same records and as much of every origin's log.
    fn assert_converged_among(&self, nodes: &[usize], keys: &[&str]) {
        let (first, rest) = nodes.split_first().unwrap();
        for key in keys {
            let expected = self.record(*first, key);
            for index in rest {
                let found = self.record(*index, key);
                // Values may be megabytes: say which record differs, not what it holds.
                assert!(
                    found == expected,
                    "{key} differs between node {first} and node {index}: heads {:?} and {:?}",
                    expected.0,
                    found.0
                );
            }
        }
        let marks = self.nodes[*first].docs.origin_marks();
        for index in rest {
            assert_eq!(
                self.nodes[*index].docs.origin_marks(),
                marks,
                "log marks differ"
            );
        }
    }
}

fn decode(frame: &[u8]) -> Message {
    let mut decoder = concord_proto::FrameDecoder::new();
    decoder.push(frame).unwrap();
    decoder.next_message().unwrap().unwrap()
}

fn shipped(change: &LoggedChange) -> ShippedChange {
    ShippedChange {
        origin: change.origin.0,
        sequence: change.sequence,
        doc: String::from_utf8_lossy(&change.doc_key).into_owned(),
        change: change.change.clone(),
    }
}

fn is_summary(frame: &[u8]) -> bool {
    matches!(decode(frame), Message::Summary(_))
}

mod convergence;
mod frames;
mod knowledge;
