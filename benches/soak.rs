//! Sustained load on three real nodes: `concord run` processes of the release binary, over
//! QUIC with mutual TLS on loopback, each with a small page cache (`page_cache_mib = 8`, far
//! smaller than the data), taking writes through the HTTP API from writers on all three: 70%
//! new records, 30% patches of 2,000 shared ones. A monitor polls every node's `/v1/status`
//! every 5 s (lag, RSS, writes refused). When the writers stop, the nodes must converge:
//! every acknowledged record on every node, and the nodes' lists identical.
//!
//! `cargo bench --bench soak -- --rate 500 --seconds 300` runs one load (the scenario;
//! `--new-percent P` changes the share of new records, 0 for patches of shared ones only);
//! `cargo bench --bench soak -- --capacity [--step-seconds 60]` raises the rate step by step
//! and prints the highest rate at which lag stays bounded (the baseline it is measured beside
//! is the first step's, in the same run); a long run at 80% of it shows whether RSS and lag
//! stay flat: `cargo bench --bench soak -- --rate R --seconds 1800`.
//! `cargo bench --bench soak -- --backup [--fill-seconds 120] [--rate 1000]` fills the
//! cluster, then takes `concord backup` of one node while writers go on at `--rate`, printing
//! the time, the file's size and the memory of the node (against its own before the backup)
//! and of the backup process; then stops that node, restores the backup over its store,
//! starts it, and waits until every acknowledged record is on every node again.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::flag;
use serde_json::{json, Value};

/// Writer threads per node: enough that the API, not the writers, limits the rate.
const WRITERS_PER_NODE: usize = 8;
/// Shared records that the writes that do not create a record patch.
const SHARED_RECORDS: usize = 2_000;
/// Percent of writes that create a new record.
const NEW_PERCENT_DEFAULT: u64 = 70;
/// How often the monitor polls each node.
const MONITOR_INTERVAL: Duration = Duration::from_secs(5);
/// How long the nodes may take to converge once the writers stop.
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);
/// Rates tried by `--capacity`, writes per second over the three nodes.
const CAPACITY_RATES: [usize; 8] = [250, 500, 1000, 1500, 2000, 3000, 4000, 6000];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let temp = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(temp.path());
    let mut cluster = cluster;
    if args.iter().any(|arg| arg == "--capacity") {
        let step = flag(&args, "--step-seconds", 60);
        capacity(&cluster, step);
    } else if args.iter().any(|arg| arg == "--backup") {
        let fill = flag(&args, "--fill-seconds", 120);
        let rate = flag(&args, "--rate", 1000);
        backup(&mut cluster, temp.path(), fill, rate);
    } else {
        let rate = flag(&args, "--rate", 500);
        let seconds = flag(&args, "--seconds", 300);
        let new_percent = flag(&args, "--new-percent", NEW_PERCENT_DEFAULT as usize) as u64;
        println!(
            "soak: 3 nodes, page cache 8 MiB, {rate} writes/s for {seconds} s, {new_percent}% new records"
        );
        let outcome = load(
            &cluster,
            rate,
            Duration::from_secs(seconds as u64),
            0,
            new_percent,
            true,
        );
        outcome.print(rate);
        let took = cluster.converge(&outcome);
        println!(
            "converged {:.1} s after the writers stopped (no lag anywhere); then checked: all {} acknowledged new records on every node, lists identical",
            took.as_secs_f64(),
            outcome.created.len()
        );
    }
    cluster.stop();
}

struct Node {
    dir: PathBuf,
    api: String,
    child: Child,
}

struct Cluster {
    nodes: Vec<Node>,
}

fn concord(args: &[&str]) -> String {
    String::from_utf8_lossy(&common::concord(args).stdout).into_owned()
}

/// `concord run` on `dir`, its log in `dir/run.log`.
fn spawn_node(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("run.log"))
        .expect("log");
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["--data", dir.to_str().expect("utf-8"), "run"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("concord run")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

impl Cluster {
    fn start(parent: &Path) -> Self {
        let ca = parent.join("ca");
        concord(&["ca", "init", ca.to_str().expect("utf-8")]);
        let port = || concord::net::free_loopback_port().expect("a free port");
        let listens: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", port())).collect();
        let mut nodes = Vec::new();
        for (index, listen) in listens.iter().enumerate() {
            let dir = parent.join(format!("n{index}"));
            let api = format!("127.0.0.1:{}", port());
            let mut args = vec![
                "init".to_owned(),
                dir.to_str().expect("utf-8").to_owned(),
                "--name".to_owned(),
                format!("n{index}"),
                "--ca".to_owned(),
                ca.to_str().expect("utf-8").to_owned(),
                "--listen".to_owned(),
                listen.clone(),
                "--api".to_owned(),
                api.clone(),
            ];
            for peer in &listens[..index] {
                args.push("--peer".to_owned());
                args.push(peer.clone());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            concord(&args);
            let path = dir.join("concord.toml");
            let mut config = concord::config::Config::load(&path).expect("config");
            config.store.page_cache_mib = 8;
            std::fs::write(&path, config.to_toml()).expect("config written");
            let child = spawn_node(&dir);
            nodes.push(Node { dir, api, child });
        }
        let cluster = Self { nodes };
        cluster.await_mesh();
        cluster
    }

    fn await_mesh(&self) {
        let start = Instant::now();
        while !self.nodes.iter().all(|node| {
            node.status()
                .is_some_and(|status| status["peers"].as_array().is_some_and(|p| p.len() == 2))
        }) {
            assert!(start.elapsed() < Duration::from_secs(30), "no full mesh");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) {
        for node in &mut self.nodes {
            let _ = Command::new("kill")
                .args(["-TERM", &node.child.id().to_string()])
                .status();
        }
        for node in &mut self.nodes {
            let status = node.child.wait().expect("wait");
            let log = std::fs::read_to_string(node.dir.join("run.log")).unwrap_or_default();
            assert!(
                status.success() && !log.contains("panicked"),
                "{} stopped badly: {log}",
                node.dir.display()
            );
        }
    }

    /// Waits until no node's status shows any lag toward any peer, then checks that every
    /// acknowledged new record is on every node and that the nodes list the same records
    /// with the same fields (waiting on while not). Returns when the lag reached nothing.
    fn converge(&self, outcome: &Outcome) -> Duration {
        let start = Instant::now();
        let mut quiet_at = None;
        loop {
            let quiet = self.nodes.iter().all(|node| {
                node.status().is_some_and(|status| {
                    status["peers"].as_array().is_some_and(|peers| {
                        peers.len() == 2 && peers.iter().all(|peer| peer["lag"] == json!(0))
                    })
                })
            });
            if quiet {
                let at = *quiet_at.get_or_insert(start.elapsed());
                if self.lists_agree(outcome) {
                    return at;
                }
            } else {
                quiet_at = None;
            }
            if start.elapsed() > CONVERGE_WITHIN {
                let missing = self.missing(outcome);
                panic!(
                    "no convergence within {CONVERGE_WITHIN:?}: acknowledged records missing per node {missing:?}; lag {:?}",
                    self.nodes.iter().map(Node::lag).collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn lists(&self) -> Vec<BTreeMap<String, Value>> {
        self.nodes
            .iter()
            .map(|node| {
                let mut all = node.list("soak");
                all.extend(node.list("shared"));
                all
            })
            .collect()
    }

    fn lists_agree(&self, outcome: &Outcome) -> bool {
        let lists = self.lists();
        let complete = lists.iter().all(|list| {
            outcome
                .created
                .iter()
                .all(|key| list.contains_key(&format!("soak/{key}")))
        });
        complete && lists.windows(2).all(|pair| pair[0] == pair[1])
    }

    fn missing(&self, outcome: &Outcome) -> Vec<usize> {
        self.lists()
            .iter()
            .map(|list| {
                outcome
                    .created
                    .iter()
                    .filter(|key| !list.contains_key(&format!("soak/{key}")))
                    .count()
            })
            .collect()
    }
}

impl Node {
    fn status(&self) -> Option<Value> {
        agent()
            .get(format!("http://{}/v1/status", self.api))
            .call()
            .ok()?
            .body_mut()
            .read_json()
            .ok()
    }

    /// Log entries this node holds that its peers' summaries do not cover, over its peers.
    fn lag(&self) -> u64 {
        self.status()
            .and_then(|status| {
                Some(
                    status["peers"]
                        .as_array()?
                        .iter()
                        .filter_map(|peer| peer["lag"].as_u64())
                        .sum(),
                )
            })
            .unwrap_or(0)
    }

    fn rss_mib(&self) -> f64 {
        common::memory_mib(&self.child.id().to_string(), "VmRSS")
    }

    /// Every live record of a collection: `COLLECTION/KEY` to its fields.
    fn list(&self, collection: &str) -> BTreeMap<String, Value> {
        let mut records = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("http://{}/v1/records/{collection}?limit=10000", self.api);
            if let Some(after) = &after {
                url.push_str(&format!("&after={after}"));
            }
            let page: Value = agent()
                .get(&url)
                .call()
                .expect("list")
                .body_mut()
                .read_json()
                .expect("json");
            for record in page["records"].as_array().into_iter().flatten() {
                let key = record["key"].as_str().unwrap_or_default();
                records.insert(format!("{collection}/{key}"), record["fields"].clone());
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return records,
            }
        }
    }
}

/// What one load did.
struct Outcome {
    offered: u64,
    accepted: u64,
    refused: u64,
    failed: u64,
    /// Keys of the new records acknowledged (in collection `soak`).
    created: Vec<String>,
    /// (seconds since the start, lag summed over nodes, RSS per node in MiB).
    samples: Vec<(u64, u64, Vec<f64>)>,
    seconds: f64,
}

impl Outcome {
    fn print(&self, rate: usize) {
        println!(
            "offered {} writes ({rate}/s), acknowledged {} ({:.0}/s), refused with 503: {}, failed: {}",
            self.offered,
            self.accepted,
            self.accepted as f64 / self.seconds,
            self.refused,
            self.failed
        );
        println!("| time | lag (entries, all nodes) | RSS per node (MiB) |");
        println!("|---|---|---|");
        for (at, lag, rss) in &self.samples {
            let rss: Vec<String> = rss.iter().map(|mib| format!("{mib:.0}")).collect();
            println!("| {at} s | {lag} | {} |", rss.join(" / "));
        }
    }

    /// Lag in the last third of the run, against the first two thirds: bounded if it does
    /// not grow past them by more than a few seconds of writes.
    fn lag_bounded(&self, rate: usize) -> bool {
        let cut = self.samples.len() * 2 / 3;
        let early = self.samples[..cut]
            .iter()
            .map(|(_, lag, _)| *lag)
            .max()
            .unwrap_or(0);
        let late = self.samples[cut..]
            .iter()
            .map(|(_, lag, _)| *lag)
            .max()
            .unwrap_or(0);
        late <= early.max(rate as u64) * 2
    }
}

/// Writes at `rate` per second over the three nodes for `duration`, `new_percent` of them new
/// records (numbered from `first`), the rest patches of shared ones; the monitor prints as it
/// polls when `verbose`.
fn load(
    cluster: &Cluster,
    rate: usize,
    duration: Duration,
    first: u64,
    new_percent: u64,
    verbose: bool,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let offered = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let created = Arc::new(Mutex::new(Vec::new()));
    let writers = cluster.nodes.len() * WRITERS_PER_NODE;
    let per_writer = rate as f64 / writers as f64;
    let start = Instant::now();
    let mut handles = Vec::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        for thread in 0..WRITERS_PER_NODE {
            let api = node.api.clone();
            let (stop, offered, accepted, refused, failed, created) = (
                stop.clone(),
                offered.clone(),
                accepted.clone(),
                refused.clone(),
                failed.clone(),
                created.clone(),
            );
            handles.push(std::thread::spawn(move || {
                let agent = agent();
                let interval = Duration::from_secs_f64(1.0 / per_writer);
                let mut state = (index * WRITERS_PER_NODE + thread) as u64 * 0x9E37_79B9 + first;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = start + interval.mul_f64(n as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    n += 1;
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let (url, key) = if state % 100 < new_percent {
                        let key = format!("n{index}-w{thread}-{}", first + n);
                        (format!("http://{api}/v1/records/soak/{key}"), Some(key))
                    } else {
                        (
                            format!(
                                "http://{api}/v1/records/shared/{}",
                                state % SHARED_RECORDS as u64
                            ),
                            None,
                        )
                    };
                    let body = json!({"site": index, "n": n, "note": "steady load"});
                    offered.fetch_add(1, Ordering::Relaxed);
                    match agent.patch(&url).send_json(body) {
                        Ok(response) if response.status() == 200 => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            if let Some(key) = key {
                                created.lock().expect("lock").push(key);
                            }
                        }
                        Ok(response) if response.status() == 503 => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
    }
    let mut samples = Vec::new();
    let mut next_sample = start + MONITOR_INTERVAL;
    while start.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() >= next_sample {
            next_sample += MONITOR_INTERVAL;
            let lag: u64 = cluster.nodes.iter().map(Node::lag).sum();
            let rss: Vec<f64> = cluster.nodes.iter().map(Node::rss_mib).collect();
            let at = start.elapsed().as_secs();
            if verbose {
                let rss_text: Vec<String> = rss.iter().map(|mib| format!("{mib:.0}")).collect();
                eprintln!(
                    "{at:>5} s: {} acknowledged, {} refused, lag {lag}, RSS {} MiB",
                    accepted.load(Ordering::Relaxed),
                    refused.load(Ordering::Relaxed),
                    rss_text.join("/")
                );
            }
            samples.push((at, lag, rss));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.join().expect("writer");
    }
    let seconds = start.elapsed().as_secs_f64();
    let created = std::mem::take(&mut *created.lock().expect("lock"));
    Outcome {
        offered: offered.load(Ordering::Relaxed),
        accepted: accepted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        created,
        samples,
        seconds,
    }
}

/// Raises the rate step by step; the capacity is the highest rate whose writes were all
/// taken (at most 1% refused) with lag bounded, and after which the nodes converged.
fn capacity(cluster: &Cluster, step_seconds: usize) {
    println!("soak capacity: 3 nodes, page cache 8 MiB, {step_seconds} s per step");
    println!("| offered writes/s | acknowledged/s | refused (503) | lag at the end | lag bounded | converged after |");
    println!("|---|---|---|---|---|---|");
    let mut capacity = 0;
    let mut first = 0u64;
    for rate in CAPACITY_RATES {
        let outcome = load(
            cluster,
            rate,
            Duration::from_secs(step_seconds as u64),
            first,
            NEW_PERCENT_DEFAULT,
            false,
        );
        first += outcome.offered + 1;
        let bounded = outcome.lag_bounded(rate);
        let took = cluster.converge(&outcome);
        let taken = outcome.accepted as f64 / outcome.seconds;
        let refused_share = outcome.refused as f64 / outcome.offered.max(1) as f64;
        let lag_end = outcome.samples.last().map_or(0, |(_, lag, _)| *lag);
        println!(
            "| {rate} | {taken:.0} | {} ({:.1}%) | {lag_end} | {} | {:.1} s |",
            outcome.refused,
            refused_share * 100.0,
            if bounded { "yes" } else { "no" },
            took.as_secs_f64()
        );
        if bounded && refused_share <= 0.01 && taken >= rate as f64 * 0.95 {
            capacity = rate;
        } else {
            break;
        }
    }
    println!(
        "capacity: {capacity} writes/s with lag bounded (80%: {})",
        capacity * 4 / 5
    );
}

/// A backup of a node taking writes, then a restore of it over its store (see the module doc).
fn backup(cluster: &mut Cluster, parent: &Path, fill_seconds: usize, rate: usize) {
    println!("soak backup: 3 nodes, page cache 8 MiB, filled for {fill_seconds} s, then {rate} writes/s during the backup");
    let filled = load(
        cluster,
        1500,
        Duration::from_secs(fill_seconds as u64),
        0,
        100,
        false,
    );
    cluster.converge(&filled);
    let records = cluster.nodes[0].list("soak").len();
    let node_rss_before = cluster.nodes[0].rss_mib();
    let store_bytes: u64 = dir_bytes(&cluster.nodes[0].dir.join("store"));
    println!(
        "filled: {records} records on every node; n0's store {:.0} MiB on disk, n0 RSS {node_rss_before:.0} MiB",
        store_bytes as f64 / 1048576.0
    );
    // Writers on all three nodes during the backup, which starts 5 s into their load.
    let file = parent.join("n0.backup");
    let n0 = cluster.nodes[0].dir.clone();
    let node_pid = cluster.nodes[0].child.id().to_string();
    let writing = std::thread::scope(|scope| {
        let writers =
            scope.spawn(|| load(cluster, rate, Duration::from_secs(60), 1 << 40, 70, false));
        std::thread::sleep(Duration::from_secs(5));
        let start = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
            .args([
                "backup",
                n0.to_str().expect("utf-8"),
                "-o",
                file.to_str().expect("utf-8"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("concord backup");
        let pid = child.id().to_string();
        let (mut cli_peak, mut node_peak) = (0.0f64, 0.0f64);
        while child.try_wait().expect("wait").is_none() {
            cli_peak = cli_peak.max(common::memory_mib(&pid, "VmHWM"));
            node_peak = node_peak.max(common::memory_mib(&node_pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = start.elapsed();
        let output = child.wait_with_output().expect("backup output");
        assert!(output.status.success(), "concord backup failed");
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        let outcome = writers.join().expect("writers");
        (took, cli_peak, node_peak, report, outcome)
    });
    let (took, cli_peak, node_peak, report, during) = writing;
    let size = std::fs::metadata(&file).expect("backup file").len();
    println!("| | figure |");
    println!("|---|---|");
    println!(
        "| backup of n0 (through its API, writers on) | {:.1} s, {:.0} MiB file, {} |",
        took.as_secs_f64(),
        size as f64 / 1048576.0,
        report.trim()
    );
    println!(
        "| n0's RSS: before / peak during the backup | {node_rss_before:.0} / {node_peak:.0} MiB |"
    );
    println!("| the backup process's peak RSS | {cli_peak:.0} MiB |");
    println!(
        "| writes during the 60 s around it | {} offered, {} acknowledged ({:.0}/s), {} refused, {} failed |",
        during.offered, during.accepted, during.accepted as f64 / during.seconds, during.refused, during.failed
    );
    cluster.converge(&during);
    // n0 stops; the backup goes back in place of its store; n0 starts and catches up.
    let node = &mut cluster.nodes[0];
    let _ = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    node.child.wait().expect("wait");
    let start = Instant::now();
    concord(&[
        "restore",
        file.to_str().expect("utf-8"),
        node.dir.to_str().expect("utf-8"),
        "--replace",
    ]);
    let restore_took = start.elapsed();
    node.child = spawn_node(&node.dir);
    cluster.await_mesh();
    let start = Instant::now();
    let mut all = filled;
    all.created.extend(during.created);
    let took = cluster.converge(&all);
    println!(
        "| restore over n0's store | {:.1} s |",
        restore_took.as_secs_f64()
    );
    println!(
        "| n0 started on it, until no lag anywhere and every acknowledged record on every node | {:.1} s (lists checked {:.1} s after start) |",
        took.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                pending.push(entry.path());
            }
        } else {
            total += metadata.len();
        }
    }
    total
}
