//! What goes on the wire: frame versions, sizes and batches, slow peers, long histories,
//! and held changes that expire or lose their sender.

use super::*;

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
fn changes_from_two_peers_in_one_step_are_applied_as_one_batch_each() {
    let mut net = Network::with_config(3, |_, config| config.changes_per_message = 10);
    net.connect(0, 1);
    net.connect(2, 1);
    net.settle();
    for index in 0..60 {
        net.write(0, &format!("a/{index}"), "v", index);
        net.write(2, &format!("b/{index}"), "v", index);
    }
    // Both peers' messages reach node 1 in one step, in turn, as from two connections.
    let (id_0, id_2) = (net.nodes[0].id, net.nodes[2].id);
    let frames: Vec<_> = net.in_flight.drain(..).collect();
    let (mut from_0, mut from_2, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for (from, to, connection, frame) in frames {
        let input = |peer| Input::Received {
            peer,
            connection,
            message: decode(&frame),
        };
        match (from, to) {
            (0, 1) => from_0.push(input(id_0)),
            (2, 1) => from_2.push(input(id_2)),
            _ => others.push((from, to, connection, frame)),
        }
    }
    let changes = |inputs: &[Input]| {
        inputs
            .iter()
            .filter(|input| input.changes_carried() > 0)
            .count()
    };
    assert!(
        changes(&from_0) >= 2 && changes(&from_2) >= 2,
        "several messages each"
    );
    let mut inputs = Vec::new();
    let mut from_2 = from_2.into_iter();
    for input in from_0 {
        inputs.push(input);
        inputs.extend(from_2.next());
    }
    inputs.extend(from_2);
    let node = &mut net.nodes[1];
    let outputs = node.driver.step(net.now, inputs, &node.docs);
    let mut applied: Vec<NodeId> = Vec::new();
    for output in outputs {
        match output {
            Output::Applied { from, .. } => applied.push(from),
            Output::Send {
                peer,
                connection,
                frame,
            } => {
                let to = net.index_of(peer);
                net.in_flight.push_back((1, to, connection, frame));
            }
            other => panic!("nothing else here: {other:?}"),
        }
    }
    assert_eq!(applied.len(), 2, "one batch per peer: {applied:?}");
    assert!(applied.contains(&id_0) && applied.contains(&id_2));
    for (from, to, connection, frame) in others {
        net.deliver(from, to, connection, frame);
    }
    net.settle();
    let keys: Vec<String> = (0..60)
        .flat_map(|index| [format!("a/{index}"), format!("b/{index}")])
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    net.assert_converged(&keys);
}
