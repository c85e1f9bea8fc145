//! The virtio block device (virtio 1.2, section 5.2): a disk on a [`BlockBackend`] (by default a
//! raw image file or a host block device, [`RawFile`]), with one request queue.
//!
//! [`Block`] is what the transport sees: the device's features, its configuration space and its
//! lifecycle ([`VirtioDevice`]). Activation hands the queue to a [`BlockWorker`], run where the
//! [`Executor`](crate::Executor) says ([`Runner`]: a worker thread of its own, or the VMM's
//! event manager), which serves the queue whenever the driver notifies it: it pops every
//! chain, parses it ([`request::Request::parse`]), carries it out against the [`Disk`] (the
//! backend with the device's read-only flag and ID), writes the status byte and hands the chain
//! back, then tells the driver queue 0 was used if it wants an interrupt.
//! [`VirtioDevice::reset`] stops the handler and takes the disk back.
//!
//! A VMM brings its own store by implementing [`BlockBackend`] (capacity, vectored read and
//! write, flush, and optionally discard and write zeroes) and building a `Block<B>` on it; the
//! rate limiter, the counters, the batching and every check of what the guest sends stay in the
//! device, in front of any backend.
//!
//! The source is split by role, with the same file names as [`crate::net`]'s: `device.rs` is the
//! device as its transport sees it ([`Block`], its [`Config`] and [`PendingUpdate`], and
//! `Running`, the active handler whatever its guest memory type), `handler.rs` what serves the
//! queue once the device is active ([`BlockWorker`], the `Server` that carries out requests, and
//! the `BlockHandler` glue to [`EventHandler`](crate::EventHandler)), `hold.rs` when the
//! worker holds its interrupt back for the driver's next request ([`hold`]), `backend.rs` the
//! [`BlockBackend`] a VMM implements, `metrics.rs` the counters ([`BlockMetrics`]);
//! `request.rs` parses requests, `disk.rs` and `raw_file.rs` are the disk and its default backend.
//!
//! [`VirtioDevice`]: crate::VirtioDevice
//! [`VirtioDevice::reset`]: crate::VirtioDevice::reset
//! [`Runner`]: crate::Runner
//!
//! The guest is not trusted: every request is checked against the disk's capacity and the
//! device's limits before any I/O, malformed requests complete with an error status, and a driver
//! that breaks the queue protocol puts the device in DEVICE_NEEDS_RESET instead of making the
//! worker panic or spin.
//!
//! # Example
//!
//! Serving a read without the worker thread, the way benches and fuzz targets do:
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_rate_limiter::RateLimiter;
//! use ember_virtio::MmioInterrupt;
//! use ember_virtio::block::{BlockWorker, Disk, RawFile};
//! use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
//! use vm_memory::{Bytes, GuestAddress};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! let path = std::env::temp_dir().join(format!("ember-blk-doc-{}", std::process::id()));
//! std::fs::write(&path, [0xab; 4096]).unwrap();
//! let backend = RawFile::open(&path, true).unwrap();
//! let disk = Disk::new(backend, true, "doc").unwrap();
//! assert_eq!(disk.capacity(), 8);
//!
//! let mem = Arc::new(guest_memory(0x10000).unwrap());
//! let mut driver = MockDriver::new(16, GuestAddress(0));
//! let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
//! // No limit on what the driver asks.
//! let limiter = RateLimiter::default();
//! let mut worker = BlockWorker::new(disk, driver.queue(), mem.clone(), interrupt, limiter);
//!
//! // The driver asks for sector 1: a header (type IN = 0, sector 1), a data buffer, a status.
//! let mut header = [0u8; 16];
//! header[8..].copy_from_slice(&1u64.to_le_bytes());
//! mem.write_slice(&header, GuestAddress(0x1000)).unwrap();
//! let head = driver
//!     .add_chain(
//!         &*mem,
//!         &[
//!             MockBuffer::readable(0x1000, 16),
//!             MockBuffer::writable(0x2000, 512),
//!             MockBuffer::writable(0x3000, 1),
//!         ],
//!     )
//!     .unwrap();
//!
//! assert_eq!(worker.process_queue().unwrap(), 1);
//! let status: u8 = mem.read_obj(GuestAddress(0x3000)).unwrap();
//! assert_eq!(status, 0); // VIRTIO_BLK_S_OK
//! assert_eq!(driver.used_elem(&*mem, 0).unwrap(), (u32::from(head), 513));
//! let mut data = [0u8; 512];
//! mem.read_slice(&mut data, GuestAddress(0x2000)).unwrap();
//! assert_eq!(data, [0xab; 512]);
//! assert_eq!(irq.read().unwrap(), 1);
//! std::fs::remove_file(&path).unwrap();
//! ```

mod backend;
mod device;
mod disk;
#[cfg(test)]
mod fixtures;
mod handler;
pub mod hold;
pub mod metrics;
mod raw_file;
pub mod request;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

pub use backend::{BlockBackend, copy_from_bufs, copy_to_bufs};
pub use device::{Block, BlockState, Config, PendingUpdate};
pub use disk::{Completion, Disk, ID_BYTES};
pub use handler::BlockWorker;
pub use hold::MAX_INTERRUPT_HOLD;
pub use metrics::BlockMetrics;
pub use raw_file::{INHERITED_FD_PREFIX, RawFile, check_inherited_fd, inherited_fd};
pub use request::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
pub use uring::{AsyncIo, IoEngine};

/// Size in bytes of a sector, the unit of the protocol's sector numbers and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the device's one queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most data buffers a read or write may use (`seg_max`): the queue size less the header
/// and the status, so that a request fits in the ring even without indirect descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most data bytes one read or write may move: 256 MiB, far above what Linux sends unless
/// told to (`max_sectors_kb`). Larger requests complete with IOERR.
pub const MAX_DATA_LEN: u32 = 256 << 20;
/// The most sectors one discard segment may cover (`max_discard_sectors`): 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The most segments one discard may hold (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 1;
/// The most sectors one write zeroes segment may cover (`max_write_zeroes_sectors`): 1 GiB.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// The most segments one write zeroes may hold (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// The most chains [`BlockWorker::process_queue`] serves in one call, so that a driver that
/// keeps the queue full cannot keep the worker from its other events.
pub const MAX_BATCH: usize = QUEUE_SIZE as usize;
/// The bytes on the disk after which [`BlockWorker::process_queue`] stops serving chains in
/// one call (the request that crosses it completes): 4 MiB, so that a batch of the largest
/// requests cannot keep the worker from its other events (a PATCH, a pause) for long either;
/// going back to the event loop once per 4 MiB costs an eventfd write and an epoll wait.
pub const MAX_BATCH_BYTES: u64 = 4 << 20;
/// Length of the configuration space: `struct virtio_blk_config` up to and including the write
/// zeroes fields.
pub const CONFIG_LEN: usize = 60;

// Offsets of the fields of `struct virtio_blk_config` (virtio 1.2, 5.2.4).
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_MAX_DISCARD_SECTORS: usize = 36;
const CONFIG_MAX_DISCARD_SEG: usize = 40;
const CONFIG_DISCARD_SECTOR_ALIGNMENT: usize = 44;
const CONFIG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CONFIG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CONFIG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// The epoll token of the queue's notification eventfd.
const QUEUE_TOKEN: u64 = 0;
/// The epoll token of the rate limiter's timerfd.
const RATE_LIMITER_TOKEN: u64 = 1;
/// The epoll token of the asynchronous engine's completion eventfd.
const COMPLETION_TOKEN: u64 = 2;

/// Errors of setting up or changing a block device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image cannot be opened.
    #[error("Cannot open the disk image {}", path.display())]
    Open {
        /// The image's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("The disk image {} is neither a regular file nor a block device", path.display())]
    NotADisk {
        /// The image's path.
        path: PathBuf,
    },
    /// The image's size cannot be read.
    #[error("Cannot read the size of the disk image {}", path.display())]
    Size {
        /// The image's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is not a whole number of 512-byte sectors.
    #[error("The disk image {} is {size} bytes long, not a multiple of 512 bytes", path.display())]
    SizeNotSectorMultiple {
        /// The image's path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The ID is longer than the 20 bytes GET_ID returns.
    #[error("The disk ID is {len} bytes long; it can be at most 20 bytes")]
    IdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The ID holds something other than printable ASCII characters.
    #[error("The disk ID holds characters other than printable ASCII")]
    IdNotPrintable,
    /// The thread serving the active device (its worker, or the VMM's event manager) did not
    /// answer.
    #[error("Cannot reach the thread that serves the block device")]
    Worker(#[source] io::Error),
    /// The device lost its disk and rate limiter with a handler that panicked; only a
    /// new device can replace it.
    #[error("The block device lost its disk when its handler stopped")]
    Lost,
    /// The backend cannot write, and the device is not read-only.
    #[error("The disk backend is read-only, and the block device is not")]
    ReadOnlyBackend,
    /// The backend's capacity is not a whole number of 512-byte sectors.
    #[error("The disk backend holds {capacity} bytes, not a multiple of 512 bytes")]
    CapacityNotSectorMultiple {
        /// The backend's capacity in bytes.
        capacity: u64,
    },
    /// A path under `/proc/self/fd/` that does not end in a descriptor number.
    #[error(
        "The disk path {} names no descriptor: /proc/self/fd/ must be followed by a descriptor number alone",
        path.display()
    )]
    FdPath {
        /// The path, as given.
        path: PathBuf,
    },
    /// An inherited descriptor named as the disk is not open, or cannot be duplicated.
    #[error("Cannot use the inherited descriptor {fd} as a disk image")]
    Fd {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The host cannot give the asynchronous engine ([`IoEngine::Async`]) an io_uring: the
    /// kernel has none (ENOSYS), or refuses it (EPERM: disabled by `kernel.io_uring_disabled`,
    /// or a seccomp filter), or is out of memory for it.
    #[error("Cannot {what} an io_uring for the asynchronous block engine")]
    IoUring {
        /// What could not be done.
        what: &'static str,
        /// Why, with the errno.
        #[source]
        source: io::Error,
    },
    /// The asynchronous engine needs a backend on a file ([`BlockBackend::async_fd`]).
    #[error("The disk backend has no file for the asynchronous block engine")]
    NoAsyncFile,
    /// An inherited descriptor named as the disk was not opened for what the drive needs.
    #[error("The inherited descriptor {fd} is not open for {needed}")]
    FdAccess {
        /// The descriptor.
        fd: RawFd,
        /// What it must be open for.
        needed: &'static str,
    },
}

/// Result of setting up or changing a block device.
pub type Result<T> = std::result::Result<T, Error>;
