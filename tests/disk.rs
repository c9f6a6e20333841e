//! A node on a small filesystem that fills up: writes fail with a clear error while it is full,
//! status shows the node degraded, nothing acknowledged is lost, and once space is freed writes
//! resume without a restart; a node started on a full disk serves reads.
//!
//! The test mounts a tmpfs of its own, which needs root (or CAP_SYS_ADMIN). Without it the test
//! says so and passes, unless CONCORD_REQUIRE_MOUNT=1 (as `.ci/run` sets).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::{eventually, TestNode};
use concord::store::Engine;
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(30);
/// The filesystem the node runs on: small enough to fill in a few seconds.
const FILESYSTEM_MIB: u64 = 24;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new(at: &Path) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={FILESYSTEM_MIB}m,mode=0700"))
            .arg("tmpfs")
            .arg(at)
            .status();
        match status {
            Ok(status) if status.success() => Some(Self(at.to_owned())),
            _ => None,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem under `dir` with `name` until it has no room left.
fn fill(dir: &Path, name: &str) {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join(name)).unwrap();
    let block = vec![0u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
}

/// `PATCH` of one record: its status.
fn patch(node: &TestNode, id: &str, fields: &Value) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    agent
        .patch(format!("http://{}/v1/records/{id}", node.api))
        .send_json(fields)
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_then_they_resume_without_a_restart_on_sled() {
    a_full_disk_refuses_writes_then_they_resume_without_a_restart(Engine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_then_they_resume_without_a_restart_on_fjall() {
    a_full_disk_refuses_writes_then_they_resume_without_a_restart(Engine::Fjall).await;
}

async fn a_full_disk_refuses_writes_then_they_resume_without_a_restart(engine: Engine) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("concord=info")
        .with_test_writer()
        .try_init();
    let temp = tempfile::tempdir().unwrap();
    let Some(mounted) = Mounted::new(&temp.path().join("small")) else {
        let required = std::env::var("CONCORD_REQUIRE_MOUNT").is_ok_and(|value| value == "1");
        assert!(
            !required,
            "CONCORD_REQUIRE_MOUNT=1 but a tmpfs could not be mounted"
        );
        eprintln!("SKIPPED: mounting a tmpfs needs root; the full-disk test did not run");
        return;
    };
    let small = mounted.0.clone();
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut a = TestNode::create_on(&small, "a", &ca, &[], Some(engine));
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    a.start().await;
    b.start().await;
    // Space someone else holds, freed later.
    std::fs::write(small.join("other"), vec![1u8; 6 * 1024 * 1024]).unwrap();
    // Write until the node refuses: 507, with what is wrong.
    // Values that do not compress (Automerge compresses what it saves).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |bytes: usize| {
        let mut text = String::with_capacity(bytes);
        while text.len() < bytes {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            text.push_str(&format!("{seed:016x}"));
        }
        text
    };
    // Until writes have been refused for a while: the node measures its disk four times a
    // second, and between two measurements it refuses what could run it dry.
    let mut acknowledged = Vec::new();
    let mut refused_since: Option<std::time::Instant> = None;
    for i in 0..2000 {
        let id = format!("t/r{i}");
        let value = json!({"pad": noise(100_000)});
        match patch(&a, &id, &value) {
            200 => {
                acknowledged.push(id);
                refused_since = None;
            }
            507 => {
                let since = *refused_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(2) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("write {i}: HTTP {other}"),
        }
    }
    assert!(refused_since.is_some(), "the disk never filled");
    assert!(acknowledged.len() > 10, "{} written", acknowledged.len());
    eventually("a shows degraded", WITHIN, || {
        a.status().unwrap()["degraded"].is_string() && a.metric("concord_degraded") == 1
    })
    .await;
    // Reads go on, and a refused write stays refused while the disk is full.
    assert!(a.get(&acknowledged[0]).is_some());
    assert_eq!(patch(&a, "t/while-full", &json!({"n": 1})), 507);
    // Space is freed: writes resume by themselves.
    std::fs::remove_file(small.join("other")).unwrap();
    eventually("writes resume", WITHIN, || {
        let status = patch(&a, "t/after-free", &json!({"n": 1}));
        if status != 200 {
            eprintln!("{status}: {:?}", a.status().map(|s| s["degraded"].clone()));
        }
        status == 200
    })
    .await;
    assert!(a.status().unwrap()["degraded"].is_null());
    // Full again, and the node restarts on the full disk: it opens, and serves reads.
    a.stop().await;
    fill(&small, "filler");
    a.start().await;
    for id in acknowledged
        .iter()
        .chain(["t/after-free".to_owned()].iter())
    {
        assert!(a.get(id).is_some(), "{id} after the restart on a full disk");
    }
    assert_eq!(patch(&a, "t/full-again", &json!({"n": 1})), 507);
    std::fs::remove_file(small.join("filler")).unwrap();
    eventually("writes resume after the restart", WITHIN, || {
        let status = patch(&a, "t/after-restart", &json!({"n": 2}));
        if status != 200 {
            eprintln!("{status}: {:?}", a.status().map(|s| s["degraded"].clone()));
        }
        status == 200
    })
    .await;
    // Nothing acknowledged was lost anywhere.
    for node in [&a, &b] {
        eventually(
            &format!("every acknowledged write on {}", node.name),
            WITHIN,
            || {
                acknowledged.iter().all(|id| node.get(id).is_some())
                    && node.get("t/after-free").is_some()
                    && node.get("t/after-restart").is_some()
            },
        )
        .await;
    }
    a.stop().await;
    b.stop().await;
    drop(mounted);
}
