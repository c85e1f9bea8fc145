//! What serves the queue of an active block device: [`BlockWorker`], which pops the driver's
//! chains and has a `Server` carry out each request against the [`Disk`] under the rate
//! limiter's budget, and `BlockHandler`, its [`EventHandler`] glue to the thread that serves the
//! device (its worker, or the VMM's event manager).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ember_rate_limiter::{Clock, MonotonicClock, RateLimiter, TokenType};
use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::hold::{Hold, MAX_INTERRUPT_HOLD, wait_for_chain};
use super::metrics::inc;
use super::request::{self, Request};
use super::uring::{AsyncIo, Done, Submitted};
use super::{
    BlockBackend, BlockMetrics, COMPLETION_TOKEN, Disk, MAX_BATCH, MAX_BATCH_BYTES, QUEUE_TOKEN,
    RATE_LIMITER_TOKEN, RawFile, SECTOR_SIZE, disk,
};
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::error::ErrorChain;
use crate::queue::{self, DescriptorChain, Queue, Rings};
use crate::worker::{EventHandler, EventOps};

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
///
/// With the asynchronous engine ([`BlockWorker::with_async_io`]), reads, writes and flushes
/// go in flight instead of completing in [`BlockWorker::process_queue`]: at most one per entry
/// of the queue, after which the worker takes no more chains until some complete. When the
/// engine's eventfd ([`BlockWorker::completion_fd`]) fires,
/// [`BlockWorker::process_completions`] hands every completed chain back in a pass over the
/// queue: one update of the used ring, with at most one interrupt. The worker holds its guest
/// memory handle `M`, and so the memory mapped, while requests are in flight; whatever saves
/// its queue, changes its disk or takes its parts back waits for them first, so that a saved
/// queue never has a request in flight.
pub struct BlockWorker<M, B = RawFile, C: Clock = MonotonicClock> {
    server: Server<B, C>,
    queue: Queue,
    mem: M,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    irq_error_logged: bool,
    /// Whether the last call stopped on its budget, with chains maybe left.
    budget_spent: bool,
    /// Whether the last call stopped because every request slot of the asynchronous engine
    /// was taken: completions resume the queue.
    waiting_for_room: bool,
    /// When to hold the interrupt for the driver's next request.
    hold: Hold,
}

/// What carries out the requests of a queue: the disk, the rate limiter in front of it, and
/// the counters.
struct Server<B, C: Clock> {
    disk: Disk<B>,
    rate_limiter: RateLimiter<C>,
    /// The chain the rate limiter held back, served before any other.
    throttled: Option<DescriptorChain>,
    metrics: Arc<BlockMetrics>,
    /// The asynchronous engine and its requests in flight; `None` for the synchronous one.
    io: Option<AsyncIo>,
    /// Chains the asynchronous engine completed, to hand back in one update of the used ring:
    /// at most one per request slot.
    completed: Vec<(u16, u32)>,
}

impl<M, B, C: Clock + fmt::Debug> fmt::Debug for BlockWorker<M, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockWorker")
            .field("disk", &self.server.disk)
            .field("queue", &self.queue)
            .field("rate_limiter", &self.server.rate_limiter)
            .field("throttled", &self.server.throttled.is_some())
            .field("io", &self.server.io)
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
                io: None,
                completed: Vec::new(),
            },
            queue,
            mem,
            interrupt,
            irq_error_logged: false,
            budget_spent: false,
            waiting_for_room: false,
            hold: Hold::new(MAX_INTERRUPT_HOLD),
        }
    }

    /// Holds the interrupt at most `max` after handing chains back, for the driver's next
    /// request, from now on (the default is [`MAX_INTERRUPT_HOLD`]; zero never holds). The
    /// worker holds while the driver shows several requests in flight, and probes for them now
    /// and then, spinning, with the hold's time read from the rate limiter's clock; see the
    /// [`hold`](super::hold) module.
    pub fn with_interrupt_hold(mut self, max: Duration) -> Self {
        self.hold = Hold::new(max);
        self
    }

    /// Carries out reads, writes and flushes on `io`, the asynchronous engine, from now on
    /// (the disk's backend must have a file, [`BlockBackend::async_fd`], or they fail with
    /// IOERR). The event loop must then wait on [`BlockWorker::completion_fd`] too.
    pub fn with_async_io(mut self, io: AsyncIo) -> Self {
        self.server.completed = Vec::with_capacity(io.slots());
        self.server.io = Some(io);
        self
    }

    /// The eventfd the asynchronous engine signals when requests complete, for the event loop
    /// to call [`BlockWorker::process_completions`] on; `None` for the synchronous engine.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.server.io.as_ref().map(AsyncIo::completion_fd)
    }

    /// How many requests the asynchronous engine has in flight.
    pub fn in_flight(&self) -> usize {
        self.server.io.as_ref().map_or(0, AsyncIo::in_flight)
    }

    /// How many completions the asynchronous engine's ring holds, not yet reaped.
    #[cfg(test)]
    pub(super) fn completions_ready(&mut self) -> usize {
        self.server
            .io
            .as_mut()
            .map_or(0, AsyncIo::completions_ready)
    }

    /// Whether the last [`BlockWorker::process_queue`] stopped because as many requests as the
    /// queue holds were in flight: [`BlockWorker::process_completions`] frees their slots,
    /// and serves the queue again.
    pub fn waiting_for_room(&self) -> bool {
        self.waiting_for_room
    }

    /// Hands back the chains whose requests the asynchronous engine completed, with their
    /// status bytes, and raises the interrupt if the driver wants one. Returns how many chains
    /// it handed back. Nothing for the synchronous engine.
    ///
    /// Completions are handed back in a pass over the queue, as
    /// [`BlockWorker::process_queue`] makes: with the chains the driver made available since,
    /// in one update of the used ring and with at most one interrupt, which the pass may hold
    /// for the driver's next request. While the rate limiter holds a request back, the queue
    /// waits for the limiter's timer, and completions are handed back alone.
    ///
    /// # Errors
    ///
    /// As [`BlockWorker::process_queue`], when the used ring cannot be written.
    pub fn process_completions(&mut self) -> std::result::Result<usize, queue::Error> {
        if let Some(io) = &self.server.io {
            if let Err(err) = io.clear_event() {
                inc(&self.server.metrics.event_fails);
                log::debug!("A block device cannot read its completion eventfd: {err}");
            }
        }
        if self.server.throttled.is_some() {
            return self.hand_back(false);
        }
        self.server.reap(&*self.mem.memory(), false);
        // Nothing completed since the last pass, which may have stopped for want of a slot
        // after it reaped the completions that freed one.
        if self.server.completed.is_empty() && !self.waiting_for_room {
            return Ok(0);
        }
        self.serve_queue().map(|budget| budget.used)
    }

    /// Waits until no request is in flight, and hands the completed chains back, without
    /// taking any more from the queue.
    ///
    /// # Errors
    ///
    /// As [`BlockWorker::process_completions`].
    pub fn wait_in_flight(&mut self) -> std::result::Result<usize, queue::Error> {
        self.hand_back(true)
    }

    /// Reaps the completions of the asynchronous engine (waiting for all with `wait`), and
    /// hands them back in one update of the used ring, with the interrupt if the driver wants
    /// one.
    fn hand_back(&mut self, wait: bool) -> std::result::Result<usize, queue::Error> {
        let mem = self.mem.memory();
        let mem = &*mem;
        self.server.reap(mem, wait);
        if self.server.completed.is_empty() {
            return Ok(0);
        }
        let mut rings = self.queue.rings(mem);
        let count = self.server.publish(&mut rings)?;
        signal(
            &mut rings,
            &*self.interrupt,
            &self.server.metrics,
            &mut self.irq_error_logged,
        )?;
        Ok(count)
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
    /// notification that will not come. While the driver shows several requests in flight,
    /// and now and then to find out whether it does, it waits a moment after handing chains
    /// back, with notifications still off, for the driver's next request, and serves it too
    /// ([`BlockWorker::with_interrupt_hold`]). When done, it raises the interrupt if the
    /// driver wants one (VIRTQ_AVAIL_F_NO_INTERRUPT, or `used_event` with EVENT_IDX).
    ///
    /// It serves at most [`MAX_BATCH`] chains, and stops after the request that takes the
    /// chains served past [`MAX_BATCH_BYTES`] on the disk: then chains may be left, and
    /// notifications may still be off ([`BlockWorker::budget_spent`]); call it again. It
    /// looks at the ring again after turning notifications back on or after a hold at most
    /// [`MAX_BATCH`] times, so that a driver that moves its available index back and forth
    /// cannot keep it there either; it then returns with notifications on. When the rate
    /// limiter refuses a request, it stops there with notifications off and the chain kept
    /// ([`BlockWorker::is_throttled`]): call it again once the limiter's timer has fired.
    ///
    /// # Errors
    ///
    /// A [`queue::Error`] when the driver broke the queue protocol (or the rings cannot be
    /// reached): the device should then be put in DEVICE_NEEDS_RESET. The chains served before
    /// the error have been handed back.
    pub fn process_queue(&mut self) -> std::result::Result<usize, queue::Error> {
        self.serve_queue().map(|budget| budget.chains)
    }

    /// A pass over the queue, as [`BlockWorker::process_queue`] describes; it hands back the
    /// completions of the asynchronous engine reaped before it too.
    fn serve_queue(&mut self) -> std::result::Result<Budget, queue::Error> {
        let BlockWorker {
            server,
            queue,
            mem,
            interrupt,
            irq_error_logged,
            budget_spent,
            waiting_for_room,
            hold,
        } = self;
        let mem = mem.memory();
        let mem = &*mem;
        // The rings are looked up in guest memory once for the whole pass.
        let mut rings = queue.rings(mem);
        let mut budget = Budget::default();
        *budget_spent = false;
        *waiting_for_room = false;
        let mut passes = 0usize;
        // Read before this call raises an interrupt of its own.
        let pending = interrupt.queue_interrupt_pending().unwrap_or(false);
        // The chains handed back when the last hold began, and the longest wait that caught one.
        let mut held_at = 0;
        let mut held = false;
        let mut caught = None;
        // How long this call's holds last, asked after the first pass that hands chains back.
        let mut limit = None;
        let result = loop {
            if let Err(err) = rings.disable_notification() {
                break Err(err);
            }
            let drained = server.drain(&mut rings, &mut budget);
            let submitted = server.submit_pending();
            // The kernel completes a request while it takes it when it needs no waiting (a read
            // the page cache holds): those are handed back now, with the chains served
            // synchronously, rather than after a round trip through the completion eventfd.
            server.reap(mem, false);
            budget.used += server.publish(&mut rings)?;
            if let Err(err) = submitted {
                // What the kernel did not take stays queued: come back to hand it over again.
                inc(&server.metrics.event_fails);
                log::debug!("A block device cannot submit its requests to io_uring: {err}");
                *budget_spent = true;
            }
            match drained {
                Ok(Drained::Empty) => {}
                // Notifications stay off: the caller comes back, or the limiter's timer does.
                Ok(Drained::Full) => {
                    *budget_spent = true;
                    break Ok(());
                }
                Ok(Drained::Throttled) => break Ok(()),
                // Notifications stay off: completions free slots and resume the queue.
                Ok(Drained::Busy) => {
                    *waiting_for_room = true;
                    break Ok(());
                }
                Err(err) => break Err(err),
            }
            if *budget_spent {
                break Ok(());
            }
            // Only chains handed back since the last hold are worth holding the interrupt for.
            if budget.used > held_at && passes < MAX_BATCH {
                let limit =
                    *limit.get_or_insert_with(|| hold.limit(pending, server.rate_limiter.clock()));
                if let Some(limit) = limit {
                    held_at = budget.used;
                    held = true;
                    match wait_for_chain(&rings, server.rate_limiter.clock(), limit) {
                        Ok(Some(waited)) => {
                            caught = caught.max(Some(waited));
                            passes += 1;
                            continue;
                        }
                        Ok(None) => {}
                        Err(err) => break Err(err),
                    }
                }
            }
            match rings.enable_notification() {
                // With notifications on, a driver that makes more chains available notifies.
                Ok(true) if passes < MAX_BATCH => passes += 1,
                Ok(_) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        if held {
            hold.record(caught);
        }
        if budget.used > 0 {
            signal(&mut rings, &**interrupt, &server.metrics, irq_error_logged)?;
        }
        result.map(|()| budget)
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

    /// The queue as a snapshot records it: as [`BlockWorker::queue`] once no request is in
    /// flight (it waits for those first, and hands them back: [`BlockWorker::wait_in_flight`]),
    /// but with the chain the rate limiter holds back, if any, given back to the available
    /// ring, so that a device restored from the snapshot takes it again. That chain is always
    /// the last one taken: nothing more is taken while it is held.
    pub fn saved_queue(&mut self) -> Queue {
        if let Err(err) = self.wait_in_flight() {
            // The driver broke the queue: the device needs a reset, saved or not.
            log::warn!(
                "A block device cannot hand back its requests in flight: {}",
                ErrorChain(&err)
            );
        }
        let mut queue = self.queue.clone();
        if self.server.throttled.is_some() {
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
        }
        queue
    }

    /// The disk requests are served from.
    pub fn disk(&self) -> &Disk<B> {
        &self.server.disk
    }

    /// Serves the requests from `disk` from now on, and gives back the disk they were served
    /// from, once the requests in flight on it completed and were handed back
    /// ([`BlockWorker::wait_in_flight`]). A request the rate limiter holds back is checked
    /// against the new disk when it goes.
    pub fn replace_disk(&mut self, disk: Disk<B>) -> Disk<B> {
        if let Err(err) = self.wait_in_flight() {
            log::warn!(
                "A block device cannot hand back its requests in flight: {}",
                ErrorChain(&err)
            );
        }
        std::mem::replace(&mut self.server.disk, disk)
    }

    /// Gives the disk back, as [`BlockWorker::into_parts`].
    pub fn into_disk(self) -> Disk<B> {
        self.into_parts().0
    }

    /// Gives the disk, the rate limiter and the asynchronous engine, if any, back, once no
    /// request is in flight: it waits for those, and drops them without handing them back,
    /// since the worker is stopped when the driver resets the device, after which the device
    /// must not write into the rings.
    pub fn into_parts(mut self) -> (Disk<B>, RateLimiter<C>, Option<AsyncIo>) {
        let Server {
            disk, io, metrics, ..
        } = &mut self.server;
        if let Some(io) = io {
            let mem = self.mem.memory();
            io.wait_all(disk, &*mem, |done: Done| {
                metrics.completed(done.request_type, done.completion);
            });
        }
        let Server {
            disk,
            rate_limiter,
            io,
            ..
        } = self.server;
        (disk, rate_limiter, io)
    }
}

/// Raises the interrupt of a queue the device just used, if the driver wants one (a failure
/// is counted, and logged once).
fn signal<M: GuestMemory>(
    rings: &mut Rings<'_, '_, M>,
    interrupt: &dyn VirtioInterrupt,
    metrics: &BlockMetrics,
    irq_error_logged: &mut bool,
) -> std::result::Result<(), queue::Error> {
    if !rings.needs_notification()? {
        return Ok(());
    }
    if let Err(err) = interrupt.trigger(VirtioInterruptType::Queue(0)) {
        inc(&metrics.event_fails);
        if !*irq_error_logged {
            *irq_error_logged = true;
            log::error!("A block device cannot raise its interrupt: {err}");
        }
    }
    Ok(())
}

/// What one [`BlockWorker::process_queue`] call served so far.
#[derive(Debug, Default)]
struct Budget {
    /// Chains taken: handed back, or in flight.
    chains: usize,
    /// Chains handed back.
    used: usize,
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
    /// Every request slot of the asynchronous engine is taken.
    Busy,
}

/// What became of one chain.
enum Served {
    /// Handed back with this used length, after moving this many bytes on the disk.
    Used(u32, u64),
    /// In flight on the asynchronous engine, to move this many bytes.
    InFlight(u64),
    /// Held back by the rate limiter.
    Throttled,
}

impl<B: BlockBackend, C: Clock> Server<B, C> {
    /// Serves the chain held back, then available chains, until there are none, the `budget`
    /// is spent, or the rate limiter holds one back.
    fn drain<M: GuestMemory>(
        &mut self,
        rings: &mut Rings<'_, '_, M>,
        budget: &mut Budget,
    ) -> std::result::Result<Drained, queue::Error> {
        let mem = rings.mem();
        while !budget.spent() {
            if self.io.as_ref().is_some_and(|io| !io.has_room()) {
                return Ok(Drained::Busy);
            }
            let chain = match self.throttled.take() {
                Some(chain) => chain,
                None => match rings.pop()? {
                    Some(chain) => chain,
                    None => return Ok(Drained::Empty),
                },
            };
            match self.serve(mem, &chain) {
                Served::Used(used, bytes) => {
                    rings.add_used(chain.head_index(), used)?;
                    budget.chains += 1;
                    budget.used += 1;
                    budget.bytes = budget.bytes.saturating_add(bytes);
                }
                Served::InFlight(bytes) => {
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
                let completion = match &mut self.io {
                    None => self.disk.execute(mem, &request),
                    Some(io) => {
                        match io.submit(&mut self.disk, mem, &request, chain.head_index()) {
                            Submitted::InFlight => return Served::InFlight(bytes),
                            Submitted::Done(completion) => completion,
                        }
                    }
                };
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

    /// Hands the asynchronous engine's new submissions to the kernel.
    fn submit_pending(&mut self) -> io::Result<()> {
        self.io.as_mut().map_or(Ok(()), AsyncIo::submit_pending)
    }

    /// Takes the asynchronous engine's completions (waiting for every request in flight with
    /// `wait`) into `completed`, with their status bytes written and counted.
    fn reap<M: GuestMemory>(&mut self, mem: &M, wait: bool) {
        let Server {
            disk: store,
            io,
            metrics,
            completed,
            ..
        } = self;
        let Some(io) = io else {
            return;
        };
        let done = |done: Done| {
            metrics.completed(done.request_type, done.completion);
            let used = disk::complete(mem, done.status_addr, done.completion);
            completed.push((done.head, used));
        };
        if wait {
            io.wait_all(store, mem, done);
        } else {
            io.reap(store, mem, done);
        }
    }

    /// Hands the chains in `completed` back to the driver in one update of the used ring, and
    /// returns how many.
    fn publish<M: GuestMemory>(
        &mut self,
        rings: &mut Rings<'_, '_, M>,
    ) -> std::result::Result<usize, queue::Error> {
        let count = self.completed.len();
        if count == 0 {
            return Ok(0);
        }
        let published = rings.add_used_batch(&self.completed);
        self.completed.clear();
        published.map(|()| count)
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
pub(super) struct BlockHandler<M, B> {
    pub(super) worker: BlockWorker<M, B>,
    pub(super) queue_evt: EventFd,
    pub(super) id: String,
    /// Whether the driver broke the protocol: the handler serves nothing until reset.
    pub(super) broken: bool,
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
        )?;
        if let Some(fd) = self.worker.completion_fd() {
            ops.add(fd, EventSet::IN, COMPLETION_TOKEN)?;
        }
        Ok(())
    }

    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, _events: EventSet) {
        if self.broken {
            return;
        }
        match token {
            QUEUE_TOKEN => self.queue_event(ops),
            RATE_LIMITER_TOKEN => self.rate_limiter_event(ops),
            COMPLETION_TOKEN => self.completion_event(ops),
            _ => {}
        }
    }
}

impl<M: GuestAddressSpace + Send + 'static, B: BlockBackend> BlockHandler<M, B> {
    fn queue_event(&mut self, ops: &mut EventOps<'_>) {
        let metrics = self.worker.metrics();
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
                    ErrorChain(&err)
                );
                self.fail(ops);
                return;
            }
        }
        if self.worker.is_throttled() {
            self.serve(ops, false);
        }
    }

    fn completion_event(&mut self, ops: &mut EventOps<'_>) {
        let handed_back = self.worker.process_completions();
        self.after_pass(ops, handed_back);
    }

    /// Serves the queue; with `count_empty`, finding nothing to serve counts as
    /// `no_avail_buffer`.
    fn serve(&mut self, ops: &mut EventOps<'_>, count_empty: bool) {
        let served = self.worker.process_queue();
        let idle = !self.worker.is_throttled() && !self.worker.budget_spent();
        if matches!(served, Ok(0)) && count_empty && idle {
            inc(&self.worker.metrics().no_avail_buffer);
        }
        self.after_pass(ops, served);
    }

    /// Comes back to the chains a pass over the queue left when it spent its budget, or stops
    /// serving the queue when the driver broke it.
    fn after_pass(
        &mut self,
        ops: &mut EventOps<'_>,
        pass: std::result::Result<usize, queue::Error>,
    ) {
        match pass {
            Ok(_) if self.worker.budget_spent() => {
                if let Err(err) = self.queue_evt.write(1) {
                    inc(&self.worker.metrics().event_fails);
                    log::error!(
                        "The block device {} cannot requeue its work: {err}",
                        self.id
                    );
                }
            }
            Ok(_) => {}
            Err(err) => self.queue_failed(ops, &err),
        }
    }

    /// The driver broke the queue protocol: stops serving it.
    fn queue_failed(&mut self, ops: &mut EventOps<'_>, err: &queue::Error) {
        // The guest can do this at every activation: counted, and a warning only.
        inc(&self.worker.metrics().queue_fails);
        log::warn!(
            "The block device {} stops serving its queue until the driver resets it: {}",
            self.id,
            ErrorChain(err)
        );
        self.fail(ops);
    }

    /// Stops serving the queue and asks the driver for a reset. The handler's descriptors no
    /// longer wake the thread, which waits for its stop without spinning.
    fn fail(&mut self, ops: &mut EventOps<'_>) {
        let metrics = self.worker.metrics().clone();
        self.broken = true;
        let fds = [
            Some(self.queue_evt.as_raw_fd()),
            Some(self.worker.rate_limiter().as_raw_fd()),
            self.worker.completion_fd(),
        ];
        for fd in fds.into_iter().flatten() {
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use ember_rate_limiter::BucketUpdate;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::block::fixtures::*;
    use crate::block::hold;
    use crate::block::*;
    use crate::mmio::{INT_USED_RING, MmioInterrupt};
    use crate::mock::{
        CountingTrigger, MockBuffer, MockDriver, bucket, counters_moved, guest_memory, wait_timer,
    };
    use crate::worker::{Worker, WorkerGate};

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
    #[test]
    fn reads_writes_flushes_and_bad_requests_move_their_counters_by_their_amounts() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, false);
        let metrics = g.worker.metrics().clone();
        let step = |g: &mut Guest, buffers: &[MockBuffer], expected: &[(&str, u64)]| {
            let before = metrics.values();
            g.submit(buffers);
            assert_eq!(counters_moved(&before, &metrics.values()), expected);
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
            counters_moved(&before, &ro.worker.metrics().values()),
            [("execute_fails", 1)]
        );
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
    fn the_saved_queue_gives_back_the_request_the_limiter_holds() {
        let image = Image::on_tmpfs();
        // One operation per 10 s.
        let limiter = RateLimiter::new(None, bucket(1, 10_000)).unwrap();
        let mut g = Guest::with_limiter(&image, limiter);
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        for _ in 0..2 {
            g.driver
                .add_chain(
                    &*g.mem,
                    &[
                        MockBuffer::readable(HDR, 16),
                        MockBuffer::writable(STATUS, 1),
                    ],
                )
                .unwrap();
        }
        assert_eq!(g.worker.saved_queue(), *g.worker.queue());
        assert_eq!(g.worker.process_queue().unwrap(), 1);
        assert!(g.worker.is_throttled());
        // The second chain was taken and is held: the saved queue has it still available.
        assert_eq!(g.worker.queue().next_avail(), 2);
        let saved = g.worker.saved_queue();
        assert_eq!((saved.next_avail(), saved.next_used()), (1, 1));
        // A worker restored on it serves the held request, once.
        let mut restored = BlockWorker::new(
            image.disk(false),
            saved,
            g.mem.clone(),
            Arc::new(CountingTrigger::default()),
            RateLimiter::default(),
        );
        assert_eq!(restored.process_queue().unwrap(), 1);
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 2);
        assert_eq!(restored.process_queue().unwrap(), 0);
    }

    /// A clock that plays the driver in the hold's tests: every reading moves it on by one
    /// microsecond, and runs `play` with the new time in microseconds. Nothing else in these
    /// workers reads it (their rate limiter has no buckets), so it moves only while a worker
    /// holds.
    #[derive(Clone)]
    struct PlayingClock {
        us: Arc<std::sync::atomic::AtomicU64>,
        play: Arc<std::sync::Mutex<dyn FnMut(u64) + Send>>,
    }

    impl PlayingClock {
        fn us(&self) -> u64 {
            self.us.load(Ordering::Relaxed)
        }
    }

    impl ember_rate_limiter::Clock for PlayingClock {
        fn now(&self) -> u64 {
            let us = self.us.fetch_add(1, Ordering::Relaxed) + 1;
            (self.play.lock().unwrap())(us);
            us * 1000
        }
    }

    /// A driver that makes GET_ID requests available, from the test or from the clock's play.
    #[derive(Clone)]
    struct Requests {
        mem: Space,
        driver: Arc<std::sync::Mutex<MockDriver>>,
    }

    impl Requests {
        fn add(&self, count: usize) {
            let mut driver = self.driver.lock().unwrap();
            for _ in 0..count {
                driver
                    .add_chain(
                        &*self.mem,
                        &[hdr(), MockBuffer::writable(DATA, 20), status()],
                    )
                    .unwrap();
            }
        }

        fn used(&self) -> u16 {
            self.driver.lock().unwrap().used_idx(&*self.mem).unwrap()
        }
    }

    /// A worker whose clock runs `play` with the time in microseconds and the driver.
    fn holding_worker(
        image: &Image,
        mut play: impl FnMut(u64, &Requests) + Send + 'static,
    ) -> (
        BlockWorker<Space, RawFile, PlayingClock>,
        Requests,
        PlayingClock,
        CountingTrigger,
        Arc<MmioInterrupt>,
    ) {
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        write_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let queue = driver.queue();
        queue.validate(&*mem).unwrap();
        let requests = Requests {
            mem: mem.clone(),
            driver: Arc::new(std::sync::Mutex::new(driver)),
        };
        let played = requests.clone();
        let clock = PlayingClock {
            us: Arc::default(),
            play: Arc::new(std::sync::Mutex::new(move |us| play(us, &played))),
        };
        let limiter = RateLimiter::with_clock(None, None, clock.clone()).unwrap();
        let irqs = CountingTrigger::default();
        let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
        let worker = BlockWorker::new(image.disk(false), queue, mem, interrupt.clone(), limiter);
        (worker, requests, clock, irqs, interrupt)
    }

    #[test]
    fn a_request_made_while_the_worker_holds_shares_its_interrupt() {
        let image = Image::on_tmpfs();
        let mut played = false;
        let (mut worker, requests, clock, irqs, interrupt) =
            holding_worker(&image, move |us, requests| {
                if us >= 50 && !played {
                    played = true;
                    requests.add(1);
                }
            });
        requests.add(1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(
            clock.us(),
            0,
            "nothing shows another request in flight: not held"
        );
        // The driver makes two requests before it takes the interrupt: the worker holds, and
        // a third, 50 us later, joins them.
        requests.add(2);
        assert_eq!(worker.process_queue().unwrap(), 3);
        assert_eq!(requests.used(), 4);
        assert_eq!(irqs.count(), 2, "one interrupt for the three");
        // The first hold ended when the request came, 50 us in; the one after it, with
        // nothing more coming, ran its 200 us out.
        let mut at = clock.us();
        assert!((250..260).contains(&at), "held {at} us");

        // The hold paid, so lone requests are held too, even once the driver takes each
        // interrupt before its next request, for CREDIT calls whose holds catch nothing. The
        // first lasts twice the wait that paid, or 175 us, since the limit falls by at most an
        // eighth of 200 us per call.
        for _ in 0..hold::CREDIT {
            interrupt.ack(INT_USED_RING);
            requests.add(1);
            assert_eq!(worker.process_queue().unwrap(), 1);
            let held = clock.us() - at;
            assert!((175..185).contains(&held), "held {held} us");
            at = clock.us();
        }
        interrupt.ack(INT_USED_RING);
        requests.add(1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(clock.us(), at, "not held any more");
        assert_eq!(irqs.count(), 3 + hold::CREDIT as usize);
    }

    #[test]
    fn a_driver_that_waits_for_each_interrupt_is_held_only_by_probes() {
        let image = Image::on_tmpfs();
        let (mut worker, requests, clock, irqs, interrupt) = holding_worker(&image, |_, _| {});
        let mut call = |batch: usize| {
            requests.add(batch);
            assert_eq!(worker.process_queue().unwrap(), batch);
            // The driver takes the interrupt before it makes its next request.
            interrupt.ack(INT_USED_RING);
        };
        // One request at a time, then batches made available at once and waited for.
        let batches = [1, 1, 1, 8, 8, 32];
        for batch in batches {
            call(batch);
        }
        for _ in batches.len()..usize::try_from(hold::PROBE_CALLS).unwrap() - 1 {
            call(1);
        }
        assert_eq!(clock.us(), 0, "the clock was never read: no hold");
        // The call that makes PROBE_CALLS probes: one hold, which runs out.
        call(1);
        let probed = clock.us();
        assert!((200..205).contains(&probed), "held {probed} us");
        // The next look for a probe is within the interval: no hold.
        for _ in 0..hold::PROBE_CALLS {
            call(1);
        }
        assert_eq!(clock.us(), probed + 1, "one reading, no hold");
        assert_eq!(
            irqs.count(),
            2 * usize::try_from(hold::PROBE_CALLS).unwrap()
        );
    }

    #[test]
    fn a_request_made_before_the_driver_took_the_last_interrupt_is_held() {
        let image = Image::on_tmpfs();
        let (mut worker, requests, clock, irqs, _) = holding_worker(&image, |_, _| {});
        requests.add(1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(clock.us(), 0, "nothing shows a second request in flight");
        // The interrupt is still pending: this request did not wait for it.
        requests.add(1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(
            clock.us(),
            201,
            "held the longest hold, one reading past it"
        );
        assert_eq!(irqs.count(), 2);
    }

    #[test]
    fn a_driver_trickling_requests_holds_the_worker_at_most_the_limit_for_each() {
        let image = Image::on_tmpfs();
        // A request every 199 us, just inside the longest hold, for as long as the worker
        // waits for one.
        let (mut worker, requests, clock, irqs, _) = holding_worker(&image, |us, requests| {
            if us % 199 == 0 {
                requests.add(1);
            }
        });
        requests.add(1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        // Made before the driver took the interrupt: held.
        requests.add(1);
        // The call stops at its budget of chains, with one interrupt for all of them...
        assert_eq!(worker.process_queue().unwrap(), MAX_BATCH);
        assert!(worker.budget_spent());
        assert_eq!(irqs.count(), 2);
        // ... after holding at most the longest hold for each.
        let held = clock.us();
        let most = u64::try_from(MAX_INTERRUPT_HOLD.as_micros() * (MAX_BATCH as u128)).unwrap();
        assert!(held <= most, "held {held} us for {MAX_BATCH} chains");
        assert!(
            held >= 199 * 250,
            "the holds caught the requests: {held} us"
        );
    }

    #[test]
    fn a_worker_without_holds_raises_its_interrupt_at_once() {
        let image = Image::on_tmpfs();
        let (worker, requests, clock, irqs, _) = holding_worker(&image, |_, requests| {
            requests.add(1);
        });
        let mut worker = worker.with_interrupt_hold(Duration::ZERO);
        requests.add(1);
        assert_eq!(worker.process_queue().unwrap(), 1);
        // The interrupt is pending, yet the worker does not hold.
        requests.add(2);
        assert_eq!(worker.process_queue().unwrap(), 2);
        assert_eq!((clock.us(), irqs.count()), (0, 2));
    }
}
