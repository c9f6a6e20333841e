//! Two `concord run` processes, started from the CLI as a user would, converge; the record
//! commands reach a running node through its API; SIGTERM stops a node cleanly and SIGKILL
//! loses nothing it acknowledged.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::free_port;
use common::{concord, concord_bare, ok, stderr};

/// Starts `concord run` on `data`, its log appended to `data/run.log`.
fn spawn_node(data: &std::path::Path) -> Child {
    spawn_node_with(data, &[])
}

fn spawn_node_with(data: &std::path::Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("run.log"))
        .unwrap();
    Command::new(common::concord_binary())
        .args(["--data", data.to_str().unwrap(), "run"])
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn run_log(data: &std::path::Path) -> String {
    std::fs::read_to_string(data.join("run.log")).unwrap_or_default()
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

    // Writes over the change limit are refused through the API as on a stopped node.
    let limit = concord::record::document::CHANGE_BYTES_MAX.to_string();
    let big = temp.path().join("big.txt");
    std::fs::write(&big, "b".repeat(5_000_000)).unwrap();
    let refused = concord(
        &a,
        &[
            "put",
            "t/big",
            "--value-file",
            &format!("blob={}", big.display()),
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains(&limit), "{}", stderr(&refused));
    assert_eq!(stderr(&refused).lines().count(), 1, "{}", stderr(&refused));
    let document = {
        use automerge::transaction::Transactable;
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "blob", "d".repeat(5_000_000))
            .unwrap();
        tx.commit();
        doc.save()
    };
    let file = temp.path().join("big.automerge");
    std::fs::write(&file, document).unwrap();
    let refused = concord(&a, &["import", "t/big", file.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains(&limit), "{}", stderr(&refused));
    assert_eq!(concord(&a, &["get", "t/big"]).status.code(), Some(2));

    // SIGTERM: a clean stop, exit code 0, no panic; the data is there when the node is
    // stopped.
    assert_eq!(terminate(&mut node_a), Some(0));
    assert_eq!(terminate(&mut node_b), Some(0));
    for data in [&a, &b] {
        let log = run_log(data);
        assert!(!log.contains("panicked"), "{log}");
        assert!(
            log.contains("stopped; every acknowledged write is durable"),
            "{log}"
        );
    }
    assert!(ok(concord(&a, &["get", "customers/2"])).contains("Grace"));
    assert!(ok(concord(&b, &["get", "customers/1"])).contains("ada@example.com"));
}

#[test]
fn a_node_whose_engine_dies_stops_rather_than_take_writes_it_cannot_replicate() {
    if !cfg!(feature = "sabotage") {
        eprintln!(
            "SKIPPED: this test needs the `sabotage` feature (cargo test --workspace has it)"
        );
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    ok(concord_bare(&["ca", "init", ca.to_str().unwrap()]));
    let data = temp.path().join("n");
    ok(concord_bare(&[
        "init",
        data.to_str().unwrap(),
        "--name",
        "n",
        "--ca",
        ca.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--api",
        &format!("127.0.0.1:{}", free_port()),
    ]));
    let mut node = spawn_node_with(&data, &[("CONCORD_SABOTAGE_ENGINE_PANIC", "1")]);
    wait_until("the node serves", || {
        concord(&data, &["status"]).status.success()
    });
    // Acknowledged (durable), then the engine dies handling it: the node exits, saying why.
    ok(concord(&data, &["put", "c/1", "name=Ada"]));
    let start = Instant::now();
    let code = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the node went on without its engine"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(1));
    let log = run_log(&data);
    assert!(
        log.contains("the replication engine stopped unexpectedly"),
        "{log}"
    );
    // What it acknowledged is there; started again normally, it serves it.
    let mut node = spawn_node(&data);
    wait_until("the node serves again", || {
        concord(&data, &["status"]).status.success()
    });
    assert!(ok(concord(&data, &["get", "c/1"])).contains("Ada"));
    assert_eq!(terminate(&mut node), Some(0));
}

#[test]
fn a_node_joins_its_cluster_later_says_when_it_runs_and_names_what_it_cannot_reach() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    ok(concord_bare(&["ca", "init", ca.to_str().unwrap()]));
    let a = temp.path().join("a");
    let listen = format!("127.0.0.1:{}", free_port());
    let nowhere = format!("127.0.0.1:{}", free_port());
    ok(concord_bare(&[
        "init",
        a.to_str().unwrap(),
        "--name",
        "a",
        "--listen",
        &listen,
        "--api",
        &format!("127.0.0.1:{}", free_port()),
        "--peer",
        &nowhere,
    ]));
    ok(concord(&a, &["put", "t/1", "n=1"]));
    // Made without --ca: run says what to do, and doing it works, keeping id and records.
    let refused = concord(&a, &["run"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("--ca"), "{}", stderr(&refused));
    let id = std::fs::read_to_string(a.join("node.id")).unwrap();
    ok(concord_bare(&[
        "init",
        a.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read_to_string(a.join("node.id")).unwrap(), id);
    // Once joined, init refuses as before.
    let again = concord_bare(&["init", a.to_str().unwrap(), "--ca", ca.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already"), "{}", stderr(&again));

    // Without RUST_LOG, run says that it runs and where.
    let log = std::fs::File::create(a.join("run.log")).unwrap();
    let mut node = Command::new(common::concord_binary())
        .args(["--data", a.to_str().unwrap(), "run"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until("the node serves", || {
        concord(&a, &["status"]).status.success()
    });
    assert!(
        run_log(&a).contains(&format!("running: peers connect to {listen}")),
        "{}",
        run_log(&a)
    );
    assert!(ok(concord(&a, &["get", "t/1"])).contains('1'));
    // Status names the configured peer it cannot reach.
    wait_until("status names the unreachable peer", || {
        let status = ok(concord(&a, &["status"]));
        status.contains("0 connected, 1 unreachable") && status.contains(&nowhere)
    });

    // A second node on the same listen address: one line, naming the listener, said once.
    let b = temp.path().join("b");
    ok(concord_bare(&[
        "init",
        b.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
        "--listen",
        &listen,
        "--api",
        &format!("127.0.0.1:{}", free_port()),
    ]));
    let taken = concord(&b, &["run"]);
    assert_eq!(taken.status.code(), Some(1));
    let said = stderr(&taken);
    let error: Vec<&str> = said
        .lines()
        .filter(|line| line.starts_with("error"))
        .collect();
    assert_eq!(error.len(), 1, "{said}");
    assert!(
        error[0].contains("network.listen") && error[0].contains(&listen),
        "{said}"
    );
    let reason = "in use";
    assert_eq!(error[0].matches(reason).count(), 1, "{said}");

    // export writes to stdout with "-" or with no file.
    for args in [&["export", "t/1", "-"][..], &["export", "t/1"][..]] {
        let output = concord(&a, args);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(automerge::Automerge::load(&output.stdout).is_ok());
    }

    assert_eq!(terminate(&mut node), Some(0));
    assert!(run_log(&a).contains("node a stopped"), "{}", run_log(&a));
}
