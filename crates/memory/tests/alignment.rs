//! Guest RAM's host mappings start on 2 MiB boundaries, so that KVM can map the host's huge
//! pages whole. A test of its own, in a process of its own: placement depends on what else the
//! process maps at the same time.

use ember_memory::layout::MMIO32_START;
use ember_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryOptions, create_guest_memory};

const MIB: u64 = 1 << 20;
const HUGE_PAGE: usize = 2 << 20;

#[test]
fn ram_regions_are_mapped_at_2_mib_aligned_host_addresses() {
    // Sizes that are not whole huge pages too, which no kernel aligns by itself, and one with a
    // region above the MMIO gap. All stay mapped, as the RAM of VMs running side by side.
    let mut all = Vec::new();
    for mib in [2, 3, 33, 129, 256, MMIO32_START / MIB + 5, 1] {
        let mem = create_guest_memory(mib * MIB, MemoryOptions::default()).unwrap();
        for region in mem.iter() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            if region.len() >= HUGE_PAGE as u64 {
                assert_eq!(
                    host.addr() % HUGE_PAGE,
                    0,
                    "{mib} MiB: the region at {:#x} is mapped at {host:p}",
                    region.start_addr().0
                );
            }
        }
        all.push(mem);
    }
}
