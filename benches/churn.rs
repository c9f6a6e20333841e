//! A table that is updated for a long time, as a site meets it: `--nodes` real `concord run`
//! processes (one, or a chain of three joined over QUIC with mutual TLS), `--records` records,
//! then patches of one field of random records through `POST /v1/batch` (100 a batch) from two
//! clients, as fast as the API takes them, for `--seconds`. Every `--every` seconds it prints
//! the patches so far, the rate, and each node's files on disk (and those at the store's top:
//! fjall's journals), what its store holds (the size of a backup: every key and value, live
//! records and kept history, uncompressed) and its RSS; at the end, the files
//! once the nodes stopped, and again once they started and stopped again. Each engine named
//! by `--engine` (both by default) runs in turn, in the same run. `--cache-mib` sets the
//! nodes' `store.cache_mib` (the memory their loaded documents may take; the node's default
//! otherwise).
//!
//! ```sh
//! cargo bench --bench churn -- [--engine sled|fjall|both] [--nodes 1] [--records 2000] \
//!     [--seconds 120] [--every 30] [--cache-mib N]
//! ```
//!
//! Its data lives in `$TMPDIR/concord-churn-PID`, removed at the end; a run that was killed
//! leaves one behind, which the next run removes (with any node of it still running).

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Patches a batch.
const BATCH: usize = 100;
/// Clients patching at once.
const CLIENTS: usize = 2;
/// The folder prefix of a run's data.
const PREFIX: &str = "concord-churn-";

struct Site {
    dir: PathBuf,
    api: String,
    child: Option<Child>,
}

impl Site {
    fn start(&mut self) {
        self.child = Some(common::spawn(&self.dir));
        let begin = Instant::now();
        while ureq::get(format!("http://{}/v1/status", self.api))
            .call()
            .is_err()
        {
            assert!(begin.elapsed() < Duration::from_secs(60), "node not up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            common::stop(child);
        }
    }

    /// Log entries the node truncated so far, and of each origin's log how far the node
    /// holds it, how far every node it knows does, and how far it truncated it
    /// (`held/stable/truncated`), and the engine's slowest step so far, from `/v1/status`
    /// (`0 ()` once it is stopped).
    fn truncation(&self) -> String {
        let status: Value = match &self.child {
            Some(_) => ureq::get(format!("http://{}/v1/status", self.api))
                .call()
                .ok()
                .and_then(|mut response| response.body_mut().read_json().ok())
                .unwrap_or_default(),
            None => Value::Null,
        };
        let origins: Vec<String> = status["reclamation"]["origins"]
            .as_array()
            .map(|origins| {
                origins
                    .iter()
                    .map(|o| format!("{}/{}/{}", o["held"], o["stable"], o["truncated_through"]))
                    .collect()
            })
            .unwrap_or_default();
        let truncated = status["engine"]["log_entries_truncated"]
            .as_u64()
            .unwrap_or(0);
        let slowest = status["slowest_engine_step_ms"].as_u64().unwrap_or(0);
        format!(
            "{truncated} ({}) slowest step {slowest} ms",
            origins.join(" ")
        )
    }

    fn rss_mib(&self) -> f64 {
        self.child.as_ref().map_or(0.0, |child| {
            common::memory_mib(&child.id().to_string(), "VmRSS")
        })
    }

    fn store_mib(&self) -> f64 {
        mib(disk_bytes(&self.dir.join("store")))
    }

    /// Of the store's files, those at its top (fjall's journals; sled keeps everything there).
    fn store_top_mib(&self) -> f64 {
        mib(top_files_bytes(&self.dir.join("store")))
    }

    /// What the store holds, as a backup of it counts it: every key and value, live records
    /// and the history kept, uncompressed (through the API while the node runs).
    fn held_mib(&self) -> f64 {
        let file = self.dir.join("held.backup");
        common::concord(&[
            "backup",
            self.dir.to_str().expect("a UTF-8 path"),
            "--output",
            file.to_str().expect("a UTF-8 path"),
        ]);
        let bytes = std::fs::metadata(&file).map_or(0, |meta| meta.len());
        let _ = std::fs::remove_file(&file);
        mib(bytes)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Bytes the files directly in `path` take on disk (allocated blocks).
fn top_files_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.blocks() * 512)
        .sum()
}

/// Bytes the files under `path` take on disk (allocated blocks, not lengths).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Removes what runs that were killed left behind: their data, and their nodes.
fn remove_leftovers(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let path = entry.path();
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &format!("--data {}", path.display())])
            .status();
        eprintln!(
            "removing {} (left by a run that was stopped)",
            path.display()
        );
        let _ = std::fs::remove_dir_all(&path);
    }
}

fn post(agent: &ureq::Agent, api: &str, body: &Value) {
    loop {
        let response = agent
            .post(format!("http://{api}/v1/batch"))
            .send_json(body)
            .expect("the batch answers");
        match response.status().as_u16() {
            200 => return,
            // Pushed back: tried again, as a client that honours it does.
            503 => std::thread::sleep(Duration::from_millis(100)),
            status => panic!("a batch answered {status}"),
        }
    }
}

fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// The record JSON a batch writes: `n` in `0..records`, with a field for each round.
fn record(n: usize, round: u64) -> Value {
    let city = ["Paris", "Lyon", "Lille", "Nantes"][n % 4];
    json!({
        "name": format!("customer {n}"),
        "city": city,
        "balance": round,
        "note": "x".repeat(40),
    })
}

/// Sets `store.cache_mib` in the node config at `dir`.
fn set_cache_mib(dir: &Path, mib: usize) {
    let path = dir.join("concord.toml");
    let text = std::fs::read_to_string(&path).expect("the node's config reads");
    let mut config: toml::Table = text.parse().expect("the node's config parses");
    let store = config
        .entry("store")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let store = store.as_table_mut().expect("[store] is a table");
    store.insert(
        "cache_mib".to_owned(),
        toml::Value::Integer(i64::try_from(mib).expect("a cache size")),
    );
    std::fs::write(&path, toml::to_string(&config).expect("a config"))
        .expect("the node's config writes");
}

fn sites(root: &Path, engine: &str, nodes: usize, cache_mib: Option<usize>) -> Vec<Site> {
    let ca = root.join("ca");
    common::concord(&["ca", "init", ca.to_str().expect("a UTF-8 path")]);
    let mut sites = Vec::new();
    let mut listens: Vec<String> = Vec::new();
    for index in 0..nodes {
        let dir = root.join(format!("n{index}"));
        let api = format!("127.0.0.1:{}", common::free_port());
        let listen = format!("127.0.0.1:{}", common::free_port());
        let mut args = vec![
            "init".to_owned(),
            dir.to_str().expect("a UTF-8 path").to_owned(),
            "--name".to_owned(),
            format!("n{index}"),
            "--ca".to_owned(),
            ca.to_str().expect("a UTF-8 path").to_owned(),
            "--api".to_owned(),
            api.clone(),
            "--listen".to_owned(),
            listen.clone(),
            "--engine".to_owned(),
            engine.to_owned(),
        ];
        if let Some(previous) = listens.last() {
            args.extend(["--peer".to_owned(), previous.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::concord(&args);
        if let Some(mib) = cache_mib {
            set_cache_mib(&dir, mib);
        }
        listens.push(listen);
        sites.push(Site {
            dir,
            api,
            child: None,
        });
    }
    sites
}

fn report(label: &str, sites: &[Site], patches: u64, elapsed: f64) {
    let disks: Vec<String> = sites
        .iter()
        .map(|site| {
            let files = site.store_mib();
            let held = site.held_mib();
            format!(
                "{files:.1} (top {:.1}; holds {held:.1}, {:.1}x)",
                site.store_top_mib(),
                files / held.max(0.001)
            )
        })
        .collect();
    let rss: Vec<String> = sites
        .iter()
        .map(|site| format!("{:.0}", site.rss_mib()))
        .collect();
    let truncated: Vec<String> = sites.iter().map(Site::truncation).collect();
    println!(
        "{label:>9}  patches {patches:>9}  rate {:>7.0}/s  store MiB (files, top-level files; held, files/held) [{}]  RSS MiB [{}]  log entries truncated [{}]",
        patches as f64 / elapsed.max(0.001),
        disks.join(", "),
        rss.join(", "),
        truncated.join(", "),
    );
}

fn run(
    root: &Path,
    engine: &str,
    nodes: usize,
    records: usize,
    seconds: u64,
    every: u64,
    cache_mib: Option<usize>,
) {
    let cache = cache_mib.map_or("the default".to_owned(), |mib| format!("{mib} MiB"));
    println!(
        "== engine {engine}: {nodes} node(s), {records} records, {seconds} s of patches, \
         document cache {cache}"
    );
    let mut sites = sites(root, engine, nodes, cache_mib);
    for site in &mut sites {
        site.start();
    }
    let agent = new_agent();
    for chunk in (0..records).collect::<Vec<_>>().chunks(1000) {
        let writes: Vec<Value> = chunk
            .iter()
            .map(|&n| json!({"id": format!("customers/{n}"), "fields": record(n, 0), "replace": true}))
            .collect();
        post(&agent, &sites[0].api, &json!({ "writes": writes }));
    }
    report("loaded", &sites, 0, 1.0);
    let patches = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let apis: Vec<String> = sites.iter().map(|site| site.api.clone()).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (patches, done, apis) = (patches.clone(), done.clone(), apis.clone());
            std::thread::spawn(move || {
                let agent = new_agent();
                let mut round = 0u64;
                // A fixed walk over the records: every client touches all of them.
                let mut n = client * 7919;
                while !done.load(Ordering::Relaxed) {
                    round += 1;
                    let writes: Vec<Value> = (0..BATCH)
                        .map(|_| {
                            n = (n + 104_729) % records;
                            json!({"id": format!("customers/{n}"), "fields": {"balance": round, "by": client}})
                        })
                        .collect();
                    let api = &apis[round as usize % apis.len()];
                    post(&agent, api, &json!({ "writes": writes }));
                    patches.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let begin = Instant::now();
    let mut next = every;
    while begin.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(200));
        if begin.elapsed() >= Duration::from_secs(next) {
            report(
                &format!("{next} s"),
                &sites,
                patches.load(Ordering::Relaxed),
                begin.elapsed().as_secs_f64(),
            );
            next += every;
        }
    }
    done.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("a client");
    }
    let total = patches.load(Ordering::Relaxed);
    let elapsed = begin.elapsed().as_secs_f64();
    report("end", &sites, total, elapsed);
    for site in &mut sites {
        site.stop();
    }
    report("stopped", &sites, total, elapsed);
    for site in &mut sites {
        site.start();
    }
    // Idle a while: what the engine reclaims in the background once writes stop.
    std::thread::sleep(Duration::from_secs(10));
    report("restarted", &sites, total, elapsed);
    for site in &mut sites {
        site.stop();
    }
    report("stopped", &sites, total, elapsed);
    for (index, site) in sites.iter().enumerate() {
        print_warnings(index, &site.dir.join("node.log"));
    }
}

/// Most lines of a node's log the run prints.
const LOG_LINES_SHOWN: usize = 8;

/// The warnings a node logged over the run: how many, and the last few.
fn print_warnings(index: usize, log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|line| line.contains("WARN")).collect();
    println!("  node {index}: {} warnings logged", lines.len());
    for line in &lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..] {
        println!("    {line}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = |name: &str, default: &str| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|index| args.get(index + 1))
            .map_or(default.to_owned(), Clone::clone)
    };
    let engines = match text("--engine", "both").as_str() {
        "both" => vec!["sled", "fjall"],
        "sled" => vec!["sled"],
        "fjall" => vec!["fjall"],
        other => panic!("--engine {other}: sled, fjall or both"),
    };
    let nodes = common::flag(&args, "--nodes", 1);
    let records = common::flag(&args, "--records", 2000);
    let seconds = common::flag(&args, "--seconds", 120) as u64;
    let every = common::flag(&args, "--every", 30) as u64;
    let cache_mib = args
        .iter()
        .position(|arg| arg == "--cache-mib")
        .map(|index| {
            args.get(index + 1)
                .and_then(|text| text.parse().ok())
                .expect("--cache-mib takes a number of MiB")
        });
    let temp = std::env::temp_dir();
    remove_leftovers(&temp);
    let root = temp.join(format!("{PREFIX}{}", std::process::id()));
    for engine in engines {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("the bench's folder");
        run(&root, engine, nodes, records, seconds, every, cache_mib);
    }
    let _ = std::fs::remove_dir_all(&root);
}
