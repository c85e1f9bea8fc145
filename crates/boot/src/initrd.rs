//! Loading the initial ramdisk.
//!
//! The initrd goes as high as it can: it starts on a page boundary and ends at or below the lower
//! of the MMIO gap's start (the [`Platform`](crate::Platform)'s) and the kernel's
//! `initrd_addr_max`, above everything the kernel occupies ([`LoadedKernel::footprint_end`]), and
//! clear of the boot structures and firmware range of the [`BootLayout`](crate::BootLayout).
//! Bootloaders place it high so that the kernel can decompress and set itself up below it without
//! overwriting it.

use std::io::{self, Seek, SeekFrom};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    ReadVolatile,
};

use crate::config::{self, BootConfig};
use crate::kernel::LoadedKernel;
use crate::layout::PAGE_SIZE;

/// Errors of initrd loading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The boot configuration is not valid.
    #[error("Cannot place the initrd with this boot configuration")]
    Config(#[source] config::Error),
    /// Reading or seeking the initrd failed.
    #[error("Cannot read the initrd")]
    Io(#[source] io::Error),
    /// The initrd file is empty.
    #[error("The initrd is empty")]
    Empty,
    /// No free range of guest RAM is large enough.
    #[error(
        "The initrd of {size} bytes does not fit in guest RAM between the kernel's end at \
         {low:#x} and {high:#x}"
    )]
    DoesNotFit {
        /// Size of the initrd.
        size: u64,
        /// Lowest address the initrd may use.
        low: u64,
        /// First address the initrd may not reach.
        high: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("Cannot read the initrd into guest memory at {addr:#x}")]
    Load {
        /// Where the initrd was being loaded.
        addr: u64,
        /// Why the copy failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// Result type of initrd loading.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the initrd lies in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest physical address of the first byte, page-aligned.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: usize,
}

/// RAM ranges `[start, end)` of `mem`, adjacent regions merged, highest first.
fn ram_ranges<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| {
            let start = r.start_addr().raw_value();
            (start, start.saturating_add(r.len()))
        })
        .collect();
    regions.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
    for (start, end) in regions {
        match merged.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => merged.push((start, end)),
        }
    }
    merged.reverse();
    merged
}

/// `ranges` (highest first) without the parts in `holes`, still highest first.
fn without(ranges: &[(u64, u64)], holes: &[std::ops::Range<u64>]) -> Vec<(u64, u64)> {
    let mut free = ranges.to_vec();
    for hole in holes {
        free = free
            .into_iter()
            .flat_map(|(start, end)| {
                if hole.end <= start || end <= hole.start {
                    return vec![(start, end)];
                }
                // The part above the hole first: highest first.
                [(hole.end.max(start), end), (start, hole.start.min(end))]
                    .into_iter()
                    .filter(|(start, end)| start < end)
                    .collect()
            })
            .collect();
    }
    free
}

/// Finds the highest page-aligned address where `size` bytes fit in one of `ranges` (highest
/// first) within `[low, high)`.
fn place(ranges: &[(u64, u64)], size: u64, low: u64, high: u64) -> Option<u64> {
    ranges.iter().find_map(|&(start, end)| {
        let top = end.min(high);
        let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
        (addr >= start.max(low)).then_some(addr)
    })
}

/// Loads `initrd` into `mem` as high as the kernel and `config` allow.
///
/// # Errors
///
/// [`Error::Config`] when `config` is not valid; [`Error::Empty`] for an empty file;
/// [`Error::DoesNotFit`], naming the sizes and bounds, when there is no room for it; [`Error::Io`]
/// or [`Error::Load`] when copying it fails.
pub fn load_initrd<M, F>(
    mem: &M,
    initrd: &mut F,
    kernel: &LoadedKernel,
    config: &BootConfig,
) -> Result<InitrdRegion>
where
    M: GuestMemoryBackend,
    F: ReadVolatile + Seek,
{
    let regions = config.checked_regions().map_err(Error::Config)?;
    let size = initrd.seek(SeekFrom::End(0)).map_err(Error::Io)?;
    if size == 0 {
        return Err(Error::Empty);
    }
    let low = kernel.footprint_end().raw_value();
    let limit = kernel
        .initrd_addr_max
        .saturating_add(1)
        .min(config.platform.mmio_gap.start);
    let ranges = ram_ranges(mem);
    let holes: Vec<_> = regions.iter().map(|region| region.range.clone()).collect();
    let Some(addr) = place(&without(&ranges, &holes), size, low, limit) else {
        // Report the top of RAM within the limit, the real upper bound.
        let high = ranges
            .iter()
            .map(|&(start, end)| if start < limit { end.min(limit) } else { 0 })
            .max()
            .unwrap_or(0);
        return Err(Error::DoesNotFit { size, low, high });
    };
    // `place` found `size` bytes of RAM: the size fits in usize.
    let len = usize::try_from(size).map_err(|_| Error::DoesNotFit {
        size,
        low,
        high: limit,
    })?;
    initrd.rewind().map_err(Error::Io)?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|source| Error::Load { addr, source })?;
    Ok(InitrdRegion {
        addr: GuestAddress(addr),
        size: len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_platform;
    use crate::kernel::load_kernel;
    use crate::layout::{DEFAULT_INITRD_ADDR_MAX, HIMEM_START};
    use crate::test_utils::{tiny_bzimage, tiny_elf};
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    fn memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap()
    }

    fn kernel(mem: &GuestMemoryMmap) -> LoadedKernel {
        load_kernel(mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap()
    }

    fn data(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i % 251) as u8).collect()
    }

    fn config() -> BootConfig {
        BootConfig::new(test_platform(), 1)
    }

    fn load(mem: &GuestMemoryMmap, kernel: &LoadedKernel, size: usize) -> Result<InitrdRegion> {
        load_initrd(mem, &mut Cursor::new(data(size)), kernel, &config())
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_ram() {
        let mem = memory(&[(0, 64 << 20)]);
        let kernel = kernel(&mem);
        let region = load(&mem, &kernel, 5000).unwrap();
        assert_eq!(region.size, 5000);
        assert_eq!(region.addr.0 % PAGE_SIZE, 0);
        assert_eq!(region.addr.0, ((64 << 20) - 5000) & !(PAGE_SIZE - 1));
        assert!(region.addr.0 + 5000 <= 64 << 20);
        let mut buf = vec![0; 5000];
        mem.read_slice(&mut buf, region.addr).unwrap();
        assert_eq!(buf, data(5000));
    }

    #[test]
    fn initrd_ends_below_the_kernels_limit() {
        let mem = memory(&[(0, 64 << 20)]);
        let mut kernel = kernel(&mem);
        kernel.initrd_addr_max = (32 << 20) - 1;
        let region = load(&mem, &kernel, 0x1800).unwrap();
        assert_eq!(region.addr.0, (32 << 20) - 0x2000);
    }

    #[test]
    fn initrd_of_an_elf_kernel_ends_below_the_default_limit() {
        let mem = memory(&[(0, 0x4000_0000)]);
        let kernel = kernel(&mem);
        assert_eq!(kernel.initrd_addr_max, DEFAULT_INITRD_ADDR_MAX);
        let region = load(&mem, &kernel, 0x1000).unwrap();
        assert_eq!(region.addr.0, DEFAULT_INITRD_ADDR_MAX + 1 - 0x1000);
    }

    #[test]
    fn initrd_stays_below_the_mmio_gap() {
        let mem = memory(&[(0, 16 << 20), (1 << 32, 16 << 20)]);
        let mut kernel = kernel(&mem);
        kernel.initrd_addr_max = u64::MAX;
        let region = load(&mem, &kernel, 0x3000).unwrap();
        assert_eq!(region.addr.0, (16 << 20) - 0x3000);
    }

    #[test]
    fn initrd_may_span_adjacent_regions() {
        let mem = memory(&[(0, 8 << 20), (8 << 20, 0x1000)]);
        let kernel = kernel(&mem);
        let region = load(&mem, &kernel, 0x3000).unwrap();
        assert_eq!(region.addr.0, (8 << 20) - 0x2000);
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error_naming_the_sizes() {
        let mem = memory(&[(0, 4 << 20)]);
        let kernel = kernel(&mem);
        let err = load(&mem, &kernel, 3 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::DoesNotFit {
                    size: 0x30_0000,
                    low,
                    high: 0x40_0000
                } if low == kernel.end.0
            ),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("3145728 bytes"), "{message}");
        assert!(message.contains("0x400000"), "{message}");
    }

    #[test]
    fn initrd_stays_above_the_bzimage_decompression_buffer() {
        let mem = memory(&[(0, 8 << 20)]);
        let mut image = tiny_bzimage(&[0xf4]);
        image[0x260..0x264].copy_from_slice(&(6u32 << 20).to_le_bytes()); // init_size
        let kernel = load_kernel(&mem, &mut Cursor::new(image)).unwrap();
        assert_eq!(kernel.footprint_end().0, HIMEM_START + (6 << 20));
        assert!(matches!(
            load(&mem, &kernel, 0x18_0000),
            Err(Error::DoesNotFit { .. })
        ));
        let region = load(&mem, &kernel, 0x8_0000).unwrap();
        assert!(region.addr.0 >= kernel.footprint_end().0);
    }

    #[test]
    fn initrd_stays_below_the_given_mmio_gap() {
        let mem = memory(&[(0, 64 << 20)]);
        let kernel = kernel(&mem);
        let mut config = config();
        config.platform.mmio_gap = (32 << 20)..(1 << 32);
        let region = load_initrd(&mem, &mut Cursor::new(data(0x1000)), &kernel, &config).unwrap();
        assert_eq!(region.addr.0, (32 << 20) - 0x1000);
    }

    #[test]
    fn initrd_goes_below_boot_structures_at_the_top_of_ram() {
        let mem = memory(&[(0, 64 << 20)]);
        let kernel = kernel(&mem);
        let mut config = config();
        let top = 64 << 20;
        config.layout.acpi = top - 0x1_0000;
        config.layout.mptable = Some(top - 0x2_0000);
        config.layout.firmware = (top - 0x2_0000)..top;
        config.layout.cmdline = top - 0x3_0000;
        // Between the command line and the firmware range when it fits there...
        let region = load_initrd(&mem, &mut Cursor::new(data(0x1800)), &kernel, &config).unwrap();
        assert_eq!(region.addr.0, top - 0x2_0000 - 0x2000);
        // ... below the command line when it does not.
        let region = load_initrd(&mem, &mut Cursor::new(data(0x1_0000)), &kernel, &config).unwrap();
        assert_eq!(region.addr.0, top - 0x3_0000 - 0x1_0000);
    }

    #[test]
    fn invalid_config_is_rejected() {
        let mem = memory(&[(0, 4 << 20)]);
        let kernel = kernel(&mem);
        let mut config = config();
        config.vcpus = 0;
        let err = load_initrd(&mem, &mut Cursor::new(data(10)), &kernel, &config).unwrap_err();
        assert!(matches!(err, Error::Config(config::Error::VcpuCount(0))));
    }

    #[test]
    fn empty_initrd_is_rejected() {
        let mem = memory(&[(0, 4 << 20)]);
        let kernel = kernel(&mem);
        assert!(matches!(load(&mem, &kernel, 0), Err(Error::Empty)));
    }
}
