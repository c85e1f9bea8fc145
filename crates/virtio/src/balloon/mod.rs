//! A virtio-balloon device (virtio 1.2, section 5.5) with Firecracker's features: memory the
//! guest gives up goes back to the host.
//!
//! [`Balloon`] has an inflate queue (0), a deflate queue (1) and, when statistics are polled
//! ([`BalloonConfig::stats_polling_interval_s`] above 0), a statistics queue (2). It offers
//! VIRTIO_BALLOON_F_DEFLATE_ON_OOM when asked to, so that the guest may take pages back from
//! the balloon when it runs out of memory, and VIRTIO_BALLOON_F_STATS_VQ with statistics. Its
//! configuration space is `num_pages`, the size in 4 KiB pages the host asks the balloon to be
//! ([`Balloon::set_target_mib`] changes it and raises a configuration interrupt), and
//! `actual`, the size the driver says it reached.
//!
//! # What inflating does to the host
//!
//! The driver hands over the page frame numbers (4 KiB pages) of the pages it put in the
//! balloon. The handler sorts and dedups each chain's numbers, joins them into contiguous
//! ranges, checks every range against guest memory and gives each range back to the host with
//! one `madvise`: `MADV_DONTNEED` on anonymous private memory (ember's), whose pages then read
//! as zeros and no longer count in the process' RSS; `MADV_REMOVE` on memory backed by a file
//! (a region with a [`FileOffset`](vm_memory::FileOffset): a memfd or a shared file), where
//! `MADV_DONTNEED` would only drop the mapping and leave the file's pages in place (a VMM
//! whose threads run under seccomp must then allow `MADV_REMOVE` as well). Transparent huge
//! pages are split by the kernel; memory from hugetlbfs cannot give back 4 KiB pages, and a
//! VMM should not offer a balloon over it.
//! Deflating needs nothing of the host: the guest's next touch of a page faults a fresh one in.
//!
//! # A malicious driver
//!
//! Page frame numbers outside guest memory are skipped and counted, never passed to `madvise`;
//! the same page twice is given back once; a chain is read up to [`MAX_PFNS_PER_CHAIN`] numbers
//! (the most Linux sends) and a trailing partial number is ignored; each event handles at most
//! [`CHAIN_BUDGET`] chains and comes back for the rest after the events waiting behind. A queue
//! whose protocol the driver breaks stops the device until it is reset (DEVICE_NEEDS_RESET).
//!
//! # Snapshots
//!
//! What a snapshot records of a balloon is its [`BalloonState`] ([`Balloon::save_state`]):
//! the target and the size the driver last reported (the configuration space), the polling
//! interval and the guest's latest statistics, so that a restored device reads the same to the
//! driver and to the VMM's API. Its queues come from
//! [`VirtioDevice::save_queues`](crate::VirtioDevice::save_queues): the inflate and deflate
//! queues hold nothing between two events (each chain is used as soon as it is read), and the
//! statistics buffer the device keeps until its next poll is given back to the available ring,
//! so that the restored device takes it again. A new device, [`Balloon::restore_state`]d and
//! activated with the saved queues, first serves whatever the driver had made available (the
//! notifications it sent are not part of the snapshot), then polls statistics on its timer.
//!
//! The source is split as [`crate::net`]'s: `device.rs` is the device as its transport sees it
//! ([`Balloon`]), `handler.rs` what serves the queues once it is active ([`BalloonHandler`]).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_virtio::VirtioDevice;
//! use ember_virtio::balloon::{Balloon, BalloonConfig};
//! use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
//! use vm_memory::GuestMemoryMmap;
//!
//! let balloon = Balloon::new(BalloonConfig::new(64, true, 1)).unwrap();
//! let device: &dyn VirtioDevice<Arc<GuestMemoryMmap>> = &balloon;
//! assert_eq!(device.device_type(), VIRTIO_ID_BALLOON);
//! assert_eq!(device.queue_max_sizes().len(), 3);
//! let mut num_pages = [0u8; 4];
//! device.read_config(0, &mut num_pages);
//! assert_eq!(u32::from_le_bytes(num_pages), 64 * 256);
//! ```

mod device;
mod handler;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

pub use device::{Balloon, PendingUpdate};
pub use handler::{
    BalloonHandler, DEFLATE_QUEUE_TOKEN, INFLATE_QUEUE_TOKEN, STATS_QUEUE_TOKEN, STATS_TIMER_TOKEN,
    stats_timer,
};

use crate::queue;

/// The inflate queue's index.
pub const INFLATE_QUEUE: usize = 0;
/// The deflate queue's index.
pub const DEFLATE_QUEUE: usize = 1;
/// The statistics queue's index, when the device has one.
pub const STATS_QUEUE: usize = 2;
/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The size of the pages the driver counts in: 4 KiB whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
/// Pages of [`PAGE_SIZE`] in a MiB.
pub const PAGES_PER_MIB: u32 = 256;
/// The most page frame numbers read from one chain: Linux's `VIRTIO_BALLOON_ARRAY_PFNS_MAX`.
pub const MAX_PFNS_PER_CHAIN: usize = 256;
/// The most chains one event handles on one queue.
pub const CHAIN_BUDGET: usize = 256;
/// The most statistics read from one buffer: more than the spec's tags, fewer than any abuse.
pub const MAX_STATS: usize = 32;

/// Feature bit: the host may be told of the guest's memory statistics.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;

/// The size of the configuration space: `num_pages` and `actual`, two little-endian u32.
const CONFIG_LEN: usize = 8;
/// Offset of `actual` in the configuration space.
const ACTUAL_OFFSET: u64 = 4;

/// The features the device offers whatever its configuration.
const BASE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Errors of a balloon: those of an active device, each of which stops it until the driver
/// resets it ([`Error::Queue`]), and those of configuring or changing one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The driver broke the virtqueue protocol on one of the queues.
    #[error("The driver broke the protocol of the {queue} queue")]
    Queue {
        /// Which queue: "inflate", "deflate" or "statistics".
        queue: &'static str,
        /// What was wrong.
        #[source]
        source: queue::Error,
    },
    /// The target is too large to count in 4 KiB pages in 32 bits.
    #[error("The balloon's target of {0} MiB is too large")]
    TooLarge(u32),
    /// Statistics were not enabled when the device was created, so they cannot be polled now.
    #[error("Statistics for the balloon device are not enabled")]
    StatsDisabled,
    /// Statistics were enabled when the device was created; they cannot be turned off now.
    #[error("Cannot enable/disable the statistics after boot.")]
    StatsStateChange,
    /// The statistics timer cannot be set up or read.
    #[error("The balloon's statistics timer failed")]
    Timer(#[source] io::Error),
    /// The thread serving the active device did not answer a change.
    #[error("Cannot reach the thread that serves the balloon")]
    Worker(#[source] io::Error),
    /// A saved state does not fit the device.
    #[error("Cannot restore the balloon's saved state")]
    State(#[source] crate::StateError),
}

/// Result of the balloon's steps and changes.
pub type Result<T> = std::result::Result<T, Error>;

/// What a balloon is created with: Firecracker's `PUT /balloon` body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonConfig {
    /// The size the balloon is asked to reach, in MiB.
    pub amount_mib: u32,
    /// Whether the guest may deflate the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// How often the device asks the guest for its memory statistics, in seconds; 0 for never,
    /// and then the device has no statistics queue.
    pub stats_polling_interval_s: u16,
}

impl BalloonConfig {
    /// A balloon asked to reach `amount_mib`, deflated on the guest's OOM when
    /// `deflate_on_oom`, polling statistics every `stats_polling_interval_s` seconds (0: never).
    pub fn new(amount_mib: u32, deflate_on_oom: bool, stats_polling_interval_s: u16) -> Self {
        BalloonConfig {
            amount_mib,
            deflate_on_oom,
            stats_polling_interval_s,
        }
    }
}

/// The guest's memory statistics, as its driver last reported them (virtio 1.2, 5.5.6.3): each
/// is `None` until the driver reports that tag. Memory amounts are in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GuestStats {
    /// VIRTIO_BALLOON_S_SWAP_IN: memory swapped in.
    pub swap_in: Option<u64>,
    /// VIRTIO_BALLOON_S_SWAP_OUT: memory swapped out.
    pub swap_out: Option<u64>,
    /// VIRTIO_BALLOON_S_MAJFLT: major page faults.
    pub major_faults: Option<u64>,
    /// VIRTIO_BALLOON_S_MINFLT: minor page faults.
    pub minor_faults: Option<u64>,
    /// VIRTIO_BALLOON_S_MEMFREE: memory not used at all.
    pub free_memory: Option<u64>,
    /// VIRTIO_BALLOON_S_MEMTOT: memory the guest has.
    pub total_memory: Option<u64>,
    /// VIRTIO_BALLOON_S_AVAIL: memory the guest could use without swapping.
    pub available_memory: Option<u64>,
    /// VIRTIO_BALLOON_S_CACHES: disk caches.
    pub disk_caches: Option<u64>,
    /// VIRTIO_BALLOON_S_HTLB_PGALLOC: huge page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// VIRTIO_BALLOON_S_HTLB_PGFAIL: huge page allocations that failed.
    pub hugetlb_failures: Option<u64>,
}

impl GuestStats {
    /// Records one statistic; unknown tags are ignored.
    pub fn set(&mut self, tag: u16, value: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => return,
        };
        *slot = Some(value);
    }
}

/// The balloon's sizes and the guest's latest statistics: Firecracker's
/// `GET /balloon/statistics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonStats {
    /// The size the balloon is asked to reach, in 4 KiB pages.
    pub target_pages: u32,
    /// The size the driver says the balloon has, in 4 KiB pages.
    pub actual_pages: u32,
    /// `target_pages` in MiB.
    pub target_mib: u32,
    /// `actual_pages` in MiB, rounded down.
    pub actual_mib: u32,
    /// The guest's statistics.
    pub guest: GuestStats,
}

/// What a snapshot records of a balloon ([`Balloon::save_state`]), and what
/// [`Balloon::restore_state`] gives a new one: the configuration space as the driver last saw
/// it, the polling interval as last changed, and the guest's latest statistics.
///
/// Read from a snapshot file, it is the operator's input: [`Balloon::restore_state`] checks
/// that it fits the device it is given to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// `num_pages`: the size the balloon is asked to reach, in 4 KiB pages; a whole number of
    /// MiB, as targets are set.
    pub target_pages: u32,
    /// `actual`: the size the driver last said the balloon has, in 4 KiB pages.
    pub actual_pages: u32,
    /// How often statistics are polled, in seconds; 0 when the device has no statistics queue.
    pub stats_polling_interval_s: u16,
    /// Whether the device offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// The guest's statistics as its driver last reported them.
    pub guest_stats: GuestStats,
}

/// What a balloon counts while it runs, under the names of Firecracker's `balloon` metrics.
/// The counters only go up, with relaxed atomic additions, and wrap rather than panic.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Activations that failed.
    pub activate_fails: AtomicU64,
    /// Inflate chains handled.
    pub inflate_count: AtomicU64,
    /// Deflate chains handled.
    pub deflate_count: AtomicU64,
    /// Statistics buffers the guest filled in.
    pub stats_updates_count: AtomicU64,
    /// Statistics buffers that could not be read.
    pub stats_update_fails: AtomicU64,
    /// Events the handler could not handle as it should: an eventfd or timer that cannot be
    /// read, an interrupt that cannot be raised, a `madvise` refused, a queue whose protocol
    /// the driver broke.
    pub event_fails: AtomicU64,
    /// Pages given back to the host.
    pub inflated_pages: AtomicU64,
    /// Page frame numbers refused: outside guest memory, or a chain's numbers past
    /// [`MAX_PFNS_PER_CHAIN`] or a trailing partial number.
    pub invalid_pfns: AtomicU64,
}

impl BalloonMetrics {
    /// Every counter's name and value, always in the same order.
    pub fn values(&self) -> [(&'static str, u64); 8] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("activate_fails", get(&self.activate_fails)),
            ("inflate_count", get(&self.inflate_count)),
            ("deflate_count", get(&self.deflate_count)),
            ("stats_updates_count", get(&self.stats_updates_count)),
            ("stats_update_fails", get(&self.stats_update_fails)),
            ("event_fails", get(&self.event_fails)),
            ("inflated_pages", get(&self.inflated_pages)),
            ("invalid_pfns", get(&self.invalid_pfns)),
        ]
    }
}

fn add(counter: &AtomicU64, value: u64) {
    counter.fetch_add(value, Ordering::Relaxed);
}

fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

/// `amount_mib` in 4 KiB pages.
///
/// # Errors
///
/// [`Error::TooLarge`] when that does not fit in 32 bits.
pub fn mib_to_pages(amount_mib: u32) -> Result<u32> {
    amount_mib
        .checked_mul(PAGES_PER_MIB)
        .ok_or(Error::TooLarge(amount_mib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_convert_to_pages_and_overflow_is_refused() {
        assert_eq!(mib_to_pages(0).unwrap(), 0);
        assert_eq!(mib_to_pages(128).unwrap(), 32768);
        assert!(matches!(mib_to_pages(u32::MAX), Err(Error::TooLarge(_))));
    }

    #[test]
    fn stats_tags_map_to_firecracker_fields_and_unknown_tags_are_ignored() {
        let mut stats = GuestStats::default();
        for tag in 0..12u16 {
            stats.set(tag, u64::from(tag) + 100);
        }
        assert_eq!(stats.swap_in, Some(100));
        assert_eq!(stats.free_memory, Some(104));
        assert_eq!(stats.total_memory, Some(105));
        assert_eq!(stats.hugetlb_failures, Some(109));
    }

    #[test]
    fn metrics_values_name_every_counter_in_a_fixed_order() {
        let metrics = BalloonMetrics::default();
        let counters = [
            &metrics.activate_fails,
            &metrics.inflate_count,
            &metrics.deflate_count,
            &metrics.stats_updates_count,
            &metrics.stats_update_fails,
            &metrics.event_fails,
            &metrics.inflated_pages,
            &metrics.invalid_pfns,
        ];
        // Each counter gets its own value, so that a name paired with the wrong counter shows.
        for (counter, value) in counters.iter().zip(1u64..) {
            add(counter, value * 10);
        }
        inc(&metrics.invalid_pfns);
        assert_eq!(
            metrics.values(),
            [
                ("activate_fails", 10),
                ("inflate_count", 20),
                ("deflate_count", 30),
                ("stats_updates_count", 40),
                ("stats_update_fails", 50),
                ("event_fails", 60),
                ("inflated_pages", 70),
                ("invalid_pfns", 81),
            ]
        );
    }
}
