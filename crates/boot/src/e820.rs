//! The guest's memory map, as both boot protocols hand it to the kernel.
//!
//! The map is derived from guest memory's regions: RAM everywhere the regions are, except that the
//! firmware range of the [`BootLayout`](crate::BootLayout) (ember's: from the EBDA, where the MP
//! table lives, up to 1 MiB) is reported as reserved. RAM below the MMIO gap, the gap itself (a
//! hole: no entry, and no RAM allowed there) and RAM above 4 GiB follow from the regions. Adjacent
//! entries of the same kind are merged.

use std::ops::Range;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::HIMEM_START;

/// Errors of memory map construction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Guest memory does not cover the first MiB, which holds the boot structures.
    #[error("Guest memory must cover the first MiB (up to {HIMEM_START:#x}) without holes")]
    NoLowMemory,
    /// The reserved firmware range is not all guest memory.
    #[error("The reserved firmware range {start:#x}..{end:#x} is not all guest memory")]
    FirmwareNotInMemory {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// A guest memory region reaches into the MMIO gap.
    #[error("Guest RAM at {start:#x}..{end:#x} reaches into the MMIO gap")]
    RamInMmioGap {
        /// Start of the region.
        start: u64,
        /// End of the region.
        end: u64,
    },
    /// The regions produce more entries than the boot protocols can carry.
    #[error("Guest memory produces {0} memory map entries, more than the {MAX_ENTRIES} allowed")]
    TooManyEntries(usize),
}

/// Result type of memory map construction.
pub type Result<T> = std::result::Result<T, Error>;

/// Most entries the Linux zero page holds (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const MAX_ENTRIES: usize = 128;

/// What a range of the memory map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryKind {
    /// Usable RAM.
    Ram,
    /// Reserved: not to be used by the kernel as RAM.
    Reserved,
}

impl MemoryKind {
    /// The E820 type of the Linux boot protocol.
    pub fn e820_type(self) -> u32 {
        match self {
            MemoryKind::Ram => 1,
            MemoryKind::Reserved => 2,
        }
    }

    /// The memory map type of the PVH boot protocol (`XEN_HVM_MEMMAP_TYPE_*`).
    pub fn pvh_type(self) -> u32 {
        use linux_loader::loader::elf::start_info::{
            XEN_HVM_MEMMAP_TYPE_RAM, XEN_HVM_MEMMAP_TYPE_RESERVED,
        };
        match self {
            MemoryKind::Ram => XEN_HVM_MEMMAP_TYPE_RAM,
            MemoryKind::Reserved => XEN_HVM_MEMMAP_TYPE_RESERVED,
        }
    }
}

/// One range of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First address of the range.
    pub addr: u64,
    /// Size of the range in bytes, never 0.
    pub size: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

impl MemoryMapEntry {
    /// First address past the range. Cannot overflow: ranges come from guest memory regions,
    /// whose end is representable, or from the reserved range inside them.
    fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// Appends `[start, end)` to `map`, merging it into the last entry when they touch and agree.
fn push(map: &mut Vec<MemoryMapEntry>, start: u64, end: u64, kind: MemoryKind) {
    if start >= end {
        return;
    }
    if let Some(last) = map.last_mut() {
        if last.kind == kind && last.end() == start {
            last.size = end - last.addr;
            return;
        }
    }
    map.push(MemoryMapEntry {
        addr: start,
        size: end - start,
        kind,
    });
}

/// Builds the memory map of `mem`, sorted by address, with `firmware` reserved and no RAM in
/// `mmio_gap`.
///
/// # Errors
///
/// [`Error::NoLowMemory`] when `[0, 1 MiB)` is not all guest memory;
/// [`Error::FirmwareNotInMemory`] when `firmware` is not; [`Error::RamInMmioGap`] when a region
/// reaches into `mmio_gap`; [`Error::TooManyEntries`] when the map would have more than
/// [`MAX_ENTRIES`] entries.
pub fn memory_map<M: GuestMemoryBackend>(
    mem: &M,
    firmware: &Range<u64>,
    mmio_gap: &Range<u64>,
) -> Result<Vec<MemoryMapEntry>> {
    // HIMEM_START is 1 MiB: the cast cannot truncate.
    if !GuestMemoryBackend::check_range(mem, GuestAddress(0), HIMEM_START as usize) {
        return Err(Error::NoLowMemory);
    }
    // Inside the first MiB, checked above, or checked now.
    let firmware_in_memory = firmware.start <= firmware.end
        && (firmware.end <= HIMEM_START
            || usize::try_from(firmware.end - firmware.start).is_ok_and(|len| {
                GuestMemoryBackend::check_range(mem, GuestAddress(firmware.start), len)
            }));
    if !firmware_in_memory {
        return Err(Error::FirmwareNotInMemory {
            start: firmware.start,
            end: firmware.end,
        });
    }
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|region| {
            let start = region.start_addr().raw_value();
            // A region's end is at most 2^64; saturating keeps a region that ends exactly at
            // the top of the address space whole but for its last byte.
            (start, start.saturating_add(region.len()))
        })
        .collect();
    regions.sort_unstable();
    if let Some(&(start, end)) = regions
        .iter()
        .find(|(start, end)| *start < mmio_gap.end && mmio_gap.start < *end)
    {
        return Err(Error::RamInMmioGap { start, end });
    }

    let mut map = Vec::new();
    let mut reserved_done = false;
    for (start, end) in regions {
        push(&mut map, start, end.min(firmware.start), MemoryKind::Ram);
        if !reserved_done && end > firmware.start {
            // The firmware range is all memory (checked above): this region holds its start,
            // and it and the regions after it cover the rest.
            push(&mut map, firmware.start, firmware.end, MemoryKind::Reserved);
            reserved_done = true;
        }
        push(&mut map, start.max(firmware.end), end, MemoryKind::Ram);
    }
    if map.len() > MAX_ENTRIES {
        return Err(Error::TooManyEntries(map.len()));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const EBDA_START: u64 = 0x9_fc00;
    const FIRMWARE: Range<u64> = EBDA_START..HIMEM_START;
    const GAP: Range<u64> = 0xd000_0000..1 << 32;

    fn memory_map(mem: &GuestMemoryMmap) -> Result<Vec<MemoryMapEntry>> {
        super::memory_map(mem, &FIRMWARE, &GAP)
    }

    fn ram(addr: u64, size: u64) -> MemoryMapEntry {
        MemoryMapEntry {
            addr,
            size,
            kind: MemoryKind::Ram,
        }
    }

    const RESERVED: MemoryMapEntry = MemoryMapEntry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: MemoryKind::Reserved,
    };

    #[test]
    fn low_memory_is_split_around_the_ebda() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
        assert_eq!(
            memory_map(&mem).unwrap(),
            vec![
                ram(0, EBDA_START),
                RESERVED,
                ram(HIMEM_START, (128 << 20) - HIMEM_START),
            ]
        );
    }

    #[test]
    fn ram_above_4_gib_gets_its_own_entry() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0xd000_0000),
            (GuestAddress(1 << 32), 0x1000_0000),
        ])
        .unwrap();
        assert_eq!(
            memory_map(&mem).unwrap(),
            vec![
                ram(0, EBDA_START),
                RESERVED,
                ram(HIMEM_START, 0xd000_0000 - HIMEM_START),
                ram(1 << 32, 0x1000_0000),
            ]
        );
    }

    #[test]
    fn adjacent_regions_are_merged() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x8_0000),
            (GuestAddress(0x8_0000), 0x8_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        assert_eq!(
            memory_map(&mem).unwrap(),
            vec![ram(0, EBDA_START), RESERVED, ram(HIMEM_START, 0x20_0000)]
        );
    }

    #[test]
    fn memory_without_the_first_mib_is_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert_eq!(memory_map(&mem), Err(Error::NoLowMemory));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x20_0000)]).unwrap();
        assert_eq!(memory_map(&mem), Err(Error::NoLowMemory));
    }

    #[test]
    fn too_many_regions_are_rejected() {
        let mut ranges = vec![(GuestAddress(0), 0x10_0000)];
        // Separated by holes, so that nothing merges.
        ranges.extend((1..=MAX_ENTRIES as u64).map(|i| (GuestAddress(i << 24), 0x1000)));
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        assert_eq!(
            memory_map(&mem),
            Err(Error::TooManyEntries(MAX_ENTRIES + 2))
        );
    }

    #[test]
    fn firmware_range_may_lie_anywhere_in_ram() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x80_0000),
            (GuestAddress(0x80_0000), 0x80_0000),
        ])
        .unwrap();
        let firmware = 0x7f_0000..0x81_0000;
        assert_eq!(
            super::memory_map(&mem, &firmware, &GAP).unwrap(),
            vec![
                ram(0, 0x7f_0000),
                MemoryMapEntry {
                    addr: 0x7f_0000,
                    size: 0x2_0000,
                    kind: MemoryKind::Reserved
                },
                ram(0x81_0000, 0x7f_0000),
            ]
        );
    }

    #[test]
    fn firmware_range_outside_memory_is_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let firmware = 0x1f_0000..0x21_0000;
        assert_eq!(
            super::memory_map(&mem, &firmware, &GAP),
            Err(Error::FirmwareNotInMemory {
                start: 0x1f_0000,
                end: 0x21_0000
            })
        );
    }

    #[test]
    fn ram_in_the_mmio_gap_is_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let gap = 0x10_0000..0x40_0000;
        assert_eq!(
            super::memory_map(&mem, &FIRMWARE, &gap),
            Err(Error::RamInMmioGap {
                start: 0,
                end: 0x20_0000
            })
        );
    }

    #[test]
    fn protocol_type_values() {
        assert_eq!(MemoryKind::Ram.e820_type(), 1);
        assert_eq!(MemoryKind::Reserved.e820_type(), 2);
        assert_eq!(MemoryKind::Ram.pvh_type(), 1);
        assert_eq!(MemoryKind::Reserved.pvh_type(), 2);
    }
}
