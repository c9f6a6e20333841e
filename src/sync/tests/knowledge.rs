//! Clocks, and what every node knows of every other's logs: known nodes, truncation, and
//! catching up by documents.

use super::*;

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
