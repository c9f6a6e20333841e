//! Nodes converge: concurrent writes, partitions, held changes, duplicates, malformed
//! peers, repair, handshakes.

use super::*;

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
