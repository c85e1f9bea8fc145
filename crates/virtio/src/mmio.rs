//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the register page through
//! which a guest driver discovers a [`VirtioDevice`], negotiates features, lays out the queues
//! and starts the device.
//!
//! The device status follows an explicit table of transitions ([`TRANSITIONS`]): each write to
//! the status register either matches a row, or sets FAILED, or resets the device (0); anything
//! else is ignored. Features are accepted only while the driver negotiates them (status
//! ACKNOWLEDGE | DRIVER), checked when it sets FEATURES_OK, and queues can only be configured
//! between FEATURES_OK and DRIVER_OK; a queue becomes ready only with a valid size and rings
//! inside guest memory. DRIVER_OK activates the device.
//!
//! Queue notifications go to one eventfd per queue: a KVM VMM registers each as an ioeventfd on
//! [`QUEUE_NOTIFY_OFFSET`] with the queue index as datamatch, so the write never leaves the
//! kernel; without that registration the transport writes the eventfd itself.
//!
//! The transport has one interrupt line per device. Its [`MmioInterrupt`] is the device's
//! [`VirtioInterrupt`]: it turns what the device says happened into the interrupt status
//! register's bits ([`INT_USED_RING`], [`INT_CONFIG`]), the configuration generation and the
//! DEVICE_NEEDS_RESET status, and raises the line through an [`IrqTrigger`].
//!
//! The guest describes the device to Linux on its command line with [`cmdline_device`].
//!
//! A snapshot of a paused VM records the transport with [`MmioTransport::save_state`], the
//! queues of an active device as its handler holds them; a new process restores it on a
//! transport it built afresh for the same device with [`MmioTransport::restore_state`], which
//! activates the device again on the saved queues.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    ActivateError, ActivateParams, IrqTrigger, StateError, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use crate::error::ErrorChain;
use crate::queue::{Queue, QueueState};
use crate::worker::Executor;

/// Size of a device's MMIO register page.
pub const MMIO_SIZE: u64 = 0x1000;

/// Offset of the QueueNotify register, where a VMM registers the queues' ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Offset of the device configuration space in the register page.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// Interrupt status bit: the device used buffers in a queue (VIRTIO_MMIO_INT_VRING).
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the device's configuration changed (VIRTIO_MMIO_INT_CONFIG).
pub const INT_CONFIG: u32 = 2;

/// "virt", little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio version: 2, the modern (virtio 1.x) interface.
const MMIO_VERSION: u32 = 2;
/// The vendor ID the device reports.
pub const VENDOR_ID: u32 = 0;

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// What the transport does when a status write makes a transition.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusStep {
    /// Only record the new status.
    Record,
    /// Check the features the driver accepted; set FEATURES_OK only if they are valid.
    CheckFeatures,
    /// Activate the device.
    Activate,
}

/// The device status transitions a driver may make (virtio 1.2, 3.1.1), as (current status,
/// status written, what the transport does). Besides these, the driver may set FAILED at any
/// time and reset the device by writing 0.
pub const TRANSITIONS: [(u32, u32, StatusStep); 4] = [
    (0, ACKNOWLEDGE, StatusStep::Record),
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, StatusStep::Record),
    (
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        StatusStep::CheckFeatures,
    ),
    (
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        StatusStep::Activate,
    ),
];

/// The `virtio_mmio.device=` parameter by which a Linux guest (with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`) finds a device whose register page is at `base`, on
/// interrupt line `irq`.
pub fn cmdline_device(base: GuestAddress, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{:#x}:{irq}", base.0)
}

/// The interrupt of a device behind an MMIO transport: the interrupt status register, the
/// configuration generation and the DEVICE_NEEDS_RESET condition, over the one interrupt line
/// an [`IrqTrigger`] raises. The transport shares it with the device as its
/// [`VirtioInterrupt`].
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    line: Box<dyn IrqTrigger>,
}

impl fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl MmioInterrupt {
    /// The interrupt of a device in reset, raised on `line`: no status bits, generation 0.
    pub fn new(line: impl IrqTrigger + 'static) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line: Box::new(line),
        }
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

    /// Puts back a saved interrupt status, configuration generation and DEVICE_NEEDS_RESET.
    fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.status.store(status, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// Returns the state to that of a device in reset; the generation keeps counting.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Moves the generation on, sets [`INT_CONFIG`] and raises the line.
    fn config_changed(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(INT_CONFIG)
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.line.trigger()
    }
}

impl VirtioInterrupt for MmioInterrupt {
    /// A used queue sets [`INT_USED_RING`], whichever queue it is; a configuration change
    /// moves the generation on and sets [`INT_CONFIG`]; both raise the line. A reset request
    /// puts the device in DEVICE_NEEDS_RESET and tells the driver through a configuration
    /// change interrupt (virtio 1.2, 2.1.2), once until the next reset.
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        match kind {
            VirtioInterruptType::Queue(_) => self.raise(INT_USED_RING),
            VirtioInterruptType::Config => self.config_changed(),
            VirtioInterruptType::NeedsReset => {
                if self.needs_reset.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                self.config_changed()
            }
        }
    }

    /// Whether [`INT_USED_RING`] is set: the driver has not acknowledged it yet.
    fn queue_interrupt_pending(&self) -> Option<bool> {
        Some(self.status() & INT_USED_RING != 0)
    }
}

/// A virtio device behind its MMIO register page.
///
/// `D` is the device: any [`VirtioDevice`] by default, or a concrete type, so that a VMM that
/// keeps the transport can reach the device's own methods (a new rate limit for a disk) through
/// [`device_mut`](MmioTransport::device_mut).
pub struct MmioTransport<M: GuestAddressSpace, D: ?Sized = dyn VirtioDevice<M>> {
    device: Box<D>,
    mem: M,
    executor: Executor,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    /// Whether the device was activated and not reset since.
    active: bool,
    /// Whether a failed activation was logged as a warning: the next ones are logged at debug
    /// level, since a driver can fail one at every reset.
    activate_failure_logged: bool,
}

impl<M: GuestAddressSpace, D: VirtioDevice<M> + ?Sized> fmt::Debug for MmioTransport<M, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace, D: VirtioDevice<M> + ?Sized> MmioTransport<M, D> {
    /// Puts `device` behind a register page, in reset, raising its interrupt line with
    /// `trigger`; once activated, the device's handler runs where `executor` says: a worker
    /// thread that pauses and resumes with a [`WorkerGate`](crate::WorkerGate), given as is,
    /// or the VMM's event loop.
    ///
    /// # Errors
    ///
    /// When the queue notification eventfds cannot be created.
    pub fn new(
        mem: M,
        device: Box<D>,
        trigger: impl IrqTrigger + 'static,
        executor: impl Into<Executor>,
    ) -> io::Result<Self> {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect();
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            executor: executor.into(),
            interrupt: Arc::new(MmioInterrupt::new(trigger)),
            queues,
            queue_evts,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            active: false,
            activate_failure_logged: false,
        })
    }

    /// The queues' notification eventfds, in queue order: register each as an ioeventfd on
    /// [`QUEUE_NOTIFY_OFFSET`] with its index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt: its status register, configuration generation and
    /// DEVICE_NEEDS_RESET state.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device is serving its queues: the driver set DRIVER_OK and the device
    /// started.
    pub fn is_activated(&self) -> bool {
        self.active
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, to change it; what the transport negotiated with the
    /// driver stays as it is.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Handles a read of `data.len()` bytes at `offset` in the register page. Registers are
    /// read 32 bits at a time; other reads of them read as 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        data.fill(0);
        let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) else {
            debug!(
                "virtio-mmio: ignored {}-byte read at {offset:#x}",
                data.len()
            );
            return;
        };
        let Ok(register) = u32::try_from(offset) else {
            return;
        };
        let value = match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                feature_page(self.device.features(), self.device_features_sel)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // The device has no shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        };
        *word = value.to_le_bytes();
    }

    /// Handles a write of `data` at `offset` in the register page. Registers are written 32
    /// bits at a time; other writes of them are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.status & DRIVER != 0 && self.status & FAILED == 0 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            } else {
                debug!("virtio-mmio: config write before the driver was found, ignored");
            }
            return;
        }
        let (Ok(word), Ok(register)) = (<[u8; 4]>::try_from(data), u32::try_from(offset)) else {
            debug!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(word);
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(register, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = value,
            _ => debug!("virtio-mmio: write of unknown or read-only register {offset:#x}"),
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != ACKNOWLEDGE | DRIVER {
            debug!("virtio-mmio: driver features written outside feature negotiation, ignored");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = u64::from(u32::MAX) << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(value) << shift);
    }

    /// Queue registers are writable between FEATURES_OK and DRIVER_OK, for a queue that exists.
    fn write_queue_register(&mut self, register: u32, value: u32) {
        if self.status != ACKNOWLEDGE | DRIVER | FEATURES_OK {
            debug!(
                "virtio-mmio: queue register {register:#x} written outside queue setup, ignored"
            );
            return;
        }
        let mem = self.mem.memory();
        let Some(queue) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|index| self.queues.get_mut(index))
        else {
            debug!(
                "virtio-mmio: queue register written for absent queue {}",
                self.queue_sel
            );
            return;
        };
        if register == VIRTIO_MMIO_QUEUE_READY {
            if value == 0 {
                queue.set_ready(false);
            } else if let Err(err) = queue.validate(&*mem) {
                // The driver sees the queue stay not ready.
                debug!("virtio-mmio: queue {} refused: {err}", self.queue_sel);
            } else {
                queue.set_ready(true);
            }
            return;
        }
        if queue.ready() {
            debug!(
                "virtio-mmio: queue {} changed while ready, ignored",
                self.queue_sel
            );
            return;
        }
        let set_low =
            |addr: GuestAddress| GuestAddress((addr.0 & !u64::from(u32::MAX)) | u64::from(value));
        let set_high = |addr: GuestAddress| {
            GuestAddress((addr.0 & u64::from(u32::MAX)) | (u64::from(value) << 32))
        };
        match register {
            VIRTIO_MMIO_QUEUE_NUM => {
                // A size that does not fit 16 bits is invalid; u16::MAX is never a power of two
                // and `validate` refuses it.
                queue.set_size(u16::try_from(value).unwrap_or(u16::MAX));
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table(set_low(queue.desc_table())),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table(set_high(queue.desc_table())),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring(set_low(queue.avail_ring())),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring(set_high(queue.avail_ring())),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring(set_low(queue.used_ring())),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring(set_high(queue.used_ring())),
            _ => {}
        }
    }

    fn notify(&self, index: u32) {
        if !self.is_activated() {
            debug!("virtio-mmio: notification of queue {index} before DRIVER_OK, ignored");
            return;
        }
        let Some(evt) = usize::try_from(index)
            .ok()
            .and_then(|i| self.queue_evts.get(i))
        else {
            debug!("virtio-mmio: notification of absent queue {index}, ignored");
            return;
        };
        if let Err(err) = evt.write(1) {
            warn!("virtio-mmio: cannot signal queue {index}: {err}");
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value == self.status | FAILED {
            self.status = value;
            return;
        }
        let step = TRANSITIONS
            .iter()
            .find(|&&(from, to, _)| from == self.status && to == value)
            .map(|&(_, _, step)| step);
        match step {
            Some(StatusStep::Record) => self.status = value,
            Some(StatusStep::CheckFeatures) => {
                if self.features_valid() {
                    self.status = value;
                } else {
                    debug!("virtio-mmio: features {:#x} refused", self.driver_features);
                }
            }
            Some(StatusStep::Activate) => {
                self.status = value;
                self.activate();
            }
            None => debug!(
                "virtio-mmio: status change {:#x} -> {value:#x} is not allowed, ignored",
                self.status
            ),
        }
    }

    /// The driver accepted VERSION_1 and nothing the device did not offer.
    fn features_valid(&self) -> bool {
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        self.driver_features & !self.device.features() == 0 && self.driver_features & version_1 != 0
    }

    fn activate(&mut self) {
        if let Some(index) = self.queues.iter().position(|q| !q.ready()) {
            self.activation_failed(format_args!(
                "the driver started the device with queue {index} not ready"
            ));
            return;
        }
        let queues = self.queues.clone();
        if let Err(err) = self.start_device(queues) {
            self.activation_failed(format_args!(
                "cannot activate the device: {}",
                ErrorChain(&err)
            ));
        }
    }

    /// Activates the device on `queues`, with EVENT_IDX and indirect descriptors set on them as
    /// the driver negotiated: what DRIVER_OK does, and a restore.
    fn start_device(&mut self, mut queues: Vec<Queue>) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let indirect = self.driver_features & (1u64 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
            queue.set_indirect(indirect);
        }
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(ActivateError::Worker)?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let params = ActivateParams::new(
            self.mem.clone(),
            self.driver_features,
            queues,
            queue_evts,
            interrupt,
            self.executor.clone(),
        );
        self.device.activate(params)?;
        self.active = true;
        Ok(())
    }

    /// Logs a failed activation, as a warning the first time only, and asks for a reset.
    fn activation_failed(&mut self, why: fmt::Arguments<'_>) {
        if std::mem::replace(&mut self.activate_failure_logged, true) {
            debug!("virtio-mmio: {why}");
        } else {
            warn!("virtio-mmio: {why} (further failed activations are logged at debug level)");
        }
        self.fail_activation();
    }

    fn fail_activation(&self) {
        if let Err(err) = self.interrupt.trigger(VirtioInterruptType::NeedsReset) {
            warn!("virtio-mmio: cannot signal DEVICE_NEEDS_RESET: {err}");
        }
    }

    /// Returns the device and the transport to their initial state.
    fn reset(&mut self) {
        if std::mem::take(&mut self.active) {
            self.device.reset();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        // Notifications the old driver left behind must not reach the next activation.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
    }
}

/// The saved state of an [`MmioTransport`]: its registers, its interrupt, and its queues, as
/// the handler of an active device holds them, positions included.
///
/// A state read back from a file is untrusted: [`MmioTransport::restore_state`] checks it
/// against the device and guest memory before it changes anything.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct MmioState {
    /// The virtio device ID of the device behind the transport.
    pub device_type: u32,
    /// The device status register, without DEVICE_NEEDS_RESET (`needs_reset`).
    pub status: u32,
    /// The device features page selected.
    pub device_features_sel: u32,
    /// The driver features page selected.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The queue selected.
    pub queue_sel: u32,
    /// The shared memory region selected.
    pub shm_sel: u32,
    /// The queues, one per queue of the device: as the device's handler holds them when the
    /// device is active, as the driver configured them otherwise.
    pub queues: Vec<QueueState>,
    /// The interrupt status register: [`INT_USED_RING`] and [`INT_CONFIG`] bits.
    pub interrupt_status: u32,
    /// The configuration generation.
    pub config_generation: u32,
    /// Whether the device is in DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// Whether the device was active: the driver set DRIVER_OK and the device started.
    pub active: bool,
}

/// The device status values a driver can reach (FAILED aside): each row of [`TRANSITIONS`]
/// leads to the next.
const REACHABLE_STATUS: [u32; 5] = [
    0,
    ACKNOWLEDGE,
    ACKNOWLEDGE | DRIVER,
    ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
];

impl<M: GuestAddressSpace, D: VirtioDevice<M> + ?Sized> MmioTransport<M, D> {
    /// The transport's state, for a snapshot of a paused VM: the registers, the interrupt, and
    /// the queues, those of an active device as its handler holds them
    /// ([`VirtioDevice::save_queues`]).
    ///
    /// The VMM pauses the device first (its vCPUs stopped, then its [`WorkerGate`] closed), so
    /// that nothing moves between this and the snapshot of guest memory; a paused worker still
    /// answers the call that saves its queues. A device served by the VMM's own event loop
    /// (`Executor::EventManager`) answers from that loop, which must then run on another
    /// thread: the VMM makes sure it has no work left (vCPUs stopped, backends quiet) before it
    /// saves the queues and guest memory.
    ///
    /// [`WorkerGate`]: crate::WorkerGate
    ///
    /// # Errors
    ///
    /// Those of [`VirtioDevice::save_queues`], for an active device.
    pub fn save_state(&self) -> Result<MmioState, StateError> {
        let queues = if self.active {
            self.device.save_queues()?
        } else {
            self.queues.clone()
        };
        Ok(MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            queues: queues.iter().map(Queue::state).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
            active: self.active,
        })
    }

    /// Restores `state` on a transport built afresh (in reset) for the same kind of device
    /// over the same guest memory: the registers and the interrupt as saved, and, when the
    /// device was active, the device activated on the saved queues as DRIVER_OK activates it,
    /// so that its handler goes on from the saved positions. Each queue's notification eventfd
    /// is then signalled once, so that the handler looks at its rings for what the driver
    /// made available before the snapshot (a notification the old process had not handled is
    /// not in the snapshot). When an interrupt was pending, the line is raised once more, so
    /// that it is not lost whatever the interrupt controller's saved state; a driver reads
    /// the interrupt status and ignores one it has already seen.
    ///
    /// Nothing is changed unless the whole state fits: the device type, the number of queues
    /// and their maximum sizes are the device's, the driver accepted only features the device
    /// offers, the status is one a driver can reach, and each ready queue has a valid size and
    /// rings inside guest memory.
    ///
    /// # Errors
    ///
    /// [`StateError::Invalid`] when the state does not fit the device or the transport is not
    /// fresh, [`StateError::Queue`] for a queue a driver could not have set up, and
    /// [`StateError::Activate`] when the device cannot be activated again (the transport is
    /// then in reset).
    pub fn restore_state(&mut self, state: &MmioState) -> Result<(), StateError> {
        let queues = self.check_state(state)?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.shm_sel = state.shm_sel;
        self.interrupt.restore(
            state.interrupt_status,
            state.config_generation,
            state.needs_reset,
        );
        self.queues = queues.clone();
        if state.active {
            if let Err(err) = self.start_device(queues) {
                self.reset();
                return Err(StateError::Activate(err));
            }
            for (index, evt) in self.queue_evts.iter().enumerate() {
                if let Err(err) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal restored queue {index}: {err}");
                }
            }
        }
        if state.interrupt_status != 0 {
            if let Err(err) = self.interrupt.line.trigger() {
                warn!("virtio-mmio: cannot raise the restored interrupt: {err}");
            }
        }
        Ok(())
    }

    /// Checks `state` against the device, guest memory and this transport, and returns its
    /// queues.
    fn check_state(&self, state: &MmioState) -> Result<Vec<Queue>, StateError> {
        let invalid = |why: String| Err(StateError::Invalid(why));
        if self.active || self.status != 0 {
            return invalid("the transport is in use; restore on one built afresh".into());
        }
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return invalid(format!(
                "it is of a device of type {}, and this device is of type {device_type}",
                state.device_type
            ));
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return invalid(format!(
                "it has {} queues, and the device has {}",
                state.queues.len(),
                max_sizes.len()
            ));
        }
        let unknown = state.driver_features & !self.device.features();
        if unknown != 0 {
            return invalid(format!(
                "the driver accepted features {unknown:#x} that the device does not offer"
            ));
        }
        if !REACHABLE_STATUS.contains(&(state.status & !FAILED)) {
            return invalid(format!(
                "the device status {:#x} is not one a driver can reach",
                state.status
            ));
        }
        if state.status & FEATURES_OK != 0
            && state.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0
        {
            return invalid("the features were accepted without VIRTIO_F_VERSION_1".into());
        }
        if state.active && state.status & DRIVER_OK == 0 {
            return invalid("the device was active without DRIVER_OK".into());
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return invalid(format!(
                "the interrupt status {:#x} has bits the transport never sets",
                state.interrupt_status
            ));
        }
        let mem = self.mem.memory();
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (saved, &max_size)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != max_size {
                return invalid(format!(
                    "queue {index} has a maximum size of {}, and the device's is {max_size}",
                    saved.max_size
                ));
            }
            let queue =
                Queue::from_state(saved).map_err(|source| StateError::Queue { index, source })?;
            if queue.ready() {
                queue
                    .validate(&*mem)
                    .map_err(|source| StateError::Queue { index, source })?;
            } else if state.active {
                return invalid(format!(
                    "the device was active with queue {index} not ready"
                ));
            }
            queues.push(queue);
        }
        Ok(queues)
    }
}

/// Page `sel` (0: bits 0-31, 1: bits 32-63) of a feature word; other pages are 0.
fn feature_page(features: u64, sel: u32) -> u32 {
    let page = match sel {
        0 => features,
        1 => features >> 32,
        _ => 0,
    };
    u32::try_from(page & u64::from(u32::MAX)).unwrap_or_default()
}

impl<M: GuestAddressSpace + Send, D: VirtioDevice<M> + ?Sized> ember_bus::BusDeviceMut
    for MmioTransport<M, D>
{
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::mock::{CountingTrigger, MockDevice, MockDeviceLog, MockDriver, guest_memory};
    use crate::worker::WorkerGate;

    type Mem = Arc<GuestMemoryMmap<()>>;

    const MEM_SIZE: usize = 0x10000;
    const QUEUE_MAX: u16 = 16;
    const DEVICE_TYPE: u32 = 42;
    const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | 0b101;

    struct Setup {
        transport: MmioTransport<Mem, MockDevice>,
        seen: Arc<Mutex<MockDeviceLog>>,
        drivers: Vec<MockDriver>,
    }

    fn setup_with_queues(count: usize) -> Setup {
        let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
        let (device, seen) =
            MockDevice::new(DEVICE_TYPE, &vec![QUEUE_MAX; count], OFFERED, b"config!!");
        let transport = MmioTransport::new(
            mem,
            Box::new(device),
            CountingTrigger::default(),
            WorkerGate::new(),
        )
        .unwrap();
        let drivers = (0..count)
            .map(|i| {
                MockDriver::new(
                    QUEUE_MAX,
                    GuestAddress(0x1000 * (u64::try_from(i).unwrap() + 1)),
                )
            })
            .collect();
        Setup {
            transport,
            seen,
            drivers,
        }
    }

    fn setup() -> Setup {
        setup_with_queues(2)
    }

    fn read(t: &MmioTransport<Mem, MockDevice>, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport<Mem, MockDevice>, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport<Mem, MockDevice>, features: u64) {
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        for page in 0..2u32 {
            write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
            write(t, VIRTIO_MMIO_DRIVER_FEATURES, feature_page(features, page));
        }
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    fn configure_queue(
        t: &mut MmioTransport<Mem, MockDevice>,
        index: u32,
        driver: &MockDriver,
        size: u32,
    ) {
        write(t, VIRTIO_MMIO_QUEUE_SEL, index);
        write(t, VIRTIO_MMIO_QUEUE_NUM, size);
        let rings = [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, driver.desc_table()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, driver.avail_ring()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, driver.used_ring()),
        ];
        for (low, addr) in rings {
            write(t, low, feature_page(addr.0, 0));
            write(t, low + 4, feature_page(addr.0, 1));
        }
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Negotiates `features`, configures every queue and sets DRIVER_OK.
    fn start(s: &mut Setup, features: u64) {
        negotiate(&mut s.transport, features);
        for (i, driver) in s.drivers.iter().enumerate() {
            configure_queue(
                &mut s.transport,
                u32::try_from(i).unwrap(),
                driver,
                u32::from(QUEUE_MAX),
            );
        }
        write(
            &mut s.transport,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
    }

    /// Every register a driver can read, for comparing whole transport states.
    fn registers(t: &mut MmioTransport<Mem, MockDevice>) -> Vec<u32> {
        let mut values = Vec::new();
        for sel in 0..3 {
            write(t, VIRTIO_MMIO_QUEUE_SEL, sel);
            write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            for offset in (0..0x100).step_by(4) {
                values.push(read(t, offset));
            }
        }
        write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        values
    }

    #[test]
    fn identity_registers_read_as_virtio_mmio_version_2() {
        let s = setup();
        assert_eq!(read(&s.transport, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(
            read(&s.transport, VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_MAX)
        );
        assert_eq!(read(&s.transport, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn device_features_are_read_in_two_pages() {
        let mut s = setup();
        assert_eq!(
            read(&s.transport, VIRTIO_MMIO_DEVICE_FEATURES),
            feature_page(OFFERED, 0)
        );
        write(&mut s.transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        write(&mut s.transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn registers_are_only_accessed_32_bits_at_a_time() {
        let mut s = setup();
        let mut half = [0xffu8; 2];
        s.transport
            .read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut half);
        assert_eq!(half, [0, 0]);
        s.transport.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        s.transport
            .write(u64::from(VIRTIO_MMIO_STATUS), &1u64.to_le_bytes());
        assert_eq!(read(&s.transport, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn status_follows_the_transition_table() {
        let mut s = setup();
        let t = &mut s.transport;
        // Each step can only be taken from the one before it.
        for skipped in [
            DRIVER,
            ACKNOWLEDGE | DRIVER,
            ACKNOWLEDGE | FEATURES_OK,
            DRIVER_OK,
        ] {
            write(t, VIRTIO_MMIO_STATUS, skipped);
            assert_eq!(read(t, VIRTIO_MMIO_STATUS), 0, "{skipped:#x} from 0");
        }
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE);
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE);
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        // Bits cannot be cleared one by one.
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        // FAILED can be set at any point.
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER | FAILED);
        // And then nothing goes forward.
        write(
            t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK,
        );
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER | FAILED);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_features() {
        for (features, accepted) in [
            (1u64 << VIRTIO_F_VERSION_1, true),
            (OFFERED, true),
            (0b1, false),
            (OFFERED | 0b10, false),
            (OFFERED | (1 << 40), false),
        ] {
            let mut s = setup();
            negotiate(&mut s.transport, features);
            let status = read(&s.transport, VIRTIO_MMIO_STATUS);
            assert_eq!(
                status & FEATURES_OK != 0,
                accepted,
                "features {features:#x}"
            );
        }
    }

    #[test]
    fn driver_features_are_only_written_during_negotiation() {
        let mut s = setup();
        write(&mut s.transport, VIRTIO_MMIO_DRIVER_FEATURES, 0b1);
        assert_eq!(s.transport.driver_features(), 0);
        negotiate(&mut s.transport, OFFERED);
        write(&mut s.transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut s.transport, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(s.transport.driver_features(), OFFERED);
    }

    #[test]
    fn queues_are_only_configured_between_features_ok_and_driver_ok() {
        let mut s = setup();
        let driver = s.drivers[0].clone();
        // Before FEATURES_OK.
        write(&mut s.transport, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        write(&mut s.transport, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        configure_queue(&mut s.transport, 0, &driver, 8);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_QUEUE_READY), 0);
        write(&mut s.transport, VIRTIO_MMIO_STATUS, 0);

        // After DRIVER_OK.
        start(&mut s, OFFERED);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_READY, 0);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_QUEUE_READY), 1);
        let (_, queues) = &s.seen.lock().unwrap().activations[0];
        assert_eq!(queues[0].size(), QUEUE_MAX);
    }

    #[test]
    fn a_queue_with_an_invalid_size_does_not_become_ready() {
        for size in [0, 3, u32::from(QUEUE_MAX) * 2, 0x1_0000 + 8] {
            let mut s = setup();
            negotiate(&mut s.transport, OFFERED);
            let driver = s.drivers[0].clone();
            configure_queue(&mut s.transport, 0, &driver, size);
            assert_eq!(
                read(&s.transport, VIRTIO_MMIO_QUEUE_READY),
                0,
                "size {size}"
            );
        }
    }

    #[test]
    fn a_queue_with_rings_outside_guest_memory_does_not_become_ready() {
        let mut s = setup();
        negotiate(&mut s.transport, OFFERED);
        let outside = MockDriver::new(
            QUEUE_MAX,
            GuestAddress(u64::try_from(MEM_SIZE).unwrap() - 0x100),
        );
        configure_queue(&mut s.transport, 0, &outside, u32::from(QUEUE_MAX));
        assert_eq!(read(&s.transport, VIRTIO_MMIO_QUEUE_READY), 0);
        let above_4g = MockDriver::new(QUEUE_MAX, GuestAddress(1 << 32));
        configure_queue(&mut s.transport, 0, &above_4g, u32::from(QUEUE_MAX));
        assert_eq!(read(&s.transport, VIRTIO_MMIO_QUEUE_READY), 0);
        let inside = s.drivers[0].clone();
        configure_queue(&mut s.transport, 0, &inside, u32::from(QUEUE_MAX));
        assert_eq!(read(&s.transport, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn a_ready_queue_cannot_be_moved() {
        let mut s = setup();
        negotiate(&mut s.transport, OFFERED);
        let driver = s.drivers[0].clone();
        configure_queue(&mut s.transport, 0, &driver, u32::from(QUEUE_MAX));
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NUM, 4);
        let driver1 = s.drivers[1].clone();
        configure_queue(&mut s.transport, 1, &driver1, u32::from(QUEUE_MAX));
        write(
            &mut s.transport,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        let (_, queues) = &s.seen.lock().unwrap().activations[0];
        assert_eq!(queues[0].desc_table(), driver.desc_table());
        assert_eq!(queues[0].size(), QUEUE_MAX);
    }

    #[test]
    fn driver_ok_activates_with_the_negotiated_features_and_queues() {
        let mut s = setup();
        start(&mut s, OFFERED);
        assert!(s.transport.is_activated());
        let seen = s.seen.lock().unwrap();
        assert_eq!(seen.activations.len(), 1);
        let (features, queues) = &seen.activations[0];
        assert_eq!(*features, OFFERED);
        assert_eq!(queues.len(), 2);
        for (queue, driver) in queues.iter().zip(&s.drivers) {
            assert!(queue.ready());
            assert!(queue.event_idx_enabled());
            assert!(queue.indirect_enabled());
            assert_eq!(queue.desc_table(), driver.desc_table());
            assert_eq!(queue.avail_ring(), driver.avail_ring());
            assert_eq!(queue.used_ring(), driver.used_ring());
        }
    }

    #[test]
    fn event_idx_is_off_when_not_negotiated() {
        let mut s = setup();
        start(&mut s, 1 << VIRTIO_F_VERSION_1);
        let seen = s.seen.lock().unwrap();
        assert!(!seen.activations[0].1[0].event_idx_enabled());
    }

    #[test]
    fn indirect_descriptors_are_off_when_not_negotiated() {
        let mut s = setup();
        start(&mut s, 1 << VIRTIO_F_VERSION_1);
        let seen = s.seen.lock().unwrap();
        assert!(seen.activations[0].1.iter().all(|q| !q.indirect_enabled()));
    }

    #[test]
    fn driver_ok_with_a_queue_not_ready_needs_reset() {
        let mut s = setup();
        negotiate(&mut s.transport, OFFERED);
        let driver = s.drivers[0].clone();
        configure_queue(&mut s.transport, 0, &driver, u32::from(QUEUE_MAX));
        write(
            &mut s.transport,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(s.seen.lock().unwrap().activations.is_empty());
        assert_ne!(read(&s.transport, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
        assert_ne!(
            read(&s.transport, VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG,
            0
        );
    }

    #[test]
    fn a_failed_activation_needs_reset() {
        let mut s = setup();
        s.seen.lock().unwrap().fail_activation = true;
        start(&mut s, OFFERED);
        assert_ne!(read(&s.transport, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
        // A reset clears it, and the driver can start again.
        write(&mut s.transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_STATUS), 0);
        s.seen.lock().unwrap().fail_activation = false;
        start(&mut s, OFFERED);
        assert_eq!(
            read(&s.transport, VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    #[test]
    fn activations_failed_in_a_loop_warn_once_and_each_needs_reset() {
        let mut s = setup();
        s.seen.lock().unwrap().fail_activation = true;
        assert!(!s.transport.activate_failure_logged);
        for _ in 0..100 {
            start(&mut s, OFFERED);
            assert!(s.transport.activate_failure_logged);
            assert_ne!(read(&s.transport, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
            write(&mut s.transport, VIRTIO_MMIO_STATUS, 0);
        }
        // A reset does not rearm the warning: only a new transport logs one again.
        assert!(s.transport.activate_failure_logged);
    }

    #[test]
    fn queue_notify_signals_that_queues_eventfd_once_started() {
        let mut s = setup();
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(
            s.transport.queue_evts()[1].read().is_err(),
            "not before DRIVER_OK"
        );
        start(&mut s, OFFERED);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(s.transport.queue_evts()[1].read().unwrap(), 1);
        assert!(s.transport.queue_evts()[0].read().is_err());
        // Queues that do not exist are ignored.
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    }

    #[test]
    fn interrupt_status_is_acknowledged_bit_by_bit() {
        let mut s = setup();
        start(&mut s, OFFERED);
        let interrupt = s.transport.interrupt();
        interrupt.trigger(VirtioInterruptType::Queue(1)).unwrap();
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(
            read(&s.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            INT_USED_RING | INT_CONFIG
        );
        assert_eq!(read(&s.transport, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        write(&mut s.transport, VIRTIO_MMIO_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    }

    #[test]
    fn config_space_is_bounded_and_writable_once_the_driver_is_found() {
        let mut s = setup();
        let mut data = [0xffu8; 8];
        s.transport.read(CONFIG_OFFSET + 4, &mut data);
        assert_eq!(&data, b"ig!!\0\0\0\0");
        s.transport.read(CONFIG_OFFSET + 0xf00, &mut data[..1]);
        assert_eq!(data[0], 0);
        s.transport.write(CONFIG_OFFSET + 1, &[7]);
        assert!(s.seen.lock().unwrap().config_writes.is_empty());
        write(&mut s.transport, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        write(&mut s.transport, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        s.transport.write(CONFIG_OFFSET + 1, &[7]);
        assert_eq!(s.seen.lock().unwrap().config_writes, [(1, vec![7])]);
    }

    #[test]
    fn reset_returns_everything_to_its_initial_state() {
        let mut fresh = setup();
        let initial = registers(&mut fresh.transport);

        let mut s = setup();
        start(&mut s, OFFERED);
        let interrupt = s.transport.interrupt();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        interrupt.trigger(VirtioInterruptType::NeedsReset).unwrap();
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(&mut s.transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        write(&mut s.transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut s.transport, VIRTIO_MMIO_STATUS, 0);

        assert_eq!(s.seen.lock().unwrap().resets, 1);
        assert_eq!(s.transport.driver_features(), 0);
        assert!(
            s.transport.queue_evts()[0].read().is_err(),
            "stale notification dropped"
        );
        // Only the configuration generation keeps counting across a reset.
        let mut after = registers(&mut s.transport);
        let generation = usize::try_from(VIRTIO_MMIO_CONFIG_GENERATION / 4).unwrap();
        for sel in 0..3 {
            after[sel * 64 + generation] = initial[sel * 64 + generation];
        }
        assert_eq!(after, initial);
        // The driver can go through the whole sequence again.
        start(&mut s, OFFERED);
        assert_eq!(s.seen.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn reset_before_driver_ok_does_not_reset_the_device() {
        let mut s = setup();
        negotiate(&mut s.transport, OFFERED);
        write(&mut s.transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(s.seen.lock().unwrap().resets, 0);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn cmdline_names_the_page_and_the_line() {
        assert_eq!(
            cmdline_device(GuestAddress(0xd000_1000), 5),
            "virtio_mmio.device=4K@0xd0001000:5"
        );
    }

    #[test]
    fn a_device_without_queues_reports_size_zero() {
        let mut s = setup_with_queues(0);
        assert_eq!(read(&s.transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        start(&mut s, OFFERED);
        assert_eq!(s.seen.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn each_interrupt_kind_sets_its_status_bit_until_acknowledged() {
        let line = CountingTrigger::default();
        let interrupt = MmioInterrupt::new(line.clone());
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING);
        // Any queue sets the same bit: the line is the device's, not the queue's.
        interrupt.trigger(VirtioInterruptType::Queue(5)).unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING);
        assert_eq!(interrupt.config_generation(), 0);
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(interrupt.config_generation(), 1);
        assert!(!interrupt.needs_reset());
        interrupt.ack(INT_USED_RING);
        assert_eq!(interrupt.status(), INT_CONFIG);
        assert_eq!(line.count(), 3);
    }

    #[test]
    fn needs_reset_is_signalled_once_as_a_config_change_until_reset() {
        let line = CountingTrigger::default();
        let interrupt = MmioInterrupt::new(line.clone());
        interrupt.trigger(VirtioInterruptType::NeedsReset).unwrap();
        interrupt.trigger(VirtioInterruptType::NeedsReset).unwrap();
        assert!(interrupt.needs_reset());
        assert_eq!(interrupt.status(), INT_CONFIG);
        assert_eq!(interrupt.config_generation(), 1);
        assert_eq!(line.count(), 1);
        interrupt.reset();
        assert!(!interrupt.needs_reset());
        assert_eq!(interrupt.status(), 0);
        // The generation keeps counting across the reset, and the next request is signalled.
        interrupt.trigger(VirtioInterruptType::NeedsReset).unwrap();
        assert_eq!(interrupt.config_generation(), 2);
        assert_eq!(line.count(), 2);
    }

    #[test]
    fn an_eventfd_line_is_written_once_per_interrupt() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = MmioInterrupt::new(evt.try_clone().unwrap());
        interrupt.trigger(VirtioInterruptType::Queue(1)).unwrap();
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn the_device_is_given_the_transports_interrupt_as_its_own() {
        let mut s = setup();
        s.seen.lock().unwrap().raise_on_activation = Some(VirtioInterruptType::Queue(1));
        start(&mut s, OFFERED);
        assert_eq!(
            read(&s.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            INT_USED_RING
        );
    }

    /// A transport built afresh, as a new process builds it, for the same kind of device over
    /// the same guest memory as `s`, with the counter of its interrupt line.
    fn twin(s: &Setup) -> (Setup, CountingTrigger) {
        let queues = VirtioDevice::<Mem>::queue_max_sizes(s.transport.device()).len();
        let (device, seen) =
            MockDevice::new(DEVICE_TYPE, &vec![QUEUE_MAX; queues], OFFERED, b"config!!");
        let line = CountingTrigger::default();
        let transport = MmioTransport::new(
            s.transport.mem.clone(),
            Box::new(device),
            line.clone(),
            WorkerGate::new(),
        )
        .unwrap();
        let twin = Setup {
            transport,
            seen,
            drivers: s.drivers.clone(),
        };
        (twin, line)
    }

    /// The state of `s`, through the encoding of a snapshot file.
    fn saved(s: &Setup) -> MmioState {
        let state = s.transport.save_state().unwrap();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let decoded: MmioState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);
        decoded
    }

    #[test]
    fn a_transport_saved_during_setup_is_restored_register_for_register() {
        let mut s = setup();
        negotiate(&mut s.transport, OFFERED);
        let driver = s.drivers[0].clone();
        configure_queue(&mut s.transport, 0, &driver, u32::from(QUEUE_MAX));
        // Queue 1 is half configured: a size the driver may still change.
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(&mut s.transport, VIRTIO_MMIO_QUEUE_NUM, 3);
        write(&mut s.transport, VIRTIO_MMIO_SHM_SEL, 7);
        let state = saved(&s);
        assert!(!state.active);

        let (mut t, line) = twin(&s);
        t.transport.restore_state(&state).unwrap();
        assert_eq!(t.transport.save_state().unwrap(), state);
        assert_eq!(registers(&mut t.transport), registers(&mut s.transport));
        assert!(t.seen.lock().unwrap().activations.is_empty());
        assert_eq!(line.count(), 0);
        // The driver goes on where it was.
        let driver1 = t.drivers[1].clone();
        configure_queue(&mut t.transport, 1, &driver1, u32::from(QUEUE_MAX));
        write(
            &mut t.transport,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.transport.is_activated());
        assert_eq!(t.seen.lock().unwrap().activations[0].0, OFFERED);
    }

    #[test]
    fn an_active_transport_is_restored_with_its_device_active_on_the_saved_queues() {
        let mut s = setup();
        start(&mut s, OFFERED);
        {
            // The device's handler has moved on in the rings.
            let mut seen = s.seen.lock().unwrap();
            let queue = &mut seen.activations[0].1[1];
            queue.set_next_avail(5);
            queue.set_next_used(4);
        }
        let interrupt = s.transport.interrupt();
        interrupt.trigger(VirtioInterruptType::Queue(1)).unwrap();
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        write(&mut s.transport, VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
        let state = saved(&s);
        assert!(state.active);
        assert_eq!(
            (state.queues[1].next_avail, state.queues[1].next_used),
            (5, 4)
        );

        let (mut t, line) = twin(&s);
        t.transport.restore_state(&state).unwrap();
        assert!(t.transport.is_activated());
        assert_eq!(registers(&mut t.transport), registers(&mut s.transport));
        {
            let seen = t.seen.lock().unwrap();
            assert_eq!(seen.activations.len(), 1);
            let (features, queues) = &seen.activations[0];
            assert_eq!(*features, OFFERED);
            assert_eq!((queues[1].next_avail(), queues[1].next_used()), (5, 4));
            assert!(queues.iter().all(|q| q.event_idx_enabled() && q.ready()));
        }
        assert_eq!(t.transport.interrupt().status(), INT_USED_RING);
        assert_eq!(t.transport.interrupt().config_generation(), 1);
        // The pending interrupt is raised again, and each queue looked at once.
        assert_eq!(line.count(), 1);
        for evt in t.transport.queue_evts() {
            assert_eq!(evt.read().unwrap(), 1);
        }
        // A restored device resets as any other.
        write(&mut t.transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.seen.lock().unwrap().resets, 1);
    }

    #[test]
    fn a_device_in_needs_reset_is_restored_so() {
        let mut s = setup();
        s.seen.lock().unwrap().fail_activation = true;
        start(&mut s, OFFERED);
        let state = saved(&s);
        assert!(state.needs_reset && !state.active);
        let (mut t, _) = twin(&s);
        t.transport.restore_state(&state).unwrap();
        assert!(!t.transport.is_activated());
        assert_eq!(
            read(&t.transport, VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
        );
        write(&mut t.transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&t.transport, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn states_that_do_not_fit_the_device_are_refused_and_change_nothing() {
        let mut s = setup();
        start(&mut s, OFFERED);
        let good = saved(&s);
        type Edit = fn(&mut MmioState);
        let edits: [(&str, Edit); 12] = [
            ("another device type", |st| st.device_type += 1),
            ("a queue less", |st| {
                st.queues.pop();
            }),
            ("a queue more", |st| st.queues.push(st.queues[0].clone())),
            ("another maximum size", |st| st.queues[0].max_size *= 2),
            ("a size not a power of two", |st| st.queues[0].size = 6),
            ("a size above the maximum", |st| {
                st.queues[1].size = QUEUE_MAX * 2;
            }),
            ("rings outside guest memory", |st| {
                st.queues[0].used_ring = u64::try_from(MEM_SIZE).unwrap();
            }),
            ("features the device lacks", |st| {
                st.driver_features |= 1 << 40
            }),
            ("a status no driver reaches", |st| st.status = DRIVER),
            ("active without DRIVER_OK", |st| {
                st.status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
            }),
            ("active with a queue not ready", |st| {
                st.queues[0].ready = false;
            }),
            ("unknown interrupt bits", |st| st.interrupt_status = 4),
        ];
        for (what, edit) in edits {
            let mut state = good.clone();
            edit(&mut state);
            let (mut t, line) = twin(&s);
            let err = t.transport.restore_state(&state).unwrap_err();
            assert!(
                matches!(err, StateError::Invalid(_) | StateError::Queue { .. }),
                "{what}: {err:?}"
            );
            assert_eq!(read(&t.transport, VIRTIO_MMIO_STATUS), 0, "{what}");
            assert!(!t.transport.is_activated(), "{what}");
            assert!(t.seen.lock().unwrap().activations.is_empty(), "{what}");
            assert_eq!(line.count(), 0, "{what}");
        }
        let mut state = good.clone();
        state.queues[0].size = 6;
        let err = twin(&s).0.transport.restore_state(&state).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Queue {
                    index: 0,
                    source: crate::queue::Error::InvalidSize { size: 6, .. }
                }
            ),
            "{err:?}"
        );
        // The state itself was fine.
        twin(&s).0.transport.restore_state(&good).unwrap();
    }

    #[test]
    fn a_transport_in_use_refuses_a_restore() {
        let mut s = setup();
        start(&mut s, OFFERED);
        let state = saved(&s);
        let err = s.transport.restore_state(&state).unwrap_err();
        assert!(matches!(err, StateError::Invalid(_)), "{err:?}");
        let (mut t, _) = twin(&s);
        write(&mut t.transport, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert!(t.transport.restore_state(&state).is_err());
    }

    #[test]
    fn a_device_that_cannot_start_again_fails_the_restore_and_stays_in_reset() {
        let mut s = setup();
        start(&mut s, OFFERED);
        let state = saved(&s);
        let (mut t, _) = twin(&s);
        t.seen.lock().unwrap().fail_activation = true;
        let err = t.transport.restore_state(&state).unwrap_err();
        assert!(matches!(err, StateError::Activate(_)), "{err:?}");
        assert!(!t.transport.is_activated());
        assert_eq!(read(&t.transport, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(t.transport.driver_features(), 0);
    }

    #[test]
    fn states_garbled_at_random_are_restored_or_refused_without_a_panic() {
        let mut s = setup();
        start(&mut s, OFFERED);
        let good = postcard::to_stdvec(&saved(&s)).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut restored = 0;
        for _ in 0..2000 {
            let mut bytes = good.clone();
            for _ in 0..=next() % 4 {
                let at = usize::try_from(next() % u64::try_from(bytes.len()).unwrap()).unwrap();
                bytes[at] = u8::try_from(next() & 0xff).unwrap();
            }
            let Ok(state) = postcard::from_bytes::<MmioState>(&bytes) else {
                continue;
            };
            let (mut t, _) = twin(&s);
            if t.transport.restore_state(&state).is_ok() {
                restored += 1;
                // Whatever was accepted, the driver can reset and start the device again.
                write(&mut t.transport, VIRTIO_MMIO_STATUS, 0);
                start(&mut t, OFFERED);
                assert!(t.transport.is_activated());
            }
        }
        assert!(restored > 0);
    }
}
