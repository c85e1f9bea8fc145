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
//!
//! Between two events the handler holds no chain: a transmitted packet's chain is used as soon
//! as the backend took the packet, a receive buffer popped when the backend had nothing after
//! all goes back to the available ring at once, and the event queue's buffers stay in the
//! available ring until there is an event to write. [`VsockHandler::save_queues`] needs to give
//! nothing back.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::VsockBackend;
use super::metrics::{VsockMetrics, add, inc};
use super::packet::{self, MAX_PKT_BUF_SIZE, PacketHeader};
use super::{EV_QUEUE, EVENT_TRANSPORT_RESET, Error, NUM_QUEUES, RX_QUEUE, Result, TX_QUEUE};
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::error::ErrorChain;
use crate::queue::{Queue, Rings};
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
    /// Whether the handler serves its queues as it starts, without waiting for the driver to
    /// notify them: what the driver made available before a snapshot was restored.
    serve_on_start: bool,
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

/// Raises the interrupt of queue `index`, which the device just used, if the driver wants one
/// (a failure is counted and logged).
fn signal_used<M: GuestMemory + ?Sized>(
    rings: &mut Rings<'_, '_, M>,
    interrupt: &dyn VirtioInterrupt,
    index: usize,
    metrics: &VsockMetrics,
) -> Result<()> {
    if rings.needs_notification().map_err(Error::Queue)? {
        if let Err(err) = interrupt.trigger(queue_interrupt(index)) {
            let counter = match index {
                RX_QUEUE => &metrics.rx_queue_event_fails,
                TX_QUEUE => &metrics.tx_queue_event_fails,
                _ => &metrics.ev_queue_event_fails,
            };
            inc(counter);
            log::error!("virtio-vsock cannot raise its interrupt: {err}");
        }
    }
    Ok(())
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
            serve_on_start: false,
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

    /// Makes the handler serve every queue as it starts ([`EventHandler::init`] notifies their
    /// eventfds), as though the driver had just notified them: how a restored device takes
    /// the packets the driver made available before the snapshot, since the notifications
    /// the driver sent then are gone.
    pub fn serve_available_on_start(&mut self) {
        self.serve_on_start = true;
    }

    /// The queues as the handler holds them now, for a snapshot. The handler holds no chain
    /// between events, so they are its own queues as they stand.
    pub fn save_queues(&self) -> Vec<Queue> {
        self.queues.to_vec()
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
        // The rings are looked up in guest memory once for the pass.
        let mut tx = tx.rings(mem);
        let result = loop {
            if served >= TX_BUDGET {
                if let Err(err) = self.queue_evts[TX_QUEUE].write(1) {
                    inc(&self.metrics.tx_queue_event_fails);
                    log::error!("Cannot wake the virtio-vsock handler for more packets: {err}");
                }
                break Ok(());
            }
            let chain = match tx.pop() {
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
                    log::debug!(
                        "virtio-vsock dropped a malformed packet: {}",
                        ErrorChain(&err)
                    );
                    if let Some(header) = header {
                        self.backend.reject(&header);
                    }
                }
            }
            if let Err(err) = tx.add_used(chain.head_index(), 0) {
                break Err(Error::Queue(err));
            }
            served = served.saturating_add(1);
        };
        if served > 0 {
            signal_used(&mut tx, &*self.interrupt, TX_QUEUE, &self.metrics)?;
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
        // The rings are looked up in guest memory once for the pass.
        let mut rx = rx.rings(mem);
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
            let chain = match rx.pop() {
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
                        let next_avail = rx.queue().next_avail().wrapping_sub(1);
                        rx.set_next_avail(next_avail);
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
                    log::debug!(
                        "virtio-vsock skipped a receive buffer: {}",
                        ErrorChain(&err)
                    );
                    0
                }
            };
            let used = u32::try_from(written).unwrap_or(0);
            if let Err(err) = rx.add_used(chain.head_index(), used) {
                break Err(Error::Queue(err));
            }
            served = served.saturating_add(1);
        };
        if served > 0 {
            signal_used(&mut rx, &*self.interrupt, RX_QUEUE, &self.metrics)?;
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
        let mut ev = ev.rings(mem);
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let result = loop {
            if !self.reset_pending || served >= usize::from(ev.queue().size()) {
                break Ok(());
            }
            let chain = match ev.pop() {
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
            if let Err(err) = ev.add_used(chain.head_index(), used) {
                break Err(Error::Queue(err));
            }
            served = served.saturating_add(1);
        };
        if served > 0 {
            signal_used(&mut ev, &*self.interrupt, EV_QUEUE, &self.metrics)?;
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
                return Ok(());
            }
        }
        if std::mem::take(&mut self.serve_on_start) {
            for (index, evt) in self.queue_evts.iter().enumerate() {
                if let Err(err) = evt.write(1) {
                    let counter = match index {
                        RX_QUEUE => &self.metrics.rx_queue_event_fails,
                        TX_QUEUE => &self.metrics.tx_queue_event_fails,
                        _ => &self.metrics.ev_queue_event_fails,
                    };
                    inc(counter);
                    log::error!("virtio-vsock cannot serve its queues as it starts: {err}");
                }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
    use crate::vsock::{
        CONN_SHUTDOWN_TIMEOUT, CONN_TX_BUF_SIZE, HDR_SIZE, MAX_PENDING_RESETS, OP_CREDIT_REQUEST,
        OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV,
        SHUTDOWN_SEND, TYPE_STREAM, VSOCK_HOST_CID, VsockUnixBackend,
    };

    type Mem = Arc<GuestMemoryMmap<()>>;

    const CID: u64 = 3;
    const MEM_SIZE: usize = 0x100_0000;
    const TX_BUFS: u64 = 0x20_0000;
    const TX_SLOT: u64 = 0x1_1000;
    const RX_BUFS: u64 = 0x80_0000;
    const RX_SLOT: u64 = 0x2000;
    const RX_BUF_LEN: u32 = 4096 + 44;
    const QSIZE: u16 = 256;

    /// A fresh directory for a test's sockets, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("ember-vsock-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The guest driver's side of the device, and the host's socket path.
    struct Guest {
        mem: Mem,
        rx: MockDriver,
        tx: MockDriver,
        ev: MockDriver,
        evts: [EventFd; NUM_QUEUES],
        irq: CountingTrigger,
        handler: VsockHandler<Mem, VsockUnixBackend>,
        rx_addrs: HashMap<u16, u64>,
        rx_slot: u64,
        rx_seen: u16,
        tx_slot: u64,
        path: PathBuf,
        _dir: TempDir,
    }

    fn header(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: 0,
        }
    }

    fn guest() -> Guest {
        let dir = TempDir::new();
        let path = dir.0.join("v.sock");
        let backend = VsockUnixBackend::new(CID, &path).unwrap();
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let rx = MockDriver::new(QSIZE, GuestAddress(0));
        let tx = MockDriver::new(QSIZE * 2, GuestAddress(0x1_0000));
        let ev = MockDriver::new(QSIZE, GuestAddress(0x2_0000));
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let evts = [evt(), evt(), evt()];
        let irq = CountingTrigger::default();
        let handler = VsockHandler::new(
            CID,
            backend,
            mem.clone(),
            [rx.queue(), tx.queue(), ev.queue()],
            [
                evts[0].try_clone().unwrap(),
                evts[1].try_clone().unwrap(),
                evts[2].try_clone().unwrap(),
            ],
            Arc::new(irq.clone()),
        );
        let metrics = handler.metrics().clone();
        let handler = VsockHandler {
            backend: handler.backend.with_metrics(metrics),
            ..handler
        };
        Guest {
            mem,
            rx,
            tx,
            ev,
            evts,
            irq,
            handler,
            rx_addrs: HashMap::new(),
            rx_slot: 0,
            rx_seen: 0,
            tx_slot: 0,
            path,
            _dir: dir,
        }
    }

    impl Guest {
        /// Hands the device receive buffers, so that it has `count` in all.
        fn give_rx(&mut self, count: usize) {
            let used = self.rx.used_idx(&*self.mem).unwrap();
            let outstanding = usize::from(self.rx.avail_idx().wrapping_sub(used));
            for _ in outstanding..count {
                let addr = RX_BUFS + (self.rx_slot % u64::from(QSIZE)) * RX_SLOT;
                self.rx_slot += 1;
                let head = self
                    .rx
                    .add_chain(&*self.mem, &[MockBuffer::writable(addr, RX_BUF_LEN)])
                    .unwrap();
                self.rx_addrs.insert(head, addr);
            }
        }

        /// Transmits a packet in one buffer, and lets the device take it.
        fn send(&mut self, header: PacketHeader, payload: &[u8]) {
            let mut header = header;
            header.len = u32::try_from(payload.len()).unwrap();
            let addr = self.write_tx(&header, payload);
            let len = u32::try_from(HDR_SIZE + payload.len()).unwrap();
            self.tx
                .add_chain(&*self.mem, &[MockBuffer::readable(addr, len)])
                .unwrap();
            self.handler.process_tx().unwrap();
        }

        fn write_tx(&mut self, header: &PacketHeader, payload: &[u8]) -> u64 {
            let addr = TX_BUFS + (self.tx_slot % 64) * TX_SLOT;
            self.tx_slot += 1;
            self.mem
                .write_slice(&header.to_bytes(), GuestAddress(addr))
                .unwrap();
            self.mem
                .write_slice(payload, GuestAddress(addr + 44))
                .unwrap();
            addr
        }

        /// Lets the backend handle its host sockets' events.
        fn pump(&mut self) {
            for _ in 0..4 {
                self.handler.backend_event(EventSet::IN).unwrap();
            }
        }

        /// The packets the device handed the guest since the last call.
        fn recv_all(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            let mut packets = Vec::new();
            let used = self.rx.used_idx(&*self.mem).unwrap();
            while self.rx_seen != used {
                let (head, len) = self.rx.used_elem(&*self.mem, self.rx_seen).unwrap();
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let addr = self.rx_addrs[&u16::try_from(head).unwrap()];
                let mut bytes = [0u8; HDR_SIZE];
                self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                let header = PacketHeader::from_bytes(&bytes);
                let mut payload = vec![0u8; header.len as usize];
                self.mem
                    .read_slice(&mut payload, GuestAddress(addr + 44))
                    .unwrap();
                assert_eq!(len as usize, HDR_SIZE + payload.len());
                packets.push((header, payload));
            }
            packets
        }

        /// Gives receive buffers, lets the device fill them and returns what it sent.
        fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            self.give_rx(16);
            self.pump();
            self.handler.process_rx().unwrap();
            self.recv_all()
        }

        /// A host process connects through the listener to the guest's `port`; returns its
        /// stream and the host port the device chose, once the guest accepted.
        fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
            let mut host = UnixStream::connect(&self.path).unwrap();
            host.write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            let packets = self.recv();
            let (request, _) = packets
                .iter()
                .find(|(h, _)| h.op == OP_REQUEST && h.dst_port == port)
                .expect("a connection request");
            assert_eq!(request.dst_cid, CID);
            assert_eq!(request.src_cid, VSOCK_HOST_CID);
            assert_eq!(request.buf_alloc, CONN_TX_BUF_SIZE);
            let local = request.src_port;
            assert!(local >= 1 << 30);
            self.send(header(OP_RESPONSE, port, local), &[]);
            let mut line = Vec::new();
            let mut byte = [0u8];
            while byte[0] != b'\n' {
                host.read_exact(&mut byte).unwrap();
                line.push(byte[0]);
            }
            assert_eq!(line, format!("OK {local}\n").as_bytes());
            (host, local)
        }

        /// A guest process connects to host `port` from `src_port`, where `listener` listens.
        fn guest_connect(
            &mut self,
            listener: &UnixListener,
            src_port: u32,
            port: u32,
        ) -> UnixStream {
            self.give_rx(16);
            self.send(header(OP_REQUEST, src_port, port), &[]);
            let packets = self.recv_all();
            assert_eq!(packets.len(), 1, "{packets:?}");
            assert_eq!(packets[0].0.op, OP_RESPONSE);
            assert_eq!(
                (packets[0].0.src_port, packets[0].0.dst_port),
                (port, src_port)
            );
            let (stream, _) = listener.accept().unwrap();
            stream
        }

        fn metric(&self, name: &str) -> u64 {
            self.handler.metrics().get(name).unwrap()
        }
    }

    fn read_some(stream: &mut UnixStream, len: usize) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn a_host_connection_handshakes_and_moves_data_both_ways() {
        let mut guest = guest();
        let (mut host, local) = guest.host_connect(52);
        guest.send(header(OP_RW, 52, local), b"ping");
        assert_eq!(read_some(&mut host, 4), b"ping");
        host.write_all(b"pong").unwrap();
        let packets = guest.recv();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let (hdr, payload) = &packets[0];
        assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RW, local, 52));
        assert_eq!(payload, b"pong");
        assert_eq!(guest.metric("conns_added"), 1);
        assert_eq!(guest.metric("tx_bytes_count"), 4);
        assert_eq!(guest.metric("rx_bytes_count"), 4);
        assert!(guest.irq.count() > 0);
    }

    #[test]
    fn a_bad_connect_line_closes_the_host_stream() {
        let mut guest = guest();
        for line in [&b"CONNECT x\n"[..], b"HELLO 52\n", &[b'9'; 40]] {
            let mut host = UnixStream::connect(&guest.path).unwrap();
            host.write_all(line).unwrap();
            guest.pump();
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 8];
            // Closed: its end, or a reset when it closed with bytes unread.
            match host.read(&mut buf) {
                Ok(read) => assert_eq!(read, 0),
                Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
            }
        }
        assert!(guest.recv().is_empty());
        assert_eq!(guest.handler.backend().connections(), 0);
    }

    #[test]
    fn a_guest_connection_reaches_the_listener_at_the_port_path() {
        let mut guest = guest();
        let listener = UnixListener::bind(format!("{}_1234", guest.path.display())).unwrap();
        let mut host = guest.guest_connect(&listener, 5000, 1234);
        guest.send(header(OP_RW, 5000, 1234), b"hello");
        assert_eq!(read_some(&mut host, 5), b"hello");
        host.write_all(b"world").unwrap();
        let packets = guest.recv();
        assert_eq!(packets[0].0.op, OP_RW);
        assert_eq!(packets[0].1, b"world");
    }

    #[test]
    fn a_guest_connection_nobody_listens_for_is_reset() {
        let mut guest = guest();
        guest.give_rx(4);
        guest.send(header(OP_REQUEST, 5000, 99), &[]);
        let packets = guest.recv_all();
        assert_eq!(packets.len(), 1);
        let (hdr, _) = &packets[0];
        assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RST, 99, 5000));
        assert_eq!((hdr.src_cid, hdr.dst_cid), (VSOCK_HOST_CID, CID));
        assert_eq!(guest.handler.backend().connections(), 0);
    }

    /// An honest guest sender: sends `data` on the connection within the credit it is told of.
    struct Sender {
        data: Vec<u8>,
        sent: usize,
        fwd_cnt: u32,
        buf_alloc: u32,
    }

    impl Sender {
        fn credit(&self) -> usize {
            let in_flight = (self.sent as u32).wrapping_sub(self.fwd_cnt);
            self.buf_alloc.saturating_sub(in_flight) as usize
        }

        /// Sends as much as the credit allows, and reads the device's packets; returns whether
        /// anything moved.
        fn step(&mut self, guest: &mut Guest, src: u32, dst: u32) -> bool {
            let mut moved = false;
            while self.sent < self.data.len() && self.credit() > 0 {
                let len = self
                    .credit()
                    .min(MAX_PKT_BUF_SIZE)
                    .min(self.data.len() - self.sent);
                let chunk = self.data[self.sent..self.sent + len].to_vec();
                guest.send(header(OP_RW, src, dst), &chunk);
                self.sent += len;
                moved = true;
            }
            for (hdr, _) in guest.recv() {
                assert_ne!(hdr.op, OP_RST, "the device reset an honest guest");
                self.fwd_cnt = hdr.fwd_cnt;
                self.buf_alloc = hdr.buf_alloc;
            }
            moved
        }
    }

    #[test]
    fn a_host_peer_that_stops_reading_holds_guest_data_within_credit_and_loses_none() {
        let mut guest = guest();
        let listener = UnixListener::bind(format!("{}_7", guest.path.display())).unwrap();
        let mut host = guest.guest_connect(&listener, 5000, 7);
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut sender = Sender {
            data: data.clone(),
            sent: 0,
            fwd_cnt: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
        };
        // The host does not read: the guest runs out of credit, and the device holds at most
        // the buffer it advertised.
        while sender.step(&mut guest, 5000, 7) {}
        assert!(sender.sent < data.len());
        let held = guest.handler.backend().buffered_bytes();
        assert!(held > 0 && held <= CONN_TX_BUF_SIZE as usize, "{held}");
        assert_eq!(guest.metric("tx_write_fails"), 0);
        // The host reads again: everything arrives, in order.
        host.set_nonblocking(true).unwrap();
        let mut received = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.len() < data.len() {
            assert!(Instant::now() < deadline, "stalled at {}", received.len());
            match host.read(&mut buf) {
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) => panic!("{err}"),
            }
            sender.step(&mut guest, 5000, 7);
        }
        assert!(received == data, "the host got other bytes");
        assert_eq!(guest.handler.backend().buffered_bytes(), 0);
    }

    #[test]
    fn a_guest_that_overruns_its_credit_is_reset() {
        let mut guest = guest();
        let listener = UnixListener::bind(format!("{}_7", guest.path.display())).unwrap();
        let _host = guest.guest_connect(&listener, 5000, 7);
        let chunk = vec![0x55u8; MAX_PKT_BUF_SIZE];
        guest.give_rx(64);
        let mut reset = false;
        // The host never reads; the guest ignores its credit.
        for _ in 0..256 {
            guest.send(header(OP_RW, 5000, 7), &chunk);
            if guest.recv_all().iter().any(|(h, _)| h.op == OP_RST) {
                reset = true;
                break;
            }
            assert!(guest.handler.backend().buffered_bytes() <= CONN_TX_BUF_SIZE as usize);
        }
        assert!(reset, "the device never reset the connection");
        assert_eq!(guest.handler.backend().connections(), 0);
        assert_eq!(guest.metric("conns_killed"), 1);
        assert_eq!(guest.metric("tx_write_fails"), 1);
    }

    #[test]
    fn host_data_goes_to_the_guest_within_its_credit() {
        let mut guest = guest();
        let (mut host, local) = guest.host_connect(52);
        // The guest says it has 1000 bytes of buffer, none consumed.
        let mut update = header(OP_CREDIT_UPDATE, 52, local);
        update.buf_alloc = 1000;
        guest.send(update, &[]);
        host.write_all(&[7u8; 5000]).unwrap();
        let packets = guest.recv();
        let data: usize = packets.iter().map(|(_, p)| p.len()).sum();
        assert_eq!(data, 1000, "{packets:?}");
        assert!(packets.iter().any(|(h, _)| h.op == OP_CREDIT_REQUEST));
        // Nothing more until the guest consumes.
        assert!(guest.recv().is_empty());
        update.fwd_cnt = 1000;
        guest.send(update, &[]);
        let data: usize = guest.recv().iter().map(|(_, p)| p.len()).sum();
        assert_eq!(data, 1000);
    }

    #[test]
    fn a_guest_shutdown_reaches_the_host_and_ends_with_a_reset() {
        let mut guest = guest();
        let (mut host, local) = guest.host_connect(52);
        guest.send(header(OP_RW, 52, local), b"last");
        let mut shutdown = header(OP_SHUTDOWN, 52, local);
        shutdown.flags = SHUTDOWN_SEND;
        guest.send(shutdown, &[]);
        // The host reads the data, then the end of the stream.
        let mut all = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last");
        // The host may still send.
        host.write_all(b"reply").unwrap();
        let packets = guest.recv();
        assert_eq!(packets[0].1, b"reply");
        // The guest shuts both halves: the device answers RST and closes the host stream.
        shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        guest.send(shutdown, &[]);
        let packets = guest.recv();
        assert!(packets.iter().any(|(h, _)| h.op == OP_RST), "{packets:?}");
        assert_eq!(guest.handler.backend().connections(), 0);
        assert_eq!(guest.metric("conns_killed"), 0);
        assert_eq!(guest.metric("conns_removed"), 1);
    }

    #[test]
    fn a_host_shutdown_reaches_the_guest() {
        let mut guest = guest();
        let (host, local) = guest.host_connect(52);
        // Half closed: the guest is told the host sends no more.
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let packets = guest.recv();
        let (hdr, _) = packets.iter().find(|(h, _)| h.op == OP_SHUTDOWN).unwrap();
        assert_eq!(hdr.flags, SHUTDOWN_SEND);
        // The guest may still send.
        guest.send(header(OP_RW, 52, local), b"still");
        // Closed: the guest is told to finish, and answers RST.
        drop(host);
        let packets = guest.recv();
        let (hdr, _) = packets.iter().find(|(h, _)| h.op == OP_SHUTDOWN).unwrap();
        assert_eq!(hdr.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
        guest.send(header(OP_RST, 52, local), &[]);
        assert_eq!(guest.handler.backend().connections(), 0);
        assert!(guest.recv().is_empty());
    }

    #[test]
    fn what_a_host_peer_wrote_before_it_closed_reaches_the_guest() {
        let mut guest = guest();
        let listener = UnixListener::bind(format!("{}_80", guest.path.display())).unwrap();
        // No receive buffers yet: the RESPONSE waits.
        guest.send(header(OP_REQUEST, 5000, 80), &[]);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(b"bye").unwrap();
        drop(host);
        guest.pump();
        let packets = guest.recv();
        let ops: Vec<u16> = packets.iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops, [OP_RESPONSE, OP_RW, OP_SHUTDOWN], "{packets:?}");
        assert_eq!(packets[1].1, b"bye");
        assert_eq!(packets[2].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    }

    #[test]
    fn a_shutdown_the_guest_never_completes_is_reset_after_the_timeout() {
        let mut guest = guest();
        let (host, _local) = guest.host_connect(52);
        drop(host);
        let packets = guest.recv();
        assert!(packets.iter().any(|(h, _)| h.op == OP_SHUTDOWN));
        assert_eq!(guest.handler.backend().connections(), 1);
        std::thread::sleep(CONN_SHUTDOWN_TIMEOUT + Duration::from_millis(100));
        let packets = guest.recv();
        assert!(packets.iter().any(|(h, _)| h.op == OP_RST), "{packets:?}");
        assert_eq!(guest.handler.backend().connections(), 0);
        assert_eq!(guest.metric("conns_killed"), 1);
    }

    #[test]
    fn a_guest_reset_closes_the_host_stream() {
        let mut guest = guest();
        let (mut host, local) = guest.host_connect(52);
        guest.send(header(OP_RST, 52, local), &[]);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        assert!(guest.recv().is_empty());
    }

    #[test]
    fn malicious_headers_are_dropped_or_reset() {
        let mut guest = guest();
        let (_host, local) = guest.host_connect(52);
        guest.give_rx(32);
        // Wrong source or destination CID: dropped, nothing goes back.
        let mut wrong = header(OP_RW, 52, local);
        wrong.src_cid = 4;
        guest.send(wrong, b"x");
        wrong = header(OP_RW, 52, local);
        wrong.dst_cid = 1;
        guest.send(wrong, b"x");
        assert!(guest.recv_all().is_empty());
        assert_eq!(guest.handler.backend().connections(), 1);
        // A packet for no connection: reset.
        guest.send(header(OP_RW, 53, local), b"x");
        let packets = guest.recv_all();
        assert_eq!(packets.len(), 1);
        assert_eq!((packets[0].0.op, packets[0].0.dst_port), (OP_RST, 53));
        // A RST for no connection: nothing.
        guest.send(header(OP_RST, 53, local), &[]);
        assert!(guest.recv_all().is_empty());
        // A chain too short for a header: dropped and counted.
        let fails = guest.metric("tx_queue_event_fails");
        guest
            .tx
            .add_chain(&*guest.mem, &[MockBuffer::readable(TX_BUFS, 20)])
            .unwrap();
        guest.handler.process_tx().unwrap();
        assert_eq!(guest.metric("tx_queue_event_fails"), fails + 1);
        assert!(guest.recv_all().is_empty());
        // A len past the chain on a live connection: it is reset.
        let mut long = header(OP_RW, 52, local);
        long.len = 1000;
        let addr = guest.write_tx(&long, &[0; 10]);
        guest
            .tx
            .add_chain(&*guest.mem, &[MockBuffer::readable(addr, 54)])
            .unwrap();
        guest.handler.process_tx().unwrap();
        let packets = guest.recv_all();
        assert_eq!(packets.len(), 1);
        assert_eq!((packets[0].0.op, packets[0].0.src_port), (OP_RST, local));
        assert_eq!(guest.handler.backend().connections(), 0);
        // A type other than stream: reset.
        let mut dgram = header(OP_REQUEST, 60, 61);
        dgram.type_ = 2;
        guest.send(dgram, &[]);
        assert_eq!(guest.recv_all()[0].0.op, OP_RST);
        // An unknown op on a live connection: reset.
        let (_host, local) = guest.host_connect(52);
        guest.send(header(99, 52, local), &[]);
        assert_eq!(guest.recv_all()[0].0.op, OP_RST);
    }

    #[test]
    fn a_receive_buffer_too_short_for_a_header_is_handed_back_empty() {
        let mut guest = guest();
        guest
            .rx
            .add_chain(&*guest.mem, &[MockBuffer::writable(RX_BUFS, 10)])
            .unwrap();
        // A reset for the guest, which waits for a buffer that holds it.
        guest.send(header(OP_RW, 70, 71), &[]);
        assert_eq!(guest.rx.used_elem(&*guest.mem, 0).unwrap().1, 0);
        assert_eq!(guest.metric("rx_queue_event_fails"), 1);
        assert!(guest.handler.backend().has_pending_rx());
        guest.rx_seen = 1;
        guest.give_rx(1);
        guest.handler.process_rx().unwrap();
        assert_eq!(guest.recv_all()[0].0.op, OP_RST);
    }

    #[test]
    fn one_call_takes_a_bounded_batch_and_pending_resets_are_capped() {
        let mut guest = guest();
        // No receive buffers: each packet for no connection queues a reset.
        for i in 0..300u32 {
            let hdr = header(OP_RW, 1000 + i, 2000);
            let addr = guest.write_tx(&hdr, &[]);
            guest
                .tx
                .add_chain(&*guest.mem, &[MockBuffer::readable(addr, 44)])
                .unwrap();
        }
        assert_eq!(guest.handler.process_tx().unwrap(), TX_BUDGET);
        assert_eq!(
            guest.evts[TX_QUEUE].read().unwrap(),
            1,
            "the handler comes back"
        );
        assert_eq!(guest.handler.process_tx().unwrap(), 300 - TX_BUDGET);
        guest.give_rx(usize::from(QSIZE));
        assert_eq!(guest.handler.process_rx().unwrap(), MAX_PENDING_RESETS);
        assert!(!guest.handler.backend().has_pending_rx());
    }

    /// A backend that always has a packet for the guest.
    #[derive(Debug)]
    struct Chatty(EventFd);

    impl AsRawFd for Chatty {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }

    impl VsockBackend for Chatty {
        fn send_pkt(&mut self, _header: &PacketHeader, _payload: &[u8]) {}
        fn reject(&mut self, _header: &PacketHeader) {}
        fn recv_pkt(&mut self, header: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
            *header = PacketHeader {
                op: OP_RW,
                ..PacketHeader::default()
            };
            payload.fill(1);
            Some(payload.len())
        }
        fn has_pending_rx(&self) -> bool {
            true
        }
        fn notify(&mut self, _events: EventSet) {}
        fn reset(&mut self) {}
    }

    #[test]
    fn a_backend_that_never_runs_dry_gets_a_bounded_batch() {
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let mut rx = MockDriver::new(QSIZE * 2, GuestAddress(0));
        let tx = MockDriver::new(QSIZE, GuestAddress(0x2_0000));
        let ev = MockDriver::new(QSIZE, GuestAddress(0x3_0000));
        let rx_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut handler = VsockHandler::new(
            CID,
            Chatty(evt()),
            mem.clone(),
            [rx.queue(), tx.queue(), ev.queue()],
            [rx_evt.try_clone().unwrap(), evt(), evt()],
            Arc::new(CountingTrigger::default()),
        );
        for _ in 0..300 {
            rx.add_chain(&*mem, &[MockBuffer::writable(RX_BUFS, 100)])
                .unwrap();
        }
        assert_eq!(handler.process_rx().unwrap(), RX_BUDGET);
        assert_eq!(rx_evt.read().unwrap(), 1);
        assert_eq!(rx.used_elem(&*mem, 0).unwrap().1, 100);
        assert_eq!(handler.metrics().get("rx_bytes_count"), Some(256 * 56));
    }

    #[test]
    fn a_transport_reset_waits_for_an_event_buffer() {
        let mut guest = guest();
        assert_eq!(guest.handler.send_transport_reset().unwrap(), 0);
        assert!(guest.handler.is_reset_pending());
        let mem = guest.mem.clone();
        // Too short for the event: handed back empty, and the event still waits.
        guest
            .ev
            .add_chain(&*mem, &[MockBuffer::writable(0x3_0000, 2)])
            .unwrap();
        assert_eq!(guest.handler.process_event_queue().unwrap(), 1);
        assert_eq!(guest.ev.used_elem(&*mem, 0).unwrap().1, 0);
        assert!(guest.handler.is_reset_pending());
        mem.write_slice(&[0xff; 4], GuestAddress(0x3_1000)).unwrap();
        guest
            .ev
            .add_chain(&*mem, &[MockBuffer::writable(0x3_1000, 8)])
            .unwrap();
        assert_eq!(guest.handler.process_event_queue().unwrap(), 1);
        assert_eq!(guest.ev.used_elem(&*mem, 1).unwrap().1, 4);
        let event: u32 = mem.read_obj(GuestAddress(0x3_1000)).unwrap();
        assert_eq!(event, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
        assert!(!guest.handler.is_reset_pending());
        // Sent once.
        guest
            .ev
            .add_chain(&*mem, &[MockBuffer::writable(0x3_2000, 8)])
            .unwrap();
        assert_eq!(guest.handler.process_event_queue().unwrap(), 0);
    }

    #[test]
    fn many_connections_at_once_each_keep_their_own_bytes() {
        let mut guest = guest();
        let mut hosts: Vec<(UnixStream, u32, u32)> = Vec::new();
        for i in 0..100u32 {
            let mut host = UnixStream::connect(&guest.path).unwrap();
            host.write_all(format!("CONNECT {}\n", 100 + i).as_bytes())
                .unwrap();
            hosts.push((host, 100 + i, 0));
        }
        let mut requests = Vec::new();
        for _ in 0..20 {
            requests.extend(guest.recv().into_iter().filter(|(h, _)| h.op == OP_REQUEST));
            if requests.len() == hosts.len() {
                break;
            }
        }
        assert_eq!(requests.len(), 100);
        assert_eq!(guest.handler.backend().connections(), 100);
        for (hdr, _) in &requests {
            guest.send(header(OP_RESPONSE, hdr.dst_port, hdr.src_port), &[]);
            let host = hosts.iter_mut().find(|h| h.1 == hdr.dst_port).unwrap();
            host.2 = hdr.src_port;
        }
        for (host, port, local) in &mut hosts {
            let line = format!("OK {local}\n");
            assert_eq!(read_some(host, line.len()), line.as_bytes());
            host.write_all(format!("from {port}").as_bytes()).unwrap();
            guest.send(
                header(OP_RW, *port, *local),
                format!("to {port}").as_bytes(),
            );
        }
        let mut got = 0;
        for _ in 0..20 {
            for (hdr, payload) in guest.recv() {
                assert_eq!(hdr.op, OP_RW);
                assert_eq!(payload, format!("from {}", hdr.dst_port).as_bytes());
                got += 1;
            }
            if got == 100 {
                break;
            }
        }
        assert_eq!(got, 100);
        for (host, port, _) in &mut hosts {
            let want = format!("to {port}");
            assert_eq!(read_some(host, want.len()), want.as_bytes());
        }
        assert_eq!(guest.metric("conns_added"), 100);
    }

    #[test]
    fn one_backend_event_takes_a_bounded_number_of_new_host_connections() {
        let mut guest = guest();
        let hosts: Vec<UnixStream> = (0..100)
            .map(|_| {
                let mut host = UnixStream::connect(&guest.path).unwrap();
                host.write_all(b"CONNECT 52\n").unwrap();
                host
            })
            .collect();
        guest.handler.backend_event(EventSet::IN).unwrap();
        assert_eq!(guest.handler.backend().connections(), 32);
        for _ in 0..10 {
            guest.handler.backend_event(EventSet::IN).unwrap();
        }
        assert_eq!(guest.handler.backend().connections(), hosts.len());
        assert_eq!(guest.metric("conns_added"), 100);
    }

    #[test]
    fn a_reset_backend_drops_every_connection_and_keeps_listening() {
        let mut guest = guest();
        let (mut host, _) = guest.host_connect(52);
        guest.handler.backend_mut().reset();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        assert_eq!(guest.handler.backend().connections(), 0);
        let (_host, _) = guest.host_connect(53);
    }

    /// An interrupt that records what it was asked to tell the driver, and fails when told to.
    #[derive(Clone, Debug, Default)]
    struct Recorder {
        kinds: Arc<std::sync::Mutex<Vec<VirtioInterruptType>>>,
        fail: bool,
    }

    impl Recorder {
        fn kinds(&self) -> Vec<VirtioInterruptType> {
            self.kinds.lock().unwrap().clone()
        }
    }

    impl VirtioInterrupt for Recorder {
        fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
            self.kinds.lock().unwrap().push(kind);
            if self.fail {
                Err(io::Error::other("the interrupt is gone"))
            } else {
                Ok(())
            }
        }
    }

    type TestWorker = crate::worker::Worker<VsockHandler<Mem, VsockUnixBackend>>;

    /// Runs the guest's handler on a worker thread, with `recorder` as its interrupt.
    fn on_worker(
        guest: &mut Guest,
        recorder: &Recorder,
    ) -> (TestWorker, crate::worker::WorkerGate) {
        let placeholder = {
            let backend = VsockUnixBackend::new(CID, guest._dir.0.join("spare.sock")).unwrap();
            let q = || MockDriver::new(QSIZE, GuestAddress(0x3_0000)).queue();
            let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
            VsockHandler::new(
                CID,
                backend,
                guest.mem.clone(),
                [q(), q(), q()],
                [evt(), evt(), evt()],
                Arc::new(CountingTrigger::default()),
            )
        };
        let mut handler = std::mem::replace(&mut guest.handler, placeholder);
        handler.interrupt = Arc::new(recorder.clone());
        let gate = crate::worker::WorkerGate::new();
        let worker = crate::worker::Worker::spawn("test-vsock".into(), handler, &gate).unwrap();
        (worker, gate)
    }

    /// Whether `ops` still watches `fd`: removing it again fails once it was removed.
    fn still_watched(ops: &mut EventOps<'_>, fd: std::os::fd::RawFd) -> bool {
        let watched = ops.remove(fd).is_ok();
        if watched {
            ops.add(fd, EventSet::IN, 99).unwrap();
        }
        watched
    }

    #[test]
    fn a_tx_avail_index_past_the_ring_breaks_the_handler_until_reset() {
        let mut guest = guest();
        let metrics = guest.handler.metrics().clone();
        let recorder = Recorder::default();
        // The transmit ring holds 512: an avail index 513 ahead is a broken driver.
        guest.tx.set_avail_idx(&*guest.mem, QSIZE * 2 + 1).unwrap();
        let (worker, _gate) = on_worker(&mut guest, &recorder);
        let broken = worker
            .call(|h, ops| {
                assert!(!h.is_broken());
                h.handle_event(ops, TX_QUEUE_TOKEN, EventSet::IN);
                let fds = [
                    h.queue_evts[0].as_raw_fd(),
                    h.queue_evts[1].as_raw_fd(),
                    h.queue_evts[2].as_raw_fd(),
                    h.backend.as_raw_fd(),
                ];
                let watched: Vec<bool> = fds.iter().map(|&fd| still_watched(ops, fd)).collect();
                (h.is_broken(), watched)
            })
            .unwrap();
        assert_eq!(
            broken,
            (true, vec![false; 4]),
            "broken and watching nothing"
        );
        assert_eq!(metrics.get("tx_queue_event_count"), Some(1));
        assert_eq!(metrics.get("tx_queue_event_fails"), Some(1));
        assert_eq!(recorder.kinds(), [VirtioInterruptType::NeedsReset]);
        // Broken, it serves nothing, whatever the driver does, until the device is reset.
        let served = worker
            .call(|h, ops| {
                h.queue_transport_reset();
                for token in [
                    RX_QUEUE_TOKEN,
                    TX_QUEUE_TOKEN,
                    EV_QUEUE_TOKEN,
                    BACKEND_TOKEN,
                ] {
                    h.handle_event(ops, token, EventSet::IN);
                }
                (
                    h.process_tx().unwrap(),
                    h.process_rx().unwrap(),
                    h.process_event_queue().unwrap(),
                )
            })
            .unwrap();
        assert_eq!(served, (0, 0, 0));
        assert_eq!(metrics.get("tx_queue_event_count"), Some(1));
        assert_eq!(metrics.get("rx_queue_event_count"), Some(0));
        assert_eq!(metrics.get("tx_queue_event_fails"), Some(1));
        assert_eq!(recorder.kinds(), [VirtioInterruptType::NeedsReset]);
        let handler = worker.stop().unwrap();
        assert!(handler.is_broken());
    }

    #[test]
    fn an_rx_avail_index_past_the_ring_breaks_the_handler_from_a_queue_or_backend_event() {
        for token in [RX_QUEUE_TOKEN, BACKEND_TOKEN] {
            let mut guest = guest();
            let metrics = guest.handler.metrics().clone();
            let recorder = Recorder::default();
            // A packet for no connection: a reset waits for a receive buffer.
            guest.send(header(OP_RW, 70, 71), &[]);
            assert!(guest.handler.backend().has_pending_rx());
            guest.rx.set_avail_idx(&*guest.mem, QSIZE + 1).unwrap();
            let (worker, _gate) = on_worker(&mut guest, &recorder);
            let broken = worker
                .call(move |h, ops| {
                    h.handle_event(ops, token, EventSet::IN);
                    h.is_broken()
                })
                .unwrap();
            assert!(broken, "token {token}");
            assert_eq!(
                metrics.get("rx_queue_event_fails"),
                Some(1),
                "token {token}"
            );
            assert_eq!(
                metrics.get("tx_queue_event_fails"),
                Some(0),
                "token {token}"
            );
            let queue_events = u64::from(token == RX_QUEUE_TOKEN);
            assert_eq!(metrics.get("rx_queue_event_count"), Some(queue_events));
            assert_eq!(recorder.kinds(), [VirtioInterruptType::NeedsReset]);
            assert_eq!(guest.rx.used_idx(&*guest.mem).unwrap(), 0);
            worker.stop().unwrap();
        }
    }

    #[test]
    fn an_event_avail_index_past_the_ring_breaks_the_handler() {
        let mut guest = guest();
        let metrics = guest.handler.metrics().clone();
        let recorder = Recorder::default();
        guest.ev.set_avail_idx(&*guest.mem, QSIZE + 1).unwrap();
        let (worker, _gate) = on_worker(&mut guest, &recorder);
        let (before, after) = worker
            .call(|h, ops| {
                // Nothing to send: the ring is not read.
                h.handle_event(ops, EV_QUEUE_TOKEN, EventSet::IN);
                let before = h.is_broken();
                h.queue_transport_reset();
                h.handle_event(ops, EV_QUEUE_TOKEN, EventSet::IN);
                (before, h.is_broken())
            })
            .unwrap();
        assert_eq!((before, after), (false, true));
        assert_eq!(metrics.get("ev_queue_event_fails"), Some(1));
        assert_eq!(recorder.kinds(), [VirtioInterruptType::NeedsReset]);
        worker.stop().unwrap();
    }

    #[test]
    fn a_reset_queued_before_the_worker_starts_is_sent_or_breaks_the_handler_at_init() {
        // A buffer is there: the event goes as the worker starts.
        let mut guest = guest();
        guest.handler.queue_transport_reset();
        guest
            .ev
            .add_chain(&*guest.mem, &[MockBuffer::writable(0x3_1000, 8)])
            .unwrap();
        let recorder = Recorder::default();
        let (worker, _gate) = on_worker(&mut guest, &recorder);
        let state = worker
            .call(|h, _| (h.is_reset_pending(), h.is_broken()))
            .unwrap();
        assert_eq!(state, (false, false));
        assert_eq!(guest.ev.used_elem(&*guest.mem, 0).unwrap().1, 4);
        assert_eq!(recorder.kinds(), [VirtioInterruptType::Queue(2)]);
        worker.stop().unwrap();
        // The event ring is broken: the handler stops serving and asks for a reset.
        let mut guest = self::guest();
        guest.handler.queue_transport_reset();
        guest.ev.set_avail_idx(&*guest.mem, QSIZE + 1).unwrap();
        let recorder = Recorder::default();
        let (worker, _gate) = on_worker(&mut guest, &recorder);
        let (broken, watched) = worker
            .call(|h, ops| {
                let fd = h.queue_evts[TX_QUEUE].as_raw_fd();
                (h.is_broken(), still_watched(ops, fd))
            })
            .unwrap();
        assert!(broken);
        assert!(!watched, "a broken handler waits on nothing");
        assert_eq!(recorder.kinds(), [VirtioInterruptType::NeedsReset]);
        worker.stop().unwrap();
    }

    #[test]
    fn queue_events_are_served_and_unknown_tokens_ignored() {
        let mut guest = guest();
        let metrics = guest.handler.metrics().clone();
        guest.give_rx(4);
        let hdr = header(OP_RW, 70, 71);
        let addr = guest.write_tx(&hdr, &[]);
        guest
            .tx
            .add_chain(&*guest.mem, &[MockBuffer::readable(addr, 44)])
            .unwrap();
        guest.evts[TX_QUEUE].write(1).unwrap();
        let recorder = Recorder::default();
        let (worker, _gate) = on_worker(&mut guest, &recorder);
        // The worker reads the notification and takes the packet; its reset goes back.
        let deadline = Instant::now() + Duration::from_secs(5);
        while guest.rx.used_idx(&*guest.mem).unwrap() == 0 {
            assert!(Instant::now() < deadline, "the notification was not served");
            std::thread::sleep(Duration::from_millis(1));
        }
        let broken = worker
            .call(|h, ops| {
                h.handle_event(ops, 99, EventSet::IN);
                // Served with its eventfd clear: nothing more, nothing counted as failed.
                h.handle_event(ops, RX_QUEUE_TOKEN, EventSet::IN);
                h.handle_event(ops, EV_QUEUE_TOKEN, EventSet::IN);
                h.is_broken()
            })
            .unwrap();
        assert!(!broken);
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);
        assert_eq!(guest.recv_all()[0].0.op, OP_RST);
        assert_eq!(metrics.get("tx_queue_event_count"), Some(1));
        assert_eq!(metrics.get("rx_queue_event_count"), Some(1));
        for name in [
            "tx_queue_event_fails",
            "rx_queue_event_fails",
            "ev_queue_event_fails",
        ] {
            assert_eq!(metrics.get(name), Some(0), "{name}");
        }
        worker.stop().unwrap();
    }

    #[test]
    fn an_interrupt_that_cannot_be_raised_is_counted_per_queue_and_serving_goes_on() {
        let mut guest = guest();
        let recorder = Recorder {
            fail: true,
            ..Recorder::default()
        };
        guest.handler.interrupt = Arc::new(recorder.clone());
        guest.give_rx(4);
        // The packet is taken, its reset handed back: each queue counts its lost interrupt.
        guest.send(header(OP_RW, 70, 71), &[]);
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);
        assert_eq!(guest.recv_all()[0].0.op, OP_RST);
        assert_eq!(guest.metric("tx_queue_event_fails"), 1);
        assert_eq!(guest.metric("rx_queue_event_fails"), 1);
        guest
            .ev
            .add_chain(&*guest.mem, &[MockBuffer::writable(0x3_1000, 8)])
            .unwrap();
        assert_eq!(guest.handler.send_transport_reset().unwrap(), 1);
        assert!(!guest.handler.is_reset_pending());
        assert_eq!(guest.metric("ev_queue_event_fails"), 1);
        assert_eq!(
            recorder.kinds(),
            [
                VirtioInterruptType::Queue(1),
                VirtioInterruptType::Queue(0),
                VirtioInterruptType::Queue(2)
            ]
        );
        assert!(!guest.handler.is_broken());
        // It goes on: the next packet is taken too.
        guest.send(header(OP_RW, 72, 73), &[]);
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 2);
    }

    #[test]
    fn a_full_tx_eventfd_is_counted_when_the_budget_runs_out() {
        let mut guest = guest();
        // The eventfd's counter at its most: one more does not fit.
        guest.evts[TX_QUEUE].write(u64::MAX - 1).unwrap();
        for i in 0..300u32 {
            let hdr = header(OP_RW, 1000 + i, 2000);
            let addr = guest.write_tx(&hdr, &[]);
            guest
                .tx
                .add_chain(&*guest.mem, &[MockBuffer::readable(addr, 44)])
                .unwrap();
        }
        assert_eq!(guest.handler.process_tx().unwrap(), TX_BUDGET);
        assert_eq!(guest.metric("tx_queue_event_fails"), 1);
        assert_eq!(guest.evts[TX_QUEUE].read().unwrap(), u64::MAX - 1);
        // The rest waits for the next call.
        assert_eq!(guest.handler.process_tx().unwrap(), 300 - TX_BUDGET);
    }

    #[test]
    fn a_full_rx_eventfd_is_counted_when_the_budget_runs_out() {
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let mut rx = MockDriver::new(QSIZE * 2, GuestAddress(0));
        let tx = MockDriver::new(QSIZE, GuestAddress(0x2_0000));
        let ev = MockDriver::new(QSIZE, GuestAddress(0x3_0000));
        let rx_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        rx_evt.write(u64::MAX - 1).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut handler = VsockHandler::new(
            CID,
            Chatty(evt()),
            mem.clone(),
            [rx.queue(), tx.queue(), ev.queue()],
            [rx_evt.try_clone().unwrap(), evt(), evt()],
            Arc::new(CountingTrigger::default()),
        );
        for _ in 0..300 {
            rx.add_chain(&*mem, &[MockBuffer::writable(RX_BUFS, 100)])
                .unwrap();
        }
        assert_eq!(handler.process_rx().unwrap(), RX_BUDGET);
        assert_eq!(handler.metrics().get("rx_queue_event_fails"), Some(1));
        assert_eq!(rx.used_idx(&*mem).unwrap(), 256);
        assert_eq!(handler.process_rx().unwrap(), 300 - RX_BUDGET);
    }

    #[test]
    fn the_debug_form_names_the_cid_and_state() {
        let mut guest = guest();
        guest.handler.queue_transport_reset();
        let text = format!("{:?}", guest.handler);
        assert!(text.starts_with("VsockHandler"), "{text}");
        assert!(text.contains("guest_cid: 3"), "{text}");
        assert!(text.contains("reset_pending: true"), "{text}");
        assert!(text.contains("broken: false"), "{text}");
        assert!(!text.contains("buf"), "the packet buffer stays out: {text}");
    }
}
