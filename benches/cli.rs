//! The command line against a running node, as a user times it: `concord get` (one process
//! each, median and p90 of many), beside the API answering the same read in-process as the
//! baseline measured in the same run; then `concord load` of many records into a stopped
//! node (its store opened directly) and into the same node running (batches through
//! `POST /v1/batch`), with the ratio of the two speeds.
//!
//! ```sh
//! cargo bench --bench cli -- [--gets 50] [--records 100000]
//! ```

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const CONCORD: &str = env!("CARGO_BIN_EXE_concord");

fn concord(data: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--data", data.to_str().expect("a UTF-8 path")];
    all.extend_from_slice(args);
    common::concord(&all)
}

fn wait_serving(data: &Path) {
    let begin = Instant::now();
    while !Command::new(CONCORD)
        .args(["--data", data.to_str().expect("a UTF-8 path"), "status"])
        .output()
        .is_ok_and(|output| output.status.success())
    {
        assert!(begin.elapsed() < Duration::from_secs(30), "node not up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lines(path: &Path, records: usize, prefix: &str) {
    let mut text = String::with_capacity(records * 64);
    for i in 0..records {
        text.push_str(&format!(
            "{{\"id\":\"{prefix}{i}\",\"name\":\"customer {i}\",\"credit\":{i}}}\n"
        ));
    }
    std::fs::write(path, text).expect("the lines file is written");
}

fn load_seconds(data: &Path, file: &Path) -> f64 {
    let begin = Instant::now();
    concord(
        data,
        &[
            "load",
            "customers",
            file.to_str().expect("a UTF-8 path"),
            "--key-field",
            "id",
        ],
    );
    begin.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gets = common::flag(&args, "--gets", 50);
    let records = common::flag(&args, "--records", 100_000);
    let temp = tempfile::tempdir().expect("a temp dir");
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).expect("a CA");
    let data = temp.path().join("node");
    let api = format!("127.0.0.1:{}", common::free_port());
    common::concord(&[
        "init",
        data.to_str().expect("a UTF-8 path"),
        "--name",
        "bench",
        "--ca",
        ca.to_str().expect("a UTF-8 path"),
        "--listen",
        &format!("127.0.0.1:{}", common::free_port()),
        "--api",
        &api,
    ]);

    // Load into the stopped node: the store opened directly.
    let offline_file = temp.path().join("offline.jsonl");
    let online_file = temp.path().join("online.jsonl");
    lines(&offline_file, records, "off");
    lines(&online_file, records, "on");
    let offline = load_seconds(&data, &offline_file);

    let node = common::spawn(&data);
    wait_serving(&data);
    // Load into the running node: batches through its API.
    let online = load_seconds(&data, &online_file);

    // `concord get` against the running node, beside the API's own answer.
    concord(&data, &["put", "customers/timed", "name=Ada"]);
    let mut cli_ms = Vec::with_capacity(gets);
    for _ in 0..gets {
        let begin = Instant::now();
        concord(&data, &["get", "customers/timed"]);
        cli_ms.push(begin.elapsed().as_secs_f64() * 1000.0);
    }
    let agent = ureq::Agent::new_with_defaults();
    let url = format!("http://{api}/v1/records/customers/timed");
    let mut api_ms = Vec::with_capacity(gets);
    for _ in 0..gets {
        let begin = Instant::now();
        let mut response = agent.get(&url).call().expect("the API answers");
        let _ = response.body_mut().read_to_string();
        api_ms.push(begin.elapsed().as_secs_f64() * 1000.0);
    }
    common::stop(node);
    for sorted in [&mut cli_ms, &mut api_ms] {
        sorted.sort_by(f64::total_cmp);
    }
    println!("concord get against a running node, {gets} runs:");
    println!(
        "  the CLI (one process each): median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        common::percentile(&cli_ms, 0.5),
        common::percentile(&cli_ms, 0.9),
        common::percentile(&cli_ms, 1.0)
    );
    println!(
        "  baseline, the API in-process: median {:.2} ms, p90 {:.2} ms",
        common::percentile(&api_ms, 0.5),
        common::percentile(&api_ms, 0.9)
    );
    println!("concord load of {records} records:");
    println!(
        "  into the stopped node: {offline:.2} s ({:.0} records/s)",
        records as f64 / offline
    );
    println!(
        "  into the running node: {online:.2} s ({:.0} records/s)",
        records as f64 / online
    );
    println!(
        "  running / stopped speed: {:.0}%",
        100.0 * offline / online
    );
}
