//! Two `concord run` processes, started from the CLI as a user would, converge; the record
//! commands reach a running node through its API; SIGTERM stops a node cleanly and SIGKILL
//! loses nothing it acknowledged.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::free_port;
use common::{concord, concord_bare, ok, stderr};

fn spawn_node(data: &std::path::Path) -> Child {
    Command::new(common::concord_binary())
        .args(["--data", data.to_str().unwrap(), "run"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn terminate(child: &mut Child) -> Option<i32> {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_cli_nodes_converge_and_stop_cleanly() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    ok(concord_bare(&["ca", "init", ca.to_str().unwrap()]));
    let (listen_a, listen_b) = (free_port(), free_port());
    let (api_a, api_b) = (free_port(), free_port());
    let a = temp.path().join("a");
    let b = temp.path().join("b");
    ok(concord_bare(&[
        "init",
        a.to_str().unwrap(),
        "--name",
        "a",
        "--ca",
        ca.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{listen_a}"),
        "--api",
        &format!("127.0.0.1:{api_a}"),
        "--peer",
        &format!("127.0.0.1:{listen_b}"),
    ]));
    ok(concord_bare(&[
        "init",
        b.to_str().unwrap(),
        "--name",
        "b",
        "--ca",
        ca.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{listen_b}"),
        "--api",
        &format!("127.0.0.1:{api_b}"),
        "--peer",
        &format!("127.0.0.1:{listen_a}"),
    ]));
    let mut node_a = spawn_node(&a);
    let mut node_b = spawn_node(&b);
    wait_until("both nodes serve", || {
        concord(&a, &["status"]).status.success() && concord(&b, &["status"]).status.success()
    });

    // Record commands go through the API of the running node.
    ok(concord(&a, &["put", "customers/1", "name=Ada"]));
    ok(concord(
        &b,
        &["put", "customers/1", "email=ada@example.com"],
    ));
    ok(concord(&b, &["put", "customers/2", "name=Grace"]));
    wait_until("both writes reach both nodes", || {
        let on_a = concord(&a, &["get", "customers/1"]);
        let on_b = concord(&b, &["get", "customers/1"]);
        on_a.status.success()
            && on_a.stdout == on_b.stdout
            && String::from_utf8_lossy(&on_a.stdout).contains("email")
    });
    assert!(ok(concord(&a, &["list", "customers"])).contains("Grace"));
    let status = ok(concord(&a, &["status"]));
    assert!(status.contains("ready"), "{status}");
    let missing = concord(&a, &["get", "customers/nope"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));

    // Export, import and bulk load work through the API as well.
    let file = temp.path().join("c1.automerge");
    ok(concord(
        &a,
        &["export", "customers/1", "-o", file.to_str().unwrap()],
    ));
    let bytes = std::fs::read(&file).unwrap();
    assert!(automerge::Automerge::load(&bytes).is_ok());
    assert!(
        ok(concord(&b, &["import", "copies/1", file.to_str().unwrap()])).contains("new changes")
    );
    let lines = temp.path().join("people.jsonl");
    std::fs::write(
        &lines,
        "{\"id\": 1, \"name\": \"Ada\"}\n{\"id\": 2, \"name\": \"Grace\"}\n",
    )
    .unwrap();
    let acked = ok(concord(
        &a,
        &["load", "people", lines.to_str().unwrap(), "--ack"],
    ));
    assert_eq!(acked.lines().count(), 2);
    wait_until("imported and loaded records replicate", || {
        concord(&a, &["get", "copies/1"]).status.success()
            && concord(&b, &["get", "people/2"]).status.success()
    });

    // SIGKILL b, write on a meanwhile, restart b: it catches up and lost nothing.
    node_b.kill().unwrap();
    node_b.wait().unwrap();
    ok(concord(&a, &["put", "customers/3", "name=Barbara"]));
    let mut node_b = spawn_node(&b);
    wait_until("b catches up after SIGKILL", || {
        concord(&b, &["get", "customers/3"]).status.success()
    });
    assert!(ok(concord(&b, &["get", "customers/2"])).contains("Grace"));

    // SIGTERM: a clean stop, exit code 0; the data is there when the node is stopped.
    assert_eq!(terminate(&mut node_a), Some(0));
    assert_eq!(terminate(&mut node_b), Some(0));
    assert!(ok(concord(&a, &["get", "customers/2"])).contains("Grace"));
    assert!(ok(concord(&b, &["get", "customers/1"])).contains("ada@example.com"));
}
