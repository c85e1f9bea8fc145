//! Ember's boot layout, [`BootLayout::default`](crate::BootLayout::default), and the boot
//! protocol's fixed addresses and sizes.
//!
//! ```text
//! 0x0500  GDT (4 entries)            0x0520  IDT (one empty entry)
//! 0x6000  PVH hvm_start_info         0x6040  PVH module list   0x6100  PVH memory map
//! 0x7000  Linux zero page (boot_params)
//! 0x8ff0  boot stack (grows down)
//! 0x9000  PML4   0xa000  PDPT   0xb000..0xf000  four page directories (2 MiB pages, 4 GiB)
//! 0x20000 kernel command line (at most 2048 bytes with its NUL)
//! 0x9fc00 MP table, in the EBDA, reserved up to 1 MiB
//! 0xe0000 ACPI tables, from the RSDP, in the BIOS area Linux scans
//! 0x100000 the kernel
//! ```
//!
//! The platform the tables describe (MMIO gap, APICs, interrupt lines, ACPI ports) is the VMM's
//! and comes with the [`Platform`](crate::Platform) it passes.

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;

/// Interrupt descriptor table.
pub const IDT_START: u64 = 0x520;

/// PVH boot protocol: the `hvm_start_info` structure, passed in `rbx`.
pub const PVH_INFO_START: u64 = 0x6000;

/// PVH boot protocol: the module list (`hvm_modlist_entry`), holding the initrd.
pub const PVH_MODLIST_START: u64 = 0x6040;

/// PVH boot protocol: the memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6100;

/// Linux boot protocol: the zero page (`boot_params`), passed in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer of the boot vCPU for the Linux 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// The identity page tables: the PML4, then the PDPT, then the four page directories, one page
/// each.
pub const PAGE_TABLES_START: u64 = 0x9000;

/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;

/// Largest kernel command line, its terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the extended BIOS data area: conventional RAM ends here (639 KiB), and the memory
/// map reports the firmware range from here up to [`HIMEM_START`] as reserved.
pub const EBDA_START: u64 = 0x9_fc00;

/// The MP floating pointer and configuration table, at the start of the EBDA where Linux looks
/// for them.
pub const MPTABLE_START: u64 = EBDA_START;

/// The ACPI tables, starting with the RSDP, in the read-only BIOS area (0xe0000 to 1 MiB) where
/// Linux looks for the RSDP when the boot protocol does not give its address.
pub const ACPI_START: u64 = 0xe_0000;

/// Start of high memory (1 MiB): the kernel is loaded here or above, whatever the layout.
pub const HIMEM_START: u64 = 0x10_0000;

/// Highest address an initrd may occupy when the kernel does not say otherwise (the Linux boot
/// protocol's default `initrd_addr_max`).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Guest page size; the initrd starts on a page boundary.
pub const PAGE_SIZE: u64 = 0x1000;
