//! What the benches share.

// Each bench compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs the release `concord` with `args` (no `CONCORD_DATA` from the caller's shell), and
/// stops the bench with its stderr if it fails.
pub fn concord(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .env_remove("CONCORD_DATA")
        .output()
        .expect("concord runs");
    assert!(
        output.status.success(),
        "concord {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The number after `name` on the command line, or `default`.
pub fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1))
        .map_or(default, |text| text.parse().expect("a number"))
}

/// Calls `each(n)` for `n` in `0..total`, starting call `n` no sooner than `n / rate` seconds
/// after the first: a steady load whose schedule does not drift when one call runs late.
pub fn paced(total: usize, rate: usize, mut each: impl FnMut(usize)) {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let begin = Instant::now();
    for n in 0..total {
        let due = begin + interval * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        each(n);
    }
}

/// A memory figure of a process from `/proc/PROCESS/status` (`PROCESS` a pid or `self`), in
/// MiB: `field` is `VmRSS` (now) or `VmHWM` (peak). 0 where it cannot be read.
pub fn memory_mib(process: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A free loopback port.
pub fn free_port() -> u16 {
    concord::net::free_loopback_port().expect("a free port")
}

/// Starts `concord --data DATA run` (the release binary), its warnings logged to `DATA/node.log`.
pub fn spawn(data: &std::path::Path) -> std::process::Child {
    // The node's log goes beside its data (warnings and up), read while the bench runs.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("node.log"))
        .expect("the node's log file opens");
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["--data", data.to_str().expect("a UTF-8 path"), "run"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("concord run starts")
}

/// Stops a node started by [`spawn`] as Ctrl-C would, and waits for it.
pub fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The value at `fraction` (0 to 1) of `sorted`, which is not empty.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}
