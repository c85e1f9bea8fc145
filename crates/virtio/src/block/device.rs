//! The block device as its transport sees it: [`Block`], its features and configuration space,
//! its lifecycle ([`VirtioDevice`]: activation hands the queue to a [`BlockWorker`] in a
//! [`BlockHandler`], reset takes the disk back), its run-time changes of the disk and the rate
//! limiter ([`PendingUpdate`]), and the type erasure of the active handler over the guest memory
//! type (`Running`).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ember_rate_limiter::{BucketUpdate, RateLimiter, RateLimiterState};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddressSpace;

use super::handler::{BlockHandler, BlockWorker};
use super::metrics::inc;
use super::{
    AsyncIo, BlockBackend, BlockMetrics, CONFIG_CAPACITY, CONFIG_DISCARD_SECTOR_ALIGNMENT,
    CONFIG_LEN, CONFIG_MAX_DISCARD_SECTORS, CONFIG_MAX_DISCARD_SEG,
    CONFIG_MAX_WRITE_ZEROES_SECTORS, CONFIG_MAX_WRITE_ZEROES_SEG, CONFIG_SEG_MAX,
    CONFIG_WRITE_ZEROES_MAY_UNMAP, Disk, Error, IoEngine, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, RawFile, Result, SEG_MAX,
};
use crate::device::{
    ActivateError, ActivateParams, StateError, VirtioDevice, VirtioInterruptType, read_config_bytes,
};
use crate::queue::Queue;
use crate::worker::{Reply, Runner};

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
    /// The device ID string GET_ID returns: printable ASCII of at most
    /// [`ID_BYTES`](super::ID_BYTES) (20) bytes, NUL-padded to 20. Longer IDs are refused
    /// ([`Error::IdTooLong`]), not cut short, so that two disks cannot end up with the same ID.
    /// It also names the worker thread.
    pub id: String,
    /// What the device lets through: each request takes one operation, and a read, a write, a
    /// discard or a write zeroes the bytes it covers on the disk. The default lets everything
    /// through.
    pub rate_limiter: RateLimiter,
    /// What carries out reads, writes and flushes: the synchronous engine (the default), or
    /// io_uring ([`IoEngine::Async`], whose ring [`Block::new`] sets up).
    pub io_engine: IoEngine,
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

    /// With reads, writes and flushes carried out by `io_engine`.
    #[must_use]
    pub fn with_io_engine(mut self, io_engine: IoEngine) -> Self {
        self.io_engine = io_engine;
        self
    }
}

/// A virtio block device on the backend `B`.
pub struct Block<B = RawFile> {
    id: String,
    read_only: bool,
    io_engine: IoEngine,
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
        /// The ring of the asynchronous engine, kept from one activation to the next.
        io: Option<AsyncIo>,
    },
    Active {
        worker: Box<dyn Running<B>>,
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
            .field("io_engine", &self.io_engine)
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
    /// With [`IoEngine::Async`], it sets up the io_uring the device's requests go through
    /// here, so that the thread that will serve the queue only submits and reaps.
    ///
    /// # Errors
    ///
    /// As [`Disk::new`]; with [`IoEngine::Async`], [`Error::NoAsyncFile`] for a backend without
    /// a file and [`Error::IoUring`] when the host has no io_uring to give (no fallback on the
    /// synchronous engine is made).
    pub fn new(backend: B, config: Config) -> Result<Self> {
        let disk = Disk::new(backend, config.read_only, &config.id)?;
        let io = match config.io_engine {
            IoEngine::Sync => None,
            IoEngine::Async => {
                check_engine(IoEngine::Async, disk.backend())?;
                Some(AsyncIo::new(QUEUE_SIZE)?)
            }
        };
        Ok(Block {
            id: config.id,
            read_only: config.read_only,
            io_engine: config.io_engine,
            features: features(&disk),
            config_space: config_space(&disk),
            capacity: Arc::new(AtomicU64::new(disk.capacity())),
            state: State::Ready {
                disk,
                rate_limiter: config.rate_limiter,
                io,
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

    /// What carries out reads, writes and flushes.
    pub fn io_engine(&self) -> IoEngine {
        self.io_engine
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
    /// stays), [`Error::NoAsyncFile`] for a backend without a file under the asynchronous
    /// engine; [`Error::Worker`] when the worker thread is gone, [`Error::Lost`] when the
    /// device lost its disk with a worker that panicked.
    pub fn update_disk(&mut self, backend: B) -> Result<PendingUpdate> {
        let pending = check_engine(self.io_engine, &backend)
            .and_then(|()| Disk::new(backend, self.read_only, &self.id))
            .and_then(|disk| self.replace_disk(disk));
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

/// The saved state of a [`Block`] device, beside its transport's: what the disk must still be,
/// and the rate limiter's buckets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct BlockState {
    /// The device's ID string.
    pub id: String,
    /// The disk's size in 512-byte sectors, which the driver read and relies on.
    pub capacity: u64,
    /// Whether the guest may only read the disk.
    pub read_only: bool,
    /// The rate limiter's buckets.
    pub rate_limiter: RateLimiterState,
}

impl<B: BlockBackend> Block<B> {
    /// The device's state, for a snapshot: the ID, capacity and read-only flag, which the
    /// restored device must share, and the rate limiter's buckets, from the handler's thread
    /// when the device is active. The queue is saved with the transport
    /// ([`VirtioDevice::save_queues`]).
    ///
    /// # Errors
    ///
    /// [`StateError::Handler`] when the handler does not answer, or the device lost its rate
    /// limiter with a handler that panicked.
    pub fn save_state(&self) -> std::result::Result<BlockState, StateError> {
        let rate_limiter = match &self.state {
            State::Ready { rate_limiter, .. } => rate_limiter.state(),
            State::Active { worker } => worker.rate_limiter_state().map_err(StateError::Handler)?,
            State::Lost => return Err(lost_handler()),
        };
        Ok(BlockState {
            id: self.id.clone(),
            capacity: self.capacity(),
            read_only: self.read_only,
            rate_limiter,
        })
    }

    /// Restores `state` on a device built afresh from the snapshot's configuration, before its
    /// transport is restored (which activates it): the rate limiter's buckets are the saved
    /// ones. The disk must be the one the snapshot was taken with: a disk of another size,
    /// under another ID or with another read-only flag is refused, since the driver would
    /// carry on with what it read of the old one.
    ///
    /// # Errors
    ///
    /// [`StateError::Invalid`] when the disk does not match, [`StateError::RateLimiter`] when
    /// the saved buckets are invalid (nothing changes then), [`StateError::Handler`] as in
    /// [`Block::save_state`].
    pub fn restore_state(&mut self, state: &BlockState) -> std::result::Result<(), StateError> {
        if state.id != self.id {
            return Err(StateError::Invalid(format!(
                "the snapshot's block device is {:?}, and this one is {:?}",
                state.id, self.id
            )));
        }
        let capacity = self.capacity();
        if state.capacity != capacity {
            return Err(StateError::Invalid(format!(
                "the disk of block device {:?} holds {capacity} sectors, and held {} when the \
                 snapshot was taken: a restored disk must keep its size",
                self.id, state.capacity
            )));
        }
        if state.read_only != self.read_only {
            return Err(StateError::Invalid(format!(
                "block device {:?} is {}, and was {} when the snapshot was taken",
                self.id,
                access(self.read_only),
                access(state.read_only)
            )));
        }
        let restored = match &mut self.state {
            State::Ready { rate_limiter, .. } => rate_limiter.restore(&state.rate_limiter),
            State::Active { worker } => worker
                .restore_rate_limiter(state.rate_limiter.clone())
                .map_err(StateError::Handler)?,
            State::Lost => return Err(lost_handler()),
        };
        restored.map_err(StateError::RateLimiter)
    }
}

/// Checks that `backend` can serve under `io_engine`: the asynchronous engine needs its file.
fn check_engine<B: BlockBackend>(io_engine: IoEngine, backend: &B) -> Result<()> {
    if io_engine == IoEngine::Async && backend.async_fd().is_none() {
        return Err(Error::NoAsyncFile);
    }
    Ok(())
}

/// How a disk may be accessed, in words.
fn access(read_only: bool) -> &'static str {
    if read_only { "read-only" } else { "writable" }
}

/// The error of a device that lost its handler.
fn lost_handler() -> StateError {
    StateError::Handler(io::Error::other(
        "the block device lost its handler when it panicked",
    ))
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
            Ok((disk, rate_limiter, io)) => {
                self.state = State::Ready {
                    disk,
                    rate_limiter,
                    io,
                }
            }
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

    /// The queue as the handler holds it, a request the rate limiter holds back given back.
    fn save_queues(&self) -> std::result::Result<Vec<Queue>, StateError> {
        match &self.state {
            State::Active { worker } => worker
                .save_queue()
                .map(|queue| vec![queue])
                .map_err(StateError::Handler),
            State::Ready { .. } => Err(StateError::NotActive),
            State::Lost => Err(lost_handler()),
        }
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
        let State::Ready {
            disk,
            rate_limiter,
            io,
        } = std::mem::replace(&mut self.state, State::Lost)
        else {
            return Err(ActivateError::AlreadyActive);
        };
        let mut worker = BlockWorker::new(disk, queue, mem, interrupt, rate_limiter)
            .with_metrics(self.metrics.clone());
        if let Some(io) = io {
            worker = worker.with_async_io(io);
        }
        let handler = BlockHandler {
            worker,
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
                let (disk, rate_limiter, io) = err.handler.worker.into_parts();
                self.state = State::Ready {
                    disk,
                    rate_limiter,
                    io,
                };
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

/// A disk the worker no longer serves, whatever its backend, to drop on the caller's thread.
struct Retired(#[allow(dead_code, reason = "only dropped")] Box<dyn Send>);

impl fmt::Debug for Retired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Retired")
    }
}

/// What a stopped handler gives back: the disk, the rate limiter and the asynchronous engine.
type Parts<B> = (Disk<B>, RateLimiter, Option<AsyncIo>);

/// A running handler, whatever guest memory type it serves and wherever it runs.
trait Running<B>: Send {
    /// Stops the thread and gives the disk, the rate limiter and the asynchronous engine back,
    /// once no request is in flight ([`BlockWorker::into_parts`]).
    fn stop(self: Box<Self>) -> io::Result<Parts<B>>;

    /// The queue as a snapshot records it ([`BlockWorker::saved_queue`], once no request is
    /// in flight), from the handler's thread.
    fn save_queue(&self) -> io::Result<Queue>;

    /// The rate limiter's state, from the handler's thread.
    fn rate_limiter_state(&self) -> io::Result<RateLimiterState>;

    /// Has the handler's thread restore the rate limiter's buckets.
    fn restore_rate_limiter(
        &self,
        state: RateLimiterState,
    ) -> io::Result<ember_rate_limiter::Result<()>>;

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

impl<M: GuestAddressSpace + Send + 'static, B: BlockBackend> Running<B>
    for Runner<BlockHandler<M, B>>
{
    fn stop(self: Box<Self>) -> io::Result<Parts<B>> {
        Runner::stop(*self).map(|handler| handler.worker.into_parts())
    }

    fn save_queue(&self) -> io::Result<Queue> {
        self.call(|handler, _| handler.worker.saved_queue())
    }

    fn rate_limiter_state(&self) -> io::Result<RateLimiterState> {
        self.call(|handler, _| handler.worker.rate_limiter().state())
    }

    fn restore_rate_limiter(
        &self,
        state: RateLimiterState,
    ) -> io::Result<ember_rate_limiter::Result<()>> {
        self.call(move |handler, _| handler.worker.rate_limiter_mut().restore(&state))
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
    use std::time::{Duration, Instant};

    use ember_rate_limiter::BucketConfig;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::block::fixtures::*;
    use crate::block::*;
    use crate::mmio::{INT_CONFIG, INT_USED_RING, MmioInterrupt};
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, bucket, guest_memory};
    use crate::worker::{Executor, WorkerGate};

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

    #[test]
    fn an_async_device_serves_through_its_worker_keeps_its_ring_and_drains_on_save() {
        let image = Image::on_tmpfs();
        let config = image.config(false).with_io_engine(IoEngine::Async);
        let mut block = Block::new(image.backend(false).unwrap(), config).unwrap();
        assert_eq!(block.io_engine(), IoEngine::Async);
        for _ in 0..2 {
            let mut a = activate(&mut block);
            assert_eq!(read_sector_through_worker(&mut a, 7), pattern(7, 1));
            a.mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
            let data = [MockBuffer::readable(DATA, 512)];
            submit_through_worker(&mut a, VIRTIO_BLK_T_OUT, 9, &data);
            assert_eq!(finish_through_worker(&mut a), STATUS_OK);
            assert_eq!(&image.contents()[9 * 512..10 * 512], &[0x77; 512][..]);
            let saved = VirtioDevice::<Space>::save_queues(&block).unwrap();
            assert_eq!(saved[0].next_used(), saved[0].next_avail());
            // A new backend on the same file, through the running worker.
            block
                .update_disk(image.backend(false).unwrap())
                .unwrap()
                .wait()
                .unwrap();
            // The configuration change interrupt.
            wait_irq(&a.irq);
            assert_eq!(read_sector_through_worker(&mut a, 3), pattern(3, 1));
            // Reset gives the ring back for the next activation.
            VirtioDevice::<Space>::reset(&mut block);
            assert!(matches!(block.state, State::Ready { io: Some(_), .. }));
        }
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
        let State::Ready {
            disk, rate_limiter, ..
        } = std::mem::replace(&mut block.state, State::Lost)
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

    #[test]
    fn the_state_of_an_active_device_is_saved_and_restored_through_its_handler() {
        let image = Image::on_tmpfs();
        let limiter = RateLimiter::new(None, bucket(100, 1 << 40)).unwrap();
        let mut block = Block::new(
            image.backend(false).unwrap(),
            image.config(false).with_rate_limiter(limiter),
        )
        .unwrap();
        let ready = block.save_state().unwrap();
        assert_eq!(ready.rate_limiter.ops.as_ref().unwrap().budget, 100);
        assert!(matches!(
            VirtioDevice::<Space>::save_queues(&block),
            Err(StateError::NotActive)
        ));
        let mut a = activate(&mut block);
        read_sector_through_worker(&mut a, 1);
        let state = block.save_state().unwrap();
        assert_eq!(state.capacity, SECTORS);
        assert_eq!(state.rate_limiter.ops.as_ref().unwrap().budget, 99);
        let queues = VirtioDevice::<Space>::save_queues(&block).unwrap();
        assert_eq!(queues[0].next_used(), 1);
        // Back to the bucket as it was before the read, on the handler's thread.
        block.restore_state(&ready).unwrap();
        assert_eq!(block.save_state().unwrap().rate_limiter, ready.rate_limiter);
        let mut broken = ready.clone();
        broken.rate_limiter.ops.as_mut().unwrap().budget = 101;
        assert!(matches!(
            block.restore_state(&broken),
            Err(StateError::RateLimiter(_))
        ));
        read_sector_through_worker(&mut a, 2);
    }
}
