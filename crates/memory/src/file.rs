//! Guest memory files: guest RAM written to a file for a snapshot, diff files of the pages
//! dirtied since the last snapshot, and merging a diff onto a full file.
//!
//! # Layout
//!
//! A memory file holds the guest memory's regions one after the other, in address order, from
//! offset 0: region *i* starts at the sum of the lengths of the regions before it, and the file
//! is as long as all the regions together. Nothing else is in it (no header: the snapshot that
//! goes with it records the memory size, from which [`ram_regions`](crate::ram_regions) gives the
//! regions again), so the file maps straight back with
//! [`create_guest_memory_from_file`](crate::create_guest_memory_from_file).
//!
//! A full file ([`write_memory`]) leaves the pages that are all zeroes as holes: a guest that
//! touched little of its memory makes a small file on disk whatever its size, and a hole reads
//! as zeroes. A diff file ([`write_dirty_pages`]) has the same layout and length, with data only
//! at the dirty pages (zero pages included) and holes everywhere else; [`merge_diff`] copies its
//! data onto a full file, which then holds the memory as it was when the diff was taken.
//!
//! Holes need a file system that keeps them (ext4, XFS, btrfs, tmpfs all do). A diff file on one
//! that does not would read as data everywhere, and merging it would overwrite the whole base.
//!
//! # Dirty pages
//!
//! A dirty bitmap has one `Vec<u64>` per guest memory region, with bit *b* of word *w* standing
//! for the 4 KiB page `64 * w + b` of the region, as KVM's dirty log (`KVM_GET_DIRTY_LOG`) gives
//! it. KVM's log holds what the guest wrote; what the VMM's devices wrote through vm-memory is
//! in the regions' [`AtomicBitmap`]s when the memory tracks it
//! ([`create_tracked_guest_memory`](crate::create_tracked_guest_memory)), and
//! [`take_bitmap_dirty_pages`] adds those.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
    MmapRegion, WriteVolatile,
};

use crate::{PAGE_SIZE, TrackedGuestMemory};

/// [`PAGE_SIZE`] as a `usize`.
const PAGE: usize = 0x1000;

/// Bytes [`merge_diff`] copies at a time.
const MERGE_CHUNK: usize = 1 << 20;

/// Errors of writing and merging memory files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Writing guest memory to the file failed.
    #[error("Cannot write guest memory to the memory file at offset {offset:#x}")]
    Write {
        /// Offset in the file of the write that failed.
        offset: u64,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Guest memory could not be read.
    #[error("Cannot read guest memory at {addr:#x} of region {region}")]
    Read {
        /// Index of the region.
        region: usize,
        /// Offset in the region.
        addr: u64,
        /// Why it failed.
        #[source]
        source: GuestMemoryError,
    },
    /// The file could not be truncated or extended to the memory's size.
    #[error("Cannot set the memory file's length to {len:#x}")]
    SetLen {
        /// The length asked for.
        len: u64,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The regions together are longer than a file can be.
    #[error("The guest memory is longer than a file can be")]
    TooLong,
    /// The dirty bitmap does not have one entry per guest memory region.
    #[error("The dirty bitmap covers {got} regions, the guest memory has {expected}")]
    DirtyRegions {
        /// The number of regions of the guest memory.
        expected: usize,
        /// The number of regions in the bitmap.
        got: usize,
    },
    /// A region's dirty bitmap does not have one bit per page of the region.
    #[error("The dirty bitmap of region {region} has {got} words, the region needs {expected}")]
    DirtyLength {
        /// Index of the region.
        region: usize,
        /// The number of 64-bit words for the region's pages.
        expected: usize,
        /// The number of words given.
        got: usize,
    },
    /// A region's `AtomicBitmap` does not track 4 KiB pages.
    #[error("The dirty page tracking of region {region} is not by 4 KiB page")]
    BitmapPageSize {
        /// Index of the region.
        region: usize,
    },
    /// The diff file and the base file differ in length: they are not of the same guest.
    #[error("The diff memory file holds {diff:#x} bytes, the base file {base:#x}")]
    LengthMismatch {
        /// Length of the base file.
        base: u64,
        /// Length of the diff file.
        diff: u64,
    },
    /// The length, data or holes of a file could not be read.
    #[error("Cannot read the {which} memory file")]
    ReadFile {
        /// `"base"` or `"diff"`.
        which: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// Result type of writing and merging memory files.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes every region of `mem` to `file` in the [layout](self#layout) of a memory file,
/// leaving all-zero pages as holes, and sets the file's length to the memory's size.
///
/// The file is truncated first, so that the holes read as zeroes whatever it held. Memory is
/// written from its mapping, a page at a time checked for zeroes through a 4 KiB buffer on the
/// stack, the pages that are not written out in runs: nothing of the guest's size is allocated.
/// The guest and its devices must not write memory meanwhile (the VM is paused).
///
/// # Errors
///
/// [`Error::SetLen`] when the file cannot be truncated or extended, [`Error::Write`] when a write
/// fails (a full disk), [`Error::Read`] for memory vm-memory cannot read (none in a well-formed
/// `GuestMemoryMmap`), [`Error::TooLong`] when the regions add up past `u64`.
pub fn write_memory<B: Bitmap>(mem: &GuestMemoryMmap<B>, file: &mut File) -> Result<()> {
    truncate(file)?;
    let mut start = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let len = region.len();
        let mut page = [0u8; PAGE];
        let mut run: Option<u64> = None;
        let mut addr = 0u64;
        while addr < len {
            let count = chunk(len, addr);
            let slice = region
                .get_slice(MemoryRegionAddress(addr), count)
                .map_err(|source| Error::Read {
                    region: index,
                    addr,
                    source,
                })?;
            let buf = &mut page[..count];
            slice.copy_to(buf);
            let zero = is_zero(buf);
            match (zero, run) {
                (false, None) => run = Some(addr),
                (true, Some(from)) => {
                    write_run(region, index, file, start, from, addr)?;
                    run = None;
                }
                _ => {}
            }
            addr = addr.saturating_add(PAGE_SIZE);
        }
        if let Some(from) = run {
            write_run(region, index, file, start, from, len)?;
        }
        start = start.checked_add(len).ok_or(Error::TooLong)?;
    }
    set_len(file, start)
}

/// Writes the pages of `mem` that `dirty` marks to `file` at their offsets in the
/// [layout](self#layout) of a memory file, and returns how many bytes it wrote: a diff file,
/// with holes wherever a page is not dirty.
///
/// `dirty` has one bitmap per region, in the [format](self#dirty-pages) of KVM's dirty log. The
/// file is truncated first and ends up as long as the memory. A dirty page is written even when
/// it is all zeroes (a hole in a diff means "unchanged"). Pages are written from the mapping,
/// consecutive dirty pages together; the VM must be paused meanwhile.
///
/// # Errors
///
/// [`Error::DirtyRegions`] or [`Error::DirtyLength`] when `dirty` does not have the shape of
/// `mem` (the file is left untouched then); otherwise those of [`write_memory`].
pub fn write_dirty_pages<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    file: &mut File,
    dirty: &[Vec<u64>],
) -> Result<u64> {
    check_shape(mem, dirty)?;
    truncate(file)?;
    let mut start = 0u64;
    let mut written = 0u64;
    for ((index, region), bitmap) in mem.iter().enumerate().zip(dirty) {
        let len = region.len();
        let mut run: Option<u64> = None;
        for (word_index, &word) in bitmap.iter().enumerate() {
            if word == 0 && run.is_none() {
                // A whole word of clean pages, and no run to end.
                continue;
            }
            for bit in 0..64 {
                let addr = page_addr(word_index.saturating_mul(64).saturating_add(bit));
                if addr >= len {
                    break;
                }
                match (word & (1 << bit) != 0, run) {
                    (true, None) => run = Some(addr),
                    (false, Some(from)) => {
                        write_run(region, index, file, start, from, addr)?;
                        written = written.saturating_add(addr - from);
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(from) = run {
            write_run(region, index, file, start, from, len)?;
            written = written.saturating_add(len - from);
        }
        start = start.checked_add(len).ok_or(Error::TooLong)?;
    }
    set_len(file, start)?;
    Ok(written)
}

/// A dirty bitmap with every page of `mem` clean, in the [format](self#dirty-pages)
/// [`write_dirty_pages`] takes: one zeroed `Vec<u64>` per region, one bit per 4 KiB page.
pub fn clean_dirty_bitmap<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|region| vec![0; words_for(region.len())])
        .collect()
}

/// Adds to `dirty` the pages the regions' [`AtomicBitmap`]s mark (what the VMM's devices wrote
/// through vm-memory), and clears those bitmaps, so that the next diff starts from now, as
/// KVM's dirty log does when it is read. Regions without a bitmap add nothing.
///
/// # Errors
///
/// [`Error::DirtyRegions`] or [`Error::DirtyLength`] when `dirty` does not have the shape of
/// `mem`, [`Error::BitmapPageSize`] when a region's bitmap tracks pages of another size than
/// 4 KiB; nothing is changed then.
pub fn take_bitmap_dirty_pages(mem: &TrackedGuestMemory, dirty: &mut [Vec<u64>]) -> Result<()> {
    check_shape(mem, dirty)?;
    for (index, region) in mem.iter().enumerate() {
        let mapping: &MmapRegion<Option<AtomicBitmap>> = region;
        if let Some(bitmap) = mapping.bitmap() {
            let pages = usize::try_from(region.len().div_ceil(PAGE_SIZE)).unwrap_or(usize::MAX);
            if bitmap.len() != pages {
                return Err(Error::BitmapPageSize { region: index });
            }
        }
    }
    for (region, words) in mem.iter().zip(dirty.iter_mut()) {
        let mapping: &MmapRegion<Option<AtomicBitmap>> = region;
        if let Some(bitmap) = mapping.bitmap() {
            for (word, taken) in words.iter_mut().zip(bitmap.get_and_reset()) {
                *word |= taken;
            }
        }
    }
    Ok(())
}

/// Copies the data of the diff memory file `diff` (its ranges that are not holes) onto the full
/// memory file `base` at the same offsets, and returns how many bytes it copied. `base` then
/// holds the memory as it was when the diff was written; merge the diffs of a chain oldest
/// first.
///
/// Data and holes are found with `lseek(SEEK_DATA/SEEK_HOLE)`, which moves `diff`'s file
/// position; data is copied through a buffer of 1 MiB. `base` must be open for writing.
///
/// # Errors
///
/// [`Error::LengthMismatch`] when the files differ in length (nothing is copied then);
/// [`Error::ReadFile`] when a file's length, data or holes cannot be read; [`Error::Write`] when
/// writing `base` fails.
pub fn merge_diff(base: &File, diff: &File) -> Result<u64> {
    let read_err = |which| move |source| Error::ReadFile { which, source };
    let base_len = base.metadata().map_err(read_err("base"))?.len();
    let len = diff.metadata().map_err(read_err("diff"))?.len();
    if base_len != len {
        return Err(Error::LengthMismatch {
            base: base_len,
            diff: len,
        });
    }
    let mut buf = vec![0u8; MERGE_CHUNK];
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(diff, pos, libc::SEEK_DATA).map_err(read_err("diff"))? else {
            break;
        };
        // Past the last data there is a hole, if only the implicit one at the end of the file.
        let end = seek(diff, data, libc::SEEK_HOLE)
            .map_err(read_err("diff"))?
            .unwrap_or(len)
            .min(len);
        let mut at = data;
        while at < end {
            let count = usize::try_from(end - at).map_or(MERGE_CHUNK, |n| n.min(MERGE_CHUNK));
            let chunk = &mut buf[..count];
            diff.read_exact_at(chunk, at).map_err(read_err("diff"))?;
            base.write_all_at(chunk, at)
                .map_err(|source| Error::Write { offset: at, source })?;
            at = at.saturating_add(count as u64);
        }
        copied = copied.saturating_add(end.saturating_sub(data));
        pos = end.max(data.saturating_add(1));
    }
    Ok(copied)
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA` and `SEEK_HOLE`: the offset found, or `None`
/// when there is no data or hole at or past `offset` (`ENXIO`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: `lseek` only reads the descriptor, which `file` keeps open during the call, and
    // moves its file position; no memory is passed.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(u64::try_from(ret).ok())
}

/// Writes the bytes `from..to` of `region` (index `index`) to `file` at `start + from`.
fn write_run<R: GuestMemoryRegion>(
    region: &R,
    index: usize,
    file: &mut File,
    start: u64,
    from: u64,
    to: u64,
) -> Result<()> {
    let offset = start.checked_add(from).ok_or(Error::TooLong)?;
    let count = usize::try_from(to.saturating_sub(from)).map_err(|_| Error::TooLong)?;
    let slice = region
        .get_slice(MemoryRegionAddress(from), count)
        .map_err(|source| Error::Read {
            region: index,
            addr: from,
            source,
        })?;
    let write_err = |source| Error::Write { offset, source };
    file.seek(SeekFrom::Start(offset)).map_err(write_err)?;
    file.write_all_volatile(&slice).map_err(|err| match err {
        vm_memory::VolatileMemoryError::IOError(source) => Error::Write { offset, source },
        other => Error::Write {
            offset,
            source: io::Error::other(other),
        },
    })
}

/// Checks that `dirty` has one bitmap per region of `mem`, each with one bit per page.
fn check_shape<B: Bitmap>(mem: &GuestMemoryMmap<B>, dirty: &[Vec<u64>]) -> Result<()> {
    let expected = mem.num_regions();
    if dirty.len() != expected {
        return Err(Error::DirtyRegions {
            expected,
            got: dirty.len(),
        });
    }
    for (region, (mapping, words)) in mem.iter().zip(dirty).enumerate() {
        let expected = words_for(mapping.len());
        if words.len() != expected {
            return Err(Error::DirtyLength {
                region,
                expected,
                got: words.len(),
            });
        }
    }
    Ok(())
}

/// The number of 64-bit bitmap words for a region of `len` bytes.
fn words_for(len: u64) -> usize {
    usize::try_from(len.div_ceil(PAGE_SIZE).div_ceil(64)).unwrap_or(usize::MAX)
}

/// The offset in a region of page `page`.
fn page_addr(page: usize) -> u64 {
    u64::try_from(page)
        .unwrap_or(u64::MAX)
        .saturating_mul(PAGE_SIZE)
}

/// The length of the page at `addr` in a region of `len` bytes: a whole page but at a region's
/// end that is not page-aligned.
fn chunk(len: u64, addr: u64) -> usize {
    usize::try_from(len.saturating_sub(addr).min(PAGE_SIZE)).unwrap_or(PAGE)
}

/// Whether `buf` is all zeroes.
fn is_zero(buf: &[u8]) -> bool {
    // Or-ing 64 bytes at a time lets the compiler use vector instructions.
    let mut chunks = buf.chunks_exact(64);
    let whole = chunks
        .by_ref()
        .all(|chunk| chunk.iter().fold(0u8, |acc, byte| acc | byte) == 0);
    whole && chunks.remainder().iter().all(|&byte| byte == 0)
}

fn truncate(file: &File) -> Result<()> {
    set_len(file, 0)
}

fn set_len(file: &File, len: u64) -> Result<()> {
    file.set_len(len)
        .map_err(|source| Error::SetLen { len, source })
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::layout::{FIRST_ADDR_PAST_32BITS, MMIO32_START};
    use crate::{
        MemoryOptions, create_guest_memory, create_guest_memory_from_file,
        create_tracked_guest_memory,
    };

    const MIB: u64 = 1 << 20;

    fn open_rw(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// A guest with a marker byte pattern on the given pages, and a first page left zero.
    fn guest_with_pages(size: u64, pages: &[u64]) -> GuestMemoryMmap {
        let mem = create_guest_memory(size, MemoryOptions::default()).unwrap();
        for &page in pages {
            let fill: Vec<u8> = (0..PAGE).map(|i| (i as u8) ^ (page as u8) | 1).collect();
            mem.write_slice(&fill, GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
        mem
    }

    /// Every byte of guest memory, region after region.
    fn contents<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<u8> {
        let mut all = Vec::new();
        for region in mem.iter() {
            let mut buf = vec![0u8; region.len() as usize];
            region.read_slice(&mut buf, MemoryRegionAddress(0)).unwrap();
            all.extend(buf);
        }
        all
    }

    /// The resident size, in bytes, of the host mapping holding `host` (from `/proc/self/smaps`).
    fn rss_of_mapping(host: usize) -> u64 {
        let rss = crate::smaps::mapping_field(host, "Rss:");
        let kib: u64 = rss.trim_end_matches("kB").trim().parse().unwrap();
        kib * 1024
    }

    #[test]
    fn memory_written_to_a_file_maps_back_with_the_same_bytes() {
        let mem = guest_with_pages(8 * MIB, &[1, 2, 700, 2047]);
        let file = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(file.as_path())).unwrap();
        assert_eq!(fs::metadata(file.as_path()).unwrap().len(), 8 * MIB);

        let restored =
            create_guest_memory_from_file(file.as_file(), 8 * MIB, MemoryOptions::default())
                .unwrap();
        assert_eq!(restored.num_regions(), 1);
        assert!(contents(&restored) == contents(&mem));
    }

    #[test]
    fn regions_follow_each_other_in_the_file() {
        // Two regions, the second far above the first in the guest, right after it in the file.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 * 1024),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), 3 * PAGE),
        ])
        .unwrap();
        mem.write_obj(0x11u8, GuestAddress(64 * 1024 - 1)).unwrap();
        mem.write_obj(0x22u8, GuestAddress(FIRST_ADDR_PAST_32BITS))
            .unwrap();
        mem.write_obj(
            0x33u8,
            GuestAddress(FIRST_ADDR_PAST_32BITS + 3 * PAGE_SIZE - 1),
        )
        .unwrap();
        let file = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(file.as_path())).unwrap();
        let bytes = fs::read(file.as_path()).unwrap();
        assert_eq!(bytes.len(), 64 * 1024 + 3 * PAGE);
        assert_eq!(bytes[64 * 1024 - 1], 0x11);
        assert_eq!(bytes[64 * 1024], 0x22);
        assert_eq!(bytes[bytes.len() - 1], 0x33);
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 3);
    }

    #[test]
    fn a_file_maps_as_the_regions_of_a_guest_above_the_gap() {
        let size = MMIO32_START + 2 * PAGE_SIZE;
        let file = TempFile::new().unwrap();
        let f = file.as_file();
        f.set_len(size).unwrap();
        f.write_all_at(b"low", 0).unwrap();
        f.write_all_at(b"high", MMIO32_START).unwrap();
        let mem = create_guest_memory_from_file(f, size, MemoryOptions::default()).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let mut low = [0u8; 3];
        mem.read_slice(&mut low, GuestAddress(0)).unwrap();
        assert_eq!(&low, b"low");
        let mut high = [0u8; 4];
        mem.read_slice(&mut high, GuestAddress(FIRST_ADDR_PAST_32BITS))
            .unwrap();
        assert_eq!(&high, b"high");
    }

    #[test]
    fn zero_pages_are_holes_in_the_file() {
        let size = 64 * MIB;
        let mem = guest_with_pages(size, &[3, 9000]);
        let file = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(file.as_path())).unwrap();
        let meta = fs::metadata(file.as_path()).unwrap();
        assert_eq!(meta.len(), size);
        // Two pages of data, and a little for the file system's own bookkeeping.
        let on_disk = meta.blocks() * 512;
        assert!(on_disk >= 2 * PAGE_SIZE, "{on_disk}");
        assert!(on_disk <= 16 * PAGE_SIZE, "{on_disk} bytes on disk");
        let bytes = fs::read(file.as_path()).unwrap();
        assert!(bytes == contents(&mem));
    }

    #[test]
    fn a_file_that_held_data_is_truncated_first() {
        let file = TempFile::new().unwrap();
        fs::write(file.as_path(), vec![0xffu8; 2 * MIB as usize]).unwrap();
        let mem = guest_with_pages(MIB, &[5]);
        write_memory(&mem, &mut open_rw(file.as_path())).unwrap();
        assert!(fs::read(file.as_path()).unwrap() == contents(&mem));
    }

    #[test]
    fn guest_writes_to_file_backed_memory_never_reach_the_file() {
        let mem = guest_with_pages(4 * MIB, &[0]);
        let file = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(file.as_path())).unwrap();
        let before = fs::read(file.as_path()).unwrap();

        let file_ro = File::open(file.as_path()).unwrap();
        let restored =
            create_guest_memory_from_file(&file_ro, 4 * MIB, MemoryOptions::default()).unwrap();
        restored
            .write_slice(&[0xee; PAGE], GuestAddress(0))
            .unwrap();
        restored
            .write_slice(&[0xdd; 16], GuestAddress(3 * MIB))
            .unwrap();
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0)).unwrap(), 0xee);
        drop(restored);
        assert!(fs::read(file.as_path()).unwrap() == before);
        // Another VM mapping the same file sees it as saved.
        let other =
            create_guest_memory_from_file(&file_ro, 4 * MIB, MemoryOptions::default()).unwrap();
        assert!(contents(&other) == before);
    }

    #[test]
    fn a_file_shorter_than_the_memory_is_refused() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4 * MIB - PAGE_SIZE).unwrap();
        let err = create_guest_memory_from_file(file.as_file(), 4 * MIB, MemoryOptions::default())
            .unwrap_err();
        assert!(matches!(
            err,
            crate::Error::FileTooShort { len, size } if len == 4 * MIB - PAGE_SIZE && size == 4 * MIB
        ));
        assert_eq!(
            err.to_string(),
            "The guest memory file holds 0x3ff000 bytes, less than the 0x400000 bytes of guest \
             memory"
        );
        // A longer file is fine: only `size` bytes are mapped.
        file.as_file().set_len(8 * MIB).unwrap();
        create_guest_memory_from_file(file.as_file(), 4 * MIB, MemoryOptions::default()).unwrap();
    }

    #[test]
    fn mapping_a_file_reads_nothing_until_the_guest_touches_pages() {
        let size = 256 * MIB;
        let file = TempFile::new().unwrap();
        {
            let chunk = vec![0x5au8; MIB as usize];
            let f = file.as_file();
            for i in 0..256 {
                f.write_all_at(&chunk, i * MIB).unwrap();
            }
        }
        let mem =
            create_guest_memory_from_file(file.as_file(), size, MemoryOptions::default()).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert!(rss_of_mapping(host) < MIB, "{}", rss_of_mapping(host));
        // Eight pages touched, 32 MiB apart: what is faulted in is around each of them (the
        // kernel maps up to a large page-cache folio, 2 MiB, per fault), not the file.
        for i in 0..8 {
            let value: u8 = mem.read_obj(GuestAddress(i * 32 * MIB)).unwrap();
            assert_eq!(value, 0x5a);
        }
        let rss = rss_of_mapping(host);
        assert!(rss >= 8 * PAGE_SIZE, "{rss}");
        assert!(rss <= 8 * 2 * MIB, "{rss}");
    }

    #[test]
    fn a_diff_of_two_dirty_pages_merged_onto_the_base_equals_a_full_write() {
        let size = 8 * MIB;
        let mem = guest_with_pages(size, &[1, 64, 65, 1000]);
        let base = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(base.as_path())).unwrap();

        // The guest rewrites page 65 and clears page 1000.
        mem.write_slice(&[0x77; 100], GuestAddress(65 * PAGE_SIZE + 8))
            .unwrap();
        mem.write_slice(&[0; PAGE], GuestAddress(1000 * PAGE_SIZE))
            .unwrap();
        let mut dirty = clean_dirty_bitmap(&mem);
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].len(), 32);
        dirty[0][1] |= 1 << 1;
        dirty[0][1000 / 64] |= 1 << (1000 % 64);

        let diff = TempFile::new().unwrap();
        let written = write_dirty_pages(&mem, &mut open_rw(diff.as_path()), &dirty).unwrap();
        assert_eq!(written, 2 * PAGE_SIZE);
        assert_eq!(fs::metadata(diff.as_path()).unwrap().len(), size);
        assert!(fs::metadata(diff.as_path()).unwrap().blocks() * 512 <= 16 * PAGE_SIZE);

        let copied = merge_diff(&open_rw(base.as_path()), diff.as_file()).unwrap();
        assert_eq!(copied, 2 * PAGE_SIZE);
        let full = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(full.as_path())).unwrap();
        assert!(fs::read(base.as_path()).unwrap() == fs::read(full.as_path()).unwrap());
    }

    #[test]
    fn runs_of_dirty_pages_across_bitmap_words_and_to_the_end_are_written() {
        let size = MIB;
        let pages: Vec<u64> = (0..256).collect();
        let mem = guest_with_pages(size, &pages);
        let mut dirty = clean_dirty_bitmap(&mem);
        // Pages 60..70 (across two words) and 250..256 (to the region's end).
        dirty[0][0] = 0xf << 60;
        dirty[0][1] = 0x3f;
        dirty[0][3] = 0x3f << 58;
        let diff = TempFile::new().unwrap();
        let written = write_dirty_pages(&mem, &mut open_rw(diff.as_path()), &dirty).unwrap();
        assert_eq!(written, 16 * PAGE_SIZE);
        let bytes = fs::read(diff.as_path()).unwrap();
        let all = contents(&mem);
        for page in 0..256usize {
            let range = page * PAGE..(page + 1) * PAGE;
            let dirty = (60..70).contains(&page) || page >= 250;
            if dirty {
                assert!(bytes[range.clone()] == all[range], "page {page}");
            } else {
                assert!(is_zero(&bytes[range]), "page {page}");
            }
        }
    }

    #[test]
    fn pages_written_through_vm_memory_are_taken_from_its_bitmap() {
        let mem = create_tracked_guest_memory(2 * MIB, MemoryOptions::default(), true).unwrap();
        mem.write_obj(1u32, GuestAddress(5 * PAGE_SIZE + 4))
            .unwrap();
        mem.write_slice(&[1; 2], GuestAddress(8 * PAGE_SIZE - 1))
            .unwrap();
        let mut dirty = clean_dirty_bitmap(&mem);
        // What KVM's log says the guest wrote.
        dirty[0][100 / 64] |= 1 << (100 % 64);
        take_bitmap_dirty_pages(&mem, &mut dirty).unwrap();
        // The write across pages 7 and 8 marks both.
        assert_eq!(dirty[0][0], (1 << 5) | (1 << 7) | (1 << 8));
        assert_eq!(dirty[0][1], 1 << 36);
        // Taken: the next diff starts clean.
        let mut again = clean_dirty_bitmap(&mem);
        take_bitmap_dirty_pages(&mem, &mut again).unwrap();
        assert!(again[0].iter().all(|&word| word == 0));

        // Memory mapped from a file with a bitmap tracks writes as well.
        let file = TempFile::new().unwrap();
        write_memory(&mem, &mut open_rw(file.as_path())).unwrap();
        let restored = crate::create_tracked_guest_memory_from_file(
            file.as_file(),
            2 * MIB,
            MemoryOptions::default(),
            true,
        )
        .unwrap();
        assert_eq!(
            restored
                .read_obj::<u32>(GuestAddress(5 * PAGE_SIZE + 4))
                .unwrap(),
            1
        );
        restored.write_obj(2u8, GuestAddress(PAGE_SIZE)).unwrap();
        let mut dirty = clean_dirty_bitmap(&restored);
        take_bitmap_dirty_pages(&restored, &mut dirty).unwrap();
        assert_eq!(dirty[0][0], 1 << 1);
    }

    #[test]
    fn a_dirty_bitmap_of_another_shape_is_refused_before_the_file_is_touched() {
        let mem = guest_with_pages(MIB, &[0]);
        let file = TempFile::new().unwrap();
        fs::write(file.as_path(), b"kept").unwrap();
        let mut f = open_rw(file.as_path());
        assert!(matches!(
            write_dirty_pages(&mem, &mut f, &[]),
            Err(Error::DirtyRegions {
                expected: 1,
                got: 0
            })
        ));
        assert!(matches!(
            write_dirty_pages(&mem, &mut f, &[vec![0; 3]]),
            Err(Error::DirtyLength {
                region: 0,
                expected: 4,
                got: 3
            })
        ));
        assert!(matches!(
            write_dirty_pages(&mem, &mut f, &[vec![0; 4], vec![]]),
            Err(Error::DirtyRegions { .. })
        ));
        assert_eq!(fs::read(file.as_path()).unwrap(), b"kept");
    }

    #[test]
    fn merging_files_of_different_lengths_is_refused() {
        let base = TempFile::new().unwrap();
        let diff = TempFile::new().unwrap();
        base.as_file().set_len(2 * MIB).unwrap();
        diff.as_file().set_len(MIB).unwrap();
        diff.as_file().write_all_at(b"x", 0).unwrap();
        let err = merge_diff(base.as_file(), diff.as_file()).unwrap_err();
        assert!(matches!(
            err,
            Error::LengthMismatch {
                base: 0x200000,
                diff: 0x100000
            }
        ));
        assert!(is_zero(&fs::read(base.as_path()).unwrap()));
    }

    #[test]
    fn an_empty_diff_copies_nothing() {
        let base = TempFile::new().unwrap();
        let diff = TempFile::new().unwrap();
        fs::write(base.as_path(), vec![7u8; 3 * PAGE]).unwrap();
        diff.as_file().set_len(3 * PAGE_SIZE).unwrap();
        assert_eq!(merge_diff(base.as_file(), diff.as_file()).unwrap(), 0);
        assert_eq!(fs::read(base.as_path()).unwrap(), vec![7u8; 3 * PAGE]);
    }

    #[test]
    fn only_all_zero_buffers_are_zero() {
        assert!(is_zero(&[0; PAGE]));
        assert!(is_zero(&[0; 100]));
        assert!(is_zero(&[]));
        for at in [0, 63, 64, 4000, PAGE - 1] {
            let mut buf = [0u8; PAGE];
            buf[at] = 1;
            assert!(!is_zero(&buf), "{at}");
        }
        let mut tail = [0u8; 100];
        tail[99] = 1;
        assert!(!is_zero(&tail));
    }
}
