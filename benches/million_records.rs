//! Million-record load: records written per second, bytes on disk per record and peak RSS,
//! beside raw inserts of the same number of values of the same size into the same engine
//! (through the store's seam, one batch and one flush per thousand, as `concord load` writes),
//! measured in the same run. Each side runs in its own child process so that its peak RSS is
//! its own. A third child measures Automerge alone on the same records and updates, in memory
//! with no store: each update loads its document from its saved bytes, sets the field and
//! encodes the change. That is the least a cold update of an Automerge document costs here, so
//! the run shows how far the store is from it as well as from the raw engine.
//!
//! `cargo bench --bench million_records -- [--records N] [--updates N] [--engine sled|fjall|both]`

/// The allocator the `concord` binary uses, so that these are the binary's figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use concord::node::{InitOptions, Node};
use concord::record::{RecordId, RecordWrite};
use concord::store::{Batch, DiskStore, Engine, Store};
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
    let engines: Vec<Engine> = match flag("--engine").as_deref() {
        None => vec![Engine::DEFAULT],
        Some("both") => vec![Engine::Sled, Engine::Fjall],
        Some(name) => vec![name.parse().expect("--engine sled|fjall|both")],
    };
    match flag("--phase").as_deref() {
        Some("raw") => raw_phase(engines[0], records),
        Some("concord") => concord_phase(engines[0], records, updates),
        Some("automerge") => automerge_phase(records, updates),
        _ => {
            let mut failed = false;
            for engine in engines {
                failed |= !parent(engine, records, updates);
            }
            if failed {
                std::process::exit(1);
            }
        }
    }
}

/// Runs both phases on `engine`, prints their figures, and says whether concord's peak RSS
/// kept within its bound.
fn parent(engine: Engine, records: usize, updates: usize) -> bool {
    let exe = std::env::current_exe().expect("own path");
    println!("million_records on {engine}: {records} records, {updates} one-field updates, batches of {BATCH_RECORDS}");
    let mut results = Vec::new();
    for phase in ["raw", "concord", "automerge"] {
        let output = Command::new(&exe)
            .args([
                "--phase",
                phase,
                "--engine",
                &engine.to_string(),
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
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            if line.starts_with("where the bytes are") {
                println!("{phase}: {line}");
            }
        }
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
    let raw_inserts = results[0]["records_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let updates_per_second = results[1]["updates_per_second"].as_f64().unwrap_or(0.0);
    let automerge_updates = results[2]["updates_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "one-field updates are {:.3}x the raw engine's inserts, {:.2}x Automerge's own cold \
         updates (which are {:.3}x the raw engine's inserts)",
        updates_per_second / raw_inserts,
        updates_per_second / automerge_updates,
        automerge_updates / raw_inserts,
    );
    let concord_rss = results[1]["peak_rss_mib"].as_f64().unwrap_or(f64::MAX);
    if concord_rss > PEAK_RSS_MIB_BOUND {
        eprintln!("FAIL: concord's peak RSS {concord_rss:.0} MiB is over the bound of {PEAK_RSS_MIB_BOUND:.0} MiB");
        return false;
    }
    println!("peak RSS {concord_rss:.0} MiB is within the bound of {PEAK_RSS_MIB_BOUND:.0} MiB");
    true
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

fn raw_phase(engine: Engine, records: usize) {
    let temp = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::create(
        &temp.path().join("store"),
        engine,
        concord::store::PAGE_CACHE_BYTES_DEFAULT,
    )
    .expect("store opens");
    let start = Instant::now();
    let mut batch = Batch::default();
    for n in 0..records {
        let key = format!("customers/{n}");
        let value = serde_json::to_vec(&record(n)).expect("json");
        batch.put(key.into_bytes(), value);
        if (n + 1).is_multiple_of(BATCH_RECORDS) || n + 1 == records {
            store.apply(std::mem::take(&mut batch)).expect("batch");
            store.flush().expect("flush");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    store.flush().expect("flush");
    drop(store);
    let disk = dir_bytes(temp.path());
    println!(
        "{}",
        json!({
            "store": format!("raw {engine} (JSON values)"),
            "records_per_second": records as f64 / elapsed,
            "disk_bytes_per_record": disk as f64 / records as f64,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
}

fn concord_phase(engine: Engine, records: usize, updates: usize) {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("node");
    let options = InitOptions {
        name: Some("bench".to_owned()),
        engine: Some(engine),
        ..InitOptions::default()
    };
    Node::init_with(&dir, &options).expect("init");
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
    eprintln!(
        "where the bytes are: {}",
        breakdown(&dir.join(concord::node::STORE_DIR))
    );
    println!(
        "{}",
        json!({
            "store": format!("concord on {engine} (Automerge documents)"),
            "records_per_second": records as f64 / load_seconds,
            "disk_bytes_per_record": disk as f64 / records as f64,
            "peak_rss_mib": peak_rss_mib(),
            "updates_per_second": updates as f64 / update_seconds,
        })
    );
}

/// Automerge alone, in memory: the records created and saved, then the same one-field updates
/// as [`concord_phase`] makes, each loading its document from its saved bytes (as a write
/// that misses the store's cache must) and encoding its change.
fn automerge_phase(records: usize, updates: usize) {
    use automerge::transaction::{CommitOptions, Transactable};
    use automerge::{ActorId, AutoCommit, Automerge, ReadDoc, ROOT};
    let actor = ActorId::from([7u8; 16].as_slice());
    let start = Instant::now();
    let mut saved: Vec<Vec<u8>> = Vec::with_capacity(records);
    for n in 0..records {
        let mut doc = AutoCommit::new().with_actor(actor.clone());
        for (field, value) in record(n) {
            let value = match value {
                Value::String(text) => automerge::ScalarValue::Str(text.into()),
                Value::Bool(flag) => automerge::ScalarValue::Boolean(flag),
                other => automerge::ScalarValue::Int(other.as_i64().expect("an integer")),
            };
            doc.put(ROOT, field, value).expect("put");
        }
        saved.push(doc.save());
    }
    let load_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for u in 0..updates {
        let n = (u * 7919) % records;
        let mut doc = Automerge::load(&saved[n]).expect("load");
        let mut tx = doc.transaction();
        tx.put(ROOT, "balance", u as i64 + 1_000_000).expect("put");
        let (hash, _) = tx.commit_with(
            CommitOptions::default()
                .with_time(1_700_000_000)
                .with_message("a stamp of about this length".to_owned()),
        );
        let hash = hash.expect("a change");
        let change = doc.get_change_by_hash(&hash).expect("its change");
        std::hint::black_box(change.raw_bytes().len());
    }
    let update_seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "store": "Automerge alone, in memory (no store)",
            "records_per_second": records as f64 / load_seconds,
            "disk_bytes_per_record": saved.iter().map(Vec::len).sum::<usize>() as f64 / records as f64,
            "peak_rss_mib": peak_rss_mib(),
            "updates_per_second": updates as f64 / update_seconds,
        })
    );
}

/// The bytes under each directory of `path` (a store's engine files, by what they hold).
fn breakdown(path: &Path) -> String {
    let mut parts = Vec::new();
    let mut loose = 0;
    for entry in std::fs::read_dir(path).expect("read dir").flatten() {
        if entry.metadata().expect("metadata").is_dir() {
            let name = entry.file_name().to_string_lossy().into_owned();
            parts.push(format!("{name}/ {} MiB", dir_bytes(&entry.path()) >> 20));
        } else {
            loose += entry.metadata().expect("metadata").len();
        }
    }
    parts.push(format!("files {} MiB", loose >> 20));
    parts.join(", ")
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
