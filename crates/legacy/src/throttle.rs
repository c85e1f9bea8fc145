//! Counting guest-driven conditions, and logging them without letting the guest flood the log.

use std::cell::Cell;

/// A saturating event counter.
///
/// The count lives in a [`Cell`] so that vm-superio's `&self` event callbacks can bump it; devices
/// are used behind a `Mutex`, never shared between threads unlocked.
#[derive(Debug, Default)]
pub(crate) struct Counter(Cell<u64>);

impl Counter {
    /// Records one occurrence and returns the total so far.
    pub(crate) fn inc(&self) -> u64 {
        self.add(1)
    }

    /// Records `n` occurrences and returns the total so far.
    pub(crate) fn add(&self, n: u64) -> u64 {
        let count = self.0.get().saturating_add(n);
        self.0.set(count);
        count
    }

    /// Number of occurrences recorded.
    pub(crate) fn get(&self) -> u64 {
        self.0.get()
    }
}

/// Whether the `count`-th occurrence of a condition the guest can repeat at will deserves a log
/// line: the 1st, 2nd, 4th, 8th and so on, so a guest causing it a million times produces about
/// twenty lines.
pub(crate) fn worth_logging(count: u64) -> bool {
    count.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_powers_of_two_are_worth_logging() {
        let counter = Counter::default();
        let logged: Vec<u64> = (0..1000)
            .map(|_| counter.inc())
            .filter(|&n| worth_logging(n))
            .collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
        assert_eq!(counter.get(), 1000);
        assert!(!worth_logging(0));
    }

    #[test]
    fn counter_saturates_instead_of_wrapping() {
        let counter = Counter::default();
        assert_eq!(counter.add(u64::MAX - 1), u64::MAX - 1);
        assert_eq!(counter.add(5), u64::MAX);
        assert_eq!(counter.inc(), u64::MAX);
    }
}
