//! The network device as its transport sees it: [`Net`], its features and configuration space,
//! its lifecycle ([`VirtioDevice`]: activation hands the queues to a [`NetHandler`], reset takes
//! the backend back), the run-time change of its rate limiters ([`PendingUpdate`]), and the type
//! erasure of the active handler over the guest memory type (`Running`).

use std::fmt;
use std::io;
use std::sync::Arc;

use ember_rate_limiter::{BucketUpdate, RateLimiter, RateLimiterState};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use vm_memory::GuestAddressSpace;

use super::backend::NetBackend;
use super::handler::NetHandler;
use super::mac::{self, MacAddr};
use super::metrics::{self, NetMetrics};
use super::{
    BASE_FEATURES, Error, NUM_QUEUES, NetRateLimiters, QUEUE_SIZES, Result, offload_flags,
};

use crate::device::{ActivateError, ActivateParams, StateError, VirtioDevice, read_config_bytes};
use crate::queue::Queue;
use crate::worker::{Reply, Runner};

/// A handler serving a device, whatever its guest memory type and wherever it runs, that gives
/// the backend back when stopped.
trait Running<B>: Send {
    fn stop(self: Box<Self>) -> io::Result<(B, NetRateLimiters)>;

    /// The queues as a snapshot records them ([`NetHandler::saved_queues`]), from the
    /// handler's thread.
    fn save_queues(&self) -> io::Result<Vec<Queue>>;

    /// The receive and transmit rate limiters' states, from the handler's thread.
    fn rate_limiter_states(&self) -> io::Result<[RateLimiterState; 2]>;

    /// Has the handler's thread restore the receive and transmit rate limiters, both or
    /// neither.
    fn restore_rate_limiters(
        &self,
        states: [RateLimiterState; 2],
    ) -> io::Result<ember_rate_limiter::Result<()>>;

    /// Changes the rate limiters on the handler's thread: receive bandwidth and operations, then
    /// transmit bandwidth and operations.
    fn update_rate_limiters(&self, updates: [BucketUpdate; 4]) -> io::Result<Reply<()>>;
}

impl<M, B> Running<B> for Runner<NetHandler<M, B>>
where
    M: GuestAddressSpace + Send + 'static,
    B: NetBackend,
{
    fn stop(self: Box<Self>) -> io::Result<(B, NetRateLimiters)> {
        Runner::stop(*self).map(NetHandler::into_parts)
    }

    fn save_queues(&self) -> io::Result<Vec<Queue>> {
        self.call(|handler, _| handler.saved_queues())
    }

    fn rate_limiter_states(&self) -> io::Result<[RateLimiterState; 2]> {
        self.call(|handler, _| handler.rate_limiters().states())
    }

    fn restore_rate_limiters(
        &self,
        states: [RateLimiterState; 2],
    ) -> io::Result<ember_rate_limiter::Result<()>> {
        self.call(move |handler, _| handler.rate_limiters_mut().restore(&states))
    }

    fn update_rate_limiters(&self, updates: [BucketUpdate; 4]) -> io::Result<Reply<()>> {
        self.post(move |handler, _| {
            let [rx_bandwidth, rx_ops, tx_bandwidth, tx_ops] = updates;
            handler.update_rate_limiters(rx_bandwidth, rx_ops, tx_bandwidth, tx_ops);
        })
    }
}

#[allow(
    clippy::large_enum_variant,
    reason = "a device has one state, which moves only when the device is activated or reset"
)]
enum State<B> {
    /// Reset: the device holds the backend and the rate limiters.
    Ready {
        backend: B,
        rate_limiters: NetRateLimiters,
    },
    /// Active: the worker holds them.
    Active(Box<dyn Running<B>>),
    /// The backend went with a worker that could not start or stop.
    Lost,
}

/// A virtio-net device.
pub struct Net<B = crate::tap::Tap> {
    mac: Option<MacAddr>,
    features: u64,
    state: State<B>,
    metrics: Arc<NetMetrics>,
}

impl<B> fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Ready { .. } => "ready",
            State::Active(_) => "active",
            State::Lost => "backend lost",
        };
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("features", &format_args!("{:#x}", self.features))
            .field("state", &state)
            .finish()
    }
}

impl<B: NetBackend> Net<B> {
    /// A device whose frames go to and come from `backend`, which must be non-blocking. With a
    /// `mac`, the device offers VIRTIO_NET_F_MAC and the driver uses that address; without one,
    /// the driver makes one up. Nothing limits its rate (see [`Net::with_rate_limiters`]).
    ///
    /// # Panics
    ///
    /// As [`RateLimiter::default`], when the process is out of file descriptors for the
    /// limiters' timerfds.
    pub fn new(backend: B, mac: Option<MacAddr>) -> Self {
        let mut features = BASE_FEATURES;
        if mac.is_some() {
            features |= 1 << VIRTIO_NET_F_MAC;
        }
        Net {
            mac,
            features,
            state: State::Ready {
                backend,
                rate_limiters: NetRateLimiters::default(),
            },
            metrics: Arc::default(),
        }
    }

    /// The device, with what it receives going through `rx` and what it transmits through
    /// `tx`: meant right after [`Net::new`], before the device is attached. On an active
    /// device, whose limiters are with its worker, the limiters given are dropped and the
    /// change is logged; use [`Net::update_rate_limiters`] there.
    pub fn with_rate_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Self {
        match &mut self.state {
            State::Ready { rate_limiters, .. } => *rate_limiters = NetRateLimiters { rx, tx },
            State::Active(_) | State::Lost => log::warn!(
                "virtio-net ignored new rate limiters given while it is active or lost its \
                 backend"
            ),
        }
        self
    }

    /// Changes the buckets of the receive and transmit rate limiters; a bucket given
    /// [`BucketUpdate::None`] keeps its state (tokens, debt and burst). On an active device the
    /// change is made on the handler's thread, between two events, and a direction held back under
    /// the old limits is retried at once under the new ones; otherwise it is kept for the next
    /// activation.
    ///
    /// It never waits for the worker: the caller waits on the [`PendingUpdate`] it returns,
    /// after it released whatever lock it holds the device under (the transport, which vCPUs
    /// take).
    ///
    /// # Errors
    ///
    /// [`Error::Worker`] when the thread that serves it is gone, [`Error::Lost`] when the device lost
    /// its rate limiters with a worker that could not start or stop.
    pub fn update_rate_limiters(
        &mut self,
        rx_bandwidth: BucketUpdate,
        rx_ops: BucketUpdate,
        tx_bandwidth: BucketUpdate,
        tx_ops: BucketUpdate,
    ) -> Result<PendingUpdate> {
        match &mut self.state {
            State::Ready { rate_limiters, .. } => {
                rate_limiters.rx.update_buckets(rx_bandwidth, rx_ops);
                rate_limiters.tx.update_buckets(tx_bandwidth, tx_ops);
                Ok(PendingUpdate(None))
            }
            State::Active(worker) => worker
                .update_rate_limiters([rx_bandwidth, rx_ops, tx_bandwidth, tx_ops])
                .map(|reply| PendingUpdate(Some(reply)))
                .map_err(Error::Worker),
            State::Lost => Err(Error::Lost),
        }
    }

    /// The device's counters, which its worker updates while it runs.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The MAC address the device gives the driver, if any.
    pub fn mac(&self) -> Option<MacAddr> {
        self.mac
    }

    /// Whether the device is serving its queues.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    /// The configuration space: the MAC address (zeros without one).
    fn config(&self) -> [u8; mac::MAC_LEN] {
        self.mac.map(|mac| mac.bytes()).unwrap_or_default()
    }
}

/// The saved state of a [`Net`] device, beside its transport's: its MAC address and its rate
/// limiters' buckets. The backend is not part of it: a restored device takes the TAP (or
/// other backend) the new process gives it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct NetState {
    /// The MAC address the device gave the driver, if any.
    pub mac: Option<[u8; mac::MAC_LEN]>,
    /// The buckets of the receive rate limiter.
    pub rx_rate_limiter: RateLimiterState,
    /// The buckets of the transmit rate limiter.
    pub tx_rate_limiter: RateLimiterState,
}

impl<B: NetBackend> Net<B> {
    /// The device's state, for a snapshot: the MAC address and the rate limiters' buckets,
    /// from the handler's thread when the device is active. The queues are saved with the
    /// transport ([`VirtioDevice::save_queues`]).
    ///
    /// # Errors
    ///
    /// [`StateError::Handler`] when the handler does not answer, or the device lost its rate
    /// limiters.
    pub fn save_state(&self) -> std::result::Result<NetState, StateError> {
        let [rx, tx] = match &self.state {
            State::Ready { rate_limiters, .. } => rate_limiters.states(),
            State::Active(worker) => worker.rate_limiter_states().map_err(StateError::Handler)?,
            State::Lost => return Err(lost_handler()),
        };
        Ok(NetState {
            mac: self.mac.map(|mac| mac.bytes()),
            rx_rate_limiter: rx,
            tx_rate_limiter: tx,
        })
    }

    /// Restores `state` on a device built afresh from the snapshot's configuration (on the
    /// same or another backend), before its transport is restored (which activates it): the
    /// rate limiters' buckets are the saved ones. The MAC address must be the saved one, which
    /// the driver keeps using.
    ///
    /// # Errors
    ///
    /// [`StateError::Invalid`] for another MAC address, [`StateError::RateLimiter`] when the
    /// saved buckets are invalid (nothing changes then), [`StateError::Handler`] as in
    /// [`Net::save_state`].
    pub fn restore_state(&mut self, state: &NetState) -> std::result::Result<(), StateError> {
        let mac = self.mac.map(|mac| mac.bytes());
        if state.mac != mac {
            let show = |mac: Option<[u8; mac::MAC_LEN]>| {
                mac.and_then(|bytes| MacAddr::from_bytes(bytes).ok())
                    .map_or_else(|| "none".to_string(), |mac| mac.to_string())
            };
            return Err(StateError::Invalid(format!(
                "the network device's MAC address is {}, and was {} when the snapshot was taken",
                show(mac),
                show(state.mac)
            )));
        }
        let states = [state.rx_rate_limiter.clone(), state.tx_rate_limiter.clone()];
        let restored = match &mut self.state {
            State::Ready { rate_limiters, .. } => rate_limiters.restore(&states),
            State::Active(worker) => worker
                .restore_rate_limiters(states)
                .map_err(StateError::Handler)?,
            State::Lost => return Err(lost_handler()),
        };
        restored.map_err(StateError::RateLimiter)
    }
}

/// The error of a device that lost its handler.
fn lost_handler() -> StateError {
    StateError::Handler(io::Error::other("virtio-net lost its handler"))
}

/// A change handed to the thread that serves a network device ([`Net::update_rate_limiters`]), to
/// wait for once the device's lock is released.
#[derive(Debug)]
#[must_use = "the change may still be under way, and may fail"]
pub struct PendingUpdate(Option<Reply<()>>);

impl PendingUpdate {
    /// Waits until the worker made the change. The change is made whether or not this is
    /// called.
    ///
    /// # Errors
    ///
    /// [`Error::Worker`] when the worker thread ended before it made the change.
    pub fn wait(self) -> Result<()> {
        self.0
            .map_or(Ok(()), |reply| reply.wait().map_err(Error::Worker))
    }
}

impl<M, B> VirtioDevice<M> for Net<B>
where
    M: GuestAddressSpace + Send + 'static,
    B: NetBackend,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let inside = usize::try_from(offset)
            .ok()
            .and_then(|start| start.checked_add(data.len()))
            .is_some_and(|end| end <= mac::MAC_LEN);
        if !inside {
            metrics::inc(&self.metrics.cfg_fails);
        }
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC address is read-only for a VERSION_1 driver.
        metrics::inc(&self.metrics.cfg_fails);
        log::debug!(
            "virtio-net ignored a {}-byte configuration write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams<M>) -> std::result::Result<(), ActivateError> {
        let result = self.start_worker(params);
        if result.is_err() {
            metrics::inc(&self.metrics.activate_fails);
        }
        result
    }

    fn reset(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Lost) {
            State::Active(worker) => match worker.stop() {
                Ok((backend, rate_limiters)) => State::Ready {
                    backend,
                    rate_limiters,
                },
                Err(err) => {
                    log::error!(
                        "virtio-net lost its backend when its worker stopped, so it cannot be \
                         activated again: {err}"
                    );
                    State::Lost
                }
            },
            state => state,
        };
    }

    /// The queues as the handler holds them, a transmit chain held back given back.
    fn save_queues(&self) -> std::result::Result<Vec<Queue>, StateError> {
        match &self.state {
            State::Active(worker) => worker.save_queues().map_err(StateError::Handler),
            State::Ready { .. } => Err(StateError::NotActive),
            State::Lost => Err(lost_handler()),
        }
    }
}

impl<B: NetBackend> Net<B> {
    /// Hands the backend and the queues to a handler, run where the executor says.
    fn start_worker<M: GuestAddressSpace + Send + 'static>(
        &mut self,
        params: ActivateParams<M>,
    ) -> std::result::Result<(), ActivateError> {
        let State::Ready { backend, .. } = &mut self.state else {
            return Err(ActivateError::AlreadyActive);
        };
        // Checked here too, so that the backend stays with the device on this error.
        for given in [params.queues.len(), params.queue_evts.len()] {
            if given != NUM_QUEUES {
                return Err(ActivateError::QueueCount {
                    expected: NUM_QUEUES,
                    given,
                });
            }
        }
        backend
            .set_offload(offload_flags(params.features))
            .map_err(ActivateError::Backend)?;
        let State::Ready {
            backend,
            rate_limiters,
        } = std::mem::replace(&mut self.state, State::Lost)
        else {
            return Err(ActivateError::AlreadyActive);
        };
        let executor = params.executor.clone();
        let handler =
            NetHandler::new(backend, rate_limiters, params)?.with_metrics(self.metrics.clone());
        match Runner::start("ember-net".into(), handler, &executor) {
            Ok(worker) => {
                self.state = State::Active(Box::new(worker));
                Ok(())
            }
            Err(err) => {
                let (backend, rate_limiters) = err.handler.into_parts();
                self.state = State::Ready {
                    backend,
                    rate_limiters,
                };
                Err(ActivateError::Worker(err.error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_UFO,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::iov::GuestIoVecs;
    use crate::mmio::MmioInterrupt;
    use crate::mock::{MockBuffer, MockDriver, guest_memory};
    use crate::net::*;
    use crate::worker::WorkerGate;

    const MEM_SIZE: usize = 0x20_0000;
    const TIMEOUT: Duration = Duration::from_secs(10);
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

    fn mac() -> MacAddr {
        "06:00:00:00:00:01".parse().unwrap()
    }

    fn socket_pair() -> (UnixDatagram, UnixDatagram) {
        let (device, peer) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(TIMEOUT)).unwrap();
        (device, peer)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut frame = vec![0u8; len];
        for (i, byte) in frame.iter_mut().enumerate().skip(VNET_HDR_LEN) {
            *byte = seed.wrapping_add((i % 251) as u8);
        }
        frame
    }

    /// The guest side of one activation: fresh memory, both queues, their notification
    /// eventfds and the interrupt.
    struct Guest {
        mem: Arc<GuestMemoryMmap<()>>,
        rx: MockDriver,
        tx: MockDriver,
        rx_kick: EventFd,
        tx_kick: EventFd,
        irq: EventFd,
        interrupt: Arc<MmioInterrupt>,
        next_buffer: u64,
    }

    impl Guest {
        fn new() -> Self {
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            Guest {
                mem: Arc::new(guest_memory(MEM_SIZE).unwrap()),
                rx: MockDriver::new(QUEUE_SIZE, GuestAddress(0)),
                tx: MockDriver::new(QUEUE_SIZE, GuestAddress(0x4000)),
                rx_kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                tx_kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                interrupt: Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())),
                irq,
                next_buffer: 0x1_0000,
            }
        }

        fn params(&self, features: u64) -> ActivateParams<Arc<GuestMemoryMmap<()>>> {
            ActivateParams {
                mem: self.mem.clone(),
                features,
                queues: vec![self.rx.queue(), self.tx.queue()],
                queue_evts: vec![
                    self.rx_kick.try_clone().unwrap(),
                    self.tx_kick.try_clone().unwrap(),
                ],
                interrupt: self.interrupt.clone(),
                executor: WorkerGate::new().into(),
            }
        }

        fn alloc(&mut self, len: usize) -> u64 {
            let addr = self.next_buffer;
            self.next_buffer = (addr + len as u64).next_multiple_of(16);
            addr
        }

        /// Offers `bytes` for transmission and notifies the transmit queue.
        fn transmit(&mut self, bytes: &[u8]) {
            let addr = self.alloc(bytes.len());
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            let len = u32::try_from(bytes.len()).unwrap();
            self.tx
                .add_chain(&*self.mem, &[MockBuffer::readable(addr, len)])
                .unwrap();
            self.tx_kick.write(1).unwrap();
        }

        /// Offers a receive buffer and notifies the receive queue; returns its address.
        fn give_rx_buffer(&mut self, len: u32) -> u64 {
            let addr = self.alloc(len as usize);
            self.rx
                .add_chain(&*self.mem, &[MockBuffer::writable(addr, len)])
                .unwrap();
            self.rx_kick.write(1).unwrap();
            addr
        }

        /// Waits until the device raises its interrupt.
        fn wait_interrupt(&self) {
            let deadline = Instant::now() + TIMEOUT;
            loop {
                match self.irq.read() {
                    Ok(_) => return,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => panic!("{err}"),
                }
                assert!(Instant::now() < deadline, "no interrupt");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; len];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            bytes
        }
    }

    /// Receives from `peer` until a datagram of `len` bytes comes, skipping shorter ones.
    fn recv_len(peer: &UnixDatagram, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_BUFFER_LEN];
        loop {
            let n = peer.recv(&mut buf).unwrap();
            if n == len {
                buf.truncate(n);
                return buf;
            }
        }
    }

    #[test]
    fn features_offer_mac_only_when_configured_and_never_ufo_or_a_control_queue() {
        let (with, _peer) = socket_pair();
        let (without, _peer2) = socket_pair();
        let with = Net::new(with, Some(mac()));
        let without = Net::new(without, None);
        let with_features = VirtioDevice::<Arc<GuestMemoryMmap<()>>>::features(&with);
        let without_features = VirtioDevice::<Arc<GuestMemoryMmap<()>>>::features(&without);
        assert_eq!(with_features, BASE_FEATURES | (1 << VIRTIO_NET_F_MAC));
        assert_eq!(without_features, BASE_FEATURES);
        for bit in [
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_CTRL_VQ,
        ] {
            assert!(!has_feature(with_features, bit), "bit {bit}");
        }
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_TSO6,
        ] {
            assert!(has_feature(without_features, bit), "bit {bit}");
        }
        assert_eq!(
            VirtioDevice::<Arc<GuestMemoryMmap<()>>>::device_type(&with),
            VIRTIO_ID_NET
        );
        assert_eq!(
            VirtioDevice::<Arc<GuestMemoryMmap<()>>>::queue_max_sizes(&with),
            [256, 256]
        );
    }

    #[test]
    fn config_space_is_the_mac_then_zeros_and_ignores_writes() {
        let (backend, _peer) = socket_pair();
        let mut net = Net::new(backend, Some(mac()));
        let device: &mut dyn VirtioDevice<Arc<GuestMemoryMmap<()>>> = &mut net;
        let mut data = [0xffu8; 6];
        device.read_config(0, &mut data);
        assert_eq!(data, mac().bytes());
        let mut data = [0xffu8; 4];
        device.read_config(4, &mut data);
        assert_eq!(data, [0, 1, 0, 0]);
        device.read_config(u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
        device.write_config(0, &[0xaa; 6]);
        let mut data = [0u8; 6];
        device.read_config(0, &mut data);
        assert_eq!(data, mac().bytes());
        // Two reads reached past the MAC address, and the write was refused.
        assert_eq!(net.metrics().get("cfg_fails"), Some(3));

        let (backend, _peer) = socket_pair();
        let net = Net::new(backend, None);
        let mut data = [0xffu8; 6];
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::read_config(&net, 0, &mut data);
        assert_eq!(data, [0; 6]);
    }

    /// A socket backend that records the offloads it was given.
    struct Recording {
        socket: UnixDatagram,
        offloads: Arc<AtomicU32>,
    }

    impl AsRawFd for Recording {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.socket.as_raw_fd()
        }
    }

    impl NetBackend for Recording {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.socket.read_frame(buf)
        }

        fn write_frame<M: GuestMemory + ?Sized>(
            &mut self,
            frame: &GuestIoVecs<'_, M>,
        ) -> io::Result<usize> {
            self.socket.write_frame(frame)
        }

        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.offloads.store(flags, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn activation_sets_the_backend_offloads_from_the_negotiated_features() {
        let (socket, _peer) = socket_pair();
        let offloads = Arc::new(AtomicU32::new(u32::MAX));
        let mut net = Net::new(
            Recording {
                socket,
                offloads: offloads.clone(),
            },
            None,
        );
        let guest = Guest::new();
        let features = FEATURES
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6);
        net.activate(guest.params(features)).unwrap();
        assert_eq!(offloads.load(Ordering::SeqCst), TUN_F_CSUM | TUN_F_TSO4);
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
    }

    #[test]
    fn activate_serves_both_queues_on_the_worker_then_reset_and_activate_again() {
        let (backend, peer) = socket_pair();
        let mut net = Net::new(backend, Some(mac()));
        for round in 0..2u8 {
            let mut guest = Guest::new();
            net.activate(guest.params(FEATURES)).unwrap();
            assert!(net.is_active());

            let sent = frame(1500, round);
            guest.transmit(&sent);
            guest.wait_interrupt();
            assert_eq!(recv_len(&peer, sent.len()), sent);
            assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);

            // A frame before the guest has buffers waits for them.
            let received = frame(900, round + 100);
            peer.send(&received).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(guest.rx.used_idx(&*guest.mem).unwrap(), 0);
            let addr = guest.give_rx_buffer(1526);
            guest.wait_interrupt();
            assert_eq!(guest.rx.used_idx(&*guest.mem).unwrap(), 1);
            assert_eq!(guest.read_guest(addr + 12, 888), received[12..]);

            VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
            assert!(!net.is_active());
        }
        // Counted across both activations, by the workers.
        let metrics = net.metrics();
        assert_eq!(metrics.get("tx_packets_count"), Some(2));
        assert_eq!(metrics.get("tx_bytes_count"), Some(3000));
        assert_eq!(metrics.get("rx_packets_count"), Some(2));
        assert_eq!(metrics.get("rx_bytes_count"), Some(1800));
        assert_eq!(metrics.get("tx_queue_event_count"), Some(2));
        assert_eq!(metrics.get("rx_queue_event_count"), Some(2));
        // The backend became readable once per round, when the peer sent.
        assert_eq!(metrics.get("rx_tap_event_count"), Some(2));
        assert_eq!(metrics.get("activate_fails"), Some(0));
    }

    #[test]
    fn activating_an_active_device_or_with_the_wrong_queues_is_refused() {
        let (backend, _peer) = socket_pair();
        let mut net = Net::new(backend, None);
        let guest = Guest::new();
        let mut params = guest.params(FEATURES);
        params.queues.pop();
        let err = net.activate(params).unwrap_err();
        assert!(
            matches!(
                err,
                ActivateError::QueueCount {
                    expected: 2,
                    given: 1
                }
            ),
            "{err:?}"
        );
        // The device kept its backend.
        net.activate(guest.params(FEATURES)).unwrap();
        let err = net.activate(guest.params(FEATURES)).unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive), "{err:?}");
        assert_eq!(net.metrics().get("activate_fails"), Some(2));
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
        // Reset twice is harmless.
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
        net.activate(guest.params(FEATURES)).unwrap();
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
    }

    #[test]
    fn a_full_backend_resumes_on_the_worker_once_writable() {
        let (backend, peer) = socket_pair();
        let filler_end = backend.try_clone().unwrap();
        let mut net = Net::new(backend, None);
        let mut guest = Guest::new();
        net.activate(guest.params(FEATURES)).unwrap();
        let filler = [0u8; 30000];
        while filler_end.send(&filler).is_ok() {}

        let sent = frame(1500, 7);
        guest.transmit(&sent);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            guest.tx.used_idx(&*guest.mem).unwrap(),
            0,
            "the chain waits"
        );
        // The network reads everything: the filler, then the frame.
        assert_eq!(recv_len(&peer, sent.len()), sent);
        guest.wait_interrupt();
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
    }

    #[test]
    fn a_driver_that_breaks_the_protocol_gets_needs_reset() {
        let (backend, peer) = socket_pair();
        let mut net = Net::new(backend, None);
        let mut guest = Guest::new();
        net.activate(guest.params(FEATURES)).unwrap();
        guest
            .tx
            .set_avail_entry(&*guest.mem, 0, QUEUE_SIZE)
            .unwrap();
        guest.tx.set_avail_idx(&*guest.mem, 1).unwrap();
        guest.tx_kick.write(1).unwrap();
        guest.wait_interrupt();
        assert!(guest.interrupt.needs_reset());
        assert_eq!(net.metrics().get("queue_fails"), Some(1));
        assert_eq!(net.metrics().get("event_fails"), Some(0));
        // The device serves nothing more, and notifications go unanswered.
        guest.give_rx_buffer(1526);
        peer.send(&frame(100, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(guest.rx.used_idx(&*guest.mem).unwrap(), 0);
        // A reset brings it back.
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
        let mut guest = Guest::new();
        net.activate(guest.params(FEATURES)).unwrap();
        let addr = guest.give_rx_buffer(1526);
        guest.wait_interrupt();
        assert_eq!(guest.read_guest(addr + 12, 88), frame(100, 1)[12..]);
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
    }

    fn bucket(size: u64, refill_time: u64) -> Option<ember_rate_limiter::BucketConfig> {
        Some(ember_rate_limiter::BucketConfig {
            size,
            one_time_burst: 0,
            refill_time,
        })
    }

    /// Waits until `done` holds, for at most [`TIMEOUT`].
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn throttled_directions_wait_on_the_worker_without_spinning_and_take_updates() {
        let (backend, peer) = socket_pair();
        // One frame per 10 s each way.
        let mut net = Net::new(backend, None).with_rate_limiters(
            RateLimiter::new(None, bucket(1, 10_000)).unwrap(),
            RateLimiter::new(None, bucket(1, 10_000)).unwrap(),
        );
        let metrics = net.metrics().clone();
        let mut guest = Guest::new();
        net.activate(guest.params(FEATURES)).unwrap();

        let sent: Vec<Vec<u8>> = (0..3).map(|seed| frame(1000, seed)).collect();
        for frame in &sent {
            guest.transmit(frame);
        }
        let addrs: Vec<u64> = (0..3).map(|_| guest.give_rx_buffer(1526)).collect();
        let received: Vec<Vec<u8>> = (0..3).map(|seed| frame(500, seed + 50)).collect();
        for frame in &received {
            peer.send(frame).unwrap();
        }
        wait_until("both directions to be held back", || {
            metrics.get("tx_rate_limiter_throttled") >= Some(1)
                && metrics.get("rx_rate_limiter_throttled") >= Some(1)
        });
        assert_eq!(recv_len(&peer, 1000), sent[0]);
        // Frames wait in the backend, readable, without waking the worker.
        let tap_events = metrics.get("rx_tap_event_count");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(metrics.get("rx_tap_event_count"), tap_events);
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);
        assert_eq!(guest.rx.used_idx(&*guest.mem).unwrap(), 1);

        // Lifted on the worker thread: everything goes, in order.
        net.update_rate_limiters(
            BucketUpdate::None,
            BucketUpdate::Disabled,
            BucketUpdate::None,
            BucketUpdate::Disabled,
        )
        .unwrap()
        .wait()
        .unwrap();
        for frame in &sent[1..] {
            assert_eq!(&recv_len(&peer, 1000), frame);
        }
        wait_until("every frame to be received", || {
            guest.rx.used_idx(&*guest.mem).unwrap() == 3
        });
        for (addr, frame) in addrs.iter().zip(&received) {
            assert_eq!(guest.read_guest(addr + 12, 488), frame[12..]);
        }
        assert!(metrics.get("tx_rate_limiter_event_count") >= Some(1));
        assert!(metrics.get("rx_event_rate_limiter_count") >= Some(1));
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);

        // While reset, a limit is kept for the next activation.
        net.update_rate_limiters(
            BucketUpdate::None,
            BucketUpdate::None,
            BucketUpdate::None,
            bucket(1, 10_000).unwrap().into(),
        )
        .unwrap()
        .wait()
        .unwrap();
        let mut guest = Guest::new();
        net.activate(guest.params(FEATURES)).unwrap();
        let throttled = metrics.get("tx_rate_limiter_throttled");
        guest.transmit(&frame(100, 1));
        guest.transmit(&frame(100, 2));
        wait_until("the second frame to be held back", || {
            metrics.get("tx_rate_limiter_throttled") > throttled
        });
        assert_eq!(recv_len(&peer, 100), frame(100, 1));
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
    }

    fn tap_statistic(name: &str, counter: &str) -> u64 {
        let path = format!("/sys/class/net/{name}/statistics/{counter}");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{path}: {err}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends `frame`, an Ethernet frame, out of the interface `name` with a packet socket: the
    /// TAP behind it hands it to its reader.
    fn send_out_of(name: &str, frame: &[u8]) {
        let cname = CString::new(name).unwrap();
        // SAFETY: `cname` is NUL-terminated and lives across the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(index, 0, "{}", io::Error::last_os_error());
        // SAFETY: socket has no memory preconditions; protocol 0 receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `fd` was just opened and nothing else owns it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data, for which all zeros is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = i32::try_from(index).unwrap();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for reads of the lengths given, for the call.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        assert_eq!(
            usize::try_from(sent).ok(),
            Some(frame.len()),
            "{}",
            io::Error::last_os_error()
        );
    }

    /// An Ethernet frame to everyone from `mac`, of the local experimental EtherType, so that
    /// the host stack has no use for it.
    fn ethernet_frame(mac: MacAddr, payload: usize, seed: u8) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend(mac.bytes());
        frame.extend([0x88, 0xb5]);
        frame.extend((0..payload).map(|i| seed.wrapping_add((i % 251) as u8)));
        frame
    }

    #[test]
    fn net_over_a_real_tap_moves_frames_both_ways() {
        let tap = match crate::mock::test_tap("embn%d") {
            Ok(tap) => tap,
            Err(why) => {
                println!("skipped: cannot set up a TAP here: {why}");
                return;
            }
        };
        let name = tap.name().to_owned();
        let mut net = Net::new(tap, Some(mac()));
        let mut guest = Guest::new();
        let features = FEATURES
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6);
        net.activate(guest.params(features)).unwrap();

        // The guest sends: the host sees the TAP receive a frame.
        let before = tap_statistic(&name, "rx_packets");
        let mut sent = vec![0u8; VNET_HDR_LEN];
        sent.extend(ethernet_frame(mac(), 1000, 1));
        guest.transmit(&sent);
        guest.wait_interrupt();
        assert_eq!(guest.tx.used_idx(&*guest.mem).unwrap(), 1);
        assert_eq!(tap_statistic(&name, "rx_packets"), before + 1);

        // The host sends out of the TAP: the guest receives the frame behind a header.
        let addr = guest.give_rx_buffer(4096);
        let received = ethernet_frame("06:00:00:00:00:02".parse().unwrap(), 500, 2);
        send_out_of(&name, &received);
        guest.wait_interrupt();
        let (_, len) = guest.rx.used_elem(&*guest.mem, 0).unwrap();
        assert_eq!(len as usize, VNET_HDR_LEN + received.len());
        let delivered = guest.read_guest(addr, len as usize);
        assert_eq!(&delivered[VNET_HDR_LEN..], &received[..]);
        // No offload in it, and one buffer.
        assert_eq!(&delivered[..2], [0, 0]);
        assert_eq!(&delivered[10..12], [1, 0]);
        VirtioDevice::<Arc<GuestMemoryMmap<()>>>::reset(&mut net);
    }

    #[test]
    fn a_state_with_an_invalid_bucket_changes_neither_limiter() {
        let (device, _peer) = socket_pair();
        let limiter = || RateLimiter::new(None, crate::mock::bucket(100, 1 << 40)).unwrap();
        let mut net = Net::new(device, Some(mac())).with_rate_limiters(limiter(), limiter());
        let before = net.save_state().unwrap();
        let mut state = before.clone();
        state.rx_rate_limiter = RateLimiterState::default();
        state.tx_rate_limiter.ops.as_mut().unwrap().budget = 101;
        assert!(matches!(
            net.restore_state(&state),
            Err(StateError::RateLimiter(_))
        ));
        assert_eq!(net.save_state().unwrap(), before);
        state.tx_rate_limiter.ops.as_mut().unwrap().budget = 7;
        net.restore_state(&state).unwrap();
        let after = net.save_state().unwrap();
        assert_eq!(after.rx_rate_limiter, RateLimiterState::default());
        assert_eq!(after.tx_rate_limiter.ops.unwrap().budget, 7);
    }
}
