//! What a virtio device is to its transport: the [`VirtioDevice`] trait, the [`Interrupt`] a
//! device raises, and what the transport hands a device when the driver sets DRIVER_OK.
//!
//! A device knows its type, its queues' maximum sizes, the features it offers and its
//! configuration space. When the driver has configured the queues, the transport calls
//! [`VirtioDevice::activate`] with [`ActivateParams`]: guest memory, the negotiated features, the
//! queues, one notification eventfd per queue and the [`Interrupt`]. The device then serves its
//! queues on a worker thread of its own (see [`crate::worker`]) until [`VirtioDevice::reset`].
//!
//! How an interrupt reaches the guest is not the device's business: [`Interrupt`] calls an
//! [`IrqTrigger`], which a KVM VMM implements with an eventfd registered as an irqfd (the
//! implementation for [`EventFd`] does just that).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::queue::Queue;
use crate::worker::WorkerGate;

/// Interrupt status bit: the device used buffers in a queue (VIRTIO_MMIO_INT_VRING).
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the device's configuration changed (VIRTIO_MMIO_INT_CONFIG).
pub const INT_CONFIG: u32 = 2;

/// Raises a device's interrupt line in the guest.
pub trait IrqTrigger: Send + Sync {
    /// Raises the interrupt once.
    ///
    /// # Errors
    ///
    /// When the interrupt cannot be delivered.
    fn trigger(&self) -> io::Result<()>;
}

/// An eventfd registered as a KVM irqfd raises its interrupt line when written.
impl IrqTrigger for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// The interrupt state a transport shares with its device's worker: the interrupt status
/// register, the configuration generation, the DEVICE_NEEDS_RESET condition, and the trigger
/// that raises the interrupt line.
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    trigger: Box<dyn IrqTrigger>,
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// Creates the interrupt state of a device in reset: no status bits, generation 0.
    pub fn new(trigger: impl IrqTrigger + 'static) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            trigger: Box::new(trigger),
        }
    }

    /// Tells the driver the device used buffers: sets [`INT_USED_RING`] and raises the line.
    ///
    /// # Errors
    ///
    /// When the trigger fails.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(INT_USED_RING)
    }

    /// Tells the driver the configuration space changed: moves the generation on, sets
    /// [`INT_CONFIG`] and raises the line.
    ///
    /// # Errors
    ///
    /// When the trigger fails.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(INT_CONFIG)
    }

    /// Puts the device in DEVICE_NEEDS_RESET, after the driver broke the protocol, and tells
    /// the driver through a configuration change interrupt (virtio 1.2, 2.1.2).
    ///
    /// # Errors
    ///
    /// When the trigger fails.
    pub fn set_needs_reset(&self) -> io::Result<()> {
        if self.needs_reset.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.signal_config_change()
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.trigger.trigger()
    }

    /// The interrupt status register: [`INT_USED_RING`] and [`INT_CONFIG`] bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the status bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The configuration generation, moved on at every configuration change.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Whether the device is in DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Returns the state to that of a device in reset; the generation keeps counting.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// What the transport hands a device when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateParams<M> {
    /// Guest memory, which holds the queues' rings and buffers.
    pub mem: Arc<M>,
    /// The features the driver accepted: a subset of [`VirtioDevice::features`].
    pub features: u64,
    /// The queues as the driver configured them, ready and validated, one per
    /// [`VirtioDevice::queue_max_sizes`] entry, with EVENT_IDX and indirect descriptors on when
    /// they were negotiated.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, written when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The gate the device's worker is to be spawned with, so the VMM can pause it.
    pub gate: WorkerGate,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device was given a number of queues other than the number it has.
    #[error("The device has {expected} queues but was given {given}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        given: usize,
    },
    /// The device is already active, or its backend is gone.
    #[error("The device is already active")]
    AlreadyActive,
    /// The device's backend cannot be set up for the negotiated features.
    #[error("Cannot set up the device's backend")]
    Backend(#[source] io::Error),
    /// The device's worker thread cannot be started.
    #[error("Cannot start the device's worker thread")]
    Worker(#[source] io::Error),
}

/// A virtio device, as its transport sees it.
///
/// The transport reads the identity, features and queue sizes, forwards configuration space
/// accesses, and drives the device's lifecycle: [`activate`](Self::activate) once the driver has
/// set DRIVER_OK, [`reset`](Self::reset) when the driver writes 0 to the status register.
pub trait VirtioDevice<M>: Send {
    /// The virtio device ID (`virtio_bindings::virtio_ids`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the device has one queue per entry.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// Reads the device configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset`; devices ignore writes to read-only
    /// fields.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts serving the queues.
    ///
    /// # Errors
    ///
    /// When the device cannot start; the transport then sets DEVICE_NEEDS_RESET.
    fn activate(&mut self, params: ActivateParams<M>) -> Result<(), ActivateError>;

    /// Stops serving the queues and returns to the state the device had before activation.
    fn reset(&mut self);
}

/// Copies the part of `config` at `offset` into `data`, zero-filling whatever lies past its end:
/// the usual [`VirtioDevice::read_config`] of a device with a byte-array configuration space.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(src) = config.get(start..) else {
        return;
    };
    let count = src.len().min(data.len());
    if let (Some(dst), Some(src)) = (data.get_mut(..count), src.get(..count)) {
        dst.copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::CountingTrigger;

    #[test]
    fn signals_set_status_bits_until_acknowledged() {
        let count = CountingTrigger::default();
        let interrupt = Interrupt::new(count.clone());
        interrupt.signal_used_queue().unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING);
        interrupt.signal_config_change().unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(interrupt.config_generation(), 1);
        interrupt.ack(INT_USED_RING);
        assert_eq!(interrupt.status(), INT_CONFIG);
        assert_eq!(count.count(), 2);
    }

    #[test]
    fn needs_reset_signals_a_config_change_once() {
        let count = CountingTrigger::default();
        let interrupt = Interrupt::new(count.clone());
        interrupt.set_needs_reset().unwrap();
        interrupt.set_needs_reset().unwrap();
        assert!(interrupt.needs_reset());
        assert_eq!(interrupt.status(), INT_CONFIG);
        assert_eq!(count.count(), 1);
        interrupt.reset();
        assert!(!interrupt.needs_reset());
        assert_eq!(interrupt.status(), 0);
    }

    #[test]
    fn eventfd_trigger_writes_the_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(evt.try_clone().unwrap());
        interrupt.signal_used_queue().unwrap();
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
