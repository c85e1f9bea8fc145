//! The balloon as its transport sees it: [`Balloon`], its features and configuration space,
//! its lifecycle ([`VirtioDevice`]), and the changes a VMM makes while it runs: the target
//! size, which raises a configuration interrupt, and the statistics polling interval, handed
//! to the handler's thread ([`PendingUpdate`]); and what a snapshot saves and restores of it
//! ([`BalloonState`], [`VirtioDevice::save_queues`]).

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::timerfd::TimerFd;

use super::handler::{BalloonHandler, stats_timer};
use super::{
    ACTUAL_OFFSET, BASE_FEATURES, BalloonConfig, BalloonMetrics, BalloonState, BalloonStats,
    CONFIG_LEN, Error, GuestStats, PAGES_PER_MIB, QUEUE_SIZE, Result,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_STATS_VQ, inc, mib_to_pages,
};
use crate::device::{
    ActivateError, ActivateParams, StateError, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    read_config_bytes,
};
use crate::queue::Queue;
use crate::worker::{Reply, Runner};

/// A handler serving the device, whatever its guest memory type and wherever it runs.
trait Running: Send {
    /// Stops the handler and gives its statistics timer back.
    fn stop(self: Box<Self>) -> io::Result<Option<TimerFd>>;

    /// Changes the statistics polling interval on the handler's thread.
    fn set_stats_interval(&self, seconds: u16) -> io::Result<Reply<io::Result<()>>>;

    /// The handler's queues, for a snapshot ([`BalloonHandler::save_queues`]).
    fn save_queues(&self) -> io::Result<Vec<Queue>>;
}

impl<M> Running for Runner<BalloonHandler<M>>
where
    M: GuestAddressSpace + Send + 'static,
{
    fn stop(self: Box<Self>) -> io::Result<Option<TimerFd>> {
        Runner::stop(*self).map(BalloonHandler::into_timer)
    }

    fn set_stats_interval(&self, seconds: u16) -> io::Result<Reply<io::Result<()>>> {
        self.post(move |handler, _| handler.set_stats_interval(seconds))
    }

    fn save_queues(&self) -> io::Result<Vec<Queue>> {
        self.call(|handler, _| handler.save_queues())
    }
}

/// The handler of an active device, and the interrupt it raises configuration changes on.
struct Active {
    runner: Box<dyn Running>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio-balloon device.
pub struct Balloon {
    features: u64,
    queue_sizes: Vec<u16>,
    /// `num_pages`: the size asked for, in 4 KiB pages.
    num_pages: u32,
    /// `actual`: the size the driver says it reached, in 4 KiB pages.
    actual: u32,
    config: BalloonConfig,
    stats: Arc<Mutex<GuestStats>>,
    metrics: Arc<BalloonMetrics>,
    /// The statistics timer while the device is reset; the handler holds it while active.
    timer: Option<TimerFd>,
    active: Option<Active>,
    /// A saved state was restored: the next activation serves at once what the driver made
    /// available before the snapshot.
    restored: bool,
}

impl fmt::Debug for Balloon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balloon")
            .field("features", &format_args!("{:#x}", self.features))
            .field("num_pages", &self.num_pages)
            .field("actual", &self.actual)
            .field("config", &self.config)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Balloon {
    /// A balloon as `config` says: its target size, whether it offers DEFLATE_ON_OOM, and
    /// whether it has a statistics queue (a polling interval above 0).
    ///
    /// The statistics timer is created here, so that the threads that activate and serve
    /// the device need only arm and read it (`timerfd_settime`, `read`), not create it.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] when the target does not fit in 32 bits of 4 KiB pages,
    /// [`Error::Timer`] when the statistics timer cannot be created.
    pub fn new(config: BalloonConfig) -> Result<Self> {
        let num_pages = mib_to_pages(config.amount_mib)?;
        let mut features = BASE_FEATURES;
        if config.deflate_on_oom {
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        let (queues, timer) = if config.stats_polling_interval_s > 0 {
            features |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
            (3, Some(stats_timer().map_err(Error::Timer)?))
        } else {
            (2, None)
        };
        Ok(Balloon {
            features,
            queue_sizes: vec![QUEUE_SIZE; queues],
            num_pages,
            actual: 0,
            config,
            stats: Arc::default(),
            metrics: Arc::default(),
            timer,
            active: None,
            restored: false,
        })
    }

    /// A balloon made as the one `state` was saved from, with that state restored
    /// ([`Balloon::restore_state`]): the way back from a snapshot for a VMM that does not keep
    /// the balloon's configuration elsewhere.
    ///
    /// # Errors
    ///
    /// [`Error::State`] when `state` is not one a balloon can have, [`Error::Timer`] as
    /// [`Balloon::new`].
    pub fn from_state(state: &BalloonState) -> Result<Self> {
        let config = BalloonConfig::new(
            state.target_pages / PAGES_PER_MIB,
            state.deflate_on_oom,
            state.stats_polling_interval_s,
        );
        let mut balloon = Balloon::new(config)?;
        balloon.restore_state(state).map_err(Error::State)?;
        Ok(balloon)
    }

    /// What a snapshot records of the device: its configuration space, its polling interval
    /// and the guest's latest statistics. Its queues come from
    /// [`VirtioDevice::save_queues`].
    pub fn save_state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.num_pages,
            actual_pages: self.actual,
            stats_polling_interval_s: self.config.stats_polling_interval_s,
            deflate_on_oom: self.config.deflate_on_oom,
            guest_stats: *self.stats.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Gives a new, not yet activated device the state `state` saved: its configuration space
    /// and [`Balloon::stats`] read as the saved device's did, it polls at the saved interval,
    /// and its next activation (with the saved queues) first serves what the driver made
    /// available before the snapshot, the statistics buffer the saved device held included.
    ///
    /// # Errors
    ///
    /// [`StateError::Invalid`] when the device is active, when `state` was saved from a balloon
    /// made otherwise (with or without statistics, with or without DEFLATE_ON_OOM), or when
    /// its target is not a whole number of MiB; nothing changes then.
    pub fn restore_state(&mut self, state: &BalloonState) -> std::result::Result<(), StateError> {
        if self.active.is_some() {
            return Err(StateError::Invalid(
                "the balloon is active; a state is restored before activation".into(),
            ));
        }
        let saved_stats = state.stats_polling_interval_s > 0;
        if saved_stats != self.stats_enabled() {
            let has = |yes: bool| if yes { "has" } else { "has no" };
            return Err(StateError::Invalid(format!(
                "the saved balloon {} a statistics queue and this one {}",
                has(saved_stats),
                has(self.stats_enabled())
            )));
        }
        if state.deflate_on_oom != self.config.deflate_on_oom {
            return Err(StateError::Invalid(format!(
                "the saved balloon has deflate_on_oom {} and this one {}",
                state.deflate_on_oom, self.config.deflate_on_oom
            )));
        }
        if state.target_pages % PAGES_PER_MIB != 0 {
            return Err(StateError::Invalid(format!(
                "the saved balloon's target of {} pages is not a whole number of MiB",
                state.target_pages
            )));
        }
        self.num_pages = state.target_pages;
        self.config.amount_mib = state.target_pages / PAGES_PER_MIB;
        self.actual = state.actual_pages;
        self.config.stats_polling_interval_s = state.stats_polling_interval_s;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = state.guest_stats;
        self.restored = true;
        Ok(())
    }

    /// The configuration as it stands: the target and polling interval as last changed.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Whether the device polls statistics: it was created with a polling interval above 0.
    pub fn stats_enabled(&self) -> bool {
        self.queue_sizes.len() > 2
    }

    /// Asks the balloon to reach `amount_mib`: changes `num_pages` and, on an active device,
    /// tells the driver with a configuration interrupt.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] when the target does not fit in 32 bits of 4 KiB pages; nothing
    /// changes then.
    pub fn set_target_mib(&mut self, amount_mib: u32) -> Result<()> {
        self.num_pages = mib_to_pages(amount_mib)?;
        self.config.amount_mib = amount_mib;
        if let Some(active) = &self.active {
            if let Err(err) = active.interrupt.trigger(VirtioInterruptType::Config) {
                inc(&self.metrics.event_fails);
                log::error!("virtio-balloon cannot tell the driver of its new target: {err}");
            }
        }
        Ok(())
    }

    /// Changes how often the guest is asked for its statistics. The change reaches an active
    /// device's handler without waiting for it: the caller waits on the [`PendingUpdate`]
    /// once it released whatever lock it holds the device under.
    ///
    /// # Errors
    ///
    /// [`Error::StatsDisabled`] when the device has no statistics queue,
    /// [`Error::StatsStateChange`] when `seconds` is 0 on a device that has one,
    /// [`Error::Worker`] when the thread that serves it is gone. Nothing changes then.
    pub fn set_stats_interval(&mut self, seconds: u16) -> Result<PendingUpdate> {
        if !self.stats_enabled() {
            return Err(Error::StatsDisabled);
        }
        if seconds == 0 {
            return Err(Error::StatsStateChange);
        }
        let pending = match &self.active {
            Some(active) => Some(
                active
                    .runner
                    .set_stats_interval(seconds)
                    .map_err(Error::Worker)?,
            ),
            None => None,
        };
        self.config.stats_polling_interval_s = seconds;
        Ok(PendingUpdate(pending))
    }

    /// The balloon's sizes and the guest's latest statistics.
    pub fn stats(&self) -> BalloonStats {
        let guest = *self.stats.lock().unwrap_or_else(|e| e.into_inner());
        BalloonStats {
            target_pages: self.num_pages,
            actual_pages: self.actual,
            target_mib: self.num_pages / PAGES_PER_MIB,
            actual_mib: self.actual / PAGES_PER_MIB,
            guest,
        }
    }

    /// The device's counters, which its handler updates while it runs.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// Whether the device is serving its queues.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let (num_pages, actual) = config.split_at_mut(4);
        num_pages.copy_from_slice(&self.num_pages.to_le_bytes());
        actual.copy_from_slice(&self.actual.to_le_bytes());
        config
    }
}

/// A change handed to the thread that serves a balloon ([`Balloon::set_stats_interval`]), to
/// wait for once the device's lock is released.
#[derive(Debug)]
#[must_use = "the change may still be under way, and may fail"]
pub struct PendingUpdate(Option<Reply<io::Result<()>>>);

impl PendingUpdate {
    /// Waits until the handler made the change. The change is made whether or not this is
    /// called.
    ///
    /// # Errors
    ///
    /// [`Error::Worker`] when the handler's thread ended first, [`Error::Timer`] when the
    /// timer refused the new interval.
    pub fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(reply) => reply.wait().map_err(Error::Worker)?.map_err(Error::Timer),
        }
    }
}

impl<M> VirtioDevice<M> for Balloon
where
    M: GuestAddressSpace + Send + 'static,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write, and only whole.
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset == ACTUAL_OFFSET => self.actual = u32::from_le_bytes(bytes),
            _ => log::debug!(
                "virtio-balloon ignored a {}-byte configuration write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn activate(&mut self, params: ActivateParams<M>) -> std::result::Result<(), ActivateError> {
        let result = self.start(params);
        if result.is_err() {
            inc(&self.metrics.activate_fails);
        }
        result
    }

    fn save_queues(&self) -> std::result::Result<Vec<Queue>, StateError> {
        let active = self.active.as_ref().ok_or(StateError::NotActive)?;
        active.runner.save_queues().map_err(StateError::Handler)
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            match active.runner.stop() {
                Ok(timer) => self.timer = timer,
                Err(err) => {
                    log::error!("virtio-balloon's handler did not stop cleanly: {err}");
                }
            }
        }
        self.actual = 0;
    }
}

impl Balloon {
    fn start<M: GuestAddressSpace + Send + 'static>(
        &mut self,
        params: ActivateParams<M>,
    ) -> std::result::Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let expected = self.queue_sizes.len();
        for given in [params.queues.len(), params.queue_evts.len()] {
            if given != expected {
                return Err(ActivateError::QueueCount { expected, given });
            }
        }
        let interrupt = params.interrupt.clone();
        let executor = params.executor.clone();
        let mut handler = BalloonHandler::new(
            params,
            self.config.stats_polling_interval_s,
            self.timer.take(),
            self.stats.clone(),
            self.metrics.clone(),
        )
        .map_err(ActivateError::Backend)?;
        if self.restored {
            handler.serve_available_on_start();
        }
        let runner = match Runner::start("ember-balloon".into(), handler, &executor) {
            Ok(runner) => runner,
            Err(err) => {
                self.timer = err.handler.into_timer();
                return Err(ActivateError::Worker(err.error));
            }
        };
        self.active = Some(Active {
            runner: Box::new(runner),
            interrupt,
        });
        self.restored = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{
        Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
        GuestRegionMmap,
    };
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::balloon::{BalloonHandler, INFLATE_QUEUE_TOKEN, PAGE_SIZE};
    use crate::mmio::MmioInterrupt;
    use crate::mock::{MockBuffer, MockDriver, guest_memory};
    use crate::worker::{EventHandler, Executor, Runner, WorkerGate};

    const MEM_SIZE: usize = 0x40_0000;
    /// The size of the file-backed region some tests put after `MEM_SIZE`.
    const FILE_LEN: usize = 0x1_0000;
    /// Where the tests' PFN arrays and statistics buffers live.
    const ARRAY: u64 = 0x3_0000;
    /// The first page the tests inflate.
    const FIRST_PAGE: u64 = 0x100;
    const TIMEOUT: Duration = Duration::from_secs(10);

    type Mem = Arc<GuestMemoryMmap<()>>;

    struct Guest {
        mem: Mem,
        drivers: Vec<MockDriver>,
        kicks: Vec<EventFd>,
        irq: EventFd,
        interrupt: Arc<MmioInterrupt>,
    }

    impl Guest {
        fn new(queues: usize) -> Self {
            Self::with_memory(queues, guest_memory(MEM_SIZE).unwrap())
        }

        /// A guest whose memory is the usual anonymous region followed by `FILE_LEN` bytes of
        /// a file of its own, mapped with `flags`; returns it with the file.
        fn with_file_region(queues: usize, flags: i32) -> (Self, std::fs::File) {
            let path = std::env::temp_dir().join(format!(
                "ember-balloon-test-{}-{flags:#x}",
                std::process::id()
            ));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            file.set_len(FILE_LEN as u64).unwrap();
            let mapping = MmapRegionBuilder::new(FILE_LEN)
                .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .unwrap();
            let anon = GuestRegionMmap::from_range(GuestAddress(0), MEM_SIZE, None).unwrap();
            let backed = GuestRegionMmap::new(mapping, GuestAddress(MEM_SIZE as u64)).unwrap();
            let mem = GuestMemoryMmap::from_regions(vec![anon, backed]).unwrap();
            (Self::with_memory(queues, mem), file)
        }

        fn with_memory(queues: usize, mem: GuestMemoryMmap<()>) -> Self {
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            Guest {
                mem: Arc::new(mem),
                drivers: (0..queues)
                    .map(|i| MockDriver::new(QUEUE_SIZE, GuestAddress(0x8000 * i as u64)))
                    .collect(),
                kicks: (0..queues)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                interrupt: Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())),
                irq,
            }
        }

        fn params(&self) -> ActivateParams<Mem> {
            self.params_with(self.interrupt.clone(), WorkerGate::new())
        }

        fn params_with(
            &self,
            interrupt: Arc<dyn VirtioInterrupt>,
            gate: WorkerGate,
        ) -> ActivateParams<Mem> {
            ActivateParams::new(
                self.mem.clone(),
                BASE_FEATURES,
                self.drivers.iter().map(MockDriver::queue).collect(),
                self.kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
                interrupt,
                gate,
            )
        }

        fn handler(&self, interval: u16) -> (BalloonHandler<Mem>, Arc<Mutex<GuestStats>>) {
            let stats = Arc::new(Mutex::new(GuestStats::default()));
            let handler =
                BalloonHandler::new(self.params(), interval, None, stats.clone(), Arc::default())
                    .unwrap();
            (handler, stats)
        }

        /// Publishes one inflate (or deflate) chain holding `pfns` as le32s.
        fn send_pfns(&mut self, queue: usize, pfns: &[u32]) {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.mem.write_slice(&bytes, GuestAddress(ARRAY)).unwrap();
            let len = u32::try_from(bytes.len()).unwrap();
            self.drivers[queue]
                .add_chain(&*self.mem, &[MockBuffer::readable(ARRAY, len)])
                .unwrap();
        }

        fn used_idx(&self, queue: usize) -> u16 {
            self.mem
                .read_obj::<u16>(self.drivers[queue].used_ring().unchecked_add(2))
                .unwrap()
        }

        fn fill(&self, page: u64, byte: u8) {
            let data = vec![byte; PAGE_SIZE as usize];
            self.mem
                .write_slice(&data, GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }

        fn page_is_zero(&self, page: u64) -> bool {
            let mut data = vec![0xffu8; PAGE_SIZE as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(page * PAGE_SIZE))
                .unwrap();
            data.iter().all(|&b| b == 0)
        }

        /// Whether the host holds the page: `mincore` on its host address.
        fn resident(&self, page: u64) -> bool {
            let host = self
                .mem
                .get_host_address(GuestAddress(page * PAGE_SIZE))
                .unwrap();
            let mut vec = [0u8; 1];
            // SAFETY: `host` is the page-aligned start of a page of guest memory, which the
            // test keeps mapped; `vec` has room for the one page asked about.
            let ret = unsafe { libc::mincore(host.cast(), PAGE_SIZE as usize, vec.as_mut_ptr()) };
            assert_eq!(ret, 0);
            vec[0] & 1 != 0
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn features_queues_and_config_follow_the_configuration() {
        let plain = Balloon::new(BalloonConfig::new(1, false, 0)).unwrap();
        let dev: &dyn VirtioDevice<Mem> = &plain;
        assert_eq!(dev.features(), BASE_FEATURES);
        assert_eq!(dev.queue_max_sizes().len(), 2);
        let full = Balloon::new(BalloonConfig::new(2, true, 5)).unwrap();
        let dev: &dyn VirtioDevice<Mem> = &full;
        assert_eq!(
            dev.features(),
            BASE_FEATURES
                | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
                | (1 << VIRTIO_BALLOON_F_STATS_VQ)
        );
        assert_eq!(dev.queue_max_sizes().len(), 3);
        let mut config = [0u8; 12];
        dev.read_config(0, &mut config);
        assert_eq!(config, [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Balloon::new(BalloonConfig::new(u32::MAX, false, 0)),
            Err(Error::TooLarge(_))
        ));
    }

    #[test]
    fn the_driver_writes_actual_and_nothing_else() {
        let mut balloon = Balloon::new(BalloonConfig::new(4, false, 0)).unwrap();
        let dev: &mut dyn VirtioDevice<Mem> = &mut balloon;
        dev.write_config(4, &512u32.to_le_bytes());
        dev.write_config(0, &7u32.to_le_bytes());
        dev.write_config(4, &[1, 2]);
        dev.write_config(5, &1u32.to_le_bytes());
        let stats = balloon.stats();
        assert_eq!(stats.target_pages, 1024);
        assert_eq!(stats.target_mib, 4);
        assert_eq!(stats.actual_pages, 512);
        assert_eq!(stats.actual_mib, 2);
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_read_as_zero() {
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        let metrics = handler_metrics(&handler);
        for page in FIRST_PAGE..FIRST_PAGE + 8 {
            guest.fill(page, 0xab);
            assert!(guest.resident(page));
        }
        // Pages 0..4 and 6 in a jumbled order with a repeat; page 5 and 7 stay.
        let first = FIRST_PAGE as u32;
        guest.send_pfns(
            0,
            &[first + 3, first, first + 6, first + 1, first + 2, first],
        );
        handler.process_inflate().unwrap();
        assert_eq!(guest.used_idx(0), 1);
        for page in [0, 1, 2, 3, 6] {
            assert!(!guest.resident(FIRST_PAGE + page), "page {page} resident");
            assert!(guest.page_is_zero(FIRST_PAGE + page));
        }
        for page in [4, 5, 7] {
            assert!(guest.resident(FIRST_PAGE + page));
            assert!(!guest.page_is_zero(FIRST_PAGE + page));
        }
        assert_eq!(
            metrics
                .inflated_pages
                .load(std::sync::atomic::Ordering::Relaxed),
            5
        );
        assert_eq!(
            metrics
                .inflate_count
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(guest.irq.read().unwrap(), 1);
    }

    fn handler_metrics(handler: &BalloonHandler<Mem>) -> Arc<BalloonMetrics> {
        handler.metrics().clone()
    }

    #[test]
    fn pfns_outside_memory_odd_lengths_and_huge_chains_touch_nothing_else() {
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        let metrics = handler_metrics(&handler);
        let last = (MEM_SIZE as u64 / PAGE_SIZE) as u32;
        guest.fill(u64::from(last) - 1, 0xcd);
        // Pages past the end of memory, and the largest numbers, next to the last real page.
        guest.send_pfns(0, &[last - 1, last, last + 1, u32::MAX, u32::MAX - 1]);
        // A chain whose length is not a whole number of PFNs.
        guest
            .mem
            .write_slice(&[0xff; 6], GuestAddress(ARRAY + 0x1000))
            .unwrap();
        guest.drivers[0]
            .add_chain(&*guest.mem, &[MockBuffer::readable(ARRAY + 0x1000, 6)])
            .unwrap();
        // A chain of 2048 PFNs, the same one: only the first 256 are read.
        let huge: Vec<u8> = std::iter::repeat_n((last - 1).to_le_bytes(), 2048)
            .flatten()
            .collect();
        guest
            .mem
            .write_slice(&huge, GuestAddress(ARRAY + 0x2000))
            .unwrap();
        guest.drivers[0]
            .add_chain(&*guest.mem, &[MockBuffer::readable(ARRAY + 0x2000, 0x2000)])
            .unwrap();
        handler.process_inflate().unwrap();
        assert!(!handler.is_broken());
        assert_eq!(guest.used_idx(0), 3);
        assert!(guest.page_is_zero(u64::from(last) - 1));
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(load(&metrics.inflated_pages), 2);
        // Four outside memory, the 6-byte chain's whole PFN (outside too) and its trailing
        // half, and the 1792 past the chain's limit.
        assert_eq!(load(&metrics.invalid_pfns), 4 + 2 + 1792);
    }

    #[test]
    fn a_flood_of_chains_is_handled_a_budget_at_a_time() {
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        for _ in 0..QUEUE_SIZE {
            guest.send_pfns(0, &[FIRST_PAGE as u32]);
        }
        handler.process_inflate().unwrap();
        assert_eq!(guest.used_idx(0), QUEUE_SIZE);
        // The handler asked to come back, in case more were waiting.
        assert_eq!(guest.kicks[0].read().unwrap(), 1);
    }

    #[test]
    fn a_broken_queue_stops_the_handler_and_asks_for_a_reset() {
        let guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        // An available index far past what the ring holds.
        let avail = guest.drivers[0].avail_ring();
        guest
            .mem
            .write_obj(QUEUE_SIZE * 2, avail.unchecked_add(2))
            .unwrap();
        assert!(matches!(
            handler.process_inflate(),
            Err(Error::Queue {
                queue: "inflate",
                ..
            })
        ));
        // So is a buffer outside guest memory, whatever its PFNs.
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        guest.drivers[0]
            .add_chain(&*guest.mem, &[MockBuffer::readable(ARRAY, u32::MAX)])
            .unwrap();
        assert!(matches!(
            handler.process_inflate(),
            Err(Error::Queue {
                queue: "inflate",
                ..
            })
        ));
    }

    #[test]
    fn deflated_pages_are_acknowledged() {
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        guest.fill(FIRST_PAGE, 1);
        guest.send_pfns(1, &[FIRST_PAGE as u32]);
        handler.process_deflate().unwrap();
        assert_eq!(guest.used_idx(1), 1);
        assert!(!guest.page_is_zero(FIRST_PAGE));
        assert_eq!(
            handler
                .metrics()
                .deflate_count
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    fn stats_buffer(guest: &mut Guest, stats: &[(u16, u64)], trailing: usize) {
        let mut bytes: Vec<u8> = stats
            .iter()
            .flat_map(|(tag, value)| {
                let mut stat = tag.to_le_bytes().to_vec();
                stat.extend_from_slice(&value.to_le_bytes());
                stat
            })
            .collect();
        bytes.extend(std::iter::repeat_n(0xee, trailing));
        guest.mem.write_slice(&bytes, GuestAddress(ARRAY)).unwrap();
        guest.drivers[2]
            .add_chain(
                &*guest.mem,
                &[MockBuffer::readable(
                    ARRAY,
                    u32::try_from(bytes.len()).unwrap(),
                )],
            )
            .unwrap();
    }

    #[test]
    fn statistics_are_read_and_the_buffer_goes_back_at_each_poll() {
        let mut guest = Guest::new(3);
        let (mut handler, stats) = guest.handler(1);
        stats_buffer(&mut guest, &[(4, 1 << 20), (5, 1 << 28), (99, 5)], 3);
        handler.process_stats().unwrap();
        // Kept until the poll.
        assert_eq!(guest.used_idx(2), 0);
        let seen = *stats.lock().unwrap();
        assert_eq!(seen.free_memory, Some(1 << 20));
        assert_eq!(seen.total_memory, Some(1 << 28));
        assert_eq!(seen.swap_in, None);
        handler.poll_stats().unwrap();
        assert_eq!(guest.used_idx(2), 1);
        // Nothing held: a poll does nothing.
        handler.poll_stats().unwrap();
        assert_eq!(guest.used_idx(2), 1);
        // A second buffer while one is held: the old one goes back.
        stats_buffer(&mut guest, &[(0, 7)], 0);
        stats_buffer(&mut guest, &[(1, 8)], 0);
        handler.process_stats().unwrap();
        assert_eq!(guest.used_idx(2), 2);
        assert_eq!(stats.lock().unwrap().swap_out, Some(8));
    }

    #[test]
    fn saved_queues_give_the_held_statistics_buffer_back_and_leave_the_handler_holding_it() {
        let mut guest = Guest::new(3);
        let (mut handler, _) = guest.handler(1);
        // Nothing held: the queues are saved as they stand.
        let saved = handler.save_queues();
        assert_eq!(saved.len(), 3);
        assert_eq!(saved[2].next_avail(), 0);
        // Two buffers: the first goes back at once, the second is held.
        stats_buffer(&mut guest, &[(0, 1)], 0);
        stats_buffer(&mut guest, &[(1, 2)], 0);
        guest.send_pfns(0, &[FIRST_PAGE as u32]);
        handler.process_stats().unwrap();
        handler.process_inflate().unwrap();
        assert_eq!(guest.used_idx(2), 1);
        let saved = handler.save_queues();
        assert_eq!(saved[2].next_avail(), 1, "the held buffer is taken again");
        assert_eq!(saved[2].next_used(), 1);
        assert_eq!(saved[0].next_avail(), 1, "the inflate queue holds nothing");
        assert_eq!(saved[0].next_used(), 1);
        assert_eq!(saved[1].next_avail(), 0);
        // The handler itself still holds it, and hands it back at its poll.
        assert!(format!("{handler:?}").contains("stats_head: Some(1)"));
        handler.poll_stats().unwrap();
        assert_eq!(guest.used_idx(2), 2);
        assert_eq!(handler.save_queues()[2].next_avail(), 2);
        // Without a statistics queue, two queues are saved.
        let guest = Guest::new(2);
        let (handler, _) = guest.handler(0);
        assert_eq!(handler.save_queues().len(), 2);
    }

    #[test]
    fn an_active_balloon_polls_statistics_on_its_timer_and_raises_config_changes() {
        let mut guest = Guest::new(3);
        let mut balloon = Balloon::new(BalloonConfig::new(0, true, 1)).unwrap();
        VirtioDevice::<Mem>::activate(&mut balloon, guest.params()).unwrap();
        assert!(balloon.is_active());
        stats_buffer(&mut guest, &[(6, 42)], 0);
        guest.kicks[2].write(1).unwrap();
        wait_for("the statistics", || {
            balloon.stats().guest.available_memory == Some(42)
        });
        // The timer hands the buffer back within the interval.
        wait_for("the poll", || guest.used_idx(2) == 1);
        while guest.irq.read().is_ok() {}
        balloon.set_target_mib(3).unwrap();
        assert_eq!(guest.irq.read().unwrap(), 1);
        assert_eq!(balloon.stats().target_pages, 768);
        balloon.set_stats_interval(2).unwrap().wait().unwrap();
        assert_eq!(balloon.config().stats_polling_interval_s, 2);
        assert!(matches!(
            balloon.set_stats_interval(0),
            Err(Error::StatsStateChange)
        ));
        // Inflating through the worker.
        guest.fill(FIRST_PAGE, 9);
        guest.send_pfns(0, &[FIRST_PAGE as u32]);
        guest.kicks[0].write(1).unwrap();
        wait_for("the inflation", || guest.used_idx(0) == 1);
        assert!(guest.page_is_zero(FIRST_PAGE));
        VirtioDevice::<Mem>::reset(&mut balloon);
        assert!(!balloon.is_active());
    }

    #[test]
    fn statistics_cannot_be_turned_on_after_creation() {
        let mut balloon = Balloon::new(BalloonConfig::new(0, false, 0)).unwrap();
        assert!(matches!(
            balloon.set_stats_interval(1),
            Err(Error::StatsDisabled)
        ));
        assert_eq!(balloon.config().stats_polling_interval_s, 0);
    }

    #[test]
    fn activation_with_the_wrong_queues_is_refused() {
        let guest = Guest::new(2);
        let mut balloon = Balloon::new(BalloonConfig::new(0, false, 1)).unwrap();
        assert!(matches!(
            VirtioDevice::<Mem>::activate(&mut balloon, guest.params()),
            Err(ActivateError::QueueCount {
                expected: 3,
                given: 2
            })
        ));
        assert_eq!(
            balloon
                .metrics()
                .activate_fails
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    /// An interrupt that can never be delivered.
    struct RefusingInterrupt;

    impl VirtioInterrupt for RefusingInterrupt {
        fn trigger(&self, _kind: VirtioInterruptType) -> io::Result<()> {
            Err(io::Error::other("the interrupt line is gone"))
        }
    }

    fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn debug_output_shows_the_sizes_and_the_handler_state() {
        let mut balloon = Balloon::new(BalloonConfig::new(1, false, 0)).unwrap();
        VirtioDevice::<Mem>::write_config(&mut balloon, 4, &3u32.to_le_bytes());
        let text = format!("{balloon:?}");
        assert!(text.starts_with("Balloon {"), "{text}");
        assert!(text.contains("features: 0x100000000"), "{text}");
        assert!(text.contains("num_pages: 256"), "{text}");
        assert!(text.contains("actual: 3"), "{text}");
        assert!(text.contains("active: false"), "{text}");
        let guest = Guest::new(3);
        let (handler, _) = guest.handler(1);
        let text = format!("{handler:?}");
        assert!(text.contains("stats: true"), "{text}");
        assert!(text.contains("stats_head: None"), "{text}");
        assert!(text.contains("broken: false"), "{text}");
    }

    #[test]
    fn a_handler_without_a_deflate_queue_is_refused() {
        let guest = Guest::new(1);
        let err = BalloonHandler::new(guest.params(), 0, None, Arc::default(), Arc::default())
            .unwrap_err();
        assert!(err.to_string().contains("deflate"), "{err}");
    }

    #[test]
    fn a_handler_without_statistics_ignores_the_interval_and_the_stats_queue() {
        let guest = Guest::new(2);
        let (mut handler, stats) = guest.handler(0);
        handler.set_stats_interval(5).unwrap();
        handler.process_stats().unwrap();
        handler.poll_stats().unwrap();
        assert_eq!(*stats.lock().unwrap(), GuestStats::default());
        assert_eq!(guest.irq.read().ok(), None);
        assert!(handler.into_timer().is_none());
    }

    #[test]
    fn a_stats_queue_without_a_timer_refuses_an_interval_and_keeps_its_buffer() {
        let mut guest = Guest::new(3);
        // A statistics queue, but no polling interval: no timer is made.
        let (mut handler, stats) = guest.handler(0);
        stats_buffer(&mut guest, &[(4, 9)], 0);
        handler.process_stats().unwrap();
        assert_eq!(stats.lock().unwrap().free_memory, Some(9));
        assert!(handler.set_stats_interval(1).is_err());
        // The buffer is still held: nothing was handed back.
        assert_eq!(guest.used_idx(2), 0);
        assert!(!handler.is_broken());
    }

    #[test]
    fn a_flood_of_deflate_chains_is_handled_a_budget_at_a_time() {
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        for _ in 0..QUEUE_SIZE {
            guest.send_pfns(1, &[FIRST_PAGE as u32]);
        }
        handler.process_deflate().unwrap();
        assert_eq!(guest.used_idx(1), QUEUE_SIZE);
        assert_eq!(
            load(&handler.metrics().deflate_count),
            u64::from(QUEUE_SIZE)
        );
        // The handler asked to come back on the deflate queue, not the inflate one.
        assert_eq!(guest.kicks[1].read().unwrap(), 1);
        assert!(guest.kicks[0].read().is_err());
        assert_eq!(guest.irq.read().unwrap(), 1);
    }

    #[test]
    fn a_full_queue_eventfd_is_counted_and_the_chains_are_still_used() {
        let mut guest = Guest::new(2);
        let (mut handler, _) = guest.handler(0);
        // The eventfd cannot count any further: the handler's own notification fails.
        guest.kicks[0].write(u64::MAX - 1).unwrap();
        for _ in 0..QUEUE_SIZE {
            guest.send_pfns(0, &[FIRST_PAGE as u32]);
        }
        handler.process_inflate().unwrap();
        assert!(!handler.is_broken());
        assert_eq!(guest.used_idx(0), QUEUE_SIZE);
        assert_eq!(load(&handler.metrics().event_fails), 1);
        assert_eq!(
            load(&handler.metrics().inflate_count),
            u64::from(QUEUE_SIZE)
        );
    }

    #[test]
    fn an_interrupt_that_cannot_be_raised_is_counted_and_the_buffers_still_go_back() {
        let mut guest = Guest::new(2);
        let mut handler = BalloonHandler::new(
            guest.params_with(Arc::new(RefusingInterrupt), WorkerGate::new()),
            0,
            None,
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        guest.send_pfns(1, &[FIRST_PAGE as u32]);
        handler.process_deflate().unwrap();
        guest.send_pfns(1, &[FIRST_PAGE as u32 + 1]);
        handler.process_deflate().unwrap();
        assert!(!handler.is_broken());
        assert_eq!(guest.used_idx(1), 2);
        assert_eq!(load(&handler.metrics().deflate_count), 2);
        assert_eq!(load(&handler.metrics().event_fails), 2);
    }

    #[test]
    fn a_target_the_driver_cannot_be_told_of_is_counted_and_kept() {
        let guest = Guest::new(2);
        let mut balloon = Balloon::new(BalloonConfig::new(1, false, 0)).unwrap();
        VirtioDevice::<Mem>::activate(
            &mut balloon,
            guest.params_with(Arc::new(RefusingInterrupt), WorkerGate::new()),
        )
        .unwrap();
        balloon.set_target_mib(2).unwrap();
        assert_eq!(balloon.stats().target_pages, 512);
        assert_eq!(balloon.config().amount_mib, 2);
        assert_eq!(load(&balloon.metrics().event_fails), 1);
        VirtioDevice::<Mem>::reset(&mut balloon);
        assert!(!balloon.is_active());
    }

    #[test]
    fn an_inactive_balloon_takes_a_new_interval_at_once() {
        let mut balloon = Balloon::new(BalloonConfig::new(0, false, 1)).unwrap();
        assert_eq!(
            VirtioDevice::<Mem>::device_type(&balloon),
            VIRTIO_ID_BALLOON
        );
        balloon.set_stats_interval(7).unwrap().wait().unwrap();
        assert_eq!(balloon.config().stats_polling_interval_s, 7);
        assert!(!balloon.is_active());
    }

    #[test]
    fn a_second_activation_is_refused_and_counted() {
        let guest = Guest::new(2);
        let mut balloon = Balloon::new(BalloonConfig::new(0, false, 0)).unwrap();
        VirtioDevice::<Mem>::activate(&mut balloon, guest.params()).unwrap();
        assert!(matches!(
            VirtioDevice::<Mem>::activate(&mut balloon, guest.params()),
            Err(ActivateError::AlreadyActive)
        ));
        assert!(balloon.is_active());
        assert_eq!(load(&balloon.metrics().activate_fails), 1);
        VirtioDevice::<Mem>::reset(&mut balloon);
    }

    #[test]
    fn a_worker_that_cannot_start_fails_the_activation_and_a_later_one_polls() {
        let mut guest = Guest::new(3);
        let mut balloon = Balloon::new(BalloonConfig::new(0, false, 1)).unwrap();
        let gate = WorkerGate::new();
        gate.set_thread_hook(Some(Arc::new(|_: &str| {
            Err(io::Error::other("no worker here"))
        })));
        assert!(matches!(
            VirtioDevice::<Mem>::activate(
                &mut balloon,
                guest.params_with(guest.interrupt.clone(), gate)
            ),
            Err(ActivateError::Worker(_))
        ));
        assert!(!balloon.is_active());
        assert_eq!(load(&balloon.metrics().activate_fails), 1);
        // The device is as before: the next activation serves statistics on its timer.
        VirtioDevice::<Mem>::activate(&mut balloon, guest.params()).unwrap();
        stats_buffer(&mut guest, &[(7, 11)], 0);
        guest.kicks[2].write(1).unwrap();
        wait_for("the statistics", || {
            balloon.stats().guest.disk_caches == Some(11)
        });
        wait_for("the poll", || guest.used_idx(2) == 1);
        VirtioDevice::<Mem>::reset(&mut balloon);
        assert_eq!(load(&balloon.metrics().activate_fails), 1);
    }

    #[test]
    fn a_broken_deflate_queue_stops_every_queue_until_reset() {
        let mut guest = Guest::new(3);
        let (handler, _) = guest.handler(1);
        let metrics = handler_metrics(&handler);
        let runner = Runner::start(
            "balloon-test".into(),
            handler,
            &Executor::Thread(WorkerGate::new()),
        )
        .unwrap();
        // An available index far past what the deflate ring holds.
        let avail = guest.drivers[1].avail_ring();
        guest
            .mem
            .write_obj(QUEUE_SIZE * 2, avail.unchecked_add(2))
            .unwrap();
        guest.kicks[1].write(1).unwrap();
        wait_for("the handler to stop", || {
            runner.call(|h, _| h.is_broken()).unwrap()
        });
        assert_eq!(load(&metrics.event_fails), 1);
        // The driver is asked for a reset.
        assert_eq!(guest.irq.read().unwrap(), 1);
        // A valid inflate chain, kicked and even handed in as an event, is left alone.
        guest.fill(FIRST_PAGE, 5);
        guest.send_pfns(0, &[FIRST_PAGE as u32]);
        guest.kicks[0].write(1).unwrap();
        runner
            .call(|h, ops| h.handle_event(ops, INFLATE_QUEUE_TOKEN, EventSet::IN))
            .unwrap();
        assert_eq!(guest.used_idx(0), 0);
        assert!(!guest.page_is_zero(FIRST_PAGE));
        assert_eq!(load(&metrics.inflate_count), 0);
        assert_eq!(load(&metrics.event_fails), 1);
        let handler = runner.stop().unwrap();
        assert!(handler.is_broken());
    }

    #[test]
    fn an_unknown_event_token_is_ignored() {
        let mut guest = Guest::new(2);
        let (handler, _) = guest.handler(0);
        let metrics = handler_metrics(&handler);
        let runner = Runner::start(
            "balloon-test".into(),
            handler,
            &Executor::Thread(WorkerGate::new()),
        )
        .unwrap();
        let broken = runner
            .call(|h, ops| {
                h.handle_event(ops, 99, EventSet::IN);
                h.is_broken()
            })
            .unwrap();
        assert!(!broken);
        assert!(metrics.values().iter().all(|&(_, value)| value == 0));
        // The handler goes on serving its queues.
        guest.send_pfns(1, &[FIRST_PAGE as u32]);
        guest.kicks[1].write(1).unwrap();
        wait_for("the deflation", || guest.used_idx(1) == 1);
        runner.stop().unwrap();
    }

    /// The byte at `offset` in `file`, as the file itself holds it.
    fn file_byte(file: &std::fs::File, offset: u64) -> u8 {
        use std::os::unix::fs::FileExt;
        let mut byte = [0xffu8];
        file.read_exact_at(&mut byte, offset).unwrap();
        byte[0]
    }

    #[test]
    fn pages_of_a_shared_file_are_removed_from_the_file_too() {
        let (mut guest, file) = Guest::with_file_region(2, libc::MAP_SHARED);
        let (mut handler, _) = guest.handler(0);
        let metrics = handler_metrics(&handler);
        let last_anon = MEM_SIZE as u64 / PAGE_SIZE - 1;
        // The last anonymous page and the first three pages of the file, one range of PFNs
        // across the two regions; the file's fourth page stays.
        for page in last_anon..last_anon + 5 {
            guest.fill(page, 0x5a);
        }
        assert_eq!(file_byte(&file, 0), 0x5a);
        let first = u32::try_from(last_anon).unwrap();
        guest.send_pfns(0, &[first + 2, first, first + 3, first + 1]);
        handler.process_inflate().unwrap();
        assert_eq!(guest.used_idx(0), 1);
        for page in last_anon..last_anon + 4 {
            assert!(guest.page_is_zero(page), "page {page:#x}");
        }
        assert!(!guest.page_is_zero(last_anon + 4));
        // The file's pages are gone from the file, not only from the mapping.
        for file_page in 0..3 {
            assert_eq!(file_byte(&file, file_page * PAGE_SIZE), 0);
        }
        assert_eq!(file_byte(&file, 3 * PAGE_SIZE), 0x5a);
        assert_eq!(load(&metrics.inflated_pages), 4);
        assert_eq!(load(&metrics.event_fails), 0);
    }

    #[test]
    fn pages_the_host_refuses_to_take_back_are_counted_and_the_chain_is_used() {
        // A private mapping of a file: the kernel refuses to remove its pages.
        let (mut guest, file) = Guest::with_file_region(2, libc::MAP_PRIVATE);
        let (mut handler, _) = guest.handler(0);
        let metrics = handler_metrics(&handler);
        let first_file_page = MEM_SIZE as u64 / PAGE_SIZE;
        guest.fill(first_file_page, 0x77);
        guest.send_pfns(0, &[u32::try_from(first_file_page).unwrap()]);
        handler.process_inflate().unwrap();
        assert!(!handler.is_broken());
        assert_eq!(guest.used_idx(0), 1);
        assert_eq!(load(&metrics.event_fails), 1);
        assert_eq!(load(&metrics.inflated_pages), 0);
        // The guest's page is as it was, and the file was never written.
        assert!(!guest.page_is_zero(first_file_page));
        assert_eq!(file_byte(&file, 0), 0);
        // The handler goes on: the next chain, of an anonymous page, is given back.
        guest.fill(FIRST_PAGE, 0x77);
        guest.send_pfns(0, &[FIRST_PAGE as u32]);
        handler.process_inflate().unwrap();
        assert_eq!(guest.used_idx(0), 2);
        assert!(guest.page_is_zero(FIRST_PAGE));
        assert_eq!(load(&metrics.inflated_pages), 1);
    }
}
