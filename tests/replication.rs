//! Replication over real QUIC with mutual TLS on loopback: nodes in this process, each with
//! its own sled data dir, certificates from a real cluster CA, and UDP relays on the links that
//! tests cut to make partitions.

mod common;

use std::time::Duration;

use common::cluster::{converge, eventually, TestNode};
use concord::net::relay::Relay;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(20);

fn ca(parent: &std::path::Path, name: &str) -> std::path::PathBuf {
    let dir = parent.join(name);
    concord::net::tls::create_ca(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_converge_after_concurrent_writes() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[a.listen, b.listen]);
    a.start().await;
    b.start().await;
    c.start().await;
    eventually("full mesh", CONVERGE, || {
        a.status().unwrap()["peers"].as_array().unwrap().len() == 2
    })
    .await;
    a.put("customers/1", json!({"name": "Ada", "city": "London"}));
    b.put("customers/1", json!({"email": "ada@example.com"}));
    c.put("customers/1", json!({"city": "Paris"}));
    a.put("customers/2", json!({"name": "Grace"}));
    c.put("orders/9", json!({"total": 12.5}));
    converge(
        &[&a, &b, &c],
        &["customers/1", "customers/2", "orders/9"],
        CONVERGE,
    )
    .await;
    let merged = a.get("customers/1").unwrap();
    assert_eq!(merged["name"], json!("Ada"));
    assert_eq!(merged["email"], json!("ada@example.com"));
    // A delete replicates too.
    b.delete("customers/2");
    converge(&[&a, &b, &c], &["customers/2"], CONVERGE).await;
    assert_eq!(c.get("customers/2"), None);
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_relays_from_one_end_to_the_other() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut b = TestNode::create(temp.path(), "b", &ca, &[]);
    let mut a = TestNode::create(temp.path(), "a", &ca, &[b.listen]);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[b.listen]);
    b.start().await;
    a.start().await;
    c.start().await;
    a.put("items/1", json!({"from": "a"}));
    c.put("items/2", json!({"from": "c"}));
    converge(&[&a, &b, &c], &["items/1", "items/2"], CONVERGE).await;
    assert_eq!(c.get("items/1"), Some(json!({"from": "a"})));
    let a_status = a.status().unwrap();
    assert_eq!(
        a_status["peers"].as_array().unwrap().len(),
        1,
        "a and c never connect"
    );
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_catches_up() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    a.start().await;
    b.start().await;
    a.put("items/before", json!({"v": 1}));
    converge(&[&a, &b], &["items/before"], CONVERGE).await;
    b.stop().await;
    for i in 0..200 {
        a.put(&format!("items/{i}"), json!({"v": i}));
    }
    b.start().await;
    let ids: Vec<String> = (0..200).map(|i| format!("items/{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    converge(&[&a, &b], &ids, CONVERGE).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_both_sides_of_a_partition_converge_after_healing() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[]);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[]);
    // Every link goes through a relay the test can cut; each node dials the others.
    let relay_ab = Relay::start(b.listen).await.unwrap();
    let relay_ac = Relay::start(c.listen).await.unwrap();
    let relay_bc = Relay::start(c.listen).await.unwrap();
    a.set_peers(&[relay_ab.address, relay_ac.address]);
    b.set_peers(&[relay_bc.address]);
    a.start().await;
    b.start().await;
    c.start().await;
    eventually("full mesh", CONVERGE, || {
        c.status().unwrap()["peers"].as_array().unwrap().len() == 2
    })
    .await;
    a.put("items/shared", json!({"v": 0}));
    converge(&[&a, &b, &c], &["items/shared"], CONVERGE).await;

    // Cut a off from b and c.
    relay_ab.set_cut(true);
    relay_ac.set_cut(true);
    eventually("a sees the cut", CONVERGE, || {
        a.status().unwrap()["peers"].as_array().unwrap().is_empty()
    })
    .await;
    a.put("items/shared", json!({"a_side": 1, "both": "a"}));
    b.put("items/shared", json!({"b_side": 2, "both": "b"}));
    a.put("items/only-a", json!({"v": "a"}));
    c.put("items/only-c", json!({"v": "c"}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.get("items/only-a"), None, "the partition holds");
    assert_eq!(a.get("items/only-c"), None, "the partition holds");

    relay_ab.set_cut(false);
    relay_ac.set_cut(false);
    converge(
        &[&a, &b, &c],
        &["items/shared", "items/only-a", "items/only-c"],
        CONVERGE,
    )
    .await;
    let shared = c.get("items/shared").unwrap();
    assert_eq!(
        (&shared["v"], &shared["a_side"], &shared["b_side"]),
        (&json!(0), &json!(1), &json!(2))
    );
    assert!(shared["both"] == json!("a") || shared["both"] == json!("b"));
    // Both sides wrote `both`: a conflict, counted in the metrics where it was merged.
    let conflicts: u64 = [&a, &b, &c]
        .iter()
        .map(|node| node.metric(r#"concord_conflicts_total{collection="items",policy="merge"}"#))
        .sum();
    assert!(
        conflicts >= 1,
        "concurrent writes of one field show in the metrics"
    );
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_from_another_ca_gets_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let other_ca = ca_dir_other(temp.path());
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut stranger = TestNode::create(temp.path(), "stranger", &other_ca, &[a.listen]);
    a.start().await;
    a.put("secrets/1", json!({"v": "classified"}));
    stranger.start().await;
    eventually("the stranger is refused", CONVERGE, || {
        a.metric("concord_handshakes_refused_total") > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stranger.get("secrets/1"), None);
    assert!(a.status().unwrap()["peers"].as_array().unwrap().is_empty());
    a.stop().await;
    stranger.stop().await;
}

fn ca_dir_other(parent: &std::path::Path) -> std::path::PathBuf {
    ca(parent, "other-ca")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_frames_close_only_that_connection() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    a.start().await;
    b.start().await;
    eventually("a and b connect", CONVERGE, || {
        a.status().unwrap()["peers"].as_array().unwrap().len() == 1
    })
    .await;

    // A client with a valid cluster certificate that sends bad frames.
    let rogue_dir = temp.path().join("rogue");
    let rogue_id = concord::record::NodeId::random().unwrap();
    concord::net::tls::issue_node_certificate(&ca, &rogue_id, &rogue_dir).unwrap();
    let tls = concord::net::tls::NodeTls::load(&rogue_dir, rogue_id).unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config().unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let frames: [Vec<u8>; 2] = [
        // Oversized: a length prefix past the 4 MiB limit.
        (64u32 * 1024 * 1024).to_be_bytes().to_vec(),
        // Malformed: a valid length, version 1, then an unknown message variant.
        vec![0, 0, 0, 3, 0, 1, 200],
    ];
    for frame in frames {
        let connection = endpoint
            .connect(a.listen, "peer.node.concord")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        assert!(
            closed.is_ok(),
            "the node closes a connection that sends a bad frame"
        );
    }
    assert!(a.metric("concord_frames_refused_total") >= 1);
    // The good peer is unaffected.
    a.put("items/after", json!({"v": 1}));
    converge(&[&a, &b], &["items/after"], CONVERGE).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revert_replicates_and_can_itself_be_reverted() {
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    a.start().await;
    b.start().await;
    a.put("customers/1", json!({"name": "Ada", "credit": 100}));
    converge(&[&a, &b], &["customers/1"], CONVERGE).await;
    b.put("customers/1", json!({"credit": -5000, "note": "bad edit"}));
    converge(&[&a, &b], &["customers/1"], CONVERGE).await;
    let history = a.history("customers/1");
    let first = history[0]["hash"].as_str().unwrap().to_owned();
    // Revert on A to the first version: B gets the restored record.
    a.revert("customers/1", &first);
    eventually("B sees the revert", CONVERGE, || {
        b.get("customers/1") == Some(json!({"name": "Ada", "credit": 100}))
    })
    .await;
    // The revert is a version of its own; B reverts to the bad edit, and A sees that.
    let history = b.history("customers/1");
    assert_eq!(history.len(), 3);
    let bad = history[1]["hash"].as_str().unwrap().to_owned();
    b.revert("customers/1", &bad);
    eventually("A sees the revert of the revert", CONVERGE, || {
        a.get("customers/1") == Some(json!({"name": "Ada", "credit": -5000, "note": "bad edit"}))
    })
    .await;
    // The audit trail on either node names who wrote each of the four changes.
    let report = a.audit("record=customers/1");
    let writers: Vec<&str> = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["node_name"].as_str().unwrap())
        .collect();
    assert_eq!(writers.len(), 4, "{report}");
    assert_eq!(writers.iter().filter(|name| **name == "a").count(), 2);
    assert_eq!(writers.iter().filter(|name| **name == "b").count(), 2);
    let report = b.audit("node=b&source=api");
    assert_eq!(report["entries"].as_array().unwrap().len(), 2, "{report}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_whose_policies_differ_say_so_in_status_and_metrics() {
    use concord::config::{PolicyKind, PolicySection};
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[a.listen, b.listen]);
    let policy = |policy| PolicySection {
        collection: "customers".into(),
        field: None,
        policy,
        order: Vec::new(),
        script: None,
    };
    a.set_policies(vec![policy(PolicyKind::Lww)]);
    b.set_policies(vec![policy(PolicyKind::Lww)]);
    c.set_policies(vec![policy(PolicyKind::Manual)]);
    for node in [&mut a, &mut b, &mut c] {
        node.start().await;
    }
    let said = |node: &TestNode, of: &TestNode| -> Option<String> {
        let status = node.status()?;
        let peer_id = of.status()?["node"].as_str()?.to_owned();
        status["peers"]
            .as_array()?
            .iter()
            .find(|peer| peer["node"] == json!(peer_id))
            .and_then(|peer| peer["policies"].as_str().map(str::to_owned))
    };
    eventually("every peer has said its policies", CONVERGE, || {
        [(&a, &b), (&a, &c), (&b, &c), (&c, &a)]
            .iter()
            .all(|(node, of)| said(node, of).is_some_and(|said| said != "unknown"))
    })
    .await;
    assert_eq!(said(&a, &b).as_deref(), Some("same"));
    assert_eq!(said(&b, &a).as_deref(), Some("same"));
    assert_eq!(said(&a, &c).as_deref(), Some("differ"));
    assert_eq!(said(&c, &b).as_deref(), Some("differ"));
    assert_eq!(a.metric("concord_peers_policy_differ"), 1);
    assert_eq!(c.metric("concord_peers_policy_differ"), 2);
    let hash = |node: &TestNode| node.status().unwrap()["policy_hash"].clone();
    assert_eq!(hash(&a), hash(&b));
    assert_ne!(hash(&a), hash(&c));
    // Replication goes on: the nodes hold the same documents, and resolve them differently.
    a.put("customers/1", json!({"name": "Ada"}));
    converge(&[&a, &b, &c], &["customers/1"], CONVERGE).await;
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await;
    }
}

/// Every node learns what every node holds, across a line whose ends never connect: the
/// status says which log entries are stable, and which node holds the rest back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_what_every_known_node_holds_and_who_holds_reclamation_back() {
    // Reports go every 10 s and cross one hop per beat.
    const REPORTED: Duration = Duration::from_secs(45);
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[b.listen]);
    for node in [&mut a, &mut b, &mut c] {
        node.start().await;
    }
    a.put("customers/1", json!({"name": "Ada"}));
    c.put("customers/2", json!({"name": "Cy"}));
    converge(&[&a, &b, &c], &["customers/1", "customers/2"], CONVERGE).await;
    let stable_everywhere = |node: &TestNode| {
        node.status().is_some_and(|status| {
            let reclamation = &status["reclamation"];
            reclamation["known_nodes"].as_array().map(Vec::len) == Some(3)
                && reclamation["unstable_entries"] == json!(0)
                && reclamation["origins"].as_array().is_some_and(|origins| {
                    origins.len() >= 2 && origins.iter().all(|o| o["stable"] == o["held"])
                })
        })
    };
    eventually(
        "every node holds every entry, as every node knows",
        REPORTED,
        || [&a, &b, &c].iter().all(|node| stable_everywhere(node)),
    )
    .await;
    assert_eq!(a.metric("concord_known_nodes"), 3);
    assert_eq!(a.metric("concord_log_entries_unstable"), 0);
    // The far end stops: what the near end writes now waits for it, and the near end, which
    // never connected to it, names it.
    c.stop().await;
    a.put("customers/1", json!({"name": "Ada Lovelace"}));
    let own = a.status().unwrap()["writer"].as_str().unwrap().to_owned();
    let held_back_by_c = |node: &TestNode| {
        node.status().is_some_and(|status| {
            status["reclamation"]["origins"]
                .as_array()
                .and_then(|origins| origins.iter().find(|o| o["origin"] == json!(own)))
                .is_some_and(|origin| {
                    origin["held"].as_u64() > origin["stable"].as_u64()
                        && origin["held_back_by"] == json!(["c"])
                })
        })
    };
    eventually(
        "the near end says the far end holds it back",
        REPORTED,
        || held_back_by_c(&a),
    )
    .await;
    assert!(a.metric("concord_log_entries_unstable") >= 1);
    a.stop().await;
    b.stop().await;
}

/// Two nodes truncate the log both hold; a third, new to them, cannot be sent it and is
/// caught up by whole documents, then by the log like any peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_new_to_a_truncated_log_catches_up_by_documents() {
    const REPORTED: Duration = Duration::from_secs(45);
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    for node in [&mut a, &mut b] {
        node.start().await;
    }
    let ids: Vec<String> = (0..300).map(|n| format!("customers/{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        let node = if n % 2 == 0 { &a } else { &b };
        node.put(id, json!({"name": format!("Customer {n}"), "n": n}));
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    converge(&[&a, &b], &ids, CONVERGE).await;
    let truncated = |node: &TestNode| {
        node.status().is_some_and(|status| {
            status["reclamation"]["origins"]
                .as_array()
                .is_some_and(|origins| {
                    origins.len() == 2
                        && origins.iter().all(|o| {
                            o["truncated_through"].as_u64() == o["held"].as_u64().map(|h| h - 1)
                        })
                })
        })
    };
    eventually(
        "both truncated their logs to the last entry",
        REPORTED,
        || truncated(&a) && truncated(&b),
    )
    .await;
    assert!(a.metric("concord_log_entries_truncated_total") >= 149);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[b.listen]);
    c.start().await;
    converge(&[&a, &b, &c], &ids, CONVERGE).await;
    assert_eq!(b.metric("concord_catch_ups_total"), 1);
    // Its marks stand where the others' do: the log goes on from there.
    let marks = |node: &TestNode| {
        let status = node.status().unwrap();
        let mut marks: Vec<(String, u64)> = status["reclamation"]["origins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["origin"].as_str().unwrap().to_owned(),
                    o["held"].as_u64().unwrap(),
                )
            })
            .collect();
        marks.sort();
        marks
    };
    eventually("the new node's marks reach the others'", CONVERGE, || {
        c.status().is_some() && marks(&c) == marks(&a)
    })
    .await;
    a.put("customers/0", json!({"name": "Ada"}));
    c.put("customers/1", json!({"name": "Cy"}));
    converge(&[&a, &b, &c], &["customers/0", "customers/1"], CONVERGE).await;
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await;
    }
}

/// A node that will never return holds back every log entry it has not reported; removed
/// with `concord node remove`, signed by the cluster authority, it holds nothing back and is
/// refused when it comes back after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_node_holds_nothing_back_and_is_refused() {
    const REPORTED: Duration = Duration::from_secs(45);
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    for node in [&mut a, &mut b] {
        node.start().await;
    }
    a.put("customers/1", json!({"name": "Ada"}));
    converge(&[&a, &b], &["customers/1"], CONVERGE).await;
    b.stop().await;
    for n in 2..50 {
        a.put(&format!("customers/{n}"), json!({"n": n}));
    }
    let own = a.status().unwrap()["writer"].as_str().unwrap().to_owned();
    let origin = |node: &TestNode| {
        node.status().and_then(|status| {
            status["reclamation"]["origins"]
                .as_array()?
                .iter()
                .find(|o| o["origin"] == json!(own))
                .cloned()
        })
    };
    eventually("a says b holds its log back", REPORTED, || {
        origin(&a).is_some_and(|o| o["held_back_by"] == json!(["b"]))
    })
    .await;
    let removed = common::ok(common::concord(
        &a.dir,
        &["node", "remove", "b", "--ca", ca.to_str().unwrap()],
    ));
    assert!(removed.contains("removed node"), "{removed}");
    let again = common::concord(
        &a.dir,
        &["node", "remove", "b", "--ca", ca.to_str().unwrap()],
    );
    assert!(!again.status.success(), "removing twice is refused");
    eventually("a truncates what only b held back", REPORTED, || {
        origin(&a).is_some_and(|o| {
            o["held_back_by"] == json!([])
                && o["stable"] == o["held"]
                && o["truncated_through"].as_u64() == o["held"].as_u64().map(|h| h - 1)
        })
    })
    .await;
    let status = a.status().unwrap();
    let known = status["reclamation"]["known_nodes"].as_array().unwrap();
    assert!(
        known
            .iter()
            .any(|n| n["name"] == json!("b") && n["counts"] == json!(false)),
        "{known:?}"
    );
    let grants = common::ok(common::concord(&a.dir, &["grants"]));
    assert!(grants.contains("\"removed\":true"), "{grants}");
    // b comes back after all: a refuses it, and b learns nothing new.
    b.start().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        b.get("customers/49").is_none(),
        "a removed node is sent nothing"
    );
    assert!(a.status().unwrap()["peers"].as_array().unwrap().is_empty());
    a.stop().await;
    b.stop().await;
}

/// Two nodes compact the histories both hold: a record updated thousands of times keeps its
/// values and little more, a deleted one its tombstone, both read alike, and a node new to them
/// is sent them whole. `CONCORD_TEST_UPDATES` sets the updates (20,000 unless it says).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histories_both_nodes_hold_are_compacted_and_reach_a_new_node_whole() {
    const REPORTED: Duration = Duration::from_secs(60);
    const PER_BATCH: usize = 1_000;
    let updates: usize = std::env::var("CONCORD_TEST_UPDATES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(20_000);
    let temp = tempfile::tempdir().unwrap();
    let ca = ca(temp.path(), "ca");
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    for node in [&mut a, &mut b] {
        node.compact_histories(true);
        node.start().await;
    }
    for round in 0..updates.div_ceil(PER_BATCH) {
        let writes = (0..PER_BATCH)
            .map(|n| json!({"id": "customers/hot", "fields": {"stock": round * PER_BATCH + n}}))
            .collect();
        a.batch(writes);
    }
    // a pushes writers back (503) while b lacks many of its changes: b takes them in first.
    let last = json!(updates.div_ceil(PER_BATCH) * PER_BATCH - 1);
    // Applying a long history one change at a time takes a while in a debug build.
    let caught_up = CONVERGE.max(Duration::from_millis(updates as u64));
    eventually("b holds every update", caught_up, || {
        b.get("customers/hot")
            .is_some_and(|hot| hot["stock"] == last)
            && a.status()
                .is_some_and(|status| status["overloaded"].is_null())
    })
    .await;
    b.put("customers/gone", json!({"name": "x".repeat(1_000)}));
    for n in 0..200 {
        b.put("customers/gone", json!({"n": n}));
    }
    b.delete("customers/gone");
    // Written last, so that the others' last changes are below every stable mark.
    a.put("customers/last", json!({"name": "Zed"}));
    b.put("customers/last", json!({"city": "Oslo"}));
    let ids = ["customers/hot", "customers/gone", "customers/last"];
    converge(&[&a, &b], &ids, CONVERGE).await;
    let whole = a.automerge("customers/hot").len();
    let sizes = |node: &TestNode| {
        (
            node.automerge("customers/hot").len(),
            node.automerge("customers/gone").len(),
        )
    };
    let compacted = |node: &TestNode| {
        let (hot, gone) = sizes(node);
        hot < 4_096 && hot * 10 < whole && gone < 1_024
    };
    eventually("both nodes compact what both hold", REPORTED, || {
        compacted(&a) && compacted(&b)
    })
    .await;
    for node in [&a, &b] {
        let (hot, gone) = sizes(node);
        eprintln!(
            "{}: {updates} updates: {whole} bytes of history, {hot} compacted; a deleted \
             record: {gone} bytes",
            node.name
        );
        assert!(node.metric("concord_documents_compacted_total") >= 2);
    }
    assert_eq!(a.get("customers/hot").unwrap()["stock"], last);
    assert_eq!(a.get("customers/gone"), None);
    // A node new to them gets them whole, then goes on with the others.
    let mut c = TestNode::create(temp.path(), "c", &ca, &[b.listen]);
    c.compact_histories(true);
    c.start().await;
    converge(&[&a, &b, &c], &ids, CONVERGE).await;
    c.put("customers/hot", json!({"stock": -1}));
    a.put("customers/gone", json!({"name": "back"}));
    converge(&[&a, &b, &c], &ids, CONVERGE).await;
    assert_eq!(b.get("customers/hot").unwrap()["stock"], json!(-1));
    assert_eq!(c.get("customers/gone").unwrap()["name"], json!("back"));
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await;
    }
}
