//! A virtio-net device (virtio 1.2, section 5.1) over a TAP or any backend with datagram
//! semantics.
//!
//! [`Net`] has a receive queue (0) and a transmit queue (1), no control queue, and offers
//! checksum and TCP segmentation offloads both ways, merged receive buffers and, when one is
//! configured, a MAC address. Every frame carries the 12-byte `virtio_net_hdr_v1`, which goes to
//! and comes from the backend as is: a [`Tap`](crate::tap::Tap) opened with `IFF_VNET_HDR`
//! understands it, so the offloads the guest asks for are the host stack's to do.
//!
//! Once activated, the device serves its queues with a [`NetHandler`], run where the
//! [`Executor`](crate::Executor) says (a worker thread of its own, or the VMM's event manager,
//! see [`crate::worker`]); [`VirtioDevice::reset`] stops it and takes the backend back, so that
//! the device can be activated again.
//!
//! Each direction goes through a rate limiter of its own ([`NetRateLimiters`]), which
//! [`Net::update_rate_limiters`] changes while the device runs.
//!
//! The source is split by role, with the same file names as [`crate::block`]'s: `device.rs` is
//! the device as its transport sees it ([`Net`], its [`PendingUpdate`], and `Running`, the
//! active handler whatever its guest memory type), `handler.rs` what serves the queues once the
//! device is active ([`NetHandler`] and its [`EventHandler`](crate::EventHandler) glue),
//! `backend.rs` the [`NetBackend`] a VMM implements, `metrics.rs` the counters ([`NetMetrics`]).
//!
//! [`VirtioDevice::reset`]: crate::VirtioDevice::reset
//!
//! # Example
//!
//! A device over one end of a socket pair, as the tests use it:
//!
//! ```
//! use std::os::unix::net::UnixDatagram;
//!
//! use ember_virtio::VirtioDevice;
//! use ember_virtio::net::{MacAddr, Net};
//! use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
//! use std::sync::Arc;
//!
//! use vm_memory::GuestMemoryMmap;
//!
//! let (backend, _peer) = UnixDatagram::pair().unwrap();
//! backend.set_nonblocking(true).unwrap();
//! let mac: MacAddr = "06:00:00:00:00:01".parse().unwrap();
//! let net = Net::new(backend, Some(mac));
//! let device: &dyn VirtioDevice<Arc<GuestMemoryMmap>> = &net;
//! assert_eq!(device.device_type(), VIRTIO_ID_NET);
//! let mut config = [0u8; 6];
//! device.read_config(0, &mut config);
//! assert_eq!(config, mac.bytes());
//! ```

mod backend;
mod device;
mod handler;
pub mod mac;
pub mod metrics;

use std::io;

use ember_rate_limiter::{RateLimiter, RateLimiterState};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use backend::NetBackend;
pub use device::{Net, NetState, PendingUpdate};
pub use handler::{
    BACKEND_TOKEN, NetHandler, RX_BUDGET, RX_QUEUE_TOKEN, RX_RATE_LIMITER_TOKEN, TX_BUDGET,
    TX_QUEUE_TOKEN, TX_RATE_LIMITER_TOKEN,
};
pub use mac::MacAddr;
pub use metrics::NetMetrics;

use crate::queue;
use crate::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The number of queues: one receive and one transmit queue, no control queue.
pub const NUM_QUEUES: usize = 2;
/// The largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The size of the virtio-net header in front of every frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = crate::tap::VNET_HDR_LEN;
/// The longest frame the device moves, without its header: a 64 KiB TCP segment with its
/// Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// The longest frame the device moves, with its header.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// The features the device offers whatever its configuration. No UFO: recent Linux TAPs do not
/// take it any more.
pub const BASE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// Errors of a network device: those of an active device, each of which stops it until the
/// driver resets it ([`Error::Queue`], [`Error::Epoll`], [`Error::RateLimiter`]), and those of
/// changing one ([`Error::Worker`], [`Error::Lost`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The driver broke the virtqueue protocol on one of the queues.
    #[error("The driver broke the protocol of the {queue} queue")]
    Queue {
        /// Which queue: "receive" or "transmit".
        queue: &'static str,
        /// What was wrong.
        #[source]
        source: queue::Error,
    },
    /// The worker cannot change the events it waits for on the backend.
    #[error("Cannot change the events the device's worker waits for on its backend")]
    Epoll(#[source] io::Error),
    /// A rate limiter's timer cannot be read, so that it would never let frames through again.
    #[error("The device's {direction} rate limiter failed")]
    RateLimiter {
        /// Which direction: "receive" or "transmit".
        direction: &'static str,
        /// What failed.
        #[source]
        source: ember_rate_limiter::Error,
    },
    /// The thread serving the active device (its worker, or the VMM's event manager) did not
    /// answer a change.
    #[error("Cannot reach the thread that serves the network device")]
    Worker(#[source] io::Error),
    /// The device lost its backend and rate limiters with a handler that could not start
    /// or stop; only a new device can replace them.
    #[error("The network device lost its rate limiters when its handler stopped")]
    Lost,
}

/// The rate limiters of a network device, one per direction. Each frame takes one operation
/// and its length in bytes, the virtio-net header included. The default lets everything
/// through.
#[derive(Debug, Default)]
pub struct NetRateLimiters {
    /// What the device hands the guest: frames read from the backend.
    pub rx: RateLimiter,
    /// What the device hands the backend: frames the guest transmits.
    pub tx: RateLimiter,
}

impl NetRateLimiters {
    /// The buckets of the receive and the transmit limiter, to save.
    pub fn states(&self) -> [RateLimiterState; 2] {
        [self.rx.state(), self.tx.state()]
    }

    /// Restores the buckets of the receive and the transmit limiter from `states`: both, or
    /// neither when either is invalid.
    ///
    /// # Errors
    ///
    /// [`ember_rate_limiter::Error::InvalidState`] when a bucket is invalid.
    pub fn restore(&mut self, states: &[RateLimiterState; 2]) -> ember_rate_limiter::Result<()> {
        let [rx, tx] = states;
        let before = self.rx.state();
        self.rx.restore(rx)?;
        if let Err(err) = self.tx.restore(tx) {
            // Cannot fail: the buckets were just saved from this limiter.
            let _ = self.rx.restore(&before);
            return Err(err);
        }
        Ok(())
    }
}

impl Error {
    fn rx(source: queue::Error) -> Self {
        Error::Queue {
            queue: "receive",
            source,
        }
    }

    fn tx(source: queue::Error) -> Self {
        Error::Queue {
            queue: "transmit",
            source,
        }
    }
}

/// Result of an active device's steps, and of changing a device.
pub type Result<T> = std::result::Result<T, Error>;

fn has_feature(features: u64, bit: u32) -> bool {
    1u64.checked_shl(bit)
        .is_some_and(|mask| features & mask != 0)
}

/// The `TUN_F_*` offloads a backend may use in the frames it hands the guest, given the
/// features the driver accepted: [`TUN_F_CSUM`] with GUEST_CSUM, and with it [`TUN_F_TSO4`] and
/// [`TUN_F_TSO6`] for GUEST_TSO4 and GUEST_TSO6 (segmentation offloads need the checksum one, in
/// the spec as in Linux's TAP).
pub fn offload_flags(features: u64) -> u32 {
    if !has_feature(features, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has_feature(features, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has_feature(features, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features_and_tso_needs_csum() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(offload_flags(0), 0);
        assert_eq!(offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        assert_eq!(
            offload_flags(
                bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6)
            ),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
        assert_eq!(offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        // Host offloads are the guest's to send, not the TAP's to hand over.
        assert_eq!(
            offload_flags(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
            0
        );
    }
}
