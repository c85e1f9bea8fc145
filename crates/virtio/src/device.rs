//! What a virtio device is to its transport: the [`VirtioDevice`] trait, the
//! [`VirtioInterrupt`] a device raises, and what the transport hands a device when the driver
//! sets DRIVER_OK.
//!
//! A device knows its type, its queues' maximum sizes, the features it offers and its
//! configuration space. When the driver has configured the queues, the transport calls
//! [`VirtioDevice::activate`] with [`ActivateParams`]: guest memory, the negotiated features, the
//! queues, one notification eventfd per queue, the interrupt and the [`Executor`] that says
//! where the device's handler runs (a worker thread of its own by default, see
//! [`crate::worker`]). The device serves its queues there until [`VirtioDevice::reset`].
//!
//! How an interrupt reaches the guest is not the device's business: it tells its
//! [`VirtioInterrupt`] what happened ([`VirtioInterruptType`]: queue N used, configuration
//! changed, needs reset), and the transport decides what the guest sees. The MMIO transport
//! sets its interrupt status register and raises its one line
//! ([`MmioInterrupt`](crate::mmio::MmioInterrupt) over an [`IrqTrigger`], which a KVM VMM
//! implements with an eventfd registered as an irqfd); a PCI transport with MSI-X gives each
//! queue a vector of its own.

use std::io;
use std::sync::Arc;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::queue::Queue;
use crate::worker::Executor;

/// Raises an interrupt line in the guest: what a transport that has one line per device (as
/// virtio-mmio does) raises its interrupt through.
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

/// What a device tells the driver through its interrupt.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VirtioInterruptType {
    /// The device put buffers in the used ring of the queue with this index.
    Queue(u16),
    /// The device's configuration space changed.
    Config,
    /// The driver broke the protocol and the device needs a reset (DEVICE_NEEDS_RESET, virtio
    /// 1.2, 2.1.2): the transport sets that status, once until the next reset, and tells the
    /// driver as it tells it of a configuration change.
    NeedsReset,
}

/// How a device tells the driver that something happened: the transport's business, which a
/// VMM implements (or takes the MMIO transport's, [`MmioInterrupt`](crate::mmio::MmioInterrupt)).
///
/// A device calls it from wherever its handler runs; it must not block.
pub trait VirtioInterrupt: Send + Sync {
    /// Tells the driver of `kind`.
    ///
    /// # Errors
    ///
    /// When the interrupt cannot be delivered.
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()>;

    /// Whether the driver has yet to take a queue interrupt the device raised, where the
    /// transport can tell: virtio-mmio's interrupt status, until the driver acknowledges it.
    /// `None` (the default) where it cannot, as with an MSI-X vector, which has no status.
    ///
    /// A device takes it as a hint of how the driver works: a driver that makes a request
    /// available before it has taken the last interrupt did not wait for that interrupt, so it
    /// keeps several requests in flight.
    fn queue_interrupt_pending(&self) -> Option<bool> {
        None
    }
}

/// What the transport hands a device when the driver sets DRIVER_OK.
#[non_exhaustive]
pub struct ActivateParams<M: GuestAddressSpace> {
    /// Guest memory, which holds the queues' rings and buffers. The device takes a snapshot
    /// ([`GuestAddressSpace::memory`]) for each batch of work, so that memory the VMM plugs in
    /// later is reached.
    pub mem: M,
    /// The features the driver accepted: a subset of [`VirtioDevice::features`].
    pub features: u64,
    /// The queues as the driver configured them, ready and validated, one per
    /// [`VirtioDevice::queue_max_sizes`] entry, with EVENT_IDX and indirect descriptors on when
    /// they were negotiated.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, written when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Where the device's handler is to run: a worker thread of its own behind a gate the VMM
    /// pauses, or the VMM's event loop.
    pub executor: Executor,
}

impl<M: GuestAddressSpace> ActivateParams<M> {
    /// What a device needs to start: `mem`, the negotiated `features`, the ready `queues`
    /// and their notification eventfds `queue_evts`, and the `interrupt`; its handler runs
    /// where `executor` says.
    pub fn new(
        mem: M,
        features: u64,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
        executor: impl Into<Executor>,
    ) -> Self {
        ActivateParams {
            mem,
            features,
            queues,
            queue_evts,
            interrupt,
            executor: executor.into(),
        }
    }
}

impl<M: GuestAddressSpace> std::fmt::Debug for ActivateParams<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateParams")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues)
            .field("executor", &self.executor)
            .finish_non_exhaustive()
    }
}

/// Why a device could not be activated.
#[non_exhaustive]
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
    /// The device's handler cannot be started where the [`Executor`] says: its worker thread
    /// cannot be spawned, or the VMM's event loop refused it.
    #[error("Cannot start serving the device's queues")]
    Worker(#[source] io::Error),
}

/// A virtio device, as its transport sees it.
///
/// The transport reads the identity, features and queue sizes, forwards configuration space
/// accesses, and drives the device's lifecycle: [`activate`](Self::activate) once the driver has
/// set DRIVER_OK, [`reset`](Self::reset) when the driver writes 0 to the status register.
///
/// `M` is the guest memory as the VMM holds it: any [`GuestAddressSpace`], such as
/// `Arc<GuestMemoryMmap>` or a `GuestMemoryAtomic` that memory hot-plug updates.
pub trait VirtioDevice<M: GuestAddressSpace>: Send {
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

    /// The queues of an active device as its handler holds them now, positions included:
    /// what a snapshot of a paused VM records, and what [`activate`](Self::activate) takes
    /// back on restore. A chain the handler has taken but not yet returned is given back to
    /// the available ring (the queue's `next_avail` is before it), so that the restored
    /// device takes it again.
    ///
    /// # Errors
    ///
    /// [`StateError::Unsupported`] for a device that cannot be saved (the default);
    /// [`StateError::NotActive`] when the device is not active; [`StateError::Handler`] when
    /// its handler does not answer.
    fn save_queues(&self) -> Result<Vec<Queue>, StateError> {
        Err(StateError::Unsupported)
    }
}

/// Why the state of a device cannot be saved or restored.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The device does not support snapshots.
    #[error("The device does not support snapshots")]
    Unsupported,
    /// The device is not active: there are no running queues to save.
    #[error("The device is not active")]
    NotActive,
    /// The device's handler cannot be reached.
    #[error("The device's handler does not answer")]
    Handler(#[source] io::Error),
    /// The saved state does not fit this device.
    #[error("The saved state does not fit the device: {0}")]
    Invalid(String),
    /// A saved queue is not one a driver could have set up.
    #[error("The saved state of queue {index} is invalid")]
    Queue {
        /// The queue's index.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: crate::queue::Error,
    },
    /// The device, active when saved, cannot be activated again.
    #[error("Cannot activate the restored device")]
    Activate(#[source] ActivateError),
    /// A saved rate limiter's buckets are invalid.
    #[error("Cannot restore the device's rate limiter")]
    RateLimiter(#[source] ember_rate_limiter::Error),
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
