//! The simulation's one source of randomness: SplitMix64, portable and seedable, so that a
//! seed replays the same run on any machine.

#[derive(Debug, Clone)]
pub struct SimRng(concord::rng::SplitMix64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(concord::rng::SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..bound`; `bound` must be positive.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0.below(bound)
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
