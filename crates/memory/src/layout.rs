//! The x86_64 guest physical address map.
//!
//! ```text
//! 0 ............................ RAM (up to MMIO32_START) ......... MMIO32_START
//! MMIO32_START ... device MMIO (allocator) ... IOAPIC_START ... LAPIC ... 4 GiB
//! 4 GiB ........................ RAM above the gap (if any) .......................
//! ```
//!
//! Guest RAM fills the address space from 0 up to the 32-bit MMIO gap and continues at 4 GiB when
//! the guest has more memory than fits below the gap.
//!
//! This is ember's platform: the example VMM describes it to the guest by handing the gap, the
//! APICs, the I/O APIC's lines and the ACPI ports and SCI to ember-boot's boot configuration.

/// Start of the 32-bit MMIO gap: no RAM between here and [`FIRST_ADDR_PAST_32BITS`].
pub const MMIO32_START: u64 = 0xd000_0000;

/// Size of the 32-bit MMIO gap (768 MiB).
pub const MMIO32_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO32_START;

/// First address above 4 GiB, where RAM resumes above the gap.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// The I/O APIC's MMIO registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;

/// The local APIC's MMIO registers.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Device MMIO ranges are handed out from `[MMIO32_START, MMIO_DEVICES_END)`, below the APICs.
pub const MMIO_DEVICES_END: u64 = IOAPIC_START;

/// First interrupt line handed to devices: lines below are the legacy ISA devices' (timer,
/// keyboard, COM1 on 4, ...).
pub const IRQ_BASE: u32 = 5;

/// Interrupt lines of the I/O APIC (KVM's in-kernel I/O APIC has 24).
pub const IOAPIC_PINS: u8 = 24;

/// Last interrupt line handed to devices: the I/O APIC's last.
// Widening cast (`u32::from` is not const).
pub const IRQ_MAX: u32 = IOAPIC_PINS as u32 - 1;

/// Interrupt line of the first serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;

/// Interrupt line of the i8042 keyboard controller.
pub const I8042_IRQ: u32 = 1;

/// Interrupt line of the ACPI system control interrupt (SCI). Line 3 (COM2 on a PC) is free in
/// ember's guests and outside the lines handed to devices, which keeps the SCI unshared; ember
/// never raises it.
pub const ACPI_SCI_IRQ: u32 = 3;

/// I/O port of the ACPI PM1a event block (status and enable registers, 2 bytes each); the PM1a
/// control block follows at [`ACPI_PM1_CNT_PORT`]. A guest powers off by writing its sleep type
/// and "sleep enable" to the control register.
pub const ACPI_PM1_EVT_PORT: u16 = 0x600;

/// I/O port of the ACPI PM1a control register (2 bytes).
pub const ACPI_PM1_CNT_PORT: u16 = ACPI_PM1_EVT_PORT + 4;
