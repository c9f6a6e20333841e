//! A record with a long history, read as a user reads it: `concord history --limit 1000` as
//! the first read of it after the node starts (it loads the record from the store) and again,
//! then the whole history against the running node (time to its first line, and to its end),
//! `audit --record`, and, while the whole history streams, GETs of another record through
//! the API (their worst and p99 times, beside the same GETs on an idle node, measured in the
//! same run as the baseline); last, a plain `get` as the first read after another start, for
//! what loading the record alone costs.
//!
//! ```sh
//! cargo bench --bench history -- [--changes 100000]
//! ```

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concord::node::Node;
use concord::record::{RecordId, RecordWrite};

const CONCORD: &str = env!("CARGO_BIN_EXE_concord");
/// Changes written per batch while the history is made.
const WRITE_BATCH: usize = 1000;

/// Writes `changes` one-field updates to `hot/1`, and one record `cold/1` beside it.
fn make_history(data: &Path, changes: usize) {
    let node = Node::open(data).expect("the node opens");
    let hot = RecordId::parse("hot/1").expect("an id");
    let cold = RecordId::parse("cold/1").expect("an id");
    let write = |n: usize| RecordWrite {
        set: vec![("n".to_owned(), serde_json::json!(n))],
        ..RecordWrite::default()
    };
    let begin = Instant::now();
    let writes: Vec<RecordWrite> = (0..changes).map(write).collect();
    for batch in writes.chunks(WRITE_BATCH) {
        node.put_many(batch.iter().map(|write| (&hot, write)))
            .expect("the batch is stored");
    }
    node.put(&cold, &write(0)).expect("stored");
    println!(
        "wrote {changes} changes to hot/1 in {:.1} s",
        begin.elapsed().as_secs_f64()
    );
}

/// Runs `concord history hot/1 ARGS`: the time to its first line, to its end, and its lines.
fn history(data: &Path, args: &[&str]) -> (Duration, Duration, usize) {
    let begin = Instant::now();
    let mut child = Command::new(CONCORD)
        .args([
            "--data",
            data.to_str().expect("a UTF-8 path"),
            "history",
            "hot/1",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("concord history runs");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first_line = lines.next().expect("one change at least").expect("a line");
    assert!(first_line.contains("\"hash\""), "{first_line}");
    let first = begin.elapsed();
    let count = 1 + lines.count();
    assert!(child.wait().expect("it ends").success());
    (first, begin.elapsed(), count)
}

/// Times of GETs of `cold/1` (ms, sorted), one after another until `until` says stop.
fn gets(api: &str, mut until: impl FnMut() -> bool) -> Vec<f64> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let url = format!("http://{api}/v1/records/cold/1");
    let mut times = Vec::new();
    while !until() {
        let begin = Instant::now();
        let response = agent.get(&url).call().expect("the GET answers");
        assert_eq!(response.status().as_u16(), 200);
        times.push(begin.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(5));
    }
    times.sort_by(f64::total_cmp);
    times
}

fn summary(times: &[f64]) -> String {
    let at = |fraction: f64| common::percentile(times, fraction);
    format!(
        "{} GETs: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        times.len(),
        at(0.5),
        at(0.99),
        times[times.len() - 1]
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let changes = common::flag(&args, "--changes", 100_000);
    let temp = tempfile::tempdir().expect("a temp dir");
    let data = temp.path().join("node");
    let ca = temp.path().join("ca");
    let api = format!("127.0.0.1:{}", common::free_port());
    let listen = format!("127.0.0.1:{}", common::free_port());
    common::concord(&["ca", "init", ca.to_str().expect("a UTF-8 path")]);
    common::concord(&[
        "init",
        data.to_str().expect("a UTF-8 path"),
        "--ca",
        ca.to_str().expect("a UTF-8 path"),
        "--api",
        &api,
        "--listen",
        &listen,
    ]);
    make_history(&data, changes);
    let child = start(&data, &api);
    // The first read of the record after a start loads it from the store: here, the first
    // page of its history, as the issue asks of it.
    let (first, whole, lines) = history(&data, &["--limit", "1000"]);
    println!(
        "concord history hot/1 --limit 1000, the first read after the node started (it loads \
         the record): first line after {:.0} ms, {lines} lines in {:.0} ms",
        first.as_secs_f64() * 1e3,
        whole.as_secs_f64() * 1e3
    );
    let (first, whole, lines) = history(&data, &["--limit", "1000"]);
    println!(
        "concord history hot/1 --limit 1000, again: first line after {:.0} ms, {lines} lines in {:.0} ms",
        first.as_secs_f64() * 1e3,
        whole.as_secs_f64() * 1e3
    );
    let idle = gets(&api, {
        let begin = Instant::now();
        move || begin.elapsed() > Duration::from_secs(2)
    });
    println!("baseline, an idle node: {}", summary(&idle));

    // The whole history streams in another thread while GETs of another record are timed.
    let streaming = std::thread::spawn({
        let data = data.clone();
        move || history(&data, &[])
    });
    let busy = gets(&api, || streaming.is_finished());
    let (first, whole, lines) = streaming.join().expect("the history thread ends");
    println!(
        "concord history hot/1 (all): first line after {:.0} ms, {lines} lines in {:.1} s",
        first.as_secs_f64() * 1e3,
        whole.as_secs_f64()
    );
    println!("meanwhile: {}", summary(&busy));

    let begin = Instant::now();
    let audit = common::concord(&[
        "--data",
        data.to_str().expect("a UTF-8 path"),
        "audit",
        "--record",
        "hot/1",
        "--limit",
        "1000",
    ]);
    println!(
        "concord audit --record hot/1 --limit 1000: {} lines in {:.1} s",
        String::from_utf8_lossy(&audit.stdout).lines().count(),
        begin.elapsed().as_secs_f64()
    );
    common::stop(child);

    // What loading the record alone costs: a plain read, first after another start.
    let child = start(&data, &api);
    let begin = Instant::now();
    common::concord(&[
        "--data",
        data.to_str().expect("a UTF-8 path"),
        "get",
        "hot/1",
    ]);
    println!(
        "concord get hot/1, the first read after another start (loading the record): {:.0} ms",
        begin.elapsed().as_secs_f64() * 1e3
    );
    common::stop(child);
}

/// Starts `concord run` on `data` and waits for its API at `api`.
fn start(data: &Path, api: &str) -> std::process::Child {
    let child = common::spawn(data);
    let begin = Instant::now();
    while ureq::get(format!("http://{api}/v1/status")).call().is_err() {
        assert!(begin.elapsed() < Duration::from_secs(30), "node not up");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}
