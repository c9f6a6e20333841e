//! Adapter figures: rows from PostgreSQL into SQLite through two nodes, beside the same load
//! written straight into SQLite with no sync, measured in the same run.
//!
//! Node A's binding captures a PostgreSQL table, node B's applies to an SQLite table; the nodes
//! run in this process over real QUIC with mutual TLS on loopback, both bindings `both`.
//! - Throughput: ROWS rows inserted into PostgreSQL in transactions of BATCH rows, timed from
//!   the first commit until the last row is in SQLite. Baseline: the same rows inserted into
//!   an SQLite file in the same transactions.
//! - Latency: one row per transaction at RATE rows/s for SECONDS, each timed from its commit
//!   returning to a reader (polling the SQLite file every millisecond) seeing it. Baseline:
//!   the same writes committed straight into an SQLite file and seen by the same reader.
//!
//! `cargo bench --bench adapters -- [--rows N] [--batch B] [--rate PER_SECOND] [--seconds S]`
//!
//! Needs PostgreSQL at 127.0.0.1:5432 that lets `postgres` in; makes and drops its own
//! `concord_bench_*` database.

/// The allocator the `concord` binary uses, so that these are the binary's figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{flag, paced};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord::config::{AdapterKind, BindingSection, Config, Direction};
use concord::node::{InitOptions, Node};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const POSTGRES_TABLE: &str = "CREATE TABLE items (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    qty integer NOT NULL,
    price numeric(12,2) NOT NULL,
    updated timestamptz NOT NULL
)";
const SQLITE_TABLE: &str = "CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    qty INTEGER NOT NULL,
    price TEXT NOT NULL,
    updated TIMESTAMP NOT NULL
)";
/// How often the reader looks for new rows in the target.
const READ_POLL: Duration = Duration::from_millis(1);
/// How long the bench waits for rows that should arrive in well under this.
const WAIT_MAX: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows = flag(&args, "--rows", 20_000);
    let batch = flag(&args, "--batch", 500).max(1);
    let rate = flag(&args, "--rate", 500).max(1);
    let seconds = flag(&args, "--seconds", 5).max(1);
    println!(
        "adapters: {rows} rows in transactions of {batch}; latency at {rate} rows/s (one per transaction) for {seconds} s"
    );
    let temp = tempfile::tempdir().expect("temp dir");
    let database = format!("concord_bench_{}", std::process::id());
    let mut admin = postgres::Client::connect(&format!("{SERVER}/postgres"), postgres::NoTls)
        .expect("PostgreSQL at 127.0.0.1:5432 (user postgres)");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .expect("drop");
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .expect("create");
    let url = format!("{SERVER}/{database}");

    // Baseline first: the same load straight into an SQLite file, nothing else running.
    let baseline_file = temp.path().join("baseline.db");
    let mut baseline = sqlite(&baseline_file);
    baseline.execute_batch(SQLITE_TABLE).expect("table");
    let started = Instant::now();
    for first in (0..rows).step_by(batch) {
        insert_sqlite(&mut baseline, first..(first + batch).min(rows));
    }
    let baseline_rows_per_second = rows as f64 / started.elapsed().as_secs_f64();
    let baseline_latency = latency(&baseline_file, rows, rate, seconds, |range| {
        insert_sqlite(&mut baseline, range)
    });

    // Through Concord.
    let target_file = temp.path().join("target.db");
    sqlite(&target_file)
        .execute_batch(SQLITE_TABLE)
        .expect("table");
    let mut source = postgres::Client::connect(&url, postgres::NoTls).expect("bench database");
    source.batch_execute(POSTGRES_TABLE).expect("table");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).expect("ca");
    let port = || {
        let port = concord::net::free_loopback_port().expect("a free port");
        format!("127.0.0.1:{port}")
    };
    let listen_a = port();
    let node = |name: &str, listen: &str, peers: Vec<String>, binding: BindingSection| {
        let dir = temp.path().join(name);
        Node::init_with(
            &dir,
            &InitOptions {
                name: Some(name.into()),
                ca: Some(ca.clone()),
                listen: Some(listen.to_owned()),
                api: Some(port()),
                peers,
                engine: None,
            },
        )
        .expect("node");
        let path = dir.join("concord.toml");
        let mut config = Config::load(&path).expect("config");
        config.bindings.push(binding);
        std::fs::write(&path, config.to_toml()).expect("config");
        Arc::new(Node::open(&dir).expect("open"))
    };
    let node_a = node(
        "a",
        &listen_a,
        vec![],
        binding(AdapterKind::Postgres, url.clone()),
    );
    let node_b = node(
        "b",
        &port(),
        vec![listen_a.clone()],
        binding(AdapterKind::Sqlite, target_file.display().to_string()),
    );
    let running_a = runtime
        .block_on(concord::node::runtime::start(node_a))
        .expect("start a");
    let running_b = runtime
        .block_on(concord::node::runtime::start(node_b))
        .expect("start b");
    let counter = |running: &concord::node::runtime::Running, name: &str| -> u64 {
        let status = running.shared.status_now();
        let binding = &status.bindings[0];
        match name {
            "captured" => binding.rows_captured,
            _ => binding.rows_applied,
        }
    };
    let target = sqlite(&target_file);
    let started = Instant::now();
    for first in (0..rows).step_by(batch) {
        insert_postgres(&mut source, first..(first + batch).min(rows));
    }
    let committed = started.elapsed();
    let (mut captured_at, mut applied_at) = (None, None);
    let deadline = Instant::now() + WAIT_MAX;
    while applied_at.is_none() && Instant::now() < deadline {
        if captured_at.is_none() && counter(&running_a, "captured") >= rows as u64 {
            captured_at = Some(started.elapsed());
        }
        let count: i64 = target
            .query_row("SELECT count(*) FROM items", [], |row| row.get(0))
            .expect("count");
        if count >= rows as i64 {
            applied_at = Some(started.elapsed());
        }
        std::thread::sleep(READ_POLL * 5);
    }
    let applied_at = applied_at.expect("every row reached SQLite in time");
    let captured_at = captured_at.unwrap_or(applied_at);
    let rows_per_second = rows as f64 / applied_at.as_secs_f64();
    let captured_before = counter(&running_a, "captured");
    let synced_latency = latency(&target_file, rows, rate, seconds, |range| {
        insert_postgres(&mut source, range)
    });
    let echo = counter(&running_b, "captured");
    let a_captured = counter(&running_a, "captured") - captured_before;

    println!("\nthroughput, {rows} rows:");
    println!("  straight into SQLite (baseline):   {baseline_rows_per_second:>9.0} rows/s");
    println!(
        "  PostgreSQL -> A -> QUIC -> B -> SQLite: {rows_per_second:>9.0} rows/s (all committed in PostgreSQL after {:.2} s, captured at A after {:.2} s, all in SQLite after {:.2} s)",
        committed.as_secs_f64(),
        captured_at.as_secs_f64(),
        applied_at.as_secs_f64()
    );
    println!(
        "\ncommit -> visible to a reader of the SQLite file, {} rows at {rate} rows/s:",
        rate * seconds
    );
    print_latency("straight into SQLite (baseline)", &baseline_latency);
    print_latency("PostgreSQL -> A -> QUIC -> B -> SQLite", &synced_latency);
    println!(
        "\necho check: B's binding captured {echo} rows (it only applied), A's captured {a_captured} of the {} latency rows",
        rate * seconds
    );
    runtime.block_on(async {
        running_b.stop().await.expect("stop b");
        running_a.stop().await.expect("stop a");
    });
    drop(source);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .expect("drop");
}

fn binding(adapter: AdapterKind, url: String) -> BindingSection {
    BindingSection {
        name: None,
        collection: "items".to_owned(),
        adapter,
        url,
        table: "items".to_owned(),
        key: vec!["id".to_owned()],
        direction: Direction::Both,
        fields: Default::default(),
    }
}

fn sqlite(path: &Path) -> rusqlite::Connection {
    let connection = rusqlite::Connection::open(path).expect("sqlite");
    connection
        .busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    // WAL, as the adapter uses it: readers and the writer do not block each other.
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    connection
}

fn insert_sqlite(connection: &mut rusqlite::Connection, range: std::ops::Range<usize>) {
    let transaction = connection.transaction().expect("transaction");
    {
        let mut statement = transaction
            .prepare_cached(
                "INSERT INTO items (id, name, qty, price, updated) \
                 VALUES (?1, 'item ' || ?1, ?1 % 100, printf('%.2f', (?1 % 10000) / 100.0), \
                 strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            )
            .expect("prepare");
        for n in range {
            statement.execute([n as i64]).expect("insert");
        }
    }
    transaction.commit().expect("commit");
}

fn insert_postgres(client: &mut postgres::Client, range: std::ops::Range<usize>) {
    client
        .execute(
            "INSERT INTO items (id, name, qty, price, updated) \
             SELECT g, 'item ' || g, g % 100, (g % 10000) / 100.0, now() \
             FROM generate_series($1::bigint, $2::bigint) AS g",
            &[&(range.start as i64), &(range.end as i64 - 1)],
        )
        .expect("insert");
}

/// Writes one row per transaction at `rate` for `seconds` with `write`, numbering from
/// `first`; a reader polls `file` and notes when each row shows. Returns the latencies in ms.
fn latency(
    file: &Path,
    first: usize,
    rate: usize,
    seconds: usize,
    mut write: impl FnMut(std::ops::Range<usize>),
) -> Vec<f64> {
    let total = rate * seconds;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let file: PathBuf = file.to_owned();
        let done = done.clone();
        std::thread::spawn(move || {
            let connection = sqlite(&file);
            let mut seen: Vec<Option<Instant>> = vec![None; total];
            let mut after = first as i64 - 1;
            let mut count = 0;
            let deadline = Instant::now() + WAIT_MAX;
            while count < total && Instant::now() < deadline {
                let mut statement = connection
                    .prepare_cached("SELECT id FROM items WHERE id > ?1 ORDER BY id")
                    .expect("prepare");
                let ids: Vec<i64> = statement
                    .query_map([after], |row| row.get(0))
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("ids");
                let now = Instant::now();
                for id in ids {
                    let index = (id as usize).wrapping_sub(first);
                    if index < total && seen[index].is_none() {
                        seen[index] = Some(now);
                        count += 1;
                    }
                }
                // Rows may land out of order: only move past a prefix seen in full.
                while seen
                    .get((after + 1) as usize - first)
                    .is_some_and(Option::is_some)
                {
                    after += 1;
                }
                if done.load(Ordering::Relaxed) && count == total {
                    break;
                }
                std::thread::sleep(READ_POLL);
            }
            seen
        })
    };
    let mut committed = Vec::with_capacity(total);
    paced(total, rate, |n| {
        write(first + n..first + n + 1);
        committed.push(Instant::now());
    });
    done.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("reader");
    let missing = seen.iter().filter(|seen| seen.is_none()).count();
    assert_eq!(missing, 0, "{missing} rows never showed in the target");
    let mut latencies: Vec<f64> = committed
        .iter()
        .zip(&seen)
        .filter_map(|(committed, seen)| {
            seen.map(|seen| seen.saturating_duration_since(*committed).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn print_latency(what: &str, latencies: &[f64]) {
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "  {what:<40} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        percentile(0.5),
        percentile(0.99),
        percentile(1.0)
    );
}
