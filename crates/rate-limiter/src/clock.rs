//! Time sources for the token buckets.
//!
//! A bucket's refill is a function of elapsed time only, so the time source is a [`Clock`]: a
//! monotonic count of nanoseconds whose origin does not matter. [`MonotonicClock`] reads
//! `CLOCK_MONOTONIC`, the clock the rate limiter's timerfd runs on; with the `test-utils` feature,
//! `ManualClock` is advanced by hand, so tests of refill over days or years do not sleep.

use std::sync::OnceLock;
use std::time::Instant;

/// A monotonic time source in nanoseconds.
///
/// Only differences between two readings matter. Readings must never decrease; a clock that does
/// go back is treated as standing still until it is past its highest reading again.
pub trait Clock {
    /// The current time, in nanoseconds since an origin of the clock's choosing.
    fn now(&self) -> u64;
}

/// The system's monotonic clock, `CLOCK_MONOTONIC`, read through [`Instant`].
///
/// It is the clock the rate limiter's timerfd counts on, so a timer armed for the time a bucket
/// needs to refill expires no earlier than the refill is complete. Readings are nanoseconds since
/// the first reading in the process, and saturate after 584 years.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub use manual::ManualClock;

#[cfg(any(test, feature = "test-utils"))]
mod manual {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::Clock;

    /// A clock that stands still until it is told to move.
    ///
    /// Clones share the same time: a test keeps one and gives another to the rate limiter, then
    /// advances its own to simulate time passing.
    #[derive(Clone, Debug, Default)]
    pub struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        /// A clock that reads `ns` nanoseconds.
        pub fn new(ns: u64) -> Self {
            ManualClock(Arc::new(AtomicU64::new(ns)))
        }

        /// Sets the time to `ns` nanoseconds.
        pub fn set(&self, ns: u64) {
            self.0.store(ns, Ordering::Relaxed);
        }

        /// Moves the time forward by `by`, stopping at `u64::MAX` nanoseconds.
        pub fn advance(&self, by: Duration) {
            let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            self.advance_ns(by);
        }

        /// Moves the time forward by `ns` nanoseconds, stopping at `u64::MAX`.
        pub fn advance_ns(&self, ns: u64) {
            let now = self.now();
            self.set(now.saturating_add(ns));
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn monotonic_clock_never_goes_back() {
        let clock = MonotonicClock;
        let mut last = clock.now();
        for _ in 0..1000 {
            let now = clock.now();
            assert!(now >= last);
            last = now;
        }
    }

    #[test]
    fn monotonic_clock_follows_instant() {
        let clock = MonotonicClock;
        let start = clock.now();
        let instant = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        let measured = instant.elapsed();
        let elapsed = clock.now() - start;
        assert!(elapsed >= 5_000_000);
        // The clock was read before the instant at the start and after it at the end.
        assert!(u128::from(elapsed) >= measured.as_nanos());
    }

    #[test]
    fn manual_clock_clones_share_the_time_and_saturate() {
        let clock = ManualClock::new(10);
        let other = clock.clone();
        clock.advance(Duration::from_nanos(5));
        assert_eq!(other.now(), 15);
        other.advance(Duration::MAX);
        assert_eq!(clock.now(), u64::MAX);
        clock.set(3);
        assert_eq!(other.now(), 3);
    }
}
