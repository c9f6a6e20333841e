//! Million-record load: records written per second, bytes on disk per record and peak RSS,
//! beside raw sled inserts of the same number of values of the same size, measured in the same
//! run. Each side runs in its own child process so that its peak RSS is its own.
//!
//! `cargo bench --bench million_records -- [--records N] [--updates N]`

/// The allocator the `concord` binary uses, so that these are the binary's figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use concord::node::Node;
use concord::record::{RecordId, RecordWrite};
use serde_json::{json, Map, Value};

/// Records per flush, as `concord load` does by default.
const BATCH_RECORDS: usize = 1000;
/// The memory bound a node with default config keeps under with a million records.
const PEAK_RSS_MIB_BOUND: f64 = 512.0;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|index| args.get(index + 1))
            .cloned()
    };
    let records: usize =
        flag("--records").map_or(1_000_000, |text| text.parse().expect("--records N"));
    let updates: usize =
        flag("--updates").map_or(100_000, |text| text.parse().expect("--updates N"));
    match flag("--phase").as_deref() {
        Some("sled") => sled_phase(records),
        Some("concord") => concord_phase(records, updates),
        _ => parent(records, updates),
    }
}

fn parent(records: usize, updates: usize) {
    let exe = std::env::current_exe().expect("own path");
    println!("million_records: {records} records, {updates} one-field updates, batches of {BATCH_RECORDS}");
    let mut results = Vec::new();
    for phase in ["sled", "concord"] {
        let output = Command::new(&exe)
            .args([
                "--phase",
                phase,
                "--records",
                &records.to_string(),
                "--updates",
                &updates.to_string(),
            ])
            .output()
            .expect("child runs");
        assert!(
            output.status.success(),
            "{phase} phase failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        let result: Value = serde_json::from_str(&line).expect("child prints one JSON line");
        results.push(result);
    }
    println!(
        "| store | records/s | bytes on disk per record | peak RSS (MiB) | one-field updates/s |"
    );
    println!("|---|---|---|---|---|");
    for result in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} |",
            result["store"].as_str().unwrap_or("?"),
            result["records_per_second"].as_f64().unwrap_or(0.0),
            result["disk_bytes_per_record"].as_f64().unwrap_or(0.0),
            result["peak_rss_mib"].as_f64().unwrap_or(0.0),
            result["updates_per_second"]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
        );
    }
    let concord_rss = results[1]["peak_rss_mib"].as_f64().unwrap_or(f64::MAX);
    if concord_rss > PEAK_RSS_MIB_BOUND {
        eprintln!("FAIL: concord's peak RSS {concord_rss:.0} MiB is over the bound of {PEAK_RSS_MIB_BOUND:.0} MiB");
        std::process::exit(1);
    }
    println!("peak RSS {concord_rss:.0} MiB is within the bound of {PEAK_RSS_MIB_BOUND:.0} MiB");
}

fn record(n: usize) -> Map<String, Value> {
    let value = json!({
        "name": format!("Customer {n}"),
        "email": format!("customer{n}@example.com"),
        "balance": n % 100_000,
        "active": !n.is_multiple_of(3),
    });
    value.as_object().expect("object literal").clone()
}

fn sled_phase(records: usize) {
    let temp = tempfile::tempdir().expect("temp dir");
    let db = sled::Config::new()
        .path(temp.path().join("sled"))
        .cache_capacity(concord::store::PAGE_CACHE_BYTES_DEFAULT)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("sled opens");
    let start = Instant::now();
    let mut batch = sled::Batch::default();
    for n in 0..records {
        let key = format!("customers/{n}");
        let value = serde_json::to_vec(&record(n)).expect("json");
        batch.insert(key.as_bytes(), value);
        if (n + 1).is_multiple_of(BATCH_RECORDS) || n + 1 == records {
            db.apply_batch(std::mem::take(&mut batch)).expect("batch");
            db.flush().expect("flush");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    db.flush().expect("flush");
    let disk = dir_bytes(temp.path());
    println!(
        "{}",
        json!({
            "store": "raw sled (JSON values)",
            "records_per_second": records as f64 / elapsed,
            "disk_bytes_per_record": disk as f64 / records as f64,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
}

fn concord_phase(records: usize, updates: usize) {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("node");
    Node::init(&dir, Some("bench")).expect("init");
    let node = Node::open(&dir).expect("open");
    let ids: Vec<RecordId> = (0..records)
        .map(|n| RecordId::parse(&format!("customers/{n}")).expect("valid id"))
        .collect();
    let start = Instant::now();
    for (chunk_index, chunk) in ids.chunks(BATCH_RECORDS).enumerate() {
        let writes: Vec<RecordWrite> = (0..chunk.len())
            .map(|offset| RecordWrite::replace_with(record(chunk_index * BATCH_RECORDS + offset)))
            .collect();
        node.put_many(chunk.iter().zip(writes.iter()))
            .expect("load");
        if chunk_index.is_multiple_of(100) {
            eprintln!("{} records", chunk_index * BATCH_RECORDS);
        }
    }
    let load_seconds = start.elapsed().as_secs_f64();

    // One-field updates of records spread over the key space, acknowledged in batches.
    let start = Instant::now();
    let mut done = 0;
    while done < updates {
        let count = BATCH_RECORDS.min(updates - done);
        let writes: Vec<(RecordId, RecordWrite)> = (done..done + count)
            .map(|u| {
                let n = (u * 7919) % records;
                let write = RecordWrite {
                    set: vec![("balance".to_owned(), json!(u))],
                    ..RecordWrite::default()
                };
                (ids[n].clone(), write)
            })
            .collect();
        node.put_many(writes.iter().map(|(id, write)| (id, write)))
            .expect("update");
        done += count;
    }
    let update_seconds = start.elapsed().as_secs_f64();
    node.documents().sync().expect("sync");
    drop(node);
    let disk = dir_bytes(&dir);
    println!(
        "{}",
        json!({
            "store": "concord (Automerge documents)",
            "records_per_second": records as f64 / load_seconds,
            "disk_bytes_per_record": disk as f64 / records as f64,
            "peak_rss_mib": peak_rss_mib(),
            "updates_per_second": updates as f64 / update_seconds,
        })
    );
}

fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn peak_rss_mib() -> f64 {
    common::memory_mib("self", "VmHWM")
}
