//! The vsock device as its transport sees it: [`Vsock`], its features and configuration space,
//! its lifecycle ([`VirtioDevice`]: activation hands the queues and the backend to a
//! [`VsockHandler`], reset takes the backend back and drops its connections), and the type
//! erasure of the active handler over the guest memory type (`Running`).

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
use super::{FEATURES, NUM_QUEUES, QUEUE_SIZES, Result, check_cid};
use crate::device::{ActivateError, ActivateParams, VirtioDevice, read_config_bytes};
use crate::worker::Runner;

/// The name of the device's worker thread.
pub const THREAD_NAME: &str = "ember-vsock";

/// A handler serving a device, whatever its guest memory type and wherever it runs, that gives
/// the backend back when stopped.
trait Running<B>: Send {
    fn stop(self: Box<Self>) -> io::Result<B>;
    fn send_transport_reset(&self) -> io::Result<()>;
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

    /// Queues [`EVENT_TRANSPORT_RESET`](super::EVENT_TRANSPORT_RESET) on the event queue:
    /// sent as soon as the driver hands over a buffer for it if the device is active, and once
    /// it is activated otherwise (after a snapshot is restored, say).
    pub fn send_transport_reset(&mut self) {
        match &self.state {
            State::Active(running) => {
                if let Err(err) = running.send_transport_reset() {
                    log::error!("virtio-vsock cannot reach its handler for a transport reset: {err}");
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
        if std::mem::take(&mut self.reset_pending) {
            handler.queue_transport_reset();
        }
        match Runner::start(THREAD_NAME.into(), handler, &executor) {
            Ok(runner) => {
                self.state = State::Active(Box::new(runner));
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
