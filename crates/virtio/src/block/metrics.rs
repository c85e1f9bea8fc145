//! What a block device counts while it runs, for the VMM to read at any time without a lock.
//!
//! [`BlockMetrics`] is a set of counters that the device and its worker thread share in an
//! [`Arc`](std::sync::Arc) ([`Block::metrics`](super::Block::metrics)). They only ever go up,
//! with relaxed atomic additions (a reader sees each counter's latest value, not a snapshot of
//! all of them at one instant), and wrap around at `u64::MAX` rather than panic, whatever the
//! guest does. The names are those of Firecracker's block device metrics, so that dashboards
//! built for it read ember's too. [`BlockMetrics::values`] lists every counter by name, in a
//! fixed order, for a VMM to serialise them without knowing the fields.

use std::sync::atomic::{AtomicU64, Ordering};

use super::disk::Completion;
use super::request::{RequestType, STATUS_OK};

/// The counters of one block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Activations that failed: the wrong number of queues, an active device, or a worker
    /// thread that could not start.
    pub activate_fails: AtomicU64,
    /// Configuration space accesses refused: every write (no field is writable), and reads
    /// that reach past the end of the configuration space.
    pub cfg_fails: AtomicU64,
    /// Queue notifications that found no request to serve.
    pub no_avail_buffer: AtomicU64,
    /// Events the worker could not handle as it should: a notification eventfd that cannot be
    /// read or written, an interrupt that cannot be raised, an epoll change refused.
    pub event_fails: AtomicU64,
    /// Requests that parsed but did not complete with VIRTIO_BLK_S_OK: I/O errors, writes to
    /// a read-only disk, discards the image cannot do.
    pub execute_fails: AtomicU64,
    /// Chains that are not a valid request (see [`RequestError`](super::request::RequestError)).
    pub invalid_reqs_count: AtomicU64,
    /// Flushes completed.
    pub flush_count: AtomicU64,
    /// Queue notifications the worker handled.
    pub queue_event_count: AtomicU64,
    /// Events of the rate limiter's timer the worker handled.
    pub rate_limiter_event_count: AtomicU64,
    /// Successful changes of the disk image or the rate limiter, made while the device exists.
    pub update_count: AtomicU64,
    /// Changes of the disk image or the rate limiter that failed.
    pub update_fails: AtomicU64,
    /// Bytes read from the disk into guest memory by the reads completed.
    pub read_bytes: AtomicU64,
    /// Bytes written to the disk from guest memory by the writes completed.
    pub write_bytes: AtomicU64,
    /// Reads completed.
    pub read_count: AtomicU64,
    /// Writes completed.
    pub write_count: AtomicU64,
    /// Times the rate limiter held a request back, each retry of the same request included.
    pub rate_limiter_throttled_events: AtomicU64,
    /// Times the driver broke the queue protocol (a chain longer than the queue, an index out
    /// of range...) and the device stopped serving the queue until reset.
    pub queue_fails: AtomicU64,
}

impl BlockMetrics {
    /// The number of counters, the length of [`BlockMetrics::values`].
    pub const LEN: usize = 17;

    /// Every counter's name and value, always in the same order.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_virtio::block::BlockMetrics;
    ///
    /// let metrics = BlockMetrics::default();
    /// let values = metrics.values();
    /// assert_eq!(values[0], ("activate_fails", 0));
    /// assert!(values.iter().any(|&(name, _)| name == "read_bytes"));
    /// ```
    pub fn values(&self) -> [(&'static str, u64); Self::LEN] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("activate_fails", get(&self.activate_fails)),
            ("cfg_fails", get(&self.cfg_fails)),
            ("no_avail_buffer", get(&self.no_avail_buffer)),
            ("event_fails", get(&self.event_fails)),
            ("execute_fails", get(&self.execute_fails)),
            ("invalid_reqs_count", get(&self.invalid_reqs_count)),
            ("flush_count", get(&self.flush_count)),
            ("queue_event_count", get(&self.queue_event_count)),
            (
                "rate_limiter_event_count",
                get(&self.rate_limiter_event_count),
            ),
            ("update_count", get(&self.update_count)),
            ("update_fails", get(&self.update_fails)),
            ("read_bytes", get(&self.read_bytes)),
            ("write_bytes", get(&self.write_bytes)),
            ("read_count", get(&self.read_count)),
            ("write_count", get(&self.write_count)),
            (
                "rate_limiter_throttled_events",
                get(&self.rate_limiter_throttled_events),
            ),
            ("queue_fails", get(&self.queue_fails)),
        ]
    }

    /// The value of the counter named `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.values()
            .into_iter()
            .find_map(|(n, value)| (n == name).then_some(value))
    }

    /// Counts what a parsed request came to.
    pub(super) fn completed(&self, request_type: RequestType, completion: Completion) {
        if completion.status != STATUS_OK {
            inc(&self.execute_fails);
            return;
        }
        match request_type {
            RequestType::In { .. } => {
                inc(&self.read_count);
                add(&self.read_bytes, u64::from(completion.data_written));
            }
            RequestType::Out { len, .. } => {
                inc(&self.write_count);
                add(&self.write_bytes, u64::from(len));
            }
            RequestType::Flush => inc(&self.flush_count),
            RequestType::GetId { .. } | RequestType::Discard(_) | RequestType::WriteZeroes(_) => {}
        }
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
        let metrics = BlockMetrics::default();
        inc(&metrics.write_count);
        add(&metrics.write_bytes, 4096);
        let values = metrics.values();
        let mut names: Vec<&str> = values.iter().map(|&(name, _)| name).collect();
        assert_eq!(names.first(), Some(&"activate_fails"));
        assert_eq!(names.last(), Some(&"queue_fails"));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BlockMetrics::LEN);
        assert_eq!(metrics.get("write_count"), Some(1));
        assert_eq!(metrics.get("write_bytes"), Some(4096));
        assert_eq!(metrics.get("read_bytes"), Some(0));
        assert_eq!(metrics.get("no_such_counter"), None);
    }

    #[test]
    fn a_counter_wraps_around_instead_of_panicking() {
        let metrics = BlockMetrics::default();
        add(&metrics.read_bytes, u64::MAX);
        add(&metrics.read_bytes, 2);
        assert_eq!(metrics.get("read_bytes"), Some(1));
    }
}
