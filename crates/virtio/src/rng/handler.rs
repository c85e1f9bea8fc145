//! The work of an active entropy device: filling the buffers the driver hands over with random
//! bytes, on the thread that serves the device (its worker, or the VMM's event manager).
//!
//! [`RngHandler::process_queue`] is the one step; the [`EventHandler`] implementation calls it
//! when the driver notifies the queue and when the rate limiter's timer lets a held-back request
//! go. It never spins and never blocks: the source is asked without blocking, each call serves a
//! bounded batch, and past the batch the handler notifies its own queue eventfd so that it comes
//! back after the events waiting behind.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ember_rate_limiter::{BucketUpdate, RateLimiter, RateLimiterState, TokenType};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::metrics::{RngMetrics, add, inc};
use super::{EntropySource, Error, MAX_BATCH, MAX_BATCH_BYTES, MAX_REQUEST_LEN, Result};
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::error::ErrorChain;
use crate::queue::{DescriptorChain, Queue};
use crate::worker::{EventHandler, EventOps};

/// The handler's token for the queue's notification eventfd.
pub const QUEUE_TOKEN: u64 = 0;
/// The handler's token for the rate limiter's timerfd.
pub const RATE_LIMITER_TOKEN: u64 = 1;

/// What the queue tells the driver when used.
const QUEUE_INTERRUPT: VirtioInterruptType = VirtioInterruptType::Queue(0);

/// Why [`RngHandler::drain`] stopped.
enum Drained {
    /// The queue is empty.
    Empty,
    /// The batch is spent; the handler comes back for the rest.
    Full,
    /// The rate limiter refused a request, which waits for its timer.
    Throttled,
}

/// The device's state while active: its queue, its source, and the request held back.
pub struct RngHandler<M, S> {
    mem: M,
    source: S,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    rate_limiter: RateLimiter,
    /// The random bytes of one request. Allocated once, [`MAX_REQUEST_LEN`] long.
    buf: Vec<u8>,
    /// The chain the rate limiter held back, served first once its timer fires.
    pending: Option<DescriptorChain>,
    /// Whether the rate limiter refused a request: the queue waits for its timer.
    throttled: bool,
    /// Whether the driver broke the protocol; the handler serves nothing until reset.
    broken: bool,
    metrics: Arc<RngMetrics>,
}

impl<M, S> fmt::Debug for RngHandler<M, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RngHandler")
            .field("pending", &self.pending.is_some())
            .field("throttled", &self.throttled)
            .field("broken", &self.broken)
            .field("rate_limiter", &self.rate_limiter)
            .finish_non_exhaustive()
    }
}

impl<M, S> RngHandler<M, S>
where
    M: GuestAddressSpace + Send + 'static,
    S: EntropySource,
{
    /// Serves `queue`, whose notifications come on `queue_evt`, in `mem`, with bytes from
    /// `source` that go through `rate_limiter`, telling the driver through `interrupt`.
    pub fn new(
        source: S,
        rate_limiter: RateLimiter,
        mem: M,
        queue: Queue,
        queue_evt: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        RngHandler {
            mem,
            source,
            queue,
            queue_evt,
            interrupt,
            rate_limiter,
            buf: vec![0; MAX_REQUEST_LEN],
            pending: None,
            throttled: false,
            broken: false,
            metrics: Arc::default(),
        }
    }

    /// Counts into `metrics`, a device's counters, from now on; a handler starts with counters
    /// of its own.
    pub fn with_metrics(mut self, metrics: Arc<RngMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The counters the handler updates.
    pub fn metrics(&self) -> &Arc<RngMetrics> {
        &self.metrics
    }

    /// Gives the source and the rate limiter back, when the device is reset.
    pub fn into_parts(self) -> (S, RateLimiter) {
        (self.source, self.rate_limiter)
    }

    /// The rate limiter requests go through.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.rate_limiter
    }

    /// Changes the rate limiter's buckets; a bucket given [`BucketUpdate::None`] keeps its
    /// state. A request held back under the old limits waits for the timer, which the change
    /// re-arms.
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.rate_limiter.update_buckets(bandwidth, ops);
    }

    /// Restores the rate limiter's buckets from a snapshot.
    ///
    /// # Errors
    ///
    /// [`ember_rate_limiter::Error::InvalidState`] when a bucket is invalid; nothing changes.
    pub fn restore_rate_limiter(
        &mut self,
        state: &RateLimiterState,
    ) -> ember_rate_limiter::Result<()> {
        self.rate_limiter.restore(state)
    }

    /// Whether the rate limiter holds a request back, so that nothing is served until its
    /// timer fires.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// Whether the driver broke the protocol, so that the handler serves nothing until reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The queue as a snapshot records it: the chain the rate limiter holds back, if any, is
    /// given back to the available ring, so that a device restored from the snapshot serves
    /// it. That chain is always the last one taken: nothing more is taken while it is held.
    pub fn saved_queue(&self) -> Queue {
        let mut queue = self.queue.clone();
        if self.pending.is_some() {
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
        }
        queue
    }

    /// Serves the chains in the queue, and returns how many it handed back. Each chain's
    /// device-writable buffers get up to [`MAX_REQUEST_LEN`] random bytes (fewer when the
    /// source has fewer to give at once), after the rate limiter took one operation and that
    /// many bytes; its device-readable buffers are left alone. It stops after [`MAX_BATCH`]
    /// chains or [`MAX_BATCH_BYTES`] bytes, and notifies its own queue eventfd to come back for
    /// the rest; and when the rate limiter refuses a request, which then waits for the
    /// limiter's timer ([`RngHandler::is_throttled`]).
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of the queue.
    pub fn process_queue(&mut self) -> Result<usize> {
        if self.broken || self.throttled {
            return Ok(0);
        }
        let mem = self.mem.memory();
        let mem = &*mem;
        let mut served = 0usize;
        let mut bytes = 0usize;
        let mut passes = 0usize;
        let result = loop {
            if let Err(err) = self.queue.disable_notification(mem) {
                break Err(Error::Queue(err));
            }
            match self.drain(mem, &mut served, &mut bytes) {
                Ok(Drained::Empty) => {}
                // Notifications stay off: the handler's own eventfd, or the limiter's timer,
                // brings it back.
                Ok(Drained::Full | Drained::Throttled) => break Ok(()),
                Err(err) => break Err(err),
            }
            // With notifications on, a driver that makes more chains available notifies; one
            // that did so meanwhile is served now, a bounded number of times.
            match self.queue.enable_notification(mem) {
                Ok(true) if passes < MAX_BATCH => passes += 1,
                Ok(_) => break Ok(()),
                Err(err) => break Err(Error::Queue(err)),
            }
        };
        if served > 0 {
            let notify = self.queue.needs_notification(mem).map_err(Error::Queue)?;
            if notify {
                self.signal_used(QUEUE_INTERRUPT);
            }
        }
        result.map(|()| served)
    }

    /// Serves chains until the queue is empty, the batch is spent or the limiter refuses one.
    fn drain(&mut self, mem: &M::M, served: &mut usize, bytes: &mut usize) -> Result<Drained> {
        loop {
            if *served >= MAX_BATCH || *bytes >= MAX_BATCH_BYTES {
                if let Err(err) = self.queue_evt.write(1) {
                    inc(&self.metrics.entropy_event_fails);
                    log::error!("Cannot wake the virtio-rng handler for more requests: {err}");
                }
                return Ok(Drained::Full);
            }
            let chain = match self.pending.take() {
                Some(chain) => chain,
                None => match self.queue.pop(mem).map_err(Error::Queue)? {
                    Some(chain) => chain,
                    None => return Ok(Drained::Empty),
                },
            };
            let want = usize::try_from(chain.writable_len())
                .unwrap_or(usize::MAX)
                .min(MAX_REQUEST_LEN);
            if !admit(
                &mut self.rate_limiter,
                u64::try_from(want).unwrap_or(u64::MAX),
            ) {
                self.pending = Some(chain);
                self.throttled = true;
                inc(&self.metrics.entropy_rate_limiter_throttled);
                return Ok(Drained::Throttled);
            }
            let written = self.fill_chain(mem, &chain, want);
            self.queue
                .add_used(mem, chain.head_index(), u32::try_from(written).unwrap_or(0))
                .map_err(Error::Queue)?;
            *served = served.saturating_add(1);
            *bytes = bytes.saturating_add(want.max(1));
        }
    }

    /// Writes up to `want` random bytes into `chain`'s writable buffers; returns how many.
    fn fill_chain(&mut self, mem: &M::M, chain: &DescriptorChain, want: usize) -> usize {
        if want == 0 {
            return 0;
        }
        let Some(buf) = self.buf.get_mut(..want) else {
            return 0;
        };
        let got = match self.source.fill(buf) {
            Ok(got) => got.min(want),
            Err(err) => {
                // Counted below, with the short reads.
                log::debug!("virtio-rng's source gave nothing: {err}");
                0
            }
        };
        if got < want {
            inc(&self.metrics.host_rng_fails);
            // Tokens for bytes not handed over go back.
            let short = u64::try_from(want.saturating_sub(got)).unwrap_or(0);
            self.rate_limiter.replenish(short, TokenType::Bytes);
        }
        let Some(random) = buf.get(..got) else {
            return 0;
        };
        match chain.write_from(mem, random) {
            Ok(written) => {
                add(
                    &self.metrics.entropy_bytes,
                    u64::try_from(written).unwrap_or(0),
                );
                written
            }
            Err(err) => {
                // Buffers were checked when the chain was read; guest memory that went away
                // since is the guest's loss.
                inc(&self.metrics.entropy_event_fails);
                log::debug!("virtio-rng cannot write into the guest's buffers: {err}");
                0
            }
        }
    }

    fn signal_used(&mut self, kind: VirtioInterruptType) {
        if let Err(err) = self.interrupt.trigger(kind) {
            inc(&self.metrics.entropy_event_fails);
            log::error!("virtio-rng cannot raise its interrupt: {err}");
        }
    }

    /// The rate limiter's timer fired: the request held back goes again.
    fn rate_limiter_event(&mut self) -> Result<usize> {
        inc(&self.metrics.rate_limiter_event_count);
        match self.rate_limiter.event_handler() {
            Ok(()) => {}
            // Re-armed after epoll saw it (the buckets changed): it fires again.
            Err(ember_rate_limiter::Error::SpuriousEvent) => return Ok(0),
            Err(source) => return Err(Error::RateLimiter(source)),
        }
        if self.throttled {
            self.throttled = false;
            self.process_queue()
        } else {
            Ok(0)
        }
    }

    /// Stops serving after the driver broke the protocol or the limiter failed: the device
    /// asks for a reset and the handler waits on nothing, so it does not spin.
    fn fail(&mut self, ops: &mut EventOps<'_>, err: &Error) {
        self.broken = true;
        inc(&self.metrics.entropy_event_fails);
        log::warn!(
            "virtio-rng stops serving its queue until the driver resets it: {}",
            ErrorChain(err)
        );
        if let Err(err) = self.interrupt.trigger(VirtioInterruptType::NeedsReset) {
            log::error!("virtio-rng cannot raise its interrupt: {err}");
        }
        // Errors are ignored: the descriptors are going anyway, and the log already says why.
        let _ = ops.remove(self.queue_evt.as_raw_fd());
        let _ = ops.remove(self.rate_limiter.as_raw_fd());
    }
}

impl<M, S> EventHandler for RngHandler<M, S>
where
    M: GuestAddressSpace + Send + 'static,
    S: EntropySource,
{
    fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
        ops.add(self.queue_evt.as_raw_fd(), EventSet::IN, QUEUE_TOKEN)?;
        ops.add(
            self.rate_limiter.as_raw_fd(),
            EventSet::IN,
            RATE_LIMITER_TOKEN,
        )
    }

    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, _events: EventSet) {
        if self.broken {
            return;
        }
        let result = match token {
            QUEUE_TOKEN => {
                inc(&self.metrics.entropy_event_count);
                if let Err(err) = self.queue_evt.read() {
                    if err.kind() != io::ErrorKind::WouldBlock {
                        inc(&self.metrics.entropy_event_fails);
                    }
                }
                self.process_queue()
            }
            RATE_LIMITER_TOKEN => self.rate_limiter_event(),
            _ => Ok(0),
        };
        if let Err(err) = result {
            self.fail(ops, &err);
        }
    }
}

/// Takes an operation and `bytes` bytes from `limiter`, or nothing if it refuses either.
fn admit(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        limiter.replenish(1, TokenType::Ops);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use std::sync::Mutex;

    use super::*;
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, bucket, guest_memory, wait_timer};
    use crate::queue;
    use crate::rng::HostRng;
    use crate::rng::tests::{capture_logs, logged};
    use crate::worker::{Worker, WorkerGate};

    type Mem = Arc<GuestMemoryMmap<()>>;

    const MEM_SIZE: usize = 0x40_0000;
    /// Where the tests' data buffers start, past the queue's rings.
    const DATA: u64 = 0x10_0000;

    /// A source that hands out at most `limit` bytes per call, each `0x5a`, or fails with
    /// `WouldBlock` when `limit` is 0.
    struct Stingy {
        limit: usize,
    }

    impl EntropySource for Stingy {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.limit == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let count = buf.len().min(self.limit);
            buf.iter_mut().take(count).for_each(|byte| *byte = 0x5a);
            Ok(count)
        }
    }

    struct Guest<S> {
        mem: Mem,
        driver: MockDriver,
        irq: CountingTrigger,
        handler: RngHandler<Mem, S>,
        queue_evt: EventFd,
    }

    fn guest_with<S: EntropySource>(source: S, limiter: RateLimiter) -> Guest<S> {
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let driver = MockDriver::new(256, GuestAddress(0));
        let irq = CountingTrigger::default();
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let handler = RngHandler::new(
            source,
            limiter,
            mem.clone(),
            driver.queue(),
            queue_evt.try_clone().unwrap(),
            Arc::new(irq.clone()),
        );
        Guest {
            mem,
            driver,
            irq,
            handler,
            queue_evt,
        }
    }

    fn guest() -> Guest<HostRng> {
        guest_with(HostRng, RateLimiter::default())
    }

    impl<S: EntropySource> Guest<S> {
        fn add(&mut self, buffers: &[MockBuffer]) -> u16 {
            self.driver.add_chain(&*self.mem, buffers).unwrap()
        }

        fn used(&self, index: u16) -> (u32, u32) {
            self.driver.used_elem(&*self.mem, index).unwrap()
        }

        fn used_idx(&self) -> u16 {
            self.driver.used_idx(&*self.mem).unwrap()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut data = vec![0u8; len];
            self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
            data
        }

        fn fill(&self, addr: u64, len: usize, byte: u8) {
            self.mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .unwrap();
        }
    }

    #[test]
    fn writable_buffers_are_filled_and_readable_ones_left_alone() {
        let mut guest = guest();
        guest.fill(DATA, 0x3000, 0);
        guest.fill(DATA + 0x3000, 16, 0xee);
        let head = guest.add(&[
            MockBuffer::readable(DATA + 0x3000, 16),
            MockBuffer::writable(DATA, 0x1000),
            MockBuffer::writable(DATA + 0x2000, 0x800),
        ]);
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        assert_eq!(guest.used(0), (u32::from(head), 0x1800));
        // Random bytes: 4 KiB of zeros would be a one in 2^32768 event.
        assert!(guest.read(DATA, 0x1000).iter().any(|&b| b != 0));
        assert!(guest.read(DATA + 0x2000, 0x800).iter().any(|&b| b != 0));
        assert_eq!(guest.read(DATA + 0x1000, 0x1000), vec![0; 0x1000]);
        assert_eq!(guest.read(DATA + 0x3000, 16), vec![0xee; 16]);
        assert_eq!(guest.irq.count(), 1);
        let metrics = guest.handler.metrics();
        assert_eq!(metrics.get("entropy_bytes"), Some(0x1800));
        assert_eq!(metrics.get("host_rng_fails"), Some(0));
    }

    #[test]
    fn a_chain_without_writable_bytes_completes_with_nothing_written() {
        let mut guest = guest();
        let readable = guest.add(&[MockBuffer::readable(DATA, 64)]);
        let empty = guest.add(&[MockBuffer::writable(DATA + 0x100, 0)]);
        assert_eq!(guest.handler.process_queue().unwrap(), 2);
        assert_eq!(guest.used(0), (u32::from(readable), 0));
        assert_eq!(guest.used(1), (u32::from(empty), 0));
        assert_eq!(guest.handler.metrics().get("entropy_bytes"), Some(0));
    }

    #[test]
    fn a_huge_chain_gets_at_most_the_request_cap() {
        let mut guest = guest();
        guest.fill(DATA, 0x20_0000, 0);
        let head = guest.add(&[
            MockBuffer::writable(DATA, 0x10_0000),
            MockBuffer::writable(DATA + 0x10_0000, 0x10_0000),
        ]);
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        let cap = u32::try_from(MAX_REQUEST_LEN).unwrap();
        assert_eq!(guest.used(0), (u32::from(head), cap));
        // Nothing past the cap was touched.
        let past = guest.read(DATA + u64::from(cap), 0x10_0000);
        assert!(past.iter().all(|&b| b == 0));
    }

    #[test]
    fn one_call_serves_a_bounded_batch_and_wakes_itself_for_the_rest() {
        let mut guest = guest();
        let len = u32::try_from(MAX_REQUEST_LEN).unwrap();
        let per_batch = MAX_BATCH_BYTES / MAX_REQUEST_LEN;
        let chains = per_batch + 4;
        for i in 0..chains {
            let addr = DATA + u64::try_from(i % 8).unwrap() * u64::from(len);
            guest.add(&[MockBuffer::writable(addr, len)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), per_batch);
        assert_eq!(guest.queue_evt.read().unwrap(), 1, "the handler comes back");
        assert_eq!(guest.handler.process_queue().unwrap(), 4);
        assert!(guest.queue_evt.read().is_err(), "and stops when done");
        assert_eq!(usize::from(guest.used_idx()), chains);

        // Many tiny chains: the chain count bounds the batch.
        let mut guest = guest_with(HostRng, RateLimiter::default());
        for _ in 0..256 {
            guest.add(&[MockBuffer::writable(DATA, 1)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), MAX_BATCH);
    }

    #[test]
    fn a_source_that_runs_dry_completes_requests_short_without_blocking() {
        let mut guest = guest_with(Stingy { limit: 10 }, RateLimiter::default());
        let head = guest.add(&[MockBuffer::writable(DATA, 64)]);
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        assert_eq!(guest.used(0), (u32::from(head), 10));
        assert_eq!(guest.read(DATA, 10), vec![0x5a; 10]);
        assert_eq!(guest.handler.metrics().get("host_rng_fails"), Some(1));

        let mut guest = guest_with(Stingy { limit: 0 }, RateLimiter::default());
        let head = guest.add(&[MockBuffer::writable(DATA, 64)]);
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        assert_eq!(guest.used(0), (u32::from(head), 0));
        assert_eq!(guest.handler.metrics().get("host_rng_fails"), Some(1));
        assert_eq!(guest.handler.metrics().get("entropy_bytes"), Some(0));
    }

    #[test]
    fn the_saved_queue_gives_back_the_request_the_limiter_holds() {
        // One request per 10 s.
        let limiter = RateLimiter::new(None, bucket(1, 10_000)).unwrap();
        let mut guest = guest_with(HostRng, limiter);
        for i in 0..2 {
            guest.add(&[MockBuffer::writable(DATA + i * 0x1000, 64)]);
        }
        assert_eq!(guest.handler.saved_queue(), guest.handler.queue);
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        assert!(guest.handler.is_throttled());
        assert_eq!(guest.handler.queue.next_avail(), 2);
        let saved = guest.handler.saved_queue();
        assert_eq!((saved.next_avail(), saved.next_used()), (1, 1));
        // A handler restored on it serves the held request, once.
        let mut restored = RngHandler::new(
            HostRng,
            RateLimiter::default(),
            guest.mem.clone(),
            saved,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(CountingTrigger::default()),
        );
        assert_eq!(restored.process_queue().unwrap(), 1);
        assert_eq!(guest.used_idx(), 2);
        assert_eq!(restored.process_queue().unwrap(), 0);
    }

    #[test]
    fn the_limiter_holds_requests_back_until_its_timer_lets_them_go() {
        // 1000 bytes per 100 ms.
        let limiter = RateLimiter::new(bucket(1000, 100), None).unwrap();
        let mut guest = guest_with(HostRng, limiter);
        for i in 0..3 {
            guest.add(&[MockBuffer::writable(DATA + i * 0x1000, 1000)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        assert!(guest.handler.is_throttled());
        assert_eq!(
            guest
                .handler
                .metrics()
                .get("entropy_rate_limiter_throttled"),
            Some(1)
        );
        // Notifications are not served while throttled.
        assert_eq!(guest.handler.process_queue().unwrap(), 0);
        assert_eq!(guest.used_idx(), 1);

        wait_timer(guest.handler.rate_limiter());
        assert_eq!(guest.handler.rate_limiter_event().unwrap(), 1);
        assert_eq!(guest.used_idx(), 2);
        wait_timer(guest.handler.rate_limiter());
        assert_eq!(guest.handler.rate_limiter_event().unwrap(), 1);
        assert_eq!(guest.used_idx(), 3);
        assert!(!guest.handler.is_throttled());
        assert_eq!(guest.handler.metrics().get("entropy_bytes"), Some(3000));
        assert!(guest.handler.metrics().get("rate_limiter_event_count") >= Some(2));

        // Lifted: everything goes at once.
        guest
            .handler
            .update_rate_limiter(BucketUpdate::Disabled, BucketUpdate::None);
        for _ in 0..3 {
            guest.add(&[MockBuffer::writable(DATA, 1000)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), 3);
    }

    #[test]
    fn the_ops_limit_counts_requests() {
        let limiter = RateLimiter::new(None, bucket(2, 1000)).unwrap();
        let mut guest = guest_with(HostRng, limiter);
        for _ in 0..3 {
            guest.add(&[MockBuffer::writable(DATA, 8)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), 2);
        assert!(guest.handler.is_throttled());
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(guest.used_idx(), 2);
    }

    #[test]
    fn with_event_idx_the_driver_is_asked_to_notify_the_next_chain() {
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let mut driver = MockDriver::new(256, GuestAddress(0));
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        let irq = CountingTrigger::default();
        let mut handler = RngHandler::new(
            HostRng,
            RateLimiter::default(),
            mem.clone(),
            queue,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(irq.clone()),
        );
        for round in 1..=3u16 {
            // The driver wants an interrupt for each used chain.
            driver.set_used_event(&*mem, round - 1).unwrap();
            driver
                .add_chain(&*mem, &[MockBuffer::writable(DATA, 64)])
                .unwrap();
            assert_eq!(handler.process_queue().unwrap(), 1);
            // The driver notifies when it makes entry `round` available: one a request.
            assert_eq!(driver.avail_event(&*mem).unwrap(), round);
            assert_eq!(driver.used_idx(&*mem).unwrap(), round);
        }
        assert_eq!(irq.count(), 3);
    }

    #[test]
    fn a_driver_that_breaks_the_protocol_is_an_error() {
        let mut guest = guest();
        guest.driver.set_avail_idx(&*guest.mem, 1000).unwrap();
        let err = guest.handler.process_queue().unwrap_err();
        assert!(
            matches!(err, Error::Queue(queue::Error::AvailIdxTooFar { .. })),
            "{err:?}"
        );
    }

    /// An interrupt that keeps what it is asked to raise, and fails each time when `fail`.
    #[derive(Default)]
    struct Recording {
        raised: Mutex<Vec<VirtioInterruptType>>,
        fail: bool,
    }

    impl Recording {
        fn raised(&self) -> Vec<VirtioInterruptType> {
            self.raised.lock().unwrap().clone()
        }
    }

    impl VirtioInterrupt for Recording {
        fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
            self.raised.lock().unwrap().push(kind);
            if self.fail {
                return Err(io::Error::other("the interrupt line is gone"));
            }
            Ok(())
        }
    }

    /// A handler of a queue laid out from `base` in `mem_size` bytes of guest memory, with
    /// EVENT_IDX on when `event_idx`.
    fn handler_at(mem_size: usize, base: u64, event_idx: bool) -> RngHandler<Mem, HostRng> {
        let mem = Arc::new(guest_memory(mem_size).unwrap());
        let mut queue = MockDriver::new(256, GuestAddress(base)).queue();
        queue.set_event_idx(event_idx);
        RngHandler::new(
            HostRng,
            RateLimiter::default(),
            mem,
            queue,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(CountingTrigger::default()),
        )
    }

    #[test]
    fn the_debug_output_says_what_holds_the_handler_back() {
        let limiter = RateLimiter::new(None, bucket(1, 1000)).unwrap();
        let mut guest = guest_with(HostRng, limiter);
        let idle = format!("{:?}", guest.handler);
        assert!(
            idle.starts_with("RngHandler { pending: false, throttled: false, broken: false"),
            "{idle}"
        );
        assert!(idle.contains("rate_limiter: "), "{idle}");
        for _ in 0..2 {
            guest.add(&[MockBuffer::writable(DATA, 8)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
        let held = format!("{:?}", guest.handler);
        assert!(
            held.starts_with("RngHandler { pending: true, throttled: true, broken: false"),
            "{held}"
        );
    }

    #[test]
    fn rings_outside_guest_memory_are_a_protocol_error() {
        // Without EVENT_IDX, the first write is the used ring's flags.
        let mut handler = handler_at(0x10000, 0x20000, false);
        let err = handler.process_queue().unwrap_err();
        assert!(
            matches!(err, Error::Queue(queue::Error::GuestMemory(_))),
            "{err:?}"
        );
        assert_eq!(handler.metrics().get("entropy_bytes"), Some(0));

        // With it, the available ring is read, and empty, but the used ring's `avail_event`,
        // past the end of memory, cannot be written when notifications go back on.
        let used_ring = 16 * 256 + 6 + 2 * 256 + 2;
        let base = (0x10000 - used_ring - 8) & !15;
        let mut handler = handler_at(0x10000, base, true);
        let err = handler.process_queue().unwrap_err();
        assert!(
            matches!(err, Error::Queue(queue::Error::GuestMemory(_))),
            "{err:?}"
        );
    }

    #[test]
    fn a_full_batch_whose_wakeup_cannot_be_written_is_counted_and_logged() {
        capture_logs();
        let mut guest = guest();
        // The eventfd's counter is at its highest: one more write would block.
        guest.queue_evt.write(u64::MAX - 1).unwrap();
        let len = u32::try_from(MAX_REQUEST_LEN).unwrap();
        let per_batch = MAX_BATCH_BYTES / MAX_REQUEST_LEN;
        for _ in 0..=per_batch {
            guest.add(&[MockBuffer::writable(DATA, len)]);
        }
        assert_eq!(guest.handler.process_queue().unwrap(), per_batch);
        assert_eq!(usize::from(guest.used_idx()), per_batch);
        assert_eq!(guest.handler.metrics().get("entropy_event_fails"), Some(1));
        assert!(!guest.handler.is_broken());
        assert!(logged(
            log::Level::Error,
            "Cannot wake the virtio-rng handler for more requests"
        ));
        // The next notification serves the rest.
        assert_eq!(guest.queue_evt.read().unwrap(), u64::MAX - 1);
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
    }

    #[test]
    fn an_interrupt_that_cannot_be_raised_is_counted_and_the_chain_still_completes() {
        capture_logs();
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let mut driver = MockDriver::new(256, GuestAddress(0));
        let irq = Arc::new(Recording {
            fail: true,
            ..Recording::default()
        });
        let mut handler = RngHandler::new(
            HostRng,
            RateLimiter::default(),
            mem.clone(),
            driver.queue(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            irq.clone(),
        );
        let head = driver
            .add_chain(&*mem, &[MockBuffer::writable(DATA, 32)])
            .unwrap();
        assert_eq!(handler.process_queue().unwrap(), 1);
        assert_eq!(driver.used_elem(&*mem, 0).unwrap(), (u32::from(head), 32));
        assert_eq!(irq.raised(), [QUEUE_INTERRUPT]);
        assert_eq!(handler.metrics().get("entropy_event_fails"), Some(1));
        assert_eq!(handler.metrics().get("entropy_bytes"), Some(32));
        assert!(!handler.is_broken());
        assert!(logged(
            log::Level::Error,
            "virtio-rng cannot raise its interrupt: the interrupt line is gone"
        ));
    }

    #[test]
    fn a_timer_event_before_the_timer_expired_serves_nothing() {
        let limiter = RateLimiter::new(bucket(1000, 100), None).unwrap();
        let mut guest = guest_with(HostRng, limiter);
        guest.add(&[MockBuffer::writable(DATA, 8)]);
        // Nothing armed the timer: the event is spurious.
        assert_eq!(guest.handler.rate_limiter_event().unwrap(), 0);
        assert_eq!(guest.used_idx(), 0);
        assert!(!guest.handler.is_broken());
        assert_eq!(
            guest.handler.metrics().get("rate_limiter_event_count"),
            Some(1)
        );
        // The queue is served as usual.
        assert_eq!(guest.handler.process_queue().unwrap(), 1);
    }

    #[test]
    fn a_timer_event_with_no_request_held_back_serves_nothing() {
        let limiter = RateLimiter::new(bucket(1000, 100), None).unwrap();
        let mut guest = guest_with(HostRng, limiter);
        // The limiter runs dry outside the queue, which arms its timer.
        let limiter = &mut guest.handler.rate_limiter;
        assert!(limiter.consume(600, TokenType::Bytes));
        assert!(!limiter.consume(600, TokenType::Bytes));
        wait_timer(guest.handler.rate_limiter());
        guest.add(&[MockBuffer::writable(DATA, 8)]);
        assert_eq!(guest.handler.rate_limiter_event().unwrap(), 0);
        assert_eq!(guest.used_idx(), 0);
        assert!(!guest.handler.is_throttled());
        assert_eq!(
            guest.handler.metrics().get("rate_limiter_event_count"),
            Some(1)
        );
        // The timer was read: another event is spurious.
        assert_eq!(guest.handler.rate_limiter_event().unwrap(), 0);
    }

    #[test]
    fn a_driver_that_breaks_the_protocol_stops_the_handler_until_reset() {
        capture_logs();
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let mut driver = MockDriver::new(256, GuestAddress(0));
        // Even where the interrupt cannot be raised, the handler stops.
        let irq = Arc::new(Recording {
            fail: true,
            ..Recording::default()
        });
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let handler = RngHandler::new(
            HostRng,
            RateLimiter::default(),
            mem.clone(),
            driver.queue(),
            queue_evt.try_clone().unwrap(),
            irq.clone(),
        );
        let worker = Worker::spawn("test-rng-broken".into(), handler, &WorkerGate::new()).unwrap();
        driver.set_avail_idx(&*mem, 1000).unwrap();
        let (broken, removed) = worker
            .call(|h, ops| {
                h.handle_event(ops, QUEUE_TOKEN, EventSet::IN);
                // The handler left the loop's set: removing its descriptors again fails.
                let removed = ops.remove(h.queue_evt.as_raw_fd()).is_err()
                    && ops.remove(h.rate_limiter.as_raw_fd()).is_err();
                (h.is_broken(), removed)
            })
            .unwrap();
        assert!(broken);
        assert!(removed, "the handler still waits on its descriptors");
        assert_eq!(irq.raised(), [VirtioInterruptType::NeedsReset]);
        assert!(logged(
            log::Level::Warn,
            "virtio-rng stops serving its queue until the driver resets it: The driver broke \
             the protocol of the entropy device's queue"
        ));

        // Broken, it serves nothing: not a notification, not the timer.
        queue_evt.write(1).unwrap();
        let counters = worker
            .call(|h, ops| {
                h.handle_event(ops, QUEUE_TOKEN, EventSet::IN);
                h.handle_event(ops, RATE_LIMITER_TOKEN, EventSet::IN);
                (h.metrics().values(), h.process_queue().unwrap())
            })
            .unwrap();
        let handler = worker.stop().unwrap();
        assert_eq!(counters.1, 0);
        let metrics = handler.metrics();
        assert_eq!(metrics.values(), counters.0);
        assert_eq!(metrics.get("entropy_event_count"), Some(1));
        assert_eq!(metrics.get("entropy_event_fails"), Some(1));
        assert_eq!(metrics.get("rate_limiter_event_count"), Some(0));
        // The notification is still there: nobody read it.
        assert_eq!(queue_evt.read().unwrap(), 1);
        assert_eq!(irq.raised().len(), 1);
    }

    #[test]
    fn an_unknown_token_is_ignored() {
        let mut guest = guest();
        guest.add(&[MockBuffer::writable(DATA, 8)]);
        let Guest {
            handler,
            driver,
            mem,
            ..
        } = guest;
        let worker = Worker::spawn("test-rng-token".into(), handler, &WorkerGate::new()).unwrap();
        let (broken, values) = worker
            .call(|h, ops| {
                h.handle_event(ops, RATE_LIMITER_TOKEN + 1, EventSet::IN);
                (h.is_broken(), h.metrics().values())
            })
            .unwrap();
        assert!(!broken);
        assert!(values.iter().all(|&(_, value)| value == 0), "{values:?}");
        assert_eq!(driver.used_idx(&*mem).unwrap(), 0);
        worker.stop().unwrap();
    }
}
