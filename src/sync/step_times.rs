//! Where one step of the driver spent its time, by phase: each kind of event handed to the
//! engine (by message kind for what a peer sent), reading the node's own new log entries,
//! the durable flush, and producing frames. The node logs it beside a slow step.
//!
//! The one use of a clock in the sans-IO core, and for this report only: no decision of the
//! driver or the engine reads it, so a simulated run does the same whatever it says.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// The time and number of calls of one phase in one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseTime {
    pub calls: u32,
    pub time: Duration,
}

/// One step's phases, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepTimes {
    phases: BTreeMap<&'static str, PhaseTime>,
}

impl StepTimes {
    /// Runs `work`, counting its time under `phase`.
    pub fn time<T>(&mut self, phase: &'static str, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = work();
        let entry = self.phases.entry(phase).or_default();
        entry.calls = entry.calls.saturating_add(1);
        entry.time += started.elapsed();
        result
    }

    /// The phases, by name.
    pub fn phases(&self) -> &BTreeMap<&'static str, PhaseTime> {
        &self.phases
    }
}

/// The phases by time, longest first: `summary 3x 1200 ms, durable 1x 80 ms`.
impl fmt::Display for StepTimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut phases: Vec<_> = self.phases.iter().collect();
        phases.sort_by_key(|phase| std::cmp::Reverse(phase.1.time));
        for (index, (name, phase)) in phases.into_iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} {}x {} ms", phase.calls, phase.time.as_millis())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_counted_and_listed_longest_first() {
        let mut times = StepTimes::default();
        times.time("quick", || ());
        times.time("slow", || std::thread::sleep(Duration::from_millis(5)));
        times.time("quick", || ());
        assert_eq!(times.phases()["quick"].calls, 2);
        assert!(times.phases()["slow"].time >= Duration::from_millis(5));
        let shown = times.to_string();
        assert!(shown.starts_with("slow 1x "), "{shown}");
        assert!(shown.contains("quick 2x "), "{shown}");
    }
}
