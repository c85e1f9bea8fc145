//! What a vsock device counts while it runs, for the VMM to read at any time without a lock.
//!
//! [`VsockMetrics`] is a set of counters that the device, its handler and its Unix backend
//! share in an [`Arc`](std::sync::Arc) ([`Vsock::metrics`](super::Vsock::metrics)). They only
//! ever go up, with relaxed atomic additions, and wrap around at `u64::MAX` rather than panic,
//! whatever the guest or a host peer does. The names are those of Firecracker's `vsock` metrics
//! group, so that dashboards built for it read ember's too. [`VsockMetrics::values`] lists
//! every counter by name, in a fixed order, for a VMM to serialise them without knowing the
//! fields.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counters of one vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Activations that failed: the wrong number of queues, an active device, or a handler that could not start.
    pub activate_fails: AtomicU64,
    /// Writes to the configuration space, which is read-only.
    pub cfg_fails: AtomicU64,
    /// Receive queue events that failed: a notification eventfd that cannot be read, a receive chain too short for a header, or a driver that broke the queue's protocol.
    pub rx_queue_event_fails: AtomicU64,
    /// Transmit queue events that failed: a notification eventfd that cannot be read, a malformed packet, or a driver that broke the queue's protocol.
    pub tx_queue_event_fails: AtomicU64,
    /// Event queue events that failed: a notification eventfd that cannot be read, a chain too short for an event, or a driver that broke the queue's protocol.
    pub ev_queue_event_fails: AtomicU64,
    /// Events of the backend that failed: its epoll set cannot be read, or a host connection cannot be accepted or registered.
    pub muxer_event_fails: AtomicU64,
    /// Events of a connection that failed: a host stream that cannot be watched, or a peer that broke the protocol.
    pub conn_event_fails: AtomicU64,
    /// Receive queue notifications served.
    pub rx_queue_event_count: AtomicU64,
    /// Transmit queue notifications served.
    pub tx_queue_event_count: AtomicU64,
    /// Payload bytes handed to the guest.
    pub rx_bytes_count: AtomicU64,
    /// Payload bytes the guest transmitted.
    pub tx_bytes_count: AtomicU64,
    /// Packets handed to the guest.
    pub rx_packets_count: AtomicU64,
    /// Packets the guest transmitted.
    pub tx_packets_count: AtomicU64,
    /// Connections opened, from either side.
    pub conns_added: AtomicU64,
    /// Connections the device reset: a peer that broke the protocol or overran its credit, a host stream that failed, or a shutdown the peer did not complete in time.
    pub conns_killed: AtomicU64,
    /// Connections gone, however they ended.
    pub conns_removed: AtomicU64,
    /// Times the queue of connections waiting to be killed was rebuilt from the connections; ember's holds every connection, so it never is, and the counter is kept for Firecracker's name.
    pub killq_resync: AtomicU64,
    /// Times guest data held for a host stream could not be written to it later (other than its being full).
    pub tx_flush_fails: AtomicU64,
    /// Times guest data could not be written to a host stream at once (other than its being full), or overran the credit the device advertised.
    pub tx_write_fails: AtomicU64,
    /// Times reading a host stream failed.
    pub rx_read_fails: AtomicU64,
}

impl VsockMetrics {
    /// The number of counters, the length of [`VsockMetrics::values`].
    pub const LEN: usize = 20;

    /// Every counter's name and value, always in the same order.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_virtio::vsock::VsockMetrics;
    ///
    /// let metrics = VsockMetrics::default();
    /// let values = metrics.values();
    /// assert_eq!(values[0], ("activate_fails", 0));
    /// assert!(values.iter().any(|&(name, _)| name == "conns_added"));
    /// ```
    pub fn values(&self) -> [(&'static str, u64); Self::LEN] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("activate_fails", get(&self.activate_fails)),
            ("cfg_fails", get(&self.cfg_fails)),
            ("rx_queue_event_fails", get(&self.rx_queue_event_fails)),
            ("tx_queue_event_fails", get(&self.tx_queue_event_fails)),
            ("ev_queue_event_fails", get(&self.ev_queue_event_fails)),
            ("muxer_event_fails", get(&self.muxer_event_fails)),
            ("conn_event_fails", get(&self.conn_event_fails)),
            ("rx_queue_event_count", get(&self.rx_queue_event_count)),
            ("tx_queue_event_count", get(&self.tx_queue_event_count)),
            ("rx_bytes_count", get(&self.rx_bytes_count)),
            ("tx_bytes_count", get(&self.tx_bytes_count)),
            ("rx_packets_count", get(&self.rx_packets_count)),
            ("tx_packets_count", get(&self.tx_packets_count)),
            ("conns_added", get(&self.conns_added)),
            ("conns_killed", get(&self.conns_killed)),
            ("conns_removed", get(&self.conns_removed)),
            ("killq_resync", get(&self.killq_resync)),
            ("tx_flush_fails", get(&self.tx_flush_fails)),
            ("tx_write_fails", get(&self.tx_write_fails)),
            ("rx_read_fails", get(&self.rx_read_fails)),
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
        let metrics = VsockMetrics::default();
        add(&metrics.rx_bytes_count, 64);
        let names: std::collections::HashSet<_> =
            metrics.values().iter().map(|&(name, _)| name).collect();
        assert_eq!(names.len(), VsockMetrics::LEN);
        assert_eq!(metrics.get("rx_bytes_count"), Some(64));
        assert_eq!(metrics.get("entropy_bytes"), None);
    }
}
