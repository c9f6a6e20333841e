//! Helpers shared by the integration tests: run the real `concord` binary.

#![allow(dead_code)]

pub mod cluster;
pub mod tables;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn concord_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

/// Runs `concord --data DIR ARGS...`.
pub fn concord(data: &Path, args: &[&str]) -> Output {
    Command::new(concord_binary())
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("CONCORD_DATA")
        .output()
        .expect("the concord binary runs")
}

/// Runs `concord ARGS...` without a data dir.
pub fn concord_bare(args: &[&str]) -> Output {
    Command::new(concord_binary())
        .args(args)
        .env_remove("CONCORD_DATA")
        .output()
        .expect("the concord binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the command failed with exit `code` and said `text` on stderr.
pub fn refused(output: Output, code: i32, text: &str) {
    assert_eq!(output.status.code(), Some(code), "{}", stderr(&output));
    assert!(stderr(&output).contains(text), "{}", stderr(&output));
}

/// Asserts success and returns stdout.
pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "concord failed with {:?}: {}",
        output.status.code(),
        stderr(&output)
    );
    stdout(&output)
}

/// Makes a fresh data dir named `name` inside `parent`.
pub fn init_node(parent: &Path, name: &str) -> PathBuf {
    init_node_with(parent, name, &[])
}

/// The store engines, for tests that run on each.
pub const ENGINES: [&str; 2] = ["sled", "fjall"];

/// Makes a fresh data dir named `name` inside `parent`, its store on `engine`.
pub fn init_node_on(parent: &Path, name: &str, engine: &str) -> PathBuf {
    init_node_with(parent, name, &["--engine", engine])
}

/// `concord init PARENT/NAME --name NAME` with `more` arguments.
fn init_node_with(parent: &Path, name: &str, more: &[&str]) -> PathBuf {
    let dir = parent.join(name);
    let mut args = vec!["init", dir.to_str().unwrap(), "--name", name];
    args.extend_from_slice(more);
    ok(concord_bare(&args));
    dir
}
