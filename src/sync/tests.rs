//! Engines driven through the production driver on virtual time over an in-memory network,
//! quinn-proto style: every message goes through the real frame encoding, links can be cut
//! and restored, and a frame frees its room in the sender's queue once it is delivered.

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

#[test]
fn three_nodes_converge_after_concurrent_writes() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.connect(0, 2);
    net.settle();
    net.write(0, "c/shared", "a", 1);
    net.write(1, "c/shared", "b", 2);
    net.write(2, "c/shared", "a", 3);
    net.write(0, "c/x", "v", 1);
    net.write(2, "c/y", "v", 2);
    net.settle();
    net.assert_converged(&["c/shared", "c/x", "c/y"]);
    let (_, shared) = net.record(0, "c/shared");
    let shared = shared.unwrap();
    assert_eq!(shared["b"], json!(2));
    assert!(shared["a"] == json!(1) || shared["a"] == json!(3));
    // Two sites wrote `a` concurrently: a conflict, counted where it was merged.
    let conflicts: u64 = net
        .nodes
        .iter()
        .map(|node| node.engine().stats().conflicts)
        .sum();
    assert!(
        conflicts >= 1,
        "the concurrent writes of one field are counted as a conflict"
    );
}

#[test]
fn a_write_reaches_the_far_end_of_a_line() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.settle();
    net.write(0, "c/1", "v", 7);
    net.settle();
    assert_eq!(net.record(2, "c/1").1.unwrap()["v"], json!(7));
    net.write(2, "c/1", "w", 8);
    net.settle();
    net.assert_converged(&["c/1"]);
}

#[test]
fn partitioned_writes_converge_after_healing() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.connect(0, 2);
    net.write(0, "c/1", "v", 0);
    net.settle();
    net.cut(0, 1);
    net.cut(0, 2);
    for i in 0..50 {
        net.write(0, "c/1", "v", i);
        net.write(1, "c/1", "w", i);
        net.write(0, &format!("c/a{i}"), "v", i);
        net.write(2, &format!("c/b{i}"), "v", i);
    }
    net.delete(1, "c/a0");
    net.settle();
    assert_eq!(
        net.record(1, "c/a1").1,
        None,
        "a partitioned node saw nothing"
    );
    net.connect(0, 1);
    net.connect(0, 2);
    net.settle();
    let mut keys: Vec<String> = vec!["c/1".to_owned()];
    for i in 0..50 {
        keys.push(format!("c/a{i}"));
        keys.push(format!("c/b{i}"));
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    net.assert_converged(&keys);
    assert_eq!(net.record(2, "c/1").1.unwrap()["w"], json!(49));
}

#[test]
fn in_sync_nodes_confirm_with_a_small_summary() {
    let mut net = Network::new(2);
    net.connect(0, 1);
    for i in 0..300 {
        net.write(i % 2, &format!("c/{i}"), "v", i as i64);
    }
    net.settle();
    let before = net.bytes;
    net.now += SUMMARY_INTERVAL_DEFAULT;
    net.step(0, vec![Input::Timeout]);
    net.step(1, vec![Input::Timeout]);
    net.settle();
    let confirm = net.bytes - before;
    assert!(
        confirm > 0 && confirm < 1024,
        "confirming sync cost {confirm} bytes"
    );
}

#[test]
fn a_change_with_missing_dependencies_is_held_then_applied() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.settle();
    net.write(0, "c/1", "a", 1);
    net.settle();
    net.write(1, "c/1", "b", 2);
    net.settle();
    // Node 2 receives node 1's change, which depends on node 0's, before anything else.
    let dependent = net.nodes[1]
        .docs
        .log_after(&net.nodes[1].id, 0, 10, usize::MAX)
        .unwrap();
    net.handshake_only(1, 2);
    net.receive_changes(2, 1, &dependent);
    assert_eq!(net.nodes[2].engine().stats().held, 1);
    assert_eq!(net.nodes[2].engine().held_now(), 1);
    let asked = net.in_flight.iter().any(|(from, to, _, frame)| {
        *from == 2 && *to == 1 && matches!(decode(frame), Message::NeedDocument(_))
    });
    assert!(asked, "node 2 asks for the document");
    net.settle();
    net.assert_converged(&["c/1"]);
    assert_eq!(
        net.record(2, "c/1").1.unwrap(),
        json!({"a": 1, "b": 2}).as_object().unwrap().clone()
    );
    assert_eq!(net.nodes[2].engine().held_now(), 0);
}

#[test]
fn duplicated_messages_change_nothing() {
    let mut net = Network::new(2);
    net.connect(0, 1);
    net.settle();
    net.write(0, "c/1", "a", 1);
    let copy: Vec<_> = net.in_flight.iter().cloned().collect();
    // A copy frees no room of its own: only the original is drained.
    let copies = |net: &mut Network| {
        for (from, to, connection, frame) in copy.iter().cloned() {
            let sender = net.nodes[from].id;
            net.step(
                to,
                vec![Input::Received {
                    peer: sender,
                    connection,
                    message: decode(&frame),
                }],
            );
        }
    };
    copies(&mut net);
    copies(&mut net);
    net.settle();
    net.assert_converged(&["c/1"]);
    assert!(net.nodes[1].engine().stats().duplicates >= 2);
    assert_eq!(
        net.nodes[1]
            .docs
            .log_entries(&net.nodes[0].id, 0, 100)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn malformed_changes_and_wrong_cluster_disconnect_only_that_peer() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.connect(0, 2);
    net.settle();
    let id_1 = net.nodes[1].id;
    let garbage = Message::Changes(Changes {
        changes: vec![ShippedChange {
            origin: id_1.0,
            sequence: 1,
            doc: "c/1".into(),
            change: vec![1, 2, 3],
        }],
    });
    let connection = net.connection(0, 1).unwrap();
    net.step(
        0,
        vec![Input::Received {
            peer: id_1,
            connection,
            message: garbage,
        }],
    );
    assert!(!net.nodes[0].engine().ready_peers().contains(&id_1));
    assert_eq!(net.nodes[0].engine().stats().malformed, 1);
    net.write(2, "c/ok", "v", 1);
    net.settle();
    assert!(
        net.record(0, "c/ok").1.is_some(),
        "the other peer still replicates"
    );

    let mut stranger = Engine::new(Config::new([1; 16], NodeId([7; 16]), "stranger"));
    let docs = DocStore::open(
        MemoryStore::new(),
        NodeId([7; 16]),
        DocStoreConfig::default(),
    )
    .unwrap();
    stranger
        .handle(Duration::ZERO, Event::PeerConnected(net.nodes[0].id), &docs)
        .unwrap();
    let hello = Message::Hello(Hello {
        cluster: CLUSTER,
        node: net.nodes[0].id.0,
        node_name: "n0".into(),
        version_min: 1,
        version_max: 1,
    });
    let actions = stranger
        .handle(
            Duration::ZERO,
            Event::Received(net.nodes[0].id, hello),
            &docs,
        )
        .unwrap();
    assert!(actions.iter().any(|action| matches!(action, Action::Disconnect(_, goodbye) if goodbye.reason == GoodbyeReason::WrongCluster)));
}

#[test]
fn repair_finds_documents_the_summaries_missed() {
    let mut net = Network::new(2);
    net.connect(0, 1);
    for i in 0..40 {
        net.write(i % 2, &format!("c/{i}"), "v", i as i64);
    }
    net.settle();
    // Changes that reach a store outside the log (as after a truncated log): the summaries
    // cannot see them.
    let scratch = DocStore::open(
        MemoryStore::new(),
        NodeId([42; 16]),
        DocStoreConfig::default(),
    )
    .unwrap();
    let plant = |target: &DocStore<MemoryStore>, key: &str| {
        let write = RecordWrite {
            set: vec![("hidden".to_owned(), json!(true))],
            ..Default::default()
        };
        let id = RecordId::parse(key).unwrap();
        scratch
            .write(
                &id,
                &NodeId([42; 16]).actor(0),
                0,
                Durability::Durable,
                |tx| document::apply_write(tx, &write),
            )
            .unwrap();
        let (changes, _) = scratch
            .document_changes(key.as_bytes(), &[], 100, usize::MAX)
            .unwrap();
        target
            .apply_unlogged(key.as_bytes(), changes, u64::MAX, Unplaced::Wait)
            .unwrap();
    };
    plant(&net.nodes[0].docs, "c/hidden-a");
    plant(&net.nodes[0].docs, "c/3");
    plant(&net.nodes[1].docs, "c/hidden-b");

    // Summaries alone change nothing.
    net.settle();
    assert_eq!(net.record(1, "c/hidden-a").1, None);
    // The repair digest finds all three, both ways.
    net.now += REPAIR_INTERVAL_DEFAULT;
    net.step(0, vec![Input::Timeout]);
    net.settle();
    net.assert_converged(&["c/hidden-a", "c/hidden-b", "c/3"]);
    assert_eq!(
        net.record(1, "c/hidden-a").1.unwrap()["hidden"],
        json!(true)
    );
    assert_eq!(
        net.record(0, "c/hidden-b").1.unwrap()["hidden"],
        json!(true)
    );
    assert!(
        net.nodes[1].engine().stats().repair_documents
            + net.nodes[0].engine().stats().repair_documents
            >= 3
    );
    // Once repaired, the digests agree: another round finds nothing.
    let found = net.nodes[0].engine().stats().repair_documents
        + net.nodes[1].engine().stats().repair_documents;
    net.now += REPAIR_INTERVAL_DEFAULT;
    net.step(0, vec![Input::Timeout]);
    net.settle();
    assert_eq!(
        net.nodes[0].engine().stats().repair_documents
            + net.nodes[1].engine().stats().repair_documents,
        found
    );
}

#[test]
fn a_hello_whose_node_id_differs_from_the_certificate_is_refused() {
    let me = NodeId([1; 16]);
    let docs = DocStore::open(MemoryStore::new(), me, DocStoreConfig::default()).unwrap();
    let mut engine = Engine::new(Config::new(CLUSTER, me, "me"));
    let authenticated = NodeId([2; 16]);
    engine
        .handle(Duration::ZERO, Event::PeerConnected(authenticated), &docs)
        .unwrap();
    let claims_to_be = Message::Hello(Hello {
        cluster: CLUSTER,
        node: [3; 16],
        node_name: "impostor".into(),
        version_min: 1,
        version_max: 1,
    });
    let actions = engine
        .handle(
            Duration::ZERO,
            Event::Received(authenticated, claims_to_be),
            &docs,
        )
        .unwrap();
    assert!(actions.iter().any(|action| matches!(action, Action::Disconnect(peer, goodbye) if *peer == authenticated && goodbye.detail.contains("certificate"))));
    assert!(engine.ready_peers().is_empty());
}

#[test]
fn peers_learn_whether_their_policies_differ() {
    let mut net = Network::with_config(3, |index, config| {
        config.policy_hash = if index == 2 { [2; 32] } else { [1; 32] };
    });
    assert_eq!(
        net.nodes[0].engine().peer_policies(&net.nodes[1].id),
        PeerPolicies::Unknown
    );
    net.connect(0, 1);
    net.connect(0, 2);
    net.connect(1, 2);
    net.settle();
    let policies = |net: &Network, at: usize, of: usize| {
        net.nodes[at].engine().peer_policies(&net.nodes[of].id)
    };
    assert_eq!(policies(&net, 0, 1), PeerPolicies::Same);
    assert_eq!(policies(&net, 1, 0), PeerPolicies::Same);
    for at in [0, 1] {
        assert_eq!(policies(&net, at, 2), PeerPolicies::Differ);
        assert_eq!(policies(&net, 2, at), PeerPolicies::Differ);
    }
    // Differing policies do not stop replication: documents are the same everywhere.
    net.write(2, "c/1", "v", 1);
    net.settle();
    net.assert_converged(&["c/1"]);
}

/// Everything `engine` has for `peer`, given all the room it asks for.
fn drain(engine: &mut Engine, peer: NodeId, docs: &DocStore<MemoryStore>) -> Vec<Message> {
    let mut messages = Vec::new();
    while let Some(message) = engine
        .poll_transmit(
            Duration::ZERO,
            peer,
            FRAME_HEADER_BYTES + FRAME_BYTES_MAX,
            docs,
        )
        .unwrap()
    {
        messages.push(message);
    }
    messages
}

#[test]
fn a_version_1_peer_is_sent_only_version_1_frames() {
    let me = NodeId([1; 16]);
    let old = NodeId([2; 16]);
    let docs = DocStore::open(MemoryStore::new(), me, DocStoreConfig::default()).unwrap();
    let mut engine = Engine::new(Config::new(CLUSTER, me, "me"));
    engine
        .handle(Duration::ZERO, Event::PeerConnected(old), &docs)
        .unwrap();
    let mut sent = drain(&mut engine, old, &docs);
    let hello = Message::Hello(Hello {
        cluster: CLUSTER,
        node: old.0,
        node_name: "old".into(),
        version_min: 1,
        version_max: 1,
    });
    engine
        .handle(Duration::ZERO, Event::Received(old, hello), &docs)
        .unwrap();
    sent.extend(drain(&mut engine, old, &docs));
    assert!(engine.ready_peers().contains(&old));
    assert!(sent.len() >= 2, "{sent:?}");
    for message in sent {
        let frame = concord_proto::encode_frame(&message).unwrap();
        assert_eq!(&frame[4..6], &1u16.to_be_bytes(), "{message:?}");
    }
    assert_eq!(engine.peer_policies(&old), PeerPolicies::Unknown);
}

#[test]
fn large_changes_travel_one_frame_each_and_batches_are_sized_by_bytes() {
    let mut net = Network::with_config(2, |_, config| config.changes_per_message = 2048);
    net.connect(0, 1);
    net.settle();
    // Values up to the limit: each change alone nearly fills a frame.
    let largest = concord_proto::CHANGE_BYTES_MAX - 4096;
    for (index, size) in [3_000_000, largest, 1_500_000, 1_500_000, 1_500_000]
        .into_iter()
        .enumerate()
    {
        net.write_value(0, &format!("c/big{index}"), "blob", json!("x".repeat(size)));
    }
    // Many middle-sized changes: a count of 2048 would be 40 MB in one message.
    for index in 0..2000 {
        net.write_value(
            0,
            &format!("c/mid{index}"),
            "blob",
            json!("y".repeat(20_000)),
        );
    }
    net.settle();
    assert!(net.largest_frame <= FRAME_HEADER_BYTES + FRAME_BYTES_MAX);
    let keys: Vec<String> = (0..5)
        .map(|index| format!("c/big{index}"))
        .chain((0..2000).map(|index| format!("c/mid{index}")))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    net.assert_converged(&keys);
    assert_eq!(
        net.record(1, "c/big1").1.unwrap()["blob"]
            .as_str()
            .unwrap()
            .len(),
        largest
    );
}

#[test]
fn a_slow_peer_fills_its_queue_and_still_gets_everything() {
    // Queues of 64 KiB that drain only as frames are delivered, one round at a time.
    let mut net = Network::with_queue(3, 64 * 1024, |_, _| {});
    net.connect(0, 1);
    net.connect(1, 2);
    net.settle();
    for index in 0..3000 {
        net.write_value(0, &format!("c/{index}"), "v", json!("z".repeat(200)));
    }
    // Never more than the queue's worth in flight per link (an empty queue takes one frame).
    let in_flight = |net: &Network, from: usize| -> usize {
        net.in_flight
            .iter()
            .filter(|(sender, _, _, _)| *sender == from)
            .map(|(_, _, _, frame)| frame.len())
            .sum()
    };
    assert!(in_flight(&net, 0) <= 64 * 1024 + FRAME_HEADER_BYTES + FRAME_BYTES_MAX);
    assert!(net.nodes[0].driver.queued(&net.nodes[1].id) > 0);
    net.settle();
    let keys: Vec<String> = (0..3000).map(|index| format!("c/{index}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    net.assert_converged(&keys);
}

#[test]
fn a_long_history_reaches_a_fresh_peer_and_document_answers_are_paged() {
    // Histories kept whole: compacted, this one would reach the fresh peer in one message.
    let mut net = Network::build(3, PEER_QUEUE_BYTES, false, |_, _| {});
    // 1,500 updates of one record, then 40 updates of 150 KB: the document's history is
    // larger than a frame.
    for round in 0..1500 {
        net.write(0, "c/hot", "stock", round);
    }
    for round in 0..40 {
        net.write_value(
            0,
            "c/hot",
            "note",
            json!(format!("{round}").repeat(150_000)),
        );
    }
    net.connect(0, 1);
    net.settle();
    net.assert_converged_among(&[0, 1], &["c/hot"]);
    assert_eq!(net.record(1, "c/hot").1.unwrap()["stock"], json!(1499));
    // Node 2 is sent the newest change alone: it asks for the document, whose answer spans
    // several frames.
    let latest = net.nodes[0]
        .docs
        .log_after(&net.nodes[0].id, 1539, 1, usize::MAX)
        .unwrap();
    assert_eq!(latest.len(), 1);
    net.handshake_only(1, 2);
    net.receive_changes(2, 1, &latest);
    assert_eq!(net.nodes[2].engine().held_now(), 1);
    let mut answers = 0;
    for _ in 0..100 {
        let Some((from, to, connection, frame)) = net.in_flight.pop_front() else {
            break;
        };
        if matches!(decode(&frame), Message::DocumentChanges(_)) {
            answers += 1;
        }
        net.deliver(from, to, connection, frame);
    }
    assert!(answers >= 2, "the answer was paged: {answers} parts");
    net.settle();
    net.assert_converged(&["c/hot"]);
}

#[test]
fn held_changes_expire_and_come_again() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.settle();
    net.write(0, "c/1", "a", 1);
    net.settle();
    net.write(1, "c/1", "b", 2);
    net.settle();
    let dependent = net.nodes[1]
        .docs
        .log_after(&net.nodes[1].id, 0, 10, usize::MAX)
        .unwrap();
    net.handshake_only(1, 2);
    net.receive_changes(2, 1, &dependent);
    assert_eq!(net.nodes[2].engine().held_now(), 1);
    // The answer is lost; time passes.
    net.in_flight.clear();
    net.now += HELD_CHANGE_TTL;
    net.step(2, vec![Input::Timeout]);
    assert_eq!(net.nodes[2].engine().held_now(), 0);
    assert_eq!(net.nodes[2].engine().stats().held_dropped, 1);
    // Summaries bring everything again.
    net.settle();
    net.assert_converged(&["c/1"]);
}

#[test]
fn held_changes_go_when_their_sender_does() {
    let me = NodeId([1; 16]);
    let peer = NodeId([2; 16]);
    let docs = DocStore::open(MemoryStore::new(), me, DocStoreConfig::default()).unwrap();
    let mut engine = Engine::new(Config::new(CLUSTER, me, "me"));
    engine
        .handle(Duration::ZERO, Event::PeerConnected(peer), &docs)
        .unwrap();
    let hello = Message::Hello(Hello {
        cluster: CLUSTER,
        node: peer.0,
        node_name: "peer".into(),
        version_min: 1,
        version_max: 2,
    });
    engine
        .handle(Duration::ZERO, Event::Received(peer, hello), &docs)
        .unwrap();
    // A change whose dependency is nowhere here.
    let scratch = DocStore::open(MemoryStore::new(), peer, DocStoreConfig::default()).unwrap();
    let id = RecordId::parse("c/1").unwrap();
    for value in [1, 2] {
        let write = RecordWrite {
            set: vec![("v".to_owned(), json!(value))],
            ..Default::default()
        };
        scratch
            .write(&id, &peer.actor(0), 0, Durability::Durable, |tx| {
                document::apply_write(tx, &write)
            })
            .unwrap();
    }
    let second = scratch.log_after(&peer, 1, 1, usize::MAX).unwrap();
    engine
        .handle(
            Duration::ZERO,
            Event::Received(
                peer,
                Message::Changes(Changes {
                    changes: second.iter().map(shipped).collect(),
                }),
            ),
            &docs,
        )
        .unwrap();
    assert_eq!(engine.held_now(), 1);
    engine
        .handle(Duration::ZERO, Event::PeerDisconnected(peer), &docs)
        .unwrap();
    assert_eq!(engine.held_now(), 0);
}

#[test]
fn messages_that_arrive_together_are_applied_as_batches_within_the_message_limits() {
    let mut net = Network::with_config(2, |_, config| config.changes_per_message = 1000);
    net.connect(0, 1);
    net.settle();
    for index in 0..12_000 {
        net.write(0, &format!("c/{index}"), "v", index);
    }
    // Everything node 0 has sent so far reaches node 1 in one step, as when the transport
    // hands the driver a backlog of frames at once.
    let (id_0, id_1) = (net.nodes[0].id, net.nodes[1].id);
    for _ in 0..100 {
        let frames: Vec<_> = net.in_flight.drain(..).collect();
        if frames.is_empty() {
            break;
        }
        let mut to_1 = Vec::new();
        let mut drained = 0;
        for (from, to, connection, frame) in frames {
            if from == 0 && to == 1 {
                drained += frame.len();
                to_1.push(Input::Received {
                    peer: id_0,
                    connection,
                    message: decode(&frame),
                });
            } else {
                net.deliver(from, to, connection, frame);
            }
        }
        let connection = net.connection(0, 1).expect("still connected");
        net.step(1, to_1);
        net.step(
            0,
            vec![Input::Drained {
                peer: id_1,
                connection,
                bytes: drained,
            }],
        );
    }
    assert_eq!(net.nodes[1].engine().stats().malformed, 0);
    assert!(net.connection(0, 1).is_some(), "nobody was disconnected");
    net.settle();
    let keys: Vec<String> = (0..12_000).map(|index| format!("c/{index}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    net.assert_converged(&keys);
}

#[test]
fn a_change_stamped_far_ahead_waits_for_the_receivers_clock() {
    let mut net = Network::new(2);
    // Node 0's clock runs an hour ahead of node 1's.
    let hour_ms = 3_600_000u64;
    net.nodes[0].driver.set_clock(hour_ms);
    net.nodes[1].driver.set_clock(1_000);
    let id = RecordId::parse("t/1").unwrap();
    let actor = net.nodes[0].id.actor(0);
    let write = RecordWrite {
        set: vec![("credit".to_owned(), json!(1))],
        ..Default::default()
    };
    net.nodes[0]
        .docs
        .write(&id, &actor, hour_ms as i64, Durability::Durable, |tx| {
            document::apply_write(tx, &write)
        })
        .unwrap();
    net.step(0, vec![Input::LocalWrites]);
    net.connect(0, 1);
    net.settle();
    // Not applied, not logged: node 1 waits, and counts it.
    assert_eq!(net.record(1, "t/1").1, None);
    assert!(net.nodes[1].engine().stats().changes_ahead > 0);
    assert!(net.nodes[1].engine().peer_changes_ahead(&net.nodes[0].id) > 0);
    assert_eq!(net.nodes[1].docs.origin_mark(&net.nodes[0].id), 0);
    // Once node 1's clock is within the bound of the stamp, the change is taken.
    net.nodes[1]
        .driver
        .set_clock(hour_ms - CLOCK_AHEAD_MAX_DEFAULT.as_millis() as u64);
    // Its sender sends it again once two summaries show node 1's mark did not move.
    net.run_for(SUMMARY_INTERVAL_DEFAULT * 3);
    net.settle();
    net.assert_converged(&["t/1"]);
}

#[test]
fn every_node_learns_what_every_known_node_holds_across_a_line() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.settle();
    net.write(0, "c/1", "v", 1);
    net.write(2, "c/2", "v", 2);
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 3);
    // The ends never met, yet each knows the other through the middle, heard from.
    for at in [0, 2] {
        let reclamation = net.reclamation(at);
        assert_eq!(reclamation.nodes.len(), 3, "{reclamation:?}");
        assert!(reclamation
            .nodes
            .iter()
            .all(|(_, _, taken, counts)| *taken > 0 && *counts));
        assert_eq!(reclamation.origins.len(), 2);
        for origin in &reclamation.origins {
            assert_eq!((origin.held, origin.stable), (1, 1), "{reclamation:?}");
            assert!(origin.held_back_by.is_empty());
        }
    }
    // The far end cut off: what the near end writes now is not stable, and it says who holds
    // it back, a node it never connected to.
    net.cut(1, 2);
    net.write(0, "c/1", "v", 3);
    net.run_for(stability::REPORT_INTERVAL * 3);
    let own = net.reclamation(0);
    let origin = own
        .origins
        .iter()
        .find(|o| o.origin == net.nodes[0].id)
        .unwrap();
    assert_eq!((origin.held, origin.stable), (2, 1));
    assert_eq!(origin.held_back_by, vec![net.nodes[2].id]);
    // The middle holds it, as its report says.
    let middle = net.reclamation(1);
    assert!(middle
        .origins
        .iter()
        .all(|o| o.held == 2 || o.origin != net.nodes[0].id));
    // Healed, the far end catches up and reports it: everything is stable again.
    net.connect(1, 2);
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 3);
    for at in 0..3 {
        for origin in net.reclamation(at).origins {
            assert_eq!(origin.stable, origin.held, "node {at}: {origin:?}");
        }
    }
}

#[test]
fn known_nodes_survive_a_restart_and_hold_reclamation_back_until_heard_from_again() {
    let mut net = Network::new(2);
    net.connect(0, 1);
    net.write(0, "c/1", "v", 1);
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 2);
    let known = net.nodes[0].docs.known_nodes().unwrap();
    assert_eq!(known, vec![(net.nodes[1].id, "n1".to_owned())]);
    // An engine started again over the same store knows the peer before it reconnects, and
    // counts it as holding nothing until it reports.
    let config = Config::new(CLUSTER, net.nodes[0].id, "n0");
    let mut engine = Engine::new(config);
    engine
        .handle(net.now, Event::Timeout, &net.nodes[0].docs)
        .unwrap();
    let reclamation = engine.reclamation(&net.nodes[0].docs);
    assert_eq!(reclamation.nodes.len(), 1);
    assert_eq!(reclamation.origins[0].stable, 0);
    assert_eq!(reclamation.origins[0].held_back_by, vec![net.nodes[1].id]);
}

#[test]
fn a_log_every_node_holds_is_truncated_and_a_node_new_to_it_catches_up_by_documents() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    let keys: Vec<String> = (0..7).map(|i| format!("c/{i}")).collect();
    for value in 0..60 {
        net.write(value as usize % 2, &keys[value as usize % 7], "v", value);
    }
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 3);
    // Both hold every entry, and both know it: each log keeps its last entry only.
    for at in [0, 1] {
        let docs = &net.nodes[at].docs;
        for (origin, mark) in docs.origin_marks() {
            assert_eq!(docs.log_floor(&origin), mark - 1, "node {at}");
            let left = docs.log_entries(&origin, 0, 100).unwrap();
            assert_eq!(left.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![mark]);
        }
        assert!(net.nodes[at].engine().stats().log_entries_truncated > 0);
    }
    // A node the two never knew joins through one of them: the log cannot bring it what it
    // lacks, whole documents do, and its marks then stand where theirs do.
    net.connect(1, 2);
    net.settle();
    net.run_for(SUMMARY_INTERVAL_DEFAULT * 5);
    net.settle();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    net.assert_converged(&keys);
    assert_eq!(net.nodes[1].engine().stats().catch_ups, 1);
    assert_eq!(
        net.nodes[2].docs.origin_marks(),
        net.nodes[0].docs.origin_marks()
    );
    // From there the log goes on as before.
    net.write(0, "c/1", "v", 1000);
    net.write(2, "c/2", "v", 2000);
    net.settle();
    net.assert_converged(&keys);
}

#[test]
fn a_known_node_that_is_away_holds_truncation_back() {
    let mut net = Network::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.write(0, "c/1", "v", 1);
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 3);
    net.cut(1, 2);
    for value in 2..20 {
        net.write(0, "c/1", "v", value);
    }
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 3);
    let writer = net.nodes[0].id;
    // Node 2 holds only the first entry: nothing after it goes.
    for at in [0, 1] {
        assert_eq!(net.nodes[at].docs.log_floor(&writer), 0, "node {at}");
        assert_eq!(
            net.nodes[at]
                .docs
                .log_entries(&writer, 0, 100)
                .unwrap()
                .len(),
            19
        );
    }
    // Back, it is sent the log it lacks, and then the entries go.
    net.connect(1, 2);
    net.settle();
    net.run_for(stability::REPORT_INTERVAL * 4);
    net.assert_converged(&["c/1"]);
    assert_eq!(net.nodes[1].engine().stats().catch_ups, 0);
    for at in 0..3 {
        assert_eq!(net.nodes[at].docs.log_floor(&writer), 18, "node {at}");
    }
}
