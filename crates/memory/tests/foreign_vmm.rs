//! ember-memory under another VMM: guest RAM from `create_guest_memory` is plain vm-memory, which
//! the VMM's own code reads and writes through vm-memory's traits, and the allocator hands out
//! the VMM's own MMIO window and interrupt lines (here a PCI-style 64-bit window and MSI-like
//! vectors 32 and up).

use ember_memory::allocator::Error;
use ember_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, MemoryOptions, ResourceAllocator,
    create_guest_memory, mem_size_from_mib,
};

/// Code of the foreign VMM, generic over any vm-memory guest memory.
fn checksum<M: GuestMemory>(mem: &M, addr: GuestAddress, len: usize) -> u8 {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, addr).unwrap();
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

#[test]
fn guest_ram_is_vm_memory_for_the_vmm_s_own_code() {
    let mem = create_guest_memory(mem_size_from_mib(8).unwrap(), MemoryOptions::default()).unwrap();
    mem.write_slice(&[1, 2, 3, 250], GuestAddress(0x7000))
        .unwrap();
    assert_eq!(checksum(&mem, GuestAddress(0x7000), 4), 0);
    assert!(mem.address_in_range(GuestAddress((8 << 20) - 1)));
    assert!(!mem.address_in_range(GuestAddress(8 << 20)));
}

#[test]
fn the_allocator_serves_the_vmm_s_own_window_and_lines() {
    let window = 0x40_0000_0000..0x40_0001_0000;
    let mut allocator = ResourceAllocator::with_ranges(window.clone(), 32..=33);
    let bar = allocator.allocate_mmio_aligned(0x4000, 0x4000).unwrap();
    assert_eq!(bar, GuestAddress(window.start));
    let next = allocator.allocate_mmio(0x1000).unwrap();
    assert_eq!(next, GuestAddress(window.start + 0x4000));
    assert!(matches!(
        allocator.allocate_mmio(0x1_0000),
        Err(Error::MmioExhausted { .. })
    ));
    assert_eq!(allocator.allocate_irq(), Ok(32));
    assert_eq!(allocator.allocate_irq(), Ok(33));
    assert_eq!(allocator.allocate_irq(), Err(Error::IrqExhausted));
}

#[test]
fn a_vmm_s_own_memory_map_saves_to_a_file_and_maps_back() {
    use std::fs::File;

    use ember_memory::{GuestMemoryMmap, merge_diff, write_dirty_pages, write_memory};
    use vmm_sys_util::tempfile::TempFile;

    // The VMM's own map: RAM below 1 MiB and a window at 16 MiB; the file holds them back to back.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x100_0000), 0x8000),
    ])
    .unwrap();
    mem.write_obj(0xabu8, GuestAddress(0x100_0000)).unwrap();
    let file = TempFile::new().unwrap();
    let mut full = File::options()
        .read(true)
        .write(true)
        .open(file.as_path())
        .unwrap();
    write_memory(&mem, &mut full).unwrap();
    let bytes = std::fs::read(file.as_path()).unwrap();
    assert_eq!(bytes.len(), 0x10_8000);
    assert_eq!(bytes[0x10_0000], 0xab);

    // A diff of the second region's last page, merged.
    mem.write_obj(0xcdu8, GuestAddress(0x100_7fff)).unwrap();
    let dirty = vec![vec![0; 4], vec![1 << 7]];
    let diff = TempFile::new().unwrap();
    let mut diff_file = File::options()
        .read(true)
        .write(true)
        .open(diff.as_path())
        .unwrap();
    assert_eq!(
        write_dirty_pages(&mem, &mut diff_file, &dirty).unwrap(),
        0x1000
    );
    assert_eq!(merge_diff(&full, &diff_file).unwrap(), 0x1000);
    assert_eq!(std::fs::read(file.as_path()).unwrap()[0x10_7fff], 0xcd);
}
