//! Deliberate bugs the checks must find (and one the node must contain). Built only with the
//! `sabotage` feature (`cargo test -p concord-sim --features sabotage`), never in an ordinary
//! `cargo test --workspace`, so that no other test runs against a build that has them.

use super::*;
use crate::tests::compacting;

/// The first of seeds `0..seeds_max` whose run breaks a guarantee under `sabotage`, or
/// `None` when every run passed (the checks missed the deliberate bug).
fn first_seed_finding(sabotage: Sabotage, seeds_max: u64) -> Option<u64> {
    first_seed_finding_with(sabotage, &Params::default(), seeds_max)
}

fn first_seed_finding_with(sabotage: Sabotage, params: &Params, seeds_max: u64) -> Option<u64> {
    let found = (0..seeds_max).find_map(|seed| {
        run_sabotaged(seed, params, sabotage)
            .err()
            .map(|violation| (seed, violation))
    });
    match &found {
        Some((seed, violation)) => {
            eprintln!("{sabotage:?} found at seed {seed}: {}", violation.message)
        }
        None => eprintln!("{sabotage:?} went unnoticed for {seeds_max} seeds"),
    }
    found.map(|(seed, _)| seed)
}

#[test]
fn the_checks_find_receivers_that_do_not_judge_changes_by_grants() {
    let sabotage = Sabotage {
        receivers_admit_everything: true,
        ..Sabotage::default()
    };
    let params = Params {
        scoped_percent: 100,
        ..Params::default()
    };
    assert!(first_seed_finding_with(sabotage, &params, 40).is_some());
}

#[test]
fn the_checks_find_a_dropped_held_change() {
    let sabotage = Sabotage {
        drop_held_changes: true,
        ..Sabotage::default()
    };
    assert!(first_seed_finding(sabotage, 20).is_some());
}

#[test]
fn the_checks_find_skipped_summaries() {
    let sabotage = Sabotage {
        skip_summaries: true,
        ..Sabotage::default()
    };
    assert!(first_seed_finding(sabotage, 20).is_some());
}

#[test]
fn the_checks_find_a_change_logged_twice() {
    let sabotage = Sabotage {
        log_twice: true,
        ..Sabotage::default()
    };
    assert!(first_seed_finding(sabotage, 20).is_some());
}

#[test]
fn the_checks_find_batches_sized_by_count() {
    let sabotage = Sabotage {
        count_only_batches: true,
        ..Sabotage::default()
    };
    // Large values often, so that some batch of them outgrows a frame.
    let params = Params {
        large_value_permille: 150,
        ..Params::default()
    };
    assert!(first_seed_finding_with(sabotage, &params, 20).is_some());
}

/// Stores lost often, and backups often, so that a node writes again under a writer and
/// sequence that its former self already used.
fn reusing_params() -> Params {
    Params {
        crash_percent: 6,
        store_loss_percent: 100,
        backup_permille: 100,
        // Colliding changes (two stores under one writer, which incarnations prevent) are
        // not yet judged alike by grants: a change that collides with one a node holds
        // is judged against a document it cannot be applied to there.
        scoped_percent: 0,
        // Nor alike by a compacted history, which knows a change inside it by its place
        // (writer and sequence number) alone: a colliding change at such a place is held
        // there, and refused or applied at a node that did not compact.
        compact_histories: false,
        ..Params::default()
    }
}

#[test]
fn stores_made_again_under_their_old_writer_are_contained() {
    // The sabotage writes colliding changes (a store made again under its old writer, as
    // a copy restored by hand does): peers show the node its own log, it takes a new
    // writer, colliding changes are decided alike everywhere, and what it lost to them it
    // writes again. Nothing acknowledged is lost beyond what no other node held.
    let sabotage = Sabotage {
        reuse_writer: true,
        ..Sabotage::default()
    };
    let params = reusing_params();
    let (mut superseded, mut refused, mut reissued, mut lost) = (0, 0, 0, 0);
    // Seed 79 found a change that waited forever on a refused dependency its receivers
    // never met (now sent with it), and, before that, a change stored beside a document
    // that no longer held it.
    for seed in 0..120 {
        let summary = run_sabotaged(seed, &params, sabotage)
            .unwrap_or_else(|violation| panic!("{violation}"));
        superseded += summary.writers_superseded;
        refused += summary.changes_refused;
        reissued += summary.writes_reissued;
        lost += summary.acknowledged_refused;
    }
    eprintln!(
        "{superseded} new writers, {refused} changes refused, {reissued} documents written \
         again, {lost} acknowledged changes refused whose author no longer held them"
    );
    assert!(superseded > 0, "no store found its own log elsewhere");
    assert!(refused + reissued > 0, "no change ever collided");
}

#[test]
fn the_checks_find_a_clock_moved_by_a_change_from_far_ahead() {
    let sabotage = Sabotage {
        no_clock_bound: true,
        ..Sabotage::default()
    };
    let params = Params {
        far_ahead_percent: 100,
        far_ahead_ms: 30_000,
        ..Params::default()
    };
    assert!(first_seed_finding_with(sabotage, &params, 10).is_some());
}

#[test]
fn the_checks_find_collisions_decided_by_arrival() {
    let sabotage = Sabotage {
        reuse_writer: true,
        first_arrival_stands: true,
        ..Sabotage::default()
    };
    assert!(first_seed_finding_with(sabotage, &reusing_params(), 30).is_some());
}

#[test]
fn the_checks_find_histories_compacted_before_they_are_stable() {
    let sabotage = Sabotage {
        compact_unstable: true,
        ..Sabotage::default()
    };
    assert!(first_seed_finding_with(sabotage, &compacting(), 20).is_some());
}

#[test]
fn the_checks_find_a_revocation_applied_by_arrival_at_one_node() {
    // One honest node keeps what it held past a revocation's cut-off when the revocation
    // reaches it (it judges by arrival, as if the revocation counted only from then on):
    // the nodes it reached first refused the same changes.
    let sabotage = Sabotage {
        revocation_by_arrival: true,
        ..Sabotage::default()
    };
    let params = Params {
        scoped_percent: 100,
        ..Params::default()
    };
    assert!(first_seed_finding_with(sabotage, &params, 200).is_some());
}
