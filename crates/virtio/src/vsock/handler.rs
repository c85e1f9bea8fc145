//! The work of an active vsock device: moving packets between the guest's queues and the
//! backend, on the thread that serves the device (its worker, or the VMM's event manager).
//!
//! [`VsockHandler::process_tx`], [`VsockHandler::process_rx`] and
//! [`VsockHandler::process_event_queue`] are the steps; the [`EventHandler`] implementation
//! calls them when the driver notifies a queue and, with [`VsockBackend::notify`] first, when
//! the backend's descriptor is ready. None of them blocks, and each serves a bounded batch
//! ([`TX_BUDGET`], [`RX_BUDGET`]); past it, the handler notifies its own queue eventfd so that
//! it comes back after the events waiting behind.
//!
//! Packets are copied through one buffer of [`MAX_PKT_BUF_SIZE`] bytes, allocated once.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::VsockBackend;
use super::metrics::{VsockMetrics, add, inc};
use super::packet::{self, MAX_PKT_BUF_SIZE, PacketHeader};
use super::{EV_QUEUE, EVENT_TRANSPORT_RESET, Error, NUM_QUEUES, RX_QUEUE, Result, TX_QUEUE};
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::error::ErrorChain;
use crate::queue::Queue;
use crate::worker::{EventHandler, EventOps};

/// The handler's token for the receive queue's notification eventfd.
pub const RX_QUEUE_TOKEN: u64 = 0;
/// The handler's token for the transmit queue's notification eventfd.
pub const TX_QUEUE_TOKEN: u64 = 1;
/// The handler's token for the event queue's notification eventfd.
pub const EV_QUEUE_TOKEN: u64 = 2;
/// The handler's token for the backend's descriptor.
pub const BACKEND_TOKEN: u64 = 3;

/// The most packets [`VsockHandler::process_tx`] takes from the guest in one call.
pub const TX_BUDGET: usize = 256;
/// The most packets [`VsockHandler::process_rx`] hands the guest in one call.
pub const RX_BUDGET: usize = 256;

/// The device's state while active: its queues, its backend and what waits for the guest.
pub struct VsockHandler<M, B> {
    guest_cid: u64,
    mem: M,
    backend: B,
    queues: [Queue; NUM_QUEUES],
    queue_evts: [EventFd; NUM_QUEUES],
    interrupt: Arc<dyn VirtioInterrupt>,
    /// One packet's payload. Allocated once, [`MAX_PKT_BUF_SIZE`] long.
    buf: Vec<u8>,
    /// A transport reset event waits for a buffer of the event queue.
    reset_pending: bool,
    /// Whether the driver broke the protocol; the handler serves nothing until reset.
    broken: bool,
    metrics: Arc<VsockMetrics>,
}

impl<M, B> fmt::Debug for VsockHandler<M, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsockHandler")
            .field("guest_cid", &self.guest_cid)
            .field("reset_pending", &self.reset_pending)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Which queue an error or interrupt concerns.
fn queue_interrupt(index: usize) -> VirtioInterruptType {
    VirtioInterruptType::Queue(u16::try_from(index).unwrap_or(u16::MAX))
}

impl<M, B> VsockHandler<M, B>
where
    M: GuestAddressSpace + Send + 'static,
    B: VsockBackend,
{
    /// Serves the receive, transmit and event `queues` (in that order), whose notifications
    /// come on `queue_evts`, in `mem`, for the guest with context ID `guest_cid`, with
    /// `backend` as the host side, telling the driver through `interrupt`.
    pub fn new(
        guest_cid: u64,
        backend: B,
        mem: M,
        queues: [Queue; NUM_QUEUES],
        queue_evts: [EventFd; NUM_QUEUES],
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        VsockHandler {
            guest_cid,
            mem,
            backend,
            queues,
            queue_evts,
            interrupt,
            buf: vec![0; MAX_PKT_BUF_SIZE],
            reset_pending: false,
            broken: false,
            metrics: Arc::default(),
        }
    }

    /// Counts into `metrics`, a device's counters, from now on; a handler starts with counters
    /// of its own.
    pub fn with_metrics(mut self, metrics: Arc<VsockMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The counters the handler updates.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to change.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Gives the backend back, when the device is reset.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Whether the driver broke the protocol, so that the handler serves nothing until reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether a transport reset event waits for a buffer of the event queue.
    pub fn is_reset_pending(&self) -> bool {
        self.reset_pending
    }

    /// Queues [`EVENT_TRANSPORT_RESET`] for the guest, to be sent when the handler starts
    /// serving its queues.
    pub fn queue_transport_reset(&mut self) {
        self.reset_pending = true;
    }

    /// Queues [`EVENT_TRANSPORT_RESET`] for the guest, and sends it if the event queue has a
    /// buffer.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of the event queue.
    pub fn send_transport_reset(&mut self) -> Result<usize> {
        self.reset_pending = true;
        self.process_event_queue()
    }

    /// Takes the packets the guest transmitted, at most [`TX_BUDGET`], to the backend; then
    /// serves the receive queue if the backend has packets. Returns the packets taken.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of a queue.
    pub fn process_tx(&mut self) -> Result<usize> {
        if self.broken {
            return Ok(0);
        }
        let mem = self.mem.memory();
        let mem = &*mem;
        let mut served = 0usize;
        let [_, tx, _] = &mut self.queues;
        let result = loop {
            if served >= TX_BUDGET {
                if let Err(err) = self.queue_evts[TX_QUEUE].write(1) {
                    inc(&self.metrics.tx_queue_event_fails);
                    log::error!("Cannot wake the virtio-vsock handler for more packets: {err}");
                }
                break Ok(());
            }
            let chain = match tx.pop(mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(err) => break Err(Error::Queue(err)),
            };
            match packet::read_tx(mem, &chain, &mut self.buf) {
                Ok((header, len)) => {
                    inc(&self.metrics.tx_packets_count);
                    add(
                        &self.metrics.tx_bytes_count,
                        u64::try_from(len).unwrap_or(0),
                    );
                    let payload = self.buf.get(..len).unwrap_or_default();
                    self.backend.send_pkt(&header, payload);
                }
                Err((header, err)) => {
                    inc(&self.metrics.tx_queue_event_fails);
                    log::debug!("virtio-vsock dropped a malformed packet: {}", ErrorChain(&err));
                    if let Some(header) = header {
                        self.backend.reject(&header);
                    }
                }
            }
            if let Err(err) = tx.add_used(mem, chain.head_index(), 0) {
                break Err(Error::Queue(err));
            }
            served = served.saturating_add(1);
        };
        if served > 0 {
            self.signal_used(TX_QUEUE, mem)?;
        }
        result?;
        if self.backend.has_pending_rx() {
            self.process_rx()?;
        }
        Ok(served)
    }

    /// Fills the guest's receive buffers with the backend's packets, at most [`RX_BUDGET`];
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of the receive queue.
    pub fn process_rx(&mut self) -> Result<usize> {
        if self.broken {
            return Ok(0);
        }
        let mem = self.mem.memory();
        let mem = &*mem;
        let mut served = 0usize;
        let [rx, _, _] = &mut self.queues;
        let result = loop {
            if !self.backend.has_pending_rx() {
                break Ok(());
            }
            if served >= RX_BUDGET {
                if let Err(err) = self.queue_evts[RX_QUEUE].write(1) {
                    inc(&self.metrics.rx_queue_event_fails);
                    log::error!("Cannot wake the virtio-vsock handler for more packets: {err}");
                }
                break Ok(());
            }
            let chain = match rx.pop(mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(err) => break Err(Error::Queue(err)),
            };
            let written = match packet::rx_capacity(&chain) {
                Ok(capacity) => {
                    let buf = self.buf.get_mut(..capacity).unwrap_or_default();
                    let mut header = PacketHeader::default();
                    let Some(len) = self.backend.recv_pkt(&mut header, buf) else {
                        // Nothing after all: the chain goes back for the next packet.
                        rx.set_next_avail(rx.next_avail().wrapping_sub(1));
                        break Ok(());
                    };
                    let payload = buf.get(..len).unwrap_or_default();
                    header.len = u32::try_from(payload.len()).unwrap_or(0);
                    match packet::write_rx(mem, &chain, &header, payload) {
                        Ok(written) => {
                            inc(&self.metrics.rx_packets_count);
                            add(
                                &self.metrics.rx_bytes_count,
                                u64::try_from(payload.len()).unwrap_or(0),
                            );
                            written
                        }
                        Err(err) => {
                            // The buffers were checked when the chain was read: guest memory
                            // that went away since is the guest's loss.
                            inc(&self.metrics.rx_queue_event_fails);
                            log::debug!("virtio-vsock cannot write a packet: {}", ErrorChain(&err));
                            0
                        }
                    }
                }
                Err(err) => {
                    inc(&self.metrics.rx_queue_event_fails);
                    log::debug!("virtio-vsock skipped a receive buffer: {}", ErrorChain(&err));
                    0
                }
            };
            let used = u32::try_from(written).unwrap_or(0);
            if let Err(err) = rx.add_used(mem, chain.head_index(), used) {
                break Err(Error::Queue(err));
            }
            served = served.saturating_add(1);
        };
        if served > 0 {
            self.signal_used(RX_QUEUE, mem)?;
        }
        result.map(|()| served)
    }

    /// Sends a waiting transport reset event if the event queue has a buffer for it; returns
    /// the buffers used.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of the event queue.
    pub fn process_event_queue(&mut self) -> Result<usize> {
        if self.broken {
            return Ok(0);
        }
        let mem = self.mem.memory();
        let mem = &*mem;
        let mut served = 0usize;
        let [_, _, ev] = &mut self.queues;
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let result = loop {
            if !self.reset_pending || served >= usize::from(ev.size()) {
                break Ok(());
            }
            let chain = match ev.pop(mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(err) => break Err(Error::Queue(err)),
            };
            let written = match chain.write_from(mem, &event) {
                Ok(written) if written == event.len() => {
                    self.reset_pending = false;
                    written
                }
                Ok(_) | Err(_) => {
                    // Too short for an event: the guest's loss, and the next buffer is tried.
                    inc(&self.metrics.ev_queue_event_fails);
                    0
                }
            };
            let used = u32::try_from(written).unwrap_or(0);
            if let Err(err) = ev.add_used(mem, chain.head_index(), used) {
                break Err(Error::Queue(err));
            }
            served = served.saturating_add(1);
        };
        if served > 0 {
            self.signal_used(EV_QUEUE, mem)?;
        }
        result.map(|()| served)
    }

    /// The backend's descriptor reported `events`: the backend does its work, then the
    /// guest gets what it has for it. Returns the packets handed to the guest.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the protocol of the receive queue.
    pub fn backend_event(&mut self, events: EventSet) -> Result<usize> {
        self.backend.notify(events);
        self.process_rx()
    }

    fn signal_used(&mut self, index: usize, mem: &M::M) -> Result<()> {
        let Some(queue) = self.queues.get_mut(index) else {
            return Ok(());
        };
        if queue.needs_notification(mem).map_err(Error::Queue)? {
            if let Err(err) = self.interrupt.trigger(queue_interrupt(index)) {
                let counter = match index {
                    RX_QUEUE => &self.metrics.rx_queue_event_fails,
                    TX_QUEUE => &self.metrics.tx_queue_event_fails,
                    _ => &self.metrics.ev_queue_event_fails,
                };
                inc(counter);
                log::error!("virtio-vsock cannot raise its interrupt: {err}");
            }
        }
        Ok(())
    }

    /// Stops serving after the driver broke the protocol: the device asks for a reset and the
    /// handler waits on nothing, so it does not spin.
    fn fail(&mut self, ops: &mut EventOps<'_>, err: &Error) {
        self.broken = true;
        log::warn!(
            "virtio-vsock stops serving its queues until the driver resets it: {}",
            ErrorChain(err)
        );
        if let Err(err) = self.interrupt.trigger(VirtioInterruptType::NeedsReset) {
            log::error!("virtio-vsock cannot raise its interrupt: {err}");
        }
        // Errors are ignored: the descriptors are going anyway, and the log already says why.
        for evt in &self.queue_evts {
            let _ = ops.remove(evt.as_raw_fd());
        }
        let _ = ops.remove(self.backend.as_raw_fd());
    }

    /// Reads a queue's notification eventfd, counting failures other than its being clear.
    fn clear_evt(&self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            if let Err(err) = evt.read() {
                if err.kind() != io::ErrorKind::WouldBlock {
                    let counter = match index {
                        RX_QUEUE => &self.metrics.rx_queue_event_fails,
                        TX_QUEUE => &self.metrics.tx_queue_event_fails,
                        _ => &self.metrics.ev_queue_event_fails,
                    };
                    inc(counter);
                }
            }
        }
    }
}

impl<M, B> EventHandler for VsockHandler<M, B>
where
    M: GuestAddressSpace + Send + 'static,
    B: VsockBackend,
{
    fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
        let tokens = [RX_QUEUE_TOKEN, TX_QUEUE_TOKEN, EV_QUEUE_TOKEN];
        for (evt, token) in self.queue_evts.iter().zip(tokens) {
            ops.add(evt.as_raw_fd(), EventSet::IN, token)?;
        }
        ops.add(
            self.backend.as_raw_fd(),
            self.backend.interest(),
            BACKEND_TOKEN,
        )?;
        // A reset queued before activation goes as soon as the driver gave a buffer for it.
        if self.reset_pending {
            if let Err(err) = self.process_event_queue() {
                self.fail(ops, &err);
            }
        }
        Ok(())
    }

    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, events: EventSet) {
        if self.broken {
            return;
        }
        let result = match token {
            RX_QUEUE_TOKEN => {
                inc(&self.metrics.rx_queue_event_count);
                self.clear_evt(RX_QUEUE);
                self.process_rx()
            }
            TX_QUEUE_TOKEN => {
                inc(&self.metrics.tx_queue_event_count);
                self.clear_evt(TX_QUEUE);
                self.process_tx()
            }
            EV_QUEUE_TOKEN => {
                self.clear_evt(EV_QUEUE);
                self.process_event_queue()
            }
            BACKEND_TOKEN => self.backend_event(events),
            _ => Ok(0),
        };
        if let Err(err) = result {
            let counter = match token {
                RX_QUEUE_TOKEN | BACKEND_TOKEN => &self.metrics.rx_queue_event_fails,
                TX_QUEUE_TOKEN => &self.metrics.tx_queue_event_fails,
                _ => &self.metrics.ev_queue_event_fails,
            };
            inc(counter);
            self.fail(ops, &err);
        }
    }
}
