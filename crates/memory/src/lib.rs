#![doc = include_str!("../README.md")]
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
