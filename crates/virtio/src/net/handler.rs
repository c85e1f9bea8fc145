//! The work of an active virtio-net device: moving frames from the transmit queue to the backend
//! and from the backend to the receive queue, on the thread that serves the device (its worker,
//! or the VMM's event manager).
//!
//! [`NetHandler::process_tx`] and [`NetHandler::process_rx`] are the two steps; the
//! [`EventHandler`] implementation calls them when the driver notifies a queue or the backend
//! becomes readable or writable, and keeps the worker's interest in the backend in line with
//! what the steps can do next ([`NetHandler::backend_interest`]): it stops reading the backend
//! while the guest has no room for the frame it holds, and waits for the backend to become
//! writable only while a transmitted frame is held back. Neither step ever spins: each returns
//! when the work it could do is done.
//!
//! Each direction has a rate limiter ([`NetRateLimiters`]); every frame takes one operation and
//! its length in bytes, header included, before it moves. When a limiter refuses a frame, that
//! direction stops (the frame waits in the handler, a received one in its buffer and the next
//! ones in the backend) until the limiter's timerfd fires, and the handler waits neither on the
//! backend nor on the queue for that direction meanwhile.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use ember_rate_limiter::{BucketUpdate, RateLimiter, TokenType};
use vm_memory::{GuestAddressSpace, GuestMemory, Permissions};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::NetBackend;
use super::metrics::{NetMetrics, add, inc};
use super::{
    Error, MAX_BUFFER_LEN, NUM_QUEUES, NetRateLimiters, Result, VNET_HDR_LEN, has_feature,
};
use crate::device::{ActivateError, ActivateParams, VirtioInterrupt, VirtioInterruptType};
use crate::error::ErrorChain;
use crate::iov::{GuestIoVecs, IOV_MAX};
use crate::queue::{self, DescriptorChain, Queue, Rings};
use crate::worker::{EventHandler, EventOps};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

/// The worker's token for the receive queue's notification eventfd.
pub const RX_QUEUE_TOKEN: u64 = 0;
/// The worker's token for the transmit queue's notification eventfd.
pub const TX_QUEUE_TOKEN: u64 = 1;
/// The worker's token for the backend.
pub const BACKEND_TOKEN: u64 = 2;
/// The worker's token for the receive rate limiter's timerfd.
pub const RX_RATE_LIMITER_TOKEN: u64 = 3;
/// The worker's token for the transmit rate limiter's timerfd.
pub const TX_RATE_LIMITER_TOKEN: u64 = 4;

/// What the receive queue ([`super::RX_QUEUE`]) tells the driver when used.
const RX_INTERRUPT: VirtioInterruptType = VirtioInterruptType::Queue(0);
/// What the transmit queue ([`super::TX_QUEUE`]) tells the driver when used.
const TX_INTERRUPT: VirtioInterruptType = VirtioInterruptType::Queue(1);

/// The most frames [`NetHandler::process_rx`] takes from the backend in one call, so that a
/// flood of received frames does not hold back transmission; the backend stays readable, so the
/// worker comes back for the rest.
pub const RX_BUDGET: usize = 256;
/// The most chains [`NetHandler::process_tx`] sends in one call; past it the handler notifies
/// its own transmit eventfd, so that the worker comes back after the events waiting behind.
pub const TX_BUDGET: usize = 256;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// How often each kind of dropped frame may be logged.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Logs one kind of event at most once per [`LOG_INTERVAL`], so that a guest cannot flood the
/// log, and counts those it held back.
#[derive(Debug, Default)]
struct LogLimiter {
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimiter {
    /// Whether to log now; if so, how many events went unlogged since the last time.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.saturating_duration_since(last) < LOG_INTERVAL => {
                self.held_back = self.held_back.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// What became of one transmitted chain.
enum TxOutcome {
    /// The backend took the frame, of this many bytes.
    Sent(usize),
    /// The frame was not sent: the chain was malformed or the backend refused it.
    Dropped,
    /// The backend is full; the chain waits until it is writable.
    Blocked,
}

/// What became of one received frame.
enum RxOutcome {
    /// The frame is in the receive queue.
    Delivered,
    /// No chain, or no set of chains with MRG_RXBUF, can hold the frame within the queue size
    /// of chains and of descriptors: it is dropped, and the chains stay available for the next
    /// one.
    TooBig,
    /// The driver has not made room for the frame yet; `seen` is the available index the
    /// handler got to.
    NoBuffers {
        /// The available index when the queue ran dry.
        seen: u16,
    },
}

/// The device's state while active: its queues, its backend, and the frames in flight.
pub struct NetHandler<M, B> {
    mem: M,
    backend: B,
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    mrg_rxbuf: bool,
    /// The receive buffer: one frame from the backend, header included.
    rx_frame: Vec<u8>,
    /// The length of the frame in `rx_frame` not yet delivered, if there is one.
    rx_pending: Option<usize>,
    /// The chains taken for the frame being delivered: at most the queue size of them, with at
    /// most the queue size of descriptors among them. Allocated once, for that many chains.
    rx_chains: Vec<DescriptorChain>,
    /// The used elements of the frame being delivered, one per chain. Allocated once.
    rx_used: Vec<(u16, u32)>,
    /// Whether the handler waits for the driver to add receive buffers.
    rx_starved: bool,
    /// Whether the driver is asked to notify the receive queue.
    rx_notify: bool,
    /// The transmit chain the backend or the rate limiter held back.
    tx_pending: Option<DescriptorChain>,
    /// Whether the transmit limiter already let `tx_pending` through.
    tx_paid: bool,
    /// Whether the receive limiter already let the frame in `rx_frame` through.
    rx_paid: bool,
    /// Whether the transmit limiter refused a frame: transmission waits for its timer.
    tx_throttled: bool,
    /// Whether the receive limiter refused a frame: reception waits for its timer.
    rx_throttled: bool,
    rate_limiters: NetRateLimiters,
    /// Whether the backend failed for good; the handler stops reading it.
    backend_failed: bool,
    /// Whether the driver broke the protocol; the handler serves nothing until reset.
    broken: bool,
    /// The events the worker waits for on the backend.
    watched: EventSet,
    tx_dropped: u64,
    rx_dropped: u64,
    tx_log: LogLimiter,
    rx_log: LogLimiter,
    irq_log: LogLimiter,
    metrics: Arc<NetMetrics>,
}

impl<M, B> fmt::Debug for NetHandler<M, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetHandler")
            .field("mrg_rxbuf", &self.mrg_rxbuf)
            .field("rx_pending", &self.rx_pending)
            .field("rx_starved", &self.rx_starved)
            .field("tx_pending", &self.tx_pending.is_some())
            .field("rx_throttled", &self.rx_throttled)
            .field("tx_throttled", &self.tx_throttled)
            .field("rate_limiters", &self.rate_limiters)
            .field("backend_failed", &self.backend_failed)
            .field("broken", &self.broken)
            .field("tx_dropped", &self.tx_dropped)
            .field("rx_dropped", &self.rx_dropped)
            .finish_non_exhaustive()
    }
}

impl<M, B> NetHandler<M, B>
where
    M: GuestAddressSpace + Send + 'static,
    B: NetBackend,
{
    /// Takes over `backend`, the `rate_limiters` frames go through, and what the transport
    /// handed the device at activation: the receive queue first, then the transmit queue, and
    /// their eventfds. The backend's offloads must already match the negotiated features (see
    /// [`super::offload_flags`]).
    ///
    /// # Errors
    ///
    /// [`ActivateError::QueueCount`] unless there are two queues and two eventfds.
    pub fn new(
        backend: B,
        rate_limiters: NetRateLimiters,
        params: ActivateParams<M>,
    ) -> std::result::Result<Self, ActivateError> {
        let ActivateParams {
            mem,
            features,
            queues,
            queue_evts,
            interrupt,
            executor: _,
        } = params;
        let given = if queues.len() == NUM_QUEUES {
            queue_evts.len()
        } else {
            queues.len()
        };
        let mut queues = queues.into_iter();
        let mut evts = queue_evts.into_iter();
        let (Some(rx), Some(tx), None, Some(rx_evt), Some(tx_evt), None) = (
            queues.next(),
            queues.next(),
            queues.next(),
            evts.next(),
            evts.next(),
            evts.next(),
        ) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                given,
            });
        };
        let rx_chains = Vec::with_capacity(usize::from(rx.size()));
        let rx_used = Vec::with_capacity(usize::from(rx.size()));
        Ok(NetHandler {
            mem,
            backend,
            rx,
            tx,
            rx_evt,
            tx_evt,
            interrupt,
            mrg_rxbuf: has_feature(features, VIRTIO_NET_F_MRG_RXBUF),
            rx_frame: vec![0; MAX_BUFFER_LEN],
            rx_pending: None,
            rx_chains,
            rx_used,
            rx_starved: false,
            // The driver starts with notifications on.
            rx_notify: true,
            tx_pending: None,
            tx_paid: false,
            rx_paid: false,
            tx_throttled: false,
            rx_throttled: false,
            rate_limiters,
            backend_failed: false,
            broken: false,
            watched: EventSet::empty(),
            tx_dropped: 0,
            rx_dropped: 0,
            tx_log: LogLimiter::default(),
            rx_log: LogLimiter::default(),
            irq_log: LogLimiter::default(),
            metrics: Arc::default(),
        })
    }

    /// Counts into `metrics`, a device's counters, from now on; a handler starts with counters
    /// of its own.
    pub fn with_metrics(mut self, metrics: Arc<NetMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The counters the handler updates.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// Gives the backend back, when the device is reset.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Gives the backend and the rate limiters back, when the device is reset.
    pub fn into_parts(self) -> (B, NetRateLimiters) {
        (self.backend, self.rate_limiters)
    }

    /// The rate limiters frames go through.
    pub fn rate_limiters(&self) -> &NetRateLimiters {
        &self.rate_limiters
    }

    /// The rate limiters frames go through, to restore them.
    pub fn rate_limiters_mut(&mut self) -> &mut NetRateLimiters {
        &mut self.rate_limiters
    }

    /// Changes the rate limiters' buckets; a bucket given [`BucketUpdate::None`] keeps its
    /// state. A direction held back under the old limits is retried at once under the new
    /// ones: its limiter's timer fires right away.
    pub fn update_rate_limiters(
        &mut self,
        rx_bandwidth: BucketUpdate,
        rx_ops: BucketUpdate,
        tx_bandwidth: BucketUpdate,
        tx_ops: BucketUpdate,
    ) {
        self.rate_limiters.rx.update_buckets(rx_bandwidth, rx_ops);
        self.rate_limiters.tx.update_buckets(tx_bandwidth, tx_ops);
    }

    /// Whether the receive limiter holds a frame back, so that nothing is received until its
    /// timer fires.
    pub fn is_rx_throttled(&self) -> bool {
        self.rx_throttled
    }

    /// Whether the transmit limiter holds a frame back, so that nothing is sent until its timer
    /// fires.
    pub fn is_tx_throttled(&self) -> bool {
        self.tx_throttled
    }

    /// The events the handler needs from the backend now: readable unless the guest has no
    /// room for the frame the handler holds or the receive limiter holds it back, writable
    /// while a transmitted frame waits for room (not while the transmit limiter holds it).
    pub fn backend_interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.broken || self.backend_failed {
            return events;
        }
        if !self.rx_starved && !self.rx_throttled {
            events |= EventSet::IN;
        }
        if self.tx_pending.is_some() && !self.tx_throttled {
            events |= EventSet::OUT;
        }
        events
    }

    /// How many transmitted frames were dropped: malformed chains, and frames the backend
    /// refused.
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }

    /// How many received frames were dropped: too big for the guest's buffers, or malformed.
    pub fn rx_dropped(&self) -> u64 {
        self.rx_dropped
    }

    /// Whether the driver broke the protocol, so that the handler serves nothing until reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The receive and transmit queues as a snapshot records them: the transmit chain the
    /// backend or the rate limiter holds back, if any, is given back to the available ring, so
    /// that a device restored from the snapshot sends it again. That chain is always the last
    /// one taken: nothing more is sent while it is held. No receive chain is held between
    /// events (a frame that found no room left them available); a received frame the handler
    /// holds is host data, not the guest's, and is not saved.
    pub fn saved_queues(&self) -> Vec<Queue> {
        let mut tx = self.tx.clone();
        if self.tx_pending.is_some() {
            tx.set_next_avail(tx.next_avail().wrapping_sub(1));
        }
        vec![self.rx.clone(), tx]
    }

    /// Sends what the driver put in the transmit queue: each chain's device-readable part, the
    /// virtio-net header and the frame, goes to the backend in one write straight from
    /// guest memory, and the chain goes back with a used length of 0. Chains shorter than the
    /// header, longer than [`MAX_BUFFER_LEN`] or of more than [`IOV_MAX`] pieces are dropped
    /// and counted. When the backend is full, the chain waits until the next call
    /// (the worker makes it when the backend becomes writable): no frame is lost. Likewise
    /// when the transmit limiter refuses a frame: nothing is sent until its timer fires
    /// ([`NetHandler::is_tx_throttled`]). Frames the backend then holds in memory
    /// ([`NetBackend::has_pending_frames`]: its own answers to what was sent) are received at
    /// once, as [`NetHandler::process_rx`] does.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of either queue.
    pub fn process_tx(&mut self) -> Result<()> {
        let mem = self.mem.memory();
        self.transmit(&mem)
    }

    /// [`NetHandler::process_tx`] in `mem`, a snapshot of guest memory.
    fn transmit(&mut self, mem: &M::M) -> Result<()> {
        if self.broken || self.tx_throttled {
            return Ok(());
        }
        let mut used = false;
        let result = self.send_frames(mem, &mut used);
        if used {
            let notify = self.tx.needs_notification(mem).map_err(Error::tx)?;
            if notify {
                self.signal_used(TX_INTERRUPT);
            }
        }
        result?;
        // The backend may have answered what was sent without its descriptor becoming
        // readable: the answers go to the guest now.
        if self.backend.has_pending_frames() {
            self.receive(mem)?;
        }
        Ok(())
    }

    /// Drains the transmit queue, with notifications off while it does (virtio 1.2, 2.7.10),
    /// with its rings looked up once for the pass.
    ///
    /// It looks at the ring again after turning notifications back on at most [`TX_BUDGET`]
    /// times, so that a driver that moves its available index back and forth cannot keep it
    /// there; it then returns with notifications on, and the driver notifies for more.
    fn send_frames(&mut self, mem: &M::M, used: &mut bool) -> Result<()> {
        let mut tx = self.tx.rings(mem);
        let mut sent = 0usize;
        for _ in 0..TX_BUDGET {
            tx.disable_notification().map_err(Error::tx)?;
            loop {
                if sent >= TX_BUDGET {
                    // Come back after the other events; notifications stay off meanwhile. No
                    // chain is held, so that the backend is not watched for room as well.
                    if let Err(err) = self.tx_evt.write(1) {
                        inc(&self.metrics.event_fails);
                        log::error!(
                            "Cannot wake the virtio-net worker for more transmission: {err}"
                        );
                    }
                    return Ok(());
                }
                let (chain, paid) = match self.tx_pending.take() {
                    Some(chain) => (chain, std::mem::take(&mut self.tx_paid)),
                    None => match tx.pop().map_err(Error::tx)? {
                        Some(chain) => (chain, false),
                        None => break,
                    },
                };
                if !paid && !pay_tx(&mut self.rate_limiters.tx, &chain) {
                    // Notifications stay off: the transmit limiter's timer resumes.
                    self.tx_pending = Some(chain);
                    self.tx_throttled = true;
                    inc(&self.metrics.tx_rate_limiter_throttled);
                    return Ok(());
                }
                let outcome = send_chain(
                    &mut self.backend,
                    self.backend_failed,
                    &self.metrics,
                    &mut self.tx_log,
                    mem,
                    &chain,
                );
                match outcome {
                    TxOutcome::Blocked => {
                        // Notifications stay off: the backend becoming writable resumes.
                        self.tx_pending = Some(chain);
                        self.tx_paid = true;
                        return Ok(());
                    }
                    TxOutcome::Sent(len) => {
                        inc(&self.metrics.tx_packets_count);
                        inc(&self.metrics.tx_count);
                        add(
                            &self.metrics.tx_bytes_count,
                            u64::try_from(len).unwrap_or(u64::MAX),
                        );
                    }
                    TxOutcome::Dropped => self.tx_dropped = self.tx_dropped.saturating_add(1),
                }
                sent = sent.saturating_add(1);
                tx.add_used(chain.head_index(), 0).map_err(Error::tx)?;
                *used = true;
            }
            // The driver may have added chains after the last pop and before it saw
            // notifications back on.
            if !tx.enable_notification().map_err(Error::tx)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Delivers frames from the backend to the receive queue, each in one chain, or with
    /// MRG_RXBUF over as many chains as it needs with `num_buffers` saying how many. A frame no
    /// chain can hold is dropped and counted, never truncated. When the driver has no room for
    /// a frame, the handler keeps it, asks the driver to notify the receive queue once it adds
    /// buffers, and stops reading the backend ([`NetHandler::backend_interest`]) until the next
    /// call, which the worker makes at that notification. When the receive limiter refuses a
    /// frame, the handler keeps it likewise and reads nothing more until the limiter's timer
    /// fires ([`NetHandler::is_rx_throttled`]).
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of the receive queue.
    pub fn process_rx(&mut self) -> Result<()> {
        let mem = self.mem.memory();
        self.receive(&mem)
    }

    /// [`NetHandler::process_rx`] in `mem`, a snapshot of guest memory.
    fn receive(&mut self, mem: &M::M) -> Result<()> {
        if self.broken || self.rx_throttled {
            return Ok(());
        }
        // The receive queue leaves the handler for the pass, so that its rings are looked up in
        // guest memory once for all the frames of the pass and used beside the handler's other
        // fields. Nothing in the pass reads `self.rx`.
        let mut queue = std::mem::replace(&mut self.rx, Queue::new(0));
        let result = self.receive_in(&mut queue.rings(mem));
        self.rx = queue;
        result
    }

    /// [`NetHandler::receive`] with the receive queue's rings.
    fn receive_in(&mut self, rx: &mut Rings<'_, '_, M::M>) -> Result<()> {
        // The handler reads the backend for as long as the guest has room, so the driver's
        // notifications are only wanted once it runs out.
        if self.rx_notify {
            rx.disable_notification().map_err(Error::rx)?;
            self.rx_notify = false;
        }
        self.rx_starved = false;
        let mut used = false;
        let result = self.receive_frames(rx, &mut used);
        if used {
            let notify = rx.needs_notification().map_err(Error::rx)?;
            if notify {
                self.signal_used(RX_INTERRUPT);
            }
        }
        result
    }

    fn receive_frames(&mut self, rx: &mut Rings<'_, '_, M::M>, used: &mut bool) -> Result<()> {
        self.receive_budget(rx, used)?;
        if self.backend.has_pending_frames()
            && !self.rx_starved
            && !self.rx_throttled
            && !self.backend_failed
        {
            // The budget ran out with frames left that no readable descriptor brings the
            // worker back for: it comes back through the receive queue's eventfd.
            if let Err(err) = self.rx_evt.write(1) {
                inc(&self.metrics.event_fails);
                log::error!("Cannot wake the virtio-net worker for more reception: {err}");
            }
        }
        Ok(())
    }

    /// Delivers at most [`RX_BUDGET`] frames.
    fn receive_budget(&mut self, rx: &mut Rings<'_, '_, M::M>, used: &mut bool) -> Result<()> {
        for _ in 0..RX_BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => return Ok(()),
                },
            };
            self.rx_pending = Some(len);
            let bytes = u64::try_from(len).unwrap_or(u64::MAX);
            if !self.rx_paid {
                if !admit(&mut self.rate_limiters.rx, bytes) {
                    // The frame stays in `rx_frame`, the next ones in the backend.
                    self.rx_throttled = true;
                    inc(&self.metrics.rx_rate_limiter_throttled);
                    return Ok(());
                }
                self.rx_paid = true;
            }
            match self.deliver(rx, len).map_err(Error::rx)? {
                RxOutcome::Delivered => {
                    self.rx_pending = None;
                    self.rx_paid = false;
                    inc(&self.metrics.rx_packets_count);
                    add(
                        &self.metrics.rx_bytes_count,
                        u64::try_from(len).unwrap_or(u64::MAX),
                    );
                    *used = true;
                }
                RxOutcome::TooBig => {
                    self.rx_pending = None;
                    // Nothing reached the guest: the tokens go back.
                    self.rx_paid = false;
                    self.rate_limiters.rx.replenish(1, TokenType::Ops);
                    self.rate_limiters.rx.replenish(bytes, TokenType::Bytes);
                    let mrg = if self.mrg_rxbuf {
                        "the whole receive queue"
                    } else {
                        "the next receive buffer"
                    };
                    self.drop_rx(format_args!("{len} bytes do not fit in {mrg}"));
                }
                RxOutcome::NoBuffers { seen } => {
                    if self.wait_for_rx_buffers(rx, seen).map_err(Error::rx)? {
                        // The driver added buffers before it saw the request: try again.
                        continue;
                    }
                    inc(&self.metrics.no_rx_avail_buffer);
                    self.rx_starved = true;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Reads the next frame from the backend into `rx_frame`: its length, or `None` when the
    /// backend has none. Malformed frames are dropped here.
    ///
    /// It drops at most [`RX_BUDGET`] malformed frames per call, then returns `None` with the
    /// backend still readable, so that the worker comes back after its other events.
    fn read_frame(&mut self) -> Option<usize> {
        if self.backend_failed {
            return None;
        }
        for _ in 0..RX_BUDGET {
            let read = self.backend.read_frame(&mut self.rx_frame);
            if read.is_ok() {
                inc(&self.metrics.rx_count);
            }
            match read {
                Ok(len) if (VNET_HDR_LEN..=self.rx_frame.len()).contains(&len) => {
                    return Some(len);
                }
                Ok(len) => self.drop_rx(format_args!(
                    "the backend handed over {len} bytes, not the {VNET_HDR_LEN}-byte header and \
                     a frame of at most {} bytes",
                    MAX_BUFFER_LEN - VNET_HDR_LEN
                )),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return None,
                Err(err) => {
                    inc(&self.metrics.rx_fails);
                    log::error!(
                        "virtio-net cannot read from its backend and stops receiving until the \
                         device is reset: {err}"
                    );
                    self.backend_failed = true;
                    return None;
                }
            }
        }
        None
    }

    fn drop_rx(&mut self, why: fmt::Arguments<'_>) {
        self.rx_dropped = self.rx_dropped.saturating_add(1);
        inc(&self.metrics.rx_fails);
        if let Some(held_back) = self.rx_log.allow() {
            log::warn!(
                "virtio-net dropped a received frame: {why} ({held_back} more dropped since the \
                 last report)"
            );
        }
    }

    /// Places the `len`-byte frame in `rx_frame` in the receive queue. Chains are taken only
    /// when the whole frame fits: otherwise the queue is wound back to where it was, so that
    /// the chains stay available.
    ///
    /// With MRG_RXBUF a frame takes only as many chains as its bytes need, and never more than
    /// the queue size of chains nor of descriptors, indirect ones included; a frame that needs
    /// more is [`RxOutcome::TooBig`]. So one frame reads at most a few queue sizes of
    /// descriptors, and holds no more than a queue size of them in `rx_chains`, whatever the
    /// driver put in the ring.
    fn deliver(&mut self, rx: &mut Rings<'_, '_, M::M>, len: usize) -> queue::Result<RxOutcome> {
        let mem = rx.mem();
        let start = rx.queue().next_avail();
        let max_chains = usize::from(rx.queue().size());
        let max_descriptors = max_chains;
        self.rx_chains.clear();
        let mut room = 0usize;
        let mut descriptors = 0usize;
        while room < len {
            if self.rx_chains.len() >= max_chains || (!self.mrg_rxbuf && !self.rx_chains.is_empty())
            {
                self.rx_chains.clear();
                rx.set_next_avail(start);
                return Ok(RxOutcome::TooBig);
            }
            let Some(chain) = rx.pop()? else {
                let seen = rx.queue().next_avail();
                self.rx_chains.clear();
                rx.set_next_avail(start);
                return Ok(RxOutcome::NoBuffers { seen });
            };
            descriptors = descriptors.saturating_add(chain.descriptors().len());
            if descriptors > max_descriptors {
                self.rx_chains.clear();
                rx.set_next_avail(start);
                return Ok(RxOutcome::TooBig);
            }
            let chain_room = usize::try_from(chain.writable_len()).unwrap_or(usize::MAX);
            room = room.saturating_add(chain_room);
            self.rx_chains.push(chain);
        }

        // A chain count fits: it is at most the queue size.
        let num_buffers = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
        if let Some(field) = self
            .rx_frame
            .get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2)
        {
            field.copy_from_slice(&num_buffers.to_le_bytes());
        }
        let frame = self.rx_frame.get(..len).unwrap_or_default();
        self.rx_used.clear();
        let mut offset = 0usize;
        for chain in &self.rx_chains {
            let rest = frame.get(offset..).unwrap_or_default();
            let written = chain.write_from(mem, rest)?;
            offset = offset.saturating_add(written);
            // At most the chain's writable length, which is a u32.
            self.rx_used.push((
                chain.head_index(),
                u32::try_from(written).unwrap_or(u32::MAX),
            ));
        }
        self.rx_chains.clear();
        rx.add_used_batch(&self.rx_used)?;
        Ok(RxOutcome::Delivered)
    }

    /// Asks the driver to notify the receive queue once it makes entries past `seen` available,
    /// and returns whether it already did (the handler must then look again, since the driver
    /// may have added them before it saw the request).
    fn wait_for_rx_buffers(&mut self, rx: &Rings<'_, '_, M::M>, seen: u16) -> queue::Result<bool> {
        if rx.queue().event_idx_enabled() {
            // Not `next_avail`, which may lag behind with MRG_RXBUF: the driver must notify at
            // the next entry it adds, whatever the handler already looked at.
            rx.set_avail_event(seen)?;
        } else {
            rx.enable_notification()?;
        }
        self.rx_notify = true;
        // The request must be visible before the available index is read again.
        fence(Ordering::SeqCst);
        Ok(rx.avail_idx()? != seen)
    }

    /// Tells the driver the queue of `kind` was used.
    fn signal_used(&mut self, kind: VirtioInterruptType) {
        if let Err(err) = self.interrupt.trigger(kind) {
            inc(&self.metrics.event_fails);
            if let Some(held_back) = self.irq_log.allow() {
                log::error!(
                    "virtio-net cannot raise its interrupt: {err} ({held_back} more failures since \
                     the last report)"
                );
            }
        }
    }

    /// Stops reading the backend after it reported an error or a hang-up, and drops the frame
    /// waiting for room in it.
    fn backend_gone(&mut self) -> Result<()> {
        if !self.backend_failed {
            log::error!(
                "virtio-net's backend reported an error or hang-up; the device stops using it \
                 until reset"
            );
            self.backend_failed = true;
        }
        if let Some(chain) = self.tx_pending.take() {
            self.tx_paid = false;
            self.tx_dropped = self.tx_dropped.saturating_add(1);
            inc(&self.metrics.tx_fails);
            let mem = self.mem.memory();
            self.tx
                .add_used(&*mem, chain.head_index(), 0)
                .map_err(Error::tx)?;
            if self.tx.needs_notification(&*mem).map_err(Error::tx)? {
                self.signal_used(TX_INTERRUPT);
            }
        }
        Ok(())
    }

    /// Handles the timer event of the receive (`rx`) or transmit rate limiter: the direction it
    /// held back goes on.
    fn rate_limiter_event(&mut self, rx: bool) -> Result<()> {
        let (limiter, count, direction) = if rx {
            (
                &mut self.rate_limiters.rx,
                &self.metrics.rx_event_rate_limiter_count,
                "receive",
            )
        } else {
            (
                &mut self.rate_limiters.tx,
                &self.metrics.tx_rate_limiter_event_count,
                "transmit",
            )
        };
        inc(count);
        match limiter.event_handler() {
            Ok(()) => {}
            // Re-armed after epoll saw it (the buckets changed): it fires again.
            Err(ember_rate_limiter::Error::SpuriousEvent) => return Ok(()),
            Err(source) => return Err(Error::RateLimiter { direction, source }),
        }
        if rx && self.rx_throttled {
            self.rx_throttled = false;
            self.process_rx()
        } else if !rx && self.tx_throttled {
            self.tx_throttled = false;
            self.process_tx()
        } else {
            Ok(())
        }
    }

    /// Makes the worker wait on the backend for [`NetHandler::backend_interest`].
    fn sync_interest(&mut self, ops: &mut EventOps<'_>) -> Result<()> {
        let want = self.backend_interest();
        if want == self.watched {
            return Ok(());
        }
        let fd = self.backend.as_raw_fd();
        let result = if self.watched.is_empty() {
            ops.add(fd, want, BACKEND_TOKEN)
        } else if want.is_empty() {
            // Removed rather than left with no events: epoll would still report errors and
            // hang-ups.
            ops.remove(fd)
        } else {
            ops.modify(fd, want, BACKEND_TOKEN)
        };
        result.map_err(Error::Epoll)?;
        self.watched = want;
        Ok(())
    }

    /// Stops serving after the driver broke the protocol: the device asks for a reset and the
    /// worker waits on nothing but its stop event, so it does not spin.
    fn fail(&mut self, ops: &mut EventOps<'_>, err: &Error) {
        self.broken = true;
        if matches!(err, Error::Epoll(_) | Error::RateLimiter { .. }) {
            inc(&self.metrics.event_fails);
            log::error!(
                "virtio-net stops serving its queues until the driver resets it: {}",
                ErrorChain(err)
            );
        } else {
            // The guest can do this at every activation: counted, and a warning only.
            inc(&self.metrics.queue_fails);
            log::warn!(
                "virtio-net stops serving its queues until the driver resets it: {}",
                ErrorChain(err)
            );
        }
        if let Err(err) = self.interrupt.trigger(VirtioInterruptType::NeedsReset) {
            inc(&self.metrics.event_fails);
            log::error!("virtio-net cannot raise its interrupt: {err}");
        }
        // Errors are ignored: the descriptors are going anyway, and the log already says why.
        let _ = ops.remove(self.rx_evt.as_raw_fd());
        let _ = ops.remove(self.tx_evt.as_raw_fd());
        // An expired timer would stay readable.
        let _ = ops.remove(self.rate_limiters.rx.as_raw_fd());
        let _ = ops.remove(self.rate_limiters.tx.as_raw_fd());
        if !self.watched.is_empty() {
            let _ = ops.remove(self.backend.as_raw_fd());
            self.watched = EventSet::empty();
        }
    }
}

impl<M, B> EventHandler for NetHandler<M, B>
where
    M: GuestAddressSpace + Send + 'static,
    B: NetBackend,
{
    fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
        ops.add(self.rx_evt.as_raw_fd(), EventSet::IN, RX_QUEUE_TOKEN)?;
        ops.add(self.tx_evt.as_raw_fd(), EventSet::IN, TX_QUEUE_TOKEN)?;
        ops.add(
            self.rate_limiters.rx.as_raw_fd(),
            EventSet::IN,
            RX_RATE_LIMITER_TOKEN,
        )?;
        ops.add(
            self.rate_limiters.tx.as_raw_fd(),
            EventSet::IN,
            TX_RATE_LIMITER_TOKEN,
        )?;
        let want = self.backend_interest();
        if !want.is_empty() {
            ops.add(self.backend.as_raw_fd(), want, BACKEND_TOKEN)?;
        }
        self.watched = want;
        Ok(())
    }

    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, events: EventSet) {
        if self.broken {
            return;
        }
        let result = match token {
            RX_QUEUE_TOKEN => {
                inc(&self.metrics.rx_queue_event_count);
                clear(&self.rx_evt, &self.metrics);
                self.process_rx()
            }
            TX_QUEUE_TOKEN => {
                inc(&self.metrics.tx_queue_event_count);
                clear(&self.tx_evt, &self.metrics);
                self.process_tx()
            }
            RX_RATE_LIMITER_TOKEN => self.rate_limiter_event(true),
            TX_RATE_LIMITER_TOKEN => self.rate_limiter_event(false),
            BACKEND_TOKEN if events.intersects(EventSet::ERROR | EventSet::HANG_UP) => {
                inc(&self.metrics.event_fails);
                self.backend_gone()
            }
            BACKEND_TOKEN => {
                // One snapshot of guest memory for both directions.
                let mem = self.mem.memory();
                let rx = if events.contains(EventSet::IN) {
                    inc(&self.metrics.rx_tap_event_count);
                    self.receive(&mem)
                } else {
                    Ok(())
                };
                rx.and_then(|()| {
                    if events.contains(EventSet::OUT) {
                        self.transmit(&mem)
                    } else {
                        Ok(())
                    }
                })
            }
            _ => Ok(()),
        };
        if let Err(err) = result.and_then(|()| self.sync_interest(ops)) {
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

/// Clears a queue's notification eventfd; the count does not matter.
fn clear(evt: &EventFd, metrics: &NetMetrics) {
    if let Err(err) = evt.read() {
        if err.kind() != io::ErrorKind::WouldBlock {
            inc(&metrics.event_fails);
        }
    }
}

/// Takes the transmit `limiter`'s tokens for `chain`: an operation, and the frame's length in
/// bytes unless it is malformed (it is then dropped without being read).
fn pay_tx(limiter: &mut RateLimiter, chain: &DescriptorChain) -> bool {
    let len = chain.readable_len();
    let frame =
        usize::try_from(len).is_ok_and(|len| (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&len));
    let bytes = if frame { u64::from(len) } else { 0 };
    admit(limiter, bytes)
}

/// Hands one chain's frame, in `mem`, to `backend`. A backend that `failed` for good and has
/// no room drops the frame rather than holding it.
fn send_chain<B: NetBackend, G: GuestMemory + ?Sized>(
    backend: &mut B,
    failed: bool,
    metrics: &NetMetrics,
    log: &mut LogLimiter,
    mem: &G,
    chain: &DescriptorChain,
) -> TxOutcome {
    let len = usize::try_from(chain.readable_len()).unwrap_or(usize::MAX);
    if !(VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&len) {
        inc(&metrics.tx_malformed_frames);
        return dropped_tx(
            log,
            format_args!(
                "the chain holds {len} bytes, not the {VNET_HDR_LEN}-byte header and a frame of \
                 at most {} bytes",
                MAX_BUFFER_LEN - VNET_HDR_LEN
            ),
        );
    }
    let pieces = chain.readable().count();
    if pieces > IOV_MAX {
        inc(&metrics.tx_malformed_frames);
        return dropped_tx(
            log,
            format_args!("the chain has {pieces} buffers, more than the {IOV_MAX} one write takes"),
        );
    }
    let frame = match GuestIoVecs::new(mem, chain.readable().copied(), Permissions::Read) {
        Ok(frame) if frame.iovecs().len() <= IOV_MAX => frame,
        Ok(frame) => {
            inc(&metrics.tx_malformed_frames);
            let pieces = frame.iovecs().len();
            return dropped_tx(
                log,
                format_args!(
                    "the chain spans {pieces} pieces of guest memory, more than the {IOV_MAX} \
                     one write takes"
                ),
            );
        }
        Err(err) => {
            inc(&metrics.tx_malformed_frames);
            return dropped_tx(log, format_args!("its buffers cannot be mapped: {err}"));
        }
    };
    loop {
        match backend.write_frame(&frame) {
            Ok(written) => return TxOutcome::Sent(written),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && !failed => {
                return TxOutcome::Blocked;
            }
            Err(err) => {
                inc(&metrics.tx_fails);
                return dropped_tx(log, format_args!("the backend refused it: {err}"));
            }
        }
    }
}

/// Logs, within `log`'s limit, why a transmitted frame was dropped.
fn dropped_tx(log: &mut LogLimiter, why: fmt::Arguments<'_>) -> TxOutcome {
    if let Some(held_back) = log.allow() {
        log::warn!(
            "virtio-net dropped a transmitted frame: {why} ({held_back} more dropped since the \
             last report)"
        );
    }
    TxOutcome::Dropped
}

#[cfg(test)]
mod tests;
