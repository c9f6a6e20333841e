//! A node's identity and its store over real QUIC: a node whose store was lost comes back
//! under a new writer, takes back what it had written from its peers, and what it writes then
//! reaches every peer; its files are its owner's alone.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::cluster::{eventually, TestNode};
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(30);

fn writer_of(node: &TestNode) -> String {
    node.status().unwrap()["writer"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_store_was_lost_gets_its_writes_back_and_its_new_writes_replicate() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    let mut c = TestNode::create(temp.path(), "c", &ca, &[a.listen, b.listen]);
    a.start().await;
    b.start().await;
    c.start().await;
    const BEFORE: usize = 200;
    for i in 0..BEFORE {
        a.put(&format!("t/a{i}"), json!({"n": i}));
    }
    for i in 0..50 {
        b.put(&format!("t/b{i}"), json!({"n": i}));
    }
    eventually("a's writes on b and c", WITHIN, || {
        b.get(&format!("t/a{}", BEFORE - 1)).is_some()
            && c.get(&format!("t/a{}", BEFORE - 1)).is_some()
    })
    .await;
    let first_writer = writer_of(&a);

    // The disk under a's store dies; b writes on meanwhile.
    a.stop().await;
    std::fs::remove_dir_all(a.dir.join("store")).unwrap();
    for i in 50..70 {
        b.put(&format!("t/b{i}"), json!({"n": i}));
    }
    // a comes back empty and takes writes at once, before it has heard from anyone: they
    // must not reuse a single actor and sequence of its lost self.
    a.start().await;
    let second_writer = writer_of(&a);
    assert_ne!(
        first_writer, second_writer,
        "a new store writes under a new writer"
    );
    const AFTER: usize = 200;
    for i in 0..AFTER {
        a.put(&format!("t/new{i}"), json!({"n": i}));
    }
    // Everything acknowledged, before and after, ends on every node.
    for node in [&a, &b, &c] {
        eventually(&format!("every write on {}", node.name), WITHIN, || {
            (0..BEFORE).all(|i| node.get(&format!("t/a{i}")) == Some(json!({"n": i})))
                && (0..70).all(|i| node.get(&format!("t/b{i}")) == Some(json!({"n": i})))
                && (0..AFTER).all(|i| node.get(&format!("t/new{i}")) == Some(json!({"n": i})))
        })
        .await;
    }
    // And no peer was ever refused for what it sent.
    for node in [&a, &b, &c] {
        let status = node.status().unwrap();
        assert_eq!(status["engine"]["malformed"], json!(0), "{}", node.name);
        assert_eq!(
            status["peers"].as_array().unwrap().len(),
            2,
            "{}",
            node.name
        );
    }
    // The registry names both writers as a's: history on b says a wrote both records.
    let a_id = std::fs::read_to_string(a.dir.join("node.id")).unwrap();
    for (id, writer) in [("t/a0", &first_writer), ("t/new0", &second_writer)] {
        let history = b.history(id);
        assert_eq!(
            history[0]["node"].as_str(),
            Some(a_id.trim()),
            "{history:?}"
        );
        assert_eq!(history[0]["node_name"], json!("a"), "{history:?}");
        assert!(history[0]["actor"]
            .as_str()
            .unwrap()
            .starts_with(writer.as_str()));
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[test]
fn a_data_dir_is_its_owners_alone() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let dir = temp.path().join("node");
    concord::node::Node::init_with(
        &dir,
        &concord::node::InitOptions {
            ca: Some(ca.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&ca), 0o700);
    for entry in walk(&dir) {
        let expected = if entry.is_dir() { 0o700 } else { 0o600 };
        let public = ["ca.pem", "node.pem"]
            .iter()
            .any(|name| entry.ends_with(name));
        if !public {
            assert_eq!(mode(&entry), expected, "{}", entry.display());
        }
    }
    // A data dir that others may write is refused, with what to do about it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let error = concord::node::Node::open(&dir).err().unwrap().to_string();
    assert!(error.contains("chmod 700"), "{error}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    concord::node::Node::open(&dir).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
        found.push(path);
    }
    found
}
