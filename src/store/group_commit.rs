//! Group commit: many writers, one flush.
//!
//! Each writer takes a ticket after applying its batch and waits until a flush that started
//! after that batch has finished. One writer at a time flushes; whoever finds a flush in
//! progress waits for it and, if it did not cover its ticket, runs the next one. So under load
//! one fsync acknowledges a whole group of writes.

use std::sync::{Condvar, Mutex, MutexGuard};

use super::StoreError;

#[derive(Default)]
struct State {
    /// Tickets handed out: batches applied so far.
    written: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// Tickets up to this one that were not durable when the store was opened again are lost.
    lost: u64,
    flushing: bool,
}

#[derive(Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    flushed: Condvar,
}

impl GroupCommit {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that one more batch was applied; call in the order batches are applied.
    pub fn ticket(&self) -> u64 {
        let mut state = self.state();
        state.written += 1;
        state.written
    }

    /// The ticket of the last batch applied: waiting for it makes everything so far durable.
    pub fn last_ticket(&self) -> u64 {
        self.state().written
    }

    /// Forgets the batches applied and never made durable (the store lost them when it was
    /// opened again): their writers were told of the failure already.
    pub fn forget_undurable(&self) {
        let mut state = self.state();
        state.lost = state.written;
        self.flushed.notify_all();
    }

    /// Returns once `ticket` is durable, running `flush` if nobody else is.
    pub fn wait_durable(
        &self,
        ticket: u64,
        flush: impl Fn() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut state = self.state();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.lost >= ticket {
                return Err(StoreError::Closed);
            }
            if state.flushing {
                state = self
                    .flushed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            state.flushing = true;
            let target = state.written;
            drop(state);
            let result = flush();
            state = self.state();
            state.flushing = false;
            if result.is_ok() && state.lost < target {
                state.durable = state.durable.max(target);
            }
            self.flushed.notify_all();
            result?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn one_flush_covers_earlier_tickets() {
        let group = GroupCommit::default();
        let flushes = AtomicUsize::new(0);
        let first = group.ticket();
        let second = group.ticket();
        let flush = || {
            flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        group.wait_durable(second, flush).unwrap();
        group.wait_durable(first, flush).unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn concurrent_writers_all_become_durable() {
        let group = Arc::new(GroupCommit::default());
        let flushes = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let group = group.clone();
                let flushes = flushes.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let ticket = group.ticket();
                        group
                            .wait_durable(ticket, || {
                                flushes.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(50));
                                Ok(())
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let state = group.state();
        assert_eq!(state.durable, 800);
        assert!(flushes.load(Ordering::SeqCst) <= 800);
    }
}
