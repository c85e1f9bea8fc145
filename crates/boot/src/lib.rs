//! Boot-time setup of x86_64 guest memory: the structures a kernel expects to find when its boot
//! vCPU starts.
//!
//! - [`cmdline`]: the kernel command line, built with its length checked and written at
//!   [`layout::CMDLINE_START`].
//! - [`e820`]: the memory map, derived from guest memory's regions.
//! - [`mptable`]: the MP table describing the vCPUs and the I/O APIC.
//! - [`gdt`] and [`paging`]: descriptor tables and identity page tables for the entry mode.
//! - [`cpu`]: the resulting vCPU state as plain data, which the vCPU crate applies.
//!
//! Nothing here touches KVM: all of it is tested against plain guest memory, written through
//! vm-memory's [`Bytes`](vm_memory::Bytes) API at the fixed addresses of [`layout`].
//!
//! # Example
//!
//! ```
//! use ember_boot::{layout, mptable, paging};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
//! mptable::setup_mptable(&mem, 2)?;
//! let mut signature = [0u8; 4];
//! mem.read_slice(&mut signature, GuestAddress(layout::MPTABLE_START)).unwrap();
//! assert_eq!(&signature, b"_MP_");
//! assert_eq!(paging::setup_identity_paging(&mem)?, layout::PML4_START);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod cmdline;
pub mod cpu;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;

pub use cmdline::{build_cmdline, load_cmdline};
pub use cpu::CpuState;
pub use linux_loader::cmdline::Cmdline;
