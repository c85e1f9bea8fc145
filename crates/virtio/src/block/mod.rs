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
mod disk;
pub mod metrics;
mod raw_file;
pub mod request;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ember_rate_limiter::{BucketUpdate, Clock, MonotonicClock, RateLimiter, TokenType};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use backend::{BlockBackend, copy_from_bufs, copy_to_bufs};
pub use disk::{Completion, Disk, ID_BYTES};
pub use metrics::BlockMetrics;
pub use raw_file::{INHERITED_FD_PREFIX, RawFile, check_inherited_fd, inherited_fd};
pub use request::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

use crate::device::{
    ActivateError, ActivateParams, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    read_config_bytes,
};
use crate::queue::{self, DescriptorChain, Queue};
use crate::worker::{EventHandler, EventOps, Reply, Runner};
use metrics::inc;
use request::Request;

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

/// What a block device is, beside its backend.
///
/// # Example
///
/// ```
/// use ember_virtio::block::Config;
///
/// let config = Config::new("rootfs").with_read_only(true);
/// assert_eq!(config.id, "rootfs");
/// assert!(config.read_only);
/// ```
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Config {
    /// Whether the guest may only read the disk: the device offers VIRTIO_BLK_F_RO and refuses
    /// writes, discards and write zeroes itself, whatever the backend could do.
    pub read_only: bool,
    /// The device ID string GET_ID returns: printable ASCII of at most [`ID_BYTES`] (20) bytes,
    /// NUL-padded to 20. Longer IDs are refused ([`Error::IdTooLong`]), not cut short, so that
    /// two disks cannot end up with the same ID. It also names the worker thread.
    pub id: String,
    /// What the device lets through: each request takes one operation, and a read, a write, a
    /// discard or a write zeroes the bytes it covers on the disk. The default lets everything
    /// through.
    pub rate_limiter: RateLimiter,
}

impl Config {
    /// A writable device with the ID `id` and no rate limit.
    pub fn new(id: impl Into<String>) -> Self {
        Config {
            id: id.into(),
            ..Config::default()
        }
    }

    /// With the guest allowed only to read the disk, or not.
    #[must_use]
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Behind `rate_limiter`.
    #[must_use]
    pub fn with_rate_limiter(mut self, rate_limiter: RateLimiter) -> Self {
        self.rate_limiter = rate_limiter;
        self
    }
}

/// A virtio block device on the backend `B`.
pub struct Block<B = RawFile> {
    id: String,
    read_only: bool,
    features: u64,
    /// The configuration space, but for the capacity, which `capacity` holds.
    config_space: [u8; CONFIG_LEN],
    /// The capacity in sectors, which the worker changes when it takes a new disk.
    capacity: Arc<AtomicU64>,
    state: State<B>,
    metrics: Arc<BlockMetrics>,
}

/// Where the disk and the rate limiter are: with the device, or with the worker serving the
/// queue.
#[allow(
    clippy::large_enum_variant,
    reason = "a device has one state, which moves only when the device is activated or reset"
)]
enum State<B> {
    Ready {
        disk: Disk<B>,
        rate_limiter: RateLimiter,
    },
    Active {
        worker: Box<dyn ActiveWorker<B>>,
    },
    /// The worker thread panicked and took the disk with it.
    Lost,
}

impl<B> fmt::Debug for Block<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Ready { .. } => "ready",
            State::Active { .. } => "active",
            State::Lost => "lost",
        };
        f.debug_struct("Block")
            .field("id", &self.id)
            .field("read_only", &self.read_only)
            .field("features", &format_args!("{:#x}", self.features))
            .field("state", &state)
            .finish()
    }
}

impl<B: BlockBackend> Block<B> {
    /// The device `config` describes, on `backend`, behind `config`'s rate limiter.
    ///
    /// The device offers VERSION_1, EVENT_IDX, INDIRECT_DESC, FLUSH and SEG_MAX; RO for a
    /// read-only disk; for a writable one, WRITE_ZEROES and DISCARD where the backend supports
    /// them ([`BlockBackend::supports_write_zeroes`], [`BlockBackend::supports_discard`]: a
    /// [`RawFile`] always zeroes, and discards where its file system can punch holes).
    ///
    /// # Errors
    ///
    /// As [`Disk::new`].
    pub fn new(backend: B, config: Config) -> Result<Self> {
        let disk = Disk::new(backend, config.read_only, &config.id)?;
        Ok(Block {
            id: config.id,
            read_only: config.read_only,
            features: features(&disk),
            config_space: config_space(&disk),
            capacity: Arc::new(AtomicU64::new(disk.capacity())),
            state: State::Ready {
                disk,
                rate_limiter: config.rate_limiter,
            },
            metrics: Arc::default(),
        })
    }

    /// The device's counters, which its worker updates while it runs.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// The device's ID string.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether a worker is serving the queue.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// Whether the guest may only read the disk.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The disk's size in 512-byte sectors, as the driver reads it in the configuration space.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Changes the rate limiter's buckets; a bucket given [`BucketUpdate::None`] keeps its
    /// state (tokens, debt and burst). On an active device the change is handed to the worker
    /// thread, which makes it between two events (a request the old limits held back is then
    /// retried at once under the new ones); otherwise it is kept for the next activation.
    /// Counted in `update_count`, or `update_fails`.
    ///
    /// It never waits for the worker: the caller waits on the [`PendingUpdate`] it returns,
    /// after it released whatever lock it holds the device under (the transport, which vCPUs
    /// take).
    ///
    /// # Errors
    ///
    /// [`Error::Worker`] when the thread that serves it is gone, [`Error::Lost`] when the device lost
    /// its rate limiter with a worker that panicked.
    pub fn update_rate_limiter(
        &mut self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<PendingUpdate> {
        let pending = match &mut self.state {
            State::Ready { rate_limiter, .. } => {
                rate_limiter.update_buckets(bandwidth, ops);
                inc(&self.metrics.update_count);
                Ok(PendingUpdate::done(&self.metrics))
            }
            State::Active { worker, .. } => worker
                .update_rate_limiter(bandwidth, ops)
                .map(|reply| PendingUpdate::waiting(reply, &self.metrics))
                .map_err(Error::Worker),
            State::Lost => Err(Error::Lost),
        };
        if pending.is_err() {
            inc(&self.metrics.update_fails);
        }
        pending
    }

    /// Replaces the backend with `backend`, which the caller opened (for a [`RawFile`], with
    /// [`RawFile::open`] and the device's [`read_only`](Block::read_only) flag) without holding
    /// the device, so that no lock on it is held while a slow file system opens the new one. On
    /// an active device the worker thread takes the new backend between two requests (a
    /// request the rate limiter holds back is checked again against the new capacity), then
    /// sets the new capacity and tells the driver through a configuration change interrupt.
    /// The device keeps its read-only flag and ID, and the features stay as negotiated: if the
    /// new backend cannot discard where the old one could, discards complete with UNSUPP.
    /// Counted in `update_count`, or `update_fails`.
    ///
    /// It never waits for the worker: the caller waits on the [`PendingUpdate`] it returns,
    /// after it released whatever lock it holds the device under; the old backend is dropped
    /// (a file closed) then, on the caller's thread.
    ///
    /// # Errors
    ///
    /// Those of [`Disk::new`] when the new backend cannot back the device
    /// ([`Error::ReadOnlyBackend`] for a read-only one on a writable device; the old backend
    /// stays); [`Error::Worker`] when the worker thread is gone, [`Error::Lost`] when the
    /// device lost its disk with a worker that panicked.
    pub fn update_disk(&mut self, backend: B) -> Result<PendingUpdate> {
        let pending =
            Disk::new(backend, self.read_only, &self.id).and_then(|disk| self.replace_disk(disk));
        if pending.is_err() {
            inc(&self.metrics.update_fails);
        }
        pending
    }

    fn replace_disk(&mut self, disk: Disk<B>) -> Result<PendingUpdate> {
        match &mut self.state {
            State::Ready { disk: old, .. } => {
                self.capacity.store(disk.capacity(), Ordering::Release);
                *old = disk;
                inc(&self.metrics.update_count);
                Ok(PendingUpdate::done(&self.metrics))
            }
            State::Active { worker, .. } => worker
                .replace_disk(disk, self.capacity.clone())
                .map(|reply| PendingUpdate::waiting(reply, &self.metrics))
                .map_err(Error::Worker),
            State::Lost => Err(Error::Lost),
        }
    }
}

impl<B> Block<B> {
    fn stop_worker(&mut self) {
        if !matches!(self.state, State::Active { .. }) {
            return;
        }
        let State::Active { worker, .. } = std::mem::replace(&mut self.state, State::Lost) else {
            return;
        };
        match worker.stop() {
            Ok((disk, rate_limiter)) => self.state = State::Ready { disk, rate_limiter },
            Err(err) => log::error!("The block device {} lost its disk: {err}", self.id),
        }
    }
}

impl<B> Drop for Block<B> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl<M: GuestAddressSpace + Send + 'static, B: BlockBackend> VirtioDevice<M> for Block<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if !config_range_ok(offset, data.len()) {
            inc(&self.metrics.cfg_fails);
        }
        let mut config = self.config_space;
        put_config(&mut config, CONFIG_CAPACITY, &self.capacity().to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only: without CONFIG_WCE there is nothing the driver may write.
        inc(&self.metrics.cfg_fails);
        log::debug!(
            "The block device {} ignored a {}-byte configuration write at {offset:#x}",
            self.id,
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams<M>) -> std::result::Result<(), ActivateError> {
        let result = self.start_worker(params);
        if result.is_err() {
            inc(&self.metrics.activate_fails);
        }
        result
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl<B: BlockBackend> Block<B> {
    /// Hands the disk, the rate limiter and the queue to a handler, run where the executor
    /// says.
    fn start_worker<M: GuestAddressSpace + Send + 'static>(
        &mut self,
        params: ActivateParams<M>,
    ) -> std::result::Result<(), ActivateError> {
        let ActivateParams {
            mem,
            features: _,
            queues,
            queue_evts,
            interrupt,
            executor,
        } = params;
        for given in [queues.len(), queue_evts.len()] {
            if given != 1 {
                return Err(ActivateError::QueueCount { expected: 1, given });
            }
        }
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                given: 0,
            });
        };
        if !matches!(self.state, State::Ready { .. }) {
            return Err(ActivateError::AlreadyActive);
        }
        let State::Ready { disk, rate_limiter } = std::mem::replace(&mut self.state, State::Lost)
        else {
            return Err(ActivateError::AlreadyActive);
        };
        let handler = BlockHandler {
            worker: BlockWorker::new(disk, queue, mem, interrupt, rate_limiter)
                .with_metrics(self.metrics.clone()),
            queue_evt,
            id: self.id.clone(),
            broken: false,
        };
        let name = if self.id.is_empty() {
            "ember-blk".to_string()
        } else {
            format!("ember-blk-{}", self.id)
        };
        match Runner::start(name, handler, &executor) {
            Ok(worker) => {
                self.state = State::Active {
                    worker: Box::new(worker),
                };
                Ok(())
            }
            Err(err) => {
                let (disk, rate_limiter) = err.handler.worker.into_parts();
                self.state = State::Ready { disk, rate_limiter };
                Err(ActivateError::Worker(err.error))
            }
        }
    }
}

/// Whether a configuration access of `len` bytes at `offset` lies inside the configuration
/// space.
fn config_range_ok(offset: u64, len: usize) -> bool {
    usize::try_from(offset)
        .ok()
        .and_then(|start| start.checked_add(len))
        .is_some_and(|end| end <= CONFIG_LEN)
}

/// The features a device on `disk` offers.
fn features<B: BlockBackend>(disk: &Disk<B>) -> u64 {
    let mut features = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_SEG_MAX);
    if disk.read_only() {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        if disk.backend().supports_write_zeroes() {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if disk.backend().supports_discard() {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
    }
    features
}

/// The configuration space of a device on `disk`, little-endian; the fields of features it
/// does not offer stay 0.
fn config_space<B: BlockBackend>(disk: &Disk<B>) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| put_config(&mut config, offset, bytes);
    let backend = disk.backend();
    let discard = !disk.read_only() && backend.supports_discard();
    put(CONFIG_CAPACITY, &disk.capacity().to_le_bytes());
    put(CONFIG_SEG_MAX, &SEG_MAX.to_le_bytes());
    if discard {
        put(
            CONFIG_MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(CONFIG_MAX_DISCARD_SEG, &MAX_DISCARD_SEG.to_le_bytes());
        put(
            CONFIG_DISCARD_SECTOR_ALIGNMENT,
            &backend.discard_alignment().max(1).to_le_bytes(),
        );
    }
    if !disk.read_only() && backend.supports_write_zeroes() {
        put(
            CONFIG_MAX_WRITE_ZEROES_SECTORS,
            &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
        );
        put(
            CONFIG_MAX_WRITE_ZEROES_SEG,
            &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
        );
        put(CONFIG_WRITE_ZEROES_MAY_UNMAP, &[u8::from(discard)]);
    }
    config
}

/// Writes `bytes` into the field at `offset` of the configuration space `config`.
fn put_config(config: &mut [u8; CONFIG_LEN], offset: usize, bytes: &[u8]) {
    let end = offset.saturating_add(bytes.len());
    if let Some(field) = config.get_mut(offset..end) {
        field.copy_from_slice(bytes);
    }
}

/// Serves a block device's queue: the request path, without the thread around it.
///
/// [`BlockWorker::process_queue`] is what the worker thread runs on every notification; tests
/// and benches call it directly.
///
/// Every request goes through the rate limiter first: one operation, and the bytes it covers on
/// the disk (the data of a read or a write, the range of a discard or a write zeroes, which the
/// host writes or deallocates as surely as a write). A request the limiter refuses is not lost
/// nor failed: the worker
/// keeps its chain, stops serving the queue ([`BlockWorker::is_throttled`]) and serves that
/// chain first when called again, once the limiter's timerfd has fired and
/// [`RateLimiter::event_handler`] has been called. The limiter reads the time from `C`, the
/// monotonic clock unless a test gives it another.
///
/// The disk's backend `B` is called directly, without dynamic dispatch, on every request.
pub struct BlockWorker<M, B = RawFile, C: Clock = MonotonicClock> {
    server: Server<B, C>,
    queue: Queue,
    mem: M,
    interrupt: Arc<dyn VirtioInterrupt>,
    irq_error_logged: bool,
    /// Whether the last call stopped on its budget, with chains maybe left.
    budget_spent: bool,
}

/// What carries out the requests of a queue: the disk, the rate limiter in front of it, and
/// the counters.
struct Server<B, C: Clock> {
    disk: Disk<B>,
    rate_limiter: RateLimiter<C>,
    /// The chain the rate limiter held back, served before any other.
    throttled: Option<DescriptorChain>,
    metrics: Arc<BlockMetrics>,
}

impl<M, B, C: Clock + fmt::Debug> fmt::Debug for BlockWorker<M, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockWorker")
            .field("disk", &self.server.disk)
            .field("queue", &self.queue)
            .field("rate_limiter", &self.server.rate_limiter)
            .field("throttled", &self.server.throttled.is_some())
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace, B: BlockBackend, C: Clock> BlockWorker<M, B, C> {
    /// Serves `queue`, which the driver set up in `mem`, from `disk`, as fast as
    /// `rate_limiter` lets it (`RateLimiter::default()` lets everything through), telling the
    /// driver through `interrupt`. It takes a snapshot of `mem` for each call to
    /// [`BlockWorker::process_queue`]. It counts into counters of its own until given others
    /// ([`BlockWorker::with_metrics`]).
    pub fn new(
        disk: Disk<B>,
        queue: Queue,
        mem: M,
        interrupt: Arc<dyn VirtioInterrupt>,
        rate_limiter: RateLimiter<C>,
    ) -> Self {
        BlockWorker {
            server: Server {
                disk,
                rate_limiter,
                throttled: None,
                metrics: Arc::default(),
            },
            queue,
            mem,
            interrupt,
            irq_error_logged: false,
            budget_spent: false,
        }
    }

    /// Counts into `metrics`, a device's counters, from now on.
    pub fn with_metrics(mut self, metrics: Arc<BlockMetrics>) -> Self {
        self.server.metrics = metrics;
        self
    }

    /// The counters the worker updates.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.server.metrics
    }

    /// Serves the chains the driver made available and returns how many.
    ///
    /// Notifications stay off while the queue is drained, and are turned back on before it
    /// stops; chains made available in between are served too, so none waits for a
    /// notification that will not come. When done, it raises the interrupt if the driver wants
    /// one (VIRTQ_AVAIL_F_NO_INTERRUPT, or `used_event` with EVENT_IDX).
    ///
    /// It serves at most [`MAX_BATCH`] chains, and stops after the request that takes the
    /// chains served past [`MAX_BATCH_BYTES`] on the disk: then chains may be left, and
    /// notifications may still be off ([`BlockWorker::budget_spent`]); call it again. It
    /// looks at the ring again after turning notifications back on at most [`MAX_BATCH`]
    /// times, so that a driver that moves its available index back and forth cannot keep it
    /// there either; it then returns with notifications on. When the rate limiter refuses a
    /// request, it stops there with notifications off and the chain kept
    /// ([`BlockWorker::is_throttled`]): call it again once the limiter's timer has fired.
    ///
    /// # Errors
    ///
    /// A [`queue::Error`] when the driver broke the queue protocol (or the rings cannot be
    /// reached): the device should then be put in DEVICE_NEEDS_RESET. The chains served before
    /// the error have been handed back.
    pub fn process_queue(&mut self) -> std::result::Result<usize, queue::Error> {
        let BlockWorker {
            server,
            queue,
            mem,
            interrupt,
            irq_error_logged,
            budget_spent,
        } = self;
        let mem = mem.memory();
        let mem = &*mem;
        let mut budget = Budget::default();
        *budget_spent = false;
        let mut passes = 0usize;
        let result = loop {
            if let Err(err) = queue.disable_notification(mem) {
                break Err(err);
            }
            match server.drain(queue, mem, &mut budget) {
                Ok(Drained::Empty) => {}
                // Notifications stay off: the caller comes back, or the limiter's timer does.
                Ok(Drained::Full) => {
                    *budget_spent = true;
                    break Ok(());
                }
                Ok(Drained::Throttled) => break Ok(()),
                Err(err) => break Err(err),
            }
            match queue.enable_notification(mem) {
                // With notifications on, a driver that makes more chains available notifies.
                Ok(true) if passes < MAX_BATCH => passes += 1,
                Ok(_) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        let served = budget.chains;
        if served > 0 && queue.needs_notification(mem)? {
            if let Err(err) = interrupt.trigger(VirtioInterruptType::Queue(0)) {
                inc(&server.metrics.event_fails);
                if !*irq_error_logged {
                    *irq_error_logged = true;
                    log::error!("A block device cannot raise its interrupt: {err}");
                }
            }
        }
        result.map(|()| served)
    }

    /// Whether the last [`BlockWorker::process_queue`] stopped on its budget of chains or
    /// bytes, so that chains may be left: the caller calls it again after its other events.
    pub fn budget_spent(&self) -> bool {
        self.budget_spent
    }

    /// Whether the rate limiter holds a request back: [`BlockWorker::process_queue`] serves
    /// nothing more until the limiter's timer fires.
    pub fn is_throttled(&self) -> bool {
        self.server.throttled.is_some()
    }

    /// The rate limiter requests go through.
    pub fn rate_limiter(&self) -> &RateLimiter<C> {
        &self.server.rate_limiter
    }

    /// The rate limiter requests go through, to handle its timer's event
    /// ([`RateLimiter::event_handler`]) or change its buckets.
    pub fn rate_limiter_mut(&mut self) -> &mut RateLimiter<C> {
        &mut self.server.rate_limiter
    }

    /// The queue being served.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The disk requests are served from.
    pub fn disk(&self) -> &Disk<B> {
        &self.server.disk
    }

    /// Serves the requests from `disk` from now on, and gives back the disk they were served
    /// from. A request the rate limiter holds back is checked against the new disk when it goes.
    pub fn replace_disk(&mut self, disk: Disk<B>) -> Disk<B> {
        std::mem::replace(&mut self.server.disk, disk)
    }

    /// Gives the disk back.
    pub fn into_disk(self) -> Disk<B> {
        self.server.disk
    }

    /// Gives the disk and the rate limiter back.
    pub fn into_parts(self) -> (Disk<B>, RateLimiter<C>) {
        (self.server.disk, self.server.rate_limiter)
    }
}

/// What one [`BlockWorker::process_queue`] call served so far.
#[derive(Debug, Default)]
struct Budget {
    chains: usize,
    bytes: u64,
}

impl Budget {
    fn spent(&self) -> bool {
        self.chains >= MAX_BATCH || self.bytes >= MAX_BATCH_BYTES
    }
}

/// Why [`Server::drain`] stopped.
enum Drained {
    /// No chain is left.
    Empty,
    /// The budget of one call is spent.
    Full,
    /// The rate limiter held a request back.
    Throttled,
}

/// What became of one chain.
enum Served {
    /// Handed back with this used length, after moving this many bytes on the disk.
    Used(u32, u64),
    /// Held back by the rate limiter.
    Throttled,
}

impl<B: BlockBackend, C: Clock> Server<B, C> {
    /// Serves the chain held back, then available chains, until there are none, the `budget`
    /// is spent, or the rate limiter holds one back.
    fn drain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        budget: &mut Budget,
    ) -> std::result::Result<Drained, queue::Error> {
        while !budget.spent() {
            let chain = match self.throttled.take() {
                Some(chain) => chain,
                None => match queue.pop(mem)? {
                    Some(chain) => chain,
                    None => return Ok(Drained::Empty),
                },
            };
            match self.serve(mem, &chain) {
                Served::Used(used, bytes) => {
                    queue.add_used(mem, chain.head_index(), used)?;
                    budget.chains += 1;
                    budget.bytes = budget.bytes.saturating_add(bytes);
                }
                Served::Throttled => {
                    self.throttled = Some(chain);
                    return Ok(Drained::Throttled);
                }
            }
        }
        Ok(Drained::Full)
    }

    /// Parses the request in `chain`, lets it through the rate limiter, carries it out and
    /// counts it (as [`Disk::handle`], with the limiter and the counters).
    ///
    /// Every chain takes an operation, malformed ones too, so that a driver cannot get round
    /// an operations limit with requests that fail. A read or a write also takes its data
    /// length in bytes, and a discard or a write zeroes the length of its range (at most
    /// [`MAX_DISCARD_SECTORS`] or [`MAX_WRITE_ZEROES_SECTORS`] sectors), so that a throttled
    /// guest cannot have the host write or deallocate more than its bandwidth allows. Flushes
    /// and GET_ID move no data through the disk.
    fn serve<M: GuestMemory>(&mut self, mem: &M, chain: &DescriptorChain) -> Served {
        let parsed = Request::parse(chain, mem, self.disk.capacity());
        let bytes = parsed
            .as_ref()
            .map_or(0, |request| disk_bytes(request.request_type()));
        if !self.admit(bytes) {
            inc(&self.metrics.rate_limiter_throttled_events);
            return Served::Throttled;
        }
        let used = match parsed {
            Ok(request) => {
                let completion = self.disk.execute(mem, &request);
                self.metrics.completed(request.request_type(), completion);
                disk::complete(mem, request.status_addr(), completion)
            }
            Err(err) => {
                inc(&self.metrics.invalid_reqs_count);
                disk::refuse(mem, chain, &err)
            }
        };
        Served::Used(used, bytes)
    }

    /// Takes an operation and `bytes` bytes from the rate limiter, or nothing if it refuses
    /// either.
    fn admit(&mut self, bytes: u64) -> bool {
        if !self.rate_limiter.consume(1, TokenType::Ops) {
            return false;
        }
        if bytes > 0 && !self.rate_limiter.consume(bytes, TokenType::Bytes) {
            self.rate_limiter.replenish(1, TokenType::Ops);
            return false;
        }
        true
    }
}

/// The bytes a request covers on the disk, which the bandwidth bucket is charged.
fn disk_bytes(request_type: request::RequestType) -> u64 {
    use request::RequestType;
    match request_type {
        RequestType::In { len, .. } | RequestType::Out { len, .. } => u64::from(len),
        RequestType::Discard(segment) | RequestType::WriteZeroes(segment) => {
            u64::from(segment.num_sectors).saturating_mul(SECTOR_SIZE)
        }
        RequestType::Flush | RequestType::GetId { .. } => 0,
    }
}

/// The device's event handler: a [`BlockWorker`] and the queue's notification eventfd.
///
/// It waits on the notification eventfd and the rate limiter's timerfd. While the limiter
/// holds a request back, notifications are read and ignored (the driver is not asked for them
/// either: the queue's notifications stay off), and the timer's event resumes the queue.
struct BlockHandler<M, B> {
    worker: BlockWorker<M, B>,
    queue_evt: EventFd,
    id: String,
    /// Whether the driver broke the protocol: the handler serves nothing until reset.
    broken: bool,
}

impl<M, B> fmt::Debug for BlockHandler<M, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockHandler")
            .field("worker", &self.worker)
            .field("id", &self.id)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace + Send + 'static, B: BlockBackend> EventHandler for BlockHandler<M, B> {
    fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
        ops.add(self.queue_evt.as_raw_fd(), EventSet::IN, QUEUE_TOKEN)?;
        ops.add(
            self.worker.rate_limiter().as_raw_fd(),
            EventSet::IN,
            RATE_LIMITER_TOKEN,
        )
    }

    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, _events: EventSet) {
        if self.broken {
            return;
        }
        match token {
            QUEUE_TOKEN => self.queue_event(ops),
            RATE_LIMITER_TOKEN => self.rate_limiter_event(ops),
            _ => {}
        }
    }
}

impl<M: GuestAddressSpace + Send + 'static, B: BlockBackend> BlockHandler<M, B> {
    fn queue_event(&mut self, ops: &mut EventOps<'_>) {
        let metrics = self.worker.metrics().clone();
        inc(&metrics.queue_event_count);
        // Clears the notification; the queue itself says what there is to do.
        if let Err(err) = self.queue_evt.read() {
            if err.kind() != io::ErrorKind::WouldBlock {
                inc(&metrics.event_fails);
                log::debug!(
                    "The block device {} cannot read its queue eventfd: {err}",
                    self.id
                );
            }
        }
        // The new requests wait behind the one held back, for the timer.
        if !self.worker.is_throttled() {
            self.serve(ops, true);
        }
    }

    fn rate_limiter_event(&mut self, ops: &mut EventOps<'_>) {
        let metrics = self.worker.metrics().clone();
        inc(&metrics.rate_limiter_event_count);
        match self.worker.rate_limiter_mut().event_handler() {
            Ok(()) => {}
            // The timer was re-armed after epoll saw it (the buckets changed): it fires again.
            Err(ember_rate_limiter::Error::SpuriousEvent) => return,
            Err(err) => {
                // The limiter would stay blocked, and its timerfd readable: stop.
                inc(&metrics.event_fails);
                log::error!(
                    "The block device {} stops serving its queue until the driver resets it: {}",
                    self.id,
                    error_chain(&err)
                );
                self.fail(ops);
                return;
            }
        }
        if self.worker.is_throttled() {
            self.serve(ops, false);
        }
    }

    /// Serves the queue; with `count_empty`, finding nothing to serve counts as
    /// `no_avail_buffer`.
    fn serve(&mut self, ops: &mut EventOps<'_>, count_empty: bool) {
        let metrics = self.worker.metrics().clone();
        match self.worker.process_queue() {
            // Chains may be left: come back to them after the other events.
            Ok(_) if self.worker.budget_spent() => {
                if let Err(err) = self.queue_evt.write(1) {
                    inc(&metrics.event_fails);
                    log::error!(
                        "The block device {} cannot requeue its work: {err}",
                        self.id
                    );
                }
            }
            Ok(0) if count_empty && !self.worker.is_throttled() => {
                inc(&metrics.no_avail_buffer);
            }
            Ok(_) => {}
            Err(err) => {
                // The guest can do this at every activation: counted, and a warning only.
                inc(&metrics.queue_fails);
                log::warn!(
                    "The block device {} stops serving its queue until the driver resets it: {}",
                    self.id,
                    error_chain(&err)
                );
                self.fail(ops);
            }
        }
    }

    /// Stops serving the queue and asks the driver for a reset. The handler's descriptors no
    /// longer wake the thread, which waits for its stop without spinning.
    fn fail(&mut self, ops: &mut EventOps<'_>) {
        let metrics = self.worker.metrics().clone();
        self.broken = true;
        let fds = [
            self.queue_evt.as_raw_fd(),
            self.worker.rate_limiter().as_raw_fd(),
        ];
        for fd in fds {
            if let Err(err) = ops.remove(fd) {
                inc(&metrics.event_fails);
                log::error!(
                    "The block device {} cannot stop watching a descriptor: {err}",
                    self.id
                );
            }
        }
        if let Err(err) = self
            .worker
            .interrupt
            .trigger(VirtioInterruptType::NeedsReset)
        {
            inc(&metrics.event_fails);
            log::error!(
                "The block device {} cannot signal DEVICE_NEEDS_RESET: {err}",
                self.id
            );
        }
    }
}

/// A change handed to the thread that serves a block device ([`Block::update_disk`],
/// [`Block::update_rate_limiter`]), to wait for once the device's lock is released.
#[derive(Debug)]
#[must_use = "the change may still be under way, and may fail"]
pub struct PendingUpdate {
    /// The worker's answer, with the disk it no longer uses; `None` when the change is made.
    reply: Option<Reply<Option<Retired>>>,
    metrics: Arc<BlockMetrics>,
}

impl PendingUpdate {
    fn done(metrics: &Arc<BlockMetrics>) -> Self {
        PendingUpdate {
            reply: None,
            metrics: metrics.clone(),
        }
    }

    fn waiting(reply: Reply<Option<Retired>>, metrics: &Arc<BlockMetrics>) -> Self {
        PendingUpdate {
            reply: Some(reply),
            metrics: metrics.clone(),
        }
    }

    /// Waits until the worker made the change, and closes the disk it replaced. The change is
    /// made whether or not this is called.
    ///
    /// # Errors
    ///
    /// [`Error::Worker`] when the worker thread ended before it made the change.
    pub fn wait(self) -> Result<()> {
        let Some(reply) = self.reply else {
            return Ok(());
        };
        match reply.wait() {
            // The old disk, if any, is closed here, on the caller's thread.
            Ok(_old) => Ok(()),
            Err(err) => {
                inc(&self.metrics.update_fails);
                Err(Error::Worker(err))
            }
        }
    }
}

/// An error and its sources, as one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        line.push_str(": ");
        line.push_str(&err.to_string());
        source = err.source();
    }
    line
}

/// A disk the worker no longer serves, whatever its backend, to drop on the caller's thread.
struct Retired(#[allow(dead_code, reason = "only dropped")] Box<dyn Send>);

impl fmt::Debug for Retired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Retired")
    }
}

/// A running handler, whatever guest memory type it serves and wherever it runs.
trait ActiveWorker<B>: Send {
    /// Stops the thread and gives the disk and the rate limiter back.
    fn stop(self: Box<Self>) -> io::Result<(Disk<B>, RateLimiter)>;

    /// Has the handler's thread change the rate limiter's buckets.
    fn update_rate_limiter(
        &self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> io::Result<Reply<Option<Retired>>>;

    /// Has the handler's thread serve the requests from `disk` from now on, store its capacity in
    /// `capacity` and tell the driver; the reply gives back the disk they were served from.
    fn replace_disk(
        &self,
        disk: Disk<B>,
        capacity: Arc<AtomicU64>,
    ) -> io::Result<Reply<Option<Retired>>>;
}

impl<M: GuestAddressSpace + Send + 'static, B: BlockBackend> ActiveWorker<B>
    for Runner<BlockHandler<M, B>>
{
    fn stop(self: Box<Self>) -> io::Result<(Disk<B>, RateLimiter)> {
        Runner::stop(*self).map(|handler| handler.worker.into_parts())
    }

    fn update_rate_limiter(
        &self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> io::Result<Reply<Option<Retired>>> {
        // A blocked limiter re-arms its timer to fire at once, so that a request held back
        // under the old limits is retried under the new ones.
        self.post(move |handler, _| {
            handler
                .worker
                .rate_limiter_mut()
                .update_buckets(bandwidth, ops);
            inc(&handler.worker.metrics().update_count);
            None
        })
    }

    fn replace_disk(
        &self,
        disk: Disk<B>,
        capacity: Arc<AtomicU64>,
    ) -> io::Result<Reply<Option<Retired>>> {
        self.post(move |handler, _| {
            let new_capacity = disk.capacity();
            let old = handler.worker.replace_disk(disk);
            // The capacity the driver reads changes with the disk, before it is told.
            capacity.store(new_capacity, Ordering::Release);
            let metrics = handler.worker.metrics().clone();
            inc(&metrics.update_count);
            if let Err(err) = handler
                .worker
                .interrupt
                .trigger(VirtioInterruptType::Config)
            {
                inc(&metrics.event_fails);
                log::error!(
                    "The block device {} cannot tell the driver its new capacity: {err}",
                    handler.id
                );
            }
            Some(Retired(Box::new(old)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use ember_rate_limiter::BucketConfig;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::mmio::{INT_CONFIG, INT_USED_RING, MmioInterrupt};
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, bucket, guest_memory, wait_timer};
    use crate::worker::{Executor, Worker, WorkerGate};

    type Mem = GuestMemoryMmap<()>;
    /// Guest memory as the transport holds it.
    type Space = Arc<Mem>;

    const SECTORS: u64 = 64;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x40000;
    const SEG: u64 = 0x41000;
    const TABLE: u64 = 0x50000;

    /// A disk image that is removed when dropped. Sector `n` holds the byte `n + 1`.
    struct Image {
        path: PathBuf,
    }

    impl Image {
        fn new(dir: &Path, len: u64) -> Self {
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let n = COUNT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("ember-blk-test-{}-{n}", std::process::id()));
            let bytes: Vec<u8> = (0..len)
                .map(|i| u8::try_from(i / SECTOR_SIZE % 250 + 1).unwrap())
                .collect();
            std::fs::write(&path, bytes).unwrap();
            Image { path }
        }

        /// An image on tmpfs, which punches holes but does not zero ranges.
        fn on_tmpfs() -> Self {
            let shm = Path::new("/dev/shm");
            let dir = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            Image::new(&dir, SECTORS * SECTOR_SIZE)
        }

        fn backend(&self, read_only: bool) -> Result<RawFile> {
            RawFile::open(&self.path, read_only)
        }

        fn config(&self, read_only: bool) -> Config {
            Config::new("disk0").with_read_only(read_only)
        }

        fn disk(&self, read_only: bool) -> Disk {
            Disk::new(self.backend(read_only).unwrap(), read_only, "disk0").unwrap()
        }

        /// A device on the image, as a VMM makes one.
        fn block(&self, read_only: bool) -> Result<Block> {
            Block::new(self.backend(read_only)?, self.config(read_only))
        }

        fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A guest driving a [`BlockWorker`] synchronously.
    struct Guest {
        mem: Arc<Mem>,
        driver: MockDriver,
        worker: BlockWorker<Space>,
        irqs: CountingTrigger,
    }

    impl Guest {
        fn new(image: &Image, read_only: bool) -> Self {
            Guest::with_queue(image, read_only, false)
        }

        fn with_queue(image: &Image, read_only: bool, event_idx: bool) -> Self {
            Guest::with_parts(image, read_only, event_idx, RateLimiter::default())
        }

        fn with_limiter(image: &Image, rate_limiter: RateLimiter) -> Self {
            Guest::with_parts(image, false, false, rate_limiter)
        }

        fn with_parts(
            image: &Image,
            read_only: bool,
            event_idx: bool,
            rate_limiter: RateLimiter,
        ) -> Self {
            let mem = Arc::new(guest_memory(0x100000).unwrap());
            let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
            let mut queue = driver.queue();
            queue.set_event_idx(event_idx);
            queue.validate(&*mem).unwrap();
            let irqs = CountingTrigger::default();
            let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
            let disk = image.disk(read_only);
            let worker = BlockWorker::new(disk, queue, mem.clone(), interrupt, rate_limiter);
            Guest {
                mem,
                driver,
                worker,
                irqs,
            }
        }

        fn header(&self, type_: u32, sector: u64) {
            write_header(&self.mem, HDR, type_, sector);
        }

        fn segment(&self, sector: u64, num_sectors: u32, flags: u32) {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&sector.to_le_bytes());
            bytes[8..12].copy_from_slice(&num_sectors.to_le_bytes());
            bytes[12..].copy_from_slice(&flags.to_le_bytes());
            self.mem.write_slice(&bytes, GuestAddress(SEG)).unwrap();
        }

        /// Publishes `buffers` as a chain, serves the queue, and returns the used length and
        /// the byte at STATUS (0xff if the device did not write it).
        fn submit(&mut self, buffers: &[MockBuffer]) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let head = self.driver.add_chain(&*self.mem, buffers).unwrap();
            self.serve(head)
        }

        fn submit_indirect(&mut self, buffers: &[MockBuffer]) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let head = self
                .driver
                .add_indirect_chain(&*self.mem, GuestAddress(TABLE), buffers)
                .unwrap();
            self.serve(head)
        }

        fn serve(&mut self, head: u16) -> (u32, u8) {
            assert_eq!(self.worker.process_queue().unwrap(), 1);
            let used_idx = self.driver.used_idx(&*self.mem).unwrap();
            let (id, len) = self
                .driver
                .used_elem(&*self.mem, used_idx.wrapping_sub(1))
                .unwrap();
            assert_eq!(id, u32::from(head));
            (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn fill(&self, addr: u64, byte: u8, len: usize) {
            self.mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .unwrap();
        }
    }

    fn write_header(mem: &Mem, addr: u64, type_: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&type_.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    }

    fn hdr() -> MockBuffer {
        MockBuffer::readable(HDR, 16)
    }

    fn status() -> MockBuffer {
        MockBuffer::writable(STATUS, 1)
    }

    /// What the image holds in sectors `first..first + count`, as `Image::new` wrote it.
    fn pattern(first: u64, count: u64) -> Vec<u8> {
        (first..first + count)
            .flat_map(|s| [u8::try_from(s % 250 + 1).unwrap(); 512])
            .collect()
    }

    #[test]
    fn a_read_copies_sectors_into_guest_memory() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_IN, 3);
        let used = g.submit(&[hdr(), MockBuffer::writable(DATA, 1024), status()]);
        assert_eq!(used, (1024 + 1, STATUS_OK));
        assert_eq!(g.read(DATA, 1024), pattern(3, 2));
        assert_eq!(g.irqs.count(), 1);
    }

    #[test]
    fn a_write_reaches_the_image() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_OUT, 2);
        g.fill(DATA, 0xee, 512);
        let used = g.submit(&[hdr(), MockBuffer::readable(DATA, 512), status()]);
        assert_eq!(used, (1, STATUS_OK));
        let contents = image.contents();
        assert_eq!(&contents[1024..1536], &[0xee; 512][..]);
        assert_eq!(&contents[..1024], &pattern(0, 2)[..]);
        assert_eq!(&contents[1536..2048], &pattern(3, 1)[..]);
    }

    #[test]
    fn data_over_several_descriptors_moves_in_chain_order() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        // Reads into three buffers, out of address order and of uneven lengths.
        g.header(VIRTIO_BLK_T_IN, 4);
        let pieces = [(DATA + 0x4000, 100), (DATA, 412), (DATA + 0x2000, 1024)];
        let mut buffers = vec![hdr()];
        buffers.extend(pieces.iter().map(|&(a, l)| MockBuffer::writable(a, l)));
        buffers.push(status());
        assert_eq!(g.submit(&buffers), (1536 + 1, STATUS_OK));
        let expected = pattern(4, 3);
        let mut got = Vec::new();
        for (addr, len) in pieces {
            got.extend(g.read(addr, usize::try_from(len).unwrap()));
        }
        assert_eq!(got, expected);

        // Writes them back two sectors further on, through an indirect table.
        g.header(VIRTIO_BLK_T_OUT, 6);
        let mut buffers = vec![hdr()];
        buffers.extend(pieces.iter().map(|&(a, l)| MockBuffer::readable(a, l)));
        buffers.push(status());
        assert_eq!(g.submit_indirect(&buffers), (1, STATUS_OK));
        assert_eq!(&image.contents()[6 * 512..9 * 512], &expected[..]);
    }

    #[test]
    fn data_may_share_a_descriptor_with_the_header_or_the_status() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        // A write whose data follows the header in one buffer.
        g.header(VIRTIO_BLK_T_OUT, 1);
        g.fill(HDR + 16, 0x5a, 512);
        let used = g.submit(&[MockBuffer::readable(HDR, 16 + 512), status()]);
        assert_eq!(used, (1, STATUS_OK));
        assert_eq!(&image.contents()[512..1024], &[0x5a; 512][..]);

        // A read whose status byte ends its data buffer.
        g.header(VIRTIO_BLK_T_IN, 1);
        let data = STATUS - 512;
        let used = g.submit(&[hdr(), MockBuffer::writable(data, 513)]);
        assert_eq!(used, (513, STATUS_OK));
        assert_eq!(g.read(data, 512), vec![0x5a; 512]);
    }

    #[test]
    fn a_flush_succeeds() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(g.submit(&[hdr(), status()]), (1, STATUS_OK));
    }

    #[test]
    fn get_id_returns_the_nul_padded_id() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, true);
        g.header(VIRTIO_BLK_T_GET_ID, 0);
        g.fill(DATA, 0xff, 20);
        let used = g.submit(&[hdr(), MockBuffer::writable(DATA, 20), status()]);
        assert_eq!(used, (21, STATUS_OK));
        let mut expected = b"disk0".to_vec();
        expected.resize(20, 0);
        assert_eq!(g.read(DATA, 20), expected);
    }

    #[test]
    fn an_unsupported_type_completes_with_unsupp() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        // VIRTIO_BLK_T_GET_LIFETIME, which the device does not offer.
        g.header(10, 0);
        assert_eq!(g.submit(&[hdr(), status()]), (1, STATUS_UNSUPP));
    }

    #[test]
    fn a_read_only_disk_refuses_writes_discards_and_write_zeroes() {
        let image = Image::on_tmpfs();
        let before = image.contents();
        let mut g = Guest::new(&image, true);
        g.header(VIRTIO_BLK_T_OUT, 0);
        let used = g.submit(&[hdr(), MockBuffer::readable(DATA, 512), status()]);
        assert_eq!(used, (1, STATUS_IOERR));
        g.segment(0, 8, 0);
        for type_ in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            g.header(type_, 0);
            let used = g.submit(&[hdr(), MockBuffer::readable(SEG, 16), status()]);
            assert_eq!(used, (1, STATUS_IOERR));
        }
        assert_eq!(image.contents(), before);
        // Reads still work.
        g.header(VIRTIO_BLK_T_IN, 0);
        let used = g.submit(&[hdr(), MockBuffer::writable(DATA, 512), status()]);
        assert_eq!(used, (513, STATUS_OK));
    }

    #[test]
    fn a_sector_past_the_end_is_an_io_error() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.fill(DATA, 0x11, 1024);
        g.header(VIRTIO_BLK_T_IN, SECTORS - 1);
        let used = g.submit(&[hdr(), MockBuffer::writable(DATA, 1024), status()]);
        assert_eq!(used, (1, STATUS_IOERR));
        assert_eq!(g.read(DATA, 1024), vec![0x11; 1024]);
        g.header(VIRTIO_BLK_T_OUT, u64::MAX);
        let used = g.submit(&[hdr(), MockBuffer::readable(DATA, 512), status()]);
        assert_eq!(used, (1, STATUS_IOERR));
    }

    #[test]
    fn a_length_not_a_multiple_of_512_is_an_io_error() {
        let image = Image::on_tmpfs();
        let before = image.contents();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_OUT, 0);
        let used = g.submit(&[hdr(), MockBuffer::readable(DATA, 511), status()]);
        assert_eq!(used, (1, STATUS_IOERR));
        assert_eq!(image.contents(), before);
    }

    #[test]
    fn data_in_more_than_seg_max_buffers_is_an_io_error() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_IN, 0);
        // SEG_MAX + 1 buffers of 64 bytes but one of 128: 32 sectors; the last one also holds
        // the status, so that the chain is no longer than the queue.
        let mut buffers = vec![hdr(), MockBuffer::writable(DATA + 0x8000, 128)];
        for i in 1..SEG_MAX {
            buffers.push(MockBuffer::writable(DATA + 64 * u64::from(i), 64));
        }
        buffers.push(MockBuffer::writable(STATUS - 64, 65));
        assert_eq!(g.submit_indirect(&buffers), (1, STATUS_IOERR));
        // SEG_MAX buffers are fine: two of 128 bytes, the others of 64.
        let mut buffers = vec![
            hdr(),
            MockBuffer::writable(DATA + 0x8000, 128),
            MockBuffer::writable(DATA + 0x9000, 128),
        ];
        for i in 2..SEG_MAX {
            buffers.push(MockBuffer::writable(DATA + 64 * u64::from(i), 64));
        }
        buffers.push(status());
        let (len, status) = g.submit_indirect(&buffers);
        assert_eq!((len, status), (32 * 512 + 1, STATUS_OK));
    }

    #[test]
    fn a_chain_without_a_status_byte_is_returned_with_used_length_0() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(g.submit(&[hdr()]), (0, 0xff));
    }

    #[test]
    fn a_status_byte_in_a_readable_descriptor_is_not_written() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        let used = g.submit(&[hdr(), MockBuffer::readable(STATUS, 1)]);
        assert_eq!(used, (0, 0xff));
    }

    #[test]
    fn a_header_too_short_is_an_io_error() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_IN, 0);
        let used = g.submit(&[MockBuffer::readable(HDR, 12), status()]);
        assert_eq!(used, (1, STATUS_IOERR));
    }

    #[test]
    fn a_discard_reads_back_as_zeroes() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        assert!(
            g.worker.disk().backend().supports_discard(),
            "tmpfs punches holes"
        );
        g.header(VIRTIO_BLK_T_DISCARD, 0);
        g.segment(8, 8, 0);
        let used = g.submit(&[hdr(), MockBuffer::readable(SEG, 16), status()]);
        assert_eq!(used, (1, STATUS_OK));
        let contents = image.contents();
        assert!(contents[8 * 512..16 * 512].iter().all(|&b| b == 0));
        assert_eq!(&contents[..8 * 512], &pattern(0, 8)[..]);
        assert_eq!(&contents[16 * 512..17 * 512], &pattern(16, 1)[..]);
        assert_eq!(contents.len(), 64 * 512);
    }

    /// Write zeroes over sectors 4..12, then 20..28 with UNMAP, and checks both read back as
    /// zeroes and nothing else changed.
    fn check_write_zeroes(image: &Image) {
        let mut g = Guest::new(image, false);
        g.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        for (sector, flags) in [(4, 0), (20, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)] {
            g.segment(sector, 8, flags);
            let used = g.submit(&[hdr(), MockBuffer::readable(SEG, 16), status()]);
            assert_eq!(used, (1, STATUS_OK));
        }
        let contents = image.contents();
        let mut expected = pattern(0, SECTORS);
        expected[4 * 512..12 * 512].fill(0);
        expected[20 * 512..28 * 512].fill(0);
        assert_eq!(contents, expected);
    }

    #[test]
    fn discards_and_write_zeroes_are_charged_the_bytes_they_cover() {
        use ember_rate_limiter::ManualClock;

        let image = Image::on_tmpfs();
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let queue = driver.queue();
        let clock = ManualClock::new(0);
        // 4 KiB per second, no operations limit.
        let limiter = RateLimiter::with_clock(bucket(4096, 1000), None, clock.clone()).unwrap();
        let disk = image.disk(false);
        assert!(disk.backend().supports_discard(), "tmpfs punches holes");
        let interrupt = Arc::new(MmioInterrupt::new(CountingTrigger::default()));
        let mut worker = BlockWorker::new(disk, queue, mem.clone(), interrupt, limiter);
        let request = |driver: &mut MockDriver, type_: u32, seg: u64, sectors: u32| {
            write_header(&mem, HDR + seg, type_, 0);
            let mut bytes = [0u8; 16];
            bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
            mem.write_slice(&bytes, GuestAddress(SEG + seg)).unwrap();
            driver
                .add_chain(
                    &*mem,
                    &[
                        MockBuffer::readable(HDR + seg, 16),
                        MockBuffer::readable(SEG + seg, 16),
                        MockBuffer::writable(STATUS + seg, 1),
                    ],
                )
                .unwrap();
        };
        // A discard of 32 sectors (16 KiB) goes on a full bucket, and leaves 12 KiB of debt.
        request(&mut driver, VIRTIO_BLK_T_DISCARD, 0, 32);
        // A write zeroes of one sector waits for the debt and its own 512 bytes.
        request(&mut driver, VIRTIO_BLK_T_WRITE_ZEROES, 0x100, 1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert!(worker.is_throttled());
        assert_eq!(
            worker.rate_limiter().retry_after(),
            Some(Duration::from_millis(3125)),
            "(12288 + 512) bytes at 4096 bytes per second"
        );
        assert_eq!(driver.used_idx(&*mem).unwrap(), 1);
        assert_eq!(
            worker
                .metrics()
                .rate_limiter_throttled_events
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn calls_and_pauses_are_served_within_a_few_batches_while_the_ring_stays_full() {
        let image = Image::on_tmpfs();
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        // Every entry of the ring is a GET_ID, which costs the device no system call.
        write_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let request = [hdr(), MockBuffer::writable(DATA, 20), status()];
        for _ in 0..QUEUE_SIZE {
            driver
                .add_indirect_chain(&*mem, GuestAddress(TABLE), &request)
                .unwrap();
        }
        let queue = driver.queue();
        queue.validate(&*mem).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(CountingTrigger::default()));
        let disk = image.disk(false);
        let handler = BlockHandler {
            worker: BlockWorker::new(disk, queue, mem.clone(), interrupt, RateLimiter::default()),
            queue_evt: kick.try_clone().unwrap(),
            id: "storm".into(),
            broken: false,
        };
        let gate = WorkerGate::new();
        let worker = Worker::spawn("test-blk-storm".into(), handler, &gate).unwrap();

        // The guest hands every chain back as soon as it is used, and notifies without end.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = {
            let (mem, mut driver, stop) = (mem.clone(), driver.clone(), stop.clone());
            let kick = kick.try_clone().unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    driver.refill(&*mem).unwrap();
                    let _ = kick.write(1);
                    std::thread::yield_now();
                }
            })
        };
        kick.write(1).unwrap();
        while driver.used_idx(&*mem).unwrap() == 0 {
            std::thread::yield_now();
        }
        // At most the batch under way and one more for each of the two events that can come
        // first out of epoll: the bound holds whatever the timing.
        let bound = 3 * MAX_BATCH;
        for _ in 0..3 {
            let before = driver.used_idx(&*mem).unwrap();
            let at = worker.call(|h, _| h.worker.queue().next_used()).unwrap();
            assert!(usize::from(at.wrapping_sub(before)) <= bound);
        }
        let before = driver.used_idx(&*mem).unwrap();
        gate.pause().unwrap();
        let paused_at = driver.used_idx(&*mem).unwrap();
        assert!(usize::from(paused_at.wrapping_sub(before)) <= bound);
        // Paused, it serves nothing however full the ring.
        assert_eq!(
            worker.call(|h, _| h.worker.queue().next_used()).unwrap(),
            paused_at
        );
        gate.resume().unwrap();
        stop.store(true, Ordering::Relaxed);
        guest.join().unwrap();
        let handler = worker.stop().unwrap();
        assert!(!handler.broken);
        assert!(
            handler
                .worker
                .metrics()
                .queue_event_count
                .load(Ordering::Relaxed)
                > 0
        );
    }

    #[test]
    fn a_call_stops_after_the_request_that_spends_its_byte_budget() {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ember-blk-budget-{}", std::process::id()));
        // Sparse: twice the budget, taking no room.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(2 * MAX_BATCH_BYTES)
            .unwrap();
        let disk = Disk::new(RawFile::open(&path, false).unwrap(), false, "budget").unwrap();
        std::fs::remove_file(&path).unwrap();
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let interrupt = Arc::new(MmioInterrupt::new(CountingTrigger::default()));
        let mut worker = BlockWorker::new(
            disk,
            driver.queue(),
            mem.clone(),
            interrupt,
            RateLimiter::default(),
        );
        // Three write zeroes of half the budget each.
        let sectors = u32::try_from(MAX_BATCH_BYTES / 2 / SECTOR_SIZE).unwrap();
        for i in 0..3u32 {
            let seg = SEG + 16 * u64::from(i);
            write_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(
                &(u64::from(i * sectors) % (2 * u64::from(sectors))).to_le_bytes(),
            );
            bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
            bytes[12..].copy_from_slice(&VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
            mem.write_slice(&bytes, GuestAddress(seg)).unwrap();
            driver
                .add_chain(
                    &*mem,
                    &[
                        hdr(),
                        MockBuffer::readable(seg, 16),
                        MockBuffer::writable(STATUS + u64::from(i), 1),
                    ],
                )
                .unwrap();
        }
        assert_eq!(worker.process_queue().unwrap(), 2);
        assert!(worker.budget_spent());
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert!(!worker.budget_spent());
        for i in 0..3 {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
                STATUS_OK
            );
        }
    }

    #[test]
    fn write_zeroes_reads_back_as_zeroes_where_zero_range_is_refused() {
        // tmpfs refuses FALLOC_FL_ZERO_RANGE: the device writes zeroes itself.
        check_write_zeroes(&Image::on_tmpfs());
    }

    #[test]
    fn write_zeroes_reads_back_as_zeroes_on_the_temp_dir() {
        // Usually a disk file system, which zeroes ranges itself.
        check_write_zeroes(&Image::new(&std::env::temp_dir(), SECTORS * SECTOR_SIZE));
    }

    #[test]
    fn an_image_size_not_a_multiple_of_512_is_refused() {
        let image = Image::new(&std::env::temp_dir(), 1000);
        let err = image.block(false).unwrap_err();
        assert!(matches!(
            err,
            Error::SizeNotSectorMultiple { size: 1000, .. }
        ));
    }

    #[test]
    fn a_directory_is_not_a_disk() {
        let err = RawFile::open(&std::env::temp_dir(), true).unwrap_err();
        assert!(matches!(err, Error::NotADisk { .. }), "{err}");
    }

    #[test]
    fn an_empty_discard_or_write_zeroes_succeeds() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.segment(4, 0, 0);
        for type_ in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            g.header(type_, 0);
            let used = g.submit(&[hdr(), MockBuffer::readable(SEG, 16), status()]);
            assert_eq!(used, (1, STATUS_OK));
        }
        assert_eq!(image.contents(), pattern(0, SECTORS));
    }

    #[test]
    fn a_missing_image_is_refused() {
        let path = std::env::temp_dir().join("ember-blk-test-no-such-image");
        let err = RawFile::open(&path, false).unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        // The message names the path; the source says why.
        assert!(err.to_string().contains("no-such-image"));
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(
            source.downcast_ref::<io::Error>().unwrap().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn an_id_longer_than_20_bytes_is_refused() {
        let image = Image::on_tmpfs();
        let mut config = image.config(false);
        config.id = "a".repeat(21);
        assert!(matches!(
            Block::new(image.backend(false).unwrap(), config),
            Err(Error::IdTooLong { len: 21 })
        ));
    }

    fn config_of(block: &Block) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        VirtioDevice::<Space>::read_config(block, 0, &mut config);
        config
    }

    fn le32(config: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(config[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn the_config_space_holds_capacity_seg_max_and_the_discard_and_write_zeroes_limits() {
        let image = Image::on_tmpfs();
        let block = image.block(false).unwrap();
        let config = config_of(&block);
        assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), SECTORS);
        assert_eq!(le32(&config, 12), SEG_MAX);
        assert_eq!(le32(&config, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&config, 40), 1);
        assert!(le32(&config, 44) >= 1);
        assert_eq!(le32(&config, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(le32(&config, 52), 1);
        assert_eq!(config[56], 1);
        // Reads past the end are zero; a partial read of capacity works.
        let mut tail = [0xffu8; 8];
        VirtioDevice::<Space>::read_config(&block, 58, &mut tail);
        assert_eq!(tail, [0; 8]);
        let mut low = [0u8; 1];
        VirtioDevice::<Space>::read_config(&block, 0, &mut low);
        assert_eq!(low[0], 64);
    }

    #[test]
    fn a_read_only_config_space_has_no_discard_or_write_zeroes_limits() {
        let image = Image::on_tmpfs();
        let block = image.block(true).unwrap();
        let config = config_of(&block);
        assert_eq!(le32(&config, 12), SEG_MAX);
        assert!(config[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn config_writes_are_ignored() {
        let image = Image::on_tmpfs();
        let mut block = image.block(false).unwrap();
        let before = config_of(&block);
        VirtioDevice::<Space>::write_config(&mut block, 0, &[0xff; 8]);
        assert_eq!(config_of(&block), before);
    }

    #[test]
    fn features_follow_the_read_only_flag() {
        let base = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        let image = Image::on_tmpfs();
        let rw = image.block(false).unwrap();
        assert_eq!(
            VirtioDevice::<Space>::features(&rw),
            base | (1 << VIRTIO_BLK_F_WRITE_ZEROES) | (1 << VIRTIO_BLK_F_DISCARD)
        );
        let ro = image.block(true).unwrap();
        assert_eq!(
            VirtioDevice::<Space>::features(&ro),
            base | (1 << VIRTIO_BLK_F_RO)
        );
        assert_eq!(VirtioDevice::<Space>::device_type(&ro), VIRTIO_ID_BLOCK);
        assert_eq!(VirtioDevice::<Space>::queue_max_sizes(&ro), &[QUEUE_SIZE]);
    }

    #[test]
    fn interrupts_follow_used_event_with_event_idx() {
        let image = Image::on_tmpfs();
        let mut g = Guest::with_queue(&image, false, true);
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        // The first batch always interrupts.
        g.submit(&[hdr(), status()]);
        assert_eq!(g.irqs.count(), 1);
        // The driver wants an interrupt only once used index 3 is passed.
        g.driver.set_used_event(&*g.mem, 3).unwrap();
        g.submit(&[hdr(), status()]);
        g.submit(&[hdr(), status()]);
        assert_eq!(g.irqs.count(), 1);
        g.submit(&[hdr(), status()]);
        assert_eq!(g.irqs.count(), 2);
        // The device asked to be notified at the next entry.
        assert_eq!(g.driver.avail_event(&*g.mem).unwrap(), 4);
    }

    #[test]
    fn no_interrupt_when_the_driver_asks_for_none() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.driver.set_avail_flags(&*g.mem, 1).unwrap();
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        g.submit(&[hdr(), status()]);
        assert_eq!(g.irqs.count(), 0);
        // Notifications are back on after the batch.
        assert_eq!(g.driver.used_flags(&*g.mem).unwrap(), 0);
    }

    #[test]
    fn a_batch_serves_every_available_chain_and_interrupts_once() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        for _ in 0..10 {
            g.driver.add_chain(&*g.mem, &[hdr(), status()]).unwrap();
        }
        assert_eq!(g.worker.process_queue().unwrap(), 10);
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 10);
        assert_eq!(g.irqs.count(), 1);
        assert_eq!(g.worker.process_queue().unwrap(), 0);
        assert_eq!(g.irqs.count(), 1);
    }

    /// The counters that moved between two readings of [`BlockMetrics::values`], by how much.
    fn moved(
        before: &[(&'static str, u64)],
        after: &[(&'static str, u64)],
    ) -> Vec<(&'static str, u64)> {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| a.1 != b.1)
            .map(|(&(name, b), &(_, a))| (name, a.wrapping_sub(b)))
            .collect()
    }

    #[test]
    fn reads_writes_flushes_and_bad_requests_move_their_counters_by_their_amounts() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        let metrics = g.worker.metrics().clone();
        let step = |g: &mut Guest, buffers: &[MockBuffer], expected: &[(&str, u64)]| {
            let before = metrics.values();
            g.submit(buffers);
            assert_eq!(moved(&before, &metrics.values()), expected);
        };
        g.header(VIRTIO_BLK_T_IN, 3);
        step(
            &mut g,
            &[hdr(), MockBuffer::writable(DATA, 1024), status()],
            &[("read_bytes", 1024), ("read_count", 1)],
        );
        g.header(VIRTIO_BLK_T_OUT, 3);
        step(
            &mut g,
            &[hdr(), MockBuffer::readable(DATA, 1536), status()],
            &[("write_bytes", 1536), ("write_count", 1)],
        );
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        step(&mut g, &[hdr(), status()], &[("flush_count", 1)]);
        // A length that is not whole sectors, a type the device does not know, no status.
        g.header(VIRTIO_BLK_T_IN, 0);
        step(
            &mut g,
            &[hdr(), MockBuffer::writable(DATA, 511), status()],
            &[("invalid_reqs_count", 1)],
        );
        g.header(0x42, 0);
        step(&mut g, &[hdr(), status()], &[("invalid_reqs_count", 1)]);
        step(&mut g, &[hdr()], &[("invalid_reqs_count", 1)]);
        // GET_ID moves nothing but completes.
        g.header(VIRTIO_BLK_T_GET_ID, 0);
        step(
            &mut g,
            &[hdr(), MockBuffer::writable(DATA, 20), status()],
            &[],
        );

        // A write to a read-only disk parses, and fails.
        let mut ro = Guest::new(&image, true);
        let before = ro.worker.metrics().values();
        ro.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            ro.submit(&[hdr(), MockBuffer::readable(DATA, 512), status()]),
            (1, STATUS_IOERR)
        );
        assert_eq!(
            moved(&before, &ro.worker.metrics().values()),
            [("execute_fails", 1)]
        );
    }

    #[test]
    fn config_writes_and_reads_past_the_end_count_as_config_failures() {
        let image = Image::on_tmpfs();
        let mut block = image.block(false).unwrap();
        let mut data = [0u8; 8];
        VirtioDevice::<Space>::read_config(&block, 0, &mut data);
        VirtioDevice::<Space>::read_config(&block, 52, &mut data);
        assert_eq!(block.metrics().get("cfg_fails"), Some(0));
        VirtioDevice::<Space>::read_config(&block, 53, &mut data);
        VirtioDevice::<Space>::read_config(&block, u64::MAX, &mut data);
        VirtioDevice::<Space>::write_config(&mut block, 0, &data);
        assert_eq!(block.metrics().get("cfg_fails"), Some(3));
    }

    /// A guest driving an activated [`Block`] through eventfds.
    struct Activated {
        mem: Arc<Mem>,
        driver: MockDriver,
        queue_evt: EventFd,
        irq: EventFd,
        interrupt: Arc<MmioInterrupt>,
    }

    fn activate(block: &mut Block) -> Activated {
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
        let params = ActivateParams {
            mem: mem.clone(),
            features: VirtioDevice::<Space>::features(block),
            queues: vec![driver.queue()],
            queue_evts: vec![queue_evt.try_clone().unwrap()],
            interrupt: interrupt.clone(),
            executor: WorkerGate::new().into(),
        };
        block.activate(params).unwrap();
        Activated {
            mem,
            driver,
            queue_evt,
            irq,
            interrupt,
        }
    }

    /// Waits for the interrupt eventfd to be written, for at most 5 seconds.
    fn wait_irq(irq: &EventFd) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match irq.read() {
                Ok(count) => return count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no interrupt came");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(err) => panic!("cannot read the interrupt eventfd: {err}"),
            }
        }
    }

    /// Publishes a request of `type_` at `sector` with `buffers` between its header and its
    /// status byte, and notifies the queue.
    fn submit_through_worker(a: &mut Activated, type_: u32, sector: u64, buffers: &[MockBuffer]) {
        write_header(&a.mem, HDR, type_, sector);
        a.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        // With EVENT_IDX, as a driver does: interrupt once this request is used.
        let used_idx = a.driver.used_idx(&*a.mem).unwrap();
        a.driver.set_used_event(&*a.mem, used_idx).unwrap();
        let mut chain = vec![hdr()];
        chain.extend_from_slice(buffers);
        chain.push(status());
        a.driver.add_chain(&*a.mem, &chain).unwrap();
        a.queue_evt.write(1).unwrap();
    }

    /// Waits for the request [`submit_through_worker`] published, and returns its status.
    fn finish_through_worker(a: &mut Activated) -> u8 {
        wait_irq(&a.irq);
        assert_eq!(a.interrupt.status() & INT_USED_RING, INT_USED_RING);
        a.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    }

    fn read_sector_through_worker(a: &mut Activated, sector: u64) -> Vec<u8> {
        let data = [MockBuffer::writable(DATA, 512)];
        submit_through_worker(a, VIRTIO_BLK_T_IN, sector, &data);
        assert_eq!(finish_through_worker(a), STATUS_OK);
        let mut data = vec![0u8; 512];
        a.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        data
    }

    /// Waits until `done` holds, for at most 5 seconds.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_worker_serves_requests_until_reset_and_again_after_activation() {
        let image = Image::on_tmpfs();
        let mut block = image.block(false).unwrap();
        let mut a = activate(&mut block);
        assert!(block.is_active());
        assert_eq!(read_sector_through_worker(&mut a, 5), pattern(5, 1));
        assert_eq!(read_sector_through_worker(&mut a, 6), pattern(6, 1));
        // A second activation while active is refused.
        let params = ActivateParams {
            mem: a.mem.clone(),
            features: 0,
            queues: vec![a.driver.queue()],
            queue_evts: vec![a.queue_evt.try_clone().unwrap()],
            interrupt: a.interrupt.clone(),
            executor: WorkerGate::new().into(),
        };
        assert!(matches!(
            block.activate(params),
            Err(ActivateError::AlreadyActive)
        ));
        // Two reads, each one notification; the refused activation counts.
        let metrics = block.metrics();
        assert_eq!(metrics.get("queue_event_count"), Some(2));
        assert_eq!(metrics.get("read_count"), Some(2));
        assert_eq!(metrics.get("read_bytes"), Some(1024));
        assert_eq!(metrics.get("activate_fails"), Some(1));
        assert_eq!(metrics.get("no_avail_buffer"), Some(0));

        VirtioDevice::<Space>::reset(&mut block);
        assert!(!block.is_active());
        // A notification after the reset reaches no worker.
        a.queue_evt.write(1).unwrap();

        let mut b = activate(&mut block);
        assert_eq!(read_sector_through_worker(&mut b, 7), pattern(7, 1));
        // The counters go on across activations; a notification with nothing to do counts.
        b.queue_evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while block.metrics().get("no_avail_buffer") != Some(1) {
            assert!(
                Instant::now() < deadline,
                "the notification was not counted"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(block.metrics().get("read_count"), Some(3));
        assert_eq!(block.metrics().get("queue_event_count"), Some(4));
        VirtioDevice::<Space>::reset(&mut block);
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let image = Image::on_tmpfs();
        let mut block = image.block(false).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let params = ActivateParams {
            mem: Arc::new(guest_memory(0x10000).unwrap()),
            features: 0,
            queues: vec![],
            queue_evts: vec![],
            interrupt: Arc::new(MmioInterrupt::new(irq)),
            executor: WorkerGate::new().into(),
        };
        assert!(matches!(
            block.activate(params),
            Err(ActivateError::QueueCount {
                expected: 1,
                given: 0
            })
        ));
        assert!(!block.is_active());
        assert_eq!(block.metrics().get("activate_fails"), Some(1));
    }

    #[test]
    fn a_throttled_queue_stops_and_resumes_when_the_timer_fires() {
        let image = Image::new(&std::env::temp_dir(), 16 * 4096);
        // 4 KiB per 100 ms, the bucket full at the start.
        let limiter = RateLimiter::new(bucket(4096, 100), None).unwrap();
        let mut g = Guest::with_limiter(&image, limiter);
        let mut heads = Vec::new();
        for i in 0..3u64 {
            write_header(&g.mem, HDR + 16 * i, VIRTIO_BLK_T_IN, 8 * i);
            let chain = [
                MockBuffer::readable(HDR + 16 * i, 16),
                MockBuffer::writable(DATA + 0x1000 * i, 4096),
                MockBuffer::writable(STATUS + i, 1),
            ];
            heads.push(g.driver.add_chain(&*g.mem, &chain).unwrap());
        }
        // The first read takes the whole bucket; the second is held back.
        assert_eq!(g.worker.process_queue().unwrap(), 1);
        let mut refused_at = Instant::now();
        assert!(g.worker.is_throttled());
        assert!(g.worker.rate_limiter().is_blocked());
        assert_eq!(g.irqs.count(), 1, "what was served is signalled");
        // Called again before the timer fires: nothing goes, nothing is lost.
        assert_eq!(g.worker.process_queue().unwrap(), 0);
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 1);
        for served in 2..=3u16 {
            wait_timer(g.worker.rate_limiter());
            // The timer waited for the 4096 bytes to refill: 100 ms.
            assert!(refused_at.elapsed() >= Duration::from_millis(90));
            g.worker.rate_limiter_mut().event_handler().unwrap();
            assert_eq!(g.worker.process_queue().unwrap(), 1);
            refused_at = Instant::now();
            assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), served);
        }
        assert!(!g.worker.is_throttled());
        for (i, &head) in heads.iter().enumerate() {
            let idx = u16::try_from(i).unwrap();
            assert_eq!(
                g.driver.used_elem(&*g.mem, idx).unwrap(),
                (u32::from(head), 4097)
            );
            let i = u64::try_from(i).unwrap();
            assert_eq!(g.read(STATUS + i, 1), [STATUS_OK]);
            assert_eq!(g.read(DATA + 0x1000 * i, 4096), pattern(8 * i, 8));
        }
        let metrics = g.worker.metrics();
        assert_eq!(metrics.get("read_count"), Some(3));
        assert_eq!(metrics.get("read_bytes"), Some(3 * 4096));
        // The second request was refused twice, the third once.
        assert_eq!(metrics.get("rate_limiter_throttled_events"), Some(3));
    }

    #[test]
    fn a_request_the_limiter_refuses_keeps_its_place_and_malformed_ones_take_an_operation() {
        let image = Image::on_tmpfs();
        // One operation per 10 s, and no byte limit.
        let limiter = RateLimiter::new(None, bucket(1, 10_000)).unwrap();
        let mut g = Guest::with_limiter(&image, limiter);
        // A malformed request takes its operation too.
        g.header(0x42, 0);
        g.driver.add_chain(&*g.mem, &[hdr(), status()]).unwrap();
        write_header(&g.mem, HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [MockBuffer::readable(HDR + 16, 16), status()];
        g.driver.add_chain(&*g.mem, &flush).unwrap();
        assert_eq!(g.worker.process_queue().unwrap(), 1);
        assert_eq!(g.read(STATUS, 1), [STATUS_UNSUPP]);
        assert!(g.worker.is_throttled());
        // Lifted: the flush held back goes first, then a new one.
        g.worker
            .rate_limiter_mut()
            .update_buckets(BucketUpdate::None, BucketUpdate::Disabled);
        wait_timer(g.worker.rate_limiter());
        g.worker.rate_limiter_mut().event_handler().unwrap();
        g.driver.add_chain(&*g.mem, &flush).unwrap();
        assert_eq!(g.worker.process_queue().unwrap(), 2);
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 3);
        let metrics = g.worker.metrics();
        assert_eq!(metrics.get("flush_count"), Some(2));
        assert_eq!(metrics.get("invalid_reqs_count"), Some(1));
    }

    #[test]
    fn a_throttled_worker_drops_nothing_ignores_notifications_and_takes_an_update() {
        let image = Image::on_tmpfs();
        let mut config = image.config(false);
        config.id = "thr".into();
        // One request per 10 s: the first goes, the others wait.
        config.rate_limiter = RateLimiter::new(None, bucket(1, 10_000)).unwrap();
        let mut block = Block::new(image.backend(false).unwrap(), config).unwrap();
        let mut a = activate(&mut block);
        const N: u64 = 20;
        for i in 0..N {
            write_header(&a.mem, HDR + 16 * i, VIRTIO_BLK_T_OUT, i);
            a.mem
                .write_slice(
                    &[u8::try_from(i + 100).unwrap(); 512],
                    GuestAddress(DATA + 512 * i),
                )
                .unwrap();
            a.mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            let chain = [
                MockBuffer::readable(HDR + 16 * i, 16),
                MockBuffer::readable(DATA + 512 * i, 512),
                MockBuffer::writable(STATUS + i, 1),
            ];
            a.driver.add_chain(&*a.mem, &chain).unwrap();
        }
        a.queue_evt.write(1).unwrap();
        wait_irq(&a.irq);
        let metrics = block.metrics().clone();
        wait_until("the second request to be held back", || {
            metrics.get("rate_limiter_throttled_events") >= Some(1)
        });
        assert_eq!(a.driver.used_idx(&*a.mem).unwrap(), 1);

        // Notifications while throttled are read and ignored, and cost the worker no CPU time.
        let before = thread_cpu_ticks("ember-blk-thr");
        for _ in 0..100 {
            a.queue_evt.write(1).unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = thread_cpu_ticks("ember-blk-thr");
        assert!(
            after - before <= 2,
            "the worker used {} ticks",
            after - before
        );
        assert_eq!(a.driver.used_idx(&*a.mem).unwrap(), 1);
        assert!(metrics.get("queue_event_count") > Some(1));

        // Lifting the operations limit lets every request through, in order, at once.
        block
            .update_rate_limiter(BucketUpdate::None, BucketUpdate::Disabled)
            .unwrap()
            .wait()
            .unwrap();
        wait_until("every request to complete", || {
            a.driver.used_idx(&*a.mem).unwrap() == u16::try_from(N).unwrap()
        });
        let contents = image.contents();
        for i in 0..N {
            assert_eq!(a.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), 0);
            let sector = usize::try_from(i).unwrap() * 512;
            assert_eq!(
                contents[sector..sector + 512],
                [u8::try_from(i + 100).unwrap(); 512]
            );
        }
        assert_eq!(metrics.get("write_count"), Some(N));
        assert_eq!(metrics.get("update_count"), Some(1));
        assert!(metrics.get("rate_limiter_event_count") >= Some(1));
        VirtioDevice::<Space>::reset(&mut block);
    }

    #[test]
    fn an_update_while_reset_waits_for_the_next_activation_and_spares_the_other_bucket() {
        let image = Image::on_tmpfs();
        let mut config = image.config(false);
        // Two requests per 10 s, and no byte limit.
        config.rate_limiter = RateLimiter::new(None, bucket(2, 10_000)).unwrap();
        let mut block = Block::new(image.backend(false).unwrap(), config).unwrap();
        let mut a = activate(&mut block);
        assert_eq!(read_sector_through_worker(&mut a, 1), pattern(1, 1));
        assert_eq!(read_sector_through_worker(&mut a, 2), pattern(2, 1));
        VirtioDevice::<Space>::reset(&mut block);

        // A byte limit arrives while the device is reset; the operations bucket stays empty.
        let bandwidth = BucketConfig {
            size: 1 << 20,
            one_time_burst: 0,
            refill_time: 1000,
        };
        block
            .update_rate_limiter(bandwidth.into(), BucketUpdate::None)
            .unwrap()
            .wait()
            .unwrap();
        let mut b = activate(&mut block);
        submit_through_worker(
            &mut b,
            VIRTIO_BLK_T_IN,
            3,
            &[MockBuffer::writable(DATA, 512)],
        );
        let metrics = block.metrics().clone();
        wait_until("the read to be held back", || {
            metrics.get("rate_limiter_throttled_events") >= Some(1)
        });
        assert_eq!(b.driver.used_idx(&*b.mem).unwrap(), 0);
        // No operation limit: the read goes, under the byte limit.
        block
            .update_rate_limiter(BucketUpdate::None, BucketUpdate::Disabled)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(finish_through_worker(&mut b), STATUS_OK);
        assert_eq!(b.driver.used_elem(&*b.mem, 0).unwrap().1, 513);
        assert_eq!(metrics.get("update_count"), Some(2));
        assert_eq!(metrics.get("update_fails"), Some(0));
        VirtioDevice::<Space>::reset(&mut block);
    }

    #[test]
    fn update_disk_swaps_the_image_changes_the_capacity_and_raises_a_config_interrupt() {
        let image = Image::on_tmpfs();
        let bigger = Image::new(&std::env::temp_dir(), 2 * SECTORS * SECTOR_SIZE);
        let mut block = image.block(false).unwrap();
        let mut a = activate(&mut block);
        assert_eq!(block.capacity(), SECTORS);
        // Sector 100 is past the end of the first image.
        let data = [MockBuffer::writable(DATA, 512)];
        submit_through_worker(&mut a, VIRTIO_BLK_T_IN, 100, &data);
        assert_eq!(finish_through_worker(&mut a), STATUS_IOERR);

        let generation = a.interrupt.config_generation();
        swap_disk(&mut block, &bigger.path).unwrap();
        assert_eq!(block.capacity(), 2 * SECTORS);
        let config = config_of(&block);
        assert_eq!(
            u64::from_le_bytes(config[..8].try_into().unwrap()),
            2 * SECTORS
        );
        assert_eq!(a.interrupt.config_generation(), generation.wrapping_add(1));
        assert_eq!(a.interrupt.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(a.irq.read().unwrap(), 1);
        assert_eq!(read_sector_through_worker(&mut a, 100), pattern(100, 1));

        // What is not a disk leaves the device as it was.
        let missing = std::env::temp_dir().join("ember-blk-test-no-such-image");
        assert!(matches!(
            swap_disk(&mut block, &missing),
            Err(Error::Open { .. })
        ));
        let odd = Image::new(&std::env::temp_dir(), 1000);
        assert!(matches!(
            swap_disk(&mut block, &odd.path),
            Err(Error::SizeNotSectorMultiple { size: 1000, .. })
        ));
        assert_eq!(block.capacity(), 2 * SECTORS);
        assert_eq!(read_sector_through_worker(&mut a, 127), pattern(127, 1));

        // While reset, the image changes with no interrupt, and the next activation uses it.
        VirtioDevice::<Space>::reset(&mut block);
        swap_disk(&mut block, &image.path).unwrap();
        assert_eq!(block.capacity(), SECTORS);
        assert_eq!(a.irq.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let mut b = activate(&mut block);
        assert_eq!(read_sector_through_worker(&mut b, 5), pattern(5, 1));
        let metrics = block.metrics();
        assert_eq!(metrics.get("update_count"), Some(2));
        // An image that cannot be opened never reaches the device.
        assert_eq!(metrics.get("update_fails"), Some(0));
        VirtioDevice::<Space>::reset(&mut block);
    }

    /// Opens the image at `path` as a VMM does, without the device, and hands it over.
    fn swap_disk(block: &mut Block, path: &Path) -> Result<()> {
        let backend = RawFile::open(path, block.read_only())?;
        block.update_disk(backend)?.wait()
    }

    #[test]
    fn update_disk_hands_the_disk_over_without_waiting_for_a_busy_worker() {
        let image = Image::on_tmpfs();
        let bigger = Image::new(&std::env::temp_dir(), 2 * SECTORS * SECTOR_SIZE);
        let mut block = image.block(false).unwrap();
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let irqs = CountingTrigger::default();
        let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
        let State::Ready { disk, rate_limiter } = std::mem::replace(&mut block.state, State::Lost)
        else {
            panic!("a new device holds its disk");
        };
        let handler = BlockHandler {
            worker: BlockWorker::new(disk, driver.queue(), mem, interrupt, rate_limiter)
                .with_metrics(block.metrics().clone()),
            queue_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            id: "busy".into(),
            broken: false,
        };
        let worker = Runner::start("test-blk-busy".into(), handler, &Executor::default()).unwrap();
        // The worker is stuck (in a slow write, say) until told to go on.
        let (go_on, stuck) = std::sync::mpsc::channel::<()>();
        let busy = worker
            .post(move |_, _| {
                let _ = stuck.recv();
            })
            .unwrap();
        block.state = State::Active {
            worker: Box::new(worker),
        };

        // Handing the disk and the limits over returns at once: a VMM releases the transport
        // before it waits.
        let backend = RawFile::open(&bigger.path, false).unwrap();
        let swapped = block.update_disk(backend).unwrap();
        let limited = block
            .update_rate_limiter(BucketUpdate::None, BucketUpdate::Disabled)
            .unwrap();
        assert_eq!(block.capacity(), SECTORS, "not yet taken over");
        assert_eq!(irqs.count(), 0);
        go_on.send(()).unwrap();
        busy.wait().unwrap();
        swapped.wait().unwrap();
        limited.wait().unwrap();
        assert_eq!(block.capacity(), 2 * SECTORS);
        assert_eq!(config_of(&block)[..8], (2 * SECTORS).to_le_bytes());
        assert_eq!(irqs.count(), 1, "one configuration change interrupt");
        assert_eq!(block.metrics().get("update_count"), Some(2));
        VirtioDevice::<Space>::reset(&mut block);
        assert!(!block.is_active());
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let path = std::env::temp_dir().join(format!("ember-blk-fifo-{}", std::process::id()));
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Opened read-only, a FIFO with no writer would block the opener for ever.
        let result = RawFile::open(&path, true);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(result, Err(Error::NotADisk { .. })));
    }

    #[test]
    fn update_disk_keeps_the_device_read_only() {
        let image = Image::on_tmpfs();
        let other = Image::on_tmpfs();
        let before = other.contents();
        // A read-only backend cannot back a writable device.
        let mut writable = image.block(false).unwrap();
        let read_only = RawFile::open(&other.path, true).unwrap();
        assert!(matches!(
            writable.update_disk(read_only),
            Err(Error::ReadOnlyBackend)
        ));
        assert_eq!(writable.metrics().get("update_fails"), Some(1));
        let read_only = RawFile::open(&other.path, true).unwrap();
        assert!(matches!(
            Block::new(read_only, image.config(false)),
            Err(Error::ReadOnlyBackend)
        ));

        // A read-only device keeps its features and refuses writes itself, even on a backend
        // that could write.
        let mut block = image.block(true).unwrap();
        let features = VirtioDevice::<Space>::features(&block);
        let backend = RawFile::open(&other.path, false).unwrap();
        block.update_disk(backend).unwrap().wait().unwrap();
        assert_eq!(VirtioDevice::<Space>::features(&block), features);
        let mut a = activate(&mut block);
        a.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        let data = [MockBuffer::readable(DATA, 512)];
        submit_through_worker(&mut a, VIRTIO_BLK_T_OUT, 0, &data);
        assert_eq!(finish_through_worker(&mut a), STATUS_IOERR);
        assert_eq!(other.contents(), before);
        VirtioDevice::<Space>::reset(&mut block);
    }

    /// Drives an activated device with 16 KiB reads for `duration`, keeping up to 32 of them in
    /// the queue, and returns the bytes the device read and how long since `start`.
    fn keep_reading(
        a: &mut Activated,
        metrics: &BlockMetrics,
        start: Instant,
        duration: Duration,
    ) -> (u64, Duration) {
        const LEN: u32 = 16 << 10;
        const IN_FLIGHT: u16 = 32;
        write_header(&a.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let chain = [hdr(), MockBuffer::writable(DATA, LEN), status()];
        let mut published: u16 = 0;
        while start.elapsed() < duration {
            let used = a.driver.used_idx(&*a.mem).unwrap();
            let mut added = false;
            while published.wrapping_sub(used) < IN_FLIGHT {
                a.driver.add_chain(&*a.mem, &chain).unwrap();
                published = published.wrapping_add(1);
                added = true;
            }
            if added {
                a.queue_evt.write(1).unwrap();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The bytes first, then the time: the bound below holds at the instant measured.
        let bytes = metrics
            .read_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        (bytes, start.elapsed())
    }

    #[test]
    fn a_throttled_device_moves_data_at_the_configured_rate() {
        // 1 MiB/s: 128 KiB per 125 ms, the bucket full at the start.
        const SIZE: u64 = 128 << 10;
        const REFILL_MS: u64 = 125;
        const RATE: u128 = 1 << 20;
        let image = Image::on_tmpfs();
        let mut config = image.config(false);
        let start = Instant::now();
        config.rate_limiter = RateLimiter::new(bucket(SIZE, REFILL_MS), None).unwrap();
        let mut block = Block::new(image.backend(false).unwrap(), config).unwrap();
        let mut a = activate(&mut block);
        let metrics = block.metrics().clone();
        let (bytes, elapsed) = keep_reading(&mut a, &metrics, start, Duration::from_millis(1500));
        VirtioDevice::<Space>::reset(&mut block);

        // The limiter is exact: never more than the first bucketful and what refilled since it
        // was made, give or take one request for the rounding of a refill to whole bytes.
        let allowed = u128::from(SIZE) + RATE * elapsed.as_nanos() / 1_000_000_000;
        let bytes = u128::from(bytes);
        assert!(
            bytes <= allowed + (16 << 10),
            "{bytes} bytes in {elapsed:?}, more than the {allowed} allowed"
        );
        // And not much less: a worker the machine holds up loses nothing while the bucket holds
        // its 125 ms of tokens, so half the rate leaves room for a very busy machine.
        assert!(
            bytes >= allowed / 2,
            "{bytes} bytes in {elapsed:?}, less than half the {allowed} allowed"
        );
        assert!(metrics.get("rate_limiter_throttled_events") >= Some(1));
    }

    /// CPU time, in clock ticks, of this process's thread named `name`.
    fn thread_cpu_ticks(name: &str) -> u64 {
        for entry in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = entry.unwrap().path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            let (_, rest) = stat.rsplit_once(')').unwrap();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
            let utime: u64 = fields[11].parse().unwrap();
            let stime: u64 = fields[12].parse().unwrap();
            return utime + stime;
        }
        panic!("no thread named {name}");
    }

    #[test]
    fn a_protocol_error_sets_needs_reset_and_the_worker_waits_without_spinning() {
        let image = Image::on_tmpfs();
        let mut config = image.config(false);
        config.id = "spin".into();
        let mut block = Block::new(image.backend(false).unwrap(), config).unwrap();
        let mut a = activate(&mut block);
        assert_eq!(read_sector_through_worker(&mut a, 1), pattern(1, 1));

        // The driver publishes more entries than the ring holds.
        let too_far = a.driver.avail_idx().wrapping_add(QUEUE_SIZE + 1);
        a.driver.set_avail_idx(&*a.mem, too_far).unwrap();
        a.queue_evt.write(1).unwrap();
        wait_irq(&a.irq);
        assert!(a.interrupt.needs_reset());
        assert_eq!(a.interrupt.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(block.metrics().get("queue_fails"), Some(1));

        // Further notifications are not read, and cost the worker no CPU time.
        let before = thread_cpu_ticks("ember-blk-spin");
        for _ in 0..100 {
            a.queue_evt.write(1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = thread_cpu_ticks("ember-blk-spin");
        assert!(
            after - before <= 2,
            "the worker used {} ticks",
            after - before
        );
        assert_eq!(a.queue_evt.read().unwrap(), 100);
        assert_eq!(a.irq.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);

        // The worker is still there to be stopped, and the device can start over.
        VirtioDevice::<Space>::reset(&mut block);
        let mut b = activate(&mut block);
        assert_eq!(read_sector_through_worker(&mut b, 2), pattern(2, 1));
    }
}
