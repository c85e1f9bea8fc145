//! Legacy PC devices for ember guests.
//!
//! - [`SerialDevice`]: the 16550A UART on COM1 that carries the guest's console, with its output
//!   on standard output or a file and its input fed from the VMM's standard input through a
//!   bounded FIFO with back-pressure.
//! - [`BoundedWriter`]: a writer for the console's output that never blocks the vCPU: a bounded
//!   buffer that a thread of its own drains into the real sink, dropping and counting what does
//!   not fit.
//! - [`I8042Device`]: the PS/2 controller, whose CPU reset command is how a Linux guest booted
//!   with `reboot=k` asks the VMM to stop, and through which the VMM can send Ctrl+Alt+Del.
//! - [`AcpiPmDevice`]: the ACPI PM1a registers, through which an ACPI guest powers off.
//! - [`BootTimer`]: an MMIO register the guest's init writes to when it has booted; the VMM logs
//!   how long that took.
//!
//! Each device is a state machine behind [`ember_bus::BusDeviceMut`], put on a bus as
//! `Arc::new(Mutex::new(device))`. Devices never know how their interrupts are delivered: they fire
//! an [`EventFdTrigger`], whose eventfd the VMM registers with KVM as an irqfd or watches in its
//! event loop. Nothing here needs `/dev/kvm`.
//!
//! # Example
//!
//! ```
//! use ember_bus::BusDeviceMut;
//! use ember_legacy::{COM1_PORT, EventFdTrigger, SerialDevice};
//!
//! let interrupt = EventFdTrigger::new()?;
//! let mut serial = SerialDevice::new(interrupt.try_clone()?, Vec::new())?;
//!
//! // The guest enables the "transmitter empty" interrupt and writes a byte to the data register.
//! serial.write(COM1_PORT, 1, &[0x02]);
//! serial.write(COM1_PORT, 0, b"!");
//! assert_eq!(serial.writer().as_slice(), b"!");
//! // The interrupt line was raised.
//! assert!(interrupt.eventfd().read()? >= 1);
//!
//! // The VMM queues input; the line status register (offset 5) shows data ready.
//! assert_eq!(serial.enqueue_input(b"ok"), 2);
//! let mut lsr = [0u8];
//! serial.read(COM1_PORT, 5, &mut lsr);
//! assert_eq!(lsr[0] & 0x01, 0x01);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod acpi_pm;
pub mod boot_timer;
pub mod bounded_writer;
pub mod i8042;
pub mod serial;
mod throttle;
pub mod trigger;

pub use acpi_pm::{ACPI_PM_LEN, AcpiPmDevice};
pub use boot_timer::{BOOT_COMPLETE_MAGIC, BOOT_TIMER_LEN, BootTime, BootTimer, ProcessStart};
pub use bounded_writer::{BoundedWriter, BoundedWriterStats, BoundedWriterThread};
pub use i8042::{I8042_PORT, I8042_PORT_LEN, I8042Device};
pub use serial::{
    COM1_PORT, FIFO_SIZE, FeedOutcome, SERIAL_PORT_LEN, SerialDevice, SerialOut, SerialStats,
};
pub use trigger::EventFdTrigger;
