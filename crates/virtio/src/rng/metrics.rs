//! What an entropy device counts while it runs, for the VMM to read at any time without a lock.
//!
//! [`RngMetrics`] is a set of counters that the device and its handler share in an
//! [`Arc`](std::sync::Arc) ([`Rng::metrics`](super::Rng::metrics)). They only ever go up, with
//! relaxed atomic additions, and wrap around at `u64::MAX` rather than panic, whatever the guest
//! does. The names are those of Firecracker's `entropy` metrics group, so that dashboards built
//! for it read ember's too. [`RngMetrics::values`] lists every counter by name, in a fixed
//! order, for a VMM to serialise them without knowing the fields.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counters of one entropy device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Activations that failed: the wrong number of queues, an active device, or a handler
    /// that could not start.
    pub activate_fails: AtomicU64,
    /// Events the handler could not handle as it should: a notification eventfd that cannot
    /// be read or written, an interrupt that cannot be raised, a rate limiter that failed, or a
    /// driver that broke the queue protocol.
    pub entropy_event_fails: AtomicU64,
    /// Queue notifications the handler served.
    pub entropy_event_count: AtomicU64,
    /// Random bytes written into the guest's buffers.
    pub entropy_bytes: AtomicU64,
    /// Times the host's random source failed or had nothing to give without blocking; the
    /// request then completes with fewer bytes, or none.
    pub host_rng_fails: AtomicU64,
    /// Times the rate limiter held a request back, each retry of the same request included.
    pub entropy_rate_limiter_throttled: AtomicU64,
    /// Events of the rate limiter's timer the handler served.
    pub rate_limiter_event_count: AtomicU64,
}

impl RngMetrics {
    /// The number of counters, the length of [`RngMetrics::values`].
    pub const LEN: usize = 7;

    /// Every counter's name and value, always in the same order.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_virtio::rng::RngMetrics;
    ///
    /// let metrics = RngMetrics::default();
    /// let values = metrics.values();
    /// assert_eq!(values[0], ("activate_fails", 0));
    /// assert!(values.iter().any(|&(name, _)| name == "entropy_bytes"));
    /// ```
    pub fn values(&self) -> [(&'static str, u64); Self::LEN] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("activate_fails", get(&self.activate_fails)),
            ("entropy_event_fails", get(&self.entropy_event_fails)),
            ("entropy_event_count", get(&self.entropy_event_count)),
            ("entropy_bytes", get(&self.entropy_bytes)),
            ("host_rng_fails", get(&self.host_rng_fails)),
            (
                "entropy_rate_limiter_throttled",
                get(&self.entropy_rate_limiter_throttled),
            ),
            (
                "rate_limiter_event_count",
                get(&self.rate_limiter_event_count),
            ),
        ]
    }

    /// The value of the counter called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.values()
            .into_iter()
            .find_map(|(n, value)| (n == name).then_some(value))
    }
}

/// Adds one to `counter`, wrapping around.
pub(super) fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

/// Adds `n` to `counter`, wrapping around.
pub(super) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_listed_once_by_its_firecracker_name() {
        let metrics = RngMetrics::default();
        add(&metrics.entropy_bytes, 64);
        let names: std::collections::HashSet<_> =
            metrics.values().iter().map(|&(name, _)| name).collect();
        assert_eq!(names.len(), RngMetrics::LEN);
        assert_eq!(metrics.get("entropy_bytes"), Some(64));
        assert_eq!(metrics.get("rx_bytes_count"), None);
    }
}
