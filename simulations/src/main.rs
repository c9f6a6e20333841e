//! `concord-sim`: run or sweep seeded simulations and print a summary.
//!
//! `cargo run -p concord-sim --release -- --seed 7 --nodes 5 --steps 200`
//! `cargo run -p concord-sim --release -- --seeds 0..1000 [--nodes-max 50] [--jobs 2]`

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use concord_sim::{run, Params, SimRng, Summary, Violation};

#[derive(Parser, Debug)]
#[command(
    name = "concord-sim",
    about = "Deterministic simulation of Concord nodes under faults"
)]
struct Args {
    /// One seed to run.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds to sweep, as A..B (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Sweep sizes: each seed draws its node count from --nodes to --nodes-max.
    #[arg(long)]
    nodes_max: Option<usize>,
    #[arg(long, default_value_t = 12)]
    records: usize,
    /// Writes and deletes in the safety phase.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    #[arg(long, default_value_t = 5)]
    latency_ms: u64,
    #[arg(long, default_value_t = 20)]
    jitter_ms: u64,
    #[arg(long, default_value_t = 2)]
    drop_percent: u64,
    #[arg(long, default_value_t = 2)]
    duplicate_percent: u64,
    #[arg(long, default_value_t = 4)]
    partition_percent: u64,
    #[arg(long, default_value_t = 2)]
    crash_percent: u64,
    /// Percent of crashes that lose the node's whole store (half of them restore its backup).
    #[arg(long, default_value_t = 25)]
    store_loss_percent: u64,
    /// Per mille of a node's workload steps that back its store up first.
    #[arg(long, default_value_t = 20)]
    backup_permille: u64,
    #[arg(long, default_value_t = 500)]
    skew_ms_max: u64,
    /// Percent of runs in which one node's clock runs --far-ahead-ms ahead of the others'.
    #[arg(long, default_value_t = 20)]
    far_ahead_percent: u64,
    #[arg(long, default_value_t = 10_000)]
    far_ahead_ms: u64,
    #[arg(long, default_value_t = 1)]
    edge_offices: usize,
    /// Bytes a connection's send queue holds before the engine waits for room.
    #[arg(long, default_value_t = 64 * 1024)]
    queue_bytes: usize,
    /// Percent of links that send at 2 MB/s instead of 50 MB/s.
    #[arg(long, default_value_t = 10)]
    slow_link_percent: u64,
    /// Per mille of writes that write a large value (up to the change limit; a tenth over it).
    #[arg(long, default_value_t = 4)]
    large_value_permille: u64,
    /// Per mille of steps that update one record up to --burst-writes-max times in a row.
    #[arg(long, default_value_t = 10)]
    burst_permille: u64,
    /// Percent of runs with grants (by region), a node modified to ignore its own grant, and
    /// its revocation.
    #[arg(long, default_value_t = 30)]
    scoped_percent: u64,
    /// Percent of granted nodes, in a scoped run, whose grant narrows what they read too
    /// (partial replication); the others read every record.
    #[arg(long, default_value_t = 0)]
    partial_reads_percent: u64,
    #[arg(long, default_value_t = 600)]
    burst_writes_max: u64,
    /// Whether stores compact the histories every node holds (`store.compact_histories`;
    /// defaults as a node does).
    #[arg(long, default_value_t = Params::default().compact_histories, action = clap::ArgAction::Set)]
    compact_histories: bool,
    /// Print the run's trace as it happens, and what the engine and store log (filtered by
    /// `RUST_LOG`, warnings by default), to stderr: for replaying one seed.
    #[arg(long)]
    print_trace: bool,
    /// Runs in parallel (threads). Each run is deterministic on its own; the summary is the
    /// same whatever the number of jobs.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

/// Sweeps print a progress line to stderr after this many runs.
const PROGRESS_EVERY_RUNS: u64 = 100;
/// Threads a sweep may use.
const JOBS_MAX: usize = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_trace {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .without_time()
            .init();
    }
    let seeds = match (&args.seed, &args.seeds) {
        (Some(seed), _) => *seed..seed + 1,
        (None, Some(range)) => match parse_range(range) {
            Some(range) => range,
            None => {
                eprintln!("error: --seeds takes A..B, for example 0..1000");
                return ExitCode::from(1);
            }
        },
        (None, None) => 0..1,
    };
    let nodes_max = args.nodes_max.unwrap_or(args.nodes);
    let valid = args.nodes >= 2
        && nodes_max >= args.nodes
        && nodes_max <= concord_sim::NODES_MAX
        && args.records > 0
        && args.steps <= concord_sim::STEPS_MAX
        && args.edge_offices < args.nodes
        && args.crash_percent + args.partition_percent <= 100
        && args.far_ahead_percent <= 100
        && args.far_ahead_ms <= 3_600_000
        && args.store_loss_percent <= 100
        && args.backup_permille <= 1000
        && args.drop_percent <= 100
        && args.duplicate_percent <= 100
        && args.slow_link_percent <= 100
        && args.large_value_permille <= 1000
        && args.burst_permille <= 1000
        && args.scoped_percent <= 100
        && args.partial_reads_percent <= 100
        && args.burst_writes_max <= concord_sim::STEPS_MAX
        && args.queue_bytes > 0;
    if !valid {
        eprintln!(
            "error: need 2 <= --nodes <= --nodes-max <= {}, at least one record, at most {} steps (and burst writes), fewer edge offices than nodes, percents that add up to at most 100, per milles of at most 1000 and a queue of at least one byte",
            concord_sim::NODES_MAX,
            concord_sim::STEPS_MAX
        );
        return ExitCode::from(1);
    }
    if args.jobs == 0 || args.jobs > JOBS_MAX {
        eprintln!("error: --jobs takes 1..={JOBS_MAX}");
        return ExitCode::from(1);
    }
    let params_for = |seed: u64| {
        // The size of each run is drawn from the seed too, so a seed alone replays it.
        let nodes = if nodes_max > args.nodes {
            args.nodes + SimRng::new(seed ^ 0x5eed).index(nodes_max - args.nodes + 1)
        } else {
            args.nodes
        };
        Params {
            nodes,
            records: args.records,
            steps: args.steps,
            latency_ms: args.latency_ms,
            jitter_ms: args.jitter_ms,
            drop_percent: args.drop_percent,
            duplicate_percent: args.duplicate_percent,
            partition_percent: args.partition_percent,
            crash_percent: args.crash_percent,
            store_loss_percent: args.store_loss_percent,
            backup_permille: args.backup_permille,
            skew_ms_max: args.skew_ms_max,
            far_ahead_percent: args.far_ahead_percent,
            far_ahead_ms: args.far_ahead_ms,
            edge_offices: args.edge_offices.min(nodes - 1),
            queue_bytes: args.queue_bytes,
            slow_link_percent: args.slow_link_percent,
            large_value_permille: args.large_value_permille,
            burst_permille: args.burst_permille,
            burst_writes_max: args.burst_writes_max,
            scoped_percent: args.scoped_percent,
            partial_reads_percent: args.partial_reads_percent,
            compact_histories: args.compact_histories,
            print_trace: args.print_trace,
            ..Params::default()
        }
    };
    let start = Instant::now();
    let total = seeds.end - seeds.start;
    let next_seed = AtomicU64::new(seeds.start);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let outcomes: Mutex<Vec<(u64, Result<Summary, Violation>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.min(total as usize) {
            scope.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                if seed >= seeds.end {
                    return;
                }
                let outcome = run(seed, &params_for(seed));
                if outcome.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                outcomes
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((seed, outcome));
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if total > 1 && finished.is_multiple_of(PROGRESS_EVERY_RUNS) {
                    let minutes = start.elapsed().as_secs_f64() / 60.0;
                    eprintln!(
                        "{finished}/{total} runs, 0 violations, {:.0} runs per minute",
                        finished as f64 / minutes.max(1e-9)
                    );
                }
            });
        }
    });
    let mut outcomes = outcomes
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Aggregated in seed order, so the summary does not depend on which thread ran what.
    outcomes.sort_by_key(|(seed, _)| *seed);
    let mut runs = 0u64;
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut writes, mut deletes, mut messages, mut bytes, mut changes_sent, mut deliveries) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut conflicts = 0u64;
    let (mut large, mut refused, mut bursts, mut waits) = (0u64, 0u64, 0u64, 0u64);
    let (mut pushed, mut duplicates) = (0u64, 0u64);
    let (mut stores_lost, mut stores_restored, mut lost_with_store) = (0u64, 0u64, 0u64);
    let (mut far_ahead, mut ahead) = (0u64, 0u64);
    let mut withdrawn = 0u64;
    let (mut truncated, mut catch_ups, mut truncating_runs) = (0u64, 0u64, 0u64);
    let (mut compacted, mut compacting_runs) = (0u64, 0u64);
    let (mut scoped, mut scope_refused, mut forged, mut forged_refused, mut revoked) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut cut_off = 0u64;
    let mut converge_ms: Vec<u64> = Vec::new();
    let mut by_size: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    for (seed, outcome) in outcomes {
        let params = params_for(seed);
        let nodes = params.nodes;
        match outcome {
            Ok(summary) => {
                runs += 1;
                for (kind, count) in &summary.faults {
                    *faults.entry(kind).or_default() += count;
                }
                writes += summary.writes;
                deletes += summary.deletes;
                conflicts += summary.conflicts_at_end;
                large += summary.large_writes;
                refused += summary.refused_writes;
                bursts += summary.burst_writes;
                waits += summary.queue_full_waits;
                far_ahead += u64::from(summary.far_ahead);
                ahead += summary.changes_ahead;
                scoped += u64::from(summary.scoped);
                scope_refused += summary.scope_refused_writes;
                forged += summary.forged_writes;
                forged_refused += summary.forged_refused;
                withdrawn += summary.withdrawn_documents;
                truncated += summary.log_entries_truncated;
                catch_ups += summary.catch_ups;
                compacted += summary.documents_compacted;
                compacting_runs += u64::from(summary.documents_compacted > 0);
                truncating_runs += u64::from(summary.log_entries_truncated > 0);
                revoked += u64::from(summary.revoked);
                cut_off += summary.acknowledged_cut_off;
                stores_lost += summary.stores_lost;
                stores_restored += summary.stores_restored;
                lost_with_store += summary.lost_with_store;
                messages += summary.messages;
                bytes += summary.bytes;
                changes_sent += summary.changes_sent;
                pushed += summary.changes_pushed;
                duplicates += summary.duplicates_received;
                let needed = (summary.writes + summary.deletes) * (nodes as u64 - 1);
                deliveries += needed;
                let entry = by_size.entry(nodes).or_default();
                entry.0 += summary.changes_sent;
                entry.1 += needed;
                converge_ms.push(summary.converge_sim_ms);
                if args.seed.is_some() {
                    println!("trace hash {:016x}", summary.trace_hash);
                }
            }
            Err(violation) => {
                eprintln!("{violation}");
                eprintln!(
                    "replay: cargo run -p concord-sim --release -- --seed {} --nodes {} --records {} --steps {} --latency-ms {} --jitter-ms {} --drop-percent {} --duplicate-percent {} --partition-percent {} --crash-percent {} --store-loss-percent {} --backup-permille {} --skew-ms-max {} --far-ahead-percent {} --far-ahead-ms {} --edge-offices {} --queue-bytes {} --slow-link-percent {} --large-value-permille {} --burst-permille {} --burst-writes-max {} --scoped-percent {} --partial-reads-percent {} --compact-histories {}",
                    violation.seed, nodes, args.records, args.steps, args.latency_ms, args.jitter_ms, args.drop_percent, args.duplicate_percent, args.partition_percent, args.crash_percent, args.store_loss_percent, args.backup_permille, args.skew_ms_max, args.far_ahead_percent, args.far_ahead_ms, params.edge_offices, args.queue_bytes, args.slow_link_percent, args.large_value_permille, args.burst_permille, args.burst_writes_max, args.scoped_percent, args.partial_reads_percent, args.compact_histories
                );
                return ExitCode::from(1);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    converge_ms.sort_unstable();
    let percentile = |p: f64| {
        converge_ms
            .get(((converge_ms.len() as f64 * p) as usize).min(converge_ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{runs} runs passed, 0 violations, in {seconds:.1} s ({:.0} runs per minute)",
        runs as f64 * 60.0 / seconds.max(1e-9)
    );
    println!("workload: {writes} writes, {deletes} deletes, all acknowledged and all found on every node");
    println!("log entries truncated as every known node held them: {truncated} in {truncating_runs} runs; peers caught up by whole documents: {catch_ups}");
    println!("documents whose stable history was compacted: {compacted} in {compacting_runs} runs");
    println!("fields in conflict at the end: {conflicts}, each resolved alike on every node under lww, priority, custom and manual");
    println!("large values written: {large}; writes over the change limit refused (nothing stored): {refused}; writes in bursts to one record: {bursts}");
    println!("frames that waited for a full link: {waits}; every origin's log held as far on every node at the end");
    println!("runs with a node whose clock ran {} ms ahead: {far_ahead}; changes that waited for their receiver's clock: {ahead}", args.far_ahead_ms);
    println!("stores lost whole: {stores_lost} ({stores_restored} brought back from a backup), each back under a new writer; acknowledged writes no other node held yet (or only a revoked one), lost with them: {lost_with_store}");
    println!("runs with grants: {scoped} ({revoked} revoked a node mid-run); own writes refused at the door: {scope_refused}; changes by a node modified to ignore its grant: {forged}, of which every other node left out exactly the {forged_refused} the rule refuses; acknowledged writes made on top of changes a revocation cut off, gone with them: {cut_off}; records withdrawn from nodes narrowed in what they read: {withdrawn}");
    println!("faults injected:");
    for (kind, count) in &faults {
        println!("  {kind}: {count}");
    }
    println!("network: {messages} messages, {bytes} bytes; {changes_sent} changes sent");
    if deliveries > 0 {
        println!(
            "copies of each change sent per node reached: {:.2} ({:.2} pushed, {:.2} by catch-up; {:.2} arrived already held)",
            changes_sent as f64 / deliveries as f64,
            pushed as f64 / deliveries as f64,
            changes_sent.saturating_sub(pushed) as f64 / deliveries as f64,
            duplicates as f64 / deliveries as f64
        );
    }
    for (nodes, (sent, needed)) in &by_size {
        if *needed > 0 && by_size.len() > 1 {
            println!("  at {nodes} nodes: {:.2}", *sent as f64 / *needed as f64);
        }
    }
    println!(
        "simulated time to converge after healing: median {} ms, p99 {} ms, max {} ms",
        percentile(0.5),
        percentile(0.99),
        converge_ms.last().copied().unwrap_or(0)
    );
    ExitCode::SUCCESS
}

fn parse_range(text: &str) -> Option<std::ops::Range<u64>> {
    let (start, end) = text.split_once("..")?;
    let start: u64 = start.parse().ok()?;
    let end: u64 = end.parse().ok()?;
    (start < end).then_some(start..end)
}
