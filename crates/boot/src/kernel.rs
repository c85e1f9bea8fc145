//! Loading the kernel image: an ELF `vmlinux` (64-bit Linux entry, or PVH when the image carries
//! the PVH note) or a `bzImage`.
//!
//! The format is detected from the image itself. Before linux-loader copies anything into guest
//! memory, the image's headers are validated here, so that a truncated, foreign or misplaced image
//! is refused with an error that says what is wrong with it:
//!
//! - ELF: a little-endian x86_64 ELF64 whose loadable segments lie in the file, load at or above
//!   [`HIMEM_START`] (below it are the boot structures) and fit in guest memory, and whose entry
//!   point is inside one of them. The segments load at their physical addresses.
//! - bzImage: boot protocol 2.12 or later with the 64-bit entry (`XLF_KERNEL_64`), loaded high.
//!   The protected-mode part is loaded at [`HIMEM_START`]; the 64-bit entry is 0x200 bytes into it.

use std::io::{self, Read, Seek, SeekFrom};
use std::mem::size_of;

use linux_loader::bootparam::{LOADED_HIGH, XLF_KERNEL_64, setup_header};
use linux_loader::elf::{
    EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_X86_64, Elf64_Ehdr, Elf64_Phdr, PT_LOAD,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::layout::{DEFAULT_INITRD_ADDR_MAX, HIMEM_START};

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or seeking the image failed.
    #[error("Cannot read the kernel image")]
    Io(#[source] io::Error),
    /// The image is neither an ELF file nor a bzImage.
    #[error("The kernel image is neither an ELF vmlinux nor a bzImage")]
    NotAKernel,
    /// The image ends inside its own headers.
    #[error("The {format} kernel image is truncated: its headers run past its end")]
    Truncated {
        /// The detected format.
        format: &'static str,
    },
    /// The ELF file is not a 64-bit little-endian x86_64 image.
    #[error(
        "The ELF kernel image is not a 64-bit little-endian x86_64 image \
         (class {class}, data encoding {data}, machine {machine})"
    )]
    UnsupportedElf {
        /// `EI_CLASS` of the image (2 is 64-bit).
        class: u8,
        /// `EI_DATA` of the image (1 is little-endian).
        data: u8,
        /// `e_machine` of the image (62 is x86_64).
        machine: u16,
    },
    /// The program header entries are not `Elf64_Phdr`s.
    #[error("The ELF kernel image has program header entries of {0} bytes instead of 56")]
    ProgramHeaderSize(u16),
    /// A loadable segment is malformed.
    #[error(
        "The ELF segment at {paddr:#x} is malformed: {filesz:#x} bytes at file offset \
         {offset:#x}, {memsz:#x} bytes in memory, in a {file_len:#x}-byte image"
    )]
    BadSegment {
        /// Physical load address.
        paddr: u64,
        /// File offset of the segment's data.
        offset: u64,
        /// Bytes of the segment in the file.
        filesz: u64,
        /// Bytes of the segment in memory.
        memsz: u64,
        /// Length of the image file.
        file_len: u64,
    },
    /// A segment would load below 1 MiB, over the boot structures.
    #[error(
        "The ELF segment at {0:#x} loads below {HIMEM_START:#x}, where the boot structures are"
    )]
    SegmentBelowHighMemory(u64),
    /// The kernel does not fit in guest memory.
    #[error("The kernel's {size:#x} bytes at {addr:#x} do not fit in guest memory")]
    OutsideMemory {
        /// Load address.
        addr: u64,
        /// Size in memory.
        size: u64,
    },
    /// The ELF image has nothing to load.
    #[error("The ELF kernel image has no loadable segment")]
    NoLoadableSegment,
    /// An entry point is not inside the loaded kernel.
    #[error("The kernel's {kind} entry point {addr:#x} is not inside a loaded segment")]
    EntryOutsideKernel {
        /// Which entry point: "64-bit" or "PVH".
        kind: &'static str,
        /// The entry point.
        addr: u64,
    },
    /// The bzImage cannot be entered in 64-bit mode.
    #[error(
        "The bzImage (boot protocol {:#06x}, xloadflags {:#x}) does not support the 64-bit entry",
        version,
        xloadflags
    )]
    No64BitEntry {
        /// Boot protocol version from the setup header.
        version: u16,
        /// `xloadflags` from the setup header (0 before protocol 2.12).
        xloadflags: u16,
    },
    /// The bzImage's protected-mode kernel does not expect to be loaded at 1 MiB.
    #[error(
        "The bzImage does not set LOADED_HIGH: its kernel cannot be loaded at {HIMEM_START:#x}"
    )]
    NotLoadedHigh,
    /// The bzImage's decompression buffer does not fit in guest memory.
    #[error(
        "The bzImage needs {init_size:#x} bytes at {addr:#x} to decompress, beyond guest memory"
    )]
    NoRoomToDecompress {
        /// Start of the buffer.
        addr: u64,
        /// `init_size` from the setup header.
        init_size: u32,
    },
    /// linux-loader failed to copy the image into guest memory.
    #[error("Cannot load the kernel image into guest memory")]
    Load(#[source] linux_loader::loader::Error),
}

/// Result type of kernel loading.
pub type Result<T> = std::result::Result<T, Error>;

/// Offset of the 64-bit entry point into a bzImage's protected-mode kernel (`startup_64`).
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Lowest boot protocol version that has `xloadflags`, and with it the 64-bit entry (2.12).
pub const MIN_BZIMAGE_VERSION: u16 = 0x020c;

/// File offset of the bzImage setup header.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;

/// File offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

/// Setup sectors assumed when the header says 0.
const DEFAULT_SETUP_SECTS: u64 = 4;

/// Size of a setup sector.
const SECTOR_SIZE: u64 = 512;

/// The kind of kernel image, and so the boot protocol [`configure_system`] uses.
///
/// [`configure_system`]: crate::configure_system
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelFormat {
    /// ELF vmlinux, entered in 64-bit mode with the Linux boot protocol.
    Elf,
    /// ELF vmlinux with a PVH entry point, entered in 32-bit protected mode with the PVH boot
    /// protocol. [`LoadedKernel::without_pvh`] switches to the 64-bit entry.
    ElfPvh,
    /// bzImage, entered in 64-bit mode with the Linux boot protocol.
    BzImage,
}

impl KernelFormat {
    fn name(self) -> &'static str {
        match self {
            KernelFormat::Elf | KernelFormat::ElfPvh => "ELF",
            KernelFormat::BzImage => "bzImage",
        }
    }
}

/// A kernel in guest memory, and what the rest of the boot setup needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadedKernel {
    /// The image format, which picks the boot protocol.
    pub format: KernelFormat,
    /// 64-bit entry point (Linux boot protocol).
    pub entry: GuestAddress,
    /// 32-bit PVH entry point, when the ELF image has one.
    pub pvh_entry: Option<GuestAddress>,
    /// First byte after the loaded image.
    pub end: GuestAddress,
    /// The bzImage's setup header, with `code32_start` set to the load address.
    pub setup_header: Option<setup_header>,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

impl LoadedKernel {
    /// Boots with the 64-bit Linux entry even if the image has a PVH entry point.
    pub fn without_pvh(mut self) -> Self {
        if self.format == KernelFormat::ElfPvh {
            self.format = KernelFormat::Elf;
        }
        self
    }

    /// First byte after the memory the kernel uses before it manages memory itself: the image,
    /// and for a bzImage the buffer it decompresses into (`init_size` bytes from its preferred
    /// address, or from the load address aligned up when it relocates itself).
    pub fn footprint_end(&self) -> GuestAddress {
        let end = match self.setup_header {
            Some(hdr) if self.format == KernelFormat::BzImage => {
                let buffer_end =
                    decompression_buffer(&hdr).saturating_add(u64::from(hdr.init_size));
                self.end.0.max(buffer_end)
            }
            _ => self.end.0,
        };
        GuestAddress(end)
    }
}

/// Where a bzImage loaded at `code32_start` decompresses itself (`%rbp` in the kernel's
/// `startup_64`): the load address aligned up to `kernel_alignment` when the kernel is
/// relocatable, but never below its preferred address.
fn decompression_buffer(hdr: &setup_header) -> u64 {
    let load = u64::from(hdr.code32_start);
    let alignment = u64::from(hdr.kernel_alignment);
    let start = if hdr.relocatable_kernel != 0 && alignment.is_power_of_two() {
        load.checked_next_multiple_of(alignment).unwrap_or(u64::MAX)
    } else {
        load
    };
    start.max(hdr.pref_address)
}

/// Reads into `buf` until it is full or the image ends; returns the bytes read.
fn read_prefix<F: Read>(image: &mut F, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match image.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads exactly `buf.len()` bytes; the image ending first is a truncated `format` image.
fn read_header<F: Read>(image: &mut F, buf: &mut [u8], format: KernelFormat) -> Result<()> {
    image.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Truncated {
            format: format.name(),
        },
        _ => Error::Io(e),
    })
}

/// Tells an ELF image from a bzImage by their magic numbers.
fn detect_format<F: Read + Seek>(image: &mut F) -> Result<KernelFormat> {
    image.rewind().map_err(Error::Io)?;
    let mut prefix = [0u8; BZIMAGE_MAGIC_OFFSET + 4];
    let len = read_prefix(image, &mut prefix).map_err(Error::Io)?;
    let prefix = &prefix[..len];
    if prefix.starts_with(ELFMAG) {
        Ok(KernelFormat::Elf)
    } else if prefix.get(BZIMAGE_MAGIC_OFFSET..) == Some(b"HdrS") {
        Ok(KernelFormat::BzImage)
    } else {
        Err(Error::NotAKernel)
    }
}

/// Whether guest memory holds all of `[addr, addr + size)`.
fn in_memory<M: GuestMemoryBackend>(mem: &M, addr: u64, size: u64) -> bool {
    let Ok(len) = usize::try_from(size) else {
        return false;
    };
    addr.checked_add(size).is_some()
        && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
}

/// Loads the kernel `image` into `mem`, detecting its format.
///
/// An ELF image with a PVH note gives [`KernelFormat::ElfPvh`] with both entry points recorded;
/// [`LoadedKernel::without_pvh`] selects the 64-bit entry instead. `image` is typically a
/// [`std::fs::File`] or a [`std::io::Cursor`] over the image bytes.
///
/// # Errors
///
/// [`Error::NotAKernel`] for anything but an ELF or bzImage (an empty file included), and the
/// errors listed in the module documentation for malformed or misplaced images.
pub fn load_kernel<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    match detect_format(image)? {
        KernelFormat::BzImage => load_bzimage(mem, image),
        _ => load_elf(mem, image),
    }
}

/// A loadable segment's physical range.
#[derive(Clone, Copy)]
struct Segment {
    start: u64,
    end: u64,
}

fn inside(segments: &[Segment], addr: u64) -> bool {
    segments.iter().any(|s| s.start <= addr && addr < s.end)
}

/// Validates an ELF image's headers and returns its entry point and loadable segments.
fn check_elf<M, F>(mem: &M, image: &mut F) -> Result<(u64, Vec<Segment>)>
where
    M: GuestMemoryBackend,
    F: Read + Seek,
{
    let format = KernelFormat::Elf;
    let file_len = image.seek(SeekFrom::End(0)).map_err(Error::Io)?;
    image.rewind().map_err(Error::Io)?;
    let mut ehdr = Elf64_Ehdr::default();
    read_header(image, ehdr.as_mut_slice(), format)?;
    let (class, data, machine) = (
        ehdr.e_ident[EI_CLASS],
        ehdr.e_ident[EI_DATA],
        ehdr.e_machine,
    );
    if class != ELFCLASS64 || data != ELFDATA2LSB || machine != EM_X86_64 {
        return Err(Error::UnsupportedElf {
            class,
            data,
            machine,
        });
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(Error::ProgramHeaderSize(ehdr.e_phentsize));
    }
    let table_end = u64::from(ehdr.e_phnum)
        .checked_mul(u64::from(ehdr.e_phentsize))
        .and_then(|size| size.checked_add(ehdr.e_phoff));
    if table_end.is_none_or(|end| end > file_len) {
        return Err(Error::Truncated {
            format: format.name(),
        });
    }

    image
        .seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(Error::Io)?;
    let mut segments = Vec::new();
    for _ in 0..ehdr.e_phnum {
        let mut phdr = Elf64_Phdr::default();
        read_header(image, phdr.as_mut_slice(), format)?;
        if phdr.p_type != PT_LOAD || phdr.p_memsz == 0 {
            continue;
        }
        let bad = || Error::BadSegment {
            paddr: phdr.p_paddr,
            offset: phdr.p_offset,
            filesz: phdr.p_filesz,
            memsz: phdr.p_memsz,
            file_len,
        };
        let data_end = phdr.p_offset.checked_add(phdr.p_filesz).ok_or_else(bad)?;
        if phdr.p_filesz > phdr.p_memsz || data_end > file_len {
            return Err(bad());
        }
        if phdr.p_paddr < HIMEM_START {
            return Err(Error::SegmentBelowHighMemory(phdr.p_paddr));
        }
        if !in_memory(mem, phdr.p_paddr, phdr.p_memsz) {
            return Err(Error::OutsideMemory {
                addr: phdr.p_paddr,
                size: phdr.p_memsz,
            });
        }
        segments.push(Segment {
            start: phdr.p_paddr,
            // Cannot overflow: checked by `in_memory`.
            end: phdr.p_paddr + phdr.p_memsz,
        });
    }
    if segments.is_empty() {
        return Err(Error::NoLoadableSegment);
    }
    if !inside(&segments, ehdr.e_entry) {
        return Err(Error::EntryOutsideKernel {
            kind: "64-bit",
            addr: ehdr.e_entry,
        });
    }
    Ok((ehdr.e_entry, segments))
}

fn load_elf<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let (entry, segments) = check_elf(mem, image)?;
    let loaded =
        Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(Error::Load)?;
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            if !inside(&segments, addr.0) {
                return Err(Error::EntryOutsideKernel {
                    kind: "PVH",
                    addr: addr.0,
                });
            }
            Some(addr)
        }
        _ => None,
    };
    let end = segments.iter().map(|s| s.end).max().unwrap_or(HIMEM_START);
    Ok(LoadedKernel {
        format: if pvh_entry.is_some() {
            KernelFormat::ElfPvh
        } else {
            KernelFormat::Elf
        },
        entry: GuestAddress(entry),
        pvh_entry,
        end: GuestAddress(end),
        setup_header: None,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
    })
}

fn load_bzimage<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let format = KernelFormat::BzImage;
    let file_len = image.seek(SeekFrom::End(0)).map_err(Error::Io)?;
    image
        .seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(Error::Io)?;
    let mut hdr = setup_header::default();
    read_header(image, hdr.as_mut_slice(), format)?;

    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < MIN_BZIMAGE_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry {
            version,
            xloadflags: if version < MIN_BZIMAGE_VERSION {
                0
            } else {
                xloadflags
            },
        });
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(Error::NotLoadedHigh);
    }
    let setup_sects = match u64::from(hdr.setup_sects) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    // The boot sector plus the setup sectors precede the protected-mode kernel.
    let setup_size = (setup_sects + 1) * SECTOR_SIZE;
    let kernel_size = match file_len.checked_sub(setup_size) {
        Some(size) if size > 0 => size,
        _ => {
            return Err(Error::Truncated {
                format: format.name(),
            });
        }
    };
    if !in_memory(mem, HIMEM_START, kernel_size) {
        return Err(Error::OutsideMemory {
            addr: HIMEM_START,
            size: kernel_size,
        });
    }
    // Check where the kernel will decompress itself, once loaded at 1 MiB.
    // HIMEM_START is 1 MiB: the cast cannot truncate.
    hdr.code32_start = HIMEM_START as u32;
    let buffer = decompression_buffer(&hdr);
    let init_size = hdr.init_size;
    if !in_memory(mem, buffer, u64::from(init_size)) {
        return Err(Error::NoRoomToDecompress {
            addr: buffer,
            init_size,
        });
    }

    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = BzImage::load(mem, himem, image, himem).map_err(Error::Load)?;
    let initrd_addr_max = match hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        max => u64::from(max),
    };
    Ok(LoadedKernel {
        format,
        // Cannot overflow: HIMEM_START is 1 MiB.
        entry: GuestAddress(HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET),
        pvh_entry: None,
        end: GuestAddress(loaded.kernel_end),
        setup_header: loaded.setup_header.or(Some(hdr)),
        initrd_addr_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{
        TINY_BZIMAGE_SETUP_SIZE, TINY_LOAD_ADDR, XEN_ELFNOTE_PHYS32_ENTRY, elf_note, read,
        tiny_bzimage, tiny_elf, tiny_elf_with_notes, tiny_pvh_elf,
    };
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const CODE: &[u8] = &[0x90, 0x90, 0xf4, 0xeb, 0xfd]; // nop; nop; hlt; jmp hlt

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn load(mem: &GuestMemoryMmap, image: &[u8]) -> Result<LoadedKernel> {
        load_kernel(mem, &mut Cursor::new(image))
    }

    fn patch(image: &mut [u8], offset: usize, bytes: &[u8]) {
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    // Offsets into an ELF64 file: header fields, then the first program header at 64.
    const E_ENTRY: usize = 24;
    const P_TYPE: usize = 64;
    const P_PADDR: usize = 64 + 24;

    #[test]
    fn elf_loads_at_its_physical_address_and_enters_at_e_entry() {
        let mem = memory(4 << 20);
        let kernel = load(&mem, &tiny_elf(CODE)).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.entry, GuestAddress(TINY_LOAD_ADDR));
        assert_eq!(kernel.pvh_entry, None);
        assert_eq!(kernel.end, GuestAddress(TINY_LOAD_ADDR + CODE.len() as u64));
        assert_eq!(kernel.setup_header, None);
        assert_eq!(kernel.initrd_addr_max, DEFAULT_INITRD_ADDR_MAX);
        assert_eq!(read(&mem, TINY_LOAD_ADDR, CODE.len()), CODE);
    }

    #[test]
    fn elf_with_pvh_note_records_both_entry_points() {
        let mem = memory(4 << 20);
        // Another owner's note first, so that the loader has to skip it.
        let mut notes = elf_note("GNU", 3, &[0xab; 20]);
        let pvh_entry = TINY_LOAD_ADDR + 2;
        notes.extend(elf_note(
            "Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &pvh_entry.to_le_bytes(),
        ));
        let kernel = load(&mem, &tiny_elf_with_notes(CODE, &notes)).unwrap();
        assert_eq!(kernel.format, KernelFormat::ElfPvh);
        assert_eq!(kernel.pvh_entry, Some(GuestAddress(pvh_entry)));
        assert_eq!(kernel.entry, GuestAddress(TINY_LOAD_ADDR));
        assert_eq!(read(&mem, TINY_LOAD_ADDR, CODE.len()), CODE);
    }

    #[test]
    fn tiny_pvh_elf_enters_at_its_code() {
        let mem = memory(4 << 20);
        let kernel = load(&mem, &tiny_pvh_elf(CODE)).unwrap();
        assert_eq!(kernel.pvh_entry, Some(GuestAddress(TINY_LOAD_ADDR)));
    }

    #[test]
    fn without_pvh_selects_the_64_bit_entry() {
        let mem = memory(4 << 20);
        let kernel = load(&mem, &tiny_pvh_elf(CODE)).unwrap().without_pvh();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.pvh_entry, Some(GuestAddress(TINY_LOAD_ADDR)));
        let bz = load(&mem, &tiny_bzimage(CODE)).unwrap();
        assert_eq!(bz.without_pvh().format, KernelFormat::BzImage);
    }

    #[test]
    fn note_of_another_owner_is_not_pvh() {
        let mem = memory(4 << 20);
        let note = elf_note(
            "Abc",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &TINY_LOAD_ADDR.to_le_bytes(),
        );
        let kernel = load(&mem, &tiny_elf_with_notes(CODE, &note)).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.pvh_entry, None);
    }

    #[test]
    fn pvh_entry_outside_the_kernel_is_rejected() {
        let mem = memory(4 << 20);
        let note = elf_note("Xen", XEN_ELFNOTE_PHYS32_ENTRY, &0x1000u64.to_le_bytes());
        let err = load(&mem, &tiny_elf_with_notes(CODE, &note)).unwrap_err();
        assert!(matches!(
            err,
            Error::EntryOutsideKernel {
                kind: "PVH",
                addr: 0x1000
            }
        ));
    }

    #[test]
    fn pvh_note_with_short_descriptor_is_rejected() {
        let mem = memory(4 << 20);
        let note = elf_note("Xen", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2]);
        let err = load(&mem, &tiny_elf_with_notes(CODE, &note)).unwrap_err();
        assert!(matches!(err, Error::Load(_)), "{err:?}");
    }

    #[test]
    fn bzimage_is_loaded_at_1_mib_and_entered_0x200_in() {
        let mem = memory(4 << 20);
        let kernel = load(&mem, &tiny_bzimage(CODE)).unwrap();
        assert_eq!(kernel.format, KernelFormat::BzImage);
        assert_eq!(kernel.entry, GuestAddress(HIMEM_START + 0x200));
        assert_eq!(kernel.pvh_entry, None);
        assert_eq!(
            kernel.end,
            GuestAddress(HIMEM_START + 0x200 + CODE.len() as u64)
        );
        assert_eq!(read(&mem, kernel.entry.0, CODE.len()), CODE);
        assert_eq!(read(&mem, HIMEM_START, 1), [0xf4]);
        let hdr = kernel.setup_header.unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.code32_start }, HIMEM_START as u32);
        assert_eq!({ hdr.xloadflags }, XLF_KERNEL_64);
        assert_eq!(kernel.initrd_addr_max, 0x7fff_ffff);
    }

    #[test]
    fn bzimage_without_initrd_addr_max_gets_the_default() {
        let mem = memory(4 << 20);
        let mut image = tiny_bzimage(CODE);
        patch(&mut image, 0x22c, &0u32.to_le_bytes());
        let kernel = load(&mem, &image).unwrap();
        assert_eq!(kernel.initrd_addr_max, DEFAULT_INITRD_ADDR_MAX);
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_rejected() {
        let mem = memory(4 << 20);
        let mut image = tiny_bzimage(CODE);
        patch(&mut image, 0x236, &0u16.to_le_bytes());
        let err = load(&mem, &image).unwrap_err();
        assert!(matches!(
            err,
            Error::No64BitEntry {
                version: 0x020f,
                xloadflags: 0
            }
        ));

        let mut old = tiny_bzimage(CODE);
        patch(&mut old, 0x206, &0x0206u16.to_le_bytes());
        let err = load(&mem, &old).unwrap_err();
        assert!(matches!(
            err,
            Error::No64BitEntry {
                version: 0x0206,
                ..
            }
        ));
        assert!(err.to_string().contains("0x0206"), "{err}");
    }

    #[test]
    fn bzimage_not_loaded_high_is_rejected() {
        let mem = memory(4 << 20);
        let mut image = tiny_bzimage(CODE);
        patch(&mut image, 0x211, &[0]);
        assert!(matches!(load(&mem, &image), Err(Error::NotLoadedHigh)));
    }

    #[test]
    fn bzimage_without_kernel_is_truncated() {
        let mem = memory(4 << 20);
        let image = tiny_bzimage(CODE);
        let err = load(&mem, &image[..TINY_BZIMAGE_SETUP_SIZE]).unwrap_err();
        assert!(matches!(err, Error::Truncated { format: "bzImage" }));
        // The magic is there but the setup header is cut short.
        let err = load(&mem, &image[..0x210]).unwrap_err();
        assert!(matches!(err, Error::Truncated { format: "bzImage" }));
    }

    #[test]
    fn bzimage_that_cannot_decompress_in_memory_is_rejected() {
        let mem = memory(4 << 20);
        let mut image = tiny_bzimage(CODE);
        patch(&mut image, 0x260, &(8u32 << 20).to_le_bytes()); // init_size
        let err = load(&mem, &image).unwrap_err();
        assert!(matches!(
            err,
            Error::NoRoomToDecompress {
                addr: HIMEM_START,
                init_size: 0x80_0000
            }
        ));
    }

    #[test]
    fn bzimage_footprint_covers_its_decompression_buffer() {
        let mem = memory(32 << 20);
        let mut image = tiny_bzimage(CODE);
        patch(&mut image, 0x234, &[1]); // relocatable
        patch(&mut image, 0x258, &(16u64 << 20).to_le_bytes()); // pref_address
        patch(&mut image, 0x260, &(4u32 << 20).to_le_bytes()); // init_size
        let kernel = load(&mem, &image).unwrap();
        assert_eq!(kernel.footprint_end(), GuestAddress(20 << 20));

        // Relocated above its preferred address: aligned up from the load address.
        patch(&mut image, 0x258, &(1u64 << 20).to_le_bytes());
        let kernel = load(&mem, &image).unwrap();
        assert_eq!(kernel.footprint_end(), GuestAddress(6 << 20));
    }

    #[test]
    fn elf_footprint_is_its_end() {
        let mem = memory(4 << 20);
        let kernel = load(&mem, &tiny_elf(CODE)).unwrap();
        assert_eq!(kernel.footprint_end(), kernel.end);
    }

    #[test]
    fn empty_and_garbage_files_are_not_kernels() {
        let mem = memory(4 << 20);
        assert!(matches!(load(&mem, &[]), Err(Error::NotAKernel)));
        assert!(matches!(load(&mem, b"\x7fEL"), Err(Error::NotAKernel)));
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let err = load(&mem, &garbage).unwrap_err();
        assert!(matches!(err, Error::NotAKernel));
        assert_eq!(
            err.to_string(),
            "The kernel image is neither an ELF vmlinux nor a bzImage"
        );
    }

    #[test]
    fn truncated_elf_is_rejected() {
        let mem = memory(4 << 20);
        let image = tiny_elf(CODE);
        for len in [4, 40, 63] {
            let err = load(&mem, &image[..len]).unwrap_err();
            assert!(matches!(err, Error::Truncated { format: "ELF" }), "{len}");
        }
        // Header complete, program header cut.
        let err = load(&mem, &image[..100]).unwrap_err();
        assert!(matches!(err, Error::Truncated { format: "ELF" }));
        // Segment data cut.
        let err = load(&mem, &image[..image.len() - 1]).unwrap_err();
        assert!(matches!(err, Error::BadSegment { .. }), "{err:?}");
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let mem = memory(4 << 20);
        let elf = tiny_pvh_elf(CODE);
        for len in 0..elf.len() {
            assert!(load(&mem, &elf[..len]).is_err(), "ELF cut at {len}");
        }
        // A bzImage's kernel size is whatever follows the setup sectors, so a cut payload still
        // loads; a cut header does not.
        let bz = tiny_bzimage(CODE);
        for len in 0..bz.len() {
            let result = load(&mem, &bz[..len]);
            if len <= TINY_BZIMAGE_SETUP_SIZE {
                assert!(result.is_err(), "bzImage cut at {len}");
            }
        }
    }

    #[test]
    fn foreign_elf_is_rejected() {
        let mem = memory(4 << 20);
        let mut image = tiny_elf(CODE);
        image[EI_CLASS] = 1;
        assert!(matches!(
            load(&mem, &image),
            Err(Error::UnsupportedElf { class: 1, .. })
        ));
        let mut image = tiny_elf(CODE);
        patch(&mut image, 18, &40u16.to_le_bytes()); // ARM
        assert!(matches!(
            load(&mem, &image),
            Err(Error::UnsupportedElf { machine: 40, .. })
        ));
        let mut image = tiny_elf(CODE);
        patch(&mut image, 54, &32u16.to_le_bytes()); // e_phentsize
        assert!(matches!(
            load(&mem, &image),
            Err(Error::ProgramHeaderSize(32))
        ));
    }

    #[test]
    fn segment_below_1_mib_is_rejected_before_loading() {
        let mem = memory(4 << 20);
        let mut image = tiny_elf(CODE);
        patch(&mut image, P_PADDR, &0x7000u64.to_le_bytes());
        patch(&mut image, E_ENTRY, &0x7000u64.to_le_bytes());
        mem.write_slice(&[0x11; 8], GuestAddress(0x7000)).unwrap();
        let err = load(&mem, &image).unwrap_err();
        assert!(matches!(err, Error::SegmentBelowHighMemory(0x7000)));
        assert_eq!(read(&mem, 0x7000, 8), [0x11; 8], "nothing was written");
    }

    #[test]
    fn kernel_larger_than_memory_is_rejected() {
        let mem = memory((1 << 20) + 0x1000);
        let code = vec![0x90; 0x2000];
        let err = load(&mem, &tiny_elf(&code)).unwrap_err();
        assert!(matches!(
            err,
            Error::OutsideMemory {
                addr: HIMEM_START,
                size: 0x2000
            }
        ));
        let err = load(&mem, &tiny_bzimage(&code)).unwrap_err();
        assert!(matches!(
            err,
            Error::OutsideMemory {
                addr: HIMEM_START,
                ..
            }
        ));
    }

    #[test]
    fn entry_outside_the_segments_is_rejected() {
        let mem = memory(4 << 20);
        let mut image = tiny_elf(CODE);
        patch(&mut image, E_ENTRY, &0x20_0000u64.to_le_bytes());
        assert!(matches!(
            load(&mem, &image),
            Err(Error::EntryOutsideKernel {
                kind: "64-bit",
                addr: 0x20_0000
            })
        ));
    }

    #[test]
    fn elf_without_loadable_segment_is_rejected() {
        let mem = memory(4 << 20);
        let mut image = tiny_elf(CODE);
        patch(&mut image, P_TYPE, &0u32.to_le_bytes());
        assert!(matches!(load(&mem, &image), Err(Error::NoLoadableSegment)));
    }
}
