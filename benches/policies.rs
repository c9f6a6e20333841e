//! What resolving conflicts costs a read: records whose fields were written concurrently at two
//! sites, read under each policy, beside the baseline of reading them as Automerge resolves
//! them (no policy configured, the path every read took before policies).
//!
//! `cargo bench --bench policies -- [--records N] [--conflicts F] [--rounds R]`

/// The allocator the `concord` binary uses, so that these are the binary's figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::flag;

use std::time::{Duration, Instant};

use automerge::transaction::CommitOptions;
use automerge::Automerge;
use concord::config::{PolicyKind, PolicySection};
use concord::policy::{self, Policies};
use concord::record::document::{self, apply_write};
use concord::record::stamp::{next_clock, ChangeStamp};
use concord::record::{NodeId, RecordWrite};
use serde_json::{json, Value};

const COLLECTION: &str = "customers";
/// Fields of each record besides the conflicting ones.
const PLAIN_FIELDS: usize = 5;
const NOW_MS: u64 = 1_764_000_000_000;

/// The custom resolver measured: the value from the site whose name sorts first, ties by the
/// latest clock.
const FIRST_SITE: &str = r#"
fn better(challenger, holder) {
    challenger.site < holder.site || (challenger.site == holder.site && challenger.hlc > holder.hlc)
}
let best = default_index;
for i in 0..candidates.len() {
    if better(candidates[i], candidates[best]) { best = i }
}
best
"#;

fn write(doc: &mut Automerge, node: u8, source: &str, wall_ms: u64, set: Vec<(String, Value)>) {
    let clock = next_clock(doc, wall_ms);
    doc.set_actor(NodeId([node; 16]).actor(0));
    let stamp = ChangeStamp {
        hlc: clock.ms,
        lc: clock.counter,
        src: Some(source.to_owned()),
        site: Some(format!("site-{node}")),
        ..ChangeStamp::default()
    };
    let mut tx = doc.transaction();
    let write = RecordWrite {
        set,
        ..RecordWrite::default()
    };
    apply_write(&mut tx, &write).expect("a valid write");
    tx.commit_with(
        CommitOptions::default()
            .with_time((wall_ms / 1000) as i64)
            .with_message(stamp.to_message()),
    );
}

/// A record created at one site, then `conflicts` of its fields written at two sites
/// concurrently.
fn record(index: usize, conflicts: usize) -> Automerge {
    let mut doc = Automerge::new();
    let plain = (0..PLAIN_FIELDS)
        .map(|field| {
            (
                format!("field{field}"),
                json!(format!("value {index} {field}")),
            )
        })
        .collect();
    write(&mut doc, 1, "erp", NOW_MS, plain);
    let mut other = doc.fork();
    let conflicting = |site: &str| {
        (0..conflicts)
            .map(|field| (format!("field{field}"), json!(format!("{site} {index}"))))
            .collect()
    };
    write(&mut doc, 1, "erp", NOW_MS + 10, conflicting("erp site"));
    write(&mut other, 2, "crm", NOW_MS + 20, conflicting("crm"));
    doc.merge(&mut other).expect("forks of one document merge");
    doc
}

fn policies(policy: PolicyKind, order: &[&str], script: Option<&str>) -> Policies {
    Policies::from_config(&[PolicySection {
        collection: COLLECTION.to_owned(),
        field: None,
        policy,
        order: order.iter().map(|name| (*name).to_owned()).collect(),
        script: script.map(str::to_owned),
    }])
    .expect("the measured policies compile")
}

/// Reads every record once with `read`; returns the time it took.
fn pass(docs: &[Automerge], read: impl Fn(&Automerge) -> usize) -> Duration {
    let start = Instant::now();
    let fields: usize = docs.iter().map(read).sum();
    assert!(fields > 0);
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records = flag(&args, "--records", 10_000);
    let conflicts = flag(&args, "--conflicts", 2).min(PLAIN_FIELDS);
    let rounds = flag(&args, "--rounds", 3);
    let docs: Vec<Automerge> = (0..records).map(|index| record(index, conflicts)).collect();
    let lww = policies(PolicyKind::Lww, &[], None);
    assert_eq!(
        policy::conflicts(&docs[0], COLLECTION, &lww).len(),
        conflicts,
        "every record has its conflicts"
    );
    println!(
        "{records} records of {PLAIN_FIELDS} fields, {conflicts} of them in conflict between two sites; \
         each read {rounds} times"
    );
    let measured = [
        (
            "merge (configured, no resolving)",
            policies(PolicyKind::Merge, &[], None),
        ),
        ("lww", lww.clone()),
        (
            "priority",
            policies(PolicyKind::Priority, &["crm", "erp"], None),
        ),
        ("manual", policies(PolicyKind::Manual, &[], None)),
        (
            "custom (Rhai: first site by name)",
            policies(PolicyKind::Custom, &[], Some(FIRST_SITE)),
        ),
    ];
    // Rounds interleave the baseline and every policy, so that a change in the machine's
    // speed during the run weighs on all of them alike.
    let mut baseline_time = Duration::ZERO;
    let mut times = vec![Duration::ZERO; measured.len()];
    for _ in 0..rounds {
        baseline_time += pass(&docs, |doc| {
            document::read_at(doc, None).map_or(0, |fields| fields.len())
        });
        for ((_, policies), time) in measured.iter().zip(&mut times) {
            *time += pass(&docs, |doc| {
                policy::read(doc, None, COLLECTION, policies).map_or(0, |fields| fields.len())
            });
        }
    }
    let reads = (docs.len() * rounds) as f64;
    let baseline = reads / baseline_time.as_secs_f64();
    println!(
        "{:<44} {:>10.0} reads/s",
        "baseline: Automerge's choice, no policy", baseline
    );
    for ((name, _), time) in measured.iter().zip(times) {
        let rate = reads / time.as_secs_f64();
        let per_conflict_us = if conflicts == 0 {
            0.0
        } else {
            (1.0 / rate - 1.0 / baseline) * 1e6 / conflicts as f64
        };
        println!(
            "{name:<44} {rate:>10.0} reads/s  ({:.2}x the baseline's time; {per_conflict_us:.1} µs more per conflicting field)",
            baseline / rate
        );
    }
}
