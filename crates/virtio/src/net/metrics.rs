//! What a network device counts while it runs, for the VMM to read at any time without a lock.
//!
//! [`NetMetrics`] is a set of counters that the device and its worker thread share in an
//! [`Arc`](std::sync::Arc) ([`Net::metrics`](super::Net::metrics)). They only ever go up, with
//! relaxed atomic additions (a reader sees each counter's latest value, not a snapshot of all
//! of them at one instant), and wrap around at `u64::MAX` rather than panic, whatever the guest
//! does. The names are those of Firecracker's network device metrics, so that dashboards built
//! for it read ember's too. [`NetMetrics::values`] lists every counter by name, in a fixed
//! order, for a VMM to serialise them without knowing the fields.
//!
//! Byte counts include the 12-byte virtio-net header in front of every frame: they are what
//! crosses between the guest and the backend.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counters of one network device.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Activations that failed: the wrong number of queues, an active device, a backend that
    /// refused the offloads, or a worker thread that could not start.
    pub activate_fails: AtomicU64,
    /// Configuration space accesses refused: every write (the MAC address is read-only), and
    /// reads that reach past the end of the configuration space.
    pub cfg_fails: AtomicU64,
    /// Events the worker could not handle as it should: a notification eventfd that cannot be
    /// read or written, an interrupt that cannot be raised, an epoll change refused, an error
    /// or hang-up on the backend.
    pub event_fails: AtomicU64,
    /// Times a received frame had to wait because the driver had no receive buffers.
    pub no_rx_avail_buffer: AtomicU64,
    /// Receive queue notifications the worker handled.
    pub rx_queue_event_count: AtomicU64,
    /// Times the worker found the backend readable.
    pub rx_tap_event_count: AtomicU64,
    /// Events of the receive rate limiter's timer the worker handled.
    pub rx_event_rate_limiter_count: AtomicU64,
    /// Times the receive rate limiter held a frame back, each retry of the same frame included.
    pub rx_rate_limiter_throttled: AtomicU64,
    /// Bytes of the frames delivered to the guest.
    pub rx_bytes_count: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_packets_count: AtomicU64,
    /// Received frames dropped (too big for the guest's buffers, or not a header and a frame),
    /// and reads from the backend that failed.
    pub rx_fails: AtomicU64,
    /// Frames read from the backend, delivered or not.
    pub rx_count: AtomicU64,
    /// Bytes of the frames the backend took.
    pub tx_bytes_count: AtomicU64,
    /// Frames the backend took.
    pub tx_packets_count: AtomicU64,
    /// Frames the backend refused, or that were still waiting when it hung up.
    pub tx_fails: AtomicU64,
    /// Successful writes to the backend, one per frame: the same as `tx_packets_count`, under
    /// Firecracker's other name for it.
    pub tx_count: AtomicU64,
    /// Transmit queue notifications the worker handled.
    pub tx_queue_event_count: AtomicU64,
    /// Events of the transmit rate limiter's timer the worker handled.
    pub tx_rate_limiter_event_count: AtomicU64,
    /// Times the transmit rate limiter held a frame back, each retry of the same frame
    /// included.
    pub tx_rate_limiter_throttled: AtomicU64,
    /// Transmit chains dropped as malformed: shorter than the header, longer than the longest
    /// frame, in more pieces than one write takes, or outside guest memory.
    pub tx_malformed_frames: AtomicU64,
    /// Times the driver broke the protocol of a queue (a chain longer than the queue, an index
    /// out of range...) and the device stopped serving its queues until reset.
    pub queue_fails: AtomicU64,
}

impl NetMetrics {
    /// The number of counters, the length of [`NetMetrics::values`].
    pub const LEN: usize = 21;

    /// Every counter's name and value, always in the same order.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_virtio::net::NetMetrics;
    ///
    /// let metrics = NetMetrics::default();
    /// let values = metrics.values();
    /// assert_eq!(values[0], ("activate_fails", 0));
    /// assert!(values.iter().any(|&(name, _)| name == "tx_bytes_count"));
    /// ```
    pub fn values(&self) -> [(&'static str, u64); Self::LEN] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("activate_fails", get(&self.activate_fails)),
            ("cfg_fails", get(&self.cfg_fails)),
            ("event_fails", get(&self.event_fails)),
            ("no_rx_avail_buffer", get(&self.no_rx_avail_buffer)),
            ("rx_queue_event_count", get(&self.rx_queue_event_count)),
            ("rx_tap_event_count", get(&self.rx_tap_event_count)),
            (
                "rx_event_rate_limiter_count",
                get(&self.rx_event_rate_limiter_count),
            ),
            (
                "rx_rate_limiter_throttled",
                get(&self.rx_rate_limiter_throttled),
            ),
            ("rx_bytes_count", get(&self.rx_bytes_count)),
            ("rx_packets_count", get(&self.rx_packets_count)),
            ("rx_fails", get(&self.rx_fails)),
            ("rx_count", get(&self.rx_count)),
            ("tx_bytes_count", get(&self.tx_bytes_count)),
            ("tx_packets_count", get(&self.tx_packets_count)),
            ("tx_fails", get(&self.tx_fails)),
            ("tx_count", get(&self.tx_count)),
            ("tx_queue_event_count", get(&self.tx_queue_event_count)),
            (
                "tx_rate_limiter_event_count",
                get(&self.tx_rate_limiter_event_count),
            ),
            (
                "tx_rate_limiter_throttled",
                get(&self.tx_rate_limiter_throttled),
            ),
            ("tx_malformed_frames", get(&self.tx_malformed_frames)),
            ("queue_fails", get(&self.queue_fails)),
        ]
    }

    /// The value of the counter named `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.values()
            .into_iter()
            .find_map(|(n, value)| (n == name).then_some(value))
    }
}

/// Adds one to `counter`.
pub(super) fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

/// Adds `n` to `counter`; wraps around rather than overflow.
pub(super) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_every_counter_once_in_a_fixed_order() {
        let metrics = NetMetrics::default();
        inc(&metrics.rx_packets_count);
        add(&metrics.rx_bytes_count, 1514);
        let values = metrics.values();
        let mut names: Vec<&str> = values.iter().map(|&(name, _)| name).collect();
        assert_eq!(names.first(), Some(&"activate_fails"));
        assert_eq!(names.last(), Some(&"queue_fails"));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), NetMetrics::LEN);
        assert_eq!(metrics.get("rx_packets_count"), Some(1));
        assert_eq!(metrics.get("rx_bytes_count"), Some(1514));
        assert_eq!(metrics.get("tx_spoofed_mac_count"), None);
    }
}
