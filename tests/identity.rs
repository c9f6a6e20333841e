//! A node's identity and its store over real QUIC: a node whose store was lost comes back
//! under a new writer, takes back what it had written from its peers, and what it writes then
//! reaches every peer; its files are its owner's alone.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::cluster::{eventually, start_mesh, start_mesh_on, TestNode};
use concord::store::Engine;
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
    let [mut a, mut b, mut c]: [TestNode; 3] = start_mesh(temp.path(), &["a", "b", "c"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
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
    // And no peer was ever refused for what it sent; each is connected to both others.
    for node in [&a, &b, &c] {
        let status = node.status().unwrap();
        assert_eq!(status["engine"]["malformed"], json!(0), "{}", node.name);
        eventually(
            &format!("{} connected to both peers", node.name),
            WITHIN,
            || {
                node.status()
                    .is_some_and(|status| status["peers"].as_array().is_some_and(|p| p.len() == 2))
            },
        )
        .await;
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

/// Sum over `nodes` of the connections their engines closed.
fn disconnects(nodes: &[&TestNode]) -> u64 {
    nodes
        .iter()
        .map(|node| {
            node.status().unwrap()["engine"]["disconnects"]
                .as_u64()
                .unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restored_from_a_backup_taken_under_load_gets_back_every_write() {
    use common::{concord_bare, ok};
    let temp = tempfile::tempdir().unwrap();
    let [mut a, mut b, mut c]: [TestNode; 3] = start_mesh(temp.path(), &["a", "b", "c"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    for i in 0..300 {
        a.put(&format!("t/before{i}"), json!({"n": i}));
    }
    // The backup is taken through a's API while a writer keeps writing to it.
    let api = a.api.clone();
    let writing = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut acknowledged = Vec::new();
        let start = std::time::Instant::now();
        for i in 0..2000 {
            let due = start + Duration::from_millis(i);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            let response = agent
                .patch(format!("http://{api}/v1/records/t/during{i}"))
                .send_json(json!({"n": i}))
                .unwrap();
            if response.status().as_u16() == 200 {
                acknowledged.push(i);
            }
        }
        acknowledged
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = temp.path().join("a.backup");
    let report = ok(concord_bare(&[
        "backup",
        a.dir.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ]));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert!(report["records"].as_u64().unwrap() > 300, "{report}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a backup holds the node's records");
    let during = tokio::task::spawn_blocking(move || writing.join().unwrap())
        .await
        .unwrap();
    assert!(during.len() > 1900, "{} of 2000 acknowledged", during.len());
    // More writes after the backup: the restored node lacks them, its peers do not.
    for i in 0..300 {
        a.put(&format!("t/after{i}"), json!({"n": i}));
    }
    eventually("a's writes on b", WITHIN, || {
        b.get("t/after299").is_some() && c.get("t/after299").is_some()
    })
    .await;
    let first_writer = writer_of(&a);
    a.stop().await;
    // Restored over the store it had (kept aside, not deleted), onto the other engine: how a
    // node moves between engines.
    let other = match Engine::DEFAULT {
        Engine::Sled => Engine::Fjall,
        Engine::Fjall => Engine::Sled,
    };
    let report = ok(concord_bare(&[
        "restore",
        file.to_str().unwrap(),
        a.dir.to_str().unwrap(),
        "--replace",
        "--engine",
        other.as_str(),
    ]));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert!(report["replaced"]
        .as_str()
        .unwrap()
        .contains("store.replaced-"));
    assert_eq!(report["engine"], json!(other.as_str()), "{report}");
    let config = std::fs::read_to_string(a.dir.join("concord.toml")).unwrap();
    assert!(
        config.contains(&format!("engine = \"{other}\"")),
        "{config}"
    );
    assert_eq!(Engine::of_store(&a.dir.join("store")), Some(other));
    a.start().await;
    let restored_writer = writer_of(&a);
    assert_ne!(
        first_writer, restored_writer,
        "a restored store writes under a new writer"
    );
    for i in 0..100 {
        a.put(&format!("t/restored{i}"), json!({"n": i}));
    }
    for node in [&a, &b, &c] {
        eventually(&format!("every write on {}", node.name), WITHIN, || {
            (0..300).all(|i| node.get(&format!("t/before{i}")) == Some(json!({"n": i})))
                && during
                    .iter()
                    .all(|i| node.get(&format!("t/during{i}")) == Some(json!({"n": i})))
                && (0..300).all(|i| node.get(&format!("t/after{i}")) == Some(json!({"n": i})))
                && (0..100).all(|i| node.get(&format!("t/restored{i}")) == Some(json!({"n": i})))
        })
        .await;
    }
    assert!(disconnects(&[&a, &b, &c]) < 5);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// The largest file under `path`.
fn largest_file(path: &std::path::Path) -> Option<(u64, std::path::PathBuf)> {
    std::fs::read_dir(path)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                largest_file(&entry.path())
            } else {
                Some((meta.len(), entry.path()))
            }
        })
        .max()
}

/// Every file under `path` whose name starts with `prefix`.
fn files_named(path: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_named(&path, prefix));
        } else if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(path);
        }
    }
    found
}

/// Flips 64 bytes at a fifth, a third and half of the way into the store's largest file (sled's
/// data file; a table or the journal of fjall's), and, if `unreadable`, removes what the engine
/// needs to find its data (sled's snapshots of its page table, which it must then rebuild from
/// the damaged file, and cannot; fjall's version files): then it opens nothing.
fn damage(dir: &std::path::Path, engine: Engine, unreadable: bool) {
    let store = dir.join("store");
    if unreadable {
        let needed = match engine {
            Engine::Sled => "snap.",
            Engine::Fjall => "current",
        };
        for path in files_named(&store, needed) {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (_, largest) = largest_file(&store).unwrap();
    let mut bytes = std::fs::read(&largest).unwrap();
    let used = bytes.iter().rposition(|byte| *byte != 0).unwrap();
    let length = bytes.len();
    for at in [used / 5, used / 3, used / 2] {
        for byte in &mut bytes[at..(at + 64).min(length)] {
            *byte ^= 0x5a;
        }
    }
    std::fs::write(&largest, &bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_store_is_recovered_and_its_peers_send_the_rest_on_sled() {
    a_damaged_store_is_recovered_and_its_peers_send_the_rest(Engine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_store_is_recovered_and_its_peers_send_the_rest_on_fjall() {
    a_damaged_store_is_recovered_and_its_peers_send_the_rest(Engine::Fjall).await;
}

async fn a_damaged_store_is_recovered_and_its_peers_send_the_rest(engine: Engine) {
    use common::{concord_bare, ok};
    let temp = tempfile::tempdir().unwrap();
    let [mut a, mut b]: [TestNode; 2] = start_mesh_on(temp.path(), &["a", "b"], Some(engine))
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    const RECORDS: usize = 3000;
    for i in 0..RECORDS {
        a.put(&format!("t/r{i}"), json!({"n": i, "pad": "x".repeat(200)}));
    }
    eventually("a's writes on b", WITHIN, || {
        b.get(&format!("t/r{}", RECORDS - 1)).is_some()
    })
    .await;
    // Twice: a damaged page sled reads only when asked for it, so that most of the store is
    // salvaged; then a damaged file sled cannot open at all, so that peers send everything.
    for (round, without_snapshot) in [false, true].into_iter().enumerate() {
        a.stop().await;
        // Opened and closed once more, as after a restart: sled keeps a snapshot of its page
        // table then.
        a.start().await;
        a.stop().await;
        damage(&a.dir, engine, without_snapshot);
        // Where the damage falls decides whether sled notices it when the store opens; when
        // it does, the node says what to run.
        match concord::node::Node::open(&a.dir) {
            Err(error) => {
                let error = error.to_string();
                assert!(error.contains("concord recover"), "{error}");
            }
            Ok(_) => eprintln!("round {round}: the damage fell where opening reads nothing"),
        }
        let report = ok(concord_bare(&["recover", a.dir.to_str().unwrap()]));
        let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
        assert!(
            report["damaged"]
                .as_str()
                .unwrap()
                .contains("store.damaged-"),
            "{report}"
        );
        // What was salvaged depends on where the damage fell (sled may refuse the whole file,
        // or give up reading a key space partway); whatever it was, the rest comes from peers.
        eprintln!("round {round}: {report}");
        assert!(
            report["checked"]["documents"].as_u64().is_some(),
            "{report}"
        );
        a.start().await;
        for i in 0..50 {
            a.put(&format!("t/new{round}-{i}"), json!({"n": i}));
        }
        for node in [&a, &b] {
            eventually(&format!("every record on {}", node.name), WITHIN, || {
                (0..RECORDS).all(|i| {
                    node.get(&format!("t/r{i}"))
                        .is_some_and(|r| r["n"] == json!(i))
                }) && (0..50)
                    .all(|i| node.get(&format!("t/new{round}-{i}")) == Some(json!({"n": i})))
            })
            .await;
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copied_data_dir_writing_under_the_same_writer_is_contained() {
    use common::{concord, ok};
    let temp = tempfile::tempdir().unwrap();
    let [mut site1, mut x, mut y]: [TestNode; 3] = start_mesh(temp.path(), &["site1", "x", "y"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    site1.put("customers/1", json!({"credit": 1, "name": "Ada"}));
    eventually("customers/1 everywhere", WITHIN, || {
        x.get("customers/1").is_some() && y.get("customers/1").is_some()
    })
    .await;
    site1.stop().await;
    // A copy of site1's whole data dir writes the record under site1's writer, offline, and
    // its export is merged into x while site1 is down.
    let copy = temp.path().join("copy");
    let status = std::process::Command::new("cp")
        .args(["-a", site1.dir.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    ok(concord(&copy, &["put", "customers/1", "credit=0"]));
    let forged = temp.path().join("forged.am");
    ok(concord(
        &copy,
        &["export", "customers/1", "-o", forged.to_str().unwrap()],
    ));
    ok(concord(
        &x.dir,
        &["import", "customers/1", forged.to_str().unwrap()],
    ));
    // site1, still down, writes the same record: the same actor and sequence.
    ok(concord(&site1.dir, &["put", "customers/1", "credit=42"]));
    site1.start().await;
    let nodes = [&site1, &x, &y];
    // Every node agrees, and site1's write, lost to the earlier forged one, is written again
    // under a new writer.
    eventually("all agree on customers/1", WITHIN, || {
        let values: Vec<_> = nodes.iter().map(|node| node.get("customers/1")).collect();
        values.iter().all(|value| *value == values[0])
            && values[0]
                .as_ref()
                .is_some_and(|value| value["credit"] == json!(42))
    })
    .await;
    let refused: u64 = nodes
        .iter()
        .map(|node| node.metric("concord_changes_refused_total{reason=\"duplicate_sequence\"}"))
        .sum();
    assert!(
        refused >= 1,
        "the colliding change is refused and counted: {:?}",
        nodes
            .iter()
            .map(|node| node.status().unwrap()["engine"].clone())
            .collect::<Vec<_>>()
    );
    // Whichever node met the collision lists the refused change.
    let listed: Vec<String> = nodes
        .iter()
        .map(|node| ok(concord(&node.dir, &["refused"])))
        .collect();
    assert!(
        listed
            .iter()
            .any(|list| list.contains("duplicate_sequence")),
        "{listed:?}"
    );
    assert!(disconnects(&nodes) < 5);
    assert!(site1.status().unwrap()["new_writer_reason"].is_string());
    site1.stop().await;
    x.stop().await;
    y.stop().await;
}
