//! Replication figures, each beside a baseline measured in the same run.
//!
//! Engine level (two sled-backed nodes, engines exchanging encoded frames in memory, so the
//! figures are the protocol's own and not QUIC's): first replication of N records to an empty
//! peer, two in-sync nodes confirming it, and catch-up after 1% of the records changed during a
//! partition; the baseline is Automerge's own per-document sync of the same documents.
//! Network level (two `concord run` nodes in this process, real QUIC and mutual TLS on
//! loopback): changes per second one peer applies from another, and write-to-visible latency
//! at a steady write rate; the baseline is the same writes on one node with no peer.
//!
//! Partial replicas (engine level, three sled-backed nodes): a node granted 1% of the records
//! (`customers:region=edge`) catching up from a node holding them all, beside a node with no
//! grant doing the same, from an empty store and after 1% of the records changed.
//!
//! Long histories (two `concord run` nodes over QUIC): one record updated N times reaching a
//! fresh peer, beside N changes spread over N distinct records.
//!
//! `cargo bench --bench replication -- [--records N] [--rate PER_SECOND] [--seconds S]
//! [--history N] [--engine sled|fjall] [--partial-only] [--network-only] [--history-only]`

/// The allocator the `concord` binary uses, so that these are the binary's figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{flag, paced};

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync::{State as SyncState, SyncDoc};
use automerge::Automerge;
use concord::node::{InitOptions, Node};
use concord::record::{NodeId, RecordId, RecordWrite};
use concord::store::{DiskStore, DocStore, Engine as StoreEngine};
use concord::sync::{Config, Driver, Engine, Input, Output};
use serde_json::json;

const BATCH: usize = 1000;
const CLUSTER: [u8; 16] = [7; 16];

/// The store engine `--engine` names for every node of the run (the node's default without).
static ENGINE: std::sync::OnceLock<StoreEngine> = std::sync::OnceLock::new();

fn engine() -> Option<StoreEngine> {
    ENGINE.get().copied()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records = flag(&args, "--records", 100_000);
    let rate = flag(&args, "--rate", 1000);
    let seconds = flag(&args, "--seconds", 5);
    let history = flag(&args, "--history", 50_000);
    if let Some(at) = args.iter().position(|arg| arg == "--engine") {
        let engine = args
            .get(at + 1)
            .expect("--engine sled|fjall")
            .parse()
            .expect("--engine sled|fjall");
        ENGINE.set(engine).expect("set once");
    }
    println!("replication: {records} records; latency at {rate} writes/s for {seconds} s; a history of {history} changes; store engine {}", engine().map_or("the default".to_owned(), |engine| engine.to_string()));
    if args.iter().any(|arg| arg == "--partial-only") {
        partial_replica(records, true);
        partial_replica(records, false);
        return;
    }
    if args.iter().any(|arg| arg == "--network-only") {
        network_level(records / 5, rate, seconds);
        return;
    }
    if args.iter().any(|arg| arg == "--history-only") {
        long_history(history);
        return;
    }
    engine_level(records);
    partial_replica(records, true);
    partial_replica(records, false);
    network_level(records / 5, rate, seconds);
    long_history(history);
}

fn record(n: usize) -> RecordWrite {
    let fields = json!({"name": format!("Customer {n}"), "email": format!("customer{n}@example.com"), "balance": n % 100_000, "active": !n.is_multiple_of(3)});
    RecordWrite::replace_with(fields.as_object().expect("object").clone())
}

fn id(n: usize) -> RecordId {
    RecordId::parse(&format!("customers/{n}")).expect("valid id")
}

fn load(node: &Node, range: std::ops::Range<usize>) {
    let ids: Vec<RecordId> = range.clone().map(id).collect();
    let writes: Vec<RecordWrite> = range.map(record).collect();
    for (ids, writes) in ids.chunks(BATCH).zip(writes.chunks(BATCH)) {
        node.put_many(ids.iter().zip(writes.iter())).expect("load");
    }
}

struct Side<'a> {
    id: NodeId,
    driver: Driver,
    docs: &'a DocStore<DiskStore>,
}

/// Connection ids of the two sides' link: a new one per connection.
static CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Delivers every frame between the two drivers until none is left (a frame gives its room
/// back to its sender once delivered); returns bytes moved.
fn pump(sides: &mut [Side<'_>; 2], now: Duration, initial: Vec<(usize, Input)>) -> u64 {
    let mut queue: VecDeque<(usize, u64, Vec<u8>)> = VecDeque::new();
    let mut bytes = 0u64;
    let mut step = |sides: &mut [Side<'_>; 2],
                    at: usize,
                    inputs: Vec<Input>,
                    queue: &mut VecDeque<(usize, u64, Vec<u8>)>| {
        let side = &mut sides[at];
        for output in side.driver.step(now, inputs, side.docs) {
            if let Output::Send {
                connection, frame, ..
            } = output
            {
                bytes += frame.len() as u64;
                queue.push_back((1 - at, connection, frame));
            }
        }
        assert_eq!(side.driver.stats().step_errors, 0, "engine steps fail");
    };
    for (at, input) in initial {
        step(sides, at, vec![input], &mut queue);
    }
    while let Some((to, connection, frame)) = queue.pop_front() {
        let mut decoder = concord_proto::FrameDecoder::new();
        decoder.push(&frame).expect("frame");
        let message = decoder.next_message().expect("decodes").expect("whole");
        let (from_id, to_id) = (sides[1 - to].id, sides[to].id);
        step(
            sides,
            to,
            vec![Input::Received {
                peer: from_id,
                connection,
                message,
            }],
            &mut queue,
        );
        step(
            sides,
            1 - to,
            vec![Input::Drained {
                peer: to_id,
                connection,
                bytes: frame.len(),
            }],
            &mut queue,
        );
    }
    bytes
}

fn connect_inputs(sides: &[Side<'_>; 2]) -> Vec<(usize, Input)> {
    let connection = CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    vec![
        (
            0,
            Input::Up {
                peer: sides[1].id,
                connection,
            },
        ),
        (
            1,
            Input::Up {
                peer: sides[0].id,
                connection,
            },
        ),
    ]
}

fn disconnect(sides: &mut [Side<'_>; 2]) {
    let (a, b) = (sides[0].id, sides[1].id);
    // Only the current connection is known to the drivers: take it down on both sides.
    for (at, peer) in [(0, b), (1, a)] {
        let side = &mut sides[at];
        let connection = CONNECTION.load(std::sync::atomic::Ordering::Relaxed) - 1;
        side.driver.step(
            Duration::ZERO,
            vec![Input::Down { peer, connection }],
            side.docs,
        );
    }
}

/// Automerge's own sync between two documents until both are done: (bytes, messages).
fn automerge_sync(a: &mut Automerge, b: &mut Automerge) -> (u64, u64) {
    let (mut state_a, mut state_b) = (SyncState::new(), SyncState::new());
    let (mut bytes, mut messages) = (0u64, 0u64);
    loop {
        let mut quiet = true;
        if let Some(message) = a.generate_sync_message(&mut state_a) {
            let encoded = message.encode();
            bytes += encoded.len() as u64;
            messages += 1;
            let decoded = automerge::sync::Message::decode(&encoded).expect("decodes");
            b.receive_sync_message(&mut state_b, decoded)
                .expect("applies");
            quiet = false;
        }
        if let Some(message) = b.generate_sync_message(&mut state_b) {
            let encoded = message.encode();
            bytes += encoded.len() as u64;
            messages += 1;
            let decoded = automerge::sync::Message::decode(&encoded).expect("decodes");
            a.receive_sync_message(&mut state_a, decoded)
                .expect("applies");
            quiet = false;
        }
        if quiet {
            return (bytes, messages);
        }
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

fn engine_level(records: usize) {
    let temp = tempfile::tempdir().expect("temp dir");
    let node_a = Node::create(
        &temp.path().join("a"),
        &InitOptions {
            name: Some("a".into()),
            engine: engine(),
            ..InitOptions::default()
        },
    )
    .expect("node a");
    let node_b = Node::create(
        &temp.path().join("b"),
        &InitOptions {
            name: Some("b".into()),
            engine: engine(),
            ..InitOptions::default()
        },
    )
    .expect("node b");
    load(&node_a, 0..records);
    let mut sides = [
        Side {
            id: node_a.id(),
            driver: Driver::new(
                Engine::new(Config::new(CLUSTER, node_a.id(), "a")),
                node_a.documents(),
            ),
            docs: node_a.documents(),
        },
        Side {
            id: node_b.id(),
            driver: Driver::new(
                Engine::new(Config::new(CLUSTER, node_b.id(), "b")),
                node_b.documents(),
            ),
            docs: node_b.documents(),
        },
    ];

    let start = Instant::now();
    let connect = connect_inputs(&sides);
    let first_bytes = pump(&mut sides, Duration::ZERO, connect);
    let first_time = start.elapsed();
    assert_eq!(
        node_b.count_live_records().expect("count"),
        records as u64,
        "B holds every record"
    );

    let start = Instant::now();
    let round = vec![(0, Input::Timeout), (1, Input::Timeout)];
    let confirm_bytes = pump(&mut sides, Duration::from_secs(10), round);
    let confirm_time = start.elapsed();
    disconnect(&mut sides);
    let start = Instant::now();
    let connect = connect_inputs(&sides);
    let reconnect_bytes = pump(&mut sides, Duration::from_secs(10), connect);
    let reconnect_time = start.elapsed();

    // A partition: 1% of the records change on A, then the nodes meet again.
    disconnect(&mut sides);
    let changed = (records / 100).max(1);
    let mark_before = node_a.documents().origin_mark(&node_a.writer());
    let ids: Vec<RecordId> = (0..changed).map(|i| id(i * 100)).collect();
    let writes: Vec<RecordWrite> = (0..changed)
        .map(|i| RecordWrite {
            set: vec![("balance".to_owned(), json!(1_000_000 + i))],
            ..RecordWrite::default()
        })
        .collect();
    node_a
        .put_many(ids.iter().zip(writes.iter()))
        .expect("updates");
    let changed_bytes: u64 = node_a
        .documents()
        .log_after(&node_a.writer(), mark_before, changed + 10, usize::MAX)
        .expect("log")
        .iter()
        .map(|c| c.change.len() as u64)
        .sum();
    let start = Instant::now();
    let connect = connect_inputs(&sides);
    let catch_up_bytes = pump(&mut sides, Duration::from_secs(20), connect);
    let catch_up_time = start.elapsed();

    // Baseline: Automerge's per-document sync of the same documents, fresh sync state per
    // document as on a new connection.
    let mut docs_a: Vec<Automerge> = Vec::with_capacity(records);
    for n in 0..records {
        docs_a.push(
            node_a
                .documents()
                .read(&id(n), |doc| doc.local().clone())
                .expect("read"),
        );
    }
    let mut docs_b: Vec<Automerge> = Vec::with_capacity(records);
    let start = Instant::now();
    let mut base_first = 0u64;
    for doc_a in docs_a.iter_mut() {
        let mut doc_b = Automerge::new();
        base_first += automerge_sync(doc_a, &mut doc_b).0;
        docs_b.push(doc_b);
    }
    let base_first_time = start.elapsed();
    let start = Instant::now();
    let mut base_confirm = 0u64;
    for (doc_a, doc_b) in docs_a.iter_mut().zip(docs_b.iter_mut()) {
        base_confirm += automerge_sync(doc_a, doc_b).0;
    }
    let base_confirm_time = start.elapsed();
    // 1% changed: change the same records on A's copies, then sync every document.
    for i in 0..changed {
        let doc = &mut docs_a[i * 100];
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(
            &mut tx,
            automerge::ROOT,
            "balance",
            2_000_000 + i as i64,
        )
        .expect("put");
        tx.commit();
    }
    let start = Instant::now();
    let mut base_catch_up = 0u64;
    for (doc_a, doc_b) in docs_a.iter_mut().zip(docs_b.iter_mut()) {
        base_catch_up += automerge_sync(doc_a, doc_b).0;
    }
    let base_catch_up_time = start.elapsed();

    println!("\n## Engine level, {records} records (frames encoded and decoded, no network)");
    println!("| measure | Concord | Automerge per-document sync (baseline) |");
    println!("|---|---|---|");
    println!(
        "| first replication to an empty peer | {:.2} s, {:.1} MB | {:.2} s, {:.1} MB |",
        first_time.as_secs_f64(),
        mb(first_bytes),
        base_first_time.as_secs_f64(),
        mb(base_first)
    );
    println!(
        "| in-sync nodes confirm (summary round) | {:.2} ms, {} B | {:.0} ms, {:.1} MB |",
        confirm_time.as_secs_f64() * 1000.0,
        confirm_bytes,
        base_confirm_time.as_secs_f64() * 1000.0,
        mb(base_confirm)
    );
    println!(
        "| in-sync nodes reconnect (hello + summary) | {:.2} ms, {} B | - |",
        reconnect_time.as_secs_f64() * 1000.0,
        reconnect_bytes
    );
    println!("| catch-up after {changed} records changed | {:.1} ms, {:.0} KB ({:.2}x the {:.0} KB of changes) | {:.0} ms, {:.1} MB |", catch_up_time.as_secs_f64() * 1000.0, catch_up_bytes as f64 / 1000.0, catch_up_bytes as f64 / changed_bytes as f64, changed_bytes as f64 / 1000.0, base_catch_up_time.as_secs_f64() * 1000.0, mb(base_catch_up));
}

/// Every hundredth record is the edge office's.
const EDGE_EVERY: usize = 100;

fn regional_record(n: usize) -> RecordWrite {
    let region = if n.is_multiple_of(EDGE_EVERY) {
        "edge"
    } else {
        "other"
    };
    let fields = json!({"name": format!("Customer {n}"), "email": format!("customer{n}@example.com"), "balance": n % 100_000, "region": region});
    RecordWrite::replace_with(fields.as_object().expect("object").clone())
}

/// A node granted 1% of the records beside one with no grant, each catching up from `hq`
/// (which holds them all): from an empty store, then after 1% of the records (spread over the
/// whole key space, so 1% of those are the edge's) changed while they were apart.
/// With `granted_first` the grant is in force before hq writes (an office granted, then
/// served); without it hq wrote every record before the grant came (an office added to a
/// cluster that holds data already), so hq's log holds no read tags for them.
fn partial_replica(records: usize, granted_first: bool) {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = temp.path().join("ca");
    let cluster = concord::net::tls::create_ca(&ca).expect("ca");
    let make = |name: &str| {
        Node::create(
            &temp.path().join(name),
            &InitOptions {
                name: Some(name.into()),
                ca: Some(ca.clone()),
                engine: engine(),
                ..InitOptions::default()
            },
        )
        .expect("node")
    };
    let (hq, full, edge) = (make("hq"), make("full"), make("edge"));
    let scope = concord::scope::Scope::parse("customers:region=edge").expect("scope");
    let signed = concord::scope::Authority::open(&ca)
        .expect("authority")
        .grant(edge.id(), vec![scope.clone()], vec![scope], 1)
        .expect("grant")
        .to_bytes();
    let grant = || {
        for node in [&hq, &full, &edge] {
            node.add_signed(&signed).expect("grant verifies");
        }
    };
    if granted_first {
        grant();
    }
    let ids: Vec<RecordId> = (0..records).map(id).collect();
    let writes: Vec<RecordWrite> = (0..records).map(regional_record).collect();
    for (ids, writes) in ids.chunks(BATCH).zip(writes.chunks(BATCH)) {
        hq.put_many(ids.iter().zip(writes.iter())).expect("load");
    }
    // Entries logged before the grant named `region` get its values once, as `concord run`
    // does in the background after reading the grant.
    let mut retag_time = None;
    if !granted_first {
        grant();
        let start = Instant::now();
        hq.retag_all().expect("retag");
        retag_time = Some(start.elapsed());
    }
    fn side<'a>(node: &'a Node, cluster: [u8; 16], name: &str) -> Side<'a> {
        Side {
            id: node.id(),
            driver: Driver::new(
                Engine::new(Config::new(cluster, node.id(), name)),
                node.documents(),
            ),
            docs: node.documents(),
        }
    }
    let expected_edge = records.div_ceil(EDGE_EVERY) as u64;
    let mut figures = Vec::new();
    for (round, (replica, name)) in [(&full, "full"), (&edge, "edge")].into_iter().enumerate() {
        let mut sides = [side(&hq, cluster, "hq"), side(replica, cluster, name)];
        let start = Instant::now();
        let connect = connect_inputs(&sides);
        let first_bytes = pump(&mut sides, Duration::ZERO, connect);
        let first_time = start.elapsed();
        disconnect(&mut sides);
        // One in a hundred of them is the edge's (`i * 100` for `i` a multiple of 100).
        let changed: Vec<usize> = (0..records / 100).map(|i| i * 100 + i % 100).collect();
        let ids: Vec<RecordId> = changed.iter().map(|n| id(*n)).collect();
        let writes: Vec<RecordWrite> = changed
            .iter()
            .map(|n| RecordWrite {
                set: vec![("balance".to_owned(), json!((round + 1) * 1_000_000 + n))],
                ..RecordWrite::default()
            })
            .collect();
        hq.put_many(ids.iter().zip(writes.iter())).expect("updates");
        let start = Instant::now();
        let connect = connect_inputs(&sides);
        let catch_up_bytes = pump(&mut sides, Duration::from_secs(20), connect);
        let catch_up_time = start.elapsed();
        figures.push((name, first_time, first_bytes, catch_up_time, catch_up_bytes));
    }
    let customers = concord::record::Collection::new("customers").expect("collection");
    assert_eq!(
        full.count_live_records().expect("count"),
        hq.count_live_records().expect("count"),
        "the full replica holds every record"
    );
    let mut after = None;
    let mut held = 0u64;
    loop {
        let page = edge.list(&customers, after.as_ref(), 1000).expect("list");
        for (key, fields) in &page.records {
            assert_eq!(
                fields.get("region"),
                Some(&json!("edge")),
                "the edge holds {key} outside its grant"
            );
            held += 1;
        }
        match page.last_seen {
            Some(last) => after = Some(last),
            None => break,
        }
    }
    assert_eq!(
        held, expected_edge,
        "the edge holds every record of its grant"
    );

    let (_, full_first_time, full_first_bytes, full_catch_time, full_catch_bytes) = figures[0];
    let (_, edge_first_time, edge_first_bytes, edge_catch_time, edge_catch_bytes) = figures[1];
    let ratio = |part: f64, whole: f64| 100.0 * part / whole;
    let when = if granted_first {
        "granted before hq wrote them"
    } else {
        "granted after hq wrote them"
    };
    println!("\n## Partial replica, {records} records, the edge {when}: {expected_edge} of them (engine level)");
    if let Some(took) = retag_time {
        println!(
            "(hq first gave its log's entries the values of the field the grant filters on, once, in {:.2} s)",
            took.as_secs_f64()
        );
    }
    println!("| measure | full replica (no grant) | edge (1% granted) | edge / full |");
    println!("|---|---|---|---|");
    println!(
        "| first replication to an empty store | {:.2} s, {:.2} MB | {:.3} s, {:.3} MB | {:.2}% of the time, {:.2}% of the bytes |",
        full_first_time.as_secs_f64(),
        mb(full_first_bytes),
        edge_first_time.as_secs_f64(),
        mb(edge_first_bytes),
        ratio(edge_first_time.as_secs_f64(), full_first_time.as_secs_f64()),
        ratio(edge_first_bytes as f64, full_first_bytes as f64),
    );
    println!(
        "| catch-up after {} records changed | {:.1} ms, {:.1} KB | {:.1} ms, {:.1} KB | {:.2}% of the time, {:.2}% of the bytes |",
        records / 100,
        full_catch_time.as_secs_f64() * 1000.0,
        full_catch_bytes as f64 / 1000.0,
        edge_catch_time.as_secs_f64() * 1000.0,
        edge_catch_bytes as f64 / 1000.0,
        ratio(edge_catch_time.as_secs_f64(), full_catch_time.as_secs_f64()),
        ratio(edge_catch_bytes as f64, full_catch_bytes as f64),
    );
}

fn network_level(records: usize, rate: usize, seconds: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let temp = tempfile::tempdir().expect("temp dir");
        let ca = temp.path().join("ca");
        concord::net::tls::create_ca(&ca).expect("ca");
        let port = || -> String {
            let port = concord::net::free_loopback_port().expect("a free port");
            format!("127.0.0.1:{port}")
        };
        let (listen_a, listen_b) = (port(), port());
        let make = |dir: &Path, name: &str, listen: &str, peers: Vec<String>| {
            Node::create(dir, &InitOptions { name: Some(name.into()), ca: Some(ca.clone()), listen: Some(listen.to_owned()), api: Some(port()), peers, engine: engine() }).expect("node")
        };
        let node_a = Arc::new(make(&temp.path().join("a"), "a", &listen_a, vec![]));
        load(&node_a, 0..records);
        let node_b = Arc::new(make(&temp.path().join("b"), "b", &listen_b, vec![listen_a.clone()]));
        let running_a = concord::node::runtime::start(node_a.clone()).await.expect("start a");
        let start = Instant::now();
        let running_b = concord::node::runtime::start(node_b.clone()).await.expect("start b");
        let a_id = node_a.writer();
        let target = node_a.documents().origin_mark(&a_id);
        loop {
            let mark = node_b.documents().origin_mark(&a_id);
            if mark >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let apply_time = start.elapsed();

        // Write-to-visible latency at a steady rate: A writes, B reports each applied change.
        let mut applied = running_b.applied();
        let total = rate * seconds;
        let running_a = Arc::new(running_a);
        let writer = running_a.clone();
        let sent_at = std::thread::spawn(move || {
            let mut sent = Vec::with_capacity(total);
            paced(total, rate, |n| {
                let write = RecordWrite { set: vec![("n".to_owned(), json!(n))], ..RecordWrite::default() };
                let started = Instant::now();
                writer.put(&RecordId::parse(&format!("latency/{n}")).expect("id"), &write).expect("write");
                sent.push(started);
            });
            sent
        });
        let mut seen = vec![None; total];
        let mut received = 0;
        let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 30);
        while received < total && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), applied.recv()).await {
                Ok(Ok(notice)) => {
                    if let Some(n) = std::str::from_utf8(&notice.doc_key).ok().and_then(|k| k.strip_prefix("latency/")).and_then(|n| n.parse::<usize>().ok()) {
                        if n < total && seen[n].is_none() {
                            seen[n] = Some(notice.at);
                            received += 1;
                        }
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                _ => {}
            }
        }
        let sent = sent_at.join().expect("writer");
        let mut latencies: Vec<f64> = sent
            .iter()
            .zip(seen.iter())
            .filter_map(|(sent, seen)| seen.map(|seen| seen.duration_since(*sent).as_secs_f64() * 1000.0))
            .collect();
        latencies.sort_by(f64::total_cmp);
        let percentile = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);

        // Baseline: the same durable writes on a node with no peer (the cost of the write alone).
        let lone = Node::create(&temp.path().join("lone"), &InitOptions { name: Some("lone".into()), engine: engine(), ..InitOptions::default() }).expect("lone");
        let mut lone_latencies = Vec::with_capacity(total.min(2000));
        for n in 0..total.min(2000) {
            let write = RecordWrite { set: vec![("n".to_owned(), json!(n))], ..RecordWrite::default() };
            let started = Instant::now();
            lone.put(&RecordId::parse(&format!("latency/{n}")).expect("id"), &write).expect("write");
            lone_latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        lone_latencies.sort_by(f64::total_cmp);

        println!("\n## Network level: two nodes, QUIC with mutual TLS on loopback");
        println!("| measure | figure |");
        println!("|---|---|");
        println!("| changes one peer applies from another (catch-up of {records} records) | {:.0} changes/s ({:.2} s) |", records as f64 / apply_time.as_secs_f64(), apply_time.as_secs_f64());
        println!("| write -> visible on the peer at {rate}/s, {} of {total} seen | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |", latencies.len(), percentile(0.50), percentile(0.99), latencies.last().copied().unwrap_or(f64::NAN));
        println!("| baseline: the same durable write on a node with no peer | p50 {:.2} ms, p99 {:.2} ms |", lone_latencies[lone_latencies.len() / 2], lone_latencies[(lone_latencies.len() * 99) / 100]);
        let api = node_a.config().network.api.clone();
        tokio::task::spawn_blocking(move || large_beside_small(&api, seconds))
            .await
            .expect("large writes");
        let running_a = Arc::try_unwrap(running_a).ok().expect("writer done");
        running_b.stop().await.expect("stop b");
        running_a.stop().await.expect("stop a");
    });
}

/// One record updated `changes` times reaching a fresh peer over QUIC, beside the same number
/// of changes spread over as many records.
fn long_history(changes: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let one = runtime.block_on(first_replication(changes, true));
    let spread = runtime.block_on(first_replication(changes, false));
    println!("\n## Long history: {changes} changes to a fresh peer over QUIC");
    println!("| workload | time until the peer holds every change |");
    println!("|---|---|");
    println!(
        "| one record updated {changes} times | {:.2} s |",
        one.as_secs_f64()
    );
    println!(
        "| baseline: {changes} records written once each | {:.2} s |",
        spread.as_secs_f64()
    );
}

/// Writes `changes` changes on a node (to one record, or one each to distinct records), then
/// starts it and a fresh peer and times until the peer holds them all.
async fn first_replication(changes: usize, one_record: bool) -> Duration {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).expect("ca");
    let port = || -> String {
        let port = concord::net::free_loopback_port().expect("a free port");
        format!("127.0.0.1:{port}")
    };
    let listen_a = port();
    let make = |dir: &Path, name: &str, listen: String, peers: Vec<String>| {
        Node::create(
            dir,
            &InitOptions {
                name: Some(name.into()),
                ca: Some(ca.clone()),
                listen: Some(listen),
                api: Some(port()),
                peers,
                engine: None,
            },
        )
        .expect("node")
    };
    let node_a = Arc::new(make(&temp.path().join("a"), "a", listen_a.clone(), vec![]));
    let ids: Vec<RecordId> = (0..changes)
        .map(|n| {
            if one_record {
                RecordId::parse("stock/hot").expect("id")
            } else {
                RecordId::parse(&format!("stock/{n}")).expect("id")
            }
        })
        .collect();
    let writes: Vec<RecordWrite> = (0..changes)
        .map(|n| RecordWrite {
            set: vec![("level".to_owned(), json!(n))],
            ..RecordWrite::default()
        })
        .collect();
    for (ids, writes) in ids.chunks(BATCH).zip(writes.chunks(BATCH)) {
        node_a
            .put_many(ids.iter().zip(writes.iter()))
            .expect("write");
    }
    let node_b = Arc::new(make(&temp.path().join("b"), "b", port(), vec![listen_a]));
    let running_a = concord::node::runtime::start(node_a.clone())
        .await
        .expect("start a");
    let start = Instant::now();
    let running_b = concord::node::runtime::start(node_b.clone())
        .await
        .expect("start b");
    let a_id = node_a.writer();
    let target = node_a.documents().origin_mark(&a_id);
    while node_b.documents().origin_mark(&a_id) < target {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the peer never caught up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    if one_record {
        let fields = node_b
            .get(&RecordId::parse("stock/hot").expect("id"))
            .expect("read")
            .expect("present");
        assert_eq!(fields["level"], json!(changes - 1), "the latest value");
    }
    running_b.stop().await.expect("stop b");
    running_a.stop().await.expect("stop a");
    took
}

/// Latency of small writes through the API while large ones (text near the change limit, and
/// arrays of nearly the most values a write may hold) arrive four at a time, beside the same
/// small writes alone.
fn large_beside_small(api: &str, seconds: usize) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let small = |label: &str| -> Vec<f64> {
        let mut latencies = Vec::new();
        paced(100 * seconds, 100, |n| {
            let started = Instant::now();
            let response = agent
                .patch(format!("http://{api}/v1/records/small/{label}-{n}"))
                .send_json(json!({"n": n}))
                .expect("small write");
            assert_eq!(response.status(), 200);
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        });
        latencies.sort_by(f64::total_cmp);
        latencies
    };
    let alone = small("alone");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let large_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let text = "t".repeat(concord::record::document::CHANGE_BYTES_MAX - 64 * 1024);
    let array: Vec<usize> = (0..concord::record::document::VALUES_PER_WRITE_MAX - 100).collect();
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (api, stop, done) = (api.to_owned(), stop.clone(), large_done.clone());
            let body = if writer % 2 == 0 {
                json!({"blob": text.clone()})
            } else {
                json!({"items": array.clone()})
            };
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(120)))
                    .build()
                    .into();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    agent
                        .put(format!("http://{api}/v1/records/large/{writer}-{n}"))
                        .send_json(&body)
                        .expect("large write");
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    let beside = small("beside");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("large writer");
    }
    let at = |latencies: &[f64], p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
    };
    println!("\n## Small writes beside large ones (HTTP API, 100 small writes/s for {seconds} s)");
    println!("| small writes | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| beside 4 writers of large values ({} large writes done: {:.1} MB text or {}-item arrays) | {:.2} ms | {:.2} ms | {:.2} ms |",
        large_done.load(std::sync::atomic::Ordering::Relaxed),
        text.len() as f64 / 1e6,
        array.len(),
        at(&beside, 0.5),
        at(&beside, 0.99),
        beside.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| baseline: alone | {:.2} ms | {:.2} ms | {:.2} ms |",
        at(&alone, 0.5),
        at(&alone, 0.99),
        alone.last().copied().unwrap_or(f64::NAN)
    );
}
