//! The running node's admission of writes and its counters, tested on engines over memory.

use super::*;
use crate::config::{PolicyKind, PolicySection};
use crate::node::status::conflicts_by_policy;
use crate::policy::Policies;
use crate::record::NodeId;
use crate::store::{DocStore, DocStoreConfig, MemoryStore};
use crate::sync::Stats;
use concord_proto::{Hello, Message, OriginMark, Summary};

/// An engine with one ready peer that reported `own_mark` of this node's log.
fn engine_with_peer(reported: u64) -> (Engine, DocStore<MemoryStore>, NodeId) {
    let me = NodeId([1; 16]);
    let peer = NodeId([2; 16]);
    let docs = DocStore::open(MemoryStore::new(), me, DocStoreConfig::default()).unwrap();
    let mut engine = Engine::new(sync::Config::new([3; 16], me, "me"));
    let zero = Duration::ZERO;
    engine
        .handle(zero, sync::Event::PeerConnected(peer), &docs)
        .unwrap();
    let hello = Message::Hello(Hello {
        cluster: [3; 16],
        node: peer.0,
        node_name: "peer".into(),
        version_min: 1,
        version_max: 2,
    });
    engine
        .handle(zero, sync::Event::Received(peer, hello), &docs)
        .unwrap();
    report(&mut engine, &docs, peer, reported);
    (engine, docs, peer)
}

fn report(engine: &mut Engine, docs: &DocStore<MemoryStore>, peer: NodeId, mark: u64) {
    let summary = Message::Summary(Summary {
        origins: vec![OriginMark {
            origin: [1; 16],
            contiguous: mark,
        }],
    });
    engine
        .handle(Duration::ZERO, sync::Event::Received(peer, summary), docs)
        .unwrap();
}

#[test]
fn writers_are_pushed_back_while_a_peer_that_kept_up_falls_far_behind() {
    let (mut engine, docs, peer) = engine_with_peer(0);
    let mut backlog = Backlog::default();
    // A peer catching up from nothing does not hold writers back.
    assert_eq!(backlog.weigh(&engine, 50_000, 0), None);
    // Once it keeps up, falling more than the bound behind does.
    report(&mut engine, &docs, peer, 49_500);
    assert_eq!(backlog.weigh(&engine, 50_000, 0), None);
    assert!(backlog.keeping_up.contains(&peer));
    let behind = backlog.weigh(&engine, 50_000 + OWN_BACKLOG_CHANGES_MAX + 1_000, 0);
    assert!(behind.is_some_and(|why| why.contains("lacks")));
    // So far behind that it cannot keep up: let go, writers go on.
    assert_eq!(
        backlog.weigh(&engine, 50_000 + OWN_BACKLOG_LET_GO + 1, 0),
        None
    );
    assert!(!backlog.keeping_up.contains(&peer));
}

#[test]
fn writers_are_pushed_back_while_the_engine_is_behind_on_peers() {
    let (engine, _docs, _peer) = engine_with_peer(0);
    let mut backlog = Backlog::default();
    assert!(backlog.weigh(&engine, 0, ENGINE_QUEUE_BUSY).is_some());
    // Between the marks it stays as it was; below the calm mark it lets go.
    assert!(backlog.weigh(&engine, 0, ENGINE_QUEUE_CALM + 1).is_some());
    assert_eq!(backlog.weigh(&engine, 0, ENGINE_QUEUE_CALM - 1), None);
    assert_eq!(backlog.weigh(&engine, 0, ENGINE_QUEUE_CALM + 1), None);
}

#[test]
fn conflicts_are_counted_by_collection_and_policy() {
    let policies = Policies::from_config(&[PolicySection {
        collection: "customers".into(),
        field: Some("address".into()),
        policy: PolicyKind::Lww,
        order: Vec::new(),
        script: None,
    }])
    .unwrap();
    let mut stats = Stats {
        conflicts: 10,
        ..Stats::default()
    };
    for (collection, field, count) in [
        ("customers", "address", 3),
        ("customers", "phone", 2),
        ("customers", "name", 1),
        ("orders", "total", 1),
    ] {
        stats
            .conflicts_by_field
            .insert((collection.into(), field.into()), count);
    }
    let counts: Vec<(String, String, u64)> = conflicts_by_policy(&stats, &policies)
        .into_iter()
        .map(|count| (count.collection, count.policy, count.count))
        .collect();
    let expected = [
        ("_other", "_other", 3),
        ("customers", "lww", 3),
        ("customers", "merge", 3),
        ("orders", "merge", 1),
    ];
    let expected: Vec<(String, String, u64)> = expected
        .iter()
        .map(|(collection, policy, count)| ((*collection).into(), (*policy).into(), *count))
        .collect();
    assert_eq!(counts, expected);
}
