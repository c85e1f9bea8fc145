//! The virtio entropy device (virtio 1.2, section 5.4, device ID 4): the guest's hardware
//! random number generator (`/dev/hwrng` in Linux), fed from the host's `getrandom`.
//!
//! [`Rng`] has one request queue and no configuration space. The driver hands it chains of
//! device-writable buffers; the device fills each with random bytes from its
//! [`EntropySource`] (by default [`HostRng`]: `getrandom(2)` with `GRND_NONBLOCK`, so that the
//! handler never blocks) and hands it back with the number of bytes written.
//!
//! Once activated, the device serves its queue with an [`RngHandler`], run where the
//! [`Executor`](crate::Executor) says (a worker thread of its own, or the VMM's event manager,
//! see [`crate::worker`]); [`VirtioDevice::reset`] stops it and takes the source and the rate
//! limiter back, so that the device can be activated again.
//!
//! The source is split by role, with the same file names as [`crate::block`]'s and
//! [`crate::net`]'s: `device.rs` is the device as its transport sees it ([`Rng`], and
//! `Running`, the active handler whatever its guest memory type), `handler.rs` what serves the
//! queue once the device is active ([`RngHandler`] and its [`EventHandler`](crate::EventHandler)
//! glue), `metrics.rs` the counters ([`RngMetrics`]).
//!
//! The guest is not trusted: a request gets at most [`MAX_REQUEST_LEN`] bytes however large its
//! buffers, readable buffers are ignored, a chain without writable buffers completes with
//! nothing written, and one call of [`RngHandler::process_queue`] serves at most [`MAX_BATCH`]
//! chains and [`MAX_BATCH_BYTES`] bytes before it goes back to the event loop. Every request
//! goes through the device's rate limiter (one operation, and the bytes it gets); a request the
//! limiter refuses waits, and the queue with it, until the limiter's timer fires. A driver that
//! breaks the queue protocol puts the device in DEVICE_NEEDS_RESET.
//!
//! [`VirtioDevice::reset`]: crate::VirtioDevice::reset
//!
//! # Example
//!
//! Serving a request without a worker thread, the way benches and fuzz targets do:
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_rate_limiter::RateLimiter;
//! use ember_virtio::MmioInterrupt;
//! use ember_virtio::rng::{HostRng, RngHandler};
//! use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
//! use vm_memory::{Bytes, GuestAddress};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! let mem = Arc::new(guest_memory(0x10000).unwrap());
//! let mut driver = MockDriver::new(16, GuestAddress(0));
//! let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
//! let queue_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let mut handler = RngHandler::new(
//!     HostRng,
//!     RateLimiter::default(),
//!     mem.clone(),
//!     driver.queue(),
//!     queue_evt,
//!     interrupt,
//! );
//!
//! let head = driver
//!     .add_chain(&*mem, &[MockBuffer::writable(0x2000, 256)])
//!     .unwrap();
//! assert_eq!(handler.process_queue().unwrap(), 1);
//! assert_eq!(driver.used_elem(&*mem, 0).unwrap(), (u32::from(head), 256));
//! let mut data = [0u8; 256];
//! mem.read_slice(&mut data, GuestAddress(0x2000)).unwrap();
//! assert_ne!(data, [0u8; 256]);
//! assert_eq!(irq.read().unwrap(), 1);
//! ```

mod device;
mod handler;
pub mod metrics;

use std::io;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use device::{Rng, RngState};
pub use handler::{QUEUE_TOKEN, RATE_LIMITER_TOKEN, RngHandler};
pub use metrics::RngMetrics;

use crate::queue;

/// The number of queues: one request queue.
pub const NUM_QUEUES: usize = 1;
/// The largest size of the queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets, however large the buffers the driver hands over: 64 KiB.
/// Linux asks for far less (a page at most, usually 64 bytes); the rest of a larger chain is
/// left as it was, and the used length says how much was written.
pub const MAX_REQUEST_LEN: usize = 64 << 10;
/// The most chains [`RngHandler::process_queue`] serves in one call, so that a driver that
/// keeps the queue full cannot keep the handler from its other events.
pub const MAX_BATCH: usize = QUEUE_SIZE as usize;
/// The bytes after which [`RngHandler::process_queue`] stops serving chains in one call (the
/// request that crosses it completes): 1 MiB.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// The features the device offers.
pub const FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE];

/// Where an entropy device gets its random bytes: the host's `getrandom` ([`HostRng`]) unless
/// the VMM brings its own (a hardware generator, a seeded generator for tests).
pub trait EntropySource: Send + 'static {
    /// Fills the start of `buf` with random bytes without blocking, and returns how many: fewer
    /// than `buf.len()` (even none) when no more are to be had at once.
    ///
    /// # Errors
    ///
    /// When the source fails; [`io::ErrorKind::WouldBlock`] when it has nothing to give yet.
    /// The request then completes with no bytes, and the driver asks again.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// The host kernel's random source, through `getrandom(2)` with `GRND_NONBLOCK`: it never
/// blocks, and fails with `EAGAIN` only before the host's pool is first initialised.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRng;

impl EntropySource for HostRng {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
            // SAFETY: `buf` is valid for writes of `len` bytes for the whole call, and
            // getrandom writes at most that many.
            let got = unsafe { libc::getrandom(ptr, len, libc::GRND_NONBLOCK) };
            match usize::try_from(got) {
                Ok(count) => return Ok(count.min(buf.len())),
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }
}

/// Errors of an entropy device: those of an active device, each of which stops it until the
/// driver resets it ([`Error::Queue`], [`Error::RateLimiter`]), and that of reaching its
/// handler ([`Error::Worker`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The driver broke the virtqueue protocol.
    #[error("The driver broke the protocol of the entropy device's queue")]
    Queue(#[source] queue::Error),
    /// The rate limiter's timer cannot be read, so that it would never let requests through
    /// again.
    #[error("The entropy device's rate limiter failed")]
    RateLimiter(#[source] ember_rate_limiter::Error),
    /// The thread serving the active device (its worker, or the VMM's event manager) did not
    /// answer.
    #[error("Cannot reach the thread that serves the entropy device")]
    Worker(#[source] io::Error),
}

/// Result of an active device's steps.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, Once, PoisonError};

    use super::*;

    /// A logger that keeps every message, for the tests that check what the device logs.
    struct Capture(Mutex<Vec<String>>);

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            let line = format!("{}: {}", record.level(), record.args());
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line);
        }

        fn flush(&self) {}
    }

    /// Keeps every message logged from now on, in the whole test binary.
    pub(super) fn capture_logs() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            log::set_logger(&CAPTURE).expect("no other logger in the tests");
            log::set_max_level(log::LevelFilter::Trace);
        });
    }

    /// Whether a message that holds `text` was logged at `level` since [`capture_logs`].
    pub(super) fn logged(level: log::Level, text: &str) -> bool {
        let prefix = format!("{level}: ");
        CAPTURE
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|line| line.starts_with(&prefix) && line.contains(text))
    }

    #[test]
    fn the_host_source_fills_buffers_without_blocking() {
        let mut buf = [0u8; 4096];
        let got = HostRng.fill(&mut buf).unwrap();
        assert_eq!(got, buf.len());
        assert!(buf.iter().any(|&byte| byte != 0));
        assert_eq!(HostRng.fill(&mut []).unwrap(), 0);
    }
}
