//! The entropy device as its transport sees it: [`Rng`], its features, its lifecycle
//! ([`VirtioDevice`]: activation hands the queue to an [`RngHandler`], reset takes the source
//! and the rate limiter back), and the type erasure of the active handler over the guest memory
//! type (`Running`).

use std::fmt;
use std::io;
use std::sync::Arc;

use ember_rate_limiter::{RateLimiter, RateLimiterState};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vm_memory::GuestAddressSpace;

use super::handler::RngHandler;
use super::metrics::{self, RngMetrics};
use super::{EntropySource, FEATURES, HostRng, NUM_QUEUES, QUEUE_SIZES};
use crate::device::{ActivateError, ActivateParams, StateError, VirtioDevice};
use crate::queue::Queue;
use crate::worker::Runner;

/// A handler serving a device, whatever its guest memory type and wherever it runs, that gives
/// the source and the rate limiter back when stopped.
trait Running<S>: Send {
    fn stop(self: Box<Self>) -> io::Result<(S, RateLimiter)>;

    /// The queue as a snapshot records it ([`RngHandler::saved_queue`]), from the handler's
    /// thread.
    fn save_queue(&self) -> io::Result<Queue>;

    /// The rate limiter's state, from the handler's thread.
    fn rate_limiter_state(&self) -> io::Result<RateLimiterState>;

    /// Has the handler's thread restore the rate limiter's buckets.
    fn restore_rate_limiter(
        &self,
        state: RateLimiterState,
    ) -> io::Result<ember_rate_limiter::Result<()>>;
}

impl<M, S> Running<S> for Runner<RngHandler<M, S>>
where
    M: GuestAddressSpace + Send + 'static,
    S: EntropySource,
{
    fn stop(self: Box<Self>) -> io::Result<(S, RateLimiter)> {
        Runner::stop(*self).map(RngHandler::into_parts)
    }

    fn save_queue(&self) -> io::Result<Queue> {
        self.call(|handler, _| handler.saved_queue())
    }

    fn rate_limiter_state(&self) -> io::Result<RateLimiterState> {
        self.call(|handler, _| handler.rate_limiter().state())
    }

    fn restore_rate_limiter(
        &self,
        state: RateLimiterState,
    ) -> io::Result<ember_rate_limiter::Result<()>> {
        self.call(move |handler, _| handler.restore_rate_limiter(&state))
    }
}

#[allow(
    clippy::large_enum_variant,
    reason = "a device has one state, which moves only when the device is activated or reset"
)]
enum State<S> {
    /// Reset: the device holds the source and the rate limiter.
    Ready {
        source: S,
        rate_limiter: RateLimiter,
    },
    /// Active: the handler holds them.
    Active(Box<dyn Running<S>>),
    /// They went with a handler that could not stop.
    Lost,
}

/// A virtio entropy device.
pub struct Rng<S = HostRng> {
    state: State<S>,
    metrics: Arc<RngMetrics>,
}

impl<S> fmt::Debug for Rng<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Ready { .. } => "ready",
            State::Active(_) => "active",
            State::Lost => "source lost",
        };
        f.debug_struct("Rng").field("state", &state).finish()
    }
}

impl Rng<HostRng> {
    /// A device fed from the host's `getrandom`, whose requests go through `rate_limiter`
    /// ([`RateLimiter::default`] lets everything through).
    pub fn new(rate_limiter: RateLimiter) -> Self {
        Rng::with_source(HostRng, rate_limiter)
    }
}

impl<S: EntropySource> Rng<S> {
    /// A device fed from `source`, whose requests go through `rate_limiter`.
    pub fn with_source(source: S, rate_limiter: RateLimiter) -> Self {
        Rng {
            state: State::Ready {
                source,
                rate_limiter,
            },
            metrics: Arc::default(),
        }
    }

    /// The device's counters, which its handler updates while it runs.
    pub fn metrics(&self) -> &Arc<RngMetrics> {
        &self.metrics
    }

    /// Whether the device is serving its queue.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    /// Hands the source and the queue to a handler, run where the executor says.
    fn start<M: GuestAddressSpace + Send + 'static>(
        &mut self,
        params: ActivateParams<M>,
    ) -> Result<(), ActivateError> {
        if !matches!(self.state, State::Ready { .. }) {
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
        let State::Ready {
            source,
            rate_limiter,
        } = std::mem::replace(&mut self.state, State::Lost)
        else {
            return Err(ActivateError::AlreadyActive);
        };
        let ActivateParams {
            mem,
            queues,
            queue_evts,
            interrupt,
            executor,
            ..
        } = params;
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            self.state = State::Ready {
                source,
                rate_limiter,
            };
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                given: 0,
            });
        };
        let handler = RngHandler::new(source, rate_limiter, mem, queue, queue_evt, interrupt)
            .with_metrics(self.metrics.clone());
        match Runner::start("ember-rng".into(), handler, &executor) {
            Ok(runner) => {
                self.state = State::Active(Box::new(runner));
                Ok(())
            }
            Err(err) => {
                let (source, rate_limiter) = err.handler.into_parts();
                self.state = State::Ready {
                    source,
                    rate_limiter,
                };
                Err(ActivateError::Worker(err.error))
            }
        }
    }
}

/// The saved state of an [`Rng`] device, beside its transport's: its rate limiter's buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct RngState {
    /// The rate limiter's buckets.
    pub rate_limiter: RateLimiterState,
}

impl<S: EntropySource> Rng<S> {
    /// The device's state, for a snapshot: the rate limiter's buckets, from the handler's
    /// thread when the device is active. The queue is saved with the transport
    /// ([`VirtioDevice::save_queues`]).
    ///
    /// # Errors
    ///
    /// [`StateError::Handler`] when the handler does not answer, or the device lost its rate
    /// limiter.
    pub fn save_state(&self) -> Result<RngState, StateError> {
        let rate_limiter = match &self.state {
            State::Ready { rate_limiter, .. } => rate_limiter.state(),
            State::Active(handler) => handler.rate_limiter_state().map_err(StateError::Handler)?,
            State::Lost => return Err(lost_handler()),
        };
        Ok(RngState { rate_limiter })
    }

    /// Restores `state` on a device built afresh, before its transport is restored (which
    /// activates it): the rate limiter's buckets are the saved ones.
    ///
    /// # Errors
    ///
    /// [`StateError::RateLimiter`] when the saved buckets are invalid (nothing changes then),
    /// [`StateError::Handler`] as in [`Rng::save_state`].
    pub fn restore_state(&mut self, state: &RngState) -> Result<(), StateError> {
        let restored = match &mut self.state {
            State::Ready { rate_limiter, .. } => rate_limiter.restore(&state.rate_limiter),
            State::Active(handler) => handler
                .restore_rate_limiter(state.rate_limiter.clone())
                .map_err(StateError::Handler)?,
            State::Lost => return Err(lost_handler()),
        };
        restored.map_err(StateError::RateLimiter)
    }
}

/// The error of a device that lost its handler.
fn lost_handler() -> StateError {
    StateError::Handler(io::Error::other("virtio-rng lost its handler"))
}

impl<M, S> VirtioDevice<M> for Rng<S>
where
    M: GuestAddressSpace + Send + 'static,
    S: EntropySource,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // The device has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-rng ignored a {}-byte configuration write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams<M>) -> Result<(), ActivateError> {
        let result = self.start(params);
        if result.is_err() {
            metrics::inc(&self.metrics.activate_fails);
        }
        result
    }

    fn reset(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Lost) {
            State::Active(handler) => match handler.stop() {
                Ok((source, rate_limiter)) => State::Ready {
                    source,
                    rate_limiter,
                },
                Err(err) => {
                    log::error!(
                        "virtio-rng lost its source when its handler stopped, so it cannot be \
                         activated again: {err}"
                    );
                    State::Lost
                }
            },
            state => state,
        };
    }

    /// The queue as the handler holds it, a request the rate limiter holds back given back.
    fn save_queues(&self) -> Result<Vec<Queue>, StateError> {
        match &self.state {
            State::Active(handler) => handler
                .save_queue()
                .map(|queue| vec![queue])
                .map_err(StateError::Handler),
            State::Ready { .. } => Err(StateError::NotActive),
            State::Lost => Err(lost_handler()),
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
    use crate::worker::WorkerGate;

    type Mem = Arc<GuestMemoryMmap<()>>;

    fn params(queues: usize) -> ActivateParams<Mem> {
        let mem = Arc::new(guest_memory(0x10000).unwrap());
        let driver = MockDriver::new(16, GuestAddress(0));
        ActivateParams::new(
            mem,
            FEATURES,
            (0..queues).map(|_| driver.queue()).collect(),
            (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            Arc::new(CountingTrigger::default()),
            WorkerGate::new(),
        )
    }

    #[test]
    fn the_device_is_an_entropy_device_with_one_queue_and_no_configuration() {
        let mut rng = Rng::new(RateLimiter::default());
        let device: &mut dyn VirtioDevice<Mem> = &mut rng;
        assert_eq!(device.device_type(), 4);
        assert_eq!(device.queue_max_sizes(), [256]);
        assert_eq!(device.features(), FEATURES);
        let mut data = [0xffu8; 8];
        device.read_config(0, &mut data);
        assert_eq!(data, [0; 8]);
        device.write_config(0, &[1, 2]);
    }

    #[test]
    fn activating_an_active_device_or_with_the_wrong_queues_is_refused() {
        let mut rng = Rng::new(RateLimiter::default());
        for count in [0, 2] {
            let err = VirtioDevice::<Mem>::activate(&mut rng, params(count)).unwrap_err();
            assert!(
                matches!(err, ActivateError::QueueCount { expected: 1, given } if given == count),
                "{err:?}"
            );
        }
        // The device kept its source and limiter.
        VirtioDevice::<Mem>::activate(&mut rng, params(1)).unwrap();
        assert!(rng.is_active());
        let err = VirtioDevice::<Mem>::activate(&mut rng, params(1)).unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive), "{err:?}");
        assert_eq!(rng.metrics().get("activate_fails"), Some(3));
        VirtioDevice::<Mem>::reset(&mut rng);
        VirtioDevice::<Mem>::reset(&mut rng);
        VirtioDevice::<Mem>::activate(&mut rng, params(1)).unwrap();
        VirtioDevice::<Mem>::reset(&mut rng);
        assert!(!rng.is_active());
    }

    #[test]
    fn a_configuration_write_is_ignored_and_logged() {
        crate::rng::tests::capture_logs();
        let mut rng = Rng::new(RateLimiter::default());
        VirtioDevice::<Mem>::write_config(&mut rng, 0x7c, &[1, 2, 3]);
        let mut data = [0xffu8; 4];
        VirtioDevice::<Mem>::read_config(&rng, 0x7c, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(crate::rng::tests::logged(
            log::Level::Debug,
            "ignored a 3-byte configuration write at 0x7c"
        ));
    }

    #[test]
    fn the_debug_output_names_the_state_of_the_device() {
        let mut rng = Rng::new(RateLimiter::default());
        assert_eq!(format!("{rng:?}"), r#"Rng { state: "ready" }"#);
        VirtioDevice::<Mem>::activate(&mut rng, params(1)).unwrap();
        assert_eq!(format!("{rng:?}"), r#"Rng { state: "active" }"#);
        VirtioDevice::<Mem>::reset(&mut rng);
        assert_eq!(format!("{rng:?}"), r#"Rng { state: "ready" }"#);
    }

    #[test]
    fn a_handler_that_cannot_start_leaves_the_device_ready_to_activate_again() {
        let mut rng = Rng::new(RateLimiter::default());
        let gate = WorkerGate::new();
        gate.set_thread_hook(Some(Arc::new(|_: &str| {
            Err(io::Error::other("no thread for you"))
        })));
        let mut refused = params(1);
        refused.executor = gate.into();
        let err = VirtioDevice::<Mem>::activate(&mut rng, refused).unwrap_err();
        assert!(matches!(err, ActivateError::Worker(_)), "{err:?}");
        assert!(!rng.is_active());
        assert_eq!(rng.metrics().get("activate_fails"), Some(1));
        // The source and the limiter came back with the handler.
        VirtioDevice::<Mem>::activate(&mut rng, params(1)).unwrap();
        assert!(rng.is_active());
        VirtioDevice::<Mem>::reset(&mut rng);
        assert_eq!(rng.metrics().get("activate_fails"), Some(1));
    }

    /// A source that panics when asked, after it says so.
    struct Panicking(Arc<std::sync::atomic::AtomicBool>);

    impl EntropySource for Panicking {
        fn fill(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            panic!("the entropy source broke");
        }
    }

    #[test]
    fn a_handler_that_panicked_loses_the_source_and_the_device_stays_down() {
        crate::rng::tests::capture_logs();
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut rng = Rng::with_source(Panicking(asked.clone()), RateLimiter::default());
        let mem = Arc::new(guest_memory(0x10000).unwrap());
        let mut driver = MockDriver::new(16, GuestAddress(0));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let given = ActivateParams::new(
            mem.clone(),
            FEATURES,
            vec![driver.queue()],
            vec![kick.try_clone().unwrap()],
            Arc::new(CountingTrigger::default()),
            WorkerGate::new(),
        );
        VirtioDevice::<Mem>::activate(&mut rng, given).unwrap();
        driver
            .add_chain(&*mem, &[MockBuffer::writable(0x8000, 64)])
            .unwrap();
        kick.write(1).unwrap();
        while !asked.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::yield_now();
        }
        VirtioDevice::<Mem>::reset(&mut rng);
        assert!(!rng.is_active());
        assert_eq!(format!("{rng:?}"), r#"Rng { state: "source lost" }"#);
        assert!(crate::rng::tests::logged(
            log::Level::Error,
            "virtio-rng lost its source when its handler stopped"
        ));
        // Nothing to serve the queue with: activation is refused, and reset changes nothing.
        let err = VirtioDevice::<Mem>::activate(&mut rng, params(1)).unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive), "{err:?}");
        assert_eq!(rng.metrics().get("activate_fails"), Some(1));
        VirtioDevice::<Mem>::reset(&mut rng);
        assert_eq!(format!("{rng:?}"), r#"Rng { state: "source lost" }"#);
        assert_eq!(driver.used_idx(&*mem).unwrap(), 0);
    }
}
