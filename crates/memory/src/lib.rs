#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod allocator;
pub mod file;
pub mod layout;
mod ram;
pub mod uffd;

#[cfg(test)]
mod smaps;

pub use allocator::ResourceAllocator;
pub use file::{
    clean_dirty_bitmap, merge_diff, take_bitmap_dirty_pages, write_dirty_pages, write_memory,
};
pub use ram::{
    Advice, Error, MemoryOptions, PAGE_SIZE, Result, TrackedGuestMemory, create_guest_memory,
    create_guest_memory_from_file, create_tracked_guest_memory,
    create_tracked_guest_memory_from_file, mem_size_from_mib, ram_regions,
};
pub use vm_memory::bitmap::AtomicBitmap;
pub use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
