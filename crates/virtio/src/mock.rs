//! Mock devices, backends and helpers for tests, fuzz targets and benches (feature
//! `test-utils`), with the mock guest driver of [`ember_virtqueue::mock`], re-exported here.
//!
//! [`MockDevice`] is a [`VirtioDevice`] that only records what its transport does to it, for
//! testing transports.

use std::os::fd::{AsRawFd, RawFd};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ember_rate_limiter::{BucketConfig, RateLimiter};
pub use ember_virtqueue::mock::*;
use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    ActivateError, ActivateParams, IrqTrigger, StateError, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, read_config_bytes,
};
use crate::iov::GuestIoVecs;
use crate::net::NetBackend;
use crate::queue::Queue;
use crate::tap::Tap;

/// What a [`MockDevice`] saw of its lifecycle, and how it answers the next activation.
#[derive(Debug, Default)]
pub struct MockDeviceLog {
    /// The features and queues of each activation, in order.
    pub activations: Vec<(u64, Vec<Queue>)>,
    /// How many times the device was reset.
    pub resets: usize,
    /// Each configuration space write, as (offset, data).
    pub config_writes: Vec<(u64, Vec<u8>)>,
    /// Whether the next activations fail.
    pub fail_activation: bool,
    /// What the device tells the driver through its interrupt when activated, if anything.
    pub raise_on_activation: Option<VirtioInterruptType>,
    /// Whether the device is active: activated and not reset since.
    pub active: bool,
}

/// A device that does nothing but record what its transport does to it in a shared
/// [`MockDeviceLog`]. Its saved queues ([`VirtioDevice::save_queues`]) are those of its last
/// activation.
#[derive(Debug)]
pub struct MockDevice {
    log: Arc<Mutex<MockDeviceLog>>,
    device_type: u32,
    queue_sizes: Vec<u16>,
    features: u64,
    config: Vec<u8>,
}

impl MockDevice {
    /// A device of type `device_type` with one queue per entry of `queue_sizes`, offering
    /// `features`, with configuration space `config`; returns it with its log.
    pub fn new(
        device_type: u32,
        queue_sizes: &[u16],
        features: u64,
        config: &[u8],
    ) -> (Self, Arc<Mutex<MockDeviceLog>>) {
        let log = Arc::new(Mutex::new(MockDeviceLog::default()));
        let device = MockDevice {
            log: log.clone(),
            device_type,
            queue_sizes: queue_sizes.to_vec(),
            features,
            config: config.to_vec(),
        };
        (device, log)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, MockDeviceLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<M: GuestAddressSpace> VirtioDevice<M> for MockDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log().config_writes.push((offset, data.to_vec()));
    }

    fn activate(&mut self, params: ActivateParams<M>) -> std::result::Result<(), ActivateError> {
        let mut log = self.log();
        if log.fail_activation {
            return Err(ActivateError::AlreadyActive);
        }
        if params.queue_evts.len() != params.queues.len() {
            return Err(ActivateError::QueueCount {
                expected: params.queues.len(),
                given: params.queue_evts.len(),
            });
        }
        if let Some(kind) = log.raise_on_activation {
            params
                .interrupt
                .trigger(kind)
                .map_err(ActivateError::Backend)?;
        }
        log.activations.push((params.features, params.queues));
        log.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        let mut log = self.log();
        log.resets += 1;
        log.active = false;
    }

    fn save_queues(&self) -> std::result::Result<Vec<Queue>, StateError> {
        let log = self.log();
        match log.activations.last() {
            Some((_, queues)) if log.active => Ok(queues.clone()),
            _ => Err(StateError::NotActive),
        }
    }
}

/// A TAP for tests and benches, named after `pattern` (`%d` lets the kernel number it), up and
/// with IPv6 off so that the host sends nothing through it of its own accord; or why there
/// cannot be one here (it takes root, `/dev/net/tun` and `ip`).
///
/// # Errors
///
/// Why the TAP cannot be made or brought up, as a sentence.
pub fn test_tap(pattern: &str) -> std::result::Result<Tap, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let tap = Tap::open(pattern).map_err(|err| {
        let source = std::error::Error::source(&err)
            .map(|source| format!(": {source}"))
            .unwrap_or_default();
        format!("{err}{source}")
    })?;
    // Without IPv6 on the host there is nothing to turn off.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name()),
        "1",
    );
    let status = Command::new("ip")
        .args(["link", "set", "dev", tap.name(), "up"])
        .status()
        .map_err(|err| format!("cannot run ip: {err}"))?;
    if !status.success() {
        return Err(format!("ip link set dev {} up failed", tap.name()));
    }
    Ok(tap)
}

/// A network backend that never runs dry, for flood tests: its descriptor (an eventfd) is
/// always readable and writable, every read hands over a frame of zeroes of the length it was
/// made with, and every write is taken whole.
#[derive(Debug)]
pub struct EndlessNetwork {
    evt: EventFd,
    frame_len: usize,
}

impl EndlessNetwork {
    /// A network whose every frame, header included, is `frame_len` bytes long.
    ///
    /// # Errors
    ///
    /// When the eventfd cannot be created or written.
    pub fn new(frame_len: usize) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        evt.write(1)?;
        Ok(EndlessNetwork { evt, frame_len })
    }
}

impl AsRawFd for EndlessNetwork {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl NetBackend for EndlessNetwork {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = self.frame_len.min(buf.len());
        if let Some(frame) = buf.get_mut(..len) {
            frame.fill(0);
        }
        Ok(self.frame_len)
    }

    fn write_frame<M: GuestMemory + ?Sized>(
        &mut self,
        frame: &GuestIoVecs<'_, M>,
    ) -> std::io::Result<usize> {
        Ok(frame.iovecs().iter().map(|iov| iov.iov_len).sum())
    }

    fn set_offload(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// An interrupt line, or a device's whole interrupt, that counts the interrupts raised through
/// it, whatever they say, in a counter its clones share, instead of delivering them.
#[derive(Clone, Debug, Default)]
pub struct CountingTrigger(Arc<std::sync::atomic::AtomicUsize>);

impl CountingTrigger {
    /// How many interrupts were raised so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqTrigger for CountingTrigger {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl VirtioInterrupt for CountingTrigger {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        IrqTrigger::trigger(self)
    }
}

/// A bucket of `size` tokens refilled every `refill_time` ms, without a one-time burst.
pub fn bucket(size: u64, refill_time: u64) -> Option<BucketConfig> {
    Some(BucketConfig {
        size,
        one_time_burst: 0,
        refill_time,
    })
}

/// Waits for `limiter`'s timerfd to become readable, for at most 5 seconds.
///
/// # Panics
///
/// When it does not, or epoll fails.
pub fn wait_timer(limiter: &RateLimiter) {
    let epoll = Epoll::new().expect("an epoll instance");
    epoll
        .ctl(
            ControlOperation::Add,
            limiter.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .expect("the timerfd joins the epoll set");
    let mut events = [EpollEvent::default()];
    assert_eq!(
        epoll.wait(5000, &mut events).expect("epoll_wait"),
        1,
        "no timer event"
    );
}

/// The counters that moved between two readings of a device's counters (`BlockMetrics::values`,
/// `NetMetrics::values`), with how much each moved.
pub fn counters_moved(
    before: &[(&'static str, u64)],
    after: &[(&'static str, u64)],
) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(&(name, b), &(_, a))| (name, a.wrapping_sub(b)))
        .collect()
}
