//! Crash test: a child process writes records in a loop and is killed with SIGKILL at random
//! moments, many times. Every write it acknowledged must be there after reopening, and the
//! store must always open.
//!
//! The child is `concord load --ack`, which prints a record's id only after the batch holding
//! it was flushed. Keys repeat, so later rounds update records, compact them and re-create
//! them, all under fire. Set `CONCORD_CRASH_SEED` to replay a run, `CONCORD_CRASH_ROUNDS`
//! for more rounds.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{concord_binary, init_node_on};
use concord::node::Node;
use concord::record::RecordId;
use concord::rng::SplitMix64;
use serde_json::json;

const KEYS: u64 = 300;

#[test]
fn acknowledged_writes_survive_sigkill_on_sled() {
    acknowledged_writes_survive_sigkill("sled");
}

#[test]
fn acknowledged_writes_survive_sigkill_on_fjall() {
    acknowledged_writes_survive_sigkill("fjall");
}

fn acknowledged_writes_survive_sigkill(engine: &str) {
    let seed = std::env::var("CONCORD_CRASH_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: u64 = std::env::var("CONCORD_CRASH_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(30);
    eprintln!(
        "crash test on {engine}: seed {seed} ({rounds} rounds); replay with \
         CONCORD_CRASH_SEED={seed}"
    );
    // A seed replays the same delays and batch sizes.
    let mut random = SplitMix64::new(seed);
    let temp = tempfile::tempdir().unwrap();
    let data = init_node_on(temp.path(), "crashy", engine);
    assert!(std::fs::read_to_string(data.join("concord.toml"))
        .unwrap()
        .contains(&format!("engine = \"{engine}\"")));

    // The highest write number acknowledged per key, over all rounds.
    let mut acknowledged: HashMap<u64, u64> = HashMap::new();
    let mut next_write = 0u64;
    let mut total_acknowledged = 0usize;
    for round in 0..rounds {
        let batch = 1 + random.below(64);
        let delay = Duration::from_millis(20 + random.below(400));
        let mut child = Command::new(concord_binary())
            .args([
                "--data",
                data.to_str().unwrap(),
                "load",
                "items",
                "--ack",
                "--batch",
            ])
            .arg(batch.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();

        let start = next_write;
        let stop = Arc::new(AtomicBool::new(false));
        let mut stdin = child.stdin.take().unwrap();
        let writer_stop = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut n = start;
            while !writer_stop.load(Ordering::Relaxed) {
                let key = n % KEYS;
                let line = json!({"id": format!("k{key}"), "n": n, "round": round, "pad": "x".repeat((n % 50) as usize)});
                if writeln!(stdin, "{line}").is_err() {
                    break;
                }
                n += 1;
            }
            n
        });
        let acks = Arc::new(Mutex::new(Vec::new()));
        let reader_acks = acks.clone();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                reader_acks.lock().unwrap().push(line);
            }
        });

        std::thread::sleep(delay);
        // SIGKILL: no chance to flush or clean up.
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        next_write = writer.join().unwrap();
        reader.join().unwrap();

        // Acks come in write order; the i-th ack is write number start + i.
        let acks = acks.lock().unwrap();
        for (offset, line) in acks.iter().enumerate() {
            let n = start + offset as u64;
            assert_eq!(
                line,
                &format!("items/k{}", n % KEYS),
                "acks arrive in write order"
            );
            acknowledged.insert(n % KEYS, n);
        }
        total_acknowledged += acks.len();

        // The store opens, and every acknowledged write is there (or a later write of the key).
        let node = Node::open(&data).unwrap_or_else(|error| {
            panic!("seed {seed} round {round}: store does not open: {error}")
        });
        for (key, n) in &acknowledged {
            let id = RecordId::parse(&format!("items/k{key}")).unwrap();
            let fields = node.get(&id).unwrap().unwrap_or_else(|| {
                panic!("seed {seed} round {round}: acknowledged items/k{key} (write {n}) is lost")
            });
            let stored = fields["n"].as_u64().unwrap();
            assert!(stored >= *n, "seed {seed} round {round}: items/k{key} holds write {stored}, older than acknowledged {n}");
            assert_eq!(stored % KEYS, *key, "a value written for another key");
        }
    }
    eprintln!("crash test: {rounds} kills, {total_acknowledged} acknowledged writes, all present");
    assert!(
        total_acknowledged > 0,
        "the child acknowledged nothing in {rounds} rounds"
    );
}
