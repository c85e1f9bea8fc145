//! The vsock device as its transport sees it: [`Vsock`], its features and configuration space,
//! its lifecycle ([`VirtioDevice`]: activation hands the queues and the backend to a
//! [`VsockHandler`], reset takes the backend back and drops its connections), and the type
//! erasure of the active handler over the guest memory type (`Running`); and what a snapshot
//! saves and restores of it ([`VsockState`]).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vm_memory::GuestAddressSpace;

use super::backend::VsockBackend;
use super::handler::VsockHandler;
use super::metrics::{self, VsockMetrics};
use super::unix::VsockUnixBackend;
use super::{Error, FEATURES, NUM_QUEUES, QUEUE_SIZES, Result, VsockState, check_cid};
use crate::device::{ActivateError, ActivateParams, StateError, VirtioDevice, read_config_bytes};
use crate::queue::Queue;
use crate::worker::Runner;

/// The name of the device's worker thread (under [`Executor::Thread`](crate::Executor::Thread)),
/// which a VMM's seccomp filters and CPU pinning know it by.
pub const THREAD_NAME: &str = "ember-vsock";

/// A handler serving a device, whatever its guest memory type and wherever it runs, that gives
/// the backend back when stopped.
trait Running<B>: Send {
    fn stop(self: Box<Self>) -> io::Result<B>;
    fn send_transport_reset(&self) -> io::Result<()>;
    fn save_queues(&self) -> io::Result<Vec<Queue>>;
}

impl<M, B> Running<B> for Runner<VsockHandler<M, B>>
where
    M: GuestAddressSpace + Send + 'static,
    B: VsockBackend,
{
    fn stop(self: Box<Self>) -> io::Result<B> {
        Runner::stop(*self).map(VsockHandler::into_backend)
    }

    fn send_transport_reset(&self) -> io::Result<()> {
        // Not waited for: the caller may hold locks the handler's thread takes.
        self.post(|handler, _ops| {
            if let Err(err) = handler.send_transport_reset() {
                log::warn!("virtio-vsock cannot send a transport reset: {err}");
            }
        })
        .map(drop)
    }

    fn save_queues(&self) -> io::Result<Vec<Queue>> {
        self.call(|handler, _ops| handler.save_queues())
    }
}

enum State<B> {
    /// Reset: the device holds the backend.
    Ready(B),
    /// Active: the handler holds it.
    Active(Box<dyn Running<B>>),
    /// It went with a handler that could not stop.
    Lost,
}

/// A virtio socket device.
pub struct Vsock<B: VsockBackend = VsockUnixBackend> {
    guest_cid: u64,
    state: State<B>,
    /// A transport reset asked for while the device was not active, sent once it is.
    reset_pending: bool,
    /// A saved state was restored: the next activation serves at once what the driver made
    /// available before the snapshot.
    restored: bool,
    metrics: Arc<VsockMetrics>,
}

impl<B: VsockBackend> fmt::Debug for Vsock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Ready(_) => "ready",
            State::Active(_) => "active",
            State::Lost => "backend lost",
        };
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("state", &state)
            .finish()
    }
}

impl Vsock<VsockUnixBackend> {
    /// A device for the guest with context ID `guest_cid` (at least 3), whose host side
    /// listens on a Unix socket at `uds_path`, bound at once (an existing path is an error).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCid`](super::Error::InvalidCid), [`Error::Bind`](super::Error::Bind)
    /// or [`Error::Backend`](super::Error::Backend), as [`VsockUnixBackend::new`].
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Self> {
        let metrics = Arc::<VsockMetrics>::default();
        let backend = VsockUnixBackend::new(guest_cid, uds_path)?.with_metrics(metrics.clone());
        let mut vsock = Vsock::with_backend(guest_cid, backend)?;
        vsock.metrics = metrics;
        Ok(vsock)
    }

    /// A device as the one `state` was saved from, its host side listening at `uds_path` (the
    /// configured path, or the one a restore asks for instead), with `state` restored
    /// ([`Vsock::restore_state`]): its first activation tells the guest its connections are
    /// gone.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCid`], [`Error::Bind`] or [`Error::Backend`] as [`Vsock::new`].
    pub fn from_state(state: &VsockState, uds_path: impl Into<PathBuf>) -> Result<Self> {
        let mut vsock = Vsock::new(state.guest_cid, uds_path)?;
        vsock.restore_state(state).map_err(Error::State)?;
        Ok(vsock)
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// A device for the guest with context ID `guest_cid` (at least 3), with `backend` as its
    /// host side.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCid`](super::Error::InvalidCid) for a reserved CID.
    pub fn with_backend(guest_cid: u64, backend: B) -> Result<Self> {
        Ok(Vsock {
            guest_cid: check_cid(guest_cid)?,
            state: State::Ready(backend),
            reset_pending: false,
            restored: false,
            metrics: Arc::default(),
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters, which its handler and its Unix backend update while it runs.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// Whether the device is serving its queues.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    /// What a snapshot records of the device: the guest's context ID. Its queues come from
    /// [`VirtioDevice::save_queues`]; its connections are not saved.
    pub fn save_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    /// Gives a new, not yet activated device the state `state` saved, and arms what a restored
    /// device owes the guest: its next activation (with the saved queues) sends
    /// [`EVENT_TRANSPORT_RESET`](super::EVENT_TRANSPORT_RESET) into the event queue's first
    /// buffer at once, so that the guest drops the connections of the saved device, and serves
    /// what the driver made available before the snapshot.
    ///
    /// # Errors
    ///
    /// [`StateError::Invalid`] when the device is active or lost its backend, or when `state`
    /// names another (or a reserved) context ID; nothing changes then.
    pub fn restore_state(&mut self, state: &VsockState) -> std::result::Result<(), StateError> {
        if check_cid(state.guest_cid).is_err() {
            return Err(StateError::Invalid(format!(
                "the saved vsock device's guest CID {} is reserved or too large",
                state.guest_cid
            )));
        }
        if state.guest_cid != self.guest_cid {
            return Err(StateError::Invalid(format!(
                "the saved vsock device has guest CID {} and this one {}",
                state.guest_cid, self.guest_cid
            )));
        }
        match self.state {
            State::Ready(_) => {}
            State::Active(_) => {
                return Err(StateError::Invalid(
                    "the vsock device is active; a state is restored before activation".into(),
                ));
            }
            State::Lost => {
                return Err(StateError::Invalid(
                    "the vsock device lost its backend and cannot be activated".into(),
                ));
            }
        }
        self.reset_pending = true;
        self.restored = true;
        Ok(())
    }

    /// Queues [`EVENT_TRANSPORT_RESET`](super::EVENT_TRANSPORT_RESET) on the event queue:
    /// sent as soon as the driver hands over a buffer for it if the device is active, and once
    /// it is activated otherwise (after a snapshot is restored, say).
    pub fn send_transport_reset(&mut self) {
        match &self.state {
            State::Active(running) => {
                if let Err(err) = running.send_transport_reset() {
                    log::error!(
                        "virtio-vsock cannot reach its handler for a transport reset: {err}"
                    );
                }
            }
            State::Ready(_) | State::Lost => self.reset_pending = true,
        }
    }

    /// Hands the backend and the queues to a handler, run where the executor says.
    fn start<M: GuestAddressSpace + Send + 'static>(
        &mut self,
        params: ActivateParams<M>,
    ) -> std::result::Result<(), ActivateError> {
        if !matches!(self.state, State::Ready(_)) {
            return Err(ActivateError::AlreadyActive);
        }
        for given in [params.queues.len(), params.queue_evts.len()] {
            if given != NUM_QUEUES {
                return Err(ActivateError::QueueCount {
                    expected: NUM_QUEUES,
                    given,
                });
            }
        }
        let ActivateParams {
            mem,
            queues,
            queue_evts,
            interrupt,
            executor,
            ..
        } = params;
        let (Ok(queues), Ok(queue_evts)) = (
            <[_; NUM_QUEUES]>::try_from(queues),
            <[_; NUM_QUEUES]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                given: 0,
            });
        };
        let State::Ready(backend) = std::mem::replace(&mut self.state, State::Lost) else {
            return Err(ActivateError::AlreadyActive);
        };
        let mut handler =
            VsockHandler::new(self.guest_cid, backend, mem, queues, queue_evts, interrupt)
                .with_metrics(self.metrics.clone());
        if self.reset_pending {
            handler.queue_transport_reset();
        }
        if self.restored {
            handler.serve_available_on_start();
        }
        match Runner::start(THREAD_NAME.into(), handler, &executor) {
            Ok(runner) => {
                self.state = State::Active(Box::new(runner));
                self.reset_pending = false;
                self.restored = false;
                Ok(())
            }
            Err(err) => {
                let mut backend = err.handler.into_backend();
                backend.reset();
                self.state = State::Ready(backend);
                Err(ActivateError::Worker(err.error))
            }
        }
    }
}

impl<M, B> VirtioDevice<M> for Vsock<B>
where
    M: GuestAddressSpace + Send + 'static,
    B: VsockBackend,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        metrics::inc(&self.metrics.cfg_fails);
        log::debug!(
            "virtio-vsock ignored a {}-byte configuration write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams<M>) -> std::result::Result<(), ActivateError> {
        let result = self.start(params);
        if result.is_err() {
            metrics::inc(&self.metrics.activate_fails);
        }
        result
    }

    fn save_queues(&self) -> std::result::Result<Vec<Queue>, StateError> {
        match &self.state {
            State::Active(running) => running.save_queues().map_err(StateError::Handler),
            State::Ready(_) | State::Lost => Err(StateError::NotActive),
        }
    }

    fn reset(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Lost) {
            State::Active(handler) => match handler.stop() {
                Ok(mut backend) => {
                    backend.reset();
                    State::Ready(backend)
                }
                Err(err) => {
                    log::error!(
                        "virtio-vsock lost its backend when its handler stopped, so it cannot \
                         be activated again: {err}"
                    );
                    State::Lost
                }
            },
            state => state,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
    use crate::vsock::{Error, HDR_SIZE, OP_REQUEST, PacketHeader};
    use crate::worker::WorkerGate;

    type Mem = Arc<GuestMemoryMmap<()>>;

    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-vsock-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    struct Driver {
        mem: Mem,
        rx: MockDriver,
        ev: MockDriver,
        kicks: Vec<EventFd>,
    }

    fn activate<B: VsockBackend>(vsock: &mut Vsock<B>) -> Driver {
        let (result, driver) = try_activate(vsock);
        result.unwrap();
        driver
    }

    fn try_activate<B: VsockBackend>(
        vsock: &mut Vsock<B>,
    ) -> (std::result::Result<(), ActivateError>, Driver) {
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let drivers: Vec<_> = [0u64, 0x4000, 0x8000]
            .into_iter()
            .map(|base| MockDriver::new(16, GuestAddress(base)))
            .collect();
        let kicks: Vec<_> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let result = VirtioDevice::<Mem>::activate(
            vsock,
            ActivateParams::new(
                mem.clone(),
                FEATURES,
                drivers.iter().map(MockDriver::queue).collect(),
                kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
                Arc::new(CountingTrigger::default()),
                WorkerGate::new(),
            ),
        );
        let driver = Driver {
            mem,
            rx: drivers[0].clone(),
            ev: drivers[2].clone(),
            kicks,
        };
        (result, driver)
    }

    #[test]
    fn the_device_is_a_socket_device_with_its_cid_in_the_configuration() {
        let path = socket_path("config.sock");
        let mut vsock = Vsock::new(0x1_2345, &path).unwrap();
        assert_eq!(vsock.guest_cid(), 0x1_2345);
        let device: &mut dyn VirtioDevice<Mem> = &mut vsock;
        assert_eq!(device.device_type(), 19);
        assert_eq!(device.queue_max_sizes(), [256, 256, 256]);
        assert_eq!(device.features() & (1 << 32), 1 << 32);
        let mut data = [0xffu8; 8];
        device.read_config(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x1_2345);
        let mut high = [0xffu8; 4];
        device.read_config(4, &mut high);
        assert_eq!(high, [0; 4]);
        device.write_config(0, &[9; 8]);
        device.read_config(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x1_2345);
        assert_eq!(vsock.metrics().get("cfg_fails"), Some(1));
    }

    #[test]
    fn reserved_cids_and_taken_paths_are_refused() {
        let path = socket_path("refused.sock");
        for cid in [0, 1, 2] {
            assert!(matches!(Vsock::new(cid, &path), Err(Error::InvalidCid(c)) if c == cid));
        }
        assert!(!path.exists(), "nothing was bound for a bad CID");
        let _vsock = Vsock::new(3, &path).unwrap();
        let err = Vsock::new(4, &path).unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err:?}");
    }

    #[test]
    fn activating_an_active_device_or_with_the_wrong_queues_is_refused() {
        let path = socket_path("queues.sock");
        let mut vsock = Vsock::new(3, &path).unwrap();
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let driver = MockDriver::new(16, GuestAddress(0));
        let err = VirtioDevice::<Mem>::activate(
            &mut vsock,
            ActivateParams::new(
                mem,
                FEATURES,
                vec![driver.queue()],
                vec![EventFd::new(0).unwrap()],
                Arc::new(CountingTrigger::default()),
                WorkerGate::new(),
            ),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ActivateError::QueueCount {
                    expected: 3,
                    given: 1
                }
            ),
            "{err:?}"
        );
        let _driver = activate(&mut vsock);
        assert!(vsock.is_active());
        assert_eq!(vsock.metrics().get("activate_fails"), Some(1));
        VirtioDevice::<Mem>::reset(&mut vsock);
        assert!(!vsock.is_active());
    }

    #[test]
    fn a_transport_reset_reaches_the_event_queue_active_or_not() {
        let path = socket_path("event.sock");
        let mut vsock = Vsock::new(3, &path).unwrap();
        // Asked for before activation: sent once the driver hands over a buffer.
        vsock.send_transport_reset();
        for round in 0..2 {
            let mut driver = activate(&mut vsock);
            if round == 1 {
                vsock.send_transport_reset();
            }
            driver
                .mem
                .write_slice(&[0xff; 4], GuestAddress(0x3_0000))
                .unwrap();
            driver
                .ev
                .add_chain(&*driver.mem, &[MockBuffer::writable(0x3_0000, 4)])
                .unwrap();
            driver.kicks[2].write(1).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while driver.ev.used_idx(&*driver.mem).unwrap() == 0 {
                assert!(Instant::now() < deadline, "round {round}: no event");
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(driver.ev.used_elem(&*driver.mem, 0).unwrap().1, 4);
            let event: u32 = driver.mem.read_obj(GuestAddress(0x3_0000)).unwrap();
            assert_eq!(event, 0);
            VirtioDevice::<Mem>::reset(&mut vsock);
        }
    }

    #[test]
    fn a_reset_closes_the_host_streams_and_the_device_serves_again() {
        let path = socket_path("reset.sock");
        let mut vsock = Vsock::new(3, &path).unwrap();
        for round in 0..2 {
            let mut driver = activate(&mut vsock);
            driver
                .rx
                .add_chain(&*driver.mem, &[MockBuffer::writable(0x2_0000, 4096)])
                .unwrap();
            driver.kicks[0].write(1).unwrap();
            let mut host = UnixStream::connect(&path).unwrap();
            host.write_all(b"CONNECT 52\n").unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while driver.rx.used_idx(&*driver.mem).unwrap() == 0 {
                assert!(Instant::now() < deadline, "round {round}: no request");
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut bytes = [0u8; HDR_SIZE];
            driver
                .mem
                .read_slice(&mut bytes, GuestAddress(0x2_0000))
                .unwrap();
            assert_eq!(PacketHeader::from_bytes(&bytes).op, OP_REQUEST);
            VirtioDevice::<Mem>::reset(&mut vsock);
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4];
            assert_eq!(host.read(&mut buf).unwrap(), 0, "round {round}");
        }
        assert_eq!(vsock.metrics().get("conns_added"), Some(2));
        assert_eq!(vsock.metrics().get("conns_removed"), Some(2));
        drop(vsock);
        assert!(!path.exists(), "the listener's path goes with the device");
    }

    /// A backend to test the device's lifecycle with: its descriptor may be made invalid, it
    /// counts its resets, and it panics when notified.
    #[derive(Debug)]
    struct Probe {
        evt: EventFd,
        bad_fd: Arc<AtomicBool>,
        resets: Arc<AtomicUsize>,
        notified: Arc<AtomicBool>,
    }

    impl Probe {
        fn new() -> Self {
            Probe {
                evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                bad_fd: Arc::default(),
                resets: Arc::default(),
                notified: Arc::default(),
            }
        }
    }

    impl std::os::fd::AsRawFd for Probe {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            if self.bad_fd.load(Ordering::SeqCst) {
                -1
            } else {
                self.evt.as_raw_fd()
            }
        }
    }

    impl VsockBackend for Probe {
        fn send_pkt(&mut self, _header: &PacketHeader, _payload: &[u8]) {}
        fn reject(&mut self, _header: &PacketHeader) {}
        fn recv_pkt(&mut self, _header: &mut PacketHeader, _payload: &mut [u8]) -> Option<usize> {
            None
        }
        fn has_pending_rx(&self) -> bool {
            false
        }
        fn notify(&mut self, _events: EventSet) {
            self.notified.store(true, Ordering::SeqCst);
            panic!("the test backend breaks when notified");
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_handler_that_cannot_start_leaves_the_device_ready_with_its_backend_reset() {
        let probe = Probe::new();
        let (bad_fd, resets) = (probe.bad_fd.clone(), probe.resets.clone());
        bad_fd.store(true, Ordering::SeqCst);
        let mut vsock = Vsock::with_backend(3, probe).unwrap();
        assert_eq!(vsock.guest_cid(), 3);
        assert!(matches!(
            Vsock::with_backend(2, Probe::new()),
            Err(Error::InvalidCid(2))
        ));
        // The backend's descriptor cannot be watched: the handler's init fails.
        let (result, _driver) = try_activate(&mut vsock);
        assert!(
            matches!(result, Err(ActivateError::Worker(_))),
            "{result:?}"
        );
        assert!(!vsock.is_active());
        assert_eq!(
            resets.load(Ordering::SeqCst),
            1,
            "the backend starts afresh"
        );
        assert_eq!(vsock.metrics().get("activate_fails"), Some(1));
        assert_eq!(
            format!("{vsock:?}"),
            r#"Vsock { guest_cid: 3, state: "ready" }"#
        );
        // The backend came back: the device activates once the descriptor is good.
        bad_fd.store(false, Ordering::SeqCst);
        let _driver = activate(&mut vsock);
        assert!(vsock.is_active());
        assert_eq!(
            format!("{vsock:?}"),
            r#"Vsock { guest_cid: 3, state: "active" }"#
        );
        VirtioDevice::<Mem>::reset(&mut vsock);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
        assert!(!vsock.is_active());
    }

    #[test]
    fn a_restored_state_survives_an_activation_that_fails_and_arms_the_next_one() {
        let probe = Probe::new();
        let bad_fd = probe.bad_fd.clone();
        bad_fd.store(true, Ordering::SeqCst);
        let mut vsock = Vsock::with_backend(3, probe).unwrap();
        vsock.restore_state(&VsockState { guest_cid: 3 }).unwrap();
        let (result, _driver) = try_activate(&mut vsock);
        assert!(
            matches!(result, Err(ActivateError::Worker(_))),
            "{result:?}"
        );
        assert!(vsock.reset_pending && vsock.restored);
        // The next activation sends the reset into the buffer already there.
        bad_fd.store(false, Ordering::SeqCst);
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let mut ev = MockDriver::new(16, GuestAddress(0x8000));
        ev.add_chain(&*mem, &[MockBuffer::writable(0x3_0000, 4)])
            .unwrap();
        let queues = [0u64, 0x4000]
            .into_iter()
            .map(|base| MockDriver::new(16, GuestAddress(base)).queue())
            .chain([ev.queue()])
            .collect();
        VirtioDevice::<Mem>::activate(
            &mut vsock,
            ActivateParams::new(
                mem.clone(),
                FEATURES,
                queues,
                (0..3)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                Arc::new(CountingTrigger::default()),
                WorkerGate::new(),
            ),
        )
        .unwrap();
        assert_eq!(ev.used_idx(&*mem).unwrap(), 1);
        assert!(!vsock.reset_pending && !vsock.restored);
        let saved = VirtioDevice::<Mem>::save_queues(&vsock).unwrap();
        assert_eq!(saved[2].next_avail(), 1);
        assert_eq!(saved[2].next_used(), 1);
        VirtioDevice::<Mem>::reset(&mut vsock);
    }

    #[test]
    fn activating_an_active_device_again_is_refused_and_it_keeps_serving() {
        let path = socket_path("twice.sock");
        let mut vsock = Vsock::new(3, &path).unwrap();
        let _driver = activate(&mut vsock);
        let (result, _again) = try_activate(&mut vsock);
        assert!(
            matches!(result, Err(ActivateError::AlreadyActive)),
            "{result:?}"
        );
        assert!(vsock.is_active());
        assert_eq!(vsock.metrics().get("activate_fails"), Some(1));
        VirtioDevice::<Mem>::reset(&mut vsock);
        assert!(!vsock.is_active());
    }

    #[test]
    fn a_handler_that_panicked_loses_the_backend_and_the_device_cannot_activate_again() {
        let probe = Probe::new();
        let (resets, notified) = (probe.resets.clone(), probe.notified.clone());
        let kick = probe.evt.try_clone().unwrap();
        let mut vsock = Vsock::with_backend(3, probe).unwrap();
        let _driver = activate(&mut vsock);
        // The backend's descriptor is ready: the handler notifies it, and it panics.
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !notified.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the backend was not notified");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Still active as far as the device knows; asking its handler for a reset is harmless.
        vsock.send_transport_reset();
        assert!(vsock.is_active());
        // The reset cannot take the backend back from a thread that panicked.
        VirtioDevice::<Mem>::reset(&mut vsock);
        assert!(!vsock.is_active());
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        assert_eq!(
            format!("{vsock:?}"),
            r#"Vsock { guest_cid: 3, state: "backend lost" }"#
        );
        // Lost stays lost: a second reset changes nothing, activation is refused.
        VirtioDevice::<Mem>::reset(&mut vsock);
        let (result, _driver) = try_activate(&mut vsock);
        assert!(
            matches!(result, Err(ActivateError::AlreadyActive)),
            "{result:?}"
        );
        assert!(!vsock.is_active());
        assert_eq!(vsock.metrics().get("activate_fails"), Some(1));
        // A transport reset is kept for an activation that never comes, without a panic.
        vsock.send_transport_reset();
        assert!(vsock.reset_pending);
    }
}
