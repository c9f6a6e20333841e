//! A grant that narrows a node holding every record, as a user meets it: two `concord run`
//! processes, `a` and `b`, with `--records` records that `b` replicated in full; then
//! `concord grant b --read gw --read c --write gw:region=paris` at `a`. While `b` takes out
//! every record the grant no longer lets it read, `a` writes 1,000 records to `gw` at 100 a
//! second: the time each takes to be readable at `b` (p50, p99, max), beside the same writes
//! before the grant as the baseline, measured in the same run; and `b`'s CPU each second until
//! it is idle again.
//!
//! ```sh
//! cargo bench --bench narrowing -- [--records 100000] [--writes 1000]
//! ```
//!
//! With `CONCORD_BENCH_LOGS=DIR` set, the nodes' logs are kept in `DIR` as `a.log` and
//! `b.log`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use concord::node::Node;
use concord::record::{RecordId, RecordWrite};
use serde_json::{json, Value};

const CONCORD: &str = env!("CARGO_BIN_EXE_concord");
/// Writes a second while latencies are measured.
const WRITE_RATE: usize = 100;
/// A node at or under this share of a core (over what the writes cost it, while they go on)
/// counts as idle.
const IDLE_CPU_PERCENT: f64 = 5.0;
/// How long after the grant `b`'s CPU is watched at most.
const WATCH_SECONDS_MAX: u64 = 600;

struct Site {
    dir: PathBuf,
    api: String,
    child: Option<Child>,
}

impl Site {
    fn start(&mut self) {
        // With CONCORD_BENCH_LOGS=DIR, each node's log is kept there as NAME.log.
        let log = match std::env::var_os("CONCORD_BENCH_LOGS") {
            Some(dir) => {
                let name = self.dir.file_name().expect("a node dir");
                let path = Path::new(&dir).join(name).with_extension("log");
                Stdio::from(std::fs::File::create(path).expect("the log file"))
            }
            None => Stdio::null(),
        };
        let child = Command::new(CONCORD)
            .args(["--data", self.dir.to_str().expect("a UTF-8 path"), "run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("concord run starts");
        self.child = Some(child);
        let begin = Instant::now();
        while self.status().is_none() {
            assert!(begin.elapsed() < Duration::from_secs(30), "node not up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn status(&self) -> Option<Value> {
        ureq::get(format!("http://{}/v1/status", self.api))
            .call()
            .ok()?
            .body_mut()
            .read_json()
            .ok()
    }

    /// Writes a record as a client that honours pushback does: a 503 is tried again after
    /// the time it names. Returns how many times the write was pushed back.
    fn put(&self, id: &str, fields: &Value) -> u32 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut pushed_back = 0;
        loop {
            let response = agent
                .put(format!("http://{}/v1/records/{id}", self.api))
                .send_json(fields)
                .expect("the write answers");
            match response.status().as_u16() {
                200 => return pushed_back,
                503 => {
                    pushed_back += 1;
                    let wait = response
                        .headers()
                        .get("retry-after")
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.parse::<u64>().ok())
                        .unwrap_or(1);
                    std::thread::sleep(Duration::from_secs(wait));
                }
                status => panic!("the write of {id} answered {status}"),
            }
        }
    }

    fn has(&self, id: &str) -> bool {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .get(format!("http://{}/v1/records/{id}", self.api))
            .call()
            .is_ok_and(|response| response.status().as_u16() == 200)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

fn site(parent: &Path, name: &str, ca: &Path, peer: Option<&str>) -> (Site, String) {
    let dir = parent.join(name);
    let api = format!("127.0.0.1:{}", common::free_port());
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut args = vec![
        "init",
        dir.to_str().expect("a UTF-8 path"),
        "--name",
        name,
        "--ca",
        ca.to_str().expect("a UTF-8 path"),
        "--api",
        &api,
        "--listen",
        &listen,
    ];
    if let Some(peer) = peer {
        args.extend(["--peer", peer]);
    }
    common::concord(&args);
    (
        Site {
            dir,
            api,
            child: None,
        },
        listen,
    )
}

/// Writes `records` records to `other`, and 100 each to `gw` and `c`, before `a` runs.
fn load(dir: &Path, records: usize) {
    let node = Node::open(dir).expect("the node opens");
    let mut writes = Vec::new();
    for n in 0..records {
        writes.push((
            format!("other/{n}"),
            json!({"n": n, "name": format!("record {n}")}),
        ));
    }
    for n in 0..100 {
        writes.push((format!("gw/{n}"), json!({"region": "paris", "n": n})));
        writes.push((format!("c/{n}"), json!({"n": n})));
    }
    for batch in writes.chunks(1000) {
        let parsed: Vec<(RecordId, RecordWrite)> = batch
            .iter()
            .map(|(id, fields)| {
                let fields = fields.as_object().expect("an object").clone();
                (
                    RecordId::parse(id).expect("an id"),
                    RecordWrite::replace_with(fields),
                )
            })
            .collect();
        node.put_many(parsed.iter().map(|(id, write)| (id, write)))
            .expect("stored");
    }
}

/// CPU seconds (user and system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Writes `writes` records `gw/{prefix}-N` at `a` at a steady rate; the time each took to be
/// readable at `b`, in ms, sorted.
fn visibility(a: &Site, b: &Site, prefix: &str, writes: usize) -> Vec<f64> {
    let written: std::sync::Arc<std::sync::Mutex<Vec<Instant>>> = Default::default();
    let watcher = std::thread::spawn({
        let written = written.clone();
        let api = b.api.clone();
        let prefix = prefix.to_owned();
        move || {
            let b = Site {
                dir: PathBuf::new(),
                api,
                child: None,
            };
            let mut latencies = Vec::with_capacity(writes);
            for n in 0..writes {
                let id = format!("gw/{prefix}-{n}");
                let begin = Instant::now();
                loop {
                    let at = written.lock().expect("not poisoned").get(n).copied();
                    if let Some(at) = at {
                        if b.has(&id) {
                            latencies.push(at.elapsed().as_secs_f64() * 1e3);
                            break;
                        }
                    }
                    assert!(
                        begin.elapsed() < Duration::from_secs(300),
                        "{id} never reached b"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            latencies
        }
    });
    let mut pushed_back = 0;
    common::paced(writes, WRITE_RATE, |n| {
        // Timed from the first try: a write pushed back waits as long as its client does.
        let first_try = Instant::now();
        pushed_back += a.put(
            &format!("gw/{prefix}-{n}"),
            &json!({"region": "paris", "n": n}),
        );
        written.lock().expect("not poisoned").push(first_try);
    });
    if pushed_back > 0 {
        println!("  ({pushed_back} writes pushed back with 503 and tried again)");
    }
    let mut latencies = watcher.join().expect("the watcher ends");
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn summary(latencies: &[f64]) -> String {
    let at = |fraction: f64| common::percentile(latencies, fraction);
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    )
}

fn records_at(site: &Site) -> u64 {
    site.status()
        .and_then(|status| status["records"].as_u64())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records = common::flag(&args, "--records", 100_000);
    let writes = common::flag(&args, "--writes", 1000);
    let temp = tempfile::tempdir().expect("a temp dir");
    let ca = temp.path().join("ca");
    common::concord(&["ca", "init", ca.to_str().expect("a UTF-8 path")]);
    let (mut a, a_listen) = site(temp.path(), "a", &ca, None);
    let (mut b, _) = site(temp.path(), "b", &ca, Some(&a_listen));
    load(&a.dir, records);
    a.start();
    b.start();
    let total = records as u64 + 200;
    let begin = Instant::now();
    while records_at(&b) < total {
        assert!(
            begin.elapsed() < Duration::from_secs(600),
            "b never caught up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "b holds all {total} records after {:.1} s",
        begin.elapsed().as_secs_f64()
    );

    let cpu_before = cpu_seconds(b.pid());
    let writing_since = Instant::now();
    let before = visibility(&a, &b, "before", writes);
    // What b spends on the writes alone: idle, after the grant, is back to this (the writes go
    // on while it is narrowed).
    let writing_percent =
        (cpu_seconds(b.pid()) - cpu_before) * 100.0 / writing_since.elapsed().as_secs_f64();
    let idle_percent = writing_percent + IDLE_CPU_PERCENT;
    println!("b at {writing_percent:.1}% CPU while it takes the writes: idle is under {idle_percent:.1}%");
    println!(
        "baseline, {writes} writes at a before the grant: {}",
        summary(&before)
    );

    let a_dir = a.dir.to_str().expect("a UTF-8 path").to_owned();
    let ca_dir = ca.to_str().expect("a UTF-8 path").to_owned();
    common::concord(&[
        "--data",
        &a_dir,
        "grant",
        "b",
        "--ca",
        &ca_dir,
        "--read",
        "gw",
        "--read",
        "c",
        "--write",
        "gw:region=paris",
    ]);
    let granted = Instant::now();
    let watch = std::thread::spawn({
        let pid = b.pid();
        let a_pid = a.pid();
        let api = b.api.clone();
        let a_api = a.api.clone();
        move || {
            let b = Site {
                dir: PathBuf::new(),
                api,
                child: None,
            };
            let a = Site {
                dir: PathBuf::new(),
                api: a_api,
                child: None,
            };
            // How a's status shows b: repairing (caught up or narrowed), or keeping up.
            let shown = || {
                let peers = a.status().map(|status| status["peers"].clone());
                peers
                    .and_then(|peers| peers.as_array().and_then(|peers| peers.first().cloned()))
                    .map_or("not connected".to_owned(), |peer| {
                        if peer["repairing"] == json!(true) {
                            "repairing".to_owned()
                        } else if peer["keeping_up"] == json!(true) {
                            "keeping up".to_owned()
                        } else {
                            "behind".to_owned()
                        }
                    })
            };
            let mut last = cpu_seconds(pid);
            let mut a_last = cpu_seconds(a_pid);
            let mut idle_since: Option<u64> = None;
            for second in 1..=WATCH_SECONDS_MAX {
                std::thread::sleep(Duration::from_secs(1));
                let now = cpu_seconds(pid);
                let percent = (now - last) * 100.0;
                last = now;
                let a_now = cpu_seconds(a_pid);
                let a_percent = (a_now - a_last) * 100.0;
                a_last = a_now;
                println!(
                    "  {second:>3} s after the grant: b at {percent:5.1}% CPU (a {a_percent:5.1}%), holding {} records; a shows b {}",
                    records_at(&b),
                    shown()
                );
                let idle = if second <= writes as u64 / WRITE_RATE as u64 {
                    idle_percent
                } else {
                    IDLE_CPU_PERCENT
                };
                if percent <= idle {
                    if idle_since.is_none() {
                        idle_since = Some(second);
                    }
                    if second - idle_since.unwrap_or(second) >= 5 {
                        return idle_since;
                    }
                } else {
                    idle_since = None;
                }
            }
            None
        }
    });
    let after = visibility(&a, &b, "after", writes);
    println!(
        "{writes} writes at a just after the grant: {}",
        summary(&after)
    );
    match watch.join().expect("the watch ends") {
        Some(second) => println!(
            "b idle (at most {IDLE_CPU_PERCENT} points over what the writes cost it) {second} s after the grant ({:.0} s of watching)",
            granted.elapsed().as_secs_f64()
        ),
        None => println!("b still busy {WATCH_SECONDS_MAX} s after the grant"),
    }
    println!("b holds {} records at the end", records_at(&b));
    for (name, site) in [("a", &a), ("b", &b)] {
        let engine = site.status().map(|status| status["engine"].clone());
        let figure = |field: &str| {
            engine
                .as_ref()
                .map_or(Value::Null, |engine| engine[field].clone())
        };
        println!(
            "{name}: documents repaired {}, withdrawn {}, requests dropped (outbox full) {}",
            figure("repair_documents"),
            figure("withdrawn_documents"),
            figure("requests_dropped")
        );
    }
}
