//! The simulator's own tests: runs that must hold every guarantee.

use super::*;

#[test]
fn same_seed_same_run() {
    let params = Params::default();
    let first = run(7, &params).unwrap_or_else(|violation| panic!("{violation}"));
    let second = run(7, &params).unwrap();
    assert_eq!(first, second);
    let other = run(8, &params).unwrap_or_else(|violation| panic!("{violation}"));
    assert_ne!(first.trace_hash, other.trace_hash);
}

#[test]
fn scoped_runs_pass() {
    let params = Params {
        scoped_percent: 100,
        ..Params::default()
    };
    let (mut forged, mut refused) = (0, 0);
    for seed in 0..20 {
        let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
        forged += summary.forged_writes;
        refused += summary.forged_refused;
    }
    assert!(refused > 0 && refused < forged, "{refused} of {forged}");
}

#[test]
fn partial_replicas_end_holding_exactly_what_they_may_read() {
    let params = Params {
        scoped_percent: 100,
        partial_reads_percent: 50,
        ..Params::default()
    };
    let mut withdrawn = 0;
    for seed in 0..30 {
        let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
        withdrawn += summary.withdrawn_documents;
    }
    assert!(
        withdrawn > 0,
        "no run moved a record out of a narrowed node's scope"
    );
}

#[test]
fn a_node_whose_clock_runs_far_ahead_moves_no_clock_and_converges() {
    // Its changes wait at every other node until their clocks catch up (the write check
    // refuses any change stamped past its writer's clock and the bound), then converge.
    let params = Params {
        far_ahead_percent: 100,
        far_ahead_ms: 30_000,
        ..Params::default()
    };
    let mut ahead = 0;
    for seed in 0..5 {
        let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
        assert!(summary.far_ahead);
        ahead += summary.changes_ahead;
    }
    assert!(ahead > 0, "no change ever waited for a clock");
}

#[test]
fn lost_and_restored_stores_lose_only_what_no_other_node_held() {
    let params = Params {
        crash_percent: 6,
        store_loss_percent: 100,
        backup_permille: 100,
        ..Params::default()
    };
    let (mut lost, mut restored, mut writes) = (0, 0, 0);
    for seed in 0..10 {
        let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
        lost += summary.stores_lost;
        restored += summary.stores_restored;
        writes += summary.acknowledged;
    }
    assert!(
        lost >= 10 && restored >= 3,
        "{lost} lost, {restored} restored"
    );
    assert!(writes > 0);
}

#[test]
fn large_values_and_long_histories_converge() {
    let params = Params {
        large_value_permille: 150,
        burst_permille: 100,
        ..Params::default()
    };
    let mut large = 0;
    let mut refused = 0;
    let mut bursts = 0;
    for seed in 0..6 {
        let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
        large += summary.large_writes;
        refused += summary.refused_writes;
        bursts += summary.burst_writes;
    }
    assert!(
        large > 0 && refused > 0 && bursts > 0,
        "{large} {refused} {bursts}"
    );
}

pub(crate) fn compacting() -> Params {
    Params {
        compact_histories: true,
        ..Params::default()
    }
}

#[test]
fn compacted_histories_hold_the_guarantees() {
    let mut compacted = 0;
    for seed in 0..40 {
        let summary = run(seed, &compacting()).unwrap_or_else(|violation| panic!("{violation}"));
        compacted += summary.documents_compacted;
    }
    assert!(compacted > 0, "the runs must compact histories");
}

/// Seeds swept by `cargo test` (CI): a few hundred, a minute or so in a debug build.
const CI_SWEEP_SEEDS: u64 = 300;

#[test]
fn sweep_of_seeds_holds_the_guarantees() {
    let params = Params::default();
    let mut faults = 0;
    for seed in 0..CI_SWEEP_SEEDS {
        let summary = run(seed, &params).unwrap_or_else(|violation| panic!("{violation}"));
        faults += summary.faults.values().sum::<u64>();
    }
    assert!(faults > 0, "the sweep must inject faults");
}
