//! Loading an x86_64 kernel into guest memory and setting up everything it expects at boot, on
//! the platform the VMM describes.
//!
//! A VMM describes its platform and where the boot structures go in a [`BootConfig`], then calls
//! these functions in a straight line, after creating guest memory and before running the boot
//! vCPU:
//!
//! 1. [`load_kernel`] loads an ELF `vmlinux` or a `bzImage` (detected from the image) with
//!    linux-loader, after validating its headers. An ELF carrying the PVH note boots with the PVH
//!    protocol, anything else with the Linux 64-bit boot protocol.
//! 2. [`load_initrd`] places an initrd as high as the kernel and the configuration allow,
//!    page-aligned.
//! 3. [`build_cmdline`] builds the command line, checked against the 2048 bytes reserved for it.
//! 4. [`configure_system`] writes the command line, the memory map, the MP table for the vCPUs,
//!    the ACPI tables through which the guest powers off, the zero page or PVH start info, the
//!    GDT, IDT and page tables, and returns the [`CpuState`] that the VMM loads into the boot
//!    vCPU.
//!
//! The [`BootConfig`] holds a [`Platform`] (the I/O APIC and local APIC addresses, the I/O APIC's
//! lines, the ACPI PM1a ports and SCI, the 32-bit MMIO gap), which is the VMM's own, and a
//! [`BootLayout`] (the addresses of the boot structures), whose default is ember's layout below
//! 1 MiB ([`layout`]). It is validated before anything is written: overlapping structures,
//! structures past the gap or outside guest memory, or over the kernel or the initrd are errors.
//!
//! Nothing here touches KVM: all of it is tested against plain guest memory. Every structure is
//! written through vm-memory's [`Bytes`](vm_memory::Bytes) API. Images are treated as untrusted
//! input: sizes and addresses read from them are checked before use, and a bad image is an error,
//! never a panic.
//!
//! Functions that only write guest memory are generic over vm-memory's `GuestMemory`; those that
//! need its regions (to load through linux-loader, to build the memory map or to place the
//! initrd) over `GuestMemoryBackend`, which every `GuestMemoryMmap` is.
//!
//! # Example
//!
//! ```
//! use std::io::Cursor;
//! use ember_boot::{AcpiPm, BootConfig, Platform, build_cmdline, configure_system, layout};
//! use ember_boot::{load_initrd, load_kernel};
//! use ember_boot::test_utils::tiny_elf;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! let platform = Platform::new(
//!     0xfec0_0000,                 // I/O APIC
//!     0xfee0_0000,                 // local APICs
//!     24,                          // I/O APIC lines
//!     0xc000_0000..0x1_0000_0000,  // MMIO gap
//!     AcpiPm::new(0x600, 0x604, 9), // PM1a event and control ports, SCI line
//! );
//! let config = BootConfig::new(platform, 2);
//! // A "kernel" that halts: hlt.
//! let kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4])))?;
//! let initrd = load_initrd(&mem, &mut Cursor::new(vec![0x55u8; 5000]), &kernel, &config)?;
//! let cmdline = build_cmdline("console=ttyS0 reboot=k panic=1", &[])?;
//! let cpu = configure_system(&mem, &kernel, &cmdline, Some(initrd), &config)?;
//!
//! assert_eq!(cpu.regs.rip, kernel.entry.0);
//! assert_eq!(cpu.regs.rsi, layout::ZERO_PAGE_START);
//! assert_eq!(cpu.sregs.cr3, layout::PAGE_TABLES_START);
//! assert!(cpu.sregs.cs.l, "the kernel is entered in 64-bit mode");
//! assert!(initrd.addr.0 >= kernel.end.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod acpi;
pub mod cmdline;
pub mod config;
pub mod cpu;
pub mod e820;
pub mod gdt;
pub mod initrd;
pub mod kernel;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod system;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use cmdline::{build_cmdline, load_cmdline};
pub use config::{AcpiPm, BootConfig, BootLayout, Platform};
pub use cpu::CpuState;
pub use initrd::{InitrdRegion, load_initrd};
pub use kernel::{KernelFormat, LoadedKernel, load_kernel};
pub use linux_loader::cmdline::Cmdline;
pub use system::configure_system;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
