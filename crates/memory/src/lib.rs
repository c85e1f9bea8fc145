//! Guest memory for x86_64 virtual machines: the guest physical address map, guest RAM backed by
//! host mappings, and the allocator that gives devices their MMIO ranges and interrupt lines.
//!
//! - [`layout`] fixes where things live: RAM from 0 up to the 32-bit MMIO gap at
//!   [`layout::MMIO32_START`], device MMIO and the APICs inside the gap, and RAM that does not fit
//!   below the gap from 4 GiB up.
//! - [`ram_regions`] lays a memory size out on that map and [`create_guest_memory`] maps it as
//!   vm-memory's [`GuestMemoryMmap`]: private anonymous memory that the host commits only as the
//!   guest touches it, optionally open to KSM merging and transparent huge pages
//!   ([`MemoryOptions`]), mapped at 2 MiB-aligned host addresses so that KVM can map the host's
//!   huge pages whole.
//! - [`ResourceAllocator`] hands out non-overlapping MMIO ranges from the gap and interrupt lines
//!   [`layout::IRQ_BASE`]`..=`[`layout::IRQ_MAX`].
//!
//! Sizes are validated and all address arithmetic is checked: a bad size is an [`Error`], never a
//! panic. The vm-memory types and traits that users of the memory need are re-exported, so that
//! they name the same vm-memory version as this crate.
//!
//! # Example
//!
//! ```
//! use ember_memory::{
//!     Bytes, GuestAddress, MemoryOptions, ResourceAllocator, create_guest_memory, layout,
//!     mem_size_from_mib, ram_regions,
//! };
//!
//! // A 4 GiB guest keeps 768 MiB of its RAM above 4 GiB, past the MMIO gap.
//! let regions = ram_regions(mem_size_from_mib(4096)?)?;
//! assert_eq!(regions[1], (GuestAddress(layout::FIRST_ADDR_PAST_32BITS), 768 << 20));
//!
//! let mem = create_guest_memory(mem_size_from_mib(16)?, MemoryOptions::default())?;
//! mem.write_obj(0x1234_5678_9abc_def0u64, GuestAddress(0x1000))?;
//! assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000))?, 0x1234_5678_9abc_def0);
//! // Past the end of RAM is not memory.
//! assert!(mem.write_obj(0u64, GuestAddress(16 << 20)).is_err());
//!
//! let mut allocator = ResourceAllocator::new();
//! assert_eq!(allocator.allocate_mmio(0x1000)?, GuestAddress(layout::MMIO32_START));
//! assert_eq!(allocator.allocate_mmio(0x200)?, GuestAddress(layout::MMIO32_START + 0x1000));
//! assert_eq!(allocator.allocate_irq()?, layout::IRQ_BASE);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod allocator;
pub mod layout;
mod ram;

pub use allocator::ResourceAllocator;
pub use ram::{
    Advice, Error, MemoryOptions, PAGE_SIZE, Result, create_guest_memory, mem_size_from_mib,
    ram_regions,
};
pub use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
