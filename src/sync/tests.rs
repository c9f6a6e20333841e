//! Engines driven on virtual time over an in-memory network, quinn-proto style: every message
//! goes through the real frame encoding, links can be cut and restored.

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroUsize;

use serde_json::json;

use super::*;
use crate::record::document::{self, RecordWrite};
use crate::record::RecordId;
use crate::store::{DocStoreConfig, Durability, MemoryStore};

const CLUSTER: [u8; 16] = [9; 16];

struct TestNode {
    id: NodeId,
    engine: Engine,
    docs: DocStore<MemoryStore>,
    pushed_up_to: u64,
}

struct Network {
    nodes: Vec<TestNode>,
    links: BTreeSet<(usize, usize)>,
    in_flight: VecDeque<(usize, usize, Vec<u8>)>,
    now: Duration,
    bytes: u64,
}

impl Network {
    fn new(count: usize) -> Self {
        Self::with_config(count, |_, _| {})
    }

    /// `count` nodes, each engine's config adjusted by `adjust(index, config)`.
    fn with_config(count: usize, adjust: impl Fn(usize, &mut Config)) -> Self {
        let nodes = (0..count)
            .map(|index| {
                let id = NodeId([index as u8 + 1; 16]);
                let config = DocStoreConfig {
                    cache_documents: NonZeroUsize::new(8).unwrap(),
                    compact_after_changes: 4,
                };
                let docs = DocStore::open(MemoryStore::new(), id, config).unwrap();
                let mut engine_config = Config::new(CLUSTER, id, &format!("n{index}"));
                engine_config.changes_per_message = 16;
                adjust(index, &mut engine_config);
                TestNode {
                    id,
                    engine: Engine::new(engine_config),
                    docs,
                    pushed_up_to: 0,
                }
            })
            .collect();
        Self {
            nodes,
            links: BTreeSet::new(),
            in_flight: VecDeque::new(),
            now: Duration::ZERO,
            bytes: 0,
        }
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes.iter().position(|node| node.id == id).unwrap()
    }

    fn handle(&mut self, at: usize, event: Event) {
        let node = &mut self.nodes[at];
        let actions = node.engine.handle(self.now, event, &node.docs).unwrap();
        for action in actions {
            match action {
                Action::Send(peer, message) => {
                    let to = self.index_of(peer);
                    let frame = concord_proto::encode_frame(&message).unwrap();
                    self.bytes += frame.len() as u64;
                    self.in_flight.push_back((at, to, frame));
                }
                Action::Disconnect(peer, _) => {
                    let other = self.index_of(peer);
                    self.cut(at, other);
                }
                Action::Applied { .. } => {}
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        self.links.insert((a.min(b), a.max(b)));
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        self.handle(a, Event::PeerConnected(id_b));
        self.handle(b, Event::PeerConnected(id_a));
    }

    fn cut(&mut self, a: usize, b: usize) {
        if self.links.remove(&(a.min(b), a.max(b))) {
            let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
            self.handle(a, Event::PeerDisconnected(id_b));
            self.handle(b, Event::PeerDisconnected(id_a));
            self.in_flight
                .retain(|(from, to, _)| !((*from == a && *to == b) || (*from == b && *to == a)));
        }
    }

    /// Delivers messages (and timeouts) until nothing is left to do.
    fn settle(&mut self) {
        for _round in 0..10_000 {
            while let Some((from, to, frame)) = self.in_flight.pop_front() {
                if !self.links.contains(&(from.min(to), from.max(to))) {
                    continue;
                }
                let mut decoder = concord_proto::FrameDecoder::new();
                decoder.push(&frame).unwrap();
                let message = decoder.next_message().unwrap().unwrap();
                let sender = self.nodes[from].id;
                self.handle(to, Event::Received(sender, message));
            }
            self.now += SUMMARY_INTERVAL_DEFAULT;
            for index in 0..self.nodes.len() {
                self.handle(index, Event::Timeout);
            }
            if self.in_flight.iter().all(|(_, _, frame)| is_summary(frame)) {
                self.in_flight.clear();
                return;
            }
        }
        panic!("the network never settled");
    }

    fn write(&mut self, at: usize, key: &str, field: &str, value: i64) {
        let id = RecordId::parse(key).unwrap();
        let write = RecordWrite {
            set: vec![(field.to_owned(), json!(value))],
            ..Default::default()
        };
        let actor = self.nodes[at].id.actor(0);
        self.nodes[at]
            .docs
            .write(&id, &actor, 0, Durability::Durable, |tx| {
                document::apply_write(tx, &write)
            })
            .unwrap();
        self.push_local(at);
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
        self.push_local(at);
    }

    fn push_local(&mut self, at: usize) {
        let node = &mut self.nodes[at];
        let changes = node
            .docs
            .log_after(&node.id, node.pushed_up_to, 10_000)
            .unwrap();
        if let Some(last) = changes.last() {
            node.pushed_up_to = last.sequence;
        }
        self.handle(at, Event::LocalChanges(changes));
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
                let mut heads = doc.get_heads();
                heads.sort();
                (heads, document::read(doc))
            })
            .unwrap()
    }

    fn assert_converged(&self, keys: &[&str]) {
        for key in keys {
            let first = self.record(0, key);
            for index in 1..self.nodes.len() {
                assert_eq!(
                    self.record(index, key),
                    first,
                    "{key} differs between node 0 and node {index}"
                );
            }
        }
    }
}

fn is_summary(frame: &[u8]) -> bool {
    let mut decoder = concord_proto::FrameDecoder::new();
    decoder.push(frame).unwrap();
    matches!(decoder.next_message(), Ok(Some(Message::Summary(_))))
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
        .map(|node| node.engine.stats().conflicts)
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
    net.handle(0, Event::Timeout);
    net.handle(1, Event::Timeout);
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
        .log_after(&net.nodes[1].id, 0, 10)
        .unwrap();
    net.connect(1, 2);
    // Complete the handshake only: deliver the hellos, drop the summaries.
    let hellos: Vec<_> = net.in_flight.drain(..).collect();
    for (from, to, frame) in hellos {
        let mut decoder = concord_proto::FrameDecoder::new();
        decoder.push(&frame).unwrap();
        let message = decoder.next_message().unwrap().unwrap();
        if matches!(message, Message::Hello(_)) {
            let sender = net.nodes[from].id;
            net.handle(to, Event::Received(sender, message));
        }
    }
    net.in_flight.clear();
    let id_1 = net.nodes[1].id;
    let message = Message::Changes(Changes {
        changes: dependent.iter().map(shipped).collect(),
    });
    net.handle(2, Event::Received(id_1, message));
    assert_eq!(net.nodes[2].engine.stats().held, 1);
    let asked = net.in_flight.iter().any(|(from, to, frame)| {
        let mut decoder = concord_proto::FrameDecoder::new();
        decoder.push(frame).unwrap();
        *from == 2
            && *to == 1
            && matches!(decoder.next_message(), Ok(Some(Message::NeedDocument(_))))
    });
    assert!(asked, "node 2 asks for the document");
    net.settle();
    net.assert_converged(&["c/1"]);
    assert_eq!(
        net.record(2, "c/1").1.unwrap(),
        json!({"a": 1, "b": 2}).as_object().unwrap().clone()
    );
}

#[test]
fn duplicated_messages_change_nothing() {
    let mut net = Network::new(2);
    net.connect(0, 1);
    net.settle();
    net.write(0, "c/1", "a", 1);
    let copy: Vec<_> = net.in_flight.iter().cloned().collect();
    net.in_flight.extend(copy.clone());
    net.in_flight.extend(copy);
    net.settle();
    net.assert_converged(&["c/1"]);
    assert!(net.nodes[1].engine.stats().duplicates >= 2);
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
    net.handle(0, Event::Received(id_1, garbage));
    assert!(!net.nodes[0].engine.ready_peers().contains(&id_1));
    assert_eq!(net.nodes[0].engine.stats().malformed, 1);
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
        let changes = scratch.document_changes(key.as_bytes(), &[], 100).unwrap();
        target.apply_unlogged(key.as_bytes(), changes).unwrap();
    };
    plant(&net.nodes[0].docs, "c/hidden-a");
    plant(&net.nodes[0].docs, "c/3");
    plant(&net.nodes[1].docs, "c/hidden-b");

    // Summaries alone change nothing.
    net.settle();
    assert_eq!(net.record(1, "c/hidden-a").1, None);
    // The repair digest finds all three, both ways.
    net.now += REPAIR_INTERVAL_DEFAULT;
    net.handle(0, Event::Timeout);
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
        net.nodes[1].engine.stats().repair_documents + net.nodes[0].engine.stats().repair_documents
            >= 3
    );
    // Once repaired, the digests agree: another round finds nothing.
    let found =
        net.nodes[0].engine.stats().repair_documents + net.nodes[1].engine.stats().repair_documents;
    net.now += REPAIR_INTERVAL_DEFAULT;
    net.handle(0, Event::Timeout);
    net.settle();
    assert_eq!(
        net.nodes[0].engine.stats().repair_documents + net.nodes[1].engine.stats().repair_documents,
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
        net.nodes[0].engine.peer_policies(&net.nodes[1].id),
        PeerPolicies::Unknown
    );
    net.connect(0, 1);
    net.connect(0, 2);
    net.connect(1, 2);
    net.settle();
    let policies =
        |net: &Network, at: usize, of: usize| net.nodes[at].engine.peer_policies(&net.nodes[of].id);
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

#[test]
fn a_version_1_peer_is_sent_only_version_1_frames() {
    let me = NodeId([1; 16]);
    let old = NodeId([2; 16]);
    let docs = DocStore::open(MemoryStore::new(), me, DocStoreConfig::default()).unwrap();
    let mut engine = Engine::new(Config::new(CLUSTER, me, "me"));
    let mut sent = engine
        .handle(Duration::ZERO, Event::PeerConnected(old), &docs)
        .unwrap();
    let hello = Message::Hello(Hello {
        cluster: CLUSTER,
        node: old.0,
        node_name: "old".into(),
        version_min: 1,
        version_max: 1,
    });
    sent.extend(
        engine
            .handle(Duration::ZERO, Event::Received(old, hello), &docs)
            .unwrap(),
    );
    assert!(engine.ready_peers().contains(&old));
    assert!(sent.len() >= 2, "{sent:?}");
    for action in sent {
        let Action::Send(_, message) = action else {
            panic!("{action:?}");
        };
        let frame = concord_proto::encode_frame(&message).unwrap();
        assert_eq!(&frame[4..6], &1u16.to_be_bytes(), "{message:?}");
    }
    assert_eq!(engine.peer_policies(&old), PeerPolicies::Unknown);
}
