//! Guest RAM: where it lives in the guest physical address space and how it is mapped on the host.

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionCollectionError, GuestRegionMmap,
};

use crate::layout;

/// Size of a guest page; guest memory sizes are multiples of it.
pub const PAGE_SIZE: u64 = 0x1000;

/// Number of bytes in a MiB.
const MIB: u64 = 1 << 20;

/// Size of a huge page on the host: the alignment guest RAM is mapped at.
const HUGE_PAGE: usize = 2 << 20;

/// How many mappings [`map_anonymous`] makes at most to find a 2 MiB-aligned one.
const ALIGN_ATTEMPTS: usize = 4;

/// Errors of guest memory sizing and creation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest was given no memory.
    #[error("The guest memory size cannot be zero")]
    EmptyMemory,
    /// The memory size is not a whole number of pages.
    #[error("The guest memory size {0:#x} is not a multiple of the 4 KiB page size")]
    UnalignedSize(u64),
    /// Laid out around the MMIO gap, the memory would end past the guest physical address space.
    #[error("The guest memory size {0:#x} does not fit in the guest physical address space")]
    SizeOverflow(u64),
    /// A size given in MiB does not fit in 64 bits once converted to bytes.
    #[error("The guest memory size of {0} MiB does not fit in 64 bits")]
    MibOverflow(u64),
    /// The host could not map a RAM region.
    #[error("Cannot map {len:#x} bytes of guest memory for the region at {base:#x}")]
    Mmap {
        /// Guest physical address of the region.
        base: u64,
        /// Length of the region in bytes.
        len: usize,
        /// Why the mapping failed.
        #[source]
        source: MmapRegionError,
    },
    /// `madvise` failed on a mapped RAM region.
    #[error("Cannot enable {advice} on the guest memory region at {base:#x}")]
    Madvise {
        /// The advice that was refused.
        advice: Advice,
        /// Guest physical address of the region.
        base: u64,
        /// The error `madvise` returned.
        #[source]
        source: io::Error,
    },
    /// The host kernel does not know the advice (`madvise` returned `EINVAL`): it was built
    /// without KSM (`CONFIG_KSM`) or transparent huge pages (`CONFIG_TRANSPARENT_HUGEPAGE`).
    #[error("The host kernel does not support {advice}")]
    AdviceUnsupported {
        /// The advice that was refused.
        advice: Advice,
        /// The error `madvise` returned.
        #[source]
        source: io::Error,
    },
    /// The RAM regions do not form a valid guest memory map.
    #[error("The guest RAM regions do not form a valid memory map")]
    Layout(#[source] GuestRegionCollectionError),
    /// The memory file's size could not be read, or its descriptor duplicated.
    #[error("Cannot use the guest memory file")]
    File(#[source] io::Error),
    /// The memory file is shorter than the guest memory mapped from it.
    #[error(
        "The guest memory file holds {len:#x} bytes, less than the {size:#x} bytes of guest memory"
    )]
    FileTooShort {
        /// The file's length in bytes.
        len: u64,
        /// The guest memory size in bytes.
        size: u64,
    },
}

/// Result type of guest memory sizing and creation.
pub type Result<T> = std::result::Result<T, Error>;

/// How guest RAM is backed on the host, beyond plain anonymous memory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryOptions {
    /// Let the kernel's samepage merging (KSM) deduplicate identical guest pages
    /// (`MADV_MERGEABLE`). Pages are only merged while `ksmd` runs
    /// (`/sys/kernel/mm/ksm/run` is 1).
    pub ksm: bool,
    /// Back guest RAM with transparent huge pages where possible (`MADV_HUGEPAGE`). The kernel
    /// honours it when `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`.
    pub hugepages: bool,
    /// Keep guest RAM in the VMM's core dumps. By default (`false`) every region is marked
    /// `MADV_DONTDUMP`: a crash of the VMM then leaves no copy of the guest's memory on the
    /// host's disk, and its core stays small. Set it to debug with the guest's memory at hand.
    pub include_in_core_dumps: bool,
}

/// An `madvise` advice applied to guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_MERGEABLE`: the pages may be merged by KSM.
    Mergeable,
    /// `MADV_HUGEPAGE`: the pages should be backed by transparent huge pages.
    HugePage,
    /// `MADV_DONTDUMP`: the pages are left out of core dumps.
    DontDump,
}

impl Advice {
    fn as_raw(self) -> libc::c_int {
        match self {
            Advice::Mergeable => libc::MADV_MERGEABLE,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::DontDump => libc::MADV_DONTDUMP,
        }
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Advice::Mergeable => f.write_str("KSM page merging (MADV_MERGEABLE)"),
            Advice::HugePage => f.write_str("transparent huge pages (MADV_HUGEPAGE)"),
            Advice::DontDump => f.write_str("exclusion from core dumps (MADV_DONTDUMP)"),
        }
    }
}

/// Converts a memory size in MiB to bytes.
///
/// The result is a multiple of [`PAGE_SIZE`]; whether it is a usable guest memory size is left to
/// [`ram_regions`] (zero is not).
///
/// # Errors
///
/// [`Error::MibOverflow`] when the size in bytes does not fit in a `u64`.
pub fn mem_size_from_mib(mib: u64) -> Result<u64> {
    mib.checked_mul(MIB).ok_or(Error::MibOverflow(mib))
}

/// Lays out `size` bytes of guest RAM around the 32-bit MMIO gap.
///
/// RAM starts at 0 and runs up to [`layout::MMIO32_START`]; what does not fit below the gap
/// continues at [`layout::FIRST_ADDR_PAST_32BITS`]. Returns one `(start, length)` pair per region,
/// in address order: one region for guests of up to `MMIO32_START` bytes, two above.
///
/// # Errors
///
/// [`Error::EmptyMemory`] when `size` is 0, [`Error::UnalignedSize`] when it is not a multiple of
/// [`PAGE_SIZE`], [`Error::SizeOverflow`] when the end of RAM above the gap would pass the end of
/// the 64-bit address space or a region's length does not fit in a `usize`.
pub fn ram_regions(size: u64) -> Result<Vec<(GuestAddress, usize)>> {
    if size == 0 {
        return Err(Error::EmptyMemory);
    }
    if size % PAGE_SIZE != 0 {
        return Err(Error::UnalignedSize(size));
    }
    let region_len = |len: u64| usize::try_from(len).map_err(|_| Error::SizeOverflow(size));

    let below_gap = size.min(layout::MMIO32_START);
    let above_gap = size.saturating_sub(layout::MMIO32_START);
    let mut regions = vec![(GuestAddress(0), region_len(below_gap)?)];
    if above_gap > 0 {
        // The end of the region (exclusive) must be an address, as vm-memory requires.
        layout::FIRST_ADDR_PAST_32BITS
            .checked_add(above_gap)
            .ok_or(Error::SizeOverflow(size))?;
        regions.push((
            GuestAddress(layout::FIRST_ADDR_PAST_32BITS),
            region_len(above_gap)?,
        ));
    }
    Ok(regions)
}

/// Creates `size` bytes of guest RAM laid out by [`ram_regions`].
///
/// Each region is a private anonymous mapping made with `MAP_NORESERVE`: the host commits memory
/// as the guest touches pages, so a guest larger than what the host has free can start. Regions
/// of 2 MiB or more start at 2 MiB-aligned host addresses wherever the host's placement of
/// mappings allows it (see `map_anonymous`). The `options` are applied to every region with
/// `madvise`; unless [`MemoryOptions::include_in_core_dumps`], regions are `MADV_DONTDUMP`.
///
/// # Errors
///
/// The errors of [`ram_regions`] for a bad `size`; [`Error::Mmap`] when the host cannot map a
/// region (too large for the process's address space, or refused by the overcommit policy);
/// [`Error::AdviceUnsupported`] or [`Error::Madvise`] when an option cannot be applied. Regions
/// already mapped are unmapped again on error.
pub fn create_guest_memory(size: u64, options: MemoryOptions) -> Result<GuestMemoryMmap> {
    create_anonymous(size, options, |_| ())
}

/// Guest memory whose regions can track the pages the VMM writes through vm-memory (a
/// device's writes, not the guest's own): each region's bitmap is `Some` when dirty page
/// tracking is on, `None` (no cost) when it is off.
pub type TrackedGuestMemory = GuestMemoryMmap<Option<AtomicBitmap>>;

/// [`create_guest_memory`] as [`TrackedGuestMemory`], tracking the pages written through
/// vm-memory when `track_dirty_pages` is set (for a diff snapshot; KVM's dirty log tracks the
/// guest's own writes).
///
/// # Errors
///
/// Those of [`create_guest_memory`].
pub fn create_tracked_guest_memory(
    size: u64,
    options: MemoryOptions,
    track_dirty_pages: bool,
) -> Result<TrackedGuestMemory> {
    create_anonymous(size, options, dirty_bitmap(track_dirty_pages))
}

/// Maps `size` bytes of guest RAM from a memory file, as a restore does: the regions of
/// [`ram_regions`], region *i* from the file at the sum of the lengths of the regions before it
/// (the layout [`write_memory`](crate::write_memory) writes).
///
/// Each region is a private file mapping (`MAP_PRIVATE | MAP_NORESERVE`): nothing is read until
/// the guest touches a page, which the kernel then faults in from the page cache; a page the
/// guest writes becomes a private copy, so the file is never written, and any number of VMs
/// mapping the same file share its unmodified pages in the page cache. The file needs to be open
/// for reading only, and must not change while it is mapped (a change may show through in pages
/// the guest has not written yet).
///
/// The `options` apply as for [`create_guest_memory`], except
/// [`MemoryOptions::hugepages`]: the pages of a file mapping come from the page cache, not from
/// transparent huge pages, so it is ignored. KSM merges only the pages the guest wrote.
///
/// # Errors
///
/// The errors of [`ram_regions`] for a bad `size`; [`Error::File`] when the file's length cannot
/// be read or its descriptor duplicated; [`Error::FileTooShort`] when the file is shorter than
/// `size`; [`Error::Mmap`] when the host cannot map a region (a file that cannot be mapped, such
/// as a pipe, included); [`Error::AdviceUnsupported`] or [`Error::Madvise`] as for
/// [`create_guest_memory`].
pub fn create_guest_memory_from_file(
    file: &File,
    size: u64,
    options: MemoryOptions,
) -> Result<GuestMemoryMmap> {
    map_file(file, size, options, |_| ())
}

/// [`create_guest_memory_from_file`] as [`TrackedGuestMemory`], tracking the pages written
/// through vm-memory when `track_dirty_pages` is set.
///
/// # Errors
///
/// Those of [`create_guest_memory_from_file`].
pub fn create_tracked_guest_memory_from_file(
    file: &File,
    size: u64,
    options: MemoryOptions,
    track_dirty_pages: bool,
) -> Result<TrackedGuestMemory> {
    map_file(file, size, options, dirty_bitmap(track_dirty_pages))
}

/// A region's bitmap: one bit per 4 KiB page when `track` is set, none otherwise.
fn dirty_bitmap(track: bool) -> impl Fn(usize) -> Option<AtomicBitmap> {
    move |len| track.then(|| AtomicBitmap::with_len(len))
}

/// Creates anonymous guest RAM whose regions get the bitmaps `bitmap` makes for their lengths.
fn create_anonymous<B: Bitmap>(
    size: u64,
    options: MemoryOptions,
    bitmap: impl Fn(usize) -> B,
) -> Result<GuestMemoryMmap<B>> {
    let regions = ram_regions(size)?
        .into_iter()
        .map(|(base, len)| {
            let mapping = map_anonymous(len, &bitmap).map_err(|source| Error::Mmap {
                base: base.0,
                len,
                source,
            })?;
            finish_region(mapping, base, size, options)
        })
        .collect::<Result<Vec<_>>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)
}

/// Maps guest RAM from `file` (see [`create_guest_memory_from_file`]) with the bitmaps `bitmap`
/// makes.
fn map_file<B: Bitmap>(
    file: &File,
    size: u64,
    options: MemoryOptions,
    bitmap: impl Fn(usize) -> B,
) -> Result<GuestMemoryMmap<B>> {
    let layout = ram_regions(size)?;
    let len = file.metadata().map_err(Error::File)?.len();
    if len < size {
        return Err(Error::FileTooShort { len, size });
    }
    let file = Arc::new(file.try_clone().map_err(Error::File)?);
    let options = MemoryOptions {
        hugepages: false,
        ..options
    };
    let mut regions = Vec::with_capacity(layout.len());
    let mut offset = 0u64;
    for (base, len) in layout {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap(len))
            .with_file_offset(FileOffset::from_arc(Arc::clone(&file), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|source| Error::Mmap {
                base: base.0,
                len,
                source,
            })?;
        regions.push(finish_region(mapping, base, size, options)?);
        // The lengths add up to `size`, a `u64`.
        offset = offset.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)
}

/// Applies `options` to the RAM region `mapping` at guest address `base`, and makes it a guest
/// region; `size` is the guest's whole memory size, for errors.
fn finish_region<B: Bitmap>(
    mapping: MmapRegion<B>,
    base: GuestAddress,
    size: u64,
    options: MemoryOptions,
) -> Result<GuestRegionMmap<B>> {
    let advices = [
        (options.ksm, Advice::Mergeable),
        (options.hugepages, Advice::HugePage),
        (!options.include_in_core_dumps, Advice::DontDump),
    ];
    for (_, advice) in advices.into_iter().filter(|(wanted, _)| *wanted) {
        // SAFETY: `mapping` owns a live mapping of `mapping.size()` bytes starting at the
        // page-aligned `mapping.as_ptr()`. MADV_MERGEABLE, MADV_HUGEPAGE and MADV_DONTDUMP only
        // change how the kernel backs or dumps the pages, never their contents or the validity
        // of the mapping.
        let ret = unsafe {
            let (addr, len) = (mapping.as_ptr().cast(), mapping.size());
            libc::madvise(addr, len, advice.as_raw())
        };
        if ret != 0 {
            return Err(madvise_error(advice, base, io::Error::last_os_error()));
        }
    }
    // Cannot fail for regions from `ram_regions`, which checked that they end inside the
    // address space.
    GuestRegionMmap::new(mapping, base).ok_or(Error::SizeOverflow(size))
}

/// Maps `len` bytes of private anonymous memory for guest RAM, at a 2 MiB-aligned host address
/// where the kernel's placement allows it.
///
/// KVM maps guest memory with huge pages in its second-level page tables only where the host
/// address and the guest address are aligned alike within 2 MiB. RAM regions start at 2
/// MiB-aligned guest addresses, so on a 2 MiB-aligned mapping every huge page the host backs RAM
/// with (transparent huge pages) is mapped whole, and the guest faults once per 2 MiB it first
/// touches instead of once per 4 KiB. Linux 6.7 and later align large anonymous mappings
/// themselves; earlier kernels place them on any page.
///
/// vm-memory makes the mapping, at an address the kernel picks: the top of the highest free
/// range that fits, so a second mapping of the same length goes right below the first when there
/// is room. When a mapping is not aligned, an inaccessible pad is put below it, just long enough
/// for the next mapping under the pad to start on a 2 MiB boundary, and the mapping is made
/// again, while the first one stays, so that a try that finds no room below lands lower the
/// next time. Once one is aligned, the others and the pads are unmapped. When none is after
/// [`ALIGN_ATTEMPTS`] (the process lays mappings out bottom-up, other threads map meanwhile),
/// the last one is kept as it is, which costs speed, never correctness.
fn map_anonymous<B: Bitmap>(
    len: usize,
    bitmap: &impl Fn(usize) -> B,
) -> std::result::Result<MmapRegion<B>, MmapRegionError> {
    let map = || {
        MmapRegionBuilder::new_with_bitmap(len, bitmap(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
    };
    let mut mapping = map()?;
    // A region smaller than a huge page can hold none.
    if len < HUGE_PAGE {
        return Ok(mapping);
    }
    // The mappings tried before, kept until the end so that each try lands somewhere new.
    let mut tried = Vec::new();
    for _ in 1..ALIGN_ATTEMPTS {
        let start = mapping.as_ptr().addr();
        if start % HUGE_PAGE == 0 {
            break;
        }
        // Where the next mapping would start, below this one, is this far past a boundary.
        // A pad that cannot be placed (something is mapped right below) is left out: the next
        // mapping then goes to another free range, where the next try goes on from.
        let pad_len = start.wrapping_sub(len) % HUGE_PAGE;
        let pad = (pad_len != 0)
            .then(|| start.checked_sub(pad_len))
            .flatten()
            .and_then(|at| Pad::map(at, pad_len));
        let Ok(next) = map() else {
            break;
        };
        drop(pad);
        tried.push(std::mem::replace(&mut mapping, next));
    }
    Ok(mapping)
}

/// An inaccessible mapping at a chosen address, unmapped when dropped: it keeps the kernel from
/// placing guest RAM there.
struct Pad {
    addr: *mut libc::c_void,
    len: usize,
}

impl Pad {
    /// Maps `len` inaccessible bytes at `addr`; `None` when that range is not free.
    fn map(addr: usize, len: usize) -> Option<Self> {
        // SAFETY: with MAP_FIXED_NOREPLACE the kernel maps only if the range is free, so no
        // existing mapping is replaced or touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::without_provenance_mut(addr),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let pad = Self { addr: ptr, len };
        // Kernels before 4.17 take the address as a hint only, and may map elsewhere.
        (ptr.addr() == addr).then_some(pad)
    }
}

impl Drop for Pad {
    fn drop(&mut self) {
        // SAFETY: `Pad::map` made this mapping of `len` bytes, and nothing else uses it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Turns a failed `madvise` into an error; `EINVAL` on an anonymous private mapping means the
/// kernel lacks the feature.
fn madvise_error(advice: Advice, base: GuestAddress, source: io::Error) -> Error {
    if source.raw_os_error() == Some(libc::EINVAL) {
        Error::AdviceUnsupported { advice, source }
    } else {
        Error::Madvise {
            advice,
            base: base.0,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::fs;

    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::layout::{FIRST_ADDR_PAST_32BITS, MMIO32_SIZE, MMIO32_START};

    const GIB: u64 = 1 << 30;

    fn usize_of(len: u64) -> usize {
        usize::try_from(len).unwrap()
    }

    /// The `VmFlags` of the host mapping (from `/proc/self/smaps`) holding guest address `addr`.
    fn vm_flags(mem: &GuestMemoryMmap, addr: GuestAddress) -> Vec<String> {
        let host = mem.get_host_address(addr).unwrap() as usize;
        crate::smaps::mapping_field(host, "VmFlags:")
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    fn has_flag(flags: &[String], flag: &str) -> bool {
        flags.iter().any(|f| f == flag)
    }

    #[test]
    fn small_guest_is_one_region_from_zero() {
        assert_eq!(
            ram_regions(1 << 20).unwrap(),
            vec![(GuestAddress(0), 1 << 20)]
        );
    }

    #[test]
    fn guest_filling_exactly_the_space_below_the_gap_is_one_region() {
        assert_eq!(
            ram_regions(MMIO32_START).unwrap(),
            vec![(GuestAddress(0), usize_of(MMIO32_START))]
        );
        assert_eq!(
            ram_regions(MMIO32_START - PAGE_SIZE).unwrap(),
            vec![(GuestAddress(0), usize_of(MMIO32_START - PAGE_SIZE))]
        );
    }

    #[test]
    fn one_page_past_the_gap_start_moves_to_4_gib() {
        assert_eq!(
            ram_regions(MMIO32_START + PAGE_SIZE).unwrap(),
            vec![
                (GuestAddress(0), usize_of(MMIO32_START)),
                (GuestAddress(FIRST_ADDR_PAST_32BITS), usize_of(PAGE_SIZE)),
            ]
        );
    }

    #[test]
    fn large_guest_continues_above_4_gib_with_the_gap_skipped() {
        let regions = ram_regions(8 * GIB).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), usize_of(MMIO32_START)),
                (
                    GuestAddress(FIRST_ADDR_PAST_32BITS),
                    usize_of(8 * GIB - MMIO32_START)
                ),
            ]
        );
        // RAM ends where it would without the gap, shifted by the gap's size.
        let (base, len) = regions[1];
        assert_eq!(base.0 + len as u64, 8 * GIB + MMIO32_SIZE);
    }

    #[test]
    fn zero_size_is_rejected() {
        assert!(matches!(ram_regions(0), Err(Error::EmptyMemory)));
        assert!(matches!(
            create_guest_memory(0, MemoryOptions::default()),
            Err(Error::EmptyMemory)
        ));
    }

    #[test]
    fn size_that_is_not_whole_pages_is_rejected() {
        for size in [1, PAGE_SIZE - 1, PAGE_SIZE + 1, (1 << 20) + 0x800] {
            assert!(
                matches!(ram_regions(size), Err(Error::UnalignedSize(s)) if s == size),
                "{size:#x}"
            );
        }
    }

    #[test]
    fn size_ending_past_the_address_space_is_rejected() {
        let top = u64::MAX - (PAGE_SIZE - 1);
        // The largest size whose end above the gap is still an address.
        let largest = top - MMIO32_SIZE;
        let regions = ram_regions(largest).unwrap();
        assert_eq!(regions[1].0.0 + regions[1].1 as u64, top);
        for size in [largest + PAGE_SIZE, top] {
            assert!(
                matches!(ram_regions(size), Err(Error::SizeOverflow(s)) if s == size),
                "{size:#x}"
            );
        }
    }

    #[test]
    fn mib_conversion_is_checked() {
        assert_eq!(mem_size_from_mib(0).unwrap(), 0);
        assert_eq!(mem_size_from_mib(128).unwrap(), 128 << 20);
        let largest = u64::MAX >> 20;
        assert_eq!(mem_size_from_mib(largest).unwrap(), largest << 20);
        assert!(matches!(
            mem_size_from_mib(largest + 1),
            Err(Error::MibOverflow(m)) if m == largest + 1
        ));
    }

    #[test]
    fn guest_memory_is_readable_and_writable_in_every_region() {
        let mem =
            create_guest_memory(MMIO32_START + 2 * PAGE_SIZE, MemoryOptions::default()).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let last_low = GuestAddress(MMIO32_START - 8);
        let last_high = GuestAddress(FIRST_ADDR_PAST_32BITS + 2 * PAGE_SIZE - 8);
        mem.write_obj(0x1122_3344_5566_7788u64, last_low).unwrap();
        mem.write_obj(0x99aa_bbcc_ddee_ff00u64, last_high).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(last_low).unwrap(),
            0x1122_3344_5566_7788
        );
        assert_eq!(
            mem.read_obj::<u64>(last_high).unwrap(),
            0x99aa_bbcc_ddee_ff00
        );
        // Fresh anonymous memory reads as zeroes.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
        // Neither the MMIO gap nor anything past the end is RAM.
        assert!(mem.write_obj(0u8, GuestAddress(MMIO32_START)).is_err());
        assert!(
            mem.write_obj(0u8, GuestAddress(FIRST_ADDR_PAST_32BITS - 1))
                .is_err()
        );
        assert!(
            mem.write_obj(0u8, GuestAddress(FIRST_ADDR_PAST_32BITS + 2 * PAGE_SIZE))
                .is_err()
        );
    }

    #[test]
    fn regions_are_private_and_not_reserved_without_options() {
        let mem = create_guest_memory(8 * GIB, MemoryOptions::default()).unwrap();
        for region in mem.iter() {
            let flags = vm_flags(&mem, region.start_addr());
            assert!(!has_flag(&flags, "mg"), "{flags:?}");
            assert!(!has_flag(&flags, "hg"), "{flags:?}");
            // Private mapping: "sh" marks shared ones.
            assert!(!has_flag(&flags, "sh"), "{flags:?}");
            // Under the strict overcommit policy (2) the kernel ignores MAP_NORESERVE.
            let policy = fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap();
            if policy.trim() != "2" {
                assert!(has_flag(&flags, "nr"), "{flags:?}");
            }
        }
    }

    #[test]
    fn guest_larger_than_host_memory_maps_without_committing_it() {
        // Only the strict overcommit policy refuses this; everywhere else MAP_NORESERVE leaves
        // the memory uncommitted until the guest touches it.
        let policy = fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap();
        let size = 256 * GIB;
        let mem = create_guest_memory(size, MemoryOptions::default());
        if policy.trim() == "2" {
            assert!(matches!(mem, Err(Error::Mmap { .. })));
            return;
        }
        let mem = mem.unwrap();
        let last = GuestAddress(size + MMIO32_SIZE - 8);
        mem.write_obj(u64::MAX, last).unwrap();
        assert_eq!(mem.read_obj::<u64>(last).unwrap(), u64::MAX);
    }

    #[test]
    fn ksm_option_marks_every_region_mergeable() {
        if !std::path::Path::new("/sys/kernel/mm/ksm").exists() {
            // Without CONFIG_KSM the kernel refuses the advice with EINVAL.
            let err = create_guest_memory(
                1 << 20,
                MemoryOptions {
                    ksm: true,
                    hugepages: false,
                    include_in_core_dumps: false,
                },
            )
            .unwrap_err();
            assert!(matches!(
                err,
                Error::AdviceUnsupported {
                    advice: Advice::Mergeable,
                    ..
                }
            ));
            return;
        }
        let options = MemoryOptions {
            ksm: true,
            hugepages: false,
            include_in_core_dumps: false,
        };
        let mem = create_guest_memory(MMIO32_START + PAGE_SIZE, options).unwrap();
        for region in mem.iter() {
            let flags = vm_flags(&mem, region.start_addr());
            assert!(has_flag(&flags, "mg"), "{flags:?}");
            assert!(!has_flag(&flags, "hg"), "{flags:?}");
        }
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps_unless_asked() {
        let mem = create_guest_memory(MMIO32_START + PAGE_SIZE, MemoryOptions::default()).unwrap();
        for region in mem.iter() {
            let flags = vm_flags(&mem, region.start_addr());
            assert!(has_flag(&flags, "dd"), "{flags:?}");
        }
        let options = MemoryOptions {
            include_in_core_dumps: true,
            ..MemoryOptions::default()
        };
        let mem = create_guest_memory(MMIO32_START + PAGE_SIZE, options).unwrap();
        for region in mem.iter() {
            let flags = vm_flags(&mem, region.start_addr());
            assert!(!has_flag(&flags, "dd"), "{flags:?}");
        }
    }

    #[test]
    fn hugepages_option_marks_every_region_for_thp() {
        let options = MemoryOptions {
            ksm: false,
            hugepages: true,
            include_in_core_dumps: false,
        };
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            // Without CONFIG_TRANSPARENT_HUGEPAGE the kernel refuses the advice with EINVAL.
            let err = create_guest_memory(1 << 20, options).unwrap_err();
            assert!(matches!(
                err,
                Error::AdviceUnsupported {
                    advice: Advice::HugePage,
                    ..
                }
            ));
            return;
        }
        let mem = create_guest_memory(MMIO32_START + PAGE_SIZE, options).unwrap();
        for region in mem.iter() {
            let flags = vm_flags(&mem, region.start_addr());
            assert!(has_flag(&flags, "hg"), "{flags:?}");
            assert!(!has_flag(&flags, "mg"), "{flags:?}");
        }
    }

    #[test]
    fn both_options_apply_together() {
        let ksm = std::path::Path::new("/sys/kernel/mm/ksm").exists();
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        if !(ksm && thp) {
            // Each option's refusal is covered by its own test.
            return;
        }
        let options = MemoryOptions {
            ksm: true,
            hugepages: true,
            include_in_core_dumps: false,
        };
        let mem = create_guest_memory(4 << 20, options).unwrap();
        let flags = vm_flags(&mem, GuestAddress(0));
        assert!(
            has_flag(&flags, "mg") && has_flag(&flags, "hg"),
            "{flags:?}"
        );
    }

    #[test]
    fn unmappable_size_is_an_error_not_a_crash() {
        // 1 PiB is past what a process can map (128 TiB with 4-level paging).
        let size = mem_size_from_mib(1 << 30).unwrap();
        let err = create_guest_memory(size, MemoryOptions::default()).unwrap_err();
        let Error::Mmap { base, len, .. } = &err else {
            panic!("unexpected error {err:?}");
        };
        // The region below the gap maps; the one above it cannot.
        assert_eq!(*base, FIRST_ADDR_PAST_32BITS);
        assert_eq!(*len as u64, size - MMIO32_START);
        assert!(err.source().is_some());
        assert_eq!(
            err.to_string(),
            format!("Cannot map {len:#x} bytes of guest memory for the region at 0x100000000")
        );
    }

    #[test]
    fn einval_from_madvise_reads_as_an_unsupported_kernel_feature() {
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        let err = madvise_error(Advice::Mergeable, GuestAddress(0), einval);
        assert!(matches!(
            err,
            Error::AdviceUnsupported {
                advice: Advice::Mergeable,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "The host kernel does not support KSM page merging (MADV_MERGEABLE)"
        );
        let source = err.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(source.raw_os_error(), Some(libc::EINVAL));

        let eagain = io::Error::from_raw_os_error(libc::EAGAIN);
        let err = madvise_error(
            Advice::HugePage,
            GuestAddress(FIRST_ADDR_PAST_32BITS),
            eagain,
        );
        assert!(matches!(
            err,
            Error::Madvise {
                advice: Advice::HugePage,
                base: FIRST_ADDR_PAST_32BITS,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "Cannot enable transparent huge pages (MADV_HUGEPAGE) on the guest memory region at \
             0x100000000"
        );
    }

    #[test]
    fn file_mappings_are_private_and_take_every_option_but_huge_pages() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        file.as_file().set_len(4 << 20).unwrap();
        let options = MemoryOptions {
            hugepages: true,
            ..MemoryOptions::default()
        };
        let mem = create_guest_memory_from_file(file.as_file(), 4 << 20, options).unwrap();
        let flags = vm_flags(&mem, GuestAddress(0));
        assert!(!has_flag(&flags, "sh"), "{flags:?}");
        assert!(!has_flag(&flags, "hg"), "{flags:?}");
        assert!(has_flag(&flags, "dd"), "{flags:?}");
        let region = mem.iter().next().unwrap();
        assert_eq!(region.file_offset().unwrap().start(), 0);
    }

    #[test]
    fn tracked_memory_has_a_bitmap_only_when_tracking() {
        let tracked = create_tracked_guest_memory(1 << 20, MemoryOptions::default(), true).unwrap();
        let untracked =
            create_tracked_guest_memory(1 << 20, MemoryOptions::default(), false).unwrap();
        let bitmap = |mem: &TrackedGuestMemory| {
            let region: &MmapRegion<Option<AtomicBitmap>> = mem.iter().next().unwrap();
            region.bitmap().as_ref().map(AtomicBitmap::len)
        };
        assert_eq!(bitmap(&tracked), Some(256));
        assert_eq!(bitmap(&untracked), None);
        tracked.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        let region: &MmapRegion<Option<AtomicBitmap>> = tracked.iter().next().unwrap();
        assert!(region.bitmap().as_ref().unwrap().is_bit_set(3));
    }
}
