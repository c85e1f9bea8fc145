#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod acpi_pm;
pub mod boot_timer;
pub mod bounded_writer;
pub mod i8042;
pub mod serial;
mod throttle;
pub mod trigger;

pub use acpi_pm::{ACPI_PM_LEN, AcpiPmDevice, AcpiPmState};
pub use boot_timer::{BOOT_COMPLETE_MAGIC, BOOT_TIMER_LEN, BootTime, BootTimer, ProcessStart};
pub use bounded_writer::{BoundedWriter, BoundedWriterStats, BoundedWriterThread};
pub use i8042::{I8042_BUF_SIZE, I8042_PORT, I8042_PORT_LEN, I8042Device, I8042State};
pub use serial::{
    COM1_PORT, FIFO_SIZE, FeedOutcome, SERIAL_PORT_LEN, SerialDevice, SerialOut, SerialState,
    SerialStats,
};
pub use trigger::EventFdTrigger;
/// The interrupt and request trait every device here fires, re-exported so that a VMM names the
/// same vm-superio version.
pub use vm_superio::Trigger;
