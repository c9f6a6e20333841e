//! `concord-sim`: run or sweep seeded simulations and print a summary.
//!
//! `cargo run -p concord-sim --release -- --seed 7 --nodes 3 --steps 1000`
//! `cargo run -p concord-sim --release -- --seeds 0..1000`

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use concord_sim::{run, Params};

#[derive(Parser, Debug)]
#[command(
    name = "concord-sim",
    about = "Deterministic simulation of Concord nodes"
)]
struct Args {
    /// One seed to run.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds to sweep, as A..B (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 8)]
    records: usize,
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Percent of steps that crash a node.
    #[arg(long, default_value_t = 3)]
    crash_percent: u64,
    /// Percent of steps that merge a record between two nodes.
    #[arg(long, default_value_t = 25)]
    merge_percent: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    if args.nodes == 0
        || args.nodes > concord_sim::NODES_MAX
        || args.records == 0
        || args.steps > concord_sim::STEPS_MAX
        || args.crash_percent + args.merge_percent > 100
    {
        eprintln!("error: need 1..={} nodes, at least one record, at most {} steps, and crash + merge percent at most 100", concord_sim::NODES_MAX, concord_sim::STEPS_MAX);
        return ExitCode::from(1);
    }
    let params = Params {
        nodes: args.nodes,
        records: args.records,
        steps: args.steps,
        crash_percent: args.crash_percent,
        merge_percent: args.merge_percent,
        ..Params::default()
    };
    let start = Instant::now();
    let mut totals = concord_sim::Summary::default();
    let mut runs = 0u64;
    for seed in seeds {
        match run(seed, &params) {
            Ok(summary) => {
                runs += 1;
                totals.writes += summary.writes;
                totals.deletes += summary.deletes;
                totals.merges += summary.merges;
                totals.crashes += summary.crashes;
                totals.unflushed_batches_lost += summary.unflushed_batches_lost;
                totals.acknowledged_changes += summary.acknowledged_changes;
                if args.seed.is_some() {
                    println!("trace hash {:016x}", summary.trace_hash);
                }
            }
            Err(violation) => {
                eprintln!("{violation}");
                eprintln!(
                    "replay: cargo run -p concord-sim --release -- --seed {} --nodes {} --records {} --steps {} --crash-percent {} --merge-percent {}",
                    violation.seed, args.nodes, args.records, args.steps, args.crash_percent, args.merge_percent
                );
                return ExitCode::from(1);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{runs} runs passed in {seconds:.1} s ({:.0} runs per minute)",
        runs as f64 * 60.0 / seconds.max(1e-9)
    );
    println!(
        "writes {} deletes {} merges {} crashes {} (unflushed batches lost {}) acknowledged changes {}",
        totals.writes, totals.deletes, totals.merges, totals.crashes, totals.unflushed_batches_lost, totals.acknowledged_changes
    );
    ExitCode::SUCCESS
}

fn parse_range(text: &str) -> Option<std::ops::Range<u64>> {
    let (start, end) = text.split_once("..")?;
    let start: u64 = start.parse().ok()?;
    let end: u64 = end.parse().ok()?;
    (start < end).then_some(start..end)
}
